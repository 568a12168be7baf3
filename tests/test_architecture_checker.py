"""tools/check_architecture.py on tiny synthetic projects written in tmp_path: each rule finds what it is
for (a cycle through a function-level import, a private import, a long module, a room broken) and a clean
project passes. (The real repository: the last test; docs/development.md, "Tests".)"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_architecture.py"


@pytest.fixture(scope="module")
def arch():
    spec = importlib.util.spec_from_file_location("check_architecture", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


#: A project that keeps every rule: relative and absolute imports, a submodule imported with
#: ``from . import x``, a package-private module used inside its package, analysis reading a records
#: package's submodule, sweeps importing both rooms, a module of exactly the line limit.
CLEAN = {
    "trainables/__init__.py": "",
    "trainables/records/__init__.py": "from .schema import COLUMNS\n",
    "trainables/records/schema.py": "COLUMNS = ['a']\n",
    "trainables/models.py": "from ._util import helper\nREGISTRY = {'m': helper}\n",
    "trainables/_util.py": "def helper():\n    return 1\n",
    "trainables/loops/__init__.py": "",
    "trainables/loops/dense.py": "from ..models import REGISTRY\nfrom . import common\n",
    "trainables/loops/common.py": "import trainables.models as models\nX = models.REGISTRY\n",
    "analysis/__init__.py": "from analysis.run import run\n",
    "analysis/run.py": "from trainables.records import schema\nfrom trainables.records.schema import COLUMNS\n"
                       "def run():\n    import json\n    return schema.COLUMNS\n",
    "sweeps/__init__.py": "",
    "sweeps/driver.py": "import ray\nfrom analysis import run\nfrom trainables.loops import dense\n"
                        "def go():\n    from sweeps import pool\n    return pool.__name__\n",
    "sweeps/pool.py": "from trainables.models import REGISTRY\n" + "\n" * 448 + "# line 450\n",
    "bench/speed.py": "from trainables.loops.dense import REGISTRY\nfrom sweeps.driver import go\n",
}


def test_a_clean_project_passes(arch, tmp_path):
    root = write(tmp_path, CLEAN)
    r = arch.check(root)
    assert (r.cycles, r.private, r.long, r.rooms) == ([], [], [], []) and r.violations == 0
    assert set(r.modules) >= {"trainables.records", "trainables.loops.dense", "bench.speed", "sweeps.pool"}
    assert r.modules["sweeps.pool"].lines == 450  # at the limit: allowed
    edges = {(i.source, i.target) for i in r.imports}
    # relative imports resolved; ``from . import common`` is the submodule, ``from analysis import run`` too
    assert {("trainables.loops.dense", "trainables.models"), ("trainables.loops.dense", "trainables.loops.common"),
            ("sweeps.driver", "analysis.run"), ("analysis.run", "trainables.records.schema"),
            ("trainables.records", "trainables.records.schema")} <= edges
    assert ("sweeps.driver", "sweeps.pool") in {(i.source, i.target) for i in r.imports if i.in_function}


def test_a_cycle_through_a_function_level_import_is_found(arch, tmp_path):
    root = write(tmp_path, {**CLEAN,
                            "trainables/loops/common.py": "def f():\n    from ..loops import dense\n"
                                                          "    return dense\n",
                            "trainables/segment.py": "from .medsam import train\n",
                            "trainables/medsam.py": "def train():\n    from . import segment\n"
                                                    "    return segment\n"})
    r = arch.check(root)
    comps = [c for c, _, _ in r.cycles]
    assert comps == [["trainables.loops.common", "trainables.loops.dense"], ["trainables.medsam", "trainables.segment"]]
    comp, cycle, edges = r.cycles[1]
    assert cycle in (["trainables.medsam", "trainables.segment", "trainables.medsam"],)
    assert [(i.source, i.line, i.in_function) for i in edges] == [("trainables.medsam", 2, True),
                                                                   ("trainables.segment", 1, False)]
    assert r.private == [] and r.rooms == []


def test_private_names_and_modules_imported_from_elsewhere_are_found(arch, tmp_path):
    root = write(tmp_path, {**CLEAN,
                            "trainables/segment.py": "def _write_member():\n    pass\nDEFAULTS = {}\n",
                            "trainables/medsam.py": "from .segment import DEFAULTS, _write_member\n"
                                                    "def f():\n    from . import segment\n"
                                                    "    return segment._write_member, segment.DEFAULTS\n",
                            "trainables/uncertainty.py": "import trainables.segment\n"
                                                         "X = trainables.segment._write_member\n",
                            "sweeps/pool.py": "from trainables._util import helper\nfrom trainables import _util\n"
                                              "from sweeps.driver import __name__ as n\n"})
    r = arch.check(root)
    text = "\n".join(r.private)
    assert len(r.private) == 5, text
    assert "trainables/medsam.py:1  trainables.medsam imports the private name '_write_member' of trainables.segment" in text
    assert "trainables/medsam.py:4" in text and "(in a function)" in text  # segment._write_member read in f()
    assert "trainables/uncertainty.py:2" in text                          # through the dotted module name
    assert text.count("sweeps/pool.py") == 2 and "private to trainables" in text
    assert "models.py" not in text and "__name__" not in text  # its own package's _util; dunders are public


def test_a_long_module_is_found(arch, tmp_path):
    root = write(tmp_path, {**CLEAN, "analysis/tables.py": "x = 1\n" * 451})
    r = arch.check(root)
    assert r.long == ["analysis/tables.py  451 lines (over 450)"] and r.violations == 1
    assert arch.check(root, max_lines=500).violations == 0


def test_room_rules_of_design_md(arch, tmp_path):
    root = write(tmp_path, {**CLEAN,
                            "trainables/segment.py": "def report():\n    import ray.tune\n"
                                                     "    from sweeps.driver import go\n",
                            "analysis/run.py": "from trainables.records import schema\nfrom trainables import models\n"})
    r = arch.check(root)
    text = "\n".join(r.rooms)
    assert len(r.rooms) == 3, text
    assert "trainables/segment.py:3  trainables.segment imports sweeps.driver: trainables/ may import only trainables" in text
    assert "trainables/segment.py:2  trainables.segment imports ray: trainables/ never imports ray" in text
    assert "analysis/run.py:2  analysis.run imports trainables.models: analysis/ may import only analysis, " \
           "trainables.records" in text
    assert not [x for x in r.rooms if x.startswith("sweeps/")]  # sweeps may import both other rooms (and Ray)


def test_tarjan_components_and_shortest_cycle(arch):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"d"}, "e": {"a"}, "f": set(), "g": {"h"}, "h": {"g", "b"}}
    assert arch.strongly_connected(graph) == [["a", "b", "c"], ["d"], ["g", "h"]]
    assert arch.shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert arch.shortest_cycle(graph, ["d"]) == ["d", "d"]
    chain = {str(i): {str(i + 1)} for i in range(3000)} | {"3000": {"0"}}  # deeper than the recursion limit
    assert len(arch.strongly_connected(chain)[0]) == 3001


def test_command_line_exit_status(tmp_path):
    clean = write(tmp_path / "clean", CLEAN)
    ok = subprocess.run([sys.executable, str(TOOL), "--root", str(clean)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("no violations"), ok.stdout + ok.stderr
    bad = write(tmp_path / "bad", {**CLEAN, "trainables/models.py": "def f():\n    from .loops import dense\n"})
    out = subprocess.run([sys.executable, str(TOOL), "--root", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "(a) import cycles: 1" in out.stdout and "1 violation(s)" in out.stdout
    assert "trainables/models.py:2  trainables.models -> trainables.loops.dense in a function" in out.stdout
    none = subprocess.run([sys.executable, str(TOOL), "--root", str(tmp_path / "nowhere")], capture_output=True,
                          text=True)
    assert none.returncode == 2 and "holds none of trainables, sweeps, analysis" in none.stderr


def test_this_repository_keeps_the_rules():
    """The bar on the project itself: no import cycle (imports inside functions counted), no private
    name imported from another module, no module over 450 lines, the rooms of docs/architecture.md "Rooms",
    no reference a clone cannot follow (tools/check_references.py)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(TOOL), "--root", str(root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------ (e) references a clone cannot follow
# The planted references are assembled from pieces, so that this file itself holds none of them.
UP = ".." + "/"
SIBLING = UP + "shared/x.md"           # a sibling checkout's file
MACHINE = "/" + "work/main/README.md"  # a workplace's absolute path


def references(arch, root: Path) -> list[str]:
    return arch.check_references(root)


def test_a_reference_to_a_sibling_folder_fails(arch, tmp_path):
    root = write(tmp_path, {"README.md": f"The figures: [anchors]({SIBLING}).\n",
                            "trainables/m.py": f"# measured in ``{SIBLING}``\n",
                            "docs/a.md": f"see `{UP}{UP}outside.md`\n"})
    found = references(arch, root)
    assert len(found) == 3, found
    assert found[0].startswith("README.md:1") and "leads outside the repository" in found[0]
    assert found[1].startswith("docs/a.md:1") and "leads outside" in found[1]
    # from trainables/ it lands inside the repository, on nothing; from the root it leaves: flagged
    assert found[2].startswith("trainables/m.py:1") and "names nothing in the repository" in found[2]


def test_relative_links_inside_the_repository_pass(arch, tmp_path):
    root = write(tmp_path, {"README.md": "# x\n", "sweeps/presets/demo.yaml": "name: demo\n",
                            "docs/a.md": f"[readme]({UP}README.md), [demo]({UP}sweeps/presets/demo.yaml)\n",
                            "sweeps/m.py": 'ROOT = Path(__file__).parent / ".."\nx = "a/' + UP + 'b"\n'})
    assert references(arch, root) == []


def test_an_absolute_machine_path_fails(arch, tmp_path):
    bad = [MACHINE, "sqlite:///" + MACHINE, "/" + "root/.cache/x", "/" + "home/alice/data",
           "/" + "Users/alice/x", "C:" + "\\Users\\alice", "/" + "tmp/pytest-of-alice/p0",
           "/" + "tmp/tmpab12cd_9/x", "/" + "var/folders/xy/T/z"]
    root = write(tmp_path, {"notes.md": "\n".join(f"see {b}" for b in bad) + "\n"})
    found = references(arch, root)
    assert [f.split()[0] for f in found] == [f"notes.md:{i}" for i in range(1, len(bad) + 1)], found


def test_deliberate_paths_pass(arch, tmp_path):
    ok = ["oodsweep demo --storage /tmp/x", "/dev/shm", "/etc/slurm/slurm.conf", "/proc/mounts",
          "sqlite:////abs/path/mlflow.db", "/home/ray/oodsweep", "/home/me/runs", "/mnt/oodsweep/runs",
          "https://example.org/" + "wo" + "rk/" + "ro" + "ot/home/alice", "~/.ray/auth_token", "$HOME/x", "/path/to/medsam_vit_b.pth",
          "<clone>" + "/oodsweep-runs/study", "/data/prostate", "/mnt/" + "work/x"]
    root = write(tmp_path, {"notes.md": "\n".join(ok) + "\n"})
    assert references(arch, root) == []


def test_cited_sections_must_exist(arch, tmp_path):
    cite = "docs/architecture" + ".md"
    files = {"m.py": f'"""Stage 1 ({cite} "Rooms", "Records")."""\n# ({cite} "Nowhere")\n'}
    assert "has no docs/architecture.md" in references(arch, write(tmp_path / "a", files))[0]
    files["docs/architecture.md"] = "# Architecture\n\n## Rooms\n\n## Records\n"
    found = references(arch, write(tmp_path / "b", files))
    assert len(found) == 1 and found[0].startswith("m.py:2") and '"Nowhere", not a section' in found[0], found


def test_git_files_only_and_binary_files_skipped(arch, tmp_path):
    root = write(tmp_path, {".gitignore": "runs/\n", "runs/log.txt": f"{MACHINE}\n", "a.md": "fine\n"})
    (root / "image.png").write_bytes(b"\x89PNG\0\0" + MACHINE.encode())
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    assert references(arch, root) == []  # ignored folder and binary file: not read
    (root / "new.md").write_text(f"{SIBLING}\n")  # untracked but not ignored: read
    assert [f.split()[0] for f in references(arch, root)] == ["new.md:1"]


def test_command_line_reports_references(tmp_path):
    root = write(tmp_path, {**CLEAN, "README.md": f"{MACHINE}\n"})
    out = subprocess.run([sys.executable, str(TOOL), "--root", str(root)], capture_output=True, text=True)
    assert out.returncode == 1 and "(e) references a clone cannot follow: 1" in out.stdout, out.stdout
    out = subprocess.run([sys.executable, str(TOOL), "--root", str(root), "--no-references"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout
