//! Redis as production runs it: a TLS server with an ACL user ([`TlsRedis`]), a Redis Cluster
//! of masters with replicas ([`RedisCluster`]) and a master with a replica watched by Redis
//! Sentinel ([`RedisSentinel`]), all on free loopback ports, every process in a directory under
//! `target/testkit/redis` (so `scripts/check-leftovers.sh` sees one left behind) and killed on
//! drop. Every wait is bounded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{free_port, redis_cli, redis_dir, RedisServer, TestCa};

/// Polls `check` every 50 ms until it gives `Some`, for at most `within`.
fn wait_for<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `field:value` lines of an `INFO` or `CLUSTER INFO` reply.
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{field}:")))
        .map(str::to_owned)
}

/// A Redis server speaking only TLS (certificate of a [`TestCa`] for 127.0.0.1), with the
/// default user disabled and one ACL user allowed everything.
pub struct TlsRedis {
    pub server: RedisServer,
    pub ca: TestCa,
    pub user: String,
    pub password: String,
}

impl TlsRedis {
    /// # Errors
    /// When `redis-server` (built with TLS) is missing or does not come up.
    pub fn start(user: &str, password: &str) -> anyhow::Result<Self> {
        let ca = TestCa::new(&["127.0.0.1", "localhost"])?;
        let (cert, key, cafile) = (
            ca.cert_file().display().to_string(),
            ca.key_file().display().to_string(),
            ca.ca_file().display().to_string(),
        );
        let server = RedisServer::start_custom(false, |port| {
            let mut args: Vec<String> = vec![
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                cert.clone(),
                "--tls-key-file".into(),
                key.clone(),
                "--tls-ca-cert-file".into(),
                cafile.clone(),
                "--tls-auth-clients".into(),
                "no".into(),
            ];
            args.extend(acl_args(user, password));
            (args, tls_cli(&ca, user, password))
        })?;
        Ok(Self {
            server,
            ca,
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// `rediss://<user>@127.0.0.1:<port>` (no password: give it in a file).
    pub fn url(&self) -> String {
        format!("rediss://{}@127.0.0.1:{}", self.user, self.server.port())
    }
}

/// How `redis-cli` reaches a TLS server of `ca` as `user`.
fn tls_cli(ca: &TestCa, user: &str, password: &str) -> Vec<String> {
    vec![
        "--tls".into(),
        "--cacert".into(),
        ca.ca_file().display().to_string(),
        "--user".into(),
        user.into(),
        "--pass".into(),
        password.into(),
        "--no-auth-warning".into(),
    ]
}

/// Arguments that disable the default user and add `user` with every right.
fn acl_args(user: &str, password: &str) -> Vec<String> {
    vec![
        "--user".into(),
        "default".into(),
        "off".into(),
        "--user".into(),
        user.into(),
        "on".into(),
        format!(">{password}"),
        "~*".into(),
        "&*".into(),
        "+@all".into(),
    ]
}

/// One node of a [`RedisCluster`].
struct Node {
    port: u16,
    bus: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    /// `tls`: the TLS and ACL arguments (then the plain port is off) and how `redis-cli`
    /// reaches the node.
    fn spawn(&mut self, tls: Option<(&[String], &[String])>) -> anyhow::Result<()> {
        let (extra, how): (Vec<String>, &[String]) = match tls {
            Some((args, how)) => {
                let mut a = vec!["--port".into(), "0".into(), "--tls-port".into()];
                a.push(self.port.to_string());
                a.extend(args.iter().cloned());
                (a, how)
            }
            None => (vec!["--port".into(), self.port.to_string()], &[]),
        };
        let child = Command::new("redis-server")
            .args(&extra)
            .args(["--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-port", &self.bus.to_string()])
            .args(["--cluster-node-timeout", "2000"])
            // A replica may take over however long it was cut off from its master.
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--save", "", "--protected-mode", "no"])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (run scripts/install-deps.sh)")?;
        self.child = Some(child);
        let port = self.port;
        wait_for("cluster node answers PING", Duration::from_secs(5), || {
            redis_cli(port, how, &["PING"])
                .ok()
                .filter(|o| o.trim() == "PONG")
        })?;
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
    master_id: String,
    has_slots: bool,
}

fn parse_nodes(out: &str) -> Vec<NodeLine> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            Some(NodeLine {
                id: f[0].to_owned(),
                port,
                master: f[2].contains("master"),
                failed: f[2].contains("fail"),
                master_id: f[3].to_owned(),
                has_slots: f.len() > 8,
            })
        })
        .collect()
}

/// A Redis Cluster on loopback: `masters` masters with `replicas_per_master` replicas each,
/// durable (append-only, fsynced), node timeout 2 s (so a loaded test machine does not fail a
/// node over by itself).
pub struct RedisCluster {
    nodes: Vec<Node>,
    /// With TLS: the test CA, the ACL user and password, the nodes' TLS and ACL arguments and
    /// how `redis-cli` reaches them.
    tls: Option<ClusterTls>,
}

struct ClusterTls {
    ca: TestCa,
    user: String,
    args: Vec<String>,
    how: Vec<String>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster (`redis-cli --cluster create`) and waits until
    /// every node says the cluster is ok and every replica is in sync.
    ///
    /// # Errors
    /// When a node does not come up or the cluster does not form.
    pub fn start(masters: usize, replicas_per_master: usize) -> anyhow::Result<Self> {
        Self::start_with(masters, replicas_per_master, None)
    }

    /// The same over TLS only (client, bus and replication links; certificate of a new
    /// [`TestCa`] for 127.0.0.1), with the default user disabled and ACL user `user`, which
    /// replicas use to reach their masters too.
    ///
    /// # Errors
    /// As [`RedisCluster::start`].
    pub fn start_tls(
        masters: usize,
        replicas_per_master: usize,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let ca = TestCa::new(&["127.0.0.1", "localhost"])?;
        let mut args: Vec<String> = [
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
            "--tls-auth-clients",
            "no",
            "--masteruser",
            user,
            "--masterauth",
            password,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for (flag, file) in [
            ("--tls-cert-file", ca.cert_file()),
            ("--tls-key-file", ca.key_file()),
            ("--tls-ca-cert-file", ca.ca_file()),
        ] {
            args.push(flag.into());
            args.push(file.display().to_string());
        }
        args.extend(acl_args(user, password));
        let how = tls_cli(&ca, user, password);
        Self::start_with(
            masters,
            replicas_per_master,
            Some(ClusterTls {
                ca,
                user: user.to_owned(),
                args,
                how,
            }),
        )
    }

    /// The test CA of a TLS cluster.
    pub fn ca(&self) -> Option<&TestCa> {
        self.tls.as_ref().map(|t| &t.ca)
    }

    fn how(&self) -> Vec<String> {
        self.tls.as_ref().map(|t| t.how.clone()).unwrap_or_default()
    }

    fn cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        redis_cli(port, &self.how(), args)
    }

    fn spawn_node(&mut self, i: usize) -> anyhow::Result<()> {
        let tls = self
            .tls
            .as_ref()
            .map(|t| (t.args.as_slice(), t.how.as_slice()));
        self.nodes[i].spawn(tls)
    }

    fn start_with(
        masters: usize,
        replicas_per_master: usize,
        tls: Option<ClusterTls>,
    ) -> anyhow::Result<Self> {
        let mut cluster = Self {
            nodes: Vec::new(),
            tls,
        };
        for i in 0..masters * (1 + replicas_per_master) {
            cluster.nodes.push(Node {
                port: free_port()?,
                bus: free_port()?,
                dir: redis_dir()?,
                child: None,
            });
            cluster.spawn_node(i)?;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("timeout")
            .arg("30")
            .arg("redis-cli")
            .args(cluster.how())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .context("redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        cluster.wait_healthy(masters, Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// `redis+cluster://127.0.0.1:<port>,…` with every node as a seed
    /// (`rediss+cluster://<user>@…` with TLS; the password is not in it).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        match &self.tls {
            Some(t) => format!("rediss+cluster://{}@{}", t.user, seeds.join(",")),
            None => format!("redis+cluster://{}", seeds.join(",")),
        }
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// The cluster as a live node sees it.
    fn view(&self) -> anyhow::Result<Vec<NodeLine>> {
        let mut last = None;
        for port in self.live_ports() {
            match self.cli(port, &["CLUSTER", "NODES"]) {
                Ok(out) => return Ok(parse_nodes(&out)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no live node")))
    }

    /// Ports of the masters serving slots (not failed).
    ///
    /// # Errors
    /// When no node answers.
    pub fn masters(&self) -> anyhow::Result<Vec<u16>> {
        let mut m: Vec<u16> = self
            .view()?
            .into_iter()
            .filter(|n| n.master && !n.failed && n.has_slots)
            .map(|n| n.port)
            .collect();
        m.sort_unstable();
        Ok(m)
    }

    /// The port of a live replica of the master on `master`.
    ///
    /// # Errors
    /// When no node answers or the master has no live replica.
    pub fn replica_of(&self, master: u16) -> anyhow::Result<u16> {
        let view = self.view()?;
        let id = view
            .iter()
            .find(|n| n.port == master)
            .map(|n| n.id.clone())
            .context("no such master")?;
        view.iter()
            .find(|n| !n.master && !n.failed && n.master_id == id)
            .map(|n| n.port)
            .with_context(|| format!("master {master} has no live replica"))
    }

    /// Keys matching `pattern` on the node at `port` (`SCAN`).
    ///
    /// # Errors
    /// When the node does not answer.
    pub fn keys_on(&self, port: u16, pattern: &str) -> anyhow::Result<usize> {
        let out = self.cli(port, &["--scan", "--pattern", pattern])?;
        Ok(out.lines().filter(|l| !l.is_empty()).count())
    }

    /// A manual failover: `CLUSTER FAILOVER` on a replica of `master`, which becomes master
    /// (nothing acknowledged is lost: the replica catches up first). Returns the new master.
    ///
    /// # Errors
    /// When it does not complete within 15 s.
    pub fn failover(&self, master: u16) -> anyhow::Result<u16> {
        let replica = self.replica_of(master)?;
        let out = self.cli(replica, &["CLUSTER", "FAILOVER"])?;
        if !out.contains("OK") {
            bail!("CLUSTER FAILOVER on {replica}: {out}");
        }
        self.wait_took_over(replica, Duration::from_secs(15))
    }

    /// Kills the node at `port` with SIGKILL, as a crash would.
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.kill();
        }
    }

    /// Kills the master at `master` with SIGKILL and waits until its replica took over and
    /// the cluster is ok again. Returns the new master.
    ///
    /// # Errors
    /// When no replica takes over within 20 s.
    pub fn kill_master(&mut self, master: u16) -> anyhow::Result<u16> {
        let replica = self.replica_of(master)?;
        self.kill(master);
        self.wait_took_over(replica, Duration::from_secs(20))
    }

    /// Starts a killed node again (same port and files): it rejoins as a replica of the node
    /// that took over. Waits until it is in sync.
    ///
    /// # Errors
    /// When it does not come back in sync within 20 s.
    pub fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .context("no such node")?;
        self.nodes[i].kill();
        self.spawn_node(i)?;
        wait_for("the restarted node syncs", Duration::from_secs(20), || {
            let info = self.cli(port, &["INFO", "replication"]).ok()?;
            (info_field(&info, "role").as_deref() == Some("slave")
                && info_field(&info, "master_link_status").as_deref() == Some("up"))
            .then_some(())
        })?;
        self.wait_ok(Duration::from_secs(20))
    }

    /// Waits until `replica` says it is master and the cluster is ok; returns it.
    fn wait_took_over(&self, replica: u16, within: Duration) -> anyhow::Result<u16> {
        wait_for("the replica takes over", within, || {
            self.cli(replica, &["ROLE"])
                .ok()
                .filter(|r| r.starts_with("master"))
        })?;
        self.wait_ok(within)?;
        Ok(replica)
    }

    /// Every live node says `cluster_state:ok`.
    fn wait_ok(&self, within: Duration) -> anyhow::Result<()> {
        wait_for("cluster_state:ok on every live node", within, || {
            self.live_ports()
                .iter()
                .all(|p| {
                    self.cli(*p, &["CLUSTER", "INFO"])
                        .is_ok_and(|i| info_field(&i, "cluster_state").as_deref() == Some("ok"))
                })
                .then_some(())
        })
    }

    fn wait_healthy(&self, masters: usize, within: Duration) -> anyhow::Result<()> {
        self.wait_ok(within)?;
        wait_for("every node known and every replica in sync", within, || {
            let all_known = self.live_ports().iter().all(|p| {
                self.cli(*p, &["CLUSTER", "NODES"])
                    .is_ok_and(|o| parse_nodes(&o).len() == self.nodes.len())
            });
            let synced = self.live_ports().iter().all(|p| {
                let Ok(info) = self.cli(*p, &["INFO", "replication"]) else {
                    return false;
                };
                info_field(&info, "role").as_deref() == Some("master")
                    || info_field(&info, "master_link_status").as_deref() == Some("up")
            });
            (all_known && synced && self.masters().is_ok_and(|m| m.len() == masters)).then_some(())
        })
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// The master name every [`RedisSentinel`] monitors.
pub const SENTINEL_MASTER: &str = "wbmaster";

/// A master and one replica (both durable) watched by `sentinels` Redis Sentinels (quorum: a
/// majority), which fail over 1 s after the master stops answering.
pub struct RedisSentinel {
    servers: Vec<RedisServer>,
    sentinels: Vec<(u16, Child, tempfile::TempDir)>,
    tls: Option<SentinelTls>,
}

struct SentinelTls {
    ca: TestCa,
    user: String,
    /// How `redis-cli` reaches the data nodes (TLS, as the user) and the sentinels (TLS).
    data: Vec<String>,
    sentinel: Vec<String>,
}

impl RedisSentinel {
    /// # Errors
    /// When a process does not come up, or the sentinels do not see each other and the
    /// replica within 20 s.
    pub fn start(sentinels: usize) -> anyhow::Result<Self> {
        Self::start_with(sentinels, None)
    }

    /// The same over TLS only (data nodes, replication and sentinels; certificate of a new
    /// [`TestCa`] for 127.0.0.1), the data nodes with the default user disabled and ACL user
    /// `user`, which replicas and sentinels log in as; the sentinels take no credentials.
    ///
    /// # Errors
    /// As [`RedisSentinel::start`].
    pub fn start_tls(sentinels: usize, user: &str, password: &str) -> anyhow::Result<Self> {
        let ca = TestCa::new(&["127.0.0.1", "localhost"])?;
        let files = format!(
            "tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n",
            ca.cert_file().display(),
            ca.key_file().display(),
            ca.ca_file().display()
        );
        let tls = SentinelTls {
            data: tls_cli(&ca, user, password),
            sentinel: vec![
                "--tls".into(),
                "--cacert".into(),
                ca.ca_file().display().to_string(),
            ],
            ca,
            user: user.to_owned(),
        };
        Self::start_with(sentinels, Some((tls, files, password.to_owned())))
    }

    /// The test CA of a TLS setup.
    pub fn ca(&self) -> Option<&TestCa> {
        self.tls.as_ref().map(|t| &t.ca)
    }

    fn data_cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        let how = self
            .tls
            .as_ref()
            .map(|t| t.data.clone())
            .unwrap_or_default();
        redis_cli(port, &how, args)
    }

    fn sentinel_cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        let how = self
            .tls
            .as_ref()
            .map(|t| t.sentinel.clone())
            .unwrap_or_default();
        redis_cli(port, &how, args)
    }

    /// `tls`: the TLS settings, the TLS file lines of a config, and the user's password.
    fn start_with(
        sentinels: usize,
        tls: Option<(SentinelTls, String, String)>,
    ) -> anyhow::Result<Self> {
        let data_args = |replica_of: Option<u16>| -> (Vec<String>, Vec<String>) {
            let mut args = Vec::new();
            if let Some(m) = replica_of {
                args.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
            }
            let Some((t, _, password)) = &tls else {
                return (args, Vec::new());
            };
            for (flag, file) in [
                ("--tls-cert-file", t.ca.cert_file()),
                ("--tls-key-file", t.ca.key_file()),
                ("--tls-ca-cert-file", t.ca.ca_file()),
            ] {
                args.push(flag.into());
                args.push(file.display().to_string());
            }
            for a in [
                "--tls-replication",
                "yes",
                "--tls-auth-clients",
                "no",
                "--masteruser",
                &t.user,
                "--masterauth",
                password,
            ] {
                args.push(a.to_owned());
            }
            args.extend(acl_args(&t.user, password));
            (args, t.data.clone())
        };
        let with_port = |replica_of: Option<u16>| {
            let tls_on = tls.is_some();
            move |port: u16| {
                let (mut args, how) = data_args(replica_of);
                if tls_on {
                    args.extend(["--tls-port".into(), port.to_string()]);
                }
                (args, how)
            }
        };
        let master = RedisServer::start_custom(true, with_port(None))?;
        let mport = master.port();
        let replica = RedisServer::start_custom(true, with_port(Some(mport)))?;
        let (tls, sentinel_tls) = match tls {
            Some((t, files, password)) => {
                let conf = (
                    format!("port 0\ntls-replication yes\ntls-auth-clients no\n{files}"),
                    format!(
                        "sentinel auth-user {SENTINEL_MASTER} {}\n\
                         sentinel auth-pass {SENTINEL_MASTER} {password}\n",
                        t.user
                    ),
                );
                (Some(t), conf)
            }
            None => (None, (String::new(), String::new())),
        };
        let mut me = Self {
            servers: vec![master, replica],
            sentinels: Vec::new(),
            tls,
        };
        let quorum = sentinels / 2 + 1;
        for _ in 0..sentinels {
            let port = free_port()?;
            let dir = redis_dir()?;
            let conf: PathBuf = dir.path().join("sentinel.conf");
            let (listen, auth) = if me.tls.is_some() {
                (
                    format!("tls-port {port}\n{}", sentinel_tls.0),
                    &sentinel_tls.1,
                )
            } else {
                (format!("port {port}\n"), &sentinel_tls.1)
            };
            std::fs::write(
                &conf,
                format!(
                    "{listen}bind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {mport} {quorum}\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n{auth}",
                    dir = dir.path().display()
                ),
            )?;
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start redis-sentinel (run scripts/install-deps.sh)")?;
            me.sentinels.push((port, child, dir));
        }
        let others = sentinels - 1;
        wait_for(
            "every sentinel sees the replica and the other sentinels",
            Duration::from_secs(20),
            || {
                me.sentinels
                    .iter()
                    .all(|(port, _, _)| {
                        let m = me.sentinel_master(*port).unwrap_or_default();
                        m.get("num-slaves").map(String::as_str) == Some("1")
                            && m.get("num-other-sentinels") == Some(&others.to_string())
                    })
                    .then_some(())
            },
        )?;
        wait_for("the replica is in sync", Duration::from_secs(10), || {
            let info = me
                .data_cli(me.servers[1].port(), &["INFO", "replication"])
                .ok()?;
            (info_field(&info, "master_link_status").as_deref() == Some("up")).then_some(())
        })?;
        Ok(me)
    }

    /// `redis+sentinel://127.0.0.1:<port>,…/wbmaster` (`rediss+sentinel://<user>@…` with
    /// TLS; the password is not in it).
    pub fn url(&self) -> String {
        let s: Vec<String> = self
            .sentinels
            .iter()
            .map(|(p, _, _)| format!("127.0.0.1:{p}"))
            .collect();
        match &self.tls {
            Some(t) => format!(
                "rediss+sentinel://{}@{}/{SENTINEL_MASTER}",
                t.user,
                s.join(",")
            ),
            None => format!("redis+sentinel://{}/{SENTINEL_MASTER}", s.join(",")),
        }
    }

    /// The master's port as the first answering sentinel names it.
    ///
    /// # Errors
    /// When no sentinel answers.
    pub fn master_port(&self) -> anyhow::Result<u16> {
        for (port, _, _) in &self.sentinels {
            if let Ok(out) = self.sentinel_cli(
                *port,
                &["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER],
            ) {
                if let Some(p) = out.lines().nth(1).and_then(|p| p.trim().parse().ok()) {
                    return Ok(p);
                }
            }
        }
        bail!("no sentinel names the master")
    }

    fn server(&mut self, port: u16) -> anyhow::Result<&mut RedisServer> {
        self.servers
            .iter_mut()
            .find(|s| s.port() == port)
            .context("no such server")
    }

    /// Kills the master with SIGKILL and waits until the sentinels promoted the replica and it
    /// says it is master. Returns (old master, new master).
    ///
    /// # Errors
    /// When no failover happens within 20 s.
    pub fn kill_master(&mut self) -> anyhow::Result<(u16, u16)> {
        let old = self.master_port()?;
        self.server(old)?.kill();
        let new = wait_for(
            "the sentinels promote the replica",
            Duration::from_secs(20),
            || self.master_port().ok().filter(|p| *p != old),
        )?;
        wait_for("the new master says so", Duration::from_secs(10), || {
            self.data_cli(new, &["ROLE"])
                .ok()
                .filter(|r| r.starts_with("master"))
        })?;
        Ok((old, new))
    }

    /// Starts a killed server again; the sentinels make it a replica of the master; waits
    /// until it is in sync.
    ///
    /// Sentinel reconfigures a returned master only after it has been up and reporting the
    /// wrong role for 8 s (4 publish periods, fixed in Sentinel's source), and it asks a replica
    /// for INFO every 10 s: 10 to 20 s on an idle machine, more on a busy one. Hence 60 s.
    ///
    /// # Errors
    /// When it is not in sync within 60 s.
    pub fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        self.server(port)?.restart()?;
        wait_for(
            "the old master rejoins as a replica",
            Duration::from_secs(60),
            || {
                let info = self.data_cli(port, &["INFO", "replication"]).ok()?;
                (info_field(&info, "role").as_deref() == Some("slave")
                    && info_field(&info, "master_link_status").as_deref() == Some("up"))
                .then_some(())
            },
        )
    }

    /// `SENTINEL MASTER <name>` as field → value.
    fn sentinel_master(&self, port: u16) -> anyhow::Result<HashMap<String, String>> {
        let out = self.sentinel_cli(port, &["SENTINEL", "MASTER", SENTINEL_MASTER])?;
        let lines: Vec<&str> = out.lines().collect();
        Ok(lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].trim().to_owned(), c[1].trim().to_owned()))
            .collect())
    }

    /// The directory of the server on `port` (where its append-only files are).
    pub fn dir_of(&self, port: u16) -> Option<&Path> {
        self.servers
            .iter()
            .find(|s| s.port() == port)
            .map(RedisServer::dir)
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
