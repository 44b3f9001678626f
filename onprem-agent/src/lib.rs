//! The on-premises agent: holds an outbound-only bidirectional gRPC stream to the cloud
//! gateway, opens each sealed operation with its forest's key, applies it to Active Directory
//! over LDAPS as a delegated service account, and acknowledges the outcome. It listens on no
//! port (SPEC invariant 5).

pub mod directory;
pub mod doctor;
pub mod link;

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
    pub agent_secret: Secret,
    /// The forest this agent serves, as registered at the gateway.
    pub forest: String,
    /// DNS domains of the forest this agent can write to (reported in its hello).
    pub domains: Vec<String>,
    /// Operations applied at once.
    pub max_in_flight: u32,
    pub directory: directory::DirectoryConfig,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("directory configuration: {0}")]
    Directory(#[from] directory::DirectoryError),
    #[error(transparent)]
    Link(#[from] link::LinkError),
}

/// Runs the agent until `shutdown`: checks the directory once (a failure is logged, not
/// fatal: the DC may come up later), then stays connected to the gateway.
///
/// # Errors
/// On configuration errors that retrying cannot fix.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    relay::tls::install_crypto_provider();
    let directory = directory::Directory::new(config.directory.clone())?;
    match directory.check().await {
        Ok(dc) => tracing::info!(%dc, "directory reachable; bound as the service account"),
        Err(e) => {
            tracing::warn!(error = %e, "directory check failed; operations will report DIRECTORY_UNAVAILABLE until it recovers")
        }
    }
    let agent = link::Agent::new(config, directory);
    agent.run(shutdown).await?;
    tracing::info!("agent stopped");
    Ok(())
}
