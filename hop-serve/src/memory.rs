//! Giving freed heap memory back to the operating system after connections close.
//!
//! glibc's allocator keeps what a burst of connections freed (an HTTP/2 client that opened a
//! hundred streams and never read holds megabytes of buffered responses) inside its arenas: the
//! process's RSS stays at the burst's peak long after the connections are gone, and many
//! threads (pollers, tokio's blocking pool behind `tokio::fs`) freeing into several arenas
//! fragment it so that its own trimming rarely fires. This module owns that housekeeping: a
//! close ([`note_close`], on either backend) wakes a thread of its own, which runs a check at
//! most once per [`INTERVAL`] and calls `malloc_trim` when the process holds more than
//! [`SLACK`] of resident memory beyond what is allocated. The trim walks the allocator's
//! arenas under their locks, so it runs off the pollers and tokio's workers. A check that gives
//! little back doubles the wait before the next one (up to about a minute), so a heap that
//! cannot shrink costs nothing. Elsewhere than on glibc this does nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The least time between two checks.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);
/// Resident memory beyond the allocator's live bytes (and the binary, stacks and such) that is
/// worth a trim.
pub(crate) const SLACK: u64 = 16 << 20;
/// The most a fruitless check backs off, in multiples of [`INTERVAL`].
const MAX_BACKOFF: u32 = 64;

/// A close happened since the last check.
static ARMED: AtomicBool = AtomicBool::new(false);
/// Where the trimming thread waits for [`ARMED`].
static WAIT: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());

/// A connection (or an HTTP/2 stream) has closed: what it held may be free now. Cheap: a load,
/// and once per check a store and a wake-up.
pub(crate) fn note_close() {
    if !ENABLED || ARMED.load(Ordering::Relaxed) || ARMED.swap(true, Ordering::AcqRel) {
        return;
    }
    static THREAD: OnceLock<bool> = OnceLock::new();
    let running = *THREAD.get_or_init(|| {
        std::thread::Builder::new()
            .name("hop-memory".into())
            .spawn(run)
            .is_ok()
    });
    if running {
        let _held = WAIT.0.lock().unwrap_or_else(|e| e.into_inner());
        WAIT.1.notify_one();
    }
}

/// The trimming thread: waits for a close, then checks no sooner than the interval (times the
/// backoff) after the last check.
fn run() {
    let mut backoff = 1u32;
    let mut next = Instant::now();
    loop {
        {
            let mut held = WAIT.0.lock().unwrap_or_else(|e| e.into_inner());
            while !ARMED.load(Ordering::Acquire) {
                held = WAIT.1.wait(held).unwrap_or_else(|e| e.into_inner());
            }
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        ARMED.store(false, Ordering::Release);
        backoff = match check() {
            Some(true) | None => 1,
            Some(false) => (backoff * 2).min(MAX_BACKOFF),
        };
        next = Instant::now() + INTERVAL * backoff;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ENABLED: bool = true;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
const ENABLED: bool = false;

/// Trims when resident memory exceeds live allocations by more than [`SLACK`]. `Some(true)`
/// when a trim gave back at least a quarter of the slack, `Some(false)` when it gave back
/// less, `None` when there was nothing to do.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn check() -> Option<bool> {
    let before = resident()?;
    // SAFETY: mallinfo2 only reads the allocator's statistics (under its own locks).
    let info = unsafe { libc::mallinfo2() };
    let live = (info.uordblks as u64).saturating_add(info.hblkhd as u64);
    if before <= live.saturating_add(SLACK) {
        tracing::trace!(before, live, "no heap memory to give back");
        return None;
    }
    // SAFETY: malloc_trim releases free pages of the allocator's heaps (under its own locks);
    // no memory in use is touched.
    unsafe { libc::malloc_trim(0) };
    let after = resident()?;
    let freed = before.saturating_sub(after);
    tracing::debug!(before, after, live, "gave freed heap memory back");
    Some(freed >= SLACK / 4)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn check() -> Option<bool> {
    None
}

/// The process's resident set, in bytes (`/proc/self/statm`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages.saturating_mul(u64::try_from(page).ok()?))
}
