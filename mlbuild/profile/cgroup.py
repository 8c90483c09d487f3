"""What a container uses, read from its cgroup: CPU time, memory now and at peak, OOM kills.

The cgroup of a container ``ID`` is found where the engine puts it (the first that
exists)::

    v2 (unified)   /sys/fs/cgroup/system.slice/docker-ID.scope   (systemd driver)
                   /sys/fs/cgroup/docker/ID                      (cgroupfs driver)
    v1             /sys/fs/cgroup/cpuacct/docker/ID, /sys/fs/cgroup/memory/docker/ID
                   (and .../system.slice/docker-ID.scope under each)

    what            v2                          v1
    CPU time        cpu.stat usage_usec         cpuacct.usage (ns)
    memory now      memory.current              memory.usage_in_bytes
    memory peak     memory.peak (kernel 5.19+)  memory.max_usage_in_bytes
    OOM kills       memory.events oom_kill      memory.oom_control oom_kill

Without a readable cgroup (a remote ``DOCKER_HOST``, a rootless engine) :func:`find`
returns None and the profile reports CPU and memory as unknown.

A :class:`Sampler` thread reads CPU time and memory every ``every`` seconds: the CPU
used over a load window (interpolated at its ends), the memory-over-time plot, and the
peak where the kernel keeps none. :class:`ProcessTree` gives the same readings for a
plain local process (from ``/proc``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


@dataclass
class Cgroup:
    """The cgroup files of one container (``cpu``/``memory``: folders; v2 has one)."""

    version: int
    cpu: Path
    memory: Path

    def _read(self, folder: Path, name: str) -> str | None:
        try:
            return (folder / name).read_text()
        except OSError:
            return None

    def cpu_seconds(self) -> float | None:
        """CPU time used by the container since it started."""
        if self.version == 2:
            text = self._read(self.cpu, "cpu.stat")
            for line in (text or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return None
        text = self._read(self.cpu, "cpuacct.usage")
        return int(text) / 1e9 if text and text.strip() else None

    def memory_bytes(self) -> int | None:
        name = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        text = self._read(self.memory, name)
        return int(text) if text and text.strip().isdigit() else None

    def memory_peak(self) -> int | None:
        """The kernel's high-water mark (None where it keeps none)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        text = self._read(self.memory, name)
        return int(text) if text and text.strip().isdigit() else None

    def oom_kills(self) -> int | None:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self._read(self.memory, name) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None


def find(container_id: str, root: Path = ROOT) -> Cgroup | None:
    """The cgroup of a container (its full id), or None when none is readable here."""
    if (root / "cgroup.controllers").exists():
        for d in (root / "system.slice" / f"docker-{container_id}.scope",
                  root / "docker" / container_id):
            if (d / "cpu.stat").exists():
                return Cgroup(2, d, d)
        return None
    for rel in (Path("docker") / container_id,
                Path("system.slice") / f"docker-{container_id}.scope"):
        cpu = next((root / c / rel for c in ("cpuacct", "cpu,cpuacct", "cpu")
                    if (root / c / rel / "cpuacct.usage").exists()), None)
        mem = root / "memory" / rel
        if cpu is not None and (mem / "memory.usage_in_bytes").exists():
            return Cgroup(1, cpu, mem)
    return None


class ProcessTree:
    """The same readings for a local process and its children, from ``/proc`` (the
    process route, which has no cgroup of its own): CPU time (utime + stime), resident
    memory (VmRSS) and its peak (VmHWM, per process, summed: an upper bound)."""

    version = 0

    def __init__(self, pid: int):
        self.pid = pid

    def _pids(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return pids

    def cpu_seconds(self) -> float | None:
        import os

        tick = os.sysconf("SC_CLK_TCK")
        total, seen = 0, False
        for pid in self._pids():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            seen = True
        return total / tick if seen else None

    def _status_kb(self, key: str) -> int | None:
        total, seen = 0, False
        for pid in self._pids():
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
                    seen = True
        return total * 1024 if seen else None

    def memory_bytes(self) -> int | None:
        return self._status_kb("VmRSS")

    def memory_peak(self) -> int | None:
        return self._status_kb("VmHWM")

    def oom_kills(self) -> int | None:
        return None


@dataclass
class Sampler:
    """Reads a source's (a :class:`Cgroup`'s or :class:`ProcessTree`'s) CPU time and
    memory every ``every`` seconds in a thread.

    ``samples`` holds ``(time.monotonic(), cpu seconds or None, memory bytes or None)``.
    """

    source: object
    every: float = 0.05
    samples: list[tuple[float, float | None, int | None]] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlbuild-profile-sampler",
                                        daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> None:
        self.samples.append((time.monotonic(), self.source.cpu_seconds(),
                             self.source.memory_bytes()))

    def cpu_between(self, t0: float, t1: float) -> float | None:
        """CPU seconds used from ``t0`` to ``t1`` (monotonic), interpolated linearly
        between the samples around each end; None without samples on both sides."""
        points = [(t, c) for t, c, _ in list(self.samples) if c is not None]

        def at(t: float) -> float | None:
            before = [p for p in points if p[0] <= t]
            after = [p for p in points if p[0] >= t]
            if not before or not after:
                return None
            (ta, ca), (tb, cb) = before[-1], after[0]
            return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)

        a, b = at(t0), at(t1)
        return None if a is None or b is None else max(0.0, b - a)

    def memory_peak(self, t0: float, t1: float) -> int | None:
        """The largest memory sampled from ``t0`` to ``t1``."""
        values = [m for t, _, m in list(self.samples) if t0 <= t <= t1 and m is not None]
        return max(values) if values else None

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
