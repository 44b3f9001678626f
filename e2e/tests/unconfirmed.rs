//! A write the DC does not confirm (its answer lost, or the DC stalled mid-write) is read back
//! from AD, and the caller and `GetOperation` get what AD says, never a guess (issue 8,
//! guarantee 3). Judged against AD itself: `unicodePwd`'s write count and which password binds.
//!
//! The fault is placed exactly on the write: a tracing layer sees the agent's
//! `agent.ldap_write` span being created, just before the modify request goes out, and then
//! breaks the path to the DC. The layer is the process's global subscriber, set before the
//! sandbox would set its own (this test binary runs this one test).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;

use e2e::proxy::Proxy;
use e2e::{authorized, request, reset, Sandbox};
use relay::proto::{GetOperationRequest, Operation, OperationState, Outcome};

type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// Runs the armed hook once, when the agent's write span is created.
struct OnWrite(Hook);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for OnWrite {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "agent.ldap_write" {
            if let Some(f) = self.0.lock().unwrap().take() {
                f();
            }
        }
    }
}

fn signal(sig: &str, pid: u32) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status();
}

/// Samba frozen until dropped (SIGCONT), also when the test fails.
struct Thaw(u32);
impl Drop for Thaw {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

async fn settled(sb: &Sandbox, id: &str, within: Duration) -> Operation {
    let mut client = sb.client(0).await.unwrap();
    let until = Instant::now() + within;
    loop {
        let op = client
            .get_operation(authorized(
                GetOperationRequest {
                    tenant_id: sb.tenant.clone(),
                    operation_id: id.to_owned(),
                },
                sb.token.expose(),
            ))
            .await
            .unwrap()
            .into_inner();
        if op.state == OperationState::Done as i32 {
            return op;
        }
        assert!(Instant::now() < until, "{id} not settled within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stages(op: &Operation) -> Vec<String> {
    op.timeline
        .iter()
        .map(|e| format!("{} {}", e.stage, e.detail))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_write_is_read_back_from_ad() {
    let hook: Hook = Arc::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(OnWrite(hook.clone())),
    )
    .expect("the first subscriber of this process");
    let mut sb = Sandbox::start(1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    // The agent reaches the DC through a proxy on the DC's own address (its certificate
    // names the IP).
    let ip = sb.dc.ip();
    let proxy = Arc::new(
        Proxy::start_on(ip.parse().unwrap(), format!("{ip}:636").parse().unwrap())
            .await
            .unwrap(),
    );
    let mut config = sb.agent_config("agent-1", 0, &t, &f).await.unwrap();
    config.directory.urls = vec![format!("ldaps://{ip}:{}", proxy.addr().port())];
    sb.spawn_agent(config);
    sb.wait_agents(&t, &f, 1).await.unwrap();
    let dn = sb.dc.create_user("unconfirmed-1", "Initial#Pass1").unwrap();
    let upn = format!("unconfirmed-1@{f}");

    // 1. The DC carries the write out and its answer is lost: the agent reads it back on a
    //    new connection and the caller hears APPLIED, in time.
    let writes = sb.dc.password_writes(&dn).unwrap();
    let p = proxy.clone();
    *hook.lock().unwrap() = Some(Box::new(move || p.swallow_replies()));
    let mut req = request(&t, &f, "unconfirmed-1", reset("Lost#Answer1"));
    req.operation_id = "unconfirmed-lost-answer".into();
    req.timeout_ms = 3000;
    let heard = sb.submit(0, req).await.unwrap();
    assert!(
        hook.lock().unwrap().is_none(),
        "the write span was never created; the caller heard {heard:?}"
    );
    let op = settled(&sb, "unconfirmed-lost-answer", Duration::from_secs(10)).await;
    assert_eq!(
        sb.dc.password_writes(&dn).unwrap(),
        writes + 1,
        "AD wrote the password once"
    );
    assert!(sb.dc.can_bind(&upn, "Lost#Answer1"));
    assert_eq!(
        Outcome::try_from(heard.outcome).unwrap(),
        Outcome::Applied,
        "the caller hears what AD says: {heard:?}\n{:#?}",
        stages(&op)
    );
    assert_eq!(op.outcome, Outcome::Applied as i32);
    assert!(
        stages(&op).iter().any(|s| s.contains("read back from AD")),
        "the timeline says how it is known: {:#?}",
        stages(&op)
    );

    // 2. The DC stalls with the write in hand and wakes after the agent gave up on it: the
    //    answer, to the caller or later in GetOperation, is what AD holds, never "unknown"
    //    for long and never "nothing was changed" when it changed.
    let writes = sb.dc.password_writes(&dn).unwrap();
    let pid = sb.dc.pid().unwrap();
    *hook.lock().unwrap() = Some(Box::new(move || signal("-STOP", pid)));
    let thaw = Thaw(pid);
    let mut req = request(&t, &f, "unconfirmed-1", reset("Stalled#Dc1"));
    req.operation_id = "unconfirmed-stalled-dc".into();
    req.timeout_ms = 3000;
    let call = {
        let client = sb.client(0).await.unwrap();
        let token = sb.token.expose().to_owned();
        tokio::spawn(async move {
            let mut client = client;
            client.submit(authorized(req, &token)).await
        })
    };
    // The write's budget is 4/5 of the time left: it has timed out at the agent by 2.6 s.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(
        hook.lock().unwrap().is_none(),
        "the write span was never created"
    );
    drop(thaw);
    let heard = call.await.unwrap().unwrap().into_inner();
    let op = settled(&sb, "unconfirmed-stalled-dc", Duration::from_secs(15)).await;
    // Give a DC that would still commit the write a moment to do it, then judge.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let landed = match sb.dc.password_writes(&dn).unwrap() - writes {
        0 => false,
        1 => true,
        n => panic!("AD wrote the password {n} times"),
    };
    assert_eq!(sb.dc.can_bind(&upn, "Stalled#Dc1"), landed);
    let outcome = Outcome::try_from(op.outcome).unwrap();
    let truth = if landed {
        Outcome::Applied
    } else {
        Outcome::DirectoryUnavailable
    };
    assert_eq!(
        outcome,
        truth,
        "GetOperation says what AD holds (landed: {landed})\n{:#?}",
        stages(&op)
    );
    let heard = Outcome::try_from(heard.outcome).unwrap();
    assert!(
        heard == truth || heard == Outcome::TimedOut,
        "the caller heard {heard:?}, AD says landed: {landed}"
    );
    println!(
        "stalled DC: the write landed: {landed}; the caller heard {heard:?}; recorded {outcome:?}\n{:#?}",
        stages(&op)
    );
    sb.shutdown().await;
}
