//! The one place where gateway errors become gRPC statuses. Messages name what was wrong and
//! never carry a secret; internal details go to the log, not to the caller.

use tonic::{Code, Status};

use crate::store::{InvalidId, StoreError};
use crate::tenants::TenantError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "missing or malformed authorization: expected metadata `authorization: Bearer <token>`"
    )]
    Unauthenticated,
    #[error("the bearer token is not valid for any tenant (unknown, or rotated)")]
    UnknownToken,
    #[error("{0}")]
    AgentRefused(#[from] crate::tenants::AgentRefusal),
    #[error("the gateway's store has lost its data (restarted empty or from another state); writeback is unavailable until an operator restores it (nothing was queued)")]
    StoreLost,
    #[error("the token does not belong to tenant {0:?}")]
    WrongTenant(String),
    #[error("{field}: {problem}")]
    InvalidArgument {
        field: &'static str,
        problem: String,
    },
    #[error("operation {0:?} not found")]
    NotFound(String),
    #[error("operation_id {0:?} was already used for a different request (another user, forest or kind); use a new operation_id")]
    Conflict(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("tenant {tenant:?} is over its rate of calls; retry (with the same operation_id) in {retry_ms} ms")]
    RateLimited { tenant: String, retry_ms: u64 },
    #[error("this user has reached the limit of {limit} {what} per {window_s} s; nothing was queued, retry in {retry_ms} ms")]
    UserLimited {
        what: &'static str,
        limit: u32,
        window_s: u64,
        retry_ms: u64,
    },
    #[error("the queue of forest {forest:?} holds {limit} operations, its limit; nothing was queued, retry with the same operation_id later")]
    QueueFull { forest: String, limit: u64 },
    #[error("the tenant has {limit} operations not yet settled, its limit; nothing was queued, retry with the same operation_id later")]
    TenantQueueFull { limit: u64 },
    #[error("the gateway cannot reach its store; retry with the same operation_id")]
    Store(#[from] StoreError),
    #[error("the enrollment token is unknown, used already, or expired: ask for a new one (`cloud-gateway admin enroll-agent`)")]
    EnrollmentRefused,
    #[error("internal error")]
    Internal(String),
}

impl GatewayError {
    pub fn invalid(field: &'static str, problem: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            problem: problem.into(),
        }
    }
}

/// A refused id is `INVALID_ARGUMENT` naming its field.
impl From<InvalidId> for GatewayError {
    fn from(e: InvalidId) -> Self {
        Self::InvalidArgument {
            field: e.field,
            problem: e.problem,
        }
    }
}

impl From<TenantError> for GatewayError {
    fn from(e: TenantError) -> Self {
        match e {
            TenantError::Store(s) => Self::Store(s),
            TenantError::UnknownTenant(t) => Self::WrongTenant(t),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl GatewayError {
    /// The gRPC code's name (`RESOURCE_EXHAUSTED`, …), for records and audit.
    pub fn code_name(&self) -> &'static str {
        match self.code() {
            Code::Unauthenticated => "UNAUTHENTICATED",
            Code::Unavailable => "UNAVAILABLE",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            _ => "INTERNAL",
        }
    }

    /// The gRPC code callers get for it.
    pub fn code(&self) -> Code {
        match self {
            GatewayError::Unauthenticated
            | GatewayError::UnknownToken
            | GatewayError::AgentRefused(_)
            | GatewayError::EnrollmentRefused => Code::Unauthenticated,
            GatewayError::StoreLost => Code::Unavailable,
            GatewayError::WrongTenant(_) => Code::PermissionDenied,
            GatewayError::InvalidArgument { .. } => Code::InvalidArgument,
            GatewayError::NotFound(_) => Code::NotFound,
            GatewayError::Conflict(_) => Code::AlreadyExists,
            GatewayError::FailedPrecondition(_) => Code::FailedPrecondition,
            GatewayError::Store(_) | GatewayError::Unavailable(_) => Code::Unavailable,
            GatewayError::RateLimited { .. }
            | GatewayError::UserLimited { .. }
            | GatewayError::QueueFull { .. }
            | GatewayError::TenantQueueFull { .. } => Code::ResourceExhausted,
            GatewayError::Internal(_) => Code::Internal,
        }
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        let code = e.code();
        match &e {
            GatewayError::Store(inner) => {
                crate::metrics::get().redis_errors.inc();
                tracing::warn!(event = "WB1090", error = %inner, "store error")
            }
            GatewayError::Internal(detail) => tracing::error!(%detail, "internal error"),
            _ => {}
        }
        let mut status = Status::new(code, e.to_string());
        // gRPC's standard retry hint, for clients that honour it.
        if let GatewayError::RateLimited { retry_ms, .. }
        | GatewayError::UserLimited { retry_ms, .. } = &e
        {
            if let Ok(v) = retry_ms.to_string().parse() {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_spec_codes() {
        let s: Status = GatewayError::invalid("user.forest", "must not be empty").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "user.forest: must not be empty");
        assert_eq!(
            Status::from(GatewayError::Unauthenticated).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            Status::from(GatewayError::WrongTenant("b".into())).code(),
            Code::PermissionDenied
        );
        let internal = Status::from(GatewayError::Internal("secret detail".into()));
        assert_eq!(internal.message(), "internal error");
    }
}
