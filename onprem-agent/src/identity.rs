//! How the agent proves who it is to the gateway: its enrolled client certificate (mutual
//! TLS), or a registered secret when it has not enrolled.
//!
//! `onprem-agent enroll` creates a key pair on this host, sends a CSR with a one-time token
//! (`cloud-gateway admin enroll-agent`) and keeps the certificate it gets in
//! `<state_dir>/agent.crt`, its key in `<state_dir>/agent.key` (0600, refused when others may
//! read it). The certificate is short-lived; the agent renews it over its stream at half its
//! lifetime (a new key each time, and a new sealing key with it: `keys.rs`).

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use relay::proto::agent_enrollment_client::AgentEnrollmentClient;
use relay::proto::{EnrollRequest, EnrollResponse};
use relay::secret::Secret;

use crate::AgentConfig;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("the agent has no credential: enroll it (`onprem-agent enroll --token-file <file>`, token from `cloud-gateway admin enroll-agent`) or set agent_secret_file")]
    None,
    #[error("enrollment needs state_dir (where the certificate and its key are kept)")]
    NoStateDir,
    #[error("cannot generate a key pair: {0}")]
    Key(String),
    #[error("sealing keys: {0}")]
    Keys(#[from] crate::keys::KeyError),
    #[error("gateway: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("gateway refused the enrollment ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("{0}")]
    Tls(#[from] relay::tls::TlsError),
}

/// An enrolled certificate and its key, as kept in the state directory.
pub struct Enrolled {
    pub cert_pem: String,
    key_pem: Secret,
    pub not_before_unix_ms: i64,
    pub not_after_unix_ms: i64,
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolled")
            .field("not_after_unix_ms", &self.not_after_unix_ms)
            .finish_non_exhaustive()
    }
}

impl Enrolled {
    /// Whether it is past half its lifetime (time to renew).
    pub fn renewal_due(&self, now_unix_ms: i64) -> bool {
        now_unix_ms
            >= self.not_before_unix_ms + (self.not_after_unix_ms - self.not_before_unix_ms) / 2
    }
}

/// What the agent authenticates with.
#[derive(Debug)]
pub enum Credential {
    Certificate(Enrolled),
    Secret(Secret),
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("agent.crt"), dir.join("agent.key"))
}

/// The enrolled certificate in `state_dir`, if there is one.
///
/// # Errors
/// When it cannot be read, its key is not private, or it does not parse.
pub fn load(state_dir: &Path) -> Result<Option<Enrolled>, IdentityError> {
    let (crt, key) = paths(state_dir);
    if !crt.exists() {
        return Ok(None);
    }
    let cert_pem = std::fs::read_to_string(&crt).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot read {}: {e}", crt.display()))
    })?;
    let key_pem = Secret::from_file(&key)?;
    let invalid = |detail: String| IdentityError::Invalid {
        path: crt.clone(),
        detail,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    let validity = cert.validity();
    Ok(Some(Enrolled {
        not_before_unix_ms: validity.not_before.timestamp() * 1000,
        not_after_unix_ms: validity.not_after.timestamp() * 1000,
        cert_pem,
        key_pem,
    }))
}

/// Whether an agent with this state directory enrolled (holds a certificate).
pub fn is_enrolled(state_dir: &Path) -> bool {
    paths(state_dir).0.exists()
}

/// Keeps a certificate and its key in `state_dir` (the key written 0600; each file replaced
/// whole).
///
/// # Errors
/// When they cannot be written.
pub fn store(state_dir: &Path, cert_pem: &str, key_pem: &Secret) -> Result<(), IdentityError> {
    std::fs::create_dir_all(state_dir)?;
    let (crt, key) = paths(state_dir);
    let (crt_tmp, key_tmp) = (crt.with_extension("crt.tmp"), key.with_extension("key.tmp"));
    relay::secret::write_private(&key_tmp, key_pem.expose())?;
    std::fs::write(&crt_tmp, cert_pem)?;
    std::fs::rename(&key_tmp, &key)?;
    std::fs::rename(&crt_tmp, &crt)?;
    Ok(())
}

/// The agent's credential: its enrolled certificate, else its secret.
///
/// # Errors
/// When the certificate cannot be read, or there is neither.
pub fn credential(config: &AgentConfig) -> Result<Credential, IdentityError> {
    if let Some(dir) = &config.state_dir {
        if let Some(enrolled) = load(dir)? {
            return Ok(Credential::Certificate(enrolled));
        }
    }
    config
        .agent_secret
        .clone()
        .map(Credential::Secret)
        .ok_or(IdentityError::None)
}

/// TLS to the gateway (its CA, its name), presenting the certificate when enrolled.
///
/// # Errors
/// When the gateway CA cannot be read.
pub fn tls(
    config: &AgentConfig,
    credential: &Credential,
) -> Result<ClientTlsConfig, IdentityError> {
    let ca = relay::tls::read_pem(&config.gateway_ca)?;
    relay::tls::read_certs(&config.gateway_ca)?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(name) = &config.gateway_tls_name {
        tls = tls.domain_name(name.clone());
    }
    if let Credential::Certificate(e) = credential {
        tls = tls.identity(Identity::from_pem(&e.cert_pem, e.key_pem.expose()));
    }
    Ok(tls)
}

/// Adds the bearer secret to a request when the agent has no certificate.
///
/// # Errors
/// When the secret is not valid header text.
pub fn authorize<T>(
    request: &mut tonic::Request<T>,
    config: &AgentConfig,
    credential: &Credential,
) -> Result<(), String> {
    if let Credential::Secret(secret) = credential {
        let mut header = format!("Bearer {}.{}", config.agent_id, secret.expose());
        let value = header
            .parse()
            .map_err(|_| "the agent secret is not valid header text".to_owned());
        zeroize::Zeroize::zeroize(&mut header);
        request.metadata_mut().insert("authorization", value?);
    }
    Ok(())
}

/// A new key pair and a CSR for it: `(csr_pem, key_pem)`.
///
/// # Errors
/// When key generation fails.
pub fn new_request() -> Result<(String, Secret), IdentityError> {
    let key = KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok((csr, Secret::new(key.serialize_pem())))
}

/// Enrolls this agent with a one-time `token`: a new key pair, its certificate from the
/// gateway (bound to a new sealing key, which becomes the current one), all kept in the state
/// directory.
///
/// # Errors
/// When there is no state directory, the gateway cannot be reached, or refuses the token.
pub async fn enroll(config: &AgentConfig, token: &Secret) -> Result<EnrollResponse, IdentityError> {
    relay::tls::install_crypto_provider();
    let dir = config.state_dir.as_ref().ok_or(IdentityError::NoStateDir)?;
    let (csr_pem, key_pem) = new_request()?;
    let sealing_key =
        relay::envelope::AgentKey::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
    let tls = tls(config, &Credential::Secret(Secret::default()))?;
    let channel = Endpoint::from_shared(config.gateway_url.clone())
        .map_err(|e| IdentityError::Invalid {
            path: "gateway_url".into(),
            detail: e.to_string(),
        })?
        .tls_config(tls)?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await?;
    let response = AgentEnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            token: token.expose().to_owned(),
            csr_pem,
            sealing_key: sealing_key.public().as_bytes().to_vec(),
        })
        .await
        .map_err(|s| IdentityError::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        })?
        .into_inner();
    store(dir, &response.certificate_pem, &key_pem)?;
    crate::keys::rotate_to(dir, sealing_key)?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_the_lifetime() {
        let e = Enrolled {
            cert_pem: String::new(),
            key_pem: Secret::default(),
            not_before_unix_ms: 1000,
            not_after_unix_ms: 3000,
        };
        assert!(!e.renewal_due(1999));
        assert!(e.renewal_due(2000));
    }
}
