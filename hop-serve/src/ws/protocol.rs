//! The per-connection protocol: `WsProtocol`, the read handler an upgraded connection runs.
//! It reads frames from the input buffer (waiting for a partial one), checks them against the
//! limits and RFC 6455 (control frames, reserved bits, masking), answers Pings and close
//! frames, keeps the one close state, pings a quiet peer (the keep-alive), and either
//! assembles messages (inflating compressed ones, checking text for UTF-8) for a
//! [`WsHandler`](super::WsHandler) or hands a [`WsFrameHandler`](super::WsFrameHandler) each
//! data frame's payload as it arrives. It also frames what a `WsHandle` delivers.

use std::io::{self, Cursor};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::{Message, Utf8Bytes};

use crate::handler::Protocol;
use crate::handler::{CloseReason, Conn, Handler};
use crate::rt::timer::Tick;

use super::api::{Endpoint, FrameChunk, FrameKind, WsConfig, WsConn};
use super::deflate::{Codec, InflateError};
use super::frame::{
    queue_compressed, queue_frame, send_close, send_close_payload, starts_message, unmask,
    unmask_from, write_frame, MAX_CONTROL,
};

/// The read handler that speaks WebSocket for a [`WsHandler`](super::WsHandler) or a
/// [`WsFrameHandler`](super::WsFrameHandler).
pub(super) struct WsProtocol<E> {
    handler: E,
    cfg: Limits,
    /// A fragmented message being assembled: its opcode, whether it is compressed, and its
    /// bytes so far. (Boxed, as are `streaming`, `codec` and `close_received`: an idle
    /// connection has none of them but `codec`, and its state stays small.)
    partial: Option<Box<(Data, bool, BytesMut)>>,
    /// permessage-deflate, when negotiated.
    codec: Option<Box<Codec>>,
    /// For a frame handler: the message and the frame in progress.
    streaming: Option<Box<Streaming>>,
    /// A close frame has gone out: the one close state every send path checks.
    close_sent: bool,
    close_received: Option<Box<(Option<CloseCode>, String)>>,
    /// When the peer last sent something (or the connection opened): the keep-alive's clock.
    heard: Tick,
    /// When the keep-alive Ping went out, if the peer has sent nothing since.
    pinged: Option<Tick>,
}

/// What a connection keeps of its [`WsConfig`] (permessage-deflate's part is in its codec):
/// an idle connection's state stays small.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_frame_size: usize,
    max_message_size: usize,
    keep_alive_interval: Option<Duration>,
    keep_alive_timeout: Duration,
}

/// A frame handler's message in progress, and the frame whose payload is arriving.
#[derive(Default)]
struct Streaming {
    /// The message's kind and its bytes so far.
    message: Option<(Data, usize)>,
    /// The end of a text message's UTF-8 so far, if it stopped inside a character.
    carry: Utf8Carry,
    /// The frame being handed on.
    frame: Option<InFrame>,
}

/// A data frame whose payload is being handed on as it arrives.
struct InFrame {
    kind: FrameKind,
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes handed on, and still to come.
    done: usize,
    left: usize,
}

/// Why the protocol closes the connection.
struct Fail(CloseCode, &'static str);

impl<E: Endpoint> WsProtocol<E> {
    pub(super) fn new(handler: E, cfg: WsConfig, codec: Option<Codec>) -> Self {
        WsProtocol {
            handler,
            cfg: Limits {
                max_frame_size: cfg.max_frame_size,
                max_message_size: cfg.max_message_size,
                keep_alive_interval: cfg.keep_alive_interval,
                keep_alive_timeout: cfg.keep_alive_timeout,
            },
            partial: None,
            codec: codec.map(Box::new),
            streaming: None,
            close_sent: false,
            close_received: None,
            heard: Tick::of(Instant::now()),
            pinged: None,
        }
    }

    /// The keep-alive (see the module docs): pings a peer that has been quiet for the
    /// interval, closes one that stays quiet for the timeout after the Ping, and arms the timer
    /// for the next look. Deadlines past the end of time never come.
    fn keep_alive(&mut self, conn: &mut Conn, now: Instant) {
        let Some(interval) = self.cfg.keep_alive_interval else {
            return;
        };
        if self.close_sent {
            // The close clock bounds what is left.
            return;
        }
        let timeout = self.cfg.keep_alive_timeout;
        let next = match self.pinged {
            Some(ping) => {
                let due = ping.instant().checked_add(timeout);
                if due.is_some_and(|due| now >= due) {
                    tracing::debug!("websocket: no answer to a keep-alive ping; closing");
                    crate::handler::context::count_ws_ping_timeout(conn);
                    send_close(conn, &mut self.close_sent, CloseCode::Away, "ping timeout");
                    conn.close();
                    return;
                }
                due
            }
            None => {
                let due = self.heard.instant().checked_add(interval);
                if due.is_some_and(|due| now >= due) {
                    // Whatever the high-water mark: two bytes, at most one per interval.
                    let ping = OpCode::Control(Control::Ping);
                    let _ = queue_frame(conn, self.close_sent, ping, true, &[]);
                    self.pinged = Some(Tick::of(now));
                    now.checked_add(timeout)
                } else {
                    due
                }
            }
        };
        if let Some(at) = next {
            conn.arm_timer_at(at);
        }
    }

    fn ws<'a>(
        conn: &'a mut Conn,
        close_sent: &'a mut bool,
        codec: &'a mut Option<Box<Codec>>,
    ) -> WsConn<'a> {
        WsConn {
            conn,
            close_sent,
            codec: codec.as_deref_mut(),
        }
    }

    fn fail(&mut self, conn: &mut Conn, f: Fail) {
        tracing::debug!(code = ?f.0, "websocket: {}", f.1);
        send_close(conn, &mut self.close_sent, f.0, f.1);
        conn.close();
    }

    /// Handles every whole frame in `input`; leaves a partial one.
    fn frames(&mut self, conn: &mut Conn, input: &mut BytesMut) -> Result<(), Fail> {
        loop {
            if self.close_received.is_some() {
                input.clear();
                return Ok(());
            }
            if crate::handler::over_mark(conn.queued(), conn.max_output) {
                // Backpressure: the peer is not reading what it is sent, so its messages wait
                // (in the input buffer, then in the socket) until the outbound queue drains
                // below its mark; on_writable brings us back here.
                conn.want_writable = true;
                return Ok(());
            }
            if E::STREAMING && self.streaming.as_ref().is_some_and(|s| s.frame.is_some()) {
                if !self.stream_payload(conn, input)? {
                    return Ok(());
                }
                continue;
            }
            let mut cur = Cursor::new(&input[..]);
            let (header, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(_) => return Err(Fail(CloseCode::Protocol, "bad frame header")),
            };
            let head_len = cur.position() as usize;
            if matches!(header.opcode, OpCode::Control(_))
                && (len > MAX_CONTROL as u64 || !header.is_final)
            {
                // Known from the header alone: no need to wait for the payload.
                return Err(Fail(CloseCode::Protocol, "bad control frame"));
            }
            if len > self.cfg.max_frame_size as u64 {
                return Err(Fail(CloseCode::Size, "frame too large"));
            }
            let len = len as usize;
            if let OpCode::Data(Data::Continue) = header.opcode {
                let so_far = match E::STREAMING {
                    true => self
                        .streaming
                        .as_ref()
                        .and_then(|s| s.message)
                        .map_or(0, |m| m.1),
                    false => self.partial.as_ref().map_or(0, |p| p.2.len()),
                };
                if so_far.saturating_add(len) > self.cfg.max_message_size {
                    return Err(Fail(CloseCode::Size, "message too large"));
                }
            } else if len > self.cfg.max_message_size {
                return Err(Fail(CloseCode::Size, "message too large"));
            }
            // A frame handler gets a data frame's payload as it arrives.
            let streamed = E::STREAMING && matches!(header.opcode, OpCode::Data(_));
            if !streamed && input.len() < head_len.saturating_add(len) {
                // Wait for the rest. The input buffer grows with what arrives, in the read
                // loop's chunks, never by what a header claims: a header that declares 16 MiB
                // costs nothing until 16 MiB are sent.
                return Ok(());
            }
            // RSV1 marks a compressed message: only on its first frame, only if negotiated.
            let compressed = header.rsv1;
            if header.rsv2
                || header.rsv3
                || (compressed
                    && (self.codec.is_none()
                        || !matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary))))
            {
                return Err(Fail(CloseCode::Protocol, "reserved bits set"));
            }
            let Some(mask) = header.mask else {
                return Err(Fail(CloseCode::Protocol, "unmasked client frame"));
            };
            input.advance(head_len);
            if streamed {
                self.start_frame(header.is_final, header.opcode, mask, len)?;
                continue;
            }
            let mut payload = input.split_to(len);
            unmask(&mut payload, mask);
            self.frame(conn, header.is_final, header.opcode, compressed, payload)?;
        }
    }

    /// A frame handler's data frame begins (its header read): checks that it fits the message
    /// in progress, and starts handing its payload on.
    fn start_frame(
        &mut self,
        fin: bool,
        op: OpCode,
        mask: [u8; 4],
        len: usize,
    ) -> Result<(), Fail> {
        let st = self.streaming.get_or_insert_with(Default::default);
        let kind = match (op, st.message) {
            (OpCode::Data(Data::Continue), Some(_)) => FrameKind::Continue,
            (OpCode::Data(Data::Continue), None) => {
                return Err(Fail(CloseCode::Protocol, "continuation without a message"))
            }
            (OpCode::Data(Data::Text | Data::Binary), Some(_)) => {
                return Err(Fail(
                    CloseCode::Protocol,
                    "new message inside a fragmented one",
                ))
            }
            (OpCode::Data(Data::Text), None) => FrameKind::Text,
            (OpCode::Data(Data::Binary), None) => FrameKind::Binary,
            _ => return Err(Fail(CloseCode::Protocol, "reserved opcode")),
        };
        let message = match (kind, st.message) {
            (FrameKind::Text, _) => (Data::Text, len),
            (FrameKind::Binary, _) => (Data::Binary, len),
            (FrameKind::Continue, Some((data, so_far))) => (data, so_far.saturating_add(len)),
            (FrameKind::Continue, None) => unreachable!("checked above"),
        };
        st.message = Some(message);
        st.frame = Some(InFrame {
            kind,
            fin,
            mask,
            done: 0,
            left: len,
        });
        Ok(())
    }

    /// Hands on what has arrived of the current frame's payload; `false` if nothing has (wait
    /// for more).
    fn stream_payload(&mut self, conn: &mut Conn, input: &mut BytesMut) -> Result<bool, Fail> {
        let st = self.streaming.as_deref_mut().expect("a frame in progress");
        let frame = st.frame.as_mut().expect("a frame in progress");
        let n = frame.left.min(input.len());
        if n == 0 && frame.left > 0 {
            return Ok(false);
        }
        let mut piece = input.split_to(n);
        unmask_from(&mut piece, frame.mask, frame.done);
        let first = frame.done == 0;
        frame.done += n;
        frame.left -= n;
        let last = frame.left == 0;
        let (kind, fin) = (frame.kind, frame.fin);
        let ends = fin && last;
        if let Some((Data::Text, _)) = st.message {
            if !st.carry.check(&piece, ends) {
                return Err(Fail(CloseCode::Invalid, "text is not UTF-8"));
            }
        }
        if last {
            st.frame = None;
            if fin {
                // Nothing is kept between messages.
                self.streaming = None;
            }
        }
        if self.close_sent {
            return Ok(true);
        }
        let chunk = FrameChunk {
            kind,
            fin,
            first,
            last,
            payload: piece.freeze(),
        };
        let mut ws = Self::ws(conn, &mut self.close_sent, &mut self.codec);
        if let Err(e) = self.handler.chunk(&mut ws, chunk) {
            tracing::debug!(error = %e, "websocket frame handler failed");
            return Err(Fail(CloseCode::Error, "handler error"));
        }
        Ok(true)
    }

    fn frame(
        &mut self,
        conn: &mut Conn,
        fin: bool,
        op: OpCode,
        compressed: bool,
        payload: BytesMut,
    ) -> Result<(), Fail> {
        match op {
            OpCode::Control(c) => {
                if !fin || payload.len() > MAX_CONTROL {
                    return Err(Fail(CloseCode::Protocol, "bad control frame"));
                }
                match c {
                    Control::Ping => {
                        // A Pong that is refused (a close was sent, or the output is at its
                        // mark) is dropped, not fatal: a later Ping gets the next one (RFC 6455
                        // 5.5.3 asks only for an answer to the most recent).
                        let pong = OpCode::Control(Control::Pong);
                        let _ = write_frame(conn, self.close_sent, pong, true, &payload);
                    }
                    Control::Pong => {}
                    Control::Close => self.close_frame(conn, payload.freeze())?,
                    Control::Reserved(_) => {
                        return Err(Fail(CloseCode::Protocol, "reserved opcode"))
                    }
                }
                Ok(())
            }
            OpCode::Data(Data::Reserved(_)) => Err(Fail(CloseCode::Protocol, "reserved opcode")),
            OpCode::Data(Data::Continue) => {
                let Some((_, _, buf)) = self.partial.as_deref_mut() else {
                    return Err(Fail(CloseCode::Protocol, "continuation without a message"));
                };
                buf.extend_from_slice(&payload);
                if fin {
                    let (kind, compressed, buf) = *self.partial.take().expect("checked above");
                    self.message(conn, kind, compressed, buf)?;
                }
                Ok(())
            }
            OpCode::Data(kind) => {
                if self.partial.is_some() {
                    return Err(Fail(
                        CloseCode::Protocol,
                        "new message inside a fragmented one",
                    ));
                }
                if fin {
                    self.message(conn, kind, compressed, payload)
                } else {
                    self.partial = Some(Box::new((kind, compressed, payload)));
                    Ok(())
                }
            }
        }
    }

    fn message(
        &mut self,
        conn: &mut Conn,
        kind: Data,
        compressed: bool,
        payload: BytesMut,
    ) -> Result<(), Fail> {
        let payload = match (compressed, self.codec.as_deref_mut()) {
            (true, Some(codec)) => match codec.decompress(&payload, self.cfg.max_message_size) {
                Ok(inflated) => Bytes::from(inflated),
                Err(InflateError::TooLarge) => {
                    return Err(Fail(CloseCode::Size, "message too large once inflated"))
                }
                Err(InflateError::Invalid) => {
                    return Err(Fail(CloseCode::Invalid, "invalid compressed data"))
                }
            },
            _ => payload.freeze(),
        };
        let msg = match kind {
            Data::Text => match Utf8Bytes::try_from(payload) {
                Ok(t) => Message::Text(t),
                Err(_) => return Err(Fail(CloseCode::Invalid, "text is not UTF-8")),
            },
            _ => Message::Binary(payload),
        };
        if self.close_sent {
            return Ok(());
        }
        let mut ws = Self::ws(conn, &mut self.close_sent, &mut self.codec);
        if let Err(e) = self.handler.message(&mut ws, msg) {
            tracing::debug!(error = %e, "websocket handler failed");
            return Err(Fail(CloseCode::Error, "handler error"));
        }
        Ok(())
    }

    fn close_frame(&mut self, conn: &mut Conn, payload: Bytes) -> Result<(), Fail> {
        let (code, reason) = match payload.len() {
            0 => (None, String::new()),
            1 => return Err(Fail(CloseCode::Protocol, "one-byte close payload")),
            _ => {
                let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
                if !code.is_allowed() {
                    return Err(Fail(CloseCode::Protocol, "close code not allowed"));
                }
                let Ok(reason) = std::str::from_utf8(&payload[2..]) else {
                    return Err(Fail(CloseCode::Invalid, "close reason is not UTF-8"));
                };
                (Some(code), reason.to_owned())
            }
        };
        // Answer with the same code (RFC 6455 5.5.1), then close once it is flushed.
        send_close(
            conn,
            &mut self.close_sent,
            code.unwrap_or(CloseCode::Normal),
            "",
        );
        self.close_received = Some(Box::new((code, reason)));
        conn.close();
        Ok(())
    }
}

/// The end of a text message's bytes so far when it stopped inside a character (at most three
/// bytes of a valid start).
#[derive(Default)]
struct Utf8Carry {
    bytes: [u8; 4],
    len: u8,
}

impl Utf8Carry {
    /// Whether the text goes on validly with `piece`; `end`: the message ends with it, so no
    /// character may be left unfinished.
    fn check(&mut self, piece: &[u8], end: bool) -> bool {
        let mut rest = piece;
        if self.len > 0 {
            let have = self.len as usize;
            let need = match self.bytes[0] {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (need - have).min(rest.len());
            self.bytes[have..have + take].copy_from_slice(&rest[..take]);
            self.len += take as u8;
            rest = &rest[take..];
            let so_far = &self.bytes[..self.len as usize];
            if (self.len as usize) < need {
                // Still unfinished: a valid start, unless the message ends here.
                return !end
                    && matches!(std::str::from_utf8(so_far), Err(e) if e.error_len().is_none());
            }
            if std::str::from_utf8(so_far).is_err() {
                return false;
            }
            self.len = 0;
        }
        match std::str::from_utf8(rest) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() && !end => {
                let tail = &rest[e.valid_up_to()..];
                self.bytes[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                true
            }
            Err(_) => false,
        }
    }
}

impl<E: Endpoint> Handler for WsProtocol<E> {
    fn on_open(&mut self, conn: &mut Conn) -> io::Result<()> {
        // A whole frame (and its header) must fit the input buffer.
        conn.set_max_read_buffer(self.cfg.max_frame_size.saturating_add(14));
        let now = Instant::now();
        self.heard = Tick::of(now);
        self.keep_alive(conn, now);
        let mut ws = Self::ws(conn, &mut self.close_sent, &mut self.codec);
        self.handler.open(&mut ws)
    }

    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> io::Result<()> {
        if self.cfg.keep_alive_interval.is_some() {
            // A sign of life; the timer, when it fires, counts from here.
            self.heard = Tick::of(Instant::now());
            self.pinged = None;
        }
        if let Err(f) = self.frames(conn, input) {
            input.clear();
            self.fail(conn, f);
        }
        Ok(())
    }

    fn on_eof(&mut self, conn: &mut Conn) -> io::Result<()> {
        conn.close();
        Ok(())
    }

    fn on_timer(&mut self, conn: &mut Conn) -> io::Result<()> {
        // Two deadlines share the timer: the compression history's release once idle, and the
        // keep-alive. Each is armed again (the sooner wins) while it is wanted.
        let now = Instant::now();
        if let Some(codec) = self.codec.as_deref_mut() {
            if let Some(at) = codec.release_if_idle().and_then(|d| now.checked_add(d)) {
                conn.arm_timer_at(at);
            }
        }
        self.keep_alive(conn, now);
        Ok(())
    }

    fn on_shutdown(&mut self, conn: &mut Conn) {
        // 1001 Going Away; the connection closes when the peer answers, or at the drain timeout.
        send_close(
            conn,
            &mut self.close_sent,
            CloseCode::Away,
            "server shutting down",
        );
    }

    fn on_close(&mut self, reason: CloseReason) {
        let _ = reason;
        let (code, text) = self
            .close_received
            .take()
            .map_or((None, String::new()), |c| *c);
        self.handler.close(code, &text);
    }
}

/// What a `WsHandle` sends goes through the connection's mailbox (`handler::mail`) and is
/// framed here, on the connection's own thread, against its one close state.
impl<E: Endpoint> Protocol for WsProtocol<E> {
    fn on_deliver(&mut self, conn: &mut Conn, bytes: Bytes) {
        // A `WsHandle`'s frame: its first header byte (FIN and opcode), then its payload.
        let Some((&b0, payload)) = bytes.split_first() else {
            return;
        };
        let (fin, op) = (b0 & 0x80 != 0, OpCode::from(b0 & 0x0f));
        if op == OpCode::Control(Control::Close) {
            send_close_payload(conn, &mut self.close_sent, payload);
            return;
        }
        // Bounded by the handle already: queued whatever the mark. Dropped after a close.
        let sent = match self.codec.as_deref_mut() {
            Some(codec) if fin && starts_message(op) && codec.compresses(payload.len()) => {
                queue_compressed(conn, self.close_sent, codec, op, payload)
            }
            _ => queue_frame(conn, self.close_sent, op, fin, payload),
        };
        if sent.is_err() && !self.close_sent {
            conn.close();
        }
    }
}
