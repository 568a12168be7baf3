"""The registry of dataset layouts (docs/architecture.md "Models and data"): it only imports the layout modules and
names them.

A *layout* knows three things about one dataset family: which sites live under a root folder,
which (image, mask) file pairs make up a site, and how to read one case into arrays (the protocol
and the shared checks: :mod:`.base`; NIfTI reading: :mod:`.nifti`).

One registry dict, :data:`LAYOUTS`; :func:`get_layout` looks a name up and lists the valid names
when it is unknown. Registered layouts:

``prostate_multisite`` (:mod:`trainables.data.prostate`)
    The multi-site prostate MR release of SAML / MS-Net, ``<root>/<SITE>/CaseNN[_segmentation].nii.gz``.

``idrid``, ``fgadr`` (:mod:`trainables.data.fundus`)
    2D colour fundus photographs with four lesion masks each (MA, HE, EX, SE): a multi-label
    task, one mask channel per lesion. A missing lesion mask file means the lesion is absent.

``lits``, ``flare`` (:mod:`trainables.data.liver`)
    Abdominal CT; liver = label > 0 in LiTS (liver plus tumour), label 1 in FLARE (FLARE21
    ``train_NNN[_0000]`` and FLARE22 ``FLARE22_Tr_NNNN[_0000]`` file names).

``nnunet``, ``decathlon`` (:mod:`trainables.data.nnunet`), ``folder2d`` (:mod:`trainables.data.folder2d`)
    A lab's own data as it is on disk: an nnU-Net v2 ``DatasetXXX_Name`` folder, a Medical Segmentation
    Decathlon ``TaskNN_Name`` folder, plain folders of 2D images and masks. These are *configured*: their
    channels, labels and sites depend on the dataset and on the spec's options (``data.sites_from``,
    ``data.channels``, ``data.labels``, ``data.label_values``, ``data.pixel_spacing``), so
    :func:`get_layout` with a root returns an instance for that dataset (:data:`CONFIGURED`).

The data types callers meet with a layout (:class:`~.base.DataError`, :class:`~.base.Case`,
:class:`~.base.CaseFiles`, :class:`~.base.Layout`) are re-exported here, so that
``from trainables.data.layouts import DataError, get_layout`` keeps one import line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .base import Case, CaseFiles, DataError, Layout
from .folder2d import Folder2D
from .fundus import FGADR, IDRiD
from .labelmap import cache_label_kind
from .liver import FLARE, LiTS
from .nnunet import Decathlon, NnUNet
from .prostate import ProstateMultisite

__all__ = ["LAYOUTS", "CONFIGURED", "LAYOUT_OPTIONS", "get_layout", "site_layout", "configured_ident", "DataError",
           "Case", "CaseFiles", "Layout"]

#: Registry of dataset layouts, by name.
LAYOUTS: dict[str, Layout] = {
    "prostate_multisite": ProstateMultisite(),
    "idrid": IDRiD(),
    "fgadr": FGADR(),
    "lits": LiTS(),
    "flare": FLARE(),
    "nnunet": NnUNet(),
    "decathlon": Decathlon(),
    "folder2d": Folder2D(),
}

#: The layouts configured per dataset root and spec options, and the options (``data.<key>``) each takes.
CONFIGURED: dict[str, tuple[str, ...]] = {n: LAYOUTS[n].OPTIONS for n in ("nnunet", "decathlon", "folder2d")}
#: Every layout option a spec may set.
LAYOUT_OPTIONS = ("sites_from", "channels", "labels", "label_values", "pixel_spacing")


def get_layout(name: str, root: str | Path | None = None, options: Mapping[str, Any] | None = None) -> Layout:
    """Looks a layout up in :data:`LAYOUTS`; a configured layout (:data:`CONFIGURED`) is set up for ``root``.

    Args:
        name: registry name, e.g. ``"prostate_multisite"``.
        root: the dataset root; configured layouts read their dataset description there (the
            fixed layouts ignore it).
        options: the spec's layout options (``sites_from``, ``channels``, ``labels``, ``label_values``,
            ``pixel_spacing``); only configured layouts take them.

    Returns:
        The layout.

    Raises:
        ValueError: unknown name (the message lists the valid names).
        DataError: options for a layout that takes none, or (configured layouts) a bad dataset description.
    """
    try:
        layout = LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset layout {name!r}; valid layouts: {sorted(LAYOUTS)}. "
            "Fix data.layout in the spec."
        ) from None
    if name not in CONFIGURED:
        if options:
            raise DataError(f"data.{sorted(options)[0]} applies to the layouts {sorted(CONFIGURED)} only, not "
                            f"{name}; remove it")
        return layout
    if root is None:
        return layout if not options else LAYOUTS[name].configured(None, options)
    return layout.configured(root, options)


def site_layout(lay: str, root: Path, options: Mapping | None = None):
    """The layout of a site: a configured one (:data:`.layouts.CONFIGURED`) set up for its root and ``options``."""
    return get_layout(lay, root, options) if lay in CONFIGURED else get_layout(lay)


def configured_ident(sources: Mapping[str, tuple[str, Path]], options: Mapping | None) -> dict:
    """What else a configured layout's cache depends on: the options, the site map's and dataset.json's stamps,
    the channels."""
    def stamp(p: Path) -> list:
        st = p.stat()
        return [str(p), st.st_size, st.st_mtime_ns]
    opts = dict(options or {})
    if opts.get("sites_from"):
        opts["sites_from"] = stamp(Path(opts["sites_from"]))
    lays = [site_layout(lay, r, options) for lay, r in sources.values()]
    return {"layout_options": opts, "channels": [list(getattr(x, "channel_names", ())) for x in lays],
            "descriptions": [stamp(x.json_path) for x in lays if getattr(x, "json_path", None)],
            "label_kind": cache_label_kind(lays, len(lays[0].labels))}
