"""Stage attribute: activation x gradient attribution of logit(A) - logit(B) to (token, SAE feature).

Prompts: --image + --question, or --samples with --sample-id (repeatable) or the config's task /
n_samples selection. A / B: --answer-a / --answer-b (or the config's), else each sample's preferred
and other response. Writes attribution.parquet (top pairs: sample_id, rank, position, feature,
activation, gradient, attribution, token, modality, patch, ablation_effect), tokens.parquet (per
token: attr_features, attr_error, attr_total), plots/*.png (patch heat map + text-token bars).

See mmsae.interpret.attribution for the method.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.interpret.attribution import attribute, plot_attribution, plot_name
from mmsae.interpret.common import PromptInputs, load_model_and_sae, prompt_records
from mmsae.interpret.steering import sae_layer
from mmsae.params import AttributeParams

log = logging.getLogger("mmsae.attribution")

STAGE = "attribute"
PLOTS = "plots"  # one PNG per prompt


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs(PromptInputs):
    answer_a: str | None = cli.arg("answer A (overrides the config)", default=None)
    answer_b: str | None = cli.arg("answer B (overrides the config)", default=None)


def run(inputs: Inputs, params: AttributeParams, out: Path) -> None:
    timer = Timer()
    records = prompt_records(inputs, params.sample_ids, params.task, params.n_samples)
    adapter, sae = load_model_and_sae(inputs, timer)
    answer_a, answer_b = inputs.answer_a or params.answer_a, inputs.answer_b or params.answer_b
    results = []
    with timer("attribute"):
        for i, record in enumerate(records):
            r = attribute(adapter, sae, record, answer_a, answer_b, params.positions, params.top_k,
                          params.verify)
            results.append(r)
            top = r.pairs.head(5)
            print(f"[{r.sample_id}] {record.question}  logit({r.answer_a}) - logit({r.answer_b}) = {r.metric:.4f}")
            for p in top.itertuples(index=False):
                print(f"  pos {p.position:3d} {p.token!s:>10} feature {p.feature:6d}  act {p.activation:8.3f}"
                      f"  attr {p.attribution:+9.4f}  ablation {p.ablation_effect:+9.4f}")
            log.info("attribute %d/%d %s", i + 1, len(records), r.sample_id)
    pairs = pd.concat([r.pairs for r in results], ignore_index=True)
    tokens = pd.concat([r.tokens for r in results], ignore_index=True)
    verified = pairs.dropna(subset=["ablation_effect"])
    corr = (float(np.corrcoef(verified["attribution"], verified["ablation_effect"])[0, 1])
            if len(verified) > 2 else None)
    with atomic_dir(out) as tmp:
        pairs.to_parquet(tmp / Files.ATTRIBUTION, index=False)
        tokens.to_parquet(tmp / Files.TOKENS, index=False)
        (tmp / PLOTS).mkdir()
        for i, r in enumerate(results):
            plot_attribution(r, tmp / PLOTS / plot_name(r.sample_id, i))
        per_sample = [{"sample_id": r.sample_id, "answer_a": r.answer_a, "answer_b": r.answer_b,
                       "metric": r.metric, "metric_spliced": r.extras["metric_spliced"],
                       "attr_total": float(r.tokens["attr_total"].sum())} for r in results]
        write_manifest(tmp, STAGE, params.as_dict(),
                       {k: v for k, v in {"model": inputs.model, "sae": inputs.sae, "samples": inputs.samples,
                                          "image": inputs.image}.items() if v},
                       {"n_prompts": len(results), "layer": sae_layer(sae), "samples": per_sample,
                        "n_verified": len(verified), "verify_corr": corr}, timer.timings)


def main(argv: list[str] | None = None) -> int:
    """The console script mmsae-attribute."""
    return cli.stage_main(sys.modules[__name__], argv)
