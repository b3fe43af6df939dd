//! A TCP echo server on hop's read handlers: `cargo run --release --example echo -- --backend reactor --addr 127.0.0.1:5000`.
//!
//! Under `--backend tokio` it runs one tokio task per connection (the seed tcp-echo-servers'
//! async variant); under the reactor, no task or thread per connection and no buffer while idle.

use std::net::SocketAddr;

use bytes::BytesMut;
use hop::tcp::{Conn, Handler};

struct Echo;

impl Handler for Echo {
    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
        // Echo what fits; the rest waits for `on_writable` (backpressure, bounded memory).
        let n = input.len().min(conn.write_capacity());
        conn.write(&input.split_to(n))?;
        Ok(())
    }
}

fn usage() -> ! {
    eprintln!("usage: echo [--backend reactor|tokio] [--addr HOST:PORT] [--pollers N]");
    std::process::exit(2)
}

fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut builder = hop::Server::builder();
    let mut backend = hop::Backend::from_env().unwrap_or(hop::Backend::Reactor);
    let mut addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--backend" => backend = val().parse().unwrap_or_else(|_| usage()),
            "--addr" => addr = val().parse().unwrap_or_else(|_| usage()),
            "--pollers" => builder = builder.pollers(val().parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    println!("hop echo on {addr} (backend: {backend})");
    builder
        .backend(backend)
        .idle_timeout(None)
        .serve_tcp(hop::bind(addr)?, |_: hop::IncomingStream<'_>| Echo)
        // Ctrl-C or SIGTERM (kill, systemd, Docker): close WebSockets with 1001, end SSE
        // streams, finish in-flight requests.
        .with_graceful_shutdown(hop::shutdown_signal())
        .run()
}
