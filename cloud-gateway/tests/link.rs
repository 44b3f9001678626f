//! The gateway's queue, delivery and deadline rules with a real Redis, real TLS and a scripted
//! agent speaking `AgentLink` directly, so each rule can be driven precisely.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Streaming};

use cloud_gateway::store::{OpState, Store};
use cloud_gateway::tenants::Tenants;
use cloud_gateway::GatewayConfig;
use relay::envelope::KeyBytes;
use relay::proto::agent_link_client::AgentLinkClient;
use relay::proto::writeback_client::WritebackClient;
use relay::proto::{
    agent_frame, gateway_frame, submit_request::Action, user_ref, Ack, AgentFrame, GatewayFrame,
    Hello, Initiator, Outcome, ResetPassword, SubmitRequest, SubmitResponse, UserRef, Work,
};
use relay::secret::Secret;
use testkit::{RedisServer, TestCa};

const FOREST: &str = "corp.example.test";

struct Env {
    // Kept alive for the test.
    _redis: RedisServer,
    ca: TestCa,
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
    relay::tls::install_crypto_provider();
    let redis = RedisServer::start().unwrap();
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
    let tenants = Tenants::new(store.clone(), key);
    let token = tenants.create_tenant("acme").await.unwrap();
    let env = Env {
        _redis: redis,
        ca,
        addr,
        store,
        tenants,
        token,
        shutdown,
    };
    for _ in 0..100 {
        if env.channel().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env
}

impl Env {
    async fn channel(&self) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.ca.ca_file())?))
            .domain_name("127.0.0.1");
        Ok(Endpoint::from_shared(format!("https://{}", self.addr))?
            .tls_config(tls)?
            .connect()
            .await?)
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
        let mut c = WritebackClient::new(self.channel().await.unwrap());
        let mut req = tonic::Request::new(SubmitRequest {
            tenant_id: tenant.into(),
            operation_id: op_id.into(),
            user: Some(UserRef {
                forest: FOREST.into(),
                id: Some(user_ref::Id::SamAccountName("alice".into())),
            }),
            initiator: Initiator::EndUser as i32,
            timeout_ms,
            action: Some(Action::Reset(ResetPassword {
                new_password: "Scripted#Pass1".into(),
                ..Default::default()
            })),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        c.submit(req).await.map(tonic::Response::into_inner)
    }
}

/// An agent under the test's control.
struct ScriptedAgent {
    tx: mpsc::Sender<AgentFrame>,
    rx: Streaming<GatewayFrame>,
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
        let (tx, rx) = mpsc::channel(16);
        tx.send(AgentFrame {
            frame: Some(agent_frame::Frame::Hello(Hello {
                agent_id: agent_id.into(),
                forest: forest.into(),
                domains: vec![],
                version: "test".into(),
                max_in_flight,
                instance_id: instance.into(),
                probe: false,
            })),
        })
        .await
        .unwrap();
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {agent_id}.{secret}").parse().unwrap(),
        );
        let mut client = AgentLinkClient::new(env.channel().await.unwrap());
        let mut inbound = client.connect(req).await?.into_inner();
        match inbound.message().await? {
            Some(GatewayFrame {
                frame: Some(gateway_frame::Frame::Welcome(w)),
            }) => {
                assert_eq!(w.forest_key.len(), 32);
                assert_eq!(w.tenant_id, "acme");
            }
            other => panic!("expected welcome, got {other:?}"),
        }
        // keep presence fresh
        let hb = tx.clone();
        tokio::spawn(async move {
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
        Ok(Self { tx, rx: inbound })
    }

    /// The next Work frame within `within`, skipping heartbeats.
    async fn next_work(&mut self, within: Duration) -> Option<Work> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .ok()?
                .ok()??;
            if let Some(gateway_frame::Frame::Work(w)) = msg.frame {
                return Some(w);
            }
        }
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
        .register_agent("acme", FOREST, "a1")
        .await
        .unwrap();
    let agent = ScriptedAgent::connect(env, "a1", secret.expose(), FOREST, instance, max_in_flight)
        .await
        .unwrap();
    wait_live(env).await;
    (agent, secret)
}

async fn wait_live(env: &Env) {
    for _ in 0..50 {
        if env
            .store
            .live_agents("acme", FOREST, Duration::from_secs(2))
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
        .register_agent("acme", FOREST, "a1")
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
    assert!(
        work.remaining_ms > 0 && work.remaining_ms <= 2500,
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
        .operation("acme", "slow-1")
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
            .operation("acme", "slow-1")
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
        .operation("acme", "slow-1")
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
        rec = env.store.operation("acme", "silent-1").await.unwrap();
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rec = env
        .store
        .operation("acme", "silent-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.outcome, Outcome::TimedOut);
    let tl = env.store.timeline("acme", "silent-1").await.unwrap();
    assert!(
        tl.iter().any(|e| e.stage == "late-acknowledgment"),
        "{tl:?}"
    );
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
            .operation("acme", "queued-1")
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
    let tl = env.store.timeline("acme", "queued-1").await.unwrap();
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
    let tl = env.store.timeline("acme", "redeliver-1").await.unwrap();
    assert_eq!(
        tl.iter().filter(|e| e.stage == "delivered").count(),
        1,
        "{tl:?}"
    );
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
    let err = env.submit("burst-2", 1000).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("\"acme\"") && err.message().contains("retry"),
        "{}",
        err.message()
    );

    let globex = env.tenants.create_tenant("globex").await.unwrap();
    let r = env
        .submit_as("globex", globex.expose(), "other-tenant", 1000)
        .await
        .unwrap();
    assert_eq!(
        Outcome::try_from(r.outcome).unwrap(),
        Outcome::AgentUnavailable
    );
    env.shutdown.cancel();
}
