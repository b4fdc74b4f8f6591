//! The thin clients: `mlxd start|stop|ps` talk to the running daemon's admin API;
//! `mlxd list` and `mlxd import` work on the local files.

use std::process::Command;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::{is_model_dir, Config};
use crate::presets::Presets;
use crate::supervisor::WorkerInfo;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn admin(cfg: &Config, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let url = format!("{}/admin/{path}", cfg.base_url());
    let req = match body {
        Some(b) => client().post(&url).json(&b),
        None => client().get(&url),
    };
    let resp = req.send().await.with_context(|| {
        format!(
            "no mlxd daemon at {} (start one with `mlxd serve`)",
            cfg.base_url()
        )
    })?;
    let status = resp.status();
    let v: Value = resp.json().await.context("daemon sent a non-JSON answer")?;
    if !status.is_success() {
        bail!(
            "{}",
            v["error"]["message"].as_str().unwrap_or("request failed")
        );
    }
    Ok(v)
}

pub async fn start(cfg: &Config, model: &str) -> anyhow::Result<()> {
    let v = admin(cfg, "start", Some(json!({ "model": model }))).await?;
    let info: WorkerInfo = serde_json::from_value(v["worker"].clone())?;
    println!(
        "{} ready (pid {}, {})",
        info.model, info.pid, info.transport
    );
    Ok(())
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

fn human_bytes(b: u64) -> String {
    let mib = b as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
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
    let workers: Vec<WorkerInfo> = serde_json::from_value(v["workers"].clone())?;
    println!(
        "{:<24} {:>8} {:<9} {:<9} {:>9} {:>8} {:<9} {:>7}",
        "MODEL", "PID", "TRANSPORT", "STATE", "MEMORY", "UPTIME", "BLAS", "INFLIGHT"
    );
    for w in workers {
        println!(
            "{:<24} {:>8} {:<9} {:<9} {:>9} {:>8} {:<9} {:>7}",
            w.model,
            w.pid,
            w.transport,
            w.state,
            human_bytes(w.stats.rss),
            human_duration(w.uptime_s),
            w.blas.as_deref().unwrap_or("-"),
            w.inflight,
        );
        if let Some(e) = w.error {
            println!("    error: {e}");
        }
    }
    Ok(())
}

pub fn list(cfg: &Config) -> anyhow::Result<()> {
    let presets = Presets::load(&cfg.presets_dirs)?;
    println!(
        "{:<24} {:<24} {:<9} {:<9}",
        "PRESET", "MODEL", "TRANSPORT", "IMPORTED"
    );
    let mut referenced = std::collections::HashSet::new();
    for p in presets.iter() {
        let path = p.model_path(&cfg.models_dir)?;
        referenced.insert(path.clone());
        let have = if is_model_dir(&path) { "yes" } else { "no" };
        println!(
            "{:<24} {:<24} {:<9} {:<9}",
            p.name,
            p.model,
            p.transport.to_string(),
            have
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

pub fn import(
    cfg: &Config,
    gguf: &std::path::Path,
    name: Option<&str>,
    dtype: Option<&str>,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(&cfg.python);
    cmd.arg("-m")
        .arg("mlxd_worker.importer")
        .arg(gguf)
        .arg("--models-dir")
        .arg(&cfg.models_dir)
        .env("PYTHONPATH", &cfg.worker_dir);
    if let Some(n) = name {
        cmd.arg("--name").arg(n);
    }
    if let Some(d) = dtype {
        cmd.arg("--dtype").arg(d);
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", cfg.python.display()))?;
    if !status.success() {
        bail!("import failed ({status})");
    }
    Ok(())
}
