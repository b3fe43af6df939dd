//! A read-handler connection in a poller's slab: a [`ConnCore`] (the handler, its output and
//! timeouts) over the connection's socket ([`Fd`]), which it owns outright (no stream of hyper's shares
//! it any more), polled in place with the connection's own waker. It has an id unique in the
//! process (`wake::Target`): letters posted to it from elsewhere (`handler::mail`) must name
//! it, not only its slot. Every way it ends tells its handler (`on_close`, once): closed by its
//! drive, cut at the drain deadline, or dropped by its poller after a panic
//! ([`TcpConn::close_handler`]).

use std::io;
use std::mem::MaybeUninit;
use std::task::{Context, Poll};

use super::current::{self, Current};
use super::fd::Fd;
use super::Drive;
use crate::handler::{mail, CloseReason, ConnCore, RawIo};
use crate::rt::mail::Letter;
use crate::rt::wake::{self, Key, Target};

/// The socket as its own poller uses it.
struct LoopIo<'a>(&'a Fd);

impl RawIo for LoopIo<'_> {
    fn poll_read(
        &mut self,
        _cx: &mut Context<'_>,
        dst: &mut [MaybeUninit<u8>],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(dst)
    }

    fn poll_write(&mut self, _cx: &mut Context<'_>, src: &[u8]) -> Poll<io::Result<usize>> {
        self.0.poll_send(&[std::io::IoSlice::new(src)])
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0.flush(true) {
            Ok(true) => Poll::Ready(Ok(())),
            Ok(false) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What TLS holds encrypted goes out before its `close_notify` and the FIN.
        std::task::ready!(self.poll_flush(cx))?;
        Poll::Ready(self.0.shutdown_write())
    }
}

/// A read-handler connection on its poller.
pub(crate) struct TcpConn {
    pub(crate) fd: Fd,
    /// Its id in `wake::Target`s: letters that do not carry it are dropped.
    pub(crate) id: u64,
    core: ConnCore,
    /// On a TLS listener, until the handshake is done: when it must be, and where it is
    /// counted (boxed: a pointer in every read-handler connection, most of which have none).
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    handshake: Option<Box<(std::time::Instant, std::sync::Arc<crate::settings::Control>)>>,
}

impl TcpConn {
    pub(crate) fn new(fd: Fd, core: ConnCore) -> Self {
        TcpConn {
            fd,
            id: wake::next_id(),
            core,
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            handshake: None,
        }
    }

    /// A new connection on a TLS listener: the handler sees it once its handshake is done,
    /// which must be by `deadline` (counted in `ctl`'s stats).
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub(crate) fn after_handshake(
        mut self,
        deadline: std::time::Instant,
        ctl: std::sync::Arc<crate::settings::Control>,
    ) -> Self {
        self.handshake = Some(Box::new((deadline, ctl)));
        self
    }

    /// Drives the TLS handshake: `Some(closed)` while it is not done.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    fn handshake(&mut self, d: &mut Drive) -> Option<bool> {
        use std::sync::atomic::Ordering::Relaxed;
        let (deadline, ctl) = &**self.handshake.as_ref()?;
        match self.fd.poll_handshake() {
            Poll::Pending if d.now >= *deadline => {
                tracing::debug!("TLS handshake timed out; closing");
                d.because(crate::observe::Reason::TlsHandshakeTimeout);
                ctl.tls_handshake_timeouts.fetch_add(1, Relaxed);
                Some(true)
            }
            Poll::Pending => {
                d.wake_at(*deadline);
                Some(false)
            }
            Poll::Ready(Err(e)) => {
                crate::logs::tls_handshake_failed(&e);
                ctl.tls_handshake_failures.fetch_add(1, Relaxed);
                d.because(crate::observe::Reason::Error);
                Some(true)
            }
            Poll::Ready(Ok(())) => {
                ctl.tls_handshakes.fetch_add(1, Relaxed);
                self.fd.tls_established();
                self.handshake = None;
                None
            }
        }
    }

    /// Drives the connection on its poller; `true` when it has closed.
    pub(crate) fn drive(&mut self, key: Key, d: &mut Drive) -> bool {
        self.core.drive_queued = false;
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(closed) = self.handshake(d) {
            return closed;
        }
        let waker = key.waker();
        let mut cx = Context::from_waker(&waker);
        let mut cur = Current::new(key);
        let at = self.target(key);
        let (core, fd, now, draining) = (&mut self.core, &self.fd, d.now, d.draining);
        // Its target set, so that its handles post to it here and a handler opening on it (an
        // SSE subscriber) knows its connection.
        let polled = mail::at(at, || {
            current::lend(&mut cur, || {
                if draining {
                    core.begin_shutdown();
                }
                core.poll(&mut cx, &mut LoopIo(fd), now)
            })
        });
        // What TLS holds encrypted goes out (it waits for this drive on a writable edge).
        if let Err(e) = fd.flush(true) {
            self.finish(CloseReason::Error(e), d);
            return true;
        }
        match polled {
            Poll::Ready(reason) => {
                let reason = match reason {
                    CloseReason::Local if d.draining => CloseReason::Shutdown,
                    r => r,
                };
                self.finish(reason, d);
                true
            }
            Poll::Pending => {
                if let Some(due) = self.core.next_deadline() {
                    d.wake_at(due);
                }
                false
            }
        }
    }

    /// The connection as its poller's mailbox names it.
    fn target(&self, key: Key) -> Target {
        Target { key, id: self.id }
    }

    /// Tells the handler why the connection closed; a panic in its `on_close` goes to the
    /// poller with the drive.
    fn finish(&mut self, reason: CloseReason, d: &mut Drive) {
        if let Some(panic) = self.core.finish(reason) {
            d.panic = Some(("a read handler's on_close", panic));
        }
    }

    /// Why it closed, once its handler was told.
    pub(crate) fn reason(&self) -> Option<crate::observe::Reason> {
        self.core.reason()
    }

    /// Whether the letter for `to` is this connection's (not one for an earlier connection in
    /// its slot).
    pub(crate) fn is(&self, to: Target) -> bool {
        to.id == self.id
    }

    /// Does what a letter from its poller's mailbox asks (the caller drives it after).
    pub(crate) fn take_letter(&mut self, key: Key, letter: Letter) {
        let at = self.target(key);
        let core = &mut self.core;
        mail::at(at, || core.take_letter(letter));
    }

    /// Whether handles write to it (rather than only a fan-out reaching it: see the reactor's
    /// `hand_out`).
    pub(crate) fn has_handles(&self) -> bool {
        self.core.conn.handles.is_some()
    }

    /// Queues a drive for this turn, unless one is queued already: `true` if the caller is to
    /// queue it.
    pub(crate) fn queue_drive(&mut self) -> bool {
        !std::mem::replace(&mut self.core.drive_queued, true)
    }

    /// Tells the handler its connection is being dropped by the poller, unless its drive told
    /// it already: cut at the drain deadline (`forced`), or after a panic or an error of the
    /// poller's. Returns a panic of its `on_close`, for the poller to log and count.
    pub(crate) fn close_handler(&mut self, forced: bool) -> Option<Box<dyn std::any::Any + Send>> {
        match forced {
            true => self.core.finish(CloseReason::Shutdown),
            false => self.core.abandon(),
        }
    }
}
