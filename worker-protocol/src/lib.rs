//! mlxd's worker protocol: ONE definition of the frames the daemon and its mlx-lm
//! workers exchange, the lock-free SPSC shared-memory rings that carry them, and the
//! stdio framing used as fallback.
//!
//! - [`frame`]: frame kinds, JSON cold frames, binary hot frames (TokenBatch, Cancel).
//! - [`ring`]: `Producer`/`Consumer` over one ring, with the eventcount doorbell;
//!   all `unsafe` code is in `ring::raw`.
//! - [`segment`]: create/open/unlink a segment holding both rings; stale cleanup.
//! - [`stdio`]: incremental decoder for length-prefixed frames on pipes.
//! - [`schema`]: the JSON frames' schema and full examples, for the Python side's
//!   generated types and drift test.
//! - [`fuzz`]: the fuzz targets (cargo-fuzz and the bounded proptests share them).
//! - `python` (feature): the PyO3 bindings the Python worker imports.

pub mod frame;
pub mod fuzz;
pub mod ring;
pub mod schema;
// Real shared memory; under loom the rings run on a heap model instead.
#[cfg(not(feature = "loom"))]
pub mod segment;
pub mod stdio;

#[cfg(all(feature = "python", not(feature = "loom")))]
pub mod python;

pub use frame::{Frame, Kind, PROTOCOL_VERSION};
pub use ring::{Consumer, Producer, Pushed, RingError};
#[cfg(not(feature = "loom"))]
pub use segment::{Direction, Segment, SegmentError};
