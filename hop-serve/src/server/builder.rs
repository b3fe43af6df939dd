//! The [`Builder`] (reached as `Server::builder()`): every setting a server takes, each a
//! method that records it in the `Config` it holds, for both backends; ranges are checked when
//! the server starts, not here. `serve` and `serve_tcp` end it, binding the listener and
//! turning it into a [`Serve`].

use std::sync::Arc;
use std::time::Duration;

use crate::handler::Handler;
use crate::listener::IntoListener;
use crate::service::app::{HttpApp, TcpApp};
use crate::service::{IncomingStream, IntoConnService};
#[cfg(doc)]
use crate::settings::Stats;
use crate::settings::{Backend, Config, Control};

use super::run::Serve;

/// Configures a server. Every setting applies to both backends.
///
/// Every setting takes its whole range or is refused when the server starts: `serve` (or
/// `run`) returns an `InvalidInput` error naming the setting, and the builder never panics. A
/// `Duration::MAX` timeout means never; a timeout of zero where `None` turns it off is
/// refused (it would close every connection at once), as are values hyper or HTTP/2 cannot
/// take (`max_buf_size` under 8 KiB, `http2_max_frame_size` outside 16 KiB to 16 MiB, windows
/// over 2^31 - 1), `max_connections(0)`, and more than 1,024 threads or 10,000 headers.
///
/// ```
/// use std::time::Duration;
/// # fn main() -> std::io::Result<()> {
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?; // any free port
/// # let addr = listener.local_addr()?;
/// # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// # let client = std::thread::spawn(move || {
/// #     use std::io::{Read, Write};
/// #     let mut s = std::net::TcpStream::connect(addr).unwrap();
/// #     s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
/// #     let mut answer = String::new();
/// #     s.read_to_string(&mut answer).unwrap();
/// #     let _ = stop.send(());
/// #     answer
/// # });
/// hop::Server::builder()
///     .pollers(4)
///     .backend(hop::Backend::Reactor)
///     .header_read_timeout(Duration::from_secs(10))
///     .serve(listener, app)
/// #   .with_graceful_shutdown(async { let _ = stopped.await; })
///     .run()
/// #   ?;
/// # let answer = client.join().unwrap();
/// # assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"), "{answer}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Builder {
    cfg: Config,
}

/// Entry point for configured servers: `Server::builder()`.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A builder with the default settings.
    pub fn builder() -> Builder {
        Builder::default()
    }
}

impl Builder {
    /// A builder with the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend; overrides `HOP_BACKEND`. Without either, [`Backend::Reactor`].
    pub fn backend(mut self, backend: Backend) -> Self {
        self.cfg.backend = Some(backend);
        self
    }

    /// Poller threads for the reactor, worker threads for the tokio baseline (default: the
    /// available parallelism).
    pub fn pollers(mut self, n: usize) -> Self {
        self.cfg.pollers = n.max(1);
        self
    }

    /// The listen backlog (default 1024).
    pub fn backlog(mut self, n: i32) -> Self {
        self.cfg.backlog = n;
        self
    }

    /// Most connections open at once; over it a connection is accepted, closed at once and
    /// counted in [`Stats::rejected`] (default: unlimited).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.cfg.max_connections = n;
        self
    }

    /// Most connections open at once from one client IP (default: unlimited). Over it, a new
    /// connection from that IP is accepted, closed at once (the peer sees a FIN before any
    /// byte) and counted in [`Stats::rejected_per_ip`]. The count covers every kind of
    /// connection (HTTP, upgraded, read handlers) until its socket closes; an IPv4 address
    /// mapped into IPv6 counts as the IPv4 one. TCP listeners only (a Unix socket has no IP);
    /// 0 is refused at start, `usize::MAX` is unlimited.
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.cfg.limits.per_ip = Some(n);
        self
    }

    /// How long an HTTP connection may be reused (default: forever). Past it, an HTTP/1.1
    /// connection answers its next request with `Connection: close` and closes after that
    /// response; one that stays idle (parked or not) is closed once it has been idle for a
    /// second past its age (so a client that keeps sending sees the header rather than a race
    /// with a close); an HTTP/2 connection is sent GOAWAY (graceful: open streams finish, new
    /// ones go to a new connection). Connections taken over after their response (WebSockets,
    /// hijacks, `hop::sse` subscribers: their response was the connection's last) are never
    /// ended by it. Counted in [`Stats::max_age_reached`]. Zero is refused at start;
    /// `Duration::MAX` is never.
    pub fn max_connection_age(mut self, t: Duration) -> Self {
        self.cfg.limits.max_age = Some(t);
        self
    }

    /// Most requests served on one connection (default: unlimited). HTTP/1.1: the `n`-th
    /// response carries `Connection: close` and the connection closes after it (a `101`
    /// upgrade is never changed). HTTP/2: once `n` streams have started, GOAWAY (graceful: the
    /// open streams finish; streams the client sent before it saw the GOAWAY may still be
    /// served, so a few more than `n` can be). Counted in [`Stats::max_requests_reached`]. 0 is
    /// refused at start; `usize::MAX` is unlimited.
    pub fn max_requests_per_connection(mut self, n: usize) -> Self {
        self.cfg.limits.max_requests = Some(n);
        self
    }

    /// How long a client may take to send a request head once it has started (default 30 s;
    /// `None` disables it).
    pub fn header_read_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.header_read_timeout = t.into();
        self
    }

    /// How long a keep-alive connection may sit idle between requests before it is closed
    /// (default 60 s; `None` disables it). This is not TCP keepalive: see
    /// [`tcp_keepalive`](Self::tcp_keepalive). It also closes a `hop::tcp` listener's
    /// connection that moves no bytes for as long; it never applies to a connection taken over
    /// from HTTP (an upgrade such as axum's `WebSocketUpgrade`, a [`Hijack`](crate::Hijack),
    /// `hop::ws`, SSE), whose protocol decides when a quiet peer is gone (`hop::ws` pings it:
    /// [`WsConfig::keep_alive_interval`](crate::ws::WsConfig::keep_alive_interval)).
    pub fn idle_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.idle_timeout = t.into();
        self.cfg.tcp.idle_timeout = self.cfg.idle_timeout;
        self
    }

    /// Read handlers: close a connection when no bytes arrive for this long (default off).
    pub fn read_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.tcp.read_timeout = t.into();
        self
    }

    /// Read handlers: most unread input held per connection; reading pauses there until the
    /// handler consumes (default 1 MiB).
    pub fn max_read_buffer(mut self, n: usize) -> Self {
        self.cfg.tcp.max_input = n.max(1);
        self
    }

    /// Read handlers: the high-water mark of queued output per connection (default 1 MiB).
    /// A write is refused only while what is already queued is at or above it; a single write
    /// larger than the mark is taken whole when the queue is below it (see
    /// [`tcp::Conn::write`](crate::tcp::Conn::write)).
    pub fn max_write_buffer(mut self, n: usize) -> Self {
        self.cfg.tcp.max_output = n;
        self
    }

    /// Read handlers: how long a connection that is closing may take to send what it has
    /// queued (and, for a WebSocket, to answer a close the server started) before unsent
    /// output is discarded and the socket is closed, with a reset if output was left (default
    /// 10 s). A peer that stops reading cannot hold a closing connection open. The same bound
    /// holds for an HTTP/2 connection sent GOAWAY, once its streams are done.
    pub fn close_timeout(mut self, t: Duration) -> Self {
        self.cfg.tcp.close_timeout = t;
        self
    }

    /// Read handlers: bytes asked of the socket per read (default 16 KiB; 0 is 1, and more
    /// than 16 MiB is 16 MiB).
    pub fn read_chunk(mut self, n: usize) -> Self {
        self.cfg.tcp.read_chunk = n.clamp(1, 16 << 20);
        self
    }

    /// hyper's largest read buffer, which bounds a request head (hyper's default ~400 KB).
    pub fn max_buf_size(mut self, n: usize) -> Self {
        self.cfg.max_buf_size = Some(n);
        self
    }

    /// Most headers in a request (hyper's default 100); more gets `431`.
    pub fn max_headers(mut self, n: usize) -> Self {
        self.cfg.max_headers = Some(n);
        self
    }

    /// Reactor: let pipelined responses share one write, sent once per drive (default on).
    /// The tokio backend flushes after each response either way: hyper's own pipeline-flush
    /// mode loses error responses and write backpressure.
    pub fn pipeline_flush(mut self, on: bool) -> Self {
        self.cfg.pipeline_flush = on;
        self
    }

    /// How long a graceful shutdown waits for connections before force-closing them
    /// (default 30 s).
    pub fn drain_timeout(mut self, t: Duration) -> Self {
        self.cfg.drain_timeout = t;
        self
    }

    /// TCP keepalive probes on accepted sockets, after this much silence (default off). The
    /// kernel counts it in whole seconds, from 1 to 32,767 (Linux's range): a shorter or longer
    /// duration is rounded into that range.
    ///
    /// With the kernel's interval (75 s) and count (9), a dead peer is found about 11 minutes
    /// after the first probe; [`tcp_keepalive_interval`](Self::tcp_keepalive_interval) and
    /// [`tcp_keepalive_retries`](Self::tcp_keepalive_retries) shorten that.
    pub fn tcp_keepalive(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.tcp_tuning.set_keepalive_time(t.into());
        self
    }

    /// `TCP_KEEPINTVL`: the time between unanswered keepalive probes (default: the kernel's,
    /// 75 s on Linux), in whole seconds from 1 to 32,767. Setting it turns keepalive on.
    pub fn tcp_keepalive_interval(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.tcp_tuning.set_keepalive_interval(t.into());
        self
    }

    /// `TCP_KEEPCNT`: how many unanswered keepalive probes end the connection (default: the
    /// kernel's, 9 on Linux), from 1 to 127. Setting it turns keepalive on.
    pub fn tcp_keepalive_retries(mut self, n: impl Into<Option<u32>>) -> Self {
        self.cfg.tcp_tuning.set_keepalive_retries(n.into());
        self
    }

    /// `TCP_FASTOPEN` on the listening sockets, with this many pending fast-open requests
    /// (default off; 0 is off). A client that has been here before may then send its request in
    /// the SYN and get its answer a round trip sooner. The kernel must allow it for servers
    /// (`net.ipv4.tcp_fastopen` has bit 2 set, e.g. `3`); otherwise the option is set and unused.
    pub fn tcp_fastopen(mut self, queue: impl Into<Option<u32>>) -> Self {
        self.cfg.tcp_tuning.set_fastopen(queue.into());
        self
    }

    /// `TCP_DEFER_ACCEPT` on the listening sockets (default off): the kernel hands a connection
    /// to hop only once its first bytes have come, or after about this long (whole seconds,
    /// rounded up to at least 1). Connections that open and say nothing (port scans, pre-connect
    /// pools) then cost no accept and no slot; [`header_read_timeout`](Self::header_read_timeout)
    /// starts when hop gets the connection.
    pub fn tcp_defer_accept(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.tcp_tuning.set_defer_accept(t.into());
        self
    }

    /// Reactor only: how long an idle keep-alive connection keeps hyper's state before it is
    /// parked down to its socket (default 250 ms; `Duration::ZERO`: at once; `None`: never).
    ///
    /// Parking at once costs a fresh hyper connection per request on a busy keep-alive
    /// connection (about a third more user-space instructions per request, measured with
    /// callgrind); a short delay keeps busy connections hot and still parks idle ones. When
    /// more than 128 connections of a poller hold hyper's state, idle ones park at once.
    pub fn park_idle_after(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.park_after = t.into();
        self
    }

    /// Reactor only: worker threads of the background tokio runtime that handlers' tokio calls
    /// use when `serve` is not awaited inside a tokio runtime (default 1).
    pub fn compat_workers(mut self, n: usize) -> Self {
        self.cfg.compat_workers = n.max(1);
        self
    }

    /// Serve HTTP/2 with prior knowledge (h2c) on the same port as HTTP/1.1 (default on).
    ///
    /// Each new connection's first bytes are peeked: the HTTP/2 preface makes it an HTTP/2
    /// connection, any other byte an HTTP/1.1 one. `Upgrade: h2c` is not supported (hyper does
    /// not, and RFC 9113 deprecates it): such requests are answered over HTTP/1.1.
    pub fn http2(mut self, on: bool) -> Self {
        self.cfg.http2.enabled = on;
        self
    }

    /// Expect a PROXY protocol header (HAProxy's spec, version 1 or 2, told apart by its first
    /// bytes) at the start of every connection, before TLS and HTTP (default off). Turn it on
    /// only behind a proxy that sends one (HAProxy's `send-proxy` or `send-proxy-v2`, a cloud
    /// load balancer's "proxy protocol" option), and let no one else reach the port: whoever
    /// connects chooses the address the header claims.
    ///
    /// The header's source address is the peer that `ConnectInfo<SocketAddr>`
    /// ([`IncomingStream::remote_addr`](crate::IncomingStream::remote_addr)) and hop's logs
    /// see, and every request carries the header as a
    /// [`ProxyHeader`](crate::proxy::ProxyHeader) extension (addresses, TLVs). A header
    /// without an address (v2 `LOCAL`, a proxy's health check; v1 `UNKNOWN`) keeps the
    /// socket's own peer address.
    ///
    /// A connection whose header is malformed, missing (as the spec says, a receiver must not
    /// guess that bytes without one come straight from a client), or not whole within
    /// [`header_read_timeout`](Self::header_read_timeout) (or the idle timeout, if smaller) is
    /// closed and counted in [`Stats::proxy_header_failures`]. Only the header's bytes are
    /// read (at most 107 for v1, 16 + [`MAX_V2_BODY`](crate::proxy::MAX_V2_BODY) for v2);
    /// the make-service is called once it is.
    ///
    /// TCP and Unix listeners only: a generic `axum::serve::Listener` is refused at start.
    /// On the tokio backend with it on, the make-service (a clone of it, per connection) is
    /// called on the connection's task once the header is read.
    pub fn proxy_protocol(mut self, on: bool) -> Self {
        self.cfg.proxy_protocol = on;
        self
    }

    /// Serve TLS (HTTPS) with rustls (features `tls`, `tls-ring`): every connection starts
    /// with a TLS handshake, then ALPN picks HTTP/2 (`h2`, when HTTP/2 is on) or HTTP/1.1 (any
    /// other answer, or no ALPN); no preface is peeked at. Takes a
    /// [`RustlsConfig`](crate::tls::RustlsConfig) (reloadable) or an
    /// `Arc<rustls::ServerConfig>` of your own. Handlers find a
    /// [`TlsInfo`](crate::tls::TlsInfo) in each request's extensions.
    ///
    /// The reactor runs rustls in place in its socket type (no task per connection); the tokio
    /// backend, and generic listeners under either backend, use tokio-rustls.
    ///
    /// ```
    /// # #[tokio::main]
    /// # async fn main() -> std::io::Result<()> {
    /// # let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    /// #   let dir = std::env::temp_dir().join(format!("hop-doc-tls-{}", std::process::id()));
    /// #   std::fs::create_dir_all(&dir)?;
    /// #   std::env::set_current_dir(&dir)?;
    /// #   let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    /// #   std::fs::write("cert.pem", made.cert.pem())?;
    /// #   std::fs::write("key.pem", made.signing_key.serialize_pem())?;
    /// #   let der = made.cert.der().clone();
    /// let listener = std::net::TcpListener::bind("127.0.0.1:0")?; // "0.0.0.0:443" in production
    /// let tls = hop::tls::RustlsConfig::from_pem_file("cert.pem", "key.pem").await?;
    /// let serve = hop::Server::builder().tls(tls).serve(listener, app);
    /// # let (addr, handle) = (serve.local_addr()?, serve.handle());
    /// #   let client = std::thread::spawn(move || {
    /// #       use std::io::{Read, Write};
    /// #       let mut roots = rustls::RootCertStore::empty();
    /// #       roots.add(der).unwrap();
    /// #       let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    /// #       let cfg = rustls::ClientConfig::builder_with_provider(provider)
    /// #           .with_safe_default_protocol_versions().unwrap()
    /// #           .with_root_certificates(roots)
    /// #           .with_no_client_auth();
    /// #       let name = "localhost".try_into().unwrap();
    /// #       let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    /// #       let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
    /// #       let req = "GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    /// #       tls.write_all(req.as_bytes()).unwrap();
    /// #       let mut answer = Vec::new();
    /// #       let _ = tls.read_to_end(&mut answer); // the server may close without close_notify
    /// #       handle.shutdown();
    /// #       String::from_utf8(answer).unwrap()
    /// #   });
    /// serve.await
    /// # ?;
    /// # let answer = client.join().unwrap();
    /// # assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub fn tls(mut self, config: impl Into<crate::tls::RustlsConfig>) -> Self {
        self.cfg.tls = Some(config.into());
        self
    }

    /// TLS: how long a new connection may take to complete its handshake (default 10 s). A
    /// client that sends nothing, or dribbles its ClientHello, is closed then and counted in
    /// [`Stats::tls_handshake_timeouts`].
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub fn tls_handshake_timeout(mut self, t: Duration) -> Self {
        self.cfg.tls_handshake_timeout = t;
        self
    }

    /// HTTP/2: most streams a client may have open at once per connection (default 100; hyper's
    /// is 200). Each open stream may hold a request body up to the stream window and a
    /// response up to [`http2_max_send_buf_size`](Self::http2_max_send_buf_size).
    pub fn http2_max_concurrent_streams(mut self, n: u32) -> Self {
        self.cfg.http2.max_concurrent_streams = n;
        self
    }

    /// HTTP/2: the flow-control window of each stream, how much request body a client may send
    /// ahead of the handler reading it (default 256 KiB; hyper's is 1 MiB).
    pub fn http2_initial_stream_window_size(mut self, n: u32) -> Self {
        self.cfg.http2.initial_stream_window_size = n;
        self
    }

    /// HTTP/2: the flow-control window of the connection, the most request body buffered per
    /// connection across its streams (default 1 MiB, as hyper's).
    pub fn http2_initial_connection_window_size(mut self, n: u32) -> Self {
        self.cfg.http2.initial_connection_window_size = n;
        self
    }

    /// HTTP/2: the largest frame the server accepts (default 16 KiB, the protocol's minimum).
    pub fn http2_max_frame_size(mut self, n: u32) -> Self {
        self.cfg.http2.max_frame_size = n;
        self
    }

    /// HTTP/2: the largest request header list accepted, decoded (default 16 KiB, as hyper's).
    pub fn http2_max_header_list_size(mut self, n: u32) -> Self {
        self.cfg.http2.max_header_list_size = n;
        self
    }

    /// HTTP/2: the most response data buffered per stream while the client's window is closed
    /// (default 128 KiB; hyper's is 400 KB). A handler writing more waits for the client.
    /// 0 (no response could be sent) or over `u32::MAX`: `serve` returns an `InvalidInput`
    /// error.
    pub fn http2_max_send_buf_size(mut self, n: usize) -> Self {
        self.cfg.http2.max_send_buf_size = n;
        self
    }

    /// HTTP/2: send a PING this often to check that the client is alive (default off, as
    /// hyper's and axum::serve's).
    pub fn http2_keep_alive_interval(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.http2.keep_alive_interval = t.into();
        self
    }

    /// HTTP/2: close a connection whose client does not answer a keep-alive PING within this
    /// (default 20 s, as hyper's).
    pub fn http2_keep_alive_timeout(mut self, t: Duration) -> Self {
        self.cfg.http2.keep_alive_timeout = t;
        self
    }

    /// HTTP/2: a connection with no open stream for this long is sent GOAWAY and closed
    /// (default 60 s; `None`: never). hyper has no such timeout: axum::serve keeps an idle
    /// HTTP/2 connection open for as long as the client does.
    pub fn http2_idle_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.http2.idle_timeout = t.into();
        self
    }

    /// HTTP/2: how many streams a client may open and reset before the server has accepted
    /// them, before the connection is closed with GOAWAY (default 20, h2's). This and
    /// [`http2_max_local_error_reset_streams`](Self::http2_max_local_error_reset_streams) hold
    /// off "rapid reset" (CVE-2023-44487).
    pub fn http2_max_pending_accept_reset_streams(mut self, n: usize) -> Self {
        self.cfg.http2.max_pending_accept_reset_streams = n;
        self
    }

    /// HTTP/2: how many streams the server may reset because of client errors on one
    /// connection before it closes the connection with GOAWAY (default 1024, hyper's).
    pub fn http2_max_local_error_reset_streams(mut self, n: usize) -> Self {
        self.cfg.http2.max_local_error_reset_streams = n;
        self
    }

    /// A request body that brings no bytes for this long while the handler waits for it ends
    /// its request (default 30 s; `None` or `Duration::MAX`: never): on HTTP/1.1 with a `408`
    /// and a close if the response has not started (a close otherwise), on HTTP/2 with
    /// RST_STREAM (CANCEL) to the client while the handler's body read fails. On HTTP/2 the
    /// wait counts only while the client may send (its flow-control window is open): a handler
    /// that stops reading is never timed out for it. axum::serve has no such timeout.
    ///
    /// A streaming request body that pauses longer by design (a gRPC client stream, a bidi
    /// chat stream) needs a longer setting, or `None`. An HTTP/2 CONNECT (a WebSocket over
    /// HTTP/2) is no request body and is never timed; nor is an HTTP/1.1 `Expect: 100-continue`
    /// body before its first byte (its client waits for the handler to read). Zero is refused
    /// at start; `Duration::MAX` is never.
    pub fn request_body_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.cfg.request_body_timeout = t.into();
        self
    }

    /// Serves `app` on `listener` with these settings.
    pub fn serve<L, LM, A, M>(self, listener: L, app: A) -> Serve<HttpApp<A, M>>
    where
        L: IntoListener<LM>,
        A: IntoConnService<M>,
        M: 'static,
    {
        self.start(listener, HttpApp::new(app))
    }

    /// Serves a raw byte-stream protocol (over TCP, or any listener [`serve`](Self::serve)
    /// takes): `factory` makes one [`Handler`] per connection.
    pub fn serve_tcp<L, LM, F, H>(self, listener: L, factory: F) -> Serve<TcpApp<F>>
    where
        L: IntoListener<LM>,
        F: FnMut(IncomingStream<'_>) -> H + Clone + Send + 'static,
        H: Handler,
    {
        self.start(listener, TcpApp::new(factory))
    }

    fn start<L: IntoListener<LM>, LM, P>(self, listener: L, app: P) -> Serve<P> {
        let ctl = Arc::new(Control::default());
        crate::observe::start();
        let listener = listener.into_bound();
        if let Ok(l) = &listener {
            *ctl.local_addr.lock().unwrap_or_else(|e| e.into_inner()) = l.local_addr().ok();
        }
        Serve {
            cfg: self.cfg,
            listener,
            app,
            ctl,
        }
    }
}
