//! The one-line swap: an ordinary axum application written for `axum::serve` (a tokio
//! listener, `Router`, `into_make_service`, graceful shutdown) runs on `hop::serve` unchanged.

use std::time::Duration;

use axum::routing::get;
use axum::Router;

fn app() -> Router {
    Router::new().route("/", get(|| async { "Hello, World!" }))
}

async fn get_text(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_listener_router_and_graceful_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        hop::serve(listener, app())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn into_make_service_on_a_tokio_listener() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = hop::serve(listener, app().into_make_service());
    let handle = serve.handle();
    tokio::spawn(std::future::IntoFuture::into_future(serve));
    assert_eq!(get_text(addr).await, "Hello, World!");
    handle.shutdown();
}

#[test]
fn run_without_a_runtime() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = hop::serve(listener, app());
    let handle = serve.handle();
    let server = std::thread::spawn(move || serve.run());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = rt.block_on(async {
        for _ in 0..100 {
            if let Ok(r) = reqwest::get(format!("http://{addr}/")).await {
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
