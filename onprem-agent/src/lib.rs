//! The on-premises agent: holds an outbound-only bidirectional gRPC stream to the cloud
//! gateway, opens each operation sealed to its own key, applies it to Active Directory
//! over LDAPS as a delegated service account, and acknowledges the outcome. It listens on no
//! port (SPEC invariant 5).

pub mod config;
pub mod directory;
pub mod doctor;
pub mod domains;
pub mod identity;
pub mod journal;
pub mod keys;
pub mod link;
pub mod metrics;
pub mod writer;

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use relay::secret::Secret;

/// Everything the agent needs to run. Built by `main` from flags and environment.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `https://host:port` of the gateway's AgentLink service.
    pub gateway_url: String,
    /// PEM CA that signed the gateway's certificate.
    pub gateway_ca: PathBuf,
    /// Name to verify in the gateway's certificate, when it differs from the URL's host.
    pub gateway_tls_name: Option<String>,
    pub agent_id: String,
    /// The registered secret; `None` for an agent that authenticates by its enrolled
    /// certificate (`identity.rs`).
    pub agent_secret: Option<Secret>,
    /// The forest this agent serves, as registered at the gateway.
    pub forest: String,
    /// Further domains of the forest (the primary one is `directory`), each with its DCs.
    pub extra_domains: Vec<domains::DomainConfig>,
    /// Operations applied at once.
    pub max_in_flight: u32,
    pub directory: directory::DirectoryConfig,
    /// Where to serve Prometheus metrics; must be a loopback address (the agent listens on
    /// nothing else).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where the journal and the stable instance id live (`None`: in memory, a new instance
    /// id per process).
    pub state_dir: Option<PathBuf>,
}

impl AgentConfig {
    /// The primary domain (named like the forest) followed by the extra domains.
    pub fn all_domains(&self) -> Vec<domains::DomainConfig> {
        let mut all = vec![domains::DomainConfig {
            dns_name: self.forest.clone(),
            upn_suffixes: Vec::new(),
            directory: self.directory.clone(),
        }];
        all.extend(self.extra_domains.iter().cloned());
        all
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("directory configuration: {0}")]
    Directory(#[from] directory::DirectoryError),
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error(transparent)]
    Start(#[from] link::StartError),
    #[error("metrics address {0} is not a loopback address: the agent listens on nothing reachable from the network")]
    MetricsNotLoopback(std::net::SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown`: checks the directory once (a failure is logged, not
/// fatal: the DC may come up later), then stays connected to the gateway.
///
/// # Errors
/// On configuration errors that retrying cannot fix.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    relay::tls::install_crypto_provider();
    let domains = domains::Domains::new(config.all_domains())?;
    for (domain, check) in domains.check().await {
        match check {
            Ok(dc) => {
                tracing::info!(event = "WB2003", %domain, %dc, "directory reachable; bound as the service account")
            }
            Err(e) => {
                tracing::warn!(event = "WB2004", %domain, error = %e, "directory check failed; operations will report DIRECTORY_UNAVAILABLE until it recovers")
            }
        }
    }
    if let Some(addr) = config.metrics_listen {
        if !addr.ip().is_loopback() {
            return Err(AgentError::MetricsNotLoopback(addr));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Bind { addr, source })?;
        tracing::info!(addr = ?listener.local_addr().ok(), "metrics at /metrics (loopback only)");
        tokio::spawn(relay::metrics::serve(
            listener,
            metrics::get().registry.clone(),
            shutdown.clone(),
        ));
    }
    let agent = link::Agent::new(config, domains)?;
    agent.run(shutdown).await?;
    tracing::info!(event = "WB2030", "agent stopped");
    Ok(())
}
