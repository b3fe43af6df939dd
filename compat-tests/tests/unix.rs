//! Listeners beyond TCP, on both backends: an axum app over Unix sockets (tokio's and std's
//! `UnixListener`), called with hyper's client over a `UnixStream` and with
//! `curl --unix-socket`; `ConnectInfo` over a Unix socket (peer credentials); generic
//! `axum::serve::Listener`s (axum's `tap_io`, and a listener type of the test's own), which hop
//! serves on tokio tasks whatever the backend; read handlers and `hop::ws` over a Unix socket;
//! and graceful shutdown on each.

use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::Path as UrlPath;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use compat_tests::backend_tests;
use futures_util::{SinkExt, StreamExt};
use hop::Backend;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Order {
    item: String,
    qty: u32,
}

/// An ordinary axum app: text, a path parameter, a JSON POST, a slow route.
fn app() -> Router {
    app_with(None)
}

/// [`app`], its slow route saying on `entered` when a request has reached it.
fn app_with(entered: Option<UnboundedSender<()>>) -> Router {
    Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route(
            "/items/{id}",
            get(|UrlPath(id): UrlPath<u32>| async move { format!("item {id}") }),
        )
        .route(
            "/orders",
            post(|Json(o): Json<Order>| async move {
                Json(Order {
                    item: o.item.to_uppercase(),
                    qty: o.qty * 2,
                })
            }),
        )
        .route(
            "/slow",
            get(move || {
                if let Some(tx) = &entered {
                    let _ = tx.send(());
                }
                async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow done"
                }
            }),
        )
}

/// A fresh directory for a socket (removed by the guard), short enough for `sun_path`.
struct SockDir(PathBuf);

impl SockDir {
    fn new(name: &str) -> SockDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hop-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the socket directory");
        SockDir(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("s.sock")
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which kind of Unix listener a test hands to `serve`.
#[derive(Clone, Copy, Debug)]
enum Unix {
    Tokio,
    Std,
}

/// A running server and its serve future.
struct Running {
    handle: hop::Handle,
    task: JoinHandle<io::Result<()>>,
}

impl Running {
    fn spawn<F>(handle: hop::Handle, serve: F) -> Running
    where
        F: IntoFuture<Output = io::Result<()>>,
        F::IntoFuture: Send + 'static,
    {
        Running {
            handle,
            task: tokio::spawn(serve.into_future()),
        }
    }

    /// Shuts down gracefully and waits for the serve future to resolve `Ok`.
    async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the serve future did not resolve after shutdown")
            .expect("the serve task panicked")
            .expect("the serve future failed");
    }
}

/// Serves `make` on a Unix socket at `path`, bound by tokio or std.
async fn serve_unix<A, M>(backend: Backend, kind: Unix, path: &Path, make: A) -> Running
where
    A: hop::IntoConnService<M>,
    M: 'static,
{
    let builder = compat_tests::builder(backend);
    let serve = match kind {
        Unix::Tokio => {
            let l = tokio::net::UnixListener::bind(path).expect("bind a tokio UnixListener");
            builder.serve(l, make)
        }
        Unix::Std => {
            let l = std::os::unix::net::UnixListener::bind(path).expect("bind a std UnixListener");
            builder.serve(l, make)
        }
    };
    // A Unix socket has no IP address.
    assert!(serve.local_addr().is_err());
    let handle = serve.handle();
    assert_eq!(handle.local_addr(), None);
    Running::spawn(handle, serve)
}

/// One HTTP/1.1 request over `io` with hyper's client: status and body.
async fn request<I>(io: I, method: &str, path: &str, json: Option<&str>) -> (u16, String)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .expect("handshake");
    let conn = tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if json.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = Full::new(Bytes::from(json.unwrap_or("").to_owned()));
    let res = tokio::time::timeout(WAIT, sender.send_request(req.body(body).unwrap()))
        .await
        .expect("timed out waiting for the response")
        .expect("request failed");
    let status = res.status().as_u16();
    let body = tokio::time::timeout(WAIT, res.into_body().collect())
        .await
        .expect("timed out reading the body")
        .expect("body")
        .to_bytes();
    drop(sender);
    let _ = conn.await;
    (
        status,
        String::from_utf8(body.to_vec()).expect("utf-8 body"),
    )
}

async fn unix_request(path: &Path, method: &str, uri: &str, json: Option<&str>) -> (u16, String) {
    let io = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect to the Unix socket");
    request(io, method, uri, json).await
}

async fn tcp_request(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    json: Option<&str>,
) -> (u16, String) {
    let io = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect over TCP");
    request(io, method, uri, json).await
}

/// The app's routes, checked over `call`.
async fn check_app<F, Fut>(call: F)
where
    F: Fn(&'static str, &'static str, Option<&'static str>) -> Fut,
    Fut: std::future::Future<Output = (u16, String)>,
{
    assert_eq!(call("GET", "/", None).await, (200, "Hello, World!".into()));
    assert_eq!(
        call("GET", "/items/42", None).await,
        (200, "item 42".into())
    );
    let (status, body) = call("POST", "/orders", Some(r#"{"item":"tea","qty":3}"#)).await;
    assert_eq!(status, 200);
    let order: Order = serde_json::from_str(&body).expect("a JSON order");
    assert_eq!(
        order,
        Order {
            item: "TEA".into(),
            qty: 6
        }
    );
    assert_eq!(call("GET", "/missing", None).await.0, 404);
}

/// `curl --unix-socket`: status and body.
async fn curl_unix(sock: &Path, args: &[&str], path: &str) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .arg("--silent")
        .arg("--show-error")
        .args(["--max-time", "30"])
        .arg("--unix-socket")
        .arg(sock)
        .args(args)
        .args(["--write-out", "\n%{http_code}"])
        .arg(format!("http://localhost{path}"))
        .output()
        .await
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    let (body, code) = text.rsplit_once('\n').expect("curl's status line");
    (code.parse().expect("a status code"), body.to_owned())
}

/// The app over a Unix socket: hyper's client, several requests on one connection, curl.
async fn app_over_unix(backend: Backend, kind: Unix) {
    let dir = SockDir::new("app");
    let sock = dir.sock();
    let server = serve_unix(backend, kind, &sock, app()).await;
    check_app(|m, p, j| unix_request(&sock, m, p, j)).await;

    // Keep-alive: requests in turn on one connection (parked between them on the reactor).
    let io = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    for i in 0..5 {
        sender.ready().await.unwrap();
        let req = http::Request::get(format!("/items/{i}"))
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], format!("item {i}").as_bytes());
    }
    drop(sender);
    let _ = conn.await;

    compat_tests::require_tool("curl", "--version");
    assert_eq!(
        curl_unix(&sock, &[], "/").await,
        (200, "Hello, World!".into())
    );
    let (status, body) = curl_unix(
        &sock,
        &[
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"item":"jam","qty":5}"#,
        ],
        "/orders",
    )
    .await;
    assert_eq!(status, 200);
    let order: Order = serde_json::from_str(&body).unwrap();
    assert_eq!(order.qty, 10);
    assert_eq!(curl_unix(&sock, &[], "/items/7").await.1, "item 7");
    server.stop().await;
}

/// `ConnectInfo` over a Unix socket, as axum's `UdsConnectInfo` example has it.
#[derive(Clone, Debug)]
struct UdsConnectInfo {
    peer_addr: Option<std::os::unix::net::SocketAddr>,
    peer_cred: Option<hop::PeerCred>,
}

impl Connected<hop::IncomingStream<'_>> for UdsConnectInfo {
    fn connect_info(stream: hop::IncomingStream<'_>) -> Self {
        UdsConnectInfo {
            peer_addr: stream.unix_peer_addr().cloned(),
            peer_cred: stream.peer_cred().ok(),
        }
    }
}

async fn who(ConnectInfo(info): ConnectInfo<UdsConnectInfo>) -> String {
    let cred = info.peer_cred.expect("peer credentials");
    let unnamed = info.peer_addr.expect("a Unix peer address").is_unnamed();
    format!(
        "uid={} gid={} pid={} unnamed={unnamed}",
        cred.uid,
        cred.gid,
        cred.pid.map_or(-1, |p| p as i64)
    )
}

/// Graceful shutdown over a Unix socket: a request in flight finishes, the serve future
/// resolves, and the socket accepts no more.
async fn shutdown_over_unix(backend: Backend, kind: Unix) {
    let dir = SockDir::new("drain");
    let sock = dir.sock();
    let (tx, mut entered) = unbounded_channel();
    let server = serve_unix(backend, kind, &sock, app_with(Some(tx))).await;
    assert_eq!(unix_request(&sock, "GET", "/", None).await.0, 200);
    let s = sock.clone();
    let slow = tokio::spawn(async move { unix_request(&s, "GET", "/slow", None).await });
    tokio::time::timeout(WAIT, entered.recv())
        .await
        .expect("the slow request never reached its handler");
    server.stop().await;
    assert_eq!(
        slow.await.unwrap(),
        (200, "slow done".into()),
        "a request in flight finishes during the drain"
    );
    assert!(
        tokio::net::UnixStream::connect(&sock).await.is_err(),
        "the socket still accepts after shutdown"
    );
}

/// A listener type of the test's own: it numbers its connections, and its `Addr` says which.
struct Numbered {
    inner: tokio::net::TcpListener,
    next: Arc<AtomicUsize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Ticket {
    n: usize,
    peer: SocketAddr,
}

impl axum::serve::Listener for Numbered {
    type Io = tokio::net::TcpStream;
    type Addr = Ticket;

    async fn accept(&mut self) -> (Self::Io, Ticket) {
        loop {
            match self.inner.accept().await {
                Ok((io, peer)) => {
                    let n = self.next.fetch_add(1, Ordering::Relaxed);
                    return (io, Ticket { n, peer });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Ticket> {
        Ok(Ticket {
            n: usize::MAX,
            peer: self.inner.local_addr()?,
        })
    }
}

/// `ConnectInfo` from a generic listener's `Addr` (`IncomingStream::remote`).
#[derive(Clone, Debug)]
struct TicketInfo(Option<Ticket>);

impl Connected<hop::IncomingStream<'_>> for TicketInfo {
    fn connect_info(stream: hop::IncomingStream<'_>) -> Self {
        TicketInfo(stream.remote::<Ticket>().copied())
    }
}

backend_tests! {
    async fn app_over_tokio_unix_listener(backend) {
        app_over_unix(backend, Unix::Tokio).await;
    }

    async fn app_over_std_unix_listener(backend) {
        app_over_unix(backend, Unix::Std).await;
    }

    async fn connect_info_over_unix_gives_peer_credentials(backend) {
        for kind in [Unix::Tokio, Unix::Std] {
            let dir = SockDir::new("cred");
            let sock = dir.sock();
            let make = Router::new()
                .route("/who", get(who))
                .into_make_service_with_connect_info::<UdsConnectInfo>();
            let server = serve_unix(backend, kind, &sock, make).await;
            let (status, body) = unix_request(&sock, "GET", "/who", None).await;
            assert_eq!(status, 200, "{kind:?}");
            // SAFETY: getuid and getgid cannot fail and touch no memory.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            assert_eq!(
                body,
                format!("uid={uid} gid={gid} pid={} unnamed=true", std::process::id()),
                "{kind:?}"
            );
            server.stop().await;
        }
    }

    async fn graceful_shutdown_over_tokio_unix_listener(backend) {
        shutdown_over_unix(backend, Unix::Tokio).await;
    }

    async fn graceful_shutdown_over_std_unix_listener(backend) {
        shutdown_over_unix(backend, Unix::Std).await;
    }

    async fn read_handlers_over_unix(backend) {
        struct Echo;
        impl hop::tcp::Handler for Echo {
            fn on_read(&mut self, conn: &mut hop::tcp::Conn, input: &mut BytesMut) -> io::Result<()> {
                let n = input.len().min(conn.write_capacity());
                conn.write(&input.split_to(n))?;
                Ok(())
            }
        }
        let dir = SockDir::new("echo");
        let sock = dir.sock();
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let serve = compat_tests::builder(backend).serve_tcp(listener, |s: hop::IncomingStream<'_>| {
            assert!(s.unix_peer_addr().is_some());
            Echo
        });
        let server = Running::spawn(serve.handle(), serve);
        let mut c = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let msg = vec![7u8; 100_000];
        let (mut rd, mut wr) = c.split();
        let (_, echoed) = tokio::join!(
            async { wr.write_all(&msg).await.unwrap() },
            async {
                let mut got = vec![0u8; msg.len()];
                tokio::time::timeout(WAIT, rd.read_exact(&mut got)).await.unwrap().unwrap();
                got
            }
        );
        assert_eq!(echoed, msg);
        server.stop().await;
    }

    async fn hop_ws_over_unix(backend) {
        struct Echo;
        impl hop::ws::WsHandler for Echo {
            fn on_message(&mut self, ws: &mut hop::ws::WsConn<'_>, msg: hop::ws::Message) -> io::Result<()> {
                ws.send(msg)
            }
        }
        let dir = SockDir::new("ws");
        let sock = dir.sock();
        let app = Router::new().route(
            "/ws",
            get(|up: hop::ws::WsUpgrade| async move { up.on_upgrade(Echo) }),
        );
        let server = serve_unix(backend, Unix::Std, &sock, app).await;
        let io = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let (mut ws, res) = tokio_tungstenite::client_async("ws://localhost/ws", io)
            .await
            .expect("WebSocket handshake");
        assert_eq!(res.status(), 101);
        for text in ["one", "two", "three"] {
            ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await.unwrap();
            let got = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
            assert_eq!(got.into_text().unwrap().as_str(), text);
        }
        ws.close(None).await.unwrap();
        server.stop().await;
    }

    async fn tap_io_listener(backend) {
        use axum::serve::ListenerExt;
        let tapped = Arc::new(AtomicUsize::new(0));
        let t = tapped.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .tap_io(move |tcp| {
                let _ = tcp.set_nodelay(true);
                t.fetch_add(1, Ordering::Relaxed);
            });
        let addr = axum::serve::Listener::local_addr(&listener).unwrap();
        let (tx, mut entered) = unbounded_channel();
        let make = app_with(Some(tx))
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            )
            .into_make_service_with_connect_info::<SocketAddr>();
        let serve = compat_tests::builder(backend).serve(listener, make);
        // Its address is a SocketAddr, so hop reports it.
        assert_eq!(serve.local_addr().unwrap(), addr);
        let server = Running::spawn(serve.handle(), serve);
        assert_eq!(server.handle.local_addr(), Some(addr));
        check_app(|m, p, j| tcp_request(addr, m, p, j)).await;
        // ConnectInfo<SocketAddr> sees the peer: the listener's Addr is a SocketAddr.
        let io = tokio::net::TcpStream::connect(addr).await.unwrap();
        let me = io.local_addr().unwrap();
        assert_eq!(request(io, "GET", "/peer", None).await, (200, me.to_string()));
        assert_eq!(tapped.load(Ordering::Relaxed), 5, "tap_io ran on every connection");

        // Graceful shutdown: a request in flight finishes.
        let slow = tokio::spawn(async move { tcp_request(addr, "GET", "/slow", None).await });
        tokio::time::timeout(WAIT, entered.recv())
            .await
            .expect("the slow request never reached its handler");
        server.stop().await;
        assert_eq!(slow.await.unwrap(), (200, "slow done".into()));
    }

    async fn own_listener_type(backend) {
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let listener = Numbered { inner, next: Arc::new(AtomicUsize::new(0)) };
        let make = app()
            .route(
                "/ticket",
                get(|ConnectInfo(t): ConnectInfo<TicketInfo>| async move {
                    let t = t.0.expect("the listener's Addr");
                    format!("{} {}", t.n, t.peer)
                }),
            )
            .into_make_service_with_connect_info::<TicketInfo>();
        let serve = compat_tests::builder(backend).serve(listener, make);
        // Its address is not a SocketAddr.
        assert!(serve.local_addr().is_err());
        let server = Running::spawn(serve.handle(), serve);
        check_app(|m, p, j| tcp_request(addr, m, p, j)).await;
        let io = tokio::net::TcpStream::connect(addr).await.unwrap();
        let me = io.local_addr().unwrap();
        // Four connections before this one.
        assert_eq!(request(io, "GET", "/ticket", None).await, (200, format!("4 {me}")));
        server.stop().await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener still accepts after shutdown"
        );
    }
}
