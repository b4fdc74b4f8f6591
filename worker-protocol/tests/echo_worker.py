"""Echo peer for the cross-process stress test: the worker's own ShmTransport
(through the mlxd_protocol extension, doorbell included) sends back every frame."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python-worker"))

from mlxd_worker.io.transport import ShmTransport  # noqa: E402

SHUTDOWN = 10


def main() -> None:
    generation = int(sys.argv[2]) if len(sys.argv) > 2 else None
    transport = ShmTransport(sys.argv[1], generation, 0, 1)
    while (frame := transport.recv()) is not None:
        kind, _flags, payload = frame
        if kind == SHUTDOWN:
            break
        transport.send(kind, payload)


main()
