//! Serving one HTTP connection over hyper on the tokio backend ([`Http`]: hyper's `http1`
//! builder, the HTTP/2 settings, the timeouts): HTTP/2 told from HTTP/1.1 by the first bytes
//! under the header timeout; HTTP/1.1 with upgrades, its request-body timeout and its age and
//! request limits; HTTP/2 with its idle timeout, age and request limits (GOAWAY) and its
//! control-frame budget; over TLS, the handshake then ALPN's choice ([`serve_tls`]); and the
//! drive that shuts a connection down gracefully on a drain or at a limit and resets it at the
//! drain deadline ([`drive`]).

use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::http2::{Http2Svc, Meter, Metered, Proto};
use crate::limits::Limit;
use crate::observe::Reason;
use crate::proxy::ProxyHeader;
use crate::service::{BodyClock, BodyIo, Clocked, ConnLimits, ConnService, HyperSvc};
use crate::settings::{Control, Http2Config, Place};

use super::accept::Accept;
use super::streams::StreamExec;
#[cfg(any(feature = "tls", feature = "tls-ring"))]
use super::tls::{tls_handshake, TokioTls};

/// How HTTP connections are served: hyper's `http1` builder, the HTTP/2 settings if HTTP/2 is
/// on, and how long a new connection may take to send its first bytes.
pub(super) struct Http {
    /// `max_connection_age`.
    pub(super) max_age: Option<Duration>,
    /// `max_requests_per_connection` (`u64::MAX`: none).
    pub(super) max_requests: u64,
    pub(super) http1: hyper::server::conn::http1::Builder,
    pub(super) http2: Option<Http2Config>,
    pub(super) head_limit: Option<Duration>,
    /// Which timeout `head_limit` is, as a reason to close.
    pub(super) head_reason: Reason,
    /// How long an HTTP/2 connection sent GOAWAY for idleness may take to close once no stream
    /// is open (the read handlers' `close_timeout`, as on the reactor).
    pub(super) close_timeout: Duration,
    /// A request body with no progress for this long ends its request (`request_body_timeout`).
    pub(super) body_timeout: Option<Duration>,
    /// TLS, when configured: every connection starts with a handshake.
    #[cfg(any(feature = "tls", feature = "tls-ring"))]
    pub(super) tls: Option<TokioTls>,
}

/// Serves one HTTP connection: HTTP/1.1, or HTTP/2 when its first bytes are the preface.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve_http<A: Accept, S: ConnService>(
    stream: A::Io,
    fd: Option<RawFd>,
    place: Arc<Place>,
    svc: S,
    proxy: Option<ProxyHeader>,
    http: &Http,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) -> Reason {
    let accepted_at = tokio::time::Instant::now();
    let (proto, stream) = match &http.http2 {
        None => (Proto::Http1, A::plain(stream)),
        Some(_) => {
            let sniffed = async {
                match http.head_limit {
                    Some(t) => tokio::time::timeout(t, A::sniff(stream)).await.ok(),
                    None => Some(A::sniff(stream).await),
                }
            };
            tokio::select! {
                sniffed = sniffed => match sniffed {
                    Some(Ok(Some(s))) => s,
                    Some(Ok(None)) => return Reason::Closed,
                    Some(Err(_)) => return Reason::Error,
                    None => return http.head_reason,
                },
                // During a drain a new connection still gets its first request answered, if
                // it comes within the grace (it may have been accepted as the drain began).
                _ = async {
                    let _ = drain.wait_for(|d| *d).await;
                    tokio::time::sleep_until(accepted_at + crate::settings::FIRST_REQUEST_GRACE).await;
                } => return Reason::Closed,
                _ = cut.notified() => return Reason::Closed,
            }
        }
    };
    serve_proto(
        proto, stream, fd, place, svc, proxy, http, ctl, drain, cut, true,
    )
    .await
}

/// Serves one connection whose protocol is known: hyper's HTTP/2 connection (if HTTP/2 is
/// on), else its HTTP/1.1 one with upgrades; graceful shutdown on `drain`, a reset on `cut`;
/// `proxy` (a PROXY protocol header) in every request. `count`: its bytes are counted here
/// (`stream` is the socket itself, not TLS over a counted one). Why it closed.
#[allow(clippy::too_many_arguments)]
async fn serve_proto<IO, S>(
    proto: Proto,
    stream: IO,
    fd: Option<RawFd>,
    place: Arc<Place>,
    svc: S,
    proxy: Option<ProxyHeader>,
    http: &Http,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
    count: bool,
) -> Reason
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let age = http
        .max_age
        .map(|age| crate::rt::timer::deadline(Instant::now(), age));
    if let (Proto::Http2, Some(h2)) = (proto, &http.http2) {
        return match count {
            true => {
                let stream = crate::observe::count_io(stream);
                serve_h2(stream, fd, svc, proxy, http, h2, age, ctl, drain, cut).await
            }
            false => serve_h2(stream, fd, svc, proxy, http, h2, age, ctl, drain, cut).await,
        };
    }
    // The request-body timeout's view of the connection (see `service::BodyClock`).
    let clock = Arc::new(BodyClock::default());
    let io = TokioIo::new(BodyIo::new(stream, clock.clone(), place, count));
    let limits = (age.is_some() || http.max_requests != u64::MAX)
        .then(|| Arc::new(ConnLimits::new(age, http.max_requests)));
    let svc = Clocked::new(
        HyperSvc::new(svc).with_proxy(proxy),
        clock.clone(),
        ctl.clone(),
        limits.clone(),
    );
    let conn = http.http1.serve_connection(io, svc).with_upgrades();
    // Past its age, a connection idle for `AGE_IDLE_GRACE` is closed (a request in flight
    // then gets `Connection: close`, as the next one does in `Clocked`).
    let aged_idle = async {
        let (Some(l), Some(at)) = (&limits, age) else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(at.into()).await;
        loop {
            let seen = l.requests.load(Ordering::Relaxed);
            tokio::time::sleep(crate::limits::AGE_IDLE_GRACE).await;
            if l.requests.load(Ordering::Relaxed) == seen {
                if !l.told.swap(true, Ordering::Relaxed) {
                    ctl.limit_reached(Limit::Age);
                }
                return Reason::MaxConnectionAge;
            }
        }
    };
    let no_limit = std::future::pending::<()>();
    let conn = drive(
        conn,
        |c| c.graceful_shutdown(),
        aged_idle,
        no_limit,
        fd,
        &mut drain,
        &cut,
        http.head_reason,
    );
    let watch = async {
        let Some(limit) = http.body_timeout else {
            return std::future::pending().await;
        };
        loop {
            match clock.next_due(limit).await {
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => std::future::pending().await,
            }
            clock.check(Instant::now(), limit);
        }
    };
    let why = tokio::select! {
        why = conn => why,
        _ = watch => Reason::RequestBodyTimeout,
    };
    if clock.fired() {
        return Reason::RequestBodyTimeout;
    }
    match (why, limits.as_ref().and_then(|l| l.told_for.get())) {
        // Its last response said `Connection: close` for a limit.
        (Reason::Closed, Some(&limit)) => limit.into(),
        (why, _) => why,
    }
}

/// Completes at `at`; never for `None`.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Serves one HTTP/2 connection (see [`serve_proto`]); why it closed.
#[allow(clippy::too_many_arguments)]
async fn serve_h2<IO, S>(
    stream: IO,
    fd: Option<RawFd>,
    svc: S,
    proxy: Option<ProxyHeader>,
    http: &Http,
    h2: &Http2Config,
    age: Option<Instant>,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) -> Reason
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let exec = StreamExec::new(http.max_requests);
    let streams = exec.0.clone();
    // Between hyper and the socket: the control-frame budget and the stalled-body watch.
    let meter = Arc::new(std::sync::Mutex::new(Meter::new(h2, http.body_timeout)));
    let io = TokioIo::new(Metered::new(stream, meter.clone()));
    let conn = h2.builder(exec).serve_connection(
        io,
        Http2Svc::new(
            HyperSvc::new(svc).with_proxy(proxy),
            ctl.clone(),
            meter.clone(),
        ),
    );
    let idle_timeout = async {
        match h2.idle_timeout {
            Some(t) => streams.idle_for(t).await,
            None => std::future::pending().await,
        }
    };
    // GOAWAY at the idle timeout, the connection's age, or its last stream.
    let idle = async {
        tokio::select! {
            _ = idle_timeout => Reason::IdleTimeout,
            _ = until(age) => {
                ctl.limit_reached(Limit::Age);
                Reason::MaxConnectionAge
            }
            _ = streams.reached() => {
                ctl.limit_reached(Limit::Requests);
                Reason::MaxRequests
            }
        }
    };
    // Once GOAWAY is sent, a client that holds the connection open (it never reads, or never
    // closes) is cut when no stream has been open for the close timeout.
    let closing = streams.idle_for(http.close_timeout);
    let conn = drive(
        conn,
        |c| c.graceful_shutdown(),
        idle,
        closing,
        fd,
        &mut drain,
        &cut,
        http.head_reason,
    );
    tokio::select! {
        why = conn => why,
        // A body stalled in the middle of a frame: the connection is dropped.
        _ = crate::http2::watch_bodies(meter) => Reason::RequestBodyTimeout,
    }
}

/// Drives a hyper connection (HTTP/1.1 or HTTP/2) to its end: `graceful_shutdown` once the
/// server drains or `idle` completes (HTTP/2's idle timeout: GOAWAY), then dropped if it has
/// not closed when `closing` completes (polled from the GOAWAY on); a reset of the socket `fd`
/// (when hop may touch it) when the drain deadline cuts it. Why it closed: what `idle` gave
/// (the reason for its GOAWAY), hyper's header timeout (`head_reason`), an error.
#[allow(clippy::too_many_arguments)]
async fn drive<C>(
    conn: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    idle: impl Future<Output = Reason>,
    closing_limit: impl Future<Output = ()>,
    fd: Option<RawFd>,
    drain: &mut watch::Receiver<bool>,
    cut: &tokio::sync::Notify,
    head_reason: Reason,
) -> Reason
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    tokio::pin!(idle);
    tokio::pin!(closing_limit);
    let mut closing = false;
    let mut goaway_for = Reason::Closed;
    loop {
        tokio::select! {
            // The connection first: a new one reads what is waiting before a drain's
            // `graceful_shutdown`, which would otherwise close it unanswered.
            biased;
            res = conn.as_mut() => {
                return match res {
                    Err(e) if e.is_timeout() => head_reason,
                    Err(e) => {
                        tracing::debug!(error = %e, "connection ended with an error");
                        Reason::Error
                    }
                    Ok(()) => goaway_for,
                };
            }
            _ = async { drain.wait_for(|d| *d).await.is_ok() }, if !closing => {
                closing = true;
                graceful_shutdown(conn.as_mut());
            }
            why = idle.as_mut(), if !closing => {
                tracing::debug!("connection idle or at a limit: closing gracefully (GOAWAY on HTTP/2)");
                closing = true;
                goaway_for = why;
                graceful_shutdown(conn.as_mut());
            }
            _ = closing_limit.as_mut(), if closing => {
                tracing::debug!("HTTP/2 connection not closed in time; closing");
                return goaway_for;
            }
            _ = cut.notified() => {
                if let Some(fd) = fd {
                    // SAFETY: the connection owns the socket and is alive here (`conn` is
                    // dropped after this returns), so the descriptor is open.
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                }
                return Reason::Closed;
            }
        }
    }
}

/// Serves one TLS connection: the handshake, then HTTP/2 if ALPN agreed on `h2`, else
/// HTTP/1.1, with a [`TlsInfo`](crate::tls::TlsInfo) in every request.
#[cfg(any(feature = "tls", feature = "tls-ring"))]
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve_tls<A: Accept, S: ConnService>(
    stream: A::Io,
    fd: Option<RawFd>,
    place: Arc<Place>,
    svc: S,
    proxy: Option<ProxyHeader>,
    http: &Http,
    tls: &TokioTls,
    ctl: Arc<Control>,
    mut drain: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) -> Reason {
    let http2 = http.http2.is_some();
    // Counted under TLS: the bytes on the wire.
    let stream = crate::observe::count_io(stream);
    let stream = match tls_handshake(stream, tls, http2, &ctl, &mut drain, &cut).await {
        Ok(stream) => stream,
        Err(why) => return why,
    };
    let _tls = crate::limits::Gauged::new(crate::observe::Open::Tls);
    let conn = stream.get_ref().1;
    let proto = if http2 && conn.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        Proto::Http2
    } else {
        Proto::Http1
    };
    let svc = crate::tls::WithTlsInfo::new(svc, crate::tls::TlsInfo::new(conn.server_name(), conn));
    serve_proto(
        proto, stream, fd, place, svc, proxy, http, ctl, drain, cut, false,
    )
    .await
}
