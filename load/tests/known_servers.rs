//! hop-load's counts and percentiles against servers whose behaviour is known: an in-test tokio
//! echo server, a tiny HTTP server with a fixed delay, an h2c server (the `h2` crate), a
//! WebSocket echo server and an SSE hub.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hop_load::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Counters kept by the test servers.
#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    requests: AtomicU64,
    peers: std::sync::Mutex<std::collections::HashSet<std::net::IpAddr>>,
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A TCP echo server that counts connections and echoed bytes (as requests of `size` bytes).
async fn echo_server(size: u64) -> (SocketAddr, Arc<Counts>) {
    let (l, addr) = listener().await;
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, peer) = l.accept().await.unwrap();
            c.accepted.fetch_add(1, Relaxed);
            c.peers.lock().unwrap().insert(peer.ip());
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut bytes = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let before = bytes / size;
                    bytes += n as u64;
                    c.requests.fetch_add(bytes / size - before, Relaxed);
                }
            });
        }
    });
    (addr, counts)
}

/// A tiny HTTP/1.1 server: every request waits `delay`, then gets `Hello, World!`; honours
/// `Connection: close`.
async fn http_server(delay: Duration) -> (SocketAddr, Arc<Counts>) {
    let (l, addr) = listener().await;
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            c.accepted.fetch_add(1, Relaxed);
            tokio::spawn(serve_http(s, delay, c.clone()));
        }
    });
    (addr, counts)
}

/// The same server over TLS (tokio-rustls, a certificate for `localhost` made by rcgen);
/// `accepted` counts completed handshakes. Returns the certificate's PEM too.
async fn https_server() -> (SocketAddr, Arc<Counts>, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let pem = cert.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (l, addr) = listener().await;
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (acceptor, c) = (acceptor.clone(), c.clone());
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(s).await {
                    c.accepted.fetch_add(1, Relaxed);
                    serve_http(s, Duration::ZERO, c).await;
                }
            });
        }
    });
    (addr, counts, pem)
}

/// Serves HTTP/1.1 requests on `s` as [`http_server`] describes.
async fn serve_http<S>(mut s: S, delay: Duration, c: Arc<Counts>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut b = [0u8; 1024];
            match s.read(&mut b).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&b[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        c.requests.fetch_add(1, Relaxed);
        tokio::time::sleep(delay).await;
        let close = head.contains("connection: close");
        let res = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 13\r\n{}\r\nHello, World!",
            if close { "connection: close\r\n" } else { "" }
        );
        if s.write_all(res.as_bytes()).await.is_err() || close {
            // Over TLS: close_notify.
            let _ = s.shutdown().await;
            return;
        }
    }
}

fn us(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[tokio::test]
async fn echo_counts_match_the_server() {
    let (addr, counts) = echo_server(64).await;
    let v = echo(EchoOpts {
        c: 8,
        r: 5,
        duration: Duration::from_millis(700),
        addr,
        size: 64,
        server_pid: None,
    })
    .await
    .unwrap();
    let reqs = us(&v, "requests");
    let conns = us(&v, "connects");
    assert!(reqs > 100, "{v}");
    // Every counted request was echoed by the server; the server may have seen a few more
    // (requests in flight at the deadline, at most one per connection).
    let served = counts.requests.load(Relaxed);
    assert!(
        served >= reqs && served <= reqs + 8,
        "server {served}, client {reqs}"
    );
    assert_eq!(counts.accepted.load(Relaxed), conns);
    // 5 requests per connection: each connection did 5, except the ones cut by the deadline.
    assert!(reqs <= conns * 5 && reqs + 8 * 5 >= conns * 5, "{v}");
    assert_eq!(us(&v["latency"], "count"), reqs);
    assert_eq!(us(&v, "errors"), 0);
    // Source addresses are spread over 127.0.0.2..
    assert!(counts.peers.lock().unwrap().len() > 8);
}

#[tokio::test]
async fn latency_percentiles_reflect_a_fixed_delay() {
    let (addr, counts) = http_server(Duration::from_millis(20)).await;
    let v = rate_mode(RateOpts {
        rps: 100.0,
        duration: Duration::from_secs(1),
        addr,
        path: "/plaintext".into(),
        c: 4,
        server_pid: None,
    })
    .await
    .unwrap();
    // 100 req/s for 1 s: exactly 100 requests, all answered.
    assert_eq!(us(&v, "requests"), 100, "{v}");
    assert_eq!(counts.requests.load(Relaxed), 100);
    let lat = &v["latency"];
    let (p50, p99) = (us(lat, "p50_us"), us(lat, "p99_us"));
    assert!(
        (20_000..30_000).contains(&p50),
        "p50 {p50} µs for a 20 ms server"
    );
    assert!(
        (20_000..60_000).contains(&p99),
        "p99 {p99} µs for a 20 ms server"
    );
    assert!(us(lat, "min_us") >= 20_000);
}

#[tokio::test]
async fn rate_corrects_for_coordinated_omission() {
    // One connection, due every 20 ms, but each response takes 100 ms: the server can answer
    // 10 req/s, so requests queue and their latency (from the time they were due) grows, while
    // the uncorrected service time stays at ~100 ms.
    let (addr, _) = http_server(Duration::from_millis(100)).await;
    let v = rate_mode(RateOpts {
        rps: 50.0,
        duration: Duration::from_secs(1),
        addr,
        path: "/".into(),
        c: 1,
        server_pid: None,
    })
    .await
    .unwrap();
    let served = us(&v, "requests");
    // 50 due; in 1 s + 2 s grace at 10/s, about 30 get answered, the rest are missed.
    assert!((20..=32).contains(&served), "{v}");
    assert_eq!(served + us(&v, "missed"), 50, "{v}");
    // The median, not the p99: on a loaded machine one of the ~30 responses may come late.
    let service_p50 = us(&v["service"], "p50_us");
    let corrected_p99 = us(&v["latency"], "p99_us");
    assert!((100_000..150_000).contains(&service_p50), "{v}");
    assert!(
        corrected_p99 > 1_500_000,
        "corrected p99 {corrected_p99} µs: {v}"
    );
}

#[tokio::test]
async fn churn_opens_one_connection_per_request() {
    let (addr, counts) = http_server(Duration::ZERO).await;
    let v = churn(ChurnOpts {
        c: 4,
        duration: Duration::from_millis(500),
        addr,
        path: "/plaintext".into(),
        server_pid: None,
        tls: None,
    })
    .await
    .unwrap();
    let n = us(&v, "connections");
    assert!(n > 50, "{v}");
    let (acc, req) = (counts.accepted.load(Relaxed), counts.requests.load(Relaxed));
    assert!(
        acc >= n && acc <= n + 4,
        "server accepted {acc}, client counted {n}"
    );
    assert_eq!(acc, req);
}

/// `churn --tls`: one full handshake per request, each read to the server's close_notify.
#[tokio::test]
async fn churn_over_tls_handshakes_once_per_request() {
    let (addr, counts, pem) = https_server().await;
    let v = churn(ChurnOpts {
        c: 4,
        duration: Duration::from_millis(500),
        addr,
        path: "/plaintext".into(),
        server_pid: None,
        tls: Some(hop_load::tls::TlsClient::from_ca_pem(pem.as_bytes(), "localhost").unwrap()),
    })
    .await
    .unwrap();
    let n = us(&v, "connections");
    assert!(n > 0, "{v}");
    assert_eq!(us(&v, "errors"), 0, "{v}");
    assert_eq!(v["tls"], true);
    let (acc, req) = (counts.accepted.load(Relaxed), counts.requests.load(Relaxed));
    assert!(
        acc >= n && acc <= n + 4,
        "server handshakes {acc}, client counted {n}"
    );
    assert!(
        req >= n && req <= n + 4,
        "server requests {req}, client counted {n}"
    );
}

/// A certificate the client does not trust is an error, not a connection.
#[tokio::test]
async fn tls_checks_the_certificate() {
    let (addr, counts, _) = https_server().await;
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let tls = hop_load::tls::TlsClient::from_ca_pem(other.cert.pem().as_bytes(), "localhost");
    let v = idle(IdleOpts {
        kind: Kind::Https,
        n: 2,
        addr,
        path: String::new(),
        hold: Duration::ZERO,
        settle: Duration::ZERO,
        server_pid: None,
        concurrency: 2,
        tls: Some(tls.unwrap()),
    })
    .await
    .unwrap();
    assert_eq!((us(&v, "opened"), us(&v, "failed")), (0, 2), "{v}");
    assert_eq!(counts.accepted.load(Relaxed), 0);
    assert!(hop_load::tls::TlsClient::from_ca_pem(b"", "localhost").is_err());
}

/// `idle --kind https`: a handshake and one keep-alive request per connection, then held.
#[tokio::test]
async fn idle_https_opens_and_holds_n_connections() {
    let (addr, counts, pem) = https_server().await;
    let v = idle(IdleOpts {
        kind: Kind::Https,
        n: 300,
        addr,
        path: String::new(),
        hold: Duration::from_millis(100),
        settle: Duration::ZERO,
        server_pid: Some(std::process::id()),
        concurrency: 64,
        tls: Some(hop_load::tls::TlsClient::from_ca_pem(pem.as_bytes(), "localhost").unwrap()),
    })
    .await
    .unwrap();
    assert_eq!(us(&v, "opened"), 300, "{v}");
    assert_eq!(v["kind"], "https");
    assert_eq!(counts.accepted.load(Relaxed), 300);
    assert_eq!(counts.requests.load(Relaxed), 300);
    assert_eq!(us(&v, "closed_by_server"), 0);
}

#[tokio::test]
async fn idle_opens_and_holds_n_connections() {
    let (addr, counts) = echo_server(6).await;
    let v = idle(IdleOpts {
        kind: Kind::Tcp,
        n: 600,
        addr,
        path: String::new(),
        hold: Duration::from_millis(100),
        settle: Duration::ZERO,
        server_pid: Some(std::process::id()),
        concurrency: 64,
        tls: None,
    })
    .await
    .unwrap();
    assert_eq!(us(&v, "opened"), 600, "{v}");
    assert_eq!(counts.accepted.load(Relaxed), 600);
    assert_eq!(counts.requests.load(Relaxed), 600);
    assert_eq!(us(&v, "closed_by_server"), 0);
    assert!(v["rss_after_kb"].as_u64().unwrap() > 0);
    // 600 connections over 253 source addresses.
    assert_eq!(counts.peers.lock().unwrap().len(), 253);
}

#[tokio::test]
async fn idle_reports_an_absent_route() {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    for kind in [Kind::Ws, Kind::Sse] {
        let v = idle(IdleOpts {
            kind,
            n: 3,
            addr,
            path: String::new(),
            hold: Duration::ZERO,
            settle: Duration::ZERO,
            server_pid: None,
            concurrency: 3,
            tls: None,
        })
        .await
        .unwrap();
        assert_eq!(v["available"], false, "{v}");
    }
}

/// An h2c server (the `h2` crate, prior knowledge): `/plaintext` answers `Hello, World!`, any
/// other path 404. Counts connections, requests to `/plaintext` whose `:authority` is the
/// server's address, and source addresses.
async fn h2_server() -> (SocketAddr, Arc<Counts>) {
    let (l, addr) = listener().await;
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        loop {
            let (s, peer) = l.accept().await.unwrap();
            c.accepted.fetch_add(1, Relaxed);
            c.peers.lock().unwrap().insert(peer.ip());
            let c = c.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let ok = req.uri().path() == "/plaintext";
                    if ok && req.uri().authority().map(|a| a.as_str()) == Some(&addr.to_string()) {
                        c.requests.fetch_add(1, Relaxed);
                    }
                    let status = if ok { 200 } else { 404 };
                    let head = http::Response::builder().status(status).body(()).unwrap();
                    let mut body = respond.send_response(head, !ok).unwrap();
                    if ok {
                        let _ = body.send_data(bytes::Bytes::from_static(b"Hello, World!"), true);
                    }
                }
            });
        }
    });
    (addr, counts)
}

#[tokio::test]
async fn idle_h2_speaks_to_a_real_http2_server() {
    let (addr, counts) = h2_server().await;
    let opts = IdleOpts {
        kind: Kind::H2,
        n: 300,
        addr,
        path: String::new(),
        hold: Duration::ZERO,
        settle: Duration::ZERO,
        server_pid: Some(std::process::id()),
        concurrency: 64,
        tls: None,
    };
    let v = idle(opts.clone()).await.unwrap();
    assert_eq!(us(&v, "opened"), 300, "{v}");
    assert_eq!(us(&v, "failed"), 0, "{v}");
    assert_eq!(v["kind"], "h2");
    assert_eq!(counts.accepted.load(Relaxed), 300);
    // Every connection made its one GET /plaintext with the server's address as :authority.
    assert_eq!(counts.requests.load(Relaxed), 300);
    assert_eq!(us(&v, "closed_by_server"), 0);
    assert!(v["threads_after"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(counts.peers.lock().unwrap().len(), 253);
    // A 404 reads as an absent route.
    let v = idle(IdleOpts {
        n: 3,
        path: "/missing".into(),
        ..opts.clone()
    })
    .await
    .unwrap();
    assert_eq!(v["available"], false, "{v}");
    assert!(v["first_error"].as_str().unwrap().contains("404"), "{v}");
    // A server that speaks HTTP/1 only fails every connection, saying why.
    let (addr, _) = http_server(Duration::ZERO).await;
    let v = idle(IdleOpts { n: 3, addr, ..opts }).await.unwrap();
    assert_eq!(us(&v, "opened"), 0, "{v}");
    assert!(v["first_error"].as_str().unwrap().contains("HTTP/1"), "{v}");
}

#[tokio::test]
async fn too_many_connections_is_a_clear_error() {
    let (_, addr) = listener().await;
    let e = echo(EchoOpts {
        c: 10_000_000,
        r: 0,
        duration: Duration::from_millis(10),
        addr,
        size: 1,
        server_pid: None,
    })
    .await
    .unwrap_err();
    assert!(e.contains("RLIMIT_NOFILE"), "{e}");
}

#[tokio::test]
async fn users_mode_sends_on_its_interval() {
    let (addr, counts) = echo_server(5).await;
    let v = users(UsersOpts {
        host: addr,
        users: 3,
        duration: Duration::from_millis(1000),
        message: "hello".into(),
        interval: Duration::from_millis(100),
    })
    .await
    .unwrap();
    let sent = us(&v, "sent");
    // 3 users, one message at once and every 100 ms for 1 s: 30 (± a tick each).
    assert!((27..=33).contains(&sent), "{v}");
    assert_eq!(us(&v, "received"), sent);
    assert_eq!(us(&v, "failures"), 0);
    assert_eq!(counts.requests.load(Relaxed), sent);
    let rtt = v["avg_rtt_us"].as_f64().unwrap();
    assert!(rtt > 0.0 && rtt < 50_000.0, "{v}");
}

#[tokio::test]
async fn ws_echo_counts_messages() {
    // Both clients; the raw one with a frame that needs the 16-bit length.
    for (raw, size, burst) in [(true, 200, 1u64), (true, 20, 4), (false, 32, 1)] {
        let (l, addr) = listener().await;
        let served = Arc::new(AtomicU64::new(0));
        let s2 = served.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let served = s2.clone();
                tokio::spawn(async move {
                    let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() || m.is_binary() {
                            served.fetch_add(1, Relaxed);
                            if ws.send(m).await.is_err() {
                                break;
                            }
                        }
                    }
                });
            }
        });
        let v = ws_echo(WsEchoOpts {
            c: 4,
            duration: Duration::from_millis(500),
            addr,
            path: "/ws".into(),
            size,
            raw,
            burst: burst as usize,
            server_pid: None,
        })
        .await
        .unwrap();
        let n = us(&v, "messages");
        assert!(n > 100, "{v}");
        assert_eq!(us(&v, "errors"), 0, "{v}");
        // The server also echoed the handshake message of each connection and at most one
        // burst in flight at the deadline.
        let s = served.load(Relaxed);
        assert_eq!(n % burst, 0, "{v}");
        assert!(
            s >= n + 4 && s <= n + 4 + 4 * burst,
            "raw {raw}: server {s}, client {n}"
        );
        assert_eq!(us(&v["latency"], "count") * burst, n);
    }
}

#[tokio::test]
async fn sse_fanout_reaches_every_subscriber() {
    let (l, addr) = listener().await;
    let (tx, _) = tokio::sync::broadcast::channel::<String>(16);
    let tx2 = tx.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let tx = tx2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                if req.starts_with("POST") {
                    let body = req.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
                    let _ = tx.send(body);
                    let _ = s
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let mut rx = tx.subscribe();
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
                    .await;
                while let Ok(ev) = rx.recv().await {
                    if s.write_all(format!("data: {ev}\n\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    let v = sse(SseOpts {
        n: 50,
        addr,
        path: "/sse".into(),
        publish: Some("/publish".into()),
        rounds: 3,
        wait: Duration::from_secs(3),
        server_pid: None,
    })
    .await
    .unwrap();
    assert_eq!(us(&v, "subscribers"), 50, "{v}");
    assert_eq!(us(&v, "incomplete_rounds"), 0, "{v}");
    assert_eq!(v["fanout_ms"].as_array().unwrap().len(), 3);
    let ms = v["fanout_median_ms"].as_f64().unwrap();
    assert!(ms > 0.0 && ms < 1000.0, "{v}");
}

#[test]
fn durations_and_chart() {
    use hop_load::util::parse_duration;
    assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
    assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
    assert!(parse_duration("ten").is_err());
    let s = hop_load::chart::parse_series("reactor=1000:0.3,10000:3").unwrap();
    let svg = hop_load::chart::svg("t", "x", "y", &[s]);
    assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("reactor"));
}
