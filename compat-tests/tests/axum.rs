//! axum and tower compatibility: extractors, `ConnectInfo`, tower-http layers, handlers that
//! use the tokio runtime, panicking handlers, and plain hyper `service_fn`s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::IntoFuture;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use compat_tests::{
    backend_tests, get_req, hyper_client, reqwest_client, start, RawConn, IO_TIMEOUT,
};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Clone, Default)]
struct AppState {
    hits: Arc<AtomicUsize>,
}

#[derive(Deserialize, Serialize, Debug, PartialEq)]
struct Item {
    name: String,
    qty: u32,
}

fn extractor_app(state: AppState) -> Router {
    Router::new()
        .route(
            "/users/{id}/{name}",
            get(|Path((id, name)): Path<(u64, String)>| async move { format!("user {id} {name}") }),
        )
        .route(
            "/query",
            get(|Query(q): Query<HashMap<String, String>>| async move {
                let mut pairs: Vec<_> = q.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
                pairs.sort();
                pairs.join("&")
            }),
        )
        .route(
            "/json",
            post(|Json(mut item): Json<Item>| async move {
                item.qty *= 2;
                Json(item)
            }),
        )
        .route(
            "/hits",
            get(|State(state): State<AppState>| async move {
                (state.hits.fetch_add(1, Ordering::SeqCst) + 1).to_string()
            }),
        )
        .route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        )
        .with_state(state)
}

backend_tests! {
    async fn extractors_path_query_json_state(backend) {
        let state = AppState::default();
        let hits = state.hits.clone();
        let app = extractor_app(state).into_make_service_with_connect_info::<SocketAddr>();
        let srv = start(backend, app, |b| b);
        let client = reqwest_client();

        let res = client.get(srv.url("/users/42/ada")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "user 42 ada");
        // A path that does not parse as u64 is rejected by the extractor.
        let res = client.get(srv.url("/users/x/ada")).send().await.unwrap();
        assert_eq!(res.status(), 400);

        let res = client.get(srv.url("/query?b=two%20words&a=1")).send().await.unwrap();
        assert_eq!(res.text().await.unwrap(), "a=1&b=two words");

        let res = client
            .post(srv.url("/json"))
            .json(&Item { name: "bolt".into(), qty: 21 })
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(res.json::<Item>().await.unwrap(), Item { name: "bolt".into(), qty: 42 });
        // Invalid JSON: axum's rejection, not a server error.
        let res = client
            .post(srv.url("/json"))
            .header(header::CONTENT_TYPE, "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);

        for i in 1..=3 {
            let res = client.get(srv.url("/hits")).send().await.unwrap();
            assert_eq!(res.text().await.unwrap(), i.to_string());
        }
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    async fn connect_info_is_peer_addr(backend) {
        let app = extractor_app(AppState::default())
            .into_make_service_with_connect_info::<SocketAddr>();
        let srv = start(backend, app, |b| b);
        for _ in 0..3 {
            let mut conn = RawConn::connect(srv.addr).await;
            let res = conn.roundtrip(get_req("/peer", "")).await;
            assert_eq!(res.status, 200);
            assert_eq!(res.text(), conn.local_addr().to_string());
            // Same answer for a second request on the same connection.
            let res = conn.roundtrip(get_req("/peer", "")).await;
            assert_eq!(res.text(), conn.local_addr().to_string());
        }
    }

    async fn hyper_client_reuses_keep_alive_connection(backend) {
        // hyper's own HTTP/1 client on one connection: every request is answered on it (the
        // handler sees the same peer address each time) and the server accepted only it.
        // (The pooled hyper-util client may race its pool and open a second connection, so
        // the connection is driven directly here.)
        let app = extractor_app(AppState::default())
            .into_make_service_with_connect_info::<SocketAddr>();
        let srv = start(backend, app, |b| b);
        let stream = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        let local = stream.local_addr().unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let mut peers = Vec::new();
        for _ in 0..5 {
            sender.ready().await.unwrap();
            let req = http::Request::get("/peer")
                .header(header::HOST, srv.addr.to_string())
                .body(Full::new(Bytes::new()))
                .unwrap();
            let res = sender.send_request(req).await.unwrap();
            assert_eq!(res.status(), 200);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            peers.push(String::from_utf8(body.to_vec()).unwrap());
        }
        assert!(peers.iter().all(|p| *p == local.to_string()), "{peers:?} vs {local}");
        assert_eq!(srv.handle.stats().accepted, 1);
        drop(sender);
        tokio::time::timeout(IO_TIMEOUT, conn).await.unwrap().unwrap().unwrap();
    }

    async fn pooled_clients_work(backend) {
        // The pooled hyper-util client and reqwest, sequential and concurrent requests.
        let app = extractor_app(AppState::default())
            .into_make_service_with_connect_info::<SocketAddr>();
        let srv = start(backend, app, |b| b);
        let client = hyper_client::<Full<Bytes>>();
        for _ in 0..5 {
            let res = client.get(srv.url("/peer").parse().unwrap()).await.unwrap();
            assert_eq!(res.status(), 200);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert!(std::str::from_utf8(&body).unwrap().starts_with("127.0.0.1:"));
        }
        let rq = reqwest_client();
        let tasks: Vec<_> = (0..20u64)
            .map(|i| {
                let (rq, url) = (rq.clone(), srv.url(&format!("/users/{i}/n")));
                tokio::spawn(async move { rq.get(url).send().await.unwrap().text().await.unwrap() })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("user {i} n"));
        }
    }

    async fn tower_http_trace_layer(backend) {
        let app = Router::new()
            .route("/", get(|| async { "traced" }))
            .layer(tower_http::trace::TraceLayer::new_for_http());
        let srv = start(backend, app, |b| b);
        let res = reqwest_client().get(srv.url("/")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "traced");
        let res = reqwest_client().get(srv.url("/missing")).send().await.unwrap();
        assert_eq!(res.status(), 404);
    }

    async fn tower_http_compression_gzip(backend) {
        let text: String = (0..2000).map(|i| format!("line {i} of a compressible body\n")).collect();
        let expected = text.clone();
        let app = Router::new()
            .route("/text", get(move || { let t = text.clone(); async move { t } }))
            .layer(tower_http::compression::CompressionLayer::new());
        let srv = start(backend, app, |b| b);
        let client = reqwest_client();

        let res = client
            .get(srv.url("/text"))
            .header(header::ACCEPT_ENCODING, "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip");
        let compressed = res.bytes().await.unwrap();
        assert!(compressed.len() < expected.len() / 4, "not compressed: {}", compressed.len());
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&compressed[..]).read_to_string(&mut plain).unwrap();
        assert_eq!(plain, expected);

        // Without accept-encoding: identity.
        let res = client.get(srv.url("/text")).send().await.unwrap();
        assert!(res.headers().get(header::CONTENT_ENCODING).is_none());
        assert_eq!(res.text().await.unwrap(), expected);
    }

    async fn tower_http_timeout_layer_408(backend) {
        // tower-http 0.6: `TimeoutLayer` answers a request whose handler runs too long with the
        // configured status (408 Request Timeout, as the deprecated `TimeoutLayer::new` did).
        let app = Router::new()
            .route("/slow", get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }))
            .route("/fast", get(|| async { "fast" }))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(300),
            ));
        let srv = start(backend, app, |b| b);
        let mut conn = RawConn::connect(srv.addr).await;
        let res = conn.roundtrip(get_req("/slow", "")).await;
        assert_eq!(res.status, 408);
        // The connection survives the timeout.
        let res = conn.roundtrip(get_req("/fast", "")).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "fast");
    }

    async fn handlers_use_tokio_sleep_and_spawn(backend) {
        let app = Router::new()
            .route("/sleep", get(|| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                "slept"
            }))
            .route("/spawn", get(|| async {
                let task = tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    6 * 7
                });
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    let _ = tx.send("oneshot");
                });
                let blocking = tokio::task::spawn_blocking(|| "blocking").await.unwrap();
                format!("{} {} {}", task.await.unwrap(), rx.await.unwrap(), blocking)
            }))
            .route("/interval", get(|| async {
                let mut iv = tokio::time::interval(Duration::from_millis(10));
                for _ in 0..5 {
                    iv.tick().await;
                }
                tokio::time::timeout(Duration::from_millis(10), std::future::pending::<()>())
                    .await
                    .unwrap_err();
                "ticked"
            }));
        let srv = start(backend, app, |b| b);
        let client = reqwest_client();
        assert_eq!(client.get(srv.url("/sleep")).send().await.unwrap().text().await.unwrap(), "slept");
        assert_eq!(
            client.get(srv.url("/spawn")).send().await.unwrap().text().await.unwrap(),
            "42 oneshot blocking"
        );
        assert_eq!(client.get(srv.url("/interval")).send().await.unwrap().text().await.unwrap(), "ticked");
    }

    async fn slow_request_does_not_block_others(backend) {
        // `/slow` sleeps 1 s and then waits until the test has been answered on other
        // connections: if those were stuck behind it, the test would time out.
        let started = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (s, r) = (started.clone(), release.clone());
        let app = Router::new()
            .route("/slow", get(move || {
                let (s, r) = (s.clone(), r.clone());
                async move {
                    let released = r.notified();
                    s.notify_one();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    released.await;
                    "slow done"
                }
            }))
            .route("/fast", get(|| async { "fast" }));
        let srv = start(backend, app, |b| b);
        let addr = srv.addr;
        let slow = tokio::spawn(async move {
            let mut conn = RawConn::connect(addr).await;
            conn.send(get_req("/slow", "")).await.unwrap();
            conn.try_read_response(false, Duration::from_secs(60)).await
        });
        tokio::time::timeout(IO_TIMEOUT, started.notified()).await.expect("slow handler never started");
        let mut fast = Vec::new();
        for _ in 0..4 {
            fast.push(tokio::spawn(async move {
                let mut conn = RawConn::connect(addr).await;
                for _ in 0..3 {
                    assert_eq!(conn.roundtrip(get_req("/fast", "")).await.text(), "fast");
                }
            }));
        }
        for f in fast {
            tokio::time::timeout(Duration::from_secs(30), f)
                .await
                .expect("fast requests stuck behind the slow one")
                .unwrap();
        }
        assert!(!slow.is_finished(), "slow request finished before it was released");
        release.notify_one();
        let res = slow.await.unwrap().expect("slow response");
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "slow done");
    }

    async fn panicking_handler_isolated(backend) {
        let app = Router::new()
            .route("/panic", get(|| async {
                if true {
                    panic!("handler panic (expected by the test)");
                }
                "unreachable"
            }))
            .route("/ok", get(|| async { "ok" }));
        let srv = start(backend, app, |b| b);

        let mut healthy = RawConn::connect(srv.addr).await;
        assert_eq!(healthy.roundtrip(get_req("/ok", "")).await.text(), "ok");

        let mut victim = RawConn::connect(srv.addr).await;
        assert_eq!(victim.roundtrip(get_req("/ok", "")).await.text(), "ok");
        let res = victim.roundtrip(get_req("/panic", "")).await;
        assert_eq!(res.status, 500);
        assert!(res.connection_close(), "500 after a panic should close: {res:?}");
        let (end, rest) = victim.wait_close(IO_TIMEOUT).await;
        assert!(end.closed(), "panicked connection left open: {end:?}");
        assert!(rest.is_empty());

        // The other keep-alive connection still works, and so do new ones.
        assert_eq!(healthy.roundtrip(get_req("/ok", "")).await.text(), "ok");
        let mut fresh = RawConn::connect(srv.addr).await;
        assert_eq!(fresh.roundtrip(get_req("/ok", "")).await.text(), "ok");
        // A second panic on yet another connection is handled the same way.
        let mut again = RawConn::connect(srv.addr).await;
        assert_eq!(again.roundtrip(get_req("/panic", "")).await.status, 500);
        assert_eq!(healthy.roundtrip(get_req("/ok", "")).await.text(), "ok");
    }

    async fn hyper_service_fn(backend) {
        let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let path = req.uri().path().to_string();
            let body = req.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>(
                hyper::Response::builder()
                    .header("x-path", path)
                    .body(Full::new(body))
                    .unwrap(),
            )
        });
        let srv = start(backend, svc, |b| b);
        let res = reqwest_client()
            .post(srv.url("/some/path"))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-path"], "/some/path");
        assert_eq!(res.text().await.unwrap(), "payload");
    }

    async fn tower_service_fn(backend) {
        // Any tower `Service<Request<Incoming>> + Clone`, here built with `service_fn`.
        let svc = tower::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(format!(
                "{} {}",
                req.method(),
                req.uri()
            )))))
        });
        let srv = start(backend, svc, |b| b);
        let res = reqwest_client().get(srv.url("/x?y=1")).send().await.unwrap();
        assert_eq!(res.text().await.unwrap(), "GET /x?y=1");
    }
}

backend_tests! {
    /// `hop::serve`'s default settings, with the backend pinned (instead of `HOP_BACKEND`),
    /// serving a plain hyper `service_fn`.
    async fn hop_serve_defaults_with_hyper_service_fn(backend) {
        let svc = hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                b"plain hyper",
            ))))
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = hop::Server::builder().backend(backend).serve(listener, svc);
        let handle = serve.handle();
        let task = tokio::spawn(serve.into_future());
        let mut conn = RawConn::connect(addr).await;
        let res = conn.roundtrip(get_req("/", "")).await;
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "plain hyper");
        drop(conn);
        handle.shutdown();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}
