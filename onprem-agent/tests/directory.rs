//! The agent's AD client against a real Samba AD DC over verified LDAPS, bound as the
//! delegated service account (never an admin).

use std::time::{Duration, Instant};

use onprem_agent::directory::{ApplyResult, Directory, DirectoryConfig};
use relay::proto::{
    sealed_operation::Action, user_ref, Initiator, Outcome, PolicyViolation, ResetPassword,
    SealedOperation, UnlockAccount, UserRef,
};
use relay::secret::Secret;
use testkit::SambaDc;

mod common;
use common::{change, reset};

fn config(dc: &SambaDc, urls: Vec<String>, bind_dn: String, password: &str) -> DirectoryConfig {
    DirectoryConfig {
        urls,
        ca_file: dc.ca_file(),
        bind_dn,
        bind_password: Secret::new(password),
        base_dn: dc.base_dn(),
        pool_size: 2,
        connect_timeout: Duration::from_secs(2),
        use_dc_reason_text: true,
    }
}

fn directory(dc: &SambaDc) -> Directory {
    Directory::new(config(
        dc,
        vec![dc.ldaps_url()],
        dc.svc_upn(),
        &dc.svc_password(),
    ))
    .unwrap()
}

fn op(id: user_ref::Id, action: Action) -> SealedOperation {
    SealedOperation {
        user: Some(UserRef {
            forest: "f".into(),
            id: Some(id),
        }),
        initiator: Initiator::EndUser as i32,
        action: Some(action),
    }
}

fn sam(s: &str) -> user_ref::Id {
    user_ref::Id::SamAccountName(s.into())
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(15)
}

async fn apply(d: &Directory, id: user_ref::Id, action: Action) -> ApplyResult {
    d.apply(&op(id, action), soon(), false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_changes_and_policy_answers() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let d = directory(&dc);
    let upn = |s: &str| format!("{s}@{}", dc.dns_domain());
    dc.create_user("frank", "Initial#Pass1").unwrap();

    // reset: new works, old does not; the DC is named; timings reported
    let t = Instant::now();
    let r = apply(&d, sam("frank"), reset("Fresh#Reset-1")).await;
    let first = t.elapsed();
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(r.directory, dc.ldaps_url());
    assert!(dc.can_bind(&upn("frank"), "Fresh#Reset-1"));
    assert!(!dc.can_bind(&upn("frank"), "Initial#Pass1"));
    let t = Instant::now();
    let again = apply(&d, sam("frank"), reset("Pooled#Reset-1")).await;
    assert_eq!(again.outcome, Outcome::Applied, "{again:?}");
    println!(
        "reset on a new connection: {first:?} (lookup {} ms, write {} ms); on a pooled one: {:?} (lookup {} ms, write {} ms)",
        r.lookup_ms,
        r.write_ms,
        t.elapsed(),
        again.lookup_ms,
        again.write_ms
    );

    // must change at next logon + unlock in the same modify
    let r = d
        .apply(
            &op(
                sam("frank"),
                Action::Reset(ResetPassword {
                    new_password: "Must#Change-2".into(),
                    must_change_at_next_logon: true,
                    unlock: true,
                }),
            ),
            soon(),
            false,
        )
        .await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    let dn = format!("CN=frank,CN=Users,{}", dc.base_dn());
    assert_eq!(
        dc.attribute(&dn, "pwdLastSet").unwrap().as_deref(),
        Some("0")
    );

    // a user who must change can still change with the old password
    let r = apply(
        &d,
        user_ref::Id::UserPrincipalName(upn("frank")),
        change("Must#Change-2", "Changed#By-User3"),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert!(dc.can_bind(&upn("frank"), "Changed#By-User3"));

    // wrong old password
    let r = apply(&d, sam("frank"), change("Wrong#Old-999", "Whatever#New-4")).await;
    assert_eq!(r.outcome, Outcome::WrongOldPassword, "{r:?}");
    assert!(r.detail.contains("00000056"), "{}", r.detail);

    // policy: too short, complexity, history (the same password again)
    let r = apply(&d, sam("frank"), reset("Ab1!")).await;
    assert_eq!(
        (r.outcome, r.policy_violation),
        (Outcome::RejectedByPolicy, PolicyViolation::TooShort),
        "{r:?}"
    );
    assert!(r.message.contains("7 characters"), "{}", r.message);
    let r = apply(&d, sam("frank"), reset("onlylowercaseletters")).await;
    assert_eq!(
        (r.outcome, r.policy_violation),
        (Outcome::RejectedByPolicy, PolicyViolation::Complexity),
        "{r:?}"
    );
    let r = apply(
        &d,
        sam("frank"),
        change("Changed#By-User3", "Changed#By-User3"),
    )
    .await;
    assert_eq!(
        (r.outcome, r.policy_violation),
        (Outcome::RejectedByPolicy, PolicyViolation::History),
        "{r:?}"
    );
    assert!(
        !r.detail.contains("Changed#By-User3"),
        "detail must not carry the password"
    );

    // unknown users, by every kind of id
    for id in [
        sam("ghost"),
        user_ref::Id::UserPrincipalName(upn("ghost")),
        user_ref::Id::ObjectGuid("00000000-1111-2222-3333-444444444444".into()),
    ] {
        let r = apply(&d, id, reset("Whatever#123x")).await;
        assert_eq!(r.outcome, Outcome::UserNotFound, "{r:?}");
    }

    // a computer account is an objectClass=user too, but not a person's account
    dc.samba_tool(&["computer", "create", "ws01"]).unwrap();
    let r = apply(&d, sam("WS01$"), reset("Machine#Reset-1")).await;
    assert_eq!(r.outcome, Outcome::UserNotFound, "{r:?}");

    // found by objectGUID
    let guid = dc.user_guid("frank").unwrap();
    let r = apply(&d, user_ref::Id::ObjectGuid(guid), reset("By-Guid#Reset5")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert!(dc.can_bind(&upn("frank"), "By-Guid#Reset5"));

    // non-ASCII and astral-plane characters: encoded right, then usable for bind and kinit
    let unicode = "Pässwörd-😀-密码1";
    let r = apply(&d, sam("frank"), reset(unicode)).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert!(dc.can_bind(&upn("frank"), unicode));
    assert!(dc.kinit(&format!("frank@{}", dc.realm()), unicode));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_accounts_unlock_rights_and_deadlines() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let d = directory(&dc);
    let upn = |s: &str| format!("{s}@{}", dc.dns_domain());

    // Administrator has adminCount=1: refused unless allowed, password unchanged
    let r = apply(&d, sam("Administrator"), reset("Takeover#Admin1")).await;
    assert_eq!(r.outcome, Outcome::ProtectedAccount, "{r:?}");
    assert!(dc.can_bind(&upn("Administrator"), &dc.admin_password()));
    // allowed by the operator, the DC still refuses: protected accounts do not inherit the
    // delegation (AdminSDHolder, emulated on Samba by scripts/ad-dc.sh)
    let r = d
        .apply(
            &op(sam("Administrator"), reset("Takeover#Admin1")),
            soon(),
            true,
        )
        .await;
    assert_eq!(r.outcome, Outcome::AccessDenied, "{r:?}");
    assert!(r.detail.contains("Reset Password"), "{}", r.detail);
    assert!(dc.can_bind(&upn("Administrator"), &dc.admin_password()));

    // unlock of a locked-out account
    dc.create_user("gina", "Initial#Pass1").unwrap();
    dc.lock_out(&upn("gina")).unwrap();
    assert!(
        !dc.can_bind(&upn("gina"), "Initial#Pass1"),
        "gina should be locked out"
    );
    let r = apply(&d, sam("gina"), Action::Unlock(UnlockAccount {})).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert!(dc.can_bind(&upn("gina"), "Initial#Pass1"), "unlocked");

    // a deadline already past: nothing written
    let r = d
        .apply(
            &op(sam("gina"), reset("Too-Late#Reset1")),
            Instant::now(),
            false,
        )
        .await;
    assert_eq!(r.outcome, Outcome::Expired, "{r:?}");
    assert!(dc.can_bind(&upn("gina"), "Initial#Pass1"));
    // too little time left to write safely: not even looked up
    let r = d
        .apply(
            &op(sam("gina"), reset("Too-Late#Reset2")),
            Instant::now() + Duration::from_millis(50),
            false,
        )
        .await;
    assert_eq!(r.outcome, Outcome::Expired, "{r:?}");
    assert!(dc.can_bind(&upn("gina"), "Initial#Pass1"));

    // bound as an ordinary user (no delegated rights): ACCESS_DENIED, naming the right
    let plain = Directory::new(config(
        &dc,
        vec![dc.ldaps_url()],
        upn("gina"),
        "Initial#Pass1",
    ))
    .unwrap();
    dc.create_user("hank", "Initial#Pass1").unwrap();
    let r = apply(&plain, sam("hank"), reset("Not-Allowed#1x")).await;
    assert_eq!(r.outcome, Outcome::AccessDenied, "{r:?}");
    assert!(r.detail.contains("Reset Password"), "{}", r.detail);

    // a wrong service-account password: ACCESS_DENIED, explained
    let bad = Directory::new(config(&dc, vec![dc.ldaps_url()], dc.svc_upn(), "wrong")).unwrap();
    let r = apply(&bad, sam("hank"), reset("Not-Allowed#1x")).await;
    assert_eq!(r.outcome, Outcome::AccessDenied, "{r:?}");
    assert!(r.detail.contains("cannot bind"), "{}", r.detail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_between_dcs_and_reports_unavailable() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    dc.create_user("ivan", "Initial#Pass1").unwrap();
    // 127.0.0.1:1 refuses at once: a dead DC listed first
    let d = Directory::new(config(
        &dc,
        vec!["ldaps://127.0.0.1:1".into(), dc.ldaps_url()],
        dc.svc_upn(),
        &dc.svc_password(),
    ))
    .unwrap();
    let r = apply(&d, sam("ivan"), reset("Fail-Over#Ok1")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(r.directory, dc.ldaps_url());
    assert_eq!(d.check().await.unwrap(), dc.ldaps_url());

    // a DC that accepts TCP but never answers TLS, listed first: given up after the connect
    // timeout, then skipped for a while
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("ldaps://{}", hung.local_addr().unwrap());
    let mut cfg = config(
        &dc,
        vec![hung_url, dc.ldaps_url()],
        dc.svc_upn(),
        &dc.svc_password(),
    );
    cfg.connect_timeout = Duration::from_millis(500);
    let slow = Directory::new(cfg).unwrap();
    let t = Instant::now();
    let r = apply(&slow, sam("ivan"), reset("Hung#First-1")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(r.directory, dc.ldaps_url());
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    // pool_size 2: two operations at once need a second connection, which skips the hung DC
    let t = Instant::now();
    let (r1, r2) = tokio::join!(
        apply(&slow, sam("ivan"), reset("Hung#Second-2")),
        apply(&slow, sam("frank2"), reset("Hung#Second-2")),
    );
    assert_eq!(r1.outcome, Outcome::Applied, "{r1:?}");
    assert_eq!(r2.outcome, Outcome::UserNotFound, "{r2:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    drop(hung);

    // every DC down
    dc.stop();
    let started = Instant::now();
    let r = apply(&d, sam("ivan"), reset("Nobody#Home-2")).await;
    assert_eq!(r.outcome, Outcome::DirectoryUnavailable, "{r:?}");
    println!(
        "DIRECTORY_UNAVAILABLE after {} ms",
        started.elapsed().as_millis()
    );

    // the pool recovers once the DC is back
    dc.start_again().unwrap();
    let r = apply(&d, sam("ivan"), reset("Back#Again-3")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_a_bounded_pool() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let d = directory(&dc); // pool_size 2
    let users: Vec<String> = (0..6).map(|i| format!("pool{i}")).collect();
    for u in &users {
        dc.create_user(u, "Initial#Pass1").unwrap();
    }
    let t = Instant::now();
    let results = futures::future::join_all(users.iter().enumerate().map(|(i, u)| {
        let d = d.clone();
        async move { apply(&d, sam(u), reset(&format!("Pool#Reset-{i}"))).await }
    }))
    .await;
    println!("6 resets through a pool of 2 in {:?}", t.elapsed());
    for (i, (u, r)) in users.iter().zip(&results).enumerate() {
        assert_eq!(r.outcome, Outcome::Applied, "{u}: {r:?}");
        assert!(dc.can_bind(
            &format!("{u}@{}", dc.dns_domain()),
            &format!("Pool#Reset-{i}")
        ));
    }
}
