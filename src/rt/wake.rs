//! Wakers that name a connection: (poller, slot, generation) packed into the waker's data word.
//!
//! A [`Key`] is a `u64`; the waker built from it carries no allocation and no reference count,
//! so cloning and dropping it are free. Waking it from the poller's own thread pushes the key on
//! that thread's local ready queue; waking it from any other thread pushes it on the poller's
//! [`Remote`] queue and wakes the poller's `mio::Poll` through its `mio::Waker`. The poller
//! checks the generation, so a late wake for a slot that has been reused is ignored (a wake
//! that reaches the wrong connection after the 16-bit generation wraps costs a spurious drive,
//! no more). Bytes are another matter: what is delivered to a read-handler connection
//! ([`deliver`]) names it by a [`Target`], its key and a process-wide 64-bit id that no other
//! connection ever has, so bytes meant for one connection never reach another that reuses its
//! slot, however many times. Both cross-thread queues are bounded by what is woken, not by how
//! often: a key is queued once until the poller takes the queue, and bytes delivered to a
//! connection stop at the sender's limit for it.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use std::task::{RawWaker, RawWakerVTable, Waker};

/// A connection's identity: poller id (16 bits), generation (16 bits), slab slot (32 bits).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key(u64);

impl Key {
    /// `None` if `slot` does not fit in 32 bits (the poller then refuses the connection).
    pub(crate) fn new(poller: u16, slot: usize, generation: u16) -> Option<Self> {
        let slot = u32::try_from(slot).ok()?;
        Some(Key(((poller as u64) << 48)
            | ((generation as u64) << 32)
            | u64::from(slot)))
    }

    pub(crate) fn poller(self) -> u16 {
        (self.0 >> 48) as u16
    }

    pub(crate) fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    /// The waker that schedules this connection on its poller.
    pub(crate) fn waker(self) -> Waker {
        // SAFETY: the data word is a plain integer, never dereferenced; every vtable function
        // treats it as a `Key`, and none of them owns a resource, so any copy is valid.
        unsafe { Waker::from_raw(raw(self)) }
    }
}

/// A read-handler connection as code outside it names it for [`deliver`]: its key, and an id
/// unique in the process ([`next_id`]). The key's generation has 16 bits and repeats after
/// 65,536 new entries on a poller; the id never repeats, so a stale target (a sender that still
/// holds it after the connection closed) never reaches the connection that reuses its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) key: Key,
    pub(crate) id: u64,
}

/// A connection id never handed out before in this process (never 0).
pub(crate) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn raw(key: Key) -> RawWaker {
    RawWaker::new(key.0 as usize as *const (), &VTABLE)
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(
    |data| raw(Key(data as usize as u64)),
    |data| wake(Key(data as usize as u64)),
    |data| wake(Key(data as usize as u64)),
    |_| {},
);

const _: () = assert!(
    std::mem::size_of::<usize>() == 8,
    "hop's wakers pack a 64-bit key into a pointer"
);

/// The half of a poller that other threads can reach.
///
/// Its wake queue holds each key at most once until the poller drains it, so however often
/// other threads wake a connection while its poller is busy, the queue is bounded by the
/// number of distinct connections woken, and each is driven once.
pub(crate) struct Remote {
    queue: Mutex<WakeQueue>,
    /// Bytes for read-handler connections of this poller (`deliver`).
    deliveries: Mutex<Deliveries>,
    notified: AtomicBool,
    waker: mio::Waker,
}

/// Bytes for read-handler connections, queued until the poller takes them, and how many bytes
/// each slot has in the queue: what the queue holds for each destination, so that a sender can
/// apply a connection's limit where its bytes wait (a busy or stalled poller does not let them
/// pile up). 4 bytes per slot, reset when the poller takes the queue.
#[derive(Default)]
struct Deliveries {
    queue: Vec<(Target, bytes::Bytes)>,
    queued: Vec<u32>,
}

/// What [`deliver`] did with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Queued,
    /// The sender's limit said the connection had enough queued: nothing was queued.
    Full,
    /// Its poller is gone.
    Gone,
}

/// Keys woken from other threads, in order, without duplicates.
#[derive(Default)]
struct WakeQueue {
    keys: Vec<Key>,
    queued: HashSet<Key>,
}

impl Remote {
    pub(crate) fn new(waker: mio::Waker) -> Self {
        Remote {
            queue: Mutex::new(WakeQueue::default()),
            deliveries: Mutex::new(Deliveries::default()),
            notified: AtomicBool::new(false),
            waker,
        }
    }

    /// Queues `key` (unless it is queued already) and wakes the poller unless a wake is
    /// already on its way.
    pub(crate) fn push(&self, key: Key) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if !q.queued.insert(key) {
                return;
            }
            q.keys.push(key);
        }
        self.notify();
    }

    /// Wakes the poller's `mio::Poll` (for shutdown, or after a push).
    pub(crate) fn notify(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                crate::logs::warn_limited!(error = %e, "could not wake a poller");
            }
        }
    }

    /// Queues `bytes` for `to` and wakes the poller, unless `full` says the bytes already
    /// queued for its slot are enough.
    fn deliver(&self, to: Target, bytes: bytes::Bytes, full: impl Fn(usize) -> bool) -> Delivery {
        let mut d = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
        let slot = to.key.slot();
        if d.queued.len() <= slot {
            d.queued.resize(slot + 1, 0);
        }
        let queued = d.queued[slot] as usize;
        if full(queued) {
            return Delivery::Full;
        }
        d.queued[slot] = queued.saturating_add(bytes.len()).min(u32::MAX as usize) as u32;
        d.queue.push((to, bytes));
        drop(d);
        self.notify();
        Delivery::Queued
    }

    /// Moves every queued delivery into `into`; called by the poller on its waker token.
    /// (Taken whole, so a burst's queue is freed once handled.)
    pub(crate) fn drain_deliveries(&self, into: &mut Vec<(Target, bytes::Bytes)>) {
        let mut d = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
        let Deliveries { queue, queued } = &mut *d;
        for (to, _) in queue.iter() {
            if let Some(n) = queued.get_mut(to.key.slot()) {
                *n = 0;
            }
        }
        if into.is_empty() {
            *into = std::mem::take(queue);
        } else {
            into.append(queue);
        }
    }

    /// Moves every queued key into `into`; called by the poller on its waker token.
    pub(crate) fn drain(&self, into: &mut Vec<Key>) {
        self.notified.store(false, Ordering::Release);
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut q.keys);
        q.queued.clear();
        if q.queued.capacity() > 1024 {
            // A burst is over: give its table back.
            q.queued = HashSet::new();
        }
    }
}

/// Every live poller's remote half, indexed by poller id.
static REGISTRY: RwLock<Vec<Option<Arc<Remote>>>> = RwLock::new(Vec::new());

/// Registers a poller and returns its id (ids of stopped pollers are reused).
pub(crate) fn register(remote: Arc<Remote>) -> u16 {
    let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    let id = match reg.iter().position(Option::is_none) {
        Some(i) => {
            reg[i] = Some(remote);
            i
        }
        None => {
            reg.push(Some(remote));
            reg.len() - 1
        }
    };
    assert!(id < u16::MAX as usize, "too many pollers");
    id as u16
}

/// Removes a stopped poller; later wakes for its keys are dropped.
pub(crate) fn unregister(id: u16) {
    let mut reg = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    reg[id as usize] = None;
}

/// Hands `bytes` to the read-handler connection `to` on its poller (`Handler::on_deliver`),
/// unless `full(bytes already queued for it)` says it has enough waiting in its poller's queue.
/// The poller drops them if `to` has closed (its slot empty, or another connection's).
pub(crate) fn deliver(to: Target, bytes: bytes::Bytes, full: impl Fn(usize) -> bool) -> Delivery {
    with_remote(to.key, |remote| remote.deliver(to, bytes, full)).unwrap_or(Delivery::Gone)
}

/// Runs `f` with the remote half of `key`'s poller; `None` if that poller is gone.
fn with_remote<R>(key: Key, f: impl FnOnce(&Remote) -> R) -> Option<R> {
    let reg = REGISTRY.read().unwrap_or_else(|e| e.into_inner());
    match reg.get(key.poller() as usize) {
        Some(Some(remote)) => Some(f(remote)),
        _ => None,
    }
}

thread_local! {
    /// The id of the poller running on this thread, if any.
    static POLLER: Cell<Option<u16>> = const { Cell::new(None) };
    /// Keys woken on this thread for this thread's poller: its local run queue.
    static READY: RefCell<Vec<Key>> = const { RefCell::new(Vec::new()) };
}

/// Marks the current thread as poller `id`'s thread.
pub(crate) fn enter_poller(id: u16) {
    POLLER.with(|p| p.set(Some(id)));
}

/// The id of the poller running on this thread.
pub(crate) fn current_poller() -> Option<u16> {
    POLLER.with(Cell::get)
}

/// Queues `key` on this thread's local run queue (the caller is its poller).
pub(crate) fn push_ready(key: Key) {
    READY.with(|r| r.borrow_mut().push(key));
}

/// Takes `key` back out of the last 64 keys woken on this thread, if it is there: it is about
/// to be driven now, not at the end of the turn.
pub(crate) fn unqueue_recent(key: Key) {
    READY.with(|r| {
        let mut r = r.borrow_mut();
        let from = r.len().saturating_sub(64);
        if let Some(at) = r[from..].iter().rposition(|k| *k == key) {
            r.remove(from + at);
        }
    })
}

/// Moves this thread's locally woken keys into `into`.
pub(crate) fn take_ready(into: &mut Vec<Key>) {
    READY.with(|r| into.append(&mut r.borrow_mut()));
}

fn wake(key: Key) {
    if current_poller() == Some(key.poller()) {
        push_ready(key);
        return;
    }
    let _ = with_remote(key, |remote| remote.push(key));
}
