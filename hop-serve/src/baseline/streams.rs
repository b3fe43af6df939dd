//! HTTP/2's executor on the tokio backend ([`StreamExec`]): each stream a tokio task, counted
//! open while it runs ([`Streams`]), so that its connection can tell when no stream has been
//! open for its idle or close timeout, and when `max_requests_per_connection` streams have
//! started.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Open HTTP/2 streams of one connection.
pub(super) struct Streams {
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
pub(super) struct StreamExec(pub(super) Arc<Streams>);

impl StreamExec {
    pub(super) fn new(max: u64) -> Self {
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

impl Streams {
    /// Completes once `max_requests_per_connection` streams have started.
    pub(super) async fn reached(&self) {
        if self.max == u64::MAX {
            return std::future::pending().await;
        }
        self.reached.notified().await
    }

    /// Completes once no stream has been open for `limit`.
    pub(super) async fn idle_for(&self, limit: Duration) {
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
