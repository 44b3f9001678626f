//! The store's clock as this replica estimates it between reads of Redis `TIME`. Deadlines are
//! set and settled by the store's clock, so a replica whose own clock is seconds off still
//! gives every operation the time its caller asked for, and settles none early.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::store::{Store, StoreError};

/// How often the offset to the store's clock is measured again.
const SYNC_EVERY: Duration = Duration::from_secs(5);

/// This replica's estimate of the store's clock.
#[derive(Debug, Default)]
pub struct StoreClock {
    offset_ms: AtomicI64,
}

impl StoreClock {
    /// The store's time now, in Unix milliseconds (this host's clock plus the last measured
    /// offset; within half a Redis round trip of `TIME`).
    pub fn now_ms(&self) -> i64 {
        relay::now_unix_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Measures the offset between this host's clock and the store's.
    ///
    /// # Errors
    /// On Redis errors (the previous offset stays).
    pub async fn sync(&self, store: &Store) -> Result<i64, StoreError> {
        let before = relay::now_unix_ms();
        let store_now = store.now_ms().await?;
        let after = relay::now_unix_ms();
        let offset = store_now - (before + after) / 2;
        self.offset_ms.store(offset, Ordering::Relaxed);
        Ok(offset)
    }

    /// Keeps the offset fresh until `shutdown`.
    pub async fn run(
        self: std::sync::Arc<Self>,
        store: Store,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.sync(&store).await {
                Ok(offset) if offset.abs() > 2000 => {
                    tracing::warn!(event = "WB1032", offset_ms = offset, "this host's clock is off the store's by more than 2 s; deadlines follow the store's clock");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(event = "WB1090", error = %e, "cannot read the store's clock; keeping the last offset")
                }
            }
        }
    }
}
