"""A distributed group's exchange (engines/lockstep.py): the frames rank 0 shares
come out whole and in order on every rank, over MLX's real ring backend between
processes on loopback; a model that would split unevenly is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlxd_worker.engines.lockstep import STOP, check_shardable, decode_frames, encode_frames
from mlxd_worker.errors import UnservableModel


def test_frames_round_trip_in_order() -> None:
    items = [(7, b"a generate"), (9, b""), (STOP, b""), (3, bytes(range(256)) * 40)]
    assert decode_frames(encode_frames(items)) == items
    assert decode_frames(b"") == []
    with pytest.raises(ValueError, match="torn"):
        decode_frames(encode_frames(items)[:-1])


def test_uneven_splits_are_refused_with_the_reason() -> None:
    smollm2 = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536}
    check_shardable(smollm2, "tensor", 3)
    with pytest.raises(UnservableModel, match=r"attention heads \(9\), KV heads \(3\) to divide by 2"):
        check_shardable(smollm2, "tensor", 2)
    # A vision-language model's text part is what is split.
    check_shardable({"text_config": {"num_attention_heads": 8}}, "tensor", 4)
    check_shardable({"num_hidden_layers": 2}, "pipeline", 2)
    with pytest.raises(UnservableModel, match="at least 3 layers; the model has 2"):
        check_shardable({"num_hidden_layers": 2}, "pipeline", 3)


RANK = textwrap.dedent(
    """
    import json, sys
    from mlxd_worker.engines.lockstep import join_group
    ls = join_group("tensor")
    frames = [(1, b"load"), (2, b"x" * 5000)] if ls.leader else []
    got = ls.share_frames(frames)
    empty = ls.share_frames([])
    agreed = ls.agree(512 if ls.leader else 7)
    print(json.dumps([ls.rank, [[k, p.decode()[:8], len(p)] for k, p in got], len(empty), agreed]))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_rank_gets_rank_zeros_frames_and_decisions(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{_free_port()}"] for _ in range(3)]))
    worker_dir = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(worker_dir)},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for rank in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    for rank, out in enumerate(outs):
        assert json.loads(out.strip().splitlines()[-1]) == [rank, [[1, "load", 4], [2, "xxxxxxxx", 5000]], 0, 512]
