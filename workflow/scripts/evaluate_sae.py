"""Stage evaluate_sae: splice each SAE into the model (and its base LLM) and measure what it costs.

For every SAE given with --sae NAME=FOLDER (train_sae artifacts; NAME = the scope, `all` = SAE-V,
`text` = text-only SAE), at the SAE's hook layer:

  ce.parquet              model, sae, splice (all|image|text), n_targets, ce_clean, ce_sae, ce_zero,
                          ce_score, kl_sae, kl_zero, kl_score
  reconstruction.parquet  model, sae, modality (all|image|text), n_tokens, l0, mse, centred_fvu, dead_fraction
  summary.parquet         one row per (model, sae): the paper's Table 1 shape
  manifest.json

`model` is `mllm` (--model) and `base` (--base-model, text-only: the transfer test).
"""

from __future__ import annotations

import sys

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser("evaluate_sae", __doc__)
    cli.add_model_args(argp)
    argp.add_argument("--base-model", default=None, help="the text-only base LLM (transfer test); omit to skip")
    argp.add_argument("--sae", action="append", required=True, metavar="NAME=FOLDER",
                      help="an SAE to evaluate (train_sae artifact folder or SAELens folder); repeatable")

    def body(args, params):
        import pandas as pd

        from mmsae.errors import InputError
        from mmsae.models import load_model
        from mmsae.sae.io import check_d_in, load_sae, read_cfg
        from mmsae.sae.splice import evaluate_splice, summary_table

        timer = Timer()
        records, mllm, model_cfg = cli.load_records_and_model_from_args(args, timer)
        if params["n_samples"]:
            records = records[: params["n_samples"]]
        saes, layers = {}, set()
        for spec in args.sae:
            name, sep, folder = spec.partition("=")
            if not sep:
                raise InputError("--sae", "sae", f"expected NAME=FOLDER, got {spec!r}")
            saes[name] = load_sae(folder)
            layers.add(int(read_cfg(folder).metadata["hook_layer"]))
        if len(layers) != 1:
            raise InputError("--sae", "hook_layer", f"SAEs hook different layers {sorted(layers)}")
        layer = layers.pop()
        ces, recons = [], []
        targets = [("mllm", args.model)] + ([("base", args.base_model)] if args.base_model else [])
        for kind, path in targets:
            if kind == "mllm":
                adapter = mllm
            else:
                with timer(f"load_{kind}"):
                    adapter = load_model(path, model_cfg["dtype"], model_cfg["device"], model_cfg["trust_remote_code"])
            for name, sae in saes.items():
                check_d_in(sae, adapter.d_model, path)
                saes[name] = sae.to(adapter.device)
            with timer(f"evaluate_{kind}"):
                ce, recon = evaluate_splice(adapter, saes, layer, records, params["batch_size"],
                                            include_response=params["include_response"], targets=params["targets"])
            ces.append(ce.assign(model=kind))
            recons.append(recon.assign(model=kind))
        ce, recon = pd.concat(ces, ignore_index=True), pd.concat(recons, ignore_index=True)
        ce, recon = ce[["model", *ce.columns[:-1]]], recon[["model", *recon.columns[:-1]]]
        summary = summary_table(ce, recon)
        for row in summary.itertuples():
            cli.log.info("%s", row)
        with atomic_dir(args.out) as tmp:
            ce.to_parquet(tmp / Files.CE, index=False)
            recon.to_parquet(tmp / Files.RECONSTRUCTION, index=False)
            summary.to_parquet(tmp / Files.SUMMARY, index=False)
            inputs = {"samples": args.samples, "model": args.model, **{f"sae_{k}": v for k, v in
                      (s.partition("=")[::2] for s in args.sae)}}
            if args.base_model:
                inputs["base_model"] = args.base_model
            counts = {"layer": layer, "n_samples": len(records), "saes": sorted(saes)}
            write_manifest(tmp, "evaluate_sae", {**params, "model": model_cfg}, inputs, counts, timer.timings)

    return cli.run("evaluate_sae", argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
