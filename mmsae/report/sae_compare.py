"""Stage sae_compare: SAE architectures x modality mixes x sparsity settings x seeds, side by side.

`plan(config)` lists the compared SAEs (the workflow trains each as a train_sae variant and carries it
through its own encode / features / score / premise / evaluate_sae folders). `run` reads, per SAE (--sae
JSON, repeated: its labels and folders):

  train_sae/metrics.json     held-out L0, centred FVU per modality, dead fraction
  evaluate_sae/summary.parquet   CE and KL score with the SAE spliced into the model (row model=mllm)
  premise/premise.json       per concept: text and image AUROC of its best shared feature, min of the two
  score/scores.parquet       + the pool's samples.parquet: AUROC of every consistency* score per corruption
  score/manifest.json        the concept features found (none: the consistency scores are constant, AUROC n/a)

and writes, atomically, into --out:

  runs.parquet     one row per SAE (architecture, mix, sparsity key and value, seed) and its numbers
  summary.parquet  one row per (architecture, mix, setting): mean and sd over seeds of every number
  auroc.parquet    per SAE, consistency score and corruption kind: AUROC
  pareto.png       FVU (image, text) against L0: a point per setting, a line per architecture x mix
  index.html       the report section: findings first (generated from the numbers), then the tables
  findings.json    the findings as sentences and the numbers behind them
  manifest.json
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, read_manifest, write_json, write_manifest
from mmsae.config import load_schema, validate
from mmsae.errors import InputError
from mmsae.evaluation.auroc import DIRECTION, auroc_table
from mmsae.params import SaeCompareParams
from mmsae.report.html import page, para, section, table

STAGE = "sae_compare"
NOISE = "noise_image"
MISMATCH = "mismatch"
# the numbers of runs.parquet that summary.parquet averages over seeds
METRICS = ["l0", "fvu", "fvu_image", "fvu_text", "dead_fraction", "ce_score", "kl_score", "premise_min_auroc",
           "premise_text_auroc_min", "premise_text_auroc_max", "premise_image_auroc_min", "premise_image_auroc_max",
           "n_concept_features", "mismatch_auroc", "noise_auroc"]
SIGN_TEST_ALPHA = 0.05  # balance "helps" / "hurts" only where the pairs' signs say so at this level
KEYS = ["architecture", "mix", "sparsity_key", "sparsity_value"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    samples: Path = cli.arg("the pool's sample artifact folder (corruption labels of the toy world)")
    sae: tuple[str, ...] = cli.arg("one compared SAE as JSON: architecture, mix, sparsity_key, sparsity_value, "
                                   "seed and the folders train_sae, evaluate_sae, premise, score; repeatable",
                                   default=(), action="append", metavar="JSON")


# ---- the plan -------------------------------------------------------------------------------------------
def mix_label(mix: str | dict[str, Any]) -> str:
    """'natural', 'balanced' or 'image=0.7,text=0.3'."""
    return mix if isinstance(mix, str) else ",".join(f"{k}={v:g}" for k, v in sorted(mix.items()))


def architectures(params: SaeCompareParams) -> list[str]:
    """The compared architectures: the configured ones, or every value of train_sae.architecture's enum."""
    known = load_schema()["properties"]["train_sae"]["properties"]["architecture"]["enum"]
    chosen = list(known) if params.architectures is None else list(params.architectures)
    for a in chosen:
        if a not in known:
            raise InputError("config", "sae_compare.architectures", f"{a!r} is not a train_sae architecture {known}")
        if a not in params.sparsity:
            raise InputError("config", f"sae_compare.sparsity.{a}", "missing: give its sparsity key and >= 3 values")
    return chosen


def plan(params: SaeCompareParams, train_sae: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per compared SAE: its labels and `variant` (the train_sae keys it overrides). Each variant is
    checked against the train_sae schema now, so a bad key stops the workflow before any job runs."""
    out = []
    schema = {"type": "object", "properties": {"train_sae": load_schema()["properties"]["train_sae"]}}  # read once
    for arch in architectures(params):
        (key, values), = params.sparsity[arch].items()
        for mix, value, seed in itertools.product(params.mixes, values, params.seeds):
            value = int(value) if key == "k" else value
            variant = {**params.train, "architecture": arch, key: value, "modality_mix": mix, "seed": seed}
            try:
                validate({"train_sae": {**train_sae, **variant}}, "config", schema)
            except InputError as exc:
                raise InputError("config", f"sae_compare ({arch}, {key}={value}): train_sae.{exc.field}",
                                 exc.message) from exc
            out.append({"architecture": arch, "mix": mix_label(mix), "sparsity_key": key, "sparsity_value": value,
                        "seed": seed, "variant": variant})
    return out


# ---- reading one SAE's folders --------------------------------------------------------------------------
def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, "file", f"unreadable ({exc.__class__.__name__})") from exc


def sae_row(spec: dict[str, Any], samples: pd.DataFrame, score_method: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """(runs.parquet row, auroc rows) of one compared SAE."""
    metrics = _json(Path(spec["train_sae"]) / Files.METRICS)
    ev = metrics.get("eval", {})
    row: dict[str, Any] = {k: spec[k] for k in (*KEYS, "seed")}
    row.update(l0=metrics["l0"], fvu=metrics["centred_fvu"], dead_fraction=metrics["dead_fraction"],
               fvu_image=ev.get("image", {}).get("centred_fvu", math.nan),
               fvu_text=ev.get("text", {}).get("centred_fvu", math.nan))
    summary = pd.read_parquet(Path(spec["evaluate_sae"]) / Files.SUMMARY)
    mllm = summary[summary["model"] == "mllm"]
    if mllm.empty:
        raise InputError(Path(spec["evaluate_sae"]) / Files.SUMMARY, "model", "no row for model 'mllm'")
    row.update(ce_score=float(mllm["ce_score_all"].iloc[0]), kl_score=float(mllm["kl_score_all"].iloc[0]))
    concepts = _json(Path(spec["premise"]) / Files.PREMISE).get("concepts", [])
    text = np.array([c["text_auroc"] for c in concepts], float)
    image = np.array([c["image_auroc"] for c in concepts], float)
    mins = np.array([c["min_auroc"] for c in concepts], float)
    row.update(premise_min_auroc=float(mins.mean()) if len(mins) else math.nan,
               premise_text_auroc_min=float(text.min()) if len(text) else math.nan,
               premise_text_auroc_max=float(text.max()) if len(text) else math.nan,
               premise_image_auroc_min=float(image.min()) if len(image) else math.nan,
               premise_image_auroc_max=float(image.max()) if len(image) else math.nan)
    scores = pd.read_parquet(Path(spec["score"]) / Files.SCORES)
    aurocs = auroc_table(scores, samples)
    aurocs = aurocs[aurocs["method"].str.startswith("consistency")].reset_index(drop=True)
    head = aurocs[aurocs["method"] == score_method].set_index("kind")["auroc"]
    # Without concept features (XMc) the consistency scores are one constant: their AUROC of 0.5 is no
    # ranking, not a measured one (a dense SAE whose features fire everywhere), so it is left out (NaN).
    n_concepts = read_manifest(spec["score"]).get("counts", {}).get("n_concept_features")
    ranked = n_concepts is None or n_concepts > 0
    row.update(n_concept_features=math.nan if n_concepts is None else float(n_concepts),
               mismatch_auroc=float(head.get(MISMATCH, math.nan)) if ranked else math.nan,
               noise_auroc=float(head.get(NOISE, math.nan)) if ranked else math.nan)
    for k in reversed((*KEYS, "seed")):
        aurocs.insert(0, k, spec[k])
    return row, aurocs


def read_labels(path: Path) -> pd.DataFrame:
    """sample_id and (the toy world's) corruption of the pool, without its images."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        cols = [c for c in ("sample_id", "corruption") if c in names]
        return pq.read_table(path, columns=cols).to_pandas()
    except OSError as exc:
        raise InputError(path, "file", f"unreadable ({exc.__class__.__name__})") from exc


# ---- aggregation and findings ---------------------------------------------------------------------------
def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (sample sd; 0 for one seed) over seeds of every metric, per (architecture, mix, setting)."""
    groups = runs.groupby(KEYS, sort=False, dropna=False)
    g = groups[METRICS]
    mean, sd = g.mean(), g.std(ddof=1).fillna(0.0)
    out = mean.add_suffix("_mean").join(sd.add_suffix("_sd"))
    out.insert(0, "n_seeds", groups["seed"].nunique())
    # the seeds whose consistency score ranked at all (concept features found): the AUROC means are over these
    out.insert(1, "n_ranked_seeds", groups["mismatch_auroc"].count())
    return out.reset_index()


def _pm(s: pd.Series, metric: str) -> str:
    if not np.isfinite(s[f"{metric}_mean"]):
        return "n/a"
    return f"{s[f'{metric}_mean']:.3f} ± {s[f'{metric}_sd']:.3f}"


def sign_test(better: int, worse: int) -> float:
    """Two-sided sign test: P(a split at least this uneven | better and worse equally likely)."""
    n, m = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2**n)


def _label(s: pd.Series) -> str:
    return f"{s['architecture']} / {s['mix']} / {s['sparsity_key']}={s['sparsity_value']:g}"


def findings(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Sentences (and their numbers) from the summary: the best cross-modal features, whether balance
    helps, the reconstruction trade-off. Nothing here is written by hand but the sentence frames."""
    out: list[dict[str, Any]] = []
    if summary.empty:
        return out
    ok = summary.dropna(subset=["premise_min_auroc_mean"])
    if not ok.empty:
        best = ok.loc[ok["premise_min_auroc_mean"].idxmax()]
        out.append({"kind": "best_cross_modal", "combination": _label(best),
                    "text": f"Best cross-modal features (premise: mean over concepts of min(text, image) AUROC of "
                            f"one shared feature): {_label(best)}, {_pm(best, 'premise_min_auroc')} "
                            f"(text {best['premise_text_auroc_min_mean']:.3f}-{best['premise_text_auroc_max_mean']:.3f}, "
                            f"image {best['premise_image_auroc_min_mean']:.3f}-{best['premise_image_auroc_max_mean']:.3f}); "
                            f"its consistency mismatch AUROC {_pm(best, 'mismatch_auroc')}, "
                            f"L0 {best['l0_mean']:.1f}, FVU image / text {best['fvu_image_mean']:.3f} / "
                            f"{best['fvu_text_mean']:.3f}."})
    ok = summary[summary["n_ranked_seeds"] == summary["n_seeds"]].dropna(subset=["mismatch_auroc_mean"])
    if not ok.empty:
        best = ok.loc[ok["mismatch_auroc_mean"].idxmax()]
        out.append({"kind": "best_consistency", "combination": _label(best),
                    "text": f"Highest mismatch AUROC of the consistency score: {_label(best)}, "
                            f"{_pm(best, 'mismatch_auroc')} (noise image {_pm(best, 'noise_auroc')})."})
    out.extend(balance_findings(summary))
    lo = summary.loc[summary["fvu_text_mean"].idxmin()] if summary["fvu_text_mean"].notna().any() else None
    if lo is not None:
        out.append({"kind": "reconstruction", "combination": _label(lo),
                    "text": f"Lowest text FVU: {_label(lo)}, {_pm(lo, 'fvu_text')} at L0 {lo['l0_mean']:.1f} "
                            f"(image FVU {_pm(lo, 'fvu_image')}, dead fraction {_pm(lo, 'dead_fraction')}, "
                            f"CE score {_pm(lo, 'ce_score')})."})
    return out


def balance_findings(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """Per architecture: balanced minus natural at each sparsity setting, for text FVU, image FVU, premise
    min AUROC and mismatch AUROC; a difference counts when it exceeds the seeds' sds added (or, with one
    seed, whenever it is non-zero, said so)."""
    mixes = set(summary["mix"])
    if not {"natural", "balanced"} <= mixes:
        return []
    idx = ["architecture", "sparsity_key", "sparsity_value"]
    nat = summary[summary["mix"] == "natural"].set_index(idx)
    bal = summary[summary["mix"] == "balanced"].set_index(idx)
    common = nat.index.intersection(bal.index)
    if common.empty:
        return []
    one_seed = int(summary["n_seeds"].max()) < 2
    metrics = {"fvu_text": -1, "fvu_image": -1, "premise_min_auroc": 1, "mismatch_auroc": 1}  # sign of "better"
    out, votes = [], {m: [0, 0, 0] for m in metrics}  # better, worse, within noise
    for arch in dict.fromkeys(a for a, _, _ in common):
        keys = [k for k in common if k[0] == arch]
        parts = []
        for m, sign in metrics.items():
            d = np.array([bal.loc[k, f"{m}_mean"] - nat.loc[k, f"{m}_mean"] for k in keys], float)
            noise = np.array([bal.loc[k, f"{m}_sd"] + nat.loc[k, f"{m}_sd"] for k in keys], float)
            better = int(np.sum((sign * d > noise) & np.isfinite(d)))
            worse = int(np.sum((-sign * d > noise) & np.isfinite(d)))
            votes[m][0] += better
            votes[m][1] += worse
            votes[m][2] += len(keys) - better - worse
            parts.append(f"{m.replace('_', ' ')} Δ {np.nanmean(d):+.3f} (better at {better}/{len(keys)}, worse at "
                         f"{worse}/{len(keys)})")
        out.append({"kind": "balance", "architecture": arch,
                    "text": f"Balanced vs natural, {arch} (mean over {len(keys)} settings): " + "; ".join(parts) + "."})
    b, w, same = votes["premise_min_auroc"]
    bt, wt, _ = votes["fvu_text"]
    p = sign_test(b, w)
    verdict = ("has no consistent effect on the cross-modal features" if p >= SIGN_TEST_ALPHA
               else "helps the cross-modal features" if b > w else "hurts the cross-modal features")
    out.insert(0, {"kind": "balance_verdict",
                   "text": f"Does balance help? Balancing the modalities {verdict} (premise AUROC better at {b}, worse "
                           f"at {w}, within noise at {same} of {b + w + same} architecture x setting pairs; sign test "
                           f"p {p:.2g}) and lowers the text FVU at {bt} (raises it at {wt})"
                           + ("; one seed: any difference counts, no spread to judge it by." if one_seed
                              else ", counting a difference only beyond the seeds' sd added.")})
    return out


def pareto_plot(summary: pd.DataFrame) -> bytes | None:
    """FVU image and text against L0, a line per architecture x mix, error bars = sd over seeds."""
    if summary.empty:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    archs = list(dict.fromkeys(summary["architecture"]))
    mixes = list(dict.fromkeys(summary["mix"]))
    colours = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    for ax, mod in zip(axes, ("image", "text"), strict=True):
        for (arch, mix), g in summary.groupby(["architecture", "mix"], sort=False):
            g = g.sort_values("l0_mean")
            ax.errorbar(g["l0_mean"], g[f"fvu_{mod}_mean"], xerr=g["l0_sd"], yerr=g[f"fvu_{mod}_sd"], marker="o",
                        color=colours(archs.index(arch) % 10), linestyle=styles[mixes.index(mix) % len(styles)],
                        label=f"{arch} / {mix}", capsize=2)
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(f"centred FVU, {mod} tokens")
        ax.set_title(f"{mod} tokens")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def render(summary: pd.DataFrame, found: list[dict[str, Any]], png: bytes | None, score_method: str) -> str:
    head = ["architecture", "mix", "setting", "seeds", "L0", "FVU image", "FVU text", "dead", "CE score", "KL score",
            "premise text AUROC", "premise image AUROC", "premise min AUROC", "concept features",
            f"{score_method}: mismatch", f"{score_method}: noise image"]
    rows = [[s["architecture"], s["mix"], f"{s['sparsity_key']}={s['sparsity_value']:g}", int(s["n_seeds"]),
             _pm(s, "l0"), _pm(s, "fvu_image"), _pm(s, "fvu_text"), _pm(s, "dead_fraction"), _pm(s, "ce_score"),
             _pm(s, "kl_score"),
             f"{s['premise_text_auroc_min_mean']:.3f}-{s['premise_text_auroc_max_mean']:.3f}",
             f"{s['premise_image_auroc_min_mean']:.3f}-{s['premise_image_auroc_max_mean']:.3f}",
             _pm(s, "premise_min_auroc"), f"{s['n_concept_features_mean']:.0f}",
             _pm(s, "mismatch_auroc") + ("" if s["n_ranked_seeds"] == s["n_seeds"] else
                                         f" ({int(s['n_ranked_seeds'])} of {int(s['n_seeds'])} seeds)"),
             _pm(s, "noise_auroc")]
            for _, s in summary.iterrows()]
    img = f'<img alt="FVU against L0" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    body = section("SAE architectures and modality mixes",
                   "<ul>" + "".join(f"<li>{para(f['text'])}</li>" for f in found) + "</ul>",
                   img,
                   para("Mean ± sd over seeds. FVU = centred FVU on the held-out samples; CE / KL score with the SAE "
                        "spliced into the model (1 = no loss); premise AUROC: range over concepts of the best shared "
                        "feature's text and image AUROC, and the mean of min(text, image). Concept features: the "
                        "cross-modal features the consistency scores use; where there are none the score is one "
                        "constant and its AUROC is n/a (a seed without them is left out of the mean). " + DIRECTION),
                   table(head, rows))
    return page("SAE comparison", body)


def run(inputs: Inputs, params: SaeCompareParams, out: Path) -> None:
    timer = Timer()
    if not inputs.sae:
        raise InputError("--sae", "sae", "no SAE to compare")
    samples = read_labels(Path(inputs.samples) / Files.SAMPLES)
    with timer("read"):
        rows, aurocs = [], []
        for raw in inputs.sae:
            try:
                spec = json.loads(raw)
            except ValueError as exc:
                raise InputError("--sae", "sae", f"not JSON: {raw[:80]!r}") from exc
            row, au = sae_row(spec, samples, params.score_method)
            rows.append(row)
            aurocs.append(au)
    runs = pd.DataFrame(rows)
    summary = summarise(runs)
    found = findings(summary)
    png = pareto_plot(summary)
    with atomic_dir(out) as tmp:
        runs.to_parquet(tmp / Files.COMPARE_RUNS, index=False)
        summary.to_parquet(tmp / Files.COMPARE_SUMMARY, index=False)
        pd.concat(aurocs, ignore_index=True).to_parquet(tmp / Files.COMPARE_AUROC, index=False)
        if png:
            (tmp / Files.COMPARE_PARETO).write_bytes(png)
        (tmp / Files.INDEX_HTML).write_text(render(summary, found, png, params.score_method))
        write_json(tmp / Files.COMPARE_FINDINGS, found)
        write_manifest(tmp, STAGE, params.as_dict(), {"samples": inputs.samples},
                       {"n_saes": len(runs), "n_combinations": len(summary)}, timer.timings)
