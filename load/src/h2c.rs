//! Just enough HTTP/2 by hand for `idle --kind h2`: cleartext with prior knowledge (h2c), one
//! `GET` on stream 1, then nothing. The frames are written out (a 9-byte header and a payload),
//! and the request's header block uses HPACK's static table and plain literals only, so an
//! idle connection costs the load generator no more than an HTTP/1.1 one.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client connection preface (RFC 9113, 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113, 6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

/// Frame flags.
pub const END_STREAM: u8 = 0x1;
/// `ACK` on SETTINGS and PING (the same bit as END_STREAM).
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

/// Appends a frame: the 9-byte header (24-bit length, type, flags, 31-bit stream id) and the
/// payload.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    assert!(len < 1 << 24, "frame payload too long");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends an HPACK integer with an `n`-bit prefix; `first` holds the bits above the prefix
/// (RFC 7541, 5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// Appends a literal header field without indexing whose name is static-table entry `name`,
/// with a plain (not Huffman-coded) value (RFC 7541, 6.2.2).
fn literal(out: &mut Vec<u8>, name: usize, value: &[u8]) {
    hpack_int(out, 0x00, 4, name);
    hpack_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

/// The HPACK block of `GET path` with `:authority` `host`: `:method GET` (static entry 2),
/// `:scheme http` (6), then `:path` (name 4; entry 4 itself is `/`) and `:authority` (name 1)
/// as literals.
pub fn get_block(path: &str, host: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    if path == "/" {
        b.push(0x84);
    } else {
        literal(&mut b, 4, path.as_bytes());
    }
    literal(&mut b, 1, host.as_bytes());
    b
}

/// What the client sends first: the preface and an empty SETTINGS frame (every setting at its
/// default).
pub fn opening() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    out
}

/// The SETTINGS ACK and, unless `path` is `None`, a `GET path` on stream 1 (END_STREAM,
/// END_HEADERS): the client's answer to the server's SETTINGS, in one write.
pub fn ack_and_get(path: Option<&str>, host: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    frame(&mut out, SETTINGS, ACK, 0, &[]);
    if let Some(path) = path {
        let block = get_block(path, &host.to_string());
        frame(&mut out, HEADERS, END_STREAM | END_HEADERS, 1, &block);
    }
    out
}

/// The `:status` a response header block opens with, when the server sent it as a static-table
/// entry (entries 8-14: 200, 204, 206, 304, 400, 404, 500), as servers do for those codes;
/// `None` for anything else (a literal, possibly Huffman-coded).
pub fn static_status(block: &[u8]) -> Option<u16> {
    const STATUS: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let first = *block.first()?;
    // A dynamic table size update (001xxxxx) may come first.
    if first & 0xe0 == 0x20 {
        return None;
    }
    if first & 0x80 != 0 {
        let i = (first & 0x7f) as usize;
        return STATUS.get(i.checked_sub(8)?).copied();
    }
    None
}

/// A frame as read: its type, flags, stream and payload.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads one frame from `s`, `buf` keeping what was read beyond it. An HTTP/1 answer (a server
/// that does not speak h2c) is an error that says so.
pub async fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Frame> {
    loop {
        if buf.starts_with(b"HTTP/1.") {
            let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
            return Err(io::Error::other(format!(
                "the server answered the h2c preface with HTTP/1: {:?}",
                String::from_utf8_lossy(line)
            )));
        }
        if buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() >= 9 + len {
                let f = Frame {
                    kind: buf[3],
                    flags: buf[4],
                    stream: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                    payload: buf[9..9 + len].to_vec(),
                };
                buf.drain(..9 + len);
                return Ok(f);
            }
        }
        buf.reserve(4096);
        if s.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection (no h2c?)",
            ));
        }
    }
}

/// The header block fragment of a HEADERS frame's payload (without padding and priority).
fn header_fragment(f: &Frame) -> io::Result<&[u8]> {
    let mut p = &f.payload[..];
    let mut pad = 0;
    if f.flags & PADDED != 0 {
        pad = *p.first().ok_or_else(|| io::Error::other("bad HEADERS"))? as usize;
        p = &p[1..];
    }
    if f.flags & PRIORITY != 0 {
        p = p.get(5..).ok_or_else(|| io::Error::other("bad HEADERS"))?;
    }
    p.get(..p.len().saturating_sub(pad))
        .filter(|_| pad <= p.len())
        .ok_or_else(|| io::Error::other("bad HEADERS padding"))
}

/// How the exchange on stream 1 ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The response's `:status` when it was a static-table entry, else 0.
    pub status: u16,
    /// Bytes of the response body.
    pub body: usize,
}

/// Opens h2c on `s`: sends [`opening`], reads the server's SETTINGS, acknowledges it and, unless
/// `path` is `None`, makes one `GET path` on stream 1 ([`ack_and_get`]). Then reads until the
/// server has acknowledged the client's SETTINGS and stream 1 (when requested) has ended, so
/// nothing is left in flight when the connection goes idle; PINGs are answered. Errors on
/// GOAWAY, on RST_STREAM of stream 1, and on a first frame that is not SETTINGS.
pub async fn open(s: &mut TcpStream, path: Option<&str>, host: SocketAddr) -> io::Result<Answer> {
    s.write_all(&opening()).await?;
    let mut buf = Vec::new();
    let (mut got_settings, mut acked, mut ended) = (false, false, path.is_none());
    let mut answer = Answer { status: 0, body: 0 };
    let mut block = Vec::new();
    while !(acked && ended) {
        let f = read_frame(s, &mut buf).await?;
        let settings = f.kind == SETTINGS && f.flags & ACK == 0;
        if !(got_settings || settings) {
            return Err(io::Error::other(format!(
                "the server's first frame is type {}, not SETTINGS",
                f.kind
            )));
        }
        match f.kind {
            SETTINGS if f.flags & ACK != 0 => acked = true,
            SETTINGS => {
                // The first one is answered with the request too.
                let request = if got_settings { None } else { path };
                got_settings = true;
                s.write_all(&ack_and_get(request, host)).await?;
            }
            PING if f.flags & ACK == 0 => {
                let mut pong = Vec::with_capacity(17);
                frame(&mut pong, PING, ACK, 0, &f.payload);
                s.write_all(&pong).await?;
            }
            GOAWAY => {
                let code = f
                    .payload
                    .get(4..8)
                    .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                return Err(io::Error::other(format!("GOAWAY, error code {code}")));
            }
            RST_STREAM if f.stream == 1 => {
                return Err(io::Error::other("the server reset stream 1"));
            }
            HEADERS | CONTINUATION if f.stream == 1 => {
                if f.kind == HEADERS {
                    block = header_fragment(&f)?.to_vec();
                } else {
                    block.extend_from_slice(&f.payload);
                }
                if f.flags & END_HEADERS != 0 && answer.status == 0 {
                    answer.status = static_status(&block).unwrap_or(0);
                }
                // HEADERS carries END_STREAM (CONTINUATION has no such flag).
                ended |= f.kind == HEADERS && f.flags & END_STREAM != 0;
            }
            DATA if f.stream == 1 => {
                answer.body += f.payload.len();
                ended |= f.flags & END_STREAM != 0;
            }
            // WINDOW_UPDATE, PRIORITY, PING acks, unknown types: nothing to do.
            _ => {}
        }
    }
    // Frames the server sent after these (none expected) are left unread: holding the
    // connection reads and drops whatever comes.
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_header_blocks() {
        let mut f = Vec::new();
        frame(&mut f, SETTINGS, ACK, 0, &[]);
        assert_eq!(f, [0, 0, 0, 4, 1, 0, 0, 0, 0]);
        let o = opening();
        assert!(o.starts_with(PREFACE));
        assert_eq!(&o[24..], [0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let host: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(ack_and_get(None, host), f);
        let o = ack_and_get(Some("/"), host);
        assert_eq!(&o[..9], f);
        // HEADERS on stream 1, END_STREAM | END_HEADERS.
        assert_eq!(&o[12..18], [1, 5, 0, 0, 0, 1]);
        let block = &o[18..];
        assert_eq!(o[9..12], [0, 0, block.len() as u8]);
        assert_eq!(&block[..5], [0x82, 0x86, 0x84, 0x01, 14]);
        assert_eq!(&block[5..], b"127.0.0.1:8080");
        let b = get_block("/plaintext", &host.to_string());
        assert_eq!(&b[..4], [0x82, 0x86, 0x04, 10]);
        assert_eq!(&b[4..14], b"/plaintext");
        // A long value takes a multi-byte length (127 + 73 = 200: 0x7f, 73).
        let long = "/".repeat(200);
        let b = get_block(&long, "h");
        assert_eq!(&b[2..5], [0x04, 0x7f, 73]);
        assert_eq!(static_status(&[0x88]), Some(200));
        assert_eq!(static_status(&[0x8d, 0x0f]), Some(404));
        assert_eq!(static_status(&[0x48, 0x03]), None);
    }
}
