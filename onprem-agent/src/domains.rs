//! The domains of one forest: which domain holds a user, so the operation goes to a DC of
//! that domain. By UPN suffix when it names a configured domain (or one of its extra UPN
//! suffixes), otherwise by looking the user up in each domain (objectGUIDs are unique across
//! a forest; a sAMAccountName found in two domains is refused as ambiguous).

use std::time::Instant;

use relay::proto::{sealed_operation::Action, user_ref, Outcome, SealedOperation};

use crate::directory::{
    ApplyResult, Directory, DirectoryConfig, DirectoryError, Rules, Verified, WriteMark,
    MSG_UNAVAILABLE,
};

/// One domain of the forest.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    /// DNS name, e.g. `emea.corp.example.com`.
    pub dns_name: String,
    /// Extra UPN suffixes that belong to this domain (e.g. `example.org`).
    pub upn_suffixes: Vec<String>,
    pub directory: DirectoryConfig,
}

struct Domain {
    dns_name: String,
    upn_suffixes: Vec<String>,
    directory: Directory,
}

impl Domain {
    /// Applies `op` here; the user found is reported with this domain's name.
    async fn apply(
        &self,
        op: &SealedOperation,
        deadline: Instant,
        rules: &Rules,
        on_write: &(dyn Fn(&WriteMark) + Sync),
    ) -> ApplyResult {
        let mut r = self
            .directory
            .apply_with(op, deadline, rules, on_write)
            .await;
        if let Some(u) = &mut r.user {
            u.domain.clone_from(&self.dns_name);
        }
        r
    }
}

/// Routes operations to the domain that holds the user.
pub struct Domains {
    list: Vec<Domain>,
}

impl Domains {
    /// The first domain is the primary one (it answers forest-wide policy queries).
    ///
    /// # Errors
    /// When a domain's directory configuration is unusable.
    pub fn new(configs: Vec<DomainConfig>) -> Result<Self, DirectoryError> {
        let list = configs
            .into_iter()
            .map(|c| {
                Ok(Domain {
                    dns_name: c.dns_name.to_ascii_lowercase(),
                    upn_suffixes: c
                        .upn_suffixes
                        .iter()
                        .map(|s| s.to_ascii_lowercase())
                        .collect(),
                    directory: Directory::new(c.directory)?,
                })
            })
            .collect::<Result<Vec<_>, DirectoryError>>()?;
        if list.is_empty() {
            return Err(DirectoryError::NoUrls);
        }
        Ok(Self { list })
    }

    /// Each domain's first reachable DC, or why none answered.
    pub async fn check(&self) -> Vec<(String, Result<String, DirectoryError>)> {
        let mut out = Vec::new();
        for d in &self.list {
            out.push((d.dns_name.clone(), d.directory.check().await));
        }
        out
    }

    /// Reads an unconfirmed write back from the domain whose DC it went to
    /// ([`Directory::verify`]).
    pub async fn verify(&self, mark: &WriteMark, until: Instant) -> Option<Verified> {
        let d = self
            .list
            .iter()
            .find(|d| d.directory.config().urls.contains(&mark.url))
            .unwrap_or(&self.list[0]);
        d.directory.verify(mark, until).await
    }

    fn by_upn_suffix(&self, upn: &str) -> Option<&Domain> {
        let suffix = upn.rsplit_once('@')?.1.to_ascii_lowercase();
        self.list
            .iter()
            .find(|d| d.dns_name == suffix || d.upn_suffixes.contains(&suffix))
    }

    /// Applies `op` in the domain that holds its user; `on_write` as in
    /// [`Directory::apply_with`]. The user found is reported with that domain's name.
    pub async fn apply<'a>(
        &'a self,
        op: &'a SealedOperation,
        deadline: Instant,
        rules: &'a Rules,
        on_write: &'a (dyn Fn(&WriteMark) + Sync),
    ) -> ApplyResult {
        let id = op.user.as_ref().and_then(|u| u.id.as_ref());
        let forest_wide_query = matches!(op.action, Some(Action::QueryPolicy(_))) && id.is_none();
        let in_domain = |d: &'a Domain| d.apply(op, deadline, rules, on_write);
        if self.list.len() == 1 || forest_wide_query {
            return in_domain(&self.list[0]).await;
        }
        let Some(id) = id else {
            return in_domain(&self.list[0]).await;
        };
        if let user_ref::Id::UserPrincipalName(upn) = id {
            if let Some(d) = self.by_upn_suffix(upn) {
                return in_domain(d).await;
            }
        }
        let mut holders = Vec::new();
        let mut errors = Vec::new();
        for d in &self.list {
            match d.directory.locate(id, deadline).await {
                Ok(Some(dn)) => holders.push((d, dn)),
                Ok(None) => {}
                Err(e) => errors.push(format!("{}: {e}", d.dns_name)),
            }
        }
        match holders.as_slice() {
            [(d, _)] => in_domain(d).await,
            [] if errors.is_empty() => ApplyResult::not_found(format!(
                "no user matches in any domain of the forest ({})",
                self.list.iter().map(|d| d.dns_name.as_str()).collect::<Vec<_>>().join(", ")
            )),
            [] => ApplyResult::failure(Outcome::DirectoryUnavailable, MSG_UNAVAILABLE, errors.join("; ")),
            many => ApplyResult::failure(
                Outcome::Failed,
                "More than one account matches; nothing was changed. Please contact your administrator.",
                format!(
                    "the user exists in several domains: {}; use the userPrincipalName or objectGUID",
                    many.iter().map(|(_, dn)| dn.as_str()).collect::<Vec<_>>().join(" | ")
                ),
            ),
        }
    }
}
