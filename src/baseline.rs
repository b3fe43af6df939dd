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
use crate::http2::{sniff, Http2Svc, Proto, PREFACE};
use crate::listener::{Bound, Native};
use crate::service::{ConnService, HyperSvc, IncomingStream};
use crate::settings::{Config, Control, Http2Config};

/// Releases a connection's slot however its task ends (finished, or aborted at the deadline).
struct ConnGuard {
    ctl: Arc<Control>,
    forcing: Arc<AtomicBool>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.ctl.release(self.forcing.load(Ordering::Acquire));
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
        http1,
        http2: cfg.http2.enabled.then(|| cfg.http2.clone()),
        head_limit: header_timeout,
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
    type Peer: std::fmt::Debug + Send;

    /// The connection as served over HTTP: the stream itself, or a generic listener's with the
    /// bytes read to tell the protocol put back in front.
    type Served: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection (cancel-safe: `select!` drops it whenever another branch wins).
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Peer)>> + Send;

    /// Sets up a new connection (socket options) and describes it to the app.
    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a Self::Peer) -> IncomingStream<'a>;

    /// The connection's descriptor, if hop may use it: TCP (a read handler's addresses, the
    /// reset of a connection cut at the drain deadline).
    fn tcp_fd(_io: &Self::Io) -> Option<RawFd> {
        None
    }

    /// Tells HTTP/1.1 from HTTP/2 by the connection's first bytes; `None` if it ends first.
    fn sniff(
        io: Self::Io,
    ) -> impl Future<Output = io::Result<Option<(Proto, Self::Served)>>> + Send;

    /// The connection as served when HTTP/2 is off.
    fn plain(io: Self::Io) -> Self::Served;
}

/// A TCP listener, with the settings its connections get.
struct TcpAccept {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    keepalive: Option<Duration>,
}

impl TcpAccept {
    /// Must be called inside the runtime.
    fn new(listener: std::net::TcpListener, cfg: &Config) -> io::Result<Self> {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        Ok(TcpAccept {
            local_addr: listener.local_addr()?,
            listener,
            keepalive: cfg.tcp_keepalive,
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

    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a SocketAddr) -> IncomingStream<'a> {
        let _ = io.set_nodelay(true);
        if let Some(t) = self.keepalive {
            let ka = socket2::TcpKeepalive::new().with_time(t);
            let _ = socket2::SockRef::from(io).set_tcp_keepalive(&ka);
        }
        let local = crate::service::local_addr_of(self.local_addr, || io.local_addr());
        IncomingStream::new(local, *peer)
    }

    fn tcp_fd(io: &Self::Io) -> Option<RawFd> {
        Some(io.as_raw_fd())
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
    loop {
        tokio::select! {
            _ = shutdown.notified() => break,
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = res {
                    if e.is_panic() {
                        ctl.contained_panic("a connection task", &*e.into_panic());
                    }
                }
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if !ctl.admit(cfg.max_connections) {
                    continue;
                }
                let guard = ConnGuard { ctl: ctl.clone(), forcing: forcing.clone() };
                // The make-service is user code: a panic in it costs this connection only.
                let accepted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    app.accept(listener.incoming(&stream, &peer))
                }));
                let accepted = match accepted {
                    Ok(a) => a,
                    Err(panic) => {
                        ctl.contained_panic("the make-service", &*panic);
                        continue;
                    }
                };
                let svc = match accepted {
                    Some(NewConn::Http(svc)) => svc,
                    Some(NewConn::Tcp(handler)) => {
                        let conn = crate::handler::Conn::new(A::tcp_fd(&stream), &tcp);
                        let core = ConnCore::new(handler, conn, Default::default(), tcp.clone(), Instant::now());
                        let drain = drain_rx.clone();
                        #[cfg(any(feature = "tls", feature = "tls-ring"))]
                        if http.tls.is_some() {
                            let http = http.clone();
                            let ctl = ctl.clone();
                            tasks.spawn(async move {
                                let _guard = guard;
                                let Some(tls) = &http.tls else { return };
                                let mut hs_drain = drain.clone();
                                let never = tokio::sync::Notify::new();
                                let Some(stream) = tls_handshake(stream, tls, false, &ctl, &mut hs_drain, &never).await else {
                                    return;
                                };
                                crate::handler::run_task(core, stream, drain).await;
                            });
                            continue;
                        }
                        tasks.spawn(async move {
                            let _guard = guard;
                            crate::handler::run_task(core, stream, drain).await;
                        });
                        continue;
                    }
                    None => {
                        tracing::error!(?peer, "the make-service was not ready; closing");
                        continue;
                    }
                };
                let http = http.clone();
                let drain = drain_rx.clone();
                let cut = Arc::new(tokio::sync::Notify::new());
                let fd = A::tcp_fd(&stream);
                let ctl = ctl.clone();
                tasks.spawn(server::with_cut(cut.clone(), async move {
                    let _guard = guard;
                    #[cfg(any(feature = "tls", feature = "tls-ring"))]
                    if let Some(tls) = &http.tls {
                        serve_tls::<A, _>(stream, fd, svc, &http, tls, ctl, drain, cut).await;
                        return;
                    }
                    serve_http::<A, _>(stream, fd, svc, &http, ctl, drain, cut).await;
                }));
            }
        }
    }
    drop(listener);
    let mut hijacked = ctx.tasks.subscribe();
    // Hijacked connections left their HTTP task's count when they were upgraded: those open
    // when the drain starts are counted here, as drained if they finish in time, as forced if
    // they are cut. (Read before the drain is announced, which they answer at once.)
    let hijacked_at_drain = *hijacked.borrow();
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
        tasks.shutdown().await;
        // Hijacked connections still running are cut when the runtime stops; their HTTP tasks
        // released them already, so they are counted here.
        let cut = *hijacked.borrow();
        ctl.forced.fetch_add(cut as u64, Ordering::Relaxed);
        let finished = hijacked_at_drain.saturating_sub(cut);
        ctl.drained.fetch_add(finished as u64, Ordering::Relaxed);
    } else {
        ctl.drained
            .fetch_add(hijacked_at_drain as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Open HTTP/2 streams of one connection.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    /// Streams started so far (an idle period ends with any new one).
    started: AtomicUsize,
    /// Told when the last open stream ends.
    idle: tokio::sync::Notify,
}

/// HTTP/2's executor here: each stream a tokio task, counted open until it ends.
#[derive(Clone, Default)]
struct StreamExec(Arc<Streams>);

/// Counts a stream closed however its task ends.
struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        self.0.started.fetch_add(1, Ordering::Relaxed);
        let guard = StreamGuard(self.0.clone());
        tokio::spawn(async move {
            let _guard = guard;
            fut.await
        });
    }
}

impl Streams {
    /// Completes once no stream has been open for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            while self.open.load(Ordering::Acquire) > 0 {
                self.idle.notified().await;
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

/// How HTTP connections are served: hyper's `http1` builder, the HTTP/2 settings if HTTP/2 is
/// on, and how long a new connection may take to send its first bytes.
struct Http {
    http1: hyper::server::conn::http1::Builder,
    http2: Option<Http2Config>,
    head_limit: Option<Duration>,
    /// TLS, when configured: every connection starts with a handshake.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    tls: Option<Tls>,
}

/// Serves one HTTP connection: HTTP/1.1, or HTTP/2 when its first bytes are the preface.
#[allow(clippy::too_many_arguments)]
async fn serve_http<A: Accept, S: ConnService>(
    stream: A::Io,
    fd: Option<RawFd>,
    svc: S,
    http: &Http,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) {
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
                    // Closed, failed, or silent past the time limit.
                    _ => return,
                },
                _ = async { drain.wait_for(|d| *d).await.is_ok() } => return,
                _ = cut.notified() => return,
            }
        }
    };
    serve_proto(proto, stream, fd, svc, http, ctl, drain, cut).await;
}

/// Serves one connection whose protocol is known: hyper's HTTP/2 connection (if HTTP/2 is
/// on), else its HTTP/1.1 one with upgrades; graceful shutdown on `drain`, a reset on `cut`.
#[allow(clippy::too_many_arguments)]
async fn serve_proto<IO, S>(
    proto: Proto,
    stream: IO,
    fd: Option<RawFd>,
    svc: S,
    http: &Http,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    if let (Proto::Http2, Some(h2)) = (proto, &http.http2) {
        let exec = StreamExec::default();
        let streams = exec.0.clone();
        let conn = h2
            .builder(exec)
            .serve_connection(TokioIo::new(stream), Http2Svc::new(HyperSvc::new(svc), ctl));
        let idle = async {
            match h2.idle_timeout {
                Some(t) => streams.idle_for(t).await,
                None => std::future::pending().await,
            }
        };
        drive(conn, |c| c.graceful_shutdown(), idle, fd, &mut drain, &cut).await;
        return;
    }
    let conn = http
        .http1
        .serve_connection(TokioIo::new(stream), HyperSvc::new(svc))
        .with_upgrades();
    let no_idle = std::future::pending();
    drive(
        conn,
        |c| c.graceful_shutdown(),
        no_idle,
        fd,
        &mut drain,
        &cut,
    )
    .await;
}

/// Drives a hyper connection (HTTP/1.1 or HTTP/2) to its end: `graceful_shutdown` once the
/// server drains or `idle` completes (HTTP/2's idle timeout: GOAWAY), a reset of the socket
/// `fd` (when hop may touch it) when the drain deadline cuts it.
async fn drive<C, E>(
    conn: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    idle: impl Future<Output = ()>,
    fd: Option<RawFd>,
    drain: &mut watch::Receiver<bool>,
    cut: &tokio::sync::Notify,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = async { drain.wait_for(|d| *d).await.is_ok() }, if !closing => {
                closing = true;
                graceful_shutdown(conn.as_mut());
            }
            _ = idle.as_mut(), if !closing => {
                tracing::debug!("HTTP/2 connection idle: sending GOAWAY");
                closing = true;
                graceful_shutdown(conn.as_mut());
            }
            _ = cut.notified() => {
                if let Some(fd) = fd {
                    // SAFETY: the connection owns the socket and is alive here (`conn` is
                    // dropped after this returns), so the descriptor is open.
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                }
                return;
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
/// `None` if it failed, timed out, or the server is draining or cutting connections.
#[cfg(any(feature = "tls", feature = "tls-ring"))]
async fn tls_handshake<IO>(
    stream: IO,
    tls: &Tls,
    http2: bool,
    ctl: &Control,
    drain: &mut watch::Receiver<bool>,
    cut: &tokio::sync::Notify,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.current(http2));
    let handshake = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream));
    tokio::select! {
        res = handshake => match res {
            Ok(Ok(stream)) => {
                ctl.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                Some(stream)
            }
            Ok(Err(e)) => {
                ctl.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                ctl.tls_handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("TLS handshake timed out");
                None
            }
        },
        _ = async { drain.wait_for(|d| *d).await.is_ok() } => None,
        _ = cut.notified() => None,
    }
}

/// Serves one TLS connection: the handshake, then HTTP/2 if ALPN agreed on `h2`, else
/// HTTP/1.1, with a [`TlsInfo`](crate::tls::TlsInfo) in every request.
#[cfg(any(feature = "tls", feature = "tls-ring"))]
#[allow(clippy::too_many_arguments)]
async fn serve_tls<A: Accept, S: ConnService>(
    stream: A::Io,
    fd: Option<RawFd>,
    svc: S,
    http: &Http,
    tls: &Tls,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) {
    let http2 = http.http2.is_some();
    let Some(stream) = tls_handshake(stream, tls, http2, &ctl, &mut drain, &cut).await else {
        return;
    };
    let conn = stream.get_ref().1;
    let proto = if http2 && conn.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        Proto::Http2
    } else {
        Proto::Http1
    };
    let svc = crate::tls::WithTlsInfo::new(svc, crate::tls::TlsInfo::new(conn));
    serve_proto(proto, stream, fd, svc, http, ctl, drain, cut).await;
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
