//! A 50 MB response to a slow reader: the server produces the body lazily and only as fast as
//! the client reads, so memory stays bounded.
//!
//! This file holds only these tests (their own process), and the two backends' tests take a
//! lock so that they do not run at the same time: the resident-set measurement covers the whole
//! process.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use compat_tests::{
    backend_tests, lazy_body, reqwest_client, rss_bytes, start, Backend, StreamProbe,
};
use futures_util::StreamExt;

const TOTAL: u64 = 50 * 1024 * 1024;
const MB: u64 = 1024 * 1024;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

backend_tests! {
    async fn large_response_to_slow_reader_bounded_memory(backend) {
        check_large_response(backend, |b| b).await;
    }
}

/// `pipeline_flush(false)`, the non-default setting; only the reactor reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_response_to_slow_reader_bounded_memory_no_pipeline_flush_reactor() {
    compat_tests::run_test(check_large_response(Backend::Reactor, |b| {
        b.pipeline_flush(false)
    }))
    .await;
}

/// Streams 50 MB in 64 KiB chunks to a reader that is slow for its first ~2 MB, and checks
/// that the server stays less than 30 MB ahead of it and that RSS grows by less than 30 MB.
async fn check_large_response(
    backend: Backend,
    configure: impl FnOnce(hop::Builder) -> hop::Builder,
) {
    let _serial = SERIAL.lock().await;
    let probe = Arc::new(StreamProbe::default());
    let p = probe.clone();
    let app = Router::new()
        .route("/warmup", get(|| async { "warm" }))
        .route(
            "/big",
            get(move || {
                let p = p.clone();
                async move { lazy_body(TOTAL, 64 * 1024, p) }
            }),
        );
    let srv = start(backend, app, configure);
    let client = reqwest_client();
    let res = client.get(srv.url("/warmup")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "warm");

    let baseline = rss_bytes().expect("VmRSS");
    let mut peak = baseline;
    let res = client.get(srv.url("/big")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut stream = res.bytes_stream();
    let mut received: u64 = 0;
    let mut max_ahead: u64 = 0;
    let mut slow_reads = 0;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("response stalled")
    {
        let chunk = chunk.expect("body chunk");
        // Check the content as it goes by (byte i is i % 251), without keeping it.
        for (k, b) in chunk.iter().enumerate() {
            let i = received + k as u64;
            if *b != (i % 251) as u8 {
                panic!("wrong byte at offset {i}");
            }
        }
        received += chunk.len() as u64;
        let produced = probe.produced.load(Ordering::SeqCst);
        max_ahead = max_ahead.max(produced.saturating_sub(received));
        if let Some(rss) = rss_bytes() {
            peak = peak.max(rss);
        }
        // Slow at first: ~2 s of small sleeps while the first 2 MB trickle in.
        if received < 2 * MB && slow_reads < 100 {
            slow_reads += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(received, TOTAL);
    assert_eq!(probe.produced.load(Ordering::SeqCst), TOTAL);
    assert!(probe.dropped.load(Ordering::SeqCst));
    let growth = peak.saturating_sub(baseline);
    eprintln!(
            "[{backend}] rss baseline {} MB, peak {} MB, growth {} KB; server at most {} KB ahead of the reader",
            baseline / MB,
            peak / MB,
            growth / 1024,
            max_ahead / 1024
        );
    assert!(
        max_ahead < 30 * MB,
        "server produced {max_ahead} bytes ahead of the reader"
    );
    assert!(
        growth < 30 * MB,
        "RSS grew by {growth} bytes while streaming"
    );
}
