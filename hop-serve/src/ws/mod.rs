//! Event-driven WebSocket (RFC 6455) on read handlers: no task, no stream object and no buffer
//! per idle connection (feature `ws`).
//!
//! [`upgrade`] (or, with the `axum` feature, the [`WsUpgrade`] axum extractor) validates the handshake, answers `101`,
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
//! ```
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
//! # let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! # let addr = listener.local_addr()?;
//! # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # let client = std::thread::spawn(move || {
//! #     let _stop = stop; // the server stops when this thread ends, a panic included
//! #     let s = std::net::TcpStream::connect(addr).unwrap();
//! #     s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
//! #     let url = format!("ws://{addr}/ws");
//! #     let (mut ws, answer) = tokio_tungstenite::tungstenite::client(url, s).unwrap();
//! #     ws.send(Message::text("hello")).unwrap();
//! #     let echo = ws.read().unwrap();
//! #     ws.close(None).unwrap();
//! #     while ws.read().is_ok() {} // until the server's close frame, and the end
//! #     (answer.status(), echo)
//! # });
//! # hop::serve(listener, app).with_graceful_shutdown(async { let _ = stopped.await; }).run()?;
//! # let (status, echo) = client.join().unwrap();
//! # assert_eq!(status, 101);
//! # assert_eq!(echo, Message::text("hello"));
//! # Ok::<(), std::io::Error>(())
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
