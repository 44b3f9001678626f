//! The agent's sealing keys: X25519 key pairs created on this host, kept in
//! `<state_dir>/sealing.keys` (mode 0600, refused when others may read it), never sent anywhere.
//! The gateway seals each operation to the current key of every live agent of the forest (the
//! agent announces its public half in every Hello).
//!
//! An enrolled agent's certificate is bound to its current key: the key rotates with the
//! certificate (a new one at enrollment and at every renewal, [`rotate_to`]). An agent with a
//! registered secret rotates it with `onprem-agent rotate-key` ([`rotate`]). Either way the
//! previous keys are kept for [`RETIRED_KEPT`], so operations sealed to them before the
//! rotation still open, and a running agent announces the new key at its next connection.
//! Without a state directory the key lives in memory for the life of the process.
//!
//! File format, one key per line, current first: `<key id> <created unix ms> <retired unix ms,
//! 0 for the current key> <private key hex>`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use relay::envelope::{AgentKey, AgentKeyring, KeyBytes};
use zeroize::Zeroizing;

/// How long a retired key is kept after a rotation: longer than any operation's deadline and
/// answer grace.
pub const RETIRED_KEPT: Duration = Duration::from_secs(24 * 3600);

const FILE: &str = "sealing.keys";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{path}: line {line}: {detail}")]
    Malformed {
        path: PathBuf,
        line: usize,
        detail: &'static str,
    },
    #[error("{0}")]
    Crypto(#[from] relay::envelope::EnvelopeError),
    #[error("this agent is enrolled: its sealing key is bound to its certificate and rotates with it at every renewal (at half the certificate's lifetime); a key rotated by hand would be refused by the gateway. To rotate now, enroll it again (`cloud-gateway admin enroll-agent`, then `onprem-agent enroll`): that makes a new sealing key too")]
    Enrolled,
}

struct Entry {
    key: AgentKey,
    created_ms: i64,
    retired_ms: i64,
}

/// Where the keys of an agent with this state directory live.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The agent's keys: read from `state_dir` (created there on first start), or a fresh key in
/// memory when there is no state directory.
///
/// # Errors
/// When the file cannot be read or written, is not private, or is malformed.
pub fn load_or_create(state_dir: Option<&Path>) -> Result<AgentKeyring, KeyError> {
    let Some(dir) = state_dir else {
        return Ok(AgentKeyring::new(AgentKey::generate()?, Vec::new()));
    };
    std::fs::create_dir_all(dir)?;
    let file = path(dir);
    let mut entries = if file.exists() {
        read(&file)?
    } else {
        Vec::new()
    };
    if entries.is_empty() {
        entries.push(Entry {
            key: AgentKey::generate()?,
            created_ms: relay::now_unix_ms(),
            retired_ms: 0,
        });
        write(&file, &entries)?;
        tracing::info!(event = "WB2022", sealing_key_id = %entries[0].key.public().id(), path = %file.display(), "created this agent's sealing key");
    }
    let mut keys = entries.into_iter().map(|e| e.key);
    let current = keys.next().expect("at least one key");
    Ok(AgentKeyring::new(current, keys.collect()))
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub new_key_id: String,
    pub retired_key_id: Option<String>,
    /// Retired keys kept (still opening what was sealed to them).
    pub kept: usize,
    /// Retired keys older than [`RETIRED_KEPT`], deleted.
    pub dropped: usize,
}

/// Makes a new current key in `state_dir`, retiring the current one.
///
/// # Errors
/// As [`load_or_create`].
pub fn rotate(state_dir: &Path) -> Result<Rotated, KeyError> {
    rotate_to(state_dir, AgentKey::generate()?)
}

/// `onprem-agent rotate-key`: [`rotate`], for an agent with a registered secret.
///
/// # Errors
/// [`KeyError::Enrolled`] for an enrolled agent (its key rotates with its certificate); as
/// [`load_or_create`].
pub fn rotate_by_hand(state_dir: &Path) -> Result<Rotated, KeyError> {
    if crate::identity::is_enrolled(state_dir) {
        return Err(KeyError::Enrolled);
    }
    rotate(state_dir)
}

/// Makes `key` the current key in `state_dir` (a key the agent's new certificate is bound
/// to), retiring the current one.
///
/// # Errors
/// As [`load_or_create`].
pub fn rotate_to(state_dir: &Path, key: AgentKey) -> Result<Rotated, KeyError> {
    std::fs::create_dir_all(state_dir)?;
    let file = path(state_dir);
    let mut entries = if file.exists() {
        read(&file)?
    } else {
        Vec::new()
    };
    let now = relay::now_unix_ms();
    let retired_key_id = entries.first().map(|e| e.key.public().id().to_owned());
    if let Some(current) = entries.first_mut() {
        current.retired_ms = now;
    }
    let before = entries.len();
    entries.retain(|e| now - e.retired_ms < RETIRED_KEPT.as_millis() as i64);
    let dropped = before - entries.len();
    let kept = entries.len();
    entries.insert(
        0,
        Entry {
            key,
            created_ms: now,
            retired_ms: 0,
        },
    );
    write(&file, &entries)?;
    Ok(Rotated {
        new_key_id: entries[0].key.public().id().to_owned(),
        retired_key_id,
        kept,
        dropped,
    })
}

fn read(file: &Path) -> Result<Vec<Entry>, KeyError> {
    relay::secret::check_private(file)?;
    let text = Zeroizing::new(std::fs::read_to_string(file).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot read {}: {e}", file.display()))
    })?);
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |detail| KeyError::Malformed {
            path: file.to_owned(),
            line: i + 1,
            detail,
        };
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [id, created, retired, secret] = parts[..] else {
            return Err(bad(
                "expected `<key id> <created ms> <retired ms> <key hex>`",
            ));
        };
        let raw = Zeroizing::new(hex::decode(secret).map_err(|_| bad("key is not hex"))?);
        let key = AgentKey::from_secret(
            &KeyBytes::from_slice(&raw).map_err(|_| bad("key is not 32 bytes"))?,
        )?;
        if key.public().id() != id {
            return Err(bad("key id does not match the key (edited by hand?)"));
        }
        out.push(Entry {
            key,
            created_ms: created
                .parse()
                .map_err(|_| bad("created is not a number"))?,
            retired_ms: retired
                .parse()
                .map_err(|_| bad("retired is not a number"))?,
        });
    }
    Ok(out)
}

fn write(file: &Path, entries: &[Entry]) -> Result<(), KeyError> {
    let mut text = Zeroizing::new(String::new());
    for e in entries {
        let secret = e.key.secret_bytes();
        let hex = Zeroizing::new(hex::encode(secret.expose()));
        text.push_str(&format!(
            "{} {} {} {}\n",
            e.key.public().id(),
            e.created_ms,
            e.retired_ms,
            hex.as_str()
        ));
    }
    // Written beside and renamed over: a crash leaves the old file or the new one.
    let tmp = file.with_extension("keys.tmp");
    relay::secret::write_private(&tmp, &text)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(Some(dir.path())).unwrap();
        let b = load_or_create(Some(dir.path())).unwrap();
        assert_eq!(a.current().public(), b.current().public());
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rotation_keeps_the_old_key_for_what_was_sealed_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(Some(dir.path())).unwrap();
        let old = first.current().public().clone();
        let r = rotate(dir.path()).unwrap();
        assert_eq!(r.retired_key_id.as_deref(), Some(old.id()));
        assert_eq!((r.kept, r.dropped), (1, 0));
        let ring = load_or_create(Some(dir.path())).unwrap();
        assert_eq!(ring.current().public().id(), r.new_key_id);
        assert_eq!(ring.keys()[1].public(), &old);
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(Some(dir.path())).unwrap();
        let file = path(dir.path());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("644") && e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_hand_edited_file_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(dir.path());
        relay::secret::write_private(&file, "0011223344556677 1 0 zz\n").unwrap();
        let e = load_or_create(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("not hex"), "{e}");
    }
}
