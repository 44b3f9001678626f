//! BENCHMARK ONLY: a [`Writer`] that touches no directory and answers `APPLIED` at once, so a
//! benchmark measures the relay's own cost (gateway, Redis, link, envelope) without AD. It
//! lives only in this crate; `onprem-agent run` cannot use it (the agent crate does not know
//! it, and `bench/tests/noop_writer.rs` checks that).

use std::time::Instant;

use onprem_agent::directory::{ApplyResult, Rules, Verified, WriteMark};
use onprem_agent::writer::{Writer, WriterFuture};
use relay::proto::{Outcome, PolicyViolation, SealedOperation};

/// BENCHMARK ONLY: applies nothing, answers `APPLIED`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopWriter;

impl Writer for NoopWriter {
    fn apply<'a>(
        &'a self,
        _op: &'a SealedOperation,
        _deadline: Instant,
        _rules: &'a Rules,
        _on_write: &'a (dyn Fn(&WriteMark) + Sync),
    ) -> WriterFuture<'a, ApplyResult> {
        Box::pin(async {
            ApplyResult {
                outcome: Outcome::Applied,
                policy_violation: PolicyViolation::Unspecified,
                message: "Benchmark: nothing was written.".to_owned(),
                detail: "benchmark no-op writer: no directory was touched".to_owned(),
                lookup_ms: 0,
                write_ms: 0,
                directory: "noop://benchmark".to_owned(),
                policy: None,
                user: None,
                uncertain: None,
            }
        })
    }

    fn verify<'a>(
        &'a self,
        _mark: &'a WriteMark,
        _until: Instant,
    ) -> WriterFuture<'a, Option<Verified>> {
        Box::pin(async { None })
    }
}
