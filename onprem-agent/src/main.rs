//! `onprem-agent`: parse configuration, start logging, and hand off to the library. The agent
//! dials out only; it opens no listening socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use onprem_agent::domains::DomainConfig;
use onprem_agent::{directory::DirectoryConfig, AgentConfig};
use relay::secret::Secret;

#[derive(Parser)]
#[command(
    name = "onprem-agent",
    version,
    about = "Password writeback relay: on-premises agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect to the gateway and apply operations to Active Directory.
    Run(RunArgs),
    /// Check TLS, the service account, its delegated rights, policies and the gateway; print
    /// what is wrong with the exact fix. Exits non-zero when writeback would fail.
    Doctor {
        #[command(flatten)]
        args: RunArgs,
        /// A user (sAMAccountName or DN) whose rights and inheritance to check (repeatable);
        /// by default a few users under --base-dn.
        #[arg(long = "sample-user")]
        sample_users: Vec<String>,
        /// Do not contact the gateway.
        #[arg(long)]
        skip_gateway: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Gateway AgentLink address, https://host:port.
    #[arg(long, env = "AGENT_GATEWAY_URL")]
    gateway_url: String,
    /// PEM CA that signed the gateway's certificate.
    #[arg(long, env = "AGENT_GATEWAY_CA")]
    gateway_ca: PathBuf,
    /// Name to verify in the gateway certificate when it differs from the URL host.
    #[arg(long, env = "AGENT_GATEWAY_TLS_NAME")]
    gateway_tls_name: Option<String>,
    #[arg(long, env = "AGENT_ID")]
    agent_id: String,
    /// File holding the agent secret printed by `cloud-gateway admin register-agent`.
    #[arg(long, env = "AGENT_SECRET_FILE")]
    agent_secret_file: PathBuf,
    /// Forest this agent serves (as registered at the gateway).
    #[arg(long, env = "AGENT_FOREST")]
    forest: String,
    /// Domain controllers, ldaps://host[:port]; tried in order.
    #[arg(
        long = "ldap-url",
        env = "AGENT_LDAP_URLS",
        value_delimiter = ',',
        required = true
    )]
    ldap_urls: Vec<String>,
    /// PEM CA that signed the domain controllers' certificates.
    #[arg(long, env = "AGENT_LDAP_CA")]
    ldap_ca: PathBuf,
    /// DN or UPN of the delegated service account (never a domain admin).
    #[arg(long, env = "AGENT_BIND_DN")]
    bind_dn: String,
    /// File holding the service account's password.
    #[arg(long, env = "AGENT_BIND_PASSWORD_FILE")]
    bind_password_file: PathBuf,
    /// Search base for users, e.g. DC=corp,DC=example,DC=com.
    #[arg(long, env = "AGENT_BASE_DN")]
    base_dn: String,
    /// Operations applied at once.
    #[arg(long, env = "AGENT_MAX_IN_FLIGHT", default_value_t = 8)]
    max_in_flight: u32,
    /// A further domain of the forest (repeatable):
    /// `DNS;base=DN;ldap=URL[|URL…][;upn=SUFFIX[|SUFFIX…]][;bind=DN_OR_UPN;password-file=PATH][;ca=PEM]`.
    /// Bind account, password and CA default to the primary domain's.
    #[arg(long = "domain", env = "AGENT_DOMAINS", value_delimiter = '\n')]
    domains: Vec<String>,
    /// Serve Prometheus metrics on this loopback address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Directory for the agent's journal and instance id (write-ahead: a restarted agent
    /// answers redelivered work from it and never applies an operation twice). Without it
    /// the journal is kept in memory only.
    #[arg(long, env = "AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Pooled LDAPS connections.
    #[arg(long, env = "AGENT_LDAP_POOL_SIZE", default_value_t = 4)]
    ldap_pool_size: usize,
}

/// Parses one `--domain` value (see its help).
fn parse_domain(spec: &str, primary: &DirectoryConfig) -> anyhow::Result<DomainConfig> {
    let mut parts = spec.split(';');
    let dns_name = parts.next().unwrap_or_default().trim().to_owned();
    anyhow::ensure!(
        !dns_name.is_empty() && !dns_name.contains('='),
        "--domain {spec:?}: must start with the domain's DNS name"
    );
    let mut directory = primary.clone();
    directory.urls.clear();
    directory.base_dn.clear();
    let mut upn_suffixes = Vec::new();
    for part in parts.filter(|p| !p.trim().is_empty()) {
        let (key, value) = part
            .split_once('=')
            .with_context(|| format!("--domain {dns_name}: {part:?} is not key=value"))?;
        let value = value.trim();
        match key.trim() {
            "base" => directory.base_dn = value.to_owned(),
            "ldap" => directory.urls = value.split('|').map(str::to_owned).collect(),
            "upn" => upn_suffixes = value.split('|').map(str::to_owned).collect(),
            "bind" => directory.bind_dn = value.to_owned(),
            "password-file" => {
                directory.bind_password = Secret::from_file(std::path::Path::new(value))
                    .with_context(|| format!("--domain {dns_name}: password-file"))?
            }
            "ca" => directory.ca_file = value.into(),
            other => anyhow::bail!("--domain {dns_name}: unknown key {other:?} (expected base, ldap, upn, bind, password-file, ca)"),
        }
    }
    anyhow::ensure!(
        !directory.base_dn.is_empty(),
        "--domain {dns_name}: base=DN is required"
    );
    anyhow::ensure!(
        !directory.urls.is_empty(),
        "--domain {dns_name}: ldap=URL is required"
    );
    Ok(DomainConfig {
        dns_name,
        upn_suffixes,
        directory,
    })
}

fn agent_config(args: RunArgs) -> anyhow::Result<AgentConfig> {
    let agent_secret = Secret::from_file(&args.agent_secret_file).context("--agent-secret-file")?;
    let bind_password =
        Secret::from_file(&args.bind_password_file).context("--bind-password-file")?;
    let directory = DirectoryConfig {
        urls: args.ldap_urls,
        ca_file: args.ldap_ca,
        bind_dn: args.bind_dn,
        bind_password,
        base_dn: args.base_dn,
        pool_size: args.ldap_pool_size.max(1),
        connect_timeout: Duration::from_secs(5),
        use_dc_reason_text: true,
    };
    let extra_domains = args
        .domains
        .iter()
        .filter(|d| !d.trim().is_empty())
        .map(|d| parse_domain(d, &directory))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(AgentConfig {
        gateway_url: args.gateway_url,
        gateway_ca: args.gateway_ca,
        gateway_tls_name: args.gateway_tls_name,
        agent_id: args.agent_id,
        agent_secret,
        extra_domains,
        forest: args.forest,
        max_in_flight: args.max_in_flight.clamp(1, 256),
        directory,
        metrics_listen: args.metrics_listen,
        state_dir: args.state_dir,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Run(args) => args,
        Command::Doctor {
            args,
            sample_users,
            skip_gateway,
        } => {
            relay::telemetry::init_logging();
            let config = agent_config(args)?;
            let options = onprem_agent::doctor::DoctorOptions {
                sample_users,
                skip_gateway,
            };
            let report = onprem_agent::doctor::run(&config, &options).await;
            print!("{}", report.render());
            std::process::exit(i32::from(report.failed()));
        }
    };
    let telemetry = relay::telemetry::init("onprem-agent");
    let result = run(agent_config(args)?).await;
    telemetry.shutdown();
    result
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(onprem_agent::run(config, shutdown.clone()));
    tokio::pin!(agent);
    tokio::select! {
        r = &mut agent => return Ok(r??),
        _ = relay::telemetry::shutdown_signal() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(15), agent).await {
        Ok(r) => Ok(r??),
        Err(_) => {
            tracing::warn!("grace period over; exiting with operations open");
            Ok(())
        }
    }
}
