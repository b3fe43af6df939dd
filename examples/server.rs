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
//! `/file` (tower-http `ServeFile`).
//!
//! `/ws` negotiates permessage-deflate with hop's defaults; `--ws-deflate off`,
//! `--ws-deflate-level N` and `--ws-deflate-history BYTES` change them (the benchmark's
//! compression rows compare the settings).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
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

fn usage() -> ! {
    eprintln!(
        "usage: server [--backend reactor|tokio] [--addr HOST:PORT] [--pollers N] [--park-after-ms MS|never] [--tls-cert CERT.pem --tls-key KEY.pem] [--ws-deflate on|off] [--ws-deflate-level 0-9] [--ws-deflate-history BYTES]"
    );
    std::process::exit(2)
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

fn app(hub: Hub) -> Router {
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
        .route_service(
            "/file",
            get_service(tower_http::services::ServeFile::new(file)),
        )
        .with_state(hub)
}

fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
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
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--backend" => {
                backend = Some(val().parse::<hop::Backend>().unwrap_or_else(|e| {
                    eprintln!("{e}");
                    usage()
                }))
            }
            "--addr" => addr = val().parse().unwrap_or_else(|_| usage()),
            "--pollers" => pollers = Some(val().parse().unwrap_or_else(|_| usage())),
            "--park-after-ms" => {
                park = Some(match val().as_str() {
                    "never" => None,
                    ms => Some(Duration::from_millis(
                        ms.parse().unwrap_or_else(|_| usage()),
                    )),
                })
            }
            "--tls-cert" => tls_cert = Some(val()),
            "--tls-key" => tls_key = Some(val()),
            "--ws-deflate" => {
                ws.deflate.enabled = match val().as_str() {
                    "on" => true,
                    "off" => false,
                    _ => usage(),
                }
            }
            "--ws-deflate-level" => ws.deflate.level = val().parse().unwrap_or_else(|_| usage()),
            "--ws-deflate-history" => {
                ws.deflate.history = val().parse().unwrap_or_else(|_| usage())
            }
            _ => usage(),
        }
    }
    WS_CONFIG.set(ws).expect("set once");
    let backend = backend
        .or_else(hop::Backend::from_env)
        .unwrap_or(hop::Backend::Reactor);
    let mut builder = hop::Server::builder().backend(backend);
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
        _ => usage(),
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

    let listener = hop::bind(addr)?;
    println!("hop demo on {scheme}://{addr} (backend: {backend})");
    builder
        .serve(listener, app(hub))
        // Ctrl-C or SIGTERM (kill, systemd, Docker): close WebSockets with 1001, end SSE
        // streams, finish in-flight requests.
        .with_graceful_shutdown(hop::shutdown_signal())
        .run()
}
