//! Fuzzes `hop::ws`'s frame handling through its only public door: a real hop server (reactor
//! backend, default settings) on a loopback socket, running an echo `WsHandler`.
//!
//! Each input is split in two at its first byte (a cut position); the pieces are written
//! after a WebSocket handshake as two writes, then the client half-closes and reads until
//! the server closes. A panic anywhere (libfuzzer-sys aborts on any thread's panic) or a
//! server that neither closes nor answers within 10 s is a crash; so is any frame a server
//! must not send (masked, fragmented, reserved bits, a control frame over 125 bytes, a close
//! code no endpoint may send, anything after a close).

#![no_main]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use hop::ws::{Message, WsConn, WsHandler};
use libfuzzer_sys::fuzz_target;

struct Echo;

impl WsHandler for Echo {
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
        ws.send(msg)
    }
}

fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let svc = hyper::service::service_fn(|req| async move {
            Ok::<_, Infallible>(hop::ws::upgrade(req, Echo))
        });
        let serve = hop::Server::builder()
            .backend(hop::Backend::Reactor)
            .pollers(1)
            .serve(listener, svc);
        std::thread::spawn(move || serve.run().expect("server failed"));
        addr
    })
}

const HANDSHAKE: &[u8] = b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\n\
    upgrade: websocket\r\nsec-websocket-version: 13\r\n\
    sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Checks that `out` is a sequence of frames a server may send.
fn check_server_frames(mut out: &[u8]) {
    let mut closed = false;
    while !out.is_empty() {
        assert!(!closed, "bytes after the server's close frame: {out:?}");
        assert!(out.len() >= 2, "partial frame header {out:?}");
        let (b0, b1) = (out[0], out[1]);
        assert_eq!(b0 & 0xf0, 0x80, "FIN clear or reserved bits set: {b0:#04x}");
        assert_eq!(b1 & 0x80, 0, "masked server frame");
        let head = match b1 & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        assert!(out.len() >= head, "partial frame header {out:?}");
        let len = match b1 & 0x7f {
            126 => u16::from_be_bytes([out[2], out[3]]) as usize,
            127 => u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
            n => n as usize,
        };
        assert!(out.len() >= head + len, "partial frame");
        let payload = &out[head..head + len];
        let opcode = b0 & 0x0f;
        assert!(
            matches!(opcode, 0x1 | 0x2 | 0x8 | 0x9 | 0xA),
            "opcode {opcode:#x}"
        );
        if opcode >= 0x8 {
            assert!(len <= 125, "control frame of {len} bytes");
        }
        if opcode == 0x1 {
            assert!(
                std::str::from_utf8(payload).is_ok(),
                "echoed text not UTF-8"
            );
        }
        if opcode == 0x8 {
            closed = true;
            assert_ne!(len, 1, "one-byte close payload");
            if len >= 2 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                assert!(
                    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999),
                    "close code {code}"
                );
                assert!(std::str::from_utf8(&payload[2..]).is_ok(), "close reason");
            }
        }
        out = &out[head + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let addr = server();
    let (cut, frames) = match data.split_first() {
        Some((c, rest)) => ((*c as usize).min(rest.len()), rest),
        None => (0, data),
    };
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(HANDSHAKE).expect("handshake");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("handshake answer");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    // The server may close early (a violation): write errors are fine, and then what it sent
    // may be cut short by a reset.
    let mut reset = s.write_all(&frames[..cut]).is_err();
    std::thread::sleep(Duration::from_micros(200));
    reset |= s.write_all(&frames[cut..]).is_err();
    let _ = s.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the server neither answered nor closed within 10 s ({} bytes so far)",
                    out.len()
                )
            }
            Err(_) => {
                reset = true;
                break;
            }
        }
    }
    if !reset {
        check_server_frames(&out);
    }
});
