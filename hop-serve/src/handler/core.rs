//! The read-handler state machine both backends drive: read into the input buffer, call the
//! handler, take its letters (`super::mail`), flush its output, apply timeouts. The reactor
//! polls it in place with the connection's own waker (`conn::tcp`) and hands it the letters
//! from its poller's mailbox; the tokio backend polls it from one task per connection
//! ([`run_task`]), and it takes them from its own. It owns the handler's end: [`ConnCore::finish`] calls
//! `on_close` once, whoever closes the connection, and a core dropped without it (a panic
//! outside the handler, a task aborted at the drain deadline) calls it from its `Drop`.

use std::any::Any;
use std::future::poll_fn;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::mail::Home;
use super::{CloseClock, CloseReason, Conn, Handler, Protocol, TcpConfig};
use crate::limits::OpenGuard;
use crate::rt::mail::Letter;
use crate::rt::timer::Tick;

/// The byte stream under a read handler.
pub(crate) trait RawIo {
    /// Reads into `dst`, returning how many bytes were initialized.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut [MaybeUninit<u8>],
    ) -> Poll<io::Result<usize>>;
    /// Writes from `src`.
    fn poll_write(&mut self, cx: &mut Context<'_>, src: &[u8]) -> Poll<io::Result<usize>>;
    /// Sends what the stream itself still holds (TLS records), once all output was written.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Shuts the write side down.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// Any tokio stream (the tokio backend, and upgrades driven by a task).
pub(crate) struct TokioIo<T>(pub(crate) T);

impl<T: AsyncRead + AsyncWrite + Unpin> RawIo for TokioIo<T> {
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut [MaybeUninit<u8>],
    ) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::uninit(dst);
        std::task::ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(buf.filled().len()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, src: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, src)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// One read-handler connection: the handler, its [`Conn`], the unread input.
pub(crate) struct ConnCore {
    handler: Box<dyn Protocol>,
    pub(crate) conn: Conn,
    input: BytesMut,
    /// Bytes asked of the socket per read (`TcpConfig::read_chunk`).
    read_chunk: u32,
    opened: bool,
    /// `on_close` has been called (or the connection closed before it opened).
    closed: bool,
    eof: bool,
    write_shut: bool,
    shutdown_told: bool,
    /// Its poller has letters handed to it and a drive queued for this turn (`conn::tcp`):
    /// driven once however many it got.
    pub(crate) drive_queued: bool,
    /// When bytes were last read ([`Tick`]s: 8 bytes each, in every idle connection).
    last_read: Tick,
    last_active: Tick,
    /// Counts it open by kind (WebSocket, SSE, TCP) until it is dropped; `None` where no
    /// server counts it.
    pub(crate) open: Option<OpenGuard>,
}

impl ConnCore {
    pub(crate) fn new(
        handler: Box<dyn Protocol>,
        conn: Conn,
        input: BytesMut,
        cfg: Arc<TcpConfig>,
        now: Instant,
    ) -> Self {
        ConnCore {
            handler,
            conn,
            input,
            read_chunk: cfg.read_chunk.min(u32::MAX as usize) as u32,
            opened: false,
            closed: false,
            eof: false,
            write_shut: false,
            shutdown_told: false,
            drive_queued: false,
            last_read: Tick::of(now),
            last_active: Tick::of(now),
            open: None,
        }
    }

    /// Calls a handler method; an error or a panic becomes the reason to close.
    fn call(
        &mut self,
        f: impl FnOnce(&mut dyn Protocol, &mut Conn, &mut BytesMut) -> io::Result<()>,
    ) -> Result<(), CloseReason> {
        let ConnCore {
            handler,
            conn,
            input,
            ..
        } = self;
        match catch_unwind(AssertUnwindSafe(|| f(&mut **handler, conn, input))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CloseReason::Error(e)),
            Err(panic) => {
                let msg = crate::logs::panic_message(&*panic).to_owned();
                crate::logs::error_limited!(
                    panic = msg,
                    "read handler panicked; closing its connection"
                );
                Err(CloseReason::Error(io::Error::other(format!(
                    "handler panicked: {msg}"
                ))))
            }
        }
    }

    /// Does what a letter from its mailbox asks (the caller drives the connection after).
    pub(crate) fn take_letter(&mut self, letter: Letter) {
        match letter {
            // Bounded by the handle already: queued whatever the mark.
            Letter::Write(b) => self.conn.out.extend_from_slice(&b),
            Letter::Deliver(b) => {
                let _ = self.call(|h, c, _| {
                    h.on_deliver(c, b);
                    Ok(())
                });
            }
            Letter::Close => self.conn.closing = true,
            Letter::ShutdownWrite => self.conn.shutdown_requested = true,
        }
        if let Some(st) = &self.conn.handles {
            // Handles count these bytes here now, no longer in the mailbox.
            st.tell(self.conn.out.len(), self.conn.max_output);
        }
    }

    /// Tells the handler the server is shutting down (once).
    pub(crate) fn begin_shutdown(&mut self) {
        if !self.shutdown_told {
            self.shutdown_told = true;
            let _ = self.call(|h, c, _| {
                h.on_shutdown(c);
                Ok(())
            });
        }
    }

    /// Tells the handler the connection is gone (`on_close`, once: later calls do nothing, and
    /// a handler that never opened is not told) and refuses later handle writes. A panic in
    /// `on_close` is contained and handed back, for the driver to log and count.
    #[must_use = "a panic in on_close is to be counted"]
    pub(crate) fn finish(&mut self, reason: CloseReason) -> Option<Box<dyn Any + Send>> {
        if std::mem::replace(&mut self.closed, true) {
            return None;
        }
        #[cfg(feature = "metrics")]
        {
            use crate::observe::Reason;
            self.conn.why.get_or_insert(match &reason {
                CloseReason::Local | CloseReason::Peer => Reason::Closed,
                CloseReason::Timeout => Reason::IdleTimeout,
                CloseReason::Shutdown => Reason::Drain,
                CloseReason::Error(_) => Reason::Error,
            });
        }
        if let Some(st) = &self.conn.handles {
            st.closed();
        }
        if !self.opened {
            return None;
        }
        let handler = &mut self.handler;
        catch_unwind(AssertUnwindSafe(|| handler.on_close(reason))).err()
    }

    /// Why the connection closed, once [`finish`](Self::finish) was called (always `None`
    /// without the `metrics` feature).
    pub(crate) fn reason(&self) -> Option<crate::observe::Reason> {
        #[cfg(feature = "metrics")]
        return self.conn.why;
        #[cfg(not(feature = "metrics"))]
        None
    }

    /// [`finish`](Self::finish) for a connection its driver drops without a reason of its
    /// own (a panic outside the handler, an error of the poller's): `Shutdown` once the
    /// handler was told of a shutdown (a connection cut at the drain deadline), an error
    /// otherwise.
    #[must_use = "a panic in on_close is to be counted"]
    pub(crate) fn abandon(&mut self) -> Option<Box<dyn Any + Send>> {
        let reason = match self.shutdown_told {
            true => CloseReason::Shutdown,
            false => CloseReason::Error(io::Error::other("the connection was dropped")),
        };
        self.finish(reason)
    }

    /// When the read, idle and close timeouts run out (those that are set). Once the close
    /// clock runs, `last_read` is when it started, and the read timeout no longer applies.
    fn timeouts(&self) -> impl Iterator<Item = Instant> {
        let closing = self.conn.close_clock == CloseClock::Running;
        let read = self
            .conn
            .read_timeout
            .get()
            .filter(|_| !self.eof && !closing)
            .map(|t| crate::rt::timer::deadline(self.last_read.instant(), t));
        let idle = self
            .conn
            .idle_timeout
            .get()
            .map(|t| crate::rt::timer::deadline(self.last_active.instant(), t));
        let close = self
            .conn
            .close_timeout
            .get()
            .filter(|_| closing)
            .map(|t| crate::rt::timer::deadline(self.last_read.instant(), t));
        [read, idle, close].into_iter().flatten()
    }

    /// Starts the close clock if it was asked for.
    fn tick_close_clock(&mut self, now: Instant) {
        if self.conn.close_clock == CloseClock::Asked {
            self.conn.close_clock = CloseClock::Running;
            self.last_read = Tick::of(now);
        }
    }

    /// When the connection next needs a poll for time: a timeout or its timer.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timeouts().chain(self.conn.timer).min()
    }

    /// Takes the letters in the connection's own mailbox, if it has one (it runs as a task;
    /// on a poller, the poller hands them over), and has the drive's waker woken for the next.
    fn take_own_letters(&mut self, cx: &Context<'_>) {
        let Some(st) = &self.conn.handles else { return };
        let Home::Own(mb) = &st.home else { return };
        if !mb.read_with(cx.waker()) {
            return;
        }
        let mut letters = Vec::new();
        mb.take(&mut letters);
        // The handler runs without the mailbox locked: it may use a handle itself.
        for ((), letter) in letters {
            self.take_letter(letter);
        }
    }

    /// Drives the connection: `Ready` when it should close, and why.
    pub(crate) fn poll<I: RawIo>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
        now: Instant,
    ) -> Poll<CloseReason> {
        match self.poll_inner(cx, io, now) {
            Ok(()) => {
                // Tell handles how much is still queued here (for their bound) and, for an own
                // mailbox, whom to wake (a handle may have been made during this poll).
                if let Some(st) = &self.conn.handles {
                    st.tell(self.conn.out.len(), self.conn.max_output);
                    if let Home::Own(mb) = &st.home {
                        if mb.read_with(cx.waker()) {
                            // Posted before there was anyone to wake.
                            cx.waker().wake_by_ref();
                        }
                    }
                }
                Poll::Pending
            }
            Err(reason) => Poll::Ready(reason),
        }
    }

    fn poll_inner<I: RawIo>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
        now: Instant,
    ) -> Result<(), CloseReason> {
        if !self.opened {
            self.opened = true;
            self.call(|h, c, _| h.on_open(c))?;
            if !self.input.is_empty() {
                // Bytes that came with a hijacked request.
                self.call(|h, c, i| h.on_read(c, i))?;
            }
        }
        loop {
            self.take_own_letters(cx);
            // Flush queued output.
            while !self.conn.out.is_empty() {
                match io.poll_write(cx, &self.conn.out) {
                    Poll::Ready(Ok(0)) => return Err(CloseReason::Peer),
                    Poll::Ready(Ok(n)) => {
                        self.conn.out.advance(n);
                        self.last_active = Tick::of(now);
                    }
                    Poll::Ready(Err(e)) => return Err(peer_or_error(e)),
                    Poll::Pending => break,
                }
            }
            if self.conn.out.is_empty() {
                // Give the buffer back: an idle connection holds none.
                give_back(std::mem::take(&mut self.conn.out));
                if self.conn.want_writable {
                    self.conn.want_writable = false;
                    self.call(|h, c, _| h.on_writable(c))?;
                    if !self.input.is_empty() {
                        self.call(|h, c, i| h.on_read(c, i))?;
                    }
                    if !self.conn.out.is_empty() {
                        continue;
                    }
                }
                if self.conn.closing {
                    // Closed once the stream has sent what it holds too (TLS records); until
                    // then the close clock bounds the wait, as for queued output.
                    match io.poll_flush(cx) {
                        Poll::Ready(Ok(())) => return Err(CloseReason::Local),
                        Poll::Ready(Err(e)) => return Err(peer_or_error(e)),
                        Poll::Pending => {}
                    }
                }
                if self.conn.shutdown_requested && !self.write_shut {
                    // Retried on the next drive while the stream still sends what it holds.
                    match io.poll_shutdown(cx) {
                        Poll::Ready(Ok(())) => self.write_shut = true,
                        Poll::Ready(Err(e)) => return Err(peer_or_error(e)),
                        Poll::Pending => {}
                    }
                }
                if self.eof && self.write_shut {
                    return Err(CloseReason::Peer);
                }
            }
            if self.conn.closing {
                self.conn.start_close_clock();
                break;
            }
            if self.eof {
                break;
            }
            // Read what is there, up to the input bound.
            let mut got = false;
            while self.input.len() < self.conn.max_input {
                let want = (self.read_chunk as usize).min(self.conn.max_input - self.input.len());
                if self.input.capacity() == 0 {
                    self.input = take(want);
                }
                self.input.reserve(want);
                let spare = self.input.spare_capacity_mut();
                let len = spare.len().min(want);
                match io.poll_read(cx, &mut spare[..len]) {
                    Poll::Ready(Ok(0)) => {
                        self.eof = true;
                        break;
                    }
                    Poll::Ready(Ok(n)) => {
                        // SAFETY: `poll_read` initialized the first `n` spare bytes.
                        unsafe { self.input.set_len(self.input.len() + n) };
                        got = true;
                        if self.conn.close_clock != CloseClock::Running {
                            self.last_read = Tick::of(now);
                        }
                        self.last_active = Tick::of(now);
                    }
                    Poll::Ready(Err(e)) => return Err(peer_or_error(e)),
                    Poll::Pending => break,
                }
            }
            if got {
                self.call(|h, c, i| h.on_read(c, i))?;
            }
            if self.input.is_empty() {
                give_back(std::mem::take(&mut self.input));
            }
            if self.eof {
                self.call(|h, c, _| h.on_eof(c))?;
                continue;
            }
            // What the handler did with the input is acted on now: output to flush, or a
            // close or half-close it asked for (with nothing queued, a close completes at once).
            if got
                && (!self.conn.out.is_empty() || self.conn.closing || self.conn.shutdown_requested)
            {
                continue;
            }
            break;
        }
        if self.conn.timer.is_some_and(|t| now >= t) {
            self.conn.timer = None;
            self.call(|h, c, _| h.on_timer(c))?;
            if !self.conn.out.is_empty() || self.conn.closing {
                return self.poll_inner(cx, io, now);
            }
        }
        self.tick_close_clock(now);
        if self.timeouts().any(|due| now >= due) {
            if !self.conn.out.is_empty() {
                // Output the peer did not take: discard it, and have the kernel discard its
                // copy too (a reset), rather than keep either for a peer that is not reading.
                self.reset_on_close();
            }
            return Err(CloseReason::Timeout);
        }
        Ok(())
    }

    /// Makes the socket's close a reset (`SO_LINGER` 0): unsent bytes are dropped at once.
    fn reset_on_close(&self) {
        let Some(fd) = self.conn.fd else { return };
        // SAFETY: the connection owns the socket for as long as its core exists (the poller's
        // slab or the connection's task holds both), so the descriptor is open.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// Every way a connection ends runs `on_close`: here for those whose driver dropped them
/// without [`ConnCore::finish`].
impl Drop for ConnCore {
    fn drop(&mut self) {
        let Some(panic) = self.abandon() else { return };
        if std::thread::panicking() {
            tracing::error!(
                panic = crate::logs::panic_message(&*panic),
                "a read handler's on_close panicked while unwinding; contained"
            );
            return;
        }
        // The handler's own `Drop` runs now, under a guard: once the panic is on its way, a
        // second one from it would abort the process.
        let handler = std::mem::replace(&mut self.handler, Box::new(super::User(Gone)));
        if let Err(p) = catch_unwind(AssertUnwindSafe(move || drop(handler))) {
            tracing::error!(
                panic = crate::logs::panic_message(&*p),
                "a read handler's Drop panicked after its on_close did; contained"
            );
        }
        // Carried on to whoever drops the core (the poller's guard, or the task's join),
        // which logs and counts it.
        std::panic::resume_unwind(panic);
    }
}

/// What a core holds once its handler has been dropped.
struct Gone;

impl Handler for Gone {
    fn on_read(&mut self, _: &mut Conn, input: &mut BytesMut) -> io::Result<()> {
        input.clear();
        Ok(())
    }
}

thread_local! {
    /// Empty buffers this thread's connections gave back, lent to the next that needs one, so
    /// a busy connection does not allocate per message and an idle one holds none.
    static POOL: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers kept per thread.
const POOL_MAX: usize = 16;
/// Buffers larger than this go back to the allocator.
const POOL_BUF_MAX: usize = 256 * 1024;

/// A buffer with room for at least `want` bytes: a pooled one if there is one.
pub(crate) fn take(want: usize) -> BytesMut {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        match p.last() {
            Some(b) if b.capacity() >= want => p.pop(),
            _ => None,
        }
    })
    .unwrap_or_else(|| BytesMut::with_capacity(want))
}

/// Returns an emptied buffer to the pool (or the allocator).
fn give_back(mut buf: BytesMut) {
    buf.clear();
    let cap = buf.capacity();
    if (4096..=POOL_BUF_MAX).contains(&cap) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(buf);
            }
        });
    }
}

fn peer_or_error(e: io::Error) -> CloseReason {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::NotConnected => CloseReason::Peer,
        _ => CloseReason::Error(e),
    }
}

/// Runs a read-handler connection as one tokio task (the tokio backend, and hijacks that
/// happen off a poller).
pub(crate) async fn run_task<T>(
    mut core: ConnCore,
    io: T,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Option<crate::observe::Reason>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = TokioIo(io);
    let mut sleep: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let reason = loop {
        let told = core.shutdown_told;
        let driven = poll_fn(|cx| loop {
            if let Poll::Ready(reason) = core.poll(cx, &mut io, Instant::now()) {
                return Poll::Ready(reason);
            }
            match core.next_deadline() {
                Some(due) => {
                    let s =
                        sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due.into())));
                    if s.deadline() != due.into() {
                        s.as_mut().reset(due.into());
                    }
                    if s.as_mut().poll(cx).is_ready() {
                        continue;
                    }
                }
                None => sleep = None,
            }
            return Poll::Pending;
        });
        tokio::select! {
            reason = driven => break reason,
            _ = async { shutdown.wait_for(|v| *v).await.is_ok() }, if !told => {}
        }
        core.begin_shutdown();
    };
    let _ = poll_fn(|cx| io.poll_shutdown(cx)).await;
    if let Some(panic) = core.finish(reason) {
        // The task ends with it: counted where its join is (the tokio backend's connection
        // tasks, the poller's local tasks).
        std::panic::resume_unwind(panic);
    }
    core.reason()
}
