"""``mlbuild profile`` on the demo, run as a local process (-t dev: no engine needed):
the report's keys and their consistency, the HTML's plots, bad data refused before any
load, ``--write`` keeping the manifest valid and its comments. The container route, its
limits and OOM kills: tests/integration/test_profile_docker.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlbuild.profile.report import AZURE_KEYS

TINY = ["--window", "0.5", "--warmup", "0.2", "--concurrency", "1,2"]


def test_profile_demo_report(cli, diabetes: Path):
    doc = cli.json("profile", "diabetes", "-t", "dev", *TINY)
    for key in AZURE_KEYS:
        assert key in doc, key
    assert doc["limited"] is False and "without CPU or memory limits" in doc["note"]
    assert doc["successQueries"] <= doc["totalQueries"] and doc["successQueries"] > 0
    assert 0 <= doc["successRate"] <= 100
    lat = [doc[f"latencyPercentile{q}InMs"] for q in (50, 90, 95, 99)]
    assert lat == sorted(lat) and lat[0] > 0
    assert doc["recommendedCpu"] and 0.1 <= doc["recommendedCpu"] <= 3.5
    assert doc["recommendedMemoryInGB"] and 0.1 <= doc["recommendedMemoryInGB"] <= 15
    assert set(doc["reasons"]) == {"cpu", "memory"}
    (point,) = doc["grid"]
    assert [s["concurrency"] for s in point["steps"]][0] == 1
    for s in point["steps"]:
        assert s["successes"] <= s["responses"] <= s["requests"]
        q = s["latency_ms"]
        assert q["p50"] <= q["p90"] <= q["p95"] <= q["p99"] <= q["p99.9"] <= q["max"] * 1.001
        assert s["cpu_used"] is not None and s["memory_peak_gb"] > 0
    out = diabetes / ".mlbuild/profile/diabetes"
    assert json.loads((out / "profile.json").read_text()) == doc
    page = (out / "profile.html").read_text()
    assert page.count("<svg") >= 4 and "<polyline" in page
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    # the terminal form: a table and the two sentences
    r = cli("profile", "diabetes", "-t", "dev", *TINY, "--out", "prof")
    assert re.search(r"REQ/S .* P99", r.stdout) and "recommended cpu:" in r.stdout
    assert (diabetes / "prof/profile.html").exists()


def test_profile_refuses_bad_data_before_load(cli, diabetes: Path):
    (diabetes / "empty.txt").write_text("\n\n")
    r = cli("profile", "diabetes", "-t", "dev", "--data", "empty.txt", *TINY, check=3)
    assert "empty.txt: the file is empty" in r.stderr
    good = (diabetes / "samples/input.json").read_text().replace("\n", " ")
    # a body over the runtime's 10 MiB limit: 413
    big = '{"data": [' + ",".join(["0.1"] * (11 * 1024 * 1024 // 4)) + "]}"
    (diabetes / "bodies.txt").write_text(f"{good}\n{good}\n{big}\n")
    r = cli("profile", "diabetes", "-t", "dev", "--data", "bodies.txt", *TINY, check=3)
    assert "bodies.txt:3: the service answered 413" in r.stderr, r.stderr
    assert "warm-up" not in r.stderr and "c=1" not in r.stderr
    # run() failing on a body (a 500) is named the same way, before any load
    (diabetes / "bodies.txt").write_text(f"{good}\n{{\"data\": \"oops\"}}\n")
    r = cli("profile", "diabetes", "-t", "dev", "--data", "bodies.txt", *TINY, check=1)
    assert "bodies.txt:2: the service answered 500" in r.stderr, r.stderr
    assert not (diabetes / ".mlbuild/profile/diabetes/profile.json").exists()


def test_profile_json_list_and_write(cli, diabetes: Path):
    sample = json.loads((diabetes / "samples/input.json").read_text())
    (diabetes / "bodies.json").write_text(json.dumps([sample, sample]))
    before = (diabetes / "mlproject.yaml").read_text()
    doc = cli.json("profile", "diabetes", "-t", "dev", "--data", "bodies.json", *TINY,
                   "--write")
    assert doc["bodies"] == 2
    after = (diabetes / "mlproject.yaml").read_text()
    comments = [ln for ln in before.splitlines() if ln.lstrip().startswith("#")]
    assert comments and all(c in after.splitlines() for c in comments)
    added = [ln for ln in after.splitlines() if ln not in before.splitlines()]
    assert added == [f"    resources: {{cpu: {doc['recommendedCpu']:g}, "
                     f"memory_gb: {doc['recommendedMemoryInGB']:g}}}"], added
    assert cli.json("validate")["valid"]
    tags = cli.json("models", "show", "ridge")["tags"]
    assert tags["requestedCpu"] == f"{doc['recommendedCpu']:g}"
    assert tags["requestedMemoryInGb"] == f"{doc['recommendedMemoryInGB']:g}"
    assert tags["area"] == "diabetes"  # the manifest's own tags are kept
    # a second --write replaces the values in place
    cli("profile", "diabetes", "-t", "dev", *TINY, "--write")
    again = (diabetes / "mlproject.yaml").read_text()
    assert len(again.splitlines()) == len(after.splitlines())
    # the next build keeps the tags (the model step is up to date)
    cli("build", "dev")
    assert cli.json("models", "show", "ridge")["tags"]["requestedCpu"]
