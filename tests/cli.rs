//! `mlxd start|ps|stop|list` against a running daemon.

mod common;

use common::{daemon, mlxd};

fn run(args: &[&str]) -> (bool, String) {
    let out = mlxd()
        .arg("--port")
        .arg(daemon().port.to_string())
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

const MODEL: &str = "smollm2-135m-lifecycle";

#[test]
fn start_ps_stop_a_worker() {
    let (ok, out) = run(&["start", MODEL]);
    assert!(ok, "{out}");
    assert!(out.contains("ready"), "{out}");

    let (ok, out) = run(&["ps"]);
    assert!(ok, "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with(MODEL))
        .unwrap_or_else(|| panic!("{MODEL} missing from ps:\n{out}"));
    let cols: Vec<_> = row.split_whitespace().collect();
    let pid: i32 = cols[1].parse().unwrap();
    assert_eq!(cols[2], "shm");
    assert_eq!(cols[3], "ready");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "worker pid {pid} is running"
    );

    let (ok, out) = run(&["stop", MODEL]);
    assert!(ok && out.contains("stopped"), "{out}");
    let (_, out) = run(&["ps"]);
    assert!(!out.lines().any(|l| l.starts_with(MODEL)), "{out}");
    // The process is gone (reaped by the daemon, not a zombie).
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "worker {pid} still exists"
    );
}

#[test]
fn unknown_model_is_a_clear_cli_error() {
    let (ok, out) = run(&["start", "no-such-model"]);
    assert!(!ok);
    assert!(out.contains("does not exist"), "{out}");
}

#[test]
fn list_shows_presets_and_whether_they_are_imported() {
    let (ok, out) = run(&["list"]);
    assert!(ok, "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("smollm2-135m "))
        .expect(&out);
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[3], "yes", "the test model is imported: {row}");
    // Its weights, and 2 × 30 layers × 3 KV heads × 64 × 4 bytes of KV a token.
    assert_eq!(cols[4..], ["513", "MiB", "45.0", "KiB"], "{row}");
}

/// `mlxd estimate` without a daemon, on a model directory holding MiniMax-M2's
/// published config.json and a sparse 129 GB weights file (only sizes are read):
/// it fits a 512 GB Mac Studio and not a 64 GB laptop, says why, and says so in
/// its exit code; a working set of long contexts is counted beyond the reserve.
#[test]
fn estimate_says_whether_a_model_fits_another_machine() {
    let dir = std::env::temp_dir().join(format!("mlxd-estimate-{}", std::process::id()));
    let model = dir.join("minimax-m2");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        common::root().join("tests/fixtures/model-configs/minimax-m2.json"),
        model.join("config.json"),
    )
    .unwrap();
    std::fs::File::create(model.join("model.safetensors"))
        .unwrap()
        .set_len(129_000_000_000)
        .unwrap();
    let estimate = |extra: &[&str]| {
        let out = mlxd()
            .arg("estimate")
            .arg(&model)
            .args(extra)
            .env("MLXD_HOME", &dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // Columns aligned with spaces: compared word by word.
        let words: Vec<&str> = text.split_whitespace().collect();
        (out.status.code(), words.join(" "))
    };
    let (code, out) = estimate(&["--cap", "512GB"]);
    assert_eq!(code, Some(0), "{out}");
    // 62 layers × 2 × 8 KV heads × 128 × 2 bytes (16-bit activations of an
    // FP8 checkpoint) = 253,952 bytes a token; 32,768 tokens reserved = 7.8 GiB.
    assert!(out.contains("(253952 bytes)"), "{out}");
    assert!(out.contains("KV reserve 7.8 GiB (32768 tokens"), "{out}");
    assert!(out.contains("weights 120.1 GiB"), "{out}");
    assert!(
        out.starts_with("minimax-m2 (") && out.contains(" fits: needs "),
        "{out}"
    );
    let (code, out) = estimate(&["--cap", "64GB"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("does not fit") && out.contains("to make it fit"),
        "{out}"
    );
    // Four sequences at the full 196,608-token context: 186 GiB of KV beyond
    // the weights still fits 512 GB; eight do not.
    let (code, out) = estimate(&[
        "--cap",
        "512GB",
        "--context",
        "196608",
        "--concurrency",
        "4",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("working set 186.0 GiB"), "{out}");
    let (code, _) = estimate(&[
        "--cap",
        "512GB",
        "--context",
        "196608",
        "--concurrency",
        "8",
    ]);
    assert_eq!(code, Some(1));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A daemon killed with SIGKILL leaves no worker behind: the worker's stdin (its
/// lifeline) reaches EOF and it exits.
#[test]
fn workers_exit_when_their_daemon_is_killed() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let mut own = mlxd()
        .args(["serve", "--port", "0", "--presets-dir"])
        .arg(common::root().join("tests/presets"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(own.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    common::cli_ok(port, &["start", MODEL], &[]);
    let ps = common::cli_ok(port, &["ps"], &[]);
    let pid: u32 = ps
        .lines()
        .find(|l| l.starts_with(MODEL))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no worker in ps:\n{ps}"));
    // Its preset leaves max_concurrent out: the worker sized the batch to its
    // device (a CPU here) and the daemon admits that many.
    assert!(ps.contains("batch up to 16 (sized to the device)"), "{ps}");

    own.kill().unwrap(); // SIGKILL: no chance to stop its workers
    own.wait().unwrap();
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!alive(), "worker {pid} outlived its daemon");
}

/// On a terminal, `mlxd start` shows the load's progress (state, elapsed time,
/// memory) until the model is ready; `mlxd restart` replaces the worker.
#[test]
fn start_shows_progress_on_a_terminal_and_restart_replaces_the_worker() {
    let model = "replay-slow";
    let command = format!(
        "{} --port {} start {model}",
        env!("CARGO_BIN_EXE_mlxd"),
        daemon().port
    );
    // `script` gives the command a pseudo-terminal, as a person's shell would.
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script(1) from util-linux");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{model}: starting")),
        "no progress line: {text:?}"
    );
    assert!(text.contains(&format!("{model} ready")), "{text:?}");
    let (ok, out) = run(&["restart", model]);
    assert!(ok && out.contains("incarnation 2"), "{out}");
    let (ok, out) = run(&["ps"]);
    assert!(ok, "{out}");
    let row = out.lines().find(|l| l.starts_with(model)).expect(&out);
    let cols: Vec<_> = row.split_whitespace().collect();
    assert_eq!(
        &cols[cols.len() - 2..],
        ["2", "0"],
        "a restart is not a crash: {out}"
    );
    assert!(run(&["stop", model]).0);
}

/// Without an API key the admin routes are only on the control socket: over HTTP
/// (where any local web page could reach them) they are refused.
#[test]
fn keyless_admin_over_http_is_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, v) = rt.block_on(common::post_json(
        &format!("{}/admin/stop", daemon().url),
        &serde_json::json!({"model": MODEL}),
    ));
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "control_plane_on_socket");
}
