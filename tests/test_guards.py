"""Guards before launch, as a careless or hostile user meets them: counts that must be positive, a spec that
cannot fit the machine, hostile YAML, a storage folder that cannot be written, a running driver, the
prefix of each kind of error and commands printed for copying (``docs/guards.md``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from sweeps import guards
from sweeps.cli import main
from sweeps.console import command
from sweeps.spec import SpecError, load_spec, parse_spec

from conftest import OODSWEEP

REPO = Path(__file__).resolve().parents[1]


def smoke_spec(storage: Path, **data) -> dict:
    """`oodsweep demo --smoke`'s spec (synthetic sites: sized from the spec, nothing to read)."""
    return {"name": "smoke", "storage": str(storage),
            "data": {"layout": "prostate_multisite", "root": str(storage / "data"), "source": "SiteA",
                     "targets": ["SiteB", "SiteC"], "image_size": 32, "test_fraction": 0.25,
                     "synthetic": {"cases_per_site": 4, "shape": [40, 40, 8]}, **data},
            "pool": {"arch": {"grid": ["unet_r18"]}, "lr": {"grid": [1e-3]}, "epochs": {"snapshots": [1, 2]},
                     "batch_size": 4},
            "uncertainty": {"epochs": 1, "passes": 2, "batch_size": 4, "baselines": []}}


def write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------ counts that must be positive

@pytest.mark.parametrize("cmd", [["run", "spec.yaml"], ["resume", "exp"], ["demo"]])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_num_cpus_below_one_is_refused_by_argparse(cmd, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    t = time.time()
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--num-cpus", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --num-cpus" in err and time.time() - t < 1
    assert ("must be >= 1, got" in err) if value != "two" else ("expected a whole number >= 1, got 'two'" in err)
    assert list(tmp_path.iterdir()) == []  # nothing frozen, no oodsweep-runs/


@pytest.mark.parametrize("path, value, words", [
    ("pool.resources.cpu", 0, "pool.resources.cpu: must be > 0, got 0"),
    ("pool.resources.cpu", -1, "pool.resources.cpu: must be > 0, got -1"),
    ("pool.resources.gpu", -0.5, "pool.resources.gpu: must be >= 0, got -0.5"),
    ("pool.resources.gpu", 1.5, "pool.resources.gpu: a share above one GPU must be a whole number"),
    ("pool.resources.per_arch", {"unet_r18": {"cpu": 0}}, "pool.resources.per_arch.unet_r18.cpu: must be > 0"),
    ("pool.max_concurrent_trials", 0, "pool.max_concurrent_trials: must be > 0"),
    ("uncertainty.workers", 0, "uncertainty.workers: must be > 0, got 0"),
    ("uncertainty.resources.cpu", 0, "uncertainty.resources.cpu: must be > 0"),
    ("uncertainty.trial_cpu", 0, "uncertainty.trial_cpu: must be > 0"),
    ("pool.training.loader_workers", -1, "pool.training.loader_workers: must be >= 0"),
])
def test_every_resource_key_is_checked_in_the_spec(tmp_path, path, value, words):
    raw = smoke_spec(tmp_path)
    *head, last = path.split(".")
    d = raw
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value
    with pytest.raises(SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(raw, where="my.yaml")


# ------------------------------------------------------------------ memory and disk before launch

def test_estimate_follows_the_stated_rule(tmp_path):
    spec = parse_spec(smoke_spec(tmp_path, image_size=64))
    est = guards.estimate(spec)
    assert est.slices == 3 * 4 * 8  # synthetic: sites x cases x depth, from the spec alone
    assert est.cache_bytes == 96 * 64 * 64 * 3  # float16 image + uint8 mask per pixel
    act = guards.ACT_FACTOR * guards.ARCH_COST["unet_r18"].act_bytes_per_px * 4 * 64 * 64
    assert est.pool_parts["activations"] == pytest.approx(act)
    big = guards.estimate(spec, image_size=128)
    assert big.pool_parts["activations"] == pytest.approx(4 * act) and big.cache_bytes == 4 * est.cache_bytes


def test_every_registered_architecture_has_a_cost():
    from trainables.models import MODELS

    assert set(MODELS) <= set(guards.ARCH_COST), "add the new architecture's line to sweeps.guards.ARCH_COST"


def test_a_spec_that_cannot_fit_memory_is_refused_with_the_numbers(tmp_path):
    spec = parse_spec(smoke_spec(tmp_path, image_size=4096))
    with pytest.raises(SpecError) as e:
        guards.check_resources(spec, memory=16 * guards.GiB)
    msg = str(e.value)
    assert type(e.value).prefix == "resources"
    assert msg.startswith("data.image_size 4096: one pool trial of unet_r18 (pool.batch_size 4) needs about")
    assert "the slice cache of 96 slices would take 4.5 GiB" in msg and "16.0 GiB of memory available" in msg
    fit = int(msg.split("Use data.image_size <= ")[1].split(",")[0])
    assert fit % 32 == 0 and fit < 4096
    guards.check_resources(parse_spec(smoke_spec(tmp_path, image_size=fit)), memory=16 * guards.GiB)  # it fits
    guards.check_resources(parse_spec(smoke_spec(tmp_path, image_size=64)), memory=16 * guards.GiB)


def test_a_spec_that_cannot_fit_the_disk_is_refused(tmp_path):
    raw = smoke_spec(tmp_path, image_size=1024)
    raw["data"]["synthetic"]["cases_per_site"] = 100_000
    spec = parse_spec(raw)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(SpecError, match=r"the experiment needs about .* of disk under .*slice cache") as e:
        guards.check_resources(spec, local=False)  # trials on a cluster: the disk is still this storage's
    assert f"{free / guards.GiB:.1f} GiB free" in str(e.value) or "MiB free" in str(e.value)
    assert not (tmp_path / "smoke").exists()


def test_a_trial_asking_more_cpus_than_the_local_ray_has_is_refused(tmp_path):
    raw = smoke_spec(tmp_path)
    raw["pool"]["resources"] = {"cpu": 4}
    with pytest.raises(SpecError, match="pool.resources.cpu asks for 4 CPUs per trial but the local Ray has 2"):
        guards.check_resources(parse_spec(raw), num_cpus=2)


def test_cluster_nodes_too_small_are_refused(tmp_path):
    spec = parse_spec(smoke_spec(tmp_path, image_size=2048))
    nodes = [{"Alive": True, "Resources": {"CPU": 8, "memory": 8 * guards.GiB}}]
    with pytest.raises(SpecError, match="the cluster's largest node has 8.0 GiB"):
        guards.check_nodes(spec, nodes)
    guards.check_nodes(parse_spec(smoke_spec(tmp_path, image_size=64)), nodes)


def test_image_size_4096_is_refused_in_seconds_before_anything_is_written(tmp_path, capsys):
    """The user's case: the smoke demo's data at image_size 4096 (4.5 GiB of slice cache, hundreds of GiB of
    activations): refused before synthetic data, the cache, the frozen spec or Ray."""
    spec = write(tmp_path / "big.yaml", smoke_spec(tmp_path / "runs", image_size=4096))
    t = time.time()
    rc = main(["run", str(spec), "--num-cpus", "2"])
    took = time.time() - t
    out, err = capsys.readouterr()
    assert rc == 2 and took < 5, (rc, took)
    assert err.startswith("oodsweep: resources: data.image_size 4096: one pool trial of unet_r18"), err
    assert "Use data.image_size <= " in err and "Traceback" not in err
    assert "starting a local Ray" not in out
    assert not (tmp_path / "runs").exists()  # no experiment folder, no synthetic sites, no cache
    import ray

    assert not ray.is_initialized()


# ------------------------------------------------------------------ hostile specs

BOMB = textwrap.dedent("""\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    name: ${BOOM:-x}
    data: {root: *i}
    """)


def test_billion_laughs_is_refused_in_bounded_time_and_memory(tmp_path):
    """The classic alias bomb (about 600 bytes, 10^9 strings once expanded), loaded by the real `load_spec` in a
    child process whose address space is capped at 512 MiB above what the imports took."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 700
    child = textwrap.dedent(f"""\
        import resource, sys, time
        from sweeps.spec import SpecError, load_spec
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.time()
        try:
            load_spec({str(bomb)!r})
        except SpecError as e:
            print("refused", round(time.time() - t, 3),
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, e)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.stdout.startswith("refused"), proc.stdout + proc.stderr[-2000:]
    _, secs, grew_kib, msg = proc.stdout.split(" ", 3)
    assert float(secs) < 2 and int(grew_kib) < 20_000, (secs, grew_kib)  # under 2 s, under 20 MB more RSS
    assert f"{bomb} at line 2: the YAML alias *a" in msg and "is not allowed in a spec file" in msg
    assert "write the value out" in msg


def test_alias_bomb_through_the_cli_names_the_file(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert main(["run", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"oodsweep: invalid spec: {bomb} at line 2: the YAML alias *a"), err


def test_big_deep_and_binary_spec_files_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * (1 << 20))
    t = time.time()
    with pytest.raises(SpecError, match=r"big.yaml: the spec file is larger than 1 MiB"):
        load_spec(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(SpecError, match=r"deep.yaml at line 1: mappings and lists nested more than 32 deep"):
        load_spec(deep)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="bin.yaml: the spec file is not UTF-8 text"):
        load_spec(binary)
    assert time.time() - t < 3
    anchors_only = tmp_path / "anchors.yaml"  # an anchor without an alias is harmless
    anchors_only.write_text("name: &n x\n")
    with pytest.raises(SpecError, match="data: is required"):
        load_spec(anchors_only)


def test_an_alias_in_a_frozen_spec_is_a_damaged_experiment(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "spec.yaml").write_text(BOMB)
    assert main(["status", str(exp)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"oodsweep: experiment: {exp / 'spec.yaml'} is damaged: at line 2: the YAML alias"), err


# ------------------------------------------------------------------ prefixes and quoted commands

def test_each_kind_of_error_has_its_prefix(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"oodsweep: experiment: {tmp_path / 'nowhere'} does not exist")
    raw = smoke_spec(tmp_path)
    raw["pool"]["lr"] = {"grid": [-1]}
    assert main(["run", str(write(tmp_path / "s.yaml", raw))]) == 2
    assert capsys.readouterr().err.startswith(f"oodsweep: invalid spec: {tmp_path / 's.yaml'}: pool.lr.grid[0]")
    assert main(["data", "check", str(tmp_path / "no-data"), "--layout", "prostate_multisite"]) == 1
    assert "ERROR: data root" in capsys.readouterr().out
    empty = tmp_path / "empty-site" / "SiteA"
    empty.mkdir(parents=True)
    (empty / "Case01.nii.gz").write_bytes(b"not nifti")
    (empty / "Case01_segmentation.nii.gz").write_bytes(b"not nifti")
    prep = smoke_spec(tmp_path / "runs")
    prep["data"] = {"layout": "prostate_multisite", "root": str(tmp_path / "empty-site"), "source": "SiteA",
                    "targets": ["SiteB"]}
    assert main(["data", "prepare", str(write(tmp_path / "p.yaml", prep))]) == 2
    assert capsys.readouterr().err.startswith("oodsweep: data: ")


def test_printed_commands_are_shell_quoted(tmp_path, capsys):
    assert command("oodsweep", "resume", "/runs/my sweep") == "oodsweep resume '/runs/my sweep'"
    assert command("mlflow", "ui", "--backend-store-uri", "sqlite:////a b/mlflow.db") == \
        "mlflow ui --backend-store-uri 'sqlite:////a b/mlflow.db'"
    exp = tmp_path / "my runs" / "demo"
    exp.mkdir(parents=True)
    (exp / "spec.yaml").write_text("name: demo\n")
    assert main(["run", str(exp)]) == 2  # an experiment folder given as a spec: the hint to resume it
    assert f"`oodsweep resume '{exp}'`" in capsys.readouterr().err


# ------------------------------------------------------------------ storage

def test_storage_under_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    spec = write(tmp_path / "s.yaml", smoke_spec(blocker / "runs"))
    assert main(["run", str(spec), "--num-cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"oodsweep: storage: storage {blocker / 'runs' / 'smoke'}: cannot write there (ENOTDIR"), err
    assert "a part of the path is a file, not a folder" in err and "Traceback" not in err


def _read_only_run(storage: Path, *args: str) -> subprocess.CompletedProcess:
    """``oodsweep *args`` with ``storage`` a read-only file system: a read-only tmpfs mounted in a private
    mount namespace (``unshare``: as root it needs no set-up, as another user an unprivileged user
    namespace), so nothing stays mounted after the process; without unshare, a user other than root gets a
    folder without write permission (root writes through those)."""
    storage.mkdir(parents=True, exist_ok=True)
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        ro = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && exec "$@"',
              str(storage), *OODSWEEP, *args]
        return subprocess.run(ro, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert os.geteuid() != 0, "as root this test needs `unshare -rm` (util-linux, user namespaces) for a read-only mount"
    storage.chmod(0o555)
    return subprocess.run([*OODSWEEP, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_read_only_storage_names_the_folder_the_error_and_the_fix(tmp_path):
    storage = tmp_path / "read only"
    t = time.time()
    proc = _read_only_run(storage, "demo", "--smoke", "--storage", str(storage), "--num-cpus", "1")
    took = time.time() - t
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert err.startswith(f"oodsweep: storage: storage {storage / 'demo-smoke'}: cannot write there (E"), err
    assert ("EROFS: Read-only file system; it is on a read-only file system" in err
            or "EACCES: Permission denied" in err), err
    assert "Choose a folder you can write to" in err and "--storage" in err and "Nothing was written" in err
    assert "Traceback" not in err and "starting a local Ray" not in proc.stdout and took < 60


@pytest.mark.slow  # tens of seconds: the synthetic sites are generated until the disk is full
def test_a_disk_that_fills_up_mid_command_is_a_storage_error(tmp_path):
    """`data prepare` on a 256 kB file system: writable at the start (the check passes), full while the synthetic
    sites are written; the message names ENOSPC, what it means and the fix, without a traceback (the file only
    where the library reports it: nibabel's gzip writer does not)."""
    storage = tmp_path / "small disk"
    storage.mkdir()
    spec = write(tmp_path / "s.yaml", smoke_spec(storage))
    cmd = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$@"', str(storage),
           *OODSWEEP, "data", "prepare", str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    err = proc.stderr
    assert proc.returncode == 1 and err.startswith("oodsweep: storage: "), err[-3000:]
    assert "ENOSPC: No space left on device (its disk is full)" in err and "Traceback" not in err
    assert "oodsweep resume EXPERIMENT_DIR" in err
