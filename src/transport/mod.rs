//! The daemon's end of a worker's transport.
//!
//! Both transports use the worker's pipes: stdin is the worker's lifeline (EOF = exit)
//! and stdout is the daemon's wake-up source. Over shm the pipes carry only doorbell
//! bytes and frames travel in the rings; over stdio they carry the frames.

mod shm;
mod stdio;

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{ChildStdin, ChildStdout};
use worker_protocol::ring::{Consumer, Producer, Pushed};
use worker_protocol::Frame;

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
}

/// How long a send waits for a full request ring before giving up on the worker.
const SEND_STALL_LIMIT: Duration = Duration::from_secs(30);

impl Outbound {
    pub fn new(stdin: ChildStdin, ring: Option<Producer>) -> Outbound {
        Outbound {
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            ring: ring.map(std::sync::Mutex::new),
        }
    }

    pub async fn send(&self, frame: &Frame) -> Result<(), TransportError> {
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
                Pushed::Yes { wake: true } => return self.write_pipe(&[1]).await,
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
    pub async fn run(self, on_frame: impl FnMut(Frame)) -> Result<(), TransportError> {
        match self {
            Inbound::Shm { events, bell } => shm::read_events(events, bell, on_frame).await,
            Inbound::Stdio { stdout } => stdio::read_frames(stdout, on_frame).await,
        }
    }
}
