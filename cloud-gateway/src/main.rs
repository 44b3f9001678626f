//! `cloud-gateway`: parse configuration, start logging, bind, and hand off to the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cloud_gateway::store::{ForestId, Store, TenantId};
use cloud_gateway::tenants::{ForestSettingsChange, Tenants};
use cloud_gateway::{admin, GatewayConfig};

#[derive(Parser)]
#[command(
    name = "cloud-gateway",
    version,
    about = "Password writeback relay: cloud gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Writeback, AgentLink, health and reflection over TLS.
    Serve(ServeArgs),
    /// Ask a gateway's grpc.health.v1 over TLS, as Kubernetes probes do (the image has no
    /// other tool): exit 0 when the service is SERVING, 1 otherwise.
    Health(HealthArgs),
    /// Manage tenants and agent credentials.
    Admin(AdminArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "WRITEBACK_LISTEN", default_value = "0.0.0.0:7443")]
    listen: String,
    /// PEM certificate chain of this gateway.
    #[arg(long, env = "WRITEBACK_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key of this gateway.
    #[arg(long, env = "WRITEBACK_TLS_KEY")]
    tls_key: PathBuf,
    #[command(flatten)]
    common: Common,
    /// Name of this replica (defaults to the host name, i.e. the pod name on Kubernetes).
    #[arg(long, env = "WRITEBACK_REPLICA_ID")]
    replica_id: Option<String>,
    /// Longest wait a caller may ask for, in seconds.
    #[arg(long, env = "WRITEBACK_MAX_TIMEOUT_SECS", default_value_t = 120)]
    max_timeout_secs: u64,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this address.
    #[arg(long, env = "WRITEBACK_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Calls per second allowed per tenant, over all replicas and every RPC (0 = unlimited).
    #[arg(long, env = "WRITEBACK_TENANT_RATE", default_value_t = 100.0)]
    tenant_rate: f64,
    /// Burst of calls allowed per tenant.
    #[arg(long, env = "WRITEBACK_TENANT_BURST", default_value_t = 200.0)]
    tenant_burst: f64,
    /// Password changes per user per window that may end with a wrong old password (or no
    /// answer) before further changes are refused (0 = unlimited).
    #[arg(long, env = "WRITEBACK_USER_GUESS_LIMIT", default_value_t = 5)]
    user_guess_limit: u32,
    /// Unlock requests per user per window (0 = unlimited).
    #[arg(long, env = "WRITEBACK_USER_UNLOCK_LIMIT", default_value_t = 5)]
    user_unlock_limit: u32,
    /// The per-user window, in seconds.
    #[arg(long, env = "WRITEBACK_USER_LIMIT_WINDOW_SECS", default_value_t = 900)]
    user_limit_window_secs: u64,
    /// The agent CA's certificate (PEM; `admin init-agent-ca` makes one): with it agents
    /// enroll and authenticate by client certificate.
    #[arg(
        long,
        env = "WRITEBACK_AGENT_CA_CERT_FILE",
        requires = "agent_ca_key_file"
    )]
    agent_ca_cert_file: Option<PathBuf>,
    /// The agent CA's private key (PEM, a private file).
    #[arg(
        long,
        env = "WRITEBACK_AGENT_CA_KEY_FILE",
        requires = "agent_ca_cert_file"
    )]
    agent_ca_key_file: Option<PathBuf>,
    /// Where audit records go: `-` (stdout, apart from the logs on stderr), `stderr`, `off`,
    /// or a file appended to (created 0600).
    #[arg(long, env = "WRITEBACK_AUDIT_LOG", default_value = "-")]
    audit_log: String,
    /// Lifetime of the agent certificates it issues, in seconds (agents renew at half).
    #[arg(long, env = "WRITEBACK_AGENT_CERT_TTL_SECS", default_value_t = 86_400)]
    agent_cert_ttl_secs: u64,
    /// Seconds between end-to-end canaries per forest (0 turns them off).
    #[arg(long, env = "WRITEBACK_CANARY_INTERVAL_SECS", default_value_t = 30)]
    canary_interval_secs: u64,
    /// Seconds to let agent sessions and waiting callers finish after SIGTERM.
    #[arg(long, env = "WRITEBACK_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    shutdown_grace_secs: u64,
    /// Milliseconds between heartbeats with each agent; one silent for two gets no new work,
    /// for three its stream is closed.
    #[arg(long, env = "WRITEBACK_HEARTBEAT_MS", default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Milliseconds after an operation's deadline during which an agent's answer is still
    /// recorded (and the operation still holds its user's queue); then `TIMED_OUT`.
    #[arg(long, env = "WRITEBACK_ANSWER_GRACE_MS", default_value_t = 10_000)]
    answer_grace_ms: u64,
    /// Most unsettled operations one forest's queue holds before Submit answers
    /// `RESOURCE_EXHAUSTED`.
    #[arg(long, env = "WRITEBACK_FOREST_QUEUE_LIMIT", default_value_t = 10_000)]
    forest_queue_limit: u64,
    /// Most unsettled operations one tenant has over all its forests before Submit answers
    /// `RESOURCE_EXHAUSTED`.
    #[arg(long, env = "WRITEBACK_TENANT_QUEUE_LIMIT", default_value_t = 50_000)]
    tenant_queue_limit: u64,
}

#[derive(clap::Args)]
struct HealthArgs {
    /// The gateway to ask.
    #[arg(long, default_value = "127.0.0.1:7443")]
    addr: String,
    /// PEM CA that signed the gateway's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// A name the certificate has (e.g. the Service's, `cloud-gateway`).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// The service to ask about (empty: the server as a whole).
    #[arg(long, default_value = "writeback.v1.Writeback")]
    service: String,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// `health`: one grpc.health.v1 check; the status on stdout, the exit code says SERVING.
async fn health(args: HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    relay::tls::install_crypto_provider();
    let ca = std::fs::read(&args.ca).with_context(|| format!("--ca {}", args.ca.display()))?;
    let within = Duration::from_millis(args.timeout_ms);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", args.addr))?
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name(&args.tls_name),
        )?
        .connect_timeout(within)
        .timeout(within);
    let status = tokio::time::timeout(within, async {
        let mut client = HealthClient::new(endpoint.connect().await?);
        let r = client
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await?;
        anyhow::Ok(r.into_inner().status())
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer from {} within {within:?}", args.addr))??;
    println!("{}", status.as_str_name());
    if status != tonic_health::pb::health_check_response::ServingStatus::Serving {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(clap::Args)]
struct Common {
    /// Redis shared by all replicas: redis://host:port (one server), rediss://… (TLS),
    /// redis+cluster://h1:p1,h2:p2,… (Redis Cluster seed nodes), redis+sentinel://s1:p1,s2:p2/<master>
    /// (the master Sentinel names); rediss+cluster:// and rediss+sentinel:// over TLS.
    ///
    /// An ACL user goes in the URL (rediss://writeback@host:6380); its password better in
    /// --redis-password-file than in the URL. Sentinels themselves are asked without
    /// credentials.
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// File holding the password of the URL's ACL user (must be private: 0600 or 0640).
    #[arg(long, env = "REDIS_PASSWORD_FILE")]
    redis_password_file: Option<PathBuf>,
    /// PEM CA that signed the Redis servers' certificates (rediss:// only; without it the
    /// system's roots).
    #[arg(long, env = "REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS with Redis (with --redis-client-key).
    #[arg(long, env = "REDIS_CLIENT_CERT")]
    redis_client_cert: Option<PathBuf>,
    /// PEM private key of --redis-client-cert (must be private).
    #[arg(long, env = "REDIS_CLIENT_KEY")]
    redis_client_key: Option<PathBuf>,
    /// Replicas that must have each operation state change (Redis WAIT) before it counts; 1
    /// with a cluster or Sentinel keeps a master's kill -9 from losing accepted work.
    #[arg(long, env = "REDIS_REPLICA_ACKS", default_value_t = 0)]
    redis_replica_acks: u32,
    /// File holding the gateway master key (64 hex digits; `admin gen-master-key` makes one).
    #[arg(long, env = "WRITEBACK_MASTER_KEY_FILE")]
    master_key_file: PathBuf,
    /// During a master-key rotation, the previous master key: records MACed and work signed
    /// under it are still accepted (see `admin rotate-master-key`).
    #[arg(long, env = "WRITEBACK_PREVIOUS_MASTER_KEY_FILE")]
    previous_master_key_file: Option<PathBuf>,
}

impl Common {
    fn previous_master_key(&self) -> anyhow::Result<Option<relay::envelope::KeyBytes>> {
        self.previous_master_key_file
            .as_deref()
            .map(load_master_key)
            .transpose()
    }
}

#[derive(clap::Args)]
struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
    /// Where the audit record of the command goes: `stderr` (stdout carries what the command
    /// prints), `off`, or a file appended to (created 0600), e.g. the gateway's.
    #[arg(
        long,
        global = true,
        env = "WRITEBACK_ADMIN_AUDIT_LOG",
        default_value = "stderr"
    )]
    audit_log: String,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Print a new master key (64 hex digits).
    GenMasterKey,
    /// Create a tenant and print its bearer token (re-running rotates the token).
    CreateTenant {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        tenant: String,
        /// Print nothing and succeed when the tenant already exists.
        #[arg(long)]
        if_missing: bool,
    },
    /// Register an agent for a tenant's forest and print its secret (re-running rotates it).
    RegisterAgent {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        forest: String,
        #[arg(long)]
        agent_id: String,
    },
    /// Write a new agent CA (certificate and private key, PEM) for `serve
    /// --agent-ca-cert-file/--agent-ca-key-file`.
    InitAgentCa {
        #[arg(long)]
        cert_out: PathBuf,
        #[arg(long)]
        key_out: PathBuf,
    },
    /// Print a one-time enrollment token for an agent of a tenant's forest; `onprem-agent
    /// enroll` trades it for a client certificate. Enrolling again replaces the agent's
    /// earlier certificate or secret.
    EnrollAgent {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        forest: String,
        #[arg(long)]
        agent_id: String,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Re-MAC every record (tokens, agent credentials, forest switches) under
    /// --master-key-file, accepting those under --previous-master-key-file. Rotation: (1) run
    /// every replica with the new key as --master-key-file and the old one as
    /// --previous-master-key-file; (2) run this; (3) after the longest operation deadline plus
    /// its answer grace, drop --previous-master-key-file. Nothing in flight is lost.
    RotateMasterKey {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke an agent: its credential admits nobody from now on (it is told it was revoked)
    /// and its open streams close on every replica within a second.
    RevokeAgent {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        agent_id: String,
    },
    /// List a tenant's agents: forest, active or revoked, and live instances.
    ListAgents {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        tenant: String,
    },
    /// Set a forest's switches (those not given stay as they are) and print them all.
    SetForest {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        forest: String,
        /// Write back passwords to this forest (default on).
        #[arg(long)]
        writeback_enabled: Option<bool>,
        /// Allow users to unlock without resetting their password (default on).
        #[arg(long)]
        unlock_enabled: Option<bool>,
        /// Apply operations to members of protected groups, adminCount=1 (default off).
        #[arg(long)]
        allow_protected_accounts: Option<bool>,
        /// Writeback scope: users under this OU (its DN; the whole subtree). Repeatable; given
        /// with --scope-group, a user in either is in scope. Replaces the forest's scope. The
        /// agent's local scope (AD admin) narrows it further; users outside get OUT_OF_SCOPE.
        #[arg(long = "scope-ou", value_name = "DN")]
        scope_ous: Vec<String>,
        /// Writeback scope: members of this group (its DN), also through nested groups.
        /// Repeatable. The primary group (Domain Users) does not count as membership.
        #[arg(long = "scope-group", value_name = "DN")]
        scope_groups: Vec<String>,
        /// Clear the scope: every user under the agents' base DN (the default).
        #[arg(long, conflicts_with_all = ["scope_ous", "scope_groups"])]
        scope_all: bool,
    },
}

impl Common {
    fn redis_options(&self) -> cloud_gateway::store::RedisOptions {
        cloud_gateway::store::RedisOptions {
            ca_file: self.redis_ca_file.clone(),
            client_cert: self.redis_client_cert.clone(),
            client_key: self.redis_client_key.clone(),
            password_file: self.redis_password_file.clone(),
            replica_acks: self.redis_replica_acks,
        }
    }
}

fn load_master_key(path: &std::path::Path) -> anyhow::Result<relay::envelope::KeyBytes> {
    let content = relay::secret::Secret::from_file(path)?;
    admin::parse_master_key(content.expose())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

async fn tenants(common: &Common) -> anyhow::Result<Tenants> {
    let key = load_master_key(&common.master_key_file)?;
    let previous = common.previous_master_key()?;
    let store = Store::connect_with(&common.redis_url, &common.redis_options())
        .await
        .context("cannot connect to redis")?;
    Ok(Tenants::rotating(store, key, previous))
}

/// `--tenant`, checked by the rule of a request's `tenant_id`.
fn tenant_flag(v: &str) -> anyhow::Result<TenantId> {
    TenantId::new(v).map_err(|e| anyhow::anyhow!("--tenant: {e}"))
}

/// `--forest`, checked by the rule of a request's `forest`.
fn forest_flag(v: &str) -> anyhow::Result<ForestId> {
    ForestId::new(v).map_err(|e| anyhow::anyhow!("--{e}"))
}

/// `--agent-id`, held to the rule of a tenant id.
fn check_agent_id(v: &str) -> anyhow::Result<()> {
    TenantId::new(v)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("--agent-id: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => {
            let telemetry = relay::telemetry::init("cloud-gateway");
            let result = serve(args).await;
            telemetry.shutdown();
            result
        }
        Command::Admin(AdminArgs { command, audit_log }) => {
            admin_command(command, &audit_log).await
        }
        Command::Health(args) => health(args).await,
    }
}

/// What an admin command acts on, for its audit record.
struct AuditTarget {
    action: &'static str,
    tenant: String,
    forest: String,
    agent_id: String,
}

impl AdminCommand {
    fn audit_target(&self) -> Option<AuditTarget> {
        let t = |_: &Common, action, tenant: &str, forest: &str, agent_id: &str| {
            Some(AuditTarget {
                action,
                tenant: tenant.to_owned(),
                forest: forest.to_owned(),
                agent_id: agent_id.to_owned(),
            })
        };
        match self {
            Self::GenMasterKey | Self::InitAgentCa { .. } | Self::ListAgents { .. } => None,
            Self::CreateTenant { common, tenant, .. } => t(common, "create-tenant", tenant, "", ""),
            Self::RegisterAgent {
                common,
                tenant,
                forest,
                agent_id,
            } => t(common, "register-agent", tenant, forest, agent_id),
            Self::EnrollAgent {
                common,
                tenant,
                forest,
                agent_id,
                ..
            } => t(common, "enroll-agent", tenant, forest, agent_id),
            Self::RotateMasterKey { common } => t(common, "rotate-master-key", "", "", ""),
            Self::RevokeAgent {
                common,
                tenant,
                agent_id,
            } => t(common, "revoke-agent", tenant, "", agent_id),
            Self::SetForest {
                common,
                tenant,
                forest,
                ..
            } => t(common, "set-forest", tenant, forest, ""),
        }
    }
}

/// Runs an admin command and writes its audit record (also when it failed).
async fn admin_command(command: AdminCommand, audit_log: &str) -> anyhow::Result<()> {
    relay::telemetry::init_logging();
    let target = command.audit_target();
    let started = std::time::Instant::now();
    let result = admin_command_run(command).await;
    if let Some(t) = target {
        let audit = cloud_gateway::audit::Audit::open(audit_log)?;
        audit.record(&cloud_gateway::audit::Record {
            record: "admin",
            at_unix_ms: relay::now_unix_ms(),
            actor: format!(
                "admin:{}",
                std::env::var("SUDO_USER")
                    .or_else(|_| std::env::var("USER"))
                    .unwrap_or_else(|_| "unknown".into())
            ),
            tenant: &t.tenant,
            forest: &t.forest,
            agent_id: &t.agent_id,
            action: t.action,
            outcome: if result.is_ok() { "OK" } else { "FAILED" },
            detail: result
                .as_ref()
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default(),
            took_ms: Some(started.elapsed().as_millis() as u64),
            ..Default::default()
        });
    }
    result
}

async fn admin_command_run(command: AdminCommand) -> anyhow::Result<()> {
    {
        match command {
            AdminCommand::GenMasterKey => {
                println!("{}", admin::generate_master_key()?.expose());
                Ok(())
            }
            AdminCommand::CreateTenant {
                common,
                tenant,
                if_missing,
            } => {
                let tenant = tenant_flag(&tenant)?;
                let t = tenants(&common).await?;
                if let Some(token) = admin::create_tenant(&t, &tenant, if_missing).await? {
                    println!("{}", token.expose());
                }
                Ok(())
            }
            AdminCommand::RegisterAgent {
                common,
                tenant,
                forest,
                agent_id,
            } => {
                let tenant = tenant_flag(&tenant)?;
                check_agent_id(&agent_id)?;
                let forest = forest_flag(&forest)?;
                let t = tenants(&common).await?;
                println!(
                    "{}",
                    t.register_agent(&tenant, &forest, &agent_id)
                        .await?
                        .expose()
                );
                Ok(())
            }
            AdminCommand::InitAgentCa { cert_out, key_out } => {
                anyhow::ensure!(
                    !key_out.exists(),
                    "{} exists: remove it first (a new CA cuts off every enrolled agent)",
                    key_out.display()
                );
                let (cert, key) =
                    cloud_gateway::enroll::AgentCa::generate().map_err(|e| anyhow::anyhow!(e))?;
                relay::secret::write_private(&key_out, &key)?;
                std::fs::write(&cert_out, cert)?;
                println!(
                    "agent CA: certificate {}, private key {} (0600)",
                    cert_out.display(),
                    key_out.display()
                );
                Ok(())
            }
            AdminCommand::EnrollAgent {
                common,
                tenant,
                forest,
                agent_id,
                ttl_secs,
            } => {
                let tenant = tenant_flag(&tenant)?;
                check_agent_id(&agent_id)?;
                let forest = forest_flag(&forest)?;
                let t = tenants(&common).await?;
                let token = t
                    .create_enrollment(
                        &tenant,
                        &forest,
                        &agent_id,
                        Duration::from_secs(ttl_secs.clamp(60, 7 * 86_400)),
                    )
                    .await?;
                println!("{}", token.expose());
                Ok(())
            }
            AdminCommand::RotateMasterKey { common } => {
                anyhow::ensure!(
                    common.previous_master_key_file.is_some(),
                    "--previous-master-key-file is required: the key the records are MACed under now"
                );
                let done = tenants(&common).await?.remac_all().await?;
                println!(
                    "re-MACed {} records under the new master key; {} verified under neither key and were left as they are (they admit nobody)",
                    done.records, done.unverified
                );
                Ok(())
            }
            AdminCommand::RevokeAgent {
                common,
                tenant,
                agent_id,
            } => {
                let tenant = tenant_flag(&tenant)?;
                check_agent_id(&agent_id)?;
                tenants(&common)
                    .await?
                    .revoke_agent(&tenant, &agent_id)
                    .await?;
                println!("revoked {agent_id}");
                Ok(())
            }
            AdminCommand::ListAgents { common, tenant } => {
                let tenant = tenant_flag(&tenant)?;
                let agents = tenants(&common)
                    .await?
                    .list_agents(&tenant, std::time::Duration::from_secs(15))
                    .await?;
                for a in agents {
                    let state = match a.revoked_at_unix_ms {
                        Some(at) => format!("revoked at {at}"),
                        None => "active".into(),
                    };
                    let live = if a.live.is_empty() {
                        "no live instance".into()
                    } else {
                        format!("live: {}", a.live.join(", "))
                    };
                    println!("{}\t{}\t{state}\t{live}", a.agent_id, a.forest);
                }
                Ok(())
            }
            AdminCommand::SetForest {
                common,
                tenant,
                forest,
                writeback_enabled,
                unlock_enabled,
                allow_protected_accounts,
                scope_ous,
                scope_groups,
                scope_all,
            } => {
                let tenant = tenant_flag(&tenant)?;
                let forest = forest_flag(&forest)?;
                let scope = if scope_all {
                    Some(relay::scope::Scope::default())
                } else if scope_ous.is_empty() && scope_groups.is_empty() {
                    None
                } else {
                    Some(relay::scope::Scope::parse(
                        &scope_ous,
                        &scope_groups,
                        "--scope-ou",
                        "--scope-group",
                    )?)
                };
                let t = tenants(&common).await?;
                let change = ForestSettingsChange {
                    writeback_enabled,
                    unlock_enabled,
                    allow_protected_accounts,
                    scope,
                };
                let now = t.set_forest(&tenant, &forest, &change).await?;
                println!(
                    "writeback_enabled={} unlock_enabled={} allow_protected_accounts={} scope={:?}",
                    now.writeback_enabled,
                    now.unlock_enabled,
                    now.allow_protected_accounts,
                    now.scope.describe()
                );
                Ok(())
            }
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let replica_id = match args.replica_id {
        Some(r) => r,
        None => std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .context("--replica-id (WRITEBACK_REPLICA_ID) is required when HOSTNAME is not set")?,
    };
    let previous = args.common.previous_master_key()?;
    let redis = args.common.redis_options();
    let mut config = GatewayConfig::new(
        replica_id,
        args.common.redis_url,
        load_master_key(&args.common.master_key_file)?,
        args.tls_cert,
        args.tls_key,
    );
    config.previous_master_key = previous;
    config.audit = std::sync::Arc::new(cloud_gateway::audit::Audit::open(&args.audit_log)?);
    config.redis = redis;
    config.max_timeout = Duration::from_secs(args.max_timeout_secs);
    config.metrics_listen = args.metrics_listen;
    config.canary_interval = Duration::from_secs(args.canary_interval_secs);
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms.max(100));
    config.ack_grace = Duration::from_millis(args.answer_grace_ms);
    config.forest_queue_limit = args.forest_queue_limit;
    config.tenant_queue_limit = args.tenant_queue_limit;
    config.tenant_rate = (args.tenant_rate > 0.0).then_some(cloud_gateway::limits::Rate {
        per_second: args.tenant_rate,
        burst: args.tenant_burst.max(1.0),
    });
    config.user_limits = cloud_gateway::limits::UserLimits {
        guesses: args.user_guess_limit,
        unlocks: args.user_unlock_limit,
        window: Duration::from_secs(args.user_limit_window_secs.max(1)),
    };
    if let (Some(cert), Some(key)) = (&args.agent_ca_cert_file, &args.agent_ca_key_file) {
        let cert_pem = std::fs::read_to_string(cert)
            .with_context(|| format!("--agent-ca-cert-file {}", cert.display()))?;
        let key_pem = relay::secret::Secret::from_file(key)?;
        let ca = cloud_gateway::enroll::AgentCa::from_pem(
            &cert_pem,
            key_pem.expose(),
            Duration::from_secs(args.agent_cert_ttl_secs.max(60)),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        config.agent_ca = Some(std::sync::Arc::new(ca));
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(cloud_gateway::run(config, listener, shutdown.clone()));
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return Ok(r??),
        _ = relay::telemetry::shutdown_signal() => {}
    }
    tracing::info!(grace_secs = args.shutdown_grace_secs, "shutting down");
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(args.shutdown_grace_secs), server).await {
        Ok(r) => Ok(r??),
        Err(_) => {
            tracing::warn!("grace period over; exiting with work still open");
            Ok(())
        }
    }
}
