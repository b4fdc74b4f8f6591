//! mlxd: a Rust daemon that supervises per-model mlx-lm worker processes and
//! serves them over HTTP (docs/design/ARCHITECTURE.md has the whole design).
//!
//! ```text
//! client ──HTTP──▶ api/ guard → dialect (openai · responses · anthropic · ollama)
//!                   │  request::Target: the model resolved to its preset once
//!                   ▼
//!                api::core ── Supervisor::generate ──▶ supervisor/slot (one per model:
//!                   │            queue, incarnation, restarts, keep-alive, memory)
//!                   │  Generate frame ──▶ shm ring (or stdio) ──▶ python-worker (mlx-lm)
//!                   │  TokenBatch/Done ◀── events ring ◀────────┘
//!                   ▼
//!                per-request GenStream → the dialect's Renderer → SSE / NDJSON / JSON
//! ```
//!
//! - [`config`]: daemon configuration; [`presets`]: model presets (and the
//!   lifecycle settings they carry: keep-alive, restart policy).
//! - [`api`]: HTTP routes; [`error`]: errors with a source → status; [`metrics`]: /metrics.
//! - [`supervisor`]: one slot per model (queue, worker incarnation, restarts,
//!   keep-alive), the memory arbiter, request routing by id.
//! - [`memory`]: the memory budget: limits, footprints, estimates, eviction plans;
//!   `sys`: the operating system's memory facts and all of the daemon's `unsafe`.
//! - [`transport`]: the daemon's end of the shm and stdio transports.
//! - [`serve`]: the daemon's main loop; [`cli`]: the thin clients of its admin API.
//! - [`logs`]: the daemon's and workers' log files, `mlxd logs`.
//! - [`service`]: `mlxd service`, the daemon as a LaunchAgent or systemd user unit.
//! - [`tune`]: `mlxd tune`, a sweep of a model's performance knobs in-process;
//!   [`timing`]: one request timed, as it and `POST /admin/benchmark` measure.

pub mod api;
pub mod cli;
pub mod config;
pub mod distributed;
pub mod error;
pub mod home;
pub mod kv_shape;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod model_files;
pub mod peers;
pub mod presets;
pub mod serve;
pub mod service;
pub mod supervisor;
mod sys;
pub mod timing;
pub mod transport;
pub mod tune;

/// Helpers shared by the unit tests of several modules.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;

    /// An empty directory of this test process, named `mlxd-<name>-<pid>`.
    pub fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mlxd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
