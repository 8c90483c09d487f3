"""Hashing a large model: first time vs. sha256sum, and the unchanged re-check.

    python bench/hash.py [--size-gb 2]

Goals (issue: core): first hash >= 0.9x the speed of `sha256sum` on the same file;
re-checking the unchanged file (a new process's cache, loaded from the state
database) < 50 ms. The file is read once beforehand so both hashers read from the
page cache; the two are interleaved three times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))
from _common import med, row  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=2.0)
    args = ap.parse_args()
    from mlbuild.state.db import StateDB
    from mlbuild.state.digest import DigestCache, hash_file

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "model.bin"
        block = os.urandom(64 << 20)
        with open(f, "wb") as fh:
            for _ in range(int(args.size_gb * 1024 / 64)):
                fh.write(block)
        size = f.stat().st_size
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
        ours, theirs = [], []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(["sha256sum", str(f)], stdout=subprocess.DEVNULL, check=True)
            theirs.append(time.perf_counter() - t)
            t = time.perf_counter()
            hash_file(f)
            ours.append(time.perf_counter() - t)
        time.sleep(1.1)  # past the "recently modified" window, so the digest is kept
        db = StateDB(Path(tmp) / ".mlbuild")
        cache = DigestCache(db)
        t = time.perf_counter()
        cache.file(f)
        first_cached = time.perf_counter() - t
        cache.flush()
        db.close()
        rechecks = []
        for _ in range(5):
            t = time.perf_counter()
            db = StateDB(Path(tmp) / ".mlbuild")
            DigestCache(db).file(f)
            db.close()
            rechecks.append(time.perf_counter() - t)
        gb = size / 1e9
        print(row("what", "seconds", "GB/s"))
        print(row("sha256sum (median of 3)", f"{med(theirs):.3f}", f"{gb / med(theirs):.2f}"))
        print(row("mlbuild hash_file (median of 3)", f"{med(ours):.3f}", f"{gb / med(ours):.2f}"))
        print(row("mlbuild DigestCache, first time", f"{first_cached:.3f}", f"{gb / first_cached:.2f}"))
        print(row("unchanged re-check (open db + stat)", f"{med(rechecks) * 1000:.1f} ms", ""))
        ratio = med(theirs) / med(ours)
        print(f"\nspeed vs sha256sum: {ratio:.2f}x (goal >= 0.9x): {'OK' if ratio >= 0.9 else 'UNDER'}")
        print(f"re-check: {med(rechecks) * 1000:.1f} ms (goal < 50 ms): "
              f"{'OK' if med(rechecks) < 0.05 else 'OVER'}")


if __name__ == "__main__":
    main()
