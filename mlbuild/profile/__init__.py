"""Model profiling (``mlbuild profile``): a load generator, its latency histogram, and
(later) the measurement grid and the report.

Modules:
    histogram   HDR-style log-linear latency histogram: fixed memory, mergeable.
    loadgen     closed-loop HTTP/1.1 load generator for one URL.
"""
