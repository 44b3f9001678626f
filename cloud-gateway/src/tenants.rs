//! Tenants and agent credentials: bearer tokens and agent secrets stored only as SHA-256
//! hashes, every record that admits someone (or names a key passwords are sealed to) MACed under
//! a key derived from the master key, and per-forest operator switches.

use std::sync::Arc;

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};

use relay::envelope::{self, AgentPublicKey, KeyBytes, OperationSigner};
use relay::scope::Scope;
use relay::secret::Secret;

use crate::store::{AgentEvent, ForestId, Store, StoreError, TenantId};

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unknown tenant {0:?}")]
    UnknownTenant(String),
    #[error("no agent {0:?} is registered for this tenant")]
    UnknownAgent(String),
    #[error("{0}")]
    Crypto(#[from] envelope::EnvelopeError),
}

impl From<redis::RedisError> for TenantError {
    fn from(e: redis::RedisError) -> Self {
        Self::Store(StoreError::Redis(e))
    }
}

/// Why an agent's credential was refused; the agent is told which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentRefusal {
    #[error("the agent credential is malformed: expected `Bearer <agent id>.<secret>`")]
    Malformed,
    #[error("unknown agent {0:?}: no credential is registered under that id (register it with `cloud-gateway admin register-agent`)")]
    UnknownAgent(String),
    /// No agent of that id holds the secret presented. Which tenants have an agent of that id
    /// is not told.
    #[error("no agent {0:?} holds this secret: the agent id or the secret is mistyped, the secret was rotated, or the agent is not registered (register it with `cloud-gateway admin register-agent`)")]
    NoSuchSecret(String),
    #[error("wrong secret for agent {0:?}: the credential was rotated or mistyped")]
    WrongSecret(String),
    #[error("unknown agent {0:?}: its credential record was not written by this gateway (register it again with `cloud-gateway admin register-agent`)")]
    Unsealed(String),
    #[error("agent {agent_id:?} was revoked (at {revoked_at_unix_ms} Unix ms): it may not connect; register it again with `cloud-gateway admin register-agent` if that was a mistake")]
    Revoked {
        agent_id: String,
        revoked_at_unix_ms: i64,
    },
    #[error("agent {agent_id:?} announced sealing key {announced}, but its certificate is bound to sealing key {bound}: a certificate copied without its sealing-key file, or a key rotated outside renewal; enroll the agent again if its keys were lost")]
    UnboundSealingKey {
        agent_id: String,
        announced: String,
        bound: String,
    },
}

/// What [`Tenants::remac_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Remacked {
    /// Records now MACed under the current master key.
    pub records: usize,
    /// Records that verified under neither key (left as they were: they admit nobody).
    pub unverified: usize,
}

/// One registered agent, for `admin list-agents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredAgent {
    pub agent_id: String,
    pub forest: String,
    /// When it was revoked, if it was.
    pub revoked_at_unix_ms: Option<i64>,
    /// Its instances heard from recently (`instance|replica`).
    pub live: Vec<String>,
}

/// What an authenticated agent may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub tenant: TenantId,
    pub forest: ForestId,
    /// The hash of the secret it authenticated with: its streams close when the credential
    /// no longer has it (revoked or rotated).
    pub secret_sha256: String,
    /// The sealing key its certificate is bound to (enrolled agents): its streams must
    /// announce that key.
    pub sealing_key_id: Option<String>,
}

/// Per-(tenant, forest) operator switches, as on the admin page of today's products.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForestSettings {
    /// "Write back passwords to your on-premises directory". Off: every request is refused
    /// with `NOT_ENABLED` at once, nothing queued.
    pub writeback_enabled: bool,
    /// "Allow users to unlock accounts without resetting their password". Off: unlock-only
    /// requests are refused with `NOT_ENABLED`.
    pub unlock_enabled: bool,
    /// Apply operations to members of protected groups (adminCount=1).
    pub allow_protected_accounts: bool,
    /// The users writeback may touch ("users in scope" in today's products); the agent's own
    /// local scope narrows it further.
    pub scope: Scope,
}

/// What a forest-switch record's MAC covers: tenant, forest, the flags and, unless the record
/// predates scopes (`None`), the scope as stored.
fn forest_fields<'a>(
    tenant: &'a TenantId,
    forest: &'a ForestId,
    flags: &[&'a str; 3],
    scope: Option<&'a str>,
) -> Vec<&'a str> {
    let mut f = vec![tenant.as_str(), forest.as_str()];
    f.extend(flags);
    f.extend(scope);
    f
}

/// A scope as stored in the forest record: empty for every user, else JSON of the DNs.
fn stored_scope(scope: &Scope) -> String {
    if scope.is_all() {
        return String::new();
    }
    let p = scope.to_proto();
    serde_json::to_string(&(p.ous, p.groups)).expect("strings serialize")
}

/// The scope of a verified record (its MAC covered this text).
fn parse_stored_scope(text: &str) -> Option<Scope> {
    if text.is_empty() {
        return Some(Scope::default());
    }
    let (ous, groups): (Vec<String>, Vec<String>) = serde_json::from_str(text).ok()?;
    Scope::parse(&ous, &groups, "scope OU", "scope group").ok()
}

/// The stored names of [`ForestSettings`]' switches, in MAC order.
const FOREST_SWITCHES: [&str; 3] = [
    "writeback_enabled",
    "unlock_enabled",
    "allow_protected_accounts",
];

impl ForestSettings {
    /// The switches as stored ("0"/"1"), in [`FOREST_SWITCHES`] order.
    fn flags(&self) -> [&'static str; 3] {
        let f = |b: bool| if b { "1" } else { "0" };
        [
            f(self.writeback_enabled),
            f(self.unlock_enabled),
            f(self.allow_protected_accounts),
        ]
    }
}

impl Default for ForestSettings {
    /// A forest with registered agents writes back, for every user; protected accounts stay
    /// refused.
    fn default() -> Self {
        Self {
            writeback_enabled: true,
            unlock_enabled: true,
            allow_protected_accounts: false,
            scope: Scope::default(),
        }
    }
}

impl ForestSettings {
    /// The switches and scope as sealed into each operation.
    pub fn sealed_switches(&self) -> relay::proto::ForestSwitches {
        relay::proto::ForestSwitches {
            allow_protected_accounts: self.allow_protected_accounts,
            unlock_enabled: self.unlock_enabled,
            scope: (!self.scope.is_all()).then(|| self.scope.to_proto()),
        }
    }
}

/// A change to some of a forest's switches (`None` leaves one as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForestSettingsChange {
    pub writeback_enabled: Option<bool>,
    pub unlock_enabled: Option<bool>,
    pub allow_protected_accounts: Option<bool>,
    /// A new scope (an empty one: every user).
    pub scope: Option<Scope>,
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

fn random_secret(prefix: &str) -> Result<Secret, TenantError> {
    let mut b = [0u8; 32];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| envelope::EnvelopeError::Rng)?;
    let s = Secret::new(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    ));
    zeroize::Zeroize::zeroize(&mut b);
    Ok(s)
}

fn mac_with(key: &ring::hmac::Key, kind: &str, fields: &[&str]) -> String {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(kind.as_bytes());
    for f in fields {
        ctx.update(b"\0");
        ctx.update(f.as_bytes());
    }
    hex::encode(ctx.sign().as_ref())
}

/// Constant-time equality of two byte strings of public length.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Creates tenants and credentials for the admin commands; authenticates callers and agents;
/// finds the keys an operation is sealed to.
///
/// Redis is storage, not a trust root: the records that admit a caller or an agent (a token's
/// tenant, an agent's tenant, forest and secret hash) carry a MAC under a key derived from the
/// master key, and a record whose MAC does not verify (written by someone with access to
/// Redis only, or moved to another key) admits nobody (event WB1093).
#[derive(Clone)]
pub struct Tenants {
    store: Store,
    /// The record MAC key of the master key, then of the previous one during a rotation.
    records: Arc<Vec<ring::hmac::Key>>,
    /// Signs with the current master key's signer; agents also accept the previous one's
    /// during a rotation (work queued before it).
    signers: Arc<Vec<OperationSigner>>,
}

fn record_key(master_key: &KeyBytes) -> ring::hmac::Key {
    // The master key's HMAC of a fixed label, never stored.
    let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, master_key.expose());
    let key = ring::hmac::sign(&derive, b"writeback.v1 record mac key");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_ref())
}

/// Which record a MAC seals (domain separation).
const TOKEN_RECORD: &str = "writeback.v1 token record";
const AGENT_RECORD: &str = "writeback.v1 agent credential record";
const SEALING_KEY_RECORD: &str = "writeback.v2 agent sealing key record";
const FOREST_RECORD: &str = "writeback.v2 forest switches record";
const ENROLLMENT_RECORD: &str = "writeback.v2 enrollment token record";

impl Tenants {
    /// Records and operations under `master_key`. The master key opens no password:
    /// operations are sealed to the agents' own keys.
    pub fn new(store: Store, master_key: KeyBytes) -> Self {
        Self::rotating(store, master_key, None)
    }

    /// As [`Tenants::new`], during a master-key rotation: records MACed under `previous` are
    /// still accepted (and re-MACed by `admin rotate-master-key`), work signed under it still
    /// opens at the agents; everything new is MACed and signed under `master_key`.
    pub fn rotating(store: Store, master_key: KeyBytes, previous: Option<KeyBytes>) -> Self {
        let keys: Vec<&KeyBytes> = std::iter::once(&master_key)
            .chain(previous.as_ref())
            .collect();
        Self {
            store,
            records: Arc::new(keys.iter().map(|k| record_key(k)).collect()),
            signers: Arc::new(
                keys.iter()
                    .map(|k| OperationSigner::from_master_key(k))
                    .collect(),
            ),
        }
    }

    /// The MAC of a record under the current master key: its kind and its fields,
    /// NUL-separated (no field holds a NUL).
    fn seal(&self, kind: &str, fields: &[&str]) -> String {
        mac_with(&self.records[0], kind, fields)
    }

    /// Whether `mac` is the record's MAC under the current master key or, during a rotation,
    /// the previous one.
    fn sealed(&self, kind: &str, fields: &[&str], mac: &str) -> bool {
        self.records
            .iter()
            .any(|k| ct_eq(mac_with(k, kind, fields).as_bytes(), mac.as_bytes()))
    }

    /// Creates a tenant (or rotates its token when it exists) and returns the new bearer token.
    /// The first tenant also writes the store marker (see [`Store::init_epoch`]).
    ///
    /// # Errors
    /// On Redis or crypto errors.
    pub async fn create_tenant(&self, tenant: &TenantId) -> Result<Secret, TenantError> {
        self.store.init_epoch().await?;
        let old_token = self.store.tenant_token(tenant).await?;
        self.store.register_tenant(tenant).await?;
        let token = random_secret("wbt_")?;
        let hash = sha256_hex(token.expose().as_bytes());
        let mac = self.seal(TOKEN_RECORD, &[&hash, tenant.as_str()]);
        self.store
            .set_tenant_token(tenant, &hash, &mac, old_token.as_deref())
            .await?;
        Ok(token)
    }

    /// Whether the tenant exists.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn exists(&self, tenant: &TenantId) -> Result<bool, TenantError> {
        Ok(self.store.tenant_exists(tenant).await?)
    }

    /// Registers (or rotates) an agent credential for one tenant's forest; returns the secret.
    ///
    /// # Errors
    /// When the tenant does not exist, or on Redis errors.
    pub async fn register_agent(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        agent_id: &str,
    ) -> Result<Secret, TenantError> {
        let secret = random_secret("wba_")?;
        let hash = sha256_hex(secret.expose().as_bytes());
        self.put_credential(tenant, forest, agent_id, &hash).await?;
        Ok(secret)
    }

    /// Writes an agent's credential record (`credential`: its secret's hash, or
    /// `cert:<enrollment>`), replacing the agent's earlier one, and closes the streams that
    /// authenticated with that one, on every replica. Agent ids are the tenant's own: another
    /// tenant's agent of the same id is a different agent, left alone.
    async fn put_credential(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        agent_id: &str,
        credential: &str,
    ) -> Result<(), TenantError> {
        self.must_exist(tenant).await?;
        let mac = self.seal(
            AGENT_RECORD,
            &[agent_id, tenant.as_str(), forest.as_str(), credential],
        );
        self.store
            .put_agent_credential(tenant, agent_id, forest, credential, &mac)
            .await?;
        // A rotation cuts off whoever holds the old secret, at once, on every replica.
        if let Err(e) = self
            .store
            .publish_agent_event(&AgentEvent::Revoke {
                tenant: tenant.clone(),
                agent_id: agent_id.to_owned(),
            })
            .await
        {
            tracing::warn!(error = %e, %agent_id, "could not tell the replicas to close the agent's streams; each closes them at its next credential check");
        }
        Ok(())
    }

    async fn must_exist(&self, tenant: &TenantId) -> Result<(), TenantError> {
        if !self.exists(tenant).await? {
            return Err(TenantError::UnknownTenant(tenant.to_string()));
        }
        Ok(())
    }

    /// A one-time enrollment token for `agent_id` of (tenant, forest), valid for `ttl`
    /// (`admin enroll-agent`). The agent trades it for a client certificate.
    ///
    /// # Errors
    /// When the tenant does not exist, or on Redis errors.
    pub async fn create_enrollment(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        agent_id: &str,
        ttl: std::time::Duration,
    ) -> Result<Secret, TenantError> {
        self.must_exist(tenant).await?;
        let token = random_secret("wbe_")?;
        let hash = sha256_hex(token.expose().as_bytes());
        let expires = (relay::now_unix_ms() + ttl.as_millis() as i64).to_string();
        let fields = [tenant.as_str(), forest.as_str(), agent_id, &expires];
        let mac = self.seal(ENROLLMENT_RECORD, &[&[hash.as_str()][..], &fields].concat());
        let record = [&fields[..], &[mac.as_str()]].concat().join(" ");
        self.store.put_enrollment(&hash, &record, ttl).await?;
        Ok(token)
    }

    /// Takes an enrollment token (it works once): who it enrolls, or `None` when it is
    /// unknown, used, expired or its record was not written by this gateway.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn redeem_enrollment(
        &self,
        token: &str,
    ) -> Result<Option<(TenantId, ForestId, String)>, TenantError> {
        let hash = sha256_hex(token.as_bytes());
        let Some(record) = self.store.take_enrollment(&hash).await? else {
            return Ok(None);
        };
        let parts: Vec<&str> = record.split(' ').collect();
        let [tenant, forest, agent_id, expires, mac] = parts[..] else {
            return Ok(None);
        };
        if !self.sealed(
            ENROLLMENT_RECORD,
            &[&hash, tenant, forest, agent_id, expires],
            mac,
        ) {
            tracing::error!(event = "WB1093", %tenant, %agent_id, record = "enrollment token", "an enrollment token record whose MAC does not verify: refused");
            return Ok(None);
        }
        if expires.parse::<i64>().unwrap_or(0) < relay::now_unix_ms() {
            return Ok(None);
        }
        // Written by `create_enrollment` from checked ids.
        Ok(Some((
            TenantId::from_store(tenant.to_owned()),
            ForestId::from_store(forest.to_owned()),
            agent_id.to_owned(),
        )))
    }

    /// Records an agent's enrollment: its credential becomes the certificate naming
    /// `who.enrollment` (an earlier secret or certificate stops working at once).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn put_enrolled_agent(
        &self,
        who: &crate::enroll::EnrolledName,
    ) -> Result<(), TenantError> {
        self.put_credential(&who.tenant, &who.forest, &who.agent_id, &who.credential())
            .await
    }

    /// The identity of an agent presenting an enrolled certificate naming `who`, or why it
    /// is refused (revoked, enrolled again since).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn authenticate_enrolled(
        &self,
        who: &crate::enroll::EnrolledName,
    ) -> Result<Result<AgentIdentity, AgentRefusal>, TenantError> {
        let identity = self
            .check_credential(&who.tenant, &who.agent_id, &who.credential())
            .await?;
        Ok(identity.and_then(|id| {
            if id.tenant == who.tenant && id.forest == who.forest {
                Ok(AgentIdentity {
                    sealing_key_id: who.sealing_key_id.clone(),
                    ..id
                })
            } else {
                Err(AgentRefusal::WrongSecret(who.agent_id.clone()))
            }
        }))
    }

    /// Revokes an agent of `tenant`: its credential admits nobody (it is told it was
    /// revoked), and its open streams close on every replica within a second.
    ///
    /// # Errors
    /// When no agent of that id belongs to the tenant, or on Redis errors.
    pub async fn revoke_agent(&self, tenant: &TenantId, agent_id: &str) -> Result<(), TenantError> {
        let h = self.store.agent_credential(tenant, agent_id).await?;
        let Some(forest) = h.get("forest") else {
            return Err(TenantError::UnknownAgent(agent_id.to_owned()));
        };
        self.store
            .revoke_agent_credential(tenant, agent_id, &ForestId::from_store(forest.clone()))
            .await?;
        self.store
            .publish_agent_event(&AgentEvent::Revoke {
                tenant: tenant.clone(),
                agent_id: agent_id.to_owned(),
            })
            .await?;
        tracing::warn!(event = "WB1017", %tenant, %agent_id, "agent revoked");
        Ok(())
    }

    /// The agents registered for `tenant`, with their state and live instances.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn list_agents(
        &self,
        tenant: &TenantId,
        liveness: std::time::Duration,
    ) -> Result<Vec<RegisteredAgent>, TenantError> {
        let mut out = Vec::new();
        for agent_id in self.store.agent_ids(tenant).await? {
            let h = self.store.agent_credential(tenant, &agent_id).await?;
            let Some(forest) = h.get("forest") else {
                continue;
            };
            let forest_id = ForestId::from_store(forest.clone());
            let live = self
                .store
                .live_agent_members(tenant, &forest_id, liveness)
                .await?
                .into_iter()
                .filter_map(|m| m.strip_prefix(&format!("{agent_id}|")).map(str::to_owned))
                .collect();
            out.push(RegisteredAgent {
                agent_id,
                forest: forest.clone(),
                revoked_at_unix_ms: h.get("revoked_at").and_then(|t| t.parse().ok()),
                live,
            });
        }
        Ok(out)
    }

    /// Whether `identity`'s credential still stands as it authenticated (not revoked, not
    /// rotated).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn credential_current(&self, identity: &AgentIdentity) -> Result<bool, TenantError> {
        let h = self
            .store
            .agent_credential(&identity.tenant, &identity.agent_id)
            .await?;
        Ok(!h.contains_key("revoked_at")
            && h.get("secret_sha256").map(String::as_str) == Some(identity.secret_sha256.as_str()))
    }

    /// Changes some of a forest's operator switches; returns them all afterwards. The record
    /// is MACed, so a switch flipped in Redis by someone without the master key is not obeyed.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn set_forest(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        change: &ForestSettingsChange,
    ) -> Result<ForestSettings, TenantError> {
        // A record that does not verify is replaced, starting from the defaults.
        let now = self
            .stored_forest(tenant, forest)
            .await?
            .unwrap_or_default();
        let next = ForestSettings {
            writeback_enabled: change.writeback_enabled.unwrap_or(now.writeback_enabled),
            unlock_enabled: change.unlock_enabled.unwrap_or(now.unlock_enabled),
            allow_protected_accounts: change
                .allow_protected_accounts
                .unwrap_or(now.allow_protected_accounts),
            scope: change.scope.clone().unwrap_or(now.scope),
        };
        if *change != ForestSettingsChange::default() {
            self.write_forest(tenant, forest, &next).await?;
        }
        self.forest(tenant, forest).await
    }

    /// Stores a forest's switches and scope, MACed under the current master key.
    async fn write_forest(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        settings: &ForestSettings,
    ) -> Result<(), TenantError> {
        let flags = settings.flags();
        let scope = stored_scope(&settings.scope);
        let mac = self.seal(
            FOREST_RECORD,
            &forest_fields(tenant, forest, &flags, Some(&scope)),
        );
        let mut fields: Vec<(&str, String)> = FOREST_SWITCHES
            .iter()
            .zip(flags)
            .map(|(k, v)| (*k, v.to_owned()))
            .collect();
        fields.push(("scope", scope));
        fields.push(("mac", mac));
        self.store
            .set_forest_switches(tenant, forest, &fields)
            .await?;
        Ok(())
    }

    /// Reads a forest's operator switches (defaults when never set). A record whose MAC does
    /// not verify (written in Redis by someone without the master key) is not obeyed: the
    /// forest is treated as switched off (WB1093) until an admin sets it again.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn forest(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
    ) -> Result<ForestSettings, TenantError> {
        Ok(self
            .stored_forest(tenant, forest)
            .await?
            .unwrap_or(ForestSettings {
                writeback_enabled: false,
                unlock_enabled: false,
                allow_protected_accounts: false,
                scope: Scope::default(),
            }))
    }

    /// The forest's switches as stored; `None` when the record's MAC does not verify.
    async fn stored_forest(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
    ) -> Result<Option<ForestSettings>, TenantError> {
        let h = self.store.forest_switches(tenant, forest).await?;
        if h.is_empty() {
            return Ok(Some(ForestSettings::default()));
        }
        let flag = |name: &str| h.get(name).map(String::as_str);
        let stored = [
            flag(FOREST_SWITCHES[0]).unwrap_or(""),
            flag(FOREST_SWITCHES[1]).unwrap_or(""),
            flag(FOREST_SWITCHES[2]).unwrap_or(""),
        ];
        let mac = flag("mac").unwrap_or("");
        // A record written before scopes has no `scope` field (and every user in scope); a
        // field removed from a newer record breaks its MAC.
        let scope_text = flag("scope");
        let scope = scope_text.and_then(parse_stored_scope);
        if !self.sealed(
            FOREST_RECORD,
            &forest_fields(tenant, forest, &stored, scope_text),
            mac,
        ) || (scope_text.is_some() && scope.is_none())
        {
            tracing::error!(event = "WB1093", %tenant, %forest, record = "forest switches", "a forest-switch record whose MAC does not verify (not written by a gateway with this master key): writeback treated as switched off for this forest; set it again with `admin set-forest`");
            return Ok(None);
        }
        Ok(Some(ForestSettings {
            writeback_enabled: stored[0] == "1",
            unlock_enabled: stored[1] == "1",
            allow_protected_accounts: stored[2] == "1",
            scope: scope.unwrap_or_default(),
        }))
    }

    /// The tenant a bearer token belongs to, if any.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn tenant_for_token(&self, token: &str) -> Result<Option<TenantId>, TenantError> {
        let hash = sha256_hex(token.as_bytes());
        let Some((tenant, mac)) = self.store.token_tenant(&hash).await? else {
            return Ok(None);
        };
        if !self.sealed(TOKEN_RECORD, &[&hash, tenant.as_str()], &mac) {
            tracing::error!(event = "WB1093", %tenant, record = "token", "a token record whose MAC does not verify (not written by a gateway with this master key): refused");
            return Ok(None);
        }
        Ok(Some(tenant))
    }

    /// Verifies `<agent_id>.<secret>`; returns who the agent is, or why it is refused. The
    /// secret (`wba_` and base64url: no `.`) is what is after the last `.`, so an agent id may
    /// hold dots; its hash finds the tenant (agent ids are per tenant).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn authenticate_agent(
        &self,
        credential: &str,
    ) -> Result<Result<AgentIdentity, AgentRefusal>, TenantError> {
        let Some((agent_id, secret)) = credential.rsplit_once('.') else {
            return Ok(Err(AgentRefusal::Malformed));
        };
        if agent_id.is_empty() || secret.is_empty() {
            return Ok(Err(AgentRefusal::Malformed));
        }
        let hash = sha256_hex(secret.as_bytes());
        let Some(tenant) = self.store.agent_secret_tenant(&hash, agent_id).await? else {
            return Ok(Err(AgentRefusal::NoSuchSecret(agent_id.to_owned())));
        };
        self.check_credential(&tenant, agent_id, &hash).await
    }

    /// Checks `presented` (a secret's hash, or `cert:<enrollment>`) against the credential
    /// record of `tenant`'s agent `agent_id`.
    async fn check_credential(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        presented: &str,
    ) -> Result<Result<AgentIdentity, AgentRefusal>, TenantError> {
        let h = self.store.agent_credential(tenant, agent_id).await?;
        if let Some(at) = h.get("revoked_at") {
            return Ok(Err(AgentRefusal::Revoked {
                agent_id: agent_id.to_owned(),
                revoked_at_unix_ms: at.parse().unwrap_or(0),
            }));
        }
        let (Some(owner), Some(forest), Some(expected)) =
            (h.get("tenant"), h.get("forest"), h.get("secret_sha256"))
        else {
            return Ok(Err(AgentRefusal::UnknownAgent(agent_id.to_owned())));
        };
        let mac = h.get("mac").map_or("", String::as_str);
        // A record copied under another tenant's key names its own tenant in its MAC.
        if owner != tenant.as_str()
            || !self.sealed(AGENT_RECORD, &[agent_id, owner, forest, expected], mac)
        {
            tracing::error!(event = "WB1093", %agent_id, %tenant, %forest, record = "agent credential", "an agent credential record whose MAC does not verify (not written by a gateway with this master key): refused");
            return Ok(Err(AgentRefusal::Unsealed(agent_id.to_owned())));
        }
        if !ct_eq(presented.as_bytes(), expected.as_bytes()) {
            return Ok(Err(AgentRefusal::WrongSecret(agent_id.to_owned())));
        }
        // Written by `register_agent`, whose ids were checked.
        Ok(Ok(AgentIdentity {
            agent_id: agent_id.to_owned(),
            tenant: tenant.clone(),
            forest: ForestId::from_store(forest.clone()),
            secret_sha256: expected.clone(),
            sealing_key_id: None,
        }))
    }

    /// What signs every envelope (agents refuse one it did not sign).
    pub fn signer(&self) -> &OperationSigner {
        &self.signers[0]
    }

    /// The public keys agents accept envelopes from: the current signer's, then the previous
    /// master key's during a rotation.
    pub fn signing_keys(&self) -> Vec<[u8; 32]> {
        self.signers
            .iter()
            .map(OperationSigner::public_key)
            .collect()
    }

    /// Re-MACs every record that admits someone (tokens, agent credentials, forest switches)
    /// under the current master key (`admin rotate-master-key`). A record that verifies under
    /// neither key is left as it is and counted. Sealing-key records are rewritten by their
    /// sessions within a third of the liveness window; enrollment tokens expire (issue new
    /// ones after a rotation).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn remac_all(&self) -> Result<Remacked, TenantError> {
        let mut done = Remacked::default();
        for tenant in self.store.tenant_ids().await? {
            if let Some(hash) = self.store.tenant_token(&tenant).await? {
                match self.store.token_tenant(&hash).await? {
                    Some((owner, mac))
                        if owner == tenant
                            && self.sealed(TOKEN_RECORD, &[&hash, tenant.as_str()], &mac) =>
                    {
                        let mac = self.seal(TOKEN_RECORD, &[&hash, tenant.as_str()]);
                        self.store
                            .set_tenant_token(&tenant, &hash, &mac, None)
                            .await?;
                        done.records += 1;
                    }
                    _ => done.unverified += 1,
                }
            }
            for agent_id in self.store.agent_ids(&tenant).await? {
                let h = self.store.agent_credential(&tenant, &agent_id).await?;
                let (Some(owner), Some(forest), Some(credential)) =
                    (h.get("tenant"), h.get("forest"), h.get("secret_sha256"))
                else {
                    continue; // revoked: a tombstone admits nobody, MAC or not
                };
                if owner != tenant.as_str() {
                    continue;
                }
                let fields = [agent_id.as_str(), owner, forest, credential];
                if self.sealed(
                    AGENT_RECORD,
                    &fields,
                    h.get("mac").map_or("", String::as_str),
                ) {
                    let mac = self.seal(AGENT_RECORD, &fields);
                    self.store
                        .put_agent_credential(
                            &tenant,
                            &agent_id,
                            &ForestId::from_store(forest.clone()),
                            credential,
                            &mac,
                        )
                        .await?;
                    done.records += 1;
                } else {
                    done.unverified += 1;
                }
            }
            for forest in self.store.forests(&tenant).await? {
                if self
                    .store
                    .forest_switches(&tenant, &forest)
                    .await?
                    .is_empty()
                {
                    continue;
                }
                match self.stored_forest(&tenant, &forest).await? {
                    Some(settings) => {
                        self.write_forest(&tenant, &forest, &settings).await?;
                        done.records += 1;
                    }
                    None => done.unverified += 1,
                }
            }
        }
        Ok(done)
    }

    /// The MAC of an agent instance's sealing-key record: a key planted in Redis by someone
    /// without the master key is never sealed to.
    pub fn sealing_key_mac(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        member: &str,
        key: &AgentPublicKey,
    ) -> String {
        let key_hex = hex::encode(key.as_bytes());
        self.seal(
            SEALING_KEY_RECORD,
            &[tenant.as_str(), forest.as_str(), member, &key_hex],
        )
    }

    /// The sealing keys of (tenant, forest)'s agent instances heard from within `liveness`:
    /// what a new operation is sealed to. Records whose MAC does not verify are skipped
    /// (event WB1093); a revoked agent's records are deleted when it is revoked.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn recipients(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        liveness: std::time::Duration,
    ) -> Result<Vec<AgentPublicKey>, TenantError> {
        let members = self
            .store
            .live_agent_members(tenant, forest, liveness)
            .await?;
        let records = self
            .store
            .agent_sealing_keys(tenant, forest, &members)
            .await?;
        let mut keys: Vec<AgentPublicKey> = Vec::with_capacity(members.len());
        for (member, record) in members.iter().zip(records) {
            let Some((key_hex, mac)) = record else {
                continue;
            };
            let key = hex::decode(&key_hex)
                .ok()
                .and_then(|b| AgentPublicKey::from_bytes(&b).ok());
            match key {
                Some(key)
                    if self.sealed(
                        SEALING_KEY_RECORD,
                        &[tenant.as_str(), forest.as_str(), member, &key_hex],
                        &mac,
                    ) =>
                {
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                }
                _ => {
                    tracing::error!(event = "WB1093", %tenant, %forest, %member, record = "agent sealing key", "an agent sealing-key record whose MAC does not verify (not written by a gateway with this master key): not sealed to");
                }
            }
        }
        keys.truncate(envelope::MAX_RECIPIENTS);
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn secrets_are_random_and_prefixed() {
        let a = random_secret("wbt_").unwrap();
        let b = random_secret("wbt_").unwrap();
        assert!(a.expose().starts_with("wbt_") && a.expose().len() > 40);
        assert_ne!(a, b);
    }
}
