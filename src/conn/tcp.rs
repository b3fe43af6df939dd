//! A read-handler connection in a poller's slab: a [`ConnCore`] (the handler, its output and
//! timeouts) over the connection's socket ([`Fd`]), which it owns outright (no stream of hyper's shares
//! it any more), polled in place with the connection's own waker.

use std::io;
use std::mem::MaybeUninit;
use std::task::{Context, Poll};

use super::current::{self, Current};
use super::stream::Fd;
use super::Drive;
use crate::handler::{CloseReason, ConnCore, RawIo};
use crate::rt::wake::Key;

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

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.shutdown_write())
    }
}

/// A read-handler connection on its poller.
pub(crate) struct TcpConn {
    pub(crate) fd: Fd,
    core: ConnCore,
}

impl TcpConn {
    pub(crate) fn new(fd: Fd, core: ConnCore) -> Self {
        TcpConn { fd, core }
    }

    /// Drives the connection on its poller; `true` when it has closed.
    pub(crate) fn drive(&mut self, key: Key, d: &mut Drive) -> bool {
        if d.draining {
            self.core.begin_shutdown();
        }
        let waker = key.waker();
        let mut cx = Context::from_waker(&waker);
        let (core, fd, now) = (&mut self.core, &self.fd, d.now);
        // Lent so that a handler opening on it (an SSE subscriber) knows its connection.
        let mut cur = Current::new(key);
        let polled = current::lend(&mut cur, || core.poll(&mut cx, &mut LoopIo(fd), now));
        match polled {
            Poll::Ready(reason) => {
                let reason = match reason {
                    CloseReason::Local if d.draining => CloseReason::Shutdown,
                    r => r,
                };
                self.core.finish(reason);
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

    /// Hands delivered bytes to the handler (the caller drives the connection next).
    pub(crate) fn deliver(&mut self, key: Key, bytes: bytes::Bytes) {
        let mut cur = Current::new(key);
        current::lend(&mut cur, || self.core.deliver(bytes));
    }

    /// Tells the handler the connection was cut (drain timeout).
    pub(crate) fn abort(&mut self) {
        self.core.finish(CloseReason::Shutdown);
    }
}
