"""mlbuild/envlayers.py: the base layer is sticky, the delta holds what the lock changed,
and the base is made in full again when that is cheaper or required; slim.py's
--move-scripts keeps RECORD true so the delta can uninstall a package's scripts."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from mlbuild import envlayers
from mlbuild.envlayers import lock_entries, split


def entry(name: str, version: str, h: str = "a") -> str:
    return f"{name}=={version} \\\n    --hash=sha256:{h * 64}\n"


def lock(*entries: str) -> str:
    return "".join(entries)


A, B, C = entry("alpha", "1.0"), entry("Beta_Pkg", "2.0"), entry("gamma", "3.0")


def test_entries_by_normalized_name_with_their_hash_lines():
    text = "# a comment\n" + A + "\n" + B + C + "--index-url https://x\n"
    got = lock_entries(text)
    assert list(got) == ["alpha", "beta-pkg", "gamma"]
    assert got["beta-pkg"] == B


def test_first_build_and_offline_and_changed_key_install_the_whole_lock():
    full = lock(A, B, C)
    assert split(full, "k", None, None) == envlayers.Layers(full, "", (), "first build")
    assert split(full, "k", lock(A), "k", offline=True).folded == "offline"
    got = split(full, "k2", lock(A), "k")
    assert got.base == full and not got.has_delta and "other inputs" in got.folded


def test_added_changed_and_removed_go_to_the_delta():
    base = lock(A, B, C)
    new_b = entry("beta-pkg", "2.1", "b")
    d = entry("delta", "0.1")
    got = split(lock(A, new_b, d), "k", base, "k")
    assert got.base == base  # as it was: its layer stays cached
    assert got.delta == new_b + d
    assert got.remove == ("beta-pkg", "gamma")
    assert got.folded == ""


def test_a_hash_change_alone_is_a_change():
    base = lock(A, B)
    got = split(lock(entry("alpha", "1.0", "c"), B), "k", base, "k")
    assert got.delta == entry("alpha", "1.0", "c") and got.remove == ("alpha",)


def test_the_lock_back_as_the_base_was_has_no_delta():
    base = lock(A, B, C)
    got = split(lock(C, A, B), "k", base, "k")
    assert got.base == base and not got.has_delta


def test_a_large_delta_is_folded_into_the_base():
    names = [f"p{i:02d}" for i in range(40)]
    base = lock(*(entry(n, "1") for n in names))
    limit = max(envlayers.MIN_DELTA, int(envlayers.FRACTION * 40))  # 10
    small = lock(*(entry(n, "2" if i < limit else "1") for i, n in enumerate(names)))
    # limit changed entries = limit in the delta + limit removed from the base > limit
    half = limit // 2
    ok = lock(*(entry(n, "2" if i < half else "1") for i, n in enumerate(names)))
    assert split(ok, "k", base, "k").has_delta
    got = split(small, "k", base, "k")
    assert not got.has_delta and got.base == small and "more than" in got.folded


def test_move_scripts_moves_them_and_rewrites_record(tmp_path: Path):
    root = tmp_path / "root"
    site, scripts = "/usr/local/lib/python3.11/site-packages", "/usr/local/bin"
    sp = Path(str(root) + site)
    (sp / "bin").mkdir(parents=True)
    (sp / "bin/tool").write_text("#!/usr/bin/python\n")
    (sp / "pkg").mkdir()
    (sp / "pkg/__init__.py").write_text("")
    info = sp / "pkg-1.0.dist-info"
    info.mkdir()
    with open(info / "RECORD", "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(
            [["pkg/__init__.py", "sha256=x", "0"], ["bin/tool", "sha256=y", "18"],
             ["pkg-1.0.dist-info/RECORD", "", ""]])
    slim = Path(__file__).parents[2] / "mlbuild/slim.py"
    r = subprocess.run([sys.executable, str(slim), "--move-scripts", str(root), site, scripts],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (sp / "bin").exists()
    assert (Path(str(root) + scripts) / "tool").read_text().startswith("#!")
    rows = list(csv.reader(open(info / "RECORD", newline="")))
    assert rows[1][0] == "../../../bin/tool"
    # The path in RECORD, taken from the site folder, is where the script now is.
    assert os.path.normpath(os.path.join(site, rows[1][0])) == scripts + "/tool"
    assert rows[0] == ["pkg/__init__.py", "sha256=x", "0"]
