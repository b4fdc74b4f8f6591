//! The model slot's lifecycle as a pure function: `(state, event, now, work) →
//! (state', effects)`. No clocks, processes or channels here: the slot task feeds
//! events in and carries effects out, so every transition is tested synchronously.
//!
//! ```text
//!  Stopped ──demand/start──▶ Admitting ──Admitted──▶ Starting ──Ready──▶ Ready ──stop/keep-alive──▶ Draining ──exit──▶ Stopped
//!     ▲          refused, stop ◀──┘                     │  load failed,      │ exit, hang, bad frame      │
//!     │                                                 │  stalled, exit     ▼                            │
//!     │                                                 └──────────────▶ Crashed ──exit──▶ Backoff ──▶ Admitting …
//!     └──────────── stop ─────────────────────────────────────────────────────────────────── Failed ◀── (> 5 crashes in 60 s)
//! ```
//!
//! Failed also ends a run of more than 5 crashes in a row, each before or within
//! 60 s of becoming Ready, however long the loads between them took.
//!
//! At most one incarnation exists at a time: a new one is asked for only from
//! Stopped or Backoff, which are reached only after the previous one has exited,
//! and its process is launched only once the memory budget has admitted it
//! (Admitting holds no process, so nothing there can stall or crash).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::presets::{KeepAlive, Policy};

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// No worker. A request or `mlxd start` spawns one.
    Stopped,
    /// Waiting for the memory budget to admit the load (it may first evict and
    /// drain other models, however long their requests take). No process yet.
    Admitting,
    /// A worker is loading the model.
    Starting { since: Instant },
    /// Serving requests.
    Ready { since: Instant },
    /// Stopping: no new request starts; in-flight ones may finish; the worker gets
    /// Shutdown once idle and is killed at `deadline` (never, for an eviction:
    /// requests in flight are not cut off to make room).
    Draining { deadline: Option<Instant> },
    /// Killed after a fault (hang, bad frame, failed or stalled load); waiting for
    /// the process to exit.
    Crashed { reason: String },
    /// Waiting before the next start. After a failed load, requests are refused
    /// meanwhile (the load would likely fail again); after a crash in service they
    /// wait for the restart.
    Backoff {
        until: Instant,
        after_load_failure: bool,
    },
    /// Crashed too often: refused until `mlxd start` or `mlxd restart`.
    Failed { reason: String },
}

/// A state's name without its data: what `mlxd ps`, /admin/ps and the memory
/// arbiter see (serialized in lower case: "ready", "admitting", ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Stopped,
    Admitting,
    Starting,
    Ready,
    Draining,
    Crashed,
    Backoff,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Admitting => "admitting",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
            Phase::Crashed => "crashed",
            Phase::Backoff => "backoff",
            Phase::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str()) // honours widths: `mlxd ps` aligns its columns
    }
}

impl State {
    pub fn phase(&self) -> Phase {
        match self {
            State::Stopped => Phase::Stopped,
            State::Admitting => Phase::Admitting,
            State::Starting { .. } => Phase::Starting,
            State::Ready { .. } => Phase::Ready,
            State::Draining { .. } => Phase::Draining,
            State::Crashed { .. } => Phase::Crashed,
            State::Backoff { .. } => Phase::Backoff,
            State::Failed { .. } => Phase::Failed,
        }
    }
}

/// What requests refused by a stop are told.
const STOPPED: &str = "the model was stopped";

/// How long a stopping worker's in-flight requests may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// The preset's stop grace, then the worker is killed (`mlxd stop`, restart).
    Graced,
    /// As long as they need (an eviction, a changed preset).
    Unbounded,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Requests are waiting in the queue.
    Demand,
    /// `mlxd start`: be Ready (clears Failed).
    Start,
    /// `mlxd restart`: a fresh incarnation now (clears Failed).
    Restart,
    /// The preset changed (a reload): a live worker is replaced after what it runs
    /// has finished, however long that takes (like an eviction, nothing in flight
    /// is cut off); a failed or backing-off model is cleared, to load the new
    /// preset on demand.
    Replace,
    /// `mlxd stop`.
    Stop,
    /// Make room for another model: like Stop, but in-flight requests always finish.
    Evict(String),
    /// The memory budget has room for the load Spawn asked for: launch it.
    Admitted,
    /// The memory budget has no room for the load that Spawn asked for (no process
    /// was started).
    Refused(String),
    /// The worker finished loading.
    Ready,
    /// The worker reported that it cannot load (its own message), or it could not
    /// be spawned at all.
    LoadFailed(String),
    /// The worker broke the protocol (a garbage frame, a bad ring).
    Misbehaved(String),
    /// The worker process has exited; the text describes how.
    Exited(String),
    /// Time passed. `beat`: the worker's heartbeat advanced since the last tick;
    /// `grew`: its memory changed (a load reading weights makes progress).
    Tick { beat: bool, grew: bool },
}

/// What the slot is carrying right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    /// Requests waiting in the slot's queue.
    pub queued: usize,
    /// Requests handed to the worker and not yet finished.
    pub inflight: usize,
}

impl Work {
    fn idle(self) -> bool {
        self.queued == 0 && self.inflight == 0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Incarnation `n` is wanted: ask the memory budget for room (answered with
    /// Admitted or Refused).
    Spawn(u64),
    /// The budget admitted incarnation `n`: start its process, transport and Load.
    Launch(u64),
    /// Graceful: Shutdown frame and stdin EOF.
    Shutdown,
    /// SIGTERM, then SIGKILL of the worker's process group.
    Kill,
    /// Start queued requests, up to the concurrency limit.
    Dispatch,
    /// The worker is gone: requests it had started fail with this reason; those it
    /// had not started go back to the head of the queue.
    Orphan(String),
    /// Every queued request fails with this reason (503).
    RejectQueued(String),
    /// Answer those waiting on `mlxd start`.
    Started(Result<(), String>),
    /// Answer those waiting on `mlxd stop`.
    Stopped,
}

/// A request arriving at the slot, as admission sees it.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// The daemon is shutting down.
    pub closing: bool,
    /// The request may load the model (`allow_models`).
    pub may_start: bool,
    /// Requests waiting now, and those handed to the worker (or leased).
    pub queued: usize,
    pub active: usize,
    /// The preset's limits.
    pub max_queue: usize,
    pub max_concurrent: usize,
}

/// Why a request is refused on arrival.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The model cannot serve now (failed, backing off after a failed load, the
    /// daemon closing): 503 with the reason.
    Unavailable(String),
    /// Not running, and `allow_models` does not let a request start it: 403.
    NotAllowed,
    /// The queue is full: 503 (overloaded).
    Full { queued: usize },
}

/// The slot's lifecycle and restart bookkeeping.
#[derive(Debug)]
pub struct Machine {
    pub state: State,
    /// Number of the current (or last) incarnation; 0 before the first.
    pub incarnation: u64,
    /// Incarnations started after a crash.
    pub restarts: u32,
    /// How the last incarnation ended, for `mlxd ps`.
    pub last_exit: Option<String>,
    /// Never unloaded by keep-alive (`mlxd start --pin`).
    pub pinned: bool,
    /// The keep-alive in force: the preset's, or the latest request's.
    pub keep_alive: KeepAlive,
    policy: Policy,
    /// Crash times within the window, oldest first.
    crashes: VecDeque<Instant>,
    /// Crashes since the last stable run (one Ready for a whole `crash_window`):
    /// sets the backoff.
    consecutive: u32,
    /// Crashes in a row, each before or within `crash_window` of its incarnation
    /// becoming Ready: more than `max_crashes` fail the model.
    quick_crashes: u32,
    /// Why we killed the worker, when we did: the crash reason its exit reports.
    fault: Option<String>,
    /// The exit we are waiting for was asked for (stop or keep-alive).
    stopping: bool,
    shutdown_sent: bool,
    kill_sent: bool,
    /// `mlxd start`/`restart` wants a worker as soon as the current one is gone.
    start_wanted: bool,
    /// The incarnation being waited on reached Ready (a crash, not a failed load).
    served: bool,
    /// When the incarnation being waited on became Ready.
    ready_at: Option<Instant>,
    last_progress: Option<Instant>,
    idle_since: Option<Instant>,
}

impl Machine {
    pub fn new(policy: Policy) -> Machine {
        Machine {
            state: State::Stopped,
            incarnation: 0,
            restarts: 0,
            last_exit: None,
            pinned: false,
            keep_alive: policy.keep_alive,
            policy,
            crashes: VecDeque::new(),
            consecutive: 0,
            quick_crashes: 0,
            fault: None,
            stopping: false,
            shutdown_sent: false,
            kill_sent: false,
            start_wanted: false,
            served: false,
            ready_at: None,
            last_progress: None,
            idle_since: None,
        }
    }

    /// A reloaded preset's policy; the keep-alive in force becomes its default.
    pub fn set_policy(&mut self, policy: Policy) {
        self.keep_alive = policy.keep_alive;
        self.policy = policy;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// True while requests may be handed to the worker.
    pub fn serving(&self) -> bool {
        matches!(self.state, State::Ready { .. })
    }

    /// Every rule a request meets on arrival, in one place: the daemon closing,
    /// the model's state, `allow_models`, and the queue's room (`max_queue` beyond
    /// the places free under `max_concurrent`).
    pub fn admit(&self, now: Instant, a: Arrival) -> Result<(), Refusal> {
        if a.closing {
            return Err(Refusal::Unavailable("the daemon is shutting down".into()));
        }
        self.admits(now).map_err(Refusal::Unavailable)?;
        let idle = matches!(
            self.state,
            State::Stopped | State::Draining { .. } | State::Backoff { .. }
        );
        if !a.may_start && idle {
            return Err(Refusal::NotAllowed);
        }
        let room = a.max_queue + a.max_concurrent.saturating_sub(a.active);
        if a.queued >= room {
            return Err(Refusal::Full { queued: a.queued });
        }
        Ok(())
    }

    /// Whether the model's state lets a request wait in the queue, or why not.
    pub fn admits(&self, now: Instant) -> Result<(), String> {
        match &self.state {
            State::Failed { reason } => Err(format!(
                "{reason} (the model is marked failed; `mlxd start` or `mlxd restart` resets it)"
            )),
            State::Backoff {
                until,
                after_load_failure: true,
            } => Err(format!(
                "{}; next try in {:.0} s",
                self.last_exit.as_deref().unwrap_or("the last load failed"),
                until.saturating_duration_since(now).as_secs_f64().ceil()
            )),
            _ => Ok(()),
        }
    }

    fn spawn(&mut self, after_crash: bool) -> Effect {
        self.incarnation += 1;
        if after_crash {
            self.restarts += 1;
        }
        self.state = State::Admitting;
        self.fault = None;
        self.stopping = false;
        self.shutdown_sent = false;
        self.kill_sent = false;
        self.served = false;
        self.ready_at = None;
        // A request's keep-alive lasts for the incarnation it was served by.
        self.keep_alive = self.policy.keep_alive;
        self.idle_since = None;
        Effect::Spawn(self.incarnation)
    }

    /// Kills a faulty worker. Its started requests are told now, not when the
    /// process is finally gone (a stopped process dies only at SIGKILL); what it
    /// had not started waits for the next incarnation.
    fn kill(&mut self, reason: String) -> Vec<Effect> {
        if self.fault.is_none() {
            self.fault = Some(reason.clone());
        }
        self.state = State::Crashed {
            reason: reason.clone(),
        };
        self.kill_sent = true;
        vec![Effect::Orphan(reason), Effect::Kill]
    }

    fn backoff(&self) -> Duration {
        let doublings = self.consecutive.saturating_sub(1).min(16);
        (self.policy.backoff_first * 2u32.pow(doublings)).min(self.policy.backoff_max)
    }

    pub fn handle(&mut self, event: Event, now: Instant, work: Work) -> Vec<Effect> {
        use Effect as E;
        match (event, &self.state) {
            (Event::Demand, State::Stopped) => vec![self.spawn(false)],
            (Event::Demand, State::Ready { .. }) => {
                self.idle_since = None;
                vec![E::Dispatch]
            }
            (Event::Demand, State::Failed { .. } | State::Backoff { .. }) => {
                match self.admits(now) {
                    Err(reason) => vec![E::RejectQueued(reason)],
                    Ok(()) => vec![],
                }
            }
            (Event::Demand, _) => vec![],

            (Event::Start, State::Stopped | State::Backoff { .. }) => {
                self.start_wanted = true;
                vec![self.spawn(false)]
            }
            (Event::Start, State::Failed { .. }) => {
                self.reset_crashes();
                self.start_wanted = true;
                vec![self.spawn(false)]
            }
            (Event::Start, State::Ready { .. }) => vec![E::Started(Ok(()))],
            (Event::Start, _) => {
                self.start_wanted = true;
                vec![]
            }

            (Event::Restart, State::Ready { .. } | State::Starting { .. }) => {
                self.reset_crashes();
                self.start_wanted = true;
                self.begin_stop(now, work, Drain::Graced, None)
            }
            (Event::Restart, State::Admitting | State::Draining { .. } | State::Crashed { .. }) => {
                self.reset_crashes();
                self.start_wanted = true;
                vec![]
            }
            (Event::Restart, _) => {
                self.reset_crashes();
                self.start_wanted = true;
                vec![self.spawn(false)]
            }

            (Event::Replace, State::Ready { .. }) => {
                self.reset_crashes();
                self.start_wanted = true;
                self.begin_stop(now, work, Drain::Unbounded, None)
            }
            (
                Event::Replace,
                State::Admitting
                | State::Starting { .. }
                | State::Draining { .. }
                | State::Crashed { .. },
            ) => self.handle(Event::Restart, now, work),
            (Event::Replace, State::Failed { .. } | State::Backoff { .. }) => {
                self.reset_crashes();
                self.state = State::Stopped;
                if work.queued > 0 {
                    vec![self.spawn(false)]
                } else {
                    vec![]
                }
            }
            (Event::Replace, State::Stopped) => vec![],

            (Event::Evict(reason), State::Ready { .. }) => {
                self.pinned = false;
                self.start_wanted = false;
                self.begin_stop(now, work, Drain::Unbounded, Some(reason.clone()))
            }
            (Event::Evict(_), State::Draining { .. } | State::Crashed { .. }) => vec![],
            (Event::Evict(_), _) => self.handle(Event::Stop, now, work),

            (Event::Admitted, State::Admitting) => {
                // The load's clock starts now: waiting for room was not loading.
                self.state = State::Starting { since: now };
                self.last_progress = Some(now);
                vec![E::Launch(self.incarnation)]
            }
            (Event::Admitted, _) => vec![],

            (Event::Refused(reason), State::Admitting) => {
                self.state = State::Stopped;
                self.start_wanted = false;
                vec![E::RejectQueued(reason.clone()), E::Started(Err(reason))]
            }
            (Event::Refused(_), _) => vec![],

            (Event::Stop, State::Stopped) => vec![E::Stopped],
            (Event::Stop, State::Admitting) => {
                // No process yet: nothing to drain or kill.
                self.state = State::Stopped;
                self.start_wanted = false;
                self.pinned = false;
                vec![
                    E::RejectQueued(STOPPED.into()),
                    E::Started(Err(STOPPED.into())),
                    E::Stopped,
                ]
            }
            (Event::Stop, State::Backoff { .. } | State::Failed { .. }) => {
                self.state = State::Stopped;
                self.start_wanted = false;
                self.pinned = false;
                vec![E::RejectQueued(STOPPED.into()), E::Stopped]
            }
            (Event::Stop, State::Crashed { .. }) => {
                self.stopping = true;
                self.start_wanted = false;
                self.pinned = false;
                vec![E::RejectQueued(STOPPED.into())]
            }
            (Event::Stop, State::Draining { .. }) => {
                self.start_wanted = false;
                self.pinned = false;
                vec![]
            }
            (Event::Stop, State::Starting { .. } | State::Ready { .. }) => {
                self.start_wanted = false;
                self.pinned = false;
                let mut out = self.begin_stop(now, work, Drain::Graced, Some(STOPPED.into()));
                out.push(E::Started(Err(STOPPED.into())));
                out
            }

            (Event::Ready, State::Starting { .. }) => {
                self.state = State::Ready { since: now };
                self.served = true;
                self.ready_at = Some(now);
                self.idle_since = Some(now);
                self.start_wanted = false;
                self.last_progress = Some(now);
                vec![E::Started(Ok(())), E::Dispatch]
            }
            (Event::Ready, _) => vec![],

            (Event::LoadFailed(message), State::Starting { .. }) => {
                let reason = format!("loading failed: {message}");
                let mut out = vec![
                    E::RejectQueued(reason.clone()),
                    E::Started(Err(reason.clone())),
                ];
                out.extend(self.kill(reason));
                out
            }
            (Event::LoadFailed(_), _) => vec![],

            (
                Event::Misbehaved(reason),
                State::Starting { .. } | State::Ready { .. } | State::Draining { .. },
            ) => self.kill(reason),
            (Event::Misbehaved(_), _) => vec![],

            (
                Event::Exited(how),
                State::Starting { .. }
                | State::Ready { .. }
                | State::Draining { .. }
                | State::Crashed { .. },
            ) => self.on_exit(how, now, work),
            (Event::Exited(_), _) => vec![],

            (Event::Tick { beat, grew }, _) => self.on_tick(beat, grew, now, work),
        }
    }

    fn reset_crashes(&mut self) {
        self.crashes.clear();
        self.consecutive = 0;
        self.quick_crashes = 0;
    }

    /// Stop the current worker: drain what it runs, then Shutdown (or kill a load).
    /// Stops the worker after what it runs: within the stop grace or however long
    /// it takes (`drain`). Queued requests are refused with `reject`'s reason, or
    /// (None) wait for the next incarnation.
    fn begin_stop(
        &mut self,
        now: Instant,
        work: Work,
        drain: Drain,
        reject: Option<String>,
    ) -> Vec<Effect> {
        let loading = matches!(self.state, State::Starting { .. });
        self.stopping = true;
        self.state = State::Draining {
            deadline: match drain {
                Drain::Graced => Some(now + self.policy.stop_grace),
                Drain::Unbounded => None,
            },
        };
        let mut out: Vec<Effect> = reject.into_iter().map(Effect::RejectQueued).collect();
        if loading {
            // Nothing to drain and nothing worth waiting for.
            self.kill_sent = true;
            out.push(Effect::Kill);
        } else if work.inflight == 0 {
            self.shutdown_sent = true;
            out.push(Effect::Shutdown);
        }
        out
    }

    fn on_exit(&mut self, how: String, now: Instant, work: Work) -> Vec<Effect> {
        let reason = match self.fault.take() {
            Some(fault) => format!("{fault} ({how})"),
            None => how,
        };
        self.last_exit = Some(reason.clone());
        // A worker that served a whole window starts a fresh count, however it
        // ended: a long run unloaded by keep-alive is as stable as one that died.
        let uptime = self.ready_at.map(|since| now.duration_since(since));
        let stable = uptime.is_some_and(|up| up >= self.policy.crash_window);
        if stable {
            self.consecutive = 0;
        }
        // A failed load, or a death soon after Ready, continues a row of quick
        // crashes; a worker that served longer breaks it.
        let quick = match uptime {
            None => true,
            Some(up) => up < self.policy.quick_uptime,
        };
        if self.stopping {
            if self.ready_at.is_some() {
                // Ended on purpose (a keep-alive unload, a stop) after it served:
                // whatever it lived, the crashes before it are not "in a row".
                self.quick_crashes = 0;
            }
            self.state = State::Stopped;
            self.stopping = false;
            let mut out = vec![
                Effect::Orphan("the worker was stopped".into()),
                Effect::Stopped,
            ];
            if work.queued > 0 || self.start_wanted || self.pinned {
                out.push(self.spawn(false));
            }
            return out;
        }
        let mut out = vec![Effect::Orphan(reason.clone())];
        if !self.served {
            out.push(Effect::RejectQueued(reason.clone()));
            out.push(Effect::Started(Err(reason.clone())));
        }
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.crash_window)
        {
            self.crashes.pop_front();
        }
        self.crashes.push_back(now);
        self.consecutive += 1;
        self.quick_crashes = if quick { self.quick_crashes + 1 } else { 0 };
        let window = self.policy.crash_window.as_secs();
        let quick_s = self.policy.quick_uptime.as_secs();
        let failed = if self.crashes.len() > self.policy.max_crashes {
            Some(format!(
                "crashed {} times within {window} s; last: {reason}",
                self.crashes.len()
            ))
        } else if self.quick_crashes as usize > self.policy.max_crashes {
            // Issue 28: a slow load (a big model, a busy machine) plus the backoff
            // spreads crashes beyond any window, so a worker that dies soon after
            // every load would reload forever; a run of such quick crashes fails
            // the model however long each load took.
            Some(format!(
                "crashed {} times in a row, each before or within {quick_s} s of becoming ready; last: {reason}",
                self.quick_crashes
            ))
        } else {
            None
        };
        if let Some(reason) = failed {
            self.state = State::Failed {
                reason: reason.clone(),
            };
            self.start_wanted = false;
            out.push(Effect::RejectQueued(reason.clone()));
            out.push(Effect::Started(Err(reason)));
            return out;
        }
        self.state = State::Backoff {
            until: now + self.backoff(),
            after_load_failure: !self.served,
        };
        out
    }

    fn on_tick(&mut self, beat: bool, grew: bool, now: Instant, work: Work) -> Vec<Effect> {
        match self.state.clone() {
            State::Starting { since } => {
                if beat || grew {
                    self.last_progress = Some(now);
                }
                let quiet = now.duration_since(self.last_progress.unwrap_or(since));
                let limit = self.policy.load_timeout;
                if quiet >= limit {
                    return self.stall(format!(
                        "the load made no progress for {} s",
                        quiet.as_secs()
                    ));
                }
                if now.duration_since(since) >= limit * 2 {
                    return self.stall(format!(
                        "the load took longer than {} s",
                        (limit * 2).as_secs()
                    ));
                }
                vec![]
            }
            State::Ready { .. } => {
                if work.inflight == 0 || beat {
                    self.last_progress = Some(now);
                }
                let quiet = now.duration_since(self.last_progress.unwrap_or(now));
                if work.inflight > 0 && quiet >= self.policy.hang_timeout {
                    return self.kill(format!(
                        "hung: no progress for {} s with {} requests in flight",
                        quiet.as_secs(),
                        work.inflight
                    ));
                }
                if !work.idle() {
                    self.idle_since = None;
                    return vec![];
                }
                let idle_since = *self.idle_since.get_or_insert(now);
                match self.keep_alive {
                    KeepAlive::For(d) if !self.pinned && now.duration_since(idle_since) >= d => {
                        self.begin_stop(now, work, Drain::Graced, None)
                    }
                    _ => vec![],
                }
            }
            State::Draining { deadline } => {
                let mut out = vec![];
                if !self.shutdown_sent && !self.kill_sent && work.inflight == 0 {
                    self.shutdown_sent = true;
                    out.push(Effect::Shutdown);
                }
                if !self.kill_sent && deadline.is_some_and(|d| now >= d) {
                    self.kill_sent = true;
                    out.push(Effect::Kill);
                }
                out
            }
            State::Backoff {
                until,
                after_load_failure,
            } if now >= until => {
                if work.queued > 0 || !after_load_failure || self.pinned || self.start_wanted {
                    vec![self.spawn(true)]
                } else {
                    self.state = State::Stopped;
                    vec![]
                }
            }
            _ => vec![],
        }
    }

    fn stall(&mut self, reason: String) -> Vec<Effect> {
        let mut out = vec![
            Effect::RejectQueued(reason.clone()),
            Effect::Started(Err(reason.clone())),
        ];
        out.extend(self.kill(reason));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a Machine with a fake clock and records every effect; it also plays
    /// the memory budget and the process: it checks that no second incarnation is
    /// ever asked for or launched while one is wanted or alive (the slot's central
    /// promise). The budget admits every load at once unless `hold_admission`.
    struct Harness {
        m: Machine,
        t0: Instant,
        now: Instant,
        work: Work,
        /// Spawn asked the budget; neither Launch nor a refusal has come yet.
        wanted: bool,
        /// A process was launched and has not exited.
        alive: bool,
        hold_admission: bool,
        log: Vec<Effect>,
    }

    impl Harness {
        fn new() -> Harness {
            Harness::with(Policy::default())
        }

        fn with(policy: Policy) -> Harness {
            let t0 = Instant::now();
            Harness {
                m: Machine::new(policy),
                t0,
                now: t0,
                work: Work::default(),
                wanted: false,
                alive: false,
                hold_admission: false,
                log: vec![],
            }
        }

        fn at(&mut self, secs: f64) -> &mut Harness {
            self.now = self.t0 + Duration::from_secs_f64(secs);
            self
        }

        /// The effects of `ev` (an automatic admission's Launch is logged, not
        /// returned).
        fn send(&mut self, ev: Event) -> Vec<Effect> {
            match ev {
                Event::Exited(_) => {
                    assert!(self.alive, "exit of a worker that is not running");
                    self.alive = false;
                }
                Event::Refused(_) | Event::Admitted => {
                    assert!(self.wanted, "an answer to a load nobody asked for")
                }
                _ => {}
            }
            let out = self.m.handle(ev, self.now, self.work);
            self.log.extend(out.clone());
            let mut spawned = false;
            for e in &out {
                match e {
                    Effect::Spawn(_) => {
                        assert!(
                            !self.alive && !self.wanted,
                            "a second incarnation while one is alive"
                        );
                        self.wanted = true;
                        spawned = true;
                    }
                    Effect::Launch(_) => {
                        assert!(self.wanted && !self.alive, "a launch without admission");
                        self.wanted = false;
                        self.alive = true;
                    }
                    _ => {}
                }
            }
            if self.wanted && self.m.state != State::Admitting {
                self.wanted = false; // refused or stopped while waiting
            }
            if spawned && !self.hold_admission {
                let launched = self.m.handle(Event::Admitted, self.now, self.work);
                assert_eq!(launched, vec![Effect::Launch(self.m.incarnation)]);
                self.log.extend(launched);
                self.wanted = false;
                self.alive = true;
            }
            out
        }

        fn tick(&mut self, beat: bool) -> Vec<Effect> {
            self.send(Event::Tick { beat, grew: false })
        }

        fn ready(&mut self) {
            let out = self.send(Event::Ready);
            assert_eq!(out, vec![Effect::Started(Ok(())), Effect::Dispatch]);
        }

        /// Spawned and Ready, at time `at`.
        fn running(at: f64) -> Harness {
            let mut h = Harness::new();
            h.at(at);
            assert_eq!(h.send(Event::Start), vec![Effect::Spawn(1)]);
            h.ready();
            h
        }
    }

    fn is_reject(e: &Effect) -> bool {
        matches!(e, Effect::RejectQueued(_))
    }

    #[test]
    fn concurrent_requests_share_one_load() {
        let mut h = Harness::new();
        h.work.queued = 1;
        assert_eq!(h.send(Event::Demand), vec![Effect::Spawn(1)]);
        h.work.queued = 3;
        assert_eq!(h.send(Event::Demand), vec![]);
        assert_eq!(
            h.send(Event::Start),
            vec![],
            "start waits for the same load"
        );
        h.ready();
        assert_eq!(h.m.incarnation, 1);
        assert_eq!(h.send(Event::Demand), vec![Effect::Dispatch]);
    }

    #[test]
    fn a_crash_in_service_orphans_started_work_and_restarts_after_backoff() {
        let mut h = Harness::running(0.0);
        h.work = Work {
            queued: 3,
            inflight: 1,
        };
        h.at(5.0);
        let out = h.send(Event::Exited("killed by signal 9 (SIGKILL)".into()));
        assert_eq!(
            out,
            vec![Effect::Orphan("killed by signal 9 (SIGKILL)".into())],
            "queued requests are kept for the next incarnation"
        );
        assert!(matches!(
            h.m.state,
            State::Backoff {
                after_load_failure: false,
                ..
            }
        ));
        assert_eq!(h.m.admits(h.now), Ok(()), "requests wait for the restart");
        h.work.inflight = 0;
        assert_eq!(h.at(5.9).tick(false), vec![]);
        assert_eq!(h.at(6.0).tick(false), vec![Effect::Spawn(2)]);
        assert_eq!(h.m.restarts, 1);
        h.ready();
        assert_eq!(
            h.m.last_exit.as_deref(),
            Some("killed by signal 9 (SIGKILL)")
        );
    }

    #[test]
    fn backoff_doubles_and_more_than_five_crashes_in_a_minute_fail_the_model() {
        let mut h = Harness::running(0.0);
        let mut t = 0.0;
        let mut waits = vec![];
        for _ in 0..5 {
            h.at(t);
            h.send(Event::Exited("exit status 1".into()));
            let State::Backoff { until, .. } = h.m.state else {
                panic!("{:?}", h.m.state)
            };
            let wait = until.duration_since(h.now).as_secs_f64();
            waits.push(wait);
            t += wait;
            let next = h.m.incarnation + 1;
            assert_eq!(h.at(t).tick(false), vec![Effect::Spawn(next)]);
            h.ready();
        }
        assert_eq!(waits, vec![1.0, 2.0, 4.0, 8.0, 16.0]);
        h.work.queued = 2;
        let out = h.at(t).send(Event::Exited("exit status 1".into()));
        assert!(matches!(h.m.state, State::Failed { .. }), "{:?}", h.m.state);
        assert!(out.iter().any(is_reject), "{out:?}");
        let State::Failed { reason } = &h.m.state else {
            unreachable!()
        };
        assert!(
            reason.contains("crashed 6 times within 60 s; last: exit status 1"),
            "{reason}"
        );
        // Requests are refused with the reason until `mlxd start` resets it.
        let out = h.send(Event::Demand);
        assert!(
            matches!(&out[..], [Effect::RejectQueued(r)] if r.contains("mlxd start")),
            "{out:?}"
        );
        assert_eq!(h.at(t + 100.0).tick(false), vec![], "failed stays failed");
        assert_eq!(h.send(Event::Start), vec![Effect::Spawn(7)]);
        h.ready();
        h.send(Event::Exited("exit status 1".into()));
        let State::Backoff { until, .. } = h.m.state else {
            panic!()
        };
        assert_eq!(
            until.duration_since(h.now),
            Duration::from_secs(1),
            "count reset"
        );
    }

    /// Waits out the backoff, loads for `load` s (reading weights: progress),
    /// serves `uptime` s and crashes. Returns the time of the crash.
    fn slow_load_then_crash(h: &mut Harness, load: f64, uptime: f64) -> f64 {
        let State::Backoff { until, .. } = h.m.state else {
            panic!("{:?}", h.m.state)
        };
        let mut t = until.duration_since(h.t0).as_secs_f64();
        let next = h.m.incarnation + 1;
        assert_eq!(h.at(t).tick(false), vec![Effect::Spawn(next)]);
        let loaded = t + load;
        while t < loaded {
            let grew = Event::Tick {
                beat: false,
                grew: true,
            };
            assert_eq!(h.at(t).send(grew), vec![]);
            t += 1.0;
        }
        h.at(loaded).ready();
        let crash = loaded + uptime;
        h.at(crash).send(Event::Exited("exit status 1".into()));
        crash
    }

    /// Issue 28: a worker that dies 1 s after each 30 s load never has six
    /// crashes within a minute (the loads and the backoff spread them out), yet
    /// it must not reload forever.
    #[test]
    fn slow_loads_that_crash_soon_after_ready_fail_the_model() {
        let mut h = Harness::new();
        h.send(Event::Start);
        h.at(30.0).ready();
        let mut crashes = vec![31.0];
        h.at(31.0).send(Event::Exited("exit status 1".into()));
        for _ in 0..5 {
            assert!(
                matches!(h.m.state, State::Backoff { .. }),
                "{:?}",
                h.m.state
            );
            crashes.push(slow_load_then_crash(&mut h, 30.0, 1.0));
        }
        assert_eq!(crashes, vec![31.0, 63.0, 96.0, 131.0, 170.0, 217.0]);
        assert!(
            crashes.windows(3).all(|w| w[2] - w[0] > 60.0),
            "never three in a minute: the wall-clock rule alone would not fire"
        );
        let State::Failed { reason } = &h.m.state else {
            panic!("{:?}", h.m.state)
        };
        assert_eq!(
            reason,
            "crashed 6 times in a row, each before or within 10 s of becoming ready; \
             last: exit status 1"
        );
        assert_eq!(h.at(1000.0).tick(false), vec![], "failed stays failed");

        // Loads that fail (never ready) count too: `mlxd start` keeps asking
        // for a model whose 30 s loads fail, and it still ends.
        let mut h = Harness::new();
        h.send(Event::Start);
        let mut t = 0.0;
        for _ in 0..6 {
            assert_ne!(h.m.state.phase(), Phase::Failed);
            t += 30.0;
            h.at(t).send(Event::LoadFailed("bad weights".into()));
            h.at(t).send(Event::Exited("exit status 70".into()));
            if let State::Backoff { until, .. } = h.m.state {
                t = until.duration_since(h.t0).as_secs_f64();
                let next = h.m.incarnation + 1;
                assert_eq!(h.at(t).tick(false), vec![Effect::Spawn(next)]);
            }
        }
        assert!(
            matches!(&h.m.state, State::Failed { reason } if reason.starts_with("crashed 6 times in a row")),
            "{:?}",
            h.m.state
        );
    }

    /// Issue 28: one incarnation that stays up for a whole window (however it
    /// ends) starts the quick-crash count afresh.
    #[test]
    fn a_long_running_incarnation_resets_the_quick_crash_count() {
        let mut h = Harness::new();
        h.send(Event::Start);
        h.at(30.0).ready();
        h.at(31.0).send(Event::Exited("exit status 1".into()));
        for _ in 0..4 {
            slow_load_then_crash(&mut h, 30.0, 1.0);
        }
        // Five quick crashes; then one that served two minutes.
        slow_load_then_crash(&mut h, 30.0, 120.0);
        let State::Backoff { until, .. } = h.m.state else {
            panic!("{:?}", h.m.state)
        };
        assert_eq!(until.duration_since(h.now), Duration::from_secs(1));
        // Five quick ones again are not yet too many: the long run's crash was
        // not quick.
        for _ in 0..5 {
            slow_load_then_crash(&mut h, 30.0, 1.0);
            assert!(
                matches!(h.m.state, State::Backoff { .. }),
                "{:?}",
                h.m.state
            );
        }
        // A long run unloaded by keep-alive (no crash) resets the count too.
        let State::Backoff { until, .. } = h.m.state else {
            unreachable!()
        };
        let mut t = until.duration_since(h.t0).as_secs_f64();
        h.at(t).tick(false);
        t += 30.0;
        h.at(t).ready();
        t += 300.0;
        assert_eq!(h.at(t).tick(false), vec![Effect::Shutdown]);
        h.at(t).send(Event::Exited("exit status 0".into()));
        assert_eq!(h.m.state, State::Stopped);
        h.work.queued = 1;
        h.send(Event::Demand);
        t += 30.0;
        h.at(t).ready();
        h.at(t + 1.0).send(Event::Exited("exit status 1".into()));
        let State::Backoff { until, .. } = h.m.state else {
            panic!("{:?}", h.m.state)
        };
        assert_eq!(
            until.duration_since(h.now),
            Duration::from_secs(1),
            "the backoff starts over too"
        );
        // And six quick ones in a row fail it.
        for _ in 0..5 {
            slow_load_then_crash(&mut h, 30.0, 1.0);
        }
        assert!(matches!(h.m.state, State::Failed { .. }), "{:?}", h.m.state);
    }

    /// Outside kills now and then (an OOM killer, the soak's faults) hit workers
    /// that have served a while: a crash 30 s after Ready breaks a row of quick
    /// ones, and a model killed every minute or so is restarted every time.
    #[test]
    fn a_crash_after_the_quick_uptime_breaks_the_row() {
        let mut h = Harness::new();
        h.send(Event::Start);
        h.at(30.0).ready();
        h.at(31.0).send(Event::Exited("exit status 1".into()));
        for _ in 0..4 {
            slow_load_then_crash(&mut h, 30.0, 1.0);
        }
        slow_load_then_crash(&mut h, 30.0, 30.0);
        for _ in 0..5 {
            slow_load_then_crash(&mut h, 30.0, 1.0);
            assert!(
                matches!(h.m.state, State::Backoff { .. }),
                "{:?}",
                h.m.state
            );
        }
        for _ in 0..20 {
            slow_load_then_crash(&mut h, 5.0, 40.0);
            assert!(
                matches!(h.m.state, State::Backoff { .. }),
                "{:?}",
                h.m.state
            );
        }
    }

    /// Ollama clients often unload after each request (`keep_alive: 0`): a short
    /// run that ends on purpose breaks a run of quick crashes, so six crashes
    /// spread over days never fail the model.
    #[test]
    fn a_short_run_unloaded_on_purpose_breaks_the_run_of_quick_crashes() {
        let mut h = Harness::with(Policy {
            keep_alive: KeepAlive::For(Duration::from_secs(5)),
            ..Policy::default()
        });
        h.send(Event::Start);
        h.at(30.0).ready();
        h.at(31.0).send(Event::Exited("exit status 1".into()));
        for _ in 0..4 {
            slow_load_then_crash(&mut h, 30.0, 1.0);
        }
        // Five quick crashes; then a run of 10 s unloaded by keep-alive.
        let State::Backoff { until, .. } = h.m.state else {
            panic!("{:?}", h.m.state)
        };
        let mut t = until.duration_since(h.t0).as_secs_f64();
        h.at(t).tick(false);
        t += 30.0;
        h.at(t).ready();
        t += 10.0;
        assert_eq!(h.at(t).tick(false), vec![Effect::Shutdown]);
        h.at(t).send(Event::Exited("exit status 0".into()));
        assert_eq!(h.m.state, State::Stopped);
        // Five more quick crashes are five in a row, not ten.
        h.work.queued = 1;
        h.send(Event::Demand);
        h.at(t + 30.0).ready();
        h.at(t + 31.0).send(Event::Exited("exit status 1".into()));
        for _ in 0..4 {
            slow_load_then_crash(&mut h, 30.0, 1.0);
            assert!(
                matches!(h.m.state, State::Backoff { .. }),
                "{:?}",
                h.m.state
            );
        }
        slow_load_then_crash(&mut h, 30.0, 1.0);
        assert!(
            matches!(h.m.state, State::Failed { .. }),
            "the sixth in a row fails it"
        );
    }

    #[test]
    fn backoff_is_capped_and_a_stable_run_resets_it() {
        let mut h = Harness::with(Policy {
            max_crashes: 100,
            ..Policy::default()
        });
        h.send(Event::Start);
        h.ready();
        let mut t = 0.0;
        for _ in 0..8 {
            h.at(t).send(Event::Exited("x".into()));
            let State::Backoff { until, .. } = h.m.state else {
                panic!()
            };
            t += until.duration_since(h.now).as_secs_f64();
            h.at(t).tick(false);
            h.ready();
        }
        h.at(t).send(Event::Exited("x".into()));
        let State::Backoff { until, .. } = h.m.state else {
            panic!()
        };
        assert_eq!(until.duration_since(h.now), Duration::from_secs(30));
        t += 30.0;
        h.at(t).tick(false);
        h.ready();
        // Ready for a whole crash window: the next crash waits 1 s again.
        t += 61.0;
        h.at(t).send(Event::Exited("x".into()));
        let State::Backoff { until, .. } = h.m.state else {
            panic!()
        };
        assert_eq!(until.duration_since(h.now), Duration::from_secs(1));
    }

    #[test]
    fn a_failed_load_fails_its_waiters_with_the_workers_message() {
        let mut h = Harness::new();
        h.work.queued = 2;
        h.send(Event::Demand);
        let out = h
            .at(0.5)
            .send(Event::LoadFailed("No safetensors found in /m".into()));
        let reason = "loading failed: No safetensors found in /m".to_string();
        assert_eq!(
            out,
            vec![
                Effect::RejectQueued(reason.clone()),
                Effect::Started(Err(reason.clone())),
                Effect::Orphan(reason.clone()),
                Effect::Kill
            ]
        );
        h.work.queued = 0;
        h.at(0.6).send(Event::Exited("exit status 70".into()));
        assert!(matches!(
            h.m.state,
            State::Backoff {
                after_load_failure: true,
                ..
            }
        ));
        assert_eq!(
            h.m.last_exit.as_deref(),
            Some("loading failed: No safetensors found in /m (exit status 70)")
        );
        // Meanwhile new requests are refused at once with the cause, not queued.
        let err = h.m.admits(h.now).unwrap_err();
        assert!(
            err.contains("No safetensors") && err.contains("next try in 1 s"),
            "{err}"
        );
        // With nobody waiting, the model is not reloaded by itself after a failed load.
        assert_eq!(h.at(2.0).tick(false), vec![]);
        assert_eq!(h.m.state, State::Stopped);
        h.work.queued = 1;
        assert_eq!(h.send(Event::Demand), vec![Effect::Spawn(2)]);
    }

    #[test]
    fn a_hung_worker_is_killed_but_an_idle_or_progressing_one_is_not() {
        let mut h = Harness::running(0.0);
        // Idle for ten minutes with no heartbeat: fine (nothing in flight).
        let mut t = 0.0;
        while t < 600.0 {
            h.work = Work {
                queued: 0,
                inflight: 0,
            };
            h.m.pinned = true;
            assert_eq!(h.at(t).tick(false), vec![]);
            t += 0.25;
        }
        // Busy and progressing (a long prefill beats per chunk): never killed.
        h.work.inflight = 3;
        while t < 900.0 {
            assert_eq!(h.at(t).tick(true), vec![]);
            t += 0.25;
        }
        // Stopped (SIGSTOP): killed once the hang timeout has passed, not before.
        let last_beat = t - 0.25;
        loop {
            let out = h.at(t).tick(false);
            if !out.is_empty() {
                assert!(
                    matches!(&out[..], [Effect::Orphan(r), Effect::Kill] if r.starts_with("hung")),
                    "{out:?}"
                );
                break;
            }
            t += 0.25;
        }
        assert_eq!(t - last_beat, 60.0);
        assert!(matches!(&h.m.state, State::Crashed { reason } if reason.contains("hung")));
        let out = h
            .at(t + 2.0)
            .send(Event::Exited("killed by signal 9 (SIGKILL)".into()));
        assert!(
            matches!(&out[0], Effect::Orphan(r) if r.starts_with("hung: no progress for 60 s"))
        );
        assert!(matches!(h.m.state, State::Backoff { .. }));
    }

    #[test]
    fn a_load_without_progress_is_failed_and_one_reading_weights_is_not() {
        let mut h = Harness::with(Policy {
            load_timeout: Duration::from_secs(10),
            ..Policy::default()
        });
        h.work.queued = 1;
        h.send(Event::Demand);
        // Memory grows while weights are read: progress.
        for i in 1..=15 {
            let out = h.at(i as f64).send(Event::Tick {
                beat: false,
                grew: true,
            });
            assert_eq!(out, vec![]);
        }
        // Then nothing moves for 10 s.
        let out = h.at(25.0).tick(false);
        assert!(
            matches!(&out[0], Effect::RejectQueued(r) if r.contains("no progress for 10 s")),
            "{out:?}"
        );
        assert_eq!(out.last(), Some(&Effect::Kill));
        // And an absolute cap of twice the timeout, progress or not.
        let mut h = Harness::with(Policy {
            load_timeout: Duration::from_secs(10),
            ..Policy::default()
        });
        h.send(Event::Start);
        for i in 1..20 {
            assert_eq!(
                h.at(i as f64).send(Event::Tick {
                    beat: true,
                    grew: true
                }),
                vec![]
            );
        }
        assert_eq!(
            h.at(20.0)
                .send(Event::Tick {
                    beat: true,
                    grew: true
                })
                .last(),
            Some(&Effect::Kill)
        );
    }

    #[test]
    fn stop_drains_then_shuts_down_and_no_second_copy_starts_during_the_grace() {
        let mut h = Harness::running(0.0);
        h.work = Work {
            queued: 1,
            inflight: 2,
        };
        let out = h.at(1.0).send(Event::Stop);
        assert_eq!(
            out,
            vec![
                Effect::RejectQueued("the model was stopped".into()),
                Effect::Started(Err("the model was stopped".into()))
            ],
            "in-flight requests may finish: no Shutdown yet"
        );
        assert!(matches!(h.m.state, State::Draining { .. }));
        // A request arriving during the grace period waits; nothing is spawned.
        h.work = Work {
            queued: 1,
            inflight: 2,
        };
        assert_eq!(h.send(Event::Demand), vec![]);
        assert_eq!(h.m.incarnation, 1);
        h.work.inflight = 0;
        assert_eq!(h.at(2.0).tick(false), vec![Effect::Shutdown]);
        assert_eq!(h.at(2.5).tick(false), vec![]);
        // Once the old worker is gone, the waiting request loads a fresh one.
        let out = h.at(3.0).send(Event::Exited("exit status 0".into()));
        assert_eq!(
            out,
            vec![
                Effect::Orphan("the worker was stopped".into()),
                Effect::Stopped,
                Effect::Spawn(2)
            ]
        );
        assert_eq!(h.m.restarts, 0, "a stop is not a crash");
    }

    #[test]
    fn a_stop_that_cannot_drain_kills_at_the_grace_deadline() {
        let mut h = Harness::running(0.0);
        h.work.inflight = 1;
        h.at(0.0).send(Event::Stop);
        assert_eq!(h.at(9.9).tick(false), vec![]);
        assert_eq!(h.at(10.0).tick(false), vec![Effect::Kill]);
        assert_eq!(h.at(10.5).tick(false), vec![]);
        let out = h
            .at(10.6)
            .send(Event::Exited("killed by signal 9 (SIGKILL)".into()));
        assert_eq!(
            out,
            vec![
                Effect::Orphan("the worker was stopped".into()),
                Effect::Stopped
            ]
        );
        assert_eq!(h.m.state, State::Stopped);
        // A stop while loading kills the load at once.
        let mut h = Harness::new();
        h.send(Event::Start);
        let out = h.send(Event::Stop);
        assert!(out.contains(&Effect::Kill), "{out:?}");
    }

    #[test]
    fn keep_alive_unloads_an_idle_model_unless_pinned_or_forever() {
        let mut h = Harness::running(0.0);
        assert_eq!(h.at(299.0).tick(false), vec![]);
        assert_eq!(h.at(300.0).tick(false), vec![Effect::Shutdown]);

        // A request resets the idle clock.
        let mut h = Harness::running(0.0);
        h.work.inflight = 1;
        h.at(200.0).tick(true);
        h.work.inflight = 0;
        assert_eq!(h.at(200.25).tick(false), vec![], "idle from here");
        assert_eq!(h.at(500.0).tick(false), vec![]);
        assert_eq!(h.at(500.25).tick(false), vec![Effect::Shutdown]);

        let mut h = Harness::running(0.0);
        h.m.pinned = true;
        assert_eq!(h.at(1e6).tick(false), vec![]);

        let mut h = Harness::running(0.0);
        h.m.keep_alive = KeepAlive::Forever;
        assert_eq!(h.at(1e6).tick(false), vec![]);

        let mut h = Harness::running(0.0);
        h.m.keep_alive = KeepAlive::For(Duration::ZERO);
        assert_eq!(h.at(0.25).tick(false), vec![Effect::Shutdown]);
        let out = h.send(Event::Exited("exit status 0".into()));
        assert_eq!(
            out,
            vec![
                Effect::Orphan("the worker was stopped".into()),
                Effect::Stopped
            ]
        );
    }

    #[test]
    fn restart_replaces_a_ready_worker_and_keeps_the_queue() {
        let mut h = Harness::running(0.0);
        h.work.queued = 2;
        let out = h.send(Event::Restart);
        assert!(!out.iter().any(is_reject), "{out:?}");
        assert!(matches!(h.m.state, State::Draining { .. }));
        h.work.inflight = 0;
        h.at(1.0).tick(false);
        let out = h.at(1.5).send(Event::Exited("exit status 0".into()));
        assert_eq!(out.last(), Some(&Effect::Spawn(2)));
    }

    #[test]
    fn a_changed_preset_waits_for_long_requests_and_clears_a_failed_model() {
        let mut h = Harness::running(0.0);
        h.work.inflight = 1;
        let out = h.send(Event::Replace);
        assert!(!out.iter().any(is_reject), "{out:?}");
        assert!(matches!(h.m.state, State::Draining { deadline: None }));
        // Minutes later the request still runs: nothing kills it.
        assert_eq!(h.at(600.0).tick(false), vec![]);
        h.work.inflight = 0;
        assert_eq!(h.at(601.0).tick(false), vec![Effect::Shutdown]);
        let out = h.at(602.0).send(Event::Exited("exit status 0".into()));
        assert_eq!(
            out.last(),
            Some(&Effect::Spawn(2)),
            "the new preset's worker"
        );

        let mut h = Harness::running(0.0);
        h.m.state = State::Failed {
            reason: "crashed 6 times in 60 s".into(),
        };
        assert_eq!(h.send(Event::Replace), vec![]);
        assert_eq!(h.m.state, State::Stopped);
        assert_eq!(
            h.m.admits(h.now),
            Ok(()),
            "the edited preset gets its chance"
        );
    }

    #[test]
    fn a_misbehaving_worker_is_killed_and_counts_as_a_crash() {
        let mut h = Harness::running(0.0);
        let out = h.send(Event::Misbehaved(
            "worker sent a bad frame: unknown kind 32767".into(),
        ));
        assert_eq!(
            out,
            vec![
                Effect::Orphan("worker sent a bad frame: unknown kind 32767".into()),
                Effect::Kill
            ],
            "started requests are told at once"
        );
        h.send(Event::Exited("killed by signal 15 (SIGTERM)".into()));
        assert_eq!(
            h.m.last_exit.as_deref(),
            Some("worker sent a bad frame: unknown kind 32767 (killed by signal 15 (SIGTERM))")
        );
        assert!(matches!(
            h.m.state,
            State::Backoff {
                after_load_failure: false,
                ..
            }
        ));
    }

    #[test]
    fn an_eviction_drains_without_a_deadline_and_a_refusal_is_no_crash() {
        let mut h = Harness::running(0.0);
        h.work = Work {
            queued: 1,
            inflight: 1,
        };
        let out = h.send(Event::Evict("evicted to make room for 'b'".into()));
        assert_eq!(
            out,
            vec![Effect::RejectQueued("evicted to make room for 'b'".into())]
        );
        h.work.queued = 0;
        assert_eq!(h.at(3600.0).tick(true), vec![], "in flight: never killed");
        h.work.inflight = 0;
        assert_eq!(h.at(3601.0).tick(false), vec![Effect::Shutdown]);
        let out = h.send(Event::Exited("exited with status 0".into()));
        assert_eq!(
            out,
            vec![
                Effect::Orphan("the worker was stopped".into()),
                Effect::Stopped
            ]
        );

        let mut h = Harness::new();
        h.hold_admission = true;
        h.work.queued = 1;
        h.send(Event::Demand);
        let out = h.send(Event::Refused("not enough memory".into()));
        assert_eq!(
            out,
            vec![
                Effect::RejectQueued("not enough memory".into()),
                Effect::Started(Err("not enough memory".into()))
            ]
        );
        assert_eq!((h.m.state.clone(), h.m.restarts), (State::Stopped, 0));
        assert_eq!(h.m.admits(h.now), Ok(()), "the next request may try again");
    }

    /// Issue 25: waiting for memory is a state of its own, not a load kept alive
    /// by a fake heartbeat: however long other models take to drain, nothing
    /// stalls, and the load's clock starts only when it is admitted.
    #[test]
    fn waiting_for_memory_never_stalls_and_the_load_clock_starts_at_admission() {
        let mut h = Harness::new();
        h.hold_admission = true;
        h.work.queued = 1;
        assert_eq!(h.send(Event::Demand), vec![Effect::Spawn(1)]);
        assert_eq!(h.m.state.phase(), Phase::Admitting);
        let load_timeout = h.m.policy().load_timeout.as_secs_f64();
        for t in 1..=4 {
            let at = load_timeout * f64::from(t);
            assert_eq!(
                h.at(at).tick(false),
                vec![],
                "quiet while admitting at {at} s"
            );
        }
        assert_eq!(
            h.send(Event::Restart),
            vec![],
            "one load asked for, not two"
        );
        let admitted_at = load_timeout * 4.0;
        assert_eq!(h.send(Event::Admitted), vec![Effect::Launch(1)]);
        assert_eq!(h.m.state, State::Starting { since: h.now });
        assert_eq!(h.at(admitted_at + load_timeout - 1.0).tick(false), vec![]);
        let out = h.at(admitted_at + load_timeout).tick(false);
        assert!(
            out.contains(&Effect::Kill),
            "a real stall is still caught: {out:?}"
        );
    }

    #[test]
    fn a_stop_while_admitting_ends_at_once_with_no_process() {
        let mut h = Harness::new();
        h.hold_admission = true;
        h.work.queued = 2;
        h.send(Event::Demand);
        let out = h.send(Event::Stop);
        assert_eq!(
            out,
            vec![
                Effect::RejectQueued(STOPPED.into()),
                Effect::Started(Err(STOPPED.into())),
                Effect::Stopped,
            ]
        );
        assert_eq!(h.m.state, State::Stopped);
        // A late answer from the budget launches nothing.
        assert_eq!(h.m.handle(Event::Admitted, h.now, h.work), vec![]);
        let evict = h.send(Event::Demand);
        assert_eq!(evict, vec![Effect::Spawn(2)]);
        assert_eq!(
            h.send(Event::Evict("room for another".into()))[2],
            Effect::Stopped
        );
    }

    #[test]
    fn admission_rules_in_order() {
        let a = Arrival {
            closing: false,
            may_start: true,
            queued: 0,
            active: 0,
            max_queue: 2,
            max_concurrent: 1,
        };
        let mut h = Harness::new();
        assert_eq!(h.m.admit(h.now, a), Ok(()));
        assert_eq!(
            h.m.admit(
                h.now,
                Arrival {
                    may_start: false,
                    ..a
                }
            ),
            Err(Refusal::NotAllowed)
        );
        // Room: the free places under max_concurrent plus max_queue.
        assert_eq!(h.m.admit(h.now, Arrival { queued: 2, ..a }), Ok(()));
        assert_eq!(
            h.m.admit(h.now, Arrival { queued: 3, ..a }),
            Err(Refusal::Full { queued: 3 })
        );
        assert_eq!(
            h.m.admit(
                h.now,
                Arrival {
                    queued: 2,
                    active: 1,
                    ..a
                }
            ),
            Err(Refusal::Full { queued: 2 })
        );
        let closing = h.m.admit(h.now, Arrival { closing: true, ..a });
        assert!(matches!(closing, Err(Refusal::Unavailable(r)) if r.contains("shutting down")));
        // A loaded model takes requests that may not start one.
        h.send(Event::Start);
        h.ready();
        assert_eq!(
            h.m.admit(
                h.now,
                Arrival {
                    may_start: false,
                    ..a
                }
            ),
            Ok(())
        );
    }

    #[test]
    fn keep_alive_parses_ollama_forms() {
        assert_eq!(KeepAlive::parse("-1"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("-5m"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("0"), Ok(KeepAlive::For(Duration::ZERO)));
        assert_eq!(
            KeepAlive::parse("5m"),
            Ok(KeepAlive::For(Duration::from_secs(300)))
        );
        assert_eq!(
            KeepAlive::parse("1h30m"),
            Ok(KeepAlive::For(Duration::from_secs(5400)))
        );
        assert_eq!(
            KeepAlive::parse("90"),
            Ok(KeepAlive::For(Duration::from_secs(90)))
        );
        assert!(KeepAlive::parse("soon").is_err());
    }
}
