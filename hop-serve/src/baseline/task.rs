//! A connection's task on the tokio backend, from accept to its end: what the app makes of it
//! ([`make`]; a panic there costs this connection only), its PROXY protocol header read first
//! when that is on ([`proxied`]), then a read handler (after its TLS handshake, on a TLS
//! listener) or HTTP ([`run_conn`]), counted open as HTTP while hyper has it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::handler::context;
use crate::handler::ConnCore;
use crate::limits::{OpenGuard, OpenKind};
use crate::observe::Reason;
use crate::proxy::{Failure, ProxyHeader};
use crate::service::app::{App, NewConn};
use crate::service::{ConnService, IncomingStream};
use crate::settings::{Control, Place};

use super::accept::Accept;
#[cfg(any(feature = "tls", feature = "tls-ring"))]
use super::conn::serve_tls;
use super::conn::{serve_http, Http};
#[cfg(any(feature = "tls", feature = "tls-ring"))]
use super::tls::tls_handshake;

/// Counts an HTTP connection task open (`OpenCounts::http`) until it ends.
struct HttpGuard(Arc<Control>);

impl Drop for HttpGuard {
    fn drop(&mut self) {
        self.0.open.http_closed();
    }
}

/// Asks the app what a new connection becomes. The make-service is user code: a panic in it
/// costs this connection only. `None` (the connection closes, as an error) if it was not ready
/// or panicked; `who` names the connection in the log.
pub(super) fn make<P: App>(
    app: &mut P,
    incoming: IncomingStream<'_>,
    who: &dyn std::fmt::Debug,
    guard: &Place,
) -> Option<NewConn<P::Svc>> {
    let accepted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| app.accept(incoming)));
    match accepted {
        Ok(Some(a)) => Some(a),
        Ok(None) => {
            crate::logs::error_limited!(?who, "the make-service was not ready; closing");
            guard.closed_for(Reason::Error);
            None
        }
        Err(panic) => {
            guard.control().contained_panic("the make-service", &*panic);
            guard.closed_for(Reason::Error);
            None
        }
    }
}

/// A connection's task with the PROXY protocol on: reads its header (under the header timeout;
/// given up when the server drains), asks `app` what the connection becomes with the header's
/// source as its peer, then runs it ([`run_conn`]). A refused header is counted and logged.
#[allow(clippy::too_many_arguments)]
pub(super) async fn proxied<P: App, A: Accept>(
    mut app: P,
    mut stream: A::Io,
    peer: A::Peer,
    local: SocketAddr,
    http: Arc<Http>,
    tcp: Arc<crate::handler::TcpConfig>,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    guard: Arc<Place>,
    max_per_ip: Option<usize>,
) {
    let read = async {
        match http.head_limit {
            Some(t) => tokio::time::timeout(t, A::proxy_header(&mut stream))
                .await
                .unwrap_or(Err(Failure::TimedOut)),
            None => A::proxy_header(&mut stream).await,
        }
    };
    let header = tokio::select! {
        header = read => header,
        _ = async { drain.wait_for(|d| *d).await.is_ok() } => return,
    };
    let header = match header {
        Ok(header) => header,
        Err(why) => {
            crate::proxy::refused(&ctl, &peer, &why);
            guard.closed_for(Reason::ProxyHeader);
            return;
        }
    };
    // The task runs in the connection's span (feature `metrics`).
    #[cfg(feature = "metrics")]
    crate::observe::record_client(&tracing::Span::current(), header.source());
    // Its IP's place: the header's source, or the socket's peer for a header without one.
    let client = header
        .source()
        .map(|a| a.ip())
        .or_else(|| A::peer_ip(&peer));
    if let (Some(max), Some(client)) = (max_per_ip, client) {
        let Some(slot) = ctl.ip_place(client, max) else {
            guard.closed_for(Reason::MaxConnectionsPerIp);
            return;
        };
        guard.hold_ip(slot);
    }
    let incoming = A::proxied(&stream, &peer, local, &header);
    let Some(accepted) = make(&mut app, incoming, &incoming, &guard) else {
        return;
    };
    run_conn::<A, _>(accepted, stream, Some(header), http, tcp, ctl, drain, guard).await;
}

/// Runs an accepted connection to its end, as the app said: a read handler (after its TLS
/// handshake, on a TLS listener) or HTTP, on the task this runs in. `proxy`: its PROXY protocol
/// header, put into every request.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_conn<A: Accept, S: ConnService>(
    accepted: NewConn<S>,
    stream: A::Io,
    proxy: Option<ProxyHeader>,
    http: Arc<Http>,
    tcp: Arc<crate::handler::TcpConfig>,
    ctl: Arc<Control>,
    drain: watch::Receiver<bool>,
    guard: Arc<Place>,
) {
    let svc = match accepted {
        NewConn::Http(svc) => svc,
        NewConn::Tcp(handler) => {
            let conn = crate::handler::Conn::new(A::tcp_fd(&stream), &tcp);
            let mut core = ConnCore::new(handler, conn, Default::default(), tcp, Instant::now());
            core.open = Some(OpenGuard::new(ctl.open.clone(), OpenKind::Tcp));
            let stream = crate::observe::count_io(stream);
            #[cfg(any(feature = "tls", feature = "tls-ring"))]
            if let Some(tls) = &http.tls {
                let mut hs_drain = drain.clone();
                let never = tokio::sync::Notify::new();
                let stream =
                    match tls_handshake(stream, tls, false, &ctl, &mut hs_drain, &never).await {
                        Ok(stream) => stream,
                        Err(why) => {
                            guard.closed_for(why);
                            return;
                        }
                    };
                let _tls = crate::limits::Gauged::new(crate::observe::Open::Tls);
                let why = crate::handler::run_task(core, stream, drain).await;
                guard.closed_for(why.unwrap_or(Reason::Closed));
                return;
            }
            let _ = (&http, &ctl);
            let why = crate::handler::run_task(core, stream, drain).await;
            guard.closed_for(why.unwrap_or(Reason::Closed));
            return;
        }
    };
    let cut = Arc::new(tokio::sync::Notify::new());
    let fd = A::tcp_fd(&stream);
    ctl.open.http_opened();
    // Its place in the server's counts goes with the stream too, into an upgrade.
    let place = guard.clone();
    let why = context::with_cut(cut.clone(), async move {
        // Counted open as HTTP until hyper's connection ends (or is upgraded).
        let _http = HttpGuard(ctl.clone());
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        if let Some(tls) = &http.tls {
            return serve_tls::<A, _>(stream, fd, place, svc, proxy, &http, tls, ctl, drain, cut)
                .await;
        }
        serve_http::<A, _>(stream, fd, place, svc, proxy, &http, ctl, drain, cut).await
    })
    .await;
    guard.closed_for(why);
}
