"""services.NAME.batching: validated (the field named), turned into the runtime's
MLBUILD_BATCH_MAX_SIZE / MLBUILD_BATCH_MAX_LATENCY_MS, and carried to the targets."""

from __future__ import annotations

import textwrap

import pytest

from unittools import BASIC_MANIFEST, make_project, run, statuses
from mlbuild.errors import ManifestError
from mlbuild.graph.executor import RAN, UP_TO_DATE
from mlbuild.manifest import load_project
from mlbuild.manifest.model import Batching, Service
from mlbuild.runtime.config import DEFAULT_BATCH_MAX_LATENCY_MS, RuntimeConfig


def with_batching(value: str | None, manifest: str = BASIC_MANIFEST) -> str:
    text = textwrap.dedent(manifest)
    return text if value is None else text.replace(
        "    auth: key\n", f"    auth: key\n    batching: {value}\n", 1)


def problems(tmp_path, text: str) -> list[str]:
    root = make_project(tmp_path / "p", text)
    with pytest.raises(ManifestError) as e:
        load_project(root / "mlproject.yaml")
    return [str(p) for p in e.value.problems]


@pytest.mark.parametrize("value, field, says", [
    ("{max_batch_size: 0}", "max_batch_size", "must be at least 1, got 0"),
    ("{max_batch_size: 5000}", "max_batch_size", "must be at most 4096, got 5000"),
    ("{max_batch_size: 2.5}", "max_batch_size", "expected a whole number, got 2.5"),
    ("{max_batch_size: 8, max_latency_ms: -1}", "max_latency_ms", "must be at least 0, got -1"),
    ("{max_batch_size: 8, max_latency_ms: fast}", "max_latency_ms", "expected a number"),
    ("{max_latency_ms: 5}", None, "missing required key 'max_batch_size'"),
    ("{max_batch_size: 8, max_latency: 5}", None, "unknown key 'max_latency'"),
    ("true", None, "expected a mapping"),
])
def test_a_bad_setting_is_refused_naming_the_field(tmp_path, value, field, says):
    found = problems(tmp_path, with_batching(value))
    line = with_batching(value).splitlines().index(f"    batching: {value}") + 1
    where = "services.svc.batching" + (f".{field}" if field else "")
    assert any(p.startswith(f"mlproject.yaml:{line}: {where}: ") and says in p
               for p in found), found


def test_the_settings_become_the_runtimes_variables(tmp_path):
    root = make_project(tmp_path / "p", with_batching("{max_batch_size: 32, max_latency_ms: 2.5}"))
    svc = load_project(root / "mlproject.yaml").services["svc"]
    assert svc.batching == Batching(max_batch_size=32, max_latency_ms=2.5)
    env = svc.runtime_env()
    assert env == {"MLBUILD_BATCH_MAX_SIZE": "32", "MLBUILD_BATCH_MAX_LATENCY_MS": "2.5"}
    config = RuntimeConfig.from_env({**env, "MLBUILD_AUTH_KEYS": "k"})
    assert (config.batch_max_size, config.batch_max_latency_ms) == (32, 2.5)
    assert svc.config()["batching"] == {"max_batch_size": 32, "max_latency_ms": 2.5}


def test_the_window_defaults_to_the_runtimes(tmp_path):
    root = make_project(tmp_path / "p", with_batching("{max_batch_size: 8}"))
    svc = load_project(root / "mlproject.yaml").services["svc"]
    assert svc.runtime_env() == {"MLBUILD_BATCH_MAX_SIZE": "8"}
    config = RuntimeConfig.from_env({**svc.runtime_env(), "MLBUILD_AUTH_KEYS": "k"})
    assert config.batch_max_latency_ms == DEFAULT_BATCH_MAX_LATENCY_MS


def test_unset_is_no_batching_and_leaves_old_fingerprints_alone(tmp_path):
    root = make_project(tmp_path / "p", with_batching(None))
    svc = load_project(root / "mlproject.yaml").services["svc"]
    assert svc.batching is None and svc.runtime_env() == {}
    assert "batching" not in svc.config()
    assert RuntimeConfig.from_env({"MLBUILD_AUTH_KEYS": "k"}).batch_max_size is None
    assert Service(name="s", environment="e").batching is None


def test_a_window_as_long_as_a_targets_scoring_timeout_is_refused(tmp_path):
    # The kubernetes target's scoring_timeout_ms defaults to 60000; a process target's
    # is set here. A request alone would wait out the window and then time out.
    text = with_batching("{max_batch_size: 8, max_latency_ms: 500}").replace(
        "dev: {type: process, port: 8890}",
        "dev: {type: process, port: 8890, scoring_timeout_ms: 500}")
    found = problems(tmp_path, text)
    assert any("services.svc.batching.max_latency_ms: a window of 500 ms is not shorter "
               "than the scoring_timeout_ms of target 'dev' (500)" in p for p in found), found
    # A target that does not run the service does not count.
    ok = with_batching("{max_batch_size: 8, max_latency_ms: 500}").replace(
        "dev: {type: process, port: 8890}",
        "dev: {type: process, port: 8890, scoring_timeout_ms: 500, services: []}")
    root = make_project(tmp_path / "q", ok)
    assert load_project(root / "mlproject.yaml").services["svc"].batching.max_latency_ms == 500


@pytest.mark.parametrize("value, env", [
    ({"MLBUILD_BATCH_MAX_SIZE": "0"}, "give 1 or more"),
    ({"MLBUILD_BATCH_MAX_SIZE": "many"}, "expected a number"),
    ({"MLBUILD_BATCH_MAX_SIZE": "4", "MLBUILD_BATCH_MAX_LATENCY_MS": "-3"}, "give 0 or more"),
])
def test_the_runtime_refuses_a_malformed_variable(value, env):
    with pytest.raises(ValueError, match=env):
        RuntimeConfig.from_env(value)


def test_the_process_target_starts_with_it_and_a_change_reruns_the_context(tmp_path):
    root = make_project(tmp_path / "p", with_batching("{max_batch_size: 16, max_latency_ms: 4}"))
    ctx = next(x for x in run(root, "bundle") if x.id == "context:svc")
    # The process step starts the runtime with the context step's "env" (paths mapped).
    assert ctx.outputs["env"]["MLBUILD_BATCH_MAX_SIZE"] == "16"
    assert ctx.outputs["env"]["MLBUILD_BATCH_MAX_LATENCY_MS"] == "4"
    (root / "mlproject.yaml").write_text(with_batching("{max_batch_size: 16, max_latency_ms: 6}"))
    assert statuses(run(root, "bundle"))["context:svc"] == RAN
    assert set(statuses(run(root, "bundle")).values()) == {UP_TO_DATE}


def test_the_image_declares_it(tmp_path):
    # The docker, kubernetes and package targets get the batching variables from the image.
    root = make_project(tmp_path / "p", with_batching("{max_batch_size: 16, max_latency_ms: 4}"))
    run(root, "bundle")
    dockerfile = (root / "dist/package/svc/Dockerfile").read_text()
    assert "MLBUILD_BATCH_MAX_SIZE=16" in dockerfile
    assert "MLBUILD_BATCH_MAX_LATENCY_MS=4" in dockerfile
