//! Connection identity (issue 21, item 5), on both backends with real clients: a read handler
//! hears `on_close` exactly once however its connection ends (a panic, an error, the peer, a
//! timeout, a shutdown, the drain deadline); an SSE event meant for a subscriber that is gone
//! never reaches the connection that reuses its slot, even after more than 65,536 reuses; a
//! replay over `max_queue` drops the subscriber on both backends; concurrent sends keep one
//! order for every subscriber.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::{Bytes, BytesMut};
use compat_tests::{backend_tests, wait_until};
use futures_util::StreamExt;
use hop::sse::{Event, Hub, SseBody};
use hop::tcp::{CloseReason, Conn, Handler};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

/// What each connection's handler was told when it closed, by the tag its client sent.
type Closes = Arc<Mutex<Vec<(String, &'static str)>>>;

/// A read handler that does what its client's first line says, and records its `on_close`.
struct Tracked {
    tag: Option<String>,
    closes: Closes,
}

impl Handler for Tracked {
    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
        let Some(end) = input.iter().position(|&b| b == b'\n') else {
            return Ok(());
        };
        let line = input.split_to(end + 1);
        let tag = String::from_utf8_lossy(&line[..end]).into_owned();
        self.tag = Some(tag.clone());
        match tag.as_str() {
            "error" => return Err(std::io::Error::other("the handler fails (expected)")),
            "panic" => panic!("the handler panics (expected by this test)"),
            "close" | "close-panics" => conn.close(),
            // A mechanism test: the timeout is short only to keep the test fast.
            "timeout" => conn.set_idle_timeout(Some(Duration::from_millis(300))),
            _ => {}
        }
        if !matches!(tag.as_str(), "close" | "close-panics") {
            conn.write(b"ok\n")?;
        }
        Ok(())
    }

    fn on_shutdown(&mut self, conn: &mut Conn) {
        // "stay" ignores the shutdown: it is cut at the drain deadline.
        if !matches!(self.tag.as_deref(), Some("stay" | "stay-panics")) {
            conn.close();
        }
    }

    fn on_close(&mut self, reason: CloseReason) {
        let reason = match reason {
            CloseReason::Local => "local",
            CloseReason::Peer => "peer",
            CloseReason::Timeout => "timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error(_) => "error",
            _ => "other",
        };
        let tag = self.tag.clone().unwrap_or_default();
        let panics = tag.ends_with("-panics");
        self.closes.lock().unwrap().push((tag, reason));
        if panics {
            panic!("on_close panics (expected by this test)");
        }
    }
}

/// Connects and sends `tag`; waits for the `ok` of the tags that stay open.
async fn open(addr: SocketAddr, tag: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{tag}\n").as_bytes()).await.unwrap();
    if matches!(tag, "peer" | "timeout" | "stay" | "stay-panics" | "drain") {
        let mut ok = [0u8; 3];
        tokio::time::timeout(WAIT, s.read_exact(&mut ok))
            .await
            .unwrap_or_else(|_| panic!("{tag}: no ok"))
            .unwrap();
        assert_eq!(&ok, b"ok\n");
    }
    s
}

/// Reads until the server closes the connection (within [`WAIT`]).
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("not closed in time: {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

/// An SSE body whose `Drop` panics (a user's body wrapper).
struct Bomb(SseBody);

impl hyper::body::Body for Bomb {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx)
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("an SSE body's Drop panics (expected by this test)");
        }
    }
}

/// Subscriber ids the routes handed out.
type Ids = Arc<Mutex<Vec<u64>>>;

fn sse_app(hub: &Hub, ids: &Ids) -> Router {
    let (h1, h2, h3) = (hub.clone(), hub.clone(), hub.clone());
    let (i1, i2, i3) = (ids.clone(), ids.clone(), ids.clone());
    Router::new()
        .route(
            "/sse",
            get(move |req: Request| async move {
                let sub = h1.subscribe(&req);
                i1.lock().unwrap().push(sub.id());
                sub.into_response()
            }),
        )
        .route(
            "/sse-panic",
            get(move |req: Request| async move {
                let sub = h2.subscribe(&req);
                i2.lock().unwrap().push(sub.id());
                let res = sub.into_response();
                if !res.status().is_informational() {
                    panic!("the route panics after subscribing (expected by this test)");
                }
                res
            }),
        )
        .route(
            "/sse-bomb",
            get(move |req: Request| async move {
                let sub = h3.subscribe(&req);
                i3.lock().unwrap().push(sub.id());
                sub.response().map(|b| axum::body::Body::new(Bomb(b)))
            }),
        )
        .route("/", get(|| async { "ok" }))
}

/// A raw SSE client: the request sent, the head read.
async fn subscribe_raw(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("no response head in time")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    (s, got)
}

/// Reads an SSE stream until an event's data line is `until`; returns every data line.
async fn read_data_until(s: &mut TcpStream, until: &str, seen: &mut Vec<u8>) -> Vec<String> {
    let mut buf = [0u8; 4096];
    loop {
        let lines: Vec<String> = String::from_utf8_lossy(seen)
            .split(['\n', '\r'])
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
            .collect();
        if lines.iter().any(|l| l == until) {
            return lines;
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {until:?} in time: {lines:?}"))
            .unwrap();
        assert!(n > 0, "closed before {until:?}: {lines:?}");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// `n` requests over one HTTP/2 connection, `concurrency` at a time: under the reactor each
/// stream is a local task in the poller's slab, so each takes (and frees) a slot and a
/// generation.
async fn churn_slots(addr: SocketAddr, n: usize, concurrency: usize) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    let conn = tokio::spawn(conn);
    let done = AtomicUsize::new(0);
    futures_util::stream::iter(0..n)
        .for_each_concurrent(concurrency, |_| {
            let mut send = send.clone();
            let done = &done;
            async move {
                let req = http::Request::get(format!("http://{addr}/"))
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap();
                let res = send.send_request(req).await.expect("request");
                assert_eq!(res.status(), 200);
                // Read whole: a response dropped unread is a reset, which h2 limits.
                let body = http_body_util::BodyExt::collect(res.into_body())
                    .await
                    .expect("body");
                assert_eq!(body.to_bytes(), "ok");
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    assert_eq!(done.load(Ordering::Relaxed), n);
    drop(send);
    let _ = tokio::time::timeout(WAIT, conn).await;
}

backend_tests! {
    /// Every way a read-handler connection ends calls `on_close` once: an error, a panic, a
    /// close, a close whose `on_close` panics (contained and counted), the peer, a timeout, a
    /// graceful shutdown, and the drain deadline (a handler that ignores the shutdown; one
    /// whose `on_close` panics there too).
    async fn on_close_runs_once_on_every_close_path(backend) {
        let closes: Closes = Arc::default();
        let c = closes.clone();
        let (addr, handle) = compat_tests::start_tcp(
            backend,
            // A mechanism test: a short drain deadline keeps it fast.
            |b| b.drain_timeout(Duration::from_millis(500)),
            move |_: hop::IncomingStream<'_>| Tracked { tag: None, closes: c.clone() },
        );
        let mut ended = Vec::new();
        for tag in ["error", "panic", "close", "close-panics"] {
            let mut s = open(addr, tag).await;
            until_closed(&mut s).await;
            ended.push(s);
        }
        let peer = open(addr, "peer").await;
        drop(peer);
        let mut timeout = open(addr, "timeout").await;
        until_closed(&mut timeout).await;
        let mut stay = open(addr, "stay").await;
        let mut stay_panics = open(addr, "stay-panics").await;
        let mut drain = open(addr, "drain").await;
        assert!(
            wait_until(WAIT, || closes.lock().unwrap().len() == 6).await,
            "[{backend}] {:?}",
            closes.lock().unwrap()
        );
        handle.shutdown();
        until_closed(&mut drain).await;
        until_closed(&mut stay).await;
        until_closed(&mut stay_panics).await;
        assert!(
            wait_until(WAIT, || closes.lock().unwrap().len() >= 9).await,
            "[{backend}] {:?}",
            closes.lock().unwrap()
        );
        // Nothing is told twice.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let closes = closes.lock().unwrap().clone();
        let mut by_tag: HashMap<&str, Vec<&str>> = HashMap::new();
        for (tag, reason) in &closes {
            by_tag.entry(tag.as_str()).or_default().push(reason);
        }
        let want = [
            ("error", "error"),
            ("panic", "error"),
            ("close", "local"),
            ("close-panics", "local"),
            ("peer", "local"), // the default `on_eof` closes
            ("timeout", "timeout"),
            ("stay", "shutdown"),
            ("stay-panics", "shutdown"),
        ];
        for (tag, reason) in want {
            assert_eq!(by_tag.get(tag), Some(&vec![reason]), "[{backend}] {tag}: {closes:?}");
        }
        assert_eq!(by_tag.get("drain").map(Vec::len), Some(1), "[{backend}] {closes:?}");
        assert_eq!(closes.len(), 9, "[{backend}] {closes:?}");
        // The panics in `on_close` (one told by the drive, one at the drain deadline) were
        // contained and counted.
        assert!(
            wait_until(WAIT, || handle.stats().panics >= 2).await,
            "[{backend}] {:?}",
            handle.stats()
        );
    }

    /// Subscribers that end through panics (a route that panics after subscribing, an SSE
    /// body whose `Drop` panics) and one whose client leaves; then over 65,536 slab slots are
    /// taken and freed on the one poller (HTTP/2 streams), so new subscribers reuse the old
    /// ones' slots with their 16-bit generation wrapped. No event meant for an old subscriber
    /// reaches a new one: each new subscriber gets the broadcast and its own events, no other.
    async fn sse_event_never_reaches_a_connection_that_reuses_a_slot(backend) {
        let hub = Hub::new();
        let ids: Ids = Arc::default();
        let srv = compat_tests::start(backend, sse_app(&hub, &ids), |b| b.pollers(1));
        let addr = srv.addr;

        let (a1, _) = subscribe_raw(addr, "/sse-panic").await;
        drop(a1);
        let (a2, _) = subscribe_raw(addr, "/sse-bomb").await;
        drop(a2);
        assert!(wait_until(WAIT, || hub.is_empty()).await, "[{backend}] {hub:?}");
        // A subscriber joins the hub once its head is written, so a client can read the head
        // first: this one is seen to join before it leaves.
        let (a3, head) = subscribe_raw(addr, "/sse").await;
        assert!(head.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&head));
        assert!(wait_until(WAIT, || hub.len() == 1).await, "[{backend}] {hub:?}");
        drop(a3);
        assert!(wait_until(WAIT, || hub.is_empty()).await, "[{backend}] {hub:?}");
        let old: Vec<u64> = ids.lock().unwrap().drain(..).collect();
        assert_eq!(old.len(), 3);
        for id in &old {
            assert!(!hub.send_to(*id, &Event::new(format!("old-{id}"))), "[{backend}] {id}");
        }

        // Past the 16-bit generation's wrap under the reactor; the tokio backend has no slab
        // (fewer streams keep the case quick there).
        let streams = if backend == hop::Backend::Reactor { 66_000 } else { 2_000 };
        churn_slots(addr, streams, 32).await;

        for round in 0..8 {
            let (mut b, mut seen) = subscribe_raw(addr, "/sse").await;
            assert!(seen.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&seen));
            assert!(wait_until(WAIT, || hub.len() == 1).await, "[{backend}] {hub:?}");
            let mine = ids.lock().unwrap().pop().unwrap();
            for id in &old {
                assert!(!hub.send_to(*id, &Event::new(format!("old-{id}"))));
            }
            assert_eq!(hub.send(&Event::new(format!("all-{round}"))), 1);
            assert!(hub.send_to(mine, &Event::new(format!("mine-{mine}"))));
            let data = read_data_until(&mut b, &format!("mine-{mine}"), &mut seen).await;
            assert_eq!(
                data,
                vec![format!("all-{round}"), format!("mine-{mine}")],
                "[{backend}] round {round}"
            );
            drop(b);
            assert!(wait_until(WAIT, || hub.is_empty()).await, "[{backend}] {hub:?}");
        }
        srv.handle.shutdown();
    }

    /// A replay over `max_queue` (the default 256 KiB) drops the subscriber at once on both
    /// backends, counted as a slow one; a replay under it is sent whole.
    async fn sse_replay_over_max_queue_drops_the_subscriber(backend) {
        let hub = Hub::new();
        let h = hub.clone();
        let app = Router::new().route(
            "/replay/{n}",
            get(move |axum::extract::Path(n): axum::extract::Path<usize>, req: Request| async move {
                let mut sub = h.subscribe(&req);
                for i in 0..n {
                    sub.send(&Event::new(format!("{i:04}{}", "x".repeat(1020))));
                }
                sub.into_response()
            }),
        );
        let srv = compat_tests::start(backend, app, |b| b);
        // 10 KiB: sent whole, then subscribed.
        let (mut s, mut seen) = subscribe_raw(srv.addr, "/replay/10").await;
        let want = format!("0009{}", "x".repeat(1020));
        let data = read_data_until(&mut s, &want, &mut seen).await;
        assert_eq!(data.len(), 10, "[{backend}]");
        assert!(wait_until(WAIT, || hub.len() == 1).await, "[{backend}] {hub:?}");
        assert_eq!(hub.dropped(), 0);
        drop(s);
        assert!(wait_until(WAIT, || hub.is_empty()).await, "[{backend}] {hub:?}");
        // 300 KiB: dropped before it joins, no event sent.
        let (mut s, seen) = subscribe_raw(srv.addr, "/replay/300").await;
        let rest = until_closed(&mut s).await;
        let all = [seen, rest].concat();
        assert!(
            !String::from_utf8_lossy(&all).contains("data:"),
            "[{backend}] {} bytes of events",
            all.len()
        );
        assert_eq!(hub.dropped(), 1, "[{backend}]");
        assert!(hub.is_empty(), "[{backend}] {hub:?}");
        srv.handle.shutdown();
    }

    /// Sends from several threads, with subscribers joining and leaving meanwhile: every
    /// subscriber that stays gets every event, each thread's in its order, and all of them
    /// in one order.
    async fn sse_concurrent_sends_keep_one_order(backend) {
        const THREADS: usize = 4;
        const EVENTS: usize = 100;
        let hub = Hub::new();
        let ids: Ids = Arc::default();
        let srv = compat_tests::start(backend, sse_app(&hub, &ids), |b| b);
        let addr = srv.addr;
        let mut steady = Vec::new();
        for _ in 0..3 {
            steady.push(subscribe_raw(addr, "/sse").await);
        }
        assert!(wait_until(WAIT, || hub.len() == 3).await, "[{backend}] {hub:?}");
        let churn = tokio::spawn(async move {
            for _ in 0..20 {
                let (s, _) = subscribe_raw(addr, "/sse").await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(s);
            }
        });
        let senders: Vec<_> = (0..THREADS)
            .map(|t| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    for i in 0..EVENTS {
                        hub.send(&Event::new(format!("t{t}-{i}")));
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        churn.await.unwrap();
        hub.send(&Event::new("end"));
        let mut orders = Vec::new();
        for (s, seen) in &mut steady {
            let data = read_data_until(s, "end", seen).await;
            let events: Vec<String> = data.into_iter().filter(|d| d != "end").collect();
            assert_eq!(events.len(), THREADS * EVENTS, "[{backend}]");
            for t in 0..THREADS {
                let seq: Vec<usize> = events
                    .iter()
                    .filter_map(|e| e.strip_prefix(&format!("t{t}-")))
                    .map(|n| n.parse().unwrap())
                    .collect();
                assert_eq!(seq, (0..EVENTS).collect::<Vec<_>>(), "[{backend}] thread {t}");
            }
            orders.push(events);
        }
        assert!(orders.windows(2).all(|w| w[0] == w[1]), "[{backend}] subscribers saw different orders");
        srv.handle.shutdown();
    }
}
