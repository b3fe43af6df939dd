//! Where the tokio backend's accept loop takes connections from ([`Accept`]): a TCP listener
//! ([`TcpAccept`], with the socket options its connections get), a Unix listener, or a generic
//! `axum::serve::Listener` (feature `axum`; its streams boxed). Each says how a connection is
//! described to the app, how HTTP/2 is told from HTTP/1.1 on it, and how its PROXY protocol
//! header is read.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::http2::{sniff, Proto, PREFACE};
use crate::proxy::{Failure, ProxyHeader};
use crate::service::IncomingStream;
use crate::settings::Config;

use super::peek::{read_proxy_header, sniff_peeked};
#[cfg(feature = "axum")]
use super::replay;

/// Where the accept loop takes connections from: a TCP or Unix listener, or a generic
/// `axum::serve::Listener` (whose connections are boxed).
pub(super) trait Accept: Send + 'static {
    /// A connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer's address.
    type Peer: std::fmt::Debug + Send + 'static;

    /// The connection as served over HTTP: the stream itself, or a generic listener's with the
    /// bytes read to tell the protocol put back in front.
    type Served: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The next connection (cancel-safe: `select!` drops it whenever another branch wins).
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Peer)>> + Send;

    /// A connection the kernel has already queued, taken without waiting for readiness (once
    /// the server stops accepting: what is queued would be reset when the listener closes);
    /// `None` when the queue is empty, or this listener cannot tell.
    fn accept_queued(&mut self) -> Option<io::Result<(Self::Io, Self::Peer)>> {
        None
    }

    /// Sets up a new connection (socket options) and describes it to the app.
    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a Self::Peer) -> IncomingStream<'a>;

    /// The connection's descriptor, if hop may use it: TCP (a read handler's addresses, the
    /// reset of a connection cut at the drain deadline).
    fn tcp_fd(_io: &Self::Io) -> Option<RawFd> {
        None
    }

    /// The peer's IP address, if it has one (`max_connections_per_ip`).
    fn peer_ip(_peer: &Self::Peer) -> Option<std::net::IpAddr> {
        None
    }

    /// Tells HTTP/1.1 from HTTP/2 by the connection's first bytes; `None` if it ends first.
    fn sniff(
        io: Self::Io,
    ) -> impl Future<Output = io::Result<Option<(Proto, Self::Served)>>> + Send;

    /// The connection as served when HTTP/2 is off.
    fn plain(io: Self::Io) -> Self::Served;

    /// Reads the connection's PROXY protocol header, and only its bytes.
    fn proxy_header(
        io: &mut Self::Io,
    ) -> impl Future<Output = Result<ProxyHeader, Failure>> + Send {
        let _ = io;
        // Generic listeners are refused with the PROXY protocol on (`serve_until`).
        std::future::ready(Err(Failure::Io(io::ErrorKind::Unsupported.into())))
    }

    /// The connection as the app is told of it once its PROXY protocol header is read
    /// (`local`: its local address, as [`incoming`](Self::incoming) said).
    fn proxied<'a>(
        io: &'a Self::Io,
        peer: &'a Self::Peer,
        local: SocketAddr,
        header: &ProxyHeader,
    ) -> IncomingStream<'a>;
}

/// A TCP listener, with the settings its connections get.
pub(super) struct TcpAccept {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    keepalive: Option<socket2::TcpKeepalive>,
}

impl TcpAccept {
    /// Must be called inside the runtime.
    pub(super) fn new(listener: std::net::TcpListener, cfg: &Config) -> io::Result<Self> {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        Ok(TcpAccept {
            local_addr: listener.local_addr()?,
            listener,
            keepalive: cfg.tcp_tuning.keepalive(),
        })
    }
}

impl Accept for TcpAccept {
    type Io = tokio::net::TcpStream;
    type Peer = SocketAddr;
    type Served = tokio::net::TcpStream;

    async fn sniff(io: Self::Io) -> io::Result<Option<(Proto, Self::Served)>> {
        Ok(sniff_peeked(&io).await?.map(|p| (p, io)))
    }

    fn plain(io: Self::Io) -> Self::Served {
        io
    }

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, SocketAddr)>> + Send {
        self.listener.accept()
    }

    fn accept_queued(&mut self) -> Option<io::Result<(Self::Io, SocketAddr)>> {
        // Straight to accept(2): tokio's readiness may not have heard of the last arrivals.
        let (sock, peer) = match socket2::SockRef::from(&self.listener).accept() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(Err(e)),
        };
        let stream = std::net::TcpStream::from(sock);
        let peer = peer
            .as_socket()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        Some(
            stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream))
                .map(|s| (s, peer)),
        )
    }

    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a SocketAddr) -> IncomingStream<'a> {
        let _ = io.set_nodelay(true);
        if let Some(ka) = &self.keepalive {
            let _ = socket2::SockRef::from(io).set_tcp_keepalive(ka);
        }
        let local = crate::service::local_addr_of(self.local_addr, || io.local_addr());
        IncomingStream::new(local, *peer)
    }

    fn tcp_fd(io: &Self::Io) -> Option<RawFd> {
        Some(io.as_raw_fd())
    }

    async fn proxy_header(io: &mut Self::Io) -> Result<ProxyHeader, Failure> {
        read_proxy_header(io).await
    }

    fn proxied<'a>(
        _io: &'a Self::Io,
        peer: &'a SocketAddr,
        local: SocketAddr,
        header: &ProxyHeader,
    ) -> IncomingStream<'a> {
        IncomingStream::new(local, *peer).proxied(header)
    }

    fn peer_ip(peer: &SocketAddr) -> Option<std::net::IpAddr> {
        Some(peer.ip())
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Peer = std::os::unix::net::SocketAddr;
    type Served = tokio::net::UnixStream;

    async fn sniff(io: Self::Io) -> io::Result<Option<(Proto, Self::Served)>> {
        Ok(sniff_peeked(&io).await?.map(|p| (p, io)))
    }

    fn plain(io: Self::Io) -> Self::Served {
        io
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Peer)> {
        let (io, peer) = tokio::net::UnixListener::accept(self).await?;
        Ok((io, peer.into()))
    }

    fn incoming<'a>(&'a self, io: &'a Self::Io, peer: &'a Self::Peer) -> IncomingStream<'a> {
        IncomingStream::unix(io.as_fd(), peer)
    }

    async fn proxy_header(io: &mut Self::Io) -> Result<ProxyHeader, Failure> {
        read_proxy_header(io).await
    }

    fn proxied<'a>(
        io: &'a Self::Io,
        peer: &'a Self::Peer,
        _local: SocketAddr,
        header: &ProxyHeader,
    ) -> IncomingStream<'a> {
        IncomingStream::unix(io.as_fd(), peer).proxied(header)
    }
}

#[cfg(feature = "axum")]
impl Accept for Box<dyn crate::listener::ErasedListener> {
    type Io = crate::listener::BoxIo;
    type Peer = Box<dyn crate::listener::RemoteAddr>;
    type Served = replay::Replay<crate::listener::BoxIo>;

    async fn sniff(mut io: Self::Io) -> io::Result<Option<(Proto, Self::Served)>> {
        use tokio::io::AsyncReadExt;
        let mut first = [0u8; PREFACE.len()];
        let mut n = 0;
        loop {
            let got = io.read(&mut first[n..]).await?;
            if got == 0 {
                return Ok(None);
            }
            n += got;
            if let Some(p) = sniff(&first[..n]) {
                let prefix = bytes::Bytes::copy_from_slice(&first[..n]);
                return Ok(Some((p, replay::Replay::new(prefix, io))));
            }
        }
    }

    fn plain(io: Self::Io) -> Self::Served {
        replay::Replay::new(bytes::Bytes::new(), io)
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Peer)> {
        Ok(std::future::poll_fn(|cx| self.poll_accept(cx)).await)
    }

    fn incoming<'a>(&'a self, _io: &'a Self::Io, peer: &'a Self::Peer) -> IncomingStream<'a> {
        IncomingStream::generic(self.local_addr(), (**peer).as_any())
    }

    fn proxied<'a>(
        _io: &'a Self::Io,
        peer: &'a Self::Peer,
        local: SocketAddr,
        header: &ProxyHeader,
    ) -> IncomingStream<'a> {
        IncomingStream::generic(Some(local), (**peer).as_any()).proxied(header)
    }

    fn peer_ip(peer: &Self::Peer) -> Option<std::net::IpAddr> {
        (**peer)
            .as_any()
            .downcast_ref::<SocketAddr>()
            .map(|a| a.ip())
    }
}
