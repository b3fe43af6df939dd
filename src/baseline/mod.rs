//! The tokio baseline: the same `serve` on a tokio multi-thread runtime plus hyper, one task per
//! connection, configured like the reactor (`TCP_NODELAY`, the same timeouts
//! and limits, as many workers as the reactor has pollers). It is what hop is measured against,
//! so it is tuned as well as tokio allows, not a strawman.
//!
//! The accept loop takes connections from a TCP listener, a Unix listener, or a generic
//! `axum::serve::Listener` (an [`Accept`] each; only the generic one's streams are boxed). That
//! last path also serves generic listeners under the reactor backend, which cannot see their
//! sockets.
//!
//! hyper 1.x arms its header-read timer as soon as a keep-alive connection goes idle, so here the
//! idle timeout is hyper's header timer set to the smaller of the two timeouts.
//!
//! HTTP/2 is told from HTTP/1.1 as on the reactor, by peeking at the first bytes for the
//! preface (hyper-util's auto builder reads and replays them instead, with no time limit on
//! that wait); a generic listener's stream, which cannot be peeked, has the bytes read put back
//! in front (`replay::Replay`). An HTTP/2 connection is hyper's, its streams tokio tasks spawned by
//! [`StreamExec`], which counts them open for the HTTP/2 idle timeout.
//!
//! With the PROXY protocol on, a connection's task reads the header first (peeked, then exactly
//! its bytes taken, under the header timeout), then asks a clone of the app for the service with
//! the proxied address, and goes on as any other connection ([`run_conn`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::app::{App, NewConn};
use crate::handler::context::{self as server, ServerContext};
use crate::handler::ConnCore;
use crate::http2::{sniff, Http2Svc, Meter, Metered, Proto, PREFACE};
use crate::limits::{Limit, OpenGuard, OpenKind};
use crate::listener::{Bound, Native};
use crate::observe::Reason;
use crate::proxy::{Failure, ProxyHeader};
use crate::service::{
    BodyClock, BodyIo, Clocked, ConnLimits, ConnService, HyperSvc, IncomingStream,
};
use crate::settings::{Config, Control, Http2Config, Place};

/// Counts an HTTP connection task open (`OpenCounts::http`) until it ends.
struct HttpGuard(Arc<Control>);

impl Drop for HttpGuard {
    fn drop(&mut self) {
        self.0.open.http_closed();
    }
}

/// Starts the baseline on its own runtime thread; `done` fires when it has stopped.
pub(crate) fn start<P: App>(
    cfg: &Config,
    listener: Bound,
    app: P,
    ctl: Arc<Control>,
    done: oneshot::Sender<()>,
) -> io::Result<()> {
    match &listener {
        Bound::Native(Native::Tcp(l)) => {
            l.set_nonblocking(true)?;
            let _ = socket2::SockRef::from(l).listen(cfg.backlog);
            // Before `serve` returns, as on the reactor: a client may connect at once.
            cfg.tcp_tuning.apply_listener(socket2::SockRef::from(l));
        }
        Bound::Native(Native::Unix(l)) => {
            l.set_nonblocking(true)?;
            let _ = socket2::SockRef::from(l).listen(cfg.backlog);
        }
        #[cfg(feature = "axum")]
        Bound::Generic(_) => {}
    }
    let (drain_tx, drain_rx) = watch::channel(false);
    let ctx = ServerContext {
        tcp: Arc::new(cfg.tcp.clone()),
        shutdown: Some(drain_rx),
        tasks: Arc::new(watch::Sender::new(0)),
        force: Arc::new(watch::Sender::new(false)),
        ctl: Some(ctl.clone()),
    };
    let thread_ctx = ctx.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.pollers)
        .thread_name("hop-tokio")
        .on_thread_start(move || server::set_thread_context(thread_ctx.clone()))
        .enable_all()
        .build()?;
    let header_timeout = match (cfg.header_read_timeout, cfg.idle_timeout) {
        (Some(h), Some(i)) => Some(h.min(i)),
        (h, i) => h.or(i),
    };
    let mut http1 = cfg.http1(header_timeout);
    http1.timer(TokioTimer::new());
    let http = Arc::new(Http {
        max_age: cfg.limits.max_age,
        max_requests: cfg.limits.max_requests(),
        http1,
        http2: cfg.http2.enabled.then(|| cfg.http2.clone()),
        head_limit: header_timeout,
        head_reason: match (cfg.header_read_timeout, cfg.idle_timeout) {
            (Some(h), Some(i)) if i < h => Reason::IdleTimeout,
            (None, Some(_)) => Reason::IdleTimeout,
            _ => Reason::HeaderTimeout,
        },
        close_timeout: cfg.tcp.close_timeout,
        body_timeout: cfg.request_body_timeout,
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        tls: cfg.tls.clone().map(|config| Tls {
            config,
            handshake_timeout: cfg.tls_handshake_timeout,
        }),
    });
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("hop-tokio-main".into())
        .spawn(move || {
            let res = rt.block_on(async move {
                // Each kind of listener gets its own accept loop (the TCP path's streams are
                // not boxed).
                match listener {
                    Bound::Native(Native::Tcp(l)) => {
                        let l = TcpAccept::new(l, &cfg)?;
                        accept_loop(cfg, l, app, ctl, http, ctx, drain_tx).await
                    }
                    Bound::Native(Native::Unix(l)) => {
                        let l = tokio::net::UnixListener::from_std(l)?;
                        accept_loop(cfg, l, app, ctl, http, ctx, drain_tx).await
                    }
                    #[cfg(feature = "axum")]
                    Bound::Generic(l) => accept_loop(cfg, l, app, ctl, http, ctx, drain_tx).await,
                }
            });
            if let Err(e) = res {
                tracing::error!(error = %e, "tokio backend failed");
            }
            rt.shutdown_background();
            let _ = done.send(());
        })?;
    Ok(())
}

/// Where the accept loop takes connections from: a TCP or Unix listener, or a generic
/// `axum::serve::Listener` (whose connections are boxed).
trait Accept: Send + 'static {
    /// A connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer's address.
    type Peer: std::fmt::Debug + Send + 'static;

    /// The connection as served over HTTP: the stream itself, or a generic listener's with the
    /// bytes read to tell the protocol put back in front.
    type Served: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection (cancel-safe: `select!` drops it whenever another branch wins).
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Peer)>> + Send;

    /// A connection the kernel has already queued, taken without waiting for readiness (once
    /// the server stops accepting: what is queued would be reset when the listener closes);
    /// `None` when the queue is empty, or this listener cannot tell.
    fn accept_queued(&mut self) -> Option<io::Result<(Self::Io, Self::Peer)>> {
        None
    }

    /// Sets up a new connection (socket options) and describes it to the app.
    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a Self::Peer) -> IncomingStream<'a>;

    /// The connection's descriptor, if hop may use it: TCP (a read handler's addresses, the
    /// reset of a connection cut at the drain deadline).
    fn tcp_fd(_io: &Self::Io) -> Option<RawFd> {
        None
    }

    /// The peer's IP address, if it has one (`max_connections_per_ip`).
    fn peer_ip(_peer: &Self::Peer) -> Option<std::net::IpAddr> {
        None
    }

    /// Tells HTTP/1.1 from HTTP/2 by the connection's first bytes; `None` if it ends first.
    fn sniff(
        io: Self::Io,
    ) -> impl Future<Output = io::Result<Option<(Proto, Self::Served)>>> + Send;

    /// The connection as served when HTTP/2 is off.
    fn plain(io: Self::Io) -> Self::Served;

    /// Reads the connection's PROXY protocol header, and only its bytes.
    fn proxy_header(
        io: &mut Self::Io,
    ) -> impl Future<Output = Result<ProxyHeader, Failure>> + Send {
        let _ = io;
        // Generic listeners are refused with the PROXY protocol on (`serve_until`).
        std::future::ready(Err(Failure::Io(io::ErrorKind::Unsupported.into())))
    }

    /// The connection as the app is told of it once its PROXY protocol header is read
    /// (`local`: its local address, as [`incoming`](Self::incoming) said).
    fn proxied<'a>(
        io: &'a Self::Io,
        peer: &'a Self::Peer,
        local: SocketAddr,
        header: &ProxyHeader,
    ) -> IncomingStream<'a>;
}

/// A TCP listener, with the settings its connections get.
struct TcpAccept {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    keepalive: Option<socket2::TcpKeepalive>,
}

impl TcpAccept {
    /// Must be called inside the runtime.
    fn new(listener: std::net::TcpListener, cfg: &Config) -> io::Result<Self> {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        Ok(TcpAccept {
            local_addr: listener.local_addr()?,
            listener,
            keepalive: cfg.tcp_tuning.keepalive(),
        })
    }
}

impl Accept for TcpAccept {
    type Io = tokio::net::TcpStream;
    type Peer = SocketAddr;
    type Served = tokio::net::TcpStream;

    async fn sniff(io: Self::Io) -> io::Result<Option<(Proto, Self::Served)>> {
        Ok(sniff_peeked(&io).await?.map(|p| (p, io)))
    }

    fn plain(io: Self::Io) -> Self::Served {
        io
    }

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send {
        self.listener.accept()
    }

    fn accept_queued(&mut self) -> Option<io::Result<(Self::Io, SocketAddr)>> {
        // Straight to accept(2): tokio's readiness may not have heard of the last arrivals.
        let (sock, peer) = match socket2::SockRef::from(&self.listener).accept() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(Err(e)),
        };
        let stream = std::net::TcpStream::from(sock);
        let peer = peer
            .as_socket()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        Some(
            stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream))
                .map(|s| (s, peer)),
        )
    }

    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a SocketAddr) -> IncomingStream<'a> {
        let _ = io.set_nodelay(true);
        if let Some(ka) = &self.keepalive {
            let _ = socket2::SockRef::from(io).set_tcp_keepalive(ka);
        }
        let local = crate::service::local_addr_of(self.local_addr, || io.local_addr());
        IncomingStream::new(local, *peer)
    }

    fn tcp_fd(io: &Self::Io) -> Option<RawFd> {
        Some(io.as_raw_fd())
    }

    async fn proxy_header(io: &mut Self::Io) -> Result<ProxyHeader, Failure> {
        read_proxy_header(io).await
    }

    fn proxied<'a>(
        _io: &'a Self::Io,
        peer: &'a SocketAddr,
        local: SocketAddr,
        header: &ProxyHeader,
    ) -> IncomingStream<'a> {
        IncomingStream::new(local, *peer).proxied(header)
    }

    fn peer_ip(peer: &SocketAddr) -> Option<std::net::IpAddr> {
        Some(peer.ip())
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Peer = std::os::unix::net::SocketAddr;
    type Served = tokio::net::UnixStream;

    async fn sniff(io: Self::Io) -> io::Result<Option<(Proto, Self::Served)>> {
        Ok(sniff_peeked(&io).await?.map(|p| (p, io)))
    }

    fn plain(io: Self::Io) -> Self::Served {
        io
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Peer)> {
        let (io, peer) = tokio::net::UnixListener::accept(self).await?;
        Ok((io, peer.into()))
    }

    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a Self::Peer) -> IncomingStream<'a> {
        IncomingStream::unix(io.as_fd(), peer)
    }

    async fn proxy_header(io: &mut Self::Io) -> Result<ProxyHeader, Failure> {
        read_proxy_header(io).await
    }

    fn proxied<'a>(
        io: &'a Self::Io,
        peer: &'a Self::Peer,
        _local: SocketAddr,
        header: &ProxyHeader,
    ) -> IncomingStream<'a> {
        IncomingStream::unix(io.as_fd(), peer).proxied(header)
    }
}

#[cfg(feature = "axum")]
impl Accept for Box<dyn crate::listener::ErasedListener> {
    type Io = crate::listener::BoxIo;
    type Peer = Box<dyn crate::listener::RemoteAddr>;
    type Served = replay::Replay<crate::listener::BoxIo>;

    async fn sniff(mut io: Self::Io) -> io::Result<Option<(Proto, Self::Served)>> {
        use tokio::io::AsyncReadExt;
        let mut first = [0u8; PREFACE.len()];
        let mut n = 0;
        loop {
            let got = io.read(&mut first[n..]).await?;
            if got == 0 {
                return Ok(None);
            }
            n += got;
            if let Some(p) = sniff(&first[..n]) {
                let prefix = bytes::Bytes::copy_from_slice(&first[..n]);
                return Ok(Some((p, replay::Replay::new(prefix, io))));
            }
        }
    }

    fn plain(io: Self::Io) -> Self::Served {
        replay::Replay::new(bytes::Bytes::new(), io)
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Peer)> {
        Ok(std::future::poll_fn(|cx| self.poll_accept(cx)).await)
    }

    fn incoming<'a>(&'a self, _io: &'a Self::Io, peer: &'a Self::Peer) -> IncomingStream<'a> {
        IncomingStream::generic(self.local_addr(), (**peer).as_any())
    }

    fn proxied<'a>(
        _io: &'a Self::Io,
        peer: &'a Self::Peer,
        local: SocketAddr,
        header: &ProxyHeader,
    ) -> IncomingStream<'a> {
        IncomingStream::generic(Some(local), (**peer).as_any()).proxied(header)
    }

    fn peer_ip(peer: &Self::Peer) -> Option<std::net::IpAddr> {
        (**peer)
            .as_any()
            .downcast_ref::<SocketAddr>()
            .map(|a| a.ip())
    }
}

/// Asks the app what a new connection becomes. The make-service is user code: a panic in it
/// costs this connection only. `None` (the connection closes, as an error) if it was not ready
/// or panicked; `who` names the connection in the log.
fn make<P: App>(
    app: &mut P,
    incoming: IncomingStream<'_>,
    who: &dyn std::fmt::Debug,
    guard: &Place,
) -> Option<NewConn<P::Svc>> {
    let accepted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| app.accept(incoming)));
    match accepted {
        Ok(Some(a)) => Some(a),
        Ok(None) => {
            crate::logs::error_limited!(?who, "the make-service was not ready; closing");
            guard.closed_for(Reason::Error);
            None
        }
        Err(panic) => {
            guard.control().contained_panic("the make-service", &*panic);
            guard.closed_for(Reason::Error);
            None
        }
    }
}

async fn accept_loop<P: App, A: Accept>(
    cfg: Config,
    mut listener: A,
    mut app: P,
    ctl: Arc<Control>,
    http: Arc<Http>,
    ctx: ServerContext,
    drain_tx: watch::Sender<bool>,
) -> io::Result<()> {
    let tcp = ctx.tcp.clone();
    let drain_rx = drain_tx.subscribe();
    let shutdown = Arc::new(tokio::sync::Notify::new());
    {
        let s = shutdown.clone();
        ctl.on_shutdown(Box::new(move || s.notify_one()));
    }
    let forcing = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    // Once the shutdown is heard, what the kernel has already queued is still accepted (it
    // would be reset when the listener closes; see the README's zero-downtime restart), then
    // the loop ends.
    let mut stopping = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.notified(), if !stopping => {
                stopping = true;
                continue;
            }
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = res {
                    if e.is_panic() {
                        ctl.contained_panic("a connection task", &*e.into_panic());
                    }
                }
                continue;
            }
            accepted = listener.accept(), if !stopping => accepted,
            _ = std::future::ready(()), if stopping => match listener.accept_queued() {
                Some(accepted) => accepted,
                None => break,
            },
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(_) if stopping => break,
            Err(e) => {
                crate::logs::warn_limited!(error = %e, "accept failed; retrying in 50 ms");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !ctl.admit(cfg.max_connections) {
            continue;
        }
        // Its place in its IP's count goes with the stream, into an upgrade too. Behind the
        // PROXY protocol the client is the header's: counted once it is read (`proxied`).
        let mut ip = None;
        let max_per_ip = cfg.limits.per_ip.filter(|_| !cfg.proxy_protocol);
        if let (Some(max), Some(addr)) = (max_per_ip, A::peer_ip(&peer)) {
            match ctl.ip_place(addr, max) {
                Some(slot) => ip = Some(slot),
                None => {
                    ctl.unadmit_per_ip();
                    continue;
                }
            }
        }
        let guard = Arc::new(Place::new(ctl.clone(), forcing.clone(), ip));
        // The connection's span (feature `metrics`, debug level), entered whenever its task
        // is polled.
        #[cfg(feature = "metrics")]
        let span = crate::observe::conn_span(&peer).map_or_else(tracing::Span::none, |s| *s);
        if cfg.proxy_protocol {
            // Sets the socket's options; the app is told of the connection once its header is
            // read, on its task.
            let local = listener.incoming(&stream, &peer).local_addr();
            let (app, http, tcp, ctl) = (app.clone(), http.clone(), tcp.clone(), ctl.clone());
            let drain = drain_rx.clone();
            let per_ip = cfg.limits.per_ip;
            let task = proxied::<P, A>(
                app, stream, peer, local, http, tcp, ctl, drain, guard, per_ip,
            );
            #[cfg(feature = "metrics")]
            let task = tracing::Instrument::instrument(task, span);
            tasks.spawn(task);
            continue;
        }
        let incoming = listener.incoming(&stream, &peer);
        let Some(accepted) = make(&mut app, incoming, &peer, &guard) else {
            continue;
        };
        let (http, tcp, ctl) = (http.clone(), tcp.clone(), ctl.clone());
        let task = run_conn::<A, _>(
            accepted,
            stream,
            None,
            http,
            tcp,
            ctl,
            drain_rx.clone(),
            guard,
        );
        #[cfg(feature = "metrics")]
        let task = tracing::Instrument::instrument(task, span);
        tasks.spawn(task);
    }
    drop(listener);
    // Hijacked connections carry their place in the counts (`Place`) with their stream: they
    // count as drained or forced when they end, as any connection does.
    let mut hijacked = ctx.tasks.subscribe();
    let _ = drain_tx.send(true);
    let deadline = ctl.drain_deadline().unwrap_or_else(Instant::now);
    let drained = tokio::time::timeout_at(deadline.into(), async {
        while tasks.join_next().await.is_some() {}
        // Hijacked connections (WebSockets, read handlers) finish their close handshakes too.
        let _ = hijacked.wait_for(|n| *n == 0).await;
    })
    .await;
    if drained.is_err() {
        forcing.store(true, Ordering::Release);
        // Hijacked connections still running are cut too (see `ServerContext::force`); they
        // are waited for below, so that the counts are final when this returns.
        ctx.force.send_replace(true);
        // Cut: a read handler hears of it from its core's `Drop` (`on_close`, `Shutdown`), and
        // a panic there (or in any `Drop` the cut runs) is counted as its task's.
        tasks.abort_all();
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                if e.is_panic() {
                    ctl.contained_panic("a connection task", &*e.into_panic());
                }
            }
        }
        // They drop at their next poll; bounded, should one be stuck in a blocking `Drop`.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            hijacked.wait_for(|n| *n == 0),
        )
        .await;
    }
    Ok(())
}

/// A connection's task with the PROXY protocol on: reads its header (under the header timeout;
/// given up when the server drains), asks `app` what the connection becomes with the header's
/// source as its peer, then runs it ([`run_conn`]). A refused header is counted and logged.
#[allow(clippy::too_many_arguments)]
async fn proxied<P: App, A: Accept>(
    mut app: P,
    mut stream: A::Io,
    peer: A::Peer,
    local: SocketAddr,
    http: Arc<Http>,
    tcp: Arc<crate::handler::TcpConfig>,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    guard: Arc<Place>,
    max_per_ip: Option<usize>,
) {
    let read = async {
        match http.head_limit {
            Some(t) => tokio::time::timeout(t, A::proxy_header(&mut stream))
                .await
                .unwrap_or(Err(Failure::TimedOut)),
            None => A::proxy_header(&mut stream).await,
        }
    };
    let header = tokio::select! {
        header = read => header,
        _ = async { drain.wait_for(|d| *d).await.is_ok() } => return,
    };
    let header = match header {
        Ok(header) => header,
        Err(why) => {
            crate::proxy::refused(&ctl, &peer, &why);
            guard.closed_for(Reason::ProxyHeader);
            return;
        }
    };
    // The task runs in the connection's span (feature `metrics`).
    #[cfg(feature = "metrics")]
    crate::observe::record_client(&tracing::Span::current(), &header);
    // Its IP's place: the header's source, or the socket's peer for a header without one.
    let client = header
        .source()
        .map(|a| a.ip())
        .or_else(|| A::peer_ip(&peer));
    if let (Some(max), Some(client)) = (max_per_ip, client) {
        let Some(slot) = ctl.ip_place(client, max) else {
            guard.closed_for(Reason::MaxConnectionsPerIp);
            return;
        };
        guard.hold_ip(slot);
    }
    let incoming = A::proxied(&stream, &peer, local, &header);
    let Some(accepted) = make(&mut app, incoming, &incoming, &guard) else {
        return;
    };
    run_conn::<A, _>(accepted, stream, Some(header), http, tcp, ctl, drain, guard).await;
}

/// Runs an accepted connection to its end, as the app said: a read handler (after its TLS
/// handshake, on a TLS listener) or HTTP, on the task this runs in. `proxy`: its PROXY protocol
/// header, put into every request.
#[allow(clippy::too_many_arguments)]
async fn run_conn<A: Accept, S: ConnService>(
    accepted: NewConn<S>,
    stream: A::Io,
    proxy: Option<ProxyHeader>,
    http: Arc<Http>,
    tcp: Arc<crate::handler::TcpConfig>,
    ctl: Arc<Control>,
    drain: watch::Receiver<bool>,
    guard: Arc<Place>,
) {
    let svc = match accepted {
        NewConn::Http(svc) => svc,
        NewConn::Tcp(handler) => {
            let conn = crate::handler::Conn::new(A::tcp_fd(&stream), &tcp);
            let mut core = ConnCore::new(handler, conn, Default::default(), tcp, Instant::now());
            core.open = Some(OpenGuard::new(ctl.open.clone(), OpenKind::Tcp));
            let stream = crate::observe::count_io(stream);
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            if let Some(tls) = &http.tls {
                let mut hs_drain = drain.clone();
                let never = tokio::sync::Notify::new();
                let stream =
                    match tls_handshake(stream, tls, false, &ctl, &mut hs_drain, &never).await {
                        Ok(stream) => stream,
                        Err(why) => {
                            guard.closed_for(why);
                            return;
                        }
                    };
                let _tls = crate::limits::Gauged::new(crate::observe::Open::Tls);
                let why = crate::handler::run_task(core, stream, drain).await;
                guard.closed_for(why.unwrap_or(Reason::Closed));
                return;
            }
            let _ = (&http, &ctl);
            let why = crate::handler::run_task(core, stream, drain).await;
            guard.closed_for(why.unwrap_or(Reason::Closed));
            return;
        }
    };
    let cut = Arc::new(tokio::sync::Notify::new());
    let fd = A::tcp_fd(&stream);
    ctl.open.http_opened();
    // Its place in the server's counts goes with the stream too, into an upgrade.
    let place = guard.clone();
    let why = server::with_cut(cut.clone(), async move {
        // Counted open as HTTP until hyper's connection ends (or is upgraded).
        let _http = HttpGuard(ctl.clone());
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(tls) = &http.tls {
            return serve_tls::<A, _>(stream, fd, place, svc, proxy, &http, tls, ctl, drain, cut)
                .await;
        }
        serve_http::<A, _>(stream, fd, place, svc, proxy, &http, ctl, drain, cut).await
    })
    .await;
    guard.closed_for(why);
}

/// Open HTTP/2 streams of one connection.
struct Streams {
    open: AtomicUsize,
    /// Streams started so far (an idle period ends with any new one).
    started: AtomicUsize,
    /// Told when the last open stream ends.
    idle: tokio::sync::Notify,
    /// `max_requests_per_connection` (`u64::MAX`: none), and what is told when that many
    /// streams have started.
    max: u64,
    reached: tokio::sync::Notify,
}

/// HTTP/2's executor here: each stream a tokio task, counted open until it ends.
#[derive(Clone)]
struct StreamExec(Arc<Streams>);

impl StreamExec {
    fn new(max: u64) -> Self {
        StreamExec(Arc::new(Streams {
            open: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            max,
            reached: tokio::sync::Notify::new(),
        }))
    }
}

/// Counts a stream closed however its task ends.
struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Every waiter: the idle timeout's and, after GOAWAY, the close timeout's.
            self.0.idle.notify_waiters();
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        let started = self.0.started.fetch_add(1, Ordering::Relaxed) as u64 + 1;
        if started == self.0.max {
            // A permit is kept if no one waits yet.
            self.0.reached.notify_one();
        }
        let guard = StreamGuard(self.0.clone());
        tokio::spawn(async move {
            let _guard = guard;
            fut.await
        });
    }
}

/// Completes at `at`; never for `None`.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Streams {
    /// Completes once `max_requests_per_connection` streams have started.
    async fn reached(&self) {
        if self.max == u64::MAX {
            return std::future::pending().await;
        }
        self.reached.notified().await
    }

    /// Completes once no stream has been open for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            loop {
                // Registered before the count is read, so that no notification is missed.
                let notified = self.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.open.load(Ordering::Acquire) == 0 {
                    break;
                }
                notified.await;
            }
            let started = self.started.load(Ordering::Relaxed);
            tokio::time::sleep(limit).await;
            if self.open.load(Ordering::Acquire) == 0
                && self.started.load(Ordering::Relaxed) == started
            {
                return;
            }
        }
    }
}

/// A stream whose waiting bytes can be peeked at: TCP and Unix sockets.
trait Peek: AsRawFd {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Runs `f`, clearing read readiness if it returns `WouldBlock`.
    fn try_read_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize>;
}

impl Peek for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
    fn try_read_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::READABLE, f)
    }
}

impl Peek for tokio::net::UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::UnixStream::poll_read_ready(self, cx)
    }
    fn try_read_io(&self, f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        self.try_io(tokio::io::Interest::READABLE, f)
    }
}

/// Copies the bytes waiting on `io` into `dst` without taking them, once there are some.
async fn peek(io: &impl Peek, dst: &mut [u8]) -> io::Result<usize> {
    let fd = io.as_raw_fd();
    std::future::poll_fn(|cx| loop {
        std::task::ready!(io.poll_read_ready(cx))?;
        let peeked = io.try_read_io(|| {
            // SAFETY: `recv(2)` writes at most `dst.len()` bytes into `dst`, initialized memory
            // borrowed here; `fd` is open while `io` is borrowed.
            let n = unsafe { libc::recv(fd, dst.as_mut_ptr().cast(), dst.len(), libc::MSG_PEEK) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return Poll::Ready(r),
        }
    })
    .await
}

/// Peeks at a new connection's first bytes until they tell HTTP/1.1 from HTTP/2; `None` if
/// the connection ends first.
async fn sniff_peeked(io: &impl Peek) -> io::Result<Option<Proto>> {
    let mut first = [0u8; PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = peek(io, &mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(p) = sniff(&first[..n]) {
            return Ok(Some(p));
        }
        // Part of the preface: the socket stays readable, so a peek would return the same bytes
        // at once; wait a little before looking again (a client that splits the preface is
        // rare).
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Reads a PROXY protocol header off `io`: peeks until it is whole (the spec's limits bound
/// what is looked at: `proxy::MAX_HEADER`), then takes exactly its bytes, so that what follows
/// reaches TLS or HTTP untouched. No time limit here: the caller sets it.
async fn read_proxy_header<T>(io: &mut T) -> Result<ProxyHeader, Failure>
where
    T: Peek + AsyncRead + Unpin,
{
    use crate::proxy::{parse, Parsed, V1_MAX};
    use tokio::io::AsyncReadExt;
    // Enough for any v1 header and a v2 header's fixed part; more once v2 says how much.
    let mut buf = vec![0u8; V1_MAX];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = peek(io, &mut buf).await.map_err(Failure::Io)?;
        if n == 0 {
            return Err(Failure::Closed);
        }
        match parse(&buf[..n])? {
            Parsed::Header(header, len) => {
                io.read_exact(&mut buf[..len])
                    .await
                    .map_err(|_| Failure::Closed)?;
                return Ok(header);
            }
            // More than was looked at may be there already.
            Parsed::Need(more) if n == buf.len() => buf.resize(more, 0),
            Parsed::Need(_) => {
                // Part of a header: the socket stays readable, so a peek would return the same
                // bytes at once; wait a little before looking again (as `sniff_peeked`).
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// How HTTP connections are served: hyper's `http1` builder, the HTTP/2 settings if HTTP/2 is
/// on, and how long a new connection may take to send its first bytes.
struct Http {
    /// `max_connection_age`.
    max_age: Option<Duration>,
    /// `max_requests_per_connection` (`u64::MAX`: none).
    max_requests: u64,
    http1: hyper::server::conn::http1::Builder,
    http2: Option<Http2Config>,
    head_limit: Option<Duration>,
    /// Which timeout `head_limit` is, as a reason to close.
    head_reason: Reason,
    /// How long an HTTP/2 connection sent GOAWAY for idleness may take to close once no stream
    /// is open (the read handlers' `close_timeout`, as on the reactor).
    close_timeout: Duration,
    /// A request body with no progress for this long ends its request (`request_body_timeout`).
    body_timeout: Option<Duration>,
    /// TLS, when configured: every connection starts with a handshake.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    tls: Option<Tls>,
}

/// Serves one HTTP connection: HTTP/1.1, or HTTP/2 when its first bytes are the preface.
#[allow(clippy::too_many_arguments)]
async fn serve_http<A: Accept, S: ConnService>(
    stream: A::Io,
    fd: Option<RawFd>,
    place: Arc<Place>,
    svc: S,
    proxy: Option<ProxyHeader>,
    http: &Http,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) -> Reason {
    let accepted_at = tokio::time::Instant::now();
    let (proto, stream) = match &http.http2 {
        None => (Proto::Http1, A::plain(stream)),
        Some(_) => {
            let sniffed = async {
                match http.head_limit {
                    Some(t) => tokio::time::timeout(t, A::sniff(stream)).await.ok(),
                    None => Some(A::sniff(stream).await),
                }
            };
            tokio::select! {
                sniffed = sniffed => match sniffed {
                    Some(Ok(Some(s))) => s,
                    Some(Ok(None)) => return Reason::Closed,
                    Some(Err(_)) => return Reason::Error,
                    None => return http.head_reason,
                },
                // During a drain a new connection still gets its first request answered, if
                // it comes within the grace (it may have been accepted as the drain began).
                _ = async {
                    let _ = drain.wait_for(|d| *d).await;
                    tokio::time::sleep_until(accepted_at + crate::settings::FIRST_REQUEST_GRACE).await;
                } => return Reason::Closed,
                _ = cut.notified() => return Reason::Closed,
            }
        }
    };
    serve_proto(
        proto, stream, fd, place, svc, proxy, http, ctl, drain, cut, true,
    )
    .await
}

/// Serves one connection whose protocol is known: hyper's HTTP/2 connection (if HTTP/2 is
/// on), else its HTTP/1.1 one with upgrades; graceful shutdown on `drain`, a reset on `cut`;
/// `proxy` (a PROXY protocol header) in every request. `count`: its bytes are counted here
/// (`stream` is the socket itself, not TLS over a counted one). Why it closed.
#[allow(clippy::too_many_arguments)]
async fn serve_proto<IO, S>(
    proto: Proto,
    stream: IO,
    fd: Option<RawFd>,
    place: Arc<Place>,
    svc: S,
    proxy: Option<ProxyHeader>,
    http: &Http,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
    count: bool,
) -> Reason
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let age = http
        .max_age
        .map(|age| crate::rt::timer::deadline(Instant::now(), age));
    if let (Proto::Http2, Some(h2)) = (proto, &http.http2) {
        return match count {
            true => {
                let stream = crate::observe::count_io(stream);
                serve_h2(stream, fd, svc, proxy, http, h2, age, ctl, drain, cut).await
            }
            false => serve_h2(stream, fd, svc, proxy, http, h2, age, ctl, drain, cut).await,
        };
    }
    // The request-body timeout's view of the connection (see `service::BodyClock`).
    let clock = Arc::new(BodyClock::default());
    let io = TokioIo::new(BodyIo::new(stream, clock.clone(), place, count));
    let limits = (age.is_some() || http.max_requests != u64::MAX)
        .then(|| Arc::new(ConnLimits::new(age, http.max_requests)));
    let svc = Clocked::new(
        HyperSvc::new(svc).with_proxy(proxy),
        clock.clone(),
        ctl.clone(),
        limits.clone(),
    );
    let conn = http.http1.serve_connection(io, svc).with_upgrades();
    // Past its age, a connection idle for `AGE_IDLE_GRACE` is closed (a request in flight
    // then gets `Connection: close`, as the next one does in `Clocked`).
    let aged_idle = async {
        let (Some(l), Some(at)) = (&limits, age) else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(at.into()).await;
        loop {
            let seen = l.requests.load(Ordering::Relaxed);
            tokio::time::sleep(crate::limits::AGE_IDLE_GRACE).await;
            if l.requests.load(Ordering::Relaxed) == seen {
                if !l.told.swap(true, Ordering::Relaxed) {
                    ctl.limit_reached(Limit::Age);
                }
                return Reason::MaxConnectionAge;
            }
        }
    };
    let no_limit = std::future::pending::<()>();
    let conn = drive(
        conn,
        |c| c.graceful_shutdown(),
        aged_idle,
        no_limit,
        fd,
        &mut drain,
        &cut,
        http.head_reason,
    );
    let watch = async {
        let Some(limit) = http.body_timeout else {
            return std::future::pending().await;
        };
        loop {
            match clock.next_due(limit).await {
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => std::future::pending().await,
            }
            clock.check(Instant::now(), limit);
        }
    };
    let why = tokio::select! {
        why = conn => why,
        _ = watch => Reason::RequestBodyTimeout,
    };
    if clock.fired() {
        return Reason::RequestBodyTimeout;
    }
    match (why, limits.as_ref().and_then(|l| l.told_for.get())) {
        // Its last response said `Connection: close` for a limit.
        (Reason::Closed, Some(&limit)) => limit.into(),
        (why, _) => why,
    }
}

/// Serves one HTTP/2 connection (see [`serve_proto`]); why it closed.
#[allow(clippy::too_many_arguments)]
async fn serve_h2<IO, S>(
    stream: IO,
    fd: Option<RawFd>,
    svc: S,
    proxy: Option<ProxyHeader>,
    http: &Http,
    h2: &Http2Config,
    age: Option<Instant>,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) -> Reason
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let exec = StreamExec::new(http.max_requests);
    let streams = exec.0.clone();
    // Between hyper and the socket: the control-frame budget and the stalled-body watch.
    let meter = Arc::new(std::sync::Mutex::new(Meter::new(h2, http.body_timeout)));
    let io = TokioIo::new(Metered::new(stream, meter.clone()));
    let conn = h2.builder(exec).serve_connection(
        io,
        Http2Svc::new(
            HyperSvc::new(svc).with_proxy(proxy),
            ctl.clone(),
            meter.clone(),
        ),
    );
    let idle_timeout = async {
        match h2.idle_timeout {
            Some(t) => streams.idle_for(t).await,
            None => std::future::pending().await,
        }
    };
    // GOAWAY at the idle timeout, the connection's age, or its last stream.
    let idle = async {
        tokio::select! {
            _ = idle_timeout => Reason::IdleTimeout,
            _ = until(age) => {
                ctl.limit_reached(Limit::Age);
                Reason::MaxConnectionAge
            }
            _ = streams.reached() => {
                ctl.limit_reached(Limit::Requests);
                Reason::MaxRequests
            }
        }
    };
    // Once GOAWAY is sent, a client that holds the connection open (it never reads, or never
    // closes) is cut when no stream has been open for the close timeout.
    let closing = streams.idle_for(http.close_timeout);
    let conn = drive(
        conn,
        |c| c.graceful_shutdown(),
        idle,
        closing,
        fd,
        &mut drain,
        &cut,
        http.head_reason,
    );
    tokio::select! {
        why = conn => why,
        // A body stalled in the middle of a frame: the connection is dropped.
        _ = crate::http2::watch_bodies(meter) => Reason::RequestBodyTimeout,
    }
}

/// Drives a hyper connection (HTTP/1.1 or HTTP/2) to its end: `graceful_shutdown` once the
/// server drains or `idle` completes (HTTP/2's idle timeout: GOAWAY), then dropped if it has
/// not closed when `closing` completes (polled from the GOAWAY on); a reset of the socket `fd`
/// (when hop may touch it) when the drain deadline cuts it. Why it closed: what `idle` gave
/// (the reason for its GOAWAY), hyper's header timeout (`head_reason`), an error.
#[allow(clippy::too_many_arguments)]
async fn drive<C>(
    conn: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    idle: impl Future<Output = Reason>,
    closing_limit: impl Future<Output = ()>,
    fd: Option<RawFd>,
    drain: &mut watch::Receiver<bool>,
    cut: &tokio::sync::Notify,
    head_reason: Reason,
) -> Reason
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    tokio::pin!(idle);
    tokio::pin!(closing_limit);
    let mut closing = false;
    let mut goaway_for = Reason::Closed;
    loop {
        tokio::select! {
            // The connection first: a new one reads what is waiting before a drain's
            // `graceful_shutdown`, which would otherwise close it unanswered.
            biased;
            res = conn.as_mut() => {
                return match res {
                    Err(e) if e.is_timeout() => head_reason,
                    Err(e) => {
                        tracing::debug!(error = %e, "connection ended with an error");
                        Reason::Error
                    }
                    Ok(()) => goaway_for,
                };
            }
            _ = async { drain.wait_for(|d| *d).await.is_ok() }, if !closing => {
                closing = true;
                graceful_shutdown(conn.as_mut());
            }
            why = idle.as_mut(), if !closing => {
                tracing::debug!("connection idle or at a limit: closing gracefully (GOAWAY on HTTP/2)");
                closing = true;
                goaway_for = why;
                graceful_shutdown(conn.as_mut());
            }
            _ = closing_limit.as_mut(), if closing => {
                tracing::debug!("HTTP/2 connection not closed in time; closing");
                return goaway_for;
            }
            _ = cut.notified() => {
                if let Some(fd) = fd {
                    // SAFETY: the connection owns the socket and is alive here (`conn` is
                    // dropped after this returns), so the descriptor is open.
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                }
                return Reason::Closed;
            }
        }
    }
}

/// TLS: the configuration new handshakes use, and their time limit.
#[cfg(any(feature = "tls", feature = "tls-ring"))]
struct Tls {
    config: crate::tls::RustlsConfig,
    handshake_timeout: Duration,
}

/// Runs a new connection's TLS handshake under the handshake timeout, counting how it ends;
/// why not, if it failed, timed out, or the server is draining or cutting connections.
#[cfg(any(feature = "tls", feature = "tls-ring"))]
async fn tls_handshake<IO>(
    stream: IO,
    tls: &Tls,
    http2: bool,
    ctl: &Control,
    drain: &mut watch::Receiver<bool>,
    cut: &tokio::sync::Notify,
) -> Result<tokio_rustls::server::TlsStream<IO>, Reason>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.current(http2));
    let handshake = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream));
    tokio::select! {
        res = handshake => match res {
            Ok(Ok(stream)) => {
                ctl.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                Ok(stream)
            }
            Ok(Err(e)) => {
                ctl.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                crate::logs::tls_handshake_failed(&e);
                Err(Reason::Error)
            }
            Err(_) => {
                ctl.tls_handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("TLS handshake timed out");
                Err(Reason::TlsHandshakeTimeout)
            }
        },
        _ = async { drain.wait_for(|d| *d).await.is_ok() } => Err(Reason::Closed),
        _ = cut.notified() => Err(Reason::Closed),
    }
}

/// Serves one TLS connection: the handshake, then HTTP/2 if ALPN agreed on `h2`, else
/// HTTP/1.1, with a [`TlsInfo`](crate::tls::TlsInfo) in every request.
#[cfg(any(feature = "tls", feature = "tls-ring"))]
#[allow(clippy::too_many_arguments)]
async fn serve_tls<A: Accept, S: ConnService>(
    stream: A::Io,
    fd: Option<RawFd>,
    place: Arc<Place>,
    svc: S,
    proxy: Option<ProxyHeader>,
    http: &Http,
    tls: &Tls,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) -> Reason {
    let http2 = http.http2.is_some();
    // Counted under TLS: the bytes on the wire.
    let stream = crate::observe::count_io(stream);
    let stream = match tls_handshake(stream, tls, http2, &ctl, &mut drain, &cut).await {
        Ok(stream) => stream,
        Err(why) => return why,
    };
    let _tls = crate::limits::Gauged::new(crate::observe::Open::Tls);
    let conn = stream.get_ref().1;
    let proto = if http2 && conn.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        Proto::Http2
    } else {
        Proto::Http1
    };
    let svc = crate::tls::WithTlsInfo::new(svc, crate::tls::TlsInfo::new(conn.server_name(), conn));
    serve_proto(
        proto, stream, fd, place, svc, proxy, http, ctl, drain, cut, false,
    )
    .await
}

#[cfg(feature = "axum")]
mod replay {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::{Buf, Bytes};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A stream with bytes already read from it put back in front: a generic listener's
    /// connection after its first bytes were read to tell the protocol.
    pub(crate) struct Replay<T> {
        prefix: Bytes,
        io: T,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if !self.prefix.is_empty() {
                let n = self.prefix.len().min(buf.remaining());
                buf.put_slice(&self.prefix[..n]);
                self.prefix.advance(n);
                return Poll::Ready(Ok(()));
            }
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.io.is_write_vectored()
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    impl<T> Replay<T> {
        pub(crate) fn new(prefix: Bytes, io: T) -> Self {
            Replay { prefix, io }
        }
    }
}
