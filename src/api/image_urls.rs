//! Image URLs fetched by the daemon: only from the hosts the operator listed in
//! `allowed_image_hosts`, never (through a "*." rule) from a loopback or private
//! address, without redirects, within a size and a time limit. What comes back is
//! checked as an inline image is (src/api/images.rs) and joins the request as its
//! bytes in base64, so the worker never reaches the network.
//!
//! A name is resolved once, here, and the connection goes to the addresses that
//! were checked: a DNS answer that changes between the check and the connection
//! (rebinding) cannot send it elsewhere.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use reqwest::Url;

use super::images::{self, MAX_IMAGE_BYTES};
use crate::error::Error;

/// A whole fetch (resolve, connect, headers and body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether an image string of a request is a URL still to fetch (base64 has no ':').
pub fn is_pending(image: &str) -> bool {
    image.starts_with("http://") || image.starts_with("https://")
}

/// One entry of `allowed_image_hosts`.
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    /// A host named exactly (a name or an address): trusted wherever it resolves.
    Exact(String),
    /// "*.example.com": any subdomain, at public addresses only.
    Subdomains(String),
}

#[derive(Debug, Clone, Default)]
pub struct ImageFetcher {
    rules: Vec<Rule>,
}

impl ImageFetcher {
    pub fn new(allowed_hosts: &[String]) -> Self {
        let rules = allowed_hosts
            .iter()
            .map(|h| {
                let h = h.trim().trim_end_matches('.').to_ascii_lowercase();
                match h.strip_prefix("*.") {
                    Some(domain) => Rule::Subdomains(domain.to_string()),
                    None => {
                        Rule::Exact(h.trim_start_matches('[').trim_end_matches(']').to_string())
                    }
                }
            })
            .collect();
        ImageFetcher { rules }
    }

    /// Replaces every URL among the request's images by the fetched file's base64.
    pub async fn fetch_all(&self, images: &mut [String], field: &str) -> Result<(), Error> {
        for image in images.iter_mut().filter(|i| is_pending(i)) {
            *image = self.fetch(image, field).await?;
        }
        Ok(())
    }

    async fn fetch(&self, url: &str, field: &str) -> Result<String, Error> {
        let shown: String = url.chars().take(80).collect();
        let fail = |why: String| Error::invalid(format!("image URL {shown:?}: {why}"), Some(field));
        if self.rules.is_empty() {
            return Err(fail(
                "mlxd fetches image URLs only from hosts listed in allowed_image_hosts (config.toml); \
                 none is listed, so send the image inline as data:image/png;base64,..."
                    .into(),
            ));
        }
        let parsed = Url::parse(url).map_err(|e| fail(format!("not a valid URL ({e})")))?;
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => d.trim_end_matches('.').to_ascii_lowercase(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err(fail("it names no host".into())),
        };
        let exact = self.rules.contains(&Rule::Exact(host.clone()));
        let by_domain = self.rules.iter().any(|r| {
            matches!(r, Rule::Subdomains(d) if host.strip_suffix(d.as_str()).is_some_and(|p| p.ends_with('.')))
        });
        if !exact && !by_domain {
            return Err(fail(format!("host {host:?} is not in allowed_image_hosts")));
        }
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| fail(format!("resolving {host:?} took over {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| fail(format!("{host:?} does not resolve ({e})")))?
        .collect();
        if addrs.is_empty() {
            return Err(fail(format!("{host:?} resolves to no address")));
        }
        if !exact {
            if let Some(inner) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(fail(format!(
                    "{host:?} resolves to {}, a loopback or private address; list the host \
                     exactly in allowed_image_hosts to allow it",
                    inner.ip()
                )));
            }
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .resolve_to_addrs(&host, &addrs)
            .build()
            .map_err(|e| Error::Internal(format!("image fetch client: {e}")))?;
        let resp = client
            .get(parsed)
            .send()
            .await
            .map_err(|e| fail(describe(&e)))?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(fail(format!(
                "the server answered {status} (redirects are not followed)"
            )));
        }
        if !status.is_success() {
            return Err(fail(format!("the server answered {status}")));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_IMAGE_BYTES as u64)
        {
            return Err(images::too_large(field));
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(describe(&e)))?;
            if body.len() + chunk.len() > MAX_IMAGE_BYTES {
                return Err(images::too_large(field));
            }
            body.extend_from_slice(&chunk);
        }
        images::check_file(&body, field)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(&body))
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("fetching it took over {FETCH_TIMEOUT:?}")
    } else if e.is_connect() {
        "the host refused or did not answer the connection".into()
    } else {
        format!("fetching it failed ({e})")
    }
}

/// Whether an address is on the public internet: not loopback, private, link-local,
/// shared (CGNAT), unspecified, broadcast, multicast or reserved; an IPv4 address
/// inside IPv6 (mapped or NAT64) is judged as IPv4.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || v6 == Ipv6Addr::from(0u128))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "100.128.0.1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    fn refusal(fetcher: &ImageFetcher, url: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(fetcher.fetch(url, "messages"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn hosts_not_listed_and_private_addresses_behind_a_wildcard_are_refused() {
        let none = ImageFetcher::new(&[]);
        assert!(refusal(&none, "http://127.0.0.1/x.png").contains("allowed_image_hosts"));
        let some = ImageFetcher::new(&["images.example.com".into(), "*.localhost".into()]);
        assert!(refusal(&some, "http://127.0.0.1/x.png").contains("not in allowed_image_hosts"));
        assert!(refusal(&some, "http://example.com/x.png").contains("not in allowed_image_hosts"));
        assert!(refusal(&some, "http://evilimages.example.com/x.png")
            .contains("not in allowed_image_hosts"));
        // "localhost" itself is not a subdomain of it; a subdomain resolves (if at
        // all) to loopback, which a wildcard never reaches.
        assert!(refusal(&some, "http://localhost/x.png").contains("not in allowed_image_hosts"));
        let sub = refusal(&some, "http://img.localhost:9/x.png");
        assert!(
            sub.contains("loopback or private") || sub.contains("resolve"),
            "{sub}"
        );
    }
}
