//! `onprem-agent doctor` against a real Samba AD DC: a correctly delegated account passes; an
//! account missing each right (one at a time) is told exactly which and how to fix it; a
//! minimum password age, disabled inheritance, an admin service account and a wrong CA are
//! each named.

use std::time::Duration;

use onprem_agent::directory::DirectoryConfig;
use onprem_agent::doctor::{self, DoctorOptions, Report, Status};
use onprem_agent::AgentConfig;
use relay::secret::Secret;
use testkit::SambaDc;

const USER_CLASS: &str = "bf967aba-0de6-11d0-a285-00aa003049e2";
/// (check name, ACE template with {SID}) for each writeback right, as scripts/ad-dc.sh grants.
const RIGHTS: [(&str, &str); 5] = [
    (
        "right.reset-password",
        "(OA;CIIO;CR;00299570-246d-11d0-a768-00aa006e0529;USER;SID)",
    ),
    (
        "right.change-password",
        "(OA;CIIO;CR;ab721a53-1e2f-11d0-9819-00aa0040529b;USER;SID)",
    ),
    (
        "right.write-lockouttime",
        "(OA;CIIO;RPWP;28630ebf-41d5-11d1-a9c1-0000f80367c1;USER;SID)",
    ),
    (
        "right.write-pwdlastset",
        "(OA;CIIO;RPWP;bf967a0a-0de6-11d0-a285-00aa003049e2;USER;SID)",
    ),
    (
        "right.unexpire-password",
        "(OA;;CR;ccc2dc7d-a6ad-4a7a-8846-c04e3cc53501;;SID)",
    ),
];

fn config(dc: &SambaDc, bind_dn: String, password: &str, ca: std::path::PathBuf) -> AgentConfig {
    AgentConfig {
        gateway_url: "https://127.0.0.1:1".into(),
        gateway_ca: ca.clone(),
        gateway_tls_name: None,
        agent_id: "doctor-test".into(),
        agent_secret: Some(Secret::new("unused")),
        forest: dc.dns_domain(),
        extra_domains: vec![],
        metrics_listen: None,
        state_dir: None,
        max_in_flight: 1,
        directory: DirectoryConfig {
            urls: vec![dc.ldaps_url()],
            ca_file: ca,
            bind_dn,
            bind_password: Secret::new(password),
            base_dn: dc.base_dn(),
            pool_size: 1,
            connect_timeout: Duration::from_secs(3),
            use_dc_reason_text: true,
            scope: relay::scope::Scope::default(),
        },
    }
}

async fn diagnose(dc: &SambaDc, account: &str, password: &str, samples: &[&str]) -> Report {
    let c = config(
        dc,
        format!("{account}@{}", dc.dns_domain()),
        password,
        dc.ca_file(),
    );
    let options = DoctorOptions {
        sample_users: samples.iter().map(|s| (*s).to_owned()).collect(),
        skip_gateway: true,
    };
    doctor::run(&c, &options).await
}

fn status(r: &Report, name: &str) -> Status {
    r.get(name)
        .unwrap_or_else(|| panic!("no check {name}:\n{}", r.render()))
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_each_problem_and_its_fix() {
    let dc = SambaDc::start("CORP.WRITEBACK.TEST").unwrap();
    dc.create_user("sample", "Initial#Pass1").unwrap();

    // The correctly delegated account: nothing fails.
    let report = diagnose(&dc, "svc-writeback", &dc.svc_password(), &[]).await;
    println!("{}", report.render());
    assert!(!report.failed(), "{}", report.render());
    for (name, _) in RIGHTS {
        assert_eq!(status(&report, name), Status::Ok, "{}", report.render());
    }
    assert_eq!(status(&report, "service-account"), Status::Ok);
    assert_eq!(status(&report, "policy.min-age"), Status::Ok);
    assert_eq!(
        status(&report, "protected-accounts"),
        Status::Warn,
        "Administrator is in scope"
    );
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name.starts_with("user CN=") && c.status == Status::Ok),
        "{}",
        report.render()
    );

    // One account per missing right: exactly that right fails, with its fix.
    let base = dc.base_dn();
    for (missing, _) in RIGHTS {
        let account = format!(
            "svc-no-{}",
            missing
                .trim_start_matches("right.")
                .chars()
                .take(10)
                .collect::<String>()
        );
        dc.create_user(&account, "Svc#Partial-1").unwrap();
        let sid = dc.sid(&account).unwrap();
        let mut aces: String = RIGHTS
            .iter()
            .filter(|(name, _)| *name != missing)
            .map(|(_, ace)| ace.replace("USER", USER_CLASS).replace("SID", &sid))
            .collect();
        if missing == "right.unexpire-password" {
            // Samba (like Windows) grants Unexpire Password to Authenticated Users on the
            // domain root by default; taking it away from one account needs a deny entry.
            aces.push_str(&format!(
                "(OD;;CR;ccc2dc7d-a6ad-4a7a-8846-c04e3cc53501;;{sid})"
            ));
        }
        dc.samba_tool(&[
            "dsacl",
            "set",
            &format!("--objectdn={base}"),
            &format!("--sddl={aces}"),
        ])
        .unwrap();
        let report = diagnose(&dc, &account, "Svc#Partial-1", &["sample"]).await;
        assert!(report.failed(), "{missing}: {}", report.render());
        let check = report.get(missing).unwrap();
        assert_eq!(check.status, Status::Fail, "{missing}: {}", report.render());
        assert!(
            check.fix.as_deref().unwrap_or("").contains("dsacls"),
            "{missing}: {check:?}"
        );
        for (other, _) in RIGHTS.iter().filter(|(n, _)| *n != missing) {
            assert_eq!(
                status(&report, other),
                Status::Ok,
                "{missing} made {other} fail: {}",
                report.render()
            );
        }
        println!("missing {missing}: {}", check.message);
    }

    // Minimum password age 1 day: a warning that names it, not a failure.
    dc.set_password_settings(&["--min-pwd-age=1"]).unwrap();
    let report = diagnose(&dc, "svc-writeback", &dc.svc_password(), &["sample"]).await;
    let check = report.get("policy.min-age").unwrap();
    assert_eq!(check.status, Status::Warn);
    assert!(check.message.contains("1 day"), "{}", check.message);
    assert!(!report.failed(), "{}", report.render());
    dc.set_password_settings(&["--min-pwd-age=0"]).unwrap();

    // A user with inheritance disabled (Administrator: AdminSDHolder-style protected DACL).
    let report = diagnose(&dc, "svc-writeback", &dc.svc_password(), &["Administrator"]).await;
    let check = report
        .checks
        .iter()
        .find(|c| c.name.starts_with("user CN=Administrator"))
        .unwrap();
    assert_eq!(check.status, Status::Fail, "{}", report.render());
    assert!(
        check.message.contains("inheritance is disabled"),
        "{}",
        check.message
    );

    // A domain admin as the service account.
    let report = diagnose(&dc, "Administrator", &dc.admin_password(), &["sample"]).await;
    assert_eq!(
        status(&report, "service-account"),
        Status::Fail,
        "{}",
        report.render()
    );

    // A CA that did not sign the DC's certificate.
    let other_ca = testkit::TestCa::new(&["127.0.0.1"]).unwrap();
    let c = config(&dc, dc.svc_upn(), &dc.svc_password(), other_ca.ca_file());
    let report = doctor::run(
        &c,
        &DoctorOptions {
            skip_gateway: true,
            ..Default::default()
        },
    )
    .await;
    let check = report.get(&format!("tls {}", dc.ldaps_url())).unwrap();
    assert_eq!(check.status, Status::Fail);
    assert!(
        check.fix.as_deref().unwrap().contains("--ldap-ca"),
        "{check:?}"
    );
}
