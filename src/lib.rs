//! # hop
//!
//! Serve unchanged tower services — an axum `Router` first of all — over hyper 1.x, with each
//! connection driven in place by a mio event loop instead of a task per connection.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let app = Router::new().route("/", get(|| async { "Hello, World!" }));
//!     let listener = std::net::TcpListener::bind("127.0.0.1:3000")?;
//!     hop::serve(listener, app).await // was: axum::serve(listener, app).await
//! }
//! ```
//!
//! Two backends serve the same API:
//! - [`Backend::Reactor`] (default): N poller threads, each with its own `mio::Poll`, listener,
//!   slab of connections, timer and wake queue. A connection is hyper's `http1` connection over
//!   a [`HopStream`], polled on readiness; an idle keep-alive connection is parked down to its
//!   socket. Handlers run on the poller threads inside a tokio runtime context, so tokio's APIs
//!   work in them unchanged.
//! - [`Backend::Tokio`] (feature `tokio-baseline`): tokio + hyper, a task per connection, tuned
//!   the same way; the baseline hop is measured against.
//!
//! Choose with [`Builder::backend`] or, without code changes, `HOP_BACKEND=reactor|tokio`
//! (the builder wins when both are given).
//!
//! Modules: `server` (the public front), `settings` (settings, shutdown state and counters,
//! below the front), `reactor` (the event loop), `driver` (one HTTP
//! connection), `stream` (hyper's I/O traits on the socket), `timer` (the poller's timer and
//! hyper's), `wake` (wakers that name a connection), `service` (what `serve` accepts),
//! `baseline` (the tokio backend).

#![warn(missing_docs)]

mod app;
#[cfg(feature = "tokio-baseline")]
mod baseline;
mod driver;
mod hijack;
mod reactor;
mod server;
mod service;
mod settings;
pub mod sse;
mod stream;
pub mod tcp;
mod timer;
mod wake;
pub mod ws;

pub use hijack::{Hijack, HijackRejection};
pub use server::{
    bind, serve, serve_tcp, shutdown_signal, Backend, Builder, Handle, IntoStdListener, Serve,
    Server, Stats, WithGracefulShutdown,
};
pub use service::{
    marker, BoxError, ConnService, FromHyper, HopBody, IncomingStream, IntoConnService,
};
pub use stream::{HopStream, Socket};
