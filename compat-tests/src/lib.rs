//! Shared helpers for hop's compatibility tests.
//!
//! Every test runs against both backends: [`backend_tests!`] turns one `async fn name(backend)`
//! into `name_reactor` and `name_tokio` tests. The helpers here start a real server on a real
//! loopback socket ([`start`], [`start_with_shutdown`]), talk raw HTTP/1.x bytes to it
//! ([`RawConn`], [`exchange`]), parse responses off the wire ([`parse_response`]), and read
//! this process's resident memory ([`rss_bytes`]).

use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

pub use hop::Backend;

#[doc(hidden)]
pub use paste;

/// How long a single test may run before it is failed (instead of hanging CI).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a helper waits for bytes the server should send (generous: loaded 2-core CI).
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// Defines each `async fn name(backend) { .. }` as a helper and generates two tests,
/// `name_reactor` and `name_tokio`, that run it on a 2-worker multi-thread tokio runtime with
/// [`hop::Backend::Reactor`] and [`hop::Backend::Tokio`].
///
/// Attributes before `async fn` apply to both tests; `reactor { #[..] }` and `tokio { #[..] }`
/// blocks (in that order) add attributes to one of them only, e.g.
/// `reactor { #[ignore = "hop bug: .."] }`.
#[macro_export]
macro_rules! backend_tests {
    ($(
        $(#[$meta:meta])*
        $(reactor { $(#[$rmeta:meta])* })?
        $(tokio { $(#[$tmeta:meta])* })?
        async fn $name:ident($backend:ident) $body:block
    )*) => {$(
        #[allow(clippy::needless_pass_by_value)]
        async fn $name($backend: $crate::Backend) $body

        $crate::paste::paste! {
            $(#[$meta])*
            $($(#[$rmeta])*)?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn [<$name _reactor>]() {
                $crate::run_test($name($crate::Backend::Reactor)).await
            }

            $(#[$meta])*
            $($(#[$tmeta])*)?
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn [<$name _tokio>]() {
                $crate::run_test($name($crate::Backend::Tokio)).await
            }
        }
    )*};
}

/// A tool or build a test needs is missing: the test fails, saying what and how to get it. No
/// test skips, under CI or elsewhere (`.ci/tools` installs every tool the tests use).
pub fn unavailable(what: &str) -> ! {
    panic!(
        "missing: {what}. The tests use real clients and peers and never skip: install them with \
         `.ci/tools` (apt-get and pip; the README's Set-up lists them), and build the examples \
         with `cargo test --workspace`"
    );
}

/// `tool` runs with `arg` (`--version`, say) and succeeds; the test fails, naming it, if not.
pub fn require_tool(tool: &str, arg: &str) {
    let ran = std::process::Command::new(tool)
        .arg(arg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !ran.is_ok_and(|s| s.success()) {
        unavailable(tool);
    }
}

/// Runs a test body with tracing set up (`RUST_LOG` to see it) and an overall timeout.
pub async fn run_test(body: impl Future<Output = ()>) {
    init_tracing();
    if tokio::time::timeout(TEST_TIMEOUT, body).await.is_err() {
        panic!("test did not finish within {TEST_TIMEOUT:?}");
    }
}

/// Installs a `tracing` subscriber once (filtered by `RUST_LOG`, silent by default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}

/// A server started by [`start`] on a loopback port.
pub struct TestServer {
    /// Which backend it runs on.
    pub backend: Backend,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its handle: counters and shutdown.
    pub handle: hop::Handle,
    /// The spawned serve future; resolves when the server has stopped.
    pub task: JoinHandle<io::Result<()>>,
}

impl TestServer {
    /// `http://127.0.0.1:port{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits (up to `within`) for the serve future to resolve and checks it returned `Ok`.
    pub async fn join(self, within: Duration) {
        match tokio::time::timeout(within, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("[{}] serve future failed: {e}", self.backend),
            Ok(Err(e)) => panic!("[{}] serve task panicked: {e}", self.backend),
            Err(_) => panic!(
                "[{}] serve future did not resolve within {within:?}",
                self.backend
            ),
        }
    }
}

fn bind_loopback() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// The builder every test starts from: the given backend and 2 pollers.
///
/// The reactor parks idle connections at once here (its default waits 250 ms), so every
/// request boundary in the suite goes through parking and unparking.
pub fn builder(backend: Backend) -> hop::Builder {
    hop::Server::builder()
        .backend(backend)
        .pollers(2)
        .park_idle_after(Duration::ZERO)
}

/// Starts `app` on `backend` (2 pollers) after letting `configure` adjust the builder, and
/// spawns the serve future on the current tokio runtime.
pub fn start<A, M>(
    backend: Backend,
    app: A,
    configure: impl FnOnce(hop::Builder) -> hop::Builder,
) -> TestServer
where
    A: hop::IntoConnService<M>,
    M: 'static,
{
    let listener = bind_loopback();
    let addr = listener.local_addr().expect("local_addr");
    let serve = configure(builder(backend)).serve(listener, app);
    let handle = serve.handle();
    assert_eq!(handle.local_addr(), Some(addr));
    spawn(backend, addr, handle, serve)
}

/// Spawns a configured serve future (with or without graceful shutdown) on the current runtime.
fn spawn<F>(backend: Backend, addr: SocketAddr, handle: hop::Handle, serve: F) -> TestServer
where
    F: IntoFuture<Output = io::Result<()>>,
    F::IntoFuture: Send + 'static,
{
    TestServer {
        backend,
        addr,
        handle,
        task: tokio::spawn(serve.into_future()),
    }
}

/// Like [`start`], with a graceful-shutdown signal: sending on (or dropping) the returned
/// sender starts the shutdown.
pub fn start_with_shutdown<A, M>(
    backend: Backend,
    app: A,
    configure: impl FnOnce(hop::Builder) -> hop::Builder,
) -> (TestServer, tokio::sync::oneshot::Sender<()>)
where
    A: hop::IntoConnService<M>,
    M: 'static,
{
    let listener = bind_loopback();
    let addr = listener.local_addr().expect("local_addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serve = configure(builder(backend))
        .serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = rx.await;
        });
    let handle = serve.handle();
    (spawn(backend, addr, handle, serve), tx)
}

/// A reqwest client that ignores proxy settings from the environment.
pub fn reqwest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// A hyper-util (legacy) HTTP/1 client with connection pooling.
pub fn hyper_client<B>(
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// How the server ended a connection we were reading from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A clean close (FIN): `read` returned 0.
    Eof,
    /// The connection was reset (or another read error).
    Reset,
    /// Nothing more arrived, and the connection stayed open, for the whole wait.
    TimedOut,
}

impl End {
    /// Whether the server closed the connection (cleanly or not).
    pub fn closed(self) -> bool {
        matches!(self, End::Eof | End::Reset)
    }
}

/// A response parsed off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// The status code.
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the response asks to close the connection (`connection: close`).
    pub fn connection_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one response from the front of `buf`.
///
/// `head_request`: the request was `HEAD`, so there is no body whatever the headers say.
/// `eof`: the peer has closed, so a response without length ends at the end of `buf`.
/// Returns `Ok(None)` while more bytes are needed, `Ok(Some((response, bytes used)))` once a
/// whole response is there, and `Err` for bytes that are not a valid response.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    eof: bool,
) -> Result<Option<(RawResponse, usize)>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("response head larger than 64 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|e| format!("head: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default().to_string();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (n, v) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut res = RawResponse {
        version,
        status,
        headers,
        body: Vec::new(),
    };
    let body_start = head_end + 4;
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Some((res, body_start)));
    }
    let chunked = res
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut pos = body_start;
        let mut body = Vec::new();
        loop {
            let Some(line_end) = find(&buf[pos..], b"\r\n") else {
                return Ok(None);
            };
            let line = std::str::from_utf8(&buf[pos..pos + line_end])
                .map_err(|e| format!("chunk size: {e}"))?;
            let size_str = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_str, 16)
                .map_err(|e| format!("chunk size {line:?}: {e}"))?;
            pos += line_end + 2;
            if size == 0 {
                // Trailers, then an empty line.
                loop {
                    let Some(end) = find(&buf[pos..], b"\r\n") else {
                        return Ok(None);
                    };
                    pos += end + 2;
                    if end == 0 {
                        res.body = body;
                        return Ok(Some((res, pos)));
                    }
                }
            }
            if buf.len() < pos + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[pos..pos + size]);
            if &buf[pos + size..pos + size + 2] != b"\r\n" {
                return Err("chunk not followed by CRLF".into());
            }
            pos += size + 2;
        }
    }
    if let Some(len) = res.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|e| format!("content-length {len:?}: {e}"))?;
        if buf.len() < body_start + len {
            return Ok(None);
        }
        res.body = buf[body_start..body_start + len].to_vec();
        return Ok(Some((res, body_start + len)));
    }
    // No length: the body runs to the end of the connection.
    if eof {
        res.body = buf[body_start..].to_vec();
        Ok(Some((res, buf.len())))
    } else {
        Ok(None)
    }
}

/// Parses every complete response in `buf` (none of them to `HEAD` requests).
pub fn parse_all(buf: &[u8]) -> Result<Vec<RawResponse>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        match parse_response(&buf[pos..], false, true)? {
            Some((res, used)) => {
                out.push(res);
                pos += used;
            }
            None => return Err(format!("{} trailing bytes", buf.len() - pos)),
        }
    }
    Ok(out)
}

/// A raw client connection: writes exact bytes, reads and parses responses.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl RawConn {
    /// Connects to `addr` (panics if the connection cannot be made).
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).ok();
        RawConn {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: TcpStream) -> RawConn {
        stream.set_nodelay(true).ok();
        RawConn {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Our end's address (the peer address the server sees).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }

    /// Writes all of `bytes`.
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) -> io::Result<()> {
        self.stream.write_all(bytes.as_ref()).await?;
        self.stream.flush().await
    }

    /// Half-closes our side for writing.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    async fn fill(&mut self, within: Duration) -> Result<usize, End> {
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(within, self.stream.read(&mut chunk)).await {
            Err(_) => Err(End::TimedOut),
            Ok(Err(_)) => {
                self.eof = true;
                Err(End::Reset)
            }
            Ok(Ok(0)) => {
                self.eof = true;
                Ok(0)
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
        }
    }

    /// Reads the next response (`head_request`: it answers a `HEAD`), or says how the
    /// connection ended first.
    pub async fn try_read_response(
        &mut self,
        head_request: bool,
        within: Duration,
    ) -> Result<RawResponse, End> {
        let deadline = Instant::now() + within;
        loop {
            match parse_response(&self.buf, head_request, self.eof) {
                Ok(Some((res, used))) => {
                    self.buf.drain(..used);
                    return Ok(res);
                }
                Ok(None) => {}
                Err(e) => panic!(
                    "unparseable response ({e}): {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
            if self.eof {
                return Err(End::Eof);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fill(left).await {
                Ok(_) => {}
                Err(End::Reset) if !self.buf.is_empty() => {}
                Err(end) => return Err(end),
            }
        }
    }

    /// Reads the next response; panics if none arrives within [`IO_TIMEOUT`].
    pub async fn read_response(&mut self) -> RawResponse {
        match self.try_read_response(false, IO_TIMEOUT).await {
            Ok(res) => res,
            Err(end) => panic!(
                "expected a response, got {end:?} after {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Reads the next response to a `HEAD` request.
    pub async fn read_head_response(&mut self) -> RawResponse {
        match self.try_read_response(true, IO_TIMEOUT).await {
            Ok(res) => res,
            Err(end) => panic!(
                "expected a response, got {end:?} after {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Sends `request` and reads one response.
    pub async fn roundtrip(&mut self, request: impl AsRef<[u8]>) -> RawResponse {
        self.send(request).await.expect("send request");
        self.read_response().await
    }

    /// Waits up to `within` for the server to close the connection; returns how it ended and
    /// any bytes that arrived meanwhile (plus what was already buffered and unparsed).
    pub async fn wait_close(&mut self, within: Duration) -> (End, Vec<u8>) {
        let deadline = Instant::now() + within;
        let end = loop {
            if self.eof {
                break End::Eof;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.fill(left).await {
                Ok(0) => break End::Eof,
                Ok(_) => {}
                Err(end) => break end,
            }
        };
        (end, std::mem::take(&mut self.buf))
    }

    /// Bytes received but not yet parsed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads raw bytes, up to `max`, without parsing (for streaming tests); `Ok(0)` at EOF.
    pub async fn read_raw(&mut self, max: usize, within: Duration) -> Result<Vec<u8>, End> {
        if !self.buf.is_empty() {
            let n = max.min(self.buf.len());
            return Ok(self.buf.drain(..n).collect());
        }
        let mut chunk = vec![0u8; max];
        match tokio::time::timeout(within, self.stream.read(&mut chunk)).await {
            Err(_) => Err(End::TimedOut),
            Ok(Err(_)) => Err(End::Reset),
            Ok(Ok(n)) => {
                chunk.truncate(n);
                Ok(chunk)
            }
        }
    }
}

/// Connects, writes `request` (ignoring write errors: the server may close early), and reads
/// until the server closes or nothing arrives for `within`. Returns the bytes and how it ended.
pub async fn exchange(addr: SocketAddr, request: &[u8], within: Duration) -> (Vec<u8>, End) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let request = request.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        let _ = wr.flush().await;
        // Keep the write half open (no FIN) until the reader is done.
        wr
    });
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let end = loop {
        match tokio::time::timeout(within, rd.read(&mut chunk)).await {
            Err(_) => break End::TimedOut,
            Ok(Err(_)) => break End::Reset,
            Ok(Ok(0)) => break End::Eof,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    };
    drop(writer.await);
    (out, end)
}

/// Polls `cond` every 20 ms until it holds or `within` runs out; returns whether it held.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This process's resident set size in bytes (`VmRSS` in `/proc/self/status`), if known.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A `GET path` request with `Host` and the given extra header lines (each ending in CRLF).
pub fn get_req(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n")
}

/// Counts what a lazily produced response body has produced, and whether it was dropped.
#[derive(Debug, Default)]
pub struct StreamProbe {
    /// Bytes handed to the server so far.
    pub produced: std::sync::atomic::AtomicU64,
    /// Set when the body stream is dropped (finished, or abandoned by the server).
    pub dropped: std::sync::atomic::AtomicBool,
}

struct ProbeGuard(std::sync::Arc<StreamProbe>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0
            .dropped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A response body of `total` bytes produced lazily, `chunk` bytes at a time, each chunk only
/// when the server asks for it; `probe` records progress. Byte `i` of the body is `i % 251`.
pub fn lazy_body(total: u64, chunk: usize, probe: std::sync::Arc<StreamProbe>) -> axum::body::Body {
    use std::sync::atomic::Ordering;
    let guard = ProbeGuard(probe);
    let stream = futures_util::stream::unfold((0u64, guard), move |(sent, guard)| async move {
        if sent >= total {
            return None;
        }
        let n = (total - sent).min(chunk as u64);
        let data: Vec<u8> = (sent..sent + n).map(|i| (i % 251) as u8).collect();
        guard.0.produced.fetch_add(n, Ordering::SeqCst);
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(data)),
            (sent + n, guard),
        ))
    });
    axum::body::Body::from_stream(stream)
}

/// Starts a read-handler server (`serve_tcp`) on `backend` with the suite's builder (2 pollers)
/// after `configure`, one handler from `factory` per connection, on the current tokio runtime.
pub fn start_tcp<H: hop::tcp::Handler>(
    backend: Backend,
    configure: impl FnOnce(hop::Builder) -> hop::Builder,
    factory: impl FnMut(hop::IncomingStream<'_>) -> H + Clone + Send + 'static,
) -> (SocketAddr, hop::Handle) {
    let listener = bind_loopback();
    let addr = listener.local_addr().expect("local_addr");
    let serve = configure(builder(backend)).serve_tcp(listener, factory);
    let handle = serve.handle();
    tokio::spawn(serve.into_future());
    (addr, handle)
}

/// A `hop::ws` handler that echoes text and binary messages as they came.
pub struct WsEcho;

impl hop::ws::WsHandler for WsEcho {
    fn on_message(
        &mut self,
        ws: &mut hop::ws::WsConn<'_>,
        msg: hop::ws::Message,
    ) -> std::io::Result<()> {
        ws.send(msg)
    }
}

/// An axum route handler: the `hop::ws` echo ([`WsEcho`]).
pub async fn ws_echo(upgrade: hop::ws::WsUpgrade) -> axum::response::Response {
    upgrade.on_upgrade(WsEcho)
}

/// An axum route handler: axum's own `WebSocketUpgrade` with an echo loop, as users write it.
/// A close frame does not end the loop: the next read sends tungstenite's queued close reply,
/// then the stream ends (breaking at once would drop the socket with the reply unsent).
pub async fn axum_ws_echo(
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> axum::response::Response {
    use axum::extract::ws::Message;
    use futures_util::StreamExt;
    upgrade.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.next().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(t),
                Message::Binary(b) => Message::Binary(b),
                // A close, a ping (both answered by tungstenite on the next poll) or a pong.
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

/// Opens a WebSocket on `path` over the HTTP/2 connection `send` (RFC 8441 extended CONNECT,
/// `:protocol websocket`), as tokio-tungstenite's client over hyper's upgraded stream.
pub async fn open_ws_over_h2(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>> {
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://localhost{path}"))
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = tokio::time::timeout(IO_TIMEOUT, send.send_request(req))
        .await
        .expect("CONNECT answered in time")
        .expect("CONNECT sent");
    assert_eq!(
        res.status(),
        http::StatusCode::OK,
        "extended CONNECT on {path}"
    );
    let upgraded = hyper::upgrade::on(res).await.expect("upgraded");
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await
}

/// Closes a client WebSocket that runs over an HTTP/2 stream (RFC 8441) and checks that the
/// server answered the close frame before the stream ended.
///
/// The server answers the close, ends its side of the stream and, as RFC 9113 §8.1 asks of a
/// server that has answered while the client's side is still open, resets the stream with
/// `NO_ERROR`. hyper's client reports that reset to a write or flush still in flight as an
/// error (`BodyWrite`, `NO_ERROR`): it is the end of a clean close, not a failure. Any other
/// error fails.
pub async fn close_ws_over_h2<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Error, Message};
    match ws.close(None).await {
        Ok(()) | Err(Error::ConnectionClosed) => {}
        Err(Error::Io(e)) if reset_with_no_error(&e) => {}
        Err(e) => return Err(format!("sending the close frame: {e:?}")),
    }
    let mut answered = false;
    loop {
        match tokio::time::timeout(IO_TIMEOUT, ws.next()).await {
            Err(_) => return Err("the stream did not end after the close".into()),
            Ok(None) | Ok(Some(Err(Error::ConnectionClosed))) => break,
            Ok(Some(Ok(Message::Close(_)))) => answered = true,
            Ok(Some(other)) => return Err(format!("after the close: {other:?}")),
        }
    }
    if answered {
        Ok(())
    } else {
        Err("the server did not answer the close frame".into())
    }
}

/// Whether `e` is hyper's report of a stream reset with `NO_ERROR` (RFC 9113 §8.1).
fn reset_with_no_error(e: &io::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    while let Some(err) = cause {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        cause = err.source();
    }
    false
}

/// A client WebSocket frame, written by hand (masked with a fixed key if `masked`): for
/// what a well-behaved client never sends, or sends only in whole frames.
pub fn ws_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// A raw socket to `addr` after a successful WebSocket handshake (HTTP/1.1) on `path`.
pub async fn ws_handshake(addr: SocketAddr, path: &str) -> TcpStream {
    ws_handshake_with(addr, path, "").await.0
}

/// As [`ws_handshake`], sending `extra` header lines (each ending in `\r\n`) too: the socket
/// and the response head.
pub async fn ws_handshake_with(addr: SocketAddr, path: &str, extra: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut b))
            .await
            .expect("handshake in time")
            .expect("handshake read");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// Reads one server WebSocket frame (unmasked): its FIN bit, opcode and payload.
pub async fn ws_read_frame(s: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let (b0, payload) = ws_read_raw_frame(s).await;
    (b0 & 0x80 != 0, b0 & 0x0f, payload)
}

/// Reads one server WebSocket frame (unmasked): its first byte (FIN, RSV bits, opcode) and
/// payload.
pub async fn ws_read_raw_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut h))
        .await
        .expect("a frame in time")
        .expect("frame header");
    let len = match h[1] & 0x7f {
        126 => s.read_u16().await.expect("length") as usize,
        127 => s.read_u64().await.expect("length") as usize,
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    tokio::time::timeout(IO_TIMEOUT, s.read_exact(&mut payload))
        .await
        .expect("a payload in time")
        .expect("payload");
    (h[0], payload)
}

/// Runs a command-line client (curl, nghttp, openssl) with `stdin`, failing the test if it is
/// missing (see [`unavailable`]), fails or takes longer than `limit`: its stdout.
pub async fn run_tool(tool: &str, args: &[&str], stdin: &[u8], limit: Duration) -> String {
    let child = tokio::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            unavailable(tool);
        }
        Err(e) => panic!("running {tool}: {e}"),
    };
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("write stdin");
    drop(input);
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{tool}: no answer within {limit:?}"))
        .expect("wait for the tool");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The demo binary (`examples/server`), started as users start it: what `demo.rs` and
/// `sockets.rs` share.
pub mod demo {
    use std::ffi::OsStr;
    use std::net::{SocketAddr, TcpListener};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    /// The demo binary next to the running test's own target directory
    /// (`target/<profile>/deps/<test>-<hash>` -> `target/<profile>/examples/server`); the test
    /// fails if it is not built.
    pub fn binary() -> PathBuf {
        let exe = std::env::current_exe().expect("the test's own path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .map(|target| target.join("examples").join("server"))
            .filter(|bin| bin.exists());
        match bin {
            Some(bin) => bin,
            None => {
                super::unavailable("examples/server is not built (run `cargo test --workspace`)")
            }
        }
    }

    /// A free loopback port (bound, then released for a child to bind).
    pub fn free_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    }

    /// A child process, killed however the test ends.
    pub struct Demo(pub Child);

    impl Drop for Demo {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Starts the demo on `backend` at `addr` with `extra` flags, and waits until it says
    /// which address it bound (port 0 then names the port the kernel chose, which no other
    /// test can take meanwhile). Its further output is drained, so it never blocks on a pipe.
    pub fn start(bin: &Path, backend: &str, addr: &str, extra: &[&OsStr]) -> (Demo, SocketAddr) {
        let mut child = Command::new(bin)
            .args(["--backend", backend, "--addr", addr])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the demo starts");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let demo = Demo(child);
        let mut line = String::new();
        use std::io::BufRead;
        out.read_line(&mut line).expect("the demo's first line");
        let bound: SocketAddr = line
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("[{backend}] no address in {line:?}"));
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        (demo, bound)
    }
}

/// This test binary's log at `info`, captured (a binary that [`install`](log_capture::install)s
/// it has no other subscriber): what the server logs, for tests that check it.
pub mod log_capture {
    use std::io;
    use std::sync::{Mutex, OnceLock};

    /// Everything logged so far (bounded by what the tests do: a few MB at most).
    fn text() -> &'static Mutex<Vec<u8>> {
        static TEXT: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
        TEXT.get_or_init(Default::default)
    }

    /// Bytes logged so far.
    pub fn len() -> usize {
        text().lock().unwrap().len()
    }

    /// Whether the log since byte `from` holds `what`.
    pub fn has_since(from: usize, what: &str) -> bool {
        let t = text().lock().unwrap();
        String::from_utf8_lossy(&t[from.min(t.len())..]).contains(what)
    }

    /// The lines logged so far that contain `what`.
    pub fn lines_with(what: &str) -> Vec<String> {
        let t = text().lock().unwrap();
        String::from_utf8_lossy(&t)
            .lines()
            .filter(|l| l.contains(what))
            .map(str::to_owned)
            .collect()
    }

    struct Writer;

    impl io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            text().lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Installs the capture as the global subscriber, once.
    pub fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                .with_writer(|| Writer)
                .with_ansi(false)
                .try_init()
                .expect("the capture is this binary's only subscriber");
        });
    }
}
