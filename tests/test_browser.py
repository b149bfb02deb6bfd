"""Feature browser: selection, densities, heat maps, contexts, escaping, the script, and the sorted
index in headless Chromium (file://, no server), all on hand-built artifacts with known answers."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import build_tiny_llava, tiny_tokenizer
from PIL import Image

from mmsae import cli
from mmsae.artifacts import write_manifest
from mmsae.errors import InputError
from mmsae.features import FEATURE_SCHEMA
from mmsae.interpret.browser import (
    build_site,
    feature_stats,
    model_view,
    patch_heat,
    read_tokens,
    scan_codes,
    select_features,
    token_strings,
    write_redirect,
)
from mmsae.interpret.browser import stage as browser_stage
from mmsae.models.grid import Grid
from mmsae.params import BrowserParams
from mmsae.sae.encode import CODES_SCHEMA

SCRIPT = "<script>document.title='pwned'</script>"
IDS = ["s0", "s1", 's<2>"', "s3"]
WORDS = [["red", "circle"], ["blue", "square"], [SCRIPT, "left"], ["green", "triangle"]]
GRID = Grid(rows=2, cols=2, first=0)
# Per sample 7 tokens: pos 0 <s> (special), pos 1-4 image (patches 0-3 of a 2x2 grid), pos 5-6 text.
# Sample i holds store rows 7i .. 7i+6: s0 rows 0-6, s1 7-13, s2 14-20, s3 21-27.
CODES = {  # feature -> [(row, activation)]
    0: [(4, 2.0), (1, 1.0), (9, 0.5), (5, 1.5), (19, 1.0)],  # cross-modal, weight 0.9
    1: [(8, 3.0), (12, 1.0), (13, 0.8), (6, 0.6), (20, 0.4), (26, 0.3), (0, 0.2)],  # cross-modal, weight 0.2
    2: [(19, 2.5), (12, 0.7), (5, 0.5)],  # text-only
    3: [(2, 1.0), (3, 1.0), (10, 1.0), (11, 1.0), (16, 1.0), (17, 1.0), (24, 0.5)],  # image-only
}  # feature 4: dead
WEIGHT = {0: 0.9, 1: 0.2}
CLASS = {0: "cross-modal", 1: "cross-modal", 2: "text-only", 3: "image-only", 4: "dead"}
PARAMS = BrowserParams.load({"n_features": 10, "per_class": 1, "n_images": 8, "n_contexts": 10, "context_tokens": 3,
                             "image_size": 32, "bins": 4, "title": "browser <test>"})


def make_tokens(tok) -> pd.DataFrame:
    rows = []
    for i, sid in enumerate(IDS):
        rows.append((sid, 0, "special", tok.convert_tokens_to_ids("<s>"), -1))
        rows += [(sid, 1 + p, "image", tok.convert_tokens_to_ids("<image>"), p) for p in range(4)]
        rows += [(sid, 5 + j, "text", tok.convert_tokens_to_ids(w), -1) for j, w in enumerate(WORDS[i])]
    df = pd.DataFrame(rows, columns=["sample_id", "position", "modality", "token_id", "patch"])
    df.insert(0, "row", np.arange(len(df), dtype=np.int64))
    return df.astype({"position": "int32", "token_id": "int32", "patch": "int32"})


def make_codes(tokens: pd.DataFrame) -> pd.DataFrame:
    entries = [(r, f, a) for f, v in CODES.items() for r, a in v]
    rows = np.array([e[0] for e in entries], np.int64)
    return pd.DataFrame({
        "row": rows, "sample_id": tokens["sample_id"].to_numpy()[rows].astype(str),
        "position": tokens["position"].to_numpy()[rows], "modality": tokens["modality"].to_numpy()[rows].astype(str),
        "feature": np.array([e[1] for e in entries], np.int32), "activation": np.array([e[2] for e in entries], np.float32),
    })


def make_features(tokens: pd.DataFrame) -> pd.DataFrame:
    """features.parquet by hand: counts per modality, top rows by activation, weight, class."""
    mod = tokens["modality"].to_numpy()
    out = []
    for f in range(5):
        v = sorted(CODES.get(f, []), key=lambda e: (-e[1], e[0]))
        text = [(r, a) for r, a in v if mod[r] == "text"]
        image = [(r, a) for r, a in v if mod[r] == "image"]
        out.append({"feature": f, "n_text": len(text), "n_image": len(image),
                    "n_special": sum(mod[r] == "special" for r, _ in v),
                    "top_text_rows": [r for r, _ in text], "top_text_acts": [a for _, a in text],
                    "top_image_rows": [r for r, _ in image], "top_image_acts": [a for _, a in image],
                    "weight": WEIGHT.get(f), "class": CLASS[f]})
    return pa.Table.from_pylist(out, schema=FEATURE_SCHEMA).to_pandas()


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_artifacts(root: Path) -> dict[str, Path]:
    tok = tiny_tokenizer(extra_special=(SCRIPT,))
    tokens = make_tokens(tok)
    dirs = {k: root / k for k in ("extract", "encode", "features", "samples")}
    for d in dirs.values():
        d.mkdir(parents=True)
    tokens.assign(is_response=False)[["row", "sample_id", "position", "modality", "token_id", "is_response", "patch"]] \
        .to_parquet(dirs["extract"] / "tokens.parquet")
    pq.write_table(pa.Table.from_pandas(make_codes(tokens), schema=CODES_SCHEMA, preserve_index=False),
                   dirs["encode"] / "codes.parquet", row_group_size=4)
    write_manifest(dirs["encode"], "encode", {}, counts={"layer": 0, "d_sae": 5})
    pq.write_table(pa.Table.from_pandas(make_features(tokens), schema=FEATURE_SCHEMA, preserve_index=False),
                   dirs["features"] / "features.parquet")
    pd.DataFrame({
        "sample_id": IDS, "question": ["q0", "q1", f"what is {SCRIPT} ?", "q3"],
        "image": [png((200, 0, 0)), png((0, 0, 200)), png((0, 200, 0)), png((9, 9, 9))],
    }).to_parquet(dirs["samples"] / "samples.parquet")
    dirs["tokenizer"] = tok
    return dirs


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("browser")
    a = write_artifacts(root)
    tokens = read_tokens(a["extract"] / "tokens.parquet")
    features = pd.read_parquet(a["features"] / "features.parquet")
    counts = build_site(root / "site", features, a["encode"] / "codes.parquet", tokens,
                        a["samples"] / "samples.parquet", a["tokenizer"], GRID, PARAMS, layer=0, d_sae=5,
                        title=PARAMS.title)
    return {"root": root, "out": root / "site", "counts": counts, "tokens": tokens, "features_df": features, **a}


def test_densities_and_selection(site):
    stats = feature_stats(site["features_df"], {"text": 8, "image": 16, "special": 4}).set_index("feature")
    assert stats.loc[0, "density"] == pytest.approx(5 / 28) and stats.loc[1, "density_text"] == pytest.approx(5 / 8)
    assert stats.loc[3, "density_image"] == pytest.approx(7 / 16) and stats.loc[2, "density_image"] == 0
    assert stats.loc[1, "max_act"] == 3.0 and np.isnan(stats.loc[4, "max_act"])
    stats = stats.reset_index()
    # densest of each class (text-only 2, image-only 3, cross-modal 1), then cross-modal by weight (0); never dead 4
    assert select_features(stats, 10, 1)["feature"].tolist() == [2, 3, 1, 0]
    assert select_features(stats, 2, 1)["feature"].tolist() == [2, 3]
    assert select_features(stats, 10, 0)["feature"].tolist() == [0, 1, 3, 2]  # weight, then density (tie: id)


def test_patch_heat_grid_offset():
    # first=1 (a CLS feature at index 0): index 0 and indices past the grid (tiles) are left out
    # cells are indices 1..4; activations above the top are clipped to 1
    heat = patch_heat(np.array([0, 1, 3, 4, 5, 9]), np.array([9.0, 1.0, 8.0, 2.0, 4.0, 9.0]), Grid(2, 2, 1), top=4.0)
    np.testing.assert_allclose(heat, [[0.25, 0.0], [1.0, 0.5]])


def test_token_strings_keep_spacing():
    tok = tiny_tokenizer()
    ids = tok("red circle", add_special_tokens=True)["input_ids"]
    assert token_strings(tok, ids) == ["<s>", " red", " circle"]


def test_scan_codes_histograms_and_pairs(site):
    tokens = site["tokens"]
    sample_of_row = pd.factorize(tokens["sample_id"])[0].astype(np.int64)
    hist, hi, found = scan_codes(site["encode"] / "codes.parquet", np.array([0, 1]), 5, sample_of_row,
                                 {(0, 0), (1, 3)}, bins=4, batch_rows=5)
    np.testing.assert_allclose(hi, [2.0, 3.0])
    # f0 over [0, 2]: text 1.5 -> bin 3, 1.0 -> bin 2; image 2.0 -> bin 3 (top), 1.0 -> 2, 0.5 -> 1
    assert hist[0].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert hist[1, 2].tolist() == [1, 0, 0, 0]  # f1 on the BOS (0.2 of 3.0): special
    assert found == {(0, 0): {4: 2.0, 1: 1.0, 5: 1.5}, (1, 3): {26: pytest.approx(0.3)}}


def test_site_files_heat_maps_and_escaping(site):
    out, counts = site["out"], site["counts"]
    assert counts["n_listed"] == 4 and counts["tokens"] == {"text": 8, "image": 16, "special": 4}
    assert sorted(p.name for p in (out / "features").iterdir()) == ["0.html", "1.html", "2.html", "3.html"]
    # f0's images: s0 (patch 3 = 2.0, patch 0 = 1.0) and s1 (patch 1 = 0.5), scaled by its top image act 2.0
    # (a veil: alpha 190 * (1 - heat), so the top patch is clear and silent patches dimmed)
    alpha = np.asarray(Image.open(out / "heat" / "0_0.png"))[..., 3]
    assert alpha.tolist() == [[95, 190], [190, 0]]
    assert np.asarray(Image.open(out / "heat" / "0_1.png"))[..., 3].tolist() == [[190, 142], [190, 190]]
    base = Image.open(out / "img" / "0.png")
    assert base.size == (32, 32) and base.getpixel((5, 5)) == (200, 0, 0)
    assert (out / "hist" / "0.png").stat().st_size > 0
    page = (out / "features" / "0.html").read_text()
    assert 'src="../img/0.png"' in page and 'src="../heat/0_0.png"' in page and "../hist/0.png" in page
    # contexts: s0 "red" is the top token (1.5 / 1.5 -> full colour), the image run collapsed to one chip
    assert 'class="t top" style="background:rgba(255,140,0,1.00)" title="1.5"> red</span>' in page
    assert "image \u00d74 max 2" in page
    # data-set text is escaped: the script token (context) and question, the odd sample id
    assert "<script>document" not in page and "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    page3 = (out / "features" / "3.html").read_text()
    assert "what is &lt;script&gt;" in page3 and "<script>" not in page3 and "s&lt;2&gt;&quot;" in page3
    for f in (out / "features").iterdir():  # f1 shows the script token unhighlighted, f2 highlighted
        assert "<script" not in f.read_text() and "&lt;script&gt;" in f.read_text(), f.name
    index = (out / "index.html").read_text()
    assert index.count("<script>") == 1 and "browser &lt;test&gt;" in index  # only the sort script
    assert re.findall(r'<tr data-feature="(\d+)"', index) == ["2", "3", "1", "0"]


def test_no_grid_means_no_heat_maps(site, tmp_path):
    counts = build_site(tmp_path, site["features_df"], site["encode"] / "codes.parquet", site["tokens"],
                        site["samples"] / "samples.parquet", site["tokenizer"], None, PARAMS, 0, 5)
    assert counts["n_heat_maps"] == 0 and counts["n_images"] == 4 and not any((tmp_path / "heat").iterdir())
    assert "without a heat map" in (tmp_path / "features" / "0.html").read_text()
    with pytest.raises(InputError, match="patch grid"):  # 4 image tokens per sample, a 3x3 grid needs 9
        build_site(tmp_path / "x", site["features_df"], site["encode"] / "codes.parquet", site["tokens"],
                   site["samples"] / "samples.parquet", site["tokenizer"], Grid(3, 3), PARAMS, 0, 5)


def test_model_view_from_config_and_processor(tmp_path):
    model, processor = build_tiny_llava()
    model.config.save_pretrained(tmp_path)  # no weights: the browser needs config + processor only
    processor.save_pretrained(tmp_path)
    tok, grid = model_view(tmp_path)
    assert grid == Grid(rows=4, cols=4, first=0)  # 32x32 image, patch 8
    assert token_strings(tok, tok("red circle")["input_ids"])[-1] == " circle"


def test_script_end_to_end_and_bad_input(site, tmp_path, capsys):
    model, processor = build_tiny_llava()
    for side, name in ((16, "model16"), (32, "model32")):  # 16x16 images, patch 8: the artifacts' 2x2 grid
        model.config.vision_config.image_size = side
        model.config.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    args = ["--features", str(site["features"]), "--encode", str(site["encode"]), "--extract", str(site["extract"]),
            "--samples", str(site["samples"])]
    assert cli.stage_main(browser_stage, [*args, "--model", str(tmp_path / "model16"), "--out", str(tmp_path / "ok"),
                        "--params", json.dumps({"n_features": 2, "per_class": 0})]) == 0
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["counts"]["grid"] == {"rows": 2, "cols": 2, "first": 0} and manifest["counts"]["n_listed"] == 2
    assert sorted(p.name for p in (tmp_path / "ok" / "features").iterdir()) == ["0.html", "1.html"]
    assert (tmp_path / "ok" / "heat" / "0_0.png").exists() and manifest["params"]["n_images"] == 8
    # a 4x4 grid but these samples have 4 image tokens: one-line error, exit 2, no folder
    assert cli.stage_main(browser_stage, [*args, "--model", str(tmp_path / "model32"), "--out", str(tmp_path / "b1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: tokens.parquet: field 'patch':") and not (tmp_path / "b1").exists()
    bad = [*args, "--model", str(tmp_path / "model16"), "--out", str(tmp_path / "b2"),
           "--params", json.dumps({"n_features": 0})]
    assert cli.stage_main(browser_stage, bad) == 2 and "field 'browser.n_features'" in capsys.readouterr().err


def test_redirect_page(tmp_path):
    write_redirect(tmp_path / "browser.html", 'browser-1a2b3c4d/index.html?"<x>')
    page = (tmp_path / "browser.html").read_text()
    assert '<meta http-equiv="refresh" content="0; url=browser-1a2b3c4d/index.html?&quot;&lt;x&gt;">' in page


# -- headless Chromium: the index renders from file://, sorts by the URL hash, scripts stay text ----
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:  # never skipped: `make test` installs it (apt-get, as root)
        pytest.fail("chromium is not on PATH: run `make test` (installs it) or `apt-get install -y chromium`")
    return exe


def dump_dom(urls: list[str], profile: Path) -> list[str]:
    """--dump-dom of each URL after its scripts ran; run side by side (one profile folder each)."""
    procs = [subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={profile}/{i}", "--virtual-time-budget=3000", "--dump-dom", url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, url in enumerate(urls)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr[-2000:]
        out.append(stdout)
    return out


def row_order(dom: str) -> list[int]:
    assert "<tbody>" in dom
    return [int(x) for x in re.findall(r'<tr data-feature="(\d+)"', dom)]


def test_chromium_sorts_by_hash_and_keeps_scripts_as_text(site, tmp_path):
    out = site["out"]
    index = (out / "index.html").as_uri()
    sorts = {"sort=weight&dir=asc": [1, 0, 2, 3],  # missing weights (2, 3) last, also ascending
             "sort=density&dir=desc": [1, 3, 0, 2],  # 7/28 tie between 1 and 3: by feature id
             "sort=class&dir=asc": [0, 1, 3, 2]}  # (the listing order without a hash is [2, 3, 1, 0])
    doms = dump_dom([f"{index}#{h}" for h in sorts] + [(out / "features" / "0.html").as_uri()], tmp_path)
    for (h, want), dom in zip(sorts.items(), doms, strict=False):
        assert row_order(dom) == want, h
        key, d = h.split("&")[0][5:], h.split("dir=")[1]
        assert f'<body data-sort="{key}:{d}">' in dom
    page = doms[-1]
    assert "<title>Feature 0</title>" in page and "pwned</title>" not in page
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in page  # shown as text
    assert 'src="../heat/0_0.png"' in page
