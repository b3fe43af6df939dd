//! What both backends share of HTTP/2 (h2c with prior knowledge): recognizing the client
//! preface from a connection's first bytes ([`sniff`]), and the service hyper's HTTP/2
//! connection calls ([`Http2Svc`]: the user's service, with panics caught, counting each
//! stream in `Stats::http2_streams`).
//!
//! hyper's `http2` connection itself is driven by each backend: in place on a poller, its
//! streams as poller-local tasks (`conn::http`), or as a tokio task (`baseline`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;

use crate::service::{ConnService, HyperSvc};
use crate::settings::Control;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks, as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Http1,
    Http2,
}

/// What the first bytes of a connection say: `Http2` on the whole preface, `Http1` at the
/// first byte that differs from it, `None` while they are a strict prefix of it (a short read
/// never decides).
pub(crate) fn sniff(first: &[u8]) -> Option<Proto> {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Some(Proto::Http1)
    } else if n == PREFACE.len() {
        Some(Proto::Http2)
    } else {
        None
    }
}

/// The service an HTTP/2 connection calls: [`HyperSvc`] (panics caught), counting streams.
pub(crate) struct Http2Svc<S> {
    inner: HyperSvc<S>,
    ctl: Arc<Control>,
}

impl<S> Http2Svc<S> {
    pub(crate) fn new(inner: HyperSvc<S>, ctl: Arc<Control>) -> Self {
        ctl.http2_connections.fetch_add(1, Ordering::Relaxed);
        Http2Svc { inner, ctl }
    }
}

impl<S: ConnService> hyper::service::Service<Request<Incoming>> for Http2Svc<S> {
    type Response = <HyperSvc<S> as hyper::service::Service<Request<Incoming>>>::Response;
    type Error = <HyperSvc<S> as hyper::service::Service<Request<Incoming>>>::Error;
    type Future = <HyperSvc<S> as hyper::service::Service<Request<Incoming>>>::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.ctl.http2_streams.fetch_add(1, Ordering::Relaxed);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_decides_on_the_whole_preface_or_the_first_difference() {
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(sniff(PREFACE), Some(Proto::Http2));
        let mut more = PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4]);
        assert_eq!(sniff(&more), Some(Proto::Http2));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Some(Proto::Http1));
        assert_eq!(sniff(b"P"), None);
        assert_eq!(sniff(b"POST"), Some(Proto::Http1));
        assert_eq!(sniff(b"PRI * HTTP/1.1"), Some(Proto::Http1));
    }
}
