//! The system under test, as separate processes so each one's CPU and memory can be read from
//! /proc: a real Redis (testkit), the release `cloud-gateway serve`, and agents
//! (`bench-noop-agent`, or the real `onprem-agent run` on a Samba DC). Everything on loopback,
//! stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tonic::transport::Channel;

use cloud_gateway::store::{ForestId, Store, TenantId};
use cloud_gateway::tenants::Tenants;
use relay::envelope::KeyBytes;
use relay::secret::Secret;
use testkit::{RedisServer, TestCa};

/// A child process, killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after `within`.
    pub fn stop(mut self, within: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the workspace's binaries are: beside this one (`target/release` under `make bench`).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory of the running binary")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --release -p cloud-gateway -p onprem-agent -p bench`)",
            path.display()
        );
    }
    Ok(path)
}

/// Redis, TLS material, the store and tenant admin, one tenant, and a gateway process.
pub struct Stack {
    pub redis: RedisServer,
    pub ca: TestCa,
    pub store: Store,
    pub tenants: Tenants,
    pub tenant: String,
    pub token: Secret,
    pub gateway: Option<Proc>,
    pub gateway_addr: std::net::SocketAddr,
    pub agents: Vec<Proc>,
    dir: tempfile::TempDir,
    master_key: KeyBytes,
}

pub fn tenant_id(s: &str) -> TenantId {
    TenantId::new(s).expect("a valid tenant id")
}

pub fn forest_id(s: &str) -> ForestId {
    ForestId::new(s).expect("a valid forest name")
}

impl Stack {
    /// Starts Redis and one gateway replica with the tenant rate limit and the per-user unlock
    /// budget raised out of the way (a benchmark measures the relay, not its abuse limits).
    ///
    /// # Errors
    /// When a component does not start.
    pub async fn start() -> anyhow::Result<Self> {
        relay::tls::install_crypto_provider();
        let redis = RedisServer::start().context("start redis")?;
        let ca = TestCa::new(&["127.0.0.1", "localhost"]).context("test CA")?;
        let master_key = KeyBytes::generate()?;
        let store = Store::connect(&redis.url()).await?;
        let tenants = Tenants::new(store.clone(), master_key.clone());
        let tenant = "bench".to_owned();
        let token = tenants.create_tenant(&tenant_id(&tenant)).await?;
        let mut stack = Self {
            redis,
            ca,
            store,
            tenants,
            tenant,
            token,
            gateway: None,
            gateway_addr: "127.0.0.1:1".parse()?,
            agents: Vec::new(),
            dir: tempfile::tempdir()?,
            master_key,
        };
        stack.start_gateway().await?;
        Ok(stack)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn start_gateway(&mut self) -> anyhow::Result<()> {
        let key_file = self.dir.path().join("master.key");
        relay::secret::write_private(&key_file, &hex::encode(self.master_key.expose()))?;
        let port = testkit::free_port()?;
        let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = std::fs::File::create(self.dir.path().join("gateway.log"))?;
        let audit = self.dir.path().join("audit.jsonl");
        let child = Command::new(bin("cloud-gateway")?)
            .arg("serve")
            .env("WRITEBACK_LISTEN", listen.to_string())
            .env("WRITEBACK_TLS_CERT", self.ca.cert_file())
            .env("WRITEBACK_TLS_KEY", self.ca.key_file())
            .env("REDIS_URL", self.redis.url())
            .env("WRITEBACK_MASTER_KEY_FILE", &key_file)
            .env("WRITEBACK_REPLICA_ID", "bench-gw")
            .env("WRITEBACK_CANARY_INTERVAL_SECS", "0")
            .env("WRITEBACK_TENANT_RATE", "1000000")
            .env("WRITEBACK_TENANT_BURST", "1000000")
            .env("WRITEBACK_USER_UNLOCK_LIMIT", "1000000000")
            .env("WRITEBACK_FOREST_QUEUE_LIMIT", "1000000")
            .env("WRITEBACK_TENANT_QUEUE_LIMIT", "1000000")
            .env("WRITEBACK_AUDIT_LOG", &audit)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn cloud-gateway")?;
        self.gateway = Some(Proc {
            name: "gateway".into(),
            child,
        });
        self.gateway_addr = listen;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.channel().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the gateway did not answer within 30 s (log in {})",
            self.dir.path().join("gateway.log").display()
        )
    }

    pub fn gateway_pid(&self) -> u32 {
        self.gateway.as_ref().map_or(0, Proc::pid)
    }

    pub fn gateway_url(&self) -> String {
        format!("https://{}", self.gateway_addr)
    }

    /// A new TLS channel (one HTTP/2 connection) to the gateway.
    ///
    /// # Errors
    /// When it does not answer.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        crate::load::channel(
            &self.gateway_addr.to_string(),
            &self.ca.ca_file(),
            "127.0.0.1",
        )
        .await
    }

    /// Registers agent `agent_id` for `forest` and writes its secret to a private file.
    ///
    /// # Errors
    /// When the credential cannot be stored.
    pub async fn register(
        &self,
        tenant: &str,
        forest: &str,
        agent_id: &str,
    ) -> anyhow::Result<PathBuf> {
        let secret = self
            .tenants
            .register_agent(&tenant_id(tenant), &forest_id(forest), agent_id)
            .await?;
        let path = self.dir.path().join(format!("{agent_id}.secret"));
        relay::secret::write_private(&path, secret.expose())?;
        Ok(path)
    }

    /// Starts a `bench-noop-agent` process for the agents listed in `agents_file` (lines
    /// `agent_id forest secret_file`), with `max_in_flight` each.
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn spawn_noop_agents(
        &mut self,
        name: &str,
        agents_file: &Path,
        max_in_flight: u32,
    ) -> anyhow::Result<u32> {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let child = Command::new(bin("bench-noop-agent")?)
            .arg("--gateway-url")
            .arg(self.gateway_url())
            .arg("--gateway-ca")
            .arg(self.ca.ca_file())
            .arg("--agents")
            .arg(agents_file)
            .arg("--max-in-flight")
            .arg(max_in_flight.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn bench-noop-agent")?;
        let pid = child.id();
        self.agents.push(Proc {
            name: name.to_owned(),
            child,
        });
        Ok(pid)
    }

    /// One no-op agent of the bench tenant for `forest`; returns its pid.
    ///
    /// # Errors
    /// When it cannot be registered or spawned.
    pub async fn noop_agent(
        &mut self,
        agent_id: &str,
        forest: &str,
        max_in_flight: u32,
    ) -> anyhow::Result<u32> {
        let secret = self
            .register(&self.tenant.clone(), forest, agent_id)
            .await?;
        let list = self.dir.path().join(format!("{agent_id}.agents"));
        std::fs::write(&list, format!("{agent_id} {forest} {}\n", secret.display()))?;
        self.spawn_noop_agents(agent_id, &list, max_in_flight)
    }

    /// Spawns a real `onprem-agent run` with `env` (see `e2e::Sandbox::agent_env`).
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn spawn_agent_process(
        &mut self,
        name: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<u32> {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let child = Command::new(bin("onprem-agent")?)
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn onprem-agent")?;
        let pid = child.id();
        self.agents.push(Proc {
            name: name.to_owned(),
            child,
        });
        Ok(pid)
    }

    /// Waits until `n` agents of (tenant, forest) are live.
    ///
    /// # Errors
    /// When they are not within `within`.
    pub async fn wait_agents(
        &self,
        tenant: &str,
        forest: &str,
        n: u64,
        within: Duration,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while start.elapsed() < within {
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
        bail!("{n} agent(s) of {tenant}/{forest} did not connect within {within:?}")
    }

    /// Stops the agents, then the gateway.
    pub fn stop(mut self) {
        for a in self.agents.drain(..) {
            a.stop(Duration::from_secs(10));
        }
        if let Some(g) = self.gateway.take() {
            g.stop(Duration::from_secs(25));
        }
    }

    /// Stops the agent processes named `name`.
    pub fn stop_agents(&mut self, name: &str) {
        let (gone, keep): (Vec<Proc>, Vec<Proc>) =
            self.agents.drain(..).partition(|a| a.name == name);
        self.agents = keep;
        for a in gone {
            a.stop(Duration::from_secs(20));
        }
    }
}

/// One `INFO` section of the Redis at `url` as (field, value) pairs.
///
/// # Errors
/// When Redis does not answer.
pub async fn redis_info(url: &str, section: &str) -> anyhow::Result<Vec<(String, String)>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

/// One numeric field of an INFO answer.
pub fn info_u64(info: &[(String, String)], key: &str) -> u64 {
    info.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `INFO commandstats` as (command, calls).
///
/// # Errors
/// When Redis does not answer.
pub async fn command_calls(url: &str) -> anyhow::Result<Vec<(String, u64)>> {
    Ok(redis_info(url, "commandstats")
        .await?
        .into_iter()
        .filter_map(|(k, v)| {
            let cmd = k.strip_prefix("cmdstat_")?.to_owned();
            let calls = v
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((cmd, calls))
        })
        .collect())
}
