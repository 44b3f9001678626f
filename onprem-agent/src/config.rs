//! The agent's settings: one TOML file (`--config`, `AGENT_CONFIG`; the package installs
//! `/etc/onprem-agent/agent.toml`) plus environment variables and flags, which override the
//! file key by key. Checked when read: an unknown key, a missing one, a file that cannot be
//! read or a malformed domain is an error naming the key and where it can be set. Secrets are
//! only ever read from files named here, never given as values.
//!
//! ```toml
//! gateway_url = "https://writeback.example.com:7443"
//! gateway_ca = "/etc/onprem-agent/gateway-ca.pem"
//! agent_id = "corp-agent-1"
//! agent_secret_file = "/etc/onprem-agent/agent.secret"
//! forest = "corp.example.com"
//! ldap_urls = ["ldaps://dc1.corp.example.com", "ldaps://dc2.corp.example.com"]
//! ldap_ca = "/etc/onprem-agent/dc-ca.pem"
//! bind_dn = "svc-writeback@corp.example.com"
//! bind_password_file = "/etc/onprem-agent/bind.password"
//! base_dn = "DC=corp,DC=example,DC=com"
//! state_dir = "/var/lib/onprem-agent"
//! # Optional: the only users writeback may touch (the gateway's scope can narrow this, never
//! # widen it): under these OUs, or members (nested) of these groups.
//! scope_ous = ["OU=Staff,DC=corp,DC=example,DC=com"]
//! scope_groups = ["CN=Password Writeback Users,OU=Groups,DC=corp,DC=example,DC=com"]
//!
//! [[domain]]
//! dns_name = "emea.corp.example.com"
//! base_dn = "DC=emea,DC=corp,DC=example,DC=com"
//! ldap_urls = ["ldaps://dc1.emea.corp.example.com"]
//! upn_suffixes = ["emea.example.com"]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use relay::secret::Secret;

use crate::directory::DirectoryConfig;
use crate::domains::DomainConfig;
use crate::AgentConfig;

/// A setting that is wrong, named.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("{key} is not set: {hint}")]
    Missing { key: &'static str, hint: String },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    /// The settings decide where the agent sends passwords and which secrets it reads: a file
    /// others may read or its group may write is refused.
    #[error("{0}")]
    NotPrivate(std::io::Error),
}

/// The agent's settings as given. Flags and environment come through clap; the file fills
/// what they left unset ([`Settings::or_file`]).
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Gateway AgentLink address, https://host:port.
    #[arg(long, env = "AGENT_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// PEM CA that signed the gateway's certificate.
    #[arg(long, env = "AGENT_GATEWAY_CA")]
    pub gateway_ca: Option<PathBuf>,
    /// Name to verify in the gateway certificate when it differs from the URL host.
    #[arg(long, env = "AGENT_GATEWAY_TLS_NAME")]
    pub gateway_tls_name: Option<String>,
    #[arg(long, env = "AGENT_ID")]
    pub agent_id: Option<String>,
    /// File holding the agent secret printed by `cloud-gateway admin register-agent`.
    #[arg(long, env = "AGENT_SECRET_FILE")]
    pub agent_secret_file: Option<PathBuf>,
    /// Forest this agent serves (as registered at the gateway).
    #[arg(long, env = "AGENT_FOREST")]
    pub forest: Option<String>,
    /// Domain controllers, ldaps://host[:port]; tried in order.
    #[arg(long = "ldap-url", env = "AGENT_LDAP_URLS", value_delimiter = ',')]
    #[serde(default)]
    pub ldap_urls: Vec<String>,
    /// PEM CA that signed the domain controllers' certificates.
    #[arg(long, env = "AGENT_LDAP_CA")]
    pub ldap_ca: Option<PathBuf>,
    /// DN or UPN of the delegated service account (never a domain admin).
    #[arg(long, env = "AGENT_BIND_DN")]
    pub bind_dn: Option<String>,
    /// File holding the service account's password.
    #[arg(long, env = "AGENT_BIND_PASSWORD_FILE")]
    pub bind_password_file: Option<PathBuf>,
    /// Search base for users, e.g. DC=corp,DC=example,DC=com.
    #[arg(long, env = "AGENT_BASE_DN")]
    pub base_dn: Option<String>,
    /// Operations applied at once (default 8).
    #[arg(long, env = "AGENT_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<u32>,
    /// A further domain of the forest (repeatable):
    /// `DNS;base=DN;ldap=URL[|URL…][;upn=SUFFIX[|SUFFIX…]][;bind=DN_OR_UPN;password-file=PATH][;ca=PEM]`
    /// (in the file: a `[[domain]]` table). Bind account, password and CA default to the
    /// primary domain's.
    #[arg(long = "domain", env = "AGENT_DOMAINS", value_delimiter = '\n')]
    #[serde(skip)]
    pub domain_specs: Vec<String>,
    #[arg(skip)]
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainSettings>,
    /// Serve Prometheus metrics on this loopback address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Directory for the agent's journal and instance id (write-ahead: a restarted agent
    /// answers redelivered work from it and never applies an operation twice). Without it
    /// the journal is kept in memory only.
    #[arg(long, env = "AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Pooled LDAPS connections (default 4).
    #[arg(long, env = "AGENT_LDAP_POOL_SIZE")]
    pub ldap_pool_size: Option<usize>,
    /// Local writeback scope, the AD admin's last word: only users under this OU (DN;
    /// repeatable, one per line in the environment variable) or ...
    #[arg(long = "scope-ou", env = "AGENT_SCOPE_OUS", value_delimiter = '\n')]
    #[serde(default)]
    pub scope_ous: Vec<String>,
    /// ... members, directly or through nested groups, of this group (DN; repeatable). Unset
    /// (both): every user under the base DN. The gateway's scope can narrow this, never widen it.
    #[arg(
        long = "scope-group",
        env = "AGENT_SCOPE_GROUPS",
        value_delimiter = '\n'
    )]
    #[serde(default)]
    pub scope_groups: Vec<String>,
}

/// One further domain of the forest, as a `[[domain]]` table.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSettings {
    pub dns_name: String,
    pub base_dn: String,
    pub ldap_urls: Vec<String>,
    #[serde(default)]
    pub upn_suffixes: Vec<String>,
    pub bind_dn: Option<String>,
    pub bind_password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// Where a missing key may be given.
fn hint(key: &str, env: &str, file: Option<&Path>) -> String {
    let flag = match key {
        "ldap_urls" => "ldap-url".to_owned(),
        other => other.replace('_', "-"),
    };
    match file {
        Some(f) => format!("set `{key}` in {}, or {env}, or --{flag}", f.display()),
        None => format!("set {env} or --{flag}, or `{key}` in a --config file"),
    }
}

impl Settings {
    /// Reads a settings file.
    ///
    /// # Errors
    /// When it cannot be read, is not TOML, or has a key this agent does not know (the error
    /// names the key, the line and the column).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        relay::secret::check_private(path).map_err(ConfigError::NotPrivate)?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| {
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line} column {column}: ")
            });
            ConfigError::Parse {
                path: path.to_owned(),
                detail: format!("{at}{}", e.message()),
            }
        })
    }

    /// These settings, with every key they leave unset taken from `file`.
    #[must_use]
    pub fn or_file(self, file: Self) -> Self {
        let pick_vec = |a: Vec<String>, b: Vec<String>| if a.is_empty() { b } else { a };
        Self {
            gateway_url: self.gateway_url.or(file.gateway_url),
            gateway_ca: self.gateway_ca.or(file.gateway_ca),
            gateway_tls_name: self.gateway_tls_name.or(file.gateway_tls_name),
            agent_id: self.agent_id.or(file.agent_id),
            agent_secret_file: self.agent_secret_file.or(file.agent_secret_file),
            forest: self.forest.or(file.forest),
            ldap_urls: pick_vec(self.ldap_urls, file.ldap_urls),
            ldap_ca: self.ldap_ca.or(file.ldap_ca),
            bind_dn: self.bind_dn.or(file.bind_dn),
            bind_password_file: self.bind_password_file.or(file.bind_password_file),
            base_dn: self.base_dn.or(file.base_dn),
            max_in_flight: self.max_in_flight.or(file.max_in_flight),
            domain_specs: self.domain_specs,
            domains: if self.domains.is_empty() {
                file.domains
            } else {
                self.domains
            },
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            state_dir: self.state_dir.or(file.state_dir),
            ldap_pool_size: self.ldap_pool_size.or(file.ldap_pool_size),
            scope_ous: pick_vec(self.scope_ous, file.scope_ous),
            scope_groups: pick_vec(self.scope_groups, file.scope_groups),
        }
    }

    /// The agent's configuration: every required key present, secret files read, domains
    /// parsed. `file` is where the settings file was, for the messages.
    ///
    /// # Errors
    /// The first key that is missing or wrong, named.
    pub fn resolve(self, file: Option<&Path>) -> Result<AgentConfig, ConfigError> {
        macro_rules! required {
            ($field:ident, $env:literal) => {
                self.$field.clone().ok_or_else(|| ConfigError::Missing {
                    key: stringify!($field),
                    hint: hint(stringify!($field), $env, file),
                })?
            };
        }
        let secret = |key: &str, path: &Path| {
            Secret::from_file(path).map_err(|e| ConfigError::Invalid {
                key: key.to_owned(),
                problem: e.to_string(),
            })
        };
        if self.ldap_urls.is_empty() {
            return Err(ConfigError::Missing {
                key: "ldap_urls",
                hint: hint("ldap_urls", "AGENT_LDAP_URLS", file),
            });
        }
        // Optional: an enrolled agent authenticates by its certificate (`identity.rs`).
        let agent_secret = match &self.agent_secret_file {
            Some(path) => Some(secret("agent_secret_file", path)?),
            None => None,
        };
        let bind_password_file = required!(bind_password_file, "AGENT_BIND_PASSWORD_FILE");
        let directory = DirectoryConfig {
            urls: self.ldap_urls.clone(),
            ca_file: required!(ldap_ca, "AGENT_LDAP_CA"),
            bind_dn: required!(bind_dn, "AGENT_BIND_DN"),
            bind_password: secret("bind_password_file", &bind_password_file)?,
            base_dn: required!(base_dn, "AGENT_BASE_DN"),
            pool_size: self.ldap_pool_size.unwrap_or(4).max(1),
            connect_timeout: Duration::from_secs(5),
            use_dc_reason_text: true,
            scope: relay::scope::Scope::parse(
                &self.scope_ous,
                &self.scope_groups,
                "scope_ous",
                "scope_groups",
            )
            .map_err(|e| {
                let (key, problem) = e.split();
                invalid(key.to_owned(), problem)
            })?,
        };
        let mut extra_domains = Vec::new();
        for spec in self.domain_specs.iter().filter(|d| !d.trim().is_empty()) {
            extra_domains.push(parse_domain(spec, &directory)?);
        }
        for d in &self.domains {
            extra_domains.push(domain_from_table(d, &directory)?);
        }
        Ok(AgentConfig {
            gateway_url: required!(gateway_url, "AGENT_GATEWAY_URL"),
            gateway_ca: required!(gateway_ca, "AGENT_GATEWAY_CA"),
            gateway_tls_name: self.gateway_tls_name.clone(),
            agent_id: required!(agent_id, "AGENT_ID"),
            agent_secret,
            forest: required!(forest, "AGENT_FOREST"),
            extra_domains,
            max_in_flight: self.max_in_flight.unwrap_or(8).clamp(1, 256),
            directory,
            metrics_listen: self.metrics_listen,
            state_dir: self.state_dir.clone(),
        })
    }
}

fn invalid(key: String, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// A `[[domain]]` table; bind account, password and CA default to the primary domain's.
fn domain_from_table(
    d: &DomainSettings,
    primary: &DirectoryConfig,
) -> Result<DomainConfig, ConfigError> {
    let key = |k: &str| format!("domain {:?}: {k}", d.dns_name);
    if d.dns_name.trim().is_empty() {
        return Err(invalid("domain.dns_name".into(), "must not be empty"));
    }
    if d.base_dn.trim().is_empty() {
        return Err(invalid(key("base_dn"), "must not be empty"));
    }
    if d.ldap_urls.is_empty() {
        return Err(invalid(key("ldap_urls"), "needs at least one ldaps:// URL"));
    }
    let mut directory = primary.clone();
    directory.urls.clone_from(&d.ldap_urls);
    directory.base_dn.clone_from(&d.base_dn);
    if let Some(b) = &d.bind_dn {
        directory.bind_dn.clone_from(b);
    }
    if let Some(p) = &d.bind_password_file {
        directory.bind_password =
            Secret::from_file(p).map_err(|e| invalid(key("bind_password_file"), e.to_string()))?;
    }
    if let Some(ca) = &d.ca {
        directory.ca_file.clone_from(ca);
    }
    Ok(DomainConfig {
        dns_name: d.dns_name.trim().to_owned(),
        upn_suffixes: d.upn_suffixes.clone(),
        directory,
    })
}

/// Parses one `--domain` / `AGENT_DOMAINS` value:
/// `DNS;base=DN;ldap=URL[|URL…][;upn=SUFFIX[|SUFFIX…]][;bind=DN_OR_UPN;password-file=PATH][;ca=PEM]`.
///
/// # Errors
/// Naming the domain and the part that is wrong.
pub fn parse_domain(spec: &str, primary: &DirectoryConfig) -> Result<DomainConfig, ConfigError> {
    let mut parts = spec.split(';');
    let dns_name = parts.next().unwrap_or_default().trim().to_owned();
    if dns_name.is_empty() || dns_name.contains('=') {
        return Err(invalid(
            format!("--domain {spec:?}"),
            "must start with the domain's DNS name",
        ));
    }
    let key = || format!("--domain {dns_name}");
    let mut table = DomainSettings {
        dns_name: dns_name.clone(),
        ..DomainSettings::default()
    };
    for part in parts.filter(|p| !p.trim().is_empty()) {
        let (k, value) = part
            .split_once('=')
            .ok_or_else(|| invalid(key(), format!("{part:?} is not key=value")))?;
        let value = value.trim();
        let list = || value.split('|').map(str::to_owned).collect();
        match k.trim() {
            "base" => table.base_dn = value.to_owned(),
            "ldap" => table.ldap_urls = list(),
            "upn" => table.upn_suffixes = list(),
            "bind" => table.bind_dn = Some(value.to_owned()),
            "password-file" => table.bind_password_file = Some(value.into()),
            "ca" => table.ca = Some(value.into()),
            other => {
                return Err(invalid(
                    key(),
                    format!(
                        "unknown key {other:?} (expected base, ldap, upn, bind, password-file, ca)"
                    ),
                ))
            }
        }
    }
    if table.base_dn.is_empty() {
        return Err(invalid(key(), "base=DN is required"));
    }
    if table.ldap_urls.is_empty() {
        return Err(invalid(key(), "ldap=URL is required"));
    }
    domain_from_table(&table, primary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> DirectoryConfig {
        DirectoryConfig {
            urls: vec!["ldaps://dc1".into()],
            ca_file: "/ca.pem".into(),
            bind_dn: "svc@corp".into(),
            bind_password: Secret::new("pw"),
            base_dn: "DC=corp".into(),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            use_dc_reason_text: true,
            scope: relay::scope::Scope::default(),
        }
    }

    #[test]
    fn a_domain_spec_parses_and_inherits_the_primary_account() {
        let d = parse_domain(
            "emea.corp;base=DC=emea,DC=corp;ldap=ldaps://a|ldaps://b;upn=emea.example|x.example",
            &primary(),
        )
        .unwrap();
        assert_eq!(d.dns_name, "emea.corp");
        assert_eq!(d.directory.urls, ["ldaps://a", "ldaps://b"]);
        assert_eq!(d.upn_suffixes, ["emea.example", "x.example"]);
        assert_eq!(d.directory.base_dn, "DC=emea,DC=corp");
        assert_eq!(d.directory.bind_dn, "svc@corp", "inherited");
        let with_ca = parse_domain(
            "x;base=DC=x;ldap=ldaps://x;ca=/x.pem;bind=svc@x",
            &primary(),
        )
        .unwrap();
        assert_eq!(with_ca.directory.ca_file, PathBuf::from("/x.pem"));
        assert_eq!(with_ca.directory.bind_dn, "svc@x");
    }

    #[test]
    fn a_bad_domain_spec_names_what_is_wrong() {
        for (spec, says) in [
            ("base=DC=x", "must start with the domain's DNS name"),
            ("x;ldap=ldaps://x", "base=DN is required"),
            ("x;base=DC=x", "ldap=URL is required"),
            (
                "x;base=DC=x;ldap=ldaps://x;colour=blue",
                "unknown key \"colour\"",
            ),
            ("x;base", "is not key=value"),
        ] {
            let e = parse_domain(spec, &primary()).unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        relay::secret::write_private(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn a_settings_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, path) = file("ldap_urls = [\"ldaps://dc\"]\n");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Settings::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("644") && e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named_with_its_line() {
        let (_d, path) = file("gateway_url = \"https://g\"\ngatway_ca = \"/ca\"\n");
        let e = Settings::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("agent.toml"), "{e}");
        assert!(e.contains("gatway_ca"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn flags_and_environment_override_the_file_key_by_key() {
        let (dir, path) = file(
            r#"
gateway_url = "https://from-file:7443"
agent_id = "file-agent"
ldap_urls = ["ldaps://file-dc"]
max_in_flight = 3

[[domain]]
dns_name = "emea.corp"
base_dn = "DC=emea,DC=corp"
ldap_urls = ["ldaps://emea-dc"]
"#,
        );
        let secret = dir.path().join("s");
        relay::secret::write_private(&secret, "x").unwrap();
        let given = Settings {
            agent_id: Some("flag-agent".into()),
            gateway_ca: Some("/ca.pem".into()),
            agent_secret_file: Some(secret.clone()),
            forest: Some("corp".into()),
            ldap_ca: Some("/dc.pem".into()),
            bind_dn: Some("svc@corp".into()),
            bind_password_file: Some(secret),
            base_dn: Some("DC=corp".into()),
            ..Settings::default()
        };
        let config = given
            .or_file(Settings::from_file(&path).unwrap())
            .resolve(Some(&path))
            .unwrap();
        assert_eq!(config.agent_id, "flag-agent", "the flag wins");
        assert_eq!(
            config.gateway_url, "https://from-file:7443",
            "the file fills in"
        );
        assert_eq!(config.directory.urls, ["ldaps://file-dc"]);
        assert_eq!(config.max_in_flight, 3);
        assert_eq!(config.extra_domains.len(), 1);
        assert_eq!(config.extra_domains[0].directory.urls, ["ldaps://emea-dc"]);
    }

    #[test]
    fn a_missing_key_says_where_it_can_be_set() {
        let (_d, path) = file("ldap_urls = [\"ldaps://dc\"]\n");
        let e = Settings::default()
            .or_file(Settings::from_file(&path).unwrap())
            .resolve(Some(&path))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bind_password_file is not set"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("AGENT_BIND_PASSWORD_FILE"), "{e}");
        assert!(e.contains("--bind-password-file"), "{e}");
    }
}
