"""The browser's HTML: the sortable index, one page per feature, the redirect page. Every piece of
data-set text goes through `esc`; the page script only reorders existing rows and never writes markup."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmsae.display import esc
from mmsae.models.grid import Grid

SORT_KEYS = ("feature", "class", "weight", "density", "density_text", "density_image", "max_act")
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


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


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


def image_name(s: int, k: int = 0) -> str:
    """File name (no suffix) of image `k` of shown sample `s` in img/: `{s}`, or `{s}_{k}` for k > 0."""
    return f"{s}" if k == 0 else f"{s}_{k}"


def image_card(f: int, s: int, sample_id: str, act: float, question: str | None, heat: bool, k: int = 0) -> str:
    """One top image: image `k` of the sample (when it has one), its heat veil, id, activation and question."""
    layers = f'<img alt="" src="../img/{image_name(s, k)}.png">' if question is not None else ""
    if heat:
        layers += f'<img alt="" src="../heat/{f}_{s}.png">'
    which = f" image {k + 1}" if k else ""
    return (f'<div class=card><div class=thumb>{layers}</div><div class=cap><b>{esc(sample_id)}</b>{which} '
            f"max {_num(act, 3)}<br>{esc(_short(question or '', 120))}</div></div>")


def context_block(sample_id: Any, act: float, pieces: list[tuple[str, str, float | None]], top_pos: int,
                  positions: list[int], scale: float) -> str:
    """One top text context with its sample id and activation."""
    return (f'<div class=ctx><span class=sid>{esc(sample_id)} ({_num(act, 3)})</span>'
            + context_html(pieces, top_pos, positions, scale) + "</div>")


def nav_links(feature_list: list[int], i: int) -> str:
    """Links to the previous and next listed feature's page."""
    nav = ""
    if i > 0:
        nav += f'<a href="{feature_list[i - 1]}.html">&larr; previous</a>'
    if i + 1 < len(feature_list):
        nav += f'<a href="{feature_list[i + 1]}.html">next &rarr;</a>'
    return nav


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


def write_redirect(path: str | os.PathLike, target: str) -> None:
    """A tiny page that forwards to the newest site (a stable address that works from file://)."""
    t = esc(target)
    Path(path).write_text(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>feature browser</title>'
                          f'<meta http-equiv="refresh" content="0; url={t}"></head>\n'
                          f'<body><p><a href="{t}">{t}</a></p></body></html>\n')
