//! Shared pieces: connecting from spread source addresses, file limits, /proc sampling,
//! histograms, durations, a minimal HTTP/1.1 response reader.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Source addresses used for loopback targets: 127.0.0.2 ..= 127.0.0.254 (253 of them), so that
/// each source address needs only N/253 ephemeral ports.
pub const SOURCE_ADDRS: usize = 253;

/// The `i`-th source address.
pub fn source_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCE_ADDRS) as u8)
}

/// Connects to `addr`; when it is an IPv4 loopback address, from the source address
/// [`source_ip`]`(i)`. TCP_NODELAY is set.
pub async fn connect(addr: SocketAddr, i: usize) -> io::Result<TcpStream> {
    let stream = match addr {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => {
            let sock = TcpSocket::new_v4()?;
            sock.set_reuseaddr(true)?;
            sock.bind(SocketAddr::new(source_ip(i).into(), 0))?;
            sock.connect(addr).await?
        }
        _ => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns (soft, hard) after.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
pub fn raise_nofile() -> (u64, u64) {
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (1024, 1024);
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
        (lim.rlim_cur as u64, lim.rlim_max as u64)
    }
}

/// The local ephemeral port range.
pub fn ephemeral_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<usize>().ok());
            Some(it.next()??.abs_diff(it.next()??) + 1)
        })
        .unwrap_or(28232)
}

/// Checks that `n` client connections to `addr` fit in this process; the error says why not.
pub fn check_capacity(n: usize, addr: SocketAddr) -> Result<(), String> {
    let (soft, hard) = raise_nofile();
    // Some descriptors are taken already (stdio, the runtime's epoll and eventfd).
    let spare = 32;
    if n as u64 + spare > soft {
        return Err(format!(
            "cannot open {n} connections: RLIMIT_NOFILE is {soft} (hard limit {hard}) and \
             {spare} descriptors are kept for the process itself; at most {} fit. Raise the \
             hard limit (e.g. `ulimit -Hn 65536` as root, or LimitNOFILE in systemd) or lower -n.",
            soft.saturating_sub(spare)
        ));
    }
    let ports = ephemeral_ports();
    let spread = matches!(addr, SocketAddr::V4(v4) if v4.ip().is_loopback());
    let per_source = if spread { n.div_ceil(SOURCE_ADDRS) } else { n };
    if per_source > ports {
        return Err(format!(
            "cannot open {n} connections to {addr}: {per_source} would share one source address \
             but the ephemeral port range (net.ipv4.ip_local_port_range) has {ports} ports; \
             use a loopback target (source addresses are then spread over 127.0.0.2-254)"
        ));
    }
    Ok(())
}

/// One sample of a process from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// User CPU, clock ticks.
    pub utime: u64,
    /// System CPU, clock ticks.
    pub stime: u64,
    /// Resident set, KiB.
    pub rss_kb: u64,
    /// Threads.
    pub threads: u64,
}

/// Clock ticks per second (for [`ProcSample::utime`]).
pub fn clock_ticks() -> u64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Samples `/proc/PID/stat` and `/proc/PID/status`.
pub fn proc_sample(pid: u32) -> io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, a)| a)
        .ok_or_else(|| io::Error::other("bad /proc/PID/stat"))?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let utime = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0);
    let stime = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        utime,
        stime,
        rss_kb: field("VmRSS:"),
        threads: field("Threads:"),
    })
}

/// Samples a server process every 50 ms while a measurement runs: CPU deltas and the largest RSS.
pub struct Monitor {
    pid: Option<u32>,
    start: ProcSample,
    max_rss: Arc<Mutex<u64>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Monitor {
    /// Starts sampling `pid` (nothing when `None`).
    pub fn start(pid: Option<u32>) -> Monitor {
        let start = pid.and_then(|p| proc_sample(p).ok()).unwrap_or_default();
        let max_rss = Arc::new(Mutex::new(start.rss_kb));
        let task = pid.map(|p| {
            let max_rss = max_rss.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tick.tick().await;
                    match proc_sample(p) {
                        Ok(s) => {
                            let mut m = max_rss.lock().unwrap();
                            *m = (*m).max(s.rss_kb);
                        }
                        Err(_) => return,
                    }
                }
            })
        });
        Monitor {
            pid,
            start,
            max_rss,
            task,
        }
    }

    /// Stops sampling: `{"server_cpu_user_s", "server_cpu_sys_s", "server_max_rss_kb",
    /// "server_threads"}`, or `{}` without a pid.
    pub fn finish(mut self) -> Value {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let Some(pid) = self.pid else {
            return json!({});
        };
        let Ok(end) = proc_sample(pid) else {
            return json!({});
        };
        let hz = clock_ticks() as f64;
        let max_rss = (*self.max_rss.lock().unwrap()).max(end.rss_kb);
        json!({
            "server_cpu_user_s": (end.utime - self.start.utime) as f64 / hz,
            "server_cpu_sys_s": (end.stime - self.start.stime) as f64 / hz,
            "server_max_rss_kb": max_rss,
            "server_threads": end.threads,
        })
    }
}

/// A latency histogram in microseconds (1 µs to 10 minutes, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Records a duration (µs, saturating at the histogram's bounds).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 600_000_000);
    h.saturating_record(us);
}

/// `{"count","avg_us","min_us","max_us","p50_us","p95_us","p99_us","p999_us"}`.
pub fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "avg_us": (h.mean() * 10.0).round() / 10.0,
        "min_us": h.min(),
        "max_us": h.max(),
        "p50_us": h.value_at_quantile(0.50),
        "p95_us": h.value_at_quantile(0.95),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
    })
}

/// Parses `10s`, `100ms`, `2m`, `1.5s`, `500us`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 10s, 100ms, 2m)"))?;
    let secs = match unit {
        "us" | "µs" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}")),
    };
    if !(secs >= 0.0 && secs.is_finite()) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration like Go does (`1.495764ms`).
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{}µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{}ms", ns as f64 / 1e6)
    } else {
        format!("{}s", ns as f64 / 1e9)
    }
}

/// A parsed HTTP response head.
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    pub chunked: bool,
    pub close: bool,
    pub content_type: String,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a response head (without its final blank line).
pub fn parse_head(raw: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(raw).map_err(|_| io::Error::other("non-UTF-8 head"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
        close: status_line.starts_with("HTTP/1.0"),
        content_type: String::new(),
    };
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => head.content_length = v.parse().ok(),
            "transfer-encoding" => head.chunked = v.to_ascii_lowercase().contains("chunked"),
            "connection" => head.close = v.eq_ignore_ascii_case("close"),
            "content-type" => head.content_type = v.to_ascii_lowercase(),
            _ => {}
        }
    }
    Ok(head)
}

async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(4096);
    let n = stream.read_buf(buf).await?;
    Ok(n)
}

/// Reads one response head from `stream` (bytes beyond it stay in `buf`).
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Head> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = parse_head(&buf[..end])?;
            buf.drain(..end + 4);
            return Ok(head);
        }
        if fill(stream, buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Reads one whole response (head and body) from `stream`; bytes of the next response stay in
/// `buf`. Returns the head.
pub async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Head> {
    let head = read_head(stream, buf).await?;
    if let Some(len) = head.content_length {
        while buf.len() < len {
            if fill(stream, buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        buf.drain(..len);
    } else if head.chunked {
        loop {
            if let Some(end) = find(buf, b"0\r\n\r\n") {
                buf.drain(..end + 5);
                break;
            }
            if fill(stream, buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    } else if !(100..200).contains(&head.status) && head.status != 204 && head.status != 304 {
        // Delimited by close.
        while fill(stream, buf).await? != 0 {}
        buf.clear();
    }
    Ok(head)
}

/// A `GET` request.
pub fn get_request(path: &str, host: SocketAddr, close: bool) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Sends one request and reads its response.
pub async fn http_roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    req: &[u8],
) -> io::Result<Head> {
    stream.write_all(req).await?;
    read_response(stream, buf).await
}
