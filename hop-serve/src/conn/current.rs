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
use crate::limits::Limit;
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
    /// The last request's handler has produced its response (its head may be out): a stalled
    /// body then closes the connection instead of answering `408`. Kept for requests with a
    /// body only.
    pub(crate) responded: bool,
    /// The last request asked `Expect: 100-continue`: its client sends no body until hyper
    /// answers `100`, which hyper does only once the handler reads the body.
    pub(crate) expect_continue: bool,
    /// The last request's body length (`content-length`), if it came with one and a body.
    pub(crate) body_len: Option<u64>,
    /// At most the size of the last request's head, for telling how much of what was read is
    /// body (see `conn::http`'s request-body timeout).
    pub(crate) head_len: u64,
    /// A read handler waiting to take the connection over.
    pub(crate) takeover: Option<Takeover>,
    /// The request (counted as `requests` is) whose response carries `Connection: close`, and
    /// which limit asked for it (`max_requests_per_connection`, `max_connection_age`);
    /// `u64::MAX`: none.
    pub(crate) close_at: u64,
    pub(crate) close_for: Option<Limit>,
    /// A response body may be sent by `sendfile(2)` (a plain HTTP/1.1 connection: no TLS).
    pub(crate) zero_copy: bool,
    /// A file response's body, handed over by [`crate::fs`] once hyper has written the head:
    /// the driver sends it itself.
    pub(crate) file: Option<FileSend>,
}

/// The rest of a response that the driver sends from a file with `sendfile(2)`.
pub(crate) struct FileSend {
    pub(crate) file: std::fs::File,
    /// Where the body starts in the file (a range's first byte).
    pub(crate) offset: u64,
    /// The body's length: what hyper's head announced (`content-length`).
    pub(crate) len: u64,
    /// The connection stays open after it (not `Connection: close`, not HTTP/1.0 without
    /// keep-alive).
    pub(crate) keep_alive: bool,
}

impl Current {
    pub(crate) fn new(key: Key) -> Self {
        Current {
            key,
            close_at: u64::MAX,
            ..Current::default()
        }
    }

    /// Asks for `Connection: close` on the response to request `n` (or an earlier one already
    /// asked for), for `why`.
    pub(crate) fn close_at(&mut self, n: u64, why: Limit) {
        if n < self.close_at {
            self.close_at = n;
            self.close_for = Some(why);
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

/// The connection being driven on this thread, if it may send a body with `sendfile(2)`.
pub(crate) fn zero_copy_key() -> Option<Key> {
    with_any(|c| c.zero_copy.then_some(c.key)).flatten()
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
