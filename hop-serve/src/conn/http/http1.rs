//! The HTTP/1.1 states of an [`HttpConn`]: `Active` ([`Live`]: hyper's `http1` connection over
//! a [`HopStream`], with what parking tracks), its step (poll hyper, send what it wrote in one
//! write, then the idle check that parks the connection or closes it at its time limit, and the
//! request-body stall check), parking and starting a fresh hyper connection (`activate`), a read
//! handler taking the socket over, `Sending` (a file body sent with `sendfile(2)` once hyper
//! wrote its head) and `Upgraded` (the stream went to an upgrade). The service hyper calls is
//! in `track`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::server::conn::http1;
use std::future::Future;

use super::super::current::{self, Current};
use super::super::stream::HopStream;
use super::super::{Drive, Verdict};
use super::track::Counted;
use super::{expired, expired_at, hyper_svc, HttpConfig, HttpConn, State};
use crate::limits::Limit;
use crate::observe::Reason;
use crate::rt::timer::Tick;
use crate::rt::wake::Key;
use crate::service::ConnService;

type HyperConn<S> = http1::UpgradeableConnection<HopStream, Counted<S>>;

/// A file body on its way out, and what the connection goes on with after it.
pub(super) struct Sending<S: ConnService> {
    body: current::FileSend,
    svc: S,
    /// Read behind the request (a pipelined one): the next hyper connection's first bytes.
    unread: Bytes,
    /// Requests served so far.
    requests: u64,
}

/// A connection holding hyper's state.
pub(super) struct Live<S: ConnService> {
    pub(super) conn: HyperConn<S>,
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
    pub(super) drain_after_poll: bool,
    /// hyper's last poll left it waiting for a request head with nothing in flight, to read or
    /// to send (`on_idle` found it quiet): until bytes come, polling it again does nothing.
    quiet: bool,
}

impl<S: ConnService> HttpConn<S> {
    /// An HTTP/1.1 connection's step: polls hyper's connection and sends what it wrote; then,
    /// with hyper waiting, the idle and stall checks (or a takeover, or a file body to send).
    /// `None` to drive the state it moved to.
    #[inline]
    pub(super) fn drive_http1(
        &mut self,
        key: Key,
        cfg: &HttpConfig,
        d: &mut Drive,
    ) -> Option<Verdict> {
        let State::Active(live) = &mut self.state else {
            unreachable!()
        };
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
        // Quiet since hyper's last poll, and nothing came: a deadline's drive (parking, the
        // idle timeout) goes straight to the idle checks, as the poll would have (about 600
        // instructions a wake of a parked connection, whose park deadline is such a drive).
        let quiet = std::mem::take(&mut live.quiet)
            && !woke_readable
            && !self.socket.fd.read_closed()
            && !live.drain_after_poll
            && !d.draining
            && self.socket.fd.write_idle()
            && self.socket.nothing_pending();
        let polled = if quiet {
            Ok(Poll::Pending)
        } else {
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
                return Some(Verdict::Close);
            }
            polled
        };
        match polled {
            Ok(Poll::Pending) => {
                if live.cur.takeover.as_ref().is_some_and(|t| t.head_is_out()) {
                    return Some(self.take_over(d));
                }
                if live.cur.file.is_some() {
                    return self.start_sending(cfg);
                }
                if d.draining {
                    return Some(Verdict::Keep);
                }
                if let Some(verdict) = self.body_stall(cfg, d) {
                    return Some(verdict);
                }
                Some(self.on_idle(key, cfg, d, woke_readable))
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
                    Some(Ok(taken)) => return Some(Verdict::Hijacked(taken)),
                    Some(Err(e)) => {
                        crate::logs::warn_limited!("hijack failed: {e}; closing");
                        d.because(Reason::Error);
                        return Some(Verdict::Close);
                    }
                    None => {}
                }
                if Arc::strong_count(&self.socket) > 1 {
                    // The stream went to an upgrade; it lives on elsewhere.
                    self.state = State::Upgraded;
                    return None;
                }
                Some(Verdict::Close)
            }
            Err(panic) => {
                crate::logs::error_limited!(
                    panic = crate::logs::panic_message(&*panic),
                    "connection panicked; closing it"
                );
                d.because(Reason::Error);
                self.set_done();
                Some(Verdict::Close)
            }
        }
    }

    /// A file body's step: the head hyper wrote, then the file with `sendfile(2)` until the
    /// socket is full; once all is sent, a fresh hyper connection (`None`: driven at once).
    #[inline(never)]
    pub(super) fn drive_sending(
        &mut self,
        key: Key,
        cfg: &HttpConfig,
        d: &mut Drive,
    ) -> Option<Verdict> {
        let State::Sending(s) = &mut self.state else {
            unreachable!()
        };
        let waker = key.waker();
        // The head hyper wrote goes first.
        match self
            .socket
            .poll_flush_pending(&Context::from_waker(&waker), true)
        {
            Poll::Ready(Ok(())) => {}
            Poll::Pending => return Some(Verdict::Keep),
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                d.because(Reason::Error);
                return Some(Verdict::Close);
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
                    crate::logs::warn_limited!("a file shrank while it was being sent; closing");
                    d.because(Reason::Error);
                    return Some(Verdict::Close);
                }
                Ok(n) => body.len -= n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Some(Verdict::Keep);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "sendfile failed");
                    d.because(Reason::Error);
                    return Some(Verdict::Close);
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
            return Some(Verdict::Close);
        }
        // On with a fresh hyper connection, as after parking (it parks in turn if
        // nothing follows).
        let prefix = (!unread.is_empty()).then_some(unread);
        self.activate(key, cfg, svc, prefix, Some((d.now_tick, requests)));
        None
    }

    /// An upgraded connection's step: what hyper left to send goes out, and the connection
    /// closes once the upgrade's owner has dropped the stream.
    #[inline(never)]
    pub(super) fn drive_upgraded(&mut self, key: Key) -> Verdict {
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
        Verdict::Keep
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

    pub(super) fn activate(
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
            quiet: false,
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
        live.quiet = !live.cur.body_pending;
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
            if expired(d, since, cfg.idle_timeout) {
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
        if expired(d, since, cfg.head_limit()) {
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
