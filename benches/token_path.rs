//! Token-path capacity: the `replay` engine (a fixed text's tokens, no model in the
//! way) streamed through a real daemon to 1, 8 and 64 concurrent SSE clients, over
//! the shm rings, over stdio, and through the loopback-HTTP proxy path (the worker
//! serves SSE itself and the daemon forwards it, as llama-swap and Ollama do).
//!
//! Reports delivered tokens/s, the daemon's CPU time per delivered token (from
//! /proc/<pid>/stat, all threads), SSE chunks per token (coalescing), and the
//! doorbell writes against frames read. Paths are interleaved run by run;
//! figures are medians with min..max.
//!
//!     cargo bench --bench token_path -- [--runs 5] [--clients 1,8,64] [--tokens 100000 (per run, all clients)]
//!         [--model smollm2-135m] [--mlxd PATH] [--json-out FILE]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

const PATHS: [(&str, &str); 3] = [("shm", "shm"), ("stdio", "stdio"), ("http-proxy", "http")];

struct Args {
    runs: usize,
    clients: Vec<usize>,
    tokens: u32,
    model: String,
    mlxd: PathBuf,
    json_out: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut a = Args {
        runs: 5,
        clients: vec![1, 8, 64],
        tokens: 100_000,
        model: "smollm2-135m".into(),
        mlxd: PathBuf::from(env!("CARGO_BIN_EXE_mlxd")),
        json_out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => a.runs = value().parse().expect("--runs N"),
            "--clients" => {
                a.clients = value()
                    .split(',')
                    .map(|c| c.parse().expect("--clients 1,8,64"))
                    .collect()
            }
            "--tokens" => a.tokens = value().parse().expect("--tokens N"),
            "--model" => a.model = value(),
            "--mlxd" => a.mlxd = value().into(),
            "--json-out" => a.json_out = Some(value().into()),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

struct Daemon {
    child: Child,
    url: String,
    /// The control socket (the admin routes).
    socket: PathBuf,
    _presets: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._presets);
    }
}

fn start_daemon(args: &Args, max_concurrent: usize) -> Daemon {
    let presets = std::env::temp_dir().join(format!("mlxd-token-path-{}", std::process::id()));
    std::fs::create_dir_all(&presets).unwrap();
    for (name, transport) in PATHS {
        std::fs::write(
            presets.join(format!("replay-{name}.toml")),
            format!(
                "model = {:?}\nengine = \"replay\"\ntransport = \"{transport}\"\nmax_concurrent = {max_concurrent}\n",
                args.model
            ),
        )
        .unwrap();
    }
    let mut child = Command::new(&args.mlxd)
        .args(["serve", "--port", "0", "--presets-dir"])
        .arg(&presets)
        .arg("--exit-on-stdin-eof")
        .env("MLXD_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start mlxd");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = mlxd::serve::listening_url(&line)
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let port = url.rsplit(':').next().unwrap().parse().unwrap();
    Daemon {
        child,
        url,
        socket: mlxd::config::control_socket(&mlxd::config::home_dir(), port),
        _presets: presets,
    }
}

/// CPU seconds (user + system, all threads) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = clock_ticks();
    (ticks(11) + ticks(12)) / hz
}

fn clock_ticks() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux we run on; read it via getconf to
    // stay free of unsafe code here.
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Sum of a metric's samples for one model (all label sets that match `filter`).
fn metric(text: &str, name: &str, model: &str, filter: &str) -> f64 {
    let label = format!("model=\"{model}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| l.contains(&label) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Outcome {
    tokens: u64,
    chunks: u64,
}

async fn one_stream(client: &reqwest::Client, url: &str, model: &str, tokens: u32) -> Outcome {
    let mut resp = client
        .post(format!("{url}/v1/completions"))
        .json(&json!({
            "model": model, "prompt": "hi", "max_tokens": tokens, "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "{model}");
    let mut tail: Vec<u8> = Vec::new();
    let mut chunks = 0u64;
    while let Some(bytes) = resp.chunk().await.expect("body") {
        chunks += bytes.windows(2).filter(|w| w == b"\n\n").count() as u64;
        tail.extend_from_slice(&bytes);
        if tail.len() > 4096 {
            tail.drain(..tail.len() - 2048);
        }
    }
    let tail = String::from_utf8_lossy(&tail);
    let usage = tail
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["usage"]["completion_tokens"].as_u64())
        .last()
        .expect("a usage chunk");
    Outcome {
        tokens: usage,
        chunks,
    }
}

#[derive(Default, Clone)]
struct Sample {
    tokens_per_s: f64,
    daemon_us_per_token: f64,
    worker_us_per_token: f64,
    client_us_per_token: f64,
    chunks_per_token: f64,
    frames: f64,
    doorbells: f64,
}

async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

async fn measure(
    client: &reqwest::Client,
    daemon: &Daemon,
    model: &str,
    clients: usize,
    tokens: u32,
    worker_pid: u32,
) -> Sample {
    let me = std::process::id();
    let cpu = || [daemon.child.id(), worker_pid, me].map(cpu_seconds);
    let before = get_text(client, &format!("{}/metrics", daemon.url)).await;
    let [d0, w0, c0] = cpu();
    let t0 = Instant::now();
    let outcomes = futures::future::join_all(
        (0..clients).map(|_| one_stream(client, &daemon.url, model, tokens)),
    )
    .await;
    let wall = t0.elapsed().as_secs_f64();
    let [d1, w1, c1] = cpu();
    let after = get_text(client, &format!("{}/metrics", daemon.url)).await;
    let total: u64 = outcomes.iter().map(|o| o.tokens).sum();
    let chunks: u64 = outcomes.iter().map(|o| o.chunks).sum();
    let delta = |name: &str, filter: &str| {
        metric(&after, name, model, filter) - metric(&before, name, model, filter)
    };
    Sample {
        tokens_per_s: total as f64 / wall,
        daemon_us_per_token: (d1 - d0) * 1e6 / total as f64,
        worker_us_per_token: (w1 - w0) * 1e6 / total as f64,
        client_us_per_token: (c1 - c0) * 1e6 / total as f64,
        chunks_per_token: chunks as f64 / total as f64,
        frames: delta("mlxd_worker_frames_total", "from_worker"),
        doorbells: delta("mlxd_worker_doorbells_total", "from_worker"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let max_clients = args.clients.iter().copied().max().unwrap_or(1);
        let daemon = start_daemon(&args, max_clients);
        let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build().unwrap();
        // Start every worker and learn its pid.
        let mut pids = BTreeMap::new();
        for (name, _) in PATHS {
            let model = format!("replay-{name}");
            one_stream(&client, &daemon.url, &model, 8).await;
            let (_, ps) = mlxd::cli::over_socket(&daemon.socket, "ps", None).await.unwrap();
            let pid = ps["workers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|w| w["model"] == model.as_str())
                .and_then(|w| w["pid"].as_u64())
                .unwrap() as u32;
            pids.insert(name, pid);
        }
        let mut report = serde_json::Map::new();
        println!(
            "\n{:<8} {:<11} {:>22} {:>9} {:>14} {:>14} {:>14} {:>11} {:>16}",
            "clients",
            "path",
            "tokens/s (median)",
            "ratio",
            "daemon µs/tok",
            "worker µs/tok",
            "client µs/tok",
            "chunks/tok",
            "doorbells/frames"
        );
        for &c in &args.clients {
            // The same total per measurement at every concurrency: long enough
            // (~1 s) for the 10 ms resolution of /proc CPU times.
            let tokens = (args.tokens as usize / c).max(100) as u32;
            let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
            for (name, _) in PATHS {
                // Warm-up at this concurrency.
                measure(&client, &daemon, &format!("replay-{name}"), c, tokens / 4, pids[name]).await;
            }
            for _ in 0..args.runs {
                for (name, _) in PATHS {
                    let s = measure(&client, &daemon, &format!("replay-{name}"), c, tokens, pids[name]).await;
                    samples.entry(name).or_default().push(s);
                }
            }
            let http = median(samples["http-proxy"].iter().map(|s| s.tokens_per_s).collect());
            let mut row = serde_json::Map::new();
            for (name, _) in PATHS {
                let s = &samples[name];
                let pick = |f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
                let tps: Vec<f64> = s.iter().map(|x| x.tokens_per_s).collect();
                let (lo, hi) = (tps.iter().copied().fold(f64::MAX, f64::min), tps.iter().copied().fold(0.0, f64::max));
                let med = pick(|x| x.tokens_per_s);
                let bells = if name == "http-proxy" {
                    "-".to_string()
                } else {
                    format!("{:.0}/{:.0}", pick(|x| x.doorbells), pick(|x| x.frames))
                };
                println!(
                    "{:<8} {:<11} {:>9.0} ({:>5.0}..{:<5.0}) {:>8.2}x {:>14.2} {:>14.2} {:>14.2} {:>11.2} {:>16}",
                    c,
                    name,
                    med,
                    lo,
                    hi,
                    med / http,
                    pick(|x| x.daemon_us_per_token),
                    pick(|x| x.worker_us_per_token),
                    pick(|x| x.client_us_per_token),
                    pick(|x| x.chunks_per_token),
                    bells
                );
                row.insert(
                    name.to_string(),
                    json!({
                        "tokens_per_s_median": med, "tokens_per_s_min": lo, "tokens_per_s_max": hi,
                        "ratio_to_http_proxy": med / http,
                        "daemon_us_per_token": pick(|x| x.daemon_us_per_token),
                        "worker_us_per_token": pick(|x| x.worker_us_per_token),
                        "client_us_per_token": pick(|x| x.client_us_per_token),
                        "sse_chunks_per_token": pick(|x| x.chunks_per_token),
                        "frames_from_worker": pick(|x| x.frames),
                        "doorbells_from_worker": pick(|x| x.doorbells),
                        "tokens_per_client": tokens,
                    }),
                );
            }
            report.insert(c.to_string(), Value::Object(row));
        }
        let out = json!({"bench": "token_path", "runs": args.runs, "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "clients": report});
        println!("{out}");
        if let Some(path) = &args.json_out {
            std::fs::write(path, out.to_string()).unwrap();
        }
    });
}
