//! The poller's timer: a min-heap of `(deadline, Key)`, owned by the poller.
//!
//! A connection records the one deadline it is waiting for on its own slab entry (`armed`, a
//! [`Tick`]).
//! Arming an earlier deadline pushes a new heap entry; a later one waits for the armed entry to
//! fire (the connection then re-checks its own deadlines and arms again), so a keep-alive
//! connection costs at most one heap operation per timeout period, not one per request. Heap
//! entries that no longer matter (their connection closed, or an earlier deadline replaced them)
//! are counted, and swept out once they are half the heap: under connection churn every
//! connection arms its header timeout, and without the sweep the heap would hold that many
//! seconds' worth of closed connections.
//!
//! It also owns [`deadline`], the one way hop turns a user's or a peer's duration into an
//! instant: saturating, so `Duration::MAX` means "never" and no setting can overflow an
//! `Instant` (both backends use it), and [`cap`], the same bound for durations handed to
//! code that adds them to an instant itself (hyper's timers).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::wake::Key;

/// Far enough to mean never: about 30 years (as tokio's own "far future"). [`Tick`] holds
/// centuries, and mio's poll clamps its timeout, so a deadline this far is just never due.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `after` counted from `from`, saturating: any duration over [`FAR`] (`Duration::MAX`
/// included) is a far-future instant, never an overflow.
pub(crate) fn deadline(from: Instant, after: Duration) -> Instant {
    from.checked_add(cap(after)).unwrap_or(from)
}

/// `d`, at most [`FAR`]: for durations that other code (hyper's timers) adds to an instant.
pub(crate) fn cap(d: Duration) -> Duration {
    d.min(FAR)
}

/// A deadline in 8 bytes (an `Instant` takes 16): nanoseconds since the process's timer epoch,
/// plus one. It is what a slab entry records and the heap holds, so both stay small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Tick(NonZeroU64);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Tick {
    /// The tick of `at`, rounded up to the nanosecond (never early).
    pub(crate) fn of(at: Instant) -> Tick {
        let since = at.saturating_duration_since(epoch());
        // In 64-bit arithmetic (this runs for every request's deadline): saturating, so an
        // instant centuries out is the last tick, never a wrap.
        let nanos = since
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(since.subsec_nanos()));
        Tick(NonZeroU64::MIN.saturating_add(nanos.min(u64::MAX - 1)))
    }

    /// The instant of this tick.
    pub(crate) fn instant(self) -> Instant {
        epoch() + Duration::from_nanos(self.0.get() - 1)
    }
}

/// Sweep stale entries once there are at least this many, and they are half the heap.
const SWEEP_MIN: usize = 1024;

/// A poller's timer; see the module docs.
#[derive(Default)]
pub(crate) struct Timer {
    heap: BinaryHeap<Reverse<(Tick, Key)>>,
    /// Entries in `heap` that no longer matter, counted when they were replaced or forgotten.
    stale: usize,
}

impl Timer {
    /// Arms a wake-up of `key` at `at`. `armed` is the connection's record of the deadline it
    /// waits for (on its slab entry).
    pub(crate) fn arm(&mut self, armed: &mut Option<Tick>, key: Key, at: Instant) {
        let at = Tick::of(at);
        if armed.is_some_and(|t| t <= at) {
            return;
        }
        if armed.replace(at).is_some() {
            self.stale += 1;
        }
        self.heap.push(Reverse((at, key)));
    }

    /// Forgets a closing connection's armed deadline (its record, `armed`).
    pub(crate) fn forget(&mut self, armed: Option<Tick>) {
        if armed.is_some() {
            self.stale += 1;
        }
    }

    /// The earliest deadline in the heap.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| t.instant())
    }

    /// Pops every entry due at `now` and pushes the keys of those that still matter into
    /// `into`. `take(t, key)` says whether `(t, key)` is the deadline its connection waits for,
    /// and clears that connection's record if so.
    pub(crate) fn fire(
        &mut self,
        now: Instant,
        mut take: impl FnMut(Tick, Key) -> bool,
        into: &mut Vec<Key>,
    ) {
        let now = Tick::of(now);
        while let Some(Reverse((t, key))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            if take(t, key) {
                into.push(key);
            } else {
                self.stale = self.stale.saturating_sub(1);
            }
        }
        // A burst of deadlines (many connections' first requests) leaves a large heap behind.
        if self.heap.capacity() > 4 * self.heap.len().max(SWEEP_MIN) {
            self.heap.shrink_to_fit();
        }
    }

    /// Sweeps out the entries that no longer matter once they are half the heap; `live(t, key)`
    /// says whether `(t, key)` is the deadline its connection waits for.
    pub(crate) fn sweep(&mut self, live: impl Fn(Tick, Key) -> bool) {
        if self.stale < SWEEP_MIN || self.stale * 2 < self.heap.len() {
            return;
        }
        self.heap.retain(|Reverse((t, key))| live(*t, *key));
        if self.heap.capacity() > 4 * self.heap.len().max(SWEEP_MIN) {
            self.heap.shrink_to_fit();
        }
        self.stale = 0;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn forgotten_and_replaced_deadlines_are_swept() {
        let far = Instant::now() + Duration::from_secs(30);
        let n = 4 * SWEEP_MIN;
        let mut timer = Timer::default();
        // The connections' own records, by slot (`None`: closed).
        let mut armed: Vec<Option<Option<Tick>>> = vec![Some(None); n];
        let key = |slot| Key::new(0, slot, 1).unwrap();
        for (slot, a) in armed.iter_mut().enumerate() {
            let a = a.as_mut().unwrap();
            timer.arm(a, key(slot), far);
            // A later deadline waits for the armed one; an earlier one replaces it.
            timer.arm(a, key(slot), far + Duration::from_secs(1));
            for earlier in 1..=4 {
                timer.arm(a, key(slot), far - Duration::from_secs(earlier));
            }
        }
        let live = |armed: &Vec<Option<Option<Tick>>>, t: Tick, k: Key| {
            armed[k.slot()].is_some_and(|a| a == Some(t))
        };
        timer.sweep(|t, k| live(&armed, t, k));
        // Unswept, 5 entries per slot; swept, only the live ones.
        assert_eq!(timer.len(), n, "replaced entries pile up");
        for a in armed.iter_mut().take(n - 10) {
            timer.forget(a.take().unwrap());
        }
        timer.sweep(|t, k| live(&armed, t, k));
        assert_eq!(timer.len(), 10, "dead entries pile up");
        // The live ones still fire, once each.
        let mut due = Vec::new();
        timer.fire(
            far + Duration::from_secs(5),
            |t, k| match &mut armed[k.slot()] {
                Some(a) if *a == Some(t) => {
                    *a = None;
                    true
                }
                _ => false,
            },
            &mut due,
        );
        let mut slots: Vec<usize> = due.iter().map(|k| k.slot()).collect();
        slots.sort_unstable();
        assert_eq!(slots, (n - 10..n).collect::<Vec<_>>());
        assert_eq!(timer.len(), 0);
    }

    #[test]
    fn deadlines_saturate() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let never = deadline(now, Duration::MAX);
        assert!(never >= now + Duration::from_secs(86_400 * 365 * 29));
        assert_eq!(deadline(now, Duration::from_secs(u64::MAX / 2)), never);
        // The timer takes it: armed, never due, and the poll timeout stays sane.
        let mut timer = Timer::default();
        let mut armed = None;
        timer.arm(&mut armed, Key::new(0, 0, 1).unwrap(), never);
        let mut due = Vec::new();
        timer.fire(now + Duration::from_secs(3600), |_, _| true, &mut due);
        assert!(due.is_empty());
        assert!(timer.next_deadline().unwrap() >= never);
    }
}
