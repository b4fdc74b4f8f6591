//! `MLXD_HOME` is private: the prompt cache's files carry users' prompts (their
//! token ids), the logs carry requests, `run/` the API key's socket. Everything
//! the daemon and its workers create is 0700 (directories) or 0600 (files): the
//! process umask is 0077 from the start of `main`, and workers inherit it. A home
//! made before that (or by hand) with wider permissions is tightened when the
//! daemon starts: the home itself and mlxd's own entries in it ([`OWN_ENTRIES`]),
//! never anything else a user keeps there (`MLXD_HOME=~` must not chmod a whole
//! home directory). A home, or an entry of mlxd's in it, that belongs to another
//! user is refused, since whoever owns it can read and replace what mlxd keeps
//! there (a planted preset or config). A volume that ignores modes (FAT, exFAT)
//! is served with a warning.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What the daemon and its workers create: owner-only.
pub const UMASK: u32 = 0o077;

/// What mlxd keeps in its home (besides its control sockets, `mlxd*.sock`).
pub const OWN_ENTRIES: &[&str] = &[
    "config.toml",
    "presets",
    "models",
    "logs",
    "run",
    "prompt-cache",
];

/// What making a home private did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tightened {
    /// Entries whose group and other permissions were removed.
    pub changed: usize,
    /// Entries whose mode could not be changed (a volume that ignores modes).
    pub failed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(
        "{path} belongs to user {owner}, not to you (user {me}): mlxd keeps prompts, logs and its \
         control socket there and will not use a directory another user controls; set MLXD_HOME \
         to a directory of your own"
    )]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error("cannot make {path} private: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Sets the process umask so that nothing it (or a child) creates is readable
/// by other users.
pub fn set_private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(UMASK as _));
}

/// Creates `home` (0700) or checks that we own it, then takes group and other
/// permissions off it and off mlxd's own entries in it, recursively (symbolic
/// links are neither followed nor changed).
pub fn make_private(home: &Path) -> Result<Tightened, HomeError> {
    let io = |source| HomeError::Io {
        path: home.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)
        .map_err(io)?;
    let me = nix::unistd::geteuid().as_raw();
    let mut done = Tightened::default();
    tighten(home, me, false, &mut done)?;
    for entry in std::fs::read_dir(home).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let socket = name.starts_with("mlxd") && name.ends_with(".sock");
        if OWN_ENTRIES.contains(&name) || socket {
            tighten(&path, me, true, &mut done)?;
        }
    }
    Ok(done)
}

/// The owner of a directory we must not use: another user's (root may use any).
pub fn foreign_owner(owner: u32, me: u32) -> Option<u32> {
    (owner != me && me != 0).then_some(owner)
}

/// The mode `mode` becomes: group and other bits off.
pub fn private_mode(mode: u32) -> u32 {
    mode & !UMASK & 0o7777
}

fn tighten(path: &Path, me: u32, recurse: bool, done: &mut Tightened) -> Result<(), HomeError> {
    let io = |source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        // Gone meanwhile (a worker's temporary file): nothing to tighten.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other.map_err(io)?,
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if let Some(owner) = foreign_owner(meta.uid(), me) {
        return Err(HomeError::NotOwned {
            path: path.to_path_buf(),
            owner,
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if private_mode(mode) != mode {
        let private = std::fs::Permissions::from_mode(private_mode(mode));
        match std::fs::set_permissions(path, private) {
            Ok(()) => done.changed += 1,
            Err(_) => done.failed += 1,
        }
    }
    if recurse && meta.is_dir() {
        let entries = match std::fs::read_dir(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(io)?,
        };
        for entry in entries {
            tighten(&entry.map_err(io)?.path(), me, true, done)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_group_and_other_bits_come_off() {
        assert_eq!(private_mode(0o755), 0o700);
        assert_eq!(private_mode(0o644), 0o600);
        assert_eq!(private_mode(0o600), 0o600);
        assert_eq!(private_mode(0o4777), 0o4700);
    }

    #[test]
    fn another_users_directory_is_refused_unless_we_are_root() {
        assert_eq!(foreign_owner(501, 501), None);
        assert_eq!(foreign_owner(502, 501), Some(502));
        assert_eq!(foreign_owner(502, 0), None);
    }

    #[test]
    fn a_wide_home_and_what_it_holds_are_tightened() {
        let dir = crate::test_support::scratch_dir("home-wide");
        let home = dir.join("home");
        std::fs::create_dir_all(home.join("logs")).unwrap();
        std::fs::write(home.join("logs/mlxd.log"), "x").unwrap();
        std::fs::write(home.join("config.toml"), "").unwrap();
        std::fs::write(home.join("notes.txt"), "a user's own file").unwrap();
        std::fs::write(dir.join("elsewhere"), "y").unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), home.join("logs/link")).unwrap();
        for (path, mode) in [
            (home.clone(), 0o755),
            (home.join("logs"), 0o775),
            (home.join("logs/mlxd.log"), 0o644),
            (home.join("config.toml"), 0o644),
            (home.join("notes.txt"), 0o644),
            (dir.join("elsewhere"), 0o644),
        ] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let done = make_private(&home).unwrap();
        assert_eq!(
            done,
            Tightened {
                changed: 4,
                failed: 0
            }
        );
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(home.clone()), 0o700);
        assert_eq!(mode(home.join("logs")), 0o700);
        assert_eq!(mode(home.join("logs/mlxd.log")), 0o600);
        assert_eq!(mode(home.join("config.toml")), 0o600);
        // Not mlxd's: a home shared with a user's own files leaves them alone.
        assert_eq!(mode(home.join("notes.txt")), 0o644);
        // A link is not followed: what it points to is not ours to change.
        assert_eq!(mode(dir.join("elsewhere")), 0o644);
        let again = make_private(&home).unwrap();
        assert_eq!(
            again,
            Tightened::default(),
            "a second start has nothing to do"
        );
    }

    #[test]
    fn a_new_home_is_created_private() {
        let dir = crate::test_support::scratch_dir("home-new");
        let home = dir.join("a/b");
        make_private(&home).unwrap();
        assert_eq!(std::fs::metadata(&home).unwrap().mode() & 0o777, 0o700);
    }
}
