//! The agent's side of `writeback.v1.AgentLink`: dial out to the gateway over TLS, say hello,
//! receive work sealed to this agent's own key (`keys.rs`), open it, apply it to AD and
//! acknowledge it. Only
//! outbound connections; reconnects with jittered exponential backoff.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};

use relay::backoff::Backoff;
use relay::envelope::{AgentKey, AgentKeyring, Binding};
use relay::proto::agent_link_client::AgentLinkClient;
use relay::proto::{
    agent_frame, gateway_frame, Ack, AgentFrame, Heartbeat, Hello, Outcome, PolicyViolation,
    SealedOperation, Welcome, Work,
};
use relay::trace::TraceParent;
use tracing::Instrument;

use crate::directory::{ApplyResult, Rules, Verified, WriteMark, MSG_UNAVAILABLE};
use crate::domains::Domains;
use crate::identity::{Credential, IdentityError};
use crate::journal::{Begin, Journal, JournalError};
use crate::keys::KeyError;
use crate::writer::Writer;
use crate::AgentConfig;
use relay::secret::Secret;

/// Frames buffered towards the gateway.
const OUTBOUND_BUFFER: usize = 64;
/// Work with less time than this left is refused as `EXPIRED` rather than started.
const MIN_TIME_TO_APPLY: Duration = Duration::from_millis(150);

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("sealing keys: {0}")]
    Keys(#[from] KeyError),
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("gateway url {url:?}: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("cannot read the gateway CA: {0}")]
    Ca(#[from] relay::tls::TlsError),
    #[error("cannot connect to the gateway: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("gateway refused the agent ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("gateway closed the stream")]
    Closed,
    #[error("gateway protocol error: {0}")]
    Protocol(String),
    #[error("credential: {0}")]
    Identity(#[from] IdentityError),
}

/// Long-lived state shared by all connections of this agent process.
pub struct Agent {
    config: AgentConfig,
    /// Where operations are applied: the forest's domains in `run`.
    writer: Arc<dyn Writer>,
    instance_id: String,
    /// Outcomes (and intents) of operations, so a redelivery is never applied twice.
    journal: Journal,
    /// This agent's sealing keys (read again at each connection, so a rotation made by
    /// `onprem-agent rotate-key` is announced at the next one).
    keys: Mutex<Arc<AgentKeyring>>,
    /// Set when the last session ended because its replica was draining.
    moving: std::sync::atomic::AtomicBool,
    /// The stream of the live session, where acknowledgments go, also those of work started
    /// on a session that has ended since (the gateway re-sent it on the new one).
    current: Mutex<Option<mpsc::Sender<AgentFrame>>>,
}

impl Agent {
    /// An agent whose journal and sealing keys live in `config.state_dir` (durable, stable
    /// instance id), or in memory when there is none.
    ///
    /// # Errors
    /// When the journal or the keys cannot be opened.
    pub fn new(config: AgentConfig, domains: Domains) -> Result<Arc<Self>, StartError> {
        Self::with_writer(config, Arc::new(domains))
    }

    /// As [`Agent::new`], applying operations with `writer` instead of the forest's domains
    /// (the benchmark's no-op writer; `onprem-agent run` has no way to choose one).
    ///
    /// # Errors
    /// When the journal or the keys cannot be opened.
    pub fn with_writer(
        config: AgentConfig,
        writer: Arc<dyn Writer>,
    ) -> Result<Arc<Self>, StartError> {
        let (journal, instance_id) = match &config.state_dir {
            Some(dir) => Journal::open(dir)?,
            None => (Journal::in_memory(), uuid::Uuid::new_v4().to_string()),
        };
        let keys = crate::keys::load_or_create(config.state_dir.as_deref())?;
        Ok(Arc::new(Self {
            config,
            writer,
            instance_id,
            journal,
            keys: Mutex::new(Arc::new(keys)),
            moving: std::sync::atomic::AtomicBool::new(false),
            current: Mutex::new(None),
        }))
    }

    /// The sealing keys as the state directory holds them now (the ones in memory when it
    /// cannot be read: the agent keeps working and says why).
    fn reload_keys(&self) -> Arc<AgentKeyring> {
        if let Some(dir) = &self.config.state_dir {
            match crate::keys::load_or_create(Some(dir)) {
                Ok(k) => *self.keys.lock().expect("keys") = Arc::new(k),
                Err(e) => {
                    tracing::error!(event = "WB2023", error = %e, "cannot read the sealing keys again; announcing the ones in memory")
                }
            }
        }
        self.keys.lock().expect("keys").clone()
    }

    fn endpoint(&self, credential: &Credential) -> Result<Endpoint, LinkError> {
        let url = &self.config.gateway_url;
        let bad = |detail: String| LinkError::BadUrl {
            url: url.clone(),
            detail,
        };
        if !url.starts_with("https://") {
            return Err(bad(
                "must start with https:// (the agent only talks TLS)".into()
            ));
        }
        let tls = crate::identity::tls(&self.config, credential)?;
        Ok(Endpoint::from_shared(url.clone())
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10)))
    }

    /// Stays connected until `shutdown`, reconnecting with jittered exponential backoff.
    ///
    /// # Errors
    /// Only for configuration errors that retrying cannot fix.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), LinkError> {
        relay::tls::install_crypto_provider();
        // Configuration errors retrying cannot fix end the agent here.
        self.endpoint(&crate::identity::credential(&self.config)?)?;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let started = Instant::now();
            let result = self.clone().session(&shutdown).await;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            let delay = if self.moving.swap(false, std::sync::atomic::Ordering::SeqCst) {
                backoff.reset();
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            match result {
                Ok(()) => tracing::info!(
                    event = "WB2002",
                    retry_in_ms = delay.as_millis() as u64,
                    "gateway closed the stream; reconnecting"
                ),
                Err(e) => {
                    tracing::warn!(event = "WB2002", error = %e, retry_in_ms = delay.as_millis() as u64, "gateway link down; reconnecting")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection: hello, welcome, then work and heartbeats until it breaks or `shutdown`.
    async fn session(self: Arc<Self>, shutdown: &CancellationToken) -> Result<(), LinkError> {
        // Read again at every connection: a renewed certificate is used from the next one.
        let credential = crate::identity::credential(&self.config)?;
        let channel: Channel = self.endpoint(&credential)?.connect().await?;
        let mut client = AgentLinkClient::new(channel);
        let (tx, rx) = mpsc::channel::<AgentFrame>(OUTBOUND_BUFFER);
        let high_water = self.journal.high_water();
        let keys = self.reload_keys();
        tx.send(AgentFrame {
            frame: Some(agent_frame::Frame::Hello(Hello {
                agent_id: self.config.agent_id.clone(),
                forest: self.config.forest.clone(),
                domains: self
                    .config
                    .all_domains()
                    .into_iter()
                    .map(|d| d.dns_name)
                    .collect(),
                version: relay::VERSION.to_owned(),
                max_in_flight: self.config.max_in_flight,
                instance_id: self.instance_id.clone(),
                probe: false,
                store_high_water: high_water.as_ref().map_or(0, |(_, n)| *n),
                store_high_water_tenant: high_water.map(|(t, _)| t).unwrap_or_default(),
                sealing_key: keys.current().public().as_bytes().to_vec(),
            })),
        })
        .await
        .map_err(|_| LinkError::Closed)?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        crate::identity::authorize(&mut request, &self.config, &credential)
            .map_err(LinkError::Protocol)?;
        let mut inbound = client
            .connect(request)
            .await
            .map_err(|s| LinkError::Refused {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner();

        let welcome = match inbound.message().await {
            Ok(Some(relay::proto::GatewayFrame {
                frame: Some(gateway_frame::Frame::Welcome(w)),
            })) => w,
            Ok(_) => return Err(LinkError::Protocol("expected a welcome first".into())),
            Err(s) => {
                return Err(LinkError::Refused {
                    code: s.code(),
                    message: s.message().to_owned(),
                })
            }
        };
        let session = Arc::new(self.clone().welcome(welcome, tx, keys)?);
        *self.current.lock().expect("current stream") = Some(session.tx.clone());
        let m = crate::metrics::get();
        m.gateway_connects.inc();
        m.connected.set(1);
        tracing::info!(event = "WB2001",
            gateway = %self.config.gateway_url,
            replica = %session.replica,
            tenant = %session.tenant,
            forest = %session.forest,
            instance = %self.instance_id,
            sealing_key_id = %session.keys.current().public().id(),
            "connected to gateway"
        );

        let heartbeat_every = session.heartbeat_interval;
        let silence_limit = heartbeat_every * 3;
        let mut last_heard = Instant::now();
        // The key of a renewal asked for and not answered yet; once renewed, this connection
        // (which keeps the certificate it started with) asks no more.
        let mut renewing: Option<(Secret, AgentKey)> = None;
        let mut renewed = false;
        // Told by a draining replica to move: reconnect without backing off.
        let mut moving = false;
        let mut tick = tokio::time::interval(heartbeat_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = tick.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        break Err(LinkError::Protocol("gateway silent for 3 heartbeats".into()));
                    }
                    let hb = Heartbeat { sent_unix_ms: relay::now_unix_ms(), in_flight: session.in_flight() };
                    if session.tx.send(AgentFrame { frame: Some(agent_frame::Frame::Heartbeat(hb)) }).await.is_err() {
                        break Err(LinkError::Closed);
                    }
                    if let (Credential::Certificate(cert), None, false) = (&credential, &renewing, renewed) {
                        if cert.renewal_due(relay::now_unix_ms()) {
                            renewing = self.ask_renewal(&session.tx).await;
                        }
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(f)) => {
                        last_heard = Instant::now();
                        match f.frame {
                            Some(gateway_frame::Frame::Work(work)) => session.clone().accept(work),
                            Some(gateway_frame::Frame::Heartbeat(hb)) => session.clock.sample(hb.sent_unix_ms),
                            Some(gateway_frame::Frame::Renewed(r)) => {
                                renewed = self.renewed(&session, &r, renewing.take());
                            }
                            Some(gateway_frame::Frame::Moving(m)) => {
                                tracing::info!(event = "WB2005", replica = %m.replica, "gateway replica draining: reconnecting at once");
                                moving = true;
                            }
                            Some(gateway_frame::Frame::Welcome(_)) | None => {
                                tracing::warn!("unexpected frame from gateway; ignored");
                            }
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(s) => break Err(LinkError::Refused { code: s.code(), message: s.message().to_owned() }),
                },
            }
        };
        m.connected.set(0);
        self.moving
            .store(moving, std::sync::atomic::Ordering::SeqCst);
        self.current.lock().expect("current stream").take();
        // Let operations already started finish and send their acknowledgments (bounded).
        session.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), session.tasks.wait()).await;
        if result.is_ok() {
            // End our half of the stream once the acknowledgments queued in it are sent (the
            // finished tasks held the only other references to its sender), and wait (bounded)
            // for the gateway to end its half: dropping the stream now would reset it and lose
            // them.
            drop(session);
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
        }
        result
    }

    /// Asks the gateway for a new certificate for a new key, bound to a new sealing key;
    /// returns both keys (kept until the answer comes).
    async fn ask_renewal(&self, tx: &mpsc::Sender<AgentFrame>) -> Option<(Secret, AgentKey)> {
        let made = crate::identity::new_request().and_then(|(csr, key)| {
            let next = AgentKey::generate()
                .map_err(|e| crate::identity::IdentityError::Key(e.to_string()))?;
            Ok((csr, key, next))
        });
        let (csr_pem, key, next) = match made {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(event = "WB2024", error = %e, "cannot make a renewal request");
                return None;
            }
        };
        let renew = AgentFrame {
            frame: Some(agent_frame::Frame::Renew(relay::proto::Renew {
                csr_pem,
                sealing_key: next.public().as_bytes().to_vec(),
            })),
        };
        tx.send(renew).await.ok()?;
        tracing::info!(
            event = "WB2024",
            "certificate past half its lifetime: renewal asked"
        );
        Some((key, next))
    }

    /// Opens a renewed certificate (sealed to this session's key) and keeps it with the key
    /// it was asked for, and makes the sealing key it is bound to the current one; both are
    /// used from the next connection. Returns whether it was kept.
    fn renewed(
        &self,
        session: &Session,
        r: &relay::proto::Renewed,
        asked: Option<(Secret, AgentKey)>,
    ) -> bool {
        let (Some((key, next)), Some(dir)) = (asked, &self.config.state_dir) else {
            tracing::warn!("a renewed certificate nobody asked for; ignored");
            return false;
        };
        let binding = relay::envelope::Binding::renewal(
            &session.tenant,
            &session.forest,
            r.not_after_unix_ms,
        );
        let pem = session
            .keys
            .open(
                &session.gateway_signing_keys,
                &binding,
                relay::envelope::KEY_VERSION,
                &r.sealed_certificate,
            )
            .map_err(|e| e.to_string())
            .and_then(|p| String::from_utf8(p.to_vec()).map_err(|e| e.to_string()));
        let pem = match pem {
            Ok(pem) => pem,
            Err(e) => {
                tracing::error!(event = "WB2024", error = %e, "the renewed certificate does not open with this agent's sealing key (not from this gateway?); ignored");
                return false;
            }
        };
        if let Err(e) = crate::identity::store(dir, &pem, &key) {
            tracing::error!(event = "WB2024", error = %e, "cannot keep the renewed certificate; the current one is used until it expires");
            return false;
        }
        match crate::keys::rotate_to(dir, next) {
            Ok(k) => {
                tracing::info!(event = "WB2024", not_after_unix_ms = r.not_after_unix_ms, sealing_key_id = %k.new_key_id, "certificate renewed and sealing key rotated; both used from the next connection")
            }
            Err(e) => {
                tracing::error!(event = "WB2023", error = %e, "certificate renewed, but the sealing key could not be rotated")
            }
        }
        true
    }

    fn welcome(
        self: Arc<Self>,
        w: Welcome,
        tx: mpsc::Sender<AgentFrame>,
        keys: Arc<AgentKeyring>,
    ) -> Result<Session, LinkError> {
        if w.forest != self.config.forest {
            return Err(LinkError::Protocol(format!(
                "gateway welcomed forest {:?}, configured {:?}",
                w.forest, self.config.forest
            )));
        }
        if w.sealing_key_id != keys.current().public().id() {
            return Err(LinkError::Protocol(format!(
                "gateway will seal to key {:?}, this agent announced {:?} (a gateway older than envelope version {})",
                w.sealing_key_id,
                keys.current().public().id(),
                relay::envelope::KEY_VERSION
            )));
        }
        if w.operation_signing_key.len() != 32 {
            return Err(LinkError::Protocol(format!(
                "welcome.operation_signing_key must be 32 bytes, got {}",
                w.operation_signing_key.len()
            )));
        }
        let clock = GatewayClock::default();
        clock.sample(w.gateway_time_unix_ms);
        Ok(Session {
            agent: self.clone(),
            tenant: w.tenant_id,
            forest: w.forest,
            replica: w.replica,
            keys,
            gateway_signing_keys: std::iter::once(w.operation_signing_key)
                .chain(w.previous_signing_keys)
                .collect(),
            allow_protected: w.allow_protected_accounts,
            welcome_scope: w.scope,
            answer_grace: Duration::from_millis(u64::from(w.answer_grace_ms)),
            heartbeat_interval: Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(500))),
            permits: Arc::new(Semaphore::new(self.config.max_in_flight.max(1) as usize)),
            tx,
            tasks: TaskTracker::new(),
            clock,
        })
    }
}

/// One live connection's state.
struct Session {
    agent: Arc<Agent>,
    tenant: String,
    forest: String,
    replica: String,
    /// The keys work is opened with (the current one is what this session announced).
    keys: Arc<AgentKeyring>,
    /// The gateway's Ed25519 keys (from the Welcome): work none of them signed is refused.
    gateway_signing_keys: Vec<Vec<u8>>,
    allow_protected: bool,
    /// The forest's writeback scope when this session began (operations carry their own).
    welcome_scope: Option<relay::proto::WritebackScope>,
    /// How long after a deadline the gateway still records an answer.
    answer_grace: Duration,
    heartbeat_interval: Duration,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<AgentFrame>,
    tasks: TaskTracker,
    /// The gateway's clock (the store's) relative to ours, from its heartbeats.
    clock: GatewayClock,
}

/// How far the gateway's clock is ahead of ours, estimated from the times it stamps on its
/// frames. Each sample (its send time minus our receive time) can only be too low, by that
/// frame's transit delay; the highest recent sample is the closest, so a frame held up in a
/// stalled stream never makes the agent think it has more time than it has.
#[derive(Default)]
pub struct GatewayClock {
    samples: Mutex<std::collections::VecDeque<(Instant, i64)>>,
}

impl GatewayClock {
    /// How long samples count (clocks drift slowly; a minute of them is plenty).
    const WINDOW: Duration = Duration::from_secs(60);

    /// Records that the gateway stamped `sent_unix_ms` on a frame we received just now.
    pub fn sample(&self, sent_unix_ms: i64) {
        if sent_unix_ms <= 0 {
            return;
        }
        let mut samples = self.samples.lock().expect("gateway clock");
        samples.push_back((Instant::now(), sent_unix_ms - relay::now_unix_ms()));
        while samples
            .front()
            .is_some_and(|(at, _)| at.elapsed() > Self::WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Milliseconds the gateway's clock is ahead of ours (negative: behind), if it has said.
    pub fn offset_ms(&self) -> Option<i64> {
        self.samples
            .lock()
            .expect("gateway clock")
            .iter()
            .map(|(_, o)| *o)
            .max()
    }
}

impl Session {
    fn in_flight(&self) -> u32 {
        (self.agent.config.max_in_flight.max(1) as usize - self.permits.available_permits()) as u32
    }

    /// Starts one operation in the background (bounded by the in-flight limit the gateway
    /// also enforces).
    fn accept(self: Arc<Self>, work: Work) {
        let received = Instant::now();
        let session = self.clone();
        self.tasks.spawn(async move {
            let Ok(_permit) = session.permits.clone().acquire_owned().await else {
                return;
            };
            let in_flight = &crate::metrics::get().in_flight;
            in_flight.inc();
            let ack = session.process(work, received).await;
            in_flight.dec();
            let Some(ack) = ack else {
                return;
            };
            // The live session's stream if there is one (this work's may have ended while it
            // ran, and the gateway re-sent it on the new one), else this work's own.
            let tx = session
                .agent
                .current
                .lock()
                .expect("current stream")
                .clone()
                .unwrap_or_else(|| session.tx.clone());
            if tx
                .send(AgentFrame {
                    frame: Some(agent_frame::Frame::Ack(ack)),
                })
                .await
                .is_err()
            {
                tracing::warn!("stream closed before the acknowledgment was sent; the gateway resends the work on reconnect and it is answered from memory");
            }
        });
    }

    /// Applies one operation, or answers it from memory; `None` for a duplicate of an operation
    /// still running (its first delivery will answer).
    async fn process(&self, work: Work, received: Instant) -> Option<Ack> {
        let op_id = work.operation_id.clone();
        let span = tracing::info_span!(
            "agent.apply",
            otel.kind = "consumer",
            operation_id = %op_id,
            tenant = %self.tenant,
            forest = %self.forest,
            agent_id = %self.agent.config.agent_id,
            outcome = tracing::field::Empty,
        );
        let parent = if work.dispatch_traceparent.is_empty() {
            &work.traceparent
        } else {
            &work.dispatch_traceparent
        };
        relay::telemetry::set_parent(&span, parent);
        let trace = TraceParent::parse(&relay::telemetry::traceparent(&span))
            .or_else(|| TraceParent::parse(parent).map(|p| p.child()))
            .unwrap_or_else(TraceParent::new_root);
        let _guard = span.enter();
        // The store's sequence goes with the intent to disk: a store found behind it later was
        // restored from an older state (the gateway is told in the next Hello).
        self.agent.journal.seen(&self.tenant, work.store_seq);
        // Answer a redelivery from the journal; never apply an operation twice. The intent is
        // on disk before anything touches AD.
        match self.agent.journal.begin(&op_id) {
            Ok(Begin::Apply) => {}
            Ok(Begin::Answer(ack)) => {
                tracing::info!(
                    event = "WB2013",
                    "redelivered operation answered from the journal"
                );
                return Some(*ack);
            }
            Ok(Begin::Running) => {
                tracing::info!("operation already running; its first delivery answers");
                return None;
            }
            Ok(Begin::Uncertain(mark)) => {
                let Some(mark) = mark else {
                    tracing::warn!(event = "WB2014", operation_id = %op_id, "an earlier run of this agent started this operation and stopped before recording its outcome; not applied again, the gateway settles it TIMED_OUT");
                    return None;
                };
                tracing::warn!(event = "WB2014", operation_id = %op_id, "an earlier run of this agent stopped during this operation's write; not applied again, reading it back from AD");
                drop(_guard);
                let unconfirmed = Unconfirmed {
                    mark,
                    until: self.answer_until(self.deadline_of(&work, received)),
                };
                let base = Ack {
                    operation_id: op_id.clone(),
                    detail: "the agent stopped during the write".into(),
                    traceparent: trace.to_string(),
                    ..Default::default()
                };
                return self
                    .read_back(base, unconfirmed)
                    .instrument(span.clone())
                    .await;
            }
            Err(e) => {
                tracing::error!(event = "WB2015", error = %e, "cannot write the journal; operation not applied");
                return Some(refusal(
                    &op_id,
                    &trace,
                    Outcome::Failed,
                    "the agent cannot write its journal; nothing was applied",
                ));
            }
        }
        drop(_guard);
        let (ack, unconfirmed) = self
            .open_and_apply(work, received, &trace)
            .instrument(span.clone())
            .await;
        // The DC did not confirm the write: ask AD whether it landed.
        let ack = match unconfirmed {
            Some(u) if ack.outcome == Outcome::TimedOut as i32 => {
                return self.read_back(ack, u).instrument(span.clone()).await;
            }
            _ => ack,
        };
        span.record(
            "outcome",
            Outcome::try_from(ack.outcome)
                .unwrap_or_default()
                .as_str_name(),
        );
        if ack.outcome == Outcome::TimedOut as i32 {
            // The DC may have committed the write and AD could not be asked: no answer is
            // truthful but "unknown". The journal keeps the intent (a redelivery is not
            // applied again), and the gateway settles it TIMED_OUT.
            tracing::warn!(event = "WB2016", operation_id = %op_id, detail = %ack.detail, "the DC did not confirm a write it may have committed; outcome unknown, not answered");
            return None;
        }
        self.journal_outcome(&ack);
        Some(ack)
    }

    fn journal_outcome(&self, ack: &Ack) {
        if let Err(e) = self.agent.journal.finish(&ack.operation_id, ack) {
            tracing::error!(event = "WB2015", error = %e, "cannot record an outcome in the journal; it is answered from memory until the agent restarts");
        }
    }

    /// Reads an unconfirmed write back from AD and answers with what AD says (`base` is the
    /// answer so far); `None` when AD could not tell in time (the outcome stays unknown).
    async fn read_back(&self, base: Ack, u: Unconfirmed) -> Option<Ack> {
        let op_id = base.operation_id.clone();
        let verified = self.agent.writer.verify(&u.mark, u.until).await;
        let (outcome, message, evidence) = match verified {
            Some(Verified::Landed(evidence)) => {
                (Outcome::Applied, u.mark.check.applied_message(), evidence)
            }
            Some(Verified::Absent(evidence)) => {
                (Outcome::DirectoryUnavailable, MSG_UNAVAILABLE, evidence)
            }
            None => {
                tracing::warn!(event = "WB2016", operation_id = %op_id, detail = %base.detail, "the DC did not confirm a write it may have committed, and AD could not be read back in time; outcome unknown, not answered");
                return None;
            }
        };
        tracing::info!(event = "WB2018", operation_id = %op_id, outcome = outcome.as_str_name(), %evidence, "unconfirmed write read back from AD");
        let ack = Ack {
            outcome: outcome as i32,
            message: message.to_owned(),
            detail: format!(
                "{}; the DC did not confirm the write, read back from AD: {evidence}",
                base.detail
            ),
            ..base
        };
        self.journal_outcome(&ack);
        Some(ack)
    }

    /// The operation's deadline on our clock: the earlier of the time left when the gateway
    /// sent it (measured from when it arrived) and its deadline on the gateway's (the store's)
    /// clock read through the measured offset, so neither a skewed clock nor a stale frame
    /// stretches it.
    fn deadline_of(&self, work: &Work, received: Instant) -> Instant {
        let by_remaining = received + Duration::from_millis(u64::from(work.remaining_ms));
        let gateway_now = relay::now_unix_ms() + self.clock.offset_ms().unwrap_or(0);
        let by_clock_ms = work.deadline_unix_ms - gateway_now;
        let by_clock = if by_clock_ms <= 0 {
            Instant::now()
        } else {
            Instant::now() + Duration::from_millis(by_clock_ms as u64)
        };
        by_remaining.min(by_clock)
    }

    /// Until when an answer about an operation with this deadline is still recorded (and the
    /// operation still holds its user, so no other write for the user runs meanwhile): the
    /// gateway's grace period after the deadline, less a margin for the answer's transit.
    fn answer_until(&self, deadline: Instant) -> Instant {
        let grace = self.answer_grace;
        deadline + grace.saturating_sub((grace / 4).min(Duration::from_secs(2)))
    }

    async fn open_and_apply(
        &self,
        work: Work,
        received: Instant,
        trace: &TraceParent,
    ) -> (Ack, Option<Unconfirmed>) {
        let op_id = work.operation_id.as_str();
        let deadline = self.deadline_of(&work, received);
        if deadline.saturating_duration_since(Instant::now()) < MIN_TIME_TO_APPLY {
            tracing::warn!(event = "WB2012", operation_id = %op_id, "work arrived after its deadline; not applied");
            return (
                refusal(
                    op_id,
                    trace,
                    Outcome::Expired,
                    "deadline passed before the agent could apply it; nothing was changed",
                ),
                None,
            );
        }
        // Bind to *our* tenant and forest, not the frame's: a ciphertext moved to another
        // tenant's or forest's queue fails here and is reported, not applied.
        let binding = Binding {
            tenant_id: &self.tenant,
            forest: &self.forest,
            operation_id: op_id,
            deadline_unix_ms: work.deadline_unix_ms,
            traceparent: &work.traceparent,
        };
        let opened = tracing::info_span!("agent.open").in_scope(|| {
            self.keys.open(
                &self.gateway_signing_keys,
                &binding,
                work.key_version,
                &work.envelope,
            )
        });
        let sealed = match opened {
            Ok(plain) => SealedOperation::decode(plain.as_slice()),
            Err(e) => {
                tracing::error!(event = "WB2011", operation_id = %op_id, error = %e, "sealed operation does not open for this tenant and forest; refused");
                return (
                    refusal(
                        op_id,
                        trace,
                        Outcome::Refused,
                        &format!("sealed operation rejected: {e}"),
                    ),
                    None,
                );
            }
        };
        let op = match sealed {
            Ok(op) => op,
            Err(e) => {
                return (
                    refusal(
                        op_id,
                        trace,
                        Outcome::Refused,
                        &format!("sealed operation does not decode: {e}"),
                    ),
                    None,
                );
            }
        };
        if op.user.as_ref().is_none_or(|u| u.forest != self.forest) {
            return (
                refusal(
                    op_id,
                    trace,
                    Outcome::Refused,
                    "operation names another forest",
                ),
                None,
            );
        }
        // The switches sealed with the operation are the forest's as it was accepted; the
        // Welcome's only stand in for a gateway that does not seal them.
        let (allow_protected, unlock_enabled, scope) = match &op.switches {
            Some(s) => (
                s.allow_protected_accounts,
                s.unlock_enabled,
                s.scope.as_ref(),
            ),
            None => (self.allow_protected, true, self.welcome_scope.as_ref()),
        };
        // A scope that does not parse narrows to nothing: refused, never widened to all.
        let scope = match relay::scope::Scope::from_proto(scope) {
            Ok(s) => s,
            Err(e) => {
                return (
                    refusal(
                        op_id,
                        trace,
                        Outcome::Refused,
                        &format!("the operation's writeback scope is not usable: {e}"),
                    ),
                    None,
                )
            }
        };
        let rules = Rules {
            allow_protected,
            scope,
        };
        if !unlock_enabled
            && matches!(
                op.action,
                Some(relay::proto::sealed_operation::Action::Unlock(_))
            )
        {
            return (
                refusal(
                    op_id,
                    trace,
                    Outcome::NotEnabled,
                    "unlock is switched off for this forest; nothing was changed",
                ),
                None,
            );
        }
        let started = Instant::now();
        let result: ApplyResult = self
            .agent
            .writer
            .apply(&op, deadline, &rules, &|mark| {
                if let Err(e) = self.agent.journal.mark(op_id, mark) {
                    tracing::warn!(event = "WB2015", error = %e, "cannot journal the user's state before a write; after a crash its outcome stays unknown");
                }
            })
            .await;
        let kind = op.action.as_ref().map_or("none", |a| a.kind());
        crate::metrics::get()
            .operations
            .with_label_values(&[kind, result.outcome.as_str_name()])
            .inc();
        drop(op);
        let total_ms = received.elapsed().as_millis() as u32;
        tracing::info!(event = "WB2010",
            operation_id = %op_id,
            outcome = result.outcome.as_str_name(),
            policy_violation = result.policy_violation.as_str_name(),
            directory = %result.directory,
            lookup_ms = result.lookup_ms,
            write_ms = result.write_ms,
            apply_ms = started.elapsed().as_millis() as u64,
            "applied"
        );
        let unconfirmed = result.uncertain.map(|mark| Unconfirmed {
            mark,
            until: self.answer_until(deadline),
        });
        let ack = Ack {
            operation_id: op_id.to_owned(),
            outcome: result.outcome as i32,
            policy_violation: result.policy_violation as i32,
            message: result.message,
            detail: result.detail,
            lookup_ms: result.lookup_ms,
            write_ms: result.write_ms,
            total_ms,
            traceparent: trace.to_string(),
            directory: result.directory,
            policy: result.policy,
            user: result.user,
        };
        (ack, unconfirmed)
    }
}

/// A write the DC did not confirm, and until when AD may be asked whether it landed.
struct Unconfirmed {
    mark: WriteMark,
    until: Instant,
}

fn refusal(op_id: &str, trace: &TraceParent, outcome: Outcome, detail: &str) -> Ack {
    crate::metrics::get()
        .operations
        .with_label_values(&["unknown", outcome.as_str_name()])
        .inc();
    let message = match outcome {
        Outcome::Expired => {
            "The request expired before it could be applied; nothing was changed. Please try again."
        }
        _ => "The request could not be processed; nothing was changed.",
    };
    Ack {
        operation_id: op_id.to_owned(),
        outcome: outcome as i32,
        policy_violation: PolicyViolation::Unspecified as i32,
        message: message.to_owned(),
        detail: detail.to_owned(),
        traceparent: trace.to_string(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_clock_takes_the_least_delayed_sample() {
        let clock = GatewayClock::default();
        assert_eq!(clock.offset_ms(), None);
        let now = relay::now_unix_ms();
        // 5 s ahead; one frame arrived 2 s late (stalled stream), one nearly at once.
        clock.sample(now + 5000 - 2000);
        clock.sample(now + 5000 - 3);
        let offset = clock.offset_ms().unwrap();
        assert!((4990..=5000).contains(&offset), "{offset}");
        clock.sample(0);
        assert_eq!(clock.offset_ms(), Some(offset), "unset stamps are ignored");
    }
}
