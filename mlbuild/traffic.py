"""A running service's last minute of traffic, as ``mlbuild status`` shows it.

The runtime keeps, across all its workers, per-second counts of the last minute of
``/score`` answers and their latencies, and exposes them on ``/metrics`` as gauges
(mlbuild/runtime/metrics.py: ``mlbuild_recent_requests{status_class}``,
``mlbuild_recent_request_duration_seconds{quantile}``, ``mlbuild_recent_window_seconds``).

NOTE: why the runtime keeps the window rather than ``status``: cumulative counters give
a rate only between two scrapes, and ``status`` is one command run once; keeping the
previous scrape in the state folder would show "since you last ran status", not the
last minute. So one scrape is enough, and what it shows is the service's own minute.

:func:`parse` turns the exposition into a :class:`Traffic` (a pure function, tested on
recorded text); :func:`read` fetches it; :func:`combine` adds up the windows of several
replicas (a kubernetes service's pods, each scraped on its own: kube/ops.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

FETCH_TIMEOUT = 2.0


@dataclass(frozen=True)
class Traffic:
    """``/score`` answers of the last ``window_seconds``: all of them, the 5xx
    (``errors``), the 4xx (``client_errors``), and the 99th percentile of their time
    (None without requests)."""

    window_seconds: int
    requests: int
    errors: int
    client_errors: int
    p99_seconds: float | None

    def to_json(self) -> dict:
        return {"window_seconds": self.window_seconds, "requests": self.requests,
                "errors": self.errors, "client_errors": self.client_errors,
                "p99_ms": None if self.p99_seconds is None
                else round(self.p99_seconds * 1000.0, 3)}

    def summary(self) -> str:
        """``"120 req, 3 err (5xx), p99 4.1 ms / 60 s"``."""
        p99 = "-" if self.p99_seconds is None else f"{self.p99_seconds * 1000.0:.3g} ms"
        return (f"{self.requests} req, {self.errors} err, p99 {p99} "
                f"/ {self.window_seconds} s")


def parse(text: str) -> Traffic | None:
    """The last minute from a ``/metrics`` exposition; None when it has no window (a
    runtime older than the window, or not mlbuild's)."""
    from prometheus_client.parser import text_string_to_metric_families

    classes: dict[str, float] = {}
    p99 = math.nan
    window = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mlbuild_recent_requests":
                classes[s.labels.get("status_class", "")] = s.value
            elif s.name == "mlbuild_recent_request_duration_seconds" \
                    and s.labels.get("quantile") == "0.99":
                p99 = s.value
            elif s.name == "mlbuild_recent_window_seconds":
                window = s.value
    if window is None:
        return None
    return Traffic(int(window), int(sum(classes.values())), int(classes.get("5xx", 0)),
                   int(classes.get("4xx", 0)), None if math.isnan(p99) else p99)


def combine(parts: Iterable[Traffic]) -> Traffic | None:
    """The last minute of a service from its replicas' own: requests and errors added
    up, the longest window, and as p99 the largest of the replicas' p99s (None when
    there are no parts).

    NOTE: the p99 of all the requests together cannot be computed from per-replica
    quantiles, but it is bounded by their maximum M: each replica has at most 1 % of
    its requests slower than its own p99 <= M, so at most 1 % of the union is slower
    than M. The maximum is an upper bound, exact when the replicas are alike, and never
    hides one slow replica (a mean of the p99s would).
    """
    parts = list(parts)
    if not parts:
        return None
    p99s = [p.p99_seconds for p in parts if p.p99_seconds is not None]
    return Traffic(max(p.window_seconds for p in parts), sum(p.requests for p in parts),
                   sum(p.errors for p in parts), sum(p.client_errors for p in parts),
                   max(p99s) if p99s else None)


def read(url: str, timeout: float = FETCH_TIMEOUT) -> Traffic | None:
    """The last minute of the service at ``url`` (``http://HOST:PORT``), or None when
    its ``/metrics`` does not answer 200 or has no window.

    NOTE: HTTP/1.1 with keep-alive, closed by this side once the answer is read (as
    backends/process.py's probe): had the service closed first (urllib sends
    ``Connection: close``), its port would sit in TIME_WAIT and a plain bind() of it
    would fail for a minute after the service stopped.
    """
    import http.client  # NOTE: here, not at the top: a few ms that most commands skip
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        try:
            conn.request("GET", f"{parts.path.rstrip('/')}/metrics")
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            status = resp.status
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    try:
        return parse(text)
    except ValueError:  # not Prometheus text
        return None
