"""The `http` transport: the worker serves its generations as OpenAI SSE on
127.0.0.1 and the daemon proxies client requests to it, as llama-swap and Ollama
do with their model servers. Control frames (Hello, Load, Ready, Stats, Error)
still travel on stdio. It exists so the benchmark can show what the rings save.

The daemon posts `/generate` with the Generate fields plus how to render chunks
(`chunk_id`, `model`, `created`, `chat`, `include_usage`, `stream`).
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union, cast

from . import frames
from .protocol import Done, ErrorFrame, Generate
from .transport import TokenEntries, Transport

# Request ids for HTTP-born requests, far from the daemon's own counter.
_IDS = itertools.count(1 << 62)


class Posted(Generate, total=False):
    """The body the daemon posts (api/http_proxy.rs): a serialized Generate and how
    to render its response."""

    chunk_id: str
    model: str
    created: int
    chat: bool
    include_usage: bool
    stream: bool


# What a request's handler gets: (TOKEN_BATCH, a token's text), then (DONE, the Done
# frame) or (ERROR, the Error frame).
Item = tuple[int, Union[str, Done, ErrorFrame]]


class HttpFanout:
    """Wraps the stdio transport: the tokens and Done/Error frames of requests
    that came in over HTTP go to their handler's queue; all else goes to stdio."""

    name = "http"

    def __init__(self, control: Transport) -> None:
        self.control = control
        self.native = control.native
        self._lock = threading.Lock()
        self._queues: dict[int, queue.SimpleQueue[Item]] = {}

    def open(self, rid: int) -> queue.SimpleQueue[Item]:
        q: queue.SimpleQueue[Item] = queue.SimpleQueue()
        with self._lock:
            self._queues[rid] = q
        return q

    def close(self, rid: int) -> None:
        with self._lock:
            self._queues.pop(rid, None)

    def beat(self) -> None:
        self.control.beat()

    def send_tokens(self, entries: TokenEntries) -> None:
        with self._lock:
            for rid, _token, text in entries:
                q = self._queues.get(rid)
                if q is not None:
                    q.put((frames.TOKEN_BATCH, text))

    def send(self, kind: int, payload: bytes) -> None:
        if kind in (frames.DONE, frames.ERROR):
            msg: Done | ErrorFrame = json.loads(payload)
            with self._lock:
                q = self._queues.get(msg.get("id") or -1)
            if q is not None:
                q.put((kind, msg))
                return
        self.control.send(kind, payload)

    def recv(self) -> tuple[int, int, bytes] | None:
        return self.control.recv()


def serve(fanout: HttpFanout, submit: Callable[[int, bytes], None]) -> int:
    """Starts the server on a free loopback port in a daemon thread; returns the port."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
            pass

        def do_POST(self) -> None:  # noqa: N802 (stdlib name)
            body = cast(Posted, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            rid = next(_IDS)
            q = fanout.open(rid)
            submit(frames.GENERATE, frames.json_payload(_generate(rid, body)))
            try:
                if body.get("stream"):
                    self._stream(body, q)
                else:
                    self._collect(body, q)
            except OSError:  # the daemon hung up: stop generating
                submit(frames.CANCEL, frames.encode_cancel(rid))
            finally:
                fanout.close(rid)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _stream(self, body: Posted, q: queue.SimpleQueue[Item]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chat = bool(body.get("chat"))
            base = {
                "id": body["chunk_id"],
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": body.get("created", int(time.time())),
                "model": body["model"],
            }

            def chunk(piece: dict[str, str] | str, finish: str | None) -> bytes:
                key = "delta" if chat else "text"
                choice = {"index": 0, key: piece, "logprobs": None, "finish_reason": finish}
                return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"

            # Rendered once: a token costs one json.dumps of its text.
            head, tail = chunk({"content": "\x01"} if chat else "\x01", None).split(b'"\\u0001"')
            if chat:
                self._chunk(chunk({"role": "assistant", "content": ""}, None))
            while True:
                kind, item = q.get()
                if kind == frames.TOKEN_BATCH:
                    if item:
                        self._chunk(head + json.dumps(item).encode() + tail)
                    continue
                if kind == frames.DONE:
                    done = cast(Done, item)
                    out = chunk({} if chat else "", done["finish_reason"])
                    if body.get("include_usage"):
                        usage = _usage(done)
                        out += b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"
                    out += b"data: [DONE]\n\n"
                else:
                    error = cast(ErrorFrame, item)
                    out = (
                        b"data: "
                        + json.dumps({"error": {"message": error["message"], "type": "server_error"}}).encode()
                        + b"\n\n"
                    )
                self._chunk(out)
                self._chunk(b"")
                return

        def _collect(self, body: Posted, q: queue.SimpleQueue[Item]) -> None:
            pieces = []
            while (item := q.get())[0] == frames.TOKEN_BATCH:
                pieces.append(item[1])
            text = cast("list[str]", pieces)
            kind, msg = item
            out: dict[str, object]
            if kind == frames.DONE:
                done = cast(Done, msg)
                choice: dict[str, object] = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": None}
                if body.get("chat"):
                    choice["message"] = {"role": "assistant", "content": "".join(text)}
                else:
                    choice["text"] = "".join(text)
                out = {
                    "id": body["chunk_id"],
                    "object": "chat.completion" if body.get("chat") else "text_completion",
                    "created": body.get("created"),
                    "model": body["model"],
                    "choices": [choice],
                    "usage": _usage(done),
                }
                status = 200
            else:
                error = cast(ErrorFrame, msg)
                out = {"error": {"message": error["message"], "type": "server_error", "code": error.get("code")}}
                status = 502 if error.get("code", "worker") == "worker" else 400
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return int(server.server_address[1])


def _generate(rid: int, body: Posted) -> Generate:
    """The Generate frame of a posted request: what a plain request asks (the daemon
    posts no other), under our own id."""
    gen: Generate = {"id": rid, "max_tokens": body["max_tokens"]}
    if "messages" in body:
        gen["messages"] = body["messages"]
    if "prompt" in body:
        gen["prompt"] = body["prompt"]
    if "temperature" in body:
        gen["temperature"] = body["temperature"]
    if "top_p" in body:
        gen["top_p"] = body["top_p"]
    if "stop" in body:
        gen["stop"] = body["stop"]
    if "seed" in body:
        gen["seed"] = body["seed"]
    return gen


def _usage(done: Done) -> dict[str, int]:
    p, c = int(done["prompt_tokens"]), int(done["completion_tokens"])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
