"""Outside the package folders, too, mlbuild overwrites and deletes only what it wrote
(issue 16, point 7): ``clean --packages``, a kubernetes target's ``out`` and the
image tars of ``deploy --image-tar`` keep the user's files.

The kubernetes and image-tar steps are run in-process here, with their upstream
outputs given (a pinned image, a fake engine's ``docker save``): their file handling
needs no cluster, no registry and no Docker. tests/integration/test_kubernetes_target.py
runs the same through the CLI.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from clitools import CLI

from mlbuild import api
from mlbuild.errors import StepFailed
from mlbuild.graph.step import StepSpec
from mlbuild.graph.steps.image import ImageTarStep
from mlbuild.graph.steps.kube import KubeStep
from mlbuild.state.db import StepRecord
from mlbuild.written import RECORD

KUBE = "  kube: {type: kubernetes, namespace: ml, apply: false, out: dist/k8s}\n"
SECOND = """
  second:
    entry_script: src/score.py
    source_dir: src
    environment: sklearn
    models: [ridge]
    auth: none

targets:"""
DIGEST = "sha256:" + "0" * 64


def add_kube_target(project: Path, second: bool = False) -> None:
    m = project / "mlproject.yaml"
    text = m.read_text().replace("targets:\n", "targets:\n" + KUBE)
    text = text.replace("name: diabetes\n", "name: diabetes\nregistry: 127.0.0.1:5000/t\n")
    if second:
        text = text.replace("\ntargets:", SECOND)
    m.write_text(text)


def remove_second(project: Path) -> None:
    m = project / "mlproject.yaml"
    m.write_text(m.read_text().replace(SECOND, "\ntargets:"))


def render_kube(project: Path, record: bool = False) -> list[str]:
    """Run the k8s steps of target ``kube`` (apply: false) as a deploy would; with
    ``record``, record them in the state as the executor does. Returns the log."""
    log: list[str] = []
    with api.session(project, lock=True) as s:
        t = s.project.target("kube")
        ctx = s.context(t, {}, log=log.append)
        for svc in s.project.services_for(t):
            step = KubeStep(StepSpec(f"k8s:kube/{svc.name}", "k8s",
                                     {"service": svc.name, "target": "kube"},
                                     [f"push:{svc.name}"]))
            push = {"tag": f"127.0.0.1:5000/t/diabetes-{svc.name}:abc", "digest": DIGEST}
            outputs = step.run(ctx, {f"push:{svc.name}": push}, DIGEST)
            if record:
                s.db.record_step(StepRecord(step.id, "k8s", DIGEST, "", {}, outputs, 0, 0))
    return log


def listing(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


# -- clean --packages -----------------------------------------------------------------

def test_clean_packages_keeps_the_users_files_and_says_so(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    out = diabetes / "dist/package"
    (out / "diabetes/notes.txt").write_text("mine")
    (out / "diabetes/data").mkdir()
    (out / "diabetes/data/mine.csv").write_text("a,b\n")
    (out / "diabetes.image.tar").write_text("my own tar")  # never written by mlbuild
    doc = cli.json("clean", "--packages")
    assert (out / "diabetes/notes.txt").read_text() == "mine"
    assert (out / "diabetes/data/mine.csv").read_text() == "a,b\n"
    assert (out / "diabetes.image.tar").read_text() == "my own tar"
    # mlbuild's files went, and nothing else.
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir())
    assert left == ["diabetes.image.tar", "diabetes/data/mine.csv", "diabetes/notes.txt"]
    # The result says what was kept, and why.
    assert "dist/package/diabetes" in doc["removed"]
    assert {k["path"] for k in doc["kept"]} == {
        "dist/package/diabetes/notes.txt", "dist/package/diabetes/data/mine.csv",
        "dist/package/diabetes.image.tar"}, doc
    assert all(k["why"] for k in doc["kept"])


def test_clean_packages_removes_recorded_image_tars(cli: CLI, diabetes: Path):
    cli("deploy", "bundle")
    out = diabetes / "dist/package"
    (out / "diabetes.image.tar").write_text("tar")
    (out / RECORD).write_text(json.dumps({"format": 1, "files": {"diabetes.image.tar": None}}))
    (out / "diabetes/notes.txt").write_text("mine")
    r = cli("clean", "--packages")
    assert "dist/package/diabetes, dist/package/diabetes.image.tar" in r.stdout, r.stdout
    assert "kept dist/package/diabetes/notes.txt: not written by mlbuild" in r.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "diabetes", "diabetes/notes.txt"]


# -- kubernetes out -------------------------------------------------------------------

def test_kube_refuses_to_overwrite_the_users_kustomization(diabetes: Path):
    add_kube_target(diabetes)
    out = diabetes / "dist/k8s"
    out.mkdir(parents=True)
    (out / "kustomization.yaml").write_text("resources: [mine.yaml]\n")
    (out / "mine.yaml").write_text("kind: ConfigMap\n")
    with pytest.raises(StepFailed) as e:
        render_kube(diabetes)
    assert "dist/k8s/kustomization.yaml was not written by mlbuild" in e.value.message
    assert "nothing was changed" in e.value.message and "move it" in e.value.hint
    assert listing(out) == {"kustomization.yaml": "resources: [mine.yaml]\n",
                            "mine.yaml": "kind: ConfigMap\n"}  # nothing written either
    # Moved away: the deploy writes its files and leaves the user's other file.
    (out / "kustomization.yaml").rename(diabetes / "kustomization.yaml")
    render_kube(diabetes)
    files = listing(out)
    assert files["mine.yaml"] == "kind: ConfigMap\n"
    assert {"kustomization.yaml", "diabetes-deployment.yaml", RECORD} <= set(files)
    record = json.loads(files[RECORD])["files"]
    assert "mine.yaml" not in record and "kustomization.yaml" in record


def test_kube_rewrites_only_its_own_files_and_removes_stale_ones(diabetes: Path):
    add_kube_target(diabetes, second=True)
    render_kube(diabetes)
    out = diabetes / "dist/k8s"
    assert (out / "second-deployment.yaml").is_file()
    (out / "notes.md").write_text("mine")
    (out / "second-extra.yaml").write_text("mine too")  # named like mlbuild's, not recorded
    (out / "diabetes-service.yaml").write_text("edited")  # recorded: an output, rewritten
    remove_second(diabetes)
    log = render_kube(diabetes)
    files = listing(out)
    assert not (out / "second-deployment.yaml").exists()  # recorded, no longer rendered
    assert not (out / "second-service.yaml").exists()
    assert files["notes.md"] == "mine" and files["second-extra.yaml"] == "mine too"
    assert files["diabetes-service.yaml"] != "edited"
    assert "second" not in files["kustomization.yaml"]
    assert any("removed" in line and "second-deployment.yaml" in line for line in log), log
    assert sorted(json.loads(files[RECORD])["files"]) == sorted(
        n for n in files if n.startswith("diabetes-") or n == "kustomization.yaml")


def test_kube_stale_file_left_by_a_removed_service_makes_the_step_run(diabetes: Path):
    add_kube_target(diabetes, second=True)
    render_kube(diabetes, record=True)
    remove_second(diabetes)
    with api.session(diabetes) as s:
        ctx = s.context(s.project.target("kube"))
        step = KubeStep(StepSpec("k8s:kube/diabetes", "k8s",
                                 {"service": "diabetes", "target": "kube"}, ["push:diabetes"]))
        why = step.check_outputs(ctx, s.db.get_step(step.id).outputs)
    assert why is not None and "dist/k8s/second-" in why and "earlier render" in why


def test_kube_unreadable_record_changes_nothing(diabetes: Path):
    add_kube_target(diabetes)
    render_kube(diabetes)
    out = diabetes / "dist/k8s"
    (out / RECORD).write_text(json.dumps({"format": 1, "files": {"../../src/score.py": None}}))
    before = listing(out)
    with pytest.raises(StepFailed) as e:
        render_kube(diabetes)
    assert f"dist/k8s/{RECORD} lists '../../src/score.py'" in e.value.message
    assert listing(out) == before and (diabetes / "src/score.py").is_file()
    # Deleting the record is safe: each file the deploy would overwrite is named.
    (out / RECORD).unlink()
    with pytest.raises(StepFailed) as e:
        render_kube(diabetes)
    assert "was not written by mlbuild" in e.value.message and "(and 2 more)" in e.value.message


def test_kube_files_an_older_mlbuild_wrote_are_its_own(diabetes: Path):
    # Before the record, the steps' state held the files' digests: a file with exactly
    # that content is mlbuild's; one the user changed since is not.
    add_kube_target(diabetes)
    render_kube(diabetes, record=True)
    out = diabetes / "dist/k8s"
    (out / RECORD).unlink()
    render_kube(diabetes, record=True)
    assert (out / RECORD).is_file()
    (out / RECORD).unlink()
    (out / "kustomization.yaml").write_text("resources: [mine.yaml]\n")
    with pytest.raises(StepFailed) as e:
        render_kube(diabetes)
    assert "dist/k8s/kustomization.yaml was not written by mlbuild" in e.value.message
    assert (out / "kustomization.yaml").read_text() == "resources: [mine.yaml]\n"


def test_kube_out_that_is_a_file_is_an_error(diabetes: Path):
    add_kube_target(diabetes)
    (diabetes / "dist").mkdir()
    (diabetes / "dist/k8s").write_text("mine")
    with pytest.raises(StepFailed) as e:
        render_kube(diabetes)
    assert "dist/k8s is not a folder" in e.value.message
    assert (diabetes / "dist/k8s").read_text() == "mine"


# -- deploy --image-tar ---------------------------------------------------------------

def docker_save_tar(tag: str) -> bytes:
    """A tar shaped like ``docker save`` output (its manifest.json)."""
    data = json.dumps([{"Config": "c.json", "RepoTags": [tag], "Layers": []}]).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FakeEngine:
    def __init__(self):
        self.saved: list[str] = []

    def save_image(self, tag: str, path) -> int:
        self.saved.append(tag)
        Path(path).write_bytes(docker_save_tar(tag))
        return Path(path).stat().st_size


def save_tar(project: Path, tag: str, engine: FakeEngine, record: bool = False) -> dict:
    with api.session(project, lock=True) as s:
        ctx = s.context(s.project.target("bundle"), {"_docker": engine})
        step = ImageTarStep(StepSpec("imagetar:bundle/diabetes", "imagetar",
                                     {"service": "diabetes", "target": "bundle"},
                                     ["image:diabetes"]))
        outputs = step.run(ctx, {"image:diabetes": {"tag": tag}}, DIGEST)
        if record:
            s.db.record_step(StepRecord(step.id, "imagetar", DIGEST, "", {}, outputs, 0, 0))
        return outputs


def test_image_tar_never_overwrites_the_users_file(diabetes: Path):
    out = diabetes / "dist/package"
    out.mkdir(parents=True)
    (out / "diabetes.image.tar").write_text("my own tar")
    engine = FakeEngine()
    with pytest.raises(StepFailed) as e:
        save_tar(diabetes, "diabetes-diabetes:1", engine)
    assert "dist/package/diabetes.image.tar was not written by mlbuild" in e.value.message
    assert (out / "diabetes.image.tar").read_text() == "my own tar"
    assert engine.saved == [] and sorted(p.name for p in out.iterdir()) == ["diabetes.image.tar"]
    # Its own tar, recorded, is overwritten by the next save.
    (out / "diabetes.image.tar").unlink()
    save_tar(diabetes, "diabetes-diabetes:1", engine)
    save_tar(diabetes, "diabetes-diabetes:2", engine)
    assert json.loads((out / RECORD).read_text())["files"]["diabetes.image.tar"].startswith(
        "sha256:")
    assert b"diabetes-diabetes:2" in (out / "diabetes.image.tar").read_bytes()


def test_image_tar_an_older_mlbuild_wrote_is_its_own(diabetes: Path):
    engine = FakeEngine()
    out = diabetes / "dist/package"
    save_tar(diabetes, "diabetes-diabetes:1", engine, record=True)
    (out / RECORD).unlink()  # as written before the record existed
    save_tar(diabetes, "diabetes-diabetes:2", engine, record=True)
    assert (out / RECORD).is_file()
    # A file of the same size that is not that tar (the user's) is not taken.
    (out / RECORD).unlink()
    size = (out / "diabetes.image.tar").stat().st_size
    (out / "diabetes.image.tar").write_bytes(b"x" * size)
    with pytest.raises(StepFailed):
        save_tar(diabetes, "diabetes-diabetes:3", engine)
    assert (out / "diabetes.image.tar").read_bytes() == b"x" * size
