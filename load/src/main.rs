//! `hop-load`: the load generator behind `benches/compare.sh`. `hop-load help` for usage.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use hop_load::util::parse_duration;
use hop_load::*;
use serde_json::Value;

const USAGE: &str = "\
hop-load: load generator for hop's benchmarks

usage: hop-load MODE [OPTIONS] [--json] [--threads N]

modes:
  idle     --kind http|https|h2|ws|sse|tcp -n N --addr A [--path P] [--hold SECS]
           [--server-pid PID] [--ca FILE [--server-name NAME]]
           open N idle connections (source addresses spread over 127.0.0.2-254), sample the
           server's RSS and threads before and after (h2: h2c with prior knowledge, the
           SETTINGS exchange and one GET on stream 1; https: a TLS 1.3 handshake, then one
           GET over HTTP/1.1)
  echo     -c C -r R -d DUR --addr A [--size BYTES] [--server-pid PID]
           TCP echo (the seed tcp-echo-servers bench): C connections, R requests per
           connection (0: unbounded), BYTES per request
  rate     --rps R -d DUR --addr A [--path /plaintext] [-c C] [--server-pid PID]
           fixed-rate HTTP latency, corrected for coordinated omission
  churn    -c C -d DUR --addr A [--path /plaintext] [--server-pid PID]
           [--tls --ca FILE [--server-name NAME]]
           a new connection per request (Connection: close): connections/s; with --tls each
           connection is a full TLS 1.3 handshake (no resumption, ALPN http/1.1) first
  ws-echo  -c C -d DUR --addr A [--path /ws] [--size BYTES] [--client raw|tungstenite]
           [--burst K] [--server-pid PID]
           WebSocket echo: messages/s and latency (raw: pre-built frames, the lighter client;
           K messages in flight per connection, sent in one write, raw only)
  sse      -n N --addr A [--path /sse] [--publish PATH] [--rounds K] [--wait DUR]
           SSE fan-out: time for one event to reach all N subscribers
  users    --host A --users U --duration DUR --message TEXT --interval DUR
           the seed net-v-netpoll tool (also without a mode name): each user sends TEXT every
           DUR over its own TCP connection; sent, received, failures, average RTT
  chart    --out FILE --title T --xlabel X --ylabel Y --series NAME=X:Y,X:Y [--series ...]
           an SVG line chart

TLS: --ca FILE is the PEM certificate to trust (the server's own, when self-signed);
--server-name NAME (default localhost) the name its certificate must carry, sent as SNI.
--json prints one JSON line; --threads N uses N runtime threads (default 1).
Durations: 10s, 100ms, 2m, or plain seconds.
";

struct Args {
    mode: String,
    opts: HashMap<String, Vec<String>>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut raw: Vec<String> = std::env::args().skip(1).collect();
        let mode = match raw.first() {
            None => return Err(USAGE.into()),
            Some(m) if m.starts_with('-') && m != "-h" && m != "--help" => "users".to_string(),
            Some(_) => raw.remove(0),
        };
        let mut opts: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = raw.into_iter().peekable();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .or_else(|| a.strip_prefix('-'))
                .ok_or_else(|| format!("unexpected argument {a:?}\n\n{USAGE}"))?
                .to_string();
            let (key, val) = match key.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => {
                    let is_flag = matches!(key.as_str(), "json" | "h" | "help" | "tls");
                    let val = if is_flag {
                        "true".to_string()
                    } else {
                        it.next().ok_or_else(|| format!("--{key} needs a value"))?
                    };
                    (key, val)
                }
            };
            opts.entry(key).or_default().push(val);
        }
        Ok(Args { mode, opts })
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.opts.get(k).and_then(|v| v.last()).map(|s| s.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        self.get(k).is_some()
    }

    fn num<T: std::str::FromStr>(&self, k: &str, default: Option<T>) -> Result<T, String> {
        match self.get(k) {
            Some(v) => v.parse().map_err(|_| format!("bad value for --{k}: {v:?}")),
            None => default.ok_or_else(|| format!("--{k} is required (hop-load help)")),
        }
    }

    fn dur(&self, k: &str, default: Option<Duration>) -> Result<Duration, String> {
        match self.get(k) {
            Some(v) => parse_duration(v),
            None => default.ok_or_else(|| format!("--{k} is required (hop-load help)")),
        }
    }

    fn addr(&self, k: &str, default: &str) -> Result<SocketAddr, String> {
        let a = self.get(k).unwrap_or(default);
        a.to_socket_addrs()
            .map_err(|e| format!("bad address {a:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("bad address {a:?}"))
    }

    /// The TLS client of `--ca FILE` (and `--server-name NAME`), if given.
    fn tls(&self) -> Result<Option<tls::TlsClient>, String> {
        self.get("ca")
            .map(|ca| {
                let name = self.get("server-name").unwrap_or("localhost");
                tls::TlsClient::from_ca_file(std::path::Path::new(ca), name)
            })
            .transpose()
    }

    fn pid(&self) -> Result<Option<u32>, String> {
        self.get("server-pid")
            .map(|p| p.parse().map_err(|_| format!("bad --server-pid {p:?}")))
            .transpose()
    }
}

async fn run(a: &Args) -> Result<Value, String> {
    match a.mode.as_str() {
        "idle" => {
            idle(IdleOpts {
                kind: a.get("kind").unwrap_or("http").parse()?,
                n: a.num("n", None)?,
                addr: a.addr("addr", "127.0.0.1:1826")?,
                path: a.get("path").unwrap_or("").to_string(),
                hold: a.dur("hold", Some(Duration::ZERO))?,
                settle: a.dur("settle", Some(Duration::from_secs(1)))?,
                server_pid: a.pid()?,
                concurrency: a.num("concurrency", Some(256))?,
                tls: a.tls()?,
            })
            .await
        }
        "echo" => {
            echo(EchoOpts {
                c: a.num("c", Some(100))?,
                r: a.num("r", Some(0))?,
                duration: a.dur("d", Some(Duration::from_secs(10)))?,
                addr: a.addr("addr", "127.0.0.1:5000")?,
                size: a.num("size", Some(64))?,
                server_pid: a.pid()?,
            })
            .await
        }
        "rate" => {
            rate_mode(RateOpts {
                rps: a.num("rps", None)?,
                duration: a.dur("d", Some(Duration::from_secs(10)))?,
                addr: a.addr("addr", "127.0.0.1:1826")?,
                path: a.get("path").unwrap_or("/plaintext").to_string(),
                c: a.num("c", Some(50))?,
                server_pid: a.pid()?,
            })
            .await
        }
        "churn" => {
            churn(ChurnOpts {
                c: a.num("c", Some(32))?,
                duration: a.dur("d", Some(Duration::from_secs(10)))?,
                addr: a.addr("addr", "127.0.0.1:1826")?,
                path: a.get("path").unwrap_or("/plaintext").to_string(),
                server_pid: a.pid()?,
                tls: match a.flag("tls") {
                    true => Some(a.tls()?.ok_or("churn --tls needs --ca FILE")?),
                    false => None,
                },
            })
            .await
        }
        "ws-echo" => {
            ws_echo(WsEchoOpts {
                c: a.num("c", Some(100))?,
                duration: a.dur("d", Some(Duration::from_secs(10)))?,
                addr: a.addr("addr", "127.0.0.1:1826")?,
                path: a.get("path").unwrap_or("/ws").to_string(),
                size: a.num("size", Some(64))?,
                raw: match a.get("client").unwrap_or("raw") {
                    "raw" => true,
                    "tungstenite" => false,
                    c => return Err(format!("--client {c:?}: raw or tungstenite")),
                },
                burst: a.num("burst", Some(1))?,
                server_pid: a.pid()?,
            })
            .await
        }
        "sse" => {
            sse(SseOpts {
                n: a.num("n", Some(1000))?,
                addr: a.addr("addr", "127.0.0.1:1826")?,
                path: a.get("path").unwrap_or("/sse").to_string(),
                publish: a.get("publish").map(str::to_string),
                rounds: a.num("rounds", Some(3))?,
                wait: a.dur("wait", Some(Duration::from_secs(5)))?,
                server_pid: a.pid()?,
            })
            .await
        }
        "users" => {
            users(UsersOpts {
                host: a.addr("host", "127.0.0.1:8080")?,
                users: a.num("users", Some(100))?,
                duration: a.dur("duration", Some(Duration::from_secs(10)))?,
                message: a.get("message").unwrap_or("hello").to_string(),
                interval: a.dur("interval", Some(Duration::from_millis(100)))?,
            })
            .await
        }
        m => Err(format!("unknown mode {m:?}\n\n{USAGE}")),
    }
}

fn ms(us: &Value) -> String {
    match us.as_f64() {
        Some(v) if v >= 1000.0 => format!("{:.2}ms", v / 1000.0),
        Some(v) => format!("{v:.0}µs"),
        None => "-".into(),
    }
}

fn human(a: &Args, v: &Value) {
    if a.mode == "users" {
        println!(
            "Starting test: {} users for {}",
            v["users"],
            a.get("duration").unwrap_or("10s")
        );
        println!("\n=== Load Test Complete ===");
        println!("Sent:     {}", v["sent"]);
        println!("Received: {}", v["received"]);
        println!("Failures: {}", v["failures"]);
        println!("Avg RTT:  {}", v["avg_rtt"].as_str().unwrap_or("-"));
        return;
    }
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            match val {
                Value::Object(h) if h.contains_key("count") => {
                    let f = |q: &str| ms(&h.get(q).cloned().unwrap_or(Value::Null));
                    println!(
                        "{k:<22} n={} avg={} min={} p50={} p95={} p99={} p99.9={} max={}",
                        h["count"],
                        f("avg_us"),
                        f("min_us"),
                        f("p50_us"),
                        f("p95_us"),
                        f("p99_us"),
                        f("p999_us"),
                        f("max_us")
                    );
                }
                Value::String(s) => println!("{k:<22} {s}"),
                other => println!("{k:<22} {other}"),
            }
        }
    }
}

fn chart(a: &Args) -> Result<(), String> {
    let series = a
        .opts
        .get("series")
        .ok_or("--series is required")?
        .iter()
        .map(|s| chart::parse_series(s))
        .collect::<Result<Vec<_>, _>>()?;
    let svg = chart::svg(
        a.get("title").unwrap_or(""),
        a.get("xlabel").unwrap_or(""),
        a.get("ylabel").unwrap_or(""),
        &series,
    );
    match a.get("out") {
        Some(p) => std::fs::write(p, svg).map_err(|e| format!("{p}: {e}")),
        None => {
            print!("{svg}");
            Ok(())
        }
    }
}

fn main() {
    let a = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2)
        }
    };
    if matches!(a.mode.as_str(), "help" | "-h" | "--help") || a.flag("help") || a.flag("h") {
        print!("{USAGE}");
        return;
    }
    if a.mode == "chart" {
        if let Err(e) = chart(&a) {
            eprintln!("hop-load: {e}");
            std::process::exit(2);
        }
        return;
    }
    let threads: usize = match a.num("threads", Some(1)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2)
        }
    };
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    match rt.block_on(run(&a)) {
        Ok(v) => {
            if a.flag("json") {
                println!("{v}");
            } else {
                human(&a, &v);
            }
        }
        Err(e) => {
            if a.flag("json") {
                println!("{}", serde_json::json!({"mode": a.mode, "error": e}));
            }
            eprintln!("hop-load: {e}");
            std::process::exit(1);
        }
    }
    // Connections still held are dropped with the runtime; don't wait for their tasks.
    rt.shutdown_background();
}
