"""Stage evaluate_sae: splice each SAE into the model (and its base LLM) and measure what it costs.

For every SAE given with --sae NAME=FOLDER (train_sae artifacts; NAME = the scope, `all` = SAE-V,
`text` = text-only SAE), at the SAE's hook layer:

  ce.parquet              model, sae, splice (all|image|text), n_targets, ce_clean, ce_sae, ce_zero,
                          ce_score, kl_sae, kl_zero, kl_score
  reconstruction.parquet  model, sae, modality (all|image|text), n_tokens, l0, mse, centred_fvu, dead_fraction
  summary.parquet         one row per (model, sae): the paper's Table 1 shape
  manifest.json

`model` is `mllm` (--model) and `base` (--base-model, text-only: the transfer test). The metrics
themselves: mmsae.sae.splice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmsae import cli
from mmsae.activations.extraction import LazyRecords
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.data.schema import read_frame, validate_frame
from mmsae.errors import InputError
from mmsae.models import load_model_with
from mmsae.params import EvaluateSaeParams
from mmsae.sae.io import check_d_in, load_sae, read_cfg
from mmsae.sae.model import SAE
from mmsae.sae.splice import evaluate_splice, summary_table

STAGE = "evaluate_sae"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs(cli.ModelInputs):
    base_model: str | None = cli.arg("the text-only base LLM (transfer test); omit to skip", default=None)
    sae: tuple[str, ...] = cli.arg("an SAE to evaluate (train_sae artifact folder or SAELens folder); repeatable",
                                   action="append", metavar="NAME=FOLDER")


def load_saes(specs: tuple[str, ...]) -> tuple[dict[str, SAE], int]:
    """({name: SAE} of the NAME=FOLDER specs, the hook layer they share); InputError otherwise."""
    saes, layers = {}, set()
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            raise InputError("--sae", "sae", f"expected NAME=FOLDER, got {spec!r}")
        saes[name] = load_sae(folder)
        layers.add(int(read_cfg(folder).metadata["hook_layer"]))
    if len(layers) != 1:
        raise InputError("--sae", "hook_layer", f"SAEs hook different layers {sorted(layers)}")
    return saes, layers.pop()


def read_head(path: Path, n: int) -> pd.DataFrame:
    """The first n rows of samples.parquet (every row with n = 0), read batch by batch: the image bytes of
    the rows after them are never read."""
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    if not n:
        return read_frame(path, check_images=False)
    try:
        pf = pq.ParquetFile(path)
        batches, got = [], 0
        for batch in pf.iter_batches(batch_size=min(n, 1024)):
            batches.append(batch.slice(0, n - got))
            got += len(batches[-1])
            if got >= n:
                break
        df = pa.Table.from_batches(batches, schema=pf.schema_arrow).to_pandas()
    except Exception as exc:
        raise InputError(path, "file", f"not a readable parquet file ({exc.__class__.__name__})") from exc
    validate_frame(df, path, check_images=False)
    df["sample_id"] = df["sample_id"].astype(str)
    return df


def run(inputs: Inputs, params: EvaluateSaeParams, out: Path) -> None:
    timer = Timer()
    samples = Path(inputs.samples) / Files.SAMPLES
    with timer("read"):  # trimmed to n_samples first; images decoded batch by batch (LazyRecords)
        records = LazyRecords(read_head(samples, params.n_samples), samples)
    with timer("load_model"):
        mllm = load_model_with(inputs.model, inputs.model_params)
    saes, layer = load_saes(inputs.sae)
    ces, recons = [], []
    targets = [("mllm", inputs.model)] + ([("base", inputs.base_model)] if inputs.base_model else [])
    for kind, path in targets:
        if kind == "mllm":
            adapter = mllm
        else:
            with timer(f"load_{kind}"):
                adapter = load_model_with(path, inputs.model_params)
        for name, sae in saes.items():
            check_d_in(sae, adapter.d_model, path)
            saes[name] = sae.to(adapter.device)
        with timer(f"evaluate_{kind}"):
            ce, recon = evaluate_splice(adapter, saes, layer, records, params.batch_size,
                                        include_response=params.include_response, targets=params.targets)
        ces.append(ce.assign(model=kind))
        recons.append(recon.assign(model=kind))
    ce, recon = pd.concat(ces, ignore_index=True), pd.concat(recons, ignore_index=True)
    ce, recon = ce[["model", *ce.columns[:-1]]], recon[["model", *recon.columns[:-1]]]
    summary = summary_table(ce, recon)
    for row in summary.itertuples():
        cli.log.info("%s", row)
    with atomic_dir(out) as tmp:
        ce.to_parquet(tmp / Files.CE, index=False)
        recon.to_parquet(tmp / Files.RECONSTRUCTION, index=False)
        summary.to_parquet(tmp / Files.SUMMARY, index=False)
        manifest_inputs: dict[str, Any] = {"samples": inputs.samples, "model": inputs.model,
                                           **{f"sae_{k}": v for k, v in (s.partition("=")[::2] for s in inputs.sae)}}
        if inputs.base_model:
            manifest_inputs["base_model"] = inputs.base_model
        counts = {"layer": layer, "n_samples": len(records), "saes": sorted(saes)}
        write_manifest(tmp, STAGE, cli.manifest_params(params, inputs.model_params), manifest_inputs,
                       counts, timer.timings)
