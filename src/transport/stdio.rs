//! Length-prefixed frames on the worker's stdout.

use tokio::io::AsyncReadExt;
use tokio::process::ChildStdout;
use worker_protocol::stdio::StdioDecoder;
use worker_protocol::Frame;

use super::TransportError;

pub async fn read_frames(
    mut stdout: ChildStdout,
    mut on_frame: impl FnMut(Frame),
) -> Result<(), TransportError> {
    let mut decoder = StdioDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            return decoder
                .finish()
                .map_err(|e| TransportError::Protocol(e.to_string()));
        }
        decoder.feed(&buf[..n]);
        while let Some(frame) = decoder
            .next_frame()
            .map_err(|e| TransportError::Protocol(e.to_string()))?
        {
            on_frame(frame);
        }
    }
}
