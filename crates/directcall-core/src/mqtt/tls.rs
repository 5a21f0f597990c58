//! TLS for MQTT connections (feature `tls`): a rustls client configuration
//! from PEM material, with the ring provider passed explicitly, so no
//! process-wide default provider is needed (rustls 0.23 panics when two
//! providers are compiled in and none is installed).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::SetupError;
use crate::broker::TlsOptions;

/// A rustls client configuration for `tls`: its CA certificates (or the
/// platform's roots), its client certificate and key, its ALPN protocols.
///
/// # Errors
/// [`SetupError::Tls`] naming the part that cannot be used.
pub fn client_config(tls: &TlsOptions) -> Result<rustls::ClientConfig, SetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::tls("protocol versions", e))?;
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| SetupError::tls("CA certificate", e))?;
                roots
                    .add(cert)
                    .map_err(|e| SetupError::tls("CA certificate", e))?;
            }
            if roots.is_empty() {
                return Err(SetupError::tls(
                    "CA certificate",
                    "the CA file holds no PEM certificate",
                ));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(SetupError::tls(
                    "CA certificate",
                    "no CA given and no platform root certificates found",
                ));
            }
        }
    }
    let builder = builder.with_root_certificates(roots);
    let mut config = match &tls.client_auth {
        Some((cert_pem, key_pem)) => {
            let certs = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SetupError::tls("client certificate", e))?;
            if certs.is_empty() {
                return Err(SetupError::tls(
                    "client certificate",
                    "the certificate file holds no PEM certificate",
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| SetupError::tls("client key", e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| SetupError::tls("client certificate and key", e))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

pub(crate) fn rumqttc_config(tls: &TlsOptions) -> Result<rumqttc::TlsConfiguration, SetupError> {
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(client_config(
        tls,
    )?)))
}
