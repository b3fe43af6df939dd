//! The `rate` mode's client: requests sent on a timetable by one busy-polling thread.
//!
//! A latency measurement at a fixed rate is only as good as the client's clock. A tokio client
//! wakes on a 1 ms timer and shares its thread between the tasks that wait for their send time
//! and the ones reading responses, which adds up to milliseconds to what it measures. This one
//! spins instead: one thread with its own `mio::Poll`, polled with a zero timeout, sends each
//! request when it is due and reads each response as soon as the kernel has it, so what it
//! measures is the server and the loopback, to within a few microseconds. It keeps its CPU
//! busy for the whole run, which is what a load generator pinned to its own CPU is for.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::util::{get_request, histogram, parse_head, record, source_ip};

/// What a paced run counted.
pub struct Paced {
    pub ok: u64,
    pub errors: u64,
    /// Requests not answered before the hard stop (2 s after the run), or never sent by then.
    pub missed: u64,
    /// From the time each request was due (corrects for coordinated omission).
    pub corrected: Histogram<u64>,
    /// From the time each request was sent.
    pub service: Histogram<u64>,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The request in flight: when it was due and when it went out.
    inflight: Option<(Instant, Instant)>,
    /// The next request's number on this connection's timetable.
    k: u32,
    /// Opened so far (for spreading source addresses).
    opened: usize,
}

/// Runs `c` keep-alive connections at `rps` requests/s in total for `duration`: request `k` of
/// connection `i` is due at `start + (i/c + k) * c/rps`; a connection sends its next request
/// when it is due or, if the previous response came late, as soon as that response is in.
pub fn run(
    addr: SocketAddr,
    path: &str,
    rps: f64,
    c: usize,
    duration: Duration,
) -> io::Result<Paced> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(256);
    let req = get_request(path, addr, false);
    let mut conns = Vec::with_capacity(c);
    for i in 0..c {
        let stream = open(&poll, addr, i, i)?;
        conns.push(Conn {
            stream,
            buf: Vec::with_capacity(4096),
            inflight: None,
            k: 0,
            opened: 1,
        });
    }
    let interval = Duration::from_secs_f64(c as f64 / rps);
    let start = Instant::now() + Duration::from_millis(10);
    let deadline = start + duration;
    let hard = deadline + Duration::from_secs(2);
    let due = |i: usize, k: u32| start + interval.mul_f64(i as f64 / c as f64) + interval * k;
    let mut out = Paced {
        ok: 0,
        errors: 0,
        missed: 0,
        corrected: histogram(),
        service: histogram(),
    };
    loop {
        let now = Instant::now();
        if now >= hard {
            for (i, conn) in conns.iter().enumerate() {
                out.missed += u64::from(conn.inflight.is_some());
                let mut k = conn.k;
                while due(i, k) < deadline {
                    out.missed += 1;
                    k += 1;
                }
            }
            break;
        }
        let mut active = false;
        for (i, conn) in conns.iter_mut().enumerate() {
            if conn.inflight.is_some() {
                active = true;
                continue;
            }
            let d = due(i, conn.k);
            if d >= deadline {
                continue;
            }
            active = true;
            if d <= now {
                conn.k += 1;
                match conn.stream.write(&req) {
                    Ok(n) if n == req.len() => conn.inflight = Some((d, Instant::now())),
                    _ => {
                        out.errors += 1;
                        reopen(&poll, conn, addr, i, c)?;
                    }
                }
            }
        }
        if !active {
            break;
        }
        if let Err(e) = poll.poll(&mut events, Some(Duration::ZERO)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let conn = &mut conns[i];
            match read_response(conn) {
                Ok(None) => {}
                Ok(Some(close)) => {
                    let now = Instant::now();
                    if let Some((d, sent)) = conn.inflight.take() {
                        record(&mut out.corrected, now - d);
                        record(&mut out.service, now - sent);
                        out.ok += 1;
                    }
                    if close {
                        reopen(&poll, conn, addr, i, c)?;
                    }
                }
                Err(_) => {
                    out.errors += 1;
                    conn.inflight = None;
                    reopen(&poll, conn, addr, i, c)?;
                }
            }
        }
    }
    Ok(out)
}

/// Connects (blocking, from source address `src`) and registers under `token`.
fn open(poll: &Poll, addr: SocketAddr, src: usize, token: usize) -> io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if let SocketAddr::V4(v4) = addr {
        if v4.ip().is_loopback() {
            sock.set_reuse_address(true)?;
            sock.bind(&SocketAddr::new(source_ip(src).into(), 0).into())?;
        }
    }
    sock.connect(&addr.into())?;
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    let mut stream = TcpStream::from_std(sock.into());
    poll.registry()
        .register(&mut stream, Token(token), Interest::READABLE)?;
    Ok(stream)
}

fn reopen(poll: &Poll, conn: &mut Conn, addr: SocketAddr, i: usize, c: usize) -> io::Result<()> {
    let _ = poll.registry().deregister(&mut conn.stream);
    conn.stream = open(poll, addr, i + conn.opened * c, i)?;
    conn.opened += 1;
    conn.buf.clear();
    Ok(())
}

/// Reads what has arrived; `Some(close)` once a whole response is in (`close`: the server
/// said `Connection: close`).
fn read_response(conn: &mut Conn) -> io::Result<Option<bool>> {
    let mut chunk = [0u8; 4096];
    loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let Some(end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = parse_head(&conn.buf[..end])?;
    if head.status >= 400 || head.chunked {
        return Err(io::Error::other(format!("HTTP {}", head.status)));
    }
    let total = end + 4 + head.content_length.unwrap_or(0);
    if conn.buf.len() < total {
        return Ok(None);
    }
    conn.buf.drain(..total);
    Ok(Some(head.close))
}
