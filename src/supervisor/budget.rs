//! The memory arbiter: one task that admits loads against the budget, one at a
//! time, so that two loads never count the same free memory. It asks the other
//! slots what they hold, plans with `memory::plan`, evicts (each victim drains
//! first, never cut off), and answers the slot that asked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::slot::{Command, SlotInfo};
use super::state::Phase;
use crate::config::Config;
use crate::memory::{self, human, Plan, Probe, Resident};

/// A slot's request to load `model`, which needs `need` bytes. The answer is the
/// share of the budget the worker may grow to (its MLX memory limit), or why not.
pub struct Admit {
    pub model: String,
    pub need: u64,
    pub reply: oneshot::Sender<Result<u64, String>>,
}

pub type Slots = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Command>>>>;

#[derive(Clone)]
pub struct Budget {
    cfg: Arc<Config>,
    probe: Arc<dyn Probe>,
    slots: Slots,
    /// Above the shed mark: new generation requests are refused.
    shedding: Arc<AtomicBool>,
}

/// How often the shedding watch looks at memory.
const WATCH: Duration = Duration::from_millis(500);

/// `GET /admin/memory`.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    pub cap_bytes: u64,
    pub shed_bytes: u64,
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// What the workers use together (their footprints).
    pub used_bytes: u64,
    pub footprint_source: &'static str,
    pub models: Vec<ModelMemory>,
}

#[derive(Debug, Serialize)]
pub struct ModelMemory {
    pub model: String,
    pub state: Phase,
    pub footprint_bytes: u64,
    pub estimate_bytes: u64,
    pub pinned: bool,
    /// Unix time of its last request.
    pub last_used: Option<u64>,
    pub inflight: usize,
}

/// How many plan → evict rounds one load may take before it gives up.
const ROUNDS: usize = 4;

impl Budget {
    pub fn new(cfg: Arc<Config>, probe: Arc<dyn Probe>, slots: Slots) -> Budget {
        Budget {
            cfg,
            probe,
            slots,
            shedding: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether memory is above the shed mark right now.
    pub fn shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    pub fn probe(&self) -> &Arc<dyn Probe> {
        &self.probe
    }

    /// Starts the arbiter (loads are admitted in the order they ask) and the
    /// shedding watch.
    pub fn spawn(&self) -> mpsc::UnboundedSender<Admit> {
        let watch = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH);
            loop {
                tick.tick().await;
                watch.watch().await;
            }
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<Admit>();
        let budget = self.clone();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let result = budget.admit(&req.model, req.need).await;
                match &result {
                    Ok(limit) => tracing::info!(
                        model = %req.model,
                        need = %human(req.need),
                        limit = %human(*limit),
                        "load admitted"
                    ),
                    Err(why) => tracing::warn!(model = %req.model, "load refused: {why}"),
                }
                let _ = req.reply.send(result);
            }
        });
        tx
    }

    pub fn cap(&self) -> u64 {
        self.cfg.memory_cap.resolve(self.probe.system().total)
    }

    async fn infos(&self) -> Vec<(mpsc::UnboundedSender<Command>, SlotInfo)> {
        let slots: Vec<_> = self.slots.lock().expect("lock").values().cloned().collect();
        let mut out = Vec::new();
        for slot in slots {
            let (reply, rx) = oneshot::channel();
            if slot.send(Command::Info(reply)).is_ok() {
                if let Ok(info) = rx.await {
                    out.push((slot, info));
                }
            }
        }
        out
    }

    /// Above the shed mark (the workers together, or the whole machine): refuse new
    /// requests and ask every worker to give its cache back, once per episode.
    async fn watch(&self) {
        let report = self.report().await;
        let machine_used = report.total_bytes.saturating_sub(report.available_bytes);
        let over = report.used_bytes > report.shed_bytes || machine_used > report.shed_bytes;
        let was = self.shedding.swap(over, Ordering::Relaxed);
        metrics::gauge!("mlxd_memory_shedding").set(if over { 1.0 } else { 0.0 });
        if over && !was {
            tracing::warn!(
                used = %human(report.used_bytes),
                machine_used = %human(machine_used),
                shed = %human(report.shed_bytes),
                "memory above the shed mark: refusing new requests, clearing caches"
            );
            let slots: Vec<_> = self.slots.lock().expect("lock").values().cloned().collect();
            for slot in slots {
                let _ = slot.send(Command::ClearCache);
            }
        } else if was && !over {
            tracing::info!("memory back under the shed mark");
        }
    }

    async fn admit(&self, model: &str, need: u64) -> Result<u64, String> {
        for _ in 0..ROUNDS {
            let infos = self.infos().await;
            let residents: Vec<Resident> = infos.iter().filter_map(|(_, i)| resident(i)).collect();
            let cap = self.cap();
            let victims = match memory::plan(cap, model, need, &residents) {
                Plan::Admit => {
                    let others: u64 = residents
                        .iter()
                        .filter(|r| r.model != model)
                        .map(|r| r.bytes)
                        .sum();
                    return Ok(cap.saturating_sub(others));
                }
                Plan::Refuse(why) => return Err(why),
                Plan::Evict(victims) => victims,
            };
            tracing::info!(%model, ?victims, "evicting to make room");
            let mut waits = Vec::new();
            for (slot, info) in &infos {
                if victims.contains(&info.model) {
                    let (reply, rx) = oneshot::channel();
                    let reason =
                        format!("'{}' was unloaded to make room for '{model}'", info.model);
                    if slot.send(Command::Evict { reason, reply }).is_ok() {
                        waits.push(rx);
                    }
                }
            }
            // A victim with requests in flight finishes them first: this may take
            // as long as they do.
            futures::future::join_all(waits).await;
            // Its process is gone; the kernel may take a moment to give memory back.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "could not make room for '{model}' ({} needed)",
            human(need)
        ))
    }

    pub async fn report(&self) -> MemoryReport {
        let system = self.probe.system();
        let models: Vec<ModelMemory> = self
            .infos()
            .await
            .into_iter()
            .map(|(_, i)| i)
            .filter(|i| i.state != Phase::Stopped)
            .map(|i| ModelMemory {
                model: i.model,
                state: i.state,
                footprint_bytes: i.footprint_bytes,
                estimate_bytes: i.estimate_bytes,
                pinned: i.pinned,
                last_used: i.last_used,
                inflight: i.inflight,
            })
            .collect();
        let used = models.iter().map(|m| m.footprint_bytes).sum();
        let cap_bytes = self.cfg.memory_cap.resolve(system.total);
        let shed_bytes = self.cfg.memory_shed.resolve(system.total);
        metrics::gauge!("mlxd_memory_used_bytes").set(used as f64);
        // Exported beside the usage so that a dashboard can draw the limits it is
        // measured against (they follow the machine's total when given as shares).
        metrics::gauge!("mlxd_memory_cap_bytes").set(cap_bytes as f64);
        metrics::gauge!("mlxd_memory_shed_bytes").set(shed_bytes as f64);
        MemoryReport {
            cap_bytes,
            shed_bytes,
            total_bytes: system.total,
            available_bytes: system.available,
            used_bytes: used,
            footprint_source: memory::FOOTPRINT_SOURCE,
            models,
        }
    }
}

/// A slot that holds (or is about to hold) memory, as the planner sees it.
fn resident(i: &SlotInfo) -> Option<Resident> {
    let bytes = match i.state {
        // No process, and none before its admission (Admitting asks in turn).
        Phase::Stopped | Phase::Admitting | Phase::Backoff | Phase::Failed => return None,
        // A load in progress will grow to its estimate.
        Phase::Starting => i.footprint_bytes.max(i.estimate_bytes),
        Phase::Ready | Phase::Draining | Phase::Crashed => i.footprint_bytes,
    };
    Some(Resident {
        model: i.model.clone(),
        bytes,
        pinned: i.pinned,
        busy: i.inflight + i.queued > 0,
        idle: Duration::from_secs_f64(i.idle_s.max(0.0)),
    })
}
