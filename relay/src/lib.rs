//! Shared library of the writeback relay: the `writeback.v1` protocol, the per-tenant crypto
//! envelope, secrets that zeroize, TLS, backoff, trace-context and telemetry helpers used by
//! both the gateway and the agent.

pub mod ad;
pub mod backoff;
pub mod dn;
pub mod envelope;
pub mod messages;
pub mod metrics;
pub mod proto;
pub mod scope;
pub mod secret;
pub mod telemetry;
pub mod tls;
pub mod trace;

/// Current wall-clock time as Unix milliseconds.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Version string agents and gateways report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
