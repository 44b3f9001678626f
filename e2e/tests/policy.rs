//! `Writeback.GetPasswordPolicy`: AD's real rules for a forest and for one user, read by the
//! forest's agent through the same queue as operations, cached briefly at the gateway.

use std::time::Instant;

use e2e::{authorized, Sandbox};
use relay::proto::{GetPasswordPolicyRequest, PasswordPolicy, UserRef};
use tonic::Code;

async fn policy(
    sb: &Sandbox,
    gateway: usize,
    user: Option<&str>,
) -> Result<PasswordPolicy, tonic::Status> {
    let mut client = sb.client(gateway).await.unwrap();
    let req = GetPasswordPolicyRequest {
        tenant_id: sb.tenant.clone(),
        forest: sb.forest.clone(),
        user: user.map(|u| UserRef::from_text(sb.forest.clone(), u)),
    };
    client
        .get_password_policy(authorized(req, sb.token.expose()))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_page_can_show_ads_real_rules() {
    let mut sb = Sandbox::start(2).await.unwrap();

    // No agent yet: a clear UNAVAILABLE.
    let err = policy(&sb, 0, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no live agent"), "{}", err.message());

    sb.start_agent("agent-b", 1).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    sb.wait_agents(&t, &f, 1).await.unwrap();

    // The domain policy (caller on replica A, agent on replica B).
    let p = policy(&sb, 0, None).await.unwrap();
    assert_eq!(
        (
            p.min_length,
            p.complexity,
            p.history_length,
            p.min_age_seconds
        ),
        (7, true, 24, 0),
        "{p:?}"
    );
    assert_eq!(p.max_age_seconds, 42 * 86_400);
    assert_eq!(p.source, "domain");

    // A user under a fine-grained policy (readable to the service account) gets its rules, and
    // with a minimum age, when they may change next.
    sb.dc.set_password_settings(&["--min-pwd-age=1"]).unwrap();
    sb.dc.create_user("pat", "Initial#Pass1").unwrap();
    let pso = ["domain", "passwordsettings", "pso"];
    sb.dc
        .samba_tool(
            &[
                &pso[..],
                &[
                    "create",
                    "long",
                    "1",
                    "--min-pwd-length=14",
                    "--min-pwd-age=2",
                ],
            ]
            .concat(),
        )
        .unwrap();
    sb.dc
        .samba_tool(&[&pso[..], &["apply", "long", "pat"]].concat())
        .unwrap();
    let container = format!(
        "CN=Password Settings Container,CN=System,{}",
        sb.dc.base_dn()
    );
    let sid = sb.dc.sid("svc-writeback").unwrap();
    sb.dc
        .samba_tool(&[
            "dsacl",
            "set",
            &format!("--objectdn={container}"),
            &format!("--sddl=(A;CI;RPLCLORC;;;{sid})"),
        ])
        .unwrap();
    let p = policy(&sb, 0, Some("pat")).await.unwrap();
    assert_eq!((p.min_length, p.min_age_seconds), (14, 2 * 86_400), "{p:?}");
    assert!(p.source.starts_with("CN=long,"), "{}", p.source);
    let next = p.next_change_allowed_unix_ms;
    let expected = relay::now_unix_ms() + 2 * 86_400_000;
    assert!(
        (next - expected).abs() < 120_000,
        "next change allowed at {next}, expected about {expected}"
    );

    // Cached: the second answer does not go to the agent.
    let ops_before = policy_ops(&sb).await;
    let started = Instant::now();
    let again = policy(&sb, 1, Some("pat")).await.unwrap();
    println!(
        "cached policy answer in {} us",
        started.elapsed().as_micros()
    );
    assert_eq!(again, p);
    assert_eq!(
        policy_ops(&sb).await,
        ops_before,
        "a cached policy went to the agent"
    );

    // Unknown user: the forest's policy, as for any user without a fine-grained one, so the
    // answer does not tell whether the user exists.
    let unknown = policy(&sb, 0, Some("nobody-at-all")).await.unwrap();
    assert_eq!(unknown, policy(&sb, 1, None).await.unwrap());
    assert_eq!(unknown.source, "domain");
    sb.shutdown().await;
}

async fn policy_ops(sb: &Sandbox) -> usize {
    e2e::dump_redis(&sb.redis.url())
        .await
        .unwrap()
        .iter()
        .filter(|(k, _)| k.contains(":op:policy-"))
        .count()
}
