//! Every setting checked before a server starts ([`Config::validate`]): each one either works
//! over its whole range or is refused with an `InvalidInput` error that names it.

use std::fmt;
use std::io;
use std::time::Duration;

use super::{Config, LimitsConfig, MAX_HEADERS, MAX_THREADS};

/// hyper's smallest `max_buf_size` (its builder panics under it).
const MIN_BUF_SIZE: usize = 8192;

/// HTTP/2's largest flow-control window (RFC 9113 §6.9.1) and its frame-size range (§6.5.2).
const MAX_WINDOW: u32 = (1 << 31) - 1;
const FRAME_SIZES: std::ops::RangeInclusive<u32> = (1 << 14)..=((1 << 24) - 1);

/// A setting refused by [`Config::validate`]: `serve` returns it.
fn refused(setting: &str, why: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("hop: {setting}: {why}"),
    )
}

/// A timeout that zero would turn into "close at once": `None` turns it off instead.
fn not_zero(setting: &str, t: Option<Duration>) -> io::Result<()> {
    match t {
        Some(Duration::ZERO) => Err(refused(
            setting,
            "zero would close every connection at once; `None` turns it off",
        )),
        _ => Ok(()),
    }
}

impl Config {
    /// Checks every setting before a server starts: each one either works over its whole range
    /// (`Duration::MAX` is "never", huge sizes are "unbounded") or is refused here with an
    /// `InvalidInput` error that names it, rather than panicking later in hop, hyper or h2.
    pub(crate) fn validate(&self) -> io::Result<()> {
        for (setting, n) in [
            ("pollers", self.pollers),
            ("compat_workers", self.compat_workers),
        ] {
            if n > MAX_THREADS {
                return Err(refused(
                    setting,
                    format!("{n} is over {MAX_THREADS} threads"),
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(refused(
                "max_connections",
                "0 would refuse every connection",
            ));
        }
        self.limits.validate()?;
        not_zero("header_read_timeout", self.header_read_timeout)?;
        not_zero("idle_timeout", self.idle_timeout)?;
        not_zero("read_timeout", self.tcp.read_timeout)?;
        not_zero("request_body_timeout", self.request_body_timeout)?;
        not_zero("http2_idle_timeout", self.http2.idle_timeout)?;
        not_zero("http2_keep_alive_interval", self.http2.keep_alive_interval)?;
        not_zero(
            "http2_keep_alive_timeout",
            Some(self.http2.keep_alive_timeout),
        )?;
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        not_zero("tls_handshake_timeout", Some(self.tls_handshake_timeout))?;
        if let Some(n) = self.max_buf_size.filter(|&n| n < MIN_BUF_SIZE) {
            return Err(refused(
                "max_buf_size",
                format!("{n} is under hyper's minimum of {MIN_BUF_SIZE}"),
            ));
        }
        if let Some(n) = self.max_headers.filter(|&n| n > MAX_HEADERS) {
            return Err(refused("max_headers", format!("{n} is over {MAX_HEADERS}")));
        }
        let h2 = &self.http2;
        for (setting, n) in [
            (
                "http2_initial_stream_window_size",
                h2.initial_stream_window_size,
            ),
            (
                "http2_initial_connection_window_size",
                h2.initial_connection_window_size,
            ),
        ] {
            if n > MAX_WINDOW {
                return Err(refused(
                    setting,
                    format!("{n} is over HTTP/2's largest window, {MAX_WINDOW}"),
                ));
            }
        }
        if !FRAME_SIZES.contains(&h2.max_frame_size) {
            return Err(refused(
                "http2_max_frame_size",
                format!(
                    "{} is outside HTTP/2's range, {} to {}",
                    h2.max_frame_size,
                    FRAME_SIZES.start(),
                    FRAME_SIZES.end()
                ),
            ));
        }
        if h2.max_send_buf_size > u32::MAX as usize {
            return Err(refused(
                "http2_max_send_buf_size",
                format!("{} is over {}", h2.max_send_buf_size, u32::MAX),
            ));
        }
        if h2.max_send_buf_size == 0 {
            return Err(refused(
                "http2_max_send_buf_size",
                "0 would stall every response (h2 could buffer none of it)",
            ));
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> io::Result<()> {
        if self.per_ip == Some(0) {
            return Err(refused(
                "max_connections_per_ip",
                "0 would refuse every connection",
            ));
        }
        if self.max_age == Some(Duration::ZERO) {
            return Err(refused(
                "max_connection_age",
                "zero would end every connection at once; `Duration::MAX` is never",
            ));
        }
        if self.max_requests == Some(0) {
            return Err(refused(
                "max_requests_per_connection",
                "0 would close every connection before its first request",
            ));
        }
        Ok(())
    }
}
