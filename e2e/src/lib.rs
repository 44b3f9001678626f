//! End-to-end sandbox: real Redis, a real Samba AD DC, real TLS, gateways and agents running
//! as they do in production (the library `run` functions on loopback listeners), and clients
//! that talk to them like the cloud identity service does.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use cloud_gateway::store::Store;
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

/// A running gateway replica.
pub struct GatewayHandle {
    pub replica: String,
    pub addr: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), cloud_gateway::ServeError>>,
}

/// A running agent.
pub struct AgentHandle {
    pub agent_id: String,
    pub forest: String,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), onprem_agent::AgentError>>,
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
    dir: tempfile::TempDir,
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
        relay::tls::install_crypto_provider();
        // Spans get real OpenTelemetry ids, as in production (nothing is exported).
        TELEMETRY.get_or_init(|| relay::telemetry::init("e2e"));
        let redis = RedisServer::start().context("start redis")?;
        let dc = SambaDc::start("CORP.WRITEBACK.TEST").context("start samba")?;
        let ca = TestCa::new(&["127.0.0.1", "localhost"]).context("test CA")?;
        let master_key = KeyBytes::generate()?;
        let store = Store::connect(&redis.url()).await?;
        let tenants = Tenants::new(store.clone(), master_key.clone());
        let tenant = "acme".to_owned();
        let token = tenants.create_tenant(&tenant).await?;
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
        let secret = self
            .tenants
            .register_agent(tenant, forest, agent_id)
            .await?;
        let config = AgentConfig {
            gateway_url: format!("https://{}", self.gateways[gateway].addr),
            gateway_ca: self.ca.ca_file().to_owned(),
            gateway_tls_name: None,
            agent_id: agent_id.to_owned(),
            agent_secret: secret,
            forest: forest.to_owned(),
            extra_domains,
            metrics_listen: None,
            max_in_flight: 8,
            directory,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(onprem_agent::run(config, shutdown.clone()));
        self.agents.push(AgentHandle {
            agent_id: agent_id.to_owned(),
            forest: forest.to_owned(),
            shutdown,
            task,
        });
        Ok(())
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
                .live_agents(tenant, forest, Duration::from_secs(3))
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

    /// Stops gateways and agents.
    pub async fn shutdown(self) {
        for a in &self.agents {
            a.shutdown.cancel();
        }
        for a in self.agents {
            let _ = tokio::time::timeout(Duration::from_secs(15), a.task).await;
        }
        for g in &self.gateways {
            g.shutdown.cancel();
        }
        for g in self.gateways {
            let _ = tokio::time::timeout(Duration::from_secs(15), g.task).await;
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
    }
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

/// Every byte Redis holds: keys and values of every type, streams included.
///
/// # Errors
/// On Redis errors.
pub async fn dump_redis(url: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await?;
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut c).await?;
        let value: redis::Value = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&key).query_async(&mut c).await?,
            "hash" => redis::cmd("HGETALL").arg(&key).query_async(&mut c).await?,
            "list" => {
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await?
            }
            "set" => redis::cmd("SMEMBERS").arg(&key).query_async(&mut c).await?,
            "zset" => {
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await?
            }
            "stream" => {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut c)
                    .await?
            }
            other => bail!("unexpected redis type {other} for {key}"),
        };
        let mut bytes = Vec::new();
        flatten(&value, &mut bytes);
        out.push((key, bytes));
    }
    Ok(out)
}

fn flatten(v: &redis::Value, out: &mut Vec<u8>) {
    match v {
        redis::Value::BulkString(b) => {
            out.extend_from_slice(b);
            out.push(0);
        }
        redis::Value::SimpleString(s) => {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().for_each(|i| flatten(i, out));
        }
        redis::Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        other => out.extend_from_slice(format!("{other:?}").as_bytes()),
    }
}

/// Whether `haystack` holds `needle` as UTF-8 or UTF-16LE.
pub fn contains_secret(haystack: &[u8], needle: &str) -> bool {
    let utf8 = needle.as_bytes();
    let utf16: Vec<u8> = needle.encode_utf16().flat_map(u16::to_le_bytes).collect();
    [utf8, utf16.as_slice()]
        .iter()
        .any(|n| !n.is_empty() && haystack.windows(n.len()).any(|w| w == *n))
}

/// A child process (a gateway or agent binary) with its stderr in a log file; killed on drop.
pub struct Process {
    pub child: std::process::Child,
    log: PathBuf,
}

impl Process {
    /// Spawns `cmd` with stderr to `log`.
    ///
    /// # Panics
    /// When the command cannot be spawned.
    pub fn spawn(cmd: &mut std::process::Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn");
        Self { child, log }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

/// Path of a workspace binary built by `cargo build --workspace --bins` (`make test` does).
///
/// # Errors
/// When it has not been built.
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
    Ok(path)
}

/// Listening TCP sockets (IPv4 and IPv6) owned by process `pid`, from /proc.
///
/// # Errors
/// When /proc cannot be read.
pub fn listening_sockets(pid: u32) -> anyhow::Result<Vec<String>> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(link) = std::fs::read_link(fd?.path()) {
            let l = link.to_string_lossy().into_owned();
            if let Some(inode) = l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address, ..., st (0A = LISTEN), ..., inode at index 9
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                out.push(format!("{table} {}", cols[1]));
            }
        }
    }
    Ok(out)
}
