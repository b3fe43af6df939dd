//! The poller's timer, hyper's `rt::Timer` on top of it, and per-slot bookkeeping.
//!
//! Each poller thread owns a min-heap of `(deadline, Key)`. A connection has at most one armed
//! entry that matters (`SlotMeta::armed`): arming an earlier deadline pushes a new entry, a later
//! one waits for the armed entry to fire and re-arms then, so a keep-alive connection costs at
//! most one heap operation per timeout period, not one per request. When an entry fires, the
//! connection is simply polled again and re-checks its own deadlines.
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
        let Local { heap, slots } = &mut *l;
        if let Some(m) = slots.get_mut(key.slot()) {
            if m.generation != key.generation() {
                return;
            }
            if m.armed.is_some_and(|t| t <= at) {
                return;
            }
            m.armed = Some(at);
        }
        heap.push(Reverse((at, key)));
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
        let Local { heap, slots } = &mut *l;
        while let Some(Reverse((t, key))) = heap.peek().copied() {
            if t > now {
                break;
            }
            heap.pop();
            if let Some(m) = slots.get_mut(key.slot()) {
                if m.generation == key.generation() && m.armed == Some(t) {
                    m.armed = None;
                    into.push(key);
                }
            }
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
pub(crate) fn note_request() {
    if let Some(key) = CURRENT.with(Cell::get) {
        with_slot(key, |m| m.requests += 1);
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
