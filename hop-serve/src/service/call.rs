//! The service hyper calls on both backends ([`HyperSvc`]): the user's tower service called for
//! one request with the connection's extensions put in ([`Call`]: at once when it is ready,
//! else through tower's `Oneshot`), and a panic in it caught ([`CatchPanic`]) and answered
//! `500` with `Connection: close` ([`panicked`]). Every request goes through it, so it stays
//! generic and unboxed (counted in instructions with callgrind).

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

use super::body::{BoxError, HopBody};

/// The hyper service both backends serve: a tower service, with panics caught.
#[derive(Debug, Clone)]
pub(crate) struct HyperSvc<S> {
    inner: S,
    /// Put into every request of a TLS connection.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    tls: Option<crate::tls::TlsInfo>,
    /// Put into every request of a connection that came with a PROXY protocol header.
    proxy: Option<crate::proxy::ProxyHeader>,
}

impl<S> HyperSvc<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            tls: None,
            proxy: None,
        }
    }

    /// Puts `header` (the connection's PROXY protocol header) into every request.
    pub(crate) fn with_proxy(mut self, header: Option<crate::proxy::ProxyHeader>) -> Self {
        self.proxy = header;
        self
    }

    /// Puts `info` (a TLS connection's) into every request.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub(crate) fn with_tls(mut self, info: Option<crate::tls::TlsInfo>) -> Self {
        self.tls = info;
        self
    }

    pub(crate) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for HyperSvc<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<HopBody<B>>;
    type Error = BoxError;
    type Future = CatchPanic<Call<S, Request<Incoming>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        CatchPanic {
            inner: self.start(req),
        }
    }
}

impl<S> HyperSvc<S> {
    /// The user's service called for `req`, with the connection's extensions put in; its
    /// panics are not caught yet (see [`CatchPanic`], or the reactor's own wrapper, which
    /// catches them in the same poll that counts the request).
    pub(crate) fn start(
        &self,
        #[allow(unused_mut)] mut req: Request<Incoming>,
    ) -> Call<S, Request<Incoming>>
    where
        S: Service<Request<Incoming>> + Clone,
        S::Error: Into<BoxError>,
    {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(info) = &self.tls {
            req.extensions_mut().insert(info.clone());
        }
        if let Some(header) = &self.proxy {
            req.extensions_mut().insert(header.clone());
        }
        Call::new(self.inner.clone(), req)
    }
}

pin_project_lite::pin_project! {
    /// The user's service called for one request: at once when it says it is ready (axum's
    /// `Router` always does), else through tower's `Oneshot`, which waits for it. Calling at
    /// once spares moving the request into the future and out again, and `Oneshot`'s state
    /// changes (about 50 instructions a keep-alive request, callgrind). A panic in
    /// `poll_ready`, `call` or the clone's `Drop` is kept and raised again when the future is
    /// polled, so that [`CatchPanic`] answers it as it answers one in the future.
    #[project = CallProj]
    pub(crate) enum Call<S, R>
    where
        S: Service<R>,
    {
        Called { #[pin] fut: S::Future },
        Waiting { #[pin] oneshot: Oneshot<S, R> },
        Failed { err: Option<BoxError> },
        Panicked { payload: Option<Box<dyn Any + Send>> },
    }
}

impl<S: Service<R>, R> Call<S, R>
where
    S::Error: Into<BoxError>,
{
    /// A call that fails with `err` when polled, the service not called.
    pub(crate) fn refused(err: BoxError) -> Self {
        Call::Failed { err: Some(err) }
    }

    fn new(svc: S, req: R) -> Self {
        // The service clone is dropped in here too (a `Drop` may panic).
        let call = move || {
            let mut svc = svc;
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match svc.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => Call::Called { fut: svc.call(req) },
                Poll::Ready(Err(e)) => Call::Failed {
                    err: Some(e.into()),
                },
                // Not ready: `Oneshot` asks again with the task's waker.
                Poll::Pending => Call::Waiting {
                    oneshot: svc.oneshot(req),
                },
            }
        };
        catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|payload| Call::Panicked {
            payload: Some(payload),
        })
    }
}

impl<S: Service<R>, R> Future for Call<S, R>
where
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallProj::Called { fut } => fut.poll(cx).map_err(Into::into),
            CallProj::Waiting { oneshot } => oneshot.poll(cx).map_err(Into::into),
            CallProj::Failed { err } => match err.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            CallProj::Panicked { payload } => match payload.take() {
                Some(payload) => std::panic::resume_unwind(payload),
                None => Poll::Pending,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// A handler's future; a panic in it becomes a `500` that closes the connection.
    pub(crate) struct CatchPanic<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for CatchPanic<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<HopBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(res))) => Poll::Ready(Ok(res.map(|body| HopBody::Inner { body }))),
            Ok(Poll::Ready(Err(e))) => Poll::Ready(Err(e.into())),
            Err(panic) => Poll::Ready(Ok(panicked(&*panic))),
        }
    }
}

/// The answer to a handler's panic (logged here): `500` with `Connection: close`.
pub(crate) fn panicked<B>(panic: &(dyn Any + Send)) -> Response<HopBody<B>> {
    crate::logs::error_limited!(
        panic = crate::logs::panic_message(panic),
        "handler panicked; answering 500 and closing the connection"
    );
    let mut res = Response::new(HopBody::Empty);
    *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    res.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    res
}
