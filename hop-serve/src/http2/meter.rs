//! The [`Meter`] that watches an HTTP/2 connection's frames both ways, between hyper and the
//! socket: the control-frame budget whose overrun is a [`Flood`] (closed with GOAWAY
//! ENHANCE_YOUR_CALM), the request bodies handlers wait for and their stalls ([`Stall`]: reset
//! with RST_STREAM CANCEL both ways, or the connection closed), and the frames it puts in for
//! hyper and for the client at frame boundaries.

use std::time::{Duration, Instant};

use super::frames::{
    push_frame, set_stream, Frames, CANCEL, CONTINUATION, DATA, END_STREAM, ENHANCE_YOUR_CALM,
    GOAWAY, HEADERS, PING, PRIORITY, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
};
use super::preface::PREFACE;

/// The most control-frame credit a connection holds: a client may send this many control frames
/// (PING, SETTINGS, WINDOW_UPDATE, PRIORITY, RST_STREAM, empty DATA, unknown types) in a burst.
const CREDIT_MAX: i64 = 10_000;
/// Credit earned by a request (a HEADERS frame) and by a DATA frame with a payload.
const EARN_HEADERS: i64 = 100;
const EARN_DATA: i64 = 10;
/// Credit earned per this many bytes written to the client: a client that reads a large
/// response sends WINDOW_UPDATEs for it (h2's client one per half window, Go's one per 4 KiB
/// or so, each for the stream and the connection).
const WRITTEN_PER_CREDIT: u64 = 512;
/// Credit earned per millisecond: a thousand control frames a second are never a flood.
const CREDIT_PER_MS: i64 = 1;
/// Most request bodies watched per connection (hyper refuses streams over
/// `http2_max_concurrent_streams` anyway).
const MAX_WATCHED: usize = 1024;

/// A request body being waited for: its stream, how much the client may still send on it, and
/// since when it has sent nothing while it could; `claimed` once the service has been called
/// for it (hyper calls it in the order the streams opened, see [`Meter::claim`]).
struct Waiting {
    stream: u32,
    window: i64,
    since: Instant,
    claimed: bool,
}

/// What [`Meter::expire`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stall {
    /// Nothing is due.
    None,
    /// Stalled streams were reset: the connection should be polled again.
    Reset,
    /// A client stalled in the middle of a frame: the connection should be closed.
    Close,
}

/// What an HTTP/2 connection's socket sees of its frames, both ways: a control-frame budget
/// (a flood of frames that cost the server work and ask nothing of the handlers closes the
/// connection, with GOAWAY ENHANCE_YOUR_CALM when it can be put between two frames), and the
/// request bodies the handlers wait for (one that brings nothing for `request_body_timeout`
/// while its client may send is reset: RST_STREAM CANCEL "from the client" for h2, so the
/// handler's read fails, and RST_STREAM CANCEL to the client).
///
/// Both backends put it between hyper and the socket: the reactor in its `HopStream`, the tokio
/// backend in [`Metered`](super::Metered). Each read is fed to [`Meter::on_read`] and each
/// write to [`Meter::on_written`]; what the meter puts in is taken only at frame boundaries.
pub(crate) struct Meter {
    input: Frames,
    output: Frames,
    credit: i64,
    refilled: Instant,
    written: u64,
    written_paid: u64,
    /// The highest stream the client opened (GOAWAY's last stream).
    last_stream: u32,
    body_timeout: Option<Duration>,
    /// The window a new stream gives the client (`http2_initial_stream_window_size`).
    stream_window: i64,
    /// The connection's window (h2 raises it from the protocol's 65,535 by a WINDOW_UPDATE).
    conn_window: i64,
    waiting: Vec<Waiting>,
    /// Frames for hyper to read, next at a frame boundary (RST_STREAMs "from the client").
    to_read: Vec<u8>,
    /// Frames for the client, next at a frame boundary.
    to_write: Vec<u8>,
    /// Woken when a body starts to be waited for (the tokio backend's watch).
    watch: Option<std::task::Waker>,
    /// When the client last sent anything: a stall is only acted on at a frame boundary, and a
    /// client in the middle of a frame is given until this plus the timeout to finish it.
    last_read: Instant,
    /// A CONNECT stream (a WebSocket or a tunnel) was opened: it lives on outside hyper's
    /// stream tasks, where the connection cannot see when it ends, so the connection stays on
    /// its poller from then on ([`Meter::has_tunnel`]).
    tunnel: bool,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("credit", &self.credit)
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

/// A connection sent more control frames than its budget.
#[derive(Debug)]
pub(crate) struct Flood;

impl Meter {
    pub(crate) fn new(cfg: &crate::settings::Http2Config, body_timeout: Option<Duration>) -> Self {
        Meter {
            input: Frames {
                preface: PREFACE.len() as u8,
                ..Frames::default()
            },
            output: Frames::default(),
            credit: CREDIT_MAX,
            refilled: Instant::now(),
            written: 0,
            written_paid: 0,
            last_stream: 0,
            body_timeout,
            stream_window: i64::from(cfg.initial_stream_window_size),
            conn_window: 65_535,
            waiting: Vec::new(),
            to_read: Vec::new(),
            to_write: Vec::new(),
            watch: None,
            last_read: Instant::now(),
            tunnel: false,
        }
    }

    /// The service was called for a request whose body is still to come: the oldest stream
    /// watched and not yet claimed is its stream. A CONNECT (a WebSocket or a tunnel over
    /// HTTP/2) is no request body but a stream of its own protocol, quiet for as long as it
    /// likes: it is no longer watched.
    pub(crate) fn claim(&mut self, connect: bool) {
        self.tunnel |= connect;
        let Some(i) = self.waiting.iter().position(|w| !w.claimed) else {
            return;
        };
        if connect {
            self.waiting.remove(i);
        } else {
            self.waiting[i].claimed = true;
        }
    }

    /// Whether a CONNECT stream was ever opened on the connection (see `tunnel`).
    pub(crate) fn has_tunnel(&self) -> bool {
        self.tunnel
    }

    /// Accounts for `data`, just read from the client; `Err` once the client has flooded.
    pub(crate) fn on_read(&mut self, data: &[u8]) -> Result<(), Flood> {
        let mut cost = 0i64;
        let mut earned = 0i64;
        let watch = self.body_timeout.is_some();
        let Meter {
            input,
            waiting,
            last_stream,
            stream_window,
            conn_window,
            ..
        } = self;
        let mut started = false;
        let now = Instant::now();
        if !data.is_empty() {
            self.last_read = now;
        }
        let mut ended: Vec<u32> = Vec::new();
        input.feed(
            data,
            |h| match h.kind {
                HEADERS => {
                    earned += EARN_HEADERS;
                    if h.stream % 2 == 1 {
                        *last_stream = (*last_stream).max(h.stream);
                    }
                    let at = waiting.iter().position(|w| w.stream == h.stream);
                    match (h.flags & END_STREAM != 0, at) {
                        (true, Some(i)) => {
                            waiting.remove(i);
                        }
                        (false, None) if watch && waiting.len() < MAX_WATCHED => {
                            waiting.push(Waiting {
                                stream: h.stream,
                                window: *stream_window,
                                since: now,
                                claimed: false,
                            });
                            started = true;
                        }
                        _ => {}
                    }
                }
                DATA => {
                    if h.len > 0 {
                        earned += EARN_DATA;
                    } else {
                        cost += 1;
                    }
                    *conn_window -= i64::from(h.len);
                    if let Some(i) = waiting.iter().position(|w| w.stream == h.stream) {
                        if h.flags & END_STREAM != 0 {
                            waiting.remove(i);
                        } else {
                            waiting[i].window -= i64::from(h.len);
                            waiting[i].since = now;
                        }
                    }
                }
                RST_STREAM => {
                    cost += 1;
                    if let Some(i) = waiting.iter().position(|w| w.stream == h.stream) {
                        waiting.remove(i);
                    }
                }
                CONTINUATION | GOAWAY | PUSH_PROMISE => {}
                PRIORITY | SETTINGS | PING | WINDOW_UPDATE => cost += 1,
                // Unknown types, which h2 reads and drops.
                _ => cost += 1,
            },
            // A frame's payload that arrives slowly is progress too, for its stream.
            |h, _| {
                if h.kind == DATA && h.len > 0 {
                    ended.push(h.stream);
                }
            },
        );
        for stream in ended {
            if let Some(w) = self.waiting.iter_mut().find(|w| w.stream == stream) {
                w.since = now;
            }
        }
        if started {
            if let Some(w) = self.watch.take() {
                w.wake();
            }
        }
        self.credit = (self.credit + earned).min(CREDIT_MAX) - cost;
        if self.credit < 0 {
            self.refill();
            if self.credit < 0 {
                return Err(Flood);
            }
        }
        Ok(())
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let ms = now.saturating_duration_since(self.refilled).as_millis();
        let by_time = i64::try_from(ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(CREDIT_PER_MS);
        let by_written = (self.written - self.written_paid) / WRITTEN_PER_CREDIT;
        self.written_paid += by_written * WRITTEN_PER_CREDIT;
        let by_written = i64::try_from(by_written).unwrap_or(i64::MAX);
        self.credit = self
            .credit
            .saturating_add(by_time)
            .saturating_add(by_written)
            .min(CREDIT_MAX);
        self.refilled = now;
    }

    /// Accounts for the first `n` bytes of `bufs`, just written for hyper.
    pub(crate) fn on_written(&mut self, bufs: &[std::io::IoSlice<'_>], n: usize) {
        self.written += n as u64;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = b.len().min(left);
            left -= take;
            self.written_out(&b[..take]);
        }
    }

    fn written_out(&mut self, data: &[u8]) {
        let Meter {
            output,
            waiting,
            conn_window,
            ..
        } = self;
        let mut opened = false;
        output.feed(
            data,
            |_| {},
            |h, first| match h.kind {
                WINDOW_UPDATE if h.len == 4 => {
                    let inc = i64::from(u32::from_be_bytes(first) & 0x7fff_ffff);
                    let now = Instant::now();
                    if h.stream == 0 {
                        opened |= *conn_window <= 0;
                        *conn_window += inc;
                        // A client held back by the connection's window waited for the server.
                        for w in waiting.iter_mut() {
                            w.since = now;
                        }
                    } else if let Some(w) = waiting.iter_mut().find(|w| w.stream == h.stream) {
                        opened |= w.window <= 0;
                        w.window += inc;
                        w.since = now;
                    }
                }
                RST_STREAM => {
                    if let Some(i) = waiting.iter().position(|w| w.stream == h.stream) {
                        waiting.remove(i);
                    }
                }
                _ => {}
            },
        );
        if opened {
            if let Some(w) = self.watch.take() {
                w.wake();
            }
        }
    }

    /// The GOAWAY (ENHANCE_YOUR_CALM) for a flood, queued for the client.
    pub(crate) fn goaway(&mut self) {
        let mut payload = [0u8; 8];
        payload[..4].copy_from_slice(&self.last_stream.to_be_bytes());
        payload[4..].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        push_frame(&mut self.to_write, GOAWAY, 0, &payload);
    }

    /// When the next request body falls due, if any is being waited for while its client may
    /// send.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let limit = self.body_timeout?;
        if self.conn_window <= 0 {
            return None;
        }
        let due = self
            .waiting
            .iter()
            .filter(|w| w.window > 0)
            .filter_map(|w| w.since.checked_add(limit))
            .min()?;
        if self.input.at_boundary() {
            return Some(due);
        }
        // In the middle of a frame: at the earliest once the client has been silent that long.
        Some(due.max(self.last_read.checked_add(limit)?))
    }

    /// Resets the request bodies due at `now` (see [`Stall`]).
    pub(crate) fn expire(&mut self, now: Instant) -> Stall {
        let Some(limit) = self.body_timeout else {
            return Stall::None;
        };
        if self.conn_window <= 0 {
            return Stall::None;
        }
        let due =
            |w: &Waiting| w.window > 0 && w.since.checked_add(limit).is_some_and(|d| d <= now);
        if !self.waiting.iter().any(due) {
            return Stall::None;
        }
        if !self.input.at_boundary() {
            // A reset cannot be put inside a frame: wait for its end while the client sends;
            // one silent in the middle of a frame for the whole limit is closed.
            let silent = self.last_read.checked_add(limit).is_some_and(|d| d <= now);
            return if silent { Stall::Close } else { Stall::None };
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if due(&self.waiting[i]) {
                let stream = self.waiting.remove(i).stream;
                tracing::debug!(stream, "HTTP/2 request body stalled; resetting its stream");
                let code = CANCEL.to_be_bytes();
                push_frame(&mut self.to_read, RST_STREAM, 0, &code);
                set_stream(&mut self.to_read, stream);
                push_frame(&mut self.to_write, RST_STREAM, 0, &code);
                set_stream(&mut self.to_write, stream);
            } else {
                i += 1;
            }
        }
        Stall::Reset
    }

    /// Asks for `waker` to be woken when a body starts being waited for while none is due.
    pub(crate) fn watch(&mut self, waker: &std::task::Waker) {
        match &self.watch {
            Some(w) if w.will_wake(waker) => {}
            _ => self.watch = Some(waker.clone()),
        }
    }

    /// Frames to hand hyper before anything more from the client, if the input is at a frame
    /// boundary: moved into `dst` (as much as fits); how many bytes.
    pub(crate) fn take_to_read(&mut self, dst: &mut [std::mem::MaybeUninit<u8>]) -> usize {
        if self.to_read.is_empty() || !self.input.at_boundary() {
            return 0;
        }
        let n = self.to_read.len().min(dst.len());
        for (d, s) in dst.iter_mut().zip(self.to_read.drain(..n)) {
            d.write(s);
        }
        n
    }

    /// Frames to send the client before anything more from hyper, if the output is at a frame
    /// boundary.
    pub(crate) fn to_write(&self) -> Option<&[u8]> {
        (!self.to_write.is_empty() && self.output.at_boundary()).then_some(&self.to_write[..])
    }

    /// `n` bytes of [`to_write`](Self::to_write) were sent.
    pub(crate) fn wrote(&mut self, n: usize) {
        self.to_write.drain(..n.min(self.to_write.len()));
    }
}

/// Locks a connection's [`Meter`] (a panic while it was held leaves it usable).
pub(crate) fn lock(meter: &std::sync::Mutex<Meter>) -> std::sync::MutexGuard<'_, Meter> {
    meter.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error a flooding connection's read ends with.
pub(crate) fn flood() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "HTTP/2 control-frame flood",
    )
}
