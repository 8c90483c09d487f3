"""mlbuild/traffic.py: the last minute of a service, from recorded /metrics text."""

from __future__ import annotations

from mlbuild import traffic


def test_parse_reads_the_window_and_ignores_other_text():
    text = """\
# HELP mlbuild_recent_requests Answers of /score in the last 60 s.
# TYPE mlbuild_recent_requests gauge
mlbuild_recent_requests{status_class="1xx"} 0.0
mlbuild_recent_requests{status_class="2xx"} 40.0
mlbuild_recent_requests{status_class="3xx"} 0.0
mlbuild_recent_requests{status_class="4xx"} 2.0
mlbuild_recent_requests{status_class="5xx"} 3.0
# TYPE mlbuild_recent_request_duration_seconds gauge
mlbuild_recent_request_duration_seconds{quantile="0.5"} 0.001
mlbuild_recent_request_duration_seconds{quantile="0.99"} 0.0125
# TYPE mlbuild_recent_window_seconds gauge
mlbuild_recent_window_seconds 60.0
"""
    got = traffic.parse(text)
    assert got == traffic.Traffic(60, 45, 3, 2, 0.0125)
    assert got.to_json() == {"window_seconds": 60, "requests": 45, "errors": 3,
                             "client_errors": 2, "p99_ms": 12.5}
    assert got.summary() == "45 req, 3 err, p99 12.5 ms / 60 s"
    no_window = "# TYPE x counter\nx_total 3\n"
    assert traffic.parse(no_window) is None
    idle = text.replace('"0.99"} 0.0125', '"0.99"} NaN')
    assert traffic.parse(idle).p99_seconds is None
