"""Soak: a mixed load on two real models while their workers are killed and stopped.

Starts its own daemon (the release binary) with two presets of the test model, one
over shm and one over stdio, and runs until the time is up:
- clients that send streamed and plain chat requests of a few tokens, and now and
  then hang up in the middle of a stream (a client cancel); a quarter of them
  constrained (a json_object format, or a forced tool call);
- a fault thread that, every few seconds, SIGKILLs or SIGSTOPs one of the workers
  (a stopped worker is found hung by the daemon and replaced).

Every request ends in one of: completed (200 with its end: [DONE] or a whole JSON
answer), failed with a clear error (an error status with an error body, or an SSE
error event and no [DONE]), cancelled by its client, or LOST (anything else: a reset,
a stream cut without an error, a client timeout). Lost must be 0.

Prints the counts; the daemon's RSS, open file descriptors and shared-memory segments
at start and end; and, for each kill, how long until the daemon noticed and until the
model was ready again. Exit status 1 if anything was lost or leaked.

    scripts/soak [minutes]      (default 10)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("soak-shm", "soak-stdio")
PRESETS = {
    # Drafting with the 4-bit import: the faults hit the interactive lane and
    # requests moving between lanes too.
    "soak-shm": 'model = "smollm2-135m"\nhang_timeout = "5s"\nkeep_alive = "-1"\nmax_concurrent = 4\n'
    '[speculative]\ndraft = "smollm2-135m-q4"\nmode = "on"\n',
    "soak-stdio": 'model = "smollm2-135m"\ntransport = "stdio"\nhang_timeout = "5s"\n'
    'keep_alive = "-1"\nmax_concurrent = 4\n',
}
PROMPTS = [
    "What is the capital of France?",
    "Name a color.",
    "Count to five.",
    "Say something kind.",
    "What is two plus two?",
]


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the daemon's control socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Daemon:
    def __init__(self, presets_dir: str) -> None:
        binary = ROOT / "target" / "release" / "mlxd"
        env = dict(os.environ, MLXD_LOG=os.environ.get("MLXD_LOG", "warn"))
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--port", "0", "--presets-dir", presets_dir, "--exit-on-stdin-eof"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("mlxd listening on "):
            raise SystemExit(f"daemon did not start: {line!r}")
        self.port = int(line.strip().rsplit(":", 1)[1])
        self.pid = self.proc.pid
        home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
        self.socket = str(home / ("mlxd.sock" if self.port == 11411 else f"mlxd-{self.port}.sock"))

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
        """Admin routes go over the control socket; the rest over HTTP."""
        if path.startswith("/admin/"):
            conn: http.client.HTTPConnection = _UnixConnection(self.socket, timeout)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, json.loads(raw or b"{}")

    def slot(self, model: str) -> dict | None:
        _, v = self.request("GET", "/admin/ps")
        return next((w for w in v["workers"] if w["model"] == model), None)

    def footprint(self) -> dict[str, int]:
        with open(f"/proc/{self.pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        shm = (
            [n for n in os.listdir("/dev/shm") if n.startswith(f"mlxd_{self.pid}_")]
            if os.path.isdir("/dev/shm")
            else []
        )
        _, v = self.request("GET", "/admin/ps")
        return {"rss_kib": rss_kb, "fds": fds, "shm_segments": len(shm), "registered": v.get("segments", 0)}

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


SOAK_TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


def one_request(d: Daemon, rng: random.Random) -> str:
    """Sends one request; returns its outcome."""
    model = rng.choice(MODELS)
    stream = rng.random() < 0.6
    cancel = stream and rng.random() < 0.15
    body = {
        "model": model,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(3, 12),
        "temperature": rng.choice([0, 0.7]),
        "stream": stream,
    }
    # Some constrained: an output format, or a forced tool call (llguidance in the batch).
    extra = rng.random()
    if extra < 0.15:
        body["response_format"] = {"type": "json_object"}
    elif extra < 0.25:
        body["tools"] = [SOAK_TOOL]
        body["tool_choice"] = "required"
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=180)
    try:
        conn.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            err = json.loads(resp.read() or b"{}")
            return "failed" if err.get("error", {}).get("message") else "lost"
        if not stream:
            v = json.loads(resp.read())
            return "completed" if v["choices"][0]["finish_reason"] else "lost"
        events: list[str] = []
        buf = b""
        while True:
            chunk = resp.read1(4096)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: "):
                    events.append(event[6:].decode())
            if cancel and len(events) >= 2:
                return "cancelled"  # hang up mid-stream: the daemon cancels it
        if events and events[-1] == "[DONE]":
            return "completed"
        if events and "error" in json.loads(events[-1]):
            return "failed"
        return "lost"
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return "lost"
    finally:
        conn.close()


def clients(
    d: Daemon, n: int, until: float, outcomes: Counter[str], lock: threading.Lock, seed: int
) -> list[threading.Thread]:
    def run(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.time() < until:
            outcome = one_request(d, rng)
            with lock:
                outcomes["sent"] += 1
                outcomes[outcome] += 1
                if outcome == "lost":
                    print(f"  LOST a request at {time.strftime('%X')}", file=sys.stderr)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    return threads


def wait_state(d: Daemon, model: str, pred, timeout: float, step: float = 0.005) -> float | None:
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        row = d.slot(model)
        if pred(row):
            return time.perf_counter() - began
        time.sleep(step)
    return None


def faults(d: Daemon, until: float, rng: random.Random, log: list[dict]) -> None:
    while time.time() < until - 20:
        time.sleep(rng.uniform(8, 20))
        model = rng.choice(MODELS)
        row = d.slot(model)
        if not row or row["state"] != "ready" or not row.get("pid"):
            continue
        sig = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGSTOP])
        inc = row["incarnation"]
        try:
            os.kill(row["pid"], sig)
        except ProcessLookupError:
            continue

        def left(r: dict | None, inc: int = inc) -> bool:
            return not r or r["state"] != "ready" or r["incarnation"] != inc

        def back(r: dict | None, inc: int = inc) -> bool:
            return bool(r) and r["state"] == "ready" and r["incarnation"] > inc

        left_ready = wait_state(d, model, left, 30)
        ready = wait_state(d, model, back, 120, step=0.05)
        log.append({"model": model, "signal": sig.name, "detected_s": left_ready, "ready_again_s": ready})


# Issue 28: the daemon's memory after one huge request (a 6 MB body) returns to
# within 2x of its start (glibc's malloc once kept ~270 MB of it for good).
HUGE_MESSAGES = 100_000
HUGE_SETTLE_S = 10


def huge_request(d: Daemon) -> int:
    """One chat request of HUGE_MESSAGES short messages (far past the model's
    context: the worker refuses it, after the daemon parsed and forwarded it)."""
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} with a few words"}
        for i in range(HUGE_MESSAGES)
    ]
    status, _ = d.request(
        "POST", "/v1/chat/completions", {"model": MODELS[0], "messages": messages, "max_tokens": 4}, timeout=300
    )
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("minutes", nargs="?", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    presets = tempfile.mkdtemp(prefix="mlxd-soak-")
    for name, text in PRESETS.items():
        Path(presets, f"{name}.toml").write_text(text)
    d = Daemon(presets)
    try:
        for model in MODELS:
            status, v = d.request("POST", "/admin/start", {"model": model}, timeout=300)
            assert status == 200, v
        start = d.footprint()
        print(f"soak: {args.minutes:g} min, {args.clients} clients, models {', '.join(MODELS)}; daemon pid {d.pid}")
        until = time.time() + args.minutes * 60
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()
        kills: list[dict] = []
        threads = clients(d, args.clients, until, outcomes, lock, args.seed)
        fault = threading.Thread(target=faults, args=(d, until, random.Random(args.seed), kills), daemon=True)
        fault.start()
        for t in threads:
            t.join()
        fault.join(timeout=150)
        for model in MODELS:
            wait_state(d, model, lambda r: bool(r) and r["state"] == "ready" and r["inflight"] == 0, 120, step=0.1)
        time.sleep(1.5)
        end = d.footprint()
        huge_status = huge_request(d)
        time.sleep(HUGE_SETTLE_S)
        after_huge = d.footprint()
    finally:
        d.stop()

    print(
        f"\nrequests sent {outcomes['sent']}: completed {outcomes['completed']}, "
        f"failed with a clear error {outcomes['failed']}, cancelled by the client {outcomes['cancelled']}, "
        f"LOST {outcomes['lost']}"
    )
    print(f"faults injected {len(kills)}:")
    for k in kills:
        det = "never" if k["detected_s"] is None else f"{k['detected_s'] * 1000:.0f} ms"
        rdy = "never" if k["ready_again_s"] is None else f"{k['ready_again_s']:.2f} s"
        print(f"  {k['signal']:<8} {k['model']:<11} detected {det:>8}, ready again after {rdy}")
    for sig in ("SIGKILL", "SIGSTOP"):
        det = [k["detected_s"] for k in kills if k["signal"] == sig and k["detected_s"] is not None]
        rdy = [k["ready_again_s"] for k in kills if k["signal"] == sig and k["ready_again_s"] is not None]
        if det:
            print(
                f"  {sig}: detection median {statistics.median(det) * 1000:.0f} ms (max {max(det) * 1000:.0f}),"
                f" ready again median {statistics.median(rdy):.2f} s"
                if rdy
                else ""
            )
    huge = f"after a {HUGE_MESSAGES:,}-message request ({huge_status}, {HUGE_SETTLE_S} s later)"
    print(f"daemon        start      end  {huge}")
    for key in ("rss_kib", "fds", "shm_segments", "registered"):
        print(f"  {key:<12}{start[key]:>8} {end[key]:>8} {after_huge[key]:>8}")
    worst = max(end["rss_kib"], after_huge["rss_kib"]) / start["rss_kib"]
    print(f"  RSS at most {worst:.2f}x its figure at the start (bound: 2x)")
    leaked = end["shm_segments"] > start["shm_segments"] or end["fds"] > start["fds"] + 4
    never = any(k["ready_again_s"] is None for k in kills)
    ok = outcomes["lost"] == 0 and not leaked and not never and worst <= 2.0
    print("OK" if ok else "FAILED: lost requests, leaked resources, unbounded RSS or a model that never came back")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
