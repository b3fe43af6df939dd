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
//! closes only the entry it came from, logged and counted in `Stats::panics`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::app::{App, NewConn};
use crate::conn::http::{HttpConfig, HttpConn};
use crate::conn::stream::{Fd, Socket, StreamIo};
use crate::conn::tcp::TcpConn;
use crate::conn::{Drive, Entry, Kind, Verdict};
use crate::handler::context::{self as server, ServerContext};
use crate::handler::{ConnCore, TcpConfig};
use crate::listener::Native;
use crate::rt::tasks::{self, Task};
use crate::rt::timer::Timer;
use crate::rt::wake::{self, Key, Remote};
use crate::service::IncomingStream;
use crate::settings::{Config, Control};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// Over this many connections holding hyper's state on a poller, an idle one parks at once
/// instead of waiting for `park_after`: busy keep-alive connections stay hot while they are
/// few, and memory stays flat when there are many.
const HOT_LIMIT: usize = 128;

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
fn listeners(listener: Native, n: usize, backlog: i32) -> io::Result<Vec<Listener>> {
    let mut out = Vec::with_capacity(n);
    match listener {
        Native::Tcp(listener) => {
            listener.set_nonblocking(true)?;
            let sock = socket2::SockRef::from(&listener);
            // Re-listening adjusts the backlog of a listening socket.
            let _ = sock.listen(backlog);
            let addr = listener.local_addr()?;
            let reuseport = sock.reuse_port().unwrap_or(false);
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
    let listeners = listeners(listener, cfg.pollers, cfg.backlog)?;
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
    let mut parts = Vec::with_capacity(listeners.len());
    for mut listener in listeners {
        let poll = Poll::new()?;
        let remote = Arc::new(Remote::new(mio::Waker::new(poll.registry(), WAKER)?));
        poll.registry()
            .register(listener.source(), LISTENER, Interest::READABLE)?;
        parts.push((poll, remote, listener));
    }
    for (i, (poll, remote, listener)) in parts.into_iter().enumerate() {
        let id = wake::register(remote.clone());
        let r = remote.clone();
        ctl.on_shutdown(Box::new(move || r.notify()));
        let (app, tcp, ctl, rt) = (app.clone(), tcp.clone(), ctl.clone(), rt.clone());
        let shutdown = shutdown_rx.clone();
        let http = HttpConfig::new(cfg, ctl.clone());
        let (max_connections, tcp_keepalive) = (cfg.max_connections, cfg.tcp_keepalive);
        let guard = LatchGuard(latch.clone());
        std::thread::Builder::new()
            .name(format!("hop-poller-{i}"))
            .spawn(move || {
                let _guard = guard;
                let _rt = rt.enter();
                server::set_thread_context(ServerContext {
                    tcp: tcp.clone(),
                    shutdown: Some(shutdown),
                    tasks: Arc::new(tokio::sync::watch::Sender::new(0)),
                });
                Poller {
                    id,
                    poll,
                    remote,
                    listener: Some(listener),
                    local_addr,
                    conns: Slab::new(),
                    next_generation: 0,
                    timer: Timer::default(),
                    hot: 0,
                    app,
                    http,
                    tcp,
                    ctl,
                    max_connections,
                    tcp_keepalive,
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
    deliveries: Vec<(Key, bytes::Bytes)>,
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
    /// Connections holding hyper's state (see [`HOT_LIMIT`]).
    hot: usize,
    app: P,
    http: HttpConfig,
    tcp: Arc<TcpConfig>,
    ctl: Arc<Control>,
    max_connections: usize,
    tcp_keepalive: Option<Duration>,
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
            deliveries: Vec::new(),
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

    /// One round of the loop: poll, accept, deliver, fire timers, drive what is ready, start
    /// the tasks spawned meanwhile. `true` when the poller has finished draining.
    fn turn(&mut self, t: &mut Turn) -> bool {
        let Turn {
            events,
            ready,
            batch,
            deliveries,
            spawned,
        } = t;
        wake::take_ready(ready);
        let timeout = self.timeout(!ready.is_empty());
        if let Err(e) = self.poll.poll(events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            return false;
        }
        let now = Instant::now();
        for ev in events.iter() {
            match ev.token() {
                LISTENER => self.accept(now, ready),
                WAKER => {
                    self.remote.drain(ready);
                    self.remote.drain_deliveries(deliveries);
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
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
            self.accept(now, ready);
        }
        for (key, bytes) in std::mem::take(deliveries) {
            if let Some(entry) = self.conns.get_mut(key.slot()) {
                if let (true, Kind::Tcp(conn)) = (entry.key == key, &mut entry.kind) {
                    conn.deliver(key, bytes);
                    // Written out at once: a fan-out to many connections holds one
                    // outbound buffer at a time, not one per connection.
                    self.drive_contained(key, now);
                }
            }
        }
        let conns = &mut self.conns;
        self.timer.fire(
            now,
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
        for key in batch.drain(..) {
            self.drive_contained(key, now);
        }
        tasks::take_spawned(spawned);
        for task in spawned.drain(..) {
            self.start_task(task, ready);
        }
        if self.draining {
            if self.conns.is_empty() {
                return true;
            }
            if self
                .ctl
                .drain_deadline()
                .is_some_and(|d| Instant::now() >= d)
            {
                self.force_close();
                return true;
            }
        }
        false
    }

    fn timeout(&self, ready: bool) -> Option<Duration> {
        if ready {
            return Some(Duration::ZERO);
        }
        let mut next = self.timer.next_deadline();
        if let Some(t) = self.accept_retry {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if self.draining {
            if let Some(d) = self.ctl.drain_deadline() {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        // Round up so a timer is never polled a hair early, which would spin.
        next.map(|t| t.saturating_duration_since(Instant::now()) + Duration::from_micros(500))
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

    /// The key for a new entry in the slab's next free slot.
    fn next_key(&mut self) -> Key {
        self.next_generation = self.next_generation.wrapping_add(1);
        Key::new(self.id, self.conns.vacant_key(), self.next_generation)
    }

    fn admit(&mut self, accepted: Accepted, now: Instant, ready: &mut Vec<Key>) {
        if !self.ctl.admit(self.max_connections) {
            tracing::debug!("max_connections reached; closing");
            return;
        }
        let (io, new) = match accepted {
            Accepted::Tcp(stream, peer) => {
                let _ = stream.set_nodelay(true);
                if let Some(t) = self.tcp_keepalive {
                    let ka = socket2::TcpKeepalive::new().with_time(t);
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
                }
                let local_addr =
                    crate::service::local_addr_of(self.local_addr, || stream.local_addr());
                let new = self.make(IncomingStream::new(local_addr, peer));
                (StreamIo::Tcp(stream), new)
            }
            Accepted::Unix(stream, peer) => {
                let new = self.make(IncomingStream::unix(stream.as_fd(), &peer));
                (StreamIo::Unix(stream), new)
            }
        };
        let Some(new) = new else {
            self.ctl.release(false);
            return;
        };
        let key = self.next_key();
        // Registered after its first drive, if it outlives it (`Socket::needs_registration`).
        #[allow(unused_mut)]
        let mut fd = Fd::new(io);
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        match self.http.tls_connection() {
            None => {}
            Some(Ok(tls)) => fd.start_tls(tls),
            Some(Err(())) => {
                self.ctl.release(false);
                return;
            }
        }
        let kind = match new {
            NewConn::Http(svc) => Kind::Http(HttpConn::new(
                Arc::new(Socket::new(fd)),
                svc,
                &self.http,
                now,
            )),
            NewConn::Tcp(handler) => {
                let conn = crate::handler::Conn::new(Some(fd.io.as_raw_fd()), &self.tcp);
                let core = ConnCore::new(handler, conn, Default::default(), self.tcp.clone(), now);
                let conn = TcpConn::new(fd, core);
                #[cfg(any(feature = "tls", feature = "tls-ring"))]
                let conn = match &self.http.tls {
                    Some((_, timeout)) => conn.after_handshake(now + *timeout, self.ctl.clone()),
                    None => conn,
                };
                Kind::Tcp(Box::new(conn))
            }
        };
        self.conns.insert(Entry::new(key, kind));
        ready.push(key);
    }

    /// Asks the app what a new connection becomes (user code: a panic is contained); `None`
    /// closes it.
    fn make(&mut self, stream: IncomingStream<'_>) -> Option<NewConn<P::Svc>> {
        let app = &mut self.app;
        match catch_unwind(AssertUnwindSafe(|| app.accept(stream))) {
            Ok(Some(new)) => Some(new),
            Ok(None) => {
                tracing::error!(?stream, "the make-service was not ready; closing");
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
        let key = self.next_key();
        self.conns
            .insert(Entry::new(key, Kind::Task(Box::new(task))));
        if let Some(owner) = owner {
            self.conns[owner.slot()].adopt(key);
        }
        ready.push(key);
    }

    /// Drives an entry; a panic that escapes it (hop's own code, or user code that hop does
    /// not call under a guard of its own) closes that entry only.
    fn drive_contained(&mut self, key: Key, now: Instant) {
        let driven = catch_unwind(AssertUnwindSafe(|| self.drive(key, now)));
        if let Err(panic) = driven {
            self.ctl.contained_panic("driving a connection", &*panic);
            if self.conns.get(key.slot()).is_some_and(|e| e.key == key) {
                self.close(key.slot(), false);
            }
        }
    }

    fn drive(&mut self, key: Key, now: Instant) {
        let slot = key.slot();
        let Some(entry) = self.conns.get_mut(slot) else {
            return;
        };
        if entry.key != key {
            return;
        }
        let was_hot = entry.is_hot();
        let mut d = Drive::new(now, self.draining, self.hot > HOT_LIMIT);
        let verdict = entry.drive(&self.http, &mut d);
        match (was_hot, entry.is_hot()) {
            (false, true) => self.hot += 1,
            (true, false) => self.hot -= 1,
            _ => {}
        }
        if let Some(due) = d.due {
            self.timer.arm(&mut entry.armed, key, due);
        }
        if let Some(panic) = d.panic {
            self.ctl.contained_panic("a local task", &*panic);
        }
        match verdict {
            Verdict::Keep => {
                let Some(fd) = entry.fd() else { return };
                if fd.needs_registration() {
                    let fd = fd.io.as_raw_fd();
                    if let Err(e) = self.poll.registry().register(
                        &mut mio::unix::SourceFd(&fd),
                        Token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        tracing::error!(error = %e, "could not register a connection; closing");
                        self.close(slot, false);
                    }
                }
            }
            Verdict::Close => self.close(slot, false),
            Verdict::Hijacked(taken) => {
                if entry.become_tcp(taken, &self.tcp, now) {
                    wake::push_ready(key);
                } else {
                    tracing::error!("a taken-over socket is still shared; closing");
                    self.close(slot, false);
                }
            }
        }
    }

    /// Drops what an entry held (user code: a service, a handler, a body, a future); a panic
    /// there is contained, logged and counted.
    fn drop_contained<T>(&self, value: T) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
            self.ctl.contained_panic("dropping a connection", &*panic);
        }
    }

    /// Removes an entry and drops it, with the tasks it owns. The slot is released even if
    /// dropping panics.
    fn close(&mut self, slot: usize, forced: bool) {
        let mut entry = self.conns.remove(slot);
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
        if forced {
            entry.abort();
        }
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
        for task in owned.into_iter().flat_map(|o| o.tasks) {
            if self.conns.get(task.slot()).is_some_and(|e| e.key == task) {
                self.close(task.slot(), forced);
            }
        }
        if is_conn {
            self.ctl.release(forced);
        }
    }

    fn begin_drain(&mut self, ready: &mut Vec<Key>) {
        self.draining = true;
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
                self.close(slot, true);
            }
        }
    }
}
