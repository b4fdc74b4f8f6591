//! Issue 33, peers: a daemon watches the other mlxd daemons its config names, over
//! their authenticated HTTP API, and `mlxd ps`, `/admin/ps` and `/ui` say whether
//! each answers, its version and its models. Two real daemons: the peer requires an
//! API key; the watcher names it with the right key (from a file), with a wrong one
//! (from the environment), and names a port where nothing listens.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{cli_ok, mlxd, spawn_daemon};
use serde_json::{json, Value};

const PEER_KEY: &str = "peer-key-0123456789";

fn private_home(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let home = std::env::temp_dir().join(format!("mlxd-peers-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    home
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn peer_row<'a>(peers: &'a Value, name: &str) -> &'a Value {
    peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no peer {name} in {peers}"))
}

#[tokio::test]
async fn a_daemon_shows_each_peer_it_names_as_up_refused_or_down() {
    let peer_home = private_home("peer");
    write_private(
        &peer_home.join("config.toml"),
        &format!("api_keys = [\"{PEER_KEY}\"]\n"),
    );
    let peer = spawn_daemon(&[("MLXD_HOME", peer_home.to_str().unwrap())]);

    let home = private_home("head");
    write_private(&home.join("studio.key"), &format!("{PEER_KEY}\n"));
    write_private(
        &home.join("config.toml"),
        &format!(
            "[peers.studio]\nurl = \"{url}\"\nkey_file = \"studio.key\"\n\
             [peers.wrongkey]\nurl = \"{url}\"\nkey_env = \"MLXD_TEST_PEER_KEY\"\n\
             [peers.gone]\nurl = \"http://127.0.0.1:9\"\nkey_env = \"MLXD_TEST_PEER_KEY\"\n",
            url = peer.url
        ),
    );
    let head = spawn_daemon(&[
        ("MLXD_HOME", home.to_str().unwrap()),
        ("MLXD_TEST_PEER_KEY", "not-the-peer-key"),
    ]);

    // The first look is taken at start; allow a few polls on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    let peers = loop {
        let (status, v) = head.admin("ps", None).await;
        assert_eq!(status, 200, "{v}");
        let settled = v["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] != "unknown");
        if settled || Instant::now() > deadline {
            break v["peers"].clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(peers.as_array().unwrap().len(), 3, "{peers}");

    let studio = peer_row(&peers, "studio");
    assert_eq!(studio["state"], "up", "{studio}");
    assert_eq!(studio["version"], env!("CARGO_PKG_VERSION"));
    let models: Vec<&str> = studio["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(models.contains(&"smollm2-135m"), "{models:?}");
    assert!(studio["error"].is_null());

    let wrong = peer_row(&peers, "wrongkey");
    assert_eq!(wrong["state"], "unauthorized", "{wrong}");
    assert!(
        wrong["error"].as_str().unwrap().contains("refused the key"),
        "{wrong}"
    );
    assert!(wrong["models"].as_array().unwrap().is_empty());

    let gone = peer_row(&peers, "gone");
    assert_eq!(gone["state"], "down", "{gone}");
    assert!(gone["last_seen_s"].is_null());

    // `mlxd ps` says the same, and never prints a key.
    let ps = cli_ok(head.port, &["ps"], &[("MLXD_HOME", Some(home.as_os_str()))]);
    let line = ps
        .lines()
        .find(|l| l.starts_with("studio "))
        .unwrap_or_else(|| panic!("{ps}"));
    assert!(
        line.contains(" up ") && line.contains("smollm2-135m"),
        "{line}"
    );
    assert!(
        ps.lines()
            .any(|l| l.starts_with("wrongkey ") && l.contains("unauthorized")),
        "{ps}"
    );
    assert!(
        ps.lines()
            .any(|l| l.starts_with("gone ") && l.contains("down")),
        "{ps}"
    );
    assert!(
        !ps.contains(PEER_KEY) && !ps.contains("not-the-peer-key"),
        "{ps}"
    );

    // The status page's snapshot carries the peers too.
    let mut events = reqwest::get(format!("{}/ui/events", head.url))
        .await
        .unwrap();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = events.chunk().await.unwrap().expect("a snapshot");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = text.lines().find_map(|l| l.strip_prefix("data:")).unwrap();
    let snapshot: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(peer_row(&snapshot["peers"], "studio")["state"], "up");
    drop(events);

    head.shut_down();
    peer.shut_down();
    let _ = std::fs::remove_dir_all(home);
    let _ = std::fs::remove_dir_all(peer_home);
}

#[test]
fn a_peer_with_its_key_in_the_config_is_refused_at_start() {
    let home = private_home("inline");
    write_private(
        &home.join("config.toml"),
        "[peers.studio]\nurl = \"http://10.0.0.2:11411\"\nkey = \"peer-key-0123456789\"\n",
    );
    let out = mlxd()
        .args(["serve", "--port", "0"])
        .env("MLXD_HOME", &home)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `key`"), "{stderr}");
    assert!(!stderr.contains("peer-key-0123456789"), "{stderr}");
    let _ = std::fs::remove_dir_all(home);
}

/// Where the test model was imported (the test process's own home, or
/// MLXD_MODELS_DIR): the peer daemons have homes of their own.
fn models_dir() -> String {
    std::env::var("MLXD_MODELS_DIR").unwrap_or_else(|_| {
        mlxd::config::home_dir()
            .join("models")
            .to_string_lossy()
            .into_owned()
    })
}

/// The replay text's opening, which a request to the peer's model answers with.
fn starts_the_text(v: &Value) -> bool {
    v.as_str().is_some_and(|t| t.starts_with("Call me"))
}

/// POST `body` to the route under `base`: a 200 and its JSON.
async fn answered(base: &str, route: &str, body: Value) -> Value {
    let (status, _, text) = post(&format!("{base}{route}"), body).await;
    assert_eq!(status, 200, "{route}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// A chat stream of the peer's model that runs for minutes unless stopped.
async fn long_stream(base: &str, messages: &Value) -> reqwest::Response {
    let body =
        json!({"model": "peer-only", "messages": messages, "max_tokens": 100_000, "stream": true});
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

async fn post(url: &str, body: Value) -> (u16, Option<String>, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, retry, resp.text().await.unwrap())
}

#[tokio::test]
async fn a_request_for_a_peers_model_is_answered_by_the_peer_in_the_clients_dialect() {
    let peer_home = private_home("route-peer");
    write_private(
        &peer_home.join("config.toml"),
        &format!("api_keys = [\"{PEER_KEY}\"]\n"),
    );
    std::fs::create_dir(peer_home.join("presets")).unwrap();
    std::fs::set_permissions(
        peer_home.join("presets"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    // The replay engine: a fixed text ("Call me Ishmael. ..."), token by token, at
    // most 100 tokens a second (so a long stream is still running when its client
    // leaves).
    write_private(
        &peer_home.join("presets/peer-only.toml"),
        "model = \"smollm2-135m\"\nengine = \"replay\"\n[faults]\nstep_delay_ms = 10\n",
    );
    let models = models_dir();
    let peer = spawn_daemon(&[
        ("MLXD_HOME", peer_home.to_str().unwrap()),
        ("MLXD_MODELS_DIR", &models),
    ]);
    let home = private_home("route-head");
    write_private(
        &home.join("config.toml"),
        &format!(
            "[peers.studio]\nurl = \"{}\"\nkey_env = \"MLXD_TEST_STUDIO_KEY\"\n",
            peer.url
        ),
    );
    let head = spawn_daemon(&[
        ("MLXD_HOME", home.to_str().unwrap()),
        ("MLXD_TEST_STUDIO_KEY", PEER_KEY),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = head.admin("ps", None).await;
        let studio = peer_row(&v["peers"], "studio").clone();
        if studio["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "peer-only")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the peer's model never showed: {studio}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let user = json!([{"role": "user", "content": "Who are you?"}]);

    // Listed with where it runs, in both model lists.
    let listed = common::get_json(&format!("{}/v1/models", head.url)).await;
    let entry = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "peer-only")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(entry["mlxd"]["peer"], "studio", "{entry}");
    let tags = common::get_json(&format!("{}/api/tags", head.url)).await;
    let tag = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "peer-only")
        .unwrap_or_else(|| panic!("{tags}"));
    assert_eq!(tag["remote_host"], format!("{}/", peer.url), "{tag}");

    // OpenAI, whole and streamed; Ollama and Anthropic: the peer's own shapes.
    let base = head.url.as_str();
    let v = answered(
        base,
        "/v1/chat/completions",
        json!({"model": "peer-only", "messages": user, "max_tokens": 6}),
    )
    .await;
    assert!(
        starts_the_text(&v["choices"][0]["message"]["content"]),
        "{v}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let (status, _, text) = post(
        &format!("{base}/v1/chat/completions"),
        json!({"model": "peer-only", "messages": user, "max_tokens": 6, "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let pieces: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(starts_the_text(&json!(pieces)), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let ollama = json!({"model": "peer-only", "messages": user, "stream": false, "options": {"num_predict": 6}});
    let v = answered(base, "/api/chat", ollama).await;
    assert!(starts_the_text(&v["message"]["content"]), "{v}");
    let v = answered(
        base,
        "/v1/messages",
        json!({"model": "peer-only", "messages": user, "max_tokens": 6}),
    )
    .await;
    assert!(starts_the_text(&v["content"][0]["text"]), "{v}");

    // A client that hangs up mid-stream ends the request on the peer too.
    let mut stream = long_stream(base, &user).await;
    stream.chunk().await.unwrap().expect("a first chunk");
    let inflight = || async {
        peer.ps_row("peer-only")
            .await
            .map_or(0, |r| r["inflight"].as_u64().unwrap())
    };
    assert_eq!(inflight().await, 1);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(15);
    while inflight().await != 0 {
        assert!(
            Instant::now() < deadline,
            "the peer still streams to a client that left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A model neither serves is still the head's own 404.
    let (status, _, text) = post(
        &format!("{}/v1/chat/completions", head.url),
        json!({"model": "nowhere", "messages": user}),
    )
    .await;
    assert_eq!(status, 404, "{text}");

    // The peer stopped (SIGSTOP: its socket accepts, nothing answers) mid-stream:
    // once it has missed its health checks the stream ends with the dialect's error
    // event instead of waiting on it.
    let mut stream = long_stream(base, &user).await;
    let mut text = String::from_utf8_lossy(&stream.chunk().await.unwrap().unwrap()).into_owned();
    let pid = nix::unistd::Pid::from_raw(peer.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(40), async {
        while let Ok(Some(chunk)) = stream.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(rest.is_ok(), "the stream still waits on a stopped peer");
    let last = text.trim_end().lines().last().unwrap();
    assert!(last.contains("missed its health checks"), "{last}");
    assert!(
        stopped.elapsed() >= Duration::from_secs(3),
        "ended before any check could fail"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer_row(&head.admin("ps", None).await.1["peers"], "studio")["state"] != "up" {
        assert!(Instant::now() < deadline, "the peer never came back up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The peer killed mid-stream: the stream ends with the dialect's error event,
    // not a clean end.
    let mut stream = long_stream(base, &user).await;
    let mut text = String::from_utf8_lossy(&stream.chunk().await.unwrap().unwrap()).into_owned();
    peer.kill_hard();
    while let Ok(Some(chunk)) = stream.chunk().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let last = text.trim_end().lines().last().unwrap();
    assert!(last.starts_with("data: {\"error\""), "{last}");
    assert!(last.contains("peer 'studio' stopped answering"), "{last}");
    assert!(!text.contains("[DONE]"));

    // The peer gone: a 503 in the client's dialect that names it, at once.
    let started = Instant::now();
    let (status, retry, text) = post(
        &format!("{}/v1/messages", head.url),
        json!({"model": "peer-only", "messages": user, "max_tokens": 6}),
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(retry.as_deref(), Some("1"));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "overloaded_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("peer 'studio'"),
        "{v}"
    );
    let (status, _, text) = post(
        &format!("{}/v1/chat/completions", head.url),
        json!({"model": "peer-only", "messages": user}),
    )
    .await;
    assert_eq!(status, 503, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "peer_unavailable", "{v}");
    assert!(started.elapsed() < Duration::from_secs(10));

    head.shut_down();
    let _ = std::fs::remove_dir_all(home);
    let _ = std::fs::remove_dir_all(peer_home);
}
