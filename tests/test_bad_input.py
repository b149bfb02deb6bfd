"""The bad-input matrix: every reader, every field, the wrong-type, missing, empty, oversized, escaping-path
and duplicate cases, on a corpus built here. Each case must end in a one-line error naming the file, the
field and (where the row is known) the sample, or, under on_bad_row: skip, in a listed bad row while the
good rows are kept. Nothing outside the image root is ever opened."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmsae import cli
from mmsae.data import sample
from mmsae.data.readers import read_dataset
from mmsae.errors import InputError
from mmsae.params import DataParams

LIMITS = DataParams.load({"max_image_bytes": 4000, "max_text_chars": 50})
BAD = 1  # the row each case breaks (rows 0 and 2 stay good)


def png(side: int = 8, noise: bool = False) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8) if noise else None
    im = Image.fromarray(arr) if noise else Image.new("RGB", (side, side), (200, 10, 10))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


BIG_PNG = png(64, noise=True)  # > LIMITS.max_image_bytes
assert len(BIG_PNG) > LIMITS.max_image_bytes


# --- the corpus: three good rows per reader, in its native layout ------------------------------------------
def native_rows(fmt: str) -> list[dict]:
    rows = []
    for i in range(3):
        sid, q, a, b = f"s{i}", f"question {i}", f"answer {i}", f"other {i}"
        rows.append({
            "mmsae": {"sample_id": sid, "question": q, "image": png(), "responses": [a, b], "preferred": 0},
            "align_anything": {"question_id": sid, "question": q, "image": {"bytes": png(), "path": None},
                               "response_1": a, "response_2": b, "overall_response": 1},
            "rlaif_v": {"idx": sid, "question": q, "image": {"bytes": png(), "path": None}, "chosen": a, "rejected": b},
            "llava_json": {"id": sid, "image": f"img{i}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]},
            "obelics": {"id": sid, "texts": [q, None], "images": [None, {"bytes": png(), "path": None}]},
        }[fmt])
    return rows


def write(fmt: str, rows: list[dict], folder: Path) -> Path:
    root = folder / "root"
    root.mkdir(exist_ok=True)
    for i in range(3):
        (root / f"img{i}.png").write_bytes(png())
    if fmt == "llava_json":
        path = folder / "data.json"
        path.write_text(json.dumps(rows))
    else:
        path = folder / "data.parquet"
        pd.DataFrame(rows).to_parquet(path)
    return path


# --- the mutations: (name, reader, how to break row BAD, the field the error must name) ---------------------
def _set(key, value):
    return lambda row: row.__setitem__(key, value)


def _image_path(fmt: str, value: str):
    if fmt == "llava_json":
        return _set("image", value)
    if fmt == "obelics":
        return _set("images", [None, {"bytes": None, "path": value}])
    return _set("image", {"bytes": None, "path": value})


def _llava_turn(i: int, value):
    def f(row):
        row["conversations"][i]["value"] = value
    return f


TEXT_FIELDS = {  # per reader: (native field, schema field) of the texts a row carries
    "mmsae": [("question", "question")],
    "align_anything": [("question", "question"), ("response_1", "responses"), ("response_2", "responses")],
    "rlaif_v": [("question", "question"), ("chosen", "responses"), ("rejected", "responses")],
    "obelics": [],
}
ID_FIELD = {"mmsae": "sample_id", "align_anything": "question_id", "rlaif_v": "idx", "llava_json": "id",
            "obelics": "id"}
PATH_READERS = ("align_anything", "rlaif_v", "llava_json", "obelics")


def cases() -> list[tuple[str, str, object, str]]:
    out = []
    for fmt in ("mmsae", "align_anything", "rlaif_v", "llava_json", "obelics"):
        for native, field in TEXT_FIELDS.get(fmt, []):
            out += [(f"{native} null", fmt, _set(native, None), field),
                    (f"{native} empty", fmt, _set(native, "  "), field),
                    (f"{native} oversized", fmt, _set(native, "x" * 51), field)]
        out.append(("duplicate id", fmt, _set(ID_FIELD[fmt], "s0"), "sample_id"))
        out.append(("null id", fmt, _set(ID_FIELD[fmt], None), "sample_id"))
        out.append(("undecodable image", fmt, (_set("image", b"not an image") if fmt == "mmsae" else
                                               _set("image", {"bytes": b"not an image", "path": None})
                                               if fmt in ("align_anything", "rlaif_v") else
                                               _set("images", [None, {"bytes": b"not an image", "path": None}])
                                               if fmt == "obelics" else _set("image", "bad.png")), "image"))
        out.append(("oversized image", fmt, (_set("image", BIG_PNG) if fmt == "mmsae" else
                                             _set("image", {"bytes": BIG_PNG, "path": None})
                                             if fmt in ("align_anything", "rlaif_v") else
                                             _set("images", [None, {"bytes": BIG_PNG, "path": None}])
                                             if fmt == "obelics" else _set("image", "big.png")), "image"))
        out.append(("missing image", fmt, _set("images", [None, None]) if fmt == "obelics" else _set("image", None),
                    "image"))
        if fmt in PATH_READERS:
            for name, value in (("../ path", "../outside.png"), ("absolute path", "{outside}"),
                                ("device file", "/dev/zero"), ("symlink out", "link.png"),
                                ("no such file", "nope.png"), ("folder", "sub"), ("passwd", "/etc/passwd"),
                                ("fifo", "fifo")):
                out.append((f"image {name}", fmt, _image_path(fmt, value), "image"))
    out += [
        ("preferred out of range", "mmsae", _set("preferred", 5), "preferred"),
        ("response null", "mmsae", _set("responses", ["a", None]), "responses"),
        ("overall_response 3", "align_anything", _set("overall_response", 3), "overall_response"),
        ("overall_response null", "align_anything", _set("overall_response", None), "overall_response"),
        ("conversations a string", "llava_json", _set("conversations", "hello"), "conversations"),
        ("turn a string", "llava_json", _set("conversations", ["hi", {"from": "gpt", "value": "a"}]),
         "conversations"),
        ("turn value an int", "llava_json", _llava_turn(0, 5), "conversations"),
        ("gpt value null", "llava_json", _llava_turn(1, None), "conversations"),
        ("question oversized", "llava_json", _llava_turn(0, "y" * 60), "question"),
        ("answer empty", "llava_json", _llava_turn(1, ""), "responses"),
        ("id a list", "llava_json", _set("id", [1, 2]), "sample_id"),
        ("id a float", "llava_json", _set("id", 1.5), "sample_id"),
        ("no conversations", "llava_json", lambda row: row.pop("conversations"), "conversations"),
        ("texts only nulls", "obelics", _set("texts", [None, None]), "question"),
    ]
    return out


CASES = cases()


def _setup(tmp_path: Path, fmt: str, mutate) -> tuple[Path, Path]:
    outside = tmp_path / "outside.png"
    outside.write_bytes(png())
    rows = native_rows(fmt)
    mutate(rows[BAD])
    rows[BAD] = _replace(rows[BAD], str(outside))  # the absolute-path case needs the real path
    path = write(fmt, rows, tmp_path)
    root = tmp_path / "root"
    (root / "sub").mkdir()
    (root / "big.png").write_bytes(BIG_PNG)
    (root / "bad.png").write_bytes(b"not an image")
    os.symlink(outside, root / "link.png")
    os.mkfifo(root / "fifo")  # opening it would block: it must be refused by type, unopened
    return path, root


def _replace(value, outside: str):
    if value == "{outside}":
        return outside
    if isinstance(value, dict):
        return {k: _replace(v, outside) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, outside) for v in value]
    return value


@pytest.mark.parametrize("name,fmt,mutate,field", CASES, ids=[f"{c[1]}:{c[0]}" for c in CASES])
def test_bad_row_is_a_one_line_error_or_a_listed_skip(tmp_path, name, fmt, mutate, field, monkeypatch, capsys):
    path, root = _setup(tmp_path, fmt, mutate)
    opened = []
    real_open = Path.open

    def watch(self, *a, **k):
        opened.append(Path(self).resolve())
        return real_open(self, *a, **k)

    monkeypatch.setattr(Path, "open", watch)
    with pytest.raises(InputError) as err:
        read_dataset(path, fmt, image_root=root, limits=LIMITS)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path}: field '{field}'"), line
    assert "sample '" in line or "every row" in line, line
    df, bad = read_dataset(path, fmt, image_root=root, on_bad_row="skip", limits=LIMITS)
    assert field in set(bad["field"]), bad
    listed = set(bad["sample_id"])
    assert "s0" not in set(df["sample_id"]) if name == "duplicate id" else "s0" in set(df["sample_id"])
    assert "s2" in set(df["sample_id"]) and not listed & set(df["sample_id"])
    real_root = root.resolve()
    data = path.resolve()
    assert all(p.is_relative_to(real_root) or p == data for p in opened), opened  # nothing outside the root
    monkeypatch.setattr(Path, "open", real_open)

    # the sample stage: exit 2 with one line and no folder; under skip, the row is listed in bad_rows.parquet
    def stage(out: Path, on_bad_row: str) -> int:
        cfg = {**LIMITS.as_dict(), "format": fmt, "image_root": str(root), "on_bad_row": on_bad_row}
        return cli.stage_main(sample, ["--data", str(path), "--data-params", json.dumps(cfg), "--out", str(out)])

    capsys.readouterr()
    assert stage(tmp_path / "sample-err", "error") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: {line}" and not (tmp_path / "sample-err").exists()
    assert stage(tmp_path / "sample-skip", "skip") == 0
    listed = pd.read_parquet(tmp_path / "sample-skip" / "bad_rows.parquet")
    assert field in set(listed["field"]) and (tmp_path / "sample-skip" / "manifest.json").exists()


def test_the_matrix_covers_every_reader_and_kind():
    kinds = {c[0].split(" ")[-1] for c in CASES}
    assert {"null", "empty", "oversized", "id", "path", "file"} <= kinds
    assert {c[1] for c in CASES} == {"mmsae", "align_anything", "rlaif_v", "llava_json", "obelics"}
    assert len(CASES) >= 80


def test_wrong_type_column_says_what_it_expected(tmp_path):
    rows = native_rows("rlaif_v")
    for r in rows:
        r["question"] = 7
    path = write("rlaif_v", rows, tmp_path)
    with pytest.raises(InputError, match="field 'question': sample 's0': expected a string, got int"):
        read_dataset(path, "rlaif_v")
    with pytest.raises(InputError, match="every row is unreadable"):
        read_dataset(path, "rlaif_v", on_bad_row="skip")


def test_image_root_defaults_to_the_data_folder(tmp_path):
    rows = native_rows("llava_json")
    path = write("llava_json", rows, tmp_path)  # images live in tmp/root, the data in tmp
    df, _ = read_dataset(path, "llava_json", image_root=tmp_path / "root")
    assert len(df) == 3
    rows[0]["image"] = "root/img0.png"  # relative to the data file's folder when no root is given
    path = write("llava_json", rows, tmp_path)
    with pytest.raises(InputError, match="sample 's1'"):  # s1's img1.png is not in tmp itself
        read_dataset(path, "llava_json")


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    """A model folder with only pytorch_model.bin would be unpickled (code from the file runs): refused with
    one line naming the switch; allowed explicitly, it loads."""
    from helpers import build_tiny_llava

    from mmsae.models import load_model

    model, processor = build_tiny_llava()
    folder = tmp_path / "pickled"
    import torch

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):  # the same weights as a pickle file only
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    with pytest.raises(InputError) as err:
        load_model(folder)
    assert err.value.field == "model.allow_pickle_weights" and "\n" not in str(err.value)
    adapter = load_model(folder, allow_pickle_weights=True)
    assert adapter.d_model == model.config.text_config.hidden_size


def test_layers_and_k_the_model_cannot_serve_are_named_before_any_job(tmp_path):
    from mmsae.config import validate
    from mmsae.models.shape import planned_shape, shape_problems

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 32, "hidden_size": 4096}}))
    config = validate({"model": {"path": str(folder)}, "extract": {"layers": [16, 32]},
                       "train_sae": {"layer": 40, "architecture": "topk", "k": 40000, "expansion": 8}})
    shape, where = planned_shape(config)
    assert shape == (32, 4096)
    assert shape_problems(config, shape, where) == [
        f"config: extract.layers = [16, 32]: model {str(folder)!r} has 32 decoder layers (0..31)",
        f"config: train_sae.layer = 40: model {str(folder)!r} has 32 decoder layers (0..31)",
        f"config: train_sae.k = 40000: exceeds d_sae = 32768 (expansion 8 x d_model 4096 of model {str(folder)!r})"]
    assert planned_shape(validate({"model": {"path": "llava-hf/llava-v1.6-mistral-7b-hf"}})) is None  # hub id
    ok = validate({"model": {"path": str(folder)}, "extract": {"layers": [16]}, "train_sae": {"layer": 16}})
    assert shape_problems(ok, shape, where) == []


def test_stale_folders_are_refused_and_old_temporaries_removed(tmp_path):
    """A stage folder without manifest.json (a killed job, or --forcerun, which deletes only the manifest)
    is never read; atomic_dir clears the hidden temporaries killed attempts left next to its target."""
    from mmsae.activations import ActivationStore, ActivationWriter
    from mmsae.artifacts import atomic_dir, write_manifest

    folder = tmp_path / "extract-0123abcd"
    writer = ActivationWriter(folder, [0], 4, chunk_tokens=4, shard_chunks=2)
    import torch

    tokens = pd.DataFrame({"row": [0, 1], "sample_id": ["a", "a"], "position": [0, 1], "modality": ["text", "text"],
                           "token_id": [1, 2], "is_response": [False, False], "patch": [-1, -1]})
    writer.append({0: torch.zeros(2, 4)}, tokens.astype({"position": "int32", "token_id": "int32", "patch": "int32"}))
    writer.close()
    with pytest.raises(InputError, match="extract-0123abcd/manifest.json: field 'manifest': missing"):
        ActivationStore(folder)
    write_manifest(folder, "extract", {})
    assert ActivationStore(folder).n_tokens == 2

    target = tmp_path / "encode-89abcdef"
    (tmp_path / ".encode-89abcdef.tmp-killed").mkdir()
    (tmp_path / ".encode-89abcdef.tmp-killed" / "codes.parquet").write_bytes(b"half")
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".encode")) == []
    assert (target / "x").read_text() == "done"
