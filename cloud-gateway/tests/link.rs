//! The gateway's queue, delivery and deadline rules with a real Redis, real TLS and a scripted
//! agent speaking `AgentLink` directly, so each rule can be driven precisely.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Streaming};

use cloud_gateway::store::{ForestId, OpState, OperationId, Store, TenantId};
use cloud_gateway::tenants::Tenants;
use cloud_gateway::GatewayConfig;
use relay::envelope::{AgentKey, AgentKeyring, KeyBytes};
use relay::proto::agent_link_client::AgentLinkClient;
use relay::proto::writeback_client::WritebackClient;
use relay::proto::{
    agent_frame, gateway_frame, submit_request::Action, user_ref, Ack, AgentFrame, GatewayFrame,
    Hello, Initiator, Outcome, ResetPassword, SubmitRequest, SubmitResponse, UserRef, Work,
};
use relay::secret::Secret;
use testkit::{RedisServer, TestCa};

const FOREST: &str = "corp.example.test";
static ACME: LazyLock<TenantId> = LazyLock::new(|| TenantId::new("acme").unwrap());
static FOREST_ID: LazyLock<ForestId> = LazyLock::new(|| ForestId::new(FOREST).unwrap());

fn op(id: &str) -> OperationId {
    OperationId::new(id).unwrap()
}
const LIMITS: cloud_gateway::store::QueueLimits = cloud_gateway::store::QueueLimits {
    forest: 100,
    tenant: 100,
};

struct Env {
    redis: std::sync::Mutex<RedisServer>,
    ca: TestCa,
    key: KeyBytes,
    addr: std::net::SocketAddr,
    store: Store,
    tenants: Tenants,
    token: Secret,
    shutdown: CancellationToken,
}

async fn start() -> Env {
    start_configured(|_| {}).await
}

async fn start_configured(configure: impl FnOnce(&mut GatewayConfig)) -> Env {
    start_on(RedisServer::start().unwrap(), configure).await
}

async fn start_on(redis: RedisServer, configure: impl FnOnce(&mut GatewayConfig)) -> Env {
    relay::tls::install_crypto_provider();
    let ca = TestCa::new(&["127.0.0.1"]).unwrap();
    let key = KeyBytes::generate().unwrap();
    let mut config = GatewayConfig::new(
        "gw-1",
        redis.url(),
        key.clone(),
        ca.cert_file(),
        ca.key_file(),
    );
    config.heartbeat_interval = Duration::from_millis(300);
    config.agent_liveness = Duration::from_secs(2);
    config.ack_grace = Duration::from_millis(1500);
    config.reclaim_idle = Duration::from_secs(1);
    // The scripted agent answers only what the test sends.
    config.canary_interval = Duration::ZERO;
    configure(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(cloud_gateway::run(config, listener, shutdown.clone()));
    let store = Store::connect(&redis.url()).await.unwrap();
    let tenants = Tenants::new(store.clone(), key.clone());
    let token = tenants.create_tenant(&ACME).await.unwrap();
    let env = Env {
        redis: std::sync::Mutex::new(redis),
        ca,
        key,
        addr,
        store,
        tenants,
        token,
        shutdown,
    };
    for _ in 0..100 {
        if env.channel().await.is_ok() {
            return env;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not answer on {addr} within 5 s");
}

impl Env {
    async fn channel(&self) -> anyhow::Result<Channel> {
        self.channel_to(self.addr).await
    }

    async fn channel_to(&self, addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.ca.ca_file())?))
            .domain_name("127.0.0.1");
        Ok(Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await?)
    }

    /// A channel to `addr` presenting a client certificate.
    async fn channel_with_identity(
        &self,
        addr: std::net::SocketAddr,
        (cert, key): &(String, String),
    ) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.ca.ca_file())?))
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .domain_name("127.0.0.1");
        Ok(Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await?)
    }

    /// Starts another replica on the same store and master key (stopped with the first).
    async fn start_replica(&self, name: &str) -> std::net::SocketAddr {
        self.start_replica_with(name, |_| {}).await
    }

    /// [`Env::start_replica`], configured further by `configure`.
    async fn start_replica_with(
        &self,
        name: &str,
        configure: impl FnOnce(&mut GatewayConfig),
    ) -> std::net::SocketAddr {
        let mut config = GatewayConfig::new(
            name,
            self.redis.lock().unwrap().url(),
            self.key.clone(),
            self.ca.cert_file(),
            self.ca.key_file(),
        );
        config.heartbeat_interval = Duration::from_millis(300);
        config.agent_liveness = Duration::from_secs(2);
        config.canary_interval = Duration::ZERO;
        configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(cloud_gateway::run(config, listener, self.shutdown.clone()));
        for _ in 0..100 {
            if self.channel_to(addr).await.is_ok() {
                return addr;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("replica {name} did not answer on {addr} within 5 s");
    }

    async fn submit(&self, op_id: &str, timeout_ms: u32) -> Result<SubmitResponse, tonic::Status> {
        self.submit_as("acme", self.token.expose(), op_id, timeout_ms)
            .await
    }

    /// A reset of alice for `tenant` with its `token`.
    async fn submit_as(
        &self,
        tenant: &str,
        token: &str,
        op_id: &str,
        timeout_ms: u32,
    ) -> Result<SubmitResponse, tonic::Status> {
        let mut req = reset_of("alice", op_id, timeout_ms);
        req.tenant_id = tenant.into();
        self.send(req, token).await
    }

    /// A reset of `sam` as operation `op_id` (5 s) for tenant acme.
    async fn submit_as_user(
        &self,
        sam: &str,
        op_id: &str,
    ) -> Result<SubmitResponse, tonic::Status> {
        self.send(reset_of(sam, op_id, 5000), self.token.expose())
            .await
    }

    /// Submits `req` with `token`.
    async fn send(&self, req: SubmitRequest, token: &str) -> Result<SubmitResponse, tonic::Status> {
        self.send_to(self.addr, req, token).await
    }

    /// Submits `req` with `token` to the replica at `addr`.
    async fn send_to(
        &self,
        addr: std::net::SocketAddr,
        req: SubmitRequest,
        token: &str,
    ) -> Result<SubmitResponse, tonic::Status> {
        let mut c = WritebackClient::new(self.channel_to(addr).await.unwrap());
        let mut req = tonic::Request::new(req);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        c.submit(req).await.map(tonic::Response::into_inner)
    }
}

/// A reset of `sam` in [`FOREST`] for tenant acme.
fn reset_of(sam: &str, op_id: &str, timeout_ms: u32) -> SubmitRequest {
    SubmitRequest {
        tenant_id: "acme".into(),
        operation_id: op_id.into(),
        user: Some(UserRef {
            forest: FOREST.into(),
            id: Some(user_ref::Id::SamAccountName(sam.into())),
        }),
        initiator: Initiator::EndUser as i32,
        timeout_ms,
        action: Some(Action::Reset(ResetPassword {
            new_password: "Scripted#Pass1".into(),
            ..Default::default()
        })),
    }
}

/// Tenant globex, created now, is answered as usual (AGENT_UNAVAILABLE: it has no agent), not
/// held up by what limits acme.
async fn another_tenant_is_served(env: &Env) {
    let globex = env
        .tenants
        .create_tenant(&TenantId::new("globex").unwrap())
        .await
        .unwrap();
    let r = env
        .submit_as("globex", globex.expose(), "other-tenant", 1000)
        .await
        .unwrap();
    assert_eq!(
        Outcome::try_from(r.outcome).unwrap(),
        Outcome::AgentUnavailable
    );
}

/// A scripted agent instance's sealing key: derived from its name, so a reconnecting instance
/// announces the same key (as a real agent reads it from its state directory).
fn instance_key(instance: &str) -> AgentKey {
    let seed = ring::digest::digest(&ring::digest::SHA256, instance.as_bytes());
    AgentKey::from_secret(&KeyBytes::from_slice(seed.as_ref()).unwrap()).unwrap()
}

/// An agent under the test's control. Dropping it ends its stream (its heartbeats stop and
/// its sender goes), as an agent process exiting would.
struct ScriptedAgent {
    /// Its sealing keys (the same for every connection of one instance name).
    keys: AgentKeyring,
    /// The gateway's signing keys, as its Welcome gave them.
    signing_keys: Vec<Vec<u8>>,
    tx: mpsc::Sender<AgentFrame>,
    rx: Streaming<GatewayFrame>,
    heartbeats: tokio::task::JoinHandle<()>,
    /// The tenant its Welcome named.
    tenant: String,
}

impl Drop for ScriptedAgent {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl ScriptedAgent {
    async fn connect(
        env: &Env,
        agent_id: &str,
        secret: &str,
        forest: &str,
        instance: &str,
        max_in_flight: u32,
    ) -> Result<Self, tonic::Status> {
        Self::connect_via(
            env,
            env.addr,
            agent_id,
            secret,
            forest,
            instance,
            max_in_flight,
        )
        .await
    }

    /// [`ScriptedAgent::connect`] to the replica at `addr`.
    async fn connect_via(
        env: &Env,
        addr: std::net::SocketAddr,
        agent_id: &str,
        secret: &str,
        forest: &str,
        instance: &str,
        max_in_flight: u32,
    ) -> Result<Self, tonic::Status> {
        let channel = env.channel_to(addr).await.unwrap();
        Self::connect_on(
            channel,
            Some(secret),
            agent_id,
            forest,
            instance,
            max_in_flight,
        )
        .await
    }

    /// Connects with a client certificate (`cert_pem`, `key_pem`) and no bearer secret.
    async fn connect_enrolled(
        env: &Env,
        identity: &(String, String),
        agent_id: &str,
        instance: &str,
    ) -> Result<Self, tonic::Status> {
        let channel = env
            .channel_with_identity(env.addr, identity)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
        Self::connect_on(channel, None, agent_id, FOREST, instance, 4).await
    }

    async fn connect_on(
        channel: Channel,
        secret: Option<&str>,
        agent_id: &str,
        forest: &str,
        instance: &str,
        max_in_flight: u32,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let key = instance_key(instance);
        let key_id = key.public().id().to_owned();
        tx.send(AgentFrame {
            frame: Some(agent_frame::Frame::Hello(Hello {
                agent_id: agent_id.into(),
                forest: forest.into(),
                domains: vec![],
                version: "test".into(),
                max_in_flight,
                instance_id: instance.into(),
                probe: false,
                sealing_key: key.public().as_bytes().to_vec(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(secret) = secret {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {agent_id}.{secret}").parse().unwrap(),
            );
        }
        let mut client = AgentLinkClient::new(channel);
        let mut inbound = client.connect(req).await?.into_inner();
        let (signing_keys, tenant) = match inbound.message().await? {
            Some(GatewayFrame {
                frame: Some(gateway_frame::Frame::Welcome(w)),
            }) => {
                assert_eq!(w.sealing_key_id, key_id);
                let keys = std::iter::once(w.operation_signing_key)
                    .chain(w.previous_signing_keys)
                    .collect();
                (keys, w.tenant_id)
            }
            other => panic!("expected welcome, got {other:?}"),
        };
        // keep presence fresh
        let hb = tx.clone();
        let heartbeats = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let f = AgentFrame {
                    frame: Some(agent_frame::Frame::Heartbeat(Default::default())),
                };
                if hb.send(f).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            keys: AgentKeyring::new(key, Vec::new()),
            signing_keys,
            tx,
            rx: inbound,
            heartbeats,
            tenant,
        })
    }

    /// The next Work frame within `within`, skipping heartbeats; `None` when none came in that
    /// time on a stream that stayed open.
    ///
    /// # Panics
    /// When the gateway ends the stream or it fails: "nothing delivered" must not pass because
    /// the gateway dropped the agent.
    /// How long until the gateway ends this stream (`None`: still open after `within`).
    async fn closed_within(&mut self, within: Duration) -> Option<Duration> {
        let start = tokio::time::Instant::now();
        loop {
            match tokio::time::timeout_at(start + within, self.rx.message()).await {
                Err(_) => return None,
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None) | Err(_)) => return Some(start.elapsed()),
            }
        }
    }

    /// Asserts that the gateway ends this stream within a second (waiting up to three).
    async fn closes_within_a_second(&mut self, what: &str) {
        let took = self.closed_within(Duration::from_secs(3)).await;
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(1)),
            "{what} closed after {took:?}"
        );
    }

    async fn next_work(&mut self, within: Duration) -> Option<Work> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => return None,
                Ok(Ok(Some(msg))) => msg,
                Ok(Ok(None)) => panic!("the gateway closed the agent stream"),
                Ok(Err(status)) => panic!("the agent stream failed: {status:?}"),
            };
            if let Some(gateway_frame::Frame::Work(w)) = msg.frame {
                return Some(w);
            }
        }
    }

    /// Opens work as the agent does: with the Welcome's signing keys and its own key.
    fn open(&self, work: &Work) -> Result<Vec<u8>, relay::envelope::EnvelopeError> {
        let binding = relay::envelope::Binding {
            tenant_id: &work.tenant_id,
            forest: &work.forest,
            operation_id: &work.operation_id,
            deadline_unix_ms: work.deadline_unix_ms,
            traceparent: &work.traceparent,
        };
        self.keys
            .open(
                &self.signing_keys,
                &binding,
                work.key_version,
                &work.envelope,
            )
            .map(|p| p.to_vec())
    }

    async fn ack(&self, op: &str, outcome: Outcome) {
        let ack = Ack {
            operation_id: op.into(),
            outcome: outcome as i32,
            message: "done".into(),
            ..Default::default()
        };
        self.tx
            .send(AgentFrame {
                frame: Some(agent_frame::Frame::Ack(ack)),
            })
            .await
            .unwrap();
    }
}

/// Registers agent `a1` and connects it as `instance`, live once this returns.
async fn connected_agent(
    env: &Env,
    instance: &str,
    max_in_flight: u32,
) -> (ScriptedAgent, relay::secret::Secret) {
    let secret = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a1")
        .await
        .unwrap();
    let agent = ScriptedAgent::connect(env, "a1", secret.expose(), FOREST, instance, max_in_flight)
        .await
        .unwrap();
    assert_eq!(agent.tenant, "acme");
    wait_live(env).await;
    (agent, secret)
}

async fn wait_live(env: &Env) {
    for _ in 0..50 {
        if env
            .store
            .live_agents(&ACME, &FOREST_ID, Duration::from_secs(2))
            .await
            .unwrap()
            > 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("agent never became live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_must_authenticate_for_their_own_forest() {
    let env = start().await;
    let secret = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a1")
        .await
        .unwrap();
    let err = ScriptedAgent::connect(&env, "a1", "wrong-secret", FOREST, "i1", 1)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = ScriptedAgent::connect(&env, "a1", secret.expose(), "other.forest.test", "i1", 1)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("registered for forest"),
        "{}",
        err.message()
    );
    ScriptedAgent::connect(&env, "a1", secret.expose(), FOREST, "i1", 1)
        .await
        .unwrap();
    env.shutdown.cancel();
}

/// Revocation bites at once: the agent's stream on another replica closes within a second,
/// it cannot reconnect (told it was revoked), and `list-agents` shows it revoked. A rotated
/// secret cuts off the old one the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_or_rotated_agent_is_cut_off_within_a_second_on_every_replica() {
    let env = start().await;
    let other = env.start_replica("gw-2").await;
    let secret = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a1")
        .await
        .unwrap();
    let mut agent = ScriptedAgent::connect_via(&env, other, "a1", secret.expose(), FOREST, "i1", 1)
        .await
        .unwrap();
    // Rotation: the old secret's stream closes, the old secret is refused, the new one works.
    let rotated = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a1")
        .await
        .unwrap();
    agent.closes_within_a_second("the rotated-out stream").await;
    let err = ScriptedAgent::connect_via(&env, other, "a1", secret.expose(), FOREST, "i1", 1)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut agent =
        ScriptedAgent::connect_via(&env, other, "a1", rotated.expose(), FOREST, "i1", 1)
            .await
            .unwrap();

    env.tenants.revoke_agent(&ACME, "a1").await.unwrap();
    // Nothing is sealed to it from the moment revoke returns, before its stream closes.
    let keys = env
        .tenants
        .recipients(&ACME, &FOREST_ID, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        keys.is_empty(),
        "a revoked agent is still sealed to: {keys:?}"
    );
    agent
        .closes_within_a_second("the revoked agent's stream")
        .await;
    for addr in [env.addr, other] {
        let err = ScriptedAgent::connect_via(&env, addr, "a1", rotated.expose(), FOREST, "i1", 1)
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("was revoked"), "{}", err.message());
    }
    let listed = env
        .tenants
        .list_agents(&ACME, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].revoked_at_unix_ms.is_some(), "{listed:?}");
    assert!(
        env.tenants
            .revoke_agent(&TenantId::new("globex").unwrap(), "a1")
            .await
            .is_err(),
        "another tenant cannot revoke it"
    );
    env.shutdown.cancel();
}

/// One stream per agent identity: a second instance connecting (here on another replica)
/// closes the first within a second; the second keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_stream_of_one_agent_closes_the_older_one() {
    let env = start().await;
    let other = env.start_replica("gw-2").await;
    let (mut first, secret) = connected_agent(&env, "i1", 1).await;
    let mut second =
        ScriptedAgent::connect_via(&env, other, "a1", secret.expose(), FOREST, "i2", 1)
            .await
            .unwrap();
    first.closes_within_a_second("the older stream").await;
    assert_eq!(
        second.closed_within(Duration::from_millis(1500)).await,
        None,
        "the newer stream stays"
    );
    env.shutdown.cancel();
}

/// Agent ids are the tenant's own: two tenants each register an agent `dc1.corp` (a dot in the
/// id works); each authenticates as its own tenant's, one stream of each stays open side by
/// side, and rotating or revoking one leaves the other connected. A credential record from
/// before per-tenant ids (the global `wb:agentcred:<id>`) still admits its agent and moves to
/// the tenant's key when the agent is registered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_ids_are_per_tenant() {
    let env = start().await;
    let globex = TenantId::new("globex").unwrap();
    env.tenants.create_tenant(&globex).await.unwrap();
    let id = "dc1.corp";
    let ours = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, id)
        .await
        .unwrap();
    let theirs = env
        .tenants
        .register_agent(&globex, &FOREST_ID, id)
        .await
        .unwrap();
    let mut acme_agent = ScriptedAgent::connect(&env, id, ours.expose(), FOREST, "i1", 1)
        .await
        .unwrap();
    let mut globex_agent = ScriptedAgent::connect(&env, id, theirs.expose(), FOREST, "i1", 1)
        .await
        .unwrap();
    assert_eq!(
        (acme_agent.tenant.as_str(), globex_agent.tenant.as_str()),
        ("acme", "globex")
    );
    assert_eq!(
        acme_agent.closed_within(Duration::from_millis(1500)).await,
        None,
        "the other tenant's agent of the same id closed this one's stream"
    );
    // Work for acme reaches acme's agent.
    wait_live(&env).await;
    let submit = {
        let env = &env;
        async move { env.submit("per-tenant-1", 5000).await }
    };
    let (answer, work) = tokio::join!(submit, async {
        let work = acme_agent.next_work(Duration::from_secs(5)).await.unwrap();
        acme_agent.ack(&work.operation_id, Outcome::Applied).await;
        work
    });
    assert_eq!(work.tenant_id, "acme");
    assert_eq!(
        Outcome::try_from(answer.unwrap().outcome).unwrap(),
        Outcome::Applied
    );

    // Rotating globex's secret closes globex's stream only; its old secret finds nothing.
    let rotated = env
        .tenants
        .register_agent(&globex, &FOREST_ID, id)
        .await
        .unwrap();
    globex_agent
        .closes_within_a_second("the rotated agent's stream")
        .await;
    let err = ScriptedAgent::connect(&env, id, theirs.expose(), FOREST, "i2", 1)
        .await
        .err()
        .unwrap();
    assert!(
        err.message()
            .contains("no agent \"dc1.corp\" holds this secret"),
        "{}",
        err.message()
    );
    // Revoking globex's agent leaves acme's connected and registered.
    let globex_agent = ScriptedAgent::connect(&env, id, rotated.expose(), FOREST, "i2", 1)
        .await
        .unwrap();
    drop(globex_agent);
    env.tenants.revoke_agent(&globex, id).await.unwrap();
    let err = ScriptedAgent::connect(&env, id, rotated.expose(), FOREST, "i2", 1)
        .await
        .err()
        .unwrap();
    assert!(err.message().contains("was revoked"), "{}", err.message());
    assert_eq!(
        acme_agent.closed_within(Duration::from_millis(1500)).await,
        None,
        "revoking globex's agent closed acme's"
    );
    let listed = env
        .tenants
        .list_agents(&ACME, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].revoked_at_unix_ms, None, "{listed:?}");
    drop(acme_agent);

    // A legacy record: as a gateway before per-tenant ids wrote it (global key, no index).
    let client = redis::Client::open(env.redis.lock().unwrap().url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let old = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "old1")
        .await
        .unwrap();
    let old_sha = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        old.expose().as_bytes(),
    ));
    let _: () = redis::cmd("RENAME")
        .arg("wb:{acme}:agentcred:old1")
        .arg("wb:agentcred:old1")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("wb:agentsecret:{old_sha}"))
        .query_async(&mut c)
        .await
        .unwrap();
    let legacy = ScriptedAgent::connect(&env, "old1", old.expose(), FOREST, "i3", 1)
        .await
        .unwrap();
    assert_eq!(legacy.tenant, "acme");
    drop(legacy);
    // Another tenant cannot reach it through the legacy key.
    assert!(env.tenants.revoke_agent(&globex, "old1").await.is_err());
    let again = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "old1")
        .await
        .unwrap();
    let (legacy_left, moved): (bool, bool) = redis::pipe()
        .exists("wb:agentcred:old1")
        .exists("wb:{acme}:agentcred:old1")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((legacy_left, moved), (false, true));
    ScriptedAgent::connect(&env, "old1", again.expose(), FOREST, "i3", 1)
        .await
        .unwrap();
    env.shutdown.cancel();
}

/// What an agent or a caller sends is bounded: an agent's overlong version string is refused
/// naming the field (it would be stored on every heartbeat), and an oversized request is
/// refused before it is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_agent_fields_and_requests_are_refused() {
    let env = start().await;
    let secret = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a1")
        .await
        .unwrap();
    let hello = |version: String| Hello {
        agent_id: "a1".into(),
        forest: FOREST.into(),
        version,
        max_in_flight: 1,
        instance_id: "i1".into(),
        sealing_key: instance_key("i1").public().as_bytes().to_vec(),
        ..Default::default()
    };
    let open = |h: Hello| {
        let env = &env;
        let secret = secret.expose().to_owned();
        async move {
            let (tx, rx) = mpsc::channel(1);
            tx.send(AgentFrame {
                frame: Some(agent_frame::Frame::Hello(h)),
            })
            .await
            .unwrap();
            let mut req = tonic::Request::new(ReceiverStream::new(rx));
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer a1.{secret}").parse().unwrap(),
            );
            let mut client = AgentLinkClient::new(env.channel().await.unwrap());
            let mut inbound = client.connect(req).await?.into_inner();
            inbound.message().await.map(|_| ())
        }
    };
    let err = open(hello("v".repeat(1000))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hello.version"), "{}", err.message());
    let err = open(hello("v".repeat(200_000))).await.unwrap_err();
    assert!(err.message().contains("too large"), "{err:?}");
    let mut huge = reset_of(&"x".repeat(100_000), "huge-1", 1000);
    huge.tenant_id = "acme".into();
    let err = env.send(huge, env.token.expose()).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    // A normal one still goes through.
    open(hello("0.1.0".into())).await.unwrap();
    env.shutdown.cancel();
}

/// The end user's message is the gateway's: an agent's own text (a forged "sign in at ..."
/// link) never reaches the caller; a policy rejection is worded from the rule and the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_hear_the_gateways_words_never_an_agents() {
    let env = start().await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 4).await;
    let forged = "Done! Now sign in at http://evil.example/verify to confirm.";
    let tx = agent.tx.clone();
    let send = |ack: Ack| {
        let tx = tx.clone();
        async move {
            tx.send(AgentFrame {
                frame: Some(agent_frame::Frame::Ack(ack)),
            })
            .await
            .unwrap();
        }
    };
    let (answer, ()) = tokio::join!(env.submit("words-1", 5000), async {
        let w = agent.next_work(Duration::from_secs(3)).await.expect("work");
        send(Ack {
            operation_id: w.operation_id,
            outcome: Outcome::Applied as i32,
            message: forged.into(),
            ..Default::default()
        })
        .await;
    });
    let answer = answer.unwrap();
    assert_eq!(answer.message, "Your password was changed.");
    let (answer, ()) = tokio::join!(env.submit("words-2", 5000), async {
        let w = agent.next_work(Duration::from_secs(3)).await.expect("work");
        send(Ack {
            operation_id: w.operation_id,
            outcome: Outcome::RejectedByPolicy as i32,
            policy_violation: relay::proto::PolicyViolation::TooShort as i32,
            message: forged.into(),
            policy: Some(relay::proto::PasswordPolicy {
                min_length: 12,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    });
    let answer = answer.unwrap();
    assert!(
        answer.message.contains("at least 12 characters") && !answer.message.contains("evil"),
        "{answer:?}"
    );
    let rec = env
        .store
        .operation(&ACME, &op("words-2"))
        .await
        .unwrap()
        .unwrap();
    assert!(!rec.message.contains("evil"), "{rec:?}");
    env.shutdown.cancel();
}

/// Redis is storage, not a trust root: token and agent-credential records written by someone
/// with access to Redis only (or copied to another key) admit nobody, and a forest switch
/// flipped there is not obeyed (the forest is off until an admin sets it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_token_and_credential_records_are_refused() {
    let env = start().await;
    let secret = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a1")
        .await
        .unwrap();
    let sha = |s: &str| hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()));
    let client = redis::Client::open(env.redis.lock().unwrap().url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let token_record = |hash: &str| format!("wb:token:{hash}");
    // The real token works (no agent yet: AGENT_UNAVAILABLE, not UNAUTHENTICATED).
    let ok = env.submit("sealed-1", 500).await.unwrap();
    assert_eq!(
        Outcome::try_from(ok.outcome).unwrap(),
        Outcome::AgentUnavailable
    );
    let real: String = redis::cmd("GET")
        .arg(token_record(&sha(env.token.expose())))
        .query_async(&mut c)
        .await
        .unwrap();
    let real_mac = real.split_once(' ').unwrap().1.to_owned();
    for planted in ["acme".to_owned(), format!("acme {real_mac}")] {
        let _: () = redis::cmd("SET")
            .arg(token_record(&sha("wbt_planted")))
            .arg(&planted)
            .query_async(&mut c)
            .await
            .unwrap();
        let err = env
            .submit_as("acme", "wbt_planted", "planted-1", 500)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{planted}: {err:?}");
    }

    // An agent credential planted from scratch, a real one copied to another id, and one
    // planted under the id of an agent of another tenant (each with the secret index entry
    // that leads to it: the index is only a lookup, the record must still verify).
    let real: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("wb:{acme}:agentcred:a1")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("wb:agentsecret:{}", sha("wba_planted")))
        .arg("acme")
        .query_async(&mut c)
        .await
        .unwrap();
    for (id, mac) in [("evil", ""), ("evil2", real["mac"].as_str())] {
        let _: () = redis::cmd("HSET")
            .arg(format!("wb:{{acme}}:agentcred:{id}"))
            .arg(&[
                ("tenant", "acme"),
                ("forest", FOREST),
                ("secret_sha256", &sha("wba_planted")),
                ("mac", mac),
            ])
            .query_async(&mut c)
            .await
            .unwrap();
        let err = ScriptedAgent::connect(&env, id, "wba_planted", FOREST, "i1", 1)
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Code::Unauthenticated, "{id}: {err:?}");
        assert!(
            err.message().contains("not written by this gateway"),
            "{}",
            err.message()
        );
    }
    let mut agent = ScriptedAgent::connect(&env, "a1", secret.expose(), FOREST, "i1", 1)
        .await
        .unwrap();
    wait_live(&env).await;

    // A forest switch flipped in Redis (protected accounts on) is not obeyed: the forest is
    // treated as switched off until an admin sets it again, and nothing is delivered.
    let forest_record = format!("wb:{{acme}}:forest:{FOREST}");
    let _: () = redis::cmd("HSET")
        .arg(&forest_record)
        .arg("allow_protected_accounts")
        .arg("1")
        .query_async(&mut c)
        .await
        .unwrap();
    let flipped = env.submit("flipped-1", 1000).await.unwrap();
    assert_eq!(
        Outcome::try_from(flipped.outcome).unwrap(),
        Outcome::NotEnabled,
        "{flipped:?}"
    );
    assert!(agent.next_work(Duration::from_millis(300)).await.is_none());
    let set = env
        .tenants
        .set_forest(
            &ACME,
            &FOREST_ID,
            &cloud_gateway::tenants::ForestSettingsChange {
                allow_protected_accounts: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        set.writeback_enabled && set.allow_protected_accounts,
        "{set:?}"
    );
    // Set by an admin (MACed) it is obeyed, and travels sealed with the operation.
    let (r, work) = tokio::join!(
        env.submit("set-1", 1500),
        agent.next_work(Duration::from_secs(5))
    );
    let work = work.expect("work delivered once the switch was set by an admin");
    let binding = relay::envelope::Binding {
        tenant_id: "acme",
        forest: FOREST,
        operation_id: "set-1",
        deadline_unix_ms: work.deadline_unix_ms,
        traceparent: &work.traceparent,
    };
    let plain = agent
        .keys
        .open(
            &[env.tenants.signer().public_key()],
            &binding,
            work.key_version,
            &work.envelope,
        )
        .unwrap();
    let op = <relay::proto::SealedOperation as prost::Message>::decode(plain.as_slice()).unwrap();
    assert!(op.switches.as_ref().unwrap().allow_protected_accounts);
    assert_eq!(
        Outcome::try_from(r.unwrap().outcome).unwrap(),
        Outcome::TimedOut
    );
    env.shutdown.cancel();
}

/// An agent that takes the work and never answers: the caller hears TIMED_OUT at its deadline,
/// a late acknowledgment within the grace period still records the real outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_work_times_out_and_a_late_ack_tells_the_truth() {
    let env = start().await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 4).await;

    let (r, work) = tokio::join!(
        env.submit("slow-1", 2500),
        agent.next_work(Duration::from_secs(5))
    );
    let work = work.expect("work delivered");
    assert_eq!(work.operation_id, "slow-1");
    // The deadline is set by the replica's estimate of the store's clock, good to half a
    // round trip of its last `TIME` (a few ms on a loaded machine).
    assert!(
        work.remaining_ms > 0 && work.remaining_ms <= 2500 + 50,
        "{}",
        work.remaining_ms
    );
    assert!(
        !work.envelope.windows(8).any(|w| w == b"Scripted"),
        "work travels sealed"
    );
    let r = r.unwrap();
    assert_eq!(
        Outcome::try_from(r.outcome).unwrap(),
        Outcome::TimedOut,
        "{r:?}"
    );
    let rec = env
        .store
        .operation(&ACME, &op("slow-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rec.state,
        OpState::Delivered,
        "not terminal yet: it may have been applied"
    );

    // The agent answers late but within the grace period: the record gets the truth.
    agent.ack("slow-1", Outcome::Applied).await;
    for _ in 0..50 {
        if env
            .store
            .operation(&ACME, &op("slow-1"))
            .await
            .unwrap()
            .unwrap()
            .state
            == OpState::Done
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec = env
        .store
        .operation(&ACME, &op("slow-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.state, rec.outcome), (OpState::Done, Outcome::Applied));
    // A resubmission now returns the recorded outcome.
    let again = env.submit("slow-1", 1000).await.unwrap();
    assert_eq!(Outcome::try_from(again.outcome).unwrap(), Outcome::Applied);

    // Never answered at all: settled as TIMED_OUT once the grace period passes.
    let r = env.submit("silent-1", 1500).await.unwrap();
    assert_eq!(Outcome::try_from(r.outcome).unwrap(), Outcome::TimedOut);
    let _ = agent.next_work(Duration::from_millis(100)).await;
    let mut rec = None;
    for _ in 0..100 {
        rec = env.store.operation(&ACME, &op("silent-1")).await.unwrap();
        if rec.as_ref().is_some_and(|r| r.state == OpState::Done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rec = rec.unwrap();
    assert_eq!(
        (rec.state, rec.outcome),
        (OpState::Done, Outcome::TimedOut),
        "{rec:?}"
    );
    // A very late acknowledgment does not change the terminal outcome; it is kept on the timeline.
    agent.ack("silent-1", Outcome::Applied).await;
    let mut tl = Vec::new();
    for _ in 0..100 {
        tl = env.store.timeline(&ACME, &op("silent-1")).await.unwrap();
        if tl.iter().any(|e| e.stage == "late-acknowledgment") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tl.iter().any(|e| e.stage == "late-acknowledgment"),
        "the late acknowledgment was not recorded: {tl:?}"
    );
    let rec = env
        .store
        .operation(&ACME, &op("silent-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.outcome, Outcome::TimedOut);
    env.shutdown.cancel();
}

/// Work queued while no agent reads it expires at its deadline: guaranteed not applied, and
/// never delivered afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_nobody_takes_expires_and_is_never_delivered_late() {
    let env = start().await;
    // max_in_flight 1 and the slot taken by a first operation we never answer.
    let (mut agent, _secret) = connected_agent(&env, "i1", 1).await;
    let (held, work) = tokio::join!(env.submit("hold-slot", 8000), async {
        let w = agent
            .next_work(Duration::from_secs(3))
            .await
            .expect("first work delivered");
        assert_eq!(w.operation_id, "hold-slot");
        // The only slot is taken: this one stays queued until its deadline.
        let queued = env.submit("queued-1", 2000).await.unwrap();
        assert_eq!(
            Outcome::try_from(queued.outcome).unwrap(),
            Outcome::Expired,
            "{queued:?}"
        );
        let rec = env
            .store
            .operation(&ACME, &op("queued-1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((rec.state, rec.outcome), (OpState::Done, Outcome::Expired));
        // Free the slot: the expired entry is read, recognised and dropped, never delivered.
        agent.ack("hold-slot", Outcome::Applied).await;
        agent.next_work(Duration::from_millis(2500)).await
    });
    assert_eq!(
        Outcome::try_from(held.unwrap().outcome).unwrap(),
        Outcome::Applied
    );
    assert!(work.is_none(), "expired work was delivered: {work:?}");
    let tl = env.store.timeline(&ACME, &op("queued-1")).await.unwrap();
    assert!(tl.iter().all(|e| e.stage != "delivered"), "{tl:?}");
    env.shutdown.cancel();
}

/// After a reconnect, unacknowledged work goes back to the same agent instance only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_goes_to_the_same_instance_only() {
    let env = start().await;
    let (mut first, secret) = connected_agent(&env, "instance-1", 4).await;
    let (_, work) = tokio::join!(
        async {
            // The caller gives up early; the operation stays accepted with a 6 s deadline.
            let _ =
                tokio::time::timeout(Duration::from_millis(300), env.submit("redeliver-1", 6000))
                    .await;
        },
        first.next_work(Duration::from_secs(3))
    );
    assert_eq!(work.unwrap().operation_id, "redeliver-1");
    drop(first);

    // Another instance connects: it must not get the work.
    let mut other = ScriptedAgent::connect(&env, "a1", secret.expose(), FOREST, "instance-2", 4)
        .await
        .unwrap();
    assert!(
        other.next_work(Duration::from_millis(2500)).await.is_none(),
        "delivered to a second instance"
    );
    drop(other);

    // The same instance reconnects: it gets the work again and answers it.
    let mut again = ScriptedAgent::connect(&env, "a1", secret.expose(), FOREST, "instance-1", 4)
        .await
        .unwrap();
    let w = again
        .next_work(Duration::from_secs(3))
        .await
        .expect("redelivered to the same instance");
    assert_eq!(w.operation_id, "redeliver-1");
    again.ack("redeliver-1", Outcome::Applied).await;
    let r = env.submit("redeliver-1", 3000).await.unwrap();
    assert_eq!(Outcome::try_from(r.outcome).unwrap(), Outcome::Applied);
    // Sent exactly twice, both times to instance-1: once, then once after its reconnect.
    assert!(
        again.next_work(Duration::from_millis(500)).await.is_none(),
        "sent a third time"
    );
    let rec = env
        .store
        .operation(&ACME, &op("redeliver-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.sends, rec.agent_instance.as_str()), (2, "instance-1"));
    let tl = env.store.timeline(&ACME, &op("redeliver-1")).await.unwrap();
    let stages: Vec<&str> = tl
        .iter()
        .map(|e| e.stage.as_str())
        .filter(|s| s.contains("delivered"))
        .collect();
    assert_eq!(stages, ["delivered", "redelivered"], "{tl:?}");
    env.shutdown.cancel();
}

/// A tenant over its rate gets RESOURCE_EXHAUSTED, naming itself and when to retry; other
/// tenants are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_over_their_rate_are_told_to_slow_down() {
    let env = start_configured(|c| {
        c.tenant_rate = Some(cloud_gateway::limits::Rate {
            per_second: 0.5,
            burst: 2.0,
        })
    })
    .await;
    // No agent: each accepted call is answered AGENT_UNAVAILABLE at once.
    for i in 0..2 {
        let r = env.submit(&format!("burst-{i}"), 1000).await.unwrap();
        assert_eq!(
            Outcome::try_from(r.outcome).unwrap(),
            Outcome::AgentUnavailable
        );
    }
    // The third call, on another replica, finds the burst spent: the rate is the tenant's,
    // not each replica's.
    let other = env
        .start_replica_with("gw-2", |c| {
            c.tenant_rate = Some(cloud_gateway::limits::Rate {
                per_second: 0.5,
                burst: 2.0,
            })
        })
        .await;
    let err = env
        .send_to(
            other,
            reset_of("alice", "burst-2", 1000),
            env.token.expose(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("\"acme\"") && err.message().contains("retry"),
        "{}",
        err.message()
    );
    let pushback: u64 = err
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 0 && pushback <= 2001, "{pushback}");
    // Every RPC counts, reads too.
    let mut c = WritebackClient::new(env.channel().await.unwrap());
    let mut get = tonic::Request::new(relay::proto::GetOperationRequest {
        tenant_id: "acme".into(),
        operation_id: "burst-0".into(),
    });
    get.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", env.token.expose()).parse().unwrap(),
    );
    let err = c.get_operation(get).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    another_tenant_is_served(&env).await;
    env.shutdown.cancel();
}

/// Submits `req` to `addr`; `agent` takes it and answers `outcome`; returns what the caller
/// heard.
async fn answered(
    env: &Env,
    agent: &mut ScriptedAgent,
    addr: std::net::SocketAddr,
    req: SubmitRequest,
    outcome: Outcome,
) -> Outcome {
    let op = req.operation_id.clone();
    let (r, _) = tokio::join!(env.send_to(addr, req, env.token.expose()), async {
        agent
            .next_work(Duration::from_secs(5))
            .await
            .expect("delivered");
        agent.ack(&op, outcome).await;
    });
    Outcome::try_from(r.unwrap().outcome).unwrap()
}

/// The relay is no guessing oracle: per user, changes that end WRONG_OLD_PASSWORD (or are still
/// unanswered) are limited across replicas, changes with the right old password give their
/// unit back, unlocks are limited too (each resets AD's lockout counter), and other users are
/// not held up. A refused change is never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_through_change_is_stopped_per_user_across_replicas() {
    let limits = cloud_gateway::limits::UserLimits {
        guesses: 2,
        unlocks: 2,
        window: Duration::from_secs(60),
    };
    let env = start_configured(|c| c.user_limits = limits).await;
    let other = env
        .start_replica_with("gw-2", |c| c.user_limits = limits)
        .await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 4).await;
    let change = |sam: &str, op: &str, guess: &str| {
        let mut r = reset_of(sam, op, 3000);
        r.action = Some(Action::Change(relay::proto::ChangePassword {
            old_password: guess.into(),
            new_password: "Next#Pass12345".into(),
        }));
        r
    };
    let token = env.token.expose();
    // Two wrong guesses for mallory, one on each replica.
    for (i, addr) in [env.addr, other].into_iter().enumerate() {
        let op = format!("guess-{i}");
        let req = change("mallory", &op, &format!("Guess#{i}"));
        let outcome = answered(&env, &mut agent, addr, req, Outcome::WrongOldPassword).await;
        assert_eq!(outcome, Outcome::WrongOldPassword);
    }
    // The third is refused on either replica, with the limit and the wait; nothing delivered.
    for addr in [env.addr, other] {
        let err = env
            .send_to(addr, change("mallory", "guess-3", "Guess#3"), token)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message().contains("limit of 2") && err.message().contains("retry in"),
            "{}",
            err.message()
        );
        assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
    }
    assert!(agent.next_work(Duration::from_millis(300)).await.is_none());

    // Another user is served; changes with the right old password cost nothing.
    for i in 0..3 {
        let op = format!("right-{i}");
        let req = change("bob", &op, "Right#Pass1");
        let outcome = answered(&env, &mut agent, env.addr, req, Outcome::Applied).await;
        assert_eq!(outcome, Outcome::Applied, "bob's change {i}");
    }

    // Unlocks: two, then refused.
    let unlock = |op: &str| {
        let mut r = reset_of("carol", op, 3000);
        r.action = Some(Action::Unlock(relay::proto::UnlockAccount {}));
        r
    };
    for i in 0..2 {
        let op = format!("unlock-{i}");
        let outcome = answered(&env, &mut agent, env.addr, unlock(&op), Outcome::Applied).await;
        assert_eq!(outcome, Outcome::Applied, "unlock {i}");
    }
    let err = env
        .send_to(other, unlock("unlock-2"), token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("unlock"), "{}", err.message());
    env.shutdown.cancel();
}

/// One operation id submitted twice at the same moment: one operation, delivered once, and
/// both callers hear its one outcome (eight ids at once, so the two submissions of some id
/// really race past the gateway's first look at the record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_submitted_twice_at_once_is_one_operation() {
    let env = start().await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 32).await;
    let ids: Vec<String> = (0..8).map(|i| format!("twice-{i}")).collect();
    let submits = futures::future::join_all(
        ids.iter()
            .flat_map(|id| [env.submit(id, 5000), env.submit(id, 5000)]),
    );
    let (answers, works) = tokio::join!(submits, async {
        let mut works = Vec::new();
        while let Some(w) = agent.next_work(Duration::from_millis(1500)).await {
            agent.ack(&w.operation_id, Outcome::Applied).await;
            works.push(w.operation_id);
        }
        works
    });
    let mut delivered = works.clone();
    delivered.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        delivered, expected,
        "each id delivered exactly once: {works:?}"
    );
    for r in answers {
        assert_eq!(
            Outcome::try_from(r.unwrap().outcome).unwrap(),
            Outcome::Applied
        );
    }
    for id in &ids {
        let rec = env.store.operation(&ACME, &op(id)).await.unwrap().unwrap();
        assert_eq!(rec.sends, 1, "{id}");
    }
    env.shutdown.cancel();
}

/// An operation id reused for another user, forest or kind is refused with ALREADY_EXISTS,
/// whether the two submissions race or come one after the other, and nothing more is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_reused_for_other_work_is_already_exists() {
    let env = start().await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 4).await;
    let token = env.token.expose().to_owned();

    // At the same moment, for two users: exactly one is accepted.
    let (a, b) = tokio::join!(
        env.send(reset_of("alice", "raced-1", 3000), &token),
        env.send(reset_of("bob", "raced-1", 3000), &token)
    );
    let refused = [&a, &b]
        .iter()
        .filter(|r| r.as_ref().is_err_and(|e| e.code() == Code::AlreadyExists))
        .count();
    assert_eq!(refused, 1, "{a:?} {b:?}");
    let w = agent
        .next_work(Duration::from_secs(3))
        .await
        .expect("the accepted one is delivered");
    assert_eq!(w.operation_id, "raced-1");
    assert!(agent.next_work(Duration::from_millis(500)).await.is_none());

    // Afterwards, for another forest or another kind.
    let mut other_forest = reset_of("alice", "raced-1", 1000);
    other_forest.user.as_mut().unwrap().forest = "other.example.test".into();
    let mut unlock = reset_of("alice", "raced-1", 1000);
    unlock.action = Some(Action::Unlock(Default::default()));
    for req in [other_forest, unlock] {
        let err = env.send(req, &token).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert!(err.message().contains("raced-1"), "{}", err.message());
    }
    assert!(agent.next_work(Duration::from_millis(300)).await.is_none());

    // The script decides, not an earlier read: a direct second create for another user.
    let now = env.store.now_ms().await.unwrap();
    let direct = op("direct-1");
    let new = |user: &'static str| cloud_gateway::store::NewOperation {
        tenant: &ACME,
        operation_id: &direct,
        forest: &FOREST_ID,
        kind: "reset",
        initiator: 1,
        trace_id: "",
        traceparent: "",
        accepted_ms: now,
        deadline_ms: now + 60_000,
        replica: "gw-1",
        envelope: b"sealed",
        key_version: 1,
        ttl: Duration::from_secs(60),
        user,
    };
    use cloud_gateway::store::Created;
    let s = &env.store;
    assert_eq!(
        s.create_operation(&new("sam:alice"), LIMITS).await.unwrap(),
        Created::New
    );
    assert_eq!(
        s.create_operation(&new("sam:alice"), LIMITS).await.unwrap(),
        Created::Exists
    );
    assert_eq!(
        s.create_operation(&new("sam:bob"), LIMITS).await.unwrap(),
        Created::Conflict
    );
    env.shutdown.cancel();
}

/// Redis killed (kill -9) and restarted from its append-only file while an agent is connected:
/// the outcome listener subscribes again, the session's dispatcher reads work again, and the
/// sweeper, which failed meanwhile, settles an operation whose deadline passed while Redis was
/// down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_and_coming_back() {
    let env = start_on(RedisServer::start_durable().unwrap(), |_| {}).await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 1).await;
    let client = redis::Client::open(env.redis.lock().unwrap().url()).unwrap();
    let subscribers = || async {
        let Ok(mut c) = client.get_multiplexed_async_connection().await else {
            return 0;
        };
        let r: redis::RedisResult<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("wb:done:gw-1")
            .query_async(&mut c)
            .await;
        r.map(|(_, n)| n).unwrap_or(0)
    };
    assert_eq!(subscribers().await, 1, "the outcome listener is subscribed");

    // The only slot is held, so "orphan-1" stays queued; its caller gives up at once.
    let (held, _) = tokio::join!(env.submit("hold-1", 20_000), async {
        let w = agent.next_work(Duration::from_secs(3)).await.expect("work");
        assert_eq!(w.operation_id, "hold-1");
        let gave_up =
            tokio::time::timeout(Duration::from_millis(300), env.submit("orphan-1", 1500)).await;
        assert!(gave_up.is_err(), "orphan-1 answered before its deadline");

        env.redis.lock().unwrap().kill();
        // orphan-1's deadline passes while Redis is down: the sweeper's passes fail.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        env.redis.lock().unwrap().restart().unwrap();

        // The sweeper settles orphan-1 while the slot is still held (so no dispatcher reads
        // it): never delivered, so EXPIRED.
        let mut rec = None;
        for _ in 0..100 {
            rec = env
                .store
                .operation(&ACME, &op("orphan-1"))
                .await
                .ok()
                .flatten();
            if rec.as_ref().is_some_and(|r| r.state == OpState::Done) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rec = rec.expect("orphan-1 survived the restart");
        assert_eq!((rec.state, rec.outcome), (OpState::Done, Outcome::Expired));
        agent.ack("hold-1", Outcome::Applied).await;
    });
    assert_eq!(
        Outcome::try_from(held.unwrap().outcome).unwrap(),
        Outcome::Applied,
        "the caller waiting across the outage hears the outcome"
    );
    assert!(
        agent.next_work(Duration::from_millis(1500)).await.is_none(),
        "expired work was delivered"
    );

    // The listener is back, and new work flows to the agent and back to its caller.
    let mut n = 0;
    for _ in 0..100 {
        n = subscribers().await;
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(n, 1, "the outcome listener did not subscribe again");
    let (after, work) = tokio::join!(env.submit("after-1", 5000), async {
        let w = agent.next_work(Duration::from_secs(5)).await;
        if let Some(w) = &w {
            agent.ack(&w.operation_id, Outcome::Applied).await;
        }
        w
    });
    assert_eq!(
        work.expect("work after the restart").operation_id,
        "after-1"
    );
    assert_eq!(
        Outcome::try_from(after.unwrap().outcome).unwrap(),
        Outcome::Applied
    );
    env.shutdown.cancel();
}

/// An agent answers while Redis is away (killed, restarting): the answer is recorded once the
/// store is back, and the caller hears it, instead of the operation timing out unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_while_the_store_is_away_is_recorded_when_it_is_back() {
    let env = start_on(RedisServer::start_durable().unwrap(), |_| {}).await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 1).await;
    let (answer, ()) = tokio::join!(env.submit("while-away-1", 10_000), async {
        let w = agent.next_work(Duration::from_secs(3)).await.expect("work");
        env.redis.lock().unwrap().kill();
        agent.ack(&w.operation_id, Outcome::Applied).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        env.redis.lock().unwrap().restart().unwrap();
    });
    assert_eq!(
        Outcome::try_from(answer.unwrap().outcome).unwrap(),
        Outcome::Applied,
        "the answer given while the store was away reached the caller"
    );
    env.shutdown.cancel();
}

/// Redis restored from an older backup while the replica runs: the work it puts back to
/// "queued" was applied since, so it is settled TIMED_OUT ("it may or may not have been
/// applied"), never delivered again nor answered EXPIRED; then new work flows as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_an_older_state_is_caught() {
    let env = start_on(RedisServer::start_durable().unwrap(), |_| {}).await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 1).await;
    // One user's operations: "hold-2" takes the only slot, "later-2" queues behind it.
    let (hold, later, ()) = tokio::join!(
        env.submit("hold-2", 20_000),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            env.submit("later-2", 20_000).await
        },
        async {
            let w = agent.next_work(Duration::from_secs(3)).await.expect("work");
            assert_eq!(w.operation_id, "hold-2");
            tokio::time::sleep(Duration::from_millis(600)).await;
            let backup = env.redis.lock().unwrap().snapshot().unwrap();
            agent.ack("hold-2", Outcome::Applied).await;
            let w = agent.next_work(Duration::from_secs(3)).await.expect("work");
            assert_eq!(w.operation_id, "later-2");
            assert!(w.store_seq >= 2, "work carries its store sequence: {w:?}");
            agent.ack("later-2", Outcome::Applied).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Back to when hold-2 was delivered and later-2 queued: both were applied since.
            env.redis.lock().unwrap().restore(&backup).unwrap();
        }
    );
    for r in [hold, later] {
        assert_eq!(
            Outcome::try_from(r.unwrap().outcome).unwrap(),
            Outcome::Applied
        );
    }
    assert!(
        agent.next_work(Duration::from_secs(4)).await.is_none(),
        "restored work was delivered again"
    );
    for id in ["hold-2", "later-2"] {
        // The test's own connection may need a command to notice Redis restarted.
        let mut rec = env.store.operation(&ACME, &op(id)).await;
        for _ in 0..50 {
            if rec.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            rec = env.store.operation(&ACME, &op(id)).await;
        }
        let rec = rec.unwrap().unwrap();
        assert_eq!(
            (rec.state, rec.outcome),
            (OpState::Done, Outcome::TimedOut),
            "{id}: unknown, never EXPIRED"
        );
        let stages: Vec<String> = env
            .store
            .timeline(&ACME, &op(id))
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.stage)
            .collect();
        assert_eq!(
            stages.last().map(String::as_str),
            Some("store-restored"),
            "{id}: {stages:?}"
        );
    }
    assert_eq!(
        cloud_gateway::metrics::get()
            .store_rollbacks
            .with_label_values(&["acme"])
            .get(),
        1
    );
    let (after, work) = tokio::join!(env.submit("after-2", 5000), async {
        let w = agent.next_work(Duration::from_secs(5)).await;
        if let Some(w) = &w {
            agent.ack(&w.operation_id, Outcome::Applied).await;
        }
        w
    });
    assert_eq!(work.expect("new work flows").operation_id, "after-2");
    assert_eq!(
        Outcome::try_from(after.unwrap().outcome).unwrap(),
        Outcome::Applied
    );
    env.shutdown.cancel();
}

/// Only the instance an operation was delivered to can settle it: another agent of the forest
/// (a forged answer, or a confused agent) is refused and the refusal is on the
/// timeline; the owner's acknowledgment then counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgments_count_only_from_the_instance_given_the_work() {
    let env = start().await;
    let (mut owner, _secret) = connected_agent(&env, "owner", 4).await;
    // Another agent of the same forest (one identity has one stream: a second instance of
    // the owner's identity would close the owner's stream instead).
    let other = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a2")
        .await
        .unwrap();
    let (answer, _) = tokio::join!(env.submit("owned-1", 5000), async {
        let w = owner.next_work(Duration::from_secs(3)).await.expect("work");
        let intruder = ScriptedAgent::connect(&env, "a2", other.expose(), FOREST, "other", 4)
            .await
            .unwrap();
        intruder.ack(&w.operation_id, Outcome::Applied).await;
        let mut tl = Vec::new();
        for _ in 0..100 {
            tl = env.store.timeline(&ACME, &op("owned-1")).await.unwrap();
            if tl.iter().any(|e| e.stage == "refused-acknowledgment") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(
            tl.iter().any(|e| e.stage == "refused-acknowledgment"),
            "{tl:?}"
        );
        let rec = env
            .store
            .operation(&ACME, &op("owned-1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, OpState::Delivered, "the intruder settled it");
        owner.ack(&w.operation_id, Outcome::WrongOldPassword).await;
    });
    assert_eq!(
        Outcome::try_from(answer.unwrap().outcome).unwrap(),
        Outcome::WrongOldPassword,
        "the owner's outcome, not the intruder's"
    );
    env.shutdown.cancel();
}

/// Consumers of the forest's consumer group, by name.
async fn consumers(url: &str) -> Vec<String> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let reply: redis::Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(cloud_gateway::store::queue_key(&ACME, &FOREST_ID))
        .arg(cloud_gateway::store::GROUP)
        .query_async(&mut c)
        .await
        .unwrap();
    let redis::Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let fields: HashMap<String, redis::Value> =
                redis::from_redis_value(item.clone()).ok()?;
            redis::from_redis_value(fields.get("name")?.clone()).ok()
        })
        .collect()
}

/// Applied, expired and timed-out operations all leave the stream: no sealed payload stays in
/// Redis once an operation is settled, and an instance that left with nothing pending leaves
/// no consumer behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_work_leaves_no_sealed_payload_and_no_dead_consumer() {
    let env = start().await;
    let url = env.redis.lock().unwrap().url();
    let depth = || async { env.store.queue_stats(&ACME, &FOREST_ID).await.unwrap().0 };
    let (mut agent, _secret) = connected_agent(&env, "i1", 1).await;
    // Applied.
    let (r, _) = tokio::join!(env.submit("applied-1", 5000), async {
        let w = agent.next_work(Duration::from_secs(3)).await.expect("work");
        agent.ack(&w.operation_id, Outcome::Applied).await;
    });
    assert_eq!(
        Outcome::try_from(r.unwrap().outcome).unwrap(),
        Outcome::Applied
    );
    assert_eq!(depth().await, 0, "applied work left its entry");
    // Timed out (delivered, never answered) and, behind it, expired (never delivered).
    let (silent, queued) = tokio::join!(env.submit("silent-2", 1200), async {
        let w = agent.next_work(Duration::from_secs(3)).await.expect("work");
        assert_eq!(w.operation_id, "silent-2");
        env.submit("queued-2", 1000).await
    });
    assert_eq!(
        Outcome::try_from(queued.unwrap().outcome).unwrap(),
        Outcome::Expired
    );
    assert_eq!(
        Outcome::try_from(silent.unwrap().outcome).unwrap(),
        Outcome::TimedOut
    );
    let mut n = -1;
    for _ in 0..100 {
        n = depth().await;
        let rec = env
            .store
            .operation(&ACME, &op("silent-2"))
            .await
            .unwrap()
            .unwrap();
        if n == 0 && rec.state == OpState::Done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(n, 0, "settled work left entries in the stream");
    let everything = e2e_free_dump(&url).await;
    assert!(
        !everything.windows(8).any(|w| w == b"Scripted"),
        "a password-bearing envelope would still be here"
    );
    assert!(consumers(&url).await.contains(&"i1".to_owned()));
    drop(agent);
    let mut left = Vec::new();
    for _ in 0..100 {
        left = consumers(&url).await;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left.is_empty(), "dead consumers stay: {left:?}");
    env.shutdown.cancel();
}

/// Passwords only the on-prem side can open. With a reset queued (its agent took it and has
/// not answered), everything the cloud side holds opens nothing: the password is nowhere in
/// Redis, and no key the cloud side has (the master key, anything derived from it, every
/// 32-byte value or hex string Redis holds) is the private half of a key the envelope is
/// sealed to. The agent's own key opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_dump_and_the_master_key_open_no_queued_password() {
    let env = start().await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 4).await;
    let url = env.redis.lock().unwrap().url();
    let (r, (work, dump)) = tokio::join!(env.submit("sealed-1", 2500), async {
        let w = agent.next_work(Duration::from_secs(5)).await;
        (w, testkit::redis_dump::dump_redis(&url).await.unwrap())
    });
    let work = work.expect("work delivered");
    assert_eq!(
        Outcome::try_from(r.unwrap().outcome).unwrap(),
        Outcome::TimedOut
    );
    let all: Vec<u8> = dump
        .iter()
        .flat_map(|(k, v)| [k.as_bytes(), v].concat())
        .collect();
    assert!(
        all.windows(work.envelope.len())
            .any(|w| w == work.envelope.as_slice()),
        "the queued envelope is in the dump"
    );
    assert!(
        !testkit::redis_dump::contains_secret(&all, "Scripted#Pass1"),
        "the password is in Redis"
    );
    let sealed_to = relay::envelope::recipient_ids(&work.envelope).unwrap();
    assert_eq!(
        sealed_to,
        vec![agent.keys.current().public().id().to_owned()]
    );

    // Every candidate private key the cloud side could try.
    let mut candidates = vec![env.key.expose().to_vec()];
    let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, env.key.expose());
    for label in [
        &b"writeback.v1 record mac key"[..],
        b"writeback.v2 operation signing key",
    ] {
        candidates.push(ring::hmac::sign(&derive, label).as_ref()[..32].to_vec());
    }
    for piece in all.split(|b| *b == 0) {
        if piece.len() == 32 {
            candidates.push(piece.to_vec());
        }
        for word in piece.split(|b| !b.is_ascii_hexdigit()) {
            if word.len() == 64 {
                candidates.push(hex::decode(word).unwrap());
            }
        }
    }
    assert!(candidates.len() > 5, "{} candidates", candidates.len());
    for c in &candidates {
        let key = AgentKey::from_secret(&KeyBytes::from_slice(c).unwrap()).unwrap();
        assert!(
            !sealed_to.iter().any(|id| id == key.public().id()),
            "a value the cloud side holds is an agent's private key"
        );
    }
    // The positive control: the agent's key opens the very bytes Redis holds.
    let binding = relay::envelope::Binding {
        tenant_id: "acme",
        forest: FOREST,
        operation_id: "sealed-1",
        deadline_unix_ms: work.deadline_unix_ms,
        traceparent: &work.traceparent,
    };
    let plain = agent
        .keys
        .open(
            &[env.tenants.signer().public_key()],
            &binding,
            work.key_version,
            &work.envelope,
        )
        .unwrap();
    assert!(testkit::redis_dump::contains_secret(
        &plain,
        "Scripted#Pass1"
    ));
    env.shutdown.cancel();
}

/// Only keys the gateway recorded are sealed to: a sealing-key record planted in Redis (a fake
/// live instance with the attacker's key and no valid MAC) is skipped, so work is sealed to the
/// real agent alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_sealing_key_is_never_sealed_to() {
    let env = start().await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 4).await;
    let attacker = AgentKey::generate().unwrap();
    let member = "a1|evil|gw-1";
    let client = redis::Client::open(env.redis.lock().unwrap().url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let now = relay::now_unix_ms() + 60_000;
    let _: () = redis::pipe()
        .zadd(format!("wb:{{acme}}:agents:{FOREST}"), member, now)
        .hset_multiple(
            format!("wb:{{acme}}:agent:{FOREST}:{member}"),
            &[
                ("seal_key", hex::encode(attacker.public().as_bytes())),
                ("seal_mac", "00".repeat(32)),
            ],
        )
        .query_async(&mut c)
        .await
        .unwrap();
    let keys = env
        .tenants
        .recipients(&ACME, &FOREST_ID, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(keys, vec![agent.keys.current().public().clone()]);
    let (_, work) = tokio::join!(
        env.submit("planted-1", 1500),
        agent.next_work(Duration::from_secs(5))
    );
    let ids = relay::envelope::recipient_ids(&work.expect("work delivered").envelope).unwrap();
    assert_eq!(ids, vec![agent.keys.current().public().id().to_owned()]);
    env.shutdown.cancel();
}

/// A CSR for a fresh key pair: `(csr_pem, key_pem)`.
fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (csr, key.serialize_pem())
}

/// Enrolls with `csr_pem`, binding the certificate to the sealing key of scripted instance
/// `instance` (`""`: no sealing key).
async fn enroll(
    env: &Env,
    token: &str,
    csr_pem: &str,
    instance: &str,
) -> Result<relay::proto::EnrollResponse, tonic::Status> {
    let mut c = relay::proto::agent_enrollment_client::AgentEnrollmentClient::new(
        env.channel().await.unwrap(),
    );
    let sealing_key = match instance {
        "" => Vec::new(),
        i => instance_key(i).public().as_bytes().to_vec(),
    };
    c.enroll(relay::proto::EnrollRequest {
        token: token.into(),
        csr_pem: csr_pem.into(),
        sealing_key,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Enrollment: a one-time token buys one client certificate naming the tenant, forest and
/// agent id; from then on the agent authenticates by that certificate alone (no secret), a
/// used, expired or unknown token buys nothing, a certificate from another CA is refused, the
/// certificate renews over the stream, and revocation cuts the certificate off within a second
/// (no reconnect, no renewal). Enrolling again replaces the earlier certificate. The
/// certificate is bound to the sealing key it was enrolled (or renewed) with: a stream on it
/// announcing another key is refused, and a renewed certificate is sealed to the stream's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_authenticates_by_certificate_until_revoked() {
    let (ca_cert, ca_key) = cloud_gateway::enroll::AgentCa::generate().unwrap();
    let env = start_configured(|c| {
        c.agent_ca = Some(std::sync::Arc::new(
            cloud_gateway::enroll::AgentCa::from_pem(&ca_cert, &ca_key, Duration::from_secs(3600))
                .unwrap(),
        ))
    })
    .await;
    let token = env
        .tenants
        .create_enrollment(&ACME, &FOREST_ID, "e1", Duration::from_secs(60))
        .await
        .unwrap();
    let (csr_pem, key_pem) = csr();
    // Without a sealing key to bind: refused naming the field, the token not spent.
    let err = enroll(&env, token.expose(), &csr_pem, "")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("sealing_key"), "{}", err.message());
    let enrolled = enroll(&env, token.expose(), &csr_pem, "i1").await.unwrap();
    assert_eq!(
        (
            enrolled.tenant_id.as_str(),
            enrolled.forest.as_str(),
            enrolled.agent_id.as_str()
        ),
        ("acme", FOREST, "e1")
    );
    let left = enrolled.not_after_unix_ms - relay::now_unix_ms();
    assert!(left > 3_500_000 && left <= 3_600_000, "{left}");
    // Once only.
    let err = enroll(&env, token.expose(), &csr().0, "i1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("used already"), "{}", err.message());
    let err = enroll(&env, "wbe_made-up", &csr().0, "i1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Expired.
    let short = env
        .tenants
        .create_enrollment(&ACME, &FOREST_ID, "e2", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(enroll(&env, short.expose(), &csr().0, "i1").await.is_err());
    // Another tenant's agent of the same id is another agent: enrolling it leaves this one
    // alone.
    let globex = TenantId::new("globex").unwrap();
    env.tenants.create_tenant(&globex).await.unwrap();
    let theirs = env
        .tenants
        .create_enrollment(&globex, &FOREST_ID, "e1", Duration::from_secs(60))
        .await
        .unwrap();
    let theirs = enroll(&env, theirs.expose(), &csr().0, "g1").await.unwrap();
    assert_eq!(
        (theirs.tenant_id.as_str(), theirs.agent_id.as_str()),
        ("globex", "e1")
    );

    // The certificate alone authenticates; the tenant and forest are the certificate's.
    let identity = (enrolled.certificate_pem.clone(), key_pem);
    let mut agent = ScriptedAgent::connect_enrolled(&env, &identity, "e1", "i1")
        .await
        .unwrap();
    // The certificate is bound to i1's sealing key: the certificate and its key copied to a
    // host without that key (announcing a key of its own) get nothing.
    let unbound = |err: tonic::Status, want: &str| {
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(
            err.message()
                .contains(&format!("is bound to sealing key {want}")),
            "{}",
            err.message()
        );
    };
    let copied = ScriptedAgent::connect_enrolled(&env, &identity, "e1", "i9")
        .await
        .err()
        .expect("a certificate was accepted with a sealing key it is not bound to");
    unbound(copied, instance_key("i1").public().id());
    // The same key under a certificate from another CA is refused at the TLS handshake or
    // by the gateway.
    let (other_cert, other_key) = cloud_gateway::enroll::AgentCa::generate().unwrap();
    let other_ca = cloud_gateway::enroll::AgentCa::from_pem(
        &other_cert,
        &other_key,
        Duration::from_secs(3600),
    )
    .unwrap();
    let forged = other_ca
        .issue(
            &csr_pem,
            &cloud_gateway::enroll::EnrolledName {
                tenant: ACME.clone(),
                forest: FOREST_ID.clone(),
                agent_id: "e1".into(),
                enrollment: "forged".into(),
                sealing_key_id: Some(instance_key("i2").public().id().to_owned()),
            },
        )
        .unwrap()
        .0;
    assert!(
        ScriptedAgent::connect_enrolled(&env, &(forged, identity.1.clone()), "e1", "i2")
            .await
            .is_err(),
        "a certificate from another CA was accepted"
    );

    // Renewal over the stream: a new certificate for a new key and a new sealing key (i3's),
    // the same name, sent sealed to the stream's sealing key (i1's). A renewal that names no
    // sealing key (which would escape the binding) gets no answer.
    let renew = |csr_pem: String, instance: &str| AgentFrame {
        frame: Some(agent_frame::Frame::Renew(relay::proto::Renew {
            csr_pem,
            sealing_key: match instance {
                "" => Vec::new(),
                i => instance_key(i).public().as_bytes().to_vec(),
            },
        })),
    };
    let (csr2, key2) = csr();
    agent.tx.send(renew(csr2.clone(), "")).await.unwrap();
    agent.tx.send(renew(csr2, "i3")).await.unwrap();
    // Frames are handled in order: had the first been answered, its answer would come first
    // (and bind no key, failing the name check below).
    let renewed = loop {
        match tokio::time::timeout(Duration::from_secs(5), agent.rx.message())
            .await
            .expect("renewed within 5 s")
            .unwrap()
            .unwrap()
            .frame
        {
            Some(gateway_frame::Frame::Renewed(r)) => break r,
            _ => continue,
        }
    };
    let binding = relay::envelope::Binding::renewal("acme", FOREST, renewed.not_after_unix_ms);
    let pem = agent
        .keys
        .open(
            &agent.signing_keys,
            &binding,
            relay::envelope::KEY_VERSION,
            &renewed.sealed_certificate,
        )
        .expect("the renewed certificate opens with the stream's sealing key");
    assert!(
        AgentKeyring::new(instance_key("i3"), Vec::new())
            .open(
                &agent.signing_keys,
                &binding,
                relay::envelope::KEY_VERSION,
                &renewed.sealed_certificate
            )
            .is_err(),
        "the renewed certificate opens with a key other than the stream's"
    );
    let renewed_identity = (String::from_utf8(pem.to_vec()).unwrap(), key2);
    let der = x509_parser::pem::parse_x509_pem(renewed_identity.0.as_bytes())
        .unwrap()
        .1
        .contents;
    let name = cloud_gateway::enroll::EnrolledName::from_certificate(&der).unwrap();
    assert_eq!(
        (
            name.tenant.as_str(),
            name.agent_id.as_str(),
            name.sealing_key_id.as_deref()
        ),
        ("acme", "e1", Some(instance_key("i3").public().id()))
    );
    let stale = ScriptedAgent::connect_enrolled(&env, &renewed_identity, "e1", "i1")
        .await
        .err()
        .expect("a renewed certificate was accepted with the sealing key it replaced");
    unbound(stale, instance_key("i3").public().id());

    // Revoked: the stream closes within a second, neither certificate reconnects.
    env.tenants.revoke_agent(&ACME, "e1").await.unwrap();
    agent
        .closes_within_a_second("the revoked agent's stream")
        .await;
    for id in [&identity, &renewed_identity] {
        let err = ScriptedAgent::connect_enrolled(&env, id, "e1", "i1")
            .await
            .err()
            .expect("a revoked agent's certificate was accepted");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("was revoked"), "{}", err.message());
    }
    env.shutdown.cancel();
}

/// Master-key rotation loses nothing in flight: with replicas on the new key (the old one as
/// previous), `rotate-master-key` re-MACs every record; a token, an agent credential and a
/// forest switch then verify under the new key alone; work signed under the old key before the
/// rotation still opens at the agent (the Welcome names both signing keys) and its answer
/// reaches the caller; new work is signed under the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_rotation_loses_nothing_in_flight() {
    let env = start().await;
    let (agent, secret) = connected_agent(&env, "i1", 4).await;
    env.tenants
        .set_forest(
            &ACME,
            &FOREST_ID,
            &cloud_gateway::tenants::ForestSettingsChange {
                allow_protected_accounts: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut agent = agent;
    let caller = {
        let token = env.token.expose().to_owned();
        let channel = env.channel().await.unwrap();
        tokio::spawn(async move {
            let mut c = WritebackClient::new(channel);
            let mut req = tonic::Request::new(reset_of("alice", "rot-1", 10_000));
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            c.submit(req).await.map(tonic::Response::into_inner)
        })
    };
    let before = agent
        .next_work(Duration::from_secs(5))
        .await
        .expect("delivered");
    agent.open(&before).expect("opens under the old key");

    let new_key = KeyBytes::generate().unwrap();
    let old_key = env.key.clone();
    let other = env
        .start_replica_with("gw-2", |c| {
            c.master_key = new_key.clone();
            c.previous_master_key = Some(old_key.clone());
        })
        .await;
    let rotating = Tenants::rotating(env.store.clone(), new_key.clone(), Some(env.key.clone()));
    let done = rotating.remac_all().await.unwrap();
    assert_eq!(done.unverified, 0, "{done:?}");
    assert!(
        done.records >= 3,
        "token, agent credential, forest switches: {done:?}"
    );
    let only_new = Tenants::new(env.store.clone(), new_key.clone());
    assert_eq!(
        only_new.tenant_for_token(env.token.expose()).await.unwrap(),
        Some(ACME.clone())
    );
    assert!(only_new
        .authenticate_agent(&format!("a1.{}", secret.expose()))
        .await
        .unwrap()
        .is_ok());
    assert!(
        only_new
            .forest(&ACME, &FOREST_ID)
            .await
            .unwrap()
            .allow_protected_accounts
    );

    // The agent moves to the new replica: the unanswered work comes again and still opens.
    drop(agent);
    let mut agent = ScriptedAgent::connect_via(&env, other, "a1", secret.expose(), FOREST, "i1", 4)
        .await
        .unwrap();
    assert_eq!(
        agent.signing_keys.len(),
        2,
        "the Welcome names both signing keys"
    );
    let again = agent
        .next_work(Duration::from_secs(5))
        .await
        .expect("redelivered");
    assert_eq!(again.operation_id, "rot-1");
    agent
        .open(&again)
        .expect("work signed before the rotation still opens");
    agent.ack("rot-1", Outcome::Applied).await;
    let r = caller.await.unwrap().unwrap();
    assert_eq!(
        Outcome::try_from(r.outcome).unwrap(),
        Outcome::Applied,
        "{r:?}"
    );

    // New work is signed under the new key.
    let (_, work) = tokio::join!(
        env.send_to(other, reset_of("bob", "rot-2", 1500), env.token.expose()),
        agent.next_work(Duration::from_secs(5))
    );
    let work = work.expect("delivered");
    let binding = relay::envelope::Binding {
        tenant_id: &work.tenant_id,
        forest: &work.forest,
        operation_id: &work.operation_id,
        deadline_unix_ms: work.deadline_unix_ms,
        traceparent: &work.traceparent,
    };
    agent
        .keys
        .open(
            &[only_new.signer().public_key()],
            &binding,
            work.key_version,
            &work.envelope,
        )
        .expect("signed under the new key");
    env.shutdown.cancel();
}

/// The audit trail: one record per Submit (who, what, for whom, the answer; refusals too) and
/// one per outcome an agent reported (which agent), in a private file apart from the logs, with
/// no password or token in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_and_outcome_is_audited_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit =
        std::sync::Arc::new(cloud_gateway::audit::Audit::open(path.to_str().unwrap()).unwrap());
    let env = start_configured(|c| c.audit = audit).await;
    let (mut agent, secret) = connected_agent(&env, "i1", 4).await;
    let (r, _) = tokio::join!(env.submit("audited-1", 3000), async {
        agent
            .next_work(Duration::from_secs(5))
            .await
            .expect("delivered");
        agent.ack("audited-1", Outcome::Applied).await;
    });
    assert_eq!(
        Outcome::try_from(r.unwrap().outcome).unwrap(),
        Outcome::Applied
    );
    let mut bad = reset_of("alice", "audited-2", 1000);
    bad.user.as_mut().unwrap().forest = "other.example.test".into();
    let refused = env.send(bad, env.token.expose()).await.unwrap();
    assert_eq!(
        Outcome::try_from(refused.outcome).unwrap(),
        Outcome::AgentUnavailable
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |kind: &str, op: &str| {
        records
            .iter()
            .find(|r| r["record"] == kind && r["operation_id"] == op)
            .unwrap_or_else(|| panic!("no {kind} record for {op}: {text}"))
    };
    let asked = find("operation", "audited-1");
    assert_eq!(asked["actor"], "tenant:acme");
    assert_eq!(asked["user"], "sam:alice");
    assert_eq!(asked["action"], "reset");
    assert_eq!(asked["outcome"], "APPLIED");
    let done = find("outcome", "audited-1");
    assert_eq!(done["agent_id"], "a1");
    assert_eq!(done["agent_instance"], "i1");
    assert_eq!(
        find("operation", "audited-2")["outcome"],
        "AGENT_UNAVAILABLE"
    );
    for secret in ["Scripted#Pass1", env.token.expose(), secret.expose()] {
        assert!(!text.contains(secret), "a secret in the audit log");
    }
    env.shutdown.cancel();
}

async fn get_op(env: &Env, id: &str) -> Result<relay::proto::Operation, tonic::Status> {
    let mut c = WritebackClient::new(env.channel().await.unwrap());
    let mut req = tonic::Request::new(relay::proto::GetOperationRequest {
        tenant_id: "acme".into(),
        operation_id: id.into(),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", env.token.expose()).parse().unwrap(),
    );
    c.get_operation(req).await.map(tonic::Response::into_inner)
}

async fn ops_of(env: &Env, sam: &str) -> Vec<relay::proto::Operation> {
    let mut c = WritebackClient::new(env.channel().await.unwrap());
    let mut req = tonic::Request::new(relay::proto::ListOperationsRequest {
        tenant_id: "acme".into(),
        user: Some(UserRef {
            forest: FOREST.into(),
            id: Some(user_ref::Id::SamAccountName(sam.into())),
        }),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", env.token.expose()).parse().unwrap(),
    );
    c.list_operations(req)
        .await
        .unwrap()
        .into_inner()
        .operations
}

/// Every attempt leaves a record: requests refused before anything was queued (no agent,
/// writeback switched off, invalid input naming the field, an id reused for another request)
/// are found by GetOperation and ListOperations with their reason, and a burst of refusals is
/// bounded per tenant (the oldest go first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_request_is_visible_with_its_reason() {
    let env = start_configured(|c| c.refusal_records_limit = 4).await;
    let outcome = |o: &relay::proto::Operation| Outcome::try_from(o.outcome).unwrap();
    let stages = |o: &relay::proto::Operation| -> Vec<String> {
        o.timeline.iter().map(|e| e.stage.clone()).collect()
    };
    // No agent.
    let r = env.submit("ref-1", 1000).await.unwrap();
    assert_eq!(
        Outcome::try_from(r.outcome).unwrap(),
        Outcome::AgentUnavailable
    );
    let rec = get_op(&env, "ref-1").await.unwrap();
    assert_eq!(outcome(&rec), Outcome::AgentUnavailable);
    assert_eq!(stages(&rec), ["accepted", "refused"]);
    // Switched off.
    let off = cloud_gateway::tenants::ForestSettingsChange {
        writeback_enabled: Some(false),
        ..Default::default()
    };
    env.tenants
        .set_forest(&ACME, &FOREST_ID, &off)
        .await
        .unwrap();
    let r = env.submit("ref-2", 1000).await.unwrap();
    assert_eq!(Outcome::try_from(r.outcome).unwrap(), Outcome::NotEnabled);
    assert_eq!(
        outcome(&get_op(&env, "ref-2").await.unwrap()),
        Outcome::NotEnabled
    );
    let on = cloud_gateway::tenants::ForestSettingsChange {
        writeback_enabled: Some(true),
        ..Default::default()
    };
    env.tenants
        .set_forest(&ACME, &FOREST_ID, &on)
        .await
        .unwrap();
    // Invalid input: recorded under an id of its own, found by the user.
    let err = env.submit("bad id!", 1000).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // An id reused for another user: "real-1" names a queued operation of alice's.
    let now = env.store.now_ms().await.unwrap();
    let real = op("real-1");
    let queued = cloud_gateway::store::NewOperation {
        tenant: &ACME,
        operation_id: &real,
        forest: &FOREST_ID,
        kind: "reset",
        initiator: 1,
        trace_id: "",
        traceparent: "",
        accepted_ms: now,
        deadline_ms: now + 60_000,
        replica: "gw-1",
        envelope: b"sealed",
        key_version: 2,
        ttl: Duration::from_secs(60),
        user: "sam:alice",
    };
    env.store.create_operation(&queued, LIMITS).await.unwrap();
    let err = env.submit_as_user("bob", "real-1").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // A refused id is no claim: its retry is a new request (here refused again, and recorded).
    let r = env.submit_as_user("bob", "ref-1").await.unwrap();
    assert_eq!(
        Outcome::try_from(r.outcome).unwrap(),
        Outcome::AgentUnavailable
    );

    let alice = ops_of(&env, "alice").await;
    let invalid = alice
        .iter()
        .find(|o| o.operation_id.starts_with("refused-"))
        .unwrap_or_else(|| panic!("no record of the invalid request: {alice:?}"));
    assert_eq!(outcome(invalid), Outcome::Refused);
    // ListOperations omits timelines; GetOperation has the reason.
    let invalid = get_op(&env, &invalid.operation_id).await.unwrap();
    let detail = &invalid.timeline.last().unwrap().detail;
    assert!(
        detail.contains("INVALID_ARGUMENT") && detail.contains("operation_id"),
        "{detail}"
    );
    assert!(alice.iter().any(|o| o.operation_id == "ref-1"));
    let bob = ops_of(&env, "bob").await;
    let conflict = bob
        .iter()
        .find(|o| o.operation_id.starts_with("refused-"))
        .unwrap_or_else(|| panic!("no record of the reused id: {bob:?}"));
    let conflict = get_op(&env, &conflict.operation_id).await.unwrap();
    let detail = &conflict.timeline.last().unwrap().detail;
    assert!(detail.contains("ALREADY_EXISTS"), "{detail}");
    let real = get_op(&env, "real-1").await.unwrap();
    assert_eq!(
        real.state,
        relay::proto::OperationState::Queued as i32,
        "untouched"
    );

    // The fifth refusal pushes out the oldest.
    env.submit("ref-5", 1000).await.unwrap();
    assert_eq!(get_op(&env, "ref-5").await.unwrap().operation_id, "ref-5");
    // (ref-1 was refused again later, so ref-2 is the oldest.)
    let gone = get_op(&env, "ref-2").await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    env.shutdown.cancel();
}

/// Every value of every stream in Redis, concatenated.
async fn e2e_free_dump(url: &str) -> Vec<u8> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:q:*")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(&k)
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap();
        out.extend_from_slice(format!("{v:?}").as_bytes());
    }
    out
}

/// A forest whose queue is full answers RESOURCE_EXHAUSTED naming the forest, queues nothing,
/// and other tenants are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_forest_queue_is_resource_exhausted() {
    let env = start_configured(|c| c.forest_queue_limit = 2).await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 1).await;
    let (_, _) = tokio::join!(
        tokio::time::timeout(Duration::from_millis(500), env.submit("fill-1", 6000)),
        agent.next_work(Duration::from_secs(3))
    );
    let _ = tokio::time::timeout(Duration::from_millis(300), env.submit("fill-2", 6000)).await;
    let err = env.submit("over-1", 6000).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains(FOREST), "{}", err.message());
    // Seen by operators as a refusal; nothing queued, and a retry under the id is new.
    let rec = env
        .store
        .operation(&ACME, &op("over-1"))
        .await
        .unwrap()
        .expect("a refusal record");
    assert!(rec.refused && rec.outcome == Outcome::Refused, "{rec:?}");
    another_tenant_is_served(&env).await;
    env.shutdown.cancel();
}

/// A resubmission whose own wait ends while the operation can still be applied hears
/// IN_PROGRESS (never TIMED_OUT, which promises nothing more happens); once the agent answers,
/// a resubmission hears the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmission_with_a_shorter_wait_hears_in_progress() {
    let env = start().await;
    let (mut agent, _secret) = connected_agent(&env, "i1", 1).await;
    let (_, _) = tokio::join!(
        tokio::time::timeout(Duration::from_millis(500), env.submit("long-1", 10_000)),
        agent.next_work(Duration::from_secs(3))
    );
    let again = env.submit("long-1", 300).await.unwrap();
    assert_eq!(
        Outcome::try_from(again.outcome).unwrap(),
        Outcome::InProgress,
        "{again:?}"
    );
    assert!(again.message.contains("still being processed"), "{again:?}");
    agent.ack("long-1", Outcome::Applied).await;
    let mut last = Outcome::InProgress;
    for _ in 0..50 {
        last = Outcome::try_from(env.submit("long-1", 200).await.unwrap().outcome).unwrap();
        if last != Outcome::InProgress {
            break;
        }
    }
    assert_eq!(last, Outcome::Applied);
    env.shutdown.cancel();
}

/// Redis restarted empty (no AOF): the tenant and agent credential are gone with it. Callers
/// with a valid token hear UNAVAILABLE naming the lost store — never UNAUTHENTICATED — and
/// agents are refused the same way; before that, agents are told exactly why they are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_its_data_is_unavailable_not_unauthenticated() {
    let env = start().await;
    let secret = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a1")
        .await
        .unwrap();
    let unknown = ScriptedAgent::connect(&env, "nobody", "x", FOREST, "i1", 1)
        .await
        .err()
        .unwrap();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(
        unknown
            .message()
            .contains("no agent \"nobody\" holds this secret"),
        "{}",
        unknown.message()
    );
    let wrong = ScriptedAgent::connect(&env, "a1", "wrong", FOREST, "i1", 1)
        .await
        .err()
        .unwrap();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(
        wrong
            .message()
            .contains("no agent \"a1\" holds this secret: the agent id or the secret is mistyped"),
        "{}",
        wrong.message()
    );
    let bad_token = env
        .submit_as("acme", "wbt_nope", "t-1", 1000)
        .await
        .unwrap_err();
    assert_eq!(bad_token.code(), Code::Unauthenticated);
    assert!(
        bad_token.message().contains("not valid"),
        "{}",
        bad_token.message()
    );

    env.redis.lock().unwrap().restart().unwrap();
    let mut err = None;
    for _ in 0..50 {
        match env.submit("after-loss", 1000).await {
            Err(e) if e.code() == Code::Unavailable && e.message().contains("lost its data") => {
                err = Some(e);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let err = err.expect("a valid token after the store lost its data must give UNAVAILABLE");
    assert!(
        err.message().contains("nothing was queued"),
        "{}",
        err.message()
    );
    let agent = ScriptedAgent::connect(&env, "a1", secret.expose(), FOREST, "i1", 1)
        .await
        .err()
        .unwrap();
    assert_eq!(agent.code(), Code::Unavailable, "{agent:?}");
    env.shutdown.cancel();
}

/// Two operations for one user, accepted in order, with two agent instances reading: the
/// second is not delivered until the first is settled, whichever instance holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_operations_run_one_at_a_time_in_order() {
    let env = start().await;
    let (mut one, _secret) = connected_agent(&env, "one", 4).await;
    let second_agent = env
        .tenants
        .register_agent(&ACME, &FOREST_ID, "a2")
        .await
        .unwrap();
    let mut two = ScriptedAgent::connect(&env, "a2", second_agent.expose(), FOREST, "two", 4)
        .await
        .unwrap();
    let first = tokio::spawn({
        let req = reset_of("alice", "first", 8000);
        let token = env.token.expose().to_owned();
        let env_addr = env.channel().await.unwrap();
        async move {
            let mut c = WritebackClient::new(env_addr);
            let mut r = tonic::Request::new(req);
            r.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            c.submit(r).await
        }
    });
    while env
        .store
        .operation(&ACME, &op("first"))
        .await
        .unwrap()
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (second, (holder, got)) = tokio::join!(env.submit("second", 8000), async {
        // Whoever took "first" holds it; nothing else may arrive meanwhile, at either one.
        let (w1, w2) = tokio::join!(
            one.next_work(Duration::from_millis(1500)),
            two.next_work(Duration::from_millis(1500))
        );
        let works: Vec<Work> = w1.into_iter().chain(w2).collect();
        let ids: Vec<&str> = works.iter().map(|w| w.operation_id.as_str()).collect();
        assert_eq!(
            ids,
            ["first"],
            "the second ran before the first was settled"
        );
        let holder_is_one = env
            .store
            .operation(&ACME, &op("first"))
            .await
            .unwrap()
            .unwrap()
            .agent_instance
            == "one";
        let holder = if holder_is_one { &mut one } else { &mut two };
        holder.ack("first", Outcome::Applied).await;
        let (w1, w2) = tokio::join!(
            one.next_work(Duration::from_secs(2)),
            two.next_work(Duration::from_secs(2))
        );
        let got: Vec<Work> = w1.into_iter().chain(w2).collect();
        if got.len() == 1 {
            let rec = env
                .store
                .operation(&ACME, &op("second"))
                .await
                .unwrap()
                .unwrap();
            let agent = if rec.agent_instance == "one" {
                &one
            } else {
                &two
            };
            agent.ack("second", Outcome::Applied).await;
        }
        (holder_is_one, got)
    });
    let _ = holder;
    assert_eq!(
        got.iter()
            .map(|w| w.operation_id.as_str())
            .collect::<Vec<_>>(),
        ["second"],
        "the second is delivered once the first is settled"
    );
    assert_eq!(
        Outcome::try_from(second.unwrap().outcome).unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        Outcome::try_from(first.await.unwrap().unwrap().into_inner().outcome).unwrap(),
        Outcome::Applied
    );
    let acked_first = env
        .store
        .timeline(&ACME, &op("first"))
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.stage == "acknowledged")
        .unwrap()
        .at;
    let delivered_second = env
        .store
        .timeline(&ACME, &op("second"))
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.stage == "delivered")
        .unwrap()
        .at;
    assert!(delivered_second >= acked_first);
    // Another user is not held up by alice's queue.
    let (bob, _) = tokio::join!(env.submit_as_user("bob", "bob-1"), async {
        let (w1, w2) = tokio::join!(
            one.next_work(Duration::from_secs(2)),
            two.next_work(Duration::from_secs(2))
        );
        let w: Vec<Work> = w1.into_iter().chain(w2).collect();
        assert_eq!(w.len(), 1);
        let rec = env
            .store
            .operation(&ACME, &op("bob-1"))
            .await
            .unwrap()
            .unwrap();
        let agent = if rec.agent_instance == "one" {
            &one
        } else {
            &two
        };
        agent.ack("bob-1", Outcome::Applied).await;
    });
    assert_eq!(
        Outcome::try_from(bob.unwrap().outcome).unwrap(),
        Outcome::Applied
    );
    env.shutdown.cancel();
}

/// An agent that goes silent without closing its stream (frozen, or its path blackholed)
/// stops getting work within a few heartbeats; work accepted afterwards goes to the healthy
/// agent, and work it held is settled truthfully (TIMED_OUT), not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_stops_getting_work_within_seconds() {
    let env = start().await;
    let (mut quiet, secret) = connected_agent(&env, "quiet", 8).await;
    // Held by the agent that will fall silent.
    let (held, _) = tokio::join!(env.submit("held-1", 1500), async {
        let w = quiet.next_work(Duration::from_secs(3)).await.expect("work");
        assert_eq!(w.operation_id, "held-1");
        quiet.heartbeats.abort();
    });
    assert_eq!(
        Outcome::try_from(held.unwrap().outcome).unwrap(),
        Outcome::TimedOut,
        "delivered to an agent that never answered: it may have been applied"
    );
    let mut live = ScriptedAgent::connect(&env, "a1", secret.expose(), FOREST, "live", 8)
        .await
        .unwrap();
    let silent_for = std::time::Instant::now();
    let (answers, _) = tokio::join!(
        futures::future::join_all(["u1", "u2", "u3", "u4"].map(|u| env.submit_as_user(u, u))),
        async {
            for _ in 0..4 {
                let w = live.next_work(Duration::from_secs(5)).await.expect("work");
                live.ack(&w.operation_id, Outcome::Applied).await;
            }
        }
    );
    println!(
        "silent agent skipped; 4 operations served by the healthy one {:?} after",
        silent_for.elapsed()
    );
    for a in answers {
        assert_eq!(
            Outcome::try_from(a.unwrap().outcome).unwrap(),
            Outcome::Applied
        );
    }
    // The quiet one got nothing more, and its stream was closed (not merely starved).
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), quiet.rx.message()).await {
            Err(_) => {}
            Ok(Ok(Some(GatewayFrame {
                frame: Some(gateway_frame::Frame::Work(w)),
            }))) => panic!("a silent agent was given {}", w.operation_id),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None) | Err(_)) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the silent agent's session was not closed");
    env.shutdown.cancel();
}
