//! The demo server:
//! `cargo run --release --example server -- --backend reactor|tokio --addr 127.0.0.1:1826`.
//!
//! With `--tls-cert CERT.pem --tls-key KEY.pem` it serves HTTPS instead (rustls, ALPN `h2` and
//! `http/1.1`; the same routes, `/ws` over wss), on either backend.
//!
//! Routes: `/` (an HTML overview whose script uses `/ws` and `/sse`), `/plaintext`, `/json`,
//! `/ws` (hop::ws echo), `/ws-frames` (hop::ws's frame API: each piece of each frame echoed as
//! it arrives, as a frame of its own, so a message comes back whole), `/ws-axum`
//! (axum's `WebSocketUpgrade`), `/ws-tungstenite` (a tokio-tungstenite loop, tuned: 4 KiB read
//! buffer, one flush per batch), `/sse` (the hub, ticking once a second), `POST /sse/broadcast`,
//! `/file` (the README, through `hop::fs::ServeFile`: tower-http's `ServeFile`, its body sent
//! with sendfile(2) over plain HTTP/1.1 on the reactor), `/big` (the same for a 64 MiB file
//! written to the temporary directory at start).
//! `/ip` answers the client's address as `ConnectInfo` sees it (with `--connect-info` or
//! `--proxy-protocol`: axum's `ConnectInfo` costs an extension map per request, so it is off
//! otherwise). `/metrics` answers hop's metrics in Prometheus's text format (hop's `metrics`
//! feature, which the demo gets through the repository package's dev-dependency on hop-serve,
//! and `metrics-exporter-prometheus`'s recorder, installed before the server starts).
//!
//! With `--proxy-protocol` every connection must start with a PROXY protocol header (v1 or v2,
//! as HAProxy's `send-proxy`/`send-proxy-v2` send), whose client address `/ip` then answers;
//! a connection without one is closed.
//!
//! A port another server holds is refused unless `--share-port` asks to share it; a bad flag is
//! named in plain words (status 2); a second SIGINT or SIGTERM during the drain exits at once.
//!
//! `/ws` negotiates permessage-deflate with hop's defaults; `--ws-deflate off`,
//! `--ws-deflate-level N` and `--ws-deflate-history BYTES` change them (the benchmark's
//! compression rows compare the settings).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, get_service, post};
use axum::{Json, Router};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hop::sse::{Event, Hub};
use hop::ws::{
    FrameChunk, FrameKind, Message, WsConfig, WsConn, WsFrameHandler, WsHandler, WsUpgrade,
};

const INDEX: &str = include_str!("assets/index.html");

const USAGE: &str = "usage: server [--backend reactor|tokio] [--addr HOST:PORT] [--share-port] [--pollers N] [--park-after-ms MS|never] [--tls-cert CERT.pem --tls-key KEY.pem] [--proxy-protocol] [--connect-info] [--metrics on|off] [--ws-deflate on|off] [--ws-deflate-level 0-9] [--ws-deflate-history BYTES]\n(a listening socket handed down in LISTEN_FDS, by systemd socket activation, is served instead of --addr)";

/// Says what is wrong with the command line, in plain words, then how to call the demo; exits 2.
fn bad(what: std::fmt::Arguments<'_>) -> ! {
    eprintln!("server: {what}\n{USAGE}");
    std::process::exit(2)
}

/// `value` of `flag` parsed as a `T`, which `what` describes ("a number of pollers").
fn parse<T: std::str::FromStr>(flag: &str, value: &str, what: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| bad(format_args!("{flag} takes {what}, not \"{value}\"")))
}

/// hop::ws echo: text and binary back as they came.
struct Echo;

impl WsHandler for Echo {
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
        ws.send(msg)
    }
}

/// `/ws`'s settings: the defaults, or permessage-deflate as the `--ws-deflate*` flags say.
static WS_CONFIG: std::sync::OnceLock<WsConfig> = std::sync::OnceLock::new();

async fn ws_hop(upgrade: WsUpgrade) -> Response {
    let cfg = WS_CONFIG.get().copied().unwrap_or_default();
    upgrade.config(cfg).on_upgrade(Echo)
}

/// hop::ws frame echo: each piece of a frame goes back as it arrived, as a frame of its own
/// (the first of a message with the message's opcode, the others as continuations), so no
/// message or frame is ever held whole.
#[derive(Default)]
struct FrameEcho {
    /// A message is being echoed (its first frame has gone back).
    in_message: bool,
}

impl WsFrameHandler for FrameEcho {
    fn on_frame(&mut self, ws: &mut WsConn<'_>, chunk: FrameChunk) -> std::io::Result<()> {
        let kind = if self.in_message {
            FrameKind::Continue
        } else {
            chunk.kind
        };
        let ends = chunk.fin && chunk.last;
        ws.send_frame(kind, ends, &chunk.payload)?;
        self.in_message = !ends;
        Ok(())
    }
}

async fn ws_frames(upgrade: WsUpgrade) -> Response {
    upgrade.on_upgrade_frames(FrameEcho::default())
}

async fn ws_axum(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.next().await {
            let reply = match msg {
                AxumMessage::Text(t) => AxumMessage::Text(t),
                AxumMessage::Binary(b) => AxumMessage::Binary(b),
                // A close (answered by tungstenite on the next poll, after which the stream
                // ends), a ping (answered likewise) or a pong.
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

/// The classic way: hyper's upgrade, then a tokio-tungstenite stream and a read loop.
async fn ws_tungstenite(headers: HeaderMap, mut req: Request) -> Response {
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return (StatusCode::BAD_REQUEST, "not a websocket handshake").into_response();
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        // Tuned: tungstenite's default 128 KiB read buffer is zeroed on every read, which alone
        // costs about a quarter of the server's time per echoed message.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096);
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            io,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            Some(config),
        )
        .await;
        // Echoes what has arrived, then flushes once: messages that came in together go out in
        // one write, as they do on hop's reactor.
        'conn: while let Some(Ok(msg)) = ws.next().await {
            let mut next = Some(msg);
            while let Some(msg) = next.take() {
                if (msg.is_text() || msg.is_binary()) && ws.feed(msg).await.is_err() {
                    break 'conn;
                }
                match ws.next().now_or_never() {
                    Some(Some(Ok(msg))) => next = Some(msg),
                    Some(_) => break 'conn,
                    None => {}
                }
            }
            if ws.flush().await.is_err() {
                break;
            }
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, "upgrade".to_string()),
            (header::UPGRADE, "websocket".to_string()),
            (header::SEC_WEBSOCKET_ACCEPT, accept),
        ],
    )
        .into_response()
}

async fn sse(State(hub): State<Hub>, req: Request) -> Response {
    let mut sub = hub.subscribe(&req);
    if let Some(last) = sub.last_event_id() {
        let note = format!("welcome back; you last saw event {last}");
        sub.send(&Event::new(note).event("resume"));
    }
    sub.into_response()
}

async fn broadcast(State(hub): State<Hub>, body: String) -> String {
    let n = hub.send(&Event::new(body).event("broadcast"));
    format!("sent to {n} subscribers\n")
}

/// A 64 MiB file for `/big`, written once to the temporary directory (under another name first,
/// so that demos starting together never see half of it).
fn big_file() -> std::io::Result<std::path::PathBuf> {
    const SIZE: u64 = 64 << 20;
    let path = std::env::temp_dir().join("hop-demo-big-64MiB.bin");
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == SIZE) {
        return Ok(path);
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    // Not all one byte, so that a misplaced range would show.
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for _ in 0..SIZE >> 20 {
            f.write_all(&chunk)?;
        }
        f.flush()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn app(
    hub: Hub,
    big: std::path::PathBuf,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Router {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/plaintext", get(|| async { "Hello, World!" }))
        .route(
            "/json",
            get(|| async { Json(serde_json::json!({ "message": "Hello, World!" })) }),
        )
        .route("/ws", any(ws_hop))
        .route("/ws-frames", any(ws_frames))
        .route("/ws-axum", any(ws_axum))
        .route("/ws-tungstenite", get(ws_tungstenite))
        .route("/sse", get(sse))
        .route("/sse/broadcast", post(broadcast))
        .route(
            "/ip",
            get(|req: Request| async move {
                match req.extensions().get::<ConnectInfo<SocketAddr>>() {
                    Some(ConnectInfo(addr)) => Ok(format!("{addr}\n")),
                    None => Err((
                        StatusCode::NOT_IMPLEMENTED,
                        "start the demo with --connect-info (or --proxy-protocol)\n",
                    )),
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                match metrics {
                    Some(m) => Ok((
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.render(),
                    )),
                    None => Err((StatusCode::NOT_FOUND, "metrics are off (--metrics off)\n")),
                }
            }),
        )
        .route_service("/file", get_service(hop::fs::ServeFile::new(file)))
        .route_service("/big", get_service(hop::fs::ServeFile::new(big)))
        .with_state(hub)
}

fn main() {
    // Errors in plain words (`Display`), not `main`'s Debug form.
    if let Err(e) = run() {
        eprintln!("server: {e}");
        std::process::exit(1);
    }
}

fn run() -> std::io::Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        // Colours only for a person at a terminal, not in a file or a journal.
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut backend = None;
    let mut addr: SocketAddr = "127.0.0.1:1826".parse().unwrap();
    let mut pollers = None;
    let mut park = None;
    let mut tls_cert = None;
    let mut tls_key = None;
    let mut ws = WsConfig::default();
    let mut share_port = false;
    let mut proxy_protocol = false;
    let mut connect_info = false;
    let mut metrics_on = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let flag = a.as_str();
        let mut val = || {
            args.next()
                .unwrap_or_else(|| bad(format_args!("{flag} needs a value")))
        };
        match flag {
            "--backend" => {
                let v = val();
                backend = Some(v.parse::<hop::Backend>().unwrap_or_else(|_| {
                    bad(format_args!("--backend is reactor or tokio, not \"{v}\""))
                }))
            }
            "--addr" => addr = parse(flag, &val(), "an address like 127.0.0.1:1826"),
            "--share-port" => share_port = true,
            "--pollers" => pollers = Some(parse(flag, &val(), "a number of pollers")),
            "--park-after-ms" => {
                park = Some(match val().as_str() {
                    "never" => None,
                    ms => Some(Duration::from_millis(parse(
                        flag,
                        ms,
                        "a number of milliseconds or \"never\"",
                    ))),
                })
            }
            "--tls-cert" => tls_cert = Some(val()),
            "--tls-key" => tls_key = Some(val()),
            "--proxy-protocol" => proxy_protocol = true,
            "--connect-info" => connect_info = true,
            "--metrics" => {
                metrics_on = match val().as_str() {
                    "on" => true,
                    "off" => false,
                    v => bad(format_args!("--metrics is on or off, not \"{v}\"")),
                }
            }
            "--ws-deflate" => {
                ws.deflate.enabled = match val().as_str() {
                    "on" => true,
                    "off" => false,
                    v => bad(format_args!("--ws-deflate is on or off, not \"{v}\"")),
                }
            }
            "--ws-deflate-level" => {
                ws.deflate.level = parse(flag, &val(), "a compression level from 0 to 9")
            }
            "--ws-deflate-history" => ws.deflate.history = parse(flag, &val(), "a number of bytes"),
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => bad(format_args!("unknown argument \"{flag}\"")),
        }
    }
    WS_CONFIG.set(ws).expect("set once");
    let backend = backend
        .or_else(hop::Backend::from_env)
        .unwrap_or(hop::Backend::Reactor);
    let mut builder = hop::Server::builder()
        .backend(backend)
        .proxy_protocol(proxy_protocol);
    if let Some(n) = pollers {
        builder = builder.pollers(n);
    }
    if let Some(p) = park {
        builder = builder.park_idle_after(p);
    }
    let scheme = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => {
            let read = |path: &str| {
                std::fs::read(path)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))
            };
            let tls = hop::tls::RustlsConfig::from_pem(&read(&cert)?, &read(&key)?)?;
            builder = builder.tls(tls);
            "https"
        }
        (None, None) => "http",
        _ => bad(format_args!("--tls-cert and --tls-key go together")),
    };

    // hop's metrics (`/metrics`): the recorder goes in before the server starts, which is when
    // hop registers its counters and gauges with it.
    // `--metrics off` leaves the recorder out (the benchmarks compare hop with peers that
    // keep none).
    let metrics = if metrics_on {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .map_err(std::io::Error::other)?;
        Some(handle)
    } else {
        None
    };

    // The hub ticks once a second.
    let hub = Hub::new();
    let ticker = hub.clone();
    std::thread::Builder::new()
        .name("sse-ticker".into())
        .spawn(move || {
            for n in 1u64.. {
                std::thread::sleep(Duration::from_secs(1));
                ticker.send(&Event::new(format!("tick {n}")).id(n.to_string()));
            }
        })?;

    // Signals are caught from here on, before the port is open: one that comes as soon as a
    // client can connect starts the graceful shutdown rather than killing the process.
    let signal = hop::shutdown_signal();
    // Another server on the port is an error, unless sharing it is asked for (`--share-port`:
    // the kernel then spreads new connections over both).
    // Socket activation (systemd, `systemd-socket-activate`, `systemfd`): a listening socket
    // handed down in `LISTEN_FDS` is served instead of `--addr`, by every poller.
    let inherited = listenfd::ListenFd::from_env().take_tcp_listener(0)?;
    let listener = match inherited {
        Some(l) => l,
        None if share_port => hop::bind_shared(addr)?,
        None => hop::bind(addr)?,
    };
    // The address bound, so that `--addr 127.0.0.1:0` tells which port the kernel chose.
    let bound = listener.local_addr()?;
    println!("hop demo on {scheme}://{bound} (backend: {backend})");
    let app = app(hub, big_file()?, metrics);
    // Ctrl-C or SIGTERM (kill, systemd, Docker): close WebSockets with 1001, end SSE streams,
    // finish in-flight requests. `ConnectInfo` (for `/ip`) costs an extension map per request,
    // so it is on only when asked for (the peers of the benchmarks keep none).
    if connect_info || proxy_protocol {
        builder
            .serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(signal)
            .run()
    } else {
        builder
            .serve(listener, app)
            .with_graceful_shutdown(signal)
            .run()
    }
}
