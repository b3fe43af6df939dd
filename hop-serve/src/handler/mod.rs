//! The read-handler machinery both backends share: the [`Handler`] trait, the [`Conn`] a
//! handler writes to, the [`ConnHandle`] other threads write through (in `mail`, with how
//! anything reaches a connection from outside its drive: letters in its mailbox), and (in
//! `core`) the state machine that reads, calls the handler, takes its letters, flushes and
//! applies timeouts. The public face is [`crate::tcp`]; the reactor drives a [`ConnCore`] in
//! place (`conn::tcp`), the tokio backend from a task ([`run_task`]).
//!
//! The machinery holds a handler as a [`Protocol`]: the public [`Handler`]'s methods, and the
//! one that only hop's own protocols have (`hop::ws`'s, an SSE subscriber), taking the bytes
//! delivered to them. A user's handler is wrapped in [`User`], which is given none; the public
//! trait has no hidden method.

pub(crate) mod context;
mod core;
pub(crate) mod mail;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

pub(crate) use self::core::{run_task, ConnCore, RawIo};
pub use self::mail::ConnHandle;
use self::mail::HandleState;
pub(crate) use crate::settings::TcpConfig;

/// Why a connection closed, as told to [`Handler::on_close`].
#[derive(Debug)]
#[non_exhaustive]
pub enum CloseReason {
    /// The handler or a [`ConnHandle`] closed it.
    Local,
    /// The peer closed it, or reset it.
    Peer,
    /// The read or idle timeout ran out.
    Timeout,
    /// The server shut down.
    Shutdown,
    /// An I/O error, a handler error or a handler panic.
    Error(io::Error),
}

/// Whether `queued` bytes of output have reached the high-water mark `max`: at or above it
/// (and never for an empty queue, so a zero mark still lets one write through at a time).
pub(crate) fn over_mark(queued: usize, max: usize) -> bool {
    queued > 0 && queued >= max
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteError {
    /// The outbound queue is at or above its high-water mark; [`Handler::on_writable`] is
    /// called when it has drained.
    Full {
        /// Bytes the buffer could still take.
        capacity: usize,
    },
    /// The connection is closed or closing.
    Closed,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Full { capacity } => write!(
                f,
                "outbound buffer full ({capacity} bytes free); wait for on_writable"
            ),
            WriteError::Closed => f.write_str("connection closed"),
        }
    }
}

impl std::error::Error for WriteError {}

impl From<WriteError> for io::Error {
    fn from(e: WriteError) -> Self {
        let kind = match e {
            WriteError::Full { .. } => io::ErrorKind::WouldBlock,
            WriteError::Closed => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, e)
    }
}

/// An event-driven connection handler. One value per connection; all methods run on the
/// connection's poller (or its task, under the tokio backend) and must not block.
///
/// Returning an error, or panicking, closes this connection only.
pub trait Handler: Send + 'static {
    /// The connection is open (for a hijacked connection: the `101` has been written).
    fn on_open(&mut self, conn: &mut Conn) -> io::Result<()> {
        let _ = conn;
        Ok(())
    }

    /// Bytes arrived. `input` holds every unread byte: consume what you can parse (with
    /// `split_to` or `advance`) and leave the rest; you are called again when more arrives.
    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> io::Result<()>;

    /// The outbound buffer drained after a write was refused. If unread input remains,
    /// [`on_read`](Self::on_read) is called again right after.
    fn on_writable(&mut self, conn: &mut Conn) -> io::Result<()> {
        let _ = conn;
        Ok(())
    }

    /// The peer shut down its side (half-close). The default closes once output is flushed;
    /// keep writing and close later to serve half-closed peers.
    fn on_eof(&mut self, conn: &mut Conn) -> io::Result<()> {
        conn.close();
        Ok(())
    }

    /// The timer set with [`Conn::set_timer`] is due.
    fn on_timer(&mut self, conn: &mut Conn) -> io::Result<()> {
        let _ = conn;
        Ok(())
    }

    /// The server is shutting down gracefully. The default closes once output is flushed.
    fn on_shutdown(&mut self, conn: &mut Conn) {
        conn.close();
    }

    /// The connection is gone. Called exactly once for every connection whose
    /// [`on_open`](Self::on_open) was called (whether or not it succeeded), however it ended:
    /// closed by the handler or the peer, an error or a panic (in a handler method, or
    /// contained by the poller around it), a timeout, a graceful shutdown or the drain deadline
    /// (`Shutdown`), or a connection task dropped by the runtime. A panic here is contained,
    /// and counted in [`crate::Stats::panics`] (not in a hijack served as a tokio task, which
    /// reaches no server's counters).
    fn on_close(&mut self, reason: CloseReason) {
        let _ = reason;
    }
}

/// A read handler as the machinery holds it: a [`Handler`], and what only hop's own protocols
/// take (`hop::ws`'s `WsProtocol`, an SSE subscriber). Public only in name (this module is
/// private, and nothing re-exports it), for `app::NewConn`; not part of hop's API.
pub trait Protocol: Handler {
    /// Bytes delivered to this connection ([`Letter::Deliver`](crate::rt::mail::Letter)): an
    /// SSE event from the hub's fan-out, a `WsHandle`'s message to frame (and compress) here.
    /// Runs on the connection's own thread, in order with its other letters.
    fn on_deliver(&mut self, conn: &mut Conn, bytes: Bytes);
}

/// A user's [`Handler`], as the machinery holds it. Nothing delivers bytes to one (its
/// handles write them); should anything, they are queued as a write, and the connection
/// closed if they do not fit.
///
/// It forwards every method of [`Handler`]: a method added there is forwarded here too.
pub(crate) struct User<H>(pub(crate) H);

impl<H: Handler> Handler for User<H> {
    fn on_open(&mut self, conn: &mut Conn) -> io::Result<()> {
        self.0.on_open(conn)
    }

    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> io::Result<()> {
        self.0.on_read(conn, input)
    }

    fn on_writable(&mut self, conn: &mut Conn) -> io::Result<()> {
        self.0.on_writable(conn)
    }

    fn on_eof(&mut self, conn: &mut Conn) -> io::Result<()> {
        self.0.on_eof(conn)
    }

    fn on_timer(&mut self, conn: &mut Conn) -> io::Result<()> {
        self.0.on_timer(conn)
    }

    fn on_shutdown(&mut self, conn: &mut Conn) {
        self.0.on_shutdown(conn)
    }

    fn on_close(&mut self, reason: CloseReason) {
        self.0.on_close(reason)
    }
}

impl<H: Handler> Protocol for User<H> {
    fn on_deliver(&mut self, conn: &mut Conn, bytes: Bytes) {
        if conn.write(&bytes).is_err() {
            conn.close();
        }
    }
}

/// The connection as a handler sees it: queue output, close, set timeouts, get a handle.
pub struct Conn {
    /// The socket, for its addresses (asked of the kernel when wanted, not stored: an idle
    /// connection's state stays small). `None` for a stream that is not a TCP socket.
    pub(crate) fd: Option<RawFd>,
    pub(crate) out: BytesMut,
    pub(crate) max_output: usize,
    pub(crate) max_input: usize,
    pub(crate) closing: bool,
    pub(crate) shutdown_requested: bool,
    pub(crate) want_writable: bool,
    pub(crate) read_timeout: Millis,
    pub(crate) idle_timeout: Millis,
    pub(crate) close_timeout: Millis,
    pub(crate) close_clock: CloseClock,
    pub(crate) timer: Option<std::time::Instant>,
    /// What it shares with its handles, once it has one (`mail`): an idle connection without
    /// a handle keeps nothing for them.
    pub(crate) handles: Option<Arc<HandleState>>,
    /// Why it is closing, when a handler of hop's knows better than the [`CloseReason`]
    /// (`hop::ws`'s ping timeout); reported (`crate::observe`).
    #[cfg(feature = "metrics")]
    pub(crate) why: Option<crate::observe::Reason>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("fd", &self.fd)
            .field("queued", &self.out.len())
            .field("closing", &self.closing)
            .finish()
    }
}

impl Conn {
    pub(crate) fn new(fd: Option<RawFd>, cfg: &TcpConfig) -> Self {
        Conn {
            fd,
            out: BytesMut::new(),
            max_output: cfg.max_output,
            max_input: cfg.max_input,
            closing: false,
            shutdown_requested: false,
            want_writable: false,
            read_timeout: Millis::new(cfg.read_timeout),
            idle_timeout: Millis::new(cfg.idle_timeout),
            close_timeout: Millis::new(Some(cfg.close_timeout)),
            close_clock: CloseClock::Off,
            timer: None,
            handles: None,
            #[cfg(feature = "metrics")]
            why: None,
        }
    }

    /// A connection taken over from HTTP (a [`crate::Hijack`], so `hop::ws`, and an SSE
    /// stream): as [`new`](Self::new), without the idle timeout. `idle_timeout` is HTTP's
    /// keep-alive limit (and a `hop::tcp` listener's); a taken-over connection's protocol
    /// decides when its peer is gone (`hop::ws` pings, SSE sends comments), and otherwise the
    /// read timeout, `tcp_keepalive` or the handler's own [`Conn::set_idle_timeout`] do.
    pub(crate) fn taken_over(fd: Option<RawFd>, cfg: &TcpConfig) -> Self {
        let mut conn = Conn::new(fd, cfg);
        conn.idle_timeout = Millis::new(None);
        conn
    }

    /// Starts the close clock (once): from now the connection has the close timeout to finish
    /// closing (flush its output; for a WebSocket, hear the peer's close). The connection's
    /// core starts it when it next looks ([`CloseClock`]).
    pub(crate) fn start_close_clock(&mut self) {
        if self.close_clock == CloseClock::Off {
            self.close_clock = CloseClock::Asked;
        }
    }

    fn addr(&self, peer: bool) -> io::Result<SocketAddr> {
        let fd = self
            .fd
            .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "not a TCP socket"))?;
        // SAFETY: the connection owns the socket for as long as this `Conn` exists (the
        // poller's slab or the connection's task holds both), so the descriptor is open.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let addr = if peer {
            sock.peer_addr()?
        } else {
            sock.local_addr()?
        };
        addr.as_socket()
            .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "not an IP socket"))
    }

    /// The peer's address (asked of the kernel).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.addr(true)
    }

    /// The local address (asked of the kernel).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.addr(false)
    }

    /// Bytes that can be queued before the outbound queue reaches its high-water mark (a
    /// handler that wants to stay under the mark, an echo say, writes at most this much).
    pub fn write_capacity(&self) -> usize {
        self.max_output.saturating_sub(self.out.len())
    }

    /// Bytes queued and not yet written to the socket.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Queues `data` whole, or refuses it whole while the queue is at or above its high-water
    /// mark ([`crate::Builder::max_write_buffer`]; then [`Handler::on_writable`] says when it has
    /// drained). The mark bounds what piles up, not a single write: a write larger than the
    /// mark is taken whole when the queue is below it, so a message is never refused for its
    /// size alone, and the queue holds at most the mark plus one write.
    pub fn write(&mut self, data: &[u8]) -> Result<(), WriteError> {
        self.write_parts(&[data])
    }

    /// Raises or lowers this connection's unread-input bound (a protocol whose frames can be
    /// larger than the server's `max_read_buffer` sets it to its largest frame).
    pub fn set_max_read_buffer(&mut self, n: usize) {
        self.max_input = n.max(1);
    }

    /// Raises or lowers this connection's outbound high-water mark.
    pub fn set_max_write_buffer(&mut self, n: usize) {
        self.max_output = n;
    }

    /// Queues `parts` back to back, whole, or refuses them whole, as [`write`](Self::write)
    /// does (one check, no intermediate buffer: a protocol's header and payload, say).
    pub fn write_parts(&mut self, parts: &[&[u8]]) -> Result<(), WriteError> {
        self.room()?;
        self.queue_parts(parts)
    }

    /// Whether a write would be taken now: refused once closing, or while the queue is at or
    /// above its high-water mark (then [`Handler::on_writable`] is asked for).
    pub(crate) fn room(&mut self) -> Result<(), WriteError> {
        if self.closing || self.shutdown_requested {
            return Err(WriteError::Closed);
        }
        if over_mark(self.out.len(), self.max_output) {
            self.want_writable = true;
            return Err(WriteError::Full { capacity: 0 });
        }
        Ok(())
    }

    /// Queues `parts` whatever the high-water mark (what a handle wrote, already bounded
    /// there); refused only once the connection is closing.
    pub(crate) fn queue_parts(&mut self, parts: &[&[u8]]) -> Result<(), WriteError> {
        if self.closing || self.shutdown_requested {
            return Err(WriteError::Closed);
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.out.capacity() == 0 {
            self.out = self::core::take(len);
        }
        self.out.reserve(len);
        for p in parts {
            self.out.extend_from_slice(p);
        }
        Ok(())
    }

    /// Closes the connection once queued output is written; no more input is read. If the
    /// peer does not take the output within the close timeout
    /// ([`crate::Builder::close_timeout`]), it is discarded and the connection reset.
    pub fn close(&mut self) {
        self.closing = true;
    }

    /// Half-close: shuts down the write side once queued output is written; input is still
    /// read.
    pub fn shutdown_write(&mut self) {
        self.shutdown_requested = true;
    }

    /// Closes the connection if no bytes arrive for `t` (`None`: never; default from the
    /// server's settings).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.read_timeout = Millis::new(t);
    }

    /// Calls [`Handler::on_timer`] once, `after` from now (`None` cancels). Timers run on the
    /// poller's timer (a tokio timer under the tokio backend).
    pub fn set_timer(&mut self, after: Option<Duration>) {
        self.timer = after.map(|d| crate::rt::timer::deadline(std::time::Instant::now(), d));
    }

    /// Arms the timer for `at`, unless it is already due sooner (a protocol that keeps several
    /// deadlines on the one timer: each `on_timer` arms them all again).
    pub(crate) fn arm_timer_at(&mut self, at: std::time::Instant) {
        if self.timer.is_none_or(|t| at < t) {
            self.timer = Some(at);
        }
    }

    /// Closes the connection if nothing is read or written for `t` (`None`: never). The
    /// default: the server's `idle_timeout` for a `hop::tcp` listener's connection, none for one
    /// taken over from HTTP (a [`crate::Hijack`], `hop::ws`, SSE).
    pub fn set_idle_timeout(&mut self, t: Option<Duration>) {
        self.idle_timeout = Millis::new(t);
    }

    /// A `Send + Clone` handle that writes to or closes this connection from any thread.
    pub fn handle(&mut self) -> ConnHandle {
        let max = self.max_output;
        let state = self
            .handles
            .get_or_insert_with(|| Arc::new(HandleState::new(max)))
            .clone();
        ConnHandle { state }
    }
}

/// The close clock of a read-handler connection: off, asked for (by a close or a WebSocket
/// close frame), or running since the core's `last_read` (which no longer moves then, so a
/// closing connection keeps no other timestamp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseClock {
    Off,
    Asked,
    Running,
}

/// A connection's timeout in 4 bytes (an idle connection's state stays small): whole
/// milliseconds, rounded up; 0 is none, and `u32::MAX` (about 49 days) or more is never.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Millis(u32);

impl Millis {
    pub(crate) fn new(t: Option<Duration>) -> Self {
        Millis(t.map_or(0, |d| {
            d.as_micros().div_ceil(1000).clamp(1, u32::MAX as u128) as u32
        }))
    }

    pub(crate) fn get(self) -> Option<Duration> {
        (self.0 != 0 && self.0 != u32::MAX).then(|| Duration::from_millis(self.0.into()))
    }
}
