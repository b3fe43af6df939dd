//! Settings and shared state, below the public front: the [`Backend`] choice, `Config` (what a
//! [`crate::Builder`] sets, read by both backends; `TcpConfig` for read handlers), `Control` (shutdown state and counters,
//! shared by the front, the backend threads and every [`crate::Handle`]) and [`Stats`] (a
//! snapshot of those counters). The front (`server`) and the backends (`reactor`, `baseline`,
//! `driver`) and the read handlers (`tcp`) import from here; this module imports none of them.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    pub(crate) header_read_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_buf_size: Option<usize>,
    pub(crate) max_headers: Option<usize>,
    pub(crate) pipeline_flush: bool,
    pub(crate) drain_timeout: Duration,
    pub(crate) tcp_keepalive: Option<Duration>,
    pub(crate) park_after: Option<Duration>,
    pub(crate) compat_workers: usize,
    pub(crate) tcp: TcpConfig,
    pub(crate) http2: Http2Config,
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
            header_read_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(60)),
            max_buf_size: None,
            max_headers: None,
            pipeline_flush: true,
            drain_timeout: Duration::from_secs(30),
            tcp_keepalive: None,
            park_after: Some(Duration::from_millis(250)),
            compat_workers: 1,
            tcp: TcpConfig::default(),
            http2: Http2Config::default(),
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            tls: None,
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
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
            .header_read_timeout(header_read_timeout);
        if let Some(n) = self.max_buf_size {
            b.max_buf_size(n);
        }
        if let Some(n) = self.max_headers {
            b.max_headers(n);
        }
        b
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
            .keep_alive_interval(self.keep_alive_interval)
            .keep_alive_timeout(self.keep_alive_timeout)
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
    pub(crate) local_addr: Mutex<Option<SocketAddr>>,
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
        }
    }

    /// Reserves a connection slot under `max`; `false` (and counted) when full.
    pub(crate) fn admit(&self, max: usize) -> bool {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if self.active.fetch_add(1, Ordering::AcqRel) >= max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Logs and counts a panic that was contained (`what` says where it happened).
    pub(crate) fn contained_panic(&self, what: &str, panic: &(dyn std::any::Any + Send)) {
        self.panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            panic = crate::service::panic_message(panic),
            "{what} panicked; contained"
        );
    }

    /// Releases a connection slot: counted as forced when the drain timeout closed it, as
    /// drained when it closed during a shutdown.
    pub(crate) fn release(&self, forced: bool) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        if forced {
            self.forced.fetch_add(1, Ordering::Relaxed);
        } else if self.draining() {
            self.drained.fetch_add(1, Ordering::Relaxed);
        }
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
