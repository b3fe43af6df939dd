//! Taking an HTTP connection over with a read handler, after the response (usually a `101`).
//!
//! Under the reactor, [`Hijack::on_read`] leaves the handler with its connection (a takeover,
//! `conn::takeover`); when hyper has written the response and handed the socket to the upgrade,
//! the driver takes the socket back (leftover bytes included, which the handler sees first) and
//! the connection stays on the loop as a read-handler connection. Elsewhere (the tokio backend,
//! or a hijack used outside its connection's drive) a tokio task awaits the upgrade and runs the
//! same handler.

use std::os::fd::AsRawFd;
use std::time::Instant;

use bytes::BytesMut;
#[cfg(feature = "axum")]
use http::request::Parts;
use http::Request;
use hyper::upgrade::OnUpgrade;

use crate::conn::current;
use crate::conn::takeover::Takeover;
use crate::handler::context::{self, ServerContext, TaskGuard};
use crate::handler::{Conn, ConnCore, Handler, Protocol, User};
use crate::limits::{OpenGuard, OpenKind};
use crate::rt::tasks;
use crate::rt::wake::{self, Key};

/// The right to take over an HTTP connection once its response is written.
///
/// ```
/// use axum::{http::StatusCode, response::IntoResponse, routing::get, Router};
/// use bytes::BytesMut;
/// use hop::tcp::{Conn, Handler};
///
/// struct Echo;
/// impl Handler for Echo {
///     fn on_read(&mut self, conn: &mut Conn, input: &mut BytesMut) -> std::io::Result<()> {
///         Ok(conn.write(&input.split())?)
///     }
/// }
///
/// async fn upgrade(hijack: hop::Hijack) -> impl IntoResponse {
///     hijack.on_read(Echo);
///     (StatusCode::SWITCHING_PROTOCOLS, [("connection", "upgrade"), ("upgrade", "echo")])
/// }
///
/// let app: Router = Router::new().route("/echo", get(upgrade));
/// # let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// # let addr = listener.local_addr()?;
/// # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// # let client = std::thread::spawn(move || {
/// #     let _stop = stop; // the server stops when this thread ends, a panic included
/// #     use std::io::{Read, Write};
/// #     let mut s = std::net::TcpStream::connect(addr).unwrap();
/// #     s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
/// #     let request = "GET /echo HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\n";
/// #     write!(s, "{request}upgrade: echo\r\n\r\n").unwrap();
/// #     let mut head = Vec::new();
/// #     while !head.ends_with(b"\r\n\r\n") {
/// #         let mut byte = [0; 1];
/// #         s.read_exact(&mut byte).unwrap();
/// #         head.push(byte[0]);
/// #     }
/// #     // The connection is the handler's now: bytes come back as they were sent.
/// #     s.write_all(b"ping").unwrap();
/// #     let mut echo = [0; 4];
/// #     s.read_exact(&mut echo).unwrap();
/// #     (String::from_utf8(head).unwrap(), echo)
/// # });
/// # hop::serve(listener, app).with_graceful_shutdown(async { let _ = stopped.await; }).run()?;
/// # let (head, echo) = client.join().unwrap();
/// # assert!(head.starts_with("HTTP/1.1 101"), "{head}");
/// # assert_eq!(&echo, b"ping");
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Hijack {
    on_upgrade: OnUpgrade,
    key: Option<Key>,
    ctx: ServerContext,
    /// What the connection counts as once taken over (`Stats`, the drain log).
    kind: OpenKind,
}

/// Why [`Hijack`] could not be extracted.
#[derive(Debug, Clone, Copy)]
pub struct HijackRejection;

impl std::fmt::Display for HijackRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this request cannot be upgraded (no upgrade support, or already taken)")
    }
}

impl std::error::Error for HijackRejection {}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for HijackRejection {
    fn into_response(self) -> axum::response::Response {
        (http::StatusCode::UPGRADE_REQUIRED, self.to_string()).into_response()
    }
}

impl Hijack {
    /// Takes the upgrade from a request (`None` if hyper offered none, or it was taken).
    pub fn from_request<B>(req: &mut Request<B>) -> Option<Hijack> {
        let ws = asks_websocket(req.headers());
        Self::from_extensions(req.extensions_mut(), ws)
    }

    fn from_extensions(ext: &mut http::Extensions, websocket: bool) -> Option<Hijack> {
        let hijack = ext.remove::<OnUpgrade>().map(Hijack::from_on_upgrade)?;
        Some(match websocket {
            true => hijack.websocket(),
            false => hijack,
        })
    }

    pub(crate) fn from_on_upgrade(on_upgrade: OnUpgrade) -> Hijack {
        Hijack {
            on_upgrade,
            key: current::key(),
            ctx: context::thread_context(),
            kind: OpenKind::Tcp,
        }
    }

    /// Counts the connection as a WebSocket once taken over (`hop::ws`'s).
    pub(crate) fn websocket(mut self) -> Hijack {
        self.kind = OpenKind::WebSocket;
        self
    }

    /// Hands the connection to `handler` once the response is written. The response must be a
    /// `101 Switching Protocols` (HTTP/1.1), or a `2xx` to an extended CONNECT (HTTP/2, RFC 8441:
    /// the handler then gets the stream), for the connection to be handed over.
    pub fn on_read<H: Handler>(self, handler: H) {
        self.take_over(Box::new(User(handler)));
    }

    /// [`on_read`](Self::on_read) for one of hop's own protocols (`hop::ws`).
    pub(crate) fn take_over(self, handler: Box<dyn Protocol>) {
        // Within its connection's drive, the connection takes the handler over.
        let kind = self.kind;
        let mut takeover = Takeover::after_upgrade(handler, self.on_upgrade, kind);
        if let Some(key) = self.key {
            match current::set_takeover(key, takeover) {
                Ok(()) => return,
                Err(t) => takeover = t,
            }
        }
        let (handler, on_upgrade) = takeover.into_upgrade();
        let ServerContext {
            tcp: cfg,
            shutdown,
            tasks,
            force,
            ctl,
        } = self.ctx;
        let open = ctl.map(|ctl| ctl.open.clone());
        let guard = TaskGuard::new(tasks);
        let task = async move {
            let _guard = guard;
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "hijack: the connection was not upgraded");
                    return;
                }
            };
            let (_tx, never) = tokio::sync::watch::channel(false);
            let rx = shutdown.unwrap_or(never);
            let now = Instant::now();
            type TokioTcp = hyper_util::rt::TokioIo<crate::service::BodyIo<tokio::net::TcpStream>>;
            match upgraded.downcast::<TokioTcp>() {
                Ok(parts) => {
                    // The connection's place in the server's counts goes on with the stream.
                    let (stream, _place) = parts.io.into_inner().into_parts();
                    let conn = Conn::taken_over(Some(stream.as_raw_fd()), &cfg);
                    let input = BytesMut::from(&parts.read_buf[..]);
                    let mut core = ConnCore::new(handler, conn, input, cfg, now);
                    core.open = open.map(|o| OpenGuard::new(o, kind));
                    crate::handler::run_task(core, crate::observe::count_io(stream), rx).await;
                }
                Err(upgraded) => {
                    let conn = Conn::taken_over(None, &cfg);
                    let mut core = ConnCore::new(handler, conn, BytesMut::new(), cfg, now);
                    core.open = open.map(|o| OpenGuard::new(o, kind));
                    crate::handler::run_task(core, hyper_util::rt::TokioIo::new(upgraded), rx)
                        .await;
                }
            }
        };
        // On its connection's poller, the handler runs as a local task that belongs to the
        // connection; anywhere else, as a tokio task.
        if let Some(key) = self.key {
            if wake::current_poller() == Some(key.poller()) {
                if let Err(task) = tasks::spawn_local(task, Some(key)) {
                    tokio::spawn(cut_when_forced(task, force.subscribe()));
                }
                return;
            }
        }
        tokio::spawn(cut_when_forced(task, force.subscribe()));
    }
}

/// `task` (a hijacked connection running as a tokio task), dropped when `force` turns `true`:
/// the tokio backend's drain timeout ran out (see `ServerContext::force`). Dropping it tells
/// its handler (`on_close`) and gives the connection's place back, counted as forced.
async fn cut_when_forced(
    task: impl std::future::Future<Output = ()>,
    mut force: tokio::sync::watch::Receiver<bool>,
) {
    let forced = async {
        if force.wait_for(|f| *f).await.is_err() {
            // No server to force it: it runs to its end.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = task => {}
        () = forced => {}
    }
}

/// Whether a request asks for a WebSocket (`Upgrade: websocket`, HTTP/1.1).
fn asks_websocket(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Hijack {
    type Rejection = HijackRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let ws = asks_websocket(&parts.headers);
        Hijack::from_extensions(&mut parts.extensions, ws).ok_or(HijackRejection)
    }
}
