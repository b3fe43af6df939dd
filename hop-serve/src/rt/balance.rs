//! What the pollers of one server share to spread connections over themselves: each poller's
//! load (the time it spent on its connections in its last window), how many connections it holds, and its inbox
//! of connections handed to it by another poller.
//!
//! It owns the figures and the inboxes, not the policy's use of them: a poller publishes its
//! own figures, and asks here which poller is the lightest ([`Balance::lightest`]) and whether a
//! new connection should go elsewhere ([`Balance::deal`]). A handed-off item (`T`, a parked
//! connection) is in exactly one place at a time: the sender's slab, the inbox, or the
//! receiver's slab. An inbox closes when its poller stops, so nothing is handed to a poller
//! that will never take it: the sender gets the item back. Nothing here knows what a
//! connection is.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::wake::Remote;

/// One poller's share of the [`Balance`].
struct Slot<T> {
    remote: Arc<Remote>,
    /// Microseconds the poller spent on its connections in its last window.
    load: AtomicU64,
    /// Connections the poller holds (counted by the sender for a connection on its way).
    conns: AtomicUsize,
    inbox: Mutex<Inbox<T>>,
}

struct Inbox<T> {
    closed: bool,
    items: Vec<T>,
}

/// The pollers' shared figures and inboxes; see the module docs.
pub(crate) struct Balance<T> {
    slots: Box<[Slot<T>]>,
}

impl<T> Balance<T> {
    /// One slot per poller, indexed as `remotes` is.
    pub(crate) fn new(remotes: Vec<Arc<Remote>>) -> Self {
        let slots = remotes
            .into_iter()
            .map(|remote| Slot {
                remote,
                load: AtomicU64::new(0),
                conns: AtomicUsize::new(0),
                inbox: Mutex::new(Inbox {
                    closed: false,
                    items: Vec::new(),
                }),
            })
            .collect();
        Balance { slots }
    }

    /// Publishes poller `i`'s load for its last window.
    pub(crate) fn set_load(&self, i: usize, load: u64) {
        self.slots[i].load.store(load, Ordering::Relaxed);
    }

    /// The poller other than `i` with the least load, and that load.
    pub(crate) fn lightest(&self, i: usize) -> Option<(usize, u64)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, s)| (j, s.load.load(Ordering::Relaxed)))
            .min_by_key(|(_, l)| *l)
    }

    /// Counts a connection poller `i` took on.
    pub(crate) fn opened(&self, i: usize) {
        self.slots[i].conns.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection poller `i` no longer holds.
    pub(crate) fn closed(&self, i: usize) {
        let _ = self.slots[i]
            .conns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Where poller `i` should hand a connection it just accepted: the poller with the fewest
    /// connections, when `i` holds more than a quarter more than it (so a few connections are
    /// dealt evenly, and many, whose counts the kernel's hash keeps close, are left where they
    /// landed); `None` to keep it.
    pub(crate) fn deal(&self, i: usize) -> Option<usize> {
        let mine = self.slots[i].conns.load(Ordering::Relaxed);
        let (j, fewest) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, s)| (j, s.conns.load(Ordering::Relaxed)))
            .min_by_key(|(_, n)| *n)?;
        (mine > fewest && (mine - fewest).saturating_mul(4) > mine).then_some(j)
    }

    /// Hands `item` to poller `to` and wakes it, counting it there; the item back if that
    /// poller has stopped.
    pub(crate) fn send(&self, to: usize, item: T) -> Result<(), T> {
        let slot = &self.slots[to];
        {
            let mut inbox = slot.inbox.lock().unwrap_or_else(|e| e.into_inner());
            if inbox.closed {
                return Err(item);
            }
            inbox.items.push(item);
        }
        slot.conns.fetch_add(1, Ordering::Relaxed);
        slot.remote.notify();
        Ok(())
    }

    /// Moves what was handed to poller `i` into `into`.
    pub(crate) fn take(&self, i: usize, into: &mut Vec<T>) {
        let mut inbox = self.slots[i]
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        into.append(&mut inbox.items);
    }

    /// Closes poller `i`'s inbox if it is empty (`true`); otherwise leaves it open and moves
    /// what it holds into `into`.
    pub(crate) fn close_if_empty(&self, i: usize, into: &mut Vec<T>) -> bool {
        let mut inbox = self.slots[i]
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if inbox.items.is_empty() {
            inbox.closed = true;
            return true;
        }
        into.append(&mut inbox.items);
        false
    }

    /// Closes poller `i`'s inbox and moves what it holds into `into`.
    pub(crate) fn close(&self, i: usize, into: &mut Vec<T>) {
        let mut inbox = self.slots[i]
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inbox.closed = true;
        into.append(&mut inbox.items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balance(n: usize) -> (Vec<mio::Poll>, Balance<u32>) {
        let polls: Vec<mio::Poll> = (0..n).map(|_| mio::Poll::new().unwrap()).collect();
        let remotes = polls
            .iter()
            .map(|p| {
                Arc::new(Remote::new(
                    mio::Waker::new(p.registry(), mio::Token(0)).unwrap(),
                ))
            })
            .collect();
        (polls, Balance::new(remotes))
    }

    #[test]
    fn a_few_connections_are_dealt_many_are_left() {
        let (_polls, b) = balance(2);
        assert_eq!(b.deal(0), None, "none anywhere: keep it");
        b.opened(0);
        assert_eq!(b.deal(0), Some(1), "1 against 0");
        b.opened(1);
        assert_eq!(b.deal(0), None, "even");
        for _ in 0..33 {
            b.opened(0);
        }
        for _ in 0..29 {
            b.opened(1);
        }
        assert_eq!(b.deal(0), None, "34 against 30: within a quarter");
        for _ in 0..10 {
            b.opened(0);
        }
        assert_eq!(b.deal(0), Some(1), "44 against 30");
        for _ in 0..100 {
            b.closed(1);
        }
        assert_eq!(b.deal(1), None, "the count never goes below zero");
    }

    #[test]
    fn lightest_is_another_poller() {
        let (_polls, b) = balance(3);
        b.set_load(0, 5);
        b.set_load(1, 100);
        b.set_load(2, 40);
        assert_eq!(b.lightest(0), Some((2, 40)));
        assert_eq!(b.lightest(2), Some((0, 5)));
    }

    #[test]
    fn a_closed_inbox_gives_items_back_and_an_open_one_keeps_them() {
        let (_polls, b) = balance(2);
        assert_eq!(b.send(1, 7), Ok(()));
        let mut got = Vec::new();
        assert!(!b.close_if_empty(1, &mut got), "not empty: stays open");
        assert_eq!(got, [7]);
        assert_eq!(b.send(1, 8), Ok(()));
        got.clear();
        b.close(1, &mut got);
        assert_eq!(got, [8], "what came before the close is taken");
        assert_eq!(b.send(1, 9), Err(9), "closed: back to the sender");
        let mut none = Vec::new();
        assert!(b.close_if_empty(0, &mut none));
        assert_eq!(b.send(0, 1), Err(1));
    }
}
