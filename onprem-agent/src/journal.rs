//! The agent's write-ahead journal, and the stable instance identity tied to it.
//!
//! Before an operation touches AD, its intent is appended and fsynced; after, its outcome.
//! The gateway re-sends unacknowledged work only to the instance it delivered it to, and a
//! restarted agent keeps its instance id (stored beside the journal), so after any crash a
//! redelivered operation is answered from here instead of being applied again:
//! - an outcome on file is sent again as it was;
//! - an intent without an outcome (the process died mid-write) is never applied again and
//!   never answered "nothing changed" unless AD says so: just before the write the agent
//!   appends what it read of the user ([`WriteMark`]), and with it reads the write back from
//!   AD ([`crate::directory::Directory::verify`]); without one, or when AD cannot tell, it
//!   stays silent and the gateway settles it `TIMED_OUT` ("it may or may not have been
//!   applied").
//!
//! It also keeps the highest store sequence the agent has received (`Work.store_seq`) and for
//! which tenant, written with each intent; the agent reports it in its Hello, so the gateway
//! can tell a store restored from an older state (cloud-gateway `rollback.rs`).
//!
//! Without a state directory the journal lives in memory only (tests, `doctor`): it still
//! answers redeliveries within the process, as before.
//!
//! The file holds JSON lines `{"op","at","intent":true}`, `{"op","at","writing":<mark>}` and
//! `{"op","at","ack":<base64>}` (none holds a secret). The mark is appended without fsync: it
//! survives a crash of the process (the case it is for), and when the host loses it the
//! outcome stays "unknown", never a guess. Entries older than [`KEEP`] are dropped when the
//! journal is opened, and the file is rewritten then.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use prost::Message;
use serde::{Deserialize, Serialize};

use relay::proto::Ack;

use crate::directory::WriteMark;

/// How long outcomes are kept to answer redeliveries (well beyond any operation's deadline).
pub const KEEP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal {path} line {line}: {detail}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Line {
    /// Empty on the line that carries only the store high water over a rewrite.
    op: String,
    at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    intent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writing: Option<WriteMark>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ack: Option<String>,
}

/// What to do with an operation about to be applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// Not seen before: its intent is now on disk; apply it, then [`Journal::finish`].
    Apply,
    /// Answered before: send this again.
    Answer(Box<Ack>),
    /// Being applied right now by this process: its first delivery will answer.
    Running,
    /// An earlier process started it and died before recording the outcome: do not apply it
    /// again. With the mark it wrote just before the write, if it got that far: read the
    /// write back from AD to learn whether it landed.
    Uncertain(Option<WriteMark>),
}

enum Entry {
    Intent(Option<WriteMark>),
    Done(Box<Ack>),
}

struct State {
    entries: HashMap<String, (i64, Entry)>,
    /// The highest store sequence received, and its tenant.
    high_water: Option<(String, u64)>,
    running: HashSet<String>,
    file: Option<File>,
}

/// See the module documentation.
pub struct Journal {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Journal {
    /// A journal that forgets everything when the process ends.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            state: Mutex::new(State {
                entries: HashMap::new(),
                high_water: None,
                running: HashSet::new(),
                file: None,
            }),
        }
    }

    /// Opens (or creates) the journal in `dir` and returns it with this agent's instance id,
    /// created once and kept in `dir/instance`.
    ///
    /// # Errors
    /// When the directory cannot be used or the journal is corrupt (it is never guessed at).
    pub fn open(dir: &Path) -> Result<(Self, String), JournalError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let id_path = dir.join("instance");
        let instance = match std::fs::read_to_string(&id_path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
            Ok(_) | Err(_) => {
                let id = uuid::Uuid::new_v4().to_string();
                let tmp = dir.join("instance.tmp");
                std::fs::write(&tmp, &id).map_err(io(&tmp))?;
                File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(io(&tmp))?;
                std::fs::rename(&tmp, &id_path).map_err(io(&id_path))?;
                id
            }
        };
        let path = dir.join("journal.jsonl");
        let mut entries = HashMap::new();
        let mut high_water: Option<(String, u64)> = None;
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let lines: Vec<&str> = text.lines().collect();
            for (n, line) in lines.iter().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let corrupt = |detail: String| JournalError::Corrupt {
                    path: path.clone(),
                    line: n + 1,
                    detail,
                };
                let l: Line = match serde_json::from_str(line) {
                    Ok(l) => l,
                    // A torn last line (crash mid-append) is the only damage tolerated.
                    Err(_) if n + 1 == lines.len() => break,
                    Err(e) => return Err(corrupt(e.to_string())),
                };
                if let (Some(t), Some(n)) = (&l.tenant, l.seq) {
                    raise(&mut high_water, t, n);
                }
                if l.op.is_empty() {
                    continue;
                }
                let entry = match (l.ack, l.writing) {
                    (Some(b64), _) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| corrupt(e.to_string()))?;
                        let ack =
                            Ack::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
                        Entry::Done(Box::new(ack))
                    }
                    (None, Some(mark)) => Entry::Intent(Some(mark)),
                    (None, None) if l.intent => Entry::Intent(None),
                    (None, None) => return Err(corrupt("neither intent nor outcome".into())),
                };
                // An outcome supersedes its intent; a later intent never replaces an outcome.
                match (entries.get(&l.op), &entry) {
                    (Some((_, Entry::Done(_))), Entry::Intent(_)) => {}
                    _ => {
                        entries.insert(l.op, (l.at, entry));
                    }
                }
            }
        }
        let cutoff = relay::now_unix_ms() - KEEP.as_millis() as i64;
        entries.retain(|_, (at, _)| *at >= cutoff);
        // Rewrite what is kept, then append from there.
        let tmp = dir.join("journal.jsonl.tmp");
        {
            let mut out = File::create(&tmp).map_err(io(&tmp))?;
            if let Some((tenant, seq)) = &high_water {
                let line = Line {
                    op: String::new(),
                    at: relay::now_unix_ms(),
                    tenant: Some(tenant.clone()),
                    seq: Some(*seq),
                    intent: false,
                    writing: None,
                    ack: None,
                };
                let line = serde_json::to_string(&line).expect("journal line serializes");
                writeln!(out, "{line}").map_err(io(&tmp))?;
            }
            for (op, (at, entry)) in &entries {
                writeln!(out, "{}", encode(op, *at, entry, None)).map_err(io(&tmp))?;
            }
            out.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let journal = Self {
            path: Some(path),
            state: Mutex::new(State {
                entries,
                high_water,
                running: HashSet::new(),
                file: Some(file),
            }),
        };
        Ok((journal, instance))
    }

    /// Decides what to do with `op`; for [`Begin::Apply`] its intent is durable on return.
    ///
    /// # Errors
    /// When the intent cannot be written (then the operation must not be applied).
    pub fn begin(&self, op: &str) -> Result<Begin, JournalError> {
        let mut state = self.state.lock().expect("journal");
        if state.running.contains(op) {
            return Ok(Begin::Running);
        }
        match state.entries.get(op) {
            Some((_, Entry::Done(ack))) => return Ok(Begin::Answer(ack.clone())),
            Some((_, Entry::Intent(mark))) => return Ok(Begin::Uncertain(mark.clone())),
            None => {}
        }
        let at = relay::now_unix_ms();
        let line = encode(op, at, &Entry::Intent(None), state.high_water.as_ref());
        self.append(&mut state, &line, true)?;
        state
            .entries
            .insert(op.to_owned(), (at, Entry::Intent(None)));
        state.running.insert(op.to_owned());
        Ok(Begin::Apply)
    }

    /// Records the outcome of an operation started with [`Journal::begin`].
    ///
    /// # Errors
    /// When it cannot be written (it is still answered from memory in this process).
    pub fn finish(&self, op: &str, ack: &Ack) -> Result<(), JournalError> {
        let mut state = self.state.lock().expect("journal");
        state.running.remove(op);
        let at = relay::now_unix_ms();
        let entry = Entry::Done(Box::new(ack.clone()));
        let line = encode(op, at, &entry, None);
        state.entries.insert(op.to_owned(), (at, entry));
        self.append(&mut state, &line, true)
    }

    /// Records what was read of the user just before the write of `op` goes to the DC (not
    /// fsynced: see the module documentation).
    ///
    /// # Errors
    /// When it cannot be written (the write then stays "unknown" after a crash).
    pub fn mark(&self, op: &str, mark: &WriteMark) -> Result<(), JournalError> {
        let mut state = self.state.lock().expect("journal");
        let at = relay::now_unix_ms();
        let entry = Entry::Intent(Some(mark.clone()));
        let line = encode(op, at, &entry, None);
        state.entries.insert(op.to_owned(), (at, entry));
        self.append(&mut state, &line, false)
    }

    /// Notes that `tenant`'s store has reached `seq` (on disk with the next intent).
    pub fn seen(&self, tenant: &str, seq: u64) {
        raise(
            &mut self.state.lock().expect("journal").high_water,
            tenant,
            seq,
        );
    }

    /// The highest store sequence received, and its tenant.
    pub fn high_water(&self) -> Option<(String, u64)> {
        self.state.lock().expect("journal").high_water.clone()
    }

    fn append(&self, state: &mut State, line: &str, sync: bool) -> Result<(), JournalError> {
        let (Some(file), Some(path)) = (state.file.as_mut(), self.path.as_ref()) else {
            return Ok(());
        };
        // Appends are a few hundred bytes; fsync (sync_data) makes each one durable before
        // the write to AD that it announces.
        writeln!(file, "{line}")
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
            .map_err(io(path))
    }
}

/// Raises the high water to `seq` (another tenant's sequence replaces it: the agent was
/// moved to another tenant).
fn raise(high_water: &mut Option<(String, u64)>, tenant: &str, seq: u64) {
    match high_water {
        _ if seq == 0 => {}
        Some((t, n)) if t == tenant => *n = (*n).max(seq),
        _ => *high_water = Some((tenant.to_owned(), seq)),
    }
}

fn encode(op: &str, at: i64, entry: &Entry, high_water: Option<&(String, u64)>) -> String {
    let (tenant, seq) = match high_water {
        Some((t, n)) => (Some(t.clone()), Some(*n)),
        None => (None, None),
    };
    let line = match entry {
        Entry::Intent(mark) => Line {
            op: op.to_owned(),
            at,
            tenant,
            seq,
            intent: true,
            writing: mark.clone(),
            ack: None,
        },
        Entry::Done(ack) => Line {
            op: op.to_owned(),
            at,
            tenant,
            seq,
            intent: false,
            writing: None,
            ack: Some(base64::engine::general_purpose::STANDARD.encode(ack.encode_to_vec())),
        },
    };
    serde_json::to_string(&line).expect("journal line serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(op: &str) -> Ack {
        Ack {
            operation_id: op.into(),
            outcome: relay::proto::Outcome::Applied as i32,
            message: "done".into(),
            ..Default::default()
        }
    }

    #[test]
    fn outcomes_and_intents_survive_a_restart_with_the_same_instance() {
        let dir = tempfile::tempdir().unwrap();
        let (j, instance) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin("a").unwrap(), Begin::Apply);
        assert_eq!(j.begin("a").unwrap(), Begin::Running);
        j.finish("a", &ack("a")).unwrap();
        assert_eq!(j.begin("a").unwrap(), Begin::Answer(Box::new(ack("a"))));
        assert_eq!(j.begin("b").unwrap(), Begin::Apply); // the process "dies" here
        drop(j);

        let (j, again) = Journal::open(dir.path()).unwrap();
        assert_eq!(again, instance, "the instance id is stable");
        assert_eq!(j.begin("a").unwrap(), Begin::Answer(Box::new(ack("a"))));
        assert_eq!(
            j.begin("b").unwrap(),
            Begin::Uncertain(None),
            "never applied twice"
        );
        assert_eq!(j.begin("c").unwrap(), Begin::Apply);
    }

    #[test]
    fn the_mark_before_a_write_survives_a_crash_and_an_outcome_supersedes_it() {
        let dir = tempfile::tempdir().unwrap();
        let mark = WriteMark {
            url: "ldaps://dc1".into(),
            dn: "CN=a,DC=corp".into(),
            check: crate::directory::Check::Password {
                version: Some(3),
                pwd_last_set: 42,
            },
        };
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin("a").unwrap(), Begin::Apply);
        j.mark("a", &mark).unwrap();
        assert_eq!(j.begin("b").unwrap(), Begin::Apply);
        j.mark("b", &mark).unwrap();
        j.finish("b", &ack("b")).unwrap();
        drop(j); // the process dies during a's write
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin("a").unwrap(), Begin::Uncertain(Some(mark)));
        assert_eq!(j.begin("b").unwrap(), Begin::Answer(Box::new(ack("b"))));
        drop(j);
        // Rewritten on open: still there after a second restart.
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert!(matches!(j.begin("a").unwrap(), Begin::Uncertain(Some(_))));
    }

    #[test]
    fn the_store_high_water_survives_restarts_and_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.high_water(), None);
        j.seen("acme", 7);
        j.seen("acme", 5);
        assert_eq!(j.begin("a").unwrap(), Begin::Apply);
        j.finish("a", &ack("a")).unwrap();
        drop(j);
        for _ in 0..2 {
            let (j, _) = Journal::open(dir.path()).unwrap();
            assert_eq!(j.high_water(), Some(("acme".into(), 7)));
        }
    }

    #[test]
    fn a_torn_last_line_is_tolerated_and_other_damage_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin("a").unwrap(), Begin::Apply);
        j.finish("a", &ack("a")).unwrap();
        drop(j);
        let path = dir.path().join("journal.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        write!(f, "{{\"op\":\"b\",\"at\":1").unwrap();
        drop(f);
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin("a").unwrap(), Begin::Answer(Box::new(ack("a"))));
        drop(j);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("garbage\n{text}")).unwrap();
        let err = Journal::open(dir.path())
            .err()
            .expect("corrupt journal refused");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
