//! What `serve` accepts as an app and what it makes of it per connection: [`IntoConnService`]
//! (one impl per kind of app, told apart by a [`marker`]: a tower service, a make-service, a
//! hyper service through [`FromHyper`]) and the [`ConnService`] it builds; what a make-service
//! is told about a new connection ([`IncomingStream`], [`PeerCred`], the local address); the
//! listener markers.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use tower_service::Service;

use super::body::BoxError;

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
#[cfg_attr(
    not(feature = "axum"),
    diagnostic::on_unimplemented(
        message = "hop cannot serve `{Self}`",
        note = "axum's `into_make_service_with_connect_info` needs hop-serve's `axum` feature: \
                `hop-serve = {{ version = \"0.1\", features = [\"axum\"] }}`"
    )
)]
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
