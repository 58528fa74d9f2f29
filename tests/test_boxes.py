"""The grounding box codec (Qwen-VL's ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>``, 0..999 coordinates, encoded
x 1000 and decoded / 999 as Qwen-VL's data and evaluation do)."""

from __future__ import annotations

import random
import re

import pytest

from vlmlab.processing.boxes import encode_box, iou, parse_boxes


def test_encode_then_parse_round_trips_within_one_normalised_step():
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        text = encode_box((x1, y1, x2, y2), w, h, ref="it")
        assert all(0 <= int(c) <= 999 for c in re.findall(r"\d+", text))
        (box,) = parse_boxes(text, w, h)
        assert box.ref == "it"
        for got, want, size in zip((box.x1, box.y1, box.x2, box.y2), (x1, y1, x2, y2), (w, h, w, h)):
            assert abs(got - want) <= size / 999 + 1e-9  # one normalised step
            if size <= 999:
                assert abs(got - want) <= 1.0  # within 1 px (SYSTEMS.md §5 invariant 4)


def test_parse_finds_every_box_with_its_phrase_and_skips_malformed_ones():
    text = (
        "Here: <ref>the red circle</ref><box>(100,200),(300,400)</box> <box>(0,0),(10,10)</box> and "
        "<box>(500, 500),(400,400)</box>; broken: <box>(1,2)</box> <box>(a,b),(c,d)</box>"
    )
    boxes = parse_boxes(text, 640, 480)
    assert [b.ref for b in boxes] == ["the red circle", "the red circle", None]
    step_x, step_y = 640 / 999, 480 / 999  # one normalised unit in pixels (decoded / 999)
    assert [b.as_dict()["box"] for b in boxes] == [
        pytest.approx([100 * step_x, 200 * step_y, 300 * step_x, 400 * step_y]),
        pytest.approx([0, 0, 10 * step_x, 10 * step_y]),
        pytest.approx([400 * step_x, 400 * step_y, 500 * step_x, 500 * step_y]),  # corners put in order
    ]
    assert text[slice(*boxes[0].span)] == "<box>(100,200),(300,400)</box>"
    assert parse_boxes("<box>(0,0),(2000,5000)</box>")[0].as_dict()["box"] == [0.0, 0.0, 999.0, 999.0]
    assert parse_boxes("no boxes here") == []


def test_encode_rejects_an_empty_image_and_clips_to_it():
    with pytest.raises(ValueError, match="image size must be positive"):
        encode_box((0, 0, 1, 1), 0, 10)
    assert encode_box((-5, -5, 50, 50), 10, 10) == "<box>(0,0),(999,999)</box>"
    assert encode_box((0, 0, 10, 10), 10, 10) == "<box>(0,0),(999,999)</box>"  # the far edge is 999


def test_iou():
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
