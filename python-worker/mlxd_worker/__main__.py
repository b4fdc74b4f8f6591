"""Entry point: ``python -m mlxd_worker --transport shm --segment NAME``.

Lifeline: the worker exits when its stdin reaches EOF, so a dead daemon never
leaves it orphaned.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from .engines.backend import CLOSE_TIMEOUT
from .engines.engine import Engine, make_backend
from .io import frames
from .io.protocol import Hello, Stats
from .io.transport import NullTransport, ShmTransport, StdioTransport, Transport
from .stats import blas_library, discrete_gpu_memory, rss_bytes

if TYPE_CHECKING:
    from .engines.embedding import EmbeddingEngine

log = logging.getLogger("mlxd_worker")


def _private_stdout() -> int:
    """Keep the real stdout for the protocol and point fd 1 at stderr, so a stray
    print() from any library can never corrupt a frame."""
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _stats_loop(engine: Engine | EmbeddingEngine, transport: Transport) -> None:
    import mlx.core as mx

    while True:
        time.sleep(1.0)
        stats: Stats = {
            "active_memory": mx.get_active_memory(),
            "peak_memory": mx.get_peak_memory(),
            "cache_memory": mx.get_cache_memory(),
            "rss": rss_bytes(),
            **engine.stats(),
        }
        transport.send(frames.STATS, frames.json_payload(stats))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mlxd_worker")
    ap.add_argument("--transport", choices=["shm", "stdio", "http"], default="stdio")
    ap.add_argument("--segment", help="shared-memory segment name (shm transport)")
    ap.add_argument("--generation", type=int, help="the incarnation the segment must belong to")
    ap.add_argument("--engine", choices=["mlx", "replay", "embedding", "vision"], default="mlx")
    ap.add_argument("--model", help="the model's name (so that ps and logs tell whose worker this is)")
    ap.add_argument(
        "--parallel",
        choices=["tensor", "pipeline"],
        help="one rank of a distributed group (MLX_RANK, MLX_HOSTFILE in the environment)",
    )
    ap.add_argument("--follower", action="store_true", help="a rank other than 0: follows rank 0's engine")
    args = ap.parse_args(argv)
    rank = f" rank {os.environ.get('MLX_RANK', '?')}" if args.parallel else ""
    logging.basicConfig(
        level=os.environ.get("MLXD_WORKER_LOG", "INFO"),
        format=f"%(asctime)s worker[%(process)d]{rank} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.follower:
        return _follow(args.engine, args.parallel or "tensor")
    out_fd = _private_stdout()
    transport: Transport
    if args.transport == "shm":
        transport = ShmTransport(args.segment, args.generation, 0, out_fd)
    else:
        transport = StdioTransport(0, out_fd)

    engine: Engine | EmbeddingEngine
    if args.engine == "embedding":
        from .engines.embedding import EmbeddingEngine

        engine = EmbeddingEngine(transport)
    else:
        engine = Engine(transport, make_backend(args.engine))
    http_port = None
    # The http transport's proxy is for generation; an embedding worker answers
    # its frames over stdio all the same.
    if args.transport == "http" and isinstance(engine, Engine):
        from .io.http_server import HttpFanout, serve

        fanout = HttpFanout(transport)
        engine.transport = fanout
        http_port = serve(fanout, engine.submit)

    import mlx.core as mx

    hello: Hello = {
        "protocol_version": frames.PROTOCOL_VERSION,
        "pid": os.getpid(),
        "engine": args.engine,
        "device": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "blas": blas_library(),
        "native_protocol": transport.native,
        "http_port": http_port,
    }
    device_memory = discrete_gpu_memory()
    if device_memory is not None:
        hello["device_memory"] = device_memory
    transport.send(frames.HELLO, frames.json_payload(hello))
    if args.parallel and isinstance(engine, Engine):
        from .engines.lockstep import join_group

        # Blocks until every rank has joined (the daemon's load timeout bounds it).
        engine.lockstep = join_group(args.parallel)
        log.info("rank 0 of %d joined its group", engine.lockstep.size)
    engine_thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    engine_thread.start()
    threading.Thread(target=_stats_loop, args=(engine, transport), name="stats", daemon=True).start()

    while True:
        frame = transport.recv()
        if frame is None:
            log.info("stdin closed: the daemon is gone, exiting")
            break
        kind, _flags, payload = frame
        if kind in (
            frames.LOAD,
            frames.GENERATE,
            frames.EMBED,
            frames.CANCEL,
            frames.CLEAR_CACHE,
            frames.MEMORY_LIMIT,
        ):
            engine.submit(kind, payload)
        elif kind == frames.SHUTDOWN:
            log.info("shutdown requested")
            break
        else:
            log.warning("ignoring frame kind %d: %s", kind, json.dumps(payload[:64].hex()))
        if not engine_thread.is_alive():
            log.error("engine thread died (model failed to load)")
            return 1
    # The engine finishes its step and writes what the prefix cache must keep
    # (backend.close, bounded); MLX work in flight beyond that is abandoned.
    engine.stop()
    engine_thread.join(timeout=CLOSE_TIMEOUT + 1.0)
    os._exit(0)


def _follow(engine_kind: str, parallel: str) -> int:
    """A rank other than 0: joins the group, then runs rank 0's engine step for
    step until rank 0 stops (exit 0) or the engine fails (70). The daemon that
    spawned it kills it with rank 0's process group; should that daemon die
    first, it exits too (its parent changes)."""
    from .engines.lockstep import join_group

    engine = Engine(NullTransport(), make_backend(engine_kind))
    engine.lockstep = join_group(parallel)
    log.info("rank %d of %d joined its group", engine.lockstep.rank, engine.lockstep.size)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="lifeline", daemon=True).start()
    engine.run()
    os._exit(70 if engine.failed else 0)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    log.error("the daemon that spawned this rank is gone: exiting")
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
