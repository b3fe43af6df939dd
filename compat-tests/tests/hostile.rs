//! Hostile input, with hop's default settings only: a corpus of malformed requests compared
//! with plain hyper, slow and silent clients, running out of file descriptors, a churn soak of
//! plain requests and one of WebSockets, and a graceful shutdown (SIGTERM) under load.
//!
//! Nothing here raises a buffer, limit or timeout to make a test pass: servers are started with
//! the suite's `builder` (which only fixes 2 pollers and parks idle connections at once) or with
//! `hop::Server::builder()` untouched.
//!
//! The descriptor-exhaustion, soak and shutdown tests run the hop server in a child process
//! (this test binary re-executed with `HOP_HOSTILE_CHILD` set, running the ignored
//! `hostile_child_entry` test), so that its resource limit, CPU time, descriptors, memory and
//! signals are its own.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use compat_tests::{
    backend_tests, exchange, get_req, parse_response, start, wait_until, Backend, RawConn,
    IO_TIMEOUT,
};
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use hop::sse::{Event, Hub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as TMessage;

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/echo", post(|body: Bytes| async move { body }))
}

// ---------------------------------------------------------------------------------------------
// 1. Malformed HTTP corpus, compared with plain hyper.
// ---------------------------------------------------------------------------------------------

/// Starts the reference: hyper 1.x's own `http1` server connection with its default settings,
/// over tokio (hyper-util's `TokioIo`), serving the same axum `Router`.
async fn start_reference() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind reference");
    let addr = listener.local_addr().expect("local_addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let router = app();
            let svc = hyper::service::service_fn(move |req| {
                tower::ServiceExt::oneshot(router.clone(), req)
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// What a server made of one request (or batch): the statuses it answered, in order, and
/// whether it then closed the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    statuses: Vec<u16>,
    /// Closed (FIN or reset) after the responses; `false`: still open after the quiet wait.
    closed: bool,
    /// Bytes after the last parseable response (should be none).
    junk: usize,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let statuses: Vec<String> = self.statuses.iter().map(u16::to_string).collect();
        let statuses = if statuses.is_empty() {
            "-".to_string()
        } else {
            statuses.join(",")
        };
        let end = if self.closed { "close" } else { "OPEN" };
        write!(f, "{statuses} {end}")?;
        if self.junk > 0 {
            write!(f, " +{}B junk", self.junk)?;
        }
        Ok(())
    }
}

/// How long a connection may stay quiet before we call it "left open". Only a failing case
/// waits this long: every case in the corpus ends with the server closing the connection.
const QUIET: Duration = Duration::from_secs(15);

async fn outcome(addr: SocketAddr, request: &[u8]) -> Outcome {
    let (bytes, end) = exchange(addr, request, QUIET).await;
    let mut statuses = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        match parse_response(&bytes[pos..], false, end.closed()) {
            Ok(Some((res, used))) => {
                statuses.push(res.status);
                pos += used;
            }
            _ => break,
        }
    }
    Outcome {
        statuses,
        closed: end.closed(),
        junk: bytes.len() - pos,
    }
}

/// What the corpus expects of hyper (and so of hop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `ok` valid requests answered by the app first, then rejected: an automatic error
    /// status (400/413/414/431/501/505) or a close without answer, and the connection closed.
    Reject { ok: usize },
    /// hyper accepts it (lenient parsing): the app answers, then the connection closes
    /// (every accepted case asks for `Connection: close`).
    Accept,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

fn reject(name: &'static str, bytes: impl Into<Vec<u8>>) -> Case {
    Case {
        name,
        bytes: bytes.into(),
        expect: Expect::Reject { ok: 0 },
    }
}

fn accept(name: &'static str, bytes: impl Into<Vec<u8>>) -> Case {
    Case {
        name,
        bytes: bytes.into(),
        expect: Expect::Accept,
    }
}

/// A valid keep-alive GET, to put in front of a bad request on the same connection.
const VALID: &str = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";

fn corpus() -> Vec<Case> {
    let h = "Host: x\r\n";
    let post = |extra: &str, body: &str| format!("POST /echo HTTP/1.1\r\n{h}{extra}\r\n{body}");
    let chunked = |body: &str| post("Transfer-Encoding: chunked\r\n", body);
    let many_headers = |n: usize| -> String {
        let hs: String = (0..n).map(|i| format!("X-H{i}: v\r\n")).collect();
        get_req("/", &hs)
    };
    let mut tls_hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];
    tls_hello.extend((0..200u32).map(|i| (i * 37 % 256) as u8));
    // Deterministic binary noise (a small LCG), starting with a byte that is no method.
    let mut x: u32 = 0x2545_f491;
    let noise: Vec<u8> = std::iter::once(0x80)
        .chain((0..4096).map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (x >> 16) as u8
        }))
        .collect();

    vec![
        // Request line: method.
        reject("method with '@'", format!("G@T / HTTP/1.1\r\n{h}\r\n")),
        reject("method with NUL", b"GE\0T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        reject("method with 0xff", b"G\xffT / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        reject("empty method", format!(" / HTTP/1.1\r\n{h}\r\n")),
        // hyper takes any token as a method, however long.
        accept("method 64 KB long", format!("{} / HTTP/1.1\r\n{h}Connection: close\r\n\r\n", "A".repeat(64 * 1024))),
        accept("extension method BREW", format!("BREW / HTTP/1.1\r\n{h}Connection: close\r\n\r\n")),
        accept("lowercase method get", format!("get / HTTP/1.1\r\n{h}Connection: close\r\n\r\n")),
        // Request line: version.
        reject("version HTTP/2.0", format!("GET / HTTP/2.0\r\n{h}\r\n")),
        reject("version HTTP/1.2", format!("GET / HTTP/1.2\r\n{h}\r\n")),
        reject("version HTTP/3.0", format!("GET / HTTP/3.0\r\n{h}\r\n")),
        reject("version HTTP/0.9", format!("GET / HTTP/0.9\r\n{h}\r\n")),
        reject("version garbage HTTX/1.1", format!("GET / HTTX/1.1\r\n{h}\r\n")),
        reject("version lowercase http/1.1", format!("GET / http/1.1\r\n{h}\r\n")),
        reject("version missing (HTTP/0.9 style)", "GET /\r\n\r\n"),
        reject("text after version", format!("GET / HTTP/1.1 x\r\n{h}\r\n")),
        // (The HTTP/2 preface is no longer malformed: it starts HTTP/2, see http2.rs.)
        reject("HTTP/2 preface with a wrong byte", "PRI * HTTP/2.0\r\n\r\nSX\r\n\r\n"),
        reject("tabs as separators", format!("GET\t/\tHTTP/1.1\r\n{h}\r\n")),
        reject("not HTTP at all", "THIS IS NOT HTTP\r\n\r\n"),
        reject("TLS ClientHello", tls_hello),
        reject("binary noise 4 KB", noise),
        // Request target.
        reject("space in target", format!("GET /a b HTTP/1.1\r\n{h}\r\n")),
        reject("control bytes in target", b"GET /\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        reject("0xff in target", b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        reject("100 KB request line", format!("GET /{} HTTP/1.1\r\n{h}\r\n", "a".repeat(100 * 1024))),
        accept("absolute-form", "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"),
        accept("CONNECT authority-form", "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n"),
        accept("CONNECT with origin-form", format!("CONNECT / HTTP/1.1\r\n{h}Connection: close\r\n\r\n")),
        accept("OPTIONS *", format!("OPTIONS * HTTP/1.1\r\n{h}Connection: close\r\n\r\n")),
        // Header lines.
        reject("obs-fold", format!("GET / HTTP/1.1\r\n{h}X-A: a\r\n b\r\n\r\n")),
        reject("NUL in header value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec()),
        reject("bare CR in header value", format!("GET / HTTP/1.1\r\n{h}X-A: a\rb\r\n\r\n")),
        reject("bare CR line endings", "GET / HTTP/1.1\rHost: x\r\r"),
        accept("bare LF line endings", "GET / HTTP/1.1\nHost: x\nConnection: close\n\n"),
        accept("bare LF in headers only", "GET / HTTP/1.1\r\nHost: x\nConnection: close\n\n"),
        reject("space in header name", format!("GET / HTTP/1.1\r\n{h}X Foo: bar\r\n\r\n")),
        reject("space before colon", "GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
        reject("header without colon", format!("GET / HTTP/1.1\r\n{h}NoColon\r\n\r\n")),
        reject("empty header name", format!("GET / HTTP/1.1\r\n{h}: v\r\n\r\n")),
        reject("'<' in header name", format!("GET / HTTP/1.1\r\n{h}X<A>: v\r\n\r\n")),
        reject("DEL in header value", format!("GET / HTTP/1.1\r\n{h}X-A: a\x7fb\r\n\r\n")),
        reject("500 KB header", get_req("/", &format!("X-Big: {}\r\n", "a".repeat(500 * 1024)))),
        reject("101 headers", many_headers(101)),
        reject("2,000 headers", many_headers(2000)),
        // Framing.
        // hyper reads a body with both by Transfer-Encoding and closes the connection after
        // the response, so what follows is never read as a request (no smuggling).
        accept("CL and TE together", post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n")),
        accept(
            "CL and TE, smuggled GET after",
            post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", &format!("0\r\n\r\n{VALID}")),
        ),
        accept(
            "TE and CL (other order), smuggled GET",
            post("Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", &format!("0\r\n\r\n{VALID}")),
        ),
        reject("two different Content-Lengths", post("Content-Length: 1\r\nContent-Length: 2\r\n", "ab")),
        reject("Content-Length list 1, 2", post("Content-Length: 1, 2\r\n", "ab")),
        accept("two equal Content-Lengths", post("Content-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n", "ab")),
        reject("negative Content-Length", post("Content-Length: -1\r\n", "")),
        reject("Content-Length +5", post("Content-Length: +5\r\n", "hello")),
        reject("Content-Length not a number", post("Content-Length: abc\r\n", "")),
        reject("Content-Length over u64", post("Content-Length: 99999999999999999999999\r\n", "")),
        reject("Content-Length u64::MAX", post("Content-Length: 18446744073709551615\r\n", "")),
        reject("Transfer-Encoding gzip (not chunked)", post("Transfer-Encoding: gzip\r\n", "")),
        reject("Transfer-Encoding chunked, gzip", post("Transfer-Encoding: chunked, gzip\r\n", "")),
        reject("Transfer-Encoding in HTTP/1.0", "POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        reject("bad chunk size", chunked("zz\r\nhello\r\n0\r\n\r\n")),
        reject("chunk size overflow", chunked("fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n")),
        reject("negative chunk size", chunked("-5\r\nhello\r\n0\r\n\r\n")),
        reject("chunk data without CRLF", chunked("5\r\nhelloXX0\r\n\r\n")),
        reject("chunk extension 100 KB", chunked(&format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(100 * 1024)))),
        reject("1,000 chunk extensions of 100 B", chunked(&format!("1;{}\r\na\r\n", "e".repeat(100)).repeat(1000))),
        // Pipelined garbage after a valid request.
        Case {
            name: "valid request, then garbage",
            bytes: format!("{VALID}GARBAGE\r\n\r\n").into_bytes(),
            expect: Expect::Reject { ok: 1 },
        },
        Case {
            name: "valid request, then binary junk",
            bytes: [VALID.as_bytes(), b"\x00\x01\x02\xff\xfe\r\n\r\n"].concat(),
            expect: Expect::Reject { ok: 1 },
        },
        Case {
            name: "two valid requests, then HTTP/2.0",
            bytes: format!("{VALID}{VALID}GET / HTTP/2.0\r\n{h}\r\n").into_bytes(),
            expect: Expect::Reject { ok: 2 },
        },
        Case {
            name: "valid request, then 500 KB header",
            bytes: format!("{VALID}{}", get_req("/", &format!("X-Big: {}\r\n", "a".repeat(500 * 1024))))
                .into_bytes(),
            expect: Expect::Reject { ok: 1 },
        },
    ]
}

const ERROR_STATUSES: [u16; 6] = [400, 413, 414, 431, 501, 505];

/// Checks one case's outcomes; returns what is wrong, if anything.
fn judge(case: &Case, hop: &Outcome, reference: &Outcome) -> Option<String> {
    if hop != reference {
        return Some(format!("hop answered `{hop}`, hyper `{reference}`"));
    }
    if hop.junk > 0 {
        return Some(format!("{} bytes that are no response", hop.junk));
    }
    if !hop.closed {
        return Some("connection left open".into());
    }
    match case.expect {
        Expect::Reject { ok } => {
            let (first, rest) = hop.statuses.split_at(ok.min(hop.statuses.len()));
            if first.len() != ok || first.iter().any(|s| *s != 200) {
                return Some(format!("expected {ok} x 200 first"));
            }
            match rest {
                [] => None,
                [s] if ERROR_STATUSES.contains(s) => None,
                _ => Some(format!("expected one of {ERROR_STATUSES:?} or a close")),
            }
        }
        Expect::Accept => match hop.statuses[..] {
            [s] if s < 500 && !ERROR_STATUSES.contains(&s) => None,
            _ => Some("expected one answer from the app".into()),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers for slow clients.
// ---------------------------------------------------------------------------------------------

/// Sends `head` one byte every `every` (stopping when a write fails) while waiting up to
/// `within` for the server to close; returns when it closed (or `None`) and the bytes received.
async fn trickle(
    addr: SocketAddr,
    head: &'static [u8],
    every: Duration,
    within: Duration,
) -> (Option<Duration>, Vec<u8>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).ok();
    let t0 = Instant::now();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        for b in head {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
        wr
    });
    let (closed, bytes) = read_to_close(&mut rd, t0, within).await;
    writer.abort();
    (closed, bytes)
}

/// Reads until the peer closes (or `within` after `t0` runs out).
async fn read_to_close(
    rd: &mut (impl AsyncReadExt + Unpin),
    t0: Instant,
    within: Duration,
) -> (Option<Duration>, Vec<u8>) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = (t0 + within).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Err(_) => return (None, bytes),
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(t0.elapsed()), bytes),
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// A connection that sends nothing: when (if within `within`) the server closes it.
async fn silent(addr: SocketAddr, within: Duration) -> (Option<Duration>, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let t0 = Instant::now();
    read_to_close(&mut stream, t0, within).await
}

/// A connection that makes one keep-alive request, then sends nothing: when the server closes
/// it, counted from the response.
async fn idle_after_request(addr: SocketAddr, within: Duration) -> (Option<Duration>, Vec<u8>) {
    let mut conn = RawConn::connect(addr).await;
    let res = conn.roundtrip(get_req("/", "")).await;
    assert_eq!(res.status, 200);
    let t0 = Instant::now();
    let (end, bytes) = conn.wait_close(within).await;
    (end.closed().then(|| t0.elapsed()), bytes)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("not closed".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

// ---------------------------------------------------------------------------------------------
// Child processes: a hop server with its own resource limits.
// ---------------------------------------------------------------------------------------------

const CHILD_ENV: &str = "HOP_HOSTILE_CHILD";
const CHILD_BACKEND_ENV: &str = "HOP_HOSTILE_BACKEND";
const CHILD_ENTRY: &str = "hostile_child_entry";
const ADDR_PREFIX: &str = "HOP_HOSTILE_ADDR=";
/// The descriptor limit of the `emfile` child.
const CHILD_NOFILE: u64 = 64;

/// The child's side: only when `HOP_HOSTILE_CHILD` is set (by a parent test below), with the
/// backend from `HOP_HOSTILE_BACKEND` and hop's default settings. It prints its address and
/// serves, by mode:
/// - `plain`: `app()`, until stdin closes;
/// - `emfile`: the same, with `RLIMIT_NOFILE` lowered to 64 first;
/// - `ws`: [`ws_app`] (hop::ws and axum WebSocket echoes), until stdin closes;
/// - `graceful`: [`graceful_app`] (WebSocket, SSE, a large download) with
///   `with_graceful_shutdown(hop::shutdown_signal())`, until SIGTERM; then it prints its
///   counters (`HOP_HOSTILE_STOPPED=`) and returns, so the process exits 0.
#[test]
#[ignore = "the child process of the emfile, churn, soak and shutdown tests, which run it themselves"]
fn hostile_child_entry() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        // Run by `--include-ignored` rather than by a parent test: nothing to serve.
        eprintln!("hostile_child_entry: not a child ({CHILD_ENV} unset); nothing to do");
        return;
    };
    if mode == "emfile" {
        let lim = libc::rlimit {
            rlim_cur: CHILD_NOFILE as libc::rlim_t,
            rlim_max: CHILD_NOFILE as libc::rlim_t,
        };
        // SAFETY: setrlimit with a valid, initialized struct.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
    }
    let backend = match std::env::var(CHILD_BACKEND_ENV).as_deref() {
        Ok("tokio") => Backend::Tokio,
        _ => Backend::Reactor,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    // Stdin closes when the parent stops us (or dies). A graceful child is stopped by SIGTERM
    // only: exiting here is a failure for it.
    let on_stdin_close = if mode == "graceful" { 3 } else { 0 };
    // A `trim` line: give free heap memory back to the system (`malloc_trim`), so that the
    // parent's next RSS reading counts live memory rather than what the allocator keeps.
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            match line.as_deref() {
                Ok("trim") => {
                    // SAFETY: malloc_trim and mallinfo2 have no preconditions.
                    let info = unsafe {
                        libc::malloc_trim(0);
                        libc::mallinfo2()
                    };
                    // Live heap: bytes in allocated chunks, in arenas and mmapped.
                    println!("{TRIMMED}{}", info.uordblks + info.hblkhd);
                    std::io::stdout().flush().unwrap();
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        std::process::exit(on_stdin_close);
    });
    let builder = hop::Server::builder().backend(backend);
    let announce = || {
        println!("{ADDR_PREFIX}{addr}");
        std::io::stdout().flush().unwrap();
    };
    match mode.as_str() {
        "graceful" => {
            let serve = builder
                .serve(listener, graceful_app())
                .with_graceful_shutdown(hop::shutdown_signal());
            let handle = serve.handle();
            // The signals are caught from here on.
            announce();
            serve.run().expect("serve");
            let s = handle.stats();
            println!(
                "{STOPPED_PREFIX}accepted={} active={} drained={} forced={} panics={}",
                s.accepted, s.active, s.drained, s.forced, s.panics
            );
            std::io::stdout().flush().unwrap();
        }
        "ws" => {
            let serve = builder.serve(listener, ws_app());
            announce();
            serve.run().expect("serve");
        }
        _ => {
            let serve = builder.serve(listener, app());
            announce();
            serve.run().expect("serve");
        }
    }
}

const STOPPED_PREFIX: &str = "HOP_HOSTILE_STOPPED=";
const TRIMMED: &str = "HOP_HOSTILE_TRIMMED";

/// The `ws` child's app: `/ws` (hop::ws echo) and `/ws-axum` (axum `WebSocketUpgrade` echo).
fn ws_app() -> Router {
    Router::new()
        .route("/ws", get(compat_tests::ws_echo))
        .route("/ws-axum", get(compat_tests::axum_ws_echo))
}

/// Size of the `graceful` child's `/download` body.
const DOWNLOAD_SIZE: usize = 8 << 20;

/// The download body: a pattern that shows a misplaced or lost byte.
fn download_body() -> Vec<u8> {
    (0..DOWNLOAD_SIZE).map(|i| (i % 251) as u8).collect()
}

/// The `graceful` child's app: `/ws` (hop::ws echo), `/sse` (a hub subscription),
/// `/sse/hello` (sends `hello` to every subscriber, answers how many), `/download` (8 MiB of
/// one shared `Bytes`).
fn graceful_app() -> Router {
    let body = Bytes::from(download_body());
    Router::new()
        .route("/ws", get(compat_tests::ws_echo))
        .route(
            "/sse",
            get(|State(hub): State<Hub>, req: Request| async move {
                hub.subscribe(&req).into_response()
            }),
        )
        .route(
            "/sse/hello",
            get(|State(hub): State<Hub>| async move { hub.send(&Event::new("hello")).to_string() }),
        )
        .route(
            "/download",
            get(move || {
                let body = body.clone();
                async move { body }
            }),
        )
        .with_state(Hub::new())
}

/// A hop server in a child process; killed when dropped.
struct ChildServer {
    child: Child,
    addr: SocketAddr,
    /// What follows `HOP_HOSTILE_STOPPED=` in the child's output, when it prints it.
    stopped: std::sync::mpsc::Receiver<String>,
    /// One message per `HOP_HOSTILE_TRIMMED` the child prints.
    trimmed: std::sync::mpsc::Receiver<u64>,
}

impl ChildServer {
    fn spawn(mode: &str, backend: Backend) -> ChildServer {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .args([
                CHILD_ENTRY,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, mode)
            .env(
                CHILD_BACKEND_ENV,
                match backend {
                    Backend::Tokio => "tokio",
                    _ => "reactor",
                },
            )
            .env_remove("HOP_BACKEND")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let (trimmed_tx, trimmed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest prints `test name ... ` before it, on the same line.
                if let Some(i) = line.find(ADDR_PREFIX) {
                    let a = line[i + ADDR_PREFIX.len()..].trim();
                    let _ = tx.send(a.parse::<SocketAddr>().expect("child address"));
                }
                if let Some(i) = line.find(TRIMMED) {
                    let live = line[i + TRIMMED.len()..].trim().parse::<u64>().unwrap_or(0);
                    let _ = trimmed_tx.send(live);
                }
                if let Some(i) = line.find(STOPPED_PREFIX) {
                    let _ = stopped_tx.send(line[i + STOPPED_PREFIX.len()..].trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child printed no address");
        ChildServer {
            child,
            addr,
            stopped,
            trimmed,
        }
    }

    /// Resident memory after the child gave its free heap memory back (`malloc_trim`), and
    /// its live heap (`mallinfo2`: bytes in allocated chunks). glibc cannot trim the top of a
    /// thread's arena, so freed memory that ends up there stays resident: the live heap is
    /// what a leak would grow.
    fn trimmed_rss(&mut self) -> (u64, u64) {
        let stdin = self.child.stdin.as_mut().expect("child stdin");
        stdin.write_all(b"trim\n").expect("write to the child");
        stdin.flush().expect("flush");
        let live = self
            .trimmed
            .recv_timeout(Duration::from_secs(20))
            .expect("the child did not trim");
        (self.rss(), live)
    }

    /// Sends it `signal`.
    fn kill(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).unwrap();
        // SAFETY: kill(2) on our own child, which cannot have been reaped: we hold its handle
        // and reap it only in `try_wait` and `Drop`.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill failed");
    }

    /// Its exit status, if it has exited.
    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open descriptors (`/proc/PID/fd`).
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// CPU time used so far (user + system, all threads).
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// Resident memory (`VmRSS`).
    fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    /// Closes its stdin (it exits) and waits for it.
    fn stop(mut self) {
        drop(self.child.stdin.take());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("child did not exit after its stdin closed");
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One `Connection: close` GET on a new connection, read to the server's close; the status.
async fn close_request(addr: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::with_capacity(256);
    stream.read_to_end(&mut buf).await?;
    match parse_response(&buf, false, true) {
        Ok(Some((res, _))) => Ok(res.status),
        _ => Err(std::io::Error::other(format!(
            "bad response {:?}",
            String::from_utf8_lossy(&buf)
        ))),
    }
}

/// Retries [`close_request`] until it gets a 200 (or `within` runs out).
async fn serves_again(addr: SocketAddr, within: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if let Ok(Ok(200)) = tokio::time::timeout(IO_TIMEOUT, close_request(addr)).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Runs `total` [`close_request`]s with `workers` concurrent clients; panics on any failure.
async fn churn(addr: SocketAddr, total: usize, workers: usize) {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    let status = tokio::time::timeout(IO_TIMEOUT, close_request(addr))
                        .await
                        .expect("churn request timed out")
                        .expect("churn request");
                    assert_eq!(status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("churn worker");
    }
}

backend_tests! {
    async fn malformed_corpus_matches_hyper(backend) {
        let srv = start(backend, app(), |b| b);
        let reference = start_reference().await;
        let cases = corpus();
        assert!(cases.len() >= 40, "{} cases", cases.len());
        // Every case on a fresh connection to each server, all at once.
        let results = join_all(cases.iter().map(|c| async {
            tokio::join!(outcome(srv.addr, &c.bytes), outcome(reference, &c.bytes))
        }))
        .await;
        let mut failures = Vec::new();
        eprintln!("[{backend}] {:<38} {:<16} {:<16} verdict", "case", "hop", "hyper");
        for (case, (hop, reference)) in cases.iter().zip(&results) {
            let verdict = judge(case, hop, reference);
            eprintln!(
                "[{backend}] {:<38} {:<16} {:<16} {}",
                case.name,
                hop.to_string(),
                reference.to_string(),
                verdict.as_deref().unwrap_or("ok")
            );
            if let Some(v) = verdict {
                failures.push(format!("{}: {v}", case.name));
            }
        }
        assert!(failures.is_empty(), "[{backend}] {} case(s) failed:\n{}", failures.len(), failures.join("\n"));

        // The server still serves, and every hostile connection is gone.
        let mut conn = RawConn::connect(srv.addr).await;
        assert_eq!(conn.roundtrip(get_req("/", "")).await.text(), "hello");
        drop(conn);
        let handle = srv.handle.clone();
        assert!(wait_until(IO_TIMEOUT, || handle.stats().active == 0).await, "{:?}", handle.stats());
    }

    async fn slow_and_silent_clients(backend) {
        // Two servers: the suite's builder (parks idle connections at once) and hop's
        // untouched defaults (parks after 250 ms). Every client runs at once.
        let srv = start(backend, app(), |b| b);
        let dflt = start(backend, app(), |_| hop::Server::builder().backend(backend));
        const HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slowloris: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let every = Duration::from_secs(3);
        let within = Duration::from_secs(100);
        let (loris, loris_dflt, quiet, quiet_dflt, idle, idle_dflt) = tokio::join!(
            trickle(srv.addr, HEAD, every, within),
            trickle(dflt.addr, HEAD, every, within),
            silent(srv.addr, within),
            silent(dflt.addr, within),
            idle_after_request(srv.addr, within),
            idle_after_request(dflt.addr, within),
        );
        for (what, (t, bytes)) in [
            ("slowloris, suite builder", &loris),
            ("slowloris, defaults", &loris_dflt),
            ("silent, suite builder", &quiet),
            ("silent, defaults", &quiet_dflt),
            ("idle after a request, suite builder", &idle),
            ("idle after a request, defaults", &idle_dflt),
        ] {
            eprintln!("[{backend}] {what:<38} closed after {} ({} bytes)", secs(*t), bytes.len());
            assert!(bytes.is_empty(), "[{backend}] {what}: got {:?}", String::from_utf8_lossy(bytes));
        }
        // Slowloris: closed by the default header read timeout (30 s from the first byte),
        // however the bytes trickle in.
        for (what, (t, _)) in [("slowloris", &loris), ("slowloris, defaults", &loris_dflt)] {
            let t = t.unwrap_or_else(|| panic!("[{backend}] {what}: not closed within {within:?}"));
            assert!(t >= Duration::from_secs(29) && t < Duration::from_secs(45), "[{backend}] {what}: closed after {t:?}");
        }
        // A connection that never sends a byte is waiting for its first request head: both
        // backends close it at the header read timeout (30 s).
        for (what, (t, _)) in [("silent", &quiet), ("silent, defaults", &quiet_dflt)] {
            let t = t.unwrap_or_else(|| panic!("[{backend}] {what}: not closed within {within:?}"));
            assert!(
                t >= Duration::from_secs(29) && t < Duration::from_secs(45),
                "[{backend}] {what}: closed after {t:?}, expected the 30 s header timeout"
            );
        }
        // A keep-alive connection idle after one request:
        // - reactor: closed by the idle timeout, 60 s (default `idle_timeout`);
        // - tokio backend: closed after 30 s, because hyper arms its header read timer as soon
        //   as it waits for a request head (between requests too), and hop gives it
        //   min(header_read_timeout, idle_timeout) = 30 s.
        // The backends differ here; the tokio side is README's "Differences from axum::serve".
        let (lo, hi) = match backend {
            Backend::Reactor => (Duration::from_secs(59), Duration::from_secs(80)),
            Backend::Tokio => (Duration::from_secs(29), Duration::from_secs(45)),
        };
        for (what, (t, _)) in [
            ("idle after a request", &idle),
            ("idle after a request, defaults", &idle_dflt),
        ] {
            let t = t.unwrap_or_else(|| panic!("[{backend}] {what}: not closed within {within:?}"));
            assert!(t >= lo && t < hi, "[{backend}] {what}: closed after {t:?}, expected {lo:?}..{hi:?}");
        }
        // Both servers still serve.
        for addr in [srv.addr, dflt.addr] {
            let mut conn = RawConn::connect(addr).await;
            assert_eq!(conn.roundtrip(get_req("/", "")).await.text(), "hello");
        }
    }

    async fn emfile_flood_does_not_spin(backend) {
        // The server runs in a child with RLIMIT_NOFILE 64; we hold 200 connections to it,
        // each with a request sent, so it runs out of descriptors with more waiting.
        let child = ChildServer::spawn("emfile", backend);
        let addr = child.addr;
        assert!(serves_again(addr, IO_TIMEOUT).await, "[{backend}] child does not serve");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base_fds = child.fds();

        let mut flood = Vec::new();
        for _ in 0..FLOOD {
            let mut s = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
                .await
                .expect("connect timed out")
                .expect("connect");
            s.write_all(get_req("/", "").as_bytes()).await.expect("write");
            flood.push(s);
        }
        // Let the server take what it can, then watch it for 2 s.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let flood_fds = child.fds();
        let (cpu0, t0) = (child.cpu(), Instant::now());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (cpu, wall) = (child.cpu() - cpu0, t0.elapsed());
        let share = cpu.as_secs_f64() / wall.as_secs_f64();
        let flood_fds_after = child.fds();

        drop(flood);
        let t_release = Instant::now();
        assert!(serves_again(addr, Duration::from_secs(30)).await, "[{backend}] not serving after the flood");
        let served_after = t_release.elapsed();
        let back = wait_until(Duration::from_secs(30), || child.fds() <= base_fds).await;
        let end_fds = child.fds();
        eprintln!(
            "[{backend}] EMFILE: limit {CHILD_NOFILE}, {FLOOD} connections held; fds: baseline {base_fds}, \
             during the flood {flood_fds} / {flood_fds_after}, after release {end_fds}; \
             CPU during 2 s of flood {:.0} ms over {:.2} s = {:.1}% of one CPU; \
             served again {:.2} s after release",
            cpu.as_secs_f64() * 1000.0,
            wall.as_secs_f64(),
            share * 100.0,
            served_after.as_secs_f64()
        );
        assert!(flood_fds_after as u64 >= CHILD_NOFILE - 8, "[{backend}] the flood did not exhaust descriptors: {flood_fds_after}");
        assert!(share < 0.30, "[{backend}] server spins at EMFILE: {:.1}% of a CPU", share * 100.0);
        assert!(back, "[{backend}] descriptors not back to {base_fds}: {end_fds}");
        child.stop();
    }

    async fn churn_soak_fds_and_rss(backend) {
        // 5,000 warm-up and then 100,000 `Connection: close` requests, 4 at a time, against a
        // default hop server in a child process (so that its memory and descriptors are its own).
        let child = ChildServer::spawn("plain", backend);
        let addr = child.addr;
        let t = Instant::now();
        churn(addr, WARMUP, CHURN_WORKERS).await;
        let warm_time = t.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (base_fds, base_rss) = (child.fds(), child.rss());

        let t = Instant::now();
        churn(addr, SOAK, CHURN_WORKERS).await;
        let soak_time = t.elapsed();
        let back = wait_until(Duration::from_secs(30), || child.fds() <= base_fds).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (end_fds, end_rss) = (child.fds(), child.rss());
        let growth = end_rss as i64 - base_rss as i64;
        eprintln!(
            "[{backend}] churn: warm-up {WARMUP} in {:.1} s, soak {SOAK} in {:.1} s ({:.0}/s); \
             fds {base_fds} -> {end_fds}; RSS {} KB -> {} KB ({:+} KB)",
            warm_time.as_secs_f64(),
            soak_time.as_secs_f64(),
            SOAK as f64 / soak_time.as_secs_f64(),
            base_rss / 1024,
            end_rss / 1024,
            growth / 1024
        );
        assert!(back, "[{backend}] descriptors not back to {base_fds}: {end_fds}");
        assert!(growth < RSS_BOUND, "[{backend}] RSS grew by {growth} bytes over {SOAK} connections");
        assert!(serves_again(addr, IO_TIMEOUT).await);
        child.stop();
    }
}

/// Connections held open against the `emfile` child (limit [`CHILD_NOFILE`]).
const FLOOD: usize = 200;
const WARMUP: usize = 5_000;
const SOAK: usize = 100_000;
const CHURN_WORKERS: usize = 4;
/// RSS growth allowed over the soak: 4 MB, i.e. a leak of 40 bytes per connection fails it.
/// Measured on a 2-core VM: +12 KB (reactor) and +16 KB (tokio backend); the warm-up has
/// already grown the allocator's arenas and hop's slabs to their working size.
const RSS_BOUND: i64 = 4 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Graceful shutdown under load, and a WebSocket churn soak (children `graceful` and `ws`).
// ---------------------------------------------------------------------------------------------

type WsClient = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Handshakes in flight at once while opening many connections (well under the default
/// listen backlog of 1024).
const CONNECT_AT_ONCE: usize = 64;

/// Opens a WebSocket on `path` with tokio-tungstenite and checks one echo.
async fn ws_open(addr: SocketAddr, path: &'static str, n: usize) -> WsClient {
    let (mut ws, _) = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_tungstenite::connect_async(format!("ws://{addr}{path}")),
    )
    .await
    .expect("WebSocket handshake timed out")
    .expect("WebSocket handshake");
    let text = format!("echo {n}");
    ws.send(TMessage::text(text.clone())).await.expect("send");
    match tokio::time::timeout(IO_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(TMessage::Text(t)))) if t.as_str() == text => {}
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
    ws
}

/// Opens WebSockets numbered `range` on `path`, [`CONNECT_AT_ONCE`] handshakes at a time.
async fn ws_open_many(
    addr: SocketAddr,
    path: &'static str,
    range: std::ops::Range<usize>,
) -> Vec<WsClient> {
    futures_util::stream::iter(range)
        .map(|n| ws_open(addr, path, n))
        .buffer_unordered(CONNECT_AT_ONCE)
        .collect()
        .await
}

/// Closes politely: a close frame, then the server's close frame, then EOF.
async fn ws_close_politely(mut ws: WsClient) {
    tokio::time::timeout(IO_TIMEOUT, async {
        ws.close(None).await.expect("send the close frame");
        match ws.next().await {
            Some(Ok(TMessage::Close(_))) => {}
            other => panic!("expected the server's close frame, got {other:?}"),
        }
        match ws.next().await {
            None => {}
            other => panic!("expected EOF after the close handshake, got {other:?}"),
        }
    })
    .await
    .expect("close handshake timed out");
}

/// After the shutdown signal: the server's 1001 close frame (when it came), then EOF (the client
/// answers the close by itself).
async fn ws_await_shutdown(mut ws: WsClient, within: Duration) -> Result<Instant, String> {
    let t0 = Instant::now();
    let left = || within.saturating_sub(t0.elapsed());
    let closed_at = match tokio::time::timeout(left(), ws.next()).await {
        Ok(Some(Ok(TMessage::Close(Some(f))))) if f.code == CloseCode::Away => Instant::now(),
        Ok(other) => return Err(format!("expected a 1001 close frame, got {other:?}")),
        Err(_) => return Err("no close frame".into()),
    };
    match tokio::time::timeout(left(), ws.next()).await {
        Ok(None) => Ok(closed_at),
        Ok(other) => Err(format!("expected EOF after the close frame, got {other:?}")),
        Err(_) => Err("no EOF after the close frame".into()),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads a response head (and what came after it) off `stream`.
async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            return (head, buf[end + 4..].to_vec());
        }
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut chunk))
            .await
            .expect("response head timed out")
            .expect("read the response head");
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Decodes a whole chunked body, which must end with the last chunk `0\r\n\r\n` and nothing
/// after it.
fn decode_chunked(mut buf: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = find(buf, b"\r\n").ok_or("cut off in a chunk size line (no last chunk)")?;
        let line = std::str::from_utf8(&buf[..eol]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {line:?}: {e}"))?;
        buf = &buf[eol + 2..];
        if size == 0 {
            if buf != b"\r\n" {
                return Err(format!(
                    "after the last chunk: {:?}",
                    String::from_utf8_lossy(buf)
                ));
            }
            return Ok(out);
        }
        if buf.len() < size + 2 {
            return Err("cut off in a chunk (no last chunk)".into());
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        out.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

/// An SSE subscriber on a raw connection.
struct SseClient {
    stream: TcpStream,
    /// The chunked body so far.
    body: Vec<u8>,
}

/// Subscribes on `/sse` and reads the response head.
async fn sse_open(addr: SocketAddr) -> SseClient {
    let mut stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    stream
        .write_all(b"GET /sse HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_head(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    SseClient { stream, body }
}

/// Reads until the first `hello` event has arrived.
async fn sse_await_hello(c: &mut SseClient) {
    let mut chunk = [0u8; 4096];
    while find(&c.body, b"data: hello\n\n").is_none() {
        let n = tokio::time::timeout(IO_TIMEOUT, c.stream.read(&mut chunk))
            .await
            .expect("first event timed out")
            .expect("read the first event");
        assert!(n > 0, "closed before the first event");
        c.body.extend_from_slice(&chunk[..n]);
    }
}

/// Asks the child to send `hello` to every SSE subscriber; how many it reached.
async fn sse_hello(addr: SocketAddr) -> usize {
    let mut conn = RawConn::connect(addr).await;
    let res = conn
        .roundtrip(get_req("/sse/hello", "Connection: close\r\n"))
        .await;
    assert_eq!(res.status, 200);
    res.text().parse().expect("a count")
}

/// After the shutdown signal: reads the stream to EOF (a reset fails), then checks that it is a
/// whole chunked body of `hello` events.
async fn sse_await_shutdown(mut c: SseClient, within: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(
            within.saturating_sub(t0.elapsed()),
            c.stream.read(&mut chunk),
        )
        .await
        {
            Err(_) => return Err("no EOF".into()),
            Ok(Err(e)) => return Err(format!("read failed: {e}")),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => c.body.extend_from_slice(&chunk[..n]),
        }
    }
    let raw = || String::from_utf8_lossy(&c.body).into_owned();
    let events = decode_chunked(&c.body).map_err(|e| format!("{e}; body {:?}", raw()))?;
    let hellos = events.len() / b"data: hello\n\n".len();
    if hellos == 0 || events != b"data: hello\n\n".repeat(hellos) {
        return Err(format!(
            "events {:?} (body {:?})",
            String::from_utf8_lossy(&events),
            raw()
        ));
    }
    Ok(())
}

/// How long a slow download takes, reading at a steady rate.
const DOWNLOAD_TIME: Duration = Duration::from_secs(4);
/// What a slow download reads at a time; also its receive buffer, so that the server cannot
/// hand most of the body to the kernel and be done with it.
const DOWNLOAD_READ: usize = 64 * 1024;

/// GETs `/download` and reads the body at `DOWNLOAD_SIZE / DOWNLOAD_TIME` bytes a second,
/// checking every byte against `expected` and publishing its progress; then expects EOF.
/// Returns when the EOF came.
async fn slow_download(
    addr: SocketAddr,
    expected: Arc<Vec<u8>>,
    progress: Arc<AtomicUsize>,
    within: Duration,
) -> Result<Instant, String> {
    let t0 = Instant::now();
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.set_recv_buffer_size(DOWNLOAD_READ as u32)
        .map_err(|e| e.to_string())?;
    let mut s = sock.connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET /download HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let (head, first) = read_head(&mut s).await;
    if !head.starts_with("http/1.1 200")
        || !head.contains(&format!("content-length: {DOWNLOAD_SIZE}"))
    {
        return Err(format!("head {head:?}"));
    }
    if first[..] != expected[..first.len()] {
        return Err("wrong bytes at the start".into());
    }
    let mut got = first.len();
    progress.store(got, Ordering::Relaxed);
    let start = tokio::time::Instant::now();
    let mut buf = vec![0u8; DOWNLOAD_READ];
    while got < DOWNLOAD_SIZE {
        tokio::time::sleep_until(start + DOWNLOAD_TIME.mul_f64(got as f64 / DOWNLOAD_SIZE as f64))
            .await;
        let want = DOWNLOAD_READ.min(DOWNLOAD_SIZE - got);
        let left = within.saturating_sub(t0.elapsed());
        let n = match tokio::time::timeout(left, s.read(&mut buf[..want])).await {
            Err(_) => return Err(format!("stalled after {got} bytes")),
            Ok(Err(e)) => return Err(format!("read failed after {got} bytes: {e}")),
            Ok(Ok(0)) => return Err(format!("EOF after {got} of {DOWNLOAD_SIZE} bytes")),
            Ok(Ok(n)) => n,
        };
        if buf[..n] != expected[got..got + n] {
            return Err(format!("wrong bytes at {got}"));
        }
        got += n;
        progress.store(got, Ordering::Relaxed);
    }
    match tokio::time::timeout(within.saturating_sub(t0.elapsed()), s.read(&mut buf)).await {
        Ok(Ok(0)) => Ok(Instant::now()),
        Ok(Ok(n)) => Err(format!("{n} bytes after the body")),
        Ok(Err(e)) => Err(format!("after the body: {e}")),
        Err(_) => Err("no EOF after the body".into()),
    }
}

/// Like `wait_until`, with an async condition.
async fn wait_until_async<F: std::future::Future<Output = bool>>(
    within: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let t0 = Instant::now();
    loop {
        if cond().await {
            return true;
        }
        if t0.elapsed() >= within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The child's descriptor count once it has stayed the same for a second (up to 20 s).
async fn settled_fds(child: &ChildServer) -> usize {
    let t0 = Instant::now();
    let mut last = child.fds();
    let mut same_since = Instant::now();
    while same_since.elapsed() < Duration::from_secs(1) && t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = child.fds();
        if now != last {
            last = now;
            same_since = Instant::now();
        }
    }
    last
}

/// `total` WebSockets on `path`, [`CHURN_AT_ONCE`] open together, each doing one echo; then
/// half of each batch closed politely and half dropped (TCP close without a close frame).
/// Returns the most descriptors the child had with a batch open.
async fn ws_churn(child: &ChildServer, path: &'static str, total: usize) -> usize {
    let mut peak = 0;
    for first in (0..total).step_by(CHURN_AT_ONCE) {
        let open = ws_open_many(child.addr, path, first..(first + CHURN_AT_ONCE).min(total)).await;
        peak = peak.max(child.fds());
        join_all(open.into_iter().enumerate().map(|(i, ws)| async move {
            if i % 2 == 0 {
                ws_close_politely(ws).await;
            } else {
                drop(ws);
            }
        }))
        .await;
    }
    peak
}

/// The WebSocket churn soak on `path` of a `ws` child: a warm-up of [`WS_WARMUP`], the
/// baseline (descriptors once settled, RSS after `malloc_trim`), [`WS_SOAK`] more, then the
/// descriptors must come back to the baseline within 10 s and RSS stay within
/// [`WS_RSS_BOUND`].
async fn ws_churn_soak(backend: Backend, path: &'static str) {
    let mut child = ChildServer::spawn("ws", backend);
    let t = Instant::now();
    ws_churn(&child, path, WS_WARMUP).await;
    let warm_time = t.elapsed();
    let base_fds = settled_fds(&child).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_rss = child.rss();
    let (base_trimmed, base_live) = child.trimmed_rss();

    let t = Instant::now();
    let peak = ws_churn(&child, path, WS_SOAK).await;
    let soak_time = t.elapsed();
    let t = Instant::now();
    let back = wait_until(Duration::from_secs(10), || child.fds() <= base_fds).await;
    let back_after = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (end_fds, end_rss) = (child.fds(), child.rss());
    let (end_trimmed, end_live) = child.trimmed_rss();
    let growth = end_live as i64 - base_live as i64;
    eprintln!(
        "[{backend}] {path} churn: warm-up {WS_WARMUP} in {:.1} s, soak {WS_SOAK} in {:.1} s \
         ({:.0}/s, {CHURN_AT_ONCE} open at a time, half closed politely, half dropped); \
         fds {base_fds} -> peak {peak} -> {end_fds}, back after {:.2} s; \
         RSS {} KB -> {} KB ({:+} KB); after malloc_trim {} KB -> {} KB ({:+} KB); \
         live heap {} KB -> {} KB ({:+} KB)",
        warm_time.as_secs_f64(),
        soak_time.as_secs_f64(),
        WS_SOAK as f64 / soak_time.as_secs_f64(),
        back_after.as_secs_f64(),
        base_rss / 1024,
        end_rss / 1024,
        (end_rss as i64 - base_rss as i64) / 1024,
        base_trimmed / 1024,
        end_trimmed / 1024,
        (end_trimmed as i64 - base_trimmed as i64) / 1024,
        base_live / 1024,
        end_live / 1024,
        growth / 1024
    );
    assert!(
        peak >= base_fds + CHURN_AT_ONCE,
        "[{backend}] {path}: the batches were not open at once (peak {peak})"
    );
    assert!(
        back,
        "[{backend}] {path}: descriptors not back to {base_fds} within 10 s: {end_fds}"
    );
    assert!(
        growth < WS_RSS_BOUND,
        "[{backend}] {path}: the live heap grew by {growth} bytes over {WS_SOAK} WebSockets"
    );
    child.stop();
}

/// Parent-side limits of the graceful-shutdown test.
const LOAD_WS: usize = 1_000;
const LOAD_SSE: usize = 1_000;
const LOAD_DOWNLOADS: usize = 10;
/// How long the client side waits for anything after the signal.
const AFTER_SIGNAL: Duration = Duration::from_secs(40);
/// The child must exit this soon after SIGTERM: the slow downloads take about 4 s, every
/// WebSocket and SSE client closes at once, and the drain timeout (30 s, the default) is not
/// reached. Room for a loaded 2-core machine.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

/// Two batches of [`CHURN_AT_ONCE`]: with one, the tokio backend's `/ws` still grew by about
/// 2.2 MB over the soak (and by as much over 25,000), i.e. the warm-up had not reached the
/// working size; with two it grows by under 1 MB.
const WS_WARMUP: usize = 1_000;
const WS_SOAK: usize = 5_000;
const CHURN_AT_ONCE: usize = 500;

backend_tests! {
    async fn graceful_shutdown_under_load(backend) {
        let mut child = ChildServer::spawn("graceful", backend);
        let addr = child.addr;
        let t = Instant::now();
        let ws = ws_open_many(addr, "/ws", 0..LOAD_WS).await;
        let sse: Vec<SseClient> = futures_util::stream::iter(0..LOAD_SSE)
            .map(|_| sse_open(addr))
            .buffer_unordered(CONNECT_AT_ONCE)
            .collect()
            .await;
        // Every subscriber has joined the hub and received an event.
        let joined = wait_until_async(IO_TIMEOUT, || async { sse_hello(addr).await == LOAD_SSE }).await;
        assert!(joined, "[{backend}] not all {LOAD_SSE} subscribers joined the hub");
        let mut sse = sse;
        join_all(sse.iter_mut().map(sse_await_hello)).await;
        let opened = t.elapsed();
        let ws_tasks: Vec<_> =
            ws.into_iter().map(|ws| tokio::spawn(ws_await_shutdown(ws, AFTER_SIGNAL))).collect();
        let sse_tasks: Vec<_> =
            sse.into_iter().map(|c| tokio::spawn(sse_await_shutdown(c, AFTER_SIGNAL))).collect();

        // Slow downloads, started just before the signal: each has its first 256 KiB.
        let expected = Arc::new(download_body());
        let progress: Vec<Arc<AtomicUsize>> =
            (0..LOAD_DOWNLOADS).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let dl_tasks: Vec<_> = progress
            .iter()
            .map(|p| tokio::spawn(slow_download(addr, expected.clone(), p.clone(), AFTER_SIGNAL)))
            .collect();
        let started = wait_until(IO_TIMEOUT, || {
            progress.iter().all(|p| p.load(Ordering::Relaxed) >= 256 * 1024)
        })
        .await;
        assert!(started, "[{backend}] the downloads did not start");
        let fds_loaded = child.fds();
        let at_signal: Vec<usize> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();

        child.kill(libc::SIGTERM);
        let sent = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait() {
                break Some(status);
            }
            if sent.elapsed() > AFTER_SIGNAL {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let exited = sent.elapsed();
        let stopped = child.stopped.recv_timeout(Duration::from_secs(5)).ok();

        let mut failures = Vec::new();
        let mut last_close = Duration::ZERO;
        for (i, t) in ws_tasks.into_iter().enumerate() {
            match t.await.expect("ws task") {
                Ok(at) => last_close = last_close.max(at.saturating_duration_since(sent)),
                Err(e) => failures.push(format!("WebSocket {i}: {e}")),
            }
        }
        let ws_ok = LOAD_WS - failures.len();
        let mut sse_ok = 0;
        for (i, t) in sse_tasks.into_iter().enumerate() {
            match t.await.expect("sse task") {
                Ok(()) => sse_ok += 1,
                Err(e) => failures.push(format!("SSE {i}: {e}")),
            }
        }
        let mut last_download = Duration::ZERO;
        let mut dl_ok = 0;
        for (i, t) in dl_tasks.into_iter().enumerate() {
            match t.await.expect("download task") {
                Ok(at) => {
                    dl_ok += 1;
                    last_download = last_download.max(at.saturating_duration_since(sent));
                }
                Err(e) => failures.push(format!("download {i}: {e}")),
            }
        }
        eprintln!(
            "[{backend}] graceful shutdown: {LOAD_WS} WebSockets and {LOAD_SSE} SSE streams opened \
             in {:.1} s; child fds {fds_loaded}; downloads at the signal {}..{} KiB of {} KiB; \
             SIGTERM -> exit {:?} after {:.2} s ({stopped:?}); last 1001 close frame after {:.2} s, \
             last download done after {:.2} s; ok: {ws_ok}/{LOAD_WS} WebSockets (1001 + EOF), \
             {sse_ok}/{LOAD_SSE} SSE (0\\r\\n\\r\\n + EOF), {dl_ok}/{LOAD_DOWNLOADS} downloads (all bytes + EOF)",
            opened.as_secs_f64(),
            at_signal.iter().min().unwrap() / 1024,
            at_signal.iter().max().unwrap() / 1024,
            DOWNLOAD_SIZE / 1024,
            status,
            exited.as_secs_f64(),
            last_close.as_secs_f64(),
            last_download.as_secs_f64(),
        );
        let shown: Vec<&String> = failures.iter().take(20).collect();
        assert!(failures.is_empty(), "[{backend}] {} client(s) failed, first ones:\n{shown:#?}", failures.len());
        let status = status.unwrap_or_else(|| panic!("[{backend}] the child did not exit"));
        assert!(status.success(), "[{backend}] the child exited with {status}");
        assert!(exited < EXIT_WITHIN, "[{backend}] the child took {exited:?} to exit");
        let stopped = stopped.unwrap_or_else(|| panic!("[{backend}] the child printed no counters"));
        assert!(
            stopped.contains(" active=0 ") && stopped.contains(" forced=0 "),
            "[{backend}] connections left or force-closed: {stopped}"
        );
        // Every WebSocket, subscriber and download open at the signal closed by itself and is
        // counted as drained (the tokio backend counts hijacked WebSockets too).
        let drained: u64 = stopped
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("drained="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            drained >= 2010,
            "[{backend}] {drained} connections counted as drained, expected 2,010: {stopped}"
        );
        // The downloads were in flight at the signal: the drain waited for them.
        assert!(
            at_signal.iter().all(|&n| n < DOWNLOAD_SIZE / 2),
            "[{backend}] the downloads were too far along at the signal: {at_signal:?}"
        );
    }

    async fn ws_churn_soak_hop_ws(backend) {
        ws_churn_soak(backend, "/ws").await;
    }

    async fn ws_churn_soak_axum_ws(backend) {
        ws_churn_soak(backend, "/ws-axum").await;
    }
}

/// Live-heap growth (`mallinfo2` in the child, after `malloc_trim`) allowed over a WebSocket
/// soak of 5,000 connections: 4 MB, i.e. a leak of about 840 bytes per connection fails it.
///
/// RSS is printed beside it but not asserted: glibc cannot trim the top chunk of a thread's
/// arena, so on the reactor's `/ws-axum` (tungstenite's 128 KiB read buffers, all allocated
/// and freed on the one compat worker) about 1 run in 4 kept ~62 MB resident after the trim,
/// while the live heap was back where it was.
const WS_RSS_BOUND: i64 = 4 * 1024 * 1024;
