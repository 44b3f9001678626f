//! Generated `writeback.v1` types and service stubs, plus the hand-written pieces that keep
//! passwords out of `Debug` output and wipe them from memory.
#![allow(clippy::all, missing_docs, rust_2018_idioms)]

tonic::include_proto!("writeback.v1");

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("writeback_descriptor");

const REDACTED: &str = "[redacted]";

impl std::fmt::Debug for ResetPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetPassword")
            .field("new_password", &REDACTED)
            .field("must_change_at_next_logon", &self.must_change_at_next_logon)
            .field("unlock", &self.unlock)
            .finish()
    }
}

impl std::fmt::Debug for ChangePassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangePassword")
            .field("old_password", &REDACTED)
            .field("new_password", &REDACTED)
            .finish()
    }
}

impl zeroize::Zeroize for ResetPassword {
    fn zeroize(&mut self) {
        self.new_password.zeroize();
    }
}

impl zeroize::Zeroize for ChangePassword {
    fn zeroize(&mut self) {
        self.old_password.zeroize();
        self.new_password.zeroize();
    }
}

impl zeroize::Zeroize for submit_request::Action {
    fn zeroize(&mut self) {
        match self {
            submit_request::Action::Reset(r) => r.zeroize(),
            submit_request::Action::Change(c) => c.zeroize(),
            submit_request::Action::Unlock(_) | submit_request::Action::ClearForcedChange(_) => {}
        }
    }
}

impl zeroize::Zeroize for sealed_operation::Action {
    fn zeroize(&mut self) {
        match self {
            sealed_operation::Action::Reset(r) => r.zeroize(),
            sealed_operation::Action::Change(c) => c.zeroize(),
            sealed_operation::Action::Unlock(_)
            | sealed_operation::Action::ClearForcedChange(_)
            | sealed_operation::Action::QueryPolicy(_) => {}
        }
    }
}

impl From<submit_request::Action> for sealed_operation::Action {
    fn from(a: submit_request::Action) -> Self {
        match a {
            submit_request::Action::Reset(r) => Self::Reset(r),
            submit_request::Action::Change(c) => Self::Change(c),
            submit_request::Action::Unlock(u) => Self::Unlock(u),
            submit_request::Action::ClearForcedChange(c) => Self::ClearForcedChange(c),
        }
    }
}

impl sealed_operation::Action {
    /// Short kind name used in records, logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Reset(_) => "reset",
            Self::Change(_) => "change",
            Self::Unlock(_) => "unlock",
            Self::ClearForcedChange(_) => "clear-forced-change",
            Self::QueryPolicy(_) => "policy",
        }
    }
}

impl submit_request::Action {
    /// Short kind name used in records, logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Reset(_) => "reset",
            Self::Change(_) => "change",
            Self::Unlock(_) => "unlock",
            Self::ClearForcedChange(_) => "clear-forced-change",
        }
    }
}

impl Drop for SealedOperation {
    fn drop(&mut self) {
        if let Some(a) = self.action.as_mut() {
            zeroize::Zeroize::zeroize(a);
        }
    }
}

/// Whether `v` is a GUID in canonical form (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
pub fn is_canonical_guid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

impl UserRef {
    /// A reference from what a person typed: a GUID in canonical form is an objectGUID, text
    /// with `@` a userPrincipalName, anything else a sAMAccountName.
    pub fn from_text(forest: impl Into<String>, user: &str) -> Self {
        let id = if is_canonical_guid(user) {
            user_ref::Id::ObjectGuid(user.to_owned())
        } else if user.contains('@') {
            user_ref::Id::UserPrincipalName(user.to_owned())
        } else {
            user_ref::Id::SamAccountName(user.to_owned())
        };
        Self {
            forest: forest.into(),
            id: Some(id),
        }
    }
}

impl Outcome {
    /// Whether this outcome is final for the operation (everything but `TIMED_OUT`, which only
    /// describes what the caller was told).
    pub fn is_terminal(self) -> bool {
        !matches!(self, Outcome::Unspecified | Outcome::TimedOut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_passwords() {
        let req = SubmitRequest {
            tenant_id: "t".into(),
            action: Some(submit_request::Action::Change(ChangePassword {
                old_password: "Old-Secret-1".into(),
                new_password: "New-Secret-2".into(),
            })),
            ..Default::default()
        };
        let text = format!("{req:?}");
        assert!(!text.contains("Secret"), "{text}");
        let reset = ResetPassword {
            new_password: "Reset-Secret-3".into(),
            ..Default::default()
        };
        assert!(!format!("{reset:?} {reset:#?}").contains("Secret"));
    }
}
