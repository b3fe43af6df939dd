//! The tokio backend's HTTP/1.1 connection as hyper sees it: its stream ([`BodyIo`]) and its
//! service ([`Clocked`], over [`HyperSvc`]), which record on one [`BodyClock`] what the
//! request-body timeout needs, and the connection's request limits ([`ConnLimits`]:
//! `max_connection_age`, `max_requests_per_connection`), told with `Connection: close`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower_service::Service;

use super::body::{BoxError, HopBody};
use super::call::{Call, CatchPanic, HyperSvc};
use super::wire::{ends_chunked, head_at_least, read_tail, TIMEOUT_408};

/// The tokio backend's HTTP/1.1 request-body timeout, one per connection: what its stream
/// ([`BodyIo`]) reads and what its service ([`Clocked`]) dispatches, for the backend's watch
/// (`baseline`) to tell a stalled request body, as the reactor's driver does from its own
/// state (`conn::http`).
#[derive(Default)]
pub(crate) struct BodyClock {
    state: std::sync::Mutex<ClockState>,
}

#[derive(Default)]
struct ClockState {
    /// Bytes read, the last read's size, and whether it ended a chunked body.
    read: u64,
    last_read: u64,
    /// The last 8 bytes read ([`read_tail`]).
    tail: u64,
    /// hyper's last read found nothing (it waits for bytes).
    waiting: bool,
    /// A request with a body is in flight (until hyper drops its response body), and what is
    /// known of it (see `conn::http`'s `body_stall`).
    body: bool,
    body_done: bool,
    responded: bool,
    body_len: Option<u64>,
    head_len: u64,
    body_from: u64,
    /// The last time the body moved (or the request came).
    progress: Option<std::time::Instant>,
    /// The timeout ran out: the next read answers `408` (or just fails).
    fired: bool,
    reader: Option<std::task::Waker>,
    watch: Option<std::task::Waker>,
}

impl BodyClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes when a request body is being waited for: when it falls due, with `limit`
    /// counted from its last progress (`None`: never).
    pub(crate) async fn next_due(&self, limit: std::time::Duration) -> Option<std::time::Instant> {
        std::future::poll_fn(|cx| {
            let mut s = self.lock();
            match s.progress {
                Some(p) if s.body && !s.body_done && !s.fired => Poll::Ready(p.checked_add(limit)),
                _ => {
                    s.watch = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Checks the request body at `now`, once it fell due: a stalled one makes the stream's
    /// next read answer `408` (or fail, once the response has started).
    /// The timeout fired on this connection.
    pub(crate) fn fired(&self) -> bool {
        self.lock().fired
    }

    pub(crate) fn check(&self, now: std::time::Instant, limit: std::time::Duration) {
        let mut s = self.lock();
        if !s.body || s.body_done || s.fired {
            return;
        }
        let done = ends_chunked(s.tail)
            || s.body_len.is_some_and(|len| {
                s.read.saturating_sub(s.body_from) >= s.head_len.saturating_add(len)
            });
        if done {
            s.body_done = true;
        } else if !s.waiting {
            // hyper is not asking for bytes: the handler is not reading the body.
            s.progress = Some(now);
        } else if s
            .progress
            .and_then(|p| p.checked_add(limit))
            .is_some_and(|due| due <= now)
        {
            s.fired = true;
            if let Some(w) = s.reader.take() {
                w.wake();
            }
        }
    }
}

/// The tokio backend's HTTP/1.1 stream: the connection's IO, recording for its [`BodyClock`].
pub(crate) struct BodyIo<T> {
    io: T,
    clock: std::sync::Arc<BodyClock>,
    /// The connection's place in the server's counts: it goes with the stream, into an
    /// upgrade too.
    place: std::sync::Arc<crate::settings::Place>,
    /// Counts the bytes, unless a layer below does (TLS: `observe::CountIo` under it).
    tally: Option<crate::observe::ByteTally>,
}

impl<T> BodyIo<T> {
    /// `count`: the bytes are counted here (the stream is the socket itself).
    pub(crate) fn new(
        io: T,
        clock: std::sync::Arc<BodyClock>,
        place: std::sync::Arc<crate::settings::Place>,
        count: bool,
    ) -> Self {
        BodyIo {
            io,
            clock,
            place,
            tally: count.then(Default::default),
        }
    }

    /// The connection's IO and its place in the server's counts.
    pub(crate) fn into_parts(self) -> (T, std::sync::Arc<crate::settings::Place>) {
        (self.io, self.place)
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead for BodyIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let fired = {
            let mut s = this.clock.lock();
            if s.fired {
                Some(!std::mem::replace(&mut s.responded, true))
            } else {
                None
            }
        };
        if let Some(answer) = fired {
            if answer {
                tracing::debug!("request body stalled; answering 408 and closing");
                let _ = Pin::new(&mut this.io).poll_write(cx, TIMEOUT_408);
                let _ = Pin::new(&mut this.io).poll_flush(cx);
            }
            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let mut s = this.clock.lock();
        match &polled {
            Poll::Pending => {
                s.waiting = true;
                if s.body {
                    s.reader = Some(cx.waker().clone());
                }
            }
            Poll::Ready(Ok(())) => {
                s.waiting = false;
                let read = &buf.filled()[before..];
                if let Some(t) = &this.tally {
                    t.read(read.len());
                }
                if !read.is_empty() {
                    s.read += read.len() as u64;
                    s.last_read = read.len() as u64;
                    s.tail = read_tail(s.tail, read);
                    if s.body {
                        s.progress = Some(std::time::Instant::now());
                    }
                }
            }
            Poll::Ready(Err(_)) => {}
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for BodyIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(t)) = (&r, &this.tally) {
            t.wrote(*n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let (Poll::Ready(Ok(n)), Some(t)) = (&r, &this.tally) {
            t.wrote(*n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The tokio backend's HTTP/1.1 service: [`HyperSvc`], recording each request that comes with
/// a body on the connection's [`BodyClock`] until hyper drops its response body.
#[derive(Clone)]
pub(crate) struct Clocked<S> {
    inner: HyperSvc<S>,
    clock: std::sync::Arc<BodyClock>,
    /// Counts requests (`Stats::http1_requests`), and the limits (`close` told).
    ctl: std::sync::Arc<crate::settings::Control>,
    /// The connection's request limits, if any is set.
    limits: Option<std::sync::Arc<ConnLimits>>,
}

impl<S> Clocked<S> {
    pub(crate) fn new(
        inner: HyperSvc<S>,
        clock: std::sync::Arc<BodyClock>,
        ctl: std::sync::Arc<crate::settings::Control>,
        limits: Option<std::sync::Arc<ConnLimits>>,
    ) -> Self {
        Clocked {
            inner,
            clock,
            ctl,
            limits,
        }
    }
}

/// The tokio backend's view of one HTTP/1.1 connection's limits (`max_connection_age`,
/// `max_requests_per_connection`): its requests so far, shared by its service ([`Clocked`])
/// and the backend's watch for an idle connection past its age.
pub(crate) struct ConnLimits {
    /// The age deadline, if `max_connection_age` is set.
    pub(crate) age: Option<std::time::Instant>,
    max_requests: u64,
    pub(crate) requests: std::sync::atomic::AtomicU64,
    /// A response went out with `Connection: close` for a limit (counted once).
    pub(crate) told: std::sync::atomic::AtomicBool,
    /// Which limit, once told (the reason the connection closes).
    pub(crate) told_for: std::sync::OnceLock<crate::limits::Limit>,
}

impl ConnLimits {
    pub(crate) fn new(age: Option<std::time::Instant>, max_requests: u64) -> Self {
        ConnLimits {
            age,
            max_requests,
            requests: Default::default(),
            told: Default::default(),
            told_for: Default::default(),
        }
    }

    /// Counts a request; the limit it reaches, if its response must close the connection.
    fn next(&self) -> Option<crate::limits::Limit> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.requests.fetch_add(1, Relaxed).saturating_add(1);
        if n >= self.max_requests {
            Some(crate::limits::Limit::Requests)
        } else if self.age.is_some_and(|at| std::time::Instant::now() >= at) {
            Some(crate::limits::Limit::Age)
        } else {
            None
        }
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Clocked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<ClockedBody<HopBody<B>>>;
    type Error = BoxError;
    type Future = ClockedFuture<CatchPanic<Call<S, Request<Incoming>>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.ctl.http1_requests(1);
        let close = self
            .limits
            .as_ref()
            .and_then(|l| Some((l.next()?, l.clone(), self.ctl.clone())));
        let clock = (!Body::is_end_stream(req.body())).then(|| {
            let mut s = self.clock.lock();
            s.body = true;
            s.body_done = false;
            s.responded = false;
            s.body_len = Body::size_hint(req.body()).exact();
            s.head_len = head_at_least(&req);
            // What was read with the head may be body already.
            s.body_from = s.read - s.last_read;
            s.progress = Some(std::time::Instant::now());
            if let Some(w) = s.watch.take() {
                w.wake();
            }
            self.clock.clone()
        });
        ClockedFuture {
            inner: hyper::service::Service::call(&self.inner, req),
            clock,
            close,
        }
    }
}

pin_project_lite::pin_project! {
    /// A [`Clocked`] request's handler future.
    pub(crate) struct ClockedFuture<F> {
        #[pin]
        inner: F,
        clock: Option<std::sync::Arc<BodyClock>>,
        // A limit asks for `Connection: close` on this response.
        close: Option<(crate::limits::Limit, std::sync::Arc<ConnLimits>, std::sync::Arc<crate::settings::Control>)>,
    }
}

impl<F, B> Future for ClockedFuture<F>
where
    F: Future<Output = Result<Response<B>, BoxError>>,
{
    type Output = Result<Response<ClockedBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = std::task::ready!(this.inner.poll(cx));
        if let (Some((why, limits, ctl)), Ok(res)) = (this.close.take(), &mut res) {
            if crate::limits::close_response(res)
                && !limits.told.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                let _ = limits.told_for.set(why);
                ctl.limit_reached(why);
            }
        }
        let clock = this.clock.take();
        if let Some(c) = &clock {
            c.lock().responded = true;
        }
        Poll::Ready(res.map(|r| r.map(|body| ClockedBody { body, clock })))
    }
}

pin_project_lite::pin_project! {
    /// A [`Clocked`] response body: its request is done when hyper drops it.
    pub(crate) struct ClockedBody<B> {
        #[pin]
        body: B,
        clock: Option<std::sync::Arc<BodyClock>>,
    }

    impl<B> PinnedDrop for ClockedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(c) = &this.clock {
                c.lock().body = false;
            }
        }
    }
}

impl<B: Body> Body for ClockedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
