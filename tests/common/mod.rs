//! One real daemon per test binary, serving the real test model with real workers.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

#[allow(dead_code)] // each test binary uses its own subset of the fields
pub struct Daemon {
    pub url: String,
    pub port: u16,
    pub pid: u32,
    /// The control socket (admin routes; over HTTP they need an API key).
    pub socket: PathBuf,
    // Held so the daemon's stdin stays open; when the test process exits the pipe
    // closes and the daemon (started with --exit-on-stdin-eof) shuts down.
    _lifeline: Mutex<ChildStdin>,
    child: Mutex<Child>,
}

#[allow(dead_code)]
impl Daemon {
    /// Closes the daemon's stdin (its lifeline) and waits for it to exit.
    pub fn shut_down(self) -> std::process::ExitStatus {
        drop(self._lifeline);
        self.child.into_inner().unwrap().wait().unwrap()
    }

    /// SIGKILLs the daemon (as launchd, systemd or the OOM killer may) and reaps it.
    pub fn kill_hard(self) -> std::process::ExitStatus {
        let mut child = self.child.into_inner().unwrap();
        child.kill().unwrap();
        child.wait().unwrap()
    }
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn mlxd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mlxd"))
}

/// A daemon of its own on a free port with the test presets, with `env` added.
#[allow(dead_code)]
pub fn spawn_daemon(env: &[(&str, &str)]) -> Daemon {
    let mut cmd = mlxd();
    cmd.args(["serve", "--port", "0", "--presets-dir"])
        .arg(root().join("tests/presets"))
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if cfg!(feature = "bench-http") {
        // Presets only a benchmark build accepts (the http comparison transport).
        cmd.arg("--presets-dir")
            .arg(root().join("tests/presets-bench"));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start mlxd serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = mlxd::serve::listening_url(&line)
        .unwrap_or_else(|| panic!("unexpected first line from mlxd: {line:?}"))
        .to_string();
    let port = url.rsplit(':').next().unwrap().parse().unwrap();
    let home = env
        .iter()
        .find(|(k, _)| *k == "MLXD_HOME")
        .map(|(_, v)| PathBuf::from(v))
        .unwrap_or_else(mlxd::config::home_dir);
    Daemon {
        url,
        port,
        pid: child.id(),
        socket: mlxd::config::control_socket(&home, port),
        _lifeline: Mutex::new(child.stdin.take().unwrap()),
        child: Mutex::new(child),
    }
}

#[allow(dead_code)]
pub fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| spawn_daemon(&[]))
}

/// GET `url` and parse its JSON body.
#[allow(dead_code)]
pub async fn get_json(url: &str) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// POST `body` to `url`: the status and the JSON body (`{"raw": text}` if the body
/// is not JSON).
#[allow(dead_code)]
pub async fn post_json(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "raw": text }));
    (status, v)
}

#[allow(dead_code)]
impl Daemon {
    /// An admin call over the control socket: GET `/admin/{what}`, or POST with `body`.
    pub async fn admin(
        &self,
        what: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        mlxd::cli::over_socket(&self.socket, what, body)
            .await
            .expect("the control socket answers")
    }

    /// The model's row in `/admin/ps` (None when it is stopped).
    pub async fn ps_row(&self, model: &str) -> Option<serde_json::Value> {
        let (_, v) = self.admin("ps", None).await;
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["model"] == model)
            .cloned()
    }

    /// What `/metrics` renders now.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Runs the CLI against the daemon on `port` with `args`; asserts it succeeded and
/// returns its stdout. `env` entries with a None value are removed.
#[allow(dead_code)]
pub fn cli_ok(port: u16, args: &[&str], env: &[(&str, Option<&std::ffi::OsStr>)]) -> String {
    let mut cmd = mlxd();
    cmd.arg("--port").arg(port.to_string()).args(args);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "mlxd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 28: while `model` refuses new requests (a full queue, memory pressure),
/// the same refusal reaches every dialect as a 503 with `Retry-After: 1` and a
/// body in that dialect's own shape, saying `says`. `code` is OpenAI's
/// `error.code`.
#[allow(dead_code)]
pub async fn assert_503_in_every_dialect(base: &str, model: &str, code: &str, says: &str) {
    use serde_json::{json, Value};
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let messages = json!([{"role": "user", "content": "hi"}]);
    let asks = [
        (
            "/v1/messages",
            json!({"model": model, "max_tokens": 8, "messages": messages}),
        ),
        (
            "/api/chat",
            json!({"model": model, "messages": messages, "stream": false}),
        ),
        (
            "/api/generate",
            json!({"model": model, "prompt": "hi", "stream": false}),
        ),
        (
            "/v1/responses",
            json!({"model": model, "input": "hi", "max_output_tokens": 16}),
        ),
    ];
    // At once: the condition must still hold for the last of them.
    let answers = futures::future::join_all(asks.iter().map(|(path, body)| {
        let request = client.post(format!("{base}{path}")).json(body).send();
        async move {
            let resp = request.await.unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").cloned();
            let text = resp.text().await.unwrap();
            (status, retry_after, text)
        }
    }))
    .await;
    for ((path, _), (status, retry_after, text)) in asks.iter().zip(answers) {
        assert_eq!(status, 503, "{path}: {text}");
        assert_eq!(
            retry_after.as_ref().and_then(|v| v.to_str().ok()),
            Some("1"),
            "{path}: Retry-After"
        );
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: {text}"));
        let message = match *path {
            "/v1/messages" => {
                assert_eq!(v["type"], "error", "{path}: {v}");
                assert_eq!(v["error"]["type"], "overloaded_error", "{path}: {v}");
                assert_eq!(v.as_object().unwrap().len(), 2, "{path}: {v}");
                assert_eq!(v["error"].as_object().unwrap().len(), 2, "{path}: {v}");
                &v["error"]["message"]
            }
            "/api/chat" | "/api/generate" => {
                assert_eq!(v.as_object().unwrap().len(), 1, "{path}: {v}");
                &v["error"]
            }
            _ => {
                assert_eq!(v["error"]["code"], code, "{path}: {v}");
                assert_eq!(v["error"]["type"], "server_error", "{path}: {v}");
                &v["error"]["message"]
            }
        };
        let message = message
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no message in {v}"));
        assert!(message.contains(says), "{path}: {message}");
    }
}

/// A live (not zombie) process: its pid, its parent, its command line (arguments
/// separated by NUL).
#[allow(dead_code)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub cmdline: String,
}

/// The live worker processes of `model` (their command line names `--model <model>`).
#[allow(dead_code)]
pub fn workers_named(model: &str) -> Vec<Process> {
    let needle = format!("--model\0{model}\0");
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
        if let Some(ppid) = ppid {
            if cmdline.contains(&needle) && !stat.contains(") Z ") {
                out.push(Process { pid, ppid, cmdline });
            }
        }
    }
    out
}
