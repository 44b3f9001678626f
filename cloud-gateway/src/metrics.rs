//! The gateway's Prometheus metrics (one set per process), served on `--metrics-listen`.

use std::sync::LazyLock;

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// Answers given to callers, by operation kind and outcome.
    pub submits: IntCounterVec,
    /// Outcomes recorded from agents' acknowledgments.
    pub acknowledgments: IntCounterVec,
    /// Time per stage: `submit` (what the caller waited), `queue_wait` (accepted to handed to
    /// an agent), `agent` (handed to an agent to acknowledged).
    pub stage_seconds: HistogramVec,
    /// Entries in a forest's queue, and the age of the oldest.
    pub queue_depth: IntGaugeVec,
    pub queue_oldest_age_seconds: GaugeVec,
    /// Agent streams held by this replica.
    pub connected_agents: IntGaugeVec,
    /// Agent streams opened (a reconnect counts again).
    pub agent_sessions: IntCounterVec,
    /// Failed Redis operations.
    pub redis_errors: IntCounter,
    /// Agent instances heard from within the liveness window, per forest (all replicas).
    pub live_agents: IntGaugeVec,
    /// 1 when the forest's last end-to-end canary run by this replica passed.
    pub forest_healthy: IntGaugeVec,
    /// Stores found restored from an older state, per tenant (see `store/sequence.rs`).
    pub store_rollbacks: IntCounterVec,
}

fn build() -> Metrics {
    let registry = Registry::new();
    let counter_vec = |name: &str, help: &str, labels: &[&str]| {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
        registry.register(Box::new(c.clone())).expect("register");
        c
    };
    let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric");
        registry.register(Box::new(g.clone())).expect("register");
        g
    };
    let submits = counter_vec(
        "writeback_submits_total",
        "Answers given to Submit callers",
        &["tenant", "kind", "outcome"],
    );
    let acknowledgments = counter_vec(
        "writeback_acknowledgments_total",
        "Outcomes recorded from agents",
        &["tenant", "forest", "outcome"],
    );
    let stage_seconds = HistogramVec::new(
        HistogramOpts::new(
            "writeback_stage_seconds",
            "Time spent per stage of an operation",
        )
        .buckets(relay::metrics::LATENCY_BUCKETS.to_vec()),
        &["stage"],
    )
    .expect("metric");
    registry
        .register(Box::new(stage_seconds.clone()))
        .expect("register");
    let queue_depth = gauge_vec(
        "writeback_queue_depth",
        "Entries in a forest's queue",
        &["tenant", "forest"],
    );
    let queue_oldest_age_seconds = GaugeVec::new(
        Opts::new(
            "writeback_queue_oldest_age_seconds",
            "Age of the oldest entry in a forest's queue",
        ),
        &["tenant", "forest"],
    )
    .expect("metric");
    registry
        .register(Box::new(queue_oldest_age_seconds.clone()))
        .expect("register");
    let connected_agents = gauge_vec(
        "writeback_connected_agents",
        "Agent streams held by this replica",
        &["tenant", "forest"],
    );
    let agent_sessions = counter_vec(
        "writeback_agent_sessions_total",
        "Agent streams opened (reconnects included)",
        &["tenant", "forest"],
    );
    let redis_errors =
        IntCounter::new("writeback_redis_errors_total", "Failed Redis operations").expect("metric");
    registry
        .register(Box::new(redis_errors.clone()))
        .expect("register");
    let live_agents = gauge_vec(
        "writeback_live_agents",
        "Agent instances heard from recently, per forest",
        &["tenant", "forest"],
    );
    let forest_healthy = gauge_vec(
        "writeback_forest_healthy",
        "1 when the forest's last end-to-end canary passed",
        &["tenant", "forest"],
    );
    let store_rollbacks = counter_vec(
        "writeback_store_rollbacks_total",
        "Times the store was found restored from an older state (its sequence behind one seen)",
        &["tenant"],
    );
    Metrics {
        store_rollbacks,
        registry,
        submits,
        acknowledgments,
        stage_seconds,
        queue_depth,
        queue_oldest_age_seconds,
        connected_agents,
        agent_sessions,
        redis_errors,
        live_agents,
        forest_healthy,
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(build);

/// The process's gateway metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}
