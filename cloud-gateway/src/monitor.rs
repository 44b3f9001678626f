//! Periodic measurements every replica takes: each forest queue's depth and the age of its
//! oldest entry (for the "oldest queued operation too old" alert), and the end-to-end canary
//! that keeps agent health honest: gateway → agent → a harmless read on a DC → back, run for
//! each forest by one replica holding one of its agents.

use std::time::Duration;

use crate::{store, Gateway};

const EVERY: Duration = Duration::from_secs(5);

pub async fn run(gw: Gateway) {
    tokio::join!(queues(gw.clone()), canaries(gw));
}

/// Longest a canary may take before the forest is declared unhealthy.
const CANARY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a canary's operation record is kept.
const CANARY_RECORD_TTL: Duration = Duration::from_secs(600);

async fn canaries(gw: Gateway) {
    if gw.config.canary_interval.is_zero() {
        return;
    }
    // Look often; the per-forest lock in Redis keeps it to one canary per interval, and a newly
    // connected forest is checked within seconds.
    let mut tick = tokio::time::interval(gw.config.canary_interval.min(Duration::from_secs(2)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let forests: Vec<(store::TenantId, store::ForestId)> = gw
            .sessions
            .lock()
            .expect("sessions")
            .keys()
            .cloned()
            .collect();
        for (tenant, forest) in forests {
            match gw
                .store
                .canary_turn(
                    &tenant,
                    &forest,
                    &gw.config.replica_id,
                    gw.config.canary_interval,
                )
                .await
            {
                Ok(true) => {
                    let gw = gw.clone();
                    gw.tasks
                        .clone()
                        .spawn(async move { canary(&gw, &tenant, &forest).await });
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(event = "WB1090", error = %e, "canary scheduling failed"),
            }
        }
    }
}

/// Runs one canary for (tenant, forest) and records the forest's health.
pub async fn canary(gw: &Gateway, tenant: &store::TenantId, forest: &store::ForestId) {
    use relay::proto::{
        sealed_operation::Action, Initiator, Outcome, QueryPolicy, SealedOperation, UserRef,
    };
    let service = crate::writeback::WritebackService::new(gw.clone());
    let op = store::OperationId::generate("canary-");
    let sealed = SealedOperation {
        user: Some(UserRef {
            forest: forest.to_string(),
            id: None,
        }),
        initiator: Initiator::Admin as i32,
        action: Some(Action::QueryPolicy(QueryPolicy {})),
        switches: None,
    };
    let started = std::time::Instant::now();
    let result = async {
        let recipients = service.recipients(tenant, forest).await?;
        if recipients.is_empty() {
            return Err(crate::error::GatewayError::Unavailable(
                "no live agent to run the canary".into(),
            ));
        }
        service
            .enqueue(
                tenant,
                forest,
                &op,
                crate::writeback::Sealing {
                    operation: sealed,
                    recipients: &recipients,
                    canonical_user: None,
                },
                CANARY_TIMEOUT,
                CANARY_RECORD_TTL,
            )
            .await?;
        service
            .wait_for_outcome(tenant, &op, CANARY_TIMEOUT + Duration::from_millis(500))
            .await?;
        Ok::<_, crate::error::GatewayError>(gw.store.operation(tenant, &op).await?)
    }
    .await;
    let took = started.elapsed().as_millis() as u64;
    let (healthy, reason) = match result {
        Ok(Some(rec)) if rec.outcome == Outcome::Applied => (
            true,
            format!("canary answered in {took} ms ({})", rec.detail),
        ),
        Ok(Some(rec))
            if rec.outcome == Outcome::Unspecified || rec.outcome == Outcome::TimedOut =>
        {
            (
                false,
                format!(
                    "canary unanswered after {} s: agent or link stuck",
                    CANARY_TIMEOUT.as_secs()
                ),
            )
        }
        Ok(Some(rec)) => (
            false,
            format!(
                "canary {}: {}",
                rec.outcome.as_str_name(),
                if rec.detail.is_empty() {
                    rec.message
                } else {
                    rec.detail
                }
            ),
        ),
        Ok(None) => (false, "canary record vanished".to_owned()),
        Err(e) => (false, format!("canary could not run: {e}")),
    };
    if healthy {
        tracing::debug!(%tenant, %forest, took, "canary passed");
    } else {
        tracing::warn!(event = "WB1040", %tenant, %forest, %reason, "forest unhealthy: canary failed");
    }
    crate::metrics::get()
        .forest_healthy
        .with_label_values(&[tenant.as_str(), forest.as_str()])
        .set(i64::from(healthy));
    if let Err(e) = gw
        .store
        .set_health(tenant, forest, healthy, &reason, took)
        .await
    {
        tracing::warn!(event = "WB1090", error = %e, "could not record forest health");
    }
}

async fn queues(gw: Gateway) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = measure_queues(&gw).await {
            crate::metrics::get().redis_errors.inc();
            tracing::warn!(event = "WB1090", error = %e, "queue measurement failed");
        }
    }
}

/// Sets the queue gauges from Redis, walking the tenant registry and each tenant's forests
/// (no SCAN: the cost follows the number of queues, not the keyspace); returns how many
/// queues were measured.
///
/// # Errors
/// On Redis errors.
pub async fn measure_queues(gw: &Gateway) -> Result<usize, store::StoreError> {
    let m = crate::metrics::get();
    let now = gw.clock.now_ms();
    let mut measured = 0;
    for tenant in gw.store.tenant_ids().await? {
        for forest in gw.store.forests(&tenant).await? {
            let (depth, oldest_ms) = gw.store.queue_stats(&tenant, &forest).await?;
            let age = oldest_ms.map_or(0.0, |ms| (now - ms).max(0) as f64 / 1000.0);
            let labels = [tenant.as_str(), forest.as_str()];
            m.queue_depth.with_label_values(&labels).set(depth);
            m.queue_oldest_age_seconds
                .with_label_values(&labels)
                .set(age);
            let live = gw
                .store
                .live_agents(&tenant, &forest, gw.config.agent_liveness)
                .await?;
            m.live_agents.with_label_values(&labels).set(live as i64);
            measured += 1;
        }
    }
    Ok(measured)
}
