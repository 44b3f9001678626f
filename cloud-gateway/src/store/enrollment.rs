//! One-time enrollment tokens: `wb:enroll:<sha256 of the token>` holds what the token enrolls
//! (with a MAC), expires with the token, and is taken with `GETDEL` so it is used once.

use std::time::Duration;

use super::{Result, Store};

fn enrollment_key(token_sha256_hex: &str) -> String {
    format!("wb:enroll:{token_sha256_hex}")
}

impl Store {
    /// Stores an enrollment token's record for `ttl`.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn put_enrollment(&self, hash: &str, record: &str, ttl: Duration) -> Result<()> {
        let _: () = redis::cmd("SET")
            .arg(enrollment_key(hash))
            .arg(record)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Takes an enrollment token's record: it can be taken once.
    ///
    /// # Errors
    /// On Redis errors.
    pub async fn take_enrollment(&self, hash: &str) -> Result<Option<String>> {
        Ok(redis::cmd("GETDEL")
            .arg(enrollment_key(hash))
            .query_async(&mut self.conn())
            .await?)
    }
}
