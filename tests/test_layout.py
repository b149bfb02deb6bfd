"""The README's stage map (stage -> rule file -> script -> module) cannot go stale: it is checked against
the rule files the Snakefile includes, the scripts their shell commands call and the modules those import."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# rules that run no script: the default target, the "latest" links / compare's, study's and sae_compare's
# summary targets, and `plan` (python -m mmsae.plan: an estimate before any job, no stage)
TARGETS = {"all", "latest_report", "latest_browser", "compare", "study", "sae_compare", "plan"}
_RULE = re.compile(r"^\s*rule (\w+):(.*?)(?=^\s*rule |\Z)", re.S | re.M)  # rules may sit in if-blocks


def _rules() -> dict[str, tuple[str, str]]:
    """{rule: (rule file, its text)} over the rule files the Snakefile includes."""
    out = {}
    for inc in re.findall(r'^include: "(rules/[\w.]+)"', (ROOT / "Snakefile").read_text(), re.M):
        for m in _RULE.finditer((ROOT / inc).read_text()):
            out[m.group(1)] = (inc, m.group(2))
    out.update({m.group(1): ("Snakefile", m.group(2)) for m in _RULE.finditer((ROOT / "Snakefile").read_text())})
    return out


def _stage_map() -> list[dict[str, list[str]]]:
    """The README table under 'Stage map': per row the backticked names of each column."""
    text = (ROOT / "README.md").read_text()
    blocks = text[text.index("### Stage map"):].split("\n\n")
    table = next(b for b in blocks if b.startswith("| stage"))
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["stage", "rule file", "script", "module"], header
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append({h: re.findall(r"`([^`]+)`", c) for h, c in zip(header, cells, strict=True)})
    return rows


def test_stage_map_covers_every_rule_once():
    rows = _stage_map()
    listed = [r for row in rows for r in row["stage"]]
    assert len(listed) == len(set(listed)), "a rule is listed twice"
    assert set(listed) == set(_rules()) - TARGETS


def test_stage_map_rows_name_the_real_rule_file_script_and_module():
    rules = _rules()
    for row in _stage_map():
        (rule_file,), (script,), modules = row["rule file"], row["script"], row["module"]
        assert modules, row
        for stage in row["stage"]:
            where, body = rules[stage]
            assert where == rule_file, f"rule {stage} lives in {where}, the README says {rule_file}"
            assert f"{{SCRIPTS}}/{Path(script).name}" in body, f"rule {stage} does not run {script}"
        source = (ROOT / script).read_text()
        for module in modules:
            path = ROOT / (module.replace(".", "/") + ".py")
            package = ROOT / module.replace(".", "/") / "__init__.py"
            assert path.exists() or package.exists(), f"{module} does not exist"
            parent, name = module.rsplit(".", 1)
            imports = (rf"^\s*from {re.escape(module)} import|^\s*import {re.escape(module)}\b"
                       rf"|^\s*from {re.escape(parent)} import [^\n]*\b{name}\b")
            assert re.search(imports, source, re.M), f"{script} does not import {module}"


def test_every_stage_module_follows_the_contract_and_its_script_is_thin():
    """STAGE, a frozen `Inputs` dataclass and run(inputs, params, out) in the module; the script only
    hands its command line to it (cli.stage_main)."""
    import dataclasses
    import importlib
    import inspect

    from mmsae.params import BY_STAGE

    for row in _stage_map():
        (script,), (module,) = row["script"], row["module"]
        mod = importlib.import_module(module)
        assert mod.STAGE in BY_STAGE, f"{module}.STAGE = {mod.STAGE!r} is not a config section"
        assert dataclasses.is_dataclass(mod.Inputs) and mod.Inputs.__dataclass_params__.frozen, module
        assert list(inspect.signature(mod.run).parameters) == ["inputs", "params", "out"], module
        source = (ROOT / script).read_text()
        assert len(source.splitlines()) <= 12 and "stage_main" in source + inspect.getsource(mod), script
