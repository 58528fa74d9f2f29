"""Tests of vlmlab.data.formats: LLaVA/messages records from JSON and JSONL, and one-line errors for bad records.

The reference is the LLaVA conversation format (``from``/``value`` turns, human -> user, gpt -> assistant).
"""

from __future__ import annotations

import json
import os

import pytest

from vlmlab.data.formats import Record, load_records, write_llava_json
from vlmlab.errors import DataError

LLAVA = [
    {
        "id": "a1",
        "image": "img/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"},
            {"from": "gpt", "value": "red"},
        ],
        "task": "colour",
    },
    {
        "id": 7,
        "image": ["img/b.png", "/abs/c.png"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": "<image>\n<image>\nSame?"},
            {"from": "assistant", "value": "no"},
        ],
    },
    {
        "id": "text-only",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    },
]


def write_jsonl(path, records, blank_lines=False) -> None:
    lines = [json.dumps(record) for record in records]
    joiner = "\n\n" if blank_lines else "\n"
    path.write_text(joiner.join(lines) + "\n", encoding="utf-8")


def essentials(records: list[Record]) -> list[tuple]:
    return [(r.id, r.images, r.messages, r.task) for r in records]


def test_llava_json_records(tmp_path):
    path = tmp_path / "data.json"
    write_llava_json(path, LLAVA)
    records = load_records(path)
    assert [r.id for r in records] == ["a1", "7", "text-only"]
    first = records[0]
    assert first.images == [str(tmp_path / "img" / "a.png")]
    assert first.messages == [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    assert first.task == "colour"
    assert first.source == f"{path}: record 0 (id 'a1')"
    second = records[1]
    assert second.images == [str(tmp_path / "img" / "b.png"), os.path.abspath("/abs/c.png")]
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant"]
    assert second.task is None
    assert records[2].images == []


def test_json_and_jsonl_give_the_same_records(tmp_path):
    write_llava_json(tmp_path / "data.json", LLAVA)
    write_jsonl(tmp_path / "data.jsonl", LLAVA, blank_lines=True)
    from_json = load_records(tmp_path / "data.json")
    from_jsonl = load_records(tmp_path / "data.jsonl")
    assert essentials(from_json) == essentials(from_jsonl)
    assert from_jsonl[1].source == f"{tmp_path / 'data.jsonl'}: line 3 (id '7')"  # blank lines still count


def test_image_folder_overrides_the_data_folder(tmp_path):
    write_llava_json(tmp_path / "data.json", LLAVA[:1])
    (record,) = load_records(tmp_path / "data.json", image_folder=tmp_path / "pics")
    assert record.images == [str(tmp_path / "pics" / "img" / "a.png")]


def test_images_are_not_checked_for_existence(tmp_path):
    write_llava_json(tmp_path / "data.json", LLAVA[:1])
    assert not (tmp_path / "img" / "a.png").exists()
    assert len(load_records(tmp_path / "data.json")) == 1


def test_messages_style_records(tmp_path):
    record = {
        "id": "m",
        "images": ["x.jpg"],
        "messages": [
            {"role": "user", "content": "<image>\nWhat?"},
            {"role": "assistant", "content": "a star"},
        ],
        "task": "shape",
    }
    path = tmp_path / "m.jsonl"
    write_jsonl(path, [record])
    (loaded,) = load_records(path)
    assert loaded == Record(
        id="m",
        images=[str(tmp_path / "x.jpg")],
        messages=record["messages"],
        task="shape",
        source=f"{path}: line 1 (id 'm')",
    )


def test_video_records_llava_next_video_and_messages_style(tmp_path):
    """LLaVA-NeXT-Video's ``"video"`` (a string, or a list) and messages-style ``"videos"`` become absolute
    ``Record.videos``, resolved like images; a record may hold images and videos together."""
    llava = {
        "id": "v1",
        "video": "videos/train/a.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhich way?"},
            {"from": "gpt", "value": "left"},
        ],
        "task": "video",
    }
    messages = {
        "id": "v2",
        "images": ["still.png"],
        "videos": ["b.mp4", "/abs/c.mp4"],
        "messages": [{"role": "user", "content": "<image>\n<video>\n<video>\nSame?"}],
    }
    path = tmp_path / "v.jsonl"
    write_jsonl(path, [llava, messages, {**llava, "id": "v3", "video": ["a.mp4"]}, LLAVA[0]])
    first, second, third, plain = load_records(path, image_folder=tmp_path / "media")
    assert first.videos == [str(tmp_path / "media" / "videos" / "train" / "a.mp4")] and first.images == []
    assert first.task == "video"
    assert second.videos == [str(tmp_path / "media" / "b.mp4"), os.path.abspath("/abs/c.mp4")]
    assert second.images == [str(tmp_path / "media" / "still.png")]
    assert third.videos == [str(tmp_path / "media" / "a.mp4")]
    assert plain.videos == []
    by_default = load_records(tmp_path / "v.jsonl")  # relative to the data file's folder
    assert by_default[2].videos == [str(tmp_path / "a.mp4")]


GOOD = LLAVA[0]
TURN = {"from": "gpt", "value": "ok"}


@pytest.mark.parametrize(
    "bad, problem",
    [
        (["not", "an", "object"], "record is not an object"),
        ({"conversations": [TURN]}, "missing 'id'"),
        ({"id": None, "conversations": [TURN]}, "'id' must be a string or an integer"),
        ({"id": "x"}, "missing 'conversations'"),
        ({"id": "x", "conversations": []}, "'conversations' is empty"),
        ({"id": "x", "conversations": "hello"}, "'conversations' must be a list"),
        ({"id": "x", "conversations": ["hello"]}, "turn 0 is not an object"),
        ({"id": "x", "conversations": [{"value": "hi"}]}, "turn 0 has no 'from'"),
        ({"id": "x", "conversations": [TURN, {"from": "gpt"}]}, "turn 1 has no 'value'"),
        ({"id": "x", "conversations": [{"from": "gpt", "value": 3}]}, "turn 0: 'value' must be a string"),
        ({"id": "x", "conversations": [{"from": "bot", "value": "hi"}]}, "turn 0: unknown role 'bot'"),
        ({"id": "x", "image": 5, "conversations": [TURN]}, "'image' must be a string or a list of strings"),
        ({"id": "x", "image": ["a.png", 3], "conversations": [TURN]}, "'image' must be a string or a list"),
        ({"id": "x", "images": "", "conversations": [TURN]}, "'images' contains an empty path"),
        ({"id": "x", "video": 5, "conversations": [TURN]}, "'video' must be a string or a list of strings"),
        ({"id": "x", "videos": [{"a": 1}], "conversations": [TURN]}, "'videos' must be a string or a list"),
        ({"id": "x", "videos": ["a.mp4", " "], "conversations": [TURN]}, "'videos' contains an empty path"),
        ({"id": "x", "video": "a", "videos": [], "conversations": [TURN]}, "has both 'video' and 'videos'"),
        ({"id": "x", "messages": [{"role": "user"}]}, "turn 0 has no 'content'"),
        ({"id": "x", "messages": [{"role": "user", "content": ["a"]}]}, "'content' must be a string"),
        ({"id": "x", "task": 3, "conversations": [TURN]}, "'task' must be a string"),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_bad_records_name_file_and_record_on_one_line(tmp_path, bad, problem, suffix):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".json":
        write_llava_json(path, [GOOD, bad])
        where = f"{path}: record 1"
    else:
        write_jsonl(path, [GOOD, bad])
        where = f"{path}: line 2"
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(where)
    assert problem in message
    assert "\n" not in message
    if isinstance(bad, dict) and isinstance(bad.get("id"), str):
        assert f"(id '{bad['id']}')" in message


def test_invalid_json_gives_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 3, column 22"):
        load_records(path)


def test_invalid_jsonl_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 3: invalid JSON at column 2"):
        load_records(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="missing.json: dataset file not found"):
        load_records(tmp_path / "missing.json")
    (tmp_path / "obj.json").write_text('{"id": "a"}', encoding="utf-8")
    with pytest.raises(DataError, match="obj.json: expected a JSON list of records, got an object"):
        load_records(tmp_path / "obj.json")
    (tmp_path / "data.csv").write_text("id\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported dataset file type '\.csv'"):
        load_records(tmp_path / "data.csv")


def test_newlines_in_ids_do_not_break_the_one_line_message(tmp_path):
    path = tmp_path / "nl.json"
    write_llava_json(path, [{"id": "a\nb", "conversations": []}])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert "\n" not in str(info.value) and "(id 'a\\nb')" in str(info.value)


def test_write_llava_json_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.json"
    write_llava_json(path, LLAVA)
    write_llava_json(path, LLAVA[:1])
    assert json.loads(path.read_text(encoding="utf-8")) == LLAVA[:1]
    with pytest.raises(TypeError):
        write_llava_json(path, [{"id": object()}])  # not serialisable: fails midway
    assert json.loads(path.read_text(encoding="utf-8")) == LLAVA[:1]  # the old file survives intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
