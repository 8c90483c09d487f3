"""mlbuild models register|list|show|download|delete|tag."""

from __future__ import annotations

from pathlib import Path

from clitools import CLI


def test_registry_lifecycle(tmp_path: Path):
    cli = CLI(tmp_path)  # no manifest needed: the registry lives in ./.mlbuild
    (tmp_path / "m.bin").write_bytes(b"weights-1")
    folder = tmp_path / "outputs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")

    r = cli.json("models", "register", "m.bin", "--name", "m", "-t", "stage=dev",
                 "-p", "auc=0.9", "--framework", "scikit-learn", "--framework-version", "1.5",
                 "-d", "first")
    assert (r["created"], r["version"]) == (True, 1)
    r = cli("models", "register", "m.bin", "--name", "m")
    assert "no new version" in r.stdout
    (tmp_path / "m.bin").write_bytes(b"weights-2")
    assert cli.json("models", "register", "m.bin", "--name", "m")["version"] == 2

    r = cli.json("models", "register", "outputs", "--name", "folder")
    assert sorted(f["path"] for f in r["files"]) == ["outputs/a.txt", "outputs/sub/b.txt"]

    assert [(v["name"], v["version"]) for v in cli.json("models", "list")] == [
        ("folder", 1), ("m", 1), ("m", 2)]
    shown = cli.json("models", "show", "m@1")
    assert shown["tags"] == {"stage": "dev"} and shown["properties"] == {"auc": "0.9"}
    assert cli.json("models", "show", "m")["version"] == 2

    cli("models", "download", "m@1", "-o", "out1")
    assert (tmp_path / "out1/m.bin").read_bytes() == b"weights-1"
    cli("models", "download", "folder", "-o", "out2")
    assert (tmp_path / "out2/outputs/sub/b.txt").read_text() == "b"
    # downloaded files are copies: editing them cannot corrupt the registry
    (tmp_path / "out1/m.bin").write_bytes(b"edited")
    cli("models", "download", "m@1", "-o", "out3")
    assert (tmp_path / "out3/m.bin").read_bytes() == b"weights-1"

    t = cli.json("models", "tag", "m@1", "stage=prod", "owner=me")
    assert t["tags"] == {"stage": "prod", "owner": "me"}
    t = cli.json("models", "tag", "m@1", "--remove", "owner")
    assert t["tags"] == {"stage": "prod"}

    cli("models", "delete", "m@1")
    assert [v["version"] for v in cli.json("models", "list", "m")] == [2]
    cli("models", "delete", "folder", "--yes")
    assert [v["name"] for v in cli.json("models", "list")] == ["m"]
    blobs = list((tmp_path / ".mlbuild/blobs").rglob("*"))
    assert len([b for b in blobs if b.is_file()]) == 1  # only m@2's blob is left


def test_registry_errors(tmp_path: Path):
    cli = CLI(tmp_path)
    (tmp_path / "m.bin").write_bytes(b"x")
    cli("models", "register", "m.bin", "--name", "ridge")
    r = cli("models", "show", "ridg", check=3)
    assert "did you mean 'ridge'" in r.stderr
    r = cli("models", "show", "ridge@7", check=3)
    assert "no version 7" in r.stderr
    r = cli("models", "show", "ridge@x", check=3)
    assert "positive whole number" in r.stderr
    r = cli("models", "register", "nope.bin", "--name", "ridge", check=3)
    assert "no such file" in r.stderr
    r = cli("models", "tag", "ridge", "novalue", check=3)
    assert "KEY=VALUE" in r.stderr


def test_registered_content_survives_in_place_rewrite(tmp_path: Path):
    """Training code often rewrites a model file in place; the registered version
    must keep its content."""
    cli = CLI(tmp_path)
    f = tmp_path / "m.bin"
    f.write_bytes(b"version-one")
    cli("models", "register", "m.bin", "--name", "m")
    with open(f, "r+b") as fh:  # same inode, new content
        fh.write(b"VERSION-TWO")
    cli("models", "download", "m@1", "-o", "out")
    assert (tmp_path / "out/m.bin").read_bytes() == b"version-one"


def test_init_scaffolds_a_project_that_deploys(tmp_path: Path):
    proj = tmp_path / "my-proj"
    proj.mkdir()
    cli = CLI(proj)
    cli("init")
    assert (proj / "mlproject.yaml").exists()
    cli("validate")
    cli("deploy", "bundle")
    assert (proj / "dist/package/my-proj/Dockerfile").exists()
    r = cli("init", check=3)
    assert "already exists" in r.stderr


def test_register_refuses_a_link_that_leaves_the_folder(tmp_path: Path):
    cli = CLI(tmp_path / "proj")
    (tmp_path / "proj").mkdir()
    (tmp_path / "secret.txt").write_text("not a model")
    folder = tmp_path / "proj" / "outputs"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w")
    (folder / "inside.bin").symlink_to(folder / "weights.bin")  # stays inside: fine
    (folder / "leak.txt").symlink_to(tmp_path / "secret.txt")
    r = cli("models", "register", "outputs", "--name", "m", check=3)
    assert f"leak.txt is a link to {tmp_path / 'secret.txt'}, outside the folder" in r.stderr
    assert "Traceback" not in r.stderr
    assert cli.json("models", "list") == []
    (folder / "leak.txt").unlink()
    assert cli.json("models", "register", "outputs", "--name", "m")["version"] == 1
