"""The errors the command line prints without a traceback, each with a prefix that says what kind of
problem it is (``oodsweep: <prefix>: <message>``) and its exit code.

Only a bad spec is ``invalid spec:``. The checks before launch that are about where a spec points
(the storage folder, the tracking store, the resources it asks for) subclass ``SpecError`` (a caller that
catches spec problems still catches them: they refuse the spec before anything launches) but print their
own prefix. Bad input data is ``trainables.data.base.DataError`` (prefix ``data``; ``trainables`` cannot
import this module).
"""
from __future__ import annotations

__all__ = ["ClusterError", "ExperimentError", "LockError", "OodsweepError", "ResourceError", "SpecError",
           "StorageError", "TrackingError"]


class OodsweepError(Exception):
    """An error whose message names the file, key or value and the fix; printed as ``oodsweep: prefix: msg``."""

    prefix = "error"
    exit_code = 1


class SpecError(OodsweepError, ValueError):
    """An invalid sweep spec. The message names the file, the key, the value and the fix."""

    prefix = "invalid spec"
    exit_code = 2


class StorageError(SpecError):
    """The storage folder (experiments, caches, the synthetic data) cannot be created or written."""

    prefix = "storage"


class TrackingError(SpecError):
    """The MLflow tracking store cannot be used."""

    prefix = "tracking"


class ResourceError(SpecError):
    """The spec needs more memory or disk than the machine (or the cluster's largest node) has."""

    prefix = "resources"


class ExperimentError(SpecError):
    """An experiment folder that is missing, not an experiment, or holds a damaged frozen spec."""

    prefix = "experiment"


class ClusterError(OodsweepError, RuntimeError):
    """The Ray cluster cannot be reached, or its nodes do not share the storage."""

    prefix = "cluster"


class LockError(OodsweepError, RuntimeError):
    """Another process (a running driver) holds the experiment."""

    prefix = "experiment in use"
