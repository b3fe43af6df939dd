//! Signal handling: [`shutdown_signal`], the future that completes on SIGINT or SIGTERM, on a
//! small thread with a tokio runtime of its own, and ends the process at once on a second one.

use std::future::Future;
use std::io;

#[cfg(doc)]
use super::run::Serve;

/// Completes when the process receives SIGINT (Ctrl-C) or SIGTERM (what `kill`, systemd, Docker
/// and Kubernetes send to stop a service): the signal to give
/// [`with_graceful_shutdown`](Serve::with_graceful_shutdown).
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// let app = axum::Router::new();
/// let listener = std::net::TcpListener::bind("127.0.0.1:0")?; // any free port
/// # // The test: a request, then the SIGTERM that `kill` sends, to this process.
/// # let addr = listener.local_addr()?;
/// # let client = std::thread::spawn(move || {
/// #     use std::io::{Read, Write};
/// #     let mut s = std::net::TcpStream::connect(addr).unwrap();
/// #     s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
/// #     let mut answer = String::new();
/// #     s.read_to_string(&mut answer).unwrap();
/// #     // Sent once the server answers: `shutdown_signal()` listens by then.
/// #     assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
/// #     answer
/// # });
/// hop::serve(listener, app)
///     .with_graceful_shutdown(hop::shutdown_signal())
///     .run() // or .await
/// #   ?;
/// # let answer = client.join().unwrap();
/// # assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
/// # Ok(())
/// # }
/// ```
///
/// The signals are caught from the moment this is called, not when the future is first polled:
/// one that arrives while the server is starting is not lost. From then on SIGINT and SIGTERM
/// no longer end the process by themselves, until a second one comes after the first: that
/// ends the process at once (status 130 for SIGINT, 143 for SIGTERM), however far the drain
/// has got. They are awaited on a small thread with its own tokio runtime, so the future works
/// under [`Serve::run`] (no runtime), under any runtime and on any executor; before the first
/// signal the thread ends when the future is dropped. If the
/// handlers cannot be installed, the error is logged and the future never completes.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};

    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
    let listen = move || {
        let mut done_tx = done_tx;
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        rt.block_on(async move {
            let signals = signal(SignalKind::interrupt())
                .and_then(|int| Ok((int, signal(SignalKind::terminate())?)));
            let (mut int, mut term) = match signals {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let name = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
                _ = done_tx.closed() => return,
            };
            tracing::info!("{name} received");
            let _ = done_tx.send(());
            // A second signal during the drain ends the process at once, as a second Ctrl-C
            // does for most servers (with the status a shell reports for that signal).
            let (name, status) = tokio::select! {
                _ = int.recv() => ("SIGINT", 130),
                _ = term.recv() => ("SIGTERM", 143),
            };
            tracing::warn!("second {name}: exiting now");
            std::process::exit(status);
        });
    };
    let ready = match std::thread::Builder::new()
        .name("hop-signal".into())
        .spawn(listen)
    {
        Ok(_) => ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the signal thread ended"))),
        Err(e) => Err(e),
    };
    if let Err(e) = ready {
        tracing::error!("cannot listen for SIGINT and SIGTERM: {e}");
    }
    async move {
        if done_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
