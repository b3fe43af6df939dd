//! The peer servers of hop's benchmark harness (`benches/compare.sh`, issue 11).
//!
//! They serve the same axum [`Router`] ([`app`]) with the routes the harness's peer rows hit,
//! written the way an axum user would write them:
//!
//! - `/plaintext`: `Hello, World!`; `/json`: `{"message":"Hello, World!"}`
//! - `/ws`: axum's `WebSocketUpgrade`, echoing text and binary messages
//! - `/sse`: axum's `Sse` over a tokio broadcast channel that ticks once a second (as the hop
//!   demo's hub does); `POST /sse/broadcast` sends its body to every subscriber
//!
//! The servers:
//!
//! - [`run_axum_serve`] (binary `axum-serve`): `axum::serve` as users run it, stock settings,
//!   a `tokio::net::TcpListener`, on a multi-thread runtime with N workers.
//! - [`run_hyper_tuned`] (binary `hyper-tuned`): a tuned hyper-util http1 server: a tokio
//!   `current_thread` runtime, `TCP_NODELAY`, `http1::Builder::pipeline_flush(true)`, the Router
//!   through `TowerToHyperService`, one task per connection, no timer (so no header-read
//!   timeout and no per-request sleep). For N > 1 it runs N such runtimes on N threads, each
//!   with its own `SO_REUSEPORT` listener on the same address (the kernel spreads connections).
//! - [`run_axum_server`] (binary `axum-server`, the peer of the TLS rows): axum-server as users
//!   run it over TLS, `axum_server::bind_rustls(addr, RustlsConfig::from_pem_file(cert, key))`,
//!   stock settings, on a multi-thread runtime with N workers.
//!
//! All take `--addr HOST:PORT` and `--workers N` (`--pollers N` is the same, as the harness
//! passes it; `--backend X` is accepted and ignored).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use axum_server::tls_rustls::RustlsConfig;
use futures_util::{Stream, StreamExt};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::broadcast;

/// The SSE hub: every subscriber of `/sse` receives what is sent here.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Event>,
}

impl Hub {
    /// A hub with no subscribers yet.
    pub fn new() -> Self {
        Hub {
            tx: broadcast::channel(64).0,
        }
    }

    /// Sends `event` to every subscriber; returns how many there were.
    pub fn send(&self, event: Event) -> usize {
        self.tx.send(event).unwrap_or(0)
    }

    /// Sends `tick N` once a second from a thread of its own, as the hop demo server does.
    pub fn tick_every_second(&self) -> io::Result<()> {
        let hub = self.clone();
        std::thread::Builder::new()
            .name("sse-ticker".into())
            .spawn(move || {
                for n in 1u64.. {
                    std::thread::sleep(Duration::from_secs(1));
                    hub.send(Event::default().data(format!("tick {n}")).id(n.to_string()));
                }
            })?;
        Ok(())
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.next().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(t),
                Message::Binary(b) => Message::Binary(b),
                // Close and ping are answered by tungstenite itself; pongs are ignored.
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn sse(State(hub): State<Hub>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = hub.tx.subscribe();
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(event) => return Some((Ok(event), rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(events)
}

async fn broadcast(State(hub): State<Hub>, body: String) -> String {
    let n = hub.send(Event::default().event("broadcast").data(body));
    format!("sent to {n} subscribers\n")
}

/// The Router both peers serve.
pub fn app(hub: Hub) -> Router {
    Router::new()
        .route("/plaintext", get(|| async { "Hello, World!" }))
        .route(
            "/json",
            get(|| async { Json(serde_json::json!({ "message": "Hello, World!" })) }),
        )
        .route("/ws", get(ws))
        .route("/sse", get(sse))
        .route("/sse/broadcast", post(broadcast))
        // As the demo serves it: hop's README.md, by tower-http's `ServeFile`.
        .route_service(
            "/file",
            tower_http::services::ServeFile::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../README.md"
            )),
        )
        // The demo's 64 MiB file (written by the demo, or here if it is missing).
        .route_service("/big", tower_http::services::ServeFile::new(big_file()))
        .with_state(hub)
}

/// The demo's `/big`: 64 MiB in the temporary directory, the same bytes as the demo writes.
fn big_file() -> std::path::PathBuf {
    const SIZE: u64 = 64 << 20;
    let path = std::env::temp_dir().join("hop-demo-big-64MiB.bin");
    if !std::fs::metadata(&path).is_ok_and(|m| m.len() == SIZE) {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let all: Vec<u8> = chunk.repeat((SIZE >> 20) as usize);
        if std::fs::write(&tmp, all).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    path
}

/// Command-line settings shared by the binaries.
#[derive(Debug, Clone)]
pub struct Args {
    pub addr: SocketAddr,
    pub workers: usize,
    /// `--tls-cert PATH` (PEM): the certificate chain `axum-server` serves (the others ignore it).
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key PATH` (PEM): its private key.
    pub tls_key: Option<PathBuf>,
}

impl Args {
    /// Parses `--addr HOST:PORT`, `--workers N` / `--pollers N`, `--tls-cert PATH`,
    /// `--tls-key PATH` and an ignored `--backend X` (default `127.0.0.1:1826`, one worker, no
    /// TLS).
    pub fn parse(name: &str, args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let usage = || {
            format!(
                "usage: {name} [--addr HOST:PORT] [--workers N] [--tls-cert PATH --tls-key PATH]"
            )
        };
        let mut out = Args {
            addr: "127.0.0.1:1826".parse().unwrap(),
            workers: 1,
            tls_cert: None,
            tls_key: None,
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let val = args.next().ok_or_else(usage)?;
            match a.as_str() {
                "--addr" => out.addr = val.parse().map_err(|_| usage())?,
                "--workers" | "--pollers" => {
                    out.workers = val.parse().map_err(|_| usage())?;
                    if out.workers == 0 {
                        return Err(usage());
                    }
                }
                "--tls-cert" => out.tls_cert = Some(val.into()),
                "--tls-key" => out.tls_key = Some(val.into()),
                "--backend" => {}
                _ => return Err(usage()),
            }
        }
        if out.tls_cert.is_some() != out.tls_key.is_some() {
            return Err(usage());
        }
        Ok(out)
    }
}

/// `axum::serve` on a tokio multi-thread runtime with `workers` workers, stock settings.
pub fn run_axum_serve(args: &Args, app: Router) -> io::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(args.addr).await?;
            axum::serve(listener, app).await
        })
}

/// axum-server over TLS as users run it: `axum_server::bind_rustls(addr,
/// RustlsConfig::from_pem_file(cert, key).await?)` serving the Router, stock settings (hyper-util's
/// auto builder, ALPN `h2` and `http/1.1`, a 10 s handshake timeout, rustls on aws-lc-rs), on a
/// tokio multi-thread runtime with `workers` workers. Without `--tls-cert`/`--tls-key` it serves
/// plain HTTP with `axum_server::bind`.
pub fn run_axum_server(args: &Args, app: Router) -> io::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()?
        .block_on(async {
            let make = app.into_make_service();
            match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => {
                    let config = RustlsConfig::from_pem_file(cert, key).await?;
                    axum_server::bind_rustls(args.addr, config)
                        .serve(make)
                        .await
                }
                _ => axum_server::bind(args.addr).serve(make).await,
            }
        })
}

/// A listener as tokio binds one (`SO_REUSEADDR`, backlog 1024), plus `SO_REUSEPORT` when
/// `reuse_port`.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// The tuned accept loop: one task per connection, `TCP_NODELAY`, hyper's http1 connection with
/// `pipeline_flush(true)` and upgrades (for `/ws`). Runs on whatever runtime polls it; the
/// binary runs it on a `current_thread` runtime.
pub async fn serve_hyper_tuned(listener: tokio::net::TcpListener, app: Router) -> io::Result<()> {
    let mut http = http1::Builder::new();
    http.pipeline_flush(true);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of file descriptors and the like: back off a little, as axum::serve does.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        let conn = http
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// The tuned server: `workers` threads, each a tokio `current_thread` runtime serving its own
/// listener (`SO_REUSEPORT` on the same address when more than one).
pub fn run_hyper_tuned(args: &Args, app: Router) -> io::Result<()> {
    let reuse_port = args.workers > 1;
    let listeners = (0..args.workers)
        .map(|_| bind(args.addr, reuse_port))
        .collect::<io::Result<Vec<_>>>()?;
    for (i, l) in listeners.into_iter().enumerate() {
        let app = app.clone();
        let run = move || -> io::Result<()> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    serve_hyper_tuned(tokio::net::TcpListener::from_std(l)?, app).await
                })
        };
        if i + 1 == args.workers {
            // The last one runs on the calling thread; the others run until the process ends.
            return run();
        }
        std::thread::Builder::new()
            .name(format!("hyper-tuned-{i}"))
            .spawn(run)?;
    }
    Ok(())
}
