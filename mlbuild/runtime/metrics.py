"""Prometheus text exposition of request counts and scoring latency (no client library)."""

from __future__ import annotations

import bisect

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KNOWN_PATHS = frozenset({"/", "/score", "/swagger.json", "/healthz/live", "/healthz/ready",
                         "/metrics"})


class Metrics:
    """Counters kept in the event-loop thread only, so no locking is needed."""

    def __init__(self):
        self.requests: dict[tuple[str, str, int], int] = {}
        self.bucket_counts = [0] * (len(BUCKETS) + 1)  # last one: +Inf only
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        key = (method, path if path in KNOWN_PATHS else "other", status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if path == "/score":
            self.bucket_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.latency_count += 1

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
        return ("\n".join(lines) + "\n").encode()
