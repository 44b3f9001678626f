//! BENCHMARK ONLY: runs the real agent link (`onprem_agent::link::Agent`) with the no-op
//! writer (`bench::noop::NoopWriter`): operations are opened, checked and acknowledged
//! `APPLIED`, and no directory is touched. One process may hold many agent identities (the
//! fan-in scenario): one link per line of `--agents` (`agent_id forest secret_file`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use bench::noop::NoopWriter;
use onprem_agent::directory::DirectoryConfig;
use onprem_agent::link::Agent;
use onprem_agent::writer::Writer;
use onprem_agent::AgentConfig;
use relay::secret::Secret;

#[derive(Parser)]
#[command(
    name = "bench-noop-agent",
    about = "BENCHMARK ONLY: the agent link with a writer that writes nothing"
)]
struct Cli {
    #[arg(long)]
    gateway_url: String,
    #[arg(long)]
    gateway_ca: PathBuf,
    /// Lines `agent_id forest secret_file`.
    #[arg(long)]
    agents: PathBuf,
    #[arg(long, default_value_t = 64)]
    max_in_flight: u32,
    /// Links started per second (so thousands of TLS handshakes do not all land at once).
    #[arg(long, default_value_t = 1000)]
    connect_per_sec: u32,
}

/// A directory configuration the no-op writer never uses (the link only needs the forest).
fn unused_directory() -> DirectoryConfig {
    DirectoryConfig {
        urls: vec!["ldaps://unused.invalid".into()],
        ca_file: PathBuf::from("/nonexistent"),
        bind_dn: String::new(),
        bind_password: Secret::new(String::new()),
        base_dn: String::new(),
        pool_size: 1,
        connect_timeout: Duration::from_secs(1),
        use_dc_reason_text: false,
        scope: relay::scope::Scope::default(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = relay::telemetry::init("bench-noop-agent");
    relay::tls::install_crypto_provider();
    let cli = Cli::parse();
    let list = std::fs::read_to_string(&cli.agents)
        .with_context(|| format!("read {}", cli.agents.display()))?;
    let writer: Arc<dyn Writer> = Arc::new(NoopWriter);
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let pause = Duration::from_secs_f64(1.0 / f64::from(cli.connect_per_sec.max(1)));
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            relay::telemetry::shutdown_signal().await;
            shutdown.cancel();
        });
    }
    for line in list.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let (Some(agent_id), Some(forest), Some(secret_file)) =
            (parts.next(), parts.next(), parts.next())
        else {
            anyhow::bail!(
                "bad line in {}: want `agent_id forest secret_file`",
                cli.agents.display()
            );
        };
        let secret =
            std::fs::read_to_string(secret_file).with_context(|| format!("read {secret_file}"))?;
        let config = AgentConfig {
            gateway_url: cli.gateway_url.clone(),
            gateway_ca: cli.gateway_ca.clone(),
            gateway_tls_name: None,
            agent_id: agent_id.to_owned(),
            agent_secret: Some(Secret::new(secret.trim().to_owned())),
            forest: forest.to_owned(),
            extra_domains: Vec::new(),
            metrics_listen: None,
            max_in_flight: cli.max_in_flight,
            directory: unused_directory(),
            state_dir: None,
        };
        let agent = Agent::with_writer(config, writer.clone())?;
        tasks.spawn(agent.run(shutdown.clone()));
        if shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    eprintln!("bench-noop-agent: {} link(s) started", tasks.len());
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            eprintln!("bench-noop-agent: a link stopped: {e}");
        }
    }
    Ok(())
}
