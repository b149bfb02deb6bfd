"""The browser site: every page and image of one SAE's browser written into a folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mmsae.artifacts import Files
from mmsae.errors import InputError
from mmsae.features import CLASSES
from mmsae.interpret.browser.data import (
    feature_stats,
    modality_totals,
    scan_codes,
    select_features,
    text_context,
    text_previews,
    top_samples,
)
from mmsae.interpret.browser.images import Histograms, check_grid, heat_png, patch_heat, write_images
from mmsae.interpret.browser.pages import context_block, feature_html, image_card, index_html, nav_links
from mmsae.models.grid import Grid
from mmsae.params import BrowserParams

log = logging.getLogger("mmsae.browser")


TopSamples = dict[int, list[tuple[int, int, float]]]  # feature -> [(sample, row, activation)]


def build_site(out: str | os.PathLike, features: pd.DataFrame, codes: str | os.PathLike | pd.DataFrame,
               tokens: pd.DataFrame, samples: str | os.PathLike, tokenizer: Any, grid: Grid | None,
               params: BrowserParams, layer: int, d_sae: int, title: str = "mmsae feature browser") -> dict[str, Any]:
    """Write the site into `out` (an existing folder); returns counts for the manifest.

    `tokens` is read_tokens' frame, `samples` the samples.parquet path, `params` the browser slice.
    """
    out = Path(out)
    for sub in ("features", "img", "heat", "hist"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    totals = modality_totals(tokens)
    stats = feature_stats(features, totals)
    listed = select_features(stats, params.n_features, params.per_class)
    if len(stats) and int(stats["feature"].max()) >= d_sae:
        raise InputError(Files.FEATURES, "feature", f"feature id outside [0, {d_sae})")
    sample_of_row, sample_ids = pd.factorize(tokens["sample_id"], sort=False)
    sample_of_row = sample_of_row.astype(np.int64)
    image_of_row = tokens["image_index"].to_numpy(np.int64)
    if grid is not None:
        check_grid(tokens, sample_of_row, grid)

    top_img, top_txt = _top_rows(listed, sample_of_row, params.n_images, params.n_contexts)
    pairs = {(f, s) for f, v in (*top_img.items(), *top_txt.items()) for s, _, _ in v}
    feats = listed["feature"].to_numpy(np.int64)
    hist, hi, found = scan_codes(codes, feats, d_sae, sample_of_row, pairs, params.bins)

    # the shown images, once each: (sample, image) of each top image token
    shown = sorted({(s, int(image_of_row[row])) for v in top_img.values() for s, row, _ in v})
    questions = write_images(samples, [str(sample_ids[s]) for s, _ in shown], shown, out / "img", params.image_size)
    pages = _FeaturePages(out, tokenizer, tokens, sample_of_row, sample_ids, grid, params, found, questions)

    previews = text_previews(tokenizer, listed, tokens)
    hists = Histograms()
    feature_list = feats.tolist()
    try:
        for i, r in enumerate(tqdm(listed.to_dict("records"), desc="feature pages", mininterval=5)):
            f = int(r["feature"])
            cards = pages.image_cards(f, top_img[f])
            contexts = pages.text_contexts(f, top_txt[f])
            has_hist = bool(hist[i].sum())
            if has_hist:
                hists.save(hist[i], hi[i], out / "hist" / f"{f}.png")
            (out / "features" / f"{f}.html").write_text(
                feature_html(r, cards, contexts, has_hist, nav_links(feature_list, i), params.image_size, grid))
    finally:
        hists.close()

    info = {"title": title, "layer": layer, "d_sae": d_sae, "totals": totals, "per_class": params.per_class,
            "classes": {c: int((stats["class"] == c).sum()) for c in CLASSES}}
    (out / Files.INDEX_HTML).write_text(index_html(listed, info, previews))
    log.info("browser: %d feature pages, %d images, %d heat maps, %d contexts, grid %s",
             len(listed), len(questions), pages.n_heat, pages.n_contexts, grid)
    return {"n_listed": len(listed), "n_images": len(questions), "n_heat_maps": pages.n_heat,
            "n_contexts": pages.n_contexts, "grid": None if grid is None else vars(grid), "tokens": totals,
            "layer": layer, "d_sae": d_sae}


def _top_rows(listed: pd.DataFrame, sample_of_row: np.ndarray, n_images: int,
              n_contexts: int) -> tuple[TopSamples, TopSamples]:
    """Per listed feature: its top image samples and its top text samples (distinct samples each)."""
    top_img: TopSamples = {}
    top_txt: TopSamples = {}
    for r in listed.itertuples(index=False):
        f = int(r.feature)
        top_img[f] = top_samples(r.top_image_rows, r.top_image_acts, sample_of_row, n_images)
        top_txt[f] = top_samples(r.top_text_rows, r.top_text_acts, sample_of_row, n_contexts)
    return top_img, top_txt


class _FeaturePages:
    """The parts of a feature page that read the token index and the scanned codes: image cards (writing
    each heat map) and text contexts; counts the heat maps and contexts written."""

    def __init__(self, out: Path, tokenizer: Any, tokens: pd.DataFrame, sample_of_row: np.ndarray,
                 sample_ids: Any, grid: Grid | None, params: BrowserParams,
                 found: dict[tuple[int, int], dict[int, float]], questions: dict[int, str]) -> None:
        self.out, self.tokenizer, self.grid, self.found, self.questions = out, tokenizer, grid, found, questions
        self.sample_ids, self.context_tokens = sample_ids, params.context_tokens
        self.token_rows = pd.Series(np.arange(len(tokens))).groupby(sample_of_row).indices
        self.tok = {c: tokens[c].to_numpy() for c in ("position", "modality", "token_id")}
        self.patch = tokens["patch"].to_numpy(np.int64)
        self.image = tokens["image_index"].to_numpy(np.int64)
        self.n_heat = self.n_contexts = 0

    def image_cards(self, f: int, tops: list[tuple[int, int, float]]) -> list[str]:
        top = max((a for _, _, a in tops), default=0.0)
        cards = []
        for s, row, a in tops:
            k = int(self.image[row])  # the image of the sample that holds the top token
            question = self.questions.get((s, k))
            heat = self.grid is not None and question is not None
            if heat:
                acts = self.found.get((f, s), {})
                rows = np.fromiter(acts, np.int64, len(acts))
                values = np.fromiter(acts.values(), np.float64, len(acts))
                on_image = self.image[rows] == k  # the other images' tokens are not this picture's patches
                cells = patch_heat(self.patch[rows[on_image]], values[on_image], self.grid, top)
                heat_png(cells, self.out / "heat" / f"{f}_{s}.png")
                self.n_heat += 1
            cards.append(image_card(f, s, str(self.sample_ids[s]), a, question, heat, k))
        return cards

    def text_contexts(self, f: int, tops: list[tuple[int, int, float]]) -> list[str]:
        scale = max((a for _, _, a in tops), default=0.0)
        contexts = []
        for s, row, a in tops:
            pieces, positions = text_context(self.tokenizer, self.tok, self.token_rows[s], row,
                                             self.found.get((f, s), {}), self.context_tokens)
            contexts.append(context_block(self.sample_ids[s], a, pieces, int(self.tok["position"][row]), positions,
                                          scale))
            self.n_contexts += 1
        return contexts
