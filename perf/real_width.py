"""The acceptance run at real widths: a random-weight LLaVA-NeXT with the 7B widths, a pool and a separate
SAE corpus, every stage to the report and the browser on the CPU, then each stage's peak RSS and disk
beside the plan's (mmsae.plan) estimates.

Built in --work (default build/real-width):
- model/: LLaVA-NeXT (Mistral-like text: hidden 4096, --layers 2 decoder layers, intermediate 14336,
  32 heads, 8 KV heads, vocab 32,000; CLIP-L/336 vision: hidden 1024, 24 layers, patch 14; anyres with
  llava-v1.6's pinpoints), random weights, saved as safetensors. The tokenizer is the toy model's
  word-level one (the texts are toy-world words), so text token counts are small; image tokens are real.
- pool.parquet: --pool records in the Align-Anything layout (question, image, response_1/2,
  overall_response), toy-world scenes upscaled to photo sizes (anyres picks 2-5 tiles: ~1,200-2,900
  image tokens each); with --multi-image, the mmsae layout with `extra_images` of 1-2 more images per
  record (needs the multi-image schema).
- corpus.parquet: --corpus OBELICS-layout documents (texts / images interleaved, 2-3 images each), the
  SAE's corpus with --sae-data (needs the `sae_data` section); without it the SAE learns from the pool.
- config.yaml: perf/real_width.yaml plus the paths and flags above.

Then, unless --build-only: `snakemake --cores N --configfile config.yaml` (every stage to the report and
the browser), and a table of each stage's max_rss (Snakemake's benchmark TSVs) and disk (du of its
folder) beside the plan. The full run needs ~12 GB RAM and hours on a 2-core CPU; check the harness with
reduced widths first:

    python perf/real_width.py --hidden 512 --intermediate 1792 --vocab 4096 --vision-hidden 256 \\
        --vision-layers 2 --expansion 8 --pool 4 --corpus 4 --run real-width-small
    python perf/real_width.py --pool 16 --corpus 16 --sae-data --multi-image     # the acceptance run
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PRESET = Path(__file__).resolve().parent / "real_width.yaml"  # the run's settings; the paths are filled in here
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6
# photo-like sizes: anyres picks different grids (672x672, 1008x336, ...) so token counts vary
SIZES = [(640, 480), (800, 600), (1024, 768), (480, 640), (1000, 340), (336, 336)]


def build_model(out: Path, a: argparse.Namespace, weights: bool = True) -> None:
    """The model folder; weights=False writes config + processor only (what `mmsae.plan` reads)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    from mmsae.models.toy.build import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = 32768
    heads = max(1, a.hidden // 128)
    text = MistralConfig(vocab_size=max(a.vocab, len(tok)), hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=32768, sliding_window=None, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=a.vision_hidden, intermediate_size=4 * a.vision_hidden,
                              num_hidden_layers=a.vision_layers, num_attention_heads=max(1, a.vision_hidden // 64),
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             tie_word_embeddings=False)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                 image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    processor.save_pretrained(out)
    if not weights:
        config.save_pretrained(out)
        return
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)


def _png(image_bytes: bytes, size: tuple[int, int]) -> bytes:
    im = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize(size, Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def build_data(work: Path, a: argparse.Namespace) -> None:
    import pandas as pd

    from mmsae.data import toyworld

    world = toyworld.generate(0, a.pool + 3 * a.corpus + 8, 0.0, [], 10, 10)["pool"].reset_index(drop=True)
    rows = []
    for i in range(a.pool):
        r = world.iloc[i]
        sizes = a.sizes or SIZES
        image = _png(r.image, sizes[i % len(sizes)])
        if a.multi_image:  # the mmsae layout, whose `extra_images` column holds images 2..n
            extra = [_png(world.iloc[a.pool + 3 * a.corpus + j].image, sizes[(i + j + 1) % len(sizes)])
                     for j in range(1 + i % a.max_extra)]
            row = {"sample_id": f"p{i:05d}", "question": r.question, "image": image, "extra_images": extra,
                   "responses": list(r.responses), "preferred": int(r.preferred)}
        else:  # the Align-Anything layout
            row = {"sample_id": f"p{i:05d}", "question": r.question, "image": image,
                   "response_1": r.responses[int(r.preferred)], "response_2": r.responses[1 - int(r.preferred)],
                   "overall_response": 1}
        rows.append(row)
    pd.DataFrame(rows).to_parquet(work / "pool.parquet")
    docs = []
    for i in range(a.corpus):
        n_img = 2 + i % 2
        texts, images = [], []
        for j in range(n_img):
            r = world.iloc[a.pool + 3 * i + j]
            texts += [r.question + " " + r.responses[int(r.preferred)], None]
            images += [None, _png(r.image, (a.sizes or SIZES)[(i + j) % len(a.sizes or SIZES)])]
        docs.append({"id": f"doc{i:05d}", "texts": texts, "images": images})
    pd.DataFrame(docs).to_parquet(work / "corpus.parquet")


def write_config(work: Path, a: argparse.Namespace) -> Path:
    cfg = yaml.safe_load(PRESET.read_text())
    cfg["run"] = a.run
    cfg["model"]["path"] = str(work / "model")
    cfg["data"] = {**cfg.get("data", {}), "source": str(work / "pool.parquet"),
                   "format": "mmsae" if a.multi_image else "align_anything"}
    cfg["extract"]["layers"] = [a.layers - 1]
    cfg["train_sae"]["layer"] = a.layers - 1
    cfg["train_sae"]["expansion"] = a.expansion
    cfg["score"]["layers"] = [a.layers - 1]
    if a.sae_data:
        cfg["sae_data"] = {"source": str(work / "corpus.parquet"), "format": "obelics"}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cpu_profile(work: Path) -> Path:
    """The Slurm profile with no GPU in any rule: the plan of this run as it ran, on the CPU (the SAE stages
    then count their device memory on the host: score's SAE, 0.62x of the measured peak when it did not)."""
    cfg = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    for resources in (cfg.get("set-resources") or {}).values():
        if isinstance(resources, dict):
            resources["gpu"] = 0
    path = work / "profile-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def collect(run: str) -> dict[str, dict[str, float]]:
    """{stage folder: {max_rss_mb, disk_mb}} from results/{run}/benchmarks/*.tsv and du."""
    results = REPO / "results" / run
    out: dict[str, dict[str, float]] = {}
    for tsv in sorted((results / "benchmarks").glob("*.tsv")):
        with tsv.open() as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        folder = results / tsv.stem
        disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
        out[tsv.stem] = {"max_rss_mb": float(row.get("max_rss") or 0), "disk_mb": disk / 2**20,
                         "s": float(row.get("s") or 0)}
    return out


def plan_stage(folder: Path) -> str:
    """The plan's stage of a results folder: an extraction of the SAE corpus is `sae_extract` (its samples
    were read from corpus.parquet), every other folder its stage name."""
    stage = folder.name.rsplit("-", 1)[0]
    if stage == "extract" and (folder / "manifest.json").exists():
        samples = json.loads((folder / "manifest.json").read_text())["inputs"]["samples"]
        sample_manifest = json.loads((REPO / samples / "manifest.json").read_text())
        if Path(sample_manifest["inputs"].get("data", "")).name == "corpus.parquet":
            return "sae_extract"
    return stage


def table(measured: dict[str, dict[str, float]], plan: dict, run: str) -> str:
    lines = ["| stage folder | wall s | peak RSS (measured) | host peak (plan) | disk (measured) | disk (plan) |",
             "|---|---|---|---|---|---|"]
    stages = plan["stages"]
    for folder, m in measured.items():
        stage = plan_stage(REPO / "results" / run / folder)
        p = stages.get(stage, {})
        jobs = max(1, p.get("jobs", 1))
        host = f"{p['host_peak'] / 2**20:,.0f} MB" if p else "-"
        final = sum(v for k, v in p.get("disk", {}).items() if "during" not in k)  # not the transient checkpoints
        disk = f"{final / jobs / 2**20:,.1f} MB" if p else "-"
        lines.append(f"| {folder}{' (corpus)' if stage == 'sae_extract' else ''} | {m['s']:,.0f} | {m['max_rss_mb']:,.0f} MB | {host} | {m['disk_mb']:,.1f} MB | {disk} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "build" / "real-width"))
    p.add_argument("--run", default="real-width-cpu", help="results/{run}/")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the SAE hooks after the last)")
    p.add_argument("--vocab", type=int, default=32064, help="llava-v1.6-mistral-7b's")
    p.add_argument("--vision-hidden", type=int, default=1024)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--expansion", type=float, default=16, help="d_sae = expansion x hidden (16 x 4096 = 65,536)")
    p.add_argument("--pool", type=int, default=16, help="pool records")
    p.add_argument("--corpus", type=int, default=16, help="SAE-corpus documents (OBELICS layout)")
    p.add_argument("--sae-data", action="store_true", help="train the SAE on the corpus (needs config key sae_data)")
    p.add_argument("--multi-image", action="store_true", help="pool records with extra_images (needs the schema column)")
    p.add_argument("--sizes", type=lambda v: [tuple(int(x) for x in wh.split("x")) for wh in v.split(",")],
                   default=None, help="image sizes WxH,WxH,... (default: photo sizes, 2-5 anyres tiles each)")
    p.add_argument("--max-extra", type=int, default=2, help="pool records get 1..max-extra extra images")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--build-only", action="store_true", help="build model, data and config; run nothing")
    p.add_argument("--config-only", action="store_true",
                   help="write WORK/model with config.json + processor only (no weights), e.g. --layers 32 for the "
                        "7B's shape as `mmsae.plan --model-config` reads it; run nothing")
    p.add_argument("--collect-only", action="store_true", help="only the table of an earlier run")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "config.yaml"
    if a.config_only:
        build_model(work / "model", a, weights=False)
        print(f"wrote {work / 'model'} (config + processor, no weights)")
        return 0
    if not a.collect_only:
        if not (work / "model" / "config.json").is_file():
            build_model(work / "model", a)
        build_data(work, a)
        config_path = write_config(work, a)
        print(f"built {work}: model/, pool.parquet, corpus.parquet, config.yaml")
        if a.build_only:
            return 0
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run(["snakemake", "--cores", str(a.cores), "--configfile", str(config_path)], cwd=REPO, env=env,
                       check=True)
    from mmsae.plan import load_plan_config
    from mmsae.plan import plan as make_plan

    config = load_plan_config(config_path)
    est = make_plan(config, sample_rows=a.pool, profile=cpu_profile(work))
    measured = collect(config["run"])
    out = table(measured, est, a.run)
    (work / "measured.json").write_text(json.dumps({"measured": measured, "plan": est}, indent=2, default=float))
    (work / "measured.md").write_text(out + "\n")
    print(out)
    print(f"plan: {est['sources']['pool']['tokens']:,.0f} pool tokens; measured and plan in {work}/measured.json")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
