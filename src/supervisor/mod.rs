//! Model lifecycle: one slot per model (a task that owns its queue, its worker
//! incarnation, restarts, keep-alive and pin), reached only through commands.
//!
//! ```text
//! request ─generate()─▶ Slot ──owns──▶ Incarnation n (process, transport, routes)
//!   ◀── GenStream ◀───── tokens routed straight from the worker's frames
//! ```

mod budget;
mod exit;
mod group;
mod incarnation;
mod registry;
pub mod reload;
mod request;
mod slot;
mod spawn;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use worker_protocol::frame::{Embed, Generate};

pub use budget::MemoryReport;
pub use incarnation::{token_text, GenEvent};
pub use registry::ShmRegistry;
pub use reload::ReloadReport;
pub use request::{GenStream, Lease};
pub use slot::SlotInfo;
pub use spawn::openblas_path;
pub use state::Phase;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::memory::{OsProbe, Probe};
use crate::presets::{KeepAlive, Preset, Presets};
use budget::{Admit, Budget};
use request::{Job, Pending};
use slot::{Command, Slot};

/// `mlxd stop` answers within this (the stop grace, SIGKILL, the reap).
const STOP_ANSWER_LIMIT: Duration = Duration::from_secs(12);

/// Where a reload reads the configuration from (serve's: config.toml and the
/// environment, with its command-line overrides).
pub type ConfigSource = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

pub struct Supervisor {
    /// The configuration the daemon started with: slots spawn workers with it.
    cfg: Arc<Config>,
    /// The latest loaded configuration: the fields a reload applies live
    /// (`allow_models`) are read from it.
    live: RwLock<Arc<Config>>,
    /// Swapped whole by a reload: a lookup clones the Arc and holds no lock.
    presets: RwLock<Arc<Presets>>,
    config_source: std::sync::OnceLock<ConfigSource>,
    /// One reload at a time (two racing would diff against the same old presets).
    reloading: tokio::sync::Mutex<()>,
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
            live: RwLock::new(cfg.clone()),
            cfg,
            presets: RwLock::new(Arc::new(presets)),
            config_source: std::sync::OnceLock::new(),
            reloading: tokio::sync::Mutex::new(()),
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

    /// The presets now in force (a reload swaps them; this snapshot stays whole).
    pub fn presets(&self) -> Arc<Presets> {
        self.presets.read().expect("lock").clone()
    }

    /// Where imported models live.
    pub fn models_dir(&self) -> &std::path::Path {
        &self.cfg.models_dir
    }

    /// The model's preset (an alias resolved), or 404. A request resolves its
    /// model once, here, and carries the preset to [`Supervisor::generate`].
    pub fn resolve(&self, model: &str) -> Result<Arc<Preset>> {
        self.presets()
            .resolve(model)
            .cloned()
            .ok_or_else(|| Error::ModelNotFound(model.to_string()))
    }

    /// The model's slot, by a name or alias.
    fn slot(&self, model: &str) -> Result<(String, mpsc::UnboundedSender<Command>)> {
        let preset = self.resolve(model)?;
        self.slot_of(&preset)
    }

    /// The preset's slot (created on first use) and its name. The preset in force
    /// is read under the slots lock, which a reload holds while it swaps the
    /// presets: a slot is never created from a preset a reload just replaced (a
    /// request resolved before the swap gets the new preset of the same name, or
    /// a 404 if the reload removed it).
    fn slot_of(&self, resolved: &Preset) -> Result<(String, mpsc::UnboundedSender<Command>)> {
        let arbiter = self.arbiter.get_or_init(|| self.budget.spawn()).clone();
        let mut slots = self.slots.lock().expect("lock");
        let presets = self.presets();
        let preset = presets
            .get(&resolved.name)
            .ok_or_else(|| Error::ModelNotFound(resolved.name.clone()))?;
        let slot = slots
            .entry(preset.name.clone())
            .or_insert_with(|| {
                Slot::spawn(
                    Preset::clone(preset),
                    preset.policy(),
                    self.cfg.clone(),
                    self.registry.clone(),
                    self.budget.probe().clone(),
                    Some(arbiter),
                )
            })
            .clone();
        Ok((preset.name.clone(), slot))
    }

    fn send(slot: &mpsc::UnboundedSender<Command>, cmd: Command) -> Result<()> {
        slot.send(cmd)
            .map_err(|_| Error::Internal("the model's slot has closed".into()))
    }

    fn pending(&self, id: u64, model: &str, job: Job, keep_alive: Option<KeepAlive>) -> Pending {
        Pending {
            id,
            job,
            may_start: self.live.read().expect("lock").may_start(model),
            keep_alive,
            retries: 0,
        }
    }

    /// Queues a generation on the model (loading it if needed). Every outcome,
    /// refusals included, arrives on the returned stream.
    pub fn generate(
        &self,
        preset: &Preset,
        mut gen: Generate,
        keep_alive: Option<KeepAlive>,
    ) -> Result<GenStream> {
        self.submit_stream(preset, keep_alive, |id, tx| {
            gen.id = id;
            Job::Generate { gen, tx }
        })
    }

    /// Queues an Embed on the model (loading it if needed); its vectors (or an
    /// error) arrive on the returned stream.
    pub fn embed(
        &self,
        preset: &Preset,
        mut embed: Embed,
        keep_alive: Option<KeepAlive>,
    ) -> Result<GenStream> {
        self.submit_stream(preset, keep_alive, |id, tx| {
            embed.id = id;
            Job::Embed { embed, tx }
        })
    }

    /// Queues the job `job(id, tx)` builds and returns the stream of its events.
    fn submit_stream(
        &self,
        preset: &Preset,
        keep_alive: Option<KeepAlive>,
        job: impl FnOnce(u64, mpsc::UnboundedSender<GenEvent>) -> Job,
    ) -> Result<GenStream> {
        self.check_memory(&preset.name)?;
        let (name, slot) = self.slot_of(preset)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let p = self.pending(id, &name, job(id, tx), keep_alive);
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
    pub async fn lease(&self, preset: &Preset, keep_alive: Option<KeepAlive>) -> Result<Lease> {
        self.check_memory(&preset.name)?;
        let (name, slot) = self.slot_of(preset)?;
        let (reply, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let p = self.pending(id, &name, Job::Lease { reply }, keep_alive);
        Self::send(&slot, Command::Submit(Box::new(p)))?;
        rx.await
            .map_err(|_| Error::Internal("the model's slot dropped a lease request".into()))?
    }

    /// Starts the model (ignoring `allow_models`) and waits until it is Ready.
    pub async fn start(&self, model: &str, pin: bool) -> Result<SlotInfo> {
        let (name, slot) = self.slot(model)?;
        let (reply, rx) = oneshot::channel();
        Self::send(&slot, Command::Start { pin, reply })?;
        self.await_start(name, &slot, rx).await
    }

    /// A fresh incarnation of the model (clears a Failed state).
    pub async fn restart(&self, model: &str) -> Result<SlotInfo> {
        let (name, slot) = self.slot(model)?;
        let (reply, rx) = oneshot::channel();
        Self::send(&slot, Command::Restart { reply })?;
        self.await_start(name, &slot, rx).await
    }

    async fn await_start(
        &self,
        model: String,
        slot: &mpsc::UnboundedSender<Command>,
        rx: oneshot::Receiver<Result<(), String>>,
    ) -> Result<SlotInfo> {
        match rx.await {
            Ok(Ok(())) => Self::info(slot).await,
            Ok(Err(reason)) => Err(Error::WorkerUnavailable { model, reason }),
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
        let name = self.resolve(model)?.name.clone();
        let Some(slot) = self.slots.lock().expect("lock").get(&name).cloned() else {
            return Ok(false);
        };
        let (reply, rx) = oneshot::channel();
        Self::send(&slot, Command::Stop { reply })?;
        match tokio::time::timeout(STOP_ANSWER_LIMIT, rx).await {
            Ok(Ok(was_running)) => Ok(was_running),
            Ok(Err(_)) => Err(Error::Internal("the model's slot closed".into())),
            Err(_) => Err(Error::Internal(format!(
                "the worker of '{}' did not exit within {} s of being killed",
                name,
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
                if info.state != Phase::Stopped || info.queued > 0 {
                    out.push(info);
                }
            }
        }
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// Where `reload` reads the configuration from (set once, by serve).
    pub fn set_config_source(&self, source: ConfigSource) {
        let _ = self.config_source.set(source);
    }

    /// Re-reads the configuration and every preset and applies the difference
    /// (`mlxd reload`, SIGHUP). Anything unreadable refuses the whole reload and
    /// changes nothing. Models whose preset is unchanged are not touched.
    pub async fn reload(&self) -> Result<ReloadReport> {
        let _one = self.reloading.lock().await;
        let source = self
            .config_source
            .get()
            .ok_or_else(|| Error::Internal("this daemon has no config to reload".into()))?;
        let refused = |e: anyhow::Error| Error::invalid(format!("reload refused: {e:#}"), None);
        let cfg = source().map_err(refused)?;
        let presets = Presets::load(&cfg.presets_dirs).map_err(refused)?;
        // Against the config the daemon started with: what is in force for those
        // fields (reported on every reload until the daemon restarts).
        let mut report = ReloadReport {
            needs_restart: reload::needs_restart(&self.cfg, &cfg),
            ..ReloadReport::default()
        };
        let mut updates = Vec::new();
        {
            // Held across the swap: `slot()` resolves presets under this lock.
            let mut slots = self.slots.lock().expect("lock");
            let old = self.presets();
            let diff = reload::diff_presets(&old, &presets);
            for name in &diff.changed {
                match slots.get(name) {
                    Some(slot) => {
                        let preset = Preset::clone(presets.get(name).expect("in the new presets"));
                        let (reply, rx) = oneshot::channel();
                        let cmd = Command::Reload {
                            preset: Box::new(preset),
                            reply,
                        };
                        if slot.send(cmd).is_ok() {
                            updates.push((name.clone(), rx));
                        }
                    }
                    None => report.updated.push(name.clone()),
                }
            }
            for name in &diff.removed {
                if let Some(slot) = slots.get(name) {
                    // Drains what it runs, refuses what waits, then the task ends.
                    // It stays in the map until then: the memory arbiter, ps and
                    // shutdown still see its worker, and no second slot of that
                    // name can start beside it (requests get 404 meanwhile: the
                    // preset is gone).
                    let (done, finished) = oneshot::channel();
                    if slot.send(Command::Shutdown(done)).is_ok() {
                        let (slots, name, slot) = (self.slots.clone(), name.clone(), slot.clone());
                        tokio::spawn(async move {
                            let _ = finished.await;
                            let mut map = slots.lock().expect("lock");
                            if map.get(&name).is_some_and(|s| s.same_channel(&slot)) {
                                map.remove(&name);
                            }
                        });
                    } else {
                        slots.remove(name);
                    }
                }
            }
            *self.presets.write().expect("lock") = Arc::new(presets);
            *self.live.write().expect("lock") = Arc::new(cfg);
            report.unchanged = diff.unchanged;
            report.added = diff.added;
            report.removed = diff.removed;
        }
        for (name, rx) in updates {
            match rx.await {
                Ok(true) => report.restarted.push(name),
                _ => report.updated.push(name),
            }
        }
        report.updated.sort();
        // Unchanged ones by count: every shipped preset is among them.
        tracing::info!(
            unchanged = report.unchanged.len(),
            restarted = ?report.restarted,
            updated = ?report.updated,
            added = ?report.added,
            removed = ?report.removed,
            needs_restart = ?report.needs_restart,
            "reloaded presets and config"
        );
        Ok(report)
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
