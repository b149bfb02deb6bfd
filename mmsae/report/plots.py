"""Report figures as base64 PNG strings (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mmsae.display import MODALITY_COLOURS  # noqa: E402


def to_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, cols: int = 4, size: tuple[float, float] = (3.2, 2.4)):
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def sae_metrics(by_metric: Mapping[str, Mapping[str, float]]) -> str | None:
    """One small bar chart per metric, one bar per modality (overall / text / image / special)."""
    if not by_metric:
        return None
    fig, axes = _grid(len(by_metric))
    for ax, (metric, values) in zip(axes, by_metric.items(), strict=False):
        names = list(values)
        ax.bar(names, [values[k] for k in names], color=[MODALITY_COLOURS.get(k, "#999999") for k in names])
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return to_png(fig)


def class_counts(counts: Mapping[str, int]) -> str:
    fig, ax = plt.subplots(figsize=(5, 2.8))
    names = list(counts)
    bars = ax.bar(names, [counts[k] for k in names], color=["#1f77b4", "#ff7f0e", "#9467bd", "#999999"][: len(names)])
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("features")
    ax.set_title("feature classes")
    return to_png(fig)


def score_distributions(scores: pd.DataFrame, groups: np.ndarray, methods: list[str]) -> str | None:
    """Per method: histograms of the scores of clean samples and of each corruption kind (density)."""
    if not methods:
        return None
    names = ["clean"] + sorted({g for g in groups if g != "clean"})
    fig, axes = _grid(len(methods), cols=3, size=(4.0, 2.8))
    for ax, m in zip(axes, methods, strict=False):
        s = scores[f"score_{m}"].to_numpy(np.float64)
        lo, hi = float(s.min()), float(s.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
        for g in names:
            v = s[groups == g]
            if len(v):
                ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.4, label=f"{g} ({len(v)})")
        ax.set_title(m, fontsize=10)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return to_png(fig)


def auroc_heatmap(table: pd.DataFrame) -> str | None:
    """Method x corruption kind, annotated; diverging colours centred on 0.5 (chance)."""
    if table.empty:
        return None
    pivot = table.pivot(index="method", columns="kind", values="auroc")
    kinds = [k for k in pivot.columns if k != "any"] + (["any"] if "any" in pivot.columns else [])
    pivot = pivot.reindex(index=list(dict.fromkeys(table["method"])), columns=kinds)
    values = pivot.to_numpy(np.float64)
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 2.5, 0.45 * len(pivot) + 1.5))
    im = ax.imshow(values, cmap="RdBu", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(pivot)), pivot.index)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(v) and abs(v - 0.5) > 0.3 else "black")
    fig.colorbar(im, ax=ax, label="P(score(clean) > score(corrupted))")
    ax.set_title("AUROC: 1 = clean ranked first, 0.5 = chance, < 0.5 = bad ranked as good", fontsize=9)
    return to_png(fig)


def sae_comparison(ce: pd.DataFrame) -> str | None:
    """CE-loss score per splice modality, one panel per model (MLLM, base LLM), one bar per SAE."""
    if ce is None or ce.empty:
        return None
    models = list(dict.fromkeys(ce["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.0), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sub = ce[ce["model"] == model]
        splices = list(dict.fromkeys(sub["splice"]))
        saes = list(dict.fromkeys(sub["sae"]))
        width = 0.8 / max(len(saes), 1)
        for i, sae in enumerate(saes):
            vals = [sub[(sub["sae"] == sae) & (sub["splice"] == s)]["ce_score"].mean() for s in splices]
            ax.bar(np.arange(len(splices)) + i * width, vals, width, label=SAE_LABELS.get(sae, sae))
        ax.set_xticks(np.arange(len(splices)) + width * (len(saes) - 1) / 2, splices)
        ax.set_xlabel("positions whose residual is replaced")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1.25)
        ax.set_ylabel("CE-loss score (1 = lossless)")
        ax.set_title({"mllm": "on the MLLM", "base": "on the base LLM (transfer)"}.get(model, model), fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    return to_png(fig)


SAE_LABELS = {"all": "SAE-V (image + text tokens)", "text": "SAE (text tokens)"}


def auroc_by_layer(table: pd.DataFrame) -> str | None:
    """AUROC against layer: one panel per corruption kind, one line per method (0.5 = chance)."""
    if table is None or table.empty:
        return None
    kinds = [k for k in dict.fromkeys(table["kind"]) if k != "any"] + (["any"] if "any" in set(table["kind"]) else [])
    fig, axes = _grid(len(kinds), cols=min(len(kinds), 5), size=(3.0, 2.6))
    for ax, kind in zip(axes, kinds, strict=False):
        sub = table[table["kind"] == kind]
        for method in dict.fromkeys(sub["method"]):
            m = sub[sub["method"] == method].sort_values("layer")
            ax.plot(m["layer"], m["auroc"], marker="o", label=method)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xticks(sorted(set(sub["layer"])))
        ax.set_xlabel("layer")
        ax.set_title(kind, fontsize=9)
    axes[0].set_ylabel("AUROC")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return to_png(fig)


# arms drawn as horizontal reference lines (one fine-tune each, not one per kept fraction): style, label
LINES = {"all": ("k-", "whole data set"), "clean": ("g-", "every clean sample")}


def filtering_curve(curve: pd.DataFrame, metric: str = "exact_match") -> str | None:
    """The paper's Figure 7 shape: `metric` against kept fraction per method (random: mean +- std over
    seeds), the whole data set, every clean sample (where measured) and the starting model as reference
    lines; beside it, the share of known-bad samples in each training subset when the data carry ground
    truth."""
    if curve is None or curve.empty or metric not in curve.columns:
        return None
    panels = [metric] + (["bad_share"] if "bad_share" in curve.columns else [])
    fig, axes = _grid(len(panels), cols=len(panels), size=(4.6, 3.4))
    arms = curve[~curve["method"].isin(["start", *LINES])]
    for ax, col in zip(axes, panels, strict=False):
        for method in dict.fromkeys(arms["method"]):
            g = arms[arms["method"] == method].groupby("fraction")[col]
            mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
            n = int(g.size().max())
            label = f"{method} (mean ± sd, {n} seeds)" if n > 1 else method
            line = ax.errorbar(mean.index, mean.to_numpy(), yerr=std.to_numpy() if n > 1 else None, marker="o",
                               capsize=3, label=label, ls="--" if method == "random" else "-")
            if n > 1:
                ax.fill_between(mean.index, mean - std, mean + std, alpha=0.15, color=line[0].get_color())
        for ref, (style, label) in {**LINES, "start": ("k:", "starting model")}.items():
            vals = curve.loc[curve["method"] == ref, col].dropna()
            if len(vals):
                ax.axhline(float(vals.mean()), color=style[0], ls=style[1:], lw=1, label=label)
        ax.set_xlabel("kept fraction of the data set")
        ax.set_ylabel(col.replace("_", " "))
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return to_png(fig)


def study_curves(study: pd.DataFrame, metrics: Mapping[str, Sequence[str]]) -> str | None:
    """The study's curves: per block (a row) and metric (a panel), mean +- sd over runs against kept
    fraction for each method; the single arms (whole pool, every clean sample, starting model) as lines
    with a +- sd band."""
    blocks = [b for b in metrics if metrics[b]]
    if study is None or study.empty or not blocks:
        return None
    cols = max(len(metrics[b]) for b in blocks)
    fig, axes = plt.subplots(len(blocks), cols, figsize=(4.6 * cols, 3.4 * len(blocks)), squeeze=False)
    refs = {**LINES, "start": ("k:", "starting model")}
    for i, block in enumerate(blocks):
        rows = study[study["block"] == block]
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(metrics[block]):
                ax.axis("off")
                continue
            metric = metrics[block][j]
            sub = rows[rows["metric"] == metric]
            for method in sorted(set(sub["method"]) - set(refs)):
                g = sub[sub["method"] == method].sort_values("fraction")
                sd = g["sd"].fillna(0.0).to_numpy()
                ax.errorbar(g["fraction"], g["mean"], yerr=sd, marker="o", capsize=3, label=method,
                            ls="--" if method == "random" else "-")
            for ref, (style, label) in refs.items():
                g = sub[sub["method"] == ref]
                if len(g):
                    mean, sd = float(g["mean"].iloc[0]), float(np.nan_to_num(g["sd"].iloc[0]))
                    ax.axhline(mean, color=style[0], ls=style[1:], lw=1, label=label)
                    if sd:
                        ax.axhspan(mean - sd, mean + sd, color=style[0], alpha=0.08)
            n = int(sub["n_runs"].max()) if len(sub) else 0
            ax.set_title(f"{block}: {metric} (mean ± sd, {n} run{'' if n == 1 else 's'})", fontsize=9)
            ax.set_xlabel("kept fraction of the pool")
            ax.set_ylabel(metric.replace("_", " "))
        axes[i][0].legend(fontsize=6)
    fig.tight_layout()
    return to_png(fig)
