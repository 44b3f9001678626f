//! `relayctl`: operator and admin client of the Writeback API: submit a reset, change or
//! unlock, and print an operation's timeline.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use relay::proto::writeback_client::WritebackClient;
use relay::proto::{
    submit_request::Action, ChangePassword, ClearForcedChange, GetOperationRequest,
    GetPasswordPolicyRequest, Initiator, ListAgentsRequest, ListOperationsRequest, Operation,
    Outcome, PolicyViolation, ResetPassword, SubmitRequest, UnlockAccount, UserRef,
};
use relay::secret::Secret;

#[derive(Parser)]
#[command(name = "relayctl", version, about = "Writeback relay operator client")]
struct Cli {
    /// Gateway address, host:port.
    #[arg(long, env = "WRITEBACK_ADDR", global = true)]
    addr: Option<String>,
    /// PEM CA that signed the gateway's certificate.
    #[arg(long, env = "WRITEBACK_CA", global = true)]
    ca: Option<PathBuf>,
    /// File holding the tenant bearer token (or set WRITEBACK_TOKEN).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[arg(long, env = "WRITEBACK_TENANT", global = true)]
    tenant: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit an operation and wait for its outcome; then print its timeline.
    Submit {
        #[arg(long, env = "WRITEBACK_FOREST")]
        forest: String,
        /// sAMAccountName, userPrincipalName (has '@') or objectGUID (8-4-4-4-12).
        #[arg(long)]
        user: String,
        #[arg(long, group = "kind")]
        reset: bool,
        #[arg(long, group = "kind")]
        change: bool,
        #[arg(long, group = "kind")]
        unlock: bool,
        /// Clear "must change password at next logon" (pwdLastSet = -1).
        #[arg(long, group = "kind")]
        clear_forced_change: bool,
        /// With --reset: the user must change the password at next logon.
        #[arg(long)]
        must_change: bool,
        /// With --reset: also clear a lockout.
        #[arg(long)]
        also_unlock: bool,
        /// Read passwords from stdin: the new one (reset), or old then new on two lines (change).
        #[arg(long, alias = "new-password-stdin")]
        password_stdin: bool,
        /// Idempotency key (default: the gateway assigns one).
        #[arg(long, default_value = "")]
        operation_id: String,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u32,
        /// Submit as an administrator rather than the end user.
        #[arg(long)]
        admin: bool,
    },
    /// Print one operation's state and timeline.
    Op { operation_id: String },
    /// List one user's operations, newest first.
    Ops {
        #[arg(long, env = "WRITEBACK_FOREST")]
        forest: String,
        /// sAMAccountName, userPrincipalName or objectGUID, as the caller named the user.
        #[arg(long)]
        user: String,
        /// How far back: e.g. 30m, 1h, 2d (default 24h).
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// List agents per forest with version, replica, heartbeat, in-flight and forest health.
    Agents {
        /// Only this forest.
        #[arg(long, default_value = "")]
        forest: String,
    },
    /// Print AD's effective password policy for a forest, or for one user.
    Policy {
        #[arg(long, env = "WRITEBACK_FOREST")]
        forest: String,
        #[arg(long)]
        user: Option<String>,
    },
}

fn read_stdin_lines(n: usize) -> anyhow::Result<Vec<Secret>> {
    let stdin = std::io::stdin();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading password from stdin")?;
        let s = Secret::new(line.trim_end_matches(['\n', '\r']));
        zeroize::Zeroize::zeroize(&mut line);
        if s.expose().is_empty() {
            bail!("stdin line {} (password) is empty", i + 1);
        }
        out.push(s);
    }
    Ok(out)
}

async fn channel(addr: &str, ca: &std::path::Path) -> anyhow::Result<Channel> {
    relay::tls::install_crypto_provider();
    let pem = relay::tls::read_pem(ca)?;
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(host.trim_matches(['[', ']']).to_owned());
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// `30s`, `15m`, `1h`, `2d`.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("--since {s:?}: expected e.g. 30m, 1h, 2d"))?;
    let secs = match unit {
        "s" => n,
        "m" | "" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => bail!("--since {s:?}: unknown unit {other:?} (s, m, h, d)"),
    };
    Ok(Duration::from_secs(secs))
}

fn with_auth<T>(msg: T, token: &Secret) -> anyhow::Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.expose())
            .parse()
            .context("token is not valid header text")?,
    );
    Ok(req)
}

fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ms.rem_euclid(1000))
}

fn print_operation(op: &Operation) {
    let outcome = Outcome::try_from(op.outcome).unwrap_or_default();
    let violation = PolicyViolation::try_from(op.policy_violation).unwrap_or_default();
    println!(
        "operation {}  tenant {}  forest {}  kind {}",
        op.operation_id, op.tenant_id, op.forest, op.kind
    );
    println!(
        "state {:?}  outcome {}{}  trace {}",
        relay::proto::OperationState::try_from(op.state).unwrap_or_default(),
        outcome.as_str_name(),
        if violation == PolicyViolation::Unspecified {
            String::new()
        } else {
            format!("/{}", violation.as_str_name())
        },
        op.trace_id
    );
    if !op.message.is_empty() {
        println!("message: {}", op.message);
    }
    println!(
        "timeline (accepted {}; deadline +{} ms):",
        fmt_time(op.accepted_unix_ms),
        op.deadline_unix_ms - op.accepted_unix_ms
    );
    print!("{}", waterfall(op));
}

/// One line per stage: offset from acceptance, the time since the previous stage, a bar
/// showing where in the operation it happened, who recorded it, and the detail.
fn waterfall(op: &Operation) -> String {
    const WIDTH: i64 = 24;
    let start = op.accepted_unix_ms;
    let total = op
        .timeline
        .iter()
        .map(|e| e.at_unix_ms - start)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out = String::new();
    let mut previous = start;
    for ev in &op.timeline {
        let offset = (ev.at_unix_ms - start).max(0);
        let from = ((previous - start).max(0) * WIDTH / total).min(WIDTH);
        let to = (offset * WIDTH / total).min(WIDTH);
        let bar = format!(
            "{}{}{}",
            " ".repeat(from as usize),
            "─".repeat((to - from) as usize),
            "●"
        );
        let who = match (ev.replica.is_empty(), ev.agent_id.is_empty()) {
            (false, false) => format!("{} -> {}", ev.replica, ev.agent_id),
            (false, true) => ev.replica.clone(),
            (true, false) => ev.agent_id.clone(),
            (true, true) => String::new(),
        };
        out.push_str(&format!(
            "  +{:>6} ms (+{:>5}) {:<w$} {:<14} {:<22} {}\n",
            offset,
            ev.at_unix_ms - previous,
            bar,
            ev.stage,
            who,
            ev.detail,
            w = WIDTH as usize + 1
        ));
        previous = ev.at_unix_ms;
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let addr = cli.addr.context("--addr (WRITEBACK_ADDR) is required")?;
    let ca = cli.ca.context("--ca (WRITEBACK_CA) is required")?;
    let tenant = cli
        .tenant
        .context("--tenant (WRITEBACK_TENANT) is required")?;
    let token = match (&cli.token_file, std::env::var("WRITEBACK_TOKEN")) {
        (Some(f), _) => Secret::from_file(f)?,
        (None, Ok(t)) if !t.is_empty() => Secret::new(t),
        _ => bail!("a token is required: --token-file FILE or WRITEBACK_TOKEN"),
    };
    let mut client = WritebackClient::new(channel(&addr, &ca).await?);
    match cli.command {
        Command::Submit {
            forest,
            user,
            reset,
            change,
            unlock,
            clear_forced_change,
            must_change,
            also_unlock,
            password_stdin,
            operation_id,
            timeout_ms,
            admin,
        } => {
            let action = if reset {
                if !password_stdin {
                    bail!("--reset needs --password-stdin (passwords are never taken from the command line)");
                }
                let p = read_stdin_lines(1)?;
                Action::Reset(ResetPassword {
                    new_password: p[0].expose().to_owned(),
                    must_change_at_next_logon: must_change,
                    unlock: also_unlock,
                })
            } else if change {
                if !password_stdin {
                    bail!("--change needs --password-stdin (old then new password, one per line)");
                }
                let p = read_stdin_lines(2)?;
                Action::Change(ChangePassword {
                    old_password: p[0].expose().to_owned(),
                    new_password: p[1].expose().to_owned(),
                })
            } else if unlock {
                Action::Unlock(UnlockAccount {})
            } else if clear_forced_change {
                Action::ClearForcedChange(ClearForcedChange {})
            } else {
                bail!("one of --reset, --change, --unlock or --clear-forced-change is required");
            };
            let mut request = SubmitRequest {
                tenant_id: tenant.clone(),
                operation_id,
                user: Some(UserRef::from_text(forest, &user)),
                initiator: if admin {
                    Initiator::Admin
                } else {
                    Initiator::EndUser
                } as i32,
                timeout_ms,
                action: Some(action),
            };
            let started = std::time::Instant::now();
            let result = client.submit(with_auth(request.clone(), &token)?).await;
            if let Some(a) = request.action.as_mut() {
                zeroize::Zeroize::zeroize(a);
            }
            let resp = result
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let outcome = Outcome::try_from(resp.outcome).unwrap_or_default();
            let violation = PolicyViolation::try_from(resp.policy_violation).unwrap_or_default();
            println!("outcome:      {}", outcome.as_str_name());
            if violation != PolicyViolation::Unspecified {
                println!("policy:       {}", violation.as_str_name());
            }
            println!("message:      {}", resp.message);
            println!("operation_id: {}", resp.operation_id);
            println!("trace_id:     {}", resp.trace_id);
            println!("took:         {} ms", started.elapsed().as_millis());
            if outcome != Outcome::AgentUnavailable {
                let op = client
                    .get_operation(with_auth(
                        GetOperationRequest {
                            tenant_id: tenant,
                            operation_id: resp.operation_id.clone(),
                        },
                        &token,
                    )?)
                    .await
                    .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                println!();
                print_operation(&op);
            }
            if outcome != Outcome::Applied {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Policy { forest, user } => {
            let req = GetPasswordPolicyRequest {
                tenant_id: tenant,
                user: user
                    .as_deref()
                    .map(|u| UserRef::from_text(forest.clone(), u)),
                forest,
            };
            let p = client
                .get_password_policy(with_auth(req, &token)?)
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            println!("forest:           {}", p.forest);
            println!("source:           {}", p.source);
            println!("minimum length:   {}", p.min_length);
            println!(
                "complexity:       {}",
                if p.complexity { "on" } else { "off" }
            );
            println!("history:          {} passwords", p.history_length);
            println!("minimum age:      {} s", p.min_age_seconds);
            println!("maximum age:      {} s", p.max_age_seconds);
            if p.next_change_allowed_unix_ms > 0 {
                println!(
                    "next change from: {}",
                    fmt_time(p.next_change_allowed_unix_ms)
                );
            }
            Ok(())
        }
        Command::Ops {
            forest,
            user,
            since,
            limit,
        } => {
            let window = parse_duration(&since)?;
            let req = ListOperationsRequest {
                tenant_id: tenant,
                user: Some(UserRef::from_text(forest, &user)),
                since_unix_ms: relay::now_unix_ms() - window.as_millis() as i64,
                limit,
            };
            let ops = client
                .list_operations(with_auth(req, &token)?)
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner()
                .operations;
            if ops.is_empty() {
                println!("no operations for {user} in the last {since}");
            }
            for op in ops {
                let outcome = Outcome::try_from(op.outcome).unwrap_or_default();
                let violation = PolicyViolation::try_from(op.policy_violation).unwrap_or_default();
                println!(
                    "{}  {:<8} {:<26} {}  trace {}",
                    fmt_time(op.accepted_unix_ms),
                    op.kind,
                    if violation == PolicyViolation::Unspecified {
                        outcome.as_str_name().to_owned()
                    } else {
                        format!("{}/{}", outcome.as_str_name(), violation.as_str_name())
                    },
                    op.operation_id,
                    op.trace_id
                );
            }
            Ok(())
        }
        Command::Agents { forest } => {
            let resp = client
                .list_agents(with_auth(
                    ListAgentsRequest {
                        tenant_id: tenant,
                        forest,
                    },
                    &token,
                )?)
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            let now = relay::now_unix_ms();
            for f in resp.forests {
                println!(
                    "forest {}  {}  {}",
                    f.forest,
                    if f.healthy { "HEALTHY" } else { "UNHEALTHY" },
                    f.reason
                );
                for a in f.agents {
                    println!(
                        "  {:<16} v{:<8} via {:<12} heartbeat {:>5} ms ago  in flight {}/{}  {}  instance {}",
                        a.agent_id,
                        a.version,
                        a.replica,
                        now - a.last_heartbeat_unix_ms,
                        a.in_flight,
                        a.max_in_flight,
                        if a.live { "live" } else { "SILENT" },
                        a.instance_id
                    );
                }
            }
            Ok(())
        }
        Command::Op { operation_id } => {
            let op = client
                .get_operation(with_auth(
                    GetOperationRequest {
                        tenant_id: tenant,
                        operation_id,
                    },
                    &token,
                )?)
                .await
                .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
                .into_inner();
            print_operation(&op);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waterfall_places_each_stage_in_time() {
        let ev = |stage: &str, at: i64| relay::proto::TimelineEvent {
            stage: stage.into(),
            at_unix_ms: at,
            replica: "gw-a".into(),
            ..Default::default()
        };
        let op = Operation {
            accepted_unix_ms: 1000,
            timeline: vec![
                ev("accepted", 1000),
                ev("delivered", 1010),
                ev("acknowledged", 1100),
            ],
            ..Default::default()
        };
        let text = waterfall(&op);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("+     0 ms") && lines[0].contains("●"));
        assert!(
            lines[2].contains("+   100 ms (+   90)") && lines[2].contains("────"),
            "{text}"
        );
    }
}
