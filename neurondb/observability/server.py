"""The HTTP endpoint neuranmon serves: `/metrics` (Prometheus text format) and `/healthz`.

It runs in neuranmon's metrics process (`process.py`), in a WSGI server that answers one request at a time, bound to
neurondb.metrics_listen_address:metrics_port (127.0.0.1:9188 by default; '*' is every interface, '' turns
it off). It only reads: shared memory and the database cache (`dbcache.py`), so a scrape takes
milliseconds whatever the workers and PostgreSQL are doing. The port it bound (useful with metrics_port 0)
is published in neuranmon's slot (gauge PORT_GAUGE) for `neurondb status`; it moves with a restart of
neuranmon. A port it cannot bind is logged and retried every RETRY_SECONDS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app

from neurondb.observability import health
from neurondb.observability.collector import Collector
from neurondb.observability.dbcache import DbCache
from neurondb.observability.families import PORT_GAUGE
from neurondb.shm.control import SharedState, get_text, state_name
from neurondb.shm.ring import QueryRing
from neurondb.shm.series import SeriesTable

RETRY_SECONDS = 30.0
log = logging.getLogger("neurondb.metrics")


class _QuietHandler(WSGIRequestHandler):
    timeout = 5.0           # requests are served one at a time: a client that stalls is dropped after this

    def log_message(self, format: str, *args: Any) -> None:   # one line per scrape would flood the log
        pass


class MetricsEndpoint:
    def __init__(self, shared: SharedState, slot: int, dsn: str, address: str, port: int,
                 heartbeat_timeout_s: float) -> None:
        self.shared, self.slot = shared, slot
        self.address = "0.0.0.0" if address == "*" else address
        self.port = port
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.cache = DbCache(dsn)
        self.series = SeriesTable.attach(shared)
        self.ring = QueryRing.attach(shared)
        self.collector = Collector(shared, self.series, self.ring, self.cache)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        self._metrics_app = make_wsgi_app(registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._next_try = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def bound_port(self) -> int:
        return int(self._server.server_port) if self._server is not None else 0

    def start(self) -> None:
        """Start the database cache and listen; nothing at all when the endpoint is off."""
        if self.enabled:
            self.cache.start()
            self.ensure()

    def ensure(self) -> None:
        """Listen if not listening yet (and the last failed try is RETRY_SECONDS old)."""
        if not self.enabled or self._server is not None or time.monotonic() < self._next_try:
            return
        try:
            self._server = make_server(self.address, self.port, self._app, WSGIServer,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            self._next_try = time.monotonic() + RETRY_SECONDS
            log.error("metrics endpoint: cannot listen on %s:%d: %s; retrying in %.0f s", self.address, self.port,
                      exc.strerror or exc, RETRY_SECONDS)
            return
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.shared.slot(self.slot)["gauges"][PORT_GAUGE] = self.bound_port
        log.info("metrics endpoint listening on http://%s:%d/metrics", self.address, self.bound_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.shared.slot(self.slot)["gauges"][PORT_GAUGE] = 0
        if self.enabled:
            self.cache.stop()
        self.collector.close()
        self.series.close()
        self.ring.close()

    def health(self) -> health.Health:
        """The service's health as shared memory and the database cache see it."""
        now = time.time()
        workers = []
        for i in range(self.shared.n_slots):
            slot = self.shared.slot(i)
            beat = float(slot["heartbeat"])
            workers.append(health.WorkerHealth(get_text(slot, "name"), state_name(int(slot["state"])),
                                               now - beat if beat else None))
        error = "the last refresh of the database figures failed" if self.cache.reachable is False else None
        return health.evaluate(True, workers, error, self.heartbeat_timeout_s)

    def _app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            h = self.health()
            start_response("200 OK" if h.code == health.HEALTHY else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [orjson.dumps(h.to_dict())]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"neurondb: /metrics or /healthz\n"]
