//! Starts each peer binary as the harness does (two workers, so `hyper-tuned`'s `SO_REUSEPORT`
//! listeners are covered too) and talks to every route with real clients: reqwest for HTTP and
//! SSE (and h2c with prior knowledge on axum-serve), tokio-tungstenite for the WebSocket echo;
//! axum-server also over TLS (a certificate made by rcgen, a tokio-rustls client).

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
    start_with(bin, &[])
}

fn start_with(bin: &str, extra: &[&str]) -> (Server, SocketAddr) {
    let addr = free_addr();
    let child = Command::new(bin)
        .args(["--addr", &addr.to_string(), "--workers", "2"])
        .args(extra)
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
    let a = hop_peers::Args::parse("x", ["--tls-cert", "c", "--tls-key", "k"].map(String::from));
    let a = a.unwrap();
    assert_eq!(
        (a.tls_cert.unwrap(), a.tls_key.unwrap()),
        ("c".into(), "k".into())
    );
    // One without the other.
    assert!(hop_peers::Args::parse("x", ["--tls-cert", "c"].map(String::from)).is_err());
}

#[tokio::test]
async fn axum_server_serves_every_route_without_tls() {
    check(env!("CARGO_BIN_EXE_axum-server")).await;
}

/// One request over TLS 1.3 with `Connection: close`, offering `alpn`: the protocol the server
/// picked and the whole response.
async fn https_get(
    addr: SocketAddr,
    ca: &rcgen::Certificate,
    alpn: &[&[u8]],
    path: &str,
) -> (Option<Vec<u8>>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let picked = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if picked.as_deref() == Some(b"h2") {
        return (picked, String::new());
    }
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    // A close without close_notify after the whole response is fine here.
    if let Ok(Err(e)) = read {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    (picked, String::from_utf8_lossy(&out).into_owned())
}

/// The TLS rows' peer: axum-server with `--tls-cert`/`--tls-key` answers HTTPS over
/// HTTP/1.1 (what wrk and hop-load speak) and picks h2 by ALPN when offered, as stock
/// axum-server does.
#[tokio::test]
async fn axum_server_serves_https() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("hop-peers-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let (_server, addr) = start_with(
        env!("CARGO_BIN_EXE_axum-server"),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );

    let (alpn, res) = https_get(addr, &cert.cert, &[b"http/1.1"], "/plaintext").await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(res.starts_with("HTTP/1.1 200 OK\r\n"), "{res}");
    assert!(res.ends_with("Hello, World!"), "{res}");

    let (alpn, res) = https_get(addr, &cert.cert, &[], "/json").await;
    assert_eq!(alpn, None);
    assert!(res.starts_with("HTTP/1.1 200 OK\r\n"), "{res}");
    assert!(res.ends_with(r#"{"message":"Hello, World!"}"#), "{res}");

    let (alpn, _) = https_get(addr, &cert.cert, &[b"h2", b"http/1.1"], "/plaintext").await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let _ = std::fs::remove_dir_all(&dir);
}
