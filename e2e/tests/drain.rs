//! Graceful drain on SIGTERM, with real gateway binaries behind a load balancer (a TCP proxy
//! that connects each new connection to the first replica accepting, as a Service would skip
//! an endpoint that is going away). Both agents' streams are on gateway-a; callers go to
//! gateway-b; under a steady stream of resets gateway-a gets SIGTERM. It must turn readiness
//! NOT_SERVING, answer what it handed out, tell each agent to move, and exit; the agents must be
//! on gateway-b within seconds (the time is printed), and every reset must be answered
//! APPLIED, with AD holding each user's last password.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use e2e::proxy::Proxy;
use e2e::{binary, forest_id, request, reset, tenant_id, Process, Sandbox};
use relay::proto::Outcome;

/// The replicas holding the live agent streams of the sandbox forest.
async fn agent_replicas(sb: &Sandbox) -> Vec<String> {
    let mut r: Vec<String> = sb
        .store
        .live_agent_members(
            &tenant_id(&sb.tenant),
            &forest_id(&sb.forest),
            Duration::from_secs(3),
        )
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| m.rsplit('|').next().map(str::to_owned))
        .collect();
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_replica_without_losing_an_operation() {
    let mut sb = Sandbox::start(0).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let dir = sb.dir();
    let master = sb.write_master_key().unwrap();
    let addrs: [SocketAddr; 2] = std::array::from_fn(|_| {
        format!("127.0.0.1:{}", testkit::free_port().unwrap())
            .parse()
            .unwrap()
    });
    let mut gateways = [("gateway-a", addrs[0]), ("gateway-b", addrs[1])].map(|(name, addr)| {
        let mut env = sb.gateway_env(name, addr, &master);
        env.extend([
            ("WRITEBACK_HEARTBEAT_MS".to_owned(), "300".to_owned()),
            ("WRITEBACK_SHUTDOWN_GRACE_SECS".to_owned(), "10".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ]);
        Process::spawn(
            Command::new(binary("cloud-gateway").unwrap())
                .arg("serve")
                .envs(env),
            dir.join(format!("{name}.log")),
        )
    });
    for addr in addrs {
        sb.wait_serving(addr, Duration::from_secs(20))
            .await
            .unwrap();
    }
    let lb = Proxy::start_balanced(&addrs).await.unwrap();
    for name in ["agent-1", "agent-2"] {
        let config = sb
            .agent_config_at(name, &format!("https://{}", lb.addr()), &t, &f)
            .await
            .unwrap();
        sb.spawn_agent(config);
    }
    sb.wait_agents(&t, &f, 2).await.unwrap();
    assert_eq!(agent_replicas(&sb).await, ["gateway-a", "gateway-a"]);

    let users: Vec<String> = (0..6).map(|i| format!("drain{i}")).collect();
    for u in &users {
        sb.dc.create_user(u, "Initial#Pass1").unwrap();
    }
    let stop = CancellationToken::new();
    let results: Arc<Mutex<Vec<(String, String, Outcome)>>> = Arc::default();
    let mut callers = Vec::new();
    for lane in 0..3 {
        let mut client = relay::proto::writeback_client::WritebackClient::new(
            sb.channel_to(addrs[1]).await.unwrap(),
        );
        let mine: Vec<String> = users.iter().skip(lane).step_by(3).cloned().collect();
        let (t, f, token) = (t.clone(), f.clone(), sb.token.expose().to_owned());
        let (stop, results) = (stop.clone(), results.clone());
        callers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                for u in &mine {
                    n += 1;
                    let password = format!("Drain#{lane}-{n}x");
                    let answer = client
                        .submit(e2e::authorized(
                            request(&t, &f, u, reset(&password)),
                            &token,
                        ))
                        .await;
                    let outcome = match answer {
                        Ok(r) => Outcome::try_from(r.into_inner().outcome).unwrap_or_default(),
                        Err(_) => Outcome::Unspecified,
                    };
                    results.lock().unwrap().push((u.clone(), password, outcome));
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let [a, b] = &mut gateways;
    let sigterm = Instant::now();
    Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap();
    let mut moved = None;
    while sigterm.elapsed() < Duration::from_secs(20) {
        if agent_replicas(&sb).await == ["gateway-b", "gateway-b"] {
            moved = Some(sigterm.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved =
        moved.unwrap_or_else(|| panic!("agents not on gateway-b 20 s after SIGTERM\n{}", a.log()));
    let status = a.terminate(Duration::from_secs(15));
    let exited = sigterm.elapsed();
    assert!(status.is_some_and(|s| s.success()), "gateway-a: {status:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for c in callers {
        c.await.unwrap();
    }

    let log = a.log();
    assert!(log.contains("WB1034"), "gateway-a did not turn NOT_SERVING");
    assert_eq!(log.matches("WB1033").count(), 2, "each agent told to move");
    let results = results.lock().unwrap().clone();
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, _, o)| *o != Outcome::Applied)
        .collect();
    println!(
        "drain: {} resets, {} not APPLIED; SIGTERM to both agents on gateway-b {} ms; gateway-a exited after {} ms",
        results.len(),
        failed.len(),
        moved.as_millis(),
        exited.as_millis()
    );
    assert!(failed.is_empty(), "answers other than APPLIED: {failed:?}");
    assert!(results.len() > 20, "too little load: {}", results.len());
    // AD holds each user's last password (the outcomes were true).
    for u in &users {
        let (_, last, _) = results.iter().rev().find(|(user, _, _)| user == u).unwrap();
        assert!(
            sb.dc.can_bind(&format!("{u}@{f}"), last),
            "{u}: AD lacks {last}"
        );
    }
    b.terminate(Duration::from_secs(15));
    sb.shutdown().await;
}
