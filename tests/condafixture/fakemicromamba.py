"""A micromamba stand-in built on py-rattler's solver: what conda-lock needs, no more.

conda-lock drives a conda-compatible solver as a subprocess and reads its JSON. No
micromamba binary can be fetched on the test machines (no GitHub, no conda channel), so
this script answers the commands conda-lock 4.x sends (conda_lock/conda_solver.py,
invoke_conda.py and ensureconda) with the same shapes micromamba 2.x prints:

    micromamba --version                                    → "2.0.5"
    micromamba config --json list pkgs_dirs                 → {"pkgs_dirs": [...]}
    micromamba info --json                                  → {"pkgs_dirs": [...], ...}
    micromamba create -p P --dry-run --json
        [--override-channels] -c URL... SPEC...             → {"actions": {"FETCH": [...],
                                                               "LINK": [...]}, ...}
    micromamba list [--no-pip] -p P --json                  → [{name, version, ...}]
    micromamba update|install -c URL... -p P --json
        --dry-run SPEC...                                   → as create, against P's
                                                              conda-meta (conda-lock --update)

The target platform is ``CONDA_SUBDIR`` (conda-lock sets it), else linux-64. Channels
are URLs (file:// in the tests). A request that does not solve exits 1 with
micromamba's output: ``{"success": false, "solver_problems": [...]}`` on stdout, the
explanation on stderr after ``error    libmamba Could not solve for environment specs``.

:func:`write_solver` writes the executable (named ``micromamba``: conda-lock picks its
commands by the name) that runs this file with the current interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

VERSION = "2.0.5"


def write_solver(folder: Path, python: str | None = None) -> Path:
    """Write the ``micromamba`` executable into ``folder``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "micromamba"
    exe.write_text(f'#!/bin/sh\nexec "{python or sys.executable}" "{Path(__file__).resolve()}" '
                   '"$@"\n')
    exe.chmod(0o755)
    return exe


def _pkgs_dirs() -> list[str]:
    return [os.environ.get("CONDA_PKGS_DIRS")
            or str(Path(tempfile.gettempdir()) / "fakemicromamba-pkgs")]


def _platform() -> str:
    return os.environ.get("CONDA_SUBDIR") or "linux-64"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micromamba", add_help=False)
    p.add_argument("--version", action="store_true")
    sub = p.add_subparsers(dest="command")
    for name in ("create", "install", "update"):
        s = sub.add_parser(name, add_help=False)
        s.add_argument("-p", "--prefix")
        s.add_argument("-n", "--name")
        s.add_argument("-c", "--channel", action="append", default=[])
        s.add_argument("--override-channels", action="store_true")
        s.add_argument("--dry-run", action="store_true")
        s.add_argument("--json", action="store_true")
        s.add_argument("-y", "--yes", action="store_true")
        s.add_argument("specs", nargs="*")
    s = sub.add_parser("list", add_help=False)
    s.add_argument("-p", "--prefix")
    s.add_argument("-n", "--name")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-pip", action="store_true")
    s = sub.add_parser("config", add_help=False)
    s.add_argument("--json", action="store_true")
    s.add_argument("words", nargs="*")
    s = sub.add_parser("info", add_help=False)
    s.add_argument("--json", action="store_true")
    return p


def _installed(prefix: str | None) -> list[dict]:
    """The conda-meta records of ``prefix`` (conda-lock's fake environment)."""
    if not prefix:
        return []
    meta = Path(prefix) / "conda-meta"
    return [json.loads(f.read_text()) for f in sorted(meta.glob("*.json"))] if meta.is_dir() \
        else []


def _record_from_meta(entry: dict):
    """A rattler RepoDataRecord for one conda-meta entry (a previously locked package)."""
    from rattler import BuildString, PackageRecord, RepoDataRecord

    record = PackageRecord(
        name=entry["name"], version=entry["version"], build=BuildString(entry["build"]),
        build_number=int(entry.get("build_number", 0)), subdir=entry["subdir"],
        depends=list(entry.get("depends") or []),
        md5=bytes.fromhex(entry["md5"]) if entry.get("md5") else None,
        sha256=bytes.fromhex(entry["sha256"]) if entry.get("sha256") else None,
    )
    return RepoDataRecord(record, entry["fn"], entry["url"], entry["channel"])


def _fetch_action(record) -> dict:
    action = json.loads(record.to_json())
    action.setdefault("fn", record.file_name)
    action["url"] = record.url
    action["channel"] = record.channel
    action["build_string"] = action.get("build", "")
    return action


def _link_action(action: dict) -> dict:
    dist = action["fn"].removesuffix(".tar.bz2").removesuffix(".conda")
    return {"name": action["name"], "version": action["version"],
            "build_string": action.get("build", ""), "channel": action["channel"],
            "base_url": action["channel"], "dist_name": dist, "platform": action["subdir"]}


async def _solve(channels: list[str], specs: list[str], locked: list) -> list:
    from rattler import Channel, Gateway, solve

    gateway = Gateway(cache_dir=Path(_pkgs_dirs()[0]) / "cache")
    return await solve(sources=[Channel(c) for c in channels], specs=specs, gateway=gateway,
                       platforms=[_platform(), "noarch"], locked_packages=locked or None)


def _fail(message: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"success": False, "solver_problems": [message]}, indent=4))
    print("error    libmamba Could not solve for environment specs", file=sys.stderr)
    for line in message.splitlines():
        print(f"    {line}", file=sys.stderr)
    print("critical libmamba Could not solve for environment specs", file=sys.stderr)
    return 1


def _solve_command(args) -> int:
    if not args.dry_run:
        print("fakemicromamba: only --dry-run is supported (it installs nothing)",
              file=sys.stderr)
        return 2
    if not args.channel:
        print("fakemicromamba: give the channels with -c (no default channels here)",
              file=sys.stderr)
        return 2
    installed = _installed(args.prefix) if args.command != "create" else []
    specs = list(args.specs)
    locked = []
    if installed:
        # Move the named packages only; prefer the installed version of every other
        # one: what micromamba's update does, and what conda-lock --update relies on.
        from rattler import MatchSpec

        named = {MatchSpec(s).name.normalized for s in specs}
        specs += [e["name"] for e in installed if e["name"] not in named]
        locked = [_record_from_meta(e) for e in installed if e["name"] not in named]
    try:
        records = asyncio.run(_solve(args.channel, specs, locked))
    except Exception as e:  # rattler's SolverError and friends: micromamba prints them
        return _fail(str(e).removeprefix("Cannot solve the request because of: ").strip(),
                     args.json)
    before = {(e["name"], e["version"], e["build"]) for e in installed}
    fetch = [_fetch_action(r) for r in records
             if (str(r.name.normalized), str(r.version), str(r.build)) not in before]
    out = {"actions": {"FETCH": fetch, "LINK": [_link_action(a) for a in fetch],
                       "PREFIX": args.prefix or ""},
           "dry_run": True, "prefix": args.prefix or "", "success": True}
    print(json.dumps(out, indent=4))
    return 0


def _list_command(args) -> int:
    entries = [{"name": e["name"], "version": e["version"], "build_string": e["build"],
                "build_number": e.get("build_number", 0), "channel": e["channel"],
                "base_url": e["channel"], "platform": e["subdir"],
                "dist_name": e["fn"].removesuffix(".tar.bz2").removesuffix(".conda")}
               for e in _installed(args.prefix)]
    print(json.dumps(entries, indent=4))
    return 0


def main(argv: list[str]) -> int:
    args, _unknown = _parser().parse_known_args(argv)
    if args.version:
        print(VERSION)
        return 0
    if args.command in ("create", "install", "update"):
        return _solve_command(args)
    if args.command == "list":
        return _list_command(args)
    if args.command == "config" and args.words[:2] == ["list", "pkgs_dirs"]:
        print(json.dumps({"pkgs_dirs": _pkgs_dirs()}, indent=4))
        return 0
    if args.command == "info":
        print(json.dumps({"pkgs_dirs": _pkgs_dirs(), "package cache": _pkgs_dirs(),
                          "platform": _platform(), "micromamba version": VERSION}, indent=4))
        return 0
    print(f"fakemicromamba: unsupported command: {' '.join(argv)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # NOTE: not sys.exit: py-rattler 0.28's runtime threads abort the interpreter's
    # finalization (SIGABRT, "PyGILState_Release ... finalizing") after a solve, and
    # conda-lock would read that as a failed solve.
    os._exit(code)
