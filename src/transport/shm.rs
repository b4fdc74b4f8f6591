//! Draining the events ring, sleeping on the doorbell pipe only when it is empty.

use tokio::io::AsyncReadExt;
use tokio::process::ChildStdout;
use worker_protocol::ring::Consumer;
use worker_protocol::Frame;

use super::TransportError;

/// Empty polls (with a task yield between them) before announcing sleep: enough to
/// catch the next token of a fast worker without a system call, short enough not to
/// burn a core on an idle one.
const SPINS_BEFORE_SLEEP: u32 = 32;

pub async fn read_events(
    mut events: Consumer,
    mut bell: ChildStdout,
    mut on_frame: impl FnMut(Frame),
) -> Result<(), TransportError> {
    let mut scratch = [0u8; 256];
    let mut idle = 0u32;
    loop {
        match events
            .pop_with(|kind, flags, payload| Frame::decode(kind, flags, payload))
            .map_err(|e| TransportError::Protocol(e.to_string()))?
        {
            Some(frame) => {
                on_frame(frame.map_err(|e| TransportError::Protocol(e.to_string()))?);
                idle = 0;
                continue;
            }
            None if idle < SPINS_BEFORE_SLEEP => {
                idle += 1;
                tokio::task::yield_now().await;
                continue;
            }
            None => {}
        }
        idle = 0;
        if events.prepare_sleep() {
            let n = bell.read(&mut scratch).await;
            events.finish_sleep();
            match n {
                Ok(0) => {
                    // EOF: the worker is gone. Take whatever it published last.
                    while let Some(frame) = events
                        .pop_with(|k, f, p| Frame::decode(k, f, p))
                        .map_err(|e| TransportError::Protocol(e.to_string()))?
                    {
                        on_frame(frame.map_err(|e| TransportError::Protocol(e.to_string()))?);
                    }
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
