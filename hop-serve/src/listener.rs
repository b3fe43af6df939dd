//! What [`serve`](crate::serve) accepts as a listener, and what it becomes.
//!
//! [`IntoListener`] turns what the user passes (a `std::net::TcpListener`, a
//! `std::os::unix::net::UnixListener`, tokio's `TcpListener` and `UnixListener`, or, with the
//! `axum` feature, any `axum::serve::Listener`) into a [`Bound`]: a native listener whose
//! socket both backends accept on themselves ([`Native`]: TCP or Unix), or an erased generic
//! listener ([`ErasedListener`]) whose connections hop cannot see the socket of, served with
//! hyper-util on tokio tasks whatever the backend. tokio's own listeners implement axum's
//! `Listener` too; the generic impl recognizes them (by `Any`) and takes the native path.
//!
//! The `M` parameter of [`IntoListener`] is a [`marker`](crate::marker) chosen by type
//! inference, as for [`IntoConnService`](crate::IntoConnService): it lets the impl for every
//! axum `Listener` sit beside the impls for std's listeners without overlapping.

use std::io;
use std::net::SocketAddr;

use crate::service::marker;

/// A listener as hop serves it (you never name or build one: see [`IntoListener`]).
#[derive(Debug)]
pub enum Bound {
    /// A socket hop accepts on itself.
    #[doc(hidden)]
    Native(Native),
    /// An `axum::serve::Listener` hop only calls `accept` on.
    #[doc(hidden)]
    #[cfg(feature = "axum")]
    Generic(Box<dyn ErasedListener>),
}

/// A listening socket both backends accept on natively.
#[derive(Debug)]
pub enum Native {
    /// TCP.
    Tcp(std::net::TcpListener),
    /// A Unix stream socket.
    Unix(std::os::unix::net::UnixListener),
}

/// The error for a listener that has no IP address (a Unix socket, or a generic listener
/// whose `Addr` is not a `SocketAddr`).
fn no_socket_addr(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what} has no IP socket address"),
    )
}

impl Bound {
    /// The IP address it listens on; an `Unsupported` error for a Unix socket, and for a
    /// generic listener whose address is not a `SocketAddr`.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Bound::Native(Native::Tcp(l)) => l.local_addr(),
            Bound::Native(Native::Unix(_)) => Err(no_socket_addr("a Unix socket")),
            #[cfg(feature = "axum")]
            Bound::Generic(l) => l
                .local_addr()
                .ok_or_else(|| no_socket_addr("this listener")),
        }
    }
}

/// Listeners [`serve`](crate::serve) accepts:
///
/// - `std::net::TcpListener` and `std::os::unix::net::UnixListener`;
/// - `tokio::net::TcpListener` and `tokio::net::UnixListener`;
/// - with the `axum` feature, any `axum::serve::Listener`, such as one wrapped
///   by `axum::serve::ListenerExt::tap_io` or a type of your own, whose `Addr` is
///   `Debug + Sync + 'static`.
///
/// TCP and Unix listeners are accepted on natively by either backend. A generic listener
/// (any other `axum::serve::Listener`) hides its socket, so its connections are served with
/// hyper-util on tokio tasks, one per connection, whatever the backend (this needs the
/// `tokio-baseline` feature too).
///
/// You do not implement this trait (implement `axum::serve::Listener` instead). The `M`
/// parameter is a [`marker`](crate::marker) chosen by type inference.
#[cfg_attr(
    not(feature = "axum"),
    diagnostic::on_unimplemented(
        message = "hop cannot listen on `{Self}`",
        note = "any other `axum::serve::Listener` needs hop-serve's `axum` feature: \
                `hop-serve = {{ version = \"0.1\", features = [\"axum\"] }}`"
    )
)]
pub trait IntoListener<M> {
    /// Converts into a listener hop serves.
    #[doc(hidden)]
    fn into_bound(self) -> io::Result<Bound>;
}

impl IntoListener<marker::StdListener> for std::net::TcpListener {
    fn into_bound(self) -> io::Result<Bound> {
        self.set_nonblocking(true)?;
        Ok(Bound::Native(Native::Tcp(self)))
    }
}

impl IntoListener<marker::StdListener> for std::os::unix::net::UnixListener {
    fn into_bound(self) -> io::Result<Bound> {
        self.set_nonblocking(true)?;
        Ok(Bound::Native(Native::Unix(self)))
    }
}

#[cfg(not(feature = "axum"))]
impl IntoListener<marker::TokioListener> for tokio::net::TcpListener {
    fn into_bound(self) -> io::Result<Bound> {
        Ok(Bound::Native(Native::Tcp(self.into_std()?)))
    }
}

#[cfg(not(feature = "axum"))]
impl IntoListener<marker::TokioListener> for tokio::net::UnixListener {
    fn into_bound(self) -> io::Result<Bound> {
        Ok(Bound::Native(Native::Unix(self.into_std()?)))
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(not(feature = "tokio-baseline"), allow(unused_imports))]
pub use generic::{BoxIo, ErasedListener, RemoteAddr};

#[cfg(feature = "axum")]
mod generic {
    use std::any::Any;
    use std::fmt;
    use std::future::Future;
    use std::io;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite};

    use super::{Bound, IntoListener, Native};
    use crate::service::marker;

    /// A generic listener's connection, boxed.
    pub type BoxIo = Box<dyn Io>;

    /// What a generic listener's connection is.
    pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

    impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

    /// A generic listener's `Addr`, boxed: what [`IncomingStream::remote`] hands out.
    ///
    /// [`IncomingStream::remote`]: crate::IncomingStream::remote
    pub trait RemoteAddr: fmt::Debug + Send + Sync + 'static {
        /// The address as `Any`, to downcast.
        fn as_any(&self) -> &(dyn std::any::Any + Send + Sync);
    }

    impl<T: fmt::Debug + Send + Sync + 'static> RemoteAddr for T {
        fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
            self
        }
    }

    type Accepting<L> = Pin<
        Box<
            dyn Future<
                    Output = (
                        L,
                        <L as axum::serve::Listener>::Io,
                        <L as axum::serve::Listener>::Addr,
                    ),
                > + Send,
        >,
    >;

    /// An `axum::serve::Listener` with its types erased.
    ///
    /// Accepting is cancel-safe whatever the listener: the accept in progress owns the
    /// listener and is kept until it completes, so a caller that stops polling (the accept
    /// loop's `select!`) loses no connection the listener had already taken.
    pub trait ErasedListener: Send + 'static {
        /// The next connection (axum's `Listener::accept` retries errors itself).
        fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<(BoxIo, Box<dyn RemoteAddr>)>;
        /// The listener's address, if it is a `SocketAddr`.
        fn local_addr(&self) -> Option<SocketAddr>;
        /// The listener's type, for the log.
        fn type_name(&self) -> &'static str;
    }

    impl fmt::Debug for dyn ErasedListener {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ErasedListener")
                .field("type", &self.type_name())
                .finish()
        }
    }

    struct Erased<L: axum::serve::Listener> {
        state: ListenerState<L>,
        local_addr: Option<SocketAddr>,
    }

    /// Where a generic listener is: held between accepts, moved into its accept future, or
    /// lost to a panic in that future.
    enum ListenerState<L: axum::serve::Listener> {
        Idle(L),
        Accepting(Accepting<L>),
        /// The accept future panicked: the listener is gone.
        Gone,
    }

    impl<L> ErasedListener for Erased<L>
    where
        L: axum::serve::Listener,
        L::Addr: fmt::Debug + Sync + 'static,
    {
        fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<(BoxIo, Box<dyn RemoteAddr>)> {
            loop {
                match std::mem::replace(&mut self.state, ListenerState::Gone) {
                    ListenerState::Idle(mut l) => {
                        self.state = ListenerState::Accepting(Box::pin(async move {
                            let (io, addr) = l.accept().await;
                            (l, io, addr)
                        }));
                    }
                    ListenerState::Accepting(mut fut) => match fut.as_mut().poll(cx) {
                        Poll::Ready((l, io, addr)) => {
                            self.state = ListenerState::Idle(l);
                            return Poll::Ready((Box::new(io), Box::new(addr)));
                        }
                        Poll::Pending => {
                            self.state = ListenerState::Accepting(fut);
                            return Poll::Pending;
                        }
                    },
                    ListenerState::Gone => return Poll::Pending,
                }
            }
        }

        fn local_addr(&self) -> Option<SocketAddr> {
            self.local_addr
        }

        fn type_name(&self) -> &'static str {
            std::any::type_name::<L>()
        }
    }

    impl<L> IntoListener<marker::AxumListener> for L
    where
        L: axum::serve::Listener,
        L::Addr: fmt::Debug + Sync + 'static,
    {
        fn into_bound(self) -> io::Result<Bound> {
            // tokio's own listeners: their sockets are served natively.
            let mut slot = Some(self);
            let any: &mut dyn Any = &mut slot;
            if let Some(l) = any.downcast_mut::<Option<tokio::net::TcpListener>>() {
                let l = l.take().expect("the listener is still there");
                return Ok(Bound::Native(Native::Tcp(l.into_std()?)));
            }
            if let Some(l) = any.downcast_mut::<Option<tokio::net::UnixListener>>() {
                let l = l.take().expect("the listener is still there");
                return Ok(Bound::Native(Native::Unix(l.into_std()?)));
            }
            let l = slot.expect("the listener is still there");
            let local_addr = l
                .local_addr()
                .ok()
                .and_then(|a| (&a as &dyn Any).downcast_ref::<SocketAddr>().copied());
            Ok(Bound::Generic(Box::new(Erased {
                state: ListenerState::Idle(l),
                local_addr,
            })))
        }
    }
}
