//! One incarnation of a model's worker: its process, transport and segment, the
//! routes of the requests it runs, and the tasks that read, write and reap it.
//!
//! An incarnation decides nothing. It routes tokens to requests (the hot path) and
//! reports what happens to it (Ready, a load error, a finished request, a protocol
//! violation, its exit) to its slot, tagged with its number, so that a report from
//! a previous incarnation can never be mistaken for one from the current.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::Counter;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;
use worker_protocol::frame::{token_batch_entries, Hello, Load, ModelFacts, Stats};
use worker_protocol::segment::{new_name, Direction, Heartbeat, Segment};
use worker_protocol::{Frame, PROTOCOL_VERSION};

use super::exit::{cgroup_oom_kills, describe_exit, MemoryAtDeath};

/// An OOM-kill count not read (no cgroup file).
const NO_COUNT: u64 = u64::MAX;
use super::registry::ShmRegistry;
use super::spawn;
use crate::config::{is_model_dir, Config};
use crate::error::Error;
use crate::presets::{Preset, TransportKind};
use crate::transport::{Inbound, Incoming, Outbound, TransportError, WireCounters};

/// Ring sizes: requests may carry long prompts (a frame may use half its ring);
/// events are small and drained continuously.
const REQUEST_RING: u64 = 16 << 20;
const EVENT_RING: u64 = 4 << 20;
/// A worker's routine log line (its INFO and DEBUG records), as opposed to a
/// warning, an error or a traceback line.
fn is_routine(line: &str) -> bool {
    line.contains(" INFO ") || line.contains(" DEBUG ")
}

/// Lines of worker stderr kept for error messages.
const STDERR_TAIL: usize = 20;
/// A worker's stderr line is cut into pieces of at most this many bytes.
const STDERR_LINE_MAX: u64 = 16 << 10;
/// How long a worker whose output reached EOF has to exit before it is killed.
const EOF_GRACE: Duration = Duration::from_millis(500);
/// How long a killed worker gets between SIGTERM and SIGKILL of its group.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// What a request's stream receives. A token's text is a slice of the frame it
/// arrived in (valid UTF-8, checked when the frame was read): no copy per token.
#[derive(Debug)]
pub enum GenEvent {
    /// The worker took the request in: its prompt's size, before any token.
    Admitted {
        prompt_tokens: u32,
        cached_tokens: u32,
    },
    Token {
        token: u32,
        text: Bytes,
        /// The text is thinking (a reasoning model's), not answer.
        reasoning: bool,
    },
    /// A tool call the worker parsed from the output (after the tokens before it).
    ToolCall(worker_protocol::frame::ToolCallFrame),
    /// Log probabilities of the tokens that follow (requests that asked for them).
    Logprobs(Vec<worker_protocol::frame::TokenLogprob>),
    Done(worker_protocol::frame::Done),
    /// Vectors of an Embed request, in order (the last part has `more: false`).
    Embeddings(worker_protocol::frame::EmbeddingsFrame),
    Error(Error),
}

impl GenEvent {
    /// Whether this event ends its request (Done, Error, an answer's last vectors).
    pub fn is_final(&self) -> bool {
        match self {
            GenEvent::Done(_) | GenEvent::Error(_) => true,
            GenEvent::Embeddings(e) => !e.more,
            _ => false,
        }
    }
}

/// A token's text as a `&str` (checked UTF-8 when its frame was read).
pub fn token_text(text: &Bytes) -> &str {
    std::str::from_utf8(text).unwrap_or_default()
}

/// What an incarnation tells its slot.
#[derive(Debug)]
pub enum Report {
    Ready,
    /// The worker's own message: it cannot load the model.
    LoadFailed(String),
    /// A request ended (Done or its Error was delivered): its concurrency slot is free.
    Finished(u64),
    /// The worker broke the protocol; it must be killed.
    Misbehaved(String),
    /// The process is gone (reaped), with how it ended and its last stderr lines.
    Exited(String),
}

/// Where one request's events go. The slot opens and closes routes (the map's
/// one writer); the reader task only looks them up, and marks what it did.
pub struct Route {
    pub tx: mpsc::UnboundedSender<GenEvent>,
    /// An output event has been routed: the client may have seen output, so the
    /// request cannot move to another incarnation if this one dies.
    started: AtomicBool,
    /// Its end (Done or Error) has been sent: nothing more goes to it, and the
    /// slot closes the route when the Finished report reaches it.
    ended: AtomicBool,
}

impl Route {
    pub fn new(tx: mpsc::UnboundedSender<GenEvent>) -> Route {
        Route {
            tx,
            started: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        }
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

/// State shared by the incarnation's tasks and its slot.
pub struct Shared {
    model: String,
    /// The routes of the requests this incarnation runs, by request id. Written
    /// only by the slot (open, close, take); the reader task reads.
    routes: RwLock<HashMap<u64, Route>>,
    /// Latest Stats frame.
    stats: Mutex<Stats>,
    /// The memory limit the load was admitted with (0: none), and the worker's
    /// last measured footprint: a death with the one near the other is likely
    /// out of memory.
    memory_limit: u64,
    footprint: AtomicU64,
    /// The cgroup's OOM-kill count at the last measurement (NO_COUNT: unread): a
    /// rise between it and the death, a second or so, is evidence; a rise over
    /// the worker's whole life may be another process's.
    oom_kills: AtomicU64,
    /// The daemon sent the kill (a stop, a hang, a cap): no evidence of anything.
    killed_by_daemon: AtomicBool,
    /// The process has been reaped: its pid may belong to someone else now.
    pub(super) exited: AtomicBool,
    /// How other ranks of its distributed group died while it lived (group.rs):
    /// the cause, where rank 0 then failed at its next collective.
    pub(super) rank_deaths: Mutex<Vec<String>>,
    hello: Mutex<Option<Hello>>,
    /// What the worker found the model to be (its Ready frame).
    facts: Mutex<Option<ModelFacts>>,
    /// The batch the worker runs (its Ready frame; 0 until then).
    max_batch: std::sync::atomic::AtomicU32,
    /// Held until the worker's Hello proves it has mapped the segment, then unlinked;
    /// unlinked on exit if the worker never got that far.
    segment: Mutex<Option<Segment>>,
    registry: Arc<ShmRegistry>,
    stderr_tail: Mutex<VecDeque<String>>,
    tokens_routed: Counter,
}

/// A frame for the writer task, or the end of the worker's stdin (its lifeline).
enum Outgoing {
    Frame(Box<Frame>),
    Close,
}

pub struct Incarnation {
    pub n: u64,
    pub pid: u32,
    pub transport: TransportKind,
    pub started_at: Instant,
    pub shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Outgoing>,
    /// The shm header's progress counter (None over stdio: Stats carry it).
    heartbeat: Option<Heartbeat>,
}

/// The worker's stderr, whole, goes to its own file; the daemon's log gets its
/// routine lines at debug level only (they are in that file), and the rest
/// (warnings, errors, tracebacks) as before. (A distributed group's ranks share
/// the file and the tail: their lines say which rank they are.)
pub(super) fn pipe_stderr(stderr: tokio::process::ChildStderr, cfg: &Config, sh: Arc<Shared>) {
    let mut log = match crate::logs::WorkerLog::open(&cfg.home, &sh.model) {
        Ok(log) => Some(log),
        Err(e) => {
            tracing::warn!(model = %sh.model, "no worker log file: {e}");
            None
        }
    };
    tokio::spawn(async move {
        // Bytes, not UTF-8 lines: one bad byte must not stop the reading (the
        // worker would block on a full pipe), nor a line without an end grow
        // without bound.
        let mut reader = tokio::io::BufReader::new(stderr);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match (&mut reader)
                .take(STDERR_LINE_MAX)
                .read_until(b'\n', &mut raw)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            if let Some(file) = &mut log {
                if let Err(e) = file.write_line(&line) {
                    tracing::warn!(model = %sh.model, "writing {}: {e}", file.path().display());
                    log = None;
                }
            }
            if is_routine(&line) {
                tracing::debug!(target: "worker", model = %sh.model, "{line}");
            } else {
                tracing::info!(target: "worker", model = %sh.model, "{line}");
            }
            let mut tail = sh.stderr_tail.lock().expect("lock");
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
}

/// A slot's message from incarnation `n`.
pub type ReportTx = mpsc::UnboundedSender<(u64, Report)>;

impl Incarnation {
    /// Spawns incarnation `n` and sends it Load. Its reports go to `reports`; the
    /// last one is always `Exited` (unless this returns an error: then no process
    /// exists and nothing is left behind).
    pub fn spawn(
        n: u64,
        preset: &Preset,
        cfg: &Config,
        memory_limit: u64,
        registry: Arc<ShmRegistry>,
        reports: ReportTx,
    ) -> Result<Incarnation, String> {
        let model_path = preset
            .model_path(&cfg.models_dir)
            .map_err(|e| e.to_string())?;
        if !is_model_dir(&model_path) {
            return Err(format!(
                "no model at {} (import one with `mlxd import <file.gguf> --name {}`)",
                model_path.display(),
                preset.model
            ));
        }
        // A distributed preset's ranks: planned (ports, hostfile) before anything
        // is created, so that a refusal leaves nothing behind.
        let group = match &preset.distributed {
            Some(d) => Some(super::group::Group::plan(cfg, preset, d, n)?),
            None => None,
        };
        let draft_path = preset.draft_path(&cfg.models_dir);
        if let Some(draft) = &draft_path {
            if !is_model_dir(draft) {
                return Err(format!(
                    "no draft model at {} (import one with `mlxd import <file.gguf> --name NAME` \
                     and name it in the preset's [speculative] draft)",
                    draft.display()
                ));
            }
        }
        let segment = match preset.transport {
            TransportKind::Shm => {
                match Segment::create(&new_name(), [REQUEST_RING, EVENT_RING], n) {
                    Ok(s) => {
                        registry.add(s.name());
                        Some(s)
                    }
                    Err(e) => {
                        tracing::warn!(model = %preset.name, "shared memory unavailable ({e}); falling back to stdio");
                        None
                    }
                }
            }
            TransportKind::Stdio | TransportKind::Http => None,
        };
        // The daemon's ends of the rings, taken before any process exists.
        let (rings, heartbeat) = match &segment {
            Some(seg) => {
                let ends = seg
                    .producer(Direction::ToWorker)
                    .and_then(|p| Ok((p, seg.consumer(Direction::ToDaemon)?)));
                match ends {
                    Ok(ends) => (Some(ends), Some(seg.heartbeat())),
                    Err(e) => {
                        let _ = seg.unlink();
                        registry.remove(seg.name());
                        return Err(e.to_string());
                    }
                }
            }
            None => (None, None),
        };
        let transport = match (preset.transport, &segment) {
            (TransportKind::Http, _) => TransportKind::Http,
            (_, Some(_)) => TransportKind::Shm,
            (_, None) => TransportKind::Stdio,
        };
        let shared = Arc::new(Shared {
            model: preset.name.clone(),
            routes: RwLock::new(HashMap::new()),
            stats: Mutex::new(Stats::default()),
            memory_limit,
            footprint: Default::default(),
            exited: Default::default(),
            rank_deaths: Mutex::new(Vec::new()),
            hello: Mutex::new(None),
            facts: Mutex::new(None),
            max_batch: Default::default(),
            segment: Mutex::new(segment),
            registry,
            stderr_tail: Mutex::new(VecDeque::new()),
            tokens_routed: metrics::counter!("mlxd_tokens_total", "model" => preset.name.clone()),
            // Read before the process exists, so that an OOM kill at once still counts.
            oom_kills: AtomicU64::new(cgroup_oom_kills().unwrap_or(NO_COUNT)),
            killed_by_daemon: AtomicBool::new(false),
        });
        let segment_name = shared.segment_name();
        let mut cmd = spawn::command(
            cfg,
            &preset.name,
            transport,
            preset.worker_engine(&cfg.models_dir),
            segment_name.as_deref().map(|s| (s, n)),
        );
        if let Some(group) = &group {
            group.join(&mut cmd, 0);
        }
        let mut child = cmd.spawn().map_err(|e| {
            shared.unlink_segment();
            if let Some(group) = &group {
                group.remove_hostfile();
            }
            format!("cannot start {}: {e}", cfg.python.display())
        })?;
        let pid = child.id().unwrap_or_default();
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let wire = WireCounters::new(&preset.name);
        let (outbound, inbound) = match rings {
            Some((tx, rx)) => (
                Outbound::new(stdin, Some(tx), wire.clone()),
                Inbound::Shm {
                    events: rx,
                    bell: stdout,
                },
            ),
            None => (
                Outbound::new(stdin, None, wire.clone()),
                Inbound::Stdio { stdout },
            ),
        };
        tracing::info!(model = %preset.name, incarnation = n, pid, %transport, "worker spawned");

        pipe_stderr(stderr, cfg, shared.clone());
        if let Some(group) = &group {
            super::group::spawn_followers(cfg, preset, group, pid, n, &shared, &reports);
        }

        let sh = shared.clone();
        let tx = reports.clone();
        let reader = tokio::spawn(async move {
            let result = inbound
                .run(wire, |frame| {
                    if let Err(why) = sh.on_frame(frame, n, &tx) {
                        let _ = tx.send((n, Report::Misbehaved(why)));
                    }
                })
                .await;
            match result {
                Err(e) => {
                    if matches!(e, TransportError::Protocol(_)) {
                        // Frames are decoded strictly: a field this daemon does
                        // not know is a worker of another build, never a default.
                        tracing::error!(model = %sh.model, incarnation = n, "{e}");
                        metrics::counter!("mlxd_worker_protocol_errors_total", "model" => sh.model.clone())
                            .increment(1);
                    }
                    let _ = tx.send((n, Report::Misbehaved(e.to_string())));
                }
                Ok(()) => {
                    // EOF normally means the process is exiting; one that closed its
                    // output and lives on can no longer serve. (Checked aside: the
                    // reaper waits for this task before it reports the exit.)
                    tokio::spawn(async move {
                        tokio::time::sleep(EOF_GRACE).await;
                        if !sh.exited.load(Ordering::Acquire) {
                            let why = "the worker closed its output but did not exit";
                            let _ = tx.send((n, Report::Misbehaved(why.into())));
                        }
                    });
                }
            }
        });

        let (writer, mut outgoing) = mpsc::unbounded_channel::<Outgoing>();
        let model = preset.name.clone();
        let (sh, tx) = (shared.clone(), reports.clone());
        // One writer keeps frames in order (a Generate before its Cancel) and keeps
        // a full request ring from ever blocking the slot.
        tokio::spawn(async move {
            while let Some(out) = outgoing.recv().await {
                match out {
                    Outgoing::Frame(frame) => {
                        if let Err(e) = outbound.send(&frame).await {
                            tracing::warn!(%model, incarnation = n, "sending {:?}: {e}", frame.kind());
                            // A request the ring cannot carry fails at once (a worker
                            // that dies fails its requests its own way).
                            let id = match &*frame {
                                Frame::Generate(g) => Some(g.id),
                                Frame::Embed(e) => Some(e.id),
                                _ => None,
                            };
                            if let (Some(id), TransportError::Protocol(why)) = (id, &e) {
                                let e = Error::invalid(
                                    format!(
                                        "the request is too large to hand to the worker ({why})"
                                    ),
                                    None,
                                );
                                sh.finish(id, GenEvent::Error(e), n, &tx);
                            }
                        }
                    }
                    Outgoing::Close => outbound.close().await,
                }
            }
            // The slot dropped us: close the lifeline too.
            outbound.close().await;
        });

        let sh = shared.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            sh.exited.store(true, Ordering::Release);
            if let Some(group) = &group {
                // Rank 0 is gone: the other ranks, in its process group (whose id
                // stays theirs while they live), cannot step without it, and their
                // parent, the daemon, lives on.
                spawn::kill_group(pid, nix::sys::signal::Signal::SIGKILL);
                group.remove_hostfile();
            }
            let before = sh.oom_kills.load(Ordering::Relaxed);
            let memory = MemoryAtDeath {
                footprint: sh.footprint.load(Ordering::Relaxed),
                limit: sh.memory_limit,
                oom_kill_rose: before != NO_COUNT
                    && cgroup_oom_kills().is_some_and(|after| after > before),
                killed_by_daemon: sh.killed_by_daemon.load(Ordering::Acquire),
            };
            // Let the reader deliver what the worker published before it died.
            let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
            sh.unlink_segment();
            let mut how = match status {
                Ok(s) => describe_exit(s, memory),
                Err(e) => format!("could not be reaped: {e}"),
            };
            let deaths = sh.rank_deaths.lock().expect("lock").join("; ");
            if !deaths.is_empty() && !memory.killed_by_daemon {
                // Rank 0 died of another rank's death (its collective failed)
                // before the daemon acted on it: that death is the cause.
                how = format!("{deaths}; rank 0 then {how}");
            }
            let tail = sh.stderr_tail(5);
            let how = if tail.is_empty() {
                how
            } else {
                format!("{how}; its last words: {tail}")
            };
            tracing::info!(model = %sh.model, incarnation = n, pid, "worker {how}");
            let _ = reports.send((n, Report::Exited(how)));
        });

        let inc = Incarnation {
            n,
            pid,
            transport,
            started_at: Instant::now(),
            shared,
            writer,
            heartbeat,
        };
        let mut options = preset.worker_options();
        options.memory_limit = (memory_limit > 0).then_some(memory_limit);
        if let (Some(spec), Some(draft)) = (options.speculative.as_mut(), draft_path) {
            spec.draft_path = Some(draft.to_string_lossy().into_owned());
        }
        options.prompt_cache_bytes = preset.prompt_cache_limit(&cfg.models_dir, cfg.kv_reserve);
        options.kv_shape = preset.estimate(&cfg.models_dir, cfg.kv_reserve).kv_shape;
        options.context_length = preset.model_files(&cfg.models_dir).context_length;
        inc.send(Frame::Load(Load {
            model_path: model_path.to_string_lossy().into_owned(),
            model_name: preset.name.clone(),
            options: Box::new(options),
        }));
        Ok(inc)
    }

    /// Queues a frame for the worker (in order; never blocks).
    pub fn send(&self, frame: Frame) {
        let _ = self.writer.send(Outgoing::Frame(Box::new(frame)));
    }

    /// Shutdown frame, then EOF on stdin: the worker exits by itself.
    pub fn shutdown(&self) {
        self.send(Frame::Shutdown);
        let _ = self.writer.send(Outgoing::Close);
    }

    /// SIGTERM to the worker's process group, and SIGKILL if it is still there
    /// after a short grace (a stopped or wedged process ignores SIGTERM).
    pub fn kill(&self) {
        let pid = self.pid;
        if self.shared.exited.load(Ordering::Acquire) {
            return;
        }
        self.shared.killed_by_daemon.store(true, Ordering::Release);
        spawn::kill_group(pid, nix::sys::signal::Signal::SIGTERM);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TERM_GRACE).await;
            if !shared.exited.load(Ordering::Acquire) {
                spawn::kill_group(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
    }

    /// The worker's progress counter and its memory: (heartbeat, rss).
    pub fn progress(&self) -> (u64, u64) {
        let stats = self.shared.stats.lock().expect("lock");
        let beat = match &self.heartbeat {
            Some(h) => h.load(),
            None => stats.heartbeat,
        };
        (beat, stats.rss)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().expect("lock").clone()
    }

    /// The model's family, cache kinds and limits, once Ready.
    pub fn facts(&self) -> Option<ModelFacts> {
        self.shared.facts.lock().expect("lock").clone()
    }

    /// The sequences the worker decodes at once, once Ready.
    pub fn max_batch(&self) -> Option<u32> {
        Some(self.shared.max_batch.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    pub fn hello(&self) -> Option<Hello> {
        self.shared.hello.lock().expect("lock").clone()
    }

    /// The slot measured the worker's footprint: kept, with the cgroup's OOM-kill
    /// count of the same moment, to describe its death.
    pub fn note_footprint(&self, bytes: u64) {
        self.shared.footprint.store(bytes, Ordering::Relaxed);
        if let Some(count) = cgroup_oom_kills() {
            self.shared.oom_kills.store(count, Ordering::Relaxed);
        }
    }
}

impl Shared {
    /// The daemon sent the kill (a stop, a hang, a cap).
    pub(super) fn killed_by_daemon(&self) -> bool {
        self.killed_by_daemon.load(Ordering::Acquire)
    }

    fn segment_name(&self) -> Option<String> {
        self.segment
            .lock()
            .expect("lock")
            .as_ref()
            .map(|s| s.name().to_string())
    }

    /// Removes the segment's name (once) and its registry entry.
    fn unlink_segment(&self) {
        if let Some(seg) = self.segment.lock().expect("lock").take() {
            if let Err(e) = seg.unlink() {
                tracing::warn!("{e}");
            }
            self.registry.remove(seg.name());
        }
    }

    /// The worker's last stderr lines that are not routine log lines (a traceback,
    /// an abort message), joined for an error message.
    fn stderr_tail(&self, lines: usize) -> String {
        let tail = self.stderr_tail.lock().expect("lock");
        let telling: Vec<&str> = tail
            .iter()
            .map(String::as_str)
            .filter(|l| !is_routine(l) && !l.trim().is_empty())
            .collect();
        telling[telling.len().saturating_sub(lines)..].join(" | ")
    }

    /// The slot hands request `id` to this incarnation.
    pub(super) fn open_route(&self, id: u64, tx: mpsc::UnboundedSender<GenEvent>) {
        self.routes
            .write()
            .expect("lock")
            .insert(id, Route::new(tx));
    }

    /// The slot is done with request `id` (finished or cancelled): its late
    /// tokens, if any, drop.
    pub(super) fn close_route(&self, id: u64) {
        self.routes.write().expect("lock").remove(&id);
    }

    /// Every route, for the slot to settle when the incarnation dies (by id).
    pub(super) fn take_routes(&self) -> Vec<(u64, Route)> {
        let mut routes: Vec<(u64, Route)> = self.routes.write().expect("lock").drain().collect();
        routes.sort_by_key(|(id, _)| *id);
        routes
    }

    /// Routes a step's tokens to their requests: each text is a slice of `batch`.
    fn route_tokens(&self, batch: Bytes) {
        // Every entry was checked when the frame was read (`Incoming::decode`).
        let entries = token_batch_entries(&batch).into_iter().flatten().flatten();
        let mut count = 0;
        let routes = self.routes.read().expect("lock");
        for e in entries {
            count += 1;
            // A request already cancelled or failed has no route: its tokens drop.
            if let Some(route) = routes.get(&e.id).filter(|r| !r.ended()) {
                route.started.store(true, Ordering::Release);
                let _ = route.tx.send(GenEvent::Token {
                    token: e.token,
                    text: batch.slice_ref(e.text.as_bytes()),
                    reasoning: e.reasoning,
                });
            }
        }
        self.tokens_routed.increment(count);
    }

    /// Sends a request one of its output events (a tool call, logprobs).
    fn route(&self, id: u64, event: GenEvent) {
        let routes = self.routes.read().expect("lock");
        if let Some(route) = routes.get(&id).filter(|r| !r.ended()) {
            route.started.store(true, Ordering::Release);
            let _ = route.tx.send(event);
        }
    }

    /// Ends request `id` with `event` and tells the slot its place is free (once,
    /// whatever the worker sends after).
    fn finish(&self, id: u64, event: GenEvent, n: u64, reports: &ReportTx) {
        let routes = self.routes.read().expect("lock");
        if let Some(route) = routes.get(&id) {
            if !route.ended.swap(true, Ordering::AcqRel) {
                let _ = route.tx.send(event);
                let _ = reports.send((n, Report::Finished(id)));
            }
        }
    }

    /// Handles one frame from the worker (called by the reader task, in order).
    /// An error means the worker broke the protocol.
    fn on_frame(&self, incoming: Incoming, n: u64, reports: &ReportTx) -> Result<(), String> {
        let frame = match incoming {
            Incoming::Tokens(batch) => {
                self.route_tokens(batch);
                return Ok(());
            }
            Incoming::Frame(frame) => frame,
        };
        match frame {
            Frame::Done(done) => self.finish(done.id, GenEvent::Done(done), n, reports),
            Frame::Embeddings(e) if e.more => self.route(e.id, GenEvent::Embeddings(e)),
            Frame::Embeddings(e) => self.finish(e.id, GenEvent::Embeddings(e), n, reports),
            Frame::ToolCall(call) => self.route(call.id, GenEvent::ToolCall(call)),
            Frame::Logprobs(lp) => self.route(lp.id, GenEvent::Logprobs(lp.entries)),
            // Not output: a request whose worker dies now has not started, and
            // moves to the next worker.
            Frame::Admitted(a) => {
                let routes = self.routes.read().expect("lock");
                if let Some(route) = routes.get(&a.id).filter(|r| !r.ended()) {
                    let _ = route.tx.send(GenEvent::Admitted {
                        prompt_tokens: a.prompt_tokens,
                        cached_tokens: a.cached_tokens,
                    });
                }
            }
            Frame::Stats(stats) => {
                crate::metrics::record_worker_stats(&self.model, &stats);
                let mut last = self.stats.lock().expect("lock");
                *last = stats;
                if last.engine_failed {
                    return Err("the worker reports that its engine has failed".into());
                }
            }
            Frame::Hello(hello) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    return Err(format!(
                        "worker speaks protocol {}, the daemon {PROTOCOL_VERSION}",
                        hello.protocol_version
                    ));
                }
                // The worker has mapped the segment: its name is no longer needed.
                self.unlink_segment();
                tracing::info!(model = %self.model, incarnation = n, device = %hello.device, blas = ?hello.blas, "worker says hello");
                *self.hello.lock().expect("lock") = Some(hello);
            }
            Frame::Ready(ready) => {
                tracing::info!(model = %self.model, incarnation = n, load_seconds = ready.load_seconds, max_batch = ?ready.max_batch, "worker ready");
                self.max_batch
                    .store(ready.max_batch.unwrap_or(0), Ordering::Relaxed);
                if let Some(spec) = ready.speculative {
                    if spec.active {
                        tracing::info!(model = %self.model, draft = %spec.draft, num_draft_tokens = spec.num_draft_tokens, mode = %spec.mode, "speculative decoding active: {}", spec.reason);
                    } else {
                        tracing::warn!(model = %self.model, draft = %spec.draft, mode = %spec.mode, "speculative decoding inactive: {}", spec.reason);
                    }
                    // ps and /v1/models show it before the first Stats frame.
                    self.stats.lock().expect("lock").speculative = Some(spec);
                }
                if let Some(facts) = ready.model {
                    tracing::info!(model = %self.model, family = %facts.family, caches = ?facts.cache_kinds, "model facts");
                    for limit in &facts.limits {
                        tracing::warn!(model = %self.model, feature = %limit.feature, "{}", limit.reason);
                    }
                    *self.facts.lock().expect("lock") = Some(*facts);
                }
                let _ = reports.send((n, Report::Ready));
            }
            Frame::Error(err) => match err.id {
                Some(id) => {
                    let e = match err.code.as_str() {
                        "invalid_request" => Error::invalid(err.message, None),
                        "context_length_exceeded" => Error::ContextOverflow(err.message),
                        "kv_cache_too_large" => Error::KvTooLarge(err.message),
                        "out_of_memory" => Error::OutOfMemory(err.message),
                        _ => Error::WorkerFailed {
                            model: self.model.clone(),
                            reason: err.message,
                        },
                    };
                    self.finish(id, GenEvent::Error(e), n, reports);
                }
                None => {
                    let _ = reports.send((n, Report::LoadFailed(err.message)));
                }
            },
            other => {
                return Err(format!(
                    "unexpected {:?} frame from the worker",
                    other.kind()
                ))
            }
        }
        Ok(())
    }
}
