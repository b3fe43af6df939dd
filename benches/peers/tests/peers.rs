//! Starts each peer binary as the harness does (two workers, so `hyper-tuned`'s `SO_REUSEPORT`
//! listeners are covered too) and talks to every route with real clients: reqwest for HTTP and
//! SSE (and h2c with prior knowledge on axum-serve), tokio-tungstenite for the WebSocket echo.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn start(bin: &str) -> (Server, SocketAddr) {
    let addr = free_addr();
    let child = Command::new(bin)
        .args(["--addr", &addr.to_string(), "--workers", "2"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{bin} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, addr)
}

async fn check(bin: &str) {
    let (_server, addr) = start(bin);
    let client = reqwest::Client::new();

    let r = client
        .get(format!("http://{addr}/plaintext"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "Hello, World!");

    let r = client
        .get(format!("http://{addr}/json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"message":"Hello, World!"}"#);

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo, Message::text("hello"));
    ws.close(None).await.unwrap();

    let mut sse = client
        .get(format!("http://{addr}/sse"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    // Publish until the subscriber sees the event (the subscription is live once the head came).
    let r = client
        .post(format!("http://{addr}/sse/broadcast"))
        .body("peer-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.contains("data: peer-token") {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, sse.chunk())
            .await
            .expect("no broadcast event")
            .unwrap()
            .expect("stream ended");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: broadcast"), "{seen}");
}

#[tokio::test]
async fn axum_serve_serves_every_route() {
    check(env!("CARGO_BIN_EXE_axum-serve")).await;
}

/// The HTTP/2 rows (10, 11) need axum-serve to answer h2c with prior knowledge.
#[tokio::test]
async fn axum_serve_answers_h2c_prior_knowledge() {
    let (_server, addr) = start(env!("CARGO_BIN_EXE_axum-serve"));
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = client
        .get(format!("http://{addr}/plaintext"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "Hello, World!");
}

#[tokio::test]
async fn hyper_tuned_serves_every_route() {
    check(env!("CARGO_BIN_EXE_hyper-tuned")).await;
}

#[test]
fn args() {
    let a = hop_peers::Args::parse(
        "x",
        ["--backend", "y", "--addr", "127.0.0.1:9", "--pollers", "3"].map(String::from),
    )
    .unwrap();
    assert_eq!((a.addr.port(), a.workers), (9, 3));
    assert!(hop_peers::Args::parse("x", ["--workers", "0"].map(String::from)).is_err());
    assert!(hop_peers::Args::parse("x", ["--addr"].map(String::from)).is_err());
}
