//! The demo server: `cargo run --release --example server -- --backend reactor --addr 127.0.0.1:1826`.
//!
//! Routes: `/` (this list), `/plaintext`, `/json`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::{routing::get, Json, Router};

const ROUTES: &str = "hop demo server\n\nGET /           this list\nGET /plaintext  Hello, World!\nGET /json       {\"message\":\"Hello, World!\"}\n";

fn usage() -> ! {
    eprintln!("usage: server [--backend reactor|tokio] [--addr HOST:PORT] [--pollers N] [--park-after-ms MS|never]");
    std::process::exit(2)
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
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let app = Router::new()
        .route("/", get(|| async { ROUTES }))
        .route("/plaintext", get(|| async { "Hello, World!" }))
        .route(
            "/json",
            get(|| async { Json(serde_json::json!({ "message": "Hello, World!" })) }),
        );
    let mut builder = hop::Server::builder();
    if let Some(b) = backend.or_else(hop::Backend::from_env) {
        builder = builder.backend(b);
    }
    if let Some(n) = pollers {
        builder = builder.pollers(n);
    }
    if let Some(p) = park {
        builder = builder.park_idle_after(p);
    }
    let listener = hop::bind(addr)?;
    println!(
        "hop demo on http://{addr} (backend: {})",
        backend
            .or_else(hop::Backend::from_env)
            .unwrap_or(hop::Backend::Reactor)
    );
    builder
        .serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .run()
}
