//! TLS with rustls (features `tls` and `tls-ring`, off by default).
//!
//! This module owns what TLS adds to hop's API: [`RustlsConfig`], the reloadable server
//! configuration that [`Builder::tls`](crate::Builder::tls) takes (built from PEM files, or
//! wrapping a `rustls::ServerConfig` of your own), the ALPN protocols hop offers (`h2`, when
//! HTTP/2 is on, and `http/1.1`), the crypto provider it builds configurations with, and
//! [`TlsInfo`], the request extension that tells a handler about its connection's TLS session
//! (SNI name, negotiated ALPN protocol, client certificates). The handshake itself, under
//! [`Builder::tls_handshake_timeout`](crate::Builder::tls_handshake_timeout), is the serving
//! backend's business: the reactor serves TLS in place, in its socket type (`conn::tls`), the
//! tokio backend on tokio tasks with tokio-rustls, behind the same API.
//!
//! ```
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
//! # let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
//! #   let dir = std::env::temp_dir().join(format!("hop-doc-tls-{}", std::process::id()));
//! #   std::fs::create_dir_all(&dir)?;
//! #   std::env::set_current_dir(&dir)?;
//! #   let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
//! #   std::fs::write("cert.pem", made.cert.pem())?;
//! #   std::fs::write("key.pem", made.signing_key.serialize_pem())?;
//! #   let der = made.cert.der().clone();
//! let config = hop::tls::RustlsConfig::from_pem_file("cert.pem", "key.pem").await?;
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! let serve = hop::Server::builder().tls(config.clone()).serve(listener, app);
//! # let (addr, handle) = (serve.local_addr()?, serve.handle());
//! #   let client = std::thread::spawn(move || {
//! #       use std::io::{Read, Write};
//! #       let mut roots = rustls::RootCertStore::empty();
//! #       roots.add(der).unwrap();
//! #       let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
//! #       let cfg = rustls::ClientConfig::builder_with_provider(provider)
//! #           .with_safe_default_protocol_versions().unwrap()
//! #           .with_root_certificates(roots)
//! #           .with_no_client_auth();
//! #       let name = "localhost".try_into().unwrap();
//! #       let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
//! #       let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
//! #       let req = "GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
//! #       tls.write_all(req.as_bytes()).unwrap();
//! #       let mut answer = Vec::new();
//! #       let _ = tls.read_to_end(&mut answer); // the server may close without close_notify
//! #       handle.shutdown();
//! #       String::from_utf8(answer).unwrap()
//! #   });
//! serve.await?;
//! # let answer = client.join().unwrap();
//! # assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
//! // Elsewhere, later: new connections get the new certificate, open ones keep theirs.
//! config.reload_from_pem_file("cert.pem", "key.pem").await?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use http::Request;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// The ALPN protocol id of HTTP/2.
pub(crate) const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol id of HTTP/1.1.
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A reloadable rustls server configuration: a cheap `Clone` handle (an `Arc`) on the current
/// `Arc<rustls::ServerConfig>`. Every clone sees a reload; a reload applies to handshakes that
/// start after it, while open connections keep the configuration they were made with.
///
/// Made like axum-server's `RustlsConfig` ([`from_pem_file`](Self::from_pem_file) is `async`
/// there and here), so the swap from `axum_server::bind_rustls` is one line.
///
/// ALPN: configurations hop builds offer `h2` and `http/1.1`; a configuration of your own
/// with no ALPN protocols gets the same (on a copy); one with its own list keeps it. When
/// HTTP/2 is off ([`Builder::http2(false)`](crate::Builder::http2)), `h2` is left out of what
/// the server offers.
#[derive(Clone)]
pub struct RustlsConfig {
    inner: Arc<RwLock<Configs>>,
}

/// The current configuration, and the same without `h2` (for servers with HTTP/2 off).
struct Configs {
    full: Arc<ServerConfig>,
    http1_only: Arc<ServerConfig>,
}

impl Configs {
    fn new(config: Arc<ServerConfig>) -> Configs {
        let config = if config.alpn_protocols.is_empty() {
            let mut c = (*config).clone();
            c.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
            Arc::new(c)
        } else {
            config
        };
        let http1_only = if config.alpn_protocols.iter().any(|p| p == ALPN_H2) {
            let mut c = (*config).clone();
            c.alpn_protocols.retain(|p| p != ALPN_H2);
            Arc::new(c)
        } else {
            config.clone()
        };
        Configs {
            full: config,
            http1_only,
        }
    }
}

impl std::fmt::Debug for RustlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RustlsConfig")
            .field("alpn_protocols", &self.get_inner().alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl RustlsConfig {
    /// From a PEM certificate chain file (leaf first) and a PEM private key file (PKCS#8,
    /// PKCS#1 or SEC1). `async` as axum-server's is; the files are read on a blocking thread
    /// when called inside a tokio runtime.
    pub async fn from_pem_file(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> io::Result<RustlsConfig> {
        let (cert, key) = read_pem_files(cert.as_ref(), key.as_ref()).await?;
        Self::from_pem(&cert, &key)
    }

    /// From a PEM certificate chain (leaf first) and a PEM private key, in memory.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> io::Result<RustlsConfig> {
        Ok(Self::from_config(Arc::new(config_from_pem(cert, key)?)))
    }

    /// Wraps a configuration of your own (client authentication, a certificate resolver for
    /// SNI, session resumption...). If its `alpn_protocols` is empty, hop uses a copy that
    /// offers `h2` and `http/1.1`.
    pub fn from_config(config: Arc<ServerConfig>) -> RustlsConfig {
        RustlsConfig {
            inner: Arc::new(RwLock::new(Configs::new(config))),
        }
    }

    /// The configuration new handshakes use now (with hop's ALPN protocols, if it had none).
    pub fn get_inner(&self) -> Arc<ServerConfig> {
        self.read().full.clone()
    }

    /// Replaces the configuration for handshakes that start from now on.
    pub fn reload_from_config(&self, config: Arc<ServerConfig>) {
        let configs = Configs::new(config);
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = configs;
    }

    /// Replaces the certificate and key with PEM ones in memory; on error the configuration
    /// in use stays.
    pub fn reload_from_pem(&self, cert: &[u8], key: &[u8]) -> io::Result<()> {
        self.reload_from_config(Arc::new(config_from_pem(cert, key)?));
        Ok(())
    }

    /// Replaces the certificate and key with PEM files' (see
    /// [`from_pem_file`](Self::from_pem_file)); on error the configuration in use stays.
    pub async fn reload_from_pem_file(
        &self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> io::Result<()> {
        let (cert, key) = read_pem_files(cert.as_ref(), key.as_ref()).await?;
        self.reload_from_pem(&cert, &key)
    }

    /// What a new handshake uses: without `h2` when HTTP/2 is off.
    pub(crate) fn current(&self, http2: bool) -> Arc<ServerConfig> {
        let c = self.read();
        if http2 {
            c.full.clone()
        } else {
            c.http1_only.clone()
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Configs> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl From<Arc<ServerConfig>> for RustlsConfig {
    fn from(config: Arc<ServerConfig>) -> Self {
        RustlsConfig::from_config(config)
    }
}

impl From<ServerConfig> for RustlsConfig {
    fn from(config: ServerConfig) -> Self {
        RustlsConfig::from_config(Arc::new(config))
    }
}

async fn read_pem_files(cert: &Path, key: &Path) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let (cert, key) = (cert.to_owned(), key.to_owned());
    let read = move || -> io::Result<(Vec<u8>, Vec<u8>)> {
        let c = std::fs::read(&cert)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cert.display())))?;
        let k = std::fs::read(&key)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", key.display())))?;
        Ok((c, k))
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h
            .spawn_blocking(read)
            .await
            .map_err(|e| io::Error::other(format!("reading PEM files: {e}")))?,
        Err(_) => read(),
    }
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A server configuration for one certificate chain, hop's crypto provider, the safe default
/// protocol versions, no client authentication, and ALPN `h2`, `http/1.1`.
fn config_from_pem(cert: &[u8], key: &[u8]) -> io::Result<ServerConfig> {
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("certificate PEM: no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid(format!("key PEM: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider()?)
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(invalid)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// The crypto provider hop builds configurations with: the process default if one was
/// installed (`CryptoProvider::install_default`), else ring with feature `tls-ring`, else
/// aws-lc-rs (feature `tls`).
pub(crate) fn provider() -> io::Result<Arc<CryptoProvider>> {
    if let Some(p) = CryptoProvider::get_default() {
        return Ok(p.clone());
    }
    #[cfg(feature = "tls-ring")]
    return Ok(Arc::new(rustls::crypto::ring::default_provider()));
    #[cfg(all(feature = "tls", not(feature = "tls-ring")))]
    return Ok(Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    #[allow(unreachable_code)]
    Err(io::Error::other("no rustls crypto provider"))
}

/// What a request's connection negotiated in its TLS handshake: a request extension in every
/// request of a TLS connection (absent over plaintext), on both backends.
///
/// ```
/// use axum::Extension;
///
/// async fn who(Extension(tls): Extension<hop::tls::TlsInfo>) -> String {
///     format!("SNI {:?}, client certificates: {}", tls.server_name(),
///         tls.peer_certificates().map_or(0, |c| c.len()))
/// }
/// # #[tokio::main]
/// # async fn main() -> std::io::Result<()> {
/// # let app = axum::Router::new().route("/who", axum::routing::get(who));
/// #   let dir = std::env::temp_dir().join(format!("hop-doc-tls-{}", std::process::id()));
/// #   std::fs::create_dir_all(&dir)?;
/// #   std::env::set_current_dir(&dir)?;
/// #   let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
/// #   std::fs::write("cert.pem", made.cert.pem())?;
/// #   std::fs::write("key.pem", made.signing_key.serialize_pem())?;
/// #   let der = made.cert.der().clone();
/// # let config = hop::tls::RustlsConfig::from_pem_file("cert.pem", "key.pem").await?;
/// # let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
/// # let serve = hop::Server::builder().tls(config).serve(listener, app);
/// # let (addr, handle) = (serve.local_addr()?, serve.handle());
/// #   let client = std::thread::spawn(move || {
/// #       use std::io::{Read, Write};
/// #       let mut roots = rustls::RootCertStore::empty();
/// #       roots.add(der).unwrap();
/// #       let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
/// #       let cfg = rustls::ClientConfig::builder_with_provider(provider)
/// #           .with_safe_default_protocol_versions().unwrap()
/// #           .with_root_certificates(roots)
/// #           .with_no_client_auth();
/// #       let name = "localhost".try_into().unwrap();
/// #       let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
/// #       let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
/// #       let req = "GET /who HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
/// #       tls.write_all(req.as_bytes()).unwrap();
/// #       let mut answer = Vec::new();
/// #       let _ = tls.read_to_end(&mut answer); // the server may close without close_notify
/// #       handle.shutdown();
/// #       String::from_utf8(answer).unwrap()
/// #   });
/// # serve.await?;
/// # let answer = client.join().unwrap();
/// # assert!(answer.ends_with("SNI Some(\"localhost\"), client certificates: 0"), "{answer}");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
///
/// Or, without axum: `request.extensions().get::<hop::tls::TlsInfo>()`. Cloning it is cheap
/// (an `Arc`).
#[derive(Clone)]
pub struct TlsInfo(Arc<Info>);

struct Info {
    server_name: Option<String>,
    alpn_protocol: Option<Vec<u8>>,
    peer_certificates: Option<Vec<CertificateDer<'static>>>,
    protocol_version: Option<rustls::ProtocolVersion>,
    cipher_suite: Option<rustls::SupportedCipherSuite>,
}

impl TlsInfo {
    /// What `conn` negotiated (called once its handshake is done), with the SNI name the
    /// client sent.
    pub(crate) fn new(server_name: Option<&str>, conn: &rustls::CommonState) -> TlsInfo {
        TlsInfo(Arc::new(Info {
            server_name: server_name.map(str::to_owned),
            alpn_protocol: conn.alpn_protocol().map(<[u8]>::to_vec),
            peer_certificates: conn.peer_certificates().map(<[_]>::to_vec),
            protocol_version: conn.protocol_version(),
            cipher_suite: conn.negotiated_cipher_suite(),
        }))
    }

    /// The server name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.0.server_name.as_deref()
    }

    /// The ALPN protocol agreed on (`b"h2"` or `b"http/1.1"`), if the client offered ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.0.alpn_protocol.as_deref()
    }

    /// The client's certificate chain, leaf first, when the server configuration asks for
    /// client certificates (mTLS, a `ServerConfig` with a client verifier) and the client sent
    /// them.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.0.peer_certificates.as_deref()
    }

    /// The TLS version agreed on.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.0.protocol_version
    }

    /// The cipher suite agreed on.
    pub fn cipher_suite(&self) -> Option<rustls::SupportedCipherSuite> {
        self.0.cipher_suite
    }
}

impl std::fmt::Debug for TlsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsInfo")
            .field("server_name", &self.0.server_name)
            .field(
                "alpn_protocol",
                &self.0.alpn_protocol.as_deref().map(String::from_utf8_lossy),
            )
            .field(
                "peer_certificates",
                &self.0.peer_certificates.as_ref().map(Vec::len),
            )
            .field("protocol_version", &self.0.protocol_version)
            .field("cipher_suite", &self.0.cipher_suite.map(|s| s.suite()))
            .finish()
    }
}

/// A connection's service with its [`TlsInfo`] put into every request.
#[derive(Clone)]
pub(crate) struct WithTlsInfo<S> {
    inner: S,
    info: TlsInfo,
}

impl<S> WithTlsInfo<S> {
    pub(crate) fn new(inner: S, info: TlsInfo) -> Self {
        WithTlsInfo { inner, info }
    }
}

impl<S, B> tower_service::Service<Request<B>> for WithTlsInfo<S>
where
    S: tower_service::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.info.clone());
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_is_set_on_a_config_without_it_and_h2_left_out_when_http2_is_off() {
        let mut c = ServerConfig::builder_with_provider(provider().unwrap())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        let cfg = RustlsConfig::from_config(Arc::new(c.clone()));
        assert_eq!(
            cfg.get_inner().alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(
            cfg.current(false).alpn_protocols,
            vec![b"http/1.1".to_vec()]
        );
        // A list of the user's own is kept.
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = RustlsConfig::from(c);
        assert_eq!(cfg.current(true).alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn bad_pem_is_an_error() {
        assert!(RustlsConfig::from_pem(b"nope", b"nope").is_err());
    }
}
