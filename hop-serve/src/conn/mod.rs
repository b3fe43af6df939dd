//! One connection in a poller's slab, and everything it owns.
//!
//! An [`Entry`] is a slab slot's whole state: the connection's [`Key`] (its generation
//! included), the one deadline it waits for on the poller's timer, the local tasks that belong
//! to it, and what it is: an HTTP connection ([`http`]), a read-handler connection ([`tcp`]) or
//! a local task ([`crate::rt::tasks`]). What hyper and handlers record during a drive goes onto
//! the entry through [`current`]; a read handler taking a connection over from hyper goes
//! through [`takeover`]. [`stream`] is the socket type hyper reads and writes, over the
//! descriptor and its readiness ([`fd`]), and `tls` the rustls connection a TLS listener's
//! sockets go through. With the PROXY protocol on, a new
//! connection is first a [`proxy::ProxyWait`], until its header is read and the poller makes it
//! one of the others. A parked HTTP connection can leave its
//! poller for another as an [`http::Moved`] (the poller decides when: `crate::reactor`).

pub(crate) mod current;
pub(crate) mod fd;
pub(crate) mod http;
pub(crate) mod proxy;
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
use crate::limits::{OpenCounts, OpenGuard};
use crate::observe::Reason;
use crate::rt::tasks::Task;
use crate::rt::timer::Tick;
use crate::rt::wake::Key;
use crate::service::ConnService;
use fd::Fd;
use http::{HttpConfig, HttpConn, Moved};
use proxy::ProxyWait;
use stream::Socket;
use takeover::Taken;
use tcp::TcpConn;

/// One drive of an entry: what it is told, and what it asks for.
pub(crate) struct Drive {
    pub(crate) now: Instant,
    /// `now` as a [`Tick`], worked out once per poller wake-up (converting an instant costs
    /// some 60 instructions, and a keep-alive request asks for a deadline after each response).
    pub(crate) now_tick: Tick,
    /// The server is shutting down gracefully.
    pub(crate) draining: bool,
    /// Many connections on this poller hold hyper's state, or the poller is handing one to
    /// another (`crate::reactor`): an idle one parks at once.
    pub(crate) crowded: bool,
    /// Local tasks the entry owns (an HTTP/2 connection's open streams).
    pub(crate) owned: usize,
    /// The earliest time the entry asked to be driven again.
    pub(crate) due: Option<Tick>,
    /// A panic the entry caught (and where), for the poller to log and count.
    pub(crate) panic: Option<(&'static str, Box<dyn Any + Send>)>,
    /// Why the entry asked to be closed, when it knows (reported: `crate::observe`).
    #[cfg(feature = "metrics")]
    why: Option<Reason>,
}

impl Drive {
    pub(crate) fn new(now: Instant, now_tick: Tick, draining: bool, crowded: bool) -> Self {
        Drive {
            now,
            now_tick,
            draining,
            crowded,
            owned: 0,
            due: None,
            panic: None,
            #[cfg(feature = "metrics")]
            why: None,
        }
    }

    /// Records why the entry is closing (the first reason given wins). Nothing without the
    /// `metrics` feature.
    #[inline]
    pub(crate) fn because(&mut self, why: Reason) {
        #[cfg(feature = "metrics")]
        if self.why.is_none() {
            self.why = Some(why);
        }
        let _ = why;
    }

    /// Why the entry closed, if it said.
    #[inline]
    pub(crate) fn why(&self) -> Option<Reason> {
        #[cfg(feature = "metrics")]
        return self.why;
        #[cfg(not(feature = "metrics"))]
        None
    }

    /// Asks for a drive at `at` (the earliest asked wins).
    pub(crate) fn wake_at(&mut self, at: Instant) {
        self.wake_at_tick(Tick::of(at));
    }

    /// Asks for a drive at `at`, as a [`Tick`].
    pub(crate) fn wake_at_tick(&mut self, at: Tick) {
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
    /// A [`Kind::Proxy`] connection's header is read: the poller makes it what the app says.
    Proxied(crate::proxy::ProxyHeader),
}

/// What protocol state an entry holds, as its poller counts them: hyper's HTTP/1.1 connection
/// (a hot one, not parked), hyper's HTTP/2 connection, or neither (parked, opening, a read
/// handler, a task).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holds {
    Nothing,
    Http1,
    Http2,
}

/// What a slab entry is.
pub(crate) enum Kind<S: ConnService> {
    Http(HttpConn<S>),
    /// Boxed: a read-handler connection is larger than a parked HTTP one.
    Tcp(Box<TcpConn>),
    /// A local task (boxed for the same reason).
    Task(Box<Task>),
    /// A new connection waiting for its PROXY protocol header (boxed: it holds its peer's
    /// address until then).
    Proxy(Box<ProxyWait>),
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
            Kind::Proxy(c) => Some(&c.fd),
            Kind::Task(_) | Kind::Closed => None,
        }
    }

    /// The connection's tracing span, if it has one (`crate::observe::conn_span`).
    #[cfg(feature = "metrics")]
    pub(crate) fn span(&self) -> Option<tracing::Span> {
        self.fd()?.span.as_deref().cloned()
    }

    /// Why a read handler's connection closed, once its handler was told.
    pub(crate) fn handler_reason(&self) -> Option<Reason> {
        match &self.kind {
            Kind::Tcp(c) => c.reason(),
            _ => None,
        }
    }

    /// Whether it is an HTTP connection (counted in the `http` gauge).
    pub(crate) fn is_http(&self) -> bool {
        matches!(self.kind, Kind::Http(_))
    }

    /// Records a readiness event on the connection's socket; whether to drive it.
    pub(crate) fn on_event(&self, readable: bool, writable: bool, read_closed: bool) -> bool {
        match &self.kind {
            Kind::Http(c) => c.socket.on_event(readable, writable, read_closed),
            Kind::Tcp(c) => c.fd.on_event(readable, writable, read_closed),
            Kind::Proxy(c) => c.fd.on_event(readable, writable, read_closed),
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

    /// Whether it can go to another poller: a parked HTTP connection, or an HTTP/2 one between
    /// streams, that owns no task.
    pub(crate) fn is_movable(&self) -> bool {
        self.owned.is_none() && matches!(&self.kind, Kind::Http(c) if c.is_movable())
    }

    /// The connection, to hand to another poller; the entry back unless it is
    /// [movable](Self::is_movable).
    pub(crate) fn into_moved(self) -> Result<Moved<S>, Self> {
        if !self.is_movable() {
            return Err(self);
        }
        let Entry {
            key,
            armed,
            owned,
            kind,
        } = self;
        match kind {
            Kind::Http(c) => c.into_moved().map_err(|c| Entry {
                key,
                armed,
                owned,
                kind: Kind::Http(c),
            }),
            kind => Err(Entry {
                key,
                armed,
                owned,
                kind,
            }),
        }
    }

    /// Whether this is a connection (counted as one) rather than a task.
    pub(crate) fn is_conn(&self) -> bool {
        !matches!(self.kind, Kind::Task(_))
    }

    /// What protocol state it holds, as its poller counts them.
    pub(crate) fn holds(&self) -> Holds {
        match &self.kind {
            Kind::Http(c) => c.holds(),
            _ => Holds::Nothing,
        }
    }

    /// Whether it is an HTTP/2 connection.
    pub(crate) fn is_http2(&self) -> bool {
        matches!(&self.kind, Kind::Http(c) if c.is_http2())
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
                    d.panic = Some(("a local task", panic));
                    Verdict::Close
                }
            },
            Kind::Proxy(conn) => match conn.drive(http, d) {
                Poll::Pending => Verdict::Keep,
                Poll::Ready(Ok(header)) => Verdict::Proxied(header),
                Poll::Ready(Err(())) => Verdict::Close,
            },
            Kind::Closed => Verdict::Close,
        }
    }

    /// Turns the entry into a read-handler connection after a takeover; `false` (the entry is
    /// then closed) if the socket is still shared, which a takeover never leaves it.
    /// `open`: the gauges it is counted in as what it becomes.
    pub(crate) fn become_tcp(
        &mut self,
        taken: Taken,
        cfg: &Arc<TcpConfig>,
        open: Option<Arc<OpenCounts>>,
        now: Instant,
    ) -> bool {
        let Kind::Http(http) = std::mem::replace(&mut self.kind, Kind::Closed) else {
            return false;
        };
        let Ok(socket) = Arc::try_unwrap(http.into_socket()) else {
            return false;
        };
        // What hyper wrote and the socket had no room for yet (the 101, or the SSE head) is the
        // first of the handler's output.
        let (fd, unsent) = socket.into_fd();
        let mut conn = crate::handler::Conn::taken_over(Some(fd.io.as_raw_fd()), cfg);
        conn.out = unsent;
        let input = bytes::BytesMut::from(&taken.leftover[..]);
        let mut core = ConnCore::new(taken.handler, conn, input, cfg.clone(), now);
        core.open = open.map(|counts| OpenGuard::new(counts, taken.kind));
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

    /// Tells a read handler its connection is closing, if its drive has not (see
    /// [`TcpConn::close_handler`]); a panic of its `on_close` is handed back.
    pub(crate) fn close_handler(&mut self, forced: bool) -> Option<Box<dyn Any + Send>> {
        match &mut self.kind {
            Kind::Tcp(conn) => conn.close_handler(forced),
            _ => None,
        }
    }

    /// Records a local task that belongs to this entry (for an HTTP/2 connection, a stream has
    /// started: it is not idle).
    /// `max_requests` is `max_requests_per_connection`: reached, the connection is driven at
    /// once (to send GOAWAY).
    pub(crate) fn adopt(&mut self, task: Key, max_requests: u64) {
        if let Kind::Http(conn) = &mut self.kind {
            if conn.stream_started(max_requests) {
                crate::rt::wake::push_ready(self.key);
            }
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
