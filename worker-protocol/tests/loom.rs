//! Model checks of the ring and its doorbell with loom: the real `Producer` and
//! `Consumer` code, on loom's atomics and a heap model of the segment whose data
//! bytes are loom cells. loom explores the interleavings and the weak-memory
//! outcomes ARM64 allows (x86 hides them) and fails on any byte read that is not
//! ordered after its write, any overwrite of unread bytes, and any lost wake-up.
//!
//! Run: `cargo test --release -p worker-protocol --features loom --test loom`
//! (scripts/test does).
#![cfg(feature = "loom")]

use loom::sync::{Arc, Notify};
use loom::thread;
use worker_protocol::ring::{model_ring, Pushed};

/// The payload of frame `i`: every byte says which frame it belongs to.
fn payload(i: u8) -> [u8; 16] {
    [i + 1; 16]
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

#[test]
fn frames_arrive_whole_and_in_order_across_the_wrap() {
    model(|| {
        // 64 bytes: frames of 16 + 8 bytes; the third must wrap (padding) and can
        // only be written once the consumer has released the first.
        let (mut tx, mut rx) = model_ring(64);
        let producer = thread::spawn(move || {
            for i in 0..3u8 {
                loop {
                    match tx.try_push(7, 0, &payload(i)).unwrap() {
                        Pushed::Yes { .. } => break,
                        Pushed::Full => thread::yield_now(),
                    }
                }
            }
        });
        for i in 0..3u8 {
            loop {
                match rx.pop().unwrap() {
                    Some((kind, _, bytes)) => {
                        assert_eq!(kind, 7);
                        assert_eq!(bytes, payload(i));
                        break;
                    }
                    None => thread::yield_now(),
                }
            }
        }
        producer.join().unwrap();
    });
}

#[test]
fn the_doorbell_never_loses_a_wake_up() {
    model(|| {
        let (mut tx, mut rx) = model_ring(64);
        // The doorbell pipe: a byte written before the read is not lost.
        let bell = Arc::new(Notify::new());
        let ring = bell.clone();
        let producer = thread::spawn(move || {
            if let Pushed::Yes { wake: true } = tx.try_push(3, 0, &payload(0)).unwrap() {
                ring.notify();
            }
        });
        loop {
            if let Some((_, _, bytes)) = rx.pop().unwrap() {
                assert_eq!(bytes, payload(0));
                break;
            }
            // Blocks forever (loom reports a deadlock) if the producer published
            // without seeing that we announced sleep.
            if rx.prepare_sleep() {
                bell.wait();
                rx.finish_sleep();
            }
        }
        producer.join().unwrap();
    });
}
