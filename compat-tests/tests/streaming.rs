//! Streaming bodies: a slow producer, and clients that go away mid-request or mid-response.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use compat_tests::{
    backend_tests, get_req, lazy_body, reqwest_client, start, wait_until, RawConn, StreamProbe,
    IO_TIMEOUT,
};
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};

const CHUNKS: usize = 8;
const BIG: u64 = 64 * 1024 * 1024;

/// `/slow-stream`: sends chunk 0, waits for the test to confirm it arrived (so the server must
/// have flushed it while the body is still open), then sends the rest with sleeps in between.
fn slow_producer_app(first_seen: Arc<Notify>) -> Router {
    Router::new().route(
        "/slow-stream",
        get(move || {
            let first_seen = first_seen.clone();
            async move {
                let stream = futures_util::stream::unfold(0usize, move |i| {
                    let first_seen = first_seen.clone();
                    async move {
                        if i == CHUNKS {
                            return None;
                        }
                        if i == 1 {
                            first_seen.notified().await;
                        }
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Some((
                            Ok::<_, std::io::Error>(Bytes::from(format!("chunk-{i};"))),
                            i + 1,
                        ))
                    }
                });
                Body::from_stream(stream)
            }
        }),
    )
}

/// `/big`: 64 MiB produced lazily in 64 KiB chunks (nobody reads it all); `/upload`: reads the
/// request body, reporting progress and the outcome on `events`; `/ok`: a plain answer.
fn disconnect_app(probe: Arc<StreamProbe>, events: mpsc::UnboundedSender<String>) -> Router {
    Router::new()
        .route(
            "/big",
            get(move || {
                let probe = probe.clone();
                async move { lazy_body(BIG, 64 * 1024, probe) }
            }),
        )
        .route(
            "/upload",
            post(move |body: Body| {
                let events = events.clone();
                async move {
                    let mut stream = body.into_data_stream();
                    let mut n = 0;
                    let outcome = loop {
                        match stream.next().await {
                            Some(Ok(chunk)) => {
                                n += chunk.len();
                                let _ = events.send(format!("read {n}"));
                            }
                            Some(Err(e)) => break format!("error after {n}: {e}"),
                            None => break format!("complete {n}"),
                        }
                    };
                    let _ = events.send(outcome.clone());
                    outcome
                }
            }),
        )
        .route("/ok", get(|| async { "ok" }))
}

backend_tests! {
    async fn streaming_response_from_slow_producer(backend) {
        let first_seen = Arc::new(Notify::new());
        let srv = start(backend, slow_producer_app(first_seen.clone()), |b| b);
        let res = reqwest_client().get(srv.url("/slow-stream")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.content_length().is_none(), "a stream has no length");
        let mut stream = res.bytes_stream();
        let mut received = Vec::new();
        let mut notified = false;
        let expected: String = (0..CHUNKS).map(|i| format!("chunk-{i};")).collect();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("stream stalled: chunk 0 was never flushed?")
        {
            received.extend_from_slice(&chunk.unwrap());
            if !notified && received.starts_with(b"chunk-0;") {
                notified = true;
                first_seen.notify_one();
            }
        }
        assert_eq!(String::from_utf8(received).unwrap(), expected);
    }

    async fn streaming_response_chunked_on_the_wire(backend) {
        // The same stream read raw: chunked transfer-encoding, every chunk in order.
        let first_seen = Arc::new(Notify::new());
        let srv = start(backend, slow_producer_app(first_seen.clone()), |b| b);
        let mut conn = RawConn::connect(srv.addr).await;
        conn.send(get_req("/slow-stream", "")).await.unwrap();
        // Chunk 0 must arrive before the producer is allowed to go on.
        let mut head = Vec::new();
        while !String::from_utf8_lossy(&head).contains("chunk-0;") {
            let bytes = conn.read_raw(64 * 1024, IO_TIMEOUT).await.expect("chunk 0 never arrived");
            assert!(!bytes.is_empty(), "closed before chunk 0");
            head.extend_from_slice(&bytes);
        }
        first_seen.notify_one();
        let mut all = head;
        loop {
            match compat_tests::parse_response(&all, false, false).unwrap() {
                Some((res, used)) => {
                    assert_eq!(used, all.len());
                    assert_eq!(res.status, 200);
                    assert_eq!(res.header("transfer-encoding"), Some("chunked"));
                    let expected: String = (0..CHUNKS).map(|i| format!("chunk-{i};")).collect();
                    assert_eq!(res.text(), expected);
                    break;
                }
                None => {
                    let bytes = conn.read_raw(64 * 1024, IO_TIMEOUT).await.expect("stream stalled");
                    assert!(!bytes.is_empty(), "closed mid-stream");
                    all.extend_from_slice(&bytes);
                }
            }
        }
    }

    async fn client_closes_mid_request(backend) {
        let probe = Arc::new(StreamProbe::default());
        let (tx, mut events) = mpsc::unbounded_channel();
        let srv = start(backend, disconnect_app(probe, tx), |b| b);
        drop(send_partial_upload(srv.addr).await);
        // The server still answers, on new connections and right away.
        for _ in 0..3 {
            let mut conn = RawConn::connect(srv.addr).await;
            assert_eq!(conn.roundtrip(get_req("/ok", "")).await.text(), "ok");
        }
        // The handler never saw a complete body.
        while let Ok(ev) = events.try_recv() {
            assert!(!ev.starts_with("complete"), "{ev}");
        }
    }

    async fn client_closes_mid_request_releases_connection(backend) {
        let probe = Arc::new(StreamProbe::default());
        let (tx, mut events) = mpsc::unbounded_channel();
        let srv = start(backend, disconnect_app(probe, tx), |b| b);
        drop(send_partial_upload(srv.addr).await);
        // The handler's body read ends in an error (never a complete body, never a hang).
        let outcome = loop {
            let ev = tokio::time::timeout(IO_TIMEOUT, events.recv())
                .await
                .expect("the handler never saw the disconnect")
                .unwrap();
            if !ev.starts_with("read ") {
                break ev;
            }
        };
        assert!(outcome.starts_with("error after"), "{outcome}");
        assert_released_and_serving(&srv).await;
    }

    async fn client_closes_mid_request_after_handler_read(backend) {
        // As above, but the client goes away only once the handler has read what was sent.
        let probe = Arc::new(StreamProbe::default());
        let (tx, mut events) = mpsc::unbounded_channel();
        let srv = start(backend, disconnect_app(probe, tx), |b| b);
        {
            let _conn = send_partial_upload(srv.addr).await;
            loop {
                let ev = tokio::time::timeout(IO_TIMEOUT, events.recv())
                    .await
                    .expect("handler never read the body")
                    .unwrap();
                if ev == "read 10000" {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let outcome = tokio::time::timeout(IO_TIMEOUT, events.recv())
            .await
            .expect("the handler never saw the disconnect")
            .unwrap();
        assert!(outcome.starts_with("error after"), "{outcome}");
        assert_released_and_serving(&srv).await;
    }

    async fn client_closes_mid_response(backend) {
        let probe = Arc::new(StreamProbe::default());
        let (tx, _events) = mpsc::unbounded_channel();
        let srv = start(backend, disconnect_app(probe.clone(), tx), |b| b);
        read_some_of_big_and_drop(srv.addr).await;
        // The server drops the body and the connection, and keeps answering.
        assert!(
            wait_until(Duration::from_secs(30), || probe.dropped.load(Ordering::SeqCst)).await,
            "response body still alive after the client left; produced {} bytes",
            probe.produced.load(Ordering::SeqCst)
        );
        let mut conn = RawConn::connect(srv.addr).await;
        assert_eq!(conn.roundtrip(get_req("/ok", "")).await.text(), "ok");
        let res = conn.roundtrip(get_req("/ok", "Connection: close\r\n")).await;
        assert_eq!(res.text(), "ok");
        drop(conn);
        let handle = srv.handle.clone();
        assert!(
            wait_until(IO_TIMEOUT, || handle.stats().active == 0).await,
            "connections still open: {:?}",
            handle.stats()
        );
    }
    async fn client_closes_mid_response_stops_producing(backend) {
        check_stops_producing(backend, |b| b).await;
    }
}

/// `pipeline_flush(false)`, the non-default setting; only the reactor reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closes_mid_response_stops_producing_no_pipeline_flush_reactor() {
    compat_tests::run_test(check_stops_producing(compat_tests::Backend::Reactor, |b| {
        b.pipeline_flush(false)
    }))
    .await;
}

/// POSTs a head announcing 1 MiB and 10 KB of body; the caller closes the connection.
async fn send_partial_upload(addr: std::net::SocketAddr) -> RawConn {
    let mut conn = RawConn::connect(addr).await;
    conn.send("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1048576\r\n\r\n")
        .await
        .unwrap();
    conn.send(vec![b'x'; 10_000]).await.unwrap();
    conn
}

/// The server let go of the client's connection and still answers on a new one.
async fn assert_released_and_serving(srv: &compat_tests::TestServer) {
    let handle = srv.handle.clone();
    assert!(
        wait_until(IO_TIMEOUT, || handle.stats().active == 0).await,
        "connection not released: {:?}",
        handle.stats()
    );
    let mut conn = RawConn::connect(srv.addr).await;
    assert_eq!(conn.roundtrip(get_req("/ok", "")).await.text(), "ok");
}

/// GETs `/big`, reads 1 MiB of it and closes.
async fn read_some_of_big_and_drop(addr: std::net::SocketAddr) {
    let mut conn = RawConn::connect(addr).await;
    conn.send(get_req("/big", "")).await.unwrap();
    let mut got = 0;
    while got < 1024 * 1024 {
        let bytes = conn
            .read_raw(64 * 1024, IO_TIMEOUT)
            .await
            .expect("response stalled");
        assert!(!bytes.is_empty(), "closed early");
        got += bytes.len();
    }
}

/// After the client leaves mid-response, the server stops pulling the body: far less than the
/// whole 64 MiB is produced.
async fn check_stops_producing(
    backend: compat_tests::Backend,
    configure: impl FnOnce(hop::Builder) -> hop::Builder,
) {
    let probe = Arc::new(StreamProbe::default());
    let (tx, _events) = mpsc::unbounded_channel();
    let srv = start(backend, disconnect_app(probe.clone(), tx), configure);
    read_some_of_big_and_drop(srv.addr).await;
    assert!(
        wait_until(Duration::from_secs(30), || probe
            .dropped
            .load(Ordering::SeqCst))
        .await,
        "response body still alive after the client left"
    );
    let produced = probe.produced.load(Ordering::SeqCst);
    assert!(
        produced < 32 * 1024 * 1024,
        "{produced} of {BIG} bytes produced for a client that read 1 MiB"
    );
    let mut conn = RawConn::connect(srv.addr).await;
    assert_eq!(conn.roundtrip(get_req("/ok", "")).await.text(), "ok");
}
