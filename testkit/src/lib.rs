//! Test harness: real Redis servers, real Samba AD domain controllers and TLS material, all on
//! loopback, started per test and stopped on drop.
//!
//! Samba's LDAP ports are fixed, so every DC gets a loopback address 127.0.0.N of its own
//! (N in 20..=250), held with an exclusive lock on `$TMPDIR/writeback-testkit-ips/N.lock` for
//! the DC's lifetime: machine-wide, so concurrent test processes (nextest) and concurrent
//! checkouts never share one. The lock file names the DC directory that used the address last,
//! so a samba left behind by a killed test process is stopped by the next lessee.
//! Each realm is provisioned once per machine into `target/testkit/templates/<realm>` (guarded
//! by a cross-process lock, re-provisioned when `scripts/ad-dc.sh` changes) and copied per DC:
//! about 0.9 s instead of 8 s.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry, StdStream};

pub mod redis_dump;
mod topologies;
pub use topologies::{RedisCluster, RedisSentinel, TlsRedis};

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit has a parent directory")
        .to_owned()
}

/// `target/testkit`, where realm templates and DC copies live (IP locks are machine-wide).
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

/// A `redis-server` on a free loopback port, killed on drop. Without persistence by default;
/// [`RedisServer::start_durable`] runs it with an append-only file fsynced on every write, so
/// that a [`RedisServer::kill`] and [`RedisServer::restart`] keep every acknowledged write.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    durable: bool,
    /// More `redis-server` arguments (TLS, ACL users, replication).
    extra: Vec<String>,
    /// How `redis-cli` reaches it (`--tls --cacert … --user … --pass …`), for readiness.
    cli: Vec<String>,
}

impl RedisServer {
    /// Starts Redis and waits until it answers PING.
    ///
    /// # Errors
    /// When `redis-server` is missing or does not come up.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// Starts Redis with `appendonly yes` and `appendfsync always`: a kill -9 loses nothing it
    /// acknowledged.
    ///
    /// # Errors
    /// When `redis-server` is missing or does not come up.
    pub fn start_durable() -> anyhow::Result<Self> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> anyhow::Result<Self> {
        Self::start_custom(durable, |_| (Vec::new(), Vec::new()))
    }

    /// Starts Redis with more arguments, `args(port)` giving them and how `redis-cli` reaches
    /// the server (for readiness: it must answer PING that way).
    pub(crate) fn start_custom(
        durable: bool,
        args: impl Fn(u16) -> (Vec<String>, Vec<String>),
    ) -> anyhow::Result<Self> {
        let mut last = None;
        // A free port may be taken between probing and binding: try a few.
        for _ in 0..5 {
            let port = free_port()?;
            let (extra, cli) = args(port);
            let mut server = Self {
                child: None,
                port,
                dir: redis_dir()?,
                durable,
                extra,
                cli,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let persistence: &[&str] = if self.durable {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let tls = self.extra.iter().any(|a| a == "--tls-port");
        let port = if tls { 0 } else { self.port };
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"])
            .args(persistence)
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (run scripts/install-deps.sh)")?;
        self.child = Some(child);
        if self.wait_ready(Duration::from_secs(5)) {
            Ok(())
        } else {
            self.kill();
            bail!("redis-server on port {} did not answer PING", self.port)
        }
    }

    fn wait_ready(&mut self, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => {}
                _ => return false,
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the server (SIGKILL), as a crash would. Data is lost unless it is durable.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port after [`RedisServer::kill`]: empty, or with
    /// everything it acknowledged when durable.
    ///
    /// # Errors
    /// When it does not come up.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// A copy of a durable server's append-only files as they are now: what an operator's
    /// backup would hold.
    ///
    /// # Errors
    /// When the server is not durable or the files cannot be copied.
    pub fn snapshot(&self) -> anyhow::Result<RedisSnapshot> {
        if !self.durable {
            bail!("only a durable Redis has files to snapshot");
        }
        let dir = tempfile::tempdir()?;
        copy_files(&self.dir.path().join("appendonlydir"), dir.path())?;
        Ok(RedisSnapshot(dir))
    }

    /// Kills the server and starts it again on the same port from `snapshot`, as restoring a
    /// backup would: everything written since the snapshot is gone.
    ///
    /// # Errors
    /// When the files cannot be put back or the server does not come up.
    pub fn restore(&mut self, snapshot: &RedisSnapshot) -> anyhow::Result<()> {
        self.kill();
        let aof = self.dir.path().join("appendonlydir");
        std::fs::remove_dir_all(&aof).context("remove the append-only files")?;
        std::fs::create_dir(&aof)?;
        copy_files(snapshot.0.path(), &aof)?;
        self.spawn()
    }

    /// Whether the server answers PING.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && self.ping()
    }

    fn ping(&self) -> bool {
        if self.cli.is_empty() {
            return redis_ping(self.port);
        }
        redis_cli(self.port, &self.cli, &["PING"]).is_ok_and(|out| out.trim() == "PONG")
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid (0 after [`RedisServer::kill`]).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

/// See [`RedisServer::snapshot`].
pub struct RedisSnapshot(tempfile::TempDir);

fn copy_files(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))
            .with_context(|| format!("copy {}", entry.path().display()))?;
    }
    Ok(())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A working directory for one Redis server under `target/testkit/redis`: redis-server runs
/// there, which is how `scripts/check-leftovers.sh` recognises a server a test left behind.
fn redis_dir() -> anyhow::Result<tempfile::TempDir> {
    let root = state_dir().join("redis");
    fs::create_dir_all(&root)?;
    Ok(tempfile::Builder::new().prefix("redis-").tempdir_in(root)?)
}

/// `redis-cli -h 127.0.0.1 -p <port> <how> <args>`, bounded to 5 s; its output.
pub(crate) fn redis_cli(port: u16, how: &[String], args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("timeout")
        .args(["5", "redis-cli", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(how)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run redis-cli (run scripts/install-deps.sh)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "redis-cli -p {port} {}: {}{}",
            args.join(" "),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
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

/// Leases 127.0.0.N for the DC directory `owner(N)`: the first N whose lock is free and on
/// which nothing listens (after stopping the samba a crashed process left there).
fn lease_ip(owner: impl Fn(u8) -> PathBuf) -> anyhow::Result<IpLease> {
    // Machine-wide (not per checkout): two checkouts testing at once must not share an address.
    let dir = std::env::temp_dir().join("writeback-testkit-ips");
    fs::create_dir_all(&dir)?;
    for octet in 20u8..=250 {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(format!("{octet}.lock")))?;
        if file.try_lock().is_err() {
            continue;
        }
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let previous = previous.trim();
        if !previous.is_empty() {
            stop_stale(Path::new(previous));
        }
        if listening(octet, Duration::from_secs(2)) {
            tracing::warn!(
                octet,
                "127.0.0.{octet} is in use by a process testkit does not know; skipping it"
            );
            continue;
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", owner(octet).display())?;
        return Ok(IpLease { octet, _lock: file });
    }
    bail!("no free loopback address in 127.0.0.20-250")
}

/// Whether anything still accepts on 127.0.0.N's LDAP ports after waiting up to `grace`.
fn listening(octet: u8, grace: Duration) -> bool {
    let start = Instant::now();
    loop {
        let busy = [389u16, 636].iter().any(|port| {
            let addr = SocketAddr::from(([127, 0, 0, octet], *port));
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        if !busy || start.elapsed() >= grace {
            return busy;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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

/// Stops a samba left running from `dir` (the script checks that the pid is really that DC's).
fn stop_stale(dir: &Path) {
    if dir.join("run/samba.pid").exists() {
        let _ = run_script(&["--stop", &dir.to_string_lossy()]);
    }
}

/// FNV-1a of `scripts/ad-dc.sh`: a template made by another version of the script is redone.
fn script_hash() -> anyhow::Result<String> {
    let bytes = fs::read(script()).context("read scripts/ad-dc.sh")?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    Ok(format!("{h:016x}"))
}

/// Runs `f` on the realm's template (provisioned once per machine), holding a shared lock so
/// that nobody re-provisions it meanwhile.
fn with_template<T>(realm: &str, f: impl FnOnce(&Path) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let root = state_dir().join("templates");
    fs::create_dir_all(&root)?;
    let dir = root.join(realm);
    let lock_path = root.join(format!("{realm}.lock"));
    let stamp = dir.join(".script-hash");
    let hash = script_hash()?;
    let valid = || {
        dir.join(".seeded").exists() && fs::read_to_string(&stamp).is_ok_and(|h| h.trim() == hash)
    };
    loop {
        let lock = File::create(&lock_path)?;
        lock.lock_shared()?;
        if valid() {
            return f(&dir);
        }
        drop(lock);
        let lock = File::create(&lock_path)?;
        lock.lock()?;
        if !valid() {
            stop_stale(&dir);
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            let started = Instant::now();
            let lease = lease_ip(|_| dir.clone())?;
            let ip = format!("127.0.0.{}", lease.octet);
            let dir_s = dir.to_string_lossy().into_owned();
            let r = run_script(&[&dir_s, realm, &ip]);
            let _ = run_script(&["--stop", &dir_s]);
            r?;
            fs::write(&stamp, &hash)?;
            tracing::info!(realm, elapsed = ?started.elapsed(), "provisioned the template");
        }
        drop(lock);
    }
}

/// Runs `fut` to completion on a runtime of its own in a helper thread, so the synchronous
/// helpers below work both inside and outside async tests.
fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(fut)
        })
        .join()
        .expect("ldap helper thread")
    })
}

/// A new LDAPS connection to `ip`, verified against `tls`, with TCP_NODELAY.
async fn ldaps(ip: &str, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Ldap> {
    let timeout = Duration::from_secs(5);
    let addr: SocketAddr = format!("{ip}:636").parse()?;
    let tcp = TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_nodelay(true)?;
    let settings = LdapConnSettings::new()
        .set_config(tls)
        .set_conn_timeout(timeout)
        .set_std_stream(StdStream::Tcp(tcp));
    let (conn, ldap) = LdapConnAsync::with_settings(settings, &format!("ldaps://{ip}")).await?;
    ldap3::drive!(conn);
    Ok(ldap)
}

/// What a DC said about a set of credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Accepted,
    /// Rejected as invalid credentials, with the DC's text (`data 52e`, `775` locked, `773`
    /// must change).
    Rejected(String),
}

/// A Samba AD DC on a loopback address of its own, copied from the realm's template; stopped
/// on drop.
pub struct SambaDc {
    realm: String,
    dir: PathBuf,
    lease: IpLease,
}

impl SambaDc {
    /// Starts a DC for `realm` (e.g. `CORP.WRITEBACK.TEST`) from the realm's template, on a
    /// loopback address of its own, and waits until its rootDSE answers over verified LDAPS.
    ///
    /// # Errors
    /// When Samba is missing or does not come up.
    pub fn start(realm: &str) -> anyhow::Result<Self> {
        let realm = realm.to_ascii_uppercase();
        let dcs = state_dir().join("dcs");
        fs::create_dir_all(&dcs)?;
        let lease = lease_ip(|octet| dcs.join(octet.to_string()))?;
        let dir = dcs.join(lease.octet.to_string());
        stop_stale(&dir);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        // Built before samba starts, so that a failed start still stops it (drop).
        let dc = Self { realm, dir, lease };
        with_template(&dc.realm, |template| {
            run_script(&[
                "--template",
                &template.to_string_lossy(),
                &dc.dir.to_string_lossy(),
                &dc.realm,
                &dc.ip(),
            ])
        })?;
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

    /// The samba process's pid, from its pid file (it may have exited since).
    pub fn pid(&self) -> Option<u32> {
        fs::read_to_string(self.dir.join("run/samba.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
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

    /// Creates a user inside the OU `ou_rdn_path` relative to the domain root (e.g.
    /// `OU=Sales,OU=EMEA`, escaped as in a DN; it must exist); returns the user's DN.
    ///
    /// # Errors
    /// When samba-tool refuses.
    pub fn create_user_in(
        &self,
        sam: &str,
        password: &str,
        ou_rdn_path: &str,
    ) -> anyhow::Result<String> {
        self.samba_tool(&[
            "user",
            "create",
            sam,
            password,
            &format!("--userou={ou_rdn_path}"),
        ])?;
        Ok(format!("CN={sam},{ou_rdn_path},{}", self.base_dn()))
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

    /// A verifying TLS configuration trusting this DC's CA.
    fn tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        Ok(relay::tls::client_config_with_ca(&self.ca_file())?)
    }

    /// The rootDSE's `defaultNamingContext`, read anonymously over LDAPS verified with
    /// [`SambaDc::ca_file`].
    ///
    /// # Errors
    /// When the DC does not answer or its certificate does not verify.
    pub fn naming_context(&self) -> anyhow::Result<String> {
        let tls = self.tls()?;
        let ip = self.ip();
        block_on(async move {
            let mut ldap = ldaps(&ip, tls).await?;
            let (entries, _) = ldap
                .search(
                    "",
                    Scope::Base,
                    "(objectClass=*)",
                    vec!["defaultNamingContext"],
                )
                .await?
                .success()?;
            let _ = ldap.unbind().await;
            entries
                .into_iter()
                .next()
                .map(SearchEntry::construct)
                .and_then(|e| e.attrs.get("defaultNamingContext")?.first().cloned())
                .context("rootDSE without defaultNamingContext")
        })
    }

    /// A simple bind of `user` (UPN or DN) over verified LDAPS: the LDAP result code and the
    /// DC's diagnostic text (e.g. `… data 775` for a locked account, `data 773` for one that
    /// must change its password).
    ///
    /// # Errors
    /// When the DC cannot be reached.
    pub fn try_bind(&self, user: &str, password: &str) -> anyhow::Result<(u32, String)> {
        let tls = self.tls()?;
        let ip = self.ip();
        block_on(async move {
            let mut ldap = ldaps(&ip, tls).await?;
            let r = ldap.simple_bind(user, password).await?;
            let _ = ldap.unbind().await;
            Ok((r.rc, r.text))
        })
    }

    /// What the DC says to a simple bind of `user` (UPN or DN) with `password`.
    ///
    /// # Errors
    /// When the answer is not about the credentials: the DC cannot be reached, TLS fails, or it
    /// answers with another result than success or invalidCredentials (49).
    pub fn bind(&self, user: &str, password: &str) -> anyhow::Result<Bind> {
        if password.is_empty() {
            // An empty password is an unauthenticated bind, which succeeds: no proof of anything.
            bail!("a bind with an empty password proves nothing");
        }
        let (rc, text) = self
            .try_bind(user, password)
            .with_context(|| format!("bind of {user} at {}", self.ip()))?;
        match rc {
            0 => Ok(Bind::Accepted),
            49 => Ok(Bind::Rejected(text)),
            _ => bail!(
                "bind of {user} at {}: result {rc} ({text}), not about the credentials",
                self.ip()
            ),
        }
    }

    /// Whether `user` (UPN or DN) can bind with `password` over verified LDAPS: `true` when the
    /// DC accepts it, `false` when it rejects the credentials.
    ///
    /// # Panics
    /// When the DC gives no answer about the credentials (see [`SambaDc::bind`]), so that a
    /// negative check cannot pass because the DC is down or TLS failed.
    pub fn can_bind(&self, user: &str, password: &str) -> bool {
        match self.bind(user, password) {
            Ok(Bind::Accepted) => true,
            Ok(Bind::Rejected(_)) => false,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// What the KDC says to `kinit principal` with `password` (KRB5_CONFIG of this DC).
    ///
    /// # Errors
    /// When the answer is not about the credentials: kinit is missing, the KDC cannot be reached,
    /// the principal is unknown, or kinit does not finish within 20 s.
    pub fn try_kinit(&self, principal: &str, password: &str) -> anyhow::Result<Bind> {
        let cache = self.dir.join(format!("krb5cc_{}", std::process::id()));
        let mut child = Command::new("kinit")
            .env("KRB5_CONFIG", self.krb5_conf())
            .env("KRB5CCNAME", format!("FILE:{}", cache.display()))
            .arg(principal)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run kinit (run scripts/install-deps.sh)")?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = writeln!(stdin, "{password}");
        }
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("kinit {principal} did not finish within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let _ = fs::remove_file(cache);
        if status.success() {
            return Ok(Bind::Accepted);
        }
        // MIT kinit's words for a KDC that rejected the password (or a locked account).
        let rejected = ["Password incorrect", "Preauthentication failed", "revoked"];
        if rejected.iter().any(|r| stderr.contains(r)) {
            return Ok(Bind::Rejected(stderr.trim().to_owned()));
        }
        bail!(
            "kinit {principal} failed for another reason than credentials: {}",
            stderr.trim()
        )
    }

    /// Whether `principal` gets a Kerberos ticket with `password`.
    ///
    /// # Panics
    /// When the KDC gives no answer about the credentials (see [`SambaDc::try_kinit`]).
    pub fn kinit(&self, principal: &str, password: &str) -> bool {
        match self.try_kinit(principal, password) {
            Ok(Bind::Accepted) => true,
            Ok(Bind::Rejected(_)) => false,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// How many times AD has written `attr` of `dn` (`unicodePwd`, `pwdLastSet`,
    /// `lockoutTime`): the attribute's version in `replPropertyMetaData`, 0 when never written.
    /// AD counts every originating write, so this is the ground truth for "applied once".
    ///
    /// # Errors
    /// When the object cannot be read or the metadata is malformed.
    pub fn write_count(&self, dn: &str, attr: &str) -> anyhow::Result<u32> {
        let attid = match attr.to_ascii_lowercase().as_str() {
            "unicodepwd" => relay::ad::ATTID_UNICODE_PWD,
            "pwdlastset" => relay::ad::ATTID_PWD_LAST_SET,
            "lockouttime" => relay::ad::ATTID_LOCKOUT_TIME,
            other => bail!("no attribute id known for {other}"),
        };
        let blob = self
            .binary_attribute(dn, "replPropertyMetaData")?
            .with_context(|| format!("{dn} has no replPropertyMetaData"))?;
        relay::ad::meta_version(&blob, attid)
            .with_context(|| format!("replPropertyMetaData of {dn}"))
            .map(Option::unwrap_or_default)
    }

    /// How many times AD has written the password of `dn` (see [`SambaDc::write_count`]).
    ///
    /// # Errors
    /// As [`SambaDc::write_count`].
    pub fn password_writes(&self, dn: &str) -> anyhow::Result<u32> {
        self.write_count(dn, "unicodePwd")
    }

    /// The DN of the account with sAMAccountName `sam`.
    ///
    /// # Errors
    /// When there is no such account.
    pub fn dn_of(&self, sam: &str) -> anyhow::Result<String> {
        let out = self.samba_tool(&["user", "show", sam, "--attributes=sAMAccountName"])?;
        out.lines()
            .find_map(|l| l.strip_prefix("dn: ").map(|d| d.trim().to_owned()))
            .context("no dn in samba-tool output")
    }

    /// The raw value of a binary attribute of `dn`, read as Administrator.
    ///
    /// # Errors
    /// When the search fails.
    pub fn binary_attribute(&self, dn: &str, attr: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let tls = self.tls()?;
        let (ip, admin) = (self.ip(), self.admin_dn());
        let (dn, attr) = (dn.to_owned(), attr.to_owned());
        block_on(async move {
            let mut ldap = ldaps(&ip, tls).await?;
            ldap.simple_bind(&admin, ADMIN_PASSWORD).await?.success()?;
            let (entries, _) = ldap
                .search(&dn, Scope::Base, "(objectClass=*)", vec![attr.as_str()])
                .await?
                .success()
                .with_context(|| format!("read {attr} of {dn}"))?;
            let _ = ldap.unbind().await;
            Ok(entries
                .into_iter()
                .next()
                .map(SearchEntry::construct)
                .and_then(|e| {
                    e.bin_attrs
                        .into_iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(&attr))
                        .and_then(|(_, mut v)| v.pop())
                }))
        })
    }

    /// The values of attribute `attr` of `dn`, read as Administrator over verified LDAPS
    /// (binary values converted lossily to text).
    ///
    /// # Errors
    /// When the search fails (e.g. no such object).
    pub fn attributes(&self, dn: &str, attr: &str) -> anyhow::Result<Vec<String>> {
        let tls = self.tls()?;
        let (ip, admin) = (self.ip(), self.admin_dn());
        block_on(async move {
            let mut ldap = ldaps(&ip, tls).await?;
            ldap.simple_bind(&admin, ADMIN_PASSWORD).await?.success()?;
            let (entries, _) = ldap
                .search(dn, Scope::Base, "(objectClass=*)", vec![attr])
                .await?
                .success()
                .with_context(|| format!("read {attr} of {dn}"))?;
            let _ = ldap.unbind().await;
            let Some(e) = entries.into_iter().next().map(SearchEntry::construct) else {
                return Ok(Vec::new());
            };
            // The DC spells the attribute its own way (e.g. pwdLastSet for pwdlastset).
            let text = e
                .attrs
                .into_iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(attr))
                .map(|(_, v)| v);
            let binary = e
                .bin_attrs
                .into_iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(attr))
                .map(|(_, v)| {
                    v.iter()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .collect()
                });
            Ok(text.or(binary).unwrap_or_default())
        })
    }

    /// The first value of attribute `attr` of `dn`, read as Administrator.
    ///
    /// # Errors
    /// When the search fails (e.g. no such object).
    pub fn attribute(&self, dn: &str, attr: &str) -> anyhow::Result<Option<String>> {
        Ok(self.attributes(dn, attr)?.into_iter().next())
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
            self.bind(user_upn, "Definitely-Wrong#0")?;
        }
        Ok(())
    }
}

impl Drop for SambaDc {
    fn drop(&mut self) {
        self.stop();
    }
}
