//! Model lifecycle: one slot per model (a task that owns its queue, its worker
//! incarnation, restarts, keep-alive and pin), reached only through commands.
//!
//! ```text
//! request ─generate()─▶ Slot ──owns──▶ Incarnation n (process, transport, routes)
//!   ◀── GenStream ◀───── tokens routed straight from the worker's frames
//! ```

mod budget;
mod incarnation;
mod registry;
mod request;
mod slot;
mod spawn;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use worker_protocol::frame::Generate;

pub use budget::MemoryReport;
pub use incarnation::{token_text, GenEvent};
pub use registry::ShmRegistry;
pub use request::{GenStream, Lease};
pub use slot::SlotInfo;
pub use spawn::openblas_path;
pub use state::KeepAlive;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::memory::{OsProbe, Probe};
use crate::presets::{Preset, Presets};
use budget::{Admit, Budget};
use request::{Job, Pending};
use slot::{Command, Slot};

/// `mlxd stop` answers within this (the stop grace, SIGKILL, the reap).
const STOP_ANSWER_LIMIT: Duration = Duration::from_secs(12);

pub struct Supervisor {
    cfg: Arc<Config>,
    presets: Presets,
    /// Each model's slot, created the first time the model is asked for. The lock
    /// is held only to look up or insert (the memory arbiter reads it too).
    slots: budget::Slots,
    next_id: AtomicU64,
    registry: Arc<ShmRegistry>,
    budget: Budget,
    /// Loads ask the arbiter for memory; started lazily (it needs the runtime).
    arbiter: std::sync::OnceLock<mpsc::UnboundedSender<Admit>>,
}

impl Supervisor {
    pub fn new(cfg: Config, presets: Presets, registry: ShmRegistry) -> Supervisor {
        Supervisor::with_probe(cfg, presets, registry, Arc::new(OsProbe))
    }

    /// With a memory probe of the caller's (tests).
    pub fn with_probe(
        cfg: Config,
        presets: Presets,
        registry: ShmRegistry,
        probe: Arc<dyn Probe>,
    ) -> Supervisor {
        let cfg = Arc::new(cfg);
        let slots: budget::Slots = Arc::new(Mutex::new(HashMap::new()));
        Supervisor {
            budget: Budget::new(cfg.clone(), probe, slots.clone()),
            cfg,
            presets,
            slots,
            next_id: AtomicU64::new(1),
            registry: Arc::new(registry),
            arbiter: std::sync::OnceLock::new(),
        }
    }

    /// New requests are refused while memory is above the shed mark (those in
    /// flight carry on).
    fn check_memory(&self, model: &str) -> Result<()> {
        if self.budget.shedding() {
            return Err(Error::MemoryPressure(model.to_string()));
        }
        Ok(())
    }

    /// The memory budget: cap, shed mark, machine, and what each model holds.
    pub async fn memory(&self) -> MemoryReport {
        self.budget.report().await
    }

    pub fn presets(&self) -> &Presets {
        &self.presets
    }

    /// Where imported models live.
    pub fn models_dir(&self) -> &std::path::Path {
        &self.cfg.models_dir
    }

    fn preset(&self, model: &str) -> Result<&Preset> {
        self.presets
            .resolve(model)
            .ok_or_else(|| Error::ModelNotFound(model.to_string()))
    }

    fn slot(&self, preset: &Preset) -> mpsc::UnboundedSender<Command> {
        let arbiter = self.arbiter.get_or_init(|| self.budget.spawn()).clone();
        let mut slots = self.slots.lock().expect("lock");
        slots
            .entry(preset.name.clone())
            .or_insert_with(|| {
                Slot::spawn(
                    preset.clone(),
                    preset.policy(),
                    self.cfg.clone(),
                    self.registry.clone(),
                    self.budget.probe().clone(),
                    Some(arbiter),
                )
            })
            .clone()
    }

    fn send(slot: &mpsc::UnboundedSender<Command>, cmd: Command) -> Result<()> {
        slot.send(cmd)
            .map_err(|_| Error::Internal("the model's slot has closed".into()))
    }

    fn pending(&self, id: u64, model: &str, job: Job, keep_alive: Option<KeepAlive>) -> Pending {
        Pending {
            id,
            job,
            may_start: self.cfg.may_start(model),
            keep_alive,
            retries: 0,
        }
    }

    /// Queues a generation on the model (loading it if needed). Every outcome,
    /// refusals included, arrives on the returned stream.
    pub fn generate(
        &self,
        model: &str,
        mut gen: Generate,
        keep_alive: Option<KeepAlive>,
    ) -> Result<GenStream> {
        let preset = self.preset(model)?;
        self.check_memory(&preset.name)?;
        let slot = self.slot(preset);
        let (tx, rx) = mpsc::unbounded_channel();
        let name = preset.name.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        gen.id = id;
        let p = self.pending(id, &name, Job::Generate { gen, tx }, keep_alive);
        Self::send(&slot, Command::Submit(Box::new(p)))?;
        Ok(GenStream {
            id,
            model: name,
            rx,
            slot,
            finished: false,
        })
    }

    /// A place in the model's concurrency limit and the port its worker serves
    /// HTTP on (the `http` transport).
    pub async fn lease(&self, model: &str, keep_alive: Option<KeepAlive>) -> Result<Lease> {
        let preset = self.preset(model)?;
        self.check_memory(&preset.name)?;
        let slot = self.slot(preset);
        let (reply, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let p = self.pending(id, &preset.name, Job::Lease { reply }, keep_alive);
        Self::send(&slot, Command::Submit(Box::new(p)))?;
        rx.await
            .map_err(|_| Error::Internal("the model's slot dropped a lease request".into()))?
    }

    /// Starts the model (ignoring `allow_models`) and waits until it is Ready.
    pub async fn start(&self, model: &str, pin: bool) -> Result<SlotInfo> {
        let preset = self.preset(model)?;
        let slot = self.slot(preset);
        let (reply, rx) = oneshot::channel();
        Self::send(&slot, Command::Start { pin, reply })?;
        self.await_start(preset, &slot, rx).await
    }

    /// A fresh incarnation of the model (clears a Failed state).
    pub async fn restart(&self, model: &str) -> Result<SlotInfo> {
        let preset = self.preset(model)?;
        let slot = self.slot(preset);
        let (reply, rx) = oneshot::channel();
        Self::send(&slot, Command::Restart { reply })?;
        self.await_start(preset, &slot, rx).await
    }

    async fn await_start(
        &self,
        preset: &Preset,
        slot: &mpsc::UnboundedSender<Command>,
        rx: oneshot::Receiver<Result<(), String>>,
    ) -> Result<SlotInfo> {
        match rx.await {
            Ok(Ok(())) => Self::info(slot).await,
            Ok(Err(reason)) => Err(Error::WorkerUnavailable {
                model: preset.name.clone(),
                reason,
            }),
            Err(_) => Err(Error::Internal("the model's slot closed".into())),
        }
    }

    async fn info(slot: &mpsc::UnboundedSender<Command>) -> Result<SlotInfo> {
        let (reply, rx) = oneshot::channel();
        Self::send(slot, Command::Info(reply))?;
        rx.await
            .map_err(|_| Error::Internal("the model's slot closed".into()))
    }

    /// Stops the model's worker (in-flight requests get the stop grace to finish);
    /// false if none was running.
    pub async fn stop(&self, model: &str) -> Result<bool> {
        let preset = self.preset(model)?;
        let Some(slot) = self.slots.lock().expect("lock").get(&preset.name).cloned() else {
            return Ok(false);
        };
        let (reply, rx) = oneshot::channel();
        Self::send(&slot, Command::Stop { reply })?;
        match tokio::time::timeout(STOP_ANSWER_LIMIT, rx).await {
            Ok(Ok(was_running)) => Ok(was_running),
            Ok(Err(_)) => Err(Error::Internal("the model's slot closed".into())),
            Err(_) => Err(Error::Internal(format!(
                "the worker of '{}' did not exit within {} s of being killed",
                preset.name,
                STOP_ANSWER_LIMIT.as_secs()
            ))),
        }
    }

    /// Every model that is loaded, loading, backing off or failed.
    pub async fn ps(&self) -> Vec<SlotInfo> {
        let slots: Vec<_> = self.slots.lock().expect("lock").values().cloned().collect();
        let mut out = Vec::new();
        for slot in slots {
            if let Ok(info) = Self::info(&slot).await {
                if info.state != "stopped" || info.queued > 0 {
                    out.push(info);
                }
            }
        }
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// Segments this daemon has created and not yet unlinked.
    pub fn live_segments(&self) -> usize {
        self.registry.len()
    }

    /// Stops every worker (daemon shutdown) and ends the slots.
    pub async fn shutdown(&self) {
        let slots: Vec<_> = self
            .slots
            .lock()
            .expect("lock")
            .drain()
            .map(|(_, s)| s)
            .collect();
        let waits = slots.iter().filter_map(|slot| {
            let (done, rx) = oneshot::channel();
            slot.send(Command::Shutdown(done)).ok().map(|()| rx)
        });
        let _ = tokio::time::timeout(STOP_ANSWER_LIMIT, futures::future::join_all(waits)).await;
        // A record that still names segments is left for the next start to clean.
        if self.registry.is_empty() {
            self.registry.close();
        }
    }
}
