//! The relay spine end to end: gRPC Submit on a gateway → Redis → agent stream → Samba AD over
//! LDAPS → acknowledgment → the caller, with real Redis, real Samba AD and real TLS.

use std::time::{Duration, Instant};

use e2e::{
    change, contains_secret, dump_redis, forest_id, operation_id, request, reset, tenant_id,
    unlock, Sandbox,
};
use relay::proto::{GetOperationRequest, Outcome, PolicyViolation};
use tonic::Code;

fn outcome(r: &relay::proto::SubmitResponse) -> Outcome {
    Outcome::try_from(r.outcome).unwrap()
}

fn violation(r: &relay::proto::SubmitResponse) -> PolicyViolation {
    PolicyViolation::try_from(r.policy_violation).unwrap()
}

async fn sandbox_with_agent() -> Sandbox {
    let mut sb = Sandbox::start(1).await.unwrap();
    sb.start_agent("agent-1", 0).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    sb.wait_agents(&t, &f, 1).await.unwrap();
    sb
}

/// Every operation kind and every AD answer the spine maps, then a scan of every Redis key for
/// any password used (SPEC invariant 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_reach_ad_and_no_password_rests_in_redis() {
    let sb = sandbox_with_agent().await;
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let upn = |sam: &str| format!("{sam}@{f}");
    let mut used = Vec::new();

    // Reset: the new password works, the old one does not.
    let initial = "Initial#Pass1";
    sb.dc.create_user("bob", initial).unwrap();
    let new = "Reset-Ok#2024x";
    used.extend([initial, new]);
    let r = sb
        .submit(0, request(&t, &f, "bob", reset(new)))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert_eq!(r.trace_id.len(), 32);
    assert!(sb.dc.can_bind(&upn("bob"), new), "new password must bind");
    assert!(
        !sb.dc.can_bind(&upn("bob"), initial),
        "old password must not bind"
    );

    // Change with the right old password, then with a wrong one.
    let changed = "Changed#Pass-77";
    used.push(changed);
    let r = sb
        .submit(0, request(&t, &f, &upn("bob"), change(new, changed)))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert!(sb.dc.can_bind(&upn("bob"), changed));
    let wrong = "Not-The-Old#1";
    used.extend([wrong, "Another#Pass-88"]);
    let r = sb
        .submit(0, request(&t, &f, "bob", change(wrong, "Another#Pass-88")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::WrongOldPassword, "{r:?}");
    assert!(
        sb.dc.can_bind(&upn("bob"), changed),
        "a refused change leaves the password"
    );

    // Policy: complexity and length.
    let simple = "alllowercaseletters";
    let short = "Ab1!";
    used.extend([simple, short]);
    let r = sb
        .submit(0, request(&t, &f, "bob", reset(simple)))
        .await
        .unwrap();
    assert_eq!(
        (outcome(&r), violation(&r)),
        (Outcome::RejectedByPolicy, PolicyViolation::Complexity),
        "{r:?}"
    );
    assert!(!r.message.is_empty());
    let r = sb
        .submit(0, request(&t, &f, "bob", reset(short)))
        .await
        .unwrap();
    assert_eq!(
        (outcome(&r), violation(&r)),
        (Outcome::RejectedByPolicy, PolicyViolation::TooShort),
        "{r:?}"
    );

    // Unknown user; protected account left untouched.
    let r = sb
        .submit(0, request(&t, &f, "nobody-here", reset("Whatever#123x")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::UserNotFound, "{r:?}");
    let admin_new = "Admin-Takeover#1";
    used.push(admin_new);
    let r = sb
        .submit(0, request(&t, &f, "Administrator", reset(admin_new)))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::ProtectedAccount, "{r:?}");
    assert!(sb
        .dc
        .can_bind(&upn("Administrator"), &sb.dc.admin_password()));
    assert!(!sb.dc.can_bind(&upn("Administrator"), admin_new));

    // Unlock only.
    let r = sb
        .submit(0, request(&t, &f, "bob", unlock()))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");

    // GetOperation shows the timeline of the last one.
    let mut client = sb.client(0).await.unwrap();
    let op = client
        .get_operation(e2e::authorized(
            GetOperationRequest {
                tenant_id: t.clone(),
                operation_id: r.operation_id.clone(),
            },
            sb.token.expose(),
        ))
        .await
        .unwrap()
        .into_inner();
    let stages: Vec<&str> = op.timeline.iter().map(|e| e.stage.as_str()).collect();
    assert_eq!(
        stages,
        [
            "accepted",
            "queued",
            "delivered",
            "acknowledged",
            "answered"
        ],
        "{op:?}"
    );
    assert_eq!(op.timeline[2].agent_id, "agent-1");
    assert_eq!(op.trace_id, r.trace_id);

    // Invariant 1: nothing in Redis holds any of these passwords, as UTF-8 or UTF-16LE.
    let dump = dump_redis(&sb.redis.url()).await.unwrap();
    assert!(
        dump.len() > 5,
        "expected records in redis, got {}",
        dump.len()
    );
    for (key, bytes) in &dump {
        for p in &used {
            assert!(
                !contains_secret(key.as_bytes(), p) && !contains_secret(bytes, p),
                "password found in redis key {key}"
            );
        }
    }
    sb.shutdown().await;
}

/// The caller is on replica A, the only agent on replica B: the outcome still reaches A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_crosses_replicas() {
    let mut sb = Sandbox::start(2).await.unwrap();
    sb.start_agent("agent-b", 1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    sb.wait_agents(&t, &f, 1).await.unwrap();
    sb.dc.create_user("carol", "Initial#Pass1").unwrap();
    let r = sb
        .submit(0, request(&t, &f, "carol", reset("Cross-Replica#9")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert!(sb.dc.can_bind(&format!("carol@{f}"), "Cross-Replica#9"));
    let op = sb
        .store
        .timeline(&tenant_id(&t), &operation_id(&r.operation_id))
        .await
        .unwrap();
    let replica_of = |stage: &str| {
        op.iter()
            .find(|e| e.stage == stage)
            .map(|e| e.replica.clone())
            .unwrap()
    };
    assert_eq!(replica_of("accepted"), "gateway-a");
    assert_eq!(replica_of("delivered"), "gateway-b");
    assert_eq!(replica_of("answered"), "gateway-a");
    sb.shutdown().await;
}

/// No agent connected: AGENT_UNAVAILABLE at once, and nothing queued or recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_answers_at_once_and_queues_nothing() {
    let sb = Sandbox::start(1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let mut req = request(&t, &f, "alice", reset("Never-Queued#1"));
    req.operation_id = "op-unavailable".into();
    let deadline = Duration::from_millis(req.timeout_ms.into());
    let started = Instant::now();
    let r = sb.submit(0, req).await.unwrap();
    let took = started.elapsed();
    assert_eq!(outcome(&r), Outcome::AgentUnavailable, "{r:?}");
    // At once: before the request's deadline, recorded only as a refusal (nothing waited).
    assert!(
        took < deadline,
        "AGENT_UNAVAILABLE came after the request's {deadline:?} deadline ({took:?}): it waited"
    );
    let rec = sb
        .store
        .operation(&tenant_id(&t), &operation_id("op-unavailable"))
        .await
        .unwrap()
        .expect("a refusal record, for operators");
    assert!(
        rec.refused && rec.state == cloud_gateway::store::OpState::Done,
        "{rec:?}"
    );
    let stages: Vec<String> = sb
        .store
        .timeline(&tenant_id(&t), &operation_id("op-unavailable"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.stage)
        .collect();
    assert_eq!(
        stages,
        ["accepted", "refused"],
        "nothing queued, delivered or waited for"
    );
    println!("AGENT_UNAVAILABLE answered in {} ms", took.as_millis());
    let dump = dump_redis(&sb.redis.url()).await.unwrap();
    assert!(
        dump.iter()
            .all(|(k, _)| !k.contains(":q:") && !k.contains(":deadlines")),
        "something was queued: {:?}",
        dump.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    sb.shutdown().await;
}

/// The same operation id twice: applied once (AD's own count of password writes), same
/// outcome twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitted_operation_is_applied_once() {
    let sb = sandbox_with_agent().await;
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let dn = sb.dc.create_user("dave", "Initial#Pass1").unwrap();
    let writes_before = sb.dc.password_writes(&dn).unwrap();
    let mut req = request(&t, &f, "dave", reset("Once-Only#123"));
    req.operation_id = "reset-dave-1".into();
    let first = sb.submit(0, req.clone()).await.unwrap();
    assert_eq!(outcome(&first), Outcome::Applied);
    assert_eq!(
        sb.dc.password_writes(&dn).unwrap(),
        writes_before + 1,
        "the first submission writes the password once"
    );
    let changed_at = sb.dc.attribute(&dn, "pwdLastSet").unwrap();
    let pwd_last_set_writes = sb.dc.write_count(&dn, "pwdLastSet").unwrap();
    let second = sb.submit(0, req).await.unwrap();
    assert_eq!(
        sb.dc.password_writes(&dn).unwrap(),
        writes_before + 1,
        "the resubmission wrote the password again"
    );
    assert_eq!(
        sb.dc.write_count(&dn, "pwdLastSet").unwrap(),
        pwd_last_set_writes,
        "the resubmission wrote pwdLastSet"
    );
    assert_eq!(
        sb.dc.attribute(&dn, "pwdLastSet").unwrap(),
        changed_at,
        "the resubmission changed pwdLastSet"
    );
    assert_eq!(first, second, "a resubmission returns the first outcome");
    // The same id for another user is a conflict, not a silent replay.
    let mut other = request(&t, &f, "erin-not-dave", reset("Once-Only#123"));
    other.operation_id = "reset-dave-1".into();
    let err = sb.submit(0, other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("different request"),
        "{}",
        err.message()
    );
    assert_eq!(sb.dc.password_writes(&dn).unwrap(), writes_before + 1);
    let tl = sb
        .store
        .timeline(&tenant_id(&t), &operation_id("reset-dave-1"))
        .await
        .unwrap();
    assert_eq!(
        tl.iter().filter(|e| e.stage == "answered").count(),
        2,
        "{tl:?}"
    );
    sb.shutdown().await;
}

/// Authentication and tenant isolation: no token, a bad token, another tenant's token;
/// envelopes copied into another tenant's or forest's queue (not sealed to its agents: never
/// delivered, EXPIRED), and one sealed to this forest's agents by someone without the master
/// key (its signature fails: REFUSED). AD is checked each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_ciphertexts_stay_with_their_tenant_and_forest() {
    let mut sb = Sandbox::start(1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let mut client = sb.client(0).await.unwrap();

    let req = request(&t, &f, "alice", reset("Whatever#123x"));
    let err = client
        .submit(tonic::Request::new(req.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = client
        .submit(e2e::authorized(req.clone(), "wbt_not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let other_token = sb
        .tenants
        .create_tenant(&tenant_id("globex"))
        .await
        .unwrap();
    let err = client
        .submit(e2e::authorized(req.clone(), other_token.expose()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(!err.message().contains("Whatever"));

    // Malformed input names the field.
    let mut bad = req.clone();
    bad.user.as_mut().unwrap().forest.clear();
    let err = client
        .submit(e2e::authorized(bad, sb.token.expose()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("user.forest"), "{}", err.message());

    // Agents for: globex on the same DC, and a second forest of acme on the same DC.
    sb.start_agent_for("globex-agent", 0, "globex", &f)
        .await
        .unwrap();
    sb.start_agent_for("acme-other", 0, &t, "other.writeback.test")
        .await
        .unwrap();
    sb.wait_agents("globex", &f, 1).await.unwrap();
    sb.wait_agents(&t, "other.writeback.test", 1).await.unwrap();
    sb.dc.create_user("erin", "Initial#Pass1").unwrap();

    // Envelopes planted in Redis, as someone with access to Redis (not to the master key)
    // could write them: (1) one the gateway sealed to acme/<forest>'s agents, copied into
    // globex's queue and into acme's other forest's queue; (2) one sealed to acme/<forest>'s
    // agents by the attacker (their public keys are in Redis), in that forest's own queue.
    let acme = tenant_id(&t);
    sb.start_agent("acme-agent", 0).await.unwrap();
    sb.wait_agents(&t, &f, 1).await.unwrap();
    let own_agents = sb
        .tenants
        .recipients(&acme, &forest_id(&f), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(own_agents.len(), 1, "acme's one agent in {f}");
    let forger = relay::envelope::OperationSigner::from_master_key(
        &relay::envelope::KeyBytes::generate().unwrap(),
    );
    for (victim_tenant, victim_forest, op, signer, expected) in [
        (
            "globex",
            f.as_str(),
            "moved-tenant",
            sb.tenants.signer(),
            Outcome::Expired,
        ),
        (
            t.as_str(),
            "other.writeback.test",
            "moved-forest",
            sb.tenants.signer(),
            Outcome::Expired,
        ),
        (
            t.as_str(),
            f.as_str(),
            "forged-own-forest",
            &forger,
            Outcome::Refused,
        ),
    ] {
        let planted = "Planted-Pass#42";
        // Short: what no agent may open is settled at its deadline.
        let deadline = relay::now_unix_ms() + 3_000;
        let tp = relay::trace::TraceParent::new_root().to_string();
        let sealed = relay::proto::SealedOperation {
            user: request(&t, &f, "erin", reset(planted)).user,
            initiator: 1,
            action: Some(reset(planted).into()),
            switches: None,
        };
        // Bound to the queue it is planted in (the gateway would bind it so): only the keys
        // and the signature keep it out.
        let envelope = relay::envelope::seal_to(
            &own_agents,
            signer,
            &relay::envelope::Binding {
                tenant_id: victim_tenant,
                forest: victim_forest,
                operation_id: op,
                deadline_unix_ms: deadline,
                traceparent: &tp,
            },
            &prost::Message::encode_to_vec(&sealed),
        )
        .unwrap();
        let (victim_tenant, victim_forest) = (tenant_id(victim_tenant), forest_id(victim_forest));
        let op_id = operation_id(op);
        let queue = cloud_gateway::store::queue_key(&victim_tenant, &victim_forest);
        sb.store.ensure_group(&queue).await.unwrap();
        let created = sb
            .store
            .create_operation(
                &cloud_gateway::store::NewOperation {
                    tenant: &victim_tenant,
                    operation_id: &op_id,
                    forest: &victim_forest,
                    kind: "reset",
                    initiator: 1,
                    trace_id: "",
                    traceparent: &tp,
                    accepted_ms: relay::now_unix_ms(),
                    deadline_ms: deadline,
                    replica: "gateway-a",
                    envelope: &envelope,
                    key_version: relay::envelope::KEY_VERSION,
                    ttl: Duration::from_secs(600),
                    user: "sam:erin",
                },
                cloud_gateway::store::QueueLimits {
                    forest: 100,
                    tenant: 100,
                },
            )
            .await
            .unwrap();
        assert_eq!(created, cloud_gateway::store::Created::New);
        let mut rec = None;
        for _ in 0..100 {
            rec = sb.store.operation(&victim_tenant, &op_id).await.unwrap();
            if rec
                .as_ref()
                .is_some_and(|r| r.state == cloud_gateway::store::OpState::Done)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rec = rec.unwrap();
        assert_eq!(rec.outcome, expected, "{op}: {rec:?}");
        assert!(
            !sb.dc.can_bind(&format!("erin@{f}"), planted),
            "{op}: a planted envelope was applied"
        );
    }
    assert!(sb.dc.can_bind(&format!("erin@{f}"), "Initial#Pass1"));
    sb.shutdown().await;
}
