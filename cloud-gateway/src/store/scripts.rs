//! The Lua scripts that move an operation through its states, one Rust type each: the type
//! builds the script's keys and arguments and parses its reply into an enum. A reply the
//! script cannot give is an error, never a default.
//!
//! Every script reads the clock with Redis `TIME`: one clock decides deadlines and settlement,
//! whichever replica runs the script and however its own clock drifts.
//!
//! States: `queued` → `delivered` (to one agent instance) → `done` (one terminal outcome,
//! first one wins). `queued` → `done` as `EXPIRED` when the deadline passes first. Settling an
//! operation deletes its stream entry, so no sealed payload outlives the operation's need.
//! A user's operations are delivered one at a time in acceptance order: each joins its user's
//! queue when accepted and leaves it when settled, and only the head may be delivered.

use std::sync::LazyLock;

use redis::{FromRedisValue, Script, ToRedisArgs};

use relay::proto::{Outcome, PolicyViolation};

use super::backend::{eval_replicated, Conn};
use super::ids::{ForestId, OperationId, TenantId};
use super::keys;
use super::{Result, StoreError};

/// Shared Lua prelude: the Redis clock and timeline events in the `TimelineEvent` JSON form.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function event(stage, replica, agent, detail)
  return cjson.encode({stage = stage, at = now, replica = replica, agent = agent, detail = detail})
end
-- A user's unsettled operations in acceptance order: `wb:{T}:uq:<forest>:<user>`, built from
-- the record (same tenant, so the same hash slot as every declared key).
local function user_queue(op)
  local f = redis.call('HMGET', op, 'tenant', 'forest', 'user')
  if not f[3] or f[3] == '' then return nil end
  return 'wb:{' .. f[1] .. '}:uq:' .. f[2] .. ':' .. f[3]
end
local function leave_user_queue(op)
  local uq = user_queue(op)
  if uq then redis.call('LREM', uq, 1, redis.call('HGET', op, 'op')) end
end
-- The tenant's store sequence (`wb:{T}:seq`): +1 on every change of an operation's state.
-- A script given a higher sequence than the store holds (what the caller has seen) does
-- nothing: the store was restored from an older state.
local function behind(sq, seen)
  local n = tonumber(redis.call('GET', sq) or '0')
  if n < tonumber(seen) then return n end
  return nil
end
local function version(sq) return tonumber(redis.call('GET', sq) or '0') end
local function bump(sq) return redis.call('INCR', sq) end
local function settle_entry(op, q)
  local entry = redis.call('HGET', op, 'entry')
  if entry then
    redis.call('XACK', q, 'agents', entry)
    redis.call('XDEL', q, entry)
  end
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// One call of a script: its keys (all of one tenant, so one hash slot) and arguments.
struct Call<'s> {
    script: &'s Script,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

fn call(script: &Script) -> Call<'_> {
    Call {
        script,
        keys: Vec::new(),
        args: Vec::new(),
    }
}

impl Call<'_> {
    fn key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }
    fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.args.extend(arg.to_redis_args());
        self
    }
    /// Runs the script (`EVALSHA`, loading it when the node lacks it) and, when `acks > 0`,
    /// waits for that many replicas to have its write; the reply and how many do.
    async fn invoke<T: FromRedisValue>(
        self,
        conn: &mut Conn,
        acks: u32,
    ) -> Result<(T, Option<u32>)> {
        let mut eval = redis::cmd("EVALSHA");
        eval.arg(self.script.get_hash()).arg(self.keys.len());
        for k in &self.keys {
            eval.arg(k);
        }
        for a in &self.args {
            eval.arg(a.as_slice());
        }
        let (value, acked) = eval_replicated(conn, self.script, &eval, acks).await?;
        Ok((redis::from_redis_value(value)?, acked))
    }
}

fn corrupt(script: &str, key: &str, reply: impl std::fmt::Debug) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        detail: format!("{script} replied {reply:?}"),
    }
}

/// A guarded script's reply: what it did and the store sequence after, or that the store is
/// behind the sequence the caller has seen (nothing was done).
/// `acked`: how many replicas had the write when asked for some (`RedisOptions::replica_acks`).
pub(super) enum Guarded<T> {
    Ran {
        value: T,
        version: u64,
        acked: Option<u32>,
    },
    Behind {
        store_seq: u64,
    },
}

impl<T> Guarded<T> {
    fn from_reply(
        status: &str,
        version: u64,
        acked: Option<u32>,
        parse: impl FnOnce(&str) -> Result<T>,
    ) -> Result<Self> {
        if status == "behind" {
            return Ok(Self::Behind { store_seq: version });
        }
        Ok(Self::Ran {
            value: parse(status)?,
            version,
            acked,
        })
    }
}

fn outcome(code: i64, key: &str) -> Result<Outcome> {
    i32::try_from(code)
        .ok()
        .and_then(|c| Outcome::try_from(c).ok())
        .filter(|o| *o != Outcome::Unspecified)
        .ok_or_else(|| corrupt("outcome", key, code))
}

/// Accepts an operation: record, timeline, stream entry and deadline in one step.
pub(super) struct CreateOp<'a> {
    pub op: &'a super::NewOperation<'a>,
    /// Most entries the forest's queue may hold.
    pub queue_limit: u64,
    /// Most unsettled operations the tenant may have, over all its forests.
    pub tenant_limit: u64,
    /// The highest store sequence of the tenant this replica has seen (0: none).
    pub high_water: u64,
}

/// What [`CreateOp`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Queued now.
    New,
    /// The id existed for the same forest, kind and user (a resubmission or a race).
    Exists,
    /// The id existed for another forest, kind or user: nothing was queued.
    Conflict,
    /// The forest's queue is full: nothing was queued.
    QueueFull,
    /// The tenant has its limit of unsettled operations: nothing was queued.
    TenantFull,
    /// The deadline had already passed by the store's clock: nothing was queued.
    PastDeadline,
}

static CREATE_OP: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local op, tl, q, dl, sq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local b = behind(sq, ARGV[16])
if b then return {'behind', b} end
if redis.call('HGET', op, 'refused') == '1' then
  -- A refused attempt under this id (nothing was queued) gives way to the retry; its
  -- timeline stays and goes on.
  redis.call('DEL', op)
  redis.call('ZREM', 'wb:{' .. ARGV[1] .. '}:refused', ARGV[2])
elseif redis.call('EXISTS', op) == 1 then
  local f = redis.call('HMGET', op, 'forest', 'kind', 'user')
  if f[1] == ARGV[3] and f[2] == ARGV[4] and (f[3] or '') == ARGV[13] then return {'exists', version(sq)} end
  return {'conflict', version(sq)}
end
local deadline = tonumber(ARGV[7])
if now >= deadline then return {'past', version(sq)} end
if redis.call('XLEN', q) >= tonumber(ARGV[14]) then return {'full', version(sq)} end
if redis.call('ZCARD', dl) >= tonumber(ARGV[17]) then return {'tenant-full', version(sq)} end
local seq = bump(sq)
local ttl = tonumber(ARGV[10])
redis.call('HSET', op, 'tenant', ARGV[1], 'op', ARGV[2], 'forest', ARGV[3], 'kind', ARGV[4],
  'initiator', ARGV[5], 'trace_id', ARGV[6], 'accepted', ARGV[15], 'deadline', ARGV[7],
  'caller_replica', ARGV[8], 'state', 'queued', 'outcome', '0', 'violation', '0',
  'user', ARGV[13], 'sends', 0, 'seq', seq)
redis.call('PEXPIRE', op, ttl)
redis.call('RPUSH', tl, event('accepted', ARGV[8], '', ''),
  event('queued', ARGV[8], '', 'queue ' .. q))
redis.call('PEXPIRE', tl, ttl)
local id = redis.call('XADD', q, '*', 'op', ARGV[2], 'deadline', ARGV[7], 'tp', ARGV[9],
  'kv', ARGV[11], 'env', ARGV[12], 'kind', ARGV[4])
redis.call('HSET', op, 'entry', id)
redis.call('ZADD', dl, ARGV[7], ARGV[3] .. '\0' .. ARGV[2])
local uq = user_queue(op)
if uq then
  redis.call('RPUSH', uq, ARGV[2])
  redis.call('PEXPIRE', uq, ttl)
end
return {'created', seq}
"#,
    )
});

impl CreateOp<'_> {
    pub(super) async fn run(&self, conn: &mut Conn, acks: u32) -> Result<Guarded<Created>> {
        let n = self.op;
        let key = keys::op_key(n.tenant, n.operation_id);
        let ((reply, version), acked): ((String, u64), _) = call(&CREATE_OP)
            .key(&key)
            .key(keys::timeline_key(n.tenant, n.operation_id))
            .key(keys::queue_key(n.tenant, n.forest))
            .key(keys::deadlines_key(n.tenant))
            .key(keys::seq_key(n.tenant))
            .arg(n.tenant)
            .arg(n.operation_id)
            .arg(n.forest)
            .arg(n.kind)
            .arg(n.initiator)
            .arg(n.trace_id)
            .arg(n.deadline_ms)
            .arg(n.replica)
            .arg(n.traceparent)
            .arg(n.ttl.as_millis() as u64)
            .arg(n.key_version)
            .arg(n.envelope)
            .arg(n.user)
            .arg(self.queue_limit)
            .arg(n.accepted_ms)
            .arg(self.high_water)
            .arg(self.tenant_limit)
            .invoke(conn, acks)
            .await?;
        Guarded::from_reply(&reply, version, acked, |status| match status {
            "created" => Ok(Created::New),
            "exists" => Ok(Created::Exists),
            "conflict" => Ok(Created::Conflict),
            "full" => Ok(Created::QueueFull),
            "tenant-full" => Ok(Created::TenantFull),
            "past" => Ok(Created::PastDeadline),
            other => Err(corrupt("CREATE_OP", &key, other)),
        })
    }
}

/// Marks an operation delivered to one agent instance, if it is still queued and before its
/// deadline; settles it as `EXPIRED` if the deadline passed first.
pub(super) struct MarkDelivered<'a> {
    pub tenant: &'a TenantId,
    pub forest: &'a ForestId,
    pub op: &'a OperationId,
    pub agent_id: &'a str,
    pub instance: &'a str,
    pub replica: &'a str,
    /// As in [`CreateOp`].
    pub high_water: u64,
}

/// What [`MarkDelivered`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Send it now; `remaining_ms` is what the store's clock leaves before the deadline.
    Deliver { remaining_ms: u32 },
    /// Delivered earlier to this same instance (before a reconnect): send it again.
    Redeliver { remaining_ms: u32 },
    /// Its deadline passed; it is now `EXPIRED` (its entry is gone).
    Expired,
    /// Already terminal, or its record is gone: just drop the stream entry.
    Done,
    /// Delivered earlier to that other agent instance: never send it to a second one.
    AlreadyDelivered(String),
    /// An older operation of the same user (this id) is not settled yet: try again later
    /// (per-user order).
    Wait(OperationId),
}

static MARK_DELIVERED: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local op, tl, q, sq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local b = behind(sq, ARGV[6])
if b then return {'behind', 0, b} end
local state = redis.call('HGET', op, 'state')
if not state then return {'missing', 0, version(sq)} end
if state == 'done' then return {'done', 0, version(sq)} end
local deadline = tonumber(redis.call('HGET', op, 'deadline'))
if now >= deadline and state == 'queued' then
  redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[4], 'message', ARGV[5], 'done_at', now)
  redis.call('RPUSH', tl, event('expired', ARGV[3], '', 'deadline passed before an agent took it; not applied'))
  settle_entry(op, q)
  leave_user_queue(op)
  return {'expired', 0, bump(sq)}
end
-- Past its deadline, delivered work still goes back to its own instance after a reconnect:
-- the agent answers it from its journal, or refuses it as too late (not applied).
local remaining = math.max(deadline - now, 0)
if state == 'delivered' then
  local instance = redis.call('HGET', op, 'agent_instance') or ''
  if instance ~= ARGV[2] then return {'other', instance, version(sq)} end
  redis.call('HINCRBY', op, 'sends', 1)
  redis.call('RPUSH', tl, event('redelivered', ARGV[3], ARGV[1],
    'sent again to instance ' .. ARGV[2] .. ' after a reconnect; it answers from its journal'))
  return {'redeliver', remaining, bump(sq)}
end
-- One operation of a user at a time, in acceptance order: an older one still unsettled first.
local uq = user_queue(op)
if uq then
  local me = redis.call('HGET', op, 'op')
  while true do
    local head = redis.call('LINDEX', uq, 0)
    if not head or head == me then break end
    local head_op = 'wb:{' .. redis.call('HGET', op, 'tenant') .. '}:op:' .. head
    local head_state = redis.call('HGET', head_op, 'state')
    if head_state and head_state ~= 'done' then return {'wait', head, version(sq)} end
    redis.call('LPOP', uq)
  end
end
redis.call('HSET', op, 'state', 'delivered', 'agent', ARGV[1], 'agent_instance', ARGV[2],
  'delivered_at', now, 'delivered_by', ARGV[3], 'sends', 1)
redis.call('RPUSH', tl, event('delivered', ARGV[3], ARGV[1], ''))
return {'deliver', remaining, bump(sq)}
"#,
    )
});

impl MarkDelivered<'_> {
    pub(super) async fn run(&self, conn: &mut Conn, acks: u32) -> Result<Guarded<Delivery>> {
        let key = keys::op_key(self.tenant, self.op);
        let ((status, value, version), acked): ((String, redis::Value, u64), _) =
            call(&MARK_DELIVERED)
                .key(&key)
                .key(keys::timeline_key(self.tenant, self.op))
                .key(keys::queue_key(self.tenant, self.forest))
                .key(keys::seq_key(self.tenant))
                .arg(self.agent_id)
                .arg(self.instance)
                .arg(self.replica)
                .arg(Outcome::Expired as i32)
                .arg(super::EXPIRED_MESSAGE)
                .arg(self.high_water)
                .invoke(conn, acks)
                .await?;
        let number = || -> Result<u32> {
            let n: i64 = redis::from_redis_value(value.clone())?;
            u32::try_from(n).map_err(|_| corrupt("MARK_DELIVERED", &key, n))
        };
        Guarded::from_reply(&status, version, acked, |status| match status {
            "deliver" => Ok(Delivery::Deliver {
                remaining_ms: number()?,
            }),
            "redeliver" => Ok(Delivery::Redeliver {
                remaining_ms: number()?,
            }),
            "expired" => Ok(Delivery::Expired),
            "done" | "missing" => Ok(Delivery::Done),
            "other" => Ok(Delivery::AlreadyDelivered(redis::from_redis_value(
                value.clone(),
            )?)),
            "wait" => Ok(Delivery::Wait(OperationId::from_store(
                redis::from_redis_value::<String>(value.clone())?,
            ))),
            other => Err(corrupt("MARK_DELIVERED", &key, other)),
        })
    }
}

/// An agent instance's acknowledgment, as [`Complete`] records it.
#[derive(Debug)]
pub struct Acknowledgment<'a> {
    pub tenant: &'a TenantId,
    pub forest: &'a ForestId,
    pub op: &'a OperationId,
    pub instance: &'a str,
    pub agent_id: &'a str,
    pub replica: &'a str,
    pub outcome: Outcome,
    pub violation: PolicyViolation,
    pub message: &'a str,
    pub detail: &'a str,
    /// Timeline detail of the acknowledgment (timings, the DC).
    pub event_detail: &'a str,
    pub result: &'a [u8],
}

/// Records an agent instance's acknowledgment as the terminal outcome.
pub(super) struct Complete<'a> {
    pub ack: &'a Acknowledgment<'a>,
    /// As in [`CreateOp`].
    pub high_water: u64,
}

/// What [`Complete`] did with an acknowledgment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// This acknowledgment set the outcome; notify the caller's replica.
    Recorded { caller_replica: String },
    /// An outcome was already recorded; the acknowledgment is kept on the timeline only.
    AlreadyFinal,
    /// The operation was never delivered to this instance (another one has it, or none):
    /// refused, kept on the timeline.
    NotDeliveredHere,
    /// No such operation of this forest (gone, or another forest's).
    Unknown,
}

static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local op, tl, q, dl, sq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local b = behind(sq, ARGV[11])
if b then return {'behind', '', b} end
local state = redis.call('HGET', op, 'state')
if not state then return {'unknown', '', version(sq)} end
if redis.call('HGET', op, 'forest') ~= ARGV[1] then return {'unknown', '', version(sq)} end
if (redis.call('HGET', op, 'agent_instance') or '') ~= ARGV[2] then
  redis.call('RPUSH', tl, event('refused-acknowledgment', ARGV[4], ARGV[3],
    'from instance ' .. ARGV[2] .. ', which was not given this operation'))
  return {'not-here', '', version(sq)}
end
if state == 'done' then
  redis.call('RPUSH', tl, event('late-acknowledgment', ARGV[4], ARGV[3], ARGV[10]))
  return {'final', '', version(sq)}
end
settle_entry(op, q)
leave_user_queue(op)
redis.call('ZREM', dl, ARGV[1] .. '\0' .. (redis.call('HGET', op, 'op') or ''))
redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[5], 'violation', ARGV[6],
  'message', ARGV[7], 'done_at', now, 'detail', ARGV[8])
if ARGV[9] ~= '' then redis.call('HSET', op, 'result', ARGV[9]) end
redis.call('RPUSH', tl, event('acknowledged', ARGV[4], ARGV[3], ARGV[10]))
return {'recorded', redis.call('HGET', op, 'caller_replica') or '', bump(sq)}
"#,
    )
});

impl Complete<'_> {
    pub(super) async fn run(&self, conn: &mut Conn, acks: u32) -> Result<Guarded<Completion>> {
        let a = self.ack;
        let key = keys::op_key(a.tenant, a.op);
        let ((status, caller, version), acked): ((String, String, u64), _) = call(&COMPLETE)
            .key(&key)
            .key(keys::timeline_key(a.tenant, a.op))
            .key(keys::queue_key(a.tenant, a.forest))
            .key(keys::deadlines_key(a.tenant))
            .key(keys::seq_key(a.tenant))
            .arg(a.forest)
            .arg(a.instance)
            .arg(a.agent_id)
            .arg(a.replica)
            .arg(a.outcome as i32)
            .arg(a.violation as i32)
            .arg(a.message)
            .arg(a.detail)
            .arg(a.result)
            .arg(a.event_detail)
            .arg(self.high_water)
            .invoke(conn, acks)
            .await?;
        Guarded::from_reply(&status, version, acked, |status| match status {
            "recorded" => Ok(Completion::Recorded {
                caller_replica: caller,
            }),
            "final" => Ok(Completion::AlreadyFinal),
            "not-here" => Ok(Completion::NotDeliveredHere),
            "unknown" => Ok(Completion::Unknown),
            other => Err(corrupt("COMPLETE", &key, other)),
        })
    }
}

/// The deadline rules for one operation: at its deadline (store clock) one never delivered
/// becomes `EXPIRED` (guaranteed not applied); one delivered but unacknowledged becomes
/// `TIMED_OUT` once the acknowledgment grace period has also passed.
pub(super) struct Finalize<'a> {
    pub tenant: &'a TenantId,
    pub forest: &'a ForestId,
    pub op: &'a OperationId,
    pub replica: &'a str,
    pub ack_grace_ms: u64,
    /// As in [`CreateOp`].
    pub high_water: u64,
}

/// Where an operation stands after the deadline rules ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finalized {
    /// The record is gone (TTL passed).
    Missing,
    /// Not terminal yet. `past_deadline`: the deadline has passed (by the store's clock) and
    /// the operation was delivered, so it can no longer be applied, only answered late.
    Pending {
        past_deadline: bool,
    },
    Terminal(Outcome),
}

static FINALIZE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local op, tl, q, dl, sq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local b = behind(sq, ARGV[9])
if b then return {'behind', 0, b} end
local member = ARGV[1] .. '\0' .. ARGV[2]
local state = redis.call('HGET', op, 'state')
if not state then
  redis.call('ZREM', dl, member)
  return {'missing', 0, version(sq)}
end
if state == 'done' then
  redis.call('ZREM', dl, member)
  return {'terminal', tonumber(redis.call('HGET', op, 'outcome')), version(sq)}
end
local deadline = tonumber(redis.call('HGET', op, 'deadline'))
if now < deadline then return {'pending', 0, version(sq)} end
if state == 'queued' then
  redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[4], 'message', ARGV[5], 'done_at', now)
  redis.call('RPUSH', tl, event('expired', ARGV[3], '', 'deadline passed before an agent took it; not applied'))
  settle_entry(op, q)
  leave_user_queue(op)
  redis.call('ZREM', dl, member)
  return {'terminal', tonumber(ARGV[4]), bump(sq)}
end
if now >= deadline + tonumber(ARGV[8]) then
  redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[6], 'message', ARGV[7], 'done_at', now)
  redis.call('RPUSH', tl, event('timed-out', ARGV[3], '', 'delivered, but no acknowledgment by the deadline'))
  settle_entry(op, q)
  leave_user_queue(op)
  redis.call('ZREM', dl, member)
  return {'terminal', tonumber(ARGV[6]), bump(sq)}
end
return {'pending', 1, version(sq)}
"#,
    )
});

impl Finalize<'_> {
    pub(super) async fn run(&self, conn: &mut Conn, acks: u32) -> Result<Guarded<Finalized>> {
        let key = keys::op_key(self.tenant, self.op);
        let ((status, n, version), acked): ((String, i64, u64), _) = call(&FINALIZE)
            .key(&key)
            .key(keys::timeline_key(self.tenant, self.op))
            .key(keys::queue_key(self.tenant, self.forest))
            .key(keys::deadlines_key(self.tenant))
            .key(keys::seq_key(self.tenant))
            .arg(self.forest)
            .arg(self.op)
            .arg(self.replica)
            .arg(Outcome::Expired as i32)
            .arg(super::EXPIRED_MESSAGE)
            .arg(Outcome::TimedOut as i32)
            .arg(super::TIMED_OUT_MESSAGE)
            .arg(self.ack_grace_ms)
            .arg(self.high_water)
            .invoke(conn, acks)
            .await?;
        Guarded::from_reply(&status, version, acked, |status| match (status, n) {
            ("missing", _) => Ok(Finalized::Missing),
            ("pending", 0) => Ok(Finalized::Pending {
                past_deadline: false,
            }),
            ("pending", 1) => Ok(Finalized::Pending {
                past_deadline: true,
            }),
            ("terminal", code) => Ok(Finalized::Terminal(outcome(code, &key)?)),
            other => Err(corrupt("FINALIZE", &key, other)),
        })
    }
}

/// After a store was restored from an older state (its sequence is behind `seen`, the highest
/// a replica or agent saw): every unsettled operation of the tenant may have been applied
/// after the state it was restored to, so each is settled `TIMED_OUT` ("it may or may not have
/// been applied", never `EXPIRED`), its entry removed so it is never delivered again; then the
/// sequence moves past `seen`. Does nothing when the sequence is not behind (another replica
/// recovered first).
pub(super) struct RecoverRollback<'a> {
    pub tenant: &'a TenantId,
    pub seen: u64,
    pub replica: &'a str,
}

/// What [`RecoverRollback`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recovered {
    /// The store was behind at `store_seq`; `settled` operations were settled as unknown.
    Recovered { store_seq: u64, settled: u64 },
    /// The store's sequence was not behind: nothing to do.
    NotBehind,
}

static RECOVER_ROLLBACK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local sq, dl = KEYS[1], KEYS[2]
local store_seq = tonumber(redis.call('GET', sq) or '0')
local seen = tonumber(ARGV[2])
if store_seq >= seen then return {'not-behind', 0, store_seq} end
local prefix = 'wb:{' .. ARGV[1] .. '}:'
local settled = 0
for _, m in ipairs(redis.call('ZRANGE', dl, 0, -1)) do
  local sep = string.find(m, '\0', 1, true)
  if sep then
    local forest, id = string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
    local op = prefix .. 'op:' .. id
    local state = redis.call('HGET', op, 'state')
    if state and state ~= 'done' then
      redis.call('HSET', op, 'state', 'done', 'outcome', ARGV[3], 'message', ARGV[4], 'done_at', now)
      redis.call('RPUSH', prefix .. 'tl:' .. id, event('store-restored', ARGV[5], '',
        'the store was restored from an older state (sequence ' .. store_seq .. ', ' .. seen ..
        ' seen): whether this operation was applied is not known here'))
      settle_entry(op, prefix .. 'q:' .. forest)
      leave_user_queue(op)
      settled = settled + 1
    end
  end
  redis.call('ZREM', dl, m)
end
redis.call('SET', sq, seen)
return {'recovered', settled, store_seq}
"#,
    )
});

impl RecoverRollback<'_> {
    pub(super) async fn run(&self, conn: &mut Conn, acks: u32) -> Result<Recovered> {
        let key = keys::seq_key(self.tenant);
        let ((status, settled, store_seq), acked): ((String, u64, u64), _) =
            call(&RECOVER_ROLLBACK)
                .key(&key)
                .key(keys::deadlines_key(self.tenant))
                .arg(self.tenant)
                .arg(self.seen)
                .arg(Outcome::TimedOut as i32)
                .arg(super::TIMED_OUT_MESSAGE)
                .arg(self.replica)
                .invoke(conn, acks)
                .await?;
        super::check_replicated(&key, acks, acked)?;
        match status.as_str() {
            "recovered" => Ok(Recovered::Recovered { store_seq, settled }),
            "not-behind" => Ok(Recovered::NotBehind),
            other => Err(corrupt("RECOVER_ROLLBACK", &key, other)),
        }
    }
}
