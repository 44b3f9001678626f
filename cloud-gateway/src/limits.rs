//! Per-tenant rate limiting of `Submit` on each replica (token bucket), so one tenant's wave of
//! resets cannot starve the others or flood their domain controllers. Over the limit a caller
//! gets `RESOURCE_EXHAUSTED` and may retry with the same operation id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::TenantId;

/// Rate and burst of one tenant's bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per tenant.
#[derive(Debug)]
pub struct TenantLimiter {
    rate: Option<Rate>,
    buckets: Mutex<HashMap<TenantId, Bucket>>,
}

impl TenantLimiter {
    /// `None` turns limiting off.
    pub fn new(rate: Option<Rate>) -> Self {
        Self {
            rate,
            buckets: Mutex::default(),
        }
    }

    /// Takes one token for `tenant` at `now`; `Err(wait)` when none is left.
    ///
    /// # Errors
    /// How long until a token is available.
    pub fn try_acquire_at(&self, tenant: &TenantId, now: Instant) -> Result<(), Duration> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let mut buckets = self.buckets.lock().expect("limiter");
        let bucket = buckets.entry(tenant.clone()).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(rate.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / rate.per_second.max(f64::MIN_POSITIVE),
            ))
        }
    }

    /// As [`TenantLimiter::try_acquire_at`], now.
    ///
    /// # Errors
    /// How long until a token is available.
    pub fn try_acquire(&self, tenant: &TenantId) -> Result<(), Duration> {
        self.try_acquire_at(tenant, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_per_tenant() {
        let l = TenantLimiter::new(Some(Rate {
            per_second: 2.0,
            burst: 3.0,
        }));
        let (acme, globex) = (
            TenantId::new("acme").unwrap(),
            TenantId::new("globex").unwrap(),
        );
        let t0 = Instant::now();
        for _ in 0..3 {
            l.try_acquire_at(&acme, t0).unwrap();
        }
        let wait = l.try_acquire_at(&acme, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        l.try_acquire_at(&globex, t0)
            .expect("tenants have separate buckets");
        l.try_acquire_at(&acme, t0 + Duration::from_millis(500))
            .expect("refilled one token");
        assert!(l
            .try_acquire_at(&acme, t0 + Duration::from_millis(500))
            .is_err());
    }

    #[test]
    fn off_means_unlimited() {
        let l = TenantLimiter::new(None);
        let acme = TenantId::new("acme").unwrap();
        for _ in 0..10_000 {
            l.try_acquire(&acme).unwrap();
        }
    }
}
