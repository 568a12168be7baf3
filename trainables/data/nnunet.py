"""Own datasets in the nnU-Net v2 and Medical Segmentation Decathlon formats (``nnunet``, ``decathlon``).

``nnunet`` (nnU-Net v2 raw data; the root is the ``DatasetXXX_Name`` folder)::

    <root>/dataset.json    channel_names {"0": "T2", "1": "ADC"}, labels {"background": 0, "PZ": 1, "TZ": 2}
                           (region labels: "whole": [1, 2]), file_ending ".nii.gz", numTraining
    <root>/imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz ...   one file per channel
    <root>/labelsTr/CASE.nii.gz
    <root>/imagesTs/ + labelsTs/                              optional, the split "test"

    Supported file endings: ``.nii.gz`` and ``.nii`` (read with nibabel). Other endings nnU-Net knows
    (``.mha``, ``.nrrd``, ``.png``, ``.tif``) are refused with the fix: convert to NIfTI, or use the
    ``folder2d`` layout for 2D images. An ``imagesTs`` without ``labelsTs`` is ignored (nothing to score).

``decathlon`` (the Medical Segmentation Decathlon; the root is the ``TaskNN_Name`` folder)::

    <root>/dataset.json    modality {"0": "T2", "1": "ADC"}, labels {"0": "background", "1": "PZ"},
                           training [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]
    <root>/imagesTr/x.nii.gz   3D, or 4D with the channels on the 4th axis
    <root>/labelsTr/x.nii.gz

    Only the files ``training`` lists are read (the release's ``._x.nii.gz`` resource-fork files are not).

Both: one site named after the dataset (``Dataset005_Prostate`` and ``Task05_Prostate`` -> ``Prostate``;
under ``data.sites`` the site takes the name given there), or the sites of a site map
(``data.sites_from``, :mod:`.sitemap`). ``data.channels`` picks and orders the channels by name;
``data.labels`` picks labels or defines unions (:mod:`.labelmap`). A channel named ``CT`` is windowed
(``data.window``), every other channel clipped to its own 0.5/99.5 percentiles; each channel on its own.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .base import (Case, CaseFiles, DataError, ScannedLayout, check_pair, check_root, file_problem, label_values,
                   raise_problems)
from .labelmap import Channel, binarise, label_kind, select_labels
from .nifti import check_orientation, read_nifti
from .sitemap import apply_site_map, read_site_map

__all__ = ["NnUNet", "Decathlon", "NIFTI_ENDINGS"]

#: The nnU-Net file endings this layout reads.
NIFTI_ENDINGS = (".nii.gz", ".nii")


class _JsonDataset(ScannedLayout):
    """A dataset folder described by its ``dataset.json``; configured per root and spec options."""

    name = ""
    modality = "mr"
    labels: tuple[str, ...] = ()
    label_kind = "exclusive"
    #: the spec keys (``data.<key>``) this layout takes
    OPTIONS = ("sites_from", "channels", "labels")

    def __init__(self, root: str | Path | None = None, options: dict | None = None) -> None:
        self.options = dict(options or {})
        unknown = sorted(set(self.options) - set(self.OPTIONS))
        if unknown:
            raise DataError(f"data.{unknown[0]} does not apply to layout {self.name} (it takes "
                            f"{', '.join('data.' + k for k in self.OPTIONS)})")
        self.root = None if root is None else check_root(Path(root).expanduser(), self._hint()).resolve()
        self.site_map = None
        if self.root is None:
            return
        self.json_path = self.root / "dataset.json"
        bad = file_problem(self.json_path)
        if bad:
            raise DataError(f"{bad}. A {self.name} dataset folder holds dataset.json; {self._hint()}")
        try:
            self.meta = json.loads(self.json_path.read_text())
        except ValueError as e:
            raise DataError(f"{self.json_path}: not valid JSON ({e}); fix the file") from e
        if not isinstance(self.meta, dict):
            raise DataError(f"{self.json_path}: expected a JSON object, got {type(self.meta).__name__}")
        names, available, self.allowed = self._read_meta()
        self.all_channels = names
        want = self.options.get("channels")
        if want is None:
            self.channel_index = tuple(range(len(names)))
        else:
            unknown = [c for c in want if c not in names]
            if unknown or not want or len(set(want)) != len(want):
                raise DataError(f"data.channels: {list(want)} must name each channel once, from {list(names)} "
                                f"({self.json_path})")
            self.channel_index = tuple(names.index(c) for c in want)
        self.channel_names = tuple(names[i] for i in self.channel_index)
        self.channel_norms = tuple("window" if n.upper() == "CT" else "percentile" for n in self.channel_names)
        self.modality = "ct" if all(n == "window" for n in self.channel_norms) else "mr"
        self.channels: tuple[Channel, ...] = select_labels(available, self.options.get("labels"), str(self.json_path))
        self.labels = tuple(n for n, _ in self.channels)
        self.label_kind = label_kind(self.channels)
        if self.options.get("sites_from"):
            self.site_map = read_site_map(self.options["sites_from"])

    # -- to be provided -----------------------------------------------------------------------------------
    def _hint(self) -> str:
        raise NotImplementedError

    def _read_meta(self) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]], set[int]]:
        """(channel names in file order, label name -> values without the background, every declared value)."""
        raise NotImplementedError

    def _scan_all(self) -> tuple[dict[str, CaseFiles], list[str]]:
        """Every labelled case (site left empty) and the pairing problems."""
        raise NotImplementedError

    def _read_image(self, files: CaseFiles) -> tuple[list[np.ndarray], list[Path], tuple[float, float, float]]:
        """The selected channels, their files, and the spacing."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------
    def _meta_key(self, key: str, example: str):
        if key not in self.meta:
            raise DataError(f"{self.json_path}: no key {key!r} (keys found: {sorted(self.meta)}); add it, e.g. "
                            f"\"{key}\": {example}")
        return self.meta[key]

    def _for(self, root: Path) -> "_JsonDataset":
        if self.root is not None and Path(root).expanduser().resolve() == self.root:
            return self
        return type(self)(root, self.options)

    def configured(self, root: str | Path, options: dict | None) -> "_JsonDataset":
        """This layout for the dataset at ``root`` with the spec's options (reads dataset.json and the site map)."""
        return type(self)(root, options)

    def _default_site(self) -> str:
        m = re.match(r"^(?:Dataset\d+|Task\d+)_(?P<name>.+)$", self.root.name)
        return m.group("name") if m else self.root.name

    def _assigned(self) -> tuple[dict[str, CaseFiles], dict[str, tuple[str, str | None]] | None, list[str]]:
        cases, problems = self._scan_all()
        if self.site_map is None:
            return cases, None, problems
        assigned, map_problems = apply_site_map(self.site_map, {c: (cf.image, cf.split) for c, cf in cases.items()},
                                                getattr(self, "seen_cases", set()))
        raise_problems(map_problems, self.site_map.path)
        return cases, assigned, problems

    def sites(self, root: Path) -> list[str]:
        """The site map's sites, or the one site named after the dataset."""
        lay = self._for(root)
        if lay.site_map is None:
            lay._scan_all()
            return [lay._default_site()]
        _, assigned, _ = lay._assigned()
        return sorted({s for s, _ in assigned.values()})

    def scan_cases(self, root: Path, site: str) -> tuple[list[CaseFiles], list[str]]:
        """The cases of ``site`` (without a site map: every case, under the name ``site``) and the pairing problems.

        Raises:
            DataError: no dataset.json or a key missing, the site map does not fit the cases, an unknown site.
        """
        lay = self._for(root)
        cases, assigned, problems = lay._assigned()
        if assigned is None:
            out = [CaseFiles(site=site, case_id=c, image=cf.image, mask=cf.mask, split=cf.split, channels=cf.channels)
                   for c, cf in cases.items()]
        else:
            if site not in {s for s, _ in assigned.values()}:
                raise DataError(f"site {site!r} is not in the site map {lay.site_map.path} (its sites: "
                                f"{lay.site_map.sites()}); fix the site name in the spec or add rows for it")
            out = [CaseFiles(site=site, case_id=c, image=cf.image, mask=cf.mask, split=assigned[c][1],
                             channels=cf.channels) for c, cf in cases.items() if assigned.get(c, ("",))[0] == site]
        return sorted(out, key=lambda cf: cf.case_id), problems

    def load_case(self, files: CaseFiles) -> Case:
        """Reads the selected channels and the labels; one {0, 1} mask channel per selected label.

        Raises:
            DataError: unreadable file, shapes or orientations that differ, non-finite or constant channel,
                a label value dataset.json does not declare, or no foreground.
        """
        lay = self if self.root is not None else self._for(Path(files.mask).parents[1])
        chans, paths, spacing = lay._read_image(files)
        mask, _ = read_nifti(files.mask)
        values = label_values(mask)
        binary = binarise(mask, lay.channels, values, Path(files.mask), lay.allowed, str(lay.json_path))
        warnings = check_orientation(paths[0], files.mask) if chans[0].shape == mask.shape else []
        checked = [check_pair(ch, mask, p, files.mask, None, None, values)[0] for ch, p in zip(chans, paths)]
        del mask, chans
        image = checked[0] if len(checked) == 1 else np.stack(checked, axis=-1)
        return Case(site=files.site, case_id=files.case_id, image=image, mask=binary, spacing=spacing,
                    image_path=Path(files.image), mask_path=Path(files.mask), labels=lay.labels,
                    label_values=tuple(int(v) for v in values), warnings=tuple(warnings),
                    channel_norms=lay.channel_norms)


def _names(raw, key: str, path: Path) -> tuple[str, ...]:
    """Channel names from ``{"0": "T2", "1": "ADC"}`` (keys 0..C-1)."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: {key} must map channel numbers to names, e.g. {{\"0\": \"T2\", \"1\": \"ADC\"}}; "
                        f"got {raw!r}")
    try:
        order = sorted(raw, key=int)
    except ValueError:
        raise DataError(f"{path}: {key} keys must be channel numbers \"0\", \"1\" ...; got {sorted(raw)}") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise DataError(f"{path}: {key} keys must be 0..{len(order) - 1} without gaps; got {order}")
    return tuple(str(raw[k]) for k in order)


class NnUNet(_JsonDataset):
    """nnU-Net v2 raw data: ``imagesTr/CASE_XXXX<ending>`` per channel, ``labelsTr/CASE<ending>``."""

    name = "nnunet"

    def _hint(self) -> str:
        return ("Point data.root at the nnU-Net DatasetXXX_Name folder (holding dataset.json, imagesTr/ and "
                "labelsTr/).")

    def _read_meta(self):
        path = self.json_path
        names = _names(self._meta_key("channel_names", '{"0": "T2"}'), "channel_names", path)
        raw = self._meta_key("labels", '{"background": 0, "PZ": 1}')
        fe = self._meta_key("file_ending", '".nii.gz"')
        self._meta_key("numTraining", "32")
        if fe not in NIFTI_ENDINGS:
            raise DataError(f"{path}: file_ending {fe!r} is not supported by the nnunet layout (it reads "
                            f"{' and '.join(NIFTI_ENDINGS)} with nibabel). Convert the images and labels to NIfTI "
                            "(e.g. SimpleITK.WriteImage(img, 'x.nii.gz')), or use layout folder2d for 2D PNG/TIFF "
                            "images")
        self.file_ending = fe
        if not isinstance(raw, dict) or raw.get("background") != 0:
            raise DataError(f"{path}: labels must map names to values with \"background\": 0, e.g. "
                            f"{{\"background\": 0, \"PZ\": 1, \"TZ\": 2}}; got {raw!r}")
        available: dict[str, tuple[int, ...]] = {}
        for name, v in raw.items():
            vals = v if isinstance(v, list) else [v]
            if not vals or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in vals):
                raise DataError(f"{path}: label {name!r} has value {v!r}; a label value is an integer >= 0 or, for "
                                "a region, a list of them")
            if name != "background":
                available[str(name)] = tuple(sorted(set(vals)))
        return names, available, {0} | {x for vals in available.values() for x in vals}

    def _scan_all(self):
        root, fe, n_ch = self.root, self.file_ending, len(self.all_channels)
        pattern = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(fe) + "$")
        out: dict[str, CaseFiles] = {}
        problems: list[str] = []
        if not (root / "imagesTr").is_dir():
            raise DataError(f"{root}: no imagesTr folder; an nnU-Net dataset holds imagesTr/CASE_0000{fe} and "
                            f"labelsTr/CASE{fe}. {self._hint()}")
        n_train = 0
        for img_dir, lbl_dir, split in (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test")):
            if not (root / img_dir).is_dir() or (split == "test" and not (root / lbl_dir).is_dir()):
                continue
            images: dict[str, dict[int, Path]] = {}
            for path in sorted((root / img_dir).iterdir()):
                if path.name.startswith(".") or not path.name.endswith(fe) or path.is_dir():
                    continue
                m = pattern.match(path.name)
                if m is None:
                    problems.append(f"{path}: no channel suffix; nnU-Net images are named CASE_0000{fe} (one file "
                                    "per channel). Rename it")
                    continue
                bad = file_problem(path)
                if bad:
                    problems.append(bad)
                    continue
                ch = int(m.group("ch"))
                if ch >= n_ch:
                    problems.append(f"{path}: channel {ch:04d}, but {self.json_path.name} channel_names declares "
                                    f"{n_ch} channel(s) {list(self.all_channels)}; add the channel to channel_names "
                                    "or remove the file")
                    continue
                images.setdefault(m.group("case"), {})[ch] = path
            labels = {}
            if (root / lbl_dir).is_dir():
                for path in sorted((root / lbl_dir).iterdir()):
                    if path.name.endswith(fe) and not path.name.startswith(".") and not path.is_dir():
                        bad = file_problem(path)
                        if bad:
                            problems.append(bad)
                        else:
                            labels[path.name[:-len(fe)]] = path
            if split == "train":
                n_train = len(images)
            self.seen_cases = getattr(self, "seen_cases", set()) | set(images) | set(labels)
            for case, files in images.items():
                missing = [c for c in range(n_ch) if c not in files]
                if missing:
                    problems += [f"{root / img_dir / f'{case}_{c:04d}{fe}'}: missing; case {case} has channel "
                                 f"file(s) {sorted(files)} but {self.json_path.name} declares {n_ch} channels "
                                 f"{list(self.all_channels)}. Add the file or remove the case" for c in missing]
                elif case not in labels:
                    problems.append(f"{files[0]}: image without a label (expected {root / lbl_dir / (case + fe)}). "
                                    "Add the label or remove the image")
                elif case in out:
                    problems.append(f"{files[0]}: case {case} is in imagesTr and imagesTs; rename one of them")
                else:
                    sel = [files[i] for i in self.channel_index]
                    out[case] = CaseFiles(site="", case_id=case, image=sel[0], mask=labels[case], split=split,
                                          channels=tuple(sel[1:]))
            problems += [f"{p}: label without an image (expected {root / img_dir / (c + '_0000' + fe)}). Add the "
                         "image or remove the label" for c, p in labels.items() if c not in images]
        declared = self.meta.get("numTraining")
        if isinstance(declared, int) and declared != n_train:
            problems.append(f"{self.json_path}: numTraining is {declared} but imagesTr holds {n_train} case(s); "
                            "set numTraining to the number of training cases")
        if not out and not problems:
            raise DataError(f"{root / 'imagesTr'} holds no cases (expected CASE_0000{fe}). {self._hint()}")
        return out, problems

    def _read_image(self, files: CaseFiles):
        paths = [Path(files.image), *(Path(p) for p in files.channels)]
        chans, spacing = [], (1.0, 1.0, 1.0)
        for i, p in enumerate(paths):
            arr, sp = read_nifti(p, dtype=np.float32)
            chans.append(arr)
            spacing = sp if i == 0 else spacing
        return chans, paths, spacing


class Decathlon(_JsonDataset):
    """The Medical Segmentation Decathlon: ``training`` lists image (3D or 4D, channels last) and label files."""

    name = "decathlon"

    def _hint(self) -> str:
        return ("Point data.root at the Decathlon TaskNN_Name folder (holding dataset.json, imagesTr/ and "
                "labelsTr/).")

    def _read_meta(self):
        path = self.json_path
        names = _names(self._meta_key("modality", '{"0": "T2"}'), "modality", path)
        raw = self._meta_key("labels", '{"0": "background", "1": "PZ"}')
        self._meta_key("training", '[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]')
        if not isinstance(raw, dict) or not all(str(k).isdigit() for k in raw):
            raise DataError(f"{path}: labels must map values to names, e.g. {{\"0\": \"background\", \"1\": \"PZ\"}}"
                            f" (the Decathlon's direction); got {raw!r}")
        available = {str(n): (int(k),) for k, n in raw.items() if int(k) != 0}
        return names, available, {0} | {int(k) for k in raw}

    def _scan_all(self):
        out: dict[str, CaseFiles] = {}
        problems: list[str] = []
        entries = self.meta["training"]
        if not isinstance(entries, list):
            raise DataError(f"{self.json_path}: training must be a list of {{\"image\": ..., \"label\": ...}}")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not isinstance(e.get("label"), str):
                problems.append(f"{self.json_path}: training[{i}] is {e!r}; expected {{\"image\": "
                                "\"./imagesTr/x.nii.gz\", \"label\": \"./labelsTr/x.nii.gz\"}. Fix the entry")
                continue
            img, lbl = self.root / e["image"], self.root / e["label"]
            bad = [b for b in (file_problem(img), file_problem(lbl)) if b]
            if bad:
                problems += [f"{b} (listed in {self.json_path.name} training[{i}]); add the file or remove the entry"
                             for b in bad]
                continue
            case = re.sub(r"\.nii(\.gz)?$", "", lbl.name)
            if case in out:
                problems.append(f"{self.json_path}: training[{i}] names case {case} again; remove one entry")
                continue
            out[case] = CaseFiles(site="", case_id=case, image=img, mask=lbl, split=None)
        if not out and not problems:
            raise DataError(f"{self.json_path}: training is empty; list the labelled cases there")
        return out, problems

    def _read_image(self, files: CaseFiles):
        arr, spacing = read_nifti(files.image, dtype=np.float32, channels_last=True)
        if arr.shape[-1] != len(self.all_channels):
            raise DataError(f"{files.image}: {arr.shape[-1]} channel(s) on its 4th axis but {self.json_path.name} "
                            f"modality declares {len(self.all_channels)} {list(self.all_channels)}; fix modality or "
                            "the image")
        return [np.ascontiguousarray(arr[..., i]) for i in self.channel_index], [Path(files.image)] * len(
            self.channel_index), spacing
