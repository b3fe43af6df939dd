//! WebSockets over HTTP/2 (RFC 8441 extended CONNECT), on both backends: `hop::ws` and axum's
//! `WebSocketUpgrade`, each called by hyper's HTTP/2 client with `:protocol websocket` and
//! driven by tokio-tungstenite over the upgraded stream; several sockets share one connection.
//! At a graceful shutdown, a `hop::ws` socket and a `hop::sse` stream on an HTTP/2 connection
//! are told (close 1001, end of stream) and the server drains without forcing anything.

use compat_tests::{
    axum_ws_echo, backend_tests, close_ws_over_h2, open_ws_over_h2, start, start_with_shutdown,
    ws_echo, IO_TIMEOUT,
};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Sender = hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>;

/// An HTTP/2 connection (prior knowledge) to `addr`, driven by a task of its own.
async fn h2_connect(addr: std::net::SocketAddr) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

async fn echo_twice(ws: &mut WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, tag: &str) {
    for i in 0..2 {
        let text = format!("{tag} {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let got = tokio::time::timeout(IO_TIMEOUT, ws.next())
            .await
            .expect("echo in time")
            .expect("a message")
            .expect("no error");
        assert_eq!(got, Message::text(text));
    }
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let got = tokio::time::timeout(IO_TIMEOUT, ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("no error");
    assert_eq!(got.into_data().as_ref(), &big[..]);
}

backend_tests! {
    /// WebSockets over HTTP/2 that stay quiet past the default `request_body_timeout` (30 s)
    /// and past hop::ws's first ping: an extended CONNECT stream is no request body, so it is
    /// never reset for quiet; both still echo at 40 s.
    async fn quiet_websockets_over_http2_outlive_the_body_timeout(backend) {
        let app = axum::Router::new()
            .route("/ws", axum::routing::any(ws_echo))
            .route("/ws-axum", axum::routing::any(axum_ws_echo));
        let server = start(backend, app, |b| b);
        let mut send = h2_connect(server.addr).await;
        let mut hop_ws = open_ws_over_h2(&mut send, "/ws").await;
        let mut axum_ws = open_ws_over_h2(&mut send, "/ws-axum").await;
        echo_twice(&mut hop_ws, "hop").await;
        echo_twice(&mut axum_ws, "axum").await;
        // Quiet: tungstenite answers hop::ws's ping (read below) by itself.
        let quiet = tokio::time::Instant::now() + std::time::Duration::from_secs(40);
        loop {
            match tokio::time::timeout_at(quiet, hop_ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(Message::Ping(_)))) | Ok(Some(Ok(Message::Pong(_)))) => {}
                Ok(other) => panic!("[{backend}] hop::ws over h2 while quiet: {other:?}"),
            }
        }
        echo_twice(&mut hop_ws, "hop after 40 s").await;
        echo_twice(&mut axum_ws, "axum after 40 s").await;
    }

    async fn websockets_over_http2(backend) {
        let app = axum::Router::new()
            .route("/ws", axum::routing::any(ws_echo))
            .route("/ws-axum", axum::routing::any(axum_ws_echo));
        let server = start(backend, app, |b| b);
        let mut send = h2_connect(server.addr).await;
        let mut hop_ws = open_ws_over_h2(&mut send, "/ws").await;
        let mut axum_ws = open_ws_over_h2(&mut send, "/ws-axum").await;
        echo_twice(&mut hop_ws, "hop").await;
        echo_twice(&mut axum_ws, "axum").await;
        // Both close cleanly, and the connection serves on.
        close_ws_over_h2(&mut hop_ws).await.expect("hop::ws closes");
        close_ws_over_h2(&mut axum_ws).await.expect("axum's WebSocket closes");
        let mut again = open_ws_over_h2(&mut send, "/ws").await;
        echo_twice(&mut again, "again").await;
        let stats = server.handle.stats();
        assert_eq!(stats.http2_connections, 1, "[{backend}] {stats:?}");
        assert!(stats.http2_streams >= 3, "[{backend}] {stats:?}");
    }

    async fn http1_websocket_still_answers_101(backend) {
        let app = axum::Router::new().route("/ws", axum::routing::any(ws_echo));
        let server = start(backend, app, |b| b);
        let (mut ws, res) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
            .await
            .expect("h1 websocket");
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::text("h1")).await.unwrap();
        let got = ws.next().await.unwrap().unwrap();
        assert_eq!(got, Message::text("h1"));
    }

    async fn ws_and_sse_over_http2_are_told_of_a_graceful_shutdown(backend) {
        use http_body_util::BodyExt;
        let hub = hop::sse::Hub::new();
        let sse_hub = hub.clone();
        let app = axum::Router::new()
            .route("/ws", axum::routing::any(ws_echo))
            .route(
                "/sse",
                axum::routing::get(move |req: axum::extract::Request| {
                    let hub = sse_hub.clone();
                    async move { axum::response::IntoResponse::into_response(hub.subscribe(&req)) }
                }),
            );
        let (server, stop) = start_with_shutdown(backend, app, |b| b);
        let mut send = h2_connect(server.addr).await;
        let mut ws = open_ws_over_h2(&mut send, "/ws").await;
        echo_twice(&mut ws, "before").await;
        let req = Request::get("http://localhost/sse").body(Empty::new()).unwrap();
        let res = send.send_request(req).await.expect("GET /sse");
        assert_eq!(res.status(), StatusCode::OK);
        let mut sse = res.into_body();
        let t0 = std::time::Instant::now();
        while hub.is_empty() {
            assert!(t0.elapsed() < IO_TIMEOUT, "[{backend}] no SSE subscriber");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }

        let _ = stop.send(());
        // The WebSocket is closed with 1001 (going away)...
        let close = tokio::time::timeout(IO_TIMEOUT, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => break frame,
                    Some(Ok(_)) => continue,
                    other => panic!("[{backend}] no close frame: {other:?}"),
                }
            }
        })
        .await
        .expect("close in time");
        assert_eq!(
            close.map(|f| u16::from(f.code)),
            Some(1001),
            "[{backend}] close code"
        );
        // ...and the SSE stream ends.
        tokio::time::timeout(IO_TIMEOUT, async {
            while let Some(frame) = sse.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        })
        .await
        .expect("[SSE] the stream ends in time");
        drop(ws);
        // Well within the 30 s drain timeout, and nothing forced.
        let handle = server.handle.clone();
        server.join(IO_TIMEOUT).await;
        assert_eq!(handle.stats().forced, 0, "[{backend}] {:?}", handle.stats());
    }

    async fn websocket_over_http2_outlives_the_idle_goaway(backend) {
        // A WebSocket is an upgraded stream, open as long as hyper's task that sends its data:
        // silent for longer than the idle timeout plus the close timeout (both set small here
        // to observe them), it still works.
        let app = axum::Router::new()
            .route("/ws", axum::routing::any(ws_echo))
            .route("/ws-axum", axum::routing::any(axum_ws_echo));
        let server = start(backend, app, |b| {
            b.http2_idle_timeout(std::time::Duration::from_millis(300))
                .close_timeout(std::time::Duration::from_millis(500))
        });
        let mut send = h2_connect(server.addr).await;
        let mut hop_ws = open_ws_over_h2(&mut send, "/ws").await;
        let mut axum_ws = open_ws_over_h2(&mut send, "/ws-axum").await;
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        echo_twice(&mut hop_ws, "hop").await;
        echo_twice(&mut axum_ws, "axum").await;
    }
}
