//! The handshake: checking an upgrade request (RFC 6455's `GET` with `Upgrade` over
//! HTTP/1.1, or RFC 8441's extended CONNECT over HTTP/2), choosing the subprotocol,
//! negotiating permessage-deflate, answering `101` (or `200` over HTTP/2) and handing the
//! connection to a `WsProtocol`; or answering why not (`400`, `405`, `426`). The fronts are
//! [`upgrade`], [`upgrade_frames`] and the `WsUpgrade` axum extractor.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::hijack::Hijack;

use super::api::{Endpoint, Frames, Messages, WsConfig, WsFrameHandler, WsHandler};
use super::deflate;
use super::protocol::WsProtocol;

/// Validates a WebSocket handshake and answers `101`, handing the connection to `handler`;
/// answers `400` (or `426`) when the request is not a valid handshake.
pub fn upgrade<B, H: WsHandler>(req: Request<B>, handler: H) -> Response<Full<Bytes>> {
    upgrade_to(req, Messages(handler))
}

/// As [`upgrade`], for a [`WsFrameHandler`]: it gets frames as they arrive.
pub fn upgrade_frames<B, H: WsFrameHandler>(req: Request<B>, handler: H) -> Response<Full<Bytes>> {
    upgrade_to(req, Frames(handler))
}

fn upgrade_to<B, E: Endpoint>(mut req: Request<B>, handler: E) -> Response<Full<Bytes>> {
    let hijack = Hijack::from_request(&mut req).map(Hijack::websocket);
    let h2 = is_extended_connect(req.method(), req.extensions());
    respond(
        req.method(),
        h2,
        req.headers(),
        hijack,
        &[],
        WsConfig::default(),
        handler,
    )
}

/// RFC 6455 4.1: the key is 16 bytes, base64-encoded (24 characters).
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && data_encoding::BASE64
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

fn bad(status: StatusCode, why: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(why.as_bytes())));
    *res.status_mut() = status;
    res
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// An HTTP/2 extended CONNECT for a WebSocket (RFC 8441 §4).
fn is_extended_connect(method: &Method, ext: &http::Extensions) -> bool {
    method == Method::CONNECT
        && ext
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Answers a handshake: RFC 6455's `GET` with `Upgrade` over HTTP/1.1 (`101`), or RFC 8441's
/// extended CONNECT over HTTP/2 (`h2`: `200`, no key).
fn respond<E: Endpoint>(
    method: &Method,
    h2: bool,
    headers: &HeaderMap,
    hijack: Option<Hijack>,
    protocols: &[String],
    cfg: WsConfig,
    handler: E,
) -> Response<Full<Bytes>> {
    if !h2 && method != Method::GET {
        return bad(
            StatusCode::METHOD_NOT_ALLOWED,
            "websocket handshake must be GET",
        );
    }
    if !h2
        && (!header_has_token(headers, header::CONNECTION, "upgrade")
            || !header_has_token(headers, header::UPGRADE, "websocket"))
    {
        return bad(StatusCode::UPGRADE_REQUIRED, "expected a websocket upgrade");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        let mut res = bad(StatusCode::BAD_REQUEST, "unsupported websocket version");
        res.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return res;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    if !h2 && !key.is_some_and(|k| valid_key(k.as_bytes())) {
        return bad(StatusCode::BAD_REQUEST, "bad or missing sec-websocket-key");
    }
    let Some(hijack) = hijack else {
        return bad(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        );
    };
    // The server's first choice among those the client offers (as axum's `WebSocketUpgrade`).
    let offered = || {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    let chosen = protocols
        .iter()
        .find(|p| offered().any(|o| o == p.as_str()));
    // A frame handler gets the frames as they are on the wire: no compression.
    let deflate = match E::STREAMING {
        true => None,
        false => deflate::negotiate(&cfg.deflate, headers),
    };
    let (codec, extensions) = deflate.unzip();
    hijack.take_over(Box::new(WsProtocol::new(handler, cfg, codec)));
    let mut res = Response::new(Full::new(Bytes::new()));
    // Over HTTP/2 a 2xx to the CONNECT opens the tunnel (RFC 8441 §5): 200, no key.
    if !h2 {
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    let h = res.headers_mut();
    if let (false, Some(key)) = (h2, key) {
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
    }
    if let Some(p) = chosen.and_then(|p| HeaderValue::from_str(p).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    if let Some(e) = extensions {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, e);
    }
    res
}

/// The axum extractor for a hop WebSocket: `upgrade.on_upgrade(handler)` answers the handshake.
#[cfg(feature = "axum")]
#[derive(Debug)]
pub struct WsUpgrade {
    method: Method,
    /// An HTTP/2 extended CONNECT handshake.
    h2: bool,
    headers: HeaderMap,
    hijack: Option<Hijack>,
    protocols: Vec<String>,
    cfg: WsConfig,
}

#[cfg(feature = "axum")]
impl WsUpgrade {
    /// Subprotocols the server speaks, in its order of preference: the first of them that the
    /// client offers (in `Sec-WebSocket-Protocol`, in any order) is chosen and answered. With
    /// none in common, or none set, the handshake succeeds with no subprotocol (RFC 6455 4.2.2);
    /// the client decides whether to go on.
    pub fn protocols<I: IntoIterator<Item = S>, S: Into<String>>(mut self, protocols: I) -> Self {
        self.protocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Frame and message size limits.
    pub fn config(mut self, cfg: WsConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// Answers the handshake and hands the connection to `handler`.
    pub fn on_upgrade<H: WsHandler>(self, handler: H) -> axum::response::Response {
        self.respond(Messages(handler))
    }

    /// Answers the handshake and hands the connection to a frame handler: it gets frames as
    /// they arrive.
    pub fn on_upgrade_frames<H: WsFrameHandler>(self, handler: H) -> axum::response::Response {
        self.respond(Frames(handler))
    }

    fn respond<E: Endpoint>(self, handler: E) -> axum::response::Response {
        use axum::response::IntoResponse;
        respond(
            &self.method,
            self.h2,
            &self.headers,
            self.hijack,
            &self.protocols,
            self.cfg,
            handler,
        )
        .into_response()
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for WsUpgrade {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let hijack = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .map(|u| Hijack::from_on_upgrade(u).websocket());
        Ok(WsUpgrade {
            method: parts.method.clone(),
            h2: is_extended_connect(&parts.method, &parts.extensions),
            headers: parts.headers.clone(),
            hijack,
            protocols: Vec::new(),
            cfg: WsConfig::default(),
        })
    }
}
