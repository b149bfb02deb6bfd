"""The report: renders end to end from stage folders, escapes data-set text, report.json holds the numbers."""

from __future__ import annotations

import json

from test_scoring import build_artifacts, run_score

from mmsae import cli
from mmsae import report as report_stage
from mmsae.artifacts import write_json
from mmsae.display import esc
from mmsae.report import metrics_by_modality
from mmsae.report.html import table


def test_metrics_by_modality():
    flat = {"overall.l0": 3.0, "image.l0": 4.0, "text.centred_fvu": 0.2, "dead_fraction": 0.1,
            "per_modality.special.l0": 1.0, "mse_image": 2.0, "name": "relu", "flag": True}
    assert metrics_by_modality(flat) == {
        "l0": {"overall": 3.0, "image": 4.0, "special": 1.0}, "centred_fvu": {"text": 0.2},
        "dead_fraction": {"overall": 0.1}, "mse": {"image": 2.0},
    }


def test_html_escapes_cells():
    assert "<b>" not in table(["h"], [["<b>x</b>"]]) and "&lt;b&gt;" in table(["h"], [["<b>x</b>"]])
    assert esc('"><script>') == "&quot;&gt;&lt;script&gt;"


def test_report_script(tmp_path):
    a = build_artifacts(tmp_path)
    run_score(a, tmp_path / "score", {"fractions": [0.5, 1.0]})
    premise = tmp_path / "premise"
    premise.mkdir()
    write_json(premise / "premise.json", {"grid": 2, "concepts": [
        {"word": "blue", "kind": "colour", "feature": 7, "text_auroc": 1.0, "image_auroc": 0.93,
         "best_text_auroc": 1.0, "best_image_auroc": 0.95}]})
    toy = tmp_path / "toy_model"
    toy.mkdir()
    write_json(toy / "metrics.json", {"exact_match": 0.93, "exact_match_by_task": {"caption": 0.9}})
    out = tmp_path / "report"
    rc = cli.stage_main(report_stage, [
        "--samples", str(a["samples"]), "--train-sae", str(a["train_sae"]), "--features", str(a["features"]),
        "--score", str(tmp_path / "score"), "--premise", str(premise), "--toy-model", str(toy), "--out", str(out),
        "--params", json.dumps({"title": "run <b>1</b>"})])
    assert rc == 0
    page = (out / "index.html").read_text()
    assert "<script" not in page  # the question "<script>alert(1)</script> describe ?" is escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt; describe ?" in page
    assert "run &lt;b&gt;1&lt;/b&gt;" in page
    assert page.count("data:image/png;base64,") == 4  # SAE metrics, classes, scores, AUROC heat map
    assert "P(score(clean) &gt; score(corrupted))" in page and "0.93" in page
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["by_corruption"] == {"clean": 2, "mismatch": 1, "noise_image": 1}
    assert report["feature_classes"]["cross-modal"] >= 1
    assert report["sae_metrics"]["overall.l0"] == 3.0
    aur = {(r["method"], r["kind"]): r["auroc"] for r in report["auroc"]}
    # model_loss: clean losses 0.5, 0.1; mismatch s1 2.0, noise s2 1.0 -> both ranked below clean
    assert aur["model_loss", "mismatch"] == 1.0 and aur["model_loss", "any"] == 1.0
    assert set(report["methods"]) >= {"cosine", "nosae_cosine", "model_loss"}
    assert report["premise"]["concepts"][0]["feature"] == 7
    assert report["toy_model"]["exact_match"] == 0.93
    assert report["subsets"]["cosine"]["top050.parquet"] == 2
    assert report["artifacts"]["score"].endswith("scores.parquet")


def test_report_shows_the_filtering_curve_and_ifd(tmp_path):
    import pandas as pd

    from mmsae.evaluation.curve import curve_summary, filtering_curve

    a = build_artifacts(tmp_path)
    run_score(a, tmp_path / "score", {"fractions": [0.5, 1.0]})
    samples = pd.read_parquet(a["samples"] / "samples.parquet")
    ids = samples["sample_id"].astype(str).tolist()
    base = tmp_path / "baseline_scores"
    base.mkdir()
    # IFD selection that ranks the clean samples first: AUROC 1 against every corruption kind
    clean = samples["corruption"].isna().to_numpy()
    pd.DataFrame({"sample_id": ids, "ifd_score": clean.astype(float)}).to_parquet(base / "ifd.parquet")
    curve_dir = tmp_path / "curve"
    curve_dir.mkdir()
    arms = [{"method": m, "fraction": f, "seed": s, "train_ids": t,
             "results": {"toy": {"exact_match": em, "answer_logprob": em - 1}}}
            for m, f, s, t, em in (("start", 0.0, None, None, 0.99), ("cosine", 0.5, None, ids[:2], 0.9),
                                   ("random", 0.5, 0, ids[1:3], 0.8), ("all", 1.0, None, ids, 0.7))]
    curve = filtering_curve(arms, samples)
    curve.to_parquet(curve_dir / "curve.parquet")
    curve_summary(curve, "answer_logprob").to_parquet(curve_dir / "summary.parquet")
    write_json(curve_dir / "curve.json", {"metric": "answer_logprob", "best_by_fraction": {"0.5": "cosine"}})
    out = tmp_path / "report"
    rc = cli.stage_main(report_stage, [
        "--samples", str(a["samples"]), "--train-sae", str(a["train_sae"]), "--features", str(a["features"]),
        "--score", str(tmp_path / "score"), "--curve", str(curve_dir), "--baseline-scores", str(base),
        "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    aur = {(r["method"], r["kind"]): r["auroc"] for r in report["auroc"]}
    assert aur["ifd", "any"] == 1.0
    assert report["curve"]["best_by_fraction"] == {"0.5": "cosine"}
    assert {r["method"] for r in report["curve"]["summary"]} == {"cosine", "random", "all"}
    page = (out / "index.html").read_text()
    assert "Filtering curve" in page and "0.5: cosine" in page
    # the share of each corruption kind (named by the data) kept by each arm
    kinds = sorted(samples["corruption"].dropna().unique())
    assert "Bad samples kept, per corruption kind" in page and kinds and all(f"<th>{k}</th>" in page for k in kinds)
    assert page.count("data:image/png;base64,") == 5  # + the curve plot


def test_stage_times_sum_jobs_per_stage(tmp_path, capsys):
    from mmsae.report import timings

    bench = tmp_path / "benchmarks"
    bench.mkdir()
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, s, rss, cpu in [("finetune-aaaaaaaa", 30.0, 500.0, 20.0), ("finetune-bbbbbbbb", 10.0, 700.0, 9.0),
                              ("train_sae-cccccccc", 25.0, 400.0, 24.0), ("score-dddddddd.shard-0", 5.0, 100.0, 4.0)]:
        (bench / f"{name}.tsv").write_text(header + f"{s}\t0:00:{int(s):02d}\t{rss}\t0\t0\t0\t0\t0\t50\t{cpu}\n")
    table = timings.stage_times(tmp_path)
    assert table["stage"].tolist() == ["finetune", "train_sae", "score"]
    ft = table.iloc[0]
    assert (ft["jobs"], ft["total_s"], ft["max_s"], ft["max_rss_mb"], ft["cpu_s"]) == (2, 40.0, 30.0, 700.0, 29.0)
    assert timings.main([str(tmp_path)]) == 0
    assert "3 stages, 4 jobs, 70 s of job time" in capsys.readouterr().out
    assert timings.main([str(tmp_path / "nothing")]) == 1
