//! Files with zero copy: tower-http's [`ServeDir`](tower_http::services::ServeDir) and
//! [`ServeFile`](tower_http::services::ServeFile), unchanged in what they answer, whose bodies
//! the reactor sends with `sendfile(2)` over plain HTTP/1.1.
//!
//! tower-http decides everything a peer sees: the status, every header (content type, length,
//! `Last-Modified`, ranges and `Content-Range`, conditional requests, redirects, 404s and the
//! fallback, precompressed variants) and, wherever hop cannot send the file itself, the body.
//! This module only swaps the body of a `200` or a `206` to a `GET` on a plain HTTP/1.1
//! connection of the reactor: it opens the file the request names again (by tower-http's rules
//! for a path: percent-decoded, only normal components, `index.html` in a directory), checks
//! that it is the one tower-http answered for (a regular file of the length and modification
//! time the headers give), and hands it to the connection once hyper has written the head. The
//! connection then sends the body from the page cache to the socket (`crate::conn`'s
//! `Sending` state), and goes on with the next request. Everything else (TLS, HTTP/2, the
//! tokio backend, `HEAD`, a precompressed variant, a file that does not check out) keeps
//! tower-http's body, read into buffers as usual.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tower_http::services::fs::{DefaultServeDirFallback, ServeFileSystemResponseBody};
use tower_service::Service;

use crate::conn::current::{self, FileSend};
use crate::rt::wake::Key;

/// tower-http's body for what it serves.
type TowerBody = ServeFileSystemResponseBody;

/// The future of [`ServeDir`] and [`ServeFile`].
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<FileBody>, Infallible>> + Send + 'static>>;

/// tower-http's `ServeDir`, with zero-copy bodies on the reactor (see the [module](self)).
///
/// A one-line swap:
///
/// ```
/// use axum::Router;
/// let app: Router = Router::new()
///     // was: .nest_service("/assets", tower_http::services::ServeDir::new("assets"))
///     .nest_service("/assets", hop::fs::ServeDir::new("assets"));
/// # // The test: `assets/hello.txt` in a directory of its own, fetched from a real server.
/// # let dir = std::env::temp_dir().join(format!("hop-doctest-fs-{}", std::process::id()));
/// # std::fs::create_dir_all(dir.join("assets"))?;
/// # std::fs::write(dir.join("assets/hello.txt"), "hello from a file")?;
/// # std::env::set_current_dir(&dir)?;
/// # let serve = hop::serve(std::net::TcpListener::bind("127.0.0.1:0")?, app);
/// # let (addr, handle) = (serve.local_addr()?, serve.handle());
/// # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// # let client = std::thread::spawn(move || {
/// #     let _stop = stop; // the server stops when this thread ends, a panic included
/// #     use std::io::{Read, Write};
/// #     let mut s = std::net::TcpStream::connect(addr).unwrap();
/// #     s.write_all(b"GET /assets/hello.txt HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
/// #         .unwrap();
/// #     let mut answer = String::new();
/// #     s.read_to_string(&mut answer).unwrap();
/// #     answer
/// # });
/// # serve.with_graceful_shutdown(async { let _ = stopped.await; }).run()?;
/// # let answer = client.join().unwrap();
/// # std::fs::remove_dir_all(&dir)?;
/// # assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
/// # assert!(answer.ends_with("\r\n\r\nhello from a file"), "{answer}");
/// # if hop::Backend::from_env() != Some(hop::Backend::Tokio) {
/// #     assert_eq!(handle.stats().files_sent, 1); // the reactor sent it with sendfile(2)
/// # }
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// tower-http's own settings are reached with [`map`](Self::map).
#[derive(Clone, Debug)]
pub struct ServeDir<F = DefaultServeDirFallback> {
    inner: tower_http::services::ServeDir<F>,
    base: PathBuf,
}

impl ServeDir {
    /// Serves the files under `path`, as `tower_http::services::ServeDir::new(path)` does.
    pub fn new(path: impl AsRef<Path>) -> Self {
        ServeDir {
            inner: tower_http::services::ServeDir::new(path.as_ref()),
            base: path.as_ref().to_owned(),
        }
    }
}

impl<F> ServeDir<F> {
    /// Changes tower-http's `ServeDir` (its fallback, precompressed variants, index files...):
    /// `hop::fs::ServeDir::new("assets").map(|s| s.precompressed_gzip())`.
    pub fn map<G>(
        self,
        f: impl FnOnce(tower_http::services::ServeDir<F>) -> tower_http::services::ServeDir<G>,
    ) -> ServeDir<G> {
        ServeDir {
            inner: f(self.inner),
            base: self.base,
        }
    }
}

impl<ReqBody, F, FResBody> Service<Request<ReqBody>> for ServeDir<F>
where
    F: Service<Request<ReqBody>, Response = Response<FResBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    F::Future: Send + 'static,
    FResBody: Body<Data = Bytes> + Send + 'static,
    FResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ReqBody: Send + 'static,
{
    type Response = Response<FileBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> ResponseFuture {
        let plan = Plan::new(&req, || path_in(&self.base, req.uri().path()));
        respond(self.inner.call(req), plan)
    }
}

/// tower-http's `ServeFile`, with zero-copy bodies on the reactor (see the [module](self)).
#[derive(Clone, Debug)]
pub struct ServeFile {
    inner: tower_http::services::ServeFile,
    path: PathBuf,
}

impl ServeFile {
    /// Serves the file at `path`, as `tower_http::services::ServeFile::new(path)` does.
    pub fn new(path: impl AsRef<Path>) -> Self {
        ServeFile {
            inner: tower_http::services::ServeFile::new(path.as_ref()),
            path: path.as_ref().to_owned(),
        }
    }

    /// Serves the file at `path` with this content type, as
    /// `tower_http::services::ServeFile::new_with_mime` does.
    pub fn new_with_mime(path: impl AsRef<Path>, mime: &mime::Mime) -> Self {
        ServeFile {
            inner: tower_http::services::ServeFile::new_with_mime(path.as_ref(), mime),
            path: path.as_ref().to_owned(),
        }
    }
}

impl<ReqBody> Service<Request<ReqBody>> for ServeFile
where
    ReqBody: Send + 'static,
{
    type Response = Response<FileBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request<ReqBody>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> ResponseFuture {
        let plan = Plan::new(&req, || Some(self.path.clone()));
        respond(self.inner.call(req), plan)
    }
}

/// What a request may get: its body sent by the connection `key` from the file at `path`.
struct Plan {
    key: Key,
    path: PathBuf,
    keep_alive: bool,
}

impl Plan {
    /// `None` unless the request is a `GET` on a connection that can send a file itself.
    fn new<B>(req: &Request<B>, path: impl FnOnce() -> Option<PathBuf>) -> Option<Plan> {
        if req.method() != Method::GET {
            return None;
        }
        let key = current::zero_copy_key()?;
        Some(Plan {
            key,
            path: path()?,
            keep_alive: keep_alive(req.version(), req.headers()),
        })
    }
}

/// Whether hyper keeps the connection open after answering a request of this version with
/// these headers.
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        Version::HTTP_11 => !has("close"),
        Version::HTTP_10 => has("keep-alive"),
        _ => false,
    }
}

/// The file a request path names under `base`, by tower-http's rules (`None` where it would
/// refuse the path).
fn path_in(base: &Path, requested: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode(requested.trim_start_matches('/').as_bytes())
        .decode_utf8()
        .ok()?;
    let mut path = base.to_path_buf();
    for component in Path::new(&*decoded).components() {
        match component {
            Component::Normal(part) => {
                if !Path::new(part)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
                {
                    return None;
                }
                path.push(part);
            }
            Component::CurDir => {}
            Component::Prefix(_) | Component::RootDir | Component::ParentDir => return None,
        }
    }
    Some(path)
}

fn respond<Fut>(answer: Fut, plan: Option<Plan>) -> ResponseFuture
where
    Fut: Future<Output = Result<Response<TowerBody>, Infallible>> + Send + 'static,
{
    Box::pin(async move {
        let res = answer.await?;
        Ok(match plan {
            Some(plan) => zero_copy(res, plan).await,
            None => res.map(FileBody::tower),
        })
    })
}

/// tower-http's response, its body swapped for the file if the file checks out.
async fn zero_copy(res: Response<TowerBody>, plan: Plan) -> Response<FileBody> {
    let (parts, body) = res.into_parts();
    let checked = checked_file(parts.status, &parts.headers, &plan.path).await;
    let res = Response::from_parts(parts, body);
    match checked {
        Some((file, offset, len)) => res.map(|fallback| FileBody {
            len,
            inner: Inner::File {
                send: Some(FileSend {
                    file,
                    offset,
                    len,
                    keep_alive: plan.keep_alive,
                }),
                key: plan.key,
                fallback,
            },
        }),
        None => res.map(FileBody::tower),
    }
}

/// The file behind a `200` or `206` that tower-http answered, with where the body starts and
/// its length; `None` for any other response, or a file that is not the one the headers
/// describe.
async fn checked_file(
    status: StatusCode,
    headers: &HeaderMap,
    path: &Path,
) -> Option<(std::fs::File, u64, u64)> {
    if headers.contains_key(header::CONTENT_ENCODING) {
        // A precompressed variant: another file.
        return None;
    }
    let len: u64 = headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let (offset, total) = match status {
        StatusCode::OK => (0, len),
        StatusCode::PARTIAL_CONTENT => {
            let (first, last, total) = content_range(headers.get(header::CONTENT_RANGE)?)?;
            if last.checked_sub(first)?.checked_add(1)? != len {
                return None;
            }
            (first, total)
        }
        _ => return None,
    };
    if len == 0 {
        return None;
    }
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let mut meta = file.metadata().await.ok()?;
    if meta.is_dir() {
        file = tokio::fs::File::open(path.join("index.html")).await.ok()?;
        meta = file.metadata().await.ok()?;
    }
    if !meta.is_file() || meta.len() != total {
        return None;
    }
    if let Some(said) = headers.get(header::LAST_MODIFIED) {
        let modified = httpdate::fmt_http_date(meta.modified().ok()?);
        if said.as_bytes() != modified.as_bytes() {
            return None;
        }
    }
    Some((file.into_std().await, offset, len))
}

/// `bytes first-last/total`.
fn content_range(v: &http::HeaderValue) -> Option<(u64, u64, u64)> {
    let range = v.to_str().ok()?.strip_prefix("bytes ")?;
    let (span, total) = range.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?, total.parse().ok()?))
}

/// The body of [`ServeDir`]'s and [`ServeFile`]'s responses: tower-http's, or a file that the
/// connection sends itself.
pub struct FileBody {
    /// The body's length when it is a file.
    len: u64,
    inner: Inner,
}

enum Inner {
    Tower(TowerBody),
    /// Handed to the connection at the first poll, when hyper has written the head; tower-http's
    /// body if that cannot be done.
    File {
        send: Option<FileSend>,
        key: Key,
        fallback: TowerBody,
    },
    /// The connection sends it: hyper is let go before it polls again.
    Handed,
}

impl FileBody {
    fn tower(body: TowerBody) -> Self {
        FileBody {
            len: 0,
            inner: Inner::Tower(body),
        }
    }
}

impl std::fmt::Debug for FileBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            Inner::Tower(_) => "FileBody::Tower",
            Inner::File { .. } | Inner::Handed => "FileBody::File",
        })
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            match &mut self.inner {
                Inner::Tower(body) => return Pin::new(body).poll_frame(cx),
                Inner::Handed => return Poll::Pending,
                Inner::File { send, key, .. } => {
                    // hyper has written the head and asks for the body: the connection being
                    // driven takes the file, and lets hyper go once this poll returns.
                    let handed = current::with(*key, |c| {
                        if c.file.is_none() && c.zero_copy {
                            c.file = send.take();
                        }
                        send.is_none()
                    });
                    if handed == Some(true) {
                        self.inner = Inner::Handed;
                        return Poll::Pending;
                    }
                    let Inner::File { fallback, .. } =
                        std::mem::replace(&mut self.inner, Inner::Handed)
                    else {
                        unreachable!()
                    };
                    self.inner = Inner::Tower(fallback);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Tower(body) => body.is_end_stream(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Tower(body) => body.size_hint(),
            _ => SizeHint::with_exact(self.len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_tower_https_rules() {
        let base = Path::new("/srv");
        assert_eq!(
            path_in(base, "/a/b.txt"),
            Some(PathBuf::from("/srv/a/b.txt"))
        );
        assert_eq!(
            path_in(base, "/a/./b%20c"),
            Some(PathBuf::from("/srv/a/b c"))
        );
        assert_eq!(path_in(base, "/"), Some(PathBuf::from("/srv")));
        assert_eq!(path_in(base, "/../etc/passwd"), None);
        assert_eq!(path_in(base, "/a/%2e%2e/%2e%2e/etc"), None);
        assert_eq!(path_in(base, "/%2fetc"), None);
        assert_eq!(path_in(base, "/%ff"), None);
    }

    #[test]
    fn keep_alive_as_hyper_decides_it() {
        let mut h = HeaderMap::new();
        assert!(keep_alive(Version::HTTP_11, &h));
        assert!(!keep_alive(Version::HTTP_10, &h));
        h.insert(header::CONNECTION, "Keep-Alive".parse().unwrap());
        assert!(keep_alive(Version::HTTP_10, &h));
        h.insert(header::CONNECTION, "foo, close".parse().unwrap());
        assert!(!keep_alive(Version::HTTP_11, &h));
    }

    #[test]
    fn content_ranges_parse() {
        let v = http::HeaderValue::from_static("bytes 10-19/100");
        assert_eq!(content_range(&v), Some((10, 19, 100)));
        let v = http::HeaderValue::from_static("bytes */100");
        assert_eq!(content_range(&v), None);
    }
}
