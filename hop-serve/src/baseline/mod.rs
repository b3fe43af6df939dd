//! The tokio baseline: the same `serve` on a tokio multi-thread runtime plus hyper, one task per
//! connection, configured like the reactor (`TCP_NODELAY`, the same timeouts
//! and limits, as many workers as the reactor has pollers). It is what hop is measured against,
//! so it is tuned as well as tokio allows, not a strawman.
//!
//! The accept loop takes connections from a TCP listener, a Unix listener, or a generic
//! `axum::serve::Listener` (an [`Accept`] each; only the generic one's streams are boxed). That
//! last path also serves generic listeners under the reactor backend, which cannot see their
//! sockets.
//!
//! hyper 1.x arms its header-read timer as soon as a keep-alive connection goes idle, so here the
//! idle timeout is hyper's header timer set to the smaller of the two timeouts.
//!
//! HTTP/2 is told from HTTP/1.1 as on the reactor, by peeking at the first bytes for the
//! preface (hyper-util's auto builder reads and replays them instead, with no time limit on
//! that wait); a generic listener's stream, which cannot be peeked, has the bytes read put back
//! in front (`replay::Replay`). An HTTP/2 connection is hyper's, its streams tokio tasks spawned by
//! [`StreamExec`](streams::StreamExec), which counts them open for the HTTP/2 idle timeout.
//!
//! With the PROXY protocol on, a connection's task reads the header first (peeked, then exactly
//! its bytes taken, under the header timeout), then asks a clone of the app for the service with
//! the proxied address, and goes on as any other connection ([`run_conn`]).
//!
//! The files, each importing only those after it: `task` (a connection's task: the app's
//! make-service, the PROXY header, then a read handler or HTTP), `conn` (serving one HTTP
//! connection over hyper, and TLS's ALPN choice), `streams` (HTTP/2's executor, its streams
//! counted open), `tls` (the tokio-rustls handshake under its timeout), `accept` (the
//! listeners), `peek` (reading a connection's first bytes without taking them), `replay` (a
//! generic listener's stream with its first bytes put back).

mod accept;
mod conn;
mod peek;
#[cfg(feature = "axum")]
mod replay;
mod streams;
mod task;
#[cfg(any(feature = "tls", feature = "tls-ring"))]
mod tls;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioTimer;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::handler::context::{self, ServerContext};
use crate::listener::{Bound, Native};
use crate::observe::Reason;
use crate::service::app::App;
use crate::settings::{Config, Control, Place};

use accept::{Accept, TcpAccept};
use conn::Http;
use task::{make, proxied, run_conn};
#[cfg(any(feature = "tls", feature = "tls-ring"))]
use tls::TokioTls;

/// Starts the baseline on its own runtime thread; `done` fires when it has stopped.
pub(crate) fn start<P: App>(
    cfg: &Config,
    listener: Bound,
    app: P,
    ctl: Arc<Control>,
    done: oneshot::Sender<()>,
) -> io::Result<()> {
    match &listener {
        Bound::Native(Native::Tcp(l)) => {
            l.set_nonblocking(true)?;
            let _ = socket2::SockRef::from(l).listen(cfg.backlog);
            // Before `serve` returns, as on the reactor: a client may connect at once.
            cfg.tcp_tuning.apply_listener(socket2::SockRef::from(l));
        }
        Bound::Native(Native::Unix(l)) => {
            l.set_nonblocking(true)?;
            let _ = socket2::SockRef::from(l).listen(cfg.backlog);
        }
        #[cfg(feature = "axum")]
        Bound::Generic(_) => {}
    }
    let (drain_tx, drain_rx) = watch::channel(false);
    let ctx = ServerContext {
        tcp: Arc::new(cfg.tcp.clone()),
        shutdown: Some(drain_rx),
        tasks: Arc::new(watch::Sender::new(0)),
        force: Arc::new(watch::Sender::new(false)),
        ctl: Some(ctl.clone()),
    };
    let thread_ctx = ctx.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.pollers)
        .thread_name("hop-tokio")
        .on_thread_start(move || context::set_thread_context(thread_ctx.clone()))
        .enable_all()
        .build()?;
    let header_timeout = match (cfg.header_read_timeout, cfg.idle_timeout) {
        (Some(h), Some(i)) => Some(h.min(i)),
        (h, i) => h.or(i),
    };
    let mut http1 = cfg.http1(header_timeout);
    http1.timer(TokioTimer::new());
    let http = Arc::new(Http {
        max_age: cfg.limits.max_age,
        max_requests: cfg.limits.max_requests(),
        http1,
        http2: cfg.http2.enabled.then(|| cfg.http2.clone()),
        head_limit: header_timeout,
        head_reason: match (cfg.header_read_timeout, cfg.idle_timeout) {
            (Some(h), Some(i)) if i < h => Reason::IdleTimeout,
            (None, Some(_)) => Reason::IdleTimeout,
            _ => Reason::HeaderTimeout,
        },
        close_timeout: cfg.tcp.close_timeout,
        body_timeout: cfg.request_body_timeout,
        #[cfg(any(feature = "tls", feature = "tls-ring"))]
        tls: cfg.tls.clone().map(|config| TokioTls {
            config,
            handshake_timeout: cfg.tls_handshake_timeout,
        }),
    });
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("hop-tokio-main".into())
        .spawn(move || {
            let res = rt.block_on(async move {
                // Each kind of listener gets its own accept loop (the TCP path's streams are
                // not boxed).
                match listener {
                    Bound::Native(Native::Tcp(l)) => {
                        let l = TcpAccept::new(l, &cfg)?;
                        accept_loop(cfg, l, app, ctl, http, ctx, drain_tx).await
                    }
                    Bound::Native(Native::Unix(l)) => {
                        let l = tokio::net::UnixListener::from_std(l)?;
                        accept_loop(cfg, l, app, ctl, http, ctx, drain_tx).await
                    }
                    #[cfg(feature = "axum")]
                    Bound::Generic(l) => accept_loop(cfg, l, app, ctl, http, ctx, drain_tx).await,
                }
            });
            if let Err(e) = res {
                tracing::error!(error = %e, "tokio backend failed");
            }
            rt.shutdown_background();
            let _ = done.send(());
        })?;
    Ok(())
}

async fn accept_loop<P: App, A: Accept>(
    cfg: Config,
    mut listener: A,
    mut app: P,
    ctl: Arc<Control>,
    http: Arc<Http>,
    ctx: ServerContext,
    drain_tx: watch::Sender<bool>,
) -> io::Result<()> {
    let tcp = ctx.tcp.clone();
    let drain_rx = drain_tx.subscribe();
    let shutdown = Arc::new(tokio::sync::Notify::new());
    {
        let s = shutdown.clone();
        ctl.on_shutdown(Box::new(move || s.notify_one()));
    }
    let forcing = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    // Once the shutdown is heard, what the kernel has already queued is still accepted (it
    // would be reset when the listener closes; see the README's zero-downtime restart), then
    // the loop ends.
    let mut stopping = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.notified(), if !stopping => {
                stopping = true;
                continue;
            }
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = res {
                    if e.is_panic() {
                        ctl.contained_panic("a connection task", &*e.into_panic());
                    }
                }
                continue;
            }
            accepted = listener.accept(), if !stopping => accepted,
            _ = std::future::ready(()), if stopping => match listener.accept_queued() {
                Some(accepted) => accepted,
                None => break,
            },
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(_) if stopping => break,
            Err(e) => {
                crate::logs::warn_limited!(error = %e, "accept failed; retrying in 50 ms");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !ctl.admit(cfg.max_connections) {
            continue;
        }
        // Its place in its IP's count goes with the stream, into an upgrade too. Behind the
        // PROXY protocol the client is the header's: counted once it is read (`proxied`).
        let mut ip = None;
        let max_per_ip = cfg.limits.per_ip.filter(|_| !cfg.proxy_protocol);
        if let (Some(max), Some(addr)) = (max_per_ip, A::peer_ip(&peer)) {
            match ctl.ip_place(addr, max) {
                Some(slot) => ip = Some(slot),
                None => {
                    ctl.unadmit_per_ip();
                    continue;
                }
            }
        }
        let guard = Arc::new(Place::new(ctl.clone(), forcing.clone(), ip));
        // The connection's span (feature `metrics`, debug level), entered whenever its task
        // is polled.
        #[cfg(feature = "metrics")]
        let span = crate::observe::conn_span(&peer).map_or_else(tracing::Span::none, |s| *s);
        if cfg.proxy_protocol {
            // Sets the socket's options; the app is told of the connection once its header is
            // read, on its task.
            let local = listener.incoming(&stream, &peer).local_addr();
            let (app, http, tcp, ctl) = (app.clone(), http.clone(), tcp.clone(), ctl.clone());
            let drain = drain_rx.clone();
            let per_ip = cfg.limits.per_ip;
            let task = proxied::<P, A>(
                app, stream, peer, local, http, tcp, ctl, drain, guard, per_ip,
            );
            #[cfg(feature = "metrics")]
            let task = tracing::Instrument::instrument(task, span);
            tasks.spawn(task);
            continue;
        }
        let incoming = listener.incoming(&stream, &peer);
        let Some(accepted) = make(&mut app, incoming, &peer, &guard) else {
            continue;
        };
        let (http, tcp, ctl) = (http.clone(), tcp.clone(), ctl.clone());
        let task = run_conn::<A, _>(
            accepted,
            stream,
            None,
            http,
            tcp,
            ctl,
            drain_rx.clone(),
            guard,
        );
        #[cfg(feature = "metrics")]
        let task = tracing::Instrument::instrument(task, span);
        tasks.spawn(task);
    }
    drop(listener);
    // Hijacked connections carry their place in the counts (`Place`) with their stream: they
    // count as drained or forced when they end, as any connection does.
    let mut hijacked = ctx.tasks.subscribe();
    let _ = drain_tx.send(true);
    let deadline = ctl.drain_deadline().unwrap_or_else(Instant::now);
    let drained = tokio::time::timeout_at(deadline.into(), async {
        while tasks.join_next().await.is_some() {}
        // Hijacked connections (WebSockets, read handlers) finish their close handshakes too.
        let _ = hijacked.wait_for(|n| *n == 0).await;
    })
    .await;
    if drained.is_err() {
        forcing.store(true, Ordering::Release);
        // Hijacked connections still running are cut too (see `ServerContext::force`); they
        // are waited for below, so that the counts are final when this returns.
        ctx.force.send_replace(true);
        // Cut: a read handler hears of it from its core's `Drop` (`on_close`, `Shutdown`), and
        // a panic there (or in any `Drop` the cut runs) is counted as its task's.
        tasks.abort_all();
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                if e.is_panic() {
                    ctl.contained_panic("a connection task", &*e.into_panic());
                }
            }
        }
        // They drop at their next poll; bounded, should one be stuck in a blocking `Drop`.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            hijacked.wait_for(|n| *n == 0),
        )
        .await;
    }
    Ok(())
}
