"""The scoring context: the scored samples, their codes and tokens, and the shared passes, computed once.

`ScoringContext` holds what the methods read (sample ids, codes, weights, store, losses, features, SAE,
config) and caches every shared pass as a lazy property, computed on first use only: the per-row arrays
from tokens.parquet and the code statistics here; the concept features and sums (mmsae.scoring.concepts),
the binding pass (mmsae.scoring.binding) and the off-distribution statistics (mmsae.scoring.offdist)
in the modules of their own, called from the properties below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mmsae.artifacts import Files
from mmsae.errors import InputError
from mmsae.features import Codes, iter_codes, require_columns
from mmsae.params import ScoreConsistencyParams, ScoreParams
from mmsae.scoring import binding, concepts, offdist
from mmsae.scoring.streams import CoocStream

TOKEN_ROWS = 1 << 20  # rows of tokens.parquet per read when the per-row arrays are built


class ScoringContext:
    """Everything the methods read, with shared passes computed once and cached.

    sample_ids: the scored samples (any order; results are reported in sorted sample_id order).
    codes: codes.parquet path or a frame with its columns. weights: dense cross-modal weight per
    feature (0 = none). store/layer: the ActivationStore and the SAE's layer (nosae_cosine, offdist and
    the per-token denominators). losses: frame with sample_id, loss (model_loss). features: the
    features.parquet frame (CONCEPT_COLUMNS; the consistency methods). sae: the SAE behind the codes
    (offdist's reconstruction error; optional). consistency: the config `score.consistency` slice
    (None: the schema's defaults; see mmsae.scoring.concepts.concept_features).
    """

    def __init__(self, sample_ids: Sequence[str], codes: Codes | None = None, weights: np.ndarray | None = None,
                 store=None, layer: int | None = None, tokens: pd.DataFrame | None = None,
                 losses: pd.DataFrame | None = None, delta: float = 0.0, seed: int = 0,
                 text_modalities: Sequence[str] = ("text",), batch_rows: int = 1 << 20,
                 features: pd.DataFrame | None = None, sae=None, consistency: ScoreConsistencyParams | None = None) -> None:
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
        self.consistency = consistency or ScoreParams.load({}).consistency

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
            require_columns(Files.TOKENS, list(tok.columns), ("sample_id", "position", "modality"))
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
            require_columns(Files.TOKENS, list(self._tokens.columns), columns)
            return len(self._tokens), iter([self._tokens])
        path = Path(self.need("store", "tokens").folder) / Files.TOKENS
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
                    raise InputError(Files.TOKENS, "row", "rows are not 0..n-1")
                seen[row] = True
                for k, v in values.items():
                    out[k][row] = v
            at += len(row)
        if at != n or (seen is not None and not seen.all()):
            raise InputError(Files.TOKENS, "row", "rows are not 0..n-1")
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
                raise InputError(Files.TOKENS, "modality", f"{len(names)} distinct modalities")
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
            raise InputError(Files.CODES, "row", f"row outside the {n_rows} rows of tokens.parquet")
        return row

    def code_tokens(self, b: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample as int64, side, token_id) of a codes batch's rows, from tokens.parquet."""
        ti = self.token_index
        row = self._rows(b)
        return ti["sample"][row].astype(np.int64), ti["side"][row], ti["token_id"][row]


    # ---- the passes of the other modules, cached here ------------------------------------------------
    @cached_property
    def concept_features(self) -> pd.DataFrame:
        """Label-free statistics of every feature and the concept-feature set XMc (see
        `mmsae.scoring.concepts.concept_features`)."""
        return concepts.concept_features(self)

    @cached_property
    def concept_sums(self) -> dict[str, np.ndarray]:
        """Per sample: the sums of the XMc activations behind the consistency scores (see
        `mmsae.scoring.concepts.concept_sums`)."""
        return concepts.concept_sums(self)

    @cached_property
    def binding(self) -> dict[str, np.ndarray]:
        """Per sample: `coverage`, `deficit` and `n_pairs` of consistency_binding (see
        `mmsae.scoring.binding.binding_stats`)."""
        return binding.binding_stats(self)

    @cached_property
    def image_stats(self) -> dict[str, np.ndarray]:
        """Per sample: image-token count, sum of unit-norm hidden states and (with an SAE) reconstruction
        error (see `mmsae.scoring.offdist.image_stats`)."""
        return offdist.image_stats(self)

    @cached_property
    def offdist_z(self) -> np.ndarray:
        """Per sample: the largest robust |z| of its image statistics against the scored pool (see
        `mmsae.scoring.offdist.offdist_z`)."""
        return offdist.offdist_z(self)
