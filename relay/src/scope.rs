//! The writeback scope: which users writeback may touch. The tenant admin sets one per forest
//! on the gateway (sealed into every operation); the AD admin may set one in the agent's
//! configuration. A user must be in both: the cloud side can narrow what the AD admin allows,
//! never widen it.

use crate::dn::{Dn, DnError};
use crate::proto::WritebackScope;

/// Most OUs, and most groups, one scope may name.
pub const MAX_ENTRIES: usize = 100;
/// Longest DN a scope may hold.
pub const MAX_DN_LEN: usize = 1024;

/// A scope that is not usable, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("{what}: {source}")]
    Dn {
        what: &'static str,
        #[source]
        source: DnError,
    },
    #[error("{what}: at most {MAX_ENTRIES} entries (got {got})")]
    TooMany { what: &'static str, got: usize },
    #[error("{what}: a DN longer than {MAX_DN_LEN} characters")]
    TooLong { what: &'static str },
}

impl ScopeError {
    /// Which list was wrong (as the caller named it), and what was wrong with it.
    pub fn split(&self) -> (&'static str, String) {
        match self {
            Self::Dn { what, source } => (what, source.to_string()),
            Self::TooMany { what, got } => {
                (what, format!("at most {MAX_ENTRIES} entries (got {got})"))
            }
            Self::TooLong { what } => (what, format!("a DN longer than {MAX_DN_LEN} characters")),
        }
    }
}

/// Users under one of `ous` (subtree), or members of one of `groups` (nested membership);
/// both empty: every user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub ous: Vec<Dn>,
    pub groups: Vec<Dn>,
}

fn parse_list(what: &'static str, list: &[String]) -> Result<Vec<Dn>, ScopeError> {
    if list.len() > MAX_ENTRIES {
        return Err(ScopeError::TooMany {
            what,
            got: list.len(),
        });
    }
    let mut out: Vec<Dn> = Vec::with_capacity(list.len());
    for s in list {
        if s.len() > MAX_DN_LEN {
            return Err(ScopeError::TooLong { what });
        }
        let dn = Dn::parse(s).map_err(|source| ScopeError::Dn { what, source })?;
        if !out.contains(&dn) {
            out.push(dn);
        }
    }
    Ok(out)
}

impl Scope {
    /// A scope from DN strings (duplicates, however spelled, are dropped).
    ///
    /// # Errors
    /// Naming the list (`what_ous`/`what_groups`: how the caller calls them) and the DN.
    pub fn parse(
        ous: &[String],
        groups: &[String],
        what_ous: &'static str,
        what_groups: &'static str,
    ) -> Result<Self, ScopeError> {
        Ok(Self {
            ous: parse_list(what_ous, ous)?,
            groups: parse_list(what_groups, groups)?,
        })
    }

    /// The scope an operation or a Welcome carries (absent: every user).
    ///
    /// # Errors
    /// As [`Scope::parse`].
    pub fn from_proto(p: Option<&WritebackScope>) -> Result<Self, ScopeError> {
        match p {
            None => Ok(Self::default()),
            Some(p) => Self::parse(&p.ous, &p.groups, "scope OU", "scope group"),
        }
    }

    pub fn to_proto(&self) -> WritebackScope {
        WritebackScope {
            ous: self.ous.iter().map(|d| d.as_str().to_owned()).collect(),
            groups: self.groups.iter().map(|d| d.as_str().to_owned()).collect(),
        }
    }

    /// No restriction.
    pub fn is_all(&self) -> bool {
        self.ous.is_empty() && self.groups.is_empty()
    }

    /// Whether `user` lies under one of the scope's OUs (group membership needs the
    /// directory).
    pub fn has_ou_of(&self, user: &Dn) -> bool {
        self.ous.iter().any(|ou| user.is_within(ou))
    }

    /// For people: `every user`, or the OUs and groups.
    pub fn describe(&self) -> String {
        if self.is_all() {
            return "every user".to_owned();
        }
        let join = |l: &[Dn]| l.iter().map(Dn::as_str).collect::<Vec<_>>().join("; ");
        match (self.ous.is_empty(), self.groups.is_empty()) {
            (false, true) => format!("users under {}", join(&self.ous)),
            (true, false) => format!("members (nested) of {}", join(&self.groups)),
            _ => format!(
                "users under {}, or members (nested) of {}",
                join(&self.ous),
                join(&self.groups)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_round_trips_and_says_what_is_wrong() {
        let s = Scope::parse(
            &["OU=Sales,DC=c".into(), "ou=sales,dc=C".into()],
            &["CN=Writeback Users,OU=Groups,DC=c".into()],
            "--scope-ou",
            "--scope-group",
        )
        .unwrap();
        assert_eq!(s.ous.len(), 1, "one OU however spelled");
        assert_eq!(Scope::from_proto(Some(&s.to_proto())).unwrap(), s);
        assert!(s.has_ou_of(&Dn::parse("CN=a,OU=Sales,DC=c").unwrap()));
        assert!(!s.has_ou_of(&Dn::parse("CN=a,OU=Ops,DC=c").unwrap()));
        assert!(Scope::from_proto(None).unwrap().is_all());
        assert_eq!(Scope::default().describe(), "every user");
        let e = Scope::parse(
            &[],
            &["Writeback Users".into()],
            "--scope-ou",
            "--scope-group",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--scope-group: \"Writeback Users\" is not a distinguished name"),
            "{e}"
        );
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("OU=o{i},DC=c")).collect();
        assert!(matches!(
            Scope::parse(&many, &[], "--scope-ou", "--scope-group"),
            Err(ScopeError::TooMany { .. })
        ));
    }
}
