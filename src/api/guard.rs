//! The gate every request passes before any route: the Host allow-list (DNS
//! rebinding), the Origin allow-list (cross-site requests from web pages), JSON-only
//! POST bodies (a `text/plain` form post needs no CORS preflight), and API keys,
//! denied by default on every route but `/healthz`. It wraps the whole router, so a
//! route added later cannot be left outside it.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::Dialect;
use super::MAX_BODY;

/// The one route open without a key: liveness checks carry none.
pub const PUBLIC_PATH: &str = "/healthz";

/// The status page's routes, which also take the key as HTTP Basic credentials
/// (any user name, the key as the password): a browser asks for those itself and
/// sends them with the page's own EventSource, which cannot set a header. Only
/// here: Basic credentials are sent by the browser unasked once given, so the
/// routes that act (generation, admin) keep to explicit headers.
pub const UI_PATH: &str = "/ui";

fn is_ui(path: &str) -> bool {
    path == UI_PATH || path.starts_with("/ui/")
}

pub struct Guard {
    /// Host names (without port) requests may be addressed to.
    hosts: Vec<String>,
    /// Origins (scheme://host[:port]) whose pages may call us.
    origins: Vec<String>,
    /// Accepted API keys; empty: no key needed (loopback only).
    keys: Vec<String>,
}

impl Guard {
    /// `bound`: the address the daemon listens on (allowed as a Host too).
    pub fn new(
        bound: IpAddr,
        extra_hosts: &[String],
        origins: &[String],
        keys: &[String],
    ) -> Guard {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !bound.is_unspecified() {
            hosts.push(bound.to_string());
        }
        hosts.extend(extra_hosts.iter().map(|h| h.to_ascii_lowercase()));
        Guard {
            hosts,
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            keys: keys.to_vec(),
        }
    }

    fn host_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get(header::HOST) else {
            return true; // HTTP/1.0 without Host: no browser sends that
        };
        let Ok(host) = host.to_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        // "[::1]:8080" → "::1"; "localhost:11411" → "localhost"
        let name = if let Some(rest) = host.strip_prefix('[') {
            rest.split(']').next().unwrap_or_default()
        } else {
            host.rsplit_once(':').map_or(host.as_str(), |(h, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    h
                } else {
                    host.as_str()
                }
            })
        };
        self.hosts.iter().any(|h| h == name)
    }

    /// None: no Origin header (not a browser's cross-site call). Some(ok).
    fn origin_allowed(&self, headers: &HeaderMap) -> Option<bool> {
        let origin = headers.get(header::ORIGIN)?;
        let origin = origin.to_str().unwrap_or_default().to_ascii_lowercase();
        Some(self.origins.contains(&origin))
    }

    /// `basic`: Basic credentials count too (the status page's routes).
    fn key_ok(&self, headers: &HeaderMap, basic: bool) -> bool {
        if self.keys.is_empty() {
            return true;
        }
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let bearer = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|k| k.as_bytes().to_vec());
        let x_api_key = headers.get("x-api-key").map(|v| v.as_bytes().to_vec());
        let basic_password = authorization.filter(|_| basic).and_then(basic_password);
        let Some(given) = bearer.or(x_api_key).or(basic_password) else {
            return false;
        };
        // Every key is compared in full, in constant time: how long a comparison
        // takes says nothing about how much of a key was right.
        self.keys.iter().fold(false, |found, key| {
            found | bool::from(key.as_bytes().ct_eq(&given))
        })
    }
}

/// The password of `Basic base64(user:password)`; the user name is ignored.
fn basic_password(authorization: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let (scheme, encoded) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// A refusal in the error shape of the dialect the path belongs to.
fn deny(path: &str, status: StatusCode, code: &str, message: &str) -> Response {
    let dialect = Dialect::of_path(path);
    dialect.response(status, dialect.body(status, code, message, None))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// Ollama's own documentation posts JSON with `curl -d` (a form Content-Type), and
/// some of its clients send none: on Ollama's routes such a body is read as JSON
/// when the request has no Origin and no browser fetch metadata but `none` (a
/// browser always sends an Origin with a cross-site POST, and current ones mark
/// every request a page makes with `Sec-Fetch-Site`), so a web page still cannot
/// reach them with a form.
fn ollama_plain_body(path: &str, headers: &HeaderMap) -> bool {
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase());
    let plain = match kind.as_deref() {
        None => true,
        Some(t) => t == "application/x-www-form-urlencoded" || t == "text/plain",
    };
    // `none`: the user typed the address; a page's request says where it came from.
    let from_page = headers
        .get("sec-fetch-site")
        .is_some_and(|site| site.as_bytes() != b"none");
    path.starts_with("/api/") && plain && !headers.contains_key(header::ORIGIN) && !from_page
}

pub async fn check(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let deny = |status, code, message| deny(&path, status, code, message);
    let headers = req.headers();
    if !guard.host_allowed(headers) {
        return deny(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            "this Host is not one mlxd answers to (add it to allowed_hosts in the config)",
        );
    }
    let origin = headers.get(header::ORIGIN).cloned();
    match guard.origin_allowed(headers) {
        Some(false) => {
            return deny(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "cross-origin requests from this Origin are not allowed (add it to allowed_origins in the config)",
            )
        }
        Some(true) if req.method() == Method::OPTIONS => {
            return with_cors(StatusCode::NO_CONTENT.into_response(), origin, true);
        }
        _ => {}
    }
    if req.method() == Method::POST && !is_json(headers) && !ollama_plain_body(&path, headers) {
        return deny(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies must be JSON (Content-Type: application/json)",
        );
    }
    if req.uri().path().starts_with("/admin/") && guard.keys.is_empty() {
        return deny(
            StatusCode::FORBIDDEN,
            "control_plane_on_socket",
            "the admin routes are on the control socket (~/.mlxd/mlxd.sock, which the mlxd CLI uses); over HTTP they need an API key",
        );
    }
    let ui = is_ui(&path);
    if path != PUBLIC_PATH && !guard.key_ok(headers, ui) {
        let mut resp = deny(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            if ui {
                "a valid API key is needed (the browser asks: any user name, the key as the password)"
            } else {
                "a valid API key is needed (Authorization: Bearer KEY, or x-api-key: KEY)"
            },
        );
        // On the status page the browser's own login prompt; elsewhere Bearer.
        let challenge = if ui {
            r#"Basic realm="mlxd", charset="UTF-8""#
        } else {
            "Bearer"
        };
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        return resp;
    }
    let resp = next.run(req).await;
    with_cors(body_limit_in_dialect(&path, resp), origin, false)
}

/// axum refuses a body over [`MAX_BODY`] with a plain-text 413 before any
/// handler runs; clients parse errors in their own dialect's shape.
fn body_limit_in_dialect(path: &str, resp: Response) -> Response {
    if resp.status() != StatusCode::PAYLOAD_TOO_LARGE || is_json(resp.headers()) {
        return resp;
    }
    let message = format!(
        "the request body is over {} MiB, the most mlxd accepts (send large images by URL from allowed_image_hosts)",
        MAX_BODY >> 20
    );
    deny(
        path,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        &message,
    )
}

/// Allowed cross-origin callers get the CORS headers (checked above).
fn with_cors(mut resp: Response<Body>, origin: Option<HeaderValue>, preflight: bool) -> Response {
    if let Some(origin) = origin {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, x-api-key"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hosts_origins_and_keys() {
        let g = Guard::new(
            "127.0.0.1".parse().unwrap(),
            &["mybox.local".into()],
            &["http://localhost:3000".into()],
            &["sekret".into(), "other".into()],
        );
        for ok in [
            "localhost:11411",
            "127.0.0.1",
            "[::1]:8080",
            "MyBox.local:1",
        ] {
            assert!(g.host_allowed(&headers(&[("host", ok)])), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:11411",
            "127.0.0.1.evil.example",
            "localhost.evil",
        ] {
            assert!(!g.host_allowed(&headers(&[("host", bad)])), "{bad}");
        }
        assert_eq!(g.origin_allowed(&headers(&[])), None);
        assert_eq!(
            g.origin_allowed(&headers(&[("origin", "http://localhost:3000")])),
            Some(true)
        );
        for bad in [
            "null",
            "file://",
            "https://evil.example",
            "http://localhost:3001",
        ] {
            assert_eq!(
                g.origin_allowed(&headers(&[("origin", bad)])),
                Some(false),
                "{bad}"
            );
        }
        assert!(g.key_ok(&headers(&[("authorization", "Bearer sekret")]), false));
        assert!(g.key_ok(&headers(&[("x-api-key", "other")]), false));
        assert!(!g.key_ok(&headers(&[("authorization", "Bearer sekre")]), false));
        assert!(!g.key_ok(&headers(&[("authorization", "sekret")]), false));
        assert!(!g.key_ok(&headers(&[]), false));
        // Basic: "anyone:sekret", "anyone:sekre", ":other", "sekret" (no colon).
        let basic = |b64: &str| headers(&[("authorization", &format!("Basic {b64}"))]);
        assert!(g.key_ok(&basic("YW55b25lOnNla3JldA=="), true));
        assert!(g.key_ok(&basic("Om90aGVy"), true));
        assert!(!g.key_ok(&basic("YW55b25lOnNla3Jl"), true));
        assert!(!g.key_ok(&basic("c2VrcmV0"), true));
        assert!(!g.key_ok(&basic("not base64!"), true));
        assert!(
            !g.key_ok(&basic("YW55b25lOnNla3JldA=="), false),
            "Basic only where it is allowed"
        );
        let open = Guard::new("127.0.0.1".parse().unwrap(), &[], &[], &[]);
        assert!(
            open.key_ok(&headers(&[]), false),
            "no keys configured: none needed"
        );
        assert!(is_ui("/ui") && is_ui("/ui/events"));
        assert!(!is_ui("/uix") && !is_ui("/v1/ui"));
    }

    #[test]
    fn only_json_bodies() {
        assert!(is_json(&headers(&[("content-type", "application/json")])));
        assert!(is_json(&headers(&[(
            "content-type",
            "Application/JSON; charset=utf-8"
        )])));
        assert!(!is_json(&headers(&[("content-type", "text/plain")])));
        assert!(!is_json(&headers(&[])));
    }

    #[test]
    fn ollama_routes_read_plain_bodies_only_without_an_origin() {
        let form = ("content-type", "application/x-www-form-urlencoded");
        assert!(ollama_plain_body("/api/chat", &headers(&[])));
        assert!(ollama_plain_body("/api/generate", &headers(&[form])));
        // A web page's cross-site form post carries its Origin.
        let site = ("origin", "http://evil.example");
        assert!(!ollama_plain_body("/api/chat", &headers(&[form, site])));
        for from in ["same-origin", "same-site", "cross-site"] {
            let fetch = ("sec-fetch-site", from);
            assert!(!ollama_plain_body("/api/chat", &headers(&[form, fetch])));
        }
        let typed = ("sec-fetch-site", "none");
        assert!(ollama_plain_body("/api/chat", &headers(&[form, typed])));
        assert!(!ollama_plain_body(
            "/v1/chat/completions",
            &headers(&[form])
        ));
        assert!(!ollama_plain_body(
            "/api/chat",
            &headers(&[("content-type", "multipart/form-data")])
        ));
    }
}
