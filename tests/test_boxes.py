"""The grounding box codec (Qwen-VL's ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>``, 0-1000 coordinates)."""

from __future__ import annotations

import random

import pytest

from vlmlab.processing.boxes import encode_box, iou, parse_boxes


def test_encode_then_parse_round_trips_within_one_normalised_step():
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        (box,) = parse_boxes(encode_box((x1, y1, x2, y2), w, h, ref="it"), w, h)
        assert box.ref == "it"
        for got, want, size in zip((box.x1, box.y1, box.x2, box.y2), (x1, y1, x2, y2), (w, h, w, h)):
            assert want - size / 1000 <= got <= want + 1e-9  # int() truncates to the step below


def test_parse_finds_every_box_with_its_phrase_and_skips_malformed_ones():
    text = (
        "Here: <ref>the red circle</ref><box>(100,200),(300,400)</box> <box>(0,0),(10,10)</box> and "
        "<box>(500, 500),(400,400)</box>; broken: <box>(1,2)</box> <box>(a,b),(c,d)</box>"
    )
    boxes = parse_boxes(text, 640, 480)
    assert [b.ref for b in boxes] == ["the red circle", "the red circle", None]
    assert [b.as_dict()["box"] for b in boxes] == [
        [64.0, 96.0, 192.0, 192.0],
        [0.0, 0.0, 6.4, 4.8],
        [256.0, 192.0, 320.0, 240.0],  # corners put in order
    ]
    assert text[slice(*boxes[0].span)] == "<box>(100,200),(300,400)</box>"
    assert parse_boxes("<box>(0,0),(2000,5000)</box>")[0].as_dict()["box"] == [0.0, 0.0, 1000.0, 1000.0]
    assert parse_boxes("no boxes here") == []


def test_encode_rejects_an_empty_image_and_clips_to_it():
    with pytest.raises(ValueError, match="image size must be positive"):
        encode_box((0, 0, 1, 1), 0, 10)
    assert encode_box((-5, -5, 50, 50), 10, 10) == "<box>(0,0),(1000,1000)</box>"


def test_iou():
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
