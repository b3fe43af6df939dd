//! permessage-deflate's negotiation (the client's offers, the answer) and each connection's
//! [`Codec`], over the thread's zlib streams (see the room's docs); built with the `deflate`
//! feature.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use http::{header, HeaderMap, HeaderValue};

use super::{Deflate, InflateError};

/// One permessage-deflate offer's parameters.
#[derive(Debug, Default, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value.
    client_max_window_bits: Option<Option<u8>>,
}

/// A window-bits value: 8 to 15, digits only.
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) || v.starts_with('0') {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// Parses one offer's parameters; `None` if any is unknown, repeated or has a bad value
/// (RFC 7692 §5: such an offer is declined).
fn parse_offer<'a>(params: impl Iterator<Item = &'a str>) -> Option<Offer> {
    let mut o = Offer::default();
    for p in params {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p.trim(), None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) if !o.server_no_context_takeover => {
                o.server_no_context_takeover = true
            }
            ("client_no_context_takeover", None) if !o.client_no_context_takeover => {
                o.client_no_context_takeover = true
            }
            ("server_max_window_bits", Some(v)) if o.server_max_window_bits.is_none() => {
                o.server_max_window_bits = Some(window_bits(v)?)
            }
            ("client_max_window_bits", v) if o.client_max_window_bits.is_none() => {
                o.client_max_window_bits = Some(match v {
                    Some(v) => Some(window_bits(v)?),
                    None => None,
                })
            }
            _ => return None,
        }
    }
    Some(o)
}

/// What both sides agreed to.
#[derive(Debug, Clone, Copy)]
struct Agreed {
    level: u8,
    /// The window the server compresses with (8 to 15).
    server_bits: u8,
    /// The server may refer to earlier messages: how much of them, at most.
    history: usize,
    history_idle: Duration,
    threshold: usize,
    /// The client may refer to earlier messages: keep a decompressor.
    client_takeover: bool,
}

/// Accepts the first acceptable permessage-deflate offer in `headers`, in the client's order:
/// the connection's codec and the `Sec-WebSocket-Extensions` value to answer with. `None`
/// declines them all (the WebSocket then runs uncompressed).
pub(crate) fn negotiate(cfg: &Deflate, headers: &HeaderMap) -> Option<(Codec, HeaderValue)> {
    if !cfg.enabled {
        return None;
    }
    let offers = headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for ext in offers {
        let mut parts = ext.split(';');
        let name = parts.next().unwrap_or("").trim();
        if !name.eq_ignore_ascii_case("permessage-deflate") {
            continue;
        }
        let Some(offer) = parse_offer(parts.filter(|p| !p.trim().is_empty())) else {
            continue;
        };
        if let Some(accepted) = accept(cfg, &offer) {
            return Some(accepted);
        }
    }
    None
}

fn accept(cfg: &Deflate, offer: &Offer) -> Option<(Codec, HeaderValue)> {
    let mut answer = String::from("permessage-deflate");
    let server_nct = offer.server_no_context_takeover || cfg.server_no_context_takeover;
    if server_nct {
        answer.push_str("; server_no_context_takeover");
    }
    let client_nct = cfg.client_no_context_takeover;
    if client_nct {
        answer.push_str("; client_no_context_takeover");
    }
    let server_bits = cfg
        .server_max_window_bits
        .clamp(8, 15)
        .min(offer.server_max_window_bits.unwrap_or(15));
    if offer.server_max_window_bits.is_some() {
        answer.push_str(&format!("; server_max_window_bits={server_bits}"));
    }
    let client_takeover = !(client_nct || offer.client_no_context_takeover);
    let client_bits = cfg.client_max_window_bits.clamp(8, 15);
    match offer.client_max_window_bits {
        Some(offered) => {
            let bits = client_bits.min(offered.unwrap_or(15));
            if bits < 15 {
                answer.push_str(&format!("; client_max_window_bits={bits}"));
            }
        }
        // The client will use a 15-bit window; that matters only if it keeps context.
        None if client_bits < 15 && client_takeover => return None,
        None => {}
    }
    let agreed = Agreed {
        level: cfg.level.min(9) as u8,
        server_bits,
        history: match server_nct {
            true => 0,
            false => cfg.history.min(1 << server_bits),
        },
        history_idle: cfg.history_idle,
        threshold: cfg.threshold,
        client_takeover,
    };
    let value = HeaderValue::from_str(&answer).expect("the answer is ASCII");
    Some((Codec::new(agreed), value))
}

/// The empty stored block that ends every compressed message, removed by the sender
/// (RFC 7692 §7.2.1) and put back by the receiver.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// One connection's permessage-deflate state: the agreed parameters, the server's history
/// while it sends, and a decompressor only if the client keeps context.
pub(crate) struct Codec {
    agreed: Agreed,
    id: u64,
    /// Messages compressed so far.
    sent: u64,
    /// The last compressed messages' bytes, at most `agreed.history` (none when released).
    history: Option<History>,
    inflater: Option<Box<Decompress>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("agreed", &self.agreed)
            .field("history", &self.history.as_ref().map_or(0, |h| h.len))
            .finish()
    }
}

/// A thread's zlib streams, lent to one message at a time.
#[derive(Default)]
struct Scratch {
    /// Keyed by level and window bits (a compressor's window is fixed when it is made).
    compressors: Vec<Slot>,
    decompressor: Option<Decompress>,
}

/// One of a thread's compressors, and whose stream it holds.
struct Slot {
    level: u8,
    bits: u8,
    c: Compress,
    /// The connection ([`Codec::id`]) whose last message ([`Codec::sent`]) it compressed, if
    /// that connection keeps context.
    owner: Option<(u64, u64)>,
}

/// Tells connections apart in [`Slot::owner`].
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Codec {
    fn new(agreed: Agreed) -> Self {
        Codec {
            agreed,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            sent: 0,
            history: None,
            inflater: None,
        }
    }

    /// Whether a message of `len` bytes is sent compressed.
    pub(crate) fn compresses(&self, len: usize) -> bool {
        len >= self.agreed.threshold
    }

    /// Compresses one message (RFC 7692 §7.2.1: the DEFLATE data with its closing empty
    /// block's four bytes removed). `Some(delay)` when the history was just started: the
    /// connection's timer should fire then, to release it once idle
    /// ([`release_if_idle`](Self::release_if_idle)).
    pub(crate) fn compress(&mut self, data: &[u8]) -> (Vec<u8>, Option<Duration>) {
        let a = self.agreed;
        // zlib has no 8-bit window for raw deflate; a 9-bit one never reaches back 256 bytes.
        let bits = a.server_bits.max(9);
        let mut out = Vec::with_capacity(data.len() / 2 + 64);
        let keeps = a.history > 0;
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let slot = s.compressor(a.level, bits);
            let mine = Some((self.id, self.sent));
            // The thread's compressor still holds this connection's stream, just as it left it
            // (no other message came between): go on with it, which is what full context
            // takeover does, at no cost. Otherwise start afresh from the history.
            if !(keeps && self.history.is_some() && slot.owner == mine) {
                slot.c.reset();
                if let Some(h) = self.history.as_ref().filter(|h| h.len > 0) {
                    // Only fails for a stream already started, and this one was just reset.
                    let _ = slot.c.set_dictionary(h.bytes());
                }
            }
            deflate_all(&mut slot.c, data, &mut out);
            self.sent += 1;
            slot.owner = keeps.then_some((self.id, self.sent));
        });
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        let mut arm = None;
        if a.history > 0 {
            if self.history.is_none() {
                // Without memory for it, messages are compressed alone.
                self.history = History::new(a.history);
                arm = self.history.is_some().then_some(a.history_idle);
            }
            if let Some(h) = &mut self.history {
                h.remember(data);
                h.last_sent = Instant::now();
            }
        }
        (out, arm)
    }

    /// Drops the history if nothing compressed was sent for `history_idle`; otherwise says
    /// when to look again.
    pub(crate) fn release_if_idle(&mut self) -> Option<Duration> {
        let idle = self.history.as_ref()?.last_sent.elapsed();
        if idle >= self.agreed.history_idle {
            self.history = None;
            return None;
        }
        Some(self.agreed.history_idle - idle)
    }

    /// Inflates one compressed message, stopping as soon as it would pass `max` bytes.
    pub(crate) fn decompress(&mut self, data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
        if self.agreed.client_takeover {
            let d = self
                .inflater
                .get_or_insert_with(|| Box::new(Decompress::new(false)));
            return inflate_all(d, data, max);
        }
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let d = s.decompressor.get_or_insert_with(|| Decompress::new(false));
            d.reset(false);
            inflate_all(d, data, max)
        })
    }
}

/// The last bytes a connection sent compressed, in pages mapped for it alone: dropping it
/// gives them back to the kernel at once. (A heap block of a few KiB would go back to the
/// allocator, which keeps it: the process's memory would not shrink when idle connections
/// release their history.)
struct History {
    pages: std::ptr::NonNull<u8>,
    /// Bytes mapped: the history's size rounded up to whole pages.
    mapped: usize,
    /// The history's size.
    cap: usize,
    len: usize,
    /// When the last compressed message was sent.
    last_sent: Instant,
}

// SAFETY: the mapping belongs to this value alone (nothing else has its address), so it can
// move between threads with it.
unsafe impl Send for History {}

impl History {
    /// `None` if the kernel refuses the mapping.
    fn new(cap: usize) -> Option<History> {
        let page = 4096;
        let mapped = cap.div_ceil(page) * page;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(History {
            pages: std::ptr::NonNull::new(p.cast())?,
            mapped,
            cap,
            len: 0,
            last_sent: Instant::now(),
        })
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: `pages` is a live read-write mapping of `mapped` >= `cap` bytes that only
        // this value reaches, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_ptr(), self.cap) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: as in `buf`; the first `len` bytes were written by `remember`.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr(), self.len) }
    }

    /// Keeps the last `cap` bytes of what was sent, `data` last.
    fn remember(&mut self, data: &[u8]) {
        let (cap, len) = (self.cap, self.len);
        let buf = self.buf();
        if data.len() >= cap {
            buf.copy_from_slice(&data[data.len() - cap..]);
            self.len = cap;
            return;
        }
        let keep = len.min(cap - data.len());
        buf.copy_within(len - keep..len, 0);
        buf[keep..keep + data.len()].copy_from_slice(data);
        self.len = keep + data.len();
    }
}

impl Drop for History {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing uses afterwards.
        unsafe {
            libc::munmap(self.pages.as_ptr().cast(), self.mapped);
        }
    }
}

impl Scratch {
    fn compressor(&mut self, level: u8, bits: u8) -> &mut Slot {
        let i = match self
            .compressors
            .iter()
            .position(|s| (s.level, s.bits) == (level, bits))
        {
            Some(i) => i,
            None => {
                let c = Compress::new_with_window_bits(Compression::new(level.into()), false, bits);
                self.compressors.push(Slot {
                    level,
                    bits,
                    c,
                    owner: None,
                });
                self.compressors.len() - 1
            }
        };
        &mut self.compressors[i]
    }
}

/// Compresses all of `data` with a sync flush, growing `out` as needed.
fn deflate_all(c: &mut Compress, data: &[u8], out: &mut Vec<u8>) {
    let start = c.total_in();
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.len().max(256));
        }
        let done = (c.total_in() - start) as usize;
        // Raw deflate into spare capacity cannot fail: the stream is valid and flushed.
        let _ = c.compress_vec(&data[done..], out, FlushCompress::Sync);
        // With room left after a sync flush, everything is out.
        if (c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            return;
        }
    }
}

/// Inflates `data` and the closing empty block into a buffer that never grows past `max + 1`
/// (any `max`: the arithmetic saturates).
fn inflate_all(d: &mut Decompress, data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    let limit = max.saturating_add(1);
    let mut out = Vec::with_capacity(data.len().saturating_mul(3).max(64).min(limit));
    for input in [data, &TAIL[..]] {
        let start = d.total_in();
        loop {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(InflateError::TooLarge);
                }
                let room = (limit - out.len()).min(out.len().max(4096));
                out.reserve_exact(room);
            }
            let done = (d.total_in() - start) as usize;
            let before = (d.total_in(), d.total_out());
            let status = d
                .decompress_vec(&input[done..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            if out.len() > max {
                return Err(InflateError::TooLarge);
            }
            if status == Status::StreamEnd {
                // A final block ended the stream: the next message starts a new one.
                d.reset(false);
                return Ok(out);
            }
            let consumed = (d.total_in() - start) as usize == input.len();
            if consumed && out.len() < out.capacity() {
                break;
            }
            if (d.total_in(), d.total_out()) == before && out.len() < out.capacity() {
                // No progress with room to spare: the input is cut short.
                return Err(InflateError::Invalid);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
