//! The memory arbiter: one task that admits loads against the budget, one at a
//! time, so that two loads never count the same free memory. It asks the other
//! slots what they hold, plans with `memory::plan`, evicts (each victim drains
//! first, never cut off), and answers the slot that asked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// The settings that would make it fit, appended to a refusal.
    pub hint: String,
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
    /// The smallest discrete GPU memory a worker reported (0: none): on MLX
    /// CUDA the budget is the device's memory, not the host's.
    device_memory: Arc<AtomicU64>,
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
    /// The weights (and a draft's) as the worker's MLX holds them; before the
    /// worker says, the safetensors' size.
    pub weights_bytes: u64,
    /// The KV of the sequences in flight, what they may still grow to, the
    /// reserve the load guaranteed, and the prefix cache.
    pub kv_in_use_bytes: u64,
    pub kv_reserved_bytes: u64,
    pub kv_reserve_bytes: u64,
    pub prompt_cache_bytes: u64,
    /// KV bytes per token (while shorter than every sliding window).
    pub kv_bytes_per_token: u64,
    /// The worker's share of the budget, and what of it is neither held nor
    /// promised: room for more KV.
    pub share_bytes: u64,
    pub headroom_bytes: u64,
    /// What of the share KV and the prefix cache may fill (the share less what
    /// the worker holds with nothing in flight).
    pub kv_capacity_bytes: u64,
    /// Requests waiting for KV memory, refused because theirs could never fit,
    /// and prefix-cache entries dropped to make room for one.
    pub waiting_for_memory: u32,
    pub kv_refused_total: u64,
    pub kv_evicted_for_room_total: u64,
    pub pinned: bool,
    /// Unix time of its last request.
    pub last_used: Option<u64>,
    pub inflight: usize,
}

/// The smallest share a worker is told (see `share`).
const MIN_SHARE: u64 = 64 << 20;

/// How many plan → evict rounds one load may take before it gives up.
const ROUNDS: usize = 4;

impl Budget {
    pub fn new(cfg: Arc<Config>, probe: Arc<dyn Probe>, slots: Slots) -> Budget {
        Budget {
            cfg,
            probe,
            slots,
            shedding: Arc::new(AtomicBool::new(false)),
            device_memory: Arc::new(AtomicU64::new(0)),
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
                let result = budget
                    .admit(&req.model, req.need)
                    .await
                    .map_err(|why| why + &req.hint);
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
        self.cfg.memory_cap.resolve(self.total())
    }

    /// The memory the budget is a share of: the host's, or a discrete GPU's
    /// when a worker reported a smaller one.
    fn total(&self) -> u64 {
        let host = self.probe.system().total;
        match self.device_memory.load(Ordering::Relaxed) {
            0 => host,
            device => host.min(device),
        }
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
        // One round of questions to the slots (each measures its worker's
        // footprint) serves both the shares and the shed check.
        let infos = self.infos().await;
        self.share(&infos);
        let report = self.report_of(infos);
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

    /// Tells each running worker its share of the budget: the cap less what the
    /// others hold (each at least its estimate, so their reserves stay theirs).
    /// A worker grows its KV into its share; the share shrinks as others load.
    fn share(&self, infos: &[(mpsc::UnboundedSender<Command>, SlotInfo)]) {
        if let Some(device) = infos.iter().filter_map(|(_, i)| i.device_memory).min() {
            self.device_memory.store(device, Ordering::Relaxed);
        }
        let residents: Vec<Resident> = infos.iter().filter_map(|(_, i)| resident(i)).collect();
        let cap = self.cap();
        for (slot, info) in infos {
            if info.state != Phase::Ready {
                continue;
            }
            // Never 0, which MLX and the worker would read as "no limit": an
            // over-committed worker refuses what could never fit its sliver.
            let share = share_of(cap, &info.model, &residents).max(MIN_SHARE);
            let _ = slot.send(Command::MemoryLimit(share));
        }
    }

    async fn admit(&self, model: &str, need: u64) -> Result<u64, String> {
        for _ in 0..ROUNDS {
            let infos = self.infos().await;
            let residents: Vec<Resident> = infos.iter().filter_map(|(_, i)| resident(i)).collect();
            let cap = self.cap();
            let victims = match memory::plan(cap, model, need, &residents) {
                Plan::Admit => return Ok(share_of(cap, model, &residents)),
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
        let infos = self.infos().await;
        self.report_of(infos)
    }

    fn report_of(&self, infos: Vec<(mpsc::UnboundedSender<Command>, SlotInfo)>) -> MemoryReport {
        let system = self.probe.system();
        let models: Vec<ModelMemory> = infos
            .into_iter()
            .map(|(_, i)| i)
            .filter(|i| i.state != Phase::Stopped)
            .map(|i| ModelMemory {
                weights_bytes: i
                    .stats
                    .kv
                    .as_ref()
                    .map(|kv| kv.weights_bytes)
                    .or(i.estimate.as_ref().map(|e| e.weights_bytes + e.draft_bytes))
                    .unwrap_or(0),
                kv_in_use_bytes: i.stats.kv.as_ref().map_or(0, |kv| kv.in_use_bytes),
                kv_reserved_bytes: i.stats.kv.as_ref().map_or(0, |kv| kv.reserved_bytes),
                kv_reserve_bytes: i.estimate.as_ref().map_or(0, |e| e.reserve_bytes),
                kv_bytes_per_token: i.estimate.as_ref().map_or(0, |e| e.kv_bytes_per_token),
                prompt_cache_bytes: i.stats.prompt_cache.as_ref().map_or(0, |pc| pc.bytes),
                share_bytes: i.memory_limit.unwrap_or(0),
                headroom_bytes: i.headroom_bytes(),
                waiting_for_memory: i.stats.kv.as_ref().map_or(0, |kv| kv.waiting),
                kv_capacity_bytes: i.stats.kv.as_ref().map_or(0, |kv| kv.capacity_bytes),
                kv_refused_total: i.stats.kv.as_ref().map_or(0, |kv| kv.refused_total),
                kv_evicted_for_room_total: i
                    .stats
                    .kv
                    .as_ref()
                    .map_or(0, |kv| kv.evicted_for_room_total),
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
        let total = self.total();
        let cap_bytes = self.cfg.memory_cap.resolve(total);
        let shed_bytes = self.cfg.memory_shed.resolve(total);
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
        // A loaded one holds at least its estimate (its KV reserve stays its own
        // while unused) and at least what it has promised its sequences: their
        // KV to max_tokens and its prefix cache beside its baseline, so that two
        // workers do not count the same free memory for their reservations.
        Phase::Starting | Phase::Ready | Phase::Draining | Phase::Crashed => {
            let promised = i.stats.kv.as_ref().map_or(0, |kv| {
                let cache = i.stats.prompt_cache.as_ref().map_or(0, |pc| pc.bytes);
                kv.baseline_bytes + kv.reserved_bytes + cache
            });
            i.footprint_bytes.max(i.estimate_bytes).max(promised)
        }
    };
    Some(Resident {
        model: i.model.clone(),
        bytes,
        pinned: i.pinned,
        busy: i.inflight + i.queued > 0,
        idle: Duration::from_secs_f64(i.idle_s.max(0.0)),
    })
}

/// `model`'s share of `cap`: what the other residents do not hold.
fn share_of(cap: u64, model: &str, residents: &[Resident]) -> u64 {
    let others: u64 = residents
        .iter()
        .filter(|r| r.model != model)
        .map(|r| r.bytes)
        .sum();
    cap.saturating_sub(others)
}
