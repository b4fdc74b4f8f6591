//! ALL `unsafe` code of worker-protocol lives in this module.
//!
//! What is shared between the two processes, and who may write what:
//!
//! ```text
//! offset 0        SegmentHeader   written once by the creator; `magic` stored last (Release)
//! offset 128      RingControl[0]  daemon → worker ring: tail (producer), head (consumer), sleeping
//! offset 512      RingControl[1]  worker → daemon ring
//! offset 1024     data[0]         capacity[0] bytes, power of two
//! 1024 + cap[0]   data[1]         capacity[1] bytes, power of two
//! ```
//!
//! Each ring has exactly one producer and one consumer (enforced by `Segment`,
//! which hands each end out once per process, and by the protocol, which gives each
//! end to one process). Positions are monotonically increasing u64 byte counters;
//! `pos & (cap - 1)` is the offset in the data area. The producer owns the bytes in
//! `[tail, head + cap)`, the consumer the bytes in `[head, tail)`.
//!
//! SYNC POINTS: the producer writes frame bytes, then stores `tail` with Release; the
//! consumer loads `tail` with Acquire before reading those bytes (ARM64 needs both
//! halves: its memory model lets plain stores be seen out of order). Symmetrically the
//! consumer stores `head` with Release after it has finished reading, and the producer
//! loads `head` with Acquire before overwriting that space.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// "MLXDRING", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MLXDRING");
/// Version of the segment layout described above.
pub const LAYOUT_VERSION: u32 = 1;

pub const HEADER_OFFSET: usize = 0;
pub const CONTROL_OFFSETS: [usize; 2] = [128, 512];
pub const DATA_OFFSET: usize = 1024;

/// Keeps each atomic on its own cache line (128 bytes: Apple silicon's line size, and
/// two of x86's), so the producer's and the consumer's writes never share a line.
#[repr(C, align(128))]
pub struct Padded<T>(pub T);

#[repr(C)]
pub struct SegmentHeader {
    /// MAGIC once the creator has finished initializing; zero before.
    pub magic: AtomicU64,
    pub layout_version: AtomicU32,
    pub owner_pid: AtomicU32,
    pub capacity: [AtomicU64; 2],
    /// Which incarnation of the worker this segment belongs to (one ring per start).
    pub generation: AtomicU64,
}

#[repr(C)]
pub struct RingControl {
    /// Next byte the producer will write; published with Release.
    pub tail: Padded<AtomicU64>,
    /// Next byte the consumer will read; published with Release.
    pub head: Padded<AtomicU64>,
    /// 1 while the consumer is (about to be) blocked on its doorbell pipe.
    pub consumer_sleeping: Padded<AtomicU32>,
}

const _: () = assert!(std::mem::size_of::<SegmentHeader>() <= CONTROL_OFFSETS[0]);
const _: () = assert!(std::mem::size_of::<RingControl>() == 384);
const _: () = assert!(CONTROL_OFFSETS[0] + 384 <= CONTROL_OFFSETS[1]);
const _: () = assert!(CONTROL_OFFSETS[1] + 384 <= DATA_OFFSET);
const _: () =
    assert!(CONTROL_OFFSETS[0].is_multiple_of(128) && CONTROL_OFFSETS[1].is_multiple_of(128));

/// One `mmap` of a shared-memory segment, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access to it goes through atomics
// (control words) or through the SPSC ownership discipline documented at the top of
// this module, never through unsynchronized aliasing Rust references.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out atomics and the raw base pointer.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and read-write.
    pub fn map(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        let nz = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty segment"))?;
        // SAFETY: we map a fresh region chosen by the kernel (no address hint), so it
        // aliases no Rust object; `fd` is open for reading and writing and at least
        // `len` bytes long (the caller sized or fstat-checked it).
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(io::Error::from)?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn header(&self) -> &SegmentHeader {
        // SAFETY: the mapping is at least DATA_OFFSET bytes (checked by `Segment`
        // before any accessor is called), page-aligned, and lives as long as `&self`;
        // SegmentHeader holds only atomics, which may be shared freely.
        unsafe { &*self.ptr.as_ptr().add(HEADER_OFFSET).cast::<SegmentHeader>() }
    }

    pub fn control(&self, ring: usize) -> &RingControl {
        // SAFETY: CONTROL_OFFSETS are 128-aligned offsets inside the first
        // DATA_OFFSET bytes (const-asserted above); RingControl holds only atomics.
        unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(CONTROL_OFFSETS[ring])
                .cast::<RingControl>()
        }
    }

    /// Base pointer of ring `ring`'s data area. The caller must have checked that
    /// `offset + cap` lies inside the mapping.
    pub fn data_ptr(&self, offset: usize) -> *mut u8 {
        // SAFETY: `offset <= len` is checked by `Segment` before this is called, so
        // the result stays inside (or one past) the mapping.
        unsafe { self.ptr.as_ptr().add(offset) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and are unmapped once;
        // every Producer/Consumer holds an Arc<Mapping>, so no ring access outlives it.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// Raw access to one ring's data area. Safe to construct; the byte accessors are
/// `unsafe` because only the SPSC discipline makes them sound.
pub struct RawData {
    base: *mut u8,
    cap: u64,
}

// SAFETY: RawData is a pointer into a Mapping that its owner (Producer/Consumer)
// keeps alive through an Arc; moving it to another thread changes nothing about who
// may touch which bytes.
unsafe impl Send for RawData {}

impl RawData {
    /// `base` must point to `cap` bytes inside a mapping kept alive by the caller.
    pub fn new(base: *mut u8, cap: u64) -> RawData {
        RawData { base, cap }
    }

    /// Copies `src` into the ring at position `pos`.
    ///
    /// # Safety
    /// - `[pos, pos + src.len())` belongs to the producer: at or after `tail` and
    ///   before `head + cap`, with `head` loaded with Acquire after the consumer's
    ///   Release store;
    /// - the range does not cross the end of the data area
    ///   (`(pos & (cap-1)) + src.len() <= cap`);
    /// - only the single producer calls this.
    pub unsafe fn write(&self, pos: u64, src: &[u8]) {
        let off = (pos & (self.cap - 1)) as usize;
        debug_assert!(off + src.len() <= self.cap as usize);
        // SAFETY: in bounds by the second condition; nobody reads these bytes until
        // `tail` is published past them (first condition), so there is no data race.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(off), src.len()) }
    }

    /// Lends the producer-owned bytes `[pos, pos + len)` for writing in place.
    ///
    /// # Safety
    /// Same conditions as [`RawData::write`]; in addition the slice must be dropped
    /// before `tail` is published past it.
    #[allow(clippy::mut_from_ref)] // the SPSC discipline, not &mut self, gives exclusivity
    pub unsafe fn write_in_place(&self, pos: u64, len: usize) -> &mut [u8] {
        let off = (pos & (self.cap - 1)) as usize;
        debug_assert!(off + len <= self.cap as usize);
        // SAFETY: in bounds by the caller's conditions; only the single producer
        // touches producer-owned bytes, and the consumer does not read them until
        // tail is published, after this borrow ends.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(off), len) }
    }

    /// Lends the bytes `[pos, pos + len)` to the consumer.
    ///
    /// # Safety
    /// - `[pos, pos + len)` belongs to the consumer: at or after `head` and before a
    ///   `tail` loaded with Acquire;
    /// - the range does not cross the end of the data area;
    /// - the slice is dropped before `head` is advanced past it.
    pub unsafe fn read(&self, pos: u64, len: usize) -> &[u8] {
        let off = (pos & (self.cap - 1)) as usize;
        debug_assert!(off + len <= self.cap as usize);
        // SAFETY: in bounds by the second condition; the producer does not write
        // this range until the consumer publishes `head` past it (first and third
        // conditions), so the bytes are stable while borrowed.
        unsafe { std::slice::from_raw_parts(self.base.add(off), len) }
    }
}
