"""The /ui status page in headless Chromium (Debian's `chromium`, which
scripts/test installs): the page's script runs, renders the running model's row
from the live SSE snapshots, and its numbers change while a request runs. A
screenshot taken mid-request is kept under target/test-artifacts/."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from html.parser import HTMLParser

import httpx

from conftest import ROOT, control

MODEL = "smollm2-135m"
ARTIFACTS = ROOT / "target" / "test-artifacts"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "scripts/test installs Debian's chromium for this test"
    return path


def browse(url: str, *extra: str) -> str:
    """The page after its script ran: `?updates=3` makes it close the live stream
    after three snapshots, so the headless browser's virtual time can run out."""
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class Rows(HTMLParser):
    """Each `<tr data-model=...>`'s cells, by their class (the first class word)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self._model: str | None = None
        self._cell: str | None = None
        self.status = ""
        self._in_status = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-model"):
            self._model = a["data-model"]
            self.rows[self._model] = {}
        elif tag == "td" and self._model:
            self._cell = (a.get("class") or "").split(" ")[0] or f"col{len(self.rows[self._model])}"
            self.rows[self._model][self._cell] = ""
        elif tag == "div" and a.get("id") == "status":
            self._in_status = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._model = None
        if tag in ("td", "tr"):
            self._cell = None
        if tag == "div":
            self._in_status = False

    def handle_data(self, data: str) -> None:
        if self._model and self._cell:
            self.rows[self._model][self._cell] += data
        if self._in_status:
            self.status += data


def row(daemon_url: str, *extra: str) -> tuple[dict[str, str], str]:
    rows = Rows()
    rows.feed(browse(f"{daemon_url}/ui?updates=3", "--dump-dom", *extra))
    assert MODEL in rows.rows, (rows.status, rows.rows)
    return rows.rows[MODEL], rows.status


def test_the_status_page_shows_the_model_and_changes_while_a_request_runs(daemon_url: str) -> None:
    control().post("/admin/start", json={"model": MODEL})
    idle, status = row(daemon_url)
    assert status == "stopped after 3 updates"  # the script ran and read three snapshots
    assert idle["state"] == "ready" and idle["inflight"] == "0"
    assert idle["tps"] in ("–", "0.0")
    requests_before = int(idle["requests"])

    started = threading.Event()
    done: dict[str, int] = {}

    def generate() -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
            "max_tokens": 64,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{daemon_url}/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        done["tokens"] = chunk["usage"]["completion_tokens"]

    worker = threading.Thread(target=generate)
    worker.start()
    assert started.wait(120), "the request never streamed"

    def flowing(r: dict[str, str]) -> bool:
        return r["inflight"] == "1" and r["tps"] != "–" and float(r["tps"]) > 0

    # Mid-request: one in flight and tokens flowing; the page computed the rate. The
    # page is read again while the request runs: on a loaded machine its three
    # snapshots can all fall within one slow step, with no token between them.
    readings = [row(daemon_url)[0]]
    while worker.is_alive() and not flowing(readings[-1]):
        readings.append(row(daemon_url)[0])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-status.png"
    browse(f"{daemon_url}/ui?updates=3", f"--screenshot={shot}", "--window-size=1400,360")
    worker.join(300)
    assert done.get("tokens", 0) > 16, done
    assert any(flowing(r) for r in readings), readings
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after, _ = row(daemon_url)
    assert after["inflight"] == "0"
    assert int(after["requests"]) > requests_before
    assert float(after["ttft"]) > 0  # from the mlxd_ttft_seconds histogram


def test_the_status_page_is_served_from_the_binary_with_its_event_stream(daemon_url: str) -> None:
    page = httpx.get(f"{daemon_url}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'new EventSource("/ui/events")' in page.text
    with httpx.stream("GET", f"{daemon_url}/ui/events", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    snapshot = json.loads(first[6:])
    assert snapshot["memory"]["cap_bytes"] > 0
    assert isinstance(snapshot["models"], list)
