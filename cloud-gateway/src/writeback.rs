//! `writeback.v1.Writeback`: accepts operations from the cloud identity service, seals and
//! queues them, and waits for their outcome.

use std::time::Duration;

use prost::Message;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use zeroize::Zeroize;

use relay::envelope::{AgentPublicKey, Binding, KEY_VERSION};
use relay::proto::writeback_server::Writeback;
use relay::proto::{
    sealed_operation, GetOperationRequest, GetPasswordPolicyRequest, ListAgentsRequest,
    ListAgentsResponse, ListOperationsRequest, ListOperationsResponse, Operation, OperationState,
    Outcome, PasswordPolicy, PolicyViolation, QueryPolicy, SealedOperation, SubmitRequest,
    SubmitResponse, TimelineEvent as PbEvent,
};
use relay::trace::TraceParent;

use crate::error::GatewayError;
use crate::store::{
    self, Created, Finalized, ForestId, NewOperation, OpRecord, OpState, OperationId, QueueLimits,
    TenantId, TimelineEvent,
};
use crate::{validate, Gateway};

/// How long GetPasswordPolicy waits for an agent's answer.
const POLICY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the record of a policy query is kept.
pub(crate) const POLICY_RECORD_TTL: Duration = Duration::from_secs(3600);
/// How long an answered policy is served from the cache.
const POLICY_CACHE_TTL: Duration = Duration::from_secs(60);

/// How often a waiting caller re-reads its record, in case a pub/sub notification was lost.
const POLL_INTERVAL: Duration = Duration::from_millis(1000);
/// How soon a waiting caller tries again when Redis did not answer.
const STORE_RETRY: Duration = Duration::from_millis(200);
/// How long past the deadline a first submission's caller may wait for its settlement (the
/// replica's estimate of the store's clock is within a Redis round trip of it).
const CLOCK_SLACK: Duration = Duration::from_millis(20);
/// A first submission waits for its own deadline plus this much, so that it hears the
/// deadline rules' verdict (EXPIRED or TIMED_OUT) rather than IN_PROGRESS.
const FIRST_WAIT_SLACK: Duration = Duration::from_millis(500);

const AGENT_UNAVAILABLE_MESSAGE: &str =
    "Your organization's directory cannot be reached right now; nothing was changed. Please try again later.";

const WRITEBACK_DISABLED_MESSAGE: &str =
    "Password writeback to your organization's directory is not enabled; nothing was changed. Please contact your administrator.";
const UNLOCK_DISABLED_MESSAGE: &str =
    "Unlocking an account without resetting its password is not enabled; reset your password instead.";

/// How long the caller may wait for an operation, and how long its record is kept.
struct Lifetime {
    timeout: Duration,
    ttl: Duration,
}

/// The user a request names, as its records label it (empty when it names none).
fn user_label_of(req: &SubmitRequest) -> String {
    req.user
        .as_ref()
        .and_then(|u| u.id.as_ref())
        .map(store::user_label)
        .unwrap_or_default()
}

/// An operation and the agent keys it is to be sealed to.
pub(crate) struct Sealing<'a> {
    pub operation: SealedOperation,
    pub recipients: &'a [AgentPublicKey],
    /// The one name its user's per-user order goes by (see `Store::canonical_user`);
    /// `None`: the name the operation gives.
    pub canonical_user: Option<String>,
}

pub struct WritebackService {
    gw: Gateway,
}

impl WritebackService {
    pub fn new(gw: Gateway) -> Self {
        Self { gw }
    }

    /// Checks that the tenant the auth layer found for the token is `tenant_id`, and returns
    /// it typed: the request's tenant from here on (it was checked when it was created).
    fn authorize<T>(&self, req: &Request<T>, tenant_id: &str) -> Result<TenantId, GatewayError> {
        let owner = crate::auth::caller_tenant(req)?;
        if tenant_id.is_empty() {
            validate::tenant_id(tenant_id)?;
        }
        if owner != tenant_id {
            tracing::warn!(event = "WB1013", token_tenant = %owner, requested_tenant = %tenant_id, "token used for another tenant");
            return Err(GatewayError::WrongTenant(tenant_id.to_owned()));
        }
        Ok(owner.clone())
    }

    /// [`WritebackService::authorize`], then the tenant's shared rate (every RPC counts).
    async fn admit<T>(&self, req: &Request<T>, tenant_id: &str) -> Result<TenantId, GatewayError> {
        let tenant = self.authorize(req, tenant_id)?;
        crate::limits::admit(&self.gw, &tenant).await?;
        Ok(tenant)
    }

    fn timeout(&self, timeout_ms: u32) -> Duration {
        if timeout_ms == 0 {
            self.gw.config.default_timeout
        } else {
            Duration::from_millis(u64::from(timeout_ms)).min(self.gw.config.max_timeout)
        }
    }

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<SubmitResponse, GatewayError> {
        // The caller's W3C trace context, honoured when well-formed.
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| TraceParent::parse(v).is_some())
            .map(str::to_owned);
        // Authenticate first, so an anonymous caller learns nothing about the request.
        let tenant = self.authorize(&request, &request.get_ref().tenant_id)?;
        let started = std::time::Instant::now();
        let mut req = request.into_inner();
        let kind = req.action.as_ref().map(|a| a.kind()).unwrap_or("none");
        let result = match crate::limits::admit(&self.gw, &tenant).await {
            Ok(()) => self.submit_validated(&tenant, &mut req, traceparent).await,
            Err(e) => Err(e),
        };
        if let Some(action) = req.action.as_mut() {
            action.zeroize();
        }
        self.audit_submit(&tenant, &req, kind, &result, started.elapsed());
        self.record_refused(&tenant, &req, kind, &result).await;
        if let Ok(resp) = &result {
            let m = crate::metrics::get();
            let outcome = Outcome::try_from(resp.outcome)
                .unwrap_or_default()
                .as_str_name();
            m.submits
                .with_label_values(&[tenant.as_str(), kind, outcome])
                .inc();
            m.stage_seconds
                .with_label_values(&["submit"])
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Leaves a record of a request refused before anything was queued, so operators see it
    /// with its reason (`store/refusals.rs`). Never fails the call: the caller has its answer.
    async fn record_refused(
        &self,
        tenant: &TenantId,
        req: &SubmitRequest,
        kind: &str,
        result: &Result<SubmitResponse, GatewayError>,
    ) {
        let (outcome, message, detail, reuse_id) = match result {
            Ok(r) => {
                let outcome = Outcome::try_from(r.outcome).unwrap_or_default();
                if !matches!(outcome, Outcome::AgentUnavailable | Outcome::NotEnabled) {
                    return;
                }
                (
                    outcome,
                    r.message.clone(),
                    outcome.as_str_name().to_owned(),
                    true,
                )
            }
            Err(
                e @ (GatewayError::RateLimited { .. }
                | GatewayError::UserLimited { .. }
                | GatewayError::QueueFull { .. }
                | GatewayError::TenantQueueFull { .. }
                | GatewayError::InvalidArgument { .. }
                | GatewayError::Conflict(_)),
            ) => (
                Outcome::Refused,
                e.to_string(),
                format!("{}: {e}", e.code_name()),
                // A reused id names another operation: the refusal gets its own.
                !matches!(e, GatewayError::Conflict(_)),
            ),
            Err(_) => return,
        };
        let forest = ForestId::new(req.user.as_ref().map_or("", |u| u.forest.as_str())).ok();
        let user = match (&forest, validate::user_ref(req.user.as_ref())) {
            (Some(f), Ok((u, _))) => {
                u.id.as_ref()
                    .map(|id| (store::user_index_key(tenant, f, id), store::user_label(id)))
            }
            _ => None,
        };
        let generated = OperationId::generate("refused-");
        let given = OperationId::new(&req.operation_id)
            .ok()
            .filter(|_| reuse_id);
        let operation_id = match result {
            Ok(r) => OperationId::new(&r.operation_id).unwrap_or(generated),
            Err(_) => given.unwrap_or(generated),
        };
        let refusal = store::Refusal {
            tenant,
            operation_id: &operation_id,
            forest: forest.as_ref(),
            kind,
            initiator: req.initiator,
            accepted_ms: self.gw.clock.now_ms(),
            replica: &self.gw.config.replica_id,
            outcome,
            message: &message,
            detail: &detail,
            user: user.as_ref().map(|(k, l)| (k.clone(), l.as_str())),
            ttl: self.gw.config.record_ttl,
            limit: self.gw.config.refusal_records_limit,
        };
        match self.gw.store.record_refusal(&refusal).await {
            // Under the user's other names too, once an agent has reported them.
            Ok(true) => {
                if let (Some(f), Some((_, label))) = (&forest, &user) {
                    let indexed = self
                        .gw
                        .store
                        .index_user_operation(
                            tenant,
                            f,
                            label,
                            &operation_id,
                            refusal.accepted_ms,
                            refusal.ttl,
                        )
                        .await;
                    if let Err(e) = indexed {
                        tracing::warn!(event = "WB1027", error = %e, "could not index a refused request under the user's other names");
                    }
                }
            }
            Ok(false) => {
                tracing::debug!(operation_id = %operation_id, "refused request names an existing operation; no refusal record")
            }
            Err(e) => {
                tracing::warn!(event = "WB1090", error = %e, "could not record a refused request")
            }
        }
    }

    /// One audit record per Submit: who asked what for whom, and what they were answered.
    fn audit_submit(
        &self,
        tenant: &TenantId,
        req: &SubmitRequest,
        kind: &str,
        result: &Result<SubmitResponse, GatewayError>,
        took: Duration,
    ) {
        let user = user_label_of(req);
        let (operation_id, outcome, detail, trace_id) = match result {
            Ok(r) => (
                r.operation_id.as_str(),
                Outcome::try_from(r.outcome)
                    .unwrap_or_default()
                    .as_str_name(),
                String::new(),
                r.trace_id.as_str(),
            ),
            Err(e) => (req.operation_id.as_str(), e.code_name(), e.to_string(), ""),
        };
        self.gw.config.audit.record(&crate::audit::Record {
            record: "operation",
            at_unix_ms: relay::now_unix_ms(),
            actor: format!("tenant:{tenant}"),
            tenant: tenant.as_str(),
            forest: req.user.as_ref().map_or("", |u| u.forest.as_str()),
            user: &user,
            operation_id,
            action: kind,
            initiator: relay::proto::Initiator::try_from(req.initiator)
                .unwrap_or_default()
                .as_str_name(),
            outcome,
            detail,
            replica: &self.gw.config.replica_id,
            took_ms: Some(took.as_millis() as u64),
            trace_id,
            ..Default::default()
        });
    }

    async fn submit_validated(
        &self,
        tenant: &TenantId,
        req: &mut SubmitRequest,
        parent: Option<String>,
    ) -> Result<SubmitResponse, GatewayError> {
        let ids = validate::submit(req)?;
        let operation_id = ids
            .operation_id
            .unwrap_or_else(|| OperationId::generate(""));
        let span = tracing::info_span!(
            "writeback.submit",
            otel.kind = "server",
            %tenant,
            forest = ids.forest.as_str(),
            %operation_id,
            kind = req.action.as_ref().map(|a| a.kind()).unwrap_or_default(),
            outcome = tracing::field::Empty,
        );
        if let Some(tp) = &parent {
            relay::telemetry::set_parent(&span, tp);
        }
        self.accept(tenant, &ids.forest, operation_id, req)
            .instrument(span)
            .await
    }

    /// Accepts a validated request: answers a resubmission from its record, refuses at once
    /// when no agent is live, otherwise seals, queues and waits.
    async fn accept(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        operation_id: OperationId,
        req: &mut SubmitRequest,
    ) -> Result<SubmitResponse, GatewayError> {
        let gw = &self.gw;
        let kind = req.action.as_ref().map(|a| a.kind()).unwrap_or_default();

        // A resubmitted operation id: answer with the first submission's outcome (a refused
        // attempt queued nothing: its retry is new).
        if let Some(rec) = gw
            .store
            .operation(tenant, &operation_id)
            .await?
            .filter(|r| !r.refused)
        {
            let user = user_label_of(req);
            if rec.forest != *forest
                || rec.kind != kind
                || (!rec.user.is_empty() && rec.user != user)
            {
                return Err(GatewayError::Conflict(operation_id.into_string()));
            }
            tracing::info!(
                event = "WB1005",
                "resubmitted operation; returning its outcome"
            );
            return self
                .wait_for_outcome(tenant, &operation_id, self.timeout(req.timeout_ms))
                .await;
        }

        let settings = gw.tenants.forest(tenant, forest).await?;
        let refusal = if !settings.writeback_enabled {
            Some(WRITEBACK_DISABLED_MESSAGE)
        } else if kind == "unlock" && !settings.unlock_enabled {
            Some(UNLOCK_DISABLED_MESSAGE)
        } else {
            None
        };
        if let Some(message) = refusal {
            tracing::warn!(
                event = "WB1003",
                "switched off for this forest; refused at once, nothing queued"
            );
            return Ok(SubmitResponse {
                operation_id: operation_id.into_string(),
                outcome: Outcome::NotEnabled as i32,
                policy_violation: PolicyViolation::Unspecified as i32,
                message: message.to_owned(),
                trace_id: relay::telemetry::trace_id(&tracing::Span::current()),
            });
        }

        // Sealed to every live agent of the forest: any of them can apply it, nobody else
        // (the gateway included) can open it once sealed.
        let recipients = self.recipients(tenant, forest).await?;
        if recipients.is_empty() {
            tracing::warn!(
                event = "WB1002",
                "no live agent for forest; answered at once, nothing queued"
            );
            return Ok(SubmitResponse {
                operation_id: operation_id.into_string(),
                outcome: Outcome::AgentUnavailable as i32,
                policy_violation: PolicyViolation::Unspecified as i32,
                message: AGENT_UNAVAILABLE_MESSAGE.to_owned(),
                trace_id: relay::telemetry::trace_id(&tracing::Span::current()),
            });
        }

        let timeout = self.timeout(req.timeout_ms);
        let sealed = SealedOperation {
            user: req.user.clone(),
            initiator: req.initiator,
            action: req.action.take().map(Into::into),
            // The forest's switches as read above travel sealed with the operation.
            switches: Some(settings.sealed_switches()),
        };
        // The user's guess or unlock budget, shared by every replica (`limits.rs`), and their
        // place in the per-user order: under one name whichever a caller used, once an agent
        // has reported the user (an attacker cannot double the budget by switching names).
        let user_label = gw
            .store
            .canonical_user(tenant, forest, &user_label_of(req))
            .await?;
        let taken = crate::limits::take_user(gw, tenant, forest, kind, &user_label).await?;
        let queued = self
            .enqueue(
                tenant,
                forest,
                &operation_id,
                Sealing {
                    operation: sealed,
                    recipients: &recipients,
                    canonical_user: Some(user_label),
                },
                timeout,
                self.gw.config.record_ttl,
            )
            .await;
        if let Err(e) = queued {
            if let Some(t) = taken {
                t.refund(gw).await;
            }
            return Err(e);
        }
        self.wait_for_outcome(tenant, &operation_id, timeout + FIRST_WAIT_SLACK)
            .await
    }

    /// The sealing keys of the forest's live agents (empty: no agent can take work now).
    ///
    /// # Errors
    /// On Redis errors.
    pub(crate) async fn recipients(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
    ) -> Result<Vec<AgentPublicKey>, GatewayError> {
        Ok(self
            .gw
            .tenants
            .recipients(tenant, forest, self.gw.config.agent_liveness)
            .await?)
    }

    /// Seals the operation to its recipients for (tenant, forest, operation id, deadline,
    /// trace) and queues it with its record, unless the operation id already exists. The
    /// plaintext is wiped.
    pub(crate) async fn enqueue(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        operation_id: &OperationId,
        sealed: Sealing<'_>,
        timeout: Duration,
        ttl: Duration,
    ) -> Result<(), GatewayError> {
        // The trace context queued with the operation (and bound to its envelope) is this
        // span's: the dequeue on whichever replica and the agent continue the trace from it.
        let span = tracing::info_span!(
            "writeback.enqueue",
            operation_id = operation_id.as_str(),
            forest = forest.as_str()
        );
        let traceparent = relay::telemetry::traceparent(&span);
        let trace = TraceParent::parse(&traceparent).unwrap_or_else(TraceParent::new_root);
        let lifetime = Lifetime { timeout, ttl };
        self.seal_and_queue(tenant, forest, operation_id, sealed, lifetime, trace)
            .instrument(span)
            .await
    }

    async fn seal_and_queue(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        operation_id: &OperationId,
        Sealing {
            operation: sealed,
            recipients,
            canonical_user,
        }: Sealing<'_>,
        Lifetime { timeout, ttl }: Lifetime,
        trace: TraceParent,
    ) -> Result<(), GatewayError> {
        let gw = &self.gw;
        let kind = sealed.action.as_ref().map(|a| a.kind()).unwrap_or_default();
        let user_id = sealed.user.as_ref().and_then(|u| u.id.as_ref());
        let user_label = user_id.map(store::user_label).unwrap_or_default();
        let queue_user = canonical_user.unwrap_or_else(|| user_label.clone());
        let indexed = user_id.is_some() && kind != "policy";
        let initiator = sealed.initiator;
        let traceparent = trace.to_string();
        // Deadlines are the store's clock's, whatever this host's clock says.
        let accepted_ms = gw.clock.now_ms();
        let deadline_ms = accepted_ms + timeout.as_millis() as i64;

        let envelope = tracing::info_span!("writeback.seal", recipients = recipients.len())
            .in_scope(|| {
                let mut plaintext = sealed.encode_to_vec();
                drop(sealed);
                let binding = Binding {
                    tenant_id: tenant.as_str(),
                    forest: forest.as_str(),
                    operation_id: operation_id.as_str(),
                    deadline_unix_ms: deadline_ms,
                    traceparent: &traceparent,
                };
                let envelope =
                    relay::envelope::seal_to(recipients, gw.tenants.signer(), &binding, &plaintext);
                plaintext.zeroize();
                envelope
            });
        let envelope = envelope.map_err(|e| GatewayError::Internal(e.to_string()))?;

        gw.store
            .ensure_group(&store::queue_key(tenant, forest))
            .await?;
        let trace_id = trace.trace_id_hex();
        let new = NewOperation {
            tenant,
            operation_id,
            forest,
            kind,
            initiator,
            trace_id: &trace_id,
            traceparent: &traceparent,
            accepted_ms,
            deadline_ms,
            replica: &gw.config.replica_id,
            envelope: &envelope,
            key_version: KEY_VERSION,
            ttl,
            user: &queue_user,
        };
        let limits = QueueLimits {
            forest: gw.config.forest_queue_limit,
            tenant: gw.config.tenant_queue_limit,
        };
        let created = gw.store.create_operation(&new, limits).await?;
        match created {
            Created::New => {
                // Accepted whatever happens next: an index the store cannot take now (it went
                // away just after) must not turn the caller's answer into an error.
                if indexed {
                    if let Err(e) = gw
                        .store
                        .index_user_operation(
                            tenant,
                            forest,
                            &user_label,
                            operation_id,
                            accepted_ms,
                            ttl,
                        )
                        .await
                    {
                        tracing::warn!(event = "WB1027", error = %e, "could not index the accepted operation under its user; ListOperations will not list it");
                    }
                }
                tracing::info!(event = "WB1001", trace_id = %trace.trace_id_hex(), deadline_ms, "operation queued");
                Ok(())
            }
            Created::Exists => {
                tracing::info!(
                    event = "WB1006",
                    "operation id raced with a concurrent submission; waiting for it"
                );
                Ok(())
            }
            Created::Conflict => {
                tracing::warn!(
                    event = "WB1006",
                    "operation id raced with a concurrent submission for another user, forest or kind; ALREADY_EXISTS"
                );
                Err(GatewayError::Conflict(operation_id.to_string()))
            }
            Created::QueueFull => {
                tracing::warn!(event = "WB1008", %forest, "forest queue full; RESOURCE_EXHAUSTED, nothing queued");
                Err(GatewayError::QueueFull {
                    forest: forest.to_string(),
                    limit: gw.config.forest_queue_limit,
                })
            }
            Created::TenantFull => {
                tracing::warn!(event = "WB1008", %forest, "tenant's unsettled operations at their limit; RESOURCE_EXHAUSTED, nothing queued");
                Err(GatewayError::TenantQueueFull {
                    limit: gw.config.tenant_queue_limit,
                })
            }
            Created::PastDeadline => Err(GatewayError::Unavailable(
                "the operation's deadline passed before it could be queued; nothing was queued, retry with the same operation_id".into(),
            )),
        }
    }

    /// The effective policy for a forest (or one user of it), from the cache or from an agent.
    async fn password_policy(
        &self,
        request: Request<GetPasswordPolicyRequest>,
    ) -> Result<PasswordPolicy, GatewayError> {
        let tenant = self.admit(&request, &request.get_ref().tenant_id).await?;
        let req = request.into_inner();
        let forest = validate::forest("forest", &req.forest)?;
        let user = match req.user {
            Some(u) => {
                let mut u = validate::user_ref(Some(&u))?.0.clone();
                u.forest.clone_from(&req.forest);
                Some(u)
            }
            None => None,
        };
        self.policy(&tenant, &forest, user).await
    }

    /// The effective policy for `user` of `forest` (the forest's when `None`). An unknown user
    /// gets the forest's policy, so the answer never tells whether a user exists.
    async fn policy(
        &self,
        tenant: &TenantId,
        forest: &ForestId,
        user: Option<relay::proto::UserRef>,
    ) -> Result<PasswordPolicy, GatewayError> {
        let (tenant, forest) = (tenant.clone(), forest.clone());
        let named = user.as_ref().is_some_and(|u| u.id.is_some());
        let user_key = match user.as_ref().and_then(|u| u.id.as_ref()) {
            None => "-".to_owned(),
            Some(id) => format!("{id:?}"),
        };
        let cache_key = store::policy_cache_key(&tenant, &forest, &user_key);
        let gw = &self.gw;
        if let Some(bytes) = gw.store.cached(&cache_key).await? {
            if let Ok(p) = PasswordPolicy::decode(bytes.as_slice()) {
                return Ok(p);
            }
        }
        let recipients = self.recipients(&tenant, &forest).await?;
        if recipients.is_empty() {
            return Err(GatewayError::Unavailable(format!(
                "no live agent for forest {:?}; its password policy cannot be read now",
                forest.as_str()
            )));
        }
        let operation_id = OperationId::generate("policy-");
        // The forest's scope as it is now: a user outside it is told so.
        let switches = gw.tenants.forest(&tenant, &forest).await?.sealed_switches();
        let sealed = SealedOperation {
            user: Some(user.unwrap_or(relay::proto::UserRef {
                forest: forest.to_string(),
                id: None,
            })),
            initiator: relay::proto::Initiator::Admin as i32,
            action: Some(sealed_operation::Action::QueryPolicy(QueryPolicy {})),
            switches: Some(switches),
        };
        self.enqueue(
            &tenant,
            &forest,
            &operation_id,
            Sealing {
                operation: sealed,
                recipients: &recipients,
                canonical_user: None,
            },
            POLICY_TIMEOUT,
            POLICY_RECORD_TTL,
        )
        .await?;
        self.wait_for_outcome(&tenant, &operation_id, POLICY_TIMEOUT + FIRST_WAIT_SLACK)
            .await?;
        let rec = gw
            .store
            .operation(&tenant, &operation_id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(operation_id.to_string()))?;
        match rec.outcome {
            Outcome::Applied => {
                let policy = PasswordPolicy::decode(rec.result.as_slice())
                    .map_err(|e| GatewayError::Internal(format!("agent policy answer: {e}")))?;
                gw.store
                    .cache(&cache_key, &rec.result, POLICY_CACHE_TTL)
                    .await?;
                Ok(policy)
            }
            Outcome::UserNotFound if named => {
                let policy = Box::pin(self.policy(&tenant, &forest, None)).await?;
                // Cached under the unknown name too: asked again, it answers as fast as a
                // known user's.
                gw.store
                    .cache(&cache_key, &policy.encode_to_vec(), POLICY_CACHE_TTL)
                    .await?;
                Ok(policy)
            }
            other => Err(GatewayError::Unavailable(format!(
                "the agent could not read the policy ({}): {}",
                other.as_str_name(),
                rec.message
            ))),
        }
    }

    /// Waits until the operation has a terminal outcome or the wait (bounded by the operation's
    /// own deadline) ends, then answers and records the answer on the timeline.
    pub(crate) async fn wait_for_outcome(
        &self,
        tenant: &TenantId,
        operation_id: &OperationId,
        wait: Duration,
    ) -> Result<SubmitResponse, GatewayError> {
        let gw = &self.gw;
        let waiter = gw.waiters.register(tenant, operation_id);
        let give_up = tokio::time::Instant::now() + wait;
        loop {
            let notified = waiter.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let rec = match gw.store.operation(tenant, operation_id).await {
                Ok(Some(rec)) => rec,
                Ok(None) => return Err(GatewayError::NotFound(operation_id.to_string())),
                // Redis away for a moment: the operation is accepted and may be applied, so
                // the caller keeps waiting for its truth rather than hearing an error.
                Err(e) if tokio::time::Instant::now() < give_up => {
                    tracing::warn!(event = "WB1090", error = %e, "cannot read the operation while waiting; retrying");
                    let pause = STORE_RETRY.min(give_up - tokio::time::Instant::now());
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if rec.state == OpState::Done {
                return self.answer(&rec, rec.outcome).await;
            }
            // The store's clock decides: it set the deadline and settles it.
            let now = gw.clock.now_ms();
            if now >= rec.deadline_ms {
                // The deadline rules decide: never delivered -> EXPIRED (terminal); delivered but
                // unacknowledged -> the caller hears TIMED_OUT (it can no longer be applied) and
                // GetOperation tells more later.
                match gw
                    .store
                    .finalize(
                        tenant,
                        &rec.forest,
                        operation_id,
                        &gw.config.replica_id,
                        gw.config.ack_grace,
                    )
                    .await?
                {
                    Finalized::Terminal(outcome) => {
                        let rec = gw
                            .store
                            .operation(tenant, operation_id)
                            .await?
                            .unwrap_or(rec);
                        return self.answer(&rec, outcome).await;
                    }
                    Finalized::Pending {
                        past_deadline: true,
                    } => return self.answer(&rec, Outcome::TimedOut).await,
                    Finalized::Pending {
                        past_deadline: false,
                    } => {
                        // This replica's estimate of the store's clock ran a little ahead.
                        tokio::time::sleep(CLOCK_SLACK).await;
                        continue;
                    }
                    Finalized::Missing => {
                        return Err(GatewayError::NotFound(operation_id.to_string()))
                    }
                }
            }
            if tokio::time::Instant::now() >= give_up {
                // Before its deadline the operation may still be applied: say so, never
                // TIMED_OUT (which promises nothing more will happen).
                return self.answer(&rec, Outcome::InProgress).await;
            }
            let until_deadline = Duration::from_millis((rec.deadline_ms - now).max(0) as u64);
            let sleep_for = POLL_INTERVAL
                .min(until_deadline)
                .min(give_up.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(sleep_for) => {}
            }
        }
    }

    async fn answer(
        &self,
        rec: &OpRecord,
        outcome: Outcome,
    ) -> Result<SubmitResponse, GatewayError> {
        let span = tracing::info_span!("writeback.answer", outcome = outcome.as_str_name());
        tracing::Span::current().record("outcome", outcome.as_str_name());
        self.answer_in_span(rec, outcome).instrument(span).await
    }

    async fn answer_in_span(
        &self,
        rec: &OpRecord,
        outcome: Outcome,
    ) -> Result<SubmitResponse, GatewayError> {
        let (violation, message) = if outcome == rec.outcome {
            (rec.violation, rec.message.clone())
        } else if outcome == Outcome::InProgress {
            (
                PolicyViolation::Unspecified,
                store::IN_PROGRESS_MESSAGE.to_owned(),
            )
        } else {
            (
                PolicyViolation::Unspecified,
                store::TIMED_OUT_MESSAGE.to_owned(),
            )
        };
        let event =
            TimelineEvent::new("answered", relay::now_unix_ms(), &self.gw.config.replica_id)
                .detail(outcome.as_str_name());
        if let Err(e) = self
            .gw
            .store
            .push_event(&rec.tenant, &rec.operation_id, &event)
            .await
        {
            tracing::warn!(event = "WB1090", error = %e, "could not record the answer on the timeline");
        }
        tracing::info!(event = "WB1004",
            tenant = %rec.tenant,
            operation_id = %rec.operation_id,
            outcome = outcome.as_str_name(),
            policy_violation = violation.as_str_name(),
            "answered"
        );
        Ok(SubmitResponse {
            operation_id: rec.operation_id.to_string(),
            outcome: outcome as i32,
            policy_violation: violation as i32,
            message,
            trace_id: rec.trace_id.clone(),
        })
    }

    async fn operations_of_user(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<ListOperationsResponse, GatewayError> {
        let tenant = self.admit(&request, &request.get_ref().tenant_id).await?;
        let req = request.into_inner();
        let (user, forest) = validate::user_ref(req.user.as_ref())?;
        let id = user.id.as_ref().expect("validated");
        let since = if req.since_unix_ms > 0 {
            req.since_unix_ms
        } else {
            relay::now_unix_ms() - 24 * 3600 * 1000
        };
        let limit = match req.limit {
            0 => 50,
            n => n.min(500),
        } as isize;
        let key = store::user_index_key(&tenant, &forest, id);
        let ids = self.gw.store.user_operations(&key, since, limit).await?;
        let mut operations = Vec::with_capacity(ids.len());
        for op in ids {
            if let Some(rec) = self.gw.store.operation(&tenant, &op).await? {
                operations.push(operation_message(rec, Vec::new()));
            }
        }
        Ok(ListOperationsResponse { operations })
    }

    async fn agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<ListAgentsResponse, GatewayError> {
        let tenant = self.admit(&request, &request.get_ref().tenant_id).await?;
        let req = request.into_inner();
        let gw = &self.gw;
        let forests = if req.forest.is_empty() {
            gw.store.forests(&tenant).await?
        } else {
            vec![validate::forest("forest", &req.forest)?]
        };
        let now = relay::now_unix_ms();
        let live_after = now - gw.config.agent_liveness.as_millis() as i64;
        let mut out = Vec::new();
        for forest in forests {
            let mut agents = Vec::new();
            for (seen, info) in gw.store.agents(&tenant, &forest).await? {
                let num = |k: &str| info.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                let text = |k: &str| info.get(k).cloned().unwrap_or_default();
                agents.push(relay::proto::AgentInfo {
                    agent_id: text("agent_id"),
                    instance_id: text("instance"),
                    replica: text("replica"),
                    version: text("version"),
                    connected_unix_ms: num("connected"),
                    last_heartbeat_unix_ms: seen,
                    in_flight: num("in_flight") as u32,
                    max_in_flight: num("max_in_flight") as u32,
                    live: seen >= live_after,
                });
            }
            let health = gw.store.health(&tenant, &forest).await?;
            let checked = health
                .get("checked")
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            let canary_ok = health.get("healthy").is_some_and(|v| v == "1");
            let stale_after = now - 3 * gw.config.canary_interval.as_millis() as i64;
            let (healthy, reason) = if !agents.iter().any(|a| a.live) {
                (false, "no live agent for this forest".to_owned())
            } else if gw.config.canary_interval.is_zero() {
                (
                    false,
                    "end-to-end canaries are turned off on this gateway".to_owned(),
                )
            } else if checked == 0 {
                (false, "no end-to-end canary has run yet".to_owned())
            } else if checked < stale_after {
                (
                    false,
                    format!("last canary is stale ({} s old)", (now - checked) / 1000),
                )
            } else {
                (canary_ok, health.get("reason").cloned().unwrap_or_default())
            };
            out.push(relay::proto::ForestHealth {
                forest: forest.into_string(),
                healthy,
                reason,
                checked_unix_ms: checked,
                canary_ms: health
                    .get("canary_ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                agents,
            });
        }
        Ok(ListAgentsResponse { forests: out })
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Operation, GatewayError> {
        let tenant = self.admit(&request, &request.get_ref().tenant_id).await?;
        let operation_id = validate::operation_id(&request.get_ref().operation_id)?;
        let rec = self
            .gw
            .store
            .operation(&tenant, &operation_id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(operation_id.to_string()))?;
        let timeline = self.gw.store.timeline(&tenant, &operation_id).await?;
        Ok(operation_message(rec, timeline))
    }
}

/// The API view of an operation record.
fn operation_message(rec: OpRecord, timeline: Vec<store::TimelineEvent>) -> Operation {
    Operation {
        operation_id: rec.operation_id.into_string(),
        tenant_id: rec.tenant.into_string(),
        forest: rec.forest.into_string(),
        kind: rec.kind,
        state: match rec.state {
            OpState::Queued => OperationState::Queued,
            OpState::Delivered => OperationState::Delivered,
            OpState::Done => OperationState::Done,
        } as i32,
        outcome: rec.outcome as i32,
        policy_violation: rec.violation as i32,
        message: rec.message,
        trace_id: rec.trace_id,
        accepted_unix_ms: rec.accepted_ms,
        deadline_unix_ms: rec.deadline_ms,
        initiator: rec.initiator,
        timeline: timeline
            .into_iter()
            .map(|e| PbEvent {
                stage: e.stage,
                at_unix_ms: e.at,
                replica: e.replica,
                agent_id: e.agent,
                detail: e.detail,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl Writeback for WritebackService {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        Ok(Response::new(
            WritebackService::submit(self, request).await?,
        ))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        Ok(Response::new(
            WritebackService::get_operation(self, request).await?,
        ))
    }

    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        Ok(Response::new(self.operations_of_user(request).await?))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        Ok(Response::new(self.agents(request).await?))
    }

    async fn get_password_policy(
        &self,
        request: Request<GetPasswordPolicyRequest>,
    ) -> Result<Response<PasswordPolicy>, Status> {
        let span = tracing::info_span!("writeback.get_password_policy", otel.kind = "server");
        Ok(Response::new(
            self.password_policy(request).instrument(span).await?,
        ))
    }
}
