//! TLS on the tokio backend (features `tls`, `tls-ring`): the configuration new handshakes use
//! and their time limit ([`TokioTls`]), and a connection's handshake through tokio-rustls
//! under that limit, given up when the server drains or cuts connections, counted however it
//! ends ([`tls_handshake`]). ALPN's choice between HTTP/2 and HTTP/1.1 follows it in
//! `conn::serve_tls`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::observe::Reason;
use crate::settings::Control;

/// TLS: the configuration new handshakes use, and their time limit.
pub(super) struct TokioTls {
    pub(super) config: crate::tls::RustlsConfig,
    pub(super) handshake_timeout: Duration,
}

/// Runs a new connection's TLS handshake under the handshake timeout, counting how it ends;
/// why not, if it failed, timed out, or the server is draining or cutting connections.
pub(super) async fn tls_handshake<IO>(
    stream: IO,
    tls: &TokioTls,
    http2: bool,
    ctl: &Control,
    drain: &mut watch::Receiver<bool>,
    cut: &tokio::sync::Notify,
) -> Result<tokio_rustls::server::TlsStream<IO>, Reason>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.current(http2));
    let handshake = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream));
    tokio::select! {
        res = handshake => match res {
            Ok(Ok(stream)) => {
                ctl.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                Ok(stream)
            }
            Ok(Err(e)) => {
                ctl.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                crate::logs::tls_handshake_failed(&e);
                Err(Reason::Error)
            }
            Err(_) => {
                ctl.tls_handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("TLS handshake timed out");
                Err(Reason::TlsHandshakeTimeout)
            }
        },
        _ = async { drain.wait_for(|d| *d).await.is_ok() } => Err(Reason::Closed),
        _ = cut.notified() => Err(Reason::Closed),
    }
}
