//! The fuzz targets of `worker_protocol::fuzz`, run a bounded number of times on
//! every `scripts/test` (cargo-fuzz runs them unbounded: worker-protocol/fuzz).

use proptest::prelude::*;
use worker_protocol::frame::{encode_token_batch, TokenEntry};
use worker_protocol::fuzz::{frame_decode, stdio_stream};
use worker_protocol::Frame;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A valid frame on the wire, then some of its bytes changed: the decoders meet
/// inputs that are nearly right, where bounds checks matter most.
fn mutated_wire() -> impl Strategy<Value = Vec<u8>> {
    let entries =
        prop::collection::vec((any::<u64>(), any::<u32>(), ".{0,12}", any::<bool>()), 0..6);
    (
        entries,
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    )
        .prop_map(|(entries, flips)| {
            let batch = entries
                .into_iter()
                .map(|(id, token, text, reasoning)| TokenEntry {
                    id,
                    token,
                    text,
                    reasoning,
                })
                .collect();
            let mut wire =
                Frame::TokenBatch(worker_protocol::frame::TokenBatch { entries: batch }).encode();
            for (at, byte) in flips {
                let n = wire.len();
                wire[at % n] ^= byte;
            }
            wire
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_decode_or_fail_cleanly(data in prop::collection::vec(any::<u8>(), 0..512)) {
        frame_decode(&data);
        stdio_stream(&data);
    }

    #[test]
    fn nearly_valid_frames_decode_or_fail_cleanly(wire in mutated_wire()) {
        stdio_stream(&wire);
        // As a frame kind + payload too (skip the stdio header, keep the kind).
        let mut as_frame = wire[4..6].to_vec();
        as_frame.extend_from_slice(&wire[6..]);
        frame_decode(&as_frame);
    }
}

#[test]
fn a_token_batch_survives_the_round_trip() {
    let entries = vec![TokenEntry {
        id: 1,
        token: 2,
        text: "Paris 🇫🇷".into(),
        reasoning: true,
    }];
    let mut payload = vec![6, 0, 0, 0];
    encode_token_batch(&entries, &mut payload);
    frame_decode(&payload);
}
