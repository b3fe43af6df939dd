//! One HTTP connection on a poller: hyper's `http1` or `http2` connection polled in place, and
//! idle parking.
//!
//! A new connection's first bytes are peeked ([`crate::http2::sniff`]): the HTTP/2 preface
//! makes it an HTTP/2 connection, any other byte an HTTP/1.1 one; until they decide (a short
//! read never does), it waits as a parked connection, under the same time limit. On a TLS
//! listener the TLS handshake takes that place (under `tls_handshake_timeout`, with no hyper
//! state), and ALPN decides; the first request's time limits count from its end.
//!
//! An [`HttpConn`] is in one of these states:
//! - `Parked`: only the socket and the per-connection service; no hyper state, no buffer. New
//!   connections start here, and a keep-alive connection returns here when it is idle at a
//!   request boundary.
//! - `Active`: a boxed `hyper::server::conn::http1::UpgradeableConnection` over a
//!   [`HopStream`], with what parking tracks about it, polled whenever its socket is ready or
//!   its waker fires.
//! - `Upgraded`: hyper handed the stream to an upgrade (a WebSocket task, say); the poller keeps
//!   the registration and wakes that task on readiness until the stream is dropped (the
//!   [`HopStream`] lets go of the socket before it wakes the connection, so the poller never
//!   sees it still held). No idle timeout applies: the upgrade's protocol owns the connection's
//!   liveness (a dead peer is found by `tcp_keepalive`, as under axum::serve).
//! - `Sending`: a file response's body ([`crate::fs`]): hyper wrote the head and was let go
//!   (`into_parts`, as for parking, the bytes read behind the request kept); the driver sends
//!   the file with `sendfile(2)` on writable edges, then goes on with a fresh hyper connection,
//!   or closes if the request asked to. Like a response hyper writes, it has no timeout of its
//!   own: a peer that stops reading holds it until the drain deadline.
//! - `Http2`: a boxed `hyper::server::conn::http2::Connection` over a [`HopStream`]. Its
//!   streams run as local tasks that belong to the connection (`LocalExec`), so they go with
//!   it; the open streams are the tasks it owns (an upgraded stream, a WebSocket over HTTP/2,
//!   keeps hyper's task that sends its data). With none open for `http2_idle_timeout`, it is
//!   sent GOAWAY and closes (hyper has no such timeout). It is never parked: hyper's HTTP/2
//!   state (HPACK tables, stream states, its codec's buffers) cannot be given back and resumed.
//!
//! Where hyper stands is tracked here, not asked of hyper (it has no timer on the reactor: with
//! one, it would allocate a sleep and run an extra read-write pass for every request). The
//! service wrapper counts each request dispatched, and the response body's wrapper counts it
//! done when hyper drops the body, which it does once the response is written. With nothing in
//! flight, the last read ended in `WouldBlock`, no write waiting and no request body that hyper
//! may still be reading, hyper is waiting for a request head: the connection is idle at a
//! request boundary. Two things about hyper are relied on, both checked by the parking tests:
//! it dispatches a request only once the previous response is done (checked in release builds
//! too: a request dispatched early is refused, which closes the connection, and logged), and
//! it reads the next head only after the previous request's body.
//!
//! Timeouts: a new connection that sends nothing is closed at the header timeout (or the idle
//! timeout, if smaller); one waiting for a request head, at the header timeout counted from
//! when it began waiting (a partial head included), or once parked at the idle timeout. After a
//! request with a body, the connection is not parked (hyper may still be reading that body: a
//! handler can respond first) until its next request; the idle timeout, counted from the last
//! byte read, holds meanwhile.
//!
//! Moving: a parked connection can leave its poller for another ([`Moved`]: the socket, TLS
//! state included, and the service); the new poller registers it and reads at once.
//!
//! Parking: once a connection has been idle at a request boundary for `park_after`, the driver
//! takes hyper's parts back with `into_parts`. If hyper's read buffer still holds bytes (the
//! start of the next request), a new hyper connection is started over those bytes at once, and
//! parking is not tried again until another request has been dispatched, so a slow sender
//! cannot reset the header timeout.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use std::future::Future;

use super::current::{self, Current};
use super::stream::{HopStream, Socket};
use super::{Drive, Verdict};
use crate::http2::{sniff, Http2Svc, Meter, Proto, Stall, PREFACE};
use crate::limits::Limit;
use crate::observe::Reason;
use crate::rt::tasks::LocalExec;
use crate::rt::timer::Tick;
use crate::rt::wake::Key;
use crate::service::{ConnService, HyperSvc};
use crate::settings::{Config, Control, Http2Config};

type HyperConn<S> = http1::UpgradeableConnection<HopStream, Counted<S>>;
type H2Conn<S> = http2::Connection<HopStream, Http2Svc<S>, LocalExec>;
type Body<S> = crate::service::HopBody<<S as ConnService>::ResBody>;

/// Settings of a poller's HTTP connections.
pub(crate) struct HttpConfig {
    http1: http1::Builder,
    /// Coalesce hyper's writes and send them once per drive (`pipeline_flush`).
    coalesce: bool,
    idle_timeout: Option<Duration>,
    /// `header_read_timeout`: also how long a new connection may send nothing at all.
    header_timeout: Option<Duration>,
    /// How long a connection stays idle with hyper's state before it is parked; `None`: never.
    park_after: Option<Duration>,
    /// `park_after` comes no later than [`head_limit`](Self::head_limit): a connection
    /// waiting for a request head is parked (or finds a partial head and stops trying) before
    /// that limit can fall due, so the check can wait until then.
    parks_before_head_limit: bool,
    /// HTTP/2 settings, if it is served.
    http2: Option<Http2Config>,
    /// `request_body_timeout`.
    body_timeout: Option<Duration>,
    /// How long an HTTP/2 connection that was sent GOAWAY may take to close once its streams
    /// are done (the read handlers' `close_timeout`).
    close_timeout: Duration,
    /// Where parks, HTTP/2 streams, TLS handshakes, PROXY headers and limits are counted.
    pub(crate) ctl: Arc<Control>,
    /// `max_connection_age`.
    max_age: Option<Duration>,
    /// `max_requests_per_connection` (`u64::MAX`: none).
    pub(crate) max_requests: u64,
    /// TLS, on a TLS listener: the configuration each new connection starts from, and how
    /// long its handshake may take.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub(crate) tls: Option<(crate::tls::RustlsConfig, Duration)>,
}

impl HttpConfig {
    pub(crate) fn new(cfg: &Config, ctl: Arc<Control>) -> Self {
        // No timer, no header timeout in hyper: the driver keeps that time (module docs).
        // (hyper's writes stay vectored: flattened, hyper would copy every body into its own
        // buffer, all of a large one for a slow reader.)
        let http1 = cfg.http1(None);
        let mut this = HttpConfig {
            http1,
            coalesce: cfg.pipeline_flush,
            idle_timeout: cfg.idle_timeout,
            header_timeout: cfg.header_read_timeout,
            park_after: cfg.park_after,
            parks_before_head_limit: false,
            http2: cfg.http2.enabled.then(|| cfg.http2.clone()),
            body_timeout: cfg.request_body_timeout,
            close_timeout: cfg.tcp.close_timeout,
            ctl,
            max_age: cfg.limits.max_age,
            max_requests: cfg.limits.max_requests(),
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            tls: cfg.tls.clone().map(|c| (c, cfg.tls_handshake_timeout)),
        };
        this.parks_before_head_limit = match (this.park_after, this.head_limit()) {
            (Some(park), Some(head)) => park <= head,
            (park, _) => park.is_some(),
        };
        this
    }

    /// A new connection's TLS state, if this is a TLS listener (`None` also if rustls refuses
    /// the configuration, which is logged).
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub(crate) fn tls_connection(
        &self,
    ) -> Option<Result<rustls::server::UnbufferedServerConnection, ()>> {
        let (config, _) = self.tls.as_ref()?;
        Some(
            rustls::server::UnbufferedServerConnection::new(config.current(self.http2.is_some())).map_err(|e| {
                crate::logs::error_limited!(error = %e, "rustls refused its configuration; closing");
            }),
        )
    }
}

impl HttpConfig {
    /// How long a connection may wait for a request head: the header timeout, or the idle
    /// timeout if that is smaller.
    pub(crate) fn head_limit(&self) -> Option<Duration> {
        match (self.header_timeout, self.idle_timeout) {
            (Some(h), Some(i)) => Some(h.min(i)),
            (h, i) => h.or(i),
        }
    }

    /// Which timeout [`head_limit`](Self::head_limit) is, as a reason to close.
    fn head_reason(&self) -> Reason {
        match (self.header_timeout, self.idle_timeout) {
            (Some(h), Some(i)) if i < h => Reason::IdleTimeout,
            (None, Some(_)) => Reason::IdleTimeout,
            _ => Reason::HeaderTimeout,
        }
    }
}

/// The service hyper calls: the user's ([`HyperSvc::start`]), counting each request on the
/// connection's [`Current`] until hyper drops its response body; its future
/// ([`TrackedFuture`]) catches the handler's panics.
#[derive(Clone)]
pub(crate) struct Counted<S>(HyperSvc<S>);

impl<S: ConnService> hyper::service::Service<Request<Incoming>> for Counted<S> {
    type Response = Response<Tracked<Body<S>>>;
    type Error = crate::service::BoxError;
    type Future = TrackedFuture<crate::service::Call<S, Request<Incoming>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let body_pending = !http_body::Body::is_end_stream(req.body());
        let mut overlap = false;
        let mut close = None;
        let key = current::with_any(|c| {
            // Idle detection relies on hyper dispatching a request only once the previous
            // response is done (its body dropped): a hyper release that pipelined dispatches
            // would let the driver park a connection mid-request. Checked in release builds
            // too: such a request is refused, which closes the connection.
            overlap = c.in_flight != 0;
            c.requests += 1;
            c.in_flight += 1;
            if c.requests >= c.close_at {
                close = c.close_for;
            }
            c.body_pending = body_pending;
            if body_pending {
                c.responded = false;
                c.expect_continue = req
                    .headers()
                    .get(http::header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                c.body_len = http_body::Body::size_hint(req.body()).exact();
                c.head_len = crate::service::head_at_least(&req);
            }
            c.key
        });
        if overlap {
            tracing::error!(
                "hyper dispatched a request before the previous response was done; closing the connection"
            );
            return TrackedFuture {
                inner: None,
                key,
                body: body_pending,
                close,
            };
        }
        // Built in place: the handler's future is large (it holds the request until polled).
        TrackedFuture {
            inner: Some(self.0.start(req)),
            key,
            body: body_pending,
            close,
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future; its response body is [`Tracked`]. `None`: the request was
    /// refused (an error, which closes the connection).
    pub(crate) struct TrackedFuture<F> {
        #[pin]
        inner: Option<F>,
        key: Option<Key>,
        // The request came with a body: the response is recorded (`Current::responded`).
        body: bool,
        // A limit asks for `Connection: close` on this response.
        close: Option<Limit>,
    }
}

impl<F, B> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, crate::service::BoxError>>,
{
    type Output = Result<Response<Tracked<crate::service::HopBody<B>>>, crate::service::BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        use crate::service::HopBody;
        let this = self.project();
        let key = *this.key;
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(
                "a request dispatched while another was in flight".into()
            ));
        };
        // The handler's panics are caught here (as `CatchPanic` does for the tokio backend and
        // HTTP/2), and its response wrapped once.
        let mut res = match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(res)) => res.map(|res| {
                res.map(|body| Tracked {
                    body: HopBody::Inner { body },
                    key,
                })
            }),
            Err(panic) => Ok(crate::service::panicked(&*panic).map(|body| Tracked { body, key })),
        };
        if let (true, Some(key)) = (*this.body, key) {
            current::with(key, |c| c.responded = true);
        }
        if let (Some(why), Ok(res)) = (*this.close, &mut res) {
            if crate::limits::close_response(res) {
                // Counted now: hyper may send the FIN in this same poll.
                crate::handler::context::count_limit(why);
            }
        }
        Poll::Ready(res)
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its request done when hyper drops it.
    pub(crate) struct Tracked<B> {
        #[pin]
        body: B,
        key: Option<Key>,
    }

    impl<B> PinnedDrop for Tracked<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(key) = this.key {
                current::with(key, |c| c.in_flight = c.in_flight.saturating_sub(1));
            }
        }
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

enum State<S: ConnService> {
    /// Since when it has been idle, as a [`Tick`] (8 bytes: the state of every parked
    /// connection).
    Parked {
        svc: S,
        since: Tick,
    },
    /// Boxed, with what parking tracks, so that a parked connection's slab entry stays small.
    Active(Box<Live<S>>),
    /// The stream went to an upgrade.
    Upgraded,
    /// A response body being sent from a file with `sendfile(2)` (hyper wrote the head and was
    /// let go); then a fresh hyper connection, as after parking.
    Sending(Box<Sending<S>>),
    /// Boxed: hyper's HTTP/2 connection, with what the idle timeout tracks.
    Http2(Box<H2<S>>),
    Done,
}

/// A file body on its way out, and what the connection goes on with after it.
struct Sending<S: ConnService> {
    body: current::FileSend,
    svc: S,
    /// Read behind the request (a pipelined one): the next hyper connection's first bytes.
    unread: Bytes,
    /// Requests served so far.
    requests: u64,
}

/// An HTTP/2 connection.
struct H2<S: ConnService> {
    conn: H2Conn<S>,
    /// Since when no stream has been open (reset when one starts, see
    /// [`HttpConn::stream_started`]).
    idle_since: Option<Instant>,
    /// When GOAWAY was asked for (idle timeout or shutdown): hyper closes once streams are
    /// done and the GOAWAY is sent, which a peer that stops reading can hold off until the close
    /// timeout.
    closing: Option<Instant>,
    /// What the socket sees of the frames (shared with the [`HopStream`]): its stalled
    /// request bodies are reset here when they fall due.
    meter: Arc<std::sync::Mutex<Meter>>,
    /// Streams started (`max_requests_per_connection`).
    streams: u64,
    /// Why hop sent GOAWAY (the idle timeout, a limit), the reason it closed.
    goaway_for: Option<Reason>,
}

/// A connection holding hyper's state.
struct Live<S: ConnService> {
    conn: HyperConn<S>,
    /// What hyper and the handlers record while the connection is driven.
    cur: Current,
    /// The request count at which parking found a partial request head (parked no more until
    /// the next request).
    no_park_at: Option<u64>,
    /// When the connection was first seen idle, and the request count then.
    idle_since: Option<(Tick, u64)>,
    /// The socket's read count when the drive that dispatched the last request began.
    body_from: u64,
    /// Since when hyper has waited for more of a request body, and the read count then.
    stalled: Option<(Instant, u64)>,
    /// A drain is on: shut down gracefully once hyper has read what is waiting (before that,
    /// hyper would close the connection unanswered).
    drain_after_poll: bool,
}

/// Whether `limit` (if any) counted from `since` has run out; if it has not, a drive is asked
/// for when it does.
fn expired(d: &mut Drive, since: Instant, limit: Option<Duration>) -> bool {
    let Some(limit) = limit else { return false };
    let due = d.tick_after(since, limit);
    expired_tick(d, due)
}

/// [`expired`], counted from a [`Tick`] (what a connection's idle time is kept as).
fn expired_since(d: &mut Drive, since: Tick, limit: Option<Duration>) -> bool {
    let Some(limit) = limit else { return false };
    expired_tick(d, since.after(limit))
}

fn expired_tick(d: &mut Drive, due: Tick) -> bool {
    if d.now_tick >= due {
        return true;
    }
    d.wake_at_tick(due);
    false
}

/// Whether `due` has come; if it has not, a drive is asked for then.
fn expired_at(d: &mut Drive, due: Instant) -> bool {
    if d.now >= due {
        return true;
    }
    d.wake_at(due);
    false
}

/// An HTTP connection in a poller's slab.
pub(crate) struct HttpConn<S: ConnService> {
    pub(crate) socket: Arc<Socket>,
    state: State<S>,
    /// A request has been dispatched on this connection.
    served: bool,
    /// When it was accepted (`max_connection_age`).
    born: Tick,
    /// Requests served by its earlier hyper connections (before it last parked), for
    /// `max_requests_per_connection`.
    requests: u64,
    /// How the protocol is decided, or what it was decided to be.
    opening: Opening,
    /// Counted in the reported parked gauge while parked by [`park`](Self::park).
    #[cfg(feature = "metrics")]
    parked: Option<crate::limits::Gauged>,
}

/// A connection on its way to another poller (issue 23), with no key (it gets one where it
/// arrives): its socket (TLS state included) and either its service (a parked HTTP/1
/// connection: nothing of hyper's) or hyper's HTTP/2 connection between streams.
pub(crate) struct Moved<S: ConnService> {
    socket: Arc<Socket>,
    held: Held<S>,
    served: bool,
    born: Tick,
    requests: u64,
    opening: Opening,
    #[cfg(feature = "metrics")]
    parked: Option<crate::limits::Gauged>,
}

/// What a [`Moved`] connection holds besides its socket.
enum Held<S: ConnService> {
    Parked { svc: S, since: Tick },
    Http2(Box<H2<S>>),
}

impl<S: ConnService> Moved<S> {
    /// Whether its socket was registered with the poller it leaves (see
    /// [`Fd::leave`](super::stream::Fd::leave)), and its descriptor.
    pub(crate) fn leave(&self) -> (bool, std::os::fd::RawFd) {
        use std::os::fd::AsRawFd;
        (self.socket.fd.leave(), self.socket.fd.io.as_raw_fd())
    }
}

/// How a new connection's protocol is decided.
#[derive(Clone, Copy)]
enum Opening {
    /// Decided: HTTP/1.1 when HTTP/2 is off, what the first bytes or ALPN told otherwise.
    Known(Proto),
    /// The first bytes will tell ([`sniff`]).
    Sniff,
    /// The TLS handshake is under way; ALPN will tell.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    Handshake,
}

/// hyper's service for a connection on `socket`: with its [`TlsInfo`](crate::tls::TlsInfo) in
/// every request if it is a TLS connection, its PROXY protocol header if it came with one.
fn hyper_svc<S>(svc: S, socket: &Socket) -> HyperSvc<S> {
    let svc = HyperSvc::new(svc).with_proxy(socket.proxy.clone());
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    let svc = svc.with_tls(socket.fd.tls_info());
    let _ = socket;
    svc
}

impl<S: ConnService> HttpConn<S> {
    pub(crate) fn new(socket: Arc<Socket>, svc: S, cfg: &HttpConfig, now: Instant) -> Self {
        HttpConn {
            state: State::Parked {
                svc,
                since: Tick::of(now),
            },
            served: false,
            born: Tick::of(now),
            requests: 0,
            opening: Self::opening(&socket, cfg),
            socket,
            #[cfg(feature = "metrics")]
            parked: None,
        }
    }

    fn opening(socket: &Socket, cfg: &HttpConfig) -> Opening {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if socket.fd.tls_handshaking() {
            return Opening::Handshake;
        }
        let _ = socket;
        match cfg.http2 {
            Some(_) => Opening::Sniff,
            None => Opening::Known(Proto::Http1),
        }
    }

    /// Whether it can go to another poller as it is, with nothing waiting to be written and no
    /// one else holding the socket: parked (only its socket and service), or an HTTP/2
    /// connection that is not closing, between streams (its entry owns no stream task: checked
    /// by the entry; and it never opened a CONNECT stream, which lives on outside those tasks),
    /// whose hyper state holds the socket's only other reference.
    pub(crate) fn is_movable(&self) -> bool {
        let holders = match &self.state {
            State::Parked { .. } => 1,
            State::Http2(h2)
                if h2.closing.is_none() && !crate::http2::lock(&h2.meter).has_tunnel() =>
            {
                2
            }
            _ => return false,
        };
        Arc::strong_count(&self.socket) == holders
            && self.socket.nothing_pending()
            && self.socket.fd.write_idle()
    }

    /// Whether it is an HTTP/2 connection (which moves between streams, not when it parks).
    pub(crate) fn is_http2(&self) -> bool {
        matches!(self.state, State::Http2(_))
    }

    /// The connection as it goes to another poller, if it [is movable](Self::is_movable) (the
    /// caller deregisters the socket if [`Fd::leave`](super::stream::Fd::leave) says it was
    /// registered); itself back otherwise.
    pub(crate) fn into_moved(self) -> Result<Moved<S>, Self> {
        if !self.is_movable() {
            return Err(self);
        }
        let held = match self.state {
            State::Parked { svc, since } => Held::Parked { svc, since },
            State::Http2(h2) => Held::Http2(h2),
            _ => unreachable!("checked by is_movable"),
        };
        Ok(Moved {
            socket: self.socket,
            held,
            served: self.served,
            born: self.born,
            requests: self.requests,
            opening: self.opening,
            #[cfg(feature = "metrics")]
            parked: self.parked,
        })
    }

    /// A connection another poller handed over, as it was there.
    pub(crate) fn from_moved(m: Moved<S>) -> Self {
        HttpConn {
            socket: m.socket,
            state: match m.held {
                Held::Parked { svc, since } => State::Parked { svc, since },
                Held::Http2(h2) => State::Http2(h2),
            },
            served: m.served,
            born: m.born,
            requests: m.requests,
            opening: m.opening,
            #[cfg(feature = "metrics")]
            parked: m.parked,
        }
    }

    /// The socket, with hyper's state (done by now) dropped.
    pub(crate) fn into_socket(self) -> Arc<Socket> {
        self.socket
    }

    /// Whether it holds hyper's state.
    pub(crate) fn is_hot(&self) -> bool {
        matches!(self.state, State::Active(_))
    }

    /// Starts a graceful shutdown: hyper finishes the request in flight and closes; a parked
    /// connection closes on its next drive.
    pub(crate) fn begin_drain(&mut self) {
        match &mut self.state {
            State::Active(live) => Pin::new(&mut live.conn).graceful_shutdown(),
            State::Http2(h2) => {
                Pin::new(&mut h2.conn).graceful_shutdown();
                h2.closing.get_or_insert_with(Instant::now);
            }
            _ => {}
        }
    }

    /// A stream of this HTTP/2 connection started (its task was adopted): the idle time starts
    /// over once no stream is open again.
    /// `true` when it has now started `max_requests` streams (the connection is to be driven,
    /// to send GOAWAY).
    pub(crate) fn stream_started(&mut self, max_requests: u64) -> bool {
        if let State::Http2(h2) = &mut self.state {
            h2.idle_since = None;
            h2.streams = h2.streams.saturating_add(1);
            return h2.streams == max_requests;
        }
        false
    }

    /// When `max_connection_age` runs out for this connection, if it is set.
    fn age_deadline(&self, cfg: &HttpConfig) -> Option<Instant> {
        cfg.max_age
            .map(|age| crate::rt::timer::deadline(self.born.instant(), age))
    }

    /// Peeks at a new connection's first bytes: the protocol they speak, `None` while they do
    /// not tell yet, `Err` if the connection ended or failed first.
    fn sniff(socket: &Socket) -> Result<Option<Proto>, ()> {
        let mut first = [0u8; PREFACE.len()];
        match socket.fd.peek(&mut first) {
            Ok(0) => Err(()),
            Ok(n) => match sniff(&first[..n]) {
                Some(p) => Ok(Some(p)),
                // Part of the preface, and the peer has sent all it will: not a request.
                None if socket.fd.read_closed() => Err(()),
                None => {
                    socket.fd.drained();
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                socket.fd.drained();
                Ok(None)
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading a new connection failed");
                Err(())
            }
        }
    }

    /// Drives a new TLS connection's handshake (a parked connection since `since`): the
    /// verdict while it waits or once it failed, `None` once it is done and ALPN has decided
    /// the protocol. Counted in the stats either way.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    fn handshake(&mut self, cfg: &HttpConfig, d: &mut Drive, since: Tick) -> Option<Verdict> {
        use std::sync::atomic::Ordering::Relaxed;
        match self.socket.fd.poll_handshake() {
            Poll::Pending => {
                if expired_since(d, since, cfg.tls.as_ref().map(|(_, t)| *t)) {
                    tracing::debug!("TLS handshake timed out; closing");
                    cfg.ctl.tls_handshake_timeouts.fetch_add(1, Relaxed);
                    d.because(Reason::TlsHandshakeTimeout);
                    return Some(Verdict::Close);
                }
                Some(Verdict::Keep)
            }
            Poll::Ready(Err(e)) => {
                crate::logs::tls_handshake_failed(&e);
                cfg.ctl.tls_handshake_failures.fetch_add(1, Relaxed);
                d.because(Reason::Error);
                Some(Verdict::Close)
            }
            Poll::Ready(Ok(())) => {
                cfg.ctl.tls_handshakes.fetch_add(1, Relaxed);
                self.socket.fd.tls_established();
                let h2 = cfg.http2.is_some() && self.socket.fd.tls_alpn_is(crate::tls::ALPN_H2);
                self.opening = Opening::Known(if h2 { Proto::Http2 } else { Proto::Http1 });
                // The first request's time limits count from here.
                if let State::Parked { since, .. } = &mut self.state {
                    *since = d.now_tick;
                }
                None
            }
        }
    }

    /// Polls the connection after an event, a wake or a timer.
    pub(crate) fn drive(&mut self, key: Key, cfg: &HttpConfig, d: &mut Drive) -> Verdict {
        loop {
            match &mut self.state {
                State::Parked { since, .. } => {
                    // A drain closes a parked keep-alive connection, as hyper closes an idle
                    // one. A new connection is served once, then closed: it may have waited in
                    // the accept queue when the drain began, and its client has had no answer
                    // yet (see the grace below).
                    if d.draining && self.served {
                        return Verdict::Close;
                    }
                    let since = *since;
                    #[cfg(any(feature = "tls", feature = "tls-ring"))]
                    if let Opening::Handshake = self.opening {
                        match self.handshake(cfg, d, since) {
                            Some(verdict) => return verdict,
                            None => continue,
                        }
                    }
                    let proto = match self.opening {
                        Opening::Known(p) => Some(p),
                        Opening::Sniff if self.socket.fd.maybe_readable() => {
                            match Self::sniff(&self.socket) {
                                Ok(p) => p,
                                Err(()) => return Verdict::Close,
                            }
                        }
                        _ => None,
                    };
                    if let (Some(proto), true) = (proto, self.socket.fd.maybe_readable()) {
                        self.opening = Opening::Known(proto);
                        let State::Parked { svc, .. } =
                            std::mem::replace(&mut self.state, State::Done)
                        else {
                            unreachable!()
                        };
                        #[cfg(feature = "metrics")]
                        {
                            self.parked = None;
                        }
                        match (proto, &cfg.http2) {
                            (Proto::Http2, Some(h2)) => self.start_http2(key, cfg, h2, svc),
                            _ => self.activate(key, cfg, svc, None, None),
                        }
                        if d.draining {
                            match &mut self.state {
                                State::Active(live) => live.drain_after_poll = true,
                                _ => self.begin_drain(),
                            }
                        }
                        continue;
                    }
                    // What TLS still has to send (session tickets after the handshake); once
                    // it is out, a client that waits before its first request holds no buffer.
                    match self.socket.fd.flush(true) {
                        Err(e) => {
                            tracing::debug!(error = %e, "write failed");
                            d.because(Reason::Error);
                            return Verdict::Close;
                        }
                        #[cfg(any(feature = "tls", feature = "tls-ring"))]
                        Ok(true) => self.socket.fd.release_tls_buffers(),
                        Ok(_) => {}
                    }
                    if expired_since(d, since, self.idle_limit(cfg)) {
                        tracing::debug!("closing a parked connection at its idle limit");
                        d.because(match self.served {
                            true => Reason::IdleTimeout,
                            false => cfg.head_reason(),
                        });
                        return Verdict::Close;
                    }
                    // A new connection whose first request has not come within the grace is
                    // closed, so that pre-connected sockets (browsers open some) do not hold
                    // the drain for a whole header timeout.
                    if d.draining
                        && expired_since(d, since, Some(crate::settings::FIRST_REQUEST_GRACE))
                    {
                        return Verdict::Close;
                    }
                    if let Some(at) = self.age_deadline(cfg) {
                        if expired_at(d, crate::limits::age_idle_close(at, since.instant())) {
                            tracing::debug!("closing an idle connection past its max age");
                            cfg.ctl.limit_reached(Limit::Age);
                            d.because(Reason::MaxConnectionAge);
                            return Verdict::Close;
                        }
                    }
                    return Verdict::Keep;
                }
                State::Active(live) => {
                    if let Some(at) = cfg.max_age {
                        if d.now >= crate::rt::timer::deadline(self.born.instant(), at) {
                            // Past its age: the next request's response closes it.
                            live.cur.close_at(live.cur.requests + 1, Limit::Age);
                        }
                    }
                    let waker = key.waker();
                    let mut cx = Context::from_waker(&waker);
                    // Bytes to read: the peer is not quiet (see `on_idle`).
                    let woke_readable = self.socket.fd.maybe_readable();
                    let read_mark = self.socket.read_bytes();
                    let Live { conn, cur, .. } = &mut **live;
                    let requests = cur.requests;
                    let polled = current::lend(cur, || {
                        catch_unwind(AssertUnwindSafe(|| Pin::new(conn).poll(&mut cx)))
                    });
                    if live.cur.requests != requests {
                        live.body_from = read_mark;
                        live.stalled = None;
                        cfg.ctl.http1_requests(live.cur.requests - requests);
                    }
                    if std::mem::take(&mut live.drain_after_poll) {
                        Pin::new(&mut live.conn).graceful_shutdown();
                    }
                    self.served |= live.cur.requests > 0;
                    // Send what hyper wrote during this poll in one write (pipelined responses
                    // included). Also before a read handler or an upgrade's new owner writes.
                    if let Poll::Ready(Err(e)) = self.socket.poll_flush_pending(&cx, true) {
                        tracing::debug!(error = %e, "write failed");
                        d.because(Reason::Error);
                        self.set_done();
                        return Verdict::Close;
                    }
                    match polled {
                        Ok(Poll::Pending) => {
                            if live.cur.takeover.as_ref().is_some_and(|t| t.head_is_out()) {
                                return self.take_over(d);
                            }
                            if live.cur.file.is_some() {
                                match self.start_sending(cfg) {
                                    Some(verdict) => return verdict,
                                    None => continue,
                                }
                            }
                            if d.draining {
                                return Verdict::Keep;
                            }
                            if let Some(verdict) = self.body_stall(cfg, d) {
                                return verdict;
                            }
                            return self.on_idle(key, cfg, d, woke_readable);
                        }
                        Ok(Poll::Ready(res)) => {
                            if let Err(e) = res {
                                tracing::debug!(error = %e, "connection ended with an error");
                                d.because(Reason::Error);
                            } else if let Some(why) = live.cur.close_for {
                                if live.cur.requests >= live.cur.close_at {
                                    // Its last response said `Connection: close` for a limit.
                                    d.because(why.into());
                                }
                            }
                            let takeover = live.cur.takeover.take();
                            self.set_done();
                            match takeover.and_then(|t| t.after_finish()) {
                                Some(Ok(taken)) => return Verdict::Hijacked(taken),
                                Some(Err(e)) => {
                                    crate::logs::warn_limited!("hijack failed: {e}; closing");
                                    d.because(Reason::Error);
                                    return Verdict::Close;
                                }
                                None => {}
                            }
                            if Arc::strong_count(&self.socket) > 1 {
                                // The stream went to an upgrade; it lives on elsewhere.
                                self.state = State::Upgraded;
                                continue;
                            }
                            return Verdict::Close;
                        }
                        Err(panic) => {
                            crate::logs::error_limited!(
                                panic = crate::service::panic_message(&*panic),
                                "connection panicked; closing it"
                            );
                            d.because(Reason::Error);
                            self.set_done();
                            return Verdict::Close;
                        }
                    }
                }
                State::Sending(s) => {
                    let waker = key.waker();
                    // The head hyper wrote goes first.
                    match self
                        .socket
                        .poll_flush_pending(&Context::from_waker(&waker), true)
                    {
                        Poll::Ready(Ok(())) => {}
                        Poll::Pending => return Verdict::Keep,
                        Poll::Ready(Err(e)) => {
                            tracing::debug!(error = %e, "write failed");
                            d.because(Reason::Error);
                            return Verdict::Close;
                        }
                    }
                    let body = &mut s.body;
                    while body.len > 0 {
                        match self
                            .socket
                            .fd
                            .sendfile(&body.file, &mut body.offset, body.len)
                        {
                            Ok(0) => {
                                // The file is shorter than its head said: the response cannot
                                // be finished.
                                crate::logs::warn_limited!(
                                    "a file shrank while it was being sent; closing"
                                );
                                d.because(Reason::Error);
                                return Verdict::Close;
                            }
                            Ok(n) => body.len -= n as u64,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                return Verdict::Keep;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                tracing::debug!(error = %e, "sendfile failed");
                                d.because(Reason::Error);
                                return Verdict::Close;
                            }
                        }
                    }
                    let State::Sending(s) = std::mem::replace(&mut self.state, State::Done) else {
                        unreachable!()
                    };
                    let Sending {
                        body,
                        svc,
                        unread,
                        requests,
                    } = *s;
                    if !body.keep_alive || d.draining {
                        return Verdict::Close;
                    }
                    // On with a fresh hyper connection, as after parking (it parks in turn if
                    // nothing follows).
                    let prefix = (!unread.is_empty()).then_some(unread);
                    self.activate(key, cfg, svc, prefix, Some((d.now_tick, requests)));
                    continue;
                }
                State::Upgraded => {
                    // The 101 may still be waiting to be sent if the socket was full.
                    let waker = key.waker();
                    let _ = self
                        .socket
                        .poll_flush_pending(&Context::from_waker(&waker), true);
                    if Arc::strong_count(&self.socket) == 1 {
                        // The upgrade's owner dropped the stream (`HopStream` lets go of the
                        // socket before it wakes this connection).
                        return Verdict::Close;
                    }
                    return Verdict::Keep;
                }
                State::Http2(h2) => {
                    if h2.closing.is_none() {
                        let age = cfg
                            .max_age
                            .map(|age| crate::rt::timer::deadline(self.born.instant(), age));
                        let why = if h2.streams >= cfg.max_requests {
                            Some(Limit::Requests)
                        } else if age.is_some_and(|at| d.now >= at) {
                            Some(Limit::Age)
                        } else {
                            if let Some(at) = age {
                                d.wake_at(at);
                            }
                            None
                        };
                        if let Some(why) = why {
                            tracing::debug!(?why, "HTTP/2 connection at a limit: sending GOAWAY");
                            cfg.ctl.limit_reached(why);
                            Pin::new(&mut h2.conn).graceful_shutdown();
                            h2.closing = Some(d.now);
                            h2.goaway_for.get_or_insert(why.into());
                        }
                    }
                    let waker = key.waker();
                    let mut cx = Context::from_waker(&waker);
                    let conn = &mut h2.conn;
                    // The streams hyper starts belong to this connection, under this key.
                    let polled = crate::rt::tasks::driving(key, || {
                        catch_unwind(AssertUnwindSafe(|| Pin::new(conn).poll(&mut cx)))
                    });
                    if let Poll::Ready(Err(e)) = self.socket.poll_flush_pending(&cx, true) {
                        tracing::debug!(error = %e, "write failed");
                        d.because(Reason::Error);
                        self.set_done();
                        return Verdict::Close;
                    }
                    match polled {
                        Ok(Poll::Pending) => {
                            let due = crate::http2::lock(&h2.meter).next_due();
                            if let Some(due) = due {
                                if d.now < due {
                                    d.wake_at(due);
                                } else {
                                    let stall = crate::http2::lock(&h2.meter).expire(d.now);
                                    match stall {
                                        // Polled again, to read the resets.
                                        Stall::Reset => continue,
                                        Stall::Close => {
                                            tracing::debug!(
                                                "HTTP/2 request body stalled mid-frame; closing"
                                            );
                                            d.because(Reason::RequestBodyTimeout);
                                            self.set_done();
                                            return Verdict::Close;
                                        }
                                        Stall::None => {}
                                    }
                                }
                            }
                            if d.owned > 0 {
                                h2.idle_since = None;
                                return Verdict::Keep;
                            }
                            if let Some(at) = h2.closing {
                                if expired(d, at, Some(cfg.close_timeout)) {
                                    tracing::debug!(
                                        "HTTP/2 connection not closed in time; closing"
                                    );
                                    if let Some(why) = h2.goaway_for {
                                        d.because(why);
                                    }
                                    self.set_done();
                                    return Verdict::Close;
                                }
                                return Verdict::Keep;
                            }
                            let since = *h2.idle_since.get_or_insert_with(|| {
                                // Idle: the coalescing buffer is not kept meanwhile.
                                self.socket.release_buffers();
                                d.now
                            });
                            let limit = cfg.http2.as_ref().and_then(|c| c.idle_timeout);
                            if expired(d, since, limit) {
                                tracing::debug!("HTTP/2 connection idle: sending GOAWAY");
                                Pin::new(&mut h2.conn).graceful_shutdown();
                                h2.closing = Some(d.now);
                                h2.goaway_for.get_or_insert(Reason::IdleTimeout);
                                // Polled again to send it.
                                continue;
                            }
                            return Verdict::Keep;
                        }
                        Ok(Poll::Ready(res)) => {
                            match res {
                                Err(e) => {
                                    tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                                    d.because(Reason::Error);
                                }
                                Ok(()) => {
                                    if let Some(why) = h2.goaway_for {
                                        d.because(why);
                                    }
                                }
                            }
                            self.set_done();
                            return Verdict::Close;
                        }
                        Err(panic) => {
                            crate::logs::error_limited!(
                                panic = crate::service::panic_message(&*panic),
                                "HTTP/2 connection panicked; closing it"
                            );
                            d.because(Reason::Error);
                            self.set_done();
                            return Verdict::Close;
                        }
                    }
                }
                State::Done => return Verdict::Close,
            }
        }
    }

    /// Starts serving HTTP/2: hyper's connection, whose streams become local tasks that belong
    /// to this connection.
    fn start_http2(&mut self, key: Key, cfg: &HttpConfig, h2: &Http2Config, svc: S) {
        let meter = Arc::new(std::sync::Mutex::new(Meter::new(h2, cfg.body_timeout)));
        let io =
            HopStream::new(self.socket.clone(), key, None, cfg.coalesce).with_meter(meter.clone());
        let conn = h2.builder(LocalExec::new(Some(key))).serve_connection(
            io,
            Http2Svc::new(hyper_svc(svc, &self.socket), cfg.ctl.clone(), meter.clone()),
        );
        self.state = State::Http2(Box::new(H2 {
            conn,
            idle_since: None,
            closing: None,
            meter,
            streams: 0,
            goaway_for: None,
        }));
    }

    /// Takes the socket back from hyper for the read handler waiting on it, once hyper has
    /// written the response head whose body that handler writes (an SSE subscriber).
    fn take_over(&mut self, d: &mut Drive) -> Verdict {
        let State::Active(mut live) = std::mem::replace(&mut self.state, State::Done) else {
            return Verdict::Close;
        };
        let Some(takeover) = live.cur.takeover.take() else {
            return Verdict::Close;
        };
        match live
            .conn
            .into_parts()
            .map(|p| takeover.into_taken(p.io, p.read_buf))
        {
            Some(Ok(taken)) => Verdict::Hijacked(taken),
            Some(Err(e)) => {
                crate::logs::warn_limited!("taking the connection over failed: {e}; closing");
                d.because(Reason::Error);
                Verdict::Close
            }
            None => Verdict::Close,
        }
    }

    /// Lets hyper go once it has written a file response's head ([`crate::fs`]): the body is
    /// sent from the file by the driver. `None` to drive the new state; a verdict if the
    /// socket could not be taken back whole (then the connection closes).
    fn start_sending(&mut self, cfg: &HttpConfig) -> Option<Verdict> {
        let State::Active(mut live) = std::mem::replace(&mut self.state, State::Done) else {
            return Some(Verdict::Close);
        };
        let mut body = live.cur.file.take()?;
        let requests = live.cur.requests;
        // A limit's `Connection: close` went out on this response's head: hyper would have
        // closed after it.
        if requests >= live.cur.close_at {
            body.keep_alive = false;
        }
        let parts = live.conn.into_parts()?;
        let unread = match parts.io.release(parts.read_buf) {
            Ok(unread) => unread,
            Err(e) => {
                crate::logs::warn_limited!("sending a file failed: {e}; closing");
                return Some(Verdict::Close);
            }
        };
        let svc = parts.service.0.into_inner();
        cfg.ctl
            .files_sent
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.state = State::Sending(Box::new(Sending {
            body,
            svc,
            unread,
            requests,
        }));
        None
    }

    /// Drops hyper's state, even if dropping it panics.
    fn set_done(&mut self) {
        let old = std::mem::replace(&mut self.state, State::Done);
        let _ = catch_unwind(AssertUnwindSafe(move || drop(old)));
    }

    fn activate(
        &mut self,
        key: Key,
        cfg: &HttpConfig,
        svc: S,
        prefix: Option<Bytes>,
        resume: Option<(Tick, u64)>,
    ) {
        let io = HopStream::new(self.socket.clone(), key, prefix, cfg.coalesce);
        let conn = cfg
            .http1
            .serve_connection(io, Counted(hyper_svc(svc, &self.socket)))
            .with_upgrades();
        let mut cur = Current::new(key);
        cur.requests = resume.map_or(0, |(_, n)| n);
        cur.zero_copy = self.socket.fd.can_sendfile();
        if cfg.max_requests != u64::MAX {
            // Counted from this hyper connection's first request, as `cur.requests` is.
            let left = cfg.max_requests.saturating_sub(self.requests).max(1);
            cur.close_at(left, Limit::Requests);
        }
        self.state = State::Active(Box::new(Live {
            conn,
            cur,
            no_park_at: resume.map(|(_, n)| n),
            idle_since: resume,
            body_from: 0,
            stalled: None,
            drain_after_poll: false,
        }));
    }

    /// After a poll that left hyper waiting: parks the connection, or closes it at its time
    /// limit, once it has been idle at a request boundary long enough (see the module docs).
    /// Both hold with parking off (`park_after` `None`), when the time limit is the only one.
    fn on_idle(
        &mut self,
        key: Key,
        cfg: &HttpConfig,
        d: &mut Drive,
        woke_readable: bool,
    ) -> Verdict {
        let age = self.age_deadline(cfg);
        let State::Active(live) = &mut self.state else {
            return Verdict::Keep;
        };
        let requests = live.cur.requests;
        let quiet = live.cur.in_flight == 0
            && live.cur.takeover.is_none()
            && !self.socket.fd.maybe_readable()
            && self.socket.fd.write_idle()
            && self.socket.nothing_pending();
        if !quiet {
            live.idle_since = None;
            return Verdict::Keep;
        }
        let since = match live.idle_since {
            // Reading a request body counts as activity; reading part of a head does not.
            Some((t, n)) if n == requests && !(live.cur.body_pending && woke_readable) => t,
            _ => {
                live.idle_since = Some((d.now_tick, requests));
                d.now_tick
            }
        };
        if live.cur.body_pending {
            // hyper may still be reading the body: no parking, the idle timeout only.
            if expired_since(d, since, cfg.idle_timeout) {
                tracing::debug!("closing a connection at the idle timeout");
                d.because(Reason::IdleTimeout);
                return Verdict::Close;
            }
            return Verdict::Keep;
        }
        if let Some(at) = age {
            if expired_at(d, crate::limits::age_idle_close(at, since.instant())) {
                tracing::debug!("closing an idle connection past its max age");
                cfg.ctl.limit_reached(Limit::Age);
                d.because(Reason::MaxConnectionAge);
                return Verdict::Close;
            }
        }
        if let Some(after) = cfg.park_after {
            if live.no_park_at != Some(requests) {
                let due = since.after(after);
                if d.now_tick >= due || d.crowded {
                    self.park(key, cfg, d, since, requests);
                    return Verdict::Keep;
                }
                d.wake_at_tick(due);
                if cfg.parks_before_head_limit {
                    // It parks before the head limit could fall due (and a parked connection
                    // has its own limit): no need to look at it now.
                    return Verdict::Keep;
                }
            }
        }
        if expired_since(d, since, cfg.head_limit()) {
            tracing::debug!("closing a connection waiting for a request head at its time limit");
            d.because(cfg.head_reason());
            return Verdict::Close;
        }
        Verdict::Keep
    }

    /// The request-body timeout (`request_body_timeout`): while a request's body is being read
    /// (hyper waits for bytes, with the request in flight and its body not all read), a stall
    /// of the timeout with no byte from the client answers `408` and closes, or just closes once
    /// the response has started. `None` while nothing is due.
    ///
    /// That the body is not all read is told from what was read since the request came: past
    /// its head (at least `service::head_at_least`) and its `content-length`, or a chunked body's last
    /// chunk, it is done, so a handler that works long after reading the whole body is never
    /// timed out for it.
    fn body_stall(&mut self, cfg: &HttpConfig, d: &mut Drive) -> Option<Verdict> {
        let limit = cfg.body_timeout?;
        let State::Active(live) = &mut self.state else {
            return None;
        };
        let c = &live.cur;
        if c.in_flight == 0 || !c.body_pending {
            // No request body being read (the common case): nothing can stall.
            live.stalled = None;
            return None;
        }
        let read = self.socket.read_bytes();
        let done = self.socket.chunked_end()
            || c.body_len.is_some_and(|len| {
                read.saturating_sub(live.body_from) >= c.head_len.saturating_add(len)
            });
        // `Expect: 100-continue` with no body byte yet: the client waits for hyper's `100`,
        // which comes once the handler reads the body; the handler is not waiting for it.
        let unasked = c.expect_continue && read.saturating_sub(live.body_from) <= c.head_len;
        let waiting =
            !done && !unasked && !self.socket.fd.maybe_readable() && self.socket.fd.write_idle();
        if !waiting {
            live.stalled = None;
            return None;
        }
        let since = match live.stalled {
            Some((t, r)) if r == read => t,
            _ => {
                live.stalled = Some((d.now, read));
                d.now
            }
        };
        let due = since.checked_add(limit)?;
        if d.now < due {
            d.wake_at(due);
            return None;
        }
        if !c.responded && self.socket.nothing_pending() {
            tracing::debug!("request body stalled; answering 408 and closing");
            let _ = self
                .socket
                .fd
                .write(&[std::io::IoSlice::new(crate::service::TIMEOUT_408)], true);
            let _ = self.socket.fd.flush(true);
        } else {
            tracing::debug!("request body stalled after the response started; closing");
        }
        d.because(Reason::RequestBodyTimeout);
        self.set_done();
        Some(Verdict::Close)
    }

    /// How long a parked connection may stay as it is: a new one that has sent no request yet
    /// has the smaller of the header and idle timeouts (as hyper gives it on the tokio
    /// backend), any other the idle timeout.
    fn idle_limit(&self, cfg: &HttpConfig) -> Option<Duration> {
        if self.served {
            return cfg.idle_timeout;
        }
        cfg.head_limit()
    }

    /// Parks the connection, idle since `since`.
    fn park(&mut self, key: Key, cfg: &HttpConfig, d: &mut Drive, since: Tick, requests: u64) {
        let State::Active(live) = std::mem::replace(&mut self.state, State::Done) else {
            return;
        };
        let Some(parts) = live.conn.into_parts() else {
            return;
        };
        let unread = match parts.io.release(parts.read_buf) {
            Ok(unread) => unread,
            Err(e) => {
                // Left `Done`: closed on its next drive.
                crate::logs::warn_limited!("parking failed: {e}; closing");
                crate::rt::wake::push_ready(key);
                return;
            }
        };
        self.socket.release_buffers();
        let svc = parts.service.0.into_inner();
        if unread.is_empty() {
            // The next hyper connection counts its requests from zero.
            self.requests = self.requests.saturating_add(requests);
            cfg.ctl
                .parked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            {
                self.parked = Some(crate::limits::Gauged::new(crate::observe::Open::Parked));
            }
            self.state = State::Parked { svc, since };
            if let Some(limit) = self.idle_limit(cfg) {
                d.wake_at_tick(since.after(limit));
            }
        } else {
            // The start of the next request is buffered: keep it, in a fresh hyper connection.
            self.activate(key, cfg, svc, Some(unread), Some((since, requests)));
            crate::rt::wake::push_ready(key);
        }
    }
}
