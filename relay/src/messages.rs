//! What end users are told, in one place. The gateway builds every answer a caller gets from
//! the outcome, the policy rule and the policy's numbers; it never passes on text an agent
//! wrote (an agent is trusted to report what AD did, not to talk to end users). The agent uses
//! the same texts for its own logs and older gateways.

use crate::proto::{Outcome, PasswordPolicy, PolicyViolation};

pub const APPLIED_PASSWORD: &str = "Your password was changed.";
pub const APPLIED_UNLOCK: &str = "Your account is unlocked.";
pub const APPLIED_CLEAR_FORCED: &str =
    "You no longer need to change your password at next sign-in.";
pub const APPLIED_POLICY: &str = "Your organization's password rules were read.";
pub const WRONG_OLD_PASSWORD: &str = "The current password is incorrect; nothing was changed.";
pub const USER_NOT_FOUND: &str =
    "No account was found for you in your organization's directory; nothing was changed.";
pub const PROTECTED: &str = "This account is protected; its password cannot be changed here. Please contact your administrator.";
pub const DISABLED: &str = "Your account is disabled; its password cannot be changed here. Please contact your administrator.";
pub const ACCESS_DENIED: &str = "Password writeback is not fully set up for your account. Please contact your administrator; nothing was changed.";
pub const UNAVAILABLE: &str = "Your organization's directory cannot be reached right now; nothing was changed. Please try again in a few minutes.";
pub const EXPIRED: &str =
    "The request expired before it could be applied; nothing was changed. Please try again.";
/// When the directory did not confirm a change it may have made.
pub const UNKNOWN: &str = "Your organization's directory did not confirm the change in time. It may or may not have been applied.";
pub const FAILED: &str =
    "The change could not be made; nothing was changed. Please contact your administrator.";
pub const NOT_ENABLED: &str =
    "This is not enabled for your organization's directory; nothing was changed.";
pub const IN_PROGRESS: &str =
    "Your request is still being processed by your organization's directory. Check again shortly.";
pub const OUT_OF_SCOPE: &str = "Your account's password cannot be managed here; nothing was changed. Please change it on your organization's network, or contact your IT helpdesk.";
pub const AGENT_UNAVAILABLE: &str = "Your organization's directory cannot be reached right now; nothing was changed. Please try again in a few minutes.";

/// The end user's message for an operation of `kind` (`reset`, `change`, `unlock`,
/// `clear-forced-change`, `policy`) that ended in `outcome`; for a policy rejection, which
/// rule and the policy's numbers (`policy`, from the agent: numbers only, never text).
pub fn end_user(
    kind: &str,
    outcome: Outcome,
    violation: PolicyViolation,
    policy: Option<&PasswordPolicy>,
) -> String {
    let text = match outcome {
        Outcome::Applied => match kind {
            "unlock" => APPLIED_UNLOCK,
            "clear-forced-change" => APPLIED_CLEAR_FORCED,
            "policy" => APPLIED_POLICY,
            _ => APPLIED_PASSWORD,
        },
        Outcome::RejectedByPolicy => {
            return self::policy(violation, &policy.cloned().unwrap_or_default())
        }
        Outcome::WrongOldPassword => WRONG_OLD_PASSWORD,
        Outcome::UserNotFound => USER_NOT_FOUND,
        Outcome::ProtectedAccount => PROTECTED,
        Outcome::AccountDisabled => DISABLED,
        Outcome::AccessDenied => ACCESS_DENIED,
        Outcome::DirectoryUnavailable => UNAVAILABLE,
        Outcome::AgentUnavailable => AGENT_UNAVAILABLE,
        Outcome::Expired => EXPIRED,
        Outcome::TimedOut => UNKNOWN,
        Outcome::InProgress => IN_PROGRESS,
        Outcome::NotEnabled => NOT_ENABLED,
        Outcome::OutOfScope => OUT_OF_SCOPE,
        Outcome::Refused | Outcome::Failed | Outcome::Unspecified => FAILED,
    };
    text.to_owned()
}

/// Which password rule failed, with the policy's numbers where they are known (0: unknown).
pub fn policy(v: PolicyViolation, p: &PasswordPolicy) -> String {
    match v {
        PolicyViolation::TooShort if p.min_length > 0 => format!(
            "The new password must be at least {} characters long.",
            p.min_length
        ),
        PolicyViolation::TooShort => {
            "The new password is too short for your organization's policy.".to_owned()
        }
        PolicyViolation::Complexity => "The new password must use at least three of: uppercase letters, lowercase letters, digits and symbols, and must not contain your account name or parts of your full name.".to_owned(),
        PolicyViolation::History if p.history_length > 0 => format!(
            "The new password matches one of your last {} passwords; choose one you have not used before.",
            p.history_length
        ),
        PolicyViolation::History => {
            "The new password was used recently; choose one you have not used before.".to_owned()
        }
        PolicyViolation::MinAge if p.next_change_allowed_unix_ms > 0 => format!(
            "Your password was changed too recently; it can be changed again after {}.",
            format_utc(p.next_change_allowed_unix_ms / 1000)
        ),
        PolicyViolation::MinAge => {
            "Your password was changed too recently; please try again later.".to_owned()
        }
        _ => "The new password does not meet your organization's password policy.".to_owned(),
    }
}

/// `YYYY-MM-DD HH:MM UTC`.
pub fn format_utc(unix_secs: i64) -> String {
    let (h, m) = (
        (unix_secs / 3600).rem_euclid(24),
        (unix_secs / 60).rem_euclid(60),
    );
    let days = unix_secs.div_euclid(86_400);
    // civil-from-days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_rejection_is_told_with_the_numbers() {
        let p = PasswordPolicy {
            min_length: 12,
            history_length: 24,
            next_change_allowed_unix_ms: 1_767_225_600_000,
            ..Default::default()
        };
        let m = |v| end_user("reset", Outcome::RejectedByPolicy, v, Some(&p));
        assert!(m(PolicyViolation::TooShort).contains("at least 12 characters"));
        assert!(m(PolicyViolation::History).contains("last 24 passwords"));
        assert!(m(PolicyViolation::MinAge).contains("2026-01-01 00:00 UTC"));
        assert!(end_user(
            "reset",
            Outcome::RejectedByPolicy,
            PolicyViolation::TooShort,
            None
        )
        .contains("too short"));
    }

    #[test]
    fn every_outcome_has_a_message_and_none_claims_what_did_not_happen() {
        for code in 0..=16 {
            let o = Outcome::try_from(code).unwrap();
            let m = end_user("reset", o, PolicyViolation::Unspecified, None);
            assert!(!m.is_empty(), "{o:?}");
            let says_nothing_changed = m.contains("nothing was changed");
            let may_have = matches!(
                o,
                Outcome::Applied | Outcome::TimedOut | Outcome::InProgress
            );
            assert!(!(may_have && says_nothing_changed), "{o:?}: {m}");
        }
        assert_eq!(
            end_user(
                "unlock",
                Outcome::Applied,
                PolicyViolation::Unspecified,
                None
            ),
            APPLIED_UNLOCK
        );
    }
}
