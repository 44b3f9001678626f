//! One reset, one distributed trace: gateway and agent processes export OTLP/gRPC to a real
//! receiver (the `opentelemetry-proto` tonic server) running in this test. Checks one trace id
//! (the caller's), parent links across processes, span names, and no secret in any attribute.

use std::process::Command;
use std::time::Duration;

use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

use e2e::otlp::OtlpReceiver;
use e2e::{authorized, binary, forest_id, request, reset, tenant_id, Process, Sandbox};
use relay::proto::Outcome;

#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

impl Exported {
    fn from_span((service, s): (String, Span)) -> Self {
        Self {
            service,
            name: s.name,
            trace_id: hex::encode(s.trace_id),
            span_id: hex::encode(s.span_id),
            parent: hex::encode(s.parent_span_id),
            attributes: s
                .attributes
                .into_iter()
                .map(|kv| {
                    let v = match kv.value.and_then(|v| v.value) {
                        Some(Value::StringValue(s)) => s,
                        Some(other) => format!("{other:?}"),
                        None => String::new(),
                    };
                    (kv.key, v)
                })
                .collect(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reset_is_one_trace_across_gateway_and_agent() {
    let sb = Sandbox::start(0).await.unwrap();
    let receiver = OtlpReceiver::start().await.unwrap();
    let otlp = receiver.endpoint().to_owned();

    let dir = sb.dir();
    let write = |name: &str, v: &str| e2e::write_secret(&dir, name, v);
    let master = write("master.key", &hex::encode(sb.master_key.expose()));
    let port = testkit::free_port().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let otel = |cmd: &mut Command| {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env_remove("OTEL_SERVICE_NAME");
    };
    let mut gw_cmd = Command::new(binary("cloud-gateway").unwrap());
    gw_cmd
        .arg("serve")
        .args(["--listen", &addr.to_string(), "--replica-id", "gw-traced"])
        .arg("--tls-cert")
        .arg(sb.ca.cert_file())
        .arg("--tls-key")
        .arg(sb.ca.key_file())
        .args([
            "--redis-url",
            &sb.redis.url(),
            "--canary-interval-secs",
            "0",
        ])
        .arg("--master-key-file")
        .arg(&master);
    otel(&mut gw_cmd);
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
    let mut agent_cmd = Command::new(binary("onprem-agent").unwrap());
    agent_cmd
        .arg("run")
        .args([
            "--gateway-url",
            &format!("https://{addr}"),
            "--agent-id",
            "agent-traced",
            "--forest",
            &sb.forest,
        ])
        .arg("--gateway-ca")
        .arg(sb.ca.ca_file())
        .arg("--agent-secret-file")
        .arg(write("agent.secret", secret.expose()))
        .args([
            "--ldap-url",
            &sb.dc.ldaps_url(),
            "--bind-dn",
            &sb.dc.svc_upn(),
            "--base-dn",
            &sb.dc.base_dn(),
        ])
        .arg("--ldap-ca")
        .arg(sb.dc.ca_file())
        .arg("--bind-password-file")
        .arg(write("svc.password", &sb.dc.svc_password()));
    otel(&mut agent_cmd);
    let mut agent = Process::spawn(&mut agent_cmd, dir.join("agent.log"));
    sb.wait_agents(&sb.tenant, &sb.forest, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", gateway.log(), agent.log()));

    // The caller sends its own trace context.
    sb.dc.create_user("tracy", "Initial#Pass1").unwrap();
    let password = "Traced-Reset#77";
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = authorized(
        request(&sb.tenant, &sb.forest, "tracy", reset(password)),
        sb.token.expose(),
    );
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01")
            .parse()
            .unwrap(),
    );
    let mut client =
        relay::proto::writeback_client::WritebackClient::new(sb.channel_to(addr).await.unwrap());
    let r = client.submit(req).await.unwrap().into_inner();
    assert_eq!(
        Outcome::try_from(r.outcome).unwrap(),
        Outcome::Applied,
        "{r:?}"
    );
    assert_eq!(r.trace_id, caller_trace, "the caller's trace is continued");

    // Flush: SIGTERM makes both export what they hold.
    assert!(
        agent
            .terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        agent.log()
    );
    assert!(
        gateway
            .terminate(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "{}",
        gateway.log()
    );
    let wanted = [
        "writeback.submit",
        "writeback.enqueue",
        "writeback.seal",
        "writeback.dequeue",
        "agentlink.send",
        "agent.apply",
        "agent.open",
        "agent.lookup",
        "agent.ldap_write",
        "writeback.acknowledge",
        "writeback.answer",
    ];
    let mut spans = Vec::new();
    for _ in 0..50 {
        spans = receiver
            .spans()
            .into_iter()
            .map(Exported::from_span)
            .collect::<Vec<_>>();
        if wanted.iter().all(|w| spans.iter().any(|s| s.name == *w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_name = |n: &str| {
        spans
            .iter()
            .find(|s| s.name == n && s.trace_id == caller_trace)
            .unwrap_or_else(|| {
                panic!(
                    "no span {n} in trace {caller_trace}: {:?}",
                    spans
                        .iter()
                        .map(|s| (&s.name, &s.trace_id))
                        .collect::<Vec<_>>()
                )
            })
            .clone()
    };
    for w in wanted {
        by_name(w);
    }
    // Parent links, within and across processes.
    let link = |child: &str, parent: &str| {
        assert_eq!(
            by_name(child).parent,
            by_name(parent).span_id,
            "{child} should be a child of {parent}"
        )
    };
    assert_eq!(
        by_name("writeback.submit").parent,
        caller_span,
        "submit continues the caller's span"
    );
    link("writeback.enqueue", "writeback.submit");
    link("writeback.seal", "writeback.enqueue");
    link("writeback.dequeue", "writeback.enqueue");
    link("agentlink.send", "writeback.dequeue");
    link("agent.apply", "agentlink.send");
    link("agent.open", "agent.apply");
    link("agent.lookup", "agent.apply");
    link("agent.ldap_write", "agent.apply");
    link("writeback.acknowledge", "agent.apply");
    link("writeback.answer", "writeback.submit");
    assert!(by_name("agent.apply").service.contains("onprem-agent"));
    assert!(by_name("writeback.submit")
        .service
        .contains("cloud-gateway"));
    let attr = |span: &str, key: &str| {
        by_name(span)
            .attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        attr("agent.apply", "operation_id").as_deref(),
        Some(r.operation_id.as_str())
    );
    assert_eq!(
        attr("agent.apply", "agent_id").as_deref(),
        Some("agent-traced")
    );
    assert_eq!(
        attr("writeback.acknowledge", "outcome").as_deref(),
        Some("APPLIED")
    );
    assert_eq!(
        attr("writeback.submit", "tenant").as_deref(),
        Some(sb.tenant.as_str())
    );

    // No secret in any attribute of any span.
    for s in &spans {
        for (k, v) in &s.attributes {
            for secret in [
                password,
                "Initial#Pass1",
                secret.expose(),
                sb.token.expose(),
                &sb.dc.svc_password(),
            ] {
                assert!(
                    !v.contains(secret) && !k.contains(secret),
                    "secret in span {} attribute {k}",
                    s.name
                );
            }
        }
    }
    println!(
        "{} spans exported in trace {caller_trace}",
        spans.iter().filter(|s| s.trace_id == caller_trace).count()
    );
    sb.shutdown().await;
}
