//! The shared-memory segments this daemon has created, in a file per daemon
//! (`$MLXD_HOME/run/shm-<pid>.list`): macOS cannot list segments, so a daemon that
//! died (SIGKILL, power loss) leaves names that only this record can find. At start,
//! the records of dead daemons are read, their segments unlinked, the files removed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct ShmRegistry {
    /// None when the directory cannot be written: the registry is then best-effort
    /// in memory only (Linux still finds stale segments in /dev/shm).
    path: Option<PathBuf>,
    names: Mutex<BTreeSet<String>>,
}

const PREFIX: &str = "shm-";
const SUFFIX: &str = ".list";

impl ShmRegistry {
    /// This daemon's registry under `home`.
    pub fn open(home: &Path) -> ShmRegistry {
        let dir = home.join("run");
        let path = match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(dir.join(format!("{PREFIX}{}{SUFFIX}", std::process::id()))),
            Err(e) => {
                tracing::warn!("cannot keep a segment registry in {}: {e}", dir.display());
                None
            }
        };
        ShmRegistry {
            path,
            names: Mutex::new(BTreeSet::new()),
        }
    }

    /// A registry that keeps nothing on disk (unit tests).
    pub fn in_memory() -> ShmRegistry {
        ShmRegistry {
            path: None,
            names: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn add(&self, name: &str) {
        let mut names = self.names.lock().expect("lock");
        names.insert(name.to_string());
        self.write(&names);
    }

    pub fn remove(&self, name: &str) {
        let mut names = self.names.lock().expect("lock");
        if names.remove(name) {
            self.write(&names);
        }
    }

    /// Names currently recorded (for `mlxd ps` and the soak's leak count).
    pub fn len(&self) -> usize {
        self.names.lock().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self, names: &BTreeSet<String>) {
        let Some(path) = &self.path else { return };
        let text: String = names.iter().map(|n| format!("{n}\n")).collect();
        // Write-then-rename: a crash mid-write never leaves a half list.
        let tmp = path.with_extension("tmp");
        let result = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            tracing::warn!("segment registry {}: {e}", path.display());
        }
    }

    /// Removes this daemon's record (clean exit: every segment is already gone).
    pub fn close(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Unlinks the segments recorded by daemons that are no longer running and
    /// removes their records. Returns the names unlinked.
    pub fn clean_stale(home: &Path) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(dir) = std::fs::read_dir(home.join("run")) else {
            return removed;
        };
        for entry in dir.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = file
                .strip_prefix(PREFIX)
                .and_then(|r| r.strip_suffix(SUFFIX))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() || worker_protocol::segment::process_alive(pid) {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for name in text.lines().map(str::trim).filter(|n| !n.is_empty()) {
                if worker_protocol::segment::unlink_name(name).is_ok() {
                    removed.push(name.to_string());
                }
            }
            let _ = std::fs::remove_file(entry.path());
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use worker_protocol::segment::{new_name, Segment};

    #[test]
    fn a_dead_daemons_segments_are_unlinked_from_its_record() {
        let home = std::env::temp_dir().join(format!("mlxd-registry-{}", std::process::id()));
        std::fs::create_dir_all(home.join("run")).unwrap();
        // A record left by a daemon that cannot be alive, naming a real segment.
        let name = new_name();
        let seg = Segment::create(&name, [4096, 4096], 1).unwrap();
        let dead = home
            .join("run")
            .join(format!("{PREFIX}{}{SUFFIX}", i32::MAX - 3));
        std::fs::write(&dead, format!("{name}\n")).unwrap();
        // Our own record is left alone.
        let ours = ShmRegistry::open(&home);
        let live = new_name();
        let live_seg = Segment::create(&live, [4096, 4096], 1).unwrap();
        ours.add(&live);

        let removed = ShmRegistry::clean_stale(&home);
        assert_eq!(removed, vec![name.clone()]);
        assert!(!dead.exists());
        assert!(Segment::open(&name).is_err(), "the stale segment is gone");
        assert!(
            Segment::open(&live).is_ok(),
            "a live daemon's segment stays"
        );
        ours.remove(&live);
        assert!(ours.is_empty());
        live_seg.unlink().unwrap();
        ours.close();
        drop(seg);
        let _ = std::fs::remove_dir_all(&home);
    }
}
