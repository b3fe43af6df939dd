//! The socket type hyper reads and writes: `hyper::rt::Read`/`Write` straight on a
//! non-blocking socket, a `mio::net::TcpStream` or a `mio::net::UnixStream` ([`StreamIo`]), or
//! through the rustls connection (`super::tls`) that a TLS listener's sockets carry in their
//! [`Fd`]: reads, writes and flushes all go through `Fd`, which picks the way.
//!
//! The socket itself lives in a [`Socket`], shared (by `Arc`) between the poller's slab and the
//! [`HopStream`] handed to hyper, so the poller keeps the socket when it drops hyper's state
//! (idle parking) and still owns the registration after an upgrade hands the stream to another
//! task.
//!
//! Two ways of being polled:
//! - by the poller itself (the task's waker is the connection's own): readiness is tracked in
//!   two flags, set by poller events and cleared on `WouldBlock`, so hyper's speculative read
//!   after each response costs no system call;
//! - by any other task (an upgraded connection driven by a tokio task): the task's waker is
//!   stored, the operation is retried once after storing it (so no readiness edge is lost), and
//!   the poller wakes the stored waker on the next event.

use std::io::{self, IoSlice, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use hyper::rt::ReadBufCursor;

#[cfg(any(feature = "tls", feature = "tls-ring"))]
use super::tls::Tls;
use crate::rt::wake::Key;

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
    fn read_would_block(&self) -> bool {
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
fn pending_if_blocked(r: io::Result<usize>) -> Poll<io::Result<usize>> {
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

/// An HTTP connection's socket: its descriptor and readiness (`Fd`), shared by the slab and
/// the [`HopStream`] hyper owns (and an upgrade's task after it), the wakers of such a task,
/// and the output hyper wrote during a drive.
#[derive(Debug)]
pub struct Socket {
    pub(crate) fd: Fd,
    read_waker: Mutex<Option<Waker>>,
    write_waker: Mutex<Option<Waker>>,
    /// A task other than the poller has stored a waker (so events have someone to wake).
    foreign: AtomicBool,
    /// Output hyper wrote during this drive, sent in one write when the drive ends.
    pending: Mutex<BytesMut>,
    /// `pending` holds bytes. Only the poller adds to it (other tasks send what it holds, then
    /// write straight to the socket), so the poller reads this without the lock, and a stale
    /// `true` elsewhere only costs taking the lock.
    has_pending: AtomicBool,
    /// HTTP/1.1: bytes hyper has read, and the last 8 of them (`service::read_tail`: whether
    /// they end a chunked body): the driver's request-body timeout watches them.
    read_bytes: AtomicU64,
    read_tail: AtomicU64,
    /// The connection's PROXY protocol header, if it came with one (`crate::proxy`).
    pub(crate) proxy: Option<crate::proxy::ProxyHeader>,
}

/// Above this much coalesced output, a write sends it before taking more.
const COALESCE_MAX: usize = 64 * 1024;

impl Socket {
    pub(crate) fn new(fd: Fd) -> Self {
        Socket {
            fd,
            read_waker: Mutex::new(None),
            write_waker: Mutex::new(None),
            foreign: AtomicBool::new(false),
            pending: Mutex::new(BytesMut::new()),
            has_pending: AtomicBool::new(false),
            read_bytes: AtomicU64::new(0),
            read_tail: AtomicU64::new(0),
            proxy: None,
        }
    }

    /// Records a readiness event ([`Fd::on_event`]) and wakes a foreign task waiting on it.
    pub(crate) fn on_event(&self, readable: bool, writable: bool, read_closed: bool) -> bool {
        let drive = self.fd.on_event(readable, writable, read_closed);
        if self.foreign.load(Ordering::SeqCst) {
            if readable {
                take_and_wake(&self.read_waker);
            }
            if writable {
                take_and_wake(&self.write_waker);
            }
        }
        drive
    }

    /// The descriptor, and what hyper wrote that is not sent yet: for a read handler taking
    /// the connection over (no one else holds the socket then).
    pub(crate) fn into_fd(self) -> (Fd, BytesMut) {
        let pending = self.pending.into_inner().unwrap_or_else(|e| e.into_inner());
        (self.fd, pending)
    }

    /// Bytes hyper's HTTP/1.1 connection has read from the socket.
    pub(crate) fn read_bytes(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }

    /// What was read so far ends with the last chunk of a chunked body (and no trailers), even
    /// if it came split over reads.
    pub(crate) fn chunked_end(&self) -> bool {
        crate::service::ends_chunked(self.read_tail.load(Ordering::Relaxed))
    }

    /// Records bytes read for hyper's HTTP/1.1 connection (see `read_bytes`).
    fn note_read(&self, read: &[u8]) {
        if read.is_empty() {
            return;
        }
        self.read_bytes
            .fetch_add(read.len() as u64, Ordering::Relaxed);
        let tail = self.read_tail.load(Ordering::Relaxed);
        self.read_tail
            .store(crate::service::read_tail(tail, read), Ordering::Relaxed);
    }

    /// Wakes any foreign task (on shutdown or close) so it observes the socket's state.
    pub(crate) fn wake_all(&self) {
        take_and_wake(&self.read_waker);
        take_and_wake(&self.write_waker);
    }
}

impl Socket {
    /// Reads into `dst`; `local` says the caller is the owning poller (see the module docs).
    pub(crate) fn poll_recv(
        &self,
        cx: &Context<'_>,
        local: bool,
        dst: &mut [MaybeUninit<u8>],
    ) -> Poll<io::Result<usize>> {
        if local {
            return self.fd.poll_recv(dst);
        }
        self.poll_foreign(cx, &self.read_waker, || self.fd.read(dst, false))
    }

    /// Writes `bufs`; `local` as for [`poll_recv`](Self::poll_recv).
    pub(crate) fn poll_send(
        &self,
        cx: &Context<'_>,
        local: bool,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if local {
            return self.fd.poll_send(bufs);
        }
        self.poll_foreign(cx, &self.write_waker, || self.fd.write(bufs, false))
    }

    /// Runs `op` (a read or a write) for a task other than the poller: on `WouldBlock` its
    /// waker is stored in `slot` and `op` is tried once more, so that no readiness edge between
    /// the two is lost.
    fn poll_foreign(
        &self,
        cx: &Context<'_>,
        slot: &Mutex<Option<Waker>>,
        mut op: impl FnMut() -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let mut retried = false;
        loop {
            match op() {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !retried => {
                    self.store_waker(slot, cx);
                    retried = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Sends coalesced output, then what TLS holds encrypted; `Ready` once none is left.
    pub(crate) fn poll_flush_pending(&self, cx: &Context<'_>, local: bool) -> Poll<io::Result<()>> {
        if self.has_pending.load(Ordering::Relaxed) {
            let mut out = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            ready!(self.flush_locked(&mut out, cx, local))?;
        }
        self.poll_flush_tls(cx, local)
    }

    /// Sends what TLS holds encrypted (nothing to do without TLS).
    fn poll_flush_tls(&self, cx: &Context<'_>, local: bool) -> Poll<io::Result<()>> {
        if !self.fd.has_output() {
            return Poll::Ready(Ok(()));
        }
        let flushed = |done: bool| match done {
            true => Ok(0),
            false => Err(io::Error::from(io::ErrorKind::WouldBlock)),
        };
        let sent = if local {
            pending_if_blocked(self.fd.flush(true).and_then(flushed))
        } else {
            self.poll_foreign(cx, &self.write_waker, || {
                self.fd.flush(false).and_then(flushed)
            })
        };
        sent.map_ok(|_| ())
    }

    fn flush_locked(
        &self,
        out: &mut BytesMut,
        cx: &Context<'_>,
        local: bool,
    ) -> Poll<io::Result<()>> {
        while !out.is_empty() {
            let n = ready!(self.poll_send(cx, local, &[IoSlice::new(out)]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n == out.len() {
                // All sent: the buffer starts over at its front (advancing to the end would
                // make the next append reclaim the space first).
                out.clear();
            } else {
                out.advance(n);
            }
        }
        self.has_pending.store(false, Ordering::Relaxed);
        if out.capacity() > 2 * COALESCE_MAX {
            *out = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Nothing coalesced, and nothing TLS encrypted, is waiting to be sent.
    pub(crate) fn nothing_pending(&self) -> bool {
        !self.has_pending.load(Ordering::Relaxed) && !self.fd.has_output()
    }

    /// Frees the coalescing buffer if it is empty (the connection is parking, or a read handler
    /// is taking the socket over).
    pub(crate) fn release_buffers(&self) {
        let mut out = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if out.is_empty() {
            *out = BytesMut::new();
        }
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        self.fd.release_tls_buffers();
    }
}

fn take_and_wake(slot: &Mutex<Option<Waker>>) {
    let w = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(w) = w {
        w.wake();
    }
}

impl Socket {
    /// Stores a foreign task's waker in `slot`, for the next event to wake.
    fn store_waker(&self, slot: &Mutex<Option<Waker>>, cx: &Context<'_>) {
        // Set before the waker is stored: an event that finds the flag clear has nothing to wake
        // yet, and the task retries its operation after storing (see `poll_recv`).
        self.foreign.store(true, Ordering::SeqCst);
        store_waker(slot, cx);
    }
}

fn store_waker(slot: &Mutex<Option<Waker>>, cx: &Context<'_>) {
    let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
    match &*s {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *s = Some(cx.waker().clone()),
    }
}

/// The stream hyper serves a connection over.
///
/// It is `Send`, so hyper upgrades work; after an upgrade it can be recovered with
/// `hyper::upgrade::Upgraded::downcast::<HopStream>()`.
#[derive(Debug)]
pub struct HopStream {
    /// Always `Some` until the stream is dropped: `Drop` lets go of it *before* waking the
    /// owner, which then sees the socket's last other user gone.
    socket: Option<Arc<Socket>>,
    /// Bytes read before this stream existed, returned first.
    prefix: Option<Bytes>,
    /// The owning connection's waker: polls with it are the poller's own.
    own: Waker,
    /// Wake the owner when dropped (off when the owner itself drops the stream).
    wake_on_drop: bool,
    /// Leave flushing to the end of the drive (`pipeline_flush`).
    coalesce: bool,
    /// The last write hyper offered was not taken whole: hyper's own write buffer holds the
    /// rest, which `into_parts` would drop (see [`HopStream::release`]).
    refused: bool,
    /// HTTP/2: what the connection's frames are watched for (control-frame floods, stalled
    /// request bodies), shared with the driver.
    meter: Option<Arc<Mutex<crate::http2::Meter>>>,
}

impl HopStream {
    pub(crate) fn new(
        socket: Arc<Socket>,
        key: Key,
        prefix: Option<Bytes>,
        coalesce: bool,
    ) -> Self {
        HopStream {
            socket: Some(socket),
            prefix: prefix.filter(|p| !p.is_empty()),
            own: key.waker(),
            wake_on_drop: true,
            coalesce,
            refused: false,
            meter: None,
        }
    }

    /// Puts `meter` between hyper's HTTP/2 connection and the socket: every byte read and
    /// written goes through it, and what it queues goes in at frame boundaries.
    pub(crate) fn with_meter(mut self, meter: Arc<Mutex<crate::http2::Meter>>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Queues what the meter has for the client with the coalesced output (the poller's own
    /// polls only: they are the ones that write for hyper's HTTP/2 connection).
    fn queue_metered(&self, m: &mut crate::http2::Meter) {
        if let Some(b) = m.to_write() {
            let n = b.len();
            let socket = self.socket();
            let mut out = socket.pending.lock().unwrap_or_else(|e| e.into_inner());
            out.extend_from_slice(b);
            socket.has_pending.store(true, Ordering::Relaxed);
            drop(out);
            m.wrote(n);
        }
    }

    /// Drops the stream without waking the owner, who is taking the socket back from hyper
    /// (`into_parts`, or an upgrade's `downcast`), and returns every byte read and not yet
    /// used: hyper's `read_buf`, then any prefix hyper never read.
    ///
    /// Two things about hyper are relied on here. `into_parts` drops hyper's write buffer, so
    /// it must be empty: hyper's write buffer holds bytes only after a write this stream did not
    /// take whole, and the driver takes the socket back only when nothing is waiting to be
    /// written. That is checked in release builds too: if a write was refused, bytes are lost,
    /// and the error says the connection must be closed rather than go on without them. And
    /// `into_parts` hands back this stream with whatever prefix hyper had not read yet, which is
    /// kept here rather than assumed empty.
    pub(crate) fn release(mut self, read_buf: Bytes) -> Result<Bytes, &'static str> {
        self.wake_on_drop = false;
        if self.refused {
            return Err("hyper's write buffer held bytes that taking the socket back dropped");
        }
        Ok(match self.prefix.take() {
            None => read_buf,
            Some(prefix) if read_buf.is_empty() => prefix,
            Some(prefix) => {
                let mut all = BytesMut::with_capacity(read_buf.len() + prefix.len());
                all.extend_from_slice(&read_buf);
                all.extend_from_slice(&prefix);
                all.freeze()
            }
        })
    }

    /// The shared socket.
    pub fn socket(&self) -> &Arc<Socket> {
        self.socket
            .as_ref()
            .expect("a HopStream holds its socket until dropped")
    }

    /// Whether this poll is the poller's own drive of the connection. An HTTP/2 connection's
    /// stream (it has a meter) is polled by nothing else (its streams' tasks never touch the
    /// socket), on whichever poller holds it now: it may have been handed to another since.
    fn local(&self, cx: &Context<'_>) -> bool {
        self.meter.is_some() || cx.waker().will_wake(&self.own)
    }
}

impl Drop for HopStream {
    fn drop(&mut self) {
        // Let the poller re-check the connection: after an upgrade this is how it learns that
        // the last user of the socket is gone. The socket is let go first, so that the poller,
        // on whatever thread, cannot look before it is gone.
        drop(self.socket.take());
        if self.wake_on_drop {
            self.own.wake_by_ref();
        }
    }
}

impl hyper::rt::Read for HopStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(prefix) = &mut self.prefix {
            // SAFETY: only initialized bytes are written into the cursor, and `advance` counts
            // exactly them.
            let n = unsafe {
                let dst = buf.as_mut();
                let n = prefix.len().min(dst.len());
                std::ptr::copy_nonoverlapping(prefix.as_ptr(), dst.as_mut_ptr().cast(), n);
                buf.advance(n);
                n
            };
            prefix.advance(n);
            if prefix.is_empty() {
                self.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        let local = self.local(cx);
        if local && self.meter.is_none() && self.socket().fd.read_would_block() {
            // hyper looks for the next request after each response: the common case, answered
            // without going down to `Raw::recv`, which would say the same.
            return Poll::Pending;
        }
        if let (Some(meter), true) = (&self.meter, local) {
            let mut m = crate::http2::lock(meter);
            // SAFETY: `take_to_read` initializes exactly the `n` bytes it reports, and only
            // those are advanced over.
            let n = unsafe { m.take_to_read(buf.as_mut()) };
            self.queue_metered(&mut m);
            if n > 0 {
                unsafe { buf.advance(n) };
                return Poll::Ready(Ok(()));
            }
        }
        // SAFETY: `poll_recv` initializes exactly the `n` bytes it reports, and only those are
        // advanced over.
        let n = unsafe {
            let dst = buf.as_mut();
            let n = ready!(self.socket().poll_recv(cx, local, &mut *dst))?;
            if let Some(meter) = &self.meter {
                let read = std::slice::from_raw_parts(dst.as_ptr().cast::<u8>(), n);
                let mut m = crate::http2::lock(meter);
                if m.on_read(read).is_err() {
                    tracing::debug!("HTTP/2 control-frame flood; closing with GOAWAY");
                    m.goaway();
                    if local {
                        self.queue_metered(&mut m);
                    }
                    return Poll::Ready(Err(crate::http2::flood()));
                }
            } else {
                let read = std::slice::from_raw_parts(dst.as_ptr().cast::<u8>(), n);
                self.socket().note_read(read);
            }
            n
        };
        // SAFETY: as above.
        unsafe { buf.advance(n) };
        Poll::Ready(Ok(()))
    }
}

impl HopStream {
    /// Coalesces up to `len` bytes, of which `append` copies the first `n` it is given (the
    /// poller's own polls), or writes them after anything already coalesced (any other task).
    ///
    /// The coalescing buffer never grows past [`COALESCE_MAX`]: a write that would take it
    /// further first sends what is there, then either goes straight to the socket (nothing is
    /// ahead of it and it is large: a big body is written from hyper's buffer, never copied) or
    /// takes only what fits, which hyper's write loop handles as any short write. Whether the
    /// write was taken whole is remembered (`refused`).
    fn poll_coalesce(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if let Some(meter) = &self.meter {
            let mut m = crate::http2::lock(meter);
            if self.local(cx) {
                self.queue_metered(&mut m);
            }
            let res = self.coalesce(cx, len, bufs);
            if let Poll::Ready(Ok(n)) = res {
                m.on_written(bufs, n);
            }
            self.refused = !matches!(res, Poll::Ready(Ok(n)) if n == len);
            return res;
        }
        let res = self.coalesce(cx, len, bufs);
        self.refused = !matches!(res, Poll::Ready(Ok(n)) if n == len);
        res
    }

    fn coalesce(
        &self,
        cx: &mut Context<'_>,
        len: usize,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let local = self.local(cx);
        let socket = self.socket();
        let mut out = socket.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !local {
            ready!(socket.flush_locked(&mut out, cx, false))?;
            drop(out);
            return socket.poll_send(cx, false, bufs);
        }
        if out.len() + len > COALESCE_MAX {
            if let Poll::Ready(Err(e)) = socket.flush_locked(&mut out, cx, true) {
                return Poll::Ready(Err(e));
            }
            if out.is_empty() && len >= COALESCE_MAX {
                drop(out);
                return socket.poll_send(cx, true, bufs);
            }
        }
        let room = COALESCE_MAX.saturating_sub(out.len());
        if room == 0 {
            return Poll::Pending;
        }
        let n = len.min(room);
        out.reserve(n);
        let mut left = n;
        for b in bufs {
            let take = b.len().min(left);
            out.extend_from_slice(&b[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        socket.has_pending.store(true, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }
}

/// Writes from the poller are coalesced (at most 64 KiB; a larger write goes straight out) and
/// sent once per drive; `poll_flush` leaves that to the end of the drive, so pipelined responses
/// share one write. (Sending a drive's first write at once would save a keep-alive response its
/// copy, about 200 instructions, but cost pipelined requests a second `send` per batch: some
/// 20% of their req/s.) Writes from any other task (after an upgrade) go straight out, after what
/// was coalesced.
impl hyper::rt::Write for HopStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_coalesce(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_coalesce(cx, bufs)
    }

    /// Vectored, so that hyper queues a response body's chunks instead of copying them into its
    /// own buffer (its "flatten" strategy, which `is_write_vectored() == false` or hyper's
    /// `pipeline_flush` choose, copies a chunk whole: each of 500 readers that stop reading a
    /// shared 10 MB body held its own 10 MB copy, `reliability::slow_readers_of_a_large_body_*`).
    /// Flattening costs about 480 fewer instructions per small keep-alive response (callgrind),
    /// which is not worth that.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let local = self.local(cx);
        if local && self.coalesce {
            // The driver sends coalesced output when this drive ends.
            return Poll::Ready(Ok(()));
        }
        self.socket().poll_flush_pending(cx, local)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let local = self.local(cx);
        ready!(self.socket().poll_flush_pending(cx, local))?;
        Poll::Ready(self.socket().fd.shutdown_write())
    }
}
