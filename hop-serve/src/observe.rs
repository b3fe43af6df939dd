//! What hop reports about its connections, at the bottom of the crate (it imports nothing of
//! hop's): with the `metrics` feature, counters and gauges through the `metrics` facade (the
//! names, the fixed sets of label values, the handles registered once per process) and a
//! debug-level `tracing` span per connection; without it, every function here is empty and
//! inlined away, so nothing is added. The backends and the counters in `settings` and `limits`
//! call it where they already count an event (one call per event), never with a label value a
//! peer chooses.
//!
//! Handles are registered with the recorder installed when the first server of the process
//! starts (install yours before that), then reused: an event costs a call on a handle, not a
//! lookup by name.

// Without the feature, what only the feature uses is left unused.
#![cfg_attr(not(feature = "metrics"), allow(dead_code))]

/// Why a connection closed: the `reason` label of `hop_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// It ended as its protocol ends: the peer closed it, a response said `Connection: close`
    /// (the app's, HTTP/1.0's), an HTTP/2 peer's GOAWAY, a read handler closed it.
    Closed,
    /// An I/O or protocol error, a failed TLS handshake, a panic that closed it, a make-service
    /// that refused it.
    Error,
    /// `header_read_timeout` (also a new connection that sent nothing).
    HeaderTimeout,
    /// `idle_timeout` (keep-alive, `hop::tcp` listeners, read handlers' `read_timeout`, HTTP/2's
    /// idle GOAWAY).
    IdleTimeout,
    /// `request_body_timeout`.
    RequestBodyTimeout,
    /// `tls_handshake_timeout`.
    TlsHandshakeTimeout,
    /// `hop::ws`'s keep-alive ping went unanswered.
    WsPingTimeout,
    /// Refused at accept: `max_connections`.
    MaxConnections,
    /// Refused at accept: `max_connections_per_ip`.
    MaxConnectionsPerIp,
    /// `max_connection_age`.
    MaxConnectionAge,
    /// `max_requests_per_connection`.
    MaxRequests,
    /// A PROXY protocol header malformed, missing or late.
    ProxyHeader,
    /// Closed by a graceful shutdown, or ended during one.
    Drain,
    /// Cut at the drain deadline.
    Forced,
}

impl Reason {
    /// Every reason, in the order of [`Reason::index`].
    #[cfg(feature = "metrics")]
    const ALL: [Reason; 14] = [
        Reason::Closed,
        Reason::Error,
        Reason::HeaderTimeout,
        Reason::IdleTimeout,
        Reason::RequestBodyTimeout,
        Reason::TlsHandshakeTimeout,
        Reason::WsPingTimeout,
        Reason::MaxConnections,
        Reason::MaxConnectionsPerIp,
        Reason::MaxConnectionAge,
        Reason::MaxRequests,
        Reason::ProxyHeader,
        Reason::Drain,
        Reason::Forced,
    ];

    /// The label value.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::Closed => "closed",
            Reason::Error => "error",
            Reason::HeaderTimeout => "header_timeout",
            Reason::IdleTimeout => "idle_timeout",
            Reason::RequestBodyTimeout => "request_body_timeout",
            Reason::TlsHandshakeTimeout => "tls_handshake_timeout",
            Reason::WsPingTimeout => "ws_ping_timeout",
            Reason::MaxConnections => "max_connections",
            Reason::MaxConnectionsPerIp => "max_connections_per_ip",
            Reason::MaxConnectionAge => "max_connection_age",
            Reason::MaxRequests => "max_requests",
            Reason::ProxyHeader => "proxy_header",
            Reason::Drain => "drain",
            Reason::Forced => "forced",
        }
    }

    #[cfg(feature = "metrics")]
    fn index(self) -> usize {
        self as usize
    }
}

/// What an open connection counts as: the `kind` label of `hop_connections_open` (the first
/// five, one of which each open connection is), and the two gauges that count a subset of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    Http1,
    H2,
    Ws,
    Sse,
    Tcp,
    /// `hop_connections_tls_open`: over TLS, whatever their kind.
    Tls,
    /// `hop_connections_parked`: reactor, idle HTTP/1.1 connections parked down to their socket.
    Parked,
}

/// The protocol of a request: the `protocol` label of `hop_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    H2,
}

/// The metric names (the README's "Metrics and tracing" lists them).
#[cfg(feature = "metrics")]
mod names {
    /// Counter: connections accepted (those refused at once by a limit included).
    pub(super) const ACCEPTED: &str = "hop_connections_accepted_total";
    /// Counter, label `reason`: connections closed.
    pub(super) const CLOSED: &str = "hop_connections_closed_total";
    /// Gauge, label `kind` (`http1`, `h2`, `ws`, `sse`, `tcp`): connections open.
    pub(super) const OPEN: &str = "hop_connections_open";
    /// Gauge: connections open over TLS.
    pub(super) const TLS_OPEN: &str = "hop_connections_tls_open";
    /// Gauge: HTTP/1.1 connections parked (reactor).
    pub(super) const PARKED: &str = "hop_connections_parked";
    /// Counter, label `protocol` (`http1`, `h2`): requests.
    pub(super) const REQUESTS: &str = "hop_requests_total";
    /// Counter: bytes read from connections' sockets (TLS records as they came).
    pub(super) const BYTES_RECEIVED: &str = "hop_bytes_received_total";
    /// Counter: bytes written to connections' sockets.
    pub(super) const BYTES_SENT: &str = "hop_bytes_sent_total";
}

#[cfg(feature = "metrics")]
mod on {
    use super::{names, Open, Protocol, Reason};
    use metrics::{Counter, Gauge, Unit};
    use std::sync::OnceLock;

    /// The handles, registered once.
    pub(super) struct Meters {
        pub(super) accepted: Counter,
        pub(super) closed: [Counter; Reason::ALL.len()],
        pub(super) open: [Gauge; 7],
        pub(super) requests: [Counter; 2],
        pub(super) bytes_in: Counter,
        pub(super) bytes_out: Counter,
    }

    static METERS: OnceLock<Meters> = OnceLock::new();

    pub(super) fn meters() -> &'static Meters {
        METERS.get_or_init(register)
    }

    fn register() -> Meters {
        metrics::describe_counter!(names::ACCEPTED, "Connections accepted");
        metrics::describe_counter!(names::CLOSED, "Connections closed, by reason");
        metrics::describe_gauge!(names::OPEN, "Connections open, by kind");
        metrics::describe_gauge!(names::TLS_OPEN, "Connections open over TLS");
        metrics::describe_gauge!(names::PARKED, "Idle HTTP/1.1 connections parked");
        metrics::describe_counter!(names::REQUESTS, "Requests, by protocol");
        metrics::describe_counter!(
            names::BYTES_RECEIVED,
            Unit::Bytes,
            "Bytes read from connections"
        );
        metrics::describe_counter!(
            names::BYTES_SENT,
            Unit::Bytes,
            "Bytes written to connections"
        );
        let kind = |k: &'static str| metrics::gauge!(names::OPEN, "kind" => k);
        Meters {
            accepted: metrics::counter!(names::ACCEPTED),
            closed: Reason::ALL.map(|r| metrics::counter!(names::CLOSED, "reason" => r.label())),
            open: [
                kind("http1"),
                kind("h2"),
                kind("ws"),
                kind("sse"),
                kind("tcp"),
                metrics::gauge!(names::TLS_OPEN),
                metrics::gauge!(names::PARKED),
            ],
            requests: [
                metrics::counter!(names::REQUESTS, "protocol" => "http1"),
                metrics::counter!(names::REQUESTS, "protocol" => "h2"),
            ],
            bytes_in: metrics::counter!(names::BYTES_RECEIVED),
            bytes_out: metrics::counter!(names::BYTES_SENT),
        }
    }

    pub(super) fn gauge(kind: Open) -> &'static Gauge {
        &meters().open[kind as usize]
    }

    pub(super) fn requests(p: Protocol) -> &'static Counter {
        &meters().requests[p as usize]
    }
}

/// Registers the handles with the recorder installed now, if no server of this process did
/// before (a server calls it as it starts).
#[inline]
pub(crate) fn start() {
    #[cfg(feature = "metrics")]
    let _ = on::meters();
}

/// A connection accepted.
#[inline]
pub(crate) fn accepted() {
    #[cfg(feature = "metrics")]
    on::meters().accepted.increment(1);
}

/// A connection closed (once per connection).
#[inline]
pub(crate) fn closed(why: Reason) {
    #[cfg(feature = "metrics")]
    on::meters().closed[why.index()].increment(1);
    let _ = why;
}

/// One more connection open as `kind`.
#[inline]
pub(crate) fn opened(kind: Open) {
    #[cfg(feature = "metrics")]
    on::gauge(kind).increment(1.0);
    let _ = kind;
}

/// One fewer connection open as `kind`.
#[inline]
pub(crate) fn left(kind: Open) {
    #[cfg(feature = "metrics")]
    on::gauge(kind).decrement(1.0);
    let _ = kind;
}

/// `n` requests served.
#[inline]
pub(crate) fn requests(p: Protocol, n: u64) {
    #[cfg(feature = "metrics")]
    on::requests(p).increment(n);
    let _ = (p, n);
}

/// Bytes a connection read and wrote since it last reported them.
#[inline]
pub(crate) fn bytes(read: u64, written: u64) {
    #[cfg(feature = "metrics")]
    {
        let m = on::meters();
        if read > 0 {
            m.bytes_in.increment(read);
        }
        if written > 0 {
            m.bytes_out.increment(written);
        }
    }
    let _ = (read, written);
}

/// A connection's running byte totals, kept beside its socket (one writer at a time: the
/// poller, or the task an upgrade handed the socket to) and reported once, when it is dropped,
/// so a read or write costs two plain memory operations, not a call into the recorder. Empty
/// without the `metrics` feature.
#[derive(Debug, Default)]
pub(crate) struct ByteTally {
    #[cfg(feature = "metrics")]
    read: std::sync::atomic::AtomicU64,
    #[cfg(feature = "metrics")]
    written: std::sync::atomic::AtomicU64,
}

impl ByteTally {
    /// `n` bytes read.
    #[inline]
    pub(crate) fn read(&self, n: usize) {
        #[cfg(feature = "metrics")]
        add(&self.read, n);
        let _ = n;
    }

    /// `n` bytes written.
    #[inline]
    pub(crate) fn wrote(&self, n: usize) {
        #[cfg(feature = "metrics")]
        add(&self.written, n);
        let _ = n;
    }

    /// Totals so far (tests).
    #[cfg(all(test, feature = "metrics"))]
    pub(crate) fn totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.read.load(Relaxed), self.written.load(Relaxed))
    }
}

/// Adds without a locked instruction: one writer at a time (a race would lose a count, never
/// overflow: the total wraps only past 2^64 bytes).
#[cfg(feature = "metrics")]
#[inline]
fn add(total: &std::sync::atomic::AtomicU64, n: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    total.store(total.load(Relaxed).wrapping_add(n as u64), Relaxed);
}

impl Drop for ByteTally {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        bytes(*self.read.get_mut(), *self.written.get_mut());
    }
}

/// A tokio backend stream whose bytes are counted ([`ByteTally`]); the stream itself without
/// the `metrics` feature.
#[cfg(feature = "metrics")]
pub(crate) type CountIo<T> = counted::CountIo<T>;
#[cfg(not(feature = "metrics"))]
pub(crate) type CountIo<T> = T;

/// `io`, its bytes counted (see [`CountIo`]).
#[inline]
pub(crate) fn count_io<T>(io: T) -> CountIo<T> {
    #[cfg(feature = "metrics")]
    return counted::CountIo {
        io,
        tally: ByteTally::default(),
    };
    #[cfg(not(feature = "metrics"))]
    io
}

#[cfg(feature = "metrics")]
mod counted {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// See [`super::CountIo`].
    pub(crate) struct CountIo<T> {
        pub(super) io: T,
        pub(super) tally: super::ByteTally,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for CountIo<T> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            let r = Pin::new(&mut this.io).poll_read(cx, buf);
            this.tally.read(buf.filled().len().saturating_sub(before));
            r
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for CountIo<T> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = r {
                this.tally.wrote(n);
            }
            r
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
            if let Poll::Ready(Ok(n)) = r {
                this.tally.wrote(n);
            }
            r
        }

        fn is_write_vectored(&self) -> bool {
            self.io.is_write_vectored()
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }
}

/// A connection's `tracing` span (`conn`, at debug level, with a process-wide connection id,
/// the peer's address, and `client`, the address a PROXY protocol header carries), `None` when debug is off for hop or without the `metrics` feature;
/// boxed, so a connection without one holds a null pointer.
pub(crate) type ConnSpan = Option<Box<tracing::Span>>;

/// The span of a new connection from `peer` (see [`ConnSpan`]).
#[inline]
pub(crate) fn conn_span(peer: &dyn std::fmt::Debug) -> ConnSpan {
    #[cfg(feature = "metrics")]
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let span = tracing::debug_span!(
            "conn",
            id = NEXT.fetch_add(1, Ordering::Relaxed),
            peer = ?peer,
            client = tracing::field::Empty
        );
        if !span.is_disabled() {
            return Some(Box::new(span));
        }
    }
    let _ = peer;
    None
}

/// Records in a connection's span the client address its PROXY protocol header carries
/// (`ProxyHeader::source`; the span was made at accept, with the proxy's address as `peer`).
#[cfg(feature = "metrics")]
pub(crate) fn record_client(span: &tracing::Span, client: Option<std::net::SocketAddr>) {
    if let Some(client) = client {
        span.record("client", tracing::field::display(client));
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_up_and_reasons_have_distinct_labels() {
        let t = ByteTally::default();
        t.read(10);
        t.read(0);
        t.wrote(7);
        t.wrote(usize::MAX);
        assert_eq!(t.totals(), (10, 7u64.wrapping_add(usize::MAX as u64)));
        let labels: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
