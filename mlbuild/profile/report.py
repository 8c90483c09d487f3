"""The report of a profile: ``profile.json`` (Azure's keys plus every step), a terminal
table, and ``profile.html`` (self-contained: inline SVG drawn here, no script at all).

Azure's keys describe one measurement; here they are those of the recommendation's
grid point at its sustained step (the step of the highest rate that met the objective):
``requestedCpu``/``requestedMemoryInGB`` are that point's limits (None: unlimited),
``requestedQueriesPerSecond`` the sustained rate (a closed loop requests no rate of its
own), the counts and latencies those of that step's window, ``maxUtilized*`` the most
the service used at that point. Every point and step follows under ``grid``.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

from mlbuild.profile.recommend import Recommendation
from mlbuild.profile.run import GB, Point, Settings

AZURE_KEYS = ("requestedCpu", "requestedMemoryInGB", "requestedQueriesPerSecond",
              "maxUtilizedMemoryInGB", "maxUtilizedCpu", "totalQueries", "successQueries",
              "successRate", "averageLatencyInMs", "latencyPercentile50InMs",
              "latencyPercentile90InMs", "latencyPercentile95InMs",
              "latencyPercentile99InMs", "measuredQueriesPerSecond", "recommendedCpu",
              "recommendedMemoryInGB")


def profile_json(service: str, where: str, limited: bool, points: Sequence[Point],
                 rec: Recommendation, settings: Settings, data: str, bodies: int,
                 target: str | None) -> dict:
    """The content of profile.json (and of ``mlbuild --json profile``)."""
    slo = settings.slo_p99_ms
    out: dict = dict.fromkeys(AZURE_KEYS)
    p = rec.point
    step = p.sustained(slo) if p is not None else None
    if step is not None:
        r, lat = step.load, step.latency_ms()
        used = [s.cpu_used for s in p.steps if s.cpu_used is not None]
        out.update(
            requestedCpu=p.cpu, requestedMemoryInGB=p.memory_gb,
            requestedQueriesPerSecond=round(r.rps, 2),
            maxUtilizedMemoryInGB=None if p.memory_peak is None
            else round(p.memory_peak / GB, 4),
            maxUtilizedCpu=round(max(used), 3) if used else None,
            totalQueries=r.requests, successQueries=r.successes,
            successRate=round(100 * r.success_rate, 3),
            averageLatencyInMs=lat["mean"], latencyPercentile50InMs=lat["p50"],
            latencyPercentile90InMs=lat["p90"], latencyPercentile95InMs=lat["p95"],
            latencyPercentile99InMs=lat["p99"], measuredQueriesPerSecond=round(r.rps, 2))
    out.update(recommendedCpu=rec.cpu, recommendedMemoryInGB=rec.memory_gb)
    out.update(
        service=service, target=target, ranOn=where, limited=limited,
        note=None if limited else "run as a local process without CPU or memory limits "
                                  "(no Docker engine, or a process target): the CPU "
                                  "recommendation is an estimate",
        reasons=rec.reasons, data=data, bodies=bodies,
        settings={"concurrency": list(settings.concurrency), "window_s": settings.window,
                  "warmup_s": settings.warmup, "slo_p99_ms": slo},
        grid=[pt.to_json(slo) for pt in points])
    return out


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(doc: dict) -> str:
    """The terminal table: one row per step, the recommendation under it."""
    head = ("CPU", "MEM GB", "C", "REQ/S", "OK %", "P50", "P90", "P99", "P99.9", "CPU USED",
            "MEM MB", "STOP")
    rows = [head]
    for pt in doc["grid"]:
        cpu = "-" if pt["cpu"] is None else f"{pt['cpu']:g}"
        mem = "-" if pt["memory_gb"] is None else f"{pt['memory_gb']:g}"
        if not pt["steps"]:
            rows.append((cpu, mem, "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         pt["died"] or pt["stop"] or ""))
        for s in pt["steps"]:
            lat = s["latency_ms"]
            rows.append((cpu, mem, str(s["concurrency"]), _f(s["rps"]),
                         _f(100 * s["success_rate"]), _f(lat["p50"]), _f(lat["p90"]),
                         _f(lat["p99"]), _f(lat["p99.9"]), _f(s["cpu_used"], "{:.2f}"),
                         _f(None if s["memory_peak_gb"] is None
                            else s["memory_peak_gb"] * 1024, "{:.0f}"),
                         s["stop"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.append("")
    lines.append(f"ran on: {doc['ranOn']}" + (f" ({doc['note']})" if doc["note"] else ""))
    lines.append(f"recommended cpu:    {_f(doc['recommendedCpu'], '{:g}')}  "
                 f"{doc['reasons'].get('cpu', '')}")
    lines.append(f"recommended memory: {_f(doc['recommendedMemoryInGB'], '{:g}')} GB  "
                 f"{doc['reasons'].get('memory', '')}")
    return "\n".join(lines)


# --- HTML with inline SVG ---------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
          "#17becf")
W, H, ML, MR, MT, MB = 560, 300, 60, 150, 20, 40


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step) + 2)
            if first + i * step <= hi + step * 1e-9]


def svg_plot(title: str, xlabel: str, ylabel: str,
             series: Sequence[tuple[str, Sequence[tuple[float, float]], str]],
             log2x: bool = False) -> str:
    """A line plot as an ``<svg>`` element: ``series`` of (name, points, dash style)."""
    pts = [xy for _, s, _ in series for xy in s]
    if not pts:
        return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" '
                f'height="60"><text x="10" y="30">{html.escape(title)}: no data</text></svg>')
    fx = (lambda x: math.log2(x) if x > 0 else 0) if log2x else (lambda x: x)
    xs, ys = [fx(x) for x, _ in pts], [y for _, y in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y1 = max(ys) * 1.1 or 1
    pw, ph = W - ML - MR, H - MT - MB

    def px(x):
        return ML + (fx(x) - x0) / (x1 - x0) * pw

    def py(y):
        return MT + ph - y / y1 * ph

    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">',
           f'<title>{html.escape(title)}</title>',
           f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _ticks(0, y1):
        out.append(f'<line x1="{ML}" x2="{ML + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                   f'stroke="#eee"/><text x="{ML - 4}" y="{py(t) + 4:.1f}" font-size="10" '
                   f'text-anchor="end">{t:g}</text>')
    xt = sorted({x for x, _ in pts}) if log2x else _ticks(min(x for x, _ in pts),
                                                          max(x for x, _ in pts))
    for t in xt:
        out.append(f'<text x="{px(t):.1f}" y="{MT + ph + 14}" font-size="10" '
                   f'text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{ML + pw / 2}" y="{H - 6}" font-size="11" text-anchor="middle">'
               f'{html.escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{MT + ph / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {MT + ph / 2})">{html.escape(ylabel)}</text>')
    for k, (name, s, dash) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        if not s:
            continue
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}" points="{path}"><title>{html.escape(name)}'
                   f'</title></polyline>')
        if len(s) < 40:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>'
                    for x, y in s]
        ly = MT + 12 + 14 * k
        out.append(f'<line x1="{W - MR + 8}" x2="{W - MR + 24}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>'
                   f'<text x="{W - MR + 28}" y="{ly}" font-size="10">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _point_name(pt: dict) -> str:
    if pt["cpu"] is None:
        return "unlimited"
    return f"{pt['cpu']:g} CPU" + (f", {pt['memory_gb']:g} GB" if pt["memory_gb"] else "")


def page(doc: dict) -> str:
    """profile.html: the plots first, then the recommendation and the numbers."""
    grid = doc["grid"]
    thr = [(_point_name(p), [(s["concurrency"], s["rps"]) for s in p["steps"]], "")
           for p in grid]
    lat_plots = []
    for p in grid:
        series = [(q, [(s["concurrency"], s["latency_ms"][q]) for s in p["steps"]], dash)
                  for q, dash in (("p50", ""), ("p90", "6,3"), ("p95", "4,2"),
                                  ("p99", "2,2"), ("p99.9", "1,3"))]
        lat_plots.append(svg_plot(f"Latency percentiles, {_point_name(p)}", "concurrency",
                                  "ms", series, log2x=True))
    mem = [(_point_name(p), [(t, g * 1024) for t, g in p["memory_timeline"]], "")
           for p in grid]
    limits = sorted({p["memory_gb"] for p in grid if p["memory_gb"]})
    if limits and any(s for _, s, _ in mem):
        t_end = max(t for _, s, _ in mem for t, _ in s) if any(s for _, s, _ in mem) else 1
        mem += [(f"limit {g:g} GB", [(0, g * 1024), (t_end, g * 1024)], "5,5")
                for g in limits]
    cpu = [(_point_name(p), [(s["concurrency"], s["cpu_used"]) for s in p["steps"]
                             if s["cpu_used"] is not None], "") for p in grid]
    e = html.escape
    rec_rows = "".join(
        f"<tr><th>{e(k)}</th><td>{e(str(doc[k]))}</td></tr>" for k in
        ("recommendedCpu", "recommendedMemoryInGB"))
    azure_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(doc[k]))}</td></tr>"
                         for k in AZURE_KEYS)
    note = f'<p class="note">{e(doc["note"])}</p>' if doc["note"] else ""
    reasons = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in doc["reasons"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>mlbuild profile: {e(doc['service'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 2px 8px; text-align: right; }}
th {{ text-align: left; background: #f6f6f6; }}
.note {{ background: #fff3cd; padding: .5em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>Profile of {e(doc['service'])}</h1>
<p>Ran on: {e(doc['ranOn'])}. Data: {e(doc['data'])} ({doc['bodies']} bodies).</p>
{note}
<h2>Recommendation</h2>
<table>{rec_rows}</table>
<ul>{reasons}</ul>
<h2>Throughput and latency</h2>
<div class="plots">
{svg_plot("Throughput by concurrency", "concurrency", "requests per second", thr, log2x=True)}
{svg_plot("CPU used by concurrency", "concurrency", "CPU (cores)", cpu, log2x=True)}
{"".join(lat_plots)}
</div>
<h2>Memory over time</h2>
<div class="plots">
{svg_plot("Memory used", "seconds since the profile started", "MiB", mem)}
</div>
<h2>Azure's figures (the recommended point's sustained step)</h2>
<table>{azure_rows}</table>
<h2>Every step</h2>
<pre>{e(table(doc))}</pre>
</body></html>
"""
