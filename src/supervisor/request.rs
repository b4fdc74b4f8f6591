//! A request as the slot carries it, and the handles its client holds: the stream of
//! its events (which cancels the request when dropped early) and, for the `http`
//! transport, a lease on the worker's port.

use tokio::sync::{mpsc, oneshot};
use worker_protocol::frame::{Embed, Generate};

use super::incarnation::GenEvent;
use super::slot::Command;
use crate::error::{Error, Result};
use crate::presets::KeepAlive;

/// A request waiting in a slot's queue.
pub struct Pending {
    pub id: u64,
    pub job: Job,
    /// False when `allow_models` does not let requests load this model: it is
    /// served only while something else (`mlxd start`) keeps it running.
    pub may_start: bool,
    /// The request's own keep-alive (Ollama's `keep_alive`), applied when it starts.
    pub keep_alive: Option<KeepAlive>,
    /// How often it was handed to an incarnation that died before starting it.
    pub retries: u8,
}

pub enum Job {
    Generate {
        gen: Generate,
        tx: mpsc::UnboundedSender<GenEvent>,
    },
    /// Its one answer is `GenEvent::Embeddings` (or an Error).
    Embed {
        embed: Embed,
        tx: mpsc::UnboundedSender<GenEvent>,
    },
    Lease {
        reply: oneshot::Sender<Result<Lease>>,
    },
}

impl Pending {
    /// Ends the request with `e` (the client gets it in its dialect).
    pub fn fail(self, e: Error) {
        match self.job {
            Job::Generate { tx, .. } | Job::Embed { tx, .. } => {
                let _ = tx.send(GenEvent::Error(e));
            }
            Job::Lease { reply } => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The client has gone away (nobody would read the answer).
    pub fn abandoned(&self) -> bool {
        match &self.job {
            Job::Generate { tx, .. } | Job::Embed { tx, .. } => tx.is_closed(),
            Job::Lease { reply } => reply.is_closed(),
        }
    }
}

/// The events of one generation, in order. Dropping it before the end cancels the
/// generation: it leaves the queue, or the worker stops it.
pub struct GenStream {
    pub(super) id: u64,
    pub(super) model: String,
    pub(super) rx: mpsc::UnboundedReceiver<GenEvent>,
    pub(super) slot: mpsc::UnboundedSender<Command>,
    pub(super) finished: bool,
}

impl GenStream {
    pub async fn next(&mut self) -> Option<GenEvent> {
        if self.finished {
            return None;
        }
        let ev = self.rx.recv().await;
        match &ev {
            Some(e) if !e.is_final() => {}
            Some(_) => self.finished = true,
            None => {
                // Every path that drops a request's sender sends its end first; a
                // silent end would be a bug, and the client still gets a clear error.
                self.finished = true;
                return Some(GenEvent::Error(Error::WorkerFailed {
                    model: self.model.clone(),
                    reason: "the request was dropped without an answer".into(),
                }));
            }
        }
        ev
    }

    /// The next event if one is already waiting: lets a slow client's pending
    /// tokens be coalesced into one chunk.
    pub fn try_next(&mut self) -> Option<GenEvent> {
        if self.finished {
            return None;
        }
        let ev = self.rx.try_recv().ok()?;
        if ev.is_final() {
            self.finished = true;
        }
        Some(ev)
    }
}

impl Drop for GenStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.slot.send(Command::Cancel(self.id));
        }
    }
}

/// A place in the model's concurrency limit for a request the worker serves over
/// its own HTTP port (the `http` transport); released when dropped.
pub struct Lease {
    pub port: u16,
    pub(super) incarnation: u64,
    pub(super) slot: mpsc::UnboundedSender<Command>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.slot.send(Command::Release(self.incarnation));
    }
}
