//! Draining the events ring, sleeping on the doorbell pipe only when it is empty.

use metrics::Counter;
use tokio::io::AsyncReadExt;
use tokio::process::ChildStdout;
use worker_protocol::ring::Consumer;

use super::{Incoming, TransportError};

/// Empty polls (with a task yield between them) before announcing sleep: enough to
/// catch the next token of a fast worker without a system call, short enough not to
/// burn a core on an idle one.
const SPINS_BEFORE_SLEEP: u32 = 32;

/// The next frame in the ring, decoded; a corrupt ring or frame is a protocol error.
fn next_frame(events: &mut Consumer) -> Result<Option<Incoming>, TransportError> {
    let protocol = |e: &dyn std::fmt::Display| TransportError::Protocol(e.to_string());
    match events.pop().map_err(|e| protocol(&e))? {
        Some((kind, flags, payload)) => Incoming::decode_owned(kind, flags, payload)
            .map(Some)
            .map_err(|e| protocol(&e)),
        None => Ok(None),
    }
}

pub async fn read_events(
    mut events: Consumer,
    mut bell: ChildStdout,
    bells: Counter,
    mut on_frame: impl FnMut(Incoming),
) -> Result<(), TransportError> {
    let mut scratch = [0u8; 256];
    let mut idle = 0u32;
    loop {
        if let Some(frame) = next_frame(&mut events)? {
            on_frame(frame);
            idle = 0;
            continue;
        }
        if idle < SPINS_BEFORE_SLEEP {
            idle += 1;
            tokio::task::yield_now().await;
            continue;
        }
        idle = 0;
        if events.prepare_sleep() {
            let n = bell.read(&mut scratch).await;
            events.finish_sleep();
            let n = n?;
            bells.increment(n as u64);
            if n == 0 {
                // EOF: the worker is gone. Take whatever it published last.
                while let Some(frame) = next_frame(&mut events)? {
                    on_frame(frame);
                }
                return Ok(());
            }
        }
    }
}
