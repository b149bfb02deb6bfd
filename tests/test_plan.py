"""The plan (mmsae.plan) against measured runs: sample -> extract -> train_sae -> encode on a tiny random
LLaVA-NeXT, then the plan's tokens by modality, store / token index / codes / SAE / checkpoint bytes within
25% of what the stages wrote. Not checked here: peak memory and GPU-hours (a tiny model's RSS is the
interpreter's; perf/real_width.py compares those at real widths), features / score disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import (
    build_tiny_llava_next,
    records_frame,
    tiny_chameleon,
    tiny_llava_next,
    tiny_qwen2_vl,
    tiny_records,
)

from mmsae import cli, plan
from mmsae.activations import ActivationStore
from mmsae.activations import stage as extract_stage
from mmsae.data import sample as sample_stage
from mmsae.params import TrainSaeParams
from mmsae.sae import encode as encode_stage
from mmsae.sae import train as train_stage
from mmsae.sae.training.loop import train_sae

SIZES = [(32, 32), (16, 32), (40, 20), (64, 24)]  # (width, height): different anyres grids


def du(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (codes may be a folder of parts)."""
    if Path(path).is_file():
        return Path(path).stat().st_size
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def near(estimate: float, measured: float, tol: float = 0.25) -> bool:
    return abs(estimate - measured) <= tol * measured


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The stages on 24 records; the plan computed from the config, the model folder and 12 sample rows."""
    tmp = tmp_path_factory.mktemp("plan")
    model = tiny_llava_next(tmp)
    data = tmp / "pool.parquet"
    records_frame(tiny_records(24, sizes=SIZES)).to_parquet(data)
    extract = {"layers": [0, 1], "batch_size": 8, "chunk_tokens": 128, "shard_chunks": 2}
    sae = {"layer": 1, "architecture": "topk", "k": 8, "expansion": 4, "steps": 30, "batch_size": 64,
           "checkpoint_every": 10, "device": "cpu", "dead_window": 1000}
    encode = {"batch_tokens": 256, "device": "cpu"}
    assert cli.stage_main(sample_stage, ["--data", str(data), "--out", str(tmp / "sample")]) == 0
    assert cli.stage_main(extract_stage, ["--samples", str(tmp / "sample"), "--model", str(model), "--out",
                                          str(tmp / "extract"), "--params", json.dumps(extract)]) == 0
    # a checkpoint as training leaves it (the finished stage removes them)
    train_sae(ActivationStore(tmp / "extract"), TrainSaeParams.load(sae), tmp / "killed", tmp / "ckpt",
              stop_after=10, progress=False)
    assert cli.stage_main(train_stage, ["--extract", str(tmp / "extract"), "--checkpoints", str(tmp / "ck2"),
                                        "--out", str(tmp / "train_sae"), "--params", json.dumps(sae)]) == 0
    assert cli.stage_main(encode_stage, ["--extract", str(tmp / "extract"), "--sae", str(tmp / "train_sae"),
                                         "--out", str(tmp / "encode"), "--params", json.dumps(encode)]) == 0
    config = plan.load_plan_config(None, {
        "data": {"source": str(data)}, "model": {"path": str(model)}, "extract": extract,
        "train_sae": sae, "encode": encode, "score": {"layers": [1]}, "evaluate_sae": {"scopes": ["all"]}})
    return tmp, plan.plan(config, sample_rows=12, profile=None), config


def test_tokens_by_modality(run):
    tmp, p, _ = run
    counts = json.loads((tmp / "extract" / "manifest.json").read_text())["counts"]
    est = p["stages"]["extract"]["tokens"]
    assert p["sources"]["pool"]["rows"] == counts["n_samples"] == 24
    for modality in ("text", "image", "special"):
        assert near(est[modality], counts[f"n_{modality}"]), (modality, est[modality], counts[f"n_{modality}"])
    assert near(est["total"], counts["n_tokens"], 0.05)


def test_disk_per_artifact(run):
    tmp, p, config = run
    newest = max((tmp / "ckpt").iterdir())  # one checkpoint as training writes it
    st = p["stages"]
    measured = {
        ("extract", "acts.zarr"): du(tmp / "extract") - (tmp / "extract" / "tokens.parquet").stat().st_size,
        ("extract", "tokens.parquet"): (tmp / "extract" / "tokens.parquet").stat().st_size,
        ("encode", "codes.parquet"): du(tmp / "encode" / "codes.parquet"),
        ("train_sae", "sae_weights.safetensors"): (tmp / "train_sae" / "sae" / "sae_weights.safetensors").stat().st_size,
        # the plan counts the kept checkpoints plus the one being written
        ("train_sae", "checkpoints (during training)"):
            (config["train_sae"].get("keep_checkpoints", 1) + 1) * du(newest),
    }
    for (stage, artifact), size in measured.items():
        assert near(st[stage]["disk"][artifact], size), (stage, artifact, st[stage]["disk"][artifact], size)


def test_image_tokens_equal_the_processors():
    """The anyres arithmetic equals the LLaVA-NeXT processor's own count, at llava-v1.6's pinpoints too."""
    model, processor = build_tiny_llava_next()
    info = plan.model_info(model.config.to_dict())
    sizes = [(32, 32), (16, 32), (40, 20), (64, 24), (17, 61), (300, 200)]
    want = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
    assert [plan.image_tokens(info, w, h) for w, h in sizes] == want
    # LLaVA-v1.6 (336 px tiles, patch 14, 5 pinpoints): the base 24 x 24 grid plus tiles
    cfg = {"model_type": "llava_next", "vision_config": {"image_size": 336, "patch_size": 14},
           "text_config": {"hidden_size": 8, "num_hidden_layers": 1}}
    v16 = plan.model_info(cfg)
    processor.image_processor.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    processor.patch_size = 14
    sizes = [(640, 480), (336, 336), (1024, 300), (500, 1500)]
    want = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
    assert [plan.image_tokens(v16, w, h) for w, h in sizes] == want
    assert plan.image_tokens(v16, 640, 480) > 576  # anyres adds tiles to the base grid


@pytest.mark.parametrize("builder", [tiny_qwen2_vl, tiny_chameleon])
def test_image_tokens_from_a_saved_folder(builder, tmp_path):
    """Qwen2-VL (smart resize, merged patches) and Chameleon (VQ grid) read from the saved processor config
    equal the counts the processor expands (tests/test_extract.py's EXPECTED_IMAGE_TOKENS for these sizes)."""
    path = builder(tmp_path)
    info = plan.load_model_info({"model": {"path": str(path)}})
    want = {"qwen2_vl": [16, 8, 10], "chameleon": [16, 16, 16]}[info.model_type]
    assert [plan.image_tokens(info, w, h) for w, h in [(32, 32), (16, 32), (40, 20)]] == want


def test_every_image_is_counted(tmp_path):
    """mmsae layout with extra_images and OBELICS documents: all images of a record, in the tokens."""
    import io

    import pandas as pd
    from PIL import Image

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, format="PNG")
        return buf.getvalue()

    pd.DataFrame([{"sample_id": "a", "question": "q", "image": png(8, 8), "extra_images": [png(8, 8), png(8, 8)],
                   "responses": ["r"], "preferred": 0},
                  {"sample_id": "b", "question": "q", "image": png(8, 8), "extra_images": None,
                   "responses": ["r"], "preferred": 0}]).to_parquet(tmp_path / "m.parquet")
    pd.DataFrame([{"texts": ["a", None, "b", None], "images": [None, png(8, 8), None, png(8, 8)]}]).to_parquet(
        tmp_path / "o.parquet")
    info = plan.model_info({"model_type": "llava", "vision_config": {"image_size": 336, "patch_size": 14},
                            "text_config": {"hidden_size": 8, "num_hidden_layers": 1}})
    n, rows = plan.read_source({"source": str(tmp_path / "m.parquet"), "format": "mmsae"}, None, 8, {})
    assert n == 2 and [len(r.image_sizes) for r in rows] == [3, 1]
    tc = plan.count_tokens(rows, info, None, include_response=True)
    assert tc.images == 2 and tc.image == 2 * 576
    n, rows = plan.read_source({"source": str(tmp_path / "o.parquet"), "format": "obelics"}, None, 8, {})
    assert n == 1 and len(rows[0].image_sizes) == 2 and rows[0].question == "a b" and rows[0].response is None


def test_flags_what_does_not_fit(tmp_path):
    """A profile with too little memory and runtime is flagged; a missing sae_data means the pool."""
    config = plan.load_plan_config(None, {"toyworld": {"n_samples": 100}})
    assert plan.corpus_section(config) is None
    prof = tmp_path / "p.yaml"
    prof.write_text("default-resources: {mem_mb: 100, runtime: 1}\n")
    p = plan.plan(config, sample_rows=8, profile=prof)
    assert any(f.startswith("extract: host memory") for f in p["flags"])
    assert p["sources"]["corpus"] is None
    corpus = plan.plan({**config, "sae_data": {"source": "toyworld", "n": 50}}, sample_rows=8, profile=None)
    assert corpus["sources"]["corpus"]["rows"] == 50 and "sae_extract" in corpus["stages"]
    assert corpus["stages"]["train_sae"]["tokens"]["available"] < p["stages"]["train_sae"]["tokens"]["available"]


def test_cli_writes_plan_md_and_json(tmp_path, capsys):
    """`python -m mmsae.plan` (what `snakemake plan` runs), with the pool given as rows x tokens/sample."""
    out = tmp_path / "plan"
    assert plan.main(["--rows", "100", "--tokens-per-sample", "50", "--image-share", "0.5", "--profile", "",
                      "--config-json", '{"extract": {"dtype": "bfloat16"}}', "--out", str(out)]) == 0
    p = json.loads((out / "plan.json").read_text())
    assert p["sources"]["pool"]["tokens"] == 5000 and p["stages"]["extract"]["tokens"]["image"] == 2500
    d = p["inputs"]["d_model"]
    # tokens x the default layers x d x 2 bytes x bf16's zstd ratio
    layers = len(plan.load_plan_config(None)["extract"]["layers"])
    assert p["stages"]["extract"]["disk"]["acts.zarr"] == 5000 * layers * d * 2 * plan.STORE_COMPRESSION["bfloat16"]
    assert (out / "plan.md").read_text() == capsys.readouterr().out


def test_score_on_a_cpu_job_holds_its_sae_on_the_host(tmp_path):
    """Score's SAE (and its dense block) is counted on the GPU when its job has one, and on the host when the
    profile gives score no GPU or the config pins score.device to cpu (issue #15: measured 0.62x before)."""
    config = plan.load_plan_config(None, {"toyworld": {"n_samples": 100}})
    gpu, cpu = tmp_path / "gpu.yaml", tmp_path / "cpu.yaml"
    gpu.write_text("set-resources: {score: {gpu: 1, mem_mb: 64000}}\n")
    cpu.write_text("set-resources: {score: {gpu: 0, mem_mb: 64000}}\n")
    on_gpu = plan.plan(config, sample_rows=8, profile=gpu)["stages"]["score"]
    on_cpu = plan.plan(config, sample_rows=8, profile=cpu)["stages"]["score"]
    pinned = plan.plan({**config, "score": {**config["score"], "device": "cpu"}}, sample_rows=8)["stages"]["score"]
    no_profile = plan.plan(config, sample_rows=8)["stages"]["score"]
    assert on_gpu["gpu_peak"] > 0 and on_gpu["gpu_hours"] > 0 and on_gpu["cpu_hours"] == 0
    assert no_profile["gpu_peak"] == on_gpu["gpu_peak"] and no_profile["host_peak"] == on_gpu["host_peak"]
    for p in (on_cpu, pinned):
        assert p["gpu_peak"] == 0 and p["gpu_hours"] == 0 and p["cpu_hours"] > 0
        assert p["host_peak"] == on_gpu["host_peak"] + on_gpu["gpu_peak"]
    assert not any(f.startswith("score: needs a GPU") for f in plan.plan(config, sample_rows=8, profile=cpu)["flags"])
