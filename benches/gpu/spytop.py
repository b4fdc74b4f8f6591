"""The engine thread's frames in a py-spy raw profile, by inclusive and own share."""

from __future__ import annotations

import collections
import sys

total = 0
inclusive: collections.Counter[str] = collections.Counter()
own: collections.Counter[str] = collections.Counter()
for line in open(sys.argv[1]):
    stack, count = line.rsplit(" ", 1)
    n, frames = int(count), stack.split(";")
    if not any("Engine.run" in f for f in frames):
        continue
    total += n
    own[frames[-1]] += n
    for f in set(frames):
        inclusive[f] += n
print("engine samples", total)
for f, n in inclusive.most_common(70):
    print(f"{n:6d} {100 * n / max(total, 1):5.1f}% {f[:150]}")
print("--- own")
for f, n in own.most_common(30):
    print(f"{n:6d} {100 * n / max(total, 1):5.1f}% {f[:150]}")
