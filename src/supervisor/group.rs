//! A distributed preset's incarnation (crate::distributed): rank 0 is the
//! incarnation's worker, and the other ranks of this machine are started beside
//! it, in its process group, so that every way the incarnation ends (a stop, a
//! kill, a hang, rank 0's death, the daemon's) ends them too.
//!
//! One group, one fate: a rank that dies while rank 0 lives leaves the group unable
//! to step (its collectives would wait for it forever), so its death is reported
//! as the incarnation misbehaving, with the rank and how it ended; the slot kills
//! the whole process group and runs its ordinary crash path (started requests get
//! the error, queued ones the next incarnation).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::exit::{describe_exit, MemoryAtDeath};
use super::incarnation::{pipe_stderr, Report, ReportTx, Shared};
use super::spawn;
use crate::config::Config;
use crate::distributed::{Distributed, Hostfile};
use crate::presets::{EngineKind, Preset, TransportKind};

/// One incarnation's group, planned before any of its processes exists.
pub struct Group {
    pub world_size: usize,
    parallel: &'static str,
    hostfile: PathBuf,
}

impl Group {
    /// Where each rank listens, written to this incarnation's hostfile.
    pub fn plan(cfg: &Config, preset: &Preset, d: &Distributed, n: u64) -> Result<Group, String> {
        let engine = preset.worker_engine(&cfg.models_dir);
        if !matches!(engine, EngineKind::Mlx | EngineKind::Replay) {
            return Err(format!(
                "a [distributed] preset serves a text model; {} is served by the {} engine",
                preset.model,
                engine.as_str()
            ));
        }
        let hosts = Hostfile::local(d).map_err(|e| format!("the ranks' ports: {e}"))?;
        let hostfile = hosts
            .write(&cfg.home.join("run"), &format!("{}.{n}", preset.name))
            .map_err(|e| format!("writing the ranks' hostfile: {e}"))?;
        Ok(Group {
            world_size: d.world_size(),
            parallel: d.parallel.resolved(),
            hostfile,
        })
    }

    /// Makes `cmd` rank `rank` of the group: the variables mlx.launch sets for
    /// the ring backend, and the worker's part.
    pub fn join(&self, cmd: &mut tokio::process::Command, rank: usize) {
        cmd.arg("--parallel").arg(self.parallel);
        if rank > 0 {
            cmd.arg("--follower");
        }
        cmd.env("MLX_RANK", rank.to_string())
            .env("MLX_HOSTFILE", &self.hostfile);
    }

    /// The incarnation has ended: its hostfile goes.
    pub fn remove_hostfile(&self) {
        let _ = std::fs::remove_file(&self.hostfile);
    }
}

/// Starts ranks 1.. of `group` in rank 0's process group (`leader`), each watched:
/// a rank that ends otherwise than cleanly (a clean end follows rank 0's own) while
/// rank 0 lives is reported as incarnation `n` misbehaving. A rank that cannot be
/// started is reported the same way: the group cannot run without it.
pub fn spawn_followers(
    cfg: &Config,
    preset: &Preset,
    group: &Group,
    leader: u32,
    n: u64,
    shared: &Arc<Shared>,
    reports: &ReportTx,
) {
    let engine = preset.worker_engine(&cfg.models_dir);
    for rank in 1..group.world_size {
        let mut cmd = spawn::command(cfg, &preset.name, TransportKind::Stdio, engine, None);
        group.join(&mut cmd, rank);
        // It reads no frames and writes none: rank 0 speaks for the group.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(leader as i32);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let why = format!("rank {rank} could not be started: {e}");
                let _ = reports.send((n, Report::Misbehaved(why)));
                return;
            }
        };
        let pid = child.id().unwrap_or_default();
        tracing::info!(model = %preset.name, incarnation = n, rank, pid, "rank spawned");
        if let Some(stderr) = child.stderr.take() {
            pipe_stderr(stderr, cfg, shared.clone());
        }
        let (sh, tx, world) = (shared.clone(), reports.clone(), group.world_size);
        tokio::spawn(async move {
            let status = child.wait().await;
            let killed_by_daemon = sh.killed_by_daemon();
            let how = match status {
                Ok(s) if s.success() => return,
                Ok(s) => describe_exit(
                    s,
                    MemoryAtDeath {
                        killed_by_daemon,
                        ..MemoryAtDeath::default()
                    },
                ),
                Err(e) => format!("could not be reaped: {e}"),
            };
            if sh.exited.load(Ordering::Acquire) || killed_by_daemon {
                return; // the group is ending already
            }
            let why = format!("rank {rank} of {world} (this host, pid {pid}) {how}");
            sh.rank_deaths.lock().expect("lock").push(why.clone());
            let _ = tx.send((n, Report::Misbehaved(why)));
        });
    }
}
