//! The event loop: N poller threads, each with its own `mio::Poll`, listener, slab of
//! connections, timer and wake queue.
//!
//! A poller accepts on its listener (its own `SO_REUSEPORT` socket when the listener given to
//! `serve` has `SO_REUSEPORT` set, as [`crate::bind`] does; otherwise a duplicate of the one
//! listener, all pollers accepting from the same queue), drives each new connection at once (its
//! first request has often arrived), registers its socket edge-triggered under its slab slot if
//! it outlives that first drive, and drives connections ([`crate::driver::Conn`]) when their
//! socket is ready, their waker fires or their timer is due. Each poller thread enters the tokio
//! runtime given to it, so handlers can use tokio's APIs; nothing of tokio is on the I/O path.
//! A poller never dies of its connections: every drive and every close (which drops user code:
//! services, handlers, bodies) runs under `catch_unwind`, and a panic closes only the connection
//! it came from, logged and counted in `Stats::panics`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::app::{App, NewConn};
use crate::driver::{Conn, DriverConfig, Verdict};
use crate::service::{ConnService, IncomingStream};
use crate::settings::{Config, Control};
use crate::stream::Socket;
use crate::tcp::{ConnCore, LoopConn, TcpConfig};
use crate::timer::{self, HopTimer};
use crate::wake::{self, Key, Remote};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

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

/// One listener per poller: `SO_REUSEPORT` siblings when possible, duplicates otherwise.
fn listeners(
    listener: std::net::TcpListener,
    n: usize,
    backlog: i32,
) -> io::Result<Vec<std::net::TcpListener>> {
    listener.set_nonblocking(true)?;
    let sock = socket2::SockRef::from(&listener);
    // Re-listening adjusts the backlog of a listening socket.
    let _ = sock.listen(backlog);
    let addr = listener.local_addr()?;
    let reuseport = sock.reuse_port().unwrap_or(false);
    let mut out = Vec::with_capacity(n);
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
        out.push(extra);
    }
    out.insert(0, listener);
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

/// A slab entry: an HTTP connection or a read-handler connection.
enum Entry<S: ConnService> {
    Http(Conn<S>),
    /// Boxed: a read-handler connection is larger than a parked HTTP one.
    Tcp(Box<LoopConn>),
}

impl<S: ConnService> Entry<S> {
    fn socket(&self) -> &Arc<Socket> {
        match self {
            Entry::Http(c) => &c.socket,
            Entry::Tcp(c) => &c.socket,
        }
    }

    fn key(&self) -> Key {
        match self {
            Entry::Http(c) => c.key,
            Entry::Tcp(c) => c.key,
        }
    }
}

/// Starts the pollers; `done` fires when the last one has stopped.
pub(crate) fn start<P: App>(
    cfg: &Config,
    listener: std::net::TcpListener,
    app: P,
    ctl: Arc<Control>,
    rt: tokio::runtime::Handle,
    done: tokio::sync::oneshot::Sender<()>,
) -> io::Result<()> {
    let local_addr = listener.local_addr()?;
    let listeners = listeners(listener, cfg.pollers, cfg.backlog)?;
    let latch = Arc::new(Latch {
        remaining: AtomicUsize::new(listeners.len()),
        done: Mutex::new(Some(done)),
    });
    // hyper always gets a header timeout: its sleep is how the driver sees an idle connection.
    let header_timeout = cfg
        .header_read_timeout
        .unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut http1 = cfg.http1(Some(header_timeout));
    http1.timer(HopTimer);
    let driver = Arc::new(DriverConfig {
        http1,
        coalesce: cfg.pipeline_flush,
        idle_timeout: cfg.idle_timeout,
        header_timeout: cfg.header_read_timeout,
        park_after: cfg.park_after,
        ctl: ctl.clone(),
    });
    let tcp = Arc::new(cfg.tcp.clone());
    let mut pollers = Vec::with_capacity(listeners.len());
    for l in listeners {
        let poll = Poll::new()?;
        let remote = Arc::new(Remote::new(mio::Waker::new(poll.registry(), WAKER)?));
        let mut listener = TcpListener::from_std(l);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        pollers.push((poll, remote, listener));
    }
    for (i, (poll, remote, listener)) in pollers.into_iter().enumerate() {
        let id = wake::register(remote.clone());
        let r = remote.clone();
        ctl.on_shutdown(Box::new(move || r.notify()));
        let poller = Poller {
            id,
            poll,
            remote,
            listener: Some(listener),
            local_addr,
            conns: Slab::new(),
            generations: Vec::new(),
            app: app.clone(),
            driver: driver.clone(),
            tcp: tcp.clone(),
            ctl: ctl.clone(),
            max_connections: cfg.max_connections,
            tcp_keepalive: cfg.tcp_keepalive,
            draining: false,
            accept_retry: None,
            accept_warned: None,
            accept_quiet: 0,
        };
        let rt = rt.clone();
        let guard = LatchGuard(latch.clone());
        std::thread::Builder::new()
            .name(format!("hop-poller-{i}"))
            .spawn(move || {
                let _guard = guard;
                let _rt = rt.enter();
                crate::hijack::set_thread_context(crate::hijack::ServerContext {
                    tcp: poller.tcp.clone(),
                    shutdown: None,
                    tasks: Arc::new(tokio::sync::watch::Sender::new(0)),
                });
                poller.run();
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
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    conns: Slab<Entry<P::Svc>>,
    generations: Vec<u16>,
    app: P,
    driver: Arc<DriverConfig>,
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
        let _unregister = Unregister(self.id);
        let mut turn = Turn {
            events: Events::with_capacity(1024),
            ready: Vec::new(),
            batch: Vec::new(),
            deliveries: Vec::new(),
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

    /// One round of the loop: poll, accept, deliver, fire timers, drive what is ready.
    /// `true` when the poller has finished draining.
    fn turn(&mut self, t: &mut Turn) -> bool {
        let Turn {
            events,
            ready,
            batch,
            deliveries,
        } = t;
        wake::take_local(ready);
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
                    if let Some(c) = self.conns.get(slot) {
                        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                        if c.socket().on_event(readable, writable, ev.is_read_closed()) {
                            ready.push(c.key());
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
            if let Some(Entry::Tcp(conn)) = self.conns.get_mut(key.slot()) {
                if conn.key == key {
                    conn.deliver(bytes);
                    // Written out at once: a fan-out to many connections holds one
                    // outbound buffer at a time, not one per connection.
                    self.drive_contained(key, now);
                }
            }
        }
        timer::fire(now, ready);
        wake::take_local(ready);
        if self.ctl.draining() && !self.draining {
            self.begin_drain(ready);
        }
        std::mem::swap(ready, batch);
        for key in batch.drain(..) {
            self.drive_contained(key, now);
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
        let mut next = timer::next_deadline();
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
                Ok((stream, peer)) => self.admit(stream, peer, now, ready),
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

    fn admit(
        &mut self,
        stream: mio::net::TcpStream,
        peer: SocketAddr,
        now: Instant,
        ready: &mut Vec<Key>,
    ) {
        if !self.ctl.admit(self.max_connections) {
            tracing::debug!(%peer, "max_connections reached; closing");
            return;
        }
        let _ = stream.set_nodelay(true);
        if let Some(t) = self.tcp_keepalive {
            let ka = socket2::TcpKeepalive::new().with_time(t);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
        }
        let local_addr = crate::service::local_addr_of(self.local_addr, || stream.local_addr());
        let app = &mut self.app;
        let new = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            app.accept(IncomingStream::new(local_addr, peer))
        }));
        let new = match new {
            Ok(Some(new)) => new,
            Ok(None) => {
                tracing::error!(%peer, "the make-service was not ready; closing");
                self.ctl.release(false);
                return;
            }
            Err(panic) => {
                self.ctl.contained_panic("the make-service", &*panic);
                self.ctl.release(false);
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        if self.generations.len() <= slot {
            self.generations.resize(slot + 1, 0);
        }
        self.generations[slot] = self.generations[slot].wrapping_add(1);
        let key = Key::new(self.id, slot, self.generations[slot]);
        // Registered after its first drive, if it outlives it (`Socket::needs_registration`).
        timer::reset_slot(key);
        let socket = Arc::new(Socket::new(stream));
        entry.insert(match new {
            NewConn::Http(svc) => Entry::Http(Conn::new(socket, key, svc, now)),
            NewConn::Tcp(handler) => {
                let conn = crate::tcp::Conn::new(Some(socket.io.as_raw_fd()), &self.tcp);
                let core = ConnCore::new(handler, conn, Default::default(), self.tcp.clone(), now);
                Entry::Tcp(Box::new(LoopConn::new(socket, key, core)))
            }
        });
        ready.push(key);
    }

    /// Drives a connection; a panic that escapes it (hop's own code, or user code that hop
    /// does not call under a guard of its own) closes that connection only.
    fn drive_contained(&mut self, key: Key, now: Instant) {
        let driven = catch_unwind(AssertUnwindSafe(|| self.drive(key, now)));
        if let Err(panic) = driven {
            self.ctl.contained_panic("driving a connection", &*panic);
            if self.conns.get(key.slot()).is_some_and(|e| e.key() == key) {
                self.close(key.slot(), false);
            }
        }
    }

    fn drive(&mut self, key: Key, now: Instant) {
        let slot = key.slot();
        let Some(entry) = self.conns.get_mut(slot) else {
            return;
        };
        if entry.key() != key {
            return;
        }
        let verdict = match entry {
            Entry::Http(conn) => conn.drive(&self.driver, now, self.draining),
            Entry::Tcp(conn) => {
                if conn.drive(now, self.draining) {
                    Verdict::Close
                } else {
                    Verdict::Keep
                }
            }
        };
        match verdict {
            Verdict::Keep => {
                let socket = entry.socket();
                if socket.needs_registration() {
                    let fd = socket.io.as_raw_fd();
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
                let socket = entry.socket().clone();
                // The coalescing buffer was hyper's; a read handler writes from its own.
                socket.release_buffers();
                let conn = crate::tcp::Conn::new(Some(socket.io.as_raw_fd()), &self.tcp);
                let input = bytes::BytesMut::from(&taken.leftover[..]);
                let core = ConnCore::new(taken.handler, conn, input, self.tcp.clone(), now);
                *entry = Entry::Tcp(Box::new(LoopConn::new(socket, key, core)));
                wake::push_local(key);
            }
        }
    }

    /// Removes a connection and drops it. Dropping runs user code (a service, a handler, a
    /// body, a pending hijack's handler); a panic there is contained, logged and counted, and
    /// the slot is released all the same.
    fn close(&mut self, slot: usize, forced: bool) {
        let mut entry = self.conns.remove(slot);
        let key = entry.key();
        timer::forget_slot(key);
        let registry = self.poll.registry();
        let dropped = catch_unwind(AssertUnwindSafe(move || {
            crate::hijack::forget(key);
            crate::sse::forget(key);
            if forced {
                if let Entry::Tcp(c) = &mut entry {
                    c.abort();
                }
            }
            let socket = entry.socket();
            if Arc::strong_count(socket) > 1 {
                // Someone else (an upgrade) still holds the socket: cut it off from this poller.
                let fd = socket.io.as_raw_fd();
                let _ = registry.deregister(&mut mio::unix::SourceFd(&fd));
                let _ = socket.io.shutdown(std::net::Shutdown::Both);
                socket.wake_all();
            }
            drop(entry);
        }));
        if let Err(panic) = dropped {
            self.ctl.contained_panic("dropping a connection", &*panic);
        }
        self.ctl.release(forced);
    }

    fn begin_drain(&mut self, ready: &mut Vec<Key>) {
        self.draining = true;
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        for (_, entry) in self.conns.iter_mut() {
            if let Entry::Http(conn) = entry {
                conn.begin_drain();
            }
            ready.push(entry.key());
        }
    }

    fn force_close(&mut self) {
        let slots: Vec<usize> = self.conns.iter().map(|(s, _)| s).collect();
        for slot in slots {
            tracing::debug!("drain timeout: force-closing a connection");
            self.close(slot, true);
        }
    }
}
