//! The agent's Active Directory client: a bounded pool of bound LDAPS connections with DC
//! failover, user lookup by objectGUID / userPrincipalName / sAMAccountName, the password
//! writes, and the mapping of AD's answers to outcomes an end user can act on.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ldap3::controls::RawControl;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Mod, Scope, SearchEntry, StdStream};
use tokio::sync::Semaphore;
use tracing::Instrument;
use zeroize::Zeroizing;

use relay::dn::Dn;
use relay::proto::{
    sealed_operation::Action, user_ref, Outcome, PolicyViolation, ResolvedUser, SealedOperation,
};
use relay::scope;
use relay::secret::Secret;
use serde::{Deserialize, Serialize};

pub mod policy;

/// LDAP_SERVER_POLICY_HINTS_OID: makes Windows DCs enforce history on resets. Sent
/// non-critical: Samba 4.17 refuses it when critical and ignores it otherwise.
const POLICY_HINTS_OID: &str = "1.2.840.113556.1.4.2239";
/// BER of `SEQUENCE { INTEGER 1 }`: flags = enforce.
const POLICY_HINTS_VALUE: [u8; 5] = [0x30, 0x03, 0x02, 0x01, 0x01];
/// userAccountControl ACCOUNTDISABLE.
const UF_ACCOUNTDISABLE: u32 = 0x2;
/// Below this much time left, nothing is written.
const MIN_WRITE_BUDGET: Duration = Duration::from_millis(100);
/// Kept back from a write's time budget (at most a fifth of it), so that a write the DC does
/// not confirm can still be read back from AD before the deadline.
const VERIFY_RESERVE: Duration = Duration::from_secs(1);
/// Between the two read-backs that must both show a write absent before the agent says it
/// did not land (a DC that was stalled finishes what it had received within this).
const VERIFY_SETTLE: Duration = Duration::from_secs(1);
/// Between read-back attempts while the DC does not answer.
const VERIFY_RETRY: Duration = Duration::from_millis(250);
/// LDAP_MATCHING_RULE_IN_CHAIN: membership through nested groups.
const IN_CHAIN: &str = "1.2.840.113556.1.4.1941";
/// The attributes read of a user (lookup and read-back).
const USER_ATTRS: [&str; 10] = [
    "distinguishedName",
    "objectGUID",
    "userPrincipalName",
    "sAMAccountName",
    "displayName",
    "adminCount",
    "userAccountControl",
    "pwdLastSet",
    "lockoutTime",
    "replPropertyMetaData",
];

/// How to reach and bind to the forest's domain controllers.
#[derive(Debug, Clone)]
pub struct DirectoryConfig {
    /// `ldaps://host[:port]` of one or more DCs, tried in order.
    pub urls: Vec<String>,
    /// PEM CA that signed the DCs' certificates.
    pub ca_file: PathBuf,
    /// DN or UPN of the delegated service account.
    pub bind_dn: String,
    pub bind_password: Secret,
    /// Where users are searched.
    pub base_dn: String,
    /// Pooled connections (and operations in parallel).
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// Use the DC's reason text to tell which password rule failed (Samba gives one; Windows
    /// does not). Off, the agent relies on evaluating the policy only.
    pub use_dc_reason_text: bool,
    /// The AD admin's writeback scope (`[scope]` in the agent's settings): users outside it
    /// are refused `OUT_OF_SCOPE` whatever the gateway's scope says.
    pub scope: scope::Scope,
}

/// What the gateway allows for one operation (its sealed switches); the agent's own limits
/// come from [`DirectoryConfig`].
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// Apply to accounts with adminCount=1.
    pub allow_protected: bool,
    /// The tenant admin's writeback scope for the forest.
    pub scope: scope::Scope,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("no LDAP URL configured")]
    NoUrls,
    #[error("LDAP URL {0:?} must be ldaps://host[:port] (the agent only speaks LDAP over TLS)")]
    BadUrl(String),
    #[error("tls: {0}")]
    Tls(#[from] relay::tls::TlsError),
    #[error("no domain controller answered: {0}")]
    Unavailable(String),
    #[error("the service account cannot bind to {url}: {detail}")]
    Bind { url: String, detail: String },
    #[error("ldap: {0}")]
    Ldap(String),
}

/// What applying one operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyResult {
    pub outcome: Outcome,
    pub policy_violation: PolicyViolation,
    /// Safe to show the end user, and actionable.
    pub message: String,
    /// For operators: LDAP result code and DC diagnostic. Never a password.
    pub detail: String,
    pub lookup_ms: u32,
    pub write_ms: u32,
    /// The DC used.
    pub directory: String,
    /// The answer to a policy query.
    pub policy: Option<relay::proto::PasswordPolicy>,
    /// The user the operation named, as found in AD (`None` when none was).
    pub user: Option<ResolvedUser>,
    /// Set when the DC did not confirm a write it may have committed (outcome `TIMED_OUT`):
    /// what to read back from AD to find out ([`Directory::verify`]).
    pub uncertain: Option<WriteMark>,
}

impl ApplyResult {
    /// A failure with an end-user message and an operator detail.
    pub fn failure(outcome: Outcome, message: &str, detail: impl Into<String>) -> Self {
        Self::new(outcome, message, detail)
    }

    /// `USER_NOT_FOUND`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(
            Outcome::UserNotFound,
            "No account was found for you in your organization's directory; nothing was changed.",
            detail,
        )
    }

    fn new(outcome: Outcome, message: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            policy_violation: PolicyViolation::Unspecified,
            message: message.into(),
            detail: detail.into(),
            lookup_ms: 0,
            write_ms: 0,
            directory: String::new(),
            policy: None,
            user: None,
            uncertain: None,
        }
    }
}

/// What the agent read of a user just before writing, so that a write the DC did not confirm
/// can be judged from AD itself afterwards. Journaled before the write; holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteMark {
    /// The DC the write went to: the read-back asks the same one (another DC may not have
    /// replicated the write yet).
    pub url: String,
    pub dn: String,
    pub check: Check,
}

/// How to tell from the user's entry whether one write landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Check {
    /// Reset or change: landed when `unicodePwd`'s write version (`replPropertyMetaData`)
    /// has grown past `version`. Where the metadata cannot be read, a changed `pwdLastSet`
    /// says landed and an unchanged one says nothing.
    Password {
        version: Option<u32>,
        pwd_last_set: i64,
    },
    /// Unlock: done when `lockoutTime` is 0.
    Unlocked,
    /// Clear forced change: done when `pwdLastSet` is not 0.
    NoForcedChange,
}

/// What one read-back of a user said about a write.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Landed(String),
    Absent(String),
    Undecidable(String),
}

impl Check {
    fn for_write(action: &Action, user: &UserEntry) -> Option<Self> {
        match action {
            Action::Reset(_) | Action::Change(_) => Some(Self::Password {
                version: user.password_version,
                pwd_last_set: user.pwd_last_set,
            }),
            Action::Unlock(_) => Some(Self::Unlocked),
            Action::ClearForcedChange(_) => Some(Self::NoForcedChange),
            Action::QueryPolicy(_) => None,
        }
    }

    fn seen(&self, now: &UserEntry) -> Seen {
        match self {
            Self::Password {
                version: Some(before),
                ..
            } if now.password_version.is_some() => {
                let after = now.password_version.unwrap_or_default();
                if after > *before {
                    Seen::Landed(format!("unicodePwd written (version {before} -> {after})"))
                } else {
                    Seen::Absent(format!("unicodePwd unchanged (version {after})"))
                }
            }
            Self::Password { pwd_last_set, .. } => {
                if now.pwd_last_set != *pwd_last_set {
                    Seen::Landed(format!(
                        "pwdLastSet changed ({pwd_last_set} -> {})",
                        now.pwd_last_set
                    ))
                } else {
                    Seen::Undecidable(
                        "replPropertyMetaData is not readable and pwdLastSet is unchanged".into(),
                    )
                }
            }
            Self::Unlocked if now.lockout_time == 0 => Seen::Landed("lockoutTime is 0".into()),
            Self::Unlocked => Seen::Absent(format!("lockoutTime is {}", now.lockout_time)),
            Self::NoForcedChange if now.pwd_last_set != 0 => {
                Seen::Landed(format!("pwdLastSet is {}", now.pwd_last_set))
            }
            Self::NoForcedChange => Seen::Absent("pwdLastSet is 0".into()),
        }
    }

    /// What the end user is told when the write landed.
    pub fn applied_message(&self) -> &'static str {
        match self {
            Self::Password { .. } => "Your password was changed.",
            Self::Unlocked => "Your account is unlocked.",
            Self::NoForcedChange => "You no longer need to change your password at next sign-in.",
        }
    }
}

/// What AD says about a write the DC did not confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// The write is in AD; with the evidence.
    Landed(String),
    /// Read back twice, [`VERIFY_SETTLE`] apart, on a new connection to the same DC after the
    /// first was dropped: not there.
    Absent(String),
}

/// When the DC did not confirm a write that it may have committed. Internally the outcome is
/// `TIMED_OUT`; the agent then sends no answer, and the gateway settles the operation
/// `TIMED_OUT` ("it may or may not have been applied") at its deadline.
pub const MSG_UNKNOWN: &str = relay::messages::UNKNOWN;
pub const MSG_UNAVAILABLE: &str = relay::messages::UNAVAILABLE;
const MSG_ACCESS_DENIED: &str = relay::messages::ACCESS_DENIED;

/// Where an LDAP failure happened: before anything was written, or during the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Lookup,
    Write,
}

struct ApplyError {
    stage: Stage,
    error: LdapError,
    /// For a failed write: what to read back.
    mark: Option<WriteMark>,
}

impl ApplyError {
    /// A failure before anything was written.
    fn at_lookup(error: LdapError) -> Self {
        Self {
            stage: Stage::Lookup,
            error,
            mark: None,
        }
    }
}

struct Conn {
    ldap: Ldap,
    url: String,
}

struct Inner {
    config: DirectoryConfig,
    tls: Arc<rustls::ClientConfig>,
    idle: Mutex<Vec<Conn>>,
    slots: Semaphore,
    /// DCs that failed to connect recently, until when they are tried last.
    down_until: Mutex<HashMap<String, Instant>>,
}

/// How long a DC that did not answer is tried after the others (it is still tried when none
/// of the others answers), so that a blackholed DC listed first does not cost a connect
/// timeout on every new connection.
const DOWN_FOR: Duration = Duration::from_secs(30);

/// The forest's directory, shared by all operations of the agent.
#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

/// A user found by lookup.
#[derive(Debug, Clone, Default)]
pub struct UserEntry {
    pub dn: String,
    /// objectGUID in canonical form (lower case); empty if the DC did not return it.
    pub guid: String,
    pub upn: String,
    pub sam: String,
    pub display_name: String,
    pub admin_count: bool,
    pub user_account_control: u32,
    /// Windows FILETIME (100 ns since 1601), 0 = must change.
    pub pwd_last_set: i64,
    /// Windows FILETIME of the lockout, 0 = not locked.
    pub lockout_time: i64,
    /// How many times AD has written the password (`unicodePwd`'s version in
    /// `replPropertyMetaData`); `None` when the metadata cannot be read.
    pub password_version: Option<u32>,
}

impl UserEntry {
    fn from_entry(e: &SearchEntry) -> Self {
        let first = |a: &str| first_value(e, a);
        // Binary, so normally in `bin_attrs`; a blob that happens to be valid UTF-8 is not.
        let meta = e
            .bin_attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("replPropertyMetaData"))
            .and_then(|(_, v)| v.first().cloned())
            .or_else(|| {
                e.attrs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("replPropertyMetaData"))
                    .and_then(|(_, v)| v.first().map(|s| s.as_bytes().to_vec()))
            });
        // Binary too; 16 bytes that happen to be valid UTF-8 land in `attrs`.
        let guid = e
            .bin_attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("objectGUID"))
            .and_then(|(_, v)| v.first().and_then(|b| guid_string(b)))
            .or_else(|| {
                e.attrs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("objectGUID"))
                    .and_then(|(_, v)| v.first().and_then(|s| guid_string(s.as_bytes())))
            })
            .unwrap_or_default();
        Self {
            dn: e.dn.clone(),
            guid,
            upn: first("userPrincipalName"),
            sam: first("sAMAccountName"),
            display_name: first("displayName"),
            admin_count: first("adminCount") == "1",
            user_account_control: first("userAccountControl").parse().unwrap_or(0),
            pwd_last_set: first("pwdLastSet").parse().unwrap_or(0),
            lockout_time: first("lockoutTime").parse().unwrap_or(0),
            password_version: meta.and_then(|b| {
                relay::ad::meta_version(&b, relay::ad::ATTID_UNICODE_PWD)
                    .ok()
                    .flatten()
            }),
        }
    }
}

impl UserEntry {
    /// The user in every form a caller may name them by (the domain is the caller's to add).
    pub fn resolved(&self) -> ResolvedUser {
        ResolvedUser {
            object_guid: self.guid.clone(),
            sam_account_name: self.sam.clone(),
            user_principal_name: self.upn.clone(),
            domain: String::new(),
            dn: self.dn.clone(),
        }
    }
}

fn host_port(url: &str) -> Result<String, DirectoryError> {
    let rest = url
        .strip_prefix("ldaps://")
        .ok_or_else(|| DirectoryError::BadUrl(url.to_owned()))?
        .trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(DirectoryError::BadUrl(url.to_owned()));
    }
    Ok(
        if rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !rest.ends_with(']')
        {
            rest.to_owned()
        } else {
            format!("{rest}:636")
        },
    )
}

impl Directory {
    /// Checks the configuration and reads the CA; connects lazily.
    ///
    /// # Errors
    /// On a missing or non-LDAPS URL or an unreadable CA.
    pub fn new(config: DirectoryConfig) -> Result<Self, DirectoryError> {
        if config.urls.is_empty() {
            return Err(DirectoryError::NoUrls);
        }
        for u in &config.urls {
            host_port(u)?;
        }
        let tls = relay::tls::client_config_with_ca(&config.ca_file)?;
        let size = config.pool_size.max(1);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                tls,
                idle: Mutex::new(Vec::new()),
                slots: Semaphore::new(size),
                down_until: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// TCP (with TCP_NODELAY) and verified TLS to one DC, not yet bound.
    pub(crate) async fn open_tls(
        &self,
        url: &str,
        budget: Duration,
    ) -> Result<Ldap, DirectoryError> {
        let timeout = budget.min(self.inner.config.connect_timeout);
        let addr = host_port(url)?;
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr))
            .await
            .map_err(|_| DirectoryError::Unavailable(format!("{url}: connect timed out")))?
            .map_err(|e| DirectoryError::Unavailable(format!("{url}: {e}")))?;
        // Nagle would hold the first request after the TLS handshake (~40 ms per connection).
        tcp.set_nodelay(true)
            .map_err(|e| DirectoryError::Unavailable(format!("{url}: {e}")))?;
        let std = tcp
            .into_std()
            .map_err(|e| DirectoryError::Unavailable(format!("{url}: {e}")))?;
        let settings = LdapConnSettings::new()
            .set_config(self.inner.tls.clone())
            .set_conn_timeout(timeout)
            .set_std_stream(StdStream::Tcp(std));
        let (conn, ldap) =
            tokio::time::timeout(timeout, LdapConnAsync::with_settings(settings, url))
                .await
                .map_err(|_| {
                    DirectoryError::Unavailable(format!("{url}: TLS handshake timed out"))
                })?
                .map_err(|e| {
                    DirectoryError::Tls(relay::tls::TlsError::Invalid {
                        path: url.into(),
                        detail: e.to_string(),
                    })
                })?;
        ldap3::drive!(conn);
        Ok(ldap)
    }

    /// Binds `ldap` as the configured service account.
    pub(crate) async fn bind(
        &self,
        ldap: &mut Ldap,
        url: &str,
        budget: Duration,
    ) -> Result<(), DirectoryError> {
        let cfg = &self.inner.config;
        let bind = ldap
            .with_timeout(budget.min(cfg.connect_timeout))
            .simple_bind(&cfg.bind_dn, cfg.bind_password.expose())
            .await
            .map_err(|e| DirectoryError::Unavailable(format!("{url}: {e}")))?;
        if bind.rc != 0 {
            return Err(DirectoryError::Bind {
                url: url.to_owned(),
                detail: format!("result {} {}", bind.rc, bind.text),
            });
        }
        Ok(())
    }

    async fn connect_one(&self, url: &str, budget: Duration) -> Result<Conn, DirectoryError> {
        let mut ldap = self.open_tls(url, budget).await?;
        self.bind(&mut ldap, url, budget).await?;
        Ok(Conn {
            ldap,
            url: url.to_owned(),
        })
    }

    /// The configuration this directory was built from.
    pub fn config(&self) -> &DirectoryConfig {
        &self.inner.config
    }

    /// A bound connection: an idle pooled one (when `reuse`), or a new one from the first DC
    /// that answers. The flag tells whether it came from the pool.
    async fn checkout(
        &self,
        budget: Duration,
        reuse: bool,
    ) -> Result<(Conn, bool), DirectoryError> {
        if reuse {
            while let Some(mut c) = self.pop_idle() {
                if !c.ldap.is_closed() {
                    return Ok((c, true));
                }
            }
        }
        let mut errors = Vec::new();
        let mut bind_error = None;
        for url in self.urls_in_order() {
            match self.connect_one(url, budget).await {
                Ok(c) => {
                    self.mark(url, true);
                    return Ok((c, false));
                }
                Err(e @ DirectoryError::Bind { .. }) => {
                    self.mark(url, true);
                    tracing::warn!(event = "WB2021", %url, error = %e, "service account bind failed");
                    bind_error = Some(e);
                }
                Err(e) => {
                    self.mark(url, false);
                    crate::metrics::get().ldap_errors.inc();
                    tracing::warn!(event = "WB2020", %url, error = %e, "domain controller unavailable; trying the next");
                    errors.push(match e {
                        DirectoryError::Unavailable(detail) => detail,
                        other => other.to_string(),
                    });
                }
            }
        }
        Err(bind_error.unwrap_or_else(|| DirectoryError::Unavailable(errors.join("; "))))
    }

    /// The configured DCs in order, those that failed within [`DOWN_FOR`] last.
    fn urls_in_order(&self) -> Vec<&String> {
        let now = Instant::now();
        let down = self.inner.down_until.lock().expect("dc health");
        let is_down = |u: &String| down.get(u).is_some_and(|until| *until > now);
        let urls = &self.inner.config.urls;
        urls.iter()
            .filter(|u| !is_down(u))
            .chain(urls.iter().filter(|u| is_down(u)))
            .collect()
    }

    fn mark(&self, url: &str, up: bool) {
        let mut down = self.inner.down_until.lock().expect("dc health");
        if up {
            down.remove(url);
        } else {
            down.insert(url.to_owned(), Instant::now() + DOWN_FOR);
        }
    }

    fn pop_idle(&self) -> Option<Conn> {
        self.inner.idle.lock().expect("ldap pool").pop()
    }

    fn checkin(&self, conn: Conn) {
        self.inner.idle.lock().expect("ldap pool").push(conn);
    }

    /// Connects, binds and reads the rootDSE; returns the DC's URL.
    ///
    /// # Errors
    /// When no DC answers or the bind fails.
    pub async fn check(&self) -> Result<String, DirectoryError> {
        let _slot = self.inner.slots.acquire().await.expect("semaphore open");
        let (mut conn, _) = self
            .checkout(self.inner.config.connect_timeout, true)
            .await?;
        let r = conn
            .ldap
            .with_timeout(self.inner.config.connect_timeout)
            .search(
                "",
                Scope::Base,
                "(objectClass=*)",
                vec!["defaultNamingContext"],
            )
            .await
            .map_err(|e| DirectoryError::Ldap(e.to_string()))?;
        if r.1.rc != 0 {
            return Err(DirectoryError::Ldap(format!(
                "rootDSE: result {} {}",
                r.1.rc, r.1.text
            )));
        }
        let url = conn.url.clone();
        self.checkin(conn);
        Ok(url)
    }

    /// Applies one operation before `deadline`. Never panics, never returns a password.
    pub async fn apply(
        &self,
        op: &SealedOperation,
        deadline: Instant,
        rules: &Rules,
    ) -> ApplyResult {
        self.apply_with(op, deadline, rules, &|_| {}).await
    }

    /// [`Directory::apply`], calling `on_write` with what was read of the user just before
    /// the write goes to the DC (the agent journals it, to read the write back after a crash).
    pub async fn apply_with(
        &self,
        op: &SealedOperation,
        deadline: Instant,
        rules: &Rules,
        on_write: &(dyn Fn(&WriteMark) + Sync),
    ) -> ApplyResult {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining < MIN_WRITE_BUDGET {
            return expired();
        }
        let Ok(_slot) = tokio::time::timeout(remaining, self.inner.slots.acquire()).await else {
            return expired();
        };
        // A pooled connection may have died quietly (DC restarted): a failure before anything
        // was written is retried once on a fresh connection. A failed write is never retried.
        for attempt in 0..2 {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (mut conn, pooled) = match self.checkout(remaining, attempt == 0).await {
                Ok(c) => c,
                Err(DirectoryError::Bind { url, detail }) => {
                    let mut r = ApplyResult::new(
                        Outcome::AccessDenied,
                        MSG_ACCESS_DENIED,
                        format!("the service account cannot bind to {url}: {detail}"),
                    );
                    r.directory = url;
                    return r;
                }
                Err(e) => {
                    return ApplyResult::new(
                        Outcome::DirectoryUnavailable,
                        MSG_UNAVAILABLE,
                        e.to_string(),
                    )
                }
            };
            match self
                .apply_on(&mut conn, op, deadline, rules, on_write)
                .await
            {
                Ok(mut r) => {
                    r.directory = conn.url.clone();
                    self.checkin(conn);
                    return r;
                }
                Err(e) if e.stage == Stage::Lookup && pooled => {
                    tracing::info!(url = %conn.url, error = %e.error, "pooled connection failed before writing; retrying on a fresh one");
                }
                Err(e) => {
                    crate::metrics::get().ldap_errors.inc();
                    // The connection is suspect: drop it. A failure before the write changed
                    // nothing; one during the write (timed out, connection lost) may have been
                    // committed by the DC: never "nothing was changed" then.
                    let (outcome, message) = if e.stage == Stage::Write {
                        (Outcome::TimedOut, MSG_UNKNOWN)
                    } else {
                        (Outcome::DirectoryUnavailable, MSG_UNAVAILABLE)
                    };
                    let mut r = ApplyResult::new(
                        outcome,
                        message,
                        format!("{} during {:?}: {}", conn.url, e.stage, e.error),
                    );
                    r.directory = conn.url;
                    r.uncertain = e.mark;
                    return r;
                }
            }
        }
        ApplyResult::new(
            Outcome::DirectoryUnavailable,
            MSG_UNAVAILABLE,
            "no usable connection",
        )
    }

    /// The effective password policy: the domain's, or the user's resultant one.
    async fn query_policy(
        &self,
        conn: &mut Conn,
        op: &SealedOperation,
        deadline: Instant,
        rules: &Rules,
    ) -> Result<ApplyResult, ApplyError> {
        let started = Instant::now();
        let lookup = ApplyError::at_lookup;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let user = match op.user.as_ref().and_then(|u| u.id.as_ref()) {
            None => None,
            Some(id) => {
                let users = self
                    .find_user(&mut conn.ldap, id, remaining)
                    .await
                    .map_err(lookup)?;
                match users.as_slice() {
                    [one] => Some(one.clone()),
                    [] => {
                        return Ok(ApplyResult::new(
                            Outcome::UserNotFound,
                            "No account was found for you in your organization's directory.",
                            format!("no user matches {}", describe(id)),
                        ))
                    }
                    many => {
                        return Ok(ApplyResult::new(
                            Outcome::Failed,
                            "More than one account matches.",
                            format!("{} users match {}", many.len(), describe(id)),
                        ))
                    }
                }
            }
        };
        // Outside the scope: writeback would refuse the user, so their resultant policy is
        // not theirs to be shown here; the domain's is, with that said.
        let out_of_scope = match &user {
            Some(u) => self
                .outside_scope(&mut conn.ldap, u, &rules.scope, remaining)
                .await
                .map_err(lookup)?
                .is_some(),
            None => false,
        };
        let base = &self.inner.config.base_dn;
        let effective = match user.as_ref().filter(|_| !out_of_scope) {
            Some(u) => policy::effective_policy(&mut conn.ldap, base, &u.dn, remaining).await,
            None => policy::read_domain_policy(&mut conn.ldap, base, remaining)
                .await
                .map(|p| policy::EffectivePolicy {
                    policy: Some(p),
                    source: "domain".into(),
                }),
        }
        .map_err(lookup)?;
        let Some(p) = effective.policy else {
            return Ok(ApplyResult::new(
                Outcome::Failed,
                "Your organization's password rules cannot be shown right now.",
                effective.source,
            ));
        };
        let next_change_allowed_unix_ms = match &user {
            Some(u) if u.pwd_last_set > 0 && p.min_age_secs > 0 => {
                (policy::filetime_to_unix_secs(u.pwd_last_set) + p.min_age_secs as i64) * 1000
            }
            _ => 0,
        };
        let mut r = ApplyResult::new(
            Outcome::Applied,
            "",
            format!("policy from {}", effective.source),
        );
        r.lookup_ms = started.elapsed().as_millis() as u32;
        r.policy = Some(relay::proto::PasswordPolicy {
            forest: op
                .user
                .as_ref()
                .map(|u| u.forest.clone())
                .unwrap_or_default(),
            min_length: p.min_length,
            complexity: p.complexity,
            history_length: p.history_length,
            min_age_seconds: p.min_age_secs,
            max_age_seconds: p.max_age_secs,
            next_change_allowed_unix_ms: if out_of_scope {
                0
            } else {
                next_change_allowed_unix_ms
            },
            source: effective.source,
            out_of_scope,
        });
        r.user = user.as_ref().map(UserEntry::resolved);
        Ok(r)
    }

    /// The DN of the user named by `id` in this domain, if any (lookup only).
    ///
    /// # Errors
    /// When no DC answers.
    pub async fn locate(
        &self,
        id: &user_ref::Id,
        deadline: Instant,
    ) -> Result<Option<String>, DirectoryError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let _slot = tokio::time::timeout(remaining, self.inner.slots.acquire())
            .await
            .map_err(|_| DirectoryError::Unavailable("deadline reached".into()))?
            .expect("semaphore open");
        let (mut conn, _) = self.checkout(remaining, true).await?;
        let found = self
            .find_user(
                &mut conn.ldap,
                id,
                deadline.saturating_duration_since(Instant::now()),
            )
            .await
            .map_err(|e| DirectoryError::Ldap(e.to_string()))?;
        self.checkin(conn);
        Ok(match found.as_slice() {
            [] => None,
            [one, ..] => Some(one.dn.clone()),
        })
    }

    /// Reads a write the DC did not confirm back from AD, on new connections to the DC it
    /// went to, until `until`: `Landed` as soon as AD shows it; `Absent` only when two reads
    /// [`VERIFY_SETTLE`] apart both show it missing; `None` when AD could not tell in time.
    pub async fn verify(&self, mark: &WriteMark, until: Instant) -> Option<Verified> {
        let mut absent_since: Option<(Instant, String)> = None;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.read_back(mark, left).await {
                Ok(Seen::Landed(evidence)) => return Some(Verified::Landed(evidence)),
                Ok(Seen::Absent(evidence)) => match &absent_since {
                    Some((first, _)) if first.elapsed() >= VERIFY_SETTLE => {
                        return Some(Verified::Absent(format!(
                            "{evidence}, read back twice {} ms apart",
                            first.elapsed().as_millis()
                        )));
                    }
                    Some(_) => {}
                    None => absent_since = Some((Instant::now(), evidence)),
                },
                Ok(Seen::Undecidable(why)) => {
                    tracing::warn!(event = "WB2017", dn = %mark.dn, %why, "cannot tell from AD whether a write landed");
                    return None;
                }
                Err(e) => {
                    tracing::info!(url = %mark.url, error = %e, "read-back of an unconfirmed write failed; retrying");
                }
            }
            let pause = match &absent_since {
                Some((first, _)) => VERIFY_SETTLE.saturating_sub(first.elapsed()),
                None => VERIFY_RETRY,
            };
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
        }
    }

    /// One read of the user of `mark` on a new connection to `mark.url`.
    async fn read_back(&self, mark: &WriteMark, budget: Duration) -> Result<Seen, DirectoryError> {
        let mut conn = self.connect_one(&mark.url, budget).await?;
        let result = conn
            .ldap
            .with_timeout(budget)
            .search(
                &mark.dn,
                Scope::Base,
                "(objectClass=*)",
                USER_ATTRS.to_vec(),
            )
            .await
            .map_err(|e| DirectoryError::Ldap(e.to_string()))?;
        let _ = conn.ldap.unbind().await;
        let (entries, res) = (result.0, result.1);
        if res.rc != 0 {
            return Err(DirectoryError::Ldap(format!(
                "read-back of {}: result {} {}",
                mark.dn, res.rc, res.text
            )));
        }
        let entry = entries
            .into_iter()
            .find(|e| !e.is_ref())
            .map(SearchEntry::construct)
            .ok_or_else(|| DirectoryError::Ldap(format!("read-back of {}: no entry", mark.dn)))?;
        Ok(mark.check.seen(&UserEntry::from_entry(&entry)))
    }

    /// Finds the user named by `id`.
    async fn find_user(
        &self,
        ldap: &mut Ldap,
        id: &user_ref::Id,
        timeout: Duration,
    ) -> Result<Vec<UserEntry>, LdapError> {
        let filter = user_filter(id);
        if filter.is_empty() {
            return Ok(Vec::new());
        }
        let result = ldap
            .with_timeout(timeout)
            .search(
                &self.inner.config.base_dn,
                Scope::Subtree,
                &filter,
                USER_ATTRS.to_vec(),
            )
            .await?;
        let (entries, res) = (result.0, result.1);
        // 10 = referral (ignored: we never chase), 32 = base DN missing: nobody found.
        if !matches!(res.rc, 0 | 10 | 32) {
            return Err(LdapError::LdapResult { result: res });
        }
        Ok(entries
            .into_iter()
            .filter(|e| !e.is_ref())
            .map(SearchEntry::construct)
            .map(|e| UserEntry::from_entry(&e))
            .collect())
    }

    /// Why `user` is outside the writeback scope (the gateway's `cloud`, or this agent's
    /// own), for operators; `None` when inside both.
    async fn outside_scope(
        &self,
        ldap: &mut Ldap,
        user: &UserEntry,
        cloud: &scope::Scope,
        timeout: Duration,
    ) -> Result<Option<String>, LdapError> {
        for (s, whose) in [
            (cloud, "the writeback scope set on the gateway"),
            (&self.inner.config.scope, "this agent's local scope"),
        ] {
            if !s.is_all() && !self.covers(ldap, user, s, timeout).await? {
                return Ok(Some(format!(
                    "{} is outside {whose} ({}); nothing was written",
                    user.dn,
                    s.describe()
                )));
            }
        }
        Ok(None)
    }

    /// Whether `scope` holds `user`: under one of its OUs, or a member of one of its groups
    /// through any depth of nesting (asked of the DC with LDAP_MATCHING_RULE_IN_CHAIN). The
    /// primary group (`primaryGroupID`, e.g. Domain Users) is not membership here.
    async fn covers(
        &self,
        ldap: &mut Ldap,
        user: &UserEntry,
        scope: &scope::Scope,
        timeout: Duration,
    ) -> Result<bool, LdapError> {
        // A DN the DC sent that does not parse is in no OU (refused, never let through).
        if Dn::parse(&user.dn).is_ok_and(|dn| scope.has_ou_of(&dn)) {
            return Ok(true);
        }
        if scope.groups.is_empty() {
            return Ok(false);
        }
        let ldap3::SearchResult(entries, res) = ldap
            .with_timeout(timeout)
            .search(
                &user.dn,
                Scope::Base,
                &member_of_any(&scope.groups),
                vec!["1.1"],
            )
            .await?;
        if res.rc != 0 {
            return Err(LdapError::LdapResult { result: res });
        }
        Ok(entries.iter().any(|e| !e.is_ref()))
    }

    async fn apply_on(
        &self,
        conn: &mut Conn,
        op: &SealedOperation,
        deadline: Instant,
        rules: &Rules,
        on_write: &(dyn Fn(&WriteMark) + Sync),
    ) -> Result<ApplyResult, ApplyError> {
        let started = Instant::now();
        if let Some(Action::QueryPolicy(_)) = op.action {
            return self.query_policy(conn, op, deadline, rules).await;
        }
        let Some(id) = op.user.as_ref().and_then(|u| u.id.as_ref()) else {
            return Ok(ApplyResult::new(
                Outcome::Refused,
                "The request could not be processed; nothing was changed.",
                "operation names no user",
            ));
        };
        let Some(action) = op.action.as_ref() else {
            return Ok(ApplyResult::new(
                Outcome::Refused,
                "The request could not be processed; nothing was changed.",
                "operation has no action",
            ));
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let users = self
            .find_user(&mut conn.ldap, id, remaining)
            .instrument(tracing::info_span!("agent.lookup"))
            .await
            .map_err(ApplyError::at_lookup)?;
        let lookup_ms = started.elapsed().as_millis() as u32;
        let user = match users.as_slice() {
            [] => {
                let mut r = ApplyResult::new(
                    Outcome::UserNotFound,
                    "No account was found for you in your organization's directory; nothing was changed.",
                    format!("no user matches {} under {}", describe(id), self.inner.config.base_dn),
                );
                r.lookup_ms = lookup_ms;
                return Ok(r);
            }
            [one] => one.clone(),
            many => {
                let mut r = ApplyResult::new(
                    Outcome::Failed,
                    "More than one account matches; nothing was changed. Please contact your administrator.",
                    format!("{} users match {}", many.len(), describe(id)),
                );
                r.lookup_ms = lookup_ms;
                return Ok(r);
            }
        };
        let target = Target {
            user: &user,
            action,
            by_admin: op.initiator == relay::proto::Initiator::Admin as i32,
            started,
        };
        let mut result = self
            .apply_to(conn, &target, deadline, rules, on_write)
            .await?;
        result.user = Some(user.resolved());
        Ok(result)
    }

    /// The checks and the write for the one user found.
    async fn apply_to(
        &self,
        conn: &mut Conn,
        &Target {
            user,
            action,
            by_admin,
            started,
        }: &Target<'_>,
        deadline: Instant,
        rules: &Rules,
        on_write: &(dyn Fn(&WriteMark) + Sync),
    ) -> Result<ApplyResult, ApplyError> {
        // The scope comes first: outside it the agent tells nothing more about the account.
        let remaining = deadline.saturating_duration_since(Instant::now());
        let outside = self
            .outside_scope(&mut conn.ldap, user, &rules.scope, remaining)
            .await
            .map_err(ApplyError::at_lookup)?;
        let lookup_ms = started.elapsed().as_millis() as u32;
        if let Some(why) = outside {
            let mut r = ApplyResult::new(Outcome::OutOfScope, relay::messages::OUT_OF_SCOPE, why);
            r.lookup_ms = lookup_ms;
            return Ok(r);
        }
        if user.admin_count && !rules.allow_protected {
            let mut r = ApplyResult::new(
                Outcome::ProtectedAccount,
                "This account is protected; its password cannot be changed here. Please contact your administrator.",
                format!("{} has adminCount=1 and protected accounts are not allowed for this forest", user.dn),
            );
            r.lookup_ms = lookup_ms;
            return Ok(r);
        }
        if user.user_account_control & UF_ACCOUNTDISABLE != 0 && !by_admin {
            let mut r = ApplyResult::new(
                Outcome::AccountDisabled,
                "Your account is disabled; its password cannot be changed here. Please contact your administrator.",
                format!("{} is disabled (userAccountControl {:#x}); only an administrator may reset it", user.dn, user.user_account_control),
            );
            r.lookup_ms = lookup_ms;
            return Ok(r);
        }
        if deadline.saturating_duration_since(Instant::now()) < MIN_WRITE_BUDGET {
            let mut r = expired();
            r.lookup_ms = lookup_ms;
            return Ok(r);
        }

        let write_started = Instant::now();
        let Write {
            mods,
            controls,
            new_password,
        } = Write::for_action(action);
        let mark = Check::for_write(action, user).map(|check| WriteMark {
            url: conn.url.clone(),
            dn: user.dn.clone(),
            check,
        });
        if let Some(m) = &mark {
            on_write(m);
        }
        // Part of the budget is kept back to read an unconfirmed write back before the deadline.
        let remaining = deadline.saturating_duration_since(Instant::now());
        let budget = remaining - (remaining / 5).min(VERIFY_RESERVE);
        let res = conn
            .ldap
            .with_controls(controls)
            .with_timeout(budget)
            .modify(&user.dn, mods)
            .instrument(tracing::info_span!("agent.ldap_write", directory = %conn.url, kind = action.kind()))
            .await;
        let write_ms = write_started.elapsed().as_millis() as u32;
        let res = res.map_err(|error| ApplyError {
            stage: Stage::Write,
            error,
            mark,
        })?;
        let mut result = if res.rc == 0 {
            ApplyResult::new(
                Outcome::Applied,
                match action {
                    Action::Unlock(_) => "Your account is unlocked.",
                    Action::ClearForcedChange(_) => {
                        "You no longer need to change your password at next sign-in."
                    }
                    _ => "Your password was changed.",
                },
                format!("{} on {}", action.kind(), user.dn),
            )
        } else {
            let effective = if is_policy_error(&res.text) {
                let remaining = deadline.saturating_duration_since(Instant::now());
                policy::effective_policy(
                    &mut conn.ldap,
                    &self.inner.config.base_dn,
                    &user.dn,
                    remaining,
                )
                .await
                .ok()
            } else {
                None
            };
            // Windows DCs give no reason text; `use_dc_reason_text = false` makes Samba behave
            // the same, so the diagnosis is proven to work without it.
            let text = if self.inner.config.use_dc_reason_text {
                res.text.clone()
            } else {
                res.text.chars().take(8).collect()
            };
            let domain = effective.as_ref().and_then(|e| e.policy.as_ref());
            let mut r = map_ldap_failure(res.rc, &text, user, action, new_password, domain);
            if let Some(e) = &effective {
                r.detail = format!("{}; effective policy from {}", r.detail, e.source);
            }
            r
        };
        result.lookup_ms = lookup_ms;
        result.write_ms = write_ms;
        let m = crate::metrics::get();
        m.ldap_seconds
            .with_label_values(&["lookup"])
            .observe(f64::from(lookup_ms) / 1000.0);
        m.ldap_seconds
            .with_label_values(&["write"])
            .observe(f64::from(write_ms) / 1000.0);
        Ok(result)
    }
}

/// What one operation is to do, to whom, once the user is found.
struct Target<'a> {
    user: &'a UserEntry,
    action: &'a Action,
    by_admin: bool,
    /// When the lookup began.
    started: Instant,
}

/// One LDAP modify: its modifications, its controls, and the candidate password (kept for
/// diagnosing a policy rejection).
struct Write<'a> {
    mods: Vec<Mod<Vec<u8>>>,
    controls: Vec<RawControl>,
    new_password: Option<&'a str>,
}

impl<'a> Write<'a> {
    fn for_action(action: &'a Action) -> Self {
        let zero = || set(Zeroizing::new(b"0".to_vec()));
        match action {
            Action::Reset(r) => {
                // One modify: the password, must-change and unlock apply together or not at all.
                let mut mods = vec![Mod::Replace(
                    b"unicodePwd".to_vec(),
                    set(encode_unicode_pwd(&r.new_password)),
                )];
                if r.must_change_at_next_logon {
                    mods.push(Mod::Replace(b"pwdLastSet".to_vec(), zero()));
                }
                if r.unlock {
                    mods.push(Mod::Replace(b"lockoutTime".to_vec(), zero()));
                }
                let hints = RawControl {
                    ctype: POLICY_HINTS_OID.to_owned(),
                    crit: false,
                    val: Some(POLICY_HINTS_VALUE.to_vec()),
                };
                Self {
                    mods,
                    controls: vec![hints],
                    new_password: Some(&r.new_password),
                }
            }
            Action::Change(c) => Self {
                mods: vec![
                    Mod::Delete(
                        b"unicodePwd".to_vec(),
                        set(encode_unicode_pwd(&c.old_password)),
                    ),
                    Mod::Add(
                        b"unicodePwd".to_vec(),
                        set(encode_unicode_pwd(&c.new_password)),
                    ),
                ],
                controls: Vec::new(),
                new_password: Some(&c.new_password),
            },
            Action::Unlock(_) => Self {
                mods: vec![Mod::Replace(b"lockoutTime".to_vec(), zero())],
                controls: Vec::new(),
                new_password: None,
            },
            Action::QueryPolicy(_) => Self {
                mods: Vec::new(),
                controls: Vec::new(),
                new_password: None,
            },
            Action::ClearForcedChange(_) => Self {
                mods: vec![Mod::Replace(
                    b"pwdLastSet".to_vec(),
                    set(Zeroizing::new(b"-1".to_vec())),
                )],
                controls: Vec::new(),
                new_password: None,
            },
        }
    }
}

fn set(v: Zeroizing<Vec<u8>>) -> HashSet<Vec<u8>> {
    // ldap3 takes owned values; the copy inside the request is dropped (not wiped) by ldap3
    // after encoding, which we cannot reach. Our own buffer is wiped here.
    HashSet::from([v.to_vec()])
}

/// The first value of attribute `name`, or empty.
pub(crate) fn first_value(entry: &SearchEntry, name: &str) -> String {
    entry
        .attrs
        .get(name)
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or_default()
}

fn expired() -> ApplyResult {
    ApplyResult::new(
        Outcome::Expired,
        "The request expired before it could be applied; nothing was changed. Please try again.",
        "deadline reached before the write; nothing written",
    )
}

fn describe(id: &user_ref::Id) -> String {
    match id {
        user_ref::Id::ObjectGuid(g) => format!("objectGUID {g}"),
        user_ref::Id::UserPrincipalName(u) => format!("userPrincipalName {u}"),
        user_ref::Id::SamAccountName(s) => format!("sAMAccountName {s}"),
    }
}

/// The LDAP filter for the user named by `id` (empty for a malformed objectGUID).
pub fn user_filter(id: &user_ref::Id) -> String {
    let (attr, value) = match id {
        user_ref::Id::ObjectGuid(g) => match guid_filter_bytes(g) {
            Some(escaped) => ("objectGUID", escaped),
            None => return String::new(),
        },
        user_ref::Id::UserPrincipalName(upn) => (
            "userPrincipalName",
            ldap3::ldap_escape(upn.as_str()).into_owned(),
        ),
        user_ref::Id::SamAccountName(sam) => (
            "sAMAccountName",
            ldap3::ldap_escape(sam.as_str()).into_owned(),
        ),
    };
    people_and(&format!("({attr}={value})"))
}

/// An LDAP filter for people's user accounts that also match `term` (a filter, or empty):
/// sAMAccountType SAM_NORMAL_USER_ACCOUNT (805306368), not computers, managed service
/// accounts (gMSA) or trust accounts, whose passwords are not the writeback's business (all
/// of them are `objectClass=user` too).
pub fn people_and(term: &str) -> String {
    format!("(&(objectClass=user)(sAMAccountType=805306368){term})")
}

/// An LDAP filter matching members of any of `groups`, through nested groups too
/// (LDAP_MATCHING_RULE_IN_CHAIN; the primary group does not count).
pub fn member_of_any(groups: &[Dn]) -> String {
    let any: String = groups
        .iter()
        .map(|g| format!("(memberOf:{IN_CHAIN}:={})", ldap3::ldap_escape(g.as_str())))
        .collect();
    format!("(|{any})")
}

/// `"password"` in UTF-16LE, as AD wants `unicodePwd`.
pub fn encode_unicode_pwd(password: &str) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity((password.len() + 2) * 2));
    for unit in std::iter::once('"')
        .chain(password.chars())
        .chain(std::iter::once('"'))
        .flat_map(|c| {
            let mut buf = [0u16; 2];
            c.encode_utf16(&mut buf).to_vec()
        })
    {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}

/// The LDAP filter escape of an objectGUID given in canonical form: the raw 16 bytes in AD's
/// little-endian layout (first three groups byte-swapped), each as `\hh`.
pub fn guid_filter_bytes(canonical: &str) -> Option<String> {
    let bytes = guid_bytes(canonical)?;
    Some(bytes.iter().map(|b| format!("\\{b:02x}")).collect())
}

/// The 16 raw bytes of an objectGUID in canonical form.
pub fn guid_bytes(canonical: &str) -> Option<[u8; 16]> {
    let hex: String = canonical.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || canonical.len() != 36 {
        return None;
    }
    let mut be = [0u8; 16];
    hex::decode_to_slice(&hex, &mut be).ok()?;
    let mut le = be;
    le[0..4].reverse();
    le[4..6].reverse();
    le[6..8].reverse();
    Some(le)
}

/// The canonical form (8-4-4-4-12, lower case) of an objectGUID's 16 bytes as AD stores them
/// (first three groups little-endian); `None` for anything but 16 bytes.
pub fn guid_string(le: &[u8]) -> Option<String> {
    let b: [u8; 16] = le.try_into().ok()?;
    let mut be = b;
    be[0..4].reverse();
    be[4..6].reverse();
    be[6..8].reverse();
    let h = hex::encode(be);
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn is_policy_error(text: &str) -> bool {
    text.to_ascii_uppercase().contains("0000052D")
}

/// Maps a failed modify to an outcome, with an end-user message and an operator detail.
pub fn map_ldap_failure(
    rc: u32,
    text: &str,
    user: &UserEntry,
    action: &Action,
    new_password: Option<&str>,
    domain: Option<&policy::DomainPolicy>,
) -> ApplyResult {
    let detail = format!("LDAP result {rc}: {}", text.trim());
    let upper = text.to_ascii_uppercase();
    if upper.contains("00000056") {
        return ApplyResult::new(
            Outcome::WrongOldPassword,
            "The current password is incorrect; nothing was changed.",
            detail,
        );
    }
    if upper.contains("0000052D") {
        let (violation, message) = policy::diagnose(text, user, action, new_password, domain);
        let mut r = ApplyResult::new(Outcome::RejectedByPolicy, message, detail);
        // The numbers the gateway words its own message with (it never relays our text).
        r.policy = Some(policy::policy_numbers(domain, user));
        r.policy_violation = violation;
        return r;
    }
    match rc {
        50 => ApplyResult::new(
            Outcome::AccessDenied,
            MSG_ACCESS_DENIED,
            format!(
                "{detail}; the service account lacks the right for this {}: {} on {} (check the delegation on the user's OU and that inheritance is enabled on the user)",
                action.kind(),
                match action {
                    Action::Reset(r) if r.must_change_at_next_logon || r.unlock => "Reset Password, write pwdLastSet / lockoutTime",
                    Action::Reset(_) => "Reset Password",
                    Action::Change(_) => "Change Password",
                    Action::Unlock(_) => "write lockoutTime",
                    Action::ClearForcedChange(_) => "Unexpire Password (on the domain root) and write pwdLastSet",
                    Action::QueryPolicy(_) => "read the password policy",
                },
                user.dn
            ),
        ),
        32 => ApplyResult::new(Outcome::UserNotFound, "No account was found for you in your organization's directory; nothing was changed.", detail),
        51 | 52 => ApplyResult::new(Outcome::DirectoryUnavailable, MSG_UNAVAILABLE, detail),
        _ => ApplyResult::new(Outcome::Failed, "The directory refused the change; nothing was changed. Please contact your administrator.", detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_is_little_endian_in_filters() {
        assert_eq!(
            guid_filter_bytes("d2a1b399-db17-4a4c-9c27-0123456789ab").unwrap(),
            "\\99\\b3\\a1\\d2\\17\\db\\4c\\4a\\9c\\27\\01\\23\\45\\67\\89\\ab"
        );
        assert!(guid_filter_bytes("not-a-guid").is_none());
        let g = "d2a1b399-db17-4a4c-9c27-0123456789ab";
        assert_eq!(guid_string(&guid_bytes(g).unwrap()).unwrap(), g);
        assert!(guid_string(&[0; 15]).is_none());
    }

    #[test]
    fn unicode_pwd_is_quoted_utf16le_including_astral_chars() {
        assert_eq!(&encode_unicode_pwd("a")[..], &[0x22, 0, 0x61, 0, 0x22, 0]);
        let e = encode_unicode_pwd("é😀");
        // quote, é, surrogate pair (2 units), quote
        assert_eq!(e.len(), 5 * 2);
        assert_eq!(&e[2..4], &[0xe9, 0x00]);
        assert_eq!(&e[4..8], &[0x3d, 0xd8, 0x00, 0xde]);
    }

    #[test]
    fn filters_are_escaped_and_limited_to_people() {
        assert_eq!(
            user_filter(&user_ref::Id::SamAccountName("a*)(x=1".into())),
            "(&(objectClass=user)(sAMAccountType=805306368)(sAMAccountName=a\\2a\\29\\28x=1))"
        );
        assert_eq!(
            user_filter(&user_ref::Id::UserPrincipalName("o\\brien@corp".into())),
            "(&(objectClass=user)(sAMAccountType=805306368)(userPrincipalName=o\\5cbrien@corp))"
        );
        assert!(user_filter(&user_ref::Id::ObjectGuid(
            "d2a1b399-db17-4a4c-9c27-0123456789ab".into()
        ))
        .ends_with(
            "(objectGUID=\\99\\b3\\a1\\d2\\17\\db\\4c\\4a\\9c\\27\\01\\23\\45\\67\\89\\ab))"
        ));
        assert_eq!(user_filter(&user_ref::Id::ObjectGuid("*".into())), "");
    }

    #[test]
    fn ldaps_urls_only() {
        assert_eq!(host_port("ldaps://127.0.0.2").unwrap(), "127.0.0.2:636");
        assert_eq!(host_port("ldaps://dc1.corp:3269").unwrap(), "dc1.corp:3269");
        assert!(host_port("ldap://dc1").is_err());
        assert!(host_port("ldaps://").is_err());
    }

    #[test]
    fn maps_ad_answers() {
        let user = UserEntry {
            dn: "CN=u".into(),
            sam: "u".into(),
            ..Default::default()
        };
        let reset = Action::Reset(relay::proto::ResetPassword {
            new_password: "x".into(),
            ..Default::default()
        });
        let change = Action::Change(relay::proto::ChangePassword::default());
        let r = map_ldap_failure(19, "00000056: AtrErr: DSID-03190F80, #1:\n\t0: 00000056: DSID-03190F80, problem 1005 (CONSTRAINT_ATT_TYPE), data 0, Att 9005a (unicodePwd)", &user, &change, None, None);
        assert_eq!(r.outcome, Outcome::WrongOldPassword);
        let r = map_ldap_failure(
            50,
            "00002098: SecErr: DSID-03150F94, problem 4003 (INSUFF_ACCESS_RIGHTS), data 0",
            &user,
            &reset,
            None,
            None,
        );
        assert_eq!(r.outcome, Outcome::AccessDenied);
        assert!(r.detail.contains("Reset Password"), "{}", r.detail);
        let r = map_ldap_failure(19, "0000052D: Constraint violation - check_password_restrictions: the password is too short. It should be equal or longer than 7 characters!", &user, &reset, Some("x"), None);
        assert_eq!(
            (r.outcome, r.policy_violation),
            (Outcome::RejectedByPolicy, PolicyViolation::TooShort)
        );
        assert_eq!(
            map_ldap_failure(80, "other", &user, &reset, None, None).outcome,
            Outcome::Failed
        );
    }
}
