//! `relayctl` behaves like a Unix tool: a closed reader ends it quietly, `--output json` gives
//! one JSON document per command, and the exit code says what happened (0 applied or
//! answered, 1 a definite no, 3 unknown, 4 unavailable).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use cloud_gateway::tenants::ForestSettingsChange;
use e2e::{binary, forest_id, tenant_id, Sandbox};
use serde_json::Value;

fn command(sb: &Sandbox) -> Command {
    let mut c = Command::new(binary("relayctl").unwrap());
    c.args([
        "--addr",
        &sb.gateways[0].addr.to_string(),
        "--tenant",
        &sb.tenant,
    ])
    .arg("--ca")
    .arg(sb.ca.ca_file())
    .env("WRITEBACK_TOKEN", sb.token.expose())
    .env("WRITEBACK_FOREST", &sb.forest)
    .env_remove("RELAYCTL_OUTPUT");
    c
}

fn run(sb: &Sandbox, args: &[&str], stdin: &str) -> Output {
    let mut child = command(sb)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `relayctl --output json ARGS`: its exit code and the one JSON document it printed.
fn json(sb: &Sandbox, args: &[&str], stdin: &str) -> (i32, Value) {
    let out = run(sb, &[&["--output", "json"], args].concat(), stdin);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let doc = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("relayctl {args:?}: not JSON ({e}): {stdout}{stderr}"));
    (out.status.code().unwrap(), doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayctl_pipes_prints_json_and_exits_with_what_happened() {
    let mut sb = Sandbox::start(1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let reset = ["submit", "--user", "rita", "--reset", "--password-stdin"];

    // No agent yet: AGENT_UNAVAILABLE is "retry later", exit 4, nothing queued.
    let (code, doc) = json(&sb, &reset, "Never-Queued#1\n");
    assert_eq!(code, 4, "{doc}");
    assert_eq!(doc["outcome"], "AGENT_UNAVAILABLE", "{doc}");
    assert!(doc["operation"].is_null(), "{doc}");

    sb.start_agent("agent-1", 0).await.unwrap();
    sb.wait_agents(&t, &f, 1).await.unwrap();
    sb.dc.create_user("rita", "Initial#Pass1").unwrap();

    // APPLIED: exit 0, with the timeline.
    let (code, applied) = json(&sb, &reset, "Fresh#Start-42\n");
    assert_eq!(code, 0, "{applied}");
    assert_eq!(applied["outcome"], "APPLIED", "{applied}");
    assert!(applied["policy_violation"].is_null());
    let id = applied["operation_id"].as_str().unwrap().to_owned();
    assert!(!id.is_empty() && applied["trace_id"].as_str().is_some_and(|t| !t.is_empty()));
    let timeline = applied["operation"]["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|e| e["stage"] == "accepted"
            && e["at_unix_ms"].as_i64().is_some()
            && e["replica"].is_string()
            && e["agent_id"].is_string()
            && e["detail"].is_string()),
        "{applied}"
    );
    assert!(
        !applied.to_string().contains("Fresh#Start-42"),
        "no password"
    );

    // A policy rejection: a definite no, exit 1.
    let (code, rejected) = json(&sb, &reset, "simplelowercase\n");
    assert_eq!(code, 1, "{rejected}");
    assert_eq!(rejected["outcome"], "REJECTED_BY_POLICY", "{rejected}");
    assert!(rejected["policy_violation"].is_string(), "{rejected}");

    let (code, op) = json(&sb, &["op", &id], "");
    assert_eq!(code, 0);
    assert_eq!(op["operation_id"], id.as_str());
    assert_eq!(op["outcome"], "APPLIED");
    assert!(
        op["timeline"].as_array().is_some_and(|t| !t.is_empty()),
        "{op}"
    );

    let (code, ops) = json(&sb, &["ops", "--user", "rita", "--since", "1h"], "");
    assert_eq!(code, 0);
    let ops = ops.as_array().unwrap().clone();
    // Every attempt, the one refused with no agent too.
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert_eq!(ops[0]["outcome"], "REJECTED_BY_POLICY", "newest first");
    assert_eq!(ops[1]["operation_id"], id.as_str());
    assert_eq!(ops[2]["outcome"], "AGENT_UNAVAILABLE");

    let (code, agents) = json(&sb, &["agents"], "");
    assert_eq!(code, 0);
    let forest = &agents.as_array().unwrap()[0];
    assert_eq!(forest["forest"], f.as_str(), "{agents}");
    assert!(forest["healthy"].is_boolean());
    let agent = &forest["agents"][0];
    assert_eq!(agent["agent_id"], "agent-1", "{agents}");
    assert_eq!(agent["live"], true);
    assert!(agent["replica"].as_str().is_some_and(|r| !r.is_empty()));

    let (code, policy) = json(&sb, &["policy"], "");
    assert_eq!(code, 0);
    assert_eq!(policy["forest"], f.as_str(), "{policy}");
    assert!(policy["min_length"].is_u64() && policy["complexity"].is_boolean());

    // `| head -1`: the reader leaves after one line; relayctl ends quietly with exit 0.
    let piped = command(&sb);
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"{ "$0" "$@" 2>&3; echo "rc=$?" >&3; } 3>&2 | head -1"#)
        .arg(piped.get_program())
        .args(piped.get_args())
        .args(["op", &id])
        .envs(piped.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .env_remove("RELAYCTL_OUTPUT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "{out:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "rc=0\n", "{out:?}");
    // A reader gone before the first write (a sure EPIPE, whatever the pipe buffer holds).
    let mut child = command(&sb)
        .args(["ops", "--user", "rita"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");

    // Writeback off: NOT_ENABLED is a clear no (exit 1), printed, with no NOT_FOUND error.
    let off = ForestSettingsChange {
        writeback_enabled: Some(false),
        ..Default::default()
    };
    sb.tenants
        .set_forest(&tenant_id(&t), &forest_id(&f), &off)
        .await
        .unwrap();
    let out = run(&sb, &reset, "Not-Enabled#1\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("outcome:      NOT_ENABLED"), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");
    sb.shutdown().await;
}
