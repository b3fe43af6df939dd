//! What a handler answers an SSE request with: [`Hub::subscribe`]'s [`Subscription`] (the
//! `Last-Event-ID`, the replay and its limit), and its response, whose [`SseBody`] either has
//! the connection taken over by a reactor `Subscriber` once hyper has written the head, or
//! streams the hub's events from a channel (the tokio backend), with keep-alive comments and
//! the end of the stream at a graceful shutdown.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Version};
use http_body::{Body, Frame};

use crate::conn::current;
use crate::conn::takeover::Takeover;
use crate::handler::context;
use crate::handler::over_mark;
use crate::limits::{OpenGuard, OpenKind};
use crate::rt::wake::Key;

use super::event::Event;
use super::hub::{ChannelSink, Hub, Sink};
use super::subscriber::Subscriber;

impl Hub {
    /// Starts a subscription for `req`; answer the request with [`Subscription::response`]
    /// (or, in axum, return the subscription: it is `IntoResponse`).
    pub fn subscribe<B>(&self, req: &Request<B>) -> Subscription {
        let last_event_id = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Subscription {
            hub: self.clone(),
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            last_event_id,
            chunked: req.version() >= Version::HTTP_11,
            http1: req.version() < Version::HTTP_2,
            backlog: Vec::new(),
        }
    }
}

/// A subscription being set up: replay missed events with [`send`](Self::send), then answer
/// with [`response`](Self::response) (or axum's `IntoResponse`).
#[derive(Debug)]
pub struct Subscription {
    hub: Hub,
    id: u64,
    last_event_id: Option<String>,
    chunked: bool,
    /// Asked over HTTP/1.x: the response is its connection's last.
    http1: bool,
    backlog: Vec<Bytes>,
}

impl Subscription {
    /// This subscriber's id, for [`Hub::send_to`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The `Last-Event-ID` the client sent when reconnecting.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// Queues an event for this subscriber only, sent first (e.g. those it missed).
    ///
    /// The replay counts against the hub's `max_queue` as later events do: a replay that
    /// reaches it before its last event is queued drops the subscriber at once (counted in
    /// [`Hub::dropped`]; the response ends without events, its connection closed), on both
    /// backends.
    pub fn send(&mut self, event: &Event) {
        // Unframed: the subscriber frames it as it writes it (under the reactor), or hyper does
        // (under the tokio backend), as for hub events.
        self.backlog.push(Bytes::from(event.encode()));
    }

    /// Whether the replay fits the queue limit: queued whole while what is queued before
    /// each event is below the mark, as a subscriber's events are later.
    fn replay_fits(&self) -> bool {
        let max = self.hub.inner.cfg.max_queue;
        let mut queued = 0usize;
        for b in &self.backlog {
            if over_mark(queued, max) {
                return false;
            }
            queued = queued.saturating_add(b.len());
        }
        true
    }

    /// The `200 text/event-stream` response; the subscriber joins the hub when it is sent.
    pub fn response(mut self) -> Response<SseBody> {
        let mut takeover = None;
        let refused = !self.replay_fits();
        if refused {
            // Too much to replay: dropped as a slow subscriber is, before it joins.
            tracing::debug!(
                id = self.id,
                "SSE replay over max_queue; dropping the subscriber"
            );
            self.hub.inner.dropped.fetch_add(1, Ordering::Relaxed);
        } else if let Some(key) = current::key() {
            // Within its connection's drive, the connection takes the subscriber over once
            // hyper has written the head.
            let subscriber = Subscriber {
                hub: self.hub.clone(),
                id: self.id,
                chunked: self.chunked,
                backlog: std::mem::take(&mut self.backlog).into_boxed_slice(),
            };
            let t = Takeover::after_head(Box::new(subscriber));
            if current::set_takeover(key, t).is_ok() {
                takeover = Some(key);
            }
        }
        let body = match takeover {
            _ if refused => SseInner::Refused,
            Some(key) => SseInner::Takeover { key },
            None => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let queued = Arc::new(AtomicUsize::new(0));
                for b in self.backlog {
                    queued.fetch_add(b.len(), Ordering::Relaxed);
                    let _ = tx.send(b);
                }
                self.hub.subs().insert(
                    self.id,
                    Sink::Channel(Arc::new(ChannelSink {
                        tx,
                        queued: queued.clone(),
                        // hyper frames the body itself.
                        chunked: false,
                        cut: context::cut_signal(),
                    })),
                );
                let keep_alive = self.hub.inner.cfg.keep_alive_period().map(|period| {
                    tokio::time::interval_at(
                        crate::rt::timer::deadline(std::time::Instant::now(), period).into(),
                        period,
                    )
                });
                SseInner::Channel {
                    rx,
                    queued,
                    keep_alive,
                    shutdown: Box::pin(context::shutdown_signal(context::thread_shutdown())),
                    _leave: Leave {
                        hub: self.hub,
                        id: self.id,
                        _open: context::open_counts().map(|o| {
                            let open = OpenGuard::new(o, OpenKind::Sse);
                            // Its HTTP/1.1 connection's last response: counted as SSE only.
                            match self.http1 {
                                true => open.instead_of_http(),
                                false => open,
                            }
                        }),
                    },
                }
            }
        };
        let mut res = Response::new(SseBody { inner: body });
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // A subscription is the connection's last response.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        res
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Subscription {
    fn into_response(self) -> axum::response::Response {
        self.response().map(axum::body::Body::new)
    }
}

/// Removes a channel subscriber when its body is dropped (the client went away).
struct Leave {
    hub: Hub,
    id: u64,
    /// Counts the subscriber open (`Stats::sse_connections`, the drain log).
    _open: Option<OpenGuard>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

/// The body of an SSE response.
pub struct SseBody {
    inner: SseInner,
}

enum SseInner {
    /// Never polled to the end: the driver takes the connection over once the head is out.
    Takeover { key: Key },
    /// The subscriber was dropped before it joined (its replay was over `max_queue`): the
    /// body fails at once, and the connection closes.
    Refused,
    /// Events from the hub, as a streaming body (tokio backend).
    Channel {
        rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
        queued: Arc<AtomicUsize>,
        keep_alive: Option<tokio::time::Interval>,
        /// Ends the stream when the server shuts down gracefully.
        shutdown: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        _leave: Leave,
    },
}

impl std::fmt::Debug for SseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SseBody")
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.inner {
            SseInner::Takeover { key } => {
                // hyper has written the head: the driver may take the connection now.
                current::with(*key, |c| {
                    if let Some(t) = &mut c.takeover {
                        t.head_written();
                    }
                });
                Poll::Pending
            }
            SseInner::Refused => Poll::Ready(Some(Err(io::Error::other(
                "SSE replay over max_queue; subscriber dropped",
            )))),
            SseInner::Channel {
                rx,
                queued,
                keep_alive,
                shutdown,
                ..
            } => {
                if shutdown.as_mut().poll(cx).is_ready() {
                    // The server is draining: end the stream (the last chunk is written).
                    return Poll::Ready(None);
                }
                if let Poll::Ready(msg) = rx.poll_recv(cx) {
                    return Poll::Ready(msg.map(|b| {
                        if b.is_empty() {
                            return Err(io::Error::other("SSE subscriber too slow; dropped"));
                        }
                        queued.fetch_sub(b.len(), Ordering::Relaxed);
                        Ok(Frame::data(b))
                    }));
                }
                if keep_alive
                    .as_mut()
                    .is_some_and(|k| k.poll_tick(cx).is_ready())
                {
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b":\n\n")))));
                }
                Poll::Pending
            }
        }
    }
}
