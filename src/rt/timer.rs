//! The poller's timer: a min-heap of `(deadline, Key)`, owned by the poller.
//!
//! A connection records the one deadline it is waiting for on its own slab entry (`armed`).
//! Arming an earlier deadline pushes a new heap entry; a later one waits for the armed entry to
//! fire (the connection then re-checks its own deadlines and arms again), so a keep-alive
//! connection costs at most one heap operation per timeout period, not one per request. Heap
//! entries that no longer matter (their connection closed, or an earlier deadline replaced them)
//! are counted, and swept out once they are half the heap: under connection churn every
//! connection arms its header timeout, and without the sweep the heap would hold that many
//! seconds' worth of closed connections.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::wake::Key;

/// Sweep stale entries once there are at least this many, and they are half the heap.
const SWEEP_MIN: usize = 1024;

/// A poller's timer; see the module docs.
#[derive(Default)]
pub(crate) struct Timer {
    heap: BinaryHeap<Reverse<(Instant, Key)>>,
    /// Entries in `heap` that no longer matter, counted when they were replaced or forgotten.
    stale: usize,
}

impl Timer {
    /// Arms a wake-up of `key` at `at`. `armed` is the connection's record of the deadline it
    /// waits for (on its slab entry).
    pub(crate) fn arm(&mut self, armed: &mut Option<Instant>, key: Key, at: Instant) {
        if armed.is_some_and(|t| t <= at) {
            return;
        }
        if armed.replace(at).is_some() {
            self.stale += 1;
        }
        self.heap.push(Reverse((at, key)));
    }

    /// Forgets a closing connection's armed deadline (its record, `armed`).
    pub(crate) fn forget(&mut self, armed: Option<Instant>) {
        if armed.is_some() {
            self.stale += 1;
        }
    }

    /// The earliest deadline in the heap.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Pops every entry due at `now` and pushes the keys of those that still matter into
    /// `into`. `take(t, key)` says whether `(t, key)` is the deadline its connection waits for,
    /// and clears that connection's record if so.
    pub(crate) fn fire(
        &mut self,
        now: Instant,
        mut take: impl FnMut(Instant, Key) -> bool,
        into: &mut Vec<Key>,
    ) {
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
    pub(crate) fn sweep(&mut self, live: impl Fn(Instant, Key) -> bool) {
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
        let mut armed: Vec<Option<Option<Instant>>> = vec![Some(None); n];
        let key = |slot| Key::new(0, slot, 1);
        for (slot, a) in armed.iter_mut().enumerate() {
            let a = a.as_mut().unwrap();
            timer.arm(a, key(slot), far);
            // A later deadline waits for the armed one; an earlier one replaces it.
            timer.arm(a, key(slot), far + Duration::from_secs(1));
            for earlier in 1..=4 {
                timer.arm(a, key(slot), far - Duration::from_secs(earlier));
            }
        }
        let live = |armed: &Vec<Option<Option<Instant>>>, t: Instant, k: Key| {
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
}
