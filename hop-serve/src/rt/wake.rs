//! Wakers that name a connection: (poller, slot, generation) packed into the waker's data word;
//! and the poller's half that other threads reach ([`Remote`]): its wake queue and its mailbox.
//!
//! A [`Key`] is a `u64`; the waker built from it carries no allocation and no reference count,
//! so cloning and dropping it are free. Waking it from the poller's own thread pushes the key on
//! that thread's local ready queue; waking it from any other thread pushes it on the poller's
//! [`Remote`] queue and wakes the poller's `mio::Poll` through its `mio::Waker`. The poller
//! checks the generation, so a late wake for a slot that has been reused is ignored (a wake
//! that reaches the wrong connection after the 16-bit generation wraps costs a spurious drive,
//! no more). Letters are another matter: what is posted to a read-handler connection on a
//! poller ([`post`], into the poller's `rt::mail::Mailbox`) names it by a [`Target`], its key
//! and a process-wide 64-bit id that no other connection ever has, so bytes meant for one
//! connection never reach another that reuses its slot, however many times. A post wakes the
//! poller at most once until it takes its mailbox (from its own thread, not at all: it looks
//! at its mailbox on its next turn). Both cross-thread queues are bounded by what is woken, not
//! by how often: a key is queued once until the poller takes the queue, and letters for a
//! connection stop at the sender's bound for it.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use std::task::{RawWaker, RawWakerVTable, Waker};

use super::mail::{Address, Letter, Mailbox};

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

/// A read-handler connection as code outside it names it for [`post`]: its key, and an id
/// unique in the process ([`next_id`]). The key's generation has 16 bits and repeats after
/// 65,536 new entries on a poller; the id never repeats, so a stale target (a sender that still
/// holds it after the connection closed) never reaches the connection that reuses its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) key: Key,
    pub(crate) id: u64,
}

/// A poller's mailbox counts bytes per slab slot.
impl Address for Target {
    fn slot(self) -> usize {
        self.key.slot()
    }
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
    /// Letters for this poller's read-handler connections ([`post`]).
    mail: Mailbox<Target>,
    notified: AtomicBool,
    waker: mio::Waker,
}

/// Why a letter was not posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused<E> {
    /// The sender's check refused it (the connection's bound, its closed state).
    By(E),
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
            mail: Mailbox::new(),
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

    /// Moves every letter in its mailbox into `into`, in order; called by the poller on its
    /// waker token, or when its own thread posted ([`take_mail_here`]).
    pub(crate) fn take_mail(&self, into: &mut Vec<(Target, Letter)>) {
        self.mail.take(into);
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

/// Posts `letter` to the read-handler connection `to` in its poller's mailbox, unless
/// `admit(bytes already waiting there for its slot)` refuses it (run under the mailbox's lock),
/// and wakes the poller. The poller drops it if `to` has closed (its slot empty, or another
/// connection's).
pub(crate) fn post<E>(
    to: Target,
    letter: Letter,
    admit: impl FnOnce(usize) -> Result<(), E>,
) -> Result<(), Refused<E>> {
    let here = current_poller() == Some(to.key.poller());
    with_remote(to.key, |remote| {
        remote.mail.post(to, letter, admit).map_err(Refused::By)?;
        match here {
            // Its poller looks at its mailbox on its next turn: no wake-up to send itself.
            true => MAIL_HERE.with(|m| m.set(true)),
            false => remote.notify(),
        }
        Ok(())
    })
    .unwrap_or(Err(Refused::Gone))
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
    /// This thread's poller has letters it posted itself in its mailbox.
    static MAIL_HERE: Cell<bool> = const { Cell::new(false) };
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

/// Whether this thread's poller posted letters to its own mailbox (it is not to sleep).
pub(crate) fn mail_here() -> bool {
    MAIL_HERE.with(Cell::get)
}

/// [`mail_here`], and forgets it: the poller takes its mailbox now.
pub(crate) fn take_mail_here() -> bool {
    MAIL_HERE.with(|m| m.replace(false))
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
