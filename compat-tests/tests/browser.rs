//! The demo page in a real browser: headless Chromium (driven through ChromeDriver's WebDriver
//! API) loads `/`, and the page's WebSocket echo and EventSource both succeed, on both backends,
//! over plaintext HTTP and over HTTPS (a self-signed certificate for 127.0.0.1 made at test time
//! with rcgen, accepted through WebDriver's `acceptInsecureCerts`; ALPN gives Chromium HTTP/2,
//! and the page's wss WebSocket is an extended CONNECT on that connection).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/tools` installs them); without them
//! the test fails, naming them.

use std::future::IntoFuture;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{Html, IntoResponse};
use axum::routing::{any, get};
use axum::Router;
use compat_tests::backend_tests;
use hop::sse::{Event, Hub};
use hop::ws::{Message, WsConn, WsHandler, WsUpgrade};
use serde_json::{json, Value};

const INDEX: &str = include_str!("../../examples/assets/index.html");

struct Echo;

/// Set once an echo went back compressed (permessage-deflate negotiated, and the message over
/// the threshold).
static COMPRESSED: AtomicBool = AtomicBool::new(false);

impl WsHandler for Echo {
    fn on_message(&mut self, ws: &mut WsConn<'_>, msg: Message) -> std::io::Result<()> {
        if ws.is_compressed() && msg.len() >= hop::ws::Deflate::default().threshold {
            COMPRESSED.store(true, Ordering::Relaxed);
        }
        ws.send(msg)
    }
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(name: &str) -> Option<String> {
    ["/usr/bin/", "/usr/local/bin/"]
        .iter()
        .map(|d| format!("{d}{name}"))
        .find(|p| std::path::Path::new(p).exists())
}

async fn webdriver(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Value,
) -> Value {
    let res = client
        .request(method, url)
        .json(&body)
        .send()
        .await
        .expect("webdriver request");
    res.json().await.expect("webdriver json")
}

backend_tests! {
    /// Over plaintext HTTP/1.1.
    async fn demo_page_in_headless_chromium(backend) {
        demo_page(backend, false, "demo_page_in_headless_chromium").await;
    }

    /// Over HTTPS: HTTP/2 by ALPN, wss and SSE on it.
    async fn demo_page_over_https_in_headless_chromium(backend) {
        demo_page(backend, true, "demo_page_over_https_in_headless_chromium").await;
    }
}

/// A TLS configuration for a self-signed certificate for 127.0.0.1 and `localhost`.
fn tls_config() -> hop::tls::RustlsConfig {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate");
    hop::tls::RustlsConfig::from_pem(
        cert.cert.pem().as_bytes(),
        cert.signing_key.serialize_pem().as_bytes(),
    )
    .expect("TLS configuration")
}

/// Loads the demo page in headless Chromium, over HTTPS if `tls`, and checks that its
/// WebSocket echo and EventSource work.
async fn demo_page(backend: compat_tests::Backend, tls: bool, name: &str) {
    let (Some(chromium), Some(chromedriver)) = (tool("chromium"), tool("chromedriver")) else {
        compat_tests::unavailable(&format!(
            "{name}_{backend}: chromium or chromedriver in /usr/bin or /usr/local/bin \
             (apt-get install chromium chromium-driver)"
        ));
    };

    // The page and the routes it uses, as in examples/server.rs.
    let hub = Hub::new();
    let app = Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route(
            "/ws",
            // `any`: over HTTP/2 (HTTPS) Chromium opens the WebSocket with an extended CONNECT.
            any(|up: WsUpgrade| async move { up.on_upgrade(Echo) }),
        )
        .route(
            "/sse",
            get(|State(hub): State<Hub>, req: Request| async move {
                hub.subscribe(&req).into_response()
            }),
        )
        .with_state(hub.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut builder = hop::Server::builder().backend(backend).pollers(2);
    if tls {
        builder = builder.tls(tls_config());
    }
    let serve = builder.serve(listener, app);
    let handle = serve.handle();
    tokio::spawn(serve.into_future());
    let ticker = hub.clone();
    let ticks = tokio::spawn(async move {
        for n in 1u64.. {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ticker.send(&Event::new(format!("tick {n}")).id(n.to_string()));
        }
    });

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _driver = Driver(
        Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let start = Instant::now();
    while client.get(format!("{base}/status")).send().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = std::env::temp_dir().join(format!("hop-chromium-{}-{port}", std::process::id()));
    let caps = json!({"capabilities": {"alwaysMatch": {
        "pageLoadStrategy": "eager",
        // The test's self-signed certificate (HTTPS only).
        "acceptInsecureCerts": tls,
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                     format!("--user-data-dir={}", profile.display())]
        }
    }}});
    let session = webdriver(
        &client,
        reqwest::Method::POST,
        format!("{base}/session"),
        caps,
    )
    .await;
    let id = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {session}"))
        .to_owned();
    let sess = format!("{base}/session/{id}");
    let scheme = if tls { "https" } else { "http" };
    webdriver(
        &client,
        reqwest::Method::POST,
        format!("{sess}/url"),
        json!({"url": format!("{scheme}://{addr}/")}),
    )
    .await;

    let script = json!({"script": "return [document.body.getAttribute('data-ws'), \
            document.body.getAttribute('data-sse'), \
            document.getElementById('ws-status').textContent, \
            document.getElementById('sse-status').textContent, location.protocol, \
            performance.getEntriesByType('navigation')[0].nextHopProtocol];", "args": []});
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let v = webdriver(
            &client,
            reqwest::Method::POST,
            format!("{sess}/execute/sync"),
            script.clone(),
        )
        .await;
        let done = v["value"][0] == "ok" && v["value"][1] == "ok";
        if done || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = client.delete(&sess).send().await;
    ticks.abort();
    handle.shutdown();
    let _ = std::fs::remove_dir_all(&profile);
    assert_eq!(
        last["value"][0], "ok",
        "WebSocket echo failed in the browser: {last}"
    );
    assert_eq!(
        last["value"][1], "ok",
        "EventSource failed in the browser: {last}"
    );
    // Chromium offers permessage-deflate; hop takes it and the echo went back compressed.
    assert_eq!(
        last["value"][2],
        "echo: hello from the browser, long enough to be compressed \
         (permessage-deflate; client_no_context_takeover)",
        "{last}"
    );
    assert!(
        COMPRESSED.load(Ordering::Relaxed),
        "the server did not compress"
    );
    assert!(
        last["value"][3].as_str().unwrap_or("").contains(": tick "),
        "{last}"
    );
    assert_eq!(last["value"][4], format!("{scheme}:"), "{last}");
    if tls {
        // ALPN: Chromium offers h2, and hop takes it.
        assert_eq!(last["value"][5], "h2", "{last}");
        let stats = handle.stats();
        assert!(stats.tls_handshakes >= 1, "{stats:?}");
        assert!(stats.http2_connections >= 1, "{stats:?}");
    }
}
