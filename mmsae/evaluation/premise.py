"""Stage premise (toy world): does the method's premise hold, i.e. is there, per toy-world concept word
(colours, shapes), one SAE feature that fires on the word's text tokens AND on the image patches that
show it?

For every colour and shape word: text AUROC (the feature's activation on text tokens vs "the token is
the word") and image AUROC (activation on image patches vs "the patch shows the concept", from the
samples' ground-truth `objects`); reports the feature maximising min(text, image) and the best
text-only / image-only AUROCs. Word token ids come from the model's tokenizer. Writes premise.json.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.data.sample import sample_frame
from mmsae.data.schema import IMAGE_COLUMNS
from mmsae.data.toyvocab import COLOURS, SHAPES
from mmsae.data.toyworld import patch_concepts
from mmsae.errors import InputError
from mmsae.evaluation.auroc import _auroc_from_ranks, average_ranks
from mmsae.features import Codes, encode_info, iter_codes, require_columns
from mmsae.models import load_tokenizer
from mmsae.models.grid import token_grid
from mmsae.params import PremiseParams
from mmsae.report import json_safe
from mmsae.scoring import read_samples


def concept_words() -> dict[str, str]:
    """Toy-world concept word -> 'colour' | 'shape'."""
    return {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}}


def word_token_ids(tokenizer, words: Sequence[str]) -> dict[str, int]:
    """word -> its single token id under `tokenizer` (a word that is not one token is left out)."""
    out = {}
    for w in words:
        for text in (w, " " + w):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None):
                out[w] = int(ids[0])
                break
    return out


def patch_grid(tokens: pd.DataFrame) -> int:
    """Side of the square patch grid: image tokens per image (max patch index + 1) must be a square."""
    return token_grid(tokens).rows


def premise_check(codes: Codes, tokens: pd.DataFrame, samples: pd.DataFrame, grid: int,
                  word_ids: Mapping[str, int], d_sae: int, max_samples: int | None = 500,
                  seed: int = 0) -> pd.DataFrame:
    """Per concept word: the feature maximising min(text AUROC, image AUROC), both AUROCs, and the
    best text-only / image-only AUROCs over all features.

    Text side: the `text` tokens of the samples; label = token is the word (token_id ==
    word_ids[word]); score = the feature's activation (0 where not in codes). Image side: image
    tokens (patch index -> grid cell, row-major); label = the word is among patch_concepts of the
    sample's `objects`. Only clean samples (corruption null, when that column exists) with objects
    are used: a noise-image sample's objects do not describe its pixels. At most `max_samples` of
    them (seeded, deterministic), as dense token x feature matrices.
    """
    require_columns(Files.SAMPLES, list(samples.columns), ("sample_id", "objects"))
    require_columns(Files.TOKENS, list(tokens.columns), ("row", "sample_id", "modality", "token_id", "patch"))
    pool = samples[samples["objects"].notna()]
    if "corruption" in pool.columns:
        pool = pool[pool["corruption"].isna()]
    pool = sample_frame(pool, max_samples, seed)
    if len(pool) == 0:
        raise InputError(Files.SAMPLES, "objects", "no clean sample with ground-truth objects")
    objects = dict(zip(pool["sample_id"].astype(str), pool["objects"], strict=True))
    tok = tokens[tokens["sample_id"].astype(str).isin(objects)]
    text = tok[tok["modality"] == "text"]
    image = tok[(tok["modality"] == "image") & (tok["patch"] >= 0)]
    if len(image) and image["patch"].max() >= grid * grid:
        raise InputError(Files.TOKENS, "patch", f"patch index beyond a {grid}x{grid} grid")

    n_rows = int(tokens["row"].max()) + 1 if len(tokens) else 0
    where = np.full(n_rows, -1, np.int64)  # store row -> index into [text tokens, image tokens]
    where[text["row"].to_numpy()] = np.arange(len(text))
    where[image["row"].to_numpy()] = len(text) + np.arange(len(image))
    dense = np.zeros((len(text) + len(image), d_sae), np.float32)
    for b in iter_codes(codes, ("row", "feature", "activation")):
        r = b["row"].astype(np.int64)
        pos = np.full(len(r), -1, np.int64)
        ok = (r >= 0) & (r < n_rows)
        pos[ok] = where[r[ok]]
        m = pos >= 0
        dense[pos[m], b["feature"][m].astype(np.int64)] = b["activation"][m]

    words = concept_words()
    concepts = {sid: patch_concepts(obj, grid) for sid, obj in objects.items()}
    img_concepts = [concepts[s][p] for s, p in zip(image["sample_id"].astype(str), image["patch"], strict=True)]
    text_ids = text["token_id"].to_numpy()
    y_text = np.stack([text_ids == word_ids.get(w, -1) for w in words], 1)
    y_image = np.array([[w in c for w in words] for c in img_concepts], bool).reshape(len(image), len(words))
    a_text = _auroc_from_ranks(average_ranks(dense[: len(text)]), y_text)  # [words, d_sae]
    a_image = _auroc_from_ranks(average_ranks(dense[len(text) :]), y_image)

    rows = []
    for i, (w, kind) in enumerate(words.items()):
        at, ai = a_text[i], a_image[i]
        row = {"word": w, "kind": kind, "n_text_pos": int(y_text[:, i].sum()), "n_image_pos": int(y_image[:, i].sum()),
               "feature": None, "text_auroc": np.nan, "image_auroc": np.nan, "min_auroc": np.nan,
               "best_text_feature": None, "best_text_auroc": np.nan,
               "best_image_feature": None, "best_image_auroc": np.nan}
        if np.isfinite(at).all() and d_sae:
            row["best_text_feature"], row["best_text_auroc"] = int(np.argmax(at)), float(at.max())
        if np.isfinite(ai).all() and d_sae:
            row["best_image_feature"], row["best_image_auroc"] = int(np.argmax(ai)), float(ai.max())
        if np.isfinite(at).all() and np.isfinite(ai).all() and d_sae:
            both = np.minimum(at, ai)
            f = int(np.argmax(both))
            row.update(feature=f, text_auroc=float(at[f]), image_auroc=float(ai[f]), min_auroc=float(both[f]))
        rows.append(row)
    out = pd.DataFrame(rows)
    for col in ("feature", "best_text_feature", "best_image_feature"):
        out[col] = out[col].astype("Int64")
    out.attrs.update(n_samples=len(pool), n_text_tokens=len(text), n_image_tokens=len(image), grid=grid)
    return out


# --------------------------------------------------------------------------------------------------
# the stage

STAGE = "premise"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    samples: Path = cli.arg("sample artifact folder (samples.parquet with objects)")
    extract: Path = cli.arg("extract artifact folder (tokens.parquet)")
    encode: Path = cli.arg("encode artifact folder (codes.parquet)")
    model: str = cli.arg("model folder (its tokenizer maps words to token ids)")


def run(inputs: Inputs, params: PremiseParams, out: Path) -> None:
    timer = Timer()
    layer, d_sae = encode_info(inputs.encode)
    table = read_samples(inputs.samples)
    samples = table.drop_columns([c for c in IMAGE_COLUMNS if c in table.column_names]).to_pandas()
    tokens = ActivationStore(inputs.extract).tokens
    word_ids = word_token_ids(load_tokenizer(inputs.model), list(concept_words()))
    grid = patch_grid(tokens)
    with timer("premise"):
        table = premise_check(Path(inputs.encode) / Files.CODES, tokens, samples, grid, word_ids, d_sae,
                              params.max_samples, params.seed)
    result = {"layer": layer, "d_sae": d_sae, "word_ids": word_ids, **table.attrs,
              "concepts": table.astype(object).where(pd.notna(table), None).to_dict("records")}
    with atomic_dir(out) as tmp:
        write_json(tmp / Files.PREMISE, json_safe(result))
        best = table["min_auroc"].max() if table["min_auroc"].notna().any() else None
        write_manifest(tmp, STAGE, params.as_dict(),
                       {"samples": inputs.samples, "extract": inputs.extract, "encode": inputs.encode,
                        "model": inputs.model},
                       {"layer": layer, "n_samples": table.attrs["n_samples"], "best_min_auroc": best},
                       timer.timings)
