"""Stage compare: the spread of the AUROC table over runs (e.g. toy-world seeds).

Reads each run's report.json (--report NAME=PATH, repeated; the workflow passes
results/{run}/report/report.json for every run in config compare.runs) and writes
auroc_spread.parquet (method, kind, layer (<NA> = the configured SAE), n_runs, mean, sd, min, max,
run:<name> per run; see mmsae.evaluation.auroc.auroc_spread) and auroc_spread.html (the same, escaped).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from mmsae import cli
from mmsae.artifacts import Files, Timer, atomic_dir, write_manifest
from mmsae.errors import InputError
from mmsae.evaluation.auroc import DIRECTION, auroc_spread
from mmsae.params import CompareParams
from mmsae.report.html import page, para, section, table

STAGE = "compare"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    report: tuple[str, ...] = cli.arg("a run's report.json (repeat for every run)", default=(), action="append",
                                      metavar="NAME=PATH")


def read_reports(pairs: tuple[str, ...] | list[str]) -> dict[str, dict]:
    """{run name: report dict} from NAME=PATH arguments, in the order given."""
    reports: dict[str, dict] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise InputError("--report", "value", f"expected NAME=PATH, got {pair!r}")
        if name in reports:
            raise InputError("--report", "name", f"run {name!r} given twice")
        if not Path(path).is_file():
            raise InputError(path, "path", "file does not exist (build that run's report first)")
        try:
            reports[name] = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise InputError(path, "json", f"not JSON: {exc.msg} at line {exc.lineno}") from None
    return reports


def render(spread: pd.DataFrame, runs: list[str]) -> str:
    """One page: per layer block, a method x kind table of 'mean ± sd (min-max)', then every row."""
    kinds = list(dict.fromkeys(spread["kind"]))
    parts = [f"<h1>AUROC over {len(runs)} runs</h1>", para("runs: " + ", ".join(runs)), para(DIRECTION, "note")]
    for layer, block in spread.groupby(spread["layer"].astype("object").fillna(-1), sort=True):
        cell = {(r.method, r.kind): f"{r.mean:.3f} ± {r.sd:.3f} ({r.min:.2f}-{r.max:.2f}, n={r.n_runs})"
                for r in block.itertuples() if r.n_runs}
        rows = [[m, *[cell.get((m, k), "n/a") for k in kinds]] for m in dict.fromkeys(block["method"])]
        title = "configured SAE" if layer == -1 else f"layer {layer}"
        parts.append(section(f"AUROC, {title}: mean ± sd (min-max, runs)", table(["method", *kinds], rows)))
    cols = list(spread.columns)
    parts.append(section("All rows", table(cols, spread.astype("object").where(spread.notna(), None).values.tolist())))
    return page("AUROC spread", "\n".join(parts))


def run(inputs: Inputs, params: CompareParams, out: Path) -> None:
    timer = Timer()
    reports = read_reports(inputs.report)
    with timer("aggregate"):
        spread = auroc_spread(reports)
    with atomic_dir(out) as tmp:
        spread.to_parquet(tmp / Files.AUROC_SPREAD, index=False)
        (tmp / Files.AUROC_SPREAD_HTML).write_text(render(spread, list(reports)))
        manifest_inputs = {f"report:{name}": pair.partition("=")[2]
                           for name, pair in zip(reports, inputs.report, strict=True)}
        write_manifest(tmp, STAGE, params.as_dict(), manifest_inputs, {"n_runs": len(reports), "rows": len(spread)},
                       timer.timings)
