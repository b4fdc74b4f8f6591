//! The supervisor under faults, with the real worker and the real SmolLM2-135M:
//! a worker killed, stopped, raising, sending garbage or failing to load; stops,
//! keep-alive and pins; shared-memory hygiene. Fault-injecting presets (the
//! `[faults]` table) are used only for what a real worker cannot do on demand.

mod common;

use std::time::{Duration, Instant};

use common::{daemon, mlxd, post_json, workers_named, Daemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn admin(d: &Daemon, what: &str, body: Value) -> (u16, Value) {
    d.admin(what, Some(body)).await
}

async fn start(d: &Daemon, model: &str) -> Value {
    let (status, v) = admin(d, "start", json!({ "model": model })).await;
    assert_eq!(status, 200, "start {model}: {v}");
    v["worker"].clone()
}

fn models_dir() -> String {
    std::env::var("MLXD_MODELS_DIR")
        .unwrap_or_else(|_| format!("{}/.mlxd/models", std::env::var("HOME").unwrap()))
}

/// Polls `/admin/ps` until `pred` holds for the model's row (None: not listed).
async fn wait_for(
    d: &Daemon,
    model: &str,
    what: &str,
    pred: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let row = d.ps_row(model).await;
        if pred(row.as_ref()) {
            return row;
        }
        assert!(Instant::now() < deadline, "{model}: never {what}: {row:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pid_of(row: &Value) -> u32 {
    row["pid"].as_u64().expect("a running worker has a pid") as u32
}

/// True if `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Worker processes of `model` that are children of the daemon `daemon_pid`.
fn workers_of(daemon_pid: u32, model: &str) -> Vec<u32> {
    workers_named(model)
        .into_iter()
        .filter(|p| p.ppid == daemon_pid)
        .map(|p| p.pid)
        .collect()
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

fn story(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to fly."}],
        "max_tokens": 300,
        "temperature": 0,
        "stream": true,
    })
}

fn short(model: &str, i: usize) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("Say hello to friend number {i}.")}],
        "max_tokens": 4,
        "temperature": 0,
    })
}

async fn chat(d: &Daemon, body: Value) -> (u16, Value) {
    post_json(&format!("{}/v1/chat/completions", d.url), &body).await
}

/// An SSE response read event by event.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(d: &Daemon, body: Value) -> Sse {
        let resp = client()
            .post(format!("{}/v1/chat/completions", d.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next `data:` payload; None at the end of the body.
    async fn event(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..at + 2).collect();
                if let Some(data) = event.trim_end().strip_prefix("data: ") {
                    return Some(data.to_string());
                }
                continue;
            }
            let chunk = self.resp.chunk().await.expect("the body reads")?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Reads until `n` chunks carrying text have arrived: the request has started.
    async fn text_chunks(&mut self, n: usize) {
        let mut seen = 0;
        while seen < n {
            let e = self.event().await.expect("the stream ended early");
            let v: Value = serde_json::from_str(&e).unwrap_or(Value::Null);
            assert!(v.get("error").is_none(), "error before any text: {e}");
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                seen += 1;
            }
        }
    }

    /// Every remaining event.
    async fn rest(&mut self) -> Vec<String> {
        let mut out = vec![];
        while let Some(e) = self.event().await {
            out.push(e);
        }
        out
    }
}

/// The error event a stream ended with; it must not also claim `[DONE]`.
fn stream_error(events: &[String]) -> String {
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "a failed stream must not end with [DONE]: {events:?}"
    );
    let last = events.last().expect("the stream got a terminal event");
    let v: Value = serde_json::from_str(last).unwrap();
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("last event is not an error: {last}"))
        .to_string()
}

/// docs/design/ARCHITECTURE.md's promise: requests the dead incarnation had started get a
/// terminal error; those still queued go to the next incarnation and complete.
async fn a_killed_worker_fails_its_stream_and_serves_its_queue(model: &str) {
    let d = daemon();
    let pid = pid_of(&start(d, model).await);
    let mut first = Sse::open(d, story(model)).await;
    first.text_chunks(2).await;
    let queued: Vec<_> = (0..3)
        .map(|i| tokio::spawn(chat(d, short(model, i))))
        .collect();
    wait_for(d, model, "3 queued", |r| {
        r.is_some_and(|r| r["queued"] == 3)
    })
    .await;

    let killed = Instant::now();
    signal(pid, Signal::SIGKILL);
    let rest = first.rest().await;
    let told = killed.elapsed();
    let message = stream_error(&rest);
    assert!(message.contains("SIGKILL"), "{message}");
    // Issue 28: a SIGKILL is no evidence of memory trouble by itself (this worker
    // was far below its limit, and no OOM killer acted).
    assert!(!message.contains("out of memory"), "{message}");

    for (i, q) in queued.into_iter().enumerate() {
        let (status, v) = q.await.unwrap();
        assert_eq!(status, 200, "queued request {i} was lost: {v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.is_empty(), "{v}");
    }
    let ready_again = killed.elapsed();
    let row = d.ps_row(model).await.unwrap();
    assert_eq!(row["state"], "ready", "{row}");
    assert_eq!(row["incarnation"], 2, "{row}");
    assert_eq!(row["restarts"], 1, "{row}");
    let last_exit = row["last_exit"].as_str().unwrap();
    assert!(
        last_exit.starts_with("killed by signal 9 (SIGKILL)")
            && !last_exit.contains("out of memory"),
        "{row}"
    );
    assert_ne!(pid_of(&row), pid);
    assert!(!alive(pid), "the killed worker was reaped");
    eprintln!("{model}: stream told {told:?} after SIGKILL; queue served by {ready_again:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_over_shm_fails_the_stream_and_the_queue_completes() {
    a_killed_worker_fails_its_stream_and_serves_its_queue("smollm2-135m-crash").await;
    // Every segment is unlinked once its worker said Hello: none is left over.
    let (_, v) = daemon().admin("ps", None).await;
    assert_eq!(v["segments"], 0, "{v}");
    // `mlxd ps` shows the incarnation, the restart and how the last one ended.
    let out = mlxd()
        .args(["--port", &daemon().port.to_string(), "ps"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let at = out.find("smollm2-135m-crash ").expect(&out);
    let row: Vec<_> = out[at..]
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&row[row.len() - 2..], ["2", "1"], "INC and RESTARTS: {out}");
    assert!(
        out[at..].contains("last exit: killed by signal 9 (SIGKILL)"),
        "{out}"
    );
    assert!(!out[at..].contains("out of memory"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_over_stdio_fails_the_stream_and_the_queue_completes() {
    a_killed_worker_fails_its_stream_and_serves_its_queue("smollm2-135m-crash-stdio").await;
}

/// A worker stopped with SIGSTOP makes no progress with a request in flight: after
/// `hang_timeout` it is killed, its stream is told, and a new incarnation starts.
async fn a_stopped_worker_is_declared_hung(model: &str) {
    let d = daemon();
    start(d, model).await;
    // A first request pays the fresh worker's one-off costs: on a loaded 2-core
    // machine a cold first step can itself outlast the 3 s hang timeout, and the
    // stream would then move to a second worker before the fault is injected.
    let (status, v) = chat(d, short(model, 0)).await;
    assert_eq!(status, 200, "{v}");
    let mut stream = Sse::open(d, story(model)).await;
    stream.text_chunks(2).await;
    // The worker that is streaming now, whichever incarnation it is.
    let before = d.ps_row(model).await.unwrap();
    let (pid, incarnation) = (pid_of(&before), before["incarnation"].as_u64().unwrap());
    let stopped = Instant::now();
    signal(pid, Signal::SIGSTOP);
    let message = stream_error(&stream.rest().await);
    let told = stopped.elapsed();
    let quiet: u64 = message
        .split_once("hung: no progress for ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a hang: {message}"));
    assert!(
        quiet >= 3,
        "declared hung before the 3 s timeout: {message}"
    );
    let row = wait_for(d, model, "ready again", |r| {
        r.is_some_and(|r| r["state"] == "ready" && r["incarnation"] == incarnation + 1)
    })
    .await
    .unwrap();
    assert!(
        row["last_exit"].as_str().unwrap().starts_with("hung"),
        "{row}"
    );
    assert!(!alive(pid), "the hung worker was killed");
    eprintln!("{model}: hang reported {told:?} after SIGSTOP");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_worker_over_shm_is_killed_and_replaced() {
    a_stopped_worker_is_declared_hung("smollm2-135m-hang").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_worker_over_stdio_is_killed_and_replaced() {
    a_stopped_worker_is_declared_hung("smollm2-135m-hang-stdio").await;
}

/// Steps of 500 ms under a 2 s hang timeout, for a request of 5 s: slow, but
/// progressing, so never killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_but_progressing_worker_is_not_killed() {
    let d = daemon();
    let mut body = short("replay-slow", 0);
    body["max_tokens"] = json!(10);
    let began = Instant::now();
    let (status, v) = chat(d, body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert!(
        began.elapsed() > Duration::from_secs(4),
        "the fault made it slow"
    );
    let row = d.ps_row("replay-slow").await.unwrap();
    assert_eq!(
        (row["incarnation"].clone(), row["restarts"].clone()),
        (json!(1), json!(0)),
        "{row}"
    );
}

/// An exception inside a decode step: the started stream gets the worker's own
/// error, the worker exits non-zero, and the request queued behind it (handed to
/// the dying worker but never started) completes on the next incarnation.
#[tokio::test(flavor = "multi_thread")]
async fn an_exception_in_the_engine_fails_started_work_and_moves_the_rest() {
    let d = daemon();
    let model = "smollm2-135m-raise";
    start(d, model).await;
    let mut stream = Sse::open(d, story(model)).await;
    stream.text_chunks(1).await;
    let queued = tokio::spawn(chat(d, short(model, 7)));
    let message = stream_error(&stream.rest().await);
    assert!(
        message.contains("InjectedFault: injected fault in decode step 12"),
        "{message}"
    );
    let (status, v) = queued.await.unwrap();
    assert_eq!(status, 200, "the queued request was lost: {v}");
    let row = d.ps_row(model).await.unwrap();
    assert!(row["incarnation"].as_u64().unwrap() >= 2, "{row}");
    assert!(
        row["last_exit"]
            .as_str()
            .unwrap()
            .contains("exited with status 70"),
        "{row}"
    );
}

/// A worker that dies while prefilling a request has sent none of its answer: the
/// request moves to the next worker and completes (the worker's admission, which
/// it reports before the prefill, is not output).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_prefill_moves_its_request() {
    let d = daemon();
    let model = "smollm2-135m-prefill-kill";
    let pid = pid_of(&start(d, model).await);
    // ~330 prompt tokens: 10 prefill steps of 32, each held 300 ms by the preset.
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "word ".repeat(300) + "Say hi."}],
        "max_tokens": 2,
        "temperature": 0,
    });
    let tokens_before = d.ps_row(model).await.unwrap()["stats"]["batch_tokens_total"].clone();
    let request = tokio::spawn(chat(d, body));
    wait_for(d, model, "the request admitted", |r| {
        r.is_some_and(|r| r["stats"]["active_sequences"] == 1)
    })
    .await;
    let row = d.ps_row(model).await.unwrap();
    assert_eq!(
        row["stats"]["batch_tokens_total"], tokens_before,
        "a token came before the kill: {row}"
    );
    signal(pid, Signal::SIGKILL);
    let (status, v) = request.await.unwrap();
    assert_eq!(status, 200, "the request was lost: {v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 300, "{v}");
    let row = d.ps_row(model).await.unwrap();
    assert_ne!(pid_of(&row), pid, "{row}");
}

/// A frame of an unknown kind is a broken worker: it is killed (never trusted),
/// its stream is told, and the model comes back.
#[tokio::test(flavor = "multi_thread")]
async fn a_garbage_frame_gets_the_worker_killed() {
    let d = daemon();
    let model = "replay-garbage";
    let mut body = story(model);
    body["max_tokens"] = json!(50);
    let mut stream = Sse::open(d, body).await;
    let message = stream_error(&stream.rest().await);
    assert!(message.contains("unknown frame kind 32767"), "{message}");
    let row = wait_for(d, model, "restarted", |r| {
        r.is_some_and(|r| r["restarts"].as_u64() >= Some(1))
    })
    .await
    .unwrap();
    assert!(
        row["last_exit"].as_str().unwrap().contains("bad frame"),
        "{row}"
    );
    // Logged and counted, as any frame the daemon cannot decode (issue 25).
    let metrics = d.metrics().await;
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "mlxd_worker_protocol_errors_total{{model=\"{model}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(counted >= Some(1.0), "{metrics}");
}

/// A load that fails reports the worker's own message at once; requests during
/// the backoff are refused with it; more than 5 crashes in 60 s mark the model
/// failed until `mlxd start`/`restart`; other models keep serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_cannot_load_backs_off_then_fails() {
    let d = daemon();
    let dir = std::path::Path::new("/tmp/mlxd-test-broken");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        std::path::Path::new(&models_dir()).join("smollm2-135m/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let model = "broken";
    for attempt in 1..=6 {
        let (status, v) = chat(d, short(model, attempt)).await;
        assert_eq!(status, 503, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("loading failed: No safetensors found in /tmp/mlxd-test-broken"),
            "{message}"
        );
        if attempt < 6 {
            // Until the next try, a request is refused at once, with the cause
            // (and, once the backoff has begun, when the next try is).
            let (status, v) = chat(d, short(model, 0)).await;
            assert_eq!(status, 503);
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains("No safetensors"), "{message}");
            wait_for(d, model, "out of backoff", |r| {
                r.is_none_or(|r| r["state"] != "backoff")
            })
            .await;
        }
    }
    wait_for(d, model, "failed", |r| {
        r.is_some_and(|r| r["state"] == "failed")
    })
    .await;
    let row = d.ps_row(model).await.unwrap();
    assert_eq!(row["state"], "failed", "{row}");
    assert_eq!(row["incarnation"], 6);
    let (status, v) = chat(d, short(model, 0)).await;
    assert_eq!(status, 503);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("crashed 6 times within 60 s") && message.contains("mlxd restart"),
        "{v}"
    );
    // Other models are unaffected.
    assert_eq!(chat(d, short("replay-slow", 1)).await.0, 200);
    // `mlxd restart` resets it (and this load fails again, with its reason).
    let (status, v) = admin(d, "restart", json!({"model": model})).await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("No safetensors"),
        "{v}"
    );
    let (status, v) = admin(d, "stop", json!({"model": model})).await;
    assert_eq!((status, v["stopped"].clone()), (200, json!(true)), "{v}");
    assert!(d.ps_row(model).await.is_none());
}

/// A load that makes no progress at all is given up after `load_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_that_hangs_is_given_up() {
    let d = daemon();
    let began = Instant::now();
    let (status, v) = chat(d, short("replay-hang-load", 0)).await;
    assert_eq!(status, 503, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the load made no progress for 2 s"),
        "{message}"
    );
    eprintln!("stalled load reported after {:?}", began.elapsed());
    let row = wait_for(d, "replay-hang-load", "reaped", |r| {
        r.is_none_or(|r| r["state"] != "crashed")
    })
    .await;
    assert!(
        row.is_none_or(|r| r["pid"].is_null()),
        "the stalled worker is gone"
    );
}

/// keep_alive: a preset's idle limit unloads the model; a request's own
/// `keep_alive` overrides it ("-1" keeps it, "0" unloads it at once); a pinned
/// model stays.
#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_unloads_idle_models_unless_pinned() {
    let d = daemon();
    let model = "replay-keepalive";
    assert_eq!(chat(d, short(model, 0)).await.0, 200);
    assert!(d.ps_row(model).await.is_some(), "loaded by the request");
    wait_for(d, model, "unloaded after 1 s idle", |r| r.is_none()).await;

    let mut body = short(model, 1);
    body["keep_alive"] = json!("-1");
    assert_eq!(chat(d, body).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let row = d
        .ps_row(model)
        .await
        .expect("kept by the request's keep_alive");
    assert_eq!(row["keep_alive"], "forever");

    let mut body = short(model, 2);
    body["keep_alive"] = json!(0);
    assert_eq!(chat(d, body).await.0, 200);
    wait_for(d, model, "unloaded at once", |r| r.is_none()).await;

    let mut bad = short(model, 3);
    bad["keep_alive"] = json!("soon");
    let (status, v) = chat(d, bad).await;
    assert_eq!(
        (status, v["error"]["param"].clone()),
        (400, json!("keep_alive")),
        "{v}"
    );

    let (status, v) = admin(d, "start", json!({"model": model, "pin": true})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["worker"]["pinned"], true);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        d.ps_row(model).await.is_some(),
        "a pinned model stays loaded"
    );
    let (_, v) = admin(d, "stop", json!({"model": model})).await;
    assert_eq!(v["stopped"], true);
}

/// `mlxd stop` drains: the stream in flight finishes, a request arriving during
/// the grace period waits and is served by a fresh worker once the old one has
/// exited, and at no moment do two workers of the model exist.
#[tokio::test(flavor = "multi_thread")]
async fn stop_drains_and_never_runs_two_workers() {
    let d = daemon();
    let model = "replay-drain";
    start(d, model).await;
    let mut body = story(model);
    body["max_tokens"] = json!(30);
    let mut stream = Sse::open(d, body).await;
    stream.text_chunks(1).await;

    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watch = {
        let watching = watching.clone();
        let daemon_pid = d.pid;
        std::thread::spawn(move || {
            let mut most = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(workers_of(daemon_pid, model).len());
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        })
    };
    let port = d.port.to_string();
    let stop = std::thread::spawn(move || {
        let began = Instant::now();
        let out = mlxd()
            .args(["--port", &port, "stop", model])
            .output()
            .unwrap();
        (
            began.elapsed(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    });
    wait_for(d, model, "draining", |r| {
        r.is_some_and(|r| r["state"] == "draining")
    })
    .await;
    let late = tokio::spawn(chat(d, short(model, 1)));

    let rest = stream.rest().await;
    assert_eq!(
        rest.last().map(String::as_str),
        Some("[DONE]"),
        "the stream was drained, not cut: {rest:?}"
    );
    let (took, said) = stop.join().unwrap();
    assert!(said.contains("replay-drain stopped"), "{said}");
    let (status, v) = late.await.unwrap();
    assert_eq!(status, 200, "the request that came during the stop: {v}");
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        watch.join().unwrap(),
        1,
        "two workers of one model existed at once"
    );
    let row = d.ps_row(model).await.unwrap();
    assert_eq!(row["incarnation"], 2, "{row}");
    assert_eq!(row["restarts"], 0, "a stop is not a crash");
    eprintln!("mlxd stop answered in {took:?}");
}

/// A worker that dies before it says Hello (here: not even Python) leaves no
/// segment behind, and its requests get the reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_dies_before_hello_leaves_no_segment() {
    let home = std::env::temp_dir().join(format!("mlxd-nohello-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let d = common::spawn_daemon(&[
        ("MLXD_HOME", home.to_str().unwrap()),
        ("MLXD_MODELS_DIR", &models_dir()),
        ("MLXD_PYTHON", "/bin/false"),
    ]);
    let (status, v) = chat(&d, short("replay", 0)).await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exited with status 1"),
        "{v}"
    );
    let ours = format!("mlxd_{}_", d.pid);
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&ours))
        .collect();
    assert!(left.is_empty(), "segments left behind: {left:?}");
    let record = home.join(format!("run/shm-{}.list", d.pid));
    assert_eq!(std::fs::read_to_string(&record).unwrap_or_default(), "");
    assert!(d.shut_down().success());
    assert!(!record.exists(), "a clean exit removes the record");
    let _ = std::fs::remove_dir_all(&home);
}

/// `allow_models` keeps requests from loading other models (`mlxd start` still
/// can), and a daemon starting up removes the segments a dead daemon recorded.
#[tokio::test(flavor = "multi_thread")]
async fn allow_models_and_a_dead_daemons_segments() {
    use worker_protocol::segment::{new_name, Segment};
    let home = std::env::temp_dir().join(format!("mlxd-allow-{}", std::process::id()));
    std::fs::create_dir_all(home.join("run")).unwrap();
    std::fs::write(home.join("config.toml"), "allow_models = [\"replay\"]\n").unwrap();
    let stale = new_name();
    let segment = Segment::create(&stale, [4096, 4096], 1).unwrap();
    std::fs::write(
        home.join(format!("run/shm-{}.list", i32::MAX - 7)),
        format!("{stale}\n"),
    )
    .unwrap();
    let d = common::spawn_daemon(&[
        ("MLXD_HOME", home.to_str().unwrap()),
        ("MLXD_MODELS_DIR", &models_dir()),
    ]);
    assert!(
        Segment::open(&stale).is_err(),
        "the dead daemon's segment was removed"
    );
    drop(segment);

    assert_eq!(chat(&d, short("replay", 0)).await.0, 200);
    let (status, v) = chat(&d, short("replay-slow", 0)).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "model_not_allowed");
    start(&d, "replay-slow").await;
    let mut body = short("replay-slow", 0);
    body["max_tokens"] = json!(1);
    assert_eq!(
        chat(&d, body).await.0,
        200,
        "served while started by mlxd start"
    );
    assert!(d.shut_down().success());
    let _ = std::fs::remove_dir_all(&home);
}
