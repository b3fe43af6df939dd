//! Settings and shared state, below the public front: the [`Backend`] choice, `Config` (what a
//! [`crate::Builder`] sets, read by both backends; `TcpConfig` for read handlers), `Control` (shutdown state and counters,
//! shared by the front, the backend threads and every [`crate::Handle`]) and [`Stats`] (a
//! snapshot of those counters). The front (`server`) and the backends (`reactor`, `baseline`,
//! `driver`) and the read handlers (`tcp`) import from here; this module imports none of them.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::limits::{IpSlot, Limit, OpenCounts, PerIp};
use crate::observe::{self, Protocol, Reason};

/// Which transport drives the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// hop's event loop: N poller threads, each connection polled in place (the default).
    Reactor,
    /// tokio + hyper-util, one task per connection: the baseline hop is measured against.
    /// Needs the `tokio-baseline` feature (on by default).
    Tokio,
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "reactor" | "hop" | "mio" => Ok(Backend::Reactor),
            "tokio" | "baseline" => Ok(Backend::Tokio),
            other => Err(format!(
                "unknown backend {other:?} (expected reactor or tokio)"
            )),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Reactor => "reactor",
            Backend::Tokio => "tokio",
        })
    }
}

impl Backend {
    /// The backend named by the `HOP_BACKEND` environment variable, if set and valid.
    pub fn from_env() -> Option<Backend> {
        let v = std::env::var("HOP_BACKEND").ok()?;
        match v.parse() {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!("ignoring HOP_BACKEND: {e}");
                None
            }
        }
    }
}

/// Settings shared by both backends.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) backend: Option<Backend>,
    pub(crate) pollers: usize,
    pub(crate) backlog: i32,
    pub(crate) max_connections: usize,
    /// Limits per client and per connection (issue 24): all off by default.
    pub(crate) limits: LimitsConfig,
    pub(crate) header_read_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_buf_size: Option<usize>,
    pub(crate) max_headers: Option<usize>,
    pub(crate) pipeline_flush: bool,
    pub(crate) drain_timeout: Duration,
    pub(crate) tcp_tuning: crate::tuning::TcpTuning,
    pub(crate) park_after: Option<Duration>,
    pub(crate) compat_workers: usize,
    pub(crate) tcp: TcpConfig,
    pub(crate) http2: Http2Config,
    /// A request body that brings no bytes for this long, while the handler waits for it, ends
    /// its request: 408 on HTTP/1.1, RST_STREAM on HTTP/2.
    pub(crate) request_body_timeout: Option<Duration>,
    /// Every connection starts with a PROXY protocol header (`crate::proxy`).
    pub(crate) proxy_protocol: bool,
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub(crate) tls: Option<crate::tls::RustlsConfig>,
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub(crate) tls_handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: None,
            pollers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backlog: 1024,
            max_connections: usize::MAX,
            limits: LimitsConfig::default(),
            header_read_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(60)),
            max_buf_size: None,
            max_headers: None,
            pipeline_flush: true,
            drain_timeout: Duration::from_secs(30),
            tcp_tuning: Default::default(),
            park_after: Some(Duration::from_millis(250)),
            compat_workers: 1,
            tcp: TcpConfig::default(),
            http2: Http2Config::default(),
            request_body_timeout: Some(Duration::from_secs(30)),
            proxy_protocol: false,
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            tls: None,
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Most poller, worker or compat threads a server may start.
pub(crate) const MAX_THREADS: usize = 1024;

/// During a drain, how long a new connection that has sent nothing yet may wait for its first
/// request (which it then gets answered): long enough for a request that was on its way when
/// the connection was accepted, short enough that idle pre-connected sockets do not hold the
/// drain.
pub(crate) const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Most headers per request hop lets hyper take: hyper makes room for every one of them on each
/// read of a request head.
pub(crate) const MAX_HEADERS: usize = 10_000;

/// hyper's smallest `max_buf_size` (its builder panics under it).
const MIN_BUF_SIZE: usize = 8192;

/// HTTP/2's largest flow-control window (RFC 9113 §6.9.1) and its frame-size range (§6.5.2).
const MAX_WINDOW: u32 = (1 << 31) - 1;
const FRAME_SIZES: std::ops::RangeInclusive<u32> = (1 << 14)..=((1 << 24) - 1);

/// A setting refused by [`Config::validate`]: `serve` returns it.
fn refused(setting: &str, why: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("hop: {setting}: {why}"),
    )
}

/// A timeout that zero would turn into "close at once": `None` turns it off instead.
fn not_zero(setting: &str, t: Option<Duration>) -> io::Result<()> {
    match t {
        Some(Duration::ZERO) => Err(refused(
            setting,
            "zero would close every connection at once; `None` turns it off",
        )),
        _ => Ok(()),
    }
}

impl Config {
    /// Checks every setting before a server starts: each one either works over its whole range
    /// (`Duration::MAX` is "never", huge sizes are "unbounded") or is refused here with an
    /// `InvalidInput` error that names it, rather than panicking later in hop, hyper or h2.
    pub(crate) fn validate(&self) -> io::Result<()> {
        for (setting, n) in [
            ("pollers", self.pollers),
            ("compat_workers", self.compat_workers),
        ] {
            if n > MAX_THREADS {
                return Err(refused(
                    setting,
                    format!("{n} is over {MAX_THREADS} threads"),
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(refused(
                "max_connections",
                "0 would refuse every connection",
            ));
        }
        self.limits.validate()?;
        not_zero("header_read_timeout", self.header_read_timeout)?;
        not_zero("idle_timeout", self.idle_timeout)?;
        not_zero("read_timeout", self.tcp.read_timeout)?;
        not_zero("request_body_timeout", self.request_body_timeout)?;
        not_zero("http2_idle_timeout", self.http2.idle_timeout)?;
        not_zero("http2_keep_alive_interval", self.http2.keep_alive_interval)?;
        not_zero(
            "http2_keep_alive_timeout",
            Some(self.http2.keep_alive_timeout),
        )?;
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        not_zero("tls_handshake_timeout", Some(self.tls_handshake_timeout))?;
        if let Some(n) = self.max_buf_size.filter(|&n| n < MIN_BUF_SIZE) {
            return Err(refused(
                "max_buf_size",
                format!("{n} is under hyper's minimum of {MIN_BUF_SIZE}"),
            ));
        }
        if let Some(n) = self.max_headers.filter(|&n| n > MAX_HEADERS) {
            return Err(refused("max_headers", format!("{n} is over {MAX_HEADERS}")));
        }
        let h2 = &self.http2;
        for (setting, n) in [
            (
                "http2_initial_stream_window_size",
                h2.initial_stream_window_size,
            ),
            (
                "http2_initial_connection_window_size",
                h2.initial_connection_window_size,
            ),
        ] {
            if n > MAX_WINDOW {
                return Err(refused(
                    setting,
                    format!("{n} is over HTTP/2's largest window, {MAX_WINDOW}"),
                ));
            }
        }
        if !FRAME_SIZES.contains(&h2.max_frame_size) {
            return Err(refused(
                "http2_max_frame_size",
                format!(
                    "{} is outside HTTP/2's range, {} to {}",
                    h2.max_frame_size,
                    FRAME_SIZES.start(),
                    FRAME_SIZES.end()
                ),
            ));
        }
        if h2.max_send_buf_size > u32::MAX as usize {
            return Err(refused(
                "http2_max_send_buf_size",
                format!("{} is over {}", h2.max_send_buf_size, u32::MAX),
            ));
        }
        if h2.max_send_buf_size == 0 {
            return Err(refused(
                "http2_max_send_buf_size",
                "0 would stall every response (h2 could buffer none of it)",
            ));
        }
        Ok(())
    }

    /// The hyper `http1` builder both backends start from.
    pub(crate) fn http1(
        &self,
        header_read_timeout: Option<Duration>,
    ) -> hyper::server::conn::http1::Builder {
        let mut b = hyper::server::conn::http1::Builder::new();
        // hyper's own `pipeline_flush` mode is never used: it skips flushing while request
        // bytes are buffered (so a 400/431 or a 101 can be lost) and removes write
        // backpressure. The reactor coalesces writes itself (see `stream`).
        b.pipeline_flush(false)
            .header_read_timeout(header_read_timeout.map(crate::rt::timer::cap));
        if let Some(n) = self.max_buf_size {
            b.max_buf_size(n);
        }
        if let Some(n) = self.max_headers {
            b.max_headers(n);
        }
        b
    }
}

/// The limits per client and per connection (see [`crate::Builder::max_connections_per_ip`],
/// [`crate::Builder::max_connection_age`], [`crate::Builder::max_requests_per_connection`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct LimitsConfig {
    pub(crate) per_ip: Option<usize>,
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_requests: Option<usize>,
}

impl LimitsConfig {
    fn validate(&self) -> io::Result<()> {
        if self.per_ip == Some(0) {
            return Err(refused(
                "max_connections_per_ip",
                "0 would refuse every connection",
            ));
        }
        if self.max_age == Some(Duration::ZERO) {
            return Err(refused(
                "max_connection_age",
                "zero would end every connection at once; `Duration::MAX` is never",
            ));
        }
        if self.max_requests == Some(0) {
            return Err(refused(
                "max_requests_per_connection",
                "0 would close every connection before its first request",
            ));
        }
        Ok(())
    }

    /// The request limit as a count to compare with (`u64::MAX`: none).
    pub(crate) fn max_requests(&self) -> u64 {
        self.max_requests.map_or(u64::MAX, |n| n as u64)
    }
}

/// HTTP/2 settings (see the `http2_*` methods of [`crate::Builder`] for what each does and
/// why its default is what it is).
#[derive(Debug, Clone)]
pub(crate) struct Http2Config {
    /// Serve HTTP/2 with prior knowledge (h2c) next to HTTP/1.1.
    pub(crate) enabled: bool,
    pub(crate) max_concurrent_streams: u32,
    pub(crate) initial_stream_window_size: u32,
    pub(crate) initial_connection_window_size: u32,
    pub(crate) max_frame_size: u32,
    pub(crate) max_header_list_size: u32,
    pub(crate) max_send_buf_size: usize,
    pub(crate) keep_alive_interval: Option<Duration>,
    pub(crate) keep_alive_timeout: Duration,
    /// A connection with no open stream for this long is sent GOAWAY and closed.
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_pending_accept_reset_streams: usize,
    pub(crate) max_local_error_reset_streams: usize,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            enabled: true,
            max_concurrent_streams: 100,
            initial_stream_window_size: 256 * 1024,
            initial_connection_window_size: 1024 * 1024,
            max_frame_size: 16 * 1024,
            max_header_list_size: 16 * 1024,
            max_send_buf_size: 128 * 1024,
            keep_alive_interval: None,
            keep_alive_timeout: Duration::from_secs(20),
            idle_timeout: Some(Duration::from_secs(60)),
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
        }
    }
}

impl Http2Config {
    /// hyper's `http2` builder with these settings, over executor `exec`. A timer is set (for
    /// keep-alive pings, its only use in hyper's HTTP/2 server) only when pings are on.
    pub(crate) fn builder<E>(&self, exec: E) -> hyper::server::conn::http2::Builder<E> {
        let mut b = hyper::server::conn::http2::Builder::new(exec);
        b.max_concurrent_streams(self.max_concurrent_streams)
            .initial_stream_window_size(self.initial_stream_window_size)
            .initial_connection_window_size(self.initial_connection_window_size)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_send_buf_size(self.max_send_buf_size)
            .max_pending_accept_reset_streams(self.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(self.max_local_error_reset_streams)
            .keep_alive_interval(self.keep_alive_interval.map(crate::rt::timer::cap))
            .keep_alive_timeout(crate::rt::timer::cap(self.keep_alive_timeout))
            // RFC 8441: WebSockets over HTTP/2 (axum's `WebSocketUpgrade` accepts them).
            .enable_connect_protocol();
        if self.keep_alive_interval.is_some() {
            b.timer(hyper_util::rt::TokioTimer::new());
        }
        b
    }
}

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
    /// Reactor: response bodies sent from a file with `sendfile(2)` ([`crate::fs`]).
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
            panic = crate::service::panic_message(panic),
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

/// Buffer sizes and timeouts of read-handler connections (set on [`crate::Builder`]).
#[derive(Debug, Clone)]
pub(crate) struct TcpConfig {
    /// Bytes asked of the socket per read.
    pub(crate) read_chunk: usize,
    /// Most unread input held; reading pauses there until the handler consumes.
    pub(crate) max_input: usize,
    /// The high-water mark of queued output: writes are refused while the queue is at or
    /// above it.
    pub(crate) max_output: usize,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    /// How long a closing connection may take to flush (see [`crate::Builder::close_timeout`]).
    pub(crate) close_timeout: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            read_chunk: 16 * 1024,
            max_input: 1024 * 1024,
            max_output: 1024 * 1024,
            read_timeout: None,
            idle_timeout: Some(Duration::from_secs(60)),
            close_timeout: Duration::from_secs(10),
        }
    }
}
