//! Exact policy reasons against a real Samba AD DC, both with Samba's reason text and with it
//! removed (as a Windows DC answers: `0000052D` and nothing else); fine-grained policies;
//! disabled accounts; clearing a forced change; DNs with special characters.

use std::time::{Duration, Instant};

use onprem_agent::directory::{ApplyResult, Directory, DirectoryConfig, Rules};
use relay::proto::{
    sealed_operation::Action, user_ref, ClearForcedChange, Initiator, Outcome, PolicyViolation,
    ResetPassword, SealedOperation, UserRef,
};
use relay::secret::Secret;
use testkit::SambaDc;

mod common;
use common::{change, reset, AdWrites};

fn directory(dc: &SambaDc, use_dc_reason_text: bool) -> Directory {
    Directory::new(DirectoryConfig {
        urls: vec![dc.ldaps_url()],
        ca_file: dc.ca_file(),
        bind_dn: dc.svc_upn(),
        bind_password: Secret::new(dc.svc_password()),
        base_dn: dc.base_dn(),
        pool_size: 1,
        connect_timeout: Duration::from_secs(2),
        use_dc_reason_text,
        scope: relay::scope::Scope::default(),
    })
    .unwrap()
}

async fn apply_as(d: &Directory, user: &str, initiator: Initiator, action: Action) -> ApplyResult {
    let id = if user.contains('@') {
        user_ref::Id::UserPrincipalName(user.into())
    } else if user.len() == 36 && user.matches('-').count() == 4 {
        user_ref::Id::ObjectGuid(user.into())
    } else {
        user_ref::Id::SamAccountName(user.into())
    };
    let op = SealedOperation {
        user: Some(UserRef {
            forest: "f".into(),
            id: Some(id),
        }),
        initiator: initiator as i32,
        action: Some(action),
        switches: None,
    };
    d.apply(
        &op,
        Instant::now() + Duration::from_secs(15),
        &Rules::default(),
    )
    .await
}

async fn apply(d: &Directory, user: &str, action: Action) -> ApplyResult {
    apply_as(d, user, Initiator::EndUser, action).await
}

/// The policy-diagnosis matrix: rule × {with, without} the DC's reason text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnosis_matrix_with_and_without_reason_text() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let mut matrix = Vec::new();
    for with_text in [true, false] {
        let d = directory(&dc, with_text);
        let user = if with_text { "pol-text" } else { "pol-bare" };
        let label = if with_text {
            "with text"
        } else {
            "without text"
        };
        let dn = dc.create_user(user, "Initial#Pass1").unwrap();
        let upn = format!("{user}@{}", dc.dns_domain());
        let created = AdWrites::read(&dc, &dn);
        // a rejected password is not written: AD's count unchanged, the old password binds
        let not_written = |rule: &str, candidate: &str| {
            assert_eq!(
                AdWrites::read(&dc, &dn),
                created,
                "{label}: {rule} rejected but written"
            );
            assert!(dc.can_bind(&upn, "Initial#Pass1"), "{label}: {rule}");
            assert!(!dc.can_bind(&upn, candidate), "{label}: {rule}");
        };

        let r = apply(&d, user, reset("Ab1!x")).await;
        assert_eq!(
            (r.outcome, r.policy_violation),
            (Outcome::RejectedByPolicy, PolicyViolation::TooShort),
            "{label}: {r:?}"
        );
        assert!(
            r.message.contains("at least 7 characters"),
            "{label}: {}",
            r.message
        );
        not_written("TOO_SHORT", "Ab1!x");
        matrix.push(("TOO_SHORT", label, r.policy_violation));

        let r = apply(&d, user, reset("nouppercaseordigits")).await;
        assert_eq!(
            (r.outcome, r.policy_violation),
            (Outcome::RejectedByPolicy, PolicyViolation::Complexity),
            "{label}: {r:?}"
        );
        not_written("COMPLEXITY", "nouppercaseordigits");
        matrix.push(("COMPLEXITY", label, r.policy_violation));

        let r = apply(&d, user, change("Initial#Pass1", "Initial#Pass1")).await;
        assert_eq!(
            (r.outcome, r.policy_violation),
            (Outcome::RejectedByPolicy, PolicyViolation::History),
            "{label}: {r:?}"
        );
        assert!(r.message.contains("24"), "{label}: {}", r.message);
        assert_eq!(
            AdWrites::read(&dc, &dn),
            created,
            "{label}: HISTORY rejected but written"
        );
        assert!(dc.can_bind(&upn, "Initial#Pass1"), "{label}: HISTORY");
        matrix.push(("HISTORY", label, r.policy_violation));
    }

    // Minimum age 1 day: a change right after a reset is too young.
    dc.set_password_settings(&["--min-pwd-age=1"]).unwrap();
    for with_text in [true, false] {
        let d = directory(&dc, with_text);
        let label = if with_text {
            "with text"
        } else {
            "without text"
        };
        let user = if with_text { "age-text" } else { "age-bare" };
        let dn = dc.create_user(user, "Initial#Pass1").unwrap();
        let upn = format!("{user}@{}", dc.dns_domain());
        let created = AdWrites::read(&dc, &dn);
        let r = apply(&d, user, change("Initial#Pass1", "Brand#New-Pass9")).await;
        assert_eq!(
            (r.outcome, r.policy_violation),
            (Outcome::RejectedByPolicy, PolicyViolation::MinAge),
            "{label}: {r:?}"
        );
        assert!(
            r.message.contains("UTC"),
            "{label}: the message names when: {}",
            r.message
        );
        assert_eq!(
            AdWrites::read(&dc, &dn),
            created,
            "{label}: MIN_AGE rejected but written"
        );
        assert!(dc.can_bind(&upn, "Initial#Pass1"), "{label}: MIN_AGE");
        assert!(!dc.can_bind(&upn, "Brand#New-Pass9"), "{label}: MIN_AGE");
        matrix.push(("MIN_AGE", label, r.policy_violation));
        // An administrator's reset is not held back by the minimum age: written once.
        let r = apply_as(&d, user, Initiator::Admin, reset("Admin#Reset-77")).await;
        assert_eq!(r.outcome, Outcome::Applied, "{label}: {r:?}");
        assert_eq!(
            AdWrites::read(&dc, &dn),
            created.plus_password(),
            "{label}: admin reset"
        );
        assert!(dc.can_bind(&upn, "Admin#Reset-77"), "{label}: admin reset");
        assert!(!dc.can_bind(&upn, "Initial#Pass1"), "{label}: admin reset");
    }
    dc.set_password_settings(&["--min-pwd-age=0"]).unwrap();

    println!("policy diagnosis matrix (rule x DC reason text):");
    for (rule, label, got) in &matrix {
        println!("  {rule:<11} {label:<13} -> {}", got.as_str_name());
    }
}

/// A fine-grained password policy (PSO) applied to a user: its rules are the ones reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fine_grained_policy_is_the_one_reported() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let dn = dc.create_user("pso-user", "Initial#Pass1").unwrap();
    let upn = format!("pso-user@{}", dc.dns_domain());
    let created = AdWrites::read(&dc, &dn);
    let pso = ["domain", "passwordsettings", "pso"];
    dc.samba_tool(
        &[
            &pso[..],
            &[
                "create",
                "strict",
                "1",
                "--min-pwd-length=12",
                "--complexity=on",
                "--history-length=5",
            ],
        ]
        .concat(),
    )
    .unwrap();
    dc.samba_tool(&[&pso[..], &["apply", "strict", "pso-user"]].concat())
        .unwrap();

    // As in AD, the service account cannot read PSOs by default: the agent knows one applies
    // and does not quote the domain's numbers.
    let d = directory(&dc, false);
    let r = apply(&d, "pso-user", reset("Nine#Char")).await;
    assert_eq!(r.outcome, Outcome::RejectedByPolicy, "{r:?}");
    assert!(!r.message.contains("7 characters"), "{}", r.message);
    assert!(r.detail.contains("not readable"), "{}", r.detail);
    assert_eq!(
        AdWrites::read(&dc, &dn),
        created,
        "rejected by the PSO but written"
    );

    // Granted read access on the Password Settings Container, it reports the PSO's rules.
    let container = format!("CN=Password Settings Container,CN=System,{}", dc.base_dn());
    let sid = dc.sid("svc-writeback").unwrap();
    dc.samba_tool(&[
        "dsacl",
        "set",
        &format!("--objectdn={container}"),
        &format!("--sddl=(A;CI;RPLCLORC;;;{sid})"),
    ])
    .unwrap();
    for with_text in [true, false] {
        let d = directory(&dc, with_text);
        // 9 characters: fine for the domain (7), too short for the PSO (12).
        let r = apply(&d, "pso-user", reset("Nine#Char")).await;
        assert_eq!(
            (r.outcome, r.policy_violation),
            (Outcome::RejectedByPolicy, PolicyViolation::TooShort),
            "{r:?}"
        );
        assert!(
            r.message.contains("12 characters"),
            "with_text={with_text}: {} / {}",
            r.message,
            r.detail
        );
        assert!(
            r.detail.contains("CN=strict"),
            "with_text={with_text}: {}",
            r.detail
        );
        assert_eq!(
            AdWrites::read(&dc, &dn),
            created,
            "with_text={with_text}: rejected by the PSO but written"
        );
    }
    assert!(dc.can_bind(&upn, "Initial#Pass1"));
    assert!(!dc.can_bind(&upn, "Nine#Char"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_accounts_forced_change_and_special_dns() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    let d = directory(&dc, true);
    let upn = |s: &str| format!("{s}@{}", dc.dns_domain());

    // Disabled: an outcome of its own for end users; administrators may still reset.
    let dora = dc.create_user("dora", "Initial#Pass1").unwrap();
    dc.samba_tool(&["user", "disable", "dora"]).unwrap();
    let disabled = AdWrites::read(&dc, &dora);
    let r = apply(&d, "dora", reset("Disabled#Try-1")).await;
    assert_eq!(r.outcome, Outcome::AccountDisabled, "{r:?}");
    assert_eq!(AdWrites::read(&dc, &dora), disabled, "refused but written");
    let r = apply_as(&d, "dora", Initiator::Admin, reset("Admin#Reset-1")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert_eq!(
        AdWrites::read(&dc, &dora),
        disabled.plus_password(),
        "admin reset"
    );
    // (a disabled account cannot bind whatever its password: the DC's answer is the same
    // rejection, so which password is set is checked once it is enabled again)
    dc.samba_tool(&["user", "enable", "dora"]).unwrap();
    assert!(dc.can_bind(&upn("dora"), "Admin#Reset-1"));
    assert!(!dc.can_bind(&upn("dora"), "Disabled#Try-1"));
    assert!(!dc.can_bind(&upn("dora"), "Initial#Pass1"));

    // Clearing a forced change (pwdLastSet = -1, needs Unexpire Password).
    let dn = dc.create_user("carl", "Initial#Pass1").unwrap();
    let before = AdWrites::read(&dc, &dn);
    let r = apply(
        &d,
        "carl",
        Action::Reset(ResetPassword {
            new_password: "Must#Change-1".into(),
            must_change_at_next_logon: true,
            unlock: false,
        }),
    )
    .await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    // the password and pwdLastSet = 0 in one modify: each written once
    assert_eq!(AdWrites::read(&dc, &dn), before.plus(1, 1, 0));
    let forced = AdWrites::read(&dc, &dn);
    assert_eq!(
        dc.attribute(&dn, "pwdLastSet").unwrap().as_deref(),
        Some("0")
    );
    assert!(
        !dc.can_bind(&upn("carl"), "Must#Change-1"),
        "must change at next logon blocks binds"
    );
    let r = apply(&d, "carl", Action::ClearForcedChange(ClearForcedChange {})).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    // pwdLastSet only: the password is not written again
    assert_eq!(AdWrites::read(&dc, &dn), forced.plus(0, 1, 0));
    let last_set = dc.attribute(&dn, "pwdLastSet").unwrap().unwrap();
    assert!(
        last_set.parse::<i64>().unwrap() > 0,
        "pwdLastSet is now the current time: {last_set}"
    );
    assert!(dc.can_bind(&upn("carl"), "Must#Change-1"));

    // An OU whose name has every character DNs must escape, plus leading and trailing spaces.
    let ou_rdn = r#"OU=\ Sales\, \"EMEA\" \+ \<Ops\>\; a\=b / \#1 \\ x\ "#;
    dc.samba_tool(&["ou", "create", &format!("{ou_rdn},{}", dc.base_dn())])
        .unwrap();
    let odd = dc
        .create_user_in("odd-ou-user", "Initial#Pass1", ou_rdn)
        .unwrap();
    for (i, who) in [
        String::from("odd-ou-user"),
        upn("odd-ou-user"),
        dc.user_guid("odd-ou-user").unwrap(),
    ]
    .iter()
    .enumerate()
    {
        let pw = format!("Odd#Ou-Reset{i}");
        let before = AdWrites::read(&dc, &odd);
        let r = apply(&d, who, reset(&pw)).await;
        assert_eq!(r.outcome, Outcome::Applied, "{who}: {r:?}");
        assert_eq!(AdWrites::read(&dc, &odd), before.plus_password(), "{who}");
        assert!(dc.can_bind(&upn("odd-ou-user"), &pw), "{who}");
    }
    let before = AdWrites::read(&dc, &odd);
    let r = apply(&d, "odd-ou-user", change("Odd#Ou-Reset2", "Odd#Ou-Change3")).await;
    assert_eq!(r.outcome, Outcome::Applied, "{r:?}");
    assert!(r.detail.contains("Sales"), "{}", r.detail);
    assert_eq!(AdWrites::read(&dc, &odd), before.plus_password());
    assert!(dc.can_bind(&upn("odd-ou-user"), "Odd#Ou-Change3"));
    assert!(!dc.can_bind(&upn("odd-ou-user"), "Odd#Ou-Reset2"));
}
