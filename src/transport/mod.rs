//! The daemon's end of a worker's transport.
//!
//! Both transports use the worker's pipes: stdin is the worker's lifeline (EOF = exit)
//! and stdout is the daemon's wake-up source. Over shm the pipes carry only doorbell
//! bytes and frames travel in the rings; over stdio they carry the frames.

mod shm;
mod stdio;

use std::time::Duration;

use bytes::Bytes;
use metrics::Counter;
use tokio::io::AsyncWriteExt;
use tokio::process::{ChildStdin, ChildStdout};
use worker_protocol::frame::FrameError;
use worker_protocol::ring::{Consumer, Producer, Pushed};
use worker_protocol::{Frame, Kind};

/// A frame from a worker as the reader hands it on. Token batches stay raw: the
/// fan-out routes each entry as a slice of this one buffer, allocating nothing
/// per token.
pub enum Incoming {
    Tokens(Bytes),
    Frame(Frame),
}

impl Incoming {
    /// A frame whose payload the caller already owns (the shm ring's copy): a
    /// token batch becomes the shared buffer without another copy.
    pub fn decode_owned(kind: u16, flags: u16, payload: Vec<u8>) -> Result<Incoming, FrameError> {
        if kind == Kind::TokenBatch as u16 {
            // Check every entry here, so a broken batch is a protocol error (the
            // worker is killed) rather than tokens dropped later during routing.
            for entry in worker_protocol::frame::token_batch_entries(&payload)? {
                entry?;
            }
            return Ok(Incoming::Tokens(Bytes::from(payload)));
        }
        Frame::decode(kind, flags, &payload).map(Incoming::Frame)
    }

    /// A frame borrowed from a reader's buffer (stdio).
    pub fn decode(kind: u16, flags: u16, payload: &[u8]) -> Result<Incoming, FrameError> {
        if kind == Kind::TokenBatch as u16 {
            return Incoming::decode_owned(kind, flags, payload.to_vec());
        }
        Frame::decode(kind, flags, payload).map(Incoming::Frame)
    }
}

/// Frames and doorbell bytes each way, per worker: the doorbell should ring far
/// less often than frames flow (only for a reader that went to sleep).
#[derive(Clone)]
pub struct WireCounters {
    pub frames_in: Counter,
    pub bells_in: Counter,
    pub frames_out: Counter,
    pub bells_out: Counter,
}

impl WireCounters {
    pub fn new(model: &str) -> WireCounters {
        let c = |name: &'static str, dir: &'static str| metrics::counter!(name, "model" => model.to_string(), "direction" => dir);
        WireCounters {
            frames_in: c("mlxd_worker_frames_total", "from_worker"),
            bells_in: c("mlxd_worker_doorbells_total", "from_worker"),
            frames_out: c("mlxd_worker_frames_total", "to_worker"),
            bells_out: c("mlxd_worker_doorbells_total", "to_worker"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("worker pipe: {0}")]
    Io(#[from] std::io::Error),
    #[error("worker sent a bad frame: {0}")]
    Protocol(String),
    #[error("request ring to the worker stayed full for {0:?}")]
    Stalled(Duration),
    #[error("worker transport is closed")]
    Closed,
}

/// Frames from the daemon to one worker.
pub struct Outbound {
    /// None once closed (the worker then sees EOF and exits).
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    /// The request ring, for the shm transport.
    ring: Option<std::sync::Mutex<Producer>>,
    counters: WireCounters,
}

/// How long a send waits for a full request ring before giving up on the worker.
const SEND_STALL_LIMIT: Duration = Duration::from_secs(30);

impl Outbound {
    pub fn new(stdin: ChildStdin, ring: Option<Producer>, counters: WireCounters) -> Outbound {
        Outbound {
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            ring: ring.map(std::sync::Mutex::new),
            counters,
        }
    }

    pub async fn send(&self, frame: &Frame) -> Result<(), TransportError> {
        self.counters.frames_out.increment(1);
        let Some(ring) = &self.ring else {
            return self.write_pipe(&frame.encode()).await;
        };
        let mut payload = Vec::new();
        frame.encode_payload(&mut payload);
        let kind = frame.kind() as u16;
        let started = tokio::time::Instant::now();
        loop {
            let pushed = ring
                .lock()
                .expect("ring lock poisoned")
                .try_push(kind, 0, &payload)
                .map_err(|e| TransportError::Protocol(e.to_string()))?;
            match pushed {
                Pushed::Yes { wake: true } => {
                    self.counters.bells_out.increment(1);
                    return self.write_pipe(&[1]).await;
                }
                Pushed::Yes { wake: false } => return Ok(()),
                Pushed::Full if started.elapsed() > SEND_STALL_LIMIT => {
                    return Err(TransportError::Stalled(SEND_STALL_LIMIT))
                }
                Pushed::Full => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    async fn write_pipe(&self, bytes: &[u8]) -> Result<(), TransportError> {
        let mut stdin = self.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or(TransportError::Closed)?;
        pipe.write_all(bytes).await?;
        pipe.flush().await?;
        Ok(())
    }

    /// Closes the worker's stdin: its lifeline. The worker exits on EOF.
    pub async fn close(&self) {
        self.stdin.lock().await.take();
    }
}

/// Frames from one worker to the daemon.
pub enum Inbound {
    Shm { events: Consumer, bell: ChildStdout },
    Stdio { stdout: ChildStdout },
}

impl Inbound {
    /// Reads frames until the worker's stdout closes (Ok) or it misbehaves (Err).
    pub async fn run(
        self,
        counters: WireCounters,
        mut on_frame: impl FnMut(Incoming),
    ) -> Result<(), TransportError> {
        let frames_in = counters.frames_in.clone();
        let counted = move |f: Incoming| {
            frames_in.increment(1);
            on_frame(f)
        };
        match self {
            Inbound::Shm { events, bell } => {
                shm::read_events(events, bell, counters.bells_in, counted).await
            }
            Inbound::Stdio { stdout } => stdio::read_frames(stdout, counted).await,
        }
    }
}
