//! The benchmark's no-op writer cannot be used by `onprem-agent run`: the agent binary has no
//! flag, environment variable or settings key that selects a writer; its crate neither defines
//! nor depends on the no-op writer; and the built binary holds none of its strings.
//!
//! Needs `target/debug/onprem-agent` (`cargo build --workspace --bins`, as `make test` does).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn agent_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| testkit::workspace_root().join("target"));
    let path = target.join("debug").join("onprem-agent");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// Runs `cmd`, killed after 20 s; (exit success, stdout + stderr).
fn run_bounded(cmd: &mut Command) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn onprem-agent");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(out).unwrap() + &std::fs::read_to_string(err).unwrap();
    (status.success(), text)
}

const WORDS: [&str; 4] = ["writer", "noop", "no-op", "bench"];

#[test]
fn run_help_offers_no_writer_option() {
    let (ok, help) = run_bounded(Command::new(agent_binary()).args(["run", "--help"]));
    assert!(ok, "run --help failed: {help}");
    assert!(
        help.contains("--gateway-url") || help.contains("--config"),
        "not the agent's help: {help}"
    );
    let lower = help.to_ascii_lowercase();
    for w in WORDS {
        assert!(
            !lower.contains(w),
            "`onprem-agent run --help` mentions {w:?}:\n{help}"
        );
    }
}

#[test]
fn a_writer_flag_is_refused() {
    for args in [
        &["run", "--writer", "noop"][..],
        &["run", "--noop-writer"],
        &["run", "--bench"],
    ] {
        let (ok, out) = run_bounded(Command::new(agent_binary()).args(args));
        assert!(!ok, "onprem-agent {args:?} was accepted: {out}");
        assert!(
            out.contains("unexpected argument"),
            "onprem-agent {args:?}: {out}"
        );
    }
}

#[test]
fn a_writer_key_in_the_settings_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    // Private, as the agent wants its settings file: the refusal must be for the key.
    relay::secret::write_private(&file, "writer = \"noop\"\n").unwrap();
    let (ok, out) = run_bounded(
        Command::new(agent_binary())
            .arg("run")
            .arg("--config")
            .arg(&file)
            .env_clear(),
    );
    assert!(!ok, "a settings file with `writer` was accepted: {out}");
    assert!(
        out.contains("writer"),
        "the refusal does not name the key: {out}"
    );
}

fn agent_sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((p.clone(), std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &testkit::workspace_root().join("onprem-agent/src"),
        &mut out,
    );
    assert!(out.len() > 5, "onprem-agent sources not found");
    out
}

#[test]
fn no_environment_variable_of_the_agent_names_a_writer() {
    let mut envs = Vec::new();
    for (path, text) in agent_sources() {
        for piece in text.split("env = \"").skip(1) {
            let name = piece.split('"').next().unwrap_or_default().to_owned();
            envs.push((path.clone(), name));
        }
    }
    assert!(
        envs.iter().any(|(_, n)| n == "AGENT_GATEWAY_URL"),
        "env names not found: {envs:?}"
    );
    for (path, name) in envs {
        let lower = name.to_ascii_lowercase();
        for w in WORDS {
            assert!(
                !lower.contains(w),
                "{} reads environment variable {name}",
                path.display()
            );
        }
    }
}

#[test]
fn the_agent_crate_neither_defines_nor_depends_on_the_noop_writer() {
    for (path, text) in agent_sources() {
        assert!(
            !text.contains("NoopWriter"),
            "{} names NoopWriter",
            path.display()
        );
        assert!(
            !text.contains("bench::"),
            "{} uses the bench crate",
            path.display()
        );
    }
    let manifest =
        std::fs::read_to_string(testkit::workspace_root().join("onprem-agent/Cargo.toml")).unwrap();
    for line in manifest.lines() {
        let key = line
            .trim()
            .split(['=', ' ', '.'])
            .next()
            .unwrap_or_default();
        assert_ne!(
            key, "bench",
            "onprem-agent/Cargo.toml depends on bench: {line}"
        );
    }
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal,build",
            "-p",
            "onprem-agent",
            "-i",
            "bench",
        ])
        .current_dir(testkit::workspace_root())
        .output()
        .expect("cargo tree");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("onprem-agent v"),
        "onprem-agent depends on bench:\n{text}"
    );
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let mut from = 0;
    while let Some(p) = hay[from..].iter().position(|&b| b == needle[0]) {
        let at = from + p;
        if hay[at..].starts_with(needle) {
            return true;
        }
        from = at + 1;
    }
    false
}

#[test]
fn the_agent_binary_holds_none_of_the_noop_writers_strings() {
    let bytes = std::fs::read(agent_binary()).unwrap();
    assert!(
        contains(&bytes, b"AGENT_GATEWAY_URL"),
        "the scan finds nothing at all"
    );
    for needle in [
        "NoopWriter",
        "benchmark no-op writer",
        "noop://benchmark",
        "Benchmark: nothing was written",
    ] {
        assert!(
            !contains(&bytes, needle.as_bytes()),
            "the onprem-agent binary contains {needle:?}"
        );
    }
}
