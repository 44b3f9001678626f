//! Abuse limits shared by every replica, kept in Redis next to the tenant's other keys (one
//! hash slot per tenant): a tenant's rate of calls (GCRA, one key per tenant), and per-user
//! budgets of password guesses and unlocks (a counter per user with a fixed window).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::ids::{ForestId, TenantId};
use super::{Result, Store};

/// `KEYS[1]` the tenant's theoretical arrival time (µs, store clock); `ARGV`: now (µs), the
/// emission interval (µs), the burst tolerance (µs). Returns 0 (admitted) or the µs to wait.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now - tolerance
if wait > 0 then return math.ceil(wait) end
local next = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000) + 1)
return 0
",
    )
});

/// `KEYS[1]` a user's budget counter; `ARGV`: the limit, the window (ms). Takes one unit;
/// returns 0, or the ms until the window ends when the budget is spent (nothing taken).
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    ttl = tonumber(ARGV[2])
  end
  return ttl
end
return 0
",
    )
});

/// `KEYS[1]` a user's budget counter: gives one unit back (never below zero).
static REFUND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then redis.call('DECR', KEYS[1]) end
return 0
",
    )
});

/// A tenant's rate key.
pub fn rate_key(tenant: &TenantId) -> String {
    format!("wb:{{{tenant}}}:rate")
}

/// What a user budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `change` attempts not (yet) shown to have had the right old password.
    Guesses,
    /// Unlock requests.
    Unlocks,
}

impl Budget {
    fn as_str(self) -> &'static str {
        match self {
            Self::Guesses => "guess",
            Self::Unlocks => "unlock",
        }
    }
}

/// One user's budget counter (`label` is [`super::user_label`]).
pub fn budget_key(tenant: &TenantId, forest: &ForestId, budget: Budget, label: &str) -> String {
    format!(
        "wb:{{{tenant}}}:budget:{}:{forest}:{label}",
        budget.as_str()
    )
}

impl Store {
    /// Admits one call of `tenant` at `per_second` with `burst`, by the store's clock
    /// (`now_ms`), shared by every replica. `Ok(Err(wait))` when over the rate.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn take_rate(
        &self,
        tenant: &TenantId,
        per_second: f64,
        burst: f64,
        now_ms: i64,
    ) -> Result<std::result::Result<(), Duration>> {
        let interval = 1_000_000.0 / per_second.max(1e-6);
        let tolerance = interval * (burst.max(1.0) - 1.0);
        let wait_us: i64 = GCRA
            .key(rate_key(tenant))
            .arg(now_ms * 1000)
            .arg(interval)
            .arg(tolerance)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(if wait_us > 0 {
            Err(Duration::from_micros(wait_us as u64))
        } else {
            Ok(())
        })
    }

    /// Takes one unit of a user's budget (`limit` per `window`). `Ok(Err(wait))` when spent.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn take_budget(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> Result<std::result::Result<(), Duration>> {
        let wait_ms: i64 = TAKE
            .key(key)
            .arg(limit)
            .arg(window.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(if wait_ms > 0 {
            Err(Duration::from_millis(wait_ms as u64))
        } else {
            Ok(())
        })
    }

    /// Gives one unit of a user's budget back.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn refund_budget(&self, key: &str) -> Result<()> {
        let _: i64 = REFUND.key(key).invoke_async(&mut self.conn()).await?;
        Ok(())
    }
}
