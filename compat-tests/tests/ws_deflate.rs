//! `hop::ws` permessage-deflate (RFC 7692) on both backends, with default settings unless a
//! test says otherwise.
//!
//! A real client, Python `websockets` (`ws_deflate_client.py`), checks compressed messages of
//! 16 B to 1 MiB, fragmented compressed messages, every window-bits value, both
//! no-context-takeover flags, client context takeover where a route allows it, a declined offer,
//! and messages pushed from a `WsHandle`. Hand-written frames check what that client never
//! sends: control frames between compressed fragments, RSV1 where it is not allowed (1002),
//! invalid compressed data (1007), a deflate bomb (1009), and the wire: compressed echoes carry
//! RSV1, refer back to earlier messages while the server keeps history, and stop doing so once
//! the history is released.

use std::net::SocketAddr;
use std::time::Duration;

use compat_tests::{
    backend_tests, run_tool, start, unavailable, ws_frame, ws_handshake_with, ws_read_raw_frame,
};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use hop::ws::{Deflate, Message, WsConfig, WsConn, WsHandler, WsUpgrade};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ws_deflate_client.py");

/// Echoes messages; `/push` instead sends 200 messages from a handle on another thread.
struct Echo;

impl WsHandler for Echo {
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
        ws.send(msg)
    }
}

struct Push;

impl WsHandler for Push {
    fn on_open(&mut self, ws: &mut WsConn<'_>) -> std::io::Result<()> {
        assert!(ws.is_compressed());
        let handle = ws.handle();
        std::thread::spawn(move || {
            for i in 0..200 {
                let msg = format!("{{\"seq\":{i},\"data\":\"{}\"}}", "abcdefgh".repeat(20));
                while let Err(e) = handle.send(Message::text(msg.clone())) {
                    assert!(!handle.is_closed(), "{e:?}");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Ok(())
    }
    fn on_message(&mut self, _: &mut WsConn<'_>, _: Message) -> std::io::Result<()> {
        Ok(())
    }
}

fn route(cfg: WsConfig) -> axum::routing::MethodRouter {
    axum::routing::any(move |u: WsUpgrade| async move { u.config(cfg).on_upgrade(Echo) })
}

fn app() -> axum::Router {
    let client_context = WsConfig {
        deflate: Deflate {
            client_no_context_takeover: false,
            ..Deflate::default()
        },
        ..WsConfig::default()
    };
    let short_history = WsConfig {
        deflate: Deflate {
            history_idle: Duration::from_millis(300),
            ..Deflate::default()
        },
        ..WsConfig::default()
    };
    let off = WsConfig {
        deflate: Deflate::disabled(),
        ..WsConfig::default()
    };
    axum::Router::new()
        .route("/ws", route(WsConfig::default()))
        .route("/client-context", route(client_context))
        .route("/short-history", route(short_history))
        .route("/off", route(off))
        .route(
            "/push",
            axum::routing::any(|u: WsUpgrade| async move { u.on_upgrade(Push) }),
        )
}

/// Runs one case of the Python client (Python `websockets` missing is a failure).
async fn python(addr: SocketAddr, path: &str, case: &str) {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import websockets.sync.client"])
        .output()
        .await;
    if !probe.is_ok_and(|o| o.status.success()) {
        unavailable("python3 with the websockets package (pip install websockets)");
    }
    let url = format!("ws://{addr}{path}");
    let out = run_tool(
        "python3",
        &[CLIENT, &url, case],
        b"",
        Duration::from_secs(120),
    )
    .await;
    assert!(out.trim_end().ends_with("done"), "{out}");
}

/// Opens a WebSocket offering `extensions`; the socket and the server's answer header.
async fn handshake(addr: SocketAddr, path: &str, extensions: &str) -> (TcpStream, Option<String>) {
    let extra = format!("sec-websocket-extensions: {extensions}\r\n");
    let (s, head) = ws_handshake_with(addr, path, &extra).await;
    let ext = head
        .lines()
        .find_map(|l| l.strip_prefix("sec-websocket-extensions: "))
        .map(str::to_owned);
    (s, ext)
}

async fn close_code(s: &mut TcpStream) -> u16 {
    loop {
        let (b0, payload) = ws_read_raw_frame(s).await;
        if b0 & 0x0f == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// Compresses a message as a client without context does (the closing four bytes removed).
fn compress(data: &[u8]) -> Vec<u8> {
    compress_with(&mut Compress::new(Compression::default(), false), data)
}

/// Compresses a message with `c` from where its stream stands (the closing four bytes removed).
fn compress_with(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let start = c.total_in();
    let mut out = Vec::with_capacity(data.len() + 64);
    loop {
        let done = (c.total_in() - start) as usize;
        out.reserve(data.len().max(1024));
        c.compress_vec(&data[done..], &mut out, FlushCompress::Sync)
            .expect("compress");
        if (c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Inflates a server message with `d` (a client's decompressor, which keeps context unless
/// made anew); `None` if it does not decode.
fn inflate(d: &mut Decompress, data: &[u8]) -> Option<Vec<u8>> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .ok()?;
    Some(out)
}

/// A masked client frame with RSV1 set.
fn rsv1_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ws_frame(fin, opcode, payload, true);
    f[0] |= 0x40;
    f
}

fn json(i: usize) -> String {
    format!(
        "{{\"type\":\"trade\",\"seq\":{i},\"symbol\":\"BTC-USD\",\"price\":\"{}.25\",\"side\":\"buy\"}}",
        40_000 + i * 7
    )
}

backend_tests! {
    /// Compressed text and binary messages of 16 B to 1 MiB, compressible and not.
    async fn python_message_sizes(backend) {
        let srv = start(backend, app(), |b| b);
        python(srv.addr, "/ws", "sizes").await;
    }

    /// Fragmented compressed messages (RSV1 on the first frame only) of 2 to 10 frames.
    async fn python_fragmented(backend) {
        let srv = start(backend, app(), |b| b);
        python(srv.addr, "/ws", "fragmented").await;
    }

    /// `server_max_window_bits` and `client_max_window_bits` from 8 to 15.
    async fn python_window_bits(backend) {
        let srv = start(backend, app(), |b| b);
        python(srv.addr, "/ws", "window_bits").await;
    }

    /// `server_no_context_takeover` and `client_no_context_takeover` offered, alone and together.
    async fn python_no_context_takeover(backend) {
        let srv = start(backend, app(), |b| b);
        python(srv.addr, "/ws", "no_context_takeover").await;
    }

    /// A route that lets the client keep its context: 300 messages, each referring back.
    async fn python_client_context_takeover(backend) {
        let srv = start(backend, app(), |b| b);
        python(srv.addr, "/client-context", "client_context").await;
    }

    /// `Deflate::disabled()` declines the offer; messages flow uncompressed.
    async fn python_declined(backend) {
        let srv = start(backend, app(), |b| b);
        python(srv.addr, "/off", "declined").await;
    }

    /// Messages sent from a `WsHandle` on another thread are compressed on the connection's
    /// thread, in order.
    async fn python_messages_from_a_handle(backend) {
        let srv = start(backend, app(), |b| b);
        python(srv.addr, "/push", "pushed").await;
    }

    /// On the wire: the echo has RSV1 and is compressed; later echoes refer back to earlier
    /// ones (a fresh decompressor cannot read them) while the server keeps its history, and a
    /// JSON stream shrinks well below half.
    async fn compressed_echoes_use_history(backend) {
        let srv = start(backend, app(), |b| b);
        let (mut s, ext) = handshake(srv.addr, "/ws", "permessage-deflate; client_max_window_bits").await;
        assert_eq!(ext.as_deref(), Some("permessage-deflate; client_no_context_takeover"));
        let mut client = Decompress::new(false);
        let (mut raw, mut wire) = (0, 0);
        for i in 0..100 {
            let msg = json(i);
            s.write_all(&rsv1_frame(true, 0x1, &compress(msg.as_bytes()))).await.unwrap();
            let (b0, payload) = ws_read_raw_frame(&mut s).await;
            assert_eq!(b0, 0x80 | 0x40 | 0x1, "FIN, RSV1, text");
            assert_eq!(inflate(&mut client, &payload).unwrap(), msg.as_bytes());
            if i > 0 {
                let alone = inflate(&mut Decompress::new(false), &payload);
                assert_ne!(alone.as_deref(), Some(msg.as_bytes()), "message {i} refers back");
            }
            raw += msg.len();
            wire += payload.len();
        }
        assert!(wire * 3 < raw, "{wire} compressed bytes for {raw}");
        // Under the threshold: sent as it is.
        s.write_all(&ws_frame(true, 0x1, b"short", true)).await.unwrap();
        assert_eq!(ws_read_raw_frame(&mut s).await, (0x81, b"short".to_vec()));
    }

    /// Every window size: `client_max_window_bits=8` to 15 and `server_max_window_bits=8` to 15
    /// are answered as offered, a client compressing with that window is read, and what the
    /// server sends decodes with a window of that size.
    async fn every_window_size_on_the_wire(backend) {
        let srv = start(backend, app(), |b| b);
        for bits in 8u8..=15 {
            let offer = format!(
                "permessage-deflate; client_max_window_bits={bits}; server_max_window_bits={bits}"
            );
            let (mut s, ext) = handshake(srv.addr, "/ws", &offer).await;
            let ext = ext.expect("accepted");
            assert!(ext.contains(&format!("server_max_window_bits={bits}")), "{ext}");
            if bits < 15 {
                assert!(ext.contains(&format!("client_max_window_bits={bits}")), "{ext}");
            }
            // zlib compresses with 9 bits at least; 8 is read with a 9-bit window's output.
            let mut c = Compress::new_with_window_bits(Compression::default(), false, bits.max(9));
            let mut server = Decompress::new_with_window_bits(false, bits.max(9));
            let msg: String = (0..40).map(json).collect();
            for _ in 0..3 {
                // As hop asked (`client_no_context_takeover`): each message alone.
                c.reset();
                let z = compress_with(&mut c, msg.as_bytes());
                s.write_all(&rsv1_frame(true, 0x1, &z)).await.unwrap();
                let (b0, payload) = ws_read_raw_frame(&mut s).await;
                assert_eq!(b0, 0xc1);
                assert_eq!(inflate(&mut server, &payload).unwrap(), msg.as_bytes(), "{bits}");
            }
        }
    }

    /// The history is released once nothing compressed was sent for `history_idle` (300 ms on
    /// this route, to observe it): the next message stands alone.
    async fn history_is_released_when_idle(backend) {
        let srv = start(backend, app(), |b| b);
        let (mut s, _) = handshake(srv.addr, "/short-history", "permessage-deflate").await;
        let msg = json(1);
        let mut client = Decompress::new(false);
        for _ in 0..2 {
            s.write_all(&rsv1_frame(true, 0x1, &compress(msg.as_bytes()))).await.unwrap();
            let (_, payload) = ws_read_raw_frame(&mut s).await;
            assert_eq!(inflate(&mut client, &payload).unwrap(), msg.as_bytes());
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        s.write_all(&rsv1_frame(true, 0x1, &compress(msg.as_bytes()))).await.unwrap();
        let (_, payload) = ws_read_raw_frame(&mut s).await;
        assert_eq!(inflate(&mut Decompress::new(false), &payload).unwrap(), msg.as_bytes());
    }

    /// A ping and a pong between the frames of a compressed message: the ping is answered at
    /// once, and the message is whole.
    async fn control_frames_between_compressed_fragments(backend) {
        let srv = start(backend, app(), |b| b);
        let (mut s, _) = handshake(srv.addr, "/ws", "permessage-deflate").await;
        let msg: String = (0..50).map(json).collect();
        let z = compress(msg.as_bytes());
        let (a, rest) = z.split_at(z.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        s.write_all(&rsv1_frame(false, 0x1, a)).await.unwrap();
        s.write_all(&ws_frame(true, 0x9, b"ping!", true)).await.unwrap();
        assert_eq!(ws_read_raw_frame(&mut s).await, (0x8a, b"ping!".to_vec()));
        s.write_all(&ws_frame(false, 0x0, b, true)).await.unwrap();
        s.write_all(&ws_frame(true, 0xa, b"pong", true)).await.unwrap();
        s.write_all(&ws_frame(true, 0x0, c, true)).await.unwrap();
        let (b0, payload) = ws_read_raw_frame(&mut s).await;
        assert_eq!(b0, 0xc1);
        assert_eq!(inflate(&mut Decompress::new(false), &payload).unwrap(), msg.as_bytes());
    }

    /// RSV1 on a control frame, on a continuation frame, or without permessage-deflate
    /// negotiated: 1002.
    async fn misplaced_rsv1_is_a_protocol_error(backend) {
        let srv = start(backend, app(), |b| b);
        let z = compress(b"hello hello hello hello hello hello");
        let (mut s, _) = handshake(srv.addr, "/ws", "permessage-deflate").await;
        s.write_all(&rsv1_frame(true, 0x9, b"")).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1002, "RSV1 on a ping");
        let (mut s, _) = handshake(srv.addr, "/ws", "permessage-deflate").await;
        s.write_all(&rsv1_frame(false, 0x1, &z)).await.unwrap();
        s.write_all(&rsv1_frame(true, 0x0, &z)).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1002, "RSV1 on a continuation");
        let (mut s, ext) = handshake(srv.addr, "/off", "permessage-deflate").await;
        assert_eq!(ext, None);
        s.write_all(&rsv1_frame(true, 0x1, &z)).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1002, "RSV1 not negotiated");
    }

    /// Data that is not DEFLATE, or text that inflates to invalid UTF-8: 1007.
    async fn invalid_compressed_data_is_1007(backend) {
        let srv = start(backend, app(), |b| b);
        let (mut s, _) = handshake(srv.addr, "/ws", "permessage-deflate").await;
        s.write_all(&rsv1_frame(true, 0x2, &[0xff, 0xff, 0xff, 0x00, 0x12])).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1007);
        let (mut s, _) = handshake(srv.addr, "/ws", "permessage-deflate").await;
        s.write_all(&rsv1_frame(true, 0x1, &compress(&[0xc3, 0x28, 0x41]))).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1007);
    }

    /// 200 MiB of zeros in 200 KB: closed with 1009 once it inflates past the 64 MiB message
    /// limit, without inflating the rest; the server serves the next connection.
    async fn deflate_bomb_is_1009(backend) {
        let srv = start(backend, app(), |b| b);
        let z = compress(&vec![0u8; 200 << 20]);
        assert!(z.len() < 400_000, "{}", z.len());
        let (mut s, _) = handshake(srv.addr, "/ws", "permessage-deflate").await;
        s.write_all(&rsv1_frame(true, 0x2, &z)).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1009);
        let (mut s, _) = handshake(srv.addr, "/ws", "permessage-deflate").await;
        let msg = "still here. ".repeat(5);
        s.write_all(&rsv1_frame(true, 0x1, &compress(msg.as_bytes()))).await.unwrap();
        let (_, payload) = ws_read_raw_frame(&mut s).await;
        assert_eq!(inflate(&mut Decompress::new(false), &payload).unwrap(), msg.as_bytes());
    }
}
