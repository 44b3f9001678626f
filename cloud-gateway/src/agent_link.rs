//! `writeback.v1.AgentLink`: the outbound stream each on-premises agent holds. A session
//! authenticates the agent, publishes the sealing key it announced (so Submit on any replica
//! seals to it), feeds it the work sealed to that key from the forest's Redis stream (consumer
//! group, one consumer per agent instance) within the agent's in-flight limit, and records its
//! acknowledgments. No key that opens an operation ever travels on this stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use relay::envelope::{AgentPublicKey, KEY_VERSION};

use relay::proto::agent_link_server::AgentLink;
use relay::proto::{
    agent_frame, gateway_frame, Ack, AgentFrame, GatewayFrame, Heartbeat, Hello, Outcome,
    PolicyViolation, Welcome, Work,
};

use crate::error::GatewayError;
use crate::store::{
    self, Acknowledgment, Completion, Delivery, ForestId, OperationId, QueueEntry, TenantId,
};
use crate::tenants::AgentIdentity;
use crate::Gateway;

/// Frames buffered towards one agent before the dispatcher waits (backpressure).
const OUTBOUND_BUFFER: usize = 64;
/// How long past the answer grace period recording an acknowledgment is retried while the
/// store is away.
const RECORD_RETRY_FOR: Duration = Duration::from_secs(30);

/// How long an agent has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one blocking stream read waits for new work.
const READ_BLOCK: Duration = Duration::from_millis(1000);
/// How often a session looks for entries abandoned by dead sessions.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);
/// Upper bound on an agent's announced in-flight limit.
const MAX_IN_FLIGHT: u32 = 256;
/// On gateway shutdown, how long a session waits for in-flight acknowledgments.
const DRAIN: Duration = Duration::from_secs(5);
/// Longest user-facing message accepted from an agent.
const MAX_MESSAGE: usize = 1024;
/// Longest DN of a user an agent reports that is kept (on the timeline).
const MAX_DN: usize = 2048;
/// Longest agent version string.
const MAX_VERSION: usize = 64;
/// Most domains an agent may list.
const MAX_DOMAINS: usize = 64;
/// Most entries one read takes from the stream.
const READ_BATCH: usize = 32;
/// How soon work waiting for an older operation of its user is tried again.
const DEFER_RETRY: Duration = Duration::from_millis(50);
/// How often a silent agent's session looks again whether it has been heard.
const SILENT_RECHECK: Duration = Duration::from_millis(100);

pub struct AgentLinkService {
    gw: Gateway,
}

impl AgentLinkService {
    pub fn new(gw: Gateway) -> Self {
        Self { gw }
    }

    async fn open(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<ConnectStream, GatewayError> {
        let identity = crate::auth::caller_agent(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| GatewayError::invalid("hello", "no hello within 10 s"))?
            .map_err(|e| GatewayError::invalid("hello", e.message().to_owned()))?;
        let Some(AgentFrame {
            frame: Some(agent_frame::Frame::Hello(hello)),
        }) = first
        else {
            return Err(GatewayError::invalid(
                "hello",
                "the first frame must be a hello",
            ));
        };
        check_hello(&identity, &hello)?;

        let gw = &self.gw;
        if hello.probe {
            tracing::info!(event = "WB1014", agent_id = %identity.agent_id, "connectivity probe answered");
            let (tx, rx) = mpsc::channel(1);
            // The forest's scope, for the doctor to show and count.
            let settings = gw
                .tenants
                .forest(&identity.tenant, &identity.forest)
                .await?;
            let welcome = Welcome {
                tenant_id: identity.tenant.to_string(),
                forest: identity.forest.to_string(),
                replica: gw.config.replica_id.clone(),
                gateway_time_unix_ms: gw.clock.now_ms(),
                scope: Some(settings.scope.to_proto()),
                ..Default::default()
            };
            tx.send(Outbound::Frame(frame(gateway_frame::Frame::Welcome(
                welcome,
            ))))
            .await
            .map_err(|_| GatewayError::Internal("probe stream closed".into()))?;
            return Ok(outbound_stream(rx));
        }
        let sealing_key = sealing_key(&hello)?;
        if let Some(bound) = identity
            .sealing_key_id
            .as_ref()
            .filter(|bound| bound.as_str() != sealing_key.id())
        {
            tracing::warn!(event = "WB1028", tenant = %identity.tenant, agent_id = %identity.agent_id, announced = %sealing_key.id(), %bound, "an enrolled agent's stream announced a sealing key its certificate is not bound to: refused");
            return Err(crate::tenants::AgentRefusal::UnboundSealingKey {
                agent_id: identity.agent_id.clone(),
                announced: sealing_key.id().to_owned(),
                bound: bound.clone(),
            }
            .into());
        }
        // The agent journals the highest store sequence it received: a store behind it was
        // restored from an older state; settle what that put back before any delivery.
        if identity.tenant == hello.store_high_water_tenant {
            gw.store
                .check_sequence(&identity.tenant, hello.store_high_water, "agent hello")
                .await?;
        }
        let settings = gw
            .tenants
            .forest(&identity.tenant, &identity.forest)
            .await?;
        let queue = store::queue_key(&identity.tenant, &identity.forest);
        gw.store.ensure_group(&queue).await?;

        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let welcome = Welcome {
            tenant_id: identity.tenant.to_string(),
            forest: identity.forest.to_string(),
            replica: gw.config.replica_id.clone(),
            sealing_key_id: sealing_key.id().to_owned(),
            operation_signing_key: gw.tenants.signer().public_key().to_vec(),
            previous_signing_keys: gw.tenants.signing_keys()[1..]
                .iter()
                .map(|k| k.to_vec())
                .collect(),
            heartbeat_interval_ms: gw.config.heartbeat_interval.as_millis() as u32,
            allow_protected_accounts: settings.allow_protected_accounts,
            gateway_time_unix_ms: gw.clock.now_ms(),
            answer_grace_ms: gw.config.ack_grace.as_millis() as u32,
            scope: Some(settings.scope.to_proto()),
        };
        tx.send(Outbound::Frame(frame(gateway_frame::Frame::Welcome(
            welcome,
        ))))
        .await
        .map_err(|_| GatewayError::Internal("agent stream closed before welcome".into()))?;

        let max_in_flight = match hello.max_in_flight {
            0 => 8,
            n => n.min(MAX_IN_FLIGHT),
        };
        let member = format!(
            "{}|{}|{}",
            identity.agent_id, hello.instance_id, gw.config.replica_id
        );
        let sealing_mac =
            gw.tenants
                .sealing_key_mac(&identity.tenant, &identity.forest, &member, &sealing_key);
        let session = Arc::new(Session {
            gw: gw.clone(),
            member,
            sealing_key,
            sealing_mac,
            instance: hello.instance_id.clone(),
            version: hello.version.clone(),
            connected_ms: relay::now_unix_ms(),
            queue,
            identity,
            max_in_flight,
            permits: Arc::new(Semaphore::new(max_in_flight as usize)),
            in_flight: Mutex::default(),
            tx,
            last_heard: Mutex::new(Instant::now()),
            last_presence: Mutex::new(Instant::now()),
            cancel: gw.shutdown.child_token(),
            stream: gw.agent_streams.new_stream_id(),
        });
        tracing::info!(event = "WB1010",
            agent_id = %session.identity.agent_id,
            instance = %session.instance,
            tenant = %session.identity.tenant,
            forest = %session.identity.forest,
            version = %hello.version,
            sealing_key_id = %session.sealing_key.id(),
            max_in_flight,
            "agent connected"
        );
        gw.tasks.spawn(session.run(inbound));
        Ok(outbound_stream(rx))
    }
}

fn check_hello(identity: &AgentIdentity, hello: &Hello) -> Result<(), GatewayError> {
    if hello.agent_id != identity.agent_id {
        return Err(GatewayError::WrongTenant(format!(
            "hello.agent_id {:?} does not match the credential's agent",
            hello.agent_id
        )));
    }
    if identity.forest != hello.forest {
        return Err(GatewayError::WrongTenant(format!(
            "agent {} is registered for forest {:?}, not {:?}",
            identity.agent_id,
            identity.forest.as_str(),
            hello.forest
        )));
    }
    if hello.instance_id.is_empty() || hello.instance_id.len() > 64 {
        return Err(GatewayError::invalid(
            "hello.instance_id",
            "must be 1 to 64 characters",
        ));
    }
    // Everything an agent says is bounded: it is stored, logged and shown to operators.
    if hello.version.len() > MAX_VERSION {
        return Err(GatewayError::invalid(
            "hello.version",
            format!("must be at most {MAX_VERSION} characters"),
        ));
    }
    if hello.domains.len() > MAX_DOMAINS || hello.domains.iter().any(|d| d.len() > 253) {
        return Err(GatewayError::invalid(
            "hello.domains",
            format!("at most {MAX_DOMAINS} DNS names of at most 253 characters"),
        ));
    }
    if hello.store_high_water_tenant.len() > 64 {
        return Err(GatewayError::invalid(
            "hello.store_high_water_tenant",
            "must be at most 64 characters",
        ));
    }
    Ok(())
}

/// The sealing key a (non-probe) Hello announces.
fn sealing_key(hello: &Hello) -> Result<AgentPublicKey, GatewayError> {
    AgentPublicKey::from_bytes(&hello.sealing_key).map_err(|_| {
        GatewayError::invalid(
            "hello.sealing_key",
            format!(
                "must be the agent's 32-byte X25519 public key, got {} bytes (an agent older than envelope version {KEY_VERSION}: upgrade it)",
                hello.sealing_key.len()
            ),
        )
    })
}

fn frame(f: gateway_frame::Frame) -> GatewayFrame {
    GatewayFrame { frame: Some(f) }
}

#[tonic::async_trait]
impl AgentLink for AgentLinkService {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        Ok(Response::new(self.open(request).await?))
    }
}

/// Work sent to the agent and not yet acknowledged. Holds one of the session's in-flight
/// permits: dropping the entry (acknowledged, or the session ended) gives the permit back.
struct InFlight {
    sent: Instant,
    /// The operation's kind, for the end user's message.
    kind: String,
    _permit: OwnedSemaphorePermit,
}

/// This replica's count of agent streams for one (tenant, forest) (where it runs canaries) and
/// the connected-agents gauge, held for the life of a session and released on drop.
struct Registration {
    sessions: Arc<Mutex<HashMap<(TenantId, ForestId), usize>>>,
    key: (TenantId, ForestId),
    streams: Arc<AgentStreams>,
    agent: AgentKey,
    stream: u64,
}

/// The agent streams a replica holds, by agent identity (tenant, agent id), each with what closes it. One agent
/// identity has one live stream: a newer one (on any replica) closes the others, with an
/// alert (WB1016); a revocation or a rotated secret closes them all (WB1017).
#[derive(Default)]
pub struct AgentStreams {
    next: std::sync::atomic::AtomicU64,
    by_agent: Mutex<HashMap<AgentKey, Vec<(u64, CancellationToken)>>>,
}

/// An agent identity: agent ids are per tenant.
type AgentKey = (TenantId, String);

impl AgentStreams {
    /// A stream id unique across replicas and restarts.
    fn new_stream_id(&self) -> u64 {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (rand_u32() as u64) << 32 | (n & 0xffff_ffff)
    }

    fn add(&self, agent: &AgentKey, stream: u64, cancel: CancellationToken) {
        self.by_agent
            .lock()
            .expect("agent streams")
            .entry(agent.clone())
            .or_default()
            .push((stream, cancel));
    }

    fn remove(&self, agent: &AgentKey, stream: u64) {
        let mut m = self.by_agent.lock().expect("agent streams");
        if let Some(v) = m.get_mut(agent) {
            v.retain(|(s, _)| *s != stream);
            if v.is_empty() {
                m.remove(agent);
            }
        }
    }

    /// Closes the agent's streams here, but `keep`; returns how many.
    fn close(&self, agent: &AgentKey, keep: Option<u64>) -> usize {
        let m = self.by_agent.lock().expect("agent streams");
        let mut n = 0;
        for (s, cancel) in m.get(agent).into_iter().flatten() {
            if Some(*s) != keep {
                cancel.cancel();
                n += 1;
            }
        }
        n
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_le_bytes(b)
}

/// Listens on [`store::AGENTS_CHANNEL`] until shutdown (reconnecting): closes this replica's
/// streams of revoked agents, and of agents that opened a newer stream elsewhere.
pub async fn listen_agent_events(gw: Gateway) {
    let mut backoff =
        relay::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let listen = async {
            let mut pubsub = gw.store.subscribe(store::AGENTS_CHANNEL).await?;
            let mut messages = pubsub.on_message();
            while let Some(msg) = futures::StreamExt::next(&mut messages).await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                match store::AgentEvent::parse(&payload) {
                    Some(store::AgentEvent::Revoke { tenant, agent_id }) => {
                        let n = gw
                            .agent_streams
                            .close(&(tenant.clone(), agent_id.clone()), None);
                        if n > 0 {
                            tracing::warn!(event = "WB1017", %tenant, %agent_id, streams = n, "agent revoked or its secret rotated: its streams on this replica are closed");
                        }
                    }
                    Some(store::AgentEvent::Connect {
                        tenant,
                        agent_id,
                        stream,
                    }) => {
                        let n = gw
                            .agent_streams
                            .close(&(tenant.clone(), agent_id.clone()), Some(stream));
                        if n > 0 {
                            tracing::warn!(event = "WB1016", %tenant, %agent_id, streams = n, "the agent opened a newer stream: its older one on this replica is closed (one stream per agent identity; a credential used from two hosts shows up here)");
                        }
                    }
                    None => {
                        tracing::warn!(payload = %payload.escape_debug(), "unknown agent event; ignored")
                    }
                }
            }
            Ok::<_, store::StoreError>(())
        };
        tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            r = listen => {
                if let Err(e) = r {
                    tracing::warn!(event = "WB1090", error = %e, "agent event listener lost redis; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

impl Registration {
    fn new(gw: &Gateway, session: &Session) -> Self {
        let (tenant, forest) = (&session.identity.tenant, &session.identity.forest);
        let agent = (tenant.clone(), session.identity.agent_id.clone());
        gw.agent_streams
            .add(&agent, session.stream, session.cancel.clone());
        let key = (tenant.clone(), forest.clone());
        *gw.sessions
            .lock()
            .expect("sessions")
            .entry(key.clone())
            .or_default() += 1;
        let m = crate::metrics::get();
        m.connected_agents
            .with_label_values(&[tenant.as_str(), forest.as_str()])
            .inc();
        m.agent_sessions
            .with_label_values(&[tenant.as_str(), forest.as_str()])
            .inc();
        Self {
            sessions: gw.sessions.clone(),
            key,
            streams: gw.agent_streams.clone(),
            agent,
            stream: session.stream,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.streams.remove(&self.agent, self.stream);
        crate::metrics::get()
            .connected_agents
            .with_label_values(&[self.key.0.as_str(), self.key.1.as_str()])
            .dec();
        let mut sessions = self.sessions.lock().expect("sessions");
        if let Some(n) = sessions.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                sessions.remove(&self.key);
            }
        }
    }
}

/// A frame on its way to the agent. Work carries the time it was marked delivered, so the
/// time left is stamped when the frame actually leaves (a full buffer must not stretch the
/// agent's deadline).
enum Outbound {
    Frame(GatewayFrame),
    Work { work: Work, marked: Instant },
}

type FrameTx = mpsc::Sender<Outbound>;

/// The stream handed to tonic: stamps `remaining_ms` on each Work frame as it is polled out.
fn outbound_stream(rx: mpsc::Receiver<Outbound>) -> ConnectStream {
    Box::pin(ReceiverStream::new(rx).map(|o| {
        Ok(match o {
            Outbound::Frame(f) => f,
            Outbound::Work { mut work, marked } => {
                let waited = marked.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
                work.remaining_ms = work.remaining_ms.saturating_sub(waited);
                frame(gateway_frame::Frame::Work(work))
            }
        })
    }))
}

pub type ConnectStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<GatewayFrame, Status>> + Send>>;

/// One connected agent instance on this replica.
struct Session {
    gw: Gateway,
    identity: AgentIdentity,
    instance: String,
    version: String,
    connected_ms: i64,
    /// Presence member in the forest's agent set.
    member: String,
    /// The key work for this instance is sealed to (announced in its Hello), and the MAC of
    /// its record, so other replicas seal to it.
    sealing_key: AgentPublicKey,
    sealing_mac: String,
    queue: String,
    max_in_flight: u32,
    permits: Arc<Semaphore>,
    in_flight: Mutex<HashMap<OperationId, InFlight>>,
    tx: FrameTx,
    /// When the agent last sent anything: work goes only to an agent heard from recently.
    last_heard: Mutex<Instant>,
    /// When this session last refreshed the agent's presence in Redis.
    last_presence: Mutex<Instant>,
    /// Ends the session (agent gone, heartbeat lost, revoked, replaced, or gateway shutdown).
    cancel: CancellationToken,
    /// This stream's id among the agent's streams ([`AgentStreams`]).
    stream: u64,
}

/// What became of one entry handed to [`Session::dispatch`].
enum Dispatched {
    /// Sent, settled, or left pending for the deadline rules: nothing more to do here.
    Handled,
    /// An older operation of the same user is unsettled: try again shortly.
    Deferred(QueueEntry),
}

impl Session {
    /// Whether the agent has been heard from within two heartbeat intervals. A silent agent
    /// (frozen, or its path blackholed without a FIN) gets no new work, so work not yet sent
    /// goes to a healthy agent instead of waiting out its deadline in a dead stream.
    fn fresh(&self) -> bool {
        self.last_heard.lock().expect("last heard").elapsed()
            <= self.gw.config.heartbeat_interval * 2
    }

    async fn run(self: Arc<Self>, mut inbound: Streaming<AgentFrame>) {
        let gw = &self.gw;
        if let Err(e) = self.seen().await {
            tracing::warn!(error = %e, "could not record agent presence");
        }
        let registration = Registration::new(gw, &self);
        // One stream per agent identity: the others (here or on another replica) close.
        if let Err(e) = gw
            .store
            .publish_agent_event(&store::AgentEvent::Connect {
                tenant: self.identity.tenant.clone(),
                agent_id: self.identity.agent_id.clone(),
                stream: self.stream,
            })
            .await
        {
            tracing::warn!(error = %e, "could not announce the agent's stream to the other replicas");
        }
        let dispatcher = tokio::spawn(self.clone().dispatch_loop());
        let heartbeats = tokio::spawn(self.clone().heartbeat_loop());
        let mut last_heard = Instant::now();
        let silence_limit = gw.config.heartbeat_interval * 3;
        let mut drain_until: Option<tokio::time::Instant> = None;
        loop {
            let drain_sleep = async {
                match drain_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(f)) => {
                        last_heard = Instant::now();
                        *self.last_heard.lock().expect("last heard") = last_heard;
                        self.on_frame(f).await;
                        if drain_until.is_some() && self.in_flight_count() == 0 {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(event = "WB1015", agent_id = %self.identity.agent_id, error = %status.message(), "agent stream ended");
                        break;
                    }
                },
                _ = self.cancel.cancelled(), if drain_until.is_none() => {
                    if gw.shutdown.is_cancelled() && self.in_flight_count() > 0 {
                        drain_until = Some(tokio::time::Instant::now() + DRAIN);
                    } else {
                        break;
                    }
                }
                _ = drain_sleep => break,
                _ = tokio::time::sleep(silence_limit) => {
                    if last_heard.elapsed() >= silence_limit {
                        tracing::warn!(event = "WB1012", agent_id = %self.identity.agent_id, "agent silent for 3 heartbeats; closing its session");
                        break;
                    }
                }
            }
        }
        self.cancel.cancel();
        let _ = dispatcher.await;
        let _ = heartbeats.await;
        let in_flight = self.in_flight_count();
        if gw.shutdown.is_cancelled() {
            // Draining: the agent moves to another replica at once instead of backing off.
            let moving = relay::proto::Moving {
                replica: gw.config.replica_id.clone(),
            };
            let _ = self
                .tx
                .send(Outbound::Frame(frame(gateway_frame::Frame::Moving(moving))))
                .await;
            tracing::info!(event = "WB1033", agent_id = %self.identity.agent_id, in_flight, "replica draining: agent told to move");
        }
        // Unacknowledged work stays pending for this instance: it is sent again when the
        // instance reconnects, or settled by the deadline rules. Its permits go with the map.
        self.in_flight.lock().expect("in-flight map").clear();
        drop(registration);
        if let Err(e) = gw
            .store
            .agent_gone(
                &self.identity.tenant,
                &self.identity.forest,
                &self.member,
                &self.instance,
            )
            .await
        {
            tracing::warn!(error = %e, "could not remove agent presence");
        }
        tracing::info!(event = "WB1011",
            agent_id = %self.identity.agent_id,
            instance = %self.instance,
            in_flight,
            "agent session closed"
        );
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight.lock().expect("in-flight map").len()
    }

    async fn seen(&self) -> Result<(), store::StoreError> {
        let (tenant, forest) = (&self.identity.tenant, &self.identity.forest);
        self.gw
            .store
            .agent_seen(tenant, forest, &self.member)
            .await?;
        let fields = [
            ("agent_id", self.identity.agent_id.clone()),
            ("instance", self.instance.clone()),
            ("replica", self.gw.config.replica_id.clone()),
            ("version", self.version.clone()),
            ("connected", self.connected_ms.to_string()),
            ("last_heartbeat", relay::now_unix_ms().to_string()),
            ("in_flight", self.in_flight_count().to_string()),
            ("max_in_flight", self.max_in_flight.to_string()),
            ("seal_key", hex::encode(self.sealing_key.as_bytes())),
            ("seal_key_id", self.sealing_key.id().to_owned()),
            ("seal_mac", self.sealing_mac.clone()),
        ];
        self.gw
            .store
            .agent_info(
                tenant,
                forest,
                &self.member,
                &fields,
                self.gw.config.agent_liveness * 3,
            )
            .await
    }

    async fn on_frame(self: &Arc<Self>, f: AgentFrame) {
        match f.frame {
            Some(agent_frame::Frame::Ack(ack)) => {
                // Recorded on its own task: a store that is briefly away delays this answer
                // only, not the agent's other frames (its heartbeats keep the session live).
                let session = self.clone();
                self.gw
                    .tasks
                    .spawn(async move { session.on_ack(ack).await });
            }
            Some(agent_frame::Frame::Heartbeat(_)) => {
                // Liveness is judged in memory at every heartbeat; Redis presence (read by
                // other replicas) needs refreshing only a few times per liveness window.
                let due = {
                    let mut last = self.last_presence.lock().expect("last presence");
                    let due = last.elapsed() >= self.gw.config.agent_liveness / 3;
                    if due {
                        *last = Instant::now();
                    }
                    due
                };
                if due {
                    if let Err(e) = self.seen().await {
                        tracing::warn!(error = %e, "could not record agent presence");
                    }
                    // A revocation whose message was missed (Redis away) still bites here.
                    match self.gw.tenants.credential_current(&self.identity).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(event = "WB1017", agent_id = %self.identity.agent_id, "the agent's credential was revoked or rotated: its stream is closed");
                            self.cancel.cancel();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not check the agent's credential")
                        }
                    }
                }
            }
            Some(agent_frame::Frame::Renew(renew)) => self.renew(&renew).await,
            Some(agent_frame::Frame::Hello(_)) | None => {
                tracing::warn!(agent_id = %self.identity.agent_id, "unexpected frame from agent; ignored");
            }
        }
    }

    /// A new client certificate for an enrolled agent whose credential still stands: the
    /// same name and enrollment, a new key (the CSR's), bound to the new sealing key the
    /// request names, a new lifetime; sent sealed to this stream's sealing key. A revoked or
    /// re-enrolled agent gets none (its stream is closing anyway).
    async fn renew(&self, renew: &relay::proto::Renew) {
        let (Some(ca), Some(enrollment)) = (
            &self.gw.config.agent_ca,
            self.identity.secret_sha256.strip_prefix("cert:"),
        ) else {
            tracing::warn!(event = "WB1019", agent_id = %self.identity.agent_id, "renewal asked by an agent that did not enroll (or no agent CA here); ignored");
            return;
        };
        match self.gw.tenants.credential_current(&self.identity).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(event = "WB1019", agent_id = %self.identity.agent_id, "renewal refused: the agent was revoked or enrolled again");
                self.cancel.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the agent's credential; renewal not answered (the agent asks again)");
                return;
            }
        }
        // Required: a renewal that bound no key would let a stolen certificate key escape
        // the binding.
        let Ok(next_key) = AgentPublicKey::from_bytes(&renew.sealing_key) else {
            tracing::warn!(event = "WB1019", agent_id = %self.identity.agent_id, bytes = renew.sealing_key.len(), "renewal refused: renew.sealing_key is not a 32-byte X25519 public key (an agent from before certificates were bound to sealing keys: upgrade it, or enroll it again)");
            return;
        };
        let sealing_key_id = Some(next_key.id().to_owned());
        let who = crate::enroll::EnrolledName {
            tenant: self.identity.tenant.clone(),
            forest: self.identity.forest.clone(),
            agent_id: self.identity.agent_id.clone(),
            enrollment: enrollment.to_owned(),
            sealing_key_id,
        };
        let issued = ca.issue(&renew.csr_pem, &who).and_then(|(pem, not_after)| {
            let binding = relay::envelope::Binding::renewal(
                who.tenant.as_str(),
                who.forest.as_str(),
                not_after,
            );
            let sealed = relay::envelope::seal_to(
                std::slice::from_ref(&self.sealing_key),
                self.gw.tenants.signer(),
                &binding,
                pem.as_bytes(),
            )
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
            Ok((sealed, not_after))
        });
        match issued {
            Ok((sealed_certificate, not_after_unix_ms)) => {
                tracing::info!(event = "WB1018", agent_id = %who.agent_id, not_after_unix_ms, sealing_key_id = ?who.sealing_key_id, "agent certificate renewed");
                let renewed = relay::proto::Renewed {
                    not_after_unix_ms,
                    sealed_certificate,
                };
                let _ = self
                    .tx
                    .send(Outbound::Frame(frame(gateway_frame::Frame::Renewed(
                        renewed,
                    ))))
                    .await;
            }
            Err(e) => {
                tracing::warn!(event = "WB1019", agent_id = %who.agent_id, error = %e, "renewal refused")
            }
        }
    }

    async fn on_ack(&self, ack: Ack) {
        let span = tracing::info_span!(
            "writeback.acknowledge",
            tenant = %self.identity.tenant,
            forest = %self.identity.forest,
            operation_id = %ack.operation_id,
            agent_id = %self.identity.agent_id,
            outcome = Outcome::try_from(ack.outcome).unwrap_or_default().as_str_name(),
        );
        relay::telemetry::set_parent(&span, &ack.traceparent);
        self.record_ack(ack).instrument(span).await;
    }

    async fn record_ack(&self, ack: Ack) {
        // Dropping the entry gives its in-flight permit back.
        let tracked = self
            .in_flight
            .lock()
            .expect("in-flight map")
            .remove(ack.operation_id.as_str());
        let mut outcome = Outcome::try_from(ack.outcome).unwrap_or(Outcome::Unspecified);
        // An agent reports what the directory did; gateway-side outcomes are not its to claim.
        if matches!(
            outcome,
            Outcome::Unspecified | Outcome::TimedOut | Outcome::AgentUnavailable
        ) {
            outcome = Outcome::Failed;
        }
        let violation = if outcome == Outcome::RejectedByPolicy {
            PolicyViolation::try_from(ack.policy_violation).unwrap_or(PolicyViolation::Unknown)
        } else {
            PolicyViolation::Unspecified
        };
        let detail: String = ack.detail.chars().take(MAX_MESSAGE).collect();
        let directory: String = ack.directory.chars().take(256).collect();
        let m = crate::metrics::get();
        m.acknowledgments
            .with_label_values(&[
                self.identity.tenant.as_str(),
                self.identity.forest.as_str(),
                outcome.as_str_name(),
            ])
            .inc();
        if let Some(t) = &tracked {
            m.stage_seconds
                .with_label_values(&["agent"])
                .observe(t.sent.elapsed().as_secs_f64());
        }
        let round_trip = tracked
            .as_ref()
            .map(|t| t.sent.elapsed().as_millis())
            .unwrap_or_default();
        // The user the agent found, by every name it has, and the entry written to.
        let names = ack
            .user
            .as_ref()
            .map(crate::validate::resolved_names)
            .unwrap_or_default();
        let dn: String = ack
            .user
            .as_ref()
            .map(|u| u.dn.chars().take(MAX_DN).collect())
            .unwrap_or_default();
        let event_detail = format!(
            "{} via {}; lookup {} ms, write {} ms, agent total {} ms, round trip {} ms{}{}{}{}",
            outcome.as_str_name(),
            if directory.is_empty() {
                "-"
            } else {
                &directory
            },
            ack.lookup_ms,
            ack.write_ms,
            ack.total_ms,
            round_trip,
            if dn.is_empty() { "" } else { "; user " },
            dn,
            if detail.is_empty() { "" } else { "; " },
            detail
        );
        let policy = ack
            .policy
            .as_ref()
            .map(Message::encode_to_vec)
            .unwrap_or_default();
        // The agent names the operation: an id that breaks the rule names none of this forest's.
        let Ok(op) = OperationId::new(ack.operation_id.as_str()) else {
            tracing::warn!(event = "WB1023",
                operation_id = %ack.operation_id,
                "acknowledgment for an operation unknown in this forest; ignored"
            );
            return;
        };
        // The end user's message is the gateway's, from the outcome, the rule and the policy's
        // numbers: an agent's own text (it could say anything) never reaches a caller.
        let kind = match tracked
            .as_ref()
            .map(|t| t.kind.clone())
            .filter(|k| !k.is_empty())
        {
            Some(k) => k,
            None => self
                .gw
                .store
                .operation(&self.identity.tenant, &op)
                .await
                .ok()
                .flatten()
                .map(|r| r.kind)
                .unwrap_or_default(),
        };
        let message = relay::messages::end_user(&kind, outcome, violation, ack.policy.as_ref());
        // The agent's answer is the truth about AD: a store that is away (restarting, failing
        // over) must not lose it. Retried until the grace period after the deadline is well
        // over (then the deadline rules have settled it and it is kept as a late answer).
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        let recorded = loop {
            let result = self
                .gw
                .store
                .complete(&Acknowledgment {
                    tenant: &self.identity.tenant,
                    forest: &self.identity.forest,
                    op: &op,
                    instance: &self.instance,
                    agent_id: &self.identity.agent_id,
                    replica: &self.gw.config.replica_id,
                    outcome,
                    violation,
                    message: &message,
                    detail: &detail,
                    event_detail: &event_detail,
                    result: &policy,
                })
                .await;
            match result {
                Err(e)
                    if started.elapsed() < self.gw.config.ack_grace + RECORD_RETRY_FOR
                        && !self.gw.shutdown.is_cancelled() =>
                {
                    tracing::warn!(event = "WB1024", operation_id = %ack.operation_id, error = %e, "could not record an acknowledgment yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => break other,
            }
        };
        match recorded {
            Ok(Completion::Recorded { caller_replica }) => {
                self.gw.config.audit.record(&crate::audit::Record {
                    record: "outcome",
                    at_unix_ms: relay::now_unix_ms(),
                    actor: format!("agent:{}", self.identity.agent_id),
                    tenant: self.identity.tenant.as_str(),
                    forest: self.identity.forest.as_str(),
                    operation_id: op.as_str(),
                    action: &kind,
                    outcome: outcome.as_str_name(),
                    detail: if violation == PolicyViolation::Unspecified {
                        String::new()
                    } else {
                        violation.as_str_name().to_owned()
                    },
                    agent_id: &self.identity.agent_id,
                    agent_instance: &self.instance,
                    replica: &self.gw.config.replica_id,
                    took_ms: Some(u64::from(ack.total_ms)),
                    ..Default::default()
                });
                tracing::info!(event = "WB1022",
                    operation_id = %ack.operation_id,
                    agent_id = %self.identity.agent_id,
                    outcome = outcome.as_str_name(),
                    "outcome recorded"
                );
                if let Err(e) = self
                    .gw
                    .store
                    .notify_done(&caller_replica, &self.identity.tenant, &op)
                    .await
                {
                    tracing::warn!(error = %e, "could not notify the caller's replica; it will poll");
                }
                if kind == "change" || !names.is_empty() {
                    if let Ok(Some(rec)) = self.gw.store.operation(&self.identity.tenant, &op).await
                    {
                        self.learn_identity(&names, &op, &kind, rec.accepted_ms)
                            .await;
                        if kind == "change" {
                            crate::limits::settled(
                                &self.gw,
                                &self.identity.tenant,
                                &self.identity.forest,
                                &kind,
                                &rec.user,
                                outcome,
                            )
                            .await;
                        }
                    }
                }
            }
            Ok(Completion::AlreadyFinal) => tracing::info!(event = "WB1023",
                operation_id = %ack.operation_id,
                "acknowledgment for an operation already final; kept on the timeline only"
            ),
            Ok(Completion::NotDeliveredHere) => tracing::warn!(event = "WB1025",
                operation_id = %ack.operation_id,
                agent_id = %self.identity.agent_id,
                instance = %self.instance,
                "acknowledgment from an instance that was not given the operation; refused"
            ),
            Ok(Completion::Unknown) => tracing::warn!(event = "WB1023",
                operation_id = %ack.operation_id,
                "acknowledgment for an operation unknown in this forest; ignored"
            ),
            Err(e) => tracing::error!(event = "WB1024",
                operation_id = %ack.operation_id,
                error = %e,
                "could not record an acknowledgment, retried past the grace period; the deadline rules settle the operation"
            ),
        }
    }

    /// Remembers the names the agent found the user by, and indexes the operation under
    /// each (`store/identities.rs`); a policy query teaches the names only.
    async fn learn_identity(
        &self,
        names: &[relay::proto::user_ref::Id],
        op: &OperationId,
        kind: &str,
        accepted_ms: i64,
    ) {
        if names.is_empty() {
            return;
        }
        let labels: Vec<String> = names.iter().map(store::user_label).collect();
        let (tenant, forest) = (&self.identity.tenant, &self.identity.forest);
        let ttl = self.gw.config.record_ttl;
        let learned = if kind == "policy" {
            self.gw
                .store
                .learn_identity(tenant, forest, &labels, None, ttl)
                .await
        } else {
            self.gw
                .store
                .learn_identity(tenant, forest, &labels, Some((op, accepted_ms)), ttl)
                .await
        };
        if let Err(e) = learned {
            tracing::warn!(event = "WB1027", operation_id = %op, error = %e, "could not index the operation under the user's other names; ListOperations finds it by the name it was submitted with");
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.gw.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let hb = Heartbeat {
                sent_unix_ms: self.gw.clock.now_ms(),
                in_flight: self.in_flight_count() as u32,
            };
            if self
                .tx
                .send(Outbound::Frame(frame(gateway_frame::Frame::Heartbeat(hb))))
                .await
                .is_err()
            {
                self.cancel.cancel();
                return;
            }
        }
    }

    /// Waits for a free in-flight slot, then takes as many more as are free (up to a batch).
    async fn slots(&self) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            p = self.permits.clone().acquire_owned() => p.ok()?,
        };
        let mut slots = vec![first];
        while slots.len() < READ_BATCH {
            match self.permits.clone().try_acquire_owned() {
                Ok(p) => slots.push(p),
                Err(_) => break,
            }
        }
        Some(slots)
    }

    /// Reads work for this agent instance and sends it, never more than `max_in_flight` at once:
    /// each entry read holds one permit, which travels with it into the in-flight map.
    async fn dispatch_loop(self: Arc<Self>) {
        let mut backoff =
            relay::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let connect = || {
            self.gw
                .store
                .queue_reader(&self.queue, &self.instance, READ_BLOCK)
        };
        let mut reader = loop {
            match connect().await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatcher cannot reach redis; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        };
        // Work delivered to this instance before a reconnect is sent again; the agent answers
        // it from its journal if it already applied it.
        match reader.own_pending(MAX_IN_FLIGHT as usize).await {
            Ok(entries) => {
                for e in entries {
                    let permit = tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        p = self.permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return,
                        },
                    };
                    self.dispatch(e, permit).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read this instance's pending work"),
        }
        let mut last_reclaim = Instant::now();
        let mut deferred: Vec<QueueEntry> = Vec::new();
        loop {
            if !self.fresh() {
                // Silent agent: take nothing new until it is heard again (or the session ends).
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = tokio::time::sleep(SILENT_RECHECK) => continue,
                }
            }
            let Some(mut slots) = self.slots().await else {
                return;
            };
            // Entries waiting for an older operation of their user go first, in order.
            let mut waiting = std::mem::take(&mut deferred).into_iter();
            for entry in waiting.by_ref() {
                let Some(permit) = slots.pop() else {
                    deferred.push(entry);
                    break;
                };
                if let Dispatched::Deferred(entry) = self.dispatch(entry, permit).await {
                    deferred.push(entry);
                }
            }
            deferred.extend(waiting);
            if slots.is_empty() {
                if !deferred.is_empty() {
                    tokio::time::sleep(DEFER_RETRY).await;
                }
                continue;
            }
            let block = if deferred.is_empty() {
                READ_BLOCK
            } else {
                DEFER_RETRY
            };
            let read = if last_reclaim.elapsed() >= RECLAIM_EVERY {
                last_reclaim = Instant::now();
                // This instance's own pending entries first: a blocking read abandoned when an
                // earlier session of it ended (a drain, a reconnect) may still have assigned it
                // entries after that session's start-up look, which nobody would send otherwise.
                let own = reader.own_pending(MAX_IN_FLIGHT as usize).await.map(|own| {
                    let in_flight = self.in_flight.lock().expect("in-flight map");
                    own.into_iter()
                        .filter(|e| !in_flight.contains_key(&e.operation_id))
                        .take(slots.len())
                        .collect::<Vec<_>>()
                });
                match own {
                    Ok(own) if !own.is_empty() => Ok(own),
                    _ => {
                        reader
                            .autoclaim(self.gw.config.reclaim_idle, slots.len())
                            .await
                    }
                }
            } else {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    r = reader.read_new(slots.len(), block) => r,
                }
            };
            let entries = match read {
                Ok(entries) => {
                    backoff.reset();
                    entries
                }
                Err(e) => {
                    drop(slots);
                    crate::metrics::get().redis_errors.inc();
                    tracing::warn!(event = "WB1090", error = %e, queue = %self.queue, "reading work failed; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    if let Ok(r) = connect().await {
                        reader = r;
                    }
                    continue;
                }
            };
            // Slots beyond the entries read are given back as the iterator ends.
            for (entry, permit) in entries.into_iter().zip(slots) {
                if let Dispatched::Deferred(entry) = self.dispatch(entry, permit).await {
                    deferred.push(entry);
                }
            }
        }
    }

    /// Whether the entry was sealed to this instance's key.
    fn can_open(&self, entry: &QueueEntry) -> bool {
        entry.key_version == KEY_VERSION
            && relay::envelope::recipient_ids(&entry.envelope)
                .is_ok_and(|ids| ids.iter().any(|id| id == self.sealing_key.id()))
    }

    /// Hands one entry to the agent if the deadline rules allow. `permit` is this entry's
    /// in-flight slot: kept while the agent works on it, given back otherwise.
    async fn dispatch(&self, entry: QueueEntry, permit: OwnedSemaphorePermit) -> Dispatched {
        // Continues the operation's trace from the queued context, on whichever replica.
        let span = tracing::info_span!(
            "writeback.dequeue",
            tenant = %self.identity.tenant,
            forest = %self.identity.forest,
            operation_id = %entry.operation_id,
            agent_id = %self.identity.agent_id,
            replica = %self.gw.config.replica_id,
        );
        relay::telemetry::set_parent(&span, &entry.traceparent);
        self.dispatch_in_span(entry, permit).instrument(span).await
    }

    async fn dispatch_in_span(
        &self,
        entry: QueueEntry,
        permit: OwnedSemaphorePermit,
    ) -> Dispatched {
        let tenant = &self.identity.tenant;
        if self
            .in_flight
            .lock()
            .expect("in-flight map")
            .contains_key(&entry.operation_id)
        {
            // Still being worked on by this very instance (a slow write): nothing to do.
            return Dispatched::Handled;
        }
        if !self.can_open(&entry) {
            // Sealed before this instance was live (or to an earlier key of it): it stays
            // pending, undelivered, for an instance it was sealed to (one that reclaims it), or
            // EXPIRED by the deadline rules: never applied by anyone.
            tracing::info!(event = "WB1026", operation_id = %entry.operation_id, sealing_key_id = %self.sealing_key.id(), "operation not sealed to this agent's key; left for its recipients");
            return Dispatched::Handled;
        }
        let delivery = self
            .gw
            .store
            .mark_delivered(
                tenant,
                &self.identity.forest,
                &entry.operation_id,
                &store::Recipient {
                    agent_id: &self.identity.agent_id,
                    instance: &self.instance,
                    replica: &self.gw.config.replica_id,
                },
            )
            .await;
        let remaining = match delivery {
            Ok(Delivery::Deliver { remaining_ms } | Delivery::Redeliver { remaining_ms }) => {
                remaining_ms
            }
            Ok(Delivery::AlreadyDelivered(other)) => {
                // Another agent instance took it and may have applied it: never hand it to a
                // second one. The deadline rules will settle it if that instance never answers.
                tracing::warn!(event = "WB1021", operation_id = %entry.operation_id, other_instance = %other, "entry already delivered to another instance; not redelivered");
                return Dispatched::Handled;
            }
            Ok(Delivery::Wait(older)) => {
                tracing::debug!(operation_id = %entry.operation_id, %older, "an older operation of this user is unsettled; waiting");
                return Dispatched::Deferred(entry);
            }
            Ok(Delivery::Expired) => {
                tracing::info!(event = "WB1020", operation_id = %entry.operation_id, "deadline passed before delivery: EXPIRED");
                return Dispatched::Handled;
            }
            Ok(Delivery::Done) => {
                if let Err(e) = self.gw.store.drop_entry(&self.queue, &entry.id).await {
                    tracing::warn!(error = %e, "could not drop a settled entry");
                }
                return Dispatched::Handled;
            }
            Err(e) => {
                tracing::warn!(event = "WB1090", error = %e, operation_id = %entry.operation_id, "could not mark delivery; the entry stays pending");
                return Dispatched::Handled;
            }
        };
        let marked = Instant::now();
        if let Some(queued_ms) = entry
            .id
            .split('-')
            .next()
            .and_then(|ms| ms.parse::<i64>().ok())
        {
            crate::metrics::get()
                .stage_seconds
                .with_label_values(&["queue_wait"])
                .observe((relay::now_unix_ms() - queued_ms).max(0) as f64 / 1000.0);
        }
        let send_span = tracing::info_span!("agentlink.send", remaining_ms = remaining);
        let dispatch_traceparent = relay::telemetry::traceparent(&send_span);
        let work = Work {
            store_seq: self.gw.store.high_water(tenant),
            dispatch_traceparent,
            operation_id: entry.operation_id.to_string(),
            tenant_id: tenant.to_string(),
            forest: self.identity.forest.to_string(),
            deadline_unix_ms: entry.deadline_ms,
            remaining_ms: remaining,
            traceparent: entry.traceparent,
            envelope: entry.envelope,
            key_version: entry.key_version,
        };
        self.in_flight.lock().expect("in-flight map").insert(
            entry.operation_id.clone(),
            InFlight {
                sent: marked,
                kind: entry.kind.clone(),
                _permit: permit,
            },
        );
        if self
            .tx
            .send(Outbound::Work { work, marked })
            .instrument(send_span)
            .await
            .is_err()
        {
            // The agent went away: the entry stays pending and is sent again when this instance
            // reconnects, or settled by the deadline rules.
            self.in_flight
                .lock()
                .expect("in-flight map")
                .remove(&entry.operation_id);
            self.cancel.cancel();
        } else {
            tracing::debug!(operation_id = %entry.operation_id, agent_id = %self.identity.agent_id, remaining_ms = remaining, max_in_flight = self.max_in_flight, "work sent");
        }
        Dispatched::Handled
    }
}
