//! Binding TCP listeners the way hop likes them ([`bind`], refusing an address another
//! listener holds, and [`bind_shared`], sharing it with `SO_REUSEPORT` on purpose), and the
//! deprecated `IntoStdListener` that `serve` used to take.

use std::io;
use std::net::SocketAddr;

#[cfg(doc)]
use crate::listener::IntoListener;

/// TCP listeners that convert into a non-blocking `std::net::TcpListener`.
///
/// `serve` used to take these only; it now takes any [`IntoListener`] (Unix sockets and
/// axum `Listener`s too).
#[deprecated(note = "serve takes any hop::IntoListener now")]
pub trait IntoStdListener {
    /// Converts into a non-blocking std listener.
    fn into_std_listener(self) -> io::Result<std::net::TcpListener>;
}

#[allow(deprecated)]
impl IntoStdListener for std::net::TcpListener {
    fn into_std_listener(self) -> io::Result<std::net::TcpListener> {
        self.set_nonblocking(true)?;
        Ok(self)
    }
}

#[allow(deprecated)]
impl IntoStdListener for tokio::net::TcpListener {
    fn into_std_listener(self) -> io::Result<std::net::TcpListener> {
        self.into_std()
    }
}

/// Binds a listener the way hop likes it: `SO_REUSEADDR`, `SO_REUSEPORT` (so each poller gets
/// its own accept queue), non-blocking, backlog 1024.
///
/// An address that another listener already holds (another process, or another server in this
/// one) is refused with `AddrInUse`, as `std::net::TcpListener::bind` refuses it: without this
/// check `SO_REUSEPORT` would let a second server start silently and take half the new
/// connections. [`bind_shared`] shares the port on purpose.
///
/// ```
/// let listener = hop::bind("127.0.0.1:0".parse().unwrap())?; // any free port
/// # let addr = listener.local_addr()?;
/// # // Non-blocking: nothing to accept yet.
/// # assert_eq!(listener.accept().unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
/// # // A second server on the address is refused; `bind_shared` joins it on purpose.
/// # assert_eq!(hop::bind(addr).unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
/// # let shared = hop::bind_shared(addr)?;
/// # assert_eq!(shared.local_addr()?, addr);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    if addr.port() != 0 {
        // A socket without `SO_REUSEPORT` cannot bind where anyone listens.
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        probe.set_reuse_address(true)?;
        if let Err(e) = probe.bind(&addr.into()) {
            return Err(if e.kind() == io::ErrorKind::AddrInUse {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{addr} is already in use by another server; \
                         hop::bind_shared (the demo's --share-port) shares it on purpose"
                    ),
                )
            } else {
                e
            });
        }
    }
    bind_shared(addr)
}

/// Like [`bind`], but joins the listeners already on `addr` that also set `SO_REUSEPORT` (the
/// same user's): the kernel spreads new connections over all of them. For a zero-downtime
/// restart, or several processes serving one port.
pub fn bind_shared(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    #[cfg(unix)]
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}
