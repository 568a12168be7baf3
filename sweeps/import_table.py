"""The members table of a pool trained elsewhere (``oodsweep import``): one CSV row per pool member.

Columns (a header row; order free; other columns are ignored):

==================  ========  ==========================================================================
column              required  meaning
==================  ========  ==========================================================================
``member_id``       yes       unique; letters, digits and ``_ . + = -`` (it names files and folders)
``run_id``          yes       the training run the member comes from (snapshots of one run share it);
                              the analysis' bootstrap resamples runs, not members
``arch``            yes       the architecture or family name (free text, e.g. ``nnunet_2d``)
``oracle_prompt``   yes       true when the member's predictions used labels (a box-prompted model fed
                              ground-truth boxes): left out of every label-free result
``lr``              no        learning rate (recorded as 0 when absent)
``epochs``          no        the epoch the member was taken at (0 when absent)
``seed``            no        its seed (0 when absent)
``predictions``     no        the member's prediction folder (relative to the CSV's folder, or absolute);
                              default ``<imported.predictions>/<member_id>``
==================  ========  ==========================================================================

``read_members_table`` checks it and raises ``SpecError`` naming the file, the row, the column and the fix.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from .spec_schema import SpecError

REQUIRED = ("member_id", "run_id", "arch", "oracle_prompt")
OPTIONAL = {"lr": 0.0, "epochs": 0, "seed": 0}
#: a member id names files and folders: no path separators, no leading dot
MEMBER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def read_members_table(path: str | Path) -> pd.DataFrame:
    """The members table at ``path``, checked: one row per member with the columns above (optional ones filled
    in, ``oracle_prompt`` a bool, ``predictions`` an absolute folder or empty).

    Raises:
        SpecError: the file is missing or unreadable, a required column is missing, a member id is empty,
            repeated or not folder-safe, a run id or arch is empty, ``oracle_prompt`` is not true/false, or
            lr/epochs/seed is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"imported.members: the members table {path} does not exist; write a CSV with the "
                        f"columns {', '.join(REQUIRED)} (optional: lr, epochs, seed, predictions)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as e:  # noqa: BLE001  (pandas raises several types for a malformed file)
        raise SpecError(f"{path}: cannot read it as CSV ({type(e).__name__}: {e}); the members table is a CSV "
                        f"with a header row naming {', '.join(REQUIRED)}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SpecError(f"{path}: missing column(s) {missing} (found {list(df.columns)}); the members table needs "
                        f"{', '.join(REQUIRED)} (optional: lr, epochs, seed, predictions)")
    if df.empty:
        raise SpecError(f"{path}: no members (only a header row); add one row per pool member")
    df = df.apply(lambda col: col.str.strip())

    def row(i: int) -> str:
        return f"{path}, row {i + 2}"  # the header is line 1

    for i, mid in enumerate(df["member_id"]):
        if not MEMBER_ID.fullmatch(mid):
            raise SpecError(f"{row(i)}: member_id {mid!r} is not a usable id (it names files and folders): use "
                            f"letters, digits and _ . + = - only, starting with a letter or digit")
    dup = df["member_id"][df["member_id"].duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        lines = [i + 2 for i in df.index[df["member_id"] == first]]
        raise SpecError(f"{path}: member_id {first!r} is repeated (lines {lines}); every member needs its own id")
    for col in ("run_id", "arch"):
        for i, v in enumerate(df[col]):
            if not v:
                raise SpecError(f"{row(i)}: {col} is empty for member {df['member_id'].iloc[i]!r}; give the "
                                f"{'training run the member comes from' if col == 'run_id' else 'architecture'}")
    flags = []
    for i, v in enumerate(df["oracle_prompt"]):
        low = v.lower()
        if low not in TRUE + FALSE:
            raise SpecError(f"{row(i)}: oracle_prompt {v!r} for member {df['member_id'].iloc[i]!r}: expected true or "
                            f"false (true: its predictions used ground-truth prompts, i.e. labels)")
        flags.append(low in TRUE)
    df["oracle_prompt"] = flags
    for col, fill in OPTIONAL.items():
        if col not in df.columns:
            df[col] = fill
            continue
        vals = []
        for i, v in enumerate(df[col]):
            try:
                x = float(v) if v else float(fill)
                if not math.isfinite(x) or (isinstance(fill, int) and x != int(x)):
                    raise ValueError
            except ValueError:
                kind = "an integer" if isinstance(fill, int) else "a number"
                raise SpecError(f"{row(i)}: {col} {v!r} for member {df['member_id'].iloc[i]!r}: expected {kind} "
                                f"(or leave it empty)") from None
            vals.append(int(x) if isinstance(fill, int) else x)
        df[col] = vals
    if "predictions" in df.columns:
        df["predictions"] = [str((path.parent / p).resolve()) if p else "" for p in df["predictions"]]
    else:
        df["predictions"] = ""
    return df[["member_id", "run_id", "arch", "oracle_prompt", "lr", "epochs", "seed", "predictions"]]
