"""Which store rows an SAE trains on and which it is evaluated on: the scope's modalities, and a held-out
share of the SAMPLES chosen by a stable hash of sample_id; the held-out tokens as evaluation blocks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mmsae.activations import ActivationStore
from mmsae.errors import InputError

SCOPES = {"all": ("image", "text"), "text": ("text",)}
EVAL_BLOCK_TOKENS = 4096


def sample_unit(sample_ids: np.ndarray) -> np.ndarray:
    """A stable pseudo-uniform number in [0, 1) per sample id (blake2b; independent of seed and order)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "big") / 2.0**64 for s in sample_ids],
        dtype=np.float64,
    )


@dataclass
class TokenSplit:
    train_rows: np.ndarray  # sorted store rows used for training (in scope, training samples)
    eval_rows: np.ndarray  # sorted store rows of held-out samples (image/text tokens, special if included)
    eval_modality: np.ndarray  # modality of each eval row
    eval_in_scope: np.ndarray  # whether each eval row is of a modality the SAE is trained on
    n_train_samples: int
    n_eval_samples: int
    # training rows per modality (sorted), only when asked for: a balanced / shared modality_mix
    train_by_modality: dict[str, np.ndarray] | None = None


def select_tokens(tokens: pd.DataFrame, scope: str, include_special: bool, eval_fraction: float,
                  by_modality: bool = False) -> TokenSplit:
    """Split the store's token index into training rows and held-out evaluation rows (by sample);
    by_modality: also the training rows of each trained modality."""
    if scope not in SCOPES:
        raise InputError("--params", "scope", f"unknown scope {scope!r} (have {sorted(SCOPES)})")
    modalities = SCOPES[scope] + (("special",) if include_special else ())
    evaluable = ("image", "text") + (("special",) if include_special else ())
    if not tokens["row"].is_monotonic_increasing:
        tokens = tokens.sort_values("row", kind="stable")
    rows = tokens["row"].to_numpy(np.int64)
    # modality and sample_id may be categoricals (ActivationStore.token_columns): compared and factorised
    # on their codes, never expanded to one Python string per token
    in_scope = tokens["modality"].isin(modalities).to_numpy()
    in_eval_mods = tokens["modality"].isin(evaluable).to_numpy()
    sid = tokens["sample_id"]
    if isinstance(sid.dtype, pd.CategoricalDtype):
        inv, uniq = pd.factorize(sid.cat.codes.to_numpy())  # codes in order of first appearance
        uniq = sid.cat.categories.astype(str).to_numpy()[uniq]
    else:
        inv, uniq = pd.factorize(sid.astype(str))  # hash-based: fast on 1e8 tokens
    unit = sample_unit(np.asarray(uniq))
    is_eval = unit < eval_fraction
    if eval_fraction > 0 and not is_eval.any() and len(uniq) >= 2:
        is_eval[np.argmin(unit)] = True  # tiny stores: still hold out one sample
    if is_eval.all() and len(uniq):
        is_eval[np.argmax(unit)] = False
    tok_eval = is_eval[inv]
    train_sel = ~tok_eval & in_scope
    eval_sel = tok_eval & in_eval_mods
    by_mod = None
    if by_modality:
        by_mod = {m: rows[train_sel & (tokens["modality"] == m).to_numpy()] for m in modalities}
    return TokenSplit(
        train_rows=rows[train_sel],
        eval_rows=rows[eval_sel],
        eval_modality=tokens["modality"].iloc[np.flatnonzero(eval_sel)].astype(str).to_numpy(),
        eval_in_scope=in_scope[eval_sel],
        n_train_samples=int((~is_eval).sum()),
        n_eval_samples=int(is_eval.sum()),
        train_by_modality=by_mod,
    )


def eval_blocks(store: ActivationStore, layer: int, split: TokenSplit) -> Iterator[tuple]:
    """The held-out tokens as (activations, modality, in-scope mask) blocks for evaluate_blocks."""
    for i in range(0, len(split.eval_rows), EVAL_BLOCK_TOKENS):
        rows = split.eval_rows[i : i + EVAL_BLOCK_TOKENS]
        yield (torch.from_numpy(store.read_rows(layer, rows)), split.eval_modality[i : i + EVAL_BLOCK_TOKENS],
               split.eval_in_scope[i : i + EVAL_BLOCK_TOKENS])
