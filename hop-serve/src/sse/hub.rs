//! The hub: its settings ([`HubConfig`]), its subscribers (`Sink`: one on a poller, named by
//! its connection's target, or a channel feeding a streaming body under the tokio backend), and
//! the fan-out of [`Hub::send`] and [`Hub::send_to`] through the pollers' mailboxes or the
//! channels, which drops (and counts) a subscriber over its queue limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::handler::over_mark;
use crate::rt::mail::Letter;
use crate::rt::wake::{self, Refused, Target};

use super::event::{Event, Framed};

/// Settings of a hub.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// How often an idle subscriber gets a keep-alive comment (default 15 s). `Duration::ZERO`
    /// sends none; a period of a century or more is the same as never.
    pub keep_alive: Duration,
    /// The high-water mark of bytes queued for one subscriber, counted both on their way to
    /// its poller and in its outbound queue there: an event for a subscriber at or above it
    /// drops that subscriber, whose connection is closed (default 256 KiB).
    pub max_queue: usize,
}

impl HubConfig {
    /// The keep-alive period to arm, if any: none for zero (which would otherwise send comments
    /// in a loop), and at most [`crate::rt::timer::cap`]'s far future.
    pub(super) fn keep_alive_period(&self) -> Option<Duration> {
        (!self.keep_alive.is_zero()).then(|| crate::rt::timer::cap(self.keep_alive))
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            keep_alive: Duration::from_secs(15),
            max_queue: 256 * 1024,
        }
    }
}

#[derive(Clone)]
pub(super) enum Sink {
    /// A subscriber on a poller: events are handed to its connection there (named by its
    /// process-wide id too, not only its slot).
    Loop { to: Target, chunked: bool },
    /// A subscriber served as a streaming body (tokio backend; behind a pointer, so that the
    /// hub's entries for the reactor's subscribers stay small, and a send's copy is cheap).
    Channel(Arc<ChannelSink>),
}

pub(super) struct ChannelSink {
    pub(super) tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) chunked: bool,
    /// Cuts the subscriber's connection (when it is dropped as slow).
    pub(super) cut: Option<Arc<tokio::sync::Notify>>,
}

pub(super) struct HubInner {
    pub(super) cfg: HubConfig,
    /// The subscribers: held only to look up, add, remove or copy them, never during a send.
    subs: Mutex<HashMap<u64, Sink>>,
    /// Taken by each send for its whole fan-out, so sends go out one after another (every
    /// subscriber sees them in one order); holds the copy of the table a send works from,
    /// kept between sends so that a send does not allocate it.
    fanout: Mutex<Vec<(u64, Sink)>>,
    pub(super) next_id: AtomicU64,
    pub(super) dropped: AtomicU64,
}

/// A set of SSE subscribers: `Clone + Send`, cheap to clone.
#[derive(Clone)]
pub struct Hub {
    pub(super) inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("subscribers", &self.len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// The outcome of offering bytes to one subscriber.
enum Delivery {
    Queued,
    Gone,
    Slow,
}

impl Hub {
    /// A hub with the default settings.
    pub fn new() -> Self {
        Hub::with_config(HubConfig::default())
    }

    /// A hub with the given settings.
    pub fn with_config(cfg: HubConfig) -> Self {
        Hub {
            inner: Arc::new(HubInner {
                cfg,
                subs: Mutex::new(HashMap::new()),
                fanout: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    pub(super) fn subs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Sink>> {
        self.inner.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribers connected now.
    pub fn len(&self) -> usize {
        self.subs().len()
    }

    /// Whether there are no subscribers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribers dropped because they did not keep up.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    fn offer(sink: &Sink, event: &Framed, max: usize) -> Delivery {
        match sink {
            // The subscriber's limit holds where its events are queued: bytes on their way to a
            // busy or stalled poller count against it, as its outbound queue does there.
            Sink::Loop { to, chunked } => {
                let fits = |waiting| match over_mark(waiting, max) {
                    true => Err(()),
                    false => Ok(()),
                };
                match wake::post(*to, Letter::Deliver(event.get(*chunked)), fits) {
                    Ok(()) => Delivery::Queued,
                    Err(Refused::Gone) => Delivery::Gone,
                    Err(Refused::By(())) => {
                        // Tell the connection to close: nothing more is sent.
                        let _ = wake::post(*to, Letter::Close, |_| Ok::<_, ()>(()));
                        Delivery::Slow
                    }
                }
            }
            Sink::Channel(sink) => {
                let ChannelSink {
                    tx,
                    queued,
                    chunked,
                    cut,
                } = &**sink;
                if over_mark(queued.load(Ordering::Relaxed), max) {
                    // An empty chunk tells the body to fail, and the connection task is told to
                    // drop the connection: hyper alone would wait for a peer that is not reading
                    // before it polls the body again.
                    let _ = tx.send(Bytes::new());
                    if let Some(cut) = cut {
                        cut.notify_one();
                    }
                    return Delivery::Slow;
                }
                let bytes = event.get(*chunked);
                queued.fetch_add(bytes.len(), Ordering::Relaxed);
                match tx.send(bytes) {
                    Ok(()) => Delivery::Queued,
                    Err(_) => Delivery::Gone,
                }
            }
        }
    }

    /// Whether subscriber `id` stays after `offer`; counts a slow one (the caller removes
    /// those that do not stay).
    fn stays(&self, id: u64, offer: Delivery) -> bool {
        match offer {
            Delivery::Queued => true,
            Delivery::Gone => false,
            Delivery::Slow => {
                tracing::debug!(id, "dropping a slow SSE subscriber");
                self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn fanout(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Sink)>> {
        self.inner.fanout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `event` to every subscriber; returns how many it was queued for.
    ///
    /// The subscriber table is copied and the fan-out runs without it: subscribers join and
    /// leave meanwhile (one that joins gets the next event; one that leaves is skipped, or its
    /// event is dropped where it would have been written). Sends from several threads go out
    /// one after another, so each subscriber gets events in the order the sends began.
    pub fn send(&self, event: &Event) -> usize {
        let event = Framed::new(event);
        let max = self.inner.cfg.max_queue;
        let mut snapshot = self.fanout();
        snapshot.extend(self.subs().iter().map(|(id, sink)| (*id, sink.clone())));
        let mut n = 0;
        let mut gone = Vec::new();
        for (id, sink) in snapshot.iter() {
            match self.stays(*id, Self::offer(sink, &event, max)) {
                true => n += 1,
                false => gone.push(*id),
            }
        }
        // Kept for the next send, emptied (no subscriber is held by it); a burst's room is
        // given back.
        snapshot.clear();
        if snapshot.capacity() > 1024 && snapshot.capacity() > 4 * self.len() {
            *snapshot = Vec::new();
        }
        drop(snapshot);
        if !gone.is_empty() {
            let mut subs = self.subs();
            for id in gone {
                subs.remove(&id);
            }
        }
        n
    }

    /// Sends `event` to subscriber `id`; `false` if it is gone or was dropped.
    pub fn send_to(&self, id: u64, event: &Event) -> bool {
        let event = Framed::new(event);
        // In order with `send`s.
        let _fanout = self.fanout();
        let Some(sink) = self.subs().get(&id).cloned() else {
            return false;
        };
        let stays = self.stays(id, Self::offer(&sink, &event, self.inner.cfg.max_queue));
        if !stays {
            self.remove(id);
        }
        stays
    }

    pub(super) fn remove(&self, id: u64) {
        // Dropped out of the lock (a channel subscriber's sender).
        let sink = self.subs().remove(&id);
        drop(sink);
    }
}
