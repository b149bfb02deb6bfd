"""Headroom of the toy world's alignment setting: starting model vs fine-tuned on the clean pool vs on
the whole pool, and how the starting model's own response loss ranks clean vs each bad kind.

For one toy-world seed (the toy model, SAE-free, uses the same seed), in --out/seed{N}/:
  toyworld     the toyworld stage (toyworld.setting from --setting, default alignment)
  toy_model    the starting model (toy_model defaults, trained on the train split)
  ft-clean     finetune (finetune defaults) on the pool's clean samples
  ft-all       finetune on the whole pool (corruption_rate of it bad, spread over the kinds)
  bench-*      benchmark of start / clean / all on the held-out questions
and prints (and writes to headroom.json) answer match, exact match and answer log-prob per arm and
task, plus the AUROC per bad kind of the model_loss score (-mean NLL of the preferred response under
the starting model; 1 = clean ranked first). Stages already built are reused.

Usage:
  OMP_NUM_THREADS=1 python perf/headroom.py --seed 0 --out perf/out/headroom
  python perf/headroom.py --seed 0 --out perf/out/headroom --finetune '{"method": "dpo"}'
  # the study's budget (config/study.yaml), on seeds 0, 1, 2: docs/toyworld-alignment.md
  python perf/headroom.py --seed 1 --finetune '{"lr": 0.001, "max_steps": 600, "freeze_vision_tower": true}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mmsae import finetune, models
from mmsae.artifacts import Files
from mmsae.data import toyworld
from mmsae.data.schema import read_frame, records_from_frame
from mmsae.evaluation import benchmarks
from mmsae.evaluation.auroc import auroc
from mmsae.models import toy as toy_model
from mmsae.models.loss import response_loss
from mmsae.params import BenchmarkParams, FinetuneParams, ModelParams, ToyModelParams, ToyworldParams


def _stage(out: Path, fn, *args) -> float:
    """Run a stage's `run` unless its folder (with a manifest) exists; its wall seconds (0 if reused)."""
    if (out / Files.MANIFEST).exists():
        return 0.0
    t = time.perf_counter()
    fn(*args, out)
    return time.perf_counter() - t


def model_loss_auroc(model_dir: Path, pool: pd.DataFrame, threads: int) -> dict[str, float]:
    """AUROC of -loss (the model_loss score) per bad kind: clean vs that kind (1 = clean ranked first)."""
    import torch

    torch.set_num_threads(threads)
    adapter = models.load_model(model_dir, dtype="float32", device="cpu")
    loss = response_loss(adapter, records_from_frame(pool), batch_size=64, progress=False)
    score = -loss["loss"].to_numpy()
    kind = pool["corruption"].fillna("clean").to_numpy()
    clean = kind == "clean"
    out = {k: round(auroc(np.r_[score[clean], score[kind == k]],
                          np.r_[np.ones(clean.sum(), bool), np.zeros((kind == k).sum(), bool)]), 3)
           for k in sorted(set(kind) - {"clean"})}
    out["any"] = round(auroc(score, clean), 3)
    # within the clean samples: does a low loss mean a short answer? (rank correlation of loss and length)
    n_tok = loss["n_tokens"].to_numpy()
    ranks = [pd.Series(x[clean]).rank() for x in (loss["loss"].to_numpy(), n_tok)]  # Spearman = Pearson of ranks
    out["clean_loss_vs_length_spearman"] = round(float(ranks[0].corr(ranks[1])), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("perf/out/headroom"))
    ap.add_argument("--setting", default="alignment")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--toyworld", default="{}", help="JSON overrides of the toyworld slice")
    ap.add_argument("--toy-model", default="{}", help="JSON overrides of the toy_model slice")
    ap.add_argument("--finetune", default="{}", help="JSON overrides of the finetune slice")
    ap.add_argument("--model-only", action="store_true", help="stop after the toy model (to train seeds ahead)")
    a = ap.parse_args(argv)
    root = a.out / f"seed{a.seed}"
    root.mkdir(parents=True, exist_ok=True)
    # every corruption kind by default (the schema's default leaves `unhelpful` out of the recognition demo)
    tw_params = ToyworldParams.load({"seed": a.seed, "setting": a.setting,
                                     "corruption_kinds": list(toyworld.CORRUPTION_KINDS), **json.loads(a.toyworld)})
    tm_params = ToyModelParams.load({"seed": a.seed, "num_threads": a.threads, **json.loads(a.toy_model)})
    ft_params = FinetuneParams.load({"num_threads": a.threads, **json.loads(a.finetune)})
    ft_tag = "ft" if a.finetune == "{}" else "ft-" + "-".join(f"{k}{v}" for k, v in json.loads(a.finetune).items())
    timings: dict[str, float] = {}

    timings["toyworld"] = _stage(root / "toyworld", toyworld.run, toyworld.Inputs(), tw_params)
    timings["toy_model"] = _stage(root / "toy_model", toy_model.run, toy_model.Inputs(toyworld=root / "toyworld"),
                                  tm_params)
    if a.model_only:
        return 0
    pool = read_frame(root / "toyworld" / Files.POOL)
    clean_path = root / "pool_clean.parquet"
    if not clean_path.exists():
        pool[pool["corruption"].isna()].to_parquet(clean_path, index=False)
    start = root / "toy_model" / Files.MODEL_DIR
    models_ = {"start": start}
    for arm, data in (("clean", clean_path), ("all", root / "toyworld" / Files.POOL)):
        folder = root / f"{ft_tag}-{arm}"
        timings[f"finetune_{arm}"] = _stage(folder, finetune.run, finetune.Inputs(model=str(start), data=data),
                                            ft_params)
        models_[arm] = folder / Files.MODEL_DIR
    results = {}
    for arm, model in models_.items():  # (benchmarks after all fine-tunes: one model in memory at a time)
        folder = root / f"bench-{arm}" if arm == "start" else root / f"bench-{ft_tag}-{arm}"
        timings[f"benchmark_{arm}"] = _stage(
            folder, benchmarks.run,
            benchmarks.Inputs(model=str(model), model_params=ModelParams.load({"dtype": "float32"}),
                              toy_heldout=root / "toyworld" / Files.HELDOUT),
            BenchmarkParams.load({}))
        results[arm] = json.loads((folder / Files.RESULTS).read_text())["toy"]
    t = time.perf_counter()
    aurocs = model_loss_auroc(start, pool, a.threads)
    timings["model_loss"] = time.perf_counter() - t

    metrics = ("answer_match", "exact_match", "answer_logprob")
    rows = [{"arm": arm, **{m: r[m] for m in metrics},
             **{f"answer_match.{t}": v for t, v in r["answer_match_by_task"].items()}} for arm, r in results.items()]
    table = pd.DataFrame(rows).set_index("arm")
    summary = {"seed": a.seed, "setting": a.setting, "finetune": ft_params.as_dict(), "table": rows,
               "model_loss_auroc": aurocs, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "pool_kinds": pool["corruption"].fillna("clean").value_counts().to_dict()}
    (root / f"headroom-{ft_tag}.json").write_text(json.dumps(summary, indent=2))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"seed {a.seed} ({a.setting}, {ft_tag}):")
        print(table.round(4).to_string())
        print("model_loss AUROC per kind (clean vs kind):", aurocs)
        print("timings (s, 0 = reused):", summary["timings_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
