//! How the store reaches Redis: one server, a Redis Cluster, or the master that Redis Sentinel
//! names, over plain TCP or TLS (rustls with ring), as an ACL user. Chosen by the form of the
//! one `--redis-url`:
//!
//! | URL | what |
//! | --- | --- |
//! | `redis://[user[:pass]@]host:port[/db]` | one server (also `redis+unix://…`, as the redis crate parses it) |
//! | `rediss://…` | the same over TLS |
//! | `redis+cluster://[user[:pass]@]host:port,host:port,…` | Redis Cluster, from these seed nodes |
//! | `rediss+cluster://…` | the same over TLS (`tls-cluster yes` on the nodes) |
//! | `redis+sentinel://[user[:pass]@]host:port,host:port,…/<master name>` | the master Sentinel names; the sentinels are reached without credentials |
//! | `rediss+sentinel://…` | the same over TLS, to sentinels and data nodes alike |
//!
//! The password is better given in a private file (`--redis-password-file`) than in the URL;
//! TLS trusts `--redis-ca-file` only when it is given (else the system's roots), and presents
//! `--redis-client-cert`/`--redis-client-key` for mutual TLS.
//!
//! Everything above the store sees one [`Conn`] (a `redis::aio::ConnectionLike`), whatever the
//! kind. Blocking stream reads get a dedicated connection each ([`Backend::blocking`]); pub/sub
//! is a plain connection to one node ([`Backend::pubsub`]): in a cluster `PUBLISH` reaches every
//! node, so subscribing on any one of them hears every message, and a subscriber whose node dies
//! subscribes again on the next one. (redis 1.x can also subscribe on a cluster connection, over
//! RESP3 pushes to a `push_sender`; a plain connection keeps `Store::subscribe` the
//! `redis::aio::PubSub` its callers read, works over RESP2, and their reconnect loops already
//! subscribe again.) Cross-slot: the crate's cluster client sends a pipeline to the node of its
//! first key and does not split it, so no pipeline or transaction here spans two slots.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ClientTlsConfig, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};

use relay::secret::Secret;

use super::{Result, StoreError};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may wait for its reply (a `WAIT` for replicas included).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a lifecycle write waits for its replicas ([`RedisOptions::replica_acks`]).
pub const REPLICA_ACK_TIMEOUT: Duration = Duration::from_millis(1500);

/// What `--redis-url` leaves out: TLS files, the password file, and how many replicas must
/// have each lifecycle write before it counts.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// PEM CA(s) that signed the Redis servers' certificates (a private CA); without it TLS
    /// trusts the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (a secret file: must be private).
    pub client_key: Option<PathBuf>,
    /// File holding the ACL user's password (must be private); the user is the URL's.
    pub password_file: Option<PathBuf>,
    /// Replicas that must acknowledge every lifecycle script's write (Redis `WAIT`) before the
    /// store reports it done; 0 does not wait. With 1, a master killed right after a write
    /// loses nothing its replica then promoted had confirmed.
    pub replica_acks: u32,
}

/// The form of the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Topology {
    Single,
    Cluster,
    Sentinel { master: String },
}

/// A parsed `--redis-url` with the options applied.
struct Target {
    topology: Topology,
    tls: bool,
    /// The data node (single), seed nodes (cluster) or sentinels, with credentials applied
    /// (none for sentinels).
    nodes: Vec<ConnectionInfo>,
    username: Option<String>,
    password: Option<Secret>,
    certs: Option<TlsCertificates>,
    /// For errors: the nodes without credentials, e.g. `rediss://10.0.0.1:6379`.
    described: String,
}

fn config(detail: impl Into<String>) -> StoreError {
    StoreError::Config(detail.into())
}

/// Splits `user:pass@` off an authority, returning (userinfo, rest).
fn split_userinfo(authority: &str) -> (Option<&str>, &str) {
    match authority.rsplit_once('@') {
        Some((info, rest)) => (Some(info), rest),
        None => (None, authority),
    }
}

impl Target {
    fn parse(url: &str, opts: &RedisOptions) -> Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| config("--redis-url: not a URL (expected e.g. redis://host:6379)"))?;
        let (topology_word, tls) = match scheme {
            "redis" | "redis+unix" | "unix" => ("single", false),
            "rediss" => ("single", true),
            "redis+cluster" => ("cluster", false),
            "rediss+cluster" => ("cluster", true),
            "redis+sentinel" => ("sentinel", false),
            "rediss+sentinel" => ("sentinel", true),
            other => {
                return Err(config(format!(
                "--redis-url: unknown scheme {other:?}: use redis://, rediss:// (TLS), redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel://"
            )))
            }
        };
        let node_scheme = if tls { "rediss" } else { "redis" };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hosts) = split_userinfo(authority);
        let url_has_password = userinfo.is_some_and(|u| u.contains(':'));
        let password = match (&opts.password_file, url_has_password) {
            (Some(_), true) => {
                return Err(config(
                    "--redis-url holds a password and --redis-password-file is given too: give it in one place (the file)",
                ))
            }
            (Some(path), false) => Some(Secret::from_file(path).map_err(|e| {
                config(format!("--redis-password-file: {e}"))
            })?),
            (None, _) => None,
        };
        let mut nodes = Vec::new();
        let topology = if topology_word == "single" {
            if hosts.contains(',') {
                return Err(config(
                    "--redis-url: redis:// and rediss:// name one server; list cluster seed nodes with redis+cluster://h1:p1,h2:p2 or sentinels with redis+sentinel://h1:p1,h2:p2/<master>",
                ));
            }
            let info = url.into_connection_info().map_err(|e| {
                config(format!(
                    "--redis-url: not a valid redis URL ({})",
                    e.detail().unwrap_or("unparsable")
                ))
            })?;
            nodes.push(info);
            Topology::Single
        } else {
            let host_list: Vec<&str> = hosts.split(',').collect();
            if host_list.iter().any(|h| h.is_empty()) {
                return Err(config(format!(
                    "--redis-url: {scheme}:// needs host:port[,host:port…] (an empty host was given)"
                )));
            }
            for h in &host_list {
                check_host_port(h)?;
            }
            let topology = match topology_word {
                "cluster" => {
                    if !(path.is_empty() || path == "/") {
                        return Err(config(format!(
                            "--redis-url: {scheme}:// takes no path or query (a cluster has only database 0)"
                        )));
                    }
                    Topology::Cluster
                }
                _ => {
                    let master = path.trim_start_matches('/');
                    if master.is_empty() || master.contains(['/', '?']) {
                        return Err(config(format!(
                            "--redis-url: {scheme}:// needs the master's name as its path, e.g. {scheme}://s1:26379,s2:26379/mymaster"
                        )));
                    }
                    Topology::Sentinel {
                        master: master.to_owned(),
                    }
                }
            };
            // Each node as the redis crate's own URL, credentials included (cluster nodes
            // only: the sentinels are reached without them).
            let info_prefix = match (&topology, userinfo) {
                (Topology::Cluster, Some(u)) => format!("{u}@"),
                _ => String::new(),
            };
            for h in host_list {
                let node = format!("{node_scheme}://{info_prefix}{h}");
                nodes.push(node.as_str().into_connection_info().map_err(|e| {
                    config(format!(
                        "--redis-url: node {h:?} is not host:port ({})",
                        e.detail().unwrap_or("unparsable")
                    ))
                })?);
            }
            topology
        };
        // The ACL user (and a password, when given in the URL) as the crate parsed them.
        let (username, url_password) = match (&topology, userinfo) {
            (Topology::Sentinel { .. }, Some(u)) => {
                let parsed = format!("redis://{u}@localhost")
                    .as_str()
                    .into_connection_info()
                    .map_err(|_| config("--redis-url: the user:password part does not parse"))?;
                (
                    parsed.redis_settings().username().map(str::to_owned),
                    parsed.redis_settings().password().map(Secret::new),
                )
            }
            _ => (
                nodes[0].redis_settings().username().map(str::to_owned),
                nodes[0].redis_settings().password().map(Secret::new),
            ),
        };
        let password = password.or(url_password);
        if let Some(p) = &password {
            if p.expose().is_empty() {
                return Err(config(
                    "--redis-password-file: the file is empty (it must hold the ACL user's password)",
                ));
            }
            for n in &mut nodes {
                if topology == Topology::Single || topology == Topology::Cluster {
                    *n = n
                        .clone()
                        .set_redis_settings(n.redis_settings().clone().set_password(p.expose()));
                }
            }
        }
        if let (Some(user), Topology::Single | Topology::Cluster) = (&username, &topology) {
            for n in &mut nodes {
                *n = n
                    .clone()
                    .set_redis_settings(n.redis_settings().clone().set_username(user));
            }
        }
        let certs = tls_files(opts, tls)?;
        let described = nodes
            .iter()
            .map(|n| describe_addr(n.addr()))
            .collect::<Vec<_>>()
            .join(",");
        Ok(Self {
            topology,
            tls,
            nodes,
            username,
            password,
            certs,
            described,
        })
    }

    /// What this target is, for errors (never a credential).
    fn what(&self) -> String {
        match &self.topology {
            Topology::Single => format!("redis at {}", self.described),
            Topology::Cluster => format!("redis cluster (seed nodes {})", self.described),
            Topology::Sentinel { master } => {
                format!(
                    "the master {master:?} named by the sentinels {}",
                    self.described
                )
            }
        }
    }
}

fn check_host_port(h: &str) -> Result<()> {
    let (host, port) = h
        .rsplit_once(':')
        .ok_or_else(|| config(format!("--redis-url: node {h:?} has no port (host:port)")))?;
    if host.is_empty() {
        return Err(config(format!("--redis-url: node {h:?} has no host")));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            config(format!(
                "--redis-url: node {h:?}: port {port:?} is not a port number"
            ))
        })?;
    Ok(())
}

fn describe_addr(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(h, p) => format!("redis://{h}:{p}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}"),
        ConnectionAddr::Unix(p) => format!("unix:{}", p.display()),
        _ => "redis".to_owned(),
    }
}

/// The CA and client certificate files, read and checked; TLS files with a plain URL are an
/// error (they would silently do nothing).
fn tls_files(opts: &RedisOptions, tls: bool) -> Result<Option<TlsCertificates>> {
    let any = opts.ca_file.is_some() || opts.client_cert.is_some() || opts.client_key.is_some();
    if !tls {
        if any {
            return Err(config(
                "--redis-ca-file/--redis-client-cert/--redis-client-key are given but --redis-url is not TLS: use rediss:// (or rediss+cluster://, rediss+sentinel://)",
            ));
        }
        return Ok(None);
    }
    let root_cert = match &opts.ca_file {
        Some(path) => {
            relay::tls::read_certs(path).map_err(|e| config(format!("--redis-ca-file: {e}")))?;
            Some(relay::tls::read_pem(path).map_err(|e| config(format!("--redis-ca-file: {e}")))?)
        }
        None => None,
    };
    let client_tls =
        match (&opts.client_cert, &opts.client_key) {
            (Some(cert), Some(key)) => {
                relay::tls::read_certs(cert)
                    .map_err(|e| config(format!("--redis-client-cert: {e}")))?;
                relay::secret::check_private(key)
                    .map_err(|e| config(format!("--redis-client-key: {e}")))?;
                let key_pem = relay::tls::read_key_pem(key)
                    .map_err(|e| config(format!("--redis-client-key: {e}")))?;
                Some(ClientTlsConfig {
                    client_cert: relay::tls::read_pem(cert)
                        .map_err(|e| config(format!("--redis-client-cert: {e}")))?,
                    client_key: key_pem.to_vec(),
                })
            }
            (None, None) => None,
            _ => return Err(config(
                "--redis-client-cert and --redis-client-key go together (mutual TLS needs both)",
            )),
        };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A hint for a connection error the operator can act on.
fn hint(e: &RedisError, tls: bool) -> &'static str {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code() == Some("WRONGPASS")
        || e.code() == Some("NOAUTH")
        || lower.contains("wrongpass")
        || lower.contains("noauth")
    {
        " (the ACL user or its password is wrong, or the user is disabled: check the URL's user and --redis-password-file)"
    } else if lower.contains("certificate") || lower.contains("unknownissuer") {
        " (the server's certificate does not verify: check --redis-ca-file and that the certificate names the host in --redis-url)"
    } else if tls
        && (lower.contains("corrupt")
            || lower.contains("invalidcontenttype")
            || lower.contains("content type")
            || lower.contains("handshake"))
    {
        " (the server did not speak TLS: is this port TLS? plain ports take redis://)"
    } else if !tls
        && (e.is_connection_dropped()
            || e.is_timeout()
            || lower.contains("reset")
            || lower.contains("closed")
            || lower.contains("broken pipe")
            || lower.contains("eof"))
    {
        " (the server closed the connection or did not answer: if that port is TLS, use rediss://)"
    } else {
        ""
    }
}

fn connect_error(target: &Target, e: RedisError) -> StoreError {
    StoreError::Connect {
        what: target.what(),
        hint: hint(&e, target.tls),
        source: e,
    }
}

/// The connections of one store, by kind.
pub(super) enum Backend {
    Single {
        client: Client,
    },
    Cluster {
        /// For blocking reads: an overall timeout above the longest block (each reader's
        /// connection times a reply out after its own block).
        blocking: Box<ClusterClient>,
        /// One plain client per seed node, for pub/sub; tried in turn.
        nodes: Vec<Client>,
        next: AtomicUsize,
    },
    Sentinel(Arc<SentinelMaster>),
}

/// The Redis connection every store command goes through.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelMaster>),
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
}

fn client_for(info: ConnectionInfo, certs: Option<&TlsCertificates>) -> RedisResult<Client> {
    match certs {
        Some(c) => Client::build_with_tls(info, c.clone()),
        None => Client::open(info),
    }
}

/// Connects as `url` and `opts` say: the shared connection, and what the dedicated ones are
/// made from.
pub(super) async fn connect(url: &str, opts: &RedisOptions) -> Result<(Backend, Conn)> {
    let target = Target::parse(url, opts)?;
    let (backend, mut conn) = connect_target(&target).await?;
    // A connection without credentials is made even where they are needed: ask once.
    redis::cmd("PING")
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| connect_error(&target, e))?;
    Ok((backend, conn))
}

async fn connect_target(target: &Target) -> Result<(Backend, Conn)> {
    match &target.topology {
        Topology::Single => {
            let client = client_for(target.nodes[0].clone(), target.certs.as_ref())
                .map_err(|e| connect_error(target, e))?;
            let conn = client
                .get_connection_manager_with_config(manager_config())
                .await
                .map_err(|e| connect_error(target, e))?;
            Ok((Backend::Single { client }, Conn::Single(conn)))
        }
        Topology::Cluster => {
            let builder = |response: Duration| {
                let mut b = ClusterClientBuilder::new(target.nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(response)
                    .overall_response_timeout(Some(response + Duration::from_secs(5)))
                    .retries(6)
                    .min_retry_wait(100)
                    .max_retry_wait(1000);
                if let Some(u) = &target.username {
                    b = b.username(u);
                }
                if let Some(p) = &target.password {
                    b = b.password(p.expose());
                }
                if target.tls {
                    b = b.tls(TlsMode::Secure);
                }
                if let Some(c) = &target.certs {
                    b = b.certs(c.clone());
                }
                b.build()
            };
            let main = builder(RESPONSE_TIMEOUT).map_err(|e| connect_error(target, e))?;
            let blocking = builder(RESPONSE_TIMEOUT + super::MAX_BLOCK)
                .map_err(|e| connect_error(target, e))?;
            let conn = main
                .get_async_connection()
                .await
                .map_err(|e| connect_error(target, e))?;
            let nodes = target
                .nodes
                .iter()
                .map(|n| client_for(n.clone(), target.certs.as_ref()))
                .collect::<RedisResult<Vec<_>>>()
                .map_err(|e| connect_error(target, e))?;
            Ok((
                Backend::Cluster {
                    blocking: Box::new(blocking),
                    nodes,
                    next: AtomicUsize::new(0),
                },
                Conn::Cluster(conn),
            ))
        }
        Topology::Sentinel { master } => {
            let addrs = target.nodes.iter().map(|n| n.addr().clone());
            let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                .map_err(|e| connect_error(target, e))?;
            if target.tls {
                b = b
                    .set_client_to_redis_tls_mode(TlsMode::Secure)
                    .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                if let Some(c) = &target.certs {
                    b = b
                        .set_client_to_redis_certificates(c.clone())
                        .set_client_to_sentinel_certificates(c.clone());
                }
            }
            if let Some(u) = &target.username {
                b = b.set_client_to_redis_username(u);
            }
            if let Some(p) = &target.password {
                b = b.set_client_to_redis_password(p.expose());
            }
            let client = b.build().map_err(|e| connect_error(target, e))?;
            let sentinel = Arc::new(SentinelMaster {
                client: tokio::sync::Mutex::new(client),
                current: Mutex::new(None),
            });
            sentinel
                .manager()
                .await
                .map_err(|e| connect_error(target, e))?;
            Ok((
                Backend::Sentinel(sentinel.clone()),
                Conn::Sentinel(sentinel),
            ))
        }
    }
}

/// The master Sentinel names, and a connection to it that is dropped (and the master asked
/// for again) when it fails: after a failover the next command reaches the new master.
pub(super) struct SentinelMaster {
    client: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<ConnectionManager>>,
}

impl SentinelMaster {
    /// A client for the master the sentinels name now (checked with `ROLE`).
    async fn master(&self) -> RedisResult<Client> {
        self.client.lock().await.async_get_client().await
    }

    async fn manager(&self) -> RedisResult<ConnectionManager> {
        if let Some(c) = self.current.lock().expect("sentinel").clone() {
            return Ok(c);
        }
        let mut sentinel = self.client.lock().await;
        // Another caller may have resolved it while this one waited.
        if let Some(c) = self.current.lock().expect("sentinel").clone() {
            return Ok(c);
        }
        let client = sentinel.async_get_client().await?;
        let conn = client
            .get_connection_manager_with_config(manager_config())
            .await?;
        *self.current.lock().expect("sentinel") = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the master after an error that says it is gone or no longer master.
    fn failed<T>(&self, r: &RedisResult<T>) {
        if let Err(e) = r {
            if e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.code() == Some("READONLY")
                || e.code() == Some("MASTERDOWN")
            {
                *self.current.lock().expect("sentinel") = None;
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(s) => Box::pin(async move {
                let mut c = s.manager().await?;
                let r = c.req_packed_command(cmd).await;
                s.failed(&r);
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Self::Sentinel(s) => Box::pin(async move {
                let mut c = s.manager().await?;
                let r = c.req_packed_commands(cmd, offset, count).await;
                s.failed(&r);
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(_) | Self::Sentinel(_) => 0,
        }
    }
}

/// A dedicated connection for blocking reads.
pub(super) enum Blocking {
    Plain(redis::aio::MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Blocking {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Plain(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Plain(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Plain(c) => c.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

impl Backend {
    /// A dedicated connection whose response timeout exceeds `block`.
    pub(super) async fn blocking(&self, block: Duration) -> Result<Blocking> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(block + RESPONSE_TIMEOUT));
        Ok(match self {
            Self::Single { client } => Blocking::Plain(
                client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            ),
            Self::Cluster { blocking, .. } => Blocking::Cluster(
                blocking
                    .get_async_connection_with_config(
                        redis::cluster::ClusterConfig::new()
                            .set_connection_timeout(CONNECT_TIMEOUT)
                            .set_response_timeout(block + RESPONSE_TIMEOUT),
                    )
                    .await?,
            ),
            Self::Sentinel(s) => Blocking::Plain(
                s.master()
                    .await?
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            ),
        })
    }

    /// A pub/sub connection: to the server, to the next reachable seed node of a cluster, or
    /// to the master Sentinel names.
    pub(super) async fn pubsub(&self) -> Result<redis::aio::PubSub> {
        match self {
            Self::Single { client } => Ok(client.get_async_pubsub().await?),
            Self::Cluster { nodes, next, .. } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                let mut last = None;
                for i in 0..nodes.len() {
                    let node = &nodes[(start + i) % nodes.len()];
                    match tokio::time::timeout(CONNECT_TIMEOUT, node.get_async_pubsub()).await {
                        Ok(Ok(p)) => {
                            // Start the next subscriber on the next node, spreading them.
                            next.store(start + i + 1, Ordering::Relaxed);
                            return Ok(p);
                        }
                        Ok(Err(e)) => last = Some(e),
                        Err(_) => {
                            last = Some(RedisError::from(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "pub/sub connection timed out",
                            )))
                        }
                    }
                }
                Err(last
                    .map(StoreError::Redis)
                    .unwrap_or_else(|| config("no cluster node to subscribe on")))
            }
            Self::Sentinel(s) => Ok(s.master().await?.get_async_pubsub().await?),
        }
    }
}

/// Runs `eval` (an `EVALSHA` of `script`) and, when `replicas > 0`, a `WAIT` for that many
/// replicas in the same pipeline (one connection, one node: the one holding the keys), so the
/// `WAIT` covers this very write. Returns the script's reply and how many replicas have it
/// (`None` when not asked).
pub(super) async fn eval_replicated(
    conn: &mut Conn,
    script: &redis::Script,
    eval: &Cmd,
    replicas: u32,
) -> Result<(Value, Option<u32>)> {
    let run = |conn: &mut Conn| {
        let mut pipe = redis::pipe();
        pipe.add_command(eval.clone());
        if replicas > 0 {
            pipe.cmd("WAIT")
                .arg(replicas)
                .arg(REPLICA_ACK_TIMEOUT.as_millis() as u64);
        }
        let mut conn = conn.clone();
        async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
    };
    let replies = match run(conn).await {
        Err(e) if e.code() == Some("NOSCRIPT") => {
            script.load_async(conn).await?;
            run(conn).await?
        }
        other => other?,
    };
    let mut replies = replies.into_iter();
    let value = replies.next().unwrap_or(Value::Nil);
    let acked = match replies.next() {
        Some(v) => Some(redis::from_redis_value::<u32>(v)?),
        None => None,
    };
    Ok((value, acked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str, opts: &RedisOptions) -> String {
        match Target::parse(url, opts) {
            Ok(_) => panic!("{url} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_form_parses_to_its_topology() {
        let o = RedisOptions::default();
        let t = Target::parse("redis://127.0.0.1:6379", &o).unwrap();
        assert_eq!(t.topology, Topology::Single);
        assert!(!t.tls);
        let t = Target::parse("rediss://wb:pw@redis.example:6380/2", &o).unwrap();
        assert!(t.tls);
        assert_eq!(t.username.as_deref(), Some("wb"));
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("pw"));
        assert_eq!(t.nodes[0].redis_settings().db(), 2);
        let t = Target::parse("redis+cluster://u:p@a:7000,b:7001,c:7002", &o).unwrap();
        assert_eq!(t.topology, Topology::Cluster);
        assert_eq!(t.nodes.len(), 3);
        assert_eq!(t.nodes[2].redis_settings().password(), Some("p"));
        let t = Target::parse("rediss+sentinel://wb:pw@s1:26379,s2:26379/main", &o).unwrap();
        assert_eq!(
            t.topology,
            Topology::Sentinel {
                master: "main".into()
            }
        );
        assert!(t.tls);
        // The sentinels are asked without the data nodes' credentials.
        assert_eq!(t.nodes[0].redis_settings().password(), None);
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("pw"));
        assert!(!t.what().contains("pw"), "{}", t.what());
    }

    #[test]
    fn bad_urls_say_what_is_wrong_and_never_echo_the_password() {
        let o = RedisOptions::default();
        for (url, says) in [
            ("http://h:1", "unknown scheme \"http\""),
            ("h:6379", "not a URL"),
            ("redis://a:1,b:2", "name one server"),
            ("redis+cluster://u:s3cr3t@a:1,,b:2", "empty host"),
            (
                "redis+cluster://u:s3cr3t@a:x",
                "port \"x\" is not a port number",
            ),
            ("redis+cluster://a", "has no port"),
            ("redis+cluster://a:1/3", "takes no path"),
            (
                "redis+sentinel://u:s3cr3t@a:1,b:2",
                "needs the master's name",
            ),
            ("redis+sentinel://a:1/", "needs the master's name"),
        ] {
            let e = err(url, &o);
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("s3cr3t"), "{url}: {e}");
        }
        let tls_files = RedisOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..RedisOptions::default()
        };
        assert!(err("redis://h:1", &tls_files).contains("is not TLS"));
        assert!(err("rediss://h:1", &tls_files).contains("--redis-ca-file"));
    }

    #[test]
    fn the_password_file_must_be_private_and_is_the_only_place() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("redis.pass");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let o = RedisOptions {
            password_file: Some(path.clone()),
            ..RedisOptions::default()
        };
        let e = err("redis://wb@h:1", &o);
        assert!(
            e.contains("--redis-password-file") && e.contains("644"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = Target::parse("redis+cluster://wb@h:1,h:2", &o).unwrap();
        assert_eq!(t.nodes[1].redis_settings().password(), Some("s3cr3t"));
        assert_eq!(t.nodes[1].redis_settings().username(), Some("wb"));
        let e = err("redis://wb:other@h:1", &o);
        assert!(e.contains("in one place"), "{e}");
    }
}
