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

// With the `loom` feature (worker-protocol/tests/loom.rs) the same ring code runs on
// loom's atomics and on a heap model of the segment whose data bytes are loom cells,
// so the model checker sees every ordering the ring relies on.
#[cfg(feature = "loom")]
use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(feature = "loom"))]
use std::io;
#[cfg(not(feature = "loom"))]
use std::os::fd::{AsFd, OwnedFd};
#[cfg(not(feature = "loom"))]
use std::ptr::NonNull;
#[cfg(not(feature = "loom"))]
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::{Pushed, RingError};
use crate::frame::{read_header, write_header, Kind, HEADER_LEN};

/// "MLXDRING", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MLXDRING");
/// Version of the segment layout described above.
pub const LAYOUT_VERSION: u32 = 2;

#[cfg_attr(feature = "loom", allow(dead_code))]
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
    /// Which incarnation of the worker this segment belongs to (one ring per start);
    /// the worker refuses a segment whose generation is not the one it was given.
    pub generation: AtomicU64,
    /// Advanced by the worker on every engine loop iteration and prefill chunk; the
    /// daemon declares a worker with requests in flight hung when it stops moving.
    /// A plain counter: only the worker writes it, and its value orders nothing.
    pub heartbeat: AtomicU64,
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

#[cfg(not(feature = "loom"))]
const _: () = assert!(std::mem::size_of::<SegmentHeader>() <= CONTROL_OFFSETS[0]);
#[cfg(not(feature = "loom"))]
const _: () = assert!(std::mem::size_of::<RingControl>() == 384);
const _: () = assert!(CONTROL_OFFSETS[0] + 384 <= CONTROL_OFFSETS[1]);
const _: () = assert!(CONTROL_OFFSETS[1] + 384 <= DATA_OFFSET);
const _: () =
    assert!(CONTROL_OFFSETS[0].is_multiple_of(128) && CONTROL_OFFSETS[1].is_multiple_of(128));

/// One `mmap` of a shared-memory segment, unmapped on drop.
#[cfg(not(feature = "loom"))]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access to it goes through atomics
// (control words) or through the SPSC ownership discipline documented at the top of
// this module, never through unsynchronized aliasing Rust references.
#[cfg(not(feature = "loom"))]
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out atomics and the raw base pointer.
#[cfg(not(feature = "loom"))]
unsafe impl Sync for Mapping {}

#[cfg(not(feature = "loom"))]
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

#[cfg(not(feature = "loom"))]
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and are unmapped once;
        // every Producer/Consumer holds an Arc<Mapping>, so no ring access outlives it.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// The loom model of a segment: the same header and control blocks (on loom's
/// atomics) and data areas made of loom cells, which report any read of a byte
/// that is not ordered after its write.
#[cfg(feature = "loom")]
#[allow(dead_code)] // the header is modelled for completeness; the rings never read it
pub struct Mapping {
    header: SegmentHeader,
    controls: [RingControl; 2],
    data: Box<[loom::cell::UnsafeCell<u8>]>,
}

// SAFETY: the data cells are only reached through RawData under the SPSC discipline,
// and loom checks every access to them; everything else is atomics.
#[cfg(feature = "loom")]
unsafe impl Sync for Mapping {}
// SAFETY: as above.
#[cfg(feature = "loom")]
unsafe impl Send for Mapping {}

#[cfg(feature = "loom")]
impl Mapping {
    /// A model segment with `data_len` bytes of ring data after `DATA_OFFSET`.
    pub fn model(data_len: usize) -> Mapping {
        let control = || RingControl {
            tail: Padded(AtomicU64::new(0)),
            head: Padded(AtomicU64::new(0)),
            consumer_sleeping: Padded(AtomicU32::new(0)),
        };
        Mapping {
            header: SegmentHeader {
                magic: AtomicU64::new(MAGIC),
                layout_version: AtomicU32::new(LAYOUT_VERSION),
                owner_pid: AtomicU32::new(0),
                capacity: [AtomicU64::new(0), AtomicU64::new(0)],
                generation: AtomicU64::new(0),
                heartbeat: AtomicU64::new(0),
            },
            controls: [control(), control()],
            data: (0..data_len)
                .map(|_| loom::cell::UnsafeCell::new(0))
                .collect(),
        }
    }

    #[allow(dead_code)]
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    pub fn control(&self, ring: usize) -> &RingControl {
        &self.controls[ring]
    }

    /// The cells of the data area at segment offset `offset` (as a byte pointer,
    /// which RawData turns back into cells).
    pub fn data_ptr(&self, offset: usize) -> *mut u8 {
        self.data.as_ptr().wrapping_add(offset - DATA_OFFSET) as *mut u8
    }
}

/// A producer and a consumer over ring 0 of a fresh model segment (loom tests).
#[cfg(feature = "loom")]
pub fn model_ring(cap: u64) -> (Producer, Consumer) {
    let map = Arc::new(Mapping::model(cap as usize));
    (
        Producer::new(map.clone(), 0, DATA_OFFSET, cap),
        Consumer::new(map, 0, DATA_OFFSET, cap),
    )
}

/// Raw access to one ring's data area. Safe to construct; the byte accessors are
/// `unsafe` because only the SPSC discipline makes them sound.
struct RawData {
    base: *mut u8,
    cap: u64,
}

// SAFETY: RawData is a pointer into a Mapping that its owner (Producer/Consumer)
// keeps alive through an Arc; moving it to another thread changes nothing about who
// may touch which bytes.
unsafe impl Send for RawData {}

impl RawData {
    /// `base` must point to `cap` bytes inside a mapping kept alive by the caller.
    fn new(base: *mut u8, cap: u64) -> RawData {
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
    unsafe fn write(&self, pos: u64, src: &[u8]) {
        let off = (pos & (self.cap - 1)) as usize;
        debug_assert!(off + src.len() <= self.cap as usize);
        #[cfg(not(feature = "loom"))]
        // SAFETY: in bounds by the second condition; nobody reads these bytes until
        // `tail` is published past them (first condition), so there is no data race.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(off), src.len())
        }
        #[cfg(feature = "loom")]
        for (i, byte) in src.iter().enumerate() {
            // SAFETY: in bounds as above; loom checks the access is race-free.
            unsafe { (*self.cell(off + i)).with_mut(|p| *p = *byte) }
        }
    }

    /// Lets `fill` write the producer-owned bytes `[pos, pos + len)` (in place, in
    /// shared memory: no intermediate buffer).
    ///
    /// # Safety
    /// Same conditions as [`RawData::write`].
    unsafe fn fill(&self, pos: u64, len: usize, fill: impl FnOnce(&mut [u8])) {
        let off = (pos & (self.cap - 1)) as usize;
        debug_assert!(off + len <= self.cap as usize);
        #[cfg(not(feature = "loom"))]
        // SAFETY: in bounds by the caller's conditions; only the single producer
        // touches producer-owned bytes, and the consumer does not read them until
        // tail is published, after this borrow ends (when `fill` returns).
        fill(unsafe { std::slice::from_raw_parts_mut(self.base.add(off), len) });
        #[cfg(feature = "loom")]
        {
            let mut staged = vec![0u8; len];
            fill(&mut staged);
            // SAFETY: the caller's conditions are ours.
            unsafe { self.write(pos, &staged) };
        }
    }

    /// Copies the consumer-owned bytes `[pos, pos + dst.len())` out to `dst`.
    ///
    /// # Safety
    /// - the range belongs to the consumer: at or after `head` and before a `tail`
    ///   loaded with Acquire (so the producer does not write it until `head` is
    ///   published past it, after this copy);
    /// - the range does not cross the end of the data area.
    unsafe fn read_into(&self, pos: u64, dst: &mut [u8]) {
        let off = (pos & (self.cap - 1)) as usize;
        debug_assert!(off + dst.len() <= self.cap as usize);
        #[cfg(not(feature = "loom"))]
        // SAFETY: in bounds by the second condition; stable by the first.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(off), dst.as_mut_ptr(), dst.len())
        }
        #[cfg(feature = "loom")]
        for (i, byte) in dst.iter_mut().enumerate() {
            // SAFETY: in bounds as above; loom checks the access is race-free.
            *byte = unsafe { (*self.cell(off + i)).with(|p| *p) };
        }
    }

    /// The loom cell of data byte `off` (see `Mapping::data_ptr`).
    #[cfg(feature = "loom")]
    fn cell(&self, off: usize) -> *const loom::cell::UnsafeCell<u8> {
        (self.base as *const loom::cell::UnsafeCell<u8>).wrapping_add(off)
    }
}

// ---------------------------------------------------------------------------
// The two ring ends. They are the only callers of RawData's unsafe accessors, and
// `Segment` hands each end out once, which is what makes those calls sound.
// ---------------------------------------------------------------------------

const fn align8(n: u64) -> u64 {
    (n + 7) & !7
}

/// The write end of one ring. Exactly one exists per ring (see `Segment`).
pub struct Producer {
    map: Arc<Mapping>,
    ring: usize,
    data: RawData,
    cap: u64,
    /// Our own tail: only we write it, so no need to load it back.
    tail: u64,
    /// Last head seen; reloaded (Acquire) only when the ring looks full.
    head_cache: u64,
}

/// The read end of one ring. Exactly one exists per ring (see `Segment`).
pub struct Consumer {
    map: Arc<Mapping>,
    ring: usize,
    data: RawData,
    cap: u64,
    /// Our own head: only we write it.
    head: u64,
    /// Last tail seen; reloaded (Acquire) only when we have caught up with it.
    tail_cache: u64,
    /// Each payload is copied here before anyone looks at it: the producer is another
    /// process, and validating bytes it can still change would let it pass a check
    /// with one value and be read with another.
    scratch: Vec<u8>,
}

impl Producer {
    pub(crate) fn new(map: Arc<Mapping>, ring: usize, data_offset: usize, cap: u64) -> Producer {
        let ctl = map.control(ring);
        // SYNC POINT: Acquire pairs with the consumer's Release of head.
        let head = ctl.head.0.load(Ordering::Acquire);
        let tail = ctl.tail.0.load(Ordering::Relaxed);
        let data = RawData::new(map.data_ptr(data_offset), cap);
        Producer {
            map,
            ring,
            data,
            cap,
            tail,
            head_cache: head,
        }
    }

    /// The largest payload one frame may carry. Half the ring: a frame that must wrap
    /// needs padding plus itself to fit, which half the ring always allows once the
    /// consumer has caught up.
    pub fn max_payload(&self) -> usize {
        (self.cap / 2) as usize - HEADER_LEN
    }

    fn free_at_least(&mut self, need: u64) -> bool {
        if self.cap - (self.tail - self.head_cache) >= need {
            return true;
        }
        // SYNC POINT: Acquire pairs with the consumer's Release of head: the bytes
        // it has released are no longer being read when we overwrite them.
        let head = self.map.control(self.ring).head.0.load(Ordering::Acquire);
        // The consumer is the other process: a head outside [tail - cap, tail] is a
        // lie (broken or hostile peer). Clamp it so the free-space arithmetic below
        // can neither underflow nor claim more than the whole ring; all writes are
        // masked into the data area, so a lying peer only garbles its own frames.
        self.head_cache = head.clamp(self.tail.saturating_sub(self.cap), self.tail);
        self.cap - (self.tail - self.head_cache) >= need
    }

    /// Publishes one frame whose payload `fill` writes in place (no intermediate
    /// buffer). `fill` receives exactly `len` bytes and must initialize all of them.
    pub fn try_push_with(
        &mut self,
        kind: u16,
        flags: u16,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Pushed, RingError> {
        if len > self.max_payload() {
            return Err(RingError::TooLarge {
                size: len,
                max: self.max_payload(),
            });
        }
        let stride = align8((HEADER_LEN + len) as u64);
        let to_end = self.cap - (self.tail & (self.cap - 1));
        let pad = if stride > to_end { to_end } else { 0 };
        if !self.free_at_least(pad + stride) {
            return Ok(Pushed::Full);
        }
        let mut header = [0u8; HEADER_LEN];
        if pad > 0 {
            write_header(
                &mut header,
                (pad as usize - HEADER_LEN) as u32,
                Kind::Padding as u16,
                0,
            );
            // SAFETY: `pad` bytes from tail are free (checked above) and end exactly at
            // the end of the data area; we are the only producer.
            unsafe { self.data.write(self.tail, &header) };
            self.tail += pad;
        }
        write_header(&mut header, len as u32, kind, flags);
        // SAFETY: `stride` bytes from tail are free and do not cross the end (either
        // stride <= to_end, or we just padded to offset 0 and stride <= cap/2).
        unsafe { self.data.write(self.tail, &header) };
        // SAFETY: the payload range [tail + 8, tail + 8 + len) is inside the same
        // free, non-wrapping range; `fill` returns before tail is published.
        unsafe { self.data.fill(self.tail + HEADER_LEN as u64, len, fill) };
        self.tail += stride;
        let ctl = self.map.control(self.ring);
        // SYNC POINT: Release publishes the padding, header and payload written above;
        // pairs with the consumer's Acquire load of tail.
        ctl.tail.0.store(self.tail, Ordering::Release);
        // SYNC POINT: SeqCst fence orders our tail store before the load of
        // `consumer_sleeping` (Dekker with the consumer's store-fence-load in
        // `prepare_sleep`): either it sees our tail or we see its flag.
        fence(Ordering::SeqCst);
        let wake = ctl.consumer_sleeping.0.load(Ordering::Relaxed) == 1
            && ctl.consumer_sleeping.0.swap(0, Ordering::AcqRel) == 1;
        Ok(Pushed::Yes { wake })
    }

    /// Publishes one frame with the given payload.
    pub fn try_push(&mut self, kind: u16, flags: u16, payload: &[u8]) -> Result<Pushed, RingError> {
        self.try_push_with(kind, flags, payload.len(), |dst| {
            dst.copy_from_slice(payload)
        })
    }
}

impl Consumer {
    pub(crate) fn new(map: Arc<Mapping>, ring: usize, data_offset: usize, cap: u64) -> Consumer {
        let ctl = map.control(ring);
        let head = ctl.head.0.load(Ordering::Relaxed);
        // SYNC POINT: Acquire pairs with the producer's Release of tail.
        let tail = ctl.tail.0.load(Ordering::Acquire);
        let data = RawData::new(map.data_ptr(data_offset), cap);
        Consumer {
            map,
            ring,
            data,
            cap,
            head,
            tail_cache: tail,
            scratch: Vec::new(),
        }
    }

    /// True if no published frame is waiting.
    pub fn is_empty(&mut self) -> bool {
        if self.head != self.tail_cache {
            return false;
        }
        // SYNC POINT: Acquire pairs with the producer's Release of tail.
        self.tail_cache = self.map.control(self.ring).tail.0.load(Ordering::Acquire);
        self.head == self.tail_cache
    }

    /// Takes the next frame and lends `f` a private copy of its payload (copied out
    /// of shared memory before `f` validates it). Returns `Ok(None)` when the ring is
    /// empty. A frame whose header contradicts the ring's state is `Corrupt`: the
    /// peer is broken or hostile.
    pub fn pop_with<R>(
        &mut self,
        f: impl FnOnce(u16, u16, &[u8]) -> R,
    ) -> Result<Option<R>, RingError> {
        Ok(self
            .copy_next()?
            .map(|(kind, flags)| f(kind, flags, &self.scratch)))
    }

    /// Takes the next frame with its payload as an owned buffer: the one copy out
    /// of shared memory, handed over (a reader that keeps the bytes copies nothing
    /// more).
    pub fn pop(&mut self) -> Result<Option<(u16, u16, Vec<u8>)>, RingError> {
        Ok(self
            .copy_next()?
            .map(|(kind, flags)| (kind, flags, std::mem::take(&mut self.scratch))))
    }

    /// Copies the next frame's payload into `scratch` and releases its ring space;
    /// returns its kind and flags.
    fn copy_next(&mut self) -> Result<Option<(u16, u16)>, RingError> {
        loop {
            if self.is_empty() {
                return Ok(None);
            }
            let avail = self.tail_cache.wrapping_sub(self.head);
            if avail > self.cap || avail < HEADER_LEN as u64 || !avail.is_multiple_of(8) {
                return Err(RingError::Corrupt("tail is not a valid frame boundary"));
            }
            let to_end = self.cap - (self.head & (self.cap - 1));
            let mut header = [0u8; HEADER_LEN];
            // SAFETY: avail >= 8 and head is 8-aligned, so the header lies in
            // [head, tail) and, since to_end is a multiple of 8, before the end.
            unsafe { self.data.read_into(self.head, &mut header) };
            let (len, kind, flags) = read_header(&header);
            let stride = align8(HEADER_LEN as u64 + len as u64);
            if stride > avail || stride > to_end {
                return Err(RingError::Corrupt(
                    "frame length runs past the published data",
                ));
            }
            if kind == Kind::Padding as u16 {
                if stride != to_end {
                    return Err(RingError::Corrupt("padding does not end at the wrap point"));
                }
                self.release(stride);
                continue;
            }
            self.scratch.clear();
            self.scratch.resize(len as usize, 0);
            // SAFETY: [head + 8, head + 8 + len) lies inside [head, tail) and before
            // the end (stride checks above); the copy is done before `release` moves
            // head past it.
            unsafe {
                self.data
                    .read_into(self.head + HEADER_LEN as u64, &mut self.scratch)
            };
            self.release(stride);
            return Ok(Some((kind, flags)));
        }
    }

    fn release(&mut self, stride: u64) {
        self.head += stride;
        // SYNC POINT: Release tells the producer we are done reading these bytes;
        // pairs with its Acquire load of head.
        self.map
            .control(self.ring)
            .head
            .0
            .store(self.head, Ordering::Release);
    }

    /// Announces that we are about to block on the doorbell. Returns true if the
    /// caller should block now (the ring is still empty after the announcement);
    /// false if a frame arrived meanwhile (the announcement is withdrawn).
    pub fn prepare_sleep(&mut self) -> bool {
        let map = self.map.clone();
        let sleeping = &map.control(self.ring).consumer_sleeping.0;
        sleeping.store(1, Ordering::Relaxed);
        // SYNC POINT: SeqCst fence orders the flag store before the tail re-check;
        // pairs with the producer's fence between its tail store and flag load.
        fence(Ordering::SeqCst);
        if self.is_empty() {
            true
        } else {
            sleeping.store(0, Ordering::Relaxed);
            false
        }
    }

    /// Withdraws the sleep announcement after waking (the producer may already have).
    pub fn finish_sleep(&mut self) {
        self.map
            .control(self.ring)
            .consumer_sleeping
            .0
            .store(0, Ordering::Relaxed);
    }
}
