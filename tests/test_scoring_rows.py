"""Scoring's per-row lookups: code_stats takes each code's sample, modality and position from tokens.parquet
by its `row` (compact arrays built once), never from the codes' string columns; hand-built cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import consistency
from test_features import make_codes, make_store, write_encode
from test_scoring import BIDS, BTOKENS, ENTRIES, IDS, STATES, TOKENS, WEIGHTS, binding_entries, binding_frame

import mmsae.scoring.context as C
from mmsae.activations import ActivationStore
from mmsae.errors import InputError
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import METHODS, nosae_pass, score_samples
from mmsae.scoring.streams import Unsorted

NUMERIC = ["row", "feature", "activation"]  # the only codes columns code_stats reads with tokens at hand


def store_of(tmp_path, tokens=TOKENS, states=STATES) -> ActivationStore:
    return make_store(tmp_path / "extract", tokens, states)


def test_code_stats_reads_only_row_feature_activation(tmp_path, monkeypatch):
    """codes.parquet on disk: the columns code_stats asks iter_codes for hold no string, and the statistics
    are the hand-computed ones (see test_scoring's case)."""
    asked: list[tuple[str, ...]] = []
    real = C.iter_codes
    monkeypatch.setattr(C, "iter_codes", lambda codes, columns, batch_rows: (asked.append(tuple(columns)),
                                                                             real(codes, columns, batch_rows))[1])
    encode = write_encode(tmp_path / "encode", make_codes(TOKENS, ENTRIES), 0, 3)
    c = ScoringContext(IDS, codes=encode / "codes.parquet", weights=WEIGHTS, store=store_of(tmp_path), batch_rows=4)
    np.testing.assert_allclose(METHODS["cosine"](c), [0.5, 0.75, 0.0, 0.0])
    np.testing.assert_allclose(METHODS["l0"](c), [5 / 4, 4 / 4, 1 / 4, 0.0])
    np.testing.assert_allclose(METHODS["l1"](c), [7.0 / 4, 8.0 / 4, 0.7 / 4, 0.0])
    np.testing.assert_array_equal(c.code_stats["image_l0"], [3, 2, 0, 0])
    assert c.code_stats["modalities"].tolist() == ["image", "special", "text"]
    assert asked and all(set(cols) == set(NUMERIC) for cols in asked), asked


def test_a_codes_frame_without_string_columns_and_the_store_frame_never_loaded(tmp_path, monkeypatch):
    """With a store, only row / feature / activation of the codes are needed, and the store's whole
    tokens frame is never loaded (each per-row array reads its own columns of tokens.parquet)."""
    store = store_of(tmp_path)
    monkeypatch.setattr(ActivationStore, "tokens", property(lambda self: pytest.fail("store.tokens loaded")))
    codes = make_codes(TOKENS, ENTRIES)[NUMERIC]
    c = ScoringContext(IDS, codes=codes, weights=WEIGHTS, store=store, layer=0)
    np.testing.assert_allclose(METHODS["cooc_l0"](c), [2, 2, 0, 0])
    np.testing.assert_allclose(METHODS["l0"](c), [5 / 4, 4 / 4, 1 / 4, 0.0])
    METHODS["nosae_cosine"](c)  # per-row sides from tokens.parquet too
    # without tokens, the codes' own string columns are the only source: named when missing
    with pytest.raises(InputError, match="sample_id"):
        _ = ScoringContext(IDS, codes=codes, weights=WEIGHTS).code_stats


def test_per_row_arrays_are_compact_and_in_store_row_order(tmp_path):
    """11 bytes per token: int32 sample, int8 side, int8 modality, bool position > 0, int32 token id; a
    tokens frame given out of row order is put in row order."""
    tok = TOKENS.assign(row=np.arange(len(TOKENS)), token_id=np.arange(len(TOKENS), dtype=np.int32) + 100)
    shuffled = tok.sample(frac=1.0, random_state=1)
    c = ScoringContext(["s1", "s3", "zz"], tokens=shuffled)
    ti, counted = c.token_index, c.token_counted
    assert {k: v.dtype for k, v in ti.items() if k != "modality_names"} == {
        "sample": np.int32, "side": np.int8, "modality": np.int8, "token_id": np.int32}
    assert counted.dtype == bool
    n = len(TOKENS)
    assert sum(v.nbytes for k, v in ti.items() if k != "modality_names") + counted.nbytes == 11 * n
    # ids sorted: s1 -> 0, s3 -> 1; s0 / s2 not scored (-1)
    np.testing.assert_array_equal(ti["sample"], np.repeat([-1, 0, -1, 1], 5))
    np.testing.assert_array_equal(ti["side"], np.tile([-1, 1, 1, 0, 0], 4))  # special, image, image, text, text
    np.testing.assert_array_equal(ti["modality_names"][ti["modality"]], tok["modality"].to_numpy())
    np.testing.assert_array_equal(ti["token_id"], np.arange(n) + 100)
    np.testing.assert_array_equal(counted, tok["position"].to_numpy() > 0)
    with pytest.raises(InputError, match="rows are not 0..n-1"):
        _ = ScoringContext(IDS, tokens=tok.assign(row=tok["row"] + 1)).token_sides


def test_rows_of_unscored_samples_are_skipped(tmp_path):
    """Scoring s1 and an id without tokens: s0 / s2's codes (rows outside the scored samples) count nowhere,
    and the unknown id scores 0."""
    c = ScoringContext(["s1", "x9"], codes=make_codes(TOKENS, ENTRIES)[NUMERIC], weights=WEIGHTS,
                       store=store_of(tmp_path))
    np.testing.assert_allclose(METHODS["cosine"](c), [0.75, 0.0])
    np.testing.assert_allclose(METHODS["l0"](c), [1.0, 0.0])
    np.testing.assert_allclose(METHODS["l1"](c), [2.0, 0.0])
    np.testing.assert_allclose(c.tokens_per_sample, [4, 0])
    # the modalities are those of every code, scored or not: s0's BOS code keeps `special`
    assert c.code_stats["modalities"].tolist() == ["image", "special", "text"]


def test_a_modality_absent_from_codes_is_not_in_the_denominator(tmp_path):
    """Per sample: BOS, 2 image, 2 text, a closing special at position 5. With no code on a special token,
    l0 / l1 count per image + text token (4); one code on a special token brings the 1 closing special in."""
    tok = pd.DataFrame({"sample_id": np.repeat(["a", "b"], 6), "position": np.tile(np.arange(6), 2),
                        "modality": np.tile(["special", "image", "image", "text", "text", "special"], 2)})
    store = store_of(tmp_path, tok, np.ones((12, 2), np.float32))
    entries = [(1, 0, 1.0), (3, 0, 1.0), (4, 1, 2.0), (7, 2, 1.0)]  # a: image + 2 text, b: image
    c = ScoringContext(["a", "b"], codes=make_codes(tok, entries)[NUMERIC], store=store)
    assert c.code_stats["modalities"].tolist() == ["image", "text"]
    np.testing.assert_allclose(c.tokens_per_sample, [4, 4])
    np.testing.assert_allclose(METHODS["l0"](c), [3 / 4, 1 / 4])
    np.testing.assert_allclose(METHODS["l1"](c), [4 / 4, 1 / 4])
    np.testing.assert_allclose(METHODS["cooc_l0"](c), [1, 0])
    c = ScoringContext(["a", "b"], codes=make_codes(tok, [*entries, (11, 3, 1.0)])[NUMERIC], store=store)
    assert c.code_stats["modalities"].tolist() == ["image", "special", "text"]
    np.testing.assert_allclose(c.tokens_per_sample, [5, 5])  # position 0 never counts
    np.testing.assert_allclose(METHODS["l0"](c), [3 / 5, 2 / 5])


def test_code_rows_outside_tokens_are_refused(tmp_path):
    codes = make_codes(TOKENS, ENTRIES)[NUMERIC]
    codes.loc[0, "row"] = len(TOKENS)
    with pytest.raises(InputError, match="row outside the 20 rows"):
        _ = ScoringContext(IDS, codes=codes, store=store_of(tmp_path)).code_stats


@pytest.mark.parametrize("batch_rows", [1, 7, 10_000])
def test_row_lookup_equals_the_string_columns_on_random_codes(tmp_path, batch_rows):
    """The same statistics, bit for bit, whether a code's sample / modality / position comes from its row or
    from its own columns; in row order (streamed) and shuffled (whole-pool pass)."""
    rng = np.random.default_rng(0)
    ids = [f"q{i:02d}" for i in range(12)]
    tok = pd.DataFrame({"sample_id": np.repeat(ids, 6), "position": np.tile(np.arange(6), 12),
                        "modality": np.tile(["special", "image", "image", "special", "text", "text"], 12)})
    store = store_of(tmp_path, tok, np.ones((len(tok), 2), np.float32))
    entries = [(r, int(f), float(a)) for r in range(len(tok)) for f, a in
               zip(rng.choice(6, 3, replace=False), rng.uniform(0.0, 1.0, 3), strict=True)]
    ordered = make_codes(tok, entries)
    shuffled = ordered.sample(frac=1.0, random_state=0).reset_index(drop=True)
    for codes in (ordered, shuffled):
        scored = ids[1:-1]  # the first and last samples' rows are not scored
        by_string = ScoringContext(scored, codes=codes, delta=0.2, batch_rows=batch_rows,
                                   text_modalities=("text", "special")).code_stats
        by_row = ScoringContext(scored, codes=codes[NUMERIC], store=store, delta=0.2, batch_rows=batch_rows,
                                text_modalities=("text", "special")).code_stats
        assert by_row.keys() == by_string.keys()
        for key in by_row:
            assert np.array_equal(by_row[key], by_string[key]), key
        assert len(by_row["cooc_sample"]) > 10 and by_row["l1"].min() > 0


def test_scores_with_shuffled_codes_equal_scores_with_ordered_codes(tmp_path):
    """Every method on the binding case (concept features, binding pairs, offdist): codes shuffled (every
    pass falls back to its whole-pool form) give the scores of codes in row order. Activations are 0.5 / 1,
    so sums in any order are exact."""
    states = np.tile(np.array([[1.0, 0.0]], np.float32), (len(BTOKENS), 1))
    states[[7 * 5 + 1, 7 * 5 + 2]] = [0.0, 1.0]  # b5's image far from the pool's
    store = make_store(tmp_path / "bextract", BTOKENS, states)
    ordered = make_codes(BTOKENS, binding_entries()).sort_values("row", kind="stable").reset_index(drop=True)
    shuffled = ordered.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert not shuffled["row"].is_monotonic_increasing
    losses = pd.DataFrame({"sample_id": BIDS, "loss": np.linspace(1.0, 2.0, len(BIDS))})

    def scores(codes: pd.DataFrame) -> pd.DataFrame:
        # binding keys text tokens by their position (an int column of the codes)
        ctx = ScoringContext(BIDS, codes=codes[[*NUMERIC, "position"]], weights=np.full(4, 0.5), store=store, layer=0,
                             losses=losses, features=binding_frame(), batch_rows=5,
                             consistency=consistency({"min_per_modality": 1, "max_doc_freq": 1.0}))
        return score_samples(ctx, list(METHODS))

    want, got = scores(ordered), scores(shuffled)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert (want["score_consistency_binding"] != want["score_consistency"]).any()
    assert want["score_cosine"].gt(0).sum() >= 6


def test_token_arrays_read_in_batches_equal_one_read(tmp_path, monkeypatch):
    """tokens.parquet read 4 rows at a time (batches cut inside samples; `special` first met in the 2nd
    batch): the same arrays, codes and modality names as from the whole frame in one batch."""
    tok = pd.DataFrame({"sample_id": np.repeat(["a", "b", "c"], 5), "position": np.tile(np.arange(5), 3),
                        "modality": ["text", "image", "image", "text", "text"] + ["special", "image", "text",
                                                                                  "text", "text"] * 2,
                        "token_id": np.arange(15, dtype=np.int32)})
    store = store_of(tmp_path, tok, np.ones((15, 2), np.float32))
    one = ScoringContext(["a", "c"], tokens=store.tokens)
    monkeypatch.setattr(C, "TOKEN_ROWS", 4)
    batched = ScoringContext(["a", "c"], store=store)
    want, got = one.token_index, batched.token_index
    assert got["modality_names"].tolist() == want["modality_names"].tolist() == ["text", "image", "special"]
    for key in ("sample", "side", "modality", "token_id"):
        assert np.array_equal(got[key], want[key]) and got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got["sample"], np.repeat([0, -1, 1], 5))
    np.testing.assert_array_equal(got["side"][5:10], [-1, 1, 0, 0, 0])
    assert np.array_equal(batched.token_counted, one.token_counted)


@pytest.mark.parametrize("interleaved", [False, True])
def test_nosae_cosine_streamed_equals_the_whole_pool_pass(tmp_path, interleaved):
    """nosae_cosine settles each sample once the store blocks (here 8 rows) move past it: samples of 3 to 11
    tokens straddle blocks, one is not scored, one has no image token. Bit-identical to the whole-pool pass
    and equal to a brute-force cosine; with interleaved samples the stream gives up (same scores)."""
    rng = np.random.default_rng(0)
    lengths = [3, 11, 5, 9, 4, 7, 6]
    ids = [f"n{i}" for i in range(len(lengths))]
    sample = np.repeat(ids, lengths)
    modality = np.concatenate([["special", *(["image"] * (k // 2)), *(["text"] * (k - 1 - k // 2))] for k in lengths])
    modality[sample == "n4"] = np.where(modality[sample == "n4"] == "image", "text", modality[sample == "n4"])
    if interleaved:  # n1's tokens alternate with n3's
        a, b = np.flatnonzero(sample == "n1")[:9], np.flatnonzero(sample == "n3")
        sample[a[1::2]], sample[b[:4]] = "n3", "n1"
    tok = pd.DataFrame({"sample_id": sample, "position": 0, "modality": modality})
    states = rng.standard_normal((len(tok), 3)).astype(np.float32)
    store = make_store(tmp_path / "extract", tok, states, chunk_tokens=1)
    scored = [i for i in ids if i != "n5"]
    ctx = ScoringContext(scored, store=store, layer=0)
    if interleaved:
        with pytest.raises(Unsorted):
            nosae_pass(ctx, stream=True)
    else:
        assert np.array_equal(nosae_pass(ctx, stream=True), nosae_pass(ctx, stream=False))
    got = METHODS["nosae_cosine"](ctx)
    assert np.array_equal(got, nosae_pass(ctx, stream=False))
    for i, sid in enumerate(scored):
        text = states[(sample == sid) & (modality == "text")].astype(np.float64).sum(0)
        image = states[(sample == sid) & (modality == "image")].astype(np.float64).sum(0)
        want = text @ image / (np.linalg.norm(text) * np.linalg.norm(image)) if image.any() else 0.0
        assert got[i] == pytest.approx(want, rel=1e-12, abs=1e-15), sid
    assert got[scored.index("n4")] == 0.0 and np.count_nonzero(got) == len(scored) - 1
