//! The load modes.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep, timeout, timeout_at};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::tls::TlsClient;
use crate::util::*;

/// How long one connection may take to open (connect and handshake).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

fn rate(n: u64, d: Duration) -> f64 {
    let r = n as f64 / d.as_secs_f64().max(1e-9);
    (r * 100.0).round() / 100.0
}

fn extend(v: &mut Value, more: Value) {
    if let (Some(a), Value::Object(b)) = (v.as_object_mut(), more) {
        a.extend(b);
    }
}

/// What the workers of a timed mode count, together.
struct Tally {
    /// Completed units: requests, connections or messages.
    done: AtomicU64,
    /// Connections opened (`echo`).
    connects: AtomicU64,
    errors: AtomicU64,
    /// The first error's text, where the mode records it (`churn`).
    first_error: Mutex<Option<String>>,
    hist: Mutex<Histogram<u64>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            done: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            hist: Mutex::new(histogram()),
        }
    }

    fn add(&self, n: u64) {
        self.done.fetch_add(n, Relaxed);
    }

    fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    /// An error, whose text is kept if it is the first.
    fn error_because(&self, why: impl FnOnce() -> String) {
        self.error();
        self.first_error.lock().unwrap().get_or_insert_with(why);
    }

    /// Adds a worker's latencies (each worker records into its own histogram).
    fn merge(&self, h: &Histogram<u64>) {
        let _ = self.hist.lock().unwrap().add(h);
    }

    fn latency(&self) -> Value {
        summary(&self.hist.lock().unwrap())
    }
}

/// A timed run's outcome: the counts, how long it took and the server's figures.
struct Run {
    tally: Arc<Tally>,
    secs: Duration,
    server: Value,
}

/// Runs `n` workers until `duration` has passed, sampling the server meanwhile; worker `w` is
/// `worker(w, tally, deadline)`.
async fn run_workers<F, Fut>(
    n: usize,
    duration: Duration,
    server_pid: Option<u32>,
    mut worker: F,
) -> Run
where
    F: FnMut(usize, Arc<Tally>, tokio::time::Instant) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tally = Arc::new(Tally::new());
    let mon = Monitor::start(server_pid);
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + duration);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..n {
        tasks.spawn(worker(w, tally.clone(), deadline));
    }
    while tasks.join_next().await.is_some() {}
    let secs = start.elapsed();
    Run {
        tally,
        secs,
        server: mon.finish(),
    }
}

/// What an idle connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1 keep-alive, after one `GET`.
    Http,
    /// HTTP/1.1 keep-alive over TLS 1.3 (ALPN `http/1.1`), after the handshake and one `GET`;
    /// needs a [`TlsClient`].
    Https,
    /// HTTP/2 cleartext with prior knowledge (h2c), after the SETTINGS exchange and one `GET` on
    /// stream 1 (frames written by hand: [`crate::h2c`]).
    H2,
    /// WebSocket, after the handshake and one echoed message.
    Ws,
    /// An SSE subscriber (`Accept: text/event-stream`), after the response head.
    Sse,
    /// Raw TCP, after one echoed line.
    Tcp,
    /// WebSocket spoken by hand (`ws-echo --client raw`): after the handshake, one pre-built
    /// masked frame out and the echo's bytes counted back, so the load generator costs little
    /// more than its system calls.
    WsRaw,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "http" => Ok(Kind::Http),
            "https" => Ok(Kind::Https),
            "h2" => Ok(Kind::H2),
            "ws" => Ok(Kind::Ws),
            "sse" => Ok(Kind::Sse),
            "tcp" => Ok(Kind::Tcp),
            _ => Err(format!(
                "unknown kind {s:?} (http, https, h2, ws, sse, tcp)"
            )),
        }
    }
}

impl Kind {
    fn default_path(self) -> &'static str {
        match self {
            Kind::Http | Kind::Https | Kind::H2 => "/plaintext",
            Kind::Ws | Kind::WsRaw => "/ws",
            Kind::Sse => "/sse",
            Kind::Tcp => "",
        }
    }
}

/// An open connection.
pub enum Held {
    Tcp(TcpStream),
    Sse(TcpStream, Vec<u8>),
    Ws(Box<WebSocketStream<TcpStream>>),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Why a connection did not open.
#[derive(Debug)]
pub enum OpenError {
    /// The server answered the handshake with this status: the route is absent (0: an HTTP/2
    /// status outside HPACK's static table).
    Absent(u16),
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> OpenError {
        OpenError::Io(e)
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // 0: an HTTP/2 status that is not one of HPACK's static entries (not 200).
            OpenError::Absent(0) => write!(f, "route absent (an HTTP/2 status other than 200)"),
            OpenError::Absent(s) => write!(f, "route absent (HTTP {s})"),
            OpenError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// One keep-alive `GET path` on `s`, which must answer 200 and keep the connection open.
async fn keep_alive_get<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    path: &str,
    addr: SocketAddr,
) -> Result<(), OpenError> {
    let mut buf = Vec::new();
    let h = http_roundtrip(s, &mut buf, &get_request(path, addr, false)).await?;
    if h.status != 200 {
        return Err(OpenError::Absent(h.status));
    }
    if h.close {
        return Err(io::Error::other("server closed the keep-alive connection").into());
    }
    Ok(())
}

/// Opens connection number `i` of kind `kind` (source address spread by `i`); `tls` is the TLS
/// client of [`Kind::Https`].
pub async fn open_one(
    kind: Kind,
    addr: SocketAddr,
    i: usize,
    path: &str,
    tls: Option<&TlsClient>,
) -> Result<Held, OpenError> {
    let path = if path.is_empty() {
        kind.default_path()
    } else {
        path
    };
    let mut s = connect(addr, i).await?;
    match kind {
        Kind::Tcp => {
            s.write_all(b"hello\n").await?;
            let mut back = [0u8; 6];
            s.read_exact(&mut back).await?;
            if &back != b"hello\n" {
                return Err(io::Error::other("echo mismatch").into());
            }
            Ok(Held::Tcp(s))
        }
        Kind::Http => {
            keep_alive_get(&mut s, path, addr).await?;
            Ok(Held::Tcp(s))
        }
        Kind::Https => {
            let tls = tls.ok_or_else(|| io::Error::other("--kind https needs --ca FILE"))?;
            let mut s = tls.connect(s).await?;
            keep_alive_get(&mut s, path, addr).await?;
            Ok(Held::Tls(Box::new(s)))
        }
        Kind::H2 => {
            let answer = crate::h2c::open(&mut s, Some(path), addr).await?;
            if answer.status != 200 {
                return Err(OpenError::Absent(answer.status));
            }
            Ok(Held::Tcp(s))
        }
        Kind::Sse => {
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            let h = read_head(&mut s, &mut buf).await?;
            if h.status != 200 || !h.content_type.contains("event-stream") {
                return Err(OpenError::Absent(h.status));
            }
            Ok(Held::Sse(s, buf))
        }
        Kind::WsRaw => {
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            let h = read_head(&mut s, &mut buf).await?;
            if h.status != 101 {
                return Err(OpenError::Absent(h.status));
            }
            if !buf.is_empty() {
                return Err(io::Error::other("bytes after the 101").into());
            }
            RawEcho::new(5, 1).roundtrip(&mut s).await?;
            Ok(Held::Tcp(s))
        }
        Kind::Ws => {
            let url = format!("ws://{addr}{path}");
            let (mut ws, _) =
                tokio_tungstenite::client_async(url, s)
                    .await
                    .map_err(|e| match e {
                        tungstenite::Error::Http(resp) => OpenError::Absent(resp.status().as_u16()),
                        tungstenite::Error::Io(e) => OpenError::Io(e),
                        e => OpenError::Io(io::Error::other(e)),
                    })?;
            ws.send(Message::text("hello"))
                .await
                .map_err(io::Error::other)?;
            match ws.next().await {
                Some(Ok(m)) if m.len() == 5 => {}
                Some(Ok(m)) => return Err(io::Error::other(format!("bad echo {m:?}")).into()),
                Some(Err(e)) => return Err(io::Error::other(e).into()),
                None => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            }
            Ok(Held::Ws(Box::new(ws)))
        }
    }
}

/// `burst` text messages of a fixed size, sent in one write and echoed: the client side of
/// `ws-echo --client raw`.
struct RawEcho {
    /// The masked client frames, built once.
    frames: Vec<u8>,
    /// The echo's length on the wire (an unmasked server frame).
    echo_len: usize,
    /// The echo's frame head.
    echo_head: Vec<u8>,
    /// Where the echoes are read to.
    buf: Vec<u8>,
    size: usize,
}

impl RawEcho {
    fn new(size: usize, burst: usize) -> RawEcho {
        const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x81]; // FIN + text
        let mut echo_len = 2 + size;
        match size {
            0..=125 => frame.push(0x80 | size as u8),
            126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(size as u16).to_be_bytes());
                echo_len += 2;
            }
            _ => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(size as u64).to_be_bytes());
                echo_len += 8;
            }
        }
        let mut echo_head = frame.clone();
        echo_head[1] &= 0x7f; // not masked
        frame.extend_from_slice(&MASK);
        frame.extend((0..size).map(|i| b'x' ^ MASK[i % 4]));
        RawEcho {
            frames: frame.repeat(burst.max(1)),
            echo_len,
            echo_head,
            buf: vec![0; echo_len * burst.max(1)],
            size,
        }
    }

    /// Sends the messages and reads their echoes, which must be the same texts, unmasked.
    async fn roundtrip(&mut self, s: &mut TcpStream) -> io::Result<()> {
        s.write_all(&self.frames).await?;
        s.read_exact(&mut self.buf).await?;
        // The socket is empty now (the server sends nothing unasked): forget that it was
        // readable, so the next read waits for epoll instead of first failing a `recv`.
        let _ = s.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        for echo in self.buf.chunks(self.echo_len) {
            let (head, payload) = echo.split_at(self.echo_len - self.size);
            if head != self.echo_head || payload.iter().any(|&b| b != b'x') {
                return Err(io::Error::other("the echo is not the message sent"));
            }
        }
        Ok(())
    }
}

/// Opens `n` connections, at most `concurrency` handshakes at a time; each opened one is handed
/// to `keep` (in its own task). Returns (opened, failed, absent, first error).
#[allow(clippy::too_many_arguments)]
async fn open_many<F, Fut>(
    kind: Kind,
    n: usize,
    addr: SocketAddr,
    path: &str,
    tls: Option<&TlsClient>,
    concurrency: usize,
    keep: F,
) -> (usize, usize, usize, Option<String>)
where
    F: Fn(usize, Held) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), OpenError>>();
    let keep = Arc::new(keep);
    for i in 0..n {
        let sem = sem.clone();
        let tx = tx.clone();
        let keep = keep.clone();
        let path = path.to_string();
        let tls = tls.cloned();
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let r = timeout(OPEN_TIMEOUT, open_one(kind, addr, i, &path, tls.as_ref())).await;
            drop(permit);
            match r {
                Ok(Ok(held)) => {
                    let _ = tx.send(Ok(()));
                    keep(i, held).await
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e));
                }
                Err(_) => {
                    let _ = tx.send(Err(io::Error::from(io::ErrorKind::TimedOut).into()));
                }
            }
        });
    }
    drop(tx);
    let (mut opened, mut failed, mut absent, mut first) = (0, 0, 0, None);
    for _ in 0..n {
        match rx.recv().await {
            Some(Ok(())) => opened += 1,
            Some(Err(e)) => {
                failed += 1;
                if matches!(e, OpenError::Absent(_)) {
                    absent += 1;
                }
                first.get_or_insert_with(|| e.to_string());
            }
            None => break,
        }
    }
    (opened, failed, absent, first)
}

/// Holds a connection until `stop`; counts it in `closed` if the server closes it first.
async fn hold(held: Held, mut stop: watch::Receiver<bool>, closed: Arc<AtomicUsize>) {
    match held {
        Held::Tcp(mut s) | Held::Sse(mut s, _) => {
            let mut b = [0u8; 512];
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    r = s.read(&mut b) => if !matches!(r, Ok(n) if n > 0) {
                        closed.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
        }
        Held::Tls(mut s) => {
            let mut b = [0u8; 512];
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    r = s.read(&mut b) => if !matches!(r, Ok(n) if n > 0) {
                        closed.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
        }
        Held::Ws(mut ws) => loop {
            tokio::select! {
                _ = stop.changed() => return,
                m = ws.next() => if !matches!(m, Some(Ok(_))) {
                    closed.fetch_add(1, Relaxed);
                    return;
                }
            }
        },
    }
}

/// `idle`: options.
#[derive(Clone, Debug)]
pub struct IdleOpts {
    pub kind: Kind,
    pub n: usize,
    pub addr: SocketAddr,
    /// Route (empty: `/plaintext`, `/ws`, `/sse` by kind).
    pub path: String,
    /// How long to keep the connections open after measuring.
    pub hold: Duration,
    /// How long to wait after the last connection opened before sampling the server.
    pub settle: Duration,
    pub server_pid: Option<u32>,
    pub concurrency: usize,
    /// The TLS client of `--kind https`.
    pub tls: Option<TlsClient>,
}

/// `idle`: opens `n` connections of one kind, samples the server's RSS and threads before and
/// after, holds them for `hold`.
pub async fn idle(o: IdleOpts) -> Result<Value, String> {
    check_capacity(o.n, o.addr)?;
    let before = o.server_pid.and_then(|p| proc_sample(p).ok());
    let (stop_tx, stop_rx) = watch::channel(false);
    let closed = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let c2 = closed.clone();
    let (opened, failed, absent, first_error) = open_many(
        o.kind,
        o.n,
        o.addr,
        &o.path,
        o.tls.as_ref(),
        o.concurrency,
        move |_, held| hold(held, stop_rx.clone(), c2.clone()),
    )
    .await;
    let open_secs = t0.elapsed().as_secs_f64();
    sleep(o.settle).await;
    let after = o.server_pid.and_then(|p| proc_sample(p).ok());
    let mut v = json!({
        "mode": "idle",
        "kind": format!("{:?}", o.kind).to_lowercase(),
        "n": o.n,
        "opened": opened,
        "failed": failed,
        "available": !(opened == 0 && absent > 0),
        "open_secs": (open_secs * 1000.0).round() / 1000.0,
        "first_error": first_error,
    });
    if let (Some(b), Some(a)) = (before, after) {
        let growth = a.rss_kb as i64 - b.rss_kb as i64;
        extend(
            &mut v,
            json!({
                "rss_before_kb": b.rss_kb,
                "rss_after_kb": a.rss_kb,
                "rss_growth_kb": growth,
                "rss_per_conn_bytes": if opened > 0 { ((growth * 1024) as f64 / opened as f64).round() } else { 0.0 },
                "threads_before": b.threads,
                "threads_after": a.threads,
            }),
        );
    }
    if !o.hold.is_zero() {
        sleep(o.hold).await;
    }
    v["closed_by_server"] = json!(closed.load(Relaxed));
    let _ = stop_tx.send(true);
    Ok(v)
}

/// `echo`: options (the seed tcp-echo-servers benchmark).
#[derive(Clone, Debug)]
pub struct EchoOpts {
    /// Concurrent connections.
    pub c: usize,
    /// Requests per connection before reconnecting; 0 is unbounded.
    pub r: usize,
    pub duration: Duration,
    pub addr: SocketAddr,
    /// Bytes per request.
    pub size: usize,
    pub server_pid: Option<u32>,
}

/// `echo`: `c` connections, each writing `size` bytes and reading them back, reconnecting after
/// `r` requests, for `duration`.
pub async fn echo(o: EchoOpts) -> Result<Value, String> {
    check_capacity(o.c, o.addr)?;
    let opts = o.clone();
    let run = run_workers(o.c, o.duration, o.server_pid, move |w, tally, deadline| {
        let o = opts.clone();
        async move {
            let msg = vec![b'x'; o.size.max(1)];
            let mut back = vec![0u8; msg.len()];
            let mut h = histogram();
            let mut k = w;
            'outer: while tokio::time::Instant::now() < deadline {
                let mut s = match timeout_at(deadline, connect(o.addr, k)).await {
                    Err(_) => break,
                    Ok(Err(_)) => {
                        tally.error();
                        sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    Ok(Ok(s)) => s,
                };
                k += o.c;
                tally.connects.fetch_add(1, Relaxed);
                let mut done = 0;
                while o.r == 0 || done < o.r {
                    let t = Instant::now();
                    let rt = async {
                        s.write_all(&msg).await?;
                        s.read_exact(&mut back).await
                    };
                    match timeout_at(deadline, rt).await {
                        Err(_) => break 'outer,
                        Ok(Err(_)) => {
                            tally.error();
                            break;
                        }
                        Ok(Ok(_)) => {
                            record(&mut h, t.elapsed());
                            tally.add(1);
                            done += 1;
                        }
                    }
                }
            }
            tally.merge(&h);
        }
    })
    .await;
    let t = &run.tally;
    let (r, c) = (t.done.load(Relaxed), t.connects.load(Relaxed));
    let mut v = json!({
        "mode": "echo",
        "connections": o.c,
        "requests_per_connection": o.r,
        "size": o.size,
        "secs": run.secs.as_secs_f64(),
        "requests": r,
        "connects": c,
        "errors": t.errors.load(Relaxed),
        "req_per_s": rate(r, run.secs),
        "conn_per_s": rate(c, run.secs),
        "latency": t.latency(),
    });
    extend(&mut v, run.server);
    Ok(v)
}

/// `rate`: options.
#[derive(Clone, Debug)]
pub struct RateOpts {
    /// Requests per second, over all connections.
    pub rps: f64,
    pub duration: Duration,
    pub addr: SocketAddr,
    pub path: String,
    pub c: usize,
    pub server_pid: Option<u32>,
}

/// `rate`: a fixed request rate on `c` keep-alive connections, each on its own timetable
/// (request k of connection i is due at `start + (i/c + k) * c/rps`), sent and read by a
/// busy-polling thread ([`crate::paced`]). Latency is measured from the time a request was
/// due, not the time it was sent, which corrects for coordinated omission: a stalled response
/// delays the requests queued behind it, and their wait counts. `service` is the uncorrected
/// time from send to response, for comparison.
pub async fn rate_mode(o: RateOpts) -> Result<Value, String> {
    if o.rps <= 0.0 || o.c == 0 {
        return Err("rate: --rps and -c must be positive".into());
    }
    check_capacity(o.c, o.addr)?;
    let mon = Monitor::start(o.server_pid);
    let (addr, path, rps, c, duration) = (o.addr, o.path.clone(), o.rps, o.c, o.duration);
    let r = tokio::task::spawn_blocking(move || crate::paced::run(addr, &path, rps, c, duration))
        .await
        .map_err(|e| format!("rate: {e}"))?
        .map_err(|e| format!("rate against {}: {e}", o.addr))?;
    let server = mon.finish();
    let mut v = json!({
        "mode": "rate",
        "target_rps": o.rps,
        "connections": o.c,
        "secs": o.duration.as_secs_f64(),
        "requests": r.ok,
        "errors": r.errors,
        "missed": r.missed,
        "achieved_rps": rate(r.ok, o.duration),
        "latency": summary(&r.corrected),
        "service": summary(&r.service),
    });
    extend(&mut v, server);
    Ok(v)
}

/// `churn`: options.
#[derive(Clone, Debug)]
pub struct ChurnOpts {
    pub c: usize,
    pub duration: Duration,
    pub addr: SocketAddr,
    pub path: String,
    pub server_pid: Option<u32>,
    /// With a TLS client, each connection also does a full TLS 1.3 handshake (no resumption)
    /// before its request: new TLS handshakes per second.
    pub tls: Option<TlsClient>,
}

/// `churn`: `c` workers, each opening a connection, sending one request with
/// `Connection: close`, reading the response to the server's close, and starting again (over
/// TLS with `tls`: the handshake, the request, then the read to the server's `close_notify` or
/// close).
pub async fn churn(o: ChurnOpts) -> Result<Value, String> {
    check_capacity(o.c, o.addr)?;
    let opts = o.clone();
    let run = run_workers(o.c, o.duration, o.server_pid, move |w, tally, deadline| {
        let o = opts.clone();
        async move {
            let req = get_request(&o.path, o.addr, true);
            let mut h = histogram();
            let mut buf = Vec::new();
            let mut k = w;
            loop {
                let t = Instant::now();
                let src = k;
                k += o.c;
                let one = async {
                    let mut s = connect(o.addr, src).await?;
                    buf.clear();
                    let Some(tls) = &o.tls else {
                        let head = http_roundtrip(&mut s, &mut buf, &req).await?;
                        // To the server's close: the whole life of the connection.
                        let mut b = [0u8; 64];
                        while s.read(&mut b).await? > 0 {}
                        return io::Result::Ok(head.status);
                    };
                    let mut s = tls.connect(s).await?;
                    let head = http_roundtrip(&mut s, &mut buf, &req).await?;
                    let mut b = [0u8; 64];
                    loop {
                        match s.read(&mut b).await {
                            Ok(0) => break,
                            Ok(_) => {}
                            // A close without close_notify, once the response is in, is a
                            // close all the same.
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(head.status)
                };
                match timeout_at(deadline, one).await {
                    Err(_) => break,
                    Ok(Ok(s)) if s < 400 => {
                        record(&mut h, t.elapsed());
                        tally.add(1);
                    }
                    Ok(r) => {
                        tally.error_because(|| match r {
                            Ok(status) => format!("HTTP {status}"),
                            Err(e) => e.to_string(),
                        });
                        sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            tally.merge(&h);
        }
    })
    .await;
    let n = run.tally.done.load(Relaxed);
    let mut v = json!({
        "mode": "churn",
        "tls": o.tls.is_some(),
        "workers": o.c,
        "secs": run.secs.as_secs_f64(),
        "connections": n,
        "errors": run.tally.errors.load(Relaxed),
        "first_error": run.tally.first_error.lock().unwrap().clone(),
        "conn_per_s": rate(n, run.secs),
        "latency": run.tally.latency(),
    });
    extend(&mut v, run.server);
    Ok(v)
}

/// `ws-echo`: options.
#[derive(Clone, Debug)]
pub struct WsEchoOpts {
    pub c: usize,
    pub duration: Duration,
    pub addr: SocketAddr,
    pub path: String,
    pub size: usize,
    /// The client: `raw` (default; pre-built frames, see [`Kind::WsRaw`]) or `tungstenite`
    /// (tokio-tungstenite, which costs the load generator more per message than most servers).
    pub raw: bool,
    /// Messages in flight per connection, sent in one write (`raw` only; 1: ping-pong).
    pub burst: usize,
    pub server_pid: Option<u32>,
}

/// `ws-echo`: `c` WebSocket connections, each sending a `size`-byte text message and waiting
/// for its echo, for `duration`. `available: false` when the route is absent.
pub async fn ws_echo(o: WsEchoOpts) -> Result<Value, String> {
    if o.burst > 1 && !o.raw {
        return Err("ws-echo: --burst needs --client raw".into());
    }
    check_capacity(o.c, o.addr)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (opened, failed, absent, first_error) = open_many(
        if o.raw { Kind::WsRaw } else { Kind::Ws },
        o.c,
        o.addr,
        &o.path,
        None,
        256,
        move |_, held| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(held);
            }
        },
    )
    .await;
    if opened == 0 {
        return Ok(json!({
            "mode": "ws-echo",
            "available": absent == 0,
            "failed": failed,
            "first_error": first_error,
        }));
    }
    let mut helds = Vec::with_capacity(opened);
    while helds.len() < opened {
        match rx.recv().await {
            Some(held) => helds.push(held),
            None => break,
        }
    }
    let mut helds = helds.into_iter();
    let (size, burst) = (o.size.max(1), o.burst.max(1));
    let run = run_workers(
        helds.len(),
        o.duration,
        o.server_pid,
        move |_, tally, deadline| {
            let held = helds.next().expect("one connection per worker");
            async move {
                let mut h = histogram();
                let mut raw = RawEcho::new(size, burst);
                let payload = "x".repeat(size);
                let (mut sock, mut ws) = match held {
                    Held::Tcp(s) => (Some(s), None),
                    Held::Ws(ws) => (None, Some(ws)),
                    Held::Sse(..) | Held::Tls(_) => return,
                };
                loop {
                    let t = Instant::now();
                    let rt = async {
                        if let Some(s) = &mut sock {
                            return raw.roundtrip(s).await.map_err(tungstenite::Error::Io);
                        }
                        let ws = ws.as_mut().expect("a tungstenite client");
                        ws.send(Message::text(payload.clone())).await?;
                        loop {
                            match ws.next().await {
                                Some(Ok(m)) if m.is_text() || m.is_binary() => {
                                    return if m.len() == size {
                                        Ok(())
                                    } else {
                                        Err(tungstenite::Error::Io(io::Error::other("bad echo")))
                                    };
                                }
                                Some(Ok(_)) => continue,
                                Some(Err(e)) => return Err(e),
                                None => return Err(tungstenite::Error::ConnectionClosed),
                            }
                        }
                    };
                    match timeout_at(deadline, rt).await {
                        Err(_) => break,
                        Ok(Ok(())) => {
                            record(&mut h, t.elapsed());
                            tally.add(burst as u64);
                        }
                        Ok(Err(_)) => {
                            tally.error();
                            break;
                        }
                    }
                }
                tally.merge(&h);
            }
        },
    )
    .await;
    let n = run.tally.done.load(Relaxed);
    let mut v = json!({
        "mode": "ws-echo",
        "client": if o.raw { "raw" } else { "tungstenite" },
        "burst": burst,
        "available": true,
        "connections": opened,
        "failed": failed,
        "secs": run.secs.as_secs_f64(),
        "messages": n,
        "errors": run.tally.errors.load(Relaxed),
        "msg_per_s": rate(n, run.secs),
        "latency": run.tally.latency(),
    });
    extend(&mut v, run.server);
    Ok(v)
}

/// `sse`: options.
#[derive(Clone, Debug)]
pub struct SseOpts {
    /// Subscribers.
    pub n: usize,
    pub addr: SocketAddr,
    pub path: String,
    /// `POST` this path (body: a unique token) to publish an event; without it, wait for the
    /// server's own next event.
    pub publish: Option<String>,
    /// Events to time.
    pub rounds: usize,
    /// How long to wait for one event to reach everyone.
    pub wait: Duration,
    pub server_pid: Option<u32>,
}

#[derive(Default)]
struct Round {
    id: u64,
    armed: bool,
    token: Option<String>,
    times: Vec<Instant>,
}

/// `sse`: `n` subscribers; for each round, the time from publishing (or, without `publish`, from
/// the first subscriber's receipt) until the last subscriber has the event.
pub async fn sse(o: SseOpts) -> Result<Value, String> {
    check_capacity(o.n + 1, o.addr)?;
    let round = Arc::new(Mutex::new(Round::default()));
    let r2 = round.clone();
    let (opened, failed, absent, first_error) = open_many(
        Kind::Sse,
        o.n,
        o.addr,
        &o.path,
        None,
        256,
        move |_, held| subscriber(held, r2.clone()),
    )
    .await;
    if opened == 0 {
        return Ok(json!({
            "mode": "sse",
            "available": absent == 0,
            "failed": failed,
            "first_error": first_error,
        }));
    }
    sleep(Duration::from_millis(200)).await;
    let mut fanouts = Vec::new();
    let mut spreads = Vec::new();
    let mut incomplete = 0usize;
    for r in 0..o.rounds.max(1) {
        let token = o.publish.as_ref().map(|_| {
            format!(
                "hop-load-{}-{r}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            )
        });
        {
            let mut st = round.lock().unwrap();
            st.id = r as u64 + 1;
            st.armed = true;
            st.token = token.clone();
            st.times.clear();
        }
        let t_pub = Instant::now();
        if let (Some(p), Some(tok)) = (&o.publish, &token) {
            let mut s = connect(o.addr, o.n + r)
                .await
                .map_err(|e| format!("publish connect: {e}"))?;
            let req = format!(
                "POST {p} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{tok}",
                o.addr,
                tok.len()
            );
            let mut buf = Vec::new();
            let h = http_roundtrip(&mut s, &mut buf, req.as_bytes())
                .await
                .map_err(|e| format!("publish: {e}"))?;
            if h.status >= 400 {
                return Err(format!("publish {p}: HTTP {}", h.status));
            }
        }
        let until = Instant::now() + o.wait;
        loop {
            let done = round.lock().unwrap().times.len() >= opened;
            if done || Instant::now() >= until {
                break;
            }
            sleep(Duration::from_millis(1)).await;
        }
        let times = {
            let mut st = round.lock().unwrap();
            st.armed = false;
            std::mem::take(&mut st.times)
        };
        if times.len() < opened {
            incomplete += 1;
            continue;
        }
        let first = *times.iter().min().unwrap();
        let last = *times.iter().max().unwrap();
        let from = if o.publish.is_some() { t_pub } else { first };
        fanouts.push(last.saturating_duration_since(from).as_secs_f64() * 1e3);
        spreads.push((last - first).as_secs_f64() * 1e3);
        sleep(Duration::from_millis(100)).await;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v.get(v.len() / 2).copied()
    };
    let server = o
        .server_pid
        .and_then(|p| proc_sample(p).ok())
        .map(|s| json!({"server_rss_kb": s.rss_kb, "server_threads": s.threads}))
        .unwrap_or(json!({}));
    let mut v = json!({
        "mode": "sse",
        "available": true,
        "subscribers": opened,
        "failed": failed,
        "publish": o.publish,
        "rounds": o.rounds,
        "incomplete_rounds": incomplete,
        "fanout_ms": fanouts.clone(),
        "fanout_median_ms": median(&mut fanouts.clone()),
        "spread_median_ms": median(&mut spreads),
    });
    extend(&mut v, server);
    Ok(v)
}

/// One SSE subscriber: records when it first sees a `data:` line (containing the round's token,
/// if any) in each armed round.
async fn subscriber(held: Held, round: Arc<Mutex<Round>>) {
    let Held::Sse(mut s, mut buf) = held else {
        return;
    };
    let mut seen = 0u64;
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if !line.starts_with(b"data:") {
                continue;
            }
            let mut st = round.lock().unwrap();
            if !st.armed || st.id == seen {
                continue;
            }
            let matches = match &st.token {
                Some(t) => std::str::from_utf8(&line).is_ok_and(|l| l.contains(t.as_str())),
                None => true,
            };
            if matches {
                seen = st.id;
                st.times.push(Instant::now());
            }
        }
        buf.reserve(1024);
        match s.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// `users` (the seed net-v-netpoll load tool): options.
#[derive(Clone, Debug)]
pub struct UsersOpts {
    pub host: SocketAddr,
    pub users: usize,
    pub duration: Duration,
    pub message: String,
    pub interval: Duration,
}

/// `users`: each user opens a TCP connection and sends `message` every `interval`, reading the
/// echo back; sent, received, failures and the average round trip.
pub async fn users(o: UsersOpts) -> Result<Value, String> {
    check_capacity(o.users, o.host)?;
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let rtt_ns = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + o.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for u in 0..o.users {
        let (sent, received, failures, rtt_ns) = (
            sent.clone(),
            received.clone(),
            failures.clone(),
            rtt_ns.clone(),
        );
        let o = o.clone();
        tasks.spawn(async move {
            let msg = o.message.as_bytes().to_vec();
            let mut back = vec![0u8; msg.len()];
            let mut k = u;
            let mut conn: Option<TcpStream> = None;
            let mut tick = tokio::time::interval(o.interval.max(Duration::from_micros(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if timeout_at(deadline, tick.tick()).await.is_err() {
                    break;
                }
                if conn.is_none() {
                    match timeout_at(deadline, connect(o.host, k)).await {
                        Err(_) => break,
                        Ok(Ok(s)) => conn = Some(s),
                        Ok(Err(_)) => {
                            failures.fetch_add(1, Relaxed);
                            continue;
                        }
                    }
                    k += o.users;
                }
                let s = conn.as_mut().unwrap();
                let t = Instant::now();
                if s.write_all(&msg).await.is_err() {
                    failures.fetch_add(1, Relaxed);
                    conn = None;
                    continue;
                }
                sent.fetch_add(1, Relaxed);
                match timeout(Duration::from_secs(5), s.read_exact(&mut back)).await {
                    Ok(Ok(_)) if back == msg => {
                        received.fetch_add(1, Relaxed);
                        rtt_ns.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                    }
                    _ => {
                        failures.fetch_add(1, Relaxed);
                        conn = None;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let rcv = received.load(Relaxed);
    let avg = Duration::from_nanos(rtt_ns.load(Relaxed).checked_div(rcv).unwrap_or(0));
    Ok(json!({
        "mode": "users",
        "users": o.users,
        "secs": o.duration.as_secs_f64(),
        "sent": sent.load(Relaxed),
        "received": rcv,
        "failures": failures.load(Relaxed),
        "avg_rtt_us": avg.as_secs_f64() * 1e6,
        "avg_rtt": fmt_duration(avg),
    }))
}
