//! What running under a service manager relies on: a daemon killed hard (launchd
//! or systemd SIGKILLs it after its stop timeout; the OOM killer) leaves no worker
//! and its successor no segment; the log files `mlxd logs` reads; and
//! `mlxd service --dry-run` for both platforms.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{mlxd, spawn_daemon, Daemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

fn models_dir() -> String {
    std::env::var("MLXD_MODELS_DIR")
        .unwrap_or_else(|_| format!("{}/.mlxd/models", std::env::var("HOME").unwrap()))
}

/// A fresh MLXD_HOME for one test.
fn scratch_home(name: &str) -> PathBuf {
    let home = std::env::temp_dir().join(format!("mlxd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    home
}

fn daemon_on(home: &Path) -> Daemon {
    spawn_daemon(&[
        ("MLXD_HOME", home.to_str().unwrap()),
        ("MLXD_MODELS_DIR", &models_dir()),
    ])
}

async fn start(d: &Daemon, model: &str) -> u32 {
    let (status, v) = d.admin("start", Some(json!({ "model": model }))).await;
    assert_eq!(status, 200, "start {model}: {v}");
    v["worker"]["pid"].as_u64().expect("a worker pid") as u32
}

/// True if `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Shared-memory segments named as daemon `pid`'s (`mlxd_<pid>_<n>`).
fn segments_of(pid: u32) -> Vec<String> {
    let ours = format!("mlxd_{pid}_");
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&ours))
        .collect()
}

/// Issue 19: a daemon SIGKILLed takes its workers with it, within seconds: one
/// serving normally (it sees EOF on stdin) and one that reads nothing (stopped
/// with SIGSTOP, as good as stuck in native code), which only the kernel's
/// parent-death signal ends. The next daemon on the same home removes the
/// segment and the record the dead one left.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_hard_leaves_no_worker_and_its_successor_no_segment() {
    use worker_protocol::segment::Segment;
    // Orphaned workers are re-parented to this process, in this session: so the
    // kernel does not SIGHUP the stopped one for being in an orphaned process
    // group, which would end it without the parent-death signal this tests. (They
    // become this process's zombies, which `alive` counts as gone.)
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let home = scratch_home("killed");
    let d = daemon_on(&home);
    let daemon_pid = d.pid;
    let serving = start(&d, "replay").await;
    let stopped = start(&d, "replay-slow").await;
    kill(Pid::from_raw(stopped as i32), Signal::SIGSTOP).unwrap();
    // A segment the daemon would have named, still linked when it dies (a worker
    // that had not mapped it yet), and the record a daemon keeps of its segments.
    let left = format!("mlxd_{daemon_pid}_999");
    let segment = Segment::create(&left, [4096, 4096], 1).unwrap();
    let record = home.join(format!("run/shm-{daemon_pid}.list"));
    assert!(record.exists(), "the daemon keeps a record of its segments");

    let status = d.kill_hard();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let killed = Instant::now();
    while alive(serving) || alive(stopped) {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "workers outlived the daemon by 5 s: serving {} stopped {}",
            alive(serving),
            alive(stopped)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("workers gone {:?} after the daemon", killed.elapsed());
    for pid in [serving, stopped] {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
    }
    drop(segment);
    assert_eq!(segments_of(daemon_pid), [left]);

    let next = daemon_on(&home);
    assert!(
        segments_of(daemon_pid).is_empty(),
        "the dead daemon's segments: {:?}",
        segments_of(daemon_pid)
    );
    assert!(!record.exists(), "the dead daemon's record is removed");
    assert!(next.shut_down().success());
    let _ = std::fs::remove_dir_all(&home);
}

/// Runs `mlxd` with `args` on `home`; its success and stdout + stderr.
fn run_on(home: &Path, args: &[&str]) -> (bool, String) {
    let out = mlxd().env("MLXD_HOME", home).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Issue 19: a worker's stderr lands in `logs/worker-<model>.log`, and `mlxd logs`
/// prints it (and the daemon's own log).
#[tokio::test(flavor = "multi_thread")]
async fn a_workers_stderr_goes_to_its_file_and_mlxd_logs_prints_it() {
    let home = scratch_home("logs");
    let d = daemon_on(&home);
    let pid = start(&d, "replay").await;
    let file = home.join("logs/worker-replay.log");
    // The worker logs "loaded <model> in ..." at INFO once it is ready.
    let needle = format!("worker[{pid}] INFO loaded ");
    let began = Instant::now();
    while !std::fs::read_to_string(&file)
        .unwrap_or_default()
        .contains(&needle)
    {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{needle:?} not in {}: {:?}",
            file.display(),
            std::fs::read_to_string(&file)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (ok, out) = run_on(&home, &["logs", "--model", "replay", "-n", "100"]);
    assert!(ok, "{out}");
    assert!(out.contains(&needle), "{out}");
    let (ok, out) = run_on(&home, &["logs", "-n", "1000"]);
    assert!(ok, "{out}");
    assert!(out.contains("worker spawned"), "the daemon's log: {out}");
    assert!(!out.contains("\x1b["), "no colour codes in the file: {out}");
    let (ok, out) = run_on(&home, &["logs", "--model", "../config"]);
    assert!(!ok && out.contains("not a model name"), "{out}");
    let (ok, out) = run_on(&home, &["logs", "--model", "never-started"]);
    assert!(!ok && out.contains("no worker log"), "{out}");

    assert!(d.shut_down().success());
    let _ = std::fs::remove_dir_all(&home);
}

/// `mlxd logs -f` prints what is appended after it starts.
#[test]
fn logs_follow_prints_new_lines() {
    use std::io::{BufRead, BufReader, Write};
    let home = scratch_home("follow");
    let file = home.join("logs/worker-m.log");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "before\n").unwrap();
    let mut child = mlxd()
        .env("MLXD_HOME", &home)
        .args(["logs", "-f", "--model", "m"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "before");
    let mut w = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    w.write_all(b"after\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "after");
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&home);
}

/// `--dry-run` prints either platform's file and commands and touches nothing.
#[test]
fn service_dry_run_prints_both_platforms() {
    let home = scratch_home("service");
    let user_home = home.join("user");
    let dry = |target: &str| {
        let out = mlxd()
            .env("MLXD_HOME", &home)
            .env("HOME", &user_home)
            .args(["service", "install", "--dry-run", "--target", target])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let binary = std::fs::canonicalize(env!("CARGO_BIN_EXE_mlxd")).unwrap();
    let mac = dry("macos");
    assert!(mac.contains("<string>dev.mlxd</string>"), "{mac}");
    assert!(
        mac.contains(&format!("<string>{}</string>", binary.display())),
        "{mac}"
    );
    assert!(mac.contains("<key>SuccessfulExit</key>"), "{mac}");
    assert!(
        mac.contains(&format!(
            "launchctl bootstrap gui/{} {}",
            nix::unistd::getuid(),
            user_home
                .join("Library/LaunchAgents/dev.mlxd.plist")
                .display()
        )),
        "{mac}"
    );
    let linux = dry("linux");
    assert!(
        linux.contains(&format!("ExecStart={} serve\n", binary.display())),
        "{linux}"
    );
    assert!(
        linux.contains("systemctl --user enable --now mlxd"),
        "{linux}"
    );
    assert!(
        !user_home.exists(),
        "a dry run writes nothing under {}",
        user_home.display()
    );
    let out = mlxd()
        .env("MLXD_HOME", &home)
        .env("HOME", &user_home)
        .args(["service", "uninstall", "--target", "macos"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "another platform only with --dry-run"
    );
    let _ = std::fs::remove_dir_all(&home);
}
