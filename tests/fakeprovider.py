"""A real HTTP server on 127.0.0.1 that speaks the provider APIs, for tests and benchmarks.

Shapes: OpenAI (/v1/embeddings, /v1/chat/completions), Ollama (/api/embed, /api/chat), rerank
(/v1/rerank: Cohere / Jina; /rerank: TEI). Answers are deterministic: an embedding is the HashEmbedder
vector of the text (so a test can compute the expected vector), a completion is "echo: <prompt>" with
word counts as token counts, a rerank score is the share of query words a document contains.

It can be told, per endpoint or for all of them, to answer late, to fail the next K requests with a
status (429 with or without Retry-After, 500, 400 with an OpenAI-style error body ...) or to drop the
connection without answering. It records every request (headers and body) so tests can check what was
sent, and a required API key makes it answer 401 with the presented key echoed back, the worst case for
leak tests. GET /redirect?to=URL answers 302 to URL; GET /peer answers {"peer": the client's port, "host"}
(which connection carried the request); GET /big?bytes=N[&chunked=1] answers N bytes; any other GET answers
{"path", "host"}.

It is a ThreadingHTTPServer speaking HTTP/1.1 keep-alive with TCP_NODELAY, one thread per connection, so
16 concurrent clients with a 50 ms delay see 50 ms, not a queue. In a test:

    with FakeProvider() as fake:
        fake.fail(429, times=2, retry_after=1)
        ... OpenAIEmbedder("openai", model="m", endpoint=fake.url, api_key="") ...

From a benchmark in another process: python -m tests.fakeprovider --delay-ms 50 (prints the URL).
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from neurondb.providers.local import HashEmbedder, tokenize

ANY = "*"


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it. Header names are lowercase."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


@dataclass
class _Fault:
    times: int
    status: int | None  # None = drop the connection
    retry_after: str | None
    message: str
    code: str | None


class FakeProvider:
    """The server and its controls; thread-safe. `dim` is the embedding size it answers with; `host` is a
    loopback address to listen on (another 127.x address makes a second, distinct "host" in tests)."""

    def __init__(self, dim: int = 16, *, api_key: str | None = None, record: bool = True,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.dim = dim
        self.host = host
        self._bind_port = port
        self.api_key = api_key
        self.record = record
        self.embedder = HashEmbedder(dim)
        self._lock = threading.Lock()
        self._faults: dict[str, deque[_Fault]] = {}
        self._delays: dict[str, float] = {}
        self._requests: list[Recorded] = []
        self._counts: dict[str, int] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeProvider:
        self._server = _Server((self.host, self._bind_port), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakeprovider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open keep-alive connections (their threads would otherwise idle on)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- controls

    def set_delay(self, ms: float, endpoint: str | None = None) -> None:
        """Answer requests to `endpoint` (a path such as "/v1/embeddings"; None = all) after `ms` ms."""
        with self._lock:
            self._delays[endpoint or ANY] = ms / 1000.0

    def fail(self, status: int, times: int = 1, *, endpoint: str | None = None, retry_after: str | float | None = None,
             message: str | None = None, code: str | None = None) -> None:
        """Answer the next `times` requests (to `endpoint`, or any) with `status` and an OpenAI-style
        error body; `retry_after` is sent as the Retry-After header (seconds or an HTTP date)."""
        text = message or {429: "Rate limit reached, please retry later", 500: "The server had an error"}.get(
            status, f"Request failed with status {status}")
        self._add(endpoint, _Fault(times, status, None if retry_after is None else str(retry_after), text, code))

    def drop(self, times: int = 1, *, endpoint: str | None = None) -> None:
        """Close the connection of the next `times` requests after reading them, without answering."""
        self._add(endpoint, _Fault(times, None, None, "", None))

    def _add(self, endpoint: str | None, fault: _Fault) -> None:
        with self._lock:
            self._faults.setdefault(endpoint or ANY, deque()).append(fault)

    def reset(self) -> None:
        """Forget faults, delays, recorded requests and counts."""
        with self._lock:
            self._faults.clear()
            self._delays.clear()
            self._requests.clear()
            self._counts.clear()

    # -- what happened

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def count(self, path: str | None = None) -> int:
        """Requests received (to `path`, or in all), including failed and dropped ones."""
        with self._lock:
            return sum(self._counts.values()) if path is None else self._counts.get(path, 0)

    # -- used by the handler

    def _admit(self, req: Recorded) -> tuple[float, _Fault | None]:
        """Record `req`, and take the delay and the fault (endpoint's own first) that apply to it."""
        with self._lock:
            self._counts[req.path] = self._counts.get(req.path, 0) + 1
            if self.record:
                self._requests.append(req)
            delay = self._delays.get(req.path, self._delays.get(ANY, 0.0))
            for key in (req.path, ANY):
                queue = self._faults.get(key)
                if queue:
                    fault = queue[0]
                    fault.times -= 1
                    if fault.times <= 0:
                        queue.popleft()
                    return delay, fault
            return delay, None

    def vectors(self, texts: list[str]) -> list[list[float]]:
        """The embeddings this server answers for `texts` (HashEmbedder(dim) vectors)."""
        return self.embedder.embed(texts).tolist()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a burst of concurrent connects must not be refused
    fake: FakeProvider

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def track(self, sock: socket.socket, is_open: bool) -> None:
        with self._open_lock:
            (self._open.add if is_open else self._open.discard)(sock)

    def close_connections(self) -> None:
        with self._open_lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._open.clear()


def _words(text: str) -> int:
    return len(text.split())


def _error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a benchmark must not pay a TCP connect per request
    disable_nagle_algorithm = True  # headers and body are two writes; Nagle would hold the second back
    timeout = 60  # an idle keep-alive connection's thread ends after this
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: request logs would bury test output."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _send(self, status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        body = orjson.dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_big(self, size: int, chunked: bool) -> None:
        """`size` bytes of 'x', with Content-Length or chunked, in 64 kB writes; a client that stops reading
        and closes ends it."""
        self.send_response(200)
        self.send_header("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(size))
        self.end_headers()
        piece = b"x" * 65536
        try:
            while size > 0:
                n = min(size, len(piece))
                self.wfile.write(b"%x\r\n%s\r\n" % (n, piece[:n]) if chunked else piece[:n])
                size -= n
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def _handle(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        req = Recorded(self.command, parts.path, {k.lower(): v for k, v in self.headers.items()}, body)
        delay, fault = fake._admit(req)
        if delay:
            time.sleep(delay)
        if fault is not None:
            if fault.status is None:
                self.close_connection = True
                return
            headers = (("Retry-After", fault.retry_after),) if fault.retry_after is not None else ()
            kind = {429: "rate_limit_exceeded", 400: "invalid_request_error"}.get(fault.status, "server_error")
            self._send(fault.status, _error(fault.message, kind, fault.code), headers)
            return
        if self.command == "GET":
            if parts.path == "/redirect":
                query = parse_qs(parts.query)
                status = int(query.get("status", ["302"])[0])
                self._send(status, {}, (("Location", query["to"][0]),))
            elif parts.path == "/peer":
                self._send(200, {"peer": self.client_address[1], "host": self.headers.get("Host")})
            elif parts.path == "/big":
                query = parse_qs(parts.query)
                self._send_big(int(query["bytes"][0]), query.get("chunked") == ["1"])
            else:
                self._send(200, {"path": parts.path, "host": self.headers.get("Host")})
            return
        if fake.api_key is not None:
            presented = self.headers.get("Authorization", "")
            if presented != f"Bearer {fake.api_key}":
                shown = presented.removeprefix("Bearer ") or "(none)"
                self._send(401, _error(f"Incorrect API key provided: {shown}.", "invalid_request_error",
                                       "invalid_api_key"))
                return
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            self._send(400, _error("We could not parse the JSON body of your request.", "invalid_request_error"))
            return
        route = _ROUTES.get(parts.path)
        if route is None:
            self._send(404, _error(f"Unknown request URL: POST {parts.path}.", "invalid_request_error"))
            return
        if not isinstance(data, dict) or ("model" not in data and parts.path != "/rerank"):
            self._send(400, _error("you must provide a model parameter", "invalid_request_error"))
            return
        status, payload = route(fake, data)
        self._send(status, payload)


def _texts(data: dict[str, Any]) -> list[str]:
    value = data.get("input")
    return [value] if isinstance(value, str) else list(value or [])


def _openai_embeddings(fake: FakeProvider, data: dict[str, Any]) -> tuple[int, Any]:
    texts = _texts(data)
    tokens = sum(_words(t) for t in texts)
    vectors = fake.vectors(texts)
    return 200, {"object": "list", "model": data["model"],
                 "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _ollama_embed(fake: FakeProvider, data: dict[str, Any]) -> tuple[int, Any]:
    texts = _texts(data)
    return 200, {"model": data["model"], "embeddings": fake.vectors(texts),
                 "prompt_eval_count": sum(_words(t) for t in texts)}


def _echo(messages: list[dict[str, Any]], max_tokens: int | None) -> tuple[str, int, int, str]:
    """(answer, prompt tokens, completion tokens, finish reason) for a chat."""
    prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    words = f"echo: {prompt}".split(" ")
    finish = "stop"
    if max_tokens is not None and len(words) > max_tokens:
        words, finish = words[:max_tokens], "length"
    return " ".join(words), sum(_words(m.get("content", "")) for m in messages), len(words), finish


def _openai_chat(fake: FakeProvider, data: dict[str, Any]) -> tuple[int, Any]:
    text, prompt_tokens, completion_tokens, finish = _echo(data.get("messages", []), data.get("max_tokens"))
    return 200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                 "model": data["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish}],
                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}}


def _ollama_chat(fake: FakeProvider, data: dict[str, Any]) -> tuple[int, Any]:
    options = data.get("options") or {}
    text, prompt_tokens, completion_tokens, finish = _echo(data.get("messages", []), options.get("num_predict"))
    return 200, {"model": data["model"], "created_at": "2024-01-01T00:00:00Z",
                 "message": {"role": "assistant", "content": text}, "done": True, "done_reason": finish,
                 "prompt_eval_count": prompt_tokens, "eval_count": completion_tokens}


def _scores(query: str, documents: list[Any]) -> list[tuple[int, float]]:
    """Share of the query's words found in each document, best first (ties by index)."""
    terms = set(tokenize(query))
    scored = []
    for i, doc in enumerate(documents):
        text = doc.get("text", "") if isinstance(doc, dict) else str(doc)
        words = set(tokenize(text))
        scored.append((i, len(terms & words) / len(terms) if terms else 0.0))
    return sorted(scored, key=lambda pair: (-pair[1], pair[0]))


def _rerank(fake: FakeProvider, data: dict[str, Any]) -> tuple[int, Any]:
    ranked = _scores(data.get("query", ""), data.get("documents", []))
    top_n = data.get("top_n")
    if top_n is not None:
        ranked = ranked[:top_n]
    return 200, {"id": "rerank-fake", "model": data["model"],
                 "results": [{"index": i, "relevance_score": s} for i, s in ranked]}


def _tei_rerank(fake: FakeProvider, data: dict[str, Any]) -> tuple[int, Any]:
    return 200, [{"index": i, "score": s} for i, s in _scores(data.get("query", ""), data.get("texts", []))]


_ROUTES = {
    "/v1/embeddings": _openai_embeddings,
    "/api/embed": _ollama_embed,
    "/v1/chat/completions": _openai_chat,
    "/api/chat": _ollama_chat,
    "/v1/rerank": _rerank,
    "/rerank": _tei_rerank,
}


def main() -> None:
    """Serve until SIGINT / SIGTERM; print the base URL first so a benchmark can read it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="answer every request after this delay")
    parser.add_argument("--dim", type=int, default=16, help="embedding dimension")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeProvider(args.dim, record=False, port=args.port) as fake:
        fake.set_delay(args.delay_ms)
        print(fake.url, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
