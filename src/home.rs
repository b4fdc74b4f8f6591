//! `MLXD_HOME` is private: the prompt cache's files carry users' prompts (their
//! token ids), the logs carry requests, `run/` the API key's socket. Everything
//! the daemon and its workers create is 0700 (directories) or 0600 (files): the
//! process umask is 0077 from the start of `main`, and workers inherit it. A home
//! made before that (or by hand) with wider permissions is tightened when the
//! daemon starts; one that belongs to another user is refused, since whoever owns
//! it can read and replace what mlxd keeps there.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What the daemon and its workers create: owner-only.
pub const UMASK: u32 = 0o077;

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
/// permissions off it and everything under it that we own (symbolic links are
/// neither followed nor changed). Returns how many entries were tightened.
pub fn make_private(home: &Path) -> Result<usize, HomeError> {
    let io = |source| HomeError::Io {
        path: home.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)
        .map_err(io)?;
    let meta = std::fs::metadata(home).map_err(io)?;
    let me = nix::unistd::geteuid().as_raw();
    if let Some(owner) = foreign_owner(meta.uid(), me) {
        return Err(HomeError::NotOwned {
            path: home.to_path_buf(),
            owner,
            me,
        });
    }
    let mut tightened = 0;
    tighten(home, me, &mut tightened).map_err(io)?;
    Ok(tightened)
}

/// The owner of a directory we must not use: another user's (root may use any).
pub fn foreign_owner(owner: u32, me: u32) -> Option<u32> {
    (owner != me && me != 0).then_some(owner)
}

/// The mode `mode` becomes: group and other bits off.
pub fn private_mode(mode: u32) -> u32 {
    mode & !UMASK & 0o7777
}

fn tighten(path: &Path, me: u32, tightened: &mut usize) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() || meta.uid() != me {
        return Ok(());
    }
    let mode = meta.mode() & 0o7777;
    if private_mode(mode) != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(private_mode(mode)))?;
        *tightened += 1;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            match tighten(&entry?.path(), me, tightened) {
                // Gone meanwhile (a worker's temporary file): nothing to tighten.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
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
        std::fs::write(dir.join("elsewhere"), "y").unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), home.join("link")).unwrap();
        for (path, mode) in [
            (home.clone(), 0o755),
            (home.join("logs"), 0o775),
            (home.join("logs/mlxd.log"), 0o644),
            (dir.join("elsewhere"), 0o644),
        ] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        assert_eq!(make_private(&home).unwrap(), 3);
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(home.clone()), 0o700);
        assert_eq!(mode(home.join("logs")), 0o700);
        assert_eq!(mode(home.join("logs/mlxd.log")), 0o600);
        // A link is not followed: what it points to is not ours to change.
        assert_eq!(mode(dir.join("elsewhere")), 0o644);
        assert_eq!(
            make_private(&home).unwrap(),
            0,
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
