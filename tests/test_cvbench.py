"""CV-Bench (SYSTEMS.md §20): the file reader, Cambrian's answer parsing, the official score, the world's
CV-Bench-style tasks and ``vlmlab eval --cvbench``.

Checked against the reference: the prompt format against a real CV-Bench record (``idx`` 0 of the HF dataset),
the parsers against Cambrian's ``extract_mcq_answer`` and lmms-eval's ``_extract_answer_letter`` on the answer
forms they meet, the score against the dataset card's formula on a table whose row average differs; the world's
3D scenes against the pinhole projection they claim, and their answers against the scenes' 3D positions.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmlab
from conftest import LLAMA, make_model
from vlmlab.cli import build_parser, main
from vlmlab.config import LanguageConfig
from vlmlab.data.formats import load_records
from vlmlab.data.world import build_world
from vlmlab.data.world.corpus import corpus
from vlmlab.data.world.cvbench import (
    CAMERA_HEIGHT,
    CVBENCH_TASKS,
    DEPTH_RATIO,
    DISTANCE_RATIO,
    GROUND,
    MIN_OBJECT_PX,
    SKY,
    SOURCE_3D,
    SOURCES_2D,
    GroundScene,
    build_cvbench,
    project,
)
from vlmlab.data.world.generate import generate_split
from vlmlab.data.world.scenes import COLOURS
from vlmlab.data.world.tasks import TASK_SPECS, relation_of
from vlmlab.errors import DataError, ImageError
from vlmlab.evaluation.cvbench import (
    ANSWER_RULES,
    CVBenchItem,
    cambrian_correct,
    cambrian_parse,
    cvbench_prompt,
    cvbench_score,
    evaluate_cvbench,
    lmms_eval_correct,
    lmms_eval_parse,
    model_prompt,
    read_cvbench,
)
from vlmlab.evaluation.evaluate import normalize_answer, score_answer
from vlmlab.processing.tokenizer import train_bpe_tokenizer

RED, BLUE = (220, 30, 30), (30, 70, 220)


def png(colour, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def records() -> list[dict]:
    """Three records in the HF dataset's schema; the first is the dataset's idx 0, verbatim but for the image."""
    return [
        {
            "idx": 0,
            "type": "2D",
            "task": "Count",
            "question": "How many organs are in the image?",
            "choices": ["3", "2", "1", "0"],
            "answer": "(C)",
            "prompt": "How many organs are in the image? Select from the following choices.\n(A) 3\n(B) 2\n(C) 1\n(D) 0",
            "filename": "img/2D/count/ade20k_10.png",
            "source": "ADE20K",
            "source_dataset": "ADE20K Validation Set",
            "source_filename": "ADE_val_00000248.jpg",
            "target_class": None,
            "target_size": None,
            "bbox": None,
        },
        {
            "idx": 1,
            "type": "2D",
            "task": "Relation",
            "question": "Considering the relative positions of the bottle and the wine glass in the image provided, "
            "where is the bottle located with respect to the wine glass?",
            "choices": ["left", "right"],
            "answer": "(A)",
            "prompt": "Considering the relative positions of the bottle and the wine glass in the image provided, "
            "where is the bottle located with respect to the wine glass? Select from the following choices."
            "\n(A) left\n(B) right",
            "filename": "img/2D/relation/coco_1.png",
            "source": "COCO",
            "source_dataset": "COCO 2017 Validation Set",
            "source_filename": "000000000139.jpg",
            "target_class": "bottle",
            "target_size": 1024.5,
            "bbox": None,
        },
        {
            "idx": 2,
            "type": "3D",
            "task": "Depth",
            "question": "Which object is closer to the camera taking this photo, the table (highlighted by a red box) "
            "or the bookcase (highlighted by a blue box)?",
            "choices": ["table", "bookcase"],
            "answer": "(B)",
            "prompt": "Which object is closer to the camera taking this photo, the table (highlighted by a red box) "
            "or the bookcase (highlighted by a blue box)? Select from the following choices.\n(A) table\n(B) bookcase",
            "filename": "img/3D/depth/omni3d_sunrgbd_1.png",
            "source": "Omni3D",
            "source_dataset": "SUN-RGBD",
            "source_filename": "sunrgbd_1.jpg",
            "target_class": None,
            "target_size": None,
            "bbox": [[10, 20, 30, 40], [40, 5, 60, 25]],
        },
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    return path


@pytest.fixture
def bench(tmp_path) -> Path:
    """A CV-Bench JSONL with its images in ``img/`` beside it (the HF dataset's raw layout)."""
    for rec, colour in zip(records(), (RED, BLUE, RED)):
        path = tmp_path / rec["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(colour))
    return write_jsonl(tmp_path / "test.jsonl", [*records()[:2], "", records()[2]])  # a blank line is skipped


# --- reader -----------------------------------------------------------------------------------------------------


def test_reader_reads_jsonl_and_json_with_image_files(bench):
    items = read_cvbench(bench)
    assert [(i.idx, i.type, i.task, i.source, i.answer, i.gold) for i in items] == [
        (0, "2D", "Count", "ADE20K", "C", 2),
        (1, "2D", "Relation", "COCO", "A", 0),
        (2, "3D", "Depth", "Omni3D", "B", 1),
    ]
    for item, rec in zip(items, records()):
        assert item.image == str((bench.parent / rec["filename"]).resolve())
        assert item.choices == tuple(rec["choices"]) and item.question == rec["question"]
        assert item.metadata == {k: rec[k] for k in item.metadata} and set(item.metadata) >= {
            "bbox",
            "filename",
        }
        # The dataset's prompt is the question and its choices in exactly the form the world writes.
        assert item.prompt == rec["prompt"] == cvbench_prompt(rec["question"], rec["choices"])
    assert items[2].where == f"{bench}: line 4 (idx 2)"
    as_json = bench.with_suffix(".json")
    as_json.write_text(json.dumps(records()), encoding="utf-8")
    again = read_cvbench(as_json)
    assert [(i.idx, i.image, i.prompt) for i in again] == [(i.idx, i.image, i.prompt) for i in items]
    assert again[1].where == f"{as_json}: record 1 (idx 1)"


def test_reader_reads_embedded_bytes(tmp_path):
    """HF's image layout, {"bytes", "path"}: base64 text in JSON; no image file is needed."""
    rows = records()
    for rec, colour in zip(rows, (RED, BLUE, RED)):
        rec["image"] = {"bytes": base64.b64encode(png(colour)).decode(), "path": Path(rec["filename"]).name}
    items = read_cvbench(write_jsonl(tmp_path / "embedded.jsonl", rows))
    assert [i.image for i in items] == [png(RED), png(BLUE), png(RED)]
    # A plain path in "image" wins over "filename".
    (tmp_path / "a.png").write_bytes(png(BLUE))
    rows[0]["image"] = "a.png"
    assert read_cvbench(write_jsonl(tmp_path / "path.jsonl", rows))[0].image == str(
        (tmp_path / "a.png").resolve()
    )


def test_reader_reads_parquet_only_with_pyarrow(tmp_path):
    """vlmlab does not depend on pyarrow: with it, Parquet rows (images as raw bytes) read like JSON records;
    without it, one line says what is missing."""
    path = tmp_path / "test.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match=r"test\.parquet: reading Parquet needs pyarrow"):
            read_cvbench(path)
        return
    rows = records()
    for rec in rows:
        rec["image"] = {"bytes": png(RED), "path": "x.png"}
        rec["bbox"] = json.dumps(rec["bbox"])
    pq.write_table(pa.Table.from_pylist(rows), path)
    items = read_cvbench(path)
    assert [i.image for i in items] == [png(RED)] * 3 and items[1].where == f"{path}: row 1 (idx 1)"


def mutate(rec: dict, **changes) -> dict:
    rec = dict(rec)
    for key, value in changes.items():
        if value is KeyError:
            rec.pop(key)
        else:
            rec[key] = value
    return rec


BAD = [
    (dict(idx=KeyError), "line 2: field 'idx': expected an integer or a non-empty string, got null"),
    (dict(type="4D"), "field 'type': expected '2D' or '3D', got '4D'"),
    (dict(source="ImageNet"), "field 'source': unknown source 'ImageNet'; valid sources: ADE20K, COCO"),
    (dict(type="3D"), "field 'type': '3D', but source 'COCO' holds 2D questions"),
    (
        dict(choices=["left"]),
        "field 'choices': expected a list of 2 to 26 non-empty strings, got a list of 1",
    ),
    (dict(choices=["left", 3]), "field 'choices': choice 1 is int 3, expected a non-empty string"),
    (dict(answer="(C)"), "field 'answer': expected '(X)' with X one of A-B (2 choices), got '(C)'"),
    (dict(answer="A"), "field 'answer': expected '(X)'"),
    (dict(prompt=KeyError), "field 'prompt': expected a non-empty string, got null"),
    (dict(filename="img/none.png"), "field 'filename': image file not found: "),
    (dict(image={"bytes": "not base64!"}), "field 'image': 'bytes' is not valid base64 text"),
    (dict(image=7), "field 'image': expected a path or {'bytes': ..., 'path': ...}, got int 7"),
    (
        dict(image={"bytes": 5}),
        "field 'image': 'bytes' must be base64 text or raw bytes of an image file, got int 5",
    ),
    (
        dict(filename=KeyError),
        "field 'image': missing: give 'image' (a path or {'bytes': ...}) or 'filename'",
    ),
    (dict(idx=0), "field 'idx': repeats the idx of "),
    (
        dict(source="world2d-b"),
        "field 'source': 'world2d-b' is a world source but the file's earlier records",
    ),
]


@pytest.mark.parametrize(
    ("changes", "message"), BAD, ids=[f"{i}-{next(iter(c))}" for i, (c, _) in enumerate(BAD)]
)
def test_bad_records_fail_in_one_line_naming_record_and_field(bench, changes, message):
    rows = [json.loads(line) for line in bench.read_text().splitlines() if line]
    write_jsonl(bench, [rows[0], mutate(rows[1], **changes), rows[2]])
    with pytest.raises(DataError) as err:
        read_cvbench(bench)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{bench}: line 2") and message in text, text
    if "idx" not in changes:
        assert text.startswith(f"{bench}: line 2 (idx 1): ")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "", "unsupported CV-Bench file type '.csv'"),
        ("none.jsonl", None, "CV-Bench file not found"),
        ("empty.jsonl", "\n", "no CV-Bench records"),
        ("list.json", '{"idx": 0}', "expected a JSON list of CV-Bench records, got an object"),
        ("broken.jsonl", '{"idx": 0}\n{"idx": ', "line 2: invalid JSON"),
        ("scalar.jsonl", "[1]", "line 1: expected a CV-Bench record (an object), got a list"),
    ],
)
def test_bad_files_fail_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_cvbench(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


# --- answer parsing and the score -------------------------------------------------------------------------------


def item(kind: str, choices: tuple[str, ...], answer: str) -> CVBenchItem:
    source = "COCO" if kind == "2D" else "Omni3D"
    return CVBenchItem(0, kind, "Task", source, "q", "p", choices, answer, b"", "here")


@pytest.mark.parametrize(
    ("response", "cambrian", "lmms"),
    [
        ("(A)", "a", "A"),
        ("A", "a", "A"),
        ("A.", "a", "A"),
        ("a", "a", "A"),
        ("  (B) right", "b", "B"),
        ("B) right", "b", "B"),
        ("b, because it is nearer", "b", "B"),
        ("The answer is C.", "c", "T"),  # Cambrian reads past "answer is"; lmms-eval takes the first letter
        ("Answer: (D)", "d", "A"),
        (
            "the answer is: (b).",
            ":",
            "T",
        ),  # Cambrian's keyword loop splits at "answer is" first: a miss there too
        ("left", "l", "L"),  # an option's text is read as its first character
        ("2", "2", ""),
        ("", "", ""),
    ],
)
def test_parsers_read_the_answer_forms_like_the_references(response, cambrian, lmms):
    assert cambrian_parse(response) == cambrian
    assert lmms_eval_parse(response) == lmms


def test_correctness_rules():
    relation = item("2D", ("left", "right"), "A")
    assert cambrian_correct("(A)", relation) and cambrian_correct("A. left", relation)
    assert not cambrian_correct("left", relation) and not cambrian_correct("(B)", relation)
    # Cambrian's 3D scorer also accepts the gold option's text, which survives the one-character cut only when it
    # is one character long; its 2D scorer never does.
    assert cambrian_correct("2", item("3D", ("1", "2"), "B")) and not cambrian_correct(
        "2", item("2D", ("1", "2"), "B")
    )
    assert not cambrian_correct("table", item("3D", ("table", "bookcase"), "A"))
    assert lmms_eval_correct("(a) left", relation) and not lmms_eval_correct("The answer is A", relation)
    for rule in ANSWER_RULES:  # the command line offers every rule
        assert (
            build_parser().parse_args(["eval", "--checkpoint", "c", "--answer-rule", rule]).answer_rule
            == rule
        )


def rows_from(counts: dict[str, tuple[int, int]], task: str = "T") -> list[dict]:
    """``{source: (correct, total)}`` -> score rows."""
    return [
        {"source": source, "task": task, "correct": i < correct}
        for source, (correct, total) in counts.items()
        for i in range(total)
    ]


def test_score_is_the_official_formula_not_the_row_average():
    """ADE20K 1/2, COCO 7/10, Omni3D 9/10: 2D = 0.6, 3D = 0.9, CV-Bench = 0.75 (the row average is 17/22)."""
    score = cvbench_score(rows_from({"ADE20K": (1, 2), "COCO": (7, 10), "Omni3D": (9, 10)}))
    assert score["sources"] == {
        "ADE20K": {"accuracy": 0.5, "n": 2},
        "COCO": {"accuracy": 0.7, "n": 10},
        "Omni3D": {"accuracy": 0.9, "n": 10},
    }
    assert score["family"] == "CV-Bench" and score["tasks"] == {"T": {"accuracy": 17 / 22, "n": 22}}
    assert (
        score["2D"] == pytest.approx(0.6) and score["3D"] == 0.9 and score["overall"] == pytest.approx(0.75)
    )
    assert abs(score["overall"] - 17 / 22) > 0.01
    world = cvbench_score(rows_from({"world2d-a": (1, 2), "world2d-b": (7, 10), "world3d": (9, 10)}))
    assert world["family"] == "world"
    assert (world["2D"], world["3D"], world["overall"]) == (score["2D"], score["3D"], score["overall"])
    partial = cvbench_score(rows_from({"ADE20K": (1, 2), "COCO": (7, 10)}))
    assert partial["2D"] == pytest.approx(0.6) and partial["3D"] is None and partial["overall"] is None
    with pytest.raises(DataError, match="rows mix the sources of CV-Bench and world"):
        cvbench_score(rows_from({"ADE20K": (1, 2), "world3d": (1, 1)}))
    with pytest.raises(DataError, match="unknown source 'VQA'"):
        cvbench_score(rows_from({"VQA": (1, 1)}))


# --- the world's CV-Bench tasks ---------------------------------------------------------------------------------


def draw(task: str, n: int, seed: int = 0):
    spec = TASK_SPECS[task]
    rng = random.Random(seed)
    return [spec.make(rng, spec.targets[i % len(spec.targets)]) for i in range(n)]


@pytest.mark.parametrize("task", ["cv-depth", "cv-distance"])
def test_perspective_scenes_follow_the_projection_and_answers_follow_3d_positions(task):
    for sample in draw(task, 150):
        scene = sample.scene
        assert isinstance(scene, GroundScene) and sample.source == SOURCE_3D
        assert sample.boxes == tuple((o.x, o.y, o.x + o.size, o.y + o.size) for o in scene.objects)
        for obj, (x, z) in zip(scene.objects, scene.positions):
            column, bottom, side = project(x, z, scene.width, scene.horizon)
            # The drawn box is the projection, rounded: base row horizon + f*h/Z, side f*S/Z, centre W/2 + f*X/Z.
            assert abs(obj.y + obj.size - bottom) <= 0.5 and abs(obj.size - side) <= 0.5
            assert abs(obj.cx - column) <= 1 and obj.size >= MIN_OBJECT_PX
            assert (
                scene.horizon < obj.y
                and obj.y + obj.size <= scene.height
                and 0 <= obj.x <= scene.width - obj.size
            )
            assert z == pytest.approx(scene.width * CAMERA_HEIGHT / (bottom - scene.horizon))
        # Nearer is lower in the image and larger, for every pair (rounding never reverses it).
        for a, pa in zip(scene.objects, scene.positions):
            for b, pb in zip(scene.objects, scene.positions):
                if pa[1] < pb[1]:
                    assert a.y + a.size >= b.y + b.size and a.size >= b.size
        gold = sample.choices[ord(sample.answer) - ord("A")]
        names = [f"{o.colour} {o.shape}" for o in scene.objects]
        assert len(set(names)) == len(names) and sample.question.count(gold) == 1
        if task == "cv-depth":
            (a, b), (pa, pb) = scene.objects, scene.positions
            assert list(sample.choices) == names
            near, far = (a, b) if pa[1] < pb[1] else (b, a)
            assert gold == f"{near.colour} {near.shape}"
            assert max(pa[1], pb[1]) / min(pa[1], pb[1]) >= DEPTH_RATIO
            assert near.y + near.size > far.y + far.size and near.size > far.size  # strict for the asked pair
        else:
            ref, *pair = scene.positions
            assert list(sample.choices) == names[1:] and f"closer to the {names[0]}," in sample.question
            distances = [math.dist(ref, p) for p in pair]
            assert gold == names[1 + distances.index(min(distances))]
            assert max(distances) >= DISTANCE_RATIO * min(distances)


def test_perspective_scenes_render_ground_sky_and_objects():
    for sample in draw("cv-distance", 20, seed=1):
        scene = sample.scene
        image = scene.render()
        assert image.size == (scene.width, scene.height)
        assert image.getpixel((0, 0)) == SKY and image.getpixel((0, scene.horizon - 1)) == SKY
        free = [c for c in range(scene.width) if not any(o.x <= c < o.x + o.size for o in scene.objects)]
        assert free and image.getpixel((free[0], scene.horizon)) == GROUND
        for obj in scene.objects:  # every shape covers its box's centre pixel
            assert image.getpixel((int(obj.cx), int(obj.cy))) == COLOURS[obj.colour]


def test_2d_answers_follow_the_scenes():
    counts = draw("cv-count", 80)
    for sample in counts:
        shapes = [o.shape for o in sample.scene.objects]
        assert int(sample.choices[ord(sample.answer) - ord("A")]) == shapes.count(sample.target_class)
        assert sample.question == f"How many {sample.target_class}s are in the image?" and shapes
    assert {s.source for s in counts} == set(SOURCES_2D) and {s.answer for s in counts} == set("ABCD")
    for sample in draw("cv-relation", 80):
        a, b, *distractors = sample.scene.objects
        assert (
            relation_of(a, b, sample.scene.width, sample.scene.height)
            == sample.choices[ord(sample.answer) - 65]
        )
        assert sample.question.startswith(
            f"Considering the relative positions of the {a.colour} {a.shape} and "
        )
        assert all((d.shape, d.colour) not in {(a.shape, a.colour), (b.shape, b.colour)} for d in distractors)
        assert len(distractors) <= (1 if sample.source == "world2d-a" else 3)
    # generate_split balances (source, letter) targets exactly.
    split = [s for _, s in generate_split("test", {"cv-relation": 8}, seed=0)]
    assert sorted((s.source, s.answer) for s in split) == sorted(
        [(src, ab) for src in SOURCES_2D for ab in "AB"] * 2
    )
    assert TASK_SPECS["cv-count"].answers == ("A", "B", "C", "D") and TASK_SPECS["cv-depth"].answers == (
        "A",
        "B",
    )


def test_world_writes_a_cvbench_file_that_reads_back(tmp_path):
    path = build_cvbench(tmp_path / "a", seed=3, n_per_task=4)
    items = read_cvbench(path)
    world = {r.id: r for r in load_records(tmp_path / "a" / "test.json")}
    assert len(items) == len(world) == 16
    assert [i.idx for i in items] == list(range(16))
    assert {(i.task, i.type) for i in items} == {
        ("Count", "2D"),
        ("Relation", "2D"),
        ("Depth", "3D"),
        ("Distance", "3D"),
    }
    assert [i.source for i in items].count(SOURCE_3D) == 8
    assert {s: [i.source for i in items].count(s) for s in SOURCES_2D} == {"world2d-a": 4, "world2d-b": 4}
    for item in items:
        rec = world[Path(item.image).stem]
        assert rec.images == [item.image]  # the CV-Bench file shares the split's images
        assert rec.messages[0]["content"] == model_prompt(item.prompt)  # the world trains on what is asked
        assert rec.messages[1]["content"] == item.answer and rec.task == f"cv-{item.task.lower()}"
        assert (item.metadata["bbox"] is None) == (item.type == "2D")
    summary = json.loads((tmp_path / "a" / "world.json").read_text())
    assert summary["settings"]["extra_tasks"] == list(CVBENCH_TASKS)
    assert summary["answers"]["cv-distance"] == ["A", "B"]
    # Seeded: a second build is byte-identical, images included.
    again = build_cvbench(tmp_path / "b", seed=3, n_per_task=4)
    assert again.read_bytes() == path.read_bytes()
    for item in items:
        assert (tmp_path / "b" / "images" / "test" / Path(item.image).name).read_bytes() == Path(
            item.image
        ).read_bytes()
    # Without the CV-Bench tasks the world writes no CV-Bench file.
    build_world(tmp_path / "c", seed=3, n_per_task={"train": 0, "val": 0, "test": 1}, n_captions=0)
    assert not list((tmp_path / "c").glob("cvbench*"))


def test_world_records_are_scored_by_their_letter():
    """Exact match after normalisation would drop the letter "a" as an article and count an empty answer right."""
    assert normalize_answer("") == normalize_answer("A")
    assert not score_answer("cv-depth", "", "A") and not score_answer("cv-count", "(B)", "A")
    assert score_answer("cv-depth", "(A)", "A") and score_answer("cv-relation", "The answer is A.", "A")


# --- evaluation -------------------------------------------------------------------------------------------------


class ColourStub:
    """Answers "(A)" for a red image, "The answer is B." for a blue one, "C" otherwise (the blind pass's blank)."""

    def __init__(self, processor):
        self.processor = processor

    def eval(self):
        return self

    def generate(self, input_ids, pixel_values=None, max_new_tokens=8, pad_token_id=0, **_):
        tok = self.processor.tokenizer
        rows = []
        for pix in pixel_values:
            red, blue = pix[0].mean(), pix[2].mean()
            text = "(A)" if red > blue + 0.5 else "The answer is B." if blue > red + 0.5 else "C"
            rows.append(tok.encode(text, add_special_tokens=False) + [tok.eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])[:, :max_new_tokens]


def test_evaluate_decodes_embedded_images_and_scores_by_source(tokenizer, tmp_path):
    rows = records()  # golds: C (ADE20K), A (COCO), B (Omni3D)
    rows.append(mutate(rows[0], idx=3, answer="(B)"))  # a second ADE20K question
    for rec, colour in zip(rows, (RED, RED, BLUE, BLUE)):
        rec["image"] = {"bytes": base64.b64encode(png(colour)).decode()}
    items = read_cvbench(write_jsonl(tmp_path / "bench.jsonl", rows))
    _, proc = make_model(tokenizer)
    result, out = evaluate_cvbench(ColourStub(proc), proc, items, batch_size=3)
    assert [r["prediction"] for r in out] == ["(A)", "(A)", "The answer is B.", "The answer is B."]
    assert [r["parsed"] for r in out] == ["a", "a", "b", "b"]
    assert [r["correct"] for r in out] == [False, True, True, True]
    assert [r["blind_prediction"] for r in out] == ["C"] * 4 and [r["blind_correct"] for r in out] == [
        True
    ] + [False] * 3
    score = result["score"]
    assert {s: v["accuracy"] for s, v in score["sources"].items()} == {
        "ADE20K": 0.5,
        "COCO": 1.0,
        "Omni3D": 1.0,
    }
    assert score["overall"] == pytest.approx(((0.5 + 1.0) / 2 + 1.0) / 2)
    assert result["blind"]["overall"] == pytest.approx(((0.5 + 0.0) / 2 + 0.0) / 2)
    assert result["settings"]["answer_rule"] == "cambrian"
    lmms, _ = evaluate_cvbench(ColourStub(proc), proc, items, rule="lmms-eval", blind_baseline=False)
    assert (
        lmms["blind"] is None and lmms["score"]["sources"]["Omni3D"]["accuracy"] == 0.0
    )  # "The ..." reads as T


def test_an_undecodable_image_names_its_record(tokenizer, tmp_path):
    rows = records()
    rows[1]["image"] = {"bytes": base64.b64encode(png(RED)[:40]).decode()}  # a truncated PNG
    (tmp_path / "img/2D/count").mkdir(parents=True)
    (tmp_path / rows[0]["filename"]).write_bytes(png(RED))
    path = write_jsonl(tmp_path / "bench.jsonl", rows[:2])
    _, proc = make_model(tokenizer)
    with pytest.raises(ImageError) as err:
        evaluate_cvbench(ColourStub(proc), proc, read_cvbench(path))
    assert str(err.value).startswith(f"{path}: line 2 (idx 1): image: ") and "\n" not in str(err.value)


def test_cli_evaluates_a_tiny_model_on_the_worlds_cvbench_file(tmp_path, capsys):
    tokenizer = train_bpe_tokenizer(corpus(2, tasks=CVBENCH_TASKS), vocab_size=400)
    language = LanguageConfig(
        model_type="llama", params={**LLAMA, "vocab_size": 400, "max_position_embeddings": 192}
    )
    model, proc = make_model(tokenizer, language=language, max_length=160, seed=1)
    vlmlab.save(model, proc, tmp_path / "ckpt")
    path = build_cvbench(tmp_path / "world", seed=0, n_per_task=2)
    out = tmp_path / "out"
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--cvbench", str(path), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "| world2d-a | 2 |" in printed and "| 3D | 4 |" in printed and "| CV-Bench | 8 |" in printed
    assert f"results: {out / 'cvbench.json'}" in printed
    result = json.loads((out / "cvbench.json").read_text())
    rows = [json.loads(line) for line in (out / "cvbench-predictions.jsonl").read_text().splitlines()]
    items = {i.idx: i for i in read_cvbench(path)}
    assert len(rows) == 8 and all(
        r["correct"] == cambrian_correct(r["prediction"], items[r["idx"]]) for r in rows
    )
    acc = {s: sum(r["correct"] for r in rows if r["source"] == s) / 2 for s in SOURCES_2D}
    acc3d = sum(r["correct"] for r in rows if r["source"] == SOURCE_3D) / 4
    assert result["score"]["overall"] == pytest.approx(
        ((acc["world2d-a"] + acc["world2d-b"]) / 2 + acc3d) / 2
    )
    assert result["blind"]["sources"]["world3d"]["n"] == 4 and (out / "cvbench.md").read_text().startswith(
        "| part"
    )
    # A bad record is reported in one line before any model is loaded (this checkpoint does not exist).
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, [mutate(rows[0], answer="(Q)"), *rows[1:]])
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--cvbench", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlmlab: error: {path}: line 1 (idx 0): field 'answer'") and "\n" not in err
