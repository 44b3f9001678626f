//! The agent's AD client against a real Samba AD DC over verified LDAPS, bound as the
//! delegated service account (never an admin).

use std::time::{Duration, Instant};

use onprem_agent::directory::{ApplyResult, Directory, DirectoryConfig, Rules};
use relay::proto::{
    sealed_operation::Action, user_ref, Initiator, Outcome, PolicyViolation, ResetPassword,
    SealedOperation, UnlockAccount, UserRef,
};
use relay::secret::Secret;
use testkit::SambaDc;

mod common;
use common::{change, connections_to, reset, AdWrites, ConnectionSampler};

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
        scope: relay::scope::Scope::default(),
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
        switches: None,
    }
}

fn sam(s: &str) -> user_ref::Id {
    user_ref::Id::SamAccountName(s.into())
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(15)
}

async fn apply(d: &Directory, id: user_ref::Id, action: Action) -> ApplyResult {
    d.apply(&op(id, action), soon(), &Rules::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_changes_and_policy_answers() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let d = directory(&dc);
    let upn = |s: &str| format!("{s}@{}", dc.dns_domain());
    let dn = dc.create_user("frank", "Initial#Pass1").unwrap();
    let writes = || AdWrites::read(&dc, &dn);

    // reset: new works, old does not; written once; the DC is named; timings reported
    let before = writes();
    let t = Instant::now();
    let r = apply(&d, sam("frank"), reset("Fresh#Reset-1")).await;
    let first = t.elapsed();
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(r.directory, dc.ldaps_url());
    assert_eq!(writes(), before.plus_password(), "one reset, one write");
    assert!(dc.can_bind(&upn("frank"), "Fresh#Reset-1"));
    assert!(!dc.can_bind(&upn("frank"), "Initial#Pass1"));
    let before = writes();
    let t = Instant::now();
    let again = apply(&d, sam("frank"), reset("Pooled#Reset-1")).await;
    assert_eq!(again.outcome, Outcome::Applied, "{again:?}");
    assert_eq!(writes(), before.plus_password(), "one reset, one write");
    assert!(dc.can_bind(&upn("frank"), "Pooled#Reset-1"));
    assert!(!dc.can_bind(&upn("frank"), "Fresh#Reset-1"));
    println!(
        "reset on a new connection: {first:?} (lookup {} ms, write {} ms); on a pooled one: {:?} (lookup {} ms, write {} ms)",
        r.lookup_ms,
        r.write_ms,
        t.elapsed(),
        again.lookup_ms,
        again.write_ms
    );

    // must change at next logon + unlock in the same modify: one write of each attribute
    let before = writes();
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
            &Rules::default(),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(
        writes(),
        before.plus(1, 1, 1),
        "password, pwdLastSet, lockoutTime"
    );
    assert_eq!(
        dc.attribute(&dn, "pwdLastSet").unwrap().as_deref(),
        Some("0")
    );

    // a user who must change can still change with the old password
    let before = writes();
    let r = apply(
        &d,
        user_ref::Id::UserPrincipalName(upn("frank")),
        change("Must#Change-2", "Changed#By-User3"),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(writes(), before.plus_password(), "one change, one write");
    assert!(dc.can_bind(&upn("frank"), "Changed#By-User3"));
    assert!(!dc.can_bind(&upn("frank"), "Must#Change-2"));

    // every refusal below leaves the account as it is: nothing written, the password binds
    let current = writes();

    // wrong old password
    let r = apply(&d, sam("frank"), change("Wrong#Old-999", "Whatever#New-4")).await;
    assert_eq!(r.outcome, Outcome::WrongOldPassword, "{r:?}");
    assert!(r.detail.contains("00000056"), "{}", r.detail);
    assert_eq!(writes(), current, "a wrong old password writes nothing");

    // policy: too short, complexity, history (the same password again)
    let r = apply(&d, sam("frank"), reset("Ab1!")).await;
    assert_eq!(
        (r.outcome, r.policy_violation),
        (Outcome::RejectedByPolicy, PolicyViolation::TooShort),
        "{r:?}"
    );
    assert!(r.message.contains("7 characters"), "{}", r.message);
    assert_eq!(writes(), current, "a too-short password is not written");
    let r = apply(&d, sam("frank"), reset("onlylowercaseletters")).await;
    assert_eq!(
        (r.outcome, r.policy_violation),
        (Outcome::RejectedByPolicy, PolicyViolation::Complexity),
        "{r:?}"
    );
    assert_eq!(writes(), current, "a simple password is not written");
    assert!(!dc.can_bind(&upn("frank"), "onlylowercaseletters"));
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
    assert_eq!(
        writes(),
        current,
        "a password from the history is not written"
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
    assert_eq!(writes(), current);
    assert!(dc.can_bind(&upn("frank"), "Changed#By-User3"));

    // a computer account is an objectClass=user too, but not a person's account
    dc.samba_tool(&["computer", "create", "ws01"]).unwrap();
    let computer = format!("CN=ws01,CN=Computers,{}", dc.base_dn());
    let computer_writes = AdWrites::read(&dc, &computer);
    let r = apply(&d, sam("WS01$"), reset("Machine#Reset-1")).await;
    assert_eq!(r.outcome, Outcome::UserNotFound, "{r:?}");
    assert_eq!(AdWrites::read(&dc, &computer), computer_writes);

    // found by objectGUID
    let guid = dc.user_guid("frank").unwrap();
    let r = apply(&d, user_ref::Id::ObjectGuid(guid), reset("By-Guid#Reset5")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(writes(), current.plus_password());
    assert!(dc.can_bind(&upn("frank"), "By-Guid#Reset5"));

    // non-ASCII and astral-plane characters: encoded right, then usable for bind and kinit
    let unicode = "Pässwörd-😀-密码1";
    let before = writes();
    let r = apply(&d, sam("frank"), reset(unicode)).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(writes(), before.plus_password());
    assert!(dc.can_bind(&upn("frank"), unicode));
    assert!(dc.kinit(&format!("frank@{}", dc.realm()), unicode));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_accounts_unlock_rights_and_deadlines() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let d = directory(&dc);
    let upn = |s: &str| format!("{s}@{}", dc.dns_domain());

    // Administrator has adminCount=1: refused unless allowed, password unchanged
    let admin = dc.admin_dn();
    let admin_writes = AdWrites::read(&dc, &admin);
    let r = apply(&d, sam("Administrator"), reset("Takeover#Admin1")).await;
    assert_eq!(r.outcome, Outcome::ProtectedAccount, "{r:?}");
    assert_eq!(
        AdWrites::read(&dc, &admin),
        admin_writes,
        "refused: not written"
    );
    assert!(dc.can_bind(&upn("Administrator"), &dc.admin_password()));
    // allowed by the operator, the DC still refuses: protected accounts do not inherit the
    // delegation (AdminSDHolder, emulated on Samba by scripts/ad-dc.sh)
    let r = d
        .apply(
            &op(sam("Administrator"), reset("Takeover#Admin1")),
            soon(),
            &Rules {
                allow_protected: true,
                ..Rules::default()
            },
        )
        .await;
    assert_eq!(r.outcome, Outcome::AccessDenied, "{r:?}");
    assert!(r.detail.contains("Reset Password"), "{}", r.detail);
    assert_eq!(
        AdWrites::read(&dc, &admin),
        admin_writes,
        "denied: not written"
    );
    assert!(dc.can_bind(&upn("Administrator"), &dc.admin_password()));

    // unlock of a locked-out account: lockoutTime written once, the password untouched
    let gina = dc.create_user("gina", "Initial#Pass1").unwrap();
    dc.lock_out(&upn("gina")).unwrap();
    assert!(
        !dc.can_bind(&upn("gina"), "Initial#Pass1"),
        "gina should be locked out"
    );
    let locked = AdWrites::read(&dc, &gina);
    let r = apply(&d, sam("gina"), Action::Unlock(UnlockAccount {})).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(AdWrites::read(&dc, &gina), locked.plus(0, 0, 1), "unlock");
    assert!(dc.can_bind(&upn("gina"), "Initial#Pass1"), "unlocked");
    let unlocked = AdWrites::read(&dc, &gina);

    // a deadline already past: nothing written
    let r = d
        .apply(
            &op(sam("gina"), reset("Too-Late#Reset1")),
            Instant::now(),
            &Rules::default(),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Expired, "{r:?}");
    assert_eq!(AdWrites::read(&dc, &gina), unlocked, "expired: not written");
    assert!(dc.can_bind(&upn("gina"), "Initial#Pass1"));
    // too little time left to write safely: not even looked up
    let r = d
        .apply(
            &op(sam("gina"), reset("Too-Late#Reset2")),
            Instant::now() + Duration::from_millis(50),
            &Rules::default(),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Expired, "{r:?}");
    assert_eq!(AdWrites::read(&dc, &gina), unlocked, "expired: not written");
    assert!(dc.can_bind(&upn("gina"), "Initial#Pass1"));

    // bound as an ordinary user (no delegated rights): ACCESS_DENIED, naming the right
    let plain = Directory::new(config(
        &dc,
        vec![dc.ldaps_url()],
        upn("gina"),
        "Initial#Pass1",
    ))
    .unwrap();
    let hank = dc.create_user("hank", "Initial#Pass1").unwrap();
    let hank_writes = AdWrites::read(&dc, &hank);
    let r = apply(&plain, sam("hank"), reset("Not-Allowed#1x")).await;
    assert_eq!(r.outcome, Outcome::AccessDenied, "{r:?}");
    assert!(r.detail.contains("Reset Password"), "{}", r.detail);
    assert_eq!(
        AdWrites::read(&dc, &hank),
        hank_writes,
        "denied: not written"
    );

    // a wrong service-account password: ACCESS_DENIED, explained
    let bad = Directory::new(config(&dc, vec![dc.ldaps_url()], dc.svc_upn(), "wrong")).unwrap();
    let r = apply(&bad, sam("hank"), reset("Not-Allowed#1x")).await;
    assert_eq!(r.outcome, Outcome::AccessDenied, "{r:?}");
    assert!(r.detail.contains("cannot bind"), "{}", r.detail);
    assert_eq!(
        AdWrites::read(&dc, &hank),
        hank_writes,
        "denied: not written"
    );
    assert!(dc.can_bind(&upn("hank"), "Initial#Pass1"));
    assert!(!dc.can_bind(&upn("hank"), "Not-Allowed#1x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_between_dcs_and_reports_unavailable() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let ivan = dc.create_user("ivan", "Initial#Pass1").unwrap();
    let upn = format!("ivan@{}", dc.dns_domain());
    let writes = || AdWrites::read(&dc, &ivan);
    // 127.0.0.1:1 refuses at once: a dead DC listed first
    let d = Directory::new(config(
        &dc,
        vec!["ldaps://127.0.0.1:1".into(), dc.ldaps_url()],
        dc.svc_upn(),
        &dc.svc_password(),
    ))
    .unwrap();
    let before = writes();
    let r = apply(&d, sam("ivan"), reset("Fail-Over#Ok1")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(r.directory, dc.ldaps_url());
    assert_eq!(writes(), before.plus_password());
    assert!(dc.can_bind(&upn, "Fail-Over#Ok1"));
    assert_eq!(d.check().await.unwrap(), dc.ldaps_url());

    // a DC that accepts TCP but never answers TLS, listed first: given up after the connect
    // timeout, then skipped for a while
    // (it never accepts: connections wait in its backlog, where they are counted below)
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    hung.set_nonblocking(true).unwrap();
    let mut hung_attempts = 0;
    let mut count_hung_attempts = || {
        while hung.accept().is_ok() {
            hung_attempts += 1;
        }
        hung_attempts
    };
    let hung_url = format!("ldaps://{}", hung.local_addr().unwrap());
    let mut cfg = config(
        &dc,
        vec![hung_url, dc.ldaps_url()],
        dc.svc_upn(),
        &dc.svc_password(),
    );
    cfg.connect_timeout = Duration::from_millis(500);
    let slow = Directory::new(cfg).unwrap();
    let before = writes();
    let t = Instant::now();
    let r = apply(&slow, sam("ivan"), reset("Hung#First-1")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(r.directory, dc.ldaps_url());
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert_eq!(count_hung_attempts(), 1, "the hung DC was tried once");
    assert_eq!(writes(), before.plus_password());
    // pool_size 2: two operations at once need a second connection, which skips the hung DC
    // (tried last for a while) instead of waiting for its connect timeout again
    let before = writes();
    let t = Instant::now();
    let (r1, r2) = tokio::join!(
        apply(&slow, sam("ivan"), reset("Hung#Second-2")),
        apply(&slow, sam("frank2"), reset("Hung#Second-2")),
    );
    println!("two operations, one on a new connection: {:?}", t.elapsed());
    assert_eq!(r1.outcome, Outcome::Applied, "{r1:?}");
    assert_eq!(r1.directory, dc.ldaps_url());
    assert_eq!(r2.outcome, Outcome::UserNotFound, "{r2:?}");
    assert_eq!(r2.directory, dc.ldaps_url());
    assert_eq!(
        count_hung_attempts(),
        1,
        "the second connection went to the hung DC again instead of skipping it"
    );
    assert_eq!(writes(), before.plus_password());
    assert!(dc.can_bind(&upn, "Hung#Second-2"));
    drop(hung);

    // every DC down
    let before = writes();
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
    assert_eq!(
        writes(),
        before,
        "nothing was written while the DC was down"
    );
    assert!(dc.can_bind(&upn, "Hung#Second-2"));
    let r = apply(&d, sam("ivan"), reset("Back#Again-3")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(writes(), before.plus_password());
    assert!(dc.can_bind(&upn, "Back#Again-3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_a_bounded_pool() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let d = directory(&dc); // pool_size 2
    let pool_size = d.config().pool_size;
    let users: Vec<String> = (0..6).map(|i| format!("pool{i}")).collect();
    let mut dns = Vec::new();
    for u in &users {
        dns.push(dc.create_user(u, "Initial#Pass1").unwrap());
    }
    let before: Vec<AdWrites> = dns.iter().map(|dn| AdWrites::read(&dc, dn)).collect();
    // Count this process's connections to the DC's LDAPS port while the operations run.
    let dc_ip: std::net::Ipv4Addr = dc.ip().parse().unwrap();
    assert_eq!(
        connections_to(dc_ip, 636),
        0,
        "no connection before the pool opens one"
    );
    let sampler = ConnectionSampler::start(dc_ip, 636);
    let t = Instant::now();
    let results = futures::future::join_all(users.iter().enumerate().map(|(i, u)| {
        let d = d.clone();
        async move { apply(&d, sam(u), reset(&format!("Pool#Reset-{i}"))).await }
    }))
    .await;
    let after = connections_to(dc_ip, 636);
    let (most, samples) = sampler.stop();
    println!(
        "6 resets through a pool of {pool_size} in {:?}; at most {most} LDAP connections at once ({samples} samples), {after} left open",
        t.elapsed()
    );
    assert!(
        most.max(after) <= pool_size,
        "{} connections to the DC at once with a pool of {pool_size}",
        most.max(after)
    );
    assert!(
        most >= 1,
        "the sampler never saw a connection: it does not work"
    );
    for (i, (u, r)) in users.iter().zip(&results).enumerate() {
        assert_eq!(r.outcome, Outcome::Applied, "{u}: {r:?}");
        assert_eq!(
            AdWrites::read(&dc, &dns[i]),
            before[i].plus_password(),
            "{u}"
        );
        assert!(dc.can_bind(
            &format!("{u}@{}", dc.dns_domain()),
            &format!("Pool#Reset-{i}")
        ));
    }
}
