//! The one core every dialect serves through (docs/design/ARCHITECTURE.md, "Dialects
//! translate; one core serves"). A dialect parses its request into a
//! [`CoreRequest`] and renders the core's events — text, tool calls, logprobs,
//! the end, an error — through a [`Renderer`] of its own. Starting a generation,
//! waiting for its first event, collecting a whole answer, stream framing (SSE or
//! NDJSON), coalescing for slow clients and cancel-on-disconnect live here, once.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use serde_json::{json, Value};
use worker_protocol::frame::{
    Done, DraftCounts, Embed, EmbeddingsFrame, Generate, TokenLogprob, ToolCallFrame,
};

use super::request::Target;
use super::AppState;
use crate::error::Error;
use crate::metrics::{Outcome, RequestTimer};
use crate::presets::{EngineKind, KeepAlive, TransportKind};
use crate::supervisor::{token_text, GenEvent, GenStream};

/// What every dialect asks the core for.
pub struct CoreRequest {
    /// The model, resolved once by the dialect.
    pub target: Target,
    pub gen: Generate,
    pub keep_alive: Option<KeepAlive>,
}

/// A generation whose worker has answered: its first event is in hand (after
/// the admission's, which does not count as an answer).
pub struct Started {
    stream: GenStream,
    /// Events already taken from the stream, in order.
    first: VecDeque<GenEvent>,
    /// Dropped with the response: a client that goes away is timed as cancelled.
    timer: RequestTimer,
}

/// Starts a generation and waits for its first event. Nothing reaches the client
/// before that: a request refused, or one whose worker dies before starting it,
/// still gets a plain HTTP error status in the client's dialect.
///
/// Every dialect's generation passes here, so request latency and TTFT are timed
/// here, once: from now (the request parsed and its model known) to its end.
pub async fn start(state: &AppState, req: CoreRequest) -> Result<Started, Error> {
    // Labelled by the preset's name, not the client's string (an alias, or a
    // name that does not exist, which the target refused): bounded label values.
    let mut timer = RequestTimer::start(&req.target.preset.name);
    match first_event(state, req).await {
        Ok((stream, first)) => {
            if first.iter().any(is_output) {
                timer.output();
            }
            Ok(Started {
                stream,
                first,
                timer,
            })
        }
        Err(e) => {
            timer.finish(Outcome::of(&e));
            Err(e)
        }
    }
}

/// Asks the model's worker for a generation and waits for its first event past
/// the admission (a worker that dies while prefilling has answered nothing: the
/// request moves to the next one, or fails with a plain status).
async fn first_event(
    state: &AppState,
    mut req: CoreRequest,
) -> Result<(GenStream, VecDeque<GenEvent>), Error> {
    let engine = req
        .target
        .preset
        .worker_engine(state.supervisor.models_dir());
    if !req.gen.images.is_empty() && engine != EngineKind::Vision {
        return Err(Error::invalid(
            format!(
                "'{}' takes no images (its config has no vision tower)",
                req.target.requested
            ),
            Some("messages"),
        ));
    }
    if engine == EngineKind::Embedding {
        return Err(Error::invalid(
            format!(
                "'{}' is an embedding model: it answers /v1/embeddings and /api/embed, not \
                 generation requests",
                req.target.requested
            ),
            Some("model"),
        ));
    }
    if req.target.preset.transport == TransportKind::Http {
        return Err(Error::invalid(
            format!(
                "'{}' runs on the http transport, which serves only plain OpenAI requests \
                 (no tools, output formats, logprobs or other dialects)",
                req.target.requested
            ),
            Some("model"),
        ));
    }
    // Last before the worker: a request refused anyway fetches nothing.
    state
        .image_urls
        .fetch_all(&mut req.gen.images, "messages")
        .await?;
    let mut stream = state
        .supervisor
        .generate(&req.target.preset, req.gen, req.keep_alive)?;
    let mut taken = VecDeque::new();
    loop {
        match stream.next().await {
            Some(GenEvent::Error(e)) => return Err(e),
            // A request moved to a new worker is admitted again: the newest
            // admission (its prompt cache) is the one that counts.
            Some(ev @ GenEvent::Admitted { .. }) => {
                taken.clear();
                taken.push_back(ev);
            }
            Some(ev) => {
                taken.push_back(ev);
                return Ok((stream, taken));
            }
            None => return Err(Error::Internal("generation ended without a result".into())),
        }
    }
}

/// An event that is the answer's output (what TTFT waits for).
fn is_output(ev: &GenEvent) -> bool {
    matches!(ev, GenEvent::Token { .. } | GenEvent::ToolCall(_))
}

impl Started {
    async fn next(&mut self) -> Option<GenEvent> {
        let ev = match self.first.pop_front() {
            Some(ev) => Some(ev),
            None => self.stream.next().await,
        };
        self.observe(ev.as_ref());
        ev
    }

    /// An event already waiting, if any (for coalescing).
    fn try_next(&mut self) -> Option<GenEvent> {
        let ev = self.first.pop_front().or_else(|| self.stream.try_next());
        if ev.is_some() {
            self.observe(ev.as_ref());
        }
        ev
    }

    /// Times every event taken (None: the stream ended without an end).
    fn observe(&mut self, ev: Option<&GenEvent>) {
        let timer = &mut self.timer;
        match ev {
            Some(ev) if is_output(ev) => timer.output(),
            Some(GenEvent::Done(_)) => timer.finish(Outcome::Ok),
            Some(GenEvent::Error(e)) => timer.finish(Outcome::of(e)),
            Some(_) => {}
            None => timer.finish(Outcome::DaemonError),
        }
    }
}

/// A whole answer, for clients that did not ask to stream.
pub struct Collected {
    pub text: String,
    /// A reasoning model's thinking, apart from the answer.
    pub reasoning: String,
    pub tool_calls: Vec<ToolCallFrame>,
    pub logprobs: Vec<TokenLogprob>,
    pub done: Done,
}

pub async fn collect(mut started: Started) -> Result<Collected, Error> {
    let (mut text, mut tool_calls, mut logprobs) = (String::new(), Vec::new(), Vec::new());
    let mut reasoning = String::new();
    while let Some(ev) = started.next().await {
        match ev {
            GenEvent::Token {
                text: t,
                reasoning: true,
                ..
            } => reasoning.push_str(token_text(&t)),
            GenEvent::Token { text: t, .. } => text.push_str(token_text(&t)),
            GenEvent::ToolCall(call) => tool_calls.push(call),
            GenEvent::Logprobs(mut entries) => logprobs.append(&mut entries),
            GenEvent::Admitted { .. } => {}
            GenEvent::Done(done) => {
                return Ok(Collected {
                    text,
                    reasoning,
                    tool_calls,
                    logprobs,
                    done,
                })
            }
            GenEvent::Error(e) => return Err(e),
            GenEvent::Embeddings(_) => return Err(not_a_generation()),
        }
    }
    Err(Error::Internal("generation ended without a result".into()))
}

/// One vector per input, in order, as the worker sent them (base64 of
/// little-endian f32: OpenAI's `encoding_format: "base64"`).
pub struct Embedded {
    pub vectors: Vec<String>,
    /// A rerank's answer instead: each input's relevance to the query, in order.
    pub scores: Vec<f32>,
    pub prompt_tokens: u32,
    /// From the request's arrival to its answer.
    pub seconds: f64,
}

impl Embedded {
    /// The vectors as numbers (OpenAI's float format, Ollama's).
    pub fn floats(&self) -> Result<Vec<Vec<f32>>, Error> {
        use base64::Engine as _;
        self.vectors
            .iter()
            .map(|v| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|e| Error::Internal(format!("the worker sent a bad vector: {e}")))?;
                Ok(bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            })
            .collect()
    }
}

/// Asks the model's worker for the vectors (or a rerank's scores) of `embed`'s
/// inputs; `keep_alive` as the request wrote it. A model that is not an embedding
/// model is the client's mistake (400), said before any load.
pub async fn embed(
    state: &AppState,
    target: Target,
    embed: Embed,
    keep_alive: &Option<serde_json::Value>,
) -> Result<Embedded, Error> {
    let keep_alive = super::request::keep_alive(keep_alive)?;
    let preset = &target.preset;
    if preset.transport == TransportKind::Http {
        return Err(Error::invalid(
            format!(
                "'{}' runs on the http transport, which serves only plain OpenAI generation",
                target.requested
            ),
            Some("model"),
        ));
    }
    let chat_reranker = embed.query.is_some() && preset.rerank.is_some();
    if !chat_reranker
        && preset.worker_engine(state.supervisor.models_dir()) != EngineKind::Embedding
    {
        let what = if embed.query.is_some() {
            "a rerank or embedding model"
        } else {
            "an embedding model"
        };
        return Err(Error::invalid(
            format!(
                "'{}' is not {what} (neither its files nor its preset make it an \
                 embedding model, and its preset has no [rerank])",
                target.requested
            ),
            Some("model"),
        ));
    }
    let began = std::time::Instant::now();
    let mut timer = RequestTimer::start(&preset.name);
    let mut stream = match state.supervisor.embed(preset, embed, keep_alive) {
        Ok(stream) => stream,
        Err(e) => {
            timer.finish(Outcome::of(&e));
            return Err(e);
        }
    };
    let (mut vectors, mut scores) = (Vec::new(), Vec::new());
    let result = loop {
        match stream.next().await {
            Some(GenEvent::Embeddings(EmbeddingsFrame {
                vectors: part,
                scores: part_scores,
                prompt_tokens,
                more,
                ..
            })) => {
                vectors.extend(part);
                scores.extend(part_scores);
                if !more {
                    break Ok(Embedded {
                        vectors,
                        scores,
                        prompt_tokens,
                        seconds: began.elapsed().as_secs_f64(),
                    });
                }
            }
            Some(GenEvent::Error(e)) => break Err(e),
            Some(GenEvent::Admitted { .. }) => {}
            Some(_) => {
                break Err(Error::Internal(
                    "the worker answered an embedding request with text".into(),
                ))
            }
            None => break Err(Error::Internal("embedding ended without a result".into())),
        }
    };
    match &result {
        Ok(_) => timer.finish(Outcome::Ok),
        Err(e) => timer.finish(Outcome::of(e)),
    }
    result
}

/// A generation answered with vectors: a worker that misread its frame.
fn not_a_generation() -> Error {
    Error::Internal("the worker answered a generation with embeddings".into())
}

/// A dialect's stream: turns the core's events into the bytes its clients parse.
/// Each call appends whole frames (SSE events or NDJSON lines) to `out`.
pub trait Renderer: Send + 'static {
    /// Sent with the first event (a role chunk, `message_start`, ...).
    fn open(&mut self, _out: &mut Vec<u8>) {}
    /// The worker took the request in (before its prefill): the prompt's size.
    fn admitted(&mut self, _prompt_tokens: u32, _cached_tokens: u32, _out: &mut Vec<u8>) {}
    /// Text, with the logprobs of the tokens that produced it (when asked for).
    fn text(&mut self, text: &str, logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>);
    /// Thinking text (a reasoning model's), in the dialect's own place for it.
    fn reasoning(&mut self, text: &str, out: &mut Vec<u8>);
    fn tool_call(&mut self, call: ToolCallFrame, out: &mut Vec<u8>);
    /// The end; `logprobs` are those of tokens that added no text (an EOS).
    fn done(&mut self, done: Done, logprobs: Vec<TokenLogprob>, out: &mut Vec<u8>);
    /// A failure after the stream began: the dialect's in-stream error, and no
    /// end marker, so that no client takes a broken answer for a whole one.
    fn error(&mut self, e: &Error, out: &mut Vec<u8>);
}

#[derive(Clone, Copy)]
pub enum Framing {
    /// `text/event-stream` (OpenAI, Anthropic).
    Sse,
    /// `application/x-ndjson` (Ollama).
    NdJson,
}

/// Streams a started generation through `renderer`.
///
/// The body polls the generation directly: a token wakes the connection's own
/// task, which renders and writes it (no task or channel in between). Coalescing:
/// hyper polls the body only when it can write, so tokens that arrive while a
/// slow client's socket is full wait in the stream and leave together. A client
/// that goes away drops the body, and with it the `GenStream`: the generation is
/// cancelled.
pub fn stream<R: Renderer>(started: Started, renderer: R, framing: Framing) -> Response {
    struct State<R> {
        started: Started,
        renderer: R,
        opened: bool,
        held: Option<GenEvent>,
        // Logprobs of tokens whose text has not been rendered yet.
        logprobs: Vec<TokenLogprob>,
        ended: bool,
    }
    let state = State {
        started,
        renderer,
        opened: false,
        held: None,
        logprobs: Vec::new(),
        ended: false,
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        let mut out = Vec::new();
        if !st.opened {
            st.opened = true;
            st.renderer.open(&mut out);
            if !out.is_empty() {
                return Some((Ok::<_, Infallible>(Bytes::from(out)), st));
            }
        }
        while !st.ended {
            let ev = match st.held.take() {
                Some(ev) => ev,
                None => st.started.next().await?,
            };
            match ev {
                GenEvent::Token {
                    text, reasoning, ..
                } => {
                    let mut joined: Option<String> = None;
                    // Logprobs that arrive after the last token taken belong to
                    // tokens still on their way: they wait for them.
                    let mut later: Vec<TokenLogprob> = Vec::new();
                    while let Some(more) = st.started.try_next() {
                        match more {
                            // Thinking and answer text are never joined.
                            GenEvent::Token {
                                text: t,
                                reasoning: r,
                                ..
                            } if r == reasoning => {
                                st.logprobs.append(&mut later);
                                joined
                                    .get_or_insert_with(|| token_text(&text).to_owned())
                                    .push_str(token_text(&t));
                            }
                            GenEvent::Logprobs(mut entries) => later.append(&mut entries),
                            other => {
                                st.held = Some(other);
                                break;
                            }
                        }
                    }
                    let text = joined.as_deref().unwrap_or(token_text(&text));
                    if reasoning {
                        if !text.is_empty() {
                            st.renderer.reasoning(text, &mut out);
                        }
                    } else if !text.is_empty() {
                        let lp = std::mem::take(&mut st.logprobs);
                        st.renderer.text(text, lp, &mut out);
                    }
                    st.logprobs.append(&mut later);
                }
                GenEvent::Logprobs(mut entries) => st.logprobs.append(&mut entries),
                GenEvent::Admitted {
                    prompt_tokens,
                    cached_tokens,
                } => st.renderer.admitted(prompt_tokens, cached_tokens, &mut out),
                GenEvent::ToolCall(call) => st.renderer.tool_call(call, &mut out),
                GenEvent::Done(done) => {
                    st.ended = true;
                    let lp = std::mem::take(&mut st.logprobs);
                    st.renderer.done(done, lp, &mut out);
                }
                GenEvent::Error(e) => {
                    st.ended = true;
                    st.renderer.error(&e, &mut out);
                }
                GenEvent::Embeddings(_) => {
                    st.ended = true;
                    st.renderer.error(&not_a_generation(), &mut out);
                }
            }
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), st));
            }
        }
        None
    });
    let content_type = match framing {
        Framing::Sse => "text/event-stream",
        Framing::NdJson => "application/x-ndjson",
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("static headers are valid")
}

/// `data: {json}\n\n`
pub fn sse_data(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut *out, v).expect("a Value always serializes");
    out.extend_from_slice(b"\n\n");
}

/// `event: name\ndata: {json}\n\n`
pub fn sse_event(out: &mut Vec<u8>, name: &str, v: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    sse_data(out, v);
}

/// One NDJSON line.
pub fn ndjson(out: &mut Vec<u8>, v: &Value) {
    serde_json::to_writer(&mut *out, v).expect("a Value always serializes");
    out.push(b'\n');
}

/// A request's draft counters as every dialect reports them (`usage.mlxd`).
pub fn speculative_usage(c: &DraftCounts) -> Value {
    json!({
        "draft_tokens": c.drafted,
        "accepted_tokens": c.accepted,
        "rejected_tokens": c.rejected,
        "acceptance_ratio": (c.acceptance() * 1e4).round() / 1e4,
    })
}

/// Unique ids for responses and messages.
pub fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{:x}{:04x}",
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

/// A tool call's arguments as a JSON object (the worker sends JSON text).
pub fn arguments_object(call: &ToolCallFrame) -> Value {
    serde_json::from_str(&call.arguments).unwrap_or(Value::String(call.arguments.clone()))
}
