"""Fundus lesion layouts: IDRiD and FGADR (docs/architecture.md "Models and data").

Both releases hold 2D colour fundus photographs with one binary mask file per lesion type;
the task is multi-label: a loaded case has one mask channel per lesion, in the order of
:data:`LESIONS` (a spec may pick a subset, see ``trainables.data.cache``).

``idrid`` (IDRiD, "A. Segmentation" part)::

    <root>/A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NN.jpg
    <root>/A. Segmentation/2. All Segmentation Groundtruths/<split>/
        {1. Microaneurysms,2. Haemorrhages,3. Hard Exudates,4. Soft Exudates}/IDRiD_NN_{MA,HE,EX,SE}.tif

    ``<root>`` may also be the ``A. Segmentation`` folder itself. A missing lesion mask file
    means that lesion is absent from the image (the release leaves out empty masks). The
    release's own split (training set / testing set) is kept. The optic disc masks are ignored.

``fgadr`` (FGADR, "Seg-set")::

    <root>/Seg-set/Original_Images/NNNN_N.png
    <root>/Seg-set/{Microaneurysms_Masks,Hemohedge_Masks,HardExudate_Masks,SoftExudate_Masks}/NNNN_N.png

    ``Hemohedge_Masks`` is the release's spelling (``Hemorrhage_Masks`` is accepted too);
    ``<root>`` may also be the ``Seg-set`` folder itself. IRMA and neovascularisation masks
    are ignored. No split of its own: 80/20 by image.

Images are read with Pillow (RGB, 0..255); masks are binary images (0 and one other value,
e.g. 255, or red in an RGB TIFF): any other content is an error naming the file.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .base import Case, CaseFiles, DataError, ScannedLayout, check_root, file_problem

__all__ = ["LESIONS", "LESION_NAMES", "IDRiD", "FGADR", "read_rgb", "read_binary_mask"]

#: Lesion channels, in this order: microaneurysms, haemorrhages, hard exudates, soft exudates.
LESIONS: tuple[str, ...] = ("MA", "HE", "EX", "SE")
LESION_NAMES = {"MA": "microaneurysms", "HE": "haemorrhages", "EX": "hard exudates", "SE": "soft exudates"}

_IMAGE_EXT = r"\.(?:jpe?g|png|tiff?|bmp)$"


def _open(path: Path):
    """Opens and fully decodes an image with Pillow; any failure is a DataError naming the file."""
    from PIL import Image  # local: keeps importing the package light

    try:
        img = Image.open(path)
        img.load()  # decoding is where a truncated file fails
        return img
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError ...
        raise DataError(
            f"{path}: cannot read it as an image ({type(exc).__name__}: {exc}). The file is "
            "missing, truncated, corrupt or not an image; re-download or re-extract it, or remove "
            "the case."
        ) from exc


def read_rgb(path: Path) -> np.ndarray:
    """An RGB photograph as ``H x W x 3`` float32 in 0..255 (grey or RGBA converted by Pillow)."""
    arr = np.asarray(_open(path).convert("RGB"), dtype=np.float32)
    if float(arr.min()) == float(arr.max()):
        raise DataError(
            f"{path}: constant intensities (every pixel is {arr.flat[0]:g}); the photograph carries "
            "no information. Re-export it or remove the case."
        )
    return arr


def read_binary_mask(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """A lesion mask as ``H x W`` uint8 in {0, 1}, and the distinct values found in the file.

    Colour masks (IDRiD's TIFFs are red on black) are reduced to their largest channel.

    Raises:
        DataError: unreadable file, or more than one non-zero value (a lossy or grey-level
            image is not a mask).
    """
    img = _open(path)
    if img.mode == "P":
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    values = tuple(int(v) for v in np.unique(arr))
    if len([v for v in values if v != 0]) > 1 or any(v < 0 for v in values):
        raise DataError(
            f"{path}: unexpected label values {list(values)[:12]}{' ...' if len(values) > 12 else ''}; a "
            "lesion mask holds 0 and one other value (e.g. 255). Is it a lossy (JPEG) or grey-level "
            "export? Use the release's mask file, or remove the case."
        )
    return (arr > 0).astype(np.uint8), values


class _Fundus(ScannedLayout):
    """Shared by the fundus layouts: one site per root, one mask file per lesion."""

    modality = "fundus"
    labels = LESIONS
    site_name = ""
    #: what the root should hold, for messages
    expected = ""

    #: the release's top folder (optional: the root may be that folder itself), the image folder
    #: inside it, and the environment variable the presets read the root from
    top = ""
    image_dir = ""
    env = ""

    def _base(self, root: Path) -> Path:
        root = check_root(root, f"Point it (e.g. ${self.env}) at the {self.site_name} folder holding "
                                f"{self.expected}.")
        for base in (root / self.top, root):
            if (base / self.image_dir).is_dir():
                return base
        raise DataError(f"{root} does not look like {self.site_name}: no '{self.image_dir}' folder in it or in "
                        f"'{root / self.top}'. Expected {self.expected}.")

    def _scan(self, base: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        raise NotImplementedError

    def sites(self, root: Path) -> list[str]:
        """``[site_name]`` when ``root`` holds this release (the release is one site)."""
        self._base(root)
        return [self.site_name]

    def scan_cases(self, root: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        """The images with their lesion masks, and the pairing problems.

        ``site`` is the name the cases get (any name: the release is one site).
        """
        return self._scan(self._base(root), site)

    def load_case(self, files: CaseFiles) -> Case:
        """Reads a photograph and its lesion masks.

        Returns:
            A case with image ``H x W x 1 x 3`` (float32, 0..255) and mask ``H x W x 1 x 4``
            (uint8, one channel per lesion of :data:`LESIONS`; absent lesions are zeros).

        Raises:
            DataError: unreadable or constant image, unreadable or non-binary mask, or a mask
                whose size differs from the image.
        """
        image = read_rgb(files.image)
        h, w = image.shape[:2]
        mask = np.zeros((h, w, 1, len(self.labels)), np.uint8)
        values: set[int] = set()
        by_lesion = dict(files.lesion_masks)
        for k, lesion in enumerate(self.labels):
            path = by_lesion.get(lesion)
            if path is None:
                continue
            m, vals = read_binary_mask(path)
            if m.shape != (h, w):
                raise DataError(
                    f"{path}: mask size {m.shape[1]}x{m.shape[0]} (W x H) differs from its image "
                    f"{files.image} ({w}x{h}); they must match pixel for pixel. Use the release's "
                    "mask, or remove the case."
                )
            mask[:, :, 0, k] = m
            values.update(vals)
        first = next((p for _, p in files.lesion_masks if p is not None), files.image)
        return Case(site=files.site, case_id=files.case_id, image=image[:, :, None, :], mask=mask,
                    spacing=(1.0, 1.0, 1.0), image_path=Path(files.image), mask_path=Path(first),
                    labels=self.labels, label_values=tuple(sorted(values)))


def _lesion_of(folder_name: str, patterns: dict[str, str]) -> str | None:
    for lesion, pat in patterns.items():
        if re.search(pat, folder_name, re.IGNORECASE):
            return lesion
    return None


def _assemble(site: str, images: dict[str, Path], masks: dict[str, dict[str, Path]], numbers: dict[str, tuple],
              splits: dict[str, str | None], problems: list[str], image_hint: str) -> list[CaseFiles]:
    """Cases from images and per-lesion masks; a mask without its image or an image without any mask
    is a problem."""
    for case, by_lesion in masks.items():
        if case not in images:
            for path in by_lesion.values():
                problems.append(f"{path}: mask without an image (expected {image_hint.format(case=case)}). Add "
                                "the image or remove the mask.")
    cases = []
    for case in sorted(images, key=lambda c: (numbers.get(c, ()), c)):
        found = masks.get(case, {})
        if not found:
            problems.append(f"{images[case]}: image without a mask (no lesion mask file of "
                            f"{'/'.join(LESIONS)} names {case}). Add the masks or remove the image.")
            continue
        cases.append(CaseFiles(site=site, case_id=case, image=images[case], mask=None, split=splits.get(case),
                               lesion_masks=tuple((les, found.get(les)) for les in LESIONS)))
    return cases


# --------------------------------------------------------------------------------------
# IDRiD

_IDRID_IMAGE = re.compile(r"^(?P<case>IDRiD_(?P<num>\d+))" + _IMAGE_EXT, re.IGNORECASE)
_IDRID_MASK = re.compile(r"^(?P<case>IDRiD_(?P<num>\d+))_(?P<les>MA|HE|EX|SE|OD)" + _IMAGE_EXT, re.IGNORECASE)
_IDRID_FOLDERS = {"MA": r"micro\s*aneurysm", "HE": r"ha?emorrhage", "EX": r"hard\s*exudate",
                  "SE": r"soft\s*exudate"}


def _files_matching(folder: Path, pattern: re.Pattern, problems: list[str]):
    """``(path, match)`` for the files in ``folder`` whose names match ``pattern``, sorted by name; a matching
    name that is a link loop, a broken link or an unreadable file goes to ``problems`` instead."""
    for path in sorted(folder.iterdir()):
        m = pattern.match(path.name)
        if m is None or path.is_dir():
            continue
        bad = file_problem(path)
        if bad:
            problems.append(bad)
        else:
            yield path, m


def _new_image(images: dict[str, Path], case: str, path: Path, problems: list[str]) -> bool:
    """Record ``path`` as ``case``'s image; a second image for a case is a problem, not a replacement."""
    if case in images:
        problems.append(f"{path}: a second image for {case} (first: {images[case]}). Keep one of them.")
        return False
    images[case] = path
    return True


def _split_of(name: str) -> str | None:
    low = name.lower()
    return "train" if "train" in low else ("test" if "test" in low else None)


class IDRiD(_Fundus):
    """The IDRiD segmentation layout (the release's own training/testing split)."""

    name = "idrid"
    site_name = "IDRiD"
    expected = ("A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NN.jpg and "
                "A. Segmentation/2. All Segmentation Groundtruths/<split>/<N. Lesion>/IDRiD_NN_<MA|HE|EX|SE>.tif")

    top, image_dir, env = "A. Segmentation", "1. Original Images", "OODSWEEP_IDRID"

    def _scan(self, base: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        images: dict[str, Path] = {}
        masks: dict[str, dict[str, Path]] = {}
        numbers: dict[str, tuple] = {}
        splits: dict[str, str | None] = {}
        problems: list[str] = []
        for split_dir in sorted(p for p in (base / "1. Original Images").iterdir() if p.is_dir()):
            for path, m in _files_matching(split_dir, _IDRID_IMAGE, problems):
                case = m.group("case")
                if _new_image(images, case, path, problems):
                    numbers[case], splits[case] = (int(m.group("num")),), _split_of(split_dir.name)
        if not images:
            raise DataError(f"{base / '1. Original Images'} holds no IDRiD images (expected "
                            f"<split>/IDRiD_NN.jpg). Check the data root; expected {self.expected}.")
        gt = base / "2. All Segmentation Groundtruths"
        if not gt.is_dir():
            raise DataError(f"{gt} does not exist: IDRiD's lesion masks are missing. Expected {self.expected}.")
        for split_dir in sorted(p for p in gt.iterdir() if p.is_dir()):
            for les_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                lesion = _lesion_of(les_dir.name, _IDRID_FOLDERS)
                if lesion is None:  # "5. Optic Disc" and anything else
                    continue
                for path, m in _files_matching(les_dir, _IDRID_MASK, problems):
                    if m.group("les").upper() != lesion:
                        problems.append(f"{path}: a {m.group('les').upper()} mask in the {lesion} folder "
                                        f"{les_dir.name!r}. Move it to its lesion's folder.")
                        continue
                    masks.setdefault(m.group("case"), {})[lesion] = path
        return _assemble(site, images, masks, numbers, splits, problems,
                         "1. Original Images/<split>/{case}.jpg"), problems


# --------------------------------------------------------------------------------------
# FGADR

_FGADR_IMAGE = re.compile(r"^(?P<case>[^.]+)" + _IMAGE_EXT, re.IGNORECASE)
#: mask folder -> lesion; "Hemohedge" is the release's spelling
_FGADR_FOLDERS = {"MA": r"^microaneurysms?_masks$", "HE": r"^(hemohedge|ha?emorrhages?)_masks$",
                  "EX": r"^hard_?exudates?_masks$", "SE": r"^soft_?exudates?_masks$"}


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


class FGADR(_Fundus):
    """The FGADR segmentation layout (``Seg-set``); no split of its own."""

    name = "fgadr"
    site_name = "FGADR"
    expected = ("Seg-set/Original_Images/NNNN_N.png and same-named masks in Seg-set/{Microaneurysms_Masks,"
                "Hemohedge_Masks,HardExudate_Masks,SoftExudate_Masks}/")

    top, image_dir, env = "Seg-set", "Original_Images", "OODSWEEP_FGADR"

    def _scan(self, base: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        images: dict[str, Path] = {}
        problems: list[str] = []
        for path, m in _files_matching(base / "Original_Images", _FGADR_IMAGE, problems):
            _new_image(images, m.group("case"), path, problems)
        if not images:
            raise DataError(f"{base / 'Original_Images'} holds no images (expected NNNN_N.png). Check the data "
                            f"root; expected {self.expected}.")
        masks: dict[str, dict[str, Path]] = {}
        lesion_dirs = [(d, _lesion_of(d.name, _FGADR_FOLDERS)) for d in sorted(base.iterdir()) if d.is_dir()]
        if not any(les for _, les in lesion_dirs):
            raise DataError(f"{base} holds no lesion mask folders (expected Microaneurysms_Masks, Hemohedge_Masks, "
                            f"HardExudate_Masks, SoftExudate_Masks). Check the data root.")
        for folder, lesion in lesion_dirs:
            if lesion is None:
                continue
            for path, m in _files_matching(folder, _FGADR_IMAGE, problems):
                masks.setdefault(m.group("case"), {})[lesion] = path
        numbers = {c: _natural(c) for c in images}
        return _assemble(site, images, masks, numbers, {}, problems, "Original_Images/{case}.png"), problems
