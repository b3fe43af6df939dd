//! Running a server: the [`Serve`] future and [`WithGracefulShutdown`] (`.await` them, or
//! `run` them on a runtime of their own), and the [`Handle`] that reads the counters and stops
//! one. `serve_until` picks the backend (builder first, then `HOP_BACKEND`, then the reactor),
//! finds or starts the tokio runtime that handlers run in, starts the backend, and waits for
//! the shutdown signal (or a `Handle`'s shutdown) and for the drain to finish.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::listener::Bound;
use crate::service::app::App;
use crate::settings::{Backend, Config, Control, Stats};

/// A handle on a server: its address, its counters, and a way to stop it.
///
/// ```
/// # #[tokio::main]
/// # async fn main() -> std::io::Result<()> {
/// let app = axum::Router::new();
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let serve = hop::serve(listener, app);
/// let handle = serve.handle();
/// # let (addr, probe) = (serve.local_addr()?, handle.clone());
/// # assert_eq!(handle.local_addr(), Some(addr));
/// # let (done, client_done) = tokio::sync::oneshot::channel::<()>();
/// # let client = std::thread::spawn(move || {
/// #     use std::io::{Read, Write};
/// #     let mut s = std::net::TcpStream::connect(addr).unwrap();
/// #     s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
/// #     let mut answer = String::new();
/// #     s.read_to_string(&mut answer).unwrap();
/// #     let _ = done.send(());
/// #     answer
/// # });
/// tokio::spawn(async move {
/// #   let _ = client_done.await; // the hidden client's request first: the sleep alone races it
///     tokio::time::sleep(std::time::Duration::from_secs(1)).await;
///     handle.shutdown()
/// });
/// serve.await
/// # ?;
/// # let answer = client.join().unwrap();
/// # assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
/// # let stats = probe.stats();
/// # assert_eq!((stats.accepted, stats.http1_requests), (1, 1));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Handle {
    ctl: Arc<Control>,
    drain_timeout: Duration,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Handle {
    /// Starts a graceful shutdown, as the signal given to `with_graceful_shutdown` would.
    pub fn shutdown(&self) {
        self.ctl.shutdown(crate::rt::timer::deadline(
            Instant::now(),
            self.drain_timeout,
        ));
    }

    /// The server's counters now.
    pub fn stats(&self) -> Stats {
        self.ctl.stats()
    }

    /// Reactor: how many times each poller has driven a connection or a local task, by poller
    /// (its share of the work); empty on the tokio backend. Counted as each poller goes on, so
    /// a figure may trail by the poller's current turn.
    pub fn poller_work(&self) -> Vec<u64> {
        self.ctl.poller_work.get().map_or_else(Vec::new, |w| {
            w.iter()
                .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
                .collect()
        })
    }

    /// The address the server listens on; `None` for a Unix socket, or a generic listener
    /// whose address is not a `SocketAddr`.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        *self
            .ctl
            .local_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// A server ready to run: `.await` it, or [`run`](Serve::run) it.
#[must_use = "a server does nothing until it is awaited or run"]
pub struct Serve<P> {
    pub(super) cfg: Config,
    pub(super) listener: io::Result<Bound>,
    pub(super) app: P,
    pub(super) ctl: Arc<Control>,
}

impl<P> fmt::Debug for Serve<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve").field("cfg", &self.cfg).finish()
    }
}

impl<P: App> Serve<P> {
    /// Stops accepting when `signal` completes, lets in-flight requests finish, closes idle
    /// connections, and force-closes what is left after the drain timeout.
    pub fn with_graceful_shutdown<F>(self, signal: F) -> WithGracefulShutdown<P, F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        WithGracefulShutdown {
            serve: self,
            signal,
        }
    }

    /// A handle that reads the counters and can stop the server.
    pub fn handle(&self) -> Handle {
        Handle {
            ctl: self.ctl.clone(),
            drain_timeout: self.cfg.drain_timeout,
        }
    }

    /// The address the listener is bound to; an `Unsupported` error for a Unix socket, or a
    /// generic listener whose address is not a `SocketAddr`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Ok(l) => l.local_addr(),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// Runs the server on this thread until it stops; needs no runtime. Handlers' tokio calls
    /// use a background runtime with `compat_workers` threads.
    pub fn run(self) -> io::Result<()> {
        self.cfg.validate()?;
        run_blocking(self.cfg.compat_workers, self.into_future())
    }
}

impl<P: App> IntoFuture for Serve<P> {
    type Output = io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(serve_until(self, std::future::pending()))
    }
}

/// A server with a graceful-shutdown signal; see [`Serve::with_graceful_shutdown`].
#[must_use = "a server does nothing until it is awaited or run"]
pub struct WithGracefulShutdown<P, F> {
    serve: Serve<P>,
    signal: F,
}

impl<P, F> fmt::Debug for WithGracefulShutdown<P, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithGracefulShutdown")
            .finish_non_exhaustive()
    }
}

impl<P, F> WithGracefulShutdown<P, F>
where
    P: App,
    F: Future<Output = ()> + Send + 'static,
{
    /// A handle that reads the counters and can stop the server.
    pub fn handle(&self) -> Handle {
        self.serve.handle()
    }

    /// Runs the server on this thread until it stops; needs no runtime.
    pub fn run(self) -> io::Result<()> {
        self.serve.cfg.validate()?;
        run_blocking(self.serve.cfg.compat_workers, self.into_future())
    }
}

impl<P, F> IntoFuture for WithGracefulShutdown<P, F>
where
    P: App,
    F: Future<Output = ()> + Send + 'static,
{
    type Output = io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(serve_until(self.serve, self.signal))
    }
}

fn run_blocking(
    workers: usize,
    fut: Pin<Box<dyn Future<Output = io::Result<()>> + Send>>,
) -> io::Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(io::Error::other(
            "Serve::run blocks: call it outside a tokio runtime, or .await the server instead",
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("hop-compat")
        .enable_all()
        .build()?
        .block_on(fut)
}

/// Stops the backend at once if the serve future is dropped before it finished.
struct AbortOnDrop(Arc<Control>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.shutdown(Instant::now());
    }
}

/// How often a drain logs what it still waits for.
const DRAIN_LOG_EVERY: Duration = Duration::from_secs(5);

async fn serve_until<P, F>(serve: Serve<P>, signal: F) -> io::Result<()>
where
    P: App,
    F: Future<Output = ()> + Send,
{
    let Serve {
        cfg,
        listener,
        app,
        ctl,
    } = serve;
    cfg.validate()?;
    let listener = listener?;
    let backend = cfg
        .backend
        .or_else(Backend::from_env)
        .unwrap_or(Backend::Reactor);
    let drain_timeout = cfg.drain_timeout;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let _abort = AbortOnDrop(ctl.clone());
    // Keeps a runtime we had to start alive until the server is done.
    let mut own_runtime = None;
    let unix_path = match &listener {
        Bound::Native(crate::listener::Native::Unix(l)) => l.local_addr().ok(),
        _ => None,
    };
    match (backend, listener) {
        #[cfg(feature = "axum")]
        (_, Bound::Generic(_)) if cfg.proxy_protocol => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "hop: proxy_protocol: needs a TCP or Unix listener, not a generic axum Listener",
            ));
        }
        #[cfg(feature = "axum")]
        (_, Bound::Generic(listener)) => {
            // hop cannot see the socket: hyper-util on tokio tasks, whatever the backend.
            tracing::info!(
                listener = listener.type_name(),
                "a generic axum Listener: its connections are served on tokio tasks (hyper-util), whatever the backend"
            );
            #[cfg(feature = "tokio-baseline")]
            crate::baseline::start(&cfg, Bound::Generic(listener), app, ctl.clone(), done_tx)?;
            #[cfg(not(feature = "tokio-baseline"))]
            {
                drop((listener, app, done_tx));
                return Err(io::Error::other(
                    "serving a generic axum Listener needs hop-serve's `tokio-baseline` feature",
                ));
            }
        }
        (Backend::Reactor, Bound::Native(listener)) => {
            let handle = match tokio::runtime::Handle::try_current() {
                Ok(h) => h,
                Err(_) => {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(cfg.compat_workers)
                        .thread_name("hop-compat")
                        .enable_all()
                        .build()?;
                    let h = rt.handle().clone();
                    own_runtime = Some(rt);
                    h
                }
            };
            crate::reactor::start(&cfg, listener, app, ctl.clone(), handle, done_tx)?;
        }
        (Backend::Tokio, Bound::Native(listener)) => {
            #[cfg(feature = "tokio-baseline")]
            crate::baseline::start(&cfg, Bound::Native(listener), app, ctl.clone(), done_tx)?;
            #[cfg(not(feature = "tokio-baseline"))]
            {
                drop((listener, app, done_tx));
                return Err(io::Error::other(
                    "the tokio backend needs hop-serve's `tokio-baseline` feature",
                ));
            }
        }
    }
    match unix_path {
        Some(path) => tracing::info!(%backend, unix = ?path, "hop serving"),
        None => {
            tracing::info!(%backend, addr = ?ctl.local_addr.lock().unwrap_or_else(|e| e.into_inner()), "hop serving")
        }
    }
    let mut done_rx = done_rx;
    // A drain started by a `Handle` is logged as one started by the signal is.
    let by_handle = Arc::new(tokio::sync::Notify::new());
    {
        let n = by_handle.clone();
        ctl.on_shutdown(Box::new(move || n.notify_one()));
    }
    let draining = tokio::select! {
        _ = signal => {
            tracing::info!(
                "shutdown signal received; draining for up to {drain_timeout:?}: {} open",
                ctl.open.now()
            );
            ctl.shutdown(crate::rt::timer::deadline(Instant::now(), drain_timeout));
            true
        }
        _ = by_handle.notified() => {
            tracing::info!(
                "shutdown requested; draining for up to {drain_timeout:?}: {} open",
                ctl.open.now()
            );
            true
        }
        _ = &mut done_rx => false,
    };
    if draining {
        // What the drain still waits for, now and then.
        let mut every =
            tokio::time::interval_at((Instant::now() + DRAIN_LOG_EVERY).into(), DRAIN_LOG_EVERY);
        loop {
            tokio::select! {
                _ = &mut done_rx => break,
                _ = every.tick() => {
                    tracing::info!("draining: {} still open", ctl.open.now());
                }
            }
        }
    }
    let stats = ctl.stats();
    tracing::info!(
        drained = stats.drained,
        forced = stats.forced,
        "hop stopped"
    );
    if let Some(rt) = own_runtime {
        rt.shutdown_background();
    }
    Ok(())
}
