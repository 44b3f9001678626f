//! End-to-end sandbox: real Redis, a real Samba AD DC, real TLS, gateways and agents running
//! as they do in production (the library `run` functions on loopback listeners), and clients
//! that talk to them like the cloud identity service does.

pub mod otlp;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use cloud_gateway::store::{ForestId, OperationId, Store, TenantId};
use cloud_gateway::tenants::Tenants;
use cloud_gateway::GatewayConfig;
use onprem_agent::directory::DirectoryConfig;
use onprem_agent::AgentConfig;
use relay::envelope::KeyBytes;
use relay::proto::writeback_client::WritebackClient;
use relay::proto::{
    submit_request::Action, ChangePassword, Initiator, ResetPassword, SubmitRequest,
    SubmitResponse, UnlockAccount, UserRef,
};
use relay::secret::Secret;
use testkit::{RedisServer, SambaDc, TestCa};

static TELEMETRY: std::sync::OnceLock<relay::telemetry::Telemetry> = std::sync::OnceLock::new();

/// How long a gateway or agent may take to stop once told to.
pub const STOP_WITHIN: Duration = Duration::from_secs(15);

/// A running gateway replica.
pub struct GatewayHandle {
    pub replica: String,
    pub addr: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), cloud_gateway::ServeError>>,
}

impl GatewayHandle {
    /// Tells the gateway to stop and waits for it.
    ///
    /// # Errors
    /// Naming the replica, when it ends with an error, panics, or is still running after
    /// `within`.
    pub async fn stop(self, within: Duration) -> anyhow::Result<()> {
        self.shutdown.cancel();
        stop_task(&format!("gateway {}", self.replica), self.task, within).await
    }
}

/// A running agent.
pub struct AgentHandle {
    pub agent_id: String,
    pub forest: String,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), onprem_agent::AgentError>>,
}

impl AgentHandle {
    /// Tells the agent to stop and waits for it.
    ///
    /// # Errors
    /// Naming the agent, when it ends with an error, panics, or is still running after
    /// `within`.
    pub async fn stop(self, within: Duration) -> anyhow::Result<()> {
        self.shutdown.cancel();
        stop_task(&format!("agent {}", self.agent_id), self.task, within).await
    }
}

/// Waits up to `within` for the task of component `what` (already told to stop): its error
/// result, its panic and its still running after `within` are each an error naming it.
///
/// # Errors
/// As said.
pub async fn stop_task<E: std::fmt::Display>(
    what: &str,
    mut task: JoinHandle<Result<(), E>>,
    within: Duration,
) -> anyhow::Result<()> {
    match tokio::time::timeout(within, &mut task).await {
        Err(_) => {
            task.abort();
            bail!(
                "{what} did not stop within {:.1} s of being told to",
                within.as_secs_f64()
            )
        }
        Ok(Err(e)) if e.is_panic() => {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(not a string)".to_owned());
            bail!("{what} panicked: {message}")
        }
        Ok(Err(e)) => bail!("{what} was cancelled: {e}"),
        Ok(Ok(Err(e))) => bail!("{what} ended with an error: {e}"),
        Ok(Ok(Ok(()))) => Ok(()),
    }
}

/// Gateways, agents, Redis and a Samba DC for one test.
pub struct Sandbox {
    pub redis: RedisServer,
    pub dc: SambaDc,
    pub ca: TestCa,
    pub master_key: KeyBytes,
    pub store: Store,
    pub tenants: Tenants,
    pub tenant: String,
    pub token: Secret,
    pub forest: String,
    pub gateways: Vec<GatewayHandle>,
    pub agents: Vec<AgentHandle>,
    /// Canaries of gateways started from now on (zero: off, so tests see only their own work).
    pub canary_interval: Duration,
    /// How long each gateway and agent may take to stop in [`Sandbox::shutdown`].
    pub stop_within: Duration,
    /// The agent CA of gateways started from now on (`None`: agents use secrets only).
    pub agent_ca: Option<std::sync::Arc<cloud_gateway::enroll::AgentCa>>,
    dir: tempfile::TempDir,
}

/// A tenant id for the store API (panics on an id that breaks the rule: a test's mistake).
pub fn tenant_id(id: &str) -> TenantId {
    TenantId::new(id).expect("a valid tenant id")
}

/// A forest for the store API (panics on a name that breaks the rule).
pub fn forest_id(name: &str) -> ForestId {
    ForestId::new(name).expect("a valid forest name")
}

/// An operation id for the store API (panics on an id that breaks the rule).
pub fn operation_id(id: &str) -> OperationId {
    OperationId::new(id).expect("a valid operation id")
}

/// The forest name agents of the sandbox's DC serve.
pub fn forest_of(dc: &SambaDc) -> String {
    dc.realm().to_ascii_lowercase()
}

impl Sandbox {
    /// Redis, one Samba DC, a tenant `acme`, and `gateways` replicas (no agents yet).
    ///
    /// # Errors
    /// When a component does not start.
    pub async fn start(gateways: usize) -> anyhow::Result<Self> {
        Self::start_on(gateways, RedisServer::start().context("start redis")?).await
    }

    /// As [`Sandbox::start`], with a durable Redis (AOF fsynced on every write), as
    /// production must run it: a kill -9 and restart of Redis loses nothing.
    ///
    /// # Errors
    /// When a component does not start.
    pub async fn start_durable(gateways: usize) -> anyhow::Result<Self> {
        Self::start_on(
            gateways,
            RedisServer::start_durable().context("start redis")?,
        )
        .await
    }

    async fn start_on(gateways: usize, redis: RedisServer) -> anyhow::Result<Self> {
        relay::tls::install_crypto_provider();
        // Spans get real OpenTelemetry ids, as in production (nothing is exported).
        TELEMETRY.get_or_init(|| relay::telemetry::init("e2e"));
        let dc = SambaDc::start("CORP.WRITEBACK.TEST").context("start samba")?;
        let ca = TestCa::new(&["127.0.0.1", "localhost"]).context("test CA")?;
        let master_key = KeyBytes::generate()?;
        let store = Store::connect(&redis.url()).await?;
        let tenants = Tenants::new(store.clone(), master_key.clone());
        let tenant = "acme".to_owned();
        let token = tenants.create_tenant(&tenant_id(&tenant)).await?;
        let forest = forest_of(&dc);
        let mut sb = Self {
            redis,
            dc,
            ca,
            master_key,
            store,
            tenants,
            tenant,
            token,
            forest,
            gateways: Vec::new(),
            agents: Vec::new(),
            canary_interval: Duration::ZERO,
            stop_within: STOP_WITHIN,
            agent_ca: None,
            dir: tempfile::tempdir()?,
        };
        for i in 0..gateways {
            sb.start_gateway(&format!("gateway-{}", (b'a' + i as u8) as char))
                .await?;
        }
        Ok(sb)
    }

    /// Gateway settings used in tests: short heartbeats so liveness changes show quickly.
    pub fn gateway_config(&self, replica: &str) -> GatewayConfig {
        let mut c = GatewayConfig::new(
            replica,
            self.redis.url(),
            self.master_key.clone(),
            self.ca.cert_file().to_owned(),
            self.ca.key_file().to_owned(),
        );
        c.heartbeat_interval = Duration::from_millis(500);
        c.agent_liveness = Duration::from_secs(3);
        c.ack_grace = Duration::from_secs(2);
        c.reclaim_idle = Duration::from_secs(5);
        c.canary_interval = self.canary_interval;
        c.agent_ca.clone_from(&self.agent_ca);
        c
    }

    /// Starts one more gateway replica on a free loopback port; returns its index.
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn start_gateway(&mut self, replica: &str) -> anyhow::Result<usize> {
        let config = self.gateway_config(replica);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(cloud_gateway::run(config, listener, shutdown.clone()));
        self.gateways.push(GatewayHandle {
            replica: replica.to_owned(),
            addr,
            shutdown,
            task,
        });
        // Ready when TLS + gRPC answer.
        let idx = self.gateways.len() - 1;
        for _ in 0..100 {
            if self.channel(idx).await.is_ok() {
                return Ok(idx);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("gateway {replica} did not come up")
    }

    /// Registers an agent credential and starts the agent against gateway `gateway`, serving
    /// the sandbox DC as `forest`.
    ///
    /// # Errors
    /// When the credential cannot be stored.
    pub async fn start_agent_for(
        &mut self,
        agent_id: &str,
        gateway: usize,
        tenant: &str,
        forest: &str,
    ) -> anyhow::Result<()> {
        let directory = self.directory_config();
        self.start_agent_with(agent_id, gateway, tenant, forest, directory, Vec::new())
            .await
    }

    /// Registers an agent credential and starts the agent against gateway `gateway`, applying
    /// to the directory `directory` (e.g. another forest's DC).
    ///
    /// # Errors
    /// When the credential cannot be stored.
    pub async fn start_agent_with(
        &mut self,
        agent_id: &str,
        gateway: usize,
        tenant: &str,
        forest: &str,
        directory: DirectoryConfig,
        extra_domains: Vec<onprem_agent::domains::DomainConfig>,
    ) -> anyhow::Result<()> {
        let mut config = self.agent_config(agent_id, gateway, tenant, forest).await?;
        config.directory = directory;
        config.extra_domains = extra_domains;
        self.spawn_agent(config);
        Ok(())
    }

    /// Registers an agent credential and returns the configuration of an agent of `tenant`
    /// and `forest` for gateway `gateway` and the sandbox DC, as the tests run it.
    ///
    /// # Errors
    /// When the credential cannot be stored.
    pub async fn agent_config(
        &self,
        agent_id: &str,
        gateway: usize,
        tenant: &str,
        forest: &str,
    ) -> anyhow::Result<AgentConfig> {
        let url = format!("https://{}", self.gateways[gateway].addr);
        self.agent_config_at(agent_id, &url, tenant, forest).await
    }

    /// As [`Sandbox::agent_config`], dialling `gateway_url` (e.g. a load balancer, or a
    /// gateway running as a separate process).
    ///
    /// # Errors
    /// When the credential cannot be stored.
    pub async fn agent_config_at(
        &self,
        agent_id: &str,
        gateway_url: &str,
        tenant: &str,
        forest: &str,
    ) -> anyhow::Result<AgentConfig> {
        let secret = self
            .tenants
            .register_agent(&tenant_id(tenant), &forest_id(forest), agent_id)
            .await?;
        Ok(AgentConfig {
            gateway_url: gateway_url.to_owned(),
            gateway_ca: self.ca.ca_file().to_owned(),
            gateway_tls_name: None,
            agent_id: agent_id.to_owned(),
            agent_secret: Some(secret),
            forest: forest.to_owned(),
            extra_domains: Vec::new(),
            metrics_listen: None,
            max_in_flight: 8,
            directory: self.directory_config(),
            // A durable journal, as production runs it (one per agent id).
            state_dir: Some(self.dir.path().join("agents").join(agent_id)),
        })
    }

    /// Starts an agent with `config` in this process (stopped by [`Sandbox::shutdown`]).
    pub fn spawn_agent(&mut self, config: AgentConfig) {
        let shutdown = CancellationToken::new();
        let (agent_id, forest) = (config.agent_id.clone(), config.forest.clone());
        let task = tokio::spawn(onprem_agent::run(config, shutdown.clone()));
        self.agents.push(AgentHandle {
            agent_id,
            forest,
            shutdown,
            task,
        });
    }

    /// Starts an agent of the sandbox tenant and forest on gateway `gateway`.
    ///
    /// # Errors
    /// As [`Sandbox::start_agent_for`].
    pub async fn start_agent(&mut self, agent_id: &str, gateway: usize) -> anyhow::Result<()> {
        let (tenant, forest) = (self.tenant.clone(), self.forest.clone());
        self.start_agent_for(agent_id, gateway, &tenant, &forest)
            .await
    }

    /// LDAPS settings for an agent of the sandbox DC, binding as the delegated service account.
    pub fn directory_config(&self) -> DirectoryConfig {
        directory_config(&self.dc)
    }

    /// Waits until `n` agents of (tenant, forest) are live at the gateways.
    ///
    /// # Errors
    /// When they do not show up within 20 s.
    pub async fn wait_agents(&self, tenant: &str, forest: &str, n: u64) -> anyhow::Result<()> {
        for _ in 0..200 {
            if self
                .store
                .live_agents(
                    &tenant_id(tenant),
                    &forest_id(forest),
                    Duration::from_secs(3),
                )
                .await?
                >= n
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{n} agent(s) for {tenant}/{forest} did not connect")
    }

    /// A TLS channel to gateway `idx`, verified with the sandbox CA.
    ///
    /// # Errors
    /// When the gateway does not answer.
    pub async fn channel(&self, idx: usize) -> anyhow::Result<Channel> {
        self.channel_to(self.gateways[idx].addr).await
    }

    /// A TLS channel to a gateway at `addr` (e.g. one running as a separate process).
    ///
    /// # Errors
    /// When it does not answer.
    pub async fn channel_to(&self, addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
        let pem = std::fs::read(self.ca.ca_file())?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name("127.0.0.1");
        Ok(Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?)
    }

    /// Waits until the gateway at `addr` answers its gRPC health check SERVING.
    ///
    /// # Errors
    /// When it does not within `within`.
    pub async fn wait_serving(
        &self,
        addr: std::net::SocketAddr,
        within: Duration,
    ) -> anyhow::Result<()> {
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Ok(channel) = self.channel_to(addr).await {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await
                    .map(|r| r.into_inner().status());
                if status.is_ok_and(|s| {
                    s == tonic_health::pb::health_check_response::ServingStatus::Serving
                }) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("gateway at {addr} not SERVING within {within:?}")
    }

    /// A Writeback client on gateway `idx`.
    ///
    /// # Errors
    /// When the gateway does not answer.
    pub async fn client(&self, idx: usize) -> anyhow::Result<WritebackClient<Channel>> {
        Ok(WritebackClient::new(self.channel(idx).await?))
    }

    /// Submits `req` to gateway `idx` with the sandbox tenant's token.
    ///
    /// # Errors
    /// The gRPC status, when the call fails.
    pub async fn submit(
        &self,
        idx: usize,
        req: SubmitRequest,
    ) -> Result<SubmitResponse, tonic::Status> {
        let mut client = self
            .client(idx)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        client
            .submit(authorized(req, self.token.expose()))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Where secret files for spawned processes go.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Writes the master key (64 hex digits, as `cloud-gateway serve` reads it) to
    /// `master.key` in [`Sandbox::dir`] and returns its path.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_master_key(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("master.key");
        relay::secret::write_private(&path, &hex::encode(self.master_key.expose()))
            .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// The environment of a `cloud-gateway serve` process of this sandbox: replica `replica`
    /// listening on `listen`, serving the sandbox's TLS certificate, on the sandbox's Redis,
    /// with the master key in `master_key_file` (see [`Sandbox::write_master_key`]) and
    /// canaries every [`Sandbox::canary_interval`] (zero: off). Callers add what their test
    /// needs (metrics address, log format, `RUST_LOG`, …); a later pair overrides an earlier one.
    pub fn gateway_env(
        &self,
        replica: &str,
        listen: std::net::SocketAddr,
        master_key_file: &Path,
    ) -> Vec<(String, String)> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        [
            ("WRITEBACK_LISTEN", listen.to_string()),
            ("WRITEBACK_TLS_CERT", path(&self.ca.cert_file())),
            ("WRITEBACK_TLS_KEY", path(&self.ca.key_file())),
            ("REDIS_URL", self.redis.url()),
            ("WRITEBACK_MASTER_KEY_FILE", path(master_key_file)),
            ("WRITEBACK_REPLICA_ID", replica.to_owned()),
            (
                "WRITEBACK_CANARY_INTERVAL_SECS",
                self.canary_interval.as_secs().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The environment of an `onprem-agent run` process of the sandbox tenant's forest:
    /// `agent_id`, dialling `gateway_url` (verified with the sandbox CA) with the secret in
    /// `secret_file`, applying to the sandbox DC over LDAPS as the delegated service account
    /// (its password written to `svc.password` in [`Sandbox::dir`]), its journal in
    /// `state_dir`. Callers add what their test needs; a later pair overrides an earlier one.
    ///
    /// # Errors
    /// When the service account's password file cannot be written.
    pub fn agent_env(
        &self,
        agent_id: &str,
        gateway_url: &str,
        secret_file: &Path,
        state_dir: &Path,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let bind_password = self.dir.path().join("svc.password");
        relay::secret::write_private(&bind_password, &self.dc.svc_password())
            .with_context(|| format!("write {}", bind_password.display()))?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        Ok([
            ("AGENT_GATEWAY_URL", gateway_url.to_owned()),
            ("AGENT_GATEWAY_CA", path(&self.ca.ca_file())),
            ("AGENT_ID", agent_id.to_owned()),
            ("AGENT_FOREST", self.forest.clone()),
            ("AGENT_SECRET_FILE", path(secret_file)),
            ("AGENT_LDAP_URLS", self.dc.ldaps_url()),
            ("AGENT_LDAP_CA", path(&self.dc.ca_file())),
            ("AGENT_BIND_DN", self.dc.svc_upn()),
            ("AGENT_BIND_PASSWORD_FILE", path(&bind_password)),
            ("AGENT_BASE_DN", self.dc.base_dn()),
            ("AGENT_STATE_DIR", path(state_dir)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect())
    }

    /// Stops agents, then gateways.
    ///
    /// # Panics
    /// When one of them ends with an error, panics, or does not stop within
    /// [`Sandbox::stop_within`] (the message names each).
    pub async fn shutdown(self) {
        if let Err(e) = self.try_shutdown().await {
            panic!("{e:#}");
        }
    }

    /// Stops agents, then gateways, and says which did not stop cleanly.
    ///
    /// # Errors
    /// Naming every gateway or agent that ended with an error, panicked, or did not stop
    /// within [`Sandbox::stop_within`].
    pub async fn try_shutdown(mut self) -> anyhow::Result<()> {
        let within = self.stop_within;
        let mut failures = Vec::new();
        let agents = std::mem::take(&mut self.agents);
        for a in &agents {
            a.shutdown.cancel();
        }
        for a in agents {
            if let Err(e) = a.stop(within).await {
                failures.push(format!("{e:#}"));
            }
        }
        let gateways = std::mem::take(&mut self.gateways);
        for g in &gateways {
            g.shutdown.cancel();
        }
        for g in gateways {
            if let Err(e) = g.stop(within).await {
                failures.push(format!("{e:#}"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("shutdown of the sandbox failed: {}", failures.join("; "))
        }
    }
}

/// LDAPS settings for an agent of `dc`, binding as the delegated service account.
pub fn directory_config(dc: &SambaDc) -> DirectoryConfig {
    DirectoryConfig {
        urls: vec![dc.ldaps_url()],
        ca_file: dc.ca_file().to_owned(),
        bind_dn: dc.svc_upn(),
        bind_password: Secret::new(dc.svc_password()),
        base_dn: dc.base_dn(),
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
        use_dc_reason_text: true,
        scope: relay::scope::Scope::default(),
    }
}

/// Runs `cmd` and returns its output, panicking with its status, stdout and stderr when it
/// fails (for the tools the packaging tests drive: dpkg, umoci, the build scripts).
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes a secret file `dir/name` owner-only (0600), as secret files must be; returns its path.
///
/// # Panics
/// When it cannot be written.
pub fn write_secret(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    relay::secret::write_private(&path, value)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Adds `authorization: Bearer <token>`.
pub fn authorized<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
}

/// A request for `user` (sAMAccountName, UPN with '@', or GUID) in `forest`.
pub fn request(tenant: &str, forest: &str, user: &str, action: Action) -> SubmitRequest {
    SubmitRequest {
        tenant_id: tenant.to_owned(),
        operation_id: String::new(),
        user: Some(UserRef::from_text(forest, user)),
        initiator: Initiator::EndUser as i32,
        timeout_ms: 20_000,
        action: Some(action),
    }
}

pub fn reset(password: &str) -> Action {
    Action::Reset(ResetPassword {
        new_password: password.to_owned(),
        must_change_at_next_logon: false,
        unlock: false,
    })
}

pub fn change(old: &str, new: &str) -> Action {
    Action::Change(ChangePassword {
        old_password: old.to_owned(),
        new_password: new.to_owned(),
    })
}

pub fn unlock() -> Action {
    Action::Unlock(UnlockAccount {})
}

pub use testkit::redis_dump::{contains_secret, dump_redis};

/// Every secret of `secrets` (name, value) found in any of `sources` (name, bytes), as UTF-8
/// or UTF-16LE: one line "`secret` in `source`" per finding.
pub fn leaks(sources: &[(String, Vec<u8>)], secrets: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (source, bytes) in sources {
        for (name, value) in secrets {
            assert!(
                !value.is_empty(),
                "secret {name} is empty: nothing to look for"
            );
            if contains_secret(bytes, value) {
                out.push(format!("{name} in {source}"));
            }
        }
    }
    out
}

/// A child process (a gateway or agent binary) with its stderr in a log file and its stdout
/// in a file beside it (`<log>.stdout`); killed on drop.
pub struct Process {
    pub child: std::process::Child,
    log: PathBuf,
    stdout: PathBuf,
}

/// The content of a file a process writes, or a panic naming it: a scan of an unreadable log
/// must not pass as a scan of an empty one.
fn read_output(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

impl Process {
    /// Spawns `cmd` with stderr to `log` and stdout to `log` with extension `.stdout`.
    ///
    /// # Panics
    /// When the command cannot be spawned.
    pub fn spawn(cmd: &mut std::process::Command, log: PathBuf) -> Self {
        let stdout = log.with_extension("stdout");
        let err_file = std::fs::File::create(&log).expect("log file");
        let out_file = std::fs::File::create(&stdout).expect("stdout file");
        let child = cmd
            .stdout(out_file)
            .stderr(err_file)
            .spawn()
            .expect("spawn");
        Self { child, log, stdout }
    }

    /// What it wrote to stderr (its log) so far.
    ///
    /// # Panics
    /// When the log cannot be read or is not UTF-8.
    pub fn log(&self) -> String {
        String::from_utf8(read_output(&self.log))
            .unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", self.log.display()))
    }

    /// What it wrote to stdout so far.
    ///
    /// # Panics
    /// When the file cannot be read or is not UTF-8.
    pub fn stdout(&self) -> String {
        String::from_utf8(read_output(&self.stdout))
            .unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", self.stdout.display()))
    }

    /// Everything it wrote so far, stderr then stdout, as bytes.
    ///
    /// # Panics
    /// When either file cannot be read.
    pub fn output(&self) -> Vec<u8> {
        let mut out = read_output(&self.log);
        out.extend_from_slice(&read_output(&self.stdout));
        out
    }

    /// SIGTERM, then its exit status if it exits within `within`.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Path of a workspace binary built by `cargo build --workspace --bins` (`make test` does),
/// refused when it is older than any source it is built from (see [`binary_sources`]): a
/// stale binary would test yesterday's code.
///
/// # Errors
/// When it has not been built, or is stale.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| testkit::workspace_root().join("target"));
    let path = target.join("debug").join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins` first",
            path.display()
        );
    }
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .with_context(|| format!("modification time of {}", path.display()))?;
    let sources = binary_sources(&testkit::workspace_root(), name)?;
    let newer = newer_than(&sources, built)?;
    if !newer.is_empty() {
        let list: Vec<String> = newer.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "{} is older than its sources {}: run `cargo build --workspace --bins` first",
            path.display(),
            list.join(", "),
        );
    }
    Ok(path)
}

/// Those of `sources` modified after `built`.
///
/// # Errors
/// When a source's modification time cannot be read.
pub fn newer_than(sources: &[PathBuf], built: SystemTime) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for s in sources {
        let modified = std::fs::metadata(s)
            .and_then(|m| m.modified())
            .with_context(|| format!("modification time of {}", s.display()))?;
        if modified > built {
            out.push(s.clone());
        }
    }
    Ok(out)
}

/// What binary `bin` of the workspace at `root` is built from: for its package and every
/// workspace crate it depends on (normal and build dependencies, transitively), `build.rs`
/// and every `.rs` and `.proto` under
/// `src/`; and every `.proto` under `proto/` (compiled by relay's build script). Tests,
/// examples and benches are left out: they are not part of the binary, and a change to them
/// does not make cargo relink it.
///
/// # Errors
/// When the manifests cannot be read or no workspace package builds `bin`.
pub fn binary_sources(root: &Path, bin: &str) -> anyhow::Result<Vec<PathBuf>> {
    let members = workspace_members(root)?;
    let builds = |dir: &Path, package: &str| {
        (package == bin && dir.join("src/main.rs").exists())
            || dir.join("src/bin").join(format!("{bin}.rs")).exists()
            || dir.join("src/bin").join(bin).join("main.rs").exists()
    };
    let (package, _) = members
        .iter()
        .find(|(package, dir)| builds(dir, package))
        .with_context(|| format!("no workspace package builds a binary {bin:?}"))?;
    let mut crates = vec![package.clone()];
    let mut todo = vec![package.clone()];
    while let Some(name) = todo.pop() {
        let dir = &members.iter().find(|(p, _)| *p == name).expect("member").1;
        for dep in manifest_dependencies(&dir.join("Cargo.toml"))? {
            if members.iter().any(|(p, _)| *p == dep) && !crates.contains(&dep) {
                crates.push(dep.clone());
                todo.push(dep);
            }
        }
    }
    // Manifests are left out: cargo does not relink a binary for a manifest or lock change
    // that does not affect it, so they would refuse a binary that is up to date.
    let mut files = Vec::new();
    for name in &crates {
        let dir = &members.iter().find(|(p, _)| p == name).expect("member").1;
        if dir.join("build.rs").exists() {
            files.push(dir.join("build.rs"));
        }
        walk(&dir.join("src"), &["rs", "proto"], &mut files)?;
    }
    if root.join("proto").is_dir() {
        walk(&root.join("proto"), &["proto"], &mut files)?;
    }
    Ok(files)
}

/// (package name, directory) of each workspace member.
fn workspace_members(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let manifest = root.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    let list = text
        .split_once("members")
        .and_then(|(_, rest)| rest.split_once('['))
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .with_context(|| format!("no workspace members in {}", manifest.display()))?;
    let mut out = Vec::new();
    for member in list.split(',') {
        let member = member.trim().trim_matches('"');
        if member.is_empty() {
            continue;
        }
        let dir = root.join(member);
        let m = dir.join("Cargo.toml");
        let text = std::fs::read_to_string(&m).with_context(|| format!("read {}", m.display()))?;
        let name = text
            .lines()
            .skip_while(|l| l.trim() != "[package]")
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == "name").then(|| v.trim().trim_matches('"').to_owned())
            })
            .with_context(|| format!("no package name in {}", m.display()))?;
        out.push((name, dir));
    }
    Ok(out)
}

/// Names of the normal and build dependencies a manifest declares (not dev-dependencies).
fn manifest_dependencies(manifest: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            let header = header.trim_end_matches(']').trim();
            // [dependencies], [build-dependencies], [target.'…'.dependencies], and the
            // one-table form [dependencies.foo]
            let table = |t: &str| {
                header == t
                    || header.ends_with(&format!(".{t}"))
                    || header.starts_with(&format!("{t}."))
            };
            in_deps = table("dependencies") || table("build-dependencies");
            if let Some(dep) = header
                .strip_prefix("dependencies.")
                .or_else(|| header.strip_prefix("build-dependencies."))
            {
                out.push(dep.trim_matches('"').to_owned());
                in_deps = false;
            }
            continue;
        }
        if !in_deps || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key: String = line
            .chars()
            .take_while(|c| !matches!(c, '=' | '.' | ' ' | '\t'))
            .collect();
        out.push(key.trim_matches('"').to_owned());
    }
    Ok(out)
}

/// Files under `dir` (recursively) with one of `extensions`.
fn walk(dir: &Path, extensions: &[&str], out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, extensions, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.contains(&e))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Sockets of process `pid` that other processes can reach, from /proc: TCP sockets in LISTEN;
/// UDP sockets that are bound and not connected (they take datagrams from anyone); raw
/// sockets; and unix sockets that accept connections (stream or seqpacket after `listen`) or
/// take datagrams from anyone (bound to a path or an abstract name, not connected). Each as
/// `<table> <local address>` (addresses as /proc spells them, e.g. `0100007F:1F90`), or
/// `/proc/net/unix <path or @abstract> <kind>`. Unnamed socket pairs and connected sockets
/// are not listed.
///
/// # Errors
/// When /proc cannot be read (a missing IPv6 or raw table is taken as empty).
pub fn listening_sockets(pid: u32) -> anyhow::Result<Vec<String>> {
    let mut inodes = std::collections::HashSet::new();
    let fds = format!("/proc/{pid}/fd");
    for fd in std::fs::read_dir(&fds).with_context(|| format!("read {fds}"))? {
        if let Ok(link) = std::fs::read_link(fd?.path()) {
            let l = link.to_string_lossy().into_owned();
            if let Some(inode) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let read_table = |table: &str, optional: bool| -> anyhow::Result<String> {
        match std::fs::read_to_string(table) {
            Ok(text) => Ok(text),
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e).with_context(|| format!("read {table}")),
        }
    };
    let mut out = Vec::new();
    // st: 0A = TCP_LISTEN; 07 = TCP_CLOSE, which for UDP means bound and not connected.
    for (table, optional, listening) in [
        ("/proc/net/tcp", false, Some("0A")),
        ("/proc/net/tcp6", true, Some("0A")),
        ("/proc/net/udp", false, Some("07")),
        ("/proc/net/udp6", true, Some("07")),
        ("/proc/net/udplite", true, Some("07")),
        ("/proc/net/udplite6", true, Some("07")),
        ("/proc/net/raw", true, None),
        ("/proc/net/raw6", true, None),
    ] {
        for line in read_table(table, optional)?.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st, …, inode at index 9
            if cols.len() > 9
                && inodes.contains(cols[9])
                && listening.is_none_or(|st| cols[3] == st)
            {
                out.push(format!("{table} {}", cols[1]));
            }
        }
    }
    const ACCEPTCON: u32 = 0x0001_0000;
    const SS_UNCONNECTED: &str = "01";
    for line in read_table("/proc/net/unix", false)?.lines().skip(1) {
        // Num RefCount Protocol Flags Type St Inode [Path]
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 7 || !inodes.contains(cols[6]) {
            continue;
        }
        let flags = u32::from_str_radix(cols[3], 16).unwrap_or_default();
        let path = cols[7..].join(" ");
        let kind = match cols[4] {
            "0001" => "stream",
            "0002" => "dgram",
            "0005" => "seqpacket",
            other => other,
        };
        let accepts = flags & ACCEPTCON != 0;
        let takes_datagrams = kind == "dgram" && !path.is_empty() && cols[5] == SS_UNCONNECTED;
        if accepts || takes_datagrams {
            let name = if path.is_empty() { "(unnamed)" } else { &path };
            out.push(format!("/proc/net/unix {name} {kind}"));
        }
    }
    Ok(out)
}
