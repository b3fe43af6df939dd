//! Connection limits (issue 24), what `Stats` counts of them, and the drain log, on both
//! backends, with real clients on a real socket:
//!
//! - `max_connections_per_ip`: past the limit a connection from 127.0.0.1 is closed before any
//!   byte and counted; a WebSocket counts as a connection; once one closes (also after a
//!   panicking handler closed it) a new one is served.
//! - `max_requests_per_connection`: the n-th HTTP/1.1 response carries `Connection: close`
//!   and a FIN follows (the connection parks between requests here: the count goes on);
//!   HTTP/2 gets GOAWAY after n streams.
//! - `max_connection_age`: a keep-alive connection sending a request every 300 ms gets
//!   `Connection: close`, then a FIN; an idle (parked) one is closed; HTTP/2 gets GOAWAY and a
//!   slow stream in flight still completes; WebSockets (hop's and axum's) outlive the age.
//! - `Stats` counts HTTP/1 requests, WebSocket and SSE connections.
//! - The drain log says how many HTTP, WebSocket, SSE and TCP connections are still open.
//!
//! The log is captured in this process (one subscriber for the binary, installed before
//! anything logs), as `settings_range.rs` does.

use std::io;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::{Bytes, BytesMut};
use compat_tests::{axum_ws_echo, get_req, wait_until, ws_echo, Backend, End, RawConn, IO_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use hop::sse::{Event, Hub};
use hop::tcp::{Conn, Handler};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as TMessage;

/// Like `compat_tests::backend_tests!`, with the log capture installed before anything logs.
macro_rules! both {
    ($($(#[$meta:meta])* async fn $name:ident($backend:ident) $body:block)*) => {$(
        $(#[$meta])*
        async fn $name($backend: Backend) $body

        compat_tests::paste::paste! {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn [<$name _reactor>]() {
                log::install();
                compat_tests::run_test($name(Backend::Reactor)).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn [<$name _tokio>]() {
                log::install();
                compat_tests::run_test($name(Backend::Tokio)).await
            }
        }
    )*};
}

use compat_tests::log_capture as log;

/// A read handler that echoes what it reads.
struct RawEcho;

impl Handler for RawEcho {
    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> io::Result<()> {
        conn.write(&input.split()[..])?;
        Ok(())
    }
}

async fn hijack(hijack: hop::Hijack) -> impl IntoResponse {
    hijack.on_read(RawEcho);
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [("connection", "upgrade"), ("upgrade", "echo")],
    )
}

async fn sse(State(hub): State<Hub>, req: Request) -> Response {
    hub.subscribe(&req).into_response()
}

fn app(hub: Hub) -> Router {
    Router::new()
        .route("/plaintext", get(|| async { "Hello, World!" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                "slow done"
            }),
        )
        .route(
            "/panic",
            get(|| async {
                if true {
                    panic!("a handler panics");
                }
                "never"
            }),
        )
        .route("/ws", get(ws_echo))
        .route("/ws-axum", any(axum_ws_echo))
        .route("/hijack", get(hijack))
        .route("/sse", get(sse))
        .with_state(hub)
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {IO_TIMEOUT:?}"))
}

fn plaintext() -> String {
    get_req("/plaintext", "")
}

/// A tokio-tungstenite client on `path`, after one echo.
async fn ws_client(
    addr: std::net::SocketAddr,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = within(
        path,
        tokio_tungstenite::client_async(format!("ws://localhost{path}"), tcp),
    )
    .await
    .expect("WebSocket handshake");
    ws_echo_once(&mut ws, "hello", path).await;
    ws
}

async fn ws_echo_once(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
    text: &str,
    path: &str,
) {
    ws.send(TMessage::text(text)).await.expect("send");
    let got = within(path, ws.next())
        .await
        .expect("a message")
        .expect("ok");
    assert_eq!(got, TMessage::text(text), "{path}");
}

/// An HTTP/2 (prior knowledge) client connection of hyper's, its connection task spawned.
async fn h2(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = within(
        "HTTP/2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)),
    )
    .await
    .expect("HTTP/2 handshake");
    (send, tokio::spawn(conn))
}

async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    path: &str,
) -> hyper::Result<(StatusCode, Bytes)> {
    let req = http::Request::get(format!("http://localhost{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Waits for the server to close `conn`: how it ended and what came meanwhile.
async fn closed(conn: &mut RawConn) -> (End, Vec<u8>) {
    conn.wait_close(IO_TIMEOUT).await
}

both! {
    /// `max_connections_per_ip(2)`: a third connection from 127.0.0.1 (with an HTTP
    /// connection and a WebSocket open) is closed before any byte and counted; once one
    /// closes, a new one is served; a panicking handler's connection gives its place back.
    async fn per_ip_limit(backend) {
        let srv = compat_tests::start(backend, app(Hub::new()), |b| b.max_connections_per_ip(2));
        let mut a = RawConn::connect(srv.addr).await;
        assert_eq!(a.roundtrip(plaintext()).await.status, 200);
        let mut ws = ws_client(srv.addr, "/ws").await;
        // The third: closed at accept, nothing sent.
        let mut c = RawConn::connect(srv.addr).await;
        let _ = c.send(plaintext()).await;
        let (end, got) = closed(&mut c).await;
        assert!(end.closed(), "[{backend}] third connection not closed: {end:?}");
        assert!(got.is_empty(), "[{backend}] third connection was answered: {got:?}");
        assert_eq!(srv.handle.stats().rejected_per_ip, 1, "[{backend}]");
        // The WebSocket counts until it closes, as an open connection and in its IP's count.
        assert_eq!(srv.handle.stats().active, 2, "[{backend}] {:?}", srv.handle.stats());
        ws_echo_once(&mut ws, "still here", "/ws").await;
        let _ = ws.close(None).await;
        drop(ws);
        let served = wait_until(IO_TIMEOUT, || srv.handle.stats().active == 1).await;
        assert!(served, "[{backend}] {:?}", srv.handle.stats());
        let mut d = RawConn::connect(srv.addr).await;
        assert_eq!(d.roundtrip(plaintext()).await.status, 200, "[{backend}]");
        // At the limit again; a panic closes `d`, which gives its place back.
        let res = d.roundtrip(get_req("/panic", "")).await;
        assert_eq!(res.status, 500, "[{backend}]");
        let (end, _) = closed(&mut d).await;
        assert!(end.closed(), "[{backend}] {end:?}");
        let freed = wait_until(IO_TIMEOUT, || srv.handle.stats().active == 1).await;
        assert!(freed, "[{backend}] {:?}", srv.handle.stats());
        let mut e = RawConn::connect(srv.addr).await;
        assert_eq!(e.roundtrip(plaintext()).await.status, 200, "[{backend}]");
        let stats = srv.handle.stats();
        assert_eq!(stats.rejected_per_ip, 1, "[{backend}] {stats:?}");
        drop((a, e));
        assert!(
            wait_until(IO_TIMEOUT, || srv.handle.stats().active == 0).await,
            "[{backend}] {:?}",
            srv.handle.stats()
        );
    }

    /// `max_requests_per_connection(3)`: the third HTTP/1.1 response carries
    /// `Connection: close` and a FIN follows; the first two do not. HTTP/2: GOAWAY once 3
    /// streams have started.
    async fn max_requests(backend) {
        let srv = compat_tests::start(backend, app(Hub::new()), |b| {
            b.max_requests_per_connection(3)
        });
        let mut c = RawConn::connect(srv.addr).await;
        for i in 1..=3 {
            let res = c.roundtrip(plaintext()).await;
            assert_eq!(res.status, 200, "[{backend}] request {i}");
            assert_eq!(res.connection_close(), i == 3, "[{backend}] request {i}: {res:?}");
            // Parked in between (the suite parks at once): the count goes on.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (end, rest) = closed(&mut c).await;
        assert_eq!(end, End::Eof, "[{backend}] {rest:?}");
        assert!(rest.is_empty(), "[{backend}] {rest:?}");
        let stats = srv.handle.stats();
        assert_eq!(stats.max_requests_reached, 1, "[{backend}] {stats:?}");
        assert_eq!(stats.http1_requests, 3, "[{backend}] {stats:?}");

        let (mut send, conn) = h2(srv.addr).await;
        for i in 1..=3 {
            let (status, _) = within("h2 request", h2_get(&mut send, "/plaintext"))
                .await
                .unwrap_or_else(|e| panic!("[{backend}] h2 request {i}: {e}"));
            assert_eq!(status, StatusCode::OK);
        }
        // GOAWAY: the connection ends (the idle timeout is 60 s).
        let res = within("the h2 connection to end after GOAWAY", conn).await.unwrap();
        assert!(res.is_ok(), "[{backend}] {res:?}");
        assert_eq!(srv.handle.stats().max_requests_reached, 2, "[{backend}]");
    }

    /// `max_connection_age(1 s)` on a connection that sends a request every 300 ms: a
    /// response after its age carries `Connection: close`, then a FIN comes.
    async fn age_busy_http1(backend) {
        let srv = compat_tests::start(backend, app(Hub::new()), |b| {
            b.max_connection_age(Duration::from_secs(1))
        });
        let t0 = Instant::now();
        let mut c = RawConn::connect(srv.addr).await;
        let mut n = 0;
        loop {
            let res = c.roundtrip(plaintext()).await;
            n += 1;
            assert_eq!(res.status, 200, "[{backend}]");
            if res.connection_close() {
                break;
            }
            assert!(n < 100, "[{backend}] no Connection: close after {:?}", t0.elapsed());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            t0.elapsed() >= Duration::from_secs(1),
            "[{backend}] told to close before its age: {:?}",
            t0.elapsed()
        );
        assert!(n >= 2, "[{backend}] {n}");
        let (end, rest) = closed(&mut c).await;
        assert_eq!(end, End::Eof, "[{backend}] {rest:?}");
        assert_eq!(srv.handle.stats().max_age_reached, 1, "[{backend}]");
    }

    /// `max_connection_age(1 s)` on an idle keep-alive connection (parked on the reactor):
    /// closed (the idle timeout is 60 s).
    async fn age_idle_http1(backend) {
        let srv = compat_tests::start(backend, app(Hub::new()), |b| {
            b.max_connection_age(Duration::from_secs(1))
        });
        let t0 = Instant::now();
        let mut c = RawConn::connect(srv.addr).await;
        let res = c.roundtrip(plaintext()).await;
        assert!(!res.connection_close(), "[{backend}] {res:?}");
        let (end, rest) = closed(&mut c).await;
        assert_eq!(end, End::Eof, "[{backend}] {rest:?}");
        assert!(t0.elapsed() >= Duration::from_secs(1), "[{backend}] {:?}", t0.elapsed());
        assert_eq!(srv.handle.stats().max_age_reached, 1, "[{backend}]");
        if backend == Backend::Reactor {
            assert!(srv.handle.stats().parked >= 1, "[{backend}] not parked");
        }
    }

    /// `max_connection_age(1 s)` on HTTP/2: GOAWAY; a slow stream in flight (2.5 s) still
    /// completes, then the connection ends.
    async fn age_http2(backend) {
        let srv = compat_tests::start(backend, app(Hub::new()), |b| {
            b.max_connection_age(Duration::from_secs(1))
        });
        let (mut send, conn) = h2(srv.addr).await;
        let (status, _) = within("h2", h2_get(&mut send, "/plaintext")).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let mut slow_send = send.clone();
        let slow = tokio::spawn(async move { h2_get(&mut slow_send, "/slow").await });
        let told = wait_until(IO_TIMEOUT, || srv.handle.stats().max_age_reached == 1).await;
        assert!(told, "[{backend}] no GOAWAY: {:?}", srv.handle.stats());
        assert!(!slow.is_finished(), "[{backend}] the slow stream ended before the GOAWAY");
        let (status, body) = within("the slow stream", slow)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("[{backend}] the slow stream was cut: {e}"));
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow done"[..]), "[{backend}]");
        let res = within("the h2 connection to end", conn).await.unwrap();
        assert!(res.is_ok(), "[{backend}] {res:?}");
    }

    /// `max_connection_age(1 s)` leaves WebSockets (hop's and axum's) and a hijacked
    /// connection alone.
    async fn age_leaves_upgrades(backend) {
        let srv = compat_tests::start(backend, app(Hub::new()), |b| {
            b.max_connection_age(Duration::from_secs(1))
        });
        let mut hop_ws = ws_client(srv.addr, "/ws").await;
        let mut axum_ws = ws_client(srv.addr, "/ws-axum").await;
        let mut raw = TcpStream::connect(srv.addr).await.unwrap();
        raw.write_all(b"GET /hijack HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            within("101", raw.read_exact(&mut b)).await.unwrap();
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        ws_echo_once(&mut hop_ws, "after its age", "/ws").await;
        ws_echo_once(&mut axum_ws, "after its age", "/ws-axum").await;
        raw.write_all(b"later").await.unwrap();
        let mut buf = [0u8; 5];
        within("hijack echo", raw.read_exact(&mut buf)).await.unwrap();
        assert_eq!(&buf, b"later");
        assert_eq!(srv.handle.stats().max_age_reached, 0, "[{backend}]");
        let _ = hop_ws.close(None).await;
        let _ = axum_ws.close(None).await;
    }

    /// `Stats` counts HTTP/1 requests, WebSocket connections (hop::ws, and a hijack of a
    /// WebSocket request) and SSE subscriptions.
    async fn stats_count(backend) {
        let hub = Hub::new();
        let srv = compat_tests::start(backend, app(hub.clone()), |b| b);
        let mut c = RawConn::connect(srv.addr).await;
        for _ in 0..5 {
            assert_eq!(c.roundtrip(plaintext()).await.status, 200);
        }
        let mut ws = ws_client(srv.addr, "/ws").await;
        let mut sse = RawConn::connect(srv.addr).await;
        sse.send(get_req("/sse", "")).await.unwrap();
        let joined = wait_until(IO_TIMEOUT, || hub.len() == 1).await;
        assert!(joined, "[{backend}] no subscriber");
        let stats = srv.handle.stats();
        assert_eq!(stats.http1_requests, 7, "[{backend}] {stats:?}");
        assert_eq!(stats.ws_connections, 1, "[{backend}] {stats:?}");
        assert_eq!(stats.sse_connections, 1, "[{backend}] {stats:?}");
        hub.send(&Event::new("x"));
        let _ = ws.close(None).await;
        drop(sse);
    }

    /// The drain log says what it waits for: with an idle HTTP connection, a WebSocket that
    /// does not answer the close, an SSE subscriber and a hijacked connection open, the
    /// first line counts each; 5 s on, the WebSocket (its close handshake unanswered for the
    /// 10 s close timeout) is still open and a second line says so.
    async fn drain_log(backend) {
        // One drain at a time in this process: each reads the other's log lines otherwise.
        static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = ONE.lock().await;
        let hub = Hub::new();
        let (srv, stop) = compat_tests::start_with_shutdown(backend, app(hub.clone()), |b| b);
        let mut http = RawConn::connect(srv.addr).await;
        assert_eq!(http.roundtrip(plaintext()).await.status, 200);
        // A WebSocket whose client never reads again (raw, after the handshake).
        let ws = compat_tests::ws_handshake(srv.addr, "/ws").await;
        let mut sse = RawConn::connect(srv.addr).await;
        sse.send(get_req("/sse", "")).await.unwrap();
        let mut raw = TcpStream::connect(srv.addr).await.unwrap();
        raw.write_all(b"GET /hijack HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            within("101", raw.read_exact(&mut b)).await.unwrap();
            head.push(b[0]);
        }
        // The handler has the connection once it echoes (the 101 goes out before).
        raw.write_all(b"x").await.unwrap();
        let mut x = [0u8; 1];
        within("hijack echo", raw.read_exact(&mut x)).await.unwrap();
        let joined = wait_until(IO_TIMEOUT, || hub.len() == 1).await;
        assert!(joined, "[{backend}] no subscriber");
        let before = log::lines_with("1 HTTP, 1 WebSocket, 1 SSE, 1 TCP open").len();
        stop.send(()).unwrap();
        let first = wait_until(IO_TIMEOUT, || {
            log::lines_with("1 HTTP, 1 WebSocket, 1 SSE, 1 TCP open").len() > before
        })
        .await;
        assert!(
            first,
            "[{backend}] {:?}",
            log::lines_with("draining for up to")
        );
        let line = log::lines_with("1 HTTP, 1 WebSocket, 1 SSE, 1 TCP open").pop().unwrap();
        assert!(line.contains("shutdown signal received"), "[{backend}] {line}");
        let later = log::lines_with("draining: ").len();
        let second = wait_until(Duration::from_secs(9), || {
            log::lines_with("draining: ")
                .iter()
                .skip(later)
                .any(|l| l.contains("1 WebSocket") && l.contains("still open"))
        })
        .await;
        assert!(second, "[{backend}] {:?}", log::lines_with("draining: "));
        drop((http, ws, sse, raw));
        srv.join(IO_TIMEOUT).await;
    }
}
