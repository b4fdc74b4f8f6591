//! A preset's `[distributed]` table: one model split over several worker
//! processes (ranks) that run it together with MLX's own collectives, as one
//! model slot (issue 33; README "Several Macs").
//!
//! ```toml
//! [distributed]
//! hosts = ["self", "self", "self"]   # one entry per rank; rank 0 must be "self"
//! backend = "ring"                   # MLX's TCP ring (jaccl: RDMA over Thunderbolt 5)
//! parallel = "tensor"                # "tensor" | "pipeline" | "auto"
//! ```
//!
//! Rank 0 is the worker the daemon already talks to; the others follow its engine
//! step by step (python-worker/mlxd_worker/engines/lockstep.py). The ranks find
//! each other through a hostfile in the ring backend's format, written for each
//! incarnation, and the variables `mlx.launch` would set (`MLX_RANK`,
//! `MLX_HOSTFILE`): mlxd starts the ranks itself, so that they live and die as
//! one group under its supervision.
//!
//! The links carry tensors without authentication: an address that is not on a
//! private network (loopback, RFC 1918, link-local, IPv6 unique-local) is refused
//! unless the preset says `allow_public_link = true`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a `hosts` entry says for a rank on this daemon's machine.
pub const SELF_HOST: &str = "self";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// MLX's ring over TCP: always built, any network (and loopback).
    #[default]
    Ring,
    /// RDMA over Thunderbolt 5 (macOS 26.2+).
    Jaccl,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parallel {
    /// Every layer split over the ranks (mlx-lm's `shard()`).
    Tensor,
    /// Layers divided among the ranks (mlx-lm's `pipeline()`).
    Pipeline,
    /// Tensor parallel: every rank works on every token, where a pipeline's
    /// stages take turns on each one.
    #[default]
    Auto,
}

impl Parallel {
    /// What the worker is told to do (`--parallel`).
    pub fn resolved(self) -> &'static str {
        match self {
            Parallel::Tensor | Parallel::Auto => "tensor",
            Parallel::Pipeline => "pipeline",
        }
    }
}

/// A preset's `[distributed]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Distributed {
    /// One entry per rank: "self", or the name of a `[peers.NAME]` daemon; an
    /// entry repeats for several ranks on one host, as in an `mlx.launch` hostfile.
    pub hosts: Vec<String>,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub parallel: Parallel,
    /// The address each host's ranks listen on, by host ("self" or a peer's name);
    /// default: loopback, where every rank is on this machine.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub link: BTreeMap<String, String>,
    /// The first port of a host's ranks (rank r of that host listens on
    /// base_port + r); default: ports the system hands out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_port: Option<u16>,
    /// Lets a link address be a public interface (the links are unauthenticated).
    #[serde(default)]
    pub allow_public_link: bool,
}

impl Distributed {
    /// Checks the table on its own (peers are checked when the slot starts).
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.hosts.len() >= 2,
            "distributed.hosts needs at least two ranks (one entry per rank), not {}",
            self.hosts.len()
        );
        anyhow::ensure!(
            self.hosts[0] == SELF_HOST,
            "distributed.hosts[0] must be \"self\": rank 0 is the worker this daemon talks to"
        );
        for (host, addr) in &self.link {
            anyhow::ensure!(
                self.hosts.contains(host),
                "distributed.link names {host:?}, which is not in distributed.hosts"
            );
            let ip: IpAddr = addr.parse().map_err(|_| {
                anyhow::anyhow!("distributed.link.{host} must be an IP address, not {addr:?}")
            })?;
            anyhow::ensure!(
                self.allow_public_link || is_private(ip),
                "distributed.link.{host} = {addr} is not a private address: the ranks' links \
                 carry tensors without authentication, so bind them to a Thunderbolt bridge or \
                 another private interface (or set allow_public_link = true if this network is yours alone)"
            );
        }
        Ok(())
    }

    pub fn world_size(&self) -> usize {
        self.hosts.len()
    }

    /// Why this daemon cannot start the group yet (None: it can).
    pub fn unsupported(&self) -> Option<String> {
        if self.backend == Backend::Jaccl {
            return Some(
                "backend = \"jaccl\" is not served yet: use backend = \"ring\" (over a \
                 Thunderbolt bridge's addresses)"
                    .into(),
            );
        }
        if let Some(peer) = self.hosts.iter().find(|h| *h != SELF_HOST) {
            return Some(format!(
                "ranks on peers ({peer}) are not served yet: every entry of distributed.hosts \
                 must be \"self\""
            ));
        }
        None
    }

    /// The address this machine's ranks listen on.
    pub fn self_address(&self) -> &str {
        self.link
            .get(SELF_HOST)
            .map(String::as_str)
            .unwrap_or("127.0.0.1")
    }
}

/// Loopback, RFC 1918, link-local (a Thunderbolt bridge's 169.254/16), CGNAT's
/// shared space, and IPv6 unique-local and link-local addresses.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

/// One incarnation's ranks: where each listens, in the ring backend's hostfile
/// format (a JSON list, by rank, of each rank's addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostfile {
    pub addresses: Vec<String>,
}

impl Hostfile {
    /// Every rank on this machine: ports from `base_port` up, or free ones the
    /// system hands out now.
    pub fn local(d: &Distributed) -> std::io::Result<Hostfile> {
        let ip = d.self_address();
        let mut addresses = Vec::with_capacity(d.world_size());
        for rank in 0..d.world_size() {
            let port = match d.base_port {
                Some(base) => base.checked_add(rank as u16).ok_or_else(|| {
                    std::io::Error::other(format!("base_port {base} + rank {rank} is past 65535"))
                })?,
                None => free_port(ip)?,
            };
            addresses.push(if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            });
        }
        Ok(Hostfile { addresses })
    }

    pub fn json(&self) -> String {
        let ranks: Vec<Vec<&str>> = self.addresses.iter().map(|a| vec![a.as_str()]).collect();
        serde_json::to_string(&ranks).expect("strings serialize")
    }

    /// Writes the hostfile (owner-only) where the ranks read it.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;

        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.hostfile.json"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(self.json().as_bytes())?;
        Ok(path)
    }
}

/// A port nobody listens on now (the ring's ranks bind it a moment later; a
/// clash fails the load, and the slot's restart picks new ones).
fn free_port(ip: &str) -> std::io::Result<u16> {
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| std::io::Error::other(format!("not an IP address: {ip}")))?;
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> anyhow::Result<Distributed> {
        let d: Distributed = toml::from_str(text)?;
        d.validate()?;
        Ok(d)
    }

    #[test]
    fn a_local_group_parses_with_defaults() {
        let d = table("hosts = [\"self\", \"self\", \"self\"]").unwrap();
        assert_eq!(d.world_size(), 3);
        assert_eq!((d.backend, d.parallel), (Backend::Ring, Parallel::Auto));
        assert_eq!(d.parallel.resolved(), "tensor");
        assert!(d.unsupported().is_none());
        let h = Hostfile::local(&d).unwrap();
        assert_eq!(h.addresses.len(), 3);
        assert!(h.addresses.iter().all(|a| a.starts_with("127.0.0.1:")));
        let parsed: Vec<Vec<String>> = serde_json::from_str(&h.json()).unwrap();
        assert_eq!(parsed[2], vec![h.addresses[2].clone()]);
    }

    #[test]
    fn ports_follow_the_base_port() {
        let d = table("hosts = [\"self\", \"self\"]\nbase_port = 47000").unwrap();
        let h = Hostfile::local(&d).unwrap();
        assert_eq!(h.addresses, ["127.0.0.1:47000", "127.0.0.1:47001"]);
    }

    #[test]
    fn bad_tables_are_refused_with_the_reason() {
        for (text, why) in [
            ("hosts = [\"self\"]", "at least two ranks"),
            ("hosts = [\"mac2\", \"self\"]", "hosts[0] must be \"self\""),
            (
                "hosts = [\"self\", \"self\"]\n[link]\nself = \"8.8.8.8\"",
                "not a private address",
            ),
            (
                "hosts = [\"self\", \"self\"]\n[link]\nmac2 = \"10.0.0.2\"",
                "not in distributed.hosts",
            ),
            (
                "hosts = [\"self\", \"self\"]\n[link]\nself = \"thunderbolt0\"",
                "must be an IP address",
            ),
            (
                "hosts = [\"self\", \"self\"]\nbackend = \"mpi\"",
                "unknown variant",
            ),
            ("hosts = [\"self\", \"self\"]\nranks = 2", "unknown field"),
        ] {
            let err = format!("{:#}", table(text).unwrap_err());
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn a_public_link_needs_to_be_allowed() {
        let text =
            "hosts = [\"self\", \"self\"]\nallow_public_link = true\n[link]\nself = \"8.8.8.8\"";
        assert!(table(text).is_ok());
    }

    #[test]
    fn private_means_not_routable_from_the_internet() {
        for ip in [
            "127.0.0.1",
            "10.0.0.2",
            "172.16.5.1",
            "192.168.1.20",
            "169.254.10.1",
            "100.64.0.1",
            "::1",
            "fd00::2",
            "fe80::1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2001:db8::1"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn what_is_not_served_yet_says_so() {
        let jaccl = table("hosts = [\"self\", \"self\"]\nbackend = \"jaccl\"").unwrap();
        assert!(jaccl.unsupported().unwrap().contains("jaccl"));
        let pipeline = table("hosts = [\"self\", \"self\"]\nparallel = \"pipeline\"").unwrap();
        assert!(pipeline.unsupported().is_none());
        assert_eq!(pipeline.parallel.resolved(), "pipeline");
        let peer = table("hosts = [\"self\", \"mac2\"]").unwrap();
        assert!(peer.unsupported().unwrap().contains("mac2"));
    }
}
