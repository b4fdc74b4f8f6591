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

if "--by-thread" in sys.argv:
    # Every thread (a --threads --idle profile): where each spends its samples.
    threads: collections.Counter[str] = collections.Counter()
    tails: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in open(sys.argv[1]):
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        threads[frames[0]] += int(count)
        tails[frames[0]][";".join(f.split(" (")[0] for f in frames[1:][-3:])] += int(count)
    for thread, n in threads.most_common():
        print(f"=== {thread}: {n}")
        for tail, m in tails[thread].most_common(15):
            print(f"{m:6d} {tail[:170]}")
