//! `hyper-tuned --addr HOST:PORT --workers N`: a peer server of hop's benchmark harness (see the
//! crate docs, `benches/peers/src/lib.rs`).

fn main() -> std::io::Result<()> {
    let args =
        hop_peers::Args::parse("hyper-tuned", std::env::args().skip(1)).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });
    let hub = hop_peers::Hub::new();
    hub.tick_every_second()?;
    println!(
        "hyper-tuned on http://{} ({} workers)",
        args.addr, args.workers
    );
    hop_peers::run_hyper_tuned(&args, hop_peers::app(hub))
}
