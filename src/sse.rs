//! Server-Sent Events: a [`Hub`] of subscribers that live on their poller with no task and no
//! buffer while idle.
//!
//! [`Hub::subscribe`] answers `200 text/event-stream`. Under the reactor, once hyper has written
//! that head the driver takes the socket back from hyper (as a hijack does) and the subscriber
//! becomes a read-handler connection: events are written straight into its bounded outbound
//! buffer, keep-alive comments come from the poller's timer. Under the tokio backend a
//! subscriber is an ordinary streaming body fed by a channel (a task per connection there).
//!
//! A subscriber whose queue is full (a slow reader) is dropped and counted
//! ([`Hub::dropped`]), and so is one whose replay ([`Subscription::send`]) alone fills it; one
//! that disconnects is removed at once, however its connection ends. Under the reactor an
//! event is a letter in the subscriber's poller's mailbox (`handler::mail`): an idle
//! subscriber keeps nothing for it, and one send wakes each poller once. The hub names a
//! reactor subscriber by its connection's process-wide id as well as its slot, so an event
//! for a subscriber that is gone never reaches a connection that reuses the slot.
//! [`Hub::send`] copies the subscriber table and fans out without holding it: subscribers
//! join and leave (on their pollers) while a large fan-out runs; sends are taken one at a
//! time, so every subscriber sees events in the order they were sent.
//!
//! ```
//! use axum::{extract::{Request, State}, response::IntoResponse, routing::{get, post}, Router};
//! use hop::sse::{Event, Hub};
//!
//! let hub = Hub::new();
//! # let subscribers = hub.clone();
//! let app: Router = Router::new()
//!     .route("/sse", get(|State(hub): State<Hub>, req: Request| async move {
//!         hub.subscribe(&req).into_response()
//!     }))
//!     .route("/sse/broadcast", post(|State(hub): State<Hub>, body: String| async move {
//!         hub.send(&Event::new(body));
//!     }))
//!     .with_state(hub);
//! # let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! # let addr = listener.local_addr()?;
//! # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # let client = std::thread::spawn(move || {
//! #     let _stop = stop; // the server stops when this thread ends, a panic included
//! #     use std::io::{Read, Write};
//! #     let connect = || {
//! #         let s = std::net::TcpStream::connect(addr).unwrap();
//! #         s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
//! #         s
//! #     };
//! #     let mut events = connect();
//! #     events.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
//! #     // Broadcast once the subscriber has joined the hub.
//! #     for _ in 0..6000 {
//! #         if !subscribers.is_empty() {
//! #             break;
//! #         }
//! #         std::thread::sleep(std::time::Duration::from_millis(10));
//! #     }
//! #     let mut post = connect();
//! #     let request = "POST /sse/broadcast HTTP/1.1\r\nhost: x\r\nconnection: close\r\n";
//! #     write!(post, "{request}content-length: 5\r\n\r\nhello").unwrap();
//! #     let mut posted = String::new();
//! #     post.read_to_string(&mut posted).unwrap();
//! #     let mut stream = String::new();
//! #     while !stream.contains("data: hello\n\n") {
//! #         let mut buf = [0; 1024];
//! #         let n = events.read(&mut buf).unwrap();
//! #         assert!(n > 0, "the stream ended: {stream}");
//! #         stream.push_str(std::str::from_utf8(&buf[..n]).unwrap());
//! #     }
//! #     (posted, stream)
//! # });
//! # hop::serve(listener, app).with_graceful_shutdown(async { let _ = stopped.await; }).run()?;
//! # let (posted, stream) = client.join().unwrap();
//! # assert!(posted.starts_with("HTTP/1.1 200"), "{posted}");
//! # assert!(stream.starts_with("HTTP/1.1 200"), "{stream}");
//! # assert!(stream.contains("content-type: text/event-stream"), "{stream}");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Request, Response, Version};
use http_body::{Body, Frame};

use crate::conn::current;
use crate::conn::takeover::Takeover;
use crate::handler::context as server;
use crate::handler::{mail, over_mark, CloseReason, Conn, Handler, Protocol, WriteError};
use crate::limits::{OpenGuard, OpenKind};
use crate::rt::mail::Letter;
use crate::rt::wake::{self, Key, Refused, Target};

/// One event.
#[derive(Debug, Clone, Default)]
pub struct Event {
    id: Option<String>,
    event: Option<String>,
    data: String,
    retry: Option<Duration>,
}

impl Event {
    /// An event carrying `data`.
    ///
    /// `data` is split into lines the way an `EventSource` splits the stream (at CRLF, at a
    /// lone CR and at a lone LF), and each line is sent as its own `data:` field, so the client
    /// sees the lines joined by `\n`: `"a\r\nb\rc"` arrives as `"a\nb\nc"`. No line break in
    /// `data` can start another field or end the event early.
    pub fn new(data: impl Into<String>) -> Self {
        Event {
            data: data.into(),
            ..Event::default()
        }
    }

    /// Sets the event id (what a reconnecting client sends back as `Last-Event-ID`).
    ///
    /// # Panics
    ///
    /// Panics if `id` contains a line break (CR or LF) or a NUL character, as
    /// `axum::response::sse::Event::id` does: the line break would end the field (what follows
    /// would be read as further fields), and a client ignores an id containing NUL.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        let id = id.into();
        assert!(
            !id.contains(['\r', '\n', '\0']),
            "an SSE event id cannot contain CR, LF or NUL: {id:?}"
        );
        self.id = Some(id);
        self
    }

    /// Sets the event type.
    ///
    /// # Panics
    ///
    /// Panics if `name` contains a line break (CR or LF), as `axum::response::sse::Event::event`
    /// does: the line break would end the field and what follows would be read as further
    /// fields.
    pub fn event(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        assert!(
            !name.contains(['\r', '\n']),
            "an SSE event type cannot contain CR or LF: {name:?}"
        );
        self.event = Some(name);
        self
    }

    /// Sets the client's reconnection delay.
    pub fn retry(mut self, after: Duration) -> Self {
        self.retry = Some(after);
        self
    }

    fn encode(&self) -> String {
        let mut s = String::with_capacity(self.data.len() + 32);
        if let Some(id) = &self.id {
            let _ = writeln!(s, "id: {id}");
        }
        if let Some(e) = &self.event {
            let _ = writeln!(s, "event: {e}");
        }
        if let Some(r) = self.retry {
            let _ = writeln!(s, "retry: {}", r.as_millis());
        }
        // Lines end at CRLF, CR or LF, as the client reads them.
        let mut rest = self.data.as_str();
        loop {
            let end = rest.find(['\r', '\n']);
            let _ = writeln!(s, "data: {}", &rest[..end.unwrap_or(rest.len())]);
            let Some(end) = end else { break };
            rest = rest[end..].strip_prefix("\r\n").unwrap_or(&rest[end + 1..]);
        }
        s.push('\n');
        s
    }
}

/// Frames `payload` as an HTTP/1.1 chunk (or not at all for HTTP/1.0, close-delimited).
fn frame(payload: &[u8], chunked: bool) -> Bytes {
    if !chunked {
        return Bytes::copy_from_slice(payload);
    }
    let mut b = BytesMut::with_capacity(payload.len() + 12);
    let _ = std::fmt::Write::write_fmt(&mut Hex(&mut b), format_args!("{:x}\r\n", payload.len()));
    b.extend_from_slice(payload);
    b.extend_from_slice(b"\r\n");
    b.freeze()
}

struct Hex<'a>(&'a mut BytesMut);

impl std::fmt::Write for Hex<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// An event encoded once, framed as a chunk at most once: each subscriber gets a cheap clone.
struct Framed {
    plain: Bytes,
    chunked: std::cell::OnceCell<Bytes>,
}

impl Framed {
    fn new(event: &Event) -> Self {
        Framed {
            plain: Bytes::from(event.encode()),
            chunked: std::cell::OnceCell::new(),
        }
    }

    fn get(&self, chunked: bool) -> Bytes {
        if chunked {
            self.chunked
                .get_or_init(|| frame(&self.plain, true))
                .clone()
        } else {
            self.plain.clone()
        }
    }
}

/// Settings of a hub.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// How often an idle subscriber gets a keep-alive comment (default 15 s). `Duration::ZERO`
    /// sends none; a period of a century or more is the same as never.
    pub keep_alive: Duration,
    /// The high-water mark of bytes queued for one subscriber, counted both on their way to
    /// its poller and in its outbound queue there: an event for a subscriber at or above it
    /// drops that subscriber, whose connection is closed (default 256 KiB).
    pub max_queue: usize,
}

impl HubConfig {
    /// The keep-alive period to arm, if any: none for zero (which would otherwise send comments
    /// in a loop), and at most [`crate::rt::timer::cap`]'s far future.
    fn keep_alive_period(&self) -> Option<Duration> {
        (!self.keep_alive.is_zero()).then(|| crate::rt::timer::cap(self.keep_alive))
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            keep_alive: Duration::from_secs(15),
            max_queue: 256 * 1024,
        }
    }
}

#[derive(Clone)]
enum Sink {
    /// A subscriber on a poller: events are handed to its connection there (named by its
    /// process-wide id too, not only its slot).
    Loop { to: Target, chunked: bool },
    /// A subscriber served as a streaming body (tokio backend; behind a pointer, so that the
    /// hub's entries for the reactor's subscribers stay small, and a send's copy is cheap).
    Channel(Arc<ChannelSink>),
}

struct ChannelSink {
    tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    chunked: bool,
    /// Cuts the subscriber's connection (when it is dropped as slow).
    cut: Option<Arc<tokio::sync::Notify>>,
}

struct HubInner {
    cfg: HubConfig,
    /// The subscribers: held only to look up, add, remove or copy them, never during a send.
    subs: Mutex<HashMap<u64, Sink>>,
    /// Taken by each send for its whole fan-out, so sends go out one after another (every
    /// subscriber sees them in one order); holds the copy of the table a send works from,
    /// kept between sends so that a send does not allocate it.
    fanout: Mutex<Vec<(u64, Sink)>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

/// A set of SSE subscribers: `Clone + Send`, cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("subscribers", &self.len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// The outcome of offering bytes to one subscriber.
enum Offer {
    Queued,
    Gone,
    Slow,
}

impl Hub {
    /// A hub with the default settings.
    pub fn new() -> Self {
        Hub::with_config(HubConfig::default())
    }

    /// A hub with the given settings.
    pub fn with_config(cfg: HubConfig) -> Self {
        Hub {
            inner: Arc::new(HubInner {
                cfg,
                subs: Mutex::new(HashMap::new()),
                fanout: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    fn subs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Sink>> {
        self.inner.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribers connected now.
    pub fn len(&self) -> usize {
        self.subs().len()
    }

    /// Whether there are no subscribers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribers dropped because they did not keep up.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

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

    fn offer(sink: &Sink, event: &Framed, max: usize) -> Offer {
        match sink {
            // The subscriber's limit holds where its events are queued: bytes on their way to a
            // busy or stalled poller count against it, as its outbound queue does there.
            Sink::Loop { to, chunked } => {
                let fits = |waiting| match over_mark(waiting, max) {
                    true => Err(()),
                    false => Ok(()),
                };
                match wake::post(*to, Letter::Deliver(event.get(*chunked)), fits) {
                    Ok(()) => Offer::Queued,
                    Err(Refused::Gone) => Offer::Gone,
                    Err(Refused::By(())) => {
                        // Tell the connection to close: nothing more is sent.
                        let _ = wake::post(*to, Letter::Close, |_| Ok::<_, ()>(()));
                        Offer::Slow
                    }
                }
            }
            Sink::Channel(sink) => {
                let ChannelSink {
                    tx,
                    queued,
                    chunked,
                    cut,
                } = &**sink;
                if over_mark(queued.load(Ordering::Relaxed), max) {
                    // An empty chunk tells the body to fail, and the connection task is told to
                    // drop the connection: hyper alone would wait for a peer that is not reading
                    // before it polls the body again.
                    let _ = tx.send(Bytes::new());
                    if let Some(cut) = cut {
                        cut.notify_one();
                    }
                    return Offer::Slow;
                }
                let bytes = event.get(*chunked);
                queued.fetch_add(bytes.len(), Ordering::Relaxed);
                match tx.send(bytes) {
                    Ok(()) => Offer::Queued,
                    Err(_) => Offer::Gone,
                }
            }
        }
    }

    /// Whether subscriber `id` stays after `offer`; counts a slow one (the caller removes
    /// those that do not stay).
    fn stays(&self, id: u64, offer: Offer) -> bool {
        match offer {
            Offer::Queued => true,
            Offer::Gone => false,
            Offer::Slow => {
                tracing::debug!(id, "dropping a slow SSE subscriber");
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn fanout(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Sink)>> {
        self.inner.fanout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `event` to every subscriber; returns how many it was queued for.
    ///
    /// The subscriber table is copied and the fan-out runs without it: subscribers join and
    /// leave meanwhile (one that joins gets the next event; one that leaves is skipped, or its
    /// event is dropped where it would have been written). Sends from several threads go out
    /// one after another, so each subscriber gets events in the order the sends began.
    pub fn send(&self, event: &Event) -> usize {
        let event = Framed::new(event);
        let max = self.inner.cfg.max_queue;
        let mut snapshot = self.fanout();
        snapshot.extend(self.subs().iter().map(|(id, sink)| (*id, sink.clone())));
        let mut n = 0;
        let mut gone = Vec::new();
        for (id, sink) in snapshot.iter() {
            match self.stays(*id, Self::offer(sink, &event, max)) {
                true => n += 1,
                false => gone.push(*id),
            }
        }
        // Kept for the next send, emptied (no subscriber is held by it); a burst's room is
        // given back.
        snapshot.clear();
        if snapshot.capacity() > 1024 && snapshot.capacity() > 4 * self.len() {
            *snapshot = Vec::new();
        }
        drop(snapshot);
        if !gone.is_empty() {
            let mut subs = self.subs();
            for id in gone {
                subs.remove(&id);
            }
        }
        n
    }

    /// Sends `event` to subscriber `id`; `false` if it is gone or was dropped.
    pub fn send_to(&self, id: u64, event: &Event) -> bool {
        let event = Framed::new(event);
        // In order with `send`s.
        let _fanout = self.fanout();
        let Some(sink) = self.subs().get(&id).cloned() else {
            return false;
        };
        let stays = self.stays(id, Self::offer(&sink, &event, self.inner.cfg.max_queue));
        if !stays {
            self.remove(id);
        }
        stays
    }

    fn remove(&self, id: u64) {
        // Dropped out of the lock (a channel subscriber's sender).
        let sink = self.subs().remove(&id);
        drop(sink);
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
                        cut: server::cut_signal(),
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
                    shutdown: Box::pin(server::shutdown_signal(server::thread_shutdown())),
                    _leave: Leave {
                        hub: self.hub,
                        id: self.id,
                        _open: server::open_counts().map(|o| {
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

/// An SSE subscriber on a poller.
struct Subscriber {
    hub: Hub,
    id: u64,
    chunked: bool,
    /// Events queued before the takeover (a boxed slice: no room kept once sent).
    backlog: Box<[Bytes]>,
}

impl Handler for Subscriber {
    fn on_open(&mut self, conn: &mut Conn) -> io::Result<()> {
        conn.set_max_write_buffer(self.hub.inner.cfg.max_queue);
        conn.set_idle_timeout(None);
        conn.set_timer(self.hub.inner.cfg.keep_alive_period());
        // Checked against the limit already (`Subscription::response`): queued whole.
        for b in std::mem::take(&mut self.backlog).iter() {
            conn.queue_parts(&[&frame(b, self.chunked)])?;
        }
        // Called on the subscriber's poller, inside its drive: the connection driven is its
        // own.
        let Some(to) = mail::target() else {
            return Err(io::Error::other(
                "an SSE subscriber must open on its poller",
            ));
        };
        self.hub.subs().insert(
            self.id,
            Sink::Loop {
                to,
                chunked: self.chunked,
            },
        );
        Ok(())
    }

    fn on_read(&mut self, _conn: &mut Conn, input: &mut BytesMut) -> io::Result<()> {
        // Subscribers have nothing to say: bytes are a request pipelined behind the
        // subscription, which this endless response would never let be served. Fail closed
        // (as the takeover does for one already read): close, rather than drop it.
        if input.is_empty() {
            return Ok(());
        }
        crate::logs::warn_limited!(bytes = input.len(), "an SSE subscriber sent bytes; closing");
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "an SSE subscriber sent bytes",
        ))
    }

    fn on_timer(&mut self, conn: &mut Conn) -> io::Result<()> {
        if conn.queued() == 0 {
            conn.write(&frame(b":\n\n", self.chunked))?;
        }
        conn.set_timer(self.hub.inner.cfg.keep_alive_period());
        Ok(())
    }

    fn on_shutdown(&mut self, conn: &mut Conn) {
        // End the stream properly: the last chunk, then close.
        self.hub.remove(self.id);
        if self.chunked {
            let _ = conn.write(b"0\r\n\r\n");
        }
        conn.close();
    }

    fn on_close(&mut self, _reason: CloseReason) {
        self.hub.remove(self.id);
    }
}

/// The hub's events arrive as deliveries (`Hub::offer`), a slow subscriber's close as a
/// `Letter::Close`.
impl Protocol for Subscriber {
    fn on_deliver(&mut self, conn: &mut Conn, bytes: Bytes) {
        match conn.write(&bytes) {
            Ok(()) => {}
            Err(WriteError::Full { .. }) => {
                tracing::debug!(id = self.id, "dropping a slow SSE subscriber");
                self.hub.inner.dropped.fetch_add(1, Ordering::Relaxed);
                self.hub.remove(self.id);
                conn.close();
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// Reads from `s` until `want` has arrived; everything read.
    fn read_until(s: &mut TcpStream, want: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains(want) {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// A delivery whose key is the connection's own but whose id is another's (a subscriber
    /// gone from that slot 65,536 generations ago, or a send's copy of the table that still
    /// holds it) is dropped by the poller: only the connection's own id reaches it.
    #[test]
    fn a_stale_target_with_the_same_key_is_not_delivered() {
        let hub = Hub::new();
        let h = hub.clone();
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let res = h.subscribe(&req).response();
            async move { Ok::<_, std::convert::Infallible>(res) }
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = crate::Server::builder()
            .backend(crate::Backend::Reactor)
            .pollers(1)
            .serve(listener, svc);
        let handle = serve.handle();
        let server = std::thread::spawn(move || serve.run());

        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        read_until(&mut c, "\r\n\r\n");
        let t0 = std::time::Instant::now();
        let to = loop {
            if let Some(Sink::Loop { to, .. }) = hub.subs().values().next() {
                break *to;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no subscriber");
            std::thread::sleep(Duration::from_millis(5));
        };
        let stale = Target {
            key: to.key,
            id: to.id.wrapping_sub(1),
        };
        let event = |data: &str| Framed::new(&Event::new(data)).get(true);
        let post = |to, data| wake::post(to, Letter::Deliver(event(data)), |_| Ok::<_, ()>(()));
        assert_eq!(post(stale, "stale"), Ok(()));
        assert_eq!(post(to, "live"), Ok(()));
        let got = read_until(&mut c, "data: live");
        assert!(!got.contains("stale"), "{got:?}");

        handle.shutdown();
        server.join().unwrap().unwrap();
    }
}
