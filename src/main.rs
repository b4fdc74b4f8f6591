//! `mlxd` command line: parse, call the library, nothing else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mlxd::config::Config;

#[derive(Parser)]
#[command(name = "mlxd", version, about = "Serve local LLMs with mlx-lm workers")]
struct Cli {
    /// Port of the daemon (serve binds it; other commands talk to it).
    #[arg(long, global = true, env = "MLXD_PORT")]
    port: Option<u16>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Serve {
        /// Address to bind (loopback unless an API key is configured).
        #[arg(long)]
        host: Option<String>,
        /// Start these models right away.
        #[arg(long = "model")]
        models: Vec<String>,
        /// Extra directory of preset TOML files (repeatable).
        #[arg(long = "presets-dir")]
        presets_dirs: Vec<PathBuf>,
        /// Exit when stdin closes (for test harnesses).
        #[arg(long, hide = true)]
        exit_on_stdin_eof: bool,
    },
    /// Start a model's worker in the running daemon (waits until it is ready).
    Start {
        model: String,
        /// Keep it loaded: never unloaded for keep-alive.
        #[arg(long)]
        pin: bool,
    },
    /// Replace a model's worker with a fresh one (also clears a failed model).
    Restart { model: String },
    /// Stop a model's worker.
    Stop { model: String },
    /// Re-read config.toml and the presets in the running daemon (like SIGHUP):
    /// models whose preset did not change keep serving.
    Reload,
    /// Show running workers.
    Ps,
    /// Measure a model's speculative decoding: N runs drafting, N plain, interleaved.
    Benchmark {
        model: String,
        /// Runs per side.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// The user message (default: a short story prompt).
        #[arg(long)]
        prompt: Option<String>,
    },
    /// Measure a model's performance knobs here and write the best profile into
    /// its preset's [performance] table (no daemon needed).
    Tune {
        model: String,
        /// Concurrency levels: that many identical requests at once.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        concurrency: Vec<u32>,
        /// Prompt tokens prefilled per step.
        #[arg(
            long = "prefill-step",
            value_delimiter = ',',
            default_value = "512,2048"
        )]
        prefill_steps: Vec<u32>,
        /// KV cache bits: "none" (full precision), 4 or 8.
        #[arg(long, value_delimiter = ',', default_value = "none,8", value_parser = parse_kv_bits)]
        kv_bits: Vec<KvBits>,
        /// Do not compare drafting on and off (for a preset with a draft model).
        #[arg(long)]
        no_draft_sweep: bool,
        /// Tokens each request generates.
        #[arg(long, default_value_t = 32)]
        max_tokens: u32,
        /// The user message (default: a prose passage longer than the smallest
        /// prefill step).
        #[arg(long)]
        prompt: Option<String>,
        /// Measure and print; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Extra directory of preset TOML files (repeatable), as for serve.
        #[arg(long = "presets-dir")]
        presets_dirs: Vec<PathBuf>,
    },
    /// Run the daemon at login as a LaunchAgent (macOS) or a systemd user unit
    /// (Linux), restarted after a crash.
    Service {
        #[command(subcommand)]
        action: mlxd::service::Action,
        /// Print the service file and the commands; change nothing.
        #[arg(long, global = true)]
        dry_run: bool,
        /// With --dry-run: another platform's file and commands.
        #[arg(long, global = true, hide = true, value_enum)]
        target: Option<mlxd::service::Target>,
    },
    /// Print the end of the daemon's log, or of a model's worker log.
    Logs {
        /// Keep printing what is appended (across rotation) until interrupted.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The worker log of this model instead of the daemon's.
        #[arg(long)]
        model: Option<String>,
        /// How many lines of the end to print.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
    /// Show presets and imported models.
    List,
    /// What a model needs in memory (weights, KV per token, the reserve, a
    /// working set) and whether it fits the cap; exits 1 when it does not.
    Estimate {
        /// A preset's name, an imported model's name, or a model directory.
        model: String,
        /// Tokens per sequence of the working set (default: the model's context).
        #[arg(long)]
        context: Option<u64>,
        /// Sequences of the working set.
        #[arg(long)]
        concurrency: Option<u64>,
        /// Ask about another machine's cap ("512GB", "460GiB"); what is loaded
        /// here does not count. MLXD_MEMORY_CAP sets this machine's.
        #[arg(long)]
        cap: Option<String>,
    },
    /// Import a llama GGUF file as an MLX model.
    Import {
        gguf: PathBuf,
        /// Model name (default: from the file name).
        #[arg(long)]
        name: Option<String>,
        /// Dequantize everything to this dtype (default: keep the file's quantization,
        /// at the closest MLX bits).
        #[arg(long, value_parser = ["float16", "bfloat16", "float32"], conflicts_with = "bits")]
        dtype: Option<String>,
        /// Quantize every quantized tensor to this many bits instead.
        #[arg(long, value_parser = ["4", "5", "6", "8"])]
        bits: Option<String>,
    },
}

/// A `--kv-bits` value: None is a full-precision cache. (An alias: clap takes a
/// bare `Option<u32>` element type for "the flag may be absent".)
type KvBits = Option<u32>;

fn parse_kv_bits(s: &str) -> Result<KvBits, String> {
    match s.trim() {
        "none" | "off" | "16" => Ok(None),
        "4" => Ok(Some(4)),
        "8" => Ok(Some(8)),
        other => Err(format!("{other:?}: write none, 4 or 8")),
    }
}

// glibc's malloc kept ~270 MB of one 6 MB request's parsed JSON (100,000
// messages, freed long before) in its per-thread arenas for good. jemalloc's
// background thread hands freed pages back to the system within seconds,
// whichever thread freed them. macOS's allocator returns them itself (and a C
// dependency there would need a C compiler for the macOS type-check).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its `malloc_conf`, read once at its start).
#[cfg(target_os = "linux")]
#[export_name = "_rjem_malloc_conf"]
pub static JEMALLOC_CONF: &u8 =
    &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Nothing mlxd or its workers create is readable by other users (home.rs).
    mlxd::home::set_private_umask();
    let cli = Cli::parse();
    let mut cfg = Config::load()?;
    // The commands that write into the home check it is ours and private first.
    let writes_home = matches!(cli.command, Cmd::Serve { .. } | Cmd::Import { .. });
    let tightened = if writes_home {
        mlxd::home::make_private(&cfg.home)?
    } else {
        mlxd::home::Tightened::default()
    };
    // The daemon also logs to files; the guard flushes them when main returns.
    let log_dir = matches!(cli.command, Cmd::Serve { .. }).then(|| mlxd::logs::logs_dir(&cfg.home));
    let _log_guard = mlxd::logs::init(log_dir.as_deref());
    if tightened.changed > 0 {
        tracing::warn!(
            home = %cfg.home.display(),
            entries = tightened.changed,
            "other users could read mlxd's home: group and other permissions removed"
        );
    }
    if tightened.failed > 0 {
        tracing::warn!(
            home = %cfg.home.display(),
            entries = tightened.failed,
            "cannot make these entries of mlxd's home private (a volume that ignores file modes?)"
        );
    }
    if let Some(p) = cli.port {
        cfg.port = p;
    }
    match cli.command {
        Cmd::Serve {
            host,
            models,
            presets_dirs,
            exit_on_stdin_eof,
        } => {
            if let Some(h) = &host {
                cfg.host = h.clone();
            }
            mlxd::serve::serve(
                cfg,
                mlxd::serve::ServeOptions {
                    preload: models,
                    presets_dirs,
                    exit_on_stdin_eof,
                    host_flag: host,
                    port_flag: cli.port,
                },
            )
            .await
        }
        Cmd::Start { model, pin } => mlxd::cli::start(&cfg, &model, pin).await,
        Cmd::Restart { model } => mlxd::cli::restart(&cfg, &model).await,
        Cmd::Stop { model } => mlxd::cli::stop(&cfg, &model).await,
        Cmd::Reload => mlxd::cli::reload(&cfg).await,
        Cmd::Ps => mlxd::cli::ps(&cfg).await,
        Cmd::Benchmark {
            model,
            runs,
            max_tokens,
            prompt,
        } => mlxd::cli::benchmark(&cfg, &model, runs, max_tokens, prompt).await,
        Cmd::Tune {
            model,
            concurrency,
            prefill_steps,
            kv_bits,
            no_draft_sweep,
            max_tokens,
            prompt,
            dry_run,
            presets_dirs,
        } => {
            let opts = mlxd::tune::TuneOptions {
                concurrency,
                prefill_steps,
                kv_bits,
                draft_sweep: !no_draft_sweep,
                max_tokens,
                prompt,
                dry_run,
                presets_dirs,
            };
            mlxd::tune::tune(cfg, &model, opts).await
        }
        Cmd::Service {
            action,
            dry_run,
            target,
        } => {
            let opts = mlxd::service::Options {
                dry_run,
                target,
                port: cli.port,
            };
            mlxd::service::run(&cfg, action, opts)
        }
        Cmd::Logs {
            follow,
            model,
            lines,
        } => {
            let source = match model {
                Some(m) => {
                    anyhow::ensure!(mlxd::presets::valid_name(&m), "{m:?} is not a model name");
                    mlxd::logs::LogSource::Worker {
                        path: mlxd::logs::worker_log_path(&cfg.home, &m),
                    }
                }
                None => mlxd::logs::LogSource::Daemon {
                    dir: mlxd::logs::logs_dir(&cfg.home),
                },
            };
            mlxd::logs::print(source, lines, follow).await
        }
        Cmd::List => mlxd::cli::list(&cfg),
        Cmd::Estimate {
            model,
            context,
            concurrency,
            cap,
        } => {
            let ask = mlxd::cli::EstimateAsk {
                model: &model,
                context,
                concurrency,
                cap: cap.as_deref(),
            };
            // 0 fits, 1 does not, 2 the question was wrong (scripts tell them apart).
            match mlxd::cli::estimate(&cfg, ask).await {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    std::process::exit(2)
                }
            }
        }
        Cmd::Import {
            gguf,
            name,
            dtype,
            bits,
        } => {
            let how = mlxd::cli::ImportAs {
                dtype: dtype.as_deref(),
                bits: bits.as_deref(),
            };
            mlxd::cli::import(&cfg, &gguf, name.as_deref(), how)
        }
    }
}
