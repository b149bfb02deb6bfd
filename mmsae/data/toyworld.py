"""The toy world: coloured shapes with questions, captions, preference pairs and known-bad samples.

Each image is 32x32 with two objects (left, right) of distinct shapes and distinct colours. Every
sample carries its ground truth: the objects with their boxes (for patch-level concept labels) and a
`corruption` kind (null when clean). Three splits come from independent random streams:

- train:   clean samples the toy model learns from (includes the image-free text-only task);
- pool:    the data set the pipeline scores and filters, with `corruption_rate` bad samples;
- heldout: clean questions for exact-match evaluation of a model.

Two settings (`setting`), with the same train split (so the same starting model):

- recognition: pool and heldout ask the train split's own questions (captions, colour / shape Q/A,
  one-word answers). A model trained on the train split already knows them.
- alignment:   pool and heldout teach and test skills the train split never shows, on new images:
  question types the starting model has never seen (ALIGN_MIX), answers of several words in four
  phrasings of different lengths ("square", "a square", "it is a square", "the left object is a
  square"), and a preference pair [good, poor] whose poor response is wrong or unhelpful. The starting
  model has learnt vision-language alignment (colours, shapes, where they are) but not these skills.

Stage toyworld (`run`): writes the synthetic data set with ground truth. Outputs (in --out):
train.parquet (clean, for the toy model), pool.parquet (the data set that is scored, with known-bad
samples), heldout.parquet (clean benchmark), manifest.json.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from mmsae.artifacts import Timer, atomic_dir, write_manifest
from mmsae.data.toyvocab import COLOURS, CONCEPTS, SHAPES, SIDES, UNHELPFUL
from mmsae.params import ToyworldParams

# how each colour word (toyvocab.COLOURS) is drawn
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
IMAGE_SIZE = 32
# unhelpful: a fluent response that does not help (toyvocab.UNHELPFUL) is preferred over the right one
CORRUPTION_KINDS = ("mismatch", "wrong_answer", "noise_image", "text_only", "unhelpful")
SETTINGS = ("recognition", "alignment")
QA_TASKS = ("color_of_shape", "shape_on_side", "color_on_side")
# The toy model's training mix: captions teach word<->patch grounding, Q/A teaches reading the image,
# the text-only task keeps the concept words meaningful without an image.
TRAIN_MIX = {"caption": 0.40, "color_of_shape": 0.15, "shape_on_side": 0.15, "color_on_side": 0.15, "text_only": 0.15}
POOL_MIX = {"caption": 0.40, "color_of_shape": 0.20, "shape_on_side": 0.20, "color_on_side": 0.20}
# The alignment setting's pool and heldout: question types the train split never asks. side_of and
# next_to are defined (answer_for, answer_match know them) but left out of the mix: the toy model did not
# learn them from the clean pool (seed 0, 600 steps at lr 1e-3: answer match 0.52 / 0.57 held out and
# 0.60 / 0.82 on the samples it trained on), so they would cap the clean-pool ceiling, not measure data.
# describe_shape asks "what is the square ?", not "describe the square ?": worded with "describe" it kept the
# caption habit of "describe ?" (the left object's colour and shape) and capped the clean-pool score at 0.87.
ALIGN_MIX = {"object_of_colour": 1 / 3, "describe_side": 1 / 3, "describe_shape": 1 / 3}
ALIGN_TASKS = tuple(ALIGN_MIX)
# Per task: the question and four phrasings of the answer, shortest first. {a} is the answer's core
# (a side, a shape, a colour or "colour shape"); the other fields name the object asked about. The long forms
# repeat the question's words, so a long answer is not harder per token than a short one.
ALIGN_QUESTIONS = {
    "side_of": "which side is the {colour} {shape} on ?",
    "object_of_colour": "what is the {colour} object ?",
    "describe_side": "describe the {side} object ?",
    "describe_shape": "what is the {shape} ?",
    "next_to": "what is next to the {shape} ?",
}
ALIGN_PHRASINGS = {
    "side_of": ("{a}", "on the {a}", "it is on the {a}", "the {colour} {shape} is on the {a}"),
    "object_of_colour": ("{a}", "a {a}", "it is a {a}", "the {colour} object is a {a}"),
    "describe_side": ("{a}", "a {a}", "it is a {a}", "the {side} object is a {a}"),
    "describe_shape": ("{a} {shape}", "a {a} {shape}", "it is a {a} {shape}", "the {shape} is {a}"),
    "next_to": ("{a}", "a {a}", "it is a {a}", "the {a} is next to the {shape}"),
}

@dataclass
class Scene:
    objects: list[dict]  # [{side, colour, shape, bbox: [x0, y0, x1, y1]}], left first

    def by_side(self, side: str) -> dict:
        return self.objects[SIDES.index(side)]

    def caption(self) -> str:
        return " ".join(f"{o['colour']} {o['shape']}" for o in self.objects)


def random_scene(rng: np.random.Generator) -> Scene:
    colours = rng.choice(list(COLOURS), size=2, replace=False)
    shapes = rng.choice(SHAPES, size=2, replace=False)
    objects = []
    for i, side in enumerate(SIDES):
        r = int(rng.integers(5, 8))
        cx = int(rng.integers(7, 10)) + 16 * i
        cy = int(rng.integers(9, 23))
        objects.append(
            {"side": side, "colour": str(colours[i]), "shape": str(shapes[i]), "bbox": [cx - r, cy - r, cx + r, cy + r]}
        )
    return Scene(objects)


def draw_object(draw: ImageDraw.ImageDraw, o: dict, fill: int | tuple[int, ...]) -> None:
    """Draw one object's shape inside its bbox (render's pixels; also its ground-truth mask)."""
    x0, y0, x1, y1 = o["bbox"]
    if o["shape"] == "square":
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=fill)
    elif o["shape"] == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def object_mask(objects: list[dict], size: int = IMAGE_SIZE) -> np.ndarray:
    """bool [size, size]: the pixels the objects cover, drawn exactly as render draws them."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw_object(draw, o, 255)
    return np.asarray(img) > 0


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    bg = rng.integers(20, 60, size=3)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        base = np.array(COLOUR_RGB[o["colour"]])
        draw_object(draw, o, tuple(int(c) for c in np.clip(base + rng.integers(-25, 26, size=3), 0, 255)))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def unrelated_image(rng: np.random.Generator) -> Image.Image:
    """Pure noise or an off-distribution pattern (stripes, gradient): nothing the text could describe."""
    kind = rng.integers(3)
    if kind == 0:
        arr = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    elif kind == 1:
        period = int(rng.integers(2, 6))
        stripes = (np.arange(IMAGE_SIZE) // period) % 2
        arr = np.repeat(stripes[None, :, None] * rng.integers(80, 256, size=3), IMAGE_SIZE, axis=0)
    else:
        ramp = np.linspace(0, 1, IMAGE_SIZE)
        arr = ramp[None, :, None] * rng.integers(0, 256, size=3) + ramp[:, None, None] * rng.integers(0, 256, size=3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _other(rng: np.random.Generator, options: list[str] | tuple[str, ...], not_this: str) -> str:
    return str(rng.choice([o for o in options if o != not_this]))


def make_text(task: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, correct answer, a wrong answer) for a task about `scene`."""
    if task == "caption":
        right = scene.caption()
        words = right.split()
        j = int(rng.integers(len(words)))
        words[j] = _other(rng, list(COLOURS) if j % 2 == 0 else SHAPES, words[j])
        return "describe ?", right, " ".join(words)
    if task == "color_of_shape":
        o = scene.objects[int(rng.integers(2))]
        return f"what color is the {o['shape']} ?", o["colour"], _other(rng, list(COLOURS), o["colour"])
    if task == "shape_on_side":
        side = str(rng.choice(SIDES))
        o = scene.by_side(side)
        return f"what shape is on the {side} ?", o["shape"], _other(rng, SHAPES, o["shape"])
    if task == "color_on_side":
        side = str(rng.choice(SIDES))
        o = scene.by_side(side)
        return f"what color is on the {side} ?", o["colour"], _other(rng, list(COLOURS), o["colour"])
    if task == "text_only":
        word = str(rng.choice(list(COLOURS) + list(SHAPES)))
        right = "color" if word in COLOURS else "shape"
        return f"is {word} a color or a shape ?", right, "shape" if right == "color" else "color"
    raise ValueError(f"unknown task {task!r}")


def _align_core(task: str, scene: Scene, o: dict) -> str:
    """The core of the right answer to an alignment question about object `o` of `scene`."""
    other = scene.objects[1 - scene.objects.index(o)]
    return {"side_of": o["side"], "object_of_colour": o["shape"], "describe_side": f"{o['colour']} {o['shape']}",
            "describe_shape": o["colour"], "next_to": f"{other['colour']} {other['shape']}"}[task]


def _wrong_core(task: str, core: str, rng: np.random.Generator) -> str:
    """A plausible wrong core: another side, or one concept word of the core swapped for another."""
    if task == "side_of":
        return _other(rng, SIDES, core)
    words = core.split()
    j = int(rng.integers(len(words)))
    words[j] = _other(rng, list(COLOURS) if words[j] in COLOURS else SHAPES, words[j])
    return " ".join(words)


def make_align_text(task: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str, str, str]:
    """(question, right answer, wrong answer, unhelpful answer) for an alignment task about `scene`.
    The right and wrong answers share one phrasing, drawn uniformly from the task's four."""
    o = scene.objects[int(rng.integers(2))]
    fields = {"colour": o["colour"], "shape": o["shape"], "side": o["side"]}
    question = ALIGN_QUESTIONS[task].format(**fields)
    phrasing = ALIGN_PHRASINGS[task][int(rng.integers(len(ALIGN_PHRASINGS[task])))]
    core = _align_core(task, scene, o)
    right = phrasing.format(a=core, **fields)
    wrong = phrasing.format(a=_wrong_core(task, core, rng), **fields)
    return question, right, wrong, str(rng.choice(UNHELPFUL))


def _concepts_of(text: str) -> list[str]:
    return [w for w in text.split() if w in CONCEPTS]


def answer_for(question: str, scene: Scene) -> str | None:
    """The correct answer to `question` about `scene`, or None if the question does not apply (for an
    alignment question: the answer's core, e.g. "left", "square" or "red square")."""
    words = question.split()
    for task, template in ALIGN_QUESTIONS.items():
        head = template.split("{")[0].split()
        if words[: len(head)] == head and len(words) == len(template.split()):
            asked = _concepts_of(question)
            for o in scene.objects:
                if asked and all(w in (o["colour"], o["shape"], o["side"]) for w in asked):
                    return _align_core(task, scene, o)
            return None
    if question == "describe ?":
        return scene.caption()
    if words[:3] == ["what", "color", "is"] and words[3] == "the":
        hits = [o["colour"] for o in scene.objects if o["shape"] == words[4]]
        return hits[0] if hits else None
    if words[:4] == ["what", "shape", "is", "on"]:
        return scene.by_side(words[5])["shape"]
    if words[:4] == ["what", "color", "is", "on"]:
        return scene.by_side(words[5])["colour"]
    return None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _texts(task: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str, str, str, str]:
    """(question, right, poor, unhelpful, the right answer as answer_for gives it) for a task about
    `scene`. Recognition tasks: poor = the wrong answer and no other draw (the pool stays as it was);
    alignment tasks: poor = the wrong or the unhelpful answer, one each half of the time."""
    if task in ALIGN_MIX:
        question, right, wrong, unhelpful = make_align_text(task, scene, rng)
        core = answer_for(question, scene)
        poor = wrong if rng.random() < 0.5 else unhelpful
        return question, right, poor, unhelpful, str(core)
    question, right, wrong = make_text(task, scene, rng)
    return question, right, wrong, "", right


def make_sample(rng: np.random.Generator, task: str, corruption: str | None, sample_id: str) -> dict:
    scene = random_scene(rng)
    image = render(scene, rng)
    if corruption == "text_only":
        task = "text_only"
    question, right, poor, unhelpful, core = _texts(task, scene, rng)
    if corruption == "mismatch":
        # Text written for another scene, re-drawn until it is actually wrong for this image.
        while True:
            question, right, poor, unhelpful, core = _texts(task, random_scene(rng), rng)
            if answer_for(question, scene) != core:
                break
    elif corruption == "noise_image":
        image = unrelated_image(rng)
    elif corruption == "wrong_answer" and task in ALIGN_MIX:
        poor = make_align_wrong(question, right, core, task, rng)
    elif corruption == "unhelpful":
        poor = unhelpful or str(rng.choice(UNHELPFUL))
    responses = [right, poor]
    # wrong answer / unhelpful: the poor response is preferred
    preferred = 1 if corruption in ("wrong_answer", "unhelpful") else 0
    if rng.random() < 0.5:  # preferred response is not always first
        responses.reverse()
        preferred = 1 - preferred
    return {
        "sample_id": sample_id,
        "question": question,
        "image": _png(image),
        "responses": responses,
        "preferred": preferred,
        "corruption": corruption,
        "task": task,
        "objects": json.dumps(scene.objects),
    }


def make_align_wrong(question: str, right: str, core: str, task: str, rng: np.random.Generator) -> str:
    """The right answer with its core swapped for a wrong one (same phrasing): the preferred response of
    a `wrong_answer` sample in the alignment setting (its poor response may have been the unhelpful one)."""
    words, core_words = right.split(), core.split()
    n = len(core_words)
    start = next(i for i in range(len(words) - n + 1) if words[i : i + n] == core_words)
    return " ".join(words[:start] + _wrong_core(task, core, rng).split() + words[start + n :])


def _split(seed: int, split: int, n: int, mix: dict[str, float], corruption_rate: float,
           kinds: tuple[str, ...] | list[str], prefix: str) -> pd.DataFrame:
    rng = np.random.default_rng([seed, split])
    tasks = rng.choice(list(mix), size=n, p=np.array(list(mix.values())) / sum(mix.values()))
    n_bad = int(round(corruption_rate * n)) if kinds else 0
    corruptions: list[str | None] = [None] * n
    bad_idx = rng.permutation(n)[:n_bad]
    for j, i in enumerate(bad_idx):
        corruptions[i] = kinds[j % len(kinds)]
    width = len(str(max(n - 1, 1)))
    rows = [make_sample(rng, str(tasks[i]), corruptions[i], f"{prefix}{i:0{width}d}") for i in range(n)]
    df = pd.DataFrame(rows)
    df["corruption"] = df["corruption"].astype("string")
    return df


def generate(seed: int, n_samples: int, corruption_rate: float, corruption_kinds: list[str],
             n_train: int, n_heldout: int, setting: str = "recognition") -> dict[str, pd.DataFrame]:
    """The three splits. The train split does not depend on `setting`: both settings start from the
    same model; pool and heldout ask the train split's questions (recognition) or new ones (alignment)."""
    unknown = set(corruption_kinds) - set(CORRUPTION_KINDS)
    if unknown:
        raise ValueError(f"unknown corruption kinds {sorted(unknown)}; known: {CORRUPTION_KINDS}")
    if setting not in SETTINGS:
        raise ValueError(f"unknown toy world setting {setting!r}; known: {SETTINGS}")
    mix = ALIGN_MIX if setting == "alignment" else POOL_MIX
    return {
        "train": _split(seed, 0, n_train, TRAIN_MIX, 0.0, (), "train-"),
        "pool": _split(seed, 1, n_samples, mix, corruption_rate, tuple(corruption_kinds), "pool-"),
        "heldout": _split(seed, 2, n_heldout, mix, 0.0, (), "heldout-"),
    }


def patch_concepts(objects_json: str, grid: int, image_size: int = IMAGE_SIZE, min_cover: float = 0.25) -> list[set[str]]:
    """Concept words present in each patch (row-major over a grid x grid layout).

    A patch shows an object's colour and shape when the object's box covers at least `min_cover` of
    the patch: the ground truth for "does this feature fire on blue patches".
    """
    objects = json.loads(objects_json)
    step = image_size / grid
    out: list[set[str]] = []
    for r in range(grid):
        for c in range(grid):
            px0, py0, px1, py1 = c * step, r * step, (c + 1) * step, (r + 1) * step
            concepts: set[str] = set()
            for o in objects:
                x0, y0, x1, y1 = o["bbox"]
                ix = max(0.0, min(px1, x1) - max(px0, x0))
                iy = max(0.0, min(py1, y1) - max(py0, y0))
                if ix * iy >= min_cover * step * step:
                    concepts |= {o["colour"], o["shape"]}
            out.append(concepts)
    return out


STAGE = "toyworld"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    """The toy world reads nothing: its config slice is all it needs."""


def run(inputs: Inputs, params: ToyworldParams, out: Path) -> None:
    timer = Timer()
    with atomic_dir(out) as tmp:
        with timer("generate"):
            splits = generate(params.seed, params.n_samples, params.corruption_rate, params.corruption_kinds,
                              params.n_train, params.n_heldout, params.setting)
        for name, df in splits.items():  # train.parquet, pool.parquet, heldout.parquet
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        pool = splits["pool"]
        counts = {f"n_{k}": len(v) for k, v in splits.items()}
        counts["pool_corruption"] = pool["corruption"].fillna("clean").value_counts().sort_index().to_dict()
        write_manifest(tmp, STAGE, params.as_dict(), {}, counts, timer.timings)
