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

/// The one route open without a key: liveness checks carry none.
pub const PUBLIC_PATH: &str = "/healthz";

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

    fn key_ok(&self, headers: &HeaderMap) -> bool {
        if self.keys.is_empty() {
            return true;
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        let Some(given) = bearer.or(x_api_key) else {
            return false;
        };
        // Every key is compared in full, in constant time: how long a comparison
        // takes says nothing about how much of a key was right.
        self.keys.iter().fold(false, |found, key| {
            found | bool::from(key.as_bytes().ct_eq(given.as_bytes()))
        })
    }
}

/// A refusal in the error shape of the dialect the path belongs to.
fn deny(path: &str, status: StatusCode, code: &str, message: &str) -> Response {
    let body = if path.starts_with("/v1/messages") {
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            _ => "invalid_request_error",
        };
        serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
    } else if path.starts_with("/api/") {
        serde_json::json!({"error": message})
    } else {
        serde_json::json!({"error": {
            "message": message, "type": "invalid_request_error", "param": null, "code": code,
        }})
    };
    (status, axum::Json(body)).into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
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
    if req.method() == Method::POST && !is_json(headers) {
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
    if req.uri().path() != PUBLIC_PATH && !guard.key_ok(headers) {
        let mut resp = deny(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "a valid API key is needed (Authorization: Bearer KEY, or x-api-key: KEY)",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let resp = next.run(req).await;
    with_cors(resp, origin, false)
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
        assert!(g.key_ok(&headers(&[("authorization", "Bearer sekret")])));
        assert!(g.key_ok(&headers(&[("x-api-key", "other")])));
        assert!(!g.key_ok(&headers(&[("authorization", "Bearer sekre")])));
        assert!(!g.key_ok(&headers(&[("authorization", "sekret")])));
        assert!(!g.key_ok(&headers(&[])));
        let open = Guard::new("127.0.0.1".parse().unwrap(), &[], &[], &[]);
        assert!(
            open.key_ok(&headers(&[])),
            "no keys configured: none needed"
        );
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
}
