//! The shm ring between two processes: this bench re-executes itself as the peer
//! (`MLXD_RING_PEER=<segment>`), which echoes frames back on the other ring.
//!
//! - `one_way_latency/64B`: criterion times a round trip (push, peer pops and
//!   pushes back, pop) and reports it halved; afterwards 200,000 individually
//!   timed round trips give the one-way p50/p99.
//! - `throughput/64B`: frames/s pushed one way while the peer drains them.
//!
//! Both sides spin while frames flow, as the daemon's reader and the worker do;
//! the doorbell is for idle readers and is not on this path.
//!
//!     cargo bench -p worker-protocol --bench ring

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use worker_protocol::ring::{Consumer, Producer, Pushed};
use worker_protocol::segment::{new_name, Direction, Segment};

const PEER_ENV: &str = "MLXD_RING_PEER";
const RING: u64 = 1 << 20;
/// Frame flags: echo this frame / count it silently / ack the batch it ends.
const ECHO: u16 = 0;
const SINK: u16 = 1;
const ACK: u16 = 2;
const STOP: u16 = 3;

fn push_spin(tx: &mut Producer, flags: u16, payload: &[u8]) {
    while let Pushed::Full = tx.try_push(6, flags, payload).expect("push") {
        std::hint::spin_loop();
    }
}

/// Pops the next frame, spinning; returns its flags.
fn pop_spin(rx: &mut Consumer) -> u16 {
    loop {
        if let Some(flags) = rx.pop_with(|_, flags, _| flags).expect("pop") {
            return flags;
        }
        std::hint::spin_loop();
    }
}

/// The peer process: echo, sink or ack until told to stop.
fn peer(name: &str) {
    let seg = Segment::open(name).expect("open segment");
    let mut rx = seg.consumer(Direction::ToWorker).expect("consumer");
    let mut tx = seg.producer(Direction::ToDaemon).expect("producer");
    let mut payload = Vec::new();
    loop {
        let flags = loop {
            let got = rx
                .pop_with(|_, flags, p| {
                    payload.clear();
                    payload.extend_from_slice(p);
                    flags
                })
                .expect("pop");
            if let Some(f) = got {
                break f;
            }
            std::hint::spin_loop();
        };
        match flags {
            ECHO => push_spin(&mut tx, ECHO, &payload),
            SINK => {}
            ACK => push_spin(&mut tx, ACK, &[]),
            _ => return,
        }
    }
}

struct Pair {
    tx: Producer,
    rx: Consumer,
    child: std::process::Child,
    _seg: Segment,
}

fn start_peer() -> Pair {
    let seg = Segment::create(&new_name(), [RING, RING], 0).expect("create segment");
    let child = Command::new(std::env::current_exe().expect("own path"))
        .env(PEER_ENV, seg.name())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn peer");
    let tx = seg.producer(Direction::ToWorker).expect("producer");
    let rx = seg.consumer(Direction::ToDaemon).expect("consumer");
    let mut pair = Pair {
        tx,
        rx,
        child,
        _seg: seg,
    };
    // The first echo proves the peer has mapped the segment; then unlink it.
    push_spin(&mut pair.tx, ECHO, b"hello");
    pop_spin(&mut pair.rx);
    pair._seg.unlink().expect("unlink");
    pair
}

fn round_trip(pair: &mut Pair, payload: &[u8]) {
    push_spin(&mut pair.tx, ECHO, payload);
    pop_spin(&mut pair.rx);
}

fn bench_ring(c: &mut Criterion) {
    let mut pair = start_peer();
    let payload = [7u8; 64];

    let mut g = c.benchmark_group("one_way_latency");
    g.bench_function(BenchmarkId::from_parameter("64B"), |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for _ in 0..iters {
                round_trip(&mut pair, &payload);
            }
            t0.elapsed() / 2
        })
    });
    g.finish();

    let mut g = c.benchmark_group("throughput");
    const BATCH: u64 = 10_000;
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function(BenchmarkId::from_parameter("64B"), |b| {
        b.iter(|| {
            for _ in 0..BATCH - 1 {
                push_spin(&mut pair.tx, SINK, &payload);
            }
            push_spin(&mut pair.tx, ACK, &payload);
            pop_spin(&mut pair.rx);
        })
    });
    g.finish();

    percentiles(&mut pair, &payload);
    push_spin(&mut pair.tx, STOP, &[]);
    let _ = pair.child.wait();
}

/// Individually timed round trips: one-way p50/p99 (each round trip halved).
fn percentiles(pair: &mut Pair, payload: &[u8]) {
    const N: usize = 200_000;
    let mut one_way: Vec<Duration> = Vec::with_capacity(N);
    for _ in 0..N {
        let t0 = Instant::now();
        round_trip(pair, payload);
        one_way.push(t0.elapsed() / 2);
    }
    one_way.sort();
    let at = |q: f64| one_way[((N as f64 * q) as usize).min(N - 1)];
    println!(
        "ring one-way latency between two processes, 64 B frames, {N} samples: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs",
        at(0.50).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        at(0.999).as_secs_f64() * 1e6,
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench_ring
}

fn main() {
    if let Ok(name) = std::env::var(PEER_ENV) {
        return peer(&name);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
