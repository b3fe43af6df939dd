//! What the connection limits and the open-connection gauges share, below the settings and
//! both backends (issue 24): the per-IP connection count ([`PerIp`], touched only at accept and
//! at close, its entries removed at zero, and the [`IpSlot`] each admitted connection holds
//! until its socket closes), the gauges of what is open by kind ([`OpenCounts`], for the drain
//! log, and each read-handler connection's [`OpenGuard`]), the reason a connection was told to
//! close ([`Limit`]), and the one rule both backends apply to an idle connection past its age
//! ([`age_idle_close`]). It knows nothing of connections beyond an address and a count. The
//! gauges are also reported through `crate::observe` where they change (feature `metrics`).

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::observe::{self, Open};

/// Shards of the per-IP map: accepts on different pollers rarely wait for each other.
const SHARDS: usize = 16;

/// How long a keep-alive connection past its `max_connection_age` may stay idle before it is
/// closed: a client sending requests more often than this sees `Connection: close` on a
/// response instead of racing the close with its next request.
pub(crate) const AGE_IDLE_GRACE: Duration = Duration::from_secs(1);

/// When an idle connection past its age closes: `max(age deadline, idle since + grace)`.
pub(crate) fn age_idle_close(age_deadline: Instant, idle_since: Instant) -> Instant {
    age_deadline.max(crate::rt::timer::deadline(idle_since, AGE_IDLE_GRACE))
}

/// Makes `res` its connection's last response (`Connection: close`, which hyper honours by
/// closing after it), unless it is a `101`, whose connection goes on as another protocol.
/// Whether it did.
pub(crate) fn close_response<B>(res: &mut http::Response<B>) -> bool {
    if res.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        return false;
    }
    res.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    true
}

/// Open connections by client IP, for `max_connections_per_ip`.
pub(crate) struct PerIp {
    shards: Box<[Mutex<HashMap<IpAddr, usize>>]>,
}

impl Default for PerIp {
    fn default() -> Self {
        PerIp {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl fmt::Debug for PerIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerIp").finish_non_exhaustive()
    }
}

impl PerIp {
    fn shard(&self, ip: &IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ip.hash(&mut h);
        self.shards[h.finish() as usize % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a connection from `ip` if it has fewer than `max` open; the slot it holds until
    /// it closes, or `None` (nothing counted) at the limit. An IPv4 address mapped into IPv6
    /// counts as the IPv4 address.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        let mut map = self.shard(&ip);
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                map.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: self.clone(),
            ip,
        })
    }

    fn release(&self, ip: &IpAddr) {
        let mut map = self.shard(ip);
        if let Some(n) = map.get_mut(ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(ip);
            }
        }
    }

    /// Connections counted for `ip` now (tests).
    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        self.shard(&ip.to_canonical())
            .get(&ip.to_canonical())
            .copied()
            .unwrap_or(0)
    }

    /// Addresses in the map (tests): entries at zero are gone.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// One connection's place in its IP's count, given back when dropped: it goes with the socket
/// (the reactor's descriptor, the tokio backend's stream or task), so every way a connection
/// closes gives it back once, and a connection handed between pollers keeps it.
pub(crate) struct IpSlot {
    map: Arc<PerIp>,
    ip: IpAddr,
}

impl fmt::Debug for IpSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpSlot").field("ip", &self.ip).finish()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.map.release(&self.ip);
    }
}

/// Why a connection was told to close by a limit (counted in `Stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `max_connection_age`.
    Age,
    /// `max_requests_per_connection`.
    Requests,
}

impl From<Limit> for crate::observe::Reason {
    fn from(why: Limit) -> Self {
        match why {
            Limit::Age => crate::observe::Reason::MaxConnectionAge,
            Limit::Requests => crate::observe::Reason::MaxRequests,
        }
    }
}

/// What a connection counts as in the open gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenKind {
    /// `hop::ws`, or a hijack of a request that asked `Upgrade: websocket`.
    WebSocket,
    /// A `hop::sse` subscriber.
    Sse,
    /// Any other read handler: `hop::tcp`'s, a hijack.
    Tcp,
}

/// Gauges of open connections by kind, and the totals of WebSocket and SSE connections opened.
#[derive(Debug, Default)]
pub(crate) struct OpenCounts {
    /// HTTP connections (HTTP/1.1, HTTP/2, TLS or not), counted by the backends.
    pub(crate) http: AtomicUsize,
    ws: AtomicUsize,
    sse: AtomicUsize,
    tcp: AtomicUsize,
    pub(crate) ws_total: AtomicU64,
    pub(crate) sse_total: AtomicU64,
}

/// What is open, as the drain log writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenNow {
    pub(crate) http: usize,
    pub(crate) ws: usize,
    pub(crate) sse: usize,
    pub(crate) tcp: usize,
}

impl fmt::Display for OpenNow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} HTTP, {} WebSocket, {} SSE, {} TCP",
            self.http, self.ws, self.sse, self.tcp
        )
    }
}

impl OpenKind {
    fn observed(self) -> Open {
        match self {
            OpenKind::WebSocket => Open::Ws,
            OpenKind::Sse => Open::Sse,
            OpenKind::Tcp => Open::Tcp,
        }
    }
}

impl OpenCounts {
    fn gauge(&self, kind: OpenKind) -> &AtomicUsize {
        match kind {
            OpenKind::WebSocket => &self.ws,
            OpenKind::Sse => &self.sse,
            OpenKind::Tcp => &self.tcp,
        }
    }

    /// What is open now.
    pub(crate) fn now(&self) -> OpenNow {
        OpenNow {
            http: self.http.load(Ordering::Relaxed),
            ws: self.ws.load(Ordering::Relaxed),
            sse: self.sse.load(Ordering::Relaxed),
            tcp: self.tcp.load(Ordering::Relaxed),
        }
    }

    /// Counts an HTTP connection open (as HTTP/1.1 until [`H2Open`] says otherwise).
    pub(crate) fn http_opened(&self) {
        self.http.fetch_add(1, Ordering::Relaxed);
        observe::opened(Open::Http1);
    }

    /// Counts an HTTP connection closed (or taken over by a read handler).
    pub(crate) fn http_closed(&self) {
        if self
            .http
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            observe::left(Open::Http1);
        }
    }
}

/// Counts an HTTP connection as HTTP/2 rather than HTTP/1.1 in the reported gauges while it
/// lives (held by hyper's HTTP/2 connection on the reactor, by the connection's task on the
/// tokio backend, so it is dropped before the connection's `http_closed`). Empty without the
/// `metrics` feature.
pub(crate) struct H2Open(());

impl H2Open {
    pub(crate) fn new() -> Self {
        observe::left(Open::Http1);
        observe::opened(Open::H2);
        H2Open(())
    }
}

impl Drop for H2Open {
    fn drop(&mut self) {
        observe::left(Open::H2);
        observe::opened(Open::Http1);
    }
}

/// Counts one connection in a reported gauge (TLS, parked) until dropped.
#[derive(Debug)]
pub(crate) struct Gauged(Open);

impl Gauged {
    pub(crate) fn new(kind: Open) -> Self {
        observe::opened(kind);
        Gauged(kind)
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        observe::left(self.0);
    }
}

/// Counts a read-handler connection open (and a WebSocket or SSE one in its total) until it is
/// dropped.
pub(crate) struct OpenGuard {
    counts: Arc<OpenCounts>,
    kind: OpenKind,
    /// It took its HTTP connection's place in the `http` gauge, given back when dropped.
    took_http: bool,
}

impl OpenGuard {
    pub(crate) fn new(counts: Arc<OpenCounts>, kind: OpenKind) -> Self {
        counts.gauge(kind).fetch_add(1, Ordering::Relaxed);
        observe::opened(kind.observed());
        match kind {
            OpenKind::WebSocket => counts.ws_total.fetch_add(1, Ordering::Relaxed),
            OpenKind::Sse => counts.sse_total.fetch_add(1, Ordering::Relaxed),
            OpenKind::Tcp => 0,
        };
        OpenGuard {
            counts,
            kind,
            took_http: false,
        }
    }

    /// Counts the HTTP connection this runs on as this kind instead, until dropped (an SSE
    /// stream that is its HTTP/1.1 connection's last response, under the tokio backend).
    pub(crate) fn instead_of_http(mut self) -> Self {
        self.counts.http_closed();
        self.took_http = true;
        self
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.took_http {
            self.counts.http_opened();
        }
        if self
            .counts
            .gauge(self.kind)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            observe::left(self.kind.observed());
        }
    }
}

impl fmt::Debug for OpenGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenGuard")
            .field("kind", &self.kind)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_counts_up_to_the_limit_and_forgets_addresses_at_zero() {
        let map = Arc::new(PerIp::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let s1 = map.acquire(a, 2).expect("first");
        let s2 = map
            .acquire(mapped, 2)
            .expect("second, the same address mapped");
        assert!(map.acquire(a, 2).is_none(), "third refused");
        let s3 = map.acquire(b, 2).expect("another address");
        assert_eq!(map.open(a), 2);
        drop(s1);
        let s4 = map.acquire(a, 2).expect("one closed: room again");
        drop((s2, s3, s4));
        assert_eq!(map.open(a), 0);
        assert_eq!(map.len(), 0, "no entry left at zero");
        assert!(map.acquire(a, 0).is_none());
        assert_eq!(map.len(), 0, "a refusal leaves no entry");
        let many: Vec<IpSlot> = (0..1000)
            .map(|_| map.acquire(a, usize::MAX).unwrap())
            .collect();
        assert_eq!(map.open(a), 1000);
        drop(many);
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn guards_count_open_and_total() {
        let counts = Arc::new(OpenCounts::default());
        let ws = OpenGuard::new(counts.clone(), OpenKind::WebSocket);
        let sse = OpenGuard::new(counts.clone(), OpenKind::Sse);
        let tcp = OpenGuard::new(counts.clone(), OpenKind::Tcp);
        counts.http.fetch_add(2, Ordering::Relaxed);
        assert_eq!(
            counts.now().to_string(),
            "2 HTTP, 1 WebSocket, 1 SSE, 1 TCP"
        );
        drop((ws, sse, tcp));
        counts.http_closed();
        counts.http_closed();
        counts.http_closed();
        assert_eq!(
            counts.now(),
            OpenNow {
                http: 0,
                ws: 0,
                sse: 0,
                tcp: 0
            }
        );
        assert_eq!(counts.ws_total.load(Ordering::Relaxed), 1);
        assert_eq!(counts.sse_total.load(Ordering::Relaxed), 1);
    }
}
