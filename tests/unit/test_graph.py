"""The planner (step DAG, plan cache, selection, rendering) and the executor
(up-to-date decisions, their reasons, early cutoff, failures, stable fingerprints)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from unittools import BASIC_FILES, BASIC_MANIFEST, Opened, make_project, run, statuses
from mlbuild.errors import InvalidInput, MlbuildError, NotSupported, StepFailed
from mlbuild.graph import executor, planner
from mlbuild.graph.executor import (
    FAILED,
    NOT_RUN,
    RAN,
    UNKNOWN,
    UP_TO_DATE,
    WOULD_RUN,
    reasons_for,
)
from mlbuild.graph.planner import plan_steps, render_graph, select
from mlbuild.graph.step import StepSpec
from mlbuild.graph.steps.context import ContextStep
from mlbuild.state.db import StateDB

BASIC_IDS = ["lock:env", "model:ridge", "context:svc", "package:bundle/svc"]

# Two services sharing a model, declared in non-alphabetical order (b before a, ridge
# before lasso) so that a manifest-order plan and a sorted plan differ.
TWO_SERVICES = """\
name: demo
models:
  ridge: {path: models/ridge.pkl}
  lasso: {path: models/lasso.pkl}
environments:
  env: {requirements: envs/requirements.txt}
services:
  b: {entry_script: src/score.py, environment: env, models: [ridge, lasso]}
  a: {entry_script: src/score.py, environment: env, models: [ridge]}
targets:
  bundle: {type: package, out: dist/package}
"""
TWO_FILES = {**BASIC_FILES, "models/lasso.pkl": b"fake lasso"}
TWO_ORDER = ["lock:env", "model:lasso", "model:ridge", "context:a", "context:b",
             "package:bundle/a", "package:bundle/b"]


def load(root: Path):
    from mlbuild.manifest import load_project

    return load_project(root / "mlproject.yaml")


@pytest.fixture
def two(tmp_path) -> Path:
    return make_project(tmp_path / "two", TWO_SERVICES, TWO_FILES)


# -- planner: the DAG -------------------------------------------------------------------

def test_graph_one_service(basic):
    p = load(basic)
    g = planner.build_graph(p, p.target("bundle"))
    assert sorted(g.nodes) == sorted(BASIC_IDS)
    assert sorted(g.edges) == [("context:svc", "package:bundle/svc"),
                               ("lock:env", "context:svc"),
                               ("model:ridge", "context:svc")]
    specs = plan_steps(p, p.target("bundle"))
    assert [s.id for s in specs] == BASIC_IDS
    assert [s.kind for s in specs] == ["lock", "model", "context", "package"]
    by = {s.id: s for s in specs}
    assert by["model:ridge"].params == {"model": "ridge", "version": None}
    assert by["context:svc"].params == {"service": "svc"}
    assert by["context:svc"].deps == ["model:ridge", "lock:env"]
    assert by["lock:env"].params == {"environment": "env"}
    assert by["package:bundle/svc"].params == {"service": "svc", "target": "bundle"}
    assert by["package:bundle/svc"].deps == ["context:svc"]


def test_graph_two_services_share_one_model_step(two):
    p = load(two)
    g = planner.build_graph(p, p.target("bundle"))
    assert sorted(g.nodes) == sorted(TWO_ORDER)
    assert sorted(g.edges) == sorted([
        ("model:ridge", "context:a"), ("model:ridge", "context:b"),
        ("model:lasso", "context:b"),
        ("lock:env", "context:a"), ("lock:env", "context:b"),
        ("context:a", "package:bundle/a"), ("context:b", "package:bundle/b"),
    ])
    specs = plan_steps(p, p.target("bundle"))
    ids = [s.id for s in specs]
    assert ids.count("model:ridge") == 1
    assert ids == TWO_ORDER  # topological, ties broken by id: not manifest order
    assert {s.id: s.deps for s in specs}["context:b"] == ["model:ridge", "model:lasso",
                                                           "lock:env"]


def test_plan_order_does_not_depend_on_manifest_order(tmp_path):
    swapped = TWO_SERVICES.replace(
        "  ridge: {path: models/ridge.pkl}\n  lasso: {path: models/lasso.pkl}\n",
        "  lasso: {path: models/lasso.pkl}\n  ridge: {path: models/ridge.pkl}\n",
    ).replace(
        "  b: {entry_script: src/score.py, environment: env, models: [ridge, lasso]}\n"
        "  a: {entry_script: src/score.py, environment: env, models: [ridge]}\n",
        "  a: {entry_script: src/score.py, environment: env, models: [ridge]}\n"
        "  b: {entry_script: src/score.py, environment: env, models: [ridge, lasso]}\n",
    )
    assert swapped != TWO_SERVICES
    r1 = make_project(tmp_path / "one", TWO_SERVICES, TWO_FILES)
    r2 = make_project(tmp_path / "two", swapped, TWO_FILES)
    ids = []
    for r in (r1, r2):
        p = load(r)
        ids.append([s.id for s in plan_steps(p, p.target("bundle"))])
    assert ids[0] == ids[1] == TWO_ORDER


def test_pinned_model_gets_its_own_step_id(tmp_path):
    root = make_project(tmp_path / "p", BASIC_MANIFEST.replace("models: [ridge]", "models: [ridge@3]"))
    p = load(root)
    specs = plan_steps(p, p.target("bundle"))
    assert [s.id for s in specs] == ["lock:env", "model:ridge@3", "context:svc",
                                     "package:bundle/svc"]
    assert specs[1].params == {"model": "ridge", "version": 3}
    assert specs[2].deps == ["model:ridge@3", "lock:env"]


def test_target_services_subset(tmp_path):
    m = TWO_SERVICES.replace("bundle: {type: package, out: dist/package}",
                             "bundle: {type: package, out: dist/package, services: [a]}")
    root = make_project(tmp_path / "p", m, TWO_FILES)
    p = load(root)
    assert [s.id for s in plan_steps(p, p.target("bundle"))] == \
        ["lock:env", "model:ridge", "context:a", "package:bundle/a"]


def test_kubernetes_target_needs_a_registry_said_plainly(basic):
    p = load(basic)
    with pytest.raises(InvalidInput) as ei:
        plan_steps(p, p.target("k8s"))
    msg = str(ei.value)
    assert "targets.k8s: a kubernetes target needs the project's registry" in msg
    assert msg.startswith("mlproject.yaml:") and "\n" not in msg and "Traceback" not in msg
    assert "registry:" in ei.value.hint and ei.value.exit_code == 3


def test_kubernetes_target_plan(basic):
    text = (basic / "mlproject.yaml").read_text()
    (basic / "mlproject.yaml").write_text("registry: 127.0.0.1:5000/ml\n" + text)
    p = load(basic)
    ids = [s.id for s in plan_steps(p, p.target("k8s"))]
    assert ids == ["lock:env", "model:ridge", "context:svc", "image:svc", "push:svc",
                   "k8s:k8s/svc"]


def test_docker_target_plan(basic):
    p = load(basic)
    ids = [s.id for s in plan_steps(p, p.target("local"))]
    for svc in p.services_for(p.target("local")):
        i, c = ids.index(f"image:{svc.name}"), ids.index(f"container:local/{svc.name}")
        assert ids.index(f"context:{svc.name}") < i < c
        assert (f"push:{svc.name}" in ids) == bool(p.registry)


def test_process_target_plan(basic):
    p = load(basic)
    steps = plan_steps(p, p.target("dev"))
    by_id = {s.id: s for s in steps}
    proc = [s for s in steps if s.kind == "process"]
    assert proc and all(set(s.deps) == {f"context:{s.params['service']}",
                                        f"venv:{p.services[s.params['service']].environment}"}
                        for s in proc)
    assert all(by_id[d].kind in ("context", "venv") for s in proc for d in s.deps)


NO_CODE = """\
name: demo
models:
  ridge: {path: models/ridge.pkl, framework: scikit-learn, framework_version: "1.5"}
  lasso: {path: models/lasso.pkl, framework: scikit-learn}
services:
  a: {models: [ridge]}
  b: {models: [lasso]}
targets:
  dev: {type: process, port: 8890}
  bundle: {type: package, out: dist/package, offline: true}
  pkg: {type: package, out: dist/pkg}
"""


def test_no_code_services_share_one_default_environment_step(tmp_path):
    root = make_project(tmp_path / "nocode", NO_CODE, TWO_FILES)
    p = load(root)
    env = "_nocode-scikit-learn-1.5"
    for target, shared in (("dev", ["lock", "venv"]), ("bundle", ["lock", "wheels"])):
        steps = plan_steps(p, p.target(target))
        for kind in shared:  # made once for both services
            assert [s.id for s in steps if s.kind == kind] == [f"{kind}:{env}"]
        assert len([s for s in steps if s.kind in ("process", "package")]) == 2
    # Locked where inline environments' locks go, and in both packages.
    out = run(root, "pkg")
    assert statuses(out)[f"lock:{env}"] == RAN
    lock = (root / f"locks/{env}.lock.txt").read_text()
    assert "scikit-learn==" in lock and "joblib==" in lock
    for svc in ("a", "b"):
        assert (root / f"dist/pkg/{svc}/env/requirements.lock.txt").read_text() == \
            lock.split("\n", 1)[1]
    assert set(statuses(run(root, "pkg")).values()) == {UP_TO_DATE}


def test_refused_target_is_not_cached(basic):
    p = load(basic)
    db = StateDB(basic / ".mlbuild")
    try:
        for _ in range(2):  # refused every time (no registry), not served from a cache
            with pytest.raises(InvalidInput):
                plan_steps(p, p.target("k8s"), db)
        assert db.get_plan(planner.plan_key(p, p.target("k8s"))) is None
    finally:
        db.close()


# -- planner: the plan cache ------------------------------------------------------------

def test_plan_cached_in_db(basic, monkeypatch):
    p = load(basic)
    db = StateDB(basic / ".mlbuild")
    try:
        first = plan_steps(p, p.target("bundle"), db)
        assert db.get_plan(planner.plan_key(p, p.target("bundle"))) == [s.to_json() for s in first]

        def boom(*a, **k):
            raise AssertionError("planned again despite the cache")

        monkeypatch.setattr(planner, "build_graph", boom)
        second = plan_steps(p, p.target("bundle"), db)
        assert [s.to_json() for s in second] == [s.to_json() for s in first]
        # A changed manifest is a new key: planned afresh.
        m = basic / "mlproject.yaml"
        m.write_text(m.read_text() + "# changed\n")
        with pytest.raises(AssertionError, match="planned again"):
            plan_steps(load(basic), p.target("bundle"), db)
    finally:
        db.close()


PLAN_SCRIPT = """\
import sys
from pathlib import Path
from mlbuild.manifest import load_project
from mlbuild.graph.planner import plan_steps
from mlbuild.state.db import StateDB
root = Path(sys.argv[1])
p = load_project(root / "mlproject.yaml")
db = StateDB(root / ".mlbuild")
ids = [s.id for s in plan_steps(p, p.target("bundle"), db)]
db.close()
print(" ".join(ids))
print("networkx" in sys.modules)
"""


def test_cached_plan_does_not_import_networkx(basic):
    def plan_in_fresh_interpreter():
        r = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, str(basic)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        ids, imported = r.stdout.split("\n")[:2]
        return ids.split(), imported == "True"

    assert plan_in_fresh_interpreter() == (BASIC_IDS, True)   # first: plans with networkx
    assert plan_in_fresh_interpreter() == (BASIC_IDS, False)  # then: from the cache


# -- planner: select and render ---------------------------------------------------------

def _two_specs(root):
    p = load(root)
    return plan_steps(p, p.target("bundle"))


def test_select_keeps_dependencies(two):
    specs = _two_specs(two)
    assert [s.id for s in select(specs, {"context"})] == \
        ["lock:env", "model:lasso", "model:ridge", "context:a", "context:b"]
    assert [s.id for s in select(specs, {"model"})] == ["model:lasso", "model:ridge"]
    assert [s.id for s in select(specs, {"package"})] == TWO_ORDER
    assert select(specs, {"image"}) == []


def test_select_one_branch():
    specs = [StepSpec("model:x", "model", {}), StepSpec("model:y", "model", {}),
             StepSpec("context:a", "context", {}, ["model:x"]),
             StepSpec("image:a", "image", {}, ["context:a"]),
             StepSpec("context:b", "context", {}, ["model:y"])]
    assert [s.id for s in select(specs, {"image"})] == ["model:x", "context:a", "image:a"]


def test_render_text(two):
    assert render_graph(_two_specs(two), "text") == textwrap.dedent("""\
        lock:env
        model:lasso
        model:ridge
        context:a  <- model:ridge, lock:env
        context:b  <- model:ridge, model:lasso, lock:env
        package:bundle/a  <- context:a
        package:bundle/b  <- context:b""")


def test_render_dot(two):
    out = render_graph(_two_specs(two), "dot")
    lines = out.splitlines()
    assert lines[0] == "digraph mlbuild {" and lines[-1] == "}"
    for n in TWO_ORDER:
        assert f'  "{n}";' in lines
    edges = sorted(l for l in lines if "->" in l)
    assert edges == sorted([
        '  "model:ridge" -> "context:a";', '  "model:ridge" -> "context:b";',
        '  "model:lasso" -> "context:b";', '  "context:a" -> "package:bundle/a";',
        '  "lock:env" -> "context:a";', '  "lock:env" -> "context:b";',
        '  "context:b" -> "package:bundle/b";'])


def test_render_mermaid(two):
    assert render_graph(_two_specs(two), "mermaid") == textwrap.dedent("""\
        graph LR
          s0["lock:env"]
          s1["model:lasso"]
          s2["model:ridge"]
          s3["context:a"]
          s4["context:b"]
          s5["package:bundle/a"]
          s6["package:bundle/b"]
          s2 --> s3
          s0 --> s3
          s2 --> s4
          s1 --> s4
          s0 --> s4
          s3 --> s5
          s4 --> s6""")


def test_render_unknown_format(two):
    with pytest.raises(ValueError):
        render_graph(_two_specs(two), "svg")


# -- executor: runs ---------------------------------------------------------------------

def by_id(outcomes) -> dict:
    """The outcomes by step id (positions move whenever the plan gains a step)."""
    return {o.id: o for o in outcomes}


def test_first_run_runs_all_second_run_nothing(basic):
    first = run(basic)
    assert [o.id for o in first] == BASIC_IDS
    assert statuses(first) == dict.fromkeys(BASIC_IDS, RAN)
    assert all(o.reasons == ["new"] for o in first)
    assert by_id(first)["model:ridge"].summary == "registered ridge@1"
    assert (basic / "dist/package/svc/Dockerfile").is_file()
    assert (basic / "dist/package/svc/models/ridge/1/ridge.pkl").read_bytes() == \
        BASIC_FILES["models/ridge.pkl"]
    second = run(basic)
    assert statuses(second) == dict.fromkeys(BASIC_IDS, UP_TO_DATE)
    assert all(o.reasons == [] for o in second)
    assert [o.fingerprint for o in second] == [o.fingerprint for o in first]


def test_on_event_order(basic):
    events = []
    run(basic, on_event=lambda ev, o: events.append((ev, o.id, o.status)))
    assert events == [
        ("start", "lock:env", UP_TO_DATE), ("end", "lock:env", RAN),
        ("start", "model:ridge", UP_TO_DATE), ("end", "model:ridge", RAN),
        ("start", "context:svc", UP_TO_DATE), ("end", "context:svc", RAN),
        ("start", "package:bundle/svc", UP_TO_DATE), ("end", "package:bundle/svc", RAN),
    ]


def test_force_runs_everything_saying_forced(basic):
    run(basic)
    out = run(basic, force=True)
    assert statuses(out) == dict.fromkeys(BASIC_IDS, RAN)
    assert all(o.reasons == ["forced"] for o in out)
    assert by_id(out)["model:ridge"].summary == \
        "ridge@1 (content unchanged) (same output as before)"


def _snapshot(root: Path) -> dict:
    """Every file below root (state database excluded) with its mtime and content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel.startswith(".mlbuild/state.db"):
                continue
            if p.is_dir():  # (a folder's mtime moves with SQLite's -wal/-shm files)
                out[rel] = "dir"
            else:
                st = p.lstat()
                out[rel] = (st.st_mtime_ns, st.st_ino, p.read_bytes())
    return out


def _db_rows(root: Path):
    db = StateDB(root / ".mlbuild")
    try:
        return (db.query("SELECT * FROM steps ORDER BY id"),
                db.query("SELECT * FROM models ORDER BY name, version"))
    finally:
        db.close()


def test_dry_run_on_new_project_changes_nothing(basic):
    before = _snapshot(basic)
    out = run(basic, dry_run=True)
    assert statuses(out) == dict.fromkeys(BASIC_IDS, WOULD_RUN)
    assert all(o.reasons == ["new"] for o in out)
    assert _db_rows(basic) == ([], [])
    after = _snapshot(basic)
    assert {k: v for k, v in after.items() if not k.startswith(".mlbuild")} == before
    assert not (basic / "dist").exists()
    assert not (basic / ".mlbuild/contexts").exists()
    assert not (basic / ".mlbuild/blobs").exists()


def test_dry_run_after_change_explains_and_changes_nothing(basic):
    run(basic)
    (basic / "src/score.py").write_text("def init():\n    pass\n\ndef run(data):\n    return 2\n")
    before, rows = _snapshot(basic), _db_rows(basic)
    out = run(basic, dry_run=True)
    assert statuses(out) == {"lock:env": UP_TO_DATE, "model:ridge": UP_TO_DATE,
                             "context:svc": WOULD_RUN, "package:bundle/svc": WOULD_RUN}
    assert by_id(out)["context:svc"].reasons == ["input src/score.py changed"]
    assert by_id(out)["package:bundle/svc"].reasons == ["upstream context:svc will run"]
    assert _snapshot(basic) == before
    assert _db_rows(basic) == rows
    # ... and the real run does what the plan said.
    assert statuses(run(basic)) == {"lock:env": UP_TO_DATE, "model:ridge": UP_TO_DATE,
                                    "context:svc": RAN, "package:bundle/svc": RAN}


def test_setting_change_names_the_field(basic):
    run(basic)
    m = basic / "mlproject.yaml"
    m.write_text(m.read_text().replace("auth: key", "auth: none"))
    out = run(basic)
    assert statuses(out) == {"lock:env": UP_TO_DATE, "model:ridge": UP_TO_DATE,
                             "context:svc": RAN, "package:bundle/svc": RAN}
    assert by_id(out)["context:svc"].reasons == ["setting services.svc.auth changed"]
    assert "setting services.svc.auth changed" in by_id(out)["package:bundle/svc"].reasons
    readme = (basic / "dist/package/svc/README.md").read_text()
    assert "SCORING_KEY" not in readme


def test_model_content_change_reruns_downstream(basic):
    run(basic)
    (basic / "models/ridge.pkl").write_bytes(b"another model, another size")
    out = run(basic)
    assert statuses(out) == {"lock:env": UP_TO_DATE, "model:ridge": RAN, "context:svc": RAN,
                             "package:bundle/svc": RAN}
    o = by_id(out)
    assert o["model:ridge"].reasons == ["input models/ridge.pkl changed"]
    assert o["model:ridge"].summary == "registered ridge@2"
    assert o["context:svc"].reasons == ["upstream model:ridge re-ran"]
    assert o["package:bundle/svc"].reasons == ["upstream context:svc re-ran"]
    assert (basic / "dist/package/svc/models/ridge/2/ridge.pkl").is_file()
    assert not (basic / "dist/package/svc/models/ridge/1").exists()


def test_early_cutoff_model_tags_change(basic):
    run(basic)
    m = basic / "mlproject.yaml"
    m.write_text(m.read_text().replace("tags: {area: test}", "tags: {area: prod}"))
    out = run(basic)
    assert statuses(out) == {"lock:env": UP_TO_DATE, "model:ridge": RAN,
                             "context:svc": UP_TO_DATE, "package:bundle/svc": UP_TO_DATE}
    assert by_id(out)["model:ridge"].reasons == ["setting models.ridge.tags.area changed"]
    assert by_id(out)["model:ridge"].summary.endswith("(same output as before)")
    o = Opened(basic)
    try:
        mv = o.registry.get("ridge")
        assert (mv.version, dict(mv.tags)) == (1, {"area": "prod"})
    finally:
        o.close()


def test_touch_without_change_reruns_nothing(basic):
    run(basic)
    p = basic / "src/score.py"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert statuses(run(basic)) == dict.fromkeys(BASIC_IDS, UP_TO_DATE)


def test_input_added_and_removed(basic):
    run(basic)
    (basic / "src/extra.py").write_text("Y = 2\n")
    out = run(basic)
    assert by_id(out)["context:svc"].reasons == ["input src/extra.py added"]
    (basic / "src/util.py").unlink()
    out = run(basic)
    assert by_id(out)["context:svc"].reasons == ["input src/util.py removed"]
    assert sorted(p.name for p in (basic / "dist/package/svc/app").iterdir()) == \
        ["extra.py", "score.py"]


def test_step_version_change(basic, monkeypatch):
    run(basic)
    v = ContextStep.version
    monkeypatch.setattr(ContextStep, "version", v + 1)
    out = by_id(run(basic))
    assert out["context:svc"].status == RAN
    assert out["context:svc"].reasons == [f"mlbuild's context step changed (v{v} -> v{v + 1})"]
    assert out["model:ridge"].status == UP_TO_DATE
    assert out["lock:env"].status == UP_TO_DATE


def test_template_change(basic, monkeypatch):
    run(basic)
    real = executor.template_digest
    monkeypatch.setattr(executor, "template_digest",
                        lambda t: "sha256:edited" if t == "package-README.md.j2" else real(t))
    out = run(basic)
    assert statuses(out) == {"lock:env": UP_TO_DATE, "model:ridge": UP_TO_DATE,
                             "context:svc": UP_TO_DATE, "package:bundle/svc": RAN}
    assert by_id(out)["package:bundle/svc"].reasons == ["template package-README.md.j2 changed"]


def test_missing_or_modified_output_reruns(basic):
    run(basic)
    shutil.rmtree(basic / "dist")
    out = run(basic)
    assert statuses(out)["package:bundle/svc"] == RAN
    assert by_id(out)["package:bundle/svc"].reasons == ["output dist/package/svc missing"]
    readme = basic / "dist/package/svc/README.md"
    readme.unlink()
    readme.write_text("edited by hand\n")
    out = run(basic)
    assert by_id(out)["package:bundle/svc"].reasons == \
        ["output dist/package/svc/README.md was modified"]
    assert "docker build" in readme.read_text()


# -- executor: reasons_for --------------------------------------------------------------

BASE = {
    "kind": "context", "version": 1,
    "config": {"name": "demo", "services.x": {"auth": "none", "cors": []}},
    "inputs": {"src/a.py": "sha256:a", "src/b.py": "sha256:b"},
    "extra": {},
    "templates": {"Dockerfile.j2": "sha256:t"},
    "upstream": {"model:ridge": "sha256:k"},
}


def changed(**kw) -> dict:
    d = json.loads(json.dumps(BASE))
    for k, v in kw.items():
        d[k] = v
    return d


def test_reasons_new():
    assert reasons_for(None, BASE) == ["new"]


@pytest.mark.parametrize("new, reasons", [
    (changed(config={"name": "demo", "services.x": {"auth": "key", "cors": []}}),
     ["setting services.x.auth changed"]),
    (changed(config={"name": "demo2", "services.x": {"auth": "none", "cors": ["a"]}}),
     ["setting name changed", "setting services.x.cors changed"]),
    (changed(inputs={"src/a.py": "sha256:a", "src/b.py": "sha256:b", "src/c.py": "sha256:c"}),
     ["input src/c.py added"]),
    (changed(inputs={"src/a.py": "sha256:a"}), ["input src/b.py removed"]),
    (changed(inputs={"src/a.py": "sha256:A", "src/b.py": "sha256:b"}), ["input src/a.py changed"]),
    (changed(templates={"Dockerfile.j2": "sha256:T"}), ["template Dockerfile.j2 changed"]),
    (changed(upstream={"model:ridge": "sha256:K"}), ["upstream model:ridge re-ran"]),
    (changed(upstream={"model:ridge": UNKNOWN}), ["upstream model:ridge will run"]),
    (changed(upstream={"model:ridge": "sha256:k", "model:lasso": "sha256:l"}),
     ["upstream model:lasso added"]),
    (changed(version=2), ["mlbuild's context step changed (v1 -> v2)"]),
    (changed(extra={"registered": "sha256:r"}), ["registered changed"]),
    (BASE, ["fingerprint changed"]),
])
def test_reasons_for(new, reasons):
    assert reasons_for(BASE, new) == reasons


def test_reasons_upstream_removed():
    assert reasons_for(BASE, changed(upstream={})) == ["upstream model:ridge removed"]


def test_reasons_for_real_details_in_dry_run(basic):
    """Several changes at once are all named, in a stable order."""
    run(basic)
    m = basic / "mlproject.yaml"
    m.write_text(m.read_text().replace("auth: key", "auth: none"))
    (basic / "envs/requirements.txt").write_text("scikit-learn>=1.6\n")
    out = by_id(run(basic, dry_run=True))
    # The requirements reach the context through the environment's lock step.
    assert out["lock:env"].reasons == ["input envs/requirements.txt changed"]
    assert out["context:svc"].reasons == ["setting services.svc.auth changed",
                                          "upstream lock:env will run"]
    assert out["package:bundle/svc"].reasons == ["setting services.svc.auth changed",
                                                 "upstream context:svc will run"]


# -- executor: failures -----------------------------------------------------------------

FAILING = BASIC_MANIFEST.replace("models: [ridge]", "models: [ridge, zzz@5]")
FAIL_IDS = ["lock:env", "model:ridge", "model:zzz@5", "context:svc", "package:bundle/svc"]


def test_failing_step_stops_run_and_keeps_earlier_records(tmp_path):
    root = make_project(tmp_path / "p", FAILING)
    o = Opened(root)
    events = []
    try:
        assert [s.id for s in o.specs()] == FAIL_IDS
        with pytest.raises(InvalidInput, match=r"model zzz@5 is not registered \(versions: none\)"):
            o.execute(on_event=lambda ev, x: events.append((ev, x.id, x.status, x.error)))
        ends = [(i, s, e) for ev, i, s, e in events if ev == "end"]
        assert ends[0] == ("lock:env", RAN, None)
        assert ends[1] == ("model:ridge", RAN, None)
        assert ends[2][:2] == ("model:zzz@5", FAILED)
        assert "zzz@5 is not registered" in ends[2][2]
        assert not any(i in ("context:svc", "package:bundle/svc") and s in (RAN, UP_TO_DATE)
                       for i, s, _ in ends)
        # the earlier steps are recorded
        assert set(o.db.all_steps()) == {"lock:env", "model:ridge"}
    finally:
        o.close()
    assert not (root / "dist").exists()
    # Fix the cause: the next run redoes exactly the rest.
    (root / "mlproject.yaml").write_text(BASIC_MANIFEST)
    assert statuses(run(root)) == {"lock:env": UP_TO_DATE, "model:ridge": UP_TO_DATE,
                                   "context:svc": RAN, "package:bundle/svc": RAN}


def test_failing_step_reports_later_steps_not_run(tmp_path):
    root = make_project(tmp_path / "p", FAILING)
    events = []
    with pytest.raises(MlbuildError) as ei:
        run(root, on_event=lambda ev, x: events.append((ev, x.id, x.status)))
    seen = [(i, s) for ev, i, s in events if ev == "end"]
    outcomes = getattr(ei.value, "outcomes", None)
    got = [(x.id, x.status) for x in outcomes] if outcomes is not None else seen
    after = FAIL_IDS.index("model:zzz@5") + 1  # the steps after the failing one
    assert got[after:] == [("context:svc", NOT_RUN), ("package:bundle/svc", NOT_RUN)]


def test_os_error_in_step_is_step_failed(basic):
    (basic / "dist").write_text("a file where the package folder should go\n")
    events = []
    with pytest.raises(StepFailed) as ei:
        run(basic, on_event=lambda ev, x: events.append((ev, x.id, x.status, x.error)))
    assert ei.value.step_id == "package:bundle/svc"
    assert ei.value.exit_code == 1
    assert "dist" in str(ei.value)
    assert events[-1][1:3] == ("package:bundle/svc", FAILED)
    o = Opened(basic)
    try:
        assert set(o.db.all_steps()) == {"lock:env", "model:ridge", "context:svc"}
    finally:
        o.close()
    (basic / "dist").unlink()
    assert statuses(run(basic)) == {"lock:env": UP_TO_DATE, "model:ridge": UP_TO_DATE,
                                    "context:svc": UP_TO_DATE, "package:bundle/svc": RAN}


def test_deleted_blob_is_restored_by_model_step(basic):
    run(basic)
    o = Opened(basic)
    try:
        mv = o.registry.get("ridge@1")
        o.registry.blob_path(mv.files[0][1]).unlink()
    finally:
        o.close()
    out = by_id(run(basic))
    assert out["model:ridge"].status == RAN
    assert out["model:ridge"].reasons == ["blobs of ridge@1 missing from the registry"]
    o = Opened(basic)
    try:
        assert o.registry.blobs_present(o.registry.get("ridge@1"))
    finally:
        o.close()
    assert statuses(run(basic)) == dict.fromkeys(BASIC_IDS, UP_TO_DATE)


# -- fingerprints -----------------------------------------------------------------------

def _fps(outcomes) -> dict[str, str]:
    return {o.id: o.fingerprint for o in outcomes}


def test_fingerprints_independent_of_checkout_path(tmp_path):
    a = make_project(tmp_path / "a")
    b = make_project(tmp_path / "deeper" / "elsewhere" / "b")
    fa, fb = _fps(run(a)), _fps(run(b))
    assert fa == fb
    assert len(set(fa.values())) == len(BASIC_IDS)
    assert (a / "dist/package/svc/README.md").read_text() == \
        (b / "dist/package/svc/README.md").read_text()


COSMETIC = """\
# the same project, written differently
name: demo   # a comment

targets:
  k8s: {namespace: ml, type: kubernetes}
  local: {port: 6789, type: docker}
  dev: {port: 8890, type: process}
  bundle:
    out: dist/package
    type: package
services:
  svc:
    auth: key
    models: [ridge]
    environment: env   # comment
    source_dir: src
    entry_script: src/score.py
environments:
  env:
    requirements: envs/requirements.txt
models:
  ridge:
    tags:
      area: test
    description: a ridge
    framework: scikit-learn
    path: models/ridge.pkl
default_target: bundle
"""


def test_fingerprints_ignore_comments_and_key_order(tmp_path):
    a = make_project(tmp_path / "a")
    b = make_project(tmp_path / "b", COSMETIC)
    assert (a / "mlproject.yaml").read_bytes() != (b / "mlproject.yaml").read_bytes()
    assert _fps(run(a, dry_run=True)) == _fps(run(b, dry_run=True))
    assert _fps(run(a)) == _fps(run(b))


def test_fingerprint_changes_with_content(tmp_path):
    """Control for the two tests above: a real change does change fingerprints."""
    a = make_project(tmp_path / "a")
    b = make_project(tmp_path / "b", files={**BASIC_FILES, "src/util.py": "X = 2\n"})
    fa, fb = _fps(run(a, dry_run=True)), _fps(run(b, dry_run=True))
    assert fa["model:ridge"] == fb["model:ridge"]
    assert fa["context:svc"] != fb["context:svc"]


# -- -j: parallel steps -------------------------------------------------------------------

class _Sleepy:
    """A stand-in step kind that records when it ran."""

    kind = "image"
    version = 1
    templates = ()
    log: list = []

    def __init__(self, spec):
        self.spec, self.id, self.params = spec, spec.id, spec.params

    def config(self, ctx):
        return {"n": self.params["n"]}

    def inputs(self, ctx):
        return {}

    def extra(self, ctx):
        return {}

    def check_outputs(self, ctx, outputs):
        return None

    def run(self, ctx, upstream, fp):
        import threading

        start = time.monotonic()
        if self.params.get("fail"):
            raise StepFailed(self.id, "boom")
        time.sleep(0.3)
        _Sleepy.log.append((self.id, start, time.monotonic(), threading.get_ident()))
        return {"n": self.params["n"]}

    def identity(self, outputs):
        return outputs

    def summary(self, outputs):
        return ""


def _sleepy_specs(n, fail=None):
    return [StepSpec(f"image:s{i}", "image", {"n": i, "fail": i == fail}) for i in range(n)]


def test_jobs_run_independent_images_side_by_side(basic, monkeypatch):
    from mlbuild.graph import executor

    monkeypatch.setitem(executor.STEP_KINDS, "image", _Sleepy)
    _Sleepy.log = []
    o = Opened(basic)
    try:
        out = executor.execute(o.ctx("bundle"), _sleepy_specs(3), jobs=3)
    finally:
        o.close()
    assert [x.id for x in out] == ["image:s0", "image:s1", "image:s2"]  # plan order
    assert {x.status for x in out} == {RAN}
    spans = sorted((s, e) for _, s, e, _ in _Sleepy.log)
    assert spans[1][0] < spans[0][1] and spans[2][0] < spans[0][1]  # overlapped
    assert len({t for *_, t in _Sleepy.log}) == 3
    o = Opened(basic)
    try:  # recorded: a second run finds them up to date
        again = executor.execute(o.ctx("bundle"), _sleepy_specs(3), jobs=3)
    finally:
        o.close()
    assert {x.status for x in again} == {UP_TO_DATE}


def test_jobs_failure_is_raised_in_plan_order_and_others_recorded(basic, monkeypatch):
    from mlbuild.graph import executor

    monkeypatch.setitem(executor.STEP_KINDS, "image", _Sleepy)
    o = Opened(basic)
    try:
        with pytest.raises(StepFailed) as ei:
            executor.execute(o.ctx("bundle"), _sleepy_specs(3, fail=1), jobs=3)
        statuses_ = {x.id: x.status for x in ei.value.outcomes}
        assert statuses_ == {"image:s0": RAN, "image:s1": FAILED, "image:s2": NOT_RUN}
    finally:
        o.close()
