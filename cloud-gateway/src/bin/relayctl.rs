//! `relayctl`: operator and admin client of the Writeback API: submit a reset, change or
//! unlock, and print an operation's timeline.

use std::io::{BufRead, Write};
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
#[command(
    name = "relayctl",
    version,
    about = "Writeback relay operator client",
    long_about = "Writeback relay operator client.\n\n\
Exit codes:\n  \
0  the operation was APPLIED, or the query was answered\n  \
1  a definite no from AD or policy (REJECTED_BY_POLICY, WRONG_OLD_PASSWORD, USER_NOT_FOUND,\n     \
PROTECTED_ACCOUNT, ACCESS_DENIED, ACCOUNT_DISABLED, NOT_ENABLED, REFUSED, FAILED, NOT_FOUND)\n  \
2  usage or input error\n  \
3  outcome unknown or not yet known (TIMED_OUT, IN_PROGRESS, DEADLINE_EXCEEDED)\n  \
4  unavailable, retry later (AGENT_UNAVAILABLE, DIRECTORY_UNAVAILABLE, EXPIRED,\n     \
RESOURCE_EXHAUSTED, UNAVAILABLE, cannot connect)\n  \
5  authentication or permission problem (UNAUTHENTICATED, PERMISSION_DENIED)\n\n\
Output goes to stdout, one JSON document per command with --output json; a closed\n\
reader (e.g. `| head -1`) ends relayctl quietly with exit 0."
)]
struct Cli {
    /// Output format: text (default) or json (one JSON document on stdout).
    #[arg(
        long,
        env = "RELAYCTL_OUTPUT",
        global = true,
        value_enum,
        default_value = "text"
    )]
    output: Format,
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

/// Exit code for an operation's outcome (see the long help).
fn outcome_exit_code(outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Applied => 0,
        Outcome::RejectedByPolicy
        | Outcome::WrongOldPassword
        | Outcome::UserNotFound
        | Outcome::ProtectedAccount
        | Outcome::AccessDenied
        | Outcome::Refused
        | Outcome::Failed
        | Outcome::AccountDisabled
        | Outcome::NotEnabled
        | Outcome::OutOfScope => 1,
        Outcome::TimedOut | Outcome::InProgress | Outcome::Unspecified => 3,
        Outcome::AgentUnavailable | Outcome::DirectoryUnavailable | Outcome::Expired => 4,
    }
}

/// Exit code for a gRPC error status (see the long help).
fn status_exit_code(code: tonic::Code) -> i32 {
    use tonic::Code as C;
    match code {
        C::Ok => 0,
        C::NotFound | C::AlreadyExists | C::FailedPrecondition | C::Aborted => 1,
        C::InvalidArgument | C::OutOfRange | C::Unimplemented => 2,
        C::DeadlineExceeded | C::Cancelled => 3,
        C::Unavailable | C::ResourceExhausted | C::Internal | C::Unknown | C::DataLoss => 4,
        C::Unauthenticated | C::PermissionDenied => 5,
    }
}

/// An error that carries the exit code relayctl ends with.
#[derive(Debug)]
struct Failure {
    code: i32,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

fn status_error(s: tonic::Status) -> anyhow::Error {
    Failure {
        code: status_exit_code(s.code()),
        message: format!("{:?}: {}", s.code(), s.message()),
    }
    .into()
}

/// Writes to stdout; a reader that has gone away (EPIPE) means it is done: exit 0 quietly.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("relayctl: writing output: {e}");
        std::process::exit(4);
    }
}

/// One JSON document, or the text, on stdout.
fn emit_as(format: Format, json: &impl serde::Serialize, text: &str) {
    match format {
        Format::Text => emit(text),
        Format::Json => {
            let mut doc = serde_json::to_string_pretty(json).expect("view serializes");
            doc.push('\n');
            emit(&doc);
        }
    }
}

#[derive(serde::Serialize)]
struct EventView {
    stage: String,
    at_unix_ms: i64,
    replica: String,
    agent_id: String,
    detail: String,
}

#[derive(serde::Serialize)]
struct OperationView {
    operation_id: String,
    tenant_id: String,
    forest: String,
    kind: String,
    state: String,
    outcome: String,
    policy_violation: Option<String>,
    message: String,
    trace_id: String,
    accepted_unix_ms: i64,
    deadline_unix_ms: i64,
    timeline: Vec<EventView>,
}

fn violation_name(v: i32) -> Option<String> {
    match PolicyViolation::try_from(v).unwrap_or_default() {
        PolicyViolation::Unspecified => None,
        v => Some(v.as_str_name().to_owned()),
    }
}

fn operation_view(op: &Operation) -> OperationView {
    OperationView {
        operation_id: op.operation_id.clone(),
        tenant_id: op.tenant_id.clone(),
        forest: op.forest.clone(),
        kind: op.kind.clone(),
        state: relay::proto::OperationState::try_from(op.state)
            .unwrap_or_default()
            .as_str_name()
            .to_owned(),
        outcome: Outcome::try_from(op.outcome)
            .unwrap_or_default()
            .as_str_name()
            .to_owned(),
        policy_violation: violation_name(op.policy_violation),
        message: op.message.clone(),
        trace_id: op.trace_id.clone(),
        accepted_unix_ms: op.accepted_unix_ms,
        deadline_unix_ms: op.deadline_unix_ms,
        timeline: op
            .timeline
            .iter()
            .map(|e| EventView {
                stage: e.stage.clone(),
                at_unix_ms: e.at_unix_ms,
                replica: e.replica.clone(),
                agent_id: e.agent_id.clone(),
                detail: e.detail.clone(),
            })
            .collect(),
    }
}

#[derive(serde::Serialize)]
struct SubmitView {
    operation_id: String,
    outcome: String,
    policy_violation: Option<String>,
    message: String,
    trace_id: String,
    took_ms: u128,
    exit_code: i32,
    /// The operation and its timeline; null when nothing was queued.
    operation: Option<OperationView>,
}

#[derive(serde::Serialize)]
struct AgentView {
    agent_id: String,
    forest: String,
    version: String,
    replica: String,
    live: bool,
    last_heartbeat_unix_ms: i64,
    in_flight: u32,
    max_in_flight: u32,
    instance_id: String,
}

#[derive(serde::Serialize)]
struct ForestView {
    forest: String,
    healthy: bool,
    reason: String,
    agents: Vec<AgentView>,
}

#[derive(serde::Serialize)]
struct PolicyView {
    forest: String,
    source: String,
    min_length: u32,
    complexity: bool,
    history_length: u32,
    min_age_seconds: u64,
    max_age_seconds: u64,
    next_change_allowed_unix_ms: Option<i64>,
    /// The user given is outside the forest's writeback scope.
    out_of_scope: bool,
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

fn operation_text(op: &Operation) -> String {
    use std::fmt::Write as _;
    let outcome = Outcome::try_from(op.outcome).unwrap_or_default();
    let violation = PolicyViolation::try_from(op.policy_violation).unwrap_or_default();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "operation {}  tenant {}  forest {}  kind {}",
        op.operation_id, op.tenant_id, op.forest, op.kind
    );
    let _ = writeln!(
        t,
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
        let _ = writeln!(t, "message: {}", op.message);
    }
    let _ = writeln!(
        t,
        "timeline (accepted {}; deadline +{} ms):",
        fmt_time(op.accepted_unix_ms),
        op.deadline_unix_ms - op.accepted_unix_ms
    );
    t.push_str(&waterfall(op));
    t
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
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            let code = e.downcast_ref::<Failure>().map_or(2, |f| f.code);
            eprintln!("relayctl: {e:#}");
            std::process::ExitCode::from(code as u8)
        }
    }
}

/// Runs one command; the exit code it should end with, or an error (exit 2 unless a
/// [`Failure`] says otherwise).
async fn run(cli: Cli) -> anyhow::Result<i32> {
    use std::fmt::Write as _;
    let format = cli.output;
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
    // Input is checked before connecting, so that bad input is exit 2 whatever the network.
    let action = match &cli.command {
        Command::Submit {
            reset,
            change,
            unlock,
            clear_forced_change,
            must_change,
            also_unlock,
            password_stdin,
            ..
        } => Some(if *reset {
            if !password_stdin {
                bail!("--reset needs --password-stdin (passwords are never taken from the command line)");
            }
            let p = read_stdin_lines(1)?;
            Action::Reset(ResetPassword {
                new_password: p[0].expose().to_owned(),
                must_change_at_next_logon: *must_change,
                unlock: *also_unlock,
            })
        } else if *change {
            if !password_stdin {
                bail!("--change needs --password-stdin (old then new password, one per line)");
            }
            let p = read_stdin_lines(2)?;
            Action::Change(ChangePassword {
                old_password: p[0].expose().to_owned(),
                new_password: p[1].expose().to_owned(),
            })
        } else if *unlock {
            Action::Unlock(UnlockAccount {})
        } else if *clear_forced_change {
            Action::ClearForcedChange(ClearForcedChange {})
        } else {
            bail!("one of --reset, --change, --unlock or --clear-forced-change is required");
        }),
        Command::Ops { since, .. } => {
            parse_duration(since)?;
            None
        }
        _ => None,
    };
    let channel = channel(&addr, &ca).await.map_err(|e| Failure {
        code: 4,
        message: format!("{e:#}"),
    })?;
    let mut client = WritebackClient::new(channel);
    match cli.command {
        Command::Submit {
            forest,
            user,
            operation_id,
            timeout_ms,
            admin,
            ..
        } => {
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
                action,
            };
            let started = std::time::Instant::now();
            let result = client.submit(with_auth(request.clone(), &token)?).await;
            if let Some(a) = request.action.as_mut() {
                zeroize::Zeroize::zeroize(a);
            }
            let resp = result.map_err(status_error)?.into_inner();
            let took_ms = started.elapsed().as_millis();
            let outcome = Outcome::try_from(resp.outcome).unwrap_or_default();
            let violation = violation_name(resp.policy_violation);
            // Answered at once, nothing queued: there is no operation to fetch.
            let queued = !matches!(outcome, Outcome::AgentUnavailable | Outcome::NotEnabled)
                && !resp.operation_id.is_empty();
            let op = if queued {
                match client
                    .get_operation(with_auth(
                        GetOperationRequest {
                            tenant_id: tenant,
                            operation_id: resp.operation_id.clone(),
                        },
                        &token,
                    )?)
                    .await
                {
                    Ok(op) => Some(op.into_inner()),
                    // The answer above stands; a missing timeline is no error.
                    Err(s) if s.code() == tonic::Code::NotFound => None,
                    Err(s) => {
                        eprintln!(
                            "relayctl: timeline unavailable: {:?}: {}",
                            s.code(),
                            s.message()
                        );
                        None
                    }
                }
            } else {
                None
            };
            let code = outcome_exit_code(outcome);
            let mut t = String::new();
            let _ = writeln!(t, "outcome:      {}", outcome.as_str_name());
            if let Some(v) = &violation {
                let _ = writeln!(t, "policy:       {v}");
            }
            let _ = writeln!(t, "message:      {}", resp.message);
            let _ = writeln!(t, "operation_id: {}", resp.operation_id);
            let _ = writeln!(t, "trace_id:     {}", resp.trace_id);
            let _ = writeln!(t, "took:         {took_ms} ms");
            if let Some(op) = &op {
                t.push('\n');
                t.push_str(&operation_text(op));
            }
            let view = SubmitView {
                operation_id: resp.operation_id.clone(),
                outcome: outcome.as_str_name().to_owned(),
                policy_violation: violation,
                message: resp.message.clone(),
                trace_id: resp.trace_id.clone(),
                took_ms,
                exit_code: code,
                operation: op.as_ref().map(operation_view),
            };
            emit_as(format, &view, &t);
            Ok(code)
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
                .map_err(status_error)?
                .into_inner();
            let mut t = String::new();
            let _ = writeln!(t, "forest:           {}", p.forest);
            let _ = writeln!(t, "source:           {}", p.source);
            let _ = writeln!(t, "minimum length:   {}", p.min_length);
            let _ = writeln!(
                t,
                "complexity:       {}",
                if p.complexity { "on" } else { "off" }
            );
            let _ = writeln!(t, "history:          {} passwords", p.history_length);
            let _ = writeln!(t, "minimum age:      {} s", p.min_age_seconds);
            let _ = writeln!(t, "maximum age:      {} s", p.max_age_seconds);
            if p.next_change_allowed_unix_ms > 0 {
                let _ = writeln!(
                    t,
                    "next change from: {}",
                    fmt_time(p.next_change_allowed_unix_ms)
                );
            }
            if p.out_of_scope {
                let _ = writeln!(
                    t,
                    "out of scope:     yes (writeback refuses this user: OUT_OF_SCOPE)"
                );
            }
            let view = PolicyView {
                out_of_scope: p.out_of_scope,
                forest: p.forest.clone(),
                source: p.source.clone(),
                min_length: p.min_length,
                complexity: p.complexity,
                history_length: p.history_length,
                min_age_seconds: p.min_age_seconds,
                max_age_seconds: p.max_age_seconds,
                next_change_allowed_unix_ms: (p.next_change_allowed_unix_ms > 0)
                    .then_some(p.next_change_allowed_unix_ms),
            };
            emit_as(format, &view, &t);
            Ok(0)
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
                .map_err(status_error)?
                .into_inner()
                .operations;
            let mut t = String::new();
            if ops.is_empty() {
                let _ = writeln!(t, "no operations for {user} in the last {since}");
            }
            for op in &ops {
                let outcome = Outcome::try_from(op.outcome).unwrap_or_default();
                let _ = writeln!(
                    t,
                    "{}  {:<8} {:<26} {}  trace {}",
                    fmt_time(op.accepted_unix_ms),
                    op.kind,
                    match violation_name(op.policy_violation) {
                        None => outcome.as_str_name().to_owned(),
                        Some(v) => format!("{}/{v}", outcome.as_str_name()),
                    },
                    op.operation_id,
                    op.trace_id
                );
            }
            let view: Vec<OperationView> = ops.iter().map(operation_view).collect();
            emit_as(format, &view, &t);
            Ok(0)
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
                .map_err(status_error)?
                .into_inner();
            let now = relay::now_unix_ms();
            let mut t = String::new();
            for f in &resp.forests {
                let _ = writeln!(
                    t,
                    "forest {}  {}  {}",
                    f.forest,
                    if f.healthy { "HEALTHY" } else { "UNHEALTHY" },
                    f.reason
                );
                for a in &f.agents {
                    let _ = writeln!(
                        t,
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
            let view: Vec<ForestView> = resp
                .forests
                .iter()
                .map(|f| ForestView {
                    forest: f.forest.clone(),
                    healthy: f.healthy,
                    reason: f.reason.clone(),
                    agents: f
                        .agents
                        .iter()
                        .map(|a| AgentView {
                            agent_id: a.agent_id.clone(),
                            forest: f.forest.clone(),
                            version: a.version.clone(),
                            replica: a.replica.clone(),
                            live: a.live,
                            last_heartbeat_unix_ms: a.last_heartbeat_unix_ms,
                            in_flight: a.in_flight,
                            max_in_flight: a.max_in_flight,
                            instance_id: a.instance_id.clone(),
                        })
                        .collect(),
                })
                .collect();
            emit_as(format, &view, &t);
            Ok(0)
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
                .map_err(status_error)?
                .into_inner();
            emit_as(format, &operation_view(&op), &operation_text(&op));
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_say_what_happened() {
        assert_eq!(outcome_exit_code(Outcome::Applied), 0);
        for o in [
            Outcome::RejectedByPolicy,
            Outcome::WrongOldPassword,
            Outcome::UserNotFound,
            Outcome::ProtectedAccount,
            Outcome::AccessDenied,
            Outcome::NotEnabled,
            Outcome::Refused,
        ] {
            assert_eq!(outcome_exit_code(o), 1, "{o:?}");
        }
        assert_eq!(outcome_exit_code(Outcome::TimedOut), 3);
        assert_eq!(outcome_exit_code(Outcome::InProgress), 3);
        for o in [
            Outcome::AgentUnavailable,
            Outcome::DirectoryUnavailable,
            Outcome::Expired,
        ] {
            assert_eq!(outcome_exit_code(o), 4, "{o:?}");
        }
        assert_eq!(status_exit_code(tonic::Code::ResourceExhausted), 4);
        assert_eq!(status_exit_code(tonic::Code::Unavailable), 4);
        assert_eq!(status_exit_code(tonic::Code::Unauthenticated), 5);
        assert_eq!(status_exit_code(tonic::Code::PermissionDenied), 5);
        assert_eq!(status_exit_code(tonic::Code::InvalidArgument), 2);
    }

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
