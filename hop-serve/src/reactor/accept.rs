//! A poller's listeners and what it accepts: the listener per poller (`SO_REUSEPORT` siblings
//! or duplicates), accepting, admitting a new connection under the limits, what the app makes
//! of it (opened with TLS if the listener has it), and a connection whose PROXY protocol
//! header was read.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::fd::{Fd, StreamIo};
use crate::conn::http::HttpConn;
use crate::conn::proxy::{Peer, ProxyWait};
use crate::conn::stream::Socket;
use crate::conn::tcp::TcpConn;
use crate::conn::{Entry, Kind};
use crate::handler::ConnCore;
use crate::limits::{OpenGuard, OpenKind};
use crate::listener::Native;
use crate::observe::Reason;
use crate::rt::wake::Key;
use crate::service::app::{App, NewConn};
use crate::service::IncomingStream;

use super::{Poller, ACCEPT_WARN_EVERY};

/// A poller's listener: TCP or Unix.
pub(super) enum Listener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
}

/// A connection a poller accepted.
enum Accepted {
    Tcp(mio::net::TcpStream, SocketAddr),
    Unix(mio::net::UnixStream, std::os::unix::net::SocketAddr),
}

impl Listener {
    #[inline]
    fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| Accepted::Tcp(s, a)),
            Listener::Unix(l) => l.accept().map(|(s, a)| Accepted::Unix(s, a)),
        }
    }

    pub(super) fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Listener::Tcp(l) => l,
            Listener::Unix(l) => l,
        }
    }
}

/// One listener per poller: for TCP, `SO_REUSEPORT` siblings when possible, duplicates
/// otherwise; for a Unix socket, always duplicates (all pollers accept from one queue).
pub(super) fn listeners(
    listener: Native,
    n: usize,
    backlog: i32,
    tuning: &crate::tuning::TcpTuning,
) -> io::Result<Vec<Listener>> {
    let mut out = Vec::with_capacity(n);
    match listener {
        Native::Tcp(listener) => {
            listener.set_nonblocking(true)?;
            let sock = socket2::SockRef::from(&listener);
            // Re-listening adjusts the backlog of a listening socket.
            let _ = sock.listen(backlog);
            let addr = listener.local_addr()?;
            let reuseport = sock.reuse_port().unwrap_or(false);
            tuning.apply_listener(sock);
            for _ in 1..n {
                let extra = if reuseport {
                    match sibling(addr, backlog) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::debug!(error = %e, "SO_REUSEPORT sibling failed; sharing one listener");
                            listener.try_clone()?
                        }
                    }
                } else {
                    listener.try_clone()?
                };
                // A duplicate shares the options already set; a sibling needs its own.
                tuning.apply_listener(socket2::SockRef::from(&extra));
                out.push(Listener::Tcp(mio::net::TcpListener::from_std(extra)));
            }
            out.insert(0, Listener::Tcp(mio::net::TcpListener::from_std(listener)));
        }
        Native::Unix(listener) => {
            listener.set_nonblocking(true)?;
            let _ = socket2::SockRef::from(&listener).listen(backlog);
            for _ in 1..n {
                let extra = listener.try_clone()?;
                out.push(Listener::Unix(mio::net::UnixListener::from_std(extra)));
            }
            out.insert(
                0,
                Listener::Unix(mio::net::UnixListener::from_std(listener)),
            );
        }
    }
    Ok(out)
}

fn sibling(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}

impl<P: App> Poller<P> {
    pub(super) fn accept(&mut self, now: Instant, ready: &mut Vec<Key>) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok(accepted) => self.admit(accepted, now, ready),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning, and say so
                    // now and then rather than every 50 ms.
                    if self
                        .accept_warned
                        .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
                    {
                        tracing::warn!(
                            error = %e,
                            failures_not_logged = self.accept_quiet,
                            "accept failed; retrying every 50 ms"
                        );
                        self.accept_warned = Some(now);
                        self.accept_quiet = 0;
                    } else {
                        tracing::debug!(error = %e, "accept failed; retrying in 50 ms");
                        self.accept_quiet += 1;
                    }
                    self.accept_retry = Some(now + Duration::from_millis(50));
                    return;
                }
            }
        }
    }

    fn admit(&mut self, accepted: Accepted, now: Instant, ready: &mut Vec<Key>) {
        if !self.ctl.admit(self.max_connections) {
            tracing::debug!("max_connections reached; closing");
            return;
        }
        let mut ip = None;
        // Behind the PROXY protocol the client is the header's: counted once it is read
        // (`proxied`).
        let max_per_ip = self.max_per_ip.filter(|_| !self.proxy_protocol);
        if let (Some(max), Accepted::Tcp(_, peer)) = (max_per_ip, &accepted) {
            match self.ctl.ip_place(peer.ip(), max) {
                Some(slot) => ip = Some(Box::new(slot)),
                None => {
                    self.ctl.unadmit_per_ip();
                    return;
                }
            }
        }
        let (io, peer) = match accepted {
            Accepted::Tcp(stream, remote) => {
                let _ = stream.set_nodelay(true);
                if let Some(ka) = &self.tcp_keepalive {
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(ka);
                }
                let local = crate::service::local_addr_of(self.local_addr, || stream.local_addr());
                (StreamIo::Tcp(stream), Peer::Tcp { local, remote })
            }
            Accepted::Unix(stream, addr) => (StreamIo::Unix(stream), Peer::Unix(addr)),
        };
        // Registered after its first drive, if it outlives it (`Socket::needs_registration`).
        let mut fd = Fd::new(io);
        // Its place under `max_connections_per_ip`, given back when the socket closes.
        fd.ip = ip;
        #[cfg(feature = "metrics")]
        {
            fd.span = match &peer {
                Peer::Tcp { remote, .. } => crate::observe::conn_span(remote),
                Peer::Unix(addr) => crate::observe::conn_span(addr),
            };
        }
        let kind = if self.proxy_protocol {
            // The app hears of it once its header is read (`Verdict::Proxied`).
            Kind::Proxy(Box::new(ProxyWait {
                fd,
                peer,
                since: now,
            }))
        } else {
            let new = peer.incoming(&fd.io, None).and_then(|s| self.make(s));
            let Some(kind) = new.and_then(|new| self.open(fd, new, None, now, now)) else {
                self.ctl.release(false, Reason::Error);
                return;
            };
            match self.deal(kind) {
                Some(kind) => kind,
                None => return,
            }
        };
        let Some(key) = self.next_key() else {
            crate::logs::error_limited!("a poller holds 2^32 connections; closing a new one");
            self.drop_contained(kind);
            self.ctl.release(false, Reason::Error);
            return;
        };
        if let Some(s) = &self.spread {
            s.balance.opened(self.index);
        }
        self.conns.insert(Entry::new(key, kind));
        ready.push(key);
    }

    /// What a new connection on `fd` becomes, as the app said (`new`): TLS is put on its socket
    /// on a TLS listener (`None` if rustls refuses). `since` is when it was accepted (its first
    /// time limits count from there), `header` its PROXY protocol header.
    fn open(
        &self,
        #[allow(unused_mut)] mut fd: Fd,
        new: NewConn<P::Svc>,
        header: Option<crate::proxy::ProxyHeader>,
        since: Instant,
        now: Instant,
    ) -> Option<Kind<P::Svc>> {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        match self.http.tls_connection() {
            None => {}
            Some(Ok(tls)) => fd.start_tls(tls),
            Some(Err(())) => return None,
        }
        Some(match new {
            NewConn::Http(svc) => {
                let mut socket = Socket::new(fd);
                socket.proxy = header;
                // Counted once wherever it goes (`deal`); uncounted when it closes or is taken
                // over.
                self.ctl.open.http_opened();
                Kind::Http(HttpConn::new(Arc::new(socket), svc, &self.http, since))
            }
            NewConn::Tcp(handler) => {
                let conn = crate::handler::Conn::new(Some(fd.io.as_raw_fd()), &self.tcp);
                let mut core =
                    ConnCore::new(handler, conn, Default::default(), self.tcp.clone(), now);
                core.open = Some(OpenGuard::new(self.ctl.open.clone(), OpenKind::Tcp));
                let conn = TcpConn::new(fd, core);
                #[cfg(any(feature = "tls", feature = "tls-ring"))]
                let conn = match &self.http.tls {
                    Some((_, timeout)) => conn.after_handshake(
                        crate::rt::timer::deadline(since, *timeout),
                        self.ctl.clone(),
                    ),
                    None => conn,
                };
                Kind::Tcp(Box::new(conn))
            }
        })
    }

    /// A connection's PROXY protocol header is read: it takes its place under
    /// `max_connections_per_ip` as the header's source (the socket's peer for a header
    /// without one), then the app is asked what it becomes, told that source as its peer;
    /// `Err` closes it, for that reason.
    pub(super) fn proxied(
        &mut self,
        wait: ProxyWait,
        header: crate::proxy::ProxyHeader,
        now: Instant,
    ) -> Result<Kind<P::Svc>, Reason> {
        let ProxyWait {
            mut fd,
            peer,
            since,
        } = wait;
        if let Some(max) = self.max_per_ip {
            let client = header.source().map(|a| a.ip()).or(match &peer {
                Peer::Tcp { remote, .. } => Some(remote.ip()),
                Peer::Unix(_) => None,
            });
            if let Some(client) = client {
                let slot = self.ctl.ip_place(client, max);
                fd.ip = Some(Box::new(slot.ok_or(Reason::MaxConnectionsPerIp)?));
            }
        }
        #[cfg(feature = "metrics")]
        if let Some(span) = &fd.span {
            crate::observe::record_client(span, header.source());
        }
        let new = peer
            .incoming(&fd.io, Some(&header))
            .and_then(|s| self.make(s))
            .ok_or(Reason::Error)?;
        self.open(fd, new, Some(header), since, now)
            .ok_or(Reason::Error)
    }

    /// Asks the app what a new connection becomes (user code: a panic is contained); `None`
    /// closes it.
    fn make(&mut self, stream: IncomingStream<'_>) -> Option<NewConn<P::Svc>> {
        let app = &mut self.app;
        match catch_unwind(AssertUnwindSafe(|| app.accept(stream))) {
            Ok(Some(new)) => Some(new),
            Ok(None) => {
                crate::logs::error_limited!(?stream, "the make-service was not ready; closing");
                None
            }
            Err(panic) => {
                self.ctl.contained_panic("the make-service", &*panic);
                None
            }
        }
    }
}
