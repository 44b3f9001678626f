//! The store on Redis as production runs it: a Redis Cluster (3 masters, a replica each) whose
//! masters fail over and die mid-flight, a master and replica under Sentinel whose master is
//! killed, and a TLS server with an ACL user. The whole operation lifecycle (create, read from
//! the stream, deliver, complete, notify, the deadline sweep) runs through it, and nothing
//! accepted may be lost or answered twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use cloud_gateway::store::{
    queue_key, Acknowledgment, Completion, Created, Delivery, Finalized, ForestId, NewOperation,
    OpState, OperationId, QueueLimits, Recipient, RedisOptions, Store, StoreError, TenantId,
};
use relay::proto::{Outcome, PolicyViolation};

const REPLICA: &str = "gw";
/// Longest a step may keep failing (a failover in progress) before the test fails.
const STEP_BUDGET: Duration = Duration::from_secs(40);

fn forest() -> ForestId {
    ForestId::new("corp.example.test").unwrap()
}

/// Runs `f` until it succeeds, at most [`STEP_BUDGET`]; tells whether an attempt failed first
/// (then the write may have happened and its reply been lost).
async fn retry<T, Fut>(what: &str, mut f: impl FnMut() -> Fut) -> (T, bool)
where
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let start = Instant::now();
    let mut failed = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), f()).await {
            Ok(Ok(v)) => return (v, failed),
            Ok(Err(e)) => {
                assert!(
                    start.elapsed() < STEP_BUDGET,
                    "{what}: still failing after {STEP_BUDGET:?}: {e}"
                );
            }
            Err(_) => assert!(start.elapsed() < STEP_BUDGET, "{what}: hangs"),
        }
        failed = true;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Accepts operation `id` of `user` due `in_ms` from now by the store's clock.
async fn accept(
    store: &Store,
    tenant: &TenantId,
    id: &OperationId,
    user: &str,
    in_ms: i64,
) -> Result<Created, StoreError> {
    let now = store.now_ms().await?;
    store
        .create_operation(
            &NewOperation {
                tenant,
                operation_id: id,
                forest: &forest(),
                kind: "reset",
                initiator: 1,
                trace_id: "",
                traceparent: "",
                accepted_ms: now,
                deadline_ms: now + in_ms,
                replica: REPLICA,
                envelope: b"sealed",
                key_version: 1,
                ttl: Duration::from_secs(300),
                user,
            },
            QueueLimits {
                forest: 10_000,
                tenant: 10_000,
            },
        )
        .await
}

/// What the test holds the store to, per accepted operation.
#[derive(Default)]
struct Ledger {
    /// Accepted operations and the outcome each must end with.
    expected: HashMap<(TenantId, OperationId), Outcome>,
    /// How many times `complete` answered `Recorded` (must be 1 at most).
    recorded: HashMap<(TenantId, OperationId), u32>,
    /// Steps that failed at least once and were tried again (for the log).
    retried: usize,
    /// Steps answered as a repeat of a call that had run (its reply lost), for the log.
    replayed: usize,
}

/// One tenant's worker: creates operations one after another and takes each through its
/// life, as a gateway replica and an agent would; every fourth is left to expire.
async fn worker(
    store: Store,
    tenant: TenantId,
    ledger: Arc<Mutex<Ledger>>,
    progress: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let f = forest();
    let queue = queue_key(&tenant, &f);
    retry("ensure_group", || store.ensure_group(&queue)).await;
    let instance = format!("i-{tenant}");
    let connect = || store.queue_reader(&queue, &instance, Duration::from_millis(200));
    let mut reader = retry("queue_reader", connect).await.0;
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // A steady stream, not a flood: the judging reads every record afterwards.
        tokio::time::sleep(Duration::from_millis(10)).await;
        i += 1;
        let id = OperationId::new(format!("op-{i}")).unwrap();
        let user = format!("sam:u{i}");
        let expiring = i.is_multiple_of(4);
        let in_ms = if expiring { 300 } else { 60_000 };
        let (created, failed) =
            retry("create", || accept(&store, &tenant, &id, &user, in_ms)).await;
        ledger.lock().unwrap().retried += usize::from(failed);
        match created {
            Created::New => {}
            // The answer to a call that ran before: after an attempt whose reply was lost, or
            // when the cluster client sent it again itself (a node died with the reply).
            Created::Exists => ledger.lock().unwrap().replayed += 1,
            // A 300 ms deadline may pass while a failover holds the call up: not accepted.
            Created::PastDeadline if expiring => continue,
            other => panic!("{tenant}/{id}: create answered {other:?}"),
        }
        let expected = if expiring {
            Outcome::Expired
        } else {
            Outcome::Applied
        };
        ledger
            .lock()
            .unwrap()
            .expected
            .insert((tenant.clone(), id.clone()), expected);
        if expiring {
            progress.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // Read it from the stream as an agent's dispatcher does (own pending entries again
        // after a reconnect).
        let start = Instant::now();
        'read: loop {
            assert!(start.elapsed() < STEP_BUDGET, "{tenant}/{id}: never read");
            let entries = match reader.read_new(10, Duration::from_millis(200)).await {
                Ok(e) => e,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let Ok(r) = connect().await else { continue };
                    reader = r;
                    reader.own_pending(100).await.unwrap_or_default()
                }
            };
            if entries.iter().any(|e| e.operation_id == id) {
                break 'read;
            }
        }
        let to = Recipient {
            agent_id: "agent",
            instance: &instance,
            replica: REPLICA,
        };
        let (delivery, failed) = retry("mark_delivered", || {
            store.mark_delivered(&tenant, &f, &id, &to)
        })
        .await;
        ledger.lock().unwrap().retried += usize::from(failed);
        match delivery {
            Delivery::Deliver { .. } => {}
            Delivery::Redeliver { .. } => ledger.lock().unwrap().replayed += 1,
            other => {
                // Say what the store holds, so a failure here can be understood from the log.
                let rec = store.operation(&tenant, &id).await;
                let stages = store.timeline(&tenant, &id).await.map(|t| {
                    t.into_iter()
                        .map(|e| format!("{}({})", e.stage, e.detail))
                        .collect::<Vec<_>>()
                });
                panic!(
                    "{tenant}/{id}: mark_delivered answered {other:?}; record {:?}; timeline {stages:?}; high water {}",
                    rec.map(|r| r.map(|r| (r.state, r.outcome))),
                    store.high_water(&tenant)
                )
            }
        }
        let ack = Acknowledgment {
            tenant: &tenant,
            forest: &f,
            op: &id,
            instance: &instance,
            agent_id: "agent",
            replica: REPLICA,
            outcome: Outcome::Applied,
            violation: PolicyViolation::Unspecified,
            message: "applied",
            detail: "",
            event_detail: "",
            result: b"",
        };
        let (completion, failed) = retry("complete", || store.complete(&ack)).await;
        ledger.lock().unwrap().retried += usize::from(failed);
        match completion {
            Completion::Recorded { caller_replica } => {
                assert_eq!(caller_replica, REPLICA);
                *ledger
                    .lock()
                    .unwrap()
                    .recorded
                    .entry((tenant.clone(), id.clone()))
                    .or_default() += 1;
                retry("notify_done", || store.notify_done(REPLICA, &tenant, &id)).await;
            }
            Completion::AlreadyFinal => ledger.lock().unwrap().replayed += 1,
            other => panic!("{tenant}/{id}: complete answered {other:?}"),
        }
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// Listens on the done channel (reconnecting, on the next node) and collects what it hears.
fn listen(store: Store, heard: Arc<Mutex<HashSet<String>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(mut pubsub) = store
                .subscribe(&cloud_gateway::store::done_channel(REPLICA))
                .await
            {
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(p) = msg.get_payload::<String>() {
                        heard.lock().unwrap().insert(p);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

struct Run {
    ledger: Arc<Mutex<Ledger>>,
    progress: Vec<Arc<AtomicUsize>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Run {
    fn start(store: &Store, tenants: &[TenantId]) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut progress = Vec::new();
        let mut workers = Vec::new();
        for t in tenants {
            let p = Arc::new(AtomicUsize::new(0));
            progress.push(p.clone());
            workers.push(tokio::spawn(worker(
                store.clone(),
                t.clone(),
                ledger.clone(),
                p,
                stop.clone(),
            )));
        }
        Self {
            ledger,
            progress,
            stop,
            workers,
        }
    }

    /// Waits until every worker took `n` more operations through (bounded).
    async fn advance(&self, n: usize) {
        let base: Vec<usize> = self
            .progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect();
        let start = Instant::now();
        while !self
            .progress
            .iter()
            .zip(&base)
            .all(|(p, b)| p.load(Ordering::Relaxed) >= b + n)
        {
            assert!(
                start.elapsed() < STEP_BUDGET,
                "the workers stopped making progress"
            );
            for w in &self.workers {
                assert!(!w.is_finished(), "a worker failed");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("worker");
        }
        Arc::try_unwrap(self.ledger)
            .ok()
            .expect("ledger")
            .into_inner()
            .unwrap()
    }
}

/// The deadline sweep, then the verdict: every accepted operation is settled with the
/// outcome it must have, answered once, its entry gone.
async fn sweep_and_judge(store: &Store, tenants: &[TenantId], ledger: &Ledger) {
    let f = forest();
    // Let the last expiring operations' deadlines pass (store clock), then sweep as the
    // sweeper does.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for t in tenants {
        loop {
            let (due, _) = retry("due_deadlines", || store.due_deadlines(t, 100)).await;
            if due.is_empty() {
                break;
            }
            for (forest, op) in due {
                let (r, _) = retry("finalize", || {
                    store.finalize(t, &forest, &op, REPLICA, Duration::from_secs(10))
                })
                .await;
                assert_eq!(r, Finalized::Terminal(Outcome::Expired), "{t}/{op}");
            }
        }
    }
    assert!(ledger.expected.len() > 20, "too few operations ran");
    eprintln!(
        "{} operations accepted, {} steps tried again after an error, {} answered as repeats",
        ledger.expected.len(),
        ledger.retried,
        ledger.replayed
    );
    for ((t, op), want) in &ledger.expected {
        let rec = store
            .operation(t, op)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{t}/{op}: accepted, then lost"));
        assert_eq!(rec.state, OpState::Done, "{t}/{op}");
        assert_eq!(rec.outcome, *want, "{t}/{op}");
        let recorded = ledger.recorded.get(&(t.clone(), op.clone())).copied();
        assert!(recorded.unwrap_or(0) <= 1, "{t}/{op}: recorded twice");
        let stages: Vec<String> = store
            .timeline(t, op)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.stage)
            .collect();
        let terminal: Vec<&String> = stages
            .iter()
            .filter(|s| {
                ["acknowledged", "expired", "timed-out", "store-restored"].contains(&s.as_str())
            })
            .collect();
        let want_stage = if *want == Outcome::Applied {
            "acknowledged"
        } else {
            "expired"
        };
        assert_eq!(terminal, [want_stage], "{t}/{op}: {stages:?}");
    }
    for t in tenants {
        assert_eq!(
            store.queue_stats(t, &f).await.unwrap().0,
            0,
            "{t}: entries left"
        );
    }
}

/// A store whose lifecycle writes must reach one replica; with `tls`, it trusts that CA and
/// logs in with that password (from a private file in `dir`).
async fn replicated_store(
    url: &str,
    tls: Option<(&testkit::TestCa, &str)>,
    dir: &std::path::Path,
) -> Store {
    let options = RedisOptions {
        ca_file: tls.map(|(ca, _)| ca.ca_file()),
        password_file: tls.map(|(_, pw)| write_secret(dir, "redis.pass", pw, 0o600)),
        replica_acks: 1,
        ..RedisOptions::default()
    };
    Store::connect_with(url, &options)
        .await
        .unwrap()
        .for_replica(REPLICA)
}

fn tenants(n: usize) -> Vec<TenantId> {
    (0..n)
        .map(|i| TenantId::new(format!("tenant-{i}")).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_nothing_accepted_is_lost_or_answered_twice_across_failovers() {
    // As production runs it: TLS everywhere, the default user off, an ACL user.
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let pw = password.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        testkit::RedisCluster::start_tls(3, 1, "writeback", &pw)
    })
    .await
    .unwrap()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster.ca().unwrap();
    let store = replicated_store(&cluster.url(), Some((ca, &password)), dir.path()).await;
    let tenants = tenants(9);
    let heard = Arc::new(Mutex::new(HashSet::new()));
    let listener = listen(store.clone(), heard.clone());
    let run = Run::start(&store, &tenants);
    run.advance(4).await;

    // The tenants' keys are spread over all three masters.
    let masters = cluster.masters().unwrap();
    assert_eq!(masters.len(), 3);
    for m in &masters {
        assert!(
            cluster.keys_on(*m, "wb:{*}:op:*").unwrap() > 0,
            "master {m} holds no operation"
        );
    }

    // A manual failover of one master, then kill -9 of another, while work flows.
    let (a, b) = (masters[0], masters[1]);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.failover(a).unwrap();
        cluster
    })
    .await
    .unwrap();
    run.advance(4).await;
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.kill_master(b).unwrap();
        // Back as a replica of the node that took over: writes have a replica to reach.
        cluster.restart(b).unwrap();
        cluster
    })
    .await
    .unwrap();
    heard.lock().unwrap().clear();
    run.advance(4).await;
    let ledger = run.finish().await;
    sweep_and_judge(&store, &tenants, &ledger).await;
    assert!(
        !heard.lock().unwrap().is_empty(),
        "no outcome notification was heard after the faults"
    );
    listener.abort();
    admin_flow_across_slots(&store).await;
    let masters = tokio::task::spawn_blocking(move || {
        let m = cluster.masters().unwrap();
        let keys: Vec<usize> = m
            .iter()
            .map(|p| cluster.keys_on(*p, "wb:{*}:op:*").unwrap())
            .collect();
        (m, keys)
    })
    .await
    .unwrap();
    assert_eq!(
        masters.0.len(),
        3,
        "three masters serve the slots after it all"
    );
    assert!(
        !masters.0.contains(&b),
        "the killed master came back as a replica"
    );
    assert!(masters.1.iter().all(|k| *k > 0), "{masters:?}");
}

/// Tenants, tokens and agent credentials touch keys of several slots (the tenant's, the
/// registry, the token's, the credential's): each step must work on a cluster all the same.
async fn admin_flow_across_slots(store: &Store) {
    use cloud_gateway::tenants::Tenants;
    let key = cloud_gateway::admin::parse_master_key(
        cloud_gateway::admin::generate_master_key()
            .unwrap()
            .expose(),
    )
    .unwrap();
    let tenants = Tenants::new(store.clone(), key);
    let t = TenantId::new("admin-tenant").unwrap();
    let first = tenants.create_tenant(&t).await.unwrap();
    let second = tenants.create_tenant(&t).await.unwrap();
    assert_eq!(
        tenants.tenant_for_token(second.expose()).await.unwrap(),
        Some(t.clone())
    );
    assert_eq!(
        tenants.tenant_for_token(first.expose()).await.unwrap(),
        None,
        "rotated"
    );
    assert!(store.tenant_ids().await.unwrap().contains(&t));
    let secret = tenants
        .register_agent(&t, &forest(), "agent-x")
        .await
        .unwrap();
    let credential = format!("agent-x.{}", secret.expose());
    assert!(tenants
        .authenticate_agent(&credential)
        .await
        .unwrap()
        .is_ok());
    tenants.revoke_agent(&t, "agent-x").await.unwrap();
    assert!(tenants
        .authenticate_agent(&credential)
        .await
        .unwrap()
        .is_err());
    assert_eq!(store.agent_ids(&t).await.unwrap(), ["agent-x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_sentinel_the_store_follows_the_promoted_replica() {
    // As production runs it: TLS to sentinels and data nodes, an ACL user on the data nodes.
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let pw = password.clone();
    let sentinel =
        tokio::task::spawn_blocking(move || testkit::RedisSentinel::start_tls(3, "writeback", &pw))
            .await
            .unwrap()
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = sentinel.ca().unwrap();
    let store = replicated_store(&sentinel.url(), Some((ca, &password)), dir.path()).await;
    let tenants = tenants(3);
    let heard = Arc::new(Mutex::new(HashSet::new()));
    let listener = listen(store.clone(), heard.clone());
    let run = Run::start(&store, &tenants);
    run.advance(4).await;
    let (sentinel, old, new) = tokio::task::spawn_blocking(move || {
        let mut s = sentinel;
        let (old, new) = s.kill_master().unwrap();
        s.restart(old).unwrap();
        (s, old, new)
    })
    .await
    .unwrap();
    assert_ne!(old, new);
    heard.lock().unwrap().clear();
    run.advance(4).await;
    let ledger = run.finish().await;
    sweep_and_judge(&store, &tenants, &ledger).await;
    assert_eq!(sentinel.master_port().unwrap(), new);
    assert!(
        !heard.lock().unwrap().is_empty(),
        "no outcome notification was heard after the failover"
    );
    listener.abort();
}

#[tokio::test]
async fn a_write_no_replica_confirms_is_not_reported_done() {
    let redis = testkit::RedisServer::start().unwrap();
    let store = replicated_store(&redis.url(), None, std::path::Path::new("/")).await;
    let (t, f, id) = (
        TenantId::new("acme").unwrap(),
        forest(),
        OperationId::new("op-1").unwrap(),
    );
    store.ensure_group(&queue_key(&t, &f)).await.unwrap();
    let err = accept(&store, &t, &id, "sam:a", 10_000).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotReplicated {
                acked: 0,
                wanted: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0 of the 1 replica"), "{err}");
    // It did happen on the master: a retry finds it (the caller's resubmission).
    assert!(store.operation(&t, &id).await.unwrap().is_some());
}

/// A write no replica confirmed may be gone after a failover (or was made on a stale master
/// that came back before it was demoted): the store that serves next is not "behind" for
/// lacking it, and the tenant's other unsettled work must not be settled `TIMED_OUT` as if
/// the store had been restored from a backup. (CI caught this: an operation accepted and
/// queued was found settled before its agent took it, after a master was killed.)
#[tokio::test]
async fn an_unconfirmed_write_lost_in_a_failover_is_not_taken_for_a_rollback() {
    let redis = testkit::RedisServer::start().unwrap();
    let (t, f) = (TenantId::new("acme").unwrap(), forest());
    // One replica accepts work with no replica acknowledgment asked for.
    let plain = Store::connect(&redis.url())
        .await
        .unwrap()
        .for_replica(REPLICA);
    plain.ensure_group(&queue_key(&t, &f)).await.unwrap();
    let queued = OperationId::new("op-queued").unwrap();
    assert_eq!(
        accept(&plain, &t, &queued, "sam:a", 60_000).await.unwrap(),
        Created::New
    );
    // Another asks for one, which this lone server cannot give: its write is unconfirmed.
    let replicated = replicated_store(&redis.url(), None, std::path::Path::new("/")).await;
    let lost = OperationId::new("op-lost").unwrap();
    let err = accept(&replicated, &t, &lost, "sam:b", 60_000)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotReplicated { .. }), "{err}");
    assert_eq!(
        replicated.high_water(&t),
        0,
        "an unconfirmed write's sequence was taken as seen"
    );
    // The failover: the new master never held that write.
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(cloud_gateway::store::seq_key(&t))
        .arg(plain.high_water(&t))
        .query_async(&mut raw)
        .await
        .unwrap();
    replicated.check_sequence(&t, 0, "the test").await.unwrap();
    let rec = replicated.operation(&t, &queued).await.unwrap().unwrap();
    assert_eq!(
        (rec.state, rec.outcome),
        (OpState::Queued, Outcome::Unspecified),
        "queued work was settled as after a rollback"
    );
}

fn write_secret(dir: &std::path::Path, name: &str, value: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, value).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[tokio::test]
async fn tls_with_an_acl_user_works_and_each_misconfiguration_says_what_is_wrong() {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let redis = testkit::TlsRedis::start("writeback", &password).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pass_file = write_secret(dir.path(), "redis.pass", &format!("{password}\n"), 0o600);
    let good = RedisOptions {
        ca_file: Some(redis.ca.ca_file()),
        password_file: Some(pass_file.clone()),
        ..RedisOptions::default()
    };
    let store = Store::connect_with(&redis.url(), &good).await.unwrap();
    let (t, f) = (TenantId::new("acme").unwrap(), forest());
    let queue = queue_key(&t, &f);
    store.ensure_group(&queue).await.unwrap();
    let id = OperationId::new("op-1").unwrap();
    let created = accept(&store, &t, &id, "sam:a", 10_000).await.unwrap();
    assert_eq!(created, Created::New);
    // The dedicated connections speak TLS as the user too.
    let mut reader = store
        .queue_reader(&queue, "i1", Duration::from_millis(100))
        .await
        .unwrap();
    let entries = reader
        .read_new(10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    let mut pubsub = store.subscribe("wb:done:gw").await.unwrap();
    store.notify_done(REPLICA, &t, &id).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.get_payload::<String>().unwrap(), format!("acme\0op-1"));

    let refused = |url: String, opts: RedisOptions| {
        let password = password.clone();
        async move {
            let e = Store::connect_with(&url, &opts)
                .await
                .err()
                .unwrap_or_else(|| panic!("{url} connected"))
                .to_string();
            assert!(!e.contains(&password), "{e}");
            e
        }
    };
    // Another CA: the server's certificate does not verify.
    let other_ca = testkit::TestCa::new(&["127.0.0.1"]).unwrap();
    let e = refused(
        redis.url(),
        RedisOptions {
            ca_file: Some(other_ca.ca_file()),
            ..good.clone()
        },
    )
    .await;
    assert!(e.contains("certificate does not verify"), "{e}");
    // Plain TCP to the TLS port.
    let plain = format!("redis://writeback@127.0.0.1:{}", redis.server.port());
    let e = refused(
        plain,
        RedisOptions {
            ca_file: None,
            ..good.clone()
        },
    )
    .await;
    assert!(e.contains("use rediss://"), "{e}");
    // A wrong password.
    let wrong = write_secret(dir.path(), "wrong.pass", "not-it", 0o600);
    let e = refused(
        redis.url(),
        RedisOptions {
            password_file: Some(wrong),
            ..good.clone()
        },
    )
    .await;
    assert!(e.contains("password is wrong"), "{e}");
    // No user: the default user is disabled.
    let e = refused(
        format!("rediss://127.0.0.1:{}", redis.server.port()),
        RedisOptions {
            password_file: None,
            ..good.clone()
        },
    )
    .await;
    assert!(e.contains("cannot connect"), "{e}");
    // A password file others may read is refused before anything is sent.
    let open = write_secret(dir.path(), "open.pass", &password, 0o644);
    let e = refused(
        redis.url(),
        RedisOptions {
            password_file: Some(open),
            ..good.clone()
        },
    )
    .await;
    assert!(
        e.contains("--redis-password-file") && e.contains("644"),
        "{e}"
    );
}
