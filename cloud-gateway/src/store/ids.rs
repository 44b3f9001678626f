//! The three ids every operation is known by, typed: [`TenantId`] (whose operation, and the
//! Redis Cluster hash tag of all of its keys), [`ForestId`] (which directory applies it) and
//! [`OperationId`] (the caller's idempotency key). Each wraps a `String` and is made in one of
//! two ways:
//!
//! - `new`, at the edge where a value comes from outside (a request, an admin command, an
//!   agent's acknowledgment): it applies the gateway's rule for that field, and a value that
//!   breaks it is an [`InvalidId`] naming the field and the problem. `crate::validate` turns
//!   it into `INVALID_ARGUMENT`; these are its only rules for the three fields.
//! - `from_store`, inside this crate, for a value read back from Redis that the gateway itself
//!   wrote (a record, a set member, a key): it was checked on its way in, so it is not again.
//!
//! From there on the typed id is passed by reference (`&TenantId`) down to the keys that name
//! it in Redis (`keys.rs`), and written to Redis as it is ([`redis::ToRedisArgs`]).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

/// Longest tenant id (characters).
pub const MAX_TENANT_ID_CHARS: usize = 64;
/// Longest operation id (characters).
pub const MAX_OPERATION_ID_CHARS: usize = 128;
/// Longest forest name (characters), as for any DNS name.
pub const MAX_FOREST_CHARS: usize = 253;
/// Longest label of a forest name (characters).
pub const MAX_FOREST_LABEL_CHARS: usize = 63;

/// A value refused as an id: which field, and what is wrong with it (never the value itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidId {
    /// The request field (or flag) the value came in, e.g. `tenant_id` or `user.forest`.
    pub field: &'static str,
    pub problem: String,
}

impl InvalidId {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }

    /// The same refusal, for a value that came in another field (`user.forest` rather than
    /// `forest`).
    #[must_use]
    pub fn in_field(self, field: &'static str) -> Self {
        Self { field, ..self }
    }
}

/// The rule for tenant and operation ids: 1 to `max` of `[A-Za-z0-9._:-]`.
fn check_token(field: &'static str, v: &str, max: usize) -> Result<(), InvalidId> {
    if v.is_empty() {
        return Err(InvalidId::new(field, "must not be empty"));
    }
    if v.len() > max {
        return Err(InvalidId::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(InvalidId::new(
            field,
            "may contain only ASCII letters, digits and - _ . :",
        ));
    }
    Ok(())
}

/// The rule for forest names: a DNS name (dot-separated labels of `[A-Za-z0-9-]`).
fn check_dns_name(field: &'static str, v: &str) -> Result<(), InvalidId> {
    if v.is_empty() {
        return Err(InvalidId::new(field, "must not be empty"));
    }
    let ok = v.len() <= MAX_FOREST_CHARS
        && v.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_FOREST_LABEL_CHARS
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !ok {
        return Err(InvalidId::new(
            field,
            "must be a DNS name such as corp.example.com",
        ));
    }
    Ok(())
}

/// A tenant id: 1–64 of `[A-Za-z0-9._:-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// The request field a tenant id comes in.
    pub const FIELD: &'static str = "tenant_id";

    /// A tenant id from outside the gateway.
    ///
    /// # Errors
    /// [`InvalidId`] naming `tenant_id` when `id` breaks the rule.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidId> {
        let id = id.into();
        check_token(Self::FIELD, &id, MAX_TENANT_ID_CHARS)?;
        Ok(Self(id))
    }
}

/// A forest: the DNS name of an Active Directory forest, such as `corp.example.com`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForestId(String);

impl ForestId {
    /// The request field a forest comes in (others, such as `user.forest`, name theirs with
    /// [`InvalidId::in_field`]).
    pub const FIELD: &'static str = "forest";

    /// A forest from outside the gateway.
    ///
    /// # Errors
    /// [`InvalidId`] naming `forest` when `id` is not a DNS name.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidId> {
        let id = id.into();
        check_dns_name(Self::FIELD, &id)?;
        Ok(Self(id))
    }
}

/// An operation id: 1–128 of `[A-Za-z0-9._:-]`, chosen by the caller (its idempotency key)
/// or by the gateway ([`OperationId::generate`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperationId(String);

impl OperationId {
    /// The request field an operation id comes in.
    pub const FIELD: &'static str = "operation_id";

    /// An operation id from outside the gateway.
    ///
    /// # Errors
    /// [`InvalidId`] naming `operation_id` when `id` breaks the rule.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidId> {
        let id = id.into();
        check_token(Self::FIELD, &id, MAX_OPERATION_ID_CHARS)?;
        Ok(Self(id))
    }

    /// A fresh id, `prefix` then a random UUID (`policy-…`, `canary-…`; no prefix for a
    /// submission that came without an id). `prefix` is one of the gateway's own, so the id
    /// keeps the rule.
    pub fn generate(prefix: &str) -> Self {
        let id = format!("{prefix}{}", uuid::Uuid::new_v4());
        debug_assert!(check_token(Self::FIELD, &id, MAX_OPERATION_ID_CHARS).is_ok());
        Self(id)
    }
}

/// What the three ids share: reading them as text, and the unchecked constructor for values
/// the gateway wrote to Redis itself.
macro_rules! id_text {
    ($($id:ident),*) => {$(
        impl $id {
            /// A value read back from Redis that the gateway wrote (checked on its way in).
            pub(crate) fn from_store(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $id {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $id {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        /// Lets maps keyed by the id be looked up by a `&str` (an agent's acknowledgment).
        impl Borrow<str> for $id {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$id> for String {
            fn from(id: $id) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $id {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $id {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $id {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl redis::ToRedisArgs for $id {
            fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
                out.write_arg(self.0.as_bytes());
            }
        }

        impl redis::ToSingleRedisArg for $id {}
    )*};
}

id_text!(TenantId, ForestId, OperationId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_and_operation_ids_follow_the_token_rule() {
        assert_eq!(TenantId::new("acme").unwrap().as_str(), "acme");
        assert_eq!(TenantId::new("a-b_c.d:e").unwrap(), "a-b_c.d:e");
        let e = TenantId::new("").unwrap_err();
        assert_eq!(e.to_string(), "tenant_id: must not be empty");
        let e = TenantId::new("a b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant_id: may contain only ASCII letters, digits and - _ . :"
        );
        TenantId::new("x".repeat(MAX_TENANT_ID_CHARS)).unwrap();
        assert_eq!(
            TenantId::new("x".repeat(MAX_TENANT_ID_CHARS + 1))
                .unwrap_err()
                .to_string(),
            "tenant_id: must be at most 64 characters"
        );
        OperationId::new("x".repeat(MAX_OPERATION_ID_CHARS)).unwrap();
        let e = OperationId::new("x".repeat(200)).unwrap_err();
        assert_eq!(e.field, "operation_id");
    }

    #[test]
    fn forests_are_dns_names() {
        ForestId::new("corp.example.com").unwrap();
        for bad in ["", "bad forest", "a..b", ".a", &"x".repeat(64)] {
            let e = ForestId::new(bad).unwrap_err();
            assert_eq!(e.field, "forest", "{bad}");
        }
        let e = ForestId::new("bad forest")
            .unwrap_err()
            .in_field("user.forest");
        assert_eq!(
            e.to_string(),
            "user.forest: must be a DNS name such as corp.example.com"
        );
    }

    #[test]
    fn generated_operation_ids_keep_the_rule() {
        for prefix in ["", "policy-", "canary-"] {
            let id = OperationId::generate(prefix);
            assert_eq!(OperationId::new(id.as_str()).unwrap(), id);
            assert!(id.starts_with(prefix));
        }
    }
}
