//! A TLS connection's buffers ([`Bufs`]: the input read and not yet taken by rustls, the
//! decrypted bytes a read had no room for, the encrypted output not yet sent), their bounds,
//! the outgoing buffer borrowed apart for rustls to encode into ([`Out`]), and the short
//! per-thread list of spare buffers that idle connections gave back (`take_spare`,
//! `give_back`), so that a parked connection's wake allocates none.

use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Bytes of encrypted output held for a connection (records not yet sent): a write beyond it
/// waits for the socket.
pub(super) const BUFFER_LIMIT: usize = 64 * 1024;
/// Most bytes of encrypted output held at all: what writes leave (at most `BUFFER_LIMIT` and
/// one write's records) and rustls's own messages (alerts, session tickets, one key update at a
/// time) stay far below it; past it, the connection is in error rather than holding more.
pub(super) const OUT_MAX: usize = 4 * BUFFER_LIMIT;
/// Plaintext bytes in a TLS record at most, and what a record adds to them at most (header,
/// content type, explicit nonce, tag: TLS 1.2 or 1.3 with AEAD suites).
pub(super) const RECORD_SIZE: usize = 16 * 1024;
pub(super) const RECORD_OVERHEAD: usize = 64;
/// Room the incoming buffer has for each read of the socket (rustls's own read size).
pub(super) const READ_SIZE: usize = 4096;
/// Most bytes of input held undecrypted: a whole handshake message (rustls takes up to 64 KiB)
/// and a record beyond it. A peer that needs more to make progress is in error.
pub(super) const INCOMING_MAX: usize = 64 * 1024 + 2 * 18_437;
/// Incoming space kept after a large message, while the connection is active.
const INCOMING_KEEP: usize = 32 * 1024;
/// Idle connections' buffers kept on a thread for the next connection that wakes there.
const SPARE_MAX: usize = 16;

thread_local! {
    /// Buffers that connections gave back when they went idle (or closed), kept for the next
    /// that needs some on this thread (a poller, or an upgrade's task): taking them costs no
    /// allocation and no clearing of memory, which waking a parked connection would otherwise
    /// pay each time. At most `SPARE_MAX`, and none larger than an active connection keeps.
    // Boxed: the buffers move whole between a connection's `Option<Box<Bufs>>` and this list.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Bufs>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers for a connection: spare ones of this thread's, or new ones.
pub(super) fn take_spare() -> Box<Bufs> {
    SPARE
        .try_with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Keeps a connection's empty buffers for the next connection on this thread, or frees them.
pub(super) fn give_back(mut b: Box<Bufs>) {
    if b.incoming.capacity() > INCOMING_KEEP || b.out.len() > BUFFER_LIMIT {
        return;
    }
    b.plain = Vec::new();
    b.taken = 0;
    b.incoming.clear();
    b.start = 0;
    b.sent = 0;
    b.end = 0;
    let _ = SPARE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < SPARE_MAX {
                s.push(b);
            }
        }
    });
}

/// A connection's buffers.
#[derive(Default)]
pub(super) struct Bufs {
    /// Bytes read from the socket, of which rustls has not taken `incoming[start..]` (its
    /// spare capacity is room for the next read). Emptied whenever rustls has taken it all.
    pub(super) incoming: Vec<u8>,
    /// What rustls has taken from the front of `incoming`: moved out only before the next read,
    /// not record by record (a buffer of tiny records would cost a shift each).
    pub(super) start: usize,
    /// Decrypted bytes the last read had no room for: `plain[taken..]`.
    pub(super) plain: Vec<u8>,
    pub(super) taken: usize,
    /// Encrypted output not sent yet: `out[sent..end]`.
    pub(super) out: Vec<u8>,
    pub(super) sent: usize,
    pub(super) end: usize,
}

impl Bufs {
    /// Nothing is held (what is left is room).
    pub(super) fn is_empty(&self) -> bool {
        self.incoming.is_empty() && self.taken == self.plain.len() && self.sent == self.end
    }

    /// Marks `n` more bytes at the front of the incoming buffer as taken by rustls.
    pub(super) fn discard(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.start = self.start.saturating_add(n).min(self.incoming.len());
        if self.start == self.incoming.len() {
            self.incoming.clear();
            self.start = 0;
            if self.incoming.capacity() > INCOMING_KEEP {
                self.incoming = Vec::new();
            }
        }
    }

    /// Moves what rustls has not taken to the front of the incoming buffer.
    pub(super) fn compact(&mut self) {
        if self.start > 0 {
            self.incoming.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Copies what fits of `src` into `dst`; how much.
pub(super) fn copy(src: &[u8], dst: &mut [MaybeUninit<u8>]) -> usize {
    let n = src.len().min(dst.len());
    // SAFETY: `src` holds at least `n` initialized bytes and `dst` has room for `n`; they are
    // different buffers (ours, or rustls's, and the caller's).
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast(), n) };
    n
}

/// The outgoing buffer, borrowed apart from the connection.
pub(super) struct Out<'a> {
    pub(super) buf: &'a mut Vec<u8>,
    pub(super) sent: &'a mut usize,
    pub(super) end: &'a mut usize,
}

impl Out<'_> {
    /// Appends what `f` writes into the buffer's free room, made at least `hint` bytes first
    /// (`Ok(Err(size))`: it needs that much room; the buffer grows and `f` is called again).
    pub(super) fn append(
        self,
        hint: usize,
        mut f: impl FnMut(&mut [u8]) -> Result<Result<usize, usize>, rustls::Error>,
    ) -> Result<(), rustls::Error> {
        if *self.sent == *self.end {
            *self.sent = 0;
            *self.end = 0;
        }
        if self.buf.len() - *self.end < hint {
            let want = (*self.end + hint).next_multiple_of(512);
            self.buf.resize(want, 0);
        }
        loop {
            match f(&mut self.buf[*self.end..])? {
                Ok(n) => {
                    *self.end += n;
                    return Ok(());
                }
                Err(need) => {
                    if self.buf.len() - *self.end >= need && *self.sent == 0 {
                        return Err(rustls::Error::General(
                            "rustls asked for room it had".into(),
                        ));
                    }
                    if *self.sent > 0 {
                        self.buf.copy_within(*self.sent..*self.end, 0);
                        *self.end -= *self.sent;
                        *self.sent = 0;
                    }
                    if self.buf.len() - *self.end < need {
                        let want = (*self.end + need).next_multiple_of(512);
                        self.buf.resize(want, 0);
                    }
                }
            }
        }
    }
}
