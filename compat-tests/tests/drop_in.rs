//! The one-line swap: an ordinary axum application written for `axum::serve` (a tokio
//! listener, `Router`, `into_make_service`, graceful shutdown) runs on `hop::serve` unchanged,
//! on both backends.
//!
//! `hop::serve(l, app)` is `hop::Server::builder().serve(l, app)` with the backend chosen by
//! `HOP_BACKEND`; the tests pin the backend on an otherwise default builder instead, so that
//! both run whatever the environment says.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use compat_tests::{backend_tests, Backend};

fn app() -> Router {
    Router::new().route("/", get(|| async { "Hello, World!" }))
}

async fn get_text(addr: std::net::SocketAddr) -> String {
    compat_tests::reqwest_client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

backend_tests! {
    async fn tokio_listener_router_and_graceful_shutdown(backend) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            hop::Server::builder().backend(backend).serve(listener, app())
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        });
        assert_eq!(get_text(addr).await, "Hello, World!");
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }

    async fn into_make_service_on_a_tokio_listener(backend) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = hop::Server::builder()
            .backend(backend)
            .serve(listener, app().into_make_service());
        let handle = serve.handle();
        let server = tokio::spawn(std::future::IntoFuture::into_future(serve));
        assert_eq!(get_text(addr).await, "Hello, World!");
        handle.shutdown();
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

#[test]
fn run_without_a_runtime_reactor() {
    run_without_a_runtime(Backend::Reactor);
}

#[test]
fn run_without_a_runtime_tokio() {
    run_without_a_runtime(Backend::Tokio);
}

fn run_without_a_runtime(backend: Backend) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = hop::Server::builder()
        .backend(backend)
        .serve(listener, app());
    let handle = serve.handle();
    let server = std::thread::spawn(move || serve.run());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = rt.block_on(async {
        for _ in 0..100 {
            if let Ok(r) = compat_tests::reqwest_client()
                .get(format!("http://{addr}/"))
                .send()
                .await
            {
                return r.text().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server never answered");
    });
    assert_eq!(body, "Hello, World!");
    handle.shutdown();
    server.join().unwrap().unwrap();
}
