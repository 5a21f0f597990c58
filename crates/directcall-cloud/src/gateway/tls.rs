//! TLS for the gateway's listener ([`ServerTls`]), with rustls and the
//! ring provider.

use std::sync::Arc;

/// TLS for the gateway's listener: its certificate chain and key (PEM),
/// and, to require client certificates, the CA they must chain to.
///
/// Clones share one configuration, which [`replace`](Self::replace)
/// changes for every connection accepted after (a renewed certificate),
/// while the server runs.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate chain does not parse, or holds no certificate.
    #[error("certificate: {0}")]
    Certificate(#[source] PemError),
    /// The private key does not parse.
    #[error("key: {0}")]
    Key(#[source] PemError),
    /// The client CA does not parse, or cannot verify clients.
    #[error("client CA: {0}")]
    ClientCa(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The certificate and key do not make a server configuration
    /// (a key that is not the certificate's, say).
    #[error("certificate and key: {0}")]
    Config(#[source] rustls::Error),
}

/// What is wrong with PEM text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// It does not parse.
    #[error(transparent)]
    Parse(#[from] rustls::pki_types::pem::Error),
    /// It holds no item of the kind needed.
    #[error("no PEM certificate found")]
    Empty,
}

impl ServerTls {
    /// From PEM: the certificate chain, its key, and optionally the CA that
    /// client certificates must chain to (then every client must show one).
    ///
    /// # Errors
    /// [`TlsError`] saying which part is wrong.
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Certificate(e.into()))?;
        if certs.is_empty() {
            return Err(TlsError::Certificate(PemError::Empty));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Key(e.into()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = match client_ca {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(pem) {
                    let c = c.map_err(|e| TlsError::ClientCa(Box::new(e)))?;
                    roots.add(c).map_err(|e| TlsError::ClientCa(Box::new(e)))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| TlsError::ClientCa(Box::new(e)))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(std::sync::RwLock::new(Arc::new(config))),
        })
    }

    /// Takes `new`'s certificate, key and client CA for the connections
    /// accepted from now on (and for every clone of this one); the
    /// connections open keep theirs.
    ///
    /// ```no_run
    /// # fn run(tls: directcall_cloud::gateway::ServerTls) -> Result<(), Box<dyn std::error::Error>> {
    /// use directcall_cloud::gateway::ServerTls;
    /// let renewed = ServerTls::from_pem(&std::fs::read("tls.crt")?, &std::fs::read("tls.key")?, None)?;
    /// tls.replace(&renewed);
    /// # Ok(()) }
    /// ```
    pub fn replace(&self, new: &ServerTls) {
        let config = new.config();
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// The rustls configuration in use now.
    pub(crate) fn config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }
}
