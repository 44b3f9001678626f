//! Which password rule AD applied. Windows DCs answer every policy rejection with the same
//! `0000052D` and no reason; Samba adds a reason text. We use the text when present and
//! otherwise evaluate the candidate against the domain's effective policy.

use std::time::Duration;

use ldap3::{Ldap, LdapError, Scope, SearchEntry};
use relay::proto::{sealed_operation::Action, PolicyViolation};

use super::UserEntry;

/// The domain-wide password policy (attributes of the domain root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainPolicy {
    pub min_length: u32,
    pub complexity: bool,
    pub history_length: u32,
    /// Minimum age in seconds (AD stores negative 100 ns intervals).
    pub min_age_secs: u64,
    pub max_age_secs: u64,
}

/// The policy that applies to one user, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePolicy {
    /// `None` when a fine-grained policy applies but the service account may not read it.
    pub policy: Option<DomainPolicy>,
    /// `domain`, or the DN of the resultant fine-grained password settings object.
    pub source: String,
}

enum Pso {
    None,
    /// Applies, but its settings are not readable by the service account (AD's default).
    Unreadable(String),
    Readable(String, DomainPolicy),
}

/// The user's resultant policy: the fine-grained PSO named by `msDS-ResultantPSO` when there
/// is one and it is readable, otherwise the domain policy.
///
/// # Errors
/// On LDAP errors reading the domain policy.
pub async fn effective_policy(
    ldap: &mut Ldap,
    base_dn: &str,
    user_dn: &str,
    timeout: Duration,
) -> Result<EffectivePolicy, LdapError> {
    match resultant_pso(ldap, user_dn, timeout).await {
        Ok(Pso::Readable(dn, policy)) => {
            return Ok(EffectivePolicy {
                policy: Some(policy),
                source: dn,
            })
        }
        Ok(Pso::Unreadable(dn)) => {
            return Ok(EffectivePolicy {
                policy: None,
                source: format!(
                    "{dn} (fine-grained policy not readable by the service account: grant it read access on CN=Password Settings Container,CN=System)"
                ),
            })
        }
        Ok(Pso::None) => {}
        Err(e) => {
            tracing::info!(error = %e, "msDS-ResultantPSO not readable; using the domain policy")
        }
    }
    Ok(EffectivePolicy {
        policy: Some(read_domain_policy(ldap, base_dn, timeout).await?),
        source: "domain".to_owned(),
    })
}

async fn resultant_pso(
    ldap: &mut Ldap,
    user_dn: &str,
    timeout: Duration,
) -> Result<Pso, LdapError> {
    let (entries, _) = ldap
        .with_timeout(timeout)
        .search(
            user_dn,
            Scope::Base,
            "(objectClass=*)",
            vec!["msDS-ResultantPSO"],
        )
        .await?
        .success()?;
    let Some(pso_dn) = entries
        .into_iter()
        .next()
        .map(SearchEntry::construct)
        .map(|e| super::first_value(&e, "msDS-ResultantPSO"))
        .filter(|dn| !dn.is_empty())
    else {
        return Ok(Pso::None);
    };
    let attrs = vec![
        "msDS-MinimumPasswordLength",
        "msDS-PasswordComplexityEnabled",
        "msDS-PasswordHistoryLength",
        "msDS-MinimumPasswordAge",
        "msDS-MaximumPasswordAge",
    ];
    let entries = match ldap
        .with_timeout(timeout)
        .search(&pso_dn, Scope::Base, "(objectClass=*)", attrs)
        .await?
        .success()
    {
        Ok((entries, _)) => entries,
        Err(_) => return Ok(Pso::Unreadable(pso_dn)),
    };
    let Some(e) = entries.into_iter().next().map(SearchEntry::construct) else {
        return Ok(Pso::Unreadable(pso_dn));
    };
    let first = |a: &str| super::first_value(&e, a);
    if first("msDS-MinimumPasswordLength").is_empty() {
        return Ok(Pso::Unreadable(pso_dn));
    }
    Ok(Pso::Readable(
        pso_dn,
        DomainPolicy {
            min_length: first("msDS-MinimumPasswordLength").parse().unwrap_or(0),
            complexity: first("msDS-PasswordComplexityEnabled").eq_ignore_ascii_case("TRUE"),
            history_length: first("msDS-PasswordHistoryLength").parse().unwrap_or(0),
            min_age_secs: interval_secs(&first("msDS-MinimumPasswordAge")),
            max_age_secs: interval_secs(&first("msDS-MaximumPasswordAge")),
        },
    ))
}

/// `pwdProperties` bit DOMAIN_PASSWORD_COMPLEX.
const DOMAIN_PASSWORD_COMPLEX: u32 = 1;

fn interval_secs(v: &str) -> u64 {
    v.parse::<i64>()
        .map(|n| n.unsigned_abs() / 10_000_000)
        .unwrap_or(0)
}

/// Reads the policy from the domain root `base_dn`.
///
/// # Errors
/// On LDAP errors.
pub async fn read_domain_policy(
    ldap: &mut Ldap,
    base_dn: &str,
    timeout: Duration,
) -> Result<DomainPolicy, LdapError> {
    let (entries, _) = ldap
        .with_timeout(timeout)
        .search(
            base_dn,
            Scope::Base,
            "(objectClass=*)",
            vec![
                "minPwdLength",
                "pwdProperties",
                "pwdHistoryLength",
                "minPwdAge",
                "maxPwdAge",
            ],
        )
        .await?
        .success()?;
    let Some(e) = entries.into_iter().next().map(SearchEntry::construct) else {
        return Ok(DomainPolicy::default());
    };
    let first = |a: &str| super::first_value(&e, a);
    Ok(DomainPolicy {
        min_length: first("minPwdLength").parse().unwrap_or(0),
        complexity: first("pwdProperties").parse::<u32>().unwrap_or(0) & DOMAIN_PASSWORD_COMPLEX
            != 0,
        history_length: first("pwdHistoryLength").parse().unwrap_or(0),
        min_age_secs: interval_secs(&first("minPwdAge")),
        max_age_secs: interval_secs(&first("maxPwdAge")),
    })
}

/// Length as AD counts it: UTF-16 code units.
pub fn ad_length(password: &str) -> usize {
    password.encode_utf16().count()
}

/// AD's complexity rule: not containing the account name (if longer than 2 characters) or any
/// display-name token of 3+ characters (case-insensitive), and characters from at least three
/// of: uppercase, lowercase, digits, non-alphanumeric, other Unicode letters.
pub fn is_complex(password: &str, sam: &str, display_name: &str) -> bool {
    let lower = password.to_lowercase();
    if sam.chars().count() > 2 && lower.contains(&sam.to_lowercase()) {
        return false;
    }
    let delimiters = [',', '.', '-', '_', ' ', '#', '\t'];
    if display_name
        .split(|c| delimiters.contains(&c))
        .filter(|t| t.chars().count() >= 3)
        .any(|t| lower.contains(&t.to_lowercase()))
    {
        return false;
    }
    let (mut upper, mut lower_c, mut digit, mut symbol, mut other) =
        (false, false, false, false, false);
    for c in password.chars() {
        if c.is_uppercase() {
            upper = true;
        } else if c.is_lowercase() {
            lower_c = true;
        } else if c.is_ascii_digit() {
            digit = true;
        } else if c.is_alphabetic() {
            other = true;
        } else {
            symbol = true;
        }
    }
    [upper, lower_c, digit, symbol, other]
        .iter()
        .filter(|b| **b)
        .count()
        >= 3
}

/// Windows FILETIME (100 ns since 1601-01-01) to Unix seconds.
pub fn filetime_to_unix_secs(ft: i64) -> i64 {
    ft / 10_000_000 - 11_644_473_600
}

fn message(v: PolicyViolation, domain: Option<&DomainPolicy>, user: &UserEntry) -> String {
    relay::messages::policy(v, &policy_numbers(domain, user))
}

/// What the end user is told about a rejection needs of the policy: its numbers, and when
/// this user may change the password again.
pub fn policy_numbers(
    domain: Option<&DomainPolicy>,
    user: &UserEntry,
) -> relay::proto::PasswordPolicy {
    let Some(d) = domain else {
        return relay::proto::PasswordPolicy::default();
    };
    relay::proto::PasswordPolicy {
        min_length: d.min_length,
        complexity: d.complexity,
        history_length: d.history_length,
        min_age_seconds: d.min_age_secs,
        max_age_seconds: d.max_age_secs,
        next_change_allowed_unix_ms: if d.min_age_secs > 0 && user.pwd_last_set > 0 {
            (filetime_to_unix_secs(user.pwd_last_set) + d.min_age_secs as i64) * 1000
        } else {
            0
        },
        ..Default::default()
    }
}

/// Decides which rule failed: from the DC's reason text when it gives one, otherwise by
/// evaluating the candidate against the domain policy (length, complexity, minimum age) and
/// by elimination (history).
pub fn diagnose(
    text: &str,
    user: &UserEntry,
    action: &Action,
    new_password: Option<&str>,
    domain: Option<&DomainPolicy>,
) -> (PolicyViolation, String) {
    let t = text.to_ascii_lowercase();
    let from_text = if t.contains("too short") {
        Some(PolicyViolation::TooShort)
    } else if t.contains("complexity") {
        Some(PolicyViolation::Complexity)
    } else if t.contains("history") {
        Some(PolicyViolation::History)
    } else if t.contains("too young") || t.contains("minimum password age") {
        Some(PolicyViolation::MinAge)
    } else {
        None
    };
    let v = from_text.unwrap_or_else(|| evaluate(user, action, new_password, domain));
    (v, message(v, domain, user))
}

fn evaluate(
    user: &UserEntry,
    action: &Action,
    new_password: Option<&str>,
    domain: Option<&DomainPolicy>,
) -> PolicyViolation {
    let (Some(d), Some(p)) = (domain, new_password) else {
        return PolicyViolation::Unknown;
    };
    if (ad_length(p) as u64) < u64::from(d.min_length) {
        return PolicyViolation::TooShort;
    }
    if d.complexity && !is_complex(p, &user.sam, &user.display_name) {
        return PolicyViolation::Complexity;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let is_change = matches!(action, Action::Change(_));
    if d.min_age_secs > 0
        && user.pwd_last_set > 0
        && is_change
        && filetime_to_unix_secs(user.pwd_last_set) + d.min_age_secs as i64 > now
    {
        return PolicyViolation::MinAge;
    }
    if d.history_length > 0 {
        return PolicyViolation::History;
    }
    PolicyViolation::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> UserEntry {
        UserEntry {
            dn: "CN=Jane Doe".into(),
            sam: "jdoe".into(),
            display_name: "Jane Doe-Smith".into(),
            ..Default::default()
        }
    }

    fn change() -> Action {
        Action::Change(relay::proto::ChangePassword::default())
    }

    #[test]
    fn complexity_follows_ad_rules() {
        assert!(is_complex("Abcdef1!", "jdoe", ""));
        assert!(is_complex("abcdef1!", "jdoe", ""));
        assert!(!is_complex("abcdefgh1", "jdoe", ""));
        assert!(
            !is_complex("Xjdoe-1!", "jdoe", ""),
            "contains the account name"
        );
        assert!(
            !is_complex("Smith#2024x", "jdoe", "Jane Doe-Smith"),
            "contains a display-name token"
        );
        assert!(
            !is_complex("Doe#2024x", "jdoe", "Jane Doe-Smith"),
            "Doe is a 3-character token"
        );
        assert!(
            is_complex("Al#2024x", "jdoe", "Al Bundy"),
            "tokens under 3 characters are ignored"
        );
        assert!(
            is_complex("пароль1!", "jdoe", ""),
            "lowercase Cyrillic + digit + symbol"
        );
        assert!(
            is_complex("密码密码1!", "jdoe", ""),
            "other letters + digit + symbol"
        );
    }

    #[test]
    fn counts_length_like_ad() {
        assert_eq!(ad_length("abc"), 3);
        assert_eq!(ad_length("😀"), 2, "astral characters are two UTF-16 units");
    }

    #[test]
    fn diagnosis_matrix_with_and_without_reason_text() {
        let d = DomainPolicy {
            min_length: 12,
            complexity: true,
            history_length: 24,
            min_age_secs: 86_400,
            max_age_secs: 0,
        };
        let recent = UserEntry {
            pwd_last_set: (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
                + 11_644_473_600)
                * 10_000_000,
            ..user()
        };
        let long_ago = UserEntry {
            pwd_last_set: (1_600_000_000 + 11_644_473_600) * 10_000_000,
            ..user()
        };
        let cases = [
            (
                "0000052D: ... the password is too short",
                "short",
                PolicyViolation::TooShort,
            ),
            (
                "0000052D: ... does not meet the complexity criteria",
                "alllowercaseletters",
                PolicyViolation::Complexity,
            ),
            (
                "0000052D: ... already used (in history)",
                "Perfectly#Fine-2024",
                PolicyViolation::History,
            ),
            (
                "0000052D: ... too young to change",
                "Perfectly#Fine-2024",
                PolicyViolation::MinAge,
            ),
        ];
        for (text, pw, want) in cases {
            // The minimum age can only be the reason for a user who changed recently; for the
            // others the user's last change is long ago.
            let who = if want == PolicyViolation::MinAge {
                &recent
            } else {
                &long_ago
            };
            assert_eq!(
                diagnose(text, who, &change(), Some(pw), Some(&d)).0,
                want,
                "with text {text}"
            );
            assert_eq!(
                diagnose(
                    "0000052D: Constraint violation",
                    who,
                    &change(),
                    Some(pw),
                    Some(&d)
                )
                .0,
                want,
                "without text for {want:?}"
            );
        }
        let (v, msg) = diagnose("0000052D", &user(), &change(), Some("short"), Some(&d));
        assert_eq!(v, PolicyViolation::TooShort);
        assert!(msg.contains("12 characters"), "{msg}");
        assert_eq!(
            diagnose("0000052D", &user(), &change(), Some("x"), None).0,
            PolicyViolation::Unknown
        );
    }

    #[test]
    fn min_age_message_names_the_time() {
        let d = DomainPolicy {
            min_age_secs: 86_400,
            ..Default::default()
        };
        // 2026-01-01 00:00 UTC as FILETIME
        let u = UserEntry {
            pwd_last_set: (1_767_225_600 + 11_644_473_600) * 10_000_000,
            ..user()
        };
        let msg = message(PolicyViolation::MinAge, Some(&d), &u);
        assert!(msg.contains("2026-01-02 00:00 UTC"), "{msg}");
    }
}
