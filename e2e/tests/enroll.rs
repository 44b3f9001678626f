//! Enrollment end to end, against a real Samba AD DC: an agent enrolled with a one-time token
//! has no secret at all, authenticates by its client certificate, applies a reset AD accepts,
//! renews its certificate over the stream at half its lifetime (rotating its sealing key with
//! it: the new certificate is bound to the new key), refuses a rotation by hand, and after a
//! restart past the first certificate's expiry works on the renewed one.

use std::time::{Duration, Instant};

use e2e::{forest_id, request, reset, tenant_id, Sandbox};
use relay::proto::Outcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_resets_renews_and_restarts_on_its_renewed_certificate() {
    let mut sb = Sandbox::start(0).await.unwrap();
    let (ca_cert, ca_key) = cloud_gateway::enroll::AgentCa::generate().unwrap();
    // Short-lived, so the renewal happens within the test.
    let ttl = Duration::from_secs(10);
    sb.agent_ca = Some(std::sync::Arc::new(
        cloud_gateway::enroll::AgentCa::from_pem(&ca_cert, &ca_key, ttl).unwrap(),
    ));
    sb.start_gateway("gateway-a").await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let token = sb
        .tenants
        .create_enrollment(
            &tenant_id(&t),
            &forest_id(&f),
            "enrolled-1",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let mut config = sb.agent_config("enrolled-1", 0, &t, &f).await.unwrap();
    config.agent_secret = None;
    let state = config.state_dir.clone().unwrap();
    let enrolled_at = Instant::now();
    let r = onprem_agent::identity::enroll(&config, &token)
        .await
        .unwrap();
    assert_eq!(
        (r.tenant_id.as_str(), r.agent_id.as_str()),
        ("acme", "enrolled-1")
    );
    let first_cert = std::fs::read_to_string(state.join("agent.crt")).unwrap();

    sb.spawn_agent(config.clone());
    sb.wait_agents(&t, &f, 1).await.unwrap();
    sb.dc.create_user("enid", "Initial#Pass1").unwrap();
    let client = sb.client(0).await.unwrap();
    let reset_to = |n: u32| format!("Enrolled#Pass{n}");
    let tenant_token = sb.token.expose().to_owned();
    let applied = |n: u32| {
        let (mut client, token) = (client.clone(), tenant_token.clone());
        let req = request(&t, &f, "enid", reset(&reset_to(n)));
        async move {
            let answer = client
                .submit(e2e::authorized(req, &token))
                .await
                .unwrap()
                .into_inner();
            Outcome::try_from(answer.outcome).unwrap()
        }
    };
    assert_eq!(applied(1).await, Outcome::Applied);
    assert!(sb.dc.can_bind(&format!("enid@{f}"), &reset_to(1)));

    // Renewed at half its lifetime: a new certificate on disk, a second sealing key.
    let mut renewed = None;
    for _ in 0..100 {
        let now = std::fs::read_to_string(state.join("agent.crt")).unwrap();
        if now != first_cert {
            renewed = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(renewed.is_some(), "no renewal within 10 s");
    let keys = onprem_agent::keys::load_or_create(Some(&state)).unwrap();
    assert_eq!(
        keys.keys().len(),
        2,
        "the sealing key rotated with the certificate"
    );
    // The renewed certificate is bound to the new key, not the one the stream announced.
    let der = x509_parser::pem::parse_x509_pem(renewed.as_ref().unwrap().as_bytes())
        .unwrap()
        .1
        .contents;
    let name = cloud_gateway::enroll::EnrolledName::from_certificate(&der).unwrap();
    assert_eq!(
        name.sealing_key_id.as_deref(),
        Some(keys.current().public().id())
    );
    assert_ne!(keys.keys()[0].public().id(), keys.keys()[1].public().id());
    // Rotating by hand would unbind it: refused, saying how to rotate.
    let refused = onprem_agent::keys::rotate_by_hand(&state).unwrap_err();
    assert!(refused.to_string().contains("enroll it again"), "{refused}");
    assert_eq!(
        onprem_agent::keys::load_or_create(Some(&state))
            .unwrap()
            .current()
            .public()
            .id(),
        keys.current().public().id(),
        "a refused rotation changed the key"
    );

    // Restart after the first certificate expired: the renewed one works.
    let agent = sb.agents.pop().unwrap();
    agent.stop(sb.stop_within).await.unwrap();
    let expired = ttl + Duration::from_millis(500);
    if let Some(wait) = expired.checked_sub(enrolled_at.elapsed()) {
        tokio::time::sleep(wait).await;
    }
    sb.spawn_agent(config);
    sb.wait_agents(&t, &f, 1).await.unwrap();
    assert_eq!(applied(2).await, Outcome::Applied);
    assert!(sb.dc.can_bind(&format!("enid@{f}"), &reset_to(2)));
    sb.shutdown().await;
}
