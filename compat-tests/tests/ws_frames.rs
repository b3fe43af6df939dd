//! `hop::ws`'s frame API (`WsFrameHandler`) on both backends: a frame's payload is handed on
//! in the pieces it arrives in (mask included), fragmented messages keep their opcodes and
//! FIN bits, control frames between fragments are answered, text is checked for UTF-8 across
//! frames (1007), the frame limit holds (1009), and frames sent from a handle on another
//! thread make one message for a real client (tokio-tungstenite). The demo's `/ws-frames` echo
//! is checked in `demo.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use compat_tests::{backend_tests, start, wait_until, ws_frame, ws_handshake, ws_read_frame};
use futures_util::StreamExt;
use hop::ws::{FrameChunk, FrameKind, WsConfig, WsConn, WsFrameHandler, WsUpgrade};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

type Seen = Arc<Mutex<Vec<FrameChunk>>>;

/// Records every piece. (The demo's `/ws-frames` echo is checked in `demo.rs`.)
struct Recorder {
    seen: Seen,
}

impl WsFrameHandler for Recorder {
    fn on_frame(&mut self, _: &mut WsConn<'_>, chunk: FrameChunk) -> std::io::Result<()> {
        self.seen.lock().unwrap().push(chunk);
        Ok(())
    }
}

fn app(seen: Seen, cfg: WsConfig) -> axum::Router {
    axum::Router::new().route(
        "/frames",
        axum::routing::any(move |upgrade: WsUpgrade| {
            let seen = seen.clone();
            async move { upgrade.config(cfg).on_upgrade_frames(Recorder { seen }) }
        }),
    )
}

/// Reads server frames until the close frame: its code.
async fn close_code(s: &mut tokio::net::TcpStream) -> u16 {
    loop {
        let (_, op, payload) = ws_read_frame(s).await;
        if op == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

backend_tests! {
    /// A frame's payload is handed on as it arrives: half of it, then the rest (split at an
    /// odd offset, so the mask's phase must carry over), without waiting for the whole frame.
    async fn pieces_arrive_as_they_come(backend) {
        let seen = Seen::default();
        let srv = start(backend, app(seen.clone(), WsConfig::default()), |b| b);
        let mut s = ws_handshake(srv.addr, "/frames").await;
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = ws_frame(true, 0x2, &payload, true);
        let head = whole.len() - payload.len();
        let split = head + 50_001;
        s.write_all(&whole[..split]).await.unwrap();
        assert!(
            wait_until(WAIT, || seen.lock().unwrap().iter().map(|c| c.payload.len()).sum::<usize>() == 50_001).await,
            "[{backend}] the first half was not handed on before the rest came"
        );
        s.write_all(&whole[split..]).await.unwrap();
        assert!(
            wait_until(WAIT, || seen.lock().unwrap().last().is_some_and(|c| c.last)).await,
            "[{backend}] the rest was not handed on"
        );
        let seen = seen.lock().unwrap();
        let got: Vec<u8> = seen.iter().flat_map(|c| c.payload.iter().copied()).collect();
        assert_eq!(got, payload, "[{backend}] unmasked wrong");
        assert!(seen[0].first && !seen[0].last && seen[0].kind == FrameKind::Binary, "[{backend}]");
        assert!(seen.iter().skip(1).all(|c| !c.first && c.kind == FrameKind::Binary && c.fin));
        assert!(seen.last().unwrap().last, "[{backend}]");
    }

    /// A text message in three frames, a character split between the first two, and a ping
    /// between them: the pong comes back at once, and the pieces keep their opcodes, FIN bits
    /// and bytes.
    async fn fragments_and_a_ping_between(backend) {
        let seen = Seen::default();
        let srv = start(backend, app(seen.clone(), WsConfig::default()), |b| b);
        let mut s = ws_handshake(srv.addr, "/frames").await;
        let text = "héllo wörld, ünïcode";
        let bytes = text.as_bytes();
        // 'é' is bytes 1..3: split inside it.
        let mut out = ws_frame(false, 0x1, &bytes[..2], true);
        out.extend(ws_frame(true, 0x9, b"are you there", true));
        out.extend(ws_frame(false, 0x0, &bytes[2..9], true));
        out.extend(ws_frame(true, 0x0, &bytes[9..], true));
        s.write_all(&out).await.unwrap();
        let (fin, op, pong) = ws_read_frame(&mut s).await;
        assert_eq!((fin, op, &pong[..]), (true, 0xA, &b"are you there"[..]), "[{backend}]");
        let seen_now = wait_until(WAIT, || seen.lock().unwrap().len() == 3).await;
        assert!(seen_now, "[{backend}] {:?}", seen.lock().unwrap());
        let seen = seen.lock().unwrap().clone();
        let kinds: Vec<_> = seen.iter().map(|c| (c.kind, c.fin)).collect();
        assert_eq!(
            kinds,
            [(FrameKind::Text, false), (FrameKind::Continue, false), (FrameKind::Continue, true)],
            "[{backend}]"
        );
        let got: Vec<u8> = seen.iter().flat_map(|c| c.payload.iter().copied()).collect();
        assert_eq!(got, bytes, "[{backend}]");
    }

    /// Text that is not UTF-8 once its frames are put together (an unfinished character at
    /// the message's end, and a bad continuation byte) closes with 1007.
    async fn bad_utf8_across_frames_is_1007(backend) {
        let srv = start(backend, app(Seen::default(), WsConfig::default()), |b| b);
        for (first, second) in [(&[0xE2u8, 0x82][..], &[][..]), (&[0xE2, 0x82][..], &[0x28][..])] {
            let mut s = ws_handshake(srv.addr, "/frames").await;
            let mut out = ws_frame(false, 0x1, first, true);
            out.extend(ws_frame(true, 0x0, second, true));
            s.write_all(&out).await.unwrap();
            assert_eq!(close_code(&mut s).await, 1007, "[{backend}] {first:?} {second:?}");
        }
    }

    /// A frame over the frame limit closes with 1009 as soon as its header is read; a
    /// continuation out of place and a reserved opcode close with 1002.
    async fn limits_and_protocol_errors(backend) {
        let cfg = WsConfig { max_frame_size: 1024, ..WsConfig::default() };
        let srv = start(backend, app(Seen::default(), cfg), |b| b);
        let mut s = ws_handshake(srv.addr, "/frames").await;
        let big = ws_frame(true, 0x2, &[0u8; 2048], true);
        s.write_all(&big[..16]).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1009, "[{backend}] frame too large");
        for bad in [ws_frame(true, 0x0, b"lost", true), ws_frame(true, 0x3, b"?", true)] {
            let mut s = ws_handshake(srv.addr, "/frames").await;
            s.write_all(&bad).await.unwrap();
            assert_eq!(close_code(&mut s).await, 1002, "[{backend}]");
        }
    }

    /// Frames sent from a `WsHandle` on another thread make one message for tokio-tungstenite,
    /// as does the frame echo of a message sent whole.
    async fn frames_from_another_thread(backend) {
        struct Sender;
        impl WsFrameHandler for Sender {
            fn on_open(&mut self, ws: &mut WsConn<'_>) -> std::io::Result<()> {
                let handle = ws.handle();
                std::thread::spawn(move || {
                    handle.send_frame(FrameKind::Binary, false, b"ab").unwrap();
                    handle.send_frame(FrameKind::Continue, false, b"cd").unwrap();
                    handle.send_frame(FrameKind::Continue, true, b"ef").unwrap();
                });
                Ok(())
            }
            fn on_frame(&mut self, ws: &mut WsConn<'_>, chunk: FrameChunk) -> std::io::Result<()> {
                ws.send_frame(chunk.kind, chunk.fin && chunk.last, &chunk.payload)
            }
        }
        let app = axum::Router::new().route(
            "/send",
            axum::routing::any(|upgrade: WsUpgrade| async move { upgrade.on_upgrade_frames(Sender) }),
        );
        let srv = start(backend, app, |b| b);
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/send", srv.addr))
            .await
            .expect("handshake");
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("in time").unwrap().unwrap();
        assert_eq!(msg, Message::binary(&b"abcdef"[..]), "[{backend}]");
    }
}
