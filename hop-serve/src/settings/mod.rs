//! Settings and shared state, below the public front: the [`Backend`] choice, `Config` (what a
//! [`crate::Builder`] sets, read by both backends; `TcpConfig` for read handlers), `Control` (shutdown state and counters,
//! shared by the front, the backend threads and every [`crate::Handle`]) and [`Stats`] (a
//! snapshot of those counters). The front (`server`) and the backends (`reactor`, `baseline`,
//! `driver`) and the read handlers (`tcp`) import from here; this module imports none of them.
//!
//! The files: `mod` (the [`Backend`] choice; `Config` and its defaults, with the limits',
//! HTTP/2's and read handlers' settings, and hyper's builders made from them), `check` (every
//! setting's range, checked before a server starts: `Config::validate`), `control` (`Control`,
//! the shutdown state and counters; [`Stats`], a snapshot of them; `Place`, a tokio-backend
//! connection's place in those counts).

mod check;
mod control;

pub use control::Stats;
pub(crate) use control::{Control, Place};

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Which transport drives the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// hop's event loop: N poller threads, each connection polled in place (the default).
    Reactor,
    /// tokio + hyper-util, one task per connection: the baseline hop is measured against.
    /// Needs the `tokio-baseline` feature.
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
    /// The backend named by the `HOP_BACKEND` environment variable, if set, valid and built
    /// (`tokio` needs the `tokio-baseline` feature).
    pub fn from_env() -> Option<Backend> {
        let v = std::env::var("HOP_BACKEND").ok()?;
        match v.parse() {
            #[cfg(not(feature = "tokio-baseline"))]
            Ok(Backend::Tokio) => {
                tracing::warn!(
                    "ignoring HOP_BACKEND={v}: the tokio backend needs hop-serve's \
                     `tokio-baseline` feature"
                );
                None
            }
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
