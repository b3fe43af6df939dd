//! The server a thread serves, for code that runs a read handler away from its connection's
//! drive (a hijack on the tokio backend, an SSE subscriber served as a body): the read-handler
//! settings, the graceful-shutdown signal and the count of such tasks the drain waits for, and
//! (tokio backend) each connection task's cut signal, and the server's counters for what read
//! handlers count. Backends set it; `hijack`, `sse` and `ws` read it.

use std::cell::RefCell;
use std::sync::Arc;

use super::TcpConfig;
use crate::settings::Control;

thread_local! {
    /// The server whose thread this is: settings, and (tokio backend) its shutdown signal.
    static CONTEXT: RefCell<Option<ServerContext>> = const { RefCell::new(None) };
}

tokio::task_local! {
    /// Set in each connection task of the tokio backend: notified, the task drops its
    /// connection at once (with a reset). How a response that can no longer complete (a dropped
    /// SSE subscriber whose peer is not reading) is cut where hyper would wait for the socket.
    static CUT: Arc<tokio::sync::Notify>;
}

/// Runs a tokio-backend connection task with its cut signal in reach of its handlers.
#[cfg(feature = "tokio-baseline")]
pub(crate) async fn with_cut<F: std::future::Future>(
    cut: Arc<tokio::sync::Notify>,
    task: F,
) -> F::Output {
    CUT.scope(cut, task).await
}

/// The cut signal of the connection task this runs in (tokio backend), if any.
pub(crate) fn cut_signal() -> Option<Arc<tokio::sync::Notify>> {
    CUT.try_with(Arc::clone).ok()
}

/// What a hijack needs to know about the server it happens in.
#[derive(Clone, Debug)]
pub(crate) struct ServerContext {
    pub(crate) tcp: Arc<TcpConfig>,
    /// Turns `true` when a graceful shutdown starts.
    pub(crate) shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    /// Hijacked connections running as tasks (tokio backend), which the drain waits for.
    pub(crate) tasks: Arc<tokio::sync::watch::Sender<usize>>,
    /// Turns `true` when the drain timeout runs out: hijacked tasks still running are cut then
    /// (dropped, which tells their handlers and counts them forced), not left to finish.
    pub(crate) force: Arc<tokio::sync::watch::Sender<bool>>,
    /// The server's counters, for what read handlers count (`Stats::ws_ping_timeouts`).
    pub(crate) ctl: Option<Arc<Control>>,
}

/// Records the server context for hijacks made on this thread (poller and worker threads
/// call it at start).
pub(crate) fn set_thread_context(ctx: ServerContext) {
    CONTEXT.with(|c| *c.borrow_mut() = Some(ctx));
}

pub(crate) fn thread_context() -> ServerContext {
    CONTEXT
        .with(|c| c.borrow().clone())
        .unwrap_or_else(|| ServerContext {
            tcp: Arc::new(TcpConfig::default()),
            shutdown: None,
            tasks: Arc::new(tokio::sync::watch::Sender::new(0)),
            force: Arc::new(tokio::sync::watch::Sender::new(false)),
            ctl: None,
        })
}

/// Counts a WebSocket closed for missing its keep-alive deadline in the stats of this
/// thread's server (a thread without one counts nowhere), and gives it as `conn`'s reason to
/// close.
pub(crate) fn count_ws_ping_timeout(conn: &mut super::Conn) {
    #[cfg(feature = "metrics")]
    {
        conn.why = Some(crate::observe::Reason::WsPingTimeout);
    }
    let _ = conn;
    CONTEXT.with(|c| {
        if let Some(ctl) = c.borrow().as_ref().and_then(|ctx| ctx.ctl.as_ref()) {
            ctl.ws_ping_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
}

/// Counts a connection told to close by a limit in the stats of this thread's server.
pub(crate) fn count_limit(why: crate::limits::Limit) {
    CONTEXT.with(|c| {
        if let Some(ctl) = c.borrow().as_ref().and_then(|ctx| ctx.ctl.as_ref()) {
            ctl.limit_reached(why);
        }
    });
}

/// The open-connection gauges of this thread's server, if it has one.
pub(crate) fn open_counts() -> Option<Arc<crate::limits::OpenCounts>> {
    CONTEXT.with(|c| {
        c.borrow()
            .as_ref()
            .and_then(|ctx| ctx.ctl.as_ref())
            .map(|ctl| ctl.open.clone())
    })
}

/// Resolves when this thread's server starts a graceful shutdown; never for a thread without
/// one.
pub(crate) async fn shutdown_signal(ctx: Option<tokio::sync::watch::Receiver<bool>>) {
    match ctx {
        Some(mut rx) => {
            let _ = rx.wait_for(|v| *v).await;
        }
        None => std::future::pending().await,
    }
}

/// The shutdown signal of this thread's server, if it has one.
pub(crate) fn thread_shutdown() -> Option<tokio::sync::watch::Receiver<bool>> {
    thread_context().shutdown
}

/// Counts a hijacked task until it ends.
pub(crate) struct TaskGuard(Arc<tokio::sync::watch::Sender<usize>>);

impl TaskGuard {
    pub(crate) fn new(tasks: Arc<tokio::sync::watch::Sender<usize>>) -> Self {
        tasks.send_modify(|n| *n += 1);
        TaskGuard(tasks)
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}
