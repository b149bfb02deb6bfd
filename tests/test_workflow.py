"""The Snakemake workflow: dry runs, the slurm profile, config errors, and one end-to-end run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
ALL_STAGES = {"toyworld", "sample", "toy_model", "extract", "model_loss", "train_sae", "encode",
              "features", "premise", "score", "evaluate_sae", "report", "latest_report",
              "baseline_scores", "finetune", "benchmark", "curve", "patch_filter", "browser", "latest_browser"}


def smk(*args: str, cwd: Path = REPO, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([*SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    """Rule names in the dry run's job-stats table."""
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    block = text.split("Job stats:")[1] if "Job stats:" in text else ""
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", block, re.M)} - {"total", "all"}


def test_dry_run_lists_the_whole_chain(tmp_path):
    assert planned_jobs(smk("-n", "--directory", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"))) == ALL_STAGES


def test_dry_run_with_slurm_profile_puts_gpus_on_extract_and_train(tmp_path):
    r = smk("-n", "--directory", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"),
            "--workflow-profile", str(REPO / "profiles/slurm"))
    assert planned_jobs(r) == ALL_STAGES
    text = r.stdout + r.stderr
    for rule in ("extract", "train_sae"):
        section = text.split(f"rule {rule}:")[1].split("rule ")[0]
        assert "gpu=1" in section, section


def test_every_stage_script_answers_help_outside_snakemake():
    """Each rule's script is standalone: `python workflow/scripts/<stage>.py --help` works."""
    scripts = sorted((REPO / "workflow" / "scripts").glob("*.py"))
    rules = "".join(p.read_text() for p in (REPO / "rules").glob("*.smk"))
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd="/") for p in scripts}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, err)
        assert "--out" in out and "--params" in out, name
        assert f"{{SCRIPTS}}/{name}" in rules, f"{name} is not called by any rule"


def test_curve_target_plans_one_finetune_and_benchmark_per_arm(tmp_path):
    r = smk("-n", "-p", "curve", "--directory", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"))
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())["properties"]["curve"]["properties"]
    cfg = {k: v["default"] for k, v in schema.items() if "default" in v}
    cfg.update(yaml.safe_load((REPO / "config/config.yaml").read_text()).get("curve", {}))
    # every method and every random seed at every fraction, plus the whole sample
    arms = (len(cfg["methods"]) + len(cfg["random_seeds"])) * len(cfg["fractions"]) + 1
    text = r.stdout + r.stderr
    assert planned_jobs(r) >= {"finetune", "benchmark", "baseline_scores", "curve"}
    assert re.search(r"--keep-fraction 0\.3 --keep-by random:2\b", text)
    assert re.search(r"--keep-by \S+/baseline_scores-\w+/ifd\.parquet:ifd_score", text)
    assert re.search(rf"^finetune\s+{arms}$", text, re.M) and re.search(rf"^benchmark\s+{arms + 1}$", text, re.M)


def test_invalid_config_fails_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train_sae": {"scope": "pixels"}}))
    r = smk("-n", "--directory", str(tmp_path), "--configfile", str(bad))
    assert r.returncode != 0
    first = (r.stdout + r.stderr).strip().splitlines()[0]
    assert first == 'config: train_sae.scope = "pixels": must be one of "all", "text"', first


def test_layer_beyond_the_model_fails_at_dry_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"extract": {"layers": [0, 9]}}))
    r = smk("-n", "--directory", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"), str(bad))
    assert r.returncode != 0
    first = (r.stdout + r.stderr).strip().splitlines()[0]
    assert first == "config: extract.layers = [0, 9]: the toy model has 4 decoder layers (0..3)", first


def _config(tmp_path: Path, name: str, **overrides) -> Path:
    cfg = yaml.safe_load((REPO / "config/test.yaml").read_text())
    for key, value in overrides.items():
        stage, param = key.split("__")
        cfg.setdefault(stage, {})[param] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _job_counts(result: subprocess.CompletedProcess) -> dict[str, int]:
    block = (result.stdout + result.stderr).split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def test_dry_run_with_three_shards(tmp_path):
    """extract.shards / score.shards = 3: extract_shard x3 (one GPU each) + extract_gather, score_shard x3 per
    score folder; the artifact folders keep the names of the unsharded run (shards are not hashed)."""
    profile = ("--workflow-profile", str(REPO / "profiles/slurm"))
    one = smk("-n", "-p", "--directory", str(tmp_path), "--configfile", str(_config(tmp_path, "one.yaml")), *profile)
    cfg = _config(tmp_path, "three.yaml", extract__shards=3, score__shards=3)
    three = smk("-n", "-p", "--directory", str(tmp_path), "--configfile", str(cfg), *profile)
    assert planned_jobs(three) == planned_jobs(one) - {"extract"} | {"extract_shard", "extract_gather", "score_shard"}
    counts = _job_counts(three)
    assert counts["extract_shard"] == 3 and counts["extract_gather"] == 1
    assert counts["score_shard"] == 3 * counts["score"] == 3 * _job_counts(one)["score"]
    text = three.stdout + three.stderr
    for k in range(3):
        assert re.search(rf"extract\.py .*--shard {k} ", text) and re.search(rf"score\.py .*--shard {k} ", text)
    assert re.search(r"extract\.py .*--gather ", text) and re.search(r"score\.py .*--gather ", text)
    for section in text.split("rule extract_shard:")[1:]:
        assert "gpu=1" in section.split("rule ")[0]
    folders = lambda r: set(re.findall(r"results/test/(\w+-[0-9a-f]{8})/manifest\.json", r.stdout + r.stderr))  # noqa: E731
    assert folders(three) == folders(one)


@pytest.mark.slow
def test_end_to_end_tiny_config(tmp_path):
    cfg = _config(tmp_path, "test.yaml")
    r = smk("--cores", "2", "--directory", str(tmp_path), "--configfile", str(cfg))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    results = tmp_path / "results" / "test"
    assert (results / "report" / "index.html").exists() and (results / "report" / "report.json").exists()
    assert "browser-" in (results / "browser.html").read_text()  # forwards to the newest feature browser
    for stage in ALL_STAGES - {"latest_report", "latest_browser"}:
        folders = list(results.glob(f"{stage}-????????"))
        # layers [0, 1] extracted: an SAE per layer for the AUROC-per-layer table (the configured SAE-V at
        # layer 0 is one of them), plus the text-only SAE that evaluate_sae compares with the SAE-V
        # the curve: cosine and ifd subsets, one random seed, the whole sample (+ the starting model's benchmark)
        expected = {"train_sae": 3, "encode": 2, "features": 2, "score": 2, "finetune": 4, "benchmark": 5}.get(stage, 1)
        assert len(folders) == expected, (stage, folders)
        for folder in folders:
            assert (folder / "manifest.json").exists() and (results / "logs" / f"{folder.name}.log").exists()
    report = json.loads((results / "report" / "report.json").read_text())
    assert {r["layer"] for r in report["auroc_by_layer"]} == {0, 1}
    assert {r["sae"] for r in report["sae_eval"]["summary"]} == {"all", "text"}
    arms = {(r["method"], r["fraction"]): r for r in report["curve"]["arms"]}
    assert set(arms) == {("start", 0.0), ("cosine", 0.5), ("ifd", 0.5), ("random", 0.5), ("all", 1.0)}
    assert arms[("all", 1.0)]["n_train"] == 120 and arms[("cosine", 0.5)]["n_train"] == 60
    bad = pd.read_parquet(next(results.glob("sample-*")) / "samples.parquet")["corruption"].notna().mean()
    assert arms[("all", 1.0)]["bad_share"] == pytest.approx(bad)
    assert all(0 <= r["exact_match"] <= 1 for r in arms.values())
    assert any(r["method"] == "ifd" for r in report["auroc"])
    score_dir = results / Path(report["artifacts"]["score"]).parent.name  # the configured SAE's scores
    scores = pd.read_parquet(score_dir / "scores.parquet")
    assert len(scores) == 120 and {"sample_id", "score_cosine", "rank_cosine"} <= set(scores.columns)

    # Nothing left to do; the same config and seed give the identical scores.parquet.
    assert planned_jobs(smk("-n", "--directory", str(tmp_path), "--configfile", str(cfg))) == set()
    before = (score_dir / "scores.parquet").read_bytes()
    for encode in results.glob("encode-*"):
        shutil.rmtree(encode)
    r = smk("--cores", "2", "--directory", str(tmp_path), "--configfile", str(cfg))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert pd.read_parquet(score_dir / "scores.parquet").equals(pd.read_parquet(pd.io.common.BytesIO(before)))

    # An SAE hyperparameter reruns the SAE and what follows it, nothing upstream; both coexist on disk.
    cfg2 = _config(tmp_path, "test2.yaml", train_sae__l1_coefficient=0.1)
    # (of the curve, only the arm that trains on the SAE's subset: random/ifd/whole-sample arms stay)
    r = smk("-n", "--directory", str(tmp_path), "--configfile", str(cfg2))
    assert planned_jobs(r) == {"train_sae", "encode", "features", "premise", "score", "evaluate_sae", "report",
                               "latest_report", "curve", "finetune", "benchmark", "patch_filter", "browser",
                               "latest_browser"}
    assert re.search(r"^finetune\s+1$", r.stdout + r.stderr, re.M)


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "config/presets").glob("*.yaml")))
def test_presets_dry_run_on_the_slurm_profile(tmp_path, preset):
    cfg = yaml.safe_load((REPO / "config/presets" / preset).read_text())
    data = tmp_path / "data.parquet"
    data.touch()  # the real data set lives on the cluster; the dry run only needs the path to exist
    cfg["data"]["source"] = str(data)
    path = tmp_path / preset
    path.write_text(yaml.safe_dump(cfg))
    r = smk("-n", "-p", "--directory", str(tmp_path), "--configfile", str(path),
            "--workflow-profile", str(REPO / "profiles/slurm"))
    expected = {"sample", "extract", "model_loss", "train_sae", "encode", "features", "score", "evaluate_sae",
                "baseline_scores", "report", "latest_report", "browser", "latest_browser"}
    assert planned_jobs(r) == expected
    # the paper's hyperparameters reach the SAE training command
    train_cmd = next(line for line in (r.stdout + r.stderr).splitlines() if "train_sae.py" in line)
    for key in ("layer", "expansion", "l1_coefficient", "steps", "batch_size"):
        assert f'"{key}": {cfg["train_sae"][key]}' in train_cmd, key


def test_finetune_with_several_gpus_runs_under_accelerate(tmp_path):
    r = smk("-n", "-p", "curve", "--directory", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"),
            "--set-resources", "finetune:gpu=4")
    assert r.returncode == 0, r.stderr[-3000:]
    launches = [line for line in (r.stdout + r.stderr).splitlines() if "finetune.py" in line]
    assert launches and all("accelerate launch --config_file" in line and "--num_processes 4" in line
                            and "config/accelerate/deepspeed_zero3.yaml" in line for line in launches)


@pytest.mark.parametrize(("curve", "field"), [({"methods": ["random"]}, "curve.methods"),
                                               ({"methods": ["nope"]}, "curve.methods"),
                                               ({"fractions": [0.4]}, "curve.fractions")])
def test_bad_curve_config_fails_naming_the_field(tmp_path, curve, field):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"curve": curve}))
    r = smk("-n", "--directory", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"), str(bad))
    assert r.returncode != 0 and f"config {field}" in r.stdout + r.stderr
