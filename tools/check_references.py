#!/usr/bin/env python3
"""References a clone of the repository cannot follow, found in its text files (part (e) of
``tools/check_architecture.py``; also runnable alone: ``python tools/check_references.py``).

Which files: when the root is a git work tree's top folder, the files git tracks or would track
(``git ls-files --cached --others --exclude-standard``: committed, or new and not ignored); otherwise
every file under the root but ``.git``, virtual environments, caches, build output and experiment
folders (``SKIP_DIRS``). A file whose first 8 KiB hold a NUL byte, or which is not UTF-8, is binary
and skipped. This file itself is not scanned: it spells out the patterns it looks for.

Flagged, each with ``file:line`` and the text found:

1. **A relative path that leaves the repository**: a ``../`` at the start of a path (not inside one,
   as in ``a/../b``), with the path after it. It is resolved from the folder of the file that holds it;
   flagged when it leads above the repository root, and also when it names nothing in the repository
   from there but leads above the root read from the root itself (how the README and code comments cite
   files). So ``../README.md`` in ``docs/`` passes, and a sibling checkout's ``../<folder>/x`` cited
   anywhere fails.
2. **Absolute paths of a developer's machine**, where a path starts: the character before it is not a
   letter, digit, ``_``, ``.``, ``~``, ``$`` or ``-`` (so after a space, a quote, a bracket, ``=``, ``:``
   or the slashes of a ``file://`` or ``sqlite:///`` URL; a URL's path after its host name, or
   ``/mnt/work``, is not a start):
   - ``/work`` and ``/root`` and anything under them;
   - ``/home/<name>`` for any name but the placeholders ``HOME_PLACEHOLDERS`` (``ray``: the home folder
     of Ray's Docker images, as ``cluster.yaml`` uses it; ``me``, ``user``, ``username``, ``you``);
   - ``/Users/<name>`` (macOS homes) and ``<drive>:\\Users\\`` / ``<drive>:/Users/`` (Windows homes);
   - the temporary folders programs make for one run: ``/tmp/pytest-of-<user>``, Python's
     ``tempfile`` names ``/tmp/tmp<8 characters>``, macOS's ``/var/folders/`` and ``/private/var/``.

   Not flagged, deliberately: other ``/tmp/...`` paths (hand-written examples such as
   ``--storage /tmp/x``, or a node's scratch file in ``cluster.yaml``), system paths (``/dev/shm``,
   ``/etc/...``, ``/proc/mounts``, ``/usr``, ``/opt``, ``/mnt/...``, ``/data/...``), placeholders
   (``/path/to/...``, ``sqlite:////abs/path``, ``<experiment>``), ``~/...`` and ``$HOME/...``.
3. **A cited section of ``docs/architecture.md`` that it does not have**: the quoted names after
   ``docs/architecture.md`` (``docs/architecture.md "Rooms", "Records"``) must each be a heading of that
   file.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SKIP_DIRS = {".git", ".venv", "venv", "env", "__pycache__", ".pytest_cache", "build", "dist", "node_modules",
             "oodsweep-runs", ".mypy_cache", ".ruff_cache"}
HOME_PLACEHOLDERS = {"ray", "me", "user", "username", "you"}
SELF = "tools/check_references.py"
ARCHITECTURE = "docs/architecture.md"

_START = r"(?<![\w.~$-])"  # a path starts here: not inside a word, a relative path, a URL's host or $VAR
PARENT = re.compile(r"(?<![\w./~$-])((?:\.\./)+)([^\s'\"`)\]>,;*|]*)")
MACHINE = [
    (re.compile(_START + r"/(?:work|root)\b[^\s'\"`)\]>,;]*"), "a developer machine's path"),
    (re.compile(_START + r"/home/([A-Za-z0-9_.-]+)[^\s'\"`)\]>,;]*"), "a home folder"),
    (re.compile(_START + r"/Users/[A-Za-z0-9_.-]+[^\s'\"`)\]>,;]*"), "a macOS home folder"),
    (re.compile(r"\b[A-Za-z]:[\\/]+Users[\\/]+[^\s'\"`)\]>,;]*"), "a Windows home folder"),
    (re.compile(_START + r"/tmp/(?:pytest-of-|tmp[a-z0-9_]{8}\b)[^\s'\"`)\]>,;]*"), "a temporary folder of one run"),
    (re.compile(_START + r"/(?:private/)?var/folders/[^\s'\"`)\]>,;]*"), "a macOS temporary folder"),
]
CITATION = re.compile(r"docs/architecture\.md((?:,?\s+(?:and\s+)?\"[^\"\n]+\")+)")


def text_files(root: Path) -> list[Path]:
    """The files to scan (see the module docstring), as paths relative to ``root``."""
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if Path(top).resolve() == root.resolve():
            out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], capture_output=True, text=True, check=True).stdout
            return sorted({Path(p) for p in out.split("\0") if p and (root / p).is_file()})
    except (OSError, subprocess.CalledProcessError):
        pass  # no git, or not a work tree's top: walk the folder
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [(Path(folder) / n).relative_to(root) for n in names]
    return sorted(files)


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _inside(path: str, root: Path) -> bool:
    return not os.path.relpath(path, root).split(os.sep)[0] == ".."


def headings(root: Path) -> set[str] | None:
    doc = root / ARCHITECTURE
    if not doc.is_file():
        return None
    return {m.group(1).strip() for m in re.finditer(r"^#+\s+(.+?)\s*#*$", doc.read_text(), re.M)}


def scan(root: Path, rel: Path, text: str, sections: set[str] | None) -> list[str]:
    found = []
    folder = (root / rel).parent
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{rel.as_posix()}:{n}"
        for m in PARENT.finditer(line):
            ref = m.group(1) + m.group(2)
            from_file = os.path.normpath(folder / ref)
            from_root = os.path.normpath(root / ref)
            if not _inside(from_file, root):
                found.append(f"{where}  {ref!r} leads outside the repository")
            elif not os.path.exists(from_file) and not _inside(from_root, root):
                found.append(f"{where}  {ref!r} names nothing in the repository and, read from its root, "
                             f"leads outside it")
        for pattern, what in MACHINE:
            for m in pattern.finditer(line):
                if what == "a home folder" and m.group(1) in HOME_PLACEHOLDERS:
                    continue
                found.append(f"{where}  {m.group(0)!r}: {what}; write it relative to the repository or the "
                             f"experiment, or as a placeholder")
        for m in CITATION.finditer(line):
            for name in re.findall(r"\"([^\"\n]+)\"", m.group(1)):
                if sections is None:
                    found.append(f"{where}  cites {ARCHITECTURE} \"{name}\" but the repository has no {ARCHITECTURE}")
                elif name not in sections:
                    found.append(f"{where}  cites {ARCHITECTURE} \"{name}\", not a section of it "
                                 f"({', '.join(sorted(sections))})")
    return found


def check_references(root: Path) -> list[str]:
    """Every reference a clone cannot follow, one line each (empty: none)."""
    root = root.resolve()
    sections = headings(root)
    found = []
    for rel in text_files(root):
        if rel.as_posix() == SELF:
            continue
        text = read_text(root / rel)
        if text is not None:
            found += scan(root, rel, text, sections)
    return found


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parent.parent)
    found = check_references(root)
    print("\n".join(found) or "no references outside the repository")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
