"""The ``data:`` section of a spec: sites, layouts, splits, lesions, CT window, synthetic sites."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .spec_checks import Checker, resolve_path
from .spec_schema import LAYOUT_REGISTRY, LAYOUTS, SPLITS, DataSpec, SyntheticSpec, default

#: The options of the configured layouts (``trainables.data.layouts.CONFIGURED``), as spec keys.
LAYOUT_KEYS = ("sites_from", "channels", "labels", "label_values", "pixel_spacing")


def parse_data(c: Checker, raw: Any, base: Path) -> DataSpec:
    """Validate the ``data:`` mapping. Relative paths resolve against ``base``. ``data.image_size`` is checked
    against the pool's architectures later (``sweeps.spec_sections.check_image_size``)."""
    d = c.keys(raw, "data", {"layout": False, "root": False, "source": True, "targets": True,
                                      "image_size": False, "split_seed": False, "test_fraction": False,
                                      "val_fraction": False,
                                      "target_split": False, "cache_dir": False, "skip_bad_cases": False,
                                      "synthetic": False, "sites": False, "lesions": False, "window": False,
                                      "split": False, "surface_tolerance_mm": False,
                                      **{k: False for k in LAYOUT_KEYS}})
    source = d["source"]
    if not isinstance(source, str) or not source:
        raise c.fail("data.source", f"expected a site name, got {source!r}")
    targets = d["targets"]
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise c.fail("data.targets", f"expected a non-empty list of site names, got {targets!r}")
    if source in targets:
        raise c.fail("data.targets", f"contains the source site {source!r}; a target must be another site "
                                     f"(the source's own test split is always scored as ID)")
    if len(set(targets)) != len(targets):
        raise c.fail("data.targets", f"has repeated sites {targets!r}")
    site_entries: list[tuple[str, str, Path]] = []
    for site, entry in (c.keys(d.get("sites") or {}, "data.sites", {k: False for k in (d.get("sites") or {})})
                        .items()):
        e = c.keys(entry, f"data.sites.{site}", {"layout": True, "root": True})
        lay = c.choice(e["layout"], f"data.sites.{site}.layout", LAYOUTS)
        sroot = resolve_path(e["root"], base)
        if not sroot.is_dir():
            raise c.fail(f"data.sites.{site}.root", f"folder {sroot} does not exist; point it at the {lay} data "
                                                    "(or set the environment variable it names)")
        site_entries.append((str(site), lay, sroot))
    listed = {s for s, _, _ in site_entries}
    unlisted = [s for s in [source, *targets] if s not in listed]
    if unlisted and ("layout" not in d or "root" not in d):
        missing = "data.layout" if "layout" not in d else "data.root"
        raise c.fail(missing, f"is required for sites {unlisted} (or list each under data.sites with its layout "
                              f"and root)")
    if "layout" in d:
        layout = c.choice(d["layout"], "data.layout", LAYOUTS)
    else:
        layout = next(lay for s, lay, _ in site_entries if s == source) if source in listed else site_entries[0][1]
    synthetic = None
    if d.get("synthetic") is not None:
        s = c.keys(d["synthetic"] or {}, "data.synthetic", {"cases_per_site": False, "shape": False, "seed": False})
        shape = s.get("shape", [80, 80, 16])
        if not (isinstance(shape, list) and len(shape) == 3):
            raise c.fail("data.synthetic.shape", f"expected [H, W, D], got {shape!r}")
        synthetic = SyntheticSpec(
            cases_per_site=c.number(s.get("cases_per_site", 10), "data.synthetic.cases_per_site", integer=True,
                                    positive=True),
            shape=tuple(c.number(x, f"data.synthetic.shape[{i}]", integer=True, positive=True)
                        for i, x in enumerate(shape)),
            seed=c.number(s.get("seed", 0), "data.synthetic.seed", integer=True, nonneg=True))
        if synthetic.cases_per_site < 2:
            raise c.fail("data.synthetic.cases_per_site", f"needs >= 2 (one train, one test), got {synthetic.cases_per_site}")
        if layout != "prostate_multisite" or site_entries:
            raise c.fail("data.synthetic", "synthetic sites are written in the prostate_multisite layout under "
                                           "data.root; drop data.sites and set data.layout: prostate_multisite")
    if "root" in d:
        root = resolve_path(d["root"], base)
        if synthetic is None and not root.is_dir():
            raise c.fail("data.root", f"folder {root} does not exist; point it at the dataset (or add "
                                      f"`synthetic: {{}}` under data to generate synthetic sites there)")
    else:
        root = next(r for s, _, r in site_entries if s == source) if source in listed else site_entries[0][2]
    if synthetic is not None:
        from trainables.data.synthetic import SYNTHETIC_SITES

        for k, site in [("data.source", source)] + [(f"data.targets[{i}]", t) for i, t in enumerate(targets)]:
            c.choice(site, k, tuple(SYNTHETIC_SITES))
    used = {s: lay for s, lay, _ in site_entries}
    lays = {used.get(s, layout) for s in [source, *targets]}
    modalities = {LAYOUT_REGISTRY[x].modality for x in lays}
    if len(modalities) > 1:
        raise c.fail("data.sites", f"the sites mix modalities {sorted(modalities)} (layouts {sorted(lays)}); a sweep's "
                                   "sites must share one")
    modality = modalities.pop()
    labels = None
    if d.get("lesions") is not None:
        les = d["lesions"]
        valid = tuple(LAYOUT_REGISTRY[next(iter(lays))].labels)
        if modality != "fundus":
            raise c.fail("data.lesions", f"applies to the fundus layouts (idrid, fgadr) only; {sorted(lays)} has the "
                                         f"labels {list(valid)}")
        if isinstance(les, str):
            les = [les]
        if not isinstance(les, list) or not les:
            raise c.fail("data.lesions", f"expected a non-empty list of lesions from {list(valid)}, got {les!r}")
        labels = tuple(c.choice(x, f"data.lesions[{i}]", valid) for i, x in enumerate(les))
        if len(set(labels)) != len(labels):
            raise c.fail("data.lesions", f"has repeated lesions {list(labels)}")
    window = None
    if d.get("window") is not None:
        w = d["window"]
        if modality != "ct" and not set(options_layouts(lays)) & {"nnunet", "decathlon"}:
            raise c.fail("data.window", f"is a CT window (HU) and applies to the CT layouts (lits, flare) and the "
                                        f"channels named CT of nnunet and decathlon only, not {sorted(lays)}")
        if not (isinstance(w, list) and len(w) == 2):
            raise c.fail("data.window", f"expected [low, high] in HU, e.g. [-160, 240], got {w!r}")
        window = (c.number(w[0], "data.window[0]"), c.number(w[1], "data.window[1]"))
        if not window[0] < window[1]:
            raise c.fail("data.window", f"low must be < high, got {list(w)}")
    options = parse_layout_options(c, d, lays, base)
    image_size = c.number(d.get("image_size", 64), "data.image_size", integer=True, positive=True)
    return DataSpec(
        layout=layout, root=root, source=source, targets=tuple(targets), image_size=image_size,
        split_seed=c.number(d.get("split_seed", default(DataSpec, "split_seed")), "data.split_seed", integer=True,
                            nonneg=True),
        test_fraction=c.number(d.get("test_fraction", 0.2), "data.test_fraction", positive=True, maximum=0.9),
        val_fraction=c.number(d.get("val_fraction", default(DataSpec, "val_fraction")), "data.val_fraction",
                              nonneg=True, maximum=0.5),
        target_split=c.choice(d.get("target_split", default(DataSpec, "target_split")), "data.target_split",
                              ("test", "all")),
        cache_dir=resolve_path(d["cache_dir"], base) if d.get("cache_dir") else None,
        skip_bad_cases=bool(d.get("skip_bad_cases", False)), synthetic=synthetic,
        sites=tuple(site_entries), labels=labels, window=window,
        split=c.choice(d.get("split", "dataset"), "data.split", SPLITS), layout_options=options,
        surface_tolerance_mm=_tolerance(c, d.get("surface_tolerance_mm", default(DataSpec, "surface_tolerance_mm"))))


def options_layouts(lays: set[str]) -> list[str]:
    """The configured layouts among ``lays`` (those that take ``data.sites_from``, ``data.labels`` ...)."""
    from trainables.data.layouts import CONFIGURED

    return sorted(lay for lay in lays if lay in CONFIGURED)


def parse_layout_options(c: Checker, d: dict, lays: set[str], base: Path) -> dict | None:
    """``data.sites_from``, ``channels``, ``labels``, ``label_values``, ``pixel_spacing``: their types here; their
    names against the dataset (dataset.json) when the data is read (``oodsweep data check`` / ``data prepare``)."""
    from trainables.data.layouts import CONFIGURED

    given = {k: d[k] for k in LAYOUT_KEYS if d.get(k) is not None}
    if not given:
        return None
    for k in given:
        takes = sorted(lay for lay in lays if k in CONFIGURED.get(lay, ()))
        if not takes:
            which = sorted(lay for lay, keys in CONFIGURED.items() if k in keys)
            raise c.fail(f"data.{k}", f"applies to the layouts {which}, not {sorted(lays)}; remove it")
    if "sites_from" in given:  # read (and its rows checked against the cases) when the data is prepared
        path = resolve_path(given["sites_from"], base)
        if path.suffix.lower() not in (".csv", ".json"):
            raise c.fail("data.sites_from", f"{path} is neither a .csv (case_id, site, split) nor a .json datalist")
        given["sites_from"] = str(path)
    if "channels" in given:
        ch = [given["channels"]] if isinstance(given["channels"], str) else given["channels"]
        if not isinstance(ch, list) or not ch or not all(isinstance(x, str) for x in ch):
            raise c.fail("data.channels", f"expected a list of channel names (dataset.json), got {given['channels']!r}")
        given["channels"] = ch
    if "labels" in given:
        lab = given["labels"]
        items = lab if isinstance(lab, list) else [{k: v} for k, v in lab.items()] if isinstance(lab, dict) else [lab]
        ok = isinstance(lab, (str, list, dict)) and lab and all(
            isinstance(x, str) or (isinstance(x, dict) and len(x) == 1
                                   and isinstance(next(iter(x.values())), (str, list))) for x in items)
        if not ok:
            raise c.fail("data.labels", f"expected label names and {{name: [labels]}} unions, got {lab!r}")
    if "label_values" in given and not isinstance(given["label_values"], dict):
        raise c.fail("data.label_values", f"expected {{name: value}}, e.g. {{lesion: 255}}, "
                                          f"got {given['label_values']!r}")
    if "pixel_spacing" in given:
        sp = given["pixel_spacing"]
        sp = sp if isinstance(sp, list) else [sp]
        for i, x in enumerate(sp):
            c.number(x, f"data.pixel_spacing[{i}]" if len(sp) > 1 else "data.pixel_spacing", positive=True)
    return given


def _tolerance(c: Checker, v: Any) -> float | None:
    """``data.surface_tolerance_mm``: a non-negative number of mm, or null (no surface records)."""
    return None if v is None else c.number(v, "data.surface_tolerance_mm", nonneg=True)
