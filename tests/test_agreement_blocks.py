"""The pool's agreement in blocks of cases (analysis/agreement.py ``memory_gib``): the same matrices as the
single pass, to 1e-12, on a hand-built records folder, with a block size that forces several blocks."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import agreement as ag
from analysis.pairwise import AGREEMENT_METRICS
from trainables import records

H = W = 8
CASES = ["c0"] * 3 + ["c1"] * 2 + ["c2"] * 4 + ["c3"] * 1 + ["c4"] * 3   # 13 slices, cases of uneven length


def _records(root, n_members=6, seed=0):
    """Members' packed masks on two sites: blobs shifted per member, some slices empty, one member empty."""
    rng = np.random.default_rng(seed)
    ids = [f"m{i}" for i in range(n_members)]
    slice_idx = np.array([0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 0, 1, 2])
    for site in ("Src", "Tgt"):
        truth = rng.random((len(CASES), H, W)) < 0.3
        for i, mid in enumerate(ids):
            pred = np.roll(truth, i % 3, axis=2) ^ (rng.random(truth.shape) < 0.05)
            pred[rng.random(len(CASES)) < 0.2] = False
            if i == n_members - 1:
                pred[:] = False                      # a member that predicts nothing
            # the files list the cases out of order, as a pool's may
            order = np.r_[5:9, 0:5, 9:13]
            records.save_predictions(root, mid, site, pred[order], list(np.array(CASES)[order]), slice_idx[order])
    return ids


def _gib_for_rows(rows: int, members: int) -> float:
    """The memory_gib whose block holds ``rows`` slices of ``members`` members of H x W bits."""
    return rows * ag.BLOCK_COPIES * members * (H * W // 8) / (ag.BLOCK_SHARE * (1 << 30))


def test_plan_blocks_keeps_cases_whole():
    blocks = ag.plan_blocks(np.array(CASES), 6, H * W // 8, _gib_for_rows(4, 6))
    assert [sorted(np.array(CASES)[b].tolist()) for b in blocks] == [
        ["c0"] * 3, ["c1"] * 2, ["c2"] * 4, ["c3"] + ["c4"] * 3]  # c1 + c2 would be 6 > 4 rows
    assert np.array_equal(np.sort(np.concatenate(blocks)), np.arange(len(CASES)))
    assert len(ag.plan_blocks(np.array(CASES), 6, 8, None)) == 1
    assert len(ag.plan_blocks(np.array(CASES), 6, 8, 2.0)) == 1  # 13 slices fit 2 GiB


@pytest.mark.parametrize("metric", AGREEMENT_METRICS)
def test_blocked_agreement_equals_the_single_pass(tmp_path, metric):
    ids = _records(tmp_path)
    roles = {"Src": "id", "Tgt": "ood"}
    whole = ag.agreement_matrices(tmp_path, ids + ["missing"], roles, metric)
    seen = []

    def map_blocks(fn, tasks):  # a caller's map (the sweep's is Ray's): in order, as the builtin map
        for t in tasks:
            seen.append(len(t.rows))
            yield fn(t)

    blocked = ag.agreement_matrices(tmp_path, ids + ["missing"], roles, metric, memory_gib=_gib_for_rows(4, 6),
                                    map_blocks=map_blocks)
    assert seen == [3, 2, 4, 4] * 2  # four blocks per site
    assert blocked.n_slices == whole.n_slices == {"Src": 13, "Tgt": 13}
    assert blocked.notes == whole.notes and blocked.roles == whole.roles
    for site in roles:
        a, b = whole.matrices[site], blocked.matrices[site]
        assert np.isnan(a[-1]).all() and np.isnan(b[-1]).all()             # "missing" has no file
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12, equal_nan=True)
        assert np.isfinite(a[:5, :5]).sum() > 10                           # the comparison compares numbers
    # the default map (in-process) gives the same
    inproc = ag.agreement_matrices(tmp_path, ids, roles, metric, memory_gib=_gib_for_rows(4, 6))
    np.testing.assert_allclose(inproc.matrices["Tgt"], whole.matrices["Tgt"][:6, :6], rtol=0, atol=1e-12,
                               equal_nan=True)
