"""Stage sample: a deterministic, seeded sample of N records from the input data set.

Reads the data set in its native format (--data-params: the `data` config slice), validates the
record schema (missing column, empty text, undecodable image -> one-line error naming file and field,
or with on_bad_row=skip: dropped and listed in bad_rows.parquet) and writes samples.parquet in the
record schema, plus manifest.json.
"""

from __future__ import annotations

import sys

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.config import stage_params
from mmsae.data import sample_frame
from mmsae.data.readers import read_dataset


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser("sample", __doc__)
    argp.add_argument("--data", required=True, help="input data set (a file in data.format)")
    argp.add_argument("--data-params", default="{}", help="the 'data' config slice (format, image_root, on_bad_row)")

    def body(args, params):
        timer = Timer()
        data_cfg = stage_params("data", args.data_params, "--data-params")
        with timer("read"):
            df, bad = read_dataset(args.data, data_cfg["format"], data_cfg["image_root"], data_cfg["on_bad_row"])
        for row in bad.itertuples():
            cli.log.warning("unreadable row %s: field %s: %s", row.sample_id, row.field, row.message)
        with timer("sample"):
            out = sample_frame(df, params["n"], params["seed"])
        with atomic_dir(args.out) as tmp:
            out.to_parquet(tmp / Files.SAMPLES, index=False)
            bad.to_parquet(tmp / Files.BAD_ROWS, index=False)
            counts = {"n_input": len(df) + len(bad), "n_bad_rows": len(bad), "n_samples": len(out)}
            if "corruption" in out.columns:
                counts["corruption"] = out["corruption"].fillna("clean").value_counts().sort_index().to_dict()
            write_manifest(tmp, "sample", {**params, "data": data_cfg}, {"data": args.data}, counts, timer.timings)

    return cli.run("sample", argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
