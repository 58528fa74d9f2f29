"""Tests of ``vlmlab.evaluation.evaluate``: result structure, accuracy arithmetic and the blind baseline.

Accuracy is checked against counts computed here from the records' gold answers, with stub models whose answers
are fixed (so the expected accuracy is known exactly); the blind baseline is checked by a stub that inspects the
``pixel_values`` it is given (the blank image is all zeros after normalisation when the mean is an exact 8-bit
colour). A real tiny model checks the result shape and the files ``write_results`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_model
from vlmlab.config import ProcessorConfig
from vlmlab.data.formats import load_records
from vlmlab.data.world import TASKS, build_world
from vlmlab.evaluation.evaluate import evaluate, markdown_table, normalize_answer, predict, write_results
from vlmlab.processing.processor import Processor
from vlmlab.processing.transforms import blank_image, image_to_tensor

N_TEST = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=0, n_per_task={"train": 0, "val": 0, "test": N_TEST}, n_captions=0)
    return out


@pytest.fixture(scope="module")
def records(world):
    return load_records(world / "test.json")


class StubModel:
    """Answers ``answer(pixel_values_of_one_row)`` for every row; records what it was given."""

    def __init__(self, processor: Processor, answer):
        self.processor = processor
        self.answer = answer
        self.calls: list[dict] = []
        self.eval_called = False

    def eval(self):
        self.eval_called = True
        return self

    def generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        max_new_tokens=8,
        eos_token_id=None,
        pad_token_id=0,
        **_,
    ):
        self.calls.append({"input_ids": input_ids, "pixel_values": pixel_values})
        tok = self.processor.tokenizer
        # One image per record in the world: row i's image is pixel_values[i].
        rows = [
            tok.encode(self.answer(pixel_values[i]), add_special_tokens=False) + [tok.eos_token_id]
            for i in range(input_ids.shape[0])
        ]
        width = max(len(r) for r in rows) + 2
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])[:, :max_new_tokens]


def golds(records, task):
    return [r.messages[-1]["content"] for r in records if r.task == task]


def test_accuracy_of_a_model_that_always_answers_red(tokenizer, records):
    _, proc = make_model(tokenizer)
    stub = StubModel(proc, lambda pix: "Red.")  # normalisation: case and punctuation do not matter
    result, rows = evaluate(stub, proc, records, batch_size=7)
    assert stub.eval_called
    for task in TASKS:
        g = golds(records, task)
        assert result["tasks"][task]["n"] == len(g) == N_TEST
        want = sum(a == "red" for a in g) / len(g)
        assert result["tasks"][task]["accuracy"] == want
        assert result["tasks"][task]["blind_accuracy"] == want  # the stub ignores the image
    assert 0 < result["tasks"]["colour"]["accuracy"] < 1  # the world has red and non-red colour answers
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert all(r["prediction"] == "Red." for r in rows)
    assert all(r["correct"] == (r["answer"] == "red") for r in rows)
    # Two passes (image and blind), each in batches of at most 7.
    assert len(stub.calls) == 2 * -(-len(records) // 7)


def test_accuracy_of_a_model_that_always_answers_the_gold(tokenizer, records):
    _, proc = make_model(tokenizer)
    answers = iter([r.messages[-1]["content"] for r in records] * 2)
    stub = StubModel(proc, lambda pix: next(answers))
    result, _ = evaluate(stub, proc, records, batch_size=64, max_new_tokens=32)
    assert all(t["accuracy"] == 1.0 and t["blind_accuracy"] == 1.0 for t in result["tasks"].values())


def test_blind_pass_sends_blank_images(tokenizer, records):
    """With an exactly representable mean the blank image is exactly zero after normalisation; the stub answers
    "blue" for a blank image and "red" otherwise, so blind accuracy counts the blue answers."""
    cfg = ProcessorConfig(image_size=32, image_mean=(0.4, 0.2, 0.6), image_std=(0.25, 0.5, 0.125))
    proc = Processor(tokenizer, cfg, num_image_tokens=16)
    assert torch.equal(image_to_tensor(blank_image(cfg), cfg), torch.zeros(3, 32, 32))
    stub = StubModel(proc, lambda pix: "blue" if not pix.any() else "red")
    result, rows = evaluate(stub, proc, records)
    seeing, blind = stub.calls
    assert seeing["pixel_values"].shape == blind["pixel_values"].shape == (len(records), 3, 32, 32)
    assert (seeing["pixel_values"].flatten(1) != 0).any(dim=1).all()  # every real image is non-blank
    assert not blind["pixel_values"].any()
    assert torch.equal(seeing["input_ids"], blind["input_ids"])  # same questions, only the pixels differ
    g = golds(records, "colour")
    assert result["tasks"]["colour"]["accuracy"] == sum(a == "red" for a in g) / len(g)
    assert result["tasks"]["colour"]["blind_accuracy"] == sum(a == "blue" for a in g) / len(g)
    assert all(r["blind_prediction"] == "blue" and r["prediction"] == "red" for r in rows)


def test_blank_image_is_the_mean_colour_within_quantisation(tiny_model):
    """For means that are not exact 8-bit colours (CLIP's), the blank image is within half an 8-bit step."""
    _, proc = tiny_model
    cfg = proc.config
    x = image_to_tensor(blank_image(cfg), cfg)
    bound = torch.tensor([0.5 / 255 / s for s in cfg.image_std]).view(3, 1, 1) + 1e-6
    assert (x.abs() <= bound).all()


def test_no_blind_baseline(tokenizer, records):
    _, proc = make_model(tokenizer)
    stub = StubModel(proc, lambda pix: "red")
    result, rows = evaluate(stub, proc, records, blind_baseline=False)
    assert len(stub.calls) == 1
    assert all(t["blind_accuracy"] is None for t in result["tasks"].values())
    assert "| colour |" in markdown_table(result)


def test_evaluate_a_tiny_model_and_write_results(tiny_model, records, tmp_path):
    model, proc = tiny_model
    result, rows = evaluate(model, proc, records, max_new_tokens=4)
    assert set(result["tasks"]) == set(TASKS)
    for task, t in result["tasks"].items():
        assert set(t) == {"accuracy", "blind_accuracy", "n"}
        assert t["n"] == N_TEST
        assert 0.0 <= t["accuracy"] <= 1.0 and 0.0 <= t["blind_accuracy"] <= 1.0
        # Accuracy is the fraction of rows marked correct, and "correct" is normalised exact match.
        task_rows = [r for r in rows if r["task"] == task]
        assert t["accuracy"] == sum(r["correct"] for r in task_rows) / N_TEST
    for r in rows:
        assert r["correct"] == (normalize_answer(r["prediction"]) == normalize_answer(r["answer"]))
    # Predictions are what predict() returns for the same records: evaluation adds nothing of its own.
    # The budget is the asked 4 tokens or the longest answer's (plus the end of turn), whichever is larger.
    budget = result["settings"]["decoding"]["max_new_tokens"]
    longest = max(len(proc.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
    assert budget == max(4, longest + 2)
    assert [r["prediction"] for r in rows] == predict(model, proc, records, max_new_tokens=budget)
    assert result["settings"]["num_image_tokens"] == proc.num_image_tokens

    write_results(result, rows, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["tasks"] == result["tasks"]
    assert (tmp_path / "out" / "eval.md").read_text() == markdown_table(result)
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == rows
    for task in TASKS:
        assert f"| {task} | {N_TEST} |" in (tmp_path / "out" / "eval.md").read_text()


def test_normalize_answer():
    assert normalize_answer("The Red.") == "red"
    assert normalize_answer("  an  apple, ") == "apple"
    assert normalize_answer("left") != normalize_answer("right")
