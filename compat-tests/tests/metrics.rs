//! What hop reports through the `metrics` facade (feature `metrics`, on for this workspace),
//! read back from `metrics-exporter-prometheus`'s recorder as Prometheus text, on both
//! backends, with real clients on a real socket: a connection closed by its peer, one closed at
//! the header timeout, one closed by `max_requests_per_connection`, the open gauges going up
//! and down for HTTP/1.1 (and parked, on the reactor), HTTP/2 (h2c), a WebSocket, an SSE
//! subscriber and a read-handler connection, the request counters, and the bytes read and
//! written.
//!
//! The recorder is the process's (one for this test binary, installed before any server
//! starts) and the metrics are process-wide, so the tests here run one at a time and look at
//! what changed while they ran.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use axum::routing::{any, get};
use axum::Router;
use compat_tests::{get_req, wait_until, ws_echo, Backend, RawConn};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_tungstenite::tungstenite::Message as TMessage;

/// The recorder, installed once for this binary.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder of this process")
    })
}

/// One test at a time: the metrics are the process's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every series in the recorder's text: `name{labels}` to its value.
fn scrape() -> HashMap<String, f64> {
    parse(&recorder().render())
}

/// Prometheus's text format: a series per line (`name{labels} value`), comments skipped.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// How much `series` grew since `before`.
fn delta(before: &HashMap<String, f64>, series: &str) -> f64 {
    let now = scrape();
    now.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

fn closed(reason: &str) -> String {
    format!("hop_connections_closed_total{{reason=\"{reason}\"}}")
}

fn open(kind: &str) -> String {
    format!("hop_connections_open{{kind=\"{kind}\"}}")
}

/// Waits until `series` has grown by `by` since `before` (or fails, naming it).
async fn grows(before: &HashMap<String, f64>, series: &str, by: f64, backend: Backend) {
    let ok = wait_until(Duration::from_secs(10), || delta(before, series) == by).await;
    assert!(
        ok,
        "[{backend}] {series} changed by {} (expected {by})\n{}",
        delta(before, series),
        recorder().render()
    );
}

fn app() -> Router {
    Router::new()
        .route("/plaintext", get(|| async { "Hello, World!" }))
        .route("/ws", any(ws_echo))
}

async fn observed(backend: Backend) {
    let _serial = SERIAL.lock().await;
    recorder();
    let before = scrape();
    let srv = compat_tests::start(backend, app(), |b| {
        b.header_read_timeout(Some(Duration::from_millis(300)))
            .max_requests_per_connection(3)
    });

    // A keep-alive connection: open as HTTP/1.1, two requests, closed by the client.
    let mut c = RawConn::connect(srv.addr).await;
    for _ in 0..2 {
        let res = c.roundtrip(get_req("/plaintext", "")).await;
        assert_eq!(res.status, 200, "[{backend}]");
    }
    grows(&before, &open("http1"), 1.0, backend).await;
    // Idle: the reactor parks it (this suite's builder parks at once); the tokio backend never
    // parks.
    let parked = if backend == Backend::Reactor {
        1.0
    } else {
        0.0
    };
    grows(&before, "hop_connections_parked", parked, backend).await;
    drop(c);
    grows(&before, &closed("closed"), 1.0, backend).await;
    grows(&before, &open("http1"), 0.0, backend).await;
    grows(&before, "hop_connections_parked", 0.0, backend).await;

    // Half a request head, then nothing: closed at the header timeout.
    let mut c = RawConn::connect(srv.addr).await;
    c.send("GET /plaintext HTTP/1.1\r\n").await.unwrap();
    grows(&before, &closed("header_timeout"), 1.0, backend).await;
    drop(c);

    // `max_requests_per_connection(3)`: the third response closes the connection.
    let mut c = RawConn::connect(srv.addr).await;
    for _ in 0..3 {
        let res = c.roundtrip(get_req("/plaintext", "")).await;
        assert_eq!(res.status, 200, "[{backend}]");
    }
    grows(&before, &closed("max_requests"), 1.0, backend).await;
    drop(c);

    // HTTP/2 with prior knowledge: counted as h2 while open, not as HTTP/1.1.
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get(srv.url("/plaintext"))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200, "[{backend}]");
    res.into_body().collect().await.unwrap();
    grows(&before, &open("h2"), 1.0, backend).await;
    grows(&before, &open("http1"), 0.0, backend).await;
    drop(send);
    let _ = driver.await;
    grows(&before, &open("h2"), 0.0, backend).await;

    // A WebSocket (hop::ws): counted as one while open.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", srv.addr))
        .await
        .unwrap();
    ws.send(TMessage::text("hello")).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed, TMessage::text("hello"), "[{backend}]");
    grows(&before, &open("ws"), 1.0, backend).await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    grows(&before, &open("ws"), 0.0, backend).await;
    grows(&before, &open("http1"), 0.0, backend).await;

    // Requests: five HTTP/1.1 and the WebSocket's upgrade request, one HTTP/2 stream.
    grows(
        &before,
        "hop_requests_total{protocol=\"http1\"}",
        6.0,
        backend,
    )
    .await;
    grows(&before, "hop_requests_total{protocol=\"h2\"}", 1.0, backend).await;

    // Every connection accepted has closed, each with one reason.
    let accepted = "hop_connections_accepted_total";
    grows(&before, accepted, 5.0, backend).await;
    let reasons = [
        "closed",
        "error",
        "header_timeout",
        "idle_timeout",
        "max_requests",
        "drain",
        "forced",
    ];
    let all_closed = wait_until(Duration::from_secs(10), || {
        reasons
            .iter()
            .map(|r| delta(&before, &closed(r)))
            .sum::<f64>()
            == 5.0
    })
    .await;
    assert!(all_closed, "[{backend}] {}", recorder().render());

    // Bytes: at least the requests' heads in, the responses out; nowhere near a megabyte.
    let read = delta(&before, "hop_bytes_received_total");
    let written = delta(&before, "hop_bytes_sent_total");
    let head = get_req("/plaintext", "").len() as f64;
    assert!(
        (5.0 * head..1e6).contains(&read),
        "[{backend}] {read} bytes read"
    );
    // Each HTTP/1.1 response is over 60 bytes (status line, date, length, 13-byte body).
    assert!(
        (5.0 * 60.0..1e6).contains(&written),
        "[{backend}] {written} bytes written"
    );
    srv.handle.shutdown();
}

/// A read handler that answers each read with `ok`.
struct Okay;

impl hop::tcp::Handler for Okay {
    fn on_read(
        &mut self,
        conn: &mut hop::tcp::Conn,
        input: &mut bytes::BytesMut,
    ) -> std::io::Result<()> {
        input.clear();
        conn.write(b"ok")?;
        Ok(())
    }
}

/// The `sse` and `tcp` kinds of `hop_connections_open`: one each while a subscriber and a
/// read-handler connection are open, none once their clients leave.
async fn sse_and_tcp(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _serial = SERIAL.lock().await;
    recorder();
    let before = scrape();
    let hub = hop::sse::Hub::new();
    let h = hub.clone();
    let app = Router::new().route(
        "/sse",
        get(move |req: axum::extract::Request| async move { h.subscribe(&req) }),
    );
    let srv = compat_tests::start(backend, app, |b| b);
    let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "[{backend}] closed before the head");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "[{backend}]");
    grows(&before, &open("sse"), 1.0, backend).await;
    grows(&before, &open("http1"), 0.0, backend).await;
    drop(s);
    grows(&before, &open("sse"), 0.0, backend).await;
    srv.handle.shutdown();

    let (addr, handle) = compat_tests::start_tcp(backend, |b| b, |_| Okay);
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ok", "[{backend}]");
    grows(&before, &open("tcp"), 1.0, backend).await;
    drop(c);
    grows(&before, &open("tcp"), 0.0, backend).await;
    handle.shutdown();
}

compat_tests::backend_tests! {
    async fn metrics_count_connections_requests_and_bytes(backend) {
        observed(backend).await;
    }

    async fn metrics_count_sse_and_tcp_connections(backend) {
        sse_and_tcp(backend).await;
    }
}

#[test]
fn reported_text_parses() {
    let m = parse("# TYPE a counter\na{x=\"y\"} 3\nb 1.5\n\n");
    assert_eq!(m.get("a{x=\"y\"}"), Some(&3.0));
    assert_eq!(m.get("b"), Some(&1.5));
}
