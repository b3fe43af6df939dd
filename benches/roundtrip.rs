//! In-process request round trips on both backends: a hop server (one poller / one worker) on a
//! tokio runtime, a hyper http1 client on another, one keep-alive connection, `GET /plaintext`.
//!
//! `cargo bench --bench roundtrip`

use std::net::SocketAddr;

use axum::{routing::get, Router};
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

fn start(backend: hop::Backend) -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/plaintext", get(|| async { "Hello, World!" }));
    let serve = hop::Server::builder()
        .backend(backend)
        .pollers(1)
        .serve(listener, app);
    rt.spawn(async move { serve.await.unwrap() });
    (rt, addr)
}

fn roundtrip(c: &mut Criterion) {
    let mut group = c.benchmark_group("roundtrip");
    for (name, backend) in [
        ("reactor", hop::Backend::Reactor),
        ("tokio", hop::Backend::Tokio),
    ] {
        let (_server_rt, addr) = start(backend);
        let client_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut sender = client_rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender
        });
        group.bench_function(format!("{name}/plaintext"), |b| {
            b.iter(|| {
                client_rt.block_on(async {
                    let req = http::Request::get("/plaintext")
                        .header("host", addr.to_string())
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let res = sender.send_request(req).await.unwrap();
                    assert_eq!(res.status(), 200);
                    let body = res.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(&body[..], b"Hello, World!");
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, roundtrip);
criterion_main!(benches);
