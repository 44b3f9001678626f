//! The agent's link, driven by a scripted gateway: a tonic `AgentLink` server on loopback with
//! real TLS, whose every frame this test chooses, talking to a real agent (`onprem_agent::run`)
//! that applies to a real Samba DC. What AD wrote is read from AD itself (`password_writes`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use relay::envelope::{AgentKey, AgentPublicKey, Binding, KeyBytes, OperationSigner, KEY_VERSION};
use relay::proto::agent_link_server::{AgentLink, AgentLinkServer};
use relay::proto::{
    agent_frame, gateway_frame, user_ref, Ack, AgentFrame, GatewayFrame, Heartbeat, Hello,
    Initiator, Outcome, SealedOperation, UserRef, Welcome, Work,
};
use relay::secret::Secret;
use relay::trace::TraceParent;
use testkit::{SambaDc, TestCa};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use onprem_agent::directory::DirectoryConfig;
use onprem_agent::{AgentConfig, AgentError};

mod common;
use common::{connections_to, reset, AdWrites, ConnectionSampler};

const TENANT: &str = "tenant-link";
const AGENT_ID: &str = "agent-link";
const AGENT_SECRET: &str = "link-secret-4b1d";
/// Bounds every wait for a frame.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The agent's log events (stable codes from docs/events.md), captured in memory.

mod events {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    /// One event the agent logged: its fields, as text.
    pub type Logged = HashMap<String, String>;

    static LOGGED: Mutex<Vec<Logged>> = Mutex::new(Vec::new());
    static NEXT_SPAN: AtomicU64 = AtomicU64::new(1);

    struct Capture;

    struct Fields<'a>(&'a mut Logged);

    impl Visit for Fields<'_> {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().to_owned(), value.to_owned());
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().to_owned(), format!("{value:?}"));
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.target().starts_with("onprem_agent")
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(NEXT_SPAN.fetch_add(1, Ordering::Relaxed))
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut fields = Logged::new();
            event.record(&mut Fields(&mut fields));
            fields.insert("level".into(), event.metadata().level().to_string());
            if fields.contains_key("event") {
                LOGGED.lock().expect("log capture").push(fields);
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    /// Captures the agent's coded events from now on (once per process).
    pub fn capture() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::subscriber::set_global_default(Capture).expect("no other subscriber");
        });
    }

    /// Events with stable code `code`.
    pub fn with_code(code: &str) -> Vec<Logged> {
        LOGGED
            .lock()
            .expect("log capture")
            .iter()
            .filter(|e| e.get("event").map(String::as_str) == Some(code))
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The scripted gateway.

/// The gateway half of one accepted `Connect` stream, held by the test.
struct AgentStream {
    hello: Hello,
    to_agent: Option<mpsc::Sender<Result<GatewayFrame, Status>>>,
    from_agent: Streaming<AgentFrame>,
    heartbeats: CancellationToken,
    /// `in_flight` of every heartbeat the agent sent.
    reported_in_flight: Vec<u32>,
}

/// What came from the agent, other than heartbeats.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a few per test
enum FromAgent {
    Ack(Ack),
    /// The agent ended its stream cleanly.
    Ended,
    /// The stream broke.
    Broken(Status),
}

impl AgentStream {
    async fn send(&self, work: Work) {
        self.to_agent
            .as_ref()
            .expect("stream still open")
            .send(Ok(GatewayFrame {
                frame: Some(gateway_frame::Frame::Work(work)),
            }))
            .await
            .expect("the agent's stream is open");
    }

    /// Ends the stream from the gateway's side (trailers with OK status).
    fn close(&mut self) {
        self.heartbeats.cancel();
        self.to_agent = None;
    }

    /// The next frame other than a heartbeat, or how the stream ended; `None` when nothing
    /// came within `within`.
    async fn next(&mut self, within: Duration) -> Option<FromAgent> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(until, self.from_agent.message())
                .await
                .ok()?;
            return Some(match msg {
                Ok(Some(AgentFrame {
                    frame: Some(agent_frame::Frame::Heartbeat(h)),
                })) => {
                    self.reported_in_flight.push(h.in_flight);
                    continue;
                }
                Ok(Some(AgentFrame {
                    frame: Some(agent_frame::Frame::Ack(ack)),
                })) => FromAgent::Ack(ack),
                Ok(Some(other)) => panic!("unexpected frame from the agent: {other:?}"),
                Ok(None) => FromAgent::Ended,
                Err(status) => FromAgent::Broken(status),
            });
        }
    }

    /// The next acknowledgment; fails the test on anything else.
    async fn ack(&mut self) -> Ack {
        match self.next(WAIT).await {
            Some(FromAgent::Ack(ack)) => ack,
            other => panic!("expected an acknowledgment within {WAIT:?}, got {other:?}"),
        }
    }

    /// Waits until a heartbeat reports `n` operations in flight.
    async fn wait_reported_in_flight(&mut self, n: u32) {
        let until = Instant::now() + WAIT;
        while !self.reported_in_flight.contains(&n) {
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no heartbeat reported {n} in flight");
            if let Some(other) = self.next(left.min(Duration::from_millis(200))).await {
                panic!("expected only heartbeats, got {other:?}");
            }
        }
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        self.heartbeats.cancel();
    }
}

/// The `AgentLink` service: refuses the next `refuse` attempts, accepts the others with a
/// Welcome and hands the stream to the test.
struct ScriptedLink {
    /// How far the scripted gateway's clock is ahead of this host's (ms).
    clock_ahead: Arc<std::sync::atomic::AtomicI64>,
    forest: String,
    /// The sealing key the last agent announced (work for this forest is sealed to it).
    agent_key: Arc<Mutex<Option<AgentPublicKey>>>,
    signer: Arc<OperationSigner>,
    refuse: Arc<AtomicU32>,
    attempts: Arc<Mutex<Vec<Instant>>>,
    streams: mpsc::UnboundedSender<AgentStream>,
}

#[tonic::async_trait]
impl AgentLink for ScriptedLink {
    type ConnectStream = ReceiverStream<Result<GatewayFrame, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        self.attempts.lock().unwrap().push(Instant::now());
        if self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Status::unavailable("scripted: gateway not ready"));
        }
        let credential = format!("Bearer {AGENT_ID}.{AGENT_SECRET}");
        if request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            != Some(credential.as_str())
        {
            return Err(Status::unauthenticated("unknown agent credential"));
        }
        let mut from_agent = request.into_inner();
        let hello = match tokio::time::timeout(WAIT, from_agent.message()).await {
            Ok(Ok(Some(AgentFrame {
                frame: Some(agent_frame::Frame::Hello(hello)),
            }))) => hello,
            other => return Err(Status::invalid_argument(format!("no hello: {other:?}"))),
        };
        let key = AgentPublicKey::from_bytes(&hello.sealing_key)
            .map_err(|e| Status::invalid_argument(format!("hello.sealing_key: {e}")))?;
        let sealing_key_id = key.id().to_owned();
        *self.agent_key.lock().unwrap() = Some(key);
        let (tx, rx) = mpsc::channel(64);
        let welcome = Welcome {
            tenant_id: TENANT.into(),
            forest: self.forest.clone(),
            replica: "scripted".into(),
            sealing_key_id,
            operation_signing_key: self.signer.public_key().to_vec(),
            heartbeat_interval_ms: 500,
            allow_protected_accounts: false,
            gateway_time_unix_ms: relay::now_unix_ms() + self.clock_ahead.load(Ordering::SeqCst),
            answer_grace_ms: 1000,
            previous_signing_keys: Vec::new(),
            scope: None,
        };
        tx.send(Ok(GatewayFrame {
            frame: Some(gateway_frame::Frame::Welcome(welcome)),
        }))
        .await
        .map_err(|_| Status::internal("stream closed"))?;
        // Heartbeats, so the agent does not give up on a silent gateway.
        let heartbeats = CancellationToken::new();
        tokio::spawn({
            let (tx, stop, ahead) = (tx.clone(), heartbeats.clone(), self.clock_ahead.clone());
            async move {
                let beat = || {
                    Ok(GatewayFrame {
                        frame: Some(gateway_frame::Frame::Heartbeat(Heartbeat {
                            sent_unix_ms: relay::now_unix_ms() + ahead.load(Ordering::SeqCst),
                            in_flight: 0,
                        })),
                    })
                };
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {
                            if tx.send(beat()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        self.streams
            .send(AgentStream {
                hello,
                to_agent: Some(tx),
                from_agent,
                heartbeats,
                reported_in_flight: Vec::new(),
            })
            .map_err(|_| Status::internal("test gone"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Gateway {
    /// How far this gateway's clock is ahead of the host's, in its frames and deadlines (ms).
    clock_ahead: Arc<std::sync::atomic::AtomicI64>,
    addr: SocketAddr,
    ca: TestCa,
    forest: String,
    agent_key: Arc<Mutex<Option<AgentPublicKey>>>,
    /// A key that is not the agent's: what another forest's agents would have been sealed to.
    outsider: AgentKey,
    /// Signs the envelopes, as the real gateway's master key does.
    signer: Arc<OperationSigner>,
    refuse: Arc<AtomicU32>,
    attempts: Arc<Mutex<Vec<Instant>>>,
    streams: mpsc::UnboundedReceiver<AgentStream>,
    stop: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Gateway {
    async fn start(forest: &str) -> Self {
        relay::tls::install_crypto_provider();
        let ca = TestCa::new(&["127.0.0.1"]).unwrap();
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(ca.cert_file()).unwrap(),
            std::fs::read(ca.key_file()).unwrap(),
        );
        let agent_key = Arc::new(Mutex::new(None));
        let signer = Arc::new(OperationSigner::from_master_key(
            &KeyBytes::generate().unwrap(),
        ));
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let refuse = Arc::new(AtomicU32::new(0));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let clock_ahead = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let link = ScriptedLink {
            clock_ahead: clock_ahead.clone(),
            forest: forest.to_owned(),
            agent_key: agent_key.clone(),
            signer: signer.clone(),
            refuse: refuse.clone(),
            attempts: attempts.clone(),
            streams: streams_tx,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .unwrap()
                .add_service(AgentLinkServer::new(link))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stop.clone().cancelled_owned(),
                ),
        );
        Self {
            clock_ahead,
            addr,
            ca,
            forest: forest.to_owned(),
            agent_key,
            outsider: AgentKey::generate().unwrap(),
            signer,
            refuse,
            attempts,
            streams,
            stop,
            server,
        }
    }

    /// The key work of `forest` is sealed to: the connected agent's for its own forest, an
    /// outsider's (another forest's agent) for any other.
    fn key(&self, forest: &str) -> AgentPublicKey {
        if forest == self.forest {
            self.agent_key
                .lock()
                .unwrap()
                .clone()
                .expect("an agent said hello")
        } else {
            self.outsider.public().clone()
        }
    }

    /// The next stream an agent opened and the gateway accepted.
    async fn accepted(&mut self) -> AgentStream {
        self.accepted_within(WAIT).await
    }

    async fn accepted_within(&mut self, within: Duration) -> AgentStream {
        tokio::time::timeout(within, self.streams.recv())
            .await
            .unwrap_or_else(|_| panic!("no agent connected within {within:?}"))
            .expect("gateway running")
    }

    fn attempts(&self) -> Vec<Instant> {
        self.attempts.lock().unwrap().clone()
    }

    /// A `Work` frame for `op`, sealed as the real gateway seals it, with `remaining` left
    /// (also on the gateway's clock).
    fn work(&self, op_id: &str, op: &SealedOperation, remaining: Duration) -> Work {
        self.work_sealed(op_id, op, remaining, remaining, &self.forest, &self.forest)
    }

    /// As [`Gateway::work`], the deadline `deadline_in` from now on the gateway's clock, sealed
    /// to `key_forest`'s agent key and bound to `bound_forest` (also the forest the frame
    /// names).
    fn work_sealed(
        &self,
        op_id: &str,
        op: &SealedOperation,
        remaining: Duration,
        deadline_in: Duration,
        key_forest: &str,
        bound_forest: &str,
    ) -> Work {
        let deadline_unix_ms = relay::now_unix_ms()
            + self.clock_ahead.load(Ordering::SeqCst)
            + deadline_in.as_millis() as i64;
        let traceparent = TraceParent::new_root().to_string();
        let binding = Binding {
            tenant_id: TENANT,
            forest: bound_forest,
            operation_id: op_id,
            deadline_unix_ms,
            traceparent: &traceparent,
        };
        let envelope = relay::envelope::seal_to(
            &[self.key(key_forest)],
            &self.signer,
            &binding,
            &op.encode_to_vec(),
        )
        .unwrap();
        Work {
            store_seq: 0,
            operation_id: op_id.to_owned(),
            tenant_id: TENANT.into(),
            forest: bound_forest.to_owned(),
            deadline_unix_ms,
            remaining_ms: remaining.as_millis() as u32,
            traceparent,
            envelope,
            key_version: KEY_VERSION,
            dispatch_traceparent: String::new(),
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(10), &mut server)
            .await
            .is_err()
        {
            server.abort();
            panic!("the scripted gateway did not stop within 10 s");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent, the DC, operations.

struct RunningAgent {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

impl RunningAgent {
    fn start(gateway: &Gateway, dc: &SambaDc, max_in_flight: u32, pool_size: usize) -> Self {
        Self::start_in(gateway, dc, max_in_flight, pool_size, None)
    }

    /// As [`RunningAgent::start`], with the journal and instance id in `state_dir`.
    fn start_in(
        gateway: &Gateway,
        dc: &SambaDc,
        max_in_flight: u32,
        pool_size: usize,
        state_dir: Option<std::path::PathBuf>,
    ) -> Self {
        Self::start_scoped(
            gateway,
            dc,
            max_in_flight,
            pool_size,
            state_dir,
            relay::scope::Scope::default(),
        )
    }

    /// As [`RunningAgent::start_in`], with the AD admin's local writeback `scope`.
    fn start_scoped(
        gateway: &Gateway,
        dc: &SambaDc,
        max_in_flight: u32,
        pool_size: usize,
        state_dir: Option<std::path::PathBuf>,
        scope: relay::scope::Scope,
    ) -> Self {
        let config = AgentConfig {
            gateway_url: format!("https://{}", gateway.addr),
            gateway_ca: gateway.ca.ca_file(),
            gateway_tls_name: None,
            agent_id: AGENT_ID.into(),
            agent_secret: Some(Secret::new(AGENT_SECRET)),
            forest: gateway.forest.clone(),
            extra_domains: Vec::new(),
            max_in_flight,
            directory: DirectoryConfig {
                urls: vec![dc.ldaps_url()],
                ca_file: dc.ca_file(),
                bind_dn: dc.svc_upn(),
                bind_password: Secret::new(dc.svc_password()),
                base_dn: dc.base_dn(),
                pool_size,
                // long enough to outlast a frozen DC
                connect_timeout: Duration::from_secs(20),
                use_dc_reason_text: true,
                scope,
            },
            metrics_listen: None,
            state_dir,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(onprem_agent::run(config, shutdown.clone()));
        Self { shutdown, task }
    }

    /// Shuts the agent down as the real gateway sees it: cancels it, reads what it still
    /// sends on `stream` until it ends its half, ends the gateway's half, and waits for `run`
    /// to return Ok (all within 15 s). Returns the acknowledgments that came meanwhile.
    async fn stop(self, stream: &mut AgentStream) -> Vec<Ack> {
        self.shutdown.cancel();
        let mut acks = Vec::new();
        loop {
            match stream.next(WAIT).await {
                Some(FromAgent::Ack(ack)) => acks.push(ack),
                Some(FromAgent::Ended | FromAgent::Broken(_)) => break,
                None => panic!("the agent did not end its stream within {WAIT:?} of shutdown"),
            }
        }
        stream.close();
        let within = Duration::from_secs(15);
        match tokio::time::timeout(within, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("the agent stopped with an error: {e}"),
            Ok(Err(e)) => panic!("the agent panicked: {e}"),
            Err(_) => panic!("the agent did not stop within {within:?}"),
        }
        acks
    }
}

/// Samba frozen with SIGSTOP until dropped (SIGCONT), also when the test fails.
struct Frozen(u32);

impl Frozen {
    fn new(dc: &SambaDc) -> Self {
        let pid = dc.pid().expect("samba's pid");
        signal("-STOP", pid);
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}: {status}");
}

fn reset_of(forest: &str, sam: &str, password: &str) -> SealedOperation {
    SealedOperation {
        user: Some(UserRef {
            forest: forest.to_owned(),
            id: Some(user_ref::Id::SamAccountName(sam.to_owned())),
        }),
        initiator: Initiator::EndUser as i32,
        action: Some(reset(password)),
        switches: None,
    }
}

fn upn(dc: &SambaDc, sam: &str) -> String {
    format!("{sam}@{}", dc.dns_domain())
}

fn outcome(ack: &Ack) -> Outcome {
    Outcome::try_from(ack.outcome).unwrap_or_default()
}

/// Nothing written to `dn` since `before`, and `password` still the one that binds.
fn assert_untouched(dc: &SambaDc, dn: &str, before: AdWrites, sam: &str, password: &str) {
    assert_eq!(AdWrites::read(dc, dn), before, "AD wrote {dn}");
    assert!(
        dc.can_bind(&upn(dc, sam), password),
        "{sam}'s password changed"
    );
}

// ---------------------------------------------------------------------------------------------

/// Work with less time left than the agent needs is refused with WB2012 and `EXPIRED` (which
/// promises nothing was applied), whichever of the two deadlines (time left when sent, or the
/// gateway's clock) is the short one; AD is not written. The same user reset in time is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_time_left_is_refused_and_not_applied() {
    events::capture();
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let dn = dc.create_user("tess", "Initial#Pass1").unwrap();
    let mut gateway = Gateway::start(&forest).await;
    let agent = RunningAgent::start(&gateway, &dc, 4, 2);
    let mut stream = gateway.accepted().await;
    assert_eq!(stream.hello.forest, forest);
    let created = AdWrites::read(&dc, &dn);

    let cases = [
        // (operation id, time left when sent, deadline on the gateway's clock)
        ("late-remaining-0", Duration::ZERO, Duration::from_secs(60)),
        // 100 ms left: below the agent's 150 ms minimum, though the clock says a minute
        (
            "late-remaining-100",
            Duration::from_millis(100),
            Duration::from_secs(60),
        ),
        // plenty left by the frame, but the deadline is 100 ms away on the clock
        (
            "late-by-clock",
            Duration::from_secs(60),
            Duration::from_millis(100),
        ),
    ];
    for (id, remaining, deadline_in) in cases {
        let op = reset_of(&forest, "tess", "Too-Late#Reset1");
        stream
            .send(gateway.work_sealed(id, &op, remaining, deadline_in, &forest, &forest))
            .await;
        let ack = stream.ack().await;
        assert_eq!(ack.operation_id, id);
        assert_eq!(outcome(&ack), Outcome::Expired, "{id}: {ack:?}");
        assert!(ack.message.contains("nothing was changed"), "{ack:?}");
        assert!(ack.detail.contains("deadline"), "{ack:?}");
        assert_eq!(ack.write_ms, 0, "{ack:?}");
        let logged = events::with_code("WB2012");
        assert!(
            logged
                .iter()
                .any(|e| e.get("operation_id").map(String::as_str) == Some(id)),
            "{id}: no WB2012 logged ({logged:?})"
        );
        assert_untouched(&dc, &dn, created, "tess", "Initial#Pass1");
    }

    // In time, the same reset through the same harness is applied, once.
    let op = reset_of(&forest, "tess", "In-Time#Reset2");
    stream
        .send(gateway.work("in-time", &op, Duration::from_secs(30)))
        .await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::Applied, "{ack:?}");
    assert_eq!(AdWrites::read(&dc, &dn), created.plus_password());
    assert!(dc.can_bind(&upn(&dc, "tess"), "In-Time#Reset2"));
    assert!(events::with_code("WB2012")
        .iter()
        .all(|e| e.get("operation_id").map(String::as_str) != Some("in-time")));

    assert!(agent.stop(&mut stream).await.is_empty());
    gateway.stop().await;
}

/// An envelope that names another forest is refused (`REFUSED`, WB2011 when it does not open)
/// and AD is not written: sealed with another forest's key; sealed with this forest's key but
/// bound to another forest (which the frame also claims); or opening fine but naming a user of
/// another forest inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_for_another_forest_is_refused() {
    events::capture();
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let other = "other.writeback.test";
    let dn = dc.create_user("omar", "Initial#Pass1").unwrap();
    let mut gateway = Gateway::start(&forest).await;
    let agent = RunningAgent::start(&gateway, &dc, 4, 2);
    let mut stream = gateway.accepted().await;
    let created = AdWrites::read(&dc, &dn);
    let minute = Duration::from_secs(60);

    // (operation id, key of, bound to, forest named inside, logged as WB2011)
    let cases = [
        ("other-key", other, other, other, true),
        (
            "other-binding",
            forest.as_str(),
            other,
            forest.as_str(),
            true,
        ),
        (
            "other-user-forest",
            forest.as_str(),
            forest.as_str(),
            other,
            false,
        ),
    ];
    for (id, key_of, bound_to, inside, wb2011) in cases {
        let op = reset_of(inside, "omar", "Cross-Forest#1");
        stream
            .send(gateway.work_sealed(id, &op, minute, minute, key_of, bound_to))
            .await;
        let ack = stream.ack().await;
        assert_eq!(ack.operation_id, id);
        assert_eq!(outcome(&ack), Outcome::Refused, "{id}: {ack:?}");
        assert!(ack.message.contains("nothing was changed"), "{ack:?}");
        let logged = events::with_code("WB2011")
            .iter()
            .any(|e| e.get("operation_id").map(String::as_str) == Some(id));
        assert_eq!(logged, wb2011, "{id}: WB2011 logged?");
        assert_untouched(&dc, &dn, created, "omar", "Initial#Pass1");
    }

    // This forest's own work, through the same harness, is applied once.
    let op = reset_of(&forest, "omar", "Own-Forest#2");
    stream.send(gateway.work("own-forest", &op, minute)).await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::Applied, "{ack:?}");
    assert_eq!(AdWrites::read(&dc, &dn), created.plus_password());
    assert!(dc.can_bind(&upn(&dc, "omar"), "Own-Forest#2"));

    assert!(agent.stop(&mut stream).await.is_empty());
    gateway.stop().await;
}

/// Sent more work than its in-flight limit while the DC is frozen, the agent runs at most
/// `max_in_flight` operations at once (counted as its LDAP connections to the DC, and as it
/// reports them) and holds the rest back, refusing none; once the DC thaws every operation is
/// applied and acknowledged exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_holds_back_the_excess() {
    const MAX_IN_FLIGHT: u32 = 2;
    const SENT: usize = 5;
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let dc_ip = dc.ip().parse().unwrap();
    let users: Vec<String> = (0..SENT).map(|i| format!("lim{i}")).collect();
    let dns: Vec<String> = users
        .iter()
        .map(|u| dc.create_user(u, "Initial#Pass1").unwrap())
        .collect();
    let before: Vec<AdWrites> = dns.iter().map(|dn| AdWrites::read(&dc, dn)).collect();
    let mut gateway = Gateway::start(&forest).await;
    // The pool could hold more than the limit: only the agent's own limit bounds this.
    let agent = RunningAgent::start(&gateway, &dc, MAX_IN_FLIGHT, 8);
    let mut stream = gateway.accepted().await;
    assert_eq!(stream.hello.max_in_flight, MAX_IN_FLIGHT);

    let sampler = ConnectionSampler::start(dc_ip, 636);
    let frozen = Frozen::new(&dc);
    for (i, u) in users.iter().enumerate() {
        let op = reset_of(&forest, u, &format!("Limit#Reset-{i}"));
        stream
            .send(gateway.work(&format!("limit-{i}"), &op, Duration::from_secs(60)))
            .await;
    }
    // The first operations reach the frozen DC and hang there.
    let until = Instant::now() + WAIT;
    while connections_to(dc_ip, 636) < MAX_IN_FLIGHT as usize {
        assert!(
            Instant::now() < until,
            "the operations never reached the DC"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // For a while nothing more starts, and nothing is refused: the excess waits.
    if let Some(early) = stream.next(Duration::from_millis(1500)).await {
        panic!("while the DC is frozen nothing can be answered, got {early:?}");
    }
    let frozen_connections = connections_to(dc_ip, 636);
    assert_eq!(
        frozen_connections, MAX_IN_FLIGHT as usize,
        "operations at the frozen DC at once, with a limit of {MAX_IN_FLIGHT}"
    );
    stream.wait_reported_in_flight(MAX_IN_FLIGHT).await;
    drop(frozen);

    let mut acks: HashMap<String, u32> = HashMap::new();
    while acks.len() < SENT {
        let ack = stream.ack().await;
        assert_eq!(outcome(&ack), Outcome::Applied, "{ack:?}");
        *acks.entry(ack.operation_id).or_default() += 1;
    }
    let (most, samples) = sampler.stop();
    // Whatever else the agent sends before its stream ends: no second acknowledgment.
    for ack in agent.stop(&mut stream).await {
        *acks.entry(ack.operation_id).or_default() += 1;
    }
    let reported = stream.reported_in_flight.iter().max().copied();
    println!(
        "{SENT} operations, limit {MAX_IN_FLIGHT}: {frozen_connections} LDAP connections while frozen, at most {most} at once ({samples} samples); heartbeats reported at most {reported:?} in flight"
    );
    assert!(
        most <= MAX_IN_FLIGHT as usize,
        "{most} operations ran at once with a limit of {MAX_IN_FLIGHT}"
    );
    assert_eq!(reported, Some(MAX_IN_FLIGHT));
    for i in 0..SENT {
        assert_eq!(acks.get(&format!("limit-{i}")), Some(&1), "{acks:?}");
        assert_eq!(AdWrites::read(&dc, &dns[i]), before[i].plus_password());
        assert!(dc.can_bind(&upn(&dc, &users[i]), &format!("Limit#Reset-{i}")));
    }
    gateway.stop().await;
}

/// Refused and closed streams: the agent reconnects each time, waiting longer and longer
/// (jittered exponential backoff from 200 ms: each wait is uniform in [100 ms, 200 ms × 2^n]),
/// and works once let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_with_growing_backoff() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let dn = dc.create_user("rita", "Initial#Pass1").unwrap();
    let mut gateway = Gateway::start(&forest).await;
    // attempts 1-3 refused, 4 accepted then closed at once, 5-7 refused, 8 accepted
    gateway.refuse.store(3, Ordering::SeqCst);
    let agent = RunningAgent::start(&gateway, &dc, 4, 2);
    let mut first = gateway.accepted().await;
    assert_eq!(gateway.attempts().len(), 4);
    gateway.refuse.store(3, Ordering::SeqCst);
    first.close();
    assert!(
        matches!(
            first.next(WAIT).await,
            Some(FromAgent::Ended | FromAgent::Broken(_))
        ),
        "the agent kept a stream the gateway closed"
    );
    // the last four waits are at most 1.6 + 3.2 + 6.4 + 12.8 s
    let mut stream = gateway.accepted_within(Duration::from_secs(60)).await;
    let attempts = gateway.attempts();
    assert_eq!(
        attempts.len(),
        8,
        "one attempt per refusal, then one that stays"
    );

    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    println!("gaps between attempts: {gaps:?}");
    for (n, gap) in gaps.iter().enumerate() {
        let ceiling = Duration::from_millis(200 << n);
        assert!(
            *gap >= Duration::from_millis(95),
            "attempt {} came {gap:?} after the previous one: no backoff",
            n + 2
        );
        // generous: the delay's ceiling plus a reconnect on a loaded machine
        assert!(
            *gap <= ceiling + Duration::from_secs(5),
            "gap {n}: {gap:?} is beyond the backoff's ceiling {ceiling:?}"
        );
    }
    // Growth: the longest of the last four waits (ceilings 1.6 s to 12.8 s) beats 1.5 × the
    // longest of the first two (ceilings 0.2 s and 0.4 s). Random jitter could make all of the
    // last four short: a chance of about 1 in 20000.
    let early = gaps[..2].iter().max().unwrap();
    let late = gaps[3..].iter().max().unwrap();
    assert!(
        *late > early.mul_f64(1.5),
        "backoff does not grow: first gaps {:?}, last gaps {:?}",
        &gaps[..2],
        &gaps[3..]
    );

    // Connected at last, the agent works.
    let op = reset_of(&forest, "rita", "After#Reconnect-1");
    let before = AdWrites::read(&dc, &dn);
    stream
        .send(gateway.work("after-reconnect", &op, Duration::from_secs(30)))
        .await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::Applied, "{ack:?}");
    assert_eq!(AdWrites::read(&dc, &dn), before.plus_password());
    assert!(dc.can_bind(&upn(&dc, "rita"), "After#Reconnect-1"));

    assert!(agent.stop(&mut stream).await.is_empty());
    drop(first);
    gateway.stop().await;
}

/// Shut down while an operation is in flight (its DC frozen), the agent finishes it once the
/// DC thaws, acknowledges it before ending its stream, and `run` returns Ok in bounded time;
/// AD written exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_the_operation_in_flight() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let dn = dc.create_user("dana", "Initial#Pass1").unwrap();
    let before = AdWrites::read(&dc, &dn);
    let mut gateway = Gateway::start(&forest).await;
    let agent = RunningAgent::start(&gateway, &dc, 4, 2);
    let mut stream = gateway.accepted().await;

    let frozen = Frozen::new(&dc);
    let op = reset_of(&forest, "dana", "Drained#Reset-1");
    stream
        .send(gateway.work("drain-1", &op, Duration::from_secs(60)))
        .await;
    stream.wait_reported_in_flight(1).await;
    let RunningAgent { shutdown, task } = agent;
    let mut task = task;
    shutdown.cancel();
    let cancelled = Instant::now();
    // It waits for the operation instead of dropping it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !task.is_finished(),
        "run returned with an operation in flight"
    );
    drop(frozen);

    let mut seen = Vec::new();
    loop {
        match stream.next(WAIT).await {
            Some(FromAgent::Ack(ack)) => seen.push(format!(
                "ack {} {}",
                ack.operation_id,
                outcome(&ack).as_str_name()
            )),
            Some(FromAgent::Ended) => {
                seen.push("end".into());
                // as the real gateway does when an agent ends its stream
                stream.close();
                break;
            }
            Some(FromAgent::Broken(status)) => {
                seen.push(format!("broken: {status}"));
                break;
            }
            None => panic!("the agent's stream neither acknowledged nor ended: {seen:?}"),
        }
    }
    assert_eq!(seen, ["ack drain-1 APPLIED", "end"]);
    match tokio::time::timeout(Duration::from_secs(15), &mut task).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("run did not return Ok within 15 s of shutdown: {other:?}"),
    }
    println!(
        "drained and stopped {:?} after shutdown",
        cancelled.elapsed()
    );
    assert_eq!(AdWrites::read(&dc, &dn), before.plus_password());
    assert!(dc.can_bind(&upn(&dc, "dana"), "Drained#Reset-1"));
    gateway.stop().await;
}

/// A restarted agent keeps its instance id and its journal: work the gateway re-sends after the
/// restart is answered from the journal and AD is written once; an operation whose outcome the
/// dead process never recorded is neither applied again nor answered "nothing changed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_answers_from_its_journal_and_never_applies_twice() {
    events::capture();
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let jules = dc.create_user("jules", "Initial#Pass1").unwrap();
    let kim = dc.create_user("kim", "Initial#Pass1").unwrap();
    let state = tempfile::tempdir().unwrap();
    let dir = || Some(state.path().to_owned());
    let mut gateway = Gateway::start(&forest).await;

    let before = AdWrites::read(&dc, &jules);
    let agent = RunningAgent::start_in(&gateway, &dc, 4, 2, dir());
    let mut stream = gateway.accepted().await;
    let instance = stream.hello.instance_id.clone();
    let work = gateway.work(
        "journaled-1",
        &reset_of(&forest, "jules", "Journaled#Reset-1"),
        Duration::from_secs(60),
    );
    stream.send(work.clone()).await;
    let first = stream.ack().await;
    assert_eq!(outcome(&first), Outcome::Applied);
    agent.stop(&mut stream).await;

    // The process is gone; a new one starts from the same state directory.
    let agent = RunningAgent::start_in(&gateway, &dc, 4, 2, dir());
    let mut stream = gateway.accepted().await;
    assert_eq!(
        stream.hello.instance_id, instance,
        "the instance id survives a restart"
    );
    stream.send(work).await;
    let again = stream.ack().await;
    assert_eq!(
        (outcome(&again), again.message.as_str()),
        (Outcome::Applied, first.message.as_str()),
        "answered as the first time"
    );
    assert_eq!(
        AdWrites::read(&dc, &jules),
        before.plus_password(),
        "written once"
    );
    assert!(dc.can_bind(&upn(&dc, "jules"), "Journaled#Reset-1"));
    agent.stop(&mut stream).await;

    // A process that died between its intent and the outcome: the intent is on file.
    let line = format!(
        "{{\"op\":\"crashed-1\",\"at\":{},\"intent\":true}}\n",
        relay::now_unix_ms()
    );
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .open(state.path().join("journal.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut journal, line.as_bytes()).unwrap();
    drop(journal);
    let before = AdWrites::read(&dc, &kim);
    let agent = RunningAgent::start_in(&gateway, &dc, 4, 2, dir());
    let mut stream = gateway.accepted().await;
    stream
        .send(gateway.work(
            "crashed-1",
            &reset_of(&forest, "kim", "Never#Twice-1"),
            Duration::from_secs(60),
        ))
        .await;
    if let Some(other) = stream.next(Duration::from_secs(2)).await {
        panic!("an operation of unknown outcome was answered: {other:?}");
    }
    assert!(
        !events::with_code("WB2014").is_empty(),
        "the unknown outcome is logged"
    );
    assert_eq!(AdWrites::read(&dc, &kim), before, "not applied again");
    assert!(dc.can_bind(&upn(&dc, "kim"), "Initial#Pass1"));
    agent.stop(&mut stream).await;
    gateway.stop().await;
}

/// The gateway's clock runs 5 s ahead of the agent's, and a frame arrives stale: it says 3 s
/// were left when it was sent, but by the gateway's clock only 100 ms are. The agent reads the
/// deadline through the offset it measured from the gateway's heartbeats and refuses the work
/// (nothing after the deadline, on any clock); work with time left is applied as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_frame_from_a_gateway_with_another_clock_is_not_applied_late() {
    events::capture();
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let dn = dc.create_user("skew", "Initial#Pass1").unwrap();
    let mut gateway = Gateway::start(&forest).await;
    gateway.clock_ahead.store(5000, Ordering::SeqCst);
    let agent = RunningAgent::start(&gateway, &dc, 4, 2);
    let mut stream = gateway.accepted().await;
    // A few heartbeats so the agent has measured the offset.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = AdWrites::read(&dc, &dn);
    let stale = gateway.work_sealed(
        "stale-1",
        &reset_of(&forest, "skew", "Too#Late-Reset1"),
        Duration::from_secs(3),
        Duration::from_millis(100),
        &forest,
        &forest,
    );
    stream.send(stale).await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::Expired, "{ack:?}");
    assert_eq!(
        AdWrites::read(&dc, &dn),
        before,
        "nothing written after the deadline"
    );
    assert!(dc.can_bind(&upn(&dc, "skew"), "Initial#Pass1"));
    // In time on the gateway's clock: applied, the offset does not eat into real time.
    stream
        .send(gateway.work(
            "timely-1",
            &reset_of(&forest, "skew", "In#Time-Reset1"),
            Duration::from_secs(5),
        ))
        .await;
    assert_eq!(outcome(&stream.ack().await), Outcome::Applied);
    assert_eq!(AdWrites::read(&dc, &dn), before.plus_password());
    agent.stop(&mut stream).await;
    gateway.stop().await;
}

/// Marks `dn` protected (adminCount=1, as AD's SDProp does for members of protected groups).
fn protect(dc: &SambaDc, dn: &str) {
    let ldif = format!("dn: {dn}\nchangetype: modify\nreplace: adminCount\nadminCount: 1\n");
    let mut child = std::process::Command::new("ldapmodify")
        .args(["-H", &dc.ldaps_url(), "-x", "-D", &dc.admin_dn(), "-w"])
        .arg(dc.admin_password())
        .env("LDAPTLS_CACERT", dc.ca_file())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ldapmodify");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ldif.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "ldapmodify adminCount");
}

/// The forest's switches sealed with each operation decide, not the ones the Welcome carried
/// when the agent connected: an operator's change applies to the next operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_sealed_with_the_operation_decide() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let dn = dc.create_user("pam", "Initial#Pass1").unwrap();
    protect(&dc, &dn);
    let mut gateway = Gateway::start(&forest).await;
    let agent = RunningAgent::start(&gateway, &dc, 4, 2);
    let mut stream = gateway.accepted().await;
    let before = AdWrites::read(&dc, &dn);

    // The Welcome said "no protected accounts"; this operation was accepted after the switch
    // went on.
    let mut op = reset_of(&forest, "pam", "Switched#On1");
    op.switches = Some(relay::proto::ForestSwitches {
        allow_protected_accounts: true,
        unlock_enabled: true,
        scope: None,
    });
    stream
        .send(gateway.work("protected-allowed", &op, Duration::from_secs(30)))
        .await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::Applied, "{ack:?}");
    assert_eq!(AdWrites::read(&dc, &dn), before.plus_password());

    // Switched off again: refused, AD untouched.
    let written = AdWrites::read(&dc, &dn);
    let mut op = reset_of(&forest, "pam", "Switched#Off2");
    op.switches = Some(relay::proto::ForestSwitches {
        allow_protected_accounts: false,
        unlock_enabled: false,
        scope: None,
    });
    stream
        .send(gateway.work("protected-refused", &op, Duration::from_secs(30)))
        .await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::ProtectedAccount, "{ack:?}");
    let mut unlock = reset_of(&forest, "pam", "unused");
    unlock.action = Some(relay::proto::sealed_operation::Action::Unlock(
        relay::proto::UnlockAccount::default(),
    ));
    unlock.switches = op.switches.clone();
    stream
        .send(gateway.work("unlock-off", &unlock, Duration::from_secs(30)))
        .await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::NotEnabled, "{ack:?}");
    assert_untouched(&dc, &dn, written, "pam", "Switched#On1");

    assert!(agent.stop(&mut stream).await.is_empty());
    gateway.stop().await;
}

fn scope(ous: &[&str], groups: &[&str]) -> relay::scope::Scope {
    let own = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    relay::scope::Scope::parse(&own(ous), &own(groups), "ous", "groups").unwrap()
}

/// The writeback scope, as the AD admin (the agent's local scope) and the tenant admin (the
/// scope sealed with each operation) set it: by OU subtree and by nested group membership; a
/// user outside either is answered `OUT_OF_SCOPE` before anything is written (checked in AD);
/// the cloud scope narrows the local one and cannot widen it. Every answer names the user the
/// agent found in all three forms, and the objectGUID it reports finds the same account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_users_in_both_scopes_are_written_and_the_cloud_cannot_widen_the_local_one() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let forest = dc.dns_domain();
    let base = dc.base_dn();
    for ou in ["OU=Staff", "OU=Interns,OU=Staff", "OU=Contractors"] {
        dc.samba_tool(&["ou", "create", &format!("{ou},{base}")])
            .unwrap();
    }
    let pw = "Initial#Pass1";
    let sue = dc.create_user_in("sue", pw, "OU=Staff").unwrap();
    let ian = dc.create_user_in("ian", pw, "OU=Interns,OU=Staff").unwrap();
    let carl = dc.create_user_in("carl", pw, "OU=Contractors").unwrap();
    let olga = dc.create_user_in("olga", pw, "OU=Contractors").unwrap();
    // carl is in "Writeback Users" through "Helpdesk" only (nested).
    for g in ["Writeback Users", "Helpdesk"] {
        dc.samba_tool(&["group", "add", g]).unwrap();
    }
    dc.samba_tool(&["group", "addmembers", "Writeback Users", "Helpdesk"])
        .unwrap();
    dc.samba_tool(&["group", "addmembers", "Helpdesk", "carl"])
        .unwrap();
    let staff = format!("OU=Staff,{base}");
    let group = format!("CN=Writeback Users,CN=Users,{base}");
    let contractors = format!("ou=contractors, {}", base.to_lowercase());

    let mut gateway = Gateway::start(&forest).await;
    let agent = RunningAgent::start_scoped(&gateway, &dc, 4, 2, None, scope(&[&staff], &[&group]));
    let mut stream = gateway.accepted().await;
    let mut n = 0;
    let mut send = |sam: &str, cloud: Option<relay::scope::Scope>| {
        n += 1;
        let mut op = reset_of(&forest, sam, &format!("Scoped#Reset{n}"));
        op.switches = Some(relay::proto::ForestSwitches {
            allow_protected_accounts: false,
            unlock_enabled: true,
            scope: cloud.map(|c| c.to_proto()),
        });
        (
            gateway.work(&format!("scoped-{n}"), &op, Duration::from_secs(30)),
            n,
        )
    };
    let writes = |dn: &str| AdWrites::read(&dc, dn);

    // Local scope only: the OU's subtree and the nested member are written...
    for (sam, dn) in [("sue", &sue), ("ian", &ian), ("carl", &carl)] {
        let before = writes(dn);
        let (work, _) = send(sam, None);
        stream.send(work).await;
        let ack = stream.ack().await;
        assert_eq!(outcome(&ack), Outcome::Applied, "{sam}: {ack:?}");
        assert_eq!(writes(dn), before.plus_password(), "{sam}");
        let user = ack.user.as_ref().expect("the user found is reported");
        assert_eq!(user.sam_account_name, sam);
        assert_eq!(user.user_principal_name, upn(&dc, sam));
        assert_eq!(user.domain, forest.to_ascii_lowercase());
        assert!(user.dn.eq_ignore_ascii_case(dn), "{user:?}");
        assert_eq!(user.object_guid.len(), 36, "{user:?}");
    }
    // ... olga is in neither the OU nor the group: refused before any write.
    let before = writes(&olga);
    let (work, _) = send("olga", None);
    stream.send(work).await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::OutOfScope, "{ack:?}");
    assert!(ack.detail.contains("local scope"), "{}", ack.detail);
    assert_eq!(ack.message, relay::messages::OUT_OF_SCOPE);
    assert_eq!(ack.user.as_ref().unwrap().sam_account_name, "olga");
    assert_untouched(&dc, &olga, before, "olga", pw);

    // The tenant admin narrows to OU=Staff: carl, in the local scope by group, is now out.
    let before = writes(&carl);
    let (work, _) = send("carl", Some(scope(&[&staff], &[])));
    stream.send(work).await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::OutOfScope, "{ack:?}");
    assert!(ack.detail.contains("set on the gateway"), "{}", ack.detail);
    assert_eq!(
        writes(&carl),
        before,
        "carl written outside the cloud scope"
    );

    // The tenant admin names OU=Contractors (spelled otherwise): carl is in both scopes and
    // written; olga stays out, whatever the cloud side says.
    let before = writes(&carl);
    let (work, _) = send("carl", Some(scope(&[&contractors], &[])));
    stream.send(work).await;
    assert_eq!(outcome(&stream.ack().await), Outcome::Applied);
    assert_eq!(writes(&carl), before.plus_password());
    let before = writes(&olga);
    let (work, _) = send("olga", Some(scope(&[&contractors], &[])));
    stream.send(work).await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::OutOfScope, "{ack:?}");
    assert_untouched(&dc, &olga, before, "olga", pw);

    // The objectGUID the agent reported names the same account.
    let (work, _) = send("sue", None);
    stream.send(work).await;
    let guid = stream.ack().await.user.unwrap().object_guid;
    let before = writes(&sue);
    let mut op = reset_of(&forest, "sue", "By#Guid-Reset1");
    op.user.as_mut().unwrap().id = Some(user_ref::Id::ObjectGuid(guid.clone()));
    stream
        .send(gateway.work("by-guid", &op, Duration::from_secs(30)))
        .await;
    let ack = stream.ack().await;
    assert_eq!(outcome(&ack), Outcome::Applied, "{ack:?}");
    assert_eq!(writes(&sue), before.plus_password());
    assert_eq!(ack.user.unwrap().object_guid, guid);

    // A policy query says whether the user is in scope, and shows nothing of theirs if not.
    for (sam, out) in [("sue", false), ("olga", true)] {
        let mut op = reset_of(&forest, sam, "unused");
        op.action = Some(relay::proto::sealed_operation::Action::QueryPolicy(
            relay::proto::QueryPolicy {},
        ));
        stream
            .send(gateway.work(&format!("policy-{sam}"), &op, Duration::from_secs(30)))
            .await;
        let ack = stream.ack().await;
        assert_eq!(outcome(&ack), Outcome::Applied, "{ack:?}");
        let policy = ack.policy.unwrap();
        assert_eq!(policy.out_of_scope, out, "{sam}: {policy:?}");
        if out {
            assert_eq!(policy.source, "domain");
            assert_eq!(policy.next_change_allowed_unix_ms, 0);
        }
    }
    assert!(agent.stop(&mut stream).await.is_empty());
    gateway.stop().await;
}
