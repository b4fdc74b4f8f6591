"""One model across several processes (a `[distributed]` preset): rank 0 is the
worker the daemon talks to; every other rank runs the same engine and follows rank
0 step by step.

Tensor-parallel ranks must run the same model calls, with the same shapes, in the
same order, or their collectives pair up wrongly. So every rank runs the whole
engine (planning, admission, the batch, the prefix cache, sampling), and what only
rank 0 can know is handed to the others at fixed points, over the group's own
collectives:

- at the top of each engine iteration, the frames rank 0 takes from its inbox
  (Load, Generate, Cancel, ...), raw, in order (`share_frames`): the followers plan
  and handle the same frames, so their state stays rank 0's;
- inside a step, each decision that rests on a clock (the prefill chunk, which
  follows the measured rate): rank 0's value (`agree`).

Everything else in a step is a function of that state and of the model's output,
which the group's all-sums make the same on every rank (sampling draws from
generators seeded alike). A follower's output frames go nowhere.

The exchange is two all-sums of rank 0's bytes against the others' zeros (the
length, then the bytes, only when there are any): the collectives the backend
already has. Before it, rank 0 rings each follower over a plain TCP connection
(`open_doorbells`), so that an idle follower sleeps in recv() instead of spinning
in MLX's ring, which polls while it waits.
"""

from __future__ import annotations

import json
import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

    import mlx.core as mx

# A frame in a shared record: its kind and its payload's length, then the payload.
_FRAME_HEAD = struct.Struct("<HI")
# The kind that stands for the inbox's end (the engine is stopping).
STOP = 0xFFFF
# The seed every rank's sampler starts from: unseeded sampling draws from MLX's
# global generator, which must yield the same numbers on every rank.
SAMPLING_SEED = 0x6D6C7864
# How long the followers' doorbell connections may take to form.
DOORBELL_CONNECT_S = 60.0


def encode_frames(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_FRAME_HEAD.pack(kind, len(payload)) + payload for kind, payload in items)


def decode_frames(record: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(record):
        kind, n = _FRAME_HEAD.unpack_from(record, at)
        at += _FRAME_HEAD.size
        out.append((kind, record[at : at + n]))
        at += n
    if at != len(record):
        raise ValueError(f"a torn lockstep record ({len(record)} bytes, {at} read)")
    return out


class Lockstep:
    """This process's place in the group, and the exchange with rank 0."""

    def __init__(self, group: mx.distributed.Group, parallel: str) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.parallel = parallel
        self.leader = self.rank == 0
        # Rank 0's connections to each follower, or a follower's to rank 0 (see
        # open_doorbells); none: the followers wait inside the collective.
        self._bells: list[socket.socket] = []

    def _all_sum(self, values: mx.array) -> mx.array:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        # On the stream the model's own collectives run on (mlx-lm queues the next
        # step before reading this one's token): ordered after them. On another
        # stream the two would run at once and interleave their messages on the ring.
        out = mx.distributed.all_sum(values, group=self.group, stream=generation_stream)
        mx.eval(out)
        return out

    def open_doorbells(self, leader_host: str) -> None:
        """A plain TCP connection from rank 0 to each follower, over which rank 0
        rings before each exchange. MLX's ring polls while it waits in a collective,
        so a follower waiting for rank 0's next step would spin a core all the time
        the model is idle (starving the machine's other models); blocked in recv()
        instead, it sleeps until rank 0 has something to share. Rank 0 listens on
        its own ring address, on a port the group agrees on."""
        import socket

        listener = socket.create_server((leader_host, 0)) if self.leader else None
        port = self.agree(listener.getsockname()[1] if listener is not None else 0)
        if listener is not None:
            listener.settimeout(DOORBELL_CONNECT_S)
            with listener:
                for _ in range(self.size - 1):
                    conn, _ = listener.accept()
                    self._bells.append(conn)
        else:
            self._bells.append(socket.create_connection((leader_host, port), timeout=DOORBELL_CONNECT_S))
        for bell in self._bells:
            bell.settimeout(None)
            bell.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _ring(self) -> None:
        """Rank 0 rings every follower; a follower sleeps until rung. A closed
        connection is a dead rank: the caller fails, and the group with it."""
        if not self._bells:
            return
        if self.leader:
            for bell in self._bells:
                bell.sendall(b"\x01")
        elif not self._bells[0].recv(1):
            raise ConnectionError("rank 0 closed its doorbell: it is gone")

    def share(self, payload: bytes) -> bytes:
        """Rank 0's `payload` on every rank (the others pass b"")."""
        import mlx.core as mx
        import numpy as np

        self._ring()
        mine = len(payload) if self.leader else 0
        n = _scalar(self._all_sum(mx.array([mine], dtype=mx.int32)))
        if n == 0:
            return b""
        if self.leader:
            values = mx.array(np.frombuffer(payload, dtype=np.uint8))
        else:
            values = mx.zeros((n,), dtype=mx.uint8)
        return bytes(np.array(self._all_sum(values)))

    def share_frames(self, items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The frames rank 0 took from its inbox this iteration, on every rank."""
        return decode_frames(self.share(encode_frames(items) if self.leader else b""))

    def agree(self, value: int) -> int:
        """Rank 0's `value` on every rank: for a decision that rests on a clock."""
        import mlx.core as mx

        mine = value if self.leader else 0
        return _scalar(self._all_sum(mx.array([mine], dtype=mx.int64)))


def _scalar(values: mx.array) -> int:
    import numpy as np

    return int(np.array(values)[0])


def join_group(parallel: str) -> Lockstep:
    """Joins the group the daemon described in this process's environment
    (MLX_RANK, MLX_HOSTFILE: the ring backend's own variables, as mlx.launch sets
    them) and seeds the sampler alike on every rank."""
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend="ring")
    mx.random.seed(SAMPLING_SEED)
    lockstep = Lockstep(group, parallel)
    lockstep.open_doorbells(_leader_host(os.environ["MLX_HOSTFILE"]))
    return lockstep


def _leader_host(hostfile: str) -> str:
    """Rank 0's address in the ring's hostfile (a list, by rank, of "ip:port")."""
    with open(hostfile) as f:
        address = str(json.load(f)[0][0])
    host = address.rsplit(":", 1)[0]
    return host.removeprefix("[").removesuffix("]")


def check_shardable(config: dict[str, object], parallel: str, size: int) -> None:
    """Refuses, with the reason, a model that `parallel` cannot split over `size`
    ranks: mlx-lm's shard() divides heads and projections by the group's size
    without checking that they divide; a pipeline needs a layer per rank."""
    from ..errors import UnservableModel

    text = config.get("text_config")
    cfg = text if isinstance(text, dict) else config
    if parallel == "pipeline":
        layers = cfg.get("num_hidden_layers")
        if isinstance(layers, int) and layers < size:
            raise UnservableModel(f"a pipeline over {size} ranks needs at least {size} layers; the model has {layers}")
        return
    checks = {
        "attention heads": cfg.get("num_attention_heads"),
        "KV heads": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
        "MLP width": cfg.get("intermediate_size"),
    }
    bad = [f"{name} ({n})" for name, n in checks.items() if isinstance(n, int) and n % size]
    if bad:
        raise UnservableModel(
            f"tensor parallel over {size} ranks needs the model's {', '.join(bad)} to divide by {size}"
        )
