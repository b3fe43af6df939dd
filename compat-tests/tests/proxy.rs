//! The PROXY protocol (`Builder::proxy_protocol`) on both backends: behind a real HAProxy with
//! `send-proxy` (v1) and `send-proxy-v2`, `ConnectInfo<SocketAddr>` sees HAProxy's client (its
//! address and source port), not HAProxy; hand-written headers on a raw socket: v2 with TLVs
//! (ALPN, authority, a CRC32c, a type of the proxy's own) seen by a handler, v2 `LOCAL` keeping
//! the socket's address, a header followed by TLS, and by HTTP/2 with prior knowledge; a
//! missing header (plain HTTP straight to the server), malformed ones, and one that stalls (closed
//! at `header_read_timeout`), each closed and counted in `Stats::proxy_header_failures`; and a
//! header over a Unix socket.
//!
//! HAProxy runs in the foreground (`-db`) from a configuration written to a temporary
//! directory; without it the HAProxy tests fail, naming it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Extension, Router};
use compat_tests::{backend_tests, start, unavailable, End, RawConn, TestServer, IO_TIMEOUT};
use hop::proxy::ProxyHeader;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type App = axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Router, SocketAddr>;

/// `/ip`: the client address as `ConnectInfo` sees it; `/header`: the `ProxyHeader` extension.
fn app() -> App {
    Router::new()
        .route(
            "/ip",
            get(|ConnectInfo(addr): ConnectInfo<SocketAddr>| async move { addr.to_string() }),
        )
        .route(
            "/header",
            get(|header: Option<Extension<ProxyHeader>>| async move {
                let Some(Extension(h)) = header else {
                    return "none".to_owned();
                };
                let kinds: Vec<u8> = h.tlvs().map(|t| t.kind).collect();
                format!(
                    "{:?} local={} src={:?} dst={:?} alpn={:?} authority={:?} tlvs={kinds:?} own={:?}",
                    h.version(),
                    h.is_local(),
                    h.source(),
                    h.destination(),
                    h.alpn().map(String::from_utf8_lossy),
                    h.authority(),
                    h.tlv(0xe0).map(String::from_utf8_lossy),
                )
            }),
        )
        .into_make_service_with_connect_info::<SocketAddr>()
}

fn proxied(backend: hop::Backend) -> TestServer {
    start(backend, app(), |b| b.proxy_protocol(true))
}

fn get_req(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
}

/// Waits for the server's `proxy_header_failures` to reach `n` (and checks it goes no further).
async fn failures(srv: &TestServer, n: u64) {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let got = srv.handle.stats().proxy_header_failures;
        assert!(
            got <= n,
            "[{}] {got} header failures, expected {n}",
            srv.backend
        );
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "[{}] {got} header failures after {IO_TIMEOUT:?}, expected {n}",
            srv.backend
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `bytes` on a new connection and expects it closed with no answer.
async fn refused(srv: &TestServer, bytes: &[u8]) {
    let mut conn = RawConn::connect(srv.addr).await;
    conn.send(bytes).await.expect("send");
    let (end, got) = conn.wait_close(IO_TIMEOUT).await;
    assert!(
        end.closed(),
        "[{}] {bytes:?}: not closed: {end:?}",
        srv.backend
    );
    assert!(
        got.is_empty(),
        "[{}] {bytes:?}: answered {:?}",
        srv.backend,
        String::from_utf8_lossy(&got)
    );
}

/// A v2 `PROXY` header over TCP/IPv4 from `src` to `dst`, with `tlvs`.
fn v2_inet(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, &[u8])], crc: bool) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only");
    };
    let mut body = Vec::new();
    body.extend_from_slice(&src.ip().octets());
    body.extend_from_slice(&dst.ip().octets());
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    for (kind, value) in tlvs {
        body.push(*kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    if crc {
        body.extend_from_slice(&[0x03, 0, 4, 0, 0, 0, 0]);
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    if crc {
        let at = h.len() - 4;
        let sum = crc32c(&h);
        h[at..].copy_from_slice(&sum.to_be_bytes());
    }
    h
}

/// CRC-32C, the test's own (bit by bit).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

backend_tests! {
    async fn behind_haproxy_send_proxy_v1(backend) {
        behind_haproxy(backend, "send-proxy", "V1").await;
    }

    async fn behind_haproxy_send_proxy_v2(backend) {
        behind_haproxy(backend, "send-proxy-v2", "V2").await;
    }

    async fn v2_tlvs_reach_the_handler(backend) {
        let srv = proxied(backend);
        let src: SocketAddr = "192.0.2.7:51234".parse().unwrap();
        let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let header = v2_inet(
            src,
            dst,
            &[(0x01, b"h2"), (0x02, b"example.com"), (0xe0, b"mine")],
            true,
        );
        let mut conn = RawConn::connect(srv.addr).await;
        // The header and the first request in one write: only the header's bytes are taken.
        conn.send([&header[..], get_req("/header").as_bytes()].concat()).await.unwrap();
        let res = conn.read_response().await;
        assert_eq!(
            res.text(),
            "V2 local=false src=Some(192.0.2.7:51234) dst=Some(198.51.100.1:443) \
             alpn=Some(\"h2\") authority=Some(\"example.com\") tlvs=[1, 2, 224, 3] own=Some(\"mine\")",
            "[{backend}]"
        );
        // The next request on the connection (the reactor parks it in between) still has it.
        assert_eq!(conn.roundtrip(get_req("/ip")).await.text(), "192.0.2.7:51234");
        // A CRC32c that does not match is refused.
        let mut bad = v2_inet(src, dst, &[(0x02, b"example.com")], true);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        refused(&srv, &[&bad[..], get_req("/ip").as_bytes()].concat()).await;
        failures(&srv, 1).await;
    }

    /// `max_connections_per_ip(1)` behind the PROXY protocol counts the client the header
    /// names, not the proxy's address: two clients through one proxy address are both served;
    /// a second connection of the first, while its first is open, is closed unanswered and
    /// counted; once the first closes, that client is served again.
    async fn per_ip_limit_counts_the_headers_client(backend) {
        let srv = start(backend, app(), |b| b.proxy_protocol(true).max_connections_per_ip(1));
        let v1 = |ip: &str, port: u16| {
            format!("PROXY TCP4 {ip} 127.0.0.1 {port} 80\r\n{}", get_req("/ip"))
        };
        let mut a = RawConn::connect(srv.addr).await;
        a.send(v1("203.0.113.7", 40000)).await.unwrap();
        assert_eq!(a.read_response().await.text(), "203.0.113.7:40000", "[{backend}]");
        let mut b = RawConn::connect(srv.addr).await;
        b.send(v1("198.51.100.9", 40001)).await.unwrap();
        assert_eq!(b.read_response().await.text(), "198.51.100.9:40001", "[{backend}]");
        refused(&srv, v1("203.0.113.7", 40002).as_bytes()).await;
        assert_eq!(srv.handle.stats().rejected_per_ip, 1, "[{backend}]");
        failures(&srv, 0).await;
        drop(a);
        let freed = compat_tests::wait_until(IO_TIMEOUT, || srv.handle.stats().active == 1).await;
        assert!(freed, "[{backend}] {:?}", srv.handle.stats());
        let mut d = RawConn::connect(srv.addr).await;
        d.send(v1("203.0.113.7", 40003)).await.unwrap();
        assert_eq!(d.read_response().await.text(), "203.0.113.7:40003", "[{backend}]");
        drop(b);
    }

    async fn v2_local_and_v1_unknown_keep_the_socket_address(backend) {
        let srv = proxied(backend);
        // v2 LOCAL (a proxy's health check), with an address block that is to be ignored.
        let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02";
        for header in [&local[..], b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ::1 ::2 1 2\r\n"] {
            let mut conn = RawConn::connect(srv.addr).await;
            let me = conn.local_addr();
            conn.send([header, get_req("/ip").as_bytes()].concat()).await.unwrap();
            assert_eq!(conn.read_response().await.text(), me.to_string(), "[{backend}] {header:?}");
            let header_text = conn.roundtrip(get_req("/header")).await.text();
            assert!(header_text.contains("src=None"), "[{backend}] {header_text}");
        }
        failures(&srv, 0).await;
    }

    async fn missing_header_is_refused_and_counted(backend) {
        let srv = proxied(backend);
        // Plain HTTP straight to the server: the spec says not to guess.
        refused(&srv, get_req("/ip").as_bytes()).await;
        failures(&srv, 1).await;
        // HTTP/2's preface is not a header either.
        refused(&srv, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        failures(&srv, 2).await;
        // Nor is a TLS ClientHello's first record header.
        refused(&srv, &[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01]).await;
        failures(&srv, 3).await;
        // Connecting and closing without a byte.
        drop(RawConn::connect(srv.addr).await);
        failures(&srv, 4).await;
        // A good one still works.
        let mut conn = RawConn::connect(srv.addr).await;
        conn.send(format!("PROXY TCP4 203.0.113.9 127.0.0.1 4000 80\r\n{}", get_req("/ip"))).await.unwrap();
        assert_eq!(conn.read_response().await.text(), "203.0.113.9:4000");
    }

    async fn malformed_headers_are_refused_and_counted(backend) {
        let srv = proxied(backend);
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        let mut huge = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
        huge.resize(300, 0);
        let cases: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 80\n".to_vec(),
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 80\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 80 extra\r\n".to_vec(),
            long.into_bytes(),
            // v2: version 3, then a length far over what hop accepts.
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02".to_vec(),
            huge,
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut bytes = case.clone();
            bytes.extend_from_slice(get_req("/ip").as_bytes());
            refused(&srv, &bytes).await;
            failures(&srv, i as u64 + 1).await;
        }
    }

    async fn stalled_header_closes_at_header_read_timeout(backend) {
        const TIMEOUT: Duration = Duration::from_secs(1);
        let srv = start(backend, app(), |b| b.proxy_protocol(true).header_read_timeout(TIMEOUT));
        for partial in [&b"PROXY TCP4 192.0.2."[..], b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x01"] {
            let mut conn = RawConn::connect(srv.addr).await;
            let t0 = Instant::now();
            conn.send(partial).await.unwrap();
            let (end, got) = conn.wait_close(TIMEOUT + IO_TIMEOUT).await;
            let elapsed = t0.elapsed();
            assert!(end.closed(), "[{backend}] not closed: {end:?} after {elapsed:?}");
            assert!(got.is_empty(), "[{backend}] {got:?}");
            assert!(elapsed >= TIMEOUT - Duration::from_millis(100), "[{backend}] closed too early: {elapsed:?}");
        }
        failures(&srv, 2).await;
        // A header sent a byte at a time, within the limit, is read whole.
        let mut conn = RawConn::connect(srv.addr).await;
        let header = b"PROXY TCP6 2001:db8::5 ::1 6000 80\r\n";
        for b in header {
            conn.send([*b]).await.unwrap();
        }
        assert_eq!(conn.roundtrip(get_req("/ip")).await.text(), "[2001:db8::5]:6000");
        failures(&srv, 2).await;
    }

    async fn over_a_unix_socket(backend) {
        let dir = std::env::temp_dir().join(format!("hop-proxy-unix-{}-{backend}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let serve = compat_tests::builder(backend).proxy_protocol(true).serve(listener, app());
        let handle = serve.handle();
        let task = tokio::spawn(std::future::IntoFuture::into_future(serve));
        for (header, want) in [
            (&b"PROXY TCP4 192.0.2.30 192.0.2.1 7000 80\r\n"[..], "192.0.2.30:7000"),
            // No address: a Unix socket's peer has no IP address (see `IncomingStream`).
            (b"PROXY UNKNOWN\r\n", "0.0.0.0:0"),
        ] {
            let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
            stream.write_all(&[header, b"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"].concat()).await.unwrap();
            let mut got = Vec::new();
            let _ = tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut got)).await;
            let got = String::from_utf8_lossy(&got);
            assert!(got.ends_with(&format!("\r\n\r\n{want}")), "[{backend}] {got}");
        }
        let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        stream.write_all(b"GET /ip HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut got)).await;
        assert!(got.is_empty(), "[{backend}] {:?}", String::from_utf8_lossy(&got));
        assert_eq!(handle.stats().proxy_header_failures, 1);
        handle.shutdown();
        let _ = tokio::time::timeout(IO_TIMEOUT, task).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn http2_prior_knowledge_after_the_header(backend) {
        let srv = proxied(backend);
        let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
        let header = v2_inet(
            "192.0.2.8:1234".parse().unwrap(),
            "192.0.2.9:80".parse().unwrap(),
            &[(0x01, b"h2")],
            false,
        );
        tcp.write_all(&header).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        for path in ["/ip", "/header"] {
            let req = http::Request::get(format!("http://localhost{path}"))
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let res = tokio::time::timeout(IO_TIMEOUT, send.send_request(req))
                .await
                .expect("h2 response in time")
                .expect("h2 response");
            assert_eq!(res.version(), http::Version::HTTP_2);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            match path {
                "/ip" => assert_eq!(body, "192.0.2.8:1234", "[{backend}]"),
                _ => assert!(body.contains("alpn=Some(\"h2\")"), "[{backend}] {body}"),
            }
        }
        assert_eq!(srv.handle.stats().http2_connections, 1);
        failures(&srv, 0).await;
    }

    async fn tls_after_a_v1_header(backend) {
        let (server_tls, client_tls) = tls_configs();
        let srv = start(backend, app(), |b| b.proxy_protocol(true).tls(server_tls));
        let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
        tcp.write_all(b"PROXY TCP4 198.51.100.20 127.0.0.1 40000 443\r\n").await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_tls);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp))
            .await
            .expect("handshake in time")
            .expect("TLS handshake after the header");
        tls.write_all(b"GET /ip HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(IO_TIMEOUT, tls.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "[{backend}] {got}");
        assert!(got.ends_with("\r\n\r\n198.51.100.20:40000"), "[{backend}] {got}");
        let stats = srv.handle.stats();
        assert_eq!(stats.tls_handshakes, 1, "[{backend}] {stats:?}");
        failures(&srv, 0).await;
    }
}

/// Where HAProxy is installed, if it is.
fn haproxy_path() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/sbin".into(), "/usr/local/sbin".into()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// HAProxy in the foreground, killed (and its directory removed) on drop.
struct Haproxy {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Haproxy {
    /// Starts HAProxy in TCP mode on a free loopback port, in front of `server` with the
    /// server options `opts` (`send-proxy`, `send-proxy-v2`), and waits until it accepts.
    async fn start(bin: &Path, server: SocketAddr, opts: &str) -> Haproxy {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hop-proxy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().unwrap()
        };
        let cfg = format!(
            "global\n    maxconn 256\n\n\
             defaults\n    mode tcp\n    timeout connect 10s\n    timeout client 60s\n    timeout server 60s\n\n\
             frontend fe\n    bind {addr}\n    default_backend be\n\n\
             backend be\n    server hop {server} {opts}\n"
        );
        let cfg_path = dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, cfg).expect("write haproxy.cfg");
        let log = dir.join("haproxy.log");
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start haproxy");
        let mut haproxy = Haproxy { child, dir, addr };
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                panic!(
                    "haproxy exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            // A probe: it reaches hop as a header and a close, which is no failure.
            if TcpStream::connect(addr).await.is_ok() {
                return haproxy;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen within {IO_TIMEOUT:?}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `/ip` through HAProxy answers HAProxy's client's address and source port; `/header` says
/// which version it sent.
async fn behind_haproxy(backend: hop::Backend, opts: &str, version: &str) {
    let Some(bin) = haproxy_path() else {
        unavailable("haproxy");
    };
    let srv = proxied(backend);
    let haproxy = Haproxy::start(&bin, srv.addr, opts).await;
    for _ in 0..3 {
        let mut conn = RawConn::connect(haproxy.addr).await;
        let me = conn.local_addr();
        assert_eq!(me.ip().to_string(), "127.0.0.1");
        // Keep-alive: two requests on the connection (the reactor parks it in between).
        let ip = conn.roundtrip(get_req("/ip")).await.text();
        assert_eq!(
            ip,
            me.to_string(),
            "[{backend}] {opts}: hop saw HAProxy, not its client"
        );
        let header = conn.roundtrip(get_req("/header")).await.text();
        assert!(
            header.starts_with(&format!("{version} local=false src=Some({me})")),
            "[{backend}] {opts}: {header}"
        );
        assert!(
            header.contains(&format!("dst=Some({})", haproxy.addr)),
            "[{backend}] {opts}: {header}"
        );
        conn.shutdown_write().await.unwrap();
        let (end, rest) = conn.wait_close(IO_TIMEOUT).await;
        assert_eq!((end, rest.len()), (End::Eof, 0), "[{backend}] {opts}");
    }
    failures(&srv, 0).await;
    drop(haproxy);
}

/// A server configuration (a CA-signed certificate for `localhost`, made now) and a client
/// configuration that trusts it.
fn tls_configs() -> (hop::tls::RustlsConfig, Arc<rustls::ClientConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = KeyPair::generate().expect("leaf key");
    let params = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
    let leaf = params.signed_by(&key, &ca).expect("leaf");
    let server =
        hop::tls::RustlsConfig::from_pem(leaf.pem().as_bytes(), key.serialize_pem().as_bytes())
            .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("add CA");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    (server, Arc::new(client))
}
