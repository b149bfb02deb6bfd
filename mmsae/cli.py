"""What every stage script shares: argument parsing, logging, and one-line errors with exit code 2.

The stage contract: a stage module has a frozen dataclass `Inputs` (its input folders and options, one
`arg(...)` field each) and `run(inputs, params, out)`, where params is the stage's typed config of
mmsae.params. Its script is three lines, `cli.main(STAGE, run, Inputs, __doc__)`: the options come from
the fields, so script, module and tests cannot disagree about them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmsae.artifacts import Files, require_finished
from mmsae.config import StageParams
from mmsae.errors import InputError
from mmsae.params import BY_STAGE, ModelParams

log = logging.getLogger("mmsae")


def parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{stage}.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--params",
        default="{}",
        help=f"the '{stage}' config slice: a JSON string or a YAML/JSON file (defaults from config/schema.yaml)",
    )
    p.add_argument("--out", required=True, help="output artifact folder (written atomically)")
    return p


def arg(help: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING,
        **argparse_kwargs: Any) -> Any:
    """A field of a stage's `Inputs`: the option --name-with-dashes, required unless it has a default.
    `argparse_kwargs` go to add_argument (action="append", metavar, nargs, type, ...)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "argparse": argparse_kwargs})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """The inputs of every stage that runs the model over the sampled records (a base of their Inputs)."""

    samples: Path = arg("sample artifact folder holding samples.parquet")
    model: str = arg("model folder or hub id")
    model_params: ModelParams = arg("the 'model' config slice: dtype, device, trust_remote_code (JSON)",
                                    default_factory=lambda: ModelParams.load({}))


def manifest_params(params: StageParams, model_params: ModelParams) -> dict[str, Any]:
    """What the manifest of a stage that runs the model records as its params: its slice plus the model's."""
    return {**params.as_dict(), "model": model_params.as_dict()}


def load_records_and_model(inputs: ModelInputs, timer: Any) -> tuple[Any, Any]:
    """(records of --samples, the model adapter of --model as --model-params says). The records are read
    lazily (ParquetRecords): each batch's images are read and decoded when the batch is taken, so memory
    does not grow with the data set (decoding 40K images up front took about 40 GB)."""
    from mmsae.data.lazy import ParquetRecords
    from mmsae.models import load_model_with

    with timer("read"):
        records = ParquetRecords(Path(inputs.samples) / Files.SAMPLES)
    with timer("load_model"):
        adapter = load_model_with(inputs.model, inputs.model_params)
    return records, adapter


def _convert(value: Any, hint: Any, option: str) -> Any:
    """A parsed option as its field's type: Path, a typed params slice, tuples of either, or as is."""
    if value is None:
        return None
    if isinstance(hint, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_convert(v, item, option) for v in value)
    if isinstance(hint, type) and issubclass(hint, StageParams):
        return hint.load(value, source=option)
    if hint is Path:
        return Path(value)
    return value


def main(stage: str, run_stage: Callable[[Any, Any, Path], Any], inputs_type: type, doc: str | None,
         argv: list[str] | None = None) -> int:
    """Parse the options of `inputs_type` plus --params and --out, and call `run_stage(inputs, params, out)`."""
    argp = parser(stage, doc)
    hints = typing.get_type_hints(inputs_type)
    factories = {f.name for f in dataclasses.fields(inputs_type) if f.default_factory is not dataclasses.MISSING}
    for f in dataclasses.fields(inputs_type):
        kwargs = dict(f.metadata.get("argparse", {}))
        if hints[f.name] is bool:
            kwargs.setdefault("action", "store_true")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        elif kwargs.get("action") == "append":
            kwargs["default"] = []
        else:  # a factory's default is made by the dataclass itself (the option left out)
            kwargs.setdefault("default", None if f.default is dataclasses.MISSING else f.default)
        argp.add_argument("--" + f.name.replace("_", "-"), help=f.metadata.get("help"), **kwargs)
    args = argp.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        params = BY_STAGE[stage].load(args.params)
        log.info("%s: params %s", stage, params.as_dict())
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(inputs_type)}
        inputs = inputs_type(**{name: _convert(value, hints[name], "--" + name.replace("_", "-"))
                                for name, value in given.items() if value is not None or name not in factories})
        for f in dataclasses.fields(inputs_type):  # never read a stage folder without its manifest
            value = getattr(inputs, f.name)
            if isinstance(value, Path):
                require_finished(value, "--" + f.name.replace("_", "-"))
        run_stage(inputs, params, Path(args.out))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def stage_main(module: Any, argv: list[str] | None = None) -> int:
    """The command line of a stage module (its STAGE, Inputs, run and docstring): what its script runs."""
    return main(module.STAGE, module.run, module.Inputs, module.__doc__, argv)
