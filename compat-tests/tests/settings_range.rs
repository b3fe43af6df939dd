//! Settings over their whole range, and what a peer can do to the logs, on both backends. CI
//! runs this file in release mode too (`.ci/run`), where a `debug_assert` is gone and
//! arithmetic wraps instead of panicking, so what it shows holds for what users ship.
//!
//! - Extreme settings (`Duration::MAX`, `usize::MAX`, `u32::MAX`, HTTP/2's largest windows
//!   and frames; then zero and the smallest values) serve real requests: HTTP/1.1, HTTP/2 with
//!   prior knowledge, `hop::ws` and axum's WebSocket (tokio-tungstenite), a hijack, a read
//!   handler, SSE, and the same over TLS (rustls clients); no panic is counted, and the
//!   server keeps serving.
//! - Settings that cannot work are refused when the server starts, with an `InvalidInput`
//!   error naming the setting, never a panic.
//! - A request pipelined behind an SSE subscription is not dropped silently: the reactor closes
//!   the connection and logs why.
//! - A 60 KB SNI name sent 100 times grows the log (at the demo's default level, `info`) by
//!   less than 100 KB.
//!
//! The log is captured in this process: every test here installs one subscriber (the demo's
//! filter, `info`, and rustls's `log` records through tracing-log, as the demo gets them).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::{Bytes, BytesMut};
use compat_tests::{axum_ws_echo, ws_echo, Backend, IO_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use hop::sse::{Event, Hub};
use hop::tcp::{Conn, Handler};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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

// ----- the app and its clients -----

/// A read handler that echoes what it reads, however full its output queue is.
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

/// GET `/plaintext` twice on one HTTP/1.1 connection over `io`, then once over HTTP/2 if
/// `h2` is given.
async fn http1_get<IO>(io: IO, what: &str)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = within(
        what,
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await
    .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    for _ in 0..2 {
        let req = http::Request::get("/plaintext")
            .header("host", "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let body = within(what, async {
            send.ready().await.expect("ready");
            let res = send.send_request(req).await.expect("response");
            assert_eq!(res.status(), StatusCode::OK, "{what}");
            res.into_body().collect().await.expect("body").to_bytes()
        })
        .await;
        assert_eq!(&body[..], b"Hello, World!", "{what}");
    }
}

async fn http2_get<IO>(io: IO, what: &str)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = within(
        what,
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    for _ in 0..2 {
        let req = http::Request::get("http://localhost/plaintext")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let body = within(what, async {
            send.ready().await.expect("ready");
            let res = send.send_request(req).await.expect("response");
            assert_eq!(res.status(), StatusCode::OK, "{what}");
            res.into_body().collect().await.expect("body").to_bytes()
        })
        .await;
        assert_eq!(&body[..], b"Hello, World!", "{what}");
    }
}

/// A WebSocket echo on `path` over `io` (tokio-tungstenite), two messages.
async fn ws_roundtrip<IO>(io: IO, scheme: &str, path: &str)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ws, _) = within(
        path,
        tokio_tungstenite::client_async(format!("{scheme}://localhost{path}"), io),
    )
    .await
    .expect("WebSocket handshake");
    for text in ["one", "two"] {
        ws.send(TMessage::text(text)).await.expect("send");
        let got = within(path, ws.next())
            .await
            .expect("a message")
            .expect("ok");
        assert_eq!(got, TMessage::text(text), "{path}");
    }
    let _ = ws.close(None).await;
}

/// The upgrade and the first bytes in one write: both answered (the bytes echoed).
async fn hijack_roundtrip<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    io.write_all(
        b"GET /hijack HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nearly",
    )
    .await
    .unwrap();
    let want = b"early";
    let mut got = Vec::new();
    within("hijack", async {
        let mut buf = [0u8; 1024];
        while !got.ends_with(want) {
            let n = io.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    io.write_all(b"later").await.unwrap();
    let mut buf = [0u8; 5];
    within("hijack", io.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"later");
}

/// An SSE subscription that gets one event from `hub`.
async fn sse_event<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, hub: &Hub) {
    io.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    within("SSE", async {
        let mut buf = [0u8; 1024];
        loop {
            hub.send(&Event::new("ping"));
            tokio::select! {
                r = io.read(&mut buf) => {
                    let n = r.expect("read");
                    assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
                    got.extend_from_slice(&buf[..n]);
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if String::from_utf8_lossy(&got).contains("data: ping") {
                return;
            }
        }
    })
    .await;
}

/// Every kind of connection on a server started with these settings, then its counters.
async fn exercise(backend: Backend, configure: fn(hop::Builder) -> hop::Builder) {
    let hub = Hub::new();
    let srv = compat_tests::start(backend, app(hub.clone()), configure);
    let addr = srv.addr;
    let tcp = || async move { TcpStream::connect(addr).await.expect("connect") };
    http1_get(tcp().await, "HTTP/1.1").await;
    http2_get(tcp().await, "HTTP/2").await;
    ws_roundtrip(tcp().await, "ws", "/ws").await;
    ws_roundtrip(tcp().await, "ws", "/ws-axum").await;
    hijack_roundtrip(tcp().await).await;
    sse_event(tcp().await, &hub).await;
    // A read handler of its own (`serve_tcp`) with the same settings.
    let (raw, raw_handle) = compat_tests::start_tcp(backend, configure, |_| RawEcho);
    let mut s = TcpStream::connect(raw).await.unwrap();
    s.write_all(b"echo me").await.unwrap();
    let mut buf = [0u8; 7];
    within("read handler", s.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"echo me");
    // Still serving, nothing panicked.
    http1_get(tcp().await, "HTTP/1.1 again").await;
    assert_eq!(srv.handle.stats().panics, 0, "[{backend}] panics");
    assert_eq!(
        raw_handle.stats().panics,
        0,
        "[{backend}] read handler panics"
    );
    raw_handle.shutdown();
    srv.handle.shutdown();
}

/// The largest value of every setting.
fn largest(b: hop::Builder) -> hop::Builder {
    b.header_read_timeout(Duration::MAX)
        .idle_timeout(Duration::MAX)
        .read_timeout(Duration::MAX)
        .close_timeout(Duration::MAX)
        .drain_timeout(Duration::MAX)
        .tcp_keepalive(Duration::MAX)
        .tcp_keepalive_interval(Duration::MAX)
        .tcp_keepalive_retries(u32::MAX)
        .tcp_fastopen(u32::MAX)
        .tcp_defer_accept(Duration::MAX)
        .park_idle_after(Duration::MAX)
        .backlog(i32::MAX)
        .max_connections(usize::MAX)
        .max_read_buffer(usize::MAX)
        .max_write_buffer(usize::MAX)
        .read_chunk(usize::MAX)
        .max_buf_size(usize::MAX)
        .max_headers(10_000)
        .http2_max_concurrent_streams(u32::MAX)
        .http2_initial_stream_window_size((1 << 31) - 1)
        .http2_initial_connection_window_size((1 << 31) - 1)
        .http2_max_frame_size((1 << 24) - 1)
        .http2_max_header_list_size(u32::MAX)
        .http2_max_send_buf_size(u32::MAX as usize)
        .http2_keep_alive_interval(Duration::MAX)
        .http2_keep_alive_timeout(Duration::MAX)
        .http2_idle_timeout(Duration::MAX)
        .http2_max_pending_accept_reset_streams(usize::MAX)
        .http2_max_local_error_reset_streams(usize::MAX)
        .max_connections_per_ip(usize::MAX)
        .max_connection_age(Duration::MAX)
        .max_requests_per_connection(usize::MAX)
        .request_body_timeout(Duration::MAX)
}

/// The smallest value of every setting that takes one (zero where it has a meaning).
fn smallest(b: hop::Builder) -> hop::Builder {
    b.pollers(0)
        .compat_workers(0)
        .backlog(-1)
        .close_timeout(Duration::ZERO)
        .drain_timeout(Duration::ZERO)
        .tcp_keepalive(Duration::ZERO)
        .tcp_keepalive_interval(Duration::ZERO)
        .tcp_keepalive_retries(0)
        .tcp_fastopen(0)
        .tcp_defer_accept(Duration::ZERO)
        .park_idle_after(Duration::ZERO)
        .max_read_buffer(0)
        .max_write_buffer(0)
        .read_chunk(0)
        .max_buf_size(8192)
        .http2_initial_stream_window_size(0)
        .http2_initial_connection_window_size(0)
        .http2_max_frame_size(1 << 14)
        .http2_max_send_buf_size(1)
        .http2_max_pending_accept_reset_streams(0)
        .http2_max_local_error_reset_streams(0)
}

both! {
    async fn largest_settings_serve_every_kind_of_connection(backend) {
        exercise(backend, largest).await;
    }

    async fn smallest_settings_serve_every_kind_of_connection(backend) {
        exercise(backend, smallest).await;
    }

    /// The smallest limits that serve (one connection per IP, one request per connection, an
    /// age of 1 ns): each HTTP/1.1 connection serves its one request with
    /// `Connection: close`; nothing panics. (The largest values are in `largest`, zero is
    /// refused below.)
    async fn smallest_limits_serve_one_request_each(backend) {
        let srv = compat_tests::start(backend, app(Hub::new()), |b| {
            b.max_connections_per_ip(1)
                .max_requests_per_connection(1)
                .max_connection_age(Duration::from_nanos(1))
        });
        for _ in 0..3 {
            // The previous connection may still be closing on the server: retried.
            let mut served = None;
            for _ in 0..100 {
                let mut c = compat_tests::RawConn::connect(srv.addr).await;
                let _ = c.send(b"GET /plaintext HTTP/1.1\r\nhost: x\r\n\r\n").await;
                if let Ok(res) = c.try_read_response(false, IO_TIMEOUT).await {
                    served = Some(res);
                    let _ = c.wait_close(IO_TIMEOUT).await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let res = served.unwrap_or_else(|| panic!("[{backend}] never served"));
            assert_eq!(res.status, 200, "[{backend}]");
            assert!(res.connection_close(), "[{backend}] {res:?}");
        }
        let stats = srv.handle.stats();
        assert!(stats.max_requests_reached + stats.max_age_reached >= 3, "[{backend}] {stats:?}");
        assert_eq!(stats.panics, 0, "[{backend}] {stats:?}");
    }

    /// Each setting that cannot work is refused when the server starts, naming the setting.
    async fn impossible_settings_are_refused_by_name(backend) {
        type Configure = fn(hop::Builder) -> hop::Builder;
        let cases: &[(&str, Configure)] = &[
            ("pollers", |b| b.pollers(usize::MAX)),
            ("compat_workers", |b| b.compat_workers(usize::MAX)),
            ("max_connections", |b| b.max_connections(0)),
            ("max_connections_per_ip", |b| b.max_connections_per_ip(0)),
            ("max_connection_age", |b| b.max_connection_age(Duration::ZERO)),
            ("max_requests_per_connection", |b| b.max_requests_per_connection(0)),
            ("header_read_timeout", |b| b.header_read_timeout(Duration::ZERO)),
            ("idle_timeout", |b| b.idle_timeout(Duration::ZERO)),
            ("read_timeout", |b| b.read_timeout(Duration::ZERO)),
            ("tls_handshake_timeout", |b| b.tls_handshake_timeout(Duration::ZERO)),
            ("http2_idle_timeout", |b| b.http2_idle_timeout(Duration::ZERO)),
            ("http2_keep_alive_interval", |b| b.http2_keep_alive_interval(Duration::ZERO)),
            ("http2_keep_alive_timeout", |b| b.http2_keep_alive_timeout(Duration::ZERO)),
            ("request_body_timeout", |b| b.request_body_timeout(Duration::ZERO)),
            ("max_buf_size", |b| b.max_buf_size(0)),
            ("max_buf_size", |b| b.max_buf_size(8191)),
            ("max_headers", |b| b.max_headers(usize::MAX)),
            ("http2_initial_stream_window_size", |b| {
                b.http2_initial_stream_window_size(u32::MAX)
            }),
            ("http2_initial_connection_window_size", |b| {
                b.http2_initial_connection_window_size(1 << 31)
            }),
            ("http2_max_frame_size", |b| b.http2_max_frame_size(0)),
            ("http2_max_frame_size", |b| b.http2_max_frame_size(u32::MAX)),
            ("http2_max_send_buf_size", |b| b.http2_max_send_buf_size(usize::MAX)),
            ("http2_max_send_buf_size", |b| b.http2_max_send_buf_size(0)),
        ];
        for (setting, configure) in cases {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let serve = configure(compat_tests::builder(backend)).serve(listener, app(Hub::new()));
            let err = within(setting, std::future::IntoFuture::into_future(serve))
                .await
                .expect_err(setting);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{setting}: {err}");
            assert!(err.to_string().contains(setting), "{setting}: {err}");
        }
        // `run` (no runtime) checks before it starts its own.
        let err = std::thread::spawn(move || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            compat_tests::builder(backend)
                .compat_workers(usize::MAX)
                .serve(listener, app(Hub::new()))
                .run()
        })
        .join()
        .expect("run does not panic")
        .expect_err("refused");
        assert!(err.to_string().contains("compat_workers"), "{err}");
    }

    /// A request pipelined behind an SSE subscription, read with it or after it: the reactor
    /// cannot serve it behind an endless response and closes the connection, logging why; the
    /// tokio backend leaves it in hyper's buffer and goes on streaming. Never dropped silently.
    async fn a_request_pipelined_behind_sse_is_not_dropped_silently(backend) {
        let hub = Hub::new();
        let srv = compat_tests::start(backend, app(hub.clone()), |b| b);
        let next = b"GET /plaintext HTTP/1.1\r\nhost: x\r\n\r\n";
        for with_it in [true, false] {
            let from = log::len();
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            if with_it {
                let mut both = b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n".to_vec();
                both.extend_from_slice(next);
                s.write_all(&both).await.unwrap();
            } else {
                sse_event(&mut s, &hub).await;
                s.write_all(next).await.unwrap();
            }
            let mut got = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(3), async {
                let mut buf = [0u8; 4096];
                loop {
                    hub.send(&Event::new("tick"));
                    match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return,
                        Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                }
            })
            .await
            .is_ok();
            let text = String::from_utf8_lossy(&got);
            assert!(!text.contains("Hello, World!"), "[{backend}] served behind SSE?");
            match backend {
                Backend::Reactor => {
                    assert!(closed, "[{backend}] with_it={with_it}: still open: {text}");
                    let logged = compat_tests::wait_until(IO_TIMEOUT, || {
                        log::has_since(from, "taking the connection over failed")
                            || log::has_since(from, "an SSE subscriber sent bytes")
                    })
                    .await;
                    assert!(logged, "[{backend}] with_it={with_it}: the close was not logged");
                }
                Backend::Tokio => {
                    assert!(!closed, "[{backend}] with_it={with_it}: closed");
                    assert!(text.contains("data: tick"), "[{backend}] stream stopped: {text}");
                }
            }
        }
        assert_eq!(srv.handle.stats().panics, 0);
    }

    /// TLS with the largest settings (`tls_handshake_timeout(Duration::MAX)` used to panic on
    /// every read-handler accept): HTTPS over HTTP/1.1 and HTTP/2, wss on both WebSocket
    /// paths, a hijack and SSE, and a read handler over TLS.
    async fn tls_serves_with_the_largest_settings(backend) {
        let pki = pki();
        let hub = Hub::new();
        let server_cfg = pki.server_config();
        let srv = compat_tests::start(backend, app(hub.clone()), move |b| {
            largest(b).tls(server_cfg).tls_handshake_timeout(Duration::MAX)
        });
        let addr = srv.addr;
        let h1 = client_config(&pki.ca, &[b"http/1.1"]);
        let h2 = client_config(&pki.ca, &[b"h2"]);
        http1_get(tls_connect(addr, h1.clone()).await, "HTTPS/1.1").await;
        http2_get(tls_connect(addr, h2).await, "HTTPS/2").await;
        ws_roundtrip(tls_connect(addr, h1.clone()).await, "wss", "/ws").await;
        ws_roundtrip(tls_connect(addr, h1.clone()).await, "wss", "/ws-axum").await;
        hijack_roundtrip(tls_connect(addr, h1.clone()).await).await;
        sse_event(tls_connect(addr, h1.clone()).await, &hub).await;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let raw = listener.local_addr().unwrap();
        let serve = largest(compat_tests::builder(backend))
            .tls(pki.server_config())
            .tls_handshake_timeout(Duration::MAX)
            .serve_tcp(listener, |_| RawEcho);
        let raw_handle = serve.handle();
        tokio::spawn(async move { serve.await });
        for _ in 0..3 {
            let mut s = tls_connect(raw, h1.clone()).await;
            s.write_all(b"echo me").await.unwrap();
            let mut buf = [0u8; 7];
            within("TLS read handler", s.read_exact(&mut buf)).await.unwrap();
            assert_eq!(&buf, b"echo me");
        }
        http1_get(tls_connect(addr, h1).await, "HTTPS/1.1 again").await;
        assert_eq!(srv.handle.stats().panics, 0, "[{backend}] panics");
        assert_eq!(raw_handle.stats().panics, 0, "[{backend}] read handler panics");
        assert_eq!(raw_handle.stats().tls_handshakes, 3);
        raw_handle.shutdown();
        srv.handle.shutdown();
    }

    /// A 60 KB SNI name, 100 times: rustls would log each whole (it is not a DNS name); hop
    /// logs a bounded, rate-limited line. The log grows by less than 100 KB.
    async fn a_huge_sni_name_does_not_flood_the_log(backend) {
        let pki = pki();
        let server_cfg = pki.server_config();
        let srv = compat_tests::start(backend, app(Hub::new()), move |b| b.tls(server_cfg));
        let hello = client_hello_with_sni(60 * 1024);
        let before = log::len();
        for _ in 0..100 {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            // The server may close before it has read it all: a write error is fine.
            let _ = s.write_all(&hello).await;
            let mut buf = [0u8; 1024];
            let ended = tokio::time::timeout(IO_TIMEOUT, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(ended.is_ok(), "[{backend}] the handshake did not end");
        }
        // (Counted once the server is done with the socket, which may be after the client saw
        // it closed.)
        let handle = srv.handle.clone();
        let counted = compat_tests::wait_until(IO_TIMEOUT, || {
            handle.stats().tls_handshake_failures == 100
        })
        .await;
        let stats = srv.handle.stats();
        assert!(counted, "[{backend}] every attempt fails and is counted: {stats:?}");
        let grew = log::len() - before;
        eprintln!("[{backend}] 100 ClientHellos with a 60 KB SNI: the log grew by {grew} bytes");
        assert!(grew < 100 * 1024, "[{backend}] the log grew by {grew} bytes");
        // Said at least once in this process: the line is rate-limited per process, and the
        // other backend's test (running beside this one) may have used this window's share.
        assert!(
            log::has_since(0, "TLS handshake failed"),
            "[{backend}] no line about the failed handshakes"
        );
        srv.handle.shutdown();
    }
}

// ----- TLS: certificates, clients, and a hand-made ClientHello -----

struct Pki {
    ca: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a leaf for `localhost` signed by it (made once per process).
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let leaf = params.signed_by(&key, &ca).unwrap();
        Pki {
            ca: ca.der().clone(),
            cert_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
        }
    })
}

impl Pki {
    fn server_config(&self) -> hop::tls::RustlsConfig {
        hop::tls::RustlsConfig::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
            .expect("server config")
    }
}

fn client_config(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").unwrap();
    within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("TLS handshake")
}

/// A ClientHello whose SNI is `len` bytes of `a.` labels that make no DNS name (too long),
/// split over handshake records of at most 16 KiB as TLS allows (rustls's clients cannot send
/// it). It offers TLS 1.2 with only a TLS 1.3 cipher suite, so the handshake fails at once.
fn client_hello_with_sni(len: usize) -> Vec<u8> {
    fn u16be(n: usize) -> [u8; 2] {
        u16::try_from(n).expect("fits in 16 bits").to_be_bytes()
    }
    let name: Vec<u8> = b"a.".iter().copied().cycle().take(len).collect();
    let mut sni = vec![0u8]; // host_name
    sni.extend_from_slice(&u16be(name.len()));
    sni.extend_from_slice(&name);
    let mut ext = Vec::new();
    let mut push_ext = |typ: u16, body: &[u8]| {
        ext.extend_from_slice(&typ.to_be_bytes());
        ext.extend_from_slice(&u16be(body.len()));
        ext.extend_from_slice(body);
    };
    let mut list = u16be(sni.len()).to_vec();
    list.extend_from_slice(&sni);
    push_ext(0x0000, &list); // server_name
    push_ext(0x000a, &[0, 2, 0x00, 0x1d]); // supported_groups: x25519
    push_ext(0x000d, &[0, 2, 0x04, 0x03]); // signature_algorithms: ecdsa_secp256r1_sha256
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend_from_slice(&[1, 0]); // no compression
    body.extend_from_slice(&u16be(ext.len()));
    body.extend_from_slice(&ext);
    let mut hs = vec![1u8]; // client_hello
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut out = Vec::new();
    for chunk in hs.chunks(16 * 1024) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&u16be(chunk.len()));
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn the_hand_made_client_hello_is_well_formed() {
    let hello = client_hello_with_sni(60 * 1024);
    // Four records (60 KB of name over 16 KiB records), each a handshake record.
    let mut at = 0;
    let mut records = 0;
    let mut payload = 0;
    while at < hello.len() {
        assert_eq!(hello[at], 0x16);
        let n = u16::from_be_bytes([hello[at + 3], hello[at + 4]]) as usize;
        assert!(n <= 16 * 1024);
        payload += n;
        at += 5 + n;
        records += 1;
    }
    assert_eq!(at, hello.len());
    assert_eq!(records, 4);
    assert!(payload > 60 * 1024);
}
