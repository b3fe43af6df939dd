//! An SSE subscriber under the reactor: the read handler (`Subscriber`) its connection becomes
//! once hyper has written the head. It writes the replay, joins the hub under its connection's
//! target, writes the events its poller's mailbox delivers and the keep-alive comments its
//! timer calls for, drops itself when its outbound queue is full, and leaves the hub however
//! its connection ends.

use std::io;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use crate::handler::{mail, CloseReason, Conn, Handler, Protocol, WriteError};

use super::event::frame;
use super::hub::{Hub, Sink};

/// An SSE subscriber on a poller.
pub(super) struct Subscriber {
    pub(super) hub: Hub,
    pub(super) id: u64,
    pub(super) chunked: bool,
    /// Events queued before the takeover (a boxed slice: no room kept once sent).
    pub(super) backlog: Box<[Bytes]>,
}

impl Handler for Subscriber {
    fn on_open(&mut self, conn: &mut Conn) -> io::Result<()> {
        conn.set_max_write_buffer(self.hub.inner.cfg.max_queue);
        conn.set_idle_timeout(None);
        conn.set_timer(self.hub.inner.cfg.keep_alive_period());
        // Checked against the limit already (`Subscription::response`): queued whole.
        for b in std::mem::take(&mut self.backlog).iter() {
            conn.queue_parts(&[&frame(b, self.chunked)])?;
        }
        // Called on the subscriber's poller, inside its drive: the connection driven is its
        // own.
        let Some(to) = mail::target() else {
            return Err(io::Error::other(
                "an SSE subscriber must open on its poller",
            ));
        };
        self.hub.subs().insert(
            self.id,
            Sink::Loop {
                to,
                chunked: self.chunked,
            },
        );
        Ok(())
    }

    fn on_read(&mut self, _conn: &mut Conn, input: &mut BytesMut) -> io::Result<()> {
        // Subscribers have nothing to say: bytes are a request pipelined behind the
        // subscription, which this endless response would never let be served. Fail closed
        // (as the takeover does for one already read): close, rather than drop it.
        if input.is_empty() {
            return Ok(());
        }
        crate::logs::warn_limited!(bytes = input.len(), "an SSE subscriber sent bytes; closing");
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "an SSE subscriber sent bytes",
        ))
    }

    fn on_timer(&mut self, conn: &mut Conn) -> io::Result<()> {
        if conn.queued() == 0 {
            conn.write(&frame(b":\n\n", self.chunked))?;
        }
        conn.set_timer(self.hub.inner.cfg.keep_alive_period());
        Ok(())
    }

    fn on_shutdown(&mut self, conn: &mut Conn) {
        // End the stream properly: the last chunk, then close.
        self.hub.remove(self.id);
        if self.chunked {
            let _ = conn.write(b"0\r\n\r\n");
        }
        conn.close();
    }

    fn on_close(&mut self, _reason: CloseReason) {
        self.hub.remove(self.id);
    }
}

/// The hub's events arrive as deliveries (`Hub::offer`), a slow subscriber's close as a
/// `Letter::Close`.
impl Protocol for Subscriber {
    fn on_deliver(&mut self, conn: &mut Conn, bytes: Bytes) {
        match conn.write(&bytes) {
            Ok(()) => {}
            Err(WriteError::Full { .. }) => {
                tracing::debug!(id = self.id, "dropping a slow SSE subscriber");
                self.hub.inner.dropped.fetch_add(1, Ordering::Relaxed);
                self.hub.remove(self.id);
                conn.close();
            }
            Err(_) => {}
        }
    }
}
