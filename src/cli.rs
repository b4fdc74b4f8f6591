//! The thin clients: `mlxd start|stop|ps` talk to the running daemon's admin API;
//! `mlxd list` and `mlxd import` work on the local files.

use std::process::Command;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::{is_model_dir, Config};
use crate::presets::Presets;
use crate::supervisor::SlotInfo;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn admin(cfg: &Config, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let socket = crate::config::control_socket(&cfg.home, cfg.port);
    let (status, v) = if socket.exists() {
        over_socket(&socket, path, body).await?
    } else {
        over_http(cfg, path, body).await?
    };
    if !(200..300).contains(&status) {
        bail!(
            "{}",
            v["error"]["message"].as_str().unwrap_or("request failed")
        );
    }
    Ok(v)
}

/// The control socket: HTTP/1.1 over the daemon's 0600 Unix socket. `path` is the
/// admin route's last part ("ps", "start"); a body makes it a POST.
pub async fn over_socket(
    socket: &std::path::Path,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("no mlxd daemon on {}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let builder = hyper::Request::builder()
        .uri(format!("/admin/{path}"))
        .header("host", "localhost");
    let req = match body {
        Some(b) => builder
            .method("POST")
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(b.to_string())))?,
        None => builder.method("GET").body(Full::new(bytes::Bytes::new()))?,
    };
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&bytes).context("daemon sent a non-JSON answer")?;
    Ok((status, v))
}

/// The HTTP port (a daemon on another machine, or one without a socket here).
async fn over_http(cfg: &Config, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}/admin/{path}", cfg.base_url());
    let mut req = match body {
        Some(b) => client().post(&url).json(&b),
        None => client().get(&url),
    };
    if let Some(key) = cfg.api_keys.first() {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.with_context(|| {
        format!(
            "no mlxd daemon at {} (start one with `mlxd serve`)",
            cfg.base_url()
        )
    })?;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.context("daemon sent a non-JSON answer")?;
    Ok((status, v))
}

/// `mlxd start [--pin] <model>`: waits until the model is Ready, showing the load's
/// progress (elapsed time and the worker's memory) on a terminal.
pub async fn start(cfg: &Config, model: &str, pin: bool) -> anyhow::Result<()> {
    let body = json!({ "model": model, "pin": pin });
    let v = with_progress(cfg, model, admin(cfg, "start", Some(body))).await?;
    let info: SlotInfo = serde_json::from_value(v["worker"].clone())?;
    println!(
        "{} ready (pid {}, {}, incarnation {}{})",
        info.model,
        info.pid.map_or("-".into(), |p| p.to_string()),
        info.transport,
        info.incarnation,
        if info.pinned { ", pinned" } else { "" }
    );
    Ok(())
}

/// `mlxd restart <model>`: a fresh worker (also clears a failed model).
pub async fn restart(cfg: &Config, model: &str) -> anyhow::Result<()> {
    let v = with_progress(
        cfg,
        model,
        admin(cfg, "restart", Some(json!({ "model": model }))),
    )
    .await?;
    let info: SlotInfo = serde_json::from_value(v["worker"].clone())?;
    println!(
        "{} ready (pid {}, incarnation {})",
        info.model,
        info.pid.map_or("-".into(), |p| p.to_string()),
        info.incarnation
    );
    Ok(())
}

/// Runs `request` while a spinner on stderr shows the model's state, the time
/// since the command began and the worker's memory (only on a terminal).
async fn with_progress(
    cfg: &Config,
    model: &str,
    request: impl std::future::Future<Output = anyhow::Result<Value>>,
) -> anyhow::Result<Value> {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return request.await;
    }
    const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let began = std::time::Instant::now();
    tokio::pin!(request);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut frame = 0;
    let result = loop {
        tokio::select! {
            r = &mut request => break r,
            _ = tick.tick() => {
                let row = admin(cfg, "ps", None).await.ok().and_then(|v| {
                    let rows: Vec<SlotInfo> = serde_json::from_value(v["workers"].clone()).ok()?;
                    rows.into_iter().find(|w| w.model == model)
                });
                let (state, rss) = row.map_or(("waiting", 0), |w| (w.state.as_str(), w.stats.rss));
                eprint!(
                    "\r{} {model}: {state}  {:.1} s  {}   ",
                    FRAMES[frame % FRAMES.len()],
                    began.elapsed().as_secs_f64(),
                    human_bytes(rss)
                );
                let _ = std::io::stderr().flush();
                frame += 1;
            }
        }
    };
    eprint!("\r\x1b[2K");
    result
}

pub async fn stop(cfg: &Config, model: &str) -> anyhow::Result<()> {
    let v = admin(cfg, "stop", Some(json!({ "model": model }))).await?;
    if v["stopped"].as_bool() == Some(true) {
        println!("{model} stopped");
    } else {
        println!("{model} was not running");
    }
    Ok(())
}

/// `mlxd reload`: one line per kind of change (a refusal is the command's error).
pub async fn reload(cfg: &Config) -> anyhow::Result<()> {
    let v = admin(cfg, "reload", Some(json!({}))).await?;
    let report: crate::supervisor::ReloadReport = serde_json::from_value(v)?;
    let lines = [
        ("unchanged", &report.unchanged),
        ("restarted", &report.restarted),
        ("updated (used at next load)", &report.updated),
        ("added", &report.added),
        ("removed", &report.removed),
        ("changed, needs a daemon restart", &report.needs_restart),
    ];
    for (what, names) in lines {
        if !names.is_empty() {
            println!("{what}: {}", names.join(", "));
        }
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    crate::memory::human(b)
}

fn human_duration(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub async fn ps(cfg: &Config) -> anyhow::Result<()> {
    let v = admin(cfg, "ps", None).await?;
    let workers: Vec<SlotInfo> = serde_json::from_value(v["workers"].clone())?;
    if let Ok(m) = admin(cfg, "memory", None).await {
        let b = |k: &str| human_bytes(m[k].as_u64().unwrap_or(0));
        println!(
            "memory: workers use {} of the {} cap (requests refused above {}); machine {}, {} available",
            b("used_bytes"),
            b("cap_bytes"),
            b("shed_bytes"),
            b("total_bytes"),
            b("available_bytes"),
        );
    }
    println!(
        "{:<24} {:>8} {:<9} {:<9} {:>9} {:>8} {:<9} {:>8} {:>6} {:>4} {:>8}",
        "MODEL",
        "PID",
        "TRANSPORT",
        "STATE",
        "MEMORY",
        "UPTIME",
        "BLAS",
        "INFLIGHT",
        "QUEUED",
        "INC",
        "RESTARTS"
    );
    for w in workers {
        println!(
            "{:<24} {:>8} {:<9} {:<9} {:>9} {:>8} {:<9} {:>8} {:>6} {:>4} {:>8}",
            w.model,
            w.pid.map_or("-".into(), |p| p.to_string()),
            w.transport,
            w.state,
            human_bytes(if w.footprint_bytes > 0 {
                w.footprint_bytes
            } else {
                w.stats.rss
            }),
            human_duration(w.uptime_s),
            w.blas.as_deref().unwrap_or("-"),
            w.inflight,
            w.queued,
            w.incarnation,
            w.restarts,
        );
        if let Some(e) = &w.error {
            println!("    error: {e}");
        }
        if let Some(last) = w.last_exit.as_ref().filter(|_| w.error.is_none()) {
            println!("    last exit: {last}");
        }
        if let Some(facts) = &w.facts {
            let sized = if w.max_concurrent_auto {
                " (sized to the device)"
            } else {
                ""
            };
            println!(
                "    family {}, caches {}, batch up to {}{sized}",
                facts.family,
                facts.cache_kinds.join(" + "),
                w.max_concurrent
            );
            if let Some(format) = &facts.reasoning {
                println!("    reasoning: {format}, apart from the answer");
            }
            for limit in &facts.limits {
                println!("    {}: {}", limit.feature, limit.reason);
            }
        }
        if let Some(line) = memory_line(&w) {
            println!("    {line}");
        }
        if let Some(spec) = &w.stats.speculative {
            println!("    {}", speculative_line(spec));
        }
    }
    let peers: Vec<crate::peers::PeerInfo> =
        serde_json::from_value(v["peers"].clone()).unwrap_or_default();
    if !peers.is_empty() {
        println!();
        println!(
            "{:<16} {:<13} {:<10} {:<28} MODELS",
            "PEER", "STATE", "VERSION", "URL"
        );
        for p in peers {
            println!(
                "{:<16} {:<13} {:<10} {:<28} {}",
                p.name,
                p.state,
                p.version.as_deref().unwrap_or("-"),
                p.url,
                if p.models.is_empty() {
                    "-".into()
                } else {
                    p.models.join(", ")
                }
            );
            if let Some(e) = &p.error {
                let seen = p.last_seen_s.map_or("never answered".into(), |s| {
                    format!("last answered {} ago", human_duration(s))
                });
                println!("    {e} ({seen})");
            }
        }
    }
    Ok(())
}

/// `ps`'s memory line: weights, KV in use and promised, the reserve, the prefix
/// cache, and the headroom left in the worker's share.
fn memory_line(w: &SlotInfo) -> Option<String> {
    let kv = w.stats.kv.as_ref()?;
    let share = w.memory_limit?;
    let cache = w.stats.prompt_cache.as_ref().map_or(0, |pc| pc.bytes);
    let mut line = format!(
        "memory: weights {}, KV {} in use ({} reserved to max_tokens), reserve {}, prompt cache {}, \
         share {}, headroom {}",
        human_bytes(kv.weights_bytes),
        human_bytes(kv.in_use_bytes),
        human_bytes(kv.reserved_bytes),
        human_bytes(w.estimate.as_ref().map_or(0, |e| e.reserve_bytes)),
        human_bytes(cache),
        human_bytes(share),
        human_bytes(w.headroom_bytes()),
    );
    if kv.waiting > 0 {
        line += &format!("; {} waiting for KV memory", kv.waiting);
    }
    Some(line)
}

/// `ps`'s line for a model with a draft: what it does now, why, and its counters.
pub fn speculative_line(s: &worker_protocol::frame::SpecStatus) -> String {
    let state = if s.active {
        format!("on, {} draft tokens", s.num_draft_tokens)
    } else {
        "off".to_string()
    };
    let rejected = s.drafted_total.saturating_sub(s.accepted_total);
    let mut line = format!(
        "speculative ({}, draft {}): {state} ({}); drafted {}, accepted {}, rejected {}, acceptance {:.2}",
        s.mode, s.draft, s.reason, s.drafted_total, s.accepted_total, rejected, s.acceptance
    );
    if s.spec_tps > 0.0 && s.plain_tps > 0.0 {
        line += &format!(
            "; {:.1} tok/s drafting, {:.1} plain",
            s.spec_tps, s.plain_tps
        );
    }
    line
}

pub async fn benchmark(
    cfg: &Config,
    model: &str,
    runs: u32,
    max_tokens: u32,
    prompt: Option<String>,
) -> anyhow::Result<()> {
    let mut body = json!({"model": model, "runs": runs, "max_tokens": max_tokens});
    if let Some(p) = prompt {
        body["prompt"] = p.into();
    }
    let v = with_progress(cfg, model, admin(cfg, "benchmark", Some(body))).await?;
    println!(
        "{:<12} {:>10} {:>10} {:>7} {:>8} {:>9} {:>10}",
        "RUN", "TTFT ms", "decode t/s", "tokens", "drafted", "accepted", "acceptance"
    );
    for r in v["runs"].as_array().into_iter().flatten() {
        let spec = r["speculative"].as_bool() == Some(true);
        let c = &r["mlxd"];
        println!(
            "{:<12} {:>10.1} {:>10.2} {:>7} {:>8} {:>9} {:>10}",
            if spec { "speculative" } else { "plain" },
            r["ttft_ms"].as_f64().unwrap_or(0.0),
            r["decode_tps"].as_f64().unwrap_or(0.0),
            r["completion_tokens"],
            if spec {
                c["draft_tokens"].to_string()
            } else {
                "-".into()
            },
            if spec {
                c["accepted_tokens"].to_string()
            } else {
                "-".into()
            },
            if spec {
                format!("{:.2}", c["acceptance_ratio"].as_f64().unwrap_or(0.0))
            } else {
                "-".into()
            },
        );
    }
    let med = |side: &str, k: &str| v[side][k].as_f64().unwrap_or(0.0);
    println!(
        "median decode: {:.2} tok/s drafting, {:.2} plain: {:.2}x; acceptance {:.2}",
        med("speculative", "median_decode_tps"),
        med("plain", "median_decode_tps"),
        v["speedup"].as_f64().unwrap_or(0.0),
        med("speculative", "acceptance_ratio"),
    );
    Ok(())
}

pub fn list(cfg: &Config) -> anyhow::Result<()> {
    let presets = Presets::load(&cfg.presets_dirs)?;
    println!(
        "{:<24} {:<24} {:<9} {:<9} {:>9} {:>10}",
        "PRESET", "MODEL", "TRANSPORT", "IMPORTED", "WEIGHTS", "KV/TOKEN"
    );
    let mut referenced = std::collections::HashSet::new();
    for p in presets.iter() {
        let path = p.model_path(&cfg.models_dir)?;
        referenced.insert(path.clone());
        let have = is_model_dir(&path);
        let e = p.estimate(&cfg.models_dir, cfg.kv_reserve);
        let (weights, per_token) = if have {
            (
                human_bytes(e.weights_bytes),
                human_small(e.kv_bytes_per_token),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{:<24} {:<24} {:<9} {:<9} {:>9} {:>10}",
            p.name,
            p.model,
            p.transport.to_string(),
            if have { "yes" } else { "no" },
            weights,
            per_token
        );
    }
    let mut others = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&cfg.models_dir) {
        for e in dir.flatten() {
            let path = e.path();
            if is_model_dir(&path) && !referenced.contains(&path) {
                others.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    others.sort();
    if !others.is_empty() {
        println!(
            "\nimported models without a preset (in {}):",
            cfg.models_dir.display()
        );
        for o in others {
            println!("  {o}");
        }
    }
    Ok(())
}

/// How `mlxd import` stores the weights: dequantized to a dtype, or quantized at
/// these bits (neither: the file's own quantization at the closest MLX bits).
pub struct ImportAs<'a> {
    pub dtype: Option<&'a str>,
    pub bits: Option<&'a str>,
}

pub fn import(
    cfg: &Config,
    gguf: &std::path::Path,
    name: Option<&str>,
    how: ImportAs<'_>,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(&cfg.python);
    cmd.arg("-m")
        .arg("mlxd_worker.models.importer")
        .arg(gguf)
        .arg("--models-dir")
        .arg(&cfg.models_dir)
        .env("PYTHONPATH", &cfg.worker_dir);
    if let Some(n) = name {
        cmd.arg("--name").arg(n);
    }
    if let Some(d) = how.dtype {
        cmd.arg("--dtype").arg(d);
    }
    if let Some(b) = how.bits {
        cmd.arg("--bits").arg(b);
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", cfg.python.display()))?;
    if !status.success() {
        bail!("import failed ({status})");
    }
    Ok(())
}

/// `mlxd estimate`'s question: a model (a preset's name or a model directory),
/// a working set, and optionally another machine's cap.
pub struct EstimateAsk<'a> {
    pub model: &'a str,
    /// Tokens per sequence of the working set (default: the model's context).
    pub context: Option<u64>,
    /// Sequences of the working set (default 1).
    pub concurrency: Option<u64>,
    /// Another machine's cap (`--cap`): what is loaded here does not count.
    pub cap: Option<&'a str>,
}

/// Prints a model's memory, part by part, and whether it fits the cap with what
/// the daemon has loaded now. Ok(true) when it fits (exit 0), Ok(false) when not.
pub async fn estimate(cfg: &Config, ask: EstimateAsk<'_>) -> anyhow::Result<bool> {
    use crate::memory::{human, Limit};
    let presets = Presets::load(&cfg.presets_dirs)?;
    let preset = match presets.resolve(ask.model) {
        Some(p) => crate::presets::Preset::clone(p),
        None => {
            let dir = std::path::Path::new(ask.model);
            let dir = if dir.is_dir() {
                std::fs::canonicalize(dir)?
            } else {
                cfg.models_dir.join(ask.model)
            };
            if !is_model_dir(&dir) {
                bail!(
                    "no preset or model directory named {:?} (see `mlxd list`)",
                    ask.model
                );
            }
            let text = format!("model = {}", toml::Value::String(dir.display().to_string()));
            let name = dir
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned());
            crate::presets::Preset::parse(&text, &name)?
        }
    };
    let e = preset.estimate(&cfg.models_dir, cfg.kv_reserve);
    let path = preset.model_path(&cfg.models_dir)?;
    let files = crate::model_files::ModelFiles::read(Some(&path));
    let concurrency = ask.concurrency.unwrap_or(1).max(1);
    let context = ask
        .context
        .or(e.context_length)
        .unwrap_or(crate::memory::DEFAULT_KV_RESERVE_TOKENS);
    let working = e.kv_for(context * concurrency, concurrency);
    println!(
        "{} ({}): {} {}, {} context",
        preset.name,
        path.display(),
        if files.family.is_empty() {
            "?"
        } else {
            &files.family
        },
        files.quantization,
        e.context_length
            .map_or("an unknown".into(), |c| format!("a {c}-token"))
    );
    println!("  weights          {:>10}", human(e.weights_bytes));
    println!("  runtime          {:>10}", human(e.runtime_bytes));
    if e.draft_bytes > 0 {
        println!(
            "  draft            {:>10}  (weights and its KV)",
            human(e.draft_bytes)
        );
    }
    match &e.kv_shape {
        Some(shape) => {
            let mut line = format!(
                "  KV per token     {:>10}  ({} bytes",
                human_small(e.kv_bytes_per_token),
                e.kv_bytes_per_token
            );
            for w in &shape.windows {
                line += &format!(
                    "; {} of it only for the last {} tokens",
                    w.bytes_per_token, w.tokens
                );
            }
            if shape.bytes_per_sequence > 0 {
                line += &format!(
                    "; plus {} per sequence of recurrent state",
                    human(shape.bytes_per_sequence)
                );
            }
            println!("{line})");
        }
        None => println!("  KV per token              ?  (config.json does not say)"),
    }
    println!(
        "  KV reserve       {:>10}  ({} tokens shared by up to {} sequences, guaranteed at load: kv_reserve)",
        human(e.reserve_bytes),
        e.reserve_tokens,
        preset.concurrency(None)
    );
    let load = preset.memory_need(&cfg.models_dir, cfg.kv_reserve);
    println!("  load needs       {:>10}", human(load));
    println!(
        "  working set      {:>10}  (KV of {concurrency} × {context} tokens)",
        human(working)
    );
    // Running it needs the load and whatever of the working set the reserve does
    // not cover (granted at run time from the free budget).
    let needs = load + working.saturating_sub(e.reserve_bytes);
    let (cap, loaded, whose) = match ask.cap {
        Some(text) => {
            let limit = Limit::parse(text).map_err(|e| anyhow::anyhow!("--cap {e}"))?;
            let total = crate::sys::system().total;
            (limit.resolve(total), 0, format!("the cap of {text}"))
        }
        None => {
            let total = crate::sys::system().total;
            let cap = cfg.memory_cap.resolve(total);
            // What the running daemon holds (nothing when none runs), less this
            // model's own row.
            let loaded = match admin(cfg, "memory", None).await {
                Ok(m) => m["models"]
                    .as_array()
                    .map(|rows| {
                        rows.iter()
                            .filter(|r| r["model"] != preset.name.as_str())
                            .map(|r| {
                                let f = r["footprint_bytes"].as_u64().unwrap_or(0);
                                f.max(r["estimate_bytes"].as_u64().unwrap_or(0))
                            })
                            .sum()
                    })
                    .unwrap_or(0),
                Err(_) => 0,
            };
            (cap, loaded, format!("this machine's cap of {}", human(cap)))
        }
    };
    let fits = needs + loaded <= cap;
    println!(
        "{}: needs {} with that working set; {whose}{} leaves {}",
        if fits { "fits" } else { "does not fit" },
        human(needs),
        if loaded > 0 {
            format!(" less {} loaded now", human(loaded))
        } else {
            String::new()
        },
        human(cap.saturating_sub(loaded)),
    );
    if !fits {
        let room = cap.saturating_sub(loaded + load.saturating_sub(e.reserve_bytes));
        let mut ways = vec![format!(
            "a smaller context or fewer sequences (about {} tokens of KV fit)",
            room / e.kv_bytes_per_token.max(1)
        )];
        ways.extend(preset.ways_to_fit(&e));
        ways.push("fewer models loaded".into());
        println!("  to make it fit: {}", ways.join(", or "));
    }
    Ok(fits)
}

/// "45.0 KiB" for per-token figures (`human` starts at MiB).
fn human_small(b: u64) -> String {
    if b >= 1 << 20 {
        crate::memory::human(b)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}
