//! Tests of the SSE room that reach inside it: a subscriber's target in the hub and the
//! poller's delivery of an event to it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use http::Request;

use crate::rt::mail::Letter;
use crate::rt::wake::{self, Target};

use super::event::{Event, Framed};
use super::hub::{Hub, Sink};

/// Reads from `s` until `want` has arrived; everything read.
fn read_until(s: &mut TcpStream, want: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(want) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A delivery whose key is the connection's own but whose id is another's (a subscriber
/// gone from that slot 65,536 generations ago, or a send's copy of the table that still
/// holds it) is dropped by the poller: only the connection's own id reaches it.
#[test]
fn a_stale_target_with_the_same_key_is_not_delivered() {
    let hub = Hub::new();
    let h = hub.clone();
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let res = h.subscribe(&req).response();
        async move { Ok::<_, std::convert::Infallible>(res) }
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = crate::Server::builder()
        .backend(crate::Backend::Reactor)
        .pollers(1)
        .serve(listener, svc);
    let handle = serve.handle();
    let server = std::thread::spawn(move || serve.run());

    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    read_until(&mut c, "\r\n\r\n");
    let t0 = std::time::Instant::now();
    let to = loop {
        if let Some(Sink::Loop { to, .. }) = hub.subs().values().next() {
            break *to;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no subscriber");
        std::thread::sleep(Duration::from_millis(5));
    };
    let stale = Target {
        key: to.key,
        id: to.id.wrapping_sub(1),
    };
    let event = |data: &str| Framed::new(&Event::new(data)).get(true);
    let post = |to, data| wake::post(to, Letter::Deliver(event(data)), |_| Ok::<_, ()>(()));
    assert_eq!(post(stale, "stale"), Ok(()));
    assert_eq!(post(to, "live"), Ok(()));
    let got = read_until(&mut c, "data: live");
    assert!(!got.contains("stale"), "{got:?}");

    handle.shutdown();
    server.join().unwrap().unwrap();
}
