"""mlbuild.backends.docker against the real engine and the registry on 127.0.0.1:5000.

Every test is bounded: builds use a tiny context, waits poll with a deadline.
"""

from __future__ import annotations

import json
import socket
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from mlbuild.backends.docker import (
    BuildEvent,
    EngineUnavailable,
    Unschedulable,
    connect,
)
from mlbuild.errors import StepFailed

pytestmark = pytest.mark.docker

TEST_LABEL = "dev.mlbuild.test"

# pip installs from PyPI through the TLS proxy: proves the stand-in's CA settings
# work inside `docker build`. six is small and pure Python.
TINY_DOCKERFILE = """\
FROM {base}
RUN python -m pip install --no-cache-dir --disable-pip-version-check six==1.16.0
COPY hello.txt /srv/hello.txt
RUN python -c "import six; print('six', six.__version__)" && cat /srv/hello.txt
"""


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_context(root: Path, dockerfile: str, **files: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def tiny(engine, base_image, run_id, tmp_path_factory):
    """A tiny image built cold (no cache), and what the build reported."""
    ctx = make_context(tmp_path_factory.mktemp("tiny"), TINY_DOCKERFILE.format(base=base_image),
                       **{"hello.txt": "hello v1\n"})
    events: list[BuildEvent] = []
    log = ctx.parent / "logs" / "tiny.log"
    tag = f"mlbuild-it/tiny:{run_id}"
    result = engine.build(ctx, tag, labels={TEST_LABEL: run_id}, log_path=log,
                          progress_cb=events.append, nocache=True)
    return {"ctx": ctx, "tag": tag, "result": result, "events": events, "log": log}


# -- build ----------------------------------------------------------------------------


def test_cold_build_runs_every_step_and_logs(tiny, engine, run_id):
    r = tiny["result"]
    # FROM + RUN pip + COPY + RUN + the LABEL step the builder adds for labels
    assert (r.steps, r.built, r.cached) == (5, 4, 0)
    assert r.image_id.startswith("sha256:")
    info = engine.image_info(tiny["tag"])
    assert info is not None and info.id == r.image_id
    assert info.labels[TEST_LABEL] == run_id
    log = tiny["log"].read_text()
    assert "Successfully installed six-1.16.0" in log
    assert "six 1.16.0" in log and "hello v1" in log
    done = [(e.step, e.status) for e in tiny["events"] if e.status != "running"]
    assert done == [(2, "done"), (3, "done"), (4, "done"), (5, "done")]
    assert all(e.total == 5 for e in tiny["events"])


def test_rebuild_is_all_cached_then_one_edit_rebuilds_from_there(tiny, engine, run_id):
    events: list[BuildEvent] = []
    again = engine.build(tiny["ctx"], tiny["tag"], labels={TEST_LABEL: run_id}, progress_cb=events.append)
    assert (again.steps, again.built, again.cached) == (5, 0, 4)
    assert again.image_id == tiny["result"].image_id
    assert [e.status for e in events if e.status != "running"] == ["cached"] * 4
    assert again.seconds < 10

    (tiny["ctx"] / "hello.txt").write_text("hello v2\n")
    edited = engine.build(tiny["ctx"], f"mlbuild-it/tiny:{run_id}-v2", labels={TEST_LABEL: run_id})
    # the pip layer is reused; COPY and what follows it run again
    assert (edited.built, edited.cached) == (3, 1)
    assert edited.image_id != tiny["result"].image_id


def test_failing_step_is_named_with_its_output(engine, base_image, run_id, tmp_path):
    # NOTE: the failing RUN comes right after FROM: the classic builder keeps the layers
    # of steps that succeeded as cache, which would pile up as dangling images.
    ctx = make_context(tmp_path / "ctx", f"""\
FROM {base_image}
RUN echo about to fail && echo on-stderr >&2 && exit 3
RUN echo never
""")
    log = tmp_path / "fail.log"
    with pytest.raises(StepFailed) as ei:
        engine.build(ctx, f"mlbuild-it/fail:{run_id}", labels={TEST_LABEL: run_id},
                     log_path=log, step_id="image:demo")
    msg = str(ei.value)
    assert msg.startswith("step image:demo failed: Dockerfile step 2/4 `RUN echo about to fail")
    assert "non-zero code: 3" in msg
    assert "about to fail" in msg.split("last lines")[1] and "on-stderr" in msg
    assert "\x1b[" not in msg
    assert ei.value.hint == f"full log: {log}"
    assert "about to fail" in log.read_text()
    assert not engine.image_exists(f"mlbuild-it/fail:{run_id}")


def test_buildkit_reports_cache_hits_and_the_failed_step(engine, base_image, run_id, tmp_path):
    ctx = make_context(tmp_path / "ctx", f"""\
FROM {base_image}
RUN echo buildkit-step > /built.txt
COPY data.txt /data.txt
""", **{"data.txt": "data\n"})
    tag = f"mlbuild-it/bk:{run_id}"
    first = engine.build(ctx, tag, labels={TEST_LABEL: run_id}, builder="buildkit", nocache=True)
    assert (first.steps, first.built, first.cached) == (3, 2, 0)
    assert engine.image_info(tag).id == first.image_id
    events: list[BuildEvent] = []
    second = engine.build(ctx, tag, labels={TEST_LABEL: run_id}, builder="buildkit", progress_cb=events.append)
    assert (second.built, second.cached) == (0, 2)
    assert {(e.step, e.status) for e in events} >= {(2, "cached"), (3, "cached")}

    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo visible-output && false\n")
    with pytest.raises(StepFailed) as ei:
        engine.build(ctx, f"{tag}-fail", labels={TEST_LABEL: run_id}, builder="buildkit")
    assert "Dockerfile step 2/2 `RUN echo visible-output && false`" in str(ei.value)
    assert "visible-output" in str(ei.value).split("last lines")[1]


# -- registry -------------------------------------------------------------------------


def test_push_remove_pull(tiny, engine, docker_client, registry, run_id):
    tag = f"{registry}/mlbuild-it/tiny:{run_id}"
    docker_client.images.get(tiny["tag"]).tag(tag)
    assert engine.registry_has(tag) is False

    digest = engine.push(tag)
    assert digest.startswith("sha256:") and len(digest) == 71
    assert engine.registry_has(tag) is True
    assert engine.push(tag) == digest  # pushing again is a no-op with the same digest

    assert engine.remove_image(tag) is True
    assert not engine.image_exists(tag)
    assert engine.remove_image(tag) is False
    assert engine.registry_has(tag) is True  # still in the registry

    image_id = engine.pull(tag)
    assert image_id == tiny["result"].image_id
    assert engine.image_exists(tag)
    assert f"{registry}/mlbuild-it/tiny@{digest}" in engine.image_info(tag).repo_digests


def test_missing_tag_and_unreachable_registry(tiny, engine, registry, run_id):
    with pytest.raises(StepFailed, match="manifest unknown|not found"):
        engine.pull(f"{registry}/mlbuild-it/nothing:{run_id}", retries=3, backoff=5)  # final: no waiting

    dead = f"127.0.0.1:{free_port()}/mlbuild-it/tiny:{run_id}"
    engine.client.images.get(tiny["tag"]).tag(dead)
    try:
        started = time.monotonic()
        with pytest.raises(StepFailed) as ei:
            engine.push(dead, retries=2, backoff=0.05)
        assert "connection refused" in str(ei.value) and "after 3 attempts" in str(ei.value)
        assert ei.value.hint and "registry" in ei.value.hint
        assert time.monotonic() - started < 30
        with pytest.raises(StepFailed, match="connection refused"):
            engine.registry_has(dead, retries=0)
    finally:
        engine.remove_image(dead)
    with pytest.raises(StepFailed, match="no image"):
        engine.push(f"{registry}/mlbuild-it/never-built:{run_id}")


# -- containers -----------------------------------------------------------------------


def test_run_container_serves_on_a_published_port(engine, base_image, run_id):
    name = f"mlbuild-it-http-{run_id}"
    port = free_port()
    state = engine.run_container(
        name, base_image,
        command=["python3", "-m", "http.server", "8000"],
        ports={8000: port}, env={"GREETING": "hi"},
        labels={TEST_LABEL: run_id, "dev.mlbuild.fingerprint": "abc123"},
        cpus=0.5, memory="256m", restart="unless-stopped",
    )
    try:
        assert state.running and state.status == "running"
        assert state.ports == {"8000/tcp": [("127.0.0.1", port)]}

        def answers():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    return r.status == 200 and b"Directory listing" in r.read()
            except OSError:
                return False

        wait_for(answers, 20, f"http.server on 127.0.0.1:{port}")
        st = engine.container_state(name)
        assert st.running and st.exit_code is None and st.health is None
        assert st.labels["dev.mlbuild.fingerprint"] == "abc123"
        assert st.started_at is not None and st.finished_at is None
        assert st.image == base_image
        inspect = engine.api.inspect_container(name)
        assert inspect["HostConfig"]["NanoCpus"] == 500_000_000
        assert inspect["HostConfig"]["Memory"] == 256 * 1024 * 1024
        assert inspect["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        assert "GREETING=hi" in inspect["Config"]["Env"]
        assert name in engine.list_containers({TEST_LABEL: run_id})
        wait_for(lambda: '"GET / HTTP/1.1" 200' in engine.container_logs(name, tail=20), 10, "the access log")

        # the same port again: the container cannot be placed, and nothing is left behind
        with pytest.raises(Unschedulable, match="already allocated|in use"):
            engine.run_container(f"{name}-2", base_image, command=["sleep", "60"], ports={8000: port},
                                 labels={TEST_LABEL: run_id})
        assert engine.container_state(f"{name}-2") is None
        with pytest.raises(StepFailed, match="already exists"):
            engine.run_container(name, base_image, command=["sleep", "1"], labels={TEST_LABEL: run_id})
    finally:
        assert engine.remove_container(name, stop_timeout=1) is True
    assert engine.container_state(name) is None
    assert engine.remove_container(name) is False


def test_exited_container_reports_its_exit_code_and_logs(engine, base_image, run_id):
    name = f"mlbuild-it-exit-{run_id}"
    engine.run_container(name, base_image, labels={TEST_LABEL: run_id},
                         command=["python3", "-c", "print('init failed: no model'); raise SystemExit(7)"])
    try:
        st = wait_for(lambda: (s := engine.container_state(name)) and s.status == "exited" and s, 20,
                      "the container to exit")
        assert (st.running, st.exit_code) == (False, 7)
        assert st.finished_at is not None and st.finished_at >= st.started_at
        assert "init failed: no model" in engine.container_logs(name, tail=5)
    finally:
        engine.remove_container(name, stop_timeout=1)


TERM_SLOWLY = """
import signal, sys, time
def term(*_):
    print("term: finishing", flush=True)
    time.sleep(1.5)  # in-flight work
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print("up", flush=True)
while True:
    time.sleep(0.1)
"""


def test_retire_container_returns_at_once_and_it_exits_by_itself(engine, base_image, run_id):
    name, retired = f"mlbuild-it-retire-{run_id}", f"mlbuild-it-retire-{run_id}-old"
    engine.run_container(name, base_image, labels={TEST_LABEL: run_id}, restart="unless-stopped",
                         command=["python3", "-u", "-c", TERM_SLOWLY])
    try:
        wait_for(lambda: "up" in engine.container_logs(name, tail=5), 20, "the container to start")
        t = time.monotonic()
        engine.retire_container(name, retired)
        assert time.monotonic() - t < 1.0  # it did not wait for the 1.5 s shutdown
        assert engine.container_state(name) is None
        st = engine.container_state(retired)
        assert st is not None and st.running  # still finishing
        assert engine.api.inspect_container(retired)["HostConfig"]["RestartPolicy"]["Name"] == "no"
        st = wait_for(lambda: (s := engine.container_state(retired)) and s.status == "exited" and s,
                      20, "the retired container to exit")
        assert st.exit_code == 0 and st.restart_count == 0
        assert "term: finishing" in engine.container_logs(retired, tail=5)
        time.sleep(1)
        assert engine.container_state(retired).status == "exited"  # not restarted
        # A stopped container is only renamed.
        engine.retire_container(retired, name)
        assert engine.container_state(name).status == "exited"
    finally:
        engine.remove_container(name, stop_timeout=1)
        engine.remove_container(retired, stop_timeout=1)


def test_healthcheck_status(engine, base_image, run_id, tmp_path):
    ctx = make_context(tmp_path / "ctx", f"""\
FROM {base_image}
HEALTHCHECK --interval=1s --timeout=2s --retries=1 CMD ["python3", "-c", "print('probe ok')"]
CMD ["sleep", "120"]
""")
    tag = f"mlbuild-it/health:{run_id}"
    engine.build(ctx, tag, labels={TEST_LABEL: run_id})
    name = f"mlbuild-it-health-{run_id}"
    engine.run_container(name, tag, labels={TEST_LABEL: run_id})
    try:
        st = wait_for(lambda: (s := engine.container_state(name)) and s.health == "healthy" and s, 20,
                      "the container to become healthy")
        assert st.health_output == "probe ok"
    finally:
        engine.remove_container(name, stop_timeout=1)


def test_save_image_writes_a_complete_tar(tiny, engine, tmp_path):
    out = tmp_path / "dist" / "image.tar"
    size = engine.save_image(tiny["tag"], out)
    assert size == out.stat().st_size > 1_000_000
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == [tiny["tag"]]
    assert [p.name for p in out.parent.iterdir()] == ["image.tar"]  # no temporary left

    with pytest.raises(StepFailed, match="no image"):
        engine.save_image("mlbuild-it/absent:none", tmp_path / "absent.tar")
    assert not (tmp_path / "absent.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_connect_to_a_missing_engine_says_what_to_do(tmp_path):
    with pytest.raises(EngineUnavailable) as ei:
        connect(f"unix://{tmp_path}/no-such.sock", connect_timeout=2)
    assert "cannot reach the Docker engine" in str(ei.value)
    assert ei.value.hint and "DOCKER_HOST" in ei.value.hint
    assert ei.value.exit_code == 2
