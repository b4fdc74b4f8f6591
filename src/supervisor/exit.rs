//! How a worker's death is described: its exit status, and "likely out of
//! memory" only where there is evidence for it (issue 28). A SIGKILL alone is no
//! evidence: `kill -9`, a supervisor's stop and the OOM killer all send it.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use crate::memory::human;

/// A footprint at or above this share of the worker's memory limit, when it
/// died, is evidence that it ran out of memory.
const NEAR_LIMIT_PERCENT: u64 = 90;

/// What the daemon knew about a worker's memory when it died.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryAtDeath {
    /// The worker's last measured footprint (0: never measured).
    pub footprint: u64,
    /// The memory limit its load was admitted with (0: none).
    pub limit: u64,
    /// The cgroup's `oom_kill` count rose between the last measurement (about
    /// a second before) and the worker's death (Linux; false where it cannot be
    /// read).
    pub oom_kill_rose: bool,
    /// The daemon itself killed the worker (a stop, a hang, a memory cap).
    pub killed_by_daemon: bool,
}

/// "exited with status 1", "killed by signal 9 (SIGKILL)", "killed by signal 9
/// (SIGKILL): likely out of memory (the cgroup's oom_kill count rose)".
pub fn describe_exit(status: ExitStatus, memory: MemoryAtDeath) -> String {
    if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("?");
        let evidence = oom_evidence(sig, memory);
        return if evidence.is_empty() {
            format!("killed by signal {sig} ({name})")
        } else {
            format!(
                "killed by signal {sig} ({name}): likely out of memory ({})",
                evidence.join("; ")
            )
        };
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("exited ({status})"),
    }
}

/// Why a death by signal `sig` looks like running out of memory (nothing: it
/// does not). The kernel's OOM killer sends SIGKILL; MLX aborts (SIGABRT) when
/// an allocation fails, so only a full footprint speaks for that one.
fn oom_evidence(sig: i32, memory: MemoryAtDeath) -> Vec<String> {
    let mut evidence = vec![];
    if memory.killed_by_daemon {
        return evidence; // the daemon says why it killed
    }
    if sig == libc::SIGKILL && memory.oom_kill_rose {
        evidence.push("the cgroup's oom_kill count rose".to_string());
    }
    let near_limit = memory.limit > 0
        && u128::from(memory.footprint) * 100
            >= u128::from(memory.limit) * u128::from(NEAR_LIMIT_PERCENT);
    if matches!(sig, libc::SIGKILL | libc::SIGABRT) && near_limit {
        evidence.push(format!(
            "its footprint was {} of its {} limit",
            human(memory.footprint),
            human(memory.limit)
        ));
    }
    evidence
}

/// The `oom_kill` count in a cgroup's `memory.events` (v2) or `memory.oom_control`
/// (v1) text: processes of the cgroup killed by any OOM killer.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))?;
    value.trim().parse().ok()
}

/// The files that count OOM kills in the cgroups that `/proc/self/cgroup`'s text
/// names: v2's `memory.events` ("0::/system.slice/mlxd.service"), then v1's
/// `memory.oom_control` ("4:memory:/docker/…"), for hosts still on v1 or hybrid.
fn oom_kill_files(proc_self_cgroup: &str) -> Vec<PathBuf> {
    let root = PathBuf::from("/sys/fs/cgroup");
    let under = |dir: PathBuf, path: &str, file: &str| {
        dir.join(path.trim().trim_start_matches('/')).join(file)
    };
    let mut files = vec![];
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            files.insert(0, under(root.clone(), path, "memory.events"));
        } else if controllers.split(',').any(|c| c == "memory") {
            files.push(under(root.join("memory"), path, "memory.oom_control"));
        }
    }
    files
}

/// The daemon's cgroup's `oom_kill` count now. Workers share the daemon's
/// cgroup, so a rise across a worker's life is evidence that the kernel killed
/// for memory. None where no such count can be read: other systems than Linux,
/// the root cgroup.
pub fn cgroup_oom_kills() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    oom_kill_files(&cgroup).into_iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        parse_oom_kills(&text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn killed(sig: i32) -> ExitStatus {
        ExitStatus::from_raw(sig)
    }

    #[test]
    fn a_sigkill_without_evidence_is_not_called_out_of_memory() {
        let memory = MemoryAtDeath {
            footprint: 4 * GIB,
            limit: 8 * GIB,
            oom_kill_rose: false,
            killed_by_daemon: false,
        };
        assert_eq!(
            describe_exit(killed(libc::SIGKILL), memory),
            "killed by signal 9 (SIGKILL)"
        );
        // No limit and no count: nothing to go on.
        assert_eq!(
            describe_exit(killed(libc::SIGKILL), MemoryAtDeath::default()),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn a_sigkill_with_the_footprint_near_the_limit_is_likely_out_of_memory() {
        let memory = MemoryAtDeath {
            footprint: 92 * GIB / 10,
            limit: 10 * GIB,
            oom_kill_rose: false,
            killed_by_daemon: false,
        };
        assert_eq!(
            describe_exit(killed(libc::SIGKILL), memory),
            "killed by signal 9 (SIGKILL): likely out of memory \
             (its footprint was 9.2 GiB of its 10.0 GiB limit)"
        );
        let just_below = MemoryAtDeath {
            footprint: 9 * GIB - 1,
            ..memory
        };
        assert!(!describe_exit(killed(libc::SIGKILL), just_below).contains("out of memory"));
        // MLX aborts when an allocation fails.
        assert!(describe_exit(killed(libc::SIGABRT), memory).contains("likely out of memory"));
        // Another signal is no OOM, whatever the footprint.
        assert_eq!(
            describe_exit(killed(libc::SIGTERM), memory),
            "killed by signal 15 (SIGTERM)"
        );
    }

    #[test]
    fn a_kill_the_daemon_sent_is_never_called_out_of_memory() {
        let memory = MemoryAtDeath {
            footprint: 10 * GIB,
            limit: 10 * GIB,
            oom_kill_rose: true,
            killed_by_daemon: true,
        };
        assert_eq!(
            describe_exit(killed(libc::SIGKILL), memory),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn a_sigkill_with_the_oom_kill_count_risen_is_likely_out_of_memory() {
        let memory = MemoryAtDeath {
            oom_kill_rose: true,
            ..MemoryAtDeath::default()
        };
        assert_eq!(
            describe_exit(killed(libc::SIGKILL), memory),
            "killed by signal 9 (SIGKILL): likely out of memory \
             (the cgroup's oom_kill count rose)"
        );
        // The OOM killer sends SIGKILL: a count risen beside an abort is no evidence.
        assert_eq!(
            describe_exit(killed(libc::SIGABRT), memory),
            "killed by signal 6 (SIGABRT)"
        );
    }

    #[test]
    fn exits_by_status() {
        let status = ExitStatus::from_raw(70 << 8);
        assert_eq!(
            describe_exit(status, MemoryAtDeath::default()),
            "exited with status 70"
        );
    }

    #[test]
    fn oom_kills_are_read_from_the_cgroup_files() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(parse_oom_kills(v1), Some(5));
        assert_eq!(parse_oom_kills("low 0\nhigh 0\n"), None);
        assert_eq!(parse_oom_kills("oom_kill x\n"), None);
        assert_eq!(
            oom_kill_files("0::/system.slice/mlxd.service\n"),
            [PathBuf::from(
                "/sys/fs/cgroup/system.slice/mlxd.service/memory.events"
            )]
        );
        assert_eq!(
            oom_kill_files("0::/\n"),
            [PathBuf::from("/sys/fs/cgroup/memory.events")],
            "inside a cgroup namespace (a container)"
        );
        // Hybrid (v1 controllers beside an empty v2 hierarchy): v2 first.
        let hybrid = "5:cpuset:/\n4:memory,kmem:/docker/abc\n0::/\n";
        assert_eq!(
            oom_kill_files(hybrid),
            [
                PathBuf::from("/sys/fs/cgroup/memory.events"),
                PathBuf::from("/sys/fs/cgroup/memory/docker/abc/memory.oom_control"),
            ]
        );
    }

    /// Where this machine keeps a count, it is read (a check of the paths, not
    /// only of the parsing).
    #[test]
    fn this_machines_count_is_read_where_a_file_exists() {
        let Ok(cgroup) = std::fs::read_to_string("/proc/self/cgroup") else {
            return; // not Linux
        };
        if oom_kill_files(&cgroup).iter().any(|f| f.exists()) {
            assert!(cgroup_oom_kills().is_some(), "{cgroup}");
        }
    }
}
