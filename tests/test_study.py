"""The filtering study over runs (mmsae.report.study, rules/study.smk) on hand-built curve tables, and the
`clean` reference arm (every clean pool sample) of the curve."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mmsae import cli
from mmsae.errors import InputError
from mmsae.report import study
from mmsae.scoring.subsets import keep_top

REPO = Path(__file__).resolve().parents[1]
KINDS = ("mismatch", "unhelpful")  # not the toy world's default kinds: the study reads them from the data


def arm(method: str, fraction: float, em: float, lp: float, shares: dict[str, float], seed: int | None = None) -> dict:
    row = {"method": method, "fraction": fraction, "seed": seed, "n_train": 10, "exact_match": em,
           "exact_match.task": em, "answer_logprob": lp, "bad_share": sum(shares.values())}
    row.update({f"bad_share.{k}": shares.get(k, 0.0) for k in KINDS})
    return row


def report(run: int, sae: float = 0.0, loss_em: float = 0.80, name: str = "sae_m") -> dict:
    """One run's report.json: the curve arms and the AUROCs. `sae` shifts the SAE method (`name`) up;
    run adds a small per-run offset to every arm (a seed moves both arms of a comparison)."""
    o = 0.01 * run
    arms = [arm("start", 0.0, 0.50 + o, -1.0, {}), arm("all", 1.0, 0.70 + o, -0.5, {"mismatch": 0.2, "unhelpful": 0.2}),
            arm("clean", 1.0, 0.95 + o, -0.1, {})]
    for f in (0.3, 0.5):
        arms += [arm("oracle", f, 0.90 + o, -0.2, {}),
                 arm("random", f, 0.60 + o + 0.004 * run, -0.7, {"mismatch": 0.2, "unhelpful": 0.2}, seed=0),
                 arm("random", f, 0.62 + o - 0.004 * run, -0.7, {"mismatch": 0.2, "unhelpful": 0.2}, seed=1),
                 arm("model_loss", f, loss_em + o, -0.3, {"mismatch": 0.0, "unhelpful": 0.3}),
                 arm("ifd", f, 0.55 + o, -0.9, {"mismatch": 0.3, "unhelpful": 0.1}),
                 arm(name, f, 0.65 + sae + o + (0.002 if run % 2 else -0.002), -0.8 + sae,
                     {"mismatch": 0.0, "unhelpful": 0.35})]
    auroc = [{"method": m, "kind": k, "auroc": a, "n_clean": 6, "n_corrupted": 2}
             for m, k, a in ((name, "mismatch", 0.9), (name, "unhelpful", 0.4), ("model_loss", "mismatch", 1.0),
                             ("model_loss", "unhelpful", 0.6))]
    return {"title": "t", "auroc": auroc, "curve": {"metric": "answer_logprob", "arms": arms}}


def runs(**kw) -> dict[str, dict]:
    return {f"s{i}": report(i, **kw) for i in range(3)}


@pytest.fixture(autouse=True)
def _sae_method(monkeypatch):
    """`sae_m`, `<b>x</b>`: stand-ins for SAE-based score methods (uses_sae reads the method registry)."""
    monkeypatch.setattr(study, "uses_sae", lambda m: m in ("sae_m", "<b>x</b>"))


def test_mean_sd_over_runs_and_random_over_seeds():
    tab, _ = study.analyse({"sft": runs()})
    row = lambda m, f, metric: tab[(tab["method"] == m) & np.isclose(tab["fraction"], f)  # noqa: E731
                                   & (tab["metric"] == metric)].iloc[0]
    r = row("model_loss", 0.3, "exact_match")
    assert (r["n_runs"], r["mean"]) == (3, pytest.approx(0.81)) and r["sd"] == pytest.approx(0.01)
    assert [r["run:s0"], r["run:s1"], r["run:s2"]] == pytest.approx([0.80, 0.81, 0.82])
    # random: the mean of its two seeds within each run (their per-run spread cancels), then over runs
    r = row("random", 0.5, "exact_match")
    assert [r["run:s0"], r["run:s1"], r["run:s2"]] == pytest.approx([0.61, 0.62, 0.63])
    # the bad share per kind is aggregated like a metric; per-task columns are not metrics
    assert row("sae_m", 0.3, "bad_share.unhelpful")["mean"] == pytest.approx(0.35)
    assert set(tab["metric"]) == {"exact_match", "answer_logprob", "bad_share", "bad_share.mismatch",
                                  "bad_share.unhelpful"}
    # one run: no sd (NaN), not 0
    one, _ = study.analyse({"dpo": {"d": report(0)}})
    assert one["sd"].isna().all() and (one["n_runs"] == 1).all()


def test_two_sd_decision_on_paired_differences():
    def frame(a: list[float], b: list[float]) -> pd.DataFrame:
        rows = [{"block": "x", "run": f"r{i}", "method": m, "fraction": 0.5, "em": v}
                for m, vals in (("m", a), ("ref", b)) for i, v in enumerate(vals)]
        return pd.DataFrame(rows)

    beats = study.compare(frame([0.70, 0.81, 0.92], [0.60, 0.70, 0.80]), "m", "ref", 0.5, "em")
    # differences 0.10, 0.11, 0.12: mean 0.11, sd 0.01 -> beats, although the arms' own sd (0.11) is larger
    assert beats["verdict"] == "beats" and beats["diff"] == pytest.approx(0.11) and beats["sd"] == pytest.approx(0.01)
    assert study.compare(frame([0.7, 0.6, 0.9], [0.6, 0.7, 0.8]), "m", "ref", 0.5, "em")["verdict"] == "level"
    assert study.compare(frame([0.5, 0.6, 0.7], [0.6, 0.7, 0.8]), "m", "ref", 0.5, "em")["verdict"] == "loses"
    one = study.compare(frame([0.9], [0.1]), "m", "ref", 0.5, "em")
    assert one["verdict"] == "one run" and math.isnan(one["sd"])
    assert study.compare(frame([0.9], [0.1]), "m", "absent", 0.5, "em") is None


def test_best_method_disagreement_and_bad_kinds():
    # sae_m best on exact_match (0.65 + 0.2 > 0.80), model_loss best on answer_logprob (-0.3 > -0.6)
    _, found = study.analyse({"sft": runs(sae=0.2)})
    b = found["blocks"]["sft"]
    best = {(r["fraction"], r["metric"]): r["best"] for r in b["best"]}
    assert best == {(0.3, "exact_match"): "sae_m", (0.5, "exact_match"): "sae_m",
                    (0.3, "answer_logprob"): "model_loss", (0.5, "answer_logprob"): "model_loss"}
    assert [d["fraction"] for d in b["disagreements"]] == [0.3, 0.5]
    assert b["kinds"] == list(KINDS)
    kept = {(r["method"], r["fraction"]): r for r in b["bad_kinds"]}
    assert kept[("sae_m", 0.3)]["unhelpful"] == pytest.approx(0.35) and kept[("ifd", 0.5)]["mismatch"] == 0.3
    # oracle / clean / random / all are references, never "the best method"
    assert not {r["best"] for r in b["best"]} & set(study.REFERENCES)
    # no disagreement when one method leads on both metrics
    _, found = study.analyse({"sft": runs(sae=0.6)})
    assert found["blocks"]["sft"]["disagreements"] == []


def test_sae_verdict_and_generated_paragraph_follow_the_numbers():
    _, lose = study.analyse({"sft": runs(sae=0.0)})
    _, win = study.analyse({"sft": runs(sae=0.6)})
    lv = {v["metric"]: v for v in lose["blocks"]["sft"]["sae"]}["exact_match"]
    wv = {v["metric"]: v for v in win["blocks"]["sft"]["sae"]}["exact_match"]
    assert not lv["wins"] and wv["wins"]
    assert {k: c["verdict"] for k, c in wv["vs"].items()} == {"all": "beats", "random": "beats",
                                                             "model_loss": "beats", "ifd": "beats"}
    # 0.65 vs random 0.61: beats random by 2 sd of the difference; vs the pool 0.70 and model_loss 0.80: loses
    assert {k: c["verdict"] for k, c in lv["vs"].items()} == {"all": "loses", "random": "beats",
                                                             "model_loss": "loses", "ifd": "beats"}
    assert "does NOT win" in lv["sentence"] and "WINS" in wv["sentence"] and "why" not in wv
    # why: the kind it keeps more of than the leader (unhelpful 35% vs 30%), with both AUROCs on it
    assert "unhelpful (35.0% vs 30.0% of the subset, AUROC 0.40 vs 0.60)" in lv["why"]
    assert "model_loss leads" in lv["why"] and "mismatch (0" not in lv["why"]  # it keeps no more mismatches
    # the kind whose share goes with the lowest scores over every arm (ifd and random keep the most mismatches)
    assert re.search(r"exact_match falls most with the share of mismatch \(Pearson r = -0\.\d\d\)", lv["why"])
    m_lose, m_win = lose["blocks"]["sft"]["meaning"], win["blocks"]["sft"]["meaning"]
    assert m_lose != m_win
    assert "the SAE adds what the other signals miss" in m_win and "sae_m beats" in m_win
    assert "but the model's own loss does better" in m_lose and "unhelpful" in m_lose
    # measured once: no decision, said so
    _, once = study.analyse({"dpo": {"d": report(0, sae=0.6)}})
    assert "measured once" in once["blocks"]["dpo"]["meaning"]
    assert not once["blocks"]["dpo"]["sae"][0]["wins"]


def test_every_sae_selection_is_compared_and_the_paragraph_names_those_beating_both_loss_scores():
    # sae_m 0.65 against model_loss 0.60 and ifd 0.55: beats both (paired sd ~0.002); the pool 0.70 beats it
    _, found = study.analyse({"sft": runs(loss_em=0.60)})
    rows = [r for r in found["blocks"]["sft"]["sae_versus"] if r["metric"] == "exact_match"]
    assert [(r["method"], r["fraction"]) for r in rows] == [("sae_m", 0.3), ("sae_m", 0.5)]
    assert {k: c["verdict"] for k, c in rows[0]["vs"].items()} == {"all": "loses", "random": "beats",
                                                                  "model_loss": "beats", "ifd": "beats"}
    text = found["blocks"]["sft"]["meaning"]
    assert ("On exact_match, SAE-based selections that beat model_loss and ifd by more than 2 sd: sae_m at 30% "
            "(loses to the whole pool); sae_m at 50% (loses to the whole pool).") in text
    # model_loss 0.80: no SAE selection beats both loss-based scores, and the paragraph says so
    _, found = study.analyse({"sft": runs()})
    assert "On exact_match, no SAE-based selection at <= 50% kept beats model_loss and ifd by more than 2 sd." \
        in found["blocks"]["sft"]["meaning"]
    # level with model_loss (0.66 vs 0.65, paired sd ~0.002 apart from the 0.01 gap): said as not above by 2 sd
    _, found = study.analyse({"sft": {f"s{i}": report(i, loss_em=0.65 + (0.01 if i % 2 else -0.01)) for i in range(3)}})
    assert re.search(r"it is not above the model's own loss by more than 2 sd \([+-]0\.\d+ ± 0\.\d+\)",
                     found["blocks"]["sft"]["meaning"])


def test_study_stage_writes_escaped_page_and_tables(tmp_path, capsys):
    paths = {}
    for n, rep in {**runs(name="<b>x</b>"), "d0": report(0, name="<b>x</b>")}.items():
        paths[n] = tmp_path / n / "report.json"
        paths[n].parent.mkdir()
        paths[n].write_text(json.dumps(rep))
    args = [a for n in ("s0", "s1", "s2") for a in ("--run", f"{n}={paths[n]}")] + ["--dpo", f"d0={paths['d0']}"]
    out = tmp_path / "study"
    assert cli.stage_main(study, [*args, "--out", str(out)]) == 0
    tab = pd.read_parquet(out / "study.parquet")
    assert set(tab["block"]) == {"sft", "dpo"}
    assert [c for c in tab.columns if c.startswith("run:")] == ["run:s0", "run:s1", "run:s2", "run:d0"]
    found = json.loads((out / "study.json").read_text())  # strict JSON: NaN written as null
    assert found["blocks"]["dpo"]["runs"] == ["d0"] and found["sd_rule"] == study.SD_RULE
    page = (out / "study.html").read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert page.index("What was found") < page.index("best method per kept fraction")
    assert (out / "study.png").stat().st_size > 1000
    assert json.loads((out / "manifest.json").read_text())["counts"]["n_dpo_runs"] == 1
    # bad input: one line, exit 2, nothing written
    no_curve = tmp_path / "nc.json"
    no_curve.write_text(json.dumps({"auroc": []}))
    assert cli.stage_main(study, ["--run", f"x={no_curve}", "--out", str(tmp_path / "bad")]) == 2
    assert "curve.arms" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(InputError, match="not measured"):
        study.analyse({"sft": runs()}, metrics=["llava_bench.overall"])


def _smk(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(cwd),
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_study_target_runs_the_rule_on_the_runs_reports(tmp_path):
    for n, rep in {**runs(), "study-dpo": report(0)}.items():
        path = tmp_path / "results" / n / "report" / "report.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(rep))
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump({"study": {"runs": ["s0", "s2"], "dpo_runs": ["study-dpo"]}}))
    r = _smk("--cores", "1", "study", "--configfile", str(REPO / "config/config.yaml"), str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    tab = pd.read_parquet(tmp_path / "results" / "study" / "study.parquet")
    assert [c for c in tab.columns if c.startswith("run:")] == ["run:s0", "run:s2", "run:study-dpo"]
    assert (tmp_path / "results" / "study" / "study.html").exists()


def test_study_config_plans_the_clean_arm_once_and_every_method_per_fraction(tmp_path):
    seed = tmp_path / "seed1.yaml"
    seed.write_text("run: study-s1\ntoyworld: {seed: 1}\ntoy_model: {seed: 1}\ntrain_sae: {seed: 1}\n")
    r = _smk("-n", "-p", "results/study-s1/report/report.json", "--configfile", str(REPO / "config/config.yaml"),
             str(REPO / "config/study.yaml"), str(seed), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    cfg = yaml.safe_load((REPO / "config/study.yaml").read_text())["curve"]
    per_fraction = [m for m in cfg["methods"] if m != "clean"]
    arms = (len(per_fraction) + len(cfg["random_seeds"])) * len(cfg["fractions"]) + 2  # + clean + the whole pool
    assert re.search(rf"^finetune\s+{arms}$", text, re.M) and re.search(rf"^benchmark\s+{arms + 1}$", text, re.M)
    assert len(re.findall(r"--keep-fraction 1\.0 --keep-by clean\b", text)) == 1
    assert "--keep-by clean" in text and "results/study-s1/" in text
    for m in ("sae_loss_rank", "sae_loss_gate"):
        assert re.search(rf"subsets/{m}/top010\.parquet", text)


def test_study_dpo_config_plans_its_arms_as_dpo(tmp_path):
    r = _smk("-n", "-p", "results/study-dpo/report/report.json", "--configfile", str(REPO / "config/config.yaml"),
             str(REPO / "config/study.yaml"), str(REPO / "config/study-dpo.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    cfg = yaml.safe_load((REPO / "config/study-dpo.yaml").read_text())["curve"]
    per_fraction = [m for m in cfg["methods"] if m != "clean"]
    arms = (len(per_fraction) + len(cfg["random_seeds"])) * len(cfg["fractions"]) + 2
    assert re.search(rf"^finetune\s+{arms}$", text, re.M) and re.search(rf"^benchmark\s+{arms + 1}$", text, re.M)
    assert text.count('"method": "dpo"') == arms and '"method": "sft"' not in text
    assert not re.search(r"--keep-fraction 0\.[17]", text)


def test_keep_top_clean_keeps_only_the_clean_samples():
    df = pd.DataFrame({"sample_id": ["d", "a", "c", "b"], "corruption": [None, "mismatch", None, None]})
    assert keep_top(df, 1.0, "clean")["sample_id"].tolist() == ["b", "c", "d"]
    assert keep_top(df, 0.5, "clean")["sample_id"].tolist() == ["b", "c"]  # ceil(0.5 x 3 clean), by id
    with pytest.raises(InputError, match="corruption"):
        keep_top(df.drop(columns="corruption"), 1.0, "clean")


def test_costly_kind_is_the_share_that_goes_with_the_lowest_scores():
    rows = [{"run": "r", "method": f"m{i}", "fraction": 0.5, "em": em, "bad_share.a": a, "bad_share.b": b}
            for i, (em, a, b) in enumerate(((0.9, 0.0, 0.3), (0.7, 0.2, 0.1), (0.5, 0.4, 0.2), (0.3, 0.6, 0.0)))]
    kind, r = study.costly_kind(pd.DataFrame(rows), ["a", "b"], "em")
    assert kind == "a" and r == pytest.approx(-1.0)
    # a share that goes with HIGHER scores is never called costly
    flipped = pd.DataFrame(rows).assign(em=lambda f: 1 - f["em"])
    assert study.costly_kind(flipped, ["a"], "em") is None


def test_a_tie_for_the_best_is_no_disagreement():
    rows = [{"fraction": 0.5, "metric": "a", "best": "m1", "tied": ["m1", "m2"]},
            {"fraction": 0.5, "metric": "b", "best": "m2", "tied": ["m2"]}]
    assert study.disagreements(rows) == []
    rows[0]["tied"] = ["m1"]
    assert study.disagreements(rows) == [{"fraction": 0.5, "best": {"a": "m1", "b": "m2"}}]
