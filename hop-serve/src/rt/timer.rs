//! The poller's timer: `(deadline, Key)` entries in deadline order, owned by the poller.
//!
//! A connection records the one deadline it is waiting for on its own slab entry (`armed`, a
//! [`Tick`]).
//! Arming an earlier deadline adds a new entry; a later one waits for the armed entry to
//! fire (the connection then re-checks its own deadlines and arms again), so a keep-alive
//! connection costs at most one timer operation per timeout period, not one per request.
//! Entries are kept in a few FIFO lanes (deadlines of one kind are armed in the order they fall
//! due) and a min-heap for the rest: see [`Timer`]. Entries that no longer matter (their
//! connection closed, or an earlier deadline replaced them) are counted, and swept out once
//! they are half of all entries: under connection churn every connection arms its header
//! timeout, and without the sweep the timer would hold that many seconds' worth of closed
//! connections.
//!
//! The poller waits for the heap's earliest deadline through an [`Alarm`] (a `timerfd` in its
//! `mio::Poll`) rather than a poll timeout: `epoll_wait` with a timeout arms and cancels a kernel
//! hrtimer on every sleep, which costs a poller woken thousands of times a second measurable
//! kernel time (in a VM, timer reprogramming exits), while the peers, with no deadline pending,
//! sleep without one. The alarm is set again only when a deadline comes that is earlier than
//! the one it is set for, or after it has gone off.
//!
//! It also owns [`deadline`], the one way hop turns a user's or a peer's duration into an
//! instant: saturating, so `Duration::MAX` means "never" and no setting can overflow an
//! `Instant` (both backends use it), and [`cap`], the same bound for durations handed to
//! code that adds them to an instant itself (hyper's timers).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::num::NonZeroU64;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
#[inline]
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

    /// The tick `d` after this one, saturating as [`deadline`] does (`d` over [`FAR`] is
    /// [`FAR`]).
    #[inline]
    pub(crate) fn after(self, d: Duration) -> Tick {
        let d = cap(d);
        let nanos = d.as_secs() * 1_000_000_000 + u64::from(d.subsec_nanos());
        Tick(self.0.saturating_add(nanos.min(u64::MAX - 1)))
    }

    /// The instant of this tick.
    pub(crate) fn instant(self) -> Instant {
        epoch() + Duration::from_nanos(self.0.get() - 1)
    }
}

/// Sweep stale entries once there are at least this many, and they are half the heap.
const SWEEP_MIN: usize = 1024;

/// Deadlines kept in arming order, where they also come due in that order (see [`Timer`]).
const LANES: usize = 4;

/// A poller's timer; see the module docs.
///
/// Most deadlines are "now plus a setting" (park after 250 ms, the idle timeout, the header
/// timeout), so those of one kind are armed in the order they fall due. Such a deadline goes
/// at the back of a lane, a queue in deadline order, where arming and firing cost O(1): the
/// lane whose last deadline is the latest one not after it. A deadline no lane takes in order
/// goes into the heap. Each wake of a parked connection arms two deadlines and fires one, so
/// this spares it three heap operations (about 400 instructions at 500 connections, callgrind).
#[derive(Default)]
pub(crate) struct Timer {
    lanes: [VecDeque<(Tick, Key)>; LANES],
    /// Each lane's last deadline (its back), 0 when it is empty: what arming compares.
    backs: [u64; LANES],
    heap: BinaryHeap<Reverse<(Tick, Key)>>,
    /// Entries taken since the queues were last looked at for shrinking.
    taken: usize,
    /// Entries that no longer matter, counted when they were replaced or forgotten.
    stale: usize,
}

impl Timer {
    /// Arms a wake-up of `key` at `at`. `armed` is the connection's record of the deadline it
    /// waits for (on its slab entry).
    pub(crate) fn arm(&mut self, armed: &mut Option<Tick>, key: Key, at: Tick) {
        if armed.is_some_and(|t| t <= at) {
            return;
        }
        if armed.replace(at).is_some() {
            self.stale += 1;
        }
        // The lane whose back is the latest not after `at` fits best; an empty one (its back
        // 0) only if none does.
        let at_raw = at.0.get();
        let mut best = None;
        let mut best_back = 0;
        for (i, &back) in self.backs.iter().enumerate() {
            if back <= at_raw && (best.is_none() || back > best_back) {
                best = Some(i);
                best_back = back;
            }
        }
        match best {
            Some(i) => {
                self.lanes[i].push_back((at, key));
                self.backs[i] = at_raw;
            }
            None => self.heap.push(Reverse((at, key))),
        }
    }

    /// Forgets a closing connection's armed deadline (its record, `armed`).
    pub(crate) fn forget(&mut self, armed: Option<Tick>) {
        if armed.is_some() {
            self.stale += 1;
        }
    }

    /// The earliest deadline armed.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.heap.peek().map(|Reverse((t, _))| *t);
        for lane in &self.lanes {
            if let Some(&(t, _)) = lane.front() {
                if next.is_none_or(|n| t < n) {
                    next = Some(t);
                }
            }
        }
        next.map(Tick::instant)
    }

    /// Takes every entry due at `now` and pushes the keys of those that still matter into
    /// `into`. `take(t, key)` says whether `(t, key)` is the deadline its connection waits for,
    /// and clears that connection's record if so.
    pub(crate) fn fire(
        &mut self,
        now: Tick,
        mut take: impl FnMut(Tick, Key) -> bool,
        into: &mut Vec<Key>,
    ) {
        let mut fired = |t, key| {
            if take(t, key) {
                into.push(key);
            } else {
                self.stale = self.stale.saturating_sub(1);
            }
        };
        let mut taken = 0;
        for (lane, back) in self.lanes.iter_mut().zip(&mut self.backs) {
            while let Some(&(t, key)) = lane.front() {
                if t > now {
                    break;
                }
                lane.pop_front();
                taken += 1;
                fired(t, key);
            }
            if lane.is_empty() {
                *back = 0;
            }
        }
        while let Some(Reverse((t, key))) = self.heap.peek().copied() {
            if t > now {
                break;
            }
            self.heap.pop();
            taken += 1;
            fired(t, key);
        }
        // A burst of deadlines (many connections' first requests) leaves large queues behind:
        // looked at once in a while.
        self.taken += taken;
        if self.taken >= SWEEP_MIN {
            self.taken = 0;
            self.shrink();
        }
    }

    /// Sweeps out the entries that no longer matter once they are half of all entries;
    /// `live(t, key)` says whether `(t, key)` is the deadline its connection waits for.
    pub(crate) fn sweep(&mut self, live: impl Fn(Tick, Key) -> bool) {
        if self.stale < SWEEP_MIN || self.stale * 2 < self.len() {
            return;
        }
        self.heap.retain(|Reverse((t, key))| live(*t, *key));
        for (lane, back) in self.lanes.iter_mut().zip(&mut self.backs) {
            lane.retain(|&(t, key)| live(t, key));
            *back = lane.back().map_or(0, |(t, _)| t.0.get());
        }
        self.shrink();
        self.stale = 0;
    }

    fn shrink(&mut self) {
        if self.heap.capacity() > 4 * self.heap.len().max(SWEEP_MIN) {
            self.heap.shrink_to_fit();
        }
        for lane in &mut self.lanes {
            if lane.capacity() > 4 * lane.len().max(SWEEP_MIN) {
                lane.shrink_to_fit();
            }
        }
    }

    /// Entries held, live or stale.
    fn len(&self) -> usize {
        self.heap.len() + self.lanes.iter().map(VecDeque::len).sum::<usize>()
    }
}

/// A deadline is waited for this much past it, so that it is never polled a hair early, which
/// would spin (the alarm's, or a poll timeout's, rounding).
const LATE: Duration = Duration::from_micros(500);

/// The poller's alarm (see the module docs): a one-shot `timerfd`, registered readable in the
/// poller's `mio::Poll` under its own token.
pub(crate) struct Alarm {
    /// `None` where the kernel gave no timerfd: the poll then waits with a timeout.
    fd: Option<OwnedFd>,
    /// When it is set to go off, if it is.
    set: Option<Instant>,
}

impl Alarm {
    pub(crate) fn new(registry: &mio::Registry, token: mio::Token) -> Alarm {
        // SAFETY: timerfd_create takes no pointers; a descriptor it returns is ours alone.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        let fd = if raw < 0 {
            None
        } else {
            // SAFETY: `raw` is a descriptor just opened, owned by nothing else.
            Some(unsafe { OwnedFd::from_raw_fd(raw) })
        };
        let fd = fd.filter(|fd| {
            let raw = fd.as_raw_fd();
            let mut source = mio::unix::SourceFd(&raw);
            registry
                .register(&mut source, token, mio::Interest::READABLE)
                .is_ok()
        });
        if fd.is_none() {
            tracing::debug!(
                error = %io::Error::last_os_error(),
                "no timerfd; the poller waits with timeouts"
            );
        }
        Alarm { fd, set: None }
    }

    /// How long the poll may wait for the deadline `at` (`None`: forever), the alarm set so that
    /// it goes off by then if it was not already.
    pub(crate) fn poll_timeout(&mut self, at: Option<Instant>) -> Option<Duration> {
        let at = at?;
        if self.set.is_some_and(|set| set <= at + LATE) {
            return None;
        }
        let now = Instant::now();
        let after = at.saturating_duration_since(now) + LATE;
        let Some(fd) = &self.fd else {
            return Some(after);
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                // Never zero (that would disarm it): `after` is at least `LATE`. A deadline
                // centuries out is clamped, and simply never comes.
                tv_sec: after.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec for the call, which keeps no pointer to it; the
        // old value is not asked for (null).
        let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "timerfd_settime failed");
            return Some(after);
        }
        self.set = Some(now + after);
        None
    }

    /// It went off (its event came): the next deadline sets it again.
    pub(crate) fn rang(&mut self) {
        self.set = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deadlines_fire_in_time_whatever_their_order() {
        let _ = Tick::of(Instant::now());
        let start = Instant::now();
        let mut timer = Timer::default();
        let n = 2000;
        let mut armed: Vec<Option<Tick>> = vec![None; n];
        let key = |slot| Key::new(0, slot, 1).unwrap();
        // Several kinds of deadline, each armed in order, interleaved, plus some out of order.
        let kinds = [250u64, 60_000, 30_000, 10_000, 5, 1_000, 7];
        let mut want: Vec<Option<Tick>> = vec![None; n];
        for slot in 0..n {
            let base = start + Duration::from_millis(slot as u64);
            let mut ms = kinds[slot % kinds.len()];
            if slot % 13 == 0 {
                ms = (n - slot) as u64;
            }
            let at = Tick::of(base + Duration::from_millis(ms));
            timer.arm(&mut armed[slot], key(slot), at);
            want[slot] = Some(at);
        }
        let mut fired = Vec::new();
        let mut now = start;
        while timer.next_deadline().is_some() {
            now += Duration::from_millis(97);
            let tick = Tick::of(now);
            let mut due = Vec::new();
            timer.fire(
                tick,
                |t, k| {
                    let ok = armed[k.slot()] == Some(t);
                    if ok {
                        armed[k.slot()] = None;
                    }
                    ok
                },
                &mut due,
            );
            for k in due {
                assert!(want[k.slot()].unwrap() <= tick, "fired early");
                fired.push((k.slot(), tick));
            }
            // Nothing due is left behind.
            assert!(timer.next_deadline().is_none_or(|t| t > now));
        }
        assert_eq!(fired.len(), n, "every deadline fires once");
        for (slot, at) in fired {
            // Within one step of its deadline.
            assert!(at.instant() < want[slot].unwrap().instant() + Duration::from_millis(97));
        }
    }

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
            timer.arm(a, key(slot), Tick::of(far));
            // A later deadline waits for the armed one; an earlier one replaces it.
            timer.arm(a, key(slot), Tick::of(far + Duration::from_secs(1)));
            for earlier in 1..=4 {
                timer.arm(a, key(slot), Tick::of(far - Duration::from_secs(earlier)));
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
            Tick::of(far + Duration::from_secs(5)),
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
    fn the_alarm_goes_off_at_the_earliest_deadline_asked_for() {
        let token = mio::Token(7);
        let mut poll = mio::Poll::new().unwrap();
        let mut alarm = Alarm::new(poll.registry(), token);
        assert!(alarm.fd.is_some(), "no timerfd");
        let mut events = mio::Events::with_capacity(8);
        let start = Instant::now();
        // A later deadline keeps the alarm set for an earlier one; an earlier one sets it again.
        assert_eq!(
            alarm.poll_timeout(Some(start + Duration::from_secs(3600))),
            None
        );
        assert_eq!(
            alarm.poll_timeout(Some(start + Duration::from_secs(7200))),
            None
        );
        let first = alarm.set.unwrap();
        assert_eq!(
            alarm.poll_timeout(Some(start + Duration::from_millis(20))),
            None
        );
        assert!(alarm.set.unwrap() < first);
        // It goes off (the guard is far longer, so that a silent alarm fails, not hangs).
        poll.poll(&mut events, Some(Duration::from_secs(30)))
            .unwrap();
        assert!(
            events.iter().any(|e| e.token() == token),
            "the alarm did not go off"
        );
        assert!(Instant::now() >= start + Duration::from_millis(20));
        alarm.rang();
        // No deadline: the poll waits for events alone.
        assert_eq!(alarm.poll_timeout(None), None);
        assert_eq!(alarm.set, None);
    }

    #[test]
    fn deadlines_saturate() {
        // The epoch is fixed first, as a poller does (a tick counts from it).
        let _ = Tick::of(Instant::now());
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
        timer.arm(&mut armed, Key::new(0, 0, 1).unwrap(), Tick::of(never));
        let mut due = Vec::new();
        timer.fire(
            Tick::of(now + Duration::from_secs(3600)),
            |_, _| true,
            &mut due,
        );
        assert!(due.is_empty());
        assert!(timer.next_deadline().unwrap() >= never);
        // Counting from a tick agrees with counting from the instant, saturating the same way.
        for after in [Duration::ZERO, Duration::from_millis(250), Duration::MAX] {
            assert_eq!(Tick::of(now).after(after), Tick::of(deadline(now, after)));
        }
    }
}
