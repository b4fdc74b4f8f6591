//! Stress across two real processes: Rust here, the Python worker's ShmTransport
//! (through the mlxd_protocol extension) in a child that echoes every frame back.
//! Both directions, random sizes, wrap-arounds and doorbell sleeps; every byte of
//! every frame is checked. Needs the project venv (scripts/test sets MLXD_PYTHON).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use worker_protocol::ring::Pushed;
use worker_protocol::segment::{new_name, Direction, Segment};

const FRAMES: u64 = 2_000_000;
const SHUTDOWN: u16 = 10;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MLXD_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the mlxd_protocol extension: run scripts/test (or set MLXD_PYTHON)"
    );
    venv
}

/// Frame `i`'s size: mostly small like tokens, sometimes large like prompts.
fn size(i: u64) -> usize {
    let r = i.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
    if i.is_multiple_of(997) {
        (r % 60_000) as usize
    } else {
        (r % 300) as usize
    }
}

fn fill(i: u64, buf: &mut [u8]) {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

#[test]
fn python_peer_echoes_two_million_frames_intact() {
    let name = new_name();
    // Small rings so that frames wrap and both sides hit full and empty often.
    let seg = Segment::create(&name, [1 << 17, 1 << 17], 0).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/echo_worker.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(&name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python peer");
    let mut bell_out = child.stdin.take().unwrap();
    let mut bell_in = child.stdout.take().unwrap();
    let mut tx = seg.producer(Direction::ToWorker).unwrap();
    let mut rx = seg.consumer(Direction::ToDaemon).unwrap();

    let sender = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut wakes = 0u64;
        for i in 0..=FRAMES {
            let (kind, len) = if i == FRAMES {
                (SHUTDOWN, 0)
            } else {
                (4, size(i))
            };
            fill(i, &mut buf[..len]);
            loop {
                match tx.try_push(kind, 0, &buf[..len]).unwrap() {
                    Pushed::Yes { wake } => {
                        if wake {
                            wakes += 1;
                            bell_out.write_all(&[1]).unwrap();
                        }
                        break;
                    }
                    Pushed::Full => std::thread::yield_now(),
                }
            }
        }
        wakes
    });

    let mut expected = vec![0u8; 64 * 1024];
    let mut bell = [0u8; 256];
    let mut i = 0u64;
    let mut sleeps = 0u64;
    while i < FRAMES {
        let got = rx
            .pop_with(|kind, _flags, payload| {
                assert_eq!(kind, 4);
                let len = size(i);
                assert_eq!(payload.len(), len, "frame {i} length");
                fill(i, &mut expected[..len]);
                assert!(payload == &expected[..len], "frame {i} bytes differ");
            })
            .unwrap();
        match got {
            Some(()) => i += 1,
            None => {
                if rx.prepare_sleep() {
                    sleeps += 1;
                    let n = bell_in.read(&mut bell).unwrap();
                    assert!(n > 0, "Python peer exited after {i} frames");
                    rx.finish_sleep();
                }
            }
        }
    }
    let wakes = sender.join().unwrap();
    assert!(child.wait().unwrap().success());
    let _ = seg.unlink();
    eprintln!(
        "{FRAMES} frames echoed; daemon side slept {sleeps} times, woke the peer {wakes} times"
    );
}

/// A worker opens only the segment of its own incarnation: one left from another
/// start (a generation it was not given) is refused before any frame is read.
#[test]
fn a_worker_refuses_a_segment_of_another_generation() {
    let name = new_name();
    let seg = Segment::create(&name, [1 << 12, 1 << 12], 5).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/echo_worker.py");
    let run = |generation: &str| {
        Command::new(python())
            .arg(&script)
            .arg(&name)
            .arg(generation)
            .stdin(Stdio::null())
            .output()
            .expect("start the Python peer")
    };
    let wrong = run("4");
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("belongs to generation 5, not 4"), "{said}");
    // The right generation opens it (stdin is empty: it exits at once on EOF).
    let right = run("5");
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    seg.unlink().unwrap();
}
