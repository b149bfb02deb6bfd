"""Data scoring: one score per sample per method, HIGHER = kept first (paper Algorithm 1 + ablations).

Methods (registered by name in METHODS; the names of config `score.methods`):

- `cosine`      Algorithm 1: sum of the cross-modal weights of the features that co-occur in the
                sample, i.e. whose activation exceeds `delta` on >= 1 text and >= 1 image token of it.
- `l0`          mean number of active features per token (position 0 excluded).
- `l1`          mean summed activation per token (position 0 excluded).
- `cooc_l0`     number of co-occurring features.
- `random`      seeded uniform scores (depend only on the seed and the set of sample ids).
- `nosae_cosine` cosine of the sample's mean image hidden state vs its mean text hidden state at the
                SAE's layer (the reviewers' no-SAE baseline; raw states from the extract store).
- `model_loss`  minus the model's loss on the preferred response (low loss = good data).

Cross-modal consistency (do the sample's text and image AGREE?), over the sample's concept features
XMc: features whose text side is one word and whose image side is substantial, chosen without labels
from features.parquet, the token ids and the codes (see `ScoringContext.concept_features`):

- `consistency`       text coverage: sum_f min(A_f, B_f) / sum_f A_f, the share of the text side's
                      concept activation that the image side also carries (0 where sum_f A_f = 0).
- `consistency_image` image coverage: sum_f min(A_f, B_f) / sum_f B_f (0 where sum_f B_f = 0).
- `consistency_cos`   cosine of the vectors A and B (0 where either is 0).
  A_f = the feature's largest activation over the sample's text tokens, B_f = over its image tokens,
  each divided by the feature's mean top-K activation in that modality and capped at 1 ("pm",
  `consistency.per_modality_norm`). All three: higher = the image carries what the text says.
- `offdist`           minus how far the sample's image lies outside the scored pool's own range: the
                      largest robust |z| (median / 1.4826 MAD over the samples with image tokens) of
                      three per-sample image statistics: the SAE's relative reconstruction error on its
                      image tokens (needs the SAE; left out without one), their L0 (from the codes), and
                      the distance of their mean unit-norm hidden state from the pool's coordinate-wise
                      median. Higher = more typical. 0 for a sample without image tokens.
- `consistency_gated` `consistency`, minus 2 where the offdist |z| exceeds `consistency.gate_z`:
                      every off-distribution image ranks below every other sample.
- `consistency_binding` text coverage x (1 - D), D = binding deficit: does the image show the concepts
                      of neighbouring words TOGETHER ("red square": one image token both red and
                      square), not just somewhere? A text token is a concept token if some XMc feature
                      reaches `bind_min_text` on it (text side on the feature's own word only,
                      `bind_own_word`; coverage likewise). Per concept token t and image token r,
                      C_t(r) = sum_f a_tf b_rf / sum_f a_tf (how much of t's concept r shows), g_t =
                      max_r C_t(r). Neighbouring concept tokens t, u (<= `bind_max_gap` positions
                      apart) have deficit min(g_t, g_u) - max_r min(C_t(r), C_u(r)): present apart but
                      not together. A token's deficit is its best neighbour's (a caption's "square
                      blue" spans two objects, "red square" binds), D = their mean (`bind_aggregate`);
                      0 without pairs. Higher = clean.
- `consistency_binding_gated` `consistency_binding` minus 2 where the offdist |z| exceeds `gate_z`.

"Text" is modality `text` (special tokens excluded) unless `text_modalities` says otherwise (the
score stage passes ("text", "special") for features built with the release rule, whose "text" is
every non-image token). "Per token" for l0 / l1 counts the sample's tokens at position > 0 of the
modalities that occur in codes.parquet (i.e. the ones the SAE encoded). A sample without any codes
(or without image tokens, ...) gets a defined score of 0, never NaN. Ranks: 1 = best, ordered by
(-score, sample_id), so ties are deterministic.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from mmsae.activations import TOKENS
from mmsae.data.schema import REQUIRED_COLUMNS, validate_frame
from mmsae.errors import InputError
from mmsae.features import FEATURES, Codes, iter_codes, require_columns
from mmsae.sae.encode import CODES

SCORES = "scores.parquet"
SUBSETS = "subsets"
# config score.consistency (schema defaults); see ScoringContext.concept_features
CONSISTENCY_DEFAULTS = {"min_per_modality": 5, "min_selectivity": 0.6, "max_doc_freq": 0.5, "min_balance": 0.25,
                        "per_modality_norm": True, "gate_z": 3.0, "bind_min_text": 0.5, "bind_max_gap": 8,
                        "bind_own_word": True, "bind_aggregate": "mean"}
CONCEPT_COLUMNS = ("feature", "n_text", "n_image", "top_text_rows", "top_text_acts", "top_image_acts", "weight")
# offdist runs the SAE on at most this many image tokens at a time, fewer for a wide SAE, so that its
# dense [rows, d_sae] fp32 codes stay near 64 MB (256 rows at d_sae 65,536)
SAE_MAX_ROWS, SAE_MIN_ROWS, SAE_CODE_ELEMENTS = 4096, 64, 1 << 24
TOKEN_ROWS = 1 << 20  # rows of tokens.parquet per read when the per-row arrays are built


def sae_rows(d_sae: int) -> int:
    """Tokens per SAE call in offdist's pass: a function of the SAE only, so sharded and unsharded
    scoring cut every store block the same way."""
    return min(SAE_MAX_ROWS, max(SAE_MIN_ROWS, SAE_CODE_ELEMENTS // max(d_sae, 1)))


def read_samples(folder: str | os.PathLike) -> pa.Table:
    """{folder}/samples.parquet as an arrow table (its exact schema, for the subsets), validated
    without decoding images."""
    path = Path(folder) / "samples.parquet"
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    table = pq.read_table(path)
    require_columns(path, table.column_names, REQUIRED_COLUMNS)
    meta = table.drop_columns(["image"]).to_pandas()
    validate_frame(meta.assign(image=None), path, check_images=False)
    return table


class ScoringContext:
    """Everything the methods read, with shared passes computed once and cached.

    sample_ids: the scored samples (any order; results are reported in sorted sample_id order).
    codes: codes.parquet path or a frame with its columns. weights: dense cross-modal weight per
    feature (0 = none). store/layer: the ActivationStore and the SAE's layer (nosae_cosine, offdist and
    the per-token denominators). losses: frame with sample_id, loss (model_loss). features: the
    features.parquet frame (CONCEPT_COLUMNS; the consistency methods). sae: the SAE behind the codes
    (offdist's reconstruction error; optional). consistency: the config `score.consistency` slice
    (missing keys take CONSISTENCY_DEFAULTS).
    """

    def __init__(self, sample_ids: Sequence[str], codes: Codes | None = None, weights: np.ndarray | None = None,
                 store=None, layer: int | None = None, tokens: pd.DataFrame | None = None,
                 losses: pd.DataFrame | None = None, delta: float = 0.0, seed: int = 0,
                 text_modalities: Sequence[str] = ("text",), batch_rows: int = 1 << 20,
                 features: pd.DataFrame | None = None, sae=None, consistency: dict | None = None) -> None:
        self.ids = np.array(sorted(str(s) for s in sample_ids), dtype=object)
        if len(set(self.ids)) != len(self.ids):
            raise InputError("samples", "sample_id", "duplicate sample ids")
        self.index = pd.Index(self.ids)
        self.codes, self.weights, self.store, self.layer = codes, weights, store, layer
        self._tokens, self.losses = tokens, losses
        self.delta, self.seed = float(delta), int(seed)
        self.text_modalities = tuple(text_modalities)
        self.batch_rows = batch_rows
        self.features, self.sae = features, sae
        self.consistency = {**CONSISTENCY_DEFAULTS, **(consistency or {})}

    @property
    def n(self) -> int:
        return len(self.ids)

    def need(self, what: str, method: str):
        value = getattr(self, what)
        if value is None:
            raise InputError(method, what, f"method {method!r} needs {what}")
        return value

    @property
    def tokens(self) -> pd.DataFrame:
        """The whole tokens frame (the store's, which keeps it): only for a tokens frame without `row`; the
        methods read per-row arrays (`token_sides`, ...)."""
        if self._tokens is None:
            self._tokens = self.need("store", "tokens").tokens
        return self._tokens

    @cached_property
    def code_stats(self) -> dict[str, np.ndarray]:
        """One streaming pass over the codes: per-sample active counts / sums (position > 0), active
        (token, feature) pairs on image tokens, and the co-occurring (sample, feature) pairs.

        Each code's sample, modality and position are looked up by its `row` in per-row arrays built once
        from tokens.parquet (`token_sides`, `token_counted`): the codes' string columns, one Python string
        per code when read, are not read. Without them (no store, and no tokens frame with `row`: e.g. an
        in-memory codes frame alone), the codes' own sample_id / position / modality columns are read.
        The co-occurring pairs are settled sample by sample (`CoocStream`) when each sample's codes are
        one run of the stream, as encode writes them; otherwise a second pass keeps every pair."""
        return self._code_pass(stream=True) or self._code_pass(stream=False)

    @property
    def _codes_by_row(self) -> bool:
        """Whether code rows can be looked up in tokens.parquet (a store, or a tokens frame with `row`)."""
        if self._tokens is not None:
            return "row" in self._tokens.columns
        return self.store is not None  # tokens.parquet always has `row`

    def _code_pass(self, stream: bool) -> dict[str, np.ndarray] | None:
        """code_stats, or None when `stream` and a sample's codes are not one run."""
        codes = self.need("codes", "codes")
        n = self.n
        by_row = self._codes_by_row
        if by_row:
            ts, counted_at = self.token_sides, self.token_counted
            names = ts["modality_names"]
            # per modality code; the extra last entry answers code -1 (no modality)
            text_of = np.append(np.isin(names, self.text_modalities), False)
            image_of = np.append(names == "image", False)
            seen = np.zeros(len(names) + 1, bool)
            columns = ("row", "feature", "activation")
        else:
            columns = ("sample_id", "position", "modality", "feature", "activation")
        l0, l1, image_l0 = np.zeros(n, np.float64), np.zeros(n, np.float64), np.zeros(n, np.float64)
        text_keys, image_keys, modalities = [], [], set()
        cooc_stream = CoocStream(n) if stream else None
        for b in iter_codes(codes, columns, self.batch_rows):
            if by_row:
                row = self._rows(b)
                mod_all = ts["modality"][row]
                seen[mod_all] = True  # every code counts, filtered or not: the modalities the SAE encoded
                s_all = ts["sample"][row].astype(np.int64)
            else:
                modalities.update(pd.unique(b["modality"]).tolist())
                s_all = self._sample_index(b["sample_id"])
            feat = b["feature"].astype(np.int64)
            keep = (s_all >= 0) & (b["activation"] > self.delta)
            s, feat, act = s_all[keep], feat[keep], b["activation"][keep].astype(np.float64)
            if by_row:
                mod = mod_all[keep]
                counted, is_text, is_image = counted_at[row[keep]], text_of[mod], image_of[mod]
            else:
                mod = b["modality"][keep]
                counted, is_text = b["position"][keep] > 0, np.isin(mod, self.text_modalities)
                is_image = mod == "image"
            l0 += np.bincount(s[counted], minlength=n)
            l1 += np.bincount(s[counted], weights=act[counted], minlength=n)
            image_l0 += np.bincount(s[is_image], minlength=n)
            tk = np.unique(s[is_text].astype(np.int64) << 32 | feat[is_text])
            ik = np.unique(s[is_image].astype(np.int64) << 32 | feat[is_image])
            if cooc_stream is None:
                text_keys.append(tk)
                image_keys.append(ik)
            elif not cooc_stream.add(s_all, tk, ik):
                return None
        if by_row:
            modalities = {str(names[i]) for i in np.flatnonzero(seen[:-1])}
        if cooc_stream is None:
            cat = lambda ks: np.unique(np.concatenate(ks)) if ks else np.zeros(0, np.int64)  # noqa: E731
            cooc = np.intersect1d(cat(text_keys), cat(image_keys), assume_unique=True)
        else:
            cooc = cooc_stream.finish()
        return {
            "l0": l0, "l1": l1, "image_l0": image_l0, "cooc_sample": cooc >> 32, "cooc_feature": cooc & 0xFFFFFFFF,
            "modalities": np.array(sorted(modalities)),
        }

    @cached_property
    def tokens_per_sample(self) -> np.ndarray:
        """Tokens at position > 0 of the encoded modalities, per sample (the l0 / l1 denominator)."""
        if self._codes_by_row:
            ts, counted = self.token_sides, self.token_counted
        else:  # a tokens frame without `row`: its own order (a count does not depend on it)
            tok, names = self.tokens, []
            require_columns("tokens.parquet", list(tok.columns), ("sample_id", "position", "modality"))
            ts = {**self._sides(names)(tok), "modality_names": np.array(names, dtype=str)}
            counted = tok["position"].to_numpy() > 0
        encoded = np.append(np.isin(ts["modality_names"], self.code_stats["modalities"]), False)
        s = ts["sample"][counted & encoded[ts["modality"]]]
        return np.bincount(s[s >= 0], minlength=self.n).astype(np.float64)

    # ---- per-row arrays from tokens.parquet -----------------------------------------------------------
    # Built once and indexed by store row (= codes' `row`): they must grow with the tokens, so they are kept
    # compact: int32 sample + int8 side + int8 modality (token_sides), bool position > 0 (token_counted),
    # int32 token id (token_index): 11 bytes per token in all. With a store, tokens.parquet is read TOKEN_ROWS
    # rows at a time, only the columns needed: the whole tokens frame (about 50 B/token) is never held.
    def _token_batches(self, columns: Sequence[str]) -> tuple[int, Iterator[pd.DataFrame]]:
        """(number of tokens, the tokens in batches with `columns`): the frame given to the context as one
        batch, or else `columns` of the store's tokens.parquet, strings as dictionaries (categoricals: no
        Python string per token)."""
        if self._tokens is not None:
            require_columns("tokens.parquet", list(self._tokens.columns), columns)
            return len(self._tokens), iter([self._tokens])
        path = Path(self.need("store", "tokens").folder) / TOKENS
        pf = pq.ParquetFile(path, read_dictionary=[c for c in columns if c in ("sample_id", "modality")],
                            pre_buffer=False)
        require_columns(path, pf.schema_arrow.names, columns)
        return pf.metadata.num_rows, (b.to_pandas() for b in pf.iter_batches(TOKEN_ROWS, columns=list(columns)))

    def _per_row(self, columns: Sequence[str], convert: Callable[[pd.DataFrame], dict[str, np.ndarray]]
                 ) -> dict[str, np.ndarray]:
        """convert(batch) of each batch of the tokens, put in store-row order (by their `row`)."""
        n, batches = self._token_batches(("row", *columns))
        out: dict[str, np.ndarray] = {}
        seen: np.ndarray | None = None  # rows seen so far, once they are not 0, 1, ... in order
        at = 0
        for tok in batches:
            values, row = convert(tok), tok["row"].to_numpy(np.int64)
            out = out or {k: np.empty(n, v.dtype) for k, v in values.items()}
            if seen is None and np.array_equal(row, np.arange(at, at + len(row))):
                for k, v in values.items():
                    out[k][at : at + len(row)] = v
            else:
                if seen is None:
                    seen = np.arange(n) < at
                if len(row) and (row.min() < 0 or row.max() >= n or seen[row].any() or len(np.unique(row)) < len(row)):
                    raise InputError("tokens.parquet", "row", "rows are not 0..n-1")
                seen[row] = True
                for k, v in values.items():
                    out[k][row] = v
            at += len(row)
        if at != n or (seen is not None and not seen.all()):
            raise InputError("tokens.parquet", "row", "rows are not 0..n-1")
        return out or convert(pd.DataFrame({c: pd.Series([], dtype=np.int64) for c in ("row", *columns)}))

    def _sides(self, names: list[str]) -> Callable[[pd.DataFrame], dict[str, np.ndarray]]:
        """Converter of token batches to `token_sides`' arrays; `names` collects the modalities met, in
        order (a modality's code is its index there)."""
        sample_dtype = np.int32 if self.n < 2**31 else np.int64

        def convert(tok: pd.DataFrame) -> dict[str, np.ndarray]:
            codes, uniques = pd.factorize(tok["modality"])
            local = [str(m) for m in np.asarray(uniques, dtype=object)]
            names.extend(m for m in local if m not in names)
            if len(names) > 127:
                raise InputError("tokens.parquet", "modality", f"{len(names)} distinct modalities")
            to_code = np.array([names.index(m) for m in local] + [-1], np.int8)  # factorize's -1 (none) -> -1
            arr = np.array(names, dtype=str)
            side_of = np.append(np.where(arr == "image", 1, np.where(np.isin(arr, self.text_modalities), 0, -1)), -1)
            modality = to_code[codes]
            return {"sample": self._sample_index(tok["sample_id"]).astype(sample_dtype),
                    "side": side_of[modality].astype(np.int8), "modality": modality}

        return convert

    @cached_property
    def token_sides(self) -> dict[str, np.ndarray]:
        """Per store row: `sample` (int32 index into ids, -1 = not scored), `side` (int8: 0 text, 1 image,
        -1 neither), `modality` (int8 index into `modality_names`, -1 = none)."""
        names: list[str] = []
        arrays = self._per_row(("sample_id", "modality"), self._sides(names))
        return {**arrays, "modality_names": np.array(names, dtype=str)}

    @cached_property
    def token_counted(self) -> np.ndarray:
        """Per store row: position > 0 (the tokens l0 / l1 count)."""
        return self._per_row(("position",), lambda tok: {"counted": tok["position"].to_numpy() > 0})["counted"]

    @cached_property
    def token_index(self) -> dict[str, np.ndarray]:
        """`token_sides` and, per store row, `token_id` (int32)."""
        ids = self._per_row(("token_id",), lambda tok: {"token_id": tok["token_id"].to_numpy(np.int32)})
        return {**self.token_sides, **ids}

    def _sample_index(self, sample_id) -> np.ndarray:
        """Index into ids of each value (-1: not scored), looked up once per distinct value: no per-token
        Python strings, whose memory grew with the data."""
        codes, uniques = pd.factorize(sample_id)
        lookup = self.index.get_indexer(np.asarray(uniques, dtype=object).astype(str))
        return np.where(codes >= 0, lookup[codes], -1) if len(lookup) else np.full(len(codes), -1, np.intp)

    def _rows(self, b: dict[str, np.ndarray]) -> np.ndarray:
        """A codes batch's `row` column, checked against tokens.parquet."""
        row = np.asarray(b["row"], np.int64)
        n_rows = len(self.token_sides["sample"])
        if len(row) and (row.min() < 0 or row.max() >= n_rows):
            raise InputError(CODES, "row", f"row outside the {n_rows} rows of tokens.parquet")
        return row

    def _code_tokens(self, b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample as int64, side, token_id) of a codes batch's rows, from tokens.parquet."""
        ti = self.token_index
        row = self._rows(b)
        return ti["sample"][row].astype(np.int64), ti["side"][row], ti["token_id"][row]

    @cached_property
    def concept_features(self) -> pd.DataFrame:
        """Label-free statistics of every feature of features.parquet and the concept-feature set XMc.

        Columns: feature; top_token = the token id carrying most activation mass among its top-K text
        tokens (-1 if none; ties to the smaller id); norm_text / norm_image = mean of its top-K
        activations in each modality (the "pm" divisors); balance = min / max of the two; doc_freq =
        share of the scored samples whose text holds top_token; selectivity = share of its whole text
        activation mass (over the scored samples' text tokens, one pass over the codes) that lies on
        top_token; selected = XMc: active on >= min_per_modality text and image tokens, cross-modal
        weight > 0, balance >= min_balance, selectivity >= min_selectivity, doc_freq <= max_doc_freq
        (config score.consistency). XMc = cross-modal features whose text side is one word (selectivity),
        not a template word present in most samples (doc_freq), with an image side of comparable size.
        """
        feats = self.need("features", "consistency")
        require_columns(FEATURES, list(feats.columns), CONCEPT_COLUMNS)
        cfg, ti = self.consistency, self.token_index
        feature = feats["feature"].to_numpy(np.int64)
        d = int(feature.max()) + 1 if len(feature) else 0
        lens = feats["top_text_rows"].map(len).to_numpy()
        rows = np.concatenate([np.asarray(r, np.int64) for r in feats["top_text_rows"]] + [np.zeros(0, np.int64)])
        acts = np.concatenate([np.asarray(a, np.float64) for a in feats["top_text_acts"]] + [np.zeros(0)])
        if len(rows) and (rows.min() < 0 or rows.max() >= len(ti["token_id"])):
            raise InputError(FEATURES, "top_text_rows", "row outside tokens.parquet")
        mass = (pd.DataFrame({"f": np.repeat(feature, lens), "t": ti["token_id"][rows], "a": acts})
                .groupby(["f", "t"], as_index=False)["a"].sum()
                .sort_values(["f", "a", "t"], ascending=[True, False, True], kind="stable")
                .drop_duplicates("f"))
        top = np.full(d, -1, np.int64)
        top[mass["f"].to_numpy()] = mass["t"].to_numpy()

        def mean_top(col: str) -> np.ndarray:
            out = np.zeros(d)
            out[feature] = feats[col].map(lambda a: float(np.mean(a)) if len(a) else 0.0).to_numpy(np.float64)
            return out

        norm_t, norm_i = mean_top("top_text_acts"), mean_top("top_image_acts")
        hi = np.maximum(norm_t, norm_i)
        balance = np.divide(np.minimum(norm_t, norm_i), hi, out=np.zeros(d), where=hi > 0)
        is_text = (ti["side"] == 0) & (ti["sample"] >= 0)
        n_ids = int(ti["token_id"].max(initial=0)) + 1
        # (sample, token id) once each
        pairs = np.unique(ti["sample"][is_text].astype(np.int64) * n_ids + ti["token_id"][is_text])
        df_token = np.bincount(pairs % n_ids, minlength=n_ids) / max(self.n, 1)
        doc_freq = np.where(top >= 0, df_token[np.clip(top, 0, None)], 0.0)
        total, on_top = np.zeros(d), np.zeros(d)
        for b in iter_codes(self.need("codes", "consistency"), ("row", "feature", "activation"), self.batch_rows):
            s, side, tid = self._code_tokens(b)
            f = b["feature"].astype(np.int64)
            if len(f) and (f.min() < 0 or f.max() >= d):
                raise InputError(FEATURES, "feature", f"codes use feature {f.max()}, features has {d}")
            act = b["activation"].astype(np.float64)
            m = (act > self.delta) & (s >= 0) & (side == 0)
            f, act, tid = f[m], act[m], tid[m]
            total += np.bincount(f, weights=act, minlength=d)
            on_top += np.bincount(f, weights=act * (tid == top[f]), minlength=d)
        selectivity = np.divide(on_top, total, out=np.zeros(d), where=total > 0)
        n_text, n_image, weight = (np.zeros(d) for _ in range(3))
        n_text[feature] = feats["n_text"].to_numpy(np.float64)
        n_image[feature] = feats["n_image"].to_numpy(np.float64)
        weight[feature] = feats["weight"].astype("float64").fillna(0.0).to_numpy()
        m = int(cfg["min_per_modality"])
        selected = ((n_text >= m) & (n_image >= m) & (weight > 0) & (top >= 0) & (balance >= cfg["min_balance"])
                    & (selectivity >= cfg["min_selectivity"]) & (doc_freq <= cfg["max_doc_freq"]))
        return pd.DataFrame({"feature": np.arange(d), "top_token": top, "norm_text": norm_t, "norm_image": norm_i,
                             "balance": balance, "doc_freq": doc_freq, "selectivity": selectivity,
                             "selected": selected})

    def _sample_groups(self, columns: Sequence[str], stream: bool
                       ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]]:
        """(codes columns, sample, side, token_id) of the codes, batch by batch. With `stream`, each
        group holds whole samples: the rows of the sample a batch ends in are carried to the next one, so
        only one sample's codes are held beyond the batch (codes.parquet is in row order, a sample's tokens
        contiguous). Raises _Unsorted when a sample comes back after the stream moved past it."""
        cols = list(dict.fromkeys(["row", *columns]))
        settled = np.zeros(self.n, bool)
        carry: tuple | None = None
        for b in iter_codes(self.need("codes", "consistency"), cols, self.batch_rows):
            s, side, tid = self._code_tokens(b)
            if not stream:
                yield b, s, side, tid
                continue
            if carry is not None:
                b = {c: np.concatenate([carry[0][c], b[c]]) for c in cols}
                s, side, tid = (np.concatenate([x, y]) for x, y in zip(carry[1:], (s, side, tid), strict=True))
                carry = None
            if not len(s):
                continue
            present = np.unique(s[s >= 0])
            if settled[present].any():
                raise _Unsorted
            settled[present] = True
            last = int(s[-1])
            if last >= 0:  # the open sample may go on in the next batch
                settled[last] = False
                op = s == last
                carry = ({c: v[op] for c, v in b.items()}, s[op], side[op], tid[op])
                done = ~op
                b, s, side, tid = {c: v[done] for c, v in b.items()}, s[done], side[done], tid[done]
            yield b, s, side, tid
        if carry is not None:
            yield carry

    def _selected(self) -> tuple[np.ndarray, np.ndarray]:
        """(XMc feature ids, each feature's index among them or -1)."""
        cf = self.concept_features
        sel = cf["feature"].to_numpy()[cf["selected"].to_numpy()]
        pos = np.full(len(cf), -1, np.int64)
        pos[sel] = np.arange(len(sel))
        return sel, pos

    @cached_property
    def concept_sums(self) -> dict[str, np.ndarray]:
        """Per sample: sum_f A, sum_f B, sum_f min(A, B), A.B, |A|^2, |B|^2 over the XMc features, where
        A / B = per (sample, selected feature) the largest activation over the sample's text / image tokens,
        divided by the feature's norm_text / norm_image and capped at 1 when `per_modality_norm` (absent =
        0). A second pass over the codes, XMc features only, settled sample by sample (`_sample_groups`;
        a whole-pool pass when the codes are out of order)."""
        return _streamed(self._concept_pass)

    def _concept_pass(self, stream: bool) -> dict[str, np.ndarray]:
        cf, n = self.concept_features, self.n
        sel, pos = self._selected()
        n_sel = len(sel)
        norms = {0: cf["norm_text"].to_numpy()[sel], 1: cf["norm_image"].to_numpy()[sel]}
        names = ("text", "image", "min", "dot", "text_sq", "image_sq")
        out = {k: np.zeros(n) for k in names}
        keys: dict[int, list[np.ndarray]] = {0: [], 1: []}
        vals: dict[int, list[np.ndarray]] = {0: [], 1: []}

        def settle() -> None:
            """Add the samples of keys / vals (whole samples: each sample's sums start from 0 and run in
            key order, so the result does not depend on how the samples were grouped)."""
            kv = {}
            for sd in (0, 1):
                k, v = _max_by_key(np.concatenate(keys[sd] + [np.zeros(0, np.int64)]),
                                   np.concatenate(vals[sd] + [np.zeros(0)]))
                if self.consistency["per_modality_norm"] and n_sel:
                    v = np.minimum(v / norms[sd][k % n_sel], 1.0)
                kv[sd] = (k, v)
                keys[sd].clear()
                vals[sd].clear()
            (tk, tv), (ik, iv) = kv[0], kv[1]
            d = max(n_sel, 1)
            common, it, ii = np.intersect1d(tk, ik, assume_unique=True, return_indices=True)
            sc = common // d
            bc = lambda s, w: np.bincount(s, weights=w, minlength=n).astype(np.float64)  # noqa: E731
            for name, part in (("text", bc(tk // d, tv)), ("image", bc(ik // d, iv)),
                               ("min", bc(sc, np.minimum(tv[it], iv[ii]))), ("dot", bc(sc, tv[it] * iv[ii])),
                               ("text_sq", bc(tk // d, tv * tv)), ("image_sq", bc(ik // d, iv * iv))):
                out[name] += part

        for b, s, side, _ in self._sample_groups(("feature", "activation"), stream):
            j = pos[b["feature"].astype(np.int64)]
            act = b["activation"].astype(np.float64)
            m = (act > self.delta) & (s >= 0) & (side >= 0) & (j >= 0)
            for sd in (0, 1):
                k, v = _max_by_key(s[m & (side == sd)] * n_sel + j[m & (side == sd)], act[m & (side == sd)])
                keys[sd].append(k)
                vals[sd].append(v)
            if stream:
                settle()
        settle()
        return out

    @cached_property
    def binding(self) -> dict[str, np.ndarray]:
        """Per sample, over the XMc features (see `consistency_binding`): `coverage` (text coverage, the
        text side counted only on a feature's own word when `bind_own_word`), `deficit` (the binding
        deficit D) and `n_pairs` (neighbouring concept-token pairs checked). One pass over the codes,
        XMc features only, settled sample by sample (`_sample_groups`; a whole-pool pass when the codes are
        out of order); one small dense problem per sample."""
        return _streamed(self._binding_pass)

    def _binding_pass(self, stream: bool) -> dict[str, np.ndarray]:
        cf, cfg = self.concept_features, self.consistency
        sel, pos = self._selected()
        n_sel = len(sel)
        top = cf["top_token"].to_numpy()[sel]
        norms = (cf["norm_text"].to_numpy()[sel], cf["norm_image"].to_numpy()[sel])
        out = {"coverage": np.zeros(self.n), "deficit": np.zeros(self.n), "n_pairs": np.zeros(self.n, np.int64)}
        parts: list[tuple[np.ndarray, ...]] = []
        bar = tqdm(total=self.n, desc="binding", disable=self.n < 10000, file=sys.stderr)

        def settle() -> None:
            """Solve the samples of `parts` (whole samples; each sample's rows keep their stream order)."""
            s, side, key, j, act = (np.concatenate([p[i] for p in parts] + [np.zeros(0, d)])
                                    for i, d in enumerate((np.int64, np.int64, np.int64, np.int64, np.float64)))
            parts.clear()
            if self.consistency["per_modality_norm"] and n_sel:
                act = np.minimum(act / np.where(side == 0, norms[0][j], norms[1][j]), 1.0)
            order = np.lexsort((key, side, s))
            s, side, key, j, act = s[order], side[order], key[order], j[order], act[order]
            starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
            for a, z in zip(starts, np.r_[starts[1:], len(s)] if len(s) else starts, strict=True):
                i = s[a]
                out["coverage"][i], out["deficit"][i], out["n_pairs"][i] = _binding_sample(
                    side[a:z], key[a:z], j[a:z], act[a:z], float(cfg["bind_min_text"]), int(cfg["bind_max_gap"]),
                    str(cfg["bind_aggregate"]))
            bar.update(len(starts))

        for b, s, side, tid in self._sample_groups(("position", "feature", "activation"), stream):
            j = pos[b["feature"].astype(np.int64)]
            act = b["activation"].astype(np.float64)
            m = (act > self.delta) & (s >= 0) & (side >= 0) & (j >= 0)
            if cfg["bind_own_word"]:  # a concept feature's text side counts on its own word only
                m &= (side == 1) | (tid == top[np.clip(j, 0, None)] if n_sel else False)
            # text tokens are keyed by position (their order), image tokens by store row
            key = np.where(side == 0, b["position"].astype(np.int64), b["row"].astype(np.int64))
            parts.append((s[m], side[m], key[m], j[m], act[m]))
            if stream:
                settle()
        settle()
        bar.close()
        return out

    # ---- off-distribution images --------------------------------------------------------------------
    @cached_property
    def image_stats(self) -> dict[str, np.ndarray]:
        """One pass over the store at the SAE's layer, image tokens of the scored samples: per sample the
        token count, the sum of unit-norm hidden states [n, d_model] and (with an SAE) the sum of
        relative reconstruction errors ||x - x_hat||^2 / ||x||^2."""
        store = self.need("store", "offdist")
        layer = self.need("layer", "offdist")
        ti = self.token_sides
        n = self.n
        count = np.zeros(n)
        unit = torch.zeros(n, store.d_model, dtype=torch.float64)
        error = np.zeros(n) if self.sae is not None else None
        sub = sae_rows(int(self.sae.cfg.d_sae)) if self.sae is not None else SAE_MAX_ROWS
        for start, x in store.iter_blocks(layer, store.chunk_tokens * 8):
            s, side = ti["sample"][start : start + len(x)], ti["side"][start : start + len(x)]
            m = (s >= 0) & (side == 1)
            if not m.any():
                continue
            s, rows = s[m].astype(np.int64), np.flatnonzero(m)
            count += np.bincount(s, minlength=n)
            rel = np.zeros(len(rows))
            # sub-batches: the SAE's dense [rows, d_sae] codes of a whole block (up to 65,536 rows) would
            # not fit; each row's values do not depend on the batch, and the sums run in the same order
            for a in range(0, len(rows), sub):
                xt = torch.from_numpy(np.ascontiguousarray(x[rows[a : a + sub]])).float()
                norms = xt.norm(dim=1)
                unit.index_add_(0, torch.from_numpy(s[a : a + sub]), (xt / norms.clamp_min(1e-12)[:, None]).double())
                if error is not None:
                    with torch.no_grad():
                        recon, _ = self.sae(xt.to(self.sae.W_enc.dtype))
                    rel[a : a + sub] = ((recon.float() - xt).pow(2).sum(1) / norms.pow(2).clamp_min(1e-12)).double().numpy()
            if error is not None:
                error += np.bincount(s, weights=rel, minlength=n)
        out = {"count": count, "unit_sum": unit.numpy()}
        if error is not None:
            out["error"] = error
        return out

    @cached_property
    def offdist_z(self) -> np.ndarray:
        """Per sample: the largest robust |z| of its image statistics against the scored pool (see
        `offdist`); 0 for samples without image tokens."""
        st = self.image_stats
        count = st["count"]
        has = count > 0
        c = np.maximum(count, 1.0)
        mean_unit = st["unit_sum"] / c[:, None]
        centre = np.median(mean_unit[has], axis=0) if has.any() else np.zeros(mean_unit.shape[1])
        stats = [self.code_stats["image_l0"] / c, np.linalg.norm(mean_unit - centre, axis=1)]
        if "error" in st:
            stats.append(st["error"] / c)
        z = np.max(np.abs(np.stack([_robust_z(x, has) for x in stats])), axis=0)
        return np.where(has, z, 0.0)


class _Unsorted(Exception):
    """A sample's codes are not one run of the stream: settle nothing early, take the whole-pool pass."""


def _streamed(pass_fn: Callable[..., dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`pass_fn(stream=True)`, settling sample by sample; the whole-pool pass when codes are out of order."""
    try:
        return pass_fn(stream=True)
    except _Unsorted:
        return pass_fn(stream=False)


class CoocStream:
    """The co-occurring (sample, feature) keys (sample << 32 | feature, present on >= 1 text and >= 1 image
    token) of a stream of code batches in which each sample's codes form one run, as in codes.parquet
    (ordered by row; a sample's tokens are contiguous in the store). A sample is settled as soon as the
    stream has moved past it, so besides the result only the open sample's (text and image) keys are
    held, not every active pair of the data. `add` returns False once a settled sample comes back."""

    def __init__(self, n: int) -> None:
        self.settled = np.zeros(n, bool)
        self.open = -1  # the sample the last batch ended in (-1: none, or not scored)
        self.text, self.image = np.zeros(0, np.int64), np.zeros(0, np.int64)  # the open sample's keys
        self.done: list[np.ndarray] = []

    def add(self, sample: np.ndarray, text_keys: np.ndarray, image_keys: np.ndarray) -> bool:
        """One batch: `sample` = every code's sample index in stream order (-1 = not scored, every code,
        filtered or not), text_keys / image_keys = the batch's unique keys. False if a sample comes back."""
        if not len(sample):
            return True
        present = np.unique(sample[sample >= 0])
        if self.settled[present].any():
            return False
        last = int(sample[-1])
        self.settled[present] = True
        if self.open >= 0:
            self.settled[self.open] = True
        if last >= 0:
            self.settled[last] = False
        text, image = np.union1d(self.text, text_keys), np.union1d(self.image, image_keys)
        t_open, i_open = (text >> 32) == last, (image >> 32) == last
        self.done.append(np.intersect1d(text[~t_open], image[~i_open], assume_unique=True))
        self.text, self.image, self.open = text[t_open], image[i_open], last
        return True

    def finish(self) -> np.ndarray:
        """The sorted co-occurring keys (as np.intersect1d of all text and all image keys gives them)."""
        self.done.append(np.intersect1d(self.text, self.image, assume_unique=True))
        self.text, self.image = np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys = np.concatenate(self.done)
        self.done.clear()  # the result is of the size of the data (samples x their features): one copy at a time
        if len(keys) > 1 and (keys[1:] < keys[:-1]).any():  # settled in store order, sorted when ids follow it
            keys.sort()
        return keys


def _max_by_key(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique keys, the largest value per key)."""
    if not len(keys):
        return keys.astype(np.int64), vals.astype(np.float64)
    order = np.lexsort((-vals, keys))
    keys, vals = keys[order], vals[order]
    first = np.r_[True, keys[1:] != keys[:-1]]
    return keys[first].astype(np.int64), vals[first].astype(np.float64)


def _binding_sample(side: np.ndarray, key: np.ndarray, j: np.ndarray, act: np.ndarray, min_text: float,
                    max_gap: int, aggregate: str) -> tuple[float, float, int]:
    """(coverage, deficit D, pairs checked) of one sample from its XMc codes: side 0 = text (key =
    position), 1 = image (key = store row); j = the feature's index among the XMc; act = normalised."""
    feats, jj = np.unique(j, return_inverse=True)
    text = side == 0
    if not text.any():
        return 0.0, 0.0, 0
    tpos, ti = np.unique(key[text], return_inverse=True)
    a = np.zeros((len(tpos), len(feats)))
    np.maximum.at(a, (ti, jj[text]), act[text])
    rows, ri = np.unique(key[~text], return_inverse=True)
    b = np.zeros((len(rows), len(feats)))
    np.maximum.at(b, (ri, jj[~text]), act[~text])
    a_f, b_f = a.max(0), b.max(0) if len(rows) else np.zeros(len(feats))
    coverage = float(np.minimum(a_f, b_f).sum() / a_f.sum()) if a_f.sum() > 0 else 0.0
    concept = a.max(1) >= min_text
    if concept.sum() < 2 or not len(rows):
        return coverage, 0.0, 0
    ac, pc = a[concept], tpos[concept]
    c = ac @ b.T / ac.sum(1, keepdims=True)  # [concept token, image token]: how much of its concept it shows
    g = c.max(1)
    best = np.full(len(pc), np.inf)  # per token: its smallest deficit over its neighbours
    n_pairs = 0
    for k in np.flatnonzero(np.diff(pc) <= max_gap):
        d = min(g[k], g[k + 1]) - float(np.minimum(c[k], c[k + 1]).max())  # present apart, not together
        best[k], best[k + 1] = min(best[k], d), min(best[k + 1], d)
        n_pairs += 1
    paired = np.isfinite(best)
    if not paired.any():
        return coverage, 0.0, 0
    d = best[paired].max() if aggregate == "max" else best[paired].mean()
    return coverage, float(np.clip(d, 0.0, 1.0)), n_pairs


def _robust_z(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD) over x[mask]; 1.2533 x mean absolute deviation when the MAD is 0;
    all 0 when x[mask] is constant (the statistic then flags nothing)."""
    if not mask.any():
        return np.zeros_like(x)
    ref = x[mask]
    med = np.median(ref)
    scale = 1.4826 * np.median(np.abs(ref - med))
    if scale <= 0:
        scale = 1.2533 * np.mean(np.abs(ref - med))
    return (x - med) / scale if scale > 0 else np.zeros_like(x)


METHODS: dict[str, Callable[[ScoringContext], np.ndarray]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[[ScoringContext], np.ndarray]) -> Callable[[ScoringContext], np.ndarray]:
        METHODS[name] = fn
        return fn

    return deco


def _per_token(total: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    return np.divide(total, n_tokens, out=np.zeros_like(total), where=n_tokens > 0)


@register("cosine")
def score_cosine(ctx: ScoringContext) -> np.ndarray:
    w = np.asarray(ctx.need("weights", "cosine"), np.float64)
    st = ctx.code_stats
    feat = st["cooc_feature"]
    if len(feat) and feat.max() >= len(w):
        raise InputError("features.parquet", "feature", f"codes use feature {feat.max()}, features has {len(w)}")
    return np.bincount(st["cooc_sample"], weights=w[feat], minlength=ctx.n).astype(np.float64)


@register("l0")
def score_l0(ctx: ScoringContext) -> np.ndarray:
    return _per_token(ctx.code_stats["l0"], ctx.tokens_per_sample)


@register("l1")
def score_l1(ctx: ScoringContext) -> np.ndarray:
    return _per_token(ctx.code_stats["l1"], ctx.tokens_per_sample)


@register("cooc_l0")
def score_cooc_l0(ctx: ScoringContext) -> np.ndarray:
    return np.bincount(ctx.code_stats["cooc_sample"], minlength=ctx.n).astype(np.float64)


@register("random")
def score_random(ctx: ScoringContext) -> np.ndarray:
    return np.random.default_rng(ctx.seed).random(ctx.n)  # ctx.ids are sorted: order-independent


@register("nosae_cosine")
def score_nosae_cosine(ctx: ScoringContext) -> np.ndarray:
    return _streamed(lambda stream: {"score": _nosae_pass(ctx, stream)})["score"]


def _nosae_pass(ctx: ScoringContext, stream: bool) -> np.ndarray:
    """Per sample: cosine of its summed image and text hidden states. With `stream`, a sample is settled as
    soon as the store blocks move past it (a sample's tokens are contiguous in the store), so only the
    open sample's sums are carried, [2, d_model], not [2, n, d_model]; raises _Unsorted if a settled sample
    comes back. Each sample's sums add the same rows in the same order either way."""
    store = ctx.need("store", "nosae_cosine")
    layer = ctx.need("layer", "nosae_cosine")
    sides = ctx.token_sides
    s_all, side_all = sides["sample"], sides["side"]
    n, block = ctx.n, store.chunk_tokens * 8

    def cosine(sums: torch.Tensor) -> np.ndarray:
        text, image = sums[0].numpy(), sums[1].numpy()
        denom = np.linalg.norm(text, axis=1) * np.linalg.norm(image, axis=1)
        dot = (text * image).sum(1)
        return np.divide(dot, denom, out=np.zeros(len(dot)), where=denom > 0)

    out, done = np.zeros(n), np.zeros(n, bool)
    keys = np.arange(n) if not stream else None
    sums = torch.zeros(2, n, store.d_model, dtype=torch.float64) if not stream else None
    carry: tuple[int, torch.Tensor] | None = None  # the open sample and its sums so far
    for start, x in store.iter_blocks(layer, block):
        s, side = s_all[start : start + len(x)], side_all[start : start + len(x)]
        m = (s >= 0) & (side >= 0)
        if stream:  # this block's samples (and the open one), in a buffer of their own
            present = np.unique(s[m])
            if done[present].any():
                raise _Unsorted
            keys = np.union1d(present, [carry[0]]) if carry is not None else present
            sums = torch.zeros(2, len(keys), store.d_model, dtype=torch.float64)
            if carry is not None:
                sums[:, np.searchsorted(keys, carry[0])] = carry[1]
        if m.any():
            local = np.searchsorted(keys, s[m]) if stream else s[m]
            flat = torch.from_numpy(side[m].astype(np.int64) * len(keys) + local)
            sums.view(2 * len(keys), -1).index_add_(0, flat, torch.from_numpy(x[m]).double())
        if stream:
            last = int(s_all[start + len(x) - 1]) if len(x) else -1
            open_ = keys == last  # the sample the block ends in may go on in the next one
            out[keys[~open_]] = cosine(sums[:, torch.from_numpy(~open_)])
            done[keys[~open_]] = True
            carry = (last, sums[:, torch.from_numpy(open_)][:, 0].clone()) if open_.any() else None
    if not stream:
        return cosine(sums)
    if carry is not None:
        out[carry[0]] = cosine(carry[1][:, None])[0]
    return out


@register("model_loss")
def score_model_loss(ctx: ScoringContext) -> np.ndarray:
    losses = ctx.need("losses", "model_loss")
    require_columns("loss.parquet", list(losses.columns), ("sample_id", "loss"))
    loss = pd.Series(losses["loss"].astype("float64").to_numpy(), index=losses["sample_id"].astype(str).to_numpy())
    missing = ~ctx.index.isin(loss.index)
    if missing.any():
        raise InputError("loss.parquet", "sample_id", f"no loss for sample {ctx.ids[missing][0]!r}")
    score = -loss.reindex(ctx.ids).to_numpy()
    bad = ~np.isfinite(score)  # no response tokens: rank last, not dropped
    if bad.any():
        score[bad] = (score[~bad].min() if (~bad).any() else 0.0) - 1.0
    return score


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


@register("consistency")
def score_consistency(ctx: ScoringContext) -> np.ndarray:
    c = ctx.concept_sums
    return _ratio(c["min"], c["text"])


@register("consistency_image")
def score_consistency_image(ctx: ScoringContext) -> np.ndarray:
    c = ctx.concept_sums
    return _ratio(c["min"], c["image"])


@register("consistency_cos")
def score_consistency_cos(ctx: ScoringContext) -> np.ndarray:
    c = ctx.concept_sums
    return _ratio(c["dot"], np.sqrt(c["text_sq"] * c["image_sq"]))


@register("offdist")
def score_offdist(ctx: ScoringContext) -> np.ndarray:
    return -ctx.offdist_z


@register("consistency_gated")
def score_consistency_gated(ctx: ScoringContext) -> np.ndarray:
    return score_consistency(ctx) - 2.0 * (ctx.offdist_z > float(ctx.consistency["gate_z"]))


@register("consistency_binding")
def score_consistency_binding(ctx: ScoringContext) -> np.ndarray:
    bd = ctx.binding
    return bd["coverage"] * (1.0 - bd["deficit"])


@register("consistency_binding_gated")
def score_consistency_binding_gated(ctx: ScoringContext) -> np.ndarray:
    return score_consistency_binding(ctx) - 2.0 * (ctx.offdist_z > float(ctx.consistency["gate_z"]))


def rank(scores: np.ndarray) -> np.ndarray:
    """1 = best: by (-score, position), positions being sorted sample ids (deterministic ties)."""
    scores = np.asarray(scores, np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    out = np.empty(len(scores), np.int64)
    out[order] = np.arange(1, len(scores) + 1)
    return out


def score_samples(ctx: ScoringContext, methods: Sequence[str]) -> pd.DataFrame:
    """DataFrame(sample_id, score_<m>, rank_<m> for each method), sorted by sample_id."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError("score.methods", "methods", f"unknown method {unknown[0]!r}; known: {sorted(METHODS)}")
    out = {"sample_id": ctx.ids.astype(str)}
    for m in methods:
        s = np.asarray(METHODS[m](ctx), np.float64)
        if s.shape != (ctx.n,) or not np.isfinite(s).all():
            raise RuntimeError(f"method {m!r} returned invalid scores")
        out[f"score_{m}"] = s
        out[f"rank_{m}"] = rank(s)
    return pd.DataFrame(out)


def methods_in(scores: pd.DataFrame) -> list[str]:
    return [c[len("score_"):] for c in scores.columns if c.startswith("score_")]


def subset_size(fraction: float, n: int) -> int:
    """ceil(fraction * n), robust to float noise (0.3 * 10 is 3, not 4)."""
    return min(n, math.ceil(round(fraction * n, 9)))


def subset_name(fraction: float) -> str:
    return f"top{int(round(fraction * 100)):03d}.parquet"


def keep_top(frame: pd.DataFrame, fraction: float, by: str, source: str = "--keep-by") -> pd.DataFrame:
    """The best ceil(fraction * N) rows of a record frame, best first. `by` is 'random:SEED' (seeded
    uniform scores over the sorted sample ids: the `random` method's subset for that seed),
    'PATH:COLUMN' (a parquet with sample_id and a score column, higher = kept first, e.g. IFD's
    ifd.parquet:ifd_score) or 'oracle' (clean samples first, from the `corruption` ground truth).
    Ties go by sample_id, as in `rank`."""
    ids = frame["sample_id"].astype(str).to_numpy()
    order = np.argsort(ids, kind="stable")  # the frame's rows in sorted-id order
    if by == "oracle":  # the ground truth as a selection: clean first (the curve's ceiling on the toy world)
        if "corruption" not in frame.columns:
            raise InputError(source, "oracle", "the data have no 'corruption' ground-truth column")
        scores = frame["corruption"].isna().to_numpy(np.float64)[order]
    elif by.startswith("random:"):
        try:
            seed = int(by[len("random:"):])
        except ValueError:
            raise InputError(source, "random seed", f"not an integer in {by!r}") from None
        scores = np.random.default_rng(seed).random(len(ids))
    else:
        path, sep, column = by.rpartition(":")
        if not sep or not path:
            raise InputError(source, "value", f"expected 'random:SEED' or 'PATH:COLUMN', got {by!r}")
        table = pd.read_parquet(path)
        require_columns(path, list(table.columns), ("sample_id", column))
        lookup = pd.Series(table[column].to_numpy(np.float64), index=table["sample_id"].astype(str))
        if lookup.index.has_duplicates:
            raise InputError(path, "sample_id", "duplicate sample ids")
        scores = lookup.reindex(ids[order]).to_numpy()
        if np.isnan(scores).any():
            missing = ids[order][np.isnan(scores)][0]
            raise InputError(path, column, f"no finite score for sample {missing!r}")
    best = order[np.argsort(rank(scores), kind="stable")]
    return frame.iloc[best[:subset_size(fraction, len(ids))]].reset_index(drop=True)


def write_subsets(samples: pa.Table, scores: pd.DataFrame, methods: Sequence[str], fractions: Sequence[float],
                  out: str | os.PathLike) -> dict[str, dict[str, int]]:
    """subsets/{method}/top{pct:03d}.parquet: the best ceil(f*N) samples by rank, in rank order, in the
    samples' own schema (every column, same types). Returns {method: {file name: n rows}}."""
    out = Path(out)
    pos = pd.Index([str(s) for s in samples.column("sample_id").to_pylist()]).get_indexer(scores["sample_id"])
    if (pos < 0).any():
        raise InputError("scores", "sample_id", "scored sample missing from samples.parquet")
    written: dict[str, dict[str, int]] = {}
    for m in methods:
        order = pos[np.argsort(scores[f"rank_{m}"].to_numpy(), kind="stable")]
        (out / m).mkdir(parents=True, exist_ok=True)
        written[m] = {}
        for f in fractions:
            k = subset_size(f, len(order))
            pq.write_table(samples.take(pa.array(order[:k])), out / m / subset_name(f))
            written[m][subset_name(f)] = k
    return written
