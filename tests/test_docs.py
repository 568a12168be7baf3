"""Every fenced code block of the documentation either runs in this test or names only commands that exist.

The files: ``README.md`` and every Markdown file under ``docs/``, ``deploy/`` and ``bench/``. Each block is
checked by the language tag after its opening fence:

* ``text``: output (what a command prints) or a diagram. Shown, not checked.
* ``yaml`` / ``yml``: parsed with ``yaml.safe_load_all``. A sweep spec (a mapping with ``name``) is validated
  by the project's own loader (``sweeps.spec.parse_spec``); a spec fragment (a mapping whose keys are all
  spec sections, such as a lone ``data:`` block) is validated the same way over a minimal spec. Each
  ``${VAR}`` points at a folder under a temporary directory, and a data folder the loader asks for is
  created there empty. Other YAML (a Kubernetes manifest, a cluster file) must parse.
* ``python``: executed, in a temporary working directory.
* ``csv``: read with :mod:`csv`; every row has the header's number of fields.
* ``bash`` / ``sh`` / ``shell``, and ``console`` (whose commands are the lines starting with ``$ ``): every
  command (the first word of a line and after ``&&``, ``||``, ``;``, ``|``, ``(``; environment assignments
  and ``sudo``/``time``/``then``/``do``-style prefixes skipped) must exist:

  - ``oodsweep <verb> [<verb>] ...``: a verb of the CLI's argparse parser, and every ``--option`` one that
    verb has;
  - ``make <target>``: a target of the Makefile;
  - ``python``/``python3``/``.venv/bin/python``: its script is a file of the repository, or ``-m`` names an
    importable module;
  - a path (``deploy/slurm/x.sbatch``, ``./x``): a file of the repository;
  - anything else: a shell builtin or keyword (``SHELL_WORDS``), on ``PATH``, a console script of an
    installed package (``ray``, ``mlflow``, ...), or one of ``EXTERNAL``: the cluster tools that cannot be
    installed here.
* any other tag, or none: fails, naming the tags above.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: Commands of cluster tools a user has on their cluster and this machine cannot install: Slurm's, Kubernetes'
#: and Helm's, the clouds' command lines, NVIDIA's driver tool, environment modules and container runtimes.
EXTERNAL = {"sbatch", "srun", "squeue", "scancel", "sinfo", "salloc", "scontrol", "sacct", "kubectl", "helm",
            "aws", "gcloud", "az", "nvidia-smi", "module", "apptainer", "singularity", "docker"}
SHELL_WORDS = {"cd", "export", "echo", "source", ".", "set", "unset", "test", "[", "true", "false", "exit",
               "wait", "read", "trap", "eval", "shift", "local", "return", "fi", "done", "esac", "}", "{",
               "pushd", "popd", "printf", "ulimit", "umask"}
PREFIXES = {"sudo", "time", "nohup", "exec", "then", "do", "else", "elif", "if", "while", "until", "!", "env"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "|&"}
REDIRECTS = {">", ">>", "<", "<<", ">&", "&>", "<&", "<<<", ">|"}
SHELL_TAGS = {"bash", "sh", "shell", "console"}
# (an `imported:` spec names a members table and prediction folders the reader has: such a block only parses)
SPEC_SECTIONS = {"name", "storage", "data", "pool", "search", "uncertainty", "analysis", "tracking", "runtime_env"}
TAGS = ["text", "yaml", "yml", "python", "csv", *sorted(SHELL_TAGS)]


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in ("docs", "deploy", "bench"):
        files += sorted((ROOT / top).rglob("*.md"))
    return [f for f in files if f.is_file()]


def blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, tag, text) of every fenced block."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, start, body = m.group(2), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m.group(1)):] if lines[i].startswith(m.group(1)) else lines[i])
            i += 1
        out.append((start, m.group(3).lower(), "\n".join(body)))
        i += 1
    return out


ALL_BLOCKS = [(f, line, tag, text) for f in doc_files() for line, tag, text in blocks(f)]


# ------------------------------------------------------------------ the things commands are checked against

def cli_parser() -> argparse.ArgumentParser:
    """The ``oodsweep`` parser, taken from ``sweeps.cli.main`` as it is about to parse (main builds it
    inline; catching it there checks the real parser, not a copy)."""
    from sweeps import cli

    class Caught(Exception):
        pass

    def catch(self, *a, **k):
        raise Caught(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        try:
            cli.main([])
        except Caught as e:
            return e.args[0]
    raise AssertionError("sweeps.cli.main never parsed its arguments")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for line in text.splitlines() if (m := re.match(r"^([\w.-]+(?:\s+[\w.-]+)*)\s*:(?!=)", line))
            for t in m.group(1).split()}


def console_scripts() -> set[str]:
    return {e.name for e in importlib.metadata.entry_points(group="console_scripts")}


class Context:
    def __init__(self):
        self.parser = cli_parser()
        self.targets = make_targets()
        self.scripts = console_scripts()


@pytest.fixture(scope="module")
def ctx() -> Context:
    return Context()


# ------------------------------------------------------------------ shell lines

def commands(text: str, tag: str) -> list[str]:
    """The block's command lines: continuations joined; for ``console``, the ``$ `` lines only."""
    lines, cur = [], ""
    for raw in text.splitlines():
        if tag == "console":
            if not raw.startswith("$ ") and not cur:
                continue
            raw = raw[2:] if raw.startswith("$ ") and not cur else raw
        cur += raw.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    if cur.strip():
        lines.append(cur.strip())
    return lines


def simple_commands(line: str) -> list[list[str]]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out, cur, skip_next = [], [], False
    for tok in lex:
        if skip_next:
            skip_next = False
            continue
        if tok in SEPARATORS:
            if cur:
                out.append(cur)
            cur = []
        elif tok in REDIRECTS:
            skip_next = True
        else:
            cur.append(tok)
    if cur:
        out.append(cur)
    return out


def check_command(words: list[str], ctx: Context) -> str | None:
    """Why this simple command does not exist, or None."""
    while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in PREFIXES):
        words = words[1:]
    if not words:
        return None
    cmd, args = words[0], words[1:]
    if cmd == "for":  # for x in ...; do: the loop's words are not commands
        return None
    if cmd in SHELL_WORDS:
        return None
    if cmd == "oodsweep" or cmd.endswith("/oodsweep"):
        return check_oodsweep(args, ctx)
    if cmd == "make":
        bad = [a for a in args if not a.startswith("-") and "=" not in a and a not in ctx.targets]
        return f"make target(s) {bad} not in the Makefile ({', '.join(sorted(ctx.targets))})" if bad else None
    if re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", cmd):
        return check_python(args)
    if "/" in cmd and not cmd.startswith(".venv/"):
        return None if (ROOT / cmd).is_file() else f"{cmd}: no such file in the repository"
    name = cmd.rsplit("/", 1)[-1]
    if (shutil.which(name) or (Path(sys.executable).parent / name).exists() or name in ctx.scripts
            or name in EXTERNAL):
        return None
    return (f"{cmd}: not a command here (not on PATH, not a console script of an installed package, not in "
            f"the allowlist of cluster tools {sorted(EXTERNAL)})")


def check_oodsweep(args: list[str], ctx: Context) -> str | None:
    args = [a.strip("[]") for a in args]
    parser, verbs = ctx.parser, []
    while (subs := subcommands(parser)):
        if not args or args[0] not in subs:
            got = args[0] if args else "nothing"
            return f"oodsweep {' '.join(verbs)} {got!r}: not a verb; the CLI has {', '.join(subs)}".replace("  ", " ")
        verbs.append(args[0])
        parser, args = subs[args[0]], args[1:]
    bad = [a.split("=")[0] for a in args if a.startswith("-") and a.split("=")[0] not in options(parser)]
    return (f"oodsweep {' '.join(verbs)}: no option(s) {bad}; it has {', '.join(sorted(options(parser)))}"
            if bad else None)


def check_python(args: list[str]) -> str | None:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c"):
        i += 1
    if i >= len(args) or args[i] == "-c":
        return None
    if args[i] == "-m":
        mod = args[i + 1] if i + 1 < len(args) else ""
        return None if mod and importlib.util.find_spec(mod) else f"python -m {mod}: no such module"
    return None if (ROOT / args[i]).is_file() else f"python {args[i]}: no such file in the repository"


def shell_problems(text: str, tag: str, ctx: Context) -> list[str]:
    problems = []
    for line in commands(text, tag):
        for words in simple_commands(line):
            why = check_command(words, ctx)
            if why:
                problems.append(f"{line!r}: {why}")
    return problems


# ------------------------------------------------------------------ YAML and Python

def check_yaml(text: str, tmp: Path) -> None:
    from sweeps.spec import SpecError, parse_spec

    for doc in yaml.safe_load_all(text):
        if not isinstance(doc, dict) or not set(doc) <= SPEC_SECTIONS:
            continue  # not a spec: parsing it was the check
        minimal = {
            "name": "docs-fragment", "data": {"layout": "prostate_multisite", "root": str(tmp / "data"),
                                              "source": "SiteA", "targets": ["SiteB"], "synthetic": {}},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"grid": [1]}}}
        # a fragment's sections replace the minimal spec's, but for `pool:`, whose keys go over the minimal
        # pool's (a fragment naming only `arch` keeps its lr and epochs)
        raw = doc if "name" in doc else {**minimal, **doc}
        if "name" not in doc and isinstance(doc.get("pool"), dict):
            raw["pool"] = {**minimal["pool"], **doc["pool"]}
        env = {**os.environ, **{v: str(tmp / v) for v in re.findall(r"\$\{(\w+)", text)}}
        for _ in range(20):
            try:
                parse_spec(raw, where="docs block", base_dir=tmp, env=env)
                break
            except SpecError as e:  # a data folder the spec names: made empty, then validate again
                m = re.search(r"folder (\S+?);? does not exist|: (\S+) does not exist; give the folder", str(e))
                folder = m and (m.group(1) or m.group(2))
                if not folder or not folder.startswith(str(tmp)):
                    raise
                Path(folder).mkdir(parents=True)
        else:
            raise AssertionError("the spec kept asking for folders")


def check_block(tag: str, text: str, ctx: Context, tmp: Path) -> list[str]:
    if tag == "text":
        return []
    if tag in ("yaml", "yml"):
        check_yaml(text, tmp)
        return []
    if tag == "python":
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            exec(compile(text, "<docs block>", "exec"), {"__name__": "__docs__"})
        finally:
            os.chdir(cwd)
        return []
    if tag == "csv":
        rows = list(csv.reader(text.splitlines()))
        return [f"csv row {i + 1} has {len(r)} fields, the header {len(rows[0])}"
                for i, r in enumerate(rows) if r and len(r) != len(rows[0])]
    if tag in SHELL_TAGS:
        return shell_problems(text, tag, ctx)
    return [f"code block tagged {tag or '(none)'!r}: tag it {', '.join(TAGS)} (text: output, not checked)"]


# ------------------------------------------------------------------ the tests

@pytest.mark.parametrize("path,line,tag,text", ALL_BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in ALL_BLOCKS])
def test_docs_code_block(path, line, tag, text, ctx, tmp_path):
    problems = check_block(tag, text, ctx, tmp_path)
    assert not problems, f"{path.relative_to(ROOT)}:{line}\n" + "\n".join(problems)


def test_the_docs_have_blocks_of_every_kind_checked():
    """The collection is not silently empty: the README's commands and the spec reference are read."""
    tags = {(p.relative_to(ROOT).as_posix(), t) for p, _, t, _ in ALL_BLOCKS}
    assert ("README.md", "bash") in tags and ("docs/spec.md", "yaml") in tags and ("README.md", "text") in tags


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


# hand-checkable cases: each rule can fail
def test_a_made_up_verb_fails(ctx):
    problems = shell_problems("oodsweep frobnicate sweeps/presets/demo.yaml", "bash", ctx)
    assert len(problems) == 1 and "'frobnicate': not a verb" in problems[0] and "run" in problems[0]
    assert "not a verb" in shell_problems("oodsweep data frob ROOT", "bash", ctx)[0]
    assert "no option(s) ['--turbo']" in shell_problems("oodsweep run SPEC.yaml [--turbo]", "bash", ctx)[0]
    assert shell_problems("oodsweep data check ROOT --layout NAME  # [--sites BMC,HK]", "bash", ctx) == []


def test_made_up_targets_files_and_commands_fail(ctx):
    text = "\n".join(["make demo && make frobnicate", "python bench/nowhere.py --smoke",
                      ".venv/bin/python -m no_such_module_here", "frobnicatectl start",
                      "deploy/nowhere/run.sh", "FOO=1 sudo frobnicatectl2 | grep x"])
    problems = shell_problems(text, "bash", ctx)
    assert len(problems) == 6, problems
    assert "['frobnicate']" in problems[0] and "bench/nowhere.py" in problems[1]
    assert "no_such_module_here" in problems[2] and "frobnicatectl:" in problems[3]
    assert "deploy/nowhere/run.sh" in problems[4] and "frobnicatectl2" in problems[5]


def test_what_passes(ctx):
    text = "\n".join([
        "export OODSWEEP_DATA=/data RAY_AUTH_MODE=token   # a comment",
        "python bench/anchor_gpu.py --smoke; .venv/bin/python -m pytest -q tests/test_docs.py",
        "ray job submit --address http://127.0.0.1:8265 -- oodsweep run SPEC.yaml > log.txt 2>&1",
        "sbatch --gres=gpu:1 x.sbatch && squeue -u $USER && kubectl apply -f x.yaml",
        "for f in a b; do echo $f; done",
        "git clone https://example.org/oodsweep.git \\", "  && cd oodsweep && make test"])
    assert shell_problems(text, "bash", ctx) == []
    assert shell_problems("$ make demo\n[oodsweep] done in 604s\n$ oodsweep status x", "console", ctx) == []
    assert "not a verb" in shell_problems("$ oodsweep frob", "console", ctx)[0]


def test_other_tags_and_bad_specs_fail(ctx, tmp_path):
    assert "tag it text, yaml" in check_block("", "make demo", ctx, tmp_path)[0]
    assert check_block("text", "anything at all $ frob", ctx, tmp_path) == []
    assert check_block("csv", "member,arch\nm1,unet_r18\n", ctx, tmp_path) == []
    assert "row 3 has 3 fields" in check_block("csv", "member,arch\nm1,unet_r18\nm2,x,y\n", ctx, tmp_path)[0]
    from sweeps.spec import SpecError
    with pytest.raises(SpecError, match="unet_r1000"):
        check_block("yaml", "pool:\n  arch: {grid: [unet_r1000]}\n  lr: {grid: [0.001]}\n  epochs: {grid: [1]}\n",
                    ctx, tmp_path)
    check_block("yaml", "data:\n  layout: prostate_multisite\n  root: ${SOME_ROOT}/x\n  source: A\n"
                        "  targets: [B]\n", ctx, tmp_path)  # a fragment: valid, its folder made
    with pytest.raises(yaml.YAMLError):
        check_block("yaml", "a: [1, 2", ctx, tmp_path)
    with pytest.raises(ZeroDivisionError):
        check_block("python", "1 / 0", ctx, tmp_path)
