//! What an operator uses to answer "user X says her reset failed at 09:14": her operations,
//! each with its timeline and trace, and honest agent health (heartbeats plus an end-to-end
//! canary through the agent to a DC), through the API and through `relayctl`.

use std::process::Command;
use std::time::Duration;

use e2e::{authorized, binary, request, reset, Sandbox};
use relay::proto::{ListAgentsRequest, ListOperationsRequest, Outcome, PolicyViolation, UserRef};

async fn forests(sb: &Sandbox) -> Vec<relay::proto::ForestHealth> {
    let mut c = sb.client(0).await.unwrap();
    let req = ListAgentsRequest {
        tenant_id: sb.tenant.clone(),
        forest: String::new(),
    };
    c.list_agents(authorized(req, sb.token.expose()))
        .await
        .unwrap()
        .into_inner()
        .forests
}

async fn wait_health(sb: &Sandbox, healthy: bool) -> relay::proto::ForestHealth {
    let mut last = None;
    for _ in 0..100 {
        let f = forests(sb)
            .await
            .into_iter()
            .find(|f| f.forest == sb.forest);
        if f.as_ref().is_some_and(|f| f.healthy == healthy) {
            return f.unwrap();
        }
        last = f;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("forest never became healthy={healthy}: {last:?}");
}

fn relayctl(sb: &Sandbox, args: &[&str]) -> String {
    let out = Command::new(binary("relayctl").unwrap())
        .args([
            "--addr",
            &sb.gateways[0].addr.to_string(),
            "--tenant",
            &sb.tenant,
        ])
        .arg("--ca")
        .arg(sb.ca.ca_file())
        .args(args)
        .env("WRITEBACK_TOKEN", sb.token.expose())
        .env("WRITEBACK_FOREST", &sb.forest)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "relayctl {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_find_a_users_operations_and_see_honest_agent_health() {
    let mut sb = Sandbox::start(0).await.unwrap();
    sb.canary_interval = Duration::from_secs(1);
    sb.start_gateway("gateway-a").await.unwrap();
    sb.start_gateway("gateway-b").await.unwrap();
    sb.start_agent("agent-a", 0).await.unwrap();
    sb.start_agent("agent-b", 1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    sb.wait_agents(&t, &f, 2).await.unwrap();
    sb.dc.create_user("olga", "Initial#Pass1").unwrap();

    // Olga tries twice: the first is too simple, the second works.
    let first = sb
        .submit(0, request(&t, &f, "olga", reset("simplelowercase")))
        .await
        .unwrap();
    assert_eq!(
        Outcome::try_from(first.outcome).unwrap(),
        Outcome::RejectedByPolicy
    );
    let second = sb
        .submit(1, request(&t, &f, "olga", reset("Better#Choice-9")))
        .await
        .unwrap();
    assert_eq!(Outcome::try_from(second.outcome).unwrap(), Outcome::Applied);

    let mut c = sb.client(0).await.unwrap();
    let req = ListOperationsRequest {
        tenant_id: t.clone(),
        user: Some(UserRef::from_text(f.clone(), "olga")),
        since_unix_ms: relay::now_unix_ms() - 3_600_000,
        limit: 10,
    };
    let ops = c
        .list_operations(authorized(req.clone(), sb.token.expose()))
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert_eq!(ops[0].operation_id, second.operation_id, "newest first");
    assert_eq!(
        PolicyViolation::try_from(ops[1].policy_violation).unwrap(),
        PolicyViolation::Complexity
    );
    assert_eq!(ops[1].trace_id, first.trace_id);
    let later = ListOperationsRequest {
        since_unix_ms: relay::now_unix_ms() + 1000,
        ..req
    };
    assert!(c
        .list_operations(authorized(later, sb.token.expose()))
        .await
        .unwrap()
        .into_inner()
        .operations
        .is_empty());

    let text = relayctl(&sb, &["ops", "--user", "olga", "--since", "1h"]);
    assert!(
        text.contains("REJECTED_BY_POLICY/COMPLEXITY") && text.contains("APPLIED"),
        "{text}"
    );
    let text = relayctl(&sb, &["op", &first.operation_id]);
    assert!(
        text.contains("acknowledged") && text.contains("does not meet the complexity"),
        "{text}"
    );

    // Agents and health: the canary passes through an agent to the DC and back.
    let healthy = wait_health(&sb, true).await;
    assert_eq!(healthy.agents.len(), 2, "{healthy:?}");
    assert!(healthy
        .agents
        .iter()
        .all(|a| a.live && a.version == relay::VERSION && a.max_in_flight == 8));
    let mut replicas: Vec<&str> = healthy.agents.iter().map(|a| a.replica.as_str()).collect();
    replicas.sort();
    assert_eq!(replicas, ["gateway-a", "gateway-b"]);
    assert!(
        healthy.reason.contains("canary answered"),
        "{}",
        healthy.reason
    );
    let text = relayctl(&sb, &["agents"]);
    assert!(
        text.contains("HEALTHY") && text.contains("agent-a") && text.contains("agent-b"),
        "{text}"
    );

    // The DC goes down: agents still heartbeat, but the forest is unhealthy, and says why.
    sb.dc.stop();
    let sick = wait_health(&sb, false).await;
    assert!(
        sick.agents.iter().all(|a| a.live),
        "agents are still connected"
    );
    assert!(
        sick.reason.contains("DIRECTORY_UNAVAILABLE"),
        "{}",
        sick.reason
    );
    let text = relayctl(&sb, &["agents"]);
    assert!(
        text.contains("UNHEALTHY") && text.contains("DIRECTORY_UNAVAILABLE"),
        "{text}"
    );
    println!("{text}");

    // Back up: healthy again.
    sb.dc.start_again().unwrap();
    wait_health(&sb, true).await;

    // No agents at all: unhealthy at once, with the reason.
    let agents: Vec<_> = sb.agents.drain(..).collect();
    for a in &agents {
        a.shutdown.cancel();
    }
    for a in agents {
        a.stop(e2e::STOP_WITHIN).await.unwrap();
    }
    let gone = wait_health(&sb, false).await;
    assert!(gone.reason.contains("no live agent"), "{}", gone.reason);
    sb.shutdown().await;
}
