//! Agent enrollment and the agent CA.
//!
//! `cloud-gateway admin enroll-agent` issues a one-time, short-lived token for one tenant,
//! forest and agent id. `onprem-agent enroll` creates a key pair on the agent host and sends a
//! CSR with the token to `writeback.v1.AgentEnrollment/Enroll`; the gateway answers with a
//! client certificate from its agent CA. From then on the agent authenticates with mutual TLS:
//! tenant, forest and agent id come from the certificate (a URI SAN
//! `urn:writeback:agent:<tenant>:<forest>:<agent id>:<enrollment>`), and the agent's credential
//! record must still name that enrollment (enrolling again, or `revoke-agent`, cuts the old
//! certificate off at once, on every replica). The certificate is bound to the agent's sealing
//! key (a second URI SAN `urn:writeback:sealing-key:<key id>`): a stream on it that announces
//! another key is refused, so a copied certificate key without the sealing-key file receives
//! no work. Certificates are short-lived ([`DEFAULT_CERT_TTL`]) and renewed over the agent's
//! stream, which a revoked agent no longer has, each renewal with a new sealing key; the new
//! certificate is sent sealed to the stream's current sealing key.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::{Request, Response, Status};

use relay::proto::agent_enrollment_server::AgentEnrollment;
use relay::proto::{EnrollRequest, EnrollResponse};

use crate::error::GatewayError;
use crate::store::{ForestId, TenantId};
use crate::Gateway;

/// How long an agent certificate is valid; agents renew at half of it.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Who an agent certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledName {
    pub tenant: TenantId,
    pub forest: ForestId,
    pub agent_id: String,
    /// Random per enrollment: the credential record names the current one.
    pub enrollment: String,
    /// The id of the sealing key the certificate is bound to; `None` in a certificate issued
    /// before keys were bound (such a certificate is still accepted until it expires, and
    /// renews only onto a bound one).
    pub sealing_key_id: Option<String>,
}

const SAN_PREFIX: &str = "urn:writeback:agent:";
const SEALING_SAN_PREFIX: &str = "urn:writeback:sealing-key:";

impl EnrolledName {
    fn uri(&self) -> String {
        format!(
            "{SAN_PREFIX}{}:{}:{}:{}",
            self.tenant, self.forest, self.agent_id, self.enrollment
        )
    }

    /// The name in a client certificate this gateway's agent CA issued (the TLS layer has
    /// verified the chain and validity), if it carries one.
    pub fn from_certificate(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let uris = || {
            san.value.general_names.iter().filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
        };
        let mut who = uris().find_map(Self::parse)?;
        who.sealing_key_id = uris()
            .find_map(|u| u.strip_prefix(SEALING_SAN_PREFIX))
            .map(str::to_owned);
        Some(who)
    }

    fn parse(uri: &str) -> Option<Self> {
        let mut parts = uri.strip_prefix(SAN_PREFIX)?.split(':');
        let (tenant, forest, agent_id, enrollment) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            tenant: TenantId::new(tenant).ok()?,
            forest: ForestId::new(forest).ok()?,
            // Agent ids follow the tenant id rule (`admin register-agent`).
            agent_id: TenantId::new(agent_id).ok()?.into_string(),
            enrollment: enrollment.to_owned(),
            sealing_key_id: None,
        })
    }

    /// What the credential record holds in place of a secret's hash for this enrollment.
    pub fn credential(&self) -> String {
        format!("cert:{}", self.enrollment)
    }
}

/// The gateway's agent CA: verifies client certificates (its certificate) and issues them (its
/// key).
pub struct AgentCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    cert_ttl: Duration,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa")
            .field("cert_ttl", &self.cert_ttl)
            .finish_non_exhaustive()
    }
}

impl AgentCa {
    /// The CA from its PEM certificate and private key.
    ///
    /// # Errors
    /// Naming what does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str, cert_ttl: Duration) -> Result<Self, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("agent CA key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| format!("agent CA certificate: {e}"))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            issuer,
            cert_ttl,
        })
    }

    /// A new CA (`admin init-agent-ca`): its certificate and private key, PEM.
    ///
    /// # Errors
    /// When key generation fails.
    pub fn generate() -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "writeback agent CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = time_from_unix(relay::now_unix_ms() / 1000 - 300);
        params.not_after = time_from_unix(relay::now_unix_ms() / 1000 + 10 * 365 * 86_400);
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A client certificate for the key in `csr_pem`, naming `who`, valid from now for the
    /// CA's certificate lifetime. Returns it (PEM) with its expiry (Unix ms).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming `csr_pem` when the request does not parse or its signature
    /// does not verify.
    pub fn issue(&self, csr_pem: &str, who: &EnrolledName) -> Result<(String, i64), GatewayError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            GatewayError::invalid("csr_pem", format!("not a valid PKCS#10 request: {e}"))
        })?;
        let now = relay::now_unix_ms() / 1000;
        let not_after = now + self.cert_ttl.as_secs() as i64;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, who.agent_id.as_str());
        dn.push(DnType::OrganizationName, who.tenant.as_str());
        params.distinguished_name = dn;
        let uris = std::iter::once(who.uri()).chain(
            who.sealing_key_id
                .iter()
                .map(|id| format!("{SEALING_SAN_PREFIX}{id}")),
        );
        params.subject_alt_names = uris
            .map(|u| {
                u.try_into()
                    .map(SanType::URI)
                    .map_err(|_| GatewayError::Internal("agent name is not an IA5 string".into()))
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Backdated a little for clocks behind ours, never by much of the lifetime (renewal is
        // at half of not_before..not_after).
        let backdate = (self.cert_ttl.as_secs() as i64 / 4).min(300);
        params.not_before = time_from_unix(now - backdate);
        params.not_after = time_from_unix(not_after);
        params.use_authority_key_identifier_extension = true;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| GatewayError::Internal(format!("cannot sign the agent certificate: {e}")))?;
        Ok((signed.pem(), not_after * 1000))
    }
}

fn time_from_unix(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).expect("a time within the representable range")
}

/// `writeback.v1.AgentEnrollment`: the one call that takes no agent credential (its token is
/// the credential).
pub struct EnrollmentService {
    gw: Gateway,
    ca: Arc<AgentCa>,
}

impl EnrollmentService {
    pub fn new(gw: Gateway, ca: Arc<AgentCa>) -> Self {
        Self { gw, ca }
    }

    async fn enroll(&self, req: EnrollRequest) -> Result<EnrollResponse, GatewayError> {
        let sealing_key = relay::envelope::AgentPublicKey::from_bytes(&req.sealing_key)
            .map_err(|_| {
                GatewayError::invalid(
                    "sealing_key",
                    format!(
                        "must be the agent's 32-byte X25519 public key, got {} bytes (an agent from before certificates were bound to sealing keys: upgrade it)",
                        req.sealing_key.len()
                    ),
                )
            })?;
        let (tenant, forest, agent_id) = self
            .gw
            .tenants
            .redeem_enrollment(&req.token)
            .await?
            .ok_or(GatewayError::EnrollmentRefused)?;
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| GatewayError::Internal("random generator failed".into()))?;
        let who = EnrolledName {
            tenant,
            forest,
            agent_id,
            enrollment: hex::encode(raw),
            sealing_key_id: Some(sealing_key.id().to_owned()),
        };
        let (certificate_pem, not_after_unix_ms) = self.ca.issue(&req.csr_pem, &who)?;
        self.gw.tenants.put_enrolled_agent(&who).await?;
        tracing::info!(event = "WB1018", tenant = %who.tenant, forest = %who.forest, agent_id = %who.agent_id, sealing_key_id = ?who.sealing_key_id, not_after_unix_ms, "agent enrolled: client certificate issued");
        Ok(EnrollResponse {
            certificate_pem,
            tenant_id: who.tenant.to_string(),
            forest: who.forest.to_string(),
            agent_id: who.agent_id,
            not_after_unix_ms,
        })
    }
}

#[tonic::async_trait]
impl AgentEnrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        Ok(Response::new(
            EnrollmentService::enroll(self, request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_the_enrolled_agent_and_nothing_else_parses() {
        let (cert, key) = AgentCa::generate().unwrap();
        let ca = AgentCa::from_pem(&cert, &key, DEFAULT_CERT_TTL).unwrap();
        let who = EnrolledName {
            tenant: TenantId::new("acme").unwrap(),
            forest: ForestId::new("corp.acme.test").unwrap(),
            agent_id: "dc1-agent".into(),
            enrollment: "00ff".into(),
            sealing_key_id: Some("0123456789abcdef".into()),
        };
        let agent_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&agent_key)
            .unwrap()
            .pem()
            .unwrap();
        let (pem, not_after) = ca.issue(&csr, &who).unwrap();
        let der = rustls_pemfile_der(&pem);
        assert_eq!(EnrolledName::from_certificate(&der), Some(who.clone()));
        // Without a bound key (issued before keys were bound).
        let unbound = EnrolledName {
            sealing_key_id: None,
            ..who
        };
        let (pem, _) = ca.issue(&csr, &unbound).unwrap();
        assert_eq!(
            EnrolledName::from_certificate(&rustls_pemfile_der(&pem)),
            Some(unbound)
        );
        let left = not_after - relay::now_unix_ms();
        assert!(left > 23 * 3_600_000 && left <= 24 * 3_600_000, "{left}");
        let err = ca.issue(
            "not a csr",
            &EnrolledName::parse("urn:writeback:agent:a:b.c:d:e").unwrap(),
        );
        assert!(err.unwrap_err().to_string().contains("csr_pem"));
        assert!(EnrolledName::parse("urn:writeback:agent:a:b.c:d:e:extra").is_none());
        assert!(EnrolledName::parse("urn:other:a:b:c:d").is_none());
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }
}
