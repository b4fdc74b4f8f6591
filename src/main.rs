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
    /// Show presets and imported models.
    List,
    /// Import a llama GGUF file as an MLX model.
    Import {
        gguf: PathBuf,
        /// Model name (default: from the file name).
        #[arg(long)]
        name: Option<String>,
        /// Dequantize everything to this dtype (default: keep Q4_0/Q4_1/Q8_0 quantized).
        #[arg(long, value_parser = ["float16", "bfloat16", "float32"])]
        dtype: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MLXD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut cfg = Config::load()?;
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
            if let Some(h) = host {
                cfg.host = h;
            }
            mlxd::serve::serve(
                cfg,
                mlxd::serve::ServeOptions {
                    preload: models,
                    presets_dirs,
                    exit_on_stdin_eof,
                },
            )
            .await
        }
        Cmd::Start { model, pin } => mlxd::cli::start(&cfg, &model, pin).await,
        Cmd::Restart { model } => mlxd::cli::restart(&cfg, &model).await,
        Cmd::Stop { model } => mlxd::cli::stop(&cfg, &model).await,
        Cmd::Ps => mlxd::cli::ps(&cfg).await,
        Cmd::Benchmark {
            model,
            runs,
            max_tokens,
            prompt,
        } => mlxd::cli::benchmark(&cfg, &model, runs, max_tokens, prompt).await,
        Cmd::List => mlxd::cli::list(&cfg),
        Cmd::Import { gguf, name, dtype } => {
            mlxd::cli::import(&cfg, &gguf, name.as_deref(), dtype.as_deref())
        }
    }
}
