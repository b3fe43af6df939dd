//! The demo server's contract, checked on the binary itself (`examples/server.rs`, built by
//! `cargo test --workspace`): on both backends (`--backend`), one `--addr` answers HTTP/1.1 and
//! HTTP/2 with prior knowledge (h2c), called with curl; `Upgrade: h2c` gets HTTP/1.1; with
//! `--tls-cert`/`--tls-key`, HTTPS with ALPN h2 and http/1.1; `/ws-frames` (the frame API's
//! echo) gives a WebSocket client its messages back whole; `/metrics` answers hop's metrics as
//! Prometheus text.

use compat_tests::require_tool;
use std::ffi::OsStr;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use compat_tests::demo::{binary as demo_binary, free_addr, Demo};

/// The demo on port 0: the port it says it bound.
fn start_demo(bin: &Path, backend: &str, extra: &[&OsStr]) -> (Demo, SocketAddr) {
    compat_tests::demo::start(bin, backend, "127.0.0.1:0", extra)
}

/// `curl` with `flag`: the HTTP version and status it saw, and the body.
fn curl(flag: &str, url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "20",
            flag,
            "-w",
            "\n%{http_version} %{http_code}",
            url,
        ])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_owned(), body.to_owned())
}

#[test]
fn demo_answers_http1_and_h2c_on_one_port_on_both_backends() {
    let bin = demo_binary();
    require_tool("curl", "--version");
    for backend in ["reactor", "tokio"] {
        let (_demo, addr) = start_demo(&bin, backend, &[]);
        let url = format!("http://{addr}/plaintext");
        assert_eq!(
            curl("--http1.1", &url),
            ("1.1 200".to_owned(), "Hello, World!".to_owned()),
            "[{backend}] HTTP/1.1"
        );
        assert_eq!(
            curl("--http2-prior-knowledge", &url),
            ("2 200".to_owned(), "Hello, World!".to_owned()),
            "[{backend}] h2c"
        );
        // `Upgrade: h2c` (curl's `--http2` on http://) is answered over HTTP/1.1.
        assert_eq!(
            curl("--http2", &url),
            ("1.1 200".to_owned(), "Hello, World!".to_owned()),
            "[{backend}] Upgrade: h2c"
        );
    }
}

/// `/metrics` answers Prometheus's text format with hop's metrics, the requests made before it
/// counted, on both backends.
#[test]
fn demo_metrics_answers_prometheus_text_on_both_backends() {
    let bin = demo_binary();
    require_tool("curl", "--version");
    for backend in ["reactor", "tokio"] {
        let (_demo, addr) = start_demo(&bin, backend, &[]);
        let plain = format!("http://{addr}/plaintext");
        assert_eq!(curl("--http1.1", &plain).0, "1.1 200", "[{backend}]");
        assert_eq!(
            curl("--http2-prior-knowledge", &plain).0,
            "2 200",
            "[{backend}]"
        );
        let (status, text) = curl("--http1.1", &format!("http://{addr}/metrics"));
        assert_eq!(status, "1.1 200", "[{backend}] {text}");
        for line in [
            "# TYPE hop_connections_accepted_total counter",
            "# TYPE hop_connections_open gauge",
            "# TYPE hop_requests_total counter",
            "hop_connections_closed_total{reason=\"closed\"} ",
            "hop_requests_total{protocol=\"h2\"} 1",
        ] {
            assert!(text.contains(line), "[{backend}] no {line:?} in\n{text}");
        }
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("[{backend}] no {series} in\n{text}"))
        };
        assert!(
            value("hop_requests_total{protocol=\"http1\"}") >= 1.0,
            "[{backend}]"
        );
        assert!(
            value("hop_connections_accepted_total") >= 3.0,
            "[{backend}]"
        );
        assert!(value("hop_bytes_received_total") > 0.0, "[{backend}]");
        assert!(value("hop_bytes_sent_total") > 0.0, "[{backend}]");
    }
}

/// With `--tls-cert` and `--tls-key` the demo serves HTTPS on `--addr`, ALPN choosing HTTP/1.1
/// or HTTP/2, on both backends.
#[test]
fn demo_serves_https_with_alpn_on_both_backends() {
    let bin = demo_binary();
    require_tool("curl", "--version");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let dir = std::env::temp_dir().join(format!("hop-demo-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    for backend in ["reactor", "tokio"] {
        let tls = [
            "--tls-cert".as_ref(),
            cert_path.as_os_str(),
            "--tls-key".as_ref(),
            key_path.as_os_str(),
        ];
        let (_demo, addr) = start_demo(&bin, backend, &tls);
        let url = format!("https://localhost:{}/plaintext", addr.port());
        for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "20", flag, "--cacert"])
                .arg(&cert_path)
                .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
                .args(["-w", "\n%{http_version} %{http_code}", &url])
                .output()
                .expect("curl runs");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("Hello, World!\n{version} 200"),
                "[{backend}] curl {flag}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/ws-frames` echoes each piece of each frame as it arrives; tokio-tungstenite gets its
/// messages back whole (a text one, a 1 MiB binary one), on both backends.
#[test]
fn demo_ws_frames_echoes_messages_on_both_backends() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let bin = demo_binary();
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    for backend in ["reactor", "tokio"] {
        let (_demo, addr) = start_demo(&bin, backend, &[]);
        rt.block_on(async {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws-frames"))
                .await
                .expect("handshake");
            let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
            for msg in [Message::text("héllo, frames"), Message::binary(big)] {
                ws.send(msg.clone()).await.expect("send");
                let got = tokio::time::timeout(Duration::from_secs(20), ws.next())
                    .await
                    .expect("the echo in time")
                    .expect("a message")
                    .expect("no error");
                assert!(got == msg, "[{backend}] the echo differs");
            }
        });
    }
}

/// Runs the demo binary with `args` until it exits (it must, within 20 s): its status, and
/// what it printed on stdout and stderr.
fn run_demo(bin: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let t0 = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the demo did not exit with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// A bad flag or value is named in plain words (no Debug forms), with the usage, status 2; and
/// nothing the demo prints into a pipe carries ANSI colour codes.
#[test]
fn demo_names_bad_flags_in_plain_words() {
    let bin = demo_binary();
    for (args, says) in [
        (
            &["--pollers", "abc"][..],
            "--pollers takes a number of pollers, not \"abc\"",
        ),
        (
            &["--backend", "fast"][..],
            "--backend is reactor or tokio, not \"fast\"",
        ),
        (
            &["--addr", "localhost"][..],
            "--addr takes an address like 127.0.0.1:1826, not \"localhost\"",
        ),
        (
            &["--park-after-ms", "-1"][..],
            "--park-after-ms takes a number of milliseconds",
        ),
        (
            &["--ws-deflate", "maybe"][..],
            "--ws-deflate is on or off, not \"maybe\"",
        ),
        (
            &["--tls-cert", "x.pem"][..],
            "--tls-cert and --tls-key go together",
        ),
        (&["--pollers"][..], "--pollers needs a value"),
        (&["--bogus"][..], "unknown argument \"--bogus\""),
    ] {
        let (status, text) = run_demo(&bin, args);
        assert_eq!(status, Some(2), "{args:?}: {text}");
        assert!(text.contains(says), "{args:?} should say {says:?}: {text}");
        assert!(text.contains("usage: server"), "{args:?}: no usage: {text}");
        for debug in [
            "Err(",
            "Error {",
            "ParseIntError",
            "AddrParseError",
            "kind:",
        ] {
            assert!(!text.contains(debug), "{args:?}: a Debug form: {text}");
        }
    }
    // A setting hop refuses (5,000 pollers), in plain words too, and no colour in a pipe.
    let addr = free_addr().to_string();
    let (status, text) = run_demo(&bin, &["--addr", &addr, "--pollers", "5000"]);
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains("server: hop: pollers: 5000 is over"),
        "{text}"
    );
    assert!(
        !text.contains("Custom {") && !text.contains('\x1b'),
        "{text}"
    );
}

/// A port another demo holds is refused with a clear error, on both backends; `--share-port`
/// shares it on purpose.
#[test]
fn demo_refuses_a_port_in_use_unless_asked_to_share() {
    let bin = demo_binary();
    for backend in ["reactor", "tokio"] {
        let (_first, addr) = start_demo(&bin, backend, &[]);
        let addr_s = addr.to_string();
        let (status, text) = run_demo(&bin, &["--backend", backend, "--addr", &addr_s]);
        assert_eq!(
            status,
            Some(1),
            "[{backend}] a second demo on {addr}: {text}"
        );
        assert!(
            text.contains(&format!("{addr} is already in use")),
            "[{backend}] {text}"
        );
        assert!(
            !text.contains('\x1b'),
            "[{backend}] colour in a pipe: {text}"
        );
        // Asked to share: it starts, and serves.
        let (_second, _) = start_demo(&bin, backend, &["--share-port".as_ref()]);
        let mut shared = Command::new(&bin)
            .args(["--backend", backend, "--addr", &addr_s, "--share-port"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the demo starts");
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            shared.try_wait().expect("try_wait").is_none(),
            "[{backend}] --share-port did not start"
        );
        let _ = shared.kill();
        let _ = shared.wait();
    }
}

/// The first SIGTERM (or Ctrl-C's SIGINT) starts a graceful drain, which waits for a request
/// whose body stalls; a second one ends the process at once (status 143, or 130 for SIGINT),
/// on both backends.
#[test]
fn a_second_signal_exits_at_once() {
    let bin = demo_binary();
    let cases = [
        ("reactor", libc::SIGTERM, 143),
        ("tokio", libc::SIGTERM, 143),
        ("reactor", libc::SIGINT, 130),
        ("tokio", libc::SIGINT, 130),
    ];
    for (backend, signal, code) in cases {
        let (mut demo, addr) = start_demo(&bin, backend, &[]);
        // A request in flight whose body stops after a few bytes: the drain waits for it. The
        // `100 Continue` shows that the handler is reading the body (a connection still in the
        // accept queue, or a head not yet read, would rightly be dropped by the drain).
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        use std::io::{Read, Write};
        c.write_all(
            b"POST /sse/broadcast HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\
              expect: 100-continue\r\n\r\n",
        )
        .expect("write");
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0u8; 256];
            let n = c.read(&mut buf).expect("the interim response");
            assert!(n > 0, "[{backend}] closed before 100 Continue");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 100"),
            "[{backend}] {}",
            String::from_utf8_lossy(&got)
        );
        c.write_all(b"hello").expect("write");
        std::thread::sleep(Duration::from_millis(300));
        let pid = demo.0.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child, not yet reaped (we hold its handle).
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        std::thread::sleep(Duration::from_secs(1));
        if let Some(status) = demo.0.try_wait().expect("try_wait") {
            panic!(
                "[{backend}] the first signal {signal} did not wait for the request in flight: \
                 {status:?}"
            );
        }
        let t0 = Instant::now();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let status = loop {
            if let Some(s) = demo.0.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "[{backend}] still running 10 s after the second signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            status.code(),
            Some(code),
            "[{backend}] {signal}: {status:?}"
        );
        drop(c);
    }
}

/// One request on a fresh connection to `addr`, raw: `prefix` (a PROXY protocol header, or
/// nothing) then `GET path`; the whole answer, read until the server closes.
fn raw_get(addr: SocketAddr, prefix: &[u8], path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut out = prefix.to_vec();
    out.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    );
    c.write_all(&out).expect("write");
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// `--proxy-protocol`: `/ip` answers the client address the PROXY header carries (v1 from a raw
/// client and from curl's `--haproxy-protocol`, v2 from a raw client), and a connection without
/// the header is closed unanswered, on both backends. `/file` and `/big` serve their files
/// whole.
#[test]
fn demo_proxy_protocol_ip_and_files() {
    let bin = demo_binary();
    require_tool("curl", "--version");
    for backend in ["reactor", "tokio"] {
        let (_demo, addr) = start_demo(&bin, backend, &["--proxy-protocol".as_ref()]);
        let v1 = raw_get(
            addr,
            b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n",
            "/ip",
        );
        assert!(v1.starts_with("HTTP/1.1 200"), "[{backend}] {v1}");
        assert!(
            v1.ends_with("\r\n\r\n203.0.113.7:40000\n"),
            "[{backend}] {v1}"
        );
        // v2: signature, PROXY over TCP/IPv4, 12 address bytes.
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        v2.extend_from_slice(&[198, 51, 100, 9, 127, 0, 0, 1, 0x1f, 0x90, 0, 80]);
        let got = raw_get(addr, &v2, "/ip");
        assert!(
            got.ends_with("\r\n\r\n198.51.100.9:8080\n"),
            "[{backend}] {got}"
        );
        let (status, body) = curl("--haproxy-protocol", &format!("http://{addr}/ip"));
        assert_eq!(status, "1.1 200", "[{backend}] curl --haproxy-protocol");
        assert!(body.starts_with("127.0.0.1:"), "[{backend}] {body}");
        let bare = raw_get(addr, b"", "/ip");
        assert!(
            bare.is_empty(),
            "[{backend}] no PROXY header, answered: {bare}"
        );
    }
    for backend in ["reactor", "tokio"] {
        let (_demo, addr) = start_demo(&bin, backend, &[]);
        // `/file` is the README; `/big` is 64 MiB exactly.
        for (path, want) in [("/file", None), ("/big", Some(64u64 << 20))] {
            let out = Command::new("curl")
                .args([
                    "-s",
                    "--max-time",
                    "60",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{size_download}",
                ])
                .arg(format!("http://{addr}{path}"))
                .output()
                .expect("curl runs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (code, size) = text.split_once(' ').unwrap_or((&text, "0"));
            assert_eq!(code, "200", "[{backend}] {path}: {text}");
            let size: u64 = size.parse().unwrap_or(0);
            assert!(
                size > 0 && want.is_none_or(|w| w == size),
                "[{backend}] {path}: {size} bytes"
            );
        }
    }
}
