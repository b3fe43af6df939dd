//! The connection being driven, lent to its poller thread for the length of its drive.
//!
//! hyper calls back into hop while a connection is polled (its timer, the service wrapper), and
//! handlers call into hop from inside that poll ([`crate::Hijack::on_read`],
//! [`crate::sse::Subscription::response`]). What they record belongs to the connection: it is
//! the [`Current`] on the connection's slab entry, moved onto the thread before the drive and
//! moved back after it (also when the drive unwinds). Nothing is shared and no table is keyed
//! by connection; code running for another connection, or off the poller, sees no `Current`
//! and takes its own path.

use std::cell::RefCell;
use std::time::Instant;

use super::takeover::Takeover;
use crate::rt::wake::Key;

/// What a connection's drive can record: see the module docs.
#[derive(Default)]
pub(crate) struct Current {
    pub(crate) key: Key,
    /// hyper holds a header-read sleep: it is waiting for a request head.
    pub(crate) head_wait: bool,
    /// Requests dispatched to the service on this connection.
    pub(crate) requests: u64,
    /// The earliest time something polled in this drive asked to be polled again.
    pub(crate) due: Option<Instant>,
    /// A read handler waiting to take the connection over.
    pub(crate) takeover: Option<Takeover>,
}

impl Current {
    pub(crate) fn new(key: Key) -> Self {
        Current {
            key,
            ..Current::default()
        }
    }

    /// Asks for a poll at `at` (the earliest asked wins).
    pub(crate) fn wake_at(&mut self, at: Instant) {
        if self.due.is_none_or(|d| at < d) {
            self.due = Some(at);
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

/// Lends `cur` to this thread while `f` runs, and takes it back after (also if `f` panics).
pub(crate) fn lend<R>(cur: &mut Current, f: impl FnOnce() -> R) -> R {
    struct Back<'a> {
        cur: &'a mut Current,
        prev: Option<Current>,
    }
    impl Drop for Back<'_> {
        fn drop(&mut self) {
            let lent = CURRENT.with(|c| c.replace(self.prev.take()));
            if let Some(lent) = lent {
                *self.cur = lent;
            }
        }
    }
    let prev = CURRENT.with(|c| c.replace(Some(std::mem::take(cur))));
    let _back = Back { cur, prev };
    f()
}

/// Runs `f` on the lent [`Current`] of connection `key`; `None` if `key` is not the connection
/// being driven on this thread.
pub(crate) fn with<R>(key: Key, f: impl FnOnce(&mut Current) -> R) -> Option<R> {
    CURRENT.with(|c| match &mut *c.borrow_mut() {
        Some(cur) if cur.key == key => Some(f(cur)),
        _ => None,
    })
}

/// Runs `f` on the lent [`Current`], whichever connection it is.
pub(crate) fn with_any<R>(f: impl FnOnce(&mut Current) -> R) -> Option<R> {
    CURRENT.with(|c| c.borrow_mut().as_mut().map(f))
}

/// The connection being driven on this thread, if any.
pub(crate) fn key() -> Option<Key> {
    with_any(|c| c.key)
}

/// Leaves `takeover` with connection `key` if it is the one being driven on this thread;
/// hands it back otherwise.
pub(crate) fn set_takeover(key: Key, takeover: Takeover) -> Result<(), Takeover> {
    let mut takeover = Some(takeover);
    let old = with(key, |c| std::mem::replace(&mut c.takeover, takeover.take()));
    match takeover {
        Some(t) => Err(t),
        // A replaced takeover (a second one on the same connection) is dropped here, out of
        // the borrow: dropping it runs a handler's `Drop`.
        None => {
            drop(old);
            Ok(())
        }
    }
}
