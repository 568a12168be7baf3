"""``oodsweep status``: read an experiment directory (no Ray needed) and say where each stage stands."""
from __future__ import annotations

import json
from pathlib import Path

from trainables import records

from .console import command
from .experiment import DONE_MARKER, POOL_STAGE, UNCERTAINTY_STAGE, driver_running, load_experiment_spec
from .members import member_epochs


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
        last, params = {}, {}
        try:  # Tune's files only inform: a damaged one is read as "no result yet"
            if res.exists():
                lines = [ln for ln in res.read_text().splitlines() if ln.strip()]
                if lines:
                    last = json.loads(lines[-1])
            params = json.loads((d / "params.json").read_text()) if (d / "params.json").exists() else {}
        except (OSError, ValueError):
            pass
        err = (d / "error.txt").read_text().strip().splitlines() if (d / "error.txt").exists() else None
        out[d.name] = {"epoch": last.get("epoch"), "done": finished(last, params),
                       "error": err[-1] if err else None}
    return out


def experiment_status(experiment_dir) -> dict:
    """Where each stage stands, from the records first (what `resume` would redo) and Tune's files second."""
    from . import reconcile
    from .uncertainty import expected_delta_members

    spec = load_experiment_spec(experiment_dir)
    exp = spec.experiment_dir
    gaps = reconcile.pool_gaps(spec)
    members = [m for m in (reconcile.expected_members(spec) or records.member_part_ids(exp)) if m not in gaps]
    trials = _trial_states(exp / POOL_STAGE)
    failed = {k: v["error"] for k, v in trials.items() if v["error"] and not v["done"]}
    running = [k for k, v in trials.items() if not v["done"] and not v["error"]]
    pool_done = (exp / POOL_STAGE / DONE_MARKER).exists() and not gaps
    expected = spec.n_members()
    analysis_dir = exp / "analysis"
    unc = None
    if spec.uncertainty is not None:
        utrials = _trial_states(exp / UNCERTAINTY_STAGE, _uncertainty_trial_finished)
        ufailed = {k: v["error"] for k, v in utrials.items() if v["error"] and not v["done"]}
        want = expected_delta_members(spec, pool_complete=not gaps)
        ugaps = reconcile.uncertainty_gaps(spec, want)
        udone = len(want) - len(ugaps)
        marked = (exp / UNCERTAINTY_STAGE / DONE_MARKER).exists()
        unc = {"state": "done" if marked and not ugaps and not gaps
               else ("failed" if ufailed else ("running" if utrials and not marked else "incomplete" if marked
                                               else "pending")),
               "members_done": udone, "members_expected": len(want) or expected, "failed": ufailed,
               "missing": ugaps}
    attempts = records.load_attempts(exp)
    restarts = {stage: int(len(g) - g["run"].nunique()) for stage, g in attempts.groupby("stage")}
    driver = driver_running(exp)
    finished = (exp / "analysis" / "summary.json").exists()
    from .outbox import summary, unsent
    from .tracking import OUTBOX_FILE

    waiting = unsent(exp / OUTBOX_FILE)
    return _interrupted({
        "experiment": str(exp), "name": spec.name,
        "driver": driver or ("finished" if finished else "not running"),
        "restarts": restarts,
        "pool": {"state": "done" if pool_done else ("incomplete" if (exp / POOL_STAGE / DONE_MARKER).exists()
                                                    else "failed" if failed
                                                    else ("running" if running or members else "pending")),
                 "missing": gaps,
                 "members_done": len(members), "members_expected": expected,
                 # an imported pool has no pool trials: its runs are done once its members are
                 "runs_done": (spec.n_runs() or 0) if spec.imported is not None and pool_done
                 else sum(v["done"] for v in trials.values()), "runs_expected": spec.n_runs(),
                 "runs_unfinished": running, "failed": failed},
        "uncertainty": unc,
        "analysis": {"state": "done" if (analysis_dir / "summary.json").exists() else "pending",
                     "dir": str(analysis_dir)},
        "mlflow_unsent": {"operations": len(waiting), "what": summary(waiting) if waiting else "",
                          "file": str(exp / OUTBOX_FILE)},
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
    u = st.get("uncertainty")
    states = (p["state"], (u or {}).get("state"))
    if st["driver"] in ("not running", "finished") and "incomplete" in states:
        lines.append(f"            incomplete (records missing, listed below): `{command('oodsweep', 'resume', st['experiment'])}` "
                     f"redoes them")
    elif st["driver"] == "not running" and any(s not in (None, "done") for s in states):
        lines.append(f"            interrupted: `{command('oodsweep', 'resume', st['experiment'])}` continues it")
    lines += [f"  pool      {p['state']:8s} members {p['members_done']}/{p['members_expected']}, "
             f"runs {p['runs_done']}/{p['runs_expected']} finished"
             + (f", {st['restarts']['pool']} restarted from a checkpoint" if st["restarts"].get("pool") else "")]
    for name in p["runs_unfinished"]:
        lines.append(f"            unfinished: {name}")
    for name, err in p["failed"].items():
        lines.append(f"            FAILED {name}: {err}")
    for name, why in p.get("missing", {}).items():
        if p["state"] == "incomplete":
            lines.append(f"            missing {name}: {why}")
    if u is not None:
        lines.append(f"  uncertainty {u['state']:6s} members {u['members_done']}/{u['members_expected']}"
                     + (f", {st['restarts']['uncertainty']} restarted" if st["restarts"].get("uncertainty") else ""))
        for name, err in u["failed"].items():
            lines.append(f"            FAILED {name}: {err}")
        for name, why in u.get("missing", {}).items():
            if u["state"] == "incomplete":
                lines.append(f"            missing {name}: {why}")
    lines.append(f"  analysis  {a['state']:8s} {a['dir']}")
    m = st.get("mlflow_unsent") or {}
    if m.get("operations"):
        lines.append(f"  mlflow    {m['operations']} operation(s) on {m['what']} not sent yet ({m['file']}): the "
                     f"next `oodsweep resume` or `oodsweep analyze` sends them")
    return "\n".join(lines)
