//! `axum-server --addr HOST:PORT --workers N --tls-cert PATH --tls-key PATH`: the peer server of
//! the TLS rows of hop's benchmark harness (see the crate docs, `benches/peers/src/lib.rs`).

fn main() -> std::io::Result<()> {
    let args =
        hop_peers::Args::parse("axum-server", std::env::args().skip(1)).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });
    let hub = hop_peers::Hub::new();
    hub.tick_every_second()?;
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    println!(
        "axum-server on {scheme}://{} ({} workers)",
        args.addr, args.workers
    );
    hop_peers::run_axum_server(&args, hop_peers::app(hub))
}
