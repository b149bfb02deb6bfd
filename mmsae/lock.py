"""The dependency lock: envs/requirements.lock, written by uv from pyproject.toml.

One tracked file pins every Python package that `pip install -e .[workflow,dev]` brings, at exact
versions with hashes, for CPython 3.11 on x86-64 Linux. torch is pinned apart, in envs/torch.txt: its
CPU and CUDA builds are different files of the same version, and the CUDA build's own packages (nvidia-*,
cuda-*, triton) are pinned exactly by torch itself, so they stay out of the lock.

    python mmsae/lock.py compile [--upgrade] [--out F]   write the lock (or, with --upgrade --out, the
                                                         newest versions pyproject.toml admits)
    python mmsae/lock.py conda                           write envs/mmsae.yaml from the lock
    python mmsae/lock.py floors                          raise pyproject.toml's `>=` floors to the lock
    python mmsae/lock.py check [--lock F]                the running environment equals the lock
    python mmsae/lock.py diff A B                        the pins that differ between two lock files

Standard library only: `make lock` and `make test-latest` run it before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "envs" / "requirements.lock"
TORCH_PIN = ROOT / "envs" / "torch.txt"
CONDA_ENV = ROOT / "envs" / "mmsae.yaml"
EXTRAS = ("workflow", "dev")
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
# torch and the packages of its CUDA build: installed with torch (make setup TORCH=...), never from the lock
TORCH_BUILD = re.compile(r"^(torch|triton|nvidia-.+|cuda-.+)$")
# installed but not locked, by design: the installers themselves and the project
UNLOCKED = {"pip", "uv", "mmsae"}
CUDA_INDEX = "https://download.pytorch.org/whl/cu126"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of '-', '_' and '.' as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line of a requirements or lock file."""
    pins: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def torch_version() -> str:
    pins = read_pins(TORCH_PIN)
    if set(pins) != {"torch"}:
        raise SystemExit(f"{TORCH_PIN}: expected exactly one line 'torch==VERSION', got {sorted(pins)}")
    return pins["torch"]


def drop_torch_build(text: str) -> str:
    """The compiled requirements without torch's own packages (a block = a pin line and its indented
    hash / `# via` lines)."""
    out: list[str] = []
    keep = True
    for line in text.splitlines():
        m = _PIN.match(line)
        if m:
            keep = not TORCH_BUILD.match(normalize(m.group(1)))
        elif not line.startswith((" ", "\t")):
            keep = True  # header comments
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


def build_requirements() -> list[str]:
    """pyproject.toml's [build-system] requires: locked too, since the project installs without isolation."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]


def input_hash() -> str:
    """sha256 of what the lock is resolved from: pyproject's dependencies, extras and build requirements,
    the torch pin and the target. Written into the lock's header, so a stale lock is caught offline."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    inputs = {"dependencies": project["project"]["dependencies"],
              "extras": {e: project["project"]["optional-dependencies"][e] for e in EXTRAS},
              "build": build_requirements(), "torch": torch_version(), "python": PYTHON, "platform": PLATFORM}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def locked_input_hash(path: Path) -> str | None:
    """The input hash a lock file was written from (its `# inputs sha256:` header line), if any."""
    m = re.search(r"^# inputs sha256: ([0-9a-f]{64})$", Path(path).read_text(), re.M)
    return m.group(1) if m else None


def compile_lock(out: Path, upgrade: bool = False, uv: str = "uv") -> None:
    """Resolve pyproject.toml (+ extras, build requirements) with uv under the torch pin and write `out`.

    Without --upgrade the pins already in `out` are kept where they still fit (uv's preferences), so a
    re-lock after adding a dependency moves nothing else.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        build_in = Path(tmp) / "build.in"
        build_in.write_text("\n".join(build_requirements()) + "\n")
        target = Path(tmp) / "lock.txt"
        if out.exists() and not upgrade:
            shutil.copyfile(out, target)  # preferences
        cmd = [uv, "pip", "compile", "pyproject.toml", str(build_in), "--constraint", str(TORCH_PIN),
               *[a for e in EXTRAS for a in ("--extra", e)], "--python-version", PYTHON, "--python-platform",
               PLATFORM, "--generate-hashes", "--quiet", "--output-file", str(target)]
        if upgrade:
            cmd.append("--upgrade")
        env = dict(os.environ, UV_CUSTOM_COMPILE_COMMAND="make lock")
        subprocess.run(cmd, cwd=ROOT, check=True, env=env)
        text = drop_torch_build(target.read_text()).replace(str(build_in), "build-system.requires")
        text = re.sub(r"^# inputs sha256: [0-9a-f]{64}\n", "", text, flags=re.M)
        header, _, body = text.partition("\n#    make lock\n")
        text = f"{header}\n#    make lock\n# inputs sha256: {input_hash()}\n{body}" if body else text
        tmp_out = out.with_name(f".{out.name}.tmp")
        tmp_out.write_text(text)
        tmp_out.replace(out)


def render_conda_env(pins: dict[str, str], torch: str) -> str:
    """envs/mmsae.yaml: the CUDA cluster's conda env, with the lock's pins (without its hashes)."""
    lines = [
        "# Conda environment for a CUDA cluster (software-deployment-method: conda).",
        "# Written by `make lock` from envs/requirements.lock and envs/torch.txt; do not edit by hand",
        "# (tests/test_lock.py fails when it disagrees with the lock).",
        "name: mmsae",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        f"  - python={PYTHON}",
        "  - pip",
        "  - pip:",
        f"      - --extra-index-url {CUDA_INDEX}",
        f"      - torch=={torch}",
        *[f"      - {name}=={version}" for name, version in sorted(pins.items())],
    ]
    return "\n".join(lines) + "\n"


_FLOOR = re.compile(r'"([A-Za-z0-9][A-Za-z0-9._-]*)>=([^,"\s]+)')


def raise_floors(pyproject: str, pins: dict[str, str]) -> str:
    """pyproject.toml's text with every `"name>=X` floor set to the locked version of `name`."""

    def floor(m: re.Match) -> str:
        name = m.group(1)
        return f'"{name}>={pins.get(normalize(name), m.group(2))}'

    return _FLOOR.sub(floor, pyproject)


def check_installed(lock: Path) -> list[str]:
    """Differences between the running environment and the lock: wrong or missing versions, and
    installed packages the lock does not know (torch's build and the installers excepted)."""
    pins = read_pins(lock)
    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = [f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
                for name, version in sorted(pins.items()) if installed.get(name) != version]
    problems += [f"{name} {version}: installed but not in the lock"
                 for name, version in sorted(installed.items())
                 if name not in pins and name not in UNLOCKED and not TORCH_BUILD.match(name)]
    want_torch = torch_version()
    if installed.get("torch", "").split("+")[0] != want_torch:
        problems.append(f"torch: pinned {want_torch} (envs/torch.txt), installed {installed.get('torch', 'nothing')}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="resolve pyproject.toml with uv into a lock file")
    c.add_argument("--out", type=Path, default=LOCK)
    c.add_argument("--upgrade", action="store_true", help="ignore the current pins: newest admitted versions")
    c.add_argument("--uv", default="uv", help="the uv executable")
    sub.add_parser("conda", help=f"write {CONDA_ENV.relative_to(ROOT)} from the lock")
    sub.add_parser("floors", help="raise pyproject.toml's `>=` floors to the locked versions")
    k = sub.add_parser("check", help="the running environment equals the lock")
    k.add_argument("--lock", type=Path, default=LOCK)
    d = sub.add_parser("diff", help="the pins that differ between two lock files")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "compile":
        compile_lock(args.out, upgrade=args.upgrade, uv=args.uv)
    elif args.cmd == "conda":
        CONDA_ENV.write_text(render_conda_env(read_pins(LOCK), torch_version()))
    elif args.cmd == "floors":
        path = ROOT / "pyproject.toml"
        path.write_text(raise_floors(path.read_text(), read_pins(LOCK)))
    elif args.cmd == "diff":
        a, b = read_pins(args.a), read_pins(args.b)
        changed = [f"  {n}: {a.get(n, '-')} -> {b.get(n, '-')}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        print(f"{len(changed)} of {len(set(a) | set(b))} packages differ between {args.a} and {args.b}")
        print("\n".join(changed))
    else:
        problems = check_installed(args.lock)
        for p in problems:
            print(f"{args.lock}: {p}", file=sys.stderr)
        if problems:
            return 1
        print(f"environment matches {args.lock} ({len(read_pins(args.lock))} pins) and torch=={torch_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
