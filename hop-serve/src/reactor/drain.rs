//! A poller's drain: its start (the listener's queue taken, then the listener closed; every
//! entry told) and, at the drain deadline, the forced close of what is left.

use std::time::Instant;

use crate::rt::wake::Key;
use crate::service::app::App;

use super::{Poller, HOT_LIMIT};

impl<P: App> Poller<P> {
    pub(super) fn begin_drain(&mut self, ready: &mut Vec<Key>) {
        self.draining = true;
        // Nothing moves during a drain: each poller drains what it holds.
        self.shed = None;
        self.hot_limit = HOT_LIMIT;
        // What the kernel has already queued for this listener would be reset when it closes:
        // take it first. (With `SO_REUSEPORT`, a handover to a new process that shares the port
        // then loses nothing; see the README's zero-downtime restart.)
        self.accept(Instant::now(), ready);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(l.source());
        }
        for (_, entry) in self.conns.iter_mut() {
            entry.begin_drain();
            ready.push(entry.key);
        }
    }

    pub(super) fn force_close(&mut self) {
        let slots: Vec<usize> = self.conns.iter().map(|(s, _)| s).collect();
        for slot in slots {
            if self.conns.contains(slot) {
                tracing::debug!("drain timeout: force-closing a connection");
                self.close(slot, true, None);
            }
        }
    }
}
