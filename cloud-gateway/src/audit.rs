//! The audit trail: one JSON line per operation request (what the caller asked and was
//! answered), per recorded outcome (what the agent reported AD did), and per admin action —
//! who, tenant, target user reference, kind, outcome, agent, timings. Never a secret: the
//! records are built from typed fields, none of which holds a password, token or key.
//!
//! Kept apart from the debug logs (stderr): stdout by default (`--audit-log -`), or appended to
//! a private file (`--audit-log /var/log/writeback/audit.jsonl`, created 0600).

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

/// Where audit records go.
pub enum Audit {
    Stdout,
    Stderr,
    File(Mutex<std::fs::File>),
    Off,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stdout => "Audit(stdout)",
            Self::Stderr => "Audit(stderr)",
            Self::File(_) => "Audit(file)",
            Self::Off => "Audit(off)",
        })
    }
}

/// One audit record.
#[derive(Debug, Default, Serialize)]
pub struct Record<'a> {
    /// `operation` (a Submit answered), `outcome` (an agent's answer recorded) or `admin`.
    pub record: &'a str,
    pub at_unix_ms: i64,
    /// Who acted: `tenant:<id>` for a caller, `agent:<id>` for an agent, `admin` (with the
    /// local user) for the admin commands.
    pub actor: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub tenant: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub forest: &'a str,
    /// The user as named (`sam:…`, `upn:…`, `guid:…`), never a password.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub user: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub operation_id: &'a str,
    /// reset, change, unlock, … or the admin command.
    pub action: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub initiator: &'a str,
    /// The outcome, or the error code for a refused call.
    pub outcome: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub detail: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub agent_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub agent_instance: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub replica: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub trace_id: &'a str,
}

impl Audit {
    /// `-` for stdout, `stderr`, `off`, or a file appended to (created 0600).
    ///
    /// # Errors
    /// When the file cannot be opened, or exists readable by others.
    pub fn open(target: &str) -> std::io::Result<Self> {
        match target {
            "-" | "" => Ok(Self::Stdout),
            "stderr" => Ok(Self::Stderr),
            "off" => Ok(Self::Off),
            path => {
                use std::os::unix::fs::OpenOptionsExt;
                let path = Path::new(path);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("audit log {}: {e}", path.display()))
                    })?;
                relay::secret::check_private(path)?;
                Ok(Self::File(Mutex::new(file)))
            }
        }
    }

    /// Writes one record (a failure to write is logged, never fatal).
    pub fn record(&self, record: &Record<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an audit record");
                return;
            }
        };
        line.push(b'\n');
        let written = match self {
            Self::Off => Ok(()),
            Self::Stdout => std::io::stdout().lock().write_all(&line),
            Self::Stderr => std::io::stderr().lock().write_all(&line),
            Self::File(f) => f.lock().expect("audit file").write_all(&line),
        };
        if let Err(e) = written {
            tracing::error!(event = "WB1094", error = %e, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_json_lines_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(path.to_str().unwrap()).unwrap();
        for op in ["op-1", "op-2"] {
            audit.record(&Record {
                record: "operation",
                at_unix_ms: 1,
                actor: "tenant:acme".into(),
                tenant: "acme",
                user: "sam:alice",
                operation_id: op,
                action: "reset",
                outcome: "APPLIED",
                ..Default::default()
            });
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["operation_id"], "op-2");
        assert!(
            lines[0].get("agent_id").is_none(),
            "empty fields are left out"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
