//! Abuse limits, shared by every replica through the store (`store/limits.rs`):
//!
//! - a tenant's rate of calls, on every RPC (Submit, GetOperation, ListOperations, ListAgents,
//!   GetPasswordPolicy), so one tenant cannot starve the others, flood its DCs, or scan;
//! - per user, the `change` attempts not shown to have had the right old password (the relay
//!   must not be a guessing oracle: `WRONG_OLD_PASSWORD` vs `APPLIED` tells whether a guess
//!   was right), and unlock requests (an unlock resets AD's lockout counter: unlimited unlocks
//!   between guesses would bypass the lockout policy).
//!
//! A `change` takes one unit of the user's guess budget when it is accepted and gets it back
//! when it is answered anything but `WRONG_OLD_PASSWORD`; an answer never heard (timed out,
//! expired) keeps it. So guesses in flight count too, and parallel guesses cannot overrun it.
//! Over a limit the caller hears `RESOURCE_EXHAUSTED` with the wait, also as
//! `grpc-retry-pushback-ms` (`error.rs`).

use std::time::Duration;

use relay::proto::Outcome;

use crate::error::GatewayError;
use crate::store::{self, Budget, ForestId, TenantId};
use crate::Gateway;

/// Rate and burst of one tenant's calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// Per-user budgets within a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    /// `change` attempts without the right old password (0: unlimited).
    pub guesses: u32,
    /// Unlock requests (0: unlimited).
    pub unlocks: u32,
    pub window: Duration,
}

impl Default for UserLimits {
    /// 5 wrong old passwords and 5 unlocks per user per 15 minutes: below AD's usual lockout
    /// threshold, above what a user retrying by hand needs.
    fn default() -> Self {
        Self {
            guesses: 5,
            unlocks: 5,
            window: Duration::from_secs(15 * 60),
        }
    }
}

/// Admits one call of `tenant` under its shared rate.
///
/// # Errors
/// [`GatewayError::RateLimited`] over the rate; store errors.
pub async fn admit(gw: &Gateway, tenant: &TenantId) -> Result<(), GatewayError> {
    let Some(rate) = gw.config.tenant_rate else {
        return Ok(());
    };
    let now = gw.clock.now_ms();
    if let Err(wait) = gw
        .store
        .take_rate(tenant, rate.per_second, rate.burst, now)
        .await?
    {
        tracing::warn!(event = "WB1007", %tenant, "tenant over its rate; RESOURCE_EXHAUSTED");
        return Err(GatewayError::RateLimited {
            tenant: tenant.to_string(),
            retry_ms: wait.as_millis() as u64 + 1,
        });
    }
    Ok(())
}

/// The budget an operation of `kind` draws on, with its limit.
fn budget_of(limits: &UserLimits, kind: &str) -> Option<(Budget, u32)> {
    match kind {
        "change" if limits.guesses > 0 => Some((Budget::Guesses, limits.guesses)),
        "unlock" if limits.unlocks > 0 => Some((Budget::Unlocks, limits.unlocks)),
        _ => None,
    }
}

/// One unit of a user's budget, taken for an operation being accepted. Give it back with
/// [`Taken::refund`] when the operation is not queued after all.
#[must_use]
pub struct Taken {
    key: String,
}

impl Taken {
    /// Gives the unit back (the operation was not queued).
    pub async fn refund(self, gw: &Gateway) {
        if let Err(e) = gw.store.refund_budget(&self.key).await {
            tracing::warn!(error = %e, "could not give back a user's budget unit; it expires with its window");
        }
    }
}

/// Takes one unit of the user's budget for an operation of `kind` (`None`: it draws on none).
///
/// # Errors
/// [`GatewayError::UserLimited`] when the user's budget is spent; store errors.
pub async fn take_user(
    gw: &Gateway,
    tenant: &TenantId,
    forest: &ForestId,
    kind: &str,
    user_label: &str,
) -> Result<Option<Taken>, GatewayError> {
    let limits = gw.config.user_limits;
    let Some((budget, limit)) = budget_of(&limits, kind) else {
        return Ok(None);
    };
    let key = store::budget_key(tenant, forest, budget, user_label);
    if let Err(wait) = gw.store.take_budget(&key, limit, limits.window).await? {
        tracing::warn!(event = "WB1009", %forest, user = %user_label, budget = ?budget, limit, "user over its budget; RESOURCE_EXHAUSTED, nothing queued");
        return Err(GatewayError::UserLimited {
            what: match budget {
                Budget::Guesses => "password changes with a wrong or unconfirmed old password",
                Budget::Unlocks => "unlock requests",
            },
            limit,
            window_s: limits.window.as_secs(),
            retry_ms: wait.as_millis() as u64,
        });
    }
    Ok(Some(Taken { key }))
}

/// Settles the guess budget when an operation's first outcome is recorded: a `change`
/// answered anything but `WRONG_OLD_PASSWORD` had the right old password (or never tried it)
/// and gives its unit back.
pub async fn settled(
    gw: &Gateway,
    tenant: &TenantId,
    forest: &ForestId,
    kind: &str,
    user_label: &str,
    outcome: Outcome,
) {
    let limits = gw.config.user_limits;
    if kind != "change" || limits.guesses == 0 || outcome == Outcome::WrongOldPassword {
        return;
    }
    Taken {
        key: store::budget_key(tenant, forest, Budget::Guesses, user_label),
    }
    .refund(gw)
    .await;
}
