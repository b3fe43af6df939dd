//! TLS (rustls) on both backends: hyper's HTTP/1.1 and HTTP/2 clients over tokio-rustls (ALPN
//! picks the protocol), curl, `openssl s_client` without ALPN, wss with tokio-tungstenite
//! (`hop::ws` and axum's `WebSocketUpgrade`), a hijacked connection, SSE, `TlsInfo`,
//! `close_notify` on close and on graceful shutdown, hostile handshakes (plaintext, garbage, a
//! truncated ClientHello, a stalled and a dribbled one), certificate reload while connections
//! are open, 200 and then 1,000 concurrent handshakes, a SNI resolver (each name its
//! certificate, an unknown name or none rejected), mTLS (`TlsInfo` has the client's chain;
//! another CA's certificate or none rejected), and requests written before the handshake ends
//! (the same flight as the client's Finished, pipelined in one record; HTTP/1.1 and HTTP/2).
//! Certificates are made at test time with rcgen.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Extension, Router};
use bytes::{Bytes, BytesMut};
use compat_tests::{backend_tests, start, start_with_shutdown, IO_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use hop::sse::{Event, Hub};
use hop::tcp::{Conn, Handler};
use hop::tls::{RustlsConfig, TlsInfo};
use hop::ws::{Message, WsConn, WsHandler, WsUpgrade};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message as TMessage;

/// A CA and a leaf certificate for `localhost` and 127.0.0.1 signed by it.
struct Pki {
    ca: CertificateDer<'static>,
    ca_pem: String,
    leaf: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn pki(name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("hop test CA {name}"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("hop test {name}"));
    let leaf = params.signed_by(&key, &ca).expect("leaf");
    Pki {
        ca: ca.der().clone(),
        ca_pem: ca.pem(),
        leaf: leaf.der().clone(),
        cert_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
    }
}

impl Pki {
    fn server_config(&self) -> RustlsConfig {
        RustlsConfig::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
            .expect("server config")
    }
}

/// A file in the temporary directory, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hop-tls-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A rustls client configuration (ring) trusting `cas`, offering `alpn`.
fn client_config(cas: &[&CertificateDer<'static>], alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add((*ca).clone()).expect("add CA");
    }
    let mut cfg =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {IO_TIMEOUT:?}"))
}

async fn tls_connect(addr: SocketAddr, cfg: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .expect("TLS handshake")
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn h1(addr: SocketAddr, cfg: Arc<ClientConfig>) -> H1 {
    let tls = tls_connect(addr, cfg).await;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn.with_upgrades());
    send
}

async fn h2(addr: SocketAddr, cfg: Arc<ClientConfig>) -> H2 {
    let tls = tls_connect(addr, cfg).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// GET `path` on an HTTP/1.1 connection: status, version and body.
async fn get1(send: &mut H1, path: &str) -> (StatusCode, http::Version, String) {
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .expect("request");
    within("GET", async {
        send.ready().await.expect("ready");
        let res = send.send_request(req).await.expect("response");
        let (status, version) = (res.status(), res.version());
        let body = res.into_body().collect().await.expect("body").to_bytes();
        (status, version, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

async fn get2(send: &mut H2, path: &str) -> (StatusCode, http::Version, String) {
    let req = http::Request::get(format!("https://localhost{path}"))
        .body(Empty::new())
        .expect("request");
    within("GET", async {
        send.ready().await.expect("ready");
        let res = send.send_request(req).await.expect("response");
        let (status, version) = (res.status(), res.version());
        let body = res.into_body().collect().await.expect("body").to_bytes();
        (status, version, String::from_utf8_lossy(&body).into_owned())
    })
    .await
}

struct Echo;

impl WsHandler for Echo {
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
        ws.send(msg)
    }
}

struct RawEcho;

impl Handler for RawEcho {
    fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
        Ok(conn.write(&input.split())?)
    }
}

async fn info(Extension(tls): Extension<TlsInfo>, req: Request) -> String {
    format!(
        "sni={} alpn={} version={:?}",
        tls.server_name().unwrap_or("-"),
        tls.alpn_protocol()
            .map_or("-".into(), String::from_utf8_lossy),
        req.version()
    )
}

async fn ws_axum(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.next().await {
            if let AxumMessage::Text(_) | AxumMessage::Binary(_) = msg {
                if socket.send(msg).await.is_err() {
                    break;
                }
            }
        }
    })
}

async fn sse(State(hub): State<Hub>, req: Request) -> Response {
    hub.subscribe(&req).into_response()
}

async fn hijack(hijack: hop::Hijack) -> impl IntoResponse {
    hijack.on_read(RawEcho);
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [("connection", "upgrade"), ("upgrade", "echo")],
    )
}

/// The body size of `/big`: many records, more than the socket takes at once.
const BIG: usize = 1 << 20;

fn app(hub: Hub) -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/info", get(info))
        .route("/ws", get(|u: WsUpgrade| async move { u.on_upgrade(Echo) }))
        .route("/ws-axum", any(ws_axum))
        .route("/sse", get(sse))
        .route("/hijack", get(hijack))
        .route("/big", get(|| async { "x".repeat(BIG) }))
        .with_state(hub)
}

/// Reads until the peer closes: `Ok(bytes)` after a `close_notify`, an error if the connection
/// ended without one.
async fn read_to_close(tls: &mut TlsStream<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    within("the server's close", tls.read_to_end(&mut out)).await?;
    Ok(out)
}

/// Reads from a raw socket until the server closes it (`true`), or `within` passes (`false`).
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all).await.is_ok()
}

/// A ClientHello as a rustls client writes it.
fn client_hello(ca: &CertificateDer<'static>) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(
        client_config(&[ca], &[b"h2", b"http/1.1"]),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    assert!(out.len() > 100, "a ClientHello: {} bytes", out.len());
    out
}

/// Runs a command-line client with `stdin`: its stdout.
async fn run_tool(tool: &str, args: &[&str], stdin: &[u8]) -> String {
    compat_tests::run_tool(tool, args, stdin, IO_TIMEOUT).await
}

backend_tests! {
    /// TLS over a Unix socket and over a generic axum Listener (`tap_io`).
    async fn unix_and_generic_listeners(backend) {
        use axum::serve::ListenerExt;
        let pki = pki("a");
        let dir = TempFile::new("dir", "");
        std::fs::remove_file(&dir.0).expect("remove");
        std::fs::create_dir(&dir.0).expect("mkdir");
        let sock = dir.0.join("s.sock");
        let unix = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let serve = compat_tests::builder(backend).tls(pki.server_config()).serve(unix, app(Hub::new()));
        let unix_handle = serve.handle();
        tokio::spawn(serve.into_future());
        let generic = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = generic.local_addr().expect("addr");
        let generic = generic.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = compat_tests::builder(backend).tls(pki.server_config()).serve(generic, app(Hub::new()));
        let generic_handle = serve.handle();
        tokio::spawn(serve.into_future());

        let cfg = client_config(&[&pki.ca], &[b"http/1.1"]);
        let name = ServerName::try_from("localhost").expect("name");
        let io = within("connect", tokio::net::UnixStream::connect(&sock)).await.expect("connect");
        let tls = within("handshake", tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, io))
            .await
            .expect("handshake over Unix");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("h1");
        tokio::spawn(conn);
        assert_eq!(get1(&mut send, "/info").await.2, "sni=localhost alpn=http/1.1 version=HTTP/1.1", "[{backend}] unix");

        let mut c = h2(addr, client_config(&[&pki.ca], &[b"h2"])).await;
        assert_eq!(get2(&mut c, "/info").await.2, "sni=localhost alpn=h2 version=HTTP/2.0", "[{backend}] generic");
        let mut c = h1(addr, cfg).await;
        assert_eq!(get1(&mut c, "/hello").await.2, "hello", "[{backend}] generic");

        assert_eq!(unix_handle.stats().tls_handshakes, 1, "[{backend}]");
        assert_eq!(generic_handle.stats().tls_handshakes, 2, "[{backend}]");
        unix_handle.shutdown();
        generic_handle.shutdown();
    }

    /// ALPN picks the protocol: `http/1.1` (or no ALPN) gets HTTP/1.1, `h2` HTTP/2; each
    /// request carries a `TlsInfo`; a `Connection: close` ends with `close_notify`.
    async fn http1_and_http2_by_alpn(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));

        let mut c1 = h1(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
        let (status, version, body) = get1(&mut c1, "/info").await;
        assert_eq!(status, StatusCode::OK, "[{backend}]");
        assert_eq!(version, http::Version::HTTP_11, "[{backend}]");
        assert_eq!(body, "sni=localhost alpn=http/1.1 version=HTTP/1.1", "[{backend}]");
        assert_eq!(get1(&mut c1, "/hello").await.2, "hello", "[{backend}] keep-alive");

        let mut c2 = h2(srv.addr, client_config(&[&pki.ca], &[b"h2", b"http/1.1"])).await;
        let (status, version, body) = get2(&mut c2, "/info").await;
        assert_eq!(status, StatusCode::OK, "[{backend}]");
        assert_eq!(version, http::Version::HTTP_2, "[{backend}]");
        assert_eq!(body, "sni=localhost alpn=h2 version=HTTP/2.0", "[{backend}]");

        // No ALPN at all: HTTP/1.1.
        let mut c3 = h1(srv.addr, client_config(&[&pki.ca], &[])).await;
        assert_eq!(
            get1(&mut c3, "/info").await.2,
            "sni=localhost alpn=- version=HTTP/1.1",
            "[{backend}]"
        );

        // `Connection: close`: the response, then close_notify (rustls reports a close
        // without it as an error).
        let mut tls = tls_connect(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
        tls.write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let out = read_to_close(&mut tls).await.expect("a close with close_notify");
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("hello"), "[{backend}] {out}");

        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, 4, "[{backend}] {stats:?}");
        assert_eq!(stats.tls_handshake_failures, 0, "[{backend}] {stats:?}");
        assert_eq!(stats.http2_connections, 1, "[{backend}] {stats:?}");
    }

    /// HTTP/2 off: the server does not offer `h2`, so a client offering both gets HTTP/1.1.
    async fn http2_off_offers_http1_only(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()).http2(false));
        let tls = tls_connect(srv.addr, client_config(&[&pki.ca], &[b"h2", b"http/1.1"])).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "[{backend}]");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        assert_eq!(get1(&mut send, "/hello").await.2, "hello", "[{backend}]");
    }

    /// curl `--http1.1` and `--http2` with `--cacert`.
    async fn curl_over_tls(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let ca = TempFile::new("ca.pem", &pki.ca_pem);
        let resolve = format!("localhost:{}:127.0.0.1", srv.addr.port());
        let url = format!("https://localhost:{}/info", srv.addr.port());
        for (flag, want) in [
            ("--http1.1", "sni=localhost alpn=http/1.1 version=HTTP/1.1\n1.1 200"),
            ("--http2", "sni=localhost alpn=h2 version=HTTP/2.0\n2 200"),
        ] {
            let args = [
                flag, "-sS", "--max-time", "30", "--cacert", ca.path(), "--resolve", &resolve,
                "-w", "\n%{http_version} %{http_code}", &url,
            ];
            let out = run_tool("curl", &args, b"").await;
            assert_eq!(out.trim(), want, "[{backend}] curl {flag}");
        }
    }

    /// `openssl s_client` offers no ALPN: HTTP/1.1.
    async fn openssl_s_client_without_alpn(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let ca = TempFile::new("ca.pem", &pki.ca_pem);
        let connect = srv.addr.to_string();
        let args = [
            "-quiet", "-connect", &connect, "-servername", "localhost", "-CAfile", ca.path(),
            "-verify_return_error",
        ];
        let req = b"GET /info HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
        let out = run_tool("openssl", &["s_client"].iter().chain(&args).copied().collect::<Vec<_>>(), req).await;
        assert!(out.starts_with("HTTP/1.1 200"), "[{backend}] {out}");
        assert!(out.ends_with("sni=localhost alpn=- version=HTTP/1.1"), "[{backend}] {out}");
    }

    /// wss: `hop::ws` and axum's `WebSocketUpgrade`, with tokio-tungstenite over tokio-rustls.
    async fn wss_echo(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        for path in ["/ws", "/ws-axum"] {
            let tls = tls_connect(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
            let url = format!("wss://localhost{path}");
            let (mut ws, res) = within("wss handshake", tokio_tungstenite::client_async(url, tls))
                .await
                .expect("wss handshake");
            assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS, "[{backend}] {path}");
            for i in 0..3 {
                let text = format!("hello {i} over {path}");
                ws.send(TMessage::text(text.clone())).await.expect("send");
                let got = within("echo", ws.next()).await.expect("a message").expect("echo");
                assert_eq!(got, TMessage::text(text), "[{backend}] {path}");
            }
            let big = vec![7u8; 100_000];
            ws.send(TMessage::binary(big.clone())).await.expect("send");
            let got = within("echo", ws.next()).await.expect("a message").expect("echo");
            assert_eq!(got, TMessage::binary(big), "[{backend}] {path}");
            ws.close(None).await.expect("close");
            // The server answers the close, then ends the connection.
            while let Some(Ok(_)) = within("close", ws.next()).await {}
        }
    }

    /// `hop::Hijack` over TLS: the read handler gets the decrypted bytes and its output is
    /// encrypted.
    async fn hijack_over_tls(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let mut tls = tls_connect(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
        tls.write_all(b"GET /hijack HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = within("101", tls.read(&mut buf)).await.expect("read");
            assert!(n > 0, "[{backend}] closed before the 101");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 101"), "[{backend}] {}", String::from_utf8_lossy(&got));
        for msg in [&b"ping"[..], b"and more bytes"] {
            tls.write_all(msg).await.expect("write");
            let mut echo = vec![0u8; msg.len()];
            within("echo", tls.read_exact(&mut echo)).await.expect("echo");
            assert_eq!(echo, msg, "[{backend}]");
        }
    }

    /// A `hop::tcp` read handler served straight on a TLS listener: the handshake comes first
    /// (under its timeout, and counted), then the handler reads decrypted bytes and its output
    /// is encrypted, more than one TLS record's worth included.
    async fn tcp_handler_over_tls(backend) {
        let pki = pki("a");
        let (addr, handle) = compat_tests::start_tcp(
            backend,
            |b| b.tls(pki.server_config()).tls_handshake_timeout(Duration::from_millis(500)),
            |_| RawEcho,
        );
        let mut tls = tls_connect(addr, client_config(&[&pki.ca], &[])).await;
        let big: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        for msg in [&b"hello"[..], &big[..]] {
            tls.write_all(msg).await.expect("write");
            let mut echo = vec![0u8; msg.len()];
            within("the echo", tls.read_exact(&mut echo)).await.expect("echo");
            assert!(echo == msg, "[{backend}] the echo differs");
        }
        // A client that sends nothing is closed at the handshake timeout.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        assert!(closed_within(&mut silent, IO_TIMEOUT).await, "[{backend}] silent: not closed");
        within("the timeout counted", async {
            while handle.stats().tls_handshake_timeouts < 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(handle.stats().tls_handshakes, 1, "[{backend}]");
        // The first connection still echoes.
        tls.write_all(b"still here").await.expect("write");
        let mut echo = [0u8; 10];
        within("the echo", tls.read_exact(&mut echo)).await.expect("echo");
        assert_eq!(&echo, b"still here", "[{backend}]");
    }

    /// A read handler that writes more than the socket takes and closes: the peer still gets
    /// every byte (what TLS held encrypted included), then `close_notify`, not a cut.
    async fn read_handler_close_sends_everything_first(backend) {
        const LEN: usize = 16 << 20;
        struct WriteAndClose;
        impl Handler for WriteAndClose {
            fn on_open(&mut self, conn: &mut Conn) -> std::io::Result<()> {
                conn.write(&vec![7u8; LEN])?;
                conn.close();
                Ok(())
            }
            fn on_read(&mut self, _: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
                input.clear();
                Ok(())
            }
        }
        let pki = pki("a");
        let (addr, _handle) =
            compat_tests::start_tcp(backend, |b| b.tls(pki.server_config()), |_| WriteAndClose);
        // A small receive buffer, not read for a while: the socket fills up, and TLS holds
        // records the socket did not take when the handler closes.
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let tcp = sock.connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client_config(&[&pki.ca], &[]))
            .connect(name, tcp)
            .await
            .expect("handshake");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = within("everything", read_to_close(&mut tls))
            .await
            .expect("a clean close (close_notify), after every byte");
        assert_eq!(got.len(), LEN, "[{backend}]");
        assert!(got.iter().all(|b| *b == 7), "[{backend}]");
    }

    /// Large bodies over TLS: an 8 MiB response to a client that reads slowly (HTTP/1.1), and
    /// 8 MiB streamed up and echoed back as it arrives (HTTP/2, both ways at once).
    async fn large_bodies_over_tls(backend) {
        const LEN: usize = 8 << 20;
        let body: Bytes = (0..LEN).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        let big = body.clone();
        let app = Router::new()
            .route("/big", get(move || async move { big.clone() }))
            .route(
                "/echo",
                axum::routing::post(|req: Request| async move { Response::new(req.into_body()) }),
            );
        let pki = pki("a");
        let srv = start(backend, app, |b| b.tls(pki.server_config()));

        // HTTP/1.1, read slowly: the server's writes wait on the socket, and TLS holds records.
        let tls = tls_connect(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        let req = http::Request::get("/big").header("host", "localhost").body(Empty::new()).unwrap();
        let res = within("the response", send.send_request(req)).await.expect("response");
        let mut res = res.into_body();
        let mut got = Vec::with_capacity(LEN);
        let mut frames = 0;
        while let Some(frame) = within("a body frame", res.frame()).await {
            if let Ok(data) = frame.expect("body").into_data() {
                got.extend_from_slice(&data);
            }
            frames += 1;
            if frames % 64 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert!(got == body, "[{backend}] HTTP/1.1: {} of {LEN} bytes, or different", got.len());

        // HTTP/2: up and back at once.
        let tls = tls_connect(srv.addr, client_config(&[&pki.ca], &[b"h2"])).await;
        let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, http_body_util::Full<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        let req = http::Request::post("https://localhost/echo")
            .body(http_body_util::Full::new(body.clone()))
            .unwrap();
        let res = within("the echo", send.send_request(req)).await.expect("response");
        assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
        let echoed = within("the echo's body", res.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        assert!(echoed == body, "[{backend}] HTTP/2: {} of {LEN} bytes, or different", echoed.len());
    }

    /// An SSE stream (`hop::sse`) over TLS, on HTTP/1.1 and HTTP/2.
    async fn sse_over_tls(backend) {
        let pki = pki("a");
        let hub = Hub::new();
        let srv = start(backend, app(hub.clone()), |b| b.tls(pki.server_config()));
        let mut c1 = h1(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
        let mut c2 = h2(srv.addr, client_config(&[&pki.ca], &[b"h2"])).await;
        let req1 = http::Request::get("/sse").header("host", "localhost").body(Empty::new()).unwrap();
        let req2 = http::Request::get("https://localhost/sse").body(Empty::new()).unwrap();
        let res1 = within("SSE", c1.send_request(req1)).await.expect("response");
        let res2 = within("SSE", c2.send_request(req2)).await.expect("response");
        for res in [&res1, &res2] {
            assert_eq!(res.status(), StatusCode::OK, "[{backend}]");
            assert_eq!(res.headers()["content-type"], "text/event-stream", "[{backend}]");
        }
        within("2 subscribers", async {
            while hub.len() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        hub.send(&Event::new("over tls").id("1"));
        for mut body in [res1.into_body(), res2.into_body()] {
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("data: over tls\n\n") {
                let frame = within("an event", body.frame()).await.expect("a frame").expect("frame");
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
        }
    }

    /// Hostile handshakes each end in a close, are counted, and the server goes on serving:
    /// plaintext HTTP, garbage, a truncated ClientHello, a client that sends nothing and one that
    /// dribbles its ClientHello (both closed at the handshake timeout).
    async fn bad_handshakes_close_cleanly(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| {
            b.tls(pki.server_config()).tls_handshake_timeout(Duration::from_millis(500))
        });
        let hello = client_hello(&pki.ca);
        let wait = IO_TIMEOUT;

        // Plaintext HTTP to the TLS port.
        let mut tcp = TcpStream::connect(srv.addr).await.expect("connect");
        tcp.write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\n\r\n").await.expect("write");
        assert!(closed_within(&mut tcp, wait).await, "[{backend}] plaintext: not closed");

        // Garbage.
        let mut tcp = TcpStream::connect(srv.addr).await.expect("connect");
        tcp.write_all(&[0xffu8; 64]).await.expect("write");
        assert!(closed_within(&mut tcp, wait).await, "[{backend}] garbage: not closed");

        // A truncated ClientHello, then the client's FIN.
        let mut tcp = TcpStream::connect(srv.addr).await.expect("connect");
        tcp.write_all(&hello[..hello.len() / 2]).await.expect("write");
        tcp.shutdown().await.expect("shutdown");
        assert!(closed_within(&mut tcp, wait).await, "[{backend}] truncated: not closed");

        within("the failures counted", async {
            while srv.handle.stats().tls_handshake_failures < 3 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;

        // Nothing at all: closed at the handshake timeout.
        let mut silent = TcpStream::connect(srv.addr).await.expect("connect");
        let started = std::time::Instant::now();
        assert!(closed_within(&mut silent, wait).await, "[{backend}] silent: not closed");
        assert!(started.elapsed() >= Duration::from_millis(400), "[{backend}] closed early");

        // A ClientHello dribbled a byte every 50 ms: closed at the timeout too.
        let mut dribble = TcpStream::connect(srv.addr).await.expect("connect");
        let closed = within("the dribbler's close", async {
            for b in &hello {
                if dribble.write_all(&[*b]).await.is_err() {
                    return true;
                }
                let mut buf = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(50), dribble.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    _ => {}
                }
            }
            false
        })
        .await;
        assert!(closed, "[{backend}] dribbled: the whole ClientHello went through");

        within("the timeouts counted", async {
            while srv.handle.stats().tls_handshake_timeouts < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;

        // Still serving.
        let mut c = h1(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
        assert_eq!(get1(&mut c, "/hello").await.2, "hello", "[{backend}]");
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshake_failures, 3, "[{backend}] {stats:?}");
        assert_eq!(stats.tls_handshake_timeouts, 2, "[{backend}] {stats:?}");
        assert_eq!(stats.tls_handshakes, 1, "[{backend}] {stats:?}");
        within("the bad connections gone", async {
            while srv.handle.stats().active > 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// A reload applies to new handshakes; an open connection keeps working.
    async fn certificate_reload(backend) {
        let (a, b) = (pki("a"), pki("b"));
        let (cert_a, key_a) = (TempFile::new("a.pem", &a.cert_pem), TempFile::new("a.key", &a.key_pem));
        let (cert_b, key_b) = (TempFile::new("b.pem", &b.cert_pem), TempFile::new("b.key", &b.key_pem));
        let config = RustlsConfig::from_pem_file(cert_a.path(), key_a.path()).await.expect("config");
        let srv = start(backend, app(Hub::new()), |bld| bld.tls(config.clone()));
        let trust = client_config(&[&a.ca, &b.ca], &[b"http/1.1"]);

        let old = tls_connect(srv.addr, trust.clone()).await;
        assert_eq!(old.get_ref().1.peer_certificates().expect("certs")[0], a.leaf, "[{backend}]");
        let (mut old, conn) = hyper::client::conn::http1::handshake(TokioIo::new(old))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        assert_eq!(get1(&mut old, "/hello").await.2, "hello", "[{backend}]");

        config.reload_from_pem_file(cert_b.path(), key_b.path()).await.expect("reload");
        // A bad reload keeps the configuration in use.
        assert!(config.reload_from_pem(b"not a cert", b"not a key").is_err());

        let new = tls_connect(srv.addr, trust.clone()).await;
        assert_eq!(new.get_ref().1.peer_certificates().expect("certs")[0], b.leaf, "[{backend}]");
        // A client that trusts only the old CA fails now.
        let tcp = TcpStream::connect(srv.addr).await.expect("connect");
        let only_a = tokio_rustls::TlsConnector::from(client_config(&[&a.ca], &[]));
        let res = within("handshake", only_a.connect(ServerName::try_from("localhost").unwrap(), tcp)).await;
        assert!(res.is_err(), "[{backend}] the old CA still verifies the new certificate");

        assert_eq!(get1(&mut old, "/hello").await.2, "hello", "[{backend}] old connection");
    }

    /// Graceful shutdown ends an idle keep-alive TLS connection with `close_notify`.
    async fn graceful_shutdown_sends_close_notify(backend) {
        let pki = pki("a");
        let (srv, stop) = start_with_shutdown(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let mut tls = tls_connect(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
        tls.write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\n\r\n").await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"hello") {
            let n = within("response", tls.read(&mut buf)).await.expect("read");
            assert!(n > 0, "[{backend}] closed early");
            got.extend_from_slice(&buf[..n]);
        }
        let _ = stop.send(());
        let rest = read_to_close(&mut tls).await.expect("a close with close_notify");
        assert!(rest.is_empty(), "[{backend}] {}", String::from_utf8_lossy(&rest));
        let handle = srv.handle.clone();
        srv.join(IO_TIMEOUT).await;
        let stats = handle.stats();
        assert_eq!(stats.forced, 0, "[{backend}] {stats:?}");
    }

    /// 200 clients handshaking at once.
    async fn concurrent_handshakes(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let cfg = client_config(&[&pki.ca], &[b"h2", b"http/1.1"]);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let cfg = cfg.clone();
            let addr = srv.addr;
            tasks.spawn(async move {
                if i % 2 == 0 {
                    let mut c = h2(addr, cfg).await;
                    get2(&mut c, "/hello").await.2
                } else {
                    let cfg = client_config_h1(&cfg);
                    let mut c = h1(addr, cfg).await;
                    get1(&mut c, "/hello").await.2
                }
            });
        }
        while let Some(res) = tasks.join_next().await {
            assert_eq!(res.expect("client task"), "hello", "[{backend}]");
        }
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, 200, "[{backend}] {stats:?}");
        assert_eq!(stats.http2_connections, 100, "[{backend}] {stats:?}");
    }
}

/// The same client configuration, offering only `http/1.1`.
fn client_config_h1(cfg: &Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut c = (**cfg).clone();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// ring, the crypto provider the tests' own configurations use.
fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA that signs leaf certificates on demand (the SNI and mTLS tests).
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate signed by a [`TestCa`], and its key (PKCS#8 DER).
struct Leaf {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Leaf {
    fn key(&self) -> rustls::pki_types::PrivateKeyDer<'static> {
        rustls::pki_types::PrivatePkcs8KeyDer::from(self.key.clone()).into()
    }
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("hop test CA {name}"));
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA"),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server certificate for `dns` names, or (`dns` empty) a client certificate.
    fn leaf(&self, cn: &str, dns: &[&str]) -> Leaf {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if dns.is_empty() {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        Leaf {
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }
}

/// A TLS connection to `addr` asking for `name` (a DNS name is sent as SNI, an IP address is
/// not): the handshake's error if it fails.
async fn tls_connect_to(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    within(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
}

/// A GET of `path` over a connected TLS stream, on HTTP/2 if ALPN agreed on `h2`, else on
/// HTTP/1.1: the response's body.
async fn get_over(tls: TlsStream<TcpStream>, path: &str) -> String {
    if tls.get_ref().1.alpn_protocol() == Some(&b"h2"[..]) {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        let (status, _, body) = get2(&mut send, path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        let (status, _, body) = get1(&mut send, path).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

/// Whether an error is a TLS alert the peer sent (a clean handshake failure: not a reset, not
/// a timeout).
fn is_alert(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(_))
    )
}

/// A client the server rejects: the handshake fails, or (TLS 1.3, where the client finishes
/// its side before the server has checked its certificate) the first read does. Either way
/// with an alert from the server, and no response.
async fn assert_rejected(addr: SocketAddr, cfg: Arc<ClientConfig>, name: &str, what: &str) {
    let err = match tls_connect_to(addr, cfg, name).await {
        Err(e) => e,
        Ok(mut tls) => {
            let mut out = Vec::new();
            match within("the server's alert", tls.read_to_end(&mut out)).await {
                Err(e) => e,
                Ok(_) => panic!("{what}: served: {}", String::from_utf8_lossy(&out)),
            }
        }
    };
    assert!(
        is_alert(&err),
        "{what}: not an alert from the server: {err}"
    );
}

/// Waits until `stats()` says `failures` handshakes failed.
async fn wait_failures(handle: &hop::Handle, failures: u64) {
    within("the failures counted", async {
        while handle.stats().tls_handshake_failures < failures {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The peer's certificate chain as `TlsInfo` has it: each certificate in hex, comma-separated.
async fn peer(Extension(tls): Extension<TlsInfo>, req: Request) -> String {
    let chain = tls.peer_certificates().map_or("-".to_owned(), |certs| {
        certs.iter().map(|c| hex(c)).collect::<Vec<_>>().join(",")
    });
    format!("{:?} {chain}", req.version())
}

backend_tests! {
    /// A configuration with a SNI resolver (`ResolvesServerCertUsingSni`): each known name gets
    /// its certificate and `TlsInfo::server_name` reports it, on HTTP/1.1 and HTTP/2; an
    /// unknown name, and no SNI at all, fail the handshake with an alert, are counted, and the
    /// server goes on serving.
    async fn sni_resolver_and_an_unknown_name(backend) {
        use rustls::server::ResolvesServerCertUsingSni;
        use rustls::sign::CertifiedKey;
        let ca = TestCa::new("sni");
        let (a, b) = (ca.leaf("a", &["a.test"]), ca.leaf("b", &["b.test"]));
        let mut resolver = ResolvesServerCertUsingSni::new();
        for (name, leaf) in [("a.test", &a), ("b.test", &b)] {
            let key = CertifiedKey::from_der(vec![leaf.cert.clone()], leaf.key(), &ring()).expect("key");
            resolver.add(name, key).expect("add a name");
        }
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        let srv = start(backend, app(Hub::new()), |bld| bld.tls(RustlsConfig::from_config(Arc::new(config))));

        let mut handshakes = 0;
        for (name, leaf) in [("a.test", &a), ("b.test", &b)] {
            for (alpn, version) in [(&b"http/1.1"[..], "HTTP/1.1"), (b"h2", "HTTP/2.0")] {
                let tls = tls_connect_to(srv.addr, client_config(&[&ca.der()], &[alpn]), name)
                    .await
                    .unwrap_or_else(|e| panic!("[{backend}] {name}: {e}"));
                assert_eq!(tls.get_ref().1.peer_certificates().expect("certs")[0], leaf.cert, "[{backend}] {name}");
                let want = format!("sni={name} alpn={} version={version}", String::from_utf8_lossy(alpn));
                assert_eq!(get_over(tls, "/info").await, want, "[{backend}]");
                handshakes += 1;
            }
        }

        let cfg = client_config(&[&ca.der()], &[b"h2", b"http/1.1"]);
        assert_rejected(srv.addr, cfg.clone(), "c.test", &format!("[{backend}] unknown name")).await;
        assert_rejected(srv.addr, cfg.clone(), "127.0.0.1", &format!("[{backend}] no SNI")).await;
        wait_failures(&srv.handle, 2).await;

        let tls = tls_connect_to(srv.addr, cfg, "a.test").await.expect("still serving");
        assert_eq!(get_over(tls, "/info").await, "sni=a.test alpn=h2 version=HTTP/2.0", "[{backend}]");
        handshakes += 1;
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, handshakes, "[{backend}] {stats:?}");
        assert_eq!(stats.tls_handshake_failures, 2, "[{backend}] {stats:?}");
    }

    /// mTLS (`WebPkiClientVerifier` trusting a client CA): a client with a good certificate is
    /// served and `TlsInfo` has the chain it sent, on HTTP/1.1 and HTTP/2; a client with a
    /// certificate from another CA, and one with none, fail with an alert, are counted, and the
    /// server goes on serving.
    async fn mtls_client_certificates(backend) {
        use rustls::pki_types::pem::PemObject;
        let server = pki("a");
        let (clients, others) = (TestCa::new("clients"), TestCa::new("others"));
        let (good, bad) = (clients.leaf("good client", &[]), others.leaf("bad client", &[]));
        let mut roots = RootCertStore::empty();
        roots.add(clients.der()).expect("client CA");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), ring())
            .build()
            .expect("verifier");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server.leaf.clone()], key)
            .expect("server config");
        let app = app(Hub::new()).route("/peer", get(peer));
        let srv = start(backend, app, |bld| bld.tls(RustlsConfig::from_config(Arc::new(config))));

        let client = |alpn: &[u8], leaf: Option<&Leaf>, ca: &TestCa| {
            let mut roots = RootCertStore::empty();
            roots.add(server.ca.clone()).expect("server CA");
            let builder = ClientConfig::builder_with_provider(ring())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots);
            let mut cfg = match leaf {
                Some(leaf) => builder
                    .with_client_auth_cert(vec![leaf.cert.clone(), ca.der()], leaf.key())
                    .expect("client certificate"),
                None => builder.with_no_client_auth(),
            };
            cfg.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(cfg)
        };

        let chain = format!("{},{}", hex(&good.cert), hex(&clients.der()));
        for (alpn, version) in [(&b"http/1.1"[..], "HTTP/1.1"), (b"h2", "HTTP/2.0")] {
            let tls = tls_connect_to(srv.addr, client(alpn, Some(&good), &clients), "localhost")
                .await
                .unwrap_or_else(|e| panic!("[{backend}] good client: {e}"));
            assert_eq!(get_over(tls, "/peer").await, format!("{version} {chain}"), "[{backend}]");
        }

        let (to_other, none) = (client(b"http/1.1", Some(&bad), &others), client(b"http/1.1", None, &clients));
        assert_rejected(srv.addr, to_other, "localhost", &format!("[{backend}] another CA")).await;
        assert_rejected(srv.addr, none, "localhost", &format!("[{backend}] no certificate")).await;
        wait_failures(&srv.handle, 2).await;

        let tls = tls_connect_to(srv.addr, client(b"h2", Some(&good), &clients), "localhost")
            .await
            .expect("still serving");
        assert_eq!(get_over(tls, "/peer").await, format!("HTTP/2.0 {chain}"), "[{backend}]");
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, 3, "[{backend}] {stats:?}");
        assert_eq!(stats.tls_handshake_failures, 2, "[{backend}] {stats:?}");
    }
}

/// A socket that counts the client's writes (rustls writes all it has in one vectored write).
struct CountedWrites(std::net::TcpStream, usize);

impl std::io::Read for CountedWrites {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(&mut self.0, buf)
    }
}

impl std::io::Write for CountedWrites {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1 += 1;
        self.0.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.1 += 1;
        self.0.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Writes `early` in one piece into a rustls client before its handshake has started: rustls
/// holds it, then sends it in one record right after its Finished (TLS 1.3: in the same flight
/// as the end of the server's handshake). Drives the client by hand over a blocking socket and
/// reads until `done` says so or the server closes with `close_notify`: everything the server
/// sent, and how many writes the client made on the socket.
fn early_exchange(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    early: &[u8],
    done: impl Fn(&[u8]) -> bool,
) -> (Vec<u8>, usize) {
    use std::io::{Read, Write};
    let mut conn = rustls::ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap())
        .expect("client connection");
    assert!(conn.is_handshaking());
    conn.writer().write_all(early).expect("early plaintext");
    let sock = std::net::TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    sock.set_nodelay(true).expect("nodelay");
    let mut sock = CountedWrites(sock, 0);
    let mut stream = rustls::Stream::new(&mut conn, &mut sock);
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while !done(&out) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading the responses (after {:?}): {e}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    (out, sock.1)
}

/// The complete HTTP/2 frames at the start of `bytes`: (type, flags, stream, payload).
fn h2_frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, &[u8])> {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        frames.push((bytes[3], bytes[4], stream, &bytes[9..9 + len]));
        bytes = &bytes[9 + len..];
    }
    frames
}

/// An HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A GET of `path` on `stream` (HPACK without Huffman or indexing), ending the stream.
fn h2_get(stream: u32, path: &str) -> Vec<u8> {
    // :method GET, :scheme https (static table), :path and :authority literal values.
    let mut block = vec![0x82, 0x87, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    h2_frame(0x1, 0x4 | 0x1, stream, &block)
}

/// The body of `stream` (its DATA frames) once the stream has ended, else `None`.
fn h2_body(frames: &[(u8, u8, u32, &[u8])], stream: u32) -> Option<String> {
    let ours = frames.iter().filter(|f| f.2 == stream);
    if !ours
        .clone()
        .any(|f| (f.0 == 0x0 || f.0 == 0x1) && f.1 & 0x1 != 0)
    {
        return None;
    }
    let data = ours
        .filter(|f| f.0 == 0x0)
        .flat_map(|f| f.3.iter().copied());
    Some(String::from_utf8_lossy(&data.collect::<Vec<_>>()).into_owned())
}

/// A client configuration trusting `ca`, with one protocol version and `alpn` (none if empty).
fn client_config_version(
    ca: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
    alpn: &[u8],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("CA");
    let mut cfg = ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !alpn.is_empty() {
        cfg.alpn_protocols = vec![alpn.to_vec()];
    }
    Arc::new(cfg)
}

/// Raises this process's soft limit on open files to at least `want` (up to the hard limit).
fn at_least_open_files(want: libc::rlim_t) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid `rlimit`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = lim.rlim_max.min(want);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    assert!(
        lim.rlim_cur >= want,
        "the open-file limit ({}) is too low for this test",
        lim.rlim_cur
    );
}

backend_tests! {
    /// A request in the same TLS record, and flight, as the client's Finished, and pipelined
    /// requests in one record: rustls on the server decrypts them all at once with the end of
    /// the handshake, and each is answered (TLS 1.3 and 1.2, ALPN `http/1.1` and none).
    async fn requests_in_the_handshake_flight(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let mut handshakes = 0;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            for alpn in [&b"http/1.1"[..], b""] {
                let (addr, cfg) = (srv.addr, client_config_version(&pki.ca, version, alpn));
                let (out, writes) = within(
                    "3 responses",
                    tokio::task::spawn_blocking(move || {
                        let requests = b"GET /hello HTTP/1.1\r\nhost: localhost\r\n\r\n\
                            GET /info HTTP/1.1\r\nhost: localhost\r\n\r\n\
                            GET /hello HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
                        // Until the server closes (the last request says `Connection: close`).
                        early_exchange(addr, cfg, requests, |_| false)
                    }),
                )
                .await
                .expect("client thread");
                let out = String::from_utf8_lossy(&out);
                let what = format!("[{backend}] {version:?} alpn {:?}", String::from_utf8_lossy(alpn));
                if version == &rustls::version::TLS13 {
                    // The ClientHello, then the Finished with the requests: one flight.
                    assert_eq!(writes, 2, "{what}: the requests went in a flight of their own");
                }
                assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{what}: {out}");
                let alpn = if alpn.is_empty() { "-".into() } else { String::from_utf8_lossy(alpn) };
                let info = format!("sni=localhost alpn={alpn} version=HTTP/1.1");
                let (first, rest) = out.split_once(&info).unwrap_or_else(|| panic!("{what}: {out}"));
                assert!(first.contains("\r\n\r\nhelloHTTP/1.1 200 OK\r\n") && first.ends_with("\r\n\r\n"), "{what}: {out}");
                assert!(rest.ends_with("\r\n\r\nhello"), "{what}: {out}");
                handshakes += 1;
            }
        }
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, handshakes, "[{backend}] {stats:?}");
        assert_eq!(stats.tls_handshake_failures, 0, "[{backend}] {stats:?}");
    }

    /// The same over HTTP/2 (ALPN `h2`): the client preface, SETTINGS and two GETs on streams 1
    /// and 3 in one record with the client's Finished; both are answered, and `TlsInfo` says
    /// `h2` (TLS 1.3 and 1.2).
    async fn h2_requests_in_the_handshake_flight(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (addr, cfg) = (srv.addr, client_config_version(&pki.ca, version, b"h2"));
            let (out, writes) = within(
                "2 responses",
                tokio::task::spawn_blocking(move || {
                    let mut early = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                    early.extend(h2_frame(0x4, 0, 0, &[]));
                    early.extend(h2_get(1, "/hello"));
                    early.extend(h2_get(3, "/info"));
                    early_exchange(addr, cfg, &early, |out| {
                        let frames = h2_frames(out);
                        h2_body(&frames, 1).is_some() && h2_body(&frames, 3).is_some()
                    })
                }),
            )
            .await
            .expect("client thread");
            let what = format!("[{backend}] {version:?}");
            if version == &rustls::version::TLS13 {
                assert_eq!(writes, 2, "{what}: the requests went in a flight of their own");
            }
            let frames = h2_frames(&out);
            assert!(!frames.iter().any(|f| f.0 == 0x7), "{what}: GOAWAY: {frames:?}");
            assert_eq!(h2_body(&frames, 1).as_deref(), Some("hello"), "{what}: {frames:?}");
            assert_eq!(
                h2_body(&frames, 3).as_deref(),
                Some("sni=localhost alpn=h2 version=HTTP/2.0"),
                "{what}: {frames:?}"
            );
        }
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, 2, "[{backend}] {stats:?}");
        assert_eq!(stats.http2_connections, 2, "[{backend}] {stats:?}");
    }

    /// 1,000 clients handshaking at once (half HTTP/2, half HTTP/1.1), every connection kept
    /// open until all are served. No per-step timeouts: a loaded machine gets one generous
    /// deadline for the lot.
    async fn thousand_concurrent_handshakes(backend) {
        const N: usize = 1000;
        // Two sockets a connection, and both backends' runs of this test may overlap.
        at_least_open_files(4 * N as libc::rlim_t + 1000);
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let cfg_h2 = client_config(&[&pki.ca], &[b"h2"]);
        let cfg_h1 = client_config(&[&pki.ca], &[b"http/1.1"]);
        let all = async {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..N {
                let (addr, cfg) = (srv.addr, if i % 2 == 0 { cfg_h2.clone() } else { cfg_h1.clone() });
                tasks.spawn(async move {
                    let tcp = TcpStream::connect(addr).await.expect("connect");
                    let name = ServerName::try_from("localhost").unwrap();
                    let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.expect("handshake");
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(&b"h2"[..]);
                    assert_eq!(h2, i % 2 == 0, "ALPN");
                    let res = if h2 {
                        let (mut send, conn) =
                            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                                .await
                                .expect("HTTP/2 handshake");
                        let conn = tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        let req = http::Request::get("https://localhost/hello").body(Empty::<Bytes>::new()).unwrap();
                        let res = send.send_request(req).await;
                        (res, conn, Box::new(send) as Box<dyn std::any::Any + Send>)
                    } else {
                        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                            .await
                            .expect("HTTP/1.1 handshake");
                        let conn = tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        let req = http::Request::get("/hello").header("host", "localhost").body(Empty::<Bytes>::new()).unwrap();
                        let res = send.send_request(req).await;
                        (res, conn, Box::new(send) as Box<dyn std::any::Any + Send>)
                    };
                    let (res, conn, send) = res;
                    let body = res.expect("response").into_body().collect().await.expect("body").to_bytes();
                    // The sender and the connection's task keep the connection open.
                    (body, (conn, send))
                });
            }
            let mut conns = Vec::with_capacity(N);
            while let Some(res) = tasks.join_next().await {
                let (body, conn) = res.expect("client task");
                assert_eq!(body, "hello", "[{backend}]");
                conns.push(conn);
            }
            conns
        };
        let conns = tokio::time::timeout(Duration::from_secs(100), all)
            .await
            .unwrap_or_else(|_| panic!("[{backend}] {N} handshakes not done in 100 s: {:?}", srv.handle.stats()));
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, N as u64, "[{backend}] {stats:?}");
        assert_eq!(stats.tls_handshake_failures + stats.tls_handshake_timeouts, 0, "[{backend}] {stats:?}");
        assert_eq!(stats.http2_connections, N as u64 / 2, "[{backend}] {stats:?}");
        assert_eq!(stats.active, N as u64, "[{backend}] all open at once: {stats:?}");
        for (conn, send) in conns {
            drop(send);
            conn.abort();
        }
    }
}

/// Waits until the reactor has parked `n` connections in all (an idle keep-alive connection
/// parks 250 ms after its last response, by default); on the tokio backend, which never parks,
/// waits as long.
async fn idle_until_parked(srv: &compat_tests::TestServer, n: u64) {
    match srv.backend {
        hop::Backend::Reactor => {
            within("parking", async {
                while srv.handle.stats().parked < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
        }
        hop::Backend::Tokio => {
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(
                srv.handle.stats().parked,
                0,
                "the tokio backend parks nothing"
            );
        }
    }
}

/// GET `path` over HTTP/1.1 written by hand on a TLS stream: the body (by its Content-Length).
async fn raw_get(tls: &mut TlsStream<TcpStream>, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    within("GET", async {
        tls.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = tls.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed before the response's end: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .expect("content-length")
                .trim()
                .parse()
                .expect("length");
            if buf.len() >= end + 4 + len {
                assert_eq!(buf.len(), end + 4 + len, "nothing after the response");
                return String::from_utf8_lossy(&buf[end + 4..]).into_owned();
            }
        }
    })
    .await
}

backend_tests! {
    /// An idle TLS keep-alive connection parks (the reactor keeps no buffer for it then, only
    /// rustls's session state) and serves its next request with the same session: decrypted
    /// and answered under the same keys, `TlsInfo` as it was (SNI, ALPN), after a key update
    /// from the client, a large response after it, and `close_notify` when it closes.
    async fn idle_tls_connection_parks_and_serves_again(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let mut tls = tls_connect(srv.addr, client_config(&[&pki.ca], &[b"http/1.1"])).await;
        let info = "sni=localhost alpn=http/1.1 version=HTTP/1.1";
        assert_eq!(raw_get(&mut tls, "/info").await, info, "[{backend}]");
        idle_until_parked(&srv, 1).await;
        assert_eq!(raw_get(&mut tls, "/info").await, info, "[{backend}] after parking");
        idle_until_parked(&srv, 2).await;
        // A TLS 1.3 key update (sent before the next request) on a parked connection.
        tls.get_mut().1.refresh_traffic_keys().expect("key update");
        assert_eq!(raw_get(&mut tls, "/info").await, info, "[{backend}] after a key update");
        idle_until_parked(&srv, 3).await;
        assert_eq!(raw_get(&mut tls, "/big").await.len(), BIG, "[{backend}] a large response");
        idle_until_parked(&srv, 4).await;
        tls.write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let out = read_to_close(&mut tls).await.expect("a close with close_notify");
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("hello"), "[{backend}] {out}");
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, 1, "[{backend}] one session throughout: {stats:?}");
    }

    /// HTTP/2 over TLS: an idle connection (never parked, its buffers given back) serves its
    /// next requests on the same session.
    async fn idle_h2_tls_connection_serves_again(backend) {
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let mut c = h2(srv.addr, client_config(&[&pki.ca], &[b"h2"])).await;
        let info = "sni=localhost alpn=h2 version=HTTP/2.0";
        assert_eq!(get2(&mut c, "/info").await.2, info, "[{backend}]");
        for round in 0..2 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(get2(&mut c, "/info").await.2, info, "[{backend}] after idling ({round})");
            assert_eq!(get2(&mut c, "/big").await.2.len(), BIG, "[{backend}] ({round})");
        }
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, 1, "[{backend}] {stats:?}");
        assert_eq!(stats.http2_connections, 1, "[{backend}] {stats:?}");
    }

    /// `openssl s_client` (OpenSSL's TLS, no ALPN): a request, the connection parks, then a
    /// second request with `Connection: close` on the same session.
    async fn openssl_s_client_after_parking(backend) {
        use tokio::io::AsyncBufReadExt;
        let pki = pki("a");
        let srv = start(backend, app(Hub::new()), |b| b.tls(pki.server_config()));
        let ca = TempFile::new("ca.pem", &pki.ca_pem);
        let connect = srv.addr.to_string();
        let child = tokio::process::Command::new("openssl")
            .args([
                "s_client", "-quiet", "-connect", &connect, "-servername", "localhost",
                "-CAfile", ca.path(), "-verify_return_error",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                compat_tests::unavailable("openssl");
            }
            Err(e) => panic!("running openssl: {e}"),
        };
        let mut input = child.stdin.take().expect("stdin");
        let mut output = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
        let info = "sni=localhost alpn=- version=HTTP/1.1";
        input.write_all(b"GET /info HTTP/1.1\r\nhost: localhost\r\n\r\n").await.expect("write");
        // The first response ends with its body, which has no newline: read up to it.
        let mut first = Vec::new();
        within("the first response", async {
            while !first.ends_with(info.as_bytes()) {
                let buf = output.fill_buf().await.expect("read");
                assert!(!buf.is_empty(), "[{backend}] s_client ended: {}", String::from_utf8_lossy(&first));
                first.extend_from_slice(buf);
                let n = buf.len();
                output.consume(n);
            }
        })
        .await;
        assert!(first.starts_with(b"HTTP/1.1 200"), "[{backend}] {}", String::from_utf8_lossy(&first));
        idle_until_parked(&srv, 1).await;
        input
            .write_all(b"GET /info HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        drop(input);
        let mut rest = String::new();
        within("the second response and the close", output.read_to_string(&mut rest))
            .await
            .expect("read");
        assert!(rest.starts_with("HTTP/1.1 200") && rest.ends_with(info), "[{backend}] {rest}");
        within("s_client's exit", child.wait()).await.expect("wait");
    }
}
