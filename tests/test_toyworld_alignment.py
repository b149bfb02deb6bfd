"""The toy world's alignment setting: new question types, multi-word answers in varied phrasings, a
[good, poor] preference, the `unhelpful` kind, and the `answer_match` metric that fits them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mmsae.data import toyvocab, toyworld
from mmsae.data.toyworld import ALIGN_TASKS, CORRUPTION_KINDS, Scene, answer_for, generate
from mmsae.evaluation import benchmarks as bm
from mmsae.models import toy
from mmsae.models.toy.evaluation import answer_match


@pytest.fixture(scope="module")
def world():
    return generate(seed=5, n_samples=400, corruption_rate=0.5, corruption_kinds=list(CORRUPTION_KINDS),
                    n_train=40, n_heldout=60, setting="alignment")


def _preferred(row) -> str:
    return list(row.responses)[int(row.preferred)]


def _other(row) -> str:
    return list(row.responses)[1 - int(row.preferred)]


def test_pool_and_heldout_ask_only_new_questions_with_every_kind(world):
    pool, heldout = world["pool"], world["heldout"]
    assert set(heldout["task"]) == set(ALIGN_TASKS) and heldout["corruption"].isna().all()
    assert set(pool["task"]) == {*ALIGN_TASKS, "text_only"}  # text_only only as the corruption
    counts = pool["corruption"].value_counts()
    assert {k: counts[k] for k in CORRUPTION_KINDS} == dict.fromkeys(CORRUPTION_KINDS, 40)
    train_tasks = set(world["train"]["task"])
    assert not train_tasks & set(ALIGN_TASKS)  # the starting model never saw these question types
    train_questions = {q.split()[0] + " " + q.split()[1] for q in world["train"]["question"]}
    assert not train_questions & {q.split()[0] + " " + q.split()[1] for q in heldout["question"]} - {"what is"}


def test_train_split_does_not_depend_on_the_setting(world):
    recognition = generate(seed=5, n_samples=400, corruption_rate=0.5, corruption_kinds=list(CORRUPTION_KINDS),
                           n_train=40, n_heldout=60)
    pd.testing.assert_frame_equal(world["train"], recognition["train"])
    assert not recognition["heldout"]["task"].isin(ALIGN_TASKS).any()


def test_clean_answers_are_right_for_the_scene_and_poor_ones_are_not(world):
    clean = pd.concat([world["pool"][world["pool"]["corruption"].isna()], world["heldout"]])
    poor_kinds = set()
    for row in clean.itertuples():
        truth = answer_for(row.question, Scene(json.loads(row.objects)))
        assert truth is not None and truth in _preferred(row), row.sample_id
        assert answer_match(_preferred(row), truth, row.question), row.sample_id
        assert not answer_match(_other(row), truth, row.question), row.sample_id
        poor_kinds.add("unhelpful" if _other(row) in toyvocab.UNHELPFUL else "wrong")
    assert poor_kinds == {"unhelpful", "wrong"}


def _shows_its_objects(row) -> bool:
    """Is each object's mean colour, over the pixels its shape covers, near the colour it is drawn in?"""
    pixels = toy.decode_images([row.image])[0].permute(1, 2, 0).float().numpy()
    for o in json.loads(row.objects):
        mean = pixels[toyworld.object_mask([o])].mean(0)
        if abs(mean - np.array(toyworld.COLOUR_RGB[o["colour"]])).max() > 40:
            return False
    return True


def test_each_corruption_kind_is_really_bad(world):
    pool = world["pool"].dropna(subset=["corruption"])
    for row in pool.itertuples():
        truth = answer_for(row.question, Scene(json.loads(row.objects)))
        good = truth is not None and answer_match(_preferred(row), truth, row.question)
        if row.corruption in ("mismatch", "wrong_answer", "unhelpful"):
            assert not good, row.sample_id
        if row.corruption == "wrong_answer":
            assert answer_match(_other(row), truth, row.question)  # the right answer is the rejected one
            assert _preferred(row) not in toyvocab.UNHELPFUL
        if row.corruption == "unhelpful":
            assert _preferred(row) in toyvocab.UNHELPFUL and answer_match(_other(row), truth, row.question)
        if row.corruption == "noise_image":  # the text is right for the scene; the image does not show it
            assert good
            assert not _shows_its_objects(row)
        else:
            assert _shows_its_objects(row), row.sample_id
        if row.corruption == "text_only":
            assert row.task == "text_only" and truth is None


def test_answers_vary_in_phrasing_and_length(world):
    clean = world["pool"][world["pool"]["corruption"].isna()]
    for task in ALIGN_TASKS:
        lengths = {len(_preferred(r).split()) for r in clean[clean["task"] == task].itertuples()}
        assert len(lengths) >= 3, (task, lengths)
    assert max(len(_preferred(r).split()) + 1 for r in clean.itertuples()) <= toy.MAX_NEW_TOKENS


def test_questions_sharing_a_head_get_their_own_answer():
    """ "what is the square ?" (describe_shape: its colour) and "what is the red object ?" (object_of_colour:
    its shape) share "what is the"; answer_for must tell them apart."""
    scene = Scene([{"side": "left", "colour": "red", "shape": "circle", "bbox": [2, 2, 12, 12]},
                   {"side": "right", "colour": "blue", "shape": "square", "bbox": [18, 2, 28, 12]}])
    assert answer_for("what is the square ?", scene) == "blue"
    assert answer_for("what is the circle ?", scene) == "red"
    assert answer_for("what is the red object ?", scene) == "circle"
    assert answer_for("what is the triangle ?", scene) is None  # not in the scene


def test_unhelpful_responses_are_fluent_and_name_nothing():
    vocab = set(toy.vocabulary())
    for phrase in toyvocab.UNHELPFUL:
        words = phrase.split()
        assert len(words) >= 3 and set(words) <= vocab
        assert not set(words) & toyvocab.CONCEPTS
    # no right answer holds an unhelpful phrase (answer_match would fail it)
    for phrasings in toyworld.ALIGN_PHRASINGS.values():
        for p in phrasings:
            text = f" {p.format(a='red square', colour='blue', shape='circle', side='left')} "
            assert not any(f" {u} " in text for u in toyvocab.UNHELPFUL)


def test_vocabulary_covers_every_word_of_both_settings(world):
    tok = toy.build_tokenizer()
    recognition = generate(seed=5, n_samples=200, corruption_rate=0.5, corruption_kinds=list(CORRUPTION_KINDS),
                           n_train=100, n_heldout=20)
    for splits in (world, recognition):
        for df in splits.values():
            for row in df.itertuples():
                for text in (row.question, *row.responses):
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    assert tok.unk_token_id not in ids, text


@pytest.mark.parametrize(("answer", "reference", "question", "expected"), [
    ("left", "the red square is on the left", "which side is the red square on ?", True),
    ("it is on the left", "left", "which side is the red square on ?", True),
    ("the red square is on the left", "on the left", "which side is the red square on ?", True),
    ("right", "left", "which side is the red square on ?", False),
    ("left right", "left", "which side is the red square on ?", False),
    ("left i can not tell", "left", "which side is the red square on ?", False),  # a refusal fails
    ("it is an object", "a circle", "what is the blue object ?", False),
    ("", "a circle", "what is the blue object ?", False),
    ("the blue circle is next to the square", "blue circle", "what is next to the square ?", True),
    ("circle blue", "blue circle", "what is next to the square ?", False),  # order counts
    ("a red square", "the left object is a red square", "describe the left object ?", True),
    ("a red circle", "the left object is a red square", "describe the left object ?", False),
    ("color", "color", "is red a color or a shape ?", True),  # no concept words: exact match
    ("it is a color", "color", "is red a color or a shape ?", False),
])
def test_answer_match_on_hand_built_cases(answer, reference, question, expected):
    assert answer_match(answer, reference, question) is expected


class SaysOnTheLeft(torch.nn.Module):
    """Answers "on the left" to everything: a stand-in model for a hand-checkable answer match."""

    def __init__(self, ids: list[int]):
        super().__init__()
        self.ids = ids

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([self.ids]).expand(len(input_ids), len(self.ids))], 1)


def test_toy_benchmark_reports_answer_match_per_task(world):
    processor = toy.build_processor()
    tok = processor.tokenizer
    df = world["heldout"].iloc[:4].copy()
    cases = [("side_of", "which side is the red square on ?", "the red square is on the left"),
             ("side_of", "which side is the red square on ?", "right"),
             ("describe_side", "describe the left object ?", "a red square"),
             ("side_of", "which side is the blue circle on ?", "on the left")]
    df["task"] = [c[0] for c in cases]
    df["question"] = [c[1] for c in cases]
    df["responses"] = [[c[2], "i can not tell"] for c in cases]
    df["preferred"] = 0
    model = SaysOnTheLeft(tok.convert_tokens_to_ids(["on", "the", "left"]) + [tok.eos_token_id])
    frame, summary = bm.toy_benchmark(model, processor, df)
    assert frame["answer"].tolist() == ["on the left"] * 4
    assert frame["answer_match"].tolist() == [True, False, False, True]
    assert frame["correct"].tolist() == [False, False, False, True]
    assert summary["answer_match"] == 0.5 and summary["exact_match"] == 0.25
    assert summary["answer_match_by_task"] == {"describe_side": 0.0, "side_of": round(2 / 3, 4)}
