//! Catching a store restored from an older state (a backup, or a failover to a Redis replica
//! that lagged), which would otherwise put applied work back to "queued" or "delivered", and
//! forget accepted work.
//!
//! Each tenant's store has a sequence, `wb:{T}:seq`: every script that changes an operation's
//! state adds one and replies with it. The [`Store`] remembers the highest it has seen per
//! tenant ([`HighWater`]) and gives it to every guarded script, which does nothing on a store
//! whose sequence is behind it. Agents journal the highest sequence they received
//! (`Work.store_seq`) and report it in their Hello, so the check survives restarts of the
//! gateway too; the sweeper checks every tenant each second, so it is caught even when no work
//! moves. A store found behind is recovered once, by `RecoverRollback`: every unsettled
//! operation of the tenant is settled `TIMED_OUT` ("it may or may not have been applied": it
//! may have been applied after the state the store went back to), never `EXPIRED` and never
//! delivered again, and the sequence moves past the highest seen. Event WB1092 and
//! `writeback_store_rollbacks_total` tell the operator.
//!
//! What this cannot see: an operation accepted after that state, applied, then submitted
//! again with the same id after the restore is new to the store. The agent instance that
//! applied it answers it from its journal; another instance of the forest would apply it
//! again. And a store restored while every replica restarted, before any agent that saw the
//! newer state reconnected, is caught only when one does.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use super::backend::Conn;
use super::ids::TenantId;
use super::scripts::{Guarded, RecoverRollback, Recovered};
use super::{Result, Store, StoreError};

/// The highest store sequence seen, per tenant.
#[derive(Default)]
pub struct HighWater(Mutex<HashMap<TenantId, u64>>);

impl HighWater {
    /// Notes that `tenant`'s store reached `seq`.
    pub fn observe(&self, tenant: &TenantId, seq: u64) {
        if seq == 0 {
            return;
        }
        let mut m = self.0.lock().expect("high water");
        match m.get_mut(tenant) {
            Some(hw) => *hw = (*hw).max(seq),
            None => {
                m.insert(tenant.clone(), seq);
            }
        }
    }

    /// The highest sequence of `tenant` seen (0: none).
    pub fn get(&self, tenant: &TenantId) -> u64 {
        self.0
            .lock()
            .expect("high water")
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }
}

impl Store {
    /// Runs a guarded script with the tenant's high water; when the store is behind it,
    /// recovers (once) and runs it again.
    pub(super) async fn guarded<T, F, Fut>(&self, tenant: &TenantId, run: F) -> Result<T>
    where
        F: Fn(u64, Conn) -> Fut,
        Fut: Future<Output = Result<Guarded<T>>>,
    {
        let seen = self.high_water.get(tenant);
        let store_seq = match run(seen, self.conn()).await? {
            Guarded::Ran {
                value,
                version,
                acked,
            } => return self.confirmed(tenant, value, version, acked),
            Guarded::Behind { store_seq } => store_seq,
        };
        self.recover(tenant, seen, store_seq, "a lifecycle script")
            .await?;
        match run(self.high_water.get(tenant), self.conn()).await? {
            Guarded::Ran {
                value,
                version,
                acked,
            } => self.confirmed(tenant, value, version, acked),
            Guarded::Behind { store_seq } => Err(StoreError::Corrupt {
                key: super::keys::seq_key(tenant),
                detail: format!("still behind ({store_seq}) after recovery"),
            }),
        }
    }

    /// A script's reply, once as many replicas as asked for hold its write; only then is its
    /// sequence the tenant's high water. A write no replica confirmed may vanish in a failover
    /// (or have been made on a stale master that came back before Sentinel or the cluster
    /// demoted it): the store that serves next never held it and is not behind for lacking
    /// it. Taking its sequence as seen would settle every unsettled operation of the tenant
    /// `TIMED_OUT` as a false rollback (the caller was told the write failed, and retries).
    fn confirmed<T>(
        &self,
        tenant: &TenantId,
        value: T,
        version: u64,
        acked: Option<u32>,
    ) -> Result<T> {
        super::check_replicated(&super::keys::seq_key(tenant), self.replica_acks, acked)?;
        self.high_water.observe(tenant, version);
        Ok(value)
    }

    /// The highest store sequence of `tenant` this replica has seen.
    pub fn high_water(&self, tenant: &TenantId) -> u64 {
        self.high_water.get(tenant)
    }

    /// Checks `tenant`'s store against the highest sequence seen here and `reported` (by an
    /// agent, from its journal; 0: none), and recovers it when it is behind. `by` says who
    /// noticed, for the operator.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn check_sequence(&self, tenant: &TenantId, reported: u64, by: &str) -> Result<()> {
        self.high_water.observe(tenant, reported);
        let seen = self.high_water.get(tenant);
        if seen == 0 {
            return Ok(());
        }
        let store_seq: Option<u64> =
            redis::AsyncCommands::get(&mut self.conn(), super::keys::seq_key(tenant)).await?;
        let store_seq = store_seq.unwrap_or(0);
        if store_seq < seen {
            self.recover(tenant, seen, store_seq, by).await?;
        }
        Ok(())
    }

    async fn recover(&self, tenant: &TenantId, seen: u64, store_seq: u64, by: &str) -> Result<()> {
        let recovered = RecoverRollback {
            tenant,
            seen,
            replica: &self.replica,
        }
        .run(&mut self.conn(), self.replica_acks)
        .await?;
        if let Recovered::Recovered { settled, .. } = recovered {
            crate::metrics::get()
                .store_rollbacks
                .with_label_values(&[tenant])
                .inc();
            tracing::error!(
                event = "WB1092",
                %tenant,
                store_seq,
                seen,
                settled,
                found_by = by,
                "the store was restored from an older state: its unsettled operations were settled TIMED_OUT (outcome unknown) and are never delivered again"
            );
        }
        self.high_water.observe(tenant, seen);
        Ok(())
    }
}
