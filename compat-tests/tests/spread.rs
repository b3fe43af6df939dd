//! Spreading busy connections over the pollers (issue 23), with real clients and the default
//! park delay. With 2 pollers, a few busy keep-alive connections (raw HTTP/1.1, pipelined
//! batches, TLS with hyper's client over tokio-rustls) all get answered, in order, while the
//! reactor hands connections from the busier poller to the other at request boundaries
//! (`Stats::moved`) and both pollers do work (`Handle::poller_work`); h2c connections (hyper's
//! HTTP/2 client) are dealt over both pollers and serve concurrent streams, and busy ones move
//! between streams; a graceful shutdown drains connections that moved. The tokio backend runs the same cases (it has nothing to
//! move: `moved` stays 0, `poller_work` is empty). No timing is asserted: each case loads the
//! server until the reactor has moved what it asserts, under a generous limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use compat_tests::{backend_tests, RawConn, IO_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How long a case may keep loading the server before its condition must hold (generous: a
/// loaded 2-core machine, a debug build).
const LOAD_LIMIT: Duration = Duration::from_secs(60);

fn app() -> Router {
    Router::new()
        .route(
            "/n/{n}",
            get(|Path(n): Path<u64>| async move { format!("n={n}") }),
        )
        .route("/ws", axum::routing::any(compat_tests::ws_echo))
        .route(
            "/slow/{n}",
            get(|Path(n): Path<u64>| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                format!("slow={n}")
            }),
        )
}

/// The suite's builder parks at once; these cases keep hop's default park delay.
fn defaults(b: hop::Builder) -> hop::Builder {
    b.park_idle_after(Duration::from_millis(250))
}

/// The reactor has moved at least `n` connections and both pollers have worked; always true
/// on the tokio backend, which has neither.
fn spread_enough(srv: &compat_tests::TestServer, n: u64) -> bool {
    match srv.backend {
        hop::Backend::Reactor => {
            // Empty until the pollers have started.
            let work = srv.handle.poller_work();
            assert!(work.len() <= 2, "two pollers: {work:?}");
            work.len() == 2 && srv.handle.stats().moved >= n && work.iter().all(|w| *w > 0)
        }
        hop::Backend::Tokio => {
            assert!(srv.handle.poller_work().is_empty());
            assert_eq!(srv.handle.stats().moved, 0);
            true
        }
    }
}

/// Waits (loading goes on meanwhile) until [`spread_enough`] holds for `moves`, failing the case
/// past [`LOAD_LIMIT`].
async fn wait_spread(srv: &compat_tests::TestServer, moves: u64) {
    let start = Instant::now();
    while !spread_enough(srv, moves) {
        assert!(
            start.elapsed() < LOAD_LIMIT,
            "[{}] not spread within {LOAD_LIMIT:?}: moved {}, work {:?}",
            srv.backend,
            srv.handle.stats().moved,
            srv.handle.poller_work()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `conns` raw keep-alive connections, each sending batches of `batch` pipelined GETs
/// numbered in sequence and checking each answer is the one for its request, until the
/// reactor has moved `moves` connections (and for at least `min_rounds` batches each).
/// Returns the connections, still open.
async fn busy(
    srv: &compat_tests::TestServer,
    conns: usize,
    batch: usize,
    moves: u64,
    min_rounds: u64,
) -> Vec<RawConn> {
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (addr, done) = (srv.addr, done.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = RawConn::connect(addr).await;
            let mut next = 0u64;
            let mut rounds = 0u64;
            while rounds < min_rounds || !done.load(Ordering::Relaxed) {
                let mut out = String::new();
                for i in 0..batch as u64 {
                    let n = (c as u64) << 32 | (next + i);
                    out.push_str(&format!("GET /n/{n} HTTP/1.1\r\nhost: x\r\n\r\n"));
                }
                conn.send(out).await.expect("send");
                for i in 0..batch as u64 {
                    let n = (c as u64) << 32 | (next + i);
                    let res = conn.read_response().await;
                    assert_eq!(res.status, 200);
                    assert_eq!(res.text(), format!("n={n}"), "answers in request order");
                }
                next += batch as u64;
                rounds += 1;
            }
            conn
        }));
    }
    wait_spread(srv, moves).await;
    done.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

backend_tests! {
    async fn busy_keep_alive_connections_use_both_pollers(backend) {
        let srv = compat_tests::start(backend, app(), defaults);
        let conns = busy(&srv, 3, 1, 3, 200).await;
        assert_eq!(conns.len(), 3);
        assert_eq!(srv.handle.stats().panics, 0);
    }

    /// Two busy connections on two pollers are dealt one to each and stay there: a poller never
    /// sheds its only connection, however the two loads swing (they once moved back and forth
    /// every few windows, both on one poller much of the time).
    async fn two_busy_connections_stay_one_on_each_poller(backend) {
        let srv = compat_tests::start(backend, app(), defaults);
        let conns = busy(&srv, 2, 1, 0, 2_000).await;
        assert_eq!(conns.len(), 2);
        assert!(spread_enough(&srv, 0), "both pollers served: {:?}", srv.handle.poller_work());
        let moved = srv.handle.stats().moved;
        assert!(moved <= 1, "[{backend}] at most the deal at accept moved one; moved {moved}");
    }

    async fn pipelined_requests_stay_in_order_across_moves(backend) {
        let srv = compat_tests::start(backend, app(), defaults);
        let mut conns = busy(&srv, 3, 16, 5, 50).await;
        // Every connection still serves, wherever it is now.
        for (i, c) in conns.iter_mut().enumerate() {
            let res = c.roundtrip(format!("GET /n/{i} HTTP/1.1\r\nhost: x\r\n\r\n")).await;
            assert_eq!(res.text(), format!("n={i}"));
        }
    }

    async fn graceful_shutdown_drains_moved_connections(backend) {
        let (srv, stop) = compat_tests::start_with_shutdown(backend, app(), defaults);
        let mut conns = busy(&srv, 3, 1, 3, 100).await;
        // A slow request on each, then the shutdown: each is answered, then closed.
        for (i, c) in conns.iter_mut().enumerate() {
            c.send(format!("GET /slow/{i} HTTP/1.1\r\nhost: x\r\n\r\n")).await.expect("send");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = stop.send(());
        for (i, c) in conns.iter_mut().enumerate() {
            let res = c.read_response().await;
            assert_eq!(res.text(), format!("slow={i}"));
            let (end, rest) = c.wait_close(IO_TIMEOUT).await;
            assert!(end.closed(), "closed after its last response");
            assert!(rest.is_empty());
        }
        let (forced, backend) = (srv.handle.stats().forced, srv.backend);
        srv.join(IO_TIMEOUT).await;
        assert_eq!(forced, 0, "[{backend}] drained, none forced");
    }

    async fn h2c_connections_are_dealt_over_both_pollers(backend) {
        let srv = compat_tests::start(backend, app(), defaults);
        let mut sends = Vec::new();
        for _ in 0..4 {
            let tcp = TcpStream::connect(srv.addr).await.expect("connect");
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake");
            tokio::spawn(conn);
            sends.push(send);
        }
        // Concurrent streams on every connection.
        let mut tasks = Vec::new();
        for (c, send) in sends.iter().enumerate() {
            for s in 0..8u64 {
                let mut send = send.clone();
                tasks.push(tokio::spawn(async move {
                    for r in 0..25u64 {
                        let n = (c as u64) << 32 | s << 16 | r;
                        let req = http::Request::get(format!("http://localhost/n/{n}"))
                            .body(Empty::<Bytes>::new())
                            .expect("request");
                        send.ready().await.expect("ready");
                        let res = send.send_request(req).await.expect("response");
                        assert_eq!(res.status(), 200);
                        let body = res.into_body().collect().await.expect("body").to_bytes();
                        assert_eq!(body, format!("n={n}").as_bytes());
                    }
                }));
            }
        }
        for t in tasks {
            tokio::time::timeout(LOAD_LIMIT, t).await.expect("streams done").expect("stream task");
        }
        assert!(spread_enough(&srv, 0), "both pollers served: {:?}", srv.handle.poller_work());
        assert_eq!(srv.handle.stats().http2_streams, 4 * 8 * 25);
    }

    /// Three busy h2c connections, one stream at a time each: the reactor moves them between
    /// streams (hyper's HTTP/2 state goes along), every answer is the one asked for, no
    /// connection is set up again, and a graceful shutdown then drains them all.
    async fn h2c_connections_move_between_streams(backend) {
        let (srv, stop) = compat_tests::start_with_shutdown(backend, app(), defaults);
        let done = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..3u64 {
            let (addr, done) = (srv.addr, done.clone());
            tasks.push(tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                        .await
                        .expect("HTTP/2 handshake");
                let conn = tokio::spawn(conn);
                let mut n = 0u64;
                while n < 200 || !done.load(Ordering::Relaxed) {
                    let id = c << 32 | n;
                    let req = http::Request::get(format!("http://localhost/n/{id}"))
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    send.ready().await.expect("ready");
                    let res = send.send_request(req).await.expect("response");
                    assert_eq!(res.status(), 200);
                    let body = res.into_body().collect().await.expect("body").to_bytes();
                    assert_eq!(body, format!("n={id}").as_bytes());
                    n += 1;
                }
                (send, conn)
            }));
        }
        wait_spread(&srv, 3).await;
        done.store(true, Ordering::Relaxed);
        let mut conns = Vec::new();
        for t in tasks {
            conns.push(t.await.expect("client task"));
        }
        let stats = srv.handle.stats();
        assert_eq!(stats.http2_connections, 3, "[{backend}] no connection was set up again");
        assert_eq!(stats.panics, 0);
        // One more stream on each, wherever it is now; then the drain closes them.
        for (c, (send, _)) in conns.iter_mut().enumerate() {
            let req = http::Request::get(format!("http://localhost/n/{c}"))
                .body(Empty::<Bytes>::new())
                .expect("request");
            let res = send.send_request(req).await.expect("response");
            let body = res.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, format!("n={c}").as_bytes());
        }
        // A WebSocket over each (an extended CONNECT after the moves): hyper's stream task
        // spawns the task that sends the tunnel's data, which must run where the connection is
        // now (it was dropped as an orphan when its owner was the key the connection had
        // before it moved).
        for (c, (send, _)) in conns.iter_mut().enumerate() {
            let mut ws = compat_tests::open_ws_over_h2(send, "/ws").await;
            let text = format!("ws {c}");
            ws.send(Message::text(text.clone())).await.expect("send");
            let got = tokio::time::timeout(IO_TIMEOUT, ws.next())
                .await
                .expect("echo in time")
                .expect("a message")
                .expect("no error");
            assert_eq!(got, Message::text(text), "[{backend}] WebSocket over a moved h2 connection");
            compat_tests::close_ws_over_h2(&mut ws).await.expect("the WebSocket closes");
        }
        let _ = stop.send(());
        for (_, conn) in conns {
            let ended = tokio::time::timeout(IO_TIMEOUT, conn).await;
            assert!(ended.is_ok(), "[{backend}] an HTTP/2 connection was not closed by the drain");
        }
        let forced = srv.handle.stats().forced;
        srv.join(IO_TIMEOUT).await;
        assert_eq!(forced, 0, "[{backend}] drained, none forced");
    }

    async fn tls_connections_move_with_their_state(backend) {
        let (cert_pem, key_pem, ca) = pki();
        let tls = hop::tls::RustlsConfig::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())
            .expect("server config");
        let srv = compat_tests::start(backend, app(), |b| defaults(b).tls(tls));
        let cfg = client_config(&ca);
        let done = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..3u64 {
            let (addr, cfg, done) = (srv.addr, cfg.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut send = h1_over_tls(addr, cfg).await;
                let mut n = 0u64;
                while n < 100 || !done.load(Ordering::Relaxed) {
                    let id = c << 32 | n;
                    let req = http::Request::get(format!("/n/{id}"))
                        .header("host", "localhost")
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    send.ready().await.expect("ready");
                    let res = send.send_request(req).await.expect("response");
                    let body = res.into_body().collect().await.expect("body").to_bytes();
                    assert_eq!(body, format!("n={id}").as_bytes());
                    n += 1;
                }
            }));
        }
        wait_spread(&srv, 3).await;
        done.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("client task");
        }
        assert_eq!(srv.handle.stats().tls_handshakes, 3, "no connection was set up again");
    }
}

/// A self-signed certificate for `localhost`: (cert PEM, key PEM, its DER to trust).
fn pki() -> (String, String, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

fn client_config(ca: &CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("add CA");
    let cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(cfg)
}

async fn h1_over_tls(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    send
}
