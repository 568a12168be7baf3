#!/usr/bin/env python3
"""The house rules of oodsweep's code, checked from the source: ``python tools/check_architecture.py``.

Every module of the project's packages (``trainables/``, ``sweeps/``, ``analysis/``; the ``bench/`` scripts
too unless ``--no-bench``) is parsed with :mod:`ast`, never imported, and every ``import`` statement is
collected, the ones inside functions and classes included (a function-level import is how a cycle hides).
Relative imports are resolved; ``from pkg import x`` where ``x`` is a submodule counts as importing that
submodule, otherwise as importing ``pkg``. ``import a.b.c`` counts as importing ``a.b.c`` only (not the
parent packages' ``__init__``, which every package import runs and which would make every package a cycle
with its modules). Imports under ``if TYPE_CHECKING:`` count too: they are a dependency of the design even
where they do not run.

Reported, each with the file and line:

(a) import cycles among project modules: the strongly connected components of the import graph
    (Tarjan's algorithm, written here because the standard library's ``graphlib`` only reports that a
    cycle exists, not all of them, and networkx is not a dependency), each with one shortest cycle and
    every import that closes it;
(b) a private name (``_x``, not a dunder) of a project module imported by another module: ``from m import
    _x``, or ``m._x`` read through an imported module. A private *module* (``pkg._m``) may be imported by
    the modules of its own package, not from outside it;
(c) project modules over ``--max-lines`` lines (450);
(d) the rooms (docs/architecture.md "Rooms"): ``trainables`` imports neither ``sweeps`` nor ``analysis`` and
    never Ray (trainables run on machines without Ray); ``analysis`` imports, of the project, only
    ``trainables.records`` (and its submodules, should it become a package) besides itself; ``sweeps`` may
    import both; the bench scripts have no room rule;
(e) references a clone of the repository cannot follow, in every text file the repository holds: a
    ``../`` path leading outside it, a developer machine's absolute path (home folders, a workplace's
    top folder, temporary folders of one run), a cited section of docs/architecture.md it does not have.
    The exact patterns are listed in ``tools/check_references.py``, which does this part
    (``--no-references`` leaves it out).

Exit status 0 when there is nothing to report, 1 when there is (the list is printed), 2 on a usage error.
Only the standard library is used, so the check runs before the project's environment is installed.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_references import check_references  # noqa: E402  (this folder's other checker)

PACKAGES = ("trainables", "sweeps", "analysis")
SCRIPT_DIRS = ("bench",)
MAX_LINES = 450

#: docs/architecture.md "Rooms". room -> (project modules it may import, by prefix; None: any), and third-party
#: top-level packages it must not import.
ROOMS: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]] = {
    "trainables": (("trainables",), ("ray",)),
    "analysis": (("analysis", "trainables.records"), ()),
    "sweeps": (None, ()),
}


@dataclass(frozen=True)
class Module:
    name: str        # dotted, e.g. "trainables.data.cache"; a package is its __init__
    path: Path
    lines: int
    is_package: bool


@dataclass(frozen=True)
class Import:
    source: str          # the importing module
    target: str          # the project module imported (the most specific one that exists)
    line: int
    in_function: bool    # inside a function or method (runs on call, not on import)
    name: str | None = None  # a name taken from ``target`` that is not a submodule (from-imports, m.x)


@dataclass
class Report:
    modules: dict[str, Module]
    imports: list[Import]
    cycles: list[tuple[list[str], list[str], list[Import]]]   # (component, one cycle, the imports inside it)
    private: list[str]
    long: list[str]
    rooms: list[str]
    refs: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return len(self.cycles) + len(self.private) + len(self.long) + len(self.rooms) + len(self.refs)


# ----------------------------------------------------------------------------------------- discovery

def discover(root: Path, packages=PACKAGES, script_dirs=SCRIPT_DIRS) -> dict[str, Module]:
    """The project's modules under ``root``: every ``*.py`` of each package (recursively; a folder's
    ``__init__.py`` is the package itself) and each script folder's ``*.py`` as ``<folder>.<stem>``."""
    mods: dict[str, Module] = {}
    for top in (*packages, *script_dirs):
        base = root / top
        if not base.is_dir():
            continue
        files = sorted(base.rglob("*.py")) if top in packages else sorted(base.glob("*.py"))
        for path in files:
            rel = path.relative_to(root).with_suffix("")
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            parts = list(rel.parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            name = ".".join(parts)
            text = path.read_text(encoding="utf-8")
            mods[name] = Module(name, path, len(text.splitlines()), is_pkg)
    return mods


def _longest_module(dotted: str, mods: dict[str, Module]) -> str | None:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mods:
            return ".".join(parts[:i])
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Collector(ast.NodeVisitor):
    """Every import of a project module in one module's tree, and every ``m._x`` read through one."""

    def __init__(self, module: Module, mods: dict[str, Module]):
        self.m, self.mods = module, mods
        self.pkg = module.name if module.is_package else module.name.rpartition(".")[0]
        self.depth = 0
        self.imports: list[Import] = []
        self.external: list[tuple[str, int, bool]] = []   # (top-level package, line, in a function)
        self.bound: dict[str, str] = {}                   # local name -> project module it is bound to

    # functions: their imports run when called, but they are imports all the same
    def _scope(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def _add(self, target: str, line: int, name: str | None = None) -> None:
        self.imports.append(Import(self.m.name, target, line, self.depth > 0, name))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _longest_module(alias.name, self.mods)
            if target is None:
                self.external.append((alias.name.split(".")[0], node.lineno, self.depth > 0))
                continue
            self._add(target, node.lineno)
            if alias.asname:
                self.bound[alias.asname] = target
            else:  # ``import a.b.c`` binds ``a``; attribute chains are resolved in visit_Attribute
                self.bound[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.pkg.split(".") if self.pkg else []
            if node.level - 1 > len(base):
                return  # beyond the top: Python raises; nothing to record
            base = base[: len(base) - (node.level - 1)]
            dotted = ".".join(base + (node.module.split(".") if node.module else []))
        else:
            dotted = node.module or ""
        target = _longest_module(dotted, self.mods) if dotted else None
        if target is None or target != dotted:  # not a project module (a partial match: a missing module)
            if not node.level:
                self.external.append((dotted.split(".")[0], node.lineno, self.depth > 0))
            return
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in self.mods:  # a submodule
                self._add(sub, node.lineno)
                self.bound[alias.asname or alias.name] = sub
            else:
                self._add(target, node.lineno, alias.name if alias.name != "*" else None)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, cur = [node.attr], node.value
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in self.bound:
            dotted = [self.bound[cur.id], *reversed(chain)]
            full = ".".join(dotted)
            mod = _longest_module(full, self.mods)
            if mod is not None and mod.count(".") >= self.bound[cur.id].count("."):
                rest = full[len(mod) + 1:].split(".") if full != mod else []
                if rest and rest[0] and _private(rest[0]):
                    self._add(mod, node.lineno, rest[0])
            return  # the chain is handled; do not visit its inner attributes again
        self.generic_visit(node)


def collect(mods: dict[str, Module]) -> tuple[list[Import], list[tuple[str, str, int, bool]]]:
    """All project imports and all third-party imports ``(module, top package, line, in function)``."""
    imports, external = [], []
    for m in mods.values():
        c = _Collector(m, mods)
        c.visit(ast.parse(m.path.read_text(encoding="utf-8"), filename=str(m.path)))
        imports += [i for i in c.imports if i.target != m.name]
        external += [(m.name, top, line, fn) for top, line, fn in c.external]
    return imports, external


# ----------------------------------------------------------------------------------------- the graph

def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative, so no recursion limit), each sorted; the
    components of more than one module and those with an edge to themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in graph.get(v, ()):
                        out.append(sorted(comp))
    return sorted(out)


def shortest_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), as [a, b, ..., a]."""
    start, inside = comp[0], set(comp)
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w not in inside:
                continue
            if w == start:  # back at the start: the path to v, then the closing import
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return [start, start]


# ----------------------------------------------------------------------------------------- the rules

def _room(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in ROOMS else None


def _allowed(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def check(root: Path, packages=PACKAGES, script_dirs=SCRIPT_DIRS, max_lines: int = MAX_LINES,
          references: bool = True) -> Report:
    mods = discover(root, packages, script_dirs)
    imports, external = collect(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for i in imports:
        graph[i.source].add(i.target)
    cycles = []
    for comp in strongly_connected(graph):
        inside = set(comp)
        edges = sorted({i for i in imports if i.source in inside and i.target in inside},
                       key=lambda i: (i.source, i.line, i.target))
        cycles.append((comp, shortest_cycle(graph, comp), edges))

    def where(i: Import) -> str:
        return f"{_rel(mods[i.source].path, root)}:{i.line}"

    private = []
    for i in imports:
        if i.name is not None and _private(i.name):
            private.append(f"{where(i)}  {i.source} imports the private name {i.name!r} of {i.target}"
                           f"{' (in a function)' if i.in_function else ''}")
            continue
        # a private module, imported from outside the package that holds it
        parts = i.target.split(".")
        for k, part in enumerate(parts):
            owner = ".".join(parts[:k])
            if _private(part) and not (i.source == owner or i.source.startswith(owner + ".")):
                private.append(f"{where(i)}  {i.source} imports {i.target}, private to {owner or 'the top level'}")
                break

    long = [f"{_rel(m.path, root)}  {m.lines} lines (over {max_lines})"
            for m in sorted(mods.values(), key=lambda m: -m.lines) if m.lines > max_lines]

    rooms = []
    for i in imports:
        room = _room(i.source)
        if room is None or ROOMS[room][0] is None:
            continue
        if not _allowed(i.target, ROOMS[room][0]):
            rooms.append(f"{where(i)}  {i.source} imports {i.target}: {room}/ may import only "
                         f"{', '.join(ROOMS[room][0])} of the project (docs/architecture.md \"Rooms\")"
                         f"{' (in a function)' if i.in_function else ''}")
    for source, top, line, fn in external:
        room = _room(source)
        if room is not None and top in ROOMS[room][1]:
            rooms.append(f"{_rel(mods[source].path, root)}:{line}  {source} imports {top}: {room}/ never "
                         f"imports {', '.join(ROOMS[room][1])} (docs/architecture.md \"Rooms\")"
                         f"{' (in a function)' if fn else ''}")
    return Report(mods, imports, cycles, private, long, rooms, check_references(root) if references else [])


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def format_report(r: Report, root: Path) -> str:
    tops = sorted({m.split(".")[0] for m in r.modules})
    out = [f"check_architecture: {len(r.modules)} modules in {', '.join(tops)}; {len(r.imports)} project "
           f"imports ({sum(i.in_function for i in r.imports)} inside functions)"]
    out.append(f"(a) import cycles: {len(r.cycles)}")
    for comp, cyc, edges in r.cycles:
        out.append(f"  {len(comp)} modules: {', '.join(comp)}")
        out.append(f"    e.g. {' -> '.join(cyc)}")
        names: dict[tuple, list[str]] = {}  # one line per import statement, with the names it takes
        for i in edges:
            names.setdefault((i.source, i.line, i.target, i.in_function), []).extend([i.name] if i.name else [])
        for (src, line, tgt, fn), taken in names.items():
            out.append(f"    {_rel(r.modules[src].path, root)}:{line}  {src} -> {tgt}"
                       f"{' (' + ', '.join(taken) + ')' if taken else ''}{' in a function' if fn else ''}")
    for title, items in (("(b) private names imported from another module", r.private),
                         ("(c) modules over the line limit", r.long), ("(d) room rules broken", r.rooms),
                         ("(e) references a clone cannot follow", r.refs)):
        out.append(f"{title}: {len(items)}")
        out += [f"  {x}" for x in items]
    out.append(f"{r.violations} violation(s)" if r.violations else "no violations")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the repository root (default: the one this script is in)")
    ap.add_argument("--max-lines", type=int, default=MAX_LINES, help=f"longest module allowed (default {MAX_LINES})")
    ap.add_argument("--no-bench", action="store_true", help="leave the bench/ scripts out")
    ap.add_argument("--no-references", action="store_true", help="leave out (e), the reference check")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if not any((root / p).is_dir() for p in PACKAGES):
        print(f"check_architecture: --root {root} holds none of {', '.join(PACKAGES)}; "
              f"give the repository root", file=sys.stderr)
        return 2
    report = check(root, PACKAGES, () if args.no_bench else SCRIPT_DIRS, args.max_lines,
                   references=not args.no_references)
    print(format_report(report, root))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
