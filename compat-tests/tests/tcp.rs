//! Read-handler connections (`hop::tcp`) and hijacked HTTP connections (`hop::Hijack`), on both
//! backends, with real sockets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::BytesMut;
use compat_tests::backend_tests;
use hop::tcp::{CloseReason, Conn, Handler};
use hop::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

/// Echoes what fits in the outbound buffer; the rest waits for `on_writable`.
struct Echo {
    log: Log,
}

type Log = Arc<Mutex<Vec<String>>>;

impl Handler for Echo {
    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
        if input.starts_with(b"quit") {
            conn.write(b"bye")?;
            conn.close();
            input.clear();
            return Ok(());
        }
        if input.starts_with(b"boom") {
            panic!("handler asked to panic");
        }
        if input.starts_with(b"fail") {
            return Err(std::io::Error::other("handler asked to fail"));
        }
        let n = input.len().min(conn.write_capacity());
        conn.write(&input.split_to(n))?;
        Ok(())
    }

    fn on_eof(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        self.log.lock().unwrap().push("eof".to_string());
        // Serve half-closed peers: say goodbye after their last byte.
        conn.write(b"<eof>")?;
        conn.close();
        Ok(())
    }

    fn on_close(&mut self, reason: CloseReason) {
        let r = match reason {
            CloseReason::Local => "local",
            CloseReason::Peer => "peer",
            CloseReason::Timeout => "timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error(_) => "error",
            _ => "other",
        };
        self.log.lock().unwrap().push(r.to_string());
    }
}

struct Server {
    addr: SocketAddr,
    handle: hop::Handle,
    log: Log,
}

/// Starts a read-handler server whose `factory` makes each connection's handler.
/// Starts the echo server, its handlers logging why they closed.
fn start(backend: Backend, configure: impl FnOnce(hop::Builder) -> hop::Builder) -> Server {
    let log: Log = Arc::default();
    let l = log.clone();
    let (addr, handle) =
        compat_tests::start_tcp(backend, configure, move |_: hop::IncomingStream<'_>| Echo {
            log: l.clone(),
        });
    Server { addr, handle, log }
}

async fn read_exact_timeout(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("timed out reading")
        .expect("read failed");
    buf
}

async fn read_to_end_timeout(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("timed out waiting for close")
        .expect("read failed");
    buf
}

async fn wait_for_log(log: &Log, entry: &str) {
    for _ in 0..300 {
        if log.lock().unwrap().iter().any(|e| e == entry) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {entry:?} in close log {:?}", log.lock().unwrap());
}

backend_tests! {
    async fn echo_split_byte_by_byte(backend) {
        let srv = start(backend, |b| b);
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let msg = b"hello, event loop";
        for b in msg {
            s.write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(read_exact_timeout(&mut s, msg.len()).await, msg);
        srv.handle.shutdown();
    }

    async fn one_megabyte_to_a_slow_reader(backend) {
        // A 64 KiB outbound bound: the handler must wait for on_writable, nothing may be lost.
        let srv = start(backend, |b| b.max_write_buffer(64 * 1024).max_read_buffer(64 * 1024));
        let s = TcpStream::connect(srv.addr).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&data).await.unwrap();
            wr
        });
        // Read slowly at first, so the server's buffers fill up.
        let mut got = Vec::with_capacity(expected.len());
        let mut buf = vec![0; 4096];
        while got.len() < expected.len() {
            let n = tokio::time::timeout(WAIT, rd.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "server closed early after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            if got.len() < 256 * 1024 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert!(got == expected, "echoed bytes differ");
        drop(writer.await.unwrap());
        srv.handle.shutdown();
    }

    async fn handles_write_and_close_from_other_threads(backend) {
        struct Pusher;
        impl Handler for Pusher {
            fn on_open(&mut self, conn: &mut Conn) -> std::io::Result<()> {
                let h = conn.handle();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        h.write(format!("{i};")).unwrap();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    h.close();
                });
                Ok(())
            }
            fn on_read(&mut self, _: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                input.clear();
                Ok(())
            }
        }
        let (addr, handle) = compat_tests::start_tcp(backend, |b| b, |_: hop::IncomingStream<'_>| Pusher);
        let mut s = TcpStream::connect(addr).await.unwrap();
        let got = String::from_utf8(read_to_end_timeout(&mut s).await).unwrap();
        let want: String = (0..100).map(|i| format!("{i};")).collect();
        assert_eq!(got, want);
        handle.shutdown();
    }

    /// A handle is bounded by its connection's mark while the peer does not read (`Full`,
    /// until the queue drains), its letters keep their order (every write it was allowed,
    /// then its close), it is refused once it has closed the connection (`Closed`), and
    /// `is_closed` says when the connection is gone.
    async fn handles_are_bounded_ordered_and_refused_once_closed(backend) {
        use hop::tcp::{ConnHandle, WriteError};
        struct Give(std::sync::mpsc::Sender<ConnHandle>);
        impl Handler for Give {
            fn on_open(&mut self, conn: &mut Conn) -> std::io::Result<()> {
                conn.set_max_write_buffer(64 * 1024);
                let _ = self.0.send(conn.handle());
                Ok(())
            }
            fn on_read(&mut self, _: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                input.clear();
                Ok(())
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Arc::new(Mutex::new(tx));
        let (addr, handle) = compat_tests::start_tcp(backend, |b| b, move |_: hop::IncomingStream<'_>| {
            Give(tx.lock().unwrap().clone())
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        let h = tokio::task::spawn_blocking(move || rx.recv_timeout(WAIT).unwrap()).await.unwrap();
        // The peer reads nothing: once the kernel's buffers are full, the connection's queue
        // reaches its mark and the handle is refused until it drains.
        let mut written = Vec::new();
        let mut refused = 0;
        while refused < 20 {
            let chunk = vec![(written.len() / 16384 % 251) as u8; 16384];
            match h.write(chunk.clone()) {
                Ok(()) => {
                    written.extend_from_slice(&chunk);
                    refused = 0;
                }
                Err(WriteError::Full { .. }) => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("[{backend}] handle write: {e}"),
            }
            assert!(written.len() < 256 << 20, "[{backend}] the handle is never refused");
        }
        assert!(!h.is_closed());
        h.close();
        assert_eq!(h.write("after the close"), Err(WriteError::Closed), "[{backend}]");
        let got = read_to_end_timeout(&mut s).await;
        assert_eq!(got.len(), written.len(), "[{backend}] bytes received");
        assert!(got == written, "[{backend}] the handle's writes arrive in order");
        for _ in 0..300 {
            if h.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(h.is_closed(), "[{backend}] is_closed after the connection closed");
        assert_eq!(h.write("late"), Err(WriteError::Closed), "[{backend}]");
        handle.shutdown();
    }

    /// A handle used on its connection's own thread (from its handler, on the poller that
    /// drives it) delivers as from any other: an echo through the handle, then its close.
    async fn a_handle_used_from_its_own_handler_delivers(backend) {
        #[derive(Default)]
        struct SelfEcho(Option<hop::tcp::ConnHandle>);
        impl Handler for SelfEcho {
            fn on_open(&mut self, conn: &mut Conn) -> std::io::Result<()> {
                self.0 = Some(conn.handle());
                Ok(())
            }
            fn on_read(&mut self, _: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                let h = self.0.as_ref().unwrap();
                let quit = input.ends_with(b"quit");
                h.write(input.split().freeze())?;
                if quit {
                    h.close();
                }
                Ok(())
            }
        }
        let (addr, handle) = compat_tests::start_tcp(backend, |b| b, |_: hop::IncomingStream<'_>| SelfEcho::default());
        let mut s = TcpStream::connect(addr).await.unwrap();
        for i in 0..50 {
            let line = format!("line {i};");
            s.write_all(line.as_bytes()).await.unwrap();
            let mut got = vec![0; line.len()];
            tokio::time::timeout(WAIT, s.read_exact(&mut got)).await.unwrap().unwrap();
            assert_eq!(got, line.as_bytes(), "[{backend}]");
        }
        s.write_all(b"quit").await.unwrap();
        assert_eq!(read_to_end_timeout(&mut s).await, b"quit", "[{backend}]");
        handle.shutdown();
    }

    async fn conn_knows_its_addresses(backend) {
        struct Addrs;
        impl Handler for Addrs {
            fn on_open(&mut self, conn: &mut Conn) -> std::io::Result<()> {
                let line = format!("{} {}", conn.peer_addr()?, conn.local_addr()?);
                conn.write(line.as_bytes())?;
                conn.close();
                Ok(())
            }
            fn on_read(&mut self, _: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                input.clear();
                Ok(())
            }
        }
        let (addr, handle) = compat_tests::start_tcp(backend, |b| b, |_: hop::IncomingStream<'_>| Addrs);
        let mut s = TcpStream::connect(addr).await.unwrap();
        let me = s.local_addr().unwrap();
        let got = String::from_utf8(read_to_end_timeout(&mut s).await).unwrap();
        assert_eq!(got, format!("{me} {addr}"));
        handle.shutdown();
    }

    async fn server_closes_and_client_closes(backend) {
        let srv = start(backend, |b| b);
        // The server closes (after flushing "bye").
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"quit").await.unwrap();
        assert_eq!(read_to_end_timeout(&mut s).await, b"bye");
        wait_for_log(&srv.log, "local").await;
        // The client closes: the handler hears of it.
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        assert_eq!(read_exact_timeout(&mut s, 1).await, b"x");
        drop(s);
        wait_for_log(&srv.log, "eof").await;
        srv.handle.shutdown();
    }

    async fn half_close_still_gets_answers(backend) {
        let srv = start(backend, |b| b);
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"last words").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_to_end_timeout(&mut s).await, b"last words<eof>");
        srv.handle.shutdown();
    }

    async fn read_timeout_closes(backend) {
        let srv = start(backend, |b| b.read_timeout(Duration::from_millis(300)));
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        assert_eq!(read_exact_timeout(&mut s, 1).await, b"x");
        // Say nothing more: the server must close.
        assert_eq!(read_to_end_timeout(&mut s).await, b"");
        wait_for_log(&srv.log, "timeout").await;
        srv.handle.shutdown();
    }

    async fn error_or_panic_closes_only_that_connection(backend) {
        let srv = start(backend, |b| b);
        let mut healthy = TcpStream::connect(srv.addr).await.unwrap();
        for bad in [&b"boom"[..], b"fail"] {
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(bad).await.unwrap();
            assert_eq!(read_to_end_timeout(&mut s).await, b"");
        }
        wait_for_log(&srv.log, "error").await;
        healthy.write_all(b"still here").await.unwrap();
        assert_eq!(read_exact_timeout(&mut healthy, 10).await, b"still here");
        srv.handle.shutdown();
    }

    async fn five_thousand_connections(backend) {
        // Both ends live in this process: 10,000 descriptors per run, so one run at a time.
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _serial = ONE_AT_A_TIME.lock().await;
        let srv = start(backend, |b| b);
        let mut conns = Vec::new();
        for i in 0..5000u32 {
            let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 100) as u8);
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::from((ip, 0))).unwrap();
            conns.push(sock.connect(srv.addr).await.unwrap());
        }
        for (i, s) in conns.iter_mut().enumerate() {
            s.write_all(format!("{i:05}").as_bytes()).await.unwrap();
        }
        for (i, s) in conns.iter_mut().enumerate() {
            assert_eq!(read_exact_timeout(s, 5).await, format!("{i:05}").as_bytes());
        }
        assert_eq!(srv.handle.stats().active, 5000);
        drop(conns);
        srv.handle.shutdown();
    }

    async fn hijack_keeps_bytes_sent_with_the_upgrade(backend) {
        async fn upgrade(hijack: hop::Hijack) -> impl IntoResponse {
            hijack.on_read(Echo { log: Log::default() });
            (
                StatusCode::SWITCHING_PROTOCOLS,
                [("connection", "upgrade"), ("upgrade", "echo")],
            )
        }
        let app = Router::new()
            .route("/echo", get(upgrade))
            .route("/", get(|| async { "plain" }));
        let srv = compat_tests::start(backend, app, |b| b);
        let (addr, handle) = (srv.addr, srv.handle);

        let mut s = TcpStream::connect(addr).await.unwrap();
        // The upgrade request and the first protocol bytes in one write.
        s.write_all(
            b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nearly bytes",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            tokio::time::timeout(WAIT, s.read_exact(&mut b)).await.unwrap().unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert_eq!(read_exact_timeout(&mut s, 11).await, b"early bytes");
        s.write_all(b"later").await.unwrap();
        assert_eq!(read_exact_timeout(&mut s, 5).await, b"later");
        s.write_all(b"quit").await.unwrap();
        assert_eq!(read_to_end_timeout(&mut s).await, b"bye");
        // Plain HTTP still works next to it.
        let body = reqwest::get(format!("http://{addr}/")).await.unwrap().text().await.unwrap();
        assert_eq!(body, "plain");
        handle.shutdown();
    }

    async fn graceful_shutdown_tells_read_handlers(backend) {
        let srv = start(backend, |b| b.drain_timeout(Duration::from_secs(10)));
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        assert_eq!(read_exact_timeout(&mut s, 1).await, b"x");
        srv.handle.shutdown();
        // The default on_shutdown closes the connection.
        assert_eq!(read_to_end_timeout(&mut s).await, b"");
        for _ in 0..200 {
            if srv.handle.stats().active == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stats = srv.handle.stats();
        assert_eq!(stats.active, 0);
        assert!(stats.drained >= 1, "{stats:?}");
    }
}
