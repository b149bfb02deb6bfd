"""The model's mean next-token loss on each sample's preferred response (a no-SAE reference score).

Stage model_loss (`run`): reads SAMPLE_DIR/samples.parquet (mmsae record schema) and writes into --out:

  loss.parquet    sample_id, loss (mean NLL in nats over the response tokens, EOS included), n_tokens
  manifest.json   params (model_loss slice + model slice), inputs, counts, timings

Example:
  python workflow/scripts/model_loss.py --samples results/demo/sample-1234abcd --model path/to/model \\
      --model-params '{}' --params '{"batch_size": 8}' --out results/demo/model_loss-x
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.data.schema import Record
from mmsae.models.adapters import ModelAdapter
from mmsae.params import ModelLossParams


def response_loss(adapter: ModelAdapter, records: Sequence[Record], batch_size: int,
                  progress: bool = True) -> pd.DataFrame:
    """Mean next-token NLL (nats) of each record's preferred response (its EOS included), given the
    image and the question in the shared prompt format.

    Columns: sample_id, loss, n_tokens (response tokens scored; loss is NaN when 0). Only the response
    positions go through the LM head, so memory does not scale with the vocabulary x sequence length.
    """
    from tqdm import tqdm

    ids, losses, n_tokens = [], [], []
    bar = tqdm(total=len(records), unit="sample", desc="model_loss", disable=not progress, file=sys.stderr,
               mininterval=1.0)
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            inputs, meta = adapter.build_batch(batch, include_response=True)
            target = torch.from_numpy(meta.is_response & meta.attention_mask)
            target[:, 0] = False  # nothing predicts the first token
            rows, cols = target.nonzero(as_tuple=True)
            hidden = adapter.final_hidden(inputs)
            device = hidden.device
            logits = adapter.lm_head(hidden[rows.to(device), (cols - 1).to(device)]).float()
            labels = inputs["input_ids"][rows.to(device), cols.to(device)]
            nll = F.cross_entropy(logits, labels, reduction="none").cpu().double()
            sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, nll)
            counts = torch.bincount(rows, minlength=len(batch))
            for b, record in enumerate(batch):
                n = int(counts[b])
                ids.append(record.sample_id)
                n_tokens.append(n)
                losses.append(float(sums[b] / n) if n else float("nan"))
            bar.update(len(batch))
    bar.close()
    return pd.DataFrame({"sample_id": pd.Series(ids, dtype=str), "loss": np.asarray(losses, dtype=np.float64),
                         "n_tokens": np.asarray(n_tokens, dtype=np.int64)})


STAGE = "model_loss"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs(cli.ModelInputs):
    """--samples, --model, --model-params (cli.ModelInputs)."""


def run(inputs: Inputs, params: ModelLossParams, out: Path) -> None:
    timer = Timer()
    records, adapter = cli.load_records_and_model(inputs, timer)
    with timer("loss"):
        df = response_loss(adapter, records, params.batch_size)
    with atomic_dir(out) as tmp:
        df.to_parquet(tmp / Files.LOSS, index=False)
        counts = {"n_samples": len(df), "n_tokens": int(df["n_tokens"].sum()),
                  "mean_loss": float(df["loss"].mean()), "model_family": adapter.family}
        write_manifest(tmp, STAGE, cli.manifest_params(params, inputs.model_params),
                       inputs={"samples": inputs.samples, "model": inputs.model}, counts=counts, timings=timer.timings)
