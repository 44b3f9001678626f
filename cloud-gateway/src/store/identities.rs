//! One user, three names. Callers name a user by objectGUID, userPrincipalName or
//! sAMAccountName; the agent reports the user it found in every form (`Ack.user`). The store
//! remembers which names are one user (`wb:{T}:alias:{forest}:{label}`, each holding all the
//! labels, kept as long as operation records) and indexes every operation under each name it
//! knows for its user, so `ListOperations` finds it by any of them, refusals included once an
//! agent has reported that user. All keys are the tenant's: one hash slot, one atomic step.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::ids::{ForestId, OperationId, TenantId};
use super::refusals::USER_INDEX_KEEP;
use super::{keys, Result, Store};

impl Store {
    /// The names `label` is known by in `forest` besides itself (empty until an agent has
    /// reported that user).
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn aliases(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        label: &str,
    ) -> Result<Vec<String>> {
        let known: Option<String> =
            redis::AsyncCommands::get(&mut self.conn(), keys::alias_key(tenant, forest, label))
                .await?;
        Ok(known
            .unwrap_or_default()
            .lines()
            .filter(|l| *l != label)
            .map(str::to_owned)
            .collect())
    }

    /// The one name a user's budgets and per-user order go by: the objectGUID an agent
    /// reported for the user `label` names, else `label` itself.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn canonical_user(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        label: &str,
    ) -> Result<String> {
        if label.starts_with("guid:") {
            return Ok(label.to_owned());
        }
        Ok(self
            .aliases(tenant, forest, label)
            .await?
            .into_iter()
            .find(|l| l.starts_with("guid:"))
            .unwrap_or_else(|| label.to_owned()))
    }

    /// Remembers that `labels` name one user of `forest` (each name's record replaced: a
    /// UPN or sAMAccountName may move to another account), and indexes `op` (accepted at that
    /// time) under each.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn learn_identity(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        labels: &[String],
        op: Option<(&OperationId, i64)>,
        ttl: Duration,
    ) -> Result<()> {
        let all = labels.join("\n");
        let mut pipe = redis::pipe();
        pipe.atomic();
        for l in labels {
            pipe.cmd("SET")
                .arg(keys::alias_key(tenant, forest, l))
                .arg(&all)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .ignore();
        }
        let _: () = pipe.query_async(&mut self.conn()).await?;
        // Under every name: the index step reads the names just written.
        match (op, labels.first()) {
            (Some((op, accepted_ms)), Some(first)) => {
                self.index_user_operation(tenant, forest, first, op, accepted_ms, ttl)
                    .await
            }
            _ => Ok(()),
        }
    }

    /// Indexes `op` (accepted at `accepted_ms`) under its user's name `label` and every
    /// other name that user is known by, in one step.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn index_user_operation(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        label: &str,
        op: &OperationId,
        accepted_ms: i64,
        ttl: Duration,
    ) -> Result<()> {
        let _: i64 = INDEX
            .key(keys::alias_key(tenant, forest, label))
            .key(keys::label_index_key(tenant, forest, label))
            .arg(op.as_str())
            .arg(accepted_ms)
            .arg(ttl.as_millis() as u64)
            .arg(USER_INDEX_KEEP)
            .arg(keys::label_index_key(tenant, forest, ""))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }
}

/// `KEYS`: the name's alias record, the name's index. `ARGV`: op, accepted ms, ttl ms, how many
/// ids an index keeps, the prefix of the forest's user index keys (the tenant's hash slot).
static INDEX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local function add(key)
  redis.call('ZADD', key, ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYRANK', key, 0, -1 - tonumber(ARGV[4]))
  redis.call('PEXPIRE', key, ARGV[3])
end
add(KEYS[2])
local known = redis.call('GET', KEYS[1])
if known then
  for label in string.gmatch(known, '[^\n]+') do
    local key = ARGV[5] .. label
    if key ~= KEYS[2] then add(key) end
  end
end
return 1
"#,
    )
});
