//! Event-driven WebSocket (RFC 6455) on read handlers: no task, no stream object and no buffer
//! per idle connection.
//!
//! [`upgrade`] (or the [`WsUpgrade`] axum extractor) validates the handshake, answers `101`,
//! and hijacks the connection with a frame handler built on tungstenite's frame codec
//! (`FrameHeader` parsing and formatting, `Message`, `CloseCode`). Your [`WsHandler`] gets whole
//! messages; pings are answered, fragments assembled, limits enforced (`1009`), text checked
//! for UTF-8 (`1007`) and protocol errors closed with `1002`. A partial frame simply waits in the
//! connection's input buffer for more bytes.
//!
//! A quiet connection is kept alive, and a dead one found, with Pings: once the peer has sent
//! nothing for [`WsConfig::keep_alive_interval`] it is pinged, and if it still sends nothing
//! within [`WsConfig::keep_alive_timeout`] it is closed with `1001` and counted in
//! `Stats::ws_ping_timeouts`. This is one deadline on the connection's timer (shared with the
//! compression history's release), not a task. The HTTP idle timeout does not apply.
//!
//! Sending: whatever goes out (a handler's [`WsConn`] sends, a [`WsHandle`]'s, which are framed
//! on the connection's own thread, Pongs, the keep-alive Ping) checks the one close state,
//! `WsProtocol::close_sent`: once a close frame is out nothing else is sent, a second close
//! included.
//!
//! A [`WsFrameHandler`] gets frames instead, as they arrive ([`upgrade_frames`],
//! [`WsUpgrade::on_upgrade_frames`]): each data frame's payload in the pieces the socket
//! delivered it in, with its opcode and FIN bit, so a proxy or a stream of large binary data
//! never holds a whole message (or a whole frame). The limits and the control frames are
//! handled as for messages, and text is checked for UTF-8 as it goes. It sends frames with
//! [`WsConn::send_frame`] and [`WsHandle::send_frame`].
//!
//! permessage-deflate (RFC 7692) is negotiated for message handlers unless
//! [`WsConfig::deflate`] turns it off; [`Deflate`] has the settings, and the `deflate` module
//! says how a compressed connection keeps no zlib state while idle.
//!
//! Over HTTP/2 the handshake is RFC 8441's extended CONNECT (`:protocol websocket`), answered
//! `200`; the handler then runs over the HTTP/2 stream (as a task, not in place). Route with
//! `any(..)` to accept both handshakes.
//!
//! ```no_run
//! use hop::ws::{Message, WsConn, WsHandler, WsUpgrade};
//!
//! struct Echo;
//! impl WsHandler for Echo {
//!     fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
//!         ws.send(msg)
//!     }
//! }
//!
//! async fn ws(upgrade: WsUpgrade) -> axum::response::Response {
//!     upgrade.on_upgrade(Echo)
//! }
//! let app: axum::Router = axum::Router::new().route("/ws", axum::routing::get(ws));
//! ```

use std::io::{self, Cursor};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

pub use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
pub use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::FrameHeader;
pub use tungstenite::Message;
use tungstenite::Utf8Bytes;

use crate::rt::timer::Tick;
use crate::tcp::{CloseReason, Conn, ConnHandle, Handler, WriteError};
use crate::Hijack;

mod deflate;
pub use deflate::Deflate;
use deflate::{Codec, InflateError};

/// Limits and compression of a WebSocket connection.
#[derive(Debug, Clone, Copy)]
pub struct WsConfig {
    /// Largest frame payload accepted (default 16 MiB); more closes with `1009`.
    pub max_frame_size: usize,
    /// Largest message accepted (default 64 MiB), compressed or once inflated; more closes
    /// with `1009`, before a compressed message is inflated past it.
    pub max_message_size: usize,
    /// permessage-deflate (on by default for [`WsHandler`]s; a [`WsFrameHandler`] gets the
    /// frames as they are on the wire, so it never negotiates it).
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
trait Endpoint: Send + 'static {
    /// Data frames are handed on as they arrive, not assembled into messages.
    const STREAMING: bool;
    fn open(&mut self, ws: &mut WsConn<'_>) -> io::Result<()>;
    fn message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> io::Result<()>;
    fn chunk(&mut self, ws: &mut WsConn<'_>, chunk: FrameChunk) -> io::Result<()>;
    fn close(&mut self, code: Option<CloseCode>, reason: &str);
}

struct Messages<H>(H);

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

struct Frames<H>(H);

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
    conn: &'a mut Conn,
    close_sent: &'a mut bool,
    /// permessage-deflate, when negotiated.
    codec: Option<&'a mut Codec>,
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
    /// its payload ([`WsProtocol::on_deliver`] frames it).
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

/// The largest control frame payload (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;

/// A message's opcode and payload (a close's: its code and reason, cut to fit).
fn message_parts(msg: Message) -> (OpCode, Bytes) {
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
fn write_frame(
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
fn queue_frame(
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
fn starts_message(op: OpCode) -> bool {
    matches!(op, OpCode::Data(Data::Text | Data::Binary))
}

/// Sends a whole message in one frame, compressed when permessage-deflate was negotiated and
/// the message is long enough.
fn send_message(
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
fn queue_compressed(
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

fn send_close(conn: &mut Conn, close_sent: &mut bool, code: CloseCode, reason: &str) {
    if !*close_sent {
        send_close_payload(conn, close_sent, &close_payload(code, reason));
    }
}

/// Sends a close frame, once: the close state is set, and nothing else is sent afterwards.
fn send_close_payload(conn: &mut Conn, close_sent: &mut bool, payload: &[u8]) {
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

/// The read handler that speaks WebSocket for a [`WsHandler`] or a [`WsFrameHandler`].
struct WsProtocol<E> {
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
    fn new(handler: E, cfg: WsConfig, codec: Option<Codec>) -> Self {
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

fn unmask(buf: &mut [u8], mask: [u8; 4]) {
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
fn unmask_from(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = mask;
    m.rotate_left(offset % 4);
    unmask(buf, m);
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

/// Validates a WebSocket handshake and answers `101`, handing the connection to `handler`;
/// answers `400` (or `426`) when the request is not a valid handshake.
pub fn upgrade<B, H: WsHandler>(req: Request<B>, handler: H) -> Response<Full<Bytes>> {
    upgrade_to(req, Messages(handler))
}

/// As [`upgrade`], for a [`WsFrameHandler`]: it gets frames as they arrive.
pub fn upgrade_frames<B, H: WsFrameHandler>(req: Request<B>, handler: H) -> Response<Full<Bytes>> {
    upgrade_to(req, Frames(handler))
}

fn upgrade_to<B, E: Endpoint>(mut req: Request<B>, handler: E) -> Response<Full<Bytes>> {
    let hijack = Hijack::from_request(&mut req).map(Hijack::websocket);
    let h2 = is_extended_connect(req.method(), req.extensions());
    respond(
        req.method(),
        h2,
        req.headers(),
        hijack,
        &[],
        WsConfig::default(),
        handler,
    )
}

/// RFC 6455 4.1: the key is 16 bytes, base64-encoded (24 characters).
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && data_encoding::BASE64
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

fn bad(status: StatusCode, why: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(why.as_bytes())));
    *res.status_mut() = status;
    res
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// An HTTP/2 extended CONNECT for a WebSocket (RFC 8441 §4).
fn is_extended_connect(method: &Method, ext: &http::Extensions) -> bool {
    method == Method::CONNECT
        && ext
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Answers a handshake: RFC 6455's `GET` with `Upgrade` over HTTP/1.1 (`101`), or RFC 8441's
/// extended CONNECT over HTTP/2 (`h2`: `200`, no key).
fn respond<E: Endpoint>(
    method: &Method,
    h2: bool,
    headers: &HeaderMap,
    hijack: Option<Hijack>,
    protocols: &[String],
    cfg: WsConfig,
    handler: E,
) -> Response<Full<Bytes>> {
    if !h2 && method != Method::GET {
        return bad(
            StatusCode::METHOD_NOT_ALLOWED,
            "websocket handshake must be GET",
        );
    }
    if !h2
        && (!header_has_token(headers, header::CONNECTION, "upgrade")
            || !header_has_token(headers, header::UPGRADE, "websocket"))
    {
        return bad(StatusCode::UPGRADE_REQUIRED, "expected a websocket upgrade");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut res = bad(StatusCode::BAD_REQUEST, "unsupported websocket version");
        res.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return res;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    if !h2 && !key.is_some_and(|k| valid_key(k.as_bytes())) {
        return bad(StatusCode::BAD_REQUEST, "bad or missing sec-websocket-key");
    }
    let Some(hijack) = hijack else {
        return bad(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        );
    };
    // The server's first choice among those the client offers (as axum's `WebSocketUpgrade`).
    let offered = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    let chosen = protocols
        .iter()
        .find(|p| offered().any(|o| o == p.as_str()));
    // A frame handler gets the frames as they are on the wire: no compression.
    let deflate = match E::STREAMING {
        true => None,
        false => deflate::negotiate(&cfg.deflate, headers),
    };
    let (codec, extensions) = deflate.unzip();
    hijack.on_read(WsProtocol::new(handler, cfg, codec));
    let mut res = Response::new(Full::new(Bytes::new()));
    // Over HTTP/2 a 2xx to the CONNECT opens the tunnel (RFC 8441 §5): 200, no key.
    if !h2 {
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    let h = res.headers_mut();
    if let (false, Some(key)) = (h2, key) {
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
    }
    if let Some(p) = chosen.and_then(|p| HeaderValue::from_str(p).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    if let Some(e) = extensions {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, e);
    }
    res
}

/// The axum extractor for a hop WebSocket: `upgrade.on_upgrade(handler)` answers the handshake.
#[cfg(feature = "axum")]
#[derive(Debug)]
pub struct WsUpgrade {
    method: Method,
    /// An HTTP/2 extended CONNECT handshake.
    h2: bool,
    headers: HeaderMap,
    hijack: Option<Hijack>,
    protocols: Vec<String>,
    cfg: WsConfig,
}

#[cfg(feature = "axum")]
impl WsUpgrade {
    /// Subprotocols the server speaks, in its order of preference: the first of them that the
    /// client offers (in `Sec-WebSocket-Protocol`, in any order) is chosen and answered. With
    /// none in common, or none set, the handshake succeeds with no subprotocol (RFC 6455 4.2.2);
    /// the client decides whether to go on.
    pub fn protocols<I: IntoIterator<Item = S>, S: Into<String>>(mut self, protocols: I) -> Self {
        self.protocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Frame and message size limits.
    pub fn config(mut self, cfg: WsConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Answers the handshake and hands the connection to `handler`.
    pub fn on_upgrade<H: WsHandler>(self, handler: H) -> axum::response::Response {
        self.respond(Messages(handler))
    }

    /// Answers the handshake and hands the connection to a frame handler: it gets frames as
    /// they arrive.
    pub fn on_upgrade_frames<H: WsFrameHandler>(self, handler: H) -> axum::response::Response {
        self.respond(Frames(handler))
    }

    fn respond<E: Endpoint>(self, handler: E) -> axum::response::Response {
        use axum::response::IntoResponse;
        respond(
            &self.method,
            self.h2,
            &self.headers,
            self.hijack,
            &self.protocols,
            self.cfg,
            handler,
        )
        .into_response()
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for WsUpgrade {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let hijack = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .map(|u| Hijack::from_on_upgrade(u).websocket());
        Ok(WsUpgrade {
            method: parts.method.clone(),
            h2: is_extended_connect(&parts.method, &parts.extensions),
            headers: parts.headers.clone(),
            hijack,
            protocols: Vec::new(),
            cfg: WsConfig::default(),
        })
    }
}
