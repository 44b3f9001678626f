//! The benchmark harness of issue 11 (`make bench`): a load generator for the gateway's
//! Writeback API over gRPC/TLS (`load`), exact latency percentiles (`stats`), CPU and memory
//! of the processes under test from /proc (`procfs`), the system under test as separate
//! processes (`stack`), the plots (`svg`), and the BENCHMARK-ONLY no-op agent writer (`noop`),
//! which exists only in this crate.

pub mod load;
pub mod noop;
pub mod procfs;
pub mod stack;
pub mod stats;
pub mod svg;

/// A comma-separated list of numbers from environment variable `name`, or `default`.
pub fn env_list(name: &str, default: &[f64]) -> Vec<f64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.split(',').filter_map(|x| x.trim().parse().ok()).collect()
        }
        _ => default.to_vec(),
    }
}

/// A number from environment variable `name`, or `default`.
pub fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}
