"""The Slurm profile through the real snakemake-executor-plugin-slurm, against fake Slurm commands.

Fake `sbatch`, `srun`, `sacct`, `scancel`, `sinfo`, `squeue`, `scontrol`, `sacctmgr`, `sshare` (what the
plugin and its jobstep call; see snakemake_executor_plugin_slurm) record their argv and run each job
at once, locally: sbatch runs the job's `--wrap` command (Snakemake's jobstep, which calls srun, which
runs the rule) and sacct reports COMPLETED / FAILED. The workflow runs toyworld (a CPU rule) and
toy_model (a GPU rule) on a tiny config, and the test reads back the sbatch flags.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

FAKE = {
    "sbatch": r'''
import os, subprocess, sys
from _log import log, state_file
log("sbatch")
args = sys.argv[1:]
wrap = next(a.split("=", 1)[1] for a in args if a.startswith("--wrap="))
output = args[args.index("--output") + 1]
job_id = str(os.getpid())
env = {**os.environ, "SLURM_JOB_ID": job_id}
if any(a.startswith("--gpus") or a.startswith("--gres") for a in args):
    env["SLURM_GPUS"] = "1"
with open(output.replace("%j", job_id), "w") as out:
    rc = subprocess.call(["/bin/sh", "-c", wrap], stdout=out, stderr=subprocess.STDOUT, env=env)
with open(state_file(), "a") as f:
    f.write(f"{job_id}|{'COMPLETED' if rc == 0 else 'FAILED'}\n")
print(job_id)
''',
    "srun": r'''
import os, sys
from _log import log
log("srun")
args = sys.argv[1:]
while args and args[0].startswith("-"):  # srun's own options all come as one token (-n1, --x=y)
    args.pop(0)
os.execvp(args[0], args)
''',
    "sacct": r'''
import sys
from _log import log, state_file
log("sacct")
if any("JobIdRaw,State" in a for a in sys.argv):
    print(open(state_file()).read(), end="")
''',
    "scontrol": r'''
from _log import log
log("scontrol")
print("MinJobAge = 300 sec\nMaxArraySize = 1001")
''',
    "sacctmgr": "from _log import log\nlog('sacctmgr')\nprint('testacct')\n",
    "sshare": "from _log import log\nlog('sshare')\nprint('testacct')\n",
    "sinfo": "from _log import log\nlog('sinfo')\n",
    "squeue": "from _log import log\nlog('squeue')\n",
    "scancel": "from _log import log\nlog('scancel')\n",
}
LOG_HELPER = r'''
import json, os, sys
def log(name):
    with open(os.path.join(os.environ["FAKE_SLURM"], "calls.jsonl"), "a") as f:
        f.write(json.dumps({"cmd": name, "argv": sys.argv[1:]}) + "\n")
def state_file():
    path = os.path.join(os.environ["FAKE_SLURM"], "states")
    open(path, "a").close()
    return path
'''


def fake_slurm(folder: Path) -> Path:
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "_log.py").write_text(LOG_HELPER)
    for name, body in FAKE.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(bin_dir)!r})\n{body}")
        path.chmod(0o755)
    return bin_dir


def sbatch_calls(folder: Path) -> dict[str, list[str]]:
    """{rule: sbatch argv} from the recorded calls (the rule is in the --comment)."""
    calls = [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]
    out = {}
    for c in calls:
        if c["cmd"] == "sbatch":
            comment = c["argv"][c["argv"].index("--comment") + 1]
            out[comment.removeprefix("rule_").split("_wildcards_")[0]] = c["argv"]
    return out


def test_profile_submits_gpu_and_cpu_rules_with_their_resources(tmp_path):
    bin_dir = fake_slurm(tmp_path)
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    profile["default-resources"]["slurm_account"] = "testacct"  # what a user sets for their site
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    cfg = {"run": "slurm", "toyworld": {"n_samples": 20, "n_train": 20, "n_heldout": 10},
           "toy_model": {"hidden_size": 16, "num_layers": 2, "vision_layers": 1, "batch_size": 4, "steps_text": 1,
                         "steps_vision": 1, "steps_joint": 1, "eval_samples": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "FAKE_SLURM": str(tmp_path),
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "cfg.yaml"), "--profile", str(tmp_path / "profile"),
           "--slurm-init-seconds-before-status-checks", "1", "toy_model"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert list((tmp_path / "results" / "slurm").glob("toy_model-*/model"))  # the jobs really ran

    calls = sbatch_calls(tmp_path)
    assert set(calls) == {"toyworld", "toy_model"}
    # the flags, without the job's own command line (--wrap)
    gpu, cpu = (shlex.join(a for a in calls[rule] if not a.startswith("--wrap=")) for rule in ("toy_model", "toyworld"))
    # GPU rule: one GPU and CPUs per GPU, through one mechanism; no --cpus-per-task
    assert "--gpus=1" in gpu or "--gres=gpu:1" in gpu, gpu
    assert not ("--gpus=1" in gpu and "--gres=gpu:1" in gpu), gpu
    assert "--cpus-per-gpu=8" in gpu and "--cpus-per-task" not in gpu, gpu
    assert "-p gpu" in gpu and "--mem 64000" in gpu and "-t 240" in gpu, gpu
    # CPU rule: no GPU, CPUs from its threads, the default partition, memory and time limit
    assert not [a for a in calls["toyworld"] if a.startswith(("--gpus", "--gres", "--cpus-per-gpu", "-G"))], cpu
    assert "--cpus-per-task=2" in cpu, cpu
    assert "-p cpu" in cpu and "--mem 16000" in cpu and "-t 60" in cpu, cpu
    for argv in (gpu, cpu):
        assert "-A testacct" in argv, argv
    # the job step: srun with the rule's own CPU setting
    sruns = [c["argv"] for c in map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())
             if c["cmd"] == "srun"]
    assert len(sruns) == 2 and any("--cpus-per-gpu=8" in a for a in sruns)
