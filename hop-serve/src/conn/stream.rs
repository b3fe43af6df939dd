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
//!
//! The descriptor and its raw I/O, readiness flags included, are [`Fd`] (`super::fd`); this
//! file is what hyper and an upgrade's task see of it: the shared [`Socket`], its wakers and
//! write coalescing, and the [`HopStream`] over it.
//!
//! [`StreamIo`]: super::fd::StreamIo

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use hyper::rt::ReadBufCursor;

use super::fd::{pending_if_blocked, Fd};
use crate::rt::wake::Key;

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
