//! Callers waiting for outcomes on this replica, woken by `wb:done:<replica>` notifications.
//!
//! Redis pub/sub is fire-and-forget, so a waiter never relies on it alone: it arms its
//! notification before reading the record, and re-reads the record on a slow poll as well.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{self, Store};

/// Per operation: the notifier and how many waiters hold it.
type Registry = HashMap<String, (Arc<Notify>, usize)>;

#[derive(Clone, Default)]
pub struct Waiters {
    inner: Arc<Mutex<Registry>>,
}

/// A registration; dropping it removes the waiter.
pub struct Waiter {
    waiters: Waiters,
    key: String,
    pub notify: Arc<Notify>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut map = self.waiters.inner.lock().expect("waiters");
        if let Some(entry) = map.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Waiters {
    /// Registers interest in one operation's outcome.
    pub fn register(&self, tenant: &store::TenantId, op: &store::OperationId) -> Waiter {
        let key = store::op_ref(tenant, op);
        let mut map = self.inner.lock().expect("waiters");
        let entry = map
            .entry(key.clone())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Waiter {
            waiters: self.clone(),
            notify: entry.0.clone(),
            key,
        }
    }

    /// Wakes everyone waiting on `op_ref` (`tenant\0op`).
    pub fn wake(&self, op_ref: &str) {
        if let Some((n, _)) = self.inner.lock().expect("waiters").get(op_ref) {
            n.notify_waiters();
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("waiters").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Listens on this replica's done channel until `shutdown`, reconnecting with backoff.
    pub async fn listen(self, store: Store, replica: String, shutdown: CancellationToken) {
        let channel = store::done_channel(&replica);
        let mut backoff =
            relay::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let session = async {
                let mut pubsub = store.subscribe(&channel).await?;
                tracing::debug!(%channel, "listening for outcomes");
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        self.wake(&payload);
                    }
                }
                Ok::<_, store::StoreError>(())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = session => {
                    if let Err(e) = r {
                        tracing::warn!(event = "WB1090", error = %e, "outcome listener lost redis; reconnecting");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_registered_waiters_and_cleans_up() {
        let w = Waiters::default();
        let t = store::TenantId::new("t").unwrap();
        let op = store::OperationId::new("op").unwrap();
        let a = w.register(&t, &op);
        let b = w.register(&t, &op);
        let notify = a.notify.clone();
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        w.wake(&store::op_ref(&t, &op));
        tokio::time::timeout(Duration::from_secs(1), notified)
            .await
            .unwrap();
        drop(a);
        assert_eq!(w.len(), 1);
        drop(b);
        assert!(w.is_empty());
    }
}
