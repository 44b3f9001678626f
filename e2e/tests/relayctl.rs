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

/// `cloud-gateway admin set-forest ARGS` for the sandbox tenant's forest.
fn set_forest(sb: &Sandbox, args: &[&str]) -> Output {
    let master_key = sb.write_master_key().unwrap();
    let env = sb.gateway_env("admin", "127.0.0.1:0".parse().unwrap(), &master_key);
    Command::new(binary("cloud-gateway").unwrap())
        .args([
            "admin",
            "set-forest",
            "--tenant",
            &sb.tenant,
            "--forest",
            &sb.forest,
        ])
        .args(args)
        .envs(env)
        .output()
        .unwrap()
}

/// The objectGUID of `dn` in canonical form, read from AD itself.
fn object_guid(sb: &Sandbox, dn: &str) -> String {
    use base64::Engine;
    let out = e2e::run_ok(
        Command::new("ldapsearch")
            .args([
                "-LLL",
                "-x",
                "-H",
                &sb.dc.ldaps_url(),
                "-D",
                &sb.dc.admin_dn(),
                "-w",
            ])
            .arg(sb.dc.admin_password())
            .args(["-b", dn, "-s", "base", "objectGUID"])
            .env("LDAPTLS_CACERT", sb.dc.ca_file()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let b64 = text
        .lines()
        .find_map(|l| l.strip_prefix("objectGUID:: "))
        .unwrap_or_else(|| panic!("no objectGUID for {dn}: {text}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .unwrap();
    onprem_agent::directory::guid_string(&bytes).unwrap()
}

/// An operator finds every attempt for a user under any of the user's names, and the tenant
/// admin's writeback scope (`admin set-forest --scope-ou`) refuses users outside it before
/// anything is written, judged in AD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_found_by_any_name_and_the_scope_refuses_before_writing() {
    let mut sb = Sandbox::start(1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    sb.start_agent("agent-1", 0).await.unwrap();
    sb.wait_agents(&t, &f, 1).await.unwrap();
    let base = sb.dc.base_dn();
    sb.dc
        .samba_tool(&["ou", "create", &format!("OU=Staff,{base}")])
        .unwrap();
    let rita = sb
        .dc
        .create_user_in("rita", "Initial#Pass1", "OU=Staff")
        .unwrap();
    let olga = sb.dc.create_user("olga", "Initial#Pass1").unwrap();
    let upn = format!("rita@{}", sb.dc.dns_domain());
    let guid = object_guid(&sb, &rita);
    let names = ["rita", upn.as_str(), guid.as_str()];

    // Submitted by UPN; the agent reports the user it found by every name.
    let (code, applied) = json(
        &sb,
        &["submit", "--user", &upn, "--reset", "--password-stdin"],
        "By#Upn-Reset1\n",
    );
    assert_eq!(
        (code, applied["outcome"].as_str()),
        (0, Some("APPLIED")),
        "{applied}"
    );
    let applied_id = applied["operation_id"].as_str().unwrap().to_owned();
    // The timeline names the entry the write went to.
    let timeline = applied["operation"]["timeline"].as_array().unwrap();
    let acked = timeline
        .iter()
        .find(|e| e["stage"] == "acknowledged")
        .unwrap_or_else(|| panic!("{applied}"));
    assert!(
        acked["detail"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains(&format!("user {}", rita.to_lowercase())),
        "{acked}"
    );

    // Refused before queueing, under the other names: an invalid request (by objectGUID),
    // writeback switched off (by sAMAccountName), no agent (by objectGUID).
    let too_long = format!("{}\n", "x".repeat(1000));
    let invalid = run(
        &sb,
        &["submit", "--user", &guid, "--reset", "--password-stdin"],
        &too_long,
    );
    assert_eq!(invalid.status.code(), Some(2), "{invalid:?}");
    assert!(
        String::from_utf8_lossy(&invalid.stderr).contains("reset.new_password"),
        "{invalid:?}"
    );
    let out = set_forest(&sb, &["--writeback-enabled", "false"]);
    assert!(out.status.success(), "{out:?}");
    let (code, off) = json(
        &sb,
        &["submit", "--user", "rita", "--reset", "--password-stdin"],
        "Switched#Off-1\n",
    );
    assert_eq!(
        (code, off["outcome"].as_str()),
        (1, Some("NOT_ENABLED")),
        "{off}"
    );
    let out = set_forest(&sb, &["--writeback-enabled", "true"]);
    assert!(out.status.success(), "{out:?}");
    sb.agents
        .pop()
        .unwrap()
        .stop(std::time::Duration::from_secs(15))
        .await
        .unwrap();
    let (code, away) = json(&sb, &["submit", "--user", &guid, "--unlock"], "");
    assert_eq!(
        (code, away["outcome"].as_str()),
        (4, Some("AGENT_UNAVAILABLE")),
        "{away}"
    );

    for name in names {
        let (code, ops) = json(&sb, &["ops", "--user", name, "--since", "1h"], "");
        assert_eq!(code, 0, "{ops}");
        let outcomes: Vec<&str> = ops
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            ["AGENT_UNAVAILABLE", "NOT_ENABLED", "REFUSED", "APPLIED"],
            "by {name}: {ops}"
        );
        assert_eq!(ops[3]["operation_id"], applied_id.as_str(), "by {name}");
    }

    // The scope: only users under OU=Staff. A DN that is not one is refused, named.
    let out = set_forest(&sb, &["--scope-ou", "Staff"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--scope-ou: \"Staff\" is not a distinguished name"),
        "{err}"
    );
    let out = set_forest(&sb, &["--scope-ou", &format!("OU=Staff,{base}")]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("users under OU=Staff"),
        "{out:?}"
    );
    sb.start_agent("agent-2", 0).await.unwrap();
    sb.wait_agents(&t, &f, 1).await.unwrap();
    let (code, out_of_scope) = json(
        &sb,
        &["submit", "--user", "olga", "--reset", "--password-stdin"],
        "Out-Of#Scope-1\n",
    );
    assert_eq!(code, 1, "{out_of_scope}");
    assert_eq!(out_of_scope["outcome"], "OUT_OF_SCOPE", "{out_of_scope}");
    assert_eq!(out_of_scope["message"], relay::messages::OUT_OF_SCOPE);
    // Judged in AD: the old password still binds, the new one does not.
    let olga_upn = format!("olga@{}", sb.dc.dns_domain());
    assert!(sb.dc.can_bind(&olga_upn, "Initial#Pass1"), "{olga} written");
    assert!(
        !sb.dc.can_bind(&olga_upn, "Out-Of#Scope-1"),
        "{olga} written"
    );
    let (code, applied) = json(
        &sb,
        &["submit", "--user", "rita", "--reset", "--password-stdin"],
        "In-Scope#Reset-2\n",
    );
    assert_eq!(
        (code, applied["outcome"].as_str()),
        (0, Some("APPLIED")),
        "{applied}"
    );
    // GetPasswordPolicy says a user is out of scope.
    let (code, policy) = json(&sb, &["policy", "--user", "olga"], "");
    assert_eq!(code, 0, "{policy}");
    assert_eq!(policy["out_of_scope"], true, "{policy}");
    let (_, policy) = json(&sb, &["policy", "--user", "rita"], "");
    assert_ne!(policy["out_of_scope"], true, "{policy}");

    // One user, one unlock budget (5 per window), whichever name a caller uses.
    for name in ["rita", upn.as_str(), guid.as_str(), "rita", upn.as_str()] {
        let (code, unlocked) = json(&sb, &["submit", "--user", name, "--unlock"], "");
        assert_eq!(
            (code, unlocked["outcome"].as_str()),
            (0, Some("APPLIED")),
            "{unlocked}"
        );
    }
    let over = run(&sb, &["submit", "--user", &guid, "--unlock"], "");
    assert_eq!(over.status.code(), Some(4), "{over:?}");
    assert!(
        String::from_utf8_lossy(&over.stderr).contains("ResourceExhausted"),
        "{over:?}"
    );
    // An operation id already used for another user (olga's): ALREADY_EXISTS.
    let olga_id = out_of_scope["operation_id"].as_str().unwrap();
    let reused = run(
        &sb,
        &[
            "submit",
            "--user",
            "rita",
            "--reset",
            "--password-stdin",
            "--operation-id",
            olga_id,
        ],
        "Reused#Id-Reset1\n",
    );
    assert_eq!(reused.status.code(), Some(1), "{reused:?}");
    assert!(
        String::from_utf8_lossy(&reused.stderr).contains("AlreadyExists"),
        "{reused:?}"
    );
    // Both refusals are found under every name, with their reasons.
    for name in names {
        let (_, ops) = json(&sb, &["ops", "--user", name, "--since", "1h"], "");
        let newest: Vec<(&str, &str)> = ops.as_array().unwrap()[..2]
            .iter()
            .map(|o| {
                (
                    o["outcome"].as_str().unwrap(),
                    o["message"].as_str().unwrap(),
                )
            })
            .collect();
        assert!(
            newest[0].0 == "REFUSED" && newest[0].1.contains("already used"),
            "by {name}: {ops}"
        );
        assert!(
            newest[1].0 == "REFUSED" && newest[1].1.contains("unlock requests"),
            "by {name}: {ops}"
        );
    }
    sb.shutdown().await;
}
