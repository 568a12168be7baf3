"""``oodsweep status``: read an experiment directory (no Ray needed) and say where each stage stands."""
from __future__ import annotations

import json
from pathlib import Path

from trainables import records

from .driver import driver_running, load_experiment_spec
from .pool import DONE_MARKER, STAGE, member_epochs


def _pool_trial_finished(last: dict, params: dict) -> bool:
    # Tune's result.json does not mark a function trainable's last result as done: compare epochs
    return bool(last.get("done")) or (bool(params) and int(last.get("epoch") or 0) >= max(member_epochs(params)))


def _uncertainty_trial_finished(last: dict, params: dict) -> bool:
    return bool(last.get("done") or last.get("scored"))


def _trial_states(pool_dir: Path, finished=_pool_trial_finished) -> dict[str, dict]:
    """Per trial folder: its last reported epoch, whether it finished, its error (files Tune writes)."""
    out = {}
    if not pool_dir.is_dir():
        return out
    for d in sorted(p for p in pool_dir.iterdir() if p.is_dir()):
        res = d / "result.json"
        if not res.exists() and not (d / "error.txt").exists():
            continue
        last = {}
        if res.exists():
            lines = [ln for ln in res.read_text().splitlines() if ln.strip()]
            if lines:
                last = json.loads(lines[-1])
        err = (d / "error.txt").read_text().strip().splitlines() if (d / "error.txt").exists() else None
        params = json.loads((d / "params.json").read_text()) if (d / "params.json").exists() else {}
        out[d.name] = {"epoch": last.get("epoch"), "done": finished(last, params),
                       "error": err[-1] if err else None}
    return out


def experiment_status(experiment_dir) -> dict:
    spec = load_experiment_spec(experiment_dir)
    exp = spec.experiment_dir
    members = records.member_part_ids(exp)
    trials = _trial_states(exp / STAGE)
    failed = {k: v["error"] for k, v in trials.items() if v["error"] and not v["done"]}
    running = [k for k, v in trials.items() if not v["done"] and not v["error"]]
    pool_done = (exp / STAGE / DONE_MARKER).exists()
    expected = spec.n_members()
    analysis_dir = exp / "analysis"
    from . import uncertainty as ustage

    unc = None
    if spec.uncertainty is not None:
        utrials = _trial_states(exp / ustage.STAGE, _uncertainty_trial_finished)
        ufailed = {k: v["error"] for k, v in utrials.items() if v["error"] and not v["done"]}
        udone = len(records.uncertainty_part_ids(exp))
        unc = {"state": "done" if (exp / ustage.STAGE / ustage.DONE_MARKER).exists() and udone >= len(members)
               else ("failed" if ufailed else ("running" if utrials else "pending")),
               "members_done": udone, "members_expected": len(members) or expected, "failed": ufailed}
    attempts = records.load_attempts(exp)
    restarts = {stage: int(len(g) - g["run"].nunique()) for stage, g in attempts.groupby("stage")}
    driver = driver_running(exp)
    finished = (exp / "analysis" / "summary.json").exists()
    return _interrupted({
        "experiment": str(exp), "name": spec.name,
        "driver": driver or ("finished" if finished else "not running"),
        "restarts": restarts,
        "pool": {"state": "done" if pool_done else ("failed" if failed else ("running" if running or members
                                                                              else "pending")),
                 "members_done": len(members), "members_expected": expected,
                 "runs_done": sum(v["done"] for v in trials.values()), "runs_expected": spec.n_runs(),
                 "runs_unfinished": running, "failed": failed},
        "uncertainty": unc,
        "analysis": {"state": "done" if (analysis_dir / "summary.json").exists() else "pending",
                     "dir": str(analysis_dir)},
    })


def _interrupted(st: dict) -> dict:
    """With no driver alive, a stage that was "running" is interrupted."""
    if st["driver"] in ("not running", "finished"):
        for key in ("pool", "uncertainty"):
            if st.get(key) and st[key]["state"] == "running":
                st[key]["state"] = "interrupted"
    return st


def format_status(st: dict) -> str:
    p, a = st["pool"], st["analysis"]
    lines = [f"experiment {st['name']}  ({st['experiment']})",
             f"  driver    {st['driver']}"]
    if st["driver"] == "not running" and (p["state"] != "done" or (st.get("uncertainty") or {}).get("state")
                                          not in (None, "done")):
        lines.append(f"            interrupted: `oodsweep resume {st['experiment']}` continues it")
    lines += [f"  pool      {p['state']:8s} members {p['members_done']}/{p['members_expected']}, "
             f"runs {p['runs_done']}/{p['runs_expected']} finished"
             + (f", {st['restarts']['pool']} restarted from a checkpoint" if st["restarts"].get("pool") else "")]
    for name in p["runs_unfinished"]:
        lines.append(f"            unfinished: {name}")
    for name, err in p["failed"].items():
        lines.append(f"            FAILED {name}: {err}")
    u = st.get("uncertainty")
    if u is not None:
        lines.append(f"  uncertainty {u['state']:6s} members {u['members_done']}/{u['members_expected']}"
                     + (f", {st['restarts']['uncertainty']} restarted" if st["restarts"].get("uncertainty") else ""))
        for name, err in u["failed"].items():
            lines.append(f"            FAILED {name}: {err}")
    lines.append(f"  analysis  {a['state']:8s} {a['dir']}")
    return "\n".join(lines)
