//! Each Lua script of the operation lifecycle (`store/scripts.rs`) on a real Redis, one reply
//! at a time: every state a script can meet and the typed answer it gives.

use std::sync::LazyLock;
use std::time::Duration;

use cloud_gateway::store::{
    Acknowledgment, Completion, Created, Delivery, Finalized, ForestId, NewOperation, OpState,
    OperationId, QueueLimits, Recipient, Store, TenantId,
};
use relay::proto::{Outcome, PolicyViolation};
use testkit::RedisServer;

static T: LazyLock<TenantId> = LazyLock::new(|| TenantId::new("acme").unwrap());
static F: LazyLock<ForestId> = LazyLock::new(|| ForestId::new("corp.example.test").unwrap());

fn op(id: &str) -> OperationId {
    OperationId::new(id).unwrap()
}

async fn store() -> (RedisServer, Store) {
    let redis = RedisServer::start().unwrap();
    let store = Store::connect(&redis.url()).await.unwrap();
    store
        .ensure_group(&cloud_gateway::store::queue_key(&T, &F))
        .await
        .unwrap();
    (redis, store)
}

/// Queues `op` for `user`, due `in_ms` from now by the store's clock.
async fn create(store: &Store, id: &str, user: &str, in_ms: i64, limit: u64) -> Created {
    let now = store.now_ms().await.unwrap();
    store
        .create_operation(
            &NewOperation {
                tenant: &T,
                operation_id: &op(id),
                forest: &F,
                kind: "reset",
                initiator: 1,
                trace_id: "",
                traceparent: "",
                accepted_ms: now,
                deadline_ms: now + in_ms,
                replica: "gw",
                envelope: b"sealed",
                key_version: 1,
                ttl: Duration::from_secs(60),
                user,
            },
            QueueLimits {
                forest: limit,
                tenant: 1000,
            },
        )
        .await
        .unwrap()
}

async fn deliver(store: &Store, id: &str, instance: &str) -> Delivery {
    store
        .mark_delivered(
            &T,
            &F,
            &op(id),
            &Recipient {
                agent_id: "a1",
                instance,
                replica: "gw",
            },
        )
        .await
        .unwrap()
}

async fn ack(store: &Store, id: &str, instance: &str, outcome: Outcome) -> Completion {
    store
        .complete(&Acknowledgment {
            tenant: &T,
            forest: &F,
            op: &op(id),
            instance,
            agent_id: "a1",
            replica: "gw",
            outcome,
            violation: PolicyViolation::Unspecified,
            message: "m",
            detail: "",
            event_detail: "",
            result: b"",
        })
        .await
        .unwrap()
}

async fn finalize(store: &Store, id: &str, grace_ms: u64) -> Finalized {
    store
        .finalize(&T, &F, &op(id), "gw", Duration::from_millis(grace_ms))
        .await
        .unwrap()
}

#[tokio::test]
async fn create_op() {
    let (_redis, s) = store().await;
    assert_eq!(create(&s, "o1", "sam:a", 5000, 2).await, Created::New);
    assert_eq!(create(&s, "o1", "sam:a", 5000, 2).await, Created::Exists);
    assert_eq!(create(&s, "o1", "sam:b", 5000, 2).await, Created::Conflict);
    assert_eq!(
        create(&s, "o2", "sam:a", -1, 2).await,
        Created::PastDeadline
    );
    assert!(s.operation(&T, &op("o2")).await.unwrap().is_none());
    assert_eq!(create(&s, "o3", "sam:a", 5000, 2).await, Created::New);
    assert_eq!(create(&s, "o4", "sam:a", 5000, 2).await, Created::QueueFull);
    assert_eq!(s.queue_stats(&T, &F).await.unwrap().0, 2);
    let rec = s.operation(&T, &op("o1")).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.sends), (OpState::Queued, 0));
    let stages: Vec<String> = s
        .timeline(&T, &op("o1"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.stage)
        .collect();
    assert_eq!(stages, ["accepted", "queued"]);
}

#[tokio::test]
async fn mark_delivered() {
    let (_redis, s) = store().await;
    assert_eq!(deliver(&s, "none", "i1").await, Delivery::Done, "missing");
    create(&s, "o1", "sam:a", 5000, 10).await;
    let Delivery::Deliver { remaining_ms } = deliver(&s, "o1", "i1").await else {
        panic!("not delivered");
    };
    assert!((4000..=5000).contains(&remaining_ms), "{remaining_ms}");
    assert!(matches!(
        deliver(&s, "o1", "i1").await,
        Delivery::Redeliver { .. }
    ));
    assert_eq!(
        deliver(&s, "o1", "i2").await,
        Delivery::AlreadyDelivered("i1".into())
    );
    let rec = s.operation(&T, &op("o1")).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.sends), (OpState::Delivered, 2));
    ack(&s, "o1", "i1", Outcome::Applied).await;
    assert_eq!(deliver(&s, "o1", "i1").await, Delivery::Done);
    create(&s, "o2", "sam:a", 50, 10).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(deliver(&s, "o2", "i1").await, Delivery::Expired);
    let rec = s.operation(&T, &op("o2")).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.outcome), (OpState::Done, Outcome::Expired));
    assert_eq!(
        s.queue_stats(&T, &F).await.unwrap().0,
        0,
        "both entries gone"
    );
}

#[tokio::test]
async fn complete() {
    let (_redis, s) = store().await;
    assert_eq!(
        ack(&s, "none", "i1", Outcome::Applied).await,
        Completion::Unknown
    );
    create(&s, "o1", "sam:a", 5000, 10).await;
    assert_eq!(
        ack(&s, "o1", "i1", Outcome::Applied).await,
        Completion::NotDeliveredHere,
        "queued work was delivered to nobody"
    );
    deliver(&s, "o1", "i1").await;
    assert_eq!(
        ack(&s, "o1", "i2", Outcome::Applied).await,
        Completion::NotDeliveredHere
    );
    assert_eq!(
        ack(&s, "o1", "i1", Outcome::WrongOldPassword).await,
        Completion::Recorded {
            caller_replica: "gw".into()
        }
    );
    assert_eq!(
        ack(&s, "o1", "i1", Outcome::Applied).await,
        Completion::AlreadyFinal,
        "the first outcome wins"
    );
    let rec = s.operation(&T, &op("o1")).await.unwrap().unwrap();
    assert_eq!(rec.outcome, Outcome::WrongOldPassword);
    assert_eq!(s.queue_stats(&T, &F).await.unwrap().0, 0);
    assert!(s.due_deadlines(&T, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn finalize_rules() {
    let (_redis, s) = store().await;
    assert_eq!(finalize(&s, "none", 0).await, Finalized::Missing);
    create(&s, "early", "sam:a", 5000, 10).await;
    assert_eq!(
        finalize(&s, "early", 0).await,
        Finalized::Pending {
            past_deadline: false
        }
    );
    create(&s, "queued", "sam:a", 30, 10).await;
    create(&s, "taken", "sam:b", 30, 10).await;
    deliver(&s, "taken", "i1").await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    let due = s.due_deadlines(&T, 10).await.unwrap();
    assert_eq!(due.len(), 2, "{due:?}");
    assert_eq!(
        finalize(&s, "queued", 0).await,
        Finalized::Terminal(Outcome::Expired)
    );
    assert_eq!(
        finalize(&s, "taken", 60_000).await,
        Finalized::Pending {
            past_deadline: true
        },
        "delivered: TIMED_OUT only after the grace period"
    );
    assert_eq!(
        finalize(&s, "taken", 0).await,
        Finalized::Terminal(Outcome::TimedOut)
    );
    assert_eq!(
        s.queue_stats(&T, &F).await.unwrap().0,
        1,
        "only `early` is left"
    );
    assert!(s.due_deadlines(&T, 10).await.unwrap().is_empty());
}

fn new_op<'a>(
    tenant: &'a TenantId,
    forest: &'a ForestId,
    op: &'a OperationId,
    now: i64,
) -> NewOperation<'a> {
    NewOperation {
        tenant,
        operation_id: op,
        forest,
        kind: "reset",
        initiator: 1,
        trace_id: "",
        traceparent: "",
        accepted_ms: now,
        deadline_ms: now + 5000,
        replica: "gw",
        envelope: b"sealed",
        key_version: 1,
        ttl: Duration::from_secs(60),
        user: "sam:a",
    }
}

#[tokio::test]
async fn tenant_queue_limit() {
    let (_redis, s) = store().await;
    let now = s.now_ms().await.unwrap();
    let limits = QueueLimits {
        forest: 10,
        tenant: 2,
    };
    let create = |tenant: &'static str, forest: &'static str, id: &'static str| {
        let s = s.clone();
        async move {
            let (tenant, forest) = (
                TenantId::new(tenant).unwrap(),
                ForestId::new(forest).unwrap(),
            );
            s.create_operation(&new_op(&tenant, &forest, &op(id), now), limits)
                .await
                .unwrap()
        }
    };
    assert!(create("acme", "corp.example.test", "o1").await == Created::New);
    assert_eq!(create("acme", "other.forest", "o2").await, Created::New);
    assert_eq!(
        create("acme", "third.forest", "o3").await,
        Created::TenantFull,
        "the limit counts every forest of the tenant"
    );
    assert!(s.operation(&T, &op("o3")).await.unwrap().is_none());
    assert!(
        create("globex", "corp.example.test", "o1").await == Created::New,
        "another tenant is served"
    );
    // Settling one makes room.
    assert_eq!(
        ack(&s, "o1", "i1", Outcome::Applied).await,
        Completion::NotDeliveredHere
    );
    deliver(&s, "o1", "i1").await;
    ack(&s, "o1", "i1", Outcome::Applied).await;
    assert_eq!(create("acme", "third.forest", "o3").await, Created::New);
}

/// A store restored from an older state: its sequence is behind what this store handle saw.
/// The next guarded script recovers it first: what was unsettled is settled `TIMED_OUT`
/// ("store-restored"), never delivered again; then it runs. A handle that saw nothing is told
/// by an agent's report.
#[tokio::test]
async fn a_store_behind_what_was_seen_is_recovered_first() {
    let (redis, s) = store().await;
    create(&s, "o1", "sam:a", 5000, 10).await;
    create(&s, "o2", "sam:b", 5000, 10).await;
    assert!(matches!(
        deliver(&s, "o1", "i1").await,
        Delivery::Deliver { .. }
    ));
    let seen = s.high_water(&T);
    assert_eq!(seen, 3, "two creations and a delivery");
    let client = redis::Client::open(redis.url()).unwrap();
    let c = client.get_multiplexed_async_connection().await.unwrap();
    let set_seq = |n: u64| {
        let mut c = c.clone();
        async move {
            let _: () = redis::cmd("SET")
                .arg(cloud_gateway::store::seq_key(&T))
                .arg(n)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    };
    // As if restored to just after o2 was accepted.
    set_seq(2).await;
    assert_eq!(create(&s, "o3", "sam:c", 5000, 10).await, Created::New);
    let settled = |s: Store, id: &'static str| async move {
        let rec = s.operation(&T, &op(id)).await.unwrap().unwrap();
        let stages: Vec<String> = s
            .timeline(&T, &op(id))
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.stage)
            .collect();
        (
            rec.state,
            rec.outcome,
            stages.last().cloned().unwrap_or_default(),
        )
    };
    for op in ["o1", "o2"] {
        assert_eq!(
            settled(s.clone(), op).await,
            (OpState::Done, Outcome::TimedOut, "store-restored".into()),
            "{op}: unknown, never EXPIRED"
        );
    }
    assert_eq!(
        deliver(&s, "o2", "i1").await,
        Delivery::Done,
        "never delivered again"
    );
    assert_eq!(
        s.queue_stats(&T, &F).await.unwrap().0,
        1,
        "only o3 is queued"
    );
    assert!(s.high_water(&T) > seen);

    // A fresh handle (a restarted replica) knows nothing; an agent reports what it saw.
    let fresh = Store::connect(&redis.url()).await.unwrap();
    let reported = s.high_water(&T);
    set_seq(1).await;
    fresh.check_sequence(&T, 0, "test").await.unwrap();
    assert_eq!(
        settled(fresh.clone(), "o3").await.0,
        OpState::Queued,
        "nothing to compare with: untouched"
    );
    fresh
        .check_sequence(&T, reported, "agent hello")
        .await
        .unwrap();
    assert_eq!(
        settled(fresh.clone(), "o3").await,
        (OpState::Done, Outcome::TimedOut, "store-restored".into())
    );
}
