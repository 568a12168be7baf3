"""The experiment-directory records: the contract between stages (docs/architecture.md "Records").

Five modules, one concern each, re-exported here (``from trainables import records`` and
``from trainables.records import metric_by`` work as they always have):

* :mod:`.schema`: the tables' columns and types (``MEMBER_COLUMNS``, ``SLICE_COLUMNS``,
  ``UNCERTAINTY_COLUMNS``, ``UNCERTAINTY_SITE_COLUMNS``), ``conform``, and how older records read;
* :mod:`.store`: where they live under ``<experiment>/records/``, atomic writes, per-member parts
  and their merge, the attempts log, packed-bit predictions, the uncertainty stage's parts;
* :mod:`.metrics`: metrics from the confusion counts (``metric_by``, ``uncertain_area``);
* :mod:`.compact`: the uncertainty records read in bounded memory (``load_uncertainty_compact``);
* :mod:`.labels`: the label channels of multi-label records (``label_names``, ``select_label``).

The analysis imports this package only (no torch, no Ray); Table 4 is the analysis's
(``analysis.table4``).
"""
from __future__ import annotations

from .compact import (iter_uncertainty_batches, load_uncertainty_compact, read_uncertainty_file,
                      read_uncertainty_slice, uncertainty_file)
from .labels import label_names, select_label
from .metrics import (ALL_METRICS, LOWER_IS_BETTER, METRICS, MICRO_METRICS, SURFACE_METRICS, metric_by, surface_by,
                      uncertain_area)
from .schema import (LABEL_COLUMN, LEGACY_PROMPTED_ARCHS, MEMBER_COLUMNS, RECORDS_DIR, SLICE_COLUMNS,
                     SURFACE_COLUMNS, UNCERTAINTY_COLUMNS, UNCERTAINTY_LATER_COLUMNS, UNCERTAINTY_METHODS, UNCERTAINTY_SITE_COLUMNS,
                     UNCERTAINTY_SITE_LATER_COLUMNS, conform)
from .store import (BUDGET_DELTA_RECORDS, DEFAULT_DELTA_RECORDS, DELTA_RECORDS, RecordsError, clear_scratch, load_attempts, load_predictions, load_records, load_surface, load_uncertainty,
                    load_uncertainty_budget, load_uncertainty_budget_fits, load_uncertainty_fits, load_uncertainty_sites, log_attempt, member_part_ids, merge_parts,
                    predictions_path, records_dir, resolve_checkpoint, save_predictions, scratch_dir,
                    uncertainty_part_ids, write_member_part, write_surface_part, write_uncertainty_fit, write_uncertainty_part, write_uncertainty_sites)

__all__ = [
    # schema
    "RECORDS_DIR", "LEGACY_PROMPTED_ARCHS", "MEMBER_COLUMNS", "SLICE_COLUMNS", "LABEL_COLUMN", "UNCERTAINTY_METHODS",
    "UNCERTAINTY_COLUMNS", "UNCERTAINTY_LATER_COLUMNS", "UNCERTAINTY_SITE_COLUMNS",
    "UNCERTAINTY_SITE_LATER_COLUMNS", "SURFACE_COLUMNS", "conform",
    # store
    "RecordsError", "records_dir", "scratch_dir", "clear_scratch", "log_attempt", "load_attempts",
    "write_member_part", "member_part_ids", "resolve_checkpoint", "merge_parts", "load_records", "save_predictions",
    "predictions_path",
    "load_predictions", "write_uncertainty_sites", "write_uncertainty_fit", "load_uncertainty_fits",
    "load_uncertainty_sites", "write_uncertainty_part", "load_uncertainty_compact", "read_uncertainty_file", "iter_uncertainty_batches", "uncertainty_file", "read_uncertainty_slice", "uncertainty_part_ids", "load_uncertainty",
    "DEFAULT_DELTA_RECORDS", "BUDGET_DELTA_RECORDS", "DELTA_RECORDS", "load_uncertainty_budget",
    "load_uncertainty_budget_fits",
    "write_surface_part", "load_surface",
    # metrics
    "METRICS", "MICRO_METRICS", "ALL_METRICS", "metric_by", "uncertain_area", "SURFACE_METRICS", "LOWER_IS_BETTER",
    "surface_by",
    # labels
    "label_names", "select_label",
]
