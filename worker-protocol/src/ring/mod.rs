//! Safe single-producer/single-consumer frame rings over a shared mapping.
//!
//! Frames are `[len u32][kind u16][flags u16][payload]`, each padded to 8 bytes, and
//! never straddle the end of the data area: a Padding frame fills the tail end.
//! The doorbell is an eventcount: a consumer that finds the ring empty announces
//! `consumer_sleeping`, re-checks, then blocks on its pipe; a producer rings (the
//! caller writes one byte to the pipe) only when `push` reports that the consumer
//! announced sleep. While frames flow, no system call is made per frame.

pub(crate) mod raw;

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::frame::{read_header, write_header, Kind, HEADER_LEN};
use raw::{Mapping, RawData};

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
        self.head_cache = self.map.control(self.ring).head.0.load(Ordering::Acquire);
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
        // free, non-wrapping range; the borrow ends when `fill` returns, before tail
        // is published.
        fill(unsafe { self.data.write_in_place(self.tail + HEADER_LEN as u64, len) });
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

    /// Takes the next frame, lending its payload to `f` straight from shared memory.
    /// Returns `Ok(None)` when the ring is empty. A frame whose header contradicts
    /// the ring's state is `Corrupt`: the peer is broken or hostile.
    pub fn pop_with<R>(
        &mut self,
        f: impl FnOnce(u16, u16, &[u8]) -> R,
    ) -> Result<Option<R>, RingError> {
        loop {
            if self.is_empty() {
                return Ok(None);
            }
            let avail = self.tail_cache.wrapping_sub(self.head);
            if avail > self.cap || avail < HEADER_LEN as u64 || !avail.is_multiple_of(8) {
                return Err(RingError::Corrupt("tail is not a valid frame boundary"));
            }
            let to_end = self.cap - (self.head & (self.cap - 1));
            // SAFETY: avail >= 8 and head is 8-aligned, so the header lies in
            // [head, tail) and, since to_end is a multiple of 8, before the end.
            let header: [u8; HEADER_LEN] = unsafe { self.data.read(self.head, HEADER_LEN) }
                .try_into()
                .expect("8 bytes");
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
            // SAFETY: [head + 8, head + 8 + len) lies inside [head, tail) and before
            // the end (stride checks above); the slice is dropped when `f` returns,
            // before `release` moves head past it.
            let payload = unsafe { self.data.read(self.head + HEADER_LEN as u64, len as usize) };
            let out = f(kind, flags, payload);
            self.release(stride);
            return Ok(Some(out));
        }
    }

    /// Takes the next frame, copying its payload out.
    pub fn pop(&mut self) -> Result<Option<(u16, u16, Vec<u8>)>, RingError> {
        self.pop_with(|k, f, p| (k, f, p.to_vec()))
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
