"""The pure-Python codec agrees with the Rust crate (the one definition)."""

from __future__ import annotations

import mlxd_protocol

from mlxd_worker.io import frames


def test_frame_kinds_match_the_rust_definition() -> None:
    rust = dict(mlxd_protocol.frame_kinds())
    if rust != frames.KINDS:
        fix = "\n".join(f"{name} = {value}" for name, value in rust.items())
        raise AssertionError(f"frames.py drifted from worker-protocol; paste into frames.py:\n{fix}")
    assert mlxd_protocol.PROTOCOL_VERSION == frames.PROTOCOL_VERSION


def test_token_batch_encoding_is_byte_identical() -> None:
    entries = [(1, 5, "Par"), (2, 9, ""), (1, 6, "is 🇫🇷"), (2**63, 2**32 - 1, "x" * 1000)]
    assert frames.encode_token_batch(entries) == bytes(mlxd_protocol.encode_token_batch(entries))
    assert frames.decode_token_batch(frames.encode_token_batch(entries)) == entries


def test_stdio_decoder_handles_frames_split_anywhere() -> None:
    wire = b"".join(
        frames.encode(kind, payload)
        for kind, payload in [
            (frames.CANCEL, (7).to_bytes(8, "little")),
            (frames.SHUTDOWN, b""),
            (frames.DONE, b'{"id":7}'),
        ]
    )
    for split in range(len(wire) + 1):
        dec = frames.StdioDecoder()
        got = []
        for part in (wire[:split], wire[split:]):
            dec.feed(part)
            while (f := dec.next_frame()) is not None:
                got.append(f)
        assert [k for k, _, _ in got] == [frames.CANCEL, frames.SHUTDOWN, frames.DONE]
        assert frames.decode_cancel(got[0][2]) == 7
        assert dec.pending() == 0
