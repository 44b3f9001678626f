//! `writeback.v1.AgentLink`: the outbound stream each on-premises agent holds. A session
//! authenticates the agent, hands it its forest's data key, feeds it work from the forest's
//! Redis stream (consumer group, one consumer per agent instance) within the agent's in-flight
//! limit, and records its acknowledgments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use relay::proto::agent_link_server::AgentLink;
use relay::proto::{
    agent_frame, gateway_frame, Ack, AgentFrame, GatewayFrame, Heartbeat, Hello, Outcome,
    PolicyViolation, Welcome, Work,
};

use crate::error::GatewayError;
use crate::store::{self, Delivery, QueueEntry, TimelineEvent};
use crate::tenants::AgentIdentity;
use crate::Gateway;

/// Frames buffered towards one agent before the dispatcher waits (backpressure).
const OUTBOUND_BUFFER: usize = 64;
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

type FrameTx = mpsc::Sender<Result<GatewayFrame, Status>>;

pub struct AgentLinkService {
    gw: Gateway,
}

impl AgentLinkService {
    pub fn new(gw: Gateway) -> Self {
        Self { gw }
    }

    async fn authenticate<T>(&self, req: &Request<T>) -> Result<AgentIdentity, GatewayError> {
        let credential = crate::error::bearer(req)?;
        self.gw
            .tenants
            .authenticate_agent(credential)
            .await?
            .ok_or(GatewayError::Unauthenticated)
    }

    async fn open(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<ReceiverStream<Result<GatewayFrame, Status>>, GatewayError> {
        let identity = self.authenticate(&request).await?;
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
            let welcome = Welcome {
                tenant_id: identity.tenant.clone(),
                forest: identity.forest.clone(),
                replica: gw.config.replica_id.clone(),
                gateway_time_unix_ms: relay::now_unix_ms(),
                ..Default::default()
            };
            tx.send(Ok(frame(gateway_frame::Frame::Welcome(welcome))))
                .await
                .map_err(|_| GatewayError::Internal("probe stream closed".into()))?;
            return Ok(ReceiverStream::new(rx));
        }
        let forest_key = gw
            .tenants
            .forest_key(&identity.tenant, &identity.forest)
            .await?;
        let settings = gw
            .tenants
            .forest(&identity.tenant, &identity.forest)
            .await?;
        let queue = store::queue_key(&identity.tenant, &identity.forest);
        gw.store.ensure_group(&queue).await?;

        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let welcome = Welcome {
            tenant_id: identity.tenant.clone(),
            forest: identity.forest.clone(),
            replica: gw.config.replica_id.clone(),
            forest_key: forest_key.key_bytes().expose().to_vec(),
            heartbeat_interval_ms: gw.config.heartbeat_interval.as_millis() as u32,
            allow_protected_accounts: settings.allow_protected_accounts,
            gateway_time_unix_ms: relay::now_unix_ms(),
        };
        // The Welcome's key copy is dropped (and its buffer freed) once the frame is encoded.
        tx.send(Ok(frame(gateway_frame::Frame::Welcome(welcome))))
            .await
            .map_err(|_| GatewayError::Internal("agent stream closed before welcome".into()))?;

        let max_in_flight = match hello.max_in_flight {
            0 => 8,
            n => n.min(MAX_IN_FLIGHT),
        };
        let session = Arc::new(Session {
            gw: gw.clone(),
            member: format!(
                "{}|{}|{}",
                identity.agent_id, hello.instance_id, gw.config.replica_id
            ),
            instance: hello.instance_id.clone(),
            version: hello.version.clone(),
            connected_ms: relay::now_unix_ms(),
            queue,
            identity,
            max_in_flight,
            permits: Arc::new(Semaphore::new(max_in_flight as usize)),
            in_flight: Mutex::default(),
            tx,
            cancel: gw.shutdown.child_token(),
        });
        tracing::info!(event = "WB1010",
            agent_id = %session.identity.agent_id,
            instance = %session.instance,
            tenant = %session.identity.tenant,
            forest = %session.identity.forest,
            version = %hello.version,
            max_in_flight,
            "agent connected"
        );
        gw.tasks.spawn(session.run(inbound));
        Ok(ReceiverStream::new(rx))
    }
}

fn check_hello(identity: &AgentIdentity, hello: &Hello) -> Result<(), GatewayError> {
    if hello.agent_id != identity.agent_id {
        return Err(GatewayError::WrongTenant(format!(
            "hello.agent_id {:?} does not match the credential's agent",
            hello.agent_id
        )));
    }
    if hello.forest != identity.forest {
        return Err(GatewayError::WrongTenant(format!(
            "agent {} is registered for forest {:?}, not {:?}",
            identity.agent_id, identity.forest, hello.forest
        )));
    }
    if hello.instance_id.is_empty() || hello.instance_id.len() > 64 {
        return Err(GatewayError::invalid(
            "hello.instance_id",
            "must be 1 to 64 characters",
        ));
    }
    Ok(())
}

fn frame(f: gateway_frame::Frame) -> GatewayFrame {
    GatewayFrame { frame: Some(f) }
}

#[tonic::async_trait]
impl AgentLink for AgentLinkService {
    type ConnectStream = ReceiverStream<Result<GatewayFrame, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        Ok(Response::new(self.open(request).await?))
    }
}

struct InFlight {
    sent: Instant,
}

/// One connected agent instance on this replica.
struct Session {
    gw: Gateway,
    identity: AgentIdentity,
    instance: String,
    version: String,
    connected_ms: i64,
    /// Presence member in the forest's agent set.
    member: String,
    queue: String,
    max_in_flight: u32,
    permits: Arc<Semaphore>,
    in_flight: Mutex<HashMap<String, InFlight>>,
    tx: FrameTx,
    /// Ends the session (agent gone, heartbeat lost, or gateway shutdown).
    cancel: CancellationToken,
}

impl Session {
    async fn run(self: Arc<Self>, mut inbound: Streaming<AgentFrame>) {
        let gw = &self.gw;
        if let Err(e) = self.seen().await {
            tracing::warn!(error = %e, "could not record agent presence");
        }
        let labels = [self.identity.tenant.as_str(), self.identity.forest.as_str()];
        let session_key = (self.identity.tenant.clone(), self.identity.forest.clone());
        *gw.sessions
            .lock()
            .expect("sessions")
            .entry(session_key.clone())
            .or_default() += 1;
        let m = crate::metrics::get();
        m.connected_agents.with_label_values(&labels).inc();
        m.agent_sessions.with_label_values(&labels).inc();
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
        m.connected_agents.with_label_values(&labels).dec();
        {
            let mut sessions = gw.sessions.lock().expect("sessions");
            if let Some(n) = sessions.get_mut(&session_key) {
                *n -= 1;
                if *n == 0 {
                    sessions.remove(&session_key);
                }
            }
        }
        if let Err(e) = gw
            .store
            .agent_gone(&self.identity.tenant, &self.identity.forest, &self.member)
            .await
        {
            tracing::warn!(error = %e, "could not remove agent presence");
        }
        tracing::info!(event = "WB1011",
            agent_id = %self.identity.agent_id,
            instance = %self.instance,
            in_flight = self.in_flight_count(),
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

    async fn on_frame(&self, f: AgentFrame) {
        match f.frame {
            Some(agent_frame::Frame::Ack(ack)) => self.on_ack(ack).await,
            Some(agent_frame::Frame::Heartbeat(_)) => {
                if let Err(e) = self.seen().await {
                    tracing::warn!(error = %e, "could not record agent presence");
                }
            }
            Some(agent_frame::Frame::Hello(_)) | None => {
                tracing::warn!(agent_id = %self.identity.agent_id, "unexpected frame from agent; ignored");
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
        let tracked = self
            .in_flight
            .lock()
            .expect("in-flight map")
            .remove(&ack.operation_id);
        if tracked.is_some() {
            self.permits.add_permits(1);
        }
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
        let message: String = ack.message.chars().take(MAX_MESSAGE).collect();
        let detail: String = ack.detail.chars().take(MAX_MESSAGE).collect();
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
            .map(|t| t.sent.elapsed().as_millis())
            .unwrap_or_default();
        let event = TimelineEvent::new(
            "acknowledged",
            relay::now_unix_ms(),
            &self.gw.config.replica_id,
        )
        .agent(&self.identity.agent_id)
        .detail(format!(
            "{} via {}; lookup {} ms, write {} ms, agent total {} ms, round trip {} ms{}{}",
            outcome.as_str_name(),
            if ack.directory.is_empty() {
                "-"
            } else {
                &ack.directory
            },
            ack.lookup_ms,
            ack.write_ms,
            ack.total_ms,
            round_trip,
            if detail.is_empty() { "" } else { "; " },
            detail
        ));
        let recorded = self
            .gw
            .store
            .complete(
                &self.identity.tenant,
                &self.identity.forest,
                &ack.operation_id,
                outcome,
                violation,
                &message,
                &detail,
                &ack.policy.map(|p| p.encode_to_vec()).unwrap_or_default(),
                &event,
            )
            .await;
        match recorded {
            Ok(Some(caller)) => {
                tracing::info!(event = "WB1022",
                    operation_id = %ack.operation_id,
                    agent_id = %self.identity.agent_id,
                    outcome = outcome.as_str_name(),
                    "outcome recorded"
                );
                if let Err(e) = self
                    .gw
                    .store
                    .notify_done(&caller, &self.identity.tenant, &ack.operation_id)
                    .await
                {
                    tracing::warn!(error = %e, "could not notify the caller's replica; it will poll");
                }
            }
            Ok(None) => tracing::info!(event = "WB1023",
                operation_id = %ack.operation_id,
                "acknowledgment for an operation already final (or not of this forest); kept on the timeline only"
            ),
            Err(e) => tracing::error!(event = "WB1024",
                operation_id = %ack.operation_id,
                error = %e,
                "could not record an acknowledgment; the deadline rules will settle the operation"
            ),
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
                sent_unix_ms: relay::now_unix_ms(),
                in_flight: self.in_flight_count() as u32,
            };
            if self
                .tx
                .send(Ok(frame(gateway_frame::Frame::Heartbeat(hb))))
                .await
                .is_err()
            {
                self.cancel.cancel();
                return;
            }
            if let Err(e) = self.seen().await {
                tracing::warn!(error = %e, "could not record agent presence");
            }
        }
    }

    /// Reads work for this agent instance and sends it, never more than `max_in_flight` at once.
    async fn dispatch_loop(self: Arc<Self>) {
        let mut backoff =
            relay::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conn = loop {
            match self.gw.store.blocking_connection(READ_BLOCK).await {
                Ok(c) => break c,
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
        // it from memory if it already applied it.
        match own_pending(&mut conn, &self.queue, &self.instance).await {
            Ok(entries) => {
                for e in entries {
                    match self.permits.clone().acquire_owned().await {
                        Ok(p) => p.forget(),
                        Err(_) => return,
                    }
                    self.dispatch(e).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read this instance's pending work"),
        }
        let mut last_reclaim = Instant::now();
        loop {
            let first = tokio::select! {
                _ = self.cancel.cancelled() => return,
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            first.forget();
            let extra = self.permits.available_permits().min(31);
            if let Ok(p) = self.permits.clone().try_acquire_many_owned(extra as u32) {
                p.forget();
            }
            let want = 1 + extra;
            let read = if last_reclaim.elapsed() >= RECLAIM_EVERY {
                last_reclaim = Instant::now();
                store::autoclaim(
                    &mut conn,
                    &self.queue,
                    &self.instance,
                    self.gw.config.reclaim_idle,
                    want,
                )
                .await
            } else {
                tokio::select! {
                    _ = self.cancel.cancelled() => { self.permits.add_permits(want); return; }
                    r = store::read_group(&mut conn, &self.queue, &self.instance, want, READ_BLOCK) => r,
                }
            };
            let entries = match read {
                Ok(entries) => {
                    backoff.reset();
                    entries
                }
                Err(e) => {
                    self.permits.add_permits(want);
                    crate::metrics::get().redis_errors.inc();
                    tracing::warn!(event = "WB1090", error = %e, queue = %self.queue, "reading work failed; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    if let Ok(c) = self.gw.store.blocking_connection(READ_BLOCK).await {
                        conn = c;
                    }
                    continue;
                }
            };
            self.permits.add_permits(want.saturating_sub(entries.len()));
            for entry in entries {
                self.dispatch(entry).await;
            }
        }
    }

    /// Hands one entry to the agent if the deadline rules allow; holds one permit, which is
    /// released here unless the entry is now in flight.
    async fn dispatch(&self, entry: QueueEntry) {
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
        self.dispatch_in_span(entry).instrument(span).await;
    }

    async fn dispatch_in_span(&self, entry: QueueEntry) {
        let tenant = &self.identity.tenant;
        if self
            .in_flight
            .lock()
            .expect("in-flight map")
            .contains_key(&entry.operation_id)
        {
            // Still being worked on by this very instance (a slow write): nothing to do.
            self.permits.add_permits(1);
            return;
        }
        let delivery = self
            .gw
            .store
            .mark_delivered(
                tenant,
                &entry.operation_id,
                &self.identity.agent_id,
                &self.instance,
                &self.gw.config.replica_id,
            )
            .await;
        let send = match delivery {
            Ok(Delivery::Deliver) => true,
            Ok(Delivery::Redeliver) => true,
            Ok(Delivery::AlreadyDelivered(other)) => {
                // Another agent instance took it and may have applied it: never hand it to a
                // second one. The deadline rules will settle it if that instance never answers.
                tracing::warn!(event = "WB1021", operation_id = %entry.operation_id, other_instance = %other, "entry already delivered to another instance; not redelivered");
                false
            }
            Ok(Delivery::Expired) => {
                tracing::info!(event = "WB1020", operation_id = %entry.operation_id, "deadline passed before delivery: EXPIRED");
                false
            }
            Ok(Delivery::Done) => false,
            Err(e) => {
                tracing::warn!(event = "WB1090", error = %e, operation_id = %entry.operation_id, "could not mark delivery; the entry stays pending");
                self.permits.add_permits(1);
                return;
            }
        };
        if !send {
            if let Err(e) = self.gw.store.ack_entry(&self.queue, &entry.id).await {
                tracing::warn!(error = %e, "could not acknowledge a settled entry");
            }
            self.permits.add_permits(1);
            return;
        }
        let remaining = (entry.deadline_ms - relay::now_unix_ms()).max(0) as u32;
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
            dispatch_traceparent,
            operation_id: entry.operation_id.clone(),
            tenant_id: tenant.clone(),
            forest: self.identity.forest.clone(),
            deadline_unix_ms: entry.deadline_ms,
            remaining_ms: remaining,
            traceparent: entry.traceparent,
            envelope: entry.envelope,
            key_version: entry.key_version,
        };
        self.in_flight.lock().expect("in-flight map").insert(
            entry.operation_id.clone(),
            InFlight {
                sent: Instant::now(),
            },
        );
        if self
            .tx
            .send(Ok(frame(gateway_frame::Frame::Work(work))))
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
            self.permits.add_permits(1);
            self.cancel.cancel();
        } else {
            tracing::debug!(operation_id = %entry.operation_id, agent_id = %self.identity.agent_id, remaining_ms = remaining, max_in_flight = self.max_in_flight, "work sent");
        }
    }
}

async fn own_pending(
    conn: &mut redis::aio::MultiplexedConnection,
    queue: &str,
    consumer: &str,
) -> Result<Vec<QueueEntry>, store::StoreError> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(store::GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(256)
        .arg("STREAMS")
        .arg(queue)
        .arg("0")
        .query_async(conn)
        .await?;
    store::parse_read_reply(queue, reply)
}
