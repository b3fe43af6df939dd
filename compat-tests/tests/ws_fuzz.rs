//! Property tests of `hop::ws`: random client frame streams against an echo server, on both
//! backends, with the default settings.
//!
//! - Valid streams (masked text, binary and fragmented messages, UTF-8 split anywhere, pings and
//!   pongs between and inside messages, then a valid close) written in random-sized pieces: the
//!   server echoes each whole message, answers each ping with a pong, answers the close with the
//!   same code and closes the connection.
//! - Invalid streams (a random valid prefix, then one protocol violation): the server echoes the
//!   prefix, sends a close with the code RFC 6455 asks for (`1002`, `1007`, `1009`) and closes.
//! - After every case a fresh connection still echoes (no panic, no stuck poller), and at the
//!   end no connection is left open.
//!
//! One server per property; proptest's failure persistence is off (no files written).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use compat_tests::{backend_tests, wait_until, Backend, End, TestServer, IO_TIMEOUT};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Cases per property (per backend).
const CASES: u32 = 64;

/// hop's default limits (`WsConfig::default()` in src/ws.rs).
const MAX_FRAME: u64 = 16 << 20;
const MAX_MESSAGE: u64 = 64 << 20;

fn start(backend: Backend) -> TestServer {
    let app = Router::new().route("/ws", get(compat_tests::ws_echo));
    compat_tests::start(backend, app, |b| b)
}

fn config() -> Config {
    Config {
        cases: CASES,
        // No `proptest-regressions/` files; a failure prints its minimal case instead.
        failure_persistence: None,
        // Each shrink step talks to the server: keep a failure's report quick.
        max_shrink_iters: 200,
        ..Config::default()
    }
}

/// Runs `check` on `CASES` values of the strategy `make` makes, against one server, off the
/// runtime's workers.
async fn run_property<S, F, Fut>(srv: &TestServer, make: fn() -> S, check: F)
where
    S: Strategy + 'static,
    S::Value: std::fmt::Debug,
    F: Fn(SocketAddr, S::Value) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), TestCaseError>>,
{
    let addr = srv.addr;
    let rt = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(config());
        runner
            .run(&make(), |value| {
                rt.block_on(async {
                    check(addr, value).await?;
                    // Whatever the case did, the server still serves a new connection.
                    still_echoes(addr).await
                })
            })
            .map_err(|e| e.to_string())
    })
    .await
    .expect("property runner panicked");
    if let Err(e) = result {
        panic!("[{}] {e}", srv.backend);
    }
    let handle = srv.handle.clone();
    assert!(
        wait_until(IO_TIMEOUT, || handle.stats().active == 0).await,
        "[{}] connections left open: {:?}",
        srv.backend,
        handle.stats()
    );
}

// ---------------------------------------------------------------------------------------------
// Frames on the wire.

const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A client frame as written: any header bits, any (declared) length.
#[derive(Debug, Clone)]
struct ClientFrame {
    fin: bool,
    /// The three reserved bits (RSV1..3), as `0..=7`.
    rsv: u8,
    opcode: u8,
    /// `None`: unmasked (a protocol error from a client).
    mask: Option<[u8; 4]>,
    payload: Vec<u8>,
    /// A length to declare instead of the payload's (the payload is then not sent).
    declared_len: Option<u64>,
}

impl ClientFrame {
    fn new(fin: bool, opcode: u8, payload: Vec<u8>, mask: [u8; 4]) -> Self {
        ClientFrame {
            fin,
            rsv: 0,
            opcode,
            mask: Some(mask),
            payload,
            declared_len: None,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push((u8::from(self.fin) << 7) | (self.rsv << 4) | self.opcode);
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.declared_len.unwrap_or(self.payload.len() as u64);
        if len < 126 {
            out.push(mask_bit | len as u8);
        } else if len <= 0xffff {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        if let Some(key) = self.mask {
            out.extend_from_slice(&key);
        }
        if self.declared_len.is_none() {
            match self.mask {
                Some(key) => {
                    out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]))
                }
                None => out.extend_from_slice(&self.payload),
            }
        }
    }
}

/// A frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerFrame {
    opcode: u8,
    payload: Vec<u8>,
}

/// Parses one server frame off the front of `buf`: `Ok(None)` while incomplete, `Err` for a
/// frame no server may send (masked, reserved bits, non-final, or a length not minimally
/// encoded).
fn parse_server_frame(buf: &[u8]) -> Result<Option<(ServerFrame, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x80 == 0 || b0 & 0x70 != 0 || b1 & 0x80 != 0 {
        return Err(format!("bad server frame header {b0:#04x} {b1:#04x}"));
    }
    let (len, head) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let n = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            if n < 126 {
                return Err(format!("non-minimal 16-bit length {n}"));
            }
            (n, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let n = u64::from_be_bytes(buf[2..10].try_into().unwrap());
            if n <= 0xffff {
                return Err(format!("non-minimal 64-bit length {n}"));
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    let end = head + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        ServerFrame {
            opcode: b0 & 0x0f,
            payload: buf[head..end].to_vec(),
        },
        end,
    )))
}

/// The read half of a WebSocket client on a raw socket, after the handshake.
struct Reader {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
}

/// Connects and completes the handshake.
async fn connect(addr: SocketAddr) -> Result<(Reader, OwnedWriteHalf), TestCaseError> {
    let s = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| fail("connect timed out"))?
        .map_err(|e| fail(format!("connect: {e}")))?;
    s.set_nodelay(true).ok();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
              sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .map_err(|e| fail(format!("handshake write: {e}")))?;
    let mut buf = Vec::new();
    let deadline = Instant::now() + IO_TIMEOUT;
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut chunk)).await {
            Ok(Ok(0)) => return Err(fail("EOF during the handshake")),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(fail(format!("handshake read: {e}"))),
            Err(_) => return Err(fail("handshake timed out")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(fail(format!("handshake refused: {head:?}")));
    }
    buf.drain(..head_end);
    Ok((Reader { rd, buf }, wr))
}

impl Reader {
    /// Reads server frames until the server closes the connection (or `within` runs out).
    async fn frames_until_end(
        &mut self,
        within: Duration,
    ) -> Result<(Vec<ServerFrame>, End), TestCaseError> {
        let deadline = Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            while let Some((f, used)) = parse_server_frame(&self.buf).map_err(fail)? {
                self.buf.drain(..used);
                frames.push(f);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            let end = match tokio::time::timeout(left, self.rd.read(&mut chunk)).await {
                Ok(Ok(0)) => End::Eof,
                Ok(Ok(n)) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Ok(Err(_)) => End::Reset,
                Err(_) => End::TimedOut,
            };
            if !self.buf.is_empty() {
                return Err(fail(format!(
                    "{} bytes of a partial frame before {end:?}",
                    self.buf.len()
                )));
            }
            return Ok((frames, end));
        }
    }

    /// Reads exactly one frame.
    async fn one_frame(&mut self) -> Result<ServerFrame, TestCaseError> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some((f, used)) = parse_server_frame(&self.buf).map_err(fail)? {
                self.buf.drain(..used);
                return Ok(f);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rd.read(&mut chunk)).await {
                Ok(Ok(0)) => return Err(fail("EOF instead of a frame")),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(fail(format!("read: {e}"))),
                Err(_) => return Err(fail("no frame within the I/O timeout")),
            }
        }
    }
}

fn fail(msg: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(msg.to_string())
}

/// Writes `bytes` in pieces cut at `cuts` (positions modulo the length), pausing 1 ms after
/// each piece so that they reach the server as separate reads.
async fn write_in_pieces(
    wr: &mut OwnedWriteHalf,
    bytes: &[u8],
    cuts: &[Index],
) -> std::io::Result<()> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len().max(1))).collect();
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    let mut from = 0;
    for to in points {
        if to > from {
            wr.write_all(&bytes[from..to]).await?;
            wr.flush().await?;
            from = to;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(())
}

/// A new connection gets its message echoed.
async fn still_echoes(addr: SocketAddr) -> Result<(), TestCaseError> {
    let (mut rd, mut wr) = connect(addr).await?;
    let mut bytes = Vec::new();
    ClientFrame::new(true, TEXT, b"still alive".to_vec(), [1, 2, 3, 4]).encode(&mut bytes);
    wr.write_all(&bytes)
        .await
        .map_err(|e| fail(format!("write: {e}")))?;
    let f = rd.one_frame().await?;
    prop_assert_eq!(
        f,
        ServerFrame {
            opcode: TEXT,
            payload: b"still alive".to_vec()
        },
        "a fresh connection was not echoed"
    );
    Ok(())
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

// ---------------------------------------------------------------------------------------------
// Strategies: valid traffic.

/// Deterministic filler bytes for large payloads (cheaper than one strategy value per byte).
fn filler(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn binary_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..300),
        // 16- and 64-bit lengths.
        1 => (126usize..70_000, any::<u64>()).prop_map(|(n, seed)| filler(n, seed)),
    ]
}

fn text_payload() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::collection::vec(any::<char>(), 0..120).prop_map(String::from_iter),
        1 => prop::collection::vec(any::<char>(), 100..8_000).prop_map(String::from_iter),
    ]
}

fn control_payload() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=125)
}

/// A control frame a client may send between (or inside) messages.
#[derive(Debug, Clone)]
enum Ctl {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn ctl() -> impl Strategy<Value = Ctl> {
    prop_oneof![
        3 => control_payload().prop_map(Ctl::Ping),
        1 => control_payload().prop_map(Ctl::Pong),
    ]
}

/// One step of valid traffic.
#[derive(Debug, Clone)]
enum Step {
    Ctl(Ctl, [u8; 4]),
    /// A message cut into fragments at `cuts` (byte positions, anywhere: inside a UTF-8
    /// sequence too; repeated cuts make empty fragments), with control frames between them.
    Message {
        text: bool,
        data: Vec<u8>,
        cuts: Vec<Index>,
        between: Vec<Option<Ctl>>,
        masks: Vec<[u8; 4]>,
    },
}

fn message() -> impl Strategy<Value = Step> {
    let data = prop_oneof![
        text_payload().prop_map(|s| (true, s.into_bytes())),
        binary_payload().prop_map(|b| (false, b)),
    ];
    (
        data,
        prop::collection::vec(any::<Index>(), 0..5),
        prop::collection::vec(prop::option::weighted(0.3, ctl()), 5),
        prop::collection::vec(any::<[u8; 4]>(), 6),
    )
        .prop_map(|((text, data), cuts, between, masks)| Step::Message {
            text,
            data,
            cuts,
            between,
            masks,
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => (ctl(), any::<[u8; 4]>()).prop_map(|(c, m)| Step::Ctl(c, m)),
        3 => message(),
    ]
}

/// Appends `step`'s frames to `frames` and what the echo server answers to `expect`.
fn lay_out(step: &Step, frames: &mut Vec<ClientFrame>, expect: &mut Vec<ServerFrame>) {
    let ctl_frame = |c: &Ctl, mask: [u8; 4], expect: &mut Vec<ServerFrame>| match c {
        Ctl::Ping(p) => {
            expect.push(ServerFrame {
                opcode: PONG,
                payload: p.clone(),
            });
            ClientFrame::new(true, PING, p.clone(), mask)
        }
        Ctl::Pong(p) => ClientFrame::new(true, PONG, p.clone(), mask),
    };
    match step {
        Step::Ctl(c, mask) => frames.push(ctl_frame(c, *mask, expect)),
        Step::Message {
            text,
            data,
            cuts,
            between,
            masks,
        } => {
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
            points.sort_unstable();
            points.push(data.len());
            let mut from = 0;
            let last = points.len() - 1;
            for (i, to) in points.into_iter().enumerate() {
                let opcode = match (i, text) {
                    (0, true) => TEXT,
                    (0, false) => BINARY,
                    _ => CONT,
                };
                let piece = data[from..to].to_vec();
                frames.push(ClientFrame::new(i == last, opcode, piece, masks[i]));
                from = to;
                if i < last {
                    if let Some(c) = &between[i] {
                        frames.push(ctl_frame(c, masks[5], expect));
                    }
                }
            }
            expect.push(ServerFrame {
                opcode: if *text { TEXT } else { BINARY },
                payload: data.clone(),
            });
        }
    }
}

/// A close code a client may send (RFC 6455 7.4.1 and 7.4.2; 1012..1014 left out: registered
/// later, and not every implementation accepts them).
fn valid_close_code() -> impl Strategy<Value = u16> {
    prop_oneof![
        prop::sample::select(vec![
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011
        ]),
        3000u16..=4999,
    ]
}

/// A close reason: valid UTF-8 of at most 123 bytes.
fn close_reason() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<char>(), 0..40).prop_map(|cs| {
        let mut s = String::new();
        for c in cs {
            if s.len() + c.len_utf8() > 123 {
                break;
            }
            s.push(c);
        }
        s.into_bytes()
    })
}

#[derive(Debug, Clone)]
struct ValidCase {
    steps: Vec<Step>,
    /// `None`: an empty close frame.
    close: Option<(u16, Vec<u8>)>,
    close_mask: [u8; 4],
    cuts: Vec<Index>,
}

fn valid_case() -> impl Strategy<Value = ValidCase> {
    (
        prop::collection::vec(step(), 0..8),
        prop::option::weighted(0.9, (valid_close_code(), close_reason())),
        any::<[u8; 4]>(),
        prop::collection::vec(any::<Index>(), 0..32),
    )
        .prop_map(|(steps, close, close_mask, cuts)| ValidCase {
            steps,
            close,
            close_mask,
            cuts,
        })
}

async fn check_valid(addr: SocketAddr, case: ValidCase) -> Result<(), TestCaseError> {
    let mut frames = Vec::new();
    let mut expect = Vec::new();
    for s in &case.steps {
        lay_out(s, &mut frames, &mut expect);
    }
    let close_payload = case
        .close
        .as_ref()
        .map(|(code, reason)| close_payload(*code, reason))
        .unwrap_or_default();
    frames.push(ClientFrame::new(
        true,
        CLOSE,
        close_payload,
        case.close_mask,
    ));
    let mut bytes = Vec::new();
    for f in &frames {
        f.encode(&mut bytes);
    }

    let (mut rd, mut wr) = connect(addr).await?;
    let cuts = case.cuts.clone();
    let writer = tokio::spawn(async move {
        let r = write_in_pieces(&mut wr, &bytes, &cuts).await;
        (r, wr)
    });
    let (mut got, end) = rd.frames_until_end(IO_TIMEOUT).await?;
    let (written, _wr) = writer.await.map_err(|e| fail(format!("writer: {e}")))?;
    written.map_err(|e| fail(format!("writing the valid stream failed: {e}")))?;

    let close = got.pop();
    prop_assert_eq!(&got, &expect, "echoes and pongs differ");
    let close = close.ok_or_else(|| fail("no close frame"))?;
    prop_assert_eq!(
        close.opcode,
        CLOSE,
        "last frame is not a close: {:?}",
        close
    );
    match &case.close {
        Some((code, _)) => prop_assert_eq!(
            close.payload.get(..2),
            Some(&code.to_be_bytes()[..]),
            "close code not echoed: {:?}",
            close.payload
        ),
        // No code received: an empty close or 1000 both answer it.
        None => prop_assert!(
            close.payload.is_empty() || close.payload.get(..2) == Some(&1000u16.to_be_bytes()[..]),
            "answer to an empty close: {:?}",
            close.payload
        ),
    }
    prop_assert_eq!(
        end,
        End::Eof,
        "connection not closed cleanly after the close"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies: protocol violations.

/// One violation of RFC 6455 by the client, sent after a valid prefix.
#[derive(Debug, Clone)]
enum Violation {
    /// 5.1: a client frame without a mask.
    Unmasked { opcode: u8, payload: Vec<u8> },
    /// 5.2: RSV1..3 set with no extension negotiated.
    ReservedBits {
        rsv: u8,
        opcode: u8,
        payload: Vec<u8>,
    },
    /// 5.2: opcodes 0x3..0x7 and 0xB..0xF; the declared payload is never sent.
    ReservedOpcode { opcode: u8, fin: bool, len: u64 },
    /// 5.5: a control frame with FIN clear.
    FragmentedControl { opcode: u8, payload: Vec<u8> },
    /// 5.5: a control frame with more than 125 bytes of payload.
    LongControl { opcode: u8, payload: Vec<u8> },
    /// 5.4: a continuation frame with no message open.
    ContinuationWithoutStart { fin: bool, payload: Vec<u8> },
    /// 5.4: a new text or binary frame while a fragmented message is open.
    DataInsideFragmented {
        first_opcode: u8,
        first: Vec<u8>,
        second_opcode: u8,
        second_fin: bool,
        second: Vec<u8>,
    },
    /// 7.4: a close code no endpoint may send (1005, 1006, 1015, < 1000, > 4999, reserved).
    BadCloseCode { code: u16, reason: Vec<u8> },
    /// 5.5.1: a close payload of one byte.
    OneByteClose(u8),
    /// 8.1: a text message that is not UTF-8 (cut into fragments anywhere).
    BadUtf8Text { data: Vec<u8>, cuts: Vec<usize> },
    /// 5.5.1 and 8.1: a close reason that is not UTF-8.
    BadUtf8Reason { code: u16, reason: Vec<u8> },
    /// 10.4: a frame over the default limits (16 MiB a frame, 64 MiB a message), declared in
    /// the header only, as the first frame of a message or as a continuation.
    TooLarge {
        opcode: u8,
        fin: bool,
        continuation: bool,
        len: u64,
    },
}

/// Byte sequences that are never valid UTF-8 wherever they stand before a character
/// boundary (overlong, surrogate, beyond U+10FFFF, lone continuation, truncated, 0xFF).
const NOT_UTF8: &[&[u8]] = &[
    &[0xff],
    &[0xfe],
    &[0x80],
    &[0xbf, 0x41],
    &[0xc0, 0x80],
    &[0xc1, 0xbf],
    &[0xe0, 0x80, 0x80],
    &[0xed, 0xa0, 0x80],
    &[0xed, 0xbf, 0xbf],
    &[0xf4, 0x90, 0x80, 0x80],
    &[0xf5, 0x80, 0x80, 0x80],
    &[0xf8, 0x88, 0x80, 0x80, 0x80],
    &[0xe2, 0x82],
    &[0xf0, 0x9f, 0x98],
    &[0xc3],
];

/// Valid text with an invalid sequence inserted at a character boundary.
fn not_utf8(max_chars: usize) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(any::<char>(), 0..max_chars).prop_map(String::from_iter),
        prop::sample::select(NOT_UTF8),
        any::<Index>(),
    )
        .prop_map(|(s, bad, at)| {
            let boundaries: Vec<usize> =
                s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
            let at = boundaries[at.index(boundaries.len())];
            let mut out = s.as_bytes()[..at].to_vec();
            out.extend_from_slice(bad);
            out.extend_from_slice(&s.as_bytes()[at..]);
            out
        })
}

fn bad_close_code() -> impl Strategy<Value = u16> {
    prop_oneof![
        prop::sample::select(vec![
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535
        ]),
        0u16..1000,
        1016u16..3000,
        5000u16..=u16::MAX,
    ]
}

fn data_opcode() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![TEXT, BINARY])
}

fn control_opcode() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![CLOSE, PING, PONG])
}

fn any_valid_opcode() -> impl Strategy<Value = u8> {
    prop::sample::select(vec![TEXT, BINARY, PING, PONG, CLOSE])
}

fn violation() -> impl Strategy<Value = Violation> {
    let small = || prop::collection::vec(any::<u8>(), 0..200);
    prop_oneof![
        (any_valid_opcode(), control_payload())
            .prop_map(|(opcode, payload)| Violation::Unmasked { opcode, payload }),
        (1u8..=7, any_valid_opcode(), control_payload()).prop_map(|(rsv, opcode, payload)| {
            Violation::ReservedBits {
                rsv,
                opcode,
                payload,
            }
        }),
        (
            prop_oneof![3u8..=7, 11u8..=15],
            any::<bool>(),
            prop_oneof![0u64..126, 126u64..70_000]
        )
            .prop_map(|(opcode, fin, len)| Violation::ReservedOpcode { opcode, fin, len }),
        (control_opcode(), control_payload())
            .prop_map(|(opcode, payload)| Violation::FragmentedControl { opcode, payload }),
        (
            control_opcode(),
            prop::collection::vec(any::<u8>(), 126..1000)
        )
            .prop_map(|(opcode, payload)| Violation::LongControl { opcode, payload }),
        (any::<bool>(), small())
            .prop_map(|(fin, payload)| Violation::ContinuationWithoutStart { fin, payload }),
        (
            data_opcode(),
            small(),
            data_opcode(),
            any::<bool>(),
            small()
        )
            .prop_map(|(first_opcode, first, second_opcode, second_fin, second)| {
                Violation::DataInsideFragmented {
                    first_opcode,
                    first,
                    second_opcode,
                    second_fin,
                    second,
                }
            }),
        (bad_close_code(), close_reason())
            .prop_map(|(code, reason)| Violation::BadCloseCode { code, reason }),
        any::<u8>().prop_map(Violation::OneByteClose),
        (not_utf8(200), prop::collection::vec(0usize..1000, 0..4))
            .prop_map(|(data, cuts)| Violation::BadUtf8Text { data, cuts }),
        (valid_close_code(), not_utf8(30))
            .prop_map(|(code, reason)| Violation::BadUtf8Reason { code, reason }),
        (
            prop_oneof![
                data_opcode(),
                // Over the limits, a control frame is a size error before it is a long one.
                control_opcode()
            ],
            any::<bool>(),
            any::<bool>(),
            prop_oneof![
                MAX_FRAME + 1..=MAX_MESSAGE,
                MAX_MESSAGE + 1..=i64::MAX as u64
            ],
        )
            .prop_map(|(opcode, fin, continuation, len)| Violation::TooLarge {
                opcode,
                fin,
                continuation: continuation && opcode != CLOSE && opcode < CLOSE,
                len,
            }),
    ]
}

impl Violation {
    /// The frames that commit the violation, and the close code that answers it.
    fn lay_out(&self, mask: [u8; 4]) -> (Vec<ClientFrame>, u16) {
        let frame =
            |fin, opcode, payload: &Vec<u8>| ClientFrame::new(fin, opcode, payload.clone(), mask);
        match self {
            Violation::Unmasked { opcode, payload } => {
                let mut f = frame(true, *opcode, payload);
                f.mask = None;
                (vec![f], 1002)
            }
            Violation::ReservedBits {
                rsv,
                opcode,
                payload,
            } => {
                let mut f = frame(true, *opcode, payload);
                f.rsv = *rsv;
                (vec![f], 1002)
            }
            Violation::ReservedOpcode { opcode, fin, len } => {
                let mut f = frame(*fin, *opcode, &Vec::new());
                f.declared_len = Some(*len);
                (vec![f], 1002)
            }
            // A control frame's header alone is the violation (hop closes on reading it): its
            // length is declared, its payload not sent.
            Violation::FragmentedControl { opcode, payload } => {
                let mut f = frame(false, *opcode, &Vec::new());
                f.declared_len = Some(payload.len() as u64);
                (vec![f], 1002)
            }
            Violation::LongControl { opcode, payload } => {
                let mut f = frame(true, *opcode, &Vec::new());
                f.declared_len = Some(payload.len() as u64);
                (vec![f], 1002)
            }
            Violation::ContinuationWithoutStart { fin, payload } => {
                (vec![frame(*fin, CONT, payload)], 1002)
            }
            Violation::DataInsideFragmented {
                first_opcode,
                first,
                second_opcode,
                second_fin,
                second,
            } => (
                vec![
                    frame(false, *first_opcode, first),
                    frame(*second_fin, *second_opcode, second),
                ],
                1002,
            ),
            Violation::BadCloseCode { code, reason } => (
                vec![frame(true, CLOSE, &close_payload(*code, reason))],
                1002,
            ),
            Violation::OneByteClose(b) => (vec![frame(true, CLOSE, &vec![*b])], 1002),
            Violation::BadUtf8Text { data, cuts } => {
                let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
                points.sort_unstable();
                points.push(data.len());
                let last = points.len() - 1;
                let mut from = 0;
                let mut frames = Vec::new();
                for (i, to) in points.into_iter().enumerate() {
                    let opcode = if i == 0 { TEXT } else { CONT };
                    frames.push(frame(i == last, opcode, &data[from..to].to_vec()));
                    from = to;
                }
                (frames, 1007)
            }
            Violation::BadUtf8Reason { code, reason } => (
                vec![frame(true, CLOSE, &close_payload(*code, reason))],
                1007,
            ),
            Violation::TooLarge {
                opcode,
                fin,
                continuation,
                len,
            } => {
                let mut frames = Vec::new();
                let mut opcode = *opcode;
                if *continuation {
                    frames.push(frame(false, opcode, &b"start".to_vec()));
                    opcode = CONT;
                }
                let mut f = frame(*fin, opcode, &Vec::new());
                f.declared_len = Some(*len);
                frames.push(f);
                // A control frame (any opcode with the high bit, reserved ones too) over 125
                // bytes is a protocol error before it is too large.
                (frames, if opcode & 0x8 != 0 { 1002 } else { 1009 })
            }
        }
    }
}

/// One of each violation the tests name, with fixed values.
fn named_violations() -> Vec<Violation> {
    use Violation::*;
    let mut v = vec![
        Unmasked {
            opcode: TEXT,
            payload: b"no mask".to_vec(),
        },
        Unmasked {
            opcode: PING,
            payload: Vec::new(),
        },
        ContinuationWithoutStart {
            fin: true,
            payload: b"orphan".to_vec(),
        },
        DataInsideFragmented {
            first_opcode: TEXT,
            first: b"open".to_vec(),
            second_opcode: BINARY,
            second_fin: true,
            second: b"new".to_vec(),
        },
        OneByteClose(0x03),
        BadUtf8Text {
            data: vec![0xff, 0xfe, 0x41],
            cuts: Vec::new(),
        },
        // "é" split between two fragments is fine; its lead byte then a non-continuation is not.
        BadUtf8Text {
            data: b"ok \xc3 then \x41".to_vec(),
            cuts: vec![4],
        },
        BadUtf8Reason {
            code: 1000,
            reason: vec![b'b', 0xc0, 0x80],
        },
    ];
    for rsv in 1..=7 {
        v.push(ReservedBits {
            rsv,
            opcode: TEXT,
            payload: b"rsv".to_vec(),
        });
    }
    for opcode in (3..=7).chain(11..=15) {
        v.push(ReservedOpcode {
            opcode,
            fin: true,
            len: 0,
        });
    }
    for opcode in [CLOSE, PING, PONG] {
        v.push(FragmentedControl {
            opcode,
            payload: b"frag".to_vec(),
        });
        v.push(LongControl {
            opcode,
            payload: vec![b'x'; 126],
        });
    }
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        v.push(BadCloseCode {
            code,
            reason: Vec::new(),
        });
    }
    for (len, continuation) in [
        (MAX_FRAME + 1, false),
        (MAX_FRAME + 1, true),
        (MAX_MESSAGE + 1, false),
        (i64::MAX as u64, false),
    ] {
        v.push(TooLarge {
            opcode: BINARY,
            fin: true,
            continuation,
            len,
        });
    }
    v
}

#[derive(Debug, Clone)]
struct InvalidCase {
    prefix: Vec<Step>,
    violation: Violation,
    mask: [u8; 4],
    cuts: Vec<Index>,
}

fn invalid_case() -> impl Strategy<Value = InvalidCase> {
    (
        prop::collection::vec(step(), 0..4),
        violation(),
        any::<[u8; 4]>(),
        prop::collection::vec(any::<Index>(), 0..32),
    )
        .prop_map(|(prefix, violation, mask, cuts)| InvalidCase {
            prefix,
            violation,
            mask,
            cuts,
        })
}

async fn check_invalid(addr: SocketAddr, case: InvalidCase) -> Result<(), TestCaseError> {
    let mut frames = Vec::new();
    let mut expect = Vec::new();
    for s in &case.prefix {
        lay_out(s, &mut frames, &mut expect);
    }
    let (bad, code) = case.violation.lay_out(case.mask);
    frames.extend(bad);
    let mut bytes = Vec::new();
    for f in &frames {
        f.encode(&mut bytes);
    }

    // Every violation is complete only with its last byte (a frame whose header alone is
    // the violation is sent without payload), so the server has read all of it when it
    // answers: no unread bytes, no reset that could eat the close frame.
    let (mut rd, mut wr) = connect(addr).await?;
    let cuts = case.cuts.clone();
    let writer = tokio::spawn(async move {
        let r = write_in_pieces(&mut wr, &bytes, &cuts).await;
        (r, wr)
    });
    let (mut got, end) = rd.frames_until_end(IO_TIMEOUT).await?;
    let (written, _wr) = writer.await.map_err(|e| fail(format!("writer: {e}")))?;
    written.map_err(|e| fail(format!("writing failed: {e}")))?;

    let close = got
        .pop()
        .ok_or_else(|| fail(format!("no close frame ({end:?})")))?;
    prop_assert_eq!(&got, &expect, "echoes and pongs of the valid prefix differ");
    prop_assert_eq!(
        close.opcode,
        CLOSE,
        "last frame is not a close: {:?}",
        close
    );
    prop_assert!(
        close.payload.len() >= 2,
        "close without a code: {:?}",
        close
    );
    let got_code = u16::from_be_bytes([close.payload[0], close.payload[1]]);
    prop_assert_eq!(
        got_code,
        code,
        "close code (reason {:?})",
        String::from_utf8_lossy(&close.payload[2..])
    );
    prop_assert!(
        std::str::from_utf8(&close.payload[2..]).is_ok(),
        "close reason is not UTF-8"
    );
    prop_assert_eq!(
        end,
        End::Eof,
        "connection not closed cleanly after the close"
    );
    Ok(())
}

backend_tests! {
    async fn valid_streams_are_echoed(backend) {
        let srv = start(backend);
        run_property(&srv, valid_case, check_valid).await;
        srv.handle.shutdown();
    }

    async fn each_named_violation_once(backend) {
        // Random cases may miss a kind in one run; these always run (no prefix, one write).
        let srv = start(backend);
        for violation in named_violations() {
            let case = InvalidCase {
                prefix: Vec::new(),
                violation: violation.clone(),
                mask: [0x37, 0xfa, 0x21, 0x3d],
                cuts: Vec::new(),
            };
            if let Err(e) = check_invalid(srv.addr, case).await {
                panic!("[{}] {violation:?}: {e}", srv.backend);
            }
            if let Err(e) = still_echoes(srv.addr).await {
                panic!("[{}] after {violation:?}: {e}", srv.backend);
            }
        }
        srv.handle.shutdown();
    }

    async fn violations_are_closed_with_the_rfc_code(backend) {
        let srv = start(backend);
        run_property(&srv, invalid_case, check_invalid).await;
        srv.handle.shutdown();
    }
}
