//! The deadline sweeper: every replica periodically applies the deadline rules to operations
//! whose deadline passed (by the store's clock), so each accepted operation reaches a terminal
//! outcome even when the replica that accepted it died (SPEC invariant 2). It walks the
//! tenant registry and each tenant's own deadline set: no global key, no SCAN.

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

/// One pass over due operations of every tenant; returns how many it settled.
///
/// # Errors
/// On Redis errors.
pub async fn sweep_once(gw: &Gateway) -> Result<usize, crate::store::StoreError> {
    let mut settled = 0;
    for tenant in gw.store.tenant_ids().await? {
        // A store restored from an older state is caught here even when no work moves.
        gw.store.check_sequence(&tenant, 0, "sweeper").await?;
        for (forest, op) in gw.store.due_deadlines(&tenant, BATCH).await? {
            // Terminal or missing operations leave the deadline set inside the script.
            if let Finalized::Terminal(outcome) = gw
                .store
                .finalize(
                    &tenant,
                    &forest,
                    &op,
                    &gw.config.replica_id,
                    gw.config.ack_grace,
                )
                .await?
            {
                tracing::debug!(%tenant, operation_id = %op, outcome = outcome.as_str_name(), "settled");
                settled += 1;
            }
        }
    }
    Ok(settled)
}
