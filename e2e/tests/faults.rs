//! The fault-injection suite (SPEC invariants 2–4): a steady stream of resets for several
//! users, on both gateway replicas, while Redis, the DC, an agent's path and the processes are
//! broken and brought back. Every operation is then judged against AD itself — how many times
//! each user's password was written (`unicodePwd`'s version in `replPropertyMetaData`), which
//! password binds, when it was set — not against the relay's own records.
//!
//! The stack: a durable Redis; gateway-a in this process, gateway-b as the real binary;
//! agent-1 as the real binary reaching gateway-a through a TCP proxy under the test's control,
//! agent-2 in this process on gateway-b; one Samba DC. Faults, in rounds: `kill -9` of Redis,
//! of agent-1 and of gateway-b (each restarted), SIGTERM of gateway-b under load, the DC frozen
//! (SIGSTOP/SIGCONT), agent-1's path blackholed (no FIN) and resumed.
//!
//! `make test` runs the short form (2 rounds); `make soak` sets `FAULT_ROUNDS` for the long one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use e2e::proxy::Proxy;
use e2e::{authorized, binary, request, reset, Process, Sandbox};
use relay::proto::writeback_client::WritebackClient;
use relay::proto::{GetOperationRequest, OperationState, Outcome};

const USERS: usize = 6;
const OP_TIMEOUT_MS: u32 = 6000;

fn write_secret(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, value).unwrap();
    path
}

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Samba frozen until dropped (SIGCONT), also when the test fails.
struct Frozen(u32);
impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

/// What the callers asked and heard for one operation.
#[derive(Debug, Clone)]
struct Op {
    id: String,
    user: usize,
    password: String,
    /// The last answer a caller got (`None`: only transport errors).
    answer: Option<Outcome>,
}

/// The processes this test runs as real binaries, restartable.
struct Binaries {
    dir: PathBuf,
    gateway_env: Vec<(String, String)>,
    gateway: Option<Process>,
    agent_env: Vec<(String, String)>,
    agent: Option<Process>,
    starts: usize,
}

impl Binaries {
    fn start_gateway(&mut self) {
        self.starts += 1;
        let mut cmd = Command::new(binary("cloud-gateway").unwrap());
        cmd.arg("serve").envs(self.gateway_env.iter().cloned());
        self.gateway = Some(Process::spawn(
            &mut cmd,
            self.dir.join(format!("gateway-b.{}.log", self.starts)),
        ));
    }

    fn start_agent(&mut self) {
        self.starts += 1;
        let mut cmd = Command::new(binary("onprem-agent").unwrap());
        cmd.arg("run").envs(self.agent_env.iter().cloned());
        self.agent = Some(Process::spawn(
            &mut cmd,
            self.dir.join(format!("agent-1.{}.log", self.starts)),
        ));
    }

    fn kill(p: &mut Option<Process>) {
        if let Some(mut p) = p.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// The counts the suite prints and requires to be zero.
#[derive(Debug, Default)]
struct Verdict {
    ops: usize,
    faults: usize,
    lost: usize,
    applied_twice: usize,
    applied_after_deadline: usize,
    untrue_answer: usize,
    out_of_order: usize,
    problems: Vec<String>,
}

impl Verdict {
    fn line(&self) -> String {
        format!(
            "ops {}, faults {}, lost {}, applied-twice {}, applied-after-deadline {}, untrue-answer {}, out-of-order {}",
            self.ops,
            self.faults,
            self.lost,
            self.applied_twice,
            self.applied_after_deadline,
            self.untrue_answer,
            self.out_of_order
        )
    }
}

/// "Nothing was changed" answers.
fn says_not_applied(o: Outcome) -> bool {
    !matches!(
        o,
        Outcome::Applied | Outcome::TimedOut | Outcome::InProgress | Outcome::Unspecified
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_true_whatever_fails() {
    let rounds: usize = std::env::var("FAULT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let mut sb = Sandbox::start_durable(1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let dir = sb.dir();

    // gateway-b: the real binary on a fixed port (restarted on the same one).
    let master = write_secret(
        &dir,
        "master.key",
        &sb.master_key
            .expose()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    );
    let gateway_addr: std::net::SocketAddr = format!("127.0.0.1:{}", testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let env = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    };
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    let gateway_env = env(&[
        ("WRITEBACK_LISTEN", gateway_addr.to_string()),
        ("WRITEBACK_TLS_CERT", path(sb.ca.cert_file())),
        ("WRITEBACK_TLS_KEY", path(sb.ca.key_file())),
        ("REDIS_URL", sb.redis.url()),
        ("WRITEBACK_MASTER_KEY_FILE", path(master.clone())),
        ("WRITEBACK_REPLICA_ID", "gateway-b".into()),
        ("WRITEBACK_CANARY_INTERVAL_SECS", "0".into()),
        ("WRITEBACK_SHUTDOWN_GRACE_SECS", "5".into()),
        ("RUST_LOG", "info".into()),
    ]);
    // agent-1: the real binary, through a proxy to gateway-a.
    let proxy = Proxy::start(sb.gateways[0].addr).await.unwrap();
    let secret = sb.tenants.register_agent(&t, &f, "agent-1").await.unwrap();
    let agent_env = env(&[
        ("AGENT_GATEWAY_URL", format!("https://{}", proxy.addr())),
        ("AGENT_GATEWAY_CA", path(sb.ca.ca_file())),
        ("AGENT_ID", "agent-1".into()),
        ("AGENT_FOREST", f.clone()),
        (
            "AGENT_SECRET_FILE",
            path(write_secret(&dir, "agent-1.secret", secret.expose())),
        ),
        ("AGENT_LDAP_URLS", sb.dc.ldaps_url()),
        ("AGENT_LDAP_CA", path(sb.dc.ca_file())),
        ("AGENT_BIND_DN", sb.dc.svc_upn()),
        (
            "AGENT_BIND_PASSWORD_FILE",
            path(write_secret(&dir, "svc.password", &sb.dc.svc_password())),
        ),
        ("AGENT_BASE_DN", sb.dc.base_dn()),
        ("AGENT_STATE_DIR", path(dir.join("agent-1-state"))),
        ("RUST_LOG", "info".into()),
    ]);
    let mut bins = Binaries {
        dir: dir.clone(),
        gateway_env,
        gateway: None,
        agent_env,
        agent: None,
        starts: 0,
    };
    bins.start_gateway();
    bins.start_agent();
    // agent-2: in this process, on gateway-b.
    let mut config = sb.agent_config("agent-2", 0, &t, &f).await.unwrap();
    config.gateway_url = format!("https://{gateway_addr}");
    sb.spawn_agent(config);
    sb.wait_agents(&t, &f, 2).await.unwrap();

    let users: Vec<String> = (0..USERS).map(|i| format!("fault-{i}")).collect();
    let mut dns = Vec::new();
    let mut writes_before = Vec::new();
    for u in &users {
        let dn = sb.dc.create_user(u, "Initial#Pass1").unwrap();
        writes_before.push(sb.dc.password_writes(&dn).unwrap());
        dns.push(dn);
    }

    // The workload: each user's resets one after the other, alternating replicas; a caller
    // that loses its replica retries the same operation id on the other.
    let addrs = [sb.gateways[0].addr, gateway_addr];
    let ca = std::fs::read(sb.ca.ca_file()).unwrap();
    let token = sb.token.expose().to_owned();
    let stop = tokio_util::sync::CancellationToken::new();
    let ops: Arc<Mutex<Vec<Op>>> = Arc::default();
    // When each APPLIED answer came, for the recovery figures.
    let applied_at: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let mut workers = Vec::new();
    for (u, name) in users.iter().enumerate() {
        let applied_at = applied_at.clone();
        let (ops, stop, ca, token, t, f, name) = (
            ops.clone(),
            stop.clone(),
            ca.clone(),
            token.clone(),
            t.clone(),
            f.clone(),
            name.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut k = 0usize;
            while !stop.is_cancelled() {
                let id = format!("{name}-{k}");
                let password = format!("Fault#{u}x{k}-Pw");
                let mut req = request(&t, &f, &name, reset(&password));
                req.operation_id = id.clone();
                req.timeout_ms = OP_TIMEOUT_MS;
                let mut answer = None;
                for attempt in 0..8 {
                    let addr = addrs[(k + attempt) % 2];
                    let call = async {
                        let channel =
                            tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                                .unwrap()
                                .tls_config(
                                    tonic::transport::ClientTlsConfig::new()
                                        .ca_certificate(tonic::transport::Certificate::from_pem(
                                            &ca,
                                        ))
                                        .domain_name("127.0.0.1"),
                                )
                                .unwrap()
                                .connect_timeout(Duration::from_secs(2))
                                .connect()
                                .await
                                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                        WritebackClient::new(channel)
                            .submit(authorized(req.clone(), &token))
                            .await
                    };
                    let within = Duration::from_millis(u64::from(OP_TIMEOUT_MS) + 5000);
                    if let Ok(Ok(r)) = tokio::time::timeout(within, call).await {
                        let o = Outcome::try_from(r.into_inner().outcome).unwrap();
                        answer = Some(o);
                        if o == Outcome::Applied {
                            applied_at.lock().unwrap().push(Instant::now());
                        }
                        if o != Outcome::InProgress {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                ops.lock().await.push(Op {
                    id,
                    user: u,
                    password,
                    answer,
                });
                k += 1;
            }
        }));
    }

    // The faults, each with when it began and when it was undone.
    let mut faults = 0;
    let mut windows: Vec<(&str, Instant, Instant)> = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Redis: kill -9, back after a second from its append-only file.
        let begun = Instant::now();
        sb.redis.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        sb.redis.restart().unwrap();
        windows.push(("redis kill -9", begun, Instant::now()));
        faults += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The DC frozen mid-traffic: briefly (writes wait and land in time), or for longer
        // than an operation's deadline (writes in flight time out at the agent, and the DC
        // commits them when it thaws: the agent must not say "nothing was changed").
        let begun = Instant::now();
        {
            let _frozen = Frozen(sb.dc.pid().unwrap());
            signal("-STOP", sb.dc.pid().unwrap());
            let frozen_for = if round % 2 == 0 {
                Duration::from_millis(1500)
            } else {
                Duration::from_millis(u64::from(OP_TIMEOUT_MS) + 1000)
            };
            tokio::time::sleep(frozen_for).await;
        }
        windows.push(("dc frozen", begun, Instant::now()));
        faults += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // agent-1's path blackholed (no FIN), then resumed.
        let begun = Instant::now();
        proxy.blackhole();
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.resume();
        windows.push(("agent path blackholed", begun, Instant::now()));
        faults += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // agent-1: kill -9, restarted from its journal.
        let begun = Instant::now();
        Binaries::kill(&mut bins.agent);
        tokio::time::sleep(Duration::from_millis(500)).await;
        bins.start_agent();
        windows.push(("agent kill -9", begun, Instant::now()));
        faults += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // gateway-b: kill -9, restarted on its port.
        let begun = Instant::now();
        Binaries::kill(&mut bins.gateway);
        tokio::time::sleep(Duration::from_millis(500)).await;
        bins.start_gateway();
        windows.push(("gateway kill -9", begun, Instant::now()));
        faults += 1;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // gateway-b: SIGTERM under load, restarted once it has drained.
        let begun = Instant::now();
        if let Some(g) = bins.gateway.as_mut() {
            let status = g.terminate(Duration::from_secs(15));
            assert!(status.is_some(), "gateway-b did not stop on SIGTERM");
        }
        bins.gateway = None;
        bins.start_gateway();
        windows.push(("gateway SIGTERM", begun, Instant::now()));
        faults += 1;
        println!("round {round} done after {:?}", started.elapsed());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    // Let every operation settle (deadline + the acknowledgment grace of both replicas).
    let ops = ops.lock().await.clone();
    let mut verdict = Verdict {
        ops: ops.len(),
        faults,
        ..Verdict::default()
    };
    let mut client = sb.client(0).await.unwrap();
    let mut finals: HashMap<String, (Option<Outcome>, i64)> = HashMap::new();
    let settle_by = Instant::now() + Duration::from_secs(40);
    for op in &ops {
        loop {
            let got = client
                .get_operation(authorized(
                    GetOperationRequest {
                        tenant_id: t.clone(),
                        operation_id: op.id.clone(),
                    },
                    sb.token.expose(),
                ))
                .await;
            match got {
                Ok(rec) => {
                    let rec = rec.into_inner();
                    let done = rec.state == OperationState::Done as i32;
                    if done || Instant::now() > settle_by {
                        let outcome = done.then(|| Outcome::try_from(rec.outcome).unwrap());
                        finals.insert(op.id.clone(), (outcome, rec.deadline_unix_ms));
                        break;
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // Never accepted (answered AGENT_UNAVAILABLE at once, or never reached a
                    // replica), or accepted and lost.
                    let accepted = op.answer.is_some_and(|a| {
                        !matches!(a, Outcome::AgentUnavailable | Outcome::NotEnabled)
                    });
                    if accepted {
                        verdict.lost += 1;
                        verdict.problems.push(format!(
                            "{} answered {:?}, then not found",
                            op.id, op.answer
                        ));
                    }
                    break;
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Judge against AD.
    for (u, dn) in dns.iter().enumerate() {
        let mine: Vec<&Op> = ops.iter().filter(|o| o.user == u).collect();
        let writes = sb.dc.password_writes(dn).unwrap() - writes_before[u];
        let final_of = |o: &Op| finals.get(&o.id).and_then(|(f, _)| *f);
        let applied = mine
            .iter()
            .filter(|o| final_of(o) == Some(Outcome::Applied))
            .count() as u32;
        let unknown = mine
            .iter()
            .filter(|o| {
                finals.contains_key(&o.id) && matches!(final_of(o), Some(Outcome::TimedOut) | None)
            })
            .count() as u32;
        if writes > applied + unknown {
            verdict.applied_twice += (writes - applied - unknown) as usize;
            verdict.problems.push(format!(
                "{}: AD wrote the password {writes} times for {applied} applied and {unknown} unknown",
                users[u]
            ));
        }
        if writes < applied {
            verdict.untrue_answer += (applied - writes) as usize;
            verdict.problems.push(format!(
                "{}: {applied} operations recorded APPLIED, AD wrote {writes}",
                users[u]
            ));
        }
        // What callers heard against the settled truth.
        for o in &mine {
            if let (Some(heard), Some(truth)) = (o.answer, final_of(o)) {
                let contradicts = (heard == Outcome::Applied && truth != Outcome::Applied)
                    || (says_not_applied(heard) && truth == Outcome::Applied);
                if contradicts {
                    verdict.untrue_answer += 1;
                    verdict
                        .problems
                        .push(format!("{}: heard {heard:?}, truth {truth:?}", o.id));
                }
            }
        }
        // Which password is in place: it must be one that may have been applied, the newest
        // applied one or a later one of unknown outcome, and set before its deadline.
        let upn = format!("{}@{}", users[u], f);
        let bound = mine.iter().rposition(|o| sb.dc.can_bind(&upn, &o.password));
        let last_applied = mine
            .iter()
            .rposition(|o| final_of(o) == Some(Outcome::Applied));
        match bound {
            None => {
                if last_applied.is_some() {
                    verdict.untrue_answer += 1;
                    verdict.problems.push(format!(
                        "{}: no relayed password binds though one was APPLIED",
                        users[u]
                    ));
                }
            }
            Some(i) => {
                let o = mine[i];
                match final_of(o) {
                    Some(Outcome::Applied | Outcome::TimedOut) | None => {}
                    Some(other) => {
                        verdict.untrue_answer += 1;
                        verdict.problems.push(format!(
                            "{}: its password is in AD, recorded {other:?}",
                            o.id
                        ));
                    }
                }
                if last_applied.is_some_and(|j| j > i) {
                    verdict.out_of_order += 1;
                    verdict
                        .problems
                        .push(format!("{}: an older operation's password won", users[u]));
                }
                let deadline = finals.get(&o.id).map_or(i64::MAX, |(_, d)| *d);
                let set: i64 = sb
                    .dc
                    .attribute(dn, "pwdLastSet")
                    .unwrap()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let set_ms = set / 10_000 - 11_644_473_600_000;
                if set_ms > deadline + 5 {
                    verdict.applied_after_deadline += 1;
                    verdict.problems.push(format!(
                        "{}: written {} ms after its deadline",
                        o.id,
                        set_ms - deadline
                    ));
                }
            }
        }
    }
    let answers: HashMap<String, usize> = ops.iter().fold(HashMap::new(), |mut m, o| {
        *m.entry(format!("{:?}", o.answer)).or_default() += 1;
        m
    });
    println!("answers heard: {answers:?}");
    // Recovery, as callers saw it: the longest stretch without any APPLIED answer from the
    // fault's start to 10 s after it was undone, and the first APPLIED answer after the undo.
    let applied = applied_at.lock().unwrap().clone();
    let mut by_kind: HashMap<&str, Vec<(Duration, Duration)>> = HashMap::new();
    for (kind, begun, undone) in &windows {
        let mut times: Vec<Instant> = applied
            .iter()
            .copied()
            .filter(|t| *t >= *begun && *t <= *undone + Duration::from_secs(10))
            .collect();
        times.sort();
        let mut gap = Duration::ZERO;
        let mut prev = *begun;
        for t in &times {
            gap = gap.max(t.saturating_duration_since(prev));
            prev = *t;
        }
        let first_after = times
            .iter()
            .find(|t| **t >= *undone)
            .map_or(Duration::from_secs(10), |t| t.duration_since(*undone));
        by_kind.entry(kind).or_default().push((gap, first_after));
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by_key(|(k, _)| *k);
    for (kind, v) in kinds {
        let max_gap = v.iter().map(|(g, _)| *g).max().unwrap_or_default();
        let max_first = v.iter().map(|(_, f)| *f).max().unwrap_or_default();
        println!(
            "recovery {kind}: {} times, longest pause in APPLIED answers {max_gap:.2?}, first APPLIED after undo within {max_first:.2?}",
            v.len()
        );
    }
    println!("{}", verdict.line());
    Binaries::kill(&mut bins.agent);
    Binaries::kill(&mut bins.gateway);
    assert!(
        verdict.lost
            + verdict.applied_twice
            + verdict.applied_after_deadline
            + verdict.untrue_answer
            + verdict.out_of_order
            == 0,
        "{}\n{}",
        verdict.line(),
        verdict.problems.join("\n")
    );
    assert!(
        verdict.ops >= 30,
        "too little traffic to judge: {}",
        verdict.line()
    );
    sb.shutdown().await;
}
