"""Per-feature statistics and the SAE-V cross-modal weight (paper Algorithm 1, steps 2-3).

For every SAE feature, from the sparse codes of the encode stage:

- n_text, n_image, n_special: how many tokens of each modality it is active on (activation > the
  encode delta; codes.parquet only holds those);
- its top-K activating tokens (store rows + activations, activation order, ties by row);
- the cross-modal weight: the mean cosine similarity over ALL text x image pairs of those tokens'
  RESIDUAL hidden states (read from the extract store at the SAE's layer, not their SAE codes).
  The mean of pairwise cosines is the dot product of the mean unit text vector and the mean unit
  image vector, which is how it is computed (a zero-norm state counts as cosine 0);
- class in {text-only, image-only, cross-modal, dead}.

Two rules (config `features.rule`):

- `per_modality` (the paper's wording, "w2" in the toy-world notes): the top-K *text* tokens and,
  chosen separately, the top-K *image* tokens. "Text" is modality `text` only: special tokens (BOS,
  chat-template markers, image placeholders) are excluded from both sides. A feature is cross-modal
  when it is active on >= min_per_modality text tokens and >= min_per_modality image tokens; its
  weight is the mean cosine over all (<= K) x (<= K) pairs. Otherwise it is image-only when it fires
  on more image than text tokens, else text-only (also a feature that fires only on special tokens).
- `release` (the reference code): top-K over ALL tokens; "text" there is every non-image token,
  special tokens included (as in the release). Cross-modal only when >= min_per_modality of each
  side are among the top-K; the weight then uses the first min_per_modality text x first
  min_per_modality image tokens (5 x 5 in the release). Otherwise image-only when image tokens are
  the majority of its top-K, else text-only. The top_text_* / top_image_* columns hold the two sides
  of that one top-K list.

A feature never active is `dead` under both rules. The weight is null unless the feature is
cross-modal. The codes are streamed in record batches, so memory is bounded by d_sae x K, not by the
size of codes.parquet.

Stage features (`run`): reads codes.parquet (encode; its manifest gives the SAE's layer and d_sae) and
the extract store (residual hidden states at that layer, for the cosine weight). Writes
features.parquet: feature, n_text, n_image, n_special, top_text_rows, top_text_acts, top_image_rows,
top_image_acts, weight (null unless cross-modal), class (text-only | image-only | cross-modal | dead).

The weight column alone may come from other codes (config features.weights_on / weights_samples): the
first N samples of the pool (the paper: 1,000), or the SAE corpus encoded by the same SAE (--corpus-encode,
--corpus-extract), or its first N samples. Those codes get a table of their own, whose weights replace
the pool's; a feature cross-modal in the pool but not on the subset then has a null weight, and the
other way round. The counts, top tokens and classes stay the pool's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import MANIFEST, Files, Timer, atomic_dir, read_manifest, write_manifest
from mmsae.codes import CodesReader
from mmsae.errors import InputError
from mmsae.params import FeaturesParams

CODE_COLUMNS = ("row", "sample_id", "position", "modality", "feature", "activation")
CLASSES = ("text-only", "image-only", "cross-modal", "dead")
RULES = ("per_modality", "release")
FEATURE_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("n_text", pa.int64()),
        ("n_image", pa.int64()),
        ("n_special", pa.int64()),
        ("top_text_rows", pa.list_(pa.int64())),
        ("top_text_acts", pa.list_(pa.float32())),
        ("top_image_rows", pa.list_(pa.int64())),
        ("top_image_acts", pa.list_(pa.float32())),
        ("weight", pa.float64()),
        ("class", pa.string()),
    ]
)

Codes = str | os.PathLike | pd.DataFrame
COSINE_ROWS = 1024  # states normalised (float64) and added to the cosine sums at a time: 32 MB at d 4,096


def encode_info(encode: str | os.PathLike) -> tuple[int, int]:
    """(layer, d_sae) of the SAE behind an encode artifact, from its manifest counts."""
    counts = read_manifest(encode).get("counts", {})
    for key in ("layer", "d_sae"):
        if key not in counts:
            raise InputError(Path(encode) / MANIFEST, f"counts.{key}", "missing")
    return int(counts["layer"]), int(counts["d_sae"])


def require_columns(path: object, have: Sequence[str], need: Sequence[str]) -> None:
    """InputError(file, column, 'missing column') for the first column of `need` not in `have`."""
    for col in need:
        if col not in have:
            raise InputError(path, col, "missing column")


def read_columns(path: str | os.PathLike, required: Sequence[str], all_columns: bool = False) -> pd.DataFrame:
    """The `required` columns of a parquet file (every column with all_columns); InputError naming the
    file and the column when the file or a required column is missing."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    require_columns(path, pq.read_schema(path).names, required)
    return pd.read_parquet(path, columns=None if all_columns else list(required))


def iter_codes(codes: Codes, columns: Sequence[str], batch_rows: int = 1 << 20) -> Iterator[dict[str, np.ndarray]]:
    """Column arrays of the codes (an encode artifact's codes.parquet folder or file, or an in-memory frame
    with its columns), batch_rows at a time; mmsae.codes cuts the batches (the layout lives there)."""
    columns = list(columns)
    if hasattr(codes, "iter_codes"):  # a reader or a view with its own batches (mmsae.scoring.shards.CodesRange)
        yield from codes.iter_codes(columns, batch_rows)
        return
    if isinstance(codes, pd.DataFrame):
        require_columns("<codes>", list(codes.columns), columns)
        for start in range(0, len(codes), batch_rows):
            part = codes.iloc[start : start + batch_rows]
            yield {c: part[c].to_numpy() for c in columns}
        return
    yield from CodesReader(codes).iter_codes(columns, batch_rows)


class TopK:
    """Streaming top-k (by activation, ties by smaller row) per integer key in [0, n_keys), with an optional
    int8 payload. Held as [n_keys, k] tables sorted per key, so memory is n_keys x k whatever the number of
    codes; each batch only sorts the codes that beat their key's current k-th entry, merged with the
    tables' rows of those keys."""

    def __init__(self, k: int, n_keys: int) -> None:
        self.k, self.n_keys = int(k), int(n_keys)
        self.act_t = np.full((self.n_keys, self.k), -np.inf, np.float32)
        self.row_t = np.full((self.n_keys, self.k), np.iinfo(np.int64).max, np.int64)
        self.extra_t = np.zeros((self.n_keys, self.k), np.int8)

    def update(self, key: np.ndarray, act: np.ndarray, row: np.ndarray, extra: np.ndarray | None = None) -> None:
        key, act, row = key.astype(np.int64), act.astype(np.float32), row.astype(np.int64)
        extra = np.zeros(len(key), np.int8) if extra is None else extra.astype(np.int8)
        last_act, last_row = self.act_t[key, -1], self.row_t[key, -1]
        beat = (act > last_act) | ((act == last_act) & (row < last_row))
        if not beat.any():
            return
        key, act, row, extra = key[beat], act[beat], row[beat], extra[beat]
        keys = np.unique(key)
        # the affected keys' current entries plus the candidates, ordered by (key, -act, row)
        n_old = len(keys) * self.k
        all_key = np.concatenate([np.repeat(keys, self.k), key])
        all_act = np.concatenate([self.act_t[keys].ravel(), act])
        all_row = np.concatenate([self.row_t[keys].ravel(), row])
        all_extra = np.concatenate([self.extra_t[keys].ravel(), extra])
        order = np.lexsort((all_row, -all_act, all_key))
        slot = np.searchsorted(keys, all_key[order])
        rank = np.arange(len(order)) - np.searchsorted(all_key[order], all_key[order], side="left")
        keep = rank < self.k
        o, s, r = order[keep], slot[keep], rank[keep]
        assert len(o) == n_old  # every affected key had k slots (padding included) before the merge
        self.act_t[keys[s], r] = all_act[o]
        self.row_t[keys[s], r] = all_row[o]
        self.extra_t[keys[s], r] = all_extra[o]

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(key, act, row, extra) of the kept entries, sorted by (key, -act, row)."""
        valid = self.act_t > -np.inf
        key = np.broadcast_to(np.arange(self.n_keys, dtype=np.int64)[:, None], valid.shape)[valid]
        return key, self.act_t[valid], self.row_t[valid], self.extra_t[valid]


def _lists(owner: np.ndarray, values: np.ndarray, n: int, typ: pa.DataType) -> pa.ListArray:
    """A list column of length n from values sorted by their owner index (0..n-1)."""
    offsets = np.searchsorted(owner, np.arange(n + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, typ))


COSINE_BYTES = 1 << 30  # the cosine's float64 sums per group (features.cosine_memory_mb's default)


def cosine_feature_bytes(d_model: int) -> int:
    """One cross-modal feature's cosine sums: a float64 sum of d_model per modality."""
    return 2 * int(d_model) * 8


def cosine_group_size(d_model: int, max_bytes: int = COSINE_BYTES) -> int:
    """Cross-modal features whose cosine sums fit in max_bytes (one store read per group)."""
    return max(1, int(max_bytes) // cosine_feature_bytes(d_model))


def mean_pair_cosine(store, layer: int, text_rows: list[np.ndarray], image_rows: list[np.ndarray],
                     max_bytes: int = COSINE_BYTES) -> np.ndarray:
    """For each i: mean cosine over all text_rows[i] x image_rows[i] pairs of the store's hidden states,
    i.e. <mean unit text state, mean unit image state>.

    The unit states are summed per feature and side while the store is read chunk by chunk in row order
    (`iter_rows`: each chunk once per group, not once per group of rows), for groups of features whose
    float64 sums fit in max_bytes (16,384 features at d_model 4,096 with the default 1 GiB:
    `features.cosine_memory_mb`).
    """
    n = len(text_rows)
    out = np.zeros(n, np.float64)
    group = cosine_group_size(store.d_model, max_bytes)
    for g0 in range(0, n, group):
        members = range(g0, min(n, g0 + group))
        slot = np.concatenate([np.full(len(side[m]), 2 * (m - g0) + s, np.int64)
                               for m in members for s, side in enumerate((text_rows, image_rows))] or [np.zeros(0, np.int64)])
        rows = np.concatenate([side[m] for m in members for side in (text_rows, image_rows)] or [np.zeros(0, np.int64)])
        sums = torch.zeros((2 * len(members), int(store.d_model)), dtype=torch.float64)
        # Each state is read and normalised once, however many features ask for it: a store chunk holds the
        # top tokens of many features (up to 2 x K x group requests), so one [requests, d_model] float64
        # block per chunk grew with the features (0.9 GB at 1,730 of them, d 4,096; perf/README.md: the flat regime).
        urows, inv = np.unique(rows, return_inverse=True)
        by_row = np.argsort(inv, kind="stable")  # the requests grouped by row, each row's in their order
        req0 = np.searchsorted(inv[by_row], np.arange(len(urows) + 1))
        reader = store.iter_rows(layer, urows) if hasattr(store, "iter_rows") else [(np.arange(len(urows)), store.read_rows(layer, urows))]
        for where, states in reader:
            for p0 in range(0, len(where), COSINE_ROWS):
                w = where[p0 : p0 + COSINE_ROWS]
                x = states[p0 : p0 + COSINE_ROWS].astype(np.float64)
                norms = np.linalg.norm(x, axis=1, keepdims=True)
                unit = torch.from_numpy(np.divide(x, norms, out=np.zeros_like(x), where=norms > 0))
                n_req = req0[w + 1] - req0[w]
                local = np.repeat(np.arange(len(w)), n_req)
                req = by_row[np.repeat(req0[w], n_req) + np.arange(len(local)) - np.repeat(np.cumsum(n_req) - n_req, n_req)]
                # rows in store order, each row's requests in their order: every sum adds in the order it did
                for q0 in range(0, len(req), COSINE_ROWS):
                    q = slice(q0, q0 + COSINE_ROWS)
                    sums.index_add_(0, torch.from_numpy(slot[req[q]]), unit[torch.from_numpy(local[q])])
        count = np.bincount(slot, minlength=2 * len(members)).reshape(-1, 2)
        both = (count[:, 0] > 0) & (count[:, 1] > 0)
        # <sum_t / n_t, sum_i / n_i> per feature, row by row: no [features x d_model] temporaries
        dots = np.concatenate([(sums[2 * a : 2 * a + 2048 : 2] * sums[2 * a + 1 : 2 * a + 2048 : 2]).sum(1).numpy()
                               for a in range(0, len(members), 1024)])
        out[g0 : g0 + len(members)] = np.where(both, dots / np.maximum(count[:, 0] * count[:, 1], 1), 0.0)
    return out


def _in_ranges(rows: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    keep = np.zeros(len(rows), bool)
    for a, b in ranges:
        keep |= (rows >= a) & (rows < b)
    return keep


def feature_table(codes: Codes, store, layer: int, d_sae: int, top_k: int = 30, rule: str = "per_modality",
                  min_per_modality: int = 5, batch_rows: int = 1 << 20,
                  row_ranges: Sequence[tuple[int, int]] | None = None, cosine_bytes: int = COSINE_BYTES) -> pd.DataFrame:
    """features.parquet as a DataFrame (one row per feature 0..d_sae-1; see the module docstring).

    row_ranges: only the codes of these store-row ranges (a sample subset: mmsae.codes.sample_row_ranges),
    read from the parts that hold them only; None = every code.

    `store` is an ActivationStore (anything with `read_rows(layer, rows)`); `layer` the SAE's layer.
    """
    if rule not in RULES:
        raise InputError("features.rule", "rule", f"unknown rule {rule!r}; known: {RULES}")
    counts = np.zeros((3, d_sae), np.int64)  # text, image, special
    tracker = TopK(top_k, 2 * d_sae if rule == "per_modality" else d_sae)
    columns = ("row", "modality", "feature", "activation")
    if row_ranges is None:
        batches = iter_codes(codes, columns, batch_rows)
    elif isinstance(codes, pd.DataFrame):
        batches = iter_codes(codes[_in_ranges(codes["row"].to_numpy(), row_ranges)], columns, batch_rows)
    else:
        batches = (codes if isinstance(codes, CodesReader) else CodesReader(codes)).select(row_ranges, columns, batch_rows)
    for b in batches:
        feat = b["feature"].astype(np.int64)
        if len(feat) and (feat.min() < 0 or feat.max() >= d_sae):
            raise InputError(Files.CODES, "feature", f"feature id outside [0, {d_sae})")
        mod = pa.array(b["modality"], pa.string())
        is_text = pc.equal(mod, "text").to_numpy(zero_copy_only=False)
        is_image = pc.equal(mod, "image").to_numpy(zero_copy_only=False)
        is_special = ~(is_text | is_image)
        for i, m in enumerate((is_text, is_image, is_special)):
            counts[i] += np.bincount(feat[m], minlength=d_sae)
        act, row = b["activation"].astype(np.float32), b["row"].astype(np.int64)
        if rule == "per_modality":
            m = is_text | is_image  # special tokens are neither side
            tracker.update(feat[m] * 2 + is_image[m], act[m], row[m])
        else:
            tracker.update(feat, act, row, is_image)

    key, top_act, top_row, top_extra = tracker.entries()
    if rule == "per_modality":
        side_image = (key % 2).astype(bool)
        owner = key // 2
    else:
        side_image = top_extra.astype(bool)
        owner = key
    t_owner, t_act, t_row = owner[~side_image], top_act[~side_image], top_row[~side_image]
    i_owner, i_act, i_row = owner[side_image], top_act[side_image], top_row[side_image]
    t_off = np.searchsorted(t_owner, np.arange(d_sae + 1))
    i_off = np.searchsorted(i_owner, np.arange(d_sae + 1))
    n_top_text, n_top_image = np.diff(t_off), np.diff(i_off)

    n_text, n_image, n_special = counts
    total = counts.sum(0)
    if rule == "per_modality":
        cross = (n_text >= min_per_modality) & (n_image >= min_per_modality)
        image_major = n_image > n_text
        take_t, take_i = n_top_text, n_top_image
    else:
        cross = (n_top_text >= min_per_modality) & (n_top_image >= min_per_modality)
        image_major = n_top_image > n_top_text
        take_t = np.minimum(n_top_text, min_per_modality)
        take_i = np.minimum(n_top_image, min_per_modality)
    cls = np.where(image_major, "image-only", "text-only").astype(object)
    cls[cross] = "cross-modal"
    cls[total == 0] = "dead"

    weight = np.full(d_sae, np.nan)
    xm = np.flatnonzero(cross)
    weight[xm] = mean_pair_cosine(
        store, layer,
        [t_row[t_off[f] : t_off[f] + take_t[f]] for f in xm],
        [i_row[i_off[f] : i_off[f] + take_i[f]] for f in xm],
        max_bytes=cosine_bytes,
    )
    table = pa.table(
        {
            "feature": pa.array(np.arange(d_sae, dtype=np.int32)),
            "n_text": pa.array(n_text),
            "n_image": pa.array(n_image),
            "n_special": pa.array(n_special),
            "top_text_rows": _lists(t_owner, t_row, d_sae, pa.int64()),
            "top_text_acts": _lists(t_owner, t_act, d_sae, pa.float32()),
            "top_image_rows": _lists(i_owner, i_row, d_sae, pa.int64()),
            "top_image_acts": _lists(i_owner, i_act, d_sae, pa.float32()),
            "weight": pa.array(weight, pa.float64(), from_pandas=True),
            "class": pa.array(cls.tolist(), pa.string()),
        },
        schema=FEATURE_SCHEMA,
    )
    return table.to_pandas()


def write_features(df: pd.DataFrame, path: str | os.PathLike) -> None:
    pq.write_table(pa.Table.from_pandas(df[FEATURE_SCHEMA.names], schema=FEATURE_SCHEMA, preserve_index=False), path)


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    counts = df["class"].value_counts()
    return {c: int(counts.get(c, 0)) for c in CLASSES}


def feature_weights(features: pd.DataFrame, d_sae: int | None = None) -> np.ndarray:
    """Dense weight vector indexed by feature id; 0 where the weight is null (not cross-modal)."""
    require_columns(Files.FEATURES, list(features.columns), ("feature", "weight"))
    n = int(d_sae if d_sae is not None else (features["feature"].max() + 1 if len(features) else 0))
    w = np.zeros(n, np.float64)
    w[features["feature"].to_numpy(np.int64)] = features["weight"].astype("float64").fillna(0.0).to_numpy()
    return w


def feature_rule(features: str | os.PathLike) -> str:
    """The rule the features artifact was built with (its manifest's params.rule; per_modality if absent)."""
    return read_manifest(features).get("params", {}).get("rule", "per_modality")


def text_modalities(rule: str) -> tuple[str, ...]:
    """The modalities that count as text for features built with `rule`: the release rule's "text" is every
    non-image token (modalities text and special), per_modality's the modality `text` only."""
    return ("text", "special") if rule == "release" else ("text",)


# --- the weights subset (features.weights_on, features.weights_samples) ---------------------------------


def first_samples_end(extract: str | os.PathLike, n_samples: int, batch_rows: int = 1 << 20) -> tuple[int, int]:
    """(end row, samples) of the first n_samples samples of an extraction, in its row (= sample) order:
    the store row where sample n_samples + 1 starts, or the number of rows when it has no more. Streams
    the token index's sample_id column and stops there, so memory does not grow with the store."""
    path = Path(extract) / Files.TOKENS
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    pf = pq.ParquetFile(path, pre_buffer=False)
    require_columns(path, pf.schema_arrow.names, ("sample_id",))
    seen, start, last = 0, 0, None
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["sample_id"]):
        ids = batch.column(0).to_numpy(zero_copy_only=False)
        new = np.r_[last is None or ids[0] != last, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)
        firsts = np.flatnonzero(new)  # rows of this batch where a sample begins (samples are contiguous)
        if seen + len(firsts) > n_samples:
            return start + int(firsts[n_samples - seen]), n_samples
        seen += len(firsts)
        start += len(ids)
        last = ids[-1] if len(ids) else last
    return start, seen


STAGE = "features"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    encode: Path = cli.arg("encode artifact folder (codes.parquet)")
    extract: Path = cli.arg("extract artifact folder (hidden states)")
    corpus_encode: Path | None = cli.arg("encode artifact of the SAE corpus (features.weights_on: corpus)",
                                         default=None)
    corpus_extract: Path | None = cli.arg("extract artifact of the SAE corpus (features.weights_on: corpus)",
                                          default=None)


def _weights_source(inputs: Inputs, params: FeaturesParams) -> tuple[Path, Path] | None:
    """(encode, extract) whose codes the weights come from, or None when they are the pool's whole table's."""
    if params.weights_on == "corpus":
        if inputs.corpus_encode is None or inputs.corpus_extract is None:
            raise InputError("features.weights_on", "weights_on", "'corpus' needs --corpus-encode and --corpus-extract")
        return Path(inputs.corpus_encode), Path(inputs.corpus_extract)
    return None if params.weights_samples is None else (Path(inputs.encode), Path(inputs.extract))


def run(inputs: Inputs, params: FeaturesParams, out: Path) -> None:
    timer = Timer()
    layer, d_sae = encode_info(inputs.encode)
    store = ActivationStore(inputs.extract)
    cosine_bytes = params.cosine_memory_mb << 20
    with timer("features"):
        df = feature_table(Path(inputs.encode) / Files.CODES, store, layer, d_sae, params.top_k, params.rule,
                           params.min_per_modality, cosine_bytes=cosine_bytes)
    counts = {"layer": layer, "d_sae": d_sae}
    read = {"encode": inputs.encode, "extract": inputs.extract}
    if (source := _weights_source(inputs, params)) is not None:
        # The weight column from another set of codes (the paper: 1,000 samples of the pool); the rest of the
        # table (counts, top tokens, class) stays the pool's, whose store rows the later stages read.
        w_encode, w_extract = source
        w_layer, w_d_sae = encode_info(w_encode)
        if (w_layer, w_d_sae) != (layer, d_sae):
            raise InputError(Path(w_encode) / MANIFEST, "counts", f"layer {w_layer}, d_sae {w_d_sae}: not the pool's "
                             f"SAE (layer {layer}, d_sae {d_sae})")
        n, rows = None, None
        if params.weights_samples is not None:  # codes are in store-row (= sample) order: read only the parts before
            end, n = first_samples_end(w_extract, params.weights_samples)
            rows = [(0, end)]
        with timer("weights"):
            weights = feature_table(Path(w_encode) / Files.CODES, ActivationStore(w_extract), layer, d_sae,
                                    params.top_k, params.rule, params.min_per_modality, row_ranges=rows,
                                    cosine_bytes=cosine_bytes)
        df["weight"] = weights["weight"].to_numpy()
        counts["weights"] = {"on": params.weights_on, "n_samples": n,
                             "n_weighted": int(np.isfinite(df["weight"].to_numpy(np.float64)).sum())}
        if params.weights_on == "corpus":
            read.update(corpus_encode=w_encode, corpus_extract=w_extract)
    with atomic_dir(out) as tmp:
        write_features(df, tmp / Files.FEATURES)
        counts["classes"] = class_counts(df)
        write_manifest(tmp, STAGE, params.as_dict(), read, counts, timer.timings)
