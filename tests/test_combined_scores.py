"""The combined SAE + loss selections (mmsae.scoring.methods: sae_loss_rank, sae_loss_gate) on hand-built
cases: the rank normalisation and its ties, the rank aggregation's order, the gate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mmsae.errors import InputError
from mmsae.params import ScoreParams
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import (
    METHODS,
    PARTS,
    consistency_gate_fails,
    gate_then,
    rank,
    rank_mean,
    rank_unit,
    score_samples,
    uses_sae,
    with_parts,
)
from mmsae.scoring.stage import needs_concepts


def test_rank_unit_maps_to_0_1_with_average_ties():
    np.testing.assert_allclose(rank_unit([3.0, 1.0, 2.0]), [1.0, 0.0, 0.5])
    # ties share the mean of their ranks (ranks 2 and 3 of 4 -> 2.5 -> (2.5 - 1) / 3)
    np.testing.assert_allclose(rank_unit([0.0, 5.0, 5.0, 9.0]), [0.0, 0.5, 0.5, 1.0])
    # scale-free: any increasing transform gives the same ranks
    x = np.array([0.3, -2.0, 7.0, 1.5])
    np.testing.assert_allclose(rank_unit(x), rank_unit(np.exp(x) * 100))
    np.testing.assert_allclose(rank_unit([4.0]), [0.5])
    assert rank_unit(np.array([])).shape == (0,)


def test_rank_mean_orders_by_both_parts():
    sae = np.array([0.9, 0.1, 0.5, 0.8])       # sample 0 best by the SAE, 1 worst
    loss = np.array([-3.0, -0.1, -0.2, -0.5])  # sample 0 worst by the loss, 1 best
    agg = rank_mean(sae, loss)
    # ranks: sae [1, 0, 1/3, 2/3], loss [0, 1, 2/3, 1/3] -> every sample 0.5: a full tie ...
    np.testing.assert_allclose(agg, [0.5, 0.5, 0.5, 0.5])
    # ... broken by sample id (rank's deterministic order), never by the input's scale
    assert rank(agg).tolist() == [1, 2, 3, 4]
    # a sample good on both parts beats one that is best on only one
    agg = rank_mean(np.array([0.9, 1.0, 0.0]), np.array([-0.1, -5.0, -0.2]))
    assert rank(agg).tolist() == [1, 2, 3]  # sample 0 (2nd, 1st) before 1 (1st, 3rd) before 2 (3rd, 2nd)


def test_gate_ranks_every_failing_sample_last_then_by_loss():
    loss_score = np.array([-0.1, -0.2, -0.3, -0.4, -0.5])  # minus the loss: sample 0 best
    fail = np.array([True, False, True, False, False])
    # passing samples 1, 3, 4 by loss, then failing 0, 2 by loss
    assert np.argsort(rank(gate_then(loss_score, fail))).tolist() == [1, 3, 4, 0, 2]
    assert rank(gate_then(loss_score, np.zeros(5, bool))).tolist() == [1, 2, 3, 4, 5]


def test_gate_fails_on_offdist_or_low_consistency():
    cons = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    z = np.array([0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    # the lowest quarter by consistency (below the 0.25 quantile, 0.275) and the off-distribution image
    assert consistency_gate_fails(cons, z, 3.0, 0.25).tolist() == [True, True, False, False, True, False, False, False]
    assert consistency_gate_fails(cons, z, 3.0, 0.0).tolist() == [False] * 4 + [True] + [False] * 3
    assert consistency_gate_fails(cons, z, 6.0, 0.5).tolist() == [True] * 4 + [False] * 4
    # equal consistencies: none is below the quantile, so ties never split the gate arbitrarily
    assert not consistency_gate_fails(np.full(4, 0.5), np.zeros(4), 3.0, 0.5).any()


class _Fixed(ScoringContext):
    """A context whose consistency sums and offdist z are given (the combined methods read only those and the
    losses)."""

    def __init__(self, ids, losses, text, minimum, z, quantile):
        cfg = ScoreParams.load({"consistency": {"loss_gate_quantile": quantile}}).consistency
        super().__init__(ids, losses=losses, consistency=cfg)
        self._sums = {"text": np.asarray(text, float), "min": np.asarray(minimum, float)}
        self._z = np.asarray(z, float)

    @property
    def concept_sums(self):
        return self._sums

    @property
    def offdist_z(self):
        return self._z


def test_registered_combined_methods_on_a_hand_built_pool():
    ids = ["a", "b", "c", "d"]
    losses = pd.DataFrame({"sample_id": ids, "loss": [0.1, 0.2, 0.3, 0.4]})  # a lowest loss
    ctx = _Fixed(ids, losses, text=[1, 1, 1, 1], minimum=[0.2, 0.9, 0.8, 0.7], z=[0, 0, 9, 0], quantile=0.25)
    df = score_samples(ctx, ["consistency_gated", "model_loss", "sae_loss_rank", "sae_loss_gate"])
    assert df["rank_model_loss"].tolist() == [1, 2, 3, 4]
    assert df["rank_consistency_gated"].tolist() == [3, 1, 4, 2]  # c off-distribution: last
    # rank mean (consistency_gated, model_loss): a (1/3 + 1) / 2, b (1 + 2/3) / 2, c (0 + 1/3) / 2, d (2/3 + 0) / 2
    np.testing.assert_allclose(df["score_sae_loss_rank"], [2 / 3, 5 / 6, 1 / 6, 1 / 3])
    assert df["rank_sae_loss_rank"].tolist() == [2, 1, 4, 3]
    # gate: a fails on consistency (lowest quarter), c on its image; b, d by loss, then a, c by loss
    assert df["rank_sae_loss_gate"].tolist() == [3, 1, 4, 2]
    # with the image gate only, a passes and leads by its loss
    ctx0 = _Fixed(ids, losses, text=[1, 1, 1, 1], minimum=[0.2, 0.9, 0.8, 0.7], z=[0, 0, 9, 0], quantile=0.0)
    assert score_samples(ctx0, ["sae_loss_gate"])["rank_sae_loss_gate"].tolist() == [1, 2, 4, 3]


def test_combined_methods_declare_their_parts():
    assert set(PARTS) == {"sae_loss_rank", "sae_loss_gate"} and set(PARTS) <= set(METHODS)
    assert with_parts(["sae_loss_gate"]) == {"sae_loss_gate", "consistency_gated", "model_loss"}
    assert needs_concepts(["sae_loss_rank"]) and not needs_concepts(["model_loss", "cosine"])
    assert uses_sae("sae_loss_rank") and uses_sae("consistency_gated") and uses_sae("cosine")
    assert not any(uses_sae(m) for m in ("model_loss", "random", "nosae_cosine", "ifd", "oracle", "all"))


def test_combined_method_without_losses_names_what_is_missing():
    ctx = _Fixed(["a", "b"], None, text=[1, 1], minimum=[1, 1], z=[0, 0], quantile=0.0)
    with pytest.raises(InputError, match="needs losses"):
        score_samples(ctx, ["sae_loss_rank"])
