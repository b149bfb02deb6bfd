"""Fine-tuning with TRL: SFT / DPO / LoRA on tiny models, the token layout, the stage script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import records_frame, tiny_chameleon, tiny_llava, tiny_llava_next, tiny_qwen2_vl, tiny_records
from safetensors.torch import load_file

from mmsae import cli
from mmsae import finetune as ft  # trl is a dependency: a missing one fails here, never skips
from mmsae.errors import InputError
from mmsae.finetune import data as ft_data
from mmsae.models import load_model
from mmsae.params import FinetuneParams, ToyModelParams

REPO = Path(__file__).resolve().parents[1]
FAST = {"max_steps": 3, "batch_size": 4, "warmup_steps": 0, "logging_steps": 1, "lr": 1e-3}


@pytest.fixture(scope="module")
def data():
    return records_frame(tiny_records(8))


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    """The toy model of mmsae.models.toy with tiny params (untrained), saved like the toy_model stage."""
    from mmsae.models import toy

    torch.manual_seed(0)
    processor = toy.build_processor()
    tok = processor.tokenizer
    model = toy.build_model(ToyModelParams.load({"hidden_size": 16, "num_layers": 1, "vision_layers": 1}), len(tok),
                            processor.image_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    out = tmp_path_factory.mktemp("toy") / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _run(model_dir: Path, data, tmp_path: Path, **params) -> tuple[dict, Path]:
    out = tmp_path / "model"
    metrics = ft.finetune(model_dir, data, out, FinetuneParams.load({**FAST, **params}), tmp_path / ".staging")
    assert not (tmp_path / ".staging").exists()
    return metrics, out


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_tiny_llava_trains_and_reloads(tmp_path, data, method):
    src = tiny_llava(tmp_path)
    metrics, out = _run(src, data, tmp_path, method=method)
    assert metrics["global_step"] == 3 and metrics["method"] == method
    assert metrics["layout_check"] == {"checked": 8 if method == "sft" else 16, "identical": True, "mismatches": []}
    assert (out / "model.safetensors").exists() and not (out / "training_args.bin").exists()
    adapter = load_model(out)  # the pipeline's loader reads the result
    assert adapter.family == "llava" and adapter.tokenizer.bos_token == "<s>"
    before, after = _weights(src), _weights(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("language_model" in k for k in changed)
    if method == "dpo":
        assert "rewards/accuracies" in metrics["final"]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_toy_model_trains_and_reloads(tmp_path, data, toy_model_dir, method):
    metrics, out = _run(toy_model_dir, data, tmp_path, method=method)
    assert metrics["layout_check"]["identical"] and metrics["global_step"] == 3
    adapter = load_model(out)
    assert adapter.family == "llava"
    # the processor is saved as it was loaded (the toy tokenizer pads on the left)
    assert adapter.processor.tokenizer.chat_template == load_model(toy_model_dir).processor.tokenizer.chat_template


def test_same_seed_same_weights_and_lora_merges(tmp_path, data, toy_model_dir):
    _, a = _run(toy_model_dir, data, tmp_path / "a", seed=3)
    _, b = _run(toy_model_dir, data, tmp_path / "b", seed=3)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    metrics, lora = _run(toy_model_dir, data, tmp_path / "lora", lora=True, lora_r=2, lora_alpha=4)
    assert metrics["lora"] and metrics["trainable_parameters"] < sum(v.numel() for v in wa.values())
    merged, start = _weights(lora), _weights(toy_model_dir)
    assert merged.keys() == start.keys()  # plain weights: no lora_A / lora_B left
    assert any(not torch.equal(merged[k], start[k]) for k in start)
    assert load_model(lora).family == "llava"


def test_layout_is_identical_for_every_family(tmp_path, data):
    """TRL's collators and build_batch agree on ids and loss positions (Chameleon in text-completion mode)."""
    for build in (tiny_llava_next, tiny_chameleon, tiny_qwen2_vl):
        path = build(tmp_path)
        adapter = load_model(path)
        processor = ft.text_completion_processor(ft.load_processor(type(adapter), str(path)), type(adapter))
        for method in ("sft", "dpo"):
            result = ft.check_layout(adapter.model, processor, data.iloc[:3], method, 3, str(path))
            assert result["identical"], (build.__name__, method, result["mismatches"][:1])


def test_layout_mismatch_stops_the_run(tmp_path, data, monkeypatch):
    """Without the BOS the tokenizer adds by itself, TRL's sequences would lack it: the check says so."""
    src = tiny_llava(tmp_path)
    monkeypatch.setattr(ft_data, "special_prefix", lambda tokenizer, text: "")
    with pytest.raises(InputError, match="layout"):
        ft.finetune(src, data, tmp_path / "m", FinetuneParams.load({**FAST, "max_steps": 1}), tmp_path / ".staging")
    assert not (tmp_path / ".staging").exists() and not (tmp_path / "m").exists()
    metrics = ft.finetune(src, data, tmp_path / "m",
                          FinetuneParams.load({**FAST, "max_steps": 1, "layout_check": "warn"}),
                          tmp_path / ".staging")
    first = metrics["layout_check"]["mismatches"][0]
    assert not metrics["layout_check"]["identical"] and first["ours"][1:] == first["trl"]


def test_dpo_needs_a_rejected_response(tmp_path, data):
    bad = data.copy()
    bad.at[0, "responses"] = ["red"]
    bad.at[0, "preferred"] = 0
    with pytest.raises(InputError, match="rejected"):
        ft.finetune(tiny_llava(tmp_path), bad, tmp_path / "m", FinetuneParams.load({**FAST, "method": "dpo"}),
                    tmp_path / ".s")


def test_script_writes_the_artifact(tmp_path, data, toy_model_dir):
    parquet = tmp_path / "samples.parquet"
    data.to_parquet(parquet, index=False)
    kept = data["sample_id"].tolist()[::-2]  # a score subset: an id list, best first
    pd.DataFrame({"sample_id": kept, "rank": range(1, len(kept) + 1)}).to_parquet(tmp_path / "top050.parquet")
    out = tmp_path / "finetune-0123abcd"
    argv = ["--model", str(toy_model_dir), "--data", str(parquet), "--ids", str(tmp_path / "top050.parquet"),
            "--out", str(out), "--params", json.dumps({**FAST, "method": "dpo"})]
    assert cli.stage_main(ft, argv) == 0
    assert pd.read_parquet(out / "train_ids.parquet")["sample_id"].tolist() == kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["n_records"] == len(kept)
    assert manifest["params"]["method"] == "dpo" and manifest["counts"]["steps"] == 3
    assert manifest["counts"]["layout_identical"] is True
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3
    assert load_model(out / "model").family == "llava"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune-0123abcd", "samples.parquet", "top050.parquet"]  # no staging left


@pytest.mark.slow
def test_two_processes_train_and_only_the_main_one_writes(tmp_path, data):
    """The script under a multi-process launcher (torchrun, as `accelerate launch` runs it; gloo on CPU):
    the global batch is split over the ranks and only rank 0 writes the artifact."""
    import socket
    import subprocess

    src = tiny_llava(tmp_path)
    parquet = tmp_path / "subset.parquet"
    data.to_parquet(parquet, index=False)
    out = tmp_path / "finetune-0123abcd"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(REPO / "workflow" / "scripts" / "finetune.py"), "--model", str(src), "--data", str(parquet),
           "--out", str(out), "--params", json.dumps({**FAST, "method": "dpo"})]
    env = {**__import__("os").environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["processes"], metrics["per_device_batch_size"], metrics["global_step"]) == (2, 2, 3)
    assert load_model(out / "model").family == "llava"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune-0123abcd", "subset.parquet", "tiny_llava"]
