//! The seam where the agent applies an operation to the directory: the link hands every opened
//! operation to a [`Writer`]. `run` always uses [`Domains`](crate::domains::Domains) (AD over
//! LDAPS); nothing in the agent's flags, environment or settings file selects another one. The
//! benchmark crate's no-op writer is plugged in only through [`Agent::with_writer`]
//! (crate::link::Agent::with_writer), from its own binary.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use relay::proto::SealedOperation;

use crate::directory::{ApplyResult, Rules, Verified, WriteMark};
use crate::domains::Domains;

/// A boxed future borrowing the writer and its arguments.
pub type WriterFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Applies opened operations to a directory and reads unconfirmed writes back.
pub trait Writer: Send + Sync {
    /// Applies `op` before `deadline` under `rules`; `on_write` is called with what to read
    /// back just before a write is sent (the link journals it).
    fn apply<'a>(
        &'a self,
        op: &'a SealedOperation,
        deadline: Instant,
        rules: &'a Rules,
        on_write: &'a (dyn Fn(&WriteMark) + Sync),
    ) -> WriterFuture<'a, ApplyResult>;

    /// Reads an unconfirmed write back (`None`: the directory could not tell by `until`).
    fn verify<'a>(
        &'a self,
        mark: &'a WriteMark,
        until: Instant,
    ) -> WriterFuture<'a, Option<Verified>>;
}

impl Writer for Domains {
    fn apply<'a>(
        &'a self,
        op: &'a SealedOperation,
        deadline: Instant,
        rules: &'a Rules,
        on_write: &'a (dyn Fn(&WriteMark) + Sync),
    ) -> WriterFuture<'a, ApplyResult> {
        Box::pin(Domains::apply(self, op, deadline, rules, on_write))
    }

    fn verify<'a>(
        &'a self,
        mark: &'a WriteMark,
        until: Instant,
    ) -> WriterFuture<'a, Option<Verified>> {
        Box::pin(Domains::verify(self, mark, until))
    }
}
