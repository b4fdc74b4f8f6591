//! The model slot: one task per model that owns its queue, its current worker
//! incarnation, the restart policy, keep-alive and pin (docs/design/ARCHITECTURE.md, "One owner
//! per model"). Everyone else sends it commands; it decides with the pure machine in
//! `state.rs` and carries out the effects. The queue outlives incarnations: when a
//! worker dies, what it had not started goes to the next one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use worker_protocol::frame::{Embed, Generate, MemoryLimitFrame, ModelFacts, Stats};
use worker_protocol::Frame;

use super::budget::Admit;
use super::incarnation::{GenEvent, Incarnation, Report};
use super::registry::ShmRegistry;
use super::request::{Job, Lease, Pending};
use super::state::{Arrival, Effect, Event, Machine, Phase, Refusal, State, Work};
use crate::config::Config;
use crate::error::Error;
use crate::memory::{Estimate, Probe};
use crate::presets::{Policy, Preset};

/// How often the slot checks deadlines and the worker's progress.
const TICK: Duration = Duration::from_millis(250);
/// Memory growth that counts as a load's progress (weights being read).
const GROWTH: u64 = 1 << 20;
/// A request handed to a worker that died before starting it goes to the next
/// incarnation this many times; after that it fails (it may be what kills them).
const MAX_RETRIES: u8 = 1;

pub enum Command {
    Submit(Box<Pending>),
    /// A request's client went away.
    Cancel(u64),
    /// A lease of incarnation `n` ended.
    Release(u64),
    Start {
        pin: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Restart {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Replies whether a worker was running.
    Stop {
        reply: oneshot::Sender<bool>,
    },
    /// The memory arbiter needs the room: drain (never cut off) and stop; replies
    /// once the worker is gone.
    Evict {
        reason: String,
        reply: oneshot::Sender<bool>,
    },
    /// The arbiter's answer to incarnation `n`'s load: its memory limit, or why not.
    Admitted {
        n: u64,
        result: Result<u64, String>,
    },
    /// Memory is short: the worker gives MLX's cache back.
    ClearCache,
    /// The budget's arbiter: the worker's share of the budget is now this.
    MemoryLimit(u64),
    Info(oneshot::Sender<SlotInfo>),
    /// A reload changed the model's preset: a running worker is replaced the way
    /// `Restart` does it (drained; queued requests wait for the new one); replies
    /// whether one was. Otherwise the next load uses it.
    Reload {
        preset: Box<Preset>,
        reply: oneshot::Sender<bool>,
    },
    /// Daemon shutdown: refuse everything, stop the worker, end the task.
    Shutdown(oneshot::Sender<()>),
}

/// A snapshot of one slot, for `mlxd ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotInfo {
    pub model: String,
    pub state: Phase,
    /// Why the model is failed or crashed.
    #[serde(default)]
    pub error: Option<String>,
    /// The current (or last) incarnation's number.
    #[serde(default)]
    pub incarnation: u64,
    /// Incarnations started after a crash.
    #[serde(default)]
    pub restarts: u32,
    /// How the last incarnation ended.
    #[serde(default)]
    pub last_exit: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    pub transport: String,
    /// Seconds since the current incarnation was spawned.
    pub uptime_s: f64,
    pub device: Option<String>,
    pub blas: Option<String>,
    pub native_protocol: Option<bool>,
    pub stats: Stats,
    /// The model's family, cache kinds and feature limits (once loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<ModelFacts>,
    pub inflight: usize,
    /// Requests generating at once at most (`max_concurrent`, or what the
    /// worker chose for its device), and whether the preset left it to the worker.
    #[serde(default)]
    pub max_concurrent: usize,
    #[serde(default)]
    pub max_concurrent_auto: bool,
    /// Requests waiting for a place.
    #[serde(default)]
    pub queued: usize,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub keep_alive: String,
    /// The worker's measured footprint (PSS on Linux, phys_footprint on macOS).
    #[serde(default)]
    pub footprint_bytes: u64,
    /// What the model is expected to need (preset, or the estimate formula).
    #[serde(default)]
    pub estimate_bytes: u64,
    /// The estimate part by part (weights, runtime, draft, KV reserve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    /// The worker's share of the budget (its MLX memory limit), while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// A discrete GPU's own memory, as the worker reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_memory: Option<u64>,
    /// Unix time of its last request, and seconds since.
    #[serde(default)]
    pub last_used: Option<u64>,
    #[serde(default)]
    pub idle_s: f64,
}

/// What the slot tells `/metrics` about itself.
struct SlotMetrics {
    footprint: Gauge,
    cache_clears: Counter,
    queue_depth: Gauge,
    rejected: Counter,
    restarts: Counter,
    ready: Gauge,
}

/// A request the current incarnation was given, kept so that it can be handed to
/// the next one if this one dies before starting it.
struct Sent {
    asked: Asked,
    retries: u8,
}

/// What a sent request asked the worker for.
enum Asked {
    Generate(Generate),
    Embed(Embed),
}

impl Asked {
    /// The frame that asks the worker for it.
    fn frame(&self) -> Frame {
        match self {
            Asked::Generate(gen) => Frame::Generate(gen.clone()),
            Asked::Embed(embed) => Frame::Embed(embed.clone()),
        }
    }

    /// The job that asks for it again, answering on `tx`.
    fn job(self, tx: mpsc::UnboundedSender<GenEvent>) -> Job {
        match self {
            Asked::Generate(gen) => Job::Generate { gen, tx },
            Asked::Embed(embed) => Job::Embed { embed, tx },
        }
    }
}

pub struct Slot {
    preset: Preset,
    cfg: Arc<Config>,
    registry: Arc<ShmRegistry>,
    machine: Machine,
    queue: VecDeque<Pending>,
    current: Option<Incarnation>,
    /// The incarnation that just exited, while its exit is being handled.
    dead: Option<Incarnation>,
    sent: HashMap<u64, Sent>,
    /// Leases held on the current incarnation (`http` transport).
    leases: usize,
    start_waiters: Vec<oneshot::Sender<Result<(), String>>>,
    stop_waiters: Vec<oneshot::Sender<bool>>,
    /// The worker's heartbeat at the last tick, and the most memory it has had:
    /// a load is progressing while memory climbs (small wobbles do not count).
    mark: (u64, u64),
    commands: mpsc::UnboundedReceiver<Command>,
    me: mpsc::UnboundedSender<Command>,
    reports: mpsc::UnboundedReceiver<(u64, Report)>,
    report_tx: mpsc::UnboundedSender<(u64, Report)>,
    metrics: SlotMetrics,
    /// Set by Shutdown: answered, and the task ends, once the worker is gone.
    closing: Option<oneshot::Sender<()>>,
    /// Where loads ask for memory (None: no budget, e.g. unit setups).
    arbiter: Option<mpsc::UnboundedSender<Admit>>,
    /// The memory limit the arbiter granted the incarnation being launched.
    admitted_limit: u64,
    /// A ClearCache came while no worker existed yet (admitting): sent at launch.
    clear_on_launch: bool,
    probe: Arc<dyn Probe>,
    /// The worker's footprint at the last measurement.
    footprint: u64,
    /// What a load of this model needs (computed when it asks), part by part.
    need: u64,
    estimate: Estimate,
    /// The batch the last ready worker chose (a preset without max_concurrent).
    chosen_batch: Option<u32>,
    last_used: Option<(Instant, std::time::SystemTime)>,
    ticks: u64,
}

impl Slot {
    /// Starts the slot's task; returns the sender its commands go to.
    pub fn spawn(
        preset: Preset,
        policy: Policy,
        cfg: Arc<Config>,
        registry: Arc<ShmRegistry>,
        probe: Arc<dyn Probe>,
        arbiter: Option<mpsc::UnboundedSender<Admit>>,
    ) -> mpsc::UnboundedSender<Command> {
        let (me, commands) = mpsc::unbounded_channel();
        let (report_tx, reports) = mpsc::unbounded_channel();
        let label = preset.name.clone();
        let slot = Slot {
            metrics: SlotMetrics {
                footprint: metrics::gauge!("mlxd_worker_footprint_bytes", "model" => label.clone()),
                cache_clears: metrics::counter!("mlxd_worker_cache_clears_total", "model" => label.clone()),
                queue_depth: metrics::gauge!("mlxd_queue_depth", "model" => label.clone()),
                rejected: metrics::counter!("mlxd_requests_rejected_total", "model" => label.clone()),
                restarts: metrics::counter!("mlxd_worker_restarts_total", "model" => label.clone()),
                ready: metrics::gauge!("mlxd_worker_ready", "model" => label),
            },
            preset,
            cfg,
            registry,
            machine: Machine::new(policy),
            queue: VecDeque::new(),
            current: None,
            dead: None,
            sent: HashMap::new(),
            leases: 0,
            start_waiters: vec![],
            stop_waiters: vec![],
            mark: (0, 0),
            commands,
            me: me.clone(),
            reports,
            report_tx,
            closing: None,
            arbiter,
            admitted_limit: 0,
            clear_on_launch: false,
            probe,
            footprint: 0,
            need: 0,
            estimate: Estimate::default(),
            chosen_batch: None,
            last_used: None,
            ticks: 0,
        };
        tokio::spawn(slot.run());
        me
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some((n, report)) = self.reports.recv() => self.on_report(n, report),
                _ = tick.tick() => self.on_tick(),
            }
            if self.closing.is_some() && self.machine.state == State::Stopped {
                if let Some(done) = self.closing.take() {
                    let _ = done.send(());
                }
                break;
            }
        }
        tracing::debug!(model = %self.preset.name, "slot closed");
    }

    fn name(&self) -> &str {
        &self.preset.name
    }

    fn work(&self) -> Work {
        Work {
            queued: self.queue.len(),
            inflight: self.sent.len() + self.leases,
        }
    }

    fn feed(&mut self, event: Event) {
        let restarts = self.machine.restarts;
        let effects = self.machine.handle(event, Instant::now(), self.work());
        for effect in effects {
            self.apply(effect);
        }
        if self.machine.restarts > restarts {
            self.metrics
                .restarts
                .increment(u64::from(self.machine.restarts - restarts));
        }
        self.metrics.queue_depth.set(self.queue.len() as f64);
        self.metrics
            .ready
            .set(if self.machine.serving() { 1.0 } else { 0.0 });
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Spawn(n) => {
                self.estimate = self
                    .preset
                    .estimate(&self.cfg.models_dir, self.cfg.kv_reserve);
                self.need = self
                    .preset
                    .memory_need(&self.cfg.models_dir, self.cfg.kv_reserve);
                // The load waits for the arbiter (which may first have to drain and
                // stop other models) in the machine's Admitting state; its answer
                // comes back as a command, so this loop never blocks.
                let me = self.me.clone();
                let (reply, answer) = oneshot::channel();
                let asked = self.arbiter.as_ref().is_some_and(|arbiter| {
                    let admit = Admit {
                        model: self.preset.name.clone(),
                        need: self.need,
                        hint: fit_hint(&self.preset, &self.estimate),
                        reply,
                    };
                    arbiter.send(admit).is_ok()
                });
                if asked {
                    tokio::spawn(async move {
                        let result = answer
                            .await
                            .unwrap_or_else(|_| Err("the memory arbiter is gone".into()));
                        let _ = me.send(Command::Admitted { n, result });
                    });
                } else {
                    // No budget (unit setups): admitted without a limit.
                    let _ = me.send(Command::Admitted { n, result: Ok(0) });
                }
            }
            Effect::Launch(n) => self.start_incarnation(n, self.admitted_limit),
            Effect::Shutdown => {
                if let Some(inc) = &self.current {
                    inc.shutdown();
                }
            }
            Effect::Kill => {
                if let Some(inc) = &self.current {
                    tracing::warn!(model = %self.name(), incarnation = inc.n, pid = inc.pid, "killing the worker");
                    inc.kill();
                }
            }
            Effect::Dispatch => self.dispatch(),
            Effect::Orphan(reason) => self.orphan(&reason),
            Effect::RejectQueued(reason) => {
                for p in self.queue.drain(..) {
                    p.fail(Error::WorkerUnavailable {
                        model: self.preset.name.clone(),
                        reason: reason.clone(),
                    });
                }
            }
            Effect::Started(result) => {
                for w in self.start_waiters.drain(..) {
                    let _ = w.send(result.clone());
                }
            }
            Effect::Stopped => {
                for w in self.stop_waiters.drain(..) {
                    let _ = w.send(true);
                }
            }
        }
    }

    /// Spawns incarnation `n`, memory admitted up to `limit` bytes (0: no limit).
    fn start_incarnation(&mut self, n: u64, limit: u64) {
        let spawned = Incarnation::spawn(
            n,
            &self.preset,
            &self.cfg,
            limit,
            self.registry.clone(),
            self.report_tx.clone(),
        );
        match spawned {
            Ok(inc) => {
                if std::mem::take(&mut self.clear_on_launch) {
                    inc.send(Frame::ClearCache);
                    self.metrics.cache_clears.increment(1);
                }
                self.current = Some(inc);
                self.mark = (0, 0);
                self.footprint = 0;
            }
            Err(why) => {
                tracing::error!(model = %self.name(), "cannot start a worker: {why}");
                self.feed(Event::LoadFailed(why));
                self.feed(Event::Exited("no worker process was started".into()));
            }
        }
    }

    /// Hands queued requests to the worker while there is room.
    fn dispatch(&mut self) {
        while self.machine.serving() {
            let Some(inc) = &self.current else { break };
            if self.sent.len() + self.leases >= self.concurrency() {
                break;
            }
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            if p.abandoned() {
                continue;
            }
            if let Some(k) = p.keep_alive {
                self.machine.keep_alive = k;
            }
            self.last_used = Some((Instant::now(), std::time::SystemTime::now()));
            let (asked, tx) = match p.job {
                Job::Generate { gen, tx } => (Asked::Generate(gen), tx),
                Job::Embed { embed, tx } => (Asked::Embed(embed), tx),
                Job::Lease { reply } => {
                    let Some(port) = inc.hello().and_then(|h| h.http_port) else {
                        let _ = reply.send(Err(Error::WorkerUnavailable {
                            model: self.preset.name.clone(),
                            reason: "the worker serves no HTTP port".into(),
                        }));
                        continue;
                    };
                    // Counted before it is handed out: a lease nobody takes is
                    // dropped right here, and its Release evens the count.
                    self.leases += 1;
                    let _ = reply.send(Ok(Lease {
                        port,
                        incarnation: inc.n,
                        slot: self.me.clone(),
                    }));
                    continue;
                }
            };
            inc.shared.open_route(p.id, tx);
            inc.send(asked.frame());
            self.sent.insert(
                p.id,
                Sent {
                    asked,
                    retries: p.retries,
                },
            );
        }
    }

    /// The incarnation died: requests it had started fail with `reason`; those it
    /// had not started (no token yet) go back to the head of the queue.
    fn orphan(&mut self, reason: &str) {
        let Some(dead) = self.dead.as_ref().or(self.current.as_ref()) else {
            return;
        };
        let mut again = Vec::new();
        for (id, route) in dead.shared.take_routes() {
            let sent = self.sent.remove(&id);
            if route.ended() {
                continue; // answered; its Finished report was still on its way
            }
            match sent {
                Some(sent) if !route.started() && sent.retries < MAX_RETRIES => {
                    again.push(Pending {
                        id,
                        job: sent.asked.job(route.tx),
                        may_start: true,
                        keep_alive: None,
                        retries: sent.retries + 1,
                    })
                }
                _ => {
                    let _ = route.tx.send(GenEvent::Error(Error::WorkerFailed {
                        model: self.preset.name.clone(),
                        reason: reason.to_string(),
                    }));
                }
            }
        }
        if !again.is_empty() {
            tracing::info!(model = %self.name(), count = again.len(), "requests the worker had not started go to the next incarnation");
        }
        for p in again.into_iter().rev() {
            self.queue.push_front(p);
        }
        self.sent.clear();
        self.leases = 0;
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(p) => self.submit(*p),
            Command::Cancel(id) => {
                if let Some(at) = self.queue.iter().position(|p| p.id == id) {
                    self.queue.remove(at);
                    self.metrics.queue_depth.set(self.queue.len() as f64);
                } else if self.sent.remove(&id).is_some() {
                    if let Some(inc) = &self.current {
                        inc.shared.close_route(id);
                        inc.send(Frame::Cancel { id });
                    }
                    self.dispatch();
                }
            }
            Command::Release(n) => {
                if self.current.as_ref().is_some_and(|inc| inc.n == n) && self.leases > 0 {
                    self.leases -= 1;
                    self.dispatch();
                }
            }
            Command::Start { pin, reply } => {
                if pin {
                    self.machine.pinned = true;
                }
                self.start_waiters.push(reply);
                self.feed(Event::Start);
            }
            Command::Restart { reply } => {
                self.start_waiters.push(reply);
                self.feed(Event::Restart);
            }
            Command::Stop { reply } => {
                if self.machine.state == State::Stopped {
                    let _ = reply.send(false);
                    return;
                }
                self.stop_waiters.push(reply);
                self.feed(Event::Stop);
            }
            Command::Evict { reason, reply } => {
                if self.machine.state == State::Stopped {
                    let _ = reply.send(false);
                    return;
                }
                tracing::info!(model = %self.name(), "{reason}");
                self.stop_waiters.push(reply);
                self.feed(Event::Evict(reason));
            }
            Command::Admitted { n, result } => {
                let asked = self.machine.state == State::Admitting && self.machine.incarnation == n;
                if !asked {
                    return; // stopped (or asked again) meanwhile
                }
                match result {
                    Ok(limit) => {
                        self.admitted_limit = limit;
                        self.feed(Event::Admitted);
                    }
                    Err(why) => self.feed(Event::Refused(why)),
                }
            }
            Command::MemoryLimit(limit) => {
                if let Some(inc) = &self.current {
                    // Sent when it moved by more than 1/64: the worker's
                    // accounting follows the budget without a frame per tick.
                    let moved = limit.abs_diff(self.admitted_limit) > self.admitted_limit / 64;
                    if moved && self.machine.state.phase() == Phase::Ready {
                        tracing::debug!(model = %self.name(), limit = %crate::memory::human(limit), "memory share changed");
                        self.admitted_limit = limit;
                        inc.send(Frame::MemoryLimit(MemoryLimitFrame {
                            memory_limit: limit,
                        }));
                    }
                }
            }
            Command::ClearCache => match &self.current {
                Some(inc) => {
                    inc.send(Frame::ClearCache);
                    self.metrics.cache_clears.increment(1);
                }
                // Memory went above the mark while this load waited for room:
                // its worker is told as soon as it exists.
                None if self.machine.state == State::Admitting => self.clear_on_launch = true,
                None => {}
            },
            Command::Info(reply) => {
                self.measure();
                let _ = reply.send(self.info());
            }
            Command::Reload { preset, reply } => {
                self.machine.set_policy(preset.policy());
                self.preset = *preset;
                // Effect::Spawn reads self.preset, so the next incarnation is the
                // new preset's; only a live one needs replacing.
                let running = matches!(
                    self.machine.state,
                    State::Ready { .. } | State::Starting { .. }
                );
                if running {
                    tracing::info!(model = %self.name(), "preset changed: replacing the worker");
                }
                self.feed(Event::Replace);
                let _ = reply.send(running);
            }
            Command::Shutdown(done) => {
                self.closing = Some(done);
                for p in self.queue.drain(..) {
                    p.fail(Error::WorkerUnavailable {
                        model: self.preset.name.clone(),
                        reason: "the daemon is shutting down".into(),
                    });
                }
                self.feed(Event::Stop);
            }
        }
    }

    fn submit(&mut self, p: Pending) {
        let arrival = Arrival {
            closing: self.closing.is_some(),
            may_start: p.may_start,
            queued: self.queue.len(),
            active: self.sent.len() + self.leases,
            max_queue: self.preset.max_queue as usize,
            max_concurrent: self.concurrency(),
        };
        let model = self.preset.name.clone();
        match self.machine.admit(Instant::now(), arrival) {
            Ok(()) => {
                self.queue.push_back(p);
                self.feed(Event::Demand);
            }
            Err(Refusal::Unavailable(reason)) => p.fail(Error::WorkerUnavailable { model, reason }),
            Err(Refusal::NotAllowed) => p.fail(Error::NotAllowed(model)),
            Err(Refusal::Full { queued }) => {
                self.metrics.rejected.increment(1);
                p.fail(Error::Overloaded { model, queued })
            }
        }
    }

    fn on_report(&mut self, n: u64, report: Report) {
        if self.current.as_ref().map(|inc| inc.n) != Some(n) {
            return; // from an incarnation already handled
        }
        match report {
            Report::Ready => {
                if let Some(n) = self.current.as_ref().and_then(|i| i.max_batch()) {
                    self.chosen_batch = Some(n);
                }
                self.feed(Event::Ready)
            }
            Report::LoadFailed(message) => self.feed(Event::LoadFailed(message)),
            Report::Misbehaved(why) => {
                tracing::error!(model = %self.name(), incarnation = n, "{why}");
                self.feed(Event::Misbehaved(why));
            }
            Report::Finished(id) => {
                if let Some(inc) = &self.current {
                    inc.shared.close_route(id);
                }
                self.sent.remove(&id);
                self.dispatch();
                if matches!(self.machine.state, State::Draining { .. }) {
                    self.on_tick();
                }
            }
            Report::Exited(how) => {
                // Taken out first: an effect of this exit may spawn the next one.
                self.dead = self.current.take();
                self.feed(Event::Exited(how));
                self.dead = None;
            }
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(4) {
            self.measure();
        }
        let (beat, grew) = match &self.current {
            Some(inc) => {
                let (b, rss) = inc.progress();
                let grew = rss > self.mark.1 + GROWTH;
                let moved = (b != self.mark.0, grew);
                self.mark = (b, if grew { rss } else { self.mark.1 });
                moved
            }
            None => (false, false),
        };
        self.feed(Event::Tick { beat, grew });
    }

    /// The worker's true footprint: what the OS charges the process, plus, on a
    /// Linux GPU, what MLX holds in device memory outside the process's pages.
    fn measure(&mut self) {
        self.footprint = match &self.current {
            Some(inc) => {
                let own = self.probe.footprint(inc.pid).unwrap_or(0);
                let gpu = inc.hello().is_some_and(|h| h.device == "gpu");
                let footprint = if gpu && !cfg!(target_os = "macos") {
                    let stats = inc.stats();
                    own + stats.active_memory + stats.cache_memory
                } else {
                    own
                };
                // A process already gone reads 0: its last real reading stays.
                if own > 0 {
                    inc.note_footprint(footprint);
                }
                footprint
            }
            None => 0,
        };
        self.metrics.footprint.set(self.footprint as f64);
    }

    /// Requests the worker generates at once: the preset's `max_concurrent`, else
    /// the batch its worker chose for its device (Ready; remembered across
    /// restarts, so a new incarnation's queue has the same room).
    fn concurrency(&self) -> usize {
        let chosen = self.current.as_ref().and_then(|i| i.max_batch());
        self.preset.concurrency(chosen.or(self.chosen_batch)) as usize
    }

    fn info(&self) -> SlotInfo {
        let inc = self.current.as_ref();
        let hello = inc.and_then(|i| i.hello());
        let error = match &self.machine.state {
            State::Failed { reason } | State::Crashed { reason } => Some(reason.clone()),
            _ => None,
        };
        SlotInfo {
            model: self.preset.name.clone(),
            state: self.machine.state.phase(),
            error,
            incarnation: self.machine.incarnation,
            restarts: self.machine.restarts,
            last_exit: self.machine.last_exit.clone(),
            pid: inc.map(|i| i.pid),
            transport: inc
                .map(|i| i.transport)
                .unwrap_or(self.preset.transport)
                .to_string(),
            uptime_s: inc.map_or(0.0, |i| i.started_at.elapsed().as_secs_f64()),
            device: hello.as_ref().map(|h| h.device.clone()),
            blas: hello.as_ref().and_then(|h| h.blas.clone()),
            native_protocol: hello.as_ref().map(|h| h.native_protocol),
            stats: inc.map(|i| i.stats()).unwrap_or_default(),
            facts: inc.and_then(|i| i.facts()),
            inflight: self.sent.len() + self.leases,
            max_concurrent: self.concurrency(),
            max_concurrent_auto: self.preset.max_concurrent.is_none(),
            queued: self.queue.len(),
            pinned: self.machine.pinned,
            keep_alive: self.machine.keep_alive.describe(),
            footprint_bytes: self.footprint,
            estimate_bytes: self.need,
            estimate: (self.estimate != Estimate::default()).then(|| self.estimate.clone()),
            memory_limit: (self.current.is_some() && self.admitted_limit > 0)
                .then_some(self.admitted_limit),
            device_memory: hello.as_ref().and_then(|h| h.device_memory),
            last_used: self.last_used.and_then(|(_, wall)| {
                wall.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            }),
            idle_s: self
                .last_used
                .map_or(1e9, |(at, _)| at.elapsed().as_secs_f64()),
        }
    }
}

/// The settings that would make a refused model fit, for the refusal message.
fn fit_hint(preset: &Preset, estimate: &Estimate) -> String {
    if preset.memory_estimate.is_some() {
        return "; the preset's memory_estimate sets what it needs".into();
    }
    let ways = preset.ways_to_fit(estimate);
    if ways.is_empty() {
        return String::new();
    }
    format!("; to make it fit, try {}", ways.join(", or "))
}

impl SlotInfo {
    /// What of the worker's share is neither in use (its footprint) nor promised
    /// to the sequences in flight beyond what they hold now: room for more KV.
    pub fn headroom_bytes(&self) -> u64 {
        let Some(share) = self.memory_limit else {
            return 0;
        };
        let promised = self
            .stats
            .kv
            .as_ref()
            .map_or(0, |kv| kv.reserved_bytes.saturating_sub(kv.in_use_bytes));
        share.saturating_sub(self.footprint_bytes + promised)
    }
}
