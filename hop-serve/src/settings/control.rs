//! The state a running server shares: [`Control`] (the shutdown state and the counters, shared
//! by the front, the backend threads and every [`Handle`](crate::Handle)), [`Stats`] (a
//! snapshot of the counters) and [`Place`] (a tokio-backend connection's place in them).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::limits::{IpSlot, Limit, OpenCounts, PerIp};
use crate::observe::{self, Protocol, Reason};

/// Counters of a running server, read with [`Handle::stats`](crate::Handle::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub active: u64,
    /// Connections closed at once because `max_connections` was reached.
    pub rejected: u64,
    /// Connections that closed by themselves during a graceful shutdown.
    pub drained: u64,
    /// Connections force-closed when the drain timeout ran out.
    pub forced: u64,
    /// Reactor: times an idle keep-alive connection was parked down to its socket.
    pub parked: u64,
    /// Panics in user code (a handler, a service, a body, or a `Drop` of one of them) that
    /// closed their connection; the server went on serving.
    pub panics: u64,
    /// Connections that spoke HTTP/2 (h2c with prior knowledge).
    pub http2_connections: u64,
    /// HTTP/2 streams (requests) served.
    pub http2_streams: u64,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// TLS handshakes that failed (not TLS, a protocol error, no certificate for the name...).
    pub tls_handshake_failures: u64,
    /// TLS handshakes closed at `tls_handshake_timeout`.
    pub tls_handshake_timeouts: u64,
    /// `hop::ws` connections closed (`1001`) because the peer sent nothing within
    /// `keep_alive_timeout` of a keep-alive Ping ([`WsConfig`](crate::ws::WsConfig)).
    pub ws_ping_timeouts: u64,
    /// Reactor: connections handed from a busier poller to a less busy one (a new connection,
    /// or a keep-alive one at a request boundary).
    pub moved: u64,
    /// Reactor: response bodies sent from a file with `sendfile(2)` (`hop::fs`, feature `fs`).
    pub files_sent: u64,
    /// Connections closed because their PROXY protocol header was malformed, missing (the
    /// peer spoke first without one, or closed), or not whole within `header_read_timeout`
    /// ([`Builder::proxy_protocol`](crate::Builder::proxy_protocol)).
    pub proxy_header_failures: u64,
    /// Connections closed at accept because their client IP already had
    /// `max_connections_per_ip` open.
    pub rejected_per_ip: u64,
    /// Connections `max_connection_age` ended: an HTTP/1.1 response sent with
    /// `Connection: close`, an idle keep-alive connection closed, or an HTTP/2 GOAWAY.
    pub max_age_reached: u64,
    /// Connections `max_requests_per_connection` ended: the last HTTP/1.1 response sent with
    /// `Connection: close`, or an HTTP/2 GOAWAY.
    pub max_requests_reached: u64,
    /// HTTP/1.x requests served (HTTP/2's are `http2_streams`).
    pub http1_requests: u64,
    /// WebSocket connections opened: `hop::ws`, and hijacks ([`Hijack`](crate::Hijack)) of a
    /// request that asked `Upgrade: websocket` (axum's own `WebSocketUpgrade` is not seen).
    pub ws_connections: u64,
    /// `hop::sse` subscriptions opened.
    pub sse_connections: u64,
}

/// State shared by the front, the backend threads and every [`Handle`](crate::Handle).
#[derive(Default)]
pub(crate) struct Control {
    draining: AtomicBool,
    drain_deadline: Mutex<Option<Instant>>,
    on_shutdown: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    pub(crate) accepted: AtomicU64,
    pub(crate) active: AtomicUsize,
    pub(crate) rejected: AtomicU64,
    pub(crate) drained: AtomicU64,
    pub(crate) forced: AtomicU64,
    pub(crate) parked: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) http2_connections: AtomicU64,
    pub(crate) http2_streams: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) tls_handshake_failures: AtomicU64,
    pub(crate) tls_handshake_timeouts: AtomicU64,
    pub(crate) ws_ping_timeouts: AtomicU64,
    pub(crate) moved: AtomicU64,
    pub(crate) files_sent: AtomicU64,
    pub(crate) proxy_header_failures: AtomicU64,
    pub(crate) rejected_per_ip: AtomicU64,
    pub(crate) max_age_reached: AtomicU64,
    pub(crate) max_requests_reached: AtomicU64,
    pub(crate) http1_requests: AtomicU64,
    /// Open connections by client IP (`max_connections_per_ip`).
    pub(crate) per_ip: Arc<PerIp>,
    /// Open connections by kind, for the drain log; WebSocket and SSE totals.
    pub(crate) open: Arc<OpenCounts>,
    /// Reactor: entries each poller has driven, by poller (set when the pollers start).
    pub(crate) poller_work: std::sync::OnceLock<Arc<[AtomicU64]>>,
    pub(crate) local_addr: Mutex<Option<SocketAddr>>,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// Tokio backend: a connection's place in the server's counts, `active` and (under
/// `max_connections_per_ip`) its client IP's. Its task and its stream share it, and the stream
/// carries it into an upgrade, so that a WebSocket or a hijack counts until it closes. The
/// last holder gives it back: its IP's place first, so that once `active` has fallen the same
/// client can connect again.
pub(crate) struct Place {
    ctl: Arc<Control>,
    /// Turns `true` when the drain timeout force-closes what is left.
    forcing: Arc<AtomicBool>,
    /// Its IP's place: taken at accept, or once a PROXY protocol header named the client.
    ip: Mutex<Option<IpSlot>>,
    /// Why the connection closed, as its task found out (reported: `crate::observe`).
    why: Mutex<Reason>,
}

impl Place {
    /// A place for a connection [`Control::admit`] admitted (and its IP's, if counted).
    pub(crate) fn new(ctl: Arc<Control>, forcing: Arc<AtomicBool>, ip: Option<IpSlot>) -> Self {
        Place {
            ctl,
            forcing,
            ip: Mutex::new(ip),
            why: Mutex::new(Reason::Closed),
        }
    }

    /// Holds `slot` as its IP's place (taken once its PROXY protocol header was read).
    pub(crate) fn hold_ip(&self, slot: IpSlot) {
        *self.ip.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
    }

    /// Records why the connection closed (the last word counts).
    pub(crate) fn closed_for(&self, why: Reason) {
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    pub(crate) fn control(&self) -> &Control {
        &self.ctl
    }
}

impl fmt::Debug for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Place")
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        drop(self.ip.get_mut().unwrap_or_else(|e| e.into_inner()).take());
        let why = *self.why.get_mut().unwrap_or_else(|e| e.into_inner());
        self.ctl.release(self.forcing.load(Ordering::Acquire), why);
        crate::memory::note_close();
    }
}

impl Control {
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn drain_deadline(&self) -> Option<Instant> {
        *self
            .drain_deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a graceful shutdown that ends at `deadline` (an earlier deadline wins).
    pub(crate) fn shutdown(&self, deadline: Instant) {
        {
            let mut d = self
                .drain_deadline
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if d.is_none_or(|old| deadline < old) {
                *d = Some(deadline);
            }
        }
        self.draining.store(true, Ordering::Release);
        for f in self
            .on_shutdown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            f();
        }
    }

    /// Registers a callback run when shutdown starts (and at once if it already has).
    pub(crate) fn on_shutdown(&self, f: Box<dyn Fn() + Send + Sync>) {
        let mut v = self.on_shutdown.lock().unwrap_or_else(|e| e.into_inner());
        if self.draining() {
            f();
        }
        v.push(f);
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            accepted: self.accepted.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed) as u64,
            rejected: self.rejected.load(Ordering::Relaxed),
            drained: self.drained.load(Ordering::Relaxed),
            forced: self.forced.load(Ordering::Relaxed),
            parked: self.parked.load(Ordering::Relaxed),
            panics: self.panics.load(Ordering::Relaxed),
            http2_connections: self.http2_connections.load(Ordering::Relaxed),
            http2_streams: self.http2_streams.load(Ordering::Relaxed),
            tls_handshakes: self.tls_handshakes.load(Ordering::Relaxed),
            tls_handshake_failures: self.tls_handshake_failures.load(Ordering::Relaxed),
            tls_handshake_timeouts: self.tls_handshake_timeouts.load(Ordering::Relaxed),
            ws_ping_timeouts: self.ws_ping_timeouts.load(Ordering::Relaxed),
            moved: self.moved.load(Ordering::Relaxed),
            files_sent: self.files_sent.load(Ordering::Relaxed),
            proxy_header_failures: self.proxy_header_failures.load(Ordering::Relaxed),
            rejected_per_ip: self.rejected_per_ip.load(Ordering::Relaxed),
            max_age_reached: self.max_age_reached.load(Ordering::Relaxed),
            max_requests_reached: self.max_requests_reached.load(Ordering::Relaxed),
            http1_requests: self.http1_requests.load(Ordering::Relaxed),
            ws_connections: self.open.ws_total.load(Ordering::Relaxed),
            sse_connections: self.open.sse_total.load(Ordering::Relaxed),
        }
    }

    /// Reserves a connection slot under `max`; `false` (and counted) when full.
    pub(crate) fn admit(&self, max: usize) -> bool {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        observe::accepted();
        if self.active.fetch_add(1, Ordering::AcqRel) >= max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.rejected.fetch_add(1, Ordering::Relaxed);
            observe::closed(Reason::MaxConnections);
            return false;
        }
        true
    }

    /// A place for `client` under `max_connections_per_ip` (`max`); `None`, logged and counted
    /// (`rejected_per_ip`), when its IP holds `max` already. Refused at accept, the connection
    /// then gives back what [`admit`](Self::admit) reserved ([`unadmit_per_ip`](Self::unadmit_per_ip));
    /// refused once its PROXY protocol header named the client, it was admitted and closes
    /// for that reason as any connection does.
    pub(crate) fn ip_place(&self, client: std::net::IpAddr, max: usize) -> Option<IpSlot> {
        let slot = self.per_ip.acquire(client, max);
        if slot.is_none() {
            tracing::debug!("max_connections_per_ip reached; closing");
            self.rejected_per_ip.fetch_add(1, Ordering::Relaxed);
        }
        slot
    }

    /// Takes back a slot [`admit`](Self::admit) reserved for a connection that
    /// [`ip_place`](Self::ip_place) refused at accept.
    pub(crate) fn unadmit_per_ip(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        observe::closed(Reason::MaxConnectionsPerIp);
    }

    /// Counts `n` HTTP/1.x requests.
    pub(crate) fn http1_requests(&self, n: u64) {
        self.http1_requests.fetch_add(n, Ordering::Relaxed);
        observe::requests(Protocol::Http1, n);
    }

    /// Counts an HTTP/2 stream (a request).
    pub(crate) fn http2_stream(&self) {
        self.http2_streams.fetch_add(1, Ordering::Relaxed);
        observe::requests(Protocol::H2, 1);
    }

    /// Counts a connection told to close by a limit.
    pub(crate) fn limit_reached(&self, why: Limit) {
        match why {
            Limit::Age => &self.max_age_reached,
            Limit::Requests => &self.max_requests_reached,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Logs and counts a panic that was contained (`what` says where it happened).
    pub(crate) fn contained_panic(&self, what: &str, panic: &(dyn std::any::Any + Send)) {
        self.panics.fetch_add(1, Ordering::Relaxed);
        crate::logs::error_limited!(
            panic = crate::logs::panic_message(panic),
            "{what} panicked; contained"
        );
    }

    /// Releases a connection slot: counted as forced when the drain timeout closed it, as
    /// drained when it closed during a shutdown. `why` it closed, as far as its backend could
    /// tell (reported; a drain stands for a close that had no reason of its own).
    pub(crate) fn release(&self, forced: bool, why: Reason) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        let why = if forced {
            self.forced.fetch_add(1, Ordering::Relaxed);
            Reason::Forced
        } else if self.draining() {
            self.drained.fetch_add(1, Ordering::Relaxed);
            match why {
                Reason::Closed => Reason::Drain,
                why => why,
            }
        } else {
            why
        };
        observe::closed(why);
    }
}
