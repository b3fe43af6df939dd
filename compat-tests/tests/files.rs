//! `hop::fs::ServeDir` against tower-http's `ServeDir` on axum::serve, byte for byte: the same
//! requests (whole files, `HEAD`, single, suffix, open and multiple ranges, unsatisfiable
//! ranges, conditional requests, 404, directories with and without a slash, percent-encoded
//! names, traversal, `POST`) get the same status, headers (but `date`) and body, on both
//! backends. On the reactor the bodies of `200` and `206` `GET`s go out with sendfile(2)
//! (`Stats::files_sent`); keep-alive, pipelining, HTTP/1.0, a slow reader, HTTP/2 and TLS
//! (which keep tower-http's body) are checked too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use compat_tests::{backend_tests, run_tool, start, Backend, IO_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A directory of test files, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const BIG: usize = 4 << 20;

fn big_bytes() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

fn files() -> Dir {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hop-files-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("small.txt"), "hello, files\n").expect("write");
    std::fs::write(dir.join("big.bin"), big_bytes()).expect("write");
    std::fs::write(dir.join("with space.txt"), "spaced\n").expect("write");
    std::fs::write(dir.join("sub/index.html"), "<p>index</p>\n").expect("write");
    std::fs::write(dir.join("empty.txt"), "").expect("write");
    Dir(dir)
}

/// One request on a new connection, read to its end.
async fn fetch(addr: SocketAddr, request: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    out
}

/// The status line, the headers but `date` (sorted), and the body.
fn normalize(raw: &[u8]) -> (String, Vec<String>, Vec<u8>) {
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..at]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("").to_owned();
    let mut headers: Vec<String> = lines
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .map(|l| l.to_ascii_lowercase())
        .collect();
    headers.sort();
    (status, headers, raw[at + 4..].to_vec())
}

fn requests(dir: &Path) -> Vec<String> {
    let modified = std::fs::metadata(dir.join("big.bin"))
        .and_then(|m| m.modified())
        .expect("mtime");
    let later = httpdate::fmt_http_date(modified + Duration::from_secs(3600));
    let earlier = httpdate::fmt_http_date(modified - Duration::from_secs(3600));
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{extra}\r\n")
    };
    vec![
        get("/small.txt", ""),
        get("/big.bin", ""),
        "HEAD /big.bin HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_owned(),
        get("/big.bin", "range: bytes=100-199\r\n"),
        get("/big.bin", "range: bytes=-500\r\n"),
        get("/big.bin", "range: bytes=4194000-\r\n"),
        get("/big.bin", "range: bytes=0-1,5-6\r\n"),
        get("/big.bin", "range: bytes=99999999-\r\n"),
        get("/big.bin", "range: nonsense\r\n"),
        get("/big.bin", &format!("if-modified-since: {later}\r\n")),
        get("/big.bin", &format!("if-modified-since: {earlier}\r\n")),
        get("/big.bin", &format!("if-unmodified-since: {earlier}\r\n")),
        get("/missing", ""),
        get("/sub", ""),
        get("/sub/", ""),
        get("/sub/index.html", ""),
        get("/with%20space.txt", ""),
        get("/../small.txt", ""),
        get("/%2e%2e/small.txt", ""),
        get("/empty.txt", ""),
        "POST /small.txt HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            .to_owned(),
    ]
}

/// axum::serve with tower-http's `ServeDir`: the reference.
async fn reference(dir: &Path) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().fallback_service(tower_http::services::ServeDir::new(dir));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

backend_tests! {
    async fn same_answers_as_tower_http_serve_dir(backend) {
        let dir = files();
        let want = reference(&dir.0).await;
        let srv = start(
            backend,
            Router::new().fallback_service(hop::fs::ServeDir::new(&dir.0)),
            |b| b,
        );
        let mut zero_copy = 0;
        for req in requests(&dir.0) {
            let expected = normalize(&fetch(want, &req).await);
            let got = normalize(&fetch(srv.addr, &req).await);
            let line = req.lines().next().unwrap_or("").to_owned();
            assert_eq!(got.0, expected.0, "[{backend}] {req:?}");
            assert_eq!(got.1, expected.1, "[{backend}] {req:?}");
            assert!(got.2 == expected.2, "[{backend}] {line}: bodies differ ({} vs {} bytes)", got.2.len(), expected.2.len());
            let ok = expected.0.contains(" 200 ") || expected.0.contains(" 206 ");
            if req.starts_with("GET") && ok && !expected.2.is_empty() {
                zero_copy += 1;
            }
        }
        assert!(zero_copy >= 8, "[{backend}] only {zero_copy} file bodies compared");
        let sent = srv.handle.stats().files_sent;
        match backend {
            Backend::Reactor => assert_eq!(sent, zero_copy, "[{backend}] bodies sent with sendfile"),
            Backend::Tokio => assert_eq!(sent, 0, "[{backend}]"),
        }
    }

    async fn keep_alive_pipelining_and_a_slow_reader(backend) {
        let dir = files();
        let srv = start(
            backend,
            Router::new().fallback_service(hop::fs::ServeDir::new(&dir.0)),
            |b| b,
        );
        let big = big_bytes();
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        // Two requests in one write: the second waits behind the file.
        s.write_all(b"GET /big.bin HTTP/1.1\r\nhost: x\r\n\r\nGET /small.txt HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        // Read slowly: the socket fills and the file goes out over many writable edges.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let end_of = |got: &[u8]| got.windows(13).any(|w| w == b"hello, files\n");
        while !end_of(&got) {
            let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf))
                .await
                .expect("in time")
                .expect("read");
            assert!(n > 0, "[{backend}] closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            if got.len() < BIG / 2 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let text = String::from_utf8_lossy(&got[..200.min(got.len())]).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "[{backend}] {text}");
        let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
        assert!(got[body_at..body_at + BIG] == big[..], "[{backend}] the file's bytes");
        let second = String::from_utf8_lossy(&got[body_at + BIG..]).into_owned();
        assert!(second.starts_with("HTTP/1.1 200") && second.ends_with("hello, files\n"), "[{backend}] {second}");
        // The connection goes on.
        s.write_all(b"GET /with%20space.txt HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        // (The head and the file may come in separate reads.)
        let mut third = Vec::new();
        while !third.ends_with(b"spaced\n") {
            let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut buf)).await.expect("in time").expect("read");
            assert!(n > 0, "[{backend}] closed: {}", String::from_utf8_lossy(&third));
            third.extend_from_slice(&buf[..n]);
        }
        assert!(third.starts_with(b"HTTP/1.1 200"), "[{backend}]");
        // HTTP/1.0 without keep-alive: the file, then the end of the connection.
        let raw = fetch(srv.addr, "GET /big.bin HTTP/1.0\r\n\r\n").await;
        let (status, _, body) = normalize(&raw);
        assert!(status.starts_with("HTTP/1.0 200"), "[{backend}] {status}");
        assert!(body == big, "[{backend}] HTTP/1.0 body: {} bytes", body.len());
        if backend == Backend::Reactor {
            assert!(srv.handle.stats().files_sent >= 3, "[{backend}] {:?}", srv.handle.stats());
        }
    }

    async fn http2_and_tls_keep_tower_https_body(backend) {
        let dir = files();
        let srv = start(
            backend,
            Router::new().fallback_service(hop::fs::ServeDir::new(&dir.0)),
            |b| b,
        );
        let out = run_tool(
            "curl",
            &["-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download} %{http_version}", &srv.url("/big.bin")],
            b"",
            IO_TIMEOUT,
        )
        .await;
        assert_eq!(out, format!("{BIG} 2"), "[{backend}] h2c body length and version");
        assert_eq!(srv.handle.stats().files_sent, 0, "[{backend}] h2c used sendfile");
        assert!(srv.handle.stats().http2_streams >= 1, "[{backend}]");

        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let tls = hop::tls::RustlsConfig::from_pem(
            cert.cert.pem().as_bytes(),
            cert.signing_key.serialize_pem().as_bytes(),
        )
        .expect("config");
        let srv = start(
            backend,
            Router::new().fallback_service(hop::fs::ServeDir::new(&dir.0)),
            |b| b.tls(tls),
        );
        let url = format!("https://localhost:{}/big.bin", srv.addr.port());
        let resolve = format!("localhost:{}:127.0.0.1", srv.addr.port());
        let out = run_tool(
            "curl",
            &["-s", "-k", "--http1.1", "--resolve", &resolve, "-r", "10-4194303", "-o", "/dev/null", "-w", "%{size_download} %{http_code}", &url],
            b"",
            IO_TIMEOUT,
        )
        .await;
        assert_eq!(out, format!("{} 206", BIG - 10), "[{backend}] TLS body length and status");
        assert_eq!(srv.handle.stats().files_sent, 0, "[{backend}] TLS used sendfile");
    }
}
