//! Stdio framing: the same frames, length-prefixed on the worker's pipes, unpadded.
//! `StdioDecoder` is incremental so that async (daemon) and blocking (tests) readers
//! share it; frames split across reads, stalls and EOF mid-frame are all handled here.

use crate::frame::{read_header, Frame, FrameError, HEADER_LEN};

/// Refuse frames larger than this (a hostile or broken peer must not make us
/// allocate without bound). Matches the largest request body the daemon accepts.
pub const MAX_STDIO_FRAME: usize = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StdioError {
    #[error("frame of {0} bytes exceeds the {MAX_STDIO_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("stream ended in the middle of a frame ({0} bytes buffered)")]
    TruncatedAtEof(usize),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A frame as (kind, flags, payload) borrowed from the decoder's buffer.
pub type RawFrame<'a> = (u16, u16, &'a [u8]);

/// Accumulates bytes and yields whole frames.
#[derive(Default)]
pub struct StdioDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl StdioDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame as (kind, flags, payload), or None if more bytes are needed.
    pub fn next_raw(&mut self) -> Result<Option<RawFrame<'_>>, StdioError> {
        let pending = &self.buf[self.start..];
        let Some(header) = pending.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let (len, kind, flags) = read_header(header.try_into().expect("8 bytes"));
        let len = len as usize;
        if len > MAX_STDIO_FRAME {
            return Err(StdioError::TooLarge(len));
        }
        if pending.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let at = self.start + HEADER_LEN;
        self.start = at + len;
        Ok(Some((kind, flags, &self.buf[at..at + len])))
    }

    /// The next whole decoded frame, or None if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, StdioError> {
        match self.next_raw()? {
            Some((k, f, p)) => Ok(Some(Frame::decode(k, f, p)?)),
            None => Ok(None),
        }
    }

    /// Call at EOF: an error if a partial frame is buffered.
    pub fn finish(&self) -> Result<(), StdioError> {
        match self.buf.len() - self.start {
            0 => Ok(()),
            n => Err(StdioError::TruncatedAtEof(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Done, Frame};

    #[test]
    fn frames_split_at_every_byte_boundary_decode_whole() {
        let frames = vec![
            Frame::Cancel { id: 5 },
            Frame::Shutdown,
            Frame::Done(Done {
                id: 5,
                finish_reason: "stop".into(),
                prompt_tokens: 1,
                completion_tokens: 2,
                prompt_tps: 0.0,
                generation_tps: 0.0,
                speculative: None,
                stop_sequence: None,
                cached_tokens: 0,
                reasoning_tokens: 0,
            }),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode()).collect();
        for split in 0..wire.len() {
            let mut d = StdioDecoder::new();
            let mut got = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                d.feed(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split at {split}");
            d.finish().unwrap();
        }
    }

    #[test]
    fn eof_mid_frame_and_oversized_frames_are_errors() {
        let wire = Frame::Cancel { id: 1 }.encode();
        let mut d = StdioDecoder::new();
        d.feed(&wire[..11]);
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.finish(), Err(StdioError::TruncatedAtEof(11)));
        let mut d = StdioDecoder::new();
        d.feed(&[0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
        assert!(matches!(d.next_frame(), Err(StdioError::TooLarge(_))));
    }
}
