//! The cloud gateway: takes password operations over gRPC (`writeback.v1.Writeback`), seals
//! them per tenant, queues them in Redis, hands them to on-premises agents over their
//! outbound streams (`writeback.v1.AgentLink`) and returns each caller its outcome, whichever
//! replica holds the agent's stream.

pub mod admin;
pub mod agent_link;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod enroll;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod monitor;
pub mod store;
pub mod sweeper;
pub mod tenants;
pub mod validate;
pub mod waiters;
pub mod writeback;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use relay::envelope::KeyBytes;
use relay::proto::agent_enrollment_server::AgentEnrollmentServer;
use relay::proto::agent_link_server::AgentLinkServer;
use relay::proto::writeback_server::WritebackServer;

use crate::store::{ForestId, Store, TenantId};
use crate::tenants::Tenants;
use crate::waiters::Waiters;

/// Everything a gateway replica needs to run. Built by `main` from flags and environment.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Name of this replica (pod name); callers' outcomes are routed to it.
    pub replica_id: String,
    pub redis_url: String,
    /// TLS files, password file and replica acknowledgments for Redis.
    pub redis: store::RedisOptions,
    /// MACs the records that admit callers and agents; derives the key that signs every
    /// operation. Opens no password.
    pub master_key: KeyBytes,
    /// During a master-key rotation, the previous master key: records MACed and work signed
    /// under it are still accepted (`admin rotate-master-key` re-MACs the records).
    pub previous_master_key: Option<KeyBytes>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Wait used when a request has `timeout_ms = 0`.
    pub default_timeout: Duration,
    /// Longest wait a caller may ask for.
    pub max_timeout: Duration,
    /// An agent not heard from for this long is not live.
    pub agent_liveness: Duration,
    /// How often gateway and agent exchange heartbeats. An agent not heard from for two
    /// intervals gets no new work; after three its session is closed (failure detection in
    /// seconds, also without a FIN). Presence in Redis is refreshed at most every
    /// `agent_liveness / 3`, whatever the interval.
    pub heartbeat_interval: Duration,
    /// How long after the deadline a delivered, unacknowledged operation becomes `TIMED_OUT`.
    pub ack_grace: Duration,
    /// How long operation records and timelines are kept.
    pub record_ttl: Duration,
    /// A stream entry pending this long on a consumer is looked at again by another session.
    pub reclaim_idle: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain HTTP), if anywhere.
    pub metrics_listen: Option<String>,
    /// How often each forest's end-to-end canary runs (by one replica holding an agent);
    /// zero turns canaries off.
    pub canary_interval: Duration,
    /// Calls per second and burst allowed per tenant, over all replicas and every RPC
    /// (`None`: unlimited).
    pub tenant_rate: Option<limits::Rate>,
    /// Per-user budgets of wrong old passwords and unlocks, over all replicas.
    pub user_limits: limits::UserLimits,
    /// The agent CA: with it, agents enroll (`AgentEnrollment`) and authenticate by client
    /// certificate (mutual TLS); without it, only by registered secrets.
    pub agent_ca: Option<Arc<enroll::AgentCa>>,
    /// Where audit records go (`audit.rs`; off unless set, `serve` defaults to stdout).
    pub audit: Arc<audit::Audit>,
    /// Most operations one forest's queue holds before Submit answers `RESOURCE_EXHAUSTED`.
    pub forest_queue_limit: u64,
    /// Most unsettled operations one tenant may have over all its forests before Submit
    /// answers `RESOURCE_EXHAUSTED` (other tenants are served as before).
    pub tenant_queue_limit: u64,
    /// Most records of refused requests (no agent, switched off, over a limit, invalid) one
    /// tenant keeps; the oldest go first.
    pub refusal_records_limit: u64,
}

impl GatewayConfig {
    /// Defaults for everything but identity, Redis, key and TLS files.
    pub fn new(
        replica_id: impl Into<String>,
        redis_url: impl Into<String>,
        master_key: KeyBytes,
        tls_cert: PathBuf,
        tls_key: PathBuf,
    ) -> Self {
        Self {
            replica_id: replica_id.into(),
            redis_url: redis_url.into(),
            redis: store::RedisOptions::default(),
            master_key,
            previous_master_key: None,
            tls_cert,
            tls_key,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(120),
            agent_liveness: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(1),
            ack_grace: Duration::from_secs(10),
            record_ttl: Duration::from_secs(7 * 24 * 3600),
            reclaim_idle: Duration::from_secs(30),
            metrics_listen: None,
            canary_interval: Duration::from_secs(30),
            tenant_rate: Some(limits::Rate {
                per_second: 100.0,
                burst: 200.0,
            }),
            forest_queue_limit: 10_000,
            tenant_queue_limit: 50_000,
            refusal_records_limit: 10_000,
            user_limits: limits::UserLimits::default(),
            agent_ca: None,
            audit: Arc::new(audit::Audit::Off),
        }
    }
}

/// State shared by the services of one replica.
#[derive(Clone)]
pub struct Gateway {
    pub config: Arc<GatewayConfig>,
    pub store: Store,
    pub tenants: Tenants,
    pub waiters: Waiters,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Agent streams this replica holds, per (tenant, forest): where it runs canaries.
    pub sessions: Arc<std::sync::Mutex<std::collections::HashMap<(TenantId, ForestId), usize>>>,
    /// Agent streams this replica holds, per agent id: what a revocation or a newer stream of
    /// the same agent closes (`agent_link::AgentStreams`).
    pub agent_streams: Arc<agent_link::AgentStreams>,
    /// The store's clock, by which deadlines are set.
    pub clock: Arc<clock::StoreClock>,
    /// The store marker's epoch as this replica first saw it (set once the store has one): a
    /// store without it, or with another, has lost its data.
    pub epoch: Arc<std::sync::OnceLock<String>>,
}

/// Largest request message (a Submit, an agent frame) the gateway decodes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response message it sends (a long operation listing, a Work frame).
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Concurrent gRPC streams per HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Errors that stop the gateway from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot connect to redis at the configured URL: {0}")]
    Redis(#[from] store::StoreError),
    #[error("tls: {0}")]
    Tls(#[from] relay::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves Writeback, AgentLink, health and reflection on `listener` (TLS) until `shutdown`,
/// then lets agent sessions and waiting callers finish.
///
/// # Errors
/// When Redis is unreachable at start, TLS files are unusable, or the server fails.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    relay::tls::install_crypto_provider();
    let cert = relay::tls::read_pem(&config.tls_cert)?;
    relay::tls::read_certs(&config.tls_cert)?;
    let key = relay::tls::read_key_pem(&config.tls_key)?;
    let identity = Identity::from_pem(cert, key.as_slice());

    let store = Store::connect_with(&config.redis_url, &config.redis)
        .await?
        .for_replica(&config.replica_id);
    let tenants = Tenants::rotating(
        store.clone(),
        config.master_key.clone(),
        config.previous_master_key.clone(),
    );
    let gateway = Gateway {
        config: Arc::new(config),
        store: store.clone(),
        tenants,
        waiters: Waiters::default(),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        sessions: Arc::default(),
        agent_streams: Arc::default(),
        clock: Arc::default(),
        epoch: Arc::default(),
    };
    match store.epoch().await? {
        Some(epoch) => {
            let _ = gateway.epoch.set(epoch);
        }
        None => tracing::warn!(event = "WB1091", "the store has no marker: no tenant was ever created, or it lost its data; callers hear UNAVAILABLE until `cloud-gateway admin create-tenant` runs or the store is restored"),
    }
    gateway.clock.sync(&store).await?;
    gateway
        .tasks
        .spawn(gateway.clock.clone().run(store.clone(), shutdown.clone()));

    gateway.tasks.spawn(gateway.waiters.clone().listen(
        store.clone(),
        gateway.config.replica_id.clone(),
        shutdown.clone(),
    ));
    gateway
        .tasks
        .spawn(agent_link::listen_agent_events(gateway.clone()));
    gateway.tasks.spawn(sweeper::run(gateway.clone()));
    gateway.tasks.spawn(monitor::run(gateway.clone()));
    if let Some(addr) = &gateway.config.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        tracing::info!(addr = ?listener.local_addr().ok(), "metrics at /metrics");
        gateway.tasks.spawn(relay::metrics::serve(
            listener,
            metrics::get().registry.clone(),
            shutdown.clone(),
        ));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WritebackServer<writeback::WritebackService>>()
        .await;
    health_reporter
        .set_serving::<AgentLinkServer<agent_link::AgentLinkService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(relay::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| {
            ServeError::Tls(relay::tls::TlsError::Invalid {
                path: "reflection".into(),
                detail: e.to_string(),
            })
        })?;

    // Callers have no client certificate; enrolled agents present one from the agent CA.
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &gateway.config.agent_ca {
        tls = tls
            .client_ca_root(tonic::transport::Certificate::from_pem(ca.cert_pem()))
            .client_auth_optional(true);
    }
    let enrollment = gateway.config.agent_ca.clone().map(|ca| {
        AgentEnrollmentServer::new(enroll::EnrollmentService::new(gateway.clone(), ca))
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES)
    });
    tracing::info!(event = "WB1030",
        replica = %gateway.config.replica_id,
        addr = ?listener.local_addr().ok(),
        "gateway serving"
    );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let serve_shutdown = shutdown.clone();
    let serve_replica = gateway.config.replica_id.clone();
    let result = Server::builder()
        .layer(auth::AuthLayer::new(gateway.clone()))
        .tls_config(tls)?
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Deliberate limits: streams per connection (a caller's connection, or one agent's),
        // and message sizes (a Submit is a few hundred bytes; an agent's frames a few KB).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            WritebackServer::new(writeback::WritebackService::new(gateway.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        )
        .add_service(
            AgentLinkServer::new(agent_link::AgentLinkService::new(gateway.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        )
        .add_optional_service(enrollment)
        .serve_with_incoming_shutdown(incoming, async move {
            serve_shutdown.cancelled().await;
            // Readiness first: load balancers send new callers and agents elsewhere.
            health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            health_reporter
                .set_not_serving::<AgentLinkServer<agent_link::AgentLinkService>>()
                .await;
            tracing::info!(event = "WB1034", replica = %serve_replica, "draining: readiness NOT_SERVING; agents are told to move once their work is answered");
            health_reporter
                .set_not_serving::<WritebackServer<writeback::WritebackService>>()
                .await;
        })
        .await;
    gateway.tasks.close();
    gateway.tasks.wait().await;
    tracing::info!(event = "WB1031", replica = %gateway.config.replica_id, "gateway stopped");
    Ok(result?)
}
