"""Hidden-state extraction: hooks = hidden_states, token counts, batching, the extract script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    records_frame,
    tiny_chameleon,
    tiny_llama,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_vl,
    tiny_records,
)
from safetensors.torch import load_file

from mmsae import cli
from mmsae.activations import ActivationStore, ActivationWriter, extract, stage
from mmsae.errors import InputError
from mmsae.models import load_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow" / "scripts" / "extract.py"
BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "chameleon": tiny_chameleon,
            "qwen2_vl": tiny_qwen2_vl, "llama": tiny_llama}
# (width, height): LLaVA-NeXT picks a different anyres grid for each and Qwen2-VL a different
# resized size, so token counts differ; Chameleon center-crops all to one VQ grid.
SIZES = [(32, 32), (16, 32), (40, 20)]
# image tokens per record of SIZES, as the processor expands them
EXPECTED_IMAGE_TOKENS = {"llava": [16, 16, 16], "llava_next": [24, 16, 14], "chameleon": [16, 16, 16],
                         "qwen2_vl": [16, 8, 10], "llama": [0, 0, 0]}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    path = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, path, load_model(path)


def native_inputs(adapter, records):
    """The model's own inputs straight from its processor (tokenizer for a text-only LLM), right-padded:
    for Chameleon these carry the placeholders + pixel_values, so the model's own VQ path runs."""
    _, texts = adapter.texts(records, include_response=True)
    if adapter.image_token_id is None:
        return adapter.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    return adapter.processor(text=texts, images=[r.image for r in records], padding=True, padding_side="right",
                             return_tensors="pt", **adapter.processor_kwargs())


def final_norm(adapter):
    inner = adapter.model.model
    return getattr(inner, "language_model", inner).norm


def _extract(adapter, records, folder, layers=(0, 1), batch_size=3, **kw):
    writer = ActivationWriter(folder, list(layers), adapter.d_model, chunk_tokens=16, shard_chunks=2)
    counts = extract(adapter, records, list(layers), batch_size, writer, progress=False, **kw)
    writer.close()
    return counts, ActivationStore(folder)


def test_captured_states_equal_hidden_states(family, tmp_path):
    """Hook after layer L == hidden_states[L+1] at the real tokens; for the LAST layer HF's final entry
    is after the final norm, so there the hook equals the norm's input (and norm(hook) == hidden_states[-1])."""
    name, _, adapter = family
    records = tiny_records(3, sizes=SIZES)
    _, store = _extract(adapter, records, tmp_path / "x")
    _, meta = adapter.build_batch(records, include_response=True)
    native = native_inputs(adapter, records)  # the model's own path (Chameleon: pixel_values -> VQ inside)
    assert torch.equal(native["attention_mask"].bool(), torch.from_numpy(meta.attention_mask))
    same = torch.from_numpy(meta.modality != "image")  # Chameleon: VQ codes where the processor put placeholders
    assert torch.equal(native["input_ids"][same], torch.from_numpy(meta.token_id)[same])
    norm_in = {}
    norm = final_norm(adapter)

    def keep_input(module, args, output):  # returns None: the output is left alone
        norm_in["x"] = args[0].detach()

    handle = norm.register_forward_hook(keep_input)
    with torch.inference_mode():
        hs = adapter.model(**native, output_hidden_states=True, use_cache=False).hidden_states
    handle.remove()
    mask = torch.from_numpy(meta.attention_mask)
    assert not mask.all(), "the batch should contain padding"
    n_layers = adapter.n_layers
    for layer in store.layers:
        got = store.read(layer)
        if layer < n_layers - 1:
            want = hs[layer + 1][mask].numpy()
        else:
            want = norm_in["x"][mask].numpy()
            np.testing.assert_allclose(norm(torch.from_numpy(got)).detach().numpy(), hs[-1][mask].numpy(), atol=1e-5)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f"{name} layer {layer}")


def test_image_token_counts(family, tmp_path):
    name, _, adapter = family
    records = tiny_records(3, sizes=SIZES)
    counts, store = _extract(adapter, records, tmp_path / "x")
    native = native_inputs(adapter, records)
    if adapter.image_token_id is None:  # text-only LLM: the image is ignored
        expanded = [0] * len(records)
    else:  # what the processor expanded
        expanded = (native["input_ids"] == adapter.image_token_id).sum(1).tolist()
    assert expanded == EXPECTED_IMAGE_TOKENS[name]
    tokens = store.tokens
    written = tokens[tokens.modality == "image"].groupby("sample_id", sort=False).size()
    assert written.reindex([r.sample_id for r in records], fill_value=0).tolist() == expanded
    assert counts["image_tokens_per_sample"] == expanded
    assert counts["n_image"] == sum(expanded)
    for _, g in tokens[tokens.modality == "image"].groupby("sample_id"):
        assert g["patch"].tolist() == list(range(len(g)))  # consecutive, placeholder positions contiguous
        assert g["position"].diff().iloc[1:].eq(1).all()
    assert (tokens.loc[tokens.modality != "image", "patch"] == -1).all()
    image_ids = tokens.loc[tokens.modality == "image", "token_id"].to_numpy()
    if name == "chameleon":  # the VQ codes of the real pixels, in the codebook's vocabulary range
        with torch.no_grad():
            codes = adapter.model.get_image_tokens(native["pixel_values"])
        np.testing.assert_array_equal(image_ids, codes.flatten().numpy())
        assert set(image_ids) <= set(adapter.model.model.vocabulary_mapping.image_tokens)
        assert len(set(image_ids)) > 1
    else:
        assert (image_ids == adapter.image_token_id).all()
    if name == "qwen2_vl":  # one token per merged 2x2 patch group
        assert expanded == (native["image_grid_thw"].prod(-1) // 4).tolist()
        assert adapter.image_grid() is None
    if name in ("chameleon", "qwen2_vl"):  # image sentinels (begin / end of image) are special
        for sid, g in tokens.groupby("sample_id", sort=False):
            g = g.reset_index(drop=True)
            first, last = g.index[g.modality == "image"][[0, -1]]
            assert g.loc[first - 1, "modality"] == g.loc[last + 1, "modality"] == "special", sid


def test_batched_equals_one_by_one(family, tmp_path):
    _, _, adapter = family
    records = tiny_records(3, sizes=SIZES)
    _, batched = _extract(adapter, records, tmp_path / "b", batch_size=3)
    _, single = _extract(adapter, records, tmp_path / "s", batch_size=1)
    pd.testing.assert_frame_equal(batched.tokens, single.tokens)
    for layer in batched.layers:
        np.testing.assert_allclose(batched.read(layer), single.read(layer), atol=1e-5, rtol=1e-4)


def test_prompt_only_and_max_length(family, tmp_path):
    _, _, adapter = family
    records = tiny_records(2, sizes=SIZES)
    counts, store = _extract(adapter, records, tmp_path / "p", include_response=False)
    assert counts["n_response"] == 0 and not store.tokens["is_response"].any()
    n_img = min(counts["image_tokens_per_sample"])
    if n_img:  # a text-only LLM has no image tokens to cut into
        with pytest.raises(InputError, match="extract.max_length"):
            _extract(adapter, records, tmp_path / "m", max_length=n_img, too_long="truncate")
    counts, store = _extract(adapter, records, tmp_path / "t", max_length=max(counts["image_tokens_per_sample"]) + 4,
                             too_long="truncate")
    assert store.tokens.groupby("sample_id").size().max() == max(counts["image_tokens_per_sample"]) + 4


def test_bad_layer_is_input_error(family, tmp_path):
    _, _, adapter = family
    with pytest.raises(InputError, match="extract.layers"):
        _extract(adapter, tiny_records(1), tmp_path / "x", layers=(0, 7))


def _samples_dir(tmp_path: Path, n: int = 4) -> Path:
    d = tmp_path / "sample-abc"
    d.mkdir()
    records_frame(tiny_records(n, sizes=SIZES)).to_parquet(d / "samples.parquet")
    return d


def test_extract_script_end_to_end(tmp_path):
    model = tiny_llava_next(tmp_path)
    samples = _samples_dir(tmp_path)
    out = tmp_path / "extract-x"
    params = json.dumps({"layers": [1], "batch_size": 3, "chunk_tokens": 8, "shard_chunks": 2, "dtype": "bfloat16"})
    rc = cli.stage_main(stage, ["--samples", str(samples), "--model", str(model), "--model-params", '{"dtype": "float32"}',
                                "--out", str(out), "--params", params])
    assert rc == 0
    store = ActivationStore(out)
    tokens = store.tokens
    assert store.n_tokens == len(tokens) == store.read(1).shape[0]
    assert tokens["row"].tolist() == list(range(len(tokens)))
    assert not (tokens["token_id"] == 0).any()  # <pad> id 0 never written
    assert set(tokens["modality"]) == {"image", "text", "special"}
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert manifest["stage"] == "extract" and manifest["params"]["model"]["dtype"] == "float32"
    assert c["n_samples"] == 4 and c["n_tokens"] == len(tokens) and c["layers"] == [1] and c["d_model"] == 32
    assert c["n_image"] + c["n_text"] + c["n_special"] == c["n_tokens"]
    assert c["image_tokens_per_sample"]["max"] == 24 and c["image_tokens_per_sample"]["min"] == 14
    assert store.dtype == "bfloat16" and np.isfinite(store.read(1)).all()


def test_extract_script_bad_layer_exit_2(tmp_path):
    model = tiny_llava(tmp_path)
    samples = _samples_dir(tmp_path, n=1)
    out = tmp_path / "extract-bad"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--samples", str(samples), "--model", str(model),
         "--out", str(out), "--params", '{"layers": [0, 5]}'],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "extract.layers" in errors[0] and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".extract-bad")]


# ---- shards, parts, resume ------------------------------------------------------------------------------
def test_shard_and_part_ranges_cut_at_batch_boundaries():
    from mmsae.activations import part_ranges, shard_records

    assert shard_records(11, 2, 3) == [(0, 4), (4, 8), (8, 11)]  # 6 batches: 2 per shard, the last one short
    assert shard_records(5, 2, 4) == [(0, 0), (0, 2), (2, 4), (4, 5)]  # more shards than batches: one empty
    assert shard_records(7, 3, 1) == [(0, 7)]
    assert part_ranges(4, 11, 2, 2) == [(4, 8), (8, 11)]
    assert part_ranges(3, 3, 2, 1) == []


SHARD_PARAMS = {"layers": [0, 1], "batch_size": 2, "chunk_tokens": 8, "shard_chunks": 2, "dtype": "bfloat16",
                "part_batches": 1}


@pytest.fixture(scope="module")
def shard_setup(tmp_path_factory):
    """A tiny LLaVA-NeXT (image-token counts vary per record) and 11 records: 6 batches of 2."""
    tmp = tmp_path_factory.mktemp("shards")
    model = tiny_llava_next(tmp)
    samples = tmp / "sample-abc"
    samples.mkdir()
    records_frame(tiny_records(11, sizes=SIZES)).to_parquet(samples / "samples.parquet")
    return model, samples


def _run_extract(model: Path, samples: Path, out: Path, *extra: str, **params) -> int:
    return cli.stage_main(stage, ["--samples", str(samples), "--model", str(model), "--out", str(out),
                                  "--params", json.dumps({**SHARD_PARAMS, **params}), *extra])


def _assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert a.layers == b.layers and a.dtype == b.dtype and a.n_tokens == b.n_tokens
    for layer in a.layers:  # the stored bits (bf16 as uint16), not just close values
        assert np.array_equal(a.read_raw(layer), b.read_raw(layer)), layer
    pd.testing.assert_frame_equal(a.tokens, b.tokens)


@pytest.fixture(scope="module")
def single_store(shard_setup, tmp_path_factory):
    model, samples = shard_setup
    out = tmp_path_factory.mktemp("single") / "extract-single"
    assert _run_extract(model, samples, out) == 0
    return out


def test_three_shards_equal_one_job(shard_setup, single_store, tmp_path):
    model, samples = shard_setup
    out = tmp_path / "extract-sharded"
    for k in range(3):  # what the extract_shard jobs run (in parallel on a cluster)
        assert _run_extract(model, samples, out, "--shard", str(k), shards=3) == 0
        shard = ActivationStore(out / "shards" / f"{k:04d}")
        assert shard.n_parts == 2 and shard.tokens["row"].tolist() == list(range(shard.n_tokens))
    assert _run_extract(model, samples, out, "--gather", shards=3) == 0
    sharded, single = ActivationStore(out), ActivationStore(single_store)
    assert sharded.n_parts == single.n_parts == 6
    _assert_same_store(sharded, single)
    assert sharded.tokens["row"].tolist() == list(range(sharded.n_tokens))
    assert sharded.tokens["sample_id"].unique().tolist() == [r.sample_id for r in tiny_records(11, sizes=SIZES)]
    m1, m3 = (json.loads((d / "manifest.json").read_text()) for d in (single_store, out))
    assert m3["stage"] == "extract" and m3["counts"]["n_shards"] == 3
    assert {k: v for k, v in m3["counts"].items() if k != "n_shards"} == m1["counts"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial / temporary folders
    # the same rows written one batch at a time into a single zarr store (ActivationWriter) read the same
    writer = ActivationWriter(tmp_path / "plain", [0, 1], 32, dtype="bfloat16", chunk_tokens=8, shard_chunks=2)
    extract(load_model(model), tiny_records(11, sizes=SIZES), [0, 1], 2, writer, progress=False)
    writer.close()
    _assert_same_store(ActivationStore(tmp_path / "plain"), sharded)


def test_store_over_parts_reads_like_one_store(single_store, tmp_path):
    parts = ActivationStore(single_store)
    plain = ActivationWriter(tmp_path / "plain", parts.layers, parts.d_model, dtype=parts.dtype, chunk_tokens=8)
    plain.append({layer: torch.from_numpy(parts.read(layer)) for layer in parts.layers},
                 parts.tokens.drop(columns="row"))
    plain.close()
    plain = ActivationStore(tmp_path / "plain")
    n = parts.n_tokens
    assert parts.chunk_tokens == plain.chunk_tokens == 8 and parts.array(1).shape == (n, 32)
    rng = np.random.default_rng(0)
    rows = rng.permutation(n)[:97]
    for layer in parts.layers:
        assert np.array_equal(parts.read_rows(layer, rows), plain.read_rows(layer, rows))
        for a, b in [(0, n), (3, 61), (50, 51), (n - 5, None)]:  # across part boundaries
            assert np.array_equal(parts.read(layer, a, b), plain.read(layer, a, b))
        assert np.array_equal(parts.array(layer)[10:40], plain.array(layer)[10:40])
        blocks = [(s, x) for s, x in parts.iter_blocks(layer, 13)]
        assert [s for s, _ in blocks] == list(range(0, n, 13))
        assert np.array_equal(np.concatenate([x for _, x in blocks]), plain.read(layer))
    with pytest.raises(IndexError):
        parts.read_rows(0, np.array([n]))
    with pytest.raises(InputError, match="layer 5 was not extracted"):
        parts.read(5)


class _Killed(BaseException):
    """Stands for the job being killed: not an Exception, so nothing on the way catches it."""


def test_killed_extraction_resumes_from_finished_parts(shard_setup, single_store, tmp_path, monkeypatch):
    import mmsae.activations.extraction as A

    model, samples = shard_setup
    out = tmp_path / "extract-killed"
    real, calls = A.extract, []

    def killed_in_third_part(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise _Killed
        return real(*args, **kw)

    monkeypatch.setattr(A, "extract", killed_in_third_part)
    with pytest.raises(_Killed):
        _run_extract(model, samples, out)
    rerun: list[int] = []
    monkeypatch.setattr(A, "extract", lambda *args, **kw: rerun.append(1) or real(*args, **kw))
    partial = tmp_path / ".extract-killed.partial" / "parts"
    assert not out.exists()
    assert sorted(p.name for p in partial.iterdir()) == ["00000", "00001"]
    (partial / ".00002.tmp-x").mkdir()  # what a SIGKILL leaves of the part being written
    kept = {name: (partial / name / "part.json").stat().st_ino for name in ("00000", "00001")}
    assert _run_extract(model, samples, out) == 0
    assert len(rerun) == 4  # the rerun extracted the 4 missing parts of 6 only
    assert not (tmp_path / ".extract-killed.partial").exists()
    for name, inode in kept.items():  # the finished parts were moved into the artifact, not extracted again
        assert (out / "parts" / name / "part.json").stat().st_ino == inode
    _assert_same_store(ActivationStore(out), ActivationStore(single_store))


def test_part_of_other_params_is_not_reused_and_images_decode_per_part(shard_setup, tmp_path, monkeypatch):
    import mmsae.data.lazy as lazy
    from mmsae.activations import partial_dir

    model, samples = shard_setup
    out = tmp_path / "extract-x"
    stale = partial_dir(out) / "parts" / "00000"
    stale.mkdir(parents=True)
    (stale / "part.json").write_text(json.dumps({"key": "other", "records": [0, 2], "sample_ids": []}))
    decoded, real = [], lazy.records_from_frame
    monkeypatch.setattr(lazy, "records_from_frame", lambda df, path: decoded.append(len(df)) or real(df, path))
    assert _run_extract(model, samples, out) == 0
    assert (out / "parts" / "00000" / "acts.zarr").exists()
    assert decoded == [2, 2, 2, 2, 2, 1]  # one part's images at a time (part_batches 1 x batch_size 2)


def test_gather_without_all_shards_is_input_error(shard_setup, tmp_path, capsys):
    model, samples = shard_setup
    out = tmp_path / "extract-g"
    assert _run_extract(model, samples, out, "--shard", "0", shards=2) == 0
    assert _run_extract(model, samples, out, "--gather", shards=2) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "shards/0001/manifest.json" in err
    assert not (out / "manifest.json").exists() and (out / "shards" / "0000" / "manifest.json").exists()
    assert _run_extract(model, samples, out, "--shard", "2", shards=2) == 2  # no shard 2 of 2


def test_sae_training_on_sharded_store_is_identical_and_resumes(shard_setup, single_store, tmp_path):
    """Training reads a store in parts exactly as one array: same weights as on a single-array store of
    the same rows, and a killed run resumes bit-identically (tests/test_sae.py pins the single case)."""
    from mmsae.params import TrainSaeParams
    from mmsae.sae.training import train_sae

    parts = ActivationStore(single_store)
    plain = ActivationWriter(tmp_path / "plain", parts.layers, parts.d_model, dtype=parts.dtype, chunk_tokens=8)
    plain.append({layer: torch.from_numpy(parts.read(layer)) for layer in parts.layers},
                 parts.tokens.drop(columns="row"))
    plain.close()
    p = TrainSaeParams.load({"layer": 1, "expansion": 2, "steps": 12, "batch_size": 16, "checkpoint_every": 4,
                             "buffer_chunks": 2, "eval_fraction": 0.2, "device": "cpu", "lr_warmup_steps": 2,
                             "lr_decay_steps": 4, "l1_warmup_steps": 2})
    full = train_sae(parts, p, tmp_path / "full", tmp_path / "ck_full", progress=False)
    ref = train_sae(ActivationStore(tmp_path / "plain"), p, tmp_path / "ref", tmp_path / "ck_ref", progress=False)
    assert train_sae(parts, p, tmp_path / "res", tmp_path / "ck_res", stop_after=8, progress=False) is None
    resumed = train_sae(parts, p, tmp_path / "res", tmp_path / "ck_res", progress=False)
    assert resumed["resumed_from_step"] == 8
    weights = [load_file(str(d / "sae" / "sae_weights.safetensors")) for d in (tmp_path / "full", tmp_path / "ref",
                                                                                tmp_path / "res")]
    for w in weights[1:]:
        assert all(torch.equal(weights[0][k], w[k]) for k in weights[0])
    assert resumed["curve"] == full["curve"] == ref["curve"]


class _RecordingArray:
    """A zarr array that records the row ranges read from it (and has no orthogonal selection)."""

    def __init__(self, arr, reads: list[tuple[int, int]]) -> None:
        self.arr, self.reads, self.chunks, self.shape = arr, reads, arr.chunks, arr.shape

    def __getitem__(self, key: slice) -> np.ndarray:
        self.reads.append((key.start, key.stop))
        return self.arr[key]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_rows_reads_one_chunk_at_a_time(tmp_path, dtype):
    n, d, chunk = 50, 3, 8
    states = torch.arange(n * d, dtype=torch.float32).reshape(n, d) / 7
    writer = ActivationWriter(tmp_path / "s", [2], d, dtype=dtype, chunk_tokens=chunk, shard_chunks=2)
    tokens = pd.DataFrame({"sample_id": "a", "position": np.arange(n, dtype=np.int32), "modality": "text",
                           "token_id": np.zeros(n, np.int32), "is_response": False, "patch": np.int32(-1)})
    writer.append({2: states}, tokens)
    writer.close()
    store = ActivationStore(tmp_path / "s")
    rows = np.array([49, 3, 17, 3, 0, 16, 48, 9, 10])  # unsorted, a duplicate, both ends, across chunks
    want = store.read(2)[rows]
    if dtype == "float32":
        assert np.array_equal(want, states.numpy()[rows])
    reads: list[tuple[int, int]] = []
    arr = store._groups[0]["layer_2"]
    store._groups = [{"layer_2": _RecordingArray(arr, reads)}]
    got = store.read_rows(2, rows)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    # the chunks holding the rows, each read once, whole (the last one is short)
    assert reads == [(0, 8), (8, 16), (16, 24), (48, 50)]
    assert store.read_rows(2, np.zeros(0, np.int64)).shape == (0, d)


def _long_samples(tmp_path: Path, n_words: int) -> Path:
    """The shard setup's records with sample 2's question made `n_words` words long."""
    records = tiny_records(6, sizes=SIZES)
    records[2].question = " ".join(["red"] * n_words)
    samples = tmp_path / "sample-long"
    samples.mkdir()
    records_frame(records).to_parquet(samples / "samples.parquet")
    return samples


def test_too_long_sample_stops_naming_it_or_is_skipped_and_listed(shard_setup, tmp_path, capsys):
    model, _ = shard_setup
    samples = _long_samples(tmp_path, 400)  # ~400 tokens; the others are far below max_length 200
    sid = pd.read_parquet(samples / "samples.parquet")["sample_id"][2]
    assert _run_extract(model, samples, tmp_path / "e1", max_length=200) == 2 and not (tmp_path / "e1").exists()
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"field 'extract.too_long': sample '{sid}':" in line and "tokens, more than 200" in line
    assert _run_extract(model, samples, tmp_path / "e2", max_length=200, too_long="skip") == 0
    store = ActivationStore(tmp_path / "e2")
    assert sid not in set(store.tokens["sample_id"]) and store.tokens["sample_id"].nunique() == 5
    counts = json.loads((tmp_path / "e2" / "manifest.json").read_text())["counts"]
    assert counts["n_too_long"] == 1 and counts["too_long"][0][0] == sid
    assert pd.read_parquet(tmp_path / "e2" / "bad_rows.parquet")["sample_id"].tolist() == [sid]
    assert _run_extract(model, samples, tmp_path / "e3", max_length=40, too_long="truncate") == 0
    tokens = ActivationStore(tmp_path / "e3").tokens
    assert tokens.groupby("sample_id").size().max() <= 40 and tokens["sample_id"].nunique() == 6


def test_the_token_limit_is_the_model_context_unless_max_length_is_lower():
    from mmsae.activations.extraction import token_limit

    class Model:
        def __init__(self, n):
            self.n = n

        def context_length(self):
            return self.n

    assert token_limit(Model(4096), None) == 4096 and token_limit(Model(4096), 512) == 512
    assert token_limit(Model(None), None) is None and token_limit(Model(128), 512) == 128


def test_batches_are_bounded_by_tokens(shard_setup, tmp_path):
    """batch_tokens=1 runs every sample alone: the same stored bits as batch_size 1."""
    model, samples = shard_setup
    assert _run_extract(model, samples, tmp_path / "bounded", batch_tokens=1) == 0
    assert _run_extract(model, samples, tmp_path / "single", batch_size=1, part_batches=64) == 0
    _assert_same_store(ActivationStore(tmp_path / "bounded"), ActivationStore(tmp_path / "single"))
