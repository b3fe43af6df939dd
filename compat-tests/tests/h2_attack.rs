//! HTTP/2 (and request bodies) under attack, on both backends with default settings except
//! where a test is about a mechanism: control-frame floods (WINDOW_UPDATE, PING, SETTINGS,
//! written as raw frames over a TcpStream, since the `h2` crate cannot send them) are closed,
//! with GOAWAY ENHANCE_YOUR_CALM where it fits; an HTTP/2 connection sent GOAWAY for idleness
//! is closed by the close timeout even if its client never answers; a request body that stops
//! arriving ends with `408` on HTTP/1.1 (a raw TCP client) and RST_STREAM on HTTP/2 (the `h2`
//! crate's client), under the default `request_body_timeout` of 30 s; and clients that never
//! read cost bounded memory, given back once they leave (the figures are printed).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use compat_tests::{backend_tests, start, RawConn};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Appends a raw frame.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The routes: `/plaintext`, and `POST /upload`, which reads its whole body.
fn app() -> Router {
    Router::new()
        .route("/plaintext", get(|| async { "Hello, World!" }))
        .route(
            "/upload",
            post(|body: Body| async move {
                match body.collect().await {
                    Ok(b) => format!("{} bytes", b.to_bytes().len()),
                    Err(e) => format!("body failed: {e}"),
                }
            }),
        )
}

/// How a flooded connection ended, as its client saw it (printed whole).
#[derive(Debug)]
#[allow(dead_code)]
struct Ended {
    /// The GOAWAY's error code, if one came.
    goaway: Option<u32>,
    /// EOF or a reset, within the time allowed.
    closed: bool,
    /// Frames the client had sent by then.
    sent: u64,
    took: Duration,
}

/// Opens an h2c connection (preface and empty SETTINGS) and sends copies of `batch` (whole
/// frames) as fast as the server takes them, while reading everything it sends, until the
/// server closes the connection or `within` runs out.
async fn flood(addr: SocketAddr, batch: Vec<u8>, per_batch: u64, within: Duration) -> Ended {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let mut opening = PREFACE.to_vec();
    frame(&mut opening, SETTINGS, 0, 0, &[]);
    wr.write_all(&opening).await.expect("preface");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if wr.write_all(&batch).await.is_err() {
                    break;
                }
                sent += per_batch;
            }
            sent
        })
    };
    // Read frames, looking for a GOAWAY, until EOF or an error.
    let reader = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut goaway = None;
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return (goaway, true),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == GOAWAY && len >= 8 {
                    let p = &buf[9..17];
                    goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                }
                buf.drain(..9 + len);
            }
        }
    };
    let (goaway, closed) = tokio::time::timeout(within, reader)
        .await
        .unwrap_or((None, false));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let took = start.elapsed();
    let sent = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    Ended {
        goaway,
        closed,
        sent,
        took,
    }
}

/// `n` copies of one frame.
fn batch_of(n: usize, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        frame(&mut out, kind, flags, stream, payload);
    }
    out
}

async fn check_flood(backend: compat_tests::Backend, what: &str, batch: Vec<u8>) {
    let srv = start(backend, app(), |b| b);
    let ended = flood(srv.addr, batch, 1000, Duration::from_secs(30)).await;
    println!("[{backend}] {what} flood: {ended:?}");
    assert!(
        ended.closed,
        "[{backend}] a {what} flood was not closed in 30 s: {ended:?}"
    );
    assert!(
        matches!(ended.goaway, None | Some(ENHANCE_YOUR_CALM)),
        "[{backend}] {what} flood: unexpected GOAWAY code {:?}",
        ended.goaway
    );
    // The server still serves others.
    let mut c = RawConn::connect(srv.addr).await;
    let res = c
        .roundtrip("GET /plaintext HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    assert_eq!(res.status, 200);
}

backend_tests! {
    /// WINDOW_UPDATEs on the connection (increment 1), with no request: closed.
    async fn window_update_flood_is_closed(backend) {
        let batch = batch_of(1000, WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes());
        check_flood(backend, "WINDOW_UPDATE", batch).await;
    }

    /// PINGs (each answered by a PONG the client reads): closed.
    async fn ping_flood_is_closed(backend) {
        let batch = batch_of(1000, PING, 0, 0, &[7; 8]);
        check_flood(backend, "PING", batch).await;
    }

    /// Empty SETTINGS frames (each acknowledged): closed.
    async fn settings_flood_is_closed(backend) {
        let batch = batch_of(1000, SETTINGS, 0, 0, &[]);
        check_flood(backend, "SETTINGS", batch).await;
    }

    /// A client that sends PINGs now and then, and requests, is never taken for a flood.
    async fn pings_now_and_then_are_not_a_flood(backend) {
        let srv = start(backend, app(), |b| b);
        let (mut send, conn) = h2_client(srv.addr).await;
        let conn = tokio::spawn(conn);
        for _ in 0..3 {
            let mut c = TcpStream::connect(srv.addr).await.unwrap();
            let mut out = PREFACE.to_vec();
            frame(&mut out, SETTINGS, 0, 0, &[]);
            for _ in 0..200 {
                frame(&mut out, PING, 0, 0, &[1; 8]);
                frame(&mut out, WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes());
            }
            c.write_all(&out).await.unwrap();
            let (status, _) = h2_get(&mut send, "/plaintext").await;
            assert_eq!(status, 200);
            // Still open: a PING is answered.
            let mut buf = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(Duration::from_secs(15), c.read(&mut buf))
                .await
                .expect("answers")
                .unwrap();
            assert!(n > 0, "[{backend}] 400 control frames closed a connection");
        }
        drop(send);
        conn.abort();
    }

    /// The idle GOAWAY (`http2_idle_timeout`, short here: the mechanism is tested), sent to a
    /// client that never answers the PING of hyper's graceful shutdown: the connection is
    /// closed by the close timeout (the default 10 s) after it.
    async fn idle_goaway_then_close(backend) {
        let srv = start(backend, app(), |b| b.http2_idle_timeout(Duration::from_millis(300)));
        let mut c = RawConn::connect(srv.addr).await;
        let mut out = PREFACE.to_vec();
        frame(&mut out, SETTINGS, 0, 0, &[]);
        c.send(&out).await.unwrap();
        let start = Instant::now();
        let (end, bytes) = c.wait_close(Duration::from_secs(40)).await;
        let took = start.elapsed();
        println!("[{backend}] idle GOAWAY, then {end:?} after {took:?}");
        assert!(
            !matches!(end, compat_tests::End::TimedOut),
            "[{backend}] the idle connection was not closed in 40 s"
        );
        // GOAWAY came first.
        let mut at = 0;
        let mut goaway = false;
        while at + 9 <= bytes.len() {
            let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
            goaway |= bytes[at + 3] == GOAWAY;
            at += 9 + len;
        }
        assert!(goaway, "[{backend}] no GOAWAY before the close");
        assert!(took >= Duration::from_secs(5), "[{backend}] closed before the close timeout: {took:?}");
    }

    /// `Expect: 100-continue` to a handler that works 35 s before it reads the body (under the
    /// default `request_body_timeout` of 30 s): the client sends no body until hyper's `100`,
    /// which comes when the handler reads, so nothing stalls; the request is served.
    async fn expect_continue_with_a_slow_handler_is_served(backend) {
        let app = Router::new().route(
            "/slow",
            post(|body: Body| async move {
                tokio::time::sleep(Duration::from_secs(35)).await;
                match body.collect().await {
                    Ok(b) => format!("{} bytes", b.to_bytes().len()),
                    Err(e) => format!("body failed: {e}"),
                }
            }),
        );
        let srv = start(backend, app, |b| b);
        let mut c = RawConn::connect(srv.addr).await;
        c.send("POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        // The `100` comes once the handler reads (35 s in); the body follows it.
        let interim = c.read_raw(64, Duration::from_secs(60)).await.expect("100 Continue");
        let text = String::from_utf8_lossy(&interim).to_string();
        assert!(text.starts_with("HTTP/1.1 100"), "[{backend}] {text}");
        c.send("abc").await.unwrap();
        let res = c.read_response().await;
        assert_eq!((res.status, res.text()), (200, "3 bytes".to_string()), "[{backend}]");
    }

    /// An HTTP/2 request body that stops arriving, under the DEFAULT `request_body_timeout`
    /// (30 s): its stream is reset (CANCEL) and the handler's read fails; the connection goes
    /// on serving.
    async fn stalled_h2_body_is_reset(backend) {
        let srv = start(backend, app(), |b| b);
        let (mut send, conn) = h2_client(srv.addr).await;
        let conn = tokio::spawn(conn);
        let req = http::Request::post(format!("http://{}/upload", srv.addr))
            .body(())
            .unwrap();
        let (res, mut body) = send.send_request(req, false).expect("send");
        body.send_data(Bytes::from_static(b"a few bytes"), false).unwrap();
        let start = Instant::now();
        // Then nothing: the server resets the stream.
        let got = tokio::time::timeout(Duration::from_secs(60), res).await;
        let took = start.elapsed();
        println!("[{backend}] stalled h2 body: {got:?} after {took:?}");
        let err = got.expect("reset within 60 s").expect_err("a reset, not a response");
        assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "[{backend}] {err}");
        assert!(took >= Duration::from_secs(25), "[{backend}] reset too early: {took:?}");
        // The connection still serves.
        let (status, body) = h2_get(&mut send, "/plaintext").await;
        assert_eq!((status, &body[..]), (200, &b"Hello, World!"[..]));
        drop(send);
        conn.abort();
    }

    /// A body that arrives slowly but steadily (a chunk every 300 ms, with a short timeout of
    /// 1 s: the mechanism) is not cut; one that stops is.
    async fn slow_h2_body_is_not_reset(backend) {
        let srv = start(backend, app(), |b| b.request_body_timeout(Duration::from_secs(1)));
        let (mut send, conn) = h2_client(srv.addr).await;
        let conn = tokio::spawn(conn);
        let req = http::Request::post(format!("http://{}/upload", srv.addr))
            .body(())
            .unwrap();
        let (res, mut body) = send.send_request(req, false).expect("send");
        for _ in 0..10 {
            body.send_data(Bytes::from_static(b"0123456789"), false).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        body.send_data(Bytes::new(), true).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(15), res)
            .await
            .expect("response")
            .expect("not reset");
        let mut b = res.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = b.data().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, b"100 bytes");
        drop(send);
        conn.abort();
    }

    /// An HTTP/1.1 request body that stops arriving, under the DEFAULT timeout (30 s): `408`
    /// and a close.
    async fn stalled_h1_body_gets_408(backend) {
        let srv = start(backend, app(), |b| b);
        let mut c = RawConn::connect(srv.addr).await;
        c.send("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nabc")
            .await
            .unwrap();
        let start = Instant::now();
        let res = c
            .try_read_response(false, Duration::from_secs(60))
            .await
            .expect("a response within 60 s");
        let took = start.elapsed();
        println!("[{backend}] stalled h1 body: {} after {took:?}", res.status);
        assert_eq!(res.status, 408, "[{backend}]");
        assert!(took >= Duration::from_secs(25), "[{backend}] 408 too early: {took:?}");
        let (end, _) = c.wait_close(Duration::from_secs(15)).await;
        assert!(!matches!(end, compat_tests::End::TimedOut), "[{backend}] not closed");
    }

    /// An HTTP/1.1 handler that takes longer than the body timeout after reading the whole
    /// body (1 s here: the mechanism) still answers: the timeout is about the client.
    async fn slow_h1_handler_after_body_is_not_cut(backend) {
        let app = Router::new().route(
            "/slow",
            post(|body: Body| async move {
                let n = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                tokio::time::sleep(Duration::from_secs(3)).await;
                format!("{n} bytes")
            }),
        );
        let srv = start(backend, app, |b| b.request_body_timeout(Duration::from_secs(1)));
        let mut c = RawConn::connect(srv.addr).await;
        let res = c
            .roundtrip("POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")
            .await;
        assert_eq!((res.status, res.text()), (200, "3 bytes".to_string()));
    }
}

type H2Send = h2::client::SendRequest<Bytes>;

async fn h2_client(
    addr: SocketAddr,
) -> (
    H2Send,
    impl std::future::Future<Output = Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    h2::client::handshake(tcp).await.expect("h2 handshake")
}

async fn h2_get(send: &mut H2Send, path: &str) -> (u16, Vec<u8>) {
    let req = http::Request::get(format!("http://x{path}"))
        .body(())
        .unwrap();
    let (res, _) = send.send_request(req, true).expect("send");
    let res = tokio::time::timeout(Duration::from_secs(15), res)
        .await
        .expect("response in time")
        .expect("response");
    let status = res.status().as_u16();
    let mut body = res.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (status, got)
}

/// Clients that open every window, ask for a file on each of 100 streams and never read (a
/// 4 KB receive buffer): the server holds their responses while they stay, and gives the
/// memory back to the system once they leave (glibc keeps it otherwise: ~90% of the peak was
/// still resident 8 s later). One test for both backends, one after the other, so that
/// neither's peak lands in the other's figures. Figures printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_reading_h2_clients_memory_goes_back() {
    compat_tests::run_test(async {
        for backend in [compat_tests::Backend::Reactor, compat_tests::Backend::Tokio] {
            non_reading_clients(backend).await;
        }
    })
    .await;
}

async fn non_reading_clients(backend: compat_tests::Backend) {
    const CONNS: usize = 60;
    const STREAMS: u32 = 100;
    let Some(_) = compat_tests::rss_bytes() else {
        compat_tests::unavailable("/proc/self/status");
    };
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let app = Router::new().route_service("/file", tower_http::services::ServeFile::new(readme));
    let srv = start(backend, app, |b| b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = compat_tests::rss_bytes().unwrap();
    // HPACK: :method GET, :scheme http, :path "/file" (a literal), :authority "x".
    let mut block = vec![0x82, 0x86, 0x04, 5];
    block.extend_from_slice(b"/file");
    block.extend_from_slice(&[0x01, 1, b'x']);
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut c = sock.connect(srv.addr).await.unwrap();
        let mut out = PREFACE.to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE 2^31-1, and the connection window opened as wide.
        let mut setting = 4u16.to_be_bytes().to_vec();
        setting.extend_from_slice(&(u32::MAX >> 1).to_be_bytes());
        frame(&mut out, SETTINGS, 0, 0, &setting);
        frame(
            &mut out,
            WINDOW_UPDATE,
            0,
            0,
            &((u32::MAX >> 1) - 65_535).to_be_bytes(),
        );
        for i in 0..STREAMS {
            // HEADERS, END_STREAM | END_HEADERS.
            frame(&mut out, 0x1, 0x5, 2 * i + 1, &block);
        }
        c.write_all(&out).await.unwrap();
        conns.push(c);
    }
    let want = (CONNS as u64) * u64::from(STREAMS);
    let served = compat_tests::wait_until(Duration::from_secs(60), || {
        srv.handle.stats().http2_streams >= want
    })
    .await;
    assert!(served, "[{backend}] not every stream was taken");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = compat_tests::rss_bytes().unwrap();
    for c in conns {
        // Gone at once, with a reset: nothing left for the server to finish.
        c.set_zero_linger().unwrap();
        drop(c);
    }
    let bound = before + 48 * 1024 * 1024;
    let started = Instant::now();
    let back = compat_tests::wait_until(Duration::from_secs(30), || {
        compat_tests::rss_bytes().unwrap() <= bound
    })
    .await;
    let after = compat_tests::rss_bytes().unwrap();
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "[{backend}] {CONNS} non-reading h2 clients x {STREAMS} streams of /file: RSS {:.1} MB -> {:.1} MB \
         ({:.2} MB per connection) -> {:.1} MB {:.1} s after they left",
        mb(before),
        mb(during),
        mb(during.saturating_sub(before)) / CONNS as f64,
        mb(after),
        started.elapsed().as_secs_f64()
    );
    assert!(
        back,
        "[{backend}] RSS still {:.1} MB 30 s after the clients left ({:.1} MB before)",
        mb(after),
        mb(before)
    );
    assert_eq!(
        srv.handle.stats().active,
        0,
        "[{backend}] connections left open"
    );
}
