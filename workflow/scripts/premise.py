"""Stage premise (toy world): does one SAE feature fire on a concept word AND on the patches showing it?

For every colour and shape word: text AUROC (the feature's activation on text tokens vs "the token is
the word") and image AUROC (activation on image patches vs "the patch shows the concept", from the
samples' ground-truth `objects`); reports the feature maximising min(text, image) and the best
text-only / image-only AUROCs. Word token ids come from the model's tokenizer. Writes premise.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from mmsae import cli
from mmsae.activations import ActivationStore
from mmsae.artifacts import Files, Timer, atomic_dir, write_json, write_manifest
from mmsae.errors import InputError
from mmsae.evaluation.premise import concept_words, patch_grid, premise_check, word_token_ids
from mmsae.features import encode_info
from mmsae.report import json_safe
from mmsae.scoring import read_samples


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise InputError(model_dir, "tokenizer", f"cannot load a tokenizer ({exc.__class__.__name__})") from exc


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser("premise", __doc__)
    argp.add_argument("--samples", required=True, help="sample artifact folder (samples.parquet with objects)")
    argp.add_argument("--extract", required=True, help="extract artifact folder (tokens.parquet)")
    argp.add_argument("--encode", required=True, help="encode artifact folder (codes.parquet)")
    argp.add_argument("--model", required=True, help="model folder (its tokenizer maps words to token ids)")

    def body(args, params):
        timer = Timer()
        layer, d_sae = encode_info(args.encode)
        samples = read_samples(args.samples).drop_columns(["image"]).to_pandas()
        tokens = ActivationStore(args.extract).tokens
        word_ids = word_token_ids(load_tokenizer(args.model), list(concept_words()))
        grid = patch_grid(tokens)
        with timer("premise"):
            table = premise_check(Path(args.encode) / Files.CODES, tokens, samples, grid, word_ids, d_sae,
                                  params["max_samples"], params["seed"])
        result = {"layer": layer, "d_sae": d_sae, "word_ids": word_ids, **table.attrs,
                  "concepts": table.astype(object).where(pd.notna(table), None).to_dict("records")}
        with atomic_dir(args.out) as tmp:
            write_json(tmp / Files.PREMISE, json_safe(result))
            best = table["min_auroc"].max() if table["min_auroc"].notna().any() else None
            write_manifest(tmp, "premise", params,
                           {"samples": args.samples, "extract": args.extract, "encode": args.encode, "model": args.model},
                           {"layer": layer, "n_samples": table.attrs["n_samples"], "best_min_auroc": best},
                           timer.timings)

    return cli.run("premise", argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
