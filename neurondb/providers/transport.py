"""An HTTP/1.1 keep-alive transport for httpx, and `make_client`, the LLM worker's client built on it.

Why it exists: httpx's default transport (httpcore) re-examines every pooled connection on every request
and event (liveness probes through anyio's socket attributes). With 16 concurrent calls that measured
~2.5 ms of CPU per request, so one neuranllm process topped out near 170 requests/s against a 50 ms
provider. `KeepAliveTransport` costs ~0.5 ms a request (mostly the kernel's send): each connection is an
asyncio protocol (`_Exchange`) that parses the response in the loop's read callback, with no task or stream
object per request.

It does only what provider APIs and the queue's `http_call` need, and that is its limit: HTTP/1.1 (no
HTTP/2), whole bodies (the request is sent and the response read in full, no streaming, up to the
request's `MAX_BODY` extension when it has one), no proxies. TLS uses httpx's own SSL context; connect and
read timeouts raise httpx's exceptions, so the providers classify failures as they do with httpx's own
transport. netguard's guarded async client runs on it too: it pins the checked address in the URL and
names the host for SNI (extension `sni_hostname`), and pooled connections are keyed by both. With a proxy
in the environment (`PROXY_VARIABLES`), `make_client` falls back to httpx's default transport, slower but
complete.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

MAX_BODY = "neurondb.max_body"   # request extension: read at most this many body bytes, one more marks the cut
CHUNK = 65536                     # the response body is handed on in pieces of this size


class _Exchange(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection as an asyncio protocol: `start()` writes a request and returns a
    future of (status, headers, body, reusable); the response is parsed as its bytes arrive (Content-Length,
    chunked, or until close), in the event loop's read callback, with no task or stream object per request.
    A connection the server closes while idle is marked closed at once, so it is never handed out again."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._future: asyncio.Future | None = None
        self._buf = bytearray()
        self._body = bytearray()
        self._head: tuple[int, list[tuple[bytes, bytes]], bool] | None = None
        self._length: int | None = None
        self._chunked = False
        self._until_close = False
        self._received = False
        self._no_body = False            # a HEAD request: the answer's Content-Length describes no body here
        self._limit: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._future is None or self._future.done():
            self.close()           # bytes nobody asked for: the connection's state is unknown
            return
        self._received = True
        self._buf += data
        try:
            self._advance()
        except (ValueError, httpx.RemoteProtocolError) as exc:
            self._future.set_exception(httpx.RemoteProtocolError(f"invalid HTTP response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False               # close our side too; connection_lost settles a pending response

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        future = self._future
        if future is None or future.done():
            return
        if self._until_close and self._head is not None:
            self._body += self._buf
            self._finish(reusable=False)
        elif not self._received:
            future.set_exception(httpx.RemoteProtocolError("Server disconnected without sending a response."))
        else:
            future.set_exception(httpx.RemoteProtocolError("peer closed connection without sending the whole "
                                                           "response"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start(self, request: bytes, no_body: bool = False, limit: int | None = None) -> asyncio.Future:
        assert self.transport is not None
        self._future = asyncio.get_running_loop().create_future()
        self._buf.clear()
        self._body.clear()
        self._head, self._received = None, False
        self._no_body, self._limit = no_body, limit
        self.transport.write(request)
        return self._future

    def _advance(self) -> None:
        buf = self._buf
        while self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    raise ValueError("response headers longer than 64 kB")
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[:end + 4]
            version, status = self._status_line(lines[0])
            reusable, length, chunked = version == b"HTTP/1.1", None, False
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name, value = name.strip(), value.strip()
                headers.append((name, value))
                lowered = name.lower()
                if lowered == b"content-length":
                    length = int(value)
                elif lowered == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif lowered == b"connection":
                    reusable = b"close" not in value.lower() and (reusable or b"keep-alive" in value.lower())
            if 100 <= status < 200:
                continue           # 100 Continue and friends: the real answer follows
            self._head = (status, headers, reusable)
            self._chunked = chunked
            self._length = None if chunked else (0 if status in (204, 304) or self._no_body else length)
            self._until_close = not chunked and self._length is None
        if self._chunked:
            self._advance_chunks()      # consumes every complete chunk
        elif self._length is not None and len(buf) >= self._length:
            self._body += buf[:self._length]
            del buf[:self._length]
            self._finish(self._head[2])
        if self._head is not None and self._limit is not None and len(self._body) + len(buf) > self._limit:
            self._cut()

    @staticmethod
    def _status_line(line: bytes) -> tuple[bytes, int]:
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ValueError(f"status line {line[:80]!r}")
        return parts[0], int(parts[1])

    def _advance_chunks(self) -> None:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            if size == 0:
                trailer_end = end if buf[end + 2:end + 4] == b"\r\n" else buf.find(b"\r\n\r\n", end + 2)
                if trailer_end < 0 or len(buf) < trailer_end + 4:
                    return
                del buf[:trailer_end + 4]
                assert self._head is not None
                self._finish(self._head[2])
                return
            if len(buf) < end + 2 + size + 2:
                return
            self._body += buf[end + 2:end + 2 + size]
            del buf[:end + 2 + size + 2]

    def _cut(self) -> None:
        """Past the body limit: settle with the first limit + 1 bytes and drop the connection. The rest of the
        body is never read, so a huge answer costs no more memory than the limit and one read."""
        assert self._limit is not None
        if not self._chunked:
            self._body += self._buf
        elif len(self._body) <= self._limit:  # complete chunks are consumed: left is a size line and some data
            end = self._buf.find(b"\r\n")
            if end < 0:
                raise ValueError("chunk size line longer than the body limit")
            self._body += self._buf[end + 2:]
        del self._body[self._limit + 1:]
        self._finish(reusable=False)
        self.close()

    def _finish(self, reusable: bool) -> None:
        assert self._head is not None and self._future is not None
        status, headers, _ = self._head
        self._head = None
        if not self._future.done():
            self._future.set_result((status, headers, bytes(self._body), reusable and not self.closed))


Key = tuple[str, str, int, str]   # (scheme, address connected to, port, name: SNI or Host)


class _Pieces(httpx.AsyncByteStream):
    """A body read in full, handed on CHUNK bytes at a time, so a compressed body is decoded (and bounded by
    the reader) a piece at a time, as httpcore's stream would be."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        view = memoryview(self._body)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i:i + CHUNK])


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """The worker's HTTP/1.1 transport under its httpx.AsyncClient: a pool of keep-alive connections per
    (scheme, address, port, name), each an `_Exchange` protocol, at most `max_idle` idle in all.

    Why not httpcore (httpx's default): its pool re-examines every connection on every request and event
    (liveness probes through anyio's socket attributes), which measured ~2.5 ms of CPU per request at 16
    concurrent calls: a single worker process then tops out near 170 requests/s against a 50 ms server,
    below the 256 the issue asks for. This transport costs ~0.5 ms (most of it the kernel's send). It
    does only what provider APIs and `http_call` need: HTTP/1.1 requests with a body, TLS through httpx's
    own SSL context, connect/read timeouts as httpx exceptions (so providers classify failures as they
    always do), a body limit per request (extension MAX_BODY). Proxies are not: with a proxy in the
    environment the LLM worker uses httpx's default transport instead.

    The name in the key is the request's `sni_hostname` extension, else its Host header: a request that
    netguard pinned to a checked address (the address in the URL, the name for SNI) only ever reuses a
    connection opened, and TLS-checked, for the same name at the same address.
    """

    def __init__(self, max_idle: int, verify: bool = True) -> None:
        self.max_idle = max_idle
        self.verify = verify
        self._idle: dict[Key, list[_Exchange]] = {}
        self._ssl: Any = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        https = url.scheme == "https"
        server_name = request.extensions.get("sni_hostname") or request.headers.get("host", url.host)
        key = (url.scheme, url.host, url.port or (443 if https else 80), server_name)
        timeouts = request.extensions.get("timeout", {})
        limit = request.extensions.get(MAX_BODY)
        conn = await self._connection(key, https, timeouts.get("connect"))
        head = [request.method.encode() + b" " + url.raw_path + b" HTTP/1.1"]
        head += [name + b": " + value for name, value in request.headers.raw]
        content = await request.aread()       # the body at once (a ByteStream's is already in memory)
        future = conn.start(b"\r\n".join(head) + b"\r\n\r\n" + content, request.method == "HEAD", limit)
        read = timeouts.get("read")
        timer = asyncio.get_running_loop().call_later(read, _read_timeout, future, read) if read else None
        try:
            status, headers, body, reusable = await future
        except BaseException:
            conn.close()           # cancelled or failed mid-exchange: the connection's state is unknown
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if reusable and not conn.closed:
            self._keep(key, conn)
        else:
            conn.close()
        stream = httpx.ByteStream(body) if limit is None else _Pieces(body)
        return httpx.Response(status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"})

    async def _connection(self, key: Key, https: bool, timeout: float | None) -> _Exchange:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not idle:
                del self._idle[key]
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, host, port, name = key
        if https and self._ssl is None:
            self._ssl = httpx.create_ssl_context(verify=self.verify)
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Exchange, host, port, ssl=self._ssl if https else None,
                                       server_hostname=name if https else None), timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:     # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        return conn

    def _keep(self, key: Key, conn: _Exchange) -> None:
        """Pool `conn` unless max_idle are pooled already (connections the servers closed are dropped first)."""
        if self._idle_count() >= self.max_idle:
            for k, conns in list(self._idle.items()):
                live = [c for c in conns if not c.closed]
                if live:
                    self._idle[k] = live
                else:
                    del self._idle[k]
            if self._idle_count() >= self.max_idle:
                conn.close()
                return
        self._idle.setdefault(key, []).append(conn)

    def _idle_count(self) -> int:
        return sum(map(len, self._idle.values()))

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


def _read_timeout(future: asyncio.Future, seconds: float) -> None:
    if not future.done():
        future.set_exception(httpx.ReadTimeout(f"no complete answer within {seconds:g}s"))


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def make_client(concurrency: int) -> httpx.AsyncClient:
    """The worker's one client: KeepAliveTransport, or httpx's own pool when a proxy must be honoured."""
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency,
                                                     max_keepalive_connections=concurrency))
    return httpx.AsyncClient(transport=KeepAliveTransport(4 * concurrency))     # room for a few providers
