"""Stage sample: a deterministic, seeded sample of N records from the input data set. Reads the
data set in its native format (--data-params: the `data` config slice), validates the record schema
(missing column, empty text, undecodable image -> one-line error naming file and field, or with
on_bad_row=skip: dropped and listed in bad_rows.parquet) and writes samples.parquet in the record
schema, plus manifest.json.

See mmsae.data.readers for the formats it reads and mmsae.data.schema for the record schema.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.data.readers import read_dataset
from mmsae.params import DataParams, SampleParams

log = logging.getLogger("mmsae")


def sample_frame(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """N rows drawn without replacement by a seeded permutation, kept in their original order.

    The result depends only on (the data set, n, seed): sorting by sample_id first makes it
    independent of the row order the file happens to have.
    """
    df = df.sort_values("sample_id", kind="stable").reset_index(drop=True)
    if n is None or n >= len(df):
        return df
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(df), size=n, replace=False))
    return df.iloc[idx].reset_index(drop=True)


STAGE = "sample"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    data: Path = cli.arg("input data set (a file in data.format)")
    data_params: DataParams = cli.arg("the 'data' config slice (format, image_root, on_bad_row)",
                                      default_factory=lambda: DataParams.load({}))


SAMPLE_ROW_GROUP = 64  # rows per row group of samples.parquet (~64 encoded images)

def run(inputs: Inputs, params: SampleParams, out: Path) -> None:
    timer = Timer()
    data = inputs.data_params
    with timer("read"):
        df, bad = read_dataset(inputs.data, data.format, data.image_root, data.on_bad_row, limits=data)
    for row in bad.itertuples():
        log.warning("unreadable row %s: field %s: %s", row.sample_id, row.field, row.message)
    with timer("sample"):
        samples = sample_frame(df, params.n, params.seed)
    with atomic_dir(out) as tmp:
        # small row groups: a reader holds one group's image bytes at a time (mmsae.data.lazy), not the file's
        samples.to_parquet(tmp / Files.SAMPLES, index=False, row_group_size=SAMPLE_ROW_GROUP)
        bad.to_parquet(tmp / Files.BAD_ROWS, index=False)
        counts = {"n_input": len(df) + len(bad), "n_bad_rows": len(bad), "n_samples": len(samples)}
        if "corruption" in samples.columns:
            counts["corruption"] = samples["corruption"].fillna("clean").value_counts().sort_index().to_dict()
        write_manifest(tmp, STAGE, {**params.as_dict(), "data": data.as_dict()}, {"data": inputs.data}, counts,
                       timer.timings)
