"""The uncertainty records read in bounded memory: whole as a compact frame, a batch at a time, or one slice's rows.

The analysis reads them a batch at a time (``iter_uncertainty_batches``) and keeps only their sums per case
(``analysis.uncertainty_cases``); ``load_uncertainty_compact`` gives every slice row in small types, for a reader
that needs the rows themselves.

``records/uncertainty.parquet`` holds one row per member x method x site x slice: at 2,000 members,
five methods, five sites and 500 slices that is 25 million rows, about 3.5 GiB as the ``string`` /
``int64`` frame ``load_uncertainty`` returns, and twice that while pyarrow converts it.
:func:`load_uncertainty_compact` returns the same values in a smaller frame:

* the five key columns as categoricals whose categories are sorted (so a sorted groupby keeps the
  order of the strings);
* the pixel counts as ``int32`` (``Int32`` where nullable) while every value fits in 30 bits (so a sum
  of two counts cannot overflow), else as they are stored;
* the float columns unchanged (``float64``: narrowing them would change the analysis's numbers).

It reads the file in batches into arrays allocated once, so the peak is the compact frame plus one
batch (pyarrow's ``iter_batches``; pandas has no batched parquet reader that keeps the codes across
batches). The merged file must be current: when it is missing or older than a part, the ordinary
``load_uncertainty`` rebuilds it first (the uncertainty stage's driver merges after the stage, so an
analysis normally finds it current).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import UNCERTAINTY_COLUMNS, with_later_columns
from .store import load_uncertainty, records_dir

#: The key columns read as categoricals.
KEY_COLUMNS = tuple(c for c, t in UNCERTAINTY_COLUMNS.items() if t == "string")
#: Rows per batch while reading (a few tens of MiB of arrays each).
BATCH_ROWS = 1 << 18
_INT32_SAFE = 1 << 30  # a count below this: a sum or difference of two stays within int32


def _merged_is_current(path, parts_dir) -> bool:
    """The merged file exists, holds exactly the parts' members and is newer than each part."""
    if not path.exists():
        return False
    ids = sorted(p.stem for p in parts_dir.glob("*.parquet"))
    if not ids:
        return True
    try:
        col = pq.read_table(path, columns=["member_id"], read_dictionary=["member_id"])["member_id"]
    except Exception:  # noqa: BLE001  (a damaged file: load_uncertainty says so and rebuilds it)
        return False
    have = set(pa.chunked_array([c.dictionary for c in col.chunks] or [pa.array([], pa.string())]).to_pylist())
    t = path.stat().st_mtime_ns
    return have == set(ids) and not any(parts_dir.joinpath(f"{i}.parquet").stat().st_mtime_ns > t for i in ids)


def _codes(arr: pa.DictionaryArray, cats: dict[str, int]) -> np.ndarray:
    """This batch's codes in ``cats`` (the values in order of first appearance; new ones are added); -1: null."""
    lut = np.array([cats.setdefault(v, len(cats)) for v in arr.dictionary.to_pylist()] or [0], dtype=np.int64)
    codes = lut[arr.indices.fill_null(0).to_numpy(zero_copy_only=False)]
    if arr.null_count:
        codes[arr.is_null().to_numpy(zero_copy_only=False)] = -1
    return codes


def _fits(dest: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``dest`` widened when ``values`` do not fit its type (codes past int16, counts past 30 bits)."""
    if dest.dtype == np.int16 and values.size and values.max() >= np.iinfo(np.int16).max:
        return dest.astype(np.int32)
    if dest.dtype == np.int32 and values.size and (values.max() >= _INT32_SAFE or values.min() <= -_INT32_SAFE):
        return dest.astype(np.int64)
    return dest


def read_uncertainty_file(path: str | os.PathLike, batch_rows: int = BATCH_ROWS) -> pd.DataFrame:
    """One uncertainty parquet file as the compact frame the module docstring describes."""
    pf = pq.ParquetFile(path, read_dictionary=[c for c in KEY_COLUMNS if c in pq.read_schema(path).names])
    names = [c for c in UNCERTAINTY_COLUMNS if c in pf.schema_arrow.names]
    n = pf.metadata.num_rows
    kinds = {c: UNCERTAINTY_COLUMNS[c] for c in names}
    data = {c: np.zeros(n, np.int16 if k == "string" else np.int32 if k in ("int64", "Int64") else np.float64)
            for c, k in kinds.items()}
    masks = {c: np.zeros(n, bool) for c, k in kinds.items() if k == "Int64"}
    cats: dict[str, dict[str, int]] = {c: {} for c, k in kinds.items() if k == "string"}
    at = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=names):
        end = at + batch.num_rows
        for c in names:
            col = batch.column(c)
            if c in cats:
                vals = _codes(col, cats[c])
            elif c in masks:
                masks[c][at:end] = col.is_null().to_numpy(zero_copy_only=False)
                vals = col.fill_null(0).to_numpy(zero_copy_only=False)
            else:
                vals = col.to_numpy(zero_copy_only=False)
            if data[c].dtype.kind == "i":
                data[c] = _fits(data[c], vals)
            data[c][at:end] = vals
        at = end
    out = {}
    for c in names:
        if c in cats:  # categories sorted: the order a groupby on the strings would give
            order = sorted(cats[c])
            rank = np.empty(len(order) + 1, np.int64)
            rank[[cats[c][v] for v in order]] = np.arange(len(order))
            rank[-1] = -1  # a null's code -1 indexes the last entry
            codes = rank[data.pop(c)]
            small = np.int8 if len(order) < np.iinfo(np.int8).max else np.int16 if len(order) < np.iinfo(np.int16).max \
                else np.int32
            out[c] = pd.Categorical.from_codes(codes.astype(small), categories=pd.Index(order, dtype="string"))
            del codes
        elif c in masks:
            out[c] = pd.arrays.IntegerArray(data.pop(c), masks.pop(c))
        else:
            out[c] = data.pop(c)
    pa.default_memory_pool().release_unused()  # the batches' buffers: back to the OS, not kept for later
    return with_later_columns(pd.DataFrame(out, copy=False))


def load_uncertainty_compact(experiment_dir: str | os.PathLike) -> pd.DataFrame | None:
    """``load_uncertainty``'s table as the compact frame the module docstring describes (same values,
    smaller types), or None if the uncertainty stage never ran."""
    merged = uncertainty_file(experiment_dir)
    if merged is None:
        return None
    try:
        return read_uncertainty_file(merged)
    except (OSError, pa.ArrowException):  # damaged: load_uncertainty names the file and the fix, or rebuilds it
        if load_uncertainty(experiment_dir) is None:
            return None
        return read_uncertainty_file(merged)


def iter_uncertainty_batches(path: str | os.PathLike, batch_rows: int | None = None):
    """One uncertainty parquet file as frames of at most ``batch_rows`` slice rows, in the file's order: the key
    columns as categoricals (each batch's own categories), the others as ``load_uncertainty`` types them, the later
    columns added where the file lacks them. For a reader that reduces each batch (``analysis.uncertainty_cases``)."""
    names = pq.read_schema(path).names
    pf = pq.ParquetFile(path, read_dictionary=[c for c in KEY_COLUMNS if c in names])
    cols = [c for c in UNCERTAINTY_COLUMNS if c in names]
    for batch in pf.iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=cols):
        df = batch.to_pandas()
        for c in cols:
            kind = UNCERTAINTY_COLUMNS[c]
            if kind == "Int64":
                df[c] = df[c].astype("Int64")
        yield with_later_columns(df)


def uncertainty_file(experiment_dir: str | os.PathLike):
    """The current merged uncertainty file of an experiment (rebuilt from the parts when it is missing, older than
    a part or damaged), or None if the uncertainty stage never ran."""
    rdir = records_dir(experiment_dir)
    merged, parts = rdir / "uncertainty.parquet", rdir / "uncertainty" / "parts"
    if not _merged_is_current(merged, parts):
        if load_uncertainty(experiment_dir) is None:  # rebuilds and writes the merged file from the parts
            return None
    try:
        pq.read_schema(merged)
    except (OSError, pa.ArrowException):  # damaged: load_uncertainty names the file and the fix, or rebuilds it
        if load_uncertainty(experiment_dir) is None:
            return None
    return merged


def read_uncertainty_slice(experiment_dir: str | os.PathLike, site: str, case_id: str, slice_idx: int,
                           method: str, columns: tuple[str, ...] = ("member_id", "uncertain_px", "area_px")
                           ) -> pd.DataFrame:
    """``columns`` of the uncertainty records of one slice and method, every member's, as plain values: the merged
    file is read a batch at a time and filtered (pyarrow's ``filters`` would read every column of every row group
    first: GiBs at 2,000 members); empty without records."""
    import pyarrow.compute as pc

    path = uncertainty_file(experiment_dir)
    if path is None:
        return pd.DataFrame(columns=list(columns))
    keys = ["method", "site", "case_id", "slice_idx"]
    pf = pq.ParquetFile(path, read_dictionary=[c for c in KEY_COLUMNS if c in pq.read_schema(path).names])
    found = []
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(dict.fromkeys([*keys, *columns]))):
        mask = pc.and_(pc.and_(pc.equal(batch.column("method").cast(pa.string()), method),
                               pc.equal(batch.column("site").cast(pa.string()), site)),
                       pc.and_(pc.equal(batch.column("case_id").cast(pa.string()), case_id),
                               pc.equal(batch.column("slice_idx"), int(slice_idx))))
        hit = batch.filter(mask)
        if hit.num_rows:
            found.append(hit.select(list(columns)))
    pa.default_memory_pool().release_unused()
    if not found:
        return pd.DataFrame(columns=list(columns))
    out = pa.Table.from_batches(found).to_pandas()
    for c in columns:
        if isinstance(out[c].dtype, pd.CategoricalDtype):
            out[c] = out[c].astype(str)
    return out
