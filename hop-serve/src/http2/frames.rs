//! HTTP/2 frames as the meter sees them: the frame types, flags and error codes it reads and
//! writes (RFC 9113 §6, §7), one direction's frame boundaries followed across reads
//! ([`Frames`], reporting each [`Head`]), and the frames it writes itself (`push_frame`,
//! `set_stream`). It knows nothing of streams' state or budgets.

/// Frame types (RFC 9113 §6).
pub(super) const DATA: u8 = 0x0;
pub(super) const HEADERS: u8 = 0x1;
pub(super) const PRIORITY: u8 = 0x2;
pub(super) const RST_STREAM: u8 = 0x3;
pub(super) const SETTINGS: u8 = 0x4;
pub(super) const PUSH_PROMISE: u8 = 0x5;
pub(super) const PING: u8 = 0x6;
pub(super) const GOAWAY: u8 = 0x7;
pub(super) const WINDOW_UPDATE: u8 = 0x8;
pub(super) const CONTINUATION: u8 = 0x9;
pub(super) const END_STREAM: u8 = 0x1;
/// Error codes (RFC 9113 §7).
pub(super) const CANCEL: u32 = 0x8;
pub(super) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One direction's frame boundaries: the 9-byte headers, parsed across reads.
#[derive(Default)]
pub(super) struct Frames {
    /// Bytes of the client preface still to pass over (input only).
    pub(super) preface: u8,
    pub(super) head: [u8; 9],
    pub(super) have: u8,
    /// Payload bytes of the current frame still to pass over.
    pub(super) left: u32,
    /// The current frame's first payload bytes (a WINDOW_UPDATE's increment).
    pub(super) first: [u8; 4],
    pub(super) got: u8,
}

/// A frame header, as [`Frames`] reports it.
#[derive(Clone, Copy)]
pub(super) struct Head {
    pub(super) len: u32,
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) stream: u32,
}

impl Frames {
    /// At a frame boundary: bytes can be put in between without breaking a frame.
    pub(super) fn at_boundary(&self) -> bool {
        self.preface == 0 && self.have == 0 && self.left == 0
    }

    /// Passes over `data`, calling `on_head` for each complete frame header and `on_end` with
    /// the first payload bytes for each complete frame.
    pub(super) fn feed(
        &mut self,
        mut data: &[u8],
        mut on_head: impl FnMut(Head),
        mut on_end: impl FnMut(Head, [u8; 4]),
    ) {
        if self.preface > 0 {
            let n = data.len().min(self.preface as usize);
            self.preface -= n as u8;
            data = &data[n..];
        }
        while !data.is_empty() {
            if self.have < 9 {
                let n = data.len().min(9 - self.have as usize);
                self.head[self.have as usize..self.have as usize + n].copy_from_slice(&data[..n]);
                self.have += n as u8;
                data = &data[n..];
                if self.have < 9 {
                    return;
                }
                let h = self.parsed();
                self.left = h.len;
                self.got = 0;
                on_head(h);
                if h.len > 0 {
                    continue;
                }
            } else {
                let n = data.len().min(self.left as usize);
                let take = n.min(4 - self.got as usize);
                self.first[self.got as usize..self.got as usize + take]
                    .copy_from_slice(&data[..take]);
                self.got += take as u8;
                self.left -= n as u32;
                data = &data[n..];
                if self.left > 0 {
                    return;
                }
            }
            self.have = 0;
            on_end(self.parsed(), self.first);
        }
    }

    fn parsed(&self) -> Head {
        let h = &self.head;
        Head {
            len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        }
    }
}

/// Appends a frame for stream 0 (see [`set_stream`]).
pub(super) fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
}

/// Sets the stream of the frame `push_frame` just appended (a 4-byte payload).
pub(super) fn set_stream(out: &mut [u8], stream: u32) {
    let at = out.len() - 8;
    out[at..at + 4].copy_from_slice(&stream.to_be_bytes());
}
