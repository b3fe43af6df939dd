//! axum's own `WebSocketUpgrade` and `Sse` served unchanged by both backends (a task per
//! connection for the WebSocket, a streaming body for SSE), with real clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message as AxumMessage, WebSocket, WebSocketUpgrade};
use axum::response::sse::{Event, Sse};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use compat_tests::backend_tests;
use eventsource_stream::Eventsource;
use futures_util::{SinkExt, StreamExt};
use hop::Backend;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.next().await {
            let reply = match msg {
                AxumMessage::Text(t) => AxumMessage::Text(t),
                AxumMessage::Binary(b) => AxumMessage::Binary(b),
                AxumMessage::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn sse() -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let events = futures_util::stream::iter(0..3).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Event::default()
            .id(i.to_string())
            .data(format!("event {i}")))
    });
    Sse::new(events)
}

fn start(backend: Backend) -> (SocketAddr, hop::Handle) {
    let app = Router::new().route("/ws", get(ws)).route("/sse", get(sse));
    let srv = compat_tests::start(backend, app, |b| b);
    (srv.addr, srv.handle)
}

backend_tests! {
    async fn axum_websocket_upgrade_echo(backend) {
        let (addr, handle) = start(backend);
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await.unwrap();
        for i in 0..10 {
            ws.send(Message::text(format!("m{i}"))).await.unwrap();
            let got = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
            assert_eq!(got, Message::text(format!("m{i}")));
        }
        ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
        let got = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(got, Message::binary(vec![7u8; 100_000]));
        ws.close(None).await.unwrap();
        handle.shutdown();
    }

    async fn axum_sse_stream(backend) {
        let (addr, handle) = start(backend);
        let res = reqwest::get(format!("http://{addr}/sse")).await.unwrap();
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        let mut events = res.bytes_stream().eventsource();
        for i in 0..3 {
            let ev = tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap().unwrap();
            assert_eq!((ev.id.as_str(), ev.data.as_str()), (i.to_string().as_str(), format!("event {i}").as_str()));
        }
        // The stream ends after the last event.
        assert!(tokio::time::timeout(WAIT, events.next()).await.unwrap().is_none());
        handle.shutdown();
    }
}
