//! Server-Sent Events: a [`Hub`] of subscribers that live on their poller with no task and no
//! buffer while idle.
//!
//! [`Hub::subscribe`] answers `200 text/event-stream`. Under the reactor, once hyper has written
//! that head the driver takes the socket back from hyper (as a hijack does) and the subscriber
//! becomes a read-handler connection: events are written straight into its bounded outbound
//! buffer, keep-alive comments come from the poller's timer. Under the tokio backend a
//! subscriber is an ordinary streaming body fed by a channel (a task per connection there).
//!
//! A subscriber whose queue is full (a slow reader) is dropped and counted
//! ([`Hub::dropped`]), and so is one whose replay ([`Subscription::send`]) alone fills it; one
//! that disconnects is removed at once, however its connection ends. Under the reactor an
//! event is a letter in the subscriber's poller's mailbox (`handler::mail`): an idle
//! subscriber keeps nothing for it, and one send wakes each poller once. The hub names a
//! reactor subscriber by its connection's process-wide id as well as its slot, so an event
//! for a subscriber that is gone never reaches a connection that reuses the slot.
//! [`Hub::send`] copies the subscriber table and fans out without holding it: subscribers
//! join and leave (on their pollers) while a large fan-out runs; sends are taken one at a
//! time, so every subscriber sees events in the order they were sent.
//!
//! ```
//! use axum::{extract::{Request, State}, response::IntoResponse, routing::{get, post}, Router};
//! use hop::sse::{Event, Hub};
//!
//! let hub = Hub::new();
//! # let subscribers = hub.clone();
//! let app: Router = Router::new()
//!     .route("/sse", get(|State(hub): State<Hub>, req: Request| async move {
//!         hub.subscribe(&req).into_response()
//!     }))
//!     .route("/sse/broadcast", post(|State(hub): State<Hub>, body: String| async move {
//!         hub.send(&Event::new(body));
//!     }))
//!     .with_state(hub);
//! # let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! # let addr = listener.local_addr()?;
//! # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # let client = std::thread::spawn(move || {
//! #     let _stop = stop; // the server stops when this thread ends, a panic included
//! #     use std::io::{Read, Write};
//! #     let connect = || {
//! #         let s = std::net::TcpStream::connect(addr).unwrap();
//! #         s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
//! #         s
//! #     };
//! #     let mut events = connect();
//! #     events.write_all(b"GET /sse HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
//! #     // Broadcast once the subscriber has joined the hub.
//! #     for _ in 0..6000 {
//! #         if !subscribers.is_empty() {
//! #             break;
//! #         }
//! #         std::thread::sleep(std::time::Duration::from_millis(10));
//! #     }
//! #     let mut post = connect();
//! #     let request = "POST /sse/broadcast HTTP/1.1\r\nhost: x\r\nconnection: close\r\n";
//! #     write!(post, "{request}content-length: 5\r\n\r\nhello").unwrap();
//! #     let mut posted = String::new();
//! #     post.read_to_string(&mut posted).unwrap();
//! #     let mut stream = String::new();
//! #     while !stream.contains("data: hello\n\n") {
//! #         let mut buf = [0; 1024];
//! #         let n = events.read(&mut buf).unwrap();
//! #         assert!(n > 0, "the stream ended: {stream}");
//! #         stream.push_str(std::str::from_utf8(&buf[..n]).unwrap());
//! #     }
//! #     (posted, stream)
//! # });
//! # hop::serve(listener, app).with_graceful_shutdown(async { let _ = stopped.await; }).run()?;
//! # let (posted, stream) = client.join().unwrap();
//! # assert!(posted.starts_with("HTTP/1.1 200"), "{posted}");
//! # assert!(stream.starts_with("HTTP/1.1 200"), "{stream}");
//! # assert!(stream.contains("content-type: text/event-stream"), "{stream}");
//! # Ok::<(), std::io::Error>(())
//! ```

// The rooms, each importing only those below it: `subscription` (what a handler answers with:
// `Hub::subscribe`, the replay, the response and its body) -> `subscriber` (the read handler a
// subscriber becomes on its poller) -> `hub` (the subscribers and the fan-out) -> `event` (an
// event's encoding and framing).
mod event;
mod hub;
mod subscriber;
mod subscription;
#[cfg(test)]
mod tests;

pub use event::Event;
pub use hub::{Hub, HubConfig};
pub use subscription::{SseBody, Subscription};
