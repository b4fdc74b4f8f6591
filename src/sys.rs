//! The daemon's window on the operating system's memory accounting and process
//! lifetimes, and ALL of the daemon's `unsafe` (macOS's sysctl, Mach and libproc
//! calls; on Linux the worker's pre-exec hook, [`kill_with_daemon`]). Each block
//! states what makes it sound.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SystemMemory {
    /// Physical memory, lowered by a cgroup limit when one applies.
    pub total: u64,
    /// Memory the kernel says can be had without swapping.
    pub available: u64,
}

/// MemTotal and MemAvailable from /proc/meminfo.
#[cfg(any(target_os = "linux", test))]
pub fn parse_meminfo(text: &str) -> SystemMemory {
    SystemMemory {
        total: kib_field(text, "MemTotal:").unwrap_or(0),
        available: kib_field(text, "MemAvailable:").unwrap_or(0),
    }
}

/// A "Name:   123 kB" field in bytes.
#[cfg(any(target_os = "linux", test))]
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::SystemMemory;

    pub fn system() -> SystemMemory {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mut m = super::parse_meminfo(&meminfo);
        if let Some(limit) = cgroup_limit() {
            if limit < m.total {
                let used = cgroup_usage().unwrap_or(0);
                m.total = limit;
                m.available = m.available.min(limit.saturating_sub(used));
            }
        }
        m
    }

    /// This process's cgroup v2 directory.
    fn cgroup_dir() -> Option<std::path::PathBuf> {
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(std::path::Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/')))
    }

    fn cgroup_limit() -> Option<u64> {
        let text = std::fs::read_to_string(cgroup_dir()?.join("memory.max")).ok()?;
        text.trim().parse().ok() // "max" (no limit) does not parse
    }

    fn cgroup_usage() -> Option<u64> {
        let text = std::fs::read_to_string(cgroup_dir()?.join("memory.current")).ok()?;
        text.trim().parse().ok()
    }

    /// How often a worker's shared pages are measured again (see [`footprint`]).
    const SHARED_REFRESH: Duration = Duration::from_secs(30);

    /// Each process's resident pages shared with others, and when they were
    /// measured.
    static SHARED: Mutex<BTreeMap<u32, (Instant, u64)>> = Mutex::new(BTreeMap::new());

    /// A process's proportional set size: its resident memory (VmRSS, read in
    /// microseconds) less the part of it shared with other processes, as
    /// smaps_rollup last said (Rss − Pss). smaps_rollup itself walks every page
    /// table of the process, ~19 ms per GiB resident, which the slot's tick would
    /// spend every second; what is shared (libraries) barely moves, so it is read
    /// every [`SHARED_REFRESH`].
    pub fn footprint(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss = super::kib_field(&status, "VmRSS:")?;
        let now = Instant::now();
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        let known = shared
            .get(&pid)
            .filter(|(at, _)| now.duration_since(*at) < SHARED_REFRESH)
            .map(|(_, bytes)| *bytes);
        let bytes = match known {
            Some(bytes) => bytes,
            None => {
                let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                    .unwrap_or_default();
                let bytes = match (
                    super::kib_field(&rollup, "Rss:"),
                    super::kib_field(&rollup, "Pss:"),
                ) {
                    (Some(rss), Some(pss)) => rss.saturating_sub(pss),
                    _ => 0,
                };
                // Processes gone (or their pids reused) are forgotten.
                shared.retain(|_, (at, _)| now.duration_since(*at) < SHARED_REFRESH * 4);
                shared.insert(pid, (now, bytes));
                bytes
            }
        };
        Some(rss.saturating_sub(bytes))
    }
}

#[cfg(target_os = "macos")]
mod imp {
    use super::SystemMemory;

    pub fn system() -> SystemMemory {
        let mut total: u64 = 0;
        let mut len = std::mem::size_of::<u64>();
        // SAFETY: "hw.memsize" is a NUL-terminated name; `total` is a u64 and `len`
        // says so; no new value is set (null, 0).
        let rc = unsafe {
            libc::sysctlbyname(
                c"hw.memsize".as_ptr(),
                (&mut total as *mut u64).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            total = 0;
        }
        SystemMemory {
            total,
            available: available().unwrap_or(0),
        }
    }

    /// Free + inactive + purgeable pages (what can be had without swapping).
    fn available() -> Option<u64> {
        // SAFETY: zeroed is a valid vm_statistics64 (plain integers).
        let mut stats: libc::vm_statistics64 = unsafe { std::mem::zeroed() };
        let mut count = libc::HOST_VM_INFO64_COUNT;
        #[allow(deprecated)] // libc points to the mach2 crate; the call is the same
        // SAFETY: `stats` is large enough for HOST_VM_INFO64_COUNT integers, which
        // `count` says; mach_host_self() needs no cleanup for this use.
        let rc = unsafe {
            libc::host_statistics64(
                libc::mach_host_self(),
                libc::HOST_VM_INFO64,
                (&mut stats as *mut libc::vm_statistics64).cast(),
                &mut count,
            )
        };
        if rc != 0 {
            return None;
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let pages =
            stats.free_count as u64 + stats.inactive_count as u64 + stats.purgeable_count as u64;
        Some(pages * page)
    }

    pub fn footprint(pid: u32) -> Option<u64> {
        // SAFETY: zeroed is a valid rusage_info_v4 (plain integers).
        let mut info: libc::rusage_info_v4 = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a rusage_info_v4, which RUSAGE_INFO_V4 asks the kernel to
        // fill; the pointer cast is the documented calling convention.
        let rc = unsafe {
            libc::proc_pid_rusage(
                pid as i32,
                libc::RUSAGE_INFO_V4,
                (&mut info as *mut libc::rusage_info_v4).cast(),
            )
        };
        (rc == 0).then_some(info.ri_phys_footprint)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod imp {
    pub fn system() -> super::SystemMemory {
        super::SystemMemory::default()
    }

    pub fn footprint(_pid: u32) -> Option<u64> {
        None
    }
}

pub use imp::{footprint, system};

/// Linux: the worker gets SIGKILL from the kernel when the daemon dies, however it
/// dies (SIGKILL from launchd/systemd/OOM included). The stdin lifeline already
/// ends a worker that reads it; this also ends one that cannot (stopped, or stuck
/// in native code). Elsewhere a no-op: macOS has no such request, and there the
/// lifeline (and a restarted daemon's cleanup) must do.
///
/// The kernel ties the signal to the *thread* that forked, not the process: the
/// daemon spawns workers from its tokio runtime's worker threads, which live as
/// long as the runtime (it never uses `block_in_place`, whose threads may retire).
#[cfg(target_os = "linux")]
pub fn kill_with_daemon(cmd: &mut tokio::process::Command) {
    let daemon = nix::unistd::getpid();
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: prctl(2) and getppid(2) are system calls,
    // and the hook neither allocates nor takes locks (errors are raw errnos, which
    // io::Error holds without allocating).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The daemon died between fork and prctl: the request came too late.
            if nix::unistd::getppid() != daemon {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn kill_with_daemon(_cmd: &mut tokio::process::Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let m = parse_meminfo(
            "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   20000000 kB\n",
        );
        assert_eq!(m.total, 24_000_000 * 1024);
        assert_eq!(m.available, 20_000_000 * 1024);
    }

    /// Between two readings of the shared pages, the footprint still follows
    /// the process's memory at once, and it stays the PSS the kernel reports.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_footprint_follows_growth_between_readings_of_the_shared_pages() {
        let me = std::process::id();
        let pss = || {
            let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
            kib_field(&rollup, "Pss:").unwrap() as i64
        };
        let before = footprint(me).unwrap() as i64;
        assert!((before - pss()).abs() < 16 << 20, "{before} vs {}", pss());
        let grown = std::hint::black_box(vec![1u8; 256 << 20]);
        let after = footprint(me).unwrap() as i64; // the shared part is not read again
        assert!(after - before > 240 << 20, "{before} -> {after}");
        assert!((after - pss()).abs() < 16 << 20, "{after} vs {}", pss());
        drop(grown);
    }
}
