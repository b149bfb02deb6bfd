"""sae_compare: the plan of compared SAEs, and the aggregate on hand-built stage folders."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from mmsae.errors import InputError
from mmsae.params import SaeCompareParams
from mmsae.report import sae_compare as sc

KINDS = [None] * 8 + ["mismatch"] * 4 + ["noise_image"] * 4


def _samples(tmp_path):
    d = tmp_path / "sample"
    d.mkdir()
    pd.DataFrame({"sample_id": [f"s{i}" for i in range(16)], "corruption": KINDS}).to_parquet(d / "samples.parquet")
    return d


def _sae(tmp_path, name, *, l0, fvu_image, fvu_text, premise, separation, ce=0.99, concepts=4):
    """Stage folders of one SAE; `separation` in [0, 1]: how far the consistency score ranks clean above bad."""
    root = tmp_path / name
    for sub in ("train_sae", "evaluate_sae", "premise", "score"):
        (root / sub).mkdir(parents=True)
    (root / "train_sae" / "metrics.json").write_text(json.dumps({
        "l0": l0, "centred_fvu": (fvu_image + fvu_text) / 2, "dead_fraction": 0.01,
        "eval": {"image": {"centred_fvu": fvu_image}, "text": {"centred_fvu": fvu_text}}}))
    pd.DataFrame({"model": ["mllm", "base"], "sae": ["all", "all"], "ce_score_all": [ce, 0.5],
                  "kl_score_all": [ce - 0.01, 0.4]}).to_parquet(root / "evaluate_sae" / "summary.parquet")
    (root / "premise" / "premise.json").write_text(json.dumps({"concepts": [
        {"word": "red", "text_auroc": premise + 0.1, "image_auroc": premise, "min_auroc": premise},
        {"word": "blue", "text_auroc": premise, "image_auroc": premise + 0.05, "min_auroc": premise}]}))
    # clean samples score 1; the bad ones 1 - separation (plus a fixed ranking jitter)
    clean = np.array([k is None for k in KINDS])
    score = np.where(clean, 1.0, 1.0 - separation) + np.linspace(0, 1e-3, 16)
    pd.DataFrame({"sample_id": [f"s{i}" for i in range(16)], "score_consistency": score,
                  "score_consistency_gated": score, "score_cosine": -score}).to_parquet(root / "score" / "scores.parquet")
    (root / "score" / "manifest.json").write_text(json.dumps({"counts": {"n_concept_features": concepts}}))
    return {k: str(root / k) for k in ("train_sae", "evaluate_sae", "premise", "score")}


def _spec(arch, mix, value, seed, folders):
    key = "k" if arch == "topk" else "l1_coefficient"
    return json.dumps({"architecture": arch, "mix": mix, "sparsity_key": key, "sparsity_value": value, "seed": seed,
                       **folders})


def test_aggregate_on_hand_built_tables(tmp_path):
    samples = _samples(tmp_path)
    specs = []
    for seed in (0, 1):
        for i, v in enumerate((0.1, 0.3, 1.0)):
            # balanced: better text FVU and premise AUROC, worse image FVU, than natural at every setting
            nat = _sae(tmp_path, f"n{seed}{i}", l0=30 - 10 * i, fvu_image=0.1 + 0.05 * i, fvu_text=0.5 + 0.05 * i,
                       premise=0.70 + 0.001 * seed, separation=0.0)
            bal = _sae(tmp_path, f"b{seed}{i}", l0=31 - 10 * i, fvu_image=0.2 + 0.05 * i, fvu_text=0.2 + 0.05 * i,
                       premise=0.80 + 0.001 * seed + 0.01 * i, separation=1.0)
            specs += [_spec("relu", "natural", v, seed, nat), _spec("relu", "balanced", v, seed, bal)]
    out = tmp_path / "sae_compare-00000000"
    sc.run(sc.Inputs(samples=samples, sae=tuple(specs)), SaeCompareParams.load({}), out)
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == 12 and set(runs["mix"]) == {"natural", "balanced"}
    r = runs[(runs["mix"] == "balanced") & (runs["seed"] == 0) & (runs["sparsity_value"] == 0.1)].iloc[0]
    assert r["fvu_text"] == pytest.approx(0.2) and r["ce_score"] == pytest.approx(0.99)
    assert r["premise_text_auroc_max"] == pytest.approx(0.9) and r["premise_image_auroc_min"] == pytest.approx(0.8)
    assert r["mismatch_auroc"] == 1.0 and r["noise_auroc"] == 1.0
    n = runs[(runs["mix"] == "natural")].iloc[0]
    assert n["mismatch_auroc"] == pytest.approx(sc.auroc_table(  # jitter only: the table's own AUROC
        pd.read_parquet(tmp_path / "n00" / "score" / "scores.parquet"),
        pd.read_parquet(samples / "samples.parquet")).query("method == 'consistency' and kind == 'mismatch'")["auroc"].iloc[0])
    summary = pd.read_parquet(out / "summary.parquet")
    assert len(summary) == 6 and (summary["n_seeds"] == 2).all()
    s = summary[(summary["mix"] == "balanced") & (summary["sparsity_value"] == 0.3)].iloc[0]
    assert s["premise_min_auroc_mean"] == pytest.approx(0.8105) and s["premise_min_auroc_sd"] == pytest.approx(
        np.std([0.81, 0.811], ddof=1))
    au = pd.read_parquet(out / "auroc.parquet")
    assert set(au["method"]) == {"consistency", "consistency_gated"}  # consistency scores only
    found = json.loads((out / "findings.json").read_text())
    assert [f["kind"] for f in found[:3]] == ["best_cross_modal", "best_consistency", "balance_verdict"]
    verdict = found[2]["text"]
    # 3 of 3 pairs better is no evidence on its own: a sign test gives p 0.25
    assert "has no consistent effect on the cross-modal features" in verdict and "p 0.25" in verdict
    assert "better at 3, worse at 0, within noise at 0 of 3" in verdict and "lowers the text FVU at 3" in verdict
    best = found[0]
    assert best["combination"] == "relu / balanced / l1_coefficient=1"
    bal_relu = next(f for f in found if f["kind"] == "balance")
    assert "fvu image Δ +0.100 (better at 0/3, worse at 3/3)" in bal_relu["text"]
    html = (out / "index.html").read_text()
    assert html.index("Does balance help") < html.index("<table>") and (out / "pareto.png").stat().st_size > 1000


def test_sign_test_and_the_verdict_it_gives():
    assert sc.sign_test(3, 0) == pytest.approx(0.25) and sc.sign_test(0, 0) == 1.0
    assert sc.sign_test(7, 8) == 1.0  # the seed-0 comparison's premise split: no evidence either way
    assert sc.sign_test(9, 0) == pytest.approx(2 / 2**9) and sc.sign_test(1, 9) == pytest.approx(2 * 11 / 2**10)
    idx = pd.MultiIndex.from_product([[f"a{i}" for i in range(3)], ["k"], [1, 2, 3]])
    rows = []
    for mix, premise in (("natural", 0.7), ("balanced", 0.8)):
        for arch, key, value in idx:
            rows.append({"architecture": arch, "mix": mix, "sparsity_key": key, "sparsity_value": value, "n_seeds": 3,
                         **{f"{m}_mean": 0.5 for m in sc.METRICS}, **{f"{m}_sd": 0.01 for m in sc.METRICS},
                         "premise_min_auroc_mean": premise})
    verdict = sc.balance_findings(pd.DataFrame(rows))[0]["text"]
    assert "helps the cross-modal features" in verdict and "better at 9, worse at 0, within noise at 0 of 9" in verdict


def test_no_concept_features_means_no_consistency_auroc(tmp_path):
    """A constant consistency score (no concept features) ranks nothing: n/a, not an AUROC of 0.5."""
    samples = _samples(tmp_path)
    specs = [_spec("relu", "natural", 0.1, seed, _sae(tmp_path, f"d{seed}", l0=200, fvu_image=0.01, fvu_text=0.01,
                                                        premise=0.9, separation=0.5, concepts=0 if seed else 3))
             for seed in (0, 1)]
    out = tmp_path / "sae_compare-00000001"
    sc.run(sc.Inputs(samples=samples, sae=tuple(specs)), SaeCompareParams.load({}), out)
    runs = pd.read_parquet(out / "runs.parquet").set_index("seed")
    assert np.isnan(runs.loc[1, "mismatch_auroc"]) and np.isnan(runs.loc[1, "noise_auroc"])
    assert runs.loc[0, "mismatch_auroc"] > 0.5 and runs.loc[1, "n_concept_features"] == 0
    s = pd.read_parquet(out / "summary.parquet").iloc[0]
    assert s["n_seeds"] == 2 and s["n_ranked_seeds"] == 1
    assert s["mismatch_auroc_mean"] == runs.loc[0, "mismatch_auroc"]
    assert "(1 of 2 seeds)" in (out / "index.html").read_text()
    # not named the best consistency score: one of its seeds did not rank
    assert "best_consistency" not in [f["kind"] for f in json.loads((out / "findings.json").read_text())]


def test_plan_loops_over_the_schema_architectures():
    p = SaeCompareParams.load({"seeds": [0, 1], "train": {"steps": 50}})
    archs = sc.architectures(p)
    from mmsae.config import load_schema
    assert archs == load_schema()["properties"]["train_sae"]["properties"]["architecture"]["enum"]
    runs = sc.plan(p, {})
    assert len(runs) == len(archs) * 2 * 3 * 2
    relu = [r for r in runs if r["architecture"] == "relu"]
    assert {r["sparsity_value"] for r in relu} == {0.1, 0.3, 1.0} and {r["mix"] for r in relu} == {"natural", "balanced"}
    assert all(r["variant"]["steps"] == 50 and r["variant"]["seed"] in (0, 1) for r in runs)
    with pytest.raises(InputError, match="architectures"):
        sc.plan(SaeCompareParams.load({"architectures": ["relu", "nope"]}), {})
    with pytest.raises(InputError, match="sparsity.topk"):
        sc.plan(SaeCompareParams.load({"architectures": ["topk"], "sparsity": {"relu": {"l1_coefficient": [1, 2, 3]}}}), {})
    with pytest.raises(InputError, match="train_sae"):  # a compared SAE the train_sae schema rejects
        sc.plan(SaeCompareParams.load({"architectures": ["topk"], "sparsity": {"topk": {"k": [0, 1, 2]}}}), {})
    assert sc.mix_label({"text": 0.3, "image": 0.7}) == "image=0.7,text=0.3"


def test_dry_run_gives_every_compared_sae_its_own_folders(tmp_path):
    from test_workflow import REPO, planned_jobs, smk

    cfg = {"architectures": ["relu", "topk"], "mixes": ["natural", {"image": 0.7, "text": 0.3}], "seeds": [0, 1],
           "train": {"steps": 40}}
    extra = tmp_path / "compare.yaml"
    extra.write_text(json.dumps({"sae_compare": cfg}))  # JSON is YAML; --config would read 0.7 as a string
    r = smk("-n", "-p", "sae_compare", "--directory", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"),
            str(extra))
    jobs = planned_jobs(r)
    text = r.stdout + r.stderr
    n = 2 * 2 * 3 * 2  # architectures x mixes x settings x seeds
    for stage in ("train_sae", "encode", "features", "score", "premise", "evaluate_sae"):
        assert stage in jobs and re.search(rf"^{stage}\s+{n}$", text, re.M), stage
    assert re.search(r"^sae_compare_aggregate\s+1$", text, re.M)
    # a compared SAE's evaluate_sae: that SAE alone, no base LLM
    evals = re.findall(r"evaluate_sae\.py [^\n]*", text)
    assert len(evals) == n and all(e.count("--sae ") == 1 and "--base-model" not in e for e in evals)
    agg = re.search(r"sae_compare\.py [^\n]*", text).group(0)
    assert agg.count("--sae ") == n and '"mix": "image=0.7,text=0.3"' in agg
    assert len(set(re.findall(r"train_sae-[0-9a-f]{8}", agg))) == n  # each its own SAE
