//! What a backend does with an accepted connection: serve HTTP with a per-connection service,
//! or hand it to a read handler. `serve` builds an [`HttpApp`], `tcp::serve` a [`TcpApp`];
//! both backends accept through the [`App`] trait.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use tower_service::Service;

use crate::handler::{Handler, Protocol, User};

use super::make::{ConnService, IncomingStream, IntoConnService};

/// What an accepted connection becomes.
pub enum NewConn<S> {
    /// An HTTP connection with its service.
    Http(S),
    /// A read-handler connection.
    Tcp(Box<dyn Protocol>),
}

/// An application a backend serves (implemented by hop's own types only).
pub trait App: Clone + Send + 'static {
    /// The per-connection HTTP service (uninhabited for raw TCP).
    type Svc: ConnService;

    /// Decides what a new connection becomes; `None` closes it.
    fn accept(&mut self, stream: IncomingStream<'_>) -> Option<NewConn<Self::Svc>>;
}

/// An HTTP application: what [`serve`](crate::serve) runs, `app` with the marker `M` that says
/// what kind of service it is ([`marker`](crate::marker)). It is only named to store what
/// `serve` returns:
///
/// ```
/// use hop::{marker::RequestService, HttpApp, Serve};
///
/// struct Running {
///     serve: Serve<HttpApp<axum::Router, RequestService>>,
/// }
///
/// # async fn run() -> std::io::Result<()> {
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// let running = Running { serve: hop::serve(listener, axum::Router::new()) };
/// let handle = running.serve.handle();
/// handle.shutdown();
/// running.serve.await
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(run()).unwrap();
/// ```
pub struct HttpApp<A, M> {
    app: A,
    _marker: PhantomData<fn() -> M>,
}

impl<A, M> HttpApp<A, M> {
    pub(crate) fn new(app: A) -> Self {
        HttpApp {
            app,
            _marker: PhantomData,
        }
    }
}

impl<A: Clone, M> Clone for HttpApp<A, M> {
    fn clone(&self) -> Self {
        HttpApp::new(self.app.clone())
    }
}

impl<A: IntoConnService<M>, M: 'static> App for HttpApp<A, M> {
    type Svc = A::Service;

    fn accept(&mut self, stream: IncomingStream<'_>) -> Option<NewConn<A::Service>> {
        self.app.make(stream).map(NewConn::Http)
    }
}

/// A raw TCP application: what [`tcp::serve`](crate::tcp::serve) runs (named, like
/// [`HttpApp`], only to store what it returns).
#[derive(Clone)]
pub struct TcpApp<F> {
    factory: F,
}

impl<F> TcpApp<F> {
    pub(crate) fn new(factory: F) -> Self {
        TcpApp { factory }
    }
}

impl<F, H> App for TcpApp<F>
where
    F: FnMut(IncomingStream<'_>) -> H + Clone + Send + 'static,
    H: Handler,
{
    type Svc = NoHttp;

    fn accept(&mut self, stream: IncomingStream<'_>) -> Option<NewConn<NoHttp>> {
        Some(NewConn::Tcp(Box::new(User((self.factory)(stream)))))
    }
}

/// The HTTP service of a raw TCP server: it cannot exist.
#[derive(Debug, Clone)]
pub enum NoHttp {}

impl Service<Request<Incoming>> for NoHttp {
    type Response = Response<http_body_util::Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match *self {}
    }

    fn call(&mut self, _req: Request<Incoming>) -> Self::Future {
        match *self {}
    }
}
