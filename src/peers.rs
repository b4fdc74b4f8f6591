//! Peers: other mlxd daemons named in `config.toml` (`[peers.NAME]`), reached over
//! their authenticated HTTP API, never a protocol of ours
//! (docs/design/ARCHITECTURE.md "Growing past one machine"). The daemon asks each
//! one every few seconds whether it answers, which version it runs and which
//! models it serves; `mlxd ps`, `/admin/ps` and `/ui` show it. Routing to peers'
//! models and slots spanning hosts build on this.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often each peer is asked how it is.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// A peer that has not answered a call in this long is down (for that call).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Polls in a row a peer must miss before the requests forwarded to it are ended
/// (one slow answer is not a lost peer; a stopped or unplugged one misses them all).
pub const LOST_AFTER_MISSES: u32 = 2;

/// A peer as `config.toml` names it. Its API key comes from an environment
/// variable or a file, never from the config itself (which may be shared or
/// committed): a `key = "..."` entry is refused as an unknown field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    /// The peer daemon's base URL (`http://10.0.0.2:11411`).
    pub url: String,
    /// The environment variable that holds the peer's API key.
    pub key_env: Option<String>,
    /// A file that holds the peer's API key (relative paths: under MLXD_HOME).
    pub key_file: Option<PathBuf>,
}

/// A peer, resolved: its URL checked and where its key is. The key itself is read
/// only by the daemon that watches it (`Peers::new`): the CLI loads the same config
/// without the daemon's environment.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    pub name: String,
    pub url: url::Url,
    pub key: KeySource,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    Env(String),
    /// Resolved against MLXD_HOME.
    File(PathBuf),
}

/// A peer with its key read (kept out of Debug output, logs and errors).
struct Resolved {
    config: PeerConfig,
    key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerConfigError {
    #[error("peers.{0}: url {1:?} is not an http:// or https:// URL")]
    Url(String, String),
    #[error("peers.{0}: give its API key with key_env or key_file (one of them)")]
    Key(String),
    #[error("peers.{0}: key_env {1} is not set or empty")]
    KeyEnv(String, String),
    #[error("peers.{0}: key_file {1}: {2}")]
    KeyFile(String, PathBuf, String),
    #[error("peers: no HTTP client: {0}")]
    Client(String),
}

impl PeerConfig {
    /// The config's `[peers]` table, key files resolved against `home`.
    pub fn resolve_all(
        files: BTreeMap<String, PeerFile>,
        home: &Path,
    ) -> Result<Vec<PeerConfig>, PeerConfigError> {
        files
            .into_iter()
            .map(|(name, file)| PeerConfig::resolve(name, file, home))
            .collect()
    }

    fn resolve(name: String, file: PeerFile, home: &Path) -> Result<PeerConfig, PeerConfigError> {
        let url = url::Url::parse(&file.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| PeerConfigError::Url(name.clone(), file.url.clone()))?;
        let key = match (file.key_env, file.key_file) {
            (Some(var), None) => KeySource::Env(var),
            (None, Some(path)) => KeySource::File(home.join(path)),
            _ => return Err(PeerConfigError::Key(name)),
        };
        Ok(PeerConfig { name, url, key })
    }

    /// The peer's API key, from its variable in `env` or its file.
    pub fn read_key(
        &self,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<String, PeerConfigError> {
        let name = self.name.clone();
        match &self.key {
            KeySource::Env(var) => env(var)
                .map(|v| v.to_string_lossy().trim().to_string())
                .filter(|k| !k.is_empty())
                .ok_or_else(|| PeerConfigError::KeyEnv(name, var.clone())),
            KeySource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    PeerConfigError::KeyFile(name.clone(), path.clone(), e.to_string())
                })?;
                let key = text.trim().to_string();
                if key.is_empty() {
                    return Err(PeerConfigError::KeyFile(name, path.clone(), "empty".into()));
                }
                Ok(key)
            }
        }
    }

    /// `path` under the peer's base URL.
    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url.as_str().trim_end_matches('/'))
    }
}

/// What `/admin/ps` and `/ui` say of a peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerInfo {
    pub name: String,
    pub url: String,
    /// `up`, `down` (no answer, or not an mlxd), `unauthorized` (it refused the
    /// key), or `unknown` (not asked yet).
    pub state: String,
    /// Its mlxd version, once it answered.
    pub version: Option<String>,
    /// The models it serves (its `/v1/models`), once it answered.
    pub models: Vec<String>,
    /// Why it is not up.
    pub error: Option<String>,
    /// Seconds since it last answered (None: never).
    pub last_seen_s: Option<f64>,
}

#[derive(Debug, Default)]
struct Status {
    state: Option<&'static str>,
    version: Option<String>,
    models: Vec<String>,
    error: Option<String>,
    last_seen: Option<Instant>,
    /// Polls missed in a row.
    misses: u32,
}

struct Peer {
    peer: Resolved,
    status: Mutex<Status>,
    /// Woken when the peer has missed LOST_AFTER_MISSES polls: the requests
    /// forwarded to it end with an error instead of waiting on a silent peer.
    lost: Arc<tokio::sync::Notify>,
}

/// The configured peers and what was last heard from each.
pub struct Peers {
    peers: Vec<Peer>,
    /// Forwarded requests (no overall timeout: a stream lasts as long as it lasts).
    forward: reqwest::Client,
}

/// Where a request for a model this daemon does not serve goes.
pub enum Route<'a> {
    /// To this peer, which serves it and answers.
    Peer(PeerHandle<'a>),
    /// The peer that served it last is not up now: a 503 saying so.
    Unavailable { peer: String, why: String },
}

/// A peer to forward to: its base URL and key.
pub struct PeerHandle<'a> {
    peer: &'a Resolved,
    pub client: &'a reqwest::Client,
    /// Notified when the peer is lost (LOST_AFTER_MISSES): a forwarded request
    /// waiting on it ends.
    pub lost: Arc<tokio::sync::Notify>,
}

impl PeerHandle<'_> {
    pub fn name(&self) -> &str {
        &self.peer.config.name
    }

    /// `path` (with its query) under the peer's base URL.
    pub fn url(&self, path_and_query: &str) -> String {
        self.peer.config.endpoint(path_and_query)
    }

    pub fn key(&self) -> &str {
        &self.peer.key
    }
}

/// One poll's outcome for a peer.
enum Heard {
    Up {
        version: String,
        models: Vec<String>,
    },
    Unauthorized(String),
    Down(String),
}

impl Peers {
    /// The configured peers with their keys read from `env` or their files: a key
    /// that cannot be read stops the daemon's start with the reason.
    pub fn new(
        configs: &[PeerConfig],
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Arc<Peers>, PeerConfigError> {
        let peers = configs
            .iter()
            .map(|config| {
                Ok(Peer {
                    peer: Resolved {
                        key: config.read_key(&env)?,
                        config: config.clone(),
                    },
                    status: Mutex::new(Status::default()),
                    lost: Arc::new(tokio::sync::Notify::new()),
                })
            })
            .collect::<Result<_, PeerConfigError>>()?;
        let forward = reqwest::Client::builder()
            .connect_timeout(CALL_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| PeerConfigError::Client(e.to_string()))?;
        Ok(Arc::new(Peers { peers, forward }))
    }

    /// Models the peers listed when last heard that `local` does not serve, each
    /// with the first peer that lists it: (model, peer, peer's URL).
    pub fn remote_models(&self, local: impl Fn(&str) -> bool) -> Vec<(String, String, String)> {
        let mut out: Vec<(String, String, String)> = Vec::new();
        for p in &self.peers {
            let s = p.status.lock().expect("lock");
            for m in &s.models {
                if !local(m) && !out.iter().any(|(seen, _, _)| seen == m) {
                    out.push((
                        m.clone(),
                        p.peer.config.name.clone(),
                        p.peer.config.url.to_string(),
                    ));
                }
            }
        }
        out
    }

    /// The peer that serves `model` (by its `/v1/models` when last heard), if any.
    pub fn route(&self, model: &str) -> Option<Route<'_>> {
        // One look at each peer's status: whether it lists the model and whether
        // it is up are read together.
        self.peers.iter().find_map(|peer| {
            let s = peer.status.lock().expect("lock");
            if !s.models.iter().any(|m| m == model) {
                return None;
            }
            Some(if s.state == Some("up") {
                Route::Peer(PeerHandle {
                    peer: &peer.peer,
                    client: &self.forward,
                    lost: peer.lost.clone(),
                })
            } else {
                Route::Unavailable {
                    peer: peer.peer.config.name.clone(),
                    why: s.error.clone().unwrap_or_else(|| "not up".into()),
                }
            })
        })
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn snapshot(&self) -> Vec<PeerInfo> {
        self.peers
            .iter()
            .map(|p| {
                let s = p.status.lock().expect("lock");
                PeerInfo {
                    name: p.peer.config.name.clone(),
                    url: p.peer.config.url.to_string(),
                    state: s.state.unwrap_or("unknown").to_string(),
                    version: s.version.clone(),
                    models: s.models.clone(),
                    error: s.error.clone(),
                    last_seen_s: s.last_seen.map(|t| t.elapsed().as_secs_f64()),
                }
            })
            .collect()
    }

    /// Asks every peer now and then every POLL_INTERVAL, for as long as the
    /// daemon runs.
    pub fn spawn_watch(self: &Arc<Self>) -> anyhow::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        // No proxy from the environment: peers are on the local network.
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .no_proxy()
            .build()?;
        let peers = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let polls = peers.peers.iter().map(|p| async {
                    let heard = ask(&client, &p.peer).await;
                    p.record(heard);
                });
                futures::future::join_all(polls).await;
            }
        });
        Ok(())
    }
}

impl Peer {
    fn record(&self, heard: Heard) {
        let mut s = self.status.lock().expect("lock");
        let was = s.state;
        match heard {
            Heard::Up { version, models } => {
                s.misses = 0;
                s.state = Some("up");
                s.version = Some(version);
                s.models = models;
                s.error = None;
                s.last_seen = Some(Instant::now());
            }
            Heard::Unauthorized(why) => {
                s.misses = 0;
                s.state = Some("unauthorized");
                s.error = Some(why);
                s.models.clear(); // nothing it serves can be reached with this key
                s.last_seen = Some(Instant::now());
            }
            Heard::Down(why) => {
                s.state = Some("down");
                s.error = Some(why);
                s.misses += 1;
                if s.misses == LOST_AFTER_MISSES {
                    self.lost.notify_waiters();
                }
            }
        }
        if was != s.state {
            let name = &self.peer.config.name;
            match s.state {
                Some("up") => tracing::info!(peer = %name, "peer up"),
                _ => tracing::warn!(peer = %name, state = s.state.unwrap_or("unknown"),
                    error = s.error.as_deref().unwrap_or(""), "peer not up"),
            }
        }
    }
}

/// One look at a peer: its models (which needs the key) and its version.
async fn ask(client: &reqwest::Client, peer: &Resolved) -> Heard {
    let models = match get(client, peer, "/v1/models").await {
        Ok(v) => v,
        Err(heard) => return heard,
    };
    let Some(data) = models["data"].as_array() else {
        return Heard::Down("its /v1/models is not a model list: is it an mlxd daemon?".into());
    };
    // Its own models only: those it lists from its peers (`mlxd.peer`) are theirs
    // to answer (and two daemons that name each other would pass them back and forth).
    let models = data
        .iter()
        .filter(|m| m["mlxd"]["peer"].is_null())
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    let version = match get(client, peer, "/api/version").await {
        Ok(v) => match v["mlxd"].as_str() {
            Some(version) => version.to_owned(),
            None => return Heard::Down("it answers, but not as an mlxd daemon".into()),
        },
        Err(heard) => return heard,
    };
    Heard::Up { version, models }
}

async fn get(
    client: &reqwest::Client,
    peer: &Resolved,
    path: &str,
) -> Result<serde_json::Value, Heard> {
    let resp = client
        .get(peer.config.endpoint(path))
        .bearer_auth(&peer.key)
        .send()
        .await
        .map_err(|e| Heard::Down(unreachable_reason(&e)))?;
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(Heard::Unauthorized(format!(
            "it refused the key ({status}): check key_env or key_file"
        )));
    }
    if !status.is_success() {
        return Err(Heard::Down(format!("{path} answered {status}")));
    }
    resp.json()
        .await
        .map_err(|e| Heard::Down(format!("{path}: not JSON: {e}")))
}

/// A failed call in a few words (reqwest's own error names the URL and its chain).
fn unreachable_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("no answer within {} s", CALL_TIMEOUT.as_secs())
    } else if e.is_connect() {
        "connection refused or no route".into()
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toml_text: &str) -> BTreeMap<String, PeerFile> {
        #[derive(Deserialize)]
        struct Wrapper {
            peers: BTreeMap<String, PeerFile>,
        }
        toml::from_str::<Wrapper>(toml_text).unwrap().peers
    }

    fn env(var: &str) -> Option<std::ffi::OsString> {
        (var == "STUDIO_KEY").then(|| " secret-key-1 \n".into())
    }

    #[test]
    fn a_peer_takes_its_key_from_the_environment_or_a_file() {
        let home = std::env::temp_dir().join(format!("mlxd-peers-{}", std::process::id()));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("studio2.key"), "secret-key-2\n").unwrap();
        let peers = PeerConfig::resolve_all(
            file(
                "[peers.one]\nurl = \"http://10.0.0.2:11411\"\nkey_env = \"STUDIO_KEY\"\n\
                 [peers.two]\nurl = \"http://10.0.0.3:11411/\"\nkey_file = \"studio2.key\"\n",
            ),
            &home,
        )
        .unwrap();
        assert_eq!(peers[0].read_key(env).unwrap(), "secret-key-1");
        assert_eq!(peers[1].read_key(env).unwrap(), "secret-key-2");
        assert_eq!(
            peers[1].endpoint("/v1/models"),
            "http://10.0.0.3:11411/v1/models"
        );
        assert!(Peers::new(&peers, env).is_ok());
        std::fs::remove_dir_all(home).unwrap();
    }

    #[test]
    fn a_peer_without_a_usable_key_or_url_is_refused_with_the_reason() {
        let home = Path::new("/nonexistent");
        let err = |text: &str| match PeerConfig::resolve_all(file(text), home) {
            Err(e) => e.to_string(),
            Ok(peers) => Peers::new(&peers, env).err().unwrap().to_string(),
        };
        assert!(err("[peers.a]\nurl = \"http://h:1\"\n").contains("key_env or key_file"));
        assert!(err("[peers.a]\nurl = \"http://h:1\"\nkey_env = \"NOPE\"\n")
            .contains("NOPE is not set"));
        assert!(
            err("[peers.a]\nurl = \"http://h:1\"\nkey_file = \"k\"\n").contains("/nonexistent/k")
        );
        assert!(
            err("[peers.a]\nurl = \"ftp://h\"\nkey_env = \"STUDIO_KEY\"\n").contains("not an http")
        );
        let both = "[peers.a]\nurl = \"http://h:1\"\nkey_env = \"STUDIO_KEY\"\nkey_file = \"k\"\n";
        assert!(err(both).contains("one of them"));
        // The key itself in the config is not a field at all.
        let inline =
            toml::from_str::<toml::Table>("[peers.a]\nurl = \"http://h:1\"\nkey = \"x\"\n")
                .unwrap();
        let parsed: Result<BTreeMap<String, PeerFile>, _> = inline["peers"].clone().try_into();
        assert!(parsed
            .unwrap_err()
            .to_string()
            .contains("unknown field `key`"));
    }
}
