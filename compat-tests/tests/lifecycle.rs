//! Connection lifecycle: header-read and idle timeouts, `max_connections`, graceful shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use compat_tests::{
    backend_tests, get_req, start, start_with_shutdown, wait_until, End, RawConn, TestServer,
    IO_TIMEOUT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

fn app() -> Router {
    Router::new().route("/", get(|| async { "hello" })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            "slow done"
        }),
    )
}

/// An app whose `/slow` announces on `started` that it is running, then sleeps 1 s.
fn slow_app(started: Arc<Notify>) -> Router {
    Router::new().route("/", get(|| async { "hello" })).route(
        "/slow",
        get(move || {
            let started = started.clone();
            async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
                "slow done"
            }
        }),
    )
}

/// Expects that new connections to `addr` are soon refused. Until every poller has closed its
/// listener (each does as it hears of the shutdown), one may still be accepted: it then gets
/// either nothing, or its one request answered, and is closed.
async fn expect_refused(addr: std::net::SocketAddr, within: Duration) {
    let t0 = Instant::now();
    loop {
        let stream = match tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(Err(_)) => return, // refused
            Ok(Ok(s)) => s,
            Err(_) => panic!("connect neither succeeded nor failed within {within:?}"),
        };
        let mut conn = RawConn::from_stream(stream);
        // The server may already have closed it: a failed write is fine.
        let _ = conn.send(get_req("/", "")).await;
        let (end, bytes) = conn.wait_close(within).await;
        assert!(
            end.closed(),
            "new connection neither refused nor closed: {end:?}"
        );
        let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
        // (Answered by a poller that had not yet heard of the shutdown, it is closed as an idle
        // keep-alive connection when it does.)
        assert!(
            bytes.is_empty() || (text.starts_with("http/1.1 200") && text.ends_with("hello")),
            "a new connection during the shutdown got {text:?}"
        );
        assert!(
            t0.elapsed() < within,
            "new connections still accepted {within:?} into the shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn graceful_shutdown_case(
    srv: TestServer,
    started: Arc<Notify>,
    trigger: impl FnOnce(&TestServer),
) {
    // An idle keep-alive connection, which the shutdown should close.
    let mut idle = RawConn::connect(srv.addr).await;
    assert_eq!(idle.roundtrip(get_req("/", "")).await.text(), "hello");

    let addr = srv.addr;
    let slow = tokio::spawn(async move {
        let mut conn = RawConn::connect(addr).await;
        conn.send(get_req("/slow", "")).await.unwrap();
        let res = conn.try_read_response(false, Duration::from_secs(30)).await;
        let end = conn.wait_close(Duration::from_secs(30)).await.0;
        (res, end)
    });
    tokio::time::timeout(IO_TIMEOUT, started.notified())
        .await
        .expect("slow handler never started");
    trigger(&srv);

    // The shutdown closes the idle keep-alive connection. (A signal is seen by the serve
    // future asynchronously; once the idle connection is closed, the shutdown has begun.)
    let (end, _) = idle.wait_close(IO_TIMEOUT).await;
    assert!(
        end.closed(),
        "idle connection not closed by the shutdown: {end:?}"
    );

    // New connections are no longer served.
    expect_refused(addr, IO_TIMEOUT).await;

    // The in-flight request completes normally, and its connection is then closed.
    let (res, end) = slow.await.unwrap();
    let res = res.expect("in-flight request was cut off by the shutdown");
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), "slow done");
    assert!(
        end.closed(),
        "in-flight connection not closed after draining: {end:?}"
    );

    let handle = srv.handle.clone();
    srv.join(Duration::from_secs(20)).await;
    let stats = handle.stats();
    assert!(stats.drained >= 1, "{stats:?}");
    assert_eq!(stats.forced, 0, "{stats:?}");
    assert_eq!(stats.active, 0, "{stats:?}");
    // After the server stopped, the port refuses connections.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

backend_tests! {
    async fn header_read_timeout_closes_partial_head(backend) {
        let srv = start(backend, app(), |b| b.header_read_timeout(Duration::from_secs(1)));
        let mut conn = RawConn::connect(srv.addr).await;
        // A full request first works.
        assert_eq!(conn.roundtrip(get_req("/", "")).await.text(), "hello");

        let mut conn = RawConn::connect(srv.addr).await;
        let t0 = Instant::now();
        conn.send("GET / HTTP/1.1\r\nHost: localhost\r\nX-Partial: ").await.unwrap();
        let (end, bytes) = conn.wait_close(Duration::from_secs(1) + IO_TIMEOUT).await;
        let elapsed = t0.elapsed();
        assert!(end.closed(), "partial head not timed out: {end:?} after {elapsed:?}");
        // hyper closes a connection whose head timed out without a response.
        assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
        assert!(elapsed >= Duration::from_millis(900), "closed too early: {elapsed:?}");

        // Other connections are unaffected.
        let mut conn = RawConn::connect(srv.addr).await;
        assert_eq!(conn.roundtrip(get_req("/", "")).await.text(), "hello");
    }

    async fn header_read_timeout_trickled_head(backend) {
        // Sending the head a byte at a time does not extend the deadline: the connection is
        // closed about `header_read_timeout` (1 s) after it opened, long before the ~10 s the
        // trickle takes (a deadline that each byte pushed back would close ~1 s after the last
        // byte, past 10 s).
        const TIMEOUT: Duration = Duration::from_secs(1);
        // Timer and scheduling delays on a loaded 2-core machine; far below the 10 s above.
        const LATE: Duration = Duration::from_secs(4);
        let srv = start(backend, app(), |b| b.header_read_timeout(TIMEOUT));
        let stream = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let t0 = Instant::now();
        let (mut rd, mut wr) = stream.into_split();
        // The reader notes when the server closes, while the writer is still trickling.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            let end = loop {
                match rd.read(&mut chunk).await {
                    Ok(0) => break End::Eof,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(_) => break End::Reset,
                }
            };
            (end, got, t0.elapsed())
        });
        let head = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: {}", "a".repeat(70));
        assert!(head.len() >= 100);
        let mut sent = 0;
        for b in head.bytes() {
            if reader.is_finished() || wr.write_all(&[b]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (end, bytes, closed_at) = tokio::time::timeout(IO_TIMEOUT, reader)
            .await
            .unwrap_or_else(|_| panic!("trickled head not timed out ({sent} bytes sent)"))
            .unwrap();
        assert!(end.closed(), "{end:?}");
        assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
        assert!(
            closed_at >= TIMEOUT - Duration::from_millis(100),
            "closed before the deadline: {closed_at:?}"
        );
        assert!(
            closed_at < TIMEOUT + LATE,
            "closed {closed_at:?} after connecting, {sent} of {} bytes sent: the trickle extended \
             the {TIMEOUT:?} deadline",
            head.len()
        );
        assert!(sent < head.len(), "the whole head was sent before the close");
    }

    async fn idle_timeout_closes_keep_alive_connection(backend) {
        let srv = start(backend, app(), |b| {
            b.idle_timeout(Duration::from_secs(1)).header_read_timeout(Duration::from_secs(30))
        });
        let mut conn = RawConn::connect(srv.addr).await;
        let res = conn.roundtrip(get_req("/", "")).await;
        assert_eq!(res.text(), "hello");
        assert!(!res.connection_close());
        let t0 = Instant::now();
        let (end, bytes) = conn.wait_close(Duration::from_secs(1) + IO_TIMEOUT).await;
        let elapsed = t0.elapsed();
        assert!(end.closed(), "idle connection not closed: {end:?} after {elapsed:?}");
        assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
        assert!(elapsed >= Duration::from_millis(800), "closed too early: {elapsed:?}");
        let handle = srv.handle.clone();
        assert!(wait_until(IO_TIMEOUT, || handle.stats().active == 0).await, "{:?}", handle.stats());
    }

    async fn idle_timeout_spares_active_connection(backend) {
        // Requests every 300 ms keep a connection with a 1 s idle timeout alive, and a handler
        // running longer than the idle timeout is not cut off.
        let srv = start(backend, app(), |b| {
            b.idle_timeout(Duration::from_secs(1)).header_read_timeout(Duration::from_secs(30))
        });
        let mut conn = RawConn::connect(srv.addr).await;
        for _ in 0..6 {
            assert_eq!(conn.roundtrip(get_req("/", "")).await.text(), "hello");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let srv2 = start(srv.backend, Router::new().route("/sleep", get(|| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            "slept"
        })), |b| b.idle_timeout(Duration::from_secs(1)));
        let mut conn = RawConn::connect(srv2.addr).await;
        assert_eq!(conn.roundtrip(get_req("/sleep", "")).await.text(), "slept");
    }

    async fn max_connections_rejects_extra(backend) {
        let srv = start(backend, app(), |b| b.max_connections(2));
        let mut a = RawConn::connect(srv.addr).await;
        let mut b = RawConn::connect(srv.addr).await;
        assert_eq!(a.roundtrip(get_req("/", "")).await.text(), "hello");
        assert_eq!(b.roundtrip(get_req("/", "")).await.text(), "hello");

        let mut c = RawConn::connect(srv.addr).await;
        let _ = c.send(get_req("/", "")).await;
        let (end, bytes) = c.wait_close(IO_TIMEOUT).await;
        assert!(end.closed(), "third connection not closed: {end:?}");
        assert!(bytes.is_empty(), "third connection got a response: {:?}", String::from_utf8_lossy(&bytes));
        let stats = srv.handle.stats();
        assert!(stats.rejected >= 1, "{stats:?}");
        assert_eq!(stats.active, 2, "{stats:?}");

        // The two admitted connections still work.
        assert_eq!(a.roundtrip(get_req("/", "")).await.text(), "hello");
        assert_eq!(b.roundtrip(get_req("/", "")).await.text(), "hello");

        // Once one closes, a new connection is admitted again.
        drop(a);
        let handle = srv.handle.clone();
        assert!(wait_until(IO_TIMEOUT, || handle.stats().active <= 1).await, "{:?}", handle.stats());
        let mut d = RawConn::connect(srv.addr).await;
        assert_eq!(d.roundtrip(get_req("/", "")).await.text(), "hello");
    }

    async fn graceful_shutdown_with_signal(backend) {
        let started = Arc::new(Notify::new());
        let (srv, tx) = start_with_shutdown(backend, slow_app(started.clone()), |b| {
            b.drain_timeout(Duration::from_secs(30))
        });
        let tx = std::sync::Mutex::new(Some(tx));
        graceful_shutdown_case(srv, started, move |_| {
            let _ = tx.lock().unwrap().take().unwrap().send(());
        })
        .await;
    }

    async fn graceful_shutdown_with_handle(backend) {
        let started = Arc::new(Notify::new());
        let srv = start(backend, slow_app(started.clone()), |b| {
            b.drain_timeout(Duration::from_secs(30))
        });
        graceful_shutdown_case(srv, started, |srv| srv.handle.shutdown()).await;
    }

    async fn drain_timeout_forces_stuck_connection(backend) {
        // A handler that never finishes is force-closed when the drain timeout runs out.
        let started = Arc::new(Notify::new());
        let s = started.clone();
        let app = Router::new().route("/stuck", get(move || {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
                "never"
            }
        }));
        let srv = start(backend, app, |b| b.drain_timeout(Duration::from_millis(500)));
        let mut conn = RawConn::connect(srv.addr).await;
        conn.send(get_req("/stuck", "")).await.unwrap();
        tokio::time::timeout(IO_TIMEOUT, started.notified()).await.expect("handler never started");
        srv.handle.shutdown();
        let (end, bytes) = conn.wait_close(IO_TIMEOUT).await;
        assert!(end.closed(), "stuck connection not force-closed: {end:?}");
        assert!(bytes.is_empty());
        let handle = srv.handle.clone();
        srv.join(IO_TIMEOUT).await;
        assert!(handle.stats().forced >= 1, "{:?}", handle.stats());
    }

    async fn dropping_serve_future_stops_server(backend) {
        let srv = start(backend, app(), |b| b);
        let mut conn = RawConn::connect(srv.addr).await;
        assert_eq!(conn.roundtrip(get_req("/", "")).await.text(), "hello");
        srv.task.abort();
        let _ = srv.task.await;
        let (end, _) = conn.wait_close(IO_TIMEOUT).await;
        assert!(end.closed(), "connection outlived the aborted server: {end:?}");
        let addr = srv.addr;
        let refused = wait_until(IO_TIMEOUT, || std::net::TcpStream::connect(addr).is_err()).await;
        assert!(refused, "listener still accepting after the serve future was dropped");
    }
}
