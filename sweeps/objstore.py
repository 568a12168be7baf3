"""Experiments on object storage: ``storage: s3://bucket/prefix`` (or ``gs://``, ``abfs://``, ... : any URI
``pyarrow.fs.FileSystem.from_uri`` opens), with no file system mounted on the nodes (docs/cluster.md
"Object storage").

Every stage reads and writes its experiment through plain paths (``trainables`` knows nothing of buckets),
so each process that touches an experiment on object storage works in a **node-local working copy**
(``Mirror``): the files it needs are downloaded into a temporary folder, the stage runs there, and what it
wrote is uploaded again. Who writes what never overlaps (a trial its own member's files, the driver the
merged tables and markers), so a copy never has to merge anything:

* the driver (``session``) downloads the experiment (not Ray Tune's stage folders, which Tune reads and
  writes itself through ``RunConfig(storage_path=..., storage_filesystem=...)``), uploads its own writes
  every few seconds and when it ends, and downloads the trials' records before each check (``refresh``);
* a trial (``trial_copy``) downloads what its member needs, writes its records and checkpoints to local
  disk (Ray uploads a checkpoint from there: ``Checkpoint.from_directory`` of a local folder), and
  uploads after every report and when it ends.

An upload puts the files that mark something complete last (a member's ``.member.json`` after its slices,
a stage's done marker, the frozen spec), and each object is written by one PUT, so a reader never takes a
half-written record for a whole one. A download lists a folder once (one ``ListObjectsV2`` per 1000 keys),
not each file.

Why our own copy rather than fsspec's or Ray's: the stages open their files by path (numpy memory maps,
pandas, torch) all over ``trainables``, which must stay free of storage concerns; a working copy keeps that
code as it is, and pyarrow's file system (already a dependency, the one Ray Train uses) does the transfers.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from .errors import StorageError
from .objfs import filesystem, is_remote  # noqa: F401 (used as objstore.X too)

#: the stages' folders: Ray Tune reads and writes them on the object store itself
TUNE_FOLDERS = ("pool", "uncertainty")
#: a working copy names its experiment's URI in this file (``sweeps.lock.driver_running`` reads it)
REMOTE_FILE = ".oodsweep-remote"
#: never copied: the driver's local lock and the checkpoint staging folder
LOCAL_ONLY = (".driver.lock", ".scratch", REMOTE_FILE)
#: the trial config key holding the experiment's URI (absent for an experiment on a local path)
STORAGE_KEY = "storage_uri"
#: files that mark something complete: uploaded after everything else
LAST = (".member.json", ".oodsweep-done", "spec.yaml")
SYNC_S = float(os.environ.get("OODSWEEP_SYNC_S", "5"))


def _last(rel: str) -> tuple[bool, str]:
    return rel.endswith(LAST), rel


def _local_only(rel: str) -> bool:
    parts = rel.split("/")
    return parts[0] in LOCAL_ONLY or any(p.startswith(".") and p.endswith(".tmp") for p in parts) \
        or parts[-1].startswith(".") and parts[-1] not in (".oodsweep-done", ".oodsweep-location")


class Mirror:
    """A node-local working copy ``local`` of the folder ``root`` on the pyarrow file system ``fs``."""

    def __init__(self, fs, root: str, local: Path):
        self.fs, self.root, self.local = fs, root.rstrip("/"), Path(local)
        self.known: dict[str, tuple[int, int]] = {}  # rel -> the local file's (size, mtime_ns) when in sync
        self.seen: dict[str, tuple[int, int]] = {}  # rel -> the remote object's (size, mtime_ns) we hold
        self._mutex = threading.Lock()

    def listing(self, sub: str = "") -> dict[str, object]:
        """Every object under ``root/sub`` (one recursive listing), by path relative to ``root``."""
        import pyarrow.fs as pafs

        base = f"{self.root}/{sub}".rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        n = len(self.root) + 1
        return {i.path[n:]: i for i in infos if i.type == pafs.FileType.File}

    def _stat(self, rel: str) -> tuple[int, int] | None:
        try:
            st = (self.local / rel).stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def pull(self, want: Callable[[str], bool] = lambda rel: True, sub: str = "") -> int:
        """Download the objects ``want`` accepts that changed remotely since the last pull; local edits win."""
        n = 0
        with self._mutex:
            for rel, info in sorted(self.listing(sub).items()):
                stamp = (info.size, info.mtime_ns or 0)
                if _local_only(rel) or not want(rel) or self.seen.get(rel) == stamp:
                    continue
                if rel in self.known and self._stat(rel) != self.known[rel]:
                    continue  # written here since: ours is newer, push uploads it
                dest = self.local / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.pull.tmp")
                with self.fs.open_input_stream(f"{self.root}/{rel}") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.replace(tmp, dest)
                self.seen[rel], self.known[rel] = stamp, self._stat(rel)
                n += 1
        return n

    def push(self, skip: Callable[[str], bool] = lambda rel: False) -> int:
        """Upload the local files that changed since they were last in sync (markers last); delete the
        objects of files removed here (e.g. set aside by ``sweeps.reconcile``)."""
        n = 0
        with self._mutex:
            here = {}
            for p in self.local.rglob("*"):
                rel = p.relative_to(self.local).as_posix()
                if p.is_file() and not _local_only(rel) and not skip(rel):
                    here[rel] = self._stat(rel)
            for rel in sorted((r for r, s in here.items() if s is not None and self.known.get(r) != s), key=_last):
                if getattr(self.fs, "type_name", "") == "local":  # (object stores have no folders to create)
                    self.fs.create_dir(f"{self.root}/{rel}".rsplit("/", 1)[0], recursive=True)
                with open(self.local / rel, "rb") as src, self.fs.open_output_stream(f"{self.root}/{rel}") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                self.known[rel] = here[rel]
                self.seen[rel] = self._remote_stamp(rel)  # (our own upload: never downloaded again)
                n += 1
            for rel in [r for r in self.known if r not in here and not skip(r)]:
                with contextlib.suppress(FileNotFoundError, OSError):
                    self.fs.delete_file(f"{self.root}/{rel}")
                self.known.pop(rel)
                self.seen.pop(rel, None)
        return n

    def _remote_stamp(self, rel: str) -> tuple[int, int]:
        info = self.fs.get_file_info(f"{self.root}/{rel}")
        return info.size, info.mtime_ns or 0


# ------------------------------------------------------------------ the driver's working copy

_copies: dict[str, Mirror] = {}  # str(local experiment folder) -> its mirror, for this process


def experiment_uri(storage: str, name: str) -> str:
    return f"{str(storage).rstrip('/')}/{name}"


def checkout(uri: str) -> Path:
    """Download the experiment at ``uri`` (not Tune's stage folders, only their done markers) into a new
    temporary folder; return the local experiment folder. Its later writes are uploaded by ``push``."""
    fs, root = filesystem(uri)
    _remove_orphans()
    local = Path(tempfile.mkdtemp(prefix=f"oodsweep-{os.getpid()}-")) / _last_part(root)
    local.mkdir()
    m = Mirror(fs, root, local)
    m.pull(lambda rel: rel.split("/")[0] not in TUNE_FOLDERS or rel.count("/") == 1 and rel.endswith("-done"))
    (local / REMOTE_FILE).write_text(uri + "\n")
    for stage in TUNE_FOLDERS:  # here only their done markers (Ray Tune keeps the rest on the store)
        (local / stage).mkdir(exist_ok=True)
    (local / "records" / "attempts").mkdir(parents=True, exist_ok=True)  # per-attempt files, no appends
    _copies[str(local)] = m
    import atexit

    atexit.register(release, local)  # a command's writes (e.g. `oodsweep analyze`'s) are uploaded at exit
    return local


def _remove_orphans() -> None:
    """Remove the working copies of processes that are gone (a driver killed with SIGKILL cannot)."""
    for d in Path(tempfile.gettempdir()).glob("oodsweep-*-*"):
        pid = d.name.split("-")[1]
        if not pid.isdigit() or not d.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def mirror_of(exp: Path) -> Mirror | None:
    return _copies.get(str(exp))


def move_remote(exp: Path, sub: str, dest: str, keep: Callable[[str], bool]) -> int:
    """On object storage: move the objects under ``<experiment>/<sub>/`` that ``keep`` (given the path below
    ``sub``) does not keep to ``<experiment>/<dest>/``, each a server-side copy, then a delete (object stores
    have no rename); return how many top-level files and folders moved. Ray Tune's stage folders live only
    there (``checkout`` never downloads them), so setting Tune's state aside
    (``sweeps.reconcile.retire_tune_state``) has to happen on the store. A local experiment (no working copy):
    0, nothing done."""
    m = _copies.get(str(exp))
    if m is None:
        return 0
    moved: dict[str, bool] = {}  # the top-level names moved -> whether each is a folder
    with m._mutex:
        for rel in sorted(m.listing(sub)):
            below = rel[len(sub) + 1:]
            if keep(below):
                continue
            m.fs.copy_file(f"{m.root}/{rel}", f"{m.root}/{dest}/{below}")
            m.seen.pop(rel, None)
            moved[below.split("/")[0]] = "/" in below
        for top, folder in moved.items():  # whole folders at once: no empty folder markers are left behind
            (m.fs.delete_dir if folder else m.fs.delete_file)(f"{m.root}/{sub}/{top}")
    return len(moved)


def refresh(spec) -> None:
    """Download the records the trials uploaded (one listing of ``records/``): call before reading them."""
    m = _copies.get(str(spec.experiment_dir)) if getattr(spec, "remote", None) else None
    if m is not None:
        m.pull(lambda rel: True, sub="records")


def push(exp: Path, final: bool = True) -> None:
    m = _copies.get(str(exp))
    if m is not None:  # MLflow's SQLite file only when it is closed (at the end): never a half-written one
        m.push(skip=(lambda rel: False) if final else (lambda rel: rel.startswith("mlflow.db")))


def release(exp: Path) -> None:
    """Upload what is left and remove the working copy."""
    m = _copies.pop(str(exp), None)
    if m is not None:
        try:
            m.push()
        finally:
            shutil.rmtree(m.local.parent, ignore_errors=True)


@contextlib.contextmanager
def session(spec) -> Iterator:
    """The driver's ``with`` block for ``spec``: unchanged for a local experiment; for one on object storage
    the spec placed on a fresh working copy, the driver's lock object held, its writes uploaded every
    ``$OODSWEEP_SYNC_S`` seconds (default 5) and when the block ends."""
    if not is_remote(spec.storage) or spec.location is not None and mirror_of(spec.experiment_dir) is None:
        yield spec
        return
    from dataclasses import replace

    from . import objlock

    uri = spec.remote or experiment_uri(spec.storage, spec.name)
    own = spec.location is None
    held = objlock.acquire(uri)
    try:
        if own:
            spec = replace(spec, location=checkout(uri), remote=uri)
        stop = threading.Event()

        def beat():
            while not stop.wait(SYNC_S):
                with contextlib.suppress(Exception):  # a failed upload is retried at the next beat
                    push(spec.experiment_dir, final=False)

        t = threading.Thread(target=beat, name="oodsweep-sync", daemon=True)
        t.start()
        try:
            yield spec
        finally:
            stop.set()
            t.join()
            (release if own else push)(spec.experiment_dir)
    finally:
        objlock.release(held)


# ------------------------------------------------------------------ a trial's working copy

def remap(value, old: str, new: str):
    """``value`` with every string under the folder ``old`` moved under ``new`` (dicts and lists too)."""
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old.rstrip("/")):]
    if isinstance(value, dict):
        return {k: remap(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [remap(v, old, new) for v in value]
    return value


@contextlib.contextmanager
def trial_copy(config: dict, want: Callable[[str], bool]) -> Iterator[tuple[dict, Callable[[], int]]]:
    """A trial's view of its experiment: ``(config, push)``. Local experiment: the config as it is and a
    no-op. On object storage: the files ``want`` accepts (under ``records/``) downloaded to a node-local
    temporary folder, the config's paths moved there, ``push`` uploading what the trial wrote (called after
    every report and when the block ends), the folder removed at the end."""
    uri = config.get(STORAGE_KEY)
    if not uri:
        yield config, lambda: 0
        return
    fs, root = filesystem(uri)
    _remove_orphans()  # (a trial killed with its driver leaves its copy: removed by the next one on this node)
    tmp = Path(tempfile.mkdtemp(prefix=f"oodsweep-{os.getpid()}-trial-"))
    local = tmp / _last_part(root)
    (local / "records" / "attempts").mkdir(parents=True)  # per-attempt files, no appends
    m = Mirror(fs, root, local)
    try:
        m.pull(want, sub="records")
        cfg = {k: v for k, v in config.items() if k not in (STORAGE_KEY, CACHE_KEY, EMBED_KEY)}
        if config.get(CACHE_KEY):  # the published slice cache, downloaded to this node once
            cfg["cache"] = str(fetch_cache(config[CACHE_KEY]))
            # the SAM embeddings a box-prompted pool trial (by its arch) or δ group (by its members) reads
            names = {config.get("arch")} | {p.get("member_id") for p in config.get("group") or ()}
            for uri in sorted({u for n, u in (config.get(EMBED_KEY) or {}).items() if n in names}):
                fetch_embeddings(uri, Path(cfg["cache"]))
        yield remap(cfg, config["experiment_dir"], str(local)), m.push
        m.push()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trial_keys(spec, cache: Path) -> dict:
    """The trial config keys of an experiment on object storage (none for a local one)."""
    if not getattr(spec, "remote", None):
        return {}
    uri = cache_uri(spec, cache)
    return {STORAGE_KEY: spec.remote, **({CACHE_KEY: uri} if uri else {})}


def tune_storage(spec, stage_dir: Path) -> dict:
    """Keyword arguments for Ray's ``RunConfig`` and ``Tuner.restore``/``can_restore``: ``storage_path`` (and
    ``storage_filesystem`` for an experiment on object storage), plus the stage folder ``path``."""
    rel = stage_dir.relative_to(spec.experiment_dir).as_posix()
    if not getattr(spec, "remote", None):
        return {"storage_path": str(spec.experiment_dir), "path": str(stage_dir)}
    fs, root = filesystem(spec.remote)
    return {"storage_path": root, "storage_filesystem": fs, "path": f"{root}/{rel}"}


# ------------------------------------------------------------------ the slice cache on object storage

#: the trial config key naming the published slice cache (absent for a cache on a shared or local path)
CACHE_KEY = "cache_uri"
#: written after every file of a published cache: readers take a cache only when it is there
PUBLISHED = "published.json"


def cache_uri(spec, cache: Path) -> str | None:
    """Where the slice cache of an experiment on object storage is published (``<storage>/.cache/slices/<key>``);
    None for a local experiment, or when ``data.cache_dir`` names a folder (the user's, shared by them)."""
    if not getattr(spec, "remote", None) or spec.data.cache_dir is not None:
        return None
    return f"{spec.storage}/.cache/slices/{Path(cache).name}"


def publish_cache(spec, cache: Path) -> str | None:
    """Upload the slice cache built on the driver's node, its file list ``published.json`` last (no rename
    on an object store: the list is the commit). A cache published before (same key: same content) is kept."""
    uri = cache_uri(spec, cache)
    if uri is not None:
        publish_folder(Path(cache), uri)
    return uri


def publish_folder(folder: Path, uri: str, replace: bool = False) -> None:
    """Upload every file of ``folder`` to ``uri``, then its file list ``published.json`` (the commit: readers
    take the folder only once the list is there). Already published: kept, unless ``replace`` (a cache that
    grew, e.g. SAM embeddings extended by rows; its new list is written last again)."""
    import json

    import pyarrow.fs as pafs

    fs, root = filesystem(uri)
    if not replace and fs.get_file_info(f"{root}/{PUBLISHED}").type == pafs.FileType.File:
        return
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != PUBLISHED}
    for rel in files:
        with open(folder / rel, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    with fs.open_output_stream(f"{root}/{PUBLISHED}") as out:
        out.write(json.dumps({"files": files}).encode())


def fetch_cache(uri: str) -> Path:
    """The published slice cache at ``uri`` in this node's temporary folder (downloaded once per node and key,
    then memory-mapped from local disk like any cache)."""
    return fetch_folder(uri, Path(tempfile.gettempdir()) / "oodsweep-cache" / _last_part(uri), "the slice cache")


def _last_part(uri: str) -> str:
    """The last component of a URI or of a path in a file system: a published folder's cache key, an experiment's
    name."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def fetch_folder(uri: str, local: Path, what: str, refresh: bool = False) -> Path:
    """The folder published at ``uri`` (``publish_folder``) downloaded to ``local`` on this node, once: a copy
    that is there is used as it is, or with ``refresh`` only while its file list equals the published one
    (else it is downloaded again and swapped in). A StorageError naming ``what`` when nothing is published."""
    import json

    fs, root = filesystem(uri)
    if (local / PUBLISHED).is_file() and not refresh:
        return local
    try:
        with fs.open_input_stream(f"{root}/{PUBLISHED}") as f:
            listing = f.read()
    except FileNotFoundError:
        raise StorageError(f"{what} {uri} is not published (no {PUBLISHED}): the driver uploads it before "
                           f"the trials start; run `oodsweep resume` again") from None
    if (local / PUBLISHED).is_file() and (local / PUBLISHED).read_bytes() == listing:
        return local
    files = json.loads(listing)["files"]
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}."))
    old = None
    try:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{root}/{rel}") as src, open(tmp / rel, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        (tmp / PUBLISHED).write_bytes(listing)  # last: this copy is whole
        if local.exists():  # an older copy (refresh): set aside, then replaced (open memory maps stay valid)
            old = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}.old."))
            os.rename(local, old / "copy")
        os.rename(tmp, local)  # (node-local disk: a rename is atomic here)
    except OSError:
        if not (local / PUBLISHED).is_file():  # another trial of this node finished first: theirs is the same
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return local


# ------------------------------------------------------------------ SAM embeddings on object storage

#: the trial config key naming the published SAM embedding caches (object storage only): ``{arch: uri}`` in the
#: pool's trials, ``{member id: uri}`` of the box-prompted members in the δ stage's
EMBED_KEY = "embeddings_uri"


def embeddings_uri(spec, key: str) -> str | None:
    """Where the SAM embedding cache ``key`` of an experiment on object storage is published
    (``<storage>/.cache/sam-embeddings/<key>``); None where the slice cache is not published (a local experiment,
    or ``data.cache_dir`` given: a folder every node sees)."""
    if not getattr(spec, "remote", None) or spec.data.cache_dir is not None:
        return None
    return f"{spec.storage}/.cache/sam-embeddings/{key}"


def fetch_embeddings(uri: str, cache: Path) -> Path:
    """The published SAM embedding cache at ``uri`` beside this node's copy of the slice cache ``cache``
    (``<cache>/../sam-embeddings/<key>``, where ``trainables.medsam.embeddings_root`` looks), downloaded when
    this node has none or an older one."""
    return fetch_folder(uri, Path(cache).parent / "sam-embeddings" / _last_part(uri), "the SAM embedding cache",
                        refresh=True)
