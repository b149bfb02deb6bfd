"""The model's mean next-token loss on each sample's preferred response (a no-SAE reference score).

Reads SAMPLE_DIR/samples.parquet (mmsae record schema) and writes into --out:

  loss.parquet    sample_id, loss (mean NLL in nats over the response tokens, EOS included), n_tokens
  manifest.json   params (model_loss slice + model slice), inputs, counts, timings

Example:
  python workflow/scripts/model_loss.py --samples results/demo/sample-1234abcd --model path/to/model \\
      --model-params '{}' --params '{"batch_size": 8}' --out results/demo/model_loss-x
"""

from __future__ import annotations

import sys

from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.cli import add_model_args, load_records_and_model_from_args, parser, run

STAGE = "model_loss"
LOSS = Files.LOSS


def build_parser():
    p = parser(STAGE, __doc__)
    add_model_args(p)
    return p


def body(args, params: dict) -> None:
    # heavy imports here, so --help answers at once
    from mmsae.models.loss import response_loss

    timer = Timer()
    records, adapter, model_params = load_records_and_model_from_args(args, timer)
    with timer("loss"):
        df = response_loss(adapter, records, params["batch_size"])
    with atomic_dir(args.out) as tmp:
        df.to_parquet(tmp / LOSS, index=False)
        counts = {"n_samples": len(df), "n_tokens": int(df["n_tokens"].sum()),
                  "mean_loss": float(df["loss"].mean()), "model_family": adapter.family}
        write_manifest(tmp, STAGE, {**params, "model": model_params},
                       inputs={"samples": args.samples, "model": args.model}, counts=counts, timings=timer.timings)


if __name__ == "__main__":
    sys.exit(run(STAGE, build_parser(), body))
