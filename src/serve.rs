//! `mlxd serve`: bind, preload, serve until a signal (or stdin EOF), stop workers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use tokio::io::AsyncReadExt;

use crate::api::{router, AppState};
use crate::config::Config;
use crate::presets::Presets;
use crate::supervisor::Supervisor;

pub struct ServeOptions {
    /// Models to start right away (scripts/run starts the default model).
    pub preload: Vec<String>,
    /// Extra preset directories (e.g. test presets).
    pub presets_dirs: Vec<std::path::PathBuf>,
    /// Exit when stdin closes: tests use it so that a dead test runner never leaves
    /// a daemon behind (the same lifeline the workers have).
    pub exit_on_stdin_eof: bool,
    pub allow_remote: bool,
}

pub async fn serve(mut cfg: Config, opts: ServeOptions) -> anyhow::Result<()> {
    let ip: IpAddr = cfg.host.parse().with_context(|| format!("bad host {}", cfg.host))?;
    anyhow::ensure!(
        ip.is_loopback() || opts.allow_remote,
        "refusing to bind {ip}: mlxd has no authentication yet; pass --allow-remote to expose it anyway"
    );
    cfg.presets_dirs.extend(opts.presets_dirs);
    let presets = Presets::load(&cfg.presets_dirs)?;
    let removed = worker_protocol::segment::remove_stale();
    if !removed.is_empty() {
        tracing::info!(?removed, "removed stale shared-memory segments");
    }
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, cfg.port))
        .await
        .with_context(|| format!("cannot bind {ip}:{}", cfg.port))?;
    let addr = listener.local_addr()?;
    let supervisor = Arc::new(Supervisor::new(cfg, presets));
    // Tests and scripts read this line to learn the port (with --port 0).
    println!("mlxd listening on http://{addr}");
    for model in opts.preload {
        let sup = supervisor.clone();
        tokio::spawn(async move {
            match sup.ensure(&model).await {
                Ok(_) => tracing::info!(%model, "ready"),
                Err(e) => tracing::error!(%model, "could not start: {e}"),
            }
        });
    }
    let app = router(AppState {
        supervisor: supervisor.clone(),
    });
    let exit_on_eof = opts.exit_on_stdin_eof;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal(exit_on_eof).await;
            tracing::info!("shutting down");
        })
        .await?;
    supervisor.shutdown().await;
    Ok(())
}

async fn shutdown_signal(exit_on_stdin_eof: bool) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    let stdin_eof = async {
        if !exit_on_stdin_eof {
            return std::future::pending().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = stdin_eof => {},
    }
}
