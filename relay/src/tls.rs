//! Reading PEM files for TLS, with errors that name the file and what was wrong.

use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path}: invalid PEM: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("CA certificate in {path} rejected: {detail}")]
    BadCa { path: PathBuf, detail: String },
}

/// Installs ring as the process-wide rustls provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a whole PEM file.
///
/// # Errors
/// When the file cannot be read.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads the certificates of a PEM file (a CA bundle or a chain).
///
/// # Errors
/// When the file cannot be read or holds no certificate.
pub fn read_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A rustls client configuration that trusts exactly the CAs in `ca_file`.
///
/// # Errors
/// When the file cannot be read or a certificate is not a usable trust anchor.
pub fn client_config_with_ca(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: ca_file.to_owned(),
            detail: e.to_string(),
        })?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Checks that a key file holds a private key, and returns its PEM bytes.
///
/// # Errors
/// When the file cannot be read or holds no key.
pub fn read_key_pem(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, TlsError> {
    let pem = zeroize::Zeroizing::new(read_pem(path)?);
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(_)) => Ok(pem),
        Ok(None) => Err(TlsError::NoKey {
            path: path.to_owned(),
        }),
        Err(e) => Err(TlsError::Invalid {
            path: path.to_owned(),
            detail: e.to_string(),
        }),
    }
}
