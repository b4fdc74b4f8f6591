//! Daemon configuration: `$MLXD_HOME/config.toml` (optional), then environment,
//! then command-line flags. Every field's doc comment is the reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::peers::{PeerConfig, PeerFile};

use crate::memory::{KvReserve, Limit};

/// Default port: clear of Ollama (11434), LM Studio (1234) and mlx_lm.server (8080).
pub const DEFAULT_PORT: u16 = 11411;

/// Connections served at once by default (`max_connections`); more are closed as
/// they arrive.
pub const MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to bind; loopback by default.
    pub host: Option<String>,
    /// Port to bind (env MLXD_PORT, flag --port override it).
    pub port: Option<u16>,
    /// Where imported models live (env MLXD_MODELS_DIR overrides).
    pub models_dir: Option<PathBuf>,
    /// Extra directories of preset TOML files, searched after the shipped ones.
    #[serde(default)]
    pub presets_dirs: Vec<PathBuf>,
    /// Python interpreter with mlx-lm installed (env MLXD_PYTHON overrides).
    pub python: Option<PathBuf>,
    /// Directory holding the `mlxd_worker` package (env MLXD_WORKER_DIR overrides).
    pub worker_dir: Option<PathBuf>,
    /// Models (preset names) that a request may load. Absent: any preset. Others
    /// are served only while `mlxd start` keeps them running.
    pub allow_models: Option<Vec<String>>,
    /// API keys; a request must carry one (`Authorization: Bearer KEY` or
    /// `x-api-key: KEY`) on every route but /healthz. Env MLXD_API_KEY adds one
    /// (comma-separated for several). Required to bind beyond loopback.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Host names requests may be addressed to, besides localhost, 127.0.0.1, ::1
    /// and the bound address (against DNS rebinding).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Origins (e.g. "http://localhost:3000") whose web pages may call the API;
    /// empty by default. "*", "null" and "file://" are refused.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Hosts whose http(s) image URLs the daemon fetches for a request: names
    /// ("images.example.com"), "*.example.com" for any subdomain, or addresses.
    /// Empty by default: only inline (data:) images are taken. A name that
    /// resolves to a loopback or private address is refused unless listed exactly
    /// (not through a "*."). Env MLXD_ALLOWED_IMAGE_HOSTS (comma-separated) adds.
    #[serde(default)]
    pub allowed_image_hosts: Vec<String>,
    /// HTTP connections served at once (1024 by default); more are closed as they
    /// arrive. Env MLXD_MAX_CONNECTIONS overrides.
    pub max_connections: Option<usize>,
    /// What all workers together may use: a share of physical memory ("90%", the
    /// default) or a size ("48GiB"). Env MLXD_MEMORY_CAP overrides.
    pub memory_cap: Option<String>,
    /// Above this total, new generation requests are refused (503) until memory
    /// falls ("95%" by default). Env MLXD_MEMORY_SHED overrides.
    pub memory_shed: Option<String>,
    /// The KV every model is guaranteed at load unless its preset says otherwise:
    /// tokens shared by its sequences (`65536`) or a size (`"8GiB"`). Default:
    /// 32,768 tokens, or the model's context if smaller.
    pub kv_reserve: Option<KvReserve>,
    /// Other mlxd daemons (`[peers.NAME]`: `url`, and the peer's API key from
    /// `key_env` or `key_file`): see peers.rs.
    #[serde(default)]
    pub peers: BTreeMap<String, PeerFile>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub home: PathBuf,
    pub host: String,
    pub port: u16,
    pub models_dir: PathBuf,
    /// Searched in order; a later directory's preset of the same name wins.
    pub presets_dirs: Vec<PathBuf>,
    pub python: PathBuf,
    pub worker_dir: PathBuf,
    /// See `FileConfig::allow_models`.
    pub allow_models: Option<Vec<String>>,
    /// See `FileConfig::api_keys` (with MLXD_API_KEY's).
    pub api_keys: Vec<String>,
    /// See `FileConfig::allowed_hosts`.
    pub allowed_hosts: Vec<String>,
    /// See `FileConfig::allowed_origins`.
    pub allowed_origins: Vec<String>,
    /// See `FileConfig::allowed_image_hosts`.
    pub allowed_image_hosts: Vec<String>,
    /// See `FileConfig::max_connections`.
    pub max_connections: usize,
    /// See `FileConfig::memory_cap`.
    pub memory_cap: Limit,
    /// See `FileConfig::memory_shed`.
    pub memory_shed: Limit,
    /// See `FileConfig::kv_reserve`.
    pub kv_reserve: Option<KvReserve>,
    /// See `FileConfig::peers`.
    pub peers: Vec<PeerConfig>,
}

/// The source tree this binary was built from: shipped presets, the worker
/// package and the project venv are found there unless configured otherwise.
fn source_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The presets shipped with the source tree (searched first: any other
/// directory's preset of the same name overrides one of these).
pub fn shipped_presets_dir() -> PathBuf {
    source_root().join("presets")
}

pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("MLXD_HOME") {
        return PathBuf::from(h);
    }
    let user_home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    user_home.join(".mlxd")
}

impl Config {
    /// Loads `$MLXD_HOME/config.toml` if present, then applies the environment.
    pub fn load() -> anyhow::Result<Config> {
        let home = home_dir();
        let path = home.join("config.toml");
        let file: FileConfig = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                // Not toml's own rendering: it quotes the offending line, which may
                // hold a secret (an API key written where it does not belong).
                let line = e
                    .span()
                    .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
                anyhow::anyhow!("{}: line {line}: {}", path.display(), e.message())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileConfig::default(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        Config::resolve(home, file, |k| std::env::var_os(k))
    }

    pub fn resolve(
        home: PathBuf,
        file: FileConfig,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> anyhow::Result<Config> {
        let port = match env("MLXD_PORT") {
            Some(p) => p
                .to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("MLXD_PORT={p:?} is not a port number"))?,
            None => file.port.unwrap_or(DEFAULT_PORT),
        };
        let models_dir = env("MLXD_MODELS_DIR")
            .map(PathBuf::from)
            .or(file.models_dir)
            .unwrap_or_else(|| home.join("models"));
        let mut presets_dirs = vec![shipped_presets_dir(), home.join("presets")];
        presets_dirs.extend(file.presets_dirs);
        let venv_python = source_root().join(".venv/bin/python");
        let python = env("MLXD_PYTHON")
            .map(PathBuf::from)
            .or(file.python)
            .unwrap_or_else(|| {
                if venv_python.exists() {
                    venv_python
                } else {
                    PathBuf::from("python3")
                }
            });
        let worker_dir = env("MLXD_WORKER_DIR")
            .map(PathBuf::from)
            .or(file.worker_dir)
            .unwrap_or_else(|| source_root().join("python-worker"));
        let limit = |key: &str, file: Option<String>, default: &str| -> anyhow::Result<Limit> {
            let text = env(key)
                .map(|v| v.to_string_lossy().into_owned())
                .or(file)
                .unwrap_or_else(|| default.to_string());
            Limit::parse(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))
        };
        let memory_cap = limit("MLXD_MEMORY_CAP", file.memory_cap, "90%")?;
        let memory_shed = limit("MLXD_MEMORY_SHED", file.memory_shed, "95%")?;
        // A comma-separated list in the environment, added to the file's.
        let listed = |key: &str, mut list: Vec<String>| {
            if let Some(v) = env(key) {
                let v = v.to_string_lossy();
                list.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
            list
        };
        let api_keys = listed("MLXD_API_KEY", file.api_keys);
        anyhow::ensure!(
            api_keys.iter().all(|k| k.len() >= 8),
            "API keys must be at least 8 characters"
        );
        for origin in &file.allowed_origins {
            let o = origin.trim().to_ascii_lowercase();
            anyhow::ensure!(
                o != "*" && o != "null" && !o.starts_with("file:") && o.contains("://"),
                "allowed_origins: {origin:?} is not allowed (name each origin, e.g. \"http://localhost:3000\")"
            );
        }
        let allowed_image_hosts = listed("MLXD_ALLOWED_IMAGE_HOSTS", file.allowed_image_hosts);
        validate_image_hosts(&allowed_image_hosts)
            .map_err(|e| anyhow::anyhow!("allowed_image_hosts: {e}"))?;
        let max_connections = match env("MLXD_MAX_CONNECTIONS") {
            Some(v) => v
                .to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("MLXD_MAX_CONNECTIONS={v:?} is not a number"))?,
            None => file.max_connections.unwrap_or(MAX_CONNECTIONS),
        };
        anyhow::ensure!(max_connections > 0, "max_connections must be positive");
        let peers = PeerConfig::resolve_all(file.peers, &home)?;
        Ok(Config {
            peers,
            max_connections,
            api_keys,
            allowed_hosts: file.allowed_hosts,
            allowed_origins: file.allowed_origins,
            allowed_image_hosts,
            memory_cap,
            memory_shed,
            kv_reserve: file.kv_reserve,
            host: file.host.unwrap_or_else(|| "127.0.0.1".into()),
            port,
            models_dir,
            presets_dirs,
            python,
            worker_dir,
            allow_models: file.allow_models,
            home,
        })
    }

    /// Whether a request may load model `name` (`allow_models`).
    pub fn may_start(&self, name: &str) -> bool {
        self.allow_models
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == name))
    }

    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

/// The control socket of the daemon on `port`: `$MLXD_HOME/mlxd.sock` for the
/// default port, `mlxd-<port>.sock` for others (so daemons on other ports, such
/// as test daemons, never share one).
pub fn control_socket(home: &Path, port: u16) -> PathBuf {
    if port == DEFAULT_PORT {
        home.join("mlxd.sock")
    } else {
        home.join(format!("mlxd-{port}.sock"))
    }
}

/// True if `p` exists and is a directory holding an mlx-lm model.
pub fn is_model_dir(p: &Path) -> bool {
    p.join("config.json").is_file()
}

/// One entry of `allowed_image_hosts`: a host, and its port if the entry names one
/// (else any).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageHostRule {
    pub host: String,
    /// "*.example.com": any subdomain, at public addresses only; else the host
    /// exactly, trusted wherever it resolves.
    pub subdomains: bool,
    pub port: Option<u16>,
}

impl ImageHostRule {
    /// "images.example.com", "*.example.com", "10.0.0.5", "[::1]", any with ":port".
    pub fn parse(entry: &str) -> Result<ImageHostRule, String> {
        let e = entry.trim().to_ascii_lowercase();
        let bad = || format!("{entry:?} is not a host name, address or host:port");
        let (subdomains, rest) = match e.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, e.as_str()),
        };
        if rest.is_empty() || rest.contains(['*', '/', '@', '?', '#']) {
            return Err(bad());
        }
        // The URL parser checks the host (and normalizes an address) as it would
        // in a request's URL.
        let url = url::Url::parse(&format!("http://{rest}/")).map_err(|_| bad())?;
        let host = url.host().map(|h| canonical_host(&h)).ok_or_else(bad)?;
        if subdomains && !host.contains('.') {
            // "*.com" would allow a whole top-level domain.
            return Err(format!(
                "{entry:?}: a \"*.\" entry needs a domain with a dot"
            ));
        }
        Ok(ImageHostRule {
            host,
            subdomains,
            port: url.port(),
        })
    }

    pub fn allows(&self, host: &str, port: u16) -> bool {
        let name = if self.subdomains {
            host.strip_suffix(self.host.as_str())
                .is_some_and(|p| p.ends_with('.'))
        } else {
            host == self.host
        };
        name && self.port.is_none_or(|p| p == port)
    }
}

/// A URL host as rules hold it: lowercase, no trailing dot, an address in its
/// canonical form (IPv6 without brackets).
pub fn canonical_host(host: &url::Host<&str>) -> String {
    match host {
        url::Host::Domain(d) => d.trim_end_matches('.').to_ascii_lowercase(),
        url::Host::Ipv4(a) => a.to_string(),
        url::Host::Ipv6(a) => a.to_string(),
    }
}

/// Checks `allowed_image_hosts` entries (a bad one fails the config's load).
pub fn validate_image_hosts(allowed_hosts: &[String]) -> Result<(), String> {
    allowed_hosts
        .iter()
        .try_for_each(|h| ImageHostRule::parse(h).map(drop))
}

#[cfg(test)]
mod tests {
    #[test]
    fn entries_parse_and_bad_ones_are_named() {
        let rule = |e: &str| ImageHostRule::parse(e).unwrap();
        assert_eq!(
            rule("Images.Example.com."),
            ImageHostRule {
                host: "images.example.com".into(),
                subdomains: false,
                port: None
            }
        );
        assert_eq!(rule("*.cdn.example.com:8443").port, Some(8443));
        assert_eq!(rule("[::1]").host, "::1");
        assert!(rule("*.example.com").allows("a.b.example.com", 443));
        assert!(!rule("*.example.com").allows("example.com", 443));
        assert!(!rule("*.example.com").allows("evilexample.com", 443));
        assert!(!rule("host:8080").allows("host", 80));
        for bad in [
            "*",
            "*.com",
            "https://host",
            "host/path",
            "user@host",
            "a*.b.com",
            "",
        ] {
            assert!(ImageHostRule::parse(bad).is_err(), "{bad}");
        }
        assert!(validate_image_hosts(&["ok.example.com".into(), "https://x".into()]).is_err());
    }

    use super::*;

    #[test]
    fn env_beats_file_beats_default() {
        let file: FileConfig = toml::from_str("port = 9000\nmodels_dir = \"/m\"").unwrap();
        let c = Config::resolve("/h".into(), file.clone(), |_| None).unwrap();
        assert_eq!((c.port, c.models_dir.as_path()), (9000, Path::new("/m")));
        let c = Config::resolve("/h".into(), file, |k| {
            (k == "MLXD_PORT").then(|| "9100".into())
        })
        .unwrap();
        assert_eq!(c.port, 9100);
        let c = Config::resolve("/h".into(), FileConfig::default(), |_| None).unwrap();
        assert_eq!((c.port, c.host.as_str()), (DEFAULT_PORT, "127.0.0.1"));
        assert_eq!(c.models_dir, Path::new("/h/models"));
        assert!(Config::resolve("/h".into(), FileConfig::default(), |_| Some("x".into())).is_err());
        assert!(
            toml::from_str::<FileConfig>("prot = 1").is_err(),
            "typos are refused"
        );
        assert!(c.may_start("anything"), "no allow-list: every preset");
        let file: FileConfig = toml::from_str("allow_models = [\"a\"]").unwrap();
        let c = Config::resolve("/h".into(), file, |_| None).unwrap();
        assert!(c.may_start("a") && !c.may_start("b"));
        assert_eq!(c.memory_cap, Limit::Fraction(0.9));
        assert_eq!(c.memory_shed, Limit::Fraction(0.95));
        let file: FileConfig = toml::from_str("memory_cap = \"48GiB\"").unwrap();
        let c = Config::resolve("/h".into(), file, |k| {
            (k == "MLXD_MEMORY_SHED").then(|| "80%".into())
        })
        .unwrap();
        assert_eq!(
            (c.memory_cap, c.memory_shed),
            (Limit::Bytes(48 << 30), Limit::Fraction(0.8))
        );
        let bad: FileConfig = toml::from_str("memory_cap = \"lots\"").unwrap();
        assert!(Config::resolve("/h".into(), bad, |_| None).is_err());
        let c = Config::resolve("/h".into(), FileConfig::default(), |k| {
            (k == "MLXD_API_KEY").then(|| "first-key, second-key".into())
        })
        .unwrap();
        assert_eq!(c.api_keys, ["first-key", "second-key"]);
        for origins in ["[\"*\"]", "[\"null\"]", "[\"file://\"]"] {
            let f: FileConfig = toml::from_str(&format!("allowed_origins = {origins}")).unwrap();
            assert!(
                Config::resolve("/h".into(), f, |_| None).is_err(),
                "{origins}"
            );
        }
    }
}
