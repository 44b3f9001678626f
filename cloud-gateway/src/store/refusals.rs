//! Records of requests refused before anything was queued (no agent, switched off, over a
//! limit, a reused id, invalid input): operators see every attempt, with its reason, by
//! `GetOperation` and `ListOperations`, in the same retention as queued operations. A burst of
//! refusals cannot grow Redis without bound: each user's index keeps its newest
//! [`USER_INDEX_KEEP`] ids, and each tenant keeps at most `limit` refusal records (the oldest
//! go first). A refusal never claims the caller's operation id: a retry with the same id is
//! accepted as new (the refused attempt stays on its timeline).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::ids::{ForestId, OperationId, TenantId};
use super::{keys, Result, Store};

/// How many operation ids one user's index keeps (newest first).
pub const USER_INDEX_KEEP: isize = 1000;

/// `KEYS`: the record, its timeline, the tenant's refusal index, the user's index (or the
/// refusal index again when there is no user). `ARGV`: tenant, op, forest, kind, initiator,
/// accepted ms, replica, outcome, message, detail, user label, ttl ms, tenant limit, user index
/// keep. Returns `recorded` or `exists` (the id names an operation already: nothing written).
static REFUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, tl, rf, ui = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', op) == 1 and redis.call('HGET', op, 'refused') ~= '1' then
  return 'exists'
end
local ttl = tonumber(ARGV[12])
redis.call('HSET', op, 'tenant', ARGV[1], 'op', ARGV[2], 'forest', ARGV[3], 'kind', ARGV[4],
  'initiator', ARGV[5], 'trace_id', '', 'accepted', ARGV[6], 'deadline', ARGV[6],
  'caller_replica', ARGV[7], 'state', 'done', 'outcome', ARGV[8], 'violation', '0',
  'message', ARGV[9], 'detail', ARGV[10], 'user', ARGV[11], 'sends', 0, 'refused', '1')
redis.call('PEXPIRE', op, ttl)
local function event(stage, detail)
  return cjson.encode({stage = stage, at = now, replica = ARGV[7], agent = '', detail = detail})
end
redis.call('RPUSH', tl, event('accepted', ''), event('refused', ARGV[10]))
redis.call('PEXPIRE', tl, ttl)
if ui ~= rf then
  redis.call('ZADD', ui, ARGV[6], ARGV[2])
  redis.call('ZREMRANGEBYRANK', ui, 0, -1 - tonumber(ARGV[14]))
  redis.call('PEXPIRE', ui, ttl)
end
redis.call('ZADD', rf, ARGV[6], ARGV[2])
redis.call('PEXPIRE', rf, ttl)
local over = redis.call('ZCARD', rf) - tonumber(ARGV[13])
if over > 0 then
  -- The oldest refusals go (their keys are the tenant's: the same hash slot).
  local prefix = 'wb:{' .. ARGV[1] .. '}:'
  for _, id in ipairs(redis.call('ZRANGE', rf, 0, over - 1)) do
    -- Only if it is still a refusal (a retry may have been accepted under its id since).
    if redis.call('HGET', prefix .. 'op:' .. id, 'refused') == '1' then
      redis.call('DEL', prefix .. 'op:' .. id, prefix .. 'tl:' .. id)
    end
  end
  redis.call('ZREMRANGEBYRANK', rf, 0, over - 1)
end
return 'recorded'
"#,
    )
});

/// The tenant's refusal records by time.
pub fn refusals_key(tenant: &TenantId) -> String {
    format!("wb:{{{tenant}}}:refused")
}

/// A request refused before anything was queued.
#[derive(Debug)]
pub struct Refusal<'a> {
    pub tenant: &'a TenantId,
    pub operation_id: &'a OperationId,
    /// Empty when the request named none that passed validation.
    pub forest: Option<&'a ForestId>,
    pub kind: &'a str,
    pub initiator: i32,
    pub accepted_ms: i64,
    pub replica: &'a str,
    pub outcome: relay::proto::Outcome,
    /// What the caller was told.
    pub message: &'a str,
    /// For operators: the reason (error code and text).
    pub detail: &'a str,
    /// The user's index key and label, when the request named a valid user.
    pub user: Option<(String, &'a str)>,
    pub ttl: Duration,
    /// Most refusal records the tenant keeps.
    pub limit: u64,
}

impl Store {
    /// Records a refused request (see the module documentation). `false` when the id names
    /// an existing operation (nothing was written).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn record_refusal(&self, r: &Refusal<'_>) -> Result<bool> {
        let refused = refusals_key(r.tenant);
        let (user_key, label) = r
            .user
            .as_ref()
            .map_or((refused.clone(), ""), |(k, l)| (k.clone(), *l));
        let reply: String = REFUSE
            .key(keys::op_key(r.tenant, r.operation_id))
            .key(keys::timeline_key(r.tenant, r.operation_id))
            .key(&refused)
            .key(user_key)
            .arg(r.tenant.as_str())
            .arg(r.operation_id.as_str())
            .arg(r.forest.map_or("", ForestId::as_str))
            .arg(r.kind)
            .arg(r.initiator)
            .arg(r.accepted_ms)
            .arg(r.replica)
            .arg(r.outcome as i32)
            .arg(r.message)
            .arg(r.detail)
            .arg(label)
            .arg(r.ttl.as_millis() as u64)
            .arg(r.limit)
            .arg(USER_INDEX_KEEP)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(reply == "recorded")
    }
}
