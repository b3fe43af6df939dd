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

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::conn::fd::{Fd, StreamIo};
use crate::conn::http::{HttpConfig, HttpConn, Moved};
use crate::conn::proxy::{Peer, ProxyWait};
use crate::conn::stream::Socket;
use crate::conn::tcp::TcpConn;
use crate::conn::{Drive, Entry, Kind, Verdict};
use crate::handler::context::{self as server, ServerContext};
use crate::handler::{ConnCore, TcpConfig};
use crate::limits::{OpenGuard, OpenKind};
use crate::listener::Native;
use crate::observe::Reason;
use crate::rt::balance::Balance;
use crate::rt::mail::Letter;
use crate::rt::tasks::{self, Task};
use crate::rt::timer::{Alarm, Tick, Timer};
use crate::rt::wake::{self, Key, Remote};
use crate::service::app::{App, NewConn};
use crate::service::IncomingStream;
use crate::settings::{Config, Control};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const ALARM: Token = Token(usize::MAX - 3);

/// Over this many connections holding hyper's state on a poller, an idle one parks at once
/// instead of waiting for `park_after`: busy keep-alive connections stay hot while they are
/// few, and memory stays flat when there are many.
const HOT_LIMIT: usize = 128;

/// How often a poller of several compares its load (time spent on its connections) with the
/// others'.
const WINDOW: Duration = Duration::from_millis(10);

/// Below this many microseconds of work in a window (a fifth of it), a poller is not busy
/// enough to hand work off.
const SHED_MIN: u64 = 2_000;

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

/// A poller's listener: TCP or Unix.
enum Listener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
}

/// A connection a poller accepted.
enum Accepted {
    Tcp(mio::net::TcpStream, SocketAddr),
    Unix(mio::net::UnixStream, std::os::unix::net::SocketAddr),
}

impl Listener {
    fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| Accepted::Tcp(s, a)),
            Listener::Unix(l) => l.accept().map(|(s, a)| Accepted::Unix(s, a)),
        }
    }

    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Listener::Tcp(l) => l,
            Listener::Unix(l) => l,
        }
    }
}

/// One listener per poller: for TCP, `SO_REUSEPORT` siblings when possible, duplicates
/// otherwise; for a Unix socket, always duplicates (all pollers accept from one queue).
fn listeners(
    listener: Native,
    n: usize,
    backlog: i32,
    tuning: &crate::tuning::TcpTuning,
) -> io::Result<Vec<Listener>> {
    let mut out = Vec::with_capacity(n);
    match listener {
        Native::Tcp(listener) => {
            listener.set_nonblocking(true)?;
            let sock = socket2::SockRef::from(&listener);
            // Re-listening adjusts the backlog of a listening socket.
            let _ = sock.listen(backlog);
            let addr = listener.local_addr()?;
            let reuseport = sock.reuse_port().unwrap_or(false);
            tuning.apply_listener(sock);
            for _ in 1..n {
                let extra = if reuseport {
                    match sibling(addr, backlog) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::debug!(error = %e, "SO_REUSEPORT sibling failed; sharing one listener");
                            listener.try_clone()?
                        }
                    }
                } else {
                    listener.try_clone()?
                };
                // A duplicate shares the options already set; a sibling needs its own.
                tuning.apply_listener(socket2::SockRef::from(&extra));
                out.push(Listener::Tcp(mio::net::TcpListener::from_std(extra)));
            }
            out.insert(0, Listener::Tcp(mio::net::TcpListener::from_std(listener)));
        }
        Native::Unix(listener) => {
            listener.set_nonblocking(true)?;
            let _ = socket2::SockRef::from(&listener).listen(backlog);
            for _ in 1..n {
                let extra = listener.try_clone()?;
                out.push(Listener::Unix(mio::net::UnixListener::from_std(extra)));
            }
            out.insert(
                0,
                Listener::Unix(mio::net::UnixListener::from_std(listener)),
            );
        }
    }
    Ok(out)
}

fn sibling(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
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
                server::set_thread_context(ServerContext {
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
                    hot: 0,
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

/// A poller's part in spreading the work over several pollers (issue 23).
///
/// Each [`WINDOW`], a poller publishes how long it spent on its connections (its load: from
/// the end of its wait in `poll` to the end of its drives, in microseconds; a count of drives
/// would miss that one drive may serve a whole pipelined batch). One that did more than 52% of
/// its own and the lightest poller's work sheds a connection: the next HTTP/1
/// connection of its own that goes idle at a request boundary parks at once and goes, parked
/// (its socket and service, nothing of hyper's), to the lightest poller, which registers it and
/// reads on; or the next HTTP/2 connection found between streams (no stream task open), with
/// hyper's connection state as it is (its next streams are spawned where it arrives). A few
/// busy connections so take turns on the pollers; many stay where the kernel put them. After a
/// move it waits two windows, for the figures to show it. A new connection goes to the poller
/// with the fewest connections when this one holds a quarter more ([`Balance::deal`]).
struct Spread<S: crate::service::ConnService> {
    balance: Arc<Balance<Moved<S>>>,
    next_window: Instant,
    /// Time spent on connections in this window so far.
    busy: Duration,
    /// The load last published.
    published: u64,
    /// No shedding before this (after a move).
    quiet_until: Instant,
    /// Connections handed over, taken from the inbox (kept for its allocation).
    arrivals: Vec<Moved<S>>,
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
    /// Connections holding hyper's state (see [`HOT_LIMIT`]).
    hot: usize,
    app: P,
    http: HttpConfig,
    tcp: Arc<TcpConfig>,
    ctl: Arc<Control>,
    max_connections: usize,
    /// `max_connections_per_ip`.
    max_per_ip: Option<usize>,
    tcp_keepalive: Option<socket2::TcpKeepalive>,
    /// New connections start with a PROXY protocol header ([`ProxyWait`]).
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

    /// Closes this poller's inbox as it stops; what was handed over meanwhile is taken in
    /// (and closed on its drive, or by the caller's `force_close` if `force`). `false` if
    /// there was some and the poller must go on.
    fn close_inbox(&mut self, force: bool) -> bool {
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
    fn receive(&mut self) {
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
        if self.draining {
            // Handed over as this poller began its drain: drained as what it already held.
            entry.begin_drain();
        }
        self.conns.insert(entry);
        wake::push_ready(key);
    }

    /// At the end of a window: publishes this poller's load and decides whether to shed a
    /// connection to the lightest poller (see [`Spread`]).
    fn rebalance(&mut self, now: Instant) {
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
            // Over 52% of the two pollers' work.
            if load.saturating_mul(12) > theirs.saturating_mul(13) {
                self.shed = Some(to);
                self.hot_limit = 0;
            }
        }
    }

    /// Hands the connection in `slot` (parked, or HTTP/2 between streams) to the poller being
    /// shed to.
    fn hand_off(&mut self, slot: usize, now: Instant) {
        let Some(to) = self.shed.take() else { return };
        self.hot_limit = HOT_LIMIT;
        let entry = self.conns.remove(slot);
        let armed = entry.armed;
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

    fn accept(&mut self, now: Instant, ready: &mut Vec<Key>) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok(accepted) => self.admit(accepted, now, ready),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning, and say so
                    // now and then rather than every 50 ms.
                    if self
                        .accept_warned
                        .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
                    {
                        tracing::warn!(
                            error = %e,
                            failures_not_logged = self.accept_quiet,
                            "accept failed; retrying every 50 ms"
                        );
                        self.accept_warned = Some(now);
                        self.accept_quiet = 0;
                    } else {
                        tracing::debug!(error = %e, "accept failed; retrying in 50 ms");
                        self.accept_quiet += 1;
                    }
                    self.accept_retry = Some(now + Duration::from_millis(50));
                    return;
                }
            }
        }
    }

    /// The key for a new entry in the slab's next free slot; `None` past 2^32 slots.
    fn next_key(&mut self) -> Option<Key> {
        self.next_generation = self.next_generation.wrapping_add(1);
        Key::new(self.id, self.conns.vacant_key(), self.next_generation)
    }

    fn admit(&mut self, accepted: Accepted, now: Instant, ready: &mut Vec<Key>) {
        if !self.ctl.admit(self.max_connections) {
            tracing::debug!("max_connections reached; closing");
            return;
        }
        let mut ip = None;
        // Behind the PROXY protocol the client is the header's: counted once it is read
        // (`proxied`).
        let max_per_ip = self.max_per_ip.filter(|_| !self.proxy_protocol);
        if let (Some(max), Accepted::Tcp(_, peer)) = (max_per_ip, &accepted) {
            match self.ctl.ip_place(peer.ip(), max) {
                Some(slot) => ip = Some(Box::new(slot)),
                None => {
                    self.ctl.unadmit_per_ip();
                    return;
                }
            }
        }
        let (io, peer) = match accepted {
            Accepted::Tcp(stream, remote) => {
                let _ = stream.set_nodelay(true);
                if let Some(ka) = &self.tcp_keepalive {
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(ka);
                }
                let local = crate::service::local_addr_of(self.local_addr, || stream.local_addr());
                (StreamIo::Tcp(stream), Peer::Tcp { local, remote })
            }
            Accepted::Unix(stream, addr) => (StreamIo::Unix(stream), Peer::Unix(addr)),
        };
        // Registered after its first drive, if it outlives it (`Socket::needs_registration`).
        let mut fd = Fd::new(io);
        // Its place under `max_connections_per_ip`, given back when the socket closes.
        fd.ip = ip;
        #[cfg(feature = "metrics")]
        {
            fd.span = match &peer {
                Peer::Tcp { remote, .. } => crate::observe::conn_span(remote),
                Peer::Unix(addr) => crate::observe::conn_span(addr),
            };
        }
        let kind = if self.proxy_protocol {
            // The app hears of it once its header is read (`Verdict::Proxied`).
            Kind::Proxy(Box::new(ProxyWait {
                fd,
                peer,
                since: now,
            }))
        } else {
            let new = peer.incoming(&fd.io, None).and_then(|s| self.make(s));
            let Some(kind) = new.and_then(|new| self.open(fd, new, None, now, now)) else {
                self.ctl.release(false, Reason::Error);
                return;
            };
            match self.deal(kind) {
                Some(kind) => kind,
                None => return,
            }
        };
        let Some(key) = self.next_key() else {
            crate::logs::error_limited!("a poller holds 2^32 connections; closing a new one");
            self.drop_contained(kind);
            self.ctl.release(false, Reason::Error);
            return;
        };
        if let Some(s) = &self.spread {
            s.balance.opened(self.index);
        }
        self.conns.insert(Entry::new(key, kind));
        ready.push(key);
    }

    /// What a new connection on `fd` becomes, as the app said (`new`): TLS is put on its socket
    /// on a TLS listener (`None` if rustls refuses). `since` is when it was accepted (its first
    /// time limits count from there), `header` its PROXY protocol header.
    fn open(
        &self,
        #[allow(unused_mut)] mut fd: Fd,
        new: NewConn<P::Svc>,
        header: Option<crate::proxy::ProxyHeader>,
        since: Instant,
        now: Instant,
    ) -> Option<Kind<P::Svc>> {
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        match self.http.tls_connection() {
            None => {}
            Some(Ok(tls)) => fd.start_tls(tls),
            Some(Err(())) => return None,
        }
        Some(match new {
            NewConn::Http(svc) => {
                let mut socket = Socket::new(fd);
                socket.proxy = header;
                // Counted once wherever it goes (`deal`); uncounted when it closes or is taken
                // over.
                self.ctl.open.http_opened();
                Kind::Http(HttpConn::new(Arc::new(socket), svc, &self.http, since))
            }
            NewConn::Tcp(handler) => {
                let conn = crate::handler::Conn::new(Some(fd.io.as_raw_fd()), &self.tcp);
                let mut core =
                    ConnCore::new(handler, conn, Default::default(), self.tcp.clone(), now);
                core.open = Some(OpenGuard::new(self.ctl.open.clone(), OpenKind::Tcp));
                let conn = TcpConn::new(fd, core);
                #[cfg(any(feature = "tls", feature = "tls-ring"))]
                let conn = match &self.http.tls {
                    Some((_, timeout)) => conn.after_handshake(
                        crate::rt::timer::deadline(since, *timeout),
                        self.ctl.clone(),
                    ),
                    None => conn,
                };
                Kind::Tcp(Box::new(conn))
            }
        })
    }

    /// A connection's PROXY protocol header is read: it takes its place under
    /// `max_connections_per_ip` as the header's source (the socket's peer for a header
    /// without one), then the app is asked what it becomes, told that source as its peer;
    /// `Err` closes it, for that reason.
    fn proxied(
        &mut self,
        wait: ProxyWait,
        header: crate::proxy::ProxyHeader,
        now: Instant,
    ) -> Result<Kind<P::Svc>, Reason> {
        let ProxyWait {
            mut fd,
            peer,
            since,
        } = wait;
        if let Some(max) = self.max_per_ip {
            let client = header.source().map(|a| a.ip()).or(match &peer {
                Peer::Tcp { remote, .. } => Some(remote.ip()),
                Peer::Unix(_) => None,
            });
            if let Some(client) = client {
                let slot = self.ctl.ip_place(client, max);
                fd.ip = Some(Box::new(slot.ok_or(Reason::MaxConnectionsPerIp)?));
            }
        }
        #[cfg(feature = "metrics")]
        if let Some(span) = &fd.span {
            crate::observe::record_client(span, &header);
        }
        let new = peer
            .incoming(&fd.io, Some(&header))
            .and_then(|s| self.make(s))
            .ok_or(Reason::Error)?;
        self.open(fd, new, Some(header), since, now)
            .ok_or(Reason::Error)
    }

    /// Hands a new HTTP connection to the poller with the fewest connections if this one holds
    /// a quarter more ([`Balance::deal`]); `None` once handed over.
    fn deal(&mut self, kind: Kind<P::Svc>) -> Option<Kind<P::Svc>> {
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

    /// Asks the app what a new connection becomes (user code: a panic is contained); `None`
    /// closes it.
    fn make(&mut self, stream: IncomingStream<'_>) -> Option<NewConn<P::Svc>> {
        let app = &mut self.app;
        match catch_unwind(AssertUnwindSafe(|| app.accept(stream))) {
            Ok(Some(new)) => Some(new),
            Ok(None) => {
                crate::logs::error_limited!(?stream, "the make-service was not ready; closing");
                None
            }
            Err(panic) => {
                self.ctl.contained_panic("the make-service", &*panic);
                None
            }
        }
    }

    /// Puts a task spawned during this turn in the slab, with its owner if that is still
    /// there (a task whose owner closed meanwhile is dropped), and schedules its first poll.
    fn start_task(&mut self, task: Task, ready: &mut Vec<Key>) {
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

    /// Hands the letters taken from the poller's mailbox to their connections, in the order
    /// they were posted (`handler::mail`), each after its connection's earlier ones, and
    /// drives each connection after its run of letters:
    /// - one that handles write to is driven once this turn, with the connections woken (one
    ///   drive however many letters it got, from one handle or several whose letters are
    ///   interleaved with others');
    /// - one that only a fan-out reaches (an SSE subscriber) is driven at once, so that a
    ///   fan-out to many connections holds one outbound buffer at a time, not one per
    ///   connection.
    fn hand_out(
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

    /// Drives an entry; a panic that escapes it (hop's own code, or user code that hop does
    /// not call under a guard of its own) closes that entry only.
    fn drive_contained(&mut self, key: Key, now: Instant) {
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
        let was_hot = entry.is_hot();
        // The connection's span (`observe::conn_span`), entered while it is driven.
        #[cfg(feature = "metrics")]
        let span = entry.span();
        #[cfg(feature = "metrics")]
        let _entered = span.as_ref().map(|s| s.enter());
        if self.clock.0 != now {
            self.clock = (now, Tick::of(now));
        }
        let mut d = Drive::new(now, self.clock.1, self.draining, self.hot > self.hot_limit);
        let verdict = entry.drive(&self.http, &mut d);
        let mut moving = false;
        match (was_hot, entry.is_hot()) {
            (false, true) => self.hot += 1,
            (true, false) => {
                self.hot -= 1;
                // Shedding: the first connection that parks goes to the lightest poller.
                moving =
                    self.shed.is_some() && matches!(verdict, Verdict::Keep) && entry.is_movable();
            }
            _ => {}
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
    fn drop_contained<T>(&self, value: T) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
            self.ctl.contained_panic("dropping a connection", &*panic);
        }
    }

    /// Removes an entry and drops it, with the tasks it owns. The slot is released even if
    /// dropping panics. `why`: the reason it closes, if its drive or the caller knows one (a
    /// read handler's own is asked of it; otherwise it ended as its protocol does).
    fn close(&mut self, slot: usize, forced: bool, why: Option<Reason>) {
        let mut entry = self.conns.remove(slot);
        crate::memory::note_close();
        if entry.is_hot() {
            self.hot -= 1;
        }
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

    fn begin_drain(&mut self, ready: &mut Vec<Key>) {
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

    fn force_close(&mut self) {
        let slots: Vec<usize> = self.conns.iter().map(|(s, _)| s).collect();
        for slot in slots {
            if self.conns.contains(slot) {
                tracing::debug!("drain timeout: force-closing a connection");
                self.close(slot, true, None);
            }
        }
    }
}
