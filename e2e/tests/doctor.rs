//! `onprem-agent doctor` end to end: the gateway probe (reachability, agent credential, clock)
//! and the binary's exit code.

use std::process::Command;

use e2e::{binary, directory_config, forest_id, tenant_id, Sandbox};
use onprem_agent::doctor::{self, DoctorOptions, Status};
use onprem_agent::AgentConfig;
use relay::secret::Secret;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_gateway_and_exits_non_zero_on_failure() {
    let sb = Sandbox::start(1).await.unwrap();
    let secret = sb
        .tenants
        .register_agent(&tenant_id(&sb.tenant), &forest_id(&sb.forest), "doc-agent")
        .await
        .unwrap();
    let mut config = AgentConfig {
        gateway_url: format!("https://{}", sb.gateways[0].addr),
        gateway_ca: sb.ca.ca_file(),
        gateway_tls_name: None,
        agent_id: "doc-agent".into(),
        agent_secret: Some(secret.clone()),
        forest: sb.forest.clone(),
        extra_domains: vec![],
        metrics_listen: None,
        state_dir: None,
        max_in_flight: 1,
        directory: directory_config(&sb.dc),
    };
    // Scopes: the gateway's (OU=Staff) and the local one (members of a group, nested): the
    // doctor prints both and counts the users in both.
    let base = sb.dc.base_dn();
    sb.dc
        .samba_tool(&["ou", "create", &format!("OU=Staff,{base}")])
        .unwrap();
    for (sam, ou) in [("ann", "OU=Staff"), ("bob", "OU=Staff")] {
        sb.dc.create_user_in(sam, "Initial#Pass1", ou).unwrap();
    }
    sb.dc.create_user("cid", "Initial#Pass1").unwrap();
    for g in ["Writeback Users", "Helpdesk"] {
        sb.dc.samba_tool(&["group", "add", g]).unwrap();
    }
    sb.dc
        .samba_tool(&["group", "addmembers", "Writeback Users", "Helpdesk"])
        .unwrap();
    sb.dc
        .samba_tool(&["group", "addmembers", "Helpdesk", "ann,cid"])
        .unwrap();
    let staff = format!("OU=Staff,{base}");
    sb.tenants
        .set_forest(
            &tenant_id(&sb.tenant),
            &forest_id(&sb.forest),
            &cloud_gateway::tenants::ForestSettingsChange {
                scope: Some(
                    relay::scope::Scope::parse(std::slice::from_ref(&staff), &[], "ou", "group")
                        .unwrap(),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    config.directory.scope = relay::scope::Scope::parse(
        &[],
        &[format!("CN=Writeback Users,CN=Users,{base}")],
        "ou",
        "group",
    )
    .unwrap();
    let report = doctor::run(&config, &DoctorOptions::default()).await;
    println!("{}", report.render());
    assert!(!report.failed(), "{}", report.render());
    assert_eq!(report.get("gateway").unwrap().status, Status::Ok);
    assert_eq!(report.get("clock").unwrap().status, Status::Ok);
    let scope = report.get("scope").unwrap();
    assert_eq!(scope.status, Status::Ok, "{scope:?}");
    assert!(
        scope
            .message
            .contains(&format!("gateway: users under {staff}"))
            && scope
                .message
                .contains("local: members (nested) of CN=Writeback Users")
            && scope.message.contains(" 1 of "),
        "only ann is in both: {scope:?}"
    );
    // A local scope naming nothing that exists covers nobody: said, with the fix.
    config.directory.scope =
        relay::scope::Scope::parse(&[format!("OU=Gone,{base}")], &[], "ou", "group").unwrap();
    let report = doctor::run(&config, &DoctorOptions::default()).await;
    assert_eq!(report.get("scope local").unwrap().status, Status::Warn);
    let scope = report.get("scope").unwrap();
    assert_eq!(scope.status, Status::Warn, "{scope:?}");
    assert!(
        scope.fix.as_deref().unwrap().contains("OUT_OF_SCOPE"),
        "{scope:?}"
    );
    config.directory.scope = relay::scope::Scope::default();
    // A probe takes no work and leaves no presence behind.
    assert_eq!(
        sb.store
            .live_agents(
                &tenant_id(&sb.tenant),
                &forest_id(&sb.forest),
                std::time::Duration::from_secs(60)
            )
            .await
            .unwrap(),
        0
    );

    config.agent_secret = Some(Secret::new("wba_wrong"));
    let report = doctor::run(&config, &DoctorOptions::default()).await;
    let gw = report.get("gateway").unwrap();
    assert_eq!(gw.status, Status::Fail);
    assert!(
        gw.fix.as_deref().unwrap().contains("register-agent"),
        "{gw:?}"
    );

    // The binary: exit 0 when ready, 1 when writeback would fail (a wrong bind password).
    let dir = sb.dir();
    let write = |name: &str, v: &str| e2e::write_secret(&dir, name, v);
    let agent_secret = write("agent.secret", secret.expose());
    let good = write("good.password", &sb.dc.svc_password());
    let bad = write("bad.password", "not-the-password");
    let run = |password: &std::path::Path| {
        Command::new(binary("onprem-agent").unwrap())
            .arg("doctor")
            .env(
                "AGENT_GATEWAY_URL",
                format!("https://{}", sb.gateways[0].addr),
            )
            .env("AGENT_GATEWAY_CA", sb.ca.ca_file())
            .env("AGENT_ID", "doc-agent")
            .env("AGENT_SECRET_FILE", &agent_secret)
            .env("AGENT_FOREST", &sb.forest)
            .env("AGENT_LDAP_URLS", sb.dc.ldaps_url())
            .env("AGENT_LDAP_CA", sb.dc.ca_file())
            .env("AGENT_BIND_DN", sb.dc.svc_upn())
            .env("AGENT_BIND_PASSWORD_FILE", password)
            .env("AGENT_BASE_DN", sb.dc.base_dn())
            .output()
            .unwrap()
    };
    let ok = run(&good);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(text.contains("writeback is ready"), "{text}");
    let failed = run(&bad);
    let text = String::from_utf8_lossy(&failed.stdout);
    assert_eq!(failed.status.code(), Some(1), "{text}");
    assert!(text.contains("[FAIL] bind"), "{text}");
    assert!(!text.contains("not-the-password"));
    sb.shutdown().await;
}
