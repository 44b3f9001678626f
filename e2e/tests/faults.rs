//! The fault-injection suite (SPEC invariants 2–4): a steady stream of resets for several
//! users, on both gateway replicas, while Redis, the DC, an agent's path, the processes and
//! their clocks are broken and brought back. Every operation is then judged against AD itself
//! — how many times each user's password was written (`unicodePwd`'s version in
//! `replPropertyMetaData`), which password binds, when it was set — not against the relay's
//! own records.
//!
//! The stack: a durable Redis; gateway-a and gateway-b as the real binary, each on its own
//! fixed port; agent-1 as the real binary reaching gateway-a through a TCP proxy under the
//! test's control, agent-2 as the real binary on gateway-b, each with its own journal; one
//! Samba DC. Faults, in rounds: `kill -9` of Redis; `kill -9` of one gateway replica and
//! SIGTERM under load of the other, and `kill -9` of one agent, alternating round by round
//! (so two rounds kill every replica and every agent), each restarted; the DC frozen
//! (SIGSTOP/SIGCONT); agent-1's path blackholed (no FIN) and resumed. Clock skew: each
//! restart of a replica or an agent runs with its wall clock off by seconds (libfaketime
//! with `FAKETIME_DONT_FAKE_MONOTONIC`, so timers are untouched, as on a skewed host), from
//! a rotation (replicas +4 s, −4 s, 0; agents −3 s, +3 s, 0), so replicas and agents disagree
//! with each other, with Redis and with the DC while traffic flows; each skewed run counts as
//! a fault, and its skew is checked to have taken effect (libfaketime mapped, log timestamps
//! that far off this test's clock, and the replica's own WB1032 warning).
//!
//! `make test` runs the short form (2 rounds); `make soak` sets `FAULT_ROUNDS` for the long one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Mutex;

use e2e::proxy::Proxy;
use e2e::{
    authorized, binary, forest_id, request, reset, tenant_id, write_secret, Process, Sandbox,
};
use relay::proto::writeback_client::WritebackClient;
use relay::proto::{GetOperationRequest, OperationState, Outcome};

const USERS: usize = 6;
const OP_TIMEOUT_MS: u32 = 6000;
/// Wall-clock skews, in seconds, of successive restarts of the replicas (both counted
/// together) and of the agents: the n-th restart (from 0) runs entry `n % 3` off. First
/// starts run unskewed.
const GATEWAY_SKEWS: [i64; 3] = [4, -4, 0];
const AGENT_SKEWS: [i64; 3] = [-3, 3, 0];

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Samba frozen until dropped (SIGCONT), also when the test fails.
struct Frozen(u32);
impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

/// What the callers asked and heard for one operation.
#[derive(Debug, Clone)]
struct Op {
    id: String,
    user: usize,
    password: String,
    /// The last answer a caller got (`None`: only transport errors).
    answer: Option<Outcome>,
}

/// Each fault: its kind, when it began and when it was undone.
type Windows = Vec<(&'static str, Instant, Instant)>;

/// Debian's libfaketime (package `libfaketime`, pulled in by `faketime`), found at run time:
/// in a multiarch directory, else where `dpkg -L libfaketime` says.
///
/// # Panics
/// When it is not installed: the clock-skew faults cannot run without it.
fn libfaketime() -> PathBuf {
    const LIB: &str = "libfaketime.so.1";
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.path().join("faketime").join(LIB))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.push(Path::new("/usr/lib/faketime").join(LIB));
    candidates.push(Path::new("/usr/local/lib/faketime").join(LIB));
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return found;
    }
    let listed = Command::new("dpkg")
        .args(["-L", "libfaketime"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listed
        .lines()
        .map(PathBuf::from)
        .find(|p| p.file_name().is_some_and(|n| n == LIB) && p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{LIB} not found (in /usr/lib/*/faketime, /usr/lib/faketime, \
                 /usr/local/lib/faketime, nor in `dpkg -L libfaketime`): the clock-skew faults \
                 need it; install the Debian package faketime (scripts/install-deps.sh does)"
            )
        })
}

/// Unix milliseconds of a UTC timestamp as the binaries log them
/// (`2026-01-02T03:04:05.678901Z`).
fn parse_utc_ms(s: &str) -> Option<i64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut parts = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (parts.next()??, parts.next()??, parts.next()??);
    let ms: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

/// A log line (text format) without its ANSI colours.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The timestamp of a log line (text format, ANSI colours or not), in Unix milliseconds.
fn line_time_ms(line: &str) -> Option<i64> {
    parse_utc_ms(plain(line).split_whitespace().next()?)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How far the wall clock of `p` (spawned at `spawned`) is off this test's, in milliseconds,
/// as bounds `(low, high)`: from the timestamps of its log lines against when they appeared
/// (a line first seen by one read was written after the read before began and before this
/// one ended). The narrowest bounds of the lines seen within 10 s.
async fn clock_offset(p: &Process, spawned: SystemTime) -> Option<(i64, i64)> {
    let until = Instant::now() + Duration::from_secs(10);
    let mut lower = unix_ms(spawned);
    let mut seen = 0;
    let mut best: Option<(i64, i64)> = None;
    while Instant::now() < until {
        let began = unix_ms(SystemTime::now());
        let log = p.log();
        let ended = unix_ms(SystemTime::now());
        let complete = log.rsplit_once('\n').map_or("", |(done, _)| done);
        let lines: Vec<&str> = complete.lines().collect();
        for line in lines.iter().skip(seen) {
            if let Some(t) = line_time_ms(line) {
                let bounds = (t - ended, t - lower);
                if best.is_none_or(|(l, h)| bounds.1 - bounds.0 < h - l) {
                    best = Some(bounds);
                }
            }
        }
        seen = lines.len();
        lower = began;
        if best.is_some_and(|(l, h)| h - l <= 250) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    best
}

/// The `offset_ms` of the first WB1032 warning (this replica's clock off the store's) the
/// gateway `p` logs within 10 s.
async fn reported_store_offset(p: &Process) -> Option<i64> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let found = p
            .log()
            .lines()
            .map(plain)
            .find(|l| l.contains("WB1032"))
            .and_then(|l| {
                let rest = l.split("offset_ms=").nth(1)?;
                let digits: String = rest
                    .chars()
                    .take_while(|c| *c == '-' || c.is_ascii_digit())
                    .collect();
                digits.parse().ok()
            });
        if found.is_some() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// One gateway replica or agent the suite runs as the real binary, kills and restarts; each
/// run may have its wall clock skewed (libfaketime), its monotonic clock left alone.
struct Bin {
    name: &'static str,
    /// Program and subcommand.
    command: [&'static str; 2],
    env: Vec<(String, String)>,
    dir: PathBuf,
    faketime: PathBuf,
    process: Option<Process>,
    runs: usize,
    /// The running process's wall-clock skew in seconds, and since when it runs.
    skew: i64,
    since: Instant,
}

impl Bin {
    fn new(
        name: &'static str,
        command: [&'static str; 2],
        env: Vec<(String, String)>,
        dir: &Path,
        faketime: &Path,
    ) -> Self {
        Self {
            name,
            command,
            env,
            dir: dir.to_owned(),
            faketime: faketime.to_owned(),
            process: None,
            runs: 0,
            skew: 0,
            since: Instant::now(),
        }
    }

    /// Starts the next run with its wall clock `skew` seconds off, and checks that it is:
    /// libfaketime mapped into the process exactly when skewed, its log timestamps `skew`
    /// off this test's clock (within 0.5 s), and, for a replica skewed by more than 2 s, its
    /// own WB1032 warning measuring the skew against Redis `TIME`. Returns what it measured.
    ///
    /// # Panics
    /// When the skew did not take effect as asked (the fault would test nothing).
    async fn start(&mut self, skew: i64) -> String {
        self.runs += 1;
        let mut cmd = Command::new(binary(self.command[0]).unwrap());
        cmd.arg(self.command[1]).envs(self.env.iter().cloned());
        if skew != 0 {
            cmd.env("LD_PRELOAD", &self.faketime)
                .env("FAKETIME", format!("{skew:+}"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        } else {
            cmd.env_remove("LD_PRELOAD").env_remove("FAKETIME");
        }
        let log = self.dir.join(format!("{}.{}.log", self.name, self.runs));
        let spawned = SystemTime::now();
        let mut p = Process::spawn(&mut cmd, log.clone());
        self.skew = skew;
        self.since = Instant::now();
        let run = format!("{} run {} ({})", self.name, self.runs, log.display());
        let bounds = clock_offset(&p, spawned).await;
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{run}: exited at start ({status}):\n{}", p.log());
        }
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", p.child.id()))
            .unwrap_or_else(|e| panic!("{run}: cannot read its /proc maps: {e}"));
        assert_eq!(
            maps.contains("libfaketime"),
            skew != 0,
            "{run}: libfaketime mapped into the process (LD_PRELOAD={}) ≠ skewed by {skew:+} s",
            self.faketime.display()
        );
        let want = skew * 1000;
        let (low, high) = bounds.unwrap_or_else(|| {
            panic!(
                "{run}: no timestamped log line within 10 s to check its clock by:\n{}",
                p.log()
            )
        });
        assert!(
            high - low <= 1000 && low - 500 <= want && want <= high + 500,
            "{run}: asked for a wall clock {skew:+} s off, its log timestamps are {low}..{high} ms off this test's clock"
        );
        let mut measured = format!("{}: clock {skew:+} s, log {low:+}..{high:+} ms", self.name);
        if self.command[0] == "cloud-gateway" && skew.abs() > 2 {
            let reported = reported_store_offset(&p).await;
            assert!(
                reported.is_some_and(|o| (o + want).abs() <= 500),
                "{run}: skewed {skew:+} s, it reported its clock off Redis TIME by {reported:?} ms (WB1032 offset_ms, expected about {}):\n{}",
                -want,
                p.log()
            );
            measured += &format!(", WB1032 offset_ms {}", reported.unwrap_or_default());
        }
        self.process = Some(p);
        measured
    }

    /// `kill -9` of the running process; a skewed run that ends is recorded as a "clock
    /// skew" fault.
    fn kill(&mut self, windows: &mut Windows) {
        if let Some(mut p) = self.process.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
            self.ended(windows);
        }
    }

    /// SIGTERM of the running process, which must exit within 15 s; recorded as
    /// [`Bin::kill`] is.
    fn terminate(&mut self, windows: &mut Windows) {
        if let Some(mut p) = self.process.take() {
            let status = p.terminate(Duration::from_secs(15));
            assert!(
                status.is_some(),
                "{} did not stop on SIGTERM:\n{}",
                self.name,
                p.log()
            );
            self.ended(windows);
        }
    }

    fn ended(&self, windows: &mut Windows) {
        if self.skew != 0 {
            windows.push(("clock skew", self.since, Instant::now()));
        }
    }
}

/// Waits until the gateway at `addr` answers TLS + gRPC.
async fn wait_serving(sb: &Sandbox, bin: &Bin, addr: std::net::SocketAddr) {
    for _ in 0..200 {
        if sb.channel_to(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = bin.process.as_ref().map(Process::log).unwrap_or_default();
    panic!("{} did not come up on {addr}:\n{log}", bin.name);
}

/// The counts the suite prints and requires to be zero.
#[derive(Debug, Default)]
struct Verdict {
    ops: usize,
    faults: usize,
    lost: usize,
    applied_twice: usize,
    applied_after_deadline: usize,
    untrue_answer: usize,
    out_of_order: usize,
    /// Operations whose record could not be read back at all (a gateway that does not
    /// answer): the suite cannot judge them, so it fails rather than waits forever.
    unread: usize,
    problems: Vec<String>,
}

impl Verdict {
    fn line(&self) -> String {
        format!(
            "ops {}, faults {}, lost {}, applied-twice {}, applied-after-deadline {}, untrue-answer {}, out-of-order {}",
            self.ops,
            self.faults,
            self.lost,
            self.applied_twice,
            self.applied_after_deadline,
            self.untrue_answer,
            self.out_of_order
        )
    }
}

/// "Nothing was changed" answers.
fn says_not_applied(o: Outcome) -> bool {
    !matches!(
        o,
        Outcome::Applied | Outcome::TimedOut | Outcome::InProgress | Outcome::Unspecified
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_true_whatever_fails() {
    let rounds: usize = std::env::var("FAULT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let faketime = libfaketime();
    // No gateway or agent in this process: all are binaries the suite kills.
    let mut sb = Sandbox::start_durable(0).await.unwrap();
    let (t, f) = (sb.tenant.clone(), sb.forest.clone());
    let dir = sb.dir();
    let master = sb.write_master_key().unwrap();
    let addrs: [std::net::SocketAddr; 2] = std::array::from_fn(|_| {
        format!("127.0.0.1:{}", testkit::free_port().unwrap())
            .parse()
            .unwrap()
    });
    // gateway-a and gateway-b, each restarted on its own port.
    let mut gateways = [("gateway-a", addrs[0]), ("gateway-b", addrs[1])].map(|(name, addr)| {
        let mut env = sb.gateway_env(name, addr, &master);
        env.extend([
            ("WRITEBACK_SHUTDOWN_GRACE_SECS".to_owned(), "5".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ]);
        Bin::new(name, ["cloud-gateway", "serve"], env, &dir, &faketime)
    });
    // agent-1 through a proxy to gateway-a, agent-2 straight to gateway-b.
    let proxy = Proxy::start(addrs[0]).await.unwrap();
    let mut agents = Vec::new();
    for (name, url) in [
        ("agent-1", format!("https://{}", proxy.addr())),
        ("agent-2", format!("https://{}", addrs[1])),
    ] {
        let secret = sb
            .tenants
            .register_agent(&tenant_id(&t), &forest_id(&f), name)
            .await
            .unwrap();
        let secret_file = write_secret(&dir, &format!("{name}.secret"), secret.expose());
        let state = dir.join(format!("{name}-state"));
        let mut env = sb.agent_env(name, &url, &secret_file, &state).unwrap();
        env.push(("RUST_LOG".to_owned(), "info".to_owned()));
        agents.push(Bin::new(
            name,
            ["onprem-agent", "run"],
            env,
            &dir,
            &faketime,
        ));
    }
    let mut agents: [Bin; 2] = agents.try_into().ok().unwrap();
    for (g, addr) in gateways.iter_mut().zip(addrs) {
        g.start(0).await;
        wait_serving(&sb, g, addr).await;
    }
    for a in &mut agents {
        a.start(0).await;
    }
    sb.wait_agents(&t, &f, 2).await.unwrap_or_else(|e| {
        let logs: Vec<String> = gateways
            .iter()
            .chain(&agents)
            .filter_map(|b| Some(format!("{}:\n{}", b.name, b.process.as_ref()?.log())))
            .collect();
        panic!("{e}\n{}", logs.join("\n"))
    });

    let users: Vec<String> = (0..USERS).map(|i| format!("fault-{i}")).collect();
    let mut dns = Vec::new();
    let mut writes_before = Vec::new();
    for u in &users {
        let dn = sb.dc.create_user(u, "Initial#Pass1").unwrap();
        writes_before.push(sb.dc.password_writes(&dn).unwrap());
        dns.push(dn);
    }

    // The workload: each user's resets one after the other, alternating replicas; a caller
    // that loses its replica retries the same operation id on the other.
    let ca = std::fs::read(sb.ca.ca_file()).unwrap();
    let token = sb.token.expose().to_owned();
    let stop = tokio_util::sync::CancellationToken::new();
    let ops: Arc<Mutex<Vec<Op>>> = Arc::default();
    // When each APPLIED answer came, for the recovery figures.
    let applied_at: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let mut workers = Vec::new();
    for (u, name) in users.iter().enumerate() {
        let applied_at = applied_at.clone();
        let (ops, stop, ca, token, t, f, name) = (
            ops.clone(),
            stop.clone(),
            ca.clone(),
            token.clone(),
            t.clone(),
            f.clone(),
            name.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut k = 0usize;
            while !stop.is_cancelled() {
                let id = format!("{name}-{k}");
                let password = format!("Fault#{u}x{k}-Pw");
                let mut req = request(&t, &f, &name, reset(&password));
                req.operation_id = id.clone();
                req.timeout_ms = OP_TIMEOUT_MS;
                let mut answer = None;
                for attempt in 0..8 {
                    let addr = addrs[(k + attempt) % 2];
                    let call = async {
                        let channel =
                            tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                                .unwrap()
                                .tls_config(
                                    tonic::transport::ClientTlsConfig::new()
                                        .ca_certificate(tonic::transport::Certificate::from_pem(
                                            &ca,
                                        ))
                                        .domain_name("127.0.0.1"),
                                )
                                .unwrap()
                                .connect_timeout(Duration::from_secs(2))
                                .connect()
                                .await
                                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                        WritebackClient::new(channel)
                            .submit(authorized(req.clone(), &token))
                            .await
                    };
                    let within = Duration::from_millis(u64::from(OP_TIMEOUT_MS) + 5000);
                    if let Ok(Ok(r)) = tokio::time::timeout(within, call).await {
                        let o = Outcome::try_from(r.into_inner().outcome).unwrap();
                        answer = Some(o);
                        if o == Outcome::Applied {
                            applied_at.lock().unwrap().push(Instant::now());
                        }
                        if o != Outcome::InProgress {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                ops.lock().await.push(Op {
                    id,
                    user: u,
                    password,
                    answer,
                });
                k += 1;
            }
        }));
    }

    // The faults, each with when it began and when it was undone.
    let mut windows: Windows = Vec::new();
    let (mut gateway_restarts, mut agent_restarts) = (0, 0);
    let started = Instant::now();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Redis: kill -9, back after a second from its append-only file.
        let begun = Instant::now();
        sb.redis.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        sb.redis.restart().unwrap();
        windows.push(("redis kill -9", begun, Instant::now()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The DC frozen mid-traffic: briefly (writes wait and land in time), or for longer
        // than an operation's deadline (writes in flight time out at the agent, and the DC
        // commits them when it thaws: the agent must not say "nothing was changed").
        let begun = Instant::now();
        {
            let _frozen = Frozen(sb.dc.pid().unwrap());
            signal("-STOP", sb.dc.pid().unwrap());
            let frozen_for = if round % 2 == 0 {
                Duration::from_millis(1500)
            } else {
                Duration::from_millis(u64::from(OP_TIMEOUT_MS) + 1000)
            };
            tokio::time::sleep(frozen_for).await;
        }
        windows.push(("dc frozen", begun, Instant::now()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // agent-1's path blackholed (no FIN), then resumed.
        let begun = Instant::now();
        proxy.blackhole();
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.resume();
        windows.push(("agent path blackholed", begun, Instant::now()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // One agent, in turn: kill -9, restarted from its journal with the next skew.
        let mut done = Vec::new();
        let agent = &mut agents[round % 2];
        let begun = Instant::now();
        agent.kill(&mut windows);
        tokio::time::sleep(Duration::from_millis(500)).await;
        done.push(format!(
            "kill -9 {}",
            agent.start(AGENT_SKEWS[agent_restarts % 3]).await
        ));
        agent_restarts += 1;
        windows.push(("agent kill -9", begun, Instant::now()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // One replica, in turn: kill -9, restarted on its port with the next skew.
        let (killed, termed) = (round % 2, (round + 1) % 2);
        let begun = Instant::now();
        gateways[killed].kill(&mut windows);
        tokio::time::sleep(Duration::from_millis(500)).await;
        done.push(format!(
            "kill -9 {}",
            gateways[killed]
                .start(GATEWAY_SKEWS[gateway_restarts % 3])
                .await
        ));
        gateway_restarts += 1;
        windows.push(("gateway kill -9", begun, Instant::now()));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // The other replica: SIGTERM under load, restarted once it has drained.
        let begun = Instant::now();
        gateways[termed].terminate(&mut windows);
        done.push(format!(
            "SIGTERM {}",
            gateways[termed]
                .start(GATEWAY_SKEWS[gateway_restarts % 3])
                .await
        ));
        gateway_restarts += 1;
        windows.push(("gateway SIGTERM", begun, Instant::now()));
        println!(
            "round {round} done after {:.1?}: {}",
            started.elapsed(),
            done.join("; ")
        );
    }
    // Skewed runs still going count up to the end of the last round (so that, like the
    // other faults, traffic follows the end of their window).
    let rounds_ended = Instant::now();
    for b in gateways.iter().chain(&agents) {
        if b.process.is_some() && b.skew != 0 {
            windows.push(("clock skew", b.since, rounds_ended));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }

    // Let every operation settle (deadline + the acknowledgment grace of both replicas).
    let ops = ops.lock().await.clone();
    let mut verdict = Verdict {
        ops: ops.len(),
        faults: windows.len(),
        ..Verdict::default()
    };
    let mut client = None;
    for _ in 0..100 {
        if let Ok(channel) = sb.channel_to(addrs[0]).await {
            client = Some(WritebackClient::new(channel));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = client.expect("gateway-a answers after the faults");
    let mut finals: HashMap<String, (Option<Outcome>, i64)> = HashMap::new();
    let settle_by = Instant::now() + Duration::from_secs(40);
    // Every read is bounded, and so is the whole wait: a call stuck on a broken connection is
    // retried on a new one, and an operation still unreadable a minute after the settle
    // deadline fails the suite instead of hanging it.
    let give_up = settle_by + Duration::from_secs(60);
    for op in &ops {
        loop {
            let call = client.get_operation(authorized(
                GetOperationRequest {
                    tenant_id: t.clone(),
                    operation_id: op.id.clone(),
                },
                sb.token.expose(),
            ));
            let got = match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(r) => r,
                Err(_) => Err(tonic::Status::deadline_exceeded("no answer within 5 s")),
            };
            match got {
                Ok(rec) => {
                    let rec = rec.into_inner();
                    let done = rec.state == OperationState::Done as i32;
                    if done || Instant::now() > settle_by {
                        let outcome = done.then(|| Outcome::try_from(rec.outcome).unwrap());
                        finals.insert(op.id.clone(), (outcome, rec.deadline_unix_ms));
                        break;
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // Never accepted (answered AGENT_UNAVAILABLE at once, or never reached a
                    // replica), or accepted and lost.
                    let accepted = op.answer.is_some_and(|a| {
                        !matches!(a, Outcome::AgentUnavailable | Outcome::NotEnabled)
                    });
                    if accepted {
                        verdict.lost += 1;
                        verdict.problems.push(format!(
                            "{} answered {:?}, then not found",
                            op.id, op.answer
                        ));
                    }
                    break;
                }
                Err(e) => {
                    if Instant::now() > give_up {
                        verdict.unread += 1;
                        verdict
                            .problems
                            .push(format!("{}: could not be read back: {e}", op.id));
                        break;
                    }
                    if let Ok(channel) = sb.channel_to(addrs[0]).await {
                        client = WritebackClient::new(channel);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Judge against AD.
    for (u, dn) in dns.iter().enumerate() {
        let mine: Vec<&Op> = ops.iter().filter(|o| o.user == u).collect();
        let writes = sb.dc.password_writes(dn).unwrap() - writes_before[u];
        let final_of = |o: &Op| finals.get(&o.id).and_then(|(f, _)| *f);
        let applied = mine
            .iter()
            .filter(|o| final_of(o) == Some(Outcome::Applied))
            .count() as u32;
        let unknown = mine
            .iter()
            .filter(|o| {
                finals.contains_key(&o.id) && matches!(final_of(o), Some(Outcome::TimedOut) | None)
            })
            .count() as u32;
        if writes > applied + unknown {
            verdict.applied_twice += (writes - applied - unknown) as usize;
            verdict.problems.push(format!(
                "{}: AD wrote the password {writes} times for {applied} applied and {unknown} unknown",
                users[u]
            ));
        }
        if writes < applied {
            verdict.untrue_answer += (applied - writes) as usize;
            verdict.problems.push(format!(
                "{}: {applied} operations recorded APPLIED, AD wrote {writes}",
                users[u]
            ));
        }
        // What callers heard against the settled truth.
        for o in &mine {
            if let (Some(heard), Some(truth)) = (o.answer, final_of(o)) {
                let contradicts = (heard == Outcome::Applied && truth != Outcome::Applied)
                    || (says_not_applied(heard) && truth == Outcome::Applied);
                if contradicts {
                    verdict.untrue_answer += 1;
                    verdict
                        .problems
                        .push(format!("{}: heard {heard:?}, truth {truth:?}", o.id));
                }
            }
        }
        // Which password is in place: it must be one that may have been applied, the newest
        // applied one or a later one of unknown outcome, and set before its deadline.
        let upn = format!("{}@{}", users[u], f);
        let bound = mine.iter().rposition(|o| sb.dc.can_bind(&upn, &o.password));
        let last_applied = mine
            .iter()
            .rposition(|o| final_of(o) == Some(Outcome::Applied));
        match bound {
            None => {
                if last_applied.is_some() {
                    verdict.untrue_answer += 1;
                    verdict.problems.push(format!(
                        "{}: no relayed password binds though one was APPLIED",
                        users[u]
                    ));
                }
            }
            Some(i) => {
                let o = mine[i];
                match final_of(o) {
                    Some(Outcome::Applied | Outcome::TimedOut) | None => {}
                    Some(other) => {
                        verdict.untrue_answer += 1;
                        verdict.problems.push(format!(
                            "{}: its password is in AD, recorded {other:?}",
                            o.id
                        ));
                    }
                }
                if last_applied.is_some_and(|j| j > i) {
                    verdict.out_of_order += 1;
                    verdict
                        .problems
                        .push(format!("{}: an older operation's password won", users[u]));
                }
                let deadline = finals.get(&o.id).map_or(i64::MAX, |(_, d)| *d);
                let set: i64 = sb
                    .dc
                    .attribute(dn, "pwdLastSet")
                    .unwrap()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let set_ms = set / 10_000 - 11_644_473_600_000;
                if set_ms > deadline + 5 {
                    verdict.applied_after_deadline += 1;
                    verdict.problems.push(format!(
                        "{}: written {} ms after its deadline",
                        o.id,
                        set_ms - deadline
                    ));
                }
            }
        }
    }
    let answers: HashMap<String, usize> = ops.iter().fold(HashMap::new(), |mut m, o| {
        *m.entry(format!("{:?}", o.answer)).or_default() += 1;
        m
    });
    println!("answers heard: {answers:?}");
    // Recovery, as callers saw it: the longest stretch without any APPLIED answer from the
    // fault's start to 10 s after it was undone, and the first APPLIED answer after the undo.
    let applied = applied_at.lock().unwrap().clone();
    let mut by_kind: HashMap<&str, Vec<(Duration, Duration)>> = HashMap::new();
    for (kind, begun, undone) in &windows {
        let mut times: Vec<Instant> = applied
            .iter()
            .copied()
            .filter(|t| *t >= *begun && *t <= *undone + Duration::from_secs(10))
            .collect();
        times.sort();
        let mut gap = Duration::ZERO;
        let mut prev = *begun;
        for t in &times {
            gap = gap.max(t.saturating_duration_since(prev));
            prev = *t;
        }
        let first_after = times
            .iter()
            .find(|t| **t >= *undone)
            .map_or(Duration::from_secs(10), |t| t.duration_since(*undone));
        by_kind.entry(kind).or_default().push((gap, first_after));
    }
    let mut kinds: Vec<_> = by_kind.into_iter().collect();
    kinds.sort_by_key(|(k, _)| *k);
    for (kind, v) in kinds {
        let max_gap = v.iter().map(|(g, _)| *g).max().unwrap_or_default();
        let max_first = v.iter().map(|(_, f)| *f).max().unwrap_or_default();
        println!(
            "recovery {kind}: {} times, longest pause in APPLIED answers {max_gap:.2?}, first APPLIED after undo within {max_first:.2?}",
            v.len()
        );
    }
    println!("{}", verdict.line());
    let mut ended = Windows::new();
    for b in agents.iter_mut().chain(&mut gateways) {
        b.kill(&mut ended);
    }
    assert!(
        verdict.lost
            + verdict.unread
            + verdict.applied_twice
            + verdict.applied_after_deadline
            + verdict.untrue_answer
            + verdict.out_of_order
            == 0,
        "{}\n{}",
        verdict.line(),
        verdict.problems.join("\n")
    );
    assert!(
        verdict.ops >= 30,
        "too little traffic to judge: {}",
        verdict.line()
    );
    sb.shutdown().await;
}
