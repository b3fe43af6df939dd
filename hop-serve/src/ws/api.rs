//! What a handler sees of a WebSocket: the limits ([`WsConfig`]), the two kinds of handler
//! ([`WsHandler`] for whole messages, [`WsFrameHandler`] for frames as they arrive, with the
//! [`FrameKind`] and [`FrameChunk`] it gets), the [`WsConn`] a handler sends through and the
//! [`WsHandle`] that sends from any thread; and `Endpoint`, which lets the protocol drive
//! either kind of handler the same way. Sending goes down to `frame`'s helpers.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::Message;

use crate::handler::{Conn, ConnHandle, WriteError};

use super::deflate::{Codec, Deflate};
use super::frame::{
    message_parts, send_close, send_close_payload, send_message, write_frame, MAX_CONTROL,
};

/// Limits and compression of a WebSocket connection.
#[derive(Debug, Clone, Copy)]
pub struct WsConfig {
    /// Largest frame payload accepted (default 16 MiB); more closes with `1009`.
    pub max_frame_size: usize,
    /// Largest message accepted (default 64 MiB), compressed or once inflated; more closes
    /// with `1009`, before a compressed message is inflated past it.
    pub max_message_size: usize,
    /// permessage-deflate (on by default for [`WsHandler`]s when the `deflate` feature is
    /// built; a [`WsFrameHandler`] gets the frames as they are on the wire, so it never
    /// negotiates it).
    pub deflate: Deflate,
    /// A connection whose peer has sent nothing for this long is sent a Ping (default 30 s;
    /// `None`: never). Anything the peer sends counts as a sign of life, not only a Pong. 30 s
    /// keeps the connection open through NATs and proxies that drop a flow after 60 s of
    /// silence (AWS load balancers' and nginx's default), as browsers' clients expect.
    pub keep_alive_interval: Option<Duration>,
    /// How long a pinged peer has to send something (default 30 s): then it is closed with
    /// `1001` ("ping timeout"; it is going away, not at fault) and counted in
    /// `Stats::ws_ping_timeouts`. A dead peer is found within `keep_alive_interval` +
    /// `keep_alive_timeout` of its last frame (60 s by default).
    pub keep_alive_timeout: Duration,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            deflate: Deflate::default(),
            keep_alive_interval: Some(Duration::from_secs(30)),
            keep_alive_timeout: Duration::from_secs(30),
        }
    }
}

/// An event-driven WebSocket handler; all methods run on the connection's poller (or task)
/// and must not block. Returning an error closes the connection with `1011`.
pub trait WsHandler: Send + 'static {
    /// The handshake is done.
    fn on_open(&mut self, ws: &mut WsConn<'_>) -> io::Result<()> {
        let _ = ws;
        Ok(())
    }

    /// A whole text or binary message arrived (fragments assembled).
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> io::Result<()>;

    /// The connection is gone; `code` and `reason` come from the close frame, if any.
    fn on_close(&mut self, code: Option<CloseCode>, reason: &str) {
        let _ = (code, reason);
    }
}

/// A data frame's opcode, as a [`WsFrameHandler`] gets and sends frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// The first frame of a text message.
    Text,
    /// The first frame of a binary message.
    Binary,
    /// A later frame of the message.
    Continue,
}

impl FrameKind {
    fn opcode(self) -> OpCode {
        OpCode::Data(match self {
            FrameKind::Text => Data::Text,
            FrameKind::Binary => Data::Binary,
            FrameKind::Continue => Data::Continue,
        })
    }
}

/// Part of a data frame's payload, as it arrived (unmasked).
#[derive(Debug, Clone)]
pub struct FrameChunk {
    /// The frame's opcode.
    pub kind: FrameKind,
    /// The frame's FIN bit: the message ends with this frame.
    pub fin: bool,
    /// The first piece of this frame's payload.
    pub first: bool,
    /// The last piece of this frame's payload (an empty frame is one piece, first and last).
    pub last: bool,
    /// The bytes. In a text message the UTF-8 so far is valid; a character may be split
    /// between pieces.
    pub payload: Bytes,
}

/// A WebSocket handler that gets frames as they arrive rather than whole messages: see the
/// module docs. Pings are answered, a close is answered, and the limits hold as for
/// [`WsHandler`]. Returning an error closes the connection with `1011`.
pub trait WsFrameHandler: Send + 'static {
    /// The handshake is done.
    fn on_open(&mut self, ws: &mut WsConn<'_>) -> io::Result<()> {
        let _ = ws;
        Ok(())
    }

    /// Part of a data frame arrived.
    fn on_frame(&mut self, ws: &mut WsConn<'_>, chunk: FrameChunk) -> io::Result<()>;

    /// The connection is gone; `code` and `reason` come from the close frame, if any.
    fn on_close(&mut self, code: Option<CloseCode>, reason: &str) {
        let _ = (code, reason);
    }
}

/// What a connection's frames go to: whole messages to a [`WsHandler`], or pieces of frames as
/// they arrive to a [`WsFrameHandler`].
pub(super) trait Endpoint: Send + 'static {
    /// Data frames are handed on as they arrive, not assembled into messages.
    const STREAMING: bool;
    fn open(&mut self, ws: &mut WsConn<'_>) -> io::Result<()>;
    fn message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> io::Result<()>;
    fn chunk(&mut self, ws: &mut WsConn<'_>, chunk: FrameChunk) -> io::Result<()>;
    fn close(&mut self, code: Option<CloseCode>, reason: &str);
}

pub(super) struct Messages<H>(pub(super) H);

impl<H: WsHandler> Endpoint for Messages<H> {
    const STREAMING: bool = false;
    fn open(&mut self, ws: &mut WsConn<'_>) -> io::Result<()> {
        self.0.on_open(ws)
    }
    fn message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> io::Result<()> {
        self.0.on_message(ws, msg)
    }
    fn chunk(&mut self, _: &mut WsConn<'_>, _: FrameChunk) -> io::Result<()> {
        unreachable!("a message handler is given messages")
    }
    fn close(&mut self, code: Option<CloseCode>, reason: &str) {
        self.0.on_close(code, reason)
    }
}

pub(super) struct Frames<H>(pub(super) H);

impl<H: WsFrameHandler> Endpoint for Frames<H> {
    const STREAMING: bool = true;
    fn open(&mut self, ws: &mut WsConn<'_>) -> io::Result<()> {
        self.0.on_open(ws)
    }
    fn message(&mut self, _: &mut WsConn<'_>, _: Message) -> io::Result<()> {
        unreachable!("a frame handler is given frames")
    }
    fn chunk(&mut self, ws: &mut WsConn<'_>, chunk: FrameChunk) -> io::Result<()> {
        self.0.on_frame(ws, chunk)
    }
    fn close(&mut self, code: Option<CloseCode>, reason: &str) {
        self.0.on_close(code, reason)
    }
}

/// The WebSocket as a handler sees it.
pub struct WsConn<'a> {
    pub(super) conn: &'a mut Conn,
    pub(super) close_sent: &'a mut bool,
    /// permessage-deflate, when negotiated.
    pub(super) codec: Option<&'a mut Codec>,
}

impl WsConn<'_> {
    /// Sends a message (text, binary, ping, pong or close). A Ping or Pong over 125 bytes (RFC
    /// 6455's limit for control frames) is dropped; a close's reason is cut to fit.
    pub fn send(&mut self, msg: Message) -> io::Result<()> {
        let (op, payload) = message_parts(msg);
        match op {
            OpCode::Control(Control::Close) => {
                send_close_payload(self.conn, self.close_sent, &payload);
                Ok(())
            }
            OpCode::Control(_) if payload.len() > MAX_CONTROL => Ok(()),
            _ => send_message(
                self.conn,
                *self.close_sent,
                self.codec.as_deref_mut(),
                op,
                &payload,
            ),
        }
    }

    /// Sends one data frame: `kind` `Text` or `Binary` starts a message, `Continue` goes on with
    /// it, `fin` ends it. Control frames go through [`send`](Self::send) and
    /// [`close`](Self::close), and may come between a message's frames. Frames are sent
    /// uncompressed, even where permessage-deflate was negotiated.
    pub fn send_frame(&mut self, kind: FrameKind, fin: bool, payload: &[u8]) -> io::Result<()> {
        Ok(write_frame(
            self.conn,
            *self.close_sent,
            kind.opcode(),
            fin,
            payload,
        )?)
    }

    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) -> io::Result<()> {
        send_message(
            self.conn,
            *self.close_sent,
            self.codec.as_deref_mut(),
            OpCode::Data(Data::Text),
            text.as_bytes(),
        )
    }

    /// Starts the close handshake (once; later closes are ignored); the connection closes when
    /// the peer answers, or at the close timeout. A reason over 123 bytes is cut to fit.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        send_close(self.conn, self.close_sent, code, reason);
    }

    /// The peer's address (asked of the kernel).
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.conn.peer_addr()
    }

    /// The local address (asked of the kernel).
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.conn.local_addr()
    }

    /// Bytes queued and not yet written to the socket (frames included).
    pub fn queued(&self) -> usize {
        self.conn.queued()
    }

    /// Bytes that can be queued before the outbound queue reaches its high-water mark: a
    /// handler that wants to stay under it sends at most about this much.
    pub fn write_capacity(&self) -> usize {
        self.conn.write_capacity()
    }

    /// A `Send + Clone` handle that sends messages from any thread.
    pub fn handle(&mut self) -> WsHandle {
        WsHandle {
            inner: self.conn.handle(),
        }
    }

    /// Whether permessage-deflate was negotiated: messages of
    /// [`Deflate::threshold`] bytes or more are sent compressed.
    pub fn is_compressed(&self) -> bool {
        self.codec.is_some()
    }
}

/// Sends WebSocket messages to a connection from any thread. Each goes to the connection's
/// own thread to be framed there (and compressed, where permessage-deflate was negotiated), in
/// order, so that it checks the connection's close state: after a close frame, from either
/// side of the handle, nothing more is sent.
#[derive(Debug, Clone)]
pub struct WsHandle {
    inner: ConnHandle,
}

impl WsHandle {
    /// Queues a message; refused if the connection's outbound bound would be exceeded or it
    /// has closed. A message queued after a close frame was sent is dropped, as is a Ping or
    /// Pong over 125 bytes; a close's reason is cut to fit.
    pub fn send(&self, msg: Message) -> Result<(), WriteError> {
        let (op, payload) = message_parts(msg);
        if matches!(op, OpCode::Control(c) if c != Control::Close) && payload.len() > MAX_CONTROL {
            return Ok(());
        }
        self.deliver(op, true, &payload)
    }

    /// Queues one data frame (see [`WsConn::send_frame`]); refused as [`send`](Self::send) is.
    pub fn send_frame(&self, kind: FrameKind, fin: bool, payload: &[u8]) -> Result<(), WriteError> {
        self.deliver(kind.opcode(), fin, payload)
    }

    /// Hands a frame to the connection's thread: its first header byte (FIN and opcode), then
    /// its payload ([`WsProtocol::on_deliver`](super::protocol::WsProtocol) frames it).
    fn deliver(&self, op: OpCode, fin: bool, payload: &[u8]) -> Result<(), WriteError> {
        let mut out = BytesMut::with_capacity(1 + payload.len());
        out.extend_from_slice(&[u8::from(op) | if fin { 0x80 } else { 0 }]);
        out.extend_from_slice(payload);
        self.inner.deliver(out.freeze())
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}
