//! What both backends share of HTTP/2 (h2c with prior knowledge): recognizing the client
//! preface from a connection's first bytes ([`sniff`]), and the service hyper's HTTP/2
//! connection calls ([`Http2Svc`]: the user's service, with panics caught, counting each
//! stream in `Stats::http2_streams`).
//!
//! hyper's `http2` connection itself is driven by each backend: in place on a poller, its
//! streams as poller-local tasks (`conn::http`), or as a tokio task (`baseline`).
//!
//! The files, each importing only those after it: `svc` (the service, [`Http2Svc`]), `metered`
//! (the tokio backend's metered stream and its watch over stalled bodies), `meter` (the
//! [`Meter`]: the control-frame budget, the request bodies waited for, the RST_STREAMs and the
//! GOAWAY it puts in), `frames` (frame types and codes, frame headers read across reads, a
//! frame written), `preface` (the client preface and [`sniff`]).

mod frames;
mod meter;
#[cfg(feature = "tokio-baseline")]
mod metered;
mod preface;
mod svc;

pub(crate) use meter::{flood, lock, Meter, Stall};
#[cfg(feature = "tokio-baseline")]
pub(crate) use metered::{watch_bodies, Metered};
pub(crate) use preface::{sniff, Proto, PREFACE};
pub(crate) use svc::Http2Svc;
