//! The per-tenant crypto envelope: AES-256-GCM (ring) whose associated data binds a sealed
//! operation to its tenant, forest, operation id, deadline and trace context, so a ciphertext
//! moved to another tenant, forest or operation (or given a later deadline) fails to open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Current envelope format; part of the associated data.
pub const KEY_VERSION: u32 = 1;

/// Errors from sealing or opening an envelope. They never carry key or plaintext material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope is too short to hold a nonce and a tag")]
    Truncated,
    #[error("envelope does not open with this tenant's key for this tenant, forest, operation and deadline")]
    Unauthentic,
    #[error("unsupported envelope key version {0}")]
    UnsupportedVersion(u32),
    #[error("random number generator failed")]
    Rng,
    #[error("key material must be 32 bytes, got {0}")]
    BadKeyLength(usize),
}

/// 32 bytes of AES-256 key material that is wiped from memory on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct KeyBytes([u8; 32]);

impl KeyBytes {
    /// A fresh random key.
    ///
    /// # Errors
    /// When the system random generator fails.
    pub fn generate() -> Result<Self, EnvelopeError> {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| EnvelopeError::Rng)?;
        Ok(Self(k))
    }

    /// Wraps existing key material.
    ///
    /// # Errors
    /// When `bytes` is not exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| EnvelopeError::BadKeyLength(bytes.len()))?;
        Ok(Self(arr))
    }

    /// The raw bytes (for sending to an authenticated agent or wrapping at rest).
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBytes([redacted])")
    }
}

/// What an envelope is bound to. All of it travels in clear next to the ciphertext and is
/// authenticated as associated data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding<'a> {
    pub tenant_id: &'a str,
    pub forest: &'a str,
    pub operation_id: &'a str,
    pub deadline_unix_ms: i64,
    pub traceparent: &'a str,
}

impl Binding<'_> {
    fn associated_data(&self, key_version: u32) -> Vec<u8> {
        let mut aad = Vec::with_capacity(96);
        aad.extend_from_slice(b"writeback.v1/envelope\0");
        aad.extend_from_slice(&key_version.to_be_bytes());
        for part in [
            self.tenant_id,
            self.forest,
            self.operation_id,
            self.traceparent,
        ] {
            // Length-prefixed so ("ab","c") and ("a","bc") differ.
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad.extend_from_slice(&self.deadline_unix_ms.to_be_bytes());
        aad
    }
}

/// A tenant's master key. Per-forest data keys are derived from it with HKDF-SHA256, so an
/// agent of one forest never holds a key that opens another forest's operations.
#[derive(Clone, Debug)]
pub struct TenantKey(KeyBytes);

impl TenantKey {
    pub fn new(key: KeyBytes) -> Self {
        Self(key)
    }

    pub fn key_bytes(&self) -> &KeyBytes {
        &self.0
    }

    /// The data key for one forest of this tenant.
    pub fn forest_key(&self, tenant_id: &str, forest: &str) -> ForestKey {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"writeback.v1 forest key");
        let prk = salt.extract(self.0.expose());
        let info = [tenant_id.as_bytes(), b"\0", forest.as_bytes()];
        let okm = prk
            .expand(&info, hkdf::HKDF_SHA256)
            .expect("HKDF-SHA256 can always expand 32 bytes");
        let mut out = [0u8; 32];
        okm.fill(&mut out)
            .expect("HKDF-SHA256 can always fill 32 bytes");
        let key = ForestKey(KeyBytes(out));
        out.zeroize();
        key
    }
}

/// The AES-256-GCM data key of one tenant's forest: what the gateway seals with and what the
/// forest's agents open with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForestKey(KeyBytes);

impl ForestKey {
    pub fn from_bytes(key: KeyBytes) -> Self {
        Self(key)
    }

    pub fn key_bytes(&self) -> &KeyBytes {
        &self.0
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, self.0.expose()).expect("32-byte AES-256 key"),
        )
    }

    /// Seals `plaintext`, returning `nonce || ciphertext || tag`.
    ///
    /// # Errors
    /// When the random generator fails.
    pub fn seal(&self, binding: &Binding<'_>, plaintext: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| EnvelopeError::Rng)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .aead()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(binding.associated_data(KEY_VERSION)),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| EnvelopeError::Unauthentic)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens an envelope made by [`ForestKey::seal`] for exactly this `binding`.
    /// The returned buffer should be zeroized by the caller once decoded.
    ///
    /// # Errors
    /// [`EnvelopeError::Unauthentic`] when the key or any bound field differs.
    pub fn open(
        &self,
        binding: &Binding<'_>,
        key_version: u32,
        envelope: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, EnvelopeError> {
        if key_version != KEY_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(key_version));
        }
        if envelope.len() < NONCE_LEN + 16 {
            return Err(EnvelopeError::Truncated);
        }
        let nonce: [u8; NONCE_LEN] = envelope[..NONCE_LEN].try_into().expect("checked length");
        let mut buf = zeroize::Zeroizing::new(envelope[NONCE_LEN..].to_vec());
        let len = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(binding.associated_data(key_version)),
                &mut buf,
            )
            .map_err(|_| EnvelopeError::Unauthentic)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

/// Wraps a tenant key at rest under the gateway's key-encryption key, bound to the tenant id.
pub fn wrap_tenant_key(
    kek: &ForestKey,
    tenant_id: &str,
    key: &TenantKey,
) -> Result<Vec<u8>, EnvelopeError> {
    kek.seal(&wrap_binding(tenant_id), key.key_bytes().expose())
}

/// Unwraps a tenant key made by [`wrap_tenant_key`].
///
/// # Errors
/// When the wrapped key was made for another tenant or under another KEK.
pub fn unwrap_tenant_key(
    kek: &ForestKey,
    tenant_id: &str,
    wrapped: &[u8],
) -> Result<TenantKey, EnvelopeError> {
    let raw = kek.open(&wrap_binding(tenant_id), KEY_VERSION, wrapped)?;
    Ok(TenantKey(KeyBytes::from_slice(&raw)?))
}

fn wrap_binding(tenant_id: &str) -> Binding<'_> {
    Binding {
        tenant_id,
        forest: "",
        operation_id: "tenant-key",
        deadline_unix_ms: 0,
        traceparent: "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding<'static> {
        Binding {
            tenant_id: "acme",
            forest: "corp.acme.test",
            operation_id: "op-1",
            deadline_unix_ms: 1_700_000_000_000,
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
    }

    #[test]
    fn seal_then_open_round_trips() {
        let key =
            TenantKey::new(KeyBytes::generate().unwrap()).forest_key("acme", "corp.acme.test");
        let env = key.seal(&binding(), b"secret payload").unwrap();
        assert!(
            !env.windows(6).any(|w| w == b"secret"),
            "ciphertext leaks plaintext"
        );
        assert_eq!(
            &key.open(&binding(), KEY_VERSION, &env).unwrap()[..],
            b"secret payload"
        );
    }

    #[test]
    fn any_moved_binding_fails_to_open() {
        let key =
            TenantKey::new(KeyBytes::generate().unwrap()).forest_key("acme", "corp.acme.test");
        let env = key.seal(&binding(), b"x").unwrap();
        let moved = [
            Binding {
                tenant_id: "other",
                ..binding()
            },
            Binding {
                forest: "other.test",
                ..binding()
            },
            Binding {
                operation_id: "op-2",
                ..binding()
            },
            Binding {
                deadline_unix_ms: binding().deadline_unix_ms + 1,
                ..binding()
            },
            Binding {
                traceparent: "",
                ..binding()
            },
        ];
        for b in moved {
            assert_eq!(
                key.open(&b, KEY_VERSION, &env).unwrap_err(),
                EnvelopeError::Unauthentic,
                "{b:?}"
            );
        }
        let mut tampered = env.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            key.open(&binding(), KEY_VERSION, &tampered).unwrap_err(),
            EnvelopeError::Unauthentic
        );
        assert_eq!(
            key.open(&binding(), 2, &env).unwrap_err(),
            EnvelopeError::UnsupportedVersion(2)
        );
        assert_eq!(
            key.open(&binding(), KEY_VERSION, &env[..10]).unwrap_err(),
            EnvelopeError::Truncated
        );
    }

    #[test]
    fn forest_keys_differ_per_tenant_and_forest() {
        let master = TenantKey::new(KeyBytes::generate().unwrap());
        let a = master.forest_key("acme", "corp.acme.test");
        assert_eq!(a, master.forest_key("acme", "corp.acme.test"));
        assert_ne!(a, master.forest_key("acme", "other.acme.test"));
        assert_ne!(a, master.forest_key("acme2", "corp.acme.test"));
        let env = a.seal(&binding(), b"x").unwrap();
        let other = master.forest_key("acme", "other.acme.test");
        assert!(other.open(&binding(), KEY_VERSION, &env).is_err());
    }

    #[test]
    fn tenant_key_wrapping_is_bound_to_tenant() {
        let kek = ForestKey::from_bytes(KeyBytes::generate().unwrap());
        let tk = TenantKey::new(KeyBytes::generate().unwrap());
        let wrapped = wrap_tenant_key(&kek, "acme", &tk).unwrap();
        assert_eq!(
            unwrap_tenant_key(&kek, "acme", &wrapped)
                .unwrap()
                .key_bytes(),
            tk.key_bytes()
        );
        assert!(unwrap_tenant_key(&kek, "evil", &wrapped).is_err());
    }

    #[test]
    fn debug_never_shows_key_material() {
        let k = KeyBytes::from_slice(&[0xAB; 32]).unwrap();
        assert_eq!(format!("{k:?}"), "KeyBytes([redacted])");
    }
}
