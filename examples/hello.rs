//! The smallest hop server: an axum `Router` on `hop::serve` at 127.0.0.1:3000.
//!
//! `cargo run --example hello`, then `curl http://127.0.0.1:3000/`.

use axum::{routing::get, Router};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    let listener = std::net::TcpListener::bind("127.0.0.1:3000")?;
    println!("listening on http://127.0.0.1:3000");
    hop::serve(listener, app)
        .with_graceful_shutdown(hop::shutdown_signal()) // Ctrl-C or SIGTERM
        .await
}
