"""The multi-site prostate MR layout of SAML / MS-Net (``prostate_multisite``, docs/architecture.md "Models and data")::

    <root>/<SITE folder>/CaseNN.nii.gz
    <root>/<SITE folder>/CaseNN_segmentation.nii.gz   (or CaseNN_Segmentation, or .nii)

Site names map to folders through :data:`PROSTATE_SITE_FOLDERS` (``BMC`` -> ``ISBI_1.5``,
``RUNMC`` -> ``ISBI``); any other site name (``BIDMC``, ``HK``, ``I2CVB``, ``UCL``, synthetic
``SiteA`` ...) is its own folder name. Masks may use labels 1 and 2 (two prostate zones);
prostate = label > 0; other labels are an error.
"""
from __future__ import annotations

import re
from pathlib import Path

from .base import Case, CaseFiles, DataError, check_root, file_problem, pair_problems, raise_problems
from .nifti import load_volume_case

__all__ = ["PROSTATE_SITE_FOLDERS", "ProstateMultisite"]

#: Site name -> folder name, where they differ (the SAML / MS-Net release).
PROSTATE_SITE_FOLDERS: dict[str, str] = {"BMC": "ISBI_1.5", "RUNMC": "ISBI"}

_PROSTATE_FILE = re.compile(r"^(?P<case>Case(?P<num>\d+))(?P<seg>_[Ss]egmentation)?\.nii(\.gz)?$")


class ProstateMultisite:
    """The multi-site prostate MR layout (``<root>/<SITE>/CaseNN[_segmentation].nii.gz``)."""

    name = "prostate_multisite"
    modality = "mr"
    labels = ("prostate",)
    #: label values of the release (two zones in some sites); prostate = label > 0
    allowed_labels = (0, 1, 2)

    def __init__(self, site_folders: dict[str, str] | None = None) -> None:
        """Creates the layout.

        Args:
            site_folders: site name -> folder name where they differ; defaults to
                :data:`PROSTATE_SITE_FOLDERS`.
        """
        self.site_folders = dict(PROSTATE_SITE_FOLDERS if site_folders is None else site_folders)

    # -- helpers -----------------------------------------------------------------------
    def folder(self, site: str) -> str:
        """The folder name of a site (``BMC`` -> ``ISBI_1.5``; others unchanged)."""
        return self.site_folders.get(site, site)

    def _site_name(self, folder: str) -> str:
        reverse = {v: k for k, v in self.site_folders.items()}
        return reverse.get(folder, folder)

    @staticmethod
    def _check_root(root: Path) -> Path:
        return check_root(root, "Point data.root (or the environment variable the spec names) at the folder "
                                "that holds one sub-folder per site, or generate synthetic sites with "
                                "trainables.data.synthetic.write_synthetic_sites.")

    @staticmethod
    def _has_cases(folder: Path) -> bool:
        return any(_PROSTATE_FILE.match(p.name) for p in folder.iterdir())  # a broken case file counts: check names it

    # -- Layout ------------------------------------------------------------------------
    def sites(self, root: Path) -> list[str]:
        """Site names under ``root``: every sub-folder holding at least one case file.

        Args:
            root: the dataset root.

        Returns:
            Sorted site names (folders ``ISBI_1.5``/``ISBI`` reported as ``BMC``/``RUNMC``).

        Raises:
            DataError: ``root`` does not exist.
        """
        root = self._check_root(root)
        found = [
            self._site_name(d.name)
            for d in root.iterdir()
            if d.is_dir() and not d.name.startswith(".") and self._has_cases(d)
        ]
        return sorted(found)

    def empty_site_folders(self, root: Path) -> list[Path]:
        """Sub-folders of ``root`` without any case file (``oodsweep data check`` warns about them)."""
        root = self._check_root(root)
        return sorted(d for d in root.iterdir()
                      if d.is_dir() and not d.name.startswith(".") and not self._has_cases(d))

    def scan_cases(self, root: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        """Pairs the image and mask files of one site, collecting the pairing problems.

        Files whose names do not look like ``CaseNN[_segmentation].nii[.gz]`` are ignored.

        Args:
            root: the dataset root.
            site: site name (``BMC``, ``RUNMC``, ``BIDMC``, ``SiteA`` ...).

        Returns:
            ``(cases, problems)``: the well-paired cases sorted by case number, and one
            message per image without mask, mask without image, or duplicated file.

        Raises:
            DataError: missing root or site folder, or a folder without cases.
        """
        root = self._check_root(root)
        folder = root / self.folder(site)
        if not folder.is_dir():
            existing = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            alias = "" if folder.name == site else f" (site {site!r} is stored in folder {folder.name!r})"
            raise DataError(
                f"site folder {folder} does not exist{alias}. Folders under {root}: "
                f"{existing or 'none'}. Fix the site name or the data root; site aliases: "
                f"{self.site_folders}."
            )
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        numbers: dict[str, int] = {}
        problems: list[str] = []
        dupes: set[str] = set()
        broken: set[str] = set()
        for path in sorted(folder.iterdir()):
            m = _PROSTATE_FILE.match(path.name)
            if m is None:
                continue
            case_id = m.group("case")
            bad = file_problem(path)  # a link loop, a broken link, a folder, an unreadable file: named as such
            if bad:
                problems.append(bad)
                broken.add(case_id)  # its partner is not "without an image": this problem says why
                continue
            numbers[case_id] = int(m.group("num"))
            role = masks if m.group("seg") else images
            if case_id in role:
                kind = "mask" if m.group("seg") else "image"
                problems.append(
                    f"{folder}: two {kind} files for {case_id}: {role[case_id].name} and "
                    f"{path.name}. Keep one of them."
                )
                dupes.add(case_id)
                continue
            role[case_id] = path
        if not images and not masks and not problems:
            raise DataError(
                f"site folder {folder} holds no cases (expected CaseNN.nii.gz + "
                "CaseNN_segmentation.nii.gz). Check the site name and the data root."
            )
        problems += pair_problems(folder, {c: p for c, p in images.items() if c not in broken},
                                  {c: p for c, p in masks.items() if c not in broken}, "{case}.nii.gz",
                                  "{case}_segmentation.nii.gz")
        order = sorted((c for c in images if c in masks and c not in dupes | broken), key=lambda c: (numbers[c], c))
        return [CaseFiles(site=site, case_id=c, image=images[c], mask=masks[c]) for c in order], problems

    def list_cases(self, root: Path, site: str) -> list[CaseFiles]:
        """Like :meth:`scan_cases`, but every pairing problem is an error (all in one DataError).

        Raises:
            DataError: missing root or site folder, a folder without cases, an image
                without mask or a mask without image, or two files for the same role.
        """
        cases, problems = self.scan_cases(root, site)
        raise_problems(problems, Path(root) / self.folder(site))
        return cases

    def load_case(self, files: CaseFiles) -> Case:
        """Reads one case and checks it.

        Args:
            files: the case's files, from :meth:`list_cases`.

        Returns:
            The case: float32 image, binarised uint8 mask (label > 0), spacing from the
            image header.

        Raises:
            DataError: unreadable file, not 3D, shape or orientation mismatch, non-finite or
                constant intensities, labels other than 0/1/2, or a mask without foreground.
        """
        return load_volume_case(files, allowed_labels=self.allowed_labels, foreground=None,
                                label=self.labels[0])
