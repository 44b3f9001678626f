//! Drives a gateway's `Writeback.Submit` over gRPC with TLS: a closed loop (N callers, each
//! sending its next request when the previous one is answered) or an open loop (requests sent
//! at a fixed rate whatever the answers; latency counted from each request's *intended* send
//! time, so a stall is charged to every request it delayed: no coordinated omission).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Mutex;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use relay::proto::writeback_client::WritebackClient;
use relay::proto::{
    submit_request::Action, GetOperationRequest, Initiator, Outcome, ResetPassword, SubmitRequest,
    UnlockAccount, UserRef,
};

use crate::stats::Histogram;

/// What the load sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Reset,
    Unlock,
}

/// Where and as whom.
#[derive(Clone)]
pub struct Target {
    pub channels: Vec<Channel>,
    pub token: String,
    pub tenant: String,
    pub forest: String,
    /// Users are `<prefix><n>`, n below `users`.
    pub user_prefix: String,
    pub users: usize,
    pub kind: Kind,
}

/// A TLS channel to `addr` verified with the PEM CA in `ca_file` for name `tls_name`.
///
/// # Errors
/// When the CA cannot be read or the gateway does not answer.
pub async fn channel(addr: &str, ca_file: &Path, tls_name: &str) -> anyhow::Result<Channel> {
    let pem = std::fs::read(ca_file).with_context(|| format!("read {}", ca_file.display()))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(tls_name.to_owned());
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// The request number `n` of a run.
fn request(t: &Target, user: usize, n: u64) -> SubmitRequest {
    let action = match t.kind {
        // Unique per request, well within any complexity rule.
        Kind::Reset => Action::Reset(ResetPassword {
            new_password: format!("Bench-{n}-{}#Pw9", uuid::Uuid::new_v4().simple()),
            must_change_at_next_logon: false,
            unlock: false,
        }),
        Kind::Unlock => Action::Unlock(UnlockAccount {}),
    };
    SubmitRequest {
        tenant_id: t.tenant.clone(),
        operation_id: String::new(),
        user: Some(UserRef::from_text(
            &t.forest,
            &format!("{}{}", t.user_prefix, user % t.users.max(1)),
        )),
        initiator: Initiator::EndUser as i32,
        timeout_ms: 20_000,
        action: Some(action),
    }
}

fn authorized<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    req
}

/// What one run measured.
#[derive(Debug, Default, Clone)]
pub struct Run {
    /// Latency of every answered request (APPLIED or not; RPC errors are not in it).
    pub latency: Histogram,
    /// Answers by outcome name, RPC errors as `rpc:<code>`.
    pub outcomes: BTreeMap<String, usize>,
    /// The measured window.
    pub elapsed: Duration,
    /// Some operation ids answered APPLIED, for their timelines.
    pub sampled_ops: Vec<String>,
}

impl Run {
    pub fn applied(&self) -> usize {
        self.outcomes.get("APPLIED").copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.outcomes.values().sum()
    }

    /// APPLIED answers per second over the measured window.
    pub fn throughput(&self) -> f64 {
        self.applied() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Everything that was not APPLIED, as `name=count` pairs.
    pub fn errors(&self) -> String {
        let e: Vec<String> = self
            .outcomes
            .iter()
            .filter(|(k, _)| k.as_str() != "APPLIED")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if e.is_empty() {
            "none".to_owned()
        } else {
            e.join(", ")
        }
    }
}

struct Shared {
    run: Mutex<Run>,
    sample_every: u64,
}

async fn one(
    t: &Target,
    client: &mut WritebackClient<Channel>,
    user: usize,
    n: u64,
    intended: Instant,
    shared: &Shared,
    measured: bool,
) {
    let answer = client
        .submit(authorized(request(t, user, n), &t.token))
        .await;
    let latency = intended.elapsed();
    if !measured {
        return;
    }
    let mut run = shared.run.lock().await;
    match answer {
        Ok(r) => {
            let r = r.into_inner();
            let outcome = Outcome::try_from(r.outcome).unwrap_or_default();
            run.latency.record(latency);
            *run.outcomes
                .entry(outcome.as_str_name().to_owned())
                .or_default() += 1;
            if outcome == Outcome::Applied
                && n.is_multiple_of(shared.sample_every)
                && run.sampled_ops.len() < 500
            {
                run.sampled_ops.push(r.operation_id);
            }
        }
        Err(s) => {
            *run.outcomes
                .entry(format!("rpc:{:?}", s.code()))
                .or_default() += 1;
        }
    }
}

/// `callers` callers, each on its own user, for `warmup` (not measured) then `measure`.
pub async fn closed_loop(t: &Target, callers: usize, warmup: Duration, measure: Duration) -> Run {
    let shared = Arc::new(Shared {
        run: Mutex::new(Run::default()),
        sample_every: 7,
    });
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let mut tasks = Vec::new();
    for c in 0..callers {
        let t = t.clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = WritebackClient::new(t.channels[c % t.channels.len()].clone());
            let mut n = c as u64;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let measured = now >= measure_from;
                one(&t, &mut client, c, n, now, &shared, measured).await;
                n += callers as u64;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let mut run = shared.run.lock().await.clone();
    run.elapsed = end
        .saturating_duration_since(measure_from)
        .min(Instant::now() - measure_from);
    run
}

/// Requests at `rate` per second for `warmup` then `measure`; latency from each request's
/// intended send time. Users rotate over `t.users` names.
pub async fn open_loop(t: &Target, rate: f64, warmup: Duration, measure: Duration) -> Run {
    let shared = Arc::new(Shared {
        run: Mutex::new(Run::default()),
        sample_every: 7,
    });
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let mut tasks = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    loop {
        let intended = start + interval.mul_f64(n as f64);
        if intended >= end {
            break;
        }
        tokio::time::sleep_until(intended.into()).await;
        let t2 = t.clone();
        let shared = shared.clone();
        let measured = intended >= measure_from;
        tasks.spawn(async move {
            let mut client =
                WritebackClient::new(t2.channels[n as usize % t2.channels.len()].clone());
            one(&t2, &mut client, n as usize, n, intended, &shared, measured).await;
        });
        n += 1;
        // Reap finished ones so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    let stop = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    });
    if stop.await.is_err() {
        tasks.abort_all();
    }
    let mut run = shared.run.lock().await.clone();
    run.elapsed = measure;
    run
}

/// Per-stage latency (ms) from the timelines of `ops`: for each pair of consecutive stages
/// `a→b`, the time between them. Stage order as the timeline records it.
pub async fn stages(t: &Target, ops: &[String]) -> Vec<(String, Histogram)> {
    let mut client = WritebackClient::new(t.channels[0].clone());
    let mut by_pair: Vec<(String, Histogram)> = Vec::new();
    for op in ops {
        let Ok(r) = client
            .get_operation(authorized(
                GetOperationRequest {
                    tenant_id: t.tenant.clone(),
                    operation_id: op.clone(),
                },
                &t.token,
            ))
            .await
        else {
            continue;
        };
        let tl = r.into_inner().timeline;
        for w in tl.windows(2) {
            let pair = format!("{} → {}", w[0].stage, w[1].stage);
            let delta = (w[1].at_unix_ms - w[0].at_unix_ms).max(0) as u64;
            match by_pair.iter_mut().find(|(p, _)| *p == pair) {
                Some((_, h)) => h.record_micros(delta * 1000),
                None => {
                    let mut h = Histogram::new();
                    h.record_micros(delta * 1000);
                    by_pair.push((pair, h));
                }
            }
        }
    }
    by_pair
}
