//! What /proc says of a process: CPU time (utime + stime) and resident memory.

use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when it cannot be asked).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system) process `pid` has used so far (`None`: no such process).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state(0) ppid(1) … utime(11) stime(12)
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

/// Resident set size of `pid` in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU seconds of several named processes, read together.
#[derive(Debug, Clone)]
pub struct CpuSnapshot(pub Vec<(String, u32, f64)>);

impl CpuSnapshot {
    pub fn take(pids: &[(String, u32)]) -> Self {
        Self(
            pids.iter()
                .map(|(n, p)| (n.clone(), *p, cpu_seconds(*p).unwrap_or(0.0)))
                .collect(),
        )
    }

    /// CPU seconds per 1,000 operations of each process between `self` and `later`.
    pub fn per_thousand(&self, later: &CpuSnapshot, ops: usize) -> Vec<(String, f64)> {
        self.0
            .iter()
            .zip(&later.0)
            .map(|((n, _, a), (_, _, b))| {
                let per = if ops == 0 {
                    0.0
                } else {
                    (b - a) / ops as f64 * 1000.0
                };
                (n.clone(), per)
            })
            .collect()
    }

    /// CPU seconds used by each process between `self` and `later`.
    pub fn used(&self, later: &CpuSnapshot) -> Vec<(String, f64)> {
        self.0
            .iter()
            .zip(&later.0)
            .map(|((n, _, a), (_, _, b))| (n.clone(), b - a))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_seconds(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
        assert_eq!(cpu_seconds(u32::MAX), None);
    }
}
