"""mlbuild/slim.py on real files: ELF objects built here with gcc and numpy's own
(auditwheel/patchelf) shared objects, checked with binutils' readelf and by loading
them; pruning and linking on a made-up site-packages."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlbuild import slim

SLIM = Path(slim.__file__)

LIB_C = r"""
#include <math.h>
static double table[4096];
double answer(double x) { for (int i = 0; i < 4096; i++) table[i] = i * x; return sqrt(table[4095]) + 42.0 - sqrt(4095.0 * x); }
"""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (binutils/gcc): these checks compare with it")
    return path


def readelf_sections(path: Path) -> tuple[list[str], str]:
    """Section names and readelf's warnings (stderr) for ``path``."""
    r = subprocess.run([need("readelf"), "-a", "-W", str(path)], capture_output=True, text=True)
    names = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("[") and "]" in line:
            rest = line.split("]", 1)[1].split()
            if rest and rest[0].startswith("."):
                names.append(rest[0])
    return names, r.stderr


@pytest.fixture
def debug_lib(tmp_path) -> Path:
    src = tmp_path / "lib.c"
    src.write_text(LIB_C)
    out = tmp_path / "libanswer.so"
    subprocess.run([need("gcc"), "-g", "-O1", "-shared", "-fPIC", "-o", str(out), str(src), "-lm"],
                   check=True)
    return out


def call_answer(lib: Path) -> float:
    # In a child: a library stays mapped in the process that loaded it.
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).answer; "
            "f.restype = ctypes.c_double; f.argtypes = [ctypes.c_double]; print(f(2.0))")
    r = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return float(r.stdout)


def test_strip_drops_debug_sections_and_the_library_still_works(debug_lib, tmp_path):
    before_names, _ = readelf_sections(debug_lib)
    assert ".debug_info" in before_names and ".symtab" in before_names
    ref = tmp_path / "ref.so"
    subprocess.run([need("strip"), "--strip-unneeded", "-o", str(ref), str(debug_lib)], check=True)
    size = debug_lib.stat().st_size
    mode = debug_lib.stat().st_mode

    saved = slim.strip_elf(str(debug_lib))

    assert saved == size - debug_lib.stat().st_size > 0
    names, warnings = readelf_sections(debug_lib)
    assert warnings == ""
    assert not [n for n in names if n.startswith(".debug") or n in (".symtab", ".strtab")]
    assert ".dynsym" in names and ".text" in names
    # Within a page of what binutils' strip gets.
    assert debug_lib.stat().st_size <= ref.stat().st_size + 4096
    assert debug_lib.stat().st_mode == mode
    assert call_answer(debug_lib) == pytest.approx(42.0)
    # Nothing left to drop: untouched the second time.
    data = debug_lib.read_bytes()
    assert slim.strip_elf(str(debug_lib)) == 0 and debug_lib.read_bytes() == data


def test_strip_keeps_section_indices(debug_lib):
    """Dropped sections stay in the table as empty entries, so no section's index (which
    .dynsym's st_shndx name) moves."""
    def table(path):
        r = subprocess.run([need("readelf"), "-S", "-W", str(path)], capture_output=True,
                           text=True, check=True)
        rows = {}
        for line in r.stdout.splitlines():
            line = line.strip()
            if line.startswith("[") and "]" in line:
                idx, rest = line[1:].split("]", 1)
                if idx.strip().isdigit() and rest.split():
                    rows[int(idx)] = rest.split()[0]
        return rows

    before = table(debug_lib)
    slim.strip_elf(str(debug_lib))
    after = table(debug_lib)
    assert len(before) == len(after)
    for i, n in before.items():
        if not (n.startswith(".debug") or n in (".symtab", ".strtab", ".comment")):
            assert after[i] == n


def test_strip_leaves_unusual_files_alone(debug_lib, tmp_path):
    # Data appended after the sections (a self-extracting payload, say).
    payload = tmp_path / "payload.so"
    payload.write_bytes(debug_lib.read_bytes() + b"PAYLOAD!" * 2000)
    # A relocatable object: its symbol table is what a linker needs.
    obj = tmp_path / "lib.o"
    subprocess.run([need("gcc"), "-g", "-c", "-fPIC", "-o", str(obj), str(tmp_path / "lib.c")],
                   check=True)
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(debug_lib.read_bytes()[:3000])
    text = tmp_path / "notes.txt"
    text.write_bytes(b"\x7fELF but not really" * 100)
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    for p in (payload, obj, truncated, text, script):
        data = p.read_bytes()
        assert slim.strip_elf(str(p)) == 0, p.name
        assert p.read_bytes() == data, p.name
    assert not list(tmp_path.glob("*.mlbuild-strip.*"))


def test_strip_a_hard_linked_file_writes_a_new_one(debug_lib, tmp_path):
    cache = tmp_path / "cache.so"
    os.link(debug_lib, cache)
    original = cache.read_bytes()
    assert slim.strip_elf(str(debug_lib)) > 0
    assert cache.read_bytes() == original  # the other name still has the old file
    assert os.stat(debug_lib).st_ino != os.stat(cache).st_ino


def test_strip_patchelf_wheels_numpy_still_imports(tmp_path):
    """numpy's wheel (auditwheel: patchelf put segments after the debug sections)."""
    import numpy

    site = tmp_path / "site"
    pkg = Path(numpy.__file__).parent
    shutil.copytree(pkg, site / "numpy", ignore=shutil.ignore_patterns("tests", "__pycache__"))
    if (pkg.parent / "numpy.libs").is_dir():
        shutil.copytree(pkg.parent / "numpy.libs", site / "numpy.libs")
    core = next((site / "numpy/_core").glob("_multiarray_umath*.so"))
    before = core.stat().st_size

    result = slim.slim(str(tmp_path))

    assert result["stripped"] > 5 and result["strip_bytes"] > 100_000
    assert core.stat().st_size < before
    names, warnings = readelf_sections(core)
    assert warnings == "" and ".symtab" not in names
    code = ("import numpy as np; a = np.arange(9.0).reshape(3, 3) + np.eye(3); "
            "print(round(float(np.linalg.det(a)), 6), np.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    det = float(numpy.linalg.det(numpy.arange(9.0).reshape(3, 3) + numpy.eye(3)))
    assert r.stdout.split()[0] == str(round(det, 6)) and str(site) in r.stdout


def test_prune_removes_what_no_service_reads(tmp_path):
    site = tmp_path / "usr/lib/python3.11/site-packages"
    files = {
        "pkg/__init__.py": "x = 1\n", "pkg/core.py": "", "pkg/data.json": "{}",
        "pkg/py.typed": "", "pkg/__init__.pyi": "", "pkg/_ext.pyx": "", "pkg/_ext.pxd": "",
        "pkg/include/pkg.h": "", "pkg/src/impl.c": "", "pkg/src/impl.cpp": "",
        "pkg/_tpl.pyx.tp": "", "pkg/lib/libpkg.a": "",
        "pkg/tests/test_core.py": "", "pkg/tests/data/big.bin": "x" * 1000,
        "pkg/__pycache__/core.cpython-311.pyc": "",
        "tests/__init__.py": "",  # a top-level package named tests is a package
        "other-1.0.dist-info/RECORD": "",
    }
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    outside = tmp_path / "usr/share/doc/pkg/notes.c"  # outside any site folder
    outside.parent.mkdir(parents=True)
    outside.write_text("")

    slim.slim(str(tmp_path))

    left = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert left == ["other-1.0.dist-info/RECORD", "pkg/__init__.py", "pkg/core.py",
                    "pkg/data.json", "pkg/py.typed", "tests/__init__.py"]
    assert outside.exists()
    assert slim.site_dirs(str(tmp_path)) == [str(site)]


def test_identical_files_are_linked(tmp_path):
    a, b, c = tmp_path / "a/lib.so", tmp_path / "b/lib.so", tmp_path / "b/other.so"
    for p in (a, b, c):
        p.parent.mkdir(exist_ok=True)
    blob = os.urandom(200_000)
    a.write_bytes(blob)
    b.write_bytes(blob)
    c.write_bytes(blob[:-1] + b"!")
    small = [tmp_path / "a/s.txt", tmp_path / "b/s.txt"]
    for p in small:
        p.write_text("same")

    linked, saved = slim.link_duplicates(str(tmp_path))

    assert (linked, saved) == (1, 200_000)
    assert os.stat(a).st_ino == os.stat(b).st_ino != os.stat(c).st_ino
    assert b.read_bytes() == blob
    assert os.stat(small[0]).st_ino != os.stat(small[1]).st_ino  # below the size floor


def test_main_reports_and_tolerates_a_missing_root(tmp_path):
    r = subprocess.run([sys.executable, str(SLIM), str(tmp_path / "nothing"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "nothing installed there" in r.stdout
    assert f"slim {tmp_path}: stripped 0 ELF files" in r.stdout


def test_runs_on_python_38():
    """The builder stage runs it on the base image's Python, which may be older."""
    ast.parse(SLIM.read_text(), feature_version=(3, 8))
    tree = ast.parse(SLIM.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
