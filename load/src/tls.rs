//! The TLS client of `churn --tls` and `idle --kind https`: rustls on aws-lc-rs (the crypto
//! provider of hop's default `tls` feature and of axum-server's `tls-rustls`), TLS 1.3 only,
//! ALPN `http/1.1` (the requests are HTTP/1.1 written by hand), and no session resumption, so
//! every connection is a full handshake.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A TLS client configuration: the trusted root and the name the server's certificate must
/// carry (also sent as SNI).
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Trusts the PEM certificates in `ca` (the server's own self-signed certificate will do)
    /// and expects `name` in the server's certificate.
    pub fn from_ca_file(ca: &Path, name: &str) -> Result<TlsClient, String> {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        TlsClient::from_ca_pem(&pem, name)
    }

    /// As [`from_ca_file`](Self::from_ca_file), from the PEM text.
    pub fn from_ca_pem(pem: &[u8], name: &str) -> Result<TlsClient, String> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("CA certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no certificate in the CA file".into());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every connection a full handshake: no tickets, no session IDs.
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| format!("bad server name {name:?}: {e}"))?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }

    /// The TLS handshake over `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }
}
