//! permessage-deflate (RFC 7692) for `hop::ws`: the offer/response negotiation, and a codec
//! whose cost while a connection is idle is a few dozen bytes.
//!
//! A zlib stream that keeps its context holds its window and its tables: about 300 KB for a
//! compressor and 40 KB for a decompressor, per connection, for as long as it lives. That would
//! undo the 0.4 KB idle WebSocket. So the zlib streams here are not the connection's: each
//! thread (each poller) keeps one compressor per level and window size, and one decompressor,
//! and lends them to a connection for one message at a time. What a connection keeps is
//! [`Codec`]: the agreed parameters and, for the server's context, the last
//! [`history`](Deflate::history) bytes it sent compressed. Each compressed message is
//! compressed against that history, set as the compressor's dictionary, so the client (which
//! keeps its window) decodes back-references into earlier messages as with full context
//! takeover; on a JSON stream, 4 KiB of history lands within a few percent of a 32 KiB window.
//! The history is released when the connection has sent nothing compressed for
//! [`history_idle`](Deflate::history_idle). In the other direction hop asks the client for
//! `client_no_context_takeover` (a client must honour it), so each message decodes alone with
//! the thread's decompressor; a server that allows client context takeover keeps a
//! decompressor per connection instead.
//!
//! A compressor for window bits 9 never refers back further than 250 bytes (zlib's limit is
//! the window less 262 bytes of lookahead), so it also serves a client that asks for
//! `server_max_window_bits=8`, which zlib cannot set.
//!
//! This file holds the settings; `codec` the negotiation and the codec, with zlib (flate2 on
//! zlib-rs), built with the `deflate` feature (off by default). Without it, offers are declined
//! and every WebSocket runs uncompressed (`off`).

use std::time::Duration;

#[cfg(feature = "deflate")]
mod codec;
#[cfg(feature = "deflate")]
pub(crate) use codec::{negotiate, Codec};
#[cfg(not(feature = "deflate"))]
pub(crate) use off::{negotiate, Codec};

/// permessage-deflate settings ([`WsConfig::deflate`](super::WsConfig::deflate)).
///
/// The defaults: on, level 6, messages under 32 bytes sent as they are, 15-bit windows, the
/// server keeps 4 KiB of context for 10 s after its last compressed message, and the client is
/// asked not to keep context (`client_no_context_takeover`), so that an idle compressed
/// WebSocket costs what an uncompressed one does.
#[derive(Debug, Clone, Copy)]
pub struct Deflate {
    /// Accept a client's permessage-deflate offer (default `true`).
    pub enabled: bool,
    /// zlib compression level, 0 to 9 (default 6).
    pub level: u32,
    /// Messages shorter than this are sent uncompressed (default 32 bytes).
    pub threshold: usize,
    /// The largest LZ77 window the server compresses with, 8 to 15 (default 15); a client's
    /// `server_max_window_bits` can lower it.
    pub server_max_window_bits: u8,
    /// The largest window the client may compress with, 8 to 15 (default 15). Below 15 it is
    /// sent as `client_max_window_bits`, and an offer that does not allow that is declined
    /// unless the client is also asked not to keep context.
    pub client_max_window_bits: u8,
    /// Answer `server_no_context_takeover`: every message is compressed alone (default
    /// `false`; a client can ask for it).
    pub server_no_context_takeover: bool,
    /// Answer `client_no_context_takeover`: the client compresses every message alone, and
    /// hop keeps no decompressor per connection (default `true`). With `false`, a client that
    /// keeps context costs a zlib decompressor and its 32 KiB window for the connection's life.
    pub client_no_context_takeover: bool,
    /// How much of what the server sent it compresses against (default 4 KiB; at most the
    /// window). 0 compresses each message alone.
    pub history: usize,
    /// The history is dropped once the connection has sent no compressed message for this
    /// long (default 10 s), so an idle connection keeps none.
    pub history_idle: Duration,
}

impl Default for Deflate {
    fn default() -> Self {
        Deflate {
            enabled: true,
            level: 6,
            threshold: 32,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            server_no_context_takeover: false,
            client_no_context_takeover: true,
            history: 4096,
            history_idle: Duration::from_secs(10),
        }
    }
}

impl Deflate {
    /// permessage-deflate off: offers are declined.
    pub fn disabled() -> Self {
        Deflate {
            enabled: false,
            ..Deflate::default()
        }
    }
}

/// Why a compressed message could not be decoded.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "deflate"), allow(dead_code))]
pub(crate) enum InflateError {
    /// It inflates past the message size limit.
    TooLarge,
    /// It is not valid DEFLATE data.
    Invalid,
}

/// Without the `deflate` feature: no codec exists, and every offer is declined.
#[cfg(not(feature = "deflate"))]
mod off {
    use std::time::Duration;

    use http::{HeaderMap, HeaderValue};

    use super::{Deflate, InflateError};

    /// No connection has one: nothing can make it.
    #[derive(Debug)]
    pub(crate) enum Codec {}

    impl Codec {
        pub(crate) fn compresses(&self, _len: usize) -> bool {
            match *self {}
        }

        pub(crate) fn compress(&mut self, _data: &[u8]) -> (Vec<u8>, Option<Duration>) {
            match *self {}
        }

        pub(crate) fn release_if_idle(&mut self) -> Option<Duration> {
            match *self {}
        }

        pub(crate) fn decompress(
            &mut self,
            _data: &[u8],
            _max: usize,
        ) -> Result<Vec<u8>, InflateError> {
            match *self {}
        }
    }

    /// Declines every offer: the WebSocket runs uncompressed.
    pub(crate) fn negotiate(_cfg: &Deflate, _headers: &HeaderMap) -> Option<(Codec, HeaderValue)> {
        None
    }
}
