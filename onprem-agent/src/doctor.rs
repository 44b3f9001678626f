//! `onprem-agent doctor`: what an AD administrator runs after installing an agent. Checks,
//! and explains with the exact fix, everything that makes writeback look configured while it
//! fails: TLS to each DC, the service account's bind, each delegated right (read from the
//! DACLs, and from `allowedAttributesEffective` on sample users), inheritance disabled on
//! users, the minimum password age, protected accounts in scope, and the gateway's
//! reachability and clock.

pub mod sd;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ldap3::controls::RawControl;
use ldap3::{Ldap, Scope, SearchEntry};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use relay::proto::agent_link_client::AgentLinkClient;
use relay::proto::{agent_frame, gateway_frame, AgentFrame, Hello};

use crate::directory::{first_value, policy, Directory};
use crate::AgentConfig;
use relay::scope;
use sd::{Right, RIGHT_DS_CONTROL_ACCESS, RIGHT_DS_WRITE_PROP};

/// LDAP_SERVER_SD_FLAGS_OID with DACL_SECURITY_INFORMATION: lets a non-admin read the DACL.
const SD_FLAGS_OID: &str = "1.2.840.113556.1.4.801";
const SD_FLAGS_DACL: [u8; 5] = [0x30, 0x03, 0x02, 0x01, 0x04];
const USER_CLASS: &str = "bf967aba-0de6-11d0-a285-00aa003049e2";

const RESET_PASSWORD: Right = Right {
    name: "Reset Password",
    mask: RIGHT_DS_CONTROL_ACCESS,
    guid: "00299570-246d-11d0-a768-00aa006e0529",
};
const CHANGE_PASSWORD: Right = Right {
    name: "Change Password",
    mask: RIGHT_DS_CONTROL_ACCESS,
    guid: "ab721a53-1e2f-11d0-9819-00aa0040529b",
};
const WRITE_LOCKOUT_TIME: Right = Right {
    name: "Write lockoutTime",
    mask: RIGHT_DS_WRITE_PROP,
    guid: "28630ebf-41d5-11d1-a9c1-0000f80367c1",
};
const WRITE_PWD_LAST_SET: Right = Right {
    name: "Write pwdLastSet",
    mask: RIGHT_DS_WRITE_PROP,
    guid: "bf967a0a-0de6-11d0-a285-00aa003049e2",
};
const UNEXPIRE_PASSWORD: Right = Right {
    name: "Unexpire Password",
    mask: RIGHT_DS_CONTROL_ACCESS,
    guid: "ccc2dc7d-a6ad-4a7a-8846-c04e3cc53501",
};

/// Well-known SIDs every authenticated account has.
const EVERYONE: &str = "S-1-1-0";
const AUTHENTICATED_USERS: &str = "S-1-5-11";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub status: Status,
    /// Short stable name, e.g. `right.reset-password`.
    pub name: String,
    pub message: String,
    /// The exact fix, when something is wrong.
    pub fix: Option<String>,
}

/// Everything the doctor found.
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    fn push(
        &mut self,
        status: Status,
        name: impl Into<String>,
        message: impl Into<String>,
        fix: Option<String>,
    ) {
        self.checks.push(Check {
            status,
            name: name.into(),
            message: message.into(),
            fix,
        });
    }

    /// Whether writeback would fail.
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// The check called `name`, if it ran.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let tag = match c.status {
                Status::Ok => " OK ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(out, "[{tag}] {:<28} {}", c.name, c.message);
            if let Some(fix) = &c.fix {
                for line in fix.lines() {
                    let _ = writeln!(out, "       {:<28} fix: {line}", "");
                }
            }
        }
        let (fails, warns) = (
            self.checks
                .iter()
                .filter(|c| c.status == Status::Fail)
                .count(),
            self.checks
                .iter()
                .filter(|c| c.status == Status::Warn)
                .count(),
        );
        let _ = writeln!(
            out,
            "{}: {fails} failure(s), {warns} warning(s)",
            if fails > 0 {
                "writeback would fail"
            } else {
                "writeback is ready"
            }
        );
        out
    }
}

/// What the doctor looks at besides the agent's configuration.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// Users (sAMAccountName or DN) whose rights and inheritance to check; by default a few
    /// users found under the base DN.
    pub sample_users: Vec<String>,
    /// Skip the gateway checks (e.g. before the agent is registered).
    pub skip_gateway: bool,
}

/// Runs every check. The gateway is asked first (its Welcome carries the forest's writeback
/// scope, which the scope check combines with the local one) and listed last.
pub async fn run(config: &AgentConfig, options: &DoctorOptions) -> Report {
    let mut report = Report::default();
    let mut gateway = Report::default();
    let cloud = if options.skip_gateway {
        None
    } else {
        gateway_check(config, &mut gateway).await
    };
    let domains = config.all_domains();
    let several = domains.len() > 1;
    for domain in domains {
        let mut part = Report::default();
        check_domain(&domain.directory, options, cloud.as_ref(), &mut part).await;
        for mut c in part.checks {
            if several {
                c.name = format!("{}: {}", domain.dns_name, c.name);
            }
            report.checks.push(c);
        }
    }
    report.checks.extend(gateway.checks);
    report
}

/// The checks of one domain's DCs and directory.
async fn check_domain(
    config: &crate::directory::DirectoryConfig,
    options: &DoctorOptions,
    cloud: Option<&scope::Scope>,
    report: &mut Report,
) {
    let directory = match Directory::new(config.clone()) {
        Ok(d) => d,
        Err(e) => {
            report.push(
                Status::Fail,
                "config",
                e.to_string(),
                Some("fix the --ldap-url / --ldap-ca settings".into()),
            );
            return;
        }
    };
    let budget = Duration::from_secs(10);
    let mut bound: Option<(Ldap, String)> = None;
    for url in &directory.config().urls {
        match directory.open_tls(url, budget).await {
            Ok(mut ldap) => {
                report.push(
                    Status::Ok,
                    format!("tls {url}"),
                    "certificate verified with the configured CA",
                    None,
                );
                match directory.bind(&mut ldap, url, budget).await {
                    Ok(()) => {
                        report.push(Status::Ok, format!("bind {url}"), format!("bound as {}", directory.config().bind_dn), None);
                        if bound.is_none() {
                            bound = Some((ldap, url.clone()));
                        }
                    }
                    Err(e) => report.push(
                        Status::Fail,
                        format!("bind {url}"),
                        e.to_string(),
                        Some(format!(
                            "check --bind-dn ({}) and the password file; the account must be enabled, not locked out, and its password not expired",
                            directory.config().bind_dn
                        )),
                    ),
                }
            }
            Err(e) => {
                let text = e.to_string();
                let fix = if text.contains("certificate")
                    || text.contains("tls") && !text.contains("timed out")
                {
                    format!("the DC's certificate must chain to the CA in --ldap-ca ({}) and name the host in {url} (an IP address needs an IP SAN)", directory.config().ca_file.display())
                } else {
                    format!("make sure {url} is reachable from this host on its LDAPS port (636 by default) and LDAPS is enabled on the DC")
                };
                report.push(Status::Fail, format!("tls {url}"), text, Some(fix));
            }
        }
    }
    if let Some((mut ldap, url)) = bound {
        if let Err(e) = directory_checks(&mut ldap, &directory, options, report).await {
            report.push(Status::Fail, "directory", format!("{url}: {e}"), None);
        }
        if let Err(e) = scope_check(&mut ldap, config, cloud, report).await {
            report.push(Status::Fail, "scope", format!("{url}: {e}"), None);
        }
    }
}

/// The effective writeback scope (the gateway's, when it was reached, and the local one),
/// how many users under the base DN it covers, and every scope OU or group AD does not know.
async fn scope_check(
    ldap: &mut Ldap,
    config: &crate::directory::DirectoryConfig,
    cloud: Option<&scope::Scope>,
    report: &mut Report,
) -> Result<(), ldap3::LdapError> {
    let local = &config.scope;
    let scopes: Vec<(&scope::Scope, &str)> = [(Some(local), "local"), (cloud, "gateway")]
        .into_iter()
        .filter_map(|(s, whose)| s.map(|s| (s, whose)))
        .collect();
    for (s, whose) in &scopes {
        for dn in s.ous.iter().chain(&s.groups) {
            let ldap3::SearchResult(entries, res) = ldap
                .search(dn.as_str(), Scope::Base, "(objectClass=*)", vec!["1.1"])
                .await?;
            // 32: noSuchObject.
            if !matches!(res.rc, 0 | 32) {
                return Err(ldap3::LdapError::LdapResult { result: res });
            }
            if res.rc == 32 || entries.is_empty() {
                report.push(
                    Status::Warn,
                    format!("scope {whose}"),
                    format!("{dn} (in the {whose} scope) does not exist in AD: it covers nobody"),
                    Some(if *whose == "local" {
                        "correct scope_ous / scope_groups in the agent's settings".to_owned()
                    } else {
                        "correct it with cloud-gateway admin set-forest --scope-ou / --scope-group"
                            .to_owned()
                    }),
                );
            }
        }
    }
    // Every user under the base DN, then which of them each scope holds.
    let all = paged_dns(ldap, &config.base_dn, &crate::directory::people_and("")).await?;
    let mut inside: Vec<&String> = all.iter().collect();
    for (s, _) in &scopes {
        if s.is_all() {
            continue;
        }
        let members: std::collections::HashSet<String> = if s.groups.is_empty() {
            Default::default()
        } else {
            let filter = crate::directory::people_and(&crate::directory::member_of_any(&s.groups));
            paged_dns(ldap, &config.base_dn, &filter)
                .await?
                .into_iter()
                .map(|d| d.to_lowercase())
                .collect()
        };
        inside.retain(|dn| {
            members.contains(&dn.to_lowercase())
                || relay::dn::Dn::parse(dn).is_ok_and(|d| s.has_ou_of(&d))
        });
    }
    let describe = |whose: &str, s: Option<&scope::Scope>| match s {
        Some(s) => format!("{whose}: {}", s.describe()),
        None => format!("{whose}: not known (the gateway was not asked)"),
    };
    let message = format!(
        "{}; {}; {} of {} users under {} are in scope",
        describe("gateway", cloud),
        describe("local", Some(local)),
        inside.len(),
        all.len(),
        config.base_dn
    );
    if inside.is_empty() && !all.is_empty() {
        report.push(
            Status::Warn,
            "scope",
            message,
            Some("no user is in both scopes: every operation will be answered OUT_OF_SCOPE; widen the local scope (scope_ous / scope_groups) or the gateway's (admin set-forest --scope-ou / --scope-group / --scope-all)".into()),
        );
    } else {
        report.push(Status::Ok, "scope", message, None);
    }
    Ok(())
}

/// The DNs of every entry under `base` matching `filter`, page by page (AD returns at most
/// 1000 per search).
async fn paged_dns(
    ldap: &mut Ldap,
    base: &str,
    filter: &str,
) -> Result<Vec<String>, ldap3::LdapError> {
    let adapters: Vec<Box<dyn ldap3::adapters::Adapter<'_, &str, Vec<&str>>>> = vec![
        Box::new(ldap3::adapters::EntriesOnly::new()),
        Box::new(ldap3::adapters::PagedResults::new(500)),
    ];
    let mut stream = ldap
        .streaming_search_with(adapters, base, Scope::Subtree, filter, vec!["1.1"])
        .await?;
    let mut out = Vec::new();
    while let Some(entry) = stream.next().await? {
        out.push(SearchEntry::construct(entry).dn);
    }
    stream.finish().await.success()?;
    Ok(out)
}

async fn search_one(
    ldap: &mut Ldap,
    base: &str,
    filter: &str,
    attrs: Vec<&str>,
) -> Result<Option<SearchEntry>, ldap3::LdapError> {
    let (entries, _) = ldap
        .search(base, Scope::Base, filter, attrs)
        .await?
        .success()?;
    Ok(entries.into_iter().next().map(SearchEntry::construct))
}

async fn dacl(
    ldap: &mut Ldap,
    dn: &str,
) -> Result<Option<sd::SecurityDescriptor>, ldap3::LdapError> {
    let control = RawControl {
        ctype: SD_FLAGS_OID.into(),
        crit: true,
        val: Some(SD_FLAGS_DACL.to_vec()),
    };
    let (entries, _) = ldap
        .with_controls(control)
        .search(
            dn,
            Scope::Base,
            "(objectClass=*)",
            vec!["nTSecurityDescriptor"],
        )
        .await?
        .success()?;
    Ok(entries
        .into_iter()
        .next()
        .map(SearchEntry::construct)
        .and_then(|e| {
            e.bin_attrs
                .get("nTSecurityDescriptor")
                .and_then(|v| v.first())
                .cloned()
        })
        .and_then(|raw| sd::parse(&raw).ok()))
}

fn dsacls_fix(right: Right, base: &str, account: &str, on_root: bool) -> String {
    let (perm, what) = if right.mask == RIGHT_DS_CONTROL_ACCESS {
        ("CA", right.name.to_owned())
    } else {
        ("WP", right.name.trim_start_matches("Write ").to_owned())
    };
    let ace = if on_root {
        format!("(OA;;CR;{};;<SID of {account}>)", right.guid)
    } else {
        format!(
            "(OA;CIIO;{};{};{USER_CLASS};<SID of {account}>)",
            if perm == "CA" { "CR" } else { "RPWP" },
            right.guid
        )
    };
    if on_root {
        format!("dsacls \"{base}\" /G \"{account}:{perm};{what}\"\nor: samba-tool dsacl set --objectdn=\"{base}\" --sddl=\"{ace}\"")
    } else {
        format!("dsacls \"{base}\" /I:S /G \"{account}:{perm};{what};user\"\nor: samba-tool dsacl set --objectdn=\"{base}\" --sddl=\"{ace}\"")
    }
}

async fn directory_checks(
    ldap: &mut Ldap,
    directory: &Directory,
    options: &DoctorOptions,
    report: &mut Report,
) -> Result<(), ldap3::LdapError> {
    let cfg = directory.config();
    let root_dse = search_one(ldap, "", "(objectClass=*)", vec!["defaultNamingContext"]).await?;
    let domain_root = root_dse
        .map(|e| first_value(&e, "defaultNamingContext"))
        .unwrap_or_default();
    let base = cfg.base_dn.clone();

    // Who the service account is, and whether it is too powerful.
    let account_filter = if cfg.bind_dn.contains('@') {
        format!(
            "(userPrincipalName={})",
            ldap3::ldap_escape(cfg.bind_dn.as_str())
        )
    } else {
        format!(
            "(distinguishedName={})",
            ldap3::ldap_escape(cfg.bind_dn.as_str())
        )
    };
    let (entries, _) = ldap
        .search(
            &domain_root,
            Scope::Subtree,
            &format!("(&(objectClass=user){account_filter})"),
            vec!["sAMAccountName", "adminCount", "objectSid"],
        )
        .await?
        .success()?;
    let Some(me) = entries
        .into_iter()
        .filter(|e| !e.is_ref())
        .map(SearchEntry::construct)
        .next()
    else {
        report.push(
            Status::Fail,
            "service-account",
            format!("{} not found under {domain_root}", cfg.bind_dn),
            None,
        );
        return Ok(());
    };
    let account = first_value(&me, "sAMAccountName");
    let mut trustees = vec![EVERYONE.to_owned(), AUTHENTICATED_USERS.to_owned()];
    if let Some(sid) = me.bin_attrs.get("objectSid").and_then(|v| v.first()) {
        trustees.extend(sd::sid_to_string(sid).ok());
    }
    if let Some(groups) = search_one(ldap, &me.dn, "(objectClass=*)", vec!["tokenGroups"])
        .await?
        .and_then(|e| e.bin_attrs.get("tokenGroups").cloned())
    {
        trustees.extend(groups.iter().filter_map(|g| sd::sid_to_string(g).ok()));
    }
    let admin_group = trustees
        .iter()
        .find(|s| s.ends_with("-512") || s.ends_with("-519") || s.as_str() == "S-1-5-32-544");
    if first_value(&me, "adminCount") == "1" || admin_group.is_some() {
        report.push(
            Status::Fail,
            "service-account",
            format!("{account} is an administrator (adminCount=1 or member of an admin group); the agent must run with only the delegated writeback rights"),
            Some(format!("create a dedicated account with only the rights below, and remove {account} from Domain Admins / Enterprise Admins / Administrators")),
        );
    } else {
        report.push(
            Status::Ok,
            "service-account",
            format!("{account} is not an administrator"),
            None,
        );
    }

    // The delegation on the base DN (inherited by user objects) and on the domain root.
    match dacl(ldap, &base).await? {
        None => report.push(
            Status::Fail,
            "rights",
            format!("cannot read the permissions of {base} as {account}"),
            Some(format!(
                "grant {account} Read Permissions on {base}, or check --base-dn"
            )),
        ),
        Some(sd) => {
            for right in [
                RESET_PASSWORD,
                CHANGE_PASSWORD,
                WRITE_LOCKOUT_TIME,
                WRITE_PWD_LAST_SET,
            ] {
                let name = format!(
                    "right.{}",
                    right.name.to_ascii_lowercase().replace(' ', "-")
                );
                if sd::grants(&sd, &trustees, right, true, USER_CLASS) {
                    report.push(
                        Status::Ok,
                        name,
                        format!(
                            "{} granted to {account} on descendant User objects of {base}",
                            right.name
                        ),
                        None,
                    );
                } else {
                    report.push(
                        Status::Fail,
                        name,
                        format!(
                            "{} is not granted to {account} on descendant User objects of {base}",
                            right.name
                        ),
                        Some(dsacls_fix(right, &base, &account, false)),
                    );
                }
            }
        }
    }
    match dacl(ldap, &domain_root).await? {
        Some(sd) if sd::grants(&sd, &trustees, UNEXPIRE_PASSWORD, false, USER_CLASS) => {
            report.push(Status::Ok, "right.unexpire-password", format!("Unexpire Password granted to {account} on {domain_root}"), None);
        }
        _ => report.push(
            Status::Fail,
            "right.unexpire-password",
            format!("Unexpire Password is not granted to {account} on the domain root {domain_root} (needed to clear a forced change)"),
            Some(dsacls_fix(UNEXPIRE_PASSWORD, &domain_root, &account, true)),
        ),
    }

    // Sample users: inheritance, effective attribute rights, protection.
    let samples = sample_users(ldap, &base, &options.sample_users, &me.dn).await?;
    if samples.is_empty() {
        report.push(
            Status::Warn,
            "users",
            format!("no user found under {base} to check"),
            None,
        );
    }
    for dn in samples {
        let name = format!("user {dn}");
        let entry = search_one(
            ldap,
            &dn,
            "(objectClass=*)",
            vec!["allowedAttributesEffective", "adminCount"],
        )
        .await?;
        let effective: Vec<String> = entry
            .as_ref()
            .and_then(|e| e.attrs.get("allowedAttributesEffective").cloned())
            .unwrap_or_default();
        let protected_account = entry
            .as_ref()
            .is_some_and(|e| first_value(e, "adminCount") == "1");
        let missing: Vec<&str> = ["lockoutTime", "pwdLastSet"]
            .into_iter()
            .filter(|a| !effective.iter().any(|e| e.eq_ignore_ascii_case(a)))
            .collect();
        let user_sd = dacl(ldap, &dn).await?;
        let inheritance_off = user_sd
            .as_ref()
            .is_some_and(sd::SecurityDescriptor::dacl_protected);
        let rights_missing: Vec<&str> = match &user_sd {
            Some(sd) => [RESET_PASSWORD, CHANGE_PASSWORD]
                .into_iter()
                .filter(|r| !sd::grants(sd, &trustees, *r, false, USER_CLASS))
                .map(|r| r.name)
                .collect(),
            None => vec!["(permissions unreadable)"],
        };
        if inheritance_off {
            report.push(
                Status::Fail,
                name,
                format!(
                    "inheritance is disabled on this user{}: the delegation on {base} does not reach it{}",
                    if protected_account { " (a protected account: AdminSDHolder)" } else { "" },
                    if missing.is_empty() && rights_missing.is_empty() { "" } else { "; missing: " }
                ) + &missing.iter().chain(rights_missing.iter()).copied().collect::<Vec<_>>().join(", "),
                Some(if protected_account {
                    "protected accounts are refused by the relay anyway; if writeback must reach them, delegate the same rights on CN=AdminSDHolder,CN=System and allow protected accounts for the forest".to_owned()
                } else {
                    format!("enable inheritance on {dn} (Active Directory Users and Computers > Properties > Security > Advanced > Enable inheritance)")
                }),
            );
        } else if !missing.is_empty() || !rights_missing.is_empty() {
            let all: Vec<&str> = rights_missing
                .iter()
                .chain(missing.iter())
                .copied()
                .collect();
            report.push(
                Status::Fail,
                name,
                format!("{account} lacks {} on this user", all.join(", ")),
                Some(format!(
                    "check for deny entries on {dn} or its OU, and the delegation on {base}"
                )),
            );
        } else {
            report.push(
                Status::Ok,
                name,
                "inherits the delegation; lockoutTime and pwdLastSet writable",
                None,
            );
        }
    }

    // Policy: a minimum age refuses changes within it.
    let domain_policy =
        policy::read_domain_policy(ldap, &domain_root, Duration::from_secs(10)).await?;
    if domain_policy.min_age_secs > 0 {
        let days = domain_policy.min_age_secs as f64 / 86_400.0;
        report.push(
            Status::Warn,
            "policy.min-age",
            format!("minimum password age is {days} day(s): a user who changed their password less than that ago is refused (MIN_AGE) until it passes"),
            Some("set Minimum password age to 0 (Default Domain Policy > Computer Configuration > Policies > Windows Settings > Security Settings > Account Policies), as Microsoft recommends for writeback\nor: samba-tool domain passwordsettings set --min-pwd-age=0".into()),
        );
    } else {
        report.push(
            Status::Ok,
            "policy.min-age",
            "minimum password age is 0",
            None,
        );
    }

    // Protected accounts in scope.
    let (entries, _) = ldap
        .search(
            &base,
            Scope::Subtree,
            "(&(objectClass=user)(adminCount=1))",
            vec!["sAMAccountName"],
        )
        .await?
        .success()?;
    let protected: Vec<String> = entries
        .into_iter()
        .filter(|e| !e.is_ref())
        .map(SearchEntry::construct)
        .map(|e| first_value(&e, "sAMAccountName"))
        .collect();
    if protected.is_empty() {
        report.push(
            Status::Ok,
            "protected-accounts",
            format!("no protected account (adminCount=1) under {base}"),
            None,
        );
    } else {
        let shown: Vec<&str> = protected.iter().take(5).map(String::as_str).collect();
        report.push(
            Status::Warn,
            "protected-accounts",
            format!("{} protected account(s) under {base} ({}{}) will be refused with PROTECTED_ACCOUNT", protected.len(), shown.join(", "), if protected.len() > 5 { ", …" } else { "" }),
            Some("this is intended; narrow --base-dn to the OUs of ordinary users to keep them out of scope".into()),
        );
    }
    Ok(())
}

async fn sample_users(
    ldap: &mut Ldap,
    base: &str,
    named: &[String],
    service_dn: &str,
) -> Result<Vec<String>, ldap3::LdapError> {
    if !named.is_empty() {
        let mut out = Vec::new();
        for n in named {
            if n.contains('=') {
                out.push(n.clone());
                continue;
            }
            let filter = format!(
                "(&(objectClass=user)(sAMAccountName={}))",
                ldap3::ldap_escape(n.as_str())
            );
            let (entries, _) = ldap
                .search(base, Scope::Subtree, &filter, vec!["dn"])
                .await?
                .success()?;
            out.extend(
                entries
                    .into_iter()
                    .filter(|e| !e.is_ref())
                    .map(|e| SearchEntry::construct(e).dn),
            );
        }
        return Ok(out);
    }
    let result = ldap
        .with_search_options(ldap3::SearchOptions::new().sizelimit(20))
        .search(base, Scope::Subtree, "(&(objectCategory=person)(objectClass=user)(!(adminCount=1))(!(isCriticalSystemObject=TRUE)))", vec!["dn"])
        .await?;
    // 4 = size limit exceeded: the first 20 are enough.
    if !matches!(result.1.rc, 0 | 4 | 10) {
        return Err(ldap3::LdapError::LdapResult { result: result.1 });
    }
    Ok(result
        .0
        .into_iter()
        .filter(|e| !e.is_ref())
        .map(|e| SearchEntry::construct(e).dn)
        .filter(|dn| !dn.eq_ignore_ascii_case(service_dn))
        .take(5)
        .collect())
}

/// The gateway's reachability and clock; returns the forest's writeback scope from the
/// Welcome (`None` when the gateway could not be asked or its scope does not parse).
async fn gateway_check(config: &AgentConfig, report: &mut Report) -> Option<scope::Scope> {
    let url = &config.gateway_url;
    let outcome = async {
        let credential = crate::identity::credential(config).map_err(|e| e.to_string())?;
        let tls = crate::identity::tls(config, &credential).map_err(|e| e.to_string())?;
        let channel = Endpoint::from_shared(url.clone())
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| {
                format!(
                    "cannot connect: {e} ({:?})",
                    std::error::Error::source(&e).map(ToString::to_string)
                )
            })?;
        let (tx, rx) = mpsc::channel(1);
        tx.send(AgentFrame {
            frame: Some(agent_frame::Frame::Hello(Hello {
                agent_id: config.agent_id.clone(),
                forest: config.forest.clone(),
                version: relay::VERSION.into(),
                instance_id: format!("doctor-{}", uuid::Uuid::new_v4()),
                probe: true,
                ..Default::default()
            })),
        })
        .await
        .map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        crate::identity::authorize(&mut request, config, &credential)?;
        let sent = Instant::now();
        let sent_unix = relay::now_unix_ms();
        let mut stream = AgentLinkClient::new(channel)
            .connect(request)
            .await
            .map_err(|s| {
                format!(
                    "gateway refused the agent ({:?}): {}",
                    s.code(),
                    s.message()
                )
            })?
            .into_inner();
        let welcome = match stream.message().await {
            Ok(Some(relay::proto::GatewayFrame {
                frame: Some(gateway_frame::Frame::Welcome(w)),
            })) => w,
            Ok(_) => return Err("the gateway did not welcome the probe".to_owned()),
            Err(s) => {
                return Err(format!(
                    "gateway refused the agent ({:?}): {}",
                    s.code(),
                    s.message()
                ))
            }
        };
        let rtt = sent.elapsed();
        // Our clock at the round trip's midpoint, when the gateway most likely stamped it.
        let midpoint = sent_unix + rtt.as_millis() as i64 / 2;
        Ok((welcome, rtt, midpoint))
    }
    .await;
    match outcome {
        Ok((welcome, rtt, midpoint)) => {
            let cloud = match scope::Scope::from_proto(welcome.scope.as_ref()) {
                Ok(s) => Some(s),
                Err(e) => {
                    report.push(
                        Status::Fail,
                        "scope gateway",
                        format!("the gateway's writeback scope is not usable: {e}"),
                        Some("set it again with cloud-gateway admin set-forest".into()),
                    );
                    None
                }
            };
            report.push(Status::Ok, "gateway", format!("{url} reachable; agent accepted by replica {} for forest {} ({} ms round trip)", welcome.replica, welcome.forest, rtt.as_millis()), None);
            let skew_ms = welcome.gateway_time_unix_ms - midpoint;
            let abs = skew_ms.unsigned_abs();
            let (status, fix) = if abs > 300_000 {
                (
                    Status::Fail,
                    Some(
                        "synchronise this host's clock (NTP / w32time) with a reliable source"
                            .to_owned(),
                    ),
                )
            } else if abs > 5_000 {
                (
                    Status::Warn,
                    Some("synchronise this host's clock (NTP / w32time)".to_owned()),
                )
            } else {
                (Status::Ok, None)
            };
            report.push(
                status,
                "clock",
                format!("clock differs from the gateway's by {skew_ms} ms"),
                fix,
            );
            cloud
        }
        Err(e) => {
            let fix = if e.contains("refused the agent") {
                "re-register the agent (cloud-gateway admin register-agent) and update --agent-secret-file, or check --agent-id / --forest".to_owned()
            } else {
                format!(
                    "allow outbound HTTPS from this host to {url}; the agent needs no inbound port"
                )
            };
            report.push(Status::Fail, "gateway", e, Some(fix));
            None
        }
    }
}
