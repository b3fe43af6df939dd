//! What `serve` accepts as an app, what a make-service is told about a new connection
//! ([`IncomingStream`], [`PeerCred`]), and the one service wrapper both backends hand to hyper.
//!
//! [`IntoConnService`] turns whatever the user passes to [`serve`](crate::serve) (an axum
//! `Router`, an `IntoMakeService`, an `IntoMakeServiceWithConnectInfo`, any tower
//! `Service<Request<Incoming>>`, or a hyper `service_fn`) into one per-connection tower
//! service. [`HyperSvc`] adapts that tower service to hyper's `Service` trait, catches a
//! panicking handler (a `500` with `connection: close`, so only that connection ends), and
//! wraps the response body in [`HopBody`], which turns a panic while streaming the body into a
//! body error (hyper then closes the connection).
//!
//! The files, each importing only those after it: `app` (what an accepted connection becomes:
//! [`HttpApp`](app::HttpApp), [`TcpApp`](app::TcpApp), the `App` trait both backends accept
//! through), `make` (make-services: [`IntoConnService`], [`ConnService`], [`IncomingStream`],
//! [`PeerCred`], the markers), `clock` (the tokio backend's HTTP/1.1 stream and service:
//! the request-body timeout and the per-connection limits), `call` ([`HyperSvc`], the user's
//! service called for one request, its panics caught), `body` ([`HopBody`], [`BoxError`]),
//! `wire` (what the request-body timeouts read off the HTTP/1.1 wire).

pub(crate) mod app;
mod body;
mod call;
mod clock;
mod make;
mod wire;

pub use body::{BoxError, HopBody};
pub(crate) use call::{panicked, Call, HyperSvc};
pub(crate) use clock::{BodyClock, BodyIo, Clocked, ConnLimits};
pub(crate) use make::local_addr_of;
pub use make::{marker, ConnService, FromHyper, IncomingStream, IntoConnService, PeerCred};
pub(crate) use wire::{ends_chunked, head_at_least, read_tail, TIMEOUT_408};
