//! Defects found from outside (issue 10), each with the test that would have caught it, on both
//! backends and with the settings users get: large writes under the default high-water mark, a
//! frame header's claim that costs nothing, upgraded connections released when their clients
//! close, deduplicated wakes, SSE limits where events are queued, no whole-body copies for slow
//! readers, panicking `Drop`s contained, idle timeouts in every configuration, a close the server
//! starts that completes, a close that is bounded in time, and forced closes counted.
//!
//! Tests that measure the whole process (descriptors, memory) hold [`PROCESS`] for writing, every
//! other test holds it for reading, so that nothing else in this binary runs beside a measurement.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{Bytes, BytesMut};
use compat_tests::{backend_tests, get_req, rss_bytes, start, start_with_shutdown, wait_until};
use futures_util::StreamExt;
use hop::sse::{Event, Hub};
use hop::tcp::{Conn, Handler};
use hop::ws::{Message, WsConn, WsHandler, WsUpgrade};
use hop::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Written by tests that measure process-wide descriptors or memory, read by the others.
static PROCESS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const WAIT: Duration = Duration::from_secs(20);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open server-side sockets of the server listening on `port` (from `/proc/net/tcp`): local
/// port `port`, not the listener, and still owned by a descriptor (inode not 0; a socket in
/// TIME_WAIT has none). Unlike a count of this process's descriptors, nothing else the test
/// binary does can move it.
fn server_sockets(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && f.get(3) != Some(&"0A") && f.get(9) != Some(&"0")
        })
        .count()
}

/// This process's virtual size in bytes (`VmSize`): what is reserved, touched or not.
fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

const MIB: u64 = 1 << 20;

// ---- raw WebSocket client pieces ------------------------------------------------------------

fn handshake(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// A masked client frame header for `len` payload bytes (mask key 0: payload bytes go as-is).
fn client_header(opcode: u8, len: u64) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match len {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&n.to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f
}

fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = client_header(opcode, payload.len() as u64);
    f.extend_from_slice(payload);
    f
}

/// Connects and completes a WebSocket handshake on `path`.
async fn ws_raw(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(handshake(path).as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("handshake timed out")
            .unwrap();
        assert!(n == 1, "closed during the handshake");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Reads one unmasked server frame: (opcode, payload).
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await.unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).await.unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await.unwrap();
    (h[0] & 0x0f, p)
}

backend_tests! {
    /// Item 1: a write larger than the high-water mark is taken whole when the queue is below
    /// it, from the handler (`Conn::write`) and from another thread (`ConnHandle::write`).
    async fn large_writes_below_the_mark_are_taken(backend) {
        let _shared = PROCESS.read().await;
        const BIG: usize = 4 << 20;
        const FROM_HANDLE: usize = 2 << 20;
        struct Big;
        impl Handler for Big {
            fn on_open(&mut self, conn: &mut Conn) -> std::io::Result<()> {
                conn.write(&vec![7u8; BIG])?;
                let h = conn.handle();
                std::thread::spawn(move || {
                    // Wait until the handler's 4 MiB has drained below the mark.
                    loop {
                        match h.write(vec![9u8; FROM_HANDLE]) {
                            Ok(()) => break,
                            Err(hop::tcp::WriteError::Full { .. }) => {
                                std::thread::sleep(Duration::from_millis(5))
                            }
                            Err(e) => panic!("handle write: {e}"),
                        }
                    }
                    h.close();
                });
                Ok(())
            }
            fn on_read(&mut self, _: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                input.clear();
                Ok(())
            }
        }
        let (addr, handle) = compat_tests::start_tcp(backend, |b| b, |_: hop::IncomingStream<'_>| Big);
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await.unwrap().unwrap();
        assert_eq!(got.len(), BIG + FROM_HANDLE, "[{backend}] bytes received before the close");
        assert!(got[..BIG].iter().all(|&b| b == 7) && got[BIG..].iter().all(|&b| b == 9));
        handle.shutdown();
    }

    /// Item 1, as the Autobahn suite's "limits" cases (9.1–9.6) run it: text and binary
    /// messages of 1–16 MiB, whole, in fragments, and written in small TCP chunks, each echoed
    /// by `hop::ws` under the default settings.
    async fn autobahn_limits_cases_echo_on_defaults(backend) {
        let _shared = PROCESS.read().await;
        let srv = start(backend, Router::new().route("/ws", get(compat_tests::ws_echo)), |b| b);
        let mut s = ws_raw(srv.addr, "/ws").await;
        let mut cases: Vec<(u8, usize, usize, usize)> = Vec::new(); // (opcode, size, fragment, tcp chunk)
        for op in [1u8, 2] {
            for size in [1 << 20, 4 << 20, 16 << 20] {
                cases.push((op, size, size, size));
            }
            for frag in [64 << 10, 1 << 20] {
                cases.push((op, 4 << 20, frag, 4 << 20));
            }
            cases.push((op, 1 << 20, 1 << 20, 2048));
        }
        for (op, size, frag, chunk) in cases {
            let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            let mut wire = Vec::with_capacity(size + 64);
            for (i, piece) in payload.chunks(frag).enumerate() {
                let mut f = client_header(if i == 0 { op } else { 0 }, piece.len() as u64);
                if (i + 1) * frag < size {
                    f[0] &= 0x7f; // not the last fragment
                }
                wire.extend_from_slice(&f);
                wire.extend_from_slice(piece);
            }
            // The server answers only once the whole message is in: write it all, then read.
            for c in wire.chunks(chunk) {
                s.write_all(c).await.unwrap();
            }
            let (got_op, got) = tokio::time::timeout(WAIT, read_frame(&mut s))
                .await
                .unwrap_or_else(|_| panic!("[{backend}] no echo of {size} bytes in {frag}-byte fragments"));
            assert_eq!(got_op, op, "[{backend}] {size} bytes in {frag}-byte fragments: opcode");
            assert!(got == payload, "[{backend}] {size} bytes in {frag}-byte fragments differ");
        }
        srv.handle.shutdown();
    }

    /// Item 1: `WsHandle::send` of a message larger than the mark, under the defaults.
    async fn ws_handle_sends_a_message_larger_than_the_mark(backend) {
        let _shared = PROCESS.read().await;
        struct Pusher;
        impl WsHandler for Pusher {
            fn on_open(&mut self, ws: &mut WsConn<'_>) -> std::io::Result<()> {
                let h = ws.handle();
                std::thread::spawn(move || {
                    h.send(Message::binary(vec![5u8; 3 << 20])).expect("send below the mark");
                });
                Ok(())
            }
            fn on_message(&mut self, _: &mut WsConn<'_>, _: Message) -> std::io::Result<()> {
                Ok(())
            }
        }
        async fn route(upgrade: WsUpgrade) -> Response {
            upgrade.on_upgrade(Pusher)
        }
        let srv = start(backend, Router::new().route("/push", get(route)), |b| b);
        let mut s = ws_raw(srv.addr, "/push").await;
        let (op, p) = tokio::time::timeout(WAIT, read_frame(&mut s)).await.unwrap();
        assert_eq!((op, p.len()), (2, 3 << 20));
        srv.handle.shutdown();
    }

    /// Item 2: a frame header that declares 16 MiB reserves nothing before the bytes arrive.
    async fn a_frame_headers_claim_costs_nothing(backend) {
        let _measuring = PROCESS.write().await;
        const CONNS: usize = 200;
        let srv = start(backend, Router::new().route("/ws", get(compat_tests::ws_echo)), |b| b);
        let mut warm = ws_raw(srv.addr, "/ws").await;
        warm.write_all(&client_frame(1, b"warm")).await.unwrap();
        assert_eq!(read_frame(&mut warm).await, (1, b"warm".to_vec()));
        let (vm0, rss0) = (vm_size(), rss_bytes().unwrap());
        let mut conns = Vec::new();
        for _ in 0..CONNS {
            let mut s = ws_raw(srv.addr, "/ws").await;
            let mut f = client_header(2, 16 * MIB);
            f.push(0xAB);
            s.write_all(&f).await.unwrap();
            conns.push(s);
        }
        // Let every server connection read its header.
        tokio::time::sleep(Duration::from_millis(500)).await;
        warm.write_all(&client_frame(1, b"still")).await.unwrap();
        assert_eq!(read_frame(&mut warm).await, (1, b"still".to_vec()));
        let (vm1, rss1) = (vm_size(), rss_bytes().unwrap());
        let vm = vm1.saturating_sub(vm0);
        let rss = rss1.saturating_sub(rss0);
        eprintln!(
            "[{backend}] {CONNS} frame headers declaring 16 MiB: VmSize +{} MiB, RSS +{} MiB",
            vm / MIB,
            rss / MIB
        );
        // Reserving the declared length would take 200 x 16 MiB = 3.2 GiB of address space.
        assert!(vm < 1024 * MIB, "[{backend}] VmSize grew by {} MiB", vm / MIB);
        assert!(rss < 256 * MIB, "[{backend}] RSS grew by {} MiB", rss / MIB);
        drop(conns);
        srv.handle.shutdown();
    }

    /// Items 4 and 12: axum WebSockets closed by their clients (half with a close frame, half by
    /// dropping the TCP connection) give back their server descriptors at once, every round.
    async fn axum_websockets_closed_by_clients_release_their_fds(backend) {
        let _measuring = PROCESS.write().await;
        const CONNS: usize = 2000;
        const ROUNDS: usize = 20;
        let srv = start(backend, Router::new().route("/ws-axum", get(compat_tests::axum_ws_echo)), |b| b);
        // A first connection, so that lazily created state is not counted as a leak.
        drop(ws_raw(srv.addr, "/ws-axum").await);
        assert!(wait_until(WAIT, || srv.handle.stats().active == 0).await);
        let base = open_fds();
        let mut slowest = Duration::ZERO;
        for round in 0..ROUNDS {
            let mut conns = Vec::with_capacity(CONNS);
            for _ in 0..CONNS {
                conns.push(ws_raw(srv.addr, "/ws-axum").await);
            }
            // The count of server sockets sees them all while they are open.
            let open = server_sockets(srv.addr.port());
            assert!(open >= CONNS, "[{backend}] only {open} server sockets seen open");
            let mut polite = Vec::new();
            for (i, mut s) in conns.into_iter().enumerate() {
                if i % 2 == 0 {
                    let mut close = 1000u16.to_be_bytes().to_vec();
                    close.extend_from_slice(b"bye");
                    polite.push(tokio::spawn(async move {
                        let _ = s.write_all(&client_frame(8, &close)).await;
                        // Read until the server closes (axum answers the close, then drops).
                        let mut sink = [0u8; 256];
                        while let Ok(Ok(n)) =
                            tokio::time::timeout(WAIT, s.read(&mut sink)).await
                        {
                            if n == 0 {
                                break;
                            }
                        }
                    }));
                } else {
                    drop(s);
                }
            }
            for p in polite {
                p.await.unwrap();
            }
            let closed_at = Instant::now();
            // Measured well under a second (see the closing note of issue 10); 5 s leaves room
            // for a loaded machine, while the leak kept descriptors for a minute or more.
            let port = srv.addr.port();
            let back = wait_until(Duration::from_secs(5), || {
                open_fds() <= base || server_sockets(port) == 0
            })
            .await;
            let took = closed_at.elapsed();
            slowest = slowest.max(took);
            assert!(
                back,
                "[{backend}] round {round}: {} descriptors over the baseline and {} server \
                 sockets open 5 s after the clients closed ({} connections still active)",
                open_fds().saturating_sub(base),
                server_sockets(port),
                srv.handle.stats().active
            );
        }
        eprintln!("[{backend}] {ROUNDS} rounds of {CONNS}: fds back at the baseline within {slowest:?} at worst");
        srv.handle.shutdown();
    }

    /// Item 5: a connection woken 100,000 times from another thread while its poller is busy is
    /// driven a handful of times, not 100,000 (a body that stays pending counts its polls).
    async fn wakes_from_other_threads_are_deduplicated(backend) {
        let _shared = PROCESS.read().await;
        #[derive(Default)]
        struct Shared {
            polls: AtomicUsize,
            release: AtomicBool,
            waker: std::sync::Mutex<Option<std::task::Waker>>,
        }
        struct Counting(Arc<Shared>, bool);
        impl hyper::body::Body for Counting {
            type Data = Bytes;
            type Error = std::io::Error;
            fn poll_frame(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
                let sh = self.0.clone();
                sh.polls.fetch_add(1, Ordering::SeqCst);
                *sh.waker.lock().unwrap() = Some(cx.waker().clone());
                if sh.release.load(Ordering::SeqCst) {
                    if std::mem::replace(&mut self.1, true) {
                        return std::task::Poll::Ready(None);
                    }
                    return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(
                        Bytes::from_static(b"done"),
                    ))));
                }
                if sh.polls.load(Ordering::SeqCst) == 1 {
                    let waker = cx.waker().clone();
                    // Wake from another thread while this (the poller's) thread is busy here.
                    std::thread::spawn(move || {
                        for _ in 0..100_000 {
                            waker.wake_by_ref();
                        }
                    })
                    .join()
                    .unwrap();
                }
                std::task::Poll::Pending
            }
        }
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let app = Router::new().route(
            "/",
            get(move || {
                let sh = sh.clone();
                async move { axum::body::Body::new(Counting(sh, false)) }
            }),
        );
        let srv = start(backend, app, |b| b.pollers(1));
        let mut c = compat_tests::RawConn::connect(srv.addr).await;
        c.send(get_req("/", "")).await.unwrap();
        assert!(wait_until(WAIT, || shared.polls.load(Ordering::SeqCst) >= 1).await);
        // Let every queued wake be driven.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let n = shared.polls.load(Ordering::SeqCst);
        shared.release.store(true, Ordering::SeqCst);
        shared.waker.lock().unwrap().take().unwrap().wake();
        let res = c.read_response().await;
        assert_eq!((res.status, res.text()), (200, "done".to_owned()));
        eprintln!("[{backend}] body polled {n} times after 100,000 wakes");
        assert!(n <= 10, "[{backend}] the body was polled {n} times");
        srv.handle.shutdown();
    }

    /// Item 5: events for a subscriber on a stalled poller count against its limit where they
    /// are queued: the hub drops it while the poller is still stalled.
    async fn sse_limit_holds_for_a_stalled_poller(backend) {
        let _shared = PROCESS.read().await;
        let hub = Hub::new();
        let app = Router::new()
            .route("/sse", get(|State(hub): State<Hub>, req: Request| async move {
                hub.subscribe(&req).into_response()
            }))
            .route("/stall", get(|| async {
                // Blocks the poller (or the only worker) that runs it.
                std::thread::sleep(Duration::from_secs(4));
                "stalled"
            }))
            .with_state(hub.clone());
        let srv = start(backend, app, |b| b.pollers(1));
        let mut sub = compat_tests::RawConn::connect(srv.addr).await;
        sub.send(get_req("/sse", "")).await.unwrap();
        let head = sub.read_head_response().await;
        assert_eq!(head.status, 200);
        assert!(wait_until(WAIT, || hub.len() == 1).await);
        let mut staller = compat_tests::RawConn::connect(srv.addr).await;
        staller.send(get_req("/stall", "")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let data = "x".repeat(1024);
        for _ in 0..2000 {
            hub.send(&Event::new(data.clone()));
        }
        let dropped = hub.dropped();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "sending took {took:?}: the check is inconclusive");
        assert_eq!(dropped, 1, "[{backend}] 2 MiB queued for a subscriber with a 256 KiB limit");
        assert_eq!(hub.len(), 0);
        assert_eq!(staller.read_response().await.status, 200);
        srv.handle.shutdown();
    }

    /// Item 6: 500 readers that do not read a 10 MB response cost the server at most the
    /// coalescing bound (64 KiB) plus socket buffers each: the body is never copied whole.
    async fn slow_readers_of_a_large_body_cost_little(backend) {
        let _measuring = PROCESS.write().await;
        const READERS: usize = 500;
        let blob = Bytes::from(vec![1u8; 10_000_000]);
        let app = Router::new().route("/big", get(move || {
            let b = blob.clone();
            async move { b }
        }));
        let srv = start(backend, app, |b| b);
        let rss0 = rss_bytes().unwrap();
        let mut conns = Vec::new();
        for _ in 0..READERS {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(16 * 1024).unwrap();
            let mut s = sock.connect(srv.addr).await.unwrap();
            s.write_all(get_req("/big", "").as_bytes()).await.unwrap();
            // The response has started: read its first bytes, then nothing more.
            let mut first = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, s.read(&mut first)).await.unwrap().unwrap();
            assert!(first[..n].starts_with(b"HTTP/1.1 200"));
            conns.push(s);
        }
        // Let every response start and every socket fill.
        let mut last = 0;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = rss_bytes().unwrap();
            if now.abs_diff(last) < MIB {
                break;
            }
            last = now;
        }
        let grew = rss_bytes().unwrap().saturating_sub(rss0);
        eprintln!(
            "[{backend}] {READERS} slow readers of a 10 MB body: RSS +{} MiB ({} KiB each)",
            grew / MIB,
            grew / 1024 / READERS as u64
        );
        assert!(grew < 160 * MIB, "[{backend}] RSS grew by {} MiB", grew / MIB);
        drop(conns);
        srv.handle.shutdown();
    }

    /// Item 7: a `Drop` that panics (a read handler's, a service's, a body's) closes only its
    /// own connection; the server goes on serving on the same poller.
    async fn panicking_drops_close_only_their_connection(backend) {
        let _shared = PROCESS.read().await;
        // A read handler whose Drop panics.
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                if !std::thread::panicking() {
                    panic!("read handler Drop");
                }
            }
        }
        struct Armed(#[allow(dead_code)] Bomb);
        impl Handler for Armed {
            fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                conn.write(&input.split())?;
                Ok(())
            }
        }
        let (addr, handle) = compat_tests::start_tcp(backend, |b| b.pollers(1), |_: hop::IncomingStream<'_>| Armed(Bomb));
        for round in 0..3 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            tokio::time::timeout(WAIT, s.read_exact(&mut b))
                .await
                .unwrap_or_else(|_| panic!("[{backend}] round {round}: no echo"))
                .unwrap();
            assert_eq!(&b, b"ping");
        }
        if backend == Backend::Reactor {
            assert!(wait_until(WAIT, || handle.stats().panics >= 2).await, "{:?}", handle.stats());
        }
        handle.shutdown();

        // A body whose Drop panics, and a per-connection service whose Drop panics.
        struct BombBody(bool);
        impl hyper::body::Body for BombBody {
            type Data = Bytes;
            type Error = std::io::Error;
            fn poll_frame(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
                if std::mem::replace(&mut self.0, true) {
                    return std::task::Poll::Ready(None);
                }
                std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(b"boom")))))
            }
        }
        impl Drop for BombBody {
            fn drop(&mut self) {
                if !std::thread::panicking() {
                    panic!("body Drop");
                }
            }
        }
        /// A service whose clones panic when dropped while `bombs` is set: hop drops one
        /// per request (hyper's `&self` call) and one per connection.
        #[derive(Clone)]
        struct BombSvc {
            app: Router,
            bombs: Arc<AtomicBool>,
        }
        impl Drop for BombSvc {
            fn drop(&mut self) {
                if self.bombs.load(Ordering::SeqCst) && !std::thread::panicking() {
                    panic!("service Drop");
                }
            }
        }
        impl tower::Service<http::Request<hyper::body::Incoming>> for BombSvc {
            type Response = Response;
            type Error = std::convert::Infallible;
            type Future = tower::util::Oneshot<Router, http::Request<hyper::body::Incoming>>;
            fn poll_ready(
                &mut self,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: http::Request<hyper::body::Incoming>) -> Self::Future {
                tower::ServiceExt::oneshot(self.app.clone(), req)
            }
        }
        let app = Router::new()
            .route("/body", get(|| async { axum::body::Body::new(BombBody(false)) }))
            .route("/ok", get(|| async { "ok" }));
        let bombs = Arc::new(AtomicBool::new(false));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = compat_tests::builder(backend).pollers(1).serve(listener, BombSvc { app, bombs: bombs.clone() });
        let handle = serve.handle();
        tokio::spawn(serve.into_future());
        for _ in 0..3 {
            // The body panics when dropped after its first chunk: its connection is cut.
            let _ = compat_tests::exchange(addr, get_req("/body", "").as_bytes(), Duration::from_secs(5)).await;
        }
        let mut c = compat_tests::RawConn::connect(addr).await;
        assert_eq!(c.roundtrip(get_req("/ok", "")).await.status, 200, "[{backend}] after body drops");
        drop(c);
        bombs.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            // Each request's service clone panics when dropped (a 500, or a cut connection),
            // and so does each connection's when it closes.
            let _ = compat_tests::exchange(addr, get_req("/ok", "connection: close\r\n").as_bytes(), Duration::from_secs(5)).await;
        }
        bombs.store(false, Ordering::SeqCst);
        // Give the server time to drop what it holds, then check it still serves.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut c = compat_tests::RawConn::connect(addr).await;
        assert_eq!(c.roundtrip(get_req("/ok", "")).await.status, 200, "[{backend}] after service drops");
        handle.shutdown();

        // A make-service (here a read-handler factory) that panics at accept.
        let first = Arc::new(AtomicBool::new(true));
        struct Echo;
        impl Handler for Echo {
            fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                conn.write(&input.split())?;
                Ok(())
            }
        }
        let (addr, handle) = compat_tests::start_tcp(backend, |b| b.pollers(1), move |_: hop::IncomingStream<'_>| {
            if first.swap(false, Ordering::SeqCst) {
                panic!("make-service");
            }
            Echo
        });
        let _ = compat_tests::exchange(addr, b"lost", Duration::from_secs(2)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"echo").await.unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(WAIT, s.read_exact(&mut b))
            .await
            .unwrap_or_else(|_| panic!("[{backend}] no echo after a make-service panic"))
            .unwrap();
        assert_eq!(&b, b"echo");
        assert!(wait_until(WAIT, || handle.stats().panics >= 1).await, "[{backend}] {:?}", handle.stats());
        handle.shutdown();
    }

    /// Item 8: the idle timeout holds with parking off.
    async fn idle_timeout_holds_without_parking(backend) {
        let _shared = PROCESS.read().await;
        let app = Router::new().route("/", get(|| async { "ok" }));
        let srv = start(backend, app, |b| {
            b.park_idle_after(None).idle_timeout(Duration::from_secs(1))
        });
        let mut c = compat_tests::RawConn::connect(srv.addr).await;
        assert_eq!(c.roundtrip(get_req("/", "")).await.status, 200);
        let started = Instant::now();
        let (end, _) = c.wait_close(Duration::from_secs(20)).await;
        let took = started.elapsed();
        eprintln!("[{backend}] idle connection closed after {took:?} ({end:?})");
        assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");
        assert!(took < Duration::from_secs(10), "[{backend}] closed after {took:?}, not at the 1 s idle timeout");
        srv.handle.shutdown();
    }

    /// Item 14: a request body that stops arriving is bounded by tower-http's
    /// `RequestBodyTimeoutLayer` (hop has no body timeout of its own, as hyper has none).
    async fn stalled_upload_is_bounded_by_a_body_timeout_layer(backend) {
        let _shared = PROCESS.read().await;
        let app = Router::new()
            .route("/upload", axum::routing::post(|body: Bytes| async move { body.len().to_string() }))
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_secs(1)));
        let srv = start(backend, app, |b| b);
        let mut c = compat_tests::RawConn::connect(srv.addr).await;
        c.send("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        let started = Instant::now();
        let res = c.read_response().await;
        let took = started.elapsed();
        eprintln!("[{backend}] stalled upload answered {} after {took:?}", res.status);
        assert!((400..500).contains(&res.status), "[{backend}] {}", res.status);
        assert!(took < Duration::from_secs(10), "[{backend}] answered after {took:?}");
        srv.handle.shutdown();
    }

    /// Item 10: a close the server starts completes when the client answers: a graceful
    /// shutdown with 1,000 open WebSockets whose clients answer the close is quick, and nothing
    /// is forced.
    async fn shutdown_with_answering_websockets_is_quick(backend) {
        let _measuring = PROCESS.write().await;
        let (srv, stop) = start_with_shutdown(backend, Router::new().route("/ws", get(compat_tests::ws_echo)), |b| b);
        let mut readers = Vec::new();
        for _ in 0..1000 {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", srv.addr))
                .await
                .unwrap();
            readers.push(tokio::spawn(async move {
                // tungstenite answers the server's close frame by itself.
                let mut code = None;
                while let Some(Ok(m)) = ws.next().await {
                    if let tokio_tungstenite::tungstenite::Message::Close(f) = m {
                        code = f.map(|f| u16::from(f.code));
                    }
                }
                code
            }));
        }
        let started = Instant::now();
        stop.send(()).unwrap();
        let handle = srv.handle.clone();
        srv.join(Duration::from_secs(60)).await;
        let took = started.elapsed();
        eprintln!("[{backend}] shutdown with 1,000 answering WebSockets took {took:?}");
        for r in readers {
            assert_eq!(r.await.unwrap(), Some(1001));
        }
        let stats = handle.stats();
        assert_eq!(stats.forced, 0, "{stats:?}");
        assert!(took < Duration::from_secs(10), "[{backend}] shutdown took {took:?}");
    }

    /// Item 11: a slow SSE subscriber dropped by the hub is closed within the close timeout,
    /// even though it never reads what is queued for it.
    async fn dropped_slow_subscriber_is_closed(backend) {
        let _shared = PROCESS.read().await;
        let hub = Hub::new();
        let app = Router::new()
            .route("/sse", get(|State(hub): State<Hub>, req: Request| async move {
                hub.subscribe(&req).into_response()
            }))
            .with_state(hub.clone());
        let srv = start(backend, app, |b| b);
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(srv.addr).await.unwrap();
        s.write_all(get_req("/sse", "").as_bytes()).await.unwrap();
        assert!(wait_until(WAIT, || hub.len() == 1).await);
        let data = "y".repeat(16 * 1024);
        assert!(
            wait_until(WAIT, || {
                hub.send(&Event::new(data.clone()));
                hub.dropped() == 1
            })
            .await,
            "[{backend}] the subscriber was never dropped"
        );
        let dropped_at = Instant::now();
        assert!(
            wait_until(Duration::from_secs(40), || srv.handle.stats().active == 0).await,
            "[{backend}] the dropped subscriber's connection is still open"
        );
        eprintln!("[{backend}] dropped subscriber closed after {:?}", dropped_at.elapsed());
        drop(s);
        srv.handle.shutdown();
    }

    /// Item 11: any read handler that closes with output its peer does not take is closed at
    /// the close timeout (with a reset), not held open.
    async fn closing_read_handler_is_bounded_in_time(backend) {
        let _shared = PROCESS.read().await;
        struct WriteAndClose;
        impl Handler for WriteAndClose {
            fn on_open(&mut self, conn: &mut Conn) -> std::io::Result<()> {
                conn.write(&vec![3u8; 8 << 20])?;
                conn.close();
                Ok(())
            }
            fn on_read(&mut self, _: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                input.clear();
                Ok(())
            }
        }
        let (addr, handle) = compat_tests::start_tcp(backend, |b| b, |_: hop::IncomingStream<'_>| WriteAndClose);
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let s = sock.connect(addr).await.unwrap();
        assert!(wait_until(WAIT, || handle.stats().active == 1).await);
        let started = Instant::now();
        assert!(
            wait_until(Duration::from_secs(40), || handle.stats().active == 0).await,
            "[{backend}] a closing connection whose peer does not read is still open"
        );
        let took = started.elapsed();
        eprintln!("[{backend}] closing connection cut after {took:?}");
        assert!(took >= Duration::from_secs(5), "cut before the 10 s close timeout: {took:?}");
        drop(s);
        handle.shutdown();
    }

    /// Item 14: WebSockets cut at the drain deadline are counted as forced on both backends.
    async fn websockets_cut_at_the_deadline_are_forced(backend) {
        let _shared = PROCESS.read().await;
        let (srv, stop) = start_with_shutdown(backend, Router::new().route("/ws", get(compat_tests::ws_echo)), |b| {
            b.drain_timeout(Duration::from_secs(1))
        });
        // A client that never answers the server's close.
        let _mute = ws_raw(srv.addr, "/ws").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(()).unwrap();
        let handle = srv.handle.clone();
        srv.join(Duration::from_secs(30)).await;
        let stats = handle.stats();
        assert_eq!(stats.forced, 1, "[{backend}] {stats:?}");
    }
}

/// Item 12, as issue 21 changed it: the HTTP idle timeout does not apply to upgraded
/// connections (axum's `WebSocketUpgrade`, whose dead peers `tcp_keepalive` finds, and
/// `hop::ws`, which pings): a quiet one outlives it and still echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_upgraded_connection_outlives_the_idle_timeout_reactor() {
    compat_tests::run_test(async {
        let _shared = PROCESS.read().await;
        let srv = start(
            Backend::Reactor,
            Router::new()
                .route("/ws-axum", get(compat_tests::axum_ws_echo))
                .route("/ws", get(compat_tests::ws_echo)),
            |b| b.idle_timeout(Duration::from_secs(1)),
        );
        for path in ["/ws-axum", "/ws"] {
            let mut s = ws_raw(srv.addr, path).await;
            s.write_all(&client_frame(1, b"hi")).await.unwrap();
            assert_eq!(read_frame(&mut s).await, (1, b"hi".to_vec()));
            tokio::time::sleep(Duration::from_secs(3)).await;
            s.write_all(&client_frame(1, b"still")).await.unwrap();
            assert_eq!(read_frame(&mut s).await, (1, b"still".to_vec()), "{path}");
        }
        srv.handle.shutdown();
    })
    .await
}
