//! `hop::ws` protocol edges on both backends, with raw frames over a raw socket and a real
//! client: control frames whose header is already wrong (`1002` before any payload), handshake
//! keys that are not 16 bytes of base64 (`400`), the one close state every send path checks,
//! subprotocol choice (the server's order), oversized Pings and Pongs from the server side
//! (dropped, not fatal), and limits and durations at the end of their range (no overflow).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::routing::any;
use axum::Router;
use compat_tests::{backend_tests, ws_frame, ws_handshake, ws_handshake_with, ws_read_raw_frame};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures_util::{SinkExt, StreamExt};
use hop::ws::{
    CloseCode, CloseFrame, Deflate, FrameKind, Message, WsConfig, WsConn, WsHandler, WsUpgrade,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WAIT: Duration = Duration::from_secs(15);

/// Echoes; `close-conn`, `close-handle` and `close-mixed` close in various ways and try to send
/// more; `big` sends oversized control frames, then `ok`.
struct Edges(Arc<Mutex<Vec<String>>>);

impl WsHandler for Edges {
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
        let Message::Text(t) = &msg else {
            return ws.send(msg);
        };
        let close = |code: u16, reason: &str| {
            Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            }))
        };
        match t.as_str() {
            "close-conn" => {
                ws.close(CloseCode::from(4000), "first");
                ws.close(CloseCode::from(4001), "second");
                let refused = [
                    ws.send(Message::text("after")).is_err(),
                    ws.send_text("after").is_err(),
                    ws.send_frame(FrameKind::Binary, true, b"after").is_err(),
                    ws.send(Message::Ping("p".into())).is_err(),
                    ws.send(close(4002, "third")).is_ok(),
                ];
                self.0.lock().unwrap().push(format!("{refused:?}"));
            }
            "close-handle" => {
                let h = ws.handle();
                std::thread::spawn(move || {
                    h.send(close(4000, "first")).unwrap();
                    let _ = h.send(Message::text("after"));
                    let _ = h.send_frame(FrameKind::Binary, true, b"after");
                    let _ = h.send(Message::Pong("p".into()));
                    let _ = h.send(close(4001, "second"));
                })
                .join()
                .unwrap();
            }
            "close-mixed" => {
                let h = ws.handle();
                ws.close(CloseCode::from(4000), "first");
                let _ = h.send(Message::text("after"));
                let _ = h.send(close(4001, "second"));
            }
            "close-long-reason" => {
                ws.close(CloseCode::from(4000), &"é".repeat(100));
            }
            "big" => {
                ws.send(Message::Pong(vec![1u8; 200].into()))?;
                ws.send(Message::Ping(vec![2u8; 126].into()))?;
                let h = ws.handle();
                assert!(h.send(Message::Pong(vec![3u8; 200].into())).is_ok());
                assert!(h.send(Message::Ping(vec![4u8; 200].into())).is_ok());
                ws.send_text("ok")?;
            }
            _ => ws.send(msg)?,
        }
        Ok(())
    }
}

/// The largest limits and durations there are.
fn max() -> WsConfig {
    WsConfig {
        max_frame_size: usize::MAX,
        max_message_size: usize::MAX,
        keep_alive_interval: Some(Duration::MAX),
        keep_alive_timeout: Duration::MAX,
        deflate: Deflate {
            history_idle: Duration::MAX,
            threshold: 32,
            ..Deflate::default()
        },
    }
}

/// A message limit below the inflater's first buffer (64 bytes).
fn tiny() -> WsConfig {
    WsConfig {
        max_message_size: 10,
        ..WsConfig::default()
    }
}

fn app(log: Arc<Mutex<Vec<String>>>) -> Router {
    let l = log.clone();
    Router::new()
        .route(
            "/ws",
            any(move |u: WsUpgrade| {
                let log = l.clone();
                async move { u.on_upgrade(Edges(log)) }
            }),
        )
        .route(
            "/ws-fn",
            any(move |req: Request| {
                let log = log.clone();
                async move { hop::ws::upgrade(req, Edges(log)) }
            }),
        )
        .route(
            "/ws-proto",
            any(|u: WsUpgrade| async move {
                u.protocols(["a", "b"]).on_upgrade(compat_tests::WsEcho)
            }),
        )
        .route(
            "/ws-max",
            any(|u: WsUpgrade| async move { u.config(max()).on_upgrade(compat_tests::WsEcho) }),
        )
        .route(
            "/ws-tiny",
            any(|u: WsUpgrade| async move { u.config(tiny()).on_upgrade(compat_tests::WsEcho) }),
        )
}

fn start(backend: hop::Backend) -> (compat_tests::TestServer, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    (compat_tests::start(backend, app(log.clone()), |b| b), log)
}

/// Reads server frames up to a close frame: the frames before it, and the close's payload.
async fn until_close(s: &mut TcpStream) -> (Vec<(u8, Vec<u8>)>, Vec<u8>) {
    let mut before = Vec::new();
    loop {
        let (b0, payload) = ws_read_raw_frame(s).await;
        if b0 & 0x0f == 0x8 {
            return (before, payload);
        }
        before.push((b0, payload));
    }
}

/// Answers the server's close and checks that nothing else comes before the connection ends.
async fn answer_close_then_end(s: &mut TcpStream) {
    let _ = s
        .write_all(&ws_frame(true, 0x8, &1000u16.to_be_bytes(), true))
        .await;
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("the connection ends")
        .ok();
    assert!(rest.is_empty(), "after the close: {rest:?}");
}

fn code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// Raw deflate with the closing empty block's 4 bytes removed (RFC 7692 7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Inflates one message with the client's decompressor (which keeps its window).
fn inflate(d: &mut Decompress, data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(64 * 1024);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

/// A compressed text message in one frame (RSV1), masked.
fn compressed_frame(text: &str) -> Vec<u8> {
    let mut f = ws_frame(true, 0x1, &deflate(text.as_bytes()), true);
    f[0] |= 0x40;
    f
}

async fn handshake_status(addr: SocketAddr, path: &str, key: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: {key}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

backend_tests! {
    /// RFC 6455 5.5: a control frame's payload is at most 125 bytes and it is not fragmented;
    /// the header says so before any payload arrives, and none is sent here.
    async fn bad_control_frame_headers_are_1002_at_once(backend) {
        let (srv, _) = start(backend);
        let mask = [1, 2, 3, 4];
        let mut headers: Vec<Vec<u8>> = Vec::new();
        // A Ping declaring 16 MiB (under max_frame_size: hop used to wait for all of it).
        let mut h = vec![0x89, 0x80 | 127];
        h.extend_from_slice(&(16u64 << 20).to_be_bytes());
        headers.push(h);
        // A Pong declaring 126 bytes, a Close declaring 200.
        headers.push(vec![0x8A, 0x80 | 126, 0, 126]);
        headers.push(vec![0x88, 0x80 | 126, 0, 200]);
        // A fragmented Ping (FIN clear).
        headers.push(vec![0x09, 0x80 | 5]);
        for mut h in headers {
            let mut s = ws_handshake(srv.addr, "/ws").await;
            h.extend_from_slice(&mask);
            let sent = std::time::Instant::now();
            s.write_all(&h).await.unwrap();
            let (before, payload) = until_close(&mut s).await;
            eprintln!("[{backend}] control header {:02x?}: {} after {:?}", &h[..2], code(&payload), sent.elapsed());
            assert!(before.is_empty(), "{before:?}");
            assert_eq!(code(&payload), 1002, "header {h:?}");
        }
        // The largest control frame there may be is answered.
        let mut s = ws_handshake(srv.addr, "/ws").await;
        s.write_all(&ws_frame(true, 0x9, &[7u8; 125], true)).await.unwrap();
        let (b0, payload) = ws_read_raw_frame(&mut s).await;
        assert_eq!((b0, payload), (0x8A, vec![7u8; 125]));
        srv.handle.shutdown();
    }

    /// RFC 6455 4.1: the key is 16 random bytes, base64-encoded: 24 characters.
    async fn a_key_that_is_not_16_bytes_of_base64_is_400(backend) {
        let (srv, _) = start(backend);
        let bad = [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",          // 16 bytes, unpadded (22 characters)
            "!!!!!!!!!!!!!!!!!!!!!!==",        // not base64
            "MDEyMzQ1Njc4OWFiY2RlZmc=",        // 17 bytes
            "MDEyMzQ1Njc4OWFiY2RlZmdo",        // 18 bytes
            "MDEyMzQ1Njc4OWFiY2Rl",            // 15 bytes
            "dGhlIHNhbXBsZSBub25jZR==",        // non-zero trailing bits
            " dGhlIHNhbXBsZSBub25jZQ==x",
        ];
        for path in ["/ws", "/ws-fn"] {
            for key in bad {
                let status = handshake_status(srv.addr, path, key).await;
                assert!(status.starts_with("HTTP/1.1 400"), "{path} {key:?}: {status}");
            }
            let status = handshake_status(srv.addr, path, "dGhlIHNhbXBsZSBub25jZQ==").await;
            assert!(status.starts_with("HTTP/1.1 101"), "{path}: {status}");
        }
        srv.handle.shutdown();
    }

    /// Closes from the handler, from a handle, and from both: exactly one close frame goes
    /// out, and nothing after it.
    async fn one_close_and_nothing_after_it(backend) {
        let (srv, log) = start(backend);
        for (path, msg) in [
            ("/ws", "close-conn"),
            ("/ws", "close-handle"),
            ("/ws", "close-mixed"),
            ("/ws-fn", "close-conn"),
            ("/ws-fn", "close-handle"),
        ] {
            let mut s = ws_handshake(srv.addr, path).await;
            s.write_all(&ws_frame(true, 0x1, msg.as_bytes(), true)).await.unwrap();
            let (before, payload) = until_close(&mut s).await;
            assert!(before.is_empty(), "{msg}: {before:?}");
            assert_eq!(code(&payload), 4000, "{msg}");
            assert_eq!(&payload[2..], b"first", "{msg}");
            answer_close_then_end(&mut s).await;
        }
        // WsConn's sends after the close were refused, a second close ignored.
        let log = log.lock().unwrap().clone();
        assert_eq!(log, vec!["[true, true, true, true, true]"; 2]);
        // A long reason is cut at a character boundary to fit 125 bytes.
        let mut s = ws_handshake(srv.addr, "/ws").await;
        s.write_all(&ws_frame(true, 0x1, b"close-long-reason", true)).await.unwrap();
        let (_, payload) = until_close(&mut s).await;
        assert_eq!(code(&payload), 4000);
        assert_eq!(std::str::from_utf8(&payload[2..]).unwrap(), "é".repeat(61));
        answer_close_then_end(&mut s).await;
        srv.handle.shutdown();
    }

    /// The server's first choice among those the client offers, in any order; none in common
    /// is no subprotocol.
    async fn subprotocol_is_the_servers_first_choice(backend) {
        let (srv, _) = start(backend);
        for (offer, want) in [
            ("sec-websocket-protocol: b, a\r\n", Some("a")),
            ("sec-websocket-protocol: c, b\r\n", Some("b")),
            ("sec-websocket-protocol: c\r\nsec-websocket-protocol: b,a\r\n", Some("a")),
            ("sec-websocket-protocol: c\r\n", None),
            ("", None),
        ] {
            let (_, head) = ws_handshake_with(srv.addr, "/ws-proto", offer).await;
            let got = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("sec-websocket-protocol: ").map(str::to_owned));
            assert_eq!(got.as_deref(), want, "{offer:?}");
        }
        // A real client's view.
        let mut req = format!("ws://{}/ws-proto", srv.addr).into_client_request().unwrap();
        req.headers_mut().insert("sec-websocket-protocol", "x, b, a".parse().unwrap());
        let (mut ws, res) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(res.headers()["sec-websocket-protocol"], "a");
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
        srv.handle.shutdown();
    }

    /// A Ping or Pong over 125 bytes from the server side is dropped, not sent and not fatal.
    async fn oversized_pings_and_pongs_are_dropped(backend) {
        let (srv, _) = start(backend);
        let mut s = ws_handshake(srv.addr, "/ws").await;
        s.write_all(&ws_frame(true, 0x1, b"big", true)).await.unwrap();
        assert_eq!(ws_read_raw_frame(&mut s).await, (0x81, b"ok".to_vec()));
        s.write_all(&ws_frame(true, 0x1, b"still open", true)).await.unwrap();
        assert_eq!(ws_read_raw_frame(&mut s).await, (0x81, b"still open".to_vec()));
        srv.handle.shutdown();
    }

    /// usize::MAX limits and Duration::MAX keep-alive and history: echoes, compressed or not,
    /// whole or fragmented; and a message limit under the inflater's first buffer.
    async fn limits_at_the_end_of_their_range(backend) {
        let (srv, _) = start(backend);
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws-max", srv.addr)).await.unwrap();
        for msg in [Message::text("hello"), Message::binary(vec![9u8; 100_000])] {
            ws.send(msg.clone()).await.unwrap();
            assert_eq!(tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap(), msg);
        }
        let ext = "sec-websocket-extensions: permessage-deflate\r\n";
        let (mut s, head) = ws_handshake_with(srv.addr, "/ws-max", ext).await;
        assert!(head.contains("permessage-deflate"), "{head}");
        let text = "a compressed message, long enough to go back compressed";
        let mut d = Decompress::new(false);
        for _ in 0..2 {
            s.write_all(&compressed_frame(text)).await.unwrap();
            let (b0, payload) = ws_read_raw_frame(&mut s).await;
            assert_eq!(b0, 0xC1, "compressed text");
            assert_eq!(inflate(&mut d, &payload), text.as_bytes());
        }
        // Fragmented: the message's size so far adds up against usize::MAX.
        s.write_all(&ws_frame(false, 0x2, b"frag", true)).await.unwrap();
        s.write_all(&ws_frame(true, 0x0, b"ment", true)).await.unwrap();
        assert_eq!(ws_read_raw_frame(&mut s).await, (0x82, b"fragment".to_vec()));

        let (mut s, _) = ws_handshake_with(srv.addr, "/ws-tiny", ext).await;
        s.write_all(&compressed_frame("hello")).await.unwrap();
        assert_eq!(ws_read_raw_frame(&mut s).await, (0x81, b"hello".to_vec()));
        s.write_all(&compressed_frame("more than ten bytes")).await.unwrap();
        let (before, payload) = until_close(&mut s).await;
        assert!(before.is_empty());
        assert_eq!(code(&payload), 1009);
        srv.handle.shutdown();
    }
}
