"""index.html: one self-contained page (inline CSS, figures as base64 PNG). Every piece of text that
comes from data (questions, responses, ids, metric names, paths) goes through `esc` (mmsae.display)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmsae.display import esc

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%} .note{color:#555;font-size:.9em} code{background:#f4f4f4;padding:0 3px}
"""


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list | tuple) and (len(value) > 8 or any(isinstance(v, dict | list) for v in value)):
        return f"[{len(value)} values]"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def figure(b64: str | None, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def section(title: str, *parts: str) -> str:
    return f"<h2>{esc(title)}</h2>\n" + "\n".join(p for p in parts if p)


def para(text: str, cls: str = "") -> str:
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<p{attr}>{esc(text)}</p>"


def page(title: str, body: str) -> str:
    """A whole self-contained HTML page: the shared CSS, the escaped title, `body` as is."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def render(report: Mapping[str, Any], figures: Mapping[str, str | None]) -> str:
    """The page for a report dict (see mmsae.report.build_report) and its figures."""
    parts = [f"<h1>{esc(report['title'])}</h1>", *_overview(report, figures), *_sae_eval(report, figures),
             *_toy_and_premise(report), *_scores_and_auroc(report, figures), *_curve(report, figures),
             *_subsets_and_examples(report)]
    return page(report["title"], "\n".join(parts))


def _overview(report: Mapping[str, Any], figures: Mapping[str, str | None]) -> list[str]:
    """Counts, artifact links, SAE metrics, feature classes."""
    parts = []
    counts = report.get("counts", {})
    parts.append(section("Counts", table(["what", "n"], [(k, v) for k, v in flatten(counts).items()])))

    links = report.get("artifacts", {})
    if links:
        items = "".join(f'<li>{esc(k)}: <a href="{esc(v)}">{esc(v)}</a></li>' for k, v in links.items())
        parts.append(section("Artifacts", f"<ul>{items}</ul>"))

    sae = report.get("sae_metrics", {})
    parts.append(section("SAE metrics", figure(figures.get("sae_metrics"), "SAE metrics"),
                         table(["metric", "value"], sorted(sae.items())) if sae else para("no metrics.json keys")))

    parts.append(section("Feature classes", figure(figures.get("feature_classes"), "feature classes"),
                         table(["class", "features"], report.get("feature_classes", {}).items()),
                         para(report.get("feature_rule", ""), "note")))
    return parts


def _sae_eval(report: Mapping[str, Any], figures: Mapping[str, str | None]) -> list[str]:
    sae_eval = report.get("sae_eval") or {}
    if not sae_eval.get("summary"):
        return []
    summary = sae_eval["summary"]
    cols = [c for c in summary[0] if c not in ("model", "sae")]
    return [section(
        "SAE vs SAE-V: the reconstruction spliced into the model",
        para("CE-loss score = (CE_zero - CE_sae) / (CE_zero - CE_clean) on text next-token targets, with the "
             "SAE's reconstruction replacing the residual stream at image, text or all positions (1 = "
             "lossless, 0 = as bad as zero-ablation); KL score likewise with KL(clean || spliced). "
             "L0 and centred FVU on the hooked activations, per modality. 'base' = the text-only base LLM "
             "(transfer).", "note"),
        figure(figures.get("sae_eval"), "SAE comparison"),
        table(["model", "SAE", *cols], [(r["model"], r["sae"], *(r.get(c) for c in cols)) for r in summary]))]


def _toy_and_premise(report: Mapping[str, Any]) -> list[str]:
    parts = []
    toy = report.get("toy_model")
    if toy:
        parts.append(section("Toy model", table(["metric", "value"], sorted(flatten(toy).items()))))

    premise = report.get("premise")
    if premise:
        rows = [(r.get("word"), r.get("kind"), r.get("feature"), r.get("text_auroc"), r.get("image_auroc"),
                 r.get("best_text_auroc"), r.get("best_image_auroc")) for r in premise.get("concepts", [])]
        parts.append(section(
            "Premise: one feature for a word and the patches showing it",
            para("Per concept: the feature maximising min(text AUROC, image AUROC); text AUROC separates the "
                 "word's tokens from other text tokens, image AUROC patches showing the concept from other "
                 "patches (0.5 = chance). Best text-only / image-only AUROCs over all features for reference.",
                 "note"),
            table(["concept", "kind", "feature", "text AUROC", "image AUROC", "best text AUROC", "best image AUROC"],
                  rows)))
    return parts


def _scores_and_auroc(report: Mapping[str, Any], figures: Mapping[str, str | None]) -> list[str]:
    """Score distributions, the AUROC table and the AUROC per layer."""
    parts = [section("Score distributions", para(
        "Every method: higher score = kept first. Histograms split by corruption kind (density).", "note"),
        figure(figures.get("scores"), "score distributions"))]

    aur = report.get("auroc", [])
    parts.append(section(
        "Does the score separate clean from corrupted data?",
        para(report.get("direction", ""), "note"),
        figure(figures.get("auroc"), "AUROC heat map"),
        table(["method", "corruption", "AUROC", "n clean", "n corrupted"],
              [(r["method"], r["kind"], r["auroc"], r["n_clean"], r["n_corrupted"]) for r in aur])
        if aur else para("no corruption labels in the samples: no AUROC")))

    by_layer = report.get("auroc_by_layer") or []
    if by_layer:
        layers = sorted({r["layer"] for r in by_layer})
        cell = {(r["method"], r["kind"], r["layer"]): r["auroc"] for r in by_layer}
        keys = list(dict.fromkeys((r["method"], r["kind"]) for r in by_layer))
        parts.append(section(
            "AUROC per layer (an SAE trained and scored at each extracted layer)",
            para(report.get("direction", ""), "note"),
            figure(figures.get("auroc_by_layer"), "AUROC per layer"),
            table(["method", "corruption", *[f"layer {layer}" for layer in layers]],
                  [(m, k, *(cell.get((m, k, layer)) for layer in layers)) for m, k in keys])))
    return parts


def _curve(report: Mapping[str, Any], figures: Mapping[str, str | None]) -> list[str]:
    curve = report.get("curve")
    if not curve:
        return []
    metric = curve["metric"]
    start = [r.get(metric) for r in curve["arms"] if r["method"] == "start"]
    rows = [(r["method"], r["fraction"], r["n_runs"], r.get(f"{metric}_mean"), r.get(f"{metric}_std"),
             r.get("bad_share_mean"), r.get("bad_share_std")) for r in curve["summary"]]
    return [section(
        "Filtering curve: fine-tune on the kept data, then benchmark",
        para(f"{metric} of the model fine-tuned on each method's top fraction of the data set (random: mean "
             f"and sd over seeds; 'all' = the whole data set), against the starting model "
             f"({fmt(start[0]) if start else 'n/a'}). Bad share = known-bad samples in the training subset. "
             f"Best selective method per fraction: "
             + ", ".join(f"{f}: {m}" for f, m in curve["best_by_fraction"].items()) + ".", "note"),
        figure(figures.get("curve"), "filtering curve"),
        table(["method", "kept fraction", "runs", f"{metric} mean", "sd", "bad share mean", "sd"], rows),
        *_bad_kinds(curve["arms"]))]


def _bad_kinds(arms: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per arm (random: mean over seeds): the share of each corruption kind in its training subset, the
    kinds as the data name them (bad_share.<kind>)."""
    kinds = sorted({k[len("bad_share."):] for r in arms for k in r if k.startswith("bad_share.")})
    if not kinds:
        return []
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for r in arms:
        if r["method"] != "start":
            groups.setdefault((r["method"], float(r["fraction"])), []).append(r)

    def mean(rs: Sequence[Mapping[str, Any]], col: str) -> float | None:
        vals = [float(r[col]) for r in rs if r.get(col) is not None and not math.isnan(float(r[col]))]
        return sum(vals) / len(vals) if vals else None

    rows = [(m, f, len(rs), *(mean(rs, f"bad_share.{k}") for k in kinds)) for (m, f), rs in sorted(groups.items())]
    return [para("Bad samples kept, per corruption kind: share of the training subset (random: mean over seeds).",
                 "note"), table(["method", "kept fraction", "runs", *kinds], rows)]


def _subsets_and_examples(report: Mapping[str, Any]) -> list[str]:
    parts = []
    subsets = report.get("subsets", {})
    if subsets:
        names = sorted({f for v in subsets.values() for f in v})
        parts.append(section("Subsets (top fraction by rank)",
                             table(["method", *names], [(m, *(v.get(f) for f in names)) for m, v in subsets.items()])))

    examples = report.get("examples", {})
    if examples:
        blocks = []
        for m, rows in examples.items():
            blocks.append(f"<h3>{esc(m)}</h3>" + table(
                ["rank", "score", "sample", "corruption", "question", "preferred response"],
                [(r["rank"], r["score"], r["sample_id"], r["corruption"], r["question"], r["response"]) for r in rows]))
        parts.append(section("Best and worst samples per method", *blocks))
    return parts


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
