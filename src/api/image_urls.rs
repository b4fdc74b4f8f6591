//! Image URLs fetched by the daemon: only from the hosts the operator listed in
//! `allowed_image_hosts`, never (through a "*." rule) from an address that is not
//! public, without redirects, within a size and a time limit. What comes back is
//! checked as an inline image is (src/api/images.rs) and joins the request as its
//! bytes in base64, so the worker never reaches the network.
//!
//! A name is resolved once, here, and the connection goes to the addresses that
//! were checked (the URL's host is the checked name, so no other lookup happens):
//! a DNS answer that changes between the check and the connection (rebinding)
//! cannot send it elsewhere.
//!
//! The fetched files of one request total at most what an inline request carries
//! (its 8 MiB body), so the frame to the worker is no larger than with inline
//! images; a few fetches run at once daemon-wide.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use reqwest::Url;

use super::images;
use crate::config::{canonical_host, ImageHostRule};
use crate::error::Error;

/// One fetch: connect, headers and body (resolving has its own 5 s before it).
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// All of one request's fetches.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The fetched files of one request together (what an inline request's body
/// carries once base64 is decoded).
pub const MAX_FETCHED_BYTES: usize = super::MAX_BODY / 4 * 3;
/// Fetches in flight at once, daemon-wide.
const CONCURRENT_FETCHES: usize = 8;

/// Whether a request's image is a URL still to fetch (its text; no image file
/// starts with "http": images.rs checked each file's signature).
pub fn is_pending(image: &[u8]) -> bool {
    image.starts_with(b"http://") || image.starts_with(b"https://")
}

#[derive(Debug)]
pub struct ImageFetcher {
    rules: Vec<ImageHostRule>,
    slots: tokio::sync::Semaphore,
}

impl ImageFetcher {
    /// The fetcher of the config's entries (validated when it loaded: an invalid one
    /// is skipped).
    pub fn new(allowed_hosts: &[String]) -> Self {
        ImageFetcher {
            rules: allowed_hosts
                .iter()
                .filter_map(|h| ImageHostRule::parse(h).ok())
                .collect(),
            slots: tokio::sync::Semaphore::new(CONCURRENT_FETCHES),
        }
    }

    /// Replaces every URL among the request's images by the fetched file, within
    /// the request's byte budget and deadline.
    pub async fn fetch_all(&self, images: &mut [Bytes], field: &str) -> Result<(), Error> {
        if !images.iter().any(|i| is_pending(i)) {
            return Ok(());
        }
        let fetches = async {
            let mut budget = MAX_FETCHED_BYTES;
            for image in images.iter_mut().filter(|i| is_pending(i)) {
                let _slot = self
                    .slots
                    .acquire()
                    .await
                    .map_err(|e| Error::Internal(format!("image fetch slots: {e}")))?;
                let url = String::from_utf8_lossy(image).into_owned();
                let body = self.fetch(&url, field, budget).await?;
                budget -= body.len();
                *image = Bytes::from(body);
            }
            Ok(())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fetches)
            .await
            .map_err(|_| {
                Error::invalid(
                    format!("fetching the request's images took over {REQUEST_TIMEOUT:?}"),
                    Some(field),
                )
            })?
    }

    /// The file at `url`, at most `budget` bytes.
    async fn fetch(&self, url: &str, field: &str, budget: usize) -> Result<Vec<u8>, Error> {
        let shown: String = url.chars().take(80).collect();
        let fail = |why: String| Error::invalid(format!("image URL {shown:?}: {why}"), Some(field));
        if self.rules.is_empty() {
            return Err(fail(
                "mlxd fetches image URLs only from hosts listed in allowed_image_hosts (config.toml); \
                 none is listed, so send the image inline as data:image/png;base64,..."
                    .into(),
            ));
        }
        let mut parsed = Url::parse(url).map_err(|e| fail(format!("not a valid URL ({e})")))?;
        let host = match parsed.host() {
            Some(h) => canonical_host(&h),
            None => return Err(fail("it names no host".into())),
        };
        let port = parsed.port_or_known_default().unwrap_or(80);
        let allowed: Vec<&ImageHostRule> = self
            .rules
            .iter()
            .filter(|r| r.allows(&host, port))
            .collect();
        if allowed.is_empty() {
            return Err(fail(format!(
                "host {host:?} (port {port}) is not in allowed_image_hosts"
            )));
        }
        let exact = allowed.iter().any(|r| !r.subdomains);
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
        if let Some(inner) = not_allowed(exact, &addrs) {
            return Err(fail(format!(
                "{host:?} resolves to {inner}, which is not a public address; list the host \
                 exactly in allowed_image_hosts to allow it"
            )));
        }
        // The connection asks for the checked name, which the client resolves to
        // the checked addresses only (a trailing dot would be another name to it).
        if matches!(parsed.host(), Some(url::Host::Domain(_))) {
            parsed
                .set_host(Some(&host))
                .map_err(|e| fail(format!("not a valid URL ({e})")))?;
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
        let too_large = || {
            Error::invalid(
                format!(
                    "the request's fetched images are larger than {} MiB together",
                    MAX_FETCHED_BYTES >> 20
                ),
                Some(field),
            )
        };
        if resp.content_length().is_some_and(|n| n > budget as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(describe(&e)))?;
            if body.len() + chunk.len() > budget {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        images::check_file(&body, field)?;
        Ok(body)
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

/// The first address a fetch may not connect to: none for a host listed exactly;
/// else any that is not public.
fn not_allowed(exact: bool, addrs: &[SocketAddr]) -> Option<IpAddr> {
    if exact {
        return None;
    }
    addrs.iter().map(SocketAddr::ip).find(|ip| !is_public(*ip))
}

/// Whether an address is on the public internet. IPv4: not loopback, private,
/// link-local, shared (CGNAT), benchmarking, documentation, IETF-reserved,
/// unspecified, broadcast, multicast or reserved. IPv6: global unicast (2000::/3)
/// only, less documentation, 6to4, Teredo and the NAT64 prefixes; an IPv4 address
/// inside IPv6 (mapped or compatible) is judged as IPv4.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4() {
                return is_public_v4(v4); // ::ffff:a.b.c.d and ::a.b.c.d
            }
            let s = v6.segments();
            let global_unicast = (s[0] & 0xe000) == 0x2000;
            let special = (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || s[0] == 0x2002 // 6to4
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
                || (s[0] == 0x0064 && s[1] == 0xff9b); // NAT64, well-known and local
            global_unicast && !special
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking (and fake-IP proxies)
        || (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)) // documentation
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
            "192.0.0.8",
            "198.18.0.1",
            "192.0.2.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2001:db8::1",
            "2001:0:4136:e378::1",
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

    #[test]
    fn a_wildcard_never_reaches_an_address_that_is_not_public() {
        let at = |ip: &str| vec![SocketAddr::new(ip.parse().unwrap(), 80)];
        assert_eq!(
            not_allowed(false, &at("127.0.0.1")),
            Some("127.0.0.1".parse().unwrap())
        );
        let mixed = [at("8.8.8.8"), at("10.0.0.1")].concat();
        assert!(
            not_allowed(false, &mixed).is_some(),
            "one private address is enough to refuse"
        );
        assert_eq!(not_allowed(false, &at("8.8.8.8")), None);
        assert_eq!(
            not_allowed(true, &at("127.0.0.1")),
            None,
            "a host listed exactly is trusted"
        );
    }

    fn refusal(fetcher: &ImageFetcher, url: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(fetcher.fetch(url, "messages", MAX_FETCHED_BYTES))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn hosts_not_listed_are_refused_before_any_lookup() {
        let none = ImageFetcher::new(&[]);
        assert!(refusal(&none, "http://127.0.0.1/x.png").contains("allowed_image_hosts"));
        let some = ImageFetcher::new(&[
            "images.example.com".into(),
            "*.cdn.example.org".into(),
            "10.0.0.5:8080".into(),
        ]);
        assert!(refusal(&some, "http://127.0.0.1/x.png").contains("not in allowed_image_hosts"));
        assert!(refusal(&some, "http://example.com/x.png").contains("not in allowed_image_hosts"));
        assert!(refusal(&some, "http://evilimages.example.com/x.png")
            .contains("not in allowed_image_hosts"));
        assert!(refusal(&some, "http://localhost/x.png").contains("not in allowed_image_hosts"));
        assert!(refusal(&some, "http://10.0.0.5:9090/x.png").contains("not in allowed_image_hosts"));
    }
}
