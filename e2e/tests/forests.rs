//! Per-forest switches and several forests behind one tenant, each with its own agents and
//! its own Samba AD DC (two realms on two loopback addresses).

use std::time::{Duration, Instant};

use cloud_gateway::tenants::ForestSettingsChange;
use e2e::{
    directory_config, dump_redis, forest_id, operation_id, request, reset, tenant_id, unlock,
    Sandbox,
};
use onprem_agent::domains::DomainConfig;
use relay::proto::Outcome;
use testkit::SambaDc;

fn outcome(r: &relay::proto::SubmitResponse) -> Outcome {
    Outcome::try_from(r.outcome).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_refuse_at_once_and_queue_nothing() {
    let mut sb = Sandbox::start(1).await.unwrap();
    sb.start_agent("agent-1", 0).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    sb.wait_agents(&t, &f, 1).await.unwrap();
    sb.dc.create_user("kim", "Initial#Pass1").unwrap();

    // Writeback off: refused at once, nothing queued, nothing changed.
    let off = ForestSettingsChange {
        writeback_enabled: Some(false),
        ..Default::default()
    };
    sb.tenants
        .set_forest(&tenant_id(&t), &forest_id(&f), &off)
        .await
        .unwrap();
    let req = request(&t, &f, "kim", reset("Not-Enabled#1"));
    let deadline = Duration::from_millis(req.timeout_ms.into());
    let started = Instant::now();
    let r = sb.submit(0, req).await.unwrap();
    let took = started.elapsed();
    assert_eq!(outcome(&r), Outcome::NotEnabled, "{r:?}");
    assert!(r.message.contains("not enabled"), "{}", r.message);
    // At once: a refusal record operators see (accepted, refused: nothing waited for an agent
    // or a deadline), no queue entry, and the answer came before the request's deadline.
    let rec = sb
        .store
        .operation(&tenant_id(&t), &operation_id(&r.operation_id))
        .await
        .unwrap()
        .expect("a refusal record, for operators");
    assert!(
        rec.refused && rec.state == cloud_gateway::store::OpState::Done,
        "{rec:?}"
    );
    let stages: Vec<String> = sb
        .store
        .timeline(&tenant_id(&t), &operation_id(&r.operation_id))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.stage)
        .collect();
    assert_eq!(
        stages,
        ["accepted", "refused"],
        "nothing queued, delivered or waited for"
    );
    assert!(
        took < deadline,
        "NOT_ENABLED came after the request's {deadline:?} deadline ({took:?}): it waited"
    );
    println!("NOT_ENABLED answered in {} ms", took.as_millis());
    let dump = dump_redis(&sb.redis.url()).await.unwrap();
    let queued: Vec<&String> = dump
        .iter()
        .filter(|(k, entries)| k.contains(":q:") && !entries.is_empty())
        .map(|(k, _)| k)
        .collect();
    assert!(queued.is_empty(), "something was queued: {queued:?}");
    assert!(sb.dc.can_bind(&format!("kim@{f}"), "Initial#Pass1"));

    // Unlock without reset off: unlock refused, resets still go through.
    let change = ForestSettingsChange {
        writeback_enabled: Some(true),
        unlock_enabled: Some(false),
        ..Default::default()
    };
    let now = sb
        .tenants
        .set_forest(&tenant_id(&t), &forest_id(&f), &change)
        .await
        .unwrap();
    assert!(now.writeback_enabled && !now.unlock_enabled && !now.allow_protected_accounts);
    let r = sb
        .submit(0, request(&t, &f, "kim", unlock()))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::NotEnabled, "{r:?}");
    assert!(
        r.message.contains("reset your password instead"),
        "{}",
        r.message
    );
    let r = sb
        .submit(0, request(&t, &f, "kim", reset("Enabled-Again#2")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");

    // Protected accounts allowed for this forest: Administrator can be reset.
    let allow = ForestSettingsChange {
        allow_protected_accounts: Some(true),
        ..Default::default()
    };
    sb.tenants
        .set_forest(&tenant_id(&t), &forest_id(&f), &allow)
        .await
        .unwrap();
    // The switch reaches agents when they (re)connect: restart ours.
    let a = sb.agents.pop().unwrap();
    a.stop(e2e::STOP_WITHIN).await.unwrap();
    sb.start_agent("agent-2", 0).await.unwrap();
    sb.wait_agents(&t, &f, 1).await.unwrap();
    // The relay no longer refuses it; AD itself still does, as in a real forest, because
    // AdminSDHolder gives protected accounts a DACL without the inherited delegation.
    let admin_new = "Admin-Allowed#9x";
    let r = sb
        .submit(0, request(&t, &f, "Administrator", reset(admin_new)))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::AccessDenied, "{r:?}");
    assert!(!sb.dc.can_bind(&format!("Administrator@{f}"), admin_new));
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_route_only_to_their_forests_agents() {
    let mut sb = Sandbox::start(2).await.unwrap();
    let east = SambaDc::start("EAST.WRITEBACK.TEST").unwrap();
    let (t, corp) = (sb.tenant.clone(), sb.forest.clone());
    let east_forest = east.dns_domain();
    assert_ne!(east.ip(), sb.dc.ip());
    sb.start_agent("corp-1", 0).await.unwrap();
    sb.start_agent("corp-2", 1).await.unwrap();
    sb.start_agent_with(
        "east-1",
        1,
        &t,
        &east_forest,
        directory_config(&east),
        Vec::new(),
    )
    .await
    .unwrap();
    sb.wait_agents(&t, &corp, 2).await.unwrap();
    sb.wait_agents(&t, &east_forest, 1).await.unwrap();

    // The same account name exists in both forests; each reset reaches only its own.
    sb.dc.create_user("lee", "Initial#Pass1").unwrap();
    east.create_user("lee", "Initial#Pass1").unwrap();
    east.create_user("only-east", "Initial#Pass1").unwrap();

    let r = sb
        .submit(
            0,
            request(&t, &east_forest, "lee", reset("East-Only#Pass1")),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert!(east.can_bind(&format!("lee@{east_forest}"), "East-Only#Pass1"));
    assert!(
        sb.dc.can_bind(&format!("lee@{corp}"), "Initial#Pass1"),
        "corp's lee untouched"
    );
    let tl = sb
        .store
        .timeline(&tenant_id(&t), &operation_id(&r.operation_id))
        .await
        .unwrap();
    let agent = tl
        .iter()
        .find(|e| e.stage == "delivered")
        .unwrap()
        .agent
        .clone();
    assert_eq!(agent, "east-1");

    for i in 0..4 {
        let r = sb
            .submit(
                i % 2,
                request(&t, &corp, "lee", reset(&format!("Corp-Only#Pass{i}"))),
            )
            .await
            .unwrap();
        assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
        let tl = sb
            .store
            .timeline(&tenant_id(&t), &operation_id(&r.operation_id))
            .await
            .unwrap();
        let agent = tl
            .iter()
            .find(|e| e.stage == "delivered")
            .unwrap()
            .agent
            .clone();
        assert!(agent.starts_with("corp-"), "corp work went to {agent}");
    }
    assert!(
        east.can_bind(&format!("lee@{east_forest}"), "East-Only#Pass1"),
        "east's lee untouched"
    );

    let r = sb
        .submit(0, request(&t, &corp, "only-east", reset("Wrong-Forest#1")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::UserNotFound, "{r:?}");
    let r = sb
        .submit(
            1,
            request(&t, &east_forest, "only-east", reset("Right-Forest#1")),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    sb.shutdown().await;
}

/// A forest with two domains behind one agent: each operation is written to a DC of the
/// domain that holds the user. (Samba cannot host a child domain, so a second Samba domain
/// stands in for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_finds_the_users_domain() {
    let mut sb = Sandbox::start(1).await.unwrap();
    let child = SambaDc::start("EAST.WRITEBACK.TEST").unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let extra = vec![DomainConfig {
        dns_name: child.dns_domain(),
        upn_suffixes: vec!["east.example.org".into()],
        directory: directory_config(&child),
    }];
    let primary = sb.directory_config();
    sb.start_agent_with("multi-1", 0, &t, &f, primary, extra)
        .await
        .unwrap();
    sb.wait_agents(&t, &f, 1).await.unwrap();
    child.create_user("eve", "Initial#Pass1").unwrap();
    sb.dc.create_user("sam-both", "Initial#Pass1").unwrap();
    child.create_user("sam-both", "Initial#Pass1").unwrap();
    let east_upn = |u: &str| format!("{u}@{}", child.dns_domain());

    // By UPN suffix of the child domain.
    let r = sb
        .submit(
            0,
            request(&t, &f, &east_upn("eve"), reset("Child-Upn#Pass1")),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert!(child.can_bind(&east_upn("eve"), "Child-Upn#Pass1"));
    // By sAMAccountName found only in the child domain.
    let r = sb
        .submit(0, request(&t, &f, "eve", reset("Child-Sam#Pass2")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert!(child.can_bind(&east_upn("eve"), "Child-Sam#Pass2"));
    // By objectGUID.
    let guid = child.user_guid("eve").unwrap();
    let r = sb
        .submit(0, request(&t, &f, &guid, reset("Child-Guid#Pass3")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert!(child.can_bind(&east_upn("eve"), "Child-Guid#Pass3"));
    let tl = sb
        .store
        .timeline(&tenant_id(&t), &operation_id(&r.operation_id))
        .await
        .unwrap();
    let ack = tl.iter().find(|e| e.stage == "acknowledged").unwrap();
    assert!(
        ack.detail.contains(&child.ldaps_url()),
        "written to the child's DC: {}",
        ack.detail
    );

    // By a UPN suffix that only `upn_suffixes` names (no domain has that DNS name). The same
    // UPN is given to an account in each stand-in domain (separate Samba domains allow it):
    // routed by its suffix, the reset reaches the child's account only; looked up in every
    // domain instead, it would match two accounts and be refused as ambiguous.
    let upn = "ann@east.example.org";
    let child_ann = child.create_user("ann", "Initial#Pass1").unwrap();
    let corp_ann = sb.dc.create_user("ann", "Initial#Pass1").unwrap();
    for (dc, dn) in [(&child, &child_ann), (&sb.dc, &corp_ann)] {
        set_upn(dc, dn, upn);
        assert_eq!(
            dc.attribute(dn, "userPrincipalName").unwrap().as_deref(),
            Some(upn)
        );
    }
    let child_writes = child.password_writes(&child_ann).unwrap();
    let corp_writes = sb.dc.password_writes(&corp_ann).unwrap();
    let r = sb
        .submit(0, request(&t, &f, upn, reset("Suffix-Routed#7")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert_eq!(
        child.password_writes(&child_ann).unwrap(),
        child_writes + 1,
        "written once in the child domain"
    );
    assert!(child.can_bind(&child_ann, "Suffix-Routed#7"));
    assert_eq!(
        sb.dc.password_writes(&corp_ann).unwrap(),
        corp_writes,
        "the primary domain's account was written"
    );
    assert!(sb.dc.can_bind(&corp_ann, "Initial#Pass1"));

    // The same sAMAccountName in both domains: refused as ambiguous, nothing changed.
    let r = sb
        .submit(0, request(&t, &f, "sam-both", reset("Ambiguous#Pass4")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Failed, "{r:?}");
    assert!(sb.dc.can_bind(&format!("sam-both@{f}"), "Initial#Pass1"));
    assert!(child.can_bind(&east_upn("sam-both"), "Initial#Pass1"));
    // Its UPN settles which one.
    let r = sb
        .submit(
            0,
            request(&t, &f, &east_upn("sam-both"), reset("Settled#Pass5")),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Applied, "{r:?}");
    assert!(child.can_bind(&east_upn("sam-both"), "Settled#Pass5"));
    assert!(sb.dc.can_bind(&format!("sam-both@{f}"), "Initial#Pass1"));

    // Nobody anywhere.
    let r = sb
        .submit(0, request(&t, &f, "nobody-in-any", reset("Nobody#Pass6")))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::UserNotFound, "{r:?}");
    sb.shutdown().await;
}

/// Sets the userPrincipalName of the account `dn` in `dc`'s domain, after adding its suffix
/// to the forest's UPN suffixes (`uPNSuffixes` of CN=Partitions), as an administrator does
/// for an alternative suffix; over LDAPS as Administrator, with `ldapmodify`.
fn set_upn(dc: &SambaDc, dn: &str, upn: &str) {
    let suffix = upn.rsplit_once('@').unwrap().1;
    let partitions = format!("CN=Partitions,CN=Configuration,{}", dc.base_dn());
    let ldif = format!(
        "dn: {partitions}\nchangetype: modify\nadd: uPNSuffixes\nuPNSuffixes: {suffix}\n-\n\n\
         dn: {dn}\nchangetype: modify\nreplace: userPrincipalName\nuserPrincipalName: {upn}\n-\n"
    );
    let mut child = std::process::Command::new("ldapmodify")
        .env("LDAPTLS_CACERT", dc.ca_file())
        .args(["-x", "-H", &dc.ldaps_url(), "-D", &dc.admin_dn(), "-w"])
        .arg(dc.admin_password())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ldapmodify (ldap-utils)");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ldif.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ldapmodify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
