//! One worker process: its handle, the frames it sends, and the generation
//! streams of requests in flight on it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::Counter;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};
use worker_protocol::frame::{token_batch_entries, Done, Generate, Hello, Load, Stats};
use worker_protocol::segment::{new_name, Direction, Segment};
use worker_protocol::{Frame, PROTOCOL_VERSION};

use super::admission::{Admission, Slot};
use super::spawn;
use crate::config::{is_model_dir, Config};
use crate::error::{Error, Result};
use crate::presets::{Preset, TransportKind};
use crate::transport::{Inbound, Incoming, Outbound, WireCounters};

/// Ring sizes: requests may carry long prompts (a frame may use half its ring);
/// events are small and drained continuously.
const REQUEST_RING: u64 = 16 << 20;
const EVENT_RING: u64 = 4 << 20;
/// How long `stop` waits after EOF/Shutdown before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of worker stderr kept for error messages.
const STDERR_TAIL: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Ready,
    Stopping,
    Stopped,
    Failed(String),
}

impl WorkerState {
    pub fn label(&self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
            WorkerState::Stopped => "stopped",
            WorkerState::Failed(_) => "failed",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, WorkerState::Stopped | WorkerState::Failed(_))
    }
}

/// What a request's stream receives. A token's text is a slice of the frame it
/// arrived in (valid UTF-8, checked when the frame was read): no copy per token.
#[derive(Debug)]
pub enum GenEvent {
    Token { token: u32, text: Bytes },
    Done(Done),
    Error(Error),
}

pub struct WorkerHandle {
    pub preset: Preset,
    pub pid: u32,
    pub transport: TransportKind,
    pub started_at: Instant,
    state: watch::Sender<WorkerState>,
    outbound: Outbound,
    /// Each in-flight request's channel, by request id: where the reader routes tokens.
    inflight: Mutex<HashMap<u64, mpsc::UnboundedSender<GenEvent>>>,
    next_id: AtomicU64,
    /// Latest Stats frame.
    stats: Mutex<Stats>,
    hello: Mutex<Option<Hello>>,
    /// Held until the worker's Hello proves it has mapped the segment, then unlinked.
    segment: Mutex<Option<Segment>>,
    stderr_tail: Mutex<VecDeque<String>>,
    admission: Admission,
    wire: WireCounters,
    tokens_routed: Counter,
}

/// A token's text as a `&str` (checked UTF-8 when its frame was read).
pub fn token_text(text: &Bytes) -> &str {
    std::str::from_utf8(text).unwrap_or_default()
}

/// A snapshot for `mlxd ps`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WorkerInfo {
    pub model: String,
    pub pid: u32,
    pub transport: String,
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
    pub uptime_s: f64,
    pub device: Option<String>,
    pub blas: Option<String>,
    pub native_protocol: Option<bool>,
    pub stats: Stats,
    pub inflight: usize,
    /// Requests waiting for a generation slot.
    #[serde(default)]
    pub queued: usize,
}

impl WorkerHandle {
    /// Spawns the worker process and asks it to load the model. Returns at once
    /// with the worker Starting; `wait_ready` waits for the outcome.
    pub async fn spawn(preset: Preset, cfg: &Config) -> Result<Arc<WorkerHandle>> {
        let unavailable = |reason: String| Error::WorkerUnavailable {
            model: preset.name.clone(),
            reason,
        };
        let model_path = preset
            .model_path(&cfg.models_dir)
            .map_err(|e| unavailable(e.to_string()))?;
        if !is_model_dir(&model_path) {
            return Err(unavailable(format!(
                "no model at {} (import one with `mlxd import <file.gguf> --name {}`)",
                model_path.display(),
                preset.model
            )));
        }
        let segment = match preset.transport {
            TransportKind::Shm => match Segment::create(&new_name(), [REQUEST_RING, EVENT_RING], 0)
            {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(model = %preset.name, "shared memory unavailable ({e}); falling back to stdio");
                    None
                }
            },
            TransportKind::Stdio | TransportKind::Http => None,
        };
        let transport = match (preset.transport, &segment) {
            (TransportKind::Http, _) => TransportKind::Http,
            (_, Some(_)) => TransportKind::Shm,
            (_, None) => TransportKind::Stdio,
        };
        let mut child = spawn::command(
            cfg,
            transport,
            preset.engine,
            segment.as_ref().map(|s| s.name()),
        )
        .spawn()
        .map_err(|e| unavailable(format!("cannot start {}: {e}", cfg.python.display())))?;
        let pid = child.id().unwrap_or_default();
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let wire = WireCounters::new(&preset.name);
        let (outbound, inbound) = match &segment {
            Some(seg) => {
                let ends = seg
                    .producer(Direction::ToWorker)
                    .and_then(|p| Ok((p, seg.consumer(Direction::ToDaemon)?)))
                    .map_err(|e| Error::Internal(e.to_string()))?;
                (
                    Outbound::new(stdin, Some(ends.0), wire.clone()),
                    Inbound::Shm {
                        events: ends.1,
                        bell: stdout,
                    },
                )
            }
            None => (
                Outbound::new(stdin, None, wire.clone()),
                Inbound::Stdio { stdout },
            ),
        };
        let handle = Arc::new(WorkerHandle {
            preset: preset.clone(),
            pid,
            transport,
            started_at: Instant::now(),
            state: watch::channel(WorkerState::Starting).0,
            outbound,
            inflight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stats: Mutex::new(Stats::default()),
            hello: Mutex::new(None),
            segment: Mutex::new(segment),
            stderr_tail: Mutex::new(VecDeque::new()),
            admission: Admission::new(&preset.name, preset.max_concurrent, preset.max_queue),
            wire: wire.clone(),
            tokens_routed: metrics::counter!("mlxd_tokens_total", "model" => preset.name.clone()),
        });
        tracing::info!(model = %preset.name, pid, %transport, "worker spawned");

        let h = handle.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "worker", model = %h.preset.name, "{line}");
                let mut tail = h.stderr_tail.lock().expect("lock");
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let h = handle.clone();
        let reader = tokio::spawn(async move {
            let result = inbound.run(h.wire.clone(), |frame| h.on_frame(frame)).await;
            if let Err(e) = result {
                tracing::error!(model = %h.preset.name, "{e}; killing the worker");
                h.fail(format!("{e}"));
                spawn::kill_group(h.pid);
            }
        });
        let h = handle.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Let the reader deliver what the worker published before it died.
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
            h.on_exit(
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string()),
            );
        });

        let load = Frame::Load(Load {
            model_path: model_path.to_string_lossy().into_owned(),
            model_name: preset.name.clone(),
            options: preset.worker_options(),
        });
        if let Err(e) = handle.outbound.send(&load).await {
            spawn::kill_group(pid);
            return Err(unavailable(format!("cannot send Load: {e}")));
        }
        Ok(handle)
    }

    pub fn name(&self) -> &str {
        &self.preset.name
    }

    pub fn state(&self) -> WorkerState {
        self.state.borrow().clone()
    }

    fn set_state(&self, new: WorkerState) {
        self.state.send_if_modified(|s| {
            // Terminal states are final; Failed is not overwritten by a later Stopped.
            if s.is_terminal() || *s == new {
                return false;
            }
            *s = new;
            true
        });
    }

    fn fail(&self, reason: String) {
        self.set_state(WorkerState::Failed(reason));
    }

    fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().expect("lock");
        tail.iter()
            .rev()
            .take(5)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the worker is Ready, or reports why it never will be.
    pub async fn wait_ready(&self) -> Result<()> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                WorkerState::Ready => return Ok(()),
                WorkerState::Failed(reason) => {
                    return Err(Error::WorkerUnavailable {
                        model: self.name().to_string(),
                        reason: reason.clone(),
                    })
                }
                WorkerState::Stopping | WorkerState::Stopped => {
                    return Err(Error::WorkerUnavailable {
                        model: self.name().to_string(),
                        reason: "the worker is stopping".into(),
                    })
                }
                WorkerState::Starting => {}
            }
            if rx.changed().await.is_err() {
                return Err(Error::Internal("worker state channel closed".into()));
            }
        }
    }

    /// Routes a step's tokens to their requests: each text is a slice of `batch`.
    fn route_tokens(&self, batch: Bytes) {
        // Every entry was checked when the frame was read (`Incoming::decode`).
        let entries = token_batch_entries(&batch).into_iter().flatten().flatten();
        let mut count = 0;
        let inflight = self.inflight.lock().expect("lock");
        for e in entries {
            count += 1;
            // A request already cancelled or failed has no sender: its tokens drop.
            if let Some(tx) = inflight.get(&e.id) {
                let _ = tx.send(GenEvent::Token {
                    token: e.token,
                    text: batch.slice_ref(e.text.as_bytes()),
                });
            }
        }
        self.tokens_routed.increment(count);
    }

    /// Routes one frame from the worker (called by the reader task, in order).
    fn on_frame(&self, incoming: Incoming) {
        let frame = match incoming {
            Incoming::Tokens(batch) => return self.route_tokens(batch),
            Incoming::Frame(frame) => frame,
        };
        match frame {
            Frame::TokenBatch(_) => unreachable!("token batches arrive raw"),
            Frame::Done(done) => {
                if let Some(tx) = self.inflight.lock().expect("lock").remove(&done.id) {
                    let _ = tx.send(GenEvent::Done(done));
                }
            }
            Frame::Stats(stats) => {
                crate::metrics::record_worker_stats(self.name(), &stats);
                *self.stats.lock().expect("lock") = stats;
            }
            Frame::Hello(hello) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    self.fail(format!(
                        "worker speaks protocol {}, the daemon {PROTOCOL_VERSION}",
                        hello.protocol_version
                    ));
                    spawn::kill_group(self.pid);
                }
                // The worker has mapped the segment: its name is no longer needed.
                if let Some(seg) = self.segment.lock().expect("lock").take() {
                    if let Err(e) = seg.unlink() {
                        tracing::warn!("{e}");
                    }
                }
                tracing::info!(model = %self.name(), device = %hello.device, blas = ?hello.blas, "worker says hello");
                *self.hello.lock().expect("lock") = Some(hello);
            }
            Frame::Ready(ready) => {
                tracing::info!(model = %self.name(), load_seconds = ready.load_seconds, "worker ready");
                self.set_state(WorkerState::Ready);
            }
            Frame::Error(err) => match err.id {
                Some(id) => {
                    if let Some(tx) = self.inflight.lock().expect("lock").remove(&id) {
                        let e = if err.code == "invalid_request" {
                            Error::invalid(err.message, None)
                        } else {
                            Error::WorkerFailed {
                                model: self.name().to_string(),
                                reason: err.message,
                            }
                        };
                        let _ = tx.send(GenEvent::Error(e));
                    }
                }
                None if self.state() == WorkerState::Starting => {
                    // A worker that cannot load is of no use and would hold its
                    // memory: fail it and kill its group (its exit settles the rest).
                    self.fail(format!("loading failed: {}", err.message));
                    spawn::kill_group(self.pid);
                }
                None => tracing::warn!(model = %self.name(), "worker error: {}", err.message),
            },
            other => {
                tracing::warn!(model = %self.name(), kind = ?other.kind(), "unexpected frame from worker")
            }
        }
    }

    /// The process has exited: settle the state and fail every request in flight.
    fn on_exit(&self, status: String) {
        let reason = match self.state() {
            WorkerState::Stopping => {
                self.set_state(WorkerState::Stopped);
                "the worker was stopped".to_string()
            }
            _ => {
                let tail = self.stderr_tail();
                let reason = format!(
                    "worker exited ({status}){}{tail}",
                    if tail.is_empty() { "" } else { ": " }
                );
                self.fail(reason.clone());
                reason
            }
        };
        tracing::info!(model = %self.name(), pid = self.pid, %status, "worker exited");
        let orphans: Vec<_> = self.inflight.lock().expect("lock").drain().collect();
        for (_, tx) in orphans {
            let _ = tx.send(GenEvent::Error(Error::WorkerFailed {
                model: self.name().to_string(),
                reason: reason.clone(),
            }));
        }
    }

    /// Starts a generation. The returned stream cancels it in the worker if
    /// dropped before the end (a client that disconnects).
    /// For the `http` transport: waits for a generation slot (as `generate` does)
    /// and returns it with the port the worker serves on.
    pub async fn http_slot(&self) -> Result<(Slot, u16)> {
        self.wait_ready().await?;
        let port = self
            .hello
            .lock()
            .expect("lock")
            .as_ref()
            .and_then(|h| h.http_port)
            .ok_or_else(|| Error::WorkerUnavailable {
                model: self.name().to_string(),
                reason: "the worker serves no HTTP port".into(),
            })?;
        Ok((self.admission.enter().await?, port))
    }

    /// Waits in the model's queue for a slot first (503 when the queue is full).
    pub async fn generate(self: &Arc<Self>, mut req: Generate) -> Result<GenStream> {
        self.wait_ready().await?;
        let slot = self.admission.enter().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        req.id = id;
        let (tx, rx) = mpsc::unbounded_channel();
        self.inflight.lock().expect("lock").insert(id, tx);
        if let Err(e) = self.outbound.send(&Frame::Generate(req)).await {
            self.inflight.lock().expect("lock").remove(&id);
            return Err(Error::WorkerFailed {
                model: self.name().to_string(),
                reason: e.to_string(),
            });
        }
        Ok(GenStream {
            worker: self.clone(),
            id,
            rx,
            finished: false,
            _slot: slot,
        })
    }

    fn cancel(self: &Arc<Self>, id: u64) {
        self.inflight.lock().expect("lock").remove(&id);
        let worker = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = worker.outbound.send(&Frame::Cancel { id }).await {
                    tracing::debug!("cancel {id}: {e}");
                }
            });
        }
    }

    /// Shutdown frame and EOF, a grace period, then SIGKILL to the group.
    pub async fn stop(&self) {
        self.set_state(WorkerState::Stopping);
        let _ = self.outbound.send(&Frame::Shutdown).await;
        self.outbound.close().await;
        let mut rx = self.state.subscribe();
        let settled = tokio::time::timeout(STOP_GRACE, rx.wait_for(|s| s.is_terminal()))
            .await
            .is_ok();
        if !settled {
            tracing::warn!(model = %self.name(), pid = self.pid, "worker ignored shutdown; killing its group");
            spawn::kill_group(self.pid);
            let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.is_terminal()))
                .await;
        }
    }

    pub fn info(&self) -> WorkerInfo {
        let state = self.state();
        let hello = self.hello.lock().expect("lock").clone();
        WorkerInfo {
            model: self.name().to_string(),
            pid: self.pid,
            transport: self.transport.to_string(),
            state: state.label().to_string(),
            error: match state {
                WorkerState::Failed(r) => Some(r),
                _ => None,
            },
            uptime_s: self.started_at.elapsed().as_secs_f64(),
            device: hello.as_ref().map(|h| h.device.clone()),
            blas: hello.as_ref().and_then(|h| h.blas.clone()),
            native_protocol: hello.as_ref().map(|h| h.native_protocol),
            stats: self.stats.lock().expect("lock").clone(),
            inflight: self.inflight.lock().expect("lock").len(),
            queued: self.admission.waiting(),
        }
    }
}

/// The events of one generation, in order. Dropping it early cancels the
/// generation in the worker.
pub struct GenStream {
    worker: Arc<WorkerHandle>,
    id: u64,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    finished: bool,
    _slot: Slot,
}

impl GenStream {
    pub async fn next(&mut self) -> Option<GenEvent> {
        if self.finished {
            return None;
        }
        let ev = self.rx.recv().await;
        match &ev {
            Some(GenEvent::Token { .. }) => {}
            Some(_) => self.finished = true,
            None => {
                self.finished = true;
                return Some(GenEvent::Error(Error::WorkerFailed {
                    model: self.worker.name().to_string(),
                    reason: "the worker dropped the request".into(),
                }));
            }
        }
        ev
    }

    /// The next event if one is already waiting: lets a slow client's pending
    /// tokens be coalesced into one SSE chunk.
    pub fn try_next(&mut self) -> Option<GenEvent> {
        if self.finished {
            return None;
        }
        let ev = self.rx.try_recv().ok()?;
        if !matches!(ev, GenEvent::Token { .. }) {
            self.finished = true;
        }
        Some(ev)
    }
}

impl Drop for GenStream {
    fn drop(&mut self) {
        if !self.finished {
            self.worker.cancel(self.id);
        }
    }
}
