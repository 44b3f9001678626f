//! Benchmark: end-to-end latency of password resets through the relay, caller on replica A,
//! agent on replica B, real Redis, real Samba AD over LDAPS. Prints figures; asserts nothing.
//!
//! `cargo run -p e2e --example reset_latency [-- SEQUENTIAL CONCURRENT_USERS]`

use std::time::{Duration, Instant};

use e2e::{forest_id, operation_id, request, reset, tenant_id, Sandbox};
use relay::proto::Outcome;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn report(label: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{label:<28} n={:<4} p50={:>6.1} ms  p95={:>6.1} ms  max={:>6.1} ms",
        v.len(),
        percentile(&v, 0.5).as_secs_f64() * 1e3,
        percentile(&v, 0.95).as_secs_f64() * 1e3,
        v.last().unwrap().as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sequential = args.first().copied().unwrap_or(40);
    let users = args.get(1).copied().unwrap_or(8);

    let mut sb = Sandbox::start(2).await?;
    sb.start_agent("bench-agent", 1).await?;
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    sb.wait_agents(&t, &f, 1).await?;
    for i in 0..users.max(1) {
        sb.dc.create_user(&format!("bench{i}"), "Initial#Pass1")?;
    }

    // Warm-up: TLS channel, LDAP pool.
    sb.submit(0, request(&t, &f, "bench0", reset("Warm-Up#Pass0")))
        .await?;

    let mut latencies = Vec::new();
    let mut agent_write = Vec::new();
    for i in 0..sequential {
        let started = Instant::now();
        let r = sb
            .submit(
                0,
                request(&t, &f, "bench0", reset(&format!("Seq-{i}#Pass-x"))),
            )
            .await?;
        latencies.push(started.elapsed());
        anyhow::ensure!(r.outcome == Outcome::Applied as i32, "reset {i}: {r:?}");
        let tl = sb
            .store
            .timeline(&tenant_id(&t), &operation_id(&r.operation_id))
            .await?;
        let at = |s: &str| tl.iter().find(|e| e.stage == s).map(|e| e.at);
        if let (Some(d), Some(a)) = (at("delivered"), at("acknowledged")) {
            agent_write.push(Duration::from_millis((a - d).max(0) as u64));
        }
    }
    println!("resets through gateway-a, agent on gateway-b (dev profile, 2 cores):");
    report("submit -> APPLIED", latencies);
    report("delivered -> acknowledged", agent_write);

    // Refusals answered at once (the e2e tests assert that they come before the deadline with
    // nothing recorded; the figure lives here): a forest without agents, a forest switched off.
    let mut unavailable = Vec::new();
    for i in 0..sequential {
        let started = Instant::now();
        let r = sb
            .submit(
                0,
                request(
                    &t,
                    "no-agent.writeback.test",
                    "bench0",
                    reset(&format!("Never-{i}#Queued")),
                ),
            )
            .await?;
        unavailable.push(started.elapsed());
        anyhow::ensure!(r.outcome == Outcome::AgentUnavailable as i32, "{r:?}");
    }
    let off = cloud_gateway::tenants::ForestSettingsChange {
        writeback_enabled: Some(false),
        ..Default::default()
    };
    let on = cloud_gateway::tenants::ForestSettingsChange {
        writeback_enabled: Some(true),
        ..Default::default()
    };
    sb.tenants
        .set_forest(&tenant_id(&t), &forest_id(&f), &off)
        .await?;
    let mut not_enabled = Vec::new();
    for i in 0..sequential {
        let started = Instant::now();
        let r = sb
            .submit(
                0,
                request(&t, &f, "bench0", reset(&format!("Off-{i}#Refused"))),
            )
            .await?;
        not_enabled.push(started.elapsed());
        anyhow::ensure!(r.outcome == Outcome::NotEnabled as i32, "{r:?}");
    }
    sb.tenants
        .set_forest(&tenant_id(&t), &forest_id(&f), &on)
        .await?;
    report("submit -> AGENT_UNAVAILABLE", unavailable);
    report("submit -> NOT_ENABLED", not_enabled);

    let started = Instant::now();
    let per_user = 10;
    let mut tasks = Vec::new();
    for u in 0..users {
        let client = sb.client(0).await?;
        let (t, f, token) = (t.clone(), f.clone(), sb.token.expose().to_owned());
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            let mut out = Vec::new();
            for i in 0..per_user {
                let s = Instant::now();
                let r = client
                    .submit(e2e::authorized(
                        request(
                            &t,
                            &f,
                            &format!("bench{u}"),
                            reset(&format!("Par-{u}-{i}#Pass")),
                        ),
                        &token,
                    ))
                    .await
                    .map(tonic::Response::into_inner);
                out.push((
                    s.elapsed(),
                    r.map(|r| r.outcome == Outcome::Applied as i32)
                        .unwrap_or(false),
                ));
            }
            out
        }));
    }
    let mut all = Vec::new();
    let mut ok = 0;
    for t in tasks {
        for (d, applied) in t.await? {
            all.push(d);
            ok += usize::from(applied);
        }
    }
    let wall = started.elapsed();
    println!(
        "{users} users x {per_user} resets in parallel: {ok}/{} applied in {:.2} s = {:.1} resets/s",
        all.len(),
        wall.as_secs_f64(),
        all.len() as f64 / wall.as_secs_f64()
    );
    report("parallel submit -> APPLIED", all);
    sb.shutdown().await;
    Ok(())
}
