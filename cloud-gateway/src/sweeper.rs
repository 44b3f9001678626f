//! The deadline sweeper: every replica periodically applies the deadline rules to operations
//! whose deadline passed, so each accepted operation reaches a terminal outcome even when the
//! replica that accepted it died (SPEC invariant 2).

use std::time::Duration;

use crate::store::Finalized;
use crate::Gateway;

const SWEEP_EVERY: Duration = Duration::from_secs(1);
const BATCH: isize = 200;

pub async fn run(gw: Gateway) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sweep_once(&gw).await {
            tracing::warn!(event = "WB1090", error = %e, "deadline sweep failed; retrying next tick");
        }
    }
}

/// One pass over due operations.
///
/// # Errors
/// On Redis errors.
pub async fn sweep_once(gw: &Gateway) -> Result<usize, crate::store::StoreError> {
    let due = gw.store.due_deadlines(relay::now_unix_ms(), BATCH).await?;
    let mut settled = 0;
    for member in due {
        let Some((tenant, op)) = crate::store::parse_op_ref(&member) else {
            gw.store.forget_deadline(&member).await?;
            continue;
        };
        match gw
            .store
            .finalize(tenant, op, &gw.config.replica_id, gw.config.ack_grace)
            .await?
        {
            Finalized::Terminal(outcome) => {
                tracing::debug!(%tenant, operation_id = %op, outcome = outcome.as_str_name(), "settled");
                gw.store.forget_deadline(&member).await?;
                settled += 1;
            }
            Finalized::Missing => gw.store.forget_deadline(&member).await?,
            Finalized::Pending => {}
        }
    }
    Ok(settled)
}
