//! `hop::shutdown_signal` in a real process. The child (this test binary run again, as
//! `signal_child`) serves a hop::ws echo with `with_graceful_shutdown(hop::shutdown_signal())`;
//! the parent holds a WebSocket open, sends the child SIGTERM or SIGINT, and checks that the
//! WebSocket gets a 1001 (Going Away) close frame and that the child exits with status 0.

use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use compat_tests::backend_tests;
use futures_util::{SinkExt, StreamExt};
use hop::Backend;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Set for the child: `<backend>:<run|await>`, how it serves.
const CHILD: &str = "HOP_SIGNAL_TEST_CHILD";
/// Time for the child to start listening, and for the echo round trip.
const WAIT: Duration = Duration::from_secs(20);
/// Time from the signal to the close frame.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// Time from the signal to the child's exit: the client answers the close, so the drain ends
/// at once (measured in milliseconds); well under the 30 s drain timeout, with room for a loaded
/// machine.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// The child process: serves until SIGINT or SIGTERM, then returns (the process exits 0).
#[test]
#[ignore = "the child process of the signal tests, which start it themselves"]
fn signal_child() {
    let Ok(mode) = std::env::var(CHILD) else {
        eprintln!("{CHILD} is not set: signal_child runs only as the signal tests' child");
        return;
    };
    compat_tests::init_tracing();
    let (backend, how) = mode
        .split_once(':')
        .expect("HOP_SIGNAL_TEST_CHILD=backend:how");
    let backend: Backend = backend.parse().unwrap();
    let app = Router::new().route("/ws", get(compat_tests::ws_echo));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = hop::Server::builder()
        .backend(backend)
        .serve(listener, app)
        .with_graceful_shutdown(hop::shutdown_signal());
    // The signals are caught from here on.
    println!("listening on {addr}");
    let served = match how {
        // No runtime around: `run` starts its own.
        "run" => serve.run(),
        "await" => tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { serve.await }),
        other => panic!("unknown way to serve: {other}"),
    };
    served.expect("the server failed");
    println!("stopped");
}

/// Starts the child serving on `backend` (`how`: `run` or `await`), holds a WebSocket open to it,
/// sends it `signal`, and checks the close frame and the exit status.
async fn signal_stops_server(backend: Backend, how: &str, signal: libc::c_int) {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["signal_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD, format!("{backend}:{how}"))
        .env_remove("HOP_BACKEND")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the child");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = timeout(WAIT, lines.next_line())
            .await
            .expect("the child did not start listening")
            .unwrap()
            .expect("the child ended before listening");
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_owned();
        }
    };
    // Drain the rest of its output.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let (mut ws, _) = timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
    )
    .await
    .expect("the WebSocket handshake timed out")
    .expect("the WebSocket handshake failed");
    ws.send(Message::text("ping")).await.unwrap();
    let echo = timeout(WAIT, ws.next()).await.expect("no echo");
    assert_eq!(echo.unwrap().unwrap(), Message::text("ping"));

    let pid = libc::pid_t::try_from(child.id().expect("the child is running")).unwrap();
    let sent = Instant::now();
    // SAFETY: kill(2) on our own child's pid; it cannot have been reaped, we hold its handle.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill failed");

    match timeout(CLOSE_WITHIN, ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(frame.code, CloseCode::Away),
        Ok(other) => panic!("[{backend}] expected a 1001 close frame, got {other:?}"),
        Err(_) => panic!("[{backend}] no close frame within {CLOSE_WITHIN:?} of the signal"),
    }
    let closed_after = sent.elapsed();
    // Go on as a client does: tungstenite answers the close and reads until the server closes
    // the connection.
    let client = tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });

    let status = timeout(EXIT_WITHIN, child.wait())
        .await
        .unwrap_or_else(|_| panic!("[{backend}] the child did not exit within {EXIT_WITHIN:?}"))
        .unwrap();
    let exited_after = sent.elapsed();
    eprintln!(
        "[{backend}, {how}, signal {signal}] close frame after {closed_after:?}, exit after {exited_after:?}"
    );
    assert!(
        status.success(),
        "[{backend}] the child exited with {status}"
    );
    timeout(WAIT, client)
        .await
        .expect("the WebSocket stayed open after the server exited")
        .unwrap();
}

backend_tests! {
    async fn sigterm_closes_websockets_and_exits_0(backend) {
        signal_stops_server(backend, "run", libc::SIGTERM).await;
    }

    async fn sigint_closes_websockets_and_exits_0(backend) {
        signal_stops_server(backend, "await", libc::SIGINT).await;
    }
}
