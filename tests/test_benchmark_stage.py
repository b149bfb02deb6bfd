"""Benchmarks: toy exact match, LLaVA-Bench generation + judge (against a local stub server), IFD, CLIP."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import Stub, completion, records_frame, tiny_llava, tiny_records, tiny_tokenizer

from mmsae import cli
from mmsae import finetune as ft
from mmsae.data import toyworld
from mmsae.data.schema import records_from_frame
from mmsae.errors import InputError
from mmsae.evaluation import baselines
from mmsae.evaluation import benchmarks as bm
from mmsae.evaluation import llava_bench as llava
from mmsae.models import format_response, load_model

# -- a stub OpenAI-compatible server on 127.0.0.1 ---------------------------------------------------


@contextlib.contextmanager
def stub_judge(replies: list):
    """Serve POST /v1/chat/completions from `replies` in order (a str = the reply text, an int = that
    HTTP error status; 500 once they run out); records every request. Yields (base URL, requests)."""
    lock = threading.Lock()

    def reply(n, body):
        with lock:
            r = replies.pop(0) if replies else 500
        return (r, {"error": "stub"}) if isinstance(r, int) else completion(r)

    with Stub(reply) as stub:
        yield stub.url, stub.requests


def _bench() -> pd.DataFrame:
    return pd.DataFrame({
        "question_id": [0, 1, 2, 3], "category": ["conv", "conv", "detail", "complex"],
        "image": ["a.jpg", "a.jpg", "b.jpg", "b.jpg"],
        "question": ["What is it?", "Where?", "Describe it.", "Why?"],
        "caption": ["A red square.", "A red square.", "Two shapes.\nOne blue.", "Two shapes.\nOne blue."],
        "reference": ["A square.", "Left.", "A red square and a blue circle.", "Because."],
    })


def test_judge_request_shape_parsing_failures_and_relative_scores(monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-123")
    replies = ["8 6\nAssistant 1 is more detailed.",
               "Assistant 1: 7, Assistant 2: 9\nThe second is better.",
               "I cannot decide between them.",  # malformed: a recorded failure
               503, "**9 3**\nreasons"]  # a 503 is retried
    answers = ["It is a square.", "On the left.", "Shapes.", "No idea."]
    with caplog.at_level(logging.DEBUG), stub_judge(replies) as (url, requests):
        cfg = llava.JudgeConfig(base_url=url, model="judge-x", api_key_env="JUDGE_TEST_KEY", timeout_s=5, retries=2)
        judged = llava.judge_llava_bench(_bench(), answers, cfg)
    assert len(requests) == 5
    for req in requests:
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["Authorization"] == "Bearer sk-test-123"
        body = req["body"]
        assert body["model"] == "judge-x" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["messages"][0]["content"] == llava.SYSTEM_PROMPT
    first = requests[0]["body"]["messages"][1]["content"]
    assert first == ("[Context]\nA red square.\n\n[Question]\nWhat is it?\n\n"
                     "[Assistant 1]\nA square.\n\n[End of Assistant 1]\n\n"
                     "[Assistant 2]\nIt is a square.\n\n[End of Assistant 2]\n\n"
                     f"[System]\n{llava.RULE_PROMPT}\n\n")
    assert "[Context]\nTwo shapes.\nOne blue.\n\n" in requests[2]["body"]["messages"][1]["content"]

    assert judged["judge_ok"].tolist() == [True, True, False, True]
    assert judged["score_reference"].tolist()[:2] == [8.0, 7.0] and judged["score_candidate"].tolist()[:2] == [6.0, 9.0]
    assert math.isnan(judged.loc[2, "score_candidate"]) and "expected 2" in judged.loc[2, "judge_error"]
    assert judged.loc[2, "judge_reply"] == "I cannot decide between them."

    scores = llava.relative_scores(judged)
    assert scores["conv"] == {"n": 2, "n_judged": 2, "n_failed": 0, "mean_reference": 7.5, "mean_candidate": 7.5,
                              "relative": 100.0}
    assert scores["detail"]["n_failed"] == 1 and scores["detail"]["relative"] is None
    assert scores["complex"]["relative"] == pytest.approx(100 * 3 / 9)
    overall = scores["overall"]
    assert (overall["n"], overall["n_failed"]) == (4, 1)
    assert overall["relative"] == pytest.approx(100 * ((6 + 9 + 3) / 3) / ((8 + 7 + 9) / 3))  # 75.0
    assert "sk-test-123" not in caplog.text
    assert "sk-test-123" not in json.dumps(cfg.setup())


def test_judge_both_orders_and_client_errors(monkeypatch):
    bench = _bench().iloc[:2]
    # question 0: reference first "8 6", candidate first "5 7"; question 1: a 400 (not retried), then "6 6"
    with stub_judge(["8 6", "5 7", 400, "6 6"]) as (url, requests):
        cfg = llava.JudgeConfig(base_url=url + "/", model="m", order="both", timeout_s=5, retries=3)
        judged = llava.judge_llava_bench(bench, ["x", "y"], cfg)
    assert len(requests) == 4
    assert "Authorization" not in requests[0]["headers"]
    assert "[Assistant 1]\nx\n" in requests[1]["body"]["messages"][1]["content"]  # candidate shown first
    assert judged.loc[0, "score_reference"] == 7.5 and judged.loc[0, "score_candidate"] == 5.5
    assert not judged.loc[1, "judge_ok"] and "HTTP 400" in judged.loc[1, "judge_error"]  # one order failed: failed
    assert judged.loc[1, "judge_reply_swapped"] == "6 6"
    assert cfg.setup()["order"] == "both"


def test_missing_api_key_variable_is_an_input_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    cfg = llava.JudgeConfig(base_url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(InputError, match="NO_SUCH_JUDGE_KEY"):
        llava.judge_llava_bench(_bench(), ["a"] * 4, cfg)


@pytest.mark.parametrize(("reply", "expected"), [
    ("8 6", (8.0, 6.0)),
    ("8,6\nbecause", (8.0, 6.0)),
    ("\n\n  7.5 9  \nexplanation 1 2 3", (7.5, 9.0)),
    ("Assistant 1: 8, Assistant 2: 6", (8.0, 6.0)),
    ("Scores: 8/10 and 6/10.", (8.0, 6.0)),
    ("**9 3**", (9.0, 3.0)),
])
def test_parse_scores_tolerates_formatting(reply, expected):
    assert llava.parse_scores(reply) == expected


@pytest.mark.parametrize("reply", ["", "   \n", "Assistant 1 did better.\n8 6", "8 6 5", "11 3", "eight six"])
def test_parse_scores_rejects_malformed(reply):
    with pytest.raises(llava.JudgeError):
        llava.parse_scores(reply)


def test_relative_scores_arithmetic():
    judged = pd.DataFrame({
        "category": ["conv", "conv", "detail", "complex", "complex"],
        "score_reference": [10.0, 6.0, 5.0, 8.0, math.nan],
        "score_candidate": [5.0, 6.0, 6.0, 2.0, math.nan],
        "judge_ok": [True, True, True, True, False],
    })
    s = llava.relative_scores(judged)
    assert s["conv"]["relative"] == pytest.approx(100 * 5.5 / 8)
    assert s["detail"]["relative"] == pytest.approx(120.0)
    assert s["complex"]["relative"] == pytest.approx(25.0) and s["complex"]["n_failed"] == 1
    assert s["overall"]["relative"] == pytest.approx(100 * (19 / 4) / (29 / 4))


# -- LLaVA-Bench files, generation, the script --------------------------------------------------


def _bench_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "llava-bench"
    (folder / "images").mkdir(parents=True)
    records = tiny_records(2)
    for i, r in enumerate(records):
        r.image.save(folder / "images" / f"{i:03d}.jpg")
    qs = [{"question_id": 0, "image": "000.jpg", "text": records[0].question, "category": "conv"},
          {"question_id": 1, "image": "001.jpg", "text": "describe ?", "category": "detail"},
          {"question_id": 2, "image": "001.jpg", "text": "what color is on the left ?", "category": "complex"}]
    ctx = [{"id": "000", "image": "000.jpg", "caption": "red square"},
           {"id": "001", "image": "001.jpg", "caption": ["blue circle", "green square"]}]
    ans = [{"question_id": q["question_id"], "text": f"reference {q['question_id']}"} for q in qs]
    for name, rows in (("questions.jsonl", qs), ("context.jsonl", ctx), ("answers_gpt4.jsonl", ans)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_read_llava_bench_and_bad_files(tmp_path):
    folder = _bench_folder(tmp_path)
    bench = llava.read_llava_bench(folder)
    assert bench["category"].tolist() == ["conv", "detail", "complex"]
    assert bench.loc[1, "caption"] == "blue circle\ngreen square" and bench.loc[2, "reference"] == "reference 2"
    (folder / "images" / "001.jpg").unlink()
    with pytest.raises(InputError, match="missing image"):
        llava.read_llava_bench(folder)


def test_benchmark_script_toy_and_llava_bench(tmp_path):
    """End to end on a tiny LLaVA: greedy answers, the stub judge, results.json + per-question parquet."""
    model = tiny_llava(tmp_path)
    heldout = toyworld.generate(0, 10, 0.0, [], 10, 6)["heldout"]
    heldout_path = tmp_path / "heldout.parquet"
    heldout.to_parquet(heldout_path, index=False)
    folder = _bench_folder(tmp_path)
    out = tmp_path / "benchmark-0123abcd"
    with stub_judge(["8 4", "garbled", "6 6"]) as (url, requests):
        params = {"max_new_tokens": 4, "judge": {"base_url": url, "model": "stub", "retries": 0, "timeout_s": 5}}
        argv = ["--model", str(model), "--out", str(out), "--params", json.dumps(params),
                "--toy-heldout", str(heldout_path), "--llava-bench", str(folder)]
        assert cli.stage_main(bm, argv) == 0
    assert len(requests) == 3
    results = json.loads((out / "results.json").read_text())
    assert results["toy"]["n_eval"] == 6 and set(results["toy"]["exact_match_by_task"]) <= set(toyworld.POOL_MIX)
    lb = results["llava_bench"]
    assert lb["judge"]["model"] == "stub" and lb["judge"]["base_url"] == url and lb["judge"]["order"] == "reference_first"
    assert "averaging" in lb["judge"]
    assert lb["scores"]["overall"]["n_failed"] == 1 and lb["scores"]["overall"]["relative"] == pytest.approx(100 * 5 / 7)
    per_q = pd.read_parquet(out / "llava_bench.parquet")
    assert per_q["judge_ok"].tolist() == [True, False, True] and per_q["answer"].map(type).eq(str).all()
    toy = pd.read_parquet(out / "toy.parquet")
    assert list(toy.columns) == ["sample_id", "task", "question", "answer", "reference", "correct", "answer_match",
                                 "answer_logprob"]
    assert results["toy"]["answer_logprob"] == pytest.approx(toy["answer_logprob"].mean(), abs=1e-6)
    assert (toy["answer_logprob"] < 0).all()
    assert json.loads((out / "manifest.json").read_text())["counts"]["llava_bench_judge_failures"] == 1


def test_generate_answer_is_greedy_and_matches_a_manual_decode(tmp_path):
    adapter = load_model(tiny_llava(tmp_path))
    record = tiny_records(1)[0]
    answer = llava.generate_answer(adapter, record.question, record.image, max_new_tokens=3)
    inputs, _ = adapter.build_batch([record], include_response=False)
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(3):  # greedy by hand (no cache): argmax of the last position
            nxt = adapter.model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0, -1].argmax()
            if int(nxt) == adapter.tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    manual = adapter.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == manual


# -- toy benchmark ------------------------------------------------------------------------------


class AlwaysRed(torch.nn.Module):
    """Answers "red" to everything (a stand-in model for a hand-checkable exact match)."""

    def __init__(self, red: int, eos: int):
        super().__init__()
        self.red, self.eos = red, eos

    def generate(self, input_ids, **kwargs):
        tail = torch.tensor([[self.red, self.eos]]).expand(len(input_ids), 2)
        return torch.cat([input_ids, tail], 1)


def test_toy_benchmark_hand_checkable():
    from mmsae.models import toy

    processor = toy.build_processor()
    tok = processor.tokenizer
    df = toyworld.generate(0, 10, 0.0, [], 10, 5)["heldout"].iloc[:5].copy()
    # task, preferred answer: "red" is right for rows 0 and 2 only
    cases = [("color_of_shape", "red"), ("color_on_side", "blue"), ("color_on_side", "red"),
             ("caption", "red square blue circle"), ("shape_on_side", "red")]
    df["task"] = [t for t, _ in cases]
    df["responses"] = [[a, "green"] for _, a in cases]
    df["preferred"] = 0
    df["corruption"] = pd.array([None, None, None, None, "mismatch"], dtype="string")  # row 4: not clean, skipped
    frame, summary = bm.toy_benchmark(AlwaysRed(tok.convert_tokens_to_ids("red"), tok.eos_token_id), processor, df)
    assert frame["answer"].tolist() == ["red"] * 4
    assert frame["correct"].tolist() == [True, False, True, False]
    by_task = {"caption": 0.0, "color_of_shape": 1.0, "color_on_side": 0.5}
    assert summary == {"exact_match": 0.5, "exact_match_by_task": by_task, "answer_match": 0.5,
                       "answer_match_by_task": by_task, "n_eval": 4, "n_not_clean_skipped": 1}


def test_toy_answer_logprob_is_minus_the_response_loss_of_each_question(tmp_path):
    from mmsae.models.loss import response_loss

    adapter = load_model(tiny_llava(tmp_path))
    df = toyworld.generate(0, 10, 0.0, [], 10, 6)["heldout"].iloc[::-1].reset_index(drop=True)
    frame = pd.DataFrame({"sample_id": df["sample_id"].iloc[[2, 0]].astype(str), "task": ["a", "b"]})
    out, summary = bm.toy_answer_logprob(adapter, frame, df, batch_size=1)
    manual = response_loss(adapter, records_from_frame(df.iloc[[2, 0]]), 4, progress=False)["loss"].to_numpy()
    assert out["answer_logprob"].to_numpy() == pytest.approx(-manual, rel=1e-5)  # per question, in frame order
    assert summary["answer_logprob"] == pytest.approx(-manual.mean(), abs=1e-6)
    assert summary["answer_logprob_by_task"] == pytest.approx({"a": -manual[0], "b": -manual[1]}, abs=1e-6)


# -- IFD and CLIP -------------------------------------------------------------------------------


def test_ifd_is_the_ratio_of_two_manual_losses(tmp_path):
    adapter = load_model(tiny_llava(tmp_path))
    records = tiny_records(3)
    got = baselines.ifd_scores(adapter, records, batch_size=2, threshold=1.0)
    tok = adapter.tokenizer
    for r, row in zip(records, got.itertuples(index=False), strict=True):
        resp = tok(format_response(adapter.processor, r.preferred_response), add_special_tokens=False)["input_ids"]
        k = len(resp)
        prompt = adapter.prompt(r)
        inputs = adapter.processor(text=[prompt + format_response(adapter.processor, r.preferred_response)],
                                   images=[r.image], return_tensors="pt")
        with torch.no_grad():
            logits = adapter.model(**inputs).logits[0]
            ids = inputs["input_ids"][0]
            assert ids[-k:].tolist() == resp
            cond = F.cross_entropy(logits[-k - 1:-1], ids[-k:]).item()
            alone_ids = torch.tensor([[tok.bos_token_id, *resp]])
            alone = F.cross_entropy(adapter.model(input_ids=alone_ids).logits[0, :-1], alone_ids[0, 1:]).item()
        assert row.loss_conditioned == pytest.approx(cond, rel=1e-5)
        assert row.loss_answer == pytest.approx(alone, rel=1e-5)
        assert row.ifd == pytest.approx(cond / alone, rel=1e-5) and row.n_tokens == k
    # Li et al.'s selection: IFD below the threshold as is, at or above it ranked below everything
    mid = float(got["ifd"].median())
    scored = baselines.ifd_scores(adapter, records, batch_size=3, threshold=mid)
    for ifd, s in zip(scored["ifd"], scored["ifd_score"], strict=True):
        assert s == pytest.approx(ifd if ifd < mid else mid - ifd)
    assert scored["ifd_score"].max() == scored.loc[scored["ifd"] < mid, "ifd"].max()


def _tiny_clip(tmp_path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tok = tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=8,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=8),
        projection_dim=8)
    torch.manual_seed(0)
    out = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_clip_score_skipped_without_a_model_and_computed_with_one(tmp_path, caplog):
    records = tiny_records(3)
    with caplog.at_level(logging.INFO, logger="mmsae.benchmarks"):
        frame, reason = baselines.clip_scores(records, None)
    assert frame is None and "no CLIP model configured" in reason and reason in caplog.text

    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = _tiny_clip(tmp_path)
    frame, reason = baselines.clip_scores(records, path, "question_response", batch_size=2)
    assert reason is None and frame["sample_id"].tolist() == [r.sample_id for r in records]
    model, tok, ip = CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    r = records[1]
    with torch.no_grad():
        t = tok([f"{r.question} {r.preferred_response}"], return_tensors="pt", truncation=True, max_length=16)
        img = model.get_image_features(pixel_values=ip(images=[r.image], return_tensors="pt")["pixel_values"]).pooler_output
        txt = model.get_text_features(**t).pooler_output
    assert frame.loc[1, "clip_score"] == pytest.approx(F.cosine_similarity(img, txt).item(), abs=1e-5)


def test_baseline_scores_script(tmp_path):
    model = tiny_llava(tmp_path)
    samples = tmp_path / "sample-x"
    samples.mkdir()
    records_frame(tiny_records(4)).to_parquet(samples / "samples.parquet", index=False)
    out = tmp_path / "baseline_scores-0123abcd"
    argv = ["--samples", str(samples), "--model", str(model), "--out", str(out), "--params", '{"batch_size": 3}']
    assert cli.stage_main(baselines, argv) == 0
    ifd = pd.read_parquet(out / "ifd.parquet")
    assert len(ifd) == 4 and set(ifd.columns) >= {"sample_id", "ifd", "ifd_score"}
    # the stage reads its images batch by batch (ParquetRecords); the scores are those of the decoded records
    want = baselines.ifd_scores(load_model(model), tiny_records(4), batch_size=3)
    pd.testing.assert_frame_equal(ifd, want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "no CLIP model configured" in manifest["counts"]["clip_skipped"] and not (out / "clip.parquet").exists()


def test_scripts_answer_help():
    for module in (bm, baselines, ft):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
            cli.stage_main(module, ["--help"])
        assert exc.value.code == 0 and "--out" in buf.getvalue()
