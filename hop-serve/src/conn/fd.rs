//! A connection's descriptor, TCP or Unix ([`StreamIo`]), and its readiness as its poller
//! tracks it ([`Fd`]): the raw I/O under everything else in the room, `recv(2)`, vectored
//! writes, `MSG_PEEK`, `sendfile(2)` and the write side's shutdown, straight on the
//! non-blocking socket or through the rustls connection (`super::tls`) a TLS listener's sockets
//! carry. A read-handler connection owns an `Fd` outright; an HTTP connection's is inside its
//! shared [`Socket`](super::stream::Socket), which adds hyper's side (`super::stream`).

use std::io::{self, IoSlice, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(any(feature = "tls", feature = "tls-ring"))]
use std::sync::Mutex;
use std::task::Poll;

#[cfg(any(feature = "tls", feature = "tls-ring"))]
use super::tls::Tls;

/// A connection's socket: TCP or Unix. Reads go through `recv(2)` on the descriptor either
/// way; writes and shutdowns through the stream's own type, one `match` away.
#[derive(Debug)]
pub(crate) enum StreamIo {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl StreamIo {
    /// Shuts down one or both directions.
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            StreamIo::Tcp(s) => s.shutdown(how),
            StreamIo::Unix(s) => s.shutdown(how),
        }
    }
}

impl AsRawFd for StreamIo {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            StreamIo::Tcp(s) => s.as_raw_fd(),
            StreamIo::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Write for &StreamIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            StreamIo::Tcp(s) => (&*s).write(buf),
            StreamIo::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            StreamIo::Tcp(s) => (&*s).write_vectored(bufs),
            StreamIo::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket's descriptor and its readiness as its poller tracks it: all a read-handler
/// connection needs (it owns one outright), and the core of a [`Socket`].
///
/// Readiness is kept in flags, set by poller events and cleared on `WouldBlock` (or a short
/// read or write, which means the next one would block), so that a read or write that would
/// block costs no system call. Atomic, because an HTTP connection's [`Socket`] is shared with
/// an upgrade's task; only the poller sets them.
///
/// [`Socket`]: super::stream::Socket
#[derive(Debug)]
pub(crate) struct Fd {
    pub(crate) io: StreamIo,
    readable: AtomicBool,
    writable: AtomicBool,
    read_closed: AtomicBool,
    /// Registered with the poller's `mio::Poll` (see [`Fd::needs_registration`]).
    registered: AtomicBool,
    /// TLS, on a TLS listener's connections: every read and write goes through it.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    tls: Option<Box<Mutex<Tls>>>,
    /// Its place in its client IP's count (`max_connections_per_ip`), given back when the
    /// descriptor is dropped, however the connection ends (boxed: a pointer in every
    /// connection, most of which have none).
    pub(crate) ip: Option<Box<crate::limits::IpSlot>>,
    /// Bytes read and written, reported when the descriptor is dropped (`crate::observe`;
    /// empty without the `metrics` feature).
    tally: crate::observe::ByteTally,
    /// The connection's tracing span (feature `metrics`, debug level).
    #[cfg(feature = "metrics")]
    pub(crate) span: crate::observe::ConnSpan,
    /// Counts it in the TLS gauge once its handshake is done.
    #[cfg(all(feature = "metrics", any(feature = "tls", feature = "tls-ring")))]
    tls_open: std::sync::OnceLock<crate::limits::Gauged>,
}

impl Fd {
    pub(crate) fn new(io: StreamIo) -> Self {
        Fd {
            io,
            // Optimistic: a new connection's first request has often arrived by the time it is
            // accepted; reading at once saves a round through epoll.
            readable: AtomicBool::new(true),
            writable: AtomicBool::new(true),
            read_closed: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            tls: None,
            ip: None,
            tally: Default::default(),
            #[cfg(feature = "metrics")]
            span: None,
            #[cfg(all(feature = "metrics", any(feature = "tls", feature = "tls-ring")))]
            tls_open: std::sync::OnceLock::new(),
        }
    }

    /// Records a readiness event. Returns whether the connection should be driven: on
    /// readability, or on writability that a write waited for (the send buffer draining after
    /// every response is not worth a poll).
    pub(crate) fn on_event(&self, readable: bool, writable: bool, read_closed: bool) -> bool {
        if read_closed {
            // Sticky: a short read must not hide the end of input, which raises no new edge.
            self.read_closed.store(true, Ordering::Relaxed);
        }
        let mut drive = false;
        if readable {
            self.readable.store(true, Ordering::Relaxed);
            drive = true;
        }
        if writable {
            drive |= !self.writable.swap(true, Ordering::Relaxed);
        }
        drive
    }

    /// Whether the poller still has to register the socket, marking it registered. A
    /// connection is registered lazily, after its first drive, and only if it outlives it: a
    /// `Connection: close` request answered from the optimistic first read never costs an
    /// `epoll_ctl`. Registering late loses no edge, since epoll reports a socket that is
    /// already ready when it is added.
    pub(crate) fn needs_registration(&self) -> bool {
        !self.registered.load(Ordering::Relaxed) && !self.registered.swap(true, Ordering::Relaxed)
    }

    /// The socket leaves its poller for another: `true` if it was registered (the caller
    /// deregisters it). It arrives unregistered, to be registered by its new poller after its
    /// first drive, and readable, so that first drive reads what came meanwhile (an edge that
    /// fell between the two pollers is not lost: epoll reports a ready socket when it is added).
    pub(crate) fn leave(&self) -> bool {
        self.readable.store(true, Ordering::Relaxed);
        self.registered.swap(false, Ordering::Relaxed)
    }

    /// The last read did not end in `WouldBlock` (or an event said bytes arrived since), or
    /// TLS holds decrypted bytes not read yet.
    pub(crate) fn maybe_readable(&self) -> bool {
        if self.readable.load(Ordering::Relaxed) {
            return true;
        }
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(tls) = &self.tls {
            return lock(tls).has_plaintext();
        }
        false
    }

    /// A read by the poller would end in `WouldBlock` without trying the socket: plaintext
    /// (TLS may hold bytes read ahead), and the flags say nothing came since the last read.
    pub(super) fn read_would_block(&self) -> bool {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if self.tls.is_some() {
            return false;
        }
        self.nothing_came()
    }

    /// The readiness flags say nothing came (bytes or the peer's FIN) since the last read that
    /// ended in `WouldBlock`.
    fn nothing_came(&self) -> bool {
        !self.readable.load(Ordering::Relaxed) && !self.read_closed.load(Ordering::Relaxed)
    }

    /// No write is waiting for the socket to drain.
    pub(crate) fn write_idle(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    /// The peer has closed its side (sticky: see [`Fd::on_event`]).
    pub(crate) fn read_closed(&self) -> bool {
        self.read_closed.load(Ordering::Relaxed)
    }

    /// Copies the bytes waiting on the socket into `dst` without taking them (`MSG_PEEK`,
    /// retried if interrupted). Readiness is left as it was: a caller that waits for more
    /// calls [`Fd::drained`].
    pub(crate) fn peek(&self, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `recv(2)` writes at most `dst.len()` bytes into `dst`, which is
            // initialized memory the caller owns.
            let n = unsafe {
                libc::recv(
                    self.io.as_raw_fd(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    libc::MSG_PEEK,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Whether a file may be sent on this socket with `sendfile(2)`: not through TLS.
    pub(crate) fn can_sendfile(&self) -> bool {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if self.tls.is_some() {
            return false;
        }
        true
    }

    /// One `sendfile(2)` of up to `len` bytes of `file` from `*offset`, which it advances: the
    /// bytes go from the page cache to the socket with no copy through user space. `WouldBlock`
    /// when the send buffer is full (the next writable edge drives the connection again).
    pub(crate) fn sendfile(
        &self,
        file: &std::fs::File,
        offset: &mut u64,
        len: u64,
    ) -> io::Result<usize> {
        // Linux sends at most 0x7ffff000 bytes a call.
        let count = len.min(1 << 30) as usize;
        let Ok(mut off) = libc::off_t::try_from(*offset) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: both descriptors are open for the call (the socket is owned by `self`, the
        // file borrowed); `off` is a live `off_t` the kernel reads and advances.
        let n = unsafe {
            libc::sendfile(
                self.io.as_raw_fd(),
                std::os::fd::AsRawFd::as_raw_fd(file),
                &mut off,
                count,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                self.writable.store(false, Ordering::Relaxed);
            }
            return Err(e);
        }
        *offset = off as u64;
        self.tally.wrote(n as usize);
        Ok(n as usize)
    }

    /// Records that everything the socket holds has been seen (a peek found too few bytes):
    /// the connection waits for the next arrival, which raises a new edge.
    pub(crate) fn drained(&self) {
        self.readable.store(false, Ordering::Relaxed);
    }

    /// One `recv(2)` into `dst` (retried if interrupted).
    fn recv(&self, dst: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        loop {
            // SAFETY: `recv(2)` writes at most `dst.len()` bytes into `dst` and reports how many;
            // the caller counts only those as initialized.
            let n =
                unsafe { libc::recv(self.io.as_raw_fd(), dst.as_mut_ptr().cast(), dst.len(), 0) };
            if n >= 0 {
                let n = n as usize;
                if n > 0 && n < dst.len() {
                    // A short read drained the socket: the next read would be `WouldBlock`, and
                    // the next arrival raises a new edge. (What tokio does too.)
                    self.readable.store(false, Ordering::Relaxed);
                }
                self.tally.read(n);
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// One write of `bufs` (retried if interrupted).
    fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            let r = match bufs {
                [one] => (&self.io).write(one),
                _ => (&self.io).write_vectored(bufs),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(n) => {
                    self.tally.wrote(n);
                    return Ok(n);
                }
                r => return r,
            }
        }
    }

    /// The socket as a `Read` and `Write`, keeping the readiness flags if `local` (the
    /// poller's own I/O: see the type's docs).
    fn raw(&self, local: bool) -> Raw<'_> {
        Raw { fd: self, local }
    }

    /// Reads into `dst`: decrypted bytes on a TLS connection. `WouldBlock` when there is
    /// nothing; `local` as for [`raw`](Self::raw).
    pub(crate) fn read(&self, dst: &mut [MaybeUninit<u8>], local: bool) -> io::Result<usize> {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(tls) = &self.tls {
            return lock(tls).read(&mut self.raw(local), dst);
        }
        self.raw(local).recv(dst)
    }

    /// Writes `bufs`: encrypted on a TLS connection, where the records may wait in rustls for
    /// [`flush`](Self::flush). `local` as for [`raw`](Self::raw).
    pub(crate) fn write(&self, bufs: &[IoSlice<'_>], local: bool) -> io::Result<usize> {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(tls) = &self.tls {
            return lock(tls).write(&mut self.raw(local), bufs);
        }
        self.raw(local).write_vectored(bufs)
    }

    /// Sends what TLS holds encrypted: `Ok(true)` when nothing is left (always, without TLS).
    pub(crate) fn flush(&self, local: bool) -> io::Result<bool> {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(tls) = &self.tls {
            return lock(tls).send(&mut self.raw(local));
        }
        let _ = local;
        Ok(true)
    }

    /// TLS holds encrypted output not sent yet.
    pub(crate) fn has_output(&self) -> bool {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(tls) = &self.tls {
            return lock(tls).has_output();
        }
        false
    }

    /// Reads into `dst` as the poller (see the type's docs).
    pub(crate) fn poll_recv(&self, dst: &mut [MaybeUninit<u8>]) -> Poll<io::Result<usize>> {
        pending_if_blocked(self.read(dst, true))
    }

    /// Writes `bufs` as the poller.
    pub(crate) fn poll_send(&self, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        pending_if_blocked(self.write(bufs, true))
    }

    /// Shuts down the write side (a `NotConnected` peer is not an error), after TLS's
    /// `close_notify`.
    pub(crate) fn shutdown_write(&self) -> io::Result<()> {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(tls) = &self.tls {
            lock(tls).close(&mut self.raw(false));
        }
        match self.io.shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(any(feature = "tls", feature = "tls-ring"))]
impl Fd {
    /// Puts TLS on the socket: every read and write from now on goes through `conn`.
    pub(crate) fn start_tls(&mut self, conn: rustls::server::UnbufferedServerConnection) {
        self.tls = Some(Box::new(Mutex::new(Tls::new(conn))));
    }

    /// Gives back TLS's buffers that hold nothing (the connection is idle).
    pub(crate) fn release_tls_buffers(&self) {
        if let Some(tls) = &self.tls {
            lock(tls).release();
        }
    }

    /// A TLS handshake is under way.
    pub(crate) fn tls_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| lock(t).handshaking())
    }

    /// Drives the TLS handshake as the poller: `Ready(Ok(()))` once it is done (at once
    /// without TLS).
    pub(crate) fn poll_handshake(&self) -> Poll<io::Result<()>> {
        let Some(tls) = &self.tls else {
            return Poll::Ready(Ok(()));
        };
        match lock(tls).handshake(&mut self.raw(true)) {
            Ok(true) => Poll::Ready(Ok(())),
            Ok(false) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Records that the TLS handshake is done (the TLS gauge counts the connection from now
    /// until the descriptor is dropped).
    pub(crate) fn tls_established(&self) {
        #[cfg(feature = "metrics")]
        let _ = self
            .tls_open
            .get_or_init(|| crate::limits::Gauged::new(crate::observe::Open::Tls));
    }

    /// Whether ALPN agreed on `proto`.
    pub(crate) fn tls_alpn_is(&self, proto: &[u8]) -> bool {
        self.tls.as_ref().is_some_and(|t| lock(t).alpn_is(proto))
    }

    /// What the TLS handshake agreed on: `None` without TLS.
    pub(crate) fn tls_info(&self) -> Option<crate::tls::TlsInfo> {
        let tls = self.tls.as_ref()?;
        Some(lock(tls).info())
    }
}

#[cfg(any(feature = "tls", feature = "tls-ring"))]
impl Drop for Fd {
    /// Sends TLS's `close_notify` (if the socket takes it), however the connection closes.
    fn drop(&mut self) {
        if let Some(tls) = &self.tls {
            lock(tls).close(&mut self.raw(false));
        }
    }
}

#[cfg(any(feature = "tls", feature = "tls-ring"))]
fn lock(tls: &Mutex<Tls>) -> std::sync::MutexGuard<'_, Tls> {
    tls.lock().unwrap_or_else(|e| e.into_inner())
}

/// `WouldBlock` as `Pending`.
pub(super) fn pending_if_blocked(r: io::Result<usize>) -> Poll<io::Result<usize>> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        r => Poll::Ready(r),
    }
}

/// A socket's descriptor as a `Read` and `Write`. For the poller's own I/O (`local`), the
/// readiness flags are kept: an operation the flags say would block is not tried, and one that
/// ends in `WouldBlock` (or a short write) clears its flag until the next event.
struct Raw<'a> {
    fd: &'a Fd,
    local: bool,
}

impl Raw<'_> {
    fn recv(&mut self, dst: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        let fd = self.fd;
        if self.local && fd.nothing_came() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let r = fd.recv(dst);
        if self.local && matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            fd.readable.store(false, Ordering::Relaxed);
        }
        r
    }
}

#[cfg(any(feature = "tls", feature = "tls-ring"))]
impl super::tls::Transport for Raw<'_> {
    fn recv(&mut self, dst: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        Raw::recv(self, dst)
    }
}

impl io::Read for Raw<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout, and `recv` only writes
        // initialized bytes into it.
        let dst = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
        self.recv(dst)
    }
}

impl Write for Raw<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = self.fd;
        if self.local && !fd.writable.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let r = fd.send(bufs);
        if self.local {
            let full = match &r {
                Ok(n) => *n > 0 && *n < bufs.iter().map(|b| b.len()).sum::<usize>(),
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            };
            if full {
                // The send buffer is full; wait for the next edge.
                fd.writable.store(false, Ordering::Relaxed);
            }
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
