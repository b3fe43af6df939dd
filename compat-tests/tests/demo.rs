//! The demo server's contract, checked on the binary itself (`examples/server.rs`, built by
//! `cargo test --workspace`): on both backends (`--backend`), one `--addr` answers HTTP/1.1 and
//! HTTP/2 with prior knowledge (h2c), called with curl; `Upgrade: h2c` gets HTTP/1.1; with
//! `--tls-cert`/`--tls-key`, HTTPS with ALPN h2 and http/1.1; `/ws-frames` (the frame API's
//! echo) gives a WebSocket client its messages back whole.

use compat_tests::unavailable;
use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The demo binary next to this test's own target directory, if it was built.
fn demo_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/<profile>/deps/demo-<hash> -> target/<profile>/examples/server
    let bin = exe.parent()?.parent()?.join("examples").join("server");
    bin.exists().then_some(bin)
}

/// A free loopback port (bound, then released for the demo to bind).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Kills the demo however the test ends.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the demo binary `bin` on `backend` and a free port, with `extra` arguments, and
/// waits until it listens.
fn start_demo(bin: &Path, backend: &str, extra: &[&OsStr]) -> (Demo, SocketAddr) {
    let addr = free_addr();
    let child = Command::new(bin)
        .args(["--backend", backend, "--addr", &addr.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the demo starts");
    let demo = Demo(child);
    let t0 = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "[{backend}] demo not listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (demo, addr)
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
    let Some(bin) = demo_binary() else {
        return unavailable("examples/server is not built (run `cargo test --workspace`)");
    };
    if Command::new("curl").arg("--version").output().is_err() {
        return unavailable("curl is not installed");
    }
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

/// With `--tls-cert` and `--tls-key` the demo serves HTTPS on `--addr`, ALPN choosing HTTP/1.1
/// or HTTP/2, on both backends.
#[test]
fn demo_serves_https_with_alpn_on_both_backends() {
    let Some(bin) = demo_binary() else {
        return unavailable("examples/server is not built (run `cargo test --workspace`)");
    };
    if Command::new("curl").arg("--version").output().is_err() {
        return unavailable("curl is not installed");
    }
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
    let Some(bin) = demo_binary() else {
        return unavailable("examples/server is not built (run `cargo test --workspace`)");
    };
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
