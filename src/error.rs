//! The daemon's error type. Every error carries its source, which decides the
//! HTTP status; `api/` renders it in each client's dialect in one place.

use axum::http::StatusCode;

/// Who is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The request is wrong: 4xx.
    Client,
    /// A worker failed or is unavailable: 502/503.
    Worker,
    /// The daemon itself failed: 500.
    Daemon,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The prompt fills the model's context (the message in Anthropic's wording,
    /// which clients match to compact a conversation).
    #[error("{0}")]
    ContextOverflow(String),
    #[error("the model '{0}' does not exist")]
    ModelNotFound(String),
    #[error("worker for '{model}' is unavailable: {reason}")]
    WorkerUnavailable { model: String, reason: String },
    #[error("worker for '{model}' failed: {reason}")]
    WorkerFailed { model: String, reason: String },
    #[error("'{0}' is not running, and allow_models does not let requests start it (start it with `mlxd start {0}`)")]
    NotAllowed(String),
    #[error("'{model}' is at capacity: {queued} requests are already waiting; retry shortly")]
    Overloaded { model: String, queued: usize },
    #[error(
        "memory is above the shed mark: '{0}' takes no new requests until it falls; retry shortly"
    )]
    MemoryPressure(String),
    /// The request's KV cache (prompt + max_tokens) could never fit the model's
    /// share of memory, even alone: the message names the tokens and bytes.
    #[error("{0}")]
    KvTooLarge(String),
    /// An allocation failed inside a model step (the worker recovered; the
    /// sequences that needed the memory end with this).
    #[error("{0}")]
    OutOfMemory(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Error {
        Error::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    pub fn source_of(&self) -> Source {
        match self {
            Error::InvalidRequest { .. }
            | Error::ContextOverflow(_)
            | Error::ModelNotFound(_)
            | Error::NotAllowed(_)
            | Error::KvTooLarge(_) => Source::Client,
            Error::WorkerUnavailable { .. }
            | Error::WorkerFailed { .. }
            | Error::Overloaded { .. }
            | Error::MemoryPressure(_)
            | Error::OutOfMemory(_) => Source::Worker,
            Error::Internal(_) => Source::Daemon,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest { .. } | Error::ContextOverflow(_) | Error::KvTooLarge(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Error::NotAllowed(_) => StatusCode::FORBIDDEN,
            Error::WorkerUnavailable { .. }
            | Error::Overloaded { .. }
            | Error::MemoryPressure(_)
            | Error::OutOfMemory(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::WorkerFailed { .. } => StatusCode::BAD_GATEWAY,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A machine-readable code (OpenAI's `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. } => "invalid_request",
            // OpenAI's code, which its clients match.
            Error::ContextOverflow(_) => "context_length_exceeded",
            Error::ModelNotFound(_) => "model_not_found",
            Error::NotAllowed(_) => "model_not_allowed",
            Error::WorkerUnavailable { .. } => "worker_unavailable",
            Error::WorkerFailed { .. } => "worker_failed",
            Error::Overloaded { .. } => "model_overloaded",
            Error::MemoryPressure(_) => "memory_pressure",
            Error::KvTooLarge(_) => "kv_cache_too_large",
            Error::OutOfMemory(_) => "out_of_memory",
            Error::Internal(_) => "internal_error",
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            Error::InvalidRequest { param, .. } => param.as_deref(),
            Error::ModelNotFound(_) | Error::NotAllowed(_) => Some("model"),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
