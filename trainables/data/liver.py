"""Liver CT layouts: LiTS and FLARE (docs/architecture.md "Models and data").

Both are one site per root; the files may sit in any sub-folder (the releases ship them in
batches: ``Training Batch 1/``, ``TrainingImg/`` + ``TrainingMask/``, ``images/`` + ``labels/``),
so the root is searched recursively and files are paired by name.

``lits``::

    <root>/**/volume-N.nii[.gz]         image (Hounsfield units)
    <root>/**/segmentation-N.nii[.gz]   0 background, 1 liver, 2 tumour  -> liver = label > 0

    ``test-volume-N`` files (no labels) are ignored.

``flare``::

    FLARE22: <root>/**/FLARE22_Tr_NNNN_0000.nii.gz (image), FLARE22_Tr_NNNN.nii.gz (labels)
    FLARE21: <root>/**/train_NNN_0000.nii.gz (image), train_NNN.nii.gz (labels)

    Labels 0..13 (FLARE22's 13 organs; FLARE21 uses 0..4); liver = label 1. Unlabelled
    images (``FLARE22_Ts_*``, ``validation_*``, ``Case_*``) are ignored.

Neither release has a labelled test split of its own: the cache splits 80/20 by case.
"""
from __future__ import annotations

import re
from pathlib import Path

from .base import Case, CaseFiles, DataError, ScannedLayout, check_root, file_problem, pair_problems
from .nifti import load_volume_case

__all__ = ["LiTS", "FLARE"]


class _PairedVolumes(ScannedLayout):
    """A one-site CT release whose image and label files are paired by name anywhere under the root."""

    modality = "ct"
    labels = ("liver",)
    name = ""
    site_name = ""
    #: one pattern for both roles, with groups ``case``, ``num`` and ``img`` (set for images)
    pattern: re.Pattern = re.compile("")
    expected = ""
    image_hint = ""
    mask_hint = ""
    allowed_labels: tuple[int, ...] = ()
    foreground: tuple[int, ...] | None = None

    def _files(self, root: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, int], list[str]]:
        root = check_root(root, f"Point it at the {self.site_name} folder holding {self.expected}.")
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        numbers: dict[str, int] = {}
        problems: list[str] = []
        for path in sorted(root.rglob("*")):
            m = self.pattern.match(path.name)
            if m is None or any(p.startswith(".") for p in path.relative_to(root).parts) or path.is_dir():
                continue
            bad = file_problem(path)  # a link loop, a broken link, an unreadable file: named as such
            if bad:
                problems.append(bad)
                continue
            case = m.group("case")
            role = images if m.group("img") else masks
            if case in role:
                kind = "image" if m.group("img") else "label"
                problems.append(f"{path}: a second {kind} file for {case} (first: {role[case]}). Keep one of them.")
                continue
            role[case], numbers[case] = path, int(m.group("num"))
        if not images and not masks:
            raise DataError(f"{root} holds no {self.site_name} files (expected {self.expected}, in any "
                            "sub-folder). Check the data root and the layout.")
        return images, masks, numbers, problems

    def sites(self, root: Path) -> list[str]:
        """``[site_name]`` when ``root`` holds this release (the release is one site)."""
        self._files(root)
        return [self.site_name]

    def scan_cases(self, root: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        """The paired cases (any site name: the release is one site) and the pairing problems."""
        images, masks, numbers, problems = self._files(root)
        problems += pair_problems(Path(root), images, masks, self.image_hint, self.mask_hint)
        order = sorted((c for c in images if c in masks), key=lambda c: (numbers[c], c))
        return [CaseFiles(site=site, case_id=c, image=images[c], mask=masks[c]) for c in order], problems

    def load_case(self, files: CaseFiles) -> Case:
        """Reads and checks one CT volume and its labels; the mask is the liver.

        Raises:
            DataError: unreadable file, not 3D, shape or orientation mismatch, non-finite or
                constant intensities, labels the release does not use, or no liver.
        """
        return load_volume_case(files, self.allowed_labels, self.foreground, self.labels[0])


class LiTS(_PairedVolumes):
    """LiTS: ``volume-N.nii`` / ``segmentation-N.nii``; liver = liver + tumour (label > 0)."""

    name = "lits"
    site_name = "LiTS"
    #: the case id is the number N (``volume-N`` / ``segmentation-N``)
    pattern = re.compile(r"^(?:(?P<img>volume)|segmentation)-(?P<case>(?P<num>\d+))\.nii(?:\.gz)?$")
    expected = "volume-N.nii + segmentation-N.nii"
    image_hint = "volume-{case}.nii"
    mask_hint = "segmentation-{case}.nii"
    allowed_labels = (0, 1, 2)
    foreground = None  # label > 0: liver plus tumour


class FLARE(_PairedVolumes):
    """FLARE21/FLARE22: ``<case>_0000.nii.gz`` image, ``<case>.nii.gz`` labels; liver = label 1."""

    name = "flare"
    site_name = "FLARE"
    pattern = re.compile(r"^(?P<case>(?:FLARE\d\d_Tr|train)_(?P<num>\d+))(?P<img>_0000)?\.nii(?:\.gz)?$")
    expected = ("FLARE22_Tr_NNNN_0000.nii.gz + FLARE22_Tr_NNNN.nii.gz (FLARE22) or train_NNN_0000.nii.gz + "
                "train_NNN.nii.gz (FLARE21)")
    image_hint = "{case}_0000.nii.gz"
    mask_hint = "{case}.nii.gz"
    allowed_labels = tuple(range(14))
    foreground = (1,)
