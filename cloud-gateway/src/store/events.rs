//! What replicas tell each other about agents over [`AGENTS_CHANNEL`](super::AGENTS_CHANNEL).

use super::TenantId;

/// One agent event. Agent ids are per tenant, so each names the tenant too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The agent was revoked or its credential replaced: close every stream of it.
    Revoke { tenant: TenantId, agent_id: String },
    /// The agent opened stream `stream`: close its others (one stream per agent identity).
    Connect {
        tenant: TenantId,
        agent_id: String,
        stream: u64,
    },
}

impl AgentEvent {
    /// `revoke\0<tenant>\0<agent id>` or `connect\0<tenant>\0<agent id>\0<stream>` (ids never
    /// hold a NUL: they are checked tokens).
    pub fn encode(&self) -> String {
        match self {
            Self::Revoke { tenant, agent_id } => format!("revoke\0{tenant}\0{agent_id}"),
            Self::Connect {
                tenant,
                agent_id,
                stream,
            } => format!("connect\0{tenant}\0{agent_id}\0{stream}"),
        }
    }

    /// The event `payload` encodes, or `None` for anything else (an event of an older or newer
    /// replica is ignored, not misread).
    pub fn parse(payload: &str) -> Option<Self> {
        let parts: Vec<&str> = payload.split('\0').collect();
        match parts[..] {
            ["revoke", tenant, agent_id] => Some(Self::Revoke {
                tenant: TenantId::from_store(tenant.to_owned()),
                agent_id: agent_id.to_owned(),
            }),
            ["connect", tenant, agent_id, stream] => Some(Self::Connect {
                tenant: TenantId::from_store(tenant.to_owned()),
                agent_id: agent_id.to_owned(),
                stream: stream.parse().ok()?,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_others_are_ignored() {
        let t = TenantId::new("acme").unwrap();
        for e in [
            AgentEvent::Revoke {
                tenant: t.clone(),
                agent_id: "dc1.corp".into(),
            },
            AgentEvent::Connect {
                tenant: t,
                agent_id: "dc1".into(),
                stream: u64::MAX,
            },
        ] {
            assert_eq!(AgentEvent::parse(&e.encode()), Some(e));
        }
        // The form of replicas from before per-tenant ids, and garbage.
        for old in [
            "revoke\0dc1",
            "connect\0dc1\x0042",
            "connect\0acme\0dc1\0x",
            "",
        ] {
            assert_eq!(AgentEvent::parse(old), None, "{old:?}");
        }
    }
}
