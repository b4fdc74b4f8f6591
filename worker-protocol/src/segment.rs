//! One POSIX shared-memory segment per worker incarnation, holding the two rings.
//!
//! Lifecycle: the daemon removes stale segments, creates a fresh one exclusively
//! (`O_CREAT|O_EXCL`, mode 0600), sizes it once (macOS allows `ftruncate` only once),
//! initializes the header and stores the magic last. The worker opens it by name and
//! checks magic, layout version and ownership. Once the worker has said Hello (it has
//! mapped the segment) the daemon unlinks the name, so nothing is left behind even if
//! both processes die later.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::mman::{shm_open, shm_unlink};
use nix::sys::stat::{fstat, Mode};

use crate::ring::raw::{Mapping, DATA_OFFSET, LAYOUT_VERSION, MAGIC};
use crate::ring::{Consumer, Producer};

/// Every segment name starts with this; stale cleanup lists by it.
pub const NAME_PREFIX: &str = "mlxd_";
/// macOS limits shm names to 31 bytes (PSHMNAMLEN), the leading slash included.
pub const MAX_NAME_LEN: usize = 31;

/// The two rings of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Requests: daemon produces, worker consumes.
    ToWorker = 0,
    /// Events: worker produces, daemon consumes.
    ToDaemon = 1,
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("shared memory {op} failed for {name}: {source}")]
    Os {
        op: &'static str,
        name: String,
        source: nix::Error,
    },
    #[error("segment name {0:?} is invalid (prefix {NAME_PREFIX}, at most {MAX_NAME_LEN} bytes)")]
    BadName(String),
    #[error("ring capacity {0} must be a power of two between 4 KiB and 1 GiB")]
    BadCapacity(u64),
    #[error("segment {0} is not initialized")]
    NotInitialized(String),
    #[error("segment {name} has layout version {found}, expected {expected}")]
    VersionMismatch {
        name: String,
        found: u32,
        expected: u32,
    },
    #[error("segment {name} is {size} bytes, its header needs {needed}")]
    Truncated {
        name: String,
        size: u64,
        needed: u64,
    },
    #[error("segment {0} is not private to this user (mode or owner wrong)")]
    NotPrivate(String),
    #[error("the {0:?} end of this segment was already taken")]
    AlreadyTaken(&'static str),
    #[error("mmap failed: {0}")]
    Map(std::io::Error),
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A fresh, unique segment name for this process: `mlxd_<pid>_<n>`.
pub fn new_name() -> String {
    format!(
        "{NAME_PREFIX}{}_{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid of the process that created segment `name`, if it is one of ours.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix('/')
        .unwrap_or(name)
        .strip_prefix(NAME_PREFIX)?;
    let (pid, n) = rest.split_once('_')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn os_name(name: &str) -> Result<String, SegmentError> {
    let n = format!("/{}", name.trim_start_matches('/'));
    if n.len() > MAX_NAME_LEN || owner_pid(&n).is_none() {
        return Err(SegmentError::BadName(name.to_string()));
    }
    Ok(n)
}

/// A mapped segment. Each ring end can be taken once per process.
pub struct Segment {
    name: String,
    map: Arc<Mapping>,
    caps: [u64; 2],
    taken: [AtomicBool; 4],
}

impl Segment {
    /// Creates, sizes and initializes a new segment (the daemon's side).
    pub fn create(name: &str, caps: [u64; 2], generation: u64) -> Result<Segment, SegmentError> {
        for c in caps {
            if !c.is_power_of_two() || !(4096..=1 << 30).contains(&c) {
                return Err(SegmentError::BadCapacity(c));
            }
        }
        let os = os_name(name)?;
        let err = |op: &'static str| {
            let name = os.clone();
            move |source| SegmentError::Os { op, name, source }
        };
        let fd: OwnedFd = shm_open(
            os.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(err("shm_open"))?;
        let len = DATA_OFFSET as u64 + caps[0] + caps[1];
        if let Err(e) = nix::unistd::ftruncate(&fd, len as i64) {
            let _ = shm_unlink(os.as_str());
            return Err(err("ftruncate")(e));
        }
        let map = Mapping::map(&fd, len as usize).map_err(|e| {
            let _ = shm_unlink(os.as_str());
            SegmentError::Map(e)
        })?;
        let h = map.header();
        h.layout_version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.owner_pid.store(std::process::id(), Ordering::Relaxed);
        h.capacity[0].store(caps[0], Ordering::Relaxed);
        h.capacity[1].store(caps[1], Ordering::Relaxed);
        h.generation.store(generation, Ordering::Relaxed);
        // SYNC POINT: Release publishes the fields above; `open` loads magic with
        // Acquire before reading them.
        h.magic.store(MAGIC, Ordering::Release);
        Ok(Segment::from_map(name, map, caps))
    }

    /// Opens an existing segment by name (the worker's side).
    pub fn open(name: &str) -> Result<Segment, SegmentError> {
        let os = os_name(name)?;
        let fd = shm_open(os.as_str(), OFlag::O_RDWR, Mode::empty()).map_err(|source| {
            SegmentError::Os {
                op: "shm_open",
                name: os.clone(),
                source,
            }
        })?;
        let st = fstat(&fd).map_err(|source| SegmentError::Os {
            op: "fstat",
            name: os.clone(),
            source,
        })?;
        // Owner-only: another user's segment (or a widened mode) is not ours to trust.
        if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
            return Err(SegmentError::NotPrivate(name.to_string()));
        }
        let size = st.st_size as u64;
        if size < DATA_OFFSET as u64 {
            return Err(SegmentError::Truncated {
                name: name.to_string(),
                size,
                needed: DATA_OFFSET as u64,
            });
        }
        let map = Mapping::map(&fd, size as usize).map_err(SegmentError::Map)?;
        let h = map.header();
        // SYNC POINT: Acquire pairs with the creator's Release of magic.
        if h.magic.load(Ordering::Acquire) != MAGIC {
            return Err(SegmentError::NotInitialized(name.to_string()));
        }
        let found = h.layout_version.load(Ordering::Relaxed);
        if found != LAYOUT_VERSION {
            return Err(SegmentError::VersionMismatch {
                name: name.to_string(),
                found,
                expected: LAYOUT_VERSION,
            });
        }
        let caps = [
            h.capacity[0].load(Ordering::Relaxed),
            h.capacity[1].load(Ordering::Relaxed),
        ];
        for c in caps {
            if !c.is_power_of_two() || !(4096..=1 << 30).contains(&c) {
                return Err(SegmentError::BadCapacity(c));
            }
        }
        let needed = DATA_OFFSET as u64 + caps[0] + caps[1];
        if size < needed {
            return Err(SegmentError::Truncated {
                name: name.to_string(),
                size,
                needed,
            });
        }
        Ok(Segment::from_map(name, map, caps))
    }

    fn from_map(name: &str, map: Mapping, caps: [u64; 2]) -> Segment {
        Segment {
            name: name.trim_start_matches('/').to_string(),
            map: Arc::new(map),
            caps,
            taken: Default::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn owner_pid(&self) -> u32 {
        self.map.header().owner_pid.load(Ordering::Relaxed)
    }

    pub fn generation(&self) -> u64 {
        self.map.header().generation.load(Ordering::Relaxed)
    }

    /// The worker's progress counter; it stays valid after the name is unlinked.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat(self.map.clone())
    }

    fn data_offset(&self, d: Direction) -> usize {
        DATA_OFFSET
            + if d == Direction::ToDaemon {
                self.caps[0] as usize
            } else {
                0
            }
    }

    fn take(&self, slot: usize, what: &'static str) -> Result<(), SegmentError> {
        if self.taken[slot].swap(true, Ordering::AcqRel) {
            return Err(SegmentError::AlreadyTaken(what));
        }
        Ok(())
    }

    /// The write end of ring `d`; can be taken once.
    pub fn producer(&self, d: Direction) -> Result<Producer, SegmentError> {
        self.take(d as usize * 2, "producer")?;
        Ok(Producer::new(
            self.map.clone(),
            d as usize,
            self.data_offset(d),
            self.caps[d as usize],
        ))
    }

    /// The read end of ring `d`; can be taken once.
    pub fn consumer(&self, d: Direction) -> Result<Consumer, SegmentError> {
        self.take(d as usize * 2 + 1, "consumer")?;
        Ok(Consumer::new(
            self.map.clone(),
            d as usize,
            self.data_offset(d),
            self.caps[d as usize],
        ))
    }

    /// Removes the name (the mapping stays valid for everyone who has it).
    pub fn unlink(&self) -> Result<(), SegmentError> {
        unlink_name(&self.name)
    }
}

/// The heartbeat counter in a segment's header: the worker advances it on every
/// engine loop iteration; the daemon reads it to tell a hung worker from a busy one.
#[derive(Clone)]
pub struct Heartbeat(Arc<Mapping>);

impl Heartbeat {
    pub fn load(&self) -> u64 {
        self.0.header().heartbeat.load(Ordering::Relaxed)
    }

    pub fn beat(&self) {
        self.0.header().heartbeat.fetch_add(1, Ordering::Relaxed);
    }
}

/// Unlinks segment `name` (one of ours by its name), e.g. from a dead daemon's record.
pub fn unlink_name(name: &str) -> Result<(), SegmentError> {
    let os = os_name(name)?;
    shm_unlink(os.as_str()).map_err(|source| SegmentError::Os {
        op: "shm_unlink",
        name: os,
        source,
    })
}

/// Unlinks every `mlxd_*` segment whose creating process is gone (a crashed
/// daemon's leftovers). Linux lists segments in /dev/shm; macOS cannot list them:
/// there the daemon's registry of the segments it created finds them.
pub fn remove_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return removed;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid != std::process::id()
            && !process_alive(pid)
            && shm_unlink(format!("/{name}").as_str()).is_ok()
        {
            removed.push(name);
        }
    }
    removed
}

/// True unless `kill(pid, 0)` says there is no such process.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_macos_and_parse_back() {
        let n = new_name();
        assert!(n.len() < MAX_NAME_LEN, "{n}");
        assert_eq!(owner_pid(&n), Some(std::process::id()));
        assert_eq!(owner_pid("mlxd_12_x"), None);
        assert_eq!(owner_pid("other_12_3"), None);
        assert!(os_name("mlxd_1234567890_1234567890_toolong").is_err());
    }

    #[test]
    fn open_checks_and_each_end_is_taken_once() {
        let name = new_name();
        let seg = Segment::create(&name, [4096, 8192], 3).unwrap();
        let other = Segment::open(&name).unwrap();
        assert_eq!(other.generation(), 3);
        assert_eq!(other.owner_pid(), std::process::id());
        let _p = seg.producer(Direction::ToWorker).unwrap();
        assert!(matches!(
            seg.producer(Direction::ToWorker),
            Err(SegmentError::AlreadyTaken(_))
        ));
        seg.unlink().unwrap();
        assert!(Segment::open(&name).is_err(), "unlinked name must be gone");
        assert!(Segment::create(&new_name(), [1000, 4096], 0).is_err());
    }

    #[test]
    fn a_dead_owners_segment_is_removed_and_a_live_one_kept() {
        // Abandon a segment under the name of a pid that cannot exist.
        let dead = format!("{NAME_PREFIX}{}_0", i32::MAX - 1);
        let _ = shm_unlink(format!("/{dead}").as_str());
        let fd = shm_open(
            format!("/{dead}").as_str(),
            OFlag::O_CREAT | OFlag::O_RDWR,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .unwrap();
        drop(fd);
        let live = new_name();
        let seg = Segment::create(&live, [4096, 4096], 0).unwrap();
        let removed = remove_stale();
        assert!(removed.contains(&dead), "{removed:?}");
        assert!(!removed.contains(&live));
        seg.unlink().unwrap();
    }
}
