"""2D images in plain folders (``folder2d``): one folder per site, or one folder and a site map.

::

    <root>/<site>/images/NAME.png|jpg|jpeg|tif|tiff|bmp
    <root>/<site>/masks/NAME.<any of these>          matched to its image by NAME (the stem)

    with data.sites_from (:mod:`.sitemap`): <root>/images/ and <root>/masks/, the map names each NAME's site

Images are read with Pillow (already a dependency, as for the fundus layouts): grayscale (modes L, I;16,
I, F) gives one channel, colour (RGB, RGBA, P) three. Masks are single-band label images; the label names
come from ``data.label_values`` (``{lesion: 255}`` or ``{a: 1, b: 2}``, or a list of values for a
region); without it every value > 0 is the one label ``foreground``. ``data.labels`` picks and unites
labels as for the volume layouts (:mod:`.labelmap`). 8-bit images are scaled 0..255 -> [0, 1]; other bit
depths per channel between the image's 0.5/99.5 percentiles. Spacing: ``data.pixel_spacing`` (mm), else 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Case, CaseFiles, DataError, ScannedLayout, check_root, file_problem, raise_problems
from .labelmap import ANY_NONZERO, Channel, binarise, label_kind, select_labels
from .sitemap import apply_site_map, read_site_map

__all__ = ["Folder2D", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _open(path: Path):
    from PIL import Image  # local: keeps importing the package light

    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError ...
        raise DataError(f"{path}: cannot read it as an image ({type(exc).__name__}: {exc}); re-export it or remove "
                        "the case") from exc


class Folder2D(ScannedLayout):
    """Plain folders of 2D images and label masks, matched by file stem."""

    name = "folder2d"
    modality = "image"
    labels: tuple[str, ...] = ("foreground",)
    label_kind = "exclusive"
    OPTIONS = ("sites_from", "labels", "label_values", "pixel_spacing")

    def __init__(self, root: str | Path | None = None, options: dict | None = None) -> None:
        self.options = dict(options or {})
        unknown = sorted(set(self.options) - set(self.OPTIONS))
        if unknown:
            raise DataError(f"data.{unknown[0]} does not apply to layout folder2d (it takes "
                            f"{', '.join('data.' + k for k in self.OPTIONS)})")
        self.root = None if root is None else Path(root).expanduser().resolve()
        raw = self.options.get("label_values")
        if raw is None:
            available, self.allowed = {"foreground": ANY_NONZERO}, None
        else:
            if not isinstance(raw, dict) or not raw:
                raise DataError(f"data.label_values: expected {{name: value}}, e.g. {{lesion: 255}}; got {raw!r}")
            available = {}
            for k, v in raw.items():
                vals = v if isinstance(v, list) else [v]
                if not vals or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in vals):
                    raise DataError(f"data.label_values.{k}: {v!r}; a label value is an integer > 0 (0 is the "
                                    "background) or a list of them")
                available[str(k)] = tuple(sorted(set(vals)))
            self.allowed = {0} | {x for vals in available.values() for x in vals}
        self.channels: tuple[Channel, ...] = select_labels(available, self.options.get("labels"), "data.label_values")
        self.labels = tuple(n for n, _ in self.channels)
        self.label_kind = label_kind(self.channels)
        sp = self.options.get("pixel_spacing", 1.0)
        sp = sp if isinstance(sp, list) else [sp, sp]
        if len(sp) != 2 or not all(isinstance(x, (int, float)) and x > 0 for x in sp):
            raise DataError(f"data.pixel_spacing: {self.options.get('pixel_spacing')!r}; expected mm per pixel, a "
                            "number > 0 or [row, column]")
        self.spacing = (float(sp[0]), float(sp[1]), 1.0)
        self.site_map = read_site_map(self.options["sites_from"]) if self.options.get("sites_from") else None

    def configured(self, root: str | Path, options: dict | None) -> "Folder2D":
        """This layout for ``root`` with the spec's options."""
        return type(self)(root, options)

    def _root(self, root: Path) -> Path:
        return check_root(root, "Point data.root at the folder holding one sub-folder per site, each with images/ "
                                "and masks/ (or images/ and masks/ themselves, with data.sites_from).")

    def _site_dirs(self, root: Path) -> list[Path]:
        return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                      and (d / "images").is_dir())

    def sites(self, root: Path) -> list[str]:
        """The site folders holding ``images/`` (or the site map's sites)."""
        root = self._root(root)
        if self.site_map is not None:
            _, assigned, _ = self._mapped(root)
            return sorted({s for s, _ in assigned.values()})
        return [d.name for d in self._site_dirs(root)]

    def _pairs(self, folder: Path, site: str) -> tuple[dict[str, CaseFiles], list[str]]:
        if not (folder / "images").is_dir():
            existing = [d.name for d in self._site_dirs(folder.parent)] if self.site_map is None else []
            raise DataError(f"{folder / 'images'} does not exist; folder2d expects <site>/images/ and <site>/masks/"
                            + (f" (sites found: {existing})" if existing else "") + ". Fix the site name or data.root")
        problems: list[str] = []

        def files(sub: str) -> dict[str, Path]:
            out: dict[str, Path] = {}
            d = folder / sub
            for p in sorted(d.iterdir()) if d.is_dir() else []:
                if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES or p.is_dir():
                    continue
                bad = file_problem(p)
                if bad:
                    problems.append(bad)
                elif p.stem in out:
                    problems.append(f"{p}: a second file for {p.stem} in {d} (first: {out[p.stem].name}); keep one")
                else:
                    out[p.stem] = p
            return out

        images, masks = files("images"), files("masks")
        problems += [f"{p}: image without a mask (expected {folder / 'masks' / p.stem}.png or another image "
                     "ending). Add the mask or remove the image" for c, p in images.items() if c not in masks]
        problems += [f"{p}: mask without an image (expected {folder / 'images' / p.stem}.png ...). Add the image "
                     "or remove the mask" for c, p in masks.items() if c not in images]
        if not images and not masks and not problems:
            raise DataError(f"{folder / 'images'} holds no images ({', '.join(IMAGE_SUFFIXES)}); check data.root")
        cases = {c: CaseFiles(site=site, case_id=c, image=p, mask=masks[c]) for c, p in images.items() if c in masks}
        return cases, problems

    def _mapped(self, root: Path):
        cases, problems = self._pairs(root, "")
        assigned, map_problems = apply_site_map(self.site_map, {c: (cf.image, None) for c, cf in cases.items()})
        raise_problems(map_problems, self.site_map.path)
        return cases, assigned, problems

    def scan_cases(self, root: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        """The matched image/mask pairs of ``site`` and the pairing problems."""
        root = self._root(root)
        if self.site_map is None:
            cases, problems = self._pairs(root / site, site)
            return [cases[c] for c in sorted(cases)], problems
        cases, assigned, problems = self._mapped(root)
        if site not in {s for s, _ in assigned.values()}:
            raise DataError(f"site {site!r} is not in the site map {self.site_map.path} (its sites: "
                            f"{self.site_map.sites()}); fix the site name in the spec or add rows for it")
        return [CaseFiles(site=site, case_id=c, image=cases[c].image, mask=cases[c].mask, split=assigned[c][1])
                for c in sorted(cases) if assigned.get(c, ("",))[0] == site], problems

    def load_case(self, files: CaseFiles) -> Case:
        """Reads an image (1 or 3 channels) and its mask.

        Raises:
            DataError: unreadable file, image and mask of different sizes, a multi-band mask, constant image,
                a label value data.label_values does not declare, no foreground.
        """
        img = _open(files.image)
        eight_bit = img.mode in ("L", "P", "RGB", "RGBA", "LA", "1")
        if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            arr = np.asarray(img.convert("RGB"), dtype=np.float32)
        else:
            arr = np.asarray(img, dtype=np.float32)
        m = _open(files.mask)
        if m.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
            raise DataError(f"{files.mask}: a {m.mode} mask; a label mask is a single-band image (mode L, P or I) "
                            "holding the label values. Save it as grayscale, or remove the case")
        mask = np.asarray(m)
        if mask.shape[:2] != arr.shape[:2]:
            raise DataError(f"{files.mask}: mask size {mask.shape[1]}x{mask.shape[0]} (W x H) differs from its image "
                            f"{files.image} ({arr.shape[1]}x{arr.shape[0]}); they must match pixel for pixel. Resize "
                            "the mask (nearest neighbour) or remove the case")
        if float(arr.min()) == float(arr.max()):
            raise DataError(f"{files.image}: constant intensities (every pixel is {arr.flat[0]:g}); re-export the "
                            "image or remove the case")
        values = tuple(int(v) for v in np.unique(mask))
        where = "data.label_values" if self.allowed is not None else "the mask"
        binary = binarise(mask[:, :, None], self.channels, values, Path(files.mask), self.allowed, where)
        n_ch = 1 if arr.ndim == 2 else arr.shape[-1]
        image = arr[:, :, None] if arr.ndim == 2 else arr[:, :, None, :]
        return Case(site=files.site, case_id=files.case_id, image=image, mask=binary, spacing=self.spacing,
                    image_path=Path(files.image), mask_path=Path(files.mask), labels=self.labels,
                    label_values=values, channel_norms=("range255" if eight_bit else "percentile",) * n_ch)
