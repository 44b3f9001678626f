//! The agent's Prometheus metrics, served only on a loopback address (`--metrics-listen`).

use std::sync::LazyLock;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// Operations applied (or refused), by kind and outcome.
    pub operations: IntCounterVec,
    /// LDAP time per step: `lookup`, `write`.
    pub ldap_seconds: HistogramVec,
    /// LDAP connection and protocol failures.
    pub ldap_errors: IntCounter,
    /// Connections made to the gateway (a reconnect counts again).
    pub gateway_connects: IntCounter,
    /// 1 while the stream to the gateway is up.
    pub connected: IntGauge,
    pub in_flight: IntGauge,
}

fn build() -> Metrics {
    let registry = Registry::new();
    let operations = IntCounterVec::new(
        Opts::new(
            "agent_operations_total",
            "Operations handled, by kind and outcome",
        ),
        &["kind", "outcome"],
    )
    .expect("metric");
    let ldap_seconds = HistogramVec::new(
        HistogramOpts::new("agent_ldap_seconds", "LDAP time per step")
            .buckets(relay::metrics::LATENCY_BUCKETS.to_vec()),
        &["step"],
    )
    .expect("metric");
    let ldap_errors = IntCounter::new(
        "agent_ldap_errors_total",
        "LDAP connection and protocol failures",
    )
    .expect("metric");
    let gateway_connects = IntCounter::new(
        "agent_gateway_connects_total",
        "Connections made to the gateway",
    )
    .expect("metric");
    let connected = IntGauge::new("agent_connected", "1 while the stream to the gateway is up")
        .expect("metric");
    let in_flight = IntGauge::new("agent_in_flight", "Operations being applied").expect("metric");
    for m in [
        Box::new(operations.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(ldap_seconds.clone()),
        Box::new(ldap_errors.clone()),
        Box::new(gateway_connects.clone()),
        Box::new(connected.clone()),
        Box::new(in_flight.clone()),
    ] {
        registry.register(m).expect("register");
    }
    Metrics {
        registry,
        operations,
        ldap_seconds,
        ldap_errors,
        gateway_connects,
        connected,
        in_flight,
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(build);

/// The process's agent metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}
