//! Secure defaults from outside, as a web page or a stranger on the network would
//! try them: a foreign Host (DNS rebinding), cross-origin `text/plain` POSTs (no
//! CORS preflight needed) to chat and to admin, and a missing or wrong API key on
//! every route the daemon has (walked from `mlxd::api::ROUTES`, so a new route
//! cannot be left open).

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{spawn_daemon, Daemon};
use reqwest::{Client, Method, StatusCode};

const KEY: &str = "sekret-key-for-tests";

fn home() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mlxd-security-{}", std::process::id()))
}

fn daemon() -> &'static Daemon {
    static D: OnceLock<Daemon> = OnceLock::new();
    D.get_or_init(|| {
        std::fs::create_dir_all(home()).unwrap();
        std::fs::write(
            home().join("config.toml"),
            "allowed_origins = [\"http://localhost:3000\"]\n",
        )
        .unwrap();
        // A model whose prompt cache spills into the home (what a user's preset may do).
        std::fs::create_dir_all(home().join("presets")).unwrap();
        std::fs::write(
            home().join("presets/private-cache.toml"),
            format!(
                "model = \"smollm2-135m\"\n[performance]\nprompt_cache_dir = \"{}\"\n",
                home().join("prompt-cache").display()
            ),
        )
        .unwrap();
        // Made as a user's umask (022) makes them: readable by everyone.
        for (path, mode) in [(home(), 0o755), (home().join("config.toml"), 0o644)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let models = std::env::var("MLXD_MODELS_DIR")
            .unwrap_or_else(|_| format!("{}/.mlxd/models", std::env::var("HOME").unwrap()));
        spawn_daemon(&[
            ("MLXD_HOME", home().to_str().unwrap()),
            ("MLXD_MODELS_DIR", &models),
            ("MLXD_API_KEY", KEY),
        ])
    })
}

fn request(method: &str, path: &str) -> reqwest::RequestBuilder {
    let m = Method::from_bytes(method.as_bytes()).unwrap();
    let r = Client::new().request(m, format!("{}{path}", daemon().url));
    if method == "POST" {
        r.header("content-type", "application/json").body("{}")
    } else {
        r
    }
}

#[tokio::test]
async fn every_route_but_healthz_needs_a_key() {
    for (method, path) in mlxd::api::ROUTES {
        let none = request(method, path).send().await.unwrap().status();
        let wrong = request(method, path)
            .bearer_auth("sekret-key-for-tesTs")
            .send()
            .await
            .unwrap()
            .status();
        let bearer = request(method, path)
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .status();
        let x_api_key = request(method, path)
            .header("x-api-key", KEY)
            .send()
            .await
            .unwrap()
            .status();
        if *path == "/healthz" {
            assert_eq!(none, StatusCode::OK);
            continue;
        }
        assert_eq!(
            none,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a key"
        );
        assert_eq!(
            wrong,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with a wrong key"
        );
        assert_ne!(
            bearer,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with a Bearer key"
        );
        assert_ne!(
            x_api_key,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with x-api-key"
        );
    }
    // A path no route has is refused before routing too.
    let status = request("GET", "/v1/secret").send().await.unwrap().status();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Each dialect's clients get the refusal in their own error shape.
    for (path, pointer, expected) in [
        ("/v1/chat/completions", "/error/code", "invalid_api_key"),
        ("/v1/messages", "/error/type", "authentication_error"),
        ("/api/chat", "/error", "a valid API key is needed"),
    ] {
        let body: serde_json::Value = request("POST", path)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let got = body
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        assert!(got.starts_with(expected), "{path}: {body}");
    }
    // The CLI sends the configured key.
    common::cli_ok(
        daemon().port,
        &["ps"],
        &[("MLXD_API_KEY", Some(KEY.as_ref()))],
    );
}

#[tokio::test]
async fn a_foreign_host_is_refused() {
    for path in ["/v1/chat/completions", "/admin/stop"] {
        let resp = request("POST", path)
            .bearer_auth(KEY)
            .header("host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "host_not_allowed");
    }
}

/// A browser cannot send a header with a page load or an EventSource: on the status
/// page the key is the password of its own login prompt (HTTP Basic), and only there.
#[tokio::test]
async fn the_status_page_takes_the_key_from_the_browsers_login_prompt() {
    let bare = request("GET", "/ui").send().await.unwrap();
    assert_eq!(bare.status(), StatusCode::UNAUTHORIZED);
    let challenge = bare.headers()["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    let wrong = request("GET", "/ui")
        .basic_auth("me", Some("sekret-key-for-tesTs"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let page = request("GET", "/ui")
        .basic_auth("me", Some(KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("/ui/events"));
    let mut events = request("GET", "/ui/events")
        .basic_auth("", Some(KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let first = events.chunk().await.unwrap().expect("a snapshot");
    assert!(first.starts_with(b"data: {"), "{first:?}");
    // And a real browser: headless Chromium given the credentials loads the page,
    // whose script reads two snapshots from its EventSource and says so.
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok()
        })
        .expect("scripts/test installs Debian's chromium");
    let url = format!("http://me:{KEY}@127.0.0.1:{}/ui?updates=2", daemon().port);
    let dom = tokio::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--virtual-time-budget=10000", "--dump-dom", &url])
        .output()
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains(r#"<div id="status">stopped after 2 updates"#),
        "{dom}"
    );
    // Elsewhere Basic credentials are not a key, and the challenge is Bearer.
    for (method, path) in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")] {
        let resp = request(method, path)
            .basic_auth("me", Some(KEY))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{path}");
    }
}

#[tokio::test]
async fn cross_origin_posts_are_refused_and_allowed_origins_get_cors() {
    for path in ["/v1/chat/completions", "/admin/stop", "/api/chat"] {
        // What any web page can send without a preflight.
        let resp = Client::new()
            .post(format!("{}{path}", daemon().url))
            .header("origin", "https://evil.example")
            .header("content-type", "text/plain")
            .bearer_auth(KEY)
            .body(r#"{"model": "smollm2-135m"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        if path.starts_with("/api/") {
            continue; // without an Origin, Ollama's routes read it as JSON (as Ollama does)
        }
        // Without an Origin, a non-JSON body is still refused.
        let resp = Client::new()
            .post(format!("{}{path}", daemon().url))
            .header("content-type", "text/plain")
            .bearer_auth(KEY)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{path}");
    }
    let preflight = |origin: &'static str| {
        Client::new()
            .request(
                Method::OPTIONS,
                format!("{}/v1/chat/completions", daemon().url),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let ok = preflight("http://localhost:3000").await.unwrap();
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let bad = preflight("null").await.unwrap();
    assert_eq!(bad.status(), StatusCode::FORBIDDEN);
    assert!(bad.headers().get("access-control-allow-origin").is_none());
}

/// A body over the 8 MiB limit (a 50 MB inline image) is refused with a 413 in
/// the route's dialect, whether the client announced its length or streamed it
/// chunked, and the daemon goes on serving.
#[tokio::test]
async fn an_oversized_body_gets_a_413_in_the_clients_dialect() {
    let huge = format!(
        r#"{{"model": "smollm2-135m", "pad": "{}"}}"#,
        "A".repeat(mlxd::api::MAX_BODY + 1)
    );
    for path in ["/v1/chat/completions", "/v1/messages", "/api/chat"] {
        for chunked in [false, true] {
            let body = if chunked {
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge
                    .as_bytes()
                    .chunks(1 << 20)
                    .map(|c| Ok(c.to_vec()))
                    .collect();
                reqwest::Body::wrap_stream(futures::stream::iter(chunks))
            } else {
                reqwest::Body::from(huge.clone())
            };
            let resp = Client::new()
                .post(format!("{}{path}", daemon().url))
                .header("content-type", "application/json")
                .bearer_auth(KEY)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
            let v: serde_json::Value = resp.json().await.unwrap();
            let message = match path {
                "/v1/messages" => {
                    assert_eq!(v["type"], "error", "{v}");
                    assert_eq!(v["error"]["type"], "request_too_large", "{v}");
                    &v["error"]["message"]
                }
                "/api/chat" => &v["error"],
                _ => {
                    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
                    &v["error"]["message"]
                }
            };
            assert!(message.as_str().unwrap().contains("8 MiB"), "{v}");
        }
    }
    let ok = request("GET", "/healthz").send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[test]
fn binding_beyond_loopback_needs_a_key() {
    let out = common::mlxd()
        .args(["serve", "--host", "0.0.0.0", "--port", "0"])
        .env_remove("MLXD_API_KEY")
        .env("MLXD_HOME", home())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to bind 0.0.0.0 without an API key"),
        "{err}"
    );
}

/// A client that trickles its headers (slowloris) is cut off after the header-read
/// timeout, and so are a connection that never sends a byte and a keep-alive
/// connection left idle after a request.
#[test]
fn slow_header_silent_and_idle_keep_alive_connections_are_closed() {
    use std::io::{Read, Write};
    let addr = format!("127.0.0.1:{}", daemon().port);
    let limit = mlxd::serve::HEADER_READ_TIMEOUT + std::time::Duration::from_secs(5);
    let closed_within = |mut s: std::net::TcpStream| {
        s.set_read_timeout(Some(limit)).unwrap();
        let began = std::time::Instant::now();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return began.elapsed(),
                Ok(_) => continue, // a response to a finished request
                Err(e) => panic!("still open after {:?}: {e}", began.elapsed()),
            }
        }
    };
    let silent = std::net::TcpStream::connect(&addr).unwrap();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let took = closed_within(slow);
    assert!(took >= mlxd::serve::HEADER_READ_TIMEOUT - std::time::Duration::from_secs(1));
    // Opened together with the slow one: closed by now, or within the limit.
    closed_within(silent);
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    closed_within(idle);
}

/// The control plane is a 0600 Unix socket in the mlxd home: the CLI uses it with
/// no key, while the same admin routes over HTTP need one.
#[tokio::test]
async fn the_cli_uses_the_owner_only_control_socket() {
    use std::os::unix::fs::PermissionsExt;
    let d = daemon();
    let socket = home().join(format!("mlxd-{}.sock", d.port));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{socket:?} mode {mode:o}");
    let out = common::cli_ok(
        d.port,
        &["ps"],
        &[
            ("MLXD_HOME", Some(home().as_os_str())),
            ("MLXD_API_KEY", None),
        ],
    );
    assert!(out.contains("MODEL"));
    let status = request("GET", "/admin/ps").send().await.unwrap().status();
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "over HTTP the admin routes need the key"
    );
}

/// Past `max_connections` (here 2), a new connection is closed at once, and the
/// daemon serves again when one frees up.
#[test]
fn connections_beyond_the_cap_are_closed() {
    use std::io::{Read, Write};
    let d = spawn_daemon(&[("MLXD_MAX_CONNECTIONS", "2")]);
    let addr = format!("127.0.0.1:{}", d.port);
    // Two connections that hold their slots (headers not finished).
    let held: Vec<_> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    third
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut buf = [0u8; 64];
    let n = third.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the third connection was served: {:?}", &buf[..n]);
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut again = std::net::TcpStream::connect(&addr).unwrap();
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    again.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(d.shut_down().success());
}

/// Issue 28: other local users can read nothing of mlxd's home. The home was made
/// 0755 with a 0644 config (tightened at start); then the daemon, a worker and
/// its prompt cache's disk tier write logs, run files, the control socket and a
/// cache entry (whose header holds the prompt's tokens): every directory is 0700
/// and every file 0600.
#[tokio::test]
async fn nothing_under_the_home_is_readable_by_other_users() {
    let prompt = "The museum opens at nine and closes at six. ".repeat(40);
    let resp = Client::new()
        .post(format!("{}/v1/chat/completions", daemon().url))
        .bearer_auth(KEY)
        .json(&serde_json::json!({
            "model": "private-cache",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 2,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        resp.text().await.unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let entries = || {
        walk(&home())
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".safetensors"))
            .count()
    };
    while entries() == 0 {
        assert!(
            Instant::now() < deadline,
            "no prompt-cache entry was written"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut seen = std::collections::BTreeMap::new();
    for path in walk(&home()) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let kind = if meta.is_dir() {
            "dir"
        } else if meta.file_type().is_socket() {
            "socket"
        } else {
            "file"
        };
        let want = if meta.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(
            meta.mode() & 0o777,
            want,
            "{} ({kind}) is {:o}",
            path.display(),
            meta.mode() & 0o777
        );
        *seen.entry(kind).or_insert(0) += 1;
    }
    // What was looked at: the home, logs, run files, presets, the cache and its entry.
    assert!(seen["dir"] >= 4 && seen["file"] >= 5, "{seen:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => out.extend(walk(&path)),
            Ok(_) => out.push(path),
            Err(_) => {} // a temporary file gone meanwhile
        }
    }
    out
}
