"""Grounding (Qwen-VL, SYSTEMS.md §5): the world's ``ground`` task, its IoU@0.5 scoring in evaluation, and
Qwen-VL's ``Picture k: <img>..</img>`` prompt format. The box codec itself is tested in tests/test_boxes.py."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

import vlmlab
from vlmlab.data.world import build_world
from vlmlab.data.world.grounding import ground_box, phrase, size_class
from vlmlab.data.world.scenes import render
from vlmlab.data.world.tasks import TASK_SPECS
from vlmlab.evaluation.evaluate import TASK_MIN_NEW_TOKENS, evaluate, score_answer
from vlmlab.processing.boxes import box_hit, iou, parse_boxes


def test_ground_answers_parse_back_to_the_drawn_object():
    rng = random.Random(0)
    spec = TASK_SPECS["ground"]
    assert spec.answers is None  # free text: scored by IoU, not by an answer set
    for i in range(60):
        sample = spec.make(rng, spec.targets[i % len(spec.targets)])
        scene = sample.scene
        target, *others = scene.objects
        assert 2 <= len(scene.objects) <= 4
        word = size_class(target, scene)
        text = phrase(target, word)
        assert sample.prompt.startswith("<image>\n") and text[len("the ") :] in sample.prompt
        # The phrase is unique: no other object has the same size class, colour and shape.
        assert all(phrase(o, size_class(o, scene)) != text for o in others)
        (box,) = parse_boxes(sample.answer, scene.width, scene.height)
        assert box.ref == text
        assert iou((box.x1, box.y1, box.x2, box.y2), ground_box(target)) > 0.97
        assert all(0 <= int(v) <= 1000 for v in parse_boxes(sample.answer)[0].as_dict()["box"])
        # The box lies on the target's pixels: its colour at the box centre (every shape covers its centre).
        cx, cy = int((box.x1 + box.x2) / 2), int((box.y1 + box.y2) / 2)
        from vlmlab.data.world.scenes import COLOURS

        assert render(scene).getpixel((cx, cy)) == COLOURS[target.colour]


def test_ground_is_an_opt_in_world_task(tmp_path):
    summary = build_world(
        tmp_path, seed=0, n_per_task={"train": 8, "val": 0, "test": 4}, n_captions=0, extra_tasks=("ground",)
    )
    assert summary["counts"]["test"]["ground"] == 4 and summary["answers"]["ground"] is None
    records = json.loads((tmp_path / "test.json").read_text())
    ground = [r for r in records if r["task"] == "ground"]
    assert len(ground) == 4
    for r in ground:
        w, h = Image.open(tmp_path / r["image"]).size
        assert len(parse_boxes(r["conversations"][1]["value"], w, h)) == 1


GOLD = "<ref>the small red circle</ref><box>(100,100),(300,300)</box>"


@pytest.mark.parametrize(
    ("prediction", "hit"),
    [
        (GOLD, True),  # exact
        ("<ref>the small red circle</ref><box>(150,100),(350,300)</box>", True),  # shifted: IoU 0.6
        ("<box>(200,200),(400,400)</box>", False),  # shifted further: IoU 1/7
        ("<ref>the small red circle</ref><box>(100,100),(300,300)", False),  # malformed: no closing tag
        ("<ref>the small red circle</ref><box>(100,100)</box>", False),  # malformed: one corner
        ("red", False),
        ("", False),
    ],
)
def test_ground_is_scored_by_iou_at_one_half(prediction, hit):
    assert box_hit(prediction, GOLD) is hit
    assert score_answer("ground", prediction, GOLD) is hit


def test_other_tasks_keep_exact_match():
    assert score_answer("colour", "Red.", "red") and not score_answer("colour", "blue", "red")
    assert not score_answer("colour", GOLD, "<ref>x</ref><box>(100,100),(300,300)</box>")


def test_evaluate_scores_ground_records_by_iou(tmp_path):
    from vlmlab.data.dataset import load_stage_records

    build_world(
        tmp_path, seed=1, n_per_task={"train": 0, "val": 0, "test": 2}, n_captions=0, extra_tasks=("ground",)
    )
    records = [r for r in load_stage_records(["test.json"], tmp_path, None) if r.task in ("ground", "colour")]
    model, proc = vlmlab.build("qwen-vl-tiny")
    golds = {r.id: r.messages[-1]["content"] for r in records}
    result, rows = evaluate(model, proc, records, blind_baseline=False, max_new_tokens=1)
    assert {row["task"] for row in rows} == {"ground", "colour"}
    for row in rows:  # an untrained model: whatever it says, the row is scored by its task's rule
        assert row["correct"] == score_answer(row["task"], row["prediction"], golds[row["id"]])
    assert TASK_MIN_NEW_TOKENS["ground"] >= len(proc.tokenizer(GOLD)["input_ids"]) + 1


def test_picture_labels_and_img_wrapping_for_several_images():
    model, proc = vlmlab.build("qwen-vl-tiny")
    conv = [{"role": "user", "content": "<image>\n<image>\nDo the two images show the same color?"}]
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    ids = proc.encode(conv, images, add_generation_prompt=True)["input_ids"].tolist()
    n = model.num_image_tokens
    text = proc.tokenizer.decode(ids)
    run = "<image>" * n
    assert f"Picture 1: <img>{run}</img>\nPicture 2: <img>{run}</img>\nDo the two" in text
    assert ids.count(model.config.image_token_id) == 2 * n
