//! The mailbox: how anything outside a read-handler connection's drive hands it something
//! (`crate::handler::mail` says who posts what, and where each connection's mailbox is).
//!
//! A [`Mailbox`] holds [`Letter`]s in the order they were posted, each with its address, and
//! for each address's slot the bytes waiting in it, so that a sender can apply its bound where
//! the bytes wait (a busy or stalled reader does not let them pile up). The admission check
//! ([`Mailbox::post`]'s `admit`) runs under the mailbox's lock, so what it reads and decides
//! (a bound, a close) is ordered with the letters themselves. The reader takes the letters
//! whole ([`Mailbox::take`]): the slots' counts go back to 0 and the mailbox keeps no
//! allocation for its letters between bursts (4 bytes per slot for the counts).
//!
//! One type serves both homes a connection's letters can have: a poller's mailbox, shared by
//! every connection on it and addressed by `wake::Target` (the poller wakes on its `mio`
//! waker), and a connection's own, addressed by `()`, for a connection driven as a task
//! (the reader's [`Waker`] is woken when a letter arrives).

use std::sync::Mutex;
use std::task::Waker;

use bytes::Bytes;

/// What a letter asks of the connection it is for.
#[derive(Debug)]
pub(crate) enum Letter {
    /// Bytes to queue as they are (a `ConnHandle::write`, bounded by the handle).
    Write(Bytes),
    /// Bytes for the connection's own protocol to handle on its thread (an SSE event; a
    /// `WsHandle`'s frame, framed and maybe compressed there): `handler::Protocol`.
    Deliver(Bytes),
    /// Close once queued output is written.
    Close,
    /// Shut down the write side once queued output is written.
    ShutdownWrite,
}

impl Letter {
    /// The bytes it carries, as they count against its connection's bound.
    fn len(&self) -> usize {
        match self {
            Letter::Write(b) | Letter::Deliver(b) => b.len(),
            Letter::Close | Letter::ShutdownWrite => 0,
        }
    }
}

/// How a mailbox names a connection: its address, and the slot whose count its bytes go to.
pub(crate) trait Address: Copy {
    fn slot(self) -> usize;
}

/// A connection's own mailbox has one addressee.
impl Address for () {
    fn slot(self) -> usize {
        0
    }
}

/// Letters in the order they were posted, with what each slot has waiting.
pub(crate) struct Mailbox<A> {
    sack: Mutex<Sack<A>>,
}

struct Sack<A> {
    letters: Vec<(A, Letter)>,
    /// Bytes waiting per slot (saturating at `u32::MAX`).
    waiting: Vec<u32>,
    /// Woken when a letter arrives in an empty mailbox (a task that reads it; a poller
    /// reads on its own `mio` waker instead).
    reader: Option<Waker>,
}

impl<A: Address> Mailbox<A> {
    pub(crate) const fn new() -> Self {
        Mailbox {
            sack: Mutex::new(Sack {
                letters: Vec::new(),
                waiting: Vec::new(),
                reader: None,
            }),
        }
    }

    fn sack(&self) -> std::sync::MutexGuard<'_, Sack<A>> {
        self.sack.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts `letter` for `to`, unless `admit(bytes waiting for its slot)` refuses it (run
    /// under the lock: see the module docs). Wakes the reader if the mailbox was empty.
    pub(crate) fn post<E>(
        &self,
        to: A,
        letter: Letter,
        admit: impl FnOnce(usize) -> Result<(), E>,
    ) -> Result<(), E> {
        let wake = {
            let mut s = self.sack();
            let slot = to.slot();
            if s.waiting.len() <= slot {
                s.waiting.resize(slot + 1, 0);
            }
            let waiting = s.waiting[slot] as usize;
            admit(waiting)?;
            s.waiting[slot] = waiting.saturating_add(letter.len()).min(u32::MAX as usize) as u32;
            s.letters.push((to, letter));
            match s.letters.len() {
                1 => s.reader.clone(),
                _ => None,
            }
        };
        if let Some(w) = wake {
            w.wake();
        }
        Ok(())
    }

    /// Moves every letter into `into`, in order (taken whole: a burst's room is freed once
    /// handled).
    pub(crate) fn take(&self, into: &mut Vec<(A, Letter)>) {
        let mut s = self.sack();
        let Sack {
            letters, waiting, ..
        } = &mut *s;
        for (to, _) in letters.iter() {
            if let Some(n) = waiting.get_mut(to.slot()) {
                *n = 0;
            }
        }
        if into.is_empty() {
            *into = std::mem::take(letters);
        } else {
            into.append(letters);
        }
    }

    /// Has `waker` woken when a letter arrives in the empty mailbox; whether letters are
    /// waiting already (posted before there was anyone to wake).
    pub(crate) fn read_with(&self, waker: &Waker) -> bool {
        let mut s = self.sack();
        if s.reader.as_ref().is_none_or(|w| !w.will_wake(waker)) {
            s.reader = Some(waker.clone());
        }
        !s.letters.is_empty()
    }

    /// Drops every waiting letter and forgets the reader (its connection is gone).
    pub(crate) fn clear(&self) {
        let mut s = self.sack();
        s.letters = Vec::new();
        s.waiting = Vec::new();
        s.reader = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Slot(usize);

    impl Address for Slot {
        fn slot(self) -> usize {
            self.0
        }
    }

    fn write(n: usize) -> Letter {
        Letter::Write(Bytes::from(vec![0; n]))
    }

    /// Letters come out in the order they went in; each slot's count is what waits for it,
    /// and goes back to 0 when the letters are taken.
    #[test]
    fn letters_keep_their_order_and_slots_count_their_bytes() {
        let mb = Mailbox::new();
        let seen = |slot| {
            let mut got = None;
            let _ = mb.post(Slot(slot), Letter::Close, |n| {
                got = Some(n);
                Err(())
            });
            got.unwrap()
        };
        mb.post(Slot(3), write(10), |_| Ok::<_, ()>(())).unwrap();
        mb.post(Slot(1), write(5), |_| Ok::<_, ()>(())).unwrap();
        mb.post(Slot(3), Letter::Close, |_| Ok::<_, ()>(()))
            .unwrap();
        assert_eq!((seen(3), seen(1), seen(0)), (10, 5, 0));
        let mut into = Vec::new();
        mb.take(&mut into);
        let order: Vec<_> = into.iter().map(|(to, l)| (to.0, l.len())).collect();
        assert_eq!(order, [(3, 10), (1, 5), (3, 0)]);
        assert_eq!((seen(3), seen(1)), (0, 0));
    }

    /// A refused letter is not posted, and does not count.
    #[test]
    fn a_refused_letter_is_not_posted() {
        let mb = Mailbox::new();
        assert_eq!(mb.post((), write(7), |_| Err("no")), Err("no"));
        let mut into = Vec::new();
        mb.take(&mut into);
        assert!(into.is_empty());
    }

    /// The reader is woken when a letter arrives in an empty mailbox (not for every letter),
    /// and told of letters posted before it was there to wake.
    #[test]
    fn the_reader_is_woken_once_per_burst() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = std::sync::Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mb = Mailbox::new();
        mb.post((), write(1), |_| Ok::<_, ()>(())).unwrap();
        assert!(mb.read_with(&waker));
        mb.post((), write(1), |_| Ok::<_, ()>(())).unwrap();
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        let mut into = Vec::new();
        mb.take(&mut into);
        assert!(!mb.read_with(&waker));
        mb.post((), write(1), |_| Ok::<_, ()>(())).unwrap();
        mb.post((), write(1), |_| Ok::<_, ()>(())).unwrap();
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        mb.clear();
        mb.post((), write(1), |_| Ok::<_, ()>(())).unwrap();
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
