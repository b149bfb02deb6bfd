"""The dependency lock: pyproject's ranges, the lock, the conda env and the installed venv agree."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from mmsae import lock

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> list[Requirement]:
    """Every requirement pyproject.toml declares: dependencies, extras and the build backend."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for extra in project["project"]["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_declared_range_is_locked_and_its_floor_is_the_locked_version():
    """A range is honest when its floor is what `make test` runs: the locked version."""
    pins = lock.read_pins(lock.LOCK)
    assert len(pins) > 50
    for req in _declared():
        name = lock.normalize(req.name)
        assert name in pins, f"{req} is declared but not locked: run `make lock`"
        assert pins[name] in req.specifier, f"{req}: the lock pins {pins[name]}, outside the range"
        floors = [s.version for s in req.specifier if s.operator in (">=", "==")]
        assert floors == [pins[name]], f"{req}: the floor must be the locked version {pins[name]}"


def test_lock_was_written_from_the_current_inputs():
    """Offline staleness check: the lock's header records the hash of pyproject's dependencies, extras,
    build requirements, the torch pin and the target it was resolved from."""
    assert lock.locked_input_hash(lock.LOCK) == lock.input_hash(), "pyproject.toml or envs/torch.txt changed: run `make lock`"


def test_lock_has_hashes_and_no_torch_build():
    text = lock.LOCK.read_text()
    pins = lock.read_pins(lock.LOCK)
    assert text.count("--hash=sha256:") >= len(pins)
    assert not [n for n in pins if lock.TORCH_BUILD.match(n)], "torch and its CUDA packages are pinned apart"
    assert lock.torch_version() == "2.13.0"  # the CPU wheel CI installs; change with the README's steps


def test_conda_env_installs_the_same_pins():
    env = yaml.safe_load(lock.CONDA_ENV.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pinned = dict(line.split("==") for line in pip if "==" in line)
    pinned = {lock.normalize(k): v for k, v in pinned.items()}
    assert pinned.pop("torch") == lock.torch_version()
    assert pinned == lock.read_pins(lock.LOCK)
    assert f"python={lock.PYTHON}" in env["dependencies"]
    # and the file is exactly what `make lock` writes
    assert lock.CONDA_ENV.read_text() == lock.render_conda_env(lock.read_pins(lock.LOCK), lock.torch_version())


def test_read_pins_and_drop_torch_build_on_a_hand_built_lock(tmp_path):
    text = (
        "# header\n"
        "Foo_Bar==1.2 \\\n    --hash=sha256:aa\n    # via x\n"
        "torch==2.13.0 \\\n    --hash=sha256:bb\n    # via foo-bar\n"
        "nvidia-cublas==13.1 ; sys_platform == 'linux' \\\n    --hash=sha256:cc\n"
        "triton==3.7.1\n"
        "sympy==1.14.0 \\\n    --hash=sha256:dd\n    # via torch\n"
    )
    kept = lock.drop_torch_build(text)
    path = tmp_path / "l.txt"
    path.write_text(kept)
    assert lock.read_pins(path) == {"foo-bar": "1.2", "sympy": "1.14.0"}
    assert "--hash=sha256:aa" in kept and "--hash=sha256:dd" in kept
    assert "bb" not in kept and "cc" not in kept and kept.startswith("# header\n")


def test_installed_versions_equal_the_lock():
    """`make test` sets MMSAE_LOCK: the venv it runs in was installed from the lock, and nothing else."""
    path = os.environ.get("MMSAE_LOCK")
    if not path:
        pytest.skip("not run through `make test` (make test-latest runs newer versions on purpose)")
    assert lock.check_installed(Path(path)) == []


def test_lock_is_current_with_pyproject(tmp_path):
    """Re-resolving with the lock's pins as preferences moves nothing: pyproject.toml and the lock agree
    (an edited dependency without `make lock` fails here). Needs uv (installed by make setup) and PyPI."""
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH: run the suite through `make test`"
    out = tmp_path / "requirements.lock"
    shutil.copyfile(lock.LOCK, out)
    lock.compile_lock(out, uv=uv)
    assert lock.read_pins(out) == lock.read_pins(lock.LOCK)



def test_check_installed_names_a_wrong_version_and_an_unlocked_package(tmp_path):
    pins = lock.read_pins(lock.LOCK)
    wrong = dict(pins, numpy="0.0.1")
    del wrong["pyyaml"]
    path = tmp_path / "lock.txt"
    path.write_text("".join(f"{n}=={v}\n" for n, v in wrong.items()))
    problems = lock.check_installed(path)
    assert any(p.startswith("numpy: locked 0.0.1, installed ") for p in problems)
    assert any(p.startswith("pyyaml ") and p.endswith("installed but not in the lock") for p in problems)


def test_raise_floors_sets_each_floor_to_the_locked_version():
    text = '"transformers>=5.0,<6",\n"Foo_Bar>=1.0",\n"snakemake==9.27.1",\n"unlocked>=2",\n'
    pins = {"transformers": "5.25.0", "foo-bar": "1.4.2", "snakemake": "9.30.0"}
    assert lock.raise_floors(text, pins) == (
        '"transformers>=5.25.0,<6",\n"Foo_Bar>=1.4.2",\n"snakemake==9.27.1",\n"unlocked>=2",\n')
