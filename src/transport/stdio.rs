//! Length-prefixed frames on the worker's stdout.

use super::{Incoming, TransportError};
use tokio::io::AsyncReadExt;
use tokio::process::ChildStdout;
use worker_protocol::stdio::StdioDecoder;

pub async fn read_frames(
    mut stdout: ChildStdout,
    mut on_frame: impl FnMut(Incoming),
) -> Result<(), TransportError> {
    let mut decoder = StdioDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let protocol = |e: &dyn std::fmt::Display| TransportError::Protocol(e.to_string());
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            return decoder.finish().map_err(|e| protocol(&e));
        }
        decoder.feed(&buf[..n]);
        while let Some((kind, flags, payload)) = decoder.next_raw().map_err(|e| protocol(&e))? {
            on_frame(Incoming::decode(kind, flags, payload).map_err(|e| protocol(&e))?);
        }
    }
}
