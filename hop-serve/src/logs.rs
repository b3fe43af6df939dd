//! Bounded logs: nothing a peer sends makes hop's log grow without bound. [`Clip`] cuts text
//! a peer (or a panicking handler) controls to [`CLIP`] bytes in a log line ([`panic_message`]:
//! a caught panic's text, so cut), and
//! `warn_limited!` / `error_limited!` rate-limit
//! a line that every connection could repeat: at most [`BURST`] lines per [`WINDOW`] from each
//! call site, the next one saying how many were not logged meanwhile. rustls logs nothing
//! (hop builds it without its `logging` feature: it would log a peer's whole SNI name on each
//! attempt); a failed handshake gets hop's own line, [`tls_handshake_failed`].
//!
//! Every module may use this one; it uses none of them.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Most bytes of one peer-controlled value in a log line.
pub(crate) const CLIP: usize = 256;
/// Lines a rate-limited call site may log per [`WINDOW`].
pub(crate) const BURST: u64 = 10;
/// The rate limit's window.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

/// Shows at most [`CLIP`] bytes of a value's `Display`, then how long it was.
pub(crate) struct Clip<T>(pub(crate) T);

impl<T: fmt::Display> fmt::Display for Clip<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Passes on the first [`CLIP`] bytes (whole chars) and counts the rest.
        struct Bounded<'a, 'b> {
            f: &'a mut fmt::Formatter<'b>,
            len: usize,
        }
        impl fmt::Write for Bounded<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                let room = CLIP.saturating_sub(self.len);
                self.len = self.len.saturating_add(s.len());
                if room >= s.len() {
                    return self.f.write_str(s);
                }
                let mut end = room;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                self.f.write_str(&s[..end])
            }
        }
        let mut w = Bounded { f, len: 0 };
        fmt::write(&mut w, format_args!("{}", self.0))?;
        if w.len > CLIP {
            write!(w.f, "... ({} bytes)", w.len)?;
        }
        Ok(())
    }
}

/// `s` cut to at most [`CLIP`] bytes (on a char boundary).
pub(crate) fn clip(s: &str) -> &str {
    if s.len() <= CLIP {
        return s;
    }
    let mut end = CLIP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The text of a caught panic, for the log.
/// (Cut to a few hundred bytes: a panic message may hold what a peer sent.)
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    clip(if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    })
}

/// A call site's rate limit (a `static`, one per call site): see the module docs.
pub(crate) struct Every {
    /// When the current window started: milliseconds since [`epoch`], plus one (0: never).
    window: AtomicU64,
    /// Lines logged in the current window.
    logged: AtomicU64,
    /// Lines not logged since the last one that was.
    quiet: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Every {
    pub(crate) const fn new() -> Self {
        Every {
            window: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            quiet: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log this one; `n` lines were not logged since the last. `None`: stay quiet.
    /// (Threads racing at a window's edge may log a line or two more: harmless.)
    pub(crate) fn ready(&self) -> Option<u64> {
        let now = u64::try_from(epoch().elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let start = self.window.load(Ordering::Relaxed);
        let due = start == 0 || now.saturating_sub(start) >= WINDOW.as_millis() as u64;
        if due
            && self
                .window
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.quiet.swap(0, Ordering::Relaxed))
        } else {
            self.quiet.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!`, at most [`BURST`] lines per [`WINDOW`] from this call site; each line has
/// a `not_logged` field.
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static EVERY: $crate::logs::Every = $crate::logs::Every::new();
        if let Some(not_logged) = EVERY.ready() {
            tracing::warn!(not_logged, $($arg)+);
        }
    }};
}

/// `tracing::error!`, rate-limited as `warn_limited!`.
macro_rules! error_limited {
    ($($arg:tt)+) => {{
        static EVERY: $crate::logs::Every = $crate::logs::Every::new();
        if let Some(not_logged) = EVERY.ready() {
            tracing::error!(not_logged, $($arg)+);
        }
    }};
}

pub(crate) use {error_limited, warn_limited};

/// Logs a failed TLS handshake (the one line a peer's ClientHello gets: bounded, and
/// rate-limited across connections; every failure is counted in the stats).
#[cfg(any(feature = "tls", feature = "tls-ring"))]
pub(crate) fn tls_handshake_failed(error: &dyn fmt::Display) {
    warn_limited!(error = %Clip(error), "TLS handshake failed; closing");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_bounds_text() {
        let long = "é".repeat(1000);
        let shown = Clip(&long).to_string();
        assert!(shown.len() <= CLIP + 32, "{}", shown.len());
        assert!(shown.ends_with("... (2000 bytes)"));
        assert_eq!(Clip("short").to_string(), "short");
        assert!(clip(&long).len() <= CLIP);
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn every_limits_a_burst() {
        let every = Every::new();
        let logged = (0..1000).filter(|_| every.ready().is_some()).count() as u64;
        assert_eq!(logged, BURST);
    }
}
