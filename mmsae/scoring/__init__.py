"""Data scoring: one score per sample per method, HIGHER = kept first (paper Algorithm 1 + ablations).

One module per concern:

- `context`  ScoringContext: the scored samples, codes, token I/O, per-row arrays from tokens.parquet, the
             code statistics, and every shared pass cached as a lazy property (computed on first use);
- `concepts` the concept features XMc and the per-sample concept sums (consistency scores);
- `binding`  the binding pass of consistency_binding;
- `offdist`  image statistics, robust z, the offdist |z|;
- `streams`  settling samples one by one as the stream of codes moves past them;
- `methods`  the method registry (METHODS, `register`), every `score_*` method (defined there), `rank`,
             `score_samples`, `methods_in`;
- `subsets`  samples.parquet without images, subset sizes and names, `keep_top`, the id lists
             (`write_subsets`, `read_subset`);
- `shards`   scoring in shards (score.shards), gathered into the same scores as one job;
- `stage`    the score stage (workflow/scripts/score.py): `run`.

The names other modules import are re-exported here.
"""

from mmsae.scoring.concepts import CONCEPT_COLUMNS
from mmsae.scoring.context import ScoringContext
from mmsae.scoring.methods import METHODS, methods_in, rank, register, score_samples
from mmsae.scoring.offdist import sae_rows
from mmsae.scoring.streams import CoocStream
from mmsae.scoring.subsets import (
    SUBSET_COLUMNS,
    SUBSETS,
    keep_top,
    read_samples,
    read_subset,
    subset_name,
    subset_size,
    write_subsets,
)

__all__ = [
    "CONCEPT_COLUMNS", "METHODS", "SUBSET_COLUMNS", "SUBSETS", "CoocStream", "ScoringContext",
    "keep_top", "methods_in", "rank", "read_samples", "read_subset", "register", "sae_rows", "score_samples", "subset_name",
    "subset_size", "write_subsets",
]
