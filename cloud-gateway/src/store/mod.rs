//! Everything the gateway keeps in Redis, and the only code that talks to it: the operation
//! record and its timeline, the per-(tenant, forest) work stream, agent presence, tenants and
//! credentials, and the Lua scripts that move an operation through its states atomically
//! ([`scripts`]). Key names live in [`keys`], the typed ids they are made of in [`ids`]; no
//! other module holds a Redis connection.

mod backend;
mod enrollment;
mod events;
mod identities;
mod ids;
mod keys;
mod limits;
mod refusals;
mod scripts;
mod sequence;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use relay::proto::{Outcome, PolicyViolation};

pub use backend::{RedisOptions, REPLICA_ACK_TIMEOUT};
pub use events::AgentEvent;
pub use ids::{
    ForestId, InvalidId, OperationId, TenantId, MAX_FOREST_CHARS, MAX_FOREST_LABEL_CHARS,
    MAX_OPERATION_ID_CHARS, MAX_TENANT_ID_CHARS,
};
pub use keys::*;
pub use limits::{budget_key, rate_key, Budget};
pub use refusals::{refusals_key, Refusal, USER_INDEX_KEEP};
pub use scripts::{Acknowledgment, Completion, Created, Delivery, Finalized};
pub use sequence::HighWater;

/// Consumer group every agent session reads through.
pub const GROUP: &str = "agents";

/// Longest block of a [`QueueReader`] (its connection's response timeout is set above it).
pub const MAX_BLOCK: Duration = Duration::from_secs(10);

/// Errors talking to Redis or reading what it holds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected redis reply: {0}")]
    Reply(#[from] redis::ParsingError),
    #[error("corrupt record {key}: {detail}")]
    Corrupt { key: String, detail: String },
    /// The Redis settings are unusable (names the flag and what is wrong, never a secret).
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to {what}: {source}{hint}")]
    Connect {
        what: String,
        hint: &'static str,
        source: redis::RedisError,
    },
    /// A lifecycle write reached fewer replicas than `--redis-replica-acks` asks in time: it
    /// happened on the master, but a failover now could lose it, so it is not reported done.
    #[error("the write to {key} reached {acked} of the {wanted} replica(s) asked for within {timeout_ms} ms; it may be lost if the master fails now")]
    NotReplicated {
        key: String,
        acked: u32,
        wanted: u32,
        timeout_ms: u64,
    },
}

/// An error when a write asked to reach `wanted` replicas reached fewer.
fn check_replicated(key: &str, wanted: u32, acked: Option<u32>) -> Result<()> {
    match acked {
        Some(acked) if acked < wanted => Err(StoreError::NotReplicated {
            key: key.to_owned(),
            acked,
            wanted,
            timeout_ms: REPLICA_ACK_TIMEOUT.as_millis() as u64,
        }),
        _ => Ok(()),
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

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
    pub tenant: TenantId,
    pub operation_id: OperationId,
    pub forest: ForestId,
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
    /// A request refused before anything was queued (`refusals.rs`): a retry under its id is
    /// a new operation.
    pub refused: bool,
}

impl OpRecord {
    fn from_hash(key: &str, h: HashMap<String, String>) -> Result<Option<Self>> {
        if h.is_empty() {
            return Ok(None);
        }
        let corrupt = |detail: String| StoreError::Corrupt {
            key: key.to_owned(),
            detail,
        };
        let get = |f: &str| h.get(f).cloned().unwrap_or_default();
        let int = |f: &str| -> Result<i64> {
            match h.get(f).map(String::as_str) {
                None | Some("") => Ok(0),
                Some(v) => v
                    .parse()
                    .map_err(|_| corrupt(format!("field {f} is not an integer: {v:?}"))),
            }
        };
        let required = |f: &str| -> Result<i64> {
            h.get(f)
                .ok_or_else(|| corrupt(format!("field {f} is missing")))?
                .parse()
                .map_err(|_| corrupt(format!("field {f} is not an integer")))
        };
        let code = |f: &str| -> Result<i32> {
            i32::try_from(int(f)?).map_err(|_| corrupt(format!("field {f} is out of range")))
        };
        let state = match get("state").as_str() {
            "queued" => OpState::Queued,
            "delivered" => OpState::Delivered,
            "done" => OpState::Done,
            other => return Err(corrupt(format!("unknown state {other:?}"))),
        };
        let outcome = Outcome::try_from(code("outcome")?)
            .map_err(|_| corrupt("unknown outcome".to_owned()))?;
        if (state == OpState::Done) != (outcome != Outcome::Unspecified) {
            return Err(corrupt(format!(
                "state {state:?} with outcome {}",
                outcome.as_str_name()
            )));
        }
        Ok(Some(Self {
            tenant: TenantId::from_store(get("tenant")),
            operation_id: OperationId::from_store(get("op")),
            forest: ForestId::from_store(get("forest")),
            kind: get("kind"),
            initiator: code("initiator")?,
            state,
            outcome,
            violation: PolicyViolation::try_from(code("violation")?)
                .map_err(|_| corrupt("unknown policy violation".to_owned()))?,
            message: get("message"),
            trace_id: get("trace_id"),
            accepted_ms: required("accepted")?,
            deadline_ms: required("deadline")?,
            agent_instance: get("agent_instance"),
            sends: int("sends")?,
            detail: get("detail"),
            user: get("user"),
            result: Vec::new(),
            refused: get("refused") == "1",
        }))
    }
}

/// Everything needed to accept one sealed operation.
#[derive(Debug)]
pub struct NewOperation<'a> {
    pub tenant: &'a TenantId,
    pub operation_id: &'a OperationId,
    pub forest: &'a ForestId,
    pub kind: &'a str,
    pub initiator: i32,
    pub trace_id: &'a str,
    pub traceparent: &'a str,
    /// By the store's clock ([`Store::now_ms`]), as is the deadline.
    pub accepted_ms: i64,
    pub deadline_ms: i64,
    pub replica: &'a str,
    pub envelope: &'a [u8],
    pub key_version: u32,
    pub ttl: Duration,
    /// Who it is for, as [`user_label`] writes it (empty for forest-wide queries).
    pub user: &'a str,
}

/// A message the end user may see when the deadline passed before any agent took the work.
pub const EXPIRED_MESSAGE: &str =
    "The request expired before it reached your organization's directory; nothing was changed. Please try again.";
/// A message when a resubmission's wait ended while the operation can still be applied.
pub const IN_PROGRESS_MESSAGE: &str = relay::messages::IN_PROGRESS;
/// A message when an agent took the work but never answered.
pub const TIMED_OUT_MESSAGE: &str = relay::messages::UNKNOWN;

/// One entry read from a work stream.
#[derive(Debug, Clone)]
pub struct QueueEntry {
    pub id: String,
    pub operation_id: OperationId,
    pub deadline_ms: i64,
    pub traceparent: String,
    pub key_version: u32,
    pub envelope: Vec<u8>,
    /// `reset`, `change`, `unlock`, … (empty for entries queued before it was recorded).
    pub kind: String,
}

/// Who an operation is delivered to ([`Store::mark_delivered`]).
#[derive(Debug, Clone, Copy)]
pub struct Recipient<'a> {
    pub agent_id: &'a str,
    pub instance: &'a str,
    /// The replica holding the instance's stream.
    pub replica: &'a str,
}

/// Limits [`Store::create_operation`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most entries one forest's queue may hold.
    pub forest: u64,
    /// Most unsettled operations one tenant may have.
    pub tenant: u64,
}

/// The gateway's handle on Redis (one server, a cluster, or Sentinel's master: see
/// `backend.rs`): a shared auto-reconnecting connection for ordinary commands, plus dedicated
/// connections for blocking stream reads ([`QueueReader`]) and pub/sub.
#[derive(Clone)]
pub struct Store {
    backend: Arc<backend::Backend>,
    conn: backend::Conn,
    /// Replicas every lifecycle write must reach ([`RedisOptions::replica_acks`]).
    replica_acks: u32,
    /// The highest store sequence seen per tenant (`sequence.rs`).
    high_water: Arc<HighWater>,
    /// Who writes (for timelines of recovery): the replica, or `admin`.
    replica: Arc<str>,
}

impl Store {
    /// Connects to Redis at `url` (any form `backend.rs` lists) with no further options.
    ///
    /// # Errors
    /// When the URL is invalid or Redis does not answer.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &RedisOptions::default()).await
    }

    /// Connects to Redis at `url` with TLS files, password file and replica acknowledgments
    /// from `options`.
    ///
    /// # Errors
    /// When the URL or an option is unusable (the error names which), or Redis does not answer.
    pub async fn connect_with(url: &str, options: &RedisOptions) -> Result<Self> {
        let (backend, conn) = backend::connect(url, options).await?;
        Ok(Self {
            backend: Arc::new(backend),
            conn,
            replica_acks: options.replica_acks,
            high_water: Arc::default(),
            replica: Arc::from("admin"),
        })
    }

    /// This store handle as used by replica `replica` (named on the timelines it writes).
    pub fn for_replica(mut self, replica: &str) -> Self {
        self.replica = Arc::from(replica);
        self
    }

    fn conn(&self) -> backend::Conn {
        self.conn.clone()
    }

    /// A pub/sub connection subscribed to `channel`.
    ///
    /// # Errors
    /// When Redis is unreachable.
    pub async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSub> {
        let mut pubsub = self.backend.pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    }

    /// A reader of one forest's work stream for one consumer (agent instance), on a dedicated
    /// connection whose response timeout exceeds `block` (at most [`MAX_BLOCK`]).
    ///
    /// # Errors
    /// When Redis is unreachable.
    pub async fn queue_reader(
        &self,
        queue: &str,
        consumer: &str,
        block: Duration,
    ) -> Result<QueueReader> {
        let block = block.min(MAX_BLOCK);
        let conn = self.backend.blocking(block).await?;
        Ok(QueueReader {
            conn,
            queue: queue.to_owned(),
            consumer: consumer.to_owned(),
            block,
        })
    }

    /// The store's clock (Redis `TIME`) in Unix milliseconds: the one clock deadlines are set
    /// and settled by.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn now_ms(&self) -> Result<i64> {
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// The store marker's epoch: written once when the first tenant is created, so a store
    /// that comes back without it has lost its data (or was never set up).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn epoch(&self) -> Result<Option<String>> {
        Ok(self.conn().hget(META_KEY, "epoch").await?)
    }

    /// Writes the store marker unless it exists; returns the epoch in force.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn init_epoch(&self) -> Result<String> {
        let fresh = uuid::Uuid::new_v4().to_string();
        let mut c = self.conn();
        let _: bool = c.hset_nx(META_KEY, "epoch", &fresh).await?;
        let _: bool = c.hset_nx(META_KEY, "created", relay::now_unix_ms()).await?;
        let epoch: Option<String> = c.hget(META_KEY, "epoch").await?;
        Ok(epoch.unwrap_or(fresh))
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

    /// Accepts an operation: record + timeline + stream entry + deadline, atomically, unless
    /// the operation id exists, the forest's queue holds `queue_limit` entries, or the
    /// deadline has passed by the store's clock (see [`Created`]).
    ///
    /// # Errors
    /// On Redis errors, or a reply the script cannot give.
    pub async fn create_operation(
        &self,
        n: &NewOperation<'_>,
        limits: QueueLimits,
    ) -> Result<Created> {
        let acks = self.replica_acks;
        self.guarded(n.tenant, |high_water, mut conn| async move {
            scripts::CreateOp {
                op: n,
                queue_limit: limits.forest,
                tenant_limit: limits.tenant,
                high_water,
            }
            .run(&mut conn, acks)
            .await
        })
        .await
    }

    /// Reads an operation record.
    ///
    /// # Errors
    /// On Redis errors or a corrupt record.
    pub async fn operation(&self, tenant: &TenantId, op: &OperationId) -> Result<Option<OpRecord>> {
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
    pub async fn timeline(
        &self,
        tenant: &TenantId,
        op: &OperationId,
    ) -> Result<Vec<TimelineEvent>> {
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
    pub async fn push_event(
        &self,
        tenant: &TenantId,
        op: &OperationId,
        ev: &TimelineEvent,
    ) -> Result<()> {
        let _: i64 = self
            .conn()
            .rpush(timeline_key(tenant, op), ev.to_json())
            .await?;
        Ok(())
    }

    /// Marks an operation delivered to an agent instance (see [`Delivery`]).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn mark_delivered(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        op: &OperationId,
        to: &Recipient<'_>,
    ) -> Result<Delivery> {
        let acks = self.replica_acks;
        self.guarded(tenant, |high_water, mut conn| async move {
            scripts::MarkDelivered {
                tenant,
                forest,
                op,
                agent_id: to.agent_id,
                instance: to.instance,
                replica: to.replica,
                high_water,
            }
            .run(&mut conn, acks)
            .await
        })
        .await
    }

    /// Records an agent instance's acknowledgment (see [`Completion`]).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn complete(&self, ack: &Acknowledgment<'_>) -> Result<Completion> {
        let acks = self.replica_acks;
        self.guarded(ack.tenant, |high_water, mut conn| async move {
            scripts::Complete { ack, high_water }
                .run(&mut conn, acks)
                .await
        })
        .await
    }

    /// Applies the deadline rules to one operation (see [`Finalized`]).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn finalize(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        op: &OperationId,
        replica: &str,
        ack_grace: Duration,
    ) -> Result<Finalized> {
        let acks = self.replica_acks;
        self.guarded(tenant, |high_water, mut conn| async move {
            scripts::Finalize {
                tenant,
                forest,
                op,
                replica,
                ack_grace_ms: ack_grace.as_millis() as u64,
                high_water,
            }
            .run(&mut conn, acks)
            .await
        })
        .await
    }

    /// Tells the replica holding the caller that an outcome was recorded.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn notify_done(
        &self,
        caller_replica: &str,
        tenant: &TenantId,
        op: &OperationId,
    ) -> Result<()> {
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
    pub async fn live_agents(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        liveness: Duration,
    ) -> Result<u64> {
        let min = relay::now_unix_ms() - liveness.as_millis() as i64;
        let n: u64 = self
            .conn()
            .zcount(agents_key(tenant, forest), min, "+inf")
            .await?;
        Ok(n)
    }

    /// The agent instances (`agent|instance|replica`) of (tenant, forest) seen within
    /// `liveness`.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn live_agent_members(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        liveness: Duration,
    ) -> Result<Vec<String>> {
        let min = relay::now_unix_ms() - liveness.as_millis() as i64;
        Ok(self
            .conn()
            .zrangebyscore(agents_key(tenant, forest), min, "+inf")
            .await?)
    }

    /// Records that an agent instance is alive now.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_seen(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        member: &str,
    ) -> Result<()> {
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
        tenant: &TenantId,
        forest: &ForestId,
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

    /// The sealing-key records (`seal_key` hex, `seal_mac`) of agent instances, in the order
    /// of `members` (`None` where an instance has none), in one round trip.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_sealing_keys(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        members: &[String],
    ) -> Result<Vec<Option<(String, String)>>> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for m in members {
            pipe.cmd("HMGET")
                .arg(agent_info_key(tenant, forest, m))
                .arg("seal_key")
                .arg("seal_mac");
        }
        let rows: Vec<(Option<String>, Option<String>)> =
            pipe.query_async(&mut self.conn()).await?;
        Ok(rows.into_iter().map(|(k, m)| k.zip(m)).collect())
    }

    /// Every agent instance of (tenant, forest) with its details and last-seen time.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agents(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
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
    pub async fn forests(&self, tenant: &TenantId) -> Result<Vec<ForestId>> {
        let mut f: Vec<String> = self.conn().smembers(forests_key(tenant)).await?;
        f.sort();
        Ok(f.into_iter().map(ForestId::from_store).collect())
    }

    /// Every tenant id.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn tenant_ids(&self) -> Result<Vec<TenantId>> {
        let mut t: Vec<String> = self.conn().smembers(TENANTS_KEY).await?;
        t.sort();
        Ok(t.into_iter().map(TenantId::from_store).collect())
    }

    /// Depth of a forest's work stream (entries not yet settled) and the acceptance time of
    /// its oldest entry.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn queue_stats(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
    ) -> Result<(i64, Option<i64>)> {
        let key = queue_key(tenant, forest);
        let mut c = self.conn();
        let depth: i64 = redis::cmd("XLEN").arg(&key).query_async(&mut c).await?;
        let first: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut c)
            .await?;
        let oldest_ms = first
            .first()
            .and_then(|(id, _)| id.split('-').next()?.parse::<i64>().ok());
        Ok((depth, oldest_ms))
    }

    /// Records a forest's canary result.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn set_health(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
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
    pub async fn health(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
    ) -> Result<HashMap<String, String>> {
        Ok(self.conn().hgetall(health_key(tenant, forest)).await?)
    }

    /// Whether this replica may run the forest's canary now (one replica per interval).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn canary_turn(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        replica: &str,
        every: Duration,
    ) -> Result<bool> {
        let ok: Option<String> = redis::cmd("SET")
            .arg(canary_key(tenant, forest))
            .arg(replica)
            .arg("NX")
            .arg("PX")
            .arg(every.as_millis() as u64)
            .query_async(&mut self.conn())
            .await?;
        Ok(ok.is_some())
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
    ) -> Result<Vec<OperationId>> {
        let ids: Vec<String> = self
            .conn()
            .zrevrangebyscore_limit(key, "+inf", since_ms, 0, limit)
            .await?;
        Ok(ids.into_iter().map(OperationId::from_store).collect())
    }

    /// Removes an agent instance's presence (on disconnect), and its consumer in the forest's
    /// group when it holds no pending entries (those wait for the instance to come back).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_gone(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        member: &str,
        instance: &str,
    ) -> Result<()> {
        let mut c = self.conn();
        let _: i64 = c.zrem(agents_key(tenant, forest), member).await?;
        let _: i64 = c.del(agent_info_key(tenant, forest, member)).await?;
        // Atomically: a consumer with pending entries, or whose instance has a stream on
        // another replica by now (an agent that moved), is kept. Deleting it there would drop
        // the entries that replica reads into it from the group's pending list: never
        // delivered, EXPIRED at their deadline.
        static GONE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                r"
local pend = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pend > 0 then return 0 end
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if string.sub(m, 1, #ARGV[3]) == ARGV[3] then return 0 end
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
",
            )
        });
        let prefix = match member.rsplit_once('|') {
            Some((agent_and_instance, _replica)) => format!("{agent_and_instance}|"),
            None => format!("{member}|"),
        };
        let _: i64 = GONE
            .key(queue_key(tenant, forest))
            .key(agents_key(tenant, forest))
            .arg(GROUP)
            .arg(instance)
            .arg(prefix)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }

    /// Acknowledges and deletes a stream entry whose operation is settled.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn drop_entry(&self, queue: &str, id: &str) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.xack(queue, GROUP, &[id])
            .ignore()
            .xdel(queue, &[id])
            .ignore();
        let _: () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Operations of `tenant` whose deadline has passed by the store's clock, oldest first (at
    /// most `limit`), as `(forest, operation id)`.
    ///
    /// # Errors
    /// On Redis errors or a malformed member.
    pub async fn due_deadlines(
        &self,
        tenant: &TenantId,
        limit: isize,
    ) -> Result<Vec<(ForestId, OperationId)>> {
        let now = self.now_ms().await?;
        let key = deadlines_key(tenant);
        let members: Vec<String> = self
            .conn()
            .zrangebyscore_limit(&key, "-inf", now, 0, limit)
            .await?;
        members
            .iter()
            .map(|m| {
                m.split_once('\0')
                    .map(|(f, o)| (ForestId::from_store(f), OperationId::from_store(o)))
                    .ok_or_else(|| StoreError::Corrupt {
                        key: key.clone(),
                        detail: "deadline member without forest".to_owned(),
                    })
            })
            .collect()
    }

    // --- tenants and credentials (see `tenants.rs`; only hashes and wrapped keys) ---

    /// A tenant's current token hash.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn tenant_token(&self, tenant: &TenantId) -> Result<Option<String>> {
        Ok(self.conn().hget(tenant_key(tenant), "token_sha256").await?)
    }

    /// Registers the tenant id (its record's `created` time is set once).
    ///
    /// Two steps, since the tenant's hash and the registry lie in different hash slots of a
    /// cluster: the record first, so a registered tenant always has one.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn register_tenant(&self, tenant: &TenantId) -> Result<()> {
        let _: bool = self
            .conn()
            .hset_nx(tenant_key(tenant), "created", relay::now_unix_ms())
            .await?;
        let _: i64 = self.conn().sadd(TENANTS_KEY, tenant).await?;
        Ok(())
    }

    /// Points a new token hash at `tenant`, replacing `old` (its previous token's hash).
    ///
    /// # Errors
    /// On Redis errors.
    ///
    /// One command per key, in this order (the keys lie in different hash slots of a cluster,
    /// where no pipeline or transaction may span them): the old token stops working first, so
    /// a rotation cut short leaves no token working rather than two.
    pub async fn set_tenant_token(
        &self,
        tenant: &TenantId,
        hash: &str,
        mac: &str,
        old: Option<&str>,
    ) -> Result<()> {
        let mut c = self.conn();
        if let Some(old) = old {
            let _: i64 = c.del(token_key(old)).await?;
        }
        let _: () = c.set(token_key(hash), format!("{tenant} {mac}")).await?;
        let _: i64 = c.hset(tenant_key(tenant), "token_sha256", hash).await?;
        let _: i64 = c.sadd(TENANTS_KEY, tenant).await?;
        Ok(())
    }

    /// The tenant a token hash belongs to, with the record's MAC (empty when it has none).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn token_tenant(&self, hash: &str) -> Result<Option<(TenantId, String)>> {
        let record: Option<String> = self.conn().get(token_key(hash)).await?;
        Ok(record.map(|r| {
            let (tenant, mac) = r.split_once(' ').unwrap_or((r.as_str(), ""));
            (TenantId::from_store(tenant.to_owned()), mac.to_owned())
        }))
    }

    /// Whether the tenant exists.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn tenant_exists(&self, tenant: &TenantId) -> Result<bool> {
        Ok(self.conn().exists(tenant_key(tenant)).await?)
    }

    /// Stores an agent credential (`credential`: its secret's hash, or `cert:<enrollment>`)
    /// for one tenant's forest, replacing the agent's earlier one. A secret's hash is also
    /// indexed (`wb:agentsecret:<hash>` names the tenant), and the replaced secret's index entry
    /// is removed, so the old secret finds nothing.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn put_agent_credential(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        forest: &ForestId,
        credential: &str,
        mac: &str,
    ) -> Result<()> {
        let old = self.agent_credential(tenant, agent_id).await?;
        // The index first: until the record names the new hash, the index leads to a record
        // that refuses it; the other way round, a new secret would briefly find nothing.
        if !credential.starts_with("cert:") {
            let _: () = self
                .conn()
                .set(agent_secret_key(credential), tenant.as_str())
                .await?;
        }
        self.write_agent_record(
            tenant,
            agent_id,
            forest,
            [("secret_sha256", credential), ("mac", mac)],
        )
        .await?;
        self.forget_old_secret(tenant, agent_id, &old, Some(credential))
            .await
    }

    /// Replaces `tenant`'s record of `agent_id` by one of (`tenant`, `forest`, `fields`), and
    /// lists the agent and its forest: one transaction, since they share the tenant's slot.
    async fn write_agent_record(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        forest: &ForestId,
        fields: [(&str, &str); 2],
    ) -> Result<()> {
        let key = agent_cred_key(tenant, agent_id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .sadd(forests_key(tenant), forest)
            .ignore()
            .sadd(agent_ids_key(tenant), agent_id)
            .ignore()
            .del(&key)
            .ignore()
            .hset_multiple(
                &key,
                &[("tenant", tenant.as_str()), ("forest", forest.as_str())],
            )
            .ignore()
            .hset_multiple(&key, &fields)
            .ignore();
        let _: () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Removes what pointed at an agent's replaced record: its secret's index entry (unless it
    /// is `keep`) and the agent's legacy record.
    async fn forget_old_secret(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        old: &HashMap<String, String>,
        keep: Option<&str>,
    ) -> Result<()> {
        for field in ["secret_sha256", "revoked_sha256"] {
            if let Some(hash) = old.get(field).filter(|h| !h.starts_with("cert:")) {
                if Some(hash.as_str()) != keep {
                    let _: () = self.conn().del(agent_secret_key(hash)).await?;
                }
            }
        }
        if self
            .legacy_agent_credential(tenant, agent_id)
            .await?
            .is_some()
        {
            let _: () = self.conn().del(legacy_agent_cred_key(agent_id)).await?;
        }
        Ok(())
    }

    /// Replaces an agent's credential by a tombstone (`tenant`, `forest`, `revoked_at`, and the
    /// revoked secret's hash, whose index entry stays so the revoked agent is told it was
    /// revoked): it admits nobody, and says why.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn revoke_agent_credential(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        forest: &ForestId,
    ) -> Result<()> {
        let old = self.agent_credential(tenant, agent_id).await?;
        let revoked = old
            .get("secret_sha256")
            .or_else(|| old.get("revoked_sha256"))
            .cloned()
            .unwrap_or_default();
        let revoked_at = relay::now_unix_ms().to_string();
        self.write_agent_record(
            tenant,
            agent_id,
            forest,
            [("revoked_at", &revoked_at), ("revoked_sha256", &revoked)],
        )
        .await?;
        self.forget_old_secret(tenant, agent_id, &old, Some(&revoked))
            .await?;
        // Its instances stop being sealed to at once, before their streams close (each replica closes them within a second).
        let members: Vec<String> = self
            .conn()
            .zrange(agents_key(tenant, forest), 0, -1)
            .await?;
        let prefix = format!("{agent_id}|");
        let mut gone = redis::pipe();
        for m in members.iter().filter(|m| m.starts_with(&prefix)) {
            gone.zrem(agents_key(tenant, forest), m)
                .ignore()
                .del(agent_info_key(tenant, forest, m))
                .ignore();
        }
        // An empty pipeline is an error on a cluster connection ("empty command").
        if gone.cmd_iter().next().is_some() {
            let _: () = gone.query_async(&mut self.conn()).await?;
        }
        Ok(())
    }

    /// The agent ids registered for `tenant`.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_ids(&self, tenant: &TenantId) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self.conn().smembers(agent_ids_key(tenant)).await?;
        ids.sort();
        Ok(ids)
    }

    /// Tells every replica about an agent (see [`AGENTS_CHANNEL`]).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn publish_agent_event(&self, event: &AgentEvent) -> Result<()> {
        let _: i64 = self.conn().publish(AGENTS_CHANNEL, event.encode()).await?;
        Ok(())
    }

    /// The fields of `tenant`'s credential record for `agent_id` (empty when unknown): its own
    /// record, or a legacy one (from before agent ids were per tenant) that names the tenant.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_credential(
        &self,
        tenant: &TenantId,
        agent_id: &str,
    ) -> Result<HashMap<String, String>> {
        let h: HashMap<String, String> = self
            .conn()
            .hgetall(agent_cred_key(tenant, agent_id))
            .await?;
        if !h.is_empty() {
            return Ok(h);
        }
        Ok(self
            .legacy_agent_credential(tenant, agent_id)
            .await?
            .unwrap_or_default())
    }

    async fn legacy_agent_credential(
        &self,
        tenant: &TenantId,
        agent_id: &str,
    ) -> Result<Option<HashMap<String, String>>> {
        let h: HashMap<String, String> =
            self.conn().hgetall(legacy_agent_cred_key(agent_id)).await?;
        Ok(Some(h).filter(|h| h.get("tenant").map(String::as_str) == Some(tenant.as_str())))
    }

    /// The tenant whose agent `agent_id` holds (or held, until it was revoked) the secret of
    /// `secret_sha256`: from the secret index, or from a legacy record of that id with that
    /// secret. The caller still verifies the record it leads to.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn agent_secret_tenant(
        &self,
        secret_sha256: &str,
        agent_id: &str,
    ) -> Result<Option<TenantId>> {
        let indexed: Option<String> = self.conn().get(agent_secret_key(secret_sha256)).await?;
        if let Some(tenant) = indexed {
            return Ok(Some(TenantId::from_store(tenant)));
        }
        let legacy: HashMap<String, String> =
            self.conn().hgetall(legacy_agent_cred_key(agent_id)).await?;
        Ok(legacy
            .get("tenant")
            .filter(|_| legacy.get("secret_sha256").map(String::as_str) == Some(secret_sha256))
            .map(|t| TenantId::from_store(t.clone())))
    }

    /// Sets some of a forest's operator switches.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn set_forest_switches(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        fields: &[(&str, String)],
    ) -> Result<()> {
        let _: () = self
            .conn()
            .hset_multiple(forest_key(tenant, forest), fields)
            .await?;
        Ok(())
    }

    /// A forest's operator switches as stored (missing ones were never set).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn forest_switches(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
    ) -> Result<HashMap<String, String>> {
        Ok(self.conn().hgetall(forest_key(tenant, forest)).await?)
    }
}

/// Reads one forest's work stream for one consumer (an agent instance) on a dedicated
/// connection, so blocking reads do not hold up other commands.
pub struct QueueReader {
    conn: backend::Blocking,
    queue: String,
    consumer: String,
    block: Duration,
}

impl QueueReader {
    /// New entries, blocking up to `block` (at most the reader's block time).
    ///
    /// # Errors
    /// On Redis errors or malformed entries.
    pub async fn read_new(&mut self, count: usize, block: Duration) -> Result<Vec<QueueEntry>> {
        self.read_group(count, Some(block.min(self.block)), ">")
            .await
    }

    /// Entries delivered to this consumer before and not yet acknowledged (after a
    /// reconnect of the same instance).
    ///
    /// # Errors
    /// On Redis errors or malformed entries.
    pub async fn own_pending(&mut self, count: usize) -> Result<Vec<QueueEntry>> {
        self.read_group(count, None, "0").await
    }

    /// `XREADGROUP` for this consumer from `from` (`>`: new entries; `0`: its pending ones).
    async fn read_group(
        &mut self,
        count: usize,
        block: Option<Duration>,
        from: &str,
    ) -> Result<Vec<QueueEntry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        let reply: redis::Value = cmd
            .arg("STREAMS")
            .arg(&self.queue)
            .arg(from)
            .query_async(&mut self.conn)
            .await?;
        parse_read_reply(&self.queue, reply)
    }

    /// Claims entries that have been pending longer than `min_idle` on any consumer (a replica
    /// or agent session that died), so they are looked at again.
    ///
    /// # Errors
    /// On Redis errors or malformed entries.
    pub async fn autoclaim(&mut self, min_idle: Duration, count: usize) -> Result<Vec<QueueEntry>> {
        let reply: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.queue)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn)
            .await?;
        let parsed: redis::streams::StreamAutoClaimReply = redis::from_redis_value(reply)?;
        parsed
            .claimed
            .into_iter()
            .map(|id| parse_entry(&self.queue, id))
            .collect()
    }
}

/// Parses an `XREADGROUP` reply into queue entries.
///
/// # Errors
/// On malformed entries.
fn parse_read_reply(queue: &str, reply: redis::Value) -> Result<Vec<QueueEntry>> {
    let parsed: Option<redis::streams::StreamReadReply> = redis::from_redis_value(reply)?;
    let mut out = Vec::new();
    for key in parsed.map(|r| r.keys).unwrap_or_default() {
        for id in key.ids {
            out.push(parse_entry(queue, id)?);
        }
    }
    Ok(out)
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
        operation_id: OperationId::from_store(text("op")?),
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
        kind: id.get::<String>("kind").unwrap_or_default(),
        id: id.id.clone(),
    })
}
