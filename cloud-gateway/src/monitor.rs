//! Periodic measurements every replica takes: each forest queue's depth and the age of its
//! oldest entry (for the "oldest queued operation too old" alert).

use std::time::Duration;

use futures::StreamExt;

use crate::{store, Gateway};

const EVERY: Duration = Duration::from_secs(5);

pub async fn run(gw: Gateway) {
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

/// Sets the queue gauges from Redis; returns how many queues were measured.
///
/// # Errors
/// On Redis errors.
pub async fn measure_queues(gw: &Gateway) -> Result<usize, redis::RedisError> {
    let mut scan_conn = gw.store.conn();
    let keys: Vec<String> = {
        let iter: redis::AsyncIter<'_, String> =
            redis::AsyncCommands::scan_match(&mut scan_conn, "wb:{*}:q:*").await?;
        iter.filter_map(|k| async move { k.ok() }).collect().await
    };
    let m = crate::metrics::get();
    let mut conn = gw.store.conn();
    for key in &keys {
        let Some((tenant, forest)) = store::parse_queue_key(key) else {
            continue;
        };
        let depth: i64 = redis::cmd("XLEN").arg(key).query_async(&mut conn).await?;
        let first: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let oldest_ms = first
            .first()
            .and_then(|(id, _)| id.split('-').next()?.parse::<i64>().ok());
        let age = oldest_ms.map_or(0.0, |ms| (relay::now_unix_ms() - ms).max(0) as f64 / 1000.0);
        m.queue_depth
            .with_label_values(&[tenant, forest])
            .set(depth);
        m.queue_oldest_age_seconds
            .with_label_values(&[tenant, forest])
            .set(age);
    }
    Ok(keys.len())
}
