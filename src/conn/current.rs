//! The connection being driven, lent to its poller thread for the length of its drive.
//!
//! hyper calls back into hop while a connection is polled (the service wrapper, the response
//! body when hyper is done with it), and handlers call into hop from inside that poll ([`crate::Hijack::on_read`],
//! [`crate::sse::Subscription::response`]). What they record belongs to the connection: it is
//! the [`Current`] on the connection's slab entry, lent to the thread for the drive (a pointer
//! to it, taken back when the drive ends or unwinds). Nothing else holds it and no table is
//! keyed by connection; code running for another connection, or off the poller, sees no `Current`
//! and takes its own path.

use std::cell::Cell;

use super::takeover::Takeover;
use crate::rt::wake::Key;

/// What a connection's drive can record: see the module docs.
#[derive(Default)]
pub(crate) struct Current {
    pub(crate) key: Key,
    /// Requests dispatched to the service on this connection.
    pub(crate) requests: u64,
    /// Requests whose response hyper has not finished (dropped the body of).
    pub(crate) in_flight: u32,
    /// The last request came with a body, which hyper may still be reading.
    pub(crate) body_pending: bool,
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
}

thread_local! {
    /// The lent [`Current`], or null. Taken out (set to null) while code uses it, so a nested
    /// use sees none.
    static CURRENT: Cell<*mut Current> = const { Cell::new(std::ptr::null_mut()) };
}

/// Lends `cur` to this thread while `f` runs, and takes it back after (also if `f` panics).
///
/// Lent by pointer: moving it onto the thread and back costs a copy of the whole `Current` per
/// drive, measurable per request (callgrind, about 200 instructions a keep-alive request).
pub(crate) fn lend<R>(cur: &mut Current, f: impl FnOnce() -> R) -> R {
    struct Restore(*mut Current);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let prev = CURRENT.with(|c| c.replace(cur as *mut Current));
    let _restore = Restore(prev);
    f()
}

/// Runs `f` on the lent [`Current`], whichever connection it is.
pub(crate) fn with_any<R>(f: impl FnOnce(&mut Current) -> R) -> Option<R> {
    CURRENT.with(|c| {
        let p = c.replace(std::ptr::null_mut());
        if p.is_null() {
            return None;
        }
        struct PutBack<'a>(&'a Cell<*mut Current>, *mut Current);
        impl Drop for PutBack<'_> {
            fn drop(&mut self) {
                self.0.set(self.1);
            }
        }
        let _put_back = PutBack(c, p);
        // SAFETY: `p` was set by `lend` from a `&mut Current` that `lend` holds borrowed until
        // it restores the previous pointer, so it is valid and nothing else uses it meanwhile;
        // and it is taken out of the cell while `f` runs, so this is its only use.
        Some(f(unsafe { &mut *p }))
    })
}

/// Runs `f` on the lent [`Current`] of connection `key`; `None` if `key` is not the connection
/// being driven on this thread.
pub(crate) fn with<R>(key: Key, f: impl FnOnce(&mut Current) -> R) -> Option<R> {
    with_any(|c| (c.key == key).then(|| f(c))).flatten()
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
