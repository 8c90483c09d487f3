"""Prometheus text exposition of request counts and scoring latency (no client library).

With adaptive batching (batching.py) two more histograms: how many requests each batch
scored (``mlbuild_batch_size``) and how long each request waited in the queue for its
batch to start (``mlbuild_batch_wait_seconds``: the window, and any batch running before).
"""

from __future__ import annotations

import bisect

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
KNOWN_PATHS = frozenset({"/", "/score", "/swagger.json", "/healthz/live", "/healthz/ready",
                         "/metrics"})


class _Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last one: +Inf only
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, help_text: str, sum_format: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        cumulative += self.counts[-1]
        out.append(f'{name}_bucket{{le="+Inf"}} {cumulative}')
        out.append(f"{name}_sum {self.sum:{sum_format}}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Counters kept in the event-loop thread only, so no locking is needed."""

    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.bucket_counts = [0] * (len(BUCKETS) + 1)  # last one: +Inf only
        self.latency_sum = 0.0
        self.latency_count = 0
        # Set by the app when it batches; the batch histograms are shown from then on.
        self.batch_sizes: _Histogram | None = None
        self.batch_waits: _Histogram | None = None

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        key = (method, path if path in KNOWN_PATHS else "other", status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if path == "/score":
            self.bucket_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.latency_count += 1

    def enable_batching(self) -> None:
        """Show the batch histograms (empty until the first batch)."""
        if self.batch_sizes is None:  # NOTE: may run in the loader thread: render()
            self.batch_waits = _Histogram(BATCH_WAIT_BUCKETS)  # reads sizes first
            self.batch_sizes = _Histogram(BATCH_SIZE_BUCKETS)

    def observe_batch(self, size: int, waits: list[float]) -> None:
        """A batch of ``size`` requests starts; ``waits``: seconds each was queued."""
        if self.batch_sizes is None:
            self.enable_batching()
        self.batch_sizes.observe(size)
        observe = self.batch_waits.observe
        for seconds in waits:
            observe(seconds)

    def render(self) -> bytes:
        lines = [
            "# HELP mlbuild_requests_total HTTP requests by method, path and status.",
            "# TYPE mlbuild_requests_total counter",
        ]
        for (method, path, status), n in sorted(self.requests.items()):
            lines.append(f'mlbuild_requests_total{{method="{method}",path="{path}",'
                         f'status="{status}"}} {n}')
        lines += [
            "# HELP mlbuild_score_duration_seconds Time to answer POST /score.",
            "# TYPE mlbuild_score_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, n in zip(BUCKETS, self.bucket_counts):
            cumulative += n
            lines.append(f'mlbuild_score_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        cumulative += self.bucket_counts[-1]
        lines.append(f'mlbuild_score_duration_seconds_bucket{{le="+Inf"}} {cumulative}')
        lines.append(f"mlbuild_score_duration_seconds_sum {self.latency_sum:.6f}")
        lines.append(f"mlbuild_score_duration_seconds_count {self.latency_count}")
        if self.batch_sizes is not None:
            lines += self.batch_sizes.lines(
                "mlbuild_batch_size", "Requests scored together in one call (adaptive "
                "batching).", ".0f")
            lines += self.batch_waits.lines(
                "mlbuild_batch_wait_seconds", "Time a request waited in the queue for its "
                "batch to start.", ".6f")
        return ("\n".join(lines) + "\n").encode()
