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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::app::{App, NewConn};
use crate::handler::context::{self as server, ServerContext};
use crate::handler::ConnCore;
use crate::listener::{Bound, Native};
use crate::service::{HyperSvc, IncomingStream};
use crate::settings::{Config, Control};

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
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("hop-tokio-main".into())
        .spawn(move || {
            let res = rt.block_on(async move {
                let http1 = Arc::new(http1);
                // Each kind of listener gets its own accept loop (the TCP path's streams are
                // not boxed).
                match listener {
                    Bound::Native(Native::Tcp(l)) => {
                        let l = TcpAccept::new(l, &cfg)?;
                        accept_loop(cfg, l, app, ctl, http1, ctx, drain_tx).await
                    }
                    Bound::Native(Native::Unix(l)) => {
                        let l = tokio::net::UnixListener::from_std(l)?;
                        accept_loop(cfg, l, app, ctl, http1, ctx, drain_tx).await
                    }
                    #[cfg(feature = "axum")]
                    Bound::Generic(l) => accept_loop(cfg, l, app, ctl, http1, ctx, drain_tx).await,
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

    /// The next connection (cancel-safe: `select!` drops it whenever another branch wins).
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Peer)>> + Send;

    /// Sets up a new connection (socket options) and describes it to the app.
    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a Self::Peer) -> IncomingStream<'a>;

    /// The connection's descriptor, if hop may use it: TCP (a read handler's addresses, the
    /// reset of a connection cut at the drain deadline).
    fn tcp_fd(_io: &Self::Io) -> Option<RawFd> {
        None
    }
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
    http1: Arc<hyper::server::conn::http1::Builder>,
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
                let http1 = http1.clone();
                let mut drain = drain_rx.clone();
                let cut = Arc::new(tokio::sync::Notify::new());
                let fd = A::tcp_fd(&stream);
                tasks.spawn(server::with_cut(cut.clone(), async move {
                    let _guard = guard;
                    let conn = http1
                        .serve_connection(TokioIo::new(stream), HyperSvc::new(svc))
                        .with_upgrades();
                    tokio::pin!(conn);
                    let mut draining = false;
                    loop {
                        tokio::select! {
                            res = conn.as_mut() => {
                                if let Err(e) = res {
                                    tracing::debug!(error = %e, "connection ended with an error");
                                }
                                break;
                            }
                            _ = async { drain.wait_for(|d| *d).await.is_ok() }, if !draining => {
                                draining = true;
                                conn.as_mut().graceful_shutdown();
                            }
                            _ = cut.notified() => {
                                if let Some(fd) = fd {
                                    // SAFETY: `conn` owns the socket and is alive here, so the
                                    // descriptor is open.
                                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                                    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                                }
                                break;
                            }
                        }
                    }
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
