"""The DPO stage (LLaVA-NeXT-Video's last stage, SYSTEMS.md §12): ``vlmlab.training.dpo``, preference records
(``vlmlab.data.preference``) and the world's preference pairs (``vlmlab.data.world.preferences``).

Checked: invariant 3 (the DPO loss is exactly log 2 while the policy is the reference, and a gradient step raises
the chosen-minus-rejected margin); gradients reach only the trained parts, never the frozen reference, which stays
unchanged; pair collation keeps each chosen row aligned with its rejected row (same prompt, same clip); a DPO stage
through the Trainer logs its terms, resumes bitwise like an uninterrupted run (the test_trainer.py recipe, with the
reference rebuilt from the weights saved when the stage started) and raises reward accuracy on the world's pairs;
bad preference records are quarantined with a one-line reason naming the record and the field. A tiny ConvNet +
Llama video model on an 8-clip world keeps it to seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import LLAMA, TEXTS
from vlmlab.config import (
    ConnectorConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VideoConfig,
    VisionConfig,
)
from vlmlab.data.dataset import SupervisedDataset, load_stage_records
from vlmlab.data.formats import load_records
from vlmlab.data.world import build_world, write_preferences
from vlmlab.errors import DataError, SampleError
from vlmlab.io import read_jsonl
from vlmlab.models.vlm import VisionLanguageModel
from vlmlab.presets import PRESETS
from vlmlab.processing.processor import IGNORE_INDEX, Processor
from vlmlab.processing.tokenizer import train_bpe_tokenizer
from vlmlab.training.checkpoint import load_checkpoint
from vlmlab.training.dpo import DPOSettings, dpo_step, frozen_copy
from vlmlab.training.objectives import OBJECTIVES
from vlmlab.training.stages import Stage, apply_stage
from vlmlab.training.trainer import Trainer, TrainOptions

ALL = ("vision", "connector", "language")
LOG_2 = -F.logsigmoid(torch.zeros(())).item()  # log 2 as float32 computes it
PREFS = "preferences-train.json"


@pytest.fixture(scope="module")
def video_tokenizer():
    words = ["In which direction is the moving? left right up down"] * 20
    return train_bpe_tokenizer(TEXTS + words, vocab_size=320, extra_special_tokens=("<video>",))


def make_video_model(tokenizer, seed: int = 0):
    """8 frames of 32 px, 4 x 4 ConvNet tokens pooled to 2 x 2 per frame, the conftest Llama."""
    torch.manual_seed(seed)
    video = VideoConfig(num_frames=8, max_frames=8, stride=2)
    cfg = ModelConfig(
        vision=VisionConfig(name="convnet", image_size=32, params={"channels": [8, 16], "pool": 2}),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(model_type="llama", params=dict(LLAMA)),
        processor=ProcessorConfig(image_size=32, max_length=128, video=video),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
    )
    model = VisionLanguageModel(cfg).eval()
    return model, Processor(tokenizer, cfg.processor, model.num_image_tokens)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    counts = {"train": 8, "val": 0, "test": 0}
    build_world(out, seed=0, n_per_task=counts, n_captions={"train": 0}, tasks=(), extra_tasks=("video",))
    write_preferences(out)
    return out


def pair_batch(processor, world: Path, n: int = 4) -> dict:
    dataset = SupervisedDataset(load_stage_records([PREFS], world, None), processor)
    return processor.collate([dataset[i] for i in range(n)])


def test_world_preferences_pair_the_true_direction_with_the_opposite(world):
    sft = {r["id"]: r for r in json.loads((world / "train.json").read_text())}
    prefs = json.loads((world / PREFS).read_text())
    assert len(prefs) == len(sft) == 8
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for p in prefs:
        src = sft[p["id"].removesuffix("-pref")]
        assert p["video"] == src["video"] and p["prompt"] == src["conversations"][0]["value"]
        assert p["chosen"] == src["conversations"][1]["value"] and p["rejected"] == opposite[p["chosen"]]


def test_dpo_loss_is_log_2_while_the_policy_is_the_reference(world, video_tokenizer):
    model, proc = make_video_model(video_tokenizer)
    batch = pair_batch(proc, world)
    out = dpo_step(model.train(), frozen_copy(model), batch, DPOSettings(beta=0.1))
    assert out.loss.item() == LOG_2 and math.isclose(out.loss.item(), math.log(2), rel_tol=1e-7)
    assert torch.equal(out.margins, torch.zeros(4))
    assert out.terms["reward_margin"] == 0.0 and out.terms["reward_accuracy"] == 0.0


def test_a_step_raises_the_margin_and_only_trained_parts_get_gradients(world, video_tokenizer):
    model, proc = make_video_model(video_tokenizer)
    batch = pair_batch(proc, world)
    reference = frozen_copy(model)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    stage = Stage(
        name="dpo", train=("connector", "language"), lr={"connector": 0.05, "language": 0.05}, steps=1
    )
    groups = apply_stage(model, stage)
    model.train()
    dpo_step(model, reference, batch).loss.backward()
    assert all(p.grad is None for p in model.part_parameters("vision"))  # frozen part
    for part in ("connector", "language"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.part_parameters(part)), part
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert not reference.training
    torch.optim.SGD(groups).step()
    with torch.no_grad():
        after = dpo_step(model, reference, batch)
    assert after.margins.mean() > 0 and after.loss < LOG_2
    assert after.terms["reward_margin"] > 0
    for k, v in reference.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pair_collation_keeps_chosen_and_rejected_aligned(world, video_tokenizer):
    _, proc = make_video_model(video_tokenizer)
    records = load_stage_records([PREFS], world, None)
    dataset = SupervisedDataset(records, proc)
    samples = [dataset[i] for i in (3, 0, 5)]
    batch = proc.collate(samples)
    B = batch["pairs"]
    assert B == 3 and batch["input_ids"].shape[0] == 6
    for i, rec in enumerate(records[j] for j in (3, 0, 5)):
        good, bad = i, B + i
        for row, answer in ((good, rec.preference["chosen"]), (bad, rec.preference["rejected"])):
            supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
            assert proc.decode(supervised.tolist()).strip().startswith(answer)
        # The same prompt (every unsupervised token before the answer) and the same clip.
        start = int((batch["labels"][good] != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(batch["input_ids"][good, :start], batch["input_ids"][bad, :start])
        assert torch.equal(batch["pixel_values_videos"][good], batch["pixel_values_videos"][bad])
    with pytest.raises(SampleError, match="mixes preference pairs and plain samples"):
        sft = SupervisedDataset(load_stage_records(["train.json"], world, None), proc)
        proc.collate([samples[0], sft[0]])


def test_a_llava_next_prompt_gets_its_placeholders_in_front(tmp_path):
    data = [
        {"id": "a", "video": "v.mp4", "prompt": "<image>\nWhich way?", "chosen": "left", "rejected": "up"},
        {"id": "b", "image": "i.png", "prompt": "What is it?", "chosen": "a star", "rejected": "a cat"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(data))
    a, b = load_records(tmp_path / "d.json")
    assert a.messages == [{"role": "user", "content": "<video>\nWhich way?"}]
    assert b.messages == [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert a.preference == {"chosen": "left", "rejected": "up"}
    (tmp_path / "e.json").write_text(json.dumps([{"id": "c", "prompt": 3, "chosen": "x", "rejected": "y"}]))
    with pytest.raises(DataError, match=r"record 0 \(id 'c'\): 'prompt' must be a string"):
        load_records(tmp_path / "e.json")


BAD = {
    "no-rejected": ({"chosen": "left"}, "without 'rejected'"),
    "no-chosen": ({"rejected": "left"}, "without 'chosen'"),
    "same": ({"chosen": "left", "rejected": "left"}, "'chosen' and 'rejected' are the same"),
    "empty": ({"chosen": " ", "rejected": "left"}, "'chosen' is empty"),
    "not-text": ({"chosen": "up", "rejected": 7}, "'rejected' must be a string"),
}


def test_bad_preference_records_are_quarantined_with_their_reason(tmp_path, world, video_tokenizer):
    good = json.loads((world / PREFS).read_text())[:2]
    bad = []
    for rec_id, (answers, _) in BAD.items():
        bad.append({"id": rec_id, "video": good[0]["video"], "prompt": good[0]["prompt"], **answers})
    turns = [{"from": "human", "value": good[0]["prompt"]}, {"from": "gpt", "value": "left"}]
    bad.append({"id": "ends-with-answer", "video": good[0]["video"], "conversations": turns, "chosen": "up",
                "rejected": "down"})  # fmt: skip
    (world / "mixed.json").write_text(json.dumps(good + bad))
    model, proc = make_video_model(video_tokenizer)
    stage = Stage(name="dpo", train=ALL, lr=dict.fromkeys(ALL, 1e-3), steps=1, batch_size=len(good + bad),
                  data=("mixed.json",), objective="dpo")  # fmt: skip
    options = TrainOptions(run_dir=tmp_path, data_root=world, progress=False, max_bad_fraction=1.0)
    Trainer(model, proc, [stage], options).fit()
    quarantined = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "quarantine.jsonl")}
    expected = {k: v for k, (_, v) in BAD.items()} | {"ends-with-answer": "must end with a user turn"}
    assert quarantined.keys() == expected.keys()
    for rec_id, reason in quarantined.items():
        assert "\n" not in reason and "mixed.json: record" in reason and f"(id '{rec_id}')" in reason
        assert expected[rec_id] in reason, reason
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["dpo_loss"] == LOG_2  # the 2 good pairs still trained


def dpo_stage(steps: int = 20) -> Stage:
    return Stage(
        name="dpo",
        train=ALL,
        lr=dict.fromkeys(ALL, 1e-2),
        steps=steps,
        batch_size=8,
        data=(PREFS,),
        objective="dpo",
        extra={"dpo": {"beta": 0.1}},
    )


def accuracy(model, proc, world: Path) -> float:
    """The fraction of the world's pairs whose chosen answer gains more than the rejected one over the reference."""
    batch = pair_batch(proc, world, n=8)
    with torch.no_grad():
        out = dpo_step(model, OBJECTIVES["dpo"].reference_of(model), batch)
    return out.terms["reward_accuracy"]


def test_a_dpo_stage_trains_logs_resumes_exactly_and_raises_reward_accuracy(tmp_path, world, video_tokenizer):
    # Uninterrupted.
    model, proc = make_video_model(video_tokenizer, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    run = tmp_path / "full"
    Trainer(model, proc, [dpo_stage()], TrainOptions(run_dir=run, data_root=world, progress=False)).fit()
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert metrics[0]["loss"] == metrics[0]["dpo_loss"] == LOG_2  # the policy starts as the reference
    assert metrics[0]["reward_accuracy"] == 0.0 and metrics[0]["reward_margin"] == 0.0
    assert all({"dpo_loss", "reward_margin", "reward_accuracy", "sft_loss"} <= m.keys() for m in metrics)
    assert accuracy(model, proc, world) >= 0.75  # from 0 (every margin is 0 at the start)
    # The reference is the stage's starting model, outside the model's state dict and checkpoints.
    reference = OBJECTIVES["dpo"].reference_of(model).state_dict()
    assert all(torch.equal(reference[k], v) for k, v in start.items())
    tensors, _ = load_checkpoint(run / "checkpoints" / "step-20")
    assert tensors["model"].keys() == start.keys()

    # Interrupted after 8 steps, resumed into a model of another seed: the same losses and weights, bitwise.
    part = tmp_path / "resumed"
    model1, proc1 = make_video_model(video_tokenizer, seed=0)
    options = TrainOptions(run_dir=part, data_root=world, progress=False, save_every=2, stop_after=8)
    assert Trainer(model1, proc1, [dpo_stage()], options).fit()["stopped"]
    model2, proc2 = make_video_model(video_tokenizer, seed=1)
    options = TrainOptions(run_dir=part, data_root=world, progress=False, save_every=2)
    Trainer(model2, proc2, [dpo_stage()], options).fit(resume=True)

    def logged(run_dir: Path) -> list[dict]:
        return [
            {k: v for k, v in m.items() if k != "samples_per_s"}
            for m in read_jsonl(run_dir / "metrics.jsonl")
        ]

    assert logged(part) == logged(run)  # every step's loss and DPO terms, exactly
    reference2 = OBJECTIVES["dpo"].reference_of(model2).state_dict()
    assert all(torch.equal(reference2[k], v) for k, v in start.items())
    final, final2 = model.state_dict(), model2.state_dict()
    assert all(torch.equal(final2[k], v) for k, v in final.items())


def test_presets_end_with_a_dpo_stage():
    real = PRESETS["llava-next-video"]().recipe
    assert [s.name for s in real] == ["video-sft", "dpo"]
    dpo = real[-1]
    assert dpo.objective == "dpo" and dpo.extra["dpo"]["beta"] == 0.1
    assert set(dpo.train) == {"vision", "connector", "newline", "language"}
    assert set(dpo.lr.values()) == {5e-7}
    tiny = PRESETS["llava-next-video-tiny"]().recipe
    assert tiny[-1].objective == "dpo" and tiny[-1].data == (PREFS,)
    assert DPOSettings.from_stage(tiny[-1]) == DPOSettings(beta=0.1, dpo_weight=1.0, sft_weight=0.0)


def test_an_lm_stage_refuses_preference_pairs():
    import pytest

    from vlmlab.errors import ConfigError
    from vlmlab.training.objectives import OBJECTIVES

    with pytest.raises(ConfigError, match="use objective 'dpo'"):
        OBJECTIVES["lm"](None, {"pairs": 2, "input_ids": None})


def test_a_world_with_the_video_task_ships_its_preference_pairs(tmp_path):
    import json

    from vlmlab.data.world import build_world

    sizes = {"n_per_task": {"train": 4, "val": 0, "test": 2}, "n_captions": 0}
    build_world(tmp_path / "w", tasks=(), extra_tasks=("video",), **sizes)
    pairs = json.loads((tmp_path / "w" / "preferences-train.json").read_text())
    videos = [r for r in json.loads((tmp_path / "w" / "train.json").read_text()) if r["task"] == "video"]
    assert len(pairs) == len(videos) == 4 and (tmp_path / "w" / "preferences-test.json").is_file()
    assert not (tmp_path / "w" / "preferences-val.json").exists()
    (tmp_path / "w" / "preferences-train.json").unlink()  # an older world without them gets them on reuse
    assert build_world(tmp_path / "w", tasks=(), extra_tasks=("video",), **sizes)["regenerated"] is False
    assert (tmp_path / "w" / "preferences-train.json").is_file()
