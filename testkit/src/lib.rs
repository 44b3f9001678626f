//! Test harness: real Redis servers, real Samba AD domain controllers and TLS material, all on
//! loopback, started per test and stopped on drop.
//!
//! Samba's LDAP ports are fixed, so every DC gets a loopback address of its own, allocated
//! across concurrently running test processes with file locks under
//! `$TMPDIR/writeback-testkit-ips/`.
//! Each realm is provisioned once per machine into `target/testkit/templates/<realm>` and
//! copied per DC (about 0.5 s instead of 8 s).

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit has a parent directory")
        .to_owned()
}

/// `target/testkit`, where templates, DC copies and IP locks live.
pub fn state_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("testkit")
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for test servers).
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A `redis-server` on a free loopback port, without persistence, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts Redis and waits until it answers PING.
    ///
    /// # Errors
    /// When `redis-server` is missing or does not come up.
    pub fn start() -> anyhow::Result<Self> {
        for _ in 0..5 {
            let dir = tempfile::tempdir()?;
            let port = free_port()?;
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start redis-server (run scripts/install-deps.sh)")?;
            let mut server = Self {
                child,
                port,
                _dir: dir,
            };
            if server.wait_ready(Duration::from_secs(5)) {
                return Ok(server);
            }
        }
        bail!("redis-server did not answer PING")
    }

    fn wait_ready(&mut self, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if redis_ping(self.port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// A CA and a server certificate, as PEM files in a temporary directory.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    /// A new CA and a server certificate for `sans` (IP addresses or DNS names).
    ///
    /// # Errors
    /// When key generation or writing fails.
    pub fn new(sans: &[&str]) -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = tempfile::tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "writeback test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            sans.first().copied().unwrap_or("localhost"),
        );
        let cert = params.signed_by(&key, &issuer)?;
        fs::write(dir.path().join("ca.pem"), ca_cert.pem())?;
        fs::write(dir.path().join("cert.pem"), cert.pem())?;
        fs::write(dir.path().join("key.pem"), key.serialize_pem())?;
        Ok(Self { dir })
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }
}

/// Seeded passwords (see `scripts/ad-dc.sh`).
pub const ADMIN_PASSWORD: &str = "Adm1n!Passw0rd";
pub const SVC_PASSWORD: &str = "Svc#Writeback1";
pub const USER_PASSWORD: &str = "Initial#Pass1";

/// A loopback address held exclusively by this process until dropped.
struct IpLease {
    octet: u8,
    _lock: File,
}

fn lease_ip() -> anyhow::Result<IpLease> {
    // Machine-wide (not per checkout): two checkouts testing at once must not share an address.
    let dir = std::env::temp_dir().join("writeback-testkit-ips");
    fs::create_dir_all(&dir)?;
    for octet in 20u8..=250 {
        let file = File::create(dir.join(format!("{octet}.lock")))?;
        if file.try_lock().is_ok() {
            return Ok(IpLease { octet, _lock: file });
        }
    }
    bail!("no free loopback address in 127.0.0.20-250")
}

fn script() -> PathBuf {
    workspace_root().join("scripts/ad-dc.sh")
}

fn run_script(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .context("cannot run scripts/ad-dc.sh")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("scripts/ad-dc.sh {} failed:\n{text}", args.join(" "));
    }
    Ok(text)
}

fn stop_stale(dir: &Path) {
    if dir.join("run/samba.pid").exists() {
        let _ = run_script(&["--stop", &dir.to_string_lossy()]);
    }
}

/// Provisions `realm` once per machine (cross-process lock), returning the stopped template.
fn template(realm: &str) -> anyhow::Result<PathBuf> {
    let root = state_dir().join("templates");
    fs::create_dir_all(&root)?;
    let dir = root.join(realm);
    let lock = File::create(root.join(format!("{realm}.lock")))?;
    lock.lock()?;
    if !dir.join(".seeded").exists() {
        stop_stale(&dir);
        let lease = lease_ip()?;
        let ip = format!("127.0.0.{}", lease.octet);
        let dir_s = dir.to_string_lossy().into_owned();
        let r = run_script(&[&dir_s, realm, &ip]);
        let _ = run_script(&["--stop", &dir_s]);
        r?;
    }
    Ok(dir)
}

/// A Samba AD DC on a loopback address of its own, copied from the realm's template; stopped
/// on drop.
pub struct SambaDc {
    realm: String,
    dir: PathBuf,
    lease: IpLease,
}

impl SambaDc {
    /// Starts a DC for `realm` (e.g. `CORP.WRITEBACK.TEST`) and waits for verified LDAPS.
    ///
    /// # Errors
    /// When Samba is missing or does not come up.
    pub fn start(realm: &str) -> anyhow::Result<Self> {
        let realm = realm.to_ascii_uppercase();
        let template = template(&realm)?;
        let lease = lease_ip()?;
        let dir = state_dir().join("dcs").join(lease.octet.to_string());
        stop_stale(&dir);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(dir.parent().expect("dcs dir"))?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&dir)
            .status()?;
        if !status.success() {
            bail!("cannot copy the {realm} template");
        }
        let dc = Self { realm, dir, lease };
        dc.start_again()?;
        Ok(dc)
    }

    /// Starts the DC (again, after [`SambaDc::stop`]).
    ///
    /// # Errors
    /// When it does not come up.
    pub fn start_again(&self) -> anyhow::Result<()> {
        run_script(&[&self.dir.to_string_lossy(), &self.realm, &self.ip()])?;
        Ok(())
    }

    /// Stops the DC (SIGTERM, then KILL).
    pub fn stop(&self) {
        let _ = run_script(&["--stop", &self.dir.to_string_lossy()]);
    }

    pub fn ip(&self) -> String {
        format!("127.0.0.{}", self.lease.octet)
    }
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://{}", self.ip())
    }
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }
    pub fn realm(&self) -> &str {
        &self.realm
    }
    /// The DNS name of the domain, e.g. `corp.writeback.test`.
    pub fn dns_domain(&self) -> String {
        self.realm.to_ascii_lowercase()
    }
    pub fn base_dn(&self) -> String {
        format!("DC={}", self.dns_domain().replace('.', ",DC="))
    }
    pub fn admin_dn(&self) -> String {
        format!("CN=Administrator,CN=Users,{}", self.base_dn())
    }
    pub fn admin_password(&self) -> String {
        ADMIN_PASSWORD.to_owned()
    }
    pub fn svc_upn(&self) -> String {
        format!("svc-writeback@{}", self.dns_domain())
    }
    pub fn svc_dn(&self) -> String {
        format!("CN=svc-writeback,CN=Users,{}", self.base_dn())
    }
    pub fn svc_password(&self) -> String {
        SVC_PASSWORD.to_owned()
    }
    pub fn krb5_conf(&self) -> PathBuf {
        self.dir.join("krb5.conf")
    }
    pub fn smb_conf(&self) -> PathBuf {
        self.dir.join("etc/smb.conf")
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `samba-tool <args> -s smb.conf`.
    ///
    /// # Errors
    /// With samba-tool's output when it fails.
    pub fn samba_tool(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("samba-tool")
            .args(args)
            .arg("-s")
            .arg(self.smb_conf())
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("samba-tool {} failed: {text}", args.first().unwrap_or(&""));
        }
        Ok(text)
    }

    /// Creates a user in CN=Users with `password`; returns its DN.
    ///
    /// # Errors
    /// When samba-tool refuses.
    pub fn create_user(&self, sam: &str, password: &str) -> anyhow::Result<String> {
        self.samba_tool(&["user", "create", sam, password])?;
        Ok(format!("CN={sam},CN=Users,{}", self.base_dn()))
    }

    /// Creates a user inside `ou_dn` (which must exist); returns its DN.
    ///
    /// # Errors
    /// When samba-tool refuses.
    pub fn create_user_in(
        &self,
        sam: &str,
        password: &str,
        ou_rdn_path: &str,
    ) -> anyhow::Result<()> {
        self.samba_tool(&[
            "user",
            "create",
            sam,
            password,
            &format!("--userou={ou_rdn_path}"),
        ])?;
        Ok(())
    }

    /// Sets domain password settings, e.g. `["--min-pwd-length=12"]`.
    ///
    /// # Errors
    /// When samba-tool refuses.
    pub fn set_password_settings(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["domain", "passwordsettings", "set"];
        all.extend_from_slice(args);
        self.samba_tool(&all)?;
        Ok(())
    }

    fn ldapsearch(
        &self,
        bind: &str,
        password: &str,
        base: &str,
        scope: &str,
        attrs: &[&str],
    ) -> std::io::Result<std::process::Output> {
        Command::new("ldapsearch")
            .env("LDAPTLS_CACERT", self.ca_file())
            .env("LDAPTLS_REQCERT", "demand")
            .args(["-LLL", "-x", "-o", "ldif-wrap=no", "-o", "nettimeout=5"])
            .arg("-H")
            .arg(self.ldaps_url())
            .args(["-D", bind, "-w", password, "-s", scope, "-b", base])
            .args(attrs)
            .output()
    }

    /// Whether `user` (UPN or DN) can bind with `password` over verified LDAPS.
    pub fn can_bind(&self, user: &str, password: &str) -> bool {
        self.ldapsearch(user, password, "", "base", &["dn"])
            .is_ok_and(|o| o.status.success())
    }

    /// Whether `principal` gets a Kerberos ticket with `password` (KRB5_CONFIG of this DC).
    pub fn kinit(&self, principal: &str, password: &str) -> bool {
        use std::io::Write;
        let cache = self.dir.join(format!("krb5cc_{}", std::process::id()));
        let child = Command::new("kinit")
            .env("KRB5_CONFIG", self.krb5_conf())
            .env("KRB5CCNAME", format!("FILE:{}", cache.display()))
            .arg(principal)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else { return false };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = writeln!(stdin, "{password}");
        }
        let ok = child.wait().is_ok_and(|s| s.success());
        let _ = fs::remove_file(cache);
        ok
    }

    /// One attribute of `dn`, read as Administrator (first value, raw text).
    ///
    /// # Errors
    /// When the search fails.
    pub fn attribute(&self, dn: &str, attr: &str) -> anyhow::Result<Option<String>> {
        let out = self.ldapsearch(&self.admin_dn(), ADMIN_PASSWORD, dn, "base", &[attr])?;
        if !out.status.success() {
            bail!(
                "ldapsearch {dn} {attr}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let prefix = format!("{attr}: ");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned)))
    }

    /// The canonical string form of a user's objectGUID.
    ///
    /// # Errors
    /// When the user does not exist.
    pub fn user_guid(&self, sam: &str) -> anyhow::Result<String> {
        let out = self.samba_tool(&["user", "show", sam, "--attributes=objectGUID"])?;
        out.lines()
            .find_map(|l| l.strip_prefix("objectGUID: ").map(|g| g.trim().to_owned()))
            .context("no objectGUID in samba-tool output")
    }

    /// The objectSid of an account, as `S-1-5-…`.
    ///
    /// # Errors
    /// When the account does not exist.
    pub fn sid(&self, sam: &str) -> anyhow::Result<String> {
        let out = self.samba_tool(&["user", "show", sam, "--attributes=objectSid"])?;
        out.lines()
            .find_map(|l| l.strip_prefix("objectSid: ").map(|g| g.trim().to_owned()))
            .context("no objectSid in samba-tool output")
    }

    /// Locks `user_upn` out: sets a lockout threshold of 3 and makes bad binds.
    ///
    /// # Errors
    /// When the settings cannot be changed.
    pub fn lock_out(&self, user_upn: &str) -> anyhow::Result<()> {
        self.set_password_settings(&[
            "--account-lockout-threshold=3",
            "--account-lockout-duration=30",
            "--reset-account-lockout-after=30",
        ])?;
        for _ in 0..5 {
            let _ = self.can_bind(user_upn, "Definitely-Wrong#0");
        }
        Ok(())
    }
}

impl Drop for SambaDc {
    fn drop(&mut self) {
        self.stop();
    }
}
