//! Errors as each dialect's clients read them: one status, the same
//! `Retry-After` on every 503, and a body in the dialect's own shape. The three
//! shapes stand side by side in [`Dialect::body`]; handlers return
//! [`ApiError<D>`], whose `D` names the shape, and the guard renders its refusals
//! through the same function, so no dialect's errors can drift from another's.

use std::marker::PhantomData;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::error::Error;

/// Whose error shape a response takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error": {"message", "type", "param", "code"}}` (also /admin and /ui).
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`.
    Anthropic,
    /// `{"error": "message"}`.
    Ollama,
}

/// Seconds a client should wait before retrying a 503 (queue full, memory
/// pressure, a worker restarting).
const RETRY_AFTER_SECONDS: &str = "1";

impl Dialect {
    /// The dialect of a route, for refusals made before any handler runs.
    pub fn of_path(path: &str) -> Dialect {
        if path.starts_with("/v1/messages") {
            Dialect::Anthropic
        } else if path.starts_with("/api/") {
            Dialect::Ollama
        } else {
            Dialect::OpenAi
        }
    }

    /// An error's body in this dialect's shape.
    pub fn body(self, status: StatusCode, code: &str, message: &str, param: Option<&str>) -> Value {
        match self {
            Dialect::OpenAi => {
                let kind = if status.is_client_error() {
                    "invalid_request_error"
                } else {
                    "server_error"
                };
                json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
            }
            Dialect::Anthropic => {
                let kind = match status {
                    StatusCode::UNAUTHORIZED => "authentication_error",
                    StatusCode::FORBIDDEN => "permission_error",
                    StatusCode::NOT_FOUND => "not_found_error",
                    StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
                    StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
                    s if s.is_client_error() => "invalid_request_error",
                    _ => "api_error",
                };
                json!({"type": "error", "error": {"type": kind, "message": message}})
            }
            Dialect::Ollama => json!({ "error": message }),
        }
    }

    /// The daemon's error in this dialect (the body of a response, or of an
    /// in-stream error event).
    pub fn error_body(self, e: &Error) -> Value {
        let message = match (self, e) {
            // Ollama's wording, which its clients match on.
            (Dialect::Ollama, Error::ModelNotFound(m)) => format!("model '{m}' not found"),
            _ => e.to_string(),
        };
        self.body(e.status(), e.code(), &message, e.param())
    }

    /// A whole error response: status, body, and `Retry-After` on a 503.
    pub fn response(self, status: StatusCode, body: Value) -> Response {
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        resp
    }
}

/// Names a dialect at the type level, so a handler's `?` renders in its shape.
pub trait Shape {
    const DIALECT: Dialect;
}

/// OpenAI's shape (chat, completions, responses, models, admin).
pub struct AsOpenAi;
/// Anthropic's shape (messages, count_tokens).
pub struct AsAnthropic;
/// Ollama's shape (/api/*).
pub struct AsOllama;

impl Shape for AsOpenAi {
    const DIALECT: Dialect = Dialect::OpenAi;
}
impl Shape for AsAnthropic {
    const DIALECT: Dialect = Dialect::Anthropic;
}
impl Shape for AsOllama {
    const DIALECT: Dialect = Dialect::Ollama;
}

/// A handler's error, rendered in dialect `D`'s shape.
pub struct ApiError<D: Shape = AsOpenAi>(pub Error, PhantomData<D>);

pub type AnthropicError = ApiError<AsAnthropic>;
pub type OllamaError = ApiError<AsOllama>;

impl<D: Shape> From<Error> for ApiError<D> {
    fn from(e: Error) -> Self {
        ApiError(e, PhantomData)
    }
}

impl<D: Shape> IntoResponse for ApiError<D> {
    fn into_response(self) -> Response {
        D::DIALECT.response(self.0.status(), D::DIALECT.error_body(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overloaded() -> Error {
        Error::Overloaded {
            model: "m".into(),
            queued: 3,
        }
    }

    /// Issue 25: Ollama's 503s carried no Retry-After while the others did.
    #[test]
    fn every_dialect_sends_retry_after_with_a_503() {
        for d in [Dialect::OpenAi, Dialect::Anthropic, Dialect::Ollama] {
            let resp = d.response(StatusCode::SERVICE_UNAVAILABLE, d.error_body(&overloaded()));
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()[header::RETRY_AFTER], "1", "{d:?}");
            let resp = d.response(
                StatusCode::BAD_REQUEST,
                d.error_body(&Error::invalid("x", None)),
            );
            assert!(resp.headers().get(header::RETRY_AFTER).is_none(), "{d:?}");
        }
    }

    #[test]
    fn the_shapes_side_by_side() {
        let e = Error::ModelNotFound("nope".into());
        assert_eq!(
            Dialect::OpenAi.error_body(&e),
            json!({"error": {"message": "the model 'nope' does not exist",
                "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})
        );
        assert_eq!(
            Dialect::Anthropic.error_body(&e),
            json!({"type": "error", "error": {"type": "not_found_error",
                "message": "the model 'nope' does not exist"}})
        );
        assert_eq!(
            Dialect::Ollama.error_body(&e),
            json!({"error": "model 'nope' not found"})
        );
        assert_eq!(
            Dialect::Anthropic.error_body(&overloaded())["error"]["type"],
            "overloaded_error"
        );
        let failed = Error::WorkerFailed {
            model: "m".into(),
            reason: "exit 70".into(),
        };
        assert_eq!(
            Dialect::OpenAi.error_body(&failed)["error"]["type"],
            "server_error"
        );
        assert_eq!(
            Dialect::Anthropic.error_body(&failed)["error"]["type"],
            "api_error"
        );
    }

    #[test]
    fn routes_map_to_their_dialect() {
        assert_eq!(
            Dialect::of_path("/v1/messages/count_tokens"),
            Dialect::Anthropic
        );
        assert_eq!(Dialect::of_path("/api/chat"), Dialect::Ollama);
        assert_eq!(Dialect::of_path("/v1/chat/completions"), Dialect::OpenAi);
        assert_eq!(Dialect::of_path("/admin/ps"), Dialect::OpenAi);
    }
}
