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

The data types callers meet with a layout (:class:`~.base.DataError`, :class:`~.base.Case`,
:class:`~.base.CaseFiles`, :class:`~.base.Layout`) are re-exported here, so that
``from trainables.data.layouts import DataError, get_layout`` keeps one import line.
"""
from __future__ import annotations

from .base import Case, CaseFiles, DataError, Layout
from .fundus import FGADR, IDRiD
from .liver import FLARE, LiTS
from .prostate import ProstateMultisite

__all__ = ["LAYOUTS", "get_layout", "DataError", "Case", "CaseFiles", "Layout"]

#: Registry of dataset layouts, by name.
LAYOUTS: dict[str, Layout] = {
    "prostate_multisite": ProstateMultisite(),
    "idrid": IDRiD(),
    "fgadr": FGADR(),
    "lits": LiTS(),
    "flare": FLARE(),
}


def get_layout(name: str) -> Layout:
    """Looks a layout up in :data:`LAYOUTS`.

    Args:
        name: registry name, e.g. ``"prostate_multisite"``.

    Returns:
        The layout.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset layout {name!r}; valid layouts: {sorted(LAYOUTS)}. "
            "Fix data.layout in the spec."
        ) from None
