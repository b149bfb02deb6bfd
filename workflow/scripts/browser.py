"""Stage browser: a static feature browser (HTML + PNG files) over the default SAE's features.

Reads features.parquet (features), codes.parquet (encode; its manifest gives layer and d_sae),
tokens.parquet (extract), samples.parquet (sample: the images) and the model folder (its tokenizer
for token strings, its processor / config for the patch grid; no weights are loaded). Writes
index.html (sortable feature list; index.html#sort=weight&dir=desc), features/{f}.html, img/, heat/,
hist/. Opens from disk: no server, relative links only. See mmsae.interpret.browser.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.config import stage_params
from mmsae.features import encode_info
from mmsae.interpret.browser import build_site, model_view, read_features, read_tokens


def main(argv: list[str] | None = None) -> int:
    argp = cli.parser("browser", __doc__)
    argp.add_argument("--features", required=True, help="features artifact folder (features.parquet)")
    argp.add_argument("--encode", required=True, help="encode artifact folder (codes.parquet)")
    argp.add_argument("--extract", required=True, help="extract artifact folder (tokens.parquet)")
    argp.add_argument("--samples", required=True, help="sample artifact folder (samples.parquet: the images)")
    argp.add_argument("--model", required=True, help="model folder or hub id (tokenizer and patch grid)")
    argp.add_argument("--model-params", default="{}", help="the 'model' config slice (trust_remote_code)")

    def body(args, params):
        timer = Timer()
        model_params = stage_params("model", args.model_params, source="--model-params")
        layer, d_sae = encode_info(args.encode)
        with timer("read"):
            features = read_features(Path(args.features) / Files.FEATURES)
            tokens = read_tokens(Path(args.extract) / Files.TOKENS)
            tokenizer, grid = model_view(args.model, model_params["trust_remote_code"])
        with atomic_dir(args.out) as tmp:
            with timer("build"):
                counts = build_site(tmp, features, Path(args.encode) / Files.CODES, tokens,
                                    Path(args.samples) / Files.SAMPLES, tokenizer, grid, params, layer, d_sae,
                                    title=params["title"])
            write_manifest(tmp, "browser", params,
                           {"features": args.features, "encode": args.encode, "extract": args.extract,
                            "samples": args.samples, "model": args.model}, counts, timer.timings)

    return cli.run("browser", argp, body, argv)


if __name__ == "__main__":
    sys.exit(main())
