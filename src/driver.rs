//! One HTTP connection on a poller: hyper's `http1` connection polled in place, and idle
//! parking.
//!
//! A [`Conn`] is in one of three states:
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
//!
//! Timeouts: a new connection that sends nothing is closed at the header timeout (or the idle
//! timeout, if smaller); one idle at a request boundary, parked or not, at the idle timeout.
//!
//! Parking: hyper holds a header-read sleep exactly while it waits for a request head (see
//! [`crate::timer`]). When that is so, the last read ended in `WouldBlock` and no write is
//! waiting, nothing is in flight; the driver then takes hyper's parts back with `into_parts`. If
//! hyper's read buffer still holds bytes (the start of the next request), a new hyper
//! connection is started over those bytes at once, and parking is not tried again until another
//! request has been dispatched, so a slow sender cannot reset the header timeout more than once.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::server::conn::http1;
use std::future::Future;

use crate::service::{ConnService, HyperSvc};
use crate::stream::{HopStream, Socket};
use crate::timer;
use crate::wake::Key;

type HyperConn<S> = http1::UpgradeableConnection<HopStream, HyperSvc<S>>;

/// Settings the driver needs, shared by a poller's connections.
pub(crate) struct DriverConfig {
    pub(crate) http1: http1::Builder,
    /// Coalesce hyper's writes and send them once per drive (`pipeline_flush`).
    pub(crate) coalesce: bool,
    pub(crate) idle_timeout: Option<Duration>,
    /// `header_read_timeout`: also how long a new connection may send nothing at all.
    pub(crate) header_timeout: Option<Duration>,
    /// How long a connection stays idle with hyper's state before it is parked; `None`: never.
    pub(crate) park_after: Option<Duration>,
    /// Where parks are counted.
    pub(crate) ctl: std::sync::Arc<crate::settings::Control>,
}

enum State<S: ConnService> {
    /// A connection on which no request has been dispatched yet is waiting for its first
    /// request head, which the header timeout bounds, not the idle timeout
    /// ([`Conn::idle_limit`]).
    Parked {
        svc: S,
        since: Instant,
    },
    /// Boxed, with what parking tracks, so that a parked connection's slab entry stays small.
    Active(Box<Live<S>>),
    /// Boxed, so that the rare upgraded connection does not grow every slab entry.
    Upgraded(Box<Quiet>),
    Done,
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
    _hot: Hot,
    /// The request count at which parking found a partial request head.
    no_park_at: Option<u64>,
    /// When the connection was first seen idle, and the request count then.
    idle_since: Option<(Instant, u64)>,
}

thread_local! {
    /// Connections of this poller holding hyper's state.
    static HOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Over this many connections holding hyper's state on a poller, an idle one parks at once
/// instead of waiting for `park_after`: busy keep-alive connections stay hot while they are
/// few, and memory stays flat when there are many.
const HOT_LIMIT: usize = 128;

/// Counts a connection holding hyper's state for as long as it lives.
struct Hot;

impl Hot {
    fn new() -> Self {
        HOT.with(|h| h.set(h.get() + 1));
        Hot
    }

    fn crowded() -> bool {
        HOT.with(|h| h.get() > HOT_LIMIT)
    }
}

impl Drop for Hot {
    fn drop(&mut self) {
        HOT.with(|h| h.set(h.get().saturating_sub(1)));
    }
}

/// Whether `limit` (if any) counted from `since` has run out; if it has not, the connection's
/// timer is armed for when it does.
fn expired(key: Key, since: Instant, limit: Option<Duration>, now: Instant) -> bool {
    let Some(limit) = limit else { return false };
    let due = since + limit;
    if now >= due {
        return true;
    }
    timer::arm(key, due);
    false
}

/// What the poller should do with a connection after driving it.
pub(crate) enum Verdict {
    Keep,
    Close,
    /// A handler hijacked the connection: it becomes a read-handler connection.
    Hijacked(crate::hijack::Taken),
}

/// One connection in a poller's slab.
pub(crate) struct Conn<S: ConnService> {
    pub(crate) socket: Arc<Socket>,
    pub(crate) key: Key,
    state: State<S>,
}

impl<S: ConnService> Conn<S> {
    pub(crate) fn new(socket: Arc<Socket>, key: Key, svc: S, now: Instant) -> Self {
        Conn {
            socket,
            key,
            state: State::Parked { svc, since: now },
        }
    }

    /// Starts a graceful shutdown: hyper finishes the request in flight and closes; a parked
    /// connection closes on its next drive.
    pub(crate) fn begin_drain(&mut self) {
        if let State::Active(live) = &mut self.state {
            Pin::new(&mut live.conn).graceful_shutdown();
        }
    }

    /// Polls the connection after an event, a wake or a timer.
    pub(crate) fn drive(&mut self, cfg: &DriverConfig, now: Instant, draining: bool) -> Verdict {
        loop {
            match &mut self.state {
                State::Parked { since, .. } => {
                    if draining {
                        return Verdict::Close;
                    }
                    if self.socket.maybe_readable() {
                        let State::Parked { svc, .. } =
                            std::mem::replace(&mut self.state, State::Done)
                        else {
                            unreachable!()
                        };
                        self.activate(cfg, svc, None, None);
                        continue;
                    }
                    if expired(self.key, *since, Self::idle_limit(self.key, cfg), now) {
                        tracing::debug!("closing a parked connection at its idle limit");
                        return Verdict::Close;
                    }
                    return Verdict::Keep;
                }
                State::Active(live) => {
                    let waker = self.key.waker();
                    let mut cx = Context::from_waker(&waker);
                    let polled = timer::with_current(self.key, || {
                        catch_unwind(AssertUnwindSafe(|| Pin::new(&mut live.conn).poll(&mut cx)))
                    });
                    // Send what hyper wrote during this poll in one write (pipelined responses
                    // included). Also before an upgrade's new owner can write.
                    if let Poll::Ready(Err(e)) = self.socket.poll_flush_pending(&cx, true) {
                        tracing::debug!(error = %e, "write failed");
                        self.set_done();
                        return Verdict::Close;
                    }
                    match polled {
                        Ok(Poll::Pending) => {
                            if let Some(handler) = crate::sse::take_over(self.key) {
                                return self.take_over(handler);
                            }
                            if draining {
                                return Verdict::Keep;
                            }
                            return self.on_idle(cfg, now);
                        }
                        Ok(Poll::Ready(res)) => {
                            if let Err(e) = res {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                            self.set_done();
                            match crate::hijack::claim(self.key) {
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
                                    since: now,
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
                    let waker = self.key.waker();
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
                        *since = now;
                    }
                    if expired(self.key, *since, cfg.idle_timeout, now) {
                        tracing::debug!("closing an upgraded connection at the idle timeout");
                        return Verdict::Close;
                    }
                    return Verdict::Keep;
                }
                State::Done => return Verdict::Close,
            }
        }
    }

    /// Takes the socket back from hyper after it wrote a response head whose body the
    /// connection's new read handler will write (an SSE subscriber).
    fn take_over(&mut self, handler: Box<dyn crate::tcp::Handler>) -> Verdict {
        let State::Active(live) = std::mem::replace(&mut self.state, State::Done) else {
            return Verdict::Close;
        };
        match live.conn.into_parts() {
            Some(parts) => Verdict::Hijacked(crate::hijack::Taken {
                handler,
                leftover: parts.io.release(parts.read_buf),
            }),
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
        cfg: &DriverConfig,
        svc: S,
        prefix: Option<Bytes>,
        no_park_at: Option<u64>,
    ) {
        let io = HopStream::new(self.socket.clone(), self.key, prefix, cfg.coalesce);
        let conn = cfg
            .http1
            .serve_connection(io, HyperSvc::new(svc))
            .with_upgrades();
        self.state = State::Active(Box::new(Live {
            conn,
            _hot: Hot::new(),
            no_park_at,
            idle_since: None,
        }));
    }

    /// After a poll that left hyper waiting: parks the connection, or closes it at the idle
    /// timeout, once it has been idle at a request boundary long enough. Both hold with parking
    /// off (`park_after` `None`), when the idle timeout is the only one.
    fn on_idle(&mut self, cfg: &DriverConfig, now: Instant) -> Verdict {
        let State::Active(live) = &mut self.state else {
            return Verdict::Keep;
        };
        let meta = timer::slot_meta(self.key);
        let idle = meta.head_wait
            && !self.socket.maybe_readable()
            && self.socket.write_idle()
            && self.socket.nothing_pending()
            && live.no_park_at != Some(meta.requests);
        if !idle {
            live.idle_since = None;
            return Verdict::Keep;
        }
        let since = match live.idle_since {
            Some((t, n)) if n == meta.requests => t,
            _ => {
                live.idle_since = Some((now, meta.requests));
                now
            }
        };
        if let Some(after) = cfg.park_after {
            if now >= since + after || Hot::crowded() {
                self.park(cfg, since, meta.requests);
                return Verdict::Keep;
            }
            timer::arm(self.key, since + after);
        }
        if expired(self.key, since, cfg.idle_timeout, now) {
            tracing::debug!("closing a connection at the idle timeout");
            return Verdict::Close;
        }
        Verdict::Keep
    }

    /// How long a parked connection may stay as it is: a new one that has sent no request yet
    /// has the smaller of the header and idle timeouts (as hyper gives it on the tokio
    /// backend), any other the idle timeout.
    fn idle_limit(key: Key, cfg: &DriverConfig) -> Option<Duration> {
        if timer::slot_meta(key).requests == 0 {
            match (cfg.header_timeout, cfg.idle_timeout) {
                (Some(h), Some(i)) => Some(h.min(i)),
                (h, i) => h.or(i),
            }
        } else {
            cfg.idle_timeout
        }
    }

    /// Parks the connection, idle since `since`.
    fn park(&mut self, cfg: &DriverConfig, since: Instant, requests: u64) {
        let State::Active(live) = std::mem::replace(&mut self.state, State::Done) else {
            return;
        };
        let Some(parts) = live.conn.into_parts() else {
            return;
        };
        let unread = parts.io.release(parts.read_buf);
        self.socket.release_buffers();
        let svc = parts.service.into_inner();
        if unread.is_empty() {
            cfg.ctl
                .parked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.state = State::Parked { svc, since };
            if let Some(limit) = Self::idle_limit(self.key, cfg) {
                timer::arm(self.key, since + limit);
            }
        } else {
            // The start of the next request is buffered: keep it, in a fresh hyper connection.
            self.activate(cfg, svc, Some(unread), Some(requests));
            crate::wake::push_local(self.key);
        }
    }
}
