//! What `serve` accepts as an app, what a make-service is told about a new connection
//! ([`IncomingStream`], [`PeerCred`]), and the one service wrapper both backends hand to hyper.
//!
//! [`IntoConnService`] turns whatever the user passes to [`serve`](crate::serve) (an axum
//! `Router`, an `IntoMakeService`, an `IntoMakeServiceWithConnectInfo`, any tower
//! `Service<Request<Incoming>>`, or a hyper `service_fn`) into one per-connection tower
//! service. [`HyperSvc`] adapts that tower service to hyper's `Service` trait, catches a
//! panicking handler (a `500` with `connection: close`, so only that connection ends), and
//! wraps the response body in [`HopBody`], which turns a panic while streaming the body into a
//! body error (hyper then closes the connection).

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

pub(crate) mod app;

/// The error type boxed errors are converted into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connection a make-service is asked to build a service for.
///
/// This is hop's counterpart of `axum::serve::IncomingStream`: axum's
/// `IntoMakeServiceWithConnectInfo<_, SocketAddr>` works with it, so the `ConnectInfo`
/// extractor sees the peer address.
///
/// What it knows depends on the listener:
/// - TCP: [`local_addr`](Self::local_addr) and [`remote_addr`](Self::remote_addr);
/// - a Unix socket: [`unix_peer_addr`](Self::unix_peer_addr) and
///   [`peer_cred`](Self::peer_cred) (what axum's `UdsConnectInfo` example reads from a
///   `UnixStream`); `local_addr` and `remote_addr` are the unspecified address `0.0.0.0:0`;
/// - a generic `axum::serve::Listener`: its `Addr` for this connection, through
///   [`remote`](Self::remote); `remote_addr` and `local_addr` are that address and the
///   listener's when they are `SocketAddr`s, `0.0.0.0:0` otherwise.
///
/// A `Connected` impl for Unix sockets, as axum's `UdsConnectInfo` example has it:
///
/// ```
/// use axum::extract::connect_info::Connected;
///
/// #[derive(Clone, Debug)]
/// struct UdsConnectInfo {
///     peer_addr: Option<std::os::unix::net::SocketAddr>,
///     peer_cred: Option<hop::PeerCred>,
/// }
///
/// impl Connected<hop::IncomingStream<'_>> for UdsConnectInfo {
///     fn connect_info(stream: hop::IncomingStream<'_>) -> Self {
///         UdsConnectInfo {
///             peer_addr: stream.unix_peer_addr().cloned(),
///             peer_cred: stream.peer_cred().ok(),
///         }
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct IncomingStream<'a> {
    pub(crate) local_addr: SocketAddr,
    pub(crate) remote_addr: SocketAddr,
    peer: Peer<'a>,
}

/// What an [`IncomingStream`] knows beyond its IP addresses.
#[derive(Debug, Clone, Copy)]
enum Peer<'a> {
    Tcp,
    Unix {
        fd: BorrowedFd<'a>,
        addr: &'a std::os::unix::net::SocketAddr,
    },
    /// A generic listener's `Addr` (served by the tokio-task path only).
    #[cfg(all(feature = "axum", feature = "tokio-baseline"))]
    Remote(&'a (dyn Any + Send + Sync)),
}

/// The unspecified address `0.0.0.0:0`: what a connection with no IP address reports.
const UNSPECIFIED: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));

/// The credentials of the process at the other end of a Unix socket, as the kernel recorded
/// them when it connected (`SO_PEERCRED`; `getpeereid` where that is missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PeerCred {
    /// The peer's user id.
    pub uid: u32,
    /// The peer's group id.
    pub gid: u32,
    /// The peer's process id, where the platform reports it.
    pub pid: Option<i32>,
}

impl PeerCred {
    /// Asks the kernel for the credentials of `fd`'s peer.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn of(fd: BorrowedFd<'_>) -> std::io::Result<PeerCred> {
        use std::os::fd::AsRawFd;
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `fd` is an open socket for the borrow's lifetime; `cred` and `len` are valid
        // for writes, `len` holding the size of `cred`, as `getsockopt(2)` requires.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(PeerCred {
            uid: cred.uid,
            gid: cred.gid,
            pid: Some(cred.pid),
        })
    }

    /// Asks the kernel for the credentials of `fd`'s peer.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn of(fd: BorrowedFd<'_>) -> std::io::Result<PeerCred> {
        use std::os::fd::AsRawFd;
        let (mut uid, mut gid) = (0, 0);
        // SAFETY: `fd` is an open socket for the borrow's lifetime; `uid` and `gid` are valid
        // for writes.
        let r = unsafe { libc::getpeereid(fd.as_raw_fd(), &mut uid, &mut gid) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(PeerCred {
            uid,
            gid,
            pid: None,
        })
    }
}

/// A connection's local address: the listener's, unless it listens on a wildcard address
/// (then the connection's own, one `getsockname` per connection).
pub(crate) fn local_addr_of(
    listener: SocketAddr,
    conn: impl FnOnce() -> std::io::Result<SocketAddr>,
) -> SocketAddr {
    if listener.ip().is_unspecified() {
        conn().unwrap_or(listener)
    } else {
        listener
    }
}

impl<'a> IncomingStream<'a> {
    /// A TCP connection.
    pub(crate) fn new(local_addr: SocketAddr, remote_addr: SocketAddr) -> Self {
        Self {
            local_addr,
            remote_addr,
            peer: Peer::Tcp,
        }
    }

    /// A Unix-socket connection: its descriptor and the peer's address.
    pub(crate) fn unix(fd: BorrowedFd<'a>, addr: &'a std::os::unix::net::SocketAddr) -> Self {
        Self {
            local_addr: UNSPECIFIED,
            remote_addr: UNSPECIFIED,
            peer: Peer::Unix { fd, addr },
        }
    }

    /// A generic listener's connection: the listener's address, if a `SocketAddr`, and the
    /// connection's `Addr`.
    #[cfg(all(feature = "axum", feature = "tokio-baseline"))]
    pub(crate) fn generic(
        local_addr: Option<SocketAddr>,
        addr: &'a (dyn Any + Send + Sync),
    ) -> Self {
        Self {
            local_addr: local_addr.unwrap_or(UNSPECIFIED),
            remote_addr: addr
                .downcast_ref::<SocketAddr>()
                .copied()
                .unwrap_or(UNSPECIFIED),
            peer: Peer::Remote(addr),
        }
    }

    /// With a PROXY protocol header: its source, when it carries one, is the remote address
    /// (the local address stays the socket's; the header's destination is in the
    /// [`ProxyHeader`](crate::proxy::ProxyHeader)).
    pub(crate) fn proxied(mut self, header: &crate::proxy::ProxyHeader) -> Self {
        if let Some(source) = header.source() {
            self.remote_addr = source;
        }
        self
    }

    /// The address the connection was accepted on (`0.0.0.0:0` if it has no IP address: see
    /// the type's docs).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The peer's address (`0.0.0.0:0` if it has no IP address: see the type's docs). With
    /// [`Builder::proxy_protocol`](crate::Builder::proxy_protocol) on, the client's address
    /// from the connection's PROXY header when it carries one.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// The peer's address on a Unix socket (often unnamed: a client need not bind its
    /// socket); `None` for other connections.
    pub fn unix_peer_addr(&self) -> Option<&'a std::os::unix::net::SocketAddr> {
        match self.peer {
            Peer::Unix { addr, .. } => Some(addr),
            _ => None,
        }
    }

    /// The credentials of the peer process on a Unix socket (asked of the kernel on each
    /// call); an `Unsupported` error for other connections.
    pub fn peer_cred(&self) -> std::io::Result<PeerCred> {
        match self.peer {
            Peer::Unix { fd, .. } => PeerCred::of(fd),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "peer credentials exist for Unix sockets only",
            )),
        }
    }

    /// The peer's address as the listener typed it, if it is an `A`: a generic
    /// `axum::serve::Listener`'s `Addr`, a TCP connection's `SocketAddr`, a Unix socket's
    /// `std::os::unix::net::SocketAddr`.
    pub fn remote<A: Any>(&self) -> Option<&A> {
        match &self.peer {
            Peer::Tcp => (&self.remote_addr as &dyn Any).downcast_ref(),
            Peer::Unix { addr, .. } => (*addr as &dyn Any).downcast_ref(),
            #[cfg(all(feature = "axum", feature = "tokio-baseline"))]
            Peer::Remote(addr) => addr.downcast_ref(),
        }
    }
}

#[cfg(feature = "axum")]
impl axum::extract::connect_info::Connected<IncomingStream<'_>> for SocketAddr {
    fn connect_info(stream: IncomingStream<'_>) -> Self {
        stream.remote_addr
    }
}

/// Markers that let [`IntoConnService`] have one impl per kind of app, and
/// [`IntoListener`](crate::IntoListener) one per kind of listener, without overlap.
pub mod marker {
    /// A tower `Service<Request<Incoming>>`, e.g. an axum `Router`.
    #[derive(Debug)]
    pub enum RequestService {}
    /// A make-service: `Service<IncomingStream>` returning a request service, e.g.
    /// `Router::into_make_service_with_connect_info::<SocketAddr>()`.
    #[derive(Debug)]
    pub enum MakeService {}
    /// A hyper `Service`, e.g. `hyper::service::service_fn(..)`.
    #[derive(Debug)]
    pub enum HyperService {}

    /// A listener from `std` ([`IntoListener`](crate::IntoListener)): a
    /// `std::net::TcpListener` or a `std::os::unix::net::UnixListener`.
    #[derive(Debug)]
    pub enum StdListener {}
    /// tokio's `TcpListener` or `UnixListener`, without the `axum` feature (with it, they are
    /// [`AxumListener`]s).
    #[derive(Debug)]
    pub enum TokioListener {}
    /// Any `axum::serve::Listener` (feature `axum`), tokio's listeners included.
    #[derive(Debug)]
    pub enum AxumListener {}
}

/// A per-connection request service as hop serves it: a tower
/// `Service<Request<Incoming>, Response = Response<B>> + Clone + Send` whose body yields `Bytes`.
///
/// Implemented for every such service; you never implement it yourself.
pub trait ConnService:
    Service<
        Request<Incoming>,
        Response = Response<Self::ResBody>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
    /// The response body.
    type ResBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> ConnService for S
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type ResBody = B;
}

/// Anything [`serve`](crate::serve) can serve: it builds one request service per connection.
///
/// You do not implement this trait; it is implemented for
/// - tower services `Service<Request<Incoming>, Response = Response<B>> + Clone`
///   (an axum `Router`, a `tower::ServiceBuilder` stack, ...);
/// - make-services `Service<IncomingStream<'_>, Response = S, Error = Infallible> + Clone`
///   (axum's `IntoMakeService` and `IntoMakeServiceWithConnectInfo<_, SocketAddr>`) whose
///   future is ready at once, as axum's are;
/// - hyper services `hyper::service::Service<Request<Incoming>> + Clone`
///   (`hyper::service::service_fn(..)`).
///
/// The `M` parameter is a [`marker`] chosen by type inference.
pub trait IntoConnService<M>: Clone + Send + 'static {
    /// The per-connection service.
    type Service: ConnService;

    /// Builds the service for one connection; `None` if the make-service was not ready at once.
    fn make(&mut self, stream: IncomingStream<'_>) -> Option<Self::Service>;
}

impl<S> IntoConnService<marker::RequestService> for S
where
    S: ConnService,
{
    type Service = S;

    fn make(&mut self, _stream: IncomingStream<'_>) -> Option<S> {
        Some(self.clone())
    }
}

impl<M, S> IntoConnService<marker::MakeService> for M
where
    M: for<'a> Service<IncomingStream<'a>, Response = S, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S: ConnService,
{
    type Service = S;

    fn make(&mut self, stream: IncomingStream<'_>) -> Option<S> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => return None,
        }
        let mut fut = std::pin::pin!(self.call(stream));
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(svc)) => Some(svc),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => None,
        }
    }
}

/// A tower view of a hyper `Service` (what `hyper::service::service_fn` builds).
#[derive(Debug, Clone)]
pub struct FromHyper<S>(pub S);

impl<S, R> Service<R> for FromHyper<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        hyper::service::Service::call(&self.0, req)
    }
}

impl<S, B> IntoConnService<marker::HyperService> for S
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Service = FromHyper<S>;

    fn make(&mut self, _stream: IncomingStream<'_>) -> Option<FromHyper<S>> {
        Some(FromHyper(self.clone()))
    }
}

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
        panic = panic_message(panic),
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

/// The text of a caught panic, for the log.
/// (Cut to a few hundred bytes: a panic message may hold what a peer sent.)
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    crate::logs::clip(if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    })
}

pin_project_lite::pin_project! {
    /// A response body: the handler's, or the empty body of a `500` after a panic.
    ///
    /// A panic while the handler's body is polled becomes a body error, so hyper closes the
    /// connection instead of the panic unwinding through the event loop.
    #[project = HopBodyProj]
    #[allow(missing_docs)]
    pub enum HopBody<B> {
        /// The handler's body.
        Inner { #[pin] body: B },
        /// No body.
        Empty,
    }
}

impl<B> Body for HopBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            HopBodyProj::Inner { body } => {
                match catch_unwind(AssertUnwindSafe(|| body.poll_frame(cx))) {
                    Ok(p) => {
                        if let Poll::Ready(Some(Ok(frame))) = &p {
                            if frame
                                .data_ref()
                                .is_some_and(|d| d.len() >= crate::rt::tasks::BULK_CHUNK)
                            {
                                crate::rt::tasks::note_bulk();
                            }
                        }
                        p.map(|f| f.map(|r| r.map_err(Into::into)))
                    }
                    Err(panic) => {
                        crate::logs::error_limited!(
                            panic = panic_message(&*panic),
                            "response body panicked; closing the connection"
                        );
                        Poll::Ready(Some(Err("response body panicked".into())))
                    }
                }
            }
            HopBodyProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            HopBody::Inner { body } => body.is_end_stream(),
            HopBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            HopBody::Inner { body } => body.size_hint(),
            HopBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What a stalled request body is answered with on HTTP/1.1, before the response has started.
pub(crate) const TIMEOUT_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// A lower bound on the size of `req`'s head as it came on the wire: the request line and each
/// header line with the least whitespace the syntax allows.
pub(crate) fn head_at_least<B>(req: &Request<B>) -> u64 {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n ".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + ":\r\n".len())
        .sum();
    (line + headers + 2) as u64
}

/// The last 8 bytes a connection has read, packed into a `u64` (the newest in the low byte),
/// after `read`: so that a chunked body's end is seen even when it comes split over reads.
pub(crate) fn read_tail(tail: u64, read: &[u8]) -> u64 {
    match read.last_chunk::<8>() {
        // The common case, one load: the newest byte last is the low byte, big-endian.
        Some(last) => u64::from_be_bytes(*last),
        None => read.iter().fold(tail, |t, &b| (t << 8) | u64::from(b)),
    }
}

/// Whether the bytes read so far (their [`read_tail`]) end a chunked body: its last chunk
/// (`0`, CRLF, CRLF) right after a CRLF, with no trailers.
pub(crate) fn ends_chunked(tail: u64) -> bool {
    const END: u64 = u64::from_be_bytes(*b"\0\r\n0\r\n\r\n");
    tail & 0x00ff_ffff_ffff_ffff == END
}

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

#[cfg(test)]
mod tests {
    use super::{ends_chunked, read_tail};

    fn tail_of(reads: &[&[u8]]) -> u64 {
        reads.iter().fold(0, |t, r| read_tail(t, r))
    }

    #[test]
    fn a_chunked_end_is_seen_whole_or_split_over_reads() {
        let head: &[u8] = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(ends_chunked(tail_of(&[head, b"3\r\nabc\r\n0\r\n\r\n"])));
        assert!(ends_chunked(tail_of(&[head, b"0\r\n\r\n"])));
        assert!(ends_chunked(tail_of(&[
            head,
            b"3\r\nabc\r\n0\r",
            b"\n",
            b"\r\n"
        ])));
        assert!(ends_chunked(tail_of(&[
            head,
            b"3\r\nabc\r\n",
            b"0",
            b"\r\n\r\n"
        ])));
        assert!(!ends_chunked(tail_of(&[head])));
        assert!(!ends_chunked(tail_of(&[head, b"3\r\nabc\r\n"])));
    }
}
