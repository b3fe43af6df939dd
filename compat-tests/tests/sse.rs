//! `hop::sse` on both backends, read through a real SSE parser (eventsource-stream).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use compat_tests::backend_tests;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use hop::sse::{Event, Hub, HubConfig};
use hop::Backend;
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(20);

async fn subscribe(State(hub): State<Hub>, req: Request) -> axum::response::Response {
    let mut sub = hub.subscribe(&req);
    if let Some(last) = sub.last_event_id() {
        // Hand the client what it missed since `last`.
        let missed = Event::new(format!("since {last}")).event("replay");
        sub.send(&missed);
    }
    sub.into_response()
}

fn start(backend: Backend, cfg: HubConfig) -> (SocketAddr, hop::Handle, Hub) {
    let hub = Hub::with_config(cfg);
    let app = Router::new()
        .route("/sse", get(subscribe))
        .route("/", get(|| async { "ok" }))
        .with_state(hub.clone());
    let srv = compat_tests::start(backend, app, |b| b);
    (srv.addr, srv.handle, hub)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The next event a client parses, as `(event type, id, data)`.
async fn next_event<S, E>(s: &mut S) -> (String, String, String)
where
    S: futures_util::Stream<Item = Result<eventsource_stream::Event, E>> + Unpin,
    E: std::fmt::Debug,
{
    let ev = tokio::time::timeout(WAIT, s.next())
        .await
        .expect("no event in time")
        .expect("the stream ended")
        .expect("the stream did not parse");
    (ev.event, ev.id, ev.data)
}

#[test]
fn line_breaks_in_id_or_event_type_panic() {
    for bad in ["a\rb", "a\nb", "a\r\nb", "\r", "a\n"] {
        let event = std::panic::catch_unwind(|| Event::new("x").event(bad));
        assert!(event.is_err(), "event type {bad:?} was accepted");
        let id = std::panic::catch_unwind(|| Event::new("x").id(bad));
        assert!(id.is_err(), "id {bad:?} was accepted");
    }
    assert!(
        std::panic::catch_unwind(|| Event::new("x").id("a\0b")).is_err(),
        "an id with NUL was accepted"
    );
    // Event types may contain NUL; ordinary values are taken as they are.
    let _ = Event::new("x").event("a\0b").event("tick").id("42").id("");
}

backend_tests! {
    async fn broadcast_reaches_subscribers(backend) {
        let (addr, handle, hub) = start(backend, HubConfig::default());
        let mut streams = Vec::new();
        for _ in 0..3 {
            let res = reqwest::get(format!("http://{addr}/sse")).await.unwrap();
            assert_eq!(res.status(), 200);
            assert_eq!(res.headers()["content-type"], "text/event-stream");
            streams.push(res.bytes_stream().eventsource());
        }
        wait_for("3 subscribers", || hub.len() == 3).await;
        assert_eq!(hub.send(&Event::new("line one\nline two").id("7").event("greeting")), 3);
        for s in &mut streams {
            let ev = tokio::time::timeout(WAIT, s.next()).await.unwrap().unwrap().unwrap();
            assert_eq!(ev.event, "greeting");
            assert_eq!(ev.id, "7");
            assert_eq!(ev.data, "line one\nline two");
        }
        // Plain requests still work beside the subscribers.
        assert_eq!(reqwest::get(format!("http://{addr}/")).await.unwrap().text().await.unwrap(), "ok");
        handle.shutdown();
    }

    async fn line_breaks_in_data_cannot_inject_fields(backend) {
        let (addr, handle, hub) = start(backend, HubConfig::default());
        let res = reqwest::get(format!("http://{addr}/sse")).await.unwrap();
        let mut s = res.bytes_stream().eventsource();
        wait_for("a subscriber", || hub.len() == 1).await;
        // CR, LF and CRLF each end a line for an EventSource: none may start a field.
        hub.send(&Event::new("a\rid: evil\revent: pwn\r\nb\nc\r").id("7").event("greeting"));
        // Nor may a blank line (CR CR, CRLF CRLF, LF LF) end the event early.
        hub.send(&Event::new("p\r\rdata: q\r\n\r\nretry: 1\n\nr").id("8").event("second"));
        hub.send(&Event::new("end").id("9").event("last"));
        let want = |e: &str, id: &str, data: &str| (e.to_owned(), id.to_owned(), data.to_owned());
        assert_eq!(
            next_event(&mut s).await,
            want("greeting", "7", "a\nid: evil\nevent: pwn\nb\nc\n")
        );
        assert_eq!(
            next_event(&mut s).await,
            want("second", "8", "p\n\ndata: q\n\nretry: 1\n\nr")
        );
        assert_eq!(next_event(&mut s).await, want("last", "9", "end"));
        handle.shutdown();
    }

    async fn wire_format_is_exact(backend) {
        let (addr, handle, hub) = start(backend, HubConfig::default());
        let res = reqwest::get(format!("http://{addr}/sse")).await.unwrap();
        wait_for("a subscriber", || hub.len() == 1).await;
        hub.send(&Event::new("a\nb").id("1").event("e"));
        let mut body = res.bytes_stream();
        let mut got = Vec::new();
        let want = b"id: 1\nevent: e\ndata: a\ndata: b\n\n";
        while got.len() < want.len() {
            let chunk = tokio::time::timeout(WAIT, body.next()).await.unwrap().unwrap().unwrap();
            got.extend_from_slice(&chunk);
        }
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        handle.shutdown();
    }

    async fn send_to_one_and_last_event_id(backend) {
        let (addr, handle, hub) = start(backend, HubConfig::default());
        let client = reqwest::Client::new();
        let res = client
            .get(format!("http://{addr}/sse"))
            .header("last-event-id", "41")
            .send()
            .await
            .unwrap();
        let mut s = res.bytes_stream().eventsource();
        let ev = tokio::time::timeout(WAIT, s.next()).await.unwrap().unwrap().unwrap();
        assert_eq!((ev.event.as_str(), ev.data.as_str()), ("replay", "since 41"));
        wait_for("1 subscriber", || hub.len() == 1).await;
        // Only this subscriber exists; send_to by a wrong id fails, the right one works.
        assert!(!hub.send_to(9999, &Event::new("nobody")));
        assert_eq!(hub.send(&Event::new("everyone")), 1);
        let ev = tokio::time::timeout(WAIT, s.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(ev.data, "everyone");
        handle.shutdown();
    }

    async fn keep_alive_comments(backend) {
        let cfg = HubConfig { keep_alive: Duration::from_millis(100), ..HubConfig::default() };
        let (addr, handle, _hub) = start(backend, cfg);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains(":\n\n") {
            let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        handle.shutdown();
    }

    /// `keep_alive` of zero sends no comments (rather than a loop of them, or a panic in
    /// tokio's interval), and `Duration::MAX` none either (rather than an overflow); events
    /// still arrive.
    async fn keep_alive_zero_and_max_are_never(backend) {
        for keep_alive in [Duration::ZERO, Duration::MAX] {
            let cfg = HubConfig { keep_alive, ..HubConfig::default() };
            let (addr, handle, hub) = start(backend, cfg);
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::AsyncWriteExt;
            s.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            wait_for("a subscriber", || hub.len() == 1).await;
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            let quiet = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Ok(r) = tokio::time::timeout_at(quiet, s.read(&mut buf)).await {
                let n = r.unwrap();
                assert!(n > 0, "[{keep_alive:?}] closed: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
            assert!(
                !String::from_utf8_lossy(&seen).contains(":\n\n"),
                "[{keep_alive:?}] a keep-alive comment: {}",
                String::from_utf8_lossy(&seen)
            );
            assert_eq!(hub.send(&Event::new("after")), 1);
            while !String::from_utf8_lossy(&seen).contains("data: after") {
                let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
                assert!(n > 0, "[{keep_alive:?}] closed: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
            handle.shutdown();
        }
    }

    async fn disconnected_subscribers_are_removed(backend) {
        let (addr, handle, hub) = start(backend, HubConfig::default());
        let res = reqwest::get(format!("http://{addr}/sse")).await.unwrap();
        wait_for("a subscriber", || hub.len() == 1).await;
        drop(res);
        // Under the tokio backend the body notices on the next write; nudge it.
        wait_for("the subscriber to leave", || {
            hub.send(&Event::new("ping"));
            hub.is_empty()
        })
        .await;
        handle.shutdown();
    }

    async fn slow_subscriber_is_dropped(backend) {
        let cfg = HubConfig { max_queue: 256 * 1024, ..HubConfig::default() };
        let (addr, handle, hub) = start(backend, cfg);
        // A subscriber that never reads.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        slow.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        // And one that keeps up: each event is sent once it has read the previous one.
        let res = reqwest::get(format!("http://{addr}/sse")).await.unwrap();
        let mut fast = res.bytes_stream().eventsource();
        wait_for("2 subscribers", || hub.len() == 2).await;
        let big = "x".repeat(32 * 1024);
        let mut sent = 0;
        while hub.dropped() == 0 {
            assert!(sent < 2000, "the slow subscriber was never dropped");
            hub.send(&Event::new(big.clone()));
            sent += 1;
            match tokio::time::timeout(WAIT, fast.next()).await {
                Ok(Some(Ok(ev))) => assert_eq!(ev.data.len(), big.len()),
                other => panic!("the fast subscriber failed after {sent}: {other:?}"),
            }
        }
        assert_eq!(hub.len(), 1, "only the slow subscriber goes");
        // The slow one was closed: after draining what was queued, its stream ends.
        let mut buf = vec![0u8; 1 << 16];
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                match slow.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the slow subscriber's connection was not closed");
        handle.shutdown();
    }

    /// What `Subscription::send` queues before the response goes out is framed once, like a
    /// hub event: the de-chunked body holds the event itself. (An EventSource parser does not
    /// notice a second framing, so `send_to_one_and_last_event_id` cannot.)
    async fn backlog_wire_format_is_exact(backend) {
        let (addr, handle, hub) = start(backend, HubConfig::default());
        let res = reqwest::Client::new()
            .get(format!("http://{addr}/sse"))
            .header("last-event-id", "41")
            .send()
            .await
            .unwrap();
        wait_for("a subscriber", || hub.len() == 1).await;
        hub.send(&Event::new("next"));
        let mut body = res.bytes_stream();
        let mut got = Vec::new();
        let want = b"event: replay\ndata: since 41\n\ndata: next\n\n";
        while got.len() < want.len() {
            let chunk = tokio::time::timeout(WAIT, body.next()).await.unwrap().unwrap().unwrap();
            got.extend_from_slice(&chunk);
        }
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        handle.shutdown();
    }

    async fn shutdown_ends_streams(backend) {
        let (addr, handle, hub) = start(backend, HubConfig::default());
        let res = reqwest::get(format!("http://{addr}/sse")).await.unwrap();
        wait_for("a subscriber", || hub.len() == 1).await;
        handle.shutdown();
        // The stream ends (cleanly or by close) well within the drain timeout.
        let mut body = res.bytes_stream();
        let ended = tokio::time::timeout(WAIT, async {
            while let Some(chunk) = body.next().await {
                if chunk.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the SSE stream did not end on shutdown");
    }
}
