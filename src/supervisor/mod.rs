//! Worker lifecycle: one worker per model, started on demand or by `mlxd start`,
//! stopped by `mlxd stop` or daemon shutdown.

mod admission;
mod spawn;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;

pub use spawn::openblas_path;
pub use worker::{token_text, GenEvent, GenStream, WorkerHandle, WorkerInfo, WorkerState};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::presets::Presets;

pub struct Supervisor {
    cfg: Config,
    presets: Presets,
    /// Live (or failed, until replaced) workers by preset name. The lock is held
    /// only to look up or insert, never across a model load.
    workers: tokio::sync::Mutex<HashMap<String, Arc<WorkerHandle>>>,
}

impl Supervisor {
    pub fn new(cfg: Config, presets: Presets) -> Supervisor {
        Supervisor {
            cfg,
            presets,
            workers: Default::default(),
        }
    }

    pub fn presets(&self) -> &Presets {
        &self.presets
    }

    /// The model's worker, started if it is not running; waits until it is Ready.
    pub async fn ensure(&self, model: &str) -> Result<Arc<WorkerHandle>> {
        let preset = self
            .presets
            .resolve(model)
            .ok_or_else(|| Error::ModelNotFound(model.to_string()))?
            .clone();
        let handle = {
            let mut workers = self.workers.lock().await;
            match workers.get(&preset.name) {
                Some(h) if !h.state().is_terminal() => h.clone(),
                _ => {
                    let h = WorkerHandle::spawn(preset.clone(), &self.cfg).await?;
                    workers.insert(preset.name.clone(), h.clone());
                    h
                }
            }
        };
        handle.wait_ready().await?;
        Ok(handle)
    }

    /// Stops the model's worker; false if none was running.
    pub async fn stop(&self, model: &str) -> Result<bool> {
        let name = match self.presets.resolve(model) {
            Some(p) => p.name.clone(),
            None => return Err(Error::ModelNotFound(model.to_string())),
        };
        let handle = self.workers.lock().await.remove(&name);
        match handle {
            Some(h) => {
                h.stop().await;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    pub async fn ps(&self) -> Vec<WorkerInfo> {
        let workers = self.workers.lock().await;
        let mut out: Vec<_> = workers.values().map(|h| h.info()).collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// Stops every worker (daemon shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<_> = self.workers.lock().await.drain().map(|(_, h)| h).collect();
        futures::future::join_all(all.iter().map(|h| h.stop())).await;
    }
}
