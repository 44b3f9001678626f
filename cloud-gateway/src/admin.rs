//! Admin commands: create tenants and register agent credentials. They print the new secret
//! once on stdout and store only its hash.

use relay::secret::Secret;

use crate::store::TenantId;
use crate::tenants::{TenantError, Tenants};

/// A fresh gateway master key (key-encryption key for tenant keys), as 64 hex digits.
///
/// # Errors
/// When the system random generator fails.
pub fn generate_master_key() -> Result<Secret, relay::envelope::EnvelopeError> {
    let key = relay::envelope::KeyBytes::generate()?;
    Ok(Secret::new(hex::encode(key.expose())))
}

/// Parses a master key file's content: 64 hex digits (surrounding whitespace ignored).
///
/// # Errors
/// When the content is not 32 bytes of hex; the error never echoes the content.
pub fn parse_master_key(content: &str) -> Result<relay::envelope::KeyBytes, String> {
    let mut raw = hex::decode(content.trim())
        .map_err(|_| "master key must be 64 hexadecimal digits".to_owned())?;
    let key = relay::envelope::KeyBytes::from_slice(&raw).map_err(|_| {
        format!(
            "master key must be 32 bytes (64 hex digits), got {} bytes",
            raw.len()
        )
    });
    zeroize::Zeroize::zeroize(&mut raw);
    key
}

/// Creates a tenant, or with `if_missing` does nothing when it exists (returns `None`).
///
/// # Errors
/// On Redis errors.
pub async fn create_tenant(
    tenants: &Tenants,
    tenant: &TenantId,
    if_missing: bool,
) -> Result<Option<Secret>, TenantError> {
    if if_missing && tenants.exists(tenant).await? {
        return Ok(None);
    }
    tenants.create_tenant(tenant).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_round_trips_and_rejects_garbage() {
        let k = generate_master_key().unwrap();
        assert_eq!(k.expose().len(), 64);
        parse_master_key(&format!("{}\n", k.expose())).unwrap();
        let e = parse_master_key("zz").unwrap_err();
        assert!(!e.contains("zz"));
        assert!(parse_master_key("abcd").unwrap_err().contains("2 bytes"));
    }
}
