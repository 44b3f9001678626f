//! Every Redis key the gateway uses, in one place.
//!
//! `{T}` is the tenant id as a Redis Cluster hash tag: every key of one tenant (all of its
//! forests' queues, records and indexes) lives in one hash slot, so each Lua script touches one
//! slot. Cross-tenant data is limited to the tenant registry (`wb:tenants`), the store marker
//! (`wb:meta`), token and agent-secret lookups (one key each) and pub/sub channels.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `wb:meta` | hash | store marker: `epoch` (random, set by `admin create-tenant`), `created` |
//! | `wb:tenants` | set | every tenant id (the sweeper and queue monitor walk it; no SCAN) |
//! | `wb:tenant:{T}` | hash | wrapped tenant key, token hash |
//! | `wb:token:<sha256>` | string | tenant id for a bearer token hash |
//! | `wb:enroll:<sha256>` | string | a one-time enrollment token's tenant, forest, agent id, expiry and MAC (expires with it; taken with GETDEL) |
//! | `wb:{T}:rate` | string | the tenant's shared rate (GCRA theoretical arrival time, µs) |
//! | `wb:{T}:budget:<guess\|unlock>:<forest>:<user>` | string | a user's guess or unlock budget in its window |
//! | `wb:{T}:agentcred:<agent id>` | hash | tenant, forest, secret hash (or `cert:<enrollment>` for an enrolled agent), MAC; or tenant, forest, `revoked_at` (and the revoked secret's hash) once revoked. Agent ids are the tenant's own: two tenants may both have an agent `dc1` |
//! | `wb:agentsecret:<sha256>` | string | the tenant whose agent holds the secret of that hash (finds the record for `Bearer <agent id>.<secret>`; a planted one leads only to a record that must still verify) |
//! | `wb:agentcred:<agent id>` | hash | legacy (before per-tenant ids): read when the tenant's own record is missing, removed when the agent is registered, enrolled, revoked or re-MACed |
//! | `wb:{T}:agent-ids` | set | the agent ids registered for the tenant |
//! | `wb:{T}:forest:<forest>` | hash | per-forest operator switches |
//! | `wb:{T}:op:<op id>` | hash | operation record (never a password) |
//! | `wb:{T}:tl:<op id>` | list | timeline events (JSON) |
//! | `wb:{T}:q:<forest>` | stream | sealed operations still to settle; consumer group `agents` |
//! | `wb:{T}:deadlines` | zset | `forest\0op` scored by deadline, for the deadline sweeper (one member per unsettled operation: its size is the tenant's queue depth) |
//! | `wb:{T}:seq` | string | the tenant's store sequence: +1 per accepted operation; replicas and agents remember the highest they saw, so a store restored from an older state is caught |
//! | `wb:{T}:agents:<forest>` | zset | live agent instances, scored by last heartbeat |
//! | `wb:{T}:policy:<forest>:<user>` | string | cached `PasswordPolicy` (short TTL) |
//! | `wb:{T}:forests` | set | forests the tenant has registered agents for |
//! | `wb:{T}:agent:<forest>:<member>` | hash | an agent instance's version, replica, heartbeat, in-flight |
//! | `wb:{T}:health:<forest>` | hash | the forest's last end-to-end canary |
//! | `wb:{T}:canary:<forest>` | string | which replica runs the forest's canary this interval |
//! | `wb:{T}:user:<forest>:<kind>:<id>` | zset | a user's operation ids by acceptance time |
//! | `wb:{T}:uq:<forest>:<kind>:<id>` | list | a user's unsettled operation ids, oldest first (per-user order; built inside the scripts) |
//! | channel `wb:done:<replica>` | pub/sub | `T\0op` when an outcome is recorded |
//! | channel `wb:agents` | pub/sub | agent revocations and new streams (each replica closes what it must) |

use super::ids::{ForestId, OperationId, TenantId};

pub const META_KEY: &str = "wb:meta";
pub const TENANTS_KEY: &str = "wb:tenants";

pub fn tenant_key(tenant: &TenantId) -> String {
    format!("wb:tenant:{{{tenant}}}")
}
pub fn token_key(token_sha256_hex: &str) -> String {
    format!("wb:token:{token_sha256_hex}")
}
pub fn agent_cred_key(tenant: &TenantId, agent_id: &str) -> String {
    format!("wb:{{{tenant}}}:agentcred:{agent_id}")
}
/// Where an agent secret's hash names its tenant.
pub fn agent_secret_key(secret_sha256_hex: &str) -> String {
    format!("wb:agentsecret:{secret_sha256_hex}")
}
/// The global credential key of an agent registered before ids were per tenant.
pub fn legacy_agent_cred_key(agent_id: &str) -> String {
    format!("wb:agentcred:{agent_id}")
}
pub fn forest_key(tenant: &TenantId, forest: &ForestId) -> String {
    format!("wb:{{{tenant}}}:forest:{forest}")
}
pub fn op_key(tenant: &TenantId, op: &OperationId) -> String {
    format!("wb:{{{tenant}}}:op:{op}")
}
pub fn timeline_key(tenant: &TenantId, op: &OperationId) -> String {
    format!("wb:{{{tenant}}}:tl:{op}")
}
pub fn queue_key(tenant: &TenantId, forest: &ForestId) -> String {
    format!("wb:{{{tenant}}}:q:{forest}")
}
pub fn deadlines_key(tenant: &TenantId) -> String {
    format!("wb:{{{tenant}}}:deadlines")
}
pub fn seq_key(tenant: &TenantId) -> String {
    format!("wb:{{{tenant}}}:seq")
}
pub fn policy_cache_key(tenant: &TenantId, forest: &ForestId, user: &str) -> String {
    format!("wb:{{{tenant}}}:policy:{forest}:{user}")
}
pub fn forests_key(tenant: &TenantId) -> String {
    format!("wb:{{{tenant}}}:forests")
}
/// The agent ids registered for a tenant (`admin list-agents`).
pub fn agent_ids_key(tenant: &TenantId) -> String {
    format!("wb:{{{tenant}}}:agent-ids")
}
/// Pub/sub: `revoke\0<tenant>\0<agent id>` (close every stream of the agent) and
/// `connect\0<tenant>\0<agent id>\0<session>` (close its other streams: one per agent
/// identity); see [`AgentEvent`](super::AgentEvent).
pub const AGENTS_CHANNEL: &str = "wb:agents";
pub fn agent_info_key(tenant: &TenantId, forest: &ForestId, member: &str) -> String {
    format!("wb:{{{tenant}}}:agent:{forest}:{member}")
}
pub fn health_key(tenant: &TenantId, forest: &ForestId) -> String {
    format!("wb:{{{tenant}}}:health:{forest}")
}
pub fn canary_key(tenant: &TenantId, forest: &ForestId) -> String {
    format!("wb:{{{tenant}}}:canary:{forest}")
}
pub fn agents_key(tenant: &TenantId, forest: &ForestId) -> String {
    format!("wb:{{{tenant}}}:agents:{forest}")
}
pub fn done_channel(replica: &str) -> String {
    format!("wb:done:{replica}")
}

/// A user as named by a caller: `sam:alice`, `upn:alice@corp.example.com`, `guid:…`.
pub fn user_label(user: &relay::proto::user_ref::Id) -> String {
    use relay::proto::user_ref::Id;
    match user {
        Id::ObjectGuid(g) => format!("guid:{}", g.to_ascii_lowercase()),
        Id::UserPrincipalName(u) => format!("upn:{}", u.to_lowercase()),
        Id::SamAccountName(s) => format!("sam:{}", s.to_lowercase()),
    }
}

/// Operations of one user, scored by acceptance time.
pub fn user_index_key(
    tenant: &TenantId,
    forest: &ForestId,
    user: &relay::proto::user_ref::Id,
) -> String {
    label_index_key(tenant, forest, &user_label(user))
}

/// [`user_index_key`] of a user known by its [`user_label`].
pub fn label_index_key(tenant: &TenantId, forest: &ForestId, label: &str) -> String {
    format!("wb:{{{tenant}}}:user:{forest}:{label}")
}

/// The names (labels) one user is known by, as an agent found them, under each of them.
pub fn alias_key(tenant: &TenantId, forest: &ForestId, label: &str) -> String {
    format!("wb:{{{tenant}}}:alias:{forest}:{label}")
}

/// `(tenant, forest)` of a queue key made by [`queue_key`].
pub fn parse_queue_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("wb:{")?;
    let (tenant, rest) = rest.split_once("}:q:")?;
    Some((tenant, rest))
}

/// Payload of a done notification: `tenant\0op`.
pub fn op_ref(tenant: &TenantId, op: &OperationId) -> String {
    format!("{tenant}\0{op}")
}
/// `(tenant, op)` of an [`op_ref`].
pub fn parse_op_ref(s: &str) -> Option<(&str, &str)> {
    s.split_once('\0')
}
/// Member of a tenant's [`deadlines_key`]: `forest\0op`.
pub fn deadline_member(forest: &ForestId, op: &OperationId) -> String {
    format!("{forest}\0{op}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Redis Cluster hash tag of a key: what lies between the first `{` and the next `}`.
    fn hash_tag(key: &str) -> Option<&str> {
        let open = key.find('{')?;
        let close = key[open + 1..].find('}')? + open + 1;
        Some(&key[open + 1..close]).filter(|t| !t.is_empty())
    }

    #[test]
    fn every_key_of_one_tenant_shares_its_slot() {
        let user = relay::proto::user_ref::Id::SamAccountName("alice".into());
        let acme = TenantId::new("acme").unwrap();
        let forest = ForestId::new("corp.example").unwrap();
        let op = OperationId::new("op-1").unwrap();
        let keys = [
            tenant_key(&acme),
            forest_key(&acme, &forest),
            op_key(&acme, &op),
            timeline_key(&acme, &op),
            queue_key(&acme, &forest),
            deadlines_key(&acme),
            policy_cache_key(&acme, &forest, "-"),
            forests_key(&acme),
            agent_info_key(&acme, &forest, "a|i|r"),
            health_key(&acme, &forest),
            canary_key(&acme, &forest),
            agents_key(&acme, &forest),
            user_index_key(&acme, &forest, &user),
        ];
        for k in keys {
            assert_eq!(hash_tag(&k), Some("acme"), "{k}");
        }
        assert_eq!(
            parse_queue_key(&queue_key(&acme, &forest)),
            Some(("acme", "corp.example"))
        );
    }
}
