"""The probit clip as a setting (analysis.probit_clip) and C2/C3 on both scales (analysis.claims)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.agreement import Agreement
from analysis.claim_stats import agreement_rows, indicator_rows
from analysis.claims import claims_markdown, claims_table
from analysis.correlate import correlations, probit
from analysis.indicators import indicator_table
from analysis.probit_clip import AUTO, FALLBACK, Clips, check_probit_clip, half_case, site_cases


def _slices(cases: dict[tuple[str, str], int]) -> pd.DataFrame:
    """Slice records with ``cases[(site, role)]`` distinct cases (two slices each) of one member."""
    rows = [{"member_id": "m", "site": s, "role": r, "case_id": f"{s}{k}", "slice_idx": i}
            for (s, r), n in cases.items() for k in range(n) for i in range(2)]
    return pd.DataFrame(rows)


def test_auto_clip_is_half_a_case_of_each_site():
    cases = site_cases(_slices({("A", "id"): 10, ("A", "val"): 7, ("B", "ood"): 4, ("C", "ood"): 1}))
    assert cases == {"A": 10, "B": 4, "C": 1}           # the validation split is not a test split
    clips = Clips(AUTO, cases)
    assert clips.clip("A") == 0.05 and clips.clip("B") == 0.125   # 1/(2·10), 1/(2·4)
    assert clips.clip("C") == FALLBACK and clips.clip("Z") == FALLBACK  # one case, unknown site
    assert half_case(40) == 1 / 80
    assert clips.pair("A", "B") == (0.05, 0.125)
    text = clips.text(["A", "B", "C"])
    assert "half a case" in text and "0.05 (1/(2·10)) on A" in text and "0.125 (1/(2·4)) on B" in text
    assert "0.001 (1 case: too few, the fallback) on C" in text
    assert "0.05 (1/(2·10)) on A, B;" in Clips(AUTO, {"A": 10, "B": 10, "C": 1}).text()  # shared clips named once


def test_an_explicit_clip_is_used_on_every_site():
    clips = Clips(0.01, {"A": 10, "B": 4})
    assert clips.clip("A") == clips.clip("B") == clips.clip("Z") == 0.01
    assert "probit clip 0.01" in clips.text()


@pytest.mark.parametrize("bad", [0, 0.5, -0.1, 1.2, "half", True, float("nan")])
def test_a_bad_clip_names_the_key_the_value_and_the_fix(bad):
    with pytest.raises(ValueError) as e:
        check_probit_clip(bad)
    msg = str(e.value)
    assert msg.startswith("analysis.probit_clip: ") and repr(bad) in msg and "'auto'" in msg
    assert check_probit_clip("auto") == AUTO and check_probit_clip(None) == AUTO and check_probit_clip("0.02") == 0.02


def test_correlations_use_and_state_each_axis_clip():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0.0, 1.0, 30), rng.uniform(0.0, 1.0, 30)
    x[:3], y[:3] = 0.0, 1.0                          # clipped points: the clip sets the slope
    perf = pd.DataFrame({"source": "A", "target": "B", "metric": "iou_3d", "id_score": x, "ood_score": y})
    c = correlations(perf, n_resamples=0, clips=Clips(AUTO, {"A": 10, "B": 4})).iloc[0]
    assert (c["probit_clip_x"], c["probit_clip_y"]) == (0.05, 0.125)
    fit = stats.linregress(probit(x, 0.05), probit(y, 0.125))
    assert c["probit_slope"] == pytest.approx(fit.slope, abs=1e-12)
    other = correlations(perf, n_resamples=0, clips=Clips(1e-6, {})).iloc[0]
    assert other["probit_clip_x"] == 1e-6 and abs(other["probit_slope"] - c["probit_slope"]) > 1e-3


def _pool(n: int = 12, seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        i = rng.uniform(0.3, 0.9)
        for t in ("B", "C"):
            rows.append({"member_id": f"r{k}", "arch": "unet_r18", "lr": 1e-3, "epochs": 1, "seed": k, "source": "A",
                         "target": t, "metric": "iou_3d", "id_score": i, "ood_score": float(np.clip(
                             i - 0.2 + rng.normal(0, 0.1), 0, 1)), "run_id": f"r{k}", "oracle_prompt": False,
                         "val_score": i})
    rows[0]["ood_score"] = rows[1]["ood_score"] = 0.0    # a member that got nothing right on the targets
    rows[2]["id_score"] = rows[3]["id_score"] = 0.97     # above 1 − 1/(2·10) on the source: its clip bites
    return indicator_table(pd.DataFrame(rows))


def test_c2_probit_row_is_the_raw_statistic_on_probit_values():
    tb = _pool()
    clips = Clips(AUTO, {"A": 10, "B": 4, "C": 5})
    probit_rows = indicator_rows(tb, "id_performance", "C2", "claim", "weak", n_resamples=0, scale="probit",
                                 clips=clips)
    raw_rows = indicator_rows(tb, "id_performance", "C2", "claim", "weak", n_resamples=0, scale="raw")
    by_t = {r["scope"]: r for r in probit_rows}
    for t, c in (("B", 0.125), ("C", 0.1)):
        g = tb[tb["target"] == t]
        r = stats.pearsonr(probit(g["id_score"], 0.05), probit(g["ood_score"], c)).statistic
        assert by_t[t]["value"] == pytest.approx(r, abs=1e-12)
        assert by_t[t]["scale"] == "probit" and "probit scale" in by_t[t]["statistic"]
    assert by_t["overall"]["value"] == pytest.approx(np.mean([by_t["B"]["value"], by_t["C"]["value"]]), abs=1e-12)
    raw = {r["scope"]: r for r in raw_rows}
    assert raw["B"]["value"] == pytest.approx(stats.pearsonr(*tb[tb["target"] == "B"][["id_score", "ood_score"]]
                                                             .to_numpy().T).statistic, abs=1e-12)
    assert raw["overall"]["scale"] == "raw" and "raw scale" in raw["overall"]["statistic"]


def test_c3_probit_rows_read_each_site_agreement_on_the_probit_scale():
    rng = np.random.default_rng(4)
    n = 8
    a = rng.uniform(0.2, 0.95, (n, n))
    a = (a + a.T) / 2
    b = np.clip(a - 0.3 + rng.normal(0, 0.05, a.shape), 0, 1)
    b = (b + b.T) / 2
    ag = Agreement(member_ids=[f"r{k}" for k in range(n)], matrices={"A": a, "B": b}, roles={"A": "id", "B": "ood"})
    clips = Clips(AUTO, {"A": 10, "B": 4})
    rows = agreement_rows(ag, {f"r{k}": f"r{k}" for k in range(n)}, n_resamples=0, scale="probit", clips=clips)
    iu = np.triu_indices(n, k=1)
    r = stats.pearsonr(probit(a[iu], 0.05), probit(b[iu], 0.125)).statistic
    assert rows[0]["value"] == pytest.approx(r, abs=1e-9) and rows[1]["value"] == pytest.approx(r, abs=1e-9)
    assert all(x["scale"] == "probit" for x in rows)


def test_claims_give_c2_on_both_scales_probit_deciding_with_the_degenerate_sensitivity_in_the_row():
    tb = _pool(n=16)
    clips = Clips(AUTO, {"A": 10, "B": 4, "C": 5})
    out = claims_table(tb, tb, n_resamples=0, floor=0.01, clips=clips)
    c2 = out[out["claim"] == "C2"]
    assert list(c2["scope"][:2]) == ["overall", "overall (raw scale)"]       # the deciding row first
    assert list(c2["scale"][:2]) == ["probit", "raw"]
    assert not c2["scope"].str.contains("non-degenerate").any()
    ov = c2.iloc[0]
    assert ov["n_members_nondegenerate"] == 15 and ov["n_members"] == 16   # r0 scores 0 on the targets
    nd = indicator_rows(tb, "id_performance", "C2", "claim", "weak", n_resamples=0, floor=0.01, per_target=False,
                        scale="probit", clips=clips)[0]
    assert ov["value_nondegenerate"] == pytest.approx(nd["value"]) and ov["verdict_nondegenerate"] == nd["verdict"]
    assert {"B (raw scale)", "C (raw scale)", "B", "C"} <= set(c2["scope"])
    assert (out.loc[out["claim"] == "C4", "scale"] == "").all()
    md = claims_markdown(out, "t", "iou_3d", 0, 0.01, clips.text(["A", "B", "C"]))
    assert "probit** scale" in md and "**decides**" in md and "0.05 (1/(2·10)) on A" in md
    assert "without the degenerate members" in md
    assert list(claims_table(tb, tb, n_resamples=0, floor=0.01)["scale"].unique()) == [""]  # no clips: raw only


def test_fig4_axis_labels_state_the_clip():
    from analysis.plots import figure_fig4

    tb = _pool()
    fig = figure_fig4(tb, "B", clips=Clips(AUTO, {"A": 10, "B": 4}))
    ax = fig.axes[0]
    assert "clip 0.05" in ax.get_xlabel() and "clip 0.125" in ax.get_ylabel()


def test_cli_refuses_a_bad_probit_clip_naming_the_option(capsys):
    from sweeps.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", "/nonexistent-experiment", "--probit-clip", "0.7"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--probit-clip" in err and "0.7" in err and "'auto'" in err
