//! The HTTP/2 state of an [`HttpConn`] ([`H2`]: hyper's `http2` connection over a
//! [`HopStream`] whose meter watches the frames, with what its timeouts track) and its step:
//! GOAWAY once the connection reaches `max_requests_per_connection` or `max_connection_age`,
//! stalled request bodies reset at their deadline, GOAWAY after `http2_idle_timeout` with no
//! stream open, and the close timeout once GOAWAY went out. Its streams run as local tasks the
//! connection owns; between streams it can move to another poller (see [`Moved`](super::Moved)).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::server::conn::http2;
use std::future::Future;

use super::super::stream::HopStream;
use super::super::{Drive, Verdict};
use super::{expired, hyper_svc, HttpConfig, HttpConn, State};
use crate::http2::{Http2Svc, Meter, Stall};
use crate::limits::Limit;
use crate::observe::Reason;
use crate::rt::tasks::LocalExec;
use crate::rt::timer::Tick;
use crate::rt::wake::Key;
use crate::service::ConnService;
use crate::settings::Http2Config;

type H2Conn<S> = http2::Connection<HopStream, Http2Svc<S>, LocalExec>;

/// An HTTP/2 connection.
pub(super) struct H2<S: ConnService> {
    pub(super) conn: H2Conn<S>,
    /// Since when no stream has been open (reset when one starts, see
    /// [`HttpConn::stream_started`]).
    idle_since: Option<Tick>,
    /// When GOAWAY was asked for (idle timeout or shutdown): hyper closes once streams are
    /// done and the GOAWAY is sent, which a peer that stops reading can hold off until the close
    /// timeout.
    pub(super) closing: Option<Tick>,
    /// What the socket sees of the frames (shared with the [`HopStream`]): its stalled
    /// request bodies are reset here when they fall due.
    pub(super) meter: Arc<std::sync::Mutex<Meter>>,
    /// Streams started (`max_requests_per_connection`).
    streams: u64,
    /// Why hop sent GOAWAY (the idle timeout, a limit), the reason it closed.
    goaway_for: Option<Reason>,
}

impl<S: ConnService> HttpConn<S> {
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

    /// Starts serving HTTP/2: hyper's connection, whose streams become local tasks that belong
    /// to this connection.
    pub(super) fn start_http2(&mut self, key: Key, cfg: &HttpConfig, h2: &Http2Config, svc: S) {
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

    /// An HTTP/2 connection's step: GOAWAY at a limit, a poll of hyper's connection, what it
    /// wrote sent; then, with hyper waiting, the meter's deadlines and the close and idle
    /// timeouts. `None` to poll it again (to read resets, or to send GOAWAY).
    #[inline(never)]
    pub(super) fn drive_http2(
        &mut self,
        key: Key,
        cfg: &HttpConfig,
        d: &mut Drive,
    ) -> Option<Verdict> {
        let State::Http2(h2) = &mut self.state else {
            unreachable!()
        };
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
                h2.closing = Some(d.now_tick);
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
            return Some(Verdict::Close);
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
                            Stall::Reset => return None,
                            Stall::Close => {
                                tracing::debug!("HTTP/2 request body stalled mid-frame; closing");
                                d.because(Reason::RequestBodyTimeout);
                                self.set_done();
                                return Some(Verdict::Close);
                            }
                            Stall::None => {}
                        }
                    }
                }
                if d.owned > 0 {
                    h2.idle_since = None;
                    return Some(Verdict::Keep);
                }
                if let Some(at) = h2.closing {
                    if expired(d, at, Some(cfg.close_timeout)) {
                        tracing::debug!("HTTP/2 connection not closed in time; closing");
                        if let Some(why) = h2.goaway_for {
                            d.because(why);
                        }
                        self.set_done();
                        return Some(Verdict::Close);
                    }
                    return Some(Verdict::Keep);
                }
                let since = *h2.idle_since.get_or_insert_with(|| {
                    // Idle: the coalescing buffer is not kept meanwhile.
                    self.socket.release_buffers();
                    d.now_tick
                });
                let limit = cfg.http2.as_ref().and_then(|c| c.idle_timeout);
                if expired(d, since, limit) {
                    tracing::debug!("HTTP/2 connection idle: sending GOAWAY");
                    Pin::new(&mut h2.conn).graceful_shutdown();
                    h2.closing = Some(d.now_tick);
                    h2.goaway_for.get_or_insert(Reason::IdleTimeout);
                    // Polled again to send it.
                    return None;
                }
                Some(Verdict::Keep)
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
                Some(Verdict::Close)
            }
            Err(panic) => {
                crate::logs::error_limited!(
                    panic = crate::logs::panic_message(&*panic),
                    "HTTP/2 connection panicked; closing it"
                );
                d.because(Reason::Error);
                self.set_done();
                Some(Verdict::Close)
            }
        }
    }
}
