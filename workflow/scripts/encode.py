"""Stage encode: SAE codes of every token (all modalities) of an extract artifact.

Reads the SAE from a train_sae artifact (--sae, its sae/ folder; a bare SAELens folder works too) and
encodes the store's layer the SAE was trained on (cfg.json metadata.hook_layer). Writes into --out:

  codes.parquet   row, sample_id, position, modality, feature, activation (only activations > delta)
  manifest.json   counts: n_tokens, nnz, layer, d_sae

An SAE whose d_in differs from the store's d_model is refused (exit 2, no output folder).

Example:
  python workflow/scripts/encode.py --extract results/demo/extract-1234abcd --sae results/demo/train_sae-x \\
      --out results/demo/encode-y --params '{"delta": 0.0}'
"""

from __future__ import annotations

import sys

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.errors import InputError

STAGE = "encode"


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser(STAGE, __doc__)
    argp.add_argument("--extract", required=True, help="extract artifact folder (acts.zarr + tokens.parquet)")
    argp.add_argument("--sae", required=True, help="train_sae artifact folder (or an SAELens SAE folder)")

    def body(args, params):
        from mmsae.device import resolve_device
        from mmsae.sae.encode import encode_store
        from mmsae.sae.io import check_d_in, load_sae

        timer = Timer()
        store = ActivationStore(args.extract)
        with timer("load"):
            sae = load_sae(args.sae, device=resolve_device(params["device"]))
        check_d_in(sae, store.d_model, args.extract)
        layer = sae.cfg.metadata.get("hook_layer")
        if not isinstance(layer, int):
            raise InputError(sae.source / Files.SAE_CFG, "metadata.hook_layer", "missing: cannot tell which layer to encode")
        store.array(layer)  # InputError if that layer was not extracted
        with atomic_dir(args.out) as tmp:
            with timer("encode"):
                counts = encode_store(sae, store, layer, params["delta"], params["batch_tokens"], tmp / Files.CODES)
            counts.update(layer=layer, d_sae=sae.cfg.d_sae, hook_name=sae.cfg.metadata.get("hook_name"))
            write_manifest(tmp, STAGE, params, {"extract": args.extract, "sae": args.sae}, counts, timer.timings)

    return cli.run(STAGE, argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
