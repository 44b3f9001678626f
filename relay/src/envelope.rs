//! Operation envelopes sealed to the agents' own keys.
//!
//! Every agent keeps an X25519 key pair whose private half never leaves its host (see
//! [`AgentKey`]). The gateway seals each operation under a fresh AES-256-GCM data key and wraps
//! that data key once per live agent of the forest ([`seal_to`]): an ephemeral X25519 key
//! (ring's `agreement`), HKDF-SHA256 of the shared secret, AES-256-GCM. The ephemeral private
//! keys and the data key are gone when `seal_to` returns, so nothing the cloud side keeps (the
//! gateway's memory after Submit, Redis, the master key) opens a queued operation: only an
//! agent that was live when it was sealed, with the key it announced then.
//!
//! Both the ciphertext and every wrapped key are bound, as associated data, to the tenant,
//! forest, operation id, deadline and trace context ([`Binding`]), so an envelope moved to
//! another tenant, forest or operation, or given a later deadline, fails to open.
//!
//! Agents' public keys are stored where the cloud side can read them, so sealing alone would let
//! anyone who can write to Redis queue an operation of their own. Every envelope is therefore
//! also signed by the gateway ([`OperationSigner`]: Ed25519, derived from the master key on
//! every replica); agents check the signature with the key the gateway's Welcome gave them over
//! TLS before they open anything.

use prost::Message;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::agreement;
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::proto::{SealedEnvelope, SealedKey};

/// Current envelope format (`Work.key_version`); part of the associated data.
pub const KEY_VERSION: u32 = 2;

/// Most recipients one envelope may name (more than any forest has agents).
pub const MAX_RECIPIENTS: usize = 64;

/// Errors from sealing or opening an envelope. They never carry key or plaintext material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope is too short to hold a nonce and a tag")]
    Truncated,
    #[error("envelope does not open for this tenant, forest, operation and deadline")]
    Unauthentic,
    #[error("unsupported envelope version {0} (this build reads version {KEY_VERSION})")]
    UnsupportedVersion(u32),
    #[error("random number generator failed")]
    Rng,
    #[error("key material must be 32 bytes, got {0}")]
    BadKeyLength(usize),
    #[error("envelope is malformed: {0}")]
    Malformed(&'static str),
    #[error("no agent key to seal to")]
    NoRecipients,
    #[error("envelope is sealed to agent keys {sealed_to:?}, none of which this agent holds")]
    NotARecipient { sealed_to: Vec<String> },
    #[error("agent key is weak (a low-order X25519 point)")]
    WeakKey,
    #[error("envelope is not signed by the gateway (written by someone without its master key?)")]
    Forged,
}

/// 32 bytes of key material that is wiped from memory on drop.
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

    /// The raw bytes (for deriving other keys or writing a key file).
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("32-byte AES-256 key"))
    }

    /// `nonce || AES-256-GCM(plaintext) || tag` under this key with `aad`.
    fn seal(&self, aad: Vec<u8>, plaintext: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
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
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| EnvelopeError::Unauthentic)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens what [`KeyBytes::seal`] made with the same `aad`.
    fn open(&self, aad: Vec<u8>, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(EnvelopeError::Truncated);
        }
        let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().expect("checked length");
        let mut buf = Zeroizing::new(sealed[NONCE_LEN..].to_vec());
        let len = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| EnvelopeError::Unauthentic)?
            .len();
        buf.truncate(len);
        Ok(buf)
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
    /// `label`, the format version, then every bound field length-prefixed (so ("ab","c") and
    /// ("a","bc") differ), then `extra`.
    fn associated_data(&self, label: &[u8], extra: &[&[u8]]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(128);
        aad.extend_from_slice(label);
        aad.extend_from_slice(&KEY_VERSION.to_be_bytes());
        let fields = [
            self.tenant_id.as_bytes(),
            self.forest.as_bytes(),
            self.operation_id.as_bytes(),
            self.traceparent.as_bytes(),
        ];
        for part in fields.iter().chain(extra) {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&self.deadline_unix_ms.to_be_bytes());
        aad
    }

    fn ciphertext_aad(&self) -> Vec<u8> {
        self.associated_data(b"writeback.v2/envelope\0", &[])
    }

    fn wrap_aad(&self, key_id: &str, ephemeral: &[u8]) -> Vec<u8> {
        self.associated_data(b"writeback.v2/wrap\0", &[key_id.as_bytes(), ephemeral])
    }
}

/// The operation id a renewed certificate is sealed under (to the sealing key of the stream
/// that asked for it, deadline = the certificate's expiry).
pub const RENEWAL_OPERATION_ID: &str = "certificate-renewal";

impl<'a> Binding<'a> {
    /// What a renewed certificate for (tenant, forest) expiring at `not_after_unix_ms` is
    /// sealed to.
    pub fn renewal(tenant_id: &'a str, forest: &'a str, not_after_unix_ms: i64) -> Self {
        Self {
            tenant_id,
            forest,
            operation_id: RENEWAL_OPERATION_ID,
            deadline_unix_ms: not_after_unix_ms,
            traceparent: "",
        }
    }
}

/// The public half of an agent's sealing key, with its id (what envelopes name it by).
#[derive(Clone, PartialEq, Eq)]
pub struct AgentPublicKey {
    bytes: [u8; 32],
    id: String,
}

impl AgentPublicKey {
    /// An X25519 public key as announced by an agent.
    ///
    /// # Errors
    /// When `bytes` is not 32 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| EnvelopeError::BadKeyLength(bytes.len()))?;
        Ok(Self {
            id: key_id(&bytes),
            bytes,
        })
    }

    /// The key's id: 16 hex digits of its SHA-256, computed, never taken from the sender.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl std::fmt::Debug for AgentPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentPublicKey({})", self.id)
    }
}

fn key_id(public: &[u8; 32]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"writeback agent sealing key\0");
    ctx.update(public);
    hex::encode(&ctx.finish().as_ref()[..8])
}

/// An agent's X25519 key pair. The private half is created on the agent host, kept in its
/// key file (mode 0600) and memory, wiped on drop, and never sent anywhere.
pub struct AgentKey {
    secret: x25519_dalek::StaticSecret,
    public: AgentPublicKey,
}

impl AgentKey {
    /// A fresh key pair.
    ///
    /// # Errors
    /// When the system random generator fails.
    pub fn generate() -> Result<Self, EnvelopeError> {
        let raw = KeyBytes::generate()?;
        Self::from_secret(&raw)
    }

    /// The key pair of a stored private key.
    ///
    /// # Errors
    /// Never for 32 bytes; kept fallible for the key-file reader.
    pub fn from_secret(raw: &KeyBytes) -> Result<Self, EnvelopeError> {
        let secret = x25519_dalek::StaticSecret::from(*raw.expose());
        let public = x25519_dalek::PublicKey::from(&secret);
        Ok(Self {
            public: AgentPublicKey::from_bytes(public.as_bytes())?,
            secret,
        })
    }

    /// The private key's bytes, for writing the key file.
    pub fn secret_bytes(&self) -> KeyBytes {
        KeyBytes(self.secret.to_bytes())
    }

    pub fn public(&self) -> &AgentPublicKey {
        &self.public
    }

    /// The data key wrapped to this agent in `wrap`, if it opens.
    fn unwrap_data_key(
        &self,
        binding: &Binding<'_>,
        wrap: &SealedKey,
    ) -> Result<KeyBytes, EnvelopeError> {
        let ephemeral: [u8; 32] = wrap
            .ephemeral_public
            .as_slice()
            .try_into()
            .map_err(|_| EnvelopeError::Malformed("ephemeral key must be 32 bytes"))?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(ephemeral));
        if !shared.was_contributory() {
            return Err(EnvelopeError::WeakKey);
        }
        let kek = wrapping_key(shared.as_bytes(), &ephemeral, self.public.as_bytes());
        let raw = kek.open(
            binding.wrap_aad(&self.public.id, &ephemeral),
            &wrap.wrapped_key,
        )?;
        KeyBytes::from_slice(&raw)
    }
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentKey({}, [redacted])", self.public.id)
    }
}

/// The key that wraps one recipient's copy of a data key.
fn wrapping_key(shared: &[u8], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> KeyBytes {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"writeback.v2 agent seal");
    let prk = salt.extract(shared);
    let info = [ephemeral.as_slice(), recipient.as_slice()];
    let okm = prk
        .expand(&info, hkdf::HKDF_SHA256)
        .expect("HKDF-SHA256 can always expand 32 bytes");
    let mut out = [0u8; 32];
    okm.fill(&mut out)
        .expect("HKDF-SHA256 can always fill 32 bytes");
    let key = KeyBytes(out);
    out.zeroize();
    key
}

/// The gateway's operation-signing key (Ed25519), the same on every replica: derived from the
/// master key, never stored.
pub struct OperationSigner {
    pair: ring::signature::Ed25519KeyPair,
}

impl OperationSigner {
    /// The signer for a master key.
    pub fn from_master_key(master: &KeyBytes) -> Self {
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, master.expose());
        let seed = ring::hmac::sign(&derive, b"writeback.v2 operation signing key");
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed.as_ref()[..32])
            .expect("any 32 bytes are an Ed25519 seed");
        Self { pair }
    }

    /// The public key agents verify envelopes with (sent in the Welcome).
    pub fn public_key(&self) -> [u8; 32] {
        use ring::signature::KeyPair;
        self.pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("Ed25519 public keys are 32 bytes")
    }

    fn sign(&self, binding: &Binding<'_>, ciphertext: &[u8]) -> Vec<u8> {
        self.pair
            .sign(&signed_bytes(binding, ciphertext))
            .as_ref()
            .to_vec()
    }
}

impl std::fmt::Debug for OperationSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OperationSigner({})", hex::encode(self.public_key()))
    }
}

/// What the gateway signs: the bound fields and the ciphertext (with its tag). Nobody without
/// the data key can wrap it to another key, so the wrapped keys need no signature.
fn signed_bytes(binding: &Binding<'_>, ciphertext: &[u8]) -> Vec<u8> {
    let mut m = binding.associated_data(b"writeback.v2/signature\0", &[ciphertext]);
    m.shrink_to_fit();
    m
}

/// Seals `plaintext` so that each of `recipients` (and nobody else) can open it: a fresh data
/// key, wrapped to each recipient through an ephemeral X25519 agreement, the ciphertext signed
/// by `signer`. Returns the encoded [`SealedEnvelope`].
///
/// # Errors
/// [`EnvelopeError::NoRecipients`] for an empty list (or more than [`MAX_RECIPIENTS`]: the
/// caller chose badly); [`EnvelopeError::WeakKey`] for a low-order recipient key.
pub fn seal_to(
    recipients: &[AgentPublicKey],
    signer: &OperationSigner,
    binding: &Binding<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    if recipients.is_empty() || recipients.len() > MAX_RECIPIENTS {
        return Err(EnvelopeError::NoRecipients);
    }
    let rng = SystemRandom::new();
    let data_key = KeyBytes::generate()?;
    let mut keys = Vec::with_capacity(recipients.len());
    for r in recipients {
        let ephemeral = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| EnvelopeError::Rng)?;
        let ephemeral_public: [u8; 32] = ephemeral
            .compute_public_key()
            .map_err(|_| EnvelopeError::Rng)?
            .as_ref()
            .try_into()
            .expect("X25519 public keys are 32 bytes");
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, r.as_bytes());
        // ring refuses a low-order peer key (an all-zero shared secret).
        let kek = agreement::agree_ephemeral(ephemeral, &peer, |shared| {
            wrapping_key(shared, &ephemeral_public, r.as_bytes())
        })
        .map_err(|_| EnvelopeError::WeakKey)?;
        let wrapped_key = kek.seal(
            binding.wrap_aad(r.id(), &ephemeral_public),
            data_key.expose(),
        )?;
        keys.push(SealedKey {
            key_id: r.id().to_owned(),
            ephemeral_public: ephemeral_public.to_vec(),
            wrapped_key,
        });
    }
    let ciphertext = data_key.seal(binding.ciphertext_aad(), plaintext)?;
    let signature = signer.sign(binding, &ciphertext);
    Ok(SealedEnvelope {
        keys,
        ciphertext,
        signature,
    }
    .encode_to_vec())
}

fn decode(envelope: &[u8]) -> Result<SealedEnvelope, EnvelopeError> {
    let env = SealedEnvelope::decode(envelope)
        .map_err(|_| EnvelopeError::Malformed("not a SealedEnvelope"))?;
    if env.keys.is_empty() || env.keys.len() > MAX_RECIPIENTS {
        return Err(EnvelopeError::Malformed("must name 1 to 64 recipient keys"));
    }
    Ok(env)
}

/// The ids of the agent keys an envelope is sealed to (no key needed).
///
/// # Errors
/// When `envelope` is not a well-formed envelope.
pub fn recipient_ids(envelope: &[u8]) -> Result<Vec<String>, EnvelopeError> {
    Ok(decode(envelope)?
        .keys
        .into_iter()
        .map(|k| k.key_id)
        .collect())
}

/// An agent's keys: the current one (announced to the gateway, sealed to from now on) and the
/// earlier ones it still holds, which open only what was sealed to them.
#[derive(Debug)]
pub struct AgentKeyring {
    keys: Vec<AgentKey>,
}

impl AgentKeyring {
    /// `current` first, then older keys.
    pub fn new(current: AgentKey, older: Vec<AgentKey>) -> Self {
        let mut keys = vec![current];
        keys.extend(older);
        Self { keys }
    }

    pub fn current(&self) -> &AgentKey {
        &self.keys[0]
    }

    pub fn keys(&self) -> &[AgentKey] {
        &self.keys
    }

    /// Opens an envelope made by [`seal_to`] for exactly this `binding`, signed by the gateway
    /// under one of the public signing keys `gateway` (its current one, and its previous one
    /// during a master-key rotation), with whichever of this agent's keys it was sealed to. The
    /// returned buffer is wiped on drop.
    ///
    /// # Errors
    /// [`EnvelopeError::Forged`] when the gateway did not sign it (for this binding);
    /// [`EnvelopeError::NotARecipient`] when it was sealed to none of these keys;
    /// [`EnvelopeError::Unauthentic`] when any bound field or byte differs.
    pub fn open<K: AsRef<[u8]>>(
        &self,
        gateway: &[K],
        binding: &Binding<'_>,
        key_version: u32,
        envelope: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        if key_version != KEY_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(key_version));
        }
        let env = decode(envelope)?;
        let signed = signed_bytes(binding, &env.ciphertext);
        if !gateway.iter().any(|k| {
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k.as_ref())
                .verify(&signed, &env.signature)
                .is_ok()
        }) {
            return Err(EnvelopeError::Forged);
        }
        let (key, wrap) = self
            .keys
            .iter()
            .find_map(|k| {
                env.keys
                    .iter()
                    .find(|w| w.key_id == k.public.id)
                    .map(|w| (k, w))
            })
            .ok_or_else(|| EnvelopeError::NotARecipient {
                sealed_to: env.keys.iter().map(|k| k.key_id.clone()).collect(),
            })?;
        let data_key = key.unwrap_data_key(binding, wrap)?;
        data_key.open(binding.ciphertext_aad(), &env.ciphertext)
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

    fn ring_of(key: AgentKey) -> AgentKeyring {
        AgentKeyring::new(key, Vec::new())
    }

    fn signer() -> OperationSigner {
        OperationSigner::from_master_key(&KeyBytes::from_slice(&[7u8; 32]).unwrap())
    }

    fn seal(to: &[AgentPublicKey], plaintext: &[u8]) -> Vec<u8> {
        seal_to(to, &signer(), &binding(), plaintext).unwrap()
    }

    fn open(ring: &AgentKeyring, b: &Binding<'_>, env: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        ring.open(&[signer().public_key()], b, KEY_VERSION, env)
            .map(|p| p.to_vec())
    }

    #[test]
    fn every_recipient_opens_and_nobody_else() {
        let (a, b) = (AgentKey::generate().unwrap(), AgentKey::generate().unwrap());
        let env = seal(&[a.public().clone(), b.public().clone()], b"secret payload");
        assert!(
            !env.windows(6).any(|w| w == b"secret"),
            "ciphertext leaks plaintext"
        );
        assert_eq!(
            recipient_ids(&env).unwrap(),
            vec![a.public().id().to_owned(), b.public().id().to_owned()]
        );
        for k in [a, b] {
            assert_eq!(
                open(&ring_of(k), &binding(), &env).unwrap(),
                b"secret payload"
            );
        }
        let outsider = ring_of(AgentKey::generate().unwrap());
        assert!(matches!(
            open(&outsider, &binding(), &env),
            Err(EnvelopeError::NotARecipient { .. })
        ));
    }

    #[test]
    fn an_outsider_claiming_a_recipients_key_id_cannot_open() {
        // Key ids are public: an agent holding another key under a copied id must still fail.
        let a = AgentKey::generate().unwrap();
        let env = seal(&[a.public().clone()], b"x");
        let mut impostor = AgentKey::generate().unwrap();
        impostor.public.id = a.public().id().to_owned();
        assert_eq!(
            open(&ring_of(impostor), &binding(), &env).unwrap_err(),
            EnvelopeError::Unauthentic
        );
    }

    #[test]
    fn older_keys_open_only_what_was_sealed_to_them() {
        let old = AgentKey::generate().unwrap();
        let env_old = seal(&[old.public().clone()], b"old");
        let old_secret = old.secret_bytes();
        let new = AgentKey::generate().unwrap();
        let env_new = seal(&[new.public().clone()], b"new");
        let rotated = AgentKeyring::new(new, vec![AgentKey::from_secret(&old_secret).unwrap()]);
        assert_eq!(open(&rotated, &binding(), &env_old).unwrap(), b"old");
        assert_eq!(open(&rotated, &binding(), &env_new).unwrap(), b"new");
        let only_old = ring_of(AgentKey::from_secret(&old_secret).unwrap());
        assert!(open(&only_old, &binding(), &env_new).is_err());
    }

    #[test]
    fn any_moved_binding_fails_to_open() {
        let key = AgentKey::generate().unwrap();
        let env = seal(&[key.public().clone()], b"x");
        let ring = ring_of(key);
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
        // The signature covers the binding too: a moved envelope is refused before opening.
        for b in moved {
            assert_eq!(
                open(&ring, &b, &env).unwrap_err(),
                EnvelopeError::Forged,
                "{b:?}"
            );
        }
        let mut tampered = SealedEnvelope::decode(env.as_slice()).unwrap();
        *tampered.ciphertext.last_mut().unwrap() ^= 1;
        assert_eq!(
            open(&ring, &binding(), &tampered.encode_to_vec()).unwrap_err(),
            EnvelopeError::Forged
        );
        let mut rewrapped = SealedEnvelope::decode(env.as_slice()).unwrap();
        *rewrapped.keys[0].wrapped_key.last_mut().unwrap() ^= 1;
        assert_eq!(
            open(&ring, &binding(), &rewrapped.encode_to_vec()).unwrap_err(),
            EnvelopeError::Unauthentic
        );
        assert_eq!(
            ring.open(&[signer().public_key()], &binding(), 1, &env)
                .unwrap_err(),
            EnvelopeError::UnsupportedVersion(1)
        );
        assert!(matches!(
            open(&ring, &binding(), &env[..10]),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn an_envelope_sealed_to_an_agent_by_anyone_but_the_gateway_is_refused() {
        // The agent's public key is no secret: whoever reads it from Redis can seal to it.
        let key = AgentKey::generate().unwrap();
        let ring = ring_of(key);
        let forger = OperationSigner::from_master_key(&KeyBytes::from_slice(&[9u8; 32]).unwrap());
        let env = seal_to(
            &[ring.current().public().clone()],
            &forger,
            &binding(),
            b"attacker's choice",
        )
        .unwrap();
        assert_eq!(
            open(&ring, &binding(), &env).unwrap_err(),
            EnvelopeError::Forged
        );
        let mut unsigned = SealedEnvelope::decode(env.as_slice()).unwrap();
        unsigned.signature.clear();
        assert_eq!(
            open(&ring, &binding(), &unsigned.encode_to_vec()).unwrap_err(),
            EnvelopeError::Forged
        );
        // The same master key gives the same signer on every replica.
        assert_eq!(
            signer().public_key(),
            OperationSigner::from_master_key(&KeyBytes::from_slice(&[7u8; 32]).unwrap())
                .public_key()
        );
    }

    #[test]
    fn weak_and_empty_recipients_are_refused() {
        let zero = AgentPublicKey::from_bytes(&[0u8; 32]).unwrap();
        assert_eq!(
            seal_to(&[zero], &signer(), &binding(), b"x").unwrap_err(),
            EnvelopeError::WeakKey
        );
        assert_eq!(
            seal_to(&[], &signer(), &binding(), b"x").unwrap_err(),
            EnvelopeError::NoRecipients
        );
        assert_eq!(
            AgentPublicKey::from_bytes(&[1u8; 31]).unwrap_err(),
            EnvelopeError::BadKeyLength(31)
        );
    }

    #[test]
    fn debug_never_shows_key_material() {
        let k = KeyBytes::from_slice(&[0xAB; 32]).unwrap();
        assert_eq!(format!("{k:?}"), "KeyBytes([redacted])");
        let a = AgentKey::from_secret(&k).unwrap();
        let shown = format!("{a:?}");
        assert!(!shown.contains("ab, ab") && !shown.to_lowercase().contains("abab"));
        assert!(shown.contains(a.public().id()));
    }
}
