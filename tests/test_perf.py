"""The speed benchmarks in perf/: each script runs at a tiny size, prints its one-line result with its ratio and
writes a JSON result whose numbers agree with that line. No timing is asserted (the numbers themselves
are measured by `make perf`, see perf/README.md); the helpers behind them are pinned on hand-built cases.

SAELens lives in its own venv (perf/.venv-saelens, built by `make perf`), so the test drives
sae_train.py's peer path with a stand-in `sae_lens` package that has the API the worker uses: it checks
the orchestration (subprocesses, the clocked batch stream, the ratio), not SAELens itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

PERF = Path(__file__).resolve().parent.parent / "perf"


def load(name: str):
    """Import perf/<name>.py (perf/ is a folder of scripts, not a package)."""
    if str(PERF) not in sys.path:
        sys.path.insert(0, str(PERF))
    spec = importlib.util.spec_from_file_location(f"perf_{name}", PERF / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(name: str, argv: list[str], capsys, json_path: Path) -> tuple[str, dict]:
    assert load(name).main([*argv, "--json", str(json_path)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return line, json.loads(json_path.read_text())


def test_step_clock_on_a_hand_made_clock(monkeypatch):
    common = load("_common")
    ticks = iter([0.0, 1.0, 1.5, 3.5, 4.0])  # wall marks of 5 batches; CPU advances half as fast
    cpu = iter([0.0, 0.5, 0.75, 1.75, 2.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(common.time, "process_time", lambda: next(cpu))
    clock = common.StepClock("cpu")
    assert list(clock.wrap(range(5))) == [0, 1, 2, 3, 4]
    s = clock.summary(batch=10)
    # step 0 (0.0 -> 1.0) is left out: steps 0.5, 2.0, 0.5 over marks 1..4
    assert s["timed_steps"] == 3 and s["loop_s"] == 3.0 and s["loop_cpu_s"] == 1.5
    assert s["tokens_per_s"] == 10.0 and s["tokens_per_cpu_s"] == 20.0
    assert s["best_step_s"] == 0.5 and s["median_step_s"] == 0.5 and s["tokens_per_s_best_step"] == 20.0
    with pytest.raises(RuntimeError):
        common.StepClock("cpu").summary(10)


def test_matmul_flop_counts():
    flops = load("sae_flops")
    b, d, s, k = 2, 3, 4, 1
    assert flops.step_flops("relu", b, d, s, k) == 10 * 2 * 3 * 4 == 240
    assert flops.step_flops("topk", b, d, s, k) == 2 * 24 + 8 * 2 * 1 * 3 == 96


def test_synthetic_store_is_deterministic_and_split_free(tmp_path):
    data = load("_data")
    a = data.write_store(tmp_path / "a", 5, 8, seed=3, samples_per_append=2)
    b = data.write_store(tmp_path / "b", 5, 8, seed=3, samples_per_append=5)
    np.testing.assert_array_equal(a.read(0), b.read(0))  # the same rows whatever the append size
    assert a.n_tokens == 5 * 64
    tok = a.tokens
    first = tok[tok["sample_id"] == "s00000001"]
    assert list(first["modality"][:2]) == ["special", "image"] and (first["modality"] == "image").sum() == 32
    assert first["is_response"].sum() == data.RESPONSE_TOKENS and first["row"].iloc[0] == 64
    c = data.synthetic_acts(64, 8, seed=3, start=64)  # rows 64..127 = sample 1
    np.testing.assert_array_equal(c, a.read(0, 64, 128))


FAKE_SAE_LENS = '''
"""Stand-in for sae_lens in tests: the names perf/saelens_worker.py uses; fit() takes every batch."""
import torch

__version__ = "0.0-test"


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class StandardTrainingSAEConfig(_Cfg):
    pass


class TopKTrainingSAEConfig(_Cfg):
    pass


class BatchTopKTrainingSAEConfig(_Cfg):
    pass


class JumpReLUTrainingSAEConfig(_Cfg):
    pass


class MatryoshkaBatchTopKTrainingSAEConfig(_Cfg):
    pass


class _SAE:
    def __init__(self, cfg):
        self.cfg = cfg
        self.W_enc, self.b_enc = torch.zeros(cfg.d_in, cfg.d_sae), torch.zeros(cfg.d_sae)
        self.W_dec, self.b_dec = torch.zeros(cfg.d_sae, cfg.d_in), torch.zeros(cfg.d_in)


class StandardTrainingSAE(_SAE):
    pass


class TopKTrainingSAE(_SAE):
    pass


class BatchTopKTrainingSAE(_SAE):
    pass


class JumpReLUTrainingSAE(_SAE):
    pass


class MatryoshkaBatchTopKTrainingSAE(_SAE):
    pass
'''
FAKE_TRAINER = '''
class SAETrainer:
    def __init__(self, cfg, sae, data_provider):
        self.cfg, self.sae, self.data = cfg, sae, data_provider
        self.n_training_steps = self.n_training_samples = 0

    def fit(self):
        for _ in range(self.cfg.total_training_samples // self.cfg.train_batch_size_samples):
            x = next(self.data)
            x @ self.sae.W_enc
            self.n_training_steps += 1
            self.n_training_samples += len(x)
        return self.sae
'''


def fake_sae_lens(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "fake" / "sae_lens"
    (pkg / "training").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_SAE_LENS))
    (pkg / "config.py").write_text("from sae_lens import _Cfg as SAETrainerConfig\n")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "sae_trainer.py").write_text(textwrap.dedent(FAKE_TRAINER))
    # in front of the caller's PYTHONPATH (a checkout other than the installed one), not in its place
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(pkg.parent), os.environ.get("PYTHONPATH")])))


def run_sae_train(tmp_path, capsys, monkeypatch, args: list[str]) -> tuple[str, dict]:
    """perf/sae_train.py at a tiny size against the stand-in sae_lens."""
    fake_sae_lens(tmp_path, monkeypatch)
    return run_script("sae_train", ["--d-in", "16", "--d-sae", "64", "--batch", "32", "--samples", "6",
                                    "--saelens-python", sys.executable, "--work", str(tmp_path), *args],
                      capsys, tmp_path / "r.json")


def test_sae_train_bench_prints_ratio(tmp_path, capsys, monkeypatch):
    line, res = run_sae_train(tmp_path, capsys, monkeypatch, ["--steps", "5", "--k", "4", "--archs", "topk"])
    assert re.search(r"topk mmsae [\d,]+ tok/s vs [\d,]+ = \d+\.\d\dx \(CPU-time \d+\.\d\dx", line), line
    ours, peer = res["runs"]["mmsae_topk"], res["runs"]["saelens_topk"]
    assert ours["steps"] == 5 and peer["steps"] == 5 and peer["version"] == "0.0-test"
    assert ours["timed_steps"] == peer["timed_steps"] == 3  # steps 1..3 of 0..4, clocked alike
    assert ours["d_sae"] == 64 and ours["l0_eval"] == pytest.approx(4.0)  # mmsae's own trainer: k = 4 latents
    assert res["ratio_mmsae_over_saelens"]["topk"]["wall"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"])
    assert res["sizes"]["store_tokens"] == 6 * 64


def test_sae_train_bench_gives_a_ratio_per_new_architecture(tmp_path, capsys, monkeypatch):
    archs = ["batchtopk", "jumprelu", "matryoshka_batchtopk"]
    line, res = run_sae_train(tmp_path, capsys, monkeypatch, ["--steps", "4", "--k", "4", "--archs", ",".join(archs),
                                                              "--l0", "0.01"])
    for arch in archs:
        assert re.search(rf"{arch} mmsae [\d,]+ tok/s vs [\d,]+ = \d+\.\d\dx", line), line
        assert res["runs"][f"mmsae_{arch}"]["steps"] == res["runs"][f"saelens_{arch}"]["steps"] == 4
    assert set(res["ratio_mmsae_over_saelens"]) == set(archs)
    # mmsae's own trainer ran each: the inference L0 of a BatchTopK SAE after 4 steps is above k (the
    # threshold starts at 0 and moves 1% per step), a JumpReLU's below d_sae
    assert res["runs"]["mmsae_batchtopk"]["l0_eval"] > 4 and res["runs"]["mmsae_jumprelu"]["l0_eval"] < 64


def test_sae_train_bench_times_relu_also_from_a_trained_sae(tmp_path, capsys, monkeypatch):
    line, res = run_sae_train(tmp_path, capsys, monkeypatch, ["--steps", "4", "--archs", "relu",
                                                              "--relu-init-steps", "30"])
    assert re.search(r"relu mmsae .*; relu from 30 steps mmsae [\d,]+ tok/s vs [\d,]+ = \d+\.\d\dx", line), line
    runs = res["runs"]
    assert set(runs) == {"mmsae_relu", "saelens_relu", "mmsae_relu_trained", "saelens_relu_trained"}
    assert res["relu_init_run"]["steps"] == 30 and res["sizes"]["relu_init_steps"] == 30
    assert runs["mmsae_relu_trained"]["steps"] == runs["saelens_relu_trained"]["steps"] == 4
    # the timed run starts from the 30-step SAE: after the same 4 steps its loss is below the fresh run's
    assert runs["mmsae_relu_trained"]["final_loss"] < 0.8 * runs["mmsae_relu"]["final_loss"], runs
    assert set(res["ratio_mmsae_over_saelens"]) == {"relu", "relu_trained"}


def test_sae_flops_bench_prints_fraction_of_peak(tmp_path, capsys):
    line, res = run_script("sae_flops", ["--d-in", "16", "--d-sae", "64", "--batch", "32", "--k", "4",
                                         "--steps", "3", "--warmup", "1", "--peak-sizes", "64,96"],
                           capsys, tmp_path / "r.json")
    assert re.search(r"matmul peak [\d,.]+ GFLOP/s; relu [\d,.]+ GFLOP/s = \d+\.\d\d of peak", line), line
    assert "topk" in line
    relu = res["runs"]["relu"]
    assert relu["flops_per_step"] == 10 * 32 * 16 * 64
    assert relu["fraction_of_peak"] == pytest.approx(relu["flops_per_s"] / res["peak_flops_per_s"]["flops_per_s"])
    assert relu["s_per_step"]["n"] == 3 and res["peak"]["best_size"] in (64, 96)
    assert any(e["op"].startswith("aten::") for e in relu["profile_top"])


def test_extract_bench_prints_overhead(tmp_path, capsys):
    line, res = run_script("extract_overhead", [
        "--samples", "4", "--batch", "2", "--hidden", "32", "--intermediate", "64", "--layers", "2",
        "--heads", "2", "--vision-hidden", "16", "--vision-layers", "1", "--image-size", "16", "--patch", "8",
        "--repeats", "2"], capsys, tmp_path / "r.json")
    assert re.search(r"= [+-]\d+\.\d% overhead", line), line
    # 4 samples of (4 image tokens + text): the tokens written are counted once per repeat
    assert res["tokens"] > 4 * 4 and res["sizes"]["capture"] == [1]
    best = {k: min(w for w, _ in v) for k, v in res["times_wall_cpu_s"].items()}
    assert len(res["times_wall_cpu_s"]["bare"]) == 2
    assert res["overhead"] == pytest.approx(best["extract"] / best["bare"] - 1)


def test_scale_bench_prints_memory_ratios(tmp_path, capsys):
    torch.set_num_threads(1)
    line, res = run_script("scale", ["--samples", "3", "--factor", "2", "--d-in", "16", "--d-sae", "64", "--k", "4",
                                     "--batch-tokens", "64", "--batch-rows", "256", "--chunk-tokens", "64",
                                     "--inline", "--score-steps", "--work", str(tmp_path)], capsys, tmp_path / "r.json")
    assert re.search(r"encode [\d,]+ -> [\d,]+ tok/s, peak RSS [\d,]+ -> [\d,]+ MB \(x\d+\.\d\d", line), line
    assert "features" in line and "score" in line
    for label, samples in (("1x", 3), ("2x", 6)):
        run = res["runs"][label]
        assert run["encode"]["n_tokens"] == samples * 64
        assert run["encode"]["nnz"] == samples * 64 * 4  # TopK: k codes per token, all > 0 here
        assert run["score"]["n_samples"] == samples
    # the binding scores run, over a non-empty XMc (the bench's loose score.consistency), reported on the line
    scale = load("scale")
    assert {"consistency_binding", "consistency_binding_gated"} <= set(scale.METHODS)
    assert res["score_consistency"] == scale.CONSISTENCY
    xmc = [res["runs"][k]["score"]["n_concept_features"] for k in ("1x", "2x")]
    assert min(xmc) > 0 and f"XMc {xmc[0]:,} -> {xmc[1]:,} features" in line
    steps = res["runs"]["2x"]["score"]["steps"]
    assert [s["step"] for s in steps] == list(scale.SCORE_STEPS) and all(s["rss_mb"] > 0 for s in steps)
    r = res["ratios_big_over_small"]["encode"]
    assert r["peak_rss"] == pytest.approx(res["runs"]["2x"]["encode"]["peak_rss_mb"]
                                          / res["runs"]["1x"]["encode"]["peak_rss_mb"])


def test_topk_bench_agrees_with_the_lexsort_it_replaced(tmp_path, capsys):
    line, res = run_script("topk", ["--d-sae", "50", "--k", "3", "--batch-rows", "500", "--batches", "8"], capsys,
                           tmp_path / "t.json")
    assert res["same"] is True and "same entries: True" in line and res["n_codes"] == 4000


def test_peak_rss_is_this_address_space(tmp_path):
    """A child's peak is its own, not its parent's (ru_maxrss survives execve; VmHWM does not)."""
    import subprocess

    big = bytearray(400 << 20)  # the parent's peak rises by 400 MB
    big[::4096] = b"x" * len(big[::4096])
    code = f"import sys; sys.path.insert(0, {str(PERF)!r}); import _common; print(_common.peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    parent = load("_common").peak_rss_mb()
    assert parent - child > 300, (parent, child)
    del big


def test_store_read_bench_prints_ratio(tmp_path, capsys):
    line, res = run_script("store_read", ["--d-in", "32", "--tokens", "1024", "--chunk-tokens", "64",
                                          "--shard-chunks", "2", "--batch-size", "64", "--buffer-chunks", "2",
                                          "--work", str(tmp_path)], capsys, tmp_path / "r.json")
    assert re.search(r"shuffled batches [\d,]+ MiB/s \([\d,]+ tok/s\) vs sequential [\d,]+ MiB/s .* ratio \d+\.\d\d", line), line
    assert res["ratio_shuffled_over_sequential"] == pytest.approx(res["shuffled_bytes_per_s"] / res["sequential_bytes_per_s"])
    # every row served once in the epoch: tokens/s x seconds = the store's rows
    assert res["shuffled_tokens_per_s"] * res["shuffled_s"] == pytest.approx(1024)
    assert res["store_bytes"] > 0 and res["raw_bytes"] == 1024 * 32 * 2


def test_synthetic_pool_has_the_papers_layout(tmp_path):
    """perf/_codes.py: a store, a token index with several images per sample, samples.parquet and codes in
    parts of whole samples, ~k latents per token (Zipf: some latents far more frequent than others)."""
    from mmsae.activations import ActivationStore
    from mmsae.codes import CodesReader

    codes_mod = load("_codes")
    one = codes_mod.layout(1024, 3, 334)  # the bench's default sample
    assert (one["modality"] == "image").mean() == pytest.approx(0.98, abs=0.005)
    assert sorted(one["image_index"].unique()) == [-1, 0, 1, 2]
    counts = codes_mod.write_pool(tmp_path, 6, 16, 128, 8, tokens_per_sample=64, images=2, image_tokens=20,
                                  chunk_tokens=32, part_tokens=128, samples_per_block=1)
    store = ActivationStore(tmp_path / "extract")
    assert store.n_tokens == counts["n_tokens"] == 6 * 64 and store.d_model == 16
    tok = store.tokens
    assert (tok["modality"] == "image").sum() == counts["image_tokens"] == 6 * 40
    reader = CodesReader(tmp_path / "encode" / "codes.parquet")
    assert len(reader.parts) == counts["n_parts"] == 3  # 128 tokens = 2 samples per part
    assert [p["sample0"] for p in reader.parts] == [0, 2, 4]
    b = next(reader.iter_codes(["row", "sample_id", "modality", "feature"], batch_rows=10**6))
    assert len(b["row"]) == counts["n_codes"] and np.all(np.diff(b["row"]) >= 0)
    l0 = np.bincount(b["row"], minlength=store.n_tokens)
    assert l0.max() <= 8 and l0.mean() > 4
    # each code's sample and modality are its token's
    np.testing.assert_array_equal(b["sample_id"], tok["sample_id"].to_numpy()[b["row"]])
    np.testing.assert_array_equal(b["modality"], tok["modality"].to_numpy()[b["row"]])
    freq = np.sort(np.bincount(b["feature"], minlength=128))[::-1]
    assert freq[0] > 10 * max(freq[64], 1)


def test_scale_bench_on_synthetic_codes(tmp_path, capsys):
    """--synthetic-codes: the real features and score stages at 1x / 2x, each size's tokens and peak memory."""
    torch.set_num_threads(1)
    line, res = run_script("scale", ["--synthetic-codes", "--inline", "--samples", "2", "--factors", "1,2",
                                     "--d-in", "16", "--d-sae", "64", "--k", "4", "--tokens-per-sample", "64",
                                     "--images", "2", "--image-tokens", "20", "--chunk-tokens", "32",
                                     "--work", str(tmp_path)], capsys, tmp_path / "r.json")
    assert re.search(r"features peak RSS [\d,]+ -> [\d,]+ MB \(increase -?[\d,]+ -> -?[\d,]+ MB\); score", line), line
    assert res["mode"] == "synthetic_codes" and "encode" not in res["runs"]["1x"]
    for label, samples in (("1x", 2), ("2x", 4)):
        run = res["runs"][label]
        assert run["pool"]["n_tokens"] == run["features"]["n_tokens"] == samples * 64
        assert run["score"]["n_samples"] == samples and run["features"]["cross_modal"] > 0
        assert run["score"]["peak_rss_mb"] > 0 and run["features"]["peak_rss_mb"] > 0


def test_scale_bench_keeps_and_reuses_its_synthetic_pools(tmp_path, capsys):
    argv = ["--synthetic-codes", "--inline", "--samples", "1", "--factors", "1,2", "--d-in", "8", "--d-sae", "32",
            "--k", "4", "--tokens-per-sample", "64", "--images", "1", "--image-tokens", "40", "--chunk-tokens", "32",
            "--work", str(tmp_path), "--keep"]
    _, first = run_script("scale", argv, capsys, tmp_path / "a.json")
    assert (tmp_path / "2x" / "score").is_dir() and first["runs"]["2x"]["pool"]["write_s"] > 0
    _, again = run_script("scale", argv, capsys, tmp_path / "b.json")  # the same pools, the stages rerun
    assert again["runs"]["2x"]["pool"]["write_s"] == 0 and again["runs"]["2x"]["score"]["n_samples"] == 2
    with pytest.raises(SystemExit, match="not this size"):
        load("scale").main([*argv[:3], "2", *argv[4:], "--json", str(tmp_path / "c.json")])  # --samples 2
