//! Ring behaviour within one process: wrap-around, full ring, the doorbell
//! handshake, corruption detection and a two-thread stress run.

use worker_protocol::ring::Pushed;
use worker_protocol::segment::{new_name, Direction, Segment};

/// Deterministic bytes for frame `i`, so every byte received can be checked.
fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn segment(cap: u64) -> Segment {
    let s = Segment::create(&new_name(), [cap, cap], 0).unwrap();
    s.unlink().unwrap();
    s
}

#[test]
fn frames_wrap_around_the_end_many_times_intact() {
    let seg = segment(4096);
    let mut tx = seg.producer(Direction::ToWorker).unwrap();
    let mut rx = seg.consumer(Direction::ToWorker).unwrap();
    let mut sent = 0u64;
    let mut got = 0u64;
    // Sizes chosen so frames land on every alignment relative to the wrap point.
    for round in 0..20_000u64 {
        let len = ((round * 37) % 600) as usize;
        match tx
            .try_push(7, (sent % 3) as u16, &payload(sent, len))
            .unwrap()
        {
            Pushed::Yes { .. } => sent += 1,
            Pushed::Full => {}
        }
        if !round.is_multiple_of(3) {
            while let Some((kind, flags, p)) = rx.pop().unwrap() {
                assert_eq!(kind, 7);
                assert_eq!(flags as u64, got % 3);
                assert_eq!(p, payload(got, p.len()), "frame {got}");
                got += 1;
            }
        }
    }
    while let Some((_, _, p)) = rx.pop().unwrap() {
        assert_eq!(p, payload(got, p.len()));
        got += 1;
    }
    assert_eq!(sent, got);
    assert!(sent > 15_000, "only {sent} frames went through");
}

#[test]
fn a_full_ring_refuses_without_writing_and_recovers() {
    let seg = segment(4096);
    let mut tx = seg.producer(Direction::ToDaemon).unwrap();
    let mut rx = seg.consumer(Direction::ToDaemon).unwrap();
    let mut n = 0u64;
    while let Pushed::Yes { .. } = tx.try_push(1, 0, &payload(n, 100)).unwrap() {
        n += 1;
    }
    assert_eq!(n, 4096 / 112, "100-byte frames take 112 bytes each");
    assert!(
        tx.try_push(1, 0, &[1; 2041]).is_err(),
        "more than half the ring is refused"
    );
    // 36 frames fill 4032 bytes; the next one must wrap and needs 64 bytes of
    // padding plus 112 for itself: exactly what freeing one frame gives.
    assert_eq!(rx.pop().unwrap().unwrap().2, payload(0, 100));
    assert!(matches!(
        tx.try_push(1, 0, &payload(n, 100)).unwrap(),
        Pushed::Yes { .. }
    ));
    assert_eq!(tx.try_push(1, 0, &[]).unwrap(), Pushed::Full);
    for i in 1..=n {
        assert_eq!(rx.pop().unwrap().unwrap().2, payload(i, 100));
    }
    assert_eq!(rx.pop().unwrap(), None);
}

#[test]
fn the_doorbell_rings_only_for_a_sleeping_consumer() {
    let seg = segment(4096);
    let mut tx = seg.producer(Direction::ToWorker).unwrap();
    let mut rx = seg.consumer(Direction::ToWorker).unwrap();
    assert_eq!(
        tx.try_push(1, 0, b"a").unwrap(),
        Pushed::Yes { wake: false }
    );
    assert!(!rx.prepare_sleep(), "a pending frame means: don't sleep");
    assert_eq!(
        tx.try_push(1, 0, b"b").unwrap(),
        Pushed::Yes { wake: false }
    );
    rx.pop().unwrap();
    rx.pop().unwrap();
    assert!(rx.prepare_sleep(), "empty ring: sleep");
    assert_eq!(tx.try_push(1, 0, b"c").unwrap(), Pushed::Yes { wake: true });
    assert_eq!(
        tx.try_push(1, 0, b"d").unwrap(),
        Pushed::Yes { wake: false },
        "one wake-up per sleep"
    );
    rx.finish_sleep();
}

#[test]
fn padding_anywhere_but_the_wrap_point_is_corruption() {
    let seg = segment(4096);
    let mut tx = seg.producer(Direction::ToWorker).unwrap();
    let mut rx = seg.consumer(Direction::ToWorker).unwrap();
    // A peer that publishes a Padding frame mid-ring is broken or hostile.
    tx.try_push(0, 0, &[0; 8]).unwrap();
    assert!(rx.pop().is_err());
}

#[test]
fn two_threads_move_a_million_frames_in_order() {
    let seg = std::sync::Arc::new(segment(1 << 16));
    let mut tx = seg.producer(Direction::ToWorker).unwrap();
    let mut rx = seg.consumer(Direction::ToWorker).unwrap();
    const N: u64 = 1_000_000;
    let producer = std::thread::spawn(move || {
        let mut i = 0;
        while i < N {
            let len = (i % 97) as usize;
            if let Pushed::Yes { .. } = tx.try_push(2, 0, &payload(i, len)).unwrap() {
                i += 1;
            } else {
                std::thread::yield_now();
            }
        }
    });
    let mut i = 0;
    while i < N {
        match rx.pop().unwrap() {
            Some((_, _, p)) => {
                assert_eq!(p.len(), (i % 97) as usize);
                assert_eq!(p, payload(i, p.len()), "frame {i}");
                i += 1;
            }
            None => std::thread::yield_now(),
        }
    }
    producer.join().unwrap();
}

/// The consumer is another process: a head index it publishes outside
/// `[tail - cap, tail]` is clamped, never trusted. Ahead of the tail it cannot make
/// the producer's free-space arithmetic underflow; far behind, it reads as a full
/// ring, never as room to overwrite unread frames.
#[cfg(target_os = "linux")]
#[test]
fn a_lying_consumer_head_is_clamped() {
    use std::os::unix::fs::FileExt;
    let name = new_name();
    let seg = Segment::create(&name, [4096, 4096], 0).unwrap();
    // The raw bytes of the segment, as a hostile peer would write them: ring 0's
    // head sits at control offset 128 + its own 128-byte line.
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/dev/shm/{name}"))
        .unwrap();
    let write_head = |v: u64| raw.write_all_at(&v.to_le_bytes(), 128 + 128).unwrap();
    let mut tx = seg.producer(Direction::ToWorker).unwrap();
    let mut rx = seg.consumer(Direction::ToWorker).unwrap();
    let frame = payload(1, 1000);
    // Move the tail well past one capacity, legitimately.
    for _ in 0..10 {
        assert!(matches!(
            tx.try_push(4, 0, &frame).unwrap(),
            Pushed::Yes { .. }
        ));
        assert!(rx.pop().unwrap().is_some());
    }
    // Far behind the tail: the producer fills what the last honest head freed
    // (4 frames of 1008 bytes in 4096) and then sees a full ring: it never laps.
    write_head(0);
    let mut pushed = 0;
    while let Pushed::Yes { .. } = tx.try_push(4, 0, &frame).unwrap() {
        pushed += 1;
        assert!(
            pushed <= 4,
            "a head more than a ring behind let the producer lap it"
        );
    }
    assert!(matches!(tx.try_push(4, 0, &frame).unwrap(), Pushed::Full));
    // Ahead of the tail: clamped to the tail (an empty ring), no overflow panic.
    write_head(u64::MAX);
    assert!(matches!(
        tx.try_push(4, 0, &frame).unwrap(),
        Pushed::Yes { .. }
    ));
    seg.unlink().unwrap();
}
