"""Tests of the ``vlmlab`` command line (``vlmlab.cli.main``), run in-process.

Checked against the CLI's contract (``cli.py`` docstring, RELIABILITY.md): bad input (unknown preset or stage, a
missing or corrupt image, a malformed dataset record) exits with status 2 and ONE stderr line naming the problem,
never a traceback; the happy paths (``presets``, ``chat``, ``eval``) exit 0 and print what the library computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import vlmlab
from conftest import make_model
from vlmlab.cli import main
from vlmlab.data.world import build_world
from vlmlab.inference.chat import answer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    model, proc = make_model(tokenizer, seed=3)
    vlmlab.save(model, proc, path)
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(path)
    return path


def run_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a handled error; return its single stderr line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (captured.out, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("vlmlab: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def test_unknown_preset_lists_the_valid_ones(capsys, tmp_path):
    line = run_error(
        capsys, ["train", "--preset", "nope", "--data", str(tmp_path), "--run-dir", str(tmp_path / "r")]
    )
    assert "'nope'" in line and "tiny" in line and "nano" in line
    assert not (tmp_path / "r").exists()


def test_unknown_stage_lists_the_preset_stages(capsys, tmp_path):
    line = run_error(
        capsys,
        [
            "train",
            "--preset",
            "tiny",
            "--stages",
            "finetune",
            "--data",
            str(tmp_path),
            "--run-dir",
            str(tmp_path / "r"),
        ],
    )
    assert "finetune" in line and "align" in line and "pretrain" in line and "instruct" in line


def test_chat_with_a_missing_image_names_the_file(capsys, checkpoint, tmp_path):
    missing = tmp_path / "no-such-image.png"
    line = run_error(
        capsys, ["chat", "--checkpoint", str(checkpoint), "--image", str(missing), "What color is the shape?"]
    )
    assert str(missing) in line and "not found" in line


def test_chat_with_a_truncated_png_names_the_file(capsys, checkpoint, image, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(image.read_bytes()[:50])
    line = run_error(capsys, ["chat", "--checkpoint", str(checkpoint), "--image", str(broken), "What color?"])
    assert str(broken) in line and "truncated or corrupt" in line


def test_chat_with_a_missing_checkpoint_names_the_directory(capsys, tmp_path, image):
    line = run_error(capsys, ["chat", "--checkpoint", str(tmp_path / "nothing"), "--image", str(image), "hi"])
    assert str(tmp_path / "nothing") in line


def test_eval_on_a_bad_record_names_file_and_record(capsys, checkpoint, image, tmp_path):
    good = {
        "id": "ok-1",
        "image": image.name,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    bad = {"id": "broken-7", "image": image.name, "conversations": "not a list"}
    data = tmp_path / "split.json"
    data.write_text(json.dumps([good, bad]))
    line = run_error(
        capsys,
        [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(tmp_path),
            "--split-file",
            "split.json",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert "split.json" in line and "broken-7" in line
    assert not (tmp_path / "out" / "eval.json").exists()


def test_chat_happy_path_prints_the_libraries_answer(capsys, checkpoint, image):
    argv = [
        "chat",
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(image),
        "What color is the shape?",
        "--max-new-tokens",
        "6",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    model, proc = vlmlab.load(checkpoint)
    expected = answer(model, proc, "What color is the shape?", images=[str(image)], max_new_tokens=6)
    assert captured.out == expected + "\n"
    # A random model still answers something decodable; the tiny model's greedy answer is deterministic.
    assert main(argv) == 0
    assert capsys.readouterr().out == captured.out


def test_presets_lists_every_preset(capsys):
    from vlmlab.presets import PRESETS

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert names == sorted(PRESETS) and {"tiny", "nano", "llava-1.5"} <= set(names)
    assert "recipe: align" in out


def test_eval_happy_path_writes_results(capsys, checkpoint, tmp_path):
    world = tmp_path / "world"
    build_world(world, seed=0, n_per_task={"train": 0, "val": 0, "test": 2}, n_captions=0)
    out = tmp_path / "out"
    code = main(
        ["eval", "--checkpoint", str(checkpoint), "--data", str(world), "--out", str(out), "--limit", "6"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((out / "eval.json").read_text())
    assert sum(t["n"] for t in result["tasks"].values()) == 6
    assert "| task | n | accuracy |" in captured.out and str(out / "eval.json") in captured.out


def test_world_train_resume_eval_chat_from_the_command_line(capsys, tmp_path):
    """The README's command sequence, shrunk: world -> train (stopped early) -> train --resume -> eval -> chat."""
    world, run = tmp_path / "world", tmp_path / "run"
    assert (
        main(["world", "--out", str(world), "--train", "4", "--val", "1", "--test", "2", "--captions", "8"])
        == 0
    )
    assert json.loads((world / "world.json").read_text())["counts"]["train"]["caption"] == 8
    argv = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(world),
        "--run-dir",
        str(run),
        "--steps",
        "2",
        "--lr",
        "vision=1e-4",
        "--no-progress",
    ]
    assert main(argv) == 0
    logged = json.loads((run / "run.json").read_text())
    assert [s["lr"].get("vision") for s in logged["stages"]] == [1e-4, 1e-4, None]
    assert (run / "checkpoints" / "step-6").is_dir()
    # Resuming a finished run trains nothing more and keeps the same final checkpoint.
    assert main([*argv, "--resume"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    ckpt = run / "checkpoints" / "step-6"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(world), "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {t: v["n"] for t, v in result["tasks"].items()} == dict.fromkeys(
        ["colour", "count", "position", "relation", "shape"], 2
    )
    img = next((world / "images" / "test").glob("test-colour-*.png"))
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(ckpt), "--image", str(img), "What color is the shape?"]) == 0
    model, proc = vlmlab.load(ckpt)
    assert capsys.readouterr().out == answer(model, proc, "What color is the shape?", images=[img]) + "\n"


def test_bad_lr_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x", "--run-dir", "y", "--lr", "decoder=1e-4"])
    assert e.value.code == 2
    assert "PART=LR" in capsys.readouterr().err
