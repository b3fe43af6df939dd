//! Long-lived quiet connections on both backends: a WebSocket whose client answers pings but
//! says nothing stays open past the HTTP idle timeout (`hop::ws`, axum's `WebSocketUpgrade`, a
//! raw hijack), under default settings; `hop::ws` pings a quiet peer and closes one that stops
//! answering with a close frame (`1001`), counted in `Stats::ws_ping_timeouts`: at 30 s + 30 s
//! under defaults, and with a 1 s + 1 s keep-alive for the mechanism's details.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::Router;
use bytes::BytesMut;
use compat_tests::{backend_tests, ws_frame, ws_handshake, ws_read_frame};
use futures_util::{SinkExt, StreamExt};
use hop::ws::{Message, WsConfig, WsUpgrade};
use hop::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Past the default `idle_timeout` (60 s) with margin.
const QUIET: Duration = Duration::from_secs(75);

/// A hijacked connection's echo (a read handler started from an HTTP upgrade).
struct RawEcho;

impl hop::tcp::Handler for RawEcho {
    fn on_read(&mut self, conn: &mut hop::tcp::Conn, input: &mut BytesMut) -> std::io::Result<()> {
        Ok(conn.write(&input.split())?)
    }
}

async fn hijack(hijack: hop::Hijack) -> impl IntoResponse {
    hijack.on_read(RawEcho);
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [("connection", "upgrade"), ("upgrade", "echo")],
    )
}

/// A short keep-alive (the mechanism, not the default, is under test there).
fn short() -> WsConfig {
    WsConfig {
        keep_alive_interval: Some(Duration::from_millis(1000)),
        keep_alive_timeout: Duration::from_millis(1000),
        ..WsConfig::default()
    }
}

fn app() -> Router {
    Router::new()
        .route("/ws", any(compat_tests::ws_echo))
        .route("/ws-axum", get(compat_tests::axum_ws_echo))
        .route("/hijack", get(hijack))
        .route(
            "/ws-short",
            any(|u: WsUpgrade| async move { u.config(short()).on_upgrade(compat_tests::WsEcho) }),
        )
}

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// The next text message, answering (and counting) the pings that come before it.
async fn next_text(ws: &mut Client, pings: &mut u32) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message in time")
            .expect("the stream is open")
            .expect("no websocket error");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) => *pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A tokio-tungstenite client on `path` echoes, says nothing for [`QUIET`] while it reads (so
/// it answers pings), then echoes again: the pings it saw.
async fn quiet_websocket(backend: Backend, addr: SocketAddr, path: &str) -> u32 {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("[{backend} {path}] handshake: {e}"));
    let mut pings = 0;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_text(&mut ws, &mut pings).await, "before");
    let end = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => panic!("[{backend} {path}] while quiet: {other:?}"),
        }
    }
    ws.send(Message::text("after"))
        .await
        .unwrap_or_else(|e| panic!("[{backend} {path}] cut while quiet: {e}"));
    assert_eq!(
        next_text(&mut ws, &mut pings).await,
        "after",
        "[{backend} {path}]"
    );
    let _ = ws.close(None).await;
    pings
}

/// A hijacked connection says nothing for [`QUIET`], then echoes.
async fn quiet_hijack(backend: Backend, addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /hijack HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "[{backend}] {head:?}");
    tokio::time::sleep(QUIET).await;
    s.write_all(b"still here")
        .await
        .unwrap_or_else(|e| panic!("[{backend}] hijack cut while quiet: {e}"));
    let mut got = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut got))
        .await
        .expect("the echo in time")
        .unwrap_or_else(|e| panic!("[{backend}] hijack cut while quiet: {e}"));
    assert_eq!(&got, b"still here");
}

/// The next frame from the server, which may be tens of seconds away: its opcode, payload,
/// and when it came.
async fn slow_frame(
    s: &mut TcpStream,
    backend: Backend,
    since: Instant,
) -> (u8, Vec<u8>, Duration) {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(50), s.peek(&mut b))
        .await
        .unwrap_or_else(|_| panic!("[{backend}] no frame from the server"))
        .unwrap();
    let (_, op, payload) = ws_read_frame(s).await;
    (op, payload, since.elapsed())
}

/// A raw client on `/ws` (defaults) that reads but never answers: pinged at 30 s, closed
/// with `1001` at 60 s (interval + timeout): when each came.
async fn silent_peer(backend: Backend, addr: SocketAddr) -> (Duration, Duration) {
    let mut s = ws_handshake(addr, "/ws").await;
    let opened = Instant::now();
    let (op, _, pinged) = slow_frame(&mut s, backend, opened).await;
    assert_eq!(op, 0x9, "[{backend}] a ping first");
    let (op, payload, closed) = slow_frame(&mut s, backend, opened).await;
    assert_eq!(op, 0x8, "[{backend}] then a close");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
    (pinged, closed)
}

/// Default settings (the suite's builder: 2 pollers, parking at once; `idle_timeout` 60 s),
/// every path on both backends at once, so the file takes ~80 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_connections_outlive_the_idle_timeout() {
    compat_tests::run_test(quiet_connections()).await
}

async fn quiet_connections() {
    let reactor = compat_tests::start(Backend::Reactor, app(), |b| b);
    let tokio_ = compat_tests::start(Backend::Tokio, app(), |b| b);
    let started = Instant::now();
    let (hop_r, hop_t, axum_r, axum_t, (), (), silent_r, silent_t) = tokio::join!(
        quiet_websocket(Backend::Reactor, reactor.addr, "/ws"),
        quiet_websocket(Backend::Tokio, tokio_.addr, "/ws"),
        quiet_websocket(Backend::Reactor, reactor.addr, "/ws-axum"),
        quiet_websocket(Backend::Tokio, tokio_.addr, "/ws-axum"),
        quiet_hijack(Backend::Reactor, reactor.addr),
        quiet_hijack(Backend::Tokio, tokio_.addr),
        silent_peer(Backend::Reactor, reactor.addr),
        silent_peer(Backend::Tokio, tokio_.addr),
    );
    eprintln!("a silent peer under defaults: pinged, closed (1001) after {silent_r:?} (reactor), {silent_t:?} (tokio)");
    for (pinged, closed) in [silent_r, silent_t] {
        assert!(pinged >= Duration::from_secs(29) && pinged < Duration::from_secs(45));
        assert!(closed >= Duration::from_secs(59) && closed < Duration::from_secs(80));
    }
    // hop::ws pinged the quiet client (30 s interval: at about 30 and 60 s); axum's does not.
    eprintln!(
        "quiet {QUIET:?}, then echoed: /ws pings seen {hop_r} (reactor), {hop_t} (tokio); \
         /ws-axum {axum_r}, {axum_t}; hijack echoed on both; {:?} in all",
        started.elapsed()
    );
    assert!(hop_r >= 2 && hop_t >= 2, "hop::ws pings: {hop_r}, {hop_t}");
    assert_eq!((axum_r, axum_t), (0, 0));
    assert!(started.elapsed() < Duration::from_secs(110));
    for srv in [&reactor, &tokio_] {
        // The silent peer only.
        assert_eq!(srv.handle.stats().ws_ping_timeouts, 1, "[{}]", srv.backend);
        srv.handle.shutdown();
    }
}

#[test]
fn keep_alive_is_on_by_default() {
    let cfg = WsConfig::default();
    assert_eq!(cfg.keep_alive_interval, Some(Duration::from_secs(30)));
    assert_eq!(cfg.keep_alive_timeout, Duration::from_secs(30));
}

backend_tests! {
    /// A client that reads but never answers: pinged once the interval has passed, closed with
    /// `1001` once the timeout has passed too, and counted.
    async fn a_peer_that_stops_answering_is_closed_with_a_close_frame(backend) {
        let srv = compat_tests::start(backend, app(), |b| b);
        let mut s = ws_handshake(srv.addr, "/ws-short").await;
        let opened = Instant::now();
        let (fin, op, payload) = ws_read_frame(&mut s).await;
        assert_eq!((fin, op), (true, 0x9), "a ping first");
        let pinged = opened.elapsed();
        assert!(pinged >= Duration::from_millis(900), "pinged after {pinged:?}");
        let (fin, op, payload2) = ws_read_frame(&mut s).await;
        let closed = opened.elapsed();
        assert_eq!((fin, op), (true, 0x8), "then a close frame");
        assert_eq!(u16::from_be_bytes([payload2[0], payload2[1]]), 1001);
        assert_eq!(&payload2[2..], b"ping timeout");
        assert!(payload.is_empty());
        eprintln!("[{backend}] 1 s + 1 s keep-alive: pinged after {pinged:?}, 1001 after {closed:?}");
        // Within interval + timeout (2 s), with a generous margin for a loaded machine.
        assert!(
            closed >= Duration::from_millis(1900) && closed < Duration::from_secs(10),
            "closed after {closed:?}"
        );
        // Then the connection ends.
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest))
            .await
            .expect("the connection ends")
            .unwrap_or(0);
        assert_eq!(n, 0, "nothing after the close frame: {rest:?}");
        assert!(
            compat_tests::wait_until(Duration::from_secs(5), || {
                srv.handle.stats().ws_ping_timeouts == 1
            })
            .await,
            "{:?}",
            srv.handle.stats()
        );
        srv.handle.shutdown();
    }

    /// A client that never reads at all gets the same: the close frame is in its socket.
    async fn a_peer_that_never_reads_is_closed_too(backend) {
        let srv = compat_tests::start(backend, app(), |b| b);
        let mut s = ws_handshake(srv.addr, "/ws-short").await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(ws_read_frame(&mut s).await.1, 0x9);
        let (_, op, payload) = ws_read_frame(&mut s).await;
        assert_eq!(op, 0x8);
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest))
            .await
            .expect("the connection ends")
            .unwrap_or(0);
        assert_eq!(n, 0);
        srv.handle.shutdown();
    }

    /// A client that answers pings stays open through many intervals.
    async fn a_peer_that_answers_pings_stays_open(backend) {
        let srv = compat_tests::start(backend, app(), |b| b);
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws-short", srv.addr)).await.unwrap();
        let mut pings = 0;
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(end, ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(other) => panic!("while quiet: {other:?}"),
            }
        }
        assert!(pings >= 2, "{pings} pings");
        ws.send(Message::text("alive")).await.unwrap();
        assert_eq!(next_text(&mut ws, &mut pings).await, "alive");
        assert_eq!(srv.handle.stats().ws_ping_timeouts, 0);
        srv.handle.shutdown();
    }

    /// Any frame is a sign of life, not only a Pong: a client that sends a message every
    /// 300 ms but never answers a Ping is not closed.
    async fn any_frame_counts_as_liveness(backend) {
        let srv = compat_tests::start(backend, app(), |b| b);
        let mut s = ws_handshake(srv.addr, "/ws-short").await;
        for i in 0..15u8 {
            s.write_all(&ws_frame(true, 0x1, &[b'a' + i], true)).await.unwrap();
            // The echo (a ping only if this client was held up for the interval).
            let (op, payload) = loop {
                match ws_read_frame(&mut s).await {
                    (_, 0x9, _) => continue,
                    (_, op, payload) => break (op, payload),
                }
            };
            assert_eq!((op, payload), (0x1, vec![b'a' + i]));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(srv.handle.stats().ws_ping_timeouts, 0);
        srv.handle.shutdown();
    }
}
