"""Stage steer: clamp SAE features while generating; before/after answers per prompt.

Prompts: --image + --question, or --samples with --sample-id (repeatable) or the config's task /
n_samples selection. Clamps: --clamp FEATURE=VALUE (repeatable; one run), or the config's
features / concept (toy world: the premise stage's feature for that word, --premise) at each of
`values`, or at each of `multiples` x the feature's max activation (--features). Writes
steering.parquet (sample_id, question, run, multiple, features, values, positions, n_steered,
before, after, changed [, target, before_hit, after_hit]) and prints before / after per prompt.

See mmsae.interpret.steering for the method (the clamp keeps the SAE's error term).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.errors import InputError
from mmsae.interpret.common import PromptInputs, load_model_and_sae, prompt_records
from mmsae.interpret.steering import Clamp, SteeringRun, flip_summary, sae_layer, steer_records
from mmsae.params import SteerParams

log = logging.getLogger("mmsae.steering")

STAGE = "steer"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs(PromptInputs):
    clamp: tuple[str, ...] = cli.arg("FEATURE=VALUE (repeatable): one run with these clamps", default=(),
                                     action="append")
    features: Path | None = cli.arg("features artifact folder (max activations, for `multiples`)", default=None)
    premise: Path | None = cli.arg("premise artifact folder (toy world: the feature of `concept`)", default=None)



def concept_feature(premise: str | os.PathLike, word: str) -> int:
    """The feature the premise stage found for a concept word (max of min(text, image AUROC))."""
    path = Path(premise) / Files.PREMISE
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    concepts = {c["word"]: c for c in json.loads(path.read_text())["concepts"]}
    if word not in concepts:
        raise InputError(path, "concepts", f"no concept {word!r}; have {sorted(concepts)}")
    if concepts[word].get("feature") is None:
        raise InputError(path, "feature", f"no feature found for concept {word!r}")
    return int(concepts[word]["feature"])


def max_activations(features: str | os.PathLike, ids: Sequence[int]) -> dict[int, float]:
    """Each feature's largest activation on the encoded data (features.parquet top text / image acts)."""
    path = Path(features) / Files.FEATURES
    if not path.exists():
        raise InputError(path, "path", "file does not exist")
    df = pd.read_parquet(path, columns=["feature", "top_text_acts", "top_image_acts"]).set_index("feature")
    out = {}
    for f in ids:
        if f not in df.index:
            raise InputError(path, "feature", f"no feature {f}")
        acts = [a for col in ("top_text_acts", "top_image_acts") for a in (df.at[f, col] if df.at[f, col] is not None else [])]
        if not acts or max(acts) <= 0:
            raise InputError(path, "top_text_acts", f"feature {f} never fires: no max activation to scale")
        out[f] = float(max(acts))
    return out


def parse_clamps(items: Sequence[str]) -> list[Clamp]:
    """'F=V' strings -> Clamps (the CLI's --clamp)."""
    out = []
    for item in items:
        feature, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out.append(Clamp(int(feature), float(value)))
        except ValueError as exc:
            raise InputError("--clamp", "clamp", f"{item!r} is not FEATURE=VALUE") from exc
    return out


def build_runs(params: SteerParams, features: Sequence[int], max_acts: dict[int, float] | None) -> list[SteeringRun]:
    """The steer config's runs: one per entry of `values` (every feature set to it), else one per entry
    of `multiples` (each feature set to multiple x its max activation)."""
    if not features:
        raise InputError("steer", "features", "nothing to clamp: give features or a concept")
    if params.values:
        return [SteeringRun(tuple(Clamp(f, float(v)) for f in features), f"value={v:g}") for v in params.values]
    if not params.multiples or max_acts is None:
        raise InputError("steer", "multiples", "give values, or multiples with a features artifact")
    return [SteeringRun(tuple(Clamp(f, float(m) * max_acts[f]) for f in features), f"x{m:g}", float(m))
            for m in params.multiples]


def run(inputs: Inputs, params: SteerParams, out: Path) -> None:
    timer = Timer()
    records = prompt_records(inputs, params.sample_ids, params.task, params.n_samples)
    if not inputs.image and (inputs.question or params.question):
        q = inputs.question or params.question
        records = [dataclasses.replace(r, question=q) for r in records]
    adapter, sae = load_model_and_sae(inputs, timer)
    target = params.concept
    if inputs.clamp:
        runs = [SteeringRun(tuple(parse_clamps(inputs.clamp)), "clamp")]
        target = None
    else:
        features = list(params.features)
        if params.concept is not None:
            if not inputs.premise:
                raise InputError("--premise", "premise", f"concept {params.concept!r} needs --premise (toy world); "
                                 "set steer.concept: null and give steer.features")
            features.append(concept_feature(inputs.premise, params.concept))
        features = list(dict.fromkeys(features))
        max_acts = max_activations(inputs.features, features) if inputs.features and not params.values else None
        runs = build_runs(params, features, max_acts)
    with timer("steer"):
        table = steer_records(adapter, sae, records, runs, params.positions, params.max_new_tokens, target)
    for r in table.itertuples(index=False):
        print(f"[{r.sample_id}] {r.question}  ({r.run}: {dict(zip(r.features, r.values, strict=True))}, "
              f"{r.positions})\n  before: {r.before}\n  after:  {r.after}")
    summary = flip_summary(table)
    for s in summary:
        log.info("steer %s", s)
    with atomic_dir(out) as tmp:
        table.to_parquet(tmp / Files.STEERING, index=False)
        write_manifest(tmp, STAGE, params.as_dict(),
                       {k: v for k, v in {"model": inputs.model, "sae": inputs.sae, "samples": inputs.samples,
                                          "features": inputs.features, "premise": inputs.premise,
                                          "image": inputs.image}.items() if v},
                       {"n_prompts": len(records), "layer": sae_layer(sae), "runs": summary}, timer.timings)


def main(argv: list[str] | None = None) -> int:
    """The console script mmsae-steer."""
    return cli.stage_main(sys.modules[__name__], argv)
