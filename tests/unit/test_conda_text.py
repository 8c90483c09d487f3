"""The conda lock reduced to what an image installs (mlbuild.backends.conda.install_text)."""

from __future__ import annotations

import yaml

from mlbuild.backends import conda


def _lock(tmp_path, versions: dict[str, str], content_hash: str = "a"):
    packages = [{"name": "numpy", "version": v, "manager": "conda", "platform": platform,
                 "dependencies": {}, "url": f"https://conda.example/{platform}/numpy-{v}-0.conda",
                 "hash": {"sha256": f"{platform}{v}".encode().hex().ljust(64, "0")},
                 "category": "main", "optional": False}
                for platform, v in versions.items()]
    path = tmp_path / "conda-lock.yml"
    path.write_text("# mlbuild lock: spec x; platforms linux-64,osx-arm64\n" + yaml.safe_dump({
        "version": 1, "metadata": {"channels": [{"url": "conda-forge", "used_env_vars": []}],
                                   "platforms": list(versions), "sources": ["environment.yml"],
                                   "content_hash": {p: content_hash for p in versions}},
        "package": packages}))
    return path


def test_only_the_images_platform_counts(tmp_path):
    lock = _lock(tmp_path, {"linux-64": "2.0", "osx-arm64": "2.0"})
    linux = conda.install_text(lock, "linux-64")
    assert [p["platform"] for p in yaml.safe_load(linux)["package"]] == ["linux-64"]
    assert yaml.safe_load(linux)["metadata"]["platforms"] == ["linux-64"]
    assert len(yaml.safe_load(conda.install_text(lock))["package"]) == 2

    # Another platform moved and the spec's hash changed: the image's file is the same.
    lock = _lock(tmp_path, {"linux-64": "2.0", "osx-arm64": "2.1"}, content_hash="b")
    assert conda.install_text(lock, "linux-64") == linux
    lock = _lock(tmp_path, {"linux-64": "2.1", "osx-arm64": "2.1"}, content_hash="b")
    assert conda.install_text(lock, "linux-64") != linux
