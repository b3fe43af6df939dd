//! `hop::ws` on both backends, with a real WebSocket client (tokio-tungstenite) and raw frames
//! over a raw socket for what a well-behaved client never sends.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use compat_tests::{backend_tests, ws_frame as frame};
use futures_util::{SinkExt, StreamExt};
use hop::ws::{Message, WsConn, WsHandler, WsUpgrade};
use hop::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const WAIT: Duration = Duration::from_secs(20);

struct Echo;

impl WsHandler for Echo {
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
        ws.send(msg)
    }
}

async fn ws(upgrade: WsUpgrade) -> axum::response::Response {
    upgrade.protocols(["echo.v1"]).on_upgrade(Echo)
}

/// Answers any message with what `WsConn` tells of its connection.
struct WhoAmI;

impl WsHandler for WhoAmI {
    fn on_message(&mut self, ws: &mut WsConn<'_>, _: Message) -> std::io::Result<()> {
        let about = format!(
            "{} {} {} {}",
            ws.peer_addr()?,
            ws.local_addr()?,
            ws.queued(),
            ws.write_capacity() > 0
        );
        ws.send(Message::text(about))
    }
}

fn start(backend: Backend) -> (SocketAddr, hop::Handle) {
    let app = Router::new().route("/ws", get(ws)).route(
        "/whoami",
        get(|u: WsUpgrade| async move { u.on_upgrade(WhoAmI) }),
    );
    // Defaults: the 16 MiB echo must pass with them (the write bound is a high-water mark).
    let srv = compat_tests::start(backend, app, |b| b);
    (srv.addr, srv.handle)
}

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect(addr: SocketAddr) -> Client {
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, res) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), Some(cfg), false)
            .await
            .expect("handshake");
    assert_eq!(res.status(), 101);
    ws
}

async fn next(ws: &mut Client) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("timed out waiting for a message")
        .expect("stream ended")
        .expect("websocket error")
}

/// A raw socket after a successful handshake.
async fn raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    s
}

/// Reads server frames until a close frame; returns its code.
async fn close_code(s: &mut TcpStream) -> u16 {
    loop {
        let mut h = [0u8; 2];
        tokio::time::timeout(WAIT, s.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            len = u16::from_be_bytes(b) as u64;
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.unwrap();
            len = u64::from_be_bytes(b);
        }
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        if h[0] & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

backend_tests! {
    /// `WsConn` tells the connection's addresses and its outbound queue, read-only.
    async fn the_connection_is_described(backend) {
        let (addr, handle) = start(backend);
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/whoami"))
            .await
            .expect("handshake");
        let client = match ws.get_ref() {
            tokio_tungstenite::MaybeTlsStream::Plain(s) => s.local_addr().unwrap(),
            _ => unreachable!("plain ws://"),
        };
        ws.send(Message::text("?")).await.unwrap();
        assert_eq!(
            next(&mut ws).await,
            Message::text(format!("{client} {addr} 0 true")),
            "[{backend}]"
        );
        handle.shutdown();
    }

    async fn text_and_binary_echo(backend) {
        let (addr, handle) = start(backend);
        let mut ws = connect(addr).await;
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text("hello"));
        ws.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::binary(vec![0u8, 1, 2, 255]));
        handle.shutdown();
    }

    async fn large_messages(backend) {
        let (addr, handle) = start(backend);
        let mut ws = connect(addr).await;
        for size in [64 * 1024, 16 << 20] {
            let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            ws.send(Message::binary(data.clone())).await.unwrap();
            match next(&mut ws).await {
                Message::Binary(b) => assert!(b[..] == data[..], "{size} bytes differ"),
                other => panic!("unexpected {other:?}"),
            }
        }
        handle.shutdown();
    }

    async fn fragments_with_pings_between(backend) {
        let (addr, handle) = start(backend);
        let mut s = raw(addr).await;
        s.write_all(&frame(false, 0x1, b"frag", true)).await.unwrap();
        s.write_all(&frame(true, 0x9, b"p1", true)).await.unwrap();
        s.write_all(&frame(false, 0x0, b"men", true)).await.unwrap();
        s.write_all(&frame(true, 0x9, b"p2", true)).await.unwrap();
        s.write_all(&frame(true, 0x0, b"ted", true)).await.unwrap();
        // Expect pong p1, pong p2, then the assembled text.
        let mut want = Vec::new();
        want.extend(frame(true, 0xA, b"p1", false));
        want.extend(frame(true, 0xA, b"p2", false));
        want.extend(frame(true, 0x1, b"fragmented", false));
        let mut got = vec![0; want.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, want);
        handle.shutdown();
    }

    async fn frames_fed_one_byte_at_a_time(backend) {
        let (addr, handle) = start(backend);
        let mut s = raw(addr).await;
        s.set_nodelay(true).unwrap();
        for b in frame(true, 0x1, "héllo, byte by byte".as_bytes(), true) {
            s.write_all(&[b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let want = frame(true, 0x1, "héllo, byte by byte".as_bytes(), false);
        let mut got = vec![0; want.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, want);
        handle.shutdown();
    }

    async fn close_handshake(backend) {
        let (addr, handle) = start(backend);
        let mut ws = connect(addr).await;
        ws.close(None).await.unwrap();
        // The server answers the close and the stream ends cleanly.
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await.expect("timed out") {
                Some(Ok(Message::Close(_))) => continue,
                None => break,
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                Some(Err(e)) => panic!("close handshake failed: {e}"),
            }
        }
        handle.shutdown();
    }

    async fn unmasked_frame_is_a_protocol_error(backend) {
        let (addr, handle) = start(backend);
        let mut s = raw(addr).await;
        s.write_all(&frame(true, 0x1, b"no mask", false)).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1002);
        handle.shutdown();
    }

    async fn bad_utf8_is_1007(backend) {
        let (addr, handle) = start(backend);
        let mut s = raw(addr).await;
        s.write_all(&frame(true, 0x1, &[0xff, 0xfe, 0x41], true)).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1007);
        handle.shutdown();
    }

    async fn oversized_message_is_1009(backend) {
        let (addr, handle) = start(backend);
        let mut s = raw(addr).await;
        // A 17 MiB frame header (over the 16 MiB frame limit); no payload needed.
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&(17u64 << 20).to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        s.write_all(&f).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1009);
        handle.shutdown();
    }

    async fn subprotocol_is_negotiated(backend) {
        let (addr, handle) = start(backend);
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
              sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              sec-websocket-protocol: chat, echo.v1\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = vec![0; 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(head.contains("sec-websocket-protocol: echo.v1"), "{head}");
        handle.shutdown();
    }

    async fn not_a_handshake_is_rejected(backend) {
        let (addr, handle) = start(backend);
        let res = reqwest::get(format!("http://{addr}/ws")).await.unwrap();
        assert_eq!(res.status(), 426);
        handle.shutdown();
    }

    async fn a_thousand_sockets(backend) {
        let (addr, handle) = start(backend);
        let mut clients = Vec::new();
        for _ in 0..1000 {
            clients.push(connect(addr).await);
        }
        for (i, ws) in clients.iter_mut().enumerate() {
            ws.send(Message::text(format!("m{i}"))).await.unwrap();
        }
        for (i, ws) in clients.iter_mut().enumerate() {
            assert_eq!(next(ws).await, Message::text(format!("m{i}")));
        }
        handle.shutdown();
    }

    async fn shutdown_sends_going_away(backend) {
        let (addr, handle) = start(backend);
        let mut ws = connect(addr).await;
        ws.send(Message::text("x")).await.unwrap();
        next(&mut ws).await;
        handle.shutdown();
        match next(&mut ws).await {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
