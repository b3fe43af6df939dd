//! Spreading the work over several pollers ([`Spread`]): the load published each [`WINDOW`],
//! a connection shed to the lightest poller or a new one dealt to the one with the fewest
//! connections, and those handed over taken in (`crate::rt::balance` holds what the pollers
//! share).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::http::{HttpConn, Moved};
use crate::conn::{Entry, Kind};
use crate::observe::Reason;
use crate::rt::balance::Balance;
use crate::rt::wake;
use crate::service::app::App;

use super::{Poller, HOT_LIMIT};

/// How often a poller of several compares its load (time spent on its connections) with the
/// others'.
pub(super) const WINDOW: Duration = Duration::from_millis(10);

/// Below this many microseconds of work in a window (a fifth of it), a poller is not busy
/// enough to hand work off.
pub(super) const SHED_MIN: u64 = 2_000;

/// A poller's part in spreading the work over several pollers (issue 23).
///
/// Each [`WINDOW`], a poller publishes how long it spent on its connections (its load: from
/// the end of its wait in `poll` to the end of its drives, in microseconds; a count of drives
/// would miss that one drive may serve a whole pipelined batch). One that did more than 52% of
/// its own and the lightest poller's work, and carried it on more than one connection (hot
/// HTTP/1.1 ones and HTTP/2 ones), sheds a connection when moving one of average weight makes
/// the pair more even ([`sheds`]): the next
/// HTTP/1
/// connection of its own that goes idle at a request boundary parks at once and goes, parked
/// (its socket and service, nothing of hyper's), to the lightest poller, which registers it and
/// reads on; or the next HTTP/2 connection found between streams (no stream task open), with
/// hyper's connection state as it is (its next streams are spawned where it arrives). A few
/// busy connections so take turns on the pollers; many stay where the kernel put them. After a
/// move it waits two windows, for the figures to show it. A new connection goes to the poller
/// with the fewest connections when this one holds a quarter more ([`Balance::deal`]).
pub(super) struct Spread<S: crate::service::ConnService> {
    pub(super) balance: Arc<Balance<Moved<S>>>,
    pub(super) next_window: Instant,
    /// Time spent on connections in this window so far.
    pub(super) busy: Duration,
    /// The load last published.
    pub(super) published: u64,
    /// No shedding before this (after a move).
    pub(super) quiet_until: Instant,
    /// Connections handed over, taken from the inbox (kept for its allocation).
    pub(super) arrivals: Vec<Moved<S>>,
}

/// Whether a poller that spent `load` on `held` connections in its window hands one to a
/// poller that spent `theirs`: it did over 52% of the two pollers' work, and moving one
/// connection of its average weight makes the pair more even rather than turning the tables
/// (within a quarter, so that three busy connections over two pollers still take turns). So a
/// poller never sheds its only connection (the other would just become the busier one), and two
/// busy connections, one on each poller, stay where they are instead of moving back and forth
/// on every swing of their loads.
fn sheds(load: u64, theirs: u64, held: u64) -> bool {
    if held < 2 || load.saturating_mul(12) <= theirs.saturating_mul(13) {
        return false;
    }
    let one = load / held;
    one.saturating_mul(4) <= load.saturating_sub(theirs).saturating_mul(5)
}

impl<P: App> Poller<P> {
    /// Closes this poller's inbox as it stops; what was handed over meanwhile is taken in
    /// (and closed on its drive, or by the caller's `force_close` if `force`). `false` if
    /// there was some and the poller must go on.
    pub(super) fn close_inbox(&mut self, force: bool) -> bool {
        let Some(s) = &mut self.spread else {
            return true;
        };
        let mut late = std::mem::take(&mut s.arrivals);
        let closed = if force {
            s.balance.close(self.index, &mut late);
            true
        } else {
            s.balance.close_if_empty(self.index, &mut late)
        };
        for m in late.drain(..) {
            self.arrive(m);
        }
        if let Some(s) = &mut self.spread {
            s.arrivals = late;
        }
        closed
    }

    /// Takes in the connections other pollers handed over.
    pub(super) fn receive(&mut self) {
        let Some(s) = &mut self.spread else { return };
        let mut arrivals = std::mem::take(&mut s.arrivals);
        s.balance.take(self.index, &mut arrivals);
        for m in arrivals.drain(..) {
            self.arrive(m);
        }
        if let Some(s) = &mut self.spread {
            s.arrivals = arrivals;
        }
    }

    /// Puts a connection that another poller handed over (already counted here) in the slab, to
    /// be driven at once: its socket may have bytes waiting.
    fn arrive(&mut self, m: Moved<P::Svc>) {
        let Some(key) = self.next_key() else {
            crate::logs::error_limited!("a poller holds 2^32 connections; closing one handed over");
            self.drop_contained(m);
            self.ctl.open.http_closed();
            self.ctl.release(false, Reason::Error);
            if let Some(s) = &self.spread {
                s.balance.closed(self.index);
            }
            return;
        };
        let mut entry = Entry::new(key, Kind::Http(HttpConn::from_moved(m)));
        self.holding.count(entry.holds(), true);
        if self.draining {
            // Handed over as this poller began its drain: drained as what it already held.
            entry.begin_drain();
        }
        self.conns.insert(entry);
        wake::push_ready(key);
    }

    /// At the end of a window: publishes this poller's load and decides whether to shed a
    /// connection to the lightest poller (see [`Spread`]).
    pub(super) fn rebalance(&mut self, now: Instant) {
        let Some(s) = &mut self.spread else { return };
        if now < s.next_window {
            return;
        }
        let load = u64::try_from(std::mem::take(&mut s.busy).as_micros()).unwrap_or(u64::MAX);
        s.next_window = now + WINDOW;
        s.published = load;
        s.balance.set_load(self.index, load);
        self.shed = None;
        self.hot_limit = HOT_LIMIT;
        if self.draining || now < s.quiet_until || load < SHED_MIN {
            return;
        }
        if let Some((to, theirs)) = s.balance.lightest(self.index) {
            // The connections that carried the load: hyper's HTTP/1.1 ones not parked and the
            // HTTP/2 ones (idle ones parked, and read handlers, which never move, do not count).
            let held = u64::try_from(self.holding.hot + self.holding.h2).unwrap_or(u64::MAX);
            if sheds(load, theirs, held) {
                self.shed = Some(to);
                self.hot_limit = 0;
            }
        }
    }

    /// Hands the connection in `slot` (parked, or HTTP/2 between streams) to the poller being
    /// shed to.
    pub(super) fn hand_off(&mut self, slot: usize, now: Instant) {
        let Some(to) = self.shed.take() else { return };
        self.hot_limit = HOT_LIMIT;
        let entry = self.conns.remove(slot);
        let armed = entry.armed;
        let held = entry.holds();
        let moved = match entry.into_moved() {
            Ok(m) => m,
            Err(entry) => {
                // Checked before: not reached. Put back as it was.
                let key = entry.key;
                let at = self.conns.insert(entry);
                debug_assert_eq!(at, slot);
                wake::push_ready(key);
                return;
            }
        };
        self.holding.count(held, false);
        self.timer.forget(armed);
        let (registered, fd) = moved.leave();
        if registered {
            let _ = self
                .poll
                .registry()
                .deregister(&mut mio::unix::SourceFd(&fd));
        }
        let Some(s) = &mut self.spread else { return };
        s.balance.closed(self.index);
        match s.balance.send(to, moved) {
            Ok(()) => {
                s.quiet_until = now + 2 * WINDOW;
                self.ctl.moved.fetch_add(1, Ordering::Relaxed);
            }
            Err(moved) => {
                // That poller has stopped: keep it.
                s.balance.opened(self.index);
                self.arrive(moved);
            }
        }
    }

    /// Hands a new HTTP connection to the poller with the fewest connections if this one holds
    /// a quarter more ([`Balance::deal`]); `None` once handed over.
    pub(super) fn deal(&mut self, kind: Kind<P::Svc>) -> Option<Kind<P::Svc>> {
        let Some(s) = &self.spread else {
            return Some(kind);
        };
        let Kind::Http(conn) = kind else {
            return Some(kind);
        };
        let to = match s.balance.deal(self.index) {
            Some(to) if !self.ctl.draining() => to,
            _ => return Some(Kind::Http(conn)),
        };
        let moved = match conn.into_moved() {
            Ok(m) => m,
            Err(conn) => return Some(Kind::Http(conn)),
        };
        let _ = moved.leave();
        match s.balance.send(to, moved) {
            Ok(()) => {
                self.ctl.moved.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(moved) => Some(Kind::Http(HttpConn::from_moved(moved))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sheds;

    #[test]
    fn a_move_must_make_the_pair_more_even() {
        // One connection on each poller, loads swinging by 10%: nobody moves.
        assert!(!sheds(1_100, 1_000, 1));
        // A poller never sheds its only connection, however idle the other.
        assert!(!sheds(5_000, 0, 1));
        // Two against one: the busier hands one over, and the three take turns.
        assert!(sheds(6_000, 3_000, 2));
        // Two against two, 10% apart: moving one would turn the tables.
        assert!(!sheds(6_600, 6_000, 2));
        // Three against one, or many against none: move.
        assert!(sheds(9_000, 3_000, 3));
        assert!(sheds(9_000, 0, 100));
        // Within 52% of the pair's work: stay.
        assert!(!sheds(5_100, 4_900, 10));
        // Saturated figures do not overflow.
        assert!(!sheds(u64::MAX, u64::MAX, u64::MAX));
        assert!(sheds(u64::MAX, 0, 2));
    }
}
