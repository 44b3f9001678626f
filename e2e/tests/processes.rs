//! The shipped binaries, run as production runs them: `cloud-gateway serve` and
//! `onprem-agent run` as separate processes configured by flags and environment, `relayctl`
//! as the client. Checks that the agent listens on no port (SPEC invariant 5), that SIGTERM
//! shuts both down cleanly, that no password reaches their logs, and that only the gateway
//! links a Redis client.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::otlp::OtlpReceiver;
use e2e::{binary, forest_id, listening_sockets, tenant_id, write_secret, Process, Sandbox};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_relay_a_reset_listen_only_where_expected_and_stop_on_sigterm() {
    let sb = Sandbox::start(0).await.unwrap();
    let dir = sb.dir();
    let master = sb.write_master_key().unwrap();
    let port = testkit::free_port().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let gateway_metrics = format!("127.0.0.1:{}", testkit::free_port().unwrap());
    let agent_metrics = format!("127.0.0.1:{}", testkit::free_port().unwrap());

    // Exact counts below: no canary traffic (the sandbox's canary interval is zero).
    let mut gateway = Process::spawn(
        Command::new(binary("cloud-gateway").unwrap())
            .arg("serve")
            .envs(sb.gateway_env("gateway-proc", addr, &master))
            .env("WRITEBACK_METRICS_LISTEN", &gateway_metrics)
            .env("WRITEBACK_LOG_FORMAT", "json"),
        dir.join("gateway.log"),
    );
    let secret = sb
        .tenants
        .register_agent(&tenant_id(&sb.tenant), &forest_id(&sb.forest), "agent-proc")
        .await
        .unwrap();
    let agent_secret = write_secret(&dir, "agent.secret", secret.expose());
    let bind_password = write_secret(&dir, "svc.password", &sb.dc.svc_password());
    let mut agent = Process::spawn(
        Command::new(binary("onprem-agent").unwrap())
            .arg("run")
            .args(["--gateway-url", &format!("https://{addr}")])
            .arg("--gateway-ca")
            .arg(sb.ca.ca_file())
            .args(["--agent-id", "agent-proc", "--forest", &sb.forest])
            .arg("--agent-secret-file")
            .arg(&agent_secret)
            .env("AGENT_LDAP_URLS", sb.dc.ldaps_url())
            .env("AGENT_LDAP_CA", sb.dc.ca_file())
            .env("AGENT_BIND_DN", sb.dc.svc_upn())
            .env("AGENT_BIND_PASSWORD_FILE", &bind_password)
            .env("AGENT_BASE_DN", sb.dc.base_dn())
            .env("AGENT_METRICS_LISTEN", &agent_metrics)
            .env("AGENT_STATE_DIR", dir.join("agent-state"))
            .env("WRITEBACK_LOG_FORMAT", "json"),
        dir.join("agent.log"),
    );
    sb.wait_agents(&sb.tenant, &sb.forest, 1)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\ngateway log:\n{}\nagent log:\n{}",
                gateway.log(),
                agent.log()
            )
        });

    // A reset through relayctl, the password on stdin.
    sb.dc.create_user("judy", "Initial#Pass1").unwrap();
    let new_password = "Process#Reset-42";
    let token = write_secret(&dir, "tenant.token", sb.token.expose());
    let mut relayctl = Command::new(binary("relayctl").unwrap())
        .args(["--addr", &addr.to_string(), "--tenant", &sb.tenant])
        .arg("--ca")
        .arg(sb.ca.ca_file())
        .arg("--token-file")
        .arg(&token)
        .args([
            "submit",
            "--forest",
            &sb.forest,
            "--user",
            "judy",
            "--reset",
            "--password-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(relayctl.stdin.take().unwrap(), "{new_password}").unwrap();
    let out = relayctl.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "relayctl failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("outcome:      APPLIED"), "{stdout}");
    assert!(
        stdout.contains("delivered") && stdout.contains("agent-proc"),
        "timeline printed: {stdout}"
    );
    assert!(sb.dc.can_bind(&format!("judy@{}", sb.forest), new_password));

    // Invariant 5: the agent listens only on its loopback metrics port (no other TCP, UDP,
    // raw or unix socket that others can reach); the gateway on its gRPC port and its
    // metrics port.
    let agent_port = agent_metrics
        .rsplit_once(':')
        .unwrap()
        .1
        .parse::<u16>()
        .unwrap();
    let agent_listens = listening_sockets(agent.child.id()).unwrap();
    assert_eq!(
        agent_listens,
        [format!("/proc/net/tcp 0100007F:{agent_port:04X}")],
        "the agent listens beyond its loopback metrics port"
    );
    let gateway_listens = listening_sockets(gateway.child.id()).unwrap();
    assert_eq!(gateway_listens.len(), 2, "{gateway_listens:?}");
    assert!(
        gateway_listens
            .iter()
            .all(|l| l.starts_with("/proc/net/tcp ")),
        "{gateway_listens:?}"
    );

    // Metrics after traffic.
    let gw = scrape(&gateway_metrics);
    for needle in [
        "writeback_submits_total{kind=\"reset\",outcome=\"APPLIED\",tenant=\"acme\"} 1",
        "writeback_acknowledgments_total{forest=",
        "writeback_stage_seconds_count{stage=\"agent\"} 1",
        "writeback_stage_seconds_count{stage=\"queue_wait\"} 1",
        "writeback_stage_seconds_count{stage=\"submit\"} 1",
        "writeback_connected_agents{",
        "writeback_agent_sessions_total{",
        "writeback_redis_errors_total 0",
    ] {
        assert!(gw.contains(needle), "gateway metrics lack {needle}:\n{gw}");
    }
    // the queue gauges appear within one measurement period
    let mut gw = gw;
    for _ in 0..60 {
        if gw.contains("writeback_queue_depth{") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        gw = scrape(&gateway_metrics);
    }
    assert!(gw.contains("writeback_queue_oldest_age_seconds{"), "{gw}");
    assert!(gw.contains("writeback_live_agents{forest="), "{gw}");
    let ag = scrape(&agent_metrics);
    for needle in [
        "agent_operations_total{kind=\"reset\",outcome=\"APPLIED\"} 1",
        "agent_ldap_seconds_count{step=\"write\"} 1",
        "agent_connected 1",
        "agent_gateway_connects_total 1",
    ] {
        assert!(ag.contains(needle), "agent metrics lack {needle}:\n{ag}");
    }

    // SIGTERM: both exit 0, promptly.
    let status = agent
        .terminate(Duration::from_secs(10))
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit {status:?}: {}", agent.log());
    let status = gateway
        .terminate(Duration::from_secs(15))
        .expect("gateway exits on SIGTERM");
    assert!(
        status.success(),
        "gateway exit {status:?}: {}",
        gateway.log()
    );

    // JSON logs with stable event codes, each documented; no secret in either log.
    let documented =
        std::fs::read_to_string(testkit::workspace_root().join("docs/events.md")).unwrap();
    for (name, log, codes) in [
        (
            "gateway",
            gateway.log(),
            &["WB1001", "WB1004", "WB1010", "WB1022", "WB1030"][..],
        ),
        (
            "agent",
            agent.log(),
            &["WB2001", "WB2003", "WB2010", "WB2030"][..],
        ),
    ] {
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                line.starts_with('{') && line.ends_with('}'),
                "{name}: not a JSON line: {line}"
            );
        }
        for code in codes {
            assert!(
                log.contains(&format!("\"event\":\"{code}\"")),
                "{name} log lacks {code}:\n{log}"
            );
            assert!(
                documented.contains(&format!("| {code} |")),
                "{code} is not in docs/events.md"
            );
        }
    }
    let secrets = [
        ("new password", new_password),
        ("initial password", "Initial#Pass1"),
        ("agent secret", secret.expose()),
        ("tenant token", sb.token.expose()),
        ("service account password", &sb.dc.svc_password()),
        ("master key", &hex_encode(sb.master_key.expose())),
    ]
    .map(|(n, v)| (n.to_owned(), v.to_owned()));
    let sources = [
        ("gateway output".to_owned(), gateway.output()),
        ("agent output".to_owned(), agent.output()),
        ("relayctl output".to_owned(), out.stdout.clone()),
        ("relayctl errors".to_owned(), out.stderr.clone()),
    ];
    let leaks = e2e::leaks(&sources, &secrets);
    assert!(leaks.is_empty(), "secrets leaked: {leaks:?}");
    sb.shutdown().await;
}

/// SPEC invariant 1 for everything the processes write: gateway and agent run at trace level
/// (`RUST_LOG=trace`; the gateway logging JSON, the agent text) and export their spans over
/// OTLP to this test; a reset, a change, a change with a wrong old password, a reset AD
/// refuses, an unlock and policy queries go through `relayctl`. Then their stdout and stderr,
/// every exported byte (span names, attributes, span events), both metrics pages and every
/// relayctl output, and every key and value in Redis, are searched, as UTF-8 and UTF-16LE, for
/// every password used, the tenant token, the agent secret, the service account's password,
/// the master key and the agent's private sealing key (hex and as a byte list).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_output_at_trace_level() {
    let sb = Sandbox::start(0).await.unwrap();
    let otlp = OtlpReceiver::start().await.unwrap();
    let dir = sb.dir();
    let master = sb.write_master_key().unwrap();
    let port = testkit::free_port().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let gateway_metrics = format!("127.0.0.1:{}", testkit::free_port().unwrap());
    let agent_metrics = format!("127.0.0.1:{}", testkit::free_port().unwrap());
    let traced = |cmd: &mut Command| {
        cmd.env("RUST_LOG", "trace")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint())
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME");
    };
    let mut gw_cmd = Command::new(binary("cloud-gateway").unwrap());
    gw_cmd
        .arg("serve")
        .envs(sb.gateway_env("gateway-traced", addr, &master))
        .env("WRITEBACK_METRICS_LISTEN", &gateway_metrics)
        .env("WRITEBACK_LOG_FORMAT", "json");
    traced(&mut gw_cmd);
    let mut gateway = Process::spawn(&mut gw_cmd, dir.join("gateway.log"));
    let secret = sb
        .tenants
        .register_agent(
            &tenant_id(&sb.tenant),
            &forest_id(&sb.forest),
            "agent-traced",
        )
        .await
        .unwrap();
    let agent_secret = write_secret(&dir, "agent.secret", secret.expose());
    let bind_password = write_secret(&dir, "svc.password", &sb.dc.svc_password());
    let mut agent_cmd = Command::new(binary("onprem-agent").unwrap());
    agent_cmd
        .arg("run")
        .args(["--gateway-url", &format!("https://{addr}")])
        .arg("--gateway-ca")
        .arg(sb.ca.ca_file())
        .args(["--agent-id", "agent-traced", "--forest", &sb.forest])
        .arg("--agent-secret-file")
        .arg(&agent_secret)
        .env("AGENT_LDAP_URLS", sb.dc.ldaps_url())
        .env("AGENT_LDAP_CA", sb.dc.ca_file())
        .env("AGENT_BIND_DN", sb.dc.svc_upn())
        .env("AGENT_BIND_PASSWORD_FILE", &bind_password)
        .env("AGENT_BASE_DN", sb.dc.base_dn())
        .env("AGENT_METRICS_LISTEN", &agent_metrics)
        .env("AGENT_STATE_DIR", dir.join("agent-state"))
        .env_remove("WRITEBACK_LOG_FORMAT");
    traced(&mut agent_cmd);
    let mut agent = Process::spawn(&mut agent_cmd, dir.join("agent.log"));
    sb.wait_agents(&sb.tenant, &sb.forest, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\ngateway:\n{}\nagent:\n{}", gateway.log(), agent.log()));

    let initial = "Initial#Pass1";
    let dn = sb.dc.create_user("quinn", initial).unwrap();
    let token = write_secret(&dir, "tenant.token", sb.token.expose());
    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut relayctl = |label: &str, args: &[&str], stdin: &str| -> (Option<i32>, String) {
        let mut child = Command::new(binary("relayctl").unwrap())
            .args(["--addr", &addr.to_string(), "--tenant", &sb.tenant])
            .arg("--ca")
            .arg(sb.ca.ca_file())
            .arg("--token-file")
            .arg(&token)
            .args(args)
            .env("WRITEBACK_FOREST", &sb.forest)
            .env("RUST_LOG", "trace")
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
        let out = child.wait_with_output().unwrap();
        outputs.push((format!("relayctl {label} stdout"), out.stdout.clone()));
        outputs.push((format!("relayctl {label} stderr"), out.stderr.clone()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let submit = ["submit", "--user", "quinn", "--password-stdin"];
    let reset_to = "Trace#Reset-Pass1";
    let changed_to = "Trace#Change-Pass2";
    let wrong_old = "Trace#Wrong-Old3";
    let refused_new = "Trace#Refused-New4";
    let too_simple = "tracelowercaseonly";
    let (code, text) = relayctl(
        "reset",
        &[&submit[..], &["--reset"]].concat(),
        &format!("{reset_to}\n"),
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("outcome:      APPLIED"), "{text}");
    let op_id = text
        .lines()
        .find_map(|l| l.strip_prefix("operation_id: "))
        .unwrap()
        .trim()
        .to_owned();
    let (code, text) = relayctl(
        "change",
        &[&submit[..], &["--change"]].concat(),
        &format!("{reset_to}\n{changed_to}\n"),
    );
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = relayctl(
        "wrong change",
        &[&submit[..], &["--change"]].concat(),
        &format!("{wrong_old}\n{refused_new}\n"),
    );
    assert_eq!(code, Some(1), "a definite no: {text}");
    assert!(text.contains("WRONG_OLD_PASSWORD"), "{text}");
    let (code, text) = relayctl(
        "refused reset",
        &[&submit[..], &["--reset"]].concat(),
        &format!("{too_simple}\n"),
    );
    assert_eq!(code, Some(1), "a definite no: {text}");
    assert!(text.contains("REJECTED_BY_POLICY"), "{text}");
    let (code, text) = relayctl("unlock", &["submit", "--user", "quinn", "--unlock"], "");
    assert_eq!(code, Some(0), "{text}");
    for (label, args) in [
        ("policy", &["policy"][..]),
        ("user policy", &["policy", "--user", "quinn"][..]),
        ("op", &["op", &op_id][..]),
        ("ops", &["ops", "--user", "quinn"][..]),
        ("agents", &["agents"][..]),
    ] {
        let (code, text) = relayctl(label, args, "");
        assert_eq!(code, Some(0), "relayctl {label}: {text}");
    }
    // AD did what the outcomes say.
    assert!(sb.dc.can_bind(&dn, changed_to));
    assert!(!sb.dc.can_bind(&dn, refused_new));
    outputs.push((
        "gateway metrics".into(),
        scrape(&gateway_metrics).into_bytes(),
    ));
    outputs.push(("agent metrics".into(), scrape(&agent_metrics).into_bytes()));

    // SIGTERM flushes the span exporters.
    let status = agent.terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "agent: {status:?}");
    let status = gateway.terminate(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "gateway: {status:?}");
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = otlp.spans();
        let has = |n: &str| spans.iter().any(|(_, s)| s.name == n);
        if has("agent.apply") && has("writeback.submit") && has("writeback.acknowledge") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let services: std::collections::BTreeSet<&str> =
        spans.iter().map(|(svc, _)| svc.as_str()).collect();
    assert!(
        services.iter().any(|s| s.contains("cloud-gateway"))
            && services.iter().any(|s| s.contains("onprem-agent")),
        "spans from both processes: {services:?}"
    );
    let applies = spans
        .iter()
        .filter(|(_, s)| s.name == "agent.apply")
        .count();
    let events: usize = spans.iter().map(|(_, s)| s.events.len()).sum();
    assert!(applies >= 5, "{applies} agent.apply spans exported");
    assert!(events > 0, "no span event exported");

    // The scan must see trace-level output, or it proves nothing.
    let gateway_log = gateway.log();
    let agent_log = agent.log();
    assert!(
        gateway_log.contains("\"level\":\"TRACE\""),
        "the gateway did not log at trace level"
    );
    assert!(
        agent_log.contains("TRACE"),
        "the agent did not log at trace level"
    );
    assert_eq!(
        agent_log.matches("WB2010").count(),
        7,
        "the agent handled five operations and two policy queries"
    );
    outputs.push(("gateway stderr".into(), gateway_log.into_bytes()));
    outputs.push(("gateway stdout".into(), gateway.stdout().into_bytes()));
    outputs.push(("agent stderr".into(), agent_log.into_bytes()));
    outputs.push(("agent stdout".into(), agent.stdout().into_bytes()));
    outputs.push(("exported spans".into(), otlp.raw()));
    for (key, bytes) in e2e::dump_redis(&sb.redis.url()).await.unwrap() {
        outputs.push((format!("redis {key}"), bytes));
    }

    // The agent's private sealing key, as its state directory holds it.
    let sealing = onprem_agent::keys::load_or_create(Some(&dir.join("agent-state"))).unwrap();
    let sealing_key = sealing.current().secret_bytes();
    let mut secrets: Vec<(String, String)> = [
        ("initial password", initial),
        ("reset password", reset_to),
        ("changed password", changed_to),
        ("wrong old password", wrong_old),
        ("refused new password", refused_new),
        ("too simple password", too_simple),
        ("agent secret", secret.expose()),
        ("tenant token", sb.token.expose()),
        ("service account password", &sb.dc.svc_password()),
        ("administrator password", &sb.dc.admin_password()),
    ]
    .iter()
    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
    .collect();
    for (name, key) in [
        ("master key", sb.master_key.expose()),
        ("agent sealing key", sealing_key.expose()),
    ] {
        secrets.push((format!("{name} (hex)"), hex_encode(key)));
        secrets.push((format!("{name} (HEX)"), hex_encode(key).to_uppercase()));
        secrets.push((format!("{name} (bytes)"), format!("{key:?}")));
    }
    let scanned: usize = outputs.iter().map(|(_, b)| b.len()).sum();
    println!(
        "scanned {scanned} bytes from {} sources for {} secrets",
        outputs.len(),
        secrets.len()
    );
    let leaks = e2e::leaks(&outputs, &secrets);
    assert!(leaks.is_empty(), "secrets leaked: {leaks:#?}");
    sb.shutdown().await;
}

fn scrape(addr: &str) -> String {
    use std::io::{Read, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Every event code used in the sources is documented in docs/events.md.
#[test]
fn every_event_code_is_documented() {
    let root = testkit::workspace_root();
    let documented = std::fs::read_to_string(root.join("docs/events.md")).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for dir in ["cloud-gateway/src", "onprem-agent/src"] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for part in text.split("event = \"WB").skip(1) {
                        used.insert(format!("WB{}", &part[..4]));
                    }
                }
            }
        }
    }
    assert!(used.len() > 20, "{used:?}");
    for code in used {
        assert!(
            documented.contains(&format!("| {code} |")),
            "{code} is used but not documented in docs/events.md"
        );
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Only cloud-gateway links a Redis client (SPEC layout rule).
#[test]
fn the_agent_does_not_link_redis() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "onprem-agent",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(testkit::workspace_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("ldap3"), "unexpected tree: {tree}");
    assert!(
        !tree.lines().any(|l| l.starts_with("redis ")),
        "onprem-agent links redis"
    );
}
