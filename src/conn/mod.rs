//! One connection in a poller's slab, and everything it owns.
//!
//! An [`Entry`] is a slab slot's whole state: the connection's [`Key`] (its generation
//! included), the one deadline it waits for on the poller's timer, the local tasks that belong
//! to it, and what it is: an HTTP connection ([`http`]), a read-handler connection ([`tcp`]) or
//! a local task ([`crate::rt::tasks`]). What hyper and handlers record during a drive goes onto
//! the entry through [`current`]; a read handler taking a connection over from hyper goes
//! through [`takeover`]. [`stream`] is the socket type hyper reads and writes, and `tls` the
//! rustls connection a TLS listener's sockets go through.

pub(crate) mod current;
pub(crate) mod http;
pub(crate) mod stream;
pub(crate) mod takeover;
pub(crate) mod tcp;
#[cfg(any(feature = "tls", feature = "tls-ring"))]
pub(crate) mod tls;

use std::any::Any;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use crate::handler::{ConnCore, TcpConfig};
use crate::rt::tasks::Task;
use crate::rt::timer::Tick;
use crate::rt::wake::Key;
use crate::service::ConnService;
use http::{HttpConfig, HttpConn};
use stream::{Fd, Socket};
use takeover::Taken;
use tcp::TcpConn;

/// One drive of an entry: what it is told, and what it asks for.
pub(crate) struct Drive {
    pub(crate) now: Instant,
    /// The server is shutting down gracefully.
    pub(crate) draining: bool,
    /// Many connections on this poller hold hyper's state: an idle one parks at once.
    pub(crate) crowded: bool,
    /// Local tasks the entry owns (an HTTP/2 connection's open streams).
    pub(crate) owned: usize,
    /// The earliest time the entry asked to be driven again.
    pub(crate) due: Option<Instant>,
    /// A panic the entry caught and ended with, for the poller to log and count.
    pub(crate) panic: Option<Box<dyn Any + Send>>,
}

impl Drive {
    pub(crate) fn new(now: Instant, draining: bool, crowded: bool) -> Self {
        Drive {
            now,
            draining,
            crowded,
            owned: 0,
            due: None,
            panic: None,
        }
    }

    /// Asks for a drive at `at` (the earliest asked wins).
    pub(crate) fn wake_at(&mut self, at: Instant) {
        if self.due.is_none_or(|d| at < d) {
            self.due = Some(at);
        }
    }
}

/// What the poller should do with an entry after driving it.
pub(crate) enum Verdict {
    Keep,
    Close,
    /// A read handler took the connection over from hyper.
    Hijacked(Taken),
}

/// What a slab entry is.
pub(crate) enum Kind<S: ConnService> {
    Http(HttpConn<S>),
    /// Boxed: a read-handler connection is larger than a parked HTTP one.
    Tcp(Box<TcpConn>),
    /// A local task (boxed for the same reason).
    Task(Box<Task>),
    /// Closed, for the moment its state changes hands.
    Closed,
}

/// The local tasks that belong to an entry.
#[derive(Default)]
pub(crate) struct Owned {
    pub(crate) tasks: Vec<Key>,
}

/// A slab slot's state: see the module docs.
pub(crate) struct Entry<S: ConnService> {
    pub(crate) key: Key,
    /// The deadline this entry waits for on the poller's timer.
    pub(crate) armed: Option<Tick>,
    /// Local tasks that belong to this entry, dropped with it (boxed: most entries own none).
    pub(crate) owned: Option<Box<Owned>>,
    pub(crate) kind: Kind<S>,
}

impl<S: ConnService> Entry<S> {
    pub(crate) fn new(key: Key, kind: Kind<S>) -> Self {
        Entry {
            key,
            armed: None,
            owned: None,
            kind,
        }
    }

    /// The connection's descriptor (a task has none).
    pub(crate) fn fd(&self) -> Option<&Fd> {
        match &self.kind {
            Kind::Http(c) => Some(&c.socket.fd),
            Kind::Tcp(c) => Some(&c.fd),
            Kind::Task(_) | Kind::Closed => None,
        }
    }

    /// Records a readiness event on the connection's socket; whether to drive it.
    pub(crate) fn on_event(&self, readable: bool, writable: bool, read_closed: bool) -> bool {
        match &self.kind {
            Kind::Http(c) => c.socket.on_event(readable, writable, read_closed),
            Kind::Tcp(c) => c.fd.on_event(readable, writable, read_closed),
            Kind::Task(_) | Kind::Closed => false,
        }
    }

    /// The socket, if a task other than the poller (an upgrade's owner) holds it too.
    pub(crate) fn shared_socket(&self) -> Option<&Arc<Socket>> {
        match &self.kind {
            Kind::Http(c) if Arc::strong_count(&c.socket) > 1 => Some(&c.socket),
            _ => None,
        }
    }

    /// Whether this is a connection (counted as one) rather than a task.
    pub(crate) fn is_conn(&self) -> bool {
        !matches!(self.kind, Kind::Task(_))
    }

    /// Whether it holds hyper's state.
    pub(crate) fn is_hot(&self) -> bool {
        matches!(&self.kind, Kind::Http(c) if c.is_hot())
    }

    /// Drives the entry after an event, a wake or a timer.
    pub(crate) fn drive(&mut self, http: &HttpConfig, d: &mut Drive) -> Verdict {
        let key = self.key;
        d.owned = self.owned.as_ref().map_or(0, |o| o.tasks.len());
        match &mut self.kind {
            Kind::Http(conn) => conn.drive(key, http, d),
            Kind::Tcp(conn) => match conn.drive(key, d) {
                true => Verdict::Close,
                false => Verdict::Keep,
            },
            Kind::Task(task) => match task.poll(key) {
                Poll::Pending => Verdict::Keep,
                Poll::Ready(Ok(())) => Verdict::Close,
                Poll::Ready(Err(panic)) => {
                    d.panic = Some(panic);
                    Verdict::Close
                }
            },
            Kind::Closed => Verdict::Close,
        }
    }

    /// Turns the entry into a read-handler connection after a takeover; `false` (the entry is
    /// then closed) if the socket is still shared, which a takeover never leaves it.
    pub(crate) fn become_tcp(&mut self, taken: Taken, cfg: &Arc<TcpConfig>, now: Instant) -> bool {
        let Kind::Http(http) = std::mem::replace(&mut self.kind, Kind::Closed) else {
            return false;
        };
        let Ok(socket) = Arc::try_unwrap(http.into_socket()) else {
            return false;
        };
        // What hyper wrote and the socket had no room for yet (the 101, or the SSE head) is the
        // first of the handler's output.
        let (fd, unsent) = socket.into_fd();
        let mut conn = crate::handler::Conn::new(Some(fd.io.as_raw_fd()), cfg);
        conn.out = unsent;
        let input = bytes::BytesMut::from(&taken.leftover[..]);
        let core = ConnCore::new(taken.handler, conn, input, cfg.clone(), now);
        self.kind = Kind::Tcp(Box::new(TcpConn::new(fd, core)));
        true
    }

    /// Starts a graceful shutdown: hyper finishes the request in flight and closes; a parked
    /// connection closes on its next drive, a read handler is told on its next drive.
    pub(crate) fn begin_drain(&mut self) {
        if let Kind::Http(conn) = &mut self.kind {
            conn.begin_drain();
        }
    }

    /// Tells a read handler it was cut off (drain timeout).
    pub(crate) fn abort(&mut self) {
        if let Kind::Tcp(conn) = &mut self.kind {
            conn.abort();
        }
    }

    /// Records a local task that belongs to this entry (for an HTTP/2 connection, a stream has
    /// started: it is not idle).
    pub(crate) fn adopt(&mut self, task: Key) {
        if let Kind::Http(conn) = &mut self.kind {
            conn.stream_started();
        }
        self.owned
            .get_or_insert_with(Default::default)
            .tasks
            .push(task);
    }

    /// Forgets a task of this entry that has finished; `true` if it owns none any more.
    pub(crate) fn disown(&mut self, task: Key) -> bool {
        if let Some(owned) = &mut self.owned {
            owned.tasks.retain(|k| *k != task);
            if owned.tasks.is_empty() {
                self.owned = None;
                return true;
            }
        }
        false
    }
}
