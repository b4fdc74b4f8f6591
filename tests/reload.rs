//! Config reload (`mlxd reload`, SIGHUP) on a daemon of its own, with replay
//! presets in its own MLXD_HOME: untouched models keep their worker (and the
//! stream in flight), changed ones get a new incarnation, removed ones 404, added
//! ones serve, and a broken preset refuses the whole reload.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{cli_ok, spawn_daemon, Daemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// 100 ms per token: a stream that is still running while the reload happens.
const SLOW: &str = "model = \"smollm2-135m\"\nengine = \"replay\"\n[faults]\nstep_delay_ms = 100\n";

fn replay(max_tokens: u32) -> String {
    format!("model = \"smollm2-135m\"\nengine = \"replay\"\nmax_tokens = {max_tokens}\n")
}

fn models_dir() -> String {
    std::env::var("MLXD_MODELS_DIR")
        .unwrap_or_else(|_| format!("{}/.mlxd/models", std::env::var("HOME").unwrap()))
}

fn fresh_home() -> PathBuf {
    let home = std::env::temp_dir().join(format!("mlxd-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(home.join("presets")).unwrap();
    home
}

fn write(home: &Path, name: &str, text: &str) {
    std::fs::write(home.join("presets").join(format!("{name}.toml")), text).unwrap();
}

fn remove(home: &Path, name: &str) {
    std::fs::remove_file(home.join("presets").join(format!("{name}.toml"))).unwrap();
}

async fn start(d: &Daemon, model: &str) -> Value {
    let (status, v) = d.admin("start", Some(json!({ "model": model }))).await;
    assert_eq!(status, 200, "start {model}: {v}");
    v["worker"].clone()
}

/// (pid, incarnation) of the model's worker.
fn identity(w: &Value) -> (u64, u64) {
    (
        w["pid"].as_u64().unwrap(),
        w["incarnation"].as_u64().unwrap(),
    )
}

/// A non-streamed chat without max_tokens (the preset's applies): status, body.
async fn ask(d: &Daemon, model: &str) -> (u16, Value) {
    let body = json!({
        "model": model, "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}],
    });
    common::post_json(&format!("{}/v1/chat/completions", d.url), &body).await
}

/// Streams 30 tokens (3 s) of the slow model; returns the whole SSE text.
fn stream_in_background(d: &Daemon) -> tokio::task::JoinHandle<String> {
    let url = format!("{}/v1/chat/completions", d.url);
    tokio::spawn(async move {
        let body = json!({
            "model": "keep", "temperature": 0, "max_tokens": 30, "stream": true,
            "messages": [{"role": "user", "content": "hi"}],
        });
        let resp = reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    })
}

/// The stream ended as a normal completion (no error event, a finish, [DONE]).
fn completed(sse: &str) {
    assert!(!sse.contains("\"error\""), "the stream failed: {sse}");
    assert!(sse.contains("\"finish_reason\":\""), "{sse}");
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
}

/// Waits until the slow stream has produced something (it is in flight).
async fn wait_inflight(d: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.ps_row("keep").await.is_none_or(|w| w["inflight"] != 1) {
        assert!(Instant::now() < deadline, "the stream never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn names(v: &Value, key: &str) -> Vec<String> {
    serde_json::from_value(v[key].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_applies_preset_changes_and_leaves_the_rest_serving() {
    let home = fresh_home();
    write(&home, "keep", SLOW);
    write(&home, "change", &replay(8));
    write(&home, "gone", &replay(8));
    let models = models_dir();
    let d = spawn_daemon(&[
        ("MLXD_HOME", home.to_str().unwrap()),
        ("MLXD_MODELS_DIR", &models),
    ]);
    let keep = identity(&start(&d, "keep").await);
    let change = identity(&start(&d, "change").await);
    start(&d, "gone").await;
    let (status, v) = ask(&d, "change").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    // `mlxd reload` (the admin route) while a stream runs on the untouched model.
    let stream = stream_in_background(&d);
    wait_inflight(&d).await;
    write(&home, "change", &replay(3));
    remove(&home, "gone");
    write(&home, "added", &replay(5));
    std::fs::write(home.join("config.toml"), "max_connections = 77\n").unwrap();
    let (status, report) = d.admin("reload", Some(json!({}))).await;
    assert_eq!(status, 200, "{report}");
    // (The shipped presets are unchanged too.)
    assert!(names(&report, "unchanged").contains(&"keep".to_string()));
    assert_eq!(names(&report, "restarted"), ["change"]);
    assert_eq!(names(&report, "removed"), ["gone"]);
    assert_eq!(names(&report, "added"), ["added"]);
    assert_eq!(names(&report, "needs_restart"), ["max_connections"]);
    completed(&stream.await.unwrap());
    assert_eq!(identity(&d.ps_row("keep").await.unwrap()), keep);

    // The changed model: a new incarnation, serving with the new max_tokens.
    let (status, v) = ask(&d, "change").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let now = identity(&d.ps_row("change").await.unwrap());
    assert!(
        now.1 > change.1 && now.0 != change.0,
        "{now:?} vs {change:?}"
    );
    let (status, v) = ask(&d, "gone").await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = ask(&d, "added").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    // A broken preset refuses the whole reload: the other change is not applied.
    write(&home, "bad", "model = [oops");
    remove(&home, "added");
    let (status, v) = d.admin("reload", Some(json!({}))).await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("bad.toml"), "{message}");
    assert_eq!(ask(&d, "added").await.0, 200);
    assert_eq!(identity(&d.ps_row("keep").await.unwrap()), keep);
    remove(&home, "bad");

    // The CLI prints the report.
    let env = [("MLXD_HOME", Some(home.as_os_str()))];
    let out = cli_ok(d.port, &["reload"], &env);
    assert!(out.contains("removed: added"), "{out}");
    // Still reported: the daemon still runs with the old value.
    assert!(
        out.contains("needs a daemon restart: max_connections"),
        "{out}"
    );
    assert_eq!(ask(&d, "added").await.0, 404);

    // SIGHUP, again under a stream: the untouched model keeps its worker, and
    // allow_models applies live.
    let stream = stream_in_background(&d);
    wait_inflight(&d).await;
    write(&home, "change", &replay(4));
    std::fs::write(home.join("config.toml"), "allow_models = [\"change\"]\n").unwrap();
    kill(Pid::from_raw(d.pid as i32), Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = ask(&d, "change").await;
        if status == 200 && v["usage"]["completion_tokens"] == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP never applied: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    completed(&stream.await.unwrap());
    assert_eq!(identity(&d.ps_row("keep").await.unwrap()), keep);
    let (status, v) = ask(&d, "replay").await;
    assert_eq!(
        status, 403,
        "a model allow_models leaves out may not load: {v}"
    );
    assert_eq!(d.shut_down().code(), Some(0));
    let _ = std::fs::remove_dir_all(&home);
}
