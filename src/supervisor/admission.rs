//! Per-model admission: at most `max_concurrent` requests generate at once (the
//! worker's batch); up to `max_queue` more wait their turn in FIFO order (tokio's
//! semaphore is fair); beyond that a request is refused at once with 503, so a
//! burst cannot pile up unbounded work behind a model.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use metrics::{Counter, Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

pub struct Admission {
    model: String,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    queue_depth: Gauge,
    rejected: Counter,
}

/// A generation slot; dropping it lets the next queued request in.
pub type Slot = OwnedSemaphorePermit;

impl Admission {
    pub fn new(model: &str, max_concurrent: u32, max_queue: u32) -> Admission {
        Admission {
            model: model.to_string(),
            slots: Arc::new(Semaphore::new(max_concurrent as usize)),
            waiting: AtomicUsize::new(0),
            max_queue: max_queue as usize,
            queue_depth: metrics::gauge!("mlxd_queue_depth", "model" => model.to_string()),
            rejected: metrics::counter!("mlxd_requests_rejected_total", "model" => model.to_string()),
        }
    }

    /// Waits for a slot, or fails at once if the queue is full. A caller that
    /// gives up (client gone) leaves the queue when this future is dropped.
    pub async fn enter(&self) -> Result<Slot> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _queued = QueuedGuard(self);
        self.queue_depth.set((ahead + 1) as f64);
        if ahead >= self.max_queue {
            self.rejected.increment(1);
            return Err(Error::Overloaded {
                model: self.model.clone(),
                queued: ahead,
            });
        }
        Ok(self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed"))
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

struct QueuedGuard<'a>(&'a Admission);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        let left = self.0.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        self.0.queue_depth.set(left as f64);
    }
}
