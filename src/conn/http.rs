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
//!   sees it still held), or until no bytes have moved for the idle timeout.
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
//! request boundary. Two things about hyper are relied on, each checked by a debug assertion
//! and by the parking tests: it dispatches a request only once the previous response is done,
//! and it reads the next head only after the previous request's body.
//!
//! Timeouts: a new connection that sends nothing is closed at the header timeout (or the idle
//! timeout, if smaller); one waiting for a request head, at the header timeout counted from
//! when it began waiting (a partial head included), or once parked at the idle timeout. After a
//! request with a body, the connection is not parked (hyper may still be reading that body: a
//! handler can respond first) until its next request; the idle timeout, counted from the last
//! byte read, holds meanwhile.
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
use crate::http2::{sniff, Http2Svc, Proto, PREFACE};
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
    /// HTTP/2 settings, if it is served.
    http2: Option<Http2Config>,
    /// How long an HTTP/2 connection that was sent GOAWAY may take to close once its streams
    /// are done (the read handlers' `close_timeout`).
    close_timeout: Duration,
    /// Where parks, HTTP/2 streams and TLS handshakes are counted.
    ctl: Arc<Control>,
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
        HttpConfig {
            http1,
            coalesce: cfg.pipeline_flush,
            idle_timeout: cfg.idle_timeout,
            header_timeout: cfg.header_read_timeout,
            park_after: cfg.park_after,
            http2: cfg.http2.enabled.then(|| cfg.http2.clone()),
            close_timeout: cfg.tcp.close_timeout,
            ctl,
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            tls: cfg.tls.clone().map(|c| (c, cfg.tls_handshake_timeout)),
        }
    }

    /// A new connection's TLS state, if this is a TLS listener (`None` also if rustls refuses
    /// the configuration, which is logged).
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub(crate) fn tls_connection(&self) -> Option<Result<rustls::ServerConnection, ()>> {
        let (config, _) = self.tls.as_ref()?;
        Some(
            rustls::ServerConnection::new(config.current(self.http2.is_some())).map_err(|e| {
                tracing::error!(error = %e, "rustls refused its configuration; closing");
            }),
        )
    }
}

impl HttpConfig {
    /// How long a connection may wait for a request head: the header timeout, or the idle
    /// timeout if that is smaller.
    fn head_limit(&self) -> Option<Duration> {
        match (self.header_timeout, self.idle_timeout) {
            (Some(h), Some(i)) => Some(h.min(i)),
            (h, i) => h.or(i),
        }
    }
}

/// The service hyper calls: the user's, with panics caught ([`HyperSvc`]), counting each
/// request on the connection's [`Current`] until hyper drops its response body.
#[derive(Clone)]
pub(crate) struct Counted<S>(HyperSvc<S>);

impl<S: ConnService> hyper::service::Service<Request<Incoming>> for Counted<S> {
    type Response = Response<Tracked<Body<S>>>;
    type Error = crate::service::BoxError;
    type Future =
        TrackedFuture<<HyperSvc<S> as hyper::service::Service<Request<Incoming>>>::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let body_pending = !http_body::Body::is_end_stream(req.body());
        let key = current::with_any(|c| {
            // Idle detection relies on hyper dispatching a request only once the previous
            // response is done (its body dropped): a hyper release that pipelined dispatches
            // would let the driver park a connection mid-request.
            debug_assert_eq!(
                c.in_flight, 0,
                "hyper dispatched a request before the previous response was done"
            );
            c.requests += 1;
            c.in_flight += 1;
            c.body_pending = body_pending;
            c.key
        });
        TrackedFuture {
            inner: self.0.call(req),
            key,
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future; its response body is [`Tracked`].
    pub(crate) struct TrackedFuture<F> {
        #[pin]
        inner: F,
        key: Option<Key>,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Tracked<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let key = *this.key;
        this.inner
            .poll(cx)
            .map(|r| r.map(|res| res.map(|body| Tracked { body, key })))
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
    /// Boxed, so that the rare upgraded connection does not grow every slab entry.
    Upgraded(Box<Quiet>),
    /// Boxed: hyper's HTTP/2 connection, with what the idle timeout tracks.
    Http2(Box<H2<S>>),
    Done,
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
}

/// An upgraded connection's activity: the socket's [`Socket::foreign_io`] count when last
/// looked at, and when it last changed.
struct Quiet {
    io: u32,
    since: Instant,
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
    idle_since: Option<(Instant, u64)>,
}

/// Whether `limit` (if any) counted from `since` has run out; if it has not, a drive is asked
/// for when it does.
fn expired(d: &mut Drive, since: Instant, limit: Option<Duration>) -> bool {
    let Some(limit) = limit else { return false };
    let due = since + limit;
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
    /// How the protocol is decided, or what it was decided to be.
    opening: Opening,
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
/// every request if it is a TLS connection.
fn hyper_svc<S>(svc: S, socket: &Socket) -> HyperSvc<S> {
    let svc = HyperSvc::new(svc);
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
            opening: Self::opening(&socket, cfg),
            socket,
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
    pub(crate) fn stream_started(&mut self) {
        if let State::Http2(h2) = &mut self.state {
            h2.idle_since = None;
        }
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
    fn handshake(&mut self, cfg: &HttpConfig, d: &mut Drive, since: Instant) -> Option<Verdict> {
        use std::sync::atomic::Ordering::Relaxed;
        match self.socket.fd.poll_handshake() {
            Poll::Pending => {
                if expired(d, since, cfg.tls.as_ref().map(|(_, t)| *t)) {
                    tracing::debug!("TLS handshake timed out; closing");
                    cfg.ctl.tls_handshake_timeouts.fetch_add(1, Relaxed);
                    return Some(Verdict::Close);
                }
                Some(Verdict::Keep)
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed; closing");
                cfg.ctl.tls_handshake_failures.fetch_add(1, Relaxed);
                Some(Verdict::Close)
            }
            Poll::Ready(Ok(())) => {
                cfg.ctl.tls_handshakes.fetch_add(1, Relaxed);
                let h2 = cfg.http2.is_some() && self.socket.fd.tls_alpn_is(crate::tls::ALPN_H2);
                self.opening = Opening::Known(if h2 { Proto::Http2 } else { Proto::Http1 });
                // The first request's time limits count from here.
                if let State::Parked { since, .. } = &mut self.state {
                    *since = Tick::of(d.now);
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
                    if d.draining {
                        return Verdict::Close;
                    }
                    let since = since.instant();
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
                        match (proto, &cfg.http2) {
                            (Proto::Http2, Some(h2)) => self.start_http2(key, cfg, h2, svc),
                            _ => self.activate(key, cfg, svc, None, None),
                        }
                        continue;
                    }
                    // What TLS still has to send (session tickets after the handshake).
                    if let Err(e) = self.socket.fd.flush(true) {
                        tracing::debug!(error = %e, "write failed");
                        return Verdict::Close;
                    }
                    if expired(d, since, self.idle_limit(cfg)) {
                        tracing::debug!("closing a parked connection at its idle limit");
                        return Verdict::Close;
                    }
                    return Verdict::Keep;
                }
                State::Active(live) => {
                    let waker = key.waker();
                    let mut cx = Context::from_waker(&waker);
                    // Bytes to read: the peer is not quiet (see `on_idle`).
                    let woke_readable = self.socket.fd.maybe_readable();
                    let Live { conn, cur, .. } = &mut **live;
                    let polled = current::lend(cur, || {
                        catch_unwind(AssertUnwindSafe(|| Pin::new(conn).poll(&mut cx)))
                    });
                    self.served |= live.cur.requests > 0;
                    // Send what hyper wrote during this poll in one write (pipelined responses
                    // included). Also before a read handler or an upgrade's new owner writes.
                    if let Poll::Ready(Err(e)) = self.socket.poll_flush_pending(&cx, true) {
                        tracing::debug!(error = %e, "write failed");
                        self.set_done();
                        return Verdict::Close;
                    }
                    match polled {
                        Ok(Poll::Pending) => {
                            if live.cur.takeover.as_ref().is_some_and(|t| t.head_is_out()) {
                                return self.take_over();
                            }
                            if d.draining {
                                return Verdict::Keep;
                            }
                            return self.on_idle(key, cfg, d, woke_readable);
                        }
                        Ok(Poll::Ready(res)) => {
                            if let Err(e) = res {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                            let takeover = live.cur.takeover.take();
                            self.set_done();
                            match takeover.and_then(|t| t.after_finish()) {
                                Some(Ok(taken)) => return Verdict::Hijacked(taken),
                                Some(Err(e)) => {
                                    tracing::warn!("hijack failed: {e}; closing");
                                    return Verdict::Close;
                                }
                                None => {}
                            }
                            if Arc::strong_count(&self.socket) > 1 {
                                // The stream went to an upgrade; it lives on elsewhere.
                                self.state = State::Upgraded(Box::new(Quiet {
                                    io: self.socket.foreign_io(),
                                    since: d.now,
                                }));
                                continue;
                            }
                            return Verdict::Close;
                        }
                        Err(panic) => {
                            tracing::error!(
                                panic = crate::service::panic_message(&*panic),
                                "connection panicked; closing it"
                            );
                            self.set_done();
                            return Verdict::Close;
                        }
                    }
                }
                State::Upgraded(quiet) => {
                    let Quiet { io, since } = &mut **quiet;
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
                    // The idle timeout holds for upgraded connections too: bytes moved by their
                    // owner count as activity.
                    let seen = self.socket.foreign_io();
                    if seen != *io {
                        *io = seen;
                        *since = d.now;
                    }
                    let since = *since;
                    if expired(d, since, cfg.idle_timeout) {
                        tracing::debug!("closing an upgraded connection at the idle timeout");
                        return Verdict::Close;
                    }
                    return Verdict::Keep;
                }
                State::Http2(h2) => {
                    let waker = key.waker();
                    let mut cx = Context::from_waker(&waker);
                    let conn = &mut h2.conn;
                    let polled = catch_unwind(AssertUnwindSafe(|| Pin::new(conn).poll(&mut cx)));
                    if let Poll::Ready(Err(e)) = self.socket.poll_flush_pending(&cx, true) {
                        tracing::debug!(error = %e, "write failed");
                        self.set_done();
                        return Verdict::Close;
                    }
                    match polled {
                        Ok(Poll::Pending) => {
                            if d.owned > 0 {
                                h2.idle_since = None;
                                return Verdict::Keep;
                            }
                            if let Some(at) = h2.closing {
                                if expired(d, at, Some(cfg.close_timeout)) {
                                    tracing::debug!(
                                        "HTTP/2 connection not closed in time; closing"
                                    );
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
                                // Polled again to send it.
                                continue;
                            }
                            return Verdict::Keep;
                        }
                        Ok(Poll::Ready(res)) => {
                            if let Err(e) = res {
                                tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                            }
                            self.set_done();
                            return Verdict::Close;
                        }
                        Err(panic) => {
                            tracing::error!(
                                panic = crate::service::panic_message(&*panic),
                                "HTTP/2 connection panicked; closing it"
                            );
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
        let io = HopStream::new(self.socket.clone(), key, None, cfg.coalesce);
        let conn = h2.builder(LocalExec::new(Some(key))).serve_connection(
            io,
            Http2Svc::new(hyper_svc(svc, &self.socket), cfg.ctl.clone()),
        );
        self.state = State::Http2(Box::new(H2 {
            conn,
            idle_since: None,
            closing: None,
        }));
    }

    /// Takes the socket back from hyper for the read handler waiting on it, once hyper has
    /// written the response head whose body that handler writes (an SSE subscriber).
    fn take_over(&mut self) -> Verdict {
        let State::Active(mut live) = std::mem::replace(&mut self.state, State::Done) else {
            return Verdict::Close;
        };
        let Some(takeover) = live.cur.takeover.take() else {
            return Verdict::Close;
        };
        match live.conn.into_parts() {
            Some(parts) => Verdict::Hijacked(takeover.into_taken(parts.io, parts.read_buf)),
            None => Verdict::Close,
        }
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
        resume: Option<(Instant, u64)>,
    ) {
        let io = HopStream::new(self.socket.clone(), key, prefix, cfg.coalesce);
        let conn = cfg
            .http1
            .serve_connection(io, Counted(hyper_svc(svc, &self.socket)))
            .with_upgrades();
        let mut cur = Current::new(key);
        cur.requests = resume.map_or(0, |(_, n)| n);
        self.state = State::Active(Box::new(Live {
            conn,
            cur,
            no_park_at: resume.map(|(_, n)| n),
            idle_since: resume,
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
                live.idle_since = Some((d.now, requests));
                d.now
            }
        };
        if live.cur.body_pending {
            // hyper may still be reading the body: no parking, the idle timeout only.
            if expired(d, since, cfg.idle_timeout) {
                tracing::debug!("closing a connection at the idle timeout");
                return Verdict::Close;
            }
            return Verdict::Keep;
        }
        if let Some(after) = cfg.park_after {
            if live.no_park_at != Some(requests) {
                if d.now >= since + after || d.crowded {
                    self.park(key, cfg, d, since, requests);
                    return Verdict::Keep;
                }
                d.wake_at(since + after);
            }
        }
        if expired(d, since, cfg.head_limit()) {
            tracing::debug!("closing a connection waiting for a request head at its time limit");
            return Verdict::Close;
        }
        Verdict::Keep
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
    fn park(&mut self, key: Key, cfg: &HttpConfig, d: &mut Drive, since: Instant, requests: u64) {
        let State::Active(live) = std::mem::replace(&mut self.state, State::Done) else {
            return;
        };
        let Some(parts) = live.conn.into_parts() else {
            return;
        };
        let unread = parts.io.release(parts.read_buf);
        self.socket.release_buffers();
        let svc = parts.service.0.into_inner();
        if unread.is_empty() {
            cfg.ctl
                .parked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.state = State::Parked {
                svc,
                since: Tick::of(since),
            };
            if let Some(limit) = self.idle_limit(cfg) {
                d.wake_at(since + limit);
            }
        } else {
            // The start of the next request is buffered: keep it, in a fresh hyper connection.
            self.activate(key, cfg, svc, Some(unread), Some((since, requests)));
            crate::rt::wake::push_ready(key);
        }
    }
}
