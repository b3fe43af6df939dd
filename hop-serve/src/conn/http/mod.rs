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
//!
//! The room, as hyper's `proto/h1` and `proto/h2` are laid out: this file holds the connection
//! ([`HttpConn`], its `State`, [`Moved`]), its settings ([`HttpConfig`]), the opening (sniffing,
//! the TLS handshake) and the parked state, and `drive`, which hands each state to its own step;
//! `http1` holds the HTTP/1.1 states (hyper's `http1` connection, parking into and out of it, a
//! file body sent with `sendfile(2)`, an upgraded stream), `track` the service wrapper hyper's
//! `http1` connection calls, and `http2` the HTTP/2 state.
//!
//! [`HopStream`]: super::stream::HopStream

mod http1;
mod http2;
mod track;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::stream::Socket;
use super::{Drive, Verdict};
use crate::http2::{sniff, Proto, PREFACE};
use crate::limits::Limit;
use crate::observe::Reason;
use crate::rt::timer::Tick;
use crate::rt::wake::Key;
use crate::service::{ConnService, HyperSvc};
use crate::settings::{Config, Control, Http2Config};
use http1::{Live, Sending};
use http2::H2;

/// Settings of a poller's HTTP connections.
pub(crate) struct HttpConfig {
    http1: hyper::server::conn::http1::Builder,
    /// Coalesce hyper's writes and send them once per drive (`pipeline_flush`).
    coalesce: bool,
    idle_timeout: Option<Duration>,
    /// How long a connection stays idle with hyper's state before it is parked; `None`: never.
    park_after: Option<Duration>,
    /// [`head_limit`](Self::head_limit) and [`head_reason`](Self::head_reason), worked out once
    /// from `header_read_timeout` (also how long a new connection may send nothing at all) and
    /// the idle timeout.
    head: (Option<Duration>, Reason),
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
            park_after: cfg.park_after,
            head: match (cfg.header_read_timeout, cfg.idle_timeout) {
                (Some(h), Some(i)) if i < h => (Some(i), Reason::IdleTimeout),
                (None, Some(i)) => (Some(i), Reason::IdleTimeout),
                (h, _) => (h, Reason::HeaderTimeout),
            },
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
        self.head.0
    }

    /// Which timeout [`head_limit`](Self::head_limit) is, as a reason to close.
    fn head_reason(&self) -> Reason {
        self.head.1
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

/// Whether `limit` (if any) counted from `since` has run out; if it has not, a drive is asked
/// for when it does. Counted in [`Tick`]s, what a connection's idle and closing times are kept
/// as.
fn expired(d: &mut Drive, since: Tick, limit: Option<Duration>) -> bool {
    let Some(limit) = limit else { return false };
    let due = since.after(limit);
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
    /// [`Fd::leave`](super::fd::Fd::leave)), and its descriptor.
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
    /// caller deregisters the socket if [`Fd::leave`](super::fd::Fd::leave) says it was
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

    /// What protocol state it holds: hyper's HTTP/1.1 connection (active, not parked), or its
    /// HTTP/2 connection.
    pub(crate) fn holds(&self) -> super::Holds {
        match self.state {
            State::Active(_) => super::Holds::Http1,
            State::Http2(_) => super::Holds::Http2,
            _ => super::Holds::Nothing,
        }
    }

    /// Starts a graceful shutdown: hyper finishes the request in flight and closes; a parked
    /// connection closes on its next drive.
    pub(crate) fn begin_drain(&mut self) {
        match &mut self.state {
            State::Active(live) => Pin::new(&mut live.conn).graceful_shutdown(),
            State::Http2(h2) => {
                Pin::new(&mut h2.conn).graceful_shutdown();
                h2.closing.get_or_insert_with(|| Tick::of(Instant::now()));
            }
            _ => {}
        }
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
                if expired(d, since, cfg.tls.as_ref().map(|(_, t)| *t)) {
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

    /// Polls the connection after an event, a wake or a timer: each state's step, until one
    /// gives a verdict (a step that moved the connection to another state gives none, and the
    /// new state is driven at once).
    pub(crate) fn drive(&mut self, key: Key, cfg: &HttpConfig, d: &mut Drive) -> Verdict {
        loop {
            let step = match self.state {
                State::Parked { since, .. } => self.drive_parked(key, cfg, d, since),
                State::Active(_) => self.drive_http1(key, cfg, d),
                State::Sending(_) => self.drive_sending(key, cfg, d),
                State::Upgraded => return self.drive_upgraded(key),
                State::Http2(_) => self.drive_http2(key, cfg, d),
                State::Done => return Verdict::Close,
            };
            if let Some(verdict) = step {
                return verdict;
            }
        }
    }

    /// A parked connection's step (a new one's included: its protocol decided, it becomes an
    /// HTTP/1.1 or HTTP/2 one): `None` to drive the state it moved to.
    #[inline(never)]
    fn drive_parked(
        &mut self,
        key: Key,
        cfg: &HttpConfig,
        d: &mut Drive,
        since: Tick,
    ) -> Option<Verdict> {
        // A drain closes a parked keep-alive connection, as hyper closes an idle
        // one. A new connection is served once, then closed: it may have waited in
        // the accept queue when the drain began, and its client has had no answer
        // yet (see the grace below).
        if d.draining && self.served {
            return Some(Verdict::Close);
        }
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Opening::Handshake = self.opening {
            return self.handshake(cfg, d, since);
        }
        let proto = match self.opening {
            Opening::Known(p) => Some(p),
            Opening::Sniff if self.socket.fd.maybe_readable() => match Self::sniff(&self.socket) {
                Ok(p) => p,
                Err(()) => return Some(Verdict::Close),
            },
            _ => None,
        };
        if let (Some(proto), true) = (proto, self.socket.fd.maybe_readable()) {
            self.opening = Opening::Known(proto);
            let State::Parked { svc, .. } = std::mem::replace(&mut self.state, State::Done) else {
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
            return None;
        }
        // What TLS still has to send (session tickets after the handshake); once
        // it is out, a client that waits before its first request holds no buffer.
        match self.socket.fd.flush(true) {
            Err(e) => {
                tracing::debug!(error = %e, "write failed");
                d.because(Reason::Error);
                return Some(Verdict::Close);
            }
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            Ok(true) => self.socket.fd.release_tls_buffers(),
            Ok(_) => {}
        }
        if expired(d, since, self.idle_limit(cfg)) {
            tracing::debug!("closing a parked connection at its idle limit");
            d.because(match self.served {
                true => Reason::IdleTimeout,
                false => cfg.head_reason(),
            });
            return Some(Verdict::Close);
        }
        // A new connection whose first request has not come within the grace is
        // closed, so that pre-connected sockets (browsers open some) do not hold
        // the drain for a whole header timeout.
        if d.draining && expired(d, since, Some(crate::settings::FIRST_REQUEST_GRACE)) {
            return Some(Verdict::Close);
        }
        if let Some(at) = self.age_deadline(cfg) {
            if expired_at(d, crate::limits::age_idle_close(at, since.instant())) {
                tracing::debug!("closing an idle connection past its max age");
                cfg.ctl.limit_reached(Limit::Age);
                d.because(Reason::MaxConnectionAge);
                return Some(Verdict::Close);
            }
        }
        Some(Verdict::Keep)
    }

    /// Drops hyper's state, even if dropping it panics.
    fn set_done(&mut self) {
        let old = std::mem::replace(&mut self.state, State::Done);
        let _ = catch_unwind(AssertUnwindSafe(move || drop(old)));
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
}
