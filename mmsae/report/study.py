"""Stage study: the filtering curve over runs (e.g. toy-world seeds), and what it found.

Reads each run's report.json (--run NAME=PATH for the SFT runs, --dpo NAME=PATH for runs fine-tuned with
DPO, a block of their own; the workflow passes results/{run}/report/report.json for config study.runs /
study.dpo_runs): its filtering curve (`curve.arms`: one row per fine-tuned arm, the benchmark metrics and
the bad share per corruption kind of its training subset) and its AUROC per method and kind (`auroc`).
Corruption kinds, metrics and methods are read from the runs, never assumed.

Per run, the random arms are first averaged over their seeds (one value per run and fraction); then per
block, method, kept fraction and metric: mean, sd (sample sd over runs; NaN with one run), n_runs.

The decision rule ("beats by more than 2 sd"): per run r, d_r = metric(method) - metric(reference), the
reference at the same kept fraction (random, model_loss, IFD) or its one arm (the whole pool); the method
beats the reference when mean(d) > 2 sd(d) over the runs both have (the sd of the paired difference over
seeds, which removes what a seed does to both arms), loses when mean(d) < -2 sd(d), and is level otherwise;
with fewer than 2 runs there is no sd and no decision ("one run").

Writes, atomically:
  OUT/study.parquet  block, method, fraction, metric (a benchmark metric, bad_share or bad_share.<kind>),
                     mean, sd, n_runs, run:<name> per run
  OUT/study.json     the findings (best method per fraction and metric with its 2-sd decisions against
                     random and the whole pool, where the metrics disagree, the bad kinds each method
                     keeps, whether the best SAE-based selection at <= study.max_fraction beats the whole
                     pool, random, model_loss and IFD, why not from bad-kind shares and per-kind AUROCs,
                     every SAE-based selection at <= max_fraction against those four (`sae_versus`: the
                     best by mean may miss the 2-sd rule where a steadier one clears it), and a "what
                     this means" paragraph generated from those comparisons)
  OUT/study.html     the same, findings first, every data-born name escaped
  OUT/study.png      mean +- sd against kept fraction, one panel per metric, one row per block
  OUT/manifest.json

Example:
  python workflow/scripts/study.py --run s0=results/study-s0/report/report.json \\
      --run s1=results/study-s1/report/report.json --dpo dpo=results/study-dpo/report/report.json \\
      --out results/study
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.errors import InputError
from mmsae.params import StudyParams
from mmsae.report.build import json_safe
from mmsae.report.compare import read_reports
from mmsae.report.html import figure, page, para, section, table
from mmsae.scoring.methods import uses_sae

STAGE = "study"
# arms that are references, not contenders for "the best method"
REFERENCES = ("start", "all", "clean", "oracle", "random")
SINGLE = ("start", "all", "clean")  # one arm per run, compared at every fraction
# the references the study question names, in the order a sentence lists them ("whole pool" = all)
QUESTION = ("all", "random", "model_loss", "ifd")
NAMES = {"all": "the whole pool", "random": "random", "clean": "every clean sample", "start": "the starting model"}
NOT_METRICS = {"method", "fraction", "seed", "n_train"}
SD_RULE = ("2 sd = twice the sample sd over runs of the paired difference (method minus reference, per run; "
           "random averaged over its seeds within each run); level = within 2 sd; one run = no decision")


def name(method: str) -> str:
    return NAMES.get(method, method)


# --------------------------------------------------------------------------------------------------
# reading


def read_arms(reports: Mapping[str, Mapping], block: str) -> pd.DataFrame:
    """Every run's curve arms as one frame with columns block, run, method, fraction, seed and the rest."""
    frames = []
    for run, rep in reports.items():
        arms = (rep.get("curve") or {}).get("arms")
        if not arms:
            raise InputError(f"{run}: report.json", "curve.arms", "no filtering curve (build the run with curve.enabled)")
        f = pd.DataFrame(arms)
        missing = [c for c in ("method", "fraction") if c not in f.columns]
        if missing:
            raise InputError(f"{run}: report.json", f"curve.arms.{missing[0]}", "missing")
        frames.append(f.assign(block=block, run=run))
    out = pd.concat(frames, ignore_index=True)
    out["method"], out["fraction"] = out["method"].astype(str), out["fraction"].astype(float)
    return out


def metric_columns(arms: pd.DataFrame, wanted: Sequence[str] | None = None) -> list[str]:
    """The overall benchmark metrics the arms carry (no per-task 'metric.task' columns; llava_bench.overall
    counts as overall), or `wanted`, each checked to be there."""
    have = [c for c in arms.columns if c not in NOT_METRICS | {"block", "run"} and not c.startswith("bad_share")
            and ("." not in c or c == "llava_bench.overall")]
    if wanted is None:
        if not have:
            raise InputError("report.json", "curve.arms", "no benchmark metric in the curves")
        return sorted(have)
    for m in wanted:
        if m not in arms.columns:
            raise InputError("study.metrics", m, f"not measured by the runs; have {sorted(have)}")
    return list(wanted)


def kinds_of(arms: pd.DataFrame) -> list[str]:
    return sorted(c[len("bad_share."):] for c in arms.columns if c.startswith("bad_share."))


def per_run(arms: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """One row per (block, run, method, fraction): `columns` averaged over seeds (the random arms)."""
    cols = [c for c in columns if c in arms.columns]
    num = arms[["block", "run", "method", "fraction"]].join(arms[cols].apply(pd.to_numeric, errors="coerce"))
    return num.groupby(["block", "run", "method", "fraction"], sort=True)[cols].mean().reset_index()


def aggregate(runs: pd.DataFrame, columns: Sequence[str], run_names: Sequence[str]) -> pd.DataFrame:
    """block, method, fraction, metric, mean, sd (NaN for one run), n_runs, run:<name> for each run."""
    rows = []
    for (block, method, fraction), g in runs.groupby(["block", "method", "fraction"], sort=True):
        by_run = g.set_index("run")
        for col in columns:
            if col not in by_run.columns:
                continue
            v = by_run[col].reindex(run_names).to_numpy(np.float64)
            ok = v[np.isfinite(v)]
            if not len(ok):
                continue
            rows.append({"block": block, "method": method, "fraction": float(fraction), "metric": col,
                         "mean": float(ok.mean()), "sd": float(ok.std(ddof=1)) if len(ok) > 1 else math.nan,
                         "n_runs": len(ok), **{f"run:{r}": float(x) for r, x in zip(run_names, v, strict=True)}})
    cols = ["block", "method", "fraction", "metric", "mean", "sd", "n_runs", *[f"run:{r}" for r in run_names]]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------------
# decisions


def values(runs: pd.DataFrame, method: str, fraction: float, metric: str) -> pd.Series:
    """Per run: `metric` of `method` at `fraction` (a single arm - start, all, clean - at its own)."""
    sel = runs["method"] == method
    if method not in SINGLE:
        sel &= np.isclose(runs["fraction"], fraction)
    g = runs.loc[sel]
    if metric not in g.columns:
        return pd.Series(dtype=np.float64)
    return pd.Series(g[metric].to_numpy(np.float64), index=g["run"].to_numpy()).dropna()


def compare(runs: pd.DataFrame, method: str, reference: str, fraction: float, metric: str) -> dict[str, Any] | None:
    """The paired comparison of `method` with `reference` (see the module docstring), None when they share
    no run: diff (mean of per-run differences), sd, n_runs, verdict beats / level / loses / one run."""
    a, b = values(runs, method, fraction, metric), values(runs, reference, fraction, metric)
    d = (a - b).dropna()
    if not len(d):
        return None
    diff = float(d.mean())
    sd = float(d.std(ddof=1)) if len(d) > 1 else math.nan
    if len(d) < 2:
        verdict = "one run"
    elif diff > 2 * sd:
        verdict = "beats"
    elif diff < -2 * sd:
        verdict = "loses"
    else:
        verdict = "level"
    return {"method": method, "reference": reference, "fraction": fraction, "metric": metric, "diff": diff, "sd": sd,
            "n_runs": len(d), "verdict": verdict}


def contenders(runs: pd.DataFrame) -> list[str]:
    return sorted(m for m in runs["method"].unique() if m not in REFERENCES)


def fractions_of(runs: pd.DataFrame) -> list[float]:
    return sorted(runs.loc[~runs["method"].isin(SINGLE), "fraction"].unique().tolist())


def mean_of(study: pd.DataFrame, method: str, fraction: float | None, metric: str) -> tuple[float, float, int]:
    sel = (study["method"] == method) & (study["metric"] == metric)
    if fraction is not None and method not in SINGLE:
        sel &= np.isclose(study["fraction"], fraction)
    r = study.loc[sel]
    return (float(r["mean"].iloc[0]), float(r["sd"].iloc[0]), int(r["n_runs"].iloc[0])) if len(r) else (
        math.nan, math.nan, 0)


def best_table(runs: pd.DataFrame, study: pd.DataFrame, metrics: Sequence[str]) -> list[dict]:
    """Per fraction and metric: the best contender by mean and its decisions against random and the pool."""
    out = []
    for f in fractions_of(runs):
        for metric in metrics:
            means = {m: mean_of(study, m, f, metric)[0] for m in contenders(runs)}
            means = {m: v for m, v in means.items() if np.isfinite(v)}
            if not means:
                continue
            best = max(sorted(means), key=lambda m: means[m])
            mean, sd, n = mean_of(study, best, f, metric)
            out.append({"fraction": f, "metric": metric, "best": best, "mean": mean, "sd": sd, "n_runs": n,
                        "tied": sorted(m for m, v in means.items() if v == means[best]),
                        "vs": {ref: compare(runs, best, ref, f, metric) for ref in ("random", "all")}})
    return out


def disagreements(best: Sequence[Mapping]) -> list[dict]:
    """Fractions where the metrics name different best methods: {fraction, best: {metric: method}}. A
    metric on which several methods tie for the best agrees with any of them."""
    out = []
    for f in sorted({b["fraction"] for b in best}):
        rows = [b for b in best if b["fraction"] == f]
        if not set.intersection(*(set(b.get("tied") or [b["best"]]) for b in rows)):
            out.append({"fraction": f, "best": {b["metric"]: b["best"] for b in rows}})
    return out


def bad_kinds(study: pd.DataFrame, kinds: Sequence[str]) -> list[dict]:
    """Per method and fraction: the mean share of each corruption kind in its training subsets."""
    rows = []
    shares = study[study["metric"].str.startswith("bad_share")]
    for (method, fraction), g in shares.groupby(["method", "fraction"], sort=True):
        m = g.set_index("metric")["mean"]
        rows.append({"method": method, "fraction": float(fraction), "bad_share": m.get("bad_share", math.nan),
                     **{k: float(m.get(f"bad_share.{k}", math.nan)) for k in kinds}})
    return rows


def auroc_means(reports: Mapping[str, Mapping]) -> dict[tuple[str, str], float]:
    """(method, kind) -> mean AUROC over the runs (the report's main table: the configured SAE)."""
    vals: dict[tuple[str, str], list[float]] = {}
    for rep in reports.values():
        for r in rep.get("auroc") or []:
            if r.get("auroc") is not None and np.isfinite(r["auroc"]):
                vals.setdefault((str(r["method"]), str(r["kind"])), []).append(float(r["auroc"]))
    return {k: float(np.mean(v)) for k, v in vals.items()}


def costly_kind(runs: pd.DataFrame, kinds: Sequence[str], metric: str) -> tuple[str, float] | None:
    """The corruption kind whose share in a subset goes with the largest fall of `metric` over every arm
    of every run (the most negative Pearson r; selective and reference arms alike), or None when no
    kind's share goes with a lower metric (r < 0)."""
    arms = runs[~runs["method"].isin(["start"])]
    best = None
    for k in kinds:
        col = f"bad_share.{k}"
        if col not in arms or metric not in arms:
            continue
        x, y = arms[col].to_numpy(np.float64), arms[metric].to_numpy(np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
            continue
        r = float(np.corrcoef(x[ok], y[ok])[0, 1])
        if r < 0 and (best is None or r < best[1]):
            best = (k, r)
    return best


def sae_versus(runs: pd.DataFrame, metric: str, max_fraction: float) -> list[dict[str, Any]]:
    """Every SAE-based selection at kept fractions <= max_fraction with its decisions against the whole pool,
    random, model_loss and IFD (those measured). The best by mean (sae_verdict) is one of these rows; a
    steadier one may clear the 2-sd rule where it does not."""
    rows = []
    for m in contenders(runs):
        if not uses_sae(m):
            continue
        for f in fractions_of(runs):
            if f <= max_fraction + 1e-9:
                vs = {ref: compare(runs, m, ref, f, metric) for ref in QUESTION}
                rows.append({"metric": metric, "method": m, "fraction": f,
                             "vs": {k: v for k, v in vs.items() if v is not None}})
    return rows


def sae_verdict(study: pd.DataFrame, rows: Sequence[Mapping]) -> dict[str, Any] | None:
    """The best of one metric's sae_versus rows by mean, with its decisions; None without an SAE-based arm."""
    scored = [(mean_of(study, r["method"], r["fraction"], r["metric"]), r) for r in rows]
    scored = [(ms, r) for ms, r in scored if np.isfinite(ms[0])]
    if not scored:
        return None
    (mean, sd, n), row = max(scored, key=lambda s: (s[0][0], s[1]["method"], -s[1]["fraction"]))
    wins = bool(row["vs"]) and all(v["verdict"] == "beats" for v in row["vs"].values())
    return {**row, "mean": mean, "sd": sd, "n_runs": n, "wins": wins}


def versus_sentence(metric: str, rows: Sequence[Mapping], max_fraction: float) -> str:
    """Which SAE-based selections beat both loss-based references (model_loss, IFD) by more than 2 sd, and
    how each fares against the whole pool."""
    loss_refs = [r for r in ("model_loss", "ifd") if any(r in row["vs"] for row in rows)]
    if not loss_refs:
        return ""
    both = [row for row in rows if all((row["vs"].get(r) or {}).get("verdict") == "beats" for r in loss_refs)]
    refs = " and ".join(name(r) for r in loss_refs)
    if not both:
        return f"On {metric}, no SAE-based selection at <= {_pct(max_fraction)} kept beats {refs} by more than 2 sd."
    pool = {"beats": "beats", "loses": "loses to", "level": "is level with"}
    items = [f"{row['method']} at {_pct(row['fraction'])}"
             + (f" ({pool[row['vs']['all']['verdict']]} the whole pool)" if "all" in row["vs"] else "")
             for row in both]
    return f"On {metric}, SAE-based selections that beat {refs} by more than 2 sd: " + "; ".join(items) + "."


def why_not(runs: pd.DataFrame, study: pd.DataFrame, verdict: Mapping, kinds: Sequence[str],
            aurocs: Mapping[tuple[str, str], float]) -> dict[str, Any]:
    """Why the best SAE selection does not win: the best contender at its fraction (the winner), the
    kinds the SAE selection keeps more of than the winner (mean share, largest gap first) with both
    methods' AUROC on them, and the kind whose share costs the metric most."""
    f, metric, method = verdict["fraction"], verdict["metric"], verdict["method"]
    means = {m: mean_of(study, m, f, metric)[0] for m in contenders(runs)}
    finite = {m: v for m, v in means.items() if np.isfinite(v)}
    top = max(finite.values())
    # a tie with the leader is no lead: the SAE selection itself is then the best contender
    winner = method if finite.get(method) == top else min(m for m, v in finite.items() if v == top)
    share = {(m, k): mean_of(study, m, f, f"bad_share.{k}")[0] for m in (method, winner) for k in kinds}
    kept = []
    for k in kinds:
        a, b = share[(method, k)], share[(winner, k)]
        if np.isfinite(a) and np.isfinite(b) and a > b:
            kept.append({"kind": k, "share": a, "winner_share": b, "auroc": aurocs.get((method, k)),
                         "winner_auroc": aurocs.get((winner, k))})
    kept.sort(key=lambda r: r["winner_share"] - r["share"])
    costly = costly_kind(runs, kinds, metric)
    return {"winner": winner, "kinds": kept, "costly": {"kind": costly[0], "r": costly[1]} if costly else None}


# --------------------------------------------------------------------------------------------------
# sentences (generated from the comparisons above; no conclusion is written by hand)


def _pct(f: float) -> str:
    return f"{f:.0%}"


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _diff(c: Mapping, sd_digits: int) -> str:
    """A comparison's mean paired difference, ± its sd where there is one."""
    sd = f" ± {c['sd']:.{sd_digits}g}" if np.isfinite(c["sd"]) else ""
    return f"{c['diff']:+.3g}{sd}"


def _cmp_text(c: Mapping | None) -> str:
    if c is None:
        return "n/a"
    verdict = {"beats": "beats", "loses": "loses to", "level": "is level with (within 2 sd)",
               "one run": "differs by (one run, no sd) from"}[c["verdict"]]
    return f"{verdict} {name(c['reference'])}: {_diff(c, 3)}"


def verdict_sentence(v: Mapping) -> str:
    parts = [_cmp_text(v["vs"].get(ref)) for ref in QUESTION if ref in v["vs"]]
    missing = [name(ref) for ref in QUESTION if ref not in v["vs"]]
    head = (f"{v['metric']}: the best SAE-based selection at <= {_pct(v['max_fraction'])} kept is {v['method']} at "
            f"{_pct(v['fraction'])} ({v['mean']:.3g}" + (f" ± {v['sd']:.3g}" if np.isfinite(v["sd"]) else "")
            + f", {_runs(v['n_runs'])}). It " + "; it ".join(parts) + ".")
    tail = f" Not measured: {', '.join(missing)}." if missing else ""
    if v["n_runs"] < 2:
        answer = " Measured once: there is no sd, so no 2-sd decision (it does not count as a win)."
    elif v["wins"]:
        answer = " So it WINS: it beats every reference measured by more than 2 sd."
    else:
        answer = (" So it does NOT win: it fails to beat " + ", ".join(
            name(k) for k, c in v["vs"].items() if c["verdict"] != "beats") + " by more than 2 sd.")
    return head + tail + answer


def why_sentence(v: Mapping, why: Mapping) -> str:
    w = why["winner"]
    if w == v["method"]:
        text = (f"{v['method']} is the best contender at {_pct(v['fraction'])} on {v['metric']}, yet not by 2 sd "
                "over every reference")
    else:
        text = f"At {_pct(v['fraction'])} on {v['metric']}, {w} leads"
    if why["kinds"]:
        bits = []
        for k in why["kinds"]:
            au = (f", AUROC {k['auroc']:.2f} vs {k['winner_auroc']:.2f}"
                  if k["auroc"] is not None and k["winner_auroc"] is not None else "")
            bits.append(f"{k['kind']} ({k['share']:.1%} vs {k['winner_share']:.1%} of the subset{au})")
        text += f". {v['method']} keeps more bad samples than {w} of: " + "; ".join(bits)
    elif w != v["method"]:
        text += f". {v['method']} keeps no kind of bad sample more than {w} does: the gap is not the bad share"
    if why["costly"]:
        c = why["costly"]
        text += (f". Over every arm, {v['metric']} falls most with the share of {c['kind']} "
                 f"(Pearson r = {c['r']:.2f})")
    return text + "."


def meaning(block: str, n_runs: int, best: Sequence[Mapping], verdicts: Sequence[Mapping],
            disagree: Sequence[Mapping], whys: Mapping[str, Mapping], versus: Sequence[Mapping] = (),
            max_fraction: float = 0.5) -> str:
    """The "what this means" paragraph: one templated sentence per finding, chosen by the numbers."""
    s = []
    if n_runs < 2:
        s.append(f"The {block} block is measured once ({_runs(n_runs)}): there is no sd, so nothing in it is "
                 "decided by the 2-sd rule; its numbers are single measurements.")
        for v in verdicts:
            s.append(f"On {v['metric']}, the best SAE-based selection ({v['method']} at {_pct(v['fraction'])}) is "
                     + ", ".join(f"{c['diff']:+.3g} from {name(k)}" for k, c in v["vs"].items()) + ".")
        return " ".join(s)
    beats_pool = [b for b in best if (b["vs"].get("all") or {}).get("verdict") == "beats"]
    if beats_pool:
        f = min(b["fraction"] for b in beats_pool)
        s.append(f"In the {block} block ({_runs(n_runs)}), selecting data pays: at {_pct(f)} kept, the best selection "
                 f"beats the whole pool by more than 2 sd on {len({b['metric'] for b in beats_pool if b['fraction'] == f})}"
                 f" of {len({b['metric'] for b in best})} metrics.")
    else:
        s.append(f"In the {block} block ({_runs(n_runs)}), no selection beats the whole pool by more than 2 sd on any "
                 "metric: on this data, filtering saves compute but does not improve the model.")
    for v in verdicts:
        vs = v["vs"]
        beaten = [k for k, c in vs.items() if c["verdict"] == "beats"]
        if v["wins"]:
            s.append(f"On {v['metric']}, the SAE adds what the other signals miss: {v['method']} beats "
                     + ", ".join(name(k) for k in beaten) + ".")
        elif "model_loss" in vs and vs["model_loss"]["verdict"] != "beats" and any(
                vs[k]["verdict"] == "beats" for k in ("random", "all") if k in vs):
            ml = vs["model_loss"]
            loss = ("the model's own loss does better" if ml["verdict"] == "loses" else
                    f"it is not above the model's own loss by more than 2 sd ({ml['diff']:+.3g} ± {ml['sd']:.2g})")
            s.append(f"On {v['metric']}, {v['method']} filters better than "
                     + " and ".join(name(k) for k in ("random", "all") if k in vs and vs[k]["verdict"] == "beats")
                     + f", but {loss}: the SAE does not yet see what the loss cannot.")
        elif "random" in vs and vs["random"]["verdict"] == "loses":
            s.append(f"On {v['metric']}, even the best SAE-based selection ({v['method']}) is worse than random "
                     "selection by more than 2 sd: its score ranks the data the fine-tune needs last.")
        elif "random" in vs and vs["random"]["verdict"] != "beats":
            s.append(f"On {v['metric']}, the best SAE-based selection ({v['method']}) is not distinguishable from "
                     "random selection: its score does not rank the data that the fine-tune needs.")
        else:
            s.append(f"On {v['metric']}, {v['method']} beats " + (", ".join(name(k) for k in beaten) or "nothing")
                     + " but not every reference.")
        why = whys.get(v["metric"])
        if why and why["kinds"] and not v["wins"]:
            k = why["kinds"][0]
            s.append(f"Its largest excess is {k['kind']} ({k['share']:.1%} of its subset vs {k['winner_share']:.1%} "
                     f"for {why['winner']}).")
    for metric in dict.fromkeys(row["metric"] for row in versus):
        s.append(versus_sentence(metric, [row for row in versus if row["metric"] == metric], max_fraction))
    if disagree:
        s.append(f"The metrics disagree on the best method at {len(disagree)} of "
                 f"{len({b['fraction'] for b in best})} fractions, so a single metric would mislead there.")
    return " ".join(x for x in s if x)


# --------------------------------------------------------------------------------------------------
# the whole study


def analyse(blocks: Mapping[str, Mapping[str, Mapping]], metrics: Sequence[str] | None = None,
            max_fraction: float = 0.5) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(study table, findings) of {block: {run name: report dict}}; see the module docstring."""
    tables, found = [], {"sd_rule": SD_RULE, "max_fraction": max_fraction, "blocks": {}}
    for block, reports in blocks.items():
        if not reports:
            continue
        arms = read_arms(reports, block)
        mets, kinds = metric_columns(arms, metrics), kinds_of(arms)
        shares = [c for c in ("bad_share", *[f"bad_share.{k}" for k in kinds]) if c in arms.columns]
        runs = per_run(arms, [*mets, *shares])
        study = aggregate(runs, [*mets, *shares], list(reports))
        tables.append(study)
        best = best_table(runs, study, mets)
        aurocs = auroc_means(reports)
        verdicts, whys, versus = [], {}, []
        for metric in mets:
            rows = sae_versus(runs, metric, max_fraction)
            versus += rows
            v = sae_verdict(study, rows)
            if v is None:
                continue
            v = {**v, "max_fraction": max_fraction}
            v["sentence"] = verdict_sentence(v)
            if not v["wins"]:
                whys[metric] = why_not(runs, study, v, kinds, aurocs)
                v["why"] = why_sentence(v, whys[metric])
            verdicts.append(v)
        disagree = disagreements(best)
        found["blocks"][block] = {
            "runs": list(reports), "metrics": mets, "kinds": kinds, "best": best, "disagreements": disagree,
            "bad_kinds": bad_kinds(study, kinds), "sae": verdicts, "sae_versus": versus,
            "auroc": [{"method": m, "kind": k, "auroc": a} for (m, k), a in sorted(aurocs.items())],
            "meaning": meaning(block, len(reports), best, verdicts, disagree, whys, versus, max_fraction),
        }
    if not tables:
        raise InputError("study.runs", "runs", "no runs to aggregate")
    return pd.concat(tables, ignore_index=True), found


# --------------------------------------------------------------------------------------------------
# the page


def _ms(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3g}" + (f" ± {sd:.2g}" if np.isfinite(sd) else "")


def _cmp_short(c: Mapping | None) -> str:
    return "n/a" if c is None else f"{c['verdict']} {_diff(c, 2)}"


def render(study: pd.DataFrame, found: Mapping[str, Any], png: str | None) -> str:
    parts = ["<h1>Filtering study: does SAE-based selection help?</h1>"]
    findings = []
    for block, b in found["blocks"].items():
        findings.append(para(f"[{block}, runs: {', '.join(b['runs'])}] {b['meaning']}"))
        for v in b["sae"]:
            findings.append(para(v["sentence"]))
            if "why" in v:
                findings.append(para("Why: " + v["why"]))
    parts.append(section("What was found", *findings, para("Decision rule: " + found["sd_rule"] + ".", "note")))
    for block, b in found["blocks"].items():
        rows = [[_pct(r["fraction"]), r["metric"], r["best"], _ms(r["mean"], r["sd"]),
                 *[_cmp_text(r["vs"].get(ref)) for ref in ("random", "all")]] for r in b["best"]]
        parts.append(section(f"{block}: best method per kept fraction and metric",
                             table(["kept", "metric", "best method", "mean ± sd", "vs random", "vs whole pool"], rows)))
        if b["disagreements"]:
            rows = [[_pct(d["fraction"]), "; ".join(f"{m}: {w}" for m, w in d["best"].items())]
                    for d in b["disagreements"]]
            parts.append(section(f"{block}: where the metrics disagree", table(["kept", "best by metric"], rows)))
        else:
            parts.append(section(f"{block}: where the metrics disagree", para("nowhere: every metric names the same "
                                                                              "best method at every fraction")))
        if b["sae_versus"]:
            rows = [[r["metric"], r["method"], _pct(r["fraction"]), *[_cmp_short(r["vs"].get(ref)) for ref in QUESTION]]
                    for r in b["sae_versus"]]
            parts.append(section(f"{block}: every SAE-based selection at <= {_pct(found['max_fraction'])} kept against "
                                 "the references (mean paired difference ± sd over runs)",
                                 table(["metric", "method", "kept", *[name(r) for r in QUESTION]], rows)))
        blk = study[study["block"] == block]
        for metric in b["metrics"]:
            cell = {(r.method, r.fraction): _ms(r.mean, r.sd) for r in blk[blk["metric"] == metric].itertuples()}
            fr = sorted({f for _, f in cell})
            rows = [[m, *[cell.get((m, f), "") for f in fr]] for m in sorted({m for m, _ in cell})]
            parts.append(section(f"{block}: {metric}, mean ± sd over runs",
                                 table(["method", *[_pct(f) for f in fr]], rows)))
        if b["kinds"]:
            rows = [[r["method"], _pct(r["fraction"]), *[r[k] for k in ("bad_share", *b["kinds"])]]
                    for r in b["bad_kinds"]]
            parts.append(section(f"{block}: bad samples kept (mean share of the training subset)",
                                 table(["method", "kept", "bad share", *b["kinds"]], rows)))
        au = {(r["method"], r["kind"]): r["auroc"] for r in b["auroc"]}
        if au:
            kinds = sorted({k for _, k in au})
            rows = [[m, *[au.get((m, k)) for k in kinds]] for m in sorted({m for m, _ in au})]
            parts.append(section(f"{block}: AUROC per corruption kind (mean over runs; P(score(clean) > "
                                 "score(bad)))", table(["method", *kinds], rows)))
    parts.append(section("Curves (mean ± sd over runs)", figure(png, "study curves")))
    cols = list(study.columns)
    parts.append(section("All rows", table(cols, study.astype("object").where(study.notna(), None).values.tolist())))
    return page("Filtering study", "\n".join(parts))


# --------------------------------------------------------------------------------------------------
# the stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    run: tuple[str, ...] = cli.arg("an SFT run's report.json (repeat for every run)", default=(), action="append",
                                   metavar="NAME=PATH")
    dpo: tuple[str, ...] = cli.arg("a DPO run's report.json: a block of its own (repeatable)", default=(),
                                   action="append", metavar="NAME=PATH")


def run(inputs: Inputs, params: StudyParams, out: Path) -> None:
    from mmsae.report import plots  # matplotlib only for the figure

    if not inputs.run and not inputs.dpo:
        raise InputError("arguments", "--run", "no runs to aggregate")
    timer = Timer()
    blocks = {"sft": read_reports(inputs.run), "dpo": read_reports(inputs.dpo)}
    with timer("aggregate"):
        study, found = analyse(blocks, params.metrics, params.max_fraction)
        png = plots.study_curves(study, {b: f["metrics"] for b, f in found["blocks"].items()})
    with atomic_dir(out) as tmp:
        study.to_parquet(tmp / Files.STUDY, index=False)
        write_json(tmp / Files.STUDY_JSON, json_safe(found))
        (tmp / Files.STUDY_HTML).write_text(render(study, found, png))
        if png:
            (tmp / Files.STUDY_PLOT).write_bytes(base64.b64decode(png))
        manifest_inputs = {f"{flag}:{p.partition('=')[0]}": p.partition("=")[2]
                           for flag, pairs in (("run", inputs.run), ("dpo", inputs.dpo)) for p in pairs}
        write_manifest(tmp, STAGE, params.as_dict(), manifest_inputs,
                       {"n_runs": len(inputs.run), "n_dpo_runs": len(inputs.dpo), "rows": len(study)}, timer.timings)
