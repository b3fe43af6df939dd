//! The public front: [`serve`], [`Builder`], the [`Serve`] future, graceful shutdown, and the
//! [`Handle`] that reads counters and stops a running server.
//!
//! This module picks the backend (builder first, then `HOP_BACKEND`, then the reactor), finds
//! or starts the tokio runtime that handlers run in, starts the backend (or, for a generic
//! `axum::serve::Listener`, the tokio-task path whatever the backend), and waits for the
//! shutdown signal and for the backend to finish draining.

use crate::handler::Handler;
pub use crate::listener::IntoListener;
use crate::service::app::{HttpApp, TcpApp};
use crate::service::{IncomingStream, IntoConnService};
pub use crate::settings::{Backend, Stats};

// The rooms, each importing only those below it: `builder` (the settings) -> `run` (the
// `Serve` future, `Handle`, starting the backend, the drain); `signal` (`shutdown_signal`) and
// `bind` (`bind`, `bind_shared`) stand alone. `serve` and `serve_tcp` are here.
mod bind;
mod builder;
mod run;
mod signal;

#[allow(deprecated)]
pub use bind::IntoStdListener;
pub use bind::{bind, bind_shared};
pub use builder::{Builder, Server};
pub use run::{Handle, Serve, WithGracefulShutdown};
pub use signal::shutdown_signal;

/// Serves `app` on `listener` with the default settings: the counterpart of `axum::serve`.
///
/// `listener` is a TCP or Unix listener from std or tokio, or any `axum::serve::Listener`:
/// see [`IntoListener`].
///
/// `.await` it under any runtime, or call [`Serve::run`] to block without one.
///
/// ```
/// use axum::{routing::get, Router};
///
/// #[tokio::main]
/// async fn main() -> std::io::Result<()> {
///     let app = Router::new().route("/", get(|| async { "Hello, World!" }));
///     let listener = std::net::TcpListener::bind("127.0.0.1:0")?; // any free port
///     let serve = hop::serve(listener, app);
/// #   let (addr, handle) = (serve.local_addr()?, serve.handle());
/// #   let client = std::thread::spawn(move || {
/// #       use std::io::{Read, Write};
/// #       let mut s = std::net::TcpStream::connect(addr).unwrap();
/// #       s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
/// #       let mut answer = String::new();
/// #       s.read_to_string(&mut answer).unwrap();
/// #       handle.shutdown();
/// #       answer
/// #   });
///     serve.await
/// #   ?;
/// #   let answer = client.join().unwrap();
/// #   assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("Hello, World!"));
/// #   Ok(())
/// }
/// ```
pub fn serve<L, LM, A, M>(listener: L, app: A) -> Serve<HttpApp<A, M>>
where
    L: IntoListener<LM>,
    A: IntoConnService<M>,
    M: 'static,
{
    Builder::default().serve(listener, app)
}

/// Serves a raw byte-stream protocol (over TCP, a Unix socket, or any listener [`serve`]
/// takes) with the default settings: `factory` makes one [`Handler`](crate::tcp::Handler) per
/// connection. See [`crate::tcp`].
pub fn serve_tcp<L, LM, F, H>(listener: L, factory: F) -> Serve<TcpApp<F>>
where
    L: IntoListener<LM>,
    F: FnMut(IncomingStream<'_>) -> H + Clone + Send + 'static,
    H: Handler,
{
    Builder::default().serve_tcp(listener, factory)
}
