//! HTTP/2 cleartext (h2c, prior knowledge) on both backends, with hop's default HTTP/2
//! settings, real sockets and real clients: hyper's own HTTP/2 client, the `h2` crate (for the
//! rapid-reset attack), hyper's HTTP/1 client next to them on the same port, `curl` and
//! `nghttp`, eventsource-stream (SSE over h2) and tokio-tungstenite (WebSockets over h2 with
//! extended CONNECT, RFC 8441).
//!
//! It checks: many concurrent streams on one connection; large bodies both ways under flow
//! control with a slow reader; trailers both ways; a panicking handler among healthy streams;
//! client resets dropping the handler and its body; GOAWAY on graceful shutdown; the idle
//! GOAWAY (`http2_idle_timeout`); rapid reset (CVE-2023-44487); protocol sniffing (HTTP/1.1 on
//! the same port, a preface split across writes, a silent client and the header timeout);
//! command-line clients; SSE (`hop::sse` and axum's `Sse`); WebSockets over HTTP/2 (axum's
//! `WebSocketUpgrade`, and what `hop::ws` does with such a request).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use axum::Router;
use bytes::Bytes;
use compat_tests::{
    backend_tests, close_ws_over_h2, lazy_body, rss_bytes, start, wait_until, RawConn, StreamProbe,
};
use eventsource_stream::Eventsource;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long any one step may take (generous: a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(30);

/// Tests that measure or use a lot of memory (the resident set covers the whole process) run
/// one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ClientBody = UnsyncBoxBody<Bytes, BoxError>;

fn empty() -> ClientBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

fn full(b: impl Into<Bytes>) -> ClientBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// A body of `frames` sent as they are (data and trailers).
fn frames(frames: Vec<Frame<Bytes>>) -> ClientBody {
    let s = futures_util::stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
    StreamBody::new(s).boxed_unsync()
}

/// Awaits `fut`, failing the test after [`WAIT`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// Byte `i` of the test pattern.
fn pat(i: usize) -> u8 {
    (i % 251) as u8
}

fn pattern(offset: usize, len: usize) -> Bytes {
    (offset..offset + len).map(pat).collect::<Vec<u8>>().into()
}

/// An HTTP/2 connection of hyper's client (prior knowledge), its connection task spawned.
struct H2 {
    addr: SocketAddr,
    send: SendRequest<ClientBody>,
    conn: JoinHandle<hyper::Result<()>>,
}

async fn h2_over<T>(addr: SocketAddr, io: T) -> H2
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = within(
        "HTTP/2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
    )
    .await
    .expect("HTTP/2 handshake");
    H2 {
        addr,
        send,
        conn: tokio::spawn(conn),
    }
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    tcp.set_nodelay(true).unwrap();
    tcp
}

async fn h2_connect(addr: SocketAddr) -> H2 {
    h2_over(addr, tcp(addr).await).await
}

impl H2 {
    fn req(&self, method: Method, path: &str, body: ClientBody) -> Request<ClientBody> {
        Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path))
            .body(body)
            .unwrap()
    }

    /// Sends `req` on this connection (a new stream).
    fn send(
        &self,
        req: Request<ClientBody>,
    ) -> impl Future<Output = hyper::Result<http::Response<Incoming>>> + Send + 'static {
        let mut send = self.send.clone();
        async move { send.send_request(req).await }
    }

    /// `GET path`: the status and the whole body; panics on an error.
    async fn get(&self, path: &str) -> (StatusCode, Bytes) {
        let res = within(path, self.send(self.req(Method::GET, path, empty())))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(res.version(), Version::HTTP_2);
        let status = res.status();
        let body = within(path, res.into_body().collect())
            .await
            .unwrap_or_else(|e| panic!("GET {path} body: {e}"))
            .to_bytes();
        (status, body)
    }

    /// Whether hyper's connection task has ended.
    fn closed(&self) -> bool {
        self.conn.is_finished()
    }
}

fn hello_app() -> Router {
    Router::new().route("/hello", get(|| async { "hello" }))
}

async fn panics() -> &'static str {
    tokio::time::sleep(Duration::from_millis(50)).await;
    panic!("a handler panics (expected by this test)");
}

/// Drops report themselves on a channel.
struct DropGuard(
    tokio::sync::mpsc::UnboundedSender<&'static str>,
    &'static str,
);

impl Drop for DropGuard {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

backend_tests! {
    /// 100 streams (the default `http2_max_concurrent_streams`) on one connection, each
    /// handler sleeping 200 ms: they run at once.
    async fn concurrent_streams_on_one_connection(backend) {
        let app = Router::new().route(
            "/sleep/{i}",
            get(|Path(i): Path<u32>| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                format!("done {i}")
            }),
        );
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;
        let t0 = Instant::now();
        let calls = (0..100u32).map(|i| {
            let sent = client.send(client.req(Method::GET, &format!("/sleep/{i}"), empty()));
            async move {
                let res = sent.await.unwrap_or_else(|e| panic!("stream {i}: {e}"));
                let status = res.status();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (i, status, body)
            }
        });
        let results = within("100 streams", futures_util::future::join_all(calls)).await;
        let elapsed = t0.elapsed();
        for (i, status, body) in results {
            assert_eq!(status, StatusCode::OK, "[{backend}] stream {i}");
            assert_eq!(body, format!("done {i}"), "[{backend}] stream {i}");
        }
        // One after another they would take 20 s.
        assert!(
            elapsed < Duration::from_secs(8),
            "[{backend}] 100 streams of 200 ms took {elapsed:?}: not concurrent"
        );
        let stats = srv.handle.stats();
        assert_eq!(stats.http2_connections, 1, "[{backend}] {stats:?}");
        assert!(stats.http2_streams >= 100, "[{backend}] {stats:?}");
        assert_eq!(stats.accepted, 1, "[{backend}] {stats:?}");
        assert!(!client.closed());
    }

    /// 8 MiB up and 8 MiB down on one stream, through the default windows (256 KiB a stream,
    /// 1 MiB the connection), to a client that reads the response slowly; streamed straight
    /// back, collected by the handler first, and read slowly by the handler.
    async fn large_bodies_under_flow_control(backend) {
        const BIG: usize = 8 << 20;
        const CHUNK: usize = 64 << 10;
        let _heavy = HEAVY.lock().await;
        let app = Router::new()
            .route(
                "/echo",
                post(|body: Body| async move { Body::from_stream(body.into_data_stream()) }),
            )
            .route(
                "/slow-read",
                post(|body: Body| async move {
                    // Reads slowly: a pause every 64 KiB; answers the bytes back.
                    let mut body = body.into_data_stream();
                    let mut all = Vec::with_capacity(BIG);
                    let mut since_pause = 0;
                    while let Some(data) = body.next().await {
                        let data = data.expect("request body");
                        since_pause += data.len();
                        all.extend_from_slice(&data);
                        if since_pause >= 64 << 10 {
                            since_pause = 0;
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                    Body::from(all)
                }),
            )
            .route(
                "/collect",
                post(|body: Body| async move {
                    let bytes = body.collect().await.expect("request body").to_bytes();
                    Body::from(bytes)
                }),
            );
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;
        for path in ["/echo", "/collect", "/slow-read"] {
            let upload = futures_util::stream::iter(0..BIG / CHUNK)
                .map(|i| Ok::<_, BoxError>(Frame::data(pattern(i * CHUNK, CHUNK))));
            let req = client.req(Method::POST, path, StreamBody::new(upload).boxed_unsync());
            let res = within(path, client.send(req))
                .await
                .unwrap_or_else(|e| panic!("[{backend}] POST {path}: {e}"));
            assert_eq!(res.status(), StatusCode::OK, "[{backend}] {path}");
            // The slow reader: a pause every 64 KiB.
            let mut body = res.into_body();
            let mut got = 0usize;
            let mut since_pause = 0usize;
            while let Some(frame) = within("a response frame", body.frame()).await {
                let frame = frame.unwrap_or_else(|e| panic!("[{backend}] {path} body: {e}"));
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                for (j, b) in data.iter().enumerate() {
                    if *b != pat(got + j) {
                        panic!(
                            "[{backend}] {path}: byte {} is {b}, not {}",
                            got + j,
                            pat(got + j)
                        );
                    }
                }
                got += data.len();
                since_pause += data.len();
                if since_pause >= 64 << 10 {
                    since_pause = 0;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            assert_eq!(got, BIG, "[{backend}] {path}: response length");
        }
        assert!(!client.closed());
    }

    /// Trailers both ways: a handler's response trailers reach the client, and a request's
    /// trailers reach the handler.
    async fn trailers_both_ways(backend) {
        let app = Router::new()
            .route(
                "/trailers",
                get(|| async {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
                    trailers.insert("grpc-status", HeaderValue::from_static("0"));
                    let frames = vec![
                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body "))),
                        Ok(Frame::data(Bytes::from_static(b"then trailers"))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    Body::new(StreamBody::new(futures_util::stream::iter(frames)))
                }),
            )
            .route(
                "/read-trailers",
                post(|body: Body| async move {
                    let collected = body.collect().await.expect("request body");
                    let trailer = collected
                        .trailers()
                        .and_then(|t| t.get("x-request-trailer"))
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_else(|| "none".into());
                    let data = collected.to_bytes();
                    format!("{} {trailer}", String::from_utf8_lossy(&data))
                }),
            );
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;

        let res = within(
            "GET /trailers",
            client.send(client.req(Method::GET, "/trailers", empty())),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let collected = within("body", res.into_body().collect()).await.unwrap();
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), "body then trailers", "[{backend}]");
        let trailers = trailers.unwrap_or_else(|| panic!("[{backend}] no response trailers"));
        assert_eq!(trailers.get("x-checksum").unwrap(), "abc123", "[{backend}]");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0", "[{backend}]");

        let mut t = HeaderMap::new();
        t.insert("x-request-trailer", HeaderValue::from_static("xyz"));
        let body = frames(vec![
            Frame::data(Bytes::from_static(b"hello")),
            Frame::data(Bytes::from_static(b" world")),
            Frame::trailers(t),
        ]);
        let res = within(
            "POST",
            client.send(client.req(Method::POST, "/read-trailers", body)),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = within("body", res.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "hello world xyz", "[{backend}]");
    }

    /// A handler that panics fails its own stream only: the others on the connection finish,
    /// and the connection serves a new request afterwards.
    async fn panicking_stream_spares_the_others(backend) {
        let app = Router::new().route("/panic", get(panics)).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        );
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;
        let slow: Vec<_> = (0..5)
            .map(|_| tokio::spawn(client.send(client.req(Method::GET, "/slow", empty()))))
            .collect();
        let panicked = within(
            "the panicking stream",
            client.send(client.req(Method::GET, "/panic", empty())),
        )
        .await;
        match panicked {
            Ok(res) => assert_eq!(
                res.status(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "[{backend}]"
            ),
            Err(e) => eprintln!("[{backend}] the panicking stream was reset: {e}"),
        }
        for s in slow {
            let res = within("a slow stream", s)
                .await
                .unwrap()
                .unwrap_or_else(|e| {
                    panic!("[{backend}] a stream next to the panicking one failed: {e}")
                });
            assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "slow");
        }
        assert_eq!(
            client.get("/slow").await,
            (StatusCode::OK, Bytes::from("slow"))
        );
        assert!(!client.closed(), "[{backend}] the connection closed");
        assert_eq!(srv.handle.stats().http2_connections, 1);
    }

    /// A client that resets a stream (drops the response body of an endless stream, or the
    /// response future of a handler still running) makes the server drop that body or handler;
    /// the connection goes on serving.
    async fn client_reset_drops_the_handler(backend) {
        let probe = Arc::new(StreamProbe::default());
        let (tx, mut dropped) = tokio::sync::mpsc::unbounded_channel();
        let started = Arc::new(tokio::sync::Notify::new());
        let app = Router::new()
            .route(
                "/endless",
                get(|State(probe): State<Arc<StreamProbe>>| async move {
                    // 1 GiB, produced only as the client takes it.
                    lazy_body(1 << 30, 16 << 10, probe)
                }),
            )
            .route(
                "/hang",
                get({
                    let started = started.clone();
                    move || async move {
                        let _guard = DropGuard(tx, "hang");
                        started.notify_one();
                        std::future::pending::<()>().await;
                        "never"
                    }
                }),
            )
            .route("/hello", get(|| async { "hello" }))
            .with_state(probe.clone());
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;

        // The body: read a little of it, then drop it (RST_STREAM CANCEL).
        let res = within(
            "GET /endless",
            client.send(client.req(Method::GET, "/endless", empty())),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let mut body = res.into_body();
        let mut got = 0;
        while got < 256 << 10 {
            let frame = within("a frame", body.frame())
                .await
                .expect("body ended")
                .unwrap();
            got += frame.data_ref().map_or(0, |d| d.len());
        }
        drop(body);
        assert!(
            wait_until(WAIT, || probe.dropped.load(Ordering::SeqCst)).await,
            "[{backend}] the server did not drop the body of a reset stream"
        );
        let produced = probe.produced.load(Ordering::SeqCst);
        assert!(
            produced < 64 << 20,
            "[{backend}] produced {produced} bytes for a reset stream"
        );

        // The handler: drop the response future while the handler runs.
        let pending = client.send(client.req(Method::GET, "/hang", empty()));
        tokio::select! {
            _ = pending => panic!("[{backend}] /hang answered"),
            _ = within("the /hang handler to start", started.notified()) => {}
        }
        // `pending` is dropped here: hyper resets the stream.
        let what = within("the handler to be dropped", dropped.recv()).await;
        assert_eq!(what, Some("hang"), "[{backend}]");

        assert_eq!(
            client.get("/hello").await,
            (StatusCode::OK, Bytes::from("hello"))
        );
        assert!(!client.closed(), "[{backend}] the connection closed");
    }

    /// A graceful shutdown with streams in flight: GOAWAY; the streams in flight finish with
    /// 200, new streams on the connection are refused, and the serve future completes.
    async fn graceful_shutdown_sends_goaway(backend) {
        let started = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/slow",
                get({
                    let started = started.clone();
                    move || async move {
                        started.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        "slow done"
                    }
                }),
            )
            .route("/hello", get(|| async { "hello" }));
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;
        assert_eq!(client.get("/hello").await.0, StatusCode::OK);
        // A second connection, idle when the shutdown comes.
        let idle = h2_connect(srv.addr).await;
        assert_eq!(idle.get("/hello").await.0, StatusCode::OK);
        let slow: Vec<_> = (0..3)
            .map(|_| tokio::spawn(client.send(client.req(Method::GET, "/slow", empty()))))
            .collect();
        assert!(
            wait_until(WAIT, || started.load(Ordering::SeqCst) == 3).await,
            "[{backend}] slow handlers did not start"
        );
        srv.handle.shutdown();

        // New streams are refused once the client has the GOAWAY (those sent before it may
        // still be served): try until one is refused, while the slow ones are in flight.
        let mut refused = None;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match within(
                "a new stream",
                client.send(client.req(Method::GET, "/hello", empty())),
            )
            .await
            {
                Ok(res) => assert_eq!(res.status(), StatusCode::OK),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let refused = refused.unwrap_or_else(|| panic!("[{backend}] new streams still served"));
        // The idle connection is closed (cleanly) at once.
        let res = within("the idle connection to close", idle.conn)
            .await
            .unwrap();
        assert!(res.is_ok(), "[{backend}] idle connection: {res:?}");
        assert!(
            slow.iter().all(|s| !s.is_finished()),
            "[{backend}] refused ({refused}) or closed the idle connection only after the \
             streams in flight finished"
        );

        for s in slow {
            let res = within("a slow stream", s)
                .await
                .unwrap()
                .unwrap_or_else(|e| {
                    panic!("[{backend}] a stream in flight was cut off by the shutdown: {e}")
                });
            assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
            let body = within("body", res.into_body().collect())
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(body, "slow done", "[{backend}]");
        }
        let handle = srv.handle.clone();
        srv.join(WAIT).await;
        assert!(
            wait_until(WAIT, || client.closed()).await,
            "[{backend}] the client connection did not end"
        );
        let stats = handle.stats();
        assert_eq!(stats.active, 0, "[{backend}] {stats:?}");
        assert_eq!(stats.forced, 0, "[{backend}] {stats:?}");
    }

    /// `http2_idle_timeout` (300 ms here): a connection with no open stream gets GOAWAY and is
    /// closed; one with a stream open (a handler still running, or a body still streaming) is
    /// not, and is closed once idle again.
    async fn idle_goaway(backend) {
        let app = Router::new()
            .route("/hello", get(|| async { "hello" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    "slow"
                }),
            )
            .route(
                "/trickle",
                get(|| async {
                    // 30 chunks, 100 ms apart: 3 s of streaming.
                    let s = futures_util::stream::unfold(0u32, |i| async move {
                        if i == 30 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some((Ok::<_, Infallible>(Bytes::from(format!("{i};"))), i + 1))
                    });
                    Body::from_stream(s)
                }),
            );
        let srv = start(backend, app, |b| {
            b.http2_idle_timeout(Duration::from_millis(300))
        });

        // Idle: closed by the server (GOAWAY, then the connection ends).
        let t0 = Instant::now();
        let idle = h2_connect(srv.addr).await;
        assert_eq!(idle.get("/hello").await.1, "hello");
        let H2 { conn, send, .. } = idle;
        let res = within("the idle connection to be closed", conn)
            .await
            .unwrap();
        let elapsed = t0.elapsed();
        assert!(res.is_ok(), "[{backend}] idle close was not clean: {res:?}");
        assert!(
            elapsed >= Duration::from_millis(250),
            "[{backend}] closed after {elapsed:?}"
        );
        assert!(send.is_closed());

        // A handler still running, and a body still streaming (3 s each): kept open. A second
        // stream 1 s in (over 3 idle timeouts) is still served, so no GOAWAY was sent.
        let busy = ["/slow", "/trickle"].map(|path| async move {
            let busy = h2_connect(srv.addr).await;
            let long = tokio::spawn(busy.send(busy.req(Method::GET, path, empty())));
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(busy.get("/hello").await.1, "hello", "[{backend}] {path}");
            let res = within(path, long).await.unwrap().unwrap();
            assert_eq!(res.status(), StatusCode::OK, "[{backend}] {path}");
            let body = within(path, res.into_body().collect())
                .await
                .unwrap()
                .to_bytes();
            let expected = match path {
                "/slow" => "slow".to_owned(),
                _ => (0..30).map(|i| format!("{i};")).collect(),
            };
            assert_eq!(body, expected, "[{backend}] {path}");
            // Then idle: closed.
            let res = within("the connection to be closed once idle", busy.conn)
                .await
                .unwrap();
            assert!(res.is_ok(), "[{backend}] {path}: {res:?}");
        });
        futures_util::future::join_all(busy).await;

        // Quick requests one after another, 100 ms apart for 1.5 s (5 idle timeouts): each
        // stream ends at once, yet the connection is never idle for 300 ms, so no GOAWAY.
        let steady = h2_connect(srv.addr).await;
        for i in 0..15 {
            assert_eq!(
                steady.get("/hello").await.1,
                "hello",
                "[{backend}] request {i}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!steady.send.is_closed(), "[{backend}] GOAWAY while in use");
        drop(steady);

        let stats = srv.handle.stats();
        assert_eq!(stats.http2_connections, 4, "[{backend}] {stats:?}");
        assert!(
            wait_until(WAIT, || srv.handle.stats().active == 0).await,
            "[{backend}] {:?}",
            srv.handle.stats()
        );
    }

    /// Rapid reset (CVE-2023-44487): 10,000 streams opened and reset at once with the `h2`
    /// crate's client. Memory stays bounded, a second connection keeps being answered during
    /// the attack, and the attacker is sent GOAWAY (`http2_max_pending_accept_reset_streams`).
    async fn rapid_reset_is_bounded(backend) {
        const RESETS: usize = 10_000;
        let _heavy = HEAVY.lock().await;
        let handled = Arc::new(AtomicUsize::new(0));
        let app = Router::new().route(
            "/",
            get({
                let handled = handled.clone();
                move || async move {
                    handled.fetch_add(1, Ordering::Relaxed);
                    "ok"
                }
            }),
        );
        let srv = start(backend, app, |b| b);
        let addr = srv.addr;

        // Warm up: both kinds of client once, then measure.
        let probe = h2_connect(addr).await;
        assert_eq!(probe.get("/").await.1, "ok");
        let rss_before = rss_bytes();

        let attack = tokio::spawn(async move {
            let mut sent = 0usize;
            let mut conns = 0usize;
            let mut goaways = Vec::new();
            while sent < RESETS {
                let tcp = tcp(addr).await;
                let (mut send, conn) = within("h2 handshake", h2::client::handshake(tcp))
                    .await
                    .expect("h2 handshake");
                conns += 1;
                let conn = tokio::spawn(conn);
                let ended = loop {
                    if sent >= RESETS {
                        break None;
                    }
                    let ready = futures_util::future::poll_fn(|cx| send.poll_ready(cx));
                    if let Err(e) = within("h2 ready", ready).await {
                        break Some(e);
                    }
                    let req = Request::get(format!("http://{addr}/")).body(()).unwrap();
                    match send.send_request(req, true) {
                        Ok((res, mut stream)) => {
                            stream.send_reset(h2::Reason::CANCEL);
                            drop(res);
                            sent += 1;
                        }
                        Err(e) => break Some(e),
                    }
                    if sent.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                };
                drop(send);
                match ended {
                    Some(e) => {
                        // The connection's own end says why (GOAWAY and its reason).
                        let end = within("the attacked connection to end", conn)
                            .await
                            .unwrap();
                        // ENHANCE_YOUR_CALM "too_many_resets", as seen by the client: its
                        // next write may fail first (the server closed after the GOAWAY).
                        let calm =
                            |e: &h2::Error| e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
                        let calm = calm(&e) || end.as_ref().err().is_some_and(calm);
                        goaways.push((calm, format!("{e}; connection: {end:?}")));
                    }
                    None => conn.abort(),
                }
            }
            (sent, conns, goaways)
        });

        // A normal connection keeps being answered during the attack.
        let mut answered = 0;
        let mut slowest = Duration::ZERO;
        while !attack.is_finished() {
            let t = Instant::now();
            let (status, body) = probe.get("/").await;
            assert_eq!(
                (status, &body[..]),
                (StatusCode::OK, &b"ok"[..]),
                "[{backend}]"
            );
            slowest = slowest.max(t.elapsed());
            answered += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (sent, conns, goaways) = within("the attack", attack).await.unwrap();
        assert_eq!(probe.get("/").await.1, "ok");
        assert!(
            !probe.closed(),
            "[{backend}] the bystander connection closed"
        );
        assert!(answered >= 1, "[{backend}]");
        assert!(
            slowest < Duration::from_secs(10),
            "[{backend}] a probe took {slowest:?}"
        );
        eprintln!(
            "[{backend}] rapid reset: {sent} streams reset over {conns} connection(s), \
             {} ended by the server, {} seen by the client as GOAWAY ENHANCE_YOUR_CALM \
             (first: {:?}); {answered} bystander requests answered during it (slowest \
             {slowest:?}); {} attack streams reached the handler",
            goaways.len(),
            goaways.iter().filter(|g| g.0).count(),
            goaways.first().map(|g| &g.1),
            handled.load(Ordering::Relaxed),
        );
        // The attacker is stopped by GOAWAY rather than served forever.
        assert!(
            goaways.iter().any(|g| g.0),
            "[{backend}] {RESETS} rapid resets on {conns} connection(s) and no GOAWAY: {goaways:?}"
        );
        if let (Some(before), Some(after)) = (rss_before, rss_bytes()) {
            let growth = after.saturating_sub(before);
            eprintln!(
                "[{backend}] rapid reset: RSS {} -> {} KiB",
                before / 1024,
                after / 1024
            );
            assert!(
                growth < 64 << 20,
                "[{backend}] RSS grew by {} KiB",
                growth / 1024
            );
        }
        assert!(
            wait_until(WAIT, || srv.handle.stats().active == 1).await,
            "[{backend}] attack connections left open: {:?}",
            srv.handle.stats()
        );
    }

    /// HTTP/1.1 on the same port; a preface split across two writes 200 ms apart is still
    /// HTTP/2; a client that sends nothing (or part of the preface only) is closed at the
    /// header timeout (500 ms here).
    async fn sniffing_the_protocol(backend) {
        let app = Router::new()
            .route("/hello", get(|| async { "hello" }))
            .route("/echo", post(|body: String| async move { body }));
        let srv = start(backend, app, |b| {
            b.header_read_timeout(Duration::from_millis(500))
        });

        // HTTP/1.1 with hyper's client, including a POST (its first byte is the preface's).
        let (mut send, conn) = within(
            "HTTP/1 handshake",
            hyper::client::conn::http1::handshake(TokioIo::new(tcp(srv.addr).await)),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        for (method, path, body, expected) in [
            (Method::GET, "/hello", "", "hello"),
            (Method::POST, "/echo", "posted", "posted"),
        ] {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .body(full(body))
                .unwrap();
            // hyper's HTTP/1 client takes one request at a time.
            within("HTTP/1.1 ready", send.ready())
                .await
                .unwrap_or_else(|e| panic!("[{backend}] HTTP/1.1 connection: {e}"));
            let res = within("HTTP/1.1 request", send.send_request(req))
                .await
                .unwrap();
            assert_eq!(res.version(), Version::HTTP_11, "[{backend}]");
            assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, expected, "[{backend}]");
        }
        assert_eq!(srv.handle.stats().http2_connections, 0);

        // The preface in two writes.
        let split = SplitPreface::new(tcp(srv.addr).await);
        let client = h2_over(srv.addr, split).await;
        assert_eq!(
            client.get("/hello").await,
            (StatusCode::OK, Bytes::from("hello"))
        );
        assert_eq!(srv.handle.stats().http2_connections, 1);

        // Silence, and part of the preface then silence: closed at the header timeout.
        for first in ["", "PRI * HTTP/2.0\r\n"] {
            let mut conn = RawConn::connect(srv.addr).await;
            let t0 = Instant::now();
            if !first.is_empty() {
                conn.send(first).await.unwrap();
            }
            let (end, bytes) = conn.wait_close(WAIT).await;
            let elapsed = t0.elapsed();
            assert!(end.closed(), "[{backend}] {first:?}: not closed: {end:?}");
            assert!(
                bytes.is_empty(),
                "[{backend}] {first:?}: answered {bytes:?}"
            );
            assert!(
                elapsed >= Duration::from_millis(400),
                "[{backend}] {first:?}: closed after {elapsed:?}"
            );
        }
        assert_eq!(srv.handle.stats().http2_connections, 1);
    }

    /// `curl --http2-prior-knowledge` and nghttp2's `nghttp`.
    async fn command_line_clients(backend) {
        let srv = start(backend, hello_app(), |b| b);
        let url = srv.url("/hello");

        let out = run_tool(
            "curl",
            &[
                "--http2-prior-knowledge",
                "-sS",
                "--max-time",
                "30",
                "-w",
                "\n%{http_version} %{http_code}",
                &url,
            ],
        )
        .await;
        assert_eq!(out, "hello\n2 200", "[{backend}] curl");
        // `-n` discards the body: the status from the verbose log, the body from a plain run.
        let out = run_tool("nghttp", &["-nv", "-t", "30", &url]).await;
        assert!(
            out.contains(":status: 200"),
            "[{backend}] nghttp -nv:\n{out}"
        );
        assert!(
            out.contains("recv SETTINGS frame"),
            "[{backend}] nghttp -nv:\n{out}"
        );
        let out = run_tool("nghttp", &["-t", "30", &url]).await;
        assert_eq!(out, "hello", "[{backend}] nghttp");
        assert!(srv.handle.stats().http2_streams >= 1);
    }

    /// SSE over HTTP/2: a `hop::sse` subscriber is an ordinary h2 stream (other streams go on
    /// on the same connection), and axum's `Sse` streams its events.
    async fn sse_over_h2(backend) {
        use hop::sse::{Event, Hub};
        let hub = Hub::new();
        let app = Router::new()
            .route(
                "/sse",
                get(
                    |State(hub): State<Hub>, req: axum::extract::Request| async move {
                        hub.subscribe(&req).into_response()
                    },
                ),
            )
            .route(
                "/axum-sse",
                get(|| async {
                    use axum::response::sse::{Event, Sse};
                    let s = futures_util::stream::unfold(0u32, |i| async move {
                        if i == 3 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some((
                            Ok::<_, Infallible>(
                                Event::default().event("tick").data(format!("t{i}")),
                            ),
                            i + 1,
                        ))
                    });
                    Sse::new(s)
                }),
            )
            .route("/hello", get(|| async { "hello" }))
            .with_state(hub.clone());
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;

        let res = within(
            "GET /sse",
            client.send(client.req(Method::GET, "/sse", empty())),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        let mut events = res.into_body().into_data_stream().eventsource();
        assert!(
            wait_until(WAIT, || hub.len() == 1).await,
            "[{backend}] no subscriber"
        );
        for i in 0..3 {
            assert_eq!(
                hub.send(
                    &Event::new(format!("hello {i}"))
                        .event("greet")
                        .id(i.to_string())
                ),
                1
            );
            let ev = within("an event", events.next())
                .await
                .expect("stream ended")
                .expect("parse");
            assert_eq!(
                (&ev.event[..], &ev.id[..], &ev.data[..]),
                ("greet", &i.to_string()[..], &format!("hello {i}")[..]),
                "[{backend}]"
            );
            // The connection is still HTTP/2 with other streams.
            assert_eq!(client.get("/hello").await.1, "hello", "[{backend}]");
        }
        drop(events);
        assert!(
            wait_until(WAIT, || hub.is_empty()).await,
            "[{backend}] subscriber not removed"
        );

        let res = within(
            "GET /axum-sse",
            client.send(client.req(Method::GET, "/axum-sse", empty())),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
        let events: Vec<_> = within(
            "axum's events",
            res.into_body()
                .into_data_stream()
                .eventsource()
                .collect::<Vec<_>>(),
        )
        .await;
        let events: Vec<String> = events.into_iter().map(|e| e.expect("parse").data).collect();
        assert_eq!(events, ["t0", "t1", "t2"], "[{backend}]");
        assert!(!client.closed());
        assert_eq!(srv.handle.stats().http2_connections, 1);
    }

    /// WebSockets over HTTP/2 (extended CONNECT, RFC 8441), axum's `WebSocketUpgrade` and
    /// `hop::ws`: two sockets of each on one connection, next to ordinary streams; each closes
    /// cleanly and the connection goes on.
    async fn websockets_over_h2(backend) {
        let app = Router::new()
            .route("/ws", any(compat_tests::axum_ws_echo))
            .route("/hop-ws", any(compat_tests::ws_echo))
            .route("/hello", get(|| async { "hello" }));
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;
        // Its response comes after the server's SETTINGS (which enable extended CONNECT).
        assert_eq!(client.get("/hello").await.1, "hello");

        let mut sockets = Vec::new();
        for path in ["/ws", "/hop-ws", "/ws", "/hop-ws"] {
            let res = within(path, client.send(ws_connect(&client, path)))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "[{backend}] {path}");
            let upgraded = within("upgrade", hyper::upgrade::on(res)).await.unwrap();
            sockets.push(
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await,
            );
        }
        for round in 0..3 {
            for (n, ws) in sockets.iter_mut().enumerate() {
                let text = format!("socket {n} round {round}");
                ws.send(Message::text(text.clone())).await.unwrap();
                let got = within("an echo", ws.next())
                    .await
                    .expect("ended")
                    .expect("ws error");
                assert_eq!(got, Message::text(text), "[{backend}]");
                ws.send(Message::binary(vec![n as u8; 70_000]))
                    .await
                    .unwrap();
                let got = within("an echo", ws.next())
                    .await
                    .expect("ended")
                    .expect("ws error");
                assert_eq!(got, Message::binary(vec![n as u8; 70_000]), "[{backend}]");
            }
            assert_eq!(client.get("/hello").await.1, "hello", "[{backend}]");
        }
        for (n, mut ws) in sockets.into_iter().enumerate() {
            close_ws_over_h2(&mut ws)
                .await
                .unwrap_or_else(|e| panic!("[{backend}] socket {n}: {e}"));
        }

        assert_eq!(client.get("/hello").await.1, "hello", "[{backend}]");
        assert!(!client.closed());
        assert_eq!(srv.handle.stats().http2_connections, 1);
    }

    /// 20 connections with 50 streams each at once, handlers sleeping a little: every
    /// response right, on both pollers.
    async fn many_connections_many_streams(backend) {
        let app = Router::new().route(
            "/echo/{c}/{i}",
            get(|Path((c, i)): Path<(u32, u32)>| async move {
                tokio::time::sleep(Duration::from_millis(u64::from(i % 7) * 10)).await;
                format!("{c}/{i}")
            }),
        );
        let srv = start(backend, app, |b| b);
        let conns = (0..20u32).map(|c| async move {
            let client = h2_connect(srv.addr).await;
            let calls = (0..50u32).map(|i| {
                let sent = client.send(client.req(Method::GET, &format!("/echo/{c}/{i}"), empty()));
                async move {
                    let res = sent
                        .await
                        .unwrap_or_else(|e| panic!("[{backend}] {c}/{i}: {e}"));
                    assert_eq!(res.status(), StatusCode::OK, "[{backend}] {c}/{i}");
                    let body = res.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(body, format!("{c}/{i}"), "[{backend}]");
                }
            });
            futures_util::future::join_all(calls).await;
            client
        });
        let clients = within("1,000 streams", futures_util::future::join_all(conns)).await;
        assert!(
            clients.iter().all(|c| !c.closed()),
            "[{backend}] a connection closed"
        );
        let stats = srv.handle.stats();
        assert_eq!(stats.http2_connections, 20, "[{backend}] {stats:?}");
        assert_eq!(stats.http2_streams, 1000, "[{backend}] {stats:?}");
    }

    /// A client that goes away (its TCP connection closed) with streams in flight: the server
    /// drops every handler of that connection and closes it.
    async fn client_disconnect_drops_every_stream(backend) {
        let (tx, mut dropped) = tokio::sync::mpsc::unbounded_channel();
        let started = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route(
                "/hang",
                get({
                    let started = started.clone();
                    move || async move {
                        let _guard = DropGuard(tx, "hang");
                        started.fetch_add(1, Ordering::SeqCst);
                        std::future::pending::<()>().await;
                        "never"
                    }
                }),
            )
            .route(
                "/endless",
                get(|| async { lazy_body(1 << 30, 16 << 10, Arc::new(StreamProbe::default())) }),
            );
        let srv = start(backend, app, |b| b);
        // A second handle on the client's socket, to close it under hyper (hyper's client runs
        // the connection on a task of its own, which in-flight requests keep alive).
        let std = tcp(srv.addr).await.into_std().unwrap();
        let socket = std.try_clone().unwrap();
        let client = h2_over(srv.addr, TcpStream::from_std(std).unwrap()).await;
        let hanging: Vec<_> = (0..10)
            .map(|_| tokio::spawn(client.send(client.req(Method::GET, "/hang", empty()))))
            .collect();
        // And a response body blocked on flow control (nobody reads it).
        let endless = within(
            "GET /endless",
            client.send(client.req(Method::GET, "/endless", empty())),
        )
        .await
        .unwrap();
        assert!(
            wait_until(WAIT, || started.load(Ordering::SeqCst) == 10).await,
            "[{backend}] handlers did not start"
        );
        assert_eq!(srv.handle.stats().active, 1);
        // Gone, as when the client process exits: the socket is closed.
        socket.shutdown(std::net::Shutdown::Both).unwrap();
        for n in 0..10 {
            let what = within("the handlers to be dropped", dropped.recv()).await;
            assert_eq!(what, Some("hang"), "[{backend}] after {n} dropped");
        }
        for h in hanging {
            assert!(within("a hanging stream", h).await.unwrap().is_err());
        }
        drop(endless);
        assert!(
            wait_until(WAIT, || srv.handle.stats().active == 0).await,
            "[{backend}] the connection was not closed: {:?}",
            srv.handle.stats()
        );
    }

    /// The default `http2_max_header_list_size` (16 KiB): an 8 KiB header is served, a 32 KiB
    /// one is refused (431 or a reset stream) and the connection goes on.
    async fn header_list_size_limit(backend) {
        let app = Router::new().route(
            "/len",
            get(|headers: HeaderMap| async move {
                headers.get("x-big").map_or(0, |v| v.len()).to_string()
            }),
        );
        let srv = start(backend, app, |b| b);
        let client = h2_connect(srv.addr).await;
        let big = |n: usize| {
            let mut req = client.req(Method::GET, "/len", empty());
            req.headers_mut()
                .insert("x-big", HeaderValue::from_str(&"a".repeat(n)).unwrap());
            client.send(req)
        };
        let res = within("8 KiB header", big(8 << 10)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, (8 << 10).to_string());
        match within("32 KiB header", big(32 << 10)).await {
            Ok(res) => assert_eq!(
                res.status(),
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "[{backend}]"
            ),
            Err(e) => eprintln!("[{backend}] a 32 KiB header: {e:?}"),
        }
        let res = within("8 KiB header again", big(8 << 10)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
        assert!(!client.closed(), "[{backend}] the connection closed");
    }

    /// `http2_keep_alive_interval` (200 ms here, timeout 500 ms): a client that answers the
    /// server's PINGs (hyper's) keeps its idle connection; one that never reads (a raw socket
    /// after its preface and SETTINGS) is closed.
    async fn keep_alive_pings(backend) {
        let srv = start(backend, hello_app(), |b| {
            b.http2_keep_alive_interval(Duration::from_millis(200))
                .http2_keep_alive_timeout(Duration::from_millis(500))
                .http2_idle_timeout(None)
        });
        let client = h2_connect(srv.addr).await;
        assert_eq!(client.get("/hello").await.1, "hello");

        let mut mute = RawConn::connect(srv.addr).await;
        let t0 = Instant::now();
        mute.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        // Not reading does not stop the server's frames from arriving (small, they fit the
        // socket buffers): it is the missing PING ack that closes the connection.
        let (end, _) = mute.wait_close(WAIT).await;
        let elapsed = t0.elapsed();
        assert!(
            end.closed(),
            "[{backend}] a client that never answers PINGs: {end:?}"
        );
        assert!(
            elapsed >= Duration::from_millis(500),
            "[{backend}] closed after {elapsed:?}"
        );

        // The answering client, idle all this time (and for several intervals), still served.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !client.closed(),
            "[{backend}] a client answering PINGs was closed"
        );
        assert_eq!(client.get("/hello").await.1, "hello");
    }
}

/// An extended CONNECT request for a WebSocket at `path`.
fn ws_connect(client: &H2, path: &str) -> Request<ClientBody> {
    let mut req = client.req(Method::CONNECT, path, empty());
    req.headers_mut()
        .insert("sec-websocket-version", HeaderValue::from_static("13"));
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    req
}

/// Runs a command-line client: its trimmed stdout.
async fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = compat_tests::run_tool(tool, args, b"", WAIT).await;
    out.trim().to_owned()
}

/// A stream that writes the first 16 bytes ("PRI * HTTP/2.0\r\n") and waits 200 ms before
/// writing the rest.
struct SplitPreface {
    inner: TcpStream,
    written: usize,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl SplitPreface {
    const FIRST: usize = 16;

    fn new(inner: TcpStream) -> Self {
        SplitPreface {
            inner,
            written: 0,
            pause: None,
        }
    }
}

impl AsyncRead for SplitPreface {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SplitPreface {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.written < Self::FIRST {
            let n = buf.len().min(Self::FIRST - this.written);
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..n]))?;
            this.written += n;
            if this.written == Self::FIRST {
                this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(200))));
            }
            return Poll::Ready(Ok(n));
        }
        if let Some(pause) = &mut this.pause {
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[test]
fn split_preface_really_splits() {
    // The split point is the end of the preface's first line.
    assert_eq!(
        &b"PRI * HTTP/2.0\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..SplitPreface::FIRST]
    );
}
