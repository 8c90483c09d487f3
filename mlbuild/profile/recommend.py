"""The recommendation: one pure function from the measured grid to a CPU and a memory size.

    CPU     the smallest CPU limit of the grid whose sustained rate (the best step that
            met the objective: errors within 1 %, p99 within --slo-p99-ms, nothing
            killed) is within 10 % of the best sustained rate of any point: more CPU
            beyond that buys no throughput. Without limits (a local process): the CPU
            the service used at its sustained rate, plus 20 %, rounded up to 0.1.
    memory  the highest peak of the points that were not OOM-killed, plus 25 % headroom
            (at least 64 MiB), rounded up to 0.1 GB, and above every limit that was
            OOM-killed.
    both    clamped to Azure's bounds: 0.1-3.5 CPU, 0.1-15 GB.

Each value comes with one sentence saying why (``reasons``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from mlbuild.profile.run import GB, Point

CPU_BOUNDS = (0.1, 3.5)
MEMORY_BOUNDS_GB = (0.1, 15.0)
RATE_TOLERANCE = 0.10   # points within this of the best sustained rate count as "best"
MEMORY_HEADROOM = 0.25
MEMORY_HEADROOM_MIN_GB = 64 / 1024
CPU_HEADROOM = 0.20     # unlimited runs: over the CPU used


@dataclass
class Recommendation:
    cpu: float | None
    memory_gb: float | None
    point: Point | None                  # the grid point chosen
    reasons: dict[str, str] = field(default_factory=dict)  # "cpu" / "memory" -> sentence


def _up(x: float, step: float = 0.1) -> float:
    return round(math.ceil(x / step - 1e-9) * step, 3)


def _clamp(x: float, bounds: tuple[float, float]) -> tuple[float, bool]:
    lo, hi = bounds
    y = min(max(x, lo), hi)
    return y, y != x


def recommend(points: Sequence[Point], slo_p99_ms: float | None,
              limited: bool = True) -> Recommendation:
    """See the module docstring."""
    objective = "errors within 1 %" + (f" and p99 within {slo_p99_ms:g} ms"
                                       if slo_p99_ms is not None else "")
    healthy = [p for p in points if not p.oom_kills and not p.died and not p.restarts]
    sustained = [(p, p.sustained(slo_p99_ms)) for p in healthy]
    sustained = [(p, s) for p, s in sustained if s is not None]
    rec = Recommendation(None, None, None)
    if not sustained:
        why = "no grid point met the objective (" + objective + ") without being killed"
        rec.reasons = {"cpu": why + ": no CPU recommended; widen --cpus or relax "
                                    "--slo-p99-ms.",
                       "memory": why + ": no memory recommended; try larger --memory-gb."}
        return rec
    best_rate = max(s.load.rps for _, s in sustained)
    if limited:
        near = [(p, s) for p, s in sustained if s.load.rps >= best_rate * (1 - RATE_TOLERANCE)]
        point, step = min(near, key=lambda ps: (ps[0].cpu or math.inf,
                                                -(ps[0].memory_gb or math.inf)))
        cpu, clamped = _clamp(point.cpu, CPU_BOUNDS) if point.cpu else (None, False)
        rec.reasons["cpu"] = (
            f"{cpu:g} CPU is the smallest limit tried that sustained {step.load.rps:.0f} "
            f"req/s ({objective}), within {RATE_TOLERANCE:.0%} of the best rate measured "
            f"({best_rate:.0f} req/s)" + (", clamped to Azure's 0.1-3.5" if clamped else "")
            + ".")
    else:
        point, step = max(sustained, key=lambda ps: ps[1].load.rps)
        used = max((s.cpu_used or 0) for s in point.steps if s.ok(slo_p99_ms)) or 0.1
        cpu, clamped = _clamp(_up(used * (1 + CPU_HEADROOM)), CPU_BOUNDS)
        rec.reasons["cpu"] = (
            f"{cpu:g} CPU: the service used {used:.2f} CPU at its sustained "
            f"{step.load.rps:.0f} req/s, run as a local process without a limit, plus "
            f"{CPU_HEADROOM:.0%}" + (", clamped to Azure's 0.1-3.5" if clamped else "")
            + " (an estimate: no CPU limit was tried).")
    rec.cpu, rec.point = cpu, point
    peaks = [p.memory_peak for p in healthy if p.memory_peak]
    if not peaks:
        rec.reasons["memory"] = "the service's memory could not be read (no cgroup or " \
                                "/proc here): no memory recommended."
        return rec
    peak_gb = max(peaks) / GB
    mem = _up(max(peak_gb * (1 + MEMORY_HEADROOM), peak_gb + MEMORY_HEADROOM_MIN_GB))
    killed = [p.memory_gb for p in points if p.oom_kills and p.memory_gb]
    raised = ""
    if killed and mem <= max(killed):
        mem = _up(max(killed) + 0.1)
        raised = f", raised above {max(killed):g} GB where it was OOM-killed"
    mem, clamped = _clamp(mem, MEMORY_BOUNDS_GB)
    rec.memory_gb = mem
    rec.reasons["memory"] = (
        f"{mem:g} GB: the highest memory use measured was {peak_gb * 1024:.0f} MiB, plus "
        f"{MEMORY_HEADROOM:.0%} headroom, rounded up to 0.1 GB{raised}"
        + (", clamped to Azure's 0.1-15" if clamped else "") + ".")
    return rec
