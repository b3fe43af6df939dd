//! A frame on the wire: a server frame's header (tungstenite's `FrameHeader` codec), a client
//! payload's unmasking, a message's opcode and payload, a close frame's payload; and the send
//! helpers every outgoing frame goes through (written or queued, compressed where
//! permessage-deflate was negotiated, a close frame once), each of which checks the one close
//! state first. It knows nothing of handlers or of the connection's protocol state.

use std::io::{self, Cursor};
use std::time::Instant;

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::Message;

use crate::handler::{Conn, WriteError};

use super::deflate::Codec;

/// The largest control frame payload (RFC 6455 5.5).
pub(super) const MAX_CONTROL: usize = 125;

/// A message's opcode and payload (a close's: its code and reason, cut to fit).
pub(super) fn message_parts(msg: Message) -> (OpCode, Bytes) {
    match msg {
        Message::Text(t) => (OpCode::Data(Data::Text), Bytes::from(t)),
        Message::Binary(b) => (OpCode::Data(Data::Binary), b),
        Message::Ping(b) => (OpCode::Control(Control::Ping), b),
        Message::Pong(b) => (OpCode::Control(Control::Pong), b),
        Message::Close(frame) => {
            let (code, reason) = frame.map_or((CloseCode::Normal, Default::default()), |f| {
                (f.code, f.reason)
            });
            (
                OpCode::Control(Control::Close),
                close_payload(code, reason.as_str()),
            )
        }
        Message::Frame(f) => (f.header().opcode, f.into_payload()),
    }
}

/// A server frame's header (unmasked) for `len` payload bytes: the buffer and its length.
/// `rsv1` marks a compressed message's first frame.
fn frame_header(opcode: OpCode, fin: bool, rsv1: bool, len: usize) -> ([u8; 14], usize) {
    let header = FrameHeader {
        opcode,
        is_final: fin,
        rsv1,
        ..FrameHeader::default()
    };
    let mut head = [0u8; 14];
    let mut cur = Cursor::new(&mut head[..]);
    header
        .format(len as u64, &mut cur)
        .expect("a frame header fits 14 bytes");
    let n = cur.position() as usize;
    (head, n)
}

/// The one close state's check, which every send but the close frame itself makes: nothing
/// goes out once a close frame has (`close_sent` is `WsProtocol::close_sent`).
fn open(close_sent: bool) -> Result<(), WriteError> {
    match close_sent {
        true => Err(WriteError::Closed),
        false => Ok(()),
    }
}

/// Queues a frame, refused at the high-water mark as [`Conn::write`] is.
pub(super) fn write_frame(
    conn: &mut Conn,
    close_sent: bool,
    opcode: OpCode,
    fin: bool,
    payload: &[u8],
) -> Result<(), WriteError> {
    open(close_sent)?;
    let (head, n) = frame_header(opcode, fin, false, payload.len());
    conn.write_parts(&[&head[..n], payload])
}

/// Queues a frame whatever the high-water mark (a handle's, bounded there; the keep-alive's
/// Ping).
pub(super) fn queue_frame(
    conn: &mut Conn,
    close_sent: bool,
    opcode: OpCode,
    fin: bool,
    payload: &[u8],
) -> Result<(), WriteError> {
    open(close_sent)?;
    let (head, n) = frame_header(opcode, fin, false, payload.len());
    conn.queue_parts(&[&head[..n], payload])
}

/// A text or binary frame: the first of a message, which alone may be compressed (RSV1).
pub(super) fn starts_message(op: OpCode) -> bool {
    matches!(op, OpCode::Data(Data::Text | Data::Binary))
}

/// Sends a whole message in one frame, compressed when permessage-deflate was negotiated and
/// the message is long enough.
pub(super) fn send_message(
    conn: &mut Conn,
    close_sent: bool,
    codec: Option<&mut Codec>,
    opcode: OpCode,
    payload: &[u8],
) -> io::Result<()> {
    match codec {
        Some(codec) if starts_message(opcode) && codec.compresses(payload.len()) => {
            // Refused before compressing, as the write would be: nothing is remembered for a
            // message the client never gets.
            open(close_sent)?;
            conn.room()?;
            Ok(queue_compressed(conn, close_sent, codec, opcode, payload)?)
        }
        _ => Ok(write_frame(conn, close_sent, opcode, true, payload)?),
    }
}

/// Compresses a message and queues it as one frame (RSV1), whatever the high-water mark (the
/// caller has checked it, or a handle has); arms the connection's timer when its history starts.
pub(super) fn queue_compressed(
    conn: &mut Conn,
    close_sent: bool,
    codec: &mut Codec,
    opcode: OpCode,
    payload: &[u8],
) -> Result<(), WriteError> {
    open(close_sent)?;
    let (z, arm) = codec.compress(payload);
    if let Some(at) = arm.and_then(|d| Instant::now().checked_add(d)) {
        // Sooner than the keep-alive's deadline, or not: on_timer sees to both.
        conn.arm_timer_at(at);
    }
    let (head, n) = frame_header(opcode, true, true, z.len());
    conn.queue_parts(&[&head[..n], &z])
}

/// A close frame's payload: the code, then as much of the reason as fits 125 bytes (cut at a
/// character boundary).
fn close_payload(code: CloseCode, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&u16::from(code).to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    Bytes::from(p)
}

pub(super) fn send_close(conn: &mut Conn, close_sent: &mut bool, code: CloseCode, reason: &str) {
    if !*close_sent {
        send_close_payload(conn, close_sent, &close_payload(code, reason));
    }
}

/// Sends a close frame, once: the close state is set, and nothing else is sent afterwards.
pub(super) fn send_close_payload(conn: &mut Conn, close_sent: &mut bool, payload: &[u8]) {
    if *close_sent {
        return;
    }
    *close_sent = true;
    // The peer has the close timeout to answer (RFC 6455 7.1.1: the server closes the TCP
    // connection once the handshake is done, or after a while if it is not).
    conn.start_close_clock();
    // A raw frame's payload over the limit keeps its code only.
    let payload = match payload.len() > MAX_CONTROL {
        true => &payload[..2],
        false => payload,
    };
    // If even a close frame does not fit, the peer is not reading: just close.
    let (head, n) = frame_header(OpCode::Control(Control::Close), true, false, payload.len());
    if conn.write_parts(&[&head[..n], payload]).is_err() {
        conn.close();
    }
}

pub(super) fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = buf.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Unmasks `buf`, the payload bytes from `offset` on.
pub(super) fn unmask_from(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = mask;
    m.rotate_left(offset % 4);
    unmask(buf, m);
}
