//! # hop
//!
//! Serve unchanged tower services — an axum `Router` first of all — over hyper 1.x, with each
//! connection driven in place by a mio event loop instead of a task per connection.
//!
//! ```
//! use axum::{routing::get, Router};
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let app = Router::new().route("/", get(|| async { "Hello, World!" }));
//!     let listener = std::net::TcpListener::bind("127.0.0.1:0")?; // any free port
//!     let serve = hop::serve(listener, app); // was: axum::serve(listener, app)
//!     println!("listening on {}", serve.local_addr()?);
//! #   let (addr, handle) = (serve.local_addr()?, serve.handle());
//! #   let client = std::thread::spawn(move || {
//! #       use std::io::{Read, Write};
//! #       let mut s = std::net::TcpStream::connect(addr).unwrap();
//! #       s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
//! #       let mut answer = String::new();
//! #       s.read_to_string(&mut answer).unwrap();
//! #       handle.shutdown();
//! #       answer
//! #   });
//!     serve.await
//! #   ?;
//! #   let answer = client.join().unwrap();
//! #   assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("Hello, World!"));
//! #   Ok(())
//! }
//! ```
//!
//! Two backends serve the same API:
//! - [`Backend::Reactor`] (default): N poller threads, each with its own `mio::Poll`, listener,
//!   slab of connections, timer and wake queue. A connection is hyper's `http1` or `http2`
//!   connection (HTTP/2 with prior knowledge, told apart by peeking at the preface) over a
//!   [`HopStream`], polled on readiness, its HTTP/2 streams local tasks on the same poller; an
//!   idle keep-alive HTTP/1.1 connection is parked down to its socket. Handlers run on the poller threads inside a tokio runtime context, so tokio's APIs
//!   work in them unchanged.
//! - [`Backend::Tokio`] (feature `tokio-baseline`): tokio + hyper, a task per connection, tuned
//!   the same way; the baseline hop is measured against.
//!
//! Choose with [`Builder::backend`] or, without code changes, `HOP_BACKEND=reactor|tokio`
//! (the builder wins when both are given).
//!
//! Features: none is on by default (HTTP/1.1, HTTP/2 and `hop::sse` are always built). `axum`
//! (axum's `ConnectInfo`, any `axum::serve::Listener`, hop's types as axum extractors and
//! responses), `ws` (`hop::ws`), `deflate` (its permessage-deflate), `tokio-baseline` (the tokio
//! backend), `tls` or `tls-ring` (`hop::tls`), `fs` (`hop::fs`) and `metrics`. The README's
//! features table says what each adds to a build.
//!
//! The source's layout, module by module in the order data flows, is the README's "Layout"
//! section.

#![warn(missing_docs)]
// Unless the tokio backend, axum's types, TLS, `fs` and `ws` are all built (the workspace's own
// builds turn them all on, so lints see every helper there), helpers that only they call go
// unused.
#![cfg_attr(
    not(all(
        feature = "tokio-baseline",
        feature = "axum",
        feature = "tls",
        feature = "fs",
        feature = "ws"
    )),
    allow(dead_code, unused_imports)
)]

#[cfg(feature = "tokio-baseline")]
mod baseline;
mod conn;
#[cfg(feature = "fs")]
pub mod fs;
mod handler;
mod hijack;
mod http2;
mod limits;
mod listener;
mod logs;
mod memory;
mod observe;
pub mod proxy;
mod reactor;
mod rt;
mod server;
mod service;
mod settings;
pub mod sse;
pub mod tcp;
#[cfg(any(feature = "tls", feature = "tls-ring"))]
pub mod tls;
mod tuning;
#[cfg(feature = "ws")]
pub mod ws;

pub use conn::stream::{HopStream, Socket};
pub use hijack::{Hijack, HijackRejection};
#[allow(deprecated)]
pub use server::IntoStdListener;
pub use server::{
    bind, bind_shared, serve, serve_tcp, shutdown_signal, Backend, Builder, Handle, IntoListener,
    Serve, Server, Stats, WithGracefulShutdown,
};
pub use service::app::{HttpApp, TcpApp};
pub use service::{
    marker, BoxError, ConnService, FromHyper, HopBody, IncomingStream, IntoConnService, PeerCred,
};
