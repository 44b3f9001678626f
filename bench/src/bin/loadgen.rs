//! `loadgen`: drives a running gateway's `Writeback.Submit` over gRPC with TLS, closed loop
//! (N callers) or open loop (fixed rate, latency from the intended send time), and prints
//! throughput, percentiles, outcomes, per-stage latency from the operations' timelines and
//! CPU seconds per 1,000 operations of the processes named with `--pid`.
//!
//! `loadgen --gateway 127.0.0.1:7443 --ca ca.pem --token-file t --tenant acme \
//!   --forest corp.example.com --mode closed --concurrency 8 --secs 10 --pid gateway=1234`

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use bench::load::{self, Kind, Target};
use bench::procfs::CpuSnapshot;

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Closed,
    Open,
}

#[derive(Clone, Copy, ValueEnum)]
enum Action {
    Reset,
    Unlock,
}

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for the gateway's Writeback API"
)]
struct Cli {
    /// host:port of the gateway.
    #[arg(long)]
    gateway: String,
    /// PEM CA that signed the gateway's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Name to verify in the gateway's certificate.
    #[arg(long, default_value = "127.0.0.1")]
    tls_name: String,
    /// File holding the tenant's bearer token.
    #[arg(long)]
    token_file: PathBuf,
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    forest: String,
    #[arg(long, default_value = "bench")]
    user_prefix: String,
    /// Distinct users (`<prefix>0` …); closed loop: at least the number of callers.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    #[arg(long, value_enum, default_value_t = Action::Reset)]
    action: Action,
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    mode: Mode,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// HTTP/2 connections to spread the callers over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// `name=pid` of a process whose CPU to report (repeatable).
    #[arg(long = "pid")]
    pids: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay::tls::install_crypto_provider();
    let cli = Cli::parse();
    let token = std::fs::read_to_string(&cli.token_file)
        .with_context(|| format!("read {}", cli.token_file.display()))?
        .trim()
        .to_owned();
    let mut channels = Vec::new();
    for _ in 0..cli.connections.max(1) {
        channels.push(load::channel(&cli.gateway, &cli.ca, &cli.tls_name).await?);
    }
    let target = Target {
        channels,
        token,
        tenant: cli.tenant,
        forest: cli.forest,
        user_prefix: cli.user_prefix,
        users: cli.users,
        kind: match cli.action {
            Action::Reset => Kind::Reset,
            Action::Unlock => Kind::Unlock,
        },
    };
    let pids: Vec<(String, u32)> = cli
        .pids
        .iter()
        .filter_map(|p| {
            let (n, pid) = p.split_once('=')?;
            Some((n.to_owned(), pid.parse().ok()?))
        })
        .collect();
    let warmup = Duration::from_secs_f64(cli.warmup_secs);
    let measure = Duration::from_secs_f64(cli.secs);
    let go = |d: Duration| {
        let target = &target;
        async move {
            match cli.mode {
                Mode::Closed => load::closed_loop(target, cli.concurrency, Duration::ZERO, d).await,
                Mode::Open => load::open_loop(target, cli.rate, Duration::ZERO, d).await,
            }
        }
    };
    // Warm-up (TLS, pools, allocator), then the measured window alone.
    go(warmup).await;
    let before = CpuSnapshot::take(&pids);
    let mut run = go(measure).await;
    let after = CpuSnapshot::take(&pids);
    let s = run.latency.summary();
    println!(
        "throughput {:.0} ops/s (APPLIED), n={} p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2} ms",
        run.throughput(),
        s.n,
        s.p50,
        s.p90,
        s.p99,
        s.p999,
        s.max
    );
    println!("not applied: {}", run.errors());
    for (name, cpu) in before.per_thousand(&after, run.applied()) {
        println!("cpu {name}: {cpu:.3} s per 1,000 operations");
    }
    for (pair, mut h) in load::stages(&target, &run.sampled_ops).await {
        let s = h.summary();
        println!(
            "stage {pair}: n={} p50={:.0} p99={:.0} ms",
            s.n, s.p50, s.p99
        );
    }
    Ok(())
}
