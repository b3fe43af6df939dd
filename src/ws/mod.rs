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

pub use tungstenite::protocol::frame::coding::CloseCode;
pub use tungstenite::protocol::frame::CloseFrame;
pub use tungstenite::Message;

// The rooms, each importing only those below it: `handshake` (the upgrade) -> `protocol`
// (`WsProtocol`, the read handler) -> `api` (what a handler sees) -> `frame` (the wire and the
// send helpers) -> `deflate` (permessage-deflate).
mod api;
mod deflate;
mod frame;
mod handshake;
mod protocol;

pub use api::{FrameChunk, FrameKind, WsConfig, WsConn, WsFrameHandler, WsHandle, WsHandler};
pub use deflate::Deflate;
#[cfg(feature = "axum")]
pub use handshake::WsUpgrade;
pub use handshake::{upgrade, upgrade_frames};
