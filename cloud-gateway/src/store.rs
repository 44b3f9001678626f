//! Everything the gateway keeps in Redis, in one place: key names, the operation record and
//! its timeline, the per-(tenant, forest) work stream, agent presence, and the Lua scripts
//! that move an operation through its states atomically.
//!
//! Key layout (`{T}` is the tenant id, a Redis Cluster hash tag, so all of one tenant's keys for
//! an operation live on one slot and the scripts below stay single-slot):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `wb:tenant:{T}` | hash | wrapped tenant key, token hash |
//! | `wb:token:<sha256>` | string | tenant id for a bearer token hash |
//! | `wb:agentcred:<agent id>` | hash | tenant, forest, secret hash |
//! | `wb:{T}:forest:<forest>` | hash | per-forest operator switches |
//! | `wb:{T}:op:<op id>` | hash | operation record (never a password) |
//! | `wb:{T}:tl:<op id>` | list | timeline events (JSON) |
//! | `wb:{T}:q:<forest>` | stream | sealed operations; consumer group `agents` |
//! | `wb:{T}:agents:<forest>` | zset | live agent instances, scored by last heartbeat |
//! | `wb:{T}:policy:<forest>:<user>` | string | cached `PasswordPolicy` (short TTL) |
//! | `wb:{T}:forests` | set | forests the tenant has registered agents for |
//! | `wb:{T}:agent:<forest>:<member>` | hash | an agent instance's version, replica, heartbeat, in-flight |
//! | `wb:{T}:health:<forest>` | hash | the forest's last end-to-end canary |
//! | `wb:{T}:user:<forest>:<kind>:<id>` | zset | a user's operation ids by acceptance time |
//! | `wb:deadlines` | zset | `T\0op` scored by deadline, for the deadline sweeper |
//! | channel `wb:done:<replica>` | pub/sub | `T\0op` when an outcome is recorded |

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use relay::proto::{Outcome, PolicyViolation};

/// Consumer group every agent session reads through.
pub const GROUP: &str = "agents";

/// Errors talking to Redis or reading what it holds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected redis reply: {0}")]
    Reply(#[from] redis::ParsingError),
    #[error("corrupt record {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub fn tenant_key(tenant: &str) -> String {
    format!("wb:tenant:{{{tenant}}}")
}
pub fn token_key(token_sha256_hex: &str) -> String {
    format!("wb:token:{token_sha256_hex}")
}
pub fn agent_cred_key(agent_id: &str) -> String {
    format!("wb:agentcred:{agent_id}")
}
pub fn forest_key(tenant: &str, forest: &str) -> String {
    format!("wb:{{{tenant}}}:forest:{forest}")
}
pub fn op_key(tenant: &str, op: &str) -> String {
    format!("wb:{{{tenant}}}:op:{op}")
}
pub fn timeline_key(tenant: &str, op: &str) -> String {
    format!("wb:{{{tenant}}}:tl:{op}")
}
pub fn queue_key(tenant: &str, forest: &str) -> String {
    format!("wb:{{{tenant}}}:q:{forest}")
}
pub fn policy_cache_key(tenant: &str, forest: &str, user: &str) -> String {
    format!("wb:{{{tenant}}}:policy:{forest}:{user}")
}
pub fn forests_key(tenant: &str) -> String {
    format!("wb:{{{tenant}}}:forests")
}
pub fn agent_info_key(tenant: &str, forest: &str, member: &str) -> String {
    format!("wb:{{{tenant}}}:agent:{forest}:{member}")
}
pub fn health_key(tenant: &str, forest: &str) -> String {
    format!("wb:{{{tenant}}}:health:{forest}")
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
pub fn user_index_key(tenant: &str, forest: &str, user: &relay::proto::user_ref::Id) -> String {
    format!("wb:{{{tenant}}}:user:{forest}:{}", user_label(user))
}

/// `(tenant, forest)` of a queue key made by [`queue_key`].
pub fn parse_queue_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("wb:{")?;
    let (tenant, rest) = rest.split_once("}:q:")?;
    Some((tenant, rest))
}
pub fn agents_key(tenant: &str, forest: &str) -> String {
    format!("wb:{{{tenant}}}:agents:{forest}")
}
pub const DEADLINES_KEY: &str = "wb:deadlines";
pub fn done_channel(replica: &str) -> String {
    format!("wb:done:{replica}")
}
/// Member of [`DEADLINES_KEY`] and payload of a done notification.
pub fn op_ref(tenant: &str, op: &str) -> String {
    format!("{tenant}\0{op}")
}
pub fn parse_op_ref(s: &str) -> Option<(&str, &str)> {
    s.split_once('\0')
}

/// One stage of an operation's life, as shown by `GetOperation`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimelineEvent {
    pub stage: String,
    pub at: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl TimelineEvent {
    pub fn new(stage: &str, at: i64, replica: &str) -> Self {
        Self {
            stage: stage.to_owned(),
            at,
            replica: replica.to_owned(),
            agent: String::new(),
            detail: String::new(),
        }
    }
    pub fn agent(mut self, agent: &str) -> Self {
        agent.clone_into(&mut self.agent);
        self
    }
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("timeline event serializes")
    }
}

/// State of an operation record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    Queued,
    Delivered,
    Done,
}

/// The operation record as stored (no secret is ever part of it).
#[derive(Debug, Clone)]
pub struct OpRecord {
    pub tenant: String,
    pub operation_id: String,
    pub forest: String,
    pub kind: String,
    pub initiator: i32,
    pub state: OpState,
    pub outcome: Outcome,
    pub violation: PolicyViolation,
    pub message: String,
    pub trace_id: String,
    pub accepted_ms: i64,
    pub deadline_ms: i64,
    pub agent_instance: String,
    /// How many times the work was sent to an agent (more than 1 after reconnects).
    pub sends: i64,
    /// Operator-facing detail from the agent (never a secret).
    pub detail: String,
    /// Who it is for ([`user_label`]).
    pub user: String,
    /// Encoded result of a query operation (a `PasswordPolicy`), empty otherwise.
    pub result: Vec<u8>,
}

impl OpRecord {
    fn from_hash(key: &str, h: HashMap<String, String>) -> Result<Option<Self>> {
        if h.is_empty() {
            return Ok(None);
        }
        let get = |f: &str| h.get(f).cloned().unwrap_or_default();
        let int = |f: &str| -> Result<i64> {
            let v = get(f);
            if v.is_empty() {
                return Ok(0);
            }
            v.parse().map_err(|_| StoreError::Corrupt {
                key: key.to_owned(),
                detail: format!("field {f} is not an integer"),
            })
        };
        let state = match get("state").as_str() {
            "queued" => OpState::Queued,
            "delivered" => OpState::Delivered,
            "done" => OpState::Done,
            other => {
                return Err(StoreError::Corrupt {
                    key: key.to_owned(),
                    detail: format!("unknown state {other:?}"),
                })
            }
        };
        Ok(Some(Self {
            tenant: get("tenant"),
            operation_id: get("op"),
            forest: get("forest"),
            kind: get("kind"),
            initiator: int("initiator")? as i32,
            state,
            outcome: Outcome::try_from(int("outcome")? as i32).unwrap_or(Outcome::Unspecified),
            violation: PolicyViolation::try_from(int("violation")? as i32)
                .unwrap_or(PolicyViolation::Unspecified),
            message: get("message"),
            trace_id: get("trace_id"),
            accepted_ms: int("accepted")?,
            deadline_ms: int("deadline")?,
            agent_instance: get("agent_instance"),
            sends: int("sends")?,
            detail: get("detail"),
            user: get("user"),
            result: Vec::new(),
        }))
    }
}

/// Everything needed to accept one sealed operation.
#[derive(Debug)]
pub struct NewOperation<'a> {
    pub tenant: &'a str,
    pub operation_id: &'a str,
    pub forest: &'a str,
    pub kind: &'a str,
    pub initiator: i32,
    pub trace_id: &'a str,
    pub traceparent: &'a str,
    pub accepted_ms: i64,
    pub deadline_ms: i64,
    pub replica: &'a str,
    pub envelope: &'a [u8],
    pub key_version: u32,
    pub ttl: Duration,
    /// Who it is for, as [`user_label`] writes it (empty for forest-wide queries).
    pub user: &'a str,
}

/// Creates the record, its timeline and the stream entry in one step, unless the operation id
/// already exists. Returns 1 when created, 0 when it existed for the same forest, kind and
/// user, -1 when it existed for another (decided here, so two replicas racing with one id and
/// different payloads cannot both believe they own it).
static CREATE_OP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local op, tl, q, dl = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', op) == 1 then
  local f = redis.call('HMGET', op, 'forest', 'kind', 'user')
  if f[1] == ARGV[3] and f[2] == ARGV[4] and (f[3] or '') == ARGV[17] then return 0 end
  return -1
end
local ttl = tonumber(ARGV[13])
redis.call('HSET', op, 'tenant', ARGV[1], 'op', ARGV[2], 'forest', ARGV[3], 'kind', ARGV[4],
  'initiator', ARGV[5], 'trace_id', ARGV[6], 'accepted', ARGV[7], 'deadline', ARGV[8],
  'caller_replica', ARGV[9], 'state', 'queued', 'outcome', '0', 'violation', '0', 'user', ARGV[17])
redis.call('PEXPIRE', op, ttl)
redis.call('RPUSH', tl, ARGV[10], ARGV[11])
redis.call('PEXPIRE', tl, ttl)
local id = redis.call('XADD', q, '*', 'op', ARGV[2], 'deadline', ARGV[8], 'tp', ARGV[12],
  'kv', ARGV[14], 'env', ARGV[15])
redis.call('HSET', op, 'entry', id)
redis.call('ZADD', dl, ARGV[8], ARGV[16])
return 1
"#,
    )
});

/// Marks an operation delivered to an agent instance, if it is still queued and its deadline
/// has not passed. Returns `ok`, `expired`, `done`, `redeliver` when it was delivered to this
/// same instance before (a reconnect: it is sent again, and the timeline says so), or
/// `delivered:<instance>` when another instance has it (never deliver to two instances:
/// invariant 3). Every send is counted in the record's `sends`.
static MARK_DELIVERED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local op, tl = KEYS[1], KEYS[2]
local state = redis.call('HGET', op, 'state')
if not state then return 'missing' end
if state == 'done' then return 'done' end
if state == 'delivered' then
  local instance = redis.call('HGET', op, 'agent_instance') or ''
  if instance ~= ARGV[3] then return 'delivered:' .. instance end
  redis.call('HINCRBY', op, 'sends', 1)
  redis.call('RPUSH', tl, ARGV[9])
  return 'redeliver'
end
local now = tonumber(ARGV[1])
local deadline = tonumber(redis.call('HGET', op, 'deadline'))
if now >= deadline then
  redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[6], 'message', ARGV[7], 'done_at', ARGV[1])
  redis.call('RPUSH', tl, ARGV[8])
  return 'expired'
end
redis.call('HSET', op, 'state', 'delivered', 'agent', ARGV[2], 'agent_instance', ARGV[3],
  'delivered_at', ARGV[1], 'delivered_by', ARGV[4], 'sends', 1)
redis.call('RPUSH', tl, ARGV[5])
return 'ok'
"#,
    )
});

/// Records the agent's acknowledgment as the terminal outcome, unless one is already
/// recorded. Returns the caller's replica to notify, or false when already done.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local op, tl, q = KEYS[1], KEYS[2], KEYS[3]
local state = redis.call('HGET', op, 'state')
if not state then return false end
if redis.call('HGET', op, 'forest') ~= ARGV[8] then return false end
local entry = redis.call('HGET', op, 'entry')
if entry then
  redis.call('XACK', q, 'agents', entry)
  redis.call('XDEL', q, entry)
end
if state == 'done' then
  redis.call('RPUSH', tl, ARGV[6])
  return false
end
redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[1], 'violation', ARGV[2],
  'message', ARGV[3], 'done_at', ARGV[4], 'detail', ARGV[5])
if ARGV[9] ~= '' then redis.call('HSET', op, 'result', ARGV[9]) end
redis.call('RPUSH', tl, ARGV[7])
return redis.call('HGET', op, 'caller_replica') or ''
"#,
    )
});

/// At or after the deadline: an operation never delivered becomes `EXPIRED` (guaranteed not
/// applied). One delivered but unacknowledged becomes `TIMED_OUT` once the acknowledgment grace
/// period has also passed. Returns the record's outcome code after the step (0 = none yet).
static FINALIZE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local op, tl = KEYS[1], KEYS[2]
local state = redis.call('HGET', op, 'state')
if not state then return -1 end
if state == 'done' then return tonumber(redis.call('HGET', op, 'outcome')) end
local now = tonumber(ARGV[1])
local deadline = tonumber(redis.call('HGET', op, 'deadline'))
if now < deadline then return 0 end
if state == 'queued' then
  redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[2], 'message', ARGV[3], 'done_at', ARGV[1])
  redis.call('RPUSH', tl, ARGV[4])
  return tonumber(ARGV[2])
end
if now >= deadline + tonumber(ARGV[5]) then
  redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[6], 'message', ARGV[7], 'done_at', ARGV[1])
  redis.call('RPUSH', tl, ARGV[8])
  return tonumber(ARGV[6])
end
return 0
"#,
    )
});

/// A message the end user may see when the deadline passed before any agent took the work.
pub const EXPIRED_MESSAGE: &str =
    "The request expired before it reached your organization's directory; nothing was changed. Please try again.";
/// A message when an agent took the work but never answered.
pub const TIMED_OUT_MESSAGE: &str =
    "Your organization's directory did not confirm the change in time. It may or may not have been applied.";

/// Outcome of trying to mark an entry delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Deliver it now.
    Deliver,
    /// Its deadline passed; it is now `EXPIRED`.
    Expired,
    /// Already terminal (or its record is gone): just acknowledge the stream entry.
    Done,
    /// Delivered earlier to this same instance (before a reconnect): send it again.
    Redeliver,
    /// Delivered earlier to that other agent instance: never send it to a second one.
    AlreadyDelivered(String),
}

/// What accepting an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Queued now.
    New,
    /// The id existed for the same forest, kind and user (a resubmission or a race).
    Exists,
    /// The id existed for another forest, kind or user: nothing was queued.
    Conflict,
}

/// Where an operation stands after the deadline rules ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finalized {
    /// The record is gone (TTL passed).
    Missing,
    /// Not terminal yet (before its deadline, or delivered and within the ack grace period).
    Pending,
    Terminal(Outcome),
}

/// One entry read from a work stream.
#[derive(Debug, Clone)]
pub struct QueueEntry {
    pub id: String,
    pub operation_id: String,
    pub deadline_ms: i64,
    pub traceparent: String,
    pub key_version: u32,
    pub envelope: Vec<u8>,
}

/// The gateway's handle on Redis: a shared auto-reconnecting connection for ordinary commands,
/// plus a way to open dedicated connections for blocking reads and pub/sub.
#[derive(Clone)]
pub struct Store {
    client: redis::Client,
    conn: ConnectionManager,
}

impl Store {
    /// Connects to Redis.
    ///
    /// # Errors
    /// When the URL is invalid or Redis does not answer.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = client.get_connection_manager_with_config(cfg).await?;
        Ok(Self { client, conn })
    }

    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// A dedicated connection for blocking stream reads (`XREADGROUP BLOCK`), whose response
    /// timeout exceeds the block time.
    ///
    /// # Errors
    /// When Redis is unreachable.
    pub async fn blocking_connection(&self, block: Duration) -> Result<MultiplexedConnection> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(block + Duration::from_secs(3)));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?)
    }

    /// Creates the stream's consumer group if missing.
    ///
    /// # Errors
    /// On Redis errors other than "group exists".
    pub async fn ensure_group(&self, queue: &str) -> Result<()> {
        let mut c = self.conn();
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(queue)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut c)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    /// Accepts an operation: record + timeline + stream entry, atomically, unless the
    /// operation id already exists (then nothing changes; see [`Created`]).
    ///
    /// # Errors
    /// On Redis errors, or a reply the script cannot give.
    pub async fn create_operation(&self, n: &NewOperation<'_>) -> Result<Created> {
        let accepted = TimelineEvent::new("accepted", n.accepted_ms, n.replica).to_json();
        let queued = TimelineEvent::new("queued", relay::now_unix_ms(), n.replica)
            .detail(format!("queue {}", queue_key(n.tenant, n.forest)))
            .to_json();
        let mut c = self.conn();
        let created: i32 = CREATE_OP
            .key(op_key(n.tenant, n.operation_id))
            .key(timeline_key(n.tenant, n.operation_id))
            .key(queue_key(n.tenant, n.forest))
            .key(DEADLINES_KEY)
            .arg(n.tenant)
            .arg(n.operation_id)
            .arg(n.forest)
            .arg(n.kind)
            .arg(n.initiator)
            .arg(n.trace_id)
            .arg(n.accepted_ms)
            .arg(n.deadline_ms)
            .arg(n.replica)
            .arg(accepted)
            .arg(queued)
            .arg(n.traceparent)
            .arg(n.ttl.as_millis() as u64)
            .arg(n.key_version)
            .arg(n.envelope)
            .arg(op_ref(n.tenant, n.operation_id))
            .arg(n.user)
            .invoke_async(&mut c)
            .await?;
        match created {
            1 => Ok(Created::New),
            0 => Ok(Created::Exists),
            -1 => Ok(Created::Conflict),
            other => Err(StoreError::Corrupt {
                key: op_key(n.tenant, n.operation_id),
                detail: format!("CREATE_OP replied {other}"),
            }),
        }
    }

    /// Reads an operation record.
    ///
    /// # Errors
    /// On Redis errors or a corrupt record.
    pub async fn operation(&self, tenant: &str, op: &str) -> Result<Option<OpRecord>> {
        let key = op_key(tenant, op);
        let mut h: HashMap<String, Vec<u8>> = self.conn().hgetall(&key).await?;
        let result = h.remove("result").unwrap_or_default();
        let text = h
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        Ok(OpRecord::from_hash(&key, text)?.map(|mut r| {
            r.result = result;
            r
        }))
    }

    /// A cached value (e.g. an encoded password policy), if still fresh.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn cached(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.conn().get(key).await?)
    }

    /// Caches `value` under `key` for `ttl`.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn cache(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let _: () = self
            .conn()
            .pset_ex(key, value, ttl.as_millis() as u64)
            .await?;
        Ok(())
    }

    /// Reads an operation's timeline, oldest first.
    ///
    /// # Errors
    /// On Redis errors or a corrupt event.
    pub async fn timeline(&self, tenant: &str, op: &str) -> Result<Vec<TimelineEvent>> {
        let key = timeline_key(tenant, op);
        let raw: Vec<String> = self.conn().lrange(&key, 0, -1).await?;
        raw.iter()
            .map(|s| {
                serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
                    key: key.clone(),
                    detail: e.to_string(),
                })
            })
            .collect()
    }

    /// Appends one event to an operation's timeline.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn push_event(&self, tenant: &str, op: &str, ev: &TimelineEvent) -> Result<()> {
        let _: i64 = self
            .conn()
            .rpush(timeline_key(tenant, op), ev.to_json())
            .await?;
        Ok(())
    }

    /// Marks a queue entry delivered to an agent instance (see [`MARK_DELIVERED`]).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn mark_delivered(
        &self,
        tenant: &str,
        op: &str,
        agent_id: &str,
        agent_instance: &str,
        replica: &str,
    ) -> Result<Delivery> {
        let now = relay::now_unix_ms();
        let delivered = TimelineEvent::new("delivered", now, replica)
            .agent(agent_id)
            .to_json();
        let redelivered = TimelineEvent::new("redelivered", now, replica)
            .agent(agent_id)
            .detail(format!(
                "sent again to instance {agent_instance} after a reconnect; it answers from its journal"
            ))
            .to_json();
        let expired = TimelineEvent::new("expired", now, replica)
            .detail("deadline passed before an agent took it; not applied")
            .to_json();
        let mut c = self.conn();
        let r: String = MARK_DELIVERED
            .key(op_key(tenant, op))
            .key(timeline_key(tenant, op))
            .arg(now)
            .arg(agent_id)
            .arg(agent_instance)
            .arg(replica)
            .arg(delivered)
            .arg(Outcome::Expired as i32)
            .arg(EXPIRED_MESSAGE)
            .arg(expired)
            .arg(redelivered)
            .invoke_async(&mut c)
            .await?;
        match r.as_str() {
            "ok" => Ok(Delivery::Deliver),
            "redeliver" => Ok(Delivery::Redeliver),
            "expired" => Ok(Delivery::Expired),
            "done" | "missing" => Ok(Delivery::Done),
            s => match s.strip_prefix("delivered:") {
                Some(instance) => Ok(Delivery::AlreadyDelivered(instance.to_owned())),
                None => Err(StoreError::Corrupt {
                    key: op_key(tenant, op),
                    detail: format!("MARK_DELIVERED replied {s:?}"),
                }),
            },
        }
    }

    /// Records an agent's acknowledgment and removes the operation's stream entry. Returns the
    /// caller replica to notify when this acknowledgment set the terminal outcome, `None` when
    /// one was already recorded or the operation is not of this forest (an agent can only
    /// complete its own forest's operations).
    ///
    /// # Errors
    /// On Redis errors.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete(
        &self,
        tenant: &str,
        forest: &str,
        op: &str,
        outcome: Outcome,
        violation: PolicyViolation,
        message: &str,
        detail: &str,
        result: &[u8],
        event: &TimelineEvent,
    ) -> Result<Option<String>> {
        let late = TimelineEvent {
            stage: "late-acknowledgment".into(),
            ..event.clone()
        };
        let mut c = self.conn();
        let r: Option<String> = COMPLETE
            .key(op_key(tenant, op))
            .key(timeline_key(tenant, op))
            .key(queue_key(tenant, forest))
            .arg(outcome as i32)
            .arg(violation as i32)
            .arg(message)
            .arg(event.at)
            .arg(detail)
            .arg(late.to_json())
            .arg(event.to_json())
            .arg(forest)
            .arg(result)
            .invoke_async(&mut c)
            .await?;
        Ok(r)
    }

    /// Applies the deadline rules to one operation (see [`FINALIZE`]).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn finalize(
        &self,
        tenant: &str,
        op: &str,
        replica: &str,
        ack_grace: Duration,
    ) -> Result<Finalized> {
        let now = relay::now_unix_ms();
        let expired = TimelineEvent::new("expired", now, replica)
            .detail("deadline passed before an agent took it; not applied")
            .to_json();
        let timed_out = TimelineEvent::new("timed-out", now, replica)
            .detail("delivered, but no acknowledgment by the deadline")
            .to_json();
        let mut c = self.conn();
        let code: i32 = FINALIZE
            .key(op_key(tenant, op))
            .key(timeline_key(tenant, op))
            .arg(now)
            .arg(Outcome::Expired as i32)
            .arg(EXPIRED_MESSAGE)
            .arg(expired)
            .arg(ack_grace.as_millis() as u64)
            .arg(Outcome::TimedOut as i32)
            .arg(TIMED_OUT_MESSAGE)
            .arg(timed_out)
            .invoke_async(&mut c)
            .await?;
        Ok(match code {
            -1 => Finalized::Missing,
            0 => Finalized::Pending,
            c => Finalized::Terminal(Outcome::try_from(c).unwrap_or(Outcome::Failed)),
        })
    }

    /// Tells the replica holding the caller that an outcome was recorded.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn notify_done(&self, caller_replica: &str, tenant: &str, op: &str) -> Result<()> {
        let _: i64 = self
            .conn()
            .publish(done_channel(caller_replica), op_ref(tenant, op))
            .await?;
        Ok(())
    }

    /// Number of agent instances for (tenant, forest) seen within `liveness`.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn live_agents(&self, tenant: &str, forest: &str, liveness: Duration) -> Result<u64> {
        let min = relay::now_unix_ms() - liveness.as_millis() as i64;
        let n: u64 = self
            .conn()
            .zcount(agents_key(tenant, forest), min, "+inf")
            .await?;
        Ok(n)
    }

    /// Records that an agent instance is alive now.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_seen(&self, tenant: &str, forest: &str, member: &str) -> Result<()> {
        let _: i64 = self
            .conn()
            .zadd(agents_key(tenant, forest), member, relay::now_unix_ms())
            .await?;
        Ok(())
    }

    /// Records what `relayctl agents` shows about an agent instance (expires with liveness).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_info(
        &self,
        tenant: &str,
        forest: &str,
        member: &str,
        fields: &[(&str, String)],
        ttl: Duration,
    ) -> Result<()> {
        let key = agent_info_key(tenant, forest, member);
        let mut pipe = redis::pipe();
        pipe.hset_multiple(&key, fields)
            .ignore()
            .pexpire(&key, ttl.as_millis() as i64)
            .ignore()
            .sadd(forests_key(tenant), forest)
            .ignore();
        let _: () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Every agent instance of (tenant, forest) with its details and last-seen time.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agents(
        &self,
        tenant: &str,
        forest: &str,
    ) -> Result<Vec<(i64, HashMap<String, String>)>> {
        let mut c = self.conn();
        let members: Vec<(String, f64)> = c
            .zrange_withscores(agents_key(tenant, forest), 0, -1)
            .await?;
        let mut out = Vec::new();
        for (member, seen) in members {
            let info: HashMap<String, String> =
                c.hgetall(agent_info_key(tenant, forest, &member)).await?;
            out.push((seen as i64, info));
        }
        Ok(out)
    }

    /// The forests a tenant has agents for.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn forests(&self, tenant: &str) -> Result<Vec<String>> {
        let mut f: Vec<String> = self.conn().smembers(forests_key(tenant)).await?;
        f.sort();
        Ok(f)
    }

    /// Records a forest's canary result.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn set_health(
        &self,
        tenant: &str,
        forest: &str,
        healthy: bool,
        reason: &str,
        canary_ms: u64,
    ) -> Result<()> {
        let _: () = self
            .conn()
            .hset_multiple(
                health_key(tenant, forest),
                &[
                    ("healthy", u8::from(healthy).to_string()),
                    ("reason", reason.to_owned()),
                    ("checked", relay::now_unix_ms().to_string()),
                    ("canary_ms", canary_ms.to_string()),
                ],
            )
            .await?;
        Ok(())
    }

    /// A forest's last canary result.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn health(&self, tenant: &str, forest: &str) -> Result<HashMap<String, String>> {
        Ok(self.conn().hgetall(health_key(tenant, forest)).await?)
    }

    /// Whether this replica may run the forest's canary now (one replica per interval).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn canary_turn(
        &self,
        tenant: &str,
        forest: &str,
        replica: &str,
        every: Duration,
    ) -> Result<bool> {
        let ok: Option<String> = redis::cmd("SET")
            .arg(format!("wb:{{{tenant}}}:canary:{forest}"))
            .arg(replica)
            .arg("NX")
            .arg("PX")
            .arg(every.as_millis() as u64)
            .query_async(&mut self.conn())
            .await?;
        Ok(ok.is_some())
    }

    /// Indexes an operation under its user.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn index_user_operation(
        &self,
        key: &str,
        op: &str,
        accepted_ms: i64,
        ttl: Duration,
    ) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.zadd(key, op, accepted_ms)
            .ignore()
            .pexpire(key, ttl.as_millis() as i64)
            .ignore();
        let _: () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// A user's operation ids since `since_ms`, newest first.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn user_operations(
        &self,
        key: &str,
        since_ms: i64,
        limit: isize,
    ) -> Result<Vec<String>> {
        Ok(self
            .conn()
            .zrevrangebyscore_limit(key, "+inf", since_ms, 0, limit)
            .await?)
    }

    /// Removes an agent instance's presence (on disconnect).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_gone(&self, tenant: &str, forest: &str, member: &str) -> Result<()> {
        let _: i64 = self.conn().zrem(agents_key(tenant, forest), member).await?;
        let _: i64 = self
            .conn()
            .del(agent_info_key(tenant, forest, member))
            .await?;
        Ok(())
    }

    /// Acknowledges a stream entry in the consumer group.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn ack_entry(&self, queue: &str, id: &str) -> Result<()> {
        let _: i64 = self.conn().xack(queue, GROUP, &[id]).await?;
        Ok(())
    }

    /// Operations whose deadline has passed, oldest first (at most `limit`).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn due_deadlines(&self, before_ms: i64, limit: isize) -> Result<Vec<String>> {
        let r: Vec<String> = self
            .conn()
            .zrangebyscore_limit(DEADLINES_KEY, "-inf", before_ms, 0, limit)
            .await?;
        Ok(r)
    }

    /// Stops sweeping one operation.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn forget_deadline(&self, member: &str) -> Result<()> {
        let _: i64 = self.conn().zrem(DEADLINES_KEY, member).await?;
        Ok(())
    }
}

/// Reads new entries for one consumer, blocking up to `block`.
///
/// # Errors
/// On Redis errors or malformed entries.
pub async fn read_group(
    conn: &mut MultiplexedConnection,
    queue: &str,
    consumer: &str,
    count: usize,
    block: Duration,
) -> Result<Vec<QueueEntry>> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(queue)
        .arg(">")
        .query_async(conn)
        .await?;
    parse_read_reply(queue, reply)
}

/// Parses an `XREADGROUP` reply into queue entries.
///
/// # Errors
/// On malformed entries.
pub fn parse_read_reply(queue: &str, reply: redis::Value) -> Result<Vec<QueueEntry>> {
    let parsed: Option<redis::streams::StreamReadReply> = redis::from_redis_value(reply)?;
    let mut out = Vec::new();
    for key in parsed.map(|r| r.keys).unwrap_or_default() {
        for id in key.ids {
            out.push(parse_entry(queue, id)?);
        }
    }
    Ok(out)
}

/// Claims entries that have been pending longer than `min_idle` on any consumer (a replica or
/// agent session that died), so they are looked at again.
///
/// # Errors
/// On Redis errors or malformed entries.
pub async fn autoclaim(
    conn: &mut MultiplexedConnection,
    queue: &str,
    consumer: &str,
    min_idle: Duration,
    count: usize,
) -> Result<Vec<QueueEntry>> {
    let reply: redis::Value = redis::cmd("XAUTOCLAIM")
        .arg(queue)
        .arg(GROUP)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    let parsed: redis::streams::StreamAutoClaimReply = redis::from_redis_value(reply)?;
    parsed
        .claimed
        .into_iter()
        .map(|id| parse_entry(queue, id))
        .collect()
}

fn parse_entry(queue: &str, id: redis::streams::StreamId) -> Result<QueueEntry> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        key: format!("{queue} {}", id.id),
        detail: detail.to_owned(),
    };
    let text = |f: &str| -> Result<String> {
        id.get::<String>(f)
            .ok_or_else(|| corrupt(&format!("missing field {f}")))
    };
    Ok(QueueEntry {
        operation_id: text("op")?,
        deadline_ms: text("deadline")?
            .parse()
            .map_err(|_| corrupt("deadline is not an integer"))?,
        traceparent: text("tp").unwrap_or_default(),
        key_version: text("kv")?
            .parse()
            .map_err(|_| corrupt("bad key version"))?,
        envelope: id
            .get::<Vec<u8>>("env")
            .ok_or_else(|| corrupt("missing field env"))?,
        id: id.id.clone(),
    })
}
