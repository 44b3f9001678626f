//! The agent's Debian package (`scripts/package-agent.sh`, `packaging/agent/`), as an AD admin
//! would use it: built from the binary the other tests run, installed with `dpkg -i` (this
//! machine's real dpkg, as root), its systemd unit checked with `systemd-analyze verify`,
//! `onprem-agent doctor` run from the installed binary as the service user against the test
//! DC and a gateway, then purged: user, settings and journal gone.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use e2e::{binary, Sandbox};

fn run(cmd: &mut Command) -> Output {
    e2e::run_ok(cmd)
}

fn id_of(kind: &str, name: &str) -> Option<u32> {
    let out = Command::new("getent").args([kind, name]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':').nth(2)?.trim().parse().ok()
}

fn mode(path: &str) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

/// Copies `from` into /etc/onprem-agent, as the install guide says: root:onprem-agent 0640.
fn install_secret(from: &Path, name: &str) -> String {
    let to = format!("/etc/onprem-agent/{name}");
    run(Command::new("install")
        .args(["-m", "0640", "-o", "root", "-g", "onprem-agent"])
        .arg(from)
        .arg(&to));
    to
}

fn purge() {
    let _ = Command::new("dpkg")
        .args(["--purge", "onprem-agent"])
        .output();
}

/// Purges the package when dropped, also when the test fails half-way.
struct Installed;
impl Drop for Installed {
    fn drop(&mut self) {
        purge();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_package_installs_checks_and_purges() {
    assert_eq!(
        nix_uid(),
        0,
        "this test installs a .deb with dpkg: run it as root (make test does, on CI)"
    );
    let bin = binary("onprem-agent").unwrap();
    let profile = bin
        .parent()
        .and_then(Path::file_name)
        .and_then(|p| p.to_str())
        .unwrap()
        .to_owned();
    let sb = Sandbox::start(1).await.unwrap();
    let out_dir = sb.dir().join("package");
    let root = env!("CARGO_MANIFEST_DIR").to_owned() + "/..";
    let built = run(Command::new(format!("{root}/scripts/package-agent.sh"))
        .args(["--profile", &profile, "--out"])
        .arg(&out_dir));
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    assert!(deb.ends_with(".deb"), "{deb}");

    // A left-over installation from an interrupted run would hide what this one does.
    purge();
    let installed = Installed;
    run(Command::new("dpkg").args(["-i", &deb]));
    let uid = id_of("passwd", "onprem-agent").expect("the service user was created");
    let gid = id_of("group", "onprem-agent").expect("its group was created");
    assert_eq!(
        mode("/var/lib/onprem-agent"),
        (0o700, uid, gid),
        "state dir"
    );
    assert_eq!(mode("/etc/onprem-agent"), (0o750, 0, gid));
    assert_eq!(mode("/etc/onprem-agent/agent.toml"), (0o640, 0, gid));
    assert_eq!(mode("/usr/bin/onprem-agent").0, 0o755);
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/lib/systemd/system/onprem-agent.service"])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // doctor from the installed binary, as the service user, with files placed as the
    // install guide says.
    let dir = sb.dir();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let secret = sb
        .tenants
        .register_agent(&e2e::tenant_id(&t), &e2e::forest_id(&f), "pkg-agent")
        .await
        .unwrap();
    let write = |name: &str, v: &str| e2e::write_secret(&dir, name, v);
    let agent_secret = install_secret(&write("agent.secret", secret.expose()), "agent.secret");
    let password = install_secret(
        &write("bind.password", &sb.dc.svc_password()),
        "bind.password",
    );
    let gateway_ca = install_secret(&sb.ca.ca_file(), "gateway-ca.pem");
    let dc_ca = install_secret(&sb.dc.ca_file(), "dc-ca.pem");
    // The settings file, as the admin fills it in (the package's own is the example).
    let settings = format!(
        "gateway_url = \"https://{gateway}\"\n\
         gateway_ca = \"{gateway_ca}\"\n\
         agent_id = \"pkg-agent\"\n\
         forest = \"{f}\"\n\
         agent_secret_file = \"{agent_secret}\"\n\
         ldap_urls = [\"{ldap}\"]\n\
         ldap_ca = \"{dc_ca}\"\n\
         bind_dn = \"{bind}\"\n\
         bind_password_file = \"{password}\"\n\
         base_dn = \"{base}\"\n\
         state_dir = \"/var/lib/onprem-agent\"\n",
        gateway = sb.gateways[0].addr,
        ldap = sb.dc.ldaps_url(),
        bind = sb.dc.svc_upn(),
        base = sb.dc.base_dn()
    );
    std::fs::write("/etc/onprem-agent/agent.toml", settings).unwrap();
    let as_service = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "onprem-agent", "--", "/usr/bin/onprem-agent"])
            .args(args)
            .args(["--config", "/etc/onprem-agent/agent.toml"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap()
    };
    let check = as_service(&["config", "check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains("configuration is valid"),
        "{text}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let doctor = as_service(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(
        doctor.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&doctor.stderr)
    );
    assert!(text.contains("writeback is ready"), "{text}");

    std::mem::forget(installed);
    run(Command::new("dpkg").args(["--purge", "onprem-agent"]));
    assert_eq!(id_of("passwd", "onprem-agent"), None, "the user is gone");
    assert_eq!(id_of("group", "onprem-agent"), None, "the group is gone");
    for gone in [
        "/usr/bin/onprem-agent",
        "/etc/onprem-agent",
        "/var/lib/onprem-agent",
        "/lib/systemd/system/onprem-agent.service",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after purge");
    }
    sb.shutdown().await;
}

fn nix_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}
