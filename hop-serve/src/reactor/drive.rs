//! Driving a poller's entries: the letters from its mailbox handed out, the tasks spawned
//! during a turn started, an entry driven under `catch_unwind` and its verdict acted on
//! (registered, closed, taken over, opened after its PROXY protocol header), and closing an
//! entry with the tasks it owns.

use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use mio::{Interest, Token};

use crate::conn::{Drive, Entry, Holds, Kind, Verdict};
use crate::observe::Reason;
use crate::rt::mail::Letter;
use crate::rt::tasks::{self, Task};
use crate::rt::timer::Tick;
use crate::rt::wake::{self, Key};
use crate::service::app::App;

use super::Poller;

impl<P: App> Poller<P> {
    /// Hands the letters taken from the poller's mailbox to their connections, in the order
    /// they were posted (`handler::mail`), each after its connection's earlier ones, and
    /// drives each connection after its run of letters:
    /// - one that handles write to is driven once this turn, with the connections woken (one
    ///   drive however many letters it got, from one handle or several whose letters are
    ///   interleaved with others');
    /// - one that only a fan-out reaches (an SSE subscriber) is driven at once, so that a
    ///   fan-out to many connections holds one outbound buffer at a time, not one per
    ///   connection.
    pub(super) fn hand_out(
        &mut self,
        letters: &mut Vec<(wake::Target, Letter)>,
        ready: &mut Vec<Key>,
        now: Instant,
    ) {
        if letters.is_empty() {
            return;
        }
        // Taken whole: a burst's room is freed once handed out.
        let mut letters = std::mem::take(letters).into_iter().peekable();
        while let Some((to, letter)) = letters.next() {
            let key = to.key;
            let Some(entry) = self.conns.get_mut(key.slot()) else {
                continue;
            };
            // The key's generation repeats; the id does not: letters for a connection that
            // closed never reach another in its slot.
            let Kind::Tcp(conn) = &mut entry.kind else {
                continue;
            };
            if entry.key != key || !conn.is(to) {
                continue;
            }
            conn.take_letter(key, letter);
            if letters.peek().is_some_and(|(next, _)| *next == to) {
                continue;
            }
            match conn.has_handles() {
                true => {
                    if conn.queue_drive() {
                        ready.push(key);
                    }
                }
                false => self.drive_contained(key, now),
            }
        }
    }

    /// Puts a task spawned during this turn in the slab, with its owner if that is still
    /// there (a task whose owner closed meanwhile is dropped), and schedules its first poll.
    pub(super) fn start_task(&mut self, task: Task, ready: &mut Vec<Key>) {
        let owner = task.owner;
        if let Some(owner) = owner {
            if self.conns.get(owner.slot()).is_none_or(|e| e.key != owner) {
                self.drop_contained(Box::new(task));
                return;
            }
        }
        let Some(key) = self.next_key() else {
            crate::logs::error_limited!("a poller holds 2^32 entries; dropping a new task");
            self.drop_contained(Box::new(task));
            return;
        };
        self.conns
            .insert(Entry::new(key, Kind::Task(Box::new(task))));
        if let Some(owner) = owner {
            self.conns[owner.slot()].adopt(key, self.http.max_requests);
        }
        ready.push(key);
    }

    /// Drives an entry; a panic that escapes it (hop's own code, or user code that hop does
    /// not call under a guard of its own) closes that entry only.
    pub(super) fn drive_contained(&mut self, key: Key, now: Instant) {
        let driven = catch_unwind(AssertUnwindSafe(|| self.drive(key, now)));
        match driven {
            Ok(Some(owner)) => self.drive_contained(owner, now),
            Ok(None) => {}
            Err(panic) => {
                self.ctl.contained_panic("driving a connection", &*panic);
                if self.conns.get(key.slot()).is_some_and(|e| e.key == key) {
                    self.close(key.slot(), false, Some(Reason::Error));
                }
            }
        }
    }

    /// Drives an entry. A task (an HTTP/2 stream) whose body produced a large chunk
    /// ([`tasks::note_bulk`]) hands the connection it belongs to back, to be driven at once: the chunk is written before the next stream runs (as on
    /// tokio's LIFO slot), so a connection whose peer reads slowly finishes its streams one
    /// after another instead of holding part of every one. Small responses are left to share
    /// the connection's next write.
    fn drive(&mut self, key: Key, now: Instant) -> Option<Key> {
        let slot = key.slot();
        let entry = self.conns.get_mut(slot)?;
        if entry.key != key {
            return None;
        }
        let owner = match &entry.kind {
            Kind::Task(task) => task.owner,
            _ => None,
        };
        if owner.is_some() {
            tasks::take_bulk();
        }
        let held = entry.holds();
        // The connection's span (`observe::conn_span`), entered while it is driven.
        #[cfg(feature = "metrics")]
        let span = entry.span();
        #[cfg(feature = "metrics")]
        let _entered = span.as_ref().map(|s| s.enter());
        if self.clock.0 != now {
            self.clock = (now, Tick::of(now));
        }
        let mut d = Drive::new(
            now,
            self.clock.1,
            self.draining,
            self.holding.hot > self.hot_limit,
        );
        let verdict = entry.drive(&self.http, &mut d);
        let mut moving = false;
        let holds = entry.holds();
        if holds != held {
            self.holding.count(held, false);
            self.holding.count(holds, true);
            // Shedding: the first connection that parks goes to the lightest poller.
            moving = held == Holds::Http1
                && self.shed.is_some()
                && matches!(verdict, Verdict::Keep)
                && entry.is_movable();
        }
        if let Some((what, panic)) = d.panic.take() {
            self.ctl.contained_panic(what, &*panic);
        }
        // Shedding: an HTTP/2 connection goes between streams (none open, and none started
        // in this drive: their tasks are adopted after it).
        moving |= self.shed.is_some()
            && matches!(verdict, Verdict::Keep)
            && entry.is_http2()
            && entry.is_movable()
            && !tasks::spawned_pending();
        if moving {
            self.hand_off(slot, now);
            return None;
        }
        if let Some(due) = d.due {
            self.timer.arm(&mut entry.armed, key, due);
        }
        match verdict {
            Verdict::Keep => {
                if let Some(fd) = entry.fd() {
                    if fd.needs_registration() {
                        let fd = fd.io.as_raw_fd();
                        if let Err(e) = self.poll.registry().register(
                            &mut mio::unix::SourceFd(&fd),
                            Token(slot),
                            Interest::READABLE | Interest::WRITABLE,
                        ) {
                            crate::logs::error_limited!(error = %e, "could not register a connection; closing");
                            self.close(slot, false, Some(Reason::Error));
                        }
                    }
                }
            }
            Verdict::Close => self.close(slot, false, d.why()),
            Verdict::Hijacked(taken) => {
                // No longer an HTTP connection, whether the takeover holds or it is closed.
                self.ctl.open.http_closed();
                if entry.become_tcp(taken, &self.tcp, Some(self.ctl.open.clone()), now) {
                    wake::push_ready(key);
                } else {
                    tracing::error!("a taken-over socket is still shared; closing");
                    self.close(slot, false, Some(Reason::Error));
                }
            }
            Verdict::Proxied(header) => {
                // Driven again at once: what followed the header may be waiting.
                let kind = match std::mem::replace(&mut entry.kind, Kind::Closed) {
                    Kind::Proxy(wait) => self.proxied(*wait, header, now),
                    _ => Err(Reason::Error),
                };
                match kind {
                    Ok(kind) => {
                        self.conns[slot].kind = kind;
                        wake::push_ready(key);
                    }
                    Err(why) => self.close(slot, false, Some(why)),
                }
            }
        }
        // Driven at once whether or not this poll woke it: h2 wakes its connection once
        // until it is polled again, and that wake may sit anywhere in this turn.
        owner.filter(|&o| {
            let bulk = tasks::take_bulk();
            if bulk {
                wake::unqueue_recent(o);
            }
            bulk
        })
    }

    /// Drops what an entry held (user code: a service, a handler, a body, a future); a panic
    /// there is contained, logged and counted.
    pub(super) fn drop_contained<T>(&self, value: T) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
            self.ctl.contained_panic("dropping a connection", &*panic);
        }
    }

    /// Removes an entry and drops it, with the tasks it owns. The slot is released even if
    /// dropping panics. `why`: the reason it closes, if its drive or the caller knows one (a
    /// read handler's own is asked of it; otherwise it ended as its protocol does).
    pub(super) fn close(&mut self, slot: usize, forced: bool, why: Option<Reason>) {
        let mut entry = self.conns.remove(slot);
        crate::memory::note_close();
        self.holding.count(entry.holds(), false);
        self.timer.forget(entry.armed);
        if let Kind::Task(task) = &entry.kind {
            if let Some(owner) = task.owner {
                if let Some(o) = self.conns.get_mut(owner.slot()).filter(|o| o.key == owner) {
                    if o.disown(entry.key) {
                        // Its last task (an HTTP/2 stream) is done: it may be idle now.
                        wake::push_ready(owner);
                    }
                }
            }
        }
        let owned = entry.owned.take();
        let is_conn = entry.is_conn();
        let is_http = entry.is_http();
        // A read handler hears of every close: those its drive did not tell it of (the drain
        // deadline, a panic, a registration that failed) are told here.
        if let Some(panic) = entry.close_handler(forced) {
            self.ctl
                .contained_panic("a read handler's on_close", &*panic);
        }
        let why = why
            .or_else(|| entry.handler_reason())
            .unwrap_or(Reason::Closed);
        if let Some(socket) = entry.shared_socket() {
            // Someone else (an upgrade) still holds the socket: cut it off from this poller.
            let fd = socket.fd.io.as_raw_fd();
            let _ = self
                .poll
                .registry()
                .deregister(&mut mio::unix::SourceFd(&fd));
            let _ = socket.fd.io.shutdown(std::net::Shutdown::Both);
            socket.wake_all();
        }
        self.drop_contained(entry);
        if is_http {
            // After the drop: hyper's HTTP/2 connection gives its place in the reported HTTP/2
            // gauge back as it goes (`limits::H2Open`).
            self.ctl.open.http_closed();
        }
        for task in owned.into_iter().flat_map(|o| o.tasks) {
            if self.conns.get(task.slot()).is_some_and(|e| e.key == task) {
                self.close(task.slot(), forced, None);
            }
        }
        if is_conn {
            self.ctl.release(forced, why);
            if let Some(s) = &self.spread {
                s.balance.closed(self.index);
            }
        }
    }
}
