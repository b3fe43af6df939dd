//! The poller's timer, hyper's `rt::Timer` on top of it, and per-slot bookkeeping.
//!
//! Each poller thread owns a min-heap of `(deadline, Key)`. A connection has at most one armed
//! entry that matters (`SlotMeta::armed`): arming an earlier deadline pushes a new entry, a later
//! one waits for the armed entry to fire and re-arms then, so a keep-alive connection costs at
//! most one heap operation per timeout period, not one per request. When an entry fires, the
//! connection is simply polled again and re-checks its own deadlines. Entries that no longer
//! matter (their connection closed, or an earlier deadline replaced them) are counted and swept
//! out once they are half the heap: under connection churn every connection arms hyper's 30 s
//! header timeout, and without the sweep the heap would hold 30 s worth of dead connections.
//!
//! [`HopTimer`] is given to hyper so that `header_read_timeout` works. Its [`HopSleep`] also
//! tells the driver when hyper is waiting for a new request head (the sleep exists exactly
//! then), which is what idle parking needs to know.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::wake::Key;

/// What the driver tracks per slot outside the slab (so hyper's callbacks can reach it while the
/// slab entry is being polled).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SlotMeta {
    generation: u16,
    /// The earliest armed deadline for this slot.
    armed: Option<Instant>,
    /// hyper holds a header-read sleep: it is waiting for a request head.
    pub(crate) head_wait: bool,
    /// Requests dispatched to the service on this connection.
    pub(crate) requests: u64,
}

#[derive(Default)]
struct Local {
    heap: BinaryHeap<Reverse<(Instant, Key)>>,
    slots: Vec<SlotMeta>,
    /// Entries in `heap` that no longer matter, counted when they were replaced or forgotten.
    stale: usize,
}

/// Sweep stale entries once there are at least this many, and they are half the heap.
const SWEEP_MIN: usize = 1024;

impl Local {
    /// Whether `(t, key)` is the entry its slot is waiting for.
    fn live(&self, t: Instant, key: Key) -> bool {
        self.slots
            .get(key.slot())
            .is_some_and(|m| m.generation == key.generation() && m.armed == Some(t))
    }

    fn one_more_stale(&mut self) {
        self.stale += 1;
        if self.stale >= SWEEP_MIN && self.stale * 2 >= self.heap.len() {
            let mut heap = std::mem::take(&mut self.heap);
            heap.retain(|Reverse((t, key))| self.live(*t, *key));
            if heap.capacity() > 4 * heap.len().max(SWEEP_MIN) {
                heap.shrink_to_fit();
            }
            self.heap = heap;
            self.stale = 0;
        }
    }
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local::default());
    /// The connection being polled on this thread right now.
    static CURRENT: Cell<Option<Key>> = const { Cell::new(None) };
}

/// Resets a slot's bookkeeping when a new connection takes it.
pub(crate) fn reset_slot(key: Key) {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        let slot = key.slot();
        if l.slots.len() <= slot {
            l.slots.resize(slot + 1, SlotMeta::default());
        }
        l.slots[slot] = SlotMeta {
            generation: key.generation(),
            ..SlotMeta::default()
        };
    });
}

/// Forgets a closing connection's armed deadline.
pub(crate) fn forget_slot(key: Key) {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        let was_armed = match l.slots.get_mut(key.slot()) {
            Some(m) if m.generation == key.generation() => m.armed.take().is_some(),
            _ => false,
        };
        if was_armed {
            l.one_more_stale();
        }
    });
}

fn with_slot<R>(key: Key, f: impl FnOnce(&mut SlotMeta) -> R) -> Option<R> {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        match l.slots.get_mut(key.slot()) {
            Some(m) if m.generation == key.generation() => Some(f(m)),
            _ => None,
        }
    })
}

/// The slot's bookkeeping, copied out.
pub(crate) fn slot_meta(key: Key) -> SlotMeta {
    with_slot(key, |m| *m).unwrap_or_default()
}

/// Arms a wake-up of `key` at `at` (deduplicated, see the module docs).
pub(crate) fn arm(key: Key, at: Instant) {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        let mut replaced = false;
        if let Some(m) = l.slots.get_mut(key.slot()) {
            if m.generation != key.generation() {
                return;
            }
            if m.armed.is_some_and(|t| t <= at) {
                return;
            }
            replaced = m.armed.replace(at).is_some();
        }
        l.heap.push(Reverse((at, key)));
        if replaced {
            l.one_more_stale();
        }
    });
}

/// The earliest deadline in the heap.
pub(crate) fn next_deadline() -> Option<Instant> {
    LOCAL.with(|l| l.borrow().heap.peek().map(|Reverse((t, _))| *t))
}

/// Pops every entry due at `now` into `into` (the connections to poll).
pub(crate) fn fire(now: Instant, into: &mut Vec<Key>) {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        while let Some(Reverse((t, key))) = l.heap.peek().copied() {
            if t > now {
                break;
            }
            l.heap.pop();
            if l.live(t, key) {
                l.slots[key.slot()].armed = None;
                into.push(key);
            } else {
                l.stale = l.stale.saturating_sub(1);
            }
        }
        // A burst of deadlines (many connections' first requests) leaves a large heap behind.
        if l.heap.capacity() > 4 * l.heap.len().max(SWEEP_MIN) {
            l.heap.shrink_to_fit();
        }
    });
}

/// Runs `f` with `key` as the connection being polled.
pub(crate) fn with_current<R>(key: Key, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Key>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(CURRENT.with(|c| c.replace(Some(key))));
    f()
}

/// The connection being polled on this thread, if any.
pub(crate) fn current_key() -> Option<Key> {
    CURRENT.with(Cell::get)
}

/// Counts a request dispatched on the connection being polled (called by the service wrapper).
///
/// Parking relies on hyper holding its header-read sleep exactly while it waits for a request
/// head (the module docs): hyper drops it once a head is parsed, before the request reaches the
/// service. A debug assertion checks that here, so a hyper release that kept the sleep through
/// a request (which would let the driver park a connection mid-request) fails the tests.
pub(crate) fn note_request() {
    if let Some(key) = CURRENT.with(Cell::get) {
        with_slot(key, |m| {
            debug_assert!(
                !m.head_wait,
                "hyper dispatched a request while holding its header-read sleep"
            );
            m.requests += 1;
        });
    }
}

/// hyper's timer on the poller: see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HopTimer;

impl hyper::rt::Timer for HopTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let key = CURRENT.with(Cell::get);
        if let Some(key) = key {
            with_slot(key, |m| m.head_wait = true);
        }
        Box::pin(HopSleep {
            deadline,
            key,
            fallback: None,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HopSleep>() {
            Some(s) => s.get_mut().deadline = new_deadline,
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// A sleep on the poller's timer; see [`HopTimer`].
pub(crate) struct HopSleep {
    deadline: Instant,
    key: Option<Key>,
    /// Used only if polled off a poller thread (hyper never does that).
    fallback: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HopSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.deadline {
            return Poll::Ready(());
        }
        match this.key {
            Some(key) if crate::wake::current_poller() == Some(key.poller()) => {
                arm(key, this.deadline);
                Poll::Pending
            }
            _ => this
                .fallback
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(this.deadline.into())))
                .as_mut()
                .poll(cx),
        }
    }
}

impl hyper::rt::Sleep for HopSleep {}

impl Drop for HopSleep {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            if crate::wake::current_poller() == Some(key.poller()) {
                with_slot(key, |m| m.head_wait = false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heap_len() -> usize {
        LOCAL.with(|l| l.borrow().heap.len())
    }

    #[test]
    fn forgotten_and_replaced_deadlines_are_swept() {
        let far = Instant::now() + Duration::from_secs(30);
        let n = 4 * SWEEP_MIN;
        for slot in 0..n {
            let key = Key::new(0, slot, 1);
            reset_slot(key);
            arm(key, far);
            // A later deadline waits for the armed one; an earlier one replaces it.
            arm(key, far + Duration::from_secs(1));
            for earlier in 1..=4 {
                arm(key, far - Duration::from_secs(earlier));
            }
        }
        // Unswept, 5 entries per slot; swept, at most as many stale entries as live ones.
        assert!(
            heap_len() <= 2 * n + SWEEP_MIN,
            "replaced entries pile up: {}",
            heap_len()
        );
        for slot in 0..n - 10 {
            forget_slot(Key::new(0, slot, 1));
        }
        assert!(
            heap_len() <= 10 + 2 * SWEEP_MIN,
            "dead entries pile up: {}",
            heap_len()
        );
        // The live ones still fire, once each.
        let mut due = Vec::new();
        fire(far + Duration::from_secs(5), &mut due);
        let mut slots: Vec<usize> = due.iter().map(|k| k.slot()).collect();
        slots.sort_unstable();
        assert_eq!(slots, (n - 10..n).collect::<Vec<_>>());
        assert_eq!(heap_len(), 0);
    }
}
