//! Input validation for `Writeback` requests: every rejection names the field and the problem,
//! and never echoes a password. The rules for tenant ids, forests and operation ids are those
//! of their types (`store/ids.rs`); here they become `INVALID_ARGUMENT` and the typed ids the
//! request is served with.

use relay::proto::{submit_request::Action, user_ref, Initiator, SubmitRequest, UserRef};

use crate::error::GatewayError;
use crate::store::{ForestId, OperationId, TenantId};

/// Longest password AD accepts in `unicodePwd` (characters).
pub const MAX_PASSWORD_CHARS: usize = 256;

/// A tenant id (the rule is [`TenantId::new`]'s).
///
/// # Errors
/// `INVALID_ARGUMENT` naming `tenant_id`.
pub fn tenant_id(v: &str) -> Result<TenantId, GatewayError> {
    Ok(TenantId::new(v)?)
}

/// An operation id (the rule is [`OperationId::new`]'s).
///
/// # Errors
/// `INVALID_ARGUMENT` naming `operation_id`.
pub fn operation_id(v: &str) -> Result<OperationId, GatewayError> {
    Ok(OperationId::new(v)?)
}

/// A forest name that came in `field` (the rule is [`ForestId::new`]'s: a DNS name).
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field`.
pub fn forest(field: &'static str, v: &str) -> Result<ForestId, GatewayError> {
    ForestId::new(v).map_err(|e| e.in_field(field).into())
}

pub use relay::proto::is_canonical_guid;

/// Validates a user reference and returns it with its forest.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the offending field.
pub fn user_ref(u: Option<&UserRef>) -> Result<(&UserRef, ForestId), GatewayError> {
    let forest = user(u)?;
    Ok((u.expect("checked by user()"), forest))
}

/// Validates a user reference; returns its forest.
fn user(u: Option<&UserRef>) -> Result<ForestId, GatewayError> {
    let u = u.ok_or_else(|| GatewayError::invalid("user", "is required"))?;
    let forest = forest("user.forest", &u.forest)?;
    match &u.id {
        None => Err(GatewayError::invalid(
            "user",
            "one of object_guid, user_principal_name or sam_account_name is required",
        )),
        Some(id) => user_id(id),
    }
    .map(|()| forest)
}

/// The names an agent reported for the user it found, as user ids that pass the checks a
/// caller's do; a field that does not (or is empty) is dropped: an agent's text is bounded
/// like anyone's.
pub fn resolved_names(u: &relay::proto::ResolvedUser) -> Vec<user_ref::Id> {
    [
        user_ref::Id::ObjectGuid(u.object_guid.to_ascii_lowercase()),
        user_ref::Id::SamAccountName(u.sam_account_name.clone()),
        user_ref::Id::UserPrincipalName(u.user_principal_name.clone()),
    ]
    .into_iter()
    .filter(|id| user_id(id).is_ok())
    .collect()
}

/// Checks one user id as AD would accept it.
fn user_id(id: &user_ref::Id) -> Result<(), GatewayError> {
    match id {
        user_ref::Id::ObjectGuid(g) if !is_canonical_guid(g) => Err(GatewayError::invalid(
            "user.object_guid",
            "must be a GUID in canonical form (8-4-4-4-12 hex digits)",
        )),
        user_ref::Id::UserPrincipalName(upn) => {
            let valid = upn.len() <= 1024
                && upn
                    .split_once('@')
                    .is_some_and(|(name, suffix)| !name.is_empty() && !suffix.is_empty())
                && !upn.chars().any(char::is_control);
            if valid {
                Ok(())
            } else {
                Err(GatewayError::invalid(
                    "user.user_principal_name",
                    "must look like name@suffix",
                ))
            }
        }
        user_ref::Id::SamAccountName(sam) => {
            // AD: at most 20 characters for users, none of " / \ [ ] : ; | = , + * ? < > @
            let forbidden = "\"/\\[]:;|=,+*?<>@";
            if sam.is_empty() || sam.chars().count() > 20 {
                Err(GatewayError::invalid(
                    "user.sam_account_name",
                    "must be 1 to 20 characters",
                ))
            } else if sam.chars().any(|c| forbidden.contains(c) || c.is_control()) {
                Err(GatewayError::invalid(
                    "user.sam_account_name",
                    "must not contain \" / \\ [ ] : ; | = , + * ? < > @",
                ))
            } else {
                Ok(())
            }
        }
        user_ref::Id::ObjectGuid(_) => Ok(()),
    }
}

fn password(field: &'static str, p: &str) -> Result<(), GatewayError> {
    if p.is_empty() {
        return Err(GatewayError::invalid(field, "must not be empty"));
    }
    if p.chars().count() > MAX_PASSWORD_CHARS {
        return Err(GatewayError::invalid(
            field,
            format!("must be at most {MAX_PASSWORD_CHARS} characters"),
        ));
    }
    if p.chars().any(|c| c == '\0') {
        return Err(GatewayError::invalid(
            field,
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

/// The ids of a valid `SubmitRequest`, typed (its tenant is the caller's, from
/// [`crate::auth::caller_tenant`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitIds {
    /// `None` when the request came without one: the gateway assigns one.
    pub operation_id: Option<OperationId>,
    /// The user's forest.
    pub forest: ForestId,
}

/// Validates a `SubmitRequest` (the operation id may be empty: the gateway assigns one) and
/// returns its ids.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the first offending field.
pub fn submit(req: &SubmitRequest) -> Result<SubmitIds, GatewayError> {
    tenant_id(&req.tenant_id)?;
    let operation_id = if req.operation_id.is_empty() {
        None
    } else {
        Some(operation_id(&req.operation_id)?)
    };
    let forest = user(req.user.as_ref())?;
    match Initiator::try_from(req.initiator) {
        Ok(Initiator::EndUser | Initiator::Admin) => {}
        _ => {
            return Err(GatewayError::invalid(
                "initiator",
                "must be END_USER or ADMIN",
            ))
        }
    }
    match &req.action {
        None => Err(GatewayError::invalid(
            "action",
            "one of reset, change or unlock is required",
        )),
        Some(Action::Reset(r)) => password("reset.new_password", &r.new_password),
        Some(Action::Change(c)) => {
            password("change.old_password", &c.old_password)?;
            password("change.new_password", &c.new_password)
        }
        Some(Action::Unlock(_) | Action::ClearForcedChange(_)) => Ok(()),
    }?;
    Ok(SubmitIds {
        operation_id,
        forest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay::proto::{ChangePassword, ResetPassword, UnlockAccount};

    fn base() -> SubmitRequest {
        SubmitRequest {
            tenant_id: "acme".into(),
            operation_id: "op-1".into(),
            user: Some(UserRef {
                forest: "corp.acme.test".into(),
                id: Some(user_ref::Id::SamAccountName("alice".into())),
            }),
            initiator: Initiator::EndUser as i32,
            timeout_ms: 0,
            action: Some(Action::Reset(ResetPassword {
                new_password: "S3cret-Passw0rd!".into(),
                ..Default::default()
            })),
        }
    }

    fn field_of(req: &SubmitRequest) -> String {
        match submit(req) {
            Err(GatewayError::InvalidArgument { field, .. }) => field.to_owned(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn accepts_valid_requests() {
        let ids = submit(&base()).unwrap();
        assert_eq!(ids.operation_id.unwrap(), "op-1");
        assert_eq!(ids.forest, "corp.acme.test");
        let mut r = base();
        r.operation_id.clear();
        r.action = Some(Action::Unlock(UnlockAccount {}));
        assert_eq!(submit(&r).unwrap().operation_id, None);
        r.user.as_mut().unwrap().id = Some(user_ref::Id::ObjectGuid(
            "99b3a1d2-17db-4c4a-9c27-0123456789ab".into(),
        ));
        submit(&r).unwrap();
    }

    #[test]
    fn names_the_offending_field() {
        type Mutation = Box<dyn Fn(&mut SubmitRequest)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("tenant_id", Box::new(|r| r.tenant_id.clear())),
            ("tenant_id", Box::new(|r| r.tenant_id = "a b".into())),
            (
                "operation_id",
                Box::new(|r| r.operation_id = "x".repeat(200)),
            ),
            ("user", Box::new(|r| r.user = None)),
            (
                "user.forest",
                Box::new(|r| r.user.as_mut().unwrap().forest.clear()),
            ),
            (
                "user.forest",
                Box::new(|r| r.user.as_mut().unwrap().forest = "bad forest".into()),
            ),
            ("user", Box::new(|r| r.user.as_mut().unwrap().id = None)),
            (
                "user.object_guid",
                Box::new(|r| {
                    r.user.as_mut().unwrap().id = Some(user_ref::Id::ObjectGuid("nope".into()))
                }),
            ),
            (
                "user.user_principal_name",
                Box::new(|r| {
                    r.user.as_mut().unwrap().id =
                        Some(user_ref::Id::UserPrincipalName("alice".into()))
                }),
            ),
            (
                "user.sam_account_name",
                Box::new(|r| {
                    r.user.as_mut().unwrap().id = Some(user_ref::Id::SamAccountName("a".repeat(21)))
                }),
            ),
            (
                "user.sam_account_name",
                Box::new(|r| {
                    r.user.as_mut().unwrap().id = Some(user_ref::Id::SamAccountName("a,b".into()))
                }),
            ),
            ("initiator", Box::new(|r| r.initiator = 0)),
            ("action", Box::new(|r| r.action = None)),
            (
                "reset.new_password",
                Box::new(|r| r.action = Some(Action::Reset(ResetPassword::default()))),
            ),
            (
                "change.old_password",
                Box::new(|r| {
                    r.action = Some(Action::Change(ChangePassword {
                        old_password: String::new(),
                        new_password: "x".into(),
                    }))
                }),
            ),
            (
                "change.new_password",
                Box::new(|r| {
                    r.action = Some(Action::Change(ChangePassword {
                        old_password: "x".into(),
                        new_password: "y".repeat(257),
                    }))
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut r = base();
            mutate(&mut r);
            assert_eq!(field_of(&r), field);
        }
    }

    #[test]
    fn rejection_never_echoes_a_password() {
        let mut r = base();
        r.action = Some(Action::Reset(ResetPassword {
            new_password: format!("Secret{}", "x".repeat(300)),
            ..Default::default()
        }));
        let msg = submit(&r).unwrap_err().to_string();
        assert!(!msg.contains("Secret"), "{msg}");
    }
}
