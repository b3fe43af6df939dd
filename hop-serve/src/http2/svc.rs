//! The service hyper's HTTP/2 connection calls on both backends ([`Http2Svc`]): the user's
//! service through [`HyperSvc`], each stream counted, and each request with a body still to
//! come claimed in the connection's [`Meter`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;

use crate::limits::H2Open;
use crate::service::{ConnService, HyperSvc};
use crate::settings::Control;

use super::meter::{lock, Meter};

/// The service an HTTP/2 connection calls: [`HyperSvc`] (panics caught), counting streams, and
/// telling the connection's [`Meter`] which watched stream each request is ([`Meter::claim`]).
pub(crate) struct Http2Svc<S> {
    inner: HyperSvc<S>,
    ctl: Arc<Control>,
    meter: Arc<std::sync::Mutex<Meter>>,
    /// Reports the connection as HTTP/2 while hyper holds it (see [`H2Open`]).
    _open: H2Open,
}

impl<S> Http2Svc<S> {
    pub(crate) fn new(
        inner: HyperSvc<S>,
        ctl: Arc<Control>,
        meter: Arc<std::sync::Mutex<Meter>>,
    ) -> Self {
        ctl.http2_connections.fetch_add(1, Ordering::Relaxed);
        Http2Svc {
            inner,
            ctl,
            meter,
            _open: H2Open::new(),
        }
    }
}

impl<S: ConnService> hyper::service::Service<Request<Incoming>> for Http2Svc<S> {
    type Response = <HyperSvc<S> as hyper::service::Service<Request<Incoming>>>::Response;
    type Error = <HyperSvc<S> as hyper::service::Service<Request<Incoming>>>::Error;
    type Future = <HyperSvc<S> as hyper::service::Service<Request<Incoming>>>::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.ctl.http2_stream();
        // hyper hands a CONNECT's handler an empty body (the stream goes to the upgrade).
        let connect = req.method() == http::Method::CONNECT;
        if connect || !http_body::Body::is_end_stream(req.body()) {
            lock(&self.meter).claim(connect);
        }
        self.inner.call(req)
    }
}
