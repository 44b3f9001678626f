//! Authentication of every call, as one tower layer in front of all gRPC services: a call to
//! `writeback.v1.Writeback` must carry a tenant token, a call to `writeback.v1.AgentLink` an
//! agent credential (an enrolled client certificate, or a registered secret). The layer puts who the caller is ([`CallerTenant`] or
//! [`AgentIdentity`]) in the request's extensions, so a handler — including one added later —
//! cannot run unauthenticated: without the extension it has nobody to act for.
//!
//! A credential the store does not know is checked against the store marker first: when the
//! store has lost its data (restarted empty), callers hear `UNAVAILABLE`, never a false
//! `UNAUTHENTICATED` for a token that was valid.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::enroll::EnrolledName;
use crate::error::GatewayError;
use crate::store::TenantId;
use crate::tenants::AgentIdentity;
use crate::Gateway;

/// The tenant a Writeback call's token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerTenant(pub TenantId);

const WRITEBACK_PREFIX: &str = "/writeback.v1.Writeback/";
const AGENT_LINK_PREFIX: &str = "/writeback.v1.AgentLink/";

/// The credential in `authorization: Bearer <credential>`.
fn bearer(headers: &http::HeaderMap) -> Result<&str, GatewayError> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(GatewayError::Unauthenticated)
}

/// `UNAVAILABLE` when the store lost its data; otherwise `refusal`.
async fn unknown_credential(gw: &Gateway, refusal: GatewayError) -> GatewayError {
    match gw.store.epoch().await {
        Ok(Some(epoch)) if gw.epoch.get_or_init(|| epoch.clone()) == &epoch => refusal,
        Ok(found) => {
            tracing::error!(event = "WB1091", known = ?gw.epoch.get(), found = ?found, "the store has lost its data (its marker is gone or changed); answering UNAVAILABLE");
            GatewayError::StoreLost
        }
        Err(e) => GatewayError::Store(e),
    }
}

async fn tenant_of(gw: &Gateway, headers: &http::HeaderMap) -> Result<CallerTenant, GatewayError> {
    let token = bearer(headers)?;
    match gw.tenants.tenant_for_token(token).await? {
        Some(tenant) => Ok(CallerTenant(tenant)),
        None => Err(unknown_credential(gw, GatewayError::UnknownToken).await),
    }
}

/// The name in the client certificate of the call's connection, if it presented one.
fn peer_name<B>(req: &http::Request<B>) -> Option<Option<EnrolledName>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| {
            certs
                .first()
                .map(|c| EnrolledName::from_certificate(c.as_ref()))
        })
}

/// The agent a call comes from: by its enrolled client certificate when it presented one (the
/// TLS layer verified it against the agent CA), else by its bearer secret.
async fn agent_of(
    gw: &Gateway,
    enrolled: Option<Option<EnrolledName>>,
    headers: &http::HeaderMap,
) -> Result<AgentIdentity, GatewayError> {
    let checked = match enrolled {
        Some(Some(who)) => gw.tenants.authenticate_enrolled(&who).await?,
        // A client certificate of the agent CA that names no agent: nobody.
        Some(None) => return Err(GatewayError::Unauthenticated),
        None => gw.tenants.authenticate_agent(bearer(headers)?).await?,
    };
    match checked {
        Ok(identity) => Ok(identity),
        Err(refusal) => Err(unknown_credential(gw, GatewayError::AgentRefused(refusal)).await),
    }
}

/// The layer: `Server::builder().layer(AuthLayer::new(gateway))`.
#[derive(Clone)]
pub struct AuthLayer {
    gw: Gateway,
}

impl AuthLayer {
    pub fn new(gw: Gateway) -> Self {
        Self { gw }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            gw: self.gw.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the router.
#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    gw: Gateway,
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gw = self.gw.clone();
        Box::pin(async move {
            let path = req.uri().path();
            let checked = if path.starts_with(WRITEBACK_PREFIX) {
                tenant_of(&gw, req.headers())
                    .await
                    .map(|t| req.extensions_mut().insert(t).map(drop))
            } else if path.starts_with(AGENT_LINK_PREFIX) {
                agent_of(&gw, peer_name(&req), req.headers())
                    .await
                    .map(|a| req.extensions_mut().insert(a).map(drop))
            } else {
                // Health and reflection are public; enrollment's token is checked by its
                // handler (it is the one credential that call takes).
                Ok(None)
            };
            match checked {
                Ok(_) => inner.call(req).await,
                Err(e) => Ok(tonic::Status::from(e).into_http()),
            }
        })
    }
}

/// The tenant the layer authenticated for this call.
///
/// # Errors
/// `UNAUTHENTICATED` when the call did not pass through [`AuthLayer`].
pub fn caller_tenant<T>(req: &tonic::Request<T>) -> Result<&TenantId, GatewayError> {
    req.extensions()
        .get::<CallerTenant>()
        .map(|t| &t.0)
        .ok_or(GatewayError::Unauthenticated)
}

/// The agent the layer authenticated for this call.
///
/// # Errors
/// `UNAUTHENTICATED` when the call did not pass through [`AuthLayer`].
pub fn caller_agent<T>(req: &tonic::Request<T>) -> Result<AgentIdentity, GatewayError> {
    req.extensions()
        .get::<AgentIdentity>()
        .cloned()
        .ok_or(GatewayError::Unauthenticated)
}
