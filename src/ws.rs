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

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

pub use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
pub use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::frame::FrameHeader;
pub use tungstenite::Message;
use tungstenite::Utf8Bytes;

use crate::tcp::{CloseReason, Conn, ConnHandle, Handler};
use crate::Hijack;

/// Limits of a WebSocket connection.
#[derive(Debug, Clone, Copy)]
pub struct WsConfig {
    /// Largest frame payload accepted (default 16 MiB); more closes with `1009`.
    pub max_frame_size: usize,
    /// Largest message accepted (default 64 MiB); more closes with `1009`.
    pub max_message_size: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
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

/// The WebSocket as a handler sees it.
pub struct WsConn<'a> {
    conn: &'a mut Conn,
    close_sent: &'a mut bool,
}

impl WsConn<'_> {
    /// Sends a message (text, binary, ping, pong or close).
    pub fn send(&mut self, msg: Message) -> io::Result<()> {
        if let Message::Close(frame) = msg {
            let (code, reason) = frame
                .map(|f| (f.code, f.reason.to_string()))
                .unwrap_or((CloseCode::Normal, String::new()));
            self.close(code, &reason);
            return Ok(());
        }
        if *self.close_sent {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "close already sent",
            ));
        }
        let (op, payload) = message_parts(msg);
        write_frame(self.conn, op, &payload)
    }

    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) -> io::Result<()> {
        write_frame(self.conn, OpCode::Data(Data::Text), text.as_bytes())
    }

    /// Starts the close handshake; the connection closes when the peer answers.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        send_close(self.conn, self.close_sent, code, reason);
    }

    /// The underlying read-handler connection (peer address, timeouts, queued bytes).
    pub fn conn(&mut self) -> &mut Conn {
        self.conn
    }

    /// A `Send + Clone` handle that sends messages from any thread.
    pub fn handle(&mut self) -> WsHandle {
        WsHandle {
            inner: self.conn.handle(),
        }
    }
}

/// Sends WebSocket messages to a connection from any thread.
#[derive(Debug, Clone)]
pub struct WsHandle {
    inner: ConnHandle,
}

impl WsHandle {
    /// Queues a message; refused if the connection's outbound bound would be exceeded or it
    /// has closed.
    pub fn send(&self, msg: Message) -> Result<(), crate::tcp::WriteError> {
        let (op, payload) = match msg {
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (f.code, f.reason.to_string()))
                    .unwrap_or((CloseCode::Normal, String::new()));
                (
                    OpCode::Control(Control::Close),
                    close_payload(code, &reason),
                )
            }
            other => message_parts(other),
        };
        let mut out = BytesMut::new();
        format_frame(&mut out, op, &payload);
        self.inner.write(out.freeze())
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

fn message_parts(msg: Message) -> (OpCode, Bytes) {
    match msg {
        Message::Text(t) => (OpCode::Data(Data::Text), Bytes::from(t)),
        Message::Binary(b) => (OpCode::Data(Data::Binary), b),
        Message::Ping(b) => (OpCode::Control(Control::Ping), b),
        Message::Pong(b) => (OpCode::Control(Control::Pong), b),
        Message::Close(_) => (OpCode::Control(Control::Close), Bytes::new()),
        Message::Frame(f) => (f.header().opcode, f.into_payload()),
    }
}

/// A server frame's header (unmasked, final) for `len` payload bytes: the buffer and its length.
fn frame_header(opcode: OpCode, len: usize) -> ([u8; 14], usize) {
    let header = FrameHeader {
        opcode,
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

fn format_frame(out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
    let (head, n) = frame_header(opcode, payload.len());
    out.reserve(n + payload.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
}

fn write_frame(conn: &mut Conn, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
    let (head, n) = frame_header(opcode, payload.len());
    conn.write_parts(&[&head[..n], payload])?;
    Ok(())
}

fn close_payload(code: CloseCode, reason: &str) -> Bytes {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&u16::from(code).to_be_bytes());
    p.extend_from_slice(reason.as_bytes());
    Bytes::from(p)
}

fn send_close(conn: &mut Conn, close_sent: &mut bool, code: CloseCode, reason: &str) {
    if *close_sent {
        return;
    }
    *close_sent = true;
    // The peer has the close timeout to answer (RFC 6455 7.1.1: the server closes the TCP
    // connection once the handshake is done, or after a while if it is not).
    conn.start_close_clock();
    let payload = close_payload(code, reason);
    // If even a close frame does not fit, the peer is not reading: just close.
    if write_frame(conn, OpCode::Control(Control::Close), &payload).is_err() {
        conn.close();
    }
}

/// The read handler that speaks WebSocket for a [`WsHandler`].
struct WsProtocol<H> {
    handler: H,
    cfg: WsConfig,
    /// A fragmented message being assembled: its opcode and bytes so far.
    /// (Boxed, as is `close_received`: an idle connection has neither, and its state stays
    /// small.)
    partial: Option<Box<(Data, BytesMut)>>,
    close_sent: bool,
    close_received: Option<Box<(Option<CloseCode>, String)>>,
}

/// Why the protocol closes the connection.
struct Fail(CloseCode, &'static str);

impl<H: WsHandler> WsProtocol<H> {
    fn ws<'a>(conn: &'a mut Conn, close_sent: &'a mut bool) -> WsConn<'a> {
        WsConn { conn, close_sent }
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
            let mut cur = Cursor::new(&input[..]);
            let (header, len) = match FrameHeader::parse(&mut cur) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(_) => return Err(Fail(CloseCode::Protocol, "bad frame header")),
            };
            let head_len = cur.position() as usize;
            if len > self.cfg.max_frame_size as u64 {
                return Err(Fail(CloseCode::Size, "frame too large"));
            }
            let len = len as usize;
            if let OpCode::Data(Data::Continue) = header.opcode {
                let so_far = self.partial.as_ref().map_or(0, |p| p.1.len());
                if so_far + len > self.cfg.max_message_size {
                    return Err(Fail(CloseCode::Size, "message too large"));
                }
            } else if len > self.cfg.max_message_size {
                return Err(Fail(CloseCode::Size, "message too large"));
            }
            if input.len() < head_len + len {
                // Wait for the rest. The input buffer grows with what arrives, in the read
                // loop's chunks, never by what a header claims: a header that declares 16 MiB
                // costs nothing until 16 MiB are sent.
                return Ok(());
            }
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(Fail(CloseCode::Protocol, "reserved bits set"));
            }
            let Some(mask) = header.mask else {
                return Err(Fail(CloseCode::Protocol, "unmasked client frame"));
            };
            input.advance(head_len);
            let mut payload = input.split_to(len);
            unmask(&mut payload, mask);
            self.frame(conn, header.is_final, header.opcode, payload)?;
        }
    }

    fn frame(
        &mut self,
        conn: &mut Conn,
        fin: bool,
        op: OpCode,
        payload: BytesMut,
    ) -> Result<(), Fail> {
        match op {
            OpCode::Control(c) => {
                if !fin || payload.len() > 125 {
                    return Err(Fail(CloseCode::Protocol, "bad control frame"));
                }
                match c {
                    Control::Ping => {
                        if !self.close_sent {
                            write_frame(conn, OpCode::Control(Control::Pong), &payload)
                                .map_err(|_| Fail(CloseCode::Size, "outbound buffer full"))?;
                        }
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
                let Some((_, buf)) = self.partial.as_deref_mut() else {
                    return Err(Fail(CloseCode::Protocol, "continuation without a message"));
                };
                buf.extend_from_slice(&payload);
                if fin {
                    let (kind, buf) = *self.partial.take().expect("checked above");
                    self.message(conn, kind, buf)?;
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
                    self.message(conn, kind, payload)
                } else {
                    self.partial = Some(Box::new((kind, payload)));
                    Ok(())
                }
            }
        }
    }

    fn message(&mut self, conn: &mut Conn, kind: Data, payload: BytesMut) -> Result<(), Fail> {
        let msg = match kind {
            Data::Text => match Utf8Bytes::try_from(payload.freeze()) {
                Ok(t) => Message::Text(t),
                Err(_) => return Err(Fail(CloseCode::Invalid, "text is not UTF-8")),
            },
            _ => Message::Binary(payload.freeze()),
        };
        if self.close_sent {
            return Ok(());
        }
        let mut ws = Self::ws(conn, &mut self.close_sent);
        if let Err(e) = self.handler.on_message(&mut ws, msg) {
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

impl<H: WsHandler> Handler for WsProtocol<H> {
    fn on_open(&mut self, conn: &mut Conn) -> io::Result<()> {
        // A whole frame (and its header) must fit the input buffer.
        conn.set_max_read_buffer(self.cfg.max_frame_size + 14);
        let mut ws = Self::ws(conn, &mut self.close_sent);
        self.handler.on_open(&mut ws)
    }

    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> io::Result<()> {
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
        self.handler.on_close(code, &text);
    }
}

/// Validates a WebSocket handshake and answers `101`, handing the connection to `handler`;
/// answers `400` (or `426`) when the request is not a valid handshake.
pub fn upgrade<B, H: WsHandler>(mut req: Request<B>, handler: H) -> Response<Full<Bytes>> {
    let hijack = Hijack::from_request(&mut req);
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
fn respond<H: WsHandler>(
    method: &Method,
    h2: bool,
    headers: &HeaderMap,
    hijack: Option<Hijack>,
    protocols: &[String],
    cfg: WsConfig,
    handler: H,
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
    if key.is_none() && !h2 {
        return bad(StatusCode::BAD_REQUEST, "missing sec-websocket-key");
    }
    let Some(hijack) = hijack else {
        return bad(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        );
    };
    let chosen = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| protocols.iter().any(|q| q == p))
        .map(str::to_owned);
    hijack.on_read(WsProtocol {
        handler,
        cfg,
        partial: None,
        close_sent: false,
        close_received: None,
    });
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
    if let Some(p) = chosen.and_then(|p| HeaderValue::from_str(&p).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
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
    /// Subprotocols the server speaks, in preference order; the first one the client offers is
    /// chosen.
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
            .map(Hijack::from_on_upgrade);
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
