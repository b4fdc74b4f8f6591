"""The prefix cache's disk tier: KV caches that survive a worker restart.

Layout: `<directory>/<hash of identity>/<hash of tokens>.safetensors`, one file
per entry, so that two models (or a changed model, or other KV settings) never
meet. A file is a safetensors file: the layers' state arrays as tensors
(`<layer>.<path in its state>`) and, in the header's metadata (strings only):
our format version, the identity, the mlx-lm and mlx versions, the tokens it
holds (uint32 little-endian, base64), the layers' mlx-lm class names and their
scalar state (JSON). The header alone says what a file holds and whether it
belongs: the index is built from headers at start, without reading tensors.

Never a wrong answer: a file is a miss, deleted and counted (the Stats frame's
`prompt_cache.disk.stale_total`), when its identity, versions or format differ,
its size disagrees with its header, its layers are not what the model's own cache
holds for its token count (classes, dtypes, shapes, scalars: entry_layout.py), its
arrays' bytes do not match the checksum written with them (xxh3-128 of the
payload), it does not load, or the model fails on it: before a loaded entry is
handed over, the model is fed one token on a copy of it (`accept`), so an entry
that would fail a step fails there, alone, and never reaches the batch. Files are
written to a temporary name and renamed (after fsync), so a crash leaves either
the old state or the whole new file. Directories are 0700 and files 0600: the
headers hold the prompts' tokens.

Threads: the engine thread looks entries up and loads them (on the request path
anyway: a load is one read of the file) and, when it hands an entry over, slices
its arrays to what they hold and evaluates them. One writer thread does the rest
of the disk I/O: writing files, deleting prefixes they make redundant, and
evicting the least recently used files (by mtime; a hit touches its file) while
over `max_bytes`. The writer's queue is bounded (jobs and bytes); when full, a
write is dropped (it is a cache) and counted. The writer reads evaluated arrays
through the buffer protocol only, and never runs MLX ops.

Reclaiming: a directory also records its `owner` (the model's directory and
the KV settings). A model replaced in place (a re-import, a new fine-tune) gets
a new identity under the same owner, and the old identity's entries can never
hit again: a cache that starts removes the directories of its owner's other
identities, so re-importing a model does not leave its old entries on disk for
ever. Other owners' directories (other models, other KV settings of one model,
which a preset may still use) are left alone.

Write policy (what PrefixCache does with this tier). An entry evicted from
memory spills here. An entry of at least `min_disk_tokens` tokens (default 256)
is also written through when it is put, so that a SIGKILLed worker still finds
it after the restart: long prefixes are the ones worth keeping (a short one is
cheap to prefill again, and writing every short entry would cost the disk more
than it saves), while a write costs the engine thread only a slice and an
evaluation, and the writer one sequential file. The test model, SmolLM2-135M in
float32, holds 30 layers x 2 x 3 heads x 64 dims x 4 bytes = 45 KiB per token:
27 MB for a 600-token entry; on a 2-core Linux CPU host the engine thread's part
took 8-30 ms, the writer's write and fsync ~35 ms, a load 10-30 ms, against
5.4 s to prefill those 600 tokens again. A write is skipped when the disk (or
the queue) already has the tokens or a trimmable entry extending them; a queued
write that a new one extends is superseded (the growing conversation of an agent
writes its last turn, not each one); and a written file deletes the files of its
own prefixes (when its cache can be trimmed, it holds them).
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Optional, TypeVar, cast

from ..io.protocol import DiskCacheStats
from ..mlx_types import CacheLayer, PromptCache
from .entry_layout import LONG, SHORT, LayerDescription, Layout
from .layers import held
from .prefix_cache import Match, TokenTrie, can_trim

if TYPE_CHECKING:
    import mlx.core as mx
    from typing_extensions import Buffer, TypeGuard

log = logging.getLogger("mlxd_worker")

# Our file format; a change makes every older file stale (2: payload checksums).
FORMAT_VERSION = "2"
SUFFIX = ".safetensors"
# The tokenizer files hashed into a model's identity, when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# How the metadata's checksum of an entry's payload begins.
CHECKSUM = "xxh3-128:"
# Bytes read at a time to check a payload's checksum.
CHUNK = 8 << 20
# safetensors' own limit on a header (as in MLX's reader).
MAX_HEADER = 100_000_000

# A cache's layers, as mlx-lm's classes or the worker's (see to_disk/from_disk).
Layers = PromptCache
Convert = Callable[[Layers], Layers]
# The model's caches of every form an entry can take, holding n tokens (for the layout).
Probe = Callable[[int], list[Layers]]
# Feeds the model one token on a copy of a loaded entry; raises if the entry is bad.
Accept = Callable[[Layers, tuple[int, ...]], None]
# A tensor as the writer gets it: (safetensors dtype, shape, evaluated contiguous array).
Tensor = tuple[str, list[int], "mx.array"]
Scalar = None | bool | int | float | str
C = TypeVar("C")


def model_identity(model_path: str) -> str:
    """A hash of what determines a model's KV values: config.json, the tokenizer
    files, and each weights file's name, size, modification time and
    safetensors header (tensor names, dtypes, shapes, offsets; not the weights,
    so cheap for any size). The time makes a model replaced in place with the
    same shapes (a re-import, a new fine-tune) another identity: at worst a
    copied model misses, never a changed one hits."""
    root = Path(model_path)
    h = hashlib.sha256()

    def part(name: str, data: bytes) -> None:
        h.update(struct.pack("<Q", len(name)) + name.encode() + struct.pack("<Q", len(data)) + data)

    for name in ("config.json", *TOKENIZER_FILES):
        path = root / name
        if path.is_file():
            part(name, path.read_bytes())
    for path in sorted(root.glob("*.safetensors")):
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header = f.read(min(length, MAX_HEADER))
        stat = path.stat()
        part(path.name, struct.pack("<QQ", stat.st_size, stat.st_mtime_ns) + head + header)
    return h.hexdigest()


def runtime_versions() -> dict[str, str]:
    """What an entry must have been written by: mlx-lm, mlx and our format."""
    import mlx.core as mx
    import mlx_lm

    mlx_version = mx.__version__  # type: ignore[attr-defined]  # (mlx's stubs leave it out)
    return {"format": FORMAT_VERSION, "mlx_lm": str(mlx_lm.__version__), "mlx": str(mlx_version)}


@dataclass
class DiskEntry:
    """One file of the index."""

    key: str  # the file's name without the suffix: a hash of the tokens
    tokens: tuple[int, ...]
    nbytes: int  # the file's size
    trimmable: bool


@dataclass
class _Job:
    """A write handed to the writer: evaluated, contiguous arrays."""

    tokens: tuple[int, ...]
    trimmable: bool
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    nbytes: int


class Stale(Exception):
    """A file that must not be used (and is deleted)."""


class DiskCache:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        identity: str,
        *,
        to_disk: Optional[Convert] = None,
        from_disk: Optional[Convert] = None,
        min_disk_tokens: int = 256,
        max_pending: int = 8,
        max_pending_bytes: int = 1 << 30,
        owner: str | None = None,
        probe: Optional[Probe] = None,
        accept: Optional[Accept] = None,
    ) -> None:
        """`identity`: what the cached values depend on (model_identity plus the
        KV settings). `to_disk` turns a cache's layers into mlx-lm's own classes
        before saving (without changing the cache it is given); `from_disk` turns
        loaded layers back into the worker's. `min_disk_tokens`: entries this long
        are written through on put (see the module docstring). The writer's queue
        holds at most `max_pending` jobs and `max_pending_bytes` (one job at least).
        `owner`: what the identity is of (the model's directory and KV settings);
        its other identities' directories are removed (see the module docstring).
        `probe`: the model's own caches (entry_layout.py), which every entry's
        layout is checked against; `accept`: the trial a loaded entry must pass
        (see the module docstring). Tests of the mechanics may leave both out."""
        self.max_bytes = max_bytes
        self.identity = identity
        self.min_disk_tokens = min_disk_tokens
        self._to_disk: Convert = to_disk or (lambda layers: layers)
        self._from_disk: Convert = from_disk or (lambda layers: layers)
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._expect = {**runtime_versions(), "identity": identity}
        self._layout = None if probe is None else self._learn(probe)
        self._accept = accept
        self.dir = Path(directory) / hashlib.sha256(identity.encode()).hexdigest()[:24]
        # The preset's directory is created private, not changed if it exists (it
        # may be shared, or not ours); our own directory in it is made private.
        Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
        _private_dir(self.dir)
        # The index: least recently used first (file mtime), and by tokens.
        self._entries: OrderedDict[str, DiskEntry] = OrderedDict()
        self._trie: TokenTrie[DiskEntry] = TokenTrie()
        self._bytes = 0
        self.stale = 0
        self.writes = 0
        self.dropped = 0
        # Guards the index, the queue and the counters (engine, writer and stats threads).
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[_Job] = deque()
        self._pending_bytes = 0
        self._busy = False  # the writer holds a job
        self._closed = False
        self.reclaimed = 0  # files of the owner's other identities removed at start
        if owner is not None:
            self._reclaim(Path(directory), owner)
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="mlxd-disk-cache", daemon=True)
        self._writer.start()

    # --- the index -------------------------------------------------------------

    def _scan(self) -> None:
        """Builds the index from the files' headers; drops stale files and the
        temporary files of dead writers."""
        found: list[tuple[float, DiskEntry]] = []
        for path in self.dir.iterdir():
            if path.name.startswith("."):
                _remove_orphan(path)
                continue
            if not path.name.endswith(SUFFIX):
                continue
            try:
                st = path.stat()
                entry = self._entry_of(path, st.st_size)
            except FileNotFoundError:
                continue  # deleted meanwhile (by another worker)
            except Exception as e:  # Stale, or a header too odd to say so
                self._discard(path, str(e))
                continue
            found.append((st.st_mtime, entry))
        for _, entry in sorted(found, key=lambda f: f[0]):
            self._add(entry)
        while self._bytes > self.max_bytes:  # the limit may have shrunk since
            oldest = next(iter(self._entries.values()))
            self._forget(oldest)
            _unlink(self._path(oldest.key))
        _write_private(self.dir / "identity", self.identity + "\n")

    def _reclaim(self, directory: Path, owner: str) -> None:
        """Removes the directories of `owner`'s other identities, and marks ours."""
        mark = owner + "\n"
        for other in directory.iterdir():
            if other == self.dir or not other.is_dir():
                continue
            try:
                if (other / "owner").read_text() != mark:
                    continue
            except (OSError, UnicodeDecodeError):
                continue  # not a cache directory, or an older one without a mark
            removed = sum(1 for f in other.iterdir() if f.name.endswith(SUFFIX))
            log.info("prompt cache: removing %d entries of %s's old identity (%s)", removed, owner, other.name)
            # A worker of the old identity may still be draining: its writes fail
            # (counted as dropped) and its lookups miss, never a wrong answer.
            shutil.rmtree(other, ignore_errors=True)
            self.reclaimed += removed
        _write_private(self.dir / "owner", mark)

    def _learn(self, probe: Probe) -> Layout:
        def forms(n: int) -> list[list[LayerDescription]]:
            return [[_describe(i, c)[2] for i, c in enumerate(self._disk_form(cache))] for cache in probe(n)]

        return Layout.learn(forms(SHORT), forms(LONG))

    def _disk_form(self, cache: Layers) -> list[CacheLayer]:
        return [_compact(c) for c in self._to_disk(cache)]

    def _entry_of(self, path: Path, size: int) -> DiskEntry:
        """The index entry of a file, from its header (Stale: it must go)."""
        meta, header, _ = _read_header(path, size)
        tokens = self._check_header(meta, header)
        if path.name != _key(tokens) + SUFFIX:
            raise Stale("the name does not match the tokens")
        return DiskEntry(_key(tokens), tokens, size, meta.get("trimmable") == "1")

    def _check_header(self, meta: dict[str, str], header: dict[str, Any]) -> tuple[int, ...]:
        """The tokens of a header that belongs here and describes the layers the
        model's cache would hold for them (Stale otherwise)."""
        for k, v in self._expect.items():
            if meta.get(k) != v:
                raise Stale(f"{k} {meta.get(k)!r}, expected {v!r}")
        if not meta.get("checksum", "").startswith(CHECKSUM):
            raise Stale("no checksum")
        tokens = _tokens_of(meta)
        if self._layout is not None:
            self._layout.check(_described(meta, header), len(tokens))
        return tokens

    def _add(self, entry: DiskEntry) -> None:
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[entry.key] = entry
        self._trie.add(entry.tokens, entry)
        self._bytes += entry.nbytes

    def _forget(self, entry: DiskEntry) -> bool:
        """Out of the index (lock held); False if it was not there."""
        if self._entries.get(entry.key) is not entry:
            return False
        del self._entries[entry.key]
        self._trie.remove(entry.tokens)
        self._bytes -= entry.nbytes
        return True

    def _path(self, key: str) -> Path:
        return self.dir / (key + SUFFIX)

    def _discard(self, path: Path, why: str) -> None:
        log.info("prompt cache: dropping %s (%s)", path.name, why)
        with self._lock:
            self.stale += 1
        _unlink(path)

    def lookup(self, prompt: Sequence[int]) -> Match[DiskEntry]:
        """The entry that gives the most tokens of `prompt`, leaving one to feed
        (after trimming if it holds more), that many tokens, and how many tokens
        the disk shares with `prompt`."""
        with self._lock:
            return self._trie.best(prompt, lambda e: e.trimmable)

    def covers(self, tokens: Sequence[int]) -> bool:
        """The disk has these tokens, or will when the queue is written: the same
        tokens, or a trimmable entry going on past them."""
        key = tuple(tokens)
        with self._lock:
            return self._covered(key)

    def _covered(self, key: tuple[int, ...]) -> bool:
        found, common, below = self._trie.search(key)
        if found and found[-1][0] == len(key):
            return True
        if common == len(key) and self._trie.first_below(below, lambda e: e.trimmable) is not None:
            return True
        return any(_extends(job, key) for job in self._queue)

    # --- loading (engine thread) -------------------------------------------------

    def load(self, entry: DiskEntry) -> Layers | None:
        """The cache of an entry, holding all its tokens (None: a miss; a file
        that must not be used is deleted and counted)."""
        import mlx.core as mx

        path = self._path(entry.key)
        try:
            # One open file: the checksum and the arrays read the same bytes, even
            # if a writer renames a new file into place meanwhile.
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                meta, header, start = _parse_header(head + f.read(min(length, MAX_HEADER)), size)
                if self._check_header(meta, header) != entry.tokens:
                    raise Stale("other tokens than the index says")
                if _file_checksum(f, start) != meta.get("checksum"):
                    raise Stale("the arrays' checksum does not match: the file changed after it was written")
                f.seek(0)
                arrays = cast("dict[str, mx.array]", mx.load(f, format="safetensors"))
                layers = _build(arrays, meta)
                mx.eval([c.state for c in layers])  # read it all now: a bad file fails here, not in a step
            layers = self._from_disk(layers)
            n = len(entry.tokens)
            if held(layers) != n or any(getattr(c, "offset", n) != n for c in layers):
                raise Stale(f"holds {held(layers)} tokens, its header says {n}")
            if self._accept is not None:
                try:
                    self._accept(layers, entry.tokens)
                except Exception as e:
                    if _out_of_memory(e):
                        # Not the entry's fault: a miss, and the file stays.
                        log.warning("prompt cache: no memory to try an entry from disk: %s", e)
                        return None
                    raise
        except FileNotFoundError:
            with self._lock:
                self._forget(entry)  # evicted meanwhile (or by another worker)
            return None
        except Exception as e:  # Stale, or whatever MLX or mlx-lm raise on a bad file
            with self._lock:
                # Only the file the index knew: if the writer renamed a fresh one
                # with this key into place meanwhile (mx.load on a vanished file
                # raises ValueError, not FileNotFoundError), that one stays.
                ours = self._forget(entry)
            if ours:
                self._discard(path, str(e))
            return None
        with self._lock:
            if entry.key in self._entries:
                self._entries.move_to_end(entry.key)
        try:
            os.utime(path)  # the LRU order survives a restart
        except OSError:
            pass
        return layers

    # --- writing -----------------------------------------------------------------

    def write(self, tokens: Sequence[int], cache: Layers, wait_until: float | None = None) -> bool:
        """Hands an entry (a cache holding exactly `tokens`) to the writer, unless
        the disk already covers it. Engine thread: its arrays are sliced and
        evaluated here. When the queue is full, the write is dropped (counted),
        or with `wait_until` (a time.monotonic() deadline) waits for room until
        then. False: not queued."""
        key = tuple(tokens)
        if len(key) != held(cache) or len(key) < 2:
            return False
        with self._lock:
            if self._closed or self._covered(key):
                return False
        try:
            job = self._prepare(key, cache)
        except Exception as e:  # a cache this format cannot hold: skip it, loudly
            log.warning("prompt cache: not writing an entry to disk: %s", e)
            with self._lock:
                self.dropped += 1
            return False
        with self._changed:
            if job.nbytes > self.max_bytes:
                self.dropped += 1
                return False
            # A queued write of these tokens, or (trimmable) of a prefix of them, is superseded.
            for old in [q for q in self._queue if q.tokens == key or (job.trimmable and _extends(job, q.tokens))]:
                self._queue.remove(old)
                self._pending_bytes -= old.nbytes
            while not self._room_for(job):
                left = 0.0 if wait_until is None else wait_until - time.monotonic()
                if left <= 0 or self._closed:
                    self.dropped += 1
                    return False
                self._changed.wait(left)
            self._queue.append(job)
            self._pending_bytes += job.nbytes
            self._changed.notify_all()
        return True

    def _room_for(self, job: _Job) -> bool:
        if not self._queue and not self._busy:
            return True
        return len(self._queue) < self._max_pending and self._pending_bytes + job.nbytes <= self._max_pending_bytes

    def _prepare(self, tokens: tuple[int, ...], cache: Layers) -> _Job:
        import mlx.core as mx

        layers = self._disk_form(cache)
        tensors: dict[str, Tensor] = {}
        described = []
        for i, layer in enumerate(layers):
            arrays, scalars, _ = _describe(i, layer)
            tensors.update(arrays)
            described.append({"class": type(layer).__name__, "scalars": scalars})
        mx.eval([t[2] for t in tensors.values()])
        metadata = {
            **self._expect,
            "tokens": _encode_tokens(tokens),
            "trimmable": "1" if can_trim(layers) else "0",
            "layers": json.dumps(described),
        }
        nbytes = sum(t[2].nbytes for t in tensors.values())
        return _Job(tokens, metadata["trimmable"] == "1", tensors, metadata, nbytes)

    def _write_loop(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._busy = True
            try:
                self._write(job)
            except Exception as e:  # a full disk, a removed directory: the entry is lost, not the worker
                log.warning("prompt cache: writing an entry to disk failed: %s", e)
                with self._lock:
                    self.dropped += 1
            finally:
                with self._changed:
                    self._busy = False
                    self._pending_bytes -= job.nbytes
                    self._changed.notify_all()

    def _write(self, job: _Job) -> None:
        key = _key(job.tokens)
        path = self._path(key)
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        try:
            _write_safetensors(tmp, job.tensors, job.metadata)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        entry = DiskEntry(key, job.tokens, path.stat().st_size, job.trimmable)
        doomed: list[DiskEntry] = []
        with self._lock:
            self._add(entry)
            self.writes += 1
            if entry.trimmable:
                # Its prefixes only take space: it holds them.
                for depth, prefix in self._trie.search(entry.tokens)[0]:
                    if depth < len(entry.tokens) and self._forget(prefix):
                        doomed.append(prefix)
            for old in list(self._entries.values()):
                if self._bytes <= self.max_bytes:
                    break
                if old is not entry and self._forget(old):
                    doomed.append(old)
        for old in doomed:
            _unlink(self._path(old.key))

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until the queue is written; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Drains the queue (up to `timeout`; what is left is dropped) and stops
        the writer. Writes after this are refused."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush(timeout)
        with self._changed:
            self._closed = True
            self.dropped += len(self._queue)
            self._pending_bytes -= sum(job.nbytes for job in self._queue)
            self._queue.clear()
            self._changed.notify_all()
        self._writer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def stats(self, hits_total: int) -> DiskCacheStats:
        """The Stats frame's `prompt_cache.disk`. Hits are the prefix cache's to
        count (`hits_total`): a file is a hit only when it beats what memory has."""
        with self._lock:
            return {
                "hits_total": hits_total,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "stale_total": self.stale,
                "writes_total": self.writes,
                "dropped_total": self.dropped,
            }


# --- the file format ------------------------------------------------------------


@functools.cache
def _st_dtypes() -> dict[mx.Dtype, str]:
    """MLX dtypes by their safetensors names."""
    import mlx.core as mx

    return {
        mx.float32: "F32",
        mx.float16: "F16",
        mx.bfloat16: "BF16",
        mx.uint8: "U8",
        mx.uint16: "U16",
        mx.uint32: "U32",
        mx.uint64: "U64",
        mx.int8: "I8",
        mx.int16: "I16",
        mx.int32: "I32",
        mx.int64: "I64",
        mx.bool_: "BOOL",
    }


def _key(tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(_token_bytes(tokens)).hexdigest()[:32]


def _token_bytes(tokens: tuple[int, ...]) -> bytes:
    a = array("I", tokens)
    if a.itemsize != 4:
        a = array("L", tokens)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _encode_tokens(tokens: tuple[int, ...]) -> str:
    return base64.b64encode(_token_bytes(tokens)).decode()


def _tokens_of(meta: dict[str, str]) -> tuple[int, ...]:
    try:
        raw = base64.b64decode(meta["tokens"], validate=True)
    except (KeyError, ValueError) as e:
        raise Stale(f"bad tokens: {e}") from e
    n = len(raw) // 4
    if len(raw) % 4 or n < 2:
        raise Stale("bad tokens")
    return tuple(struct.unpack(f"<{n}I", raw))


def _read_header(path: Path, size: int) -> tuple[dict[str, str], dict[str, Any], int]:
    """A safetensors file's metadata and tensor entries, read from its header
    alone (see _parse_header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return _parse_header(head + f.read(min(length, MAX_HEADER)), size)


def _parse_header(data: bytes, size: int) -> tuple[dict[str, str], dict[str, Any], int]:
    """The metadata, tensor entries and data offset of a safetensors file of
    `size` bytes from its first bytes; Stale when the header is unreadable, its
    entries do not tile the data, or the file's size disagrees."""
    if len(data) < 8:
        raise Stale("truncated header")
    length = struct.unpack("<Q", data[:8])[0]
    if not 0 < length < MAX_HEADER or 8 + length > min(size, len(data)):
        raise Stale("bad header length")
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, UnicodeDecodeError) as e:
        raise Stale(f"bad header: {e}") from e
    if not isinstance(header, dict):
        raise Stale("bad header")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise Stale("no metadata")
    end = 0
    for entry in header.values():
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            shape = [int(x) for x in entry["shape"]]
            itemsize = _ITEMSIZE[entry["dtype"]]
        except (TypeError, KeyError, ValueError) as e:
            raise Stale("bad tensor entry") from e
        if not 0 <= begin <= stop or any(x < 0 for x in shape) or stop - begin != itemsize * _product(shape):
            raise Stale("bad tensor entry")
        end = max(end, stop)
    if 8 + length + end != size:
        raise Stale(f"{size} bytes, the header says {8 + length + end}")
    return meta, header, 8 + length


# Bytes per element of the safetensors dtypes the disk tier writes.
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "U16": 2, "U32": 4, "U64": 8}
_ITEMSIZE |= {"I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


def _product(shape: list[int]) -> int:
    out = 1
    for x in shape:
        out *= x
    return out


def _file_checksum(f: BinaryIO, start: int) -> str:
    """The checksum of an open file's payload (from `start` to its end), as the
    metadata carries it; read in chunks, so a large entry is not held twice."""
    import xxhash

    digest = xxhash.xxh3_128()
    f.seek(start)
    while chunk := f.read(CHUNK):
        digest.update(chunk)
    return CHECKSUM + digest.hexdigest()


def _out_of_memory(e: Exception) -> bool:
    """An allocation failure (Python's, or MLX's past its memory limit)."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or "memory" in text or "allocat" in text


def _describe(i: int, layer: CacheLayer) -> tuple[dict[str, Tensor], dict[str, Scalar], LayerDescription]:
    """Layer `i` (one of mlx-lm's classes, compacted) as a file holds it: its
    arrays (named `<i>.<path in its state>`, evaluated lazily by the caller), its
    scalar state, and both as the layout sees them."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import cache as mlx_cache

    name = type(layer).__name__
    if not isinstance(getattr(mlx_cache, name, None), type) or type(layer) is not getattr(mlx_cache, name):
        raise ValueError(f"{name} is not one of mlx-lm's cache classes (give DiskCache a to_disk)")
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Scalar] = {}
    for path, leaf in cast("list[tuple[str, object]]", tree_flatten(layer.state)):
        if isinstance(leaf, mx.array):
            dtype = _st_dtypes().get(leaf.dtype)
            if dtype is None:
                raise ValueError(f"cannot store {leaf.dtype}")
            raw = mx.contiguous(leaf.view(mx.uint16) if leaf.dtype == mx.bfloat16 else leaf)
            tensors[f"{i}.{path}"] = (dtype, list(leaf.shape), raw)
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            scalars[path] = leaf
        else:
            raise ValueError(f"cannot store a {type(leaf).__name__} in {name}'s state")
    window = getattr(layer, "max_size", None)
    description = LayerDescription(
        name,
        {k.partition(".")[2]: (d, tuple(shape)) for k, (d, shape, _) in tensors.items()},
        scalars,
        window if isinstance(window, int) else None,
    )
    return tensors, scalars, description


def _described(meta: dict[str, str], header: dict[str, Any]) -> list[LayerDescription]:
    """A file's layers as its header describes them (Stale when it cannot)."""
    try:
        layers = json.loads(meta["layers"])
        out = [LayerDescription(str(d["class"]), {}, dict(d["scalars"])) for d in layers]
        for name, entry in header.items():
            layer, _, path = name.partition(".")
            out[int(layer)].tensors[path] = (str(entry["dtype"]), tuple(int(x) for x in entry["shape"]))
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise Stale(f"bad layer description: {e}") from e
    return out


def _write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file, from evaluated contiguous arrays (read through the
    buffer protocol: no MLX op runs on this thread)."""
    import xxhash

    entries: dict[str, object] = {}
    offset = 0
    views: list[memoryview] = []
    digest = xxhash.xxh3_128()
    for name, (dtype, shape, arr) in tensors.items():
        view = memoryview(cast("Buffer", arr)).cast("B")  # (mlx's stubs omit the buffer protocol)
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + view.nbytes]}
        offset += view.nbytes
        views.append(view)
        digest.update(view)
    header = {"__metadata__": {**metadata, "checksum": CHECKSUM + digest.hexdigest()}, **entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for view in views:
            f.write(view)
        f.flush()
        os.fsync(f.fileno())


def _build(arrays: dict[str, mx.array], meta: dict[str, str]) -> Layers:
    """The layers of a loaded file: mlx-lm's classes from their states."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models import cache as mlx_cache

    described = json.loads(meta["layers"])
    by_layer: dict[int, list[tuple[str, object]]] = {i: [] for i in range(len(described))}
    for name, arr in arrays.items():
        layer, _, path = name.partition(".")
        by_layer[int(layer)].append((path, arr))
    layers = []
    for i, d in enumerate(described):
        cls = getattr(mlx_cache, d["class"], None)
        if not _is_cache_class(cls, mlx_cache._BaseCache):
            raise Stale(f"unknown cache class {d['class']!r}")
        # BF16 tensors (written as their uint16 bits) come back as bfloat16.
        items = by_layer[i] + list(d["scalars"].items())
        state = tree_unflatten(items) if items else []
        layers.append(cls.from_state(state))
    return layers


def _is_cache_class(cls: object, base: type[C]) -> TypeGuard[type[C]]:
    return isinstance(cls, type) and issubclass(cls, base)


def _compact(layer: CacheLayer) -> CacheLayer:
    """A full-precision or quantized layer cut to the tokens it holds (its
    buffer grows in steps of 256 and may hold trimmed tokens); others as they are."""
    from mlx.utils import tree_map
    from mlx_lm.models.cache import CacheList, KVCache, QuantizedKVCache

    if type(layer) is CacheList:
        whole = copy.copy(layer)
        whole.caches = tuple(_compact(c) for c in layer.caches)
        return whole
    if type(layer) not in (KVCache, QuantizedKVCache) or layer.keys is None:
        return layer
    n = layer.offset
    out = copy.copy(layer)
    out.keys, out.values = tree_map(lambda x: x[..., :n, :], (layer.keys, layer.values))
    return out


def _extends(job: _Job, key: tuple[int, ...]) -> bool:
    return job.tokens[: len(key)] == key and (len(job.tokens) == len(key) or job.trimmable)


def _private_dir(path: Path) -> None:
    """A directory only its owner can read (created so, or tightened)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _write_private(path: Path, text: str) -> None:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an older file of wider mode


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _remove_orphan(path: Path) -> None:
    """A writer's temporary file (`.<key>.<pid>.tmp`) whose process is gone."""
    parts = path.name.split(".")
    if len(parts) != 4 or parts[3] != "tmp" or not parts[2].isdigit():
        return
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        _unlink(path)
    except OSError:
        pass
