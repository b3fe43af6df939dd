//! The service hyper's `http1` connection calls ([`Counted`]): the user's, counting each
//! request dispatched on the connection's [`Current`](current::Current) until hyper drops its
//! response body ([`Tracked`]), which is how the driver tells that the connection is idle at a
//! request boundary (see the room's docs); its future ([`TrackedFuture`]) catches the handler's
//! panics and marks a response a limit closes the connection with.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;

use super::super::current;
use crate::limits::Limit;
use crate::rt::wake::Key;
use crate::service::{ConnService, HyperSvc};

type Body<S> = crate::service::HopBody<<S as ConnService>::ResBody>;

/// The service hyper calls: the user's ([`HyperSvc::start`]), counting each request on the
/// connection's [`Current`](current::Current) until hyper drops its response body; its future
/// ([`TrackedFuture`]) catches the handler's panics.
#[derive(Clone)]
pub(crate) struct Counted<S>(pub(super) HyperSvc<S>);

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
                inner: crate::service::Call::refused(
                    "a request dispatched while another was in flight".into(),
                ),
                key,
                body: body_pending,
                close,
            };
        }
        // Built in place: the handler's future is large (it holds the request until polled).
        TrackedFuture {
            inner: self.0.start(req),
            key,
            body: body_pending,
            close,
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future; its response body is [`Tracked`]. A request refused is a
    /// [`Call`](crate::service::Call) that fails (an error, which closes the connection).
    pub(crate) struct TrackedFuture<F> {
        #[pin]
        inner: F,
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
        let inner = this.inner;
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
