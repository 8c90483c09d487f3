"""The pure parts of mlbuild profile: CPU placement, the recommendation rule, and the
manifest edit of --write (comments and layout kept)."""

from __future__ import annotations


from mlbuild.profile.histogram import LatencyHistogram
from mlbuild.profile.loadgen import LoadResult
from mlbuild.profile.recommend import recommend
from mlbuild.profile.run import GB, Point, Step, placement
from mlbuild.profile.write import _edits_for_model, _get, _Loader


def test_placement_keeps_a_cpu_for_the_generator():
    assert placement(1, 2) == ("1", [0])
    assert placement(0.5, 2) == ("1", [0])
    assert placement(2, 2) == (None, None)
    assert placement(2, 8) == ("6,7", [0, 1, 2, 3, 4, 5])
    assert placement(None, 8) == (None, None)


def step(c: int, rps: float, ok: bool = True) -> Step:
    h = LatencyHistogram()
    h.record(1000)
    r = LoadResult("http://x/score", c, duration=1.0, requests=int(rps), responses=int(rps),
                   status={200 if ok else 500: int(rps)}, latency=h)
    return Step(c, r, 0.5, 100 * 1024 ** 2)


def test_recommend_smallest_cpu_near_the_best_rate_and_memory_above_oom():
    a = Point(0.5, 1, [step(1, 500), step(2, 600)], memory_peak=300 * 1024 ** 2)
    b = Point(1, 1, [step(1, 900), step(2, 1000)], memory_peak=310 * 1024 ** 2)
    c = Point(2, 1, [step(1, 950), step(2, 1020)], memory_peak=320 * 1024 ** 2)
    killed = Point(1, 0.25, [], oom_kills=1, died="killed: out of memory")
    rec = recommend([a, b, c, killed], None)
    assert rec.cpu == 1 and rec.point is b
    assert rec.memory_gb == 0.4 and rec.memory_gb > 0.25  # 320 MiB * 1.25, rounded up
    assert "smallest limit" in rec.reasons["cpu"] and "headroom" in rec.reasons["memory"]
    none = recommend([Point(1, 1, [step(1, 10, ok=False)])], None)
    assert none.cpu is None and none.memory_gb is None and "no grid point" in none.reasons["cpu"]
    big = Point(8, 32, [step(1, 10)], memory_peak=20 * GB)
    clamped = recommend([big], None)
    assert (clamped.cpu, clamped.memory_gb) == (3.5, 15.0)


def edit(text: str, cpu=1, mem=0.5) -> str:
    import yaml

    root = yaml.compose(text, Loader=_Loader)
    model = _get(_get(root, "models")[1], "m")[1]
    for start, end, new in sorted(_edits_for_model(text, model, cpu, mem), reverse=True):
        text = text[:start] + new + text[end:]
    return text


def test_write_edits_in_place():
    block = "models:\n  m:\n    path: a.pkl   # the file\n\n# next\nservices: {}\n"
    assert edit(block) == ("models:\n  m:\n    path: a.pkl   # the file\n"
                           "    resources: {cpu: 1, memory_gb: 0.5}\n\n# next\nservices: {}\n")
    flow = "models:\n  m: {path: a.pkl}  # flow\n"
    assert edit(flow) == "models:\n  m: {path: a.pkl, resources: {cpu: 1, memory_gb: 0.5}}  # flow\n"
    nested = ("models:\n  m:\n    resources:\n      cpu: 2   # old\n    path: a.pkl\n")
    assert edit(nested) == ("models:\n  m:\n    resources:\n      cpu: 1   # old\n"
                            "      memory_gb: 0.5\n    path: a.pkl\n")
    inline = "models:\n  m:\n    path: a.pkl\n    resources: {cpu: 2, memory_gb: 4}\n"
    assert edit(inline, 0.5, 1) == \
        "models:\n  m:\n    path: a.pkl\n    resources: {cpu: 0.5, memory_gb: 1}\n"
    null = "models:\n  m:\n    resources:\n    path: a.pkl\n"
    assert edit(null) == "models:\n  m:\n    resources: {cpu: 1, memory_gb: 0.5}\n    path: a.pkl\n"
