//! The agent half of at-most-once (SPEC invariant 3), with a real agent, a real gateway and a
//! real DC: the agent's stream to the gateway is cut while it is writing an operation (the DC
//! frozen with SIGSTOP holds the write); the agent finishes the write, reconnects, the gateway
//! sends the operation again to that same instance, and the agent answers it from its memory
//! of outcomes. AD's own count of password writes must go up by exactly one.

use std::future::Future;
use std::process::Command;
use std::time::Duration;

use e2e::proxy::Proxy;
use e2e::{authorized, forest_id, operation_id, request, reset, tenant_id, Sandbox};
use relay::proto::{GetOperationRequest, Outcome};

/// A frozen process (SIGSTOP), thawed (SIGCONT) by [`Frozen::thaw`] or at the latest on drop,
/// also when the test fails.
struct Frozen(Option<u32>);

fn signal(sig: &str, pid: u32) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}: {status:?}");
}

impl Frozen {
    fn freeze(pid: u32) -> Self {
        signal("-STOP", pid);
        Self(Some(pid))
    }

    fn thaw(&mut self) {
        if let Some(pid) = self.0.take() {
            signal("-CONT", pid);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

/// Polls `check` every 20 ms until it holds, for at most `within`.
async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_write_is_answered_from_memory_and_written_once() {
    let mut sb = Sandbox::start(1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let proxy = Proxy::start(sb.gateways[0].addr).await.unwrap();
    let mut config = sb.agent_config("agent-cut", 0, &t, &f).await.unwrap();
    config.gateway_url = format!("https://{}", proxy.addr());
    sb.spawn_agent(config);
    sb.wait_agents(&t, &f, 1).await.unwrap();
    assert_eq!(
        proxy.accepted(),
        1,
        "the agent reaches the gateway through the proxy"
    );

    // A first reset while the DC answers: the agent's LDAPS connections are up before the freeze.
    sb.dc.create_user("warm", "Initial#Pass1").unwrap();
    let r = sb
        .submit(0, request(&t, &f, "warm", reset("Warm-Up#Pass1")))
        .await
        .unwrap();
    assert_eq!(
        Outcome::try_from(r.outcome).unwrap(),
        Outcome::Applied,
        "{r:?}"
    );
    let applied = || {
        onprem_agent::metrics::get()
            .operations
            .with_label_values(&["reset", "APPLIED"])
            .get()
    };
    assert_eq!(applied(), 1);

    let dn = sb.dc.create_user("mallory", "Initial#Pass1").unwrap();
    let writes_before = sb.dc.password_writes(&dn).unwrap();
    let password = "Cut-Mid-Write#1";
    let op_id = "cut-mid-write";

    let mut frozen = Frozen::freeze(sb.dc.pid().expect("samba pid"));
    let mut req = request(&t, &f, "mallory", reset(password));
    req.operation_id = op_id.into();
    req.timeout_ms = 60_000;
    let mut client = sb.client(0).await.unwrap();
    let token = sb.token.expose().to_owned();
    let caller = tokio::spawn(async move {
        client
            .submit(authorized(req, &token))
            .await
            .map(tonic::Response::into_inner)
    });

    // The agent has taken it: delivered on the timeline, and being applied by the agent (its
    // in-flight gauge), stuck on the frozen DC.
    wait_until("delivered", Duration::from_secs(10), || async {
        sb.store
            .timeline(&tenant_id(&t), &operation_id(op_id))
            .await
            .unwrap()
            .iter()
            .any(|e| e.stage == "delivered" && e.agent == "agent-cut")
    })
    .await;
    wait_until("the agent applies it", Duration::from_secs(10), || async {
        onprem_agent::metrics::get().in_flight.get() == 1
    })
    .await;

    // Cut the stream mid-write; the gateway sees its session end.
    proxy.cut();
    proxy.wait_closed(Duration::from_secs(5)).await.unwrap();
    wait_until(
        "the gateway drops the session",
        Duration::from_secs(10),
        || async {
            sb.store
                .live_agents(&tenant_id(&t), &forest_id(&f), Duration::from_secs(3))
                .await
                .unwrap()
                == 0
        },
    )
    .await;
    frozen.thaw();

    // The agent finishes the write, reconnects through the proxy and is sent the operation
    // again; the caller gets the outcome.
    proxy
        .wait_accepted(2, Duration::from_secs(30))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(70), caller)
        .await
        .expect("the caller is answered within its timeout")
        .unwrap()
        .unwrap();
    assert_eq!(
        Outcome::try_from(answer.outcome).unwrap(),
        Outcome::Applied,
        "{answer:?}"
    );
    let mut client = sb.client(0).await.unwrap();
    let op = client
        .get_operation(authorized(
            GetOperationRequest {
                tenant_id: t.clone(),
                operation_id: op_id.into(),
            },
            sb.token.expose(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        Outcome::try_from(op.outcome).unwrap(),
        Outcome::Applied,
        "{op:?}"
    );
    assert_eq!(
        sb.dc.password_writes(&dn).unwrap(),
        writes_before + 1,
        "AD wrote the password of a redelivered operation more than once (or never)"
    );
    assert!(sb.dc.can_bind(&dn, password));
    assert_eq!(
        applied(),
        2,
        "the agent applied the operation once, and answered the redelivery from memory"
    );
    sb.shutdown().await;
}
