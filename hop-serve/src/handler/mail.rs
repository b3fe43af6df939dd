//! The one way to hand something to a read-handler connection from outside its drive: a
//! letter in its mailbox ([`crate::rt::mail`]). [`ConnHandle`] (and `hop::ws`'s `WsHandle`,
//! built on it) posts letters; so does the SSE hub's fan-out.
//!
//! Where a connection's letters wait:
//! - On a poller, in the poller's mailbox (`rt::wake::Remote`), shared by every connection on
//!   it and addressed by `rt::wake::Target` (the connection's key and its process-wide id).
//!   The poller takes its mailbox when it wakes, hands each letter to its connection in order
//!   (dropping a letter whose id is not the one in the slot now: bytes for a closed connection
//!   never reach a later one in its slot), and drives each connection after its letters
//!   (`crate::reactor`). A connection that nothing writes to keeps nothing for it: an idle
//!   SSE subscriber is its slab entry alone, and one fan-out wakes each poller once, however
//!   many of its connections it reaches.
//! - Driven as a task (the tokio backend, a hijack off its poller, a WebSocket over HTTP/2),
//!   in a mailbox of its own, made with its first handle ([`Home::Own`]) and taken at the top of
//!   each drive, as a poller takes its own.
//!
//! What the letters ask ([`Letter`]): bytes to queue as they are (`ConnHandle::write`), bytes
//! for the connection's protocol to handle on its own thread (`Letter::Deliver`: an SSE
//! event, a `WsHandle`'s message to frame and compress there; hop's own protocols take them
//! through the crate-private [`super::Protocol`], not a method of the public `Handler`), close,
//! and shut down the write side. A connection's letters keep their posting order, so a
//! handle's writes, deliveries and close arrive in the order they were made.
//!
//! A connection with handles shares a small record with them, made with its first handle
//! ([`HandleState`]): its high-water mark and what its outbound queue holds (told by its drive),
//! whether a handle has closed it, and whether it has closed. A handle's write is checked
//! under its mailbox's lock against the bytes waiting there for its slot plus the queue on the
//! connection's side (`WriteError::Full`), and refused once a handle closed it or it closed
//! (`WriteError::Closed`); a close is recorded under the same lock, so no write is queued after
//! it. The SSE hub applies its own bound the same way, to the bytes waiting in the mailbox.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use bytes::Bytes;

use super::{over_mark, WriteError};
use crate::rt::mail::{Letter, Mailbox};
use crate::rt::wake::{self, Refused, Target};

thread_local! {
    /// The read-handler connection its poller is driving on this thread, if any.
    static AT: Cell<Option<Target>> = const { Cell::new(None) };
}

/// Runs `f`, a drive of (or a letter handed to) the read-handler connection `at` on its
/// poller: handles made meanwhile post to `at` in the poller's mailbox, and an SSE subscriber
/// opening now names itself by it.
pub(crate) fn at<R>(at: Target, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Target>);
    impl Drop for Restore {
        fn drop(&mut self) {
            AT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(AT.with(|c| c.replace(Some(at))));
    f()
}

/// The read-handler connection its poller is driving on this thread ([`at`]); `None` off a
/// poller's drive (a connection driven as a task).
pub(crate) fn target() -> Option<Target> {
    AT.with(Cell::get)
}

/// Where a connection's letters wait (see the module docs).
pub(crate) enum Home {
    /// Its poller's mailbox, where it is this target.
    Poller(Target),
    /// Its own: it is driven as a task.
    Own(Mailbox<()>),
}

/// What a connection shares with its handles (see the module docs).
pub(crate) struct HandleState {
    pub(crate) home: Home,
    /// Bytes in the connection's outbound queue, as of its last drive.
    out_len: AtomicUsize,
    /// Its high-water mark.
    max: AtomicUsize,
    /// A handle closed (or is closing) it: later letters are refused. Set and read under the
    /// mailbox's lock.
    closing: AtomicBool,
    /// The connection is gone.
    closed: AtomicBool,
}

impl HandleState {
    /// The record of a connection whose mark is `max`, driven where this thread says
    /// ([`target`]).
    pub(crate) fn new(max: usize) -> Self {
        HandleState {
            home: match target() {
                Some(to) => Home::Poller(to),
                None => Home::Own(Mailbox::new()),
            },
            out_len: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            closing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// The connection's side, after its drive or a letter: what its queue holds, its mark.
    pub(crate) fn tell(&self, out_len: usize, max: usize) {
        self.out_len.store(out_len, Relaxed);
        self.max.store(max, Relaxed);
    }

    /// The connection is gone: later letters are refused, and those waiting in its own
    /// mailbox dropped (its poller drops those in its own: the slot is no longer this
    /// connection's).
    pub(crate) fn closed(&self) {
        self.closed.store(true, Relaxed);
        if let Home::Own(mb) = &self.home {
            mb.clear();
        }
    }

    fn open(&self) -> Result<(), WriteError> {
        match self.closed.load(Relaxed) || self.closing.load(Relaxed) {
            true => Err(WriteError::Closed),
            false => Ok(()),
        }
    }

    fn post(
        &self,
        letter: Letter,
        admit: impl FnOnce(usize) -> Result<(), WriteError>,
    ) -> Result<(), WriteError> {
        match &self.home {
            Home::Poller(to) => wake::post(*to, letter, admit).map_err(|e| match e {
                Refused::By(e) => e,
                Refused::Gone => WriteError::Closed,
            }),
            Home::Own(mb) => mb.post((), letter, admit),
        }
    }
}

/// Writes to or closes a read-handler connection from any thread; wakes its poller.
#[derive(Clone)]
pub struct ConnHandle {
    pub(crate) state: std::sync::Arc<HandleState>,
}

impl fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnHandle")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl ConnHandle {
    /// Queues `data` whole; refused while what is queued for the connection (here and on
    /// its side) is at or above its high-water mark, as [`Conn::write`](super::Conn::write) is.
    pub fn write(&self, data: impl Into<Bytes>) -> Result<(), WriteError> {
        self.queue(Letter::Write(data.into()))
    }

    /// Queues `data` for the connection's protocol (`Protocol::on_deliver`), on the
    /// connection's own thread, in order with [`write`](Self::write)s, and bounded as they are.
    pub(crate) fn deliver(&self, data: Bytes) -> Result<(), WriteError> {
        self.queue(Letter::Deliver(data))
    }

    fn queue(&self, letter: Letter) -> Result<(), WriteError> {
        let st = &*self.state;
        st.post(letter, |waiting| {
            st.open()?;
            if over_mark(
                waiting.saturating_add(st.out_len.load(Relaxed)),
                st.max.load(Relaxed),
            ) {
                return Err(WriteError::Full { capacity: 0 });
            }
            Ok(())
        })
    }

    /// Closes the connection once queued output is written.
    pub fn close(&self) {
        let st = &*self.state;
        let _ = st.post(Letter::Close, |_| {
            st.open()?;
            st.closing.store(true, Relaxed);
            Ok(())
        });
    }

    /// Shuts down the write side once queued output is written.
    pub fn shutdown_write(&self) {
        let st = &*self.state;
        let _ = st.post(Letter::ShutdownWrite, |_| st.open());
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Relaxed)
    }
}
