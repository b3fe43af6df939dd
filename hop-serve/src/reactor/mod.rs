//! The pollers: N threads, each with its own `mio::Poll`, listener, slab, timer, wake queue and
//! local tasks.
//!
//! A poller accepts on its listener, TCP or Unix (its own `SO_REUSEPORT` socket when the TCP
//! listener given to `serve` has `SO_REUSEPORT` set, as [`crate::bind`] does; otherwise, and
//! always for a Unix socket, a duplicate of the one listener, all pollers accepting from the
//! same queue), drives each new connection at once (its
//! first request has often arrived), registers its socket edge-triggered under its slab slot if
//! it outlives that first drive, and drives slab entries ([`crate::conn::Entry`]: connections
//! and local tasks) when their socket is ready, their waker fires or their deadline is due. It
//! owns everything per poller: the slab, the timer heap ([`Timer`]), the count of connections
//! holding hyper's state; each entry owns everything about its connection. Each poller thread
//! enters the tokio runtime given to it, so handlers can use tokio's APIs; nothing of tokio is on
//! the I/O path. A poller never dies of its connections: every drive and every close (which
//! drops user code: services, handlers, bodies, tasks) runs under `catch_unwind`, and a panic
//! closes only the entry it came from, logged and counted in `Stats::panics`. Every close of a
//! read-handler connection tells its handler (`on_close`): those its drive did not (the drain
//! deadline, a contained panic, a failed registration) are told in `close`.
//!
//! With several pollers, each also spreads the work ([`Spread`]): it publishes its load, hands
//! a parked HTTP/1 connection to the lightest poller when it is busier, deals new connections
//! by count, and takes in what others hand it (`crate::rt::balance` holds what they share).
//!
//! The files: `mod` (starting the pollers; the `Poller` and its loop: `run`, `turn`, when to
//! wake next), `accept` (the listeners; accepting, admitting and opening a new connection, and
//! one whose PROXY protocol header was read), `drive` (the mailbox's letters handed out, the
//! tasks spawned started, an entry driven and its verdict acted on, closing an entry), `spread`
//! (moving connections between pollers: the load published, a connection shed or dealt to
//! another poller, those handed over taken in), `drain` (a graceful shutdown's start and the
//! drain deadline's forced close).

mod accept;
mod drain;
mod drive;
mod spread;

use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::conn::http::{HttpConfig, Moved};
use crate::conn::Entry;
use crate::handler::context::{self, ServerContext};
use crate::handler::TcpConfig;
use crate::listener::Native;
use crate::rt::balance::Balance;
use crate::rt::mail::Letter;
use crate::rt::tasks::{self, Task};
use crate::rt::timer::{Alarm, Tick, Timer};
use crate::rt::wake::{self, Key, Remote};
use crate::service::app::App;
use crate::settings::{Config, Control};

use accept::{listeners, Listener};
use spread::{Spread, SHED_MIN, WINDOW};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const ALARM: Token = Token(usize::MAX - 3);

/// Over this many connections holding hyper's state on a poller, an idle one parks at once
/// instead of waiting for `park_after`: busy keep-alive connections stay hot while they are
/// few, and memory stays flat when there are many.
const HOT_LIMIT: usize = 128;

/// How many of a poller's connections hold hyper's state, by protocol: hot HTTP/1.1 ones (for
/// parking, [`HOT_LIMIT`]) and HTTP/2 ones (with the hot ones, the connections spreading weighs
/// a poller's load over).
#[derive(Debug, Default)]
struct Holding {
    hot: usize,
    h2: usize,
}

impl Holding {
    /// Counts an entry that came to hold `what` (`up`), or no longer holds it.
    fn count(&mut self, what: crate::conn::Holds, up: bool) {
        let n = match what {
            crate::conn::Holds::Http1 => &mut self.hot,
            crate::conn::Holds::Http2 => &mut self.h2,
            crate::conn::Holds::Nothing => return,
        };
        *n = if up { *n + 1 } else { n.saturating_sub(1) };
    }
}

/// Counts pollers down and reports when the last one has stopped.
struct Latch {
    remaining: AtomicUsize,
    done: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

struct LatchGuard(Arc<Latch>);

impl Drop for LatchGuard {
    fn drop(&mut self) {
        if self.0.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(tx) = self.0.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(());
            }
        }
    }
}

/// Starts the pollers; `done` fires when the last one has stopped.
pub(crate) fn start<P: App>(
    cfg: &Config,
    listener: Native,
    app: P,
    ctl: Arc<Control>,
    rt: tokio::runtime::Handle,
    done: tokio::sync::oneshot::Sender<()>,
) -> io::Result<()> {
    // Only TCP connections use it (`IncomingStream`).
    let local_addr = match &listener {
        Native::Tcp(l) => l.local_addr()?,
        Native::Unix(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let listeners = listeners(listener, cfg.pollers, cfg.backlog, &cfg.tcp_tuning)?;
    let latch = Arc::new(Latch {
        remaining: AtomicUsize::new(listeners.len()),
        done: Mutex::new(Some(done)),
    });
    let tcp = Arc::new(cfg.tcp.clone());
    // What runs off the loop (a WebSocket or an SSE stream over HTTP/2, a hijack as a task)
    // hears of a graceful shutdown through this.
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    ctl.on_shutdown(Box::new(move || {
        shutdown_tx.send_replace(true);
    }));
    let n = listeners.len();
    let work: Arc<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let _ = ctl.poller_work.set(work.clone());
    let mut parts = Vec::with_capacity(listeners.len());
    for mut listener in listeners {
        let poll = Poll::new()?;
        let remote = Arc::new(Remote::new(mio::Waker::new(poll.registry(), WAKER)?));
        poll.registry()
            .register(listener.source(), LISTENER, Interest::READABLE)?;
        let alarm = Alarm::new(poll.registry(), ALARM);
        parts.push((poll, remote, listener, alarm));
    }
    // With several pollers, what they share to spread connections over themselves.
    let balance = (n > 1).then(|| {
        Arc::new(Balance::<Moved<P::Svc>>::new(
            parts
                .iter()
                .map(|(_, remote, _, _)| remote.clone())
                .collect(),
        ))
    });
    let start = Instant::now();
    for (i, (poll, remote, listener, alarm)) in parts.into_iter().enumerate() {
        let id = wake::register(remote.clone());
        let r = remote.clone();
        ctl.on_shutdown(Box::new(move || r.notify()));
        let (app, tcp, ctl, rt) = (app.clone(), tcp.clone(), ctl.clone(), rt.clone());
        let shutdown = shutdown_rx.clone();
        let http = HttpConfig::new(cfg, ctl.clone());
        let (max_connections, tcp_keepalive) = (cfg.max_connections, cfg.tcp_tuning.keepalive());
        let proxy_protocol = cfg.proxy_protocol;
        let max_per_ip = cfg.limits.per_ip;
        let guard = LatchGuard(latch.clone());
        let work = work.clone();
        let spread = balance.clone().map(|balance| Spread {
            balance,
            next_window: start + WINDOW,
            busy: Duration::ZERO,
            published: 0,
            quiet_until: start,
            arrivals: Vec::new(),
        });
        std::thread::Builder::new()
            .name(format!("hop-poller-{i}"))
            .spawn(move || {
                let _guard = guard;
                let _rt = rt.enter();
                context::set_thread_context(ServerContext {
                    tcp: tcp.clone(),
                    shutdown: Some(shutdown),
                    tasks: Arc::new(tokio::sync::watch::Sender::new(0)),
                    force: Arc::new(tokio::sync::watch::Sender::new(false)),
                    ctl: Some(ctl.clone()),
                });
                Poller {
                    id,
                    index: i,
                    work: 0,
                    work_cell: work,
                    spread,
                    shed: None,
                    hot_limit: HOT_LIMIT,
                    clock: {
                        let now = Instant::now();
                        (now, Tick::of(now))
                    },
                    poll,
                    remote,
                    listener: Some(listener),
                    local_addr,
                    conns: Slab::new(),
                    next_generation: 0,
                    timer: Timer::default(),
                    alarm,
                    holding: Holding::default(),
                    app,
                    http,
                    tcp,
                    ctl,
                    max_connections,
                    max_per_ip,
                    tcp_keepalive,
                    proxy_protocol,
                    draining: false,
                    accept_retry: None,
                    accept_warned: None,
                    accept_quiet: 0,
                }
                .run();
            })?;
    }
    Ok(())
}

/// A poller's working buffers, kept across turns.
struct Turn {
    events: Events,
    ready: Vec<Key>,
    batch: Vec<Key>,
    /// Letters taken from the poller's mailbox (`handler::mail`).
    letters: Vec<(wake::Target, Letter)>,
    spawned: Vec<Task>,
}

/// Unregisters a poller's wake queue however its thread ends.
struct Unregister(u16);

impl Drop for Unregister {
    fn drop(&mut self) {
        wake::unregister(self.0);
    }
}

struct Poller<P: App> {
    id: u16,
    /// Its index among the server's pollers.
    index: usize,
    /// Entries driven so far, published in `work_cell` every turn (`Handle::poller_work`).
    work: u64,
    work_cell: Arc<[AtomicU64]>,
    /// With several pollers: spreading the work ([`Spread`]).
    spread: Option<Spread<P::Svc>>,
    /// The poller a connection is being shed to, if any.
    shed: Option<usize>,
    /// Over this many connections holding hyper's state, an idle one parks at once:
    /// [`HOT_LIMIT`], or 0 while shedding.
    hot_limit: usize,
    /// The last wake-up's time, and its [`Tick`] (worked out once per wake-up, for every
    /// drive's deadlines).
    clock: (Instant, Tick),
    poll: Poll,
    remote: Arc<Remote>,
    listener: Option<Listener>,
    /// The TCP listener's address (unused for a Unix socket).
    local_addr: SocketAddr,
    conns: Slab<Entry<P::Svc>>,
    /// The generation the next entry gets (wrapping): a late wake for a slot's earlier entry
    /// does not reach the new one.
    next_generation: u16,
    timer: Timer,
    /// Goes off at the next deadline, so that the poll itself has no timeout.
    alarm: Alarm,
    /// How many of its connections hold hyper's state.
    holding: Holding,
    app: P,
    http: HttpConfig,
    tcp: Arc<TcpConfig>,
    ctl: Arc<Control>,
    max_connections: usize,
    /// `max_connections_per_ip`.
    max_per_ip: Option<usize>,
    tcp_keepalive: Option<socket2::TcpKeepalive>,
    /// New connections start with a PROXY protocol header
    /// ([`ProxyWait`](crate::conn::proxy::ProxyWait)).
    proxy_protocol: bool,
    draining: bool,
    /// When accepting failed for lack of descriptors: try again then.
    accept_retry: Option<Instant>,
    /// When an accept failure was last logged at `WARN` (later ones within
    /// [`ACCEPT_WARN_EVERY`] are logged at `DEBUG`), and how many were not.
    accept_warned: Option<Instant>,
    accept_quiet: u64,
}

/// At most one `WARN` per poller this often while accepting keeps failing (out of descriptors).
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

impl<P: App> Poller<P> {
    fn run(mut self) {
        wake::enter_poller(self.id);
        // Fix the timer's epoch before any deadline is taken (`Tick`).
        let _ = crate::rt::timer::Tick::of(Instant::now());
        let _unregister = Unregister(self.id);
        let mut turn = Turn {
            events: Events::with_capacity(1024),
            ready: Vec::new(),
            batch: Vec::new(),
            letters: Vec::new(),
            spawned: Vec::new(),
        };
        // A poller never dies: a panic that escapes a turn (every call into user code has a
        // guard of its own, so this is a last resort) is logged and counted, and the loop goes on.
        loop {
            match catch_unwind(AssertUnwindSafe(|| self.turn(&mut turn))) {
                Ok(true) => break,
                Ok(false) => {}
                Err(panic) => {
                    self.ctl.contained_panic("a poller turn", &*panic);
                    turn.batch.clear();
                }
            }
        }
    }

    /// One round of the loop: poll, accept, hand out letters, fire timers, drive what is
    /// ready, start the tasks spawned meanwhile. `true` when the poller has finished draining.
    fn turn(&mut self, t: &mut Turn) -> bool {
        let Turn {
            events,
            ready,
            batch,
            letters,
            spawned,
        } = t;
        wake::take_ready(ready);
        let timeout = match ready.is_empty() && !wake::mail_here() {
            true => self.alarm.poll_timeout(self.next_wake()),
            false => Some(Duration::ZERO),
        };
        if let Err(e) = self.poll.poll(events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            return false;
        }
        let now = Instant::now();
        self.clock = (now, Tick::of(now));
        let mut woke = false;
        for ev in events.iter() {
            match ev.token() {
                LISTENER => self.accept(now, ready),
                ALARM => self.alarm.rang(),
                WAKER => {
                    self.remote.drain(ready);
                    woke = true;
                }
                Token(slot) => {
                    if let Some(entry) = self.conns.get(slot) {
                        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                        if entry.on_event(readable, writable, ev.is_read_closed()) {
                            ready.push(entry.key);
                        }
                    }
                }
            }
        }
        if wake::take_mail_here() || woke {
            self.remote.take_mail(letters);
        }
        if woke && self.spread.is_some() {
            self.receive();
        }
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
            self.accept(now, ready);
        }
        self.hand_out(letters, ready, now);
        let conns = &mut self.conns;
        self.timer.fire(
            self.clock.1,
            |t, key| match conns.get_mut(key.slot()) {
                Some(e) if e.key == key && e.armed == Some(t) => {
                    e.armed = None;
                    true
                }
                _ => false,
            },
            ready,
        );
        let conns = &self.conns;
        self.timer.sweep(|t, key| {
            conns
                .get(key.slot())
                .is_some_and(|e| e.key == key && e.armed == Some(t))
        });
        wake::take_ready(ready);
        if self.ctl.draining() && !self.draining {
            self.begin_drain(ready);
        }
        std::mem::swap(ready, batch);
        self.work += batch.len() as u64;
        for key in batch.drain(..) {
            self.drive_contained(key, now);
        }
        self.work_cell[self.index].store(self.work, Ordering::Relaxed);
        if let Some(s) = &mut self.spread {
            let end = Instant::now();
            s.busy += end.saturating_duration_since(now);
            self.rebalance(end);
        }
        tasks::take_spawned(spawned);
        for task in spawned.drain(..) {
            self.start_task(task, ready);
        }
        if self.draining {
            if self.conns.is_empty() {
                // Done, unless a connection was handed over meanwhile.
                return self.close_inbox(false);
            }
            if self
                .ctl
                .drain_deadline()
                .is_some_and(|d| Instant::now() >= d)
            {
                self.close_inbox(true);
                self.force_close();
                return true;
            }
        }
        false
    }

    /// When the poller must look again though nothing comes: the earliest deadline, retry,
    /// spreading window or drain deadline.
    fn next_wake(&self) -> Option<Instant> {
        let mut next = self.timer.next_deadline();
        if let Some(t) = self.accept_retry {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if let Some(s) = self.spread.as_ref().filter(|s| s.published >= SHED_MIN) {
            // Publish the next window's load even if nothing comes: an idle poller must not
            // look busy to the others (a load under `SHED_MIN` is left to stand).
            next = Some(next.map_or(s.next_window, |n| n.min(s.next_window)));
        }
        if self.draining {
            if let Some(d) = self.ctl.drain_deadline() {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        next
    }

    /// The key for a new entry in the slab's next free slot; `None` past 2^32 slots.
    fn next_key(&mut self) -> Option<Key> {
        self.next_generation = self.next_generation.wrapping_add(1);
        Key::new(self.id, self.conns.vacant_key(), self.next_generation)
    }
}
