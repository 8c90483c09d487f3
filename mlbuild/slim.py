"""Make an installed environment smaller without changing what it runs.

Run inside an image's builder stage, on the tree pip (``--root``) or the conda installer
just wrote, before it is copied into the image::

    python slim.py ROOT [ROOT ...]

It does, in this order:

1. **strip** every ELF shared object and executable: the sections the loader never
   reads (``.debug_*``, ``.symtab``, ``.strtab``, ``.comment``, ``.gnu_debuglink``)
   are dropped, as ``strip`` does, in pure Python (a builder stage has no binutils,
   and an offline build cannot install them). A file whose layout is not the plain
   one (dropped sections inside a loaded segment, data after the sections that no
   section accounts for, renumbering that would move a loaded section) is left as it
   is: never a guess. The demo's numpy/scipy/scikit-learn and uvloop: -28 MB.
2. **prune**, in each ``site-packages``/``dist-packages`` below ROOT: the packages'
   test suites (``tests`` folders inside a package), the bytecode caches (the image
   compiles the modules its service imports in a later layer, see
   ``mlbuild/runtime/warm.py``), Cython sources and declarations (``.pyx``, ``.pxd``,
   ``.pxi``, Tempita ``.tp`` templates), C/C++ sources and headers, static libraries
   (``.a``) and type stubs (``.pyi``): no service reads them at run time; they serve
   compiling against a package, or an editor.
3. **link** identical files (64 KiB and up) to one inode: wheels vendor the same
   runtime libraries (numpy and scipy each bring libgfortran). An image layer holds a
   hard-linked file once.

Standard library only, and Python 3.8 or newer: it runs on the builder's Python, not
mlbuild's. Prints one summary line a ROOT (a missing ROOT holds nothing to do); exits 0.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys

SHF_ALLOC = 0x2
SHF_INFO_LINK = 0x40
SHT_NOBITS = 8
SHT_RELA = 4
SHT_REL = 9
SHT_GROUP = 17
SHT_SYMTAB_SHNDX = 18
ET_EXEC, ET_DYN = 2, 3
SHN_XINDEX = 0xFFFF

# Sections no loader reads; what `strip --strip-unneeded` removes from a shared object.
DROP_NAMES = frozenset({b".symtab", b".strtab", b".comment", b".gnu_debuglink",
                        b".gnu_debugaltlink", b".gnu_debugdata", b".gnu.build.attributes"})
DROP_PREFIXES = (b".debug", b".zdebug")

PRUNE_SUFFIXES = (".pyi", ".pyx", ".pxd", ".pxi", ".tp", ".c", ".cc", ".cpp", ".cxx", ".h",
                  ".hh", ".hpp", ".hxx", ".a")
PRUNE_DIRS = ("tests", "__pycache__")
LINK_MIN_SIZE = 64 * 1024
# Padding between the sections of a file's tail that stripping may drop; more than
# this, or a non-zero byte in it, is data nothing accounts for: the file stays as it is.
MAX_GAP = 4096


class _Layout:
    """The struct formats of one ELF class and byte order."""

    def __init__(self, elfclass: int, order: str):
        self.wide = elfclass == 2
        e = "<" if order == "little" else ">"
        if self.wide:
            self.ehdr = struct.Struct(e + "16sHHIQQQIHHHHHH")
            self.phdr = struct.Struct(e + "IIQQQQQQ")
            self.shdr = struct.Struct(e + "IIQQQQIIQQ")
        else:
            self.ehdr = struct.Struct(e + "16sHHIIIIIHHHHHH")
            self.phdr = struct.Struct(e + "IIIIIIII")
            self.shdr = struct.Struct(e + "IIIIIIIIII")


def strip_elf(path: str) -> int:
    """Drop the sections of ELF file ``path`` that no loader reads, in place.

    The dropped sections' bytes leave the file; everything after them moves down by a
    multiple of the alignment of what follows (so every segment keeps ``p_offset ==
    p_vaddr`` modulo its ``p_align``); their headers stay in the table as SHT_NULL
    entries, so no section changes its index (``.dynsym``'s ``st_shndx`` stay right).
    Files patched by patchelf (auditwheel's wheels) have loaded segments after the
    debug sections: they are handled the same way.

    Returns:
        The bytes saved; 0 for a file that is not an ELF executable or shared object,
        has nothing to drop, or whose layout is not one this can rewrite safely (it is
        then left untouched).

    Raises:
        OSError: ``path`` cannot be read or replaced.
    """
    with open(path, "rb") as fh:
        ident = fh.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) \
                or ident[5] not in (1, 2):
            return 0
        lay = _Layout(ident[4], "little" if ident[5] == 1 else "big")
        fh.seek(0)
        head = fh.read(lay.ehdr.size)
        if len(head) < lay.ehdr.size:
            return 0
        (_, e_type, _, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize,
         e_shnum, e_shstrndx) = lay.ehdr.unpack(head)
        if e_type not in (ET_EXEC, ET_DYN) or not e_shoff or not e_shnum \
                or e_shstrndx in (0, SHN_XINDEX) or e_shstrndx >= e_shnum \
                or e_shentsize != lay.shdr.size or (e_phnum and e_phentsize != lay.phdr.size):
            return 0
        size = os.fstat(fh.fileno()).st_size
        sht_end = e_shoff + e_shnum * e_shentsize
        if sht_end > size or e_phoff + e_phnum * e_phentsize > size:
            return 0
        fh.seek(e_phoff)
        phdrs = [list(lay.phdr.unpack(fh.read(e_phentsize))) for _ in range(e_phnum)]
        fh.seek(e_shoff)
        shdrs = [list(lay.shdr.unpack(fh.read(e_shentsize))) for _ in range(e_shnum)]
        # (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info,
        #  sh_addralign, sh_entsize)
        strtab = shdrs[e_shstrndx]
        if strtab[4] + strtab[5] > size:
            return 0
        fh.seek(strtab[4])
        names_blob = fh.read(strtab[5])

        def name(sh) -> bytes:
            end = names_blob.find(b"\0", sh[0])
            return names_blob[sh[0]:end if end >= 0 else None]

        def in_file(sh) -> bool:
            return sh[1] != SHT_NOBITS and sh[5] > 0

        drop = set()
        for i, sh in enumerate(shdrs):
            if i == 0 or i == e_shstrndx or sh[2] & SHF_ALLOC or not in_file(sh):
                continue
            n = name(sh)
            if n in DROP_NAMES or n.startswith(DROP_PREFIXES):
                drop.add(i)
        if not drop:
            return 0
        for i, sh in enumerate(shdrs):
            if i in drop:
                continue
            if sh[1] in (SHT_GROUP, SHT_SYMTAB_SHNDX) or sh[6] in drop:
                return 0  # something kept refers to a dropped section
            if (sh[1] in (SHT_REL, SHT_RELA) or sh[2] & SHF_INFO_LINK) and sh[7] in drop:
                return 0

        # What must stay, byte for byte: the headers, every segment, every kept section.
        seg = [(p[2], p[2] + p[5]) if lay.wide else (p[1], p[1] + p[4]) for p in phdrs]
        align = [p[7] for p in phdrs]  # p_align, in both classes
        kept = [(0, lay.ehdr.size), (e_phoff, e_phoff + e_phnum * e_phentsize)]
        kept += [r for r in seg if r[1] > r[0]]
        kept += [(sh[4], sh[4] + sh[5]) for i, sh in enumerate(shdrs)
                 if i not in drop and in_file(sh)]
        # The holes: the dropped sections and the old section table (written anew at
        # the end), merged across small zero gaps that nothing kept covers.
        spans = sorted([(shdrs[i][4], shdrs[i][4] + shdrs[i][5]) for i in drop]
                       + [(e_shoff, sht_end)])
        holes: list[list[int]] = []
        for s, e in spans:
            if holes and s - holes[-1][1] <= MAX_GAP and not _covered(kept, holes[-1][1], s) \
                    and _zeros(fh, holes[-1][1], s):
                holes[-1][1] = max(holes[-1][1], e)
            elif holes and s < holes[-1][1]:
                return 0  # overlapping sections: not a layout to rewrite
            else:
                holes.append([s, e])
        for s, e in holes:
            if any(ks < e and s < ke for ks, ke in kept):
                return 0  # a dropped section inside a segment or a kept section
        # Bytes past the last thing anything accounts for (an appended payload?).
        last = max([e for _, e in kept] + [e for _, e in holes])
        if size - last > MAX_GAP or not _zeros(fh, last, size):
            return 0
        if holes[-1][1] >= last:
            holes[-1][1] = size

        # How much of each hole can go: a multiple of the largest alignment of the
        # segments and sections after it, so that each keeps its alignment.
        cuts = []  # (hole start, hole end, bytes removed)
        for s, e in holes:
            need = 8 if lay.wide else 4
            for (ps, _), a in zip(seg, align):
                if ps >= e:
                    need = max(need, a or 1)
            for i, sh in enumerate(shdrs):
                if i not in drop and sh[4] >= e:
                    need = max(need, sh[8] or 1)
            cuts.append((s, e, e - s if e >= size else (e - s) // need * need))
        if not sum(c for _, _, c in cuts):
            return 0

        def moved(off: int) -> int:
            shift = 0
            for s, e, c in cuts:
                if off >= e:
                    shift += c
                elif off > s:  # inside a hole: where the hole now starts
                    return s - shift
            return off - shift

        tmp = "%s.mlbuild-strip.%d" % (path, os.getpid())
        try:
            with open(tmp, "wb") as out:
                pos = 0
                for s, e, c in cuts:
                    fh.seek(pos)
                    _copy(fh, out, s - pos)
                    out.write(b"\0" * min(e - s - c, size - s))
                    pos = e
                if pos < size:
                    fh.seek(pos)
                    _copy(fh, out, size - pos)
                end = out.tell()
                pad = -end % (8 if lay.wide else 4)
                out.write(b"\0" * pad)
                shoff = end + pad
                for i, sh in enumerate(shdrs):
                    if i in drop:
                        out.write(b"\0" * lay.shdr.size)
                        continue
                    sh = list(sh)
                    if sh[4]:
                        sh[4] = moved(sh[4])
                    out.write(lay.shdr.pack(*sh))
                new_size = out.tell()
                out.seek(moved(e_phoff))
                for p in phdrs:
                    if lay.wide:
                        p[2] = moved(p[2])
                    else:
                        p[1] = moved(p[1])
                    out.write(lay.phdr.pack(*p))
                header = list(lay.ehdr.unpack(head))
                header[5], header[6] = moved(e_phoff), shoff
                out.seek(0)
                out.write(lay.ehdr.pack(*header))
            st = os.stat(path)
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    return size - new_size


def _covered(ranges, start: int, end: int) -> bool:
    """Whether any of ``ranges`` overlaps [start, end)."""
    return any(s < end and start < e for s, e in ranges)


def _zeros(fh, start: int, end: int) -> bool:
    if end <= start:
        return True
    fh.seek(start)
    return not fh.read(end - start).strip(b"\0")


def _copy(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise OSError("file shorter than its ELF headers say")
        dst.write(chunk)
        n -= len(chunk)


def site_dirs(root: str) -> list[str]:
    """The ``site-packages``/``dist-packages`` folders below ``root`` (5 levels deep)."""
    found = []
    base = root.rstrip(os.sep).count(os.sep)
    for d, dirs, _ in os.walk(root):
        depth = d.count(os.sep) - base
        if os.path.basename(d) in ("site-packages", "dist-packages"):
            found.append(d)
            dirs[:] = []
        elif depth >= 5:
            dirs[:] = []
    return sorted(found)


def prune(site: str) -> tuple[int, int]:
    """Remove what no service reads from one site folder (see the module docstring).

    Returns:
        (files removed, bytes removed).
    """
    files = freed = 0
    for d, dirs, names in os.walk(site, topdown=True):
        inside_package = d != site
        for sub in list(dirs):
            if sub == "__pycache__" or (sub == "tests" and inside_package):
                dirs.remove(sub)
                f, b = _remove_tree(os.path.join(d, sub))
                files += f
                freed += b
        for n in names:
            if n.endswith(PRUNE_SUFFIXES):
                p = os.path.join(d, n)
                st = os.lstat(p)
                os.unlink(p)
                files += 1
                freed += st.st_size if st.st_nlink == 1 else 0
    return files, freed


def _remove_tree(top: str) -> tuple[int, int]:
    files = freed = 0
    for d, dirs, names in os.walk(top, topdown=False):
        for n in names:
            p = os.path.join(d, n)
            st = os.lstat(p)
            os.unlink(p)
            files += 1
            freed += st.st_size if st.st_nlink == 1 else 0
        for n in dirs:
            p = os.path.join(d, n)
            if os.path.islink(p):
                os.unlink(p)
            else:
                os.rmdir(p)
    os.rmdir(top)
    return files, freed


def _regular_files(root: str):
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                yield p, st


def link_duplicates(root: str) -> tuple[int, int]:
    """Hard-link files of identical content (and mode) below ``root`` to one inode.

    Returns:
        (files linked, bytes saved).
    """
    by_size: dict[tuple[int, int], list[str]] = {}
    seen_inodes = set()
    for p, st in _regular_files(root):
        if st.st_size < LINK_MIN_SIZE or (st.st_dev, st.st_ino) in seen_inodes:
            continue
        seen_inodes.add((st.st_dev, st.st_ino))
        by_size.setdefault((st.st_size, stat.S_IMODE(st.st_mode)), []).append(p)
    linked = saved = 0
    for (size, _), paths in by_size.items():
        if len(paths) < 2:
            continue
        first: dict[str, str] = {}
        for p in sorted(paths):
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
            if digest not in first:
                first[digest] = p
                continue
            tmp = p + ".mlbuild-link"
            try:
                os.link(first[digest], tmp)
                os.replace(tmp, p)
            except OSError:  # another file system, a link limit: both copies stay
                continue
            linked += 1
            saved += size
    return linked, saved


def slim(root: str) -> dict[str, int]:
    """Strip, prune and link below ``root``; returns the counts the summary prints."""
    out = {"stripped": 0, "strip_bytes": 0, "pruned": 0, "prune_bytes": 0,
           "linked": 0, "link_bytes": 0}
    for site in site_dirs(root):
        f, b = prune(site)
        out["pruned"] += f
        out["prune_bytes"] += b
    for p, st in _regular_files(root):
        # NOTE: a hard-linked file (an installer's package cache) is rewritten as a new
        # file, never in place; one with nothing to drop is not touched at all.
        if st.st_size < 1024:
            continue
        try:
            saved = strip_elf(p)
        except OSError:  # unreadable, or its folder is read-only: left as it is
            continue
        if saved:
            out["stripped"] += 1
            out["strip_bytes"] += saved
    out["linked"], out["link_bytes"] = link_duplicates(root)
    return out


def move_scripts(root: str, site: str, scripts: str) -> int:
    """Move the scripts an install with ``--target ROOT+SITE`` put in ``ROOT+SITE/bin`` to
    ``ROOT+SCRIPTS``, where the interpreter's own scripts are, and say so in each
    distribution's RECORD (which lists them as ``bin/NAME``, relative to SITE): an
    uninstall then finds them (the delta layer of an image's environment uninstalls
    what the lock no longer wants, see mlbuild/envlayers.py). The number moved."""
    import csv
    import io
    import shutil

    src = root + site + "/bin"
    if not os.path.isdir(src):
        return 0
    dst = root + scripts
    os.makedirs(dst, exist_ok=True)
    moved = 0
    for name in sorted(os.listdir(src)):
        target = os.path.join(dst, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        shutil.move(os.path.join(src, name), target)
        moved += 1
    os.rmdir(src)
    rel = os.path.relpath(scripts, site).replace(os.sep, "/")
    for entry in os.listdir(root + site):
        record = os.path.join(root + site, entry, "RECORD")
        if not entry.endswith(".dist-info") or not os.path.isfile(record):
            continue
        with open(record, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if not any(r and r[0].startswith("bin/") for r in rows):
            continue
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for r in rows:
            if r and r[0].startswith("bin/"):
                r = [rel + r[0][3:]] + r[1:]
            writer.writerow(r)
        with open(record, "w", encoding="utf-8", newline="") as fh:
            fh.write(out.getvalue())
    return moved


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print("usage: python slim.py ROOT [ROOT ...]")
        print("       python slim.py --move-scripts ROOT SITE SCRIPTS")
        return 0 if argv else 2
    if argv[0] == "--move-scripts":
        if len(argv) != 4:
            print("usage: python slim.py --move-scripts ROOT SITE SCRIPTS")
            return 2
        move_scripts(*argv[1:])
        return 0
    for root in argv:
        if not os.path.isdir(root):
            print("slim %s: nothing installed there" % root)
            continue
        r = slim(root)
        mb = 1024 * 1024
        print("slim %s: stripped %d ELF files (-%.1f MB), removed %d files (-%.1f MB), "
              "linked %d duplicates (-%.1f MB)"
              % (root, r["stripped"], r["strip_bytes"] / mb, r["pruned"],
                 r["prune_bytes"] / mb, r["linked"], r["link_bytes"] / mb))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
