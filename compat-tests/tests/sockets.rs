//! Socket tuning and socket activation, on both backends:
//! - the builder's TCP options reach the listening sockets (`TCP_FASTOPEN`, `TCP_DEFER_ACCEPT`)
//!   and the accepted ones (keepalive time, interval and count), read back with `getsockopt`;
//! - with `TCP_DEFER_ACCEPT`, a connection that says nothing is not accepted;
//! - the demo serves a listening socket handed down by `systemd-socket-activate`
//!   (`LISTEN_FDS`), on every poller;
//! - a restart on a shared port (`--share-port`, then SIGTERM to the old process) loses no
//!   connection: the old process drains, the new one accepts.

use compat_tests::{require_tool, run_test, start, Backend};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BACKENDS: [Backend; 2] = [Backend::Reactor, Backend::Tokio];

/// An `IPPROTO_TCP` int option of a descriptor.
fn tcp_opt(fd: RawFd, opt: libc::c_int) -> libc::c_int {
    let mut v: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a live int and its size; on a descriptor that is not a socket it fails, harmlessly.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt {opt}");
    v
}

/// This process's TCP sockets whose local address is `local`: (fd, listening, peer).
fn sockets_at(local: SocketAddr) -> Vec<(RawFd, bool, Option<SocketAddr>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Ok(fd) = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .parse::<RawFd>()
        else {
            continue;
        };
        // SAFETY: only read (getsockname, getsockopt) for the borrow's short life; a descriptor
        // another thread closes meanwhile makes these calls fail, which skips it.
        let fd_ref = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd_ref);
        let Ok(addr) = sock.local_addr() else {
            continue;
        };
        if addr.as_socket() != Some(local) {
            continue;
        }
        let listening = sock.is_listener().unwrap_or(false);
        let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
        out.push((fd, listening, peer));
    }
    out
}

/// One request on an open keep-alive connection; the response's head and body.
fn request(c: &mut TcpStream, path: &str) -> String {
    write!(c, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = c.read(&mut buf).expect("read");
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text.into_owned();
            }
        }
    }
}

fn app() -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| async { "hi" }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_options_reach_the_listening_and_accepted_sockets() {
    run_test(async {
        for backend in BACKENDS {
            let server = start(backend, app(), |b| {
                b.tcp_fastopen(16)
                    .tcp_defer_accept(Duration::from_secs(2))
                    .tcp_keepalive(Duration::from_secs(60))
                    .tcp_keepalive_interval(Duration::from_secs(5))
                    .tcp_keepalive_retries(3)
            });
            let addr = server.addr;
            let me = tokio::task::spawn_blocking(move || {
                let mut c = TcpStream::connect(addr).expect("connect");
                let text = request(&mut c, "/");
                assert!(text.starts_with("HTTP/1.1 200"), "[{backend}] {text}");
                let me = c.local_addr().expect("local");
                let found = sockets_at(addr);
                let listeners: Vec<_> = found.iter().filter(|(_, l, _)| *l).collect();
                assert!(!listeners.is_empty(), "[{backend}] no listener found");
                for (fd, _, _) in &listeners {
                    assert_eq!(tcp_opt(*fd, libc::TCP_FASTOPEN), 16, "[{backend}]");
                    // Kept as SYN-ACK retransmits, read back rounded up.
                    assert!(tcp_opt(*fd, libc::TCP_DEFER_ACCEPT) >= 2, "[{backend}]");
                }
                let (fd, _, _) = found
                    .iter()
                    .find(|(_, _, peer)| *peer == Some(me))
                    .unwrap_or_else(|| panic!("[{backend}] the accepted socket"));
                // SAFETY: as in `sockets_at`; the connection is open (we hold its other end).
                let fd_ref = unsafe { BorrowedFd::borrow_raw(*fd) };
                let sock = socket2::SockRef::from(&fd_ref);
                assert!(sock.keepalive().expect("SO_KEEPALIVE"), "[{backend}]");
                assert_eq!(
                    sock.tcp_keepalive_time().ok(),
                    Some(Duration::from_secs(60))
                );
                assert_eq!(
                    sock.tcp_keepalive_interval().ok(),
                    Some(Duration::from_secs(5))
                );
                assert_eq!(sock.tcp_keepalive_retries().ok(), Some(3));
                drop(c);
            });
            me.await.expect("the client");
            server.handle.shutdown();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defer_accept_hands_over_only_connections_that_speak() {
    run_test(async {
        for backend in BACKENDS {
            let server = start(backend, app(), |b| {
                b.tcp_defer_accept(Duration::from_secs(10))
            });
            let (addr, handle) = (server.addr, server.handle.clone());
            tokio::task::spawn_blocking(move || {
                // Served once first: the options are set when the server starts, and a
                // connection the kernel completed before that was not deferred.
                let mut first = TcpStream::connect(addr).expect("connect");
                let text = request(&mut first, "/");
                assert!(text.starts_with("HTTP/1.1 200"), "[{backend}] {text}");
                let before = handle.stats().accepted;
                let mut quiet = TcpStream::connect(addr).expect("connect");
                std::thread::sleep(Duration::from_millis(500));
                assert_eq!(
                    handle.stats().accepted,
                    before,
                    "[{backend}] a silent connection was accepted"
                );
                let text = request(&mut quiet, "/");
                assert!(text.starts_with("HTTP/1.1 200"), "[{backend}] {text}");
                assert_eq!(handle.stats().accepted, before + 1, "[{backend}]");
            })
            .await
            .expect("the client");
            server.handle.shutdown();
        }
    })
    .await;
}

use compat_tests::demo::{binary as demo_binary, free_addr, Demo as Reap};

/// CPU ticks (user + system) of each of `pid`'s threads named `hop-poller-*`.
fn poller_ticks(pid: u32) -> Vec<u64> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = t.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("hop-poller") {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.push(ticks);
    }
    out
}

#[test]
fn the_demo_serves_a_socket_handed_down_by_systemd() {
    let bin = demo_binary();
    require_tool("systemd-socket-activate", "--help");
    for backend in ["reactor", "tokio"] {
        let addr = free_addr();
        // It listens, and starts the demo with the socket as fd 3 at the first connection.
        let activator = Reap(
            Command::new("systemd-socket-activate")
                .args(["-l", &addr.to_string(), "--"])
                .arg(&bin)
                .args(["--backend", backend, "--pollers", "2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("systemd-socket-activate starts"),
        );
        let t0 = Instant::now();
        let mut first = loop {
            match TcpStream::connect(addr) {
                Ok(c) => break c,
                Err(_) => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(30),
                        "[{backend}] no listener"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        first
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let text = request(&mut first, "/plaintext");
        assert!(text.ends_with("Hello, World!"), "[{backend}] {text}");
        // Busy connections, each on its own thread, for a while: every poller serves some.
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..6)
            .map(|_| {
                let (stop, served) = (stop.clone(), served.clone());
                std::thread::spawn(move || {
                    let mut c = TcpStream::connect(addr).expect("connect");
                    c.set_read_timeout(Some(Duration::from_secs(30)))
                        .expect("timeout");
                    while !stop.load(Ordering::Relaxed) {
                        let text = request(&mut c, "/plaintext");
                        assert!(text.ends_with("Hello, World!"), "{text}");
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().expect("a client failed");
        }
        assert!(served.load(Ordering::Relaxed) > 0, "[{backend}]");
        if backend == "reactor" {
            // systemd-socket-activate execs the demo: same pid.
            let ticks = poller_ticks(activator.0.id());
            assert_eq!(ticks.len(), 2, "[{backend}] pollers: {ticks:?}");
            assert!(
                ticks.iter().all(|&t| t > 0),
                "[{backend}] a poller served nothing: {ticks:?}"
            );
        }
        drop(first);
    }
}

/// Starts the demo on `addr` with `extra` flags; waits until it says it listens.
fn start_demo(bin: &Path, backend: &str, addr: &str, extra: &[&str]) -> (Reap, SocketAddr) {
    let extra: Vec<&std::ffi::OsStr> = extra.iter().map(|a| a.as_ref()).collect();
    compat_tests::demo::start(bin, backend, addr, &extra)
}

/// The README's zero-downtime restart: a new process joins the port (`--share-port`), the old
/// one gets SIGTERM and drains. New connections made all along are all answered, and the old
/// process finishes its request in flight before it exits.
#[test]
fn a_restart_on_a_shared_port_loses_nothing() {
    let bin = demo_binary();
    for backend in ["reactor", "tokio"] {
        let (mut old, addr) = start_demo(&bin, backend, "127.0.0.1:0", &[]);
        // A request in flight on the old process: its body comes later.
        let mut slow = TcpStream::connect(addr).expect("connect");
        slow.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        slow.write_all(
            b"POST /sse/broadcast HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\
              expect: 100-continue\r\n\r\n",
        )
        .expect("write");
        let mut got = [0u8; 256];
        let n = slow.read(&mut got).expect("100 Continue");
        assert!(got[..n].starts_with(b"HTTP/1.1 100"), "[{backend}]");

        // A client that opens a new connection for every request, all along.
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let client = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let res = TcpStream::connect(addr).and_then(|mut c| {
                        c.set_read_timeout(Some(Duration::from_secs(30)))?;
                        c.write_all(
                            b"GET /plaintext HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                        )?;
                        let mut body = Vec::new();
                        c.read_to_end(&mut body)?;
                        Ok(body)
                    });
                    match res {
                        Ok(b) if b.ends_with(b"Hello, World!") => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("{other:?}"));
                        }
                    }
                    // (A connection every few ms: one completing its handshake in the microseconds
                    // between the old listener's last accept and its close would be reset; see
                    // the README. Fewer connections keep that chance small.)
                    std::thread::sleep(Duration::from_millis(10));
                }
                errors
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let (_new, _) = start_demo(&bin, backend, &addr.to_string(), &["--share-port"]);
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on our own child, not yet reaped (we hold its handle).
        assert_eq!(
            unsafe { libc::kill(old.0.id() as libc::pid_t, libc::SIGTERM) },
            0
        );
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            old.0.try_wait().expect("try_wait").is_none(),
            "[{backend}] the old process did not wait for its request in flight"
        );
        // The request in flight finishes on the old process, which then exits.
        slow.write_all(b"hello").expect("the body");
        let mut answer = Vec::new();
        slow.read_to_end(&mut answer).expect("the answer");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "[{backend}] {answer}");
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = old.0.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "[{backend}] the old process did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "[{backend}] {status:?}");
        // The new process goes on alone.
        let before = ok.load(Ordering::Relaxed);
        let t0 = Instant::now();
        while ok.load(Ordering::Relaxed) < before + 20 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "[{backend}] the new process serves nothing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let errors = client.join().expect("the client");
        assert_eq!(
            failed.load(Ordering::Relaxed),
            0,
            "[{backend}] {} answered, failures: {errors:?}",
            ok.load(Ordering::Relaxed)
        );
    }
}
