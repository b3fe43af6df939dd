//! A new connection on a poller that waits for its PROXY protocol header
//! ([`crate::Builder::proxy_protocol`]): it owns the socket from the accept until the header
//! is read, before anything else (TLS, HTTP, a read handler) sees a byte. It is driven like the
//! other states on readiness: each drive peeks at what has arrived ([`crate::proxy::parse`]),
//! waits for the next readable edge while the header is not whole, and once it is, takes
//! exactly its bytes off the socket and hands the header to the poller, which asks the app for
//! the connection's service with the proxied address and makes the entry what it becomes. No
//! buffer is kept between drives: the bytes wait in the kernel. A malformed or missing header,
//! the peer's close before it, or its time limit (`header_read_timeout`, or the idle timeout if
//! smaller, from the accept) closes the connection, counted in `Stats::proxy_header_failures`.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::task::Poll;
use std::time::Instant;

use super::fd::{Fd, StreamIo};
use super::Drive;
use crate::proxy::{parse, Failure, Parsed, ProxyHeader, MAX_HEADER, V1_MAX};
use crate::service::IncomingStream;

/// Who the socket says the peer is, kept until the header tells who it really is.
pub(crate) enum Peer {
    Tcp {
        local: SocketAddr,
        remote: SocketAddr,
    },
    Unix(std::os::unix::net::SocketAddr),
}

impl Peer {
    /// The connection as the app is told of it: the socket's addresses, with the header's
    /// source as the remote address when it carries one.
    pub(crate) fn incoming<'a>(
        &'a self,
        io: &'a StreamIo,
        header: Option<&ProxyHeader>,
    ) -> Option<IncomingStream<'a>> {
        let stream = match (self, io) {
            (Peer::Tcp { local, remote }, _) => IncomingStream::new(*local, *remote),
            (Peer::Unix(addr), StreamIo::Unix(s)) => IncomingStream::unix(s.as_fd(), addr),
            (Peer::Unix(_), StreamIo::Tcp(_)) => return None,
        };
        Some(match header {
            Some(h) => stream.proxied(h),
            None => stream,
        })
    }
}

/// A connection waiting for its header: see the module docs.
pub(crate) struct ProxyWait {
    pub(crate) fd: Fd,
    pub(crate) peer: Peer,
    /// When it was accepted: the header's time limit counts from here, and so do the first
    /// request's.
    pub(crate) since: Instant,
}

impl ProxyWait {
    /// Reads the header if it is all there: `Ready(Ok)` with it, `Pending` to wait for more,
    /// `Ready(Err)` to close (counted here, unless the server is draining).
    pub(crate) fn drive(
        &mut self,
        cfg: &super::http::HttpConfig,
        d: &mut Drive,
    ) -> Poll<Result<ProxyHeader, ()>> {
        if d.draining {
            return Poll::Ready(Err(()));
        }
        let res = match self.fd.maybe_readable() || self.fd.read_closed() {
            true => self.read(),
            false => Ok(None),
        };
        let failed = |why: Failure| {
            crate::proxy::refused(&cfg.ctl, &self.peer_addr(), &why);
            Poll::Ready(Err(()))
        };
        let polled = match res {
            Ok(Some(header)) => Poll::Ready(Ok(header)),
            Ok(None) => {
                let limit = cfg.head_limit();
                match limit.map(|l| crate::rt::timer::deadline(self.since, l)) {
                    Some(due) if d.now >= due => failed(Failure::TimedOut),
                    Some(due) => {
                        d.wake_at(due);
                        Poll::Pending
                    }
                    None => Poll::Pending,
                }
            }
            Err(why) => failed(why),
        };
        if let Poll::Ready(Err(())) = polled {
            d.because(crate::observe::Reason::ProxyHeader);
        }
        polled
    }

    /// The socket's own peer, for the log (a header that failed names no other).
    fn peer_addr(&self) -> Option<SocketAddr> {
        match self.peer {
            Peer::Tcp { remote, .. } => Some(remote),
            Peer::Unix(_) => None,
        }
    }

    /// Peeks at what has arrived: the header once it is whole (its bytes then taken off the
    /// socket), `None` while it is not.
    fn read(&mut self) -> Result<Option<ProxyHeader>, Failure> {
        let mut buf = [0u8; MAX_HEADER];
        // Enough for any v1 header and a v2 header's fixed part; more once v2 says how much.
        let mut want = V1_MAX;
        loop {
            let n = match self.fd.peek(&mut buf[..want]) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.fd.drained();
                    return Ok(None);
                }
                Err(e) => return Err(Failure::Io(e)),
            };
            match parse(&buf[..n]).map_err(Failure::Invalid)? {
                Parsed::Header(header, len) => {
                    self.take(len)?;
                    return Ok(Some(header));
                }
                // More than was looked at may be there already (no new edge would tell).
                Parsed::Need(more) if n == want => want = more,
                Parsed::Need(_) if self.fd.read_closed() => return Err(Failure::Closed),
                Parsed::Need(_) => {
                    self.fd.drained();
                    return Ok(None);
                }
            }
        }
    }

    /// Takes the header's `len` bytes (peeked already, so waiting) off the socket, and nothing
    /// more.
    fn take(&self, len: usize) -> Result<(), Failure> {
        let mut buf = [0u8; MAX_HEADER];
        let mut done = 0;
        while done < len {
            let r = match &self.fd.io {
                StreamIo::Tcp(s) => (&*s).read(&mut buf[done..len]),
                StreamIo::Unix(s) => (&*s).read(&mut buf[done..len]),
            };
            match r {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::Io(e)),
            }
        }
        Ok(())
    }
}
