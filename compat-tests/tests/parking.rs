//! Idle parking loses nothing. The suite's builder parks at once (`park_idle_after(ZERO)`), so
//! here every pause between bytes gives the reactor a chance to drop hyper's state: requests
//! split across reads, pipelined requests after a park, a request head cut at the moment the
//! previous response is done, and an upgrade on a parked connection. The tokio backend runs the
//! same cases for parity.
//!
//! Three of them guard what parking assumes of hyper's private behaviour (with the debug
//! assertions in `conn::http::Counted` and `HopStream::release`): that hyper dispatches a
//! request only once the previous response is done (a slow handler is never parked
//! mid-request), that it reads a request body a handler reads after answering before the next
//! head (such a connection is not parked while the body is on its way), and that taking the
//! socket back with `into_parts` loses nothing (hyper's write buffer is empty then, even after a
//! large response to a slow reader).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Path;
use axum::routing::{get, post};
use axum::Router;
use compat_tests::{backend_tests, RawConn};
use futures_util::{SinkExt, StreamExt};
use hop::ws::{Message, WsConn, WsHandler, WsUpgrade};

struct Echo;

impl WsHandler for Echo {
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
        ws.send(msg)
    }
}

fn app() -> Router {
    Router::new()
        .route(
            "/n/{n}",
            get(|Path(n): Path<u32>| async move { format!("n={n}") }),
        )
        .route("/echo", post(|body: Bytes| async move { body }))
        .route("/big", get(|| async { Bytes::from(vec![b'z'; BIG]) }))
        .route(
            "/ws",
            get(|up: WsUpgrade| async move { up.on_upgrade(Echo) }),
        )
}

const PAUSE: Duration = Duration::from_millis(60);

/// Larger than hop's coalescing bound (64 KiB) and than a loopback socket takes at once.
const BIG: usize = 4 << 20;

/// The reactor did park (so the case tested what it means to); the tokio backend never does.
fn assert_parked(srv: &compat_tests::TestServer) {
    let parked = srv.handle.stats().parked;
    match srv.backend {
        hop::Backend::Reactor => assert!(parked >= 1, "the reactor never parked"),
        hop::Backend::Tokio => assert_eq!(parked, 0),
    }
}

backend_tests! {
    async fn request_split_across_reads(backend) {
        let srv = compat_tests::start(backend, app(), |b| b);
        let mut c = RawConn::connect(srv.addr).await;
        let first = c.roundtrip("GET /n/1 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(first.body, b"n=1");
        for part in [&b"POST /echo HT"[..], b"TP/1.1\r\nhost: x\r\ncontent-le", b"ngth: 11\r\n\r\nhello", b" world"] {
            tokio::time::sleep(PAUSE).await;
            c.send(part).await.unwrap();
        }
        let res = c.read_response().await;
        assert_eq!(res.status, 200);
        assert_eq!(res.body, b"hello world");
        assert_parked(&srv);
    }

    async fn pipelined_after_a_park(backend) {
        let srv = compat_tests::start(backend, app(), |b| b);
        let mut c = RawConn::connect(srv.addr).await;
        assert_eq!(c.roundtrip("GET /n/0 HTTP/1.1\r\nhost: x\r\n\r\n").await.body, b"n=0");
        tokio::time::sleep(PAUSE).await;
        let burst: String = (1..=20).map(|i| format!("GET /n/{i} HTTP/1.1\r\nhost: x\r\n\r\n")).collect();
        c.send(burst).await.unwrap();
        for i in 1..=20 {
            assert_eq!(c.read_response().await.body, format!("n={i}").as_bytes());
        }
        assert_parked(&srv);
    }

    async fn next_head_cut_when_the_response_is_done(backend) {
        let srv = compat_tests::start(backend, app(), |b| b);
        let mut c = RawConn::connect(srv.addr).await;
        // The first request and the start of the second arrive together: hyper answers the
        // first and is left holding part of the second's head when it goes idle.
        c.send("GET /n/1 HTTP/1.1\r\nhost: x\r\n\r\nGET /n/2 HTTP/1.1\r\nho").await.unwrap();
        assert_eq!(c.read_response().await.body, b"n=1");
        tokio::time::sleep(PAUSE).await;
        c.send("st: x\r\n\r\n").await.unwrap();
        assert_eq!(c.read_response().await.body, b"n=2");
        tokio::time::sleep(PAUSE).await;
        assert_eq!(c.roundtrip("GET /n/3 HTTP/1.1\r\nhost: x\r\n\r\n").await.body, b"n=3");
        assert_parked(&srv);
    }

    async fn upgrade_on_a_parked_connection(backend) {
        let srv = compat_tests::start(backend, app(), |b| b);
        // One plain request first, then a pause, then the upgrade on the same connection.
        let mut stream = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.write_all(b"GET /n/7 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut buf = vec![0u8; 1024];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("n=7") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
        }
        tokio::time::sleep(PAUSE).await;
        let url = format!("ws://{}/ws", srv.addr);
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        ws.send(tokio_tungstenite::tungstenite::Message::text("after a park")).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(got, tokio_tungstenite::tungstenite::Message::text("after a park"));
        assert_parked(&srv);
    }

    async fn slow_handler_is_not_parked_mid_request(backend) {
        // Parking waits until nothing is in flight; a hyper that dispatched a request before the
        // previous response was done, or a driver that missed a request in flight, would let
        // the driver take hyper's state away while the handler runs, losing the response.
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        let app = app().route(
            "/slow-flagged",
            get(move || {
                let flag = flag.clone();
                async move {
                    flag.store(true, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    "slow done"
                }
            }),
        );
        let srv = compat_tests::start(backend, app, |b| b);
        let mut conn = RawConn::connect(srv.addr).await;
        conn.send(b"GET /slow-flagged HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        // Look while the handler runs (a park before the request arrived does not count).
        assert!(compat_tests::wait_until(Duration::from_secs(20), || started.load(Ordering::SeqCst)).await);
        let before = srv.handle.stats().parked;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let during = srv.handle.stats().parked;
        let res = conn.read_response().await;
        assert_eq!((res.status, res.text()), (200, "slow done".to_owned()));
        assert_eq!(during, before, "[{backend}] parked while the handler ran");
        tokio::time::sleep(PAUSE).await;
        let res = conn.roundtrip(b"GET /n/2 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(res.text(), "n=2");
        assert_parked(&srv);
    }

    async fn body_read_after_the_response_then_park(backend) {
        // A handler may answer first and read the request body later (here in a task). hyper
        // is still reading that body when the response is done: taking its state then would
        // read the rest of the body as the next request head.
        use std::sync::{Arc, Mutex};
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<usize, String>>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let app = app().route(
            "/later",
            post(move |req: axum::extract::Request| {
                let tx = tx.lock().unwrap().take();
                async move {
                    let body = req.into_body();
                    tokio::spawn(async move {
                        let got = axum::body::to_bytes(body, usize::MAX).await;
                        if let Some(tx) = tx {
                            let _ = tx.send(got.map(|b| b.len()).map_err(|e| e.to_string()));
                        }
                    });
                    "answered"
                }
            }),
        );
        let srv = compat_tests::start(backend, app, |b| b);
        let mut conn = RawConn::connect(srv.addr).await;
        conn.send(b"POST /later HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n01234").await.unwrap();
        let res = conn.read_response().await;
        assert_eq!((res.status, res.text()), (200, "answered".to_owned()));
        tokio::time::sleep(PAUSE).await;
        conn.send(b"56789").await.unwrap();
        tokio::time::sleep(PAUSE).await;
        // (hyper hands the rest of the body over once it reads again: on either backend, when
        // the next request arrives.)
        let res = conn.roundtrip(b"GET /n/3 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(res.text(), "n=3");
        let got = tokio::time::timeout(Duration::from_secs(20), rx).await.unwrap().unwrap();
        assert_eq!(got, Ok(10), "[{backend}] the body was cut");
        tokio::time::sleep(PAUSE).await;
        let res = conn.roundtrip(b"GET /n/4 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(res.text(), "n=4");
        assert_parked(&srv);
    }

    async fn large_response_to_a_slow_reader_then_park(backend) {
        // hyper holds part of the response while the reader is slow; the connection must not be
        // taken back from hyper until all of it is written, and then parks and serves again.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let srv = compat_tests::start(backend, app(), |b| b);
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let head_end = loop {
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        while got.len() < head_end + BIG {
            // Slow: the server's buffers fill and its writes are refused in between.
            tokio::time::sleep(Duration::from_millis(2)).await;
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), head_end + BIG, "more than the response arrived");
        assert!(got[head_end..].iter().all(|&b| b == b'z'));
        tokio::time::sleep(PAUSE).await;
        let mut conn = RawConn::from_stream(s);
        let res = conn.roundtrip(b"GET /n/3 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(res.text(), "n=3");
        assert_parked(&srv);
    }
}
