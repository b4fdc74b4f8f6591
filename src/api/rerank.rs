//! `POST /v1/rerank` and `/rerank`: documents ordered by their relevance to a query,
//! in the shape Jina, Cohere and llama-server share (`results` of `index` and
//! `relevance_score`, best first). The scores come from the model's worker: a
//! cross-encoder's relevance of each (query, document) pair, or an embedding
//! model's cosine of their vectors. Errors are OpenAI-shaped.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::core;
use super::error::ApiError;
use super::request::{self, FieldRule, Target};
use super::AppState;
use crate::error::Error;

#[derive(Deserialize)]
struct RerankRequest {
    model: String,
    query: String,
    documents: Vec<Document>,
    #[serde(default)]
    top_n: Option<usize>,
    #[serde(default)]
    return_documents: Option<bool>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

/// A document as a string, or Jina's and Cohere's `{"text": ...}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    fn text(&self) -> &str {
        match self {
            Document::Text(t) | Document::Object { text: t } => t,
        }
    }
}

const RERANK_FIELDS: &[(&str, FieldRule)] = &[
    ("model", FieldRule::Served),
    ("query", FieldRule::Served),
    ("documents", FieldRule::Served),
    ("top_n", FieldRule::Served),
    ("return_documents", FieldRule::Served),
    ("keep_alive", FieldRule::Served),
    ("user", FieldRule::Ignored),
];

pub async fn rerank(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let (target, req): (Target, RerankRequest) =
        request::parse_checked(&state, &body, &[RERANK_FIELDS])?;
    if req.query.is_empty() {
        return Err(Error::invalid("query must not be empty", Some("query")).into());
    }
    if req.top_n == Some(0) {
        return Err(Error::invalid("top_n must be at least 1", Some("top_n")).into());
    }
    let texts: Vec<String> = req.documents.iter().map(|d| d.text().to_owned()).collect();
    let mut embed =
        request::embed_frame(request::EmbedInput::Texts(texts), true, None, "documents")?;
    embed.query = Some(req.query);
    let out = core::embed(&state, target, embed, &req.keep_alive).await?;
    if out.scores.len() != req.documents.len() {
        return Err(Error::Internal(format!(
            "the worker scored {} of {} documents",
            out.scores.len(),
            req.documents.len()
        ))
        .into());
    }
    let mut order: Vec<usize> = (0..out.scores.len()).collect();
    order.sort_by(|&a, &b| out.scores[b].total_cmp(&out.scores[a]).then(a.cmp(&b)));
    order.truncate(req.top_n.unwrap_or(order.len()));
    let with_documents = req.return_documents.unwrap_or(true);
    let results = order
        .into_iter()
        .map(|i| RankedDocument {
            index: i,
            relevance_score: out.scores[i],
            document: with_documents.then(|| Text {
                text: req.documents[i].text().to_owned(),
            }),
        })
        .collect();
    Ok(axum::Json(Reranked {
        id: core::new_id("rerank"),
        model: req.model,
        results,
        usage: Usage {
            prompt_tokens: out.prompt_tokens,
            total_tokens: out.prompt_tokens,
        },
    })
    .into_response())
}

// Typed, not a `json!` tree: scores written as the f32 they are.
#[derive(Serialize)]
struct Reranked {
    id: String,
    model: String,
    results: Vec<RankedDocument>,
    usage: Usage,
}

#[derive(Serialize)]
struct RankedDocument {
    index: usize,
    relevance_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    document: Option<Text>,
}

#[derive(Serialize)]
struct Text {
    text: String,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    total_tokens: u32,
}
