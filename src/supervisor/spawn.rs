//! Building a worker's process: interpreter, arguments, a scrubbed environment,
//! its own process group, and the pipes that are its lifeline (plus, on Linux, a
//! parent-death signal: `sys::kill_with_daemon`).
//!
//! Kill steps (the slot's Shutdown and Kill effects): Shutdown frame and stdin EOF;
//! after the stop grace, or at once for a faulty worker, SIGTERM to the whole process
//! group, SIGKILL 2 s later; the exit watcher reaps.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::config::Config;
use crate::presets::{EngineKind, TransportKind};

/// Environment variables a worker may inherit; everything else is scrubbed so
/// that secrets in the daemon's environment never reach model code.
const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "USER",
    "MLXD_WORKER_LOG",
    // GPU hosts: which device, and where CUDA's libraries are.
    "CUDA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
];

/// Debian/Ubuntu's OpenBLAS, which MLX's Linux CPU wheel runs 14x faster than the
/// reference BLAS it links.
pub fn openblas_path() -> Option<PathBuf> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let arch = std::env::consts::ARCH;
    let p = PathBuf::from(format!(
        "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3"
    ));
    p.exists().then_some(p)
}

pub fn command(
    cfg: &Config,
    model: &str,
    transport: TransportKind,
    engine: EngineKind,
    segment: Option<(&str, u64)>,
) -> Command {
    let mut cmd = Command::new(&cfg.python);
    cmd.arg("-m")
        .arg("mlxd_worker")
        // Only so that `ps` and logs tell whose worker a process is.
        .arg("--model")
        .arg(model)
        .arg("--transport")
        .arg(transport.to_string())
        .arg("--engine")
        .arg(engine.as_str());
    if let Some((name, generation)) = segment {
        cmd.arg("--segment")
            .arg(name)
            .arg("--generation")
            .arg(generation.to_string());
    }
    cmd.env_clear();
    for key in INHERITED_ENV {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("PYTHONPATH", python_path(&cfg.worker_dir))
        .env("PYTHONUNBUFFERED", "1")
        // Never reach for a model hub: every model is local.
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false");
    if let Some(blas) = openblas_path() {
        cmd.env("LD_PRELOAD", blas);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::sys::kill_with_daemon(&mut cmd);
    cmd
}

fn python_path(worker_dir: &Path) -> std::ffi::OsString {
    let mut p = worker_dir.as_os_str().to_owned();
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        p.push(":");
        p.push(existing);
    }
    p
}

/// A signal to the worker's whole process group (it leads its own group).
pub fn kill_group(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        if pid > 0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
        }
    }
}
