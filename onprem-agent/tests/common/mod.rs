//! Builders shared by the agent's integration tests.
#![allow(dead_code)]

use relay::proto::{sealed_operation::Action, ChangePassword, ResetPassword};

pub fn reset(p: &str) -> Action {
    Action::Reset(ResetPassword {
        new_password: p.into(),
        ..Default::default()
    })
}

pub fn change(old: &str, new: &str) -> Action {
    Action::Change(ChangePassword {
        old_password: old.into(),
        new_password: new.into(),
    })
}

/// What AD itself counts of an account's writes (`replPropertyMetaData` versions): the ground
/// truth for "written once" and "not written", whatever outcome the agent reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdWrites {
    pub password: u32,
    pub pwd_last_set: u32,
    pub lockout_time: u32,
}

impl AdWrites {
    pub fn read(dc: &testkit::SambaDc, dn: &str) -> Self {
        let count = |attr| {
            dc.write_count(dn, attr)
                .unwrap_or_else(|e| panic!("write count of {attr} of {dn}: {e:#}"))
        };
        Self {
            password: count("unicodePwd"),
            pwd_last_set: count("pwdLastSet"),
            lockout_time: count("lockoutTime"),
        }
    }

    /// These counts after `password`, `pwd_last_set` and `lockout_time` more writes.
    pub fn plus(self, password: u32, pwd_last_set: u32, lockout_time: u32) -> Self {
        Self {
            password: self.password + password,
            pwd_last_set: self.pwd_last_set + pwd_last_set,
            lockout_time: self.lockout_time + lockout_time,
        }
    }

    /// The counts after one applied password write (AD sets pwdLastSet with every password).
    pub fn plus_password(self) -> Self {
        self.plus(1, 1, 0)
    }
}

/// TCP connections this process holds to `ip:port`, in any state (sockets in
/// /proc/self/net/tcp whose inode is one of this process's open file descriptors).
pub fn connections_to(ip: std::net::Ipv4Addr, port: u16) -> usize {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let table = std::fs::read_to_string("/proc/self/net/tcp").expect("/proc/self/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(inode)) = (cols.get(2), cols.get(9)) else {
                return false;
            };
            let Some((addr, p)) = remote.split_once(':') else {
                return false;
            };
            // The address is the in-memory (network order) u32 printed in hex; the port is in
            // host order.
            let addr =
                u32::from_str_radix(addr, 16).map(|a| std::net::Ipv4Addr::from(a.to_ne_bytes()));
            let p = u16::from_str_radix(p, 16);
            addr == Ok(ip) && p == Ok(port) && inodes.contains(*inode)
        })
        .count()
}

/// Samples [`connections_to`] every 2 ms on a thread of its own until stopped.
pub struct ConnectionSampler {
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, u32)>,
}

impl ConnectionSampler {
    pub fn start(ip: std::net::Ipv4Addr, port: u16) -> Self {
        let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let thread = std::thread::spawn({
            let running = running.clone();
            move || {
                let (mut most, mut samples) = (0, 0);
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    most = most.max(connections_to(ip, port));
                    samples += 1;
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                (most, samples)
            }
        });
        Self { running, thread }
    }

    /// The most connections seen at once, and how many samples were taken.
    pub fn stop(self) -> (usize, u32) {
        self.running
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("connection sampler")
    }
}
