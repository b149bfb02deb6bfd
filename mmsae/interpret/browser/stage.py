"""Stage browser: a static feature browser (HTML + PNG files) over the default SAE's features.

Reads features.parquet (features), codes.parquet (encode; its manifest gives layer and d_sae),
tokens.parquet (extract), samples.parquet (sample: the images) and the model folder (its tokenizer
for token strings, its processor / config for the patch grid; no weights are loaded). Writes
index.html (sortable feature list; index.html#sort=weight&dir=desc), features/{f}.html, img/, heat/,
hist/. Opens from disk: no server, relative links only. See mmsae.interpret.browser.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.features import encode_info
from mmsae.interpret.browser import build_site, model_view, read_features, read_tokens
from mmsae.params import BrowserParams, ModelParams

STAGE = "browser"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    features: Path = cli.arg("features artifact folder (features.parquet)")
    encode: Path = cli.arg("encode artifact folder (codes.parquet)")
    extract: Path = cli.arg("extract artifact folder (tokens.parquet)")
    samples: Path = cli.arg("sample artifact folder (samples.parquet: the images)")
    model: str = cli.arg("model folder or hub id (tokenizer and patch grid)")
    model_params: ModelParams = cli.arg("the 'model' config slice (trust_remote_code), JSON",
                                        default_factory=lambda: ModelParams.load({}))


def run(inputs: Inputs, params: BrowserParams, out: Path) -> None:
    timer = Timer()
    layer, d_sae = encode_info(inputs.encode)
    with timer("read"):
        features = read_features(Path(inputs.features) / Files.FEATURES)
        tokens = read_tokens(Path(inputs.extract) / Files.TOKENS)
        tokenizer, grid = model_view(inputs.model, inputs.model_params.trust_remote_code)
    with atomic_dir(out) as tmp:
        with timer("build"):
            counts = build_site(tmp, features, Path(inputs.encode) / Files.CODES, tokens,
                                Path(inputs.samples) / Files.SAMPLES, tokenizer, grid, params, layer, d_sae,
                                title=params.title)
        read = {"features": inputs.features, "encode": inputs.encode, "extract": inputs.extract,
                "samples": inputs.samples, "model": inputs.model}
        write_manifest(tmp, STAGE, params.as_dict(), read, counts, timer.timings)
