//! `mlxd serve`: bind, preload, serve until a signal (or stdin EOF), stop workers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use std::io::Read;

use crate::api::{router, AppState};
use crate::config::Config;
use crate::presets::Presets;
use crate::supervisor::{ShmRegistry, Supervisor};

/// How long open connections may take to finish after a shutdown signal.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct ServeOptions {
    /// Models to start right away (scripts/run starts the default model).
    pub preload: Vec<String>,
    /// Extra preset directories (e.g. test presets).
    pub presets_dirs: Vec<std::path::PathBuf>,
    /// Exit when stdin closes: tests use it so that a dead test runner never leaves
    /// a daemon behind (the same lifeline the workers have).
    pub exit_on_stdin_eof: bool,
    /// `--host` and `--port`, which a reload applies over the re-read config
    /// again (as main did at start).
    pub host_flag: Option<String>,
    pub port_flag: Option<u16>,
}

/// The first line `mlxd serve` prints on stdout, before the URL it serves on;
/// scripts and tests that start a daemon on port 0 read the URL from it.
pub const LISTENING: &str = "mlxd listening on ";

/// The URL in the line `serve` prints first, if `line` is that line.
pub fn listening_url(line: &str) -> Option<&str> {
    line.trim().strip_prefix(LISTENING)
}

pub async fn serve(mut cfg: Config, opts: ServeOptions) -> anyhow::Result<()> {
    let ip: IpAddr = cfg
        .host
        .parse()
        .with_context(|| format!("bad host {}", cfg.host))?;
    anyhow::ensure!(
        ip.is_loopback() || !cfg.api_keys.is_empty(),
        "refusing to bind {ip} without an API key: set MLXD_API_KEY or api_keys in the config"
    );
    let metrics = crate::metrics::install();
    let extra_dirs = opts.presets_dirs.clone();
    cfg.presets_dirs.extend(opts.presets_dirs);
    let presets = Presets::load(&cfg.presets_dirs)?;
    // Segments left by daemons that died: first from their records (the only way
    // on macOS), then by name and owner pid in /dev/shm (Linux).
    let mut removed = ShmRegistry::clean_stale(&cfg.home);
    removed.extend(worker_protocol::segment::remove_stale());
    if !removed.is_empty() {
        tracing::info!(?removed, "removed stale shared-memory segments");
    }
    let registry = ShmRegistry::open(&cfg.home);
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, cfg.port))
        .await
        .with_context(|| format!("cannot bind {ip}:{}", cfg.port))?;
    let addr = listener.local_addr()?;
    // The control plane (start/stop/restart/ps/memory) for the CLI: a 0600 socket.
    let control_path = crate::config::control_socket(&cfg.home, addr.port());
    let control = bind_control(&control_path)?;
    let max_connections = cfg.max_connections;
    let guard =
        crate::api::guard::Guard::new(ip, &cfg.allowed_hosts, &cfg.allowed_origins, &cfg.api_keys);
    let image_urls = Arc::new(crate::api::image_urls::ImageFetcher::new(
        &cfg.allowed_image_hosts,
    ));
    // Peers are read at start: a reload that changes them says a restart is needed.
    let peers = crate::peers::Peers::new(&cfg.peers, |k| std::env::var_os(k))?;
    let supervisor = Arc::new(Supervisor::new(cfg, presets, registry));
    let (host_flag, port_flag) = (opts.host_flag, opts.port_flag);
    supervisor.set_config_source(Box::new(move || {
        let mut cfg = Config::load()?;
        if let Some(h) = &host_flag {
            cfg.host = h.clone();
        }
        if let Some(p) = port_flag {
            cfg.port = p;
        }
        cfg.presets_dirs.extend(extra_dirs.iter().cloned());
        Ok(cfg)
    }));
    // Installed before the URL is printed: SIGHUP's default action ends the
    // process, and a script may send it as soon as it reads that line.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    let sup = supervisor.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            // The report (or the refusal) is the reload's log line.
            if let Err(e) = sup.reload().await {
                tracing::error!("SIGHUP: {e}");
            }
        }
    });
    // Tests and scripts read this line to learn the port (with --port 0).
    println!("{LISTENING}http://{addr}");
    for model in opts.preload {
        let sup = supervisor.clone();
        tokio::spawn(async move {
            match sup.start(&model, false).await {
                Ok(_) => tracing::info!(%model, "ready"),
                Err(e) => tracing::error!(%model, "could not start: {e}"),
            }
        });
    }
    peers.spawn_watch()?;
    let state = AppState {
        supervisor: supervisor.clone(),
        metrics: metrics.clone(),
        image_urls,
        peers,
        #[cfg(feature = "bench-http")]
        http: reqwest::Client::builder().no_proxy().build()?,
    };
    let control_app = crate::api::control_router(state.clone());
    let app = router(state, guard);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut control_stop = stop_rx.clone();
    let control_server = tokio::spawn(serve_http(
        control,
        control_app,
        crate::config::MAX_CONNECTIONS,
        async move {
            let _ = control_stop.wait_for(|stop| *stop).await;
        },
    ));
    let server = tokio::spawn(async move {
        serve_http(listener, app, max_connections, async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        })
        .await
    });
    shutdown_signal(opts.exit_on_stdin_eof).await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // Open connections (idle keep-alives, slow clients) get a bounded drain: a client
    // must not be able to keep the daemon, and its workers, alive.
    match tokio::time::timeout(DRAIN_LIMIT, server).await {
        Ok(joined) => joined?,
        Err(_) => tracing::warn!("connections still open after {DRAIN_LIMIT:?}; closing them"),
    }
    let _ = tokio::time::timeout(DRAIN_LIMIT, control_server).await;
    let _ = std::fs::remove_file(&control_path);
    supervisor.shutdown().await;
    Ok(())
}

/// A client gets this long to send a request's headers, and an idle keep-alive
/// connection is closed after it (slow-header clients must not pin connections).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTP server (over TCP, or the control socket): hyper with a header-read
/// timeout (which needs a timer: without one hyper would not enforce it), a
/// connection cap, HTTP/1.1 and h2c, and a graceful stop that lets open requests
/// finish.
async fn serve_http<L: axum::serve::Listener>(
    mut listener: L,
    app: axum::Router,
    max_connections: usize,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use std::sync::atomic::{AtomicBool, Ordering};

    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    tokio::pin!(stop);
    loop {
        // (accept errors are logged and retried by the listener)
        let stream = tokio::select! {
            (stream, _) = listener.accept() => stream,
            () = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("{max_connections} connections open; refusing another");
            continue; // dropping the stream closes it
        };
        // hyper's header timer starts at the first byte: a connection that never
        // sends one would hold its slot for ever. The first request must have
        // arrived within HEADER_READ_TIMEOUT of the accept, or it is closed.
        let requested = Arc::new(AtomicBool::new(false));
        let service = {
            let (app, requested) = (app.clone(), requested.clone());
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                requested.store(true, Ordering::Relaxed);
                tower::ServiceExt::oneshot(app.clone(), req)
            })
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = tokio::time::sleep(HEADER_READ_TIMEOUT) => {
                    if requested.load(Ordering::Relaxed) {
                        let _ = conn.await;
                    } // else dropped: closed
                }
            }
            drop(slot);
        });
    }
    graceful.shutdown().await;
}

/// Binds the control socket, owner-only (0600): its file mode is its
/// authentication. A socket file left by a dead daemon is replaced; one a live
/// daemon answers on is not.
fn bind_control(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    remove_dead_sockets(path.parent());
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another mlxd daemon serves {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Created 0600 from the start (no window with a wider mode).
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    bound.with_context(|| format!("cannot bind the control socket {}", path.display()))
}

/// Control sockets that no daemon answers on any more (a daemon killed with
/// SIGKILL cannot remove its own).
fn remove_dead_sockets(home: Option<&std::path::Path>) {
    let Some(Ok(dir)) = home.map(std::fs::read_dir) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("mlxd") && name.ends_with(".sock") {
            let path = entry.path();
            if std::os::unix::net::UnixStream::connect(&path).is_err() {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
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
        // A plain thread, not tokio's stdin: tokio reads stdin on its blocking pool,
        // and the runtime would wait for that read forever when shutting down.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = tx.send(());
        });
        let _ = rx.await;
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = stdin_eof => {},
    }
}
