//! `onprem-agent`: parse configuration, start logging, and hand off to the library. The agent
//! dials out only; it opens no listening socket.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use onprem_agent::config::Settings;
use onprem_agent::AgentConfig;

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
    Run(ConfigArgs),
    /// Check TLS, the service account, its delegated rights, policies and the gateway; print
    /// what is wrong with the exact fix. Exits non-zero when writeback would fail.
    Doctor {
        #[command(flatten)]
        args: ConfigArgs,
        /// A user (sAMAccountName or DN) whose rights and inheritance to check (repeatable);
        /// by default a few users under --base-dn.
        #[arg(long = "sample-user")]
        sample_users: Vec<String>,
        /// Do not contact the gateway.
        #[arg(long)]
        skip_gateway: bool,
    },
    /// Enroll this agent: create a key pair here, trade a one-time token (from `cloud-gateway
    /// admin enroll-agent`) for a client certificate, keep both in the state directory. From
    /// then on `run` authenticates with it (mutual TLS) and renews it over its stream.
    Enroll {
        #[command(flatten)]
        args: ConfigArgs,
        /// File holding the one-time enrollment token (a private file).
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Make a new sealing key in the state directory (the gateway seals new work to it from
    /// the agent's next connection; the previous key is kept a day for work sealed to it).
    /// Restart the service to announce it at once.
    RotateKey(ConfigArgs),
    /// The settings.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Read and check the settings (file, environment, flags) without connecting anywhere;
    /// print the effective ones (never a secret). Exits 1 naming the first wrong key.
    Check(ConfigArgs),
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML settings file (e.g. /etc/onprem-agent/agent.toml); environment variables and
    /// flags override it key by key.
    #[arg(long, env = "AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

impl ConfigArgs {
    fn load(self) -> anyhow::Result<AgentConfig> {
        let settings = match &self.config {
            Some(path) => self.settings.or_file(Settings::from_file(path)?),
            None => self.settings,
        };
        Ok(settings.resolve(self.config.as_deref())?)
    }
}

/// `config check`: everything `run` reads before it connects, and the CAs parsed.
fn check(args: ConfigArgs) -> anyhow::Result<()> {
    let file = args.config.clone();
    let config = args.load()?;
    onprem_agent::domains::Domains::new(config.all_domains())
        .map_err(|e| anyhow::anyhow!("ldap: {e}"))?;
    relay::tls::client_config_with_ca(&config.gateway_ca)
        .map_err(|e| anyhow::anyhow!("gateway_ca: {e}"))?;
    if let Some(m) = config.metrics_listen {
        anyhow::ensure!(
            m.ip().is_loopback(),
            "metrics_listen: {m} is not a loopback address"
        );
    }
    println!(
        "settings:      {}",
        file.map_or("(environment and flags only)".into(), |f| f
            .display()
            .to_string())
    );
    println!(
        "gateway:       {} (CA {})",
        config.gateway_url,
        config.gateway_ca.display()
    );
    println!(
        "agent:         {} for forest {}",
        config.agent_id, config.forest
    );
    for d in config.all_domains() {
        println!(
            "domain:        {} base {} via {} as {}",
            d.dns_name,
            d.directory.base_dn,
            d.directory.urls.join(", "),
            d.directory.bind_dn
        );
    }
    println!(
        "state dir:     {}",
        config
            .state_dir
            .as_ref()
            .map_or("(none: journal in memory only)".into(), |d| d
                .display()
                .to_string())
    );
    if let Some(dir) = &config.state_dir {
        println!("sealing keys:  {}", onprem_agent::keys::path(dir).display());
    }
    println!("configuration is valid");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Run(args) => args,
        Command::Config {
            command: ConfigCommand::Check(args),
        } => {
            if let Err(e) = check(args) {
                eprintln!("onprem-agent: {e:#}");
                std::process::exit(1);
            }
            return Ok(());
        }
        Command::Enroll { args, token_file } => {
            let config = args.load()?;
            let token = relay::secret::Secret::from_file(&token_file)?;
            let r = onprem_agent::identity::enroll(&config, &token).await?;
            anyhow::ensure!(
                r.agent_id == config.agent_id && r.forest == config.forest,
                "enrolled as agent {:?} of forest {:?}, but the settings say {:?} of {:?}: fix agent_id/forest (the certificate is kept)",
                r.agent_id,
                r.forest,
                config.agent_id,
                config.forest
            );
            println!(
                "enrolled: agent {} of tenant {} for forest {}; certificate valid until {} (Unix ms), renewed over the stream",
                r.agent_id, r.tenant_id, r.forest, r.not_after_unix_ms
            );
            return Ok(());
        }
        Command::RotateKey(args) => {
            let config = args.load()?;
            let Some(dir) = &config.state_dir else {
                anyhow::bail!("state_dir is not set: this agent keeps its sealing key in memory and makes a new one at every start");
            };
            let r = onprem_agent::keys::rotate_by_hand(dir)?;
            println!("new sealing key: {}", r.new_key_id);
            if let Some(old) = r.retired_key_id {
                println!("retired key:     {old} (kept 24 h for work already sealed to it)");
            }
            println!(
                "kept {} retired key(s), deleted {} older than 24 h; restart the agent (systemctl restart onprem-agent) to announce the new key now",
                r.kept, r.dropped
            );
            return Ok(());
        }
        Command::Doctor {
            args,
            sample_users,
            skip_gateway,
        } => {
            relay::telemetry::init_logging();
            let config = args.load()?;
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
    let result = run(args.load()?).await;
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
