//! Safe single-producer/single-consumer frame rings over a shared mapping. The ends,
//! `Producer` and `Consumer`, are implemented in `raw` next to the unsafe byte access
//! they alone perform; this module holds the public API types.
//!
//! Frames are `[len u32][kind u16][flags u16][payload]`, each padded to 8 bytes, and
//! never straddle the end of the data area: a Padding frame fills the tail end.
//! The doorbell is an eventcount: a consumer that finds the ring empty announces
//! `consumer_sleeping`, re-checks, then blocks on its pipe; a producer rings (the
//! caller writes one byte to the pipe) only when `push` reports that the consumer
//! announced sleep. While frames flow, no system call is made per frame.

pub(crate) mod raw;

#[cfg(feature = "loom")]
pub use raw::model_ring;
pub use raw::{Consumer, Producer};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("frame of {size} bytes exceeds the ring's limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("ring is corrupt: {0}")]
    Corrupt(&'static str),
}

/// Result of a push attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The frame is published. `wake`: the consumer announced sleep, so the caller
    /// must write one byte to the consumer's doorbell pipe.
    Yes { wake: bool },
    /// Not enough free space right now; nothing was written.
    Full,
}
