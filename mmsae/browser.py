"""Feature browser: a static HTML site over one SAE's features that opens from disk (file://).

Layout of a browser artifact folder (every link relative, no server, no external JS / CSS):

    index.html           the listed features, sortable by clicking a column header or by the URL hash
                         (index.html#sort=density&dir=desc; keys: feature, class, weight, density,
                         density_text, density_image, max_act; missing values sort last either way)
    features/{f}.html    one page per listed feature: top images with a per-patch heat map, top text
                         contexts with the activating tokens highlighted, activation histogram
    img/{s}.png          one image per shown sample (index s among the token index's samples): the
                         square the vision tower sees (centre crop), resized to `image_size` px
    heat/{f}_{s}.png     the feature's per-patch activation on that image as a veil, one pixel per patch
                         (RGBA, dark, alpha = 1 - activation / the feature's top image activation, so
                         active patches stay bright and no overlay colour mixes with the image's own),
                         stretched over the image by CSS (`image-rendering: pixelated`)
    hist/{f}.png         activation histogram per modality (matplotlib)

Which features are listed (`n_features`, `per_class`): the `per_class` densest features of each live
class, then cross-modal features by weight, then the rest by density, up to `n_features`. Dead
features are never listed. Density = firing frequency: active tokens / tokens of that modality
(`density` over all tokens).

Patch grid: from the model's adapter (`ModelAdapter.image_grid`: patch `first + r * cols + c` is cell
(r, c)), loaded from its config and processor only (no weights). Where the grid is not fixed (Qwen2-VL)
images are shown without a heat map. For LLaVA-NeXT only the base grid (the first rows x cols image
tokens) is drawn; the base tile is the whole image resized, so on a non-square image the centre-crop
view is an approximation.

Every piece of data-set text (questions, token strings, sample ids) goes through `esc`; the page
script only reorders existing rows and never writes markup.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from mmsae.display import MODALITY_COLOURS, esc  # noqa: E402
from mmsae.errors import InputError  # noqa: E402
from mmsae.features import CLASSES, iter_codes, read_columns, require_columns  # noqa: E402
from mmsae.models.grid import Grid, adapter_grid, crop_box  # noqa: E402

log = logging.getLogger("mmsae.browser")

MODS = ("text", "image", "special")
SORT_KEYS = ("feature", "class", "weight", "density", "density_text", "density_image", "max_act")
TOKEN_COLUMNS = ("row", "sample_id", "position", "modality", "token_id", "patch")
FEATURE_COLUMNS = ("feature", "n_text", "n_image", "n_special", "top_text_rows", "top_text_acts",
                   "top_image_rows", "top_image_acts", "weight", "class")
VEIL_RGB = (16, 16, 24)
VEIL_MAX_ALPHA = 190  # a silent patch stays faintly visible


# -- the model's side: tokenizer and patch grid, without loading weights ---------------------------
def model_view(path: str | os.PathLike, trust_remote_code: bool = False) -> tuple[Any, Grid | None]:
    """(tokenizer, patch grid or None) of the model at `path`, through its adapter's own rules."""
    from mmsae.models import load_config

    path = str(path)
    config, cls = load_config(path, trust_remote_code)
    try:
        processor = cls.load_processor(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(path, "model.path", f"cannot load the processor ({exc.__class__.__name__})") from exc
    # the adapter only reads model.config for the grid and the special ids: a config stand-in will do
    adapter = cls(SimpleNamespace(config=config), processor, path)
    return adapter.tokenizer, adapter_grid(adapter)


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, by incremental decoding (keeps the tokenizer's own spacing rules)."""
    out, prev = [], ""
    ids = [int(i) for i in ids]
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.decode([ids[i]], skip_special_tokens=False))
        prev = cur
    return out


# -- which features ------------------------------------------------------------------------------
def modality_totals(tokens: pd.DataFrame) -> dict[str, int]:
    counts = tokens["modality"].value_counts()
    return {m: int(counts.get(m, 0)) for m in MODS}


def feature_stats(features: pd.DataFrame, totals: dict[str, int]) -> pd.DataFrame:
    """features plus density (overall and per modality) and max_act (top text or image activation)."""
    require_columns("features.parquet", list(features.columns), FEATURE_COLUMNS)
    df = features.copy()
    n_all = sum(totals.values())
    df["density"] = (df["n_text"] + df["n_image"] + df["n_special"]) / max(n_all, 1)
    df["density_text"] = df["n_text"] / totals["text"] if totals["text"] else np.nan
    df["density_image"] = df["n_image"] / totals["image"] if totals["image"] else np.nan

    def first(v: Any) -> float:
        return float(v[0]) if v is not None and len(v) else np.nan

    df["max_act"] = np.fmax(df["top_text_acts"].map(first).to_numpy(np.float64),
                            df["top_image_acts"].map(first).to_numpy(np.float64))
    return df


def select_features(stats: pd.DataFrame, n_features: int, per_class: int) -> pd.DataFrame:
    """The listed features, in listing order: the `per_class` densest of each live class, then
    cross-modal by weight, then the rest by density; at most n_features, dead ones never."""
    live = stats[stats["class"] != "dead"]
    by_density = live.sort_values(["density", "feature"], ascending=[False, True])
    picked: list[int] = []
    for cls in CLASSES:
        picked += by_density.loc[by_density["class"] == cls, "feature"].head(per_class).tolist()
    cross = live[live["weight"].notna()].sort_values(["weight", "feature"], ascending=[False, True])
    picked += cross["feature"].tolist() + by_density["feature"].tolist()
    order = list(dict.fromkeys(picked))[:n_features]
    return stats.set_index("feature", drop=False).loc[order].reset_index(drop=True)


# -- reading the token index and the codes ---------------------------------------------------------
def read_tokens(path: str | os.PathLike) -> pd.DataFrame:
    """tokens.parquet indexed by store row (row i = position i of the frame)."""
    tokens = read_columns(path, TOKEN_COLUMNS).sort_values("row", kind="stable").reset_index(drop=True)
    if not np.array_equal(tokens["row"].to_numpy(), np.arange(len(tokens))):
        raise InputError(path, "row", "rows are not 0..n-1")
    return tokens


def _top_samples(rows: Any, acts: Any, sample_of_row: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The first k distinct samples among top rows (already sorted by activation): (sample, row, act)."""
    out, seen = [], set()
    for r, a in zip(rows if rows is not None else [], acts if acts is not None else [], strict=True):
        s = int(sample_of_row[int(r)])
        if s not in seen:
            seen.add(s)
            out.append((s, int(r), float(a)))
            if len(out) == k:
                break
    return out


def scan_codes(codes: str | os.PathLike | pd.DataFrame, feats: np.ndarray, d_sae: int, sample_of_row: np.ndarray,
               pairs: set[tuple[int, int]], bins: int, batch_rows: int = 1 << 20
               ) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], dict[int, float]]]:
    """Two streaming passes over codes.parquet for the listed features `feats`:
    (histogram counts [n_feats, 3 modalities, bins], bin tops [n_feats] (the feature's largest
    activation), {(feature, sample): {row: activation}} for the wanted (feature, sample) pairs)."""
    slot = np.full(d_sae, -1, np.int64)
    slot[feats] = np.arange(len(feats))
    hi = np.zeros(len(feats), np.float64)
    for b in iter_codes(codes, ("feature", "activation"), batch_rows):
        s = slot[b["feature"].astype(np.int64)]
        m = s >= 0
        np.maximum.at(hi, s[m], b["activation"][m].astype(np.float64))
    hi[hi <= 0] = 1.0

    n_samples = int(sample_of_row.max()) + 1 if len(sample_of_row) else 0
    want = np.unique(np.array([s * d_sae + f for f, s in pairs], np.int64))
    hist = np.zeros(len(feats) * 3 * bins, np.int64)
    found: dict[tuple[int, int], dict[int, float]] = {}
    mod_index = {m: i for i, m in enumerate(MODS)}
    for b in iter_codes(codes, ("row", "modality", "feature", "activation"), batch_rows):
        feat = b["feature"].astype(np.int64)
        s = slot[feat]
        m = s >= 0
        act = b["activation"].astype(np.float64)
        mod = pd.Series(b["modality"][m]).map(mod_index).fillna(2).to_numpy(np.int64)  # unknown: special
        bin_ = np.clip((act[m] / hi[s[m]] * bins).astype(np.int64), 0, bins - 1)
        hist += np.bincount((s[m] * 3 + mod) * bins + bin_, minlength=len(hist))
        row = b["row"].astype(np.int64)
        key = sample_of_row[row] * d_sae + feat if n_samples else np.zeros(0, np.int64)
        hit = np.flatnonzero(np.isin(key, want))
        for i in hit:
            found.setdefault((int(feat[i]), int(sample_of_row[row[i]])), {})[int(row[i])] = float(act[i])
    return hist.reshape(len(feats), 3, bins), hi, found


# -- images ----------------------------------------------------------------------------------------
def square_view(data: bytes, size: int) -> Image.Image:
    """The centre square of an encoded image (what a CLIP-style processor crops), `size` px a side;
    nearest-neighbour when enlarging so small images stay crisp."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    box = crop_box(*img.size, center_crop=True)
    side = box[2] - box[0]
    img = img.crop(box)
    return img.resize((size, size), Image.Resampling.NEAREST if side <= size else Image.Resampling.LANCZOS)


def patch_heat(patches: np.ndarray, acts: np.ndarray, grid: Grid, top: float) -> np.ndarray:
    """[rows, cols] activation / top per grid cell from (image-token index, activation) pairs; image
    tokens outside the base grid (LLaVA-NeXT tiles, a CLS feature) are left out."""
    heat = np.zeros(grid.cells, np.float64)
    cell, ok = grid.cell_index(patches)
    heat[cell[ok]] = np.asarray(acts, np.float64)[ok] / (top if top > 0 else 1.0)
    return np.clip(heat, 0.0, 1.0).reshape(grid.rows, grid.cols)


def heat_png(heat: np.ndarray, path: Path) -> None:
    rgba = np.zeros((*heat.shape, 4), np.uint8)
    rgba[..., :3] = VEIL_RGB
    rgba[..., 3] = np.round((1.0 - heat) * VEIL_MAX_ALPHA).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)


class Histograms:
    """Activation histograms per modality (step lines, log counts) as PNG files.

    One figure and one line per modality, reused for every feature (only data, limits and labels
    change): building and laying out a fresh figure per feature made this the slowest part."""

    def __init__(self) -> None:
        from matplotlib.ticker import NullLocator

        self.fig, self.ax = plt.subplots(figsize=(4.5, 2.4), dpi=80)
        self.fig.subplots_adjust(left=0.14, right=0.98, bottom=0.2, top=0.96)
        self.lines = {m: self.ax.stairs([1.0], [0.0, 1.0], color=MODALITY_COLOURS[m], linewidth=1.4, label=m)
                      for m in MODS}
        self.ax.set_yscale("log")
        self.ax.yaxis.set_minor_locator(NullLocator())
        self.ax.set_xlabel("activation", fontsize=8)
        self.ax.set_ylabel("tokens", fontsize=8)
        self.ax.tick_params(labelsize=7)

    def save(self, counts: np.ndarray, top: float, path: Path) -> None:
        edges = np.linspace(0.0, top, counts.shape[1] + 1)
        shown = []
        for i, m in enumerate(MODS):
            n = int(counts[i].sum())
            self.lines[m].set_data(np.where(counts[i] > 0, counts[i], np.nan), edges)  # log axis: no zeros
            self.lines[m].set_visible(n > 0)
            self.lines[m].set_label(f"{m} ({n})")
            if n:
                shown.append(self.lines[m])
        self.ax.set_xlim(0.0, top)
        self.ax.set_ylim(0.7, max(2.0, float(counts.max()) * 1.5))
        self.ax.legend(handles=shown, fontsize=7)
        self.fig.savefig(path, format="png")

    def close(self) -> None:
        plt.close(self.fig)


# -- HTML ------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
th[data-key]{cursor:pointer;user-select:none} th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
.note{color:#555;font-size:.9em} .cls{font-size:.85em;padding:1px 5px;border-radius:3px;background:#eee}
.cross-modal{background:#e6d9f2} .text-only{background:#dbe9f6} .image-only{background:#fde3cc}
.cards{display:flex;flex-wrap:wrap;gap:12px} .card{width:var(--s);font-size:.8em}
.thumb{position:relative;width:var(--s);height:var(--s)} .thumb img{position:absolute;left:0;top:0;
width:100%;height:100%;image-rendering:pixelated} .cap{overflow-wrap:anywhere;color:#444}
.ctx{font-family:ui-monospace,monospace;font-size:.85em;line-height:1.9;margin:.3em 0;white-space:pre-wrap}
.ctx .sid{color:#888;margin-right:1em} .t{border-radius:2px} .t.top{outline:1px solid #c00}
.sp{color:#999} .imgchip{color:#fff;background:#888;border-radius:3px;padding:0 4px;margin:0 2px}
nav a{margin-right:1em}
"""

SORT_JS = """
(function () {
  var tbody = document.querySelector('#features tbody');
  var numeric = {feature: 1, weight: 1, density: 1, density_text: 1, density_image: 1, max_act: 1};
  function value(row, key) {
    var v = row.getAttribute('data-' + key);
    if (v === null || v === '') return null;
    return numeric[key] ? parseFloat(v) : v;
  }
  function sortBy(key, dir) {
    if (!(key in numeric) && key !== 'class') return;
    var sign = dir === 'asc' ? 1 : -1;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = value(a, key), y = value(b, key);
      if (x === null || y === null) {  // missing values last in either direction
        if (x !== y) return x === null ? 1 : -1;
      } else if (x !== y) {
        return sign * (x < y ? -1 : 1);
      }
      return value(a, 'feature') - value(b, 'feature');
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    document.querySelectorAll('th[data-key]').forEach(function (th) {
      th.className = th.getAttribute('data-key') === key ? dir : '';
    });
    document.body.setAttribute('data-sort', key + ':' + dir);
  }
  function fromHash() {
    var q = {};
    location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      var i = kv.indexOf('=');
      if (i > 0) q[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1));
    });
    if (q.sort) sortBy(q.sort, q.dir === 'asc' ? 'asc' : 'desc');
  }
  document.querySelectorAll('th[data-key]').forEach(function (th) {
    th.addEventListener('click', function () {
      var key = th.getAttribute('data-key');
      var dir = th.className === 'desc' ? 'asc' : th.className === 'asc' ? 'desc'
              : (key === 'class' || key === 'feature') ? 'asc' : 'desc';
      history.replaceState(null, '', '#sort=' + key + '&dir=' + dir);
      sortBy(key, dir);
    });
  });
  window.addEventListener('hashchange', fromHash);
  fromHash();
})();
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _num(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{float(v):.{digits}g}"


def _attr(v: Any) -> str:
    """A sort value for a data- attribute: '' when missing."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return esc(repr(float(v)) if isinstance(v, float | np.floating) else v)


def index_html(listed: pd.DataFrame, info: dict[str, Any], previews: dict[int, str]) -> str:
    cols = [("feature", "feature"), ("class", "class"), ("weight", "cross-modal weight"),
            ("density", "density"), ("density_text", "text density"), ("density_image", "image density"),
            ("max_act", "max act"), (None, "top text tokens")]
    head = "".join(f'<th data-key="{k}">{esc(label)}</th>' if k else f"<th>{esc(label)}</th>" for k, label in cols)
    rows = []
    for r in listed.to_dict("records"):
        f = int(r["feature"])
        data = " ".join(f'data-{k}="{_attr(r[k])}"' for k in SORT_KEYS)
        rows.append(
            f"<tr {data}><td class=num><a href=\"features/{f}.html\">{f}</a></td>"
            f'<td><span class="cls {esc(r["class"])}">{esc(r["class"])}</span></td>'
            f"<td class=num>{_num(r['weight'], 3)}</td><td class=num>{_num(r['density'], 3)}</td>"
            f"<td class=num>{_num(r['density_text'], 3)}</td><td class=num>{_num(r['density_image'], 3)}</td>"
            f"<td class=num>{_num(r['max_act'], 3)}</td><td>{esc(previews.get(f, ''))}</td></tr>")
    totals = info["totals"]
    summary = (
        f"<p>SAE layer {esc(info['layer'])}, {esc(info['d_sae'])} features; classes: "
        + ", ".join(f"{esc(c)} {esc(n)}" for c, n in info["classes"].items())
        + f". Tokens: text {totals['text']}, image {totals['image']}, special {totals['special']}.</p>"
        f"<p class=note>{len(listed)} features listed: the {esc(info['per_class'])} densest of each class, "
        "then cross-modal features by weight, then by density. Density = active tokens / tokens of that "
        "modality. Click a column header to sort; the URL hash keeps the order "
        "(<code>#sort=weight&amp;dir=desc</code>).</p>")
    body = (f"<h1>{esc(info['title'])}</h1>\n{summary}\n<table id=features><thead><tr>{head}</tr></thead>"
            f"<tbody>\n" + "\n".join(rows) + f"\n</tbody></table>\n<script>{SORT_JS}</script>")
    return _page(info["title"], body)


def context_html(pieces: list[tuple[str, str, float | None]], top_pos: int, positions: list[int], scale: float) -> str:
    """One text context: (kind, text, activation) items; kind text / special / image (a collapsed run)."""
    out = []
    for (kind, text, act), pos in zip(pieces, positions, strict=True):
        if kind == "image":
            out.append(f'<span class="imgchip">{esc(text)}</span>')
            continue
        cls = "t top" if pos == top_pos else "t"
        if kind == "special":
            cls += " sp"
        if act is not None and act > 0:
            alpha = min(1.0, act / scale) if scale > 0 else 1.0
            out.append(f'<span class="{cls}" style="background:rgba(255,140,0,{alpha:.2f})" '
                       f'title="{esc(f"{act:.4g}")}">{esc(text)}</span>')
        else:
            out.append(f'<span class="{cls}">{esc(text)}</span>')
    return "".join(out)


def feature_html(r: Any, cards: list[str], contexts: list[str], has_hist: bool, nav: str, size: int,
                 grid: Grid | None) -> str:
    f = int(r["feature"])
    head = (f"<nav><a href=\"../index.html\">&larr; all features</a>{nav}</nav>"
            f"<h1>Feature {f} <span class=\"cls {esc(r['class'])}\">{esc(r['class'])}</span></h1>"
            f"<p>cross-modal weight {_num(r['weight'], 3)}; density {_num(r['density'], 3)} "
            f"(text {_num(r['density_text'], 3)}, image {_num(r['density_image'], 3)}); active on "
            f"{int(r['n_text'])} text, {int(r['n_image'])} image, {int(r['n_special'])} special tokens; "
            f"max activation {_num(r['max_act'], 4)}.</p>")
    note = ("heat map: patches dimmed by 1 - activation / the feature's top image activation" if grid
            else "no fixed patch grid for this model: images shown without a heat map")
    parts = [head, f'<h2>Top images</h2><p class=note>{esc(note)}</p>',
             f'<div class=cards style="--s:{size}px">' + "".join(cards) + "</div>" if cards
             else "<p class=note>no image activations</p>",
             "<h2>Top text contexts</h2>",
             "\n".join(contexts) if contexts else "<p class=note>no text activations</p>"]
    if has_hist:
        parts += ["<h2>Activation histogram</h2>", f'<img alt="activation histogram" src="../hist/{f}.png">']
    return _page(f"Feature {f}", "\n".join(parts))


# -- the site --------------------------------------------------------------------------------------
def build_site(out: str | os.PathLike, features: pd.DataFrame, codes: str | os.PathLike | pd.DataFrame,
               tokens: pd.DataFrame, samples: str | os.PathLike, tokenizer: Any, grid: Grid | None,
               params: dict[str, Any], layer: int, d_sae: int, title: str = "mmsae feature browser") -> dict[str, Any]:
    """Write the site into `out` (an existing folder); returns counts for the manifest.

    `tokens` is read_tokens' frame, `samples` the samples.parquet path, `params` the browser slice.
    """
    out = Path(out)
    for sub in ("features", "img", "heat", "hist"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    totals = modality_totals(tokens)
    stats = feature_stats(features, totals)
    listed = select_features(stats, params["n_features"], params["per_class"])
    if len(stats) and int(stats["feature"].max()) >= d_sae:
        raise InputError("features.parquet", "feature", f"feature id outside [0, {d_sae})")
    sample_of_row, sample_ids = pd.factorize(tokens["sample_id"], sort=False)
    sample_of_row = sample_of_row.astype(np.int64)
    n_images, n_ctx = params["n_images"], params["n_contexts"]
    if grid is not None:
        _check_grid(tokens, sample_of_row, grid)

    top_img: dict[int, list[tuple[int, int, float]]] = {}
    top_txt: dict[int, list[tuple[int, int, float]]] = {}
    for r in listed.itertuples(index=False):
        f = int(r.feature)
        top_img[f] = _top_samples(r.top_image_rows, r.top_image_acts, sample_of_row, n_images)
        top_txt[f] = _top_samples(r.top_text_rows, r.top_text_acts, sample_of_row, n_ctx)
    pairs = {(f, s) for f, v in (*top_img.items(), *top_txt.items()) for s, _, _ in v}
    feats = listed["feature"].to_numpy(np.int64)
    hist, hi, found = scan_codes(codes, feats, d_sae, sample_of_row, pairs, params["bins"])

    # images of the shown samples, once each
    size = params["image_size"]
    shown = sorted({s for v in top_img.values() for s, _, _ in v})
    questions = _write_images(samples, [str(sample_ids[s]) for s in shown], shown, out / "img", size)
    token_rows = pd.Series(np.arange(len(tokens))).groupby(sample_of_row).indices
    tok = {c: tokens[c].to_numpy() for c in ("position", "modality", "token_id")}
    patch = tokens["patch"].to_numpy(np.int64)

    previews = _previews(tokenizer, listed, tokens)
    hists = Histograms()
    n_heat = n_ctx_written = 0
    feature_list = feats.tolist()
    try:
        for i, r in enumerate(tqdm(listed.to_dict("records"), desc="feature pages", mininterval=5)):
            f = int(r["feature"])
            cards = []
            top = max((a for _, _, a in top_img[f]), default=0.0)
            for s, _, a in top_img[f]:
                sid = str(sample_ids[s])
                layers = f'<img alt="" src="../img/{s}.png">' if s in questions else ""
                if grid is not None and s in questions:
                    acts = found.get((f, s), {})
                    rows = np.fromiter(acts, np.int64, len(acts))
                    heat = patch_heat(patch[rows], np.fromiter(acts.values(), np.float64, len(acts)), grid, top)
                    heat_png(heat, out / "heat" / f"{f}_{s}.png")
                    n_heat += 1
                    layers += f'<img alt="" src="../heat/{f}_{s}.png">'
                cards.append(f'<div class=card><div class=thumb>{layers}</div><div class=cap><b>{esc(sid)}</b> '
                             f"max {_num(a, 3)}<br>{esc(_short(questions.get(s, ''), 120))}</div></div>")
            contexts = []
            scale = max((a for _, _, a in top_txt[f]), default=0.0)
            for s, row, a in top_txt[f]:
                pieces, positions = _context(tokenizer, tok, token_rows[s], row, found.get((f, s), {}),
                                             params["context_tokens"])
                contexts.append(f'<div class=ctx><span class=sid>{esc(sample_ids[s])} ({_num(a, 3)})</span>'
                                + context_html(pieces, int(tok["position"][row]), positions, scale) + "</div>")
                n_ctx_written += 1
            has_hist = bool(hist[i].sum())
            if has_hist:
                hists.save(hist[i], hi[i], out / "hist" / f"{f}.png")
            nav = ""
            if i > 0:
                nav += f'<a href="{feature_list[i - 1]}.html">&larr; previous</a>'
            if i + 1 < len(feature_list):
                nav += f'<a href="{feature_list[i + 1]}.html">next &rarr;</a>'
            (out / "features" / f"{f}.html").write_text(feature_html(r, cards, contexts, has_hist, nav, size, grid))
    finally:
        hists.close()

    info = {"title": title, "layer": layer, "d_sae": d_sae, "totals": totals, "per_class": params["per_class"],
            "classes": {c: int((stats["class"] == c).sum()) for c in CLASSES}}
    (out / "index.html").write_text(index_html(listed, info, previews))
    log.info("browser: %d feature pages, %d images, %d heat maps, %d contexts, grid %s",
             len(listed), len(questions), n_heat, n_ctx_written, grid)
    return {"n_listed": len(listed), "n_images": len(questions), "n_heat_maps": n_heat, "n_contexts": n_ctx_written,
            "grid": None if grid is None else vars(grid), "tokens": totals, "layer": layer, "d_sae": d_sae}


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _write_images(samples: str | os.PathLike, ids: list[str], idx: list[int], folder: Path, size: int) -> dict[int, str]:
    """img/{s}.png for each shown sample that has an image; returns {s: question} for those written."""
    path = Path(samples)
    if not ids:
        return {}
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    require_columns(path, pq.read_schema(path).names, ("sample_id", "question", "image"))
    table = pq.read_table(path, columns=["sample_id", "question", "image"], filters=[("sample_id", "in", ids)])
    by_id = {sid: (q, img) for sid, q, img in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)}
    written = {}
    for sid, s in zip(ids, idx, strict=True):
        if sid not in by_id:
            raise InputError(path, "sample_id", f"sample {sid!r} of the token index is not in samples.parquet")
        question, data = by_id[sid]
        if data is None:
            continue
        try:
            square_view(data, size).save(folder / f"{s}.png", optimize=True)
        except OSError as exc:
            raise InputError(path, "image", f"sample {sid!r}: undecodable image ({exc.__class__.__name__})") from exc
        written[s] = question or ""
    return written


def _check_grid(tokens: pd.DataFrame, sample_of_row: np.ndarray, grid: Grid) -> None:
    """Every sample with image tokens must have at least the model's base grid of them."""
    image = (tokens["modality"] == "image").to_numpy()
    if not image.any():
        return
    per_sample = np.bincount(sample_of_row[image])
    per_sample = per_sample[per_sample > 0]
    if per_sample.min() < grid.span:
        raise InputError("tokens.parquet", "patch", f"a sample has {per_sample.min()} image tokens, fewer than the "
                         f"model's {grid.rows}x{grid.cols} patch grid (+{grid.first}) needs: wrong --model?")


def _context(tokenizer, tok: dict[str, np.ndarray], rows: np.ndarray, top_row: int, acts: dict[int, float],
             width: int) -> tuple[list[tuple[str, str, float | None]], list[int]]:
    """The items around the top token: `width` items either side, a run of image tokens as one item."""
    rows = rows[np.argsort(tok["position"][rows], kind="stable")]
    is_image = tok["modality"][rows] == "image"
    # item boundaries: every non-image token starts one, an image run starts one at its first token
    starts = np.flatnonzero(~is_image | np.r_[True, ~is_image[:-1]])
    item_of = np.cumsum(np.isin(np.arange(len(rows)), starts)) - 1
    at = int(item_of[int(np.flatnonzero(rows == top_row)[0])])
    lo, hi = max(0, at - width), min(len(starts), at + width + 1)
    ends = np.r_[starts[1:], len(rows)]
    ids = [int(tok["token_id"][rows[starts[i]]]) for i in range(lo, hi) if not is_image[starts[i]]]
    strings = iter(token_strings(tokenizer, ids))
    pieces, positions = [], []
    for i in range(lo, hi):
        first = int(rows[starts[i]])
        if is_image[starts[i]]:
            run = rows[starts[i]:ends[i]]
            best = max((acts.get(int(r), 0.0) for r in run), default=0.0)
            label = f"image \u00d7{len(run)}" + (f" max {best:.3g}" if best > 0 else "")
            pieces.append(("image", label, None))
        else:
            kind = "special" if tok["modality"][first] == "special" else "text"
            pieces.append((kind, next(strings), acts.get(first)))
        positions.append(int(tok["position"][first]))
    return pieces, positions


def _previews(tokenizer, listed: pd.DataFrame, tokens: pd.DataFrame, n: int = 4) -> dict[int, str]:
    """Per feature: its distinct top text tokens, for the index."""
    token_id = tokens["token_id"].to_numpy()
    out = {}
    for r in listed.itertuples(index=False):
        rows = r.top_text_rows if r.top_text_rows is not None else []
        words = [tokenizer.decode([int(token_id[int(x)])], skip_special_tokens=False).strip() for x in rows]
        out[int(r.feature)] = " \u00b7 ".join(list(dict.fromkeys(w for w in words if w))[:n])
    return out


def read_features(path: str | os.PathLike) -> pd.DataFrame:
    return read_columns(path, FEATURE_COLUMNS)


def write_redirect(path: str | os.PathLike, target: str) -> None:
    """A tiny page that forwards to the newest site (a stable address that works from file://)."""
    t = esc(target)
    Path(path).write_text(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>feature browser</title>'
                          f'<meta http-equiv="refresh" content="0; url={t}"></head>\n'
                          f'<body><p><a href="{t}">{t}</a></p></body></html>\n')


__all__ = ["build_site", "feature_stats", "model_view", "patch_heat", "read_features", "read_tokens",
           "scan_codes", "select_features", "token_strings", "write_redirect"]
