"""Tests of ``vlmlab.training`` (Trainer, TrainOptions, Stage, apply_stage) on tiny models and tiny worlds.

Checked against RELIABILITY.md: T2 (an interrupted and resumed run reproduces the uninterrupted run bitwise:
losses, sample order and final parameters, including after ``kill -9``), T4 (a non-finite step changes nothing
and is counted; five in a row abort; no checkpoint holds a non-finite tensor), T6 (bad samples are quarantined
by id with a reason naming the file; over the 1% cap the run fails with a clear message). Also: a checkpoint
directory loads with ``vlmlab.load``, stages validate their parts and learning rates and ``apply_stage`` freezes
exactly the other parts, and a run directory holds its reports.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vlmlab
from conftest import make_model
from vlmlab.data.dataset import SupervisedDataset
from vlmlab.data.world import build_world
from vlmlab.errors import ConfigError
from vlmlab.io import read_jsonl
from vlmlab.training.checkpoint import load_checkpoint
from vlmlab.training.stages import Stage, apply_stage
from vlmlab.training.trainer import Trainer, TrainingError, TrainOptions

LR = {"vision": 3e-3, "connector": 3e-3, "language": 3e-3}
ALL = ("vision", "connector", "language")


def two_stages() -> list[Stage]:
    return [
        Stage(name="align", train=("connector",), lr=LR, steps=3, tasks=("caption",), batch_size=4),
        Stage(name="instruct", train=ALL, lr=LR, steps=4, batch_size=4, warmup_steps=1),
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=0, n_per_task={"train": 4, "val": 0, "test": 0}, n_captions={"train": 8})
    return out


def options(run_dir: Path, world: Path, save_every: int = 1, **kw) -> TrainOptions:
    return TrainOptions(run_dir=run_dir, data_root=world, save_every=save_every, progress=False, **kw)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["global_step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl")]


def record_ids(monkeypatch) -> list[str]:
    """Every sample id the trainer loads, in order."""
    seen: list[str] = []
    original = SupervisedDataset.__getitem__

    def getitem(self, i):
        seen.append(self.records[i].id)
        return original(self, i)

    monkeypatch.setattr(SupervisedDataset, "__getitem__", getitem)
    return seen


@pytest.fixture(scope="module")
def reference(tmp_path_factory, world, tokenizer):
    """The uninterrupted run: its run dir, final parameters and the sample ids in the order seen."""
    run = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    seen = record_ids(mp)
    try:
        model, proc = make_model(tokenizer, seed=0)
        result = Trainer(model, proc, two_stages(), options(run, world)).fit()
    finally:
        mp.undo()
    assert result["stopped"] is False and result["global_step"] == 7
    return run, {k: v.clone() for k, v in model.state_dict().items()}, seen, model, proc


def assert_same_run(run: Path, model, seen: list[str], reference) -> None:
    ref_run, ref_params, ref_seen, _, _ = reference
    got, want = losses(run), losses(ref_run)
    assert [s for s, _ in got] == list(range(1, 8))
    assert got == want  # exact float equality, step by step
    assert seen == ref_seen  # the same samples in the same order: none skipped, none repeated
    params = model.state_dict()
    assert params.keys() == ref_params.keys()
    for k, v in ref_params.items():
        assert torch.equal(params[k], v), k


@pytest.mark.parametrize("stop_after", [2, 3, 5])  # inside stage 1, at its end, inside stage 2
def test_resume_is_exact(tmp_path, world, tokenizer, reference, monkeypatch, stop_after):
    seen = record_ids(monkeypatch)
    model, proc = make_model(tokenizer, seed=0)
    first = Trainer(model, proc, two_stages(), options(tmp_path, world, stop_after=stop_after)).fit()
    assert first["stopped"] is True and first["global_step"] == stop_after
    # A different init proves the resumed weights come from the checkpoint, not from the seed.
    model2, proc2 = make_model(tokenizer, seed=123)
    saved = model.state_dict()
    assert sum(not torch.equal(v, saved[k]) for k, v in model2.state_dict().items()) > len(saved) // 2
    second = Trainer(model2, proc2, two_stages(), options(tmp_path, world)).fit(resume=True)
    assert second["stopped"] is False and second["global_step"] == 7
    assert_same_run(tmp_path, model2, seen, reference)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import make_model
    from vlmlab.io import JsonlWriter
    from vlmlab.processing.tokenizer import train_bpe_tokenizer
    from conftest import TEXTS
    import test_trainer as tt

    kill_at = int(sys.argv[1])
    original = JsonlWriter.write

    def write(self, record):
        original(self, record)
        # kill -9 right after the metrics of step kill_at are durable, before that step's checkpoint is written
        if record.get("global_step") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    JsonlWriter.write = write
    model, proc = make_model(train_bpe_tokenizer(TEXTS, vocab_size=320), seed=0)
    tt.Trainer(model, proc, tt.two_stages(), tt.options(tt.Path(sys.argv[2]), tt.Path(sys.argv[3]))).fit()
""")


def test_resume_after_kill_9(tmp_path, world, tokenizer, reference, monkeypatch):
    """A process killed with SIGKILL mid-run (its step-k metrics written, its step-k checkpoint not) resumes
    exactly: the orphan metrics line is replaced and the run matches the uninterrupted one."""
    kill_at = 5
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    run = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }  # same float reduction order as this process
    proc = subprocess.run(
        [sys.executable, str(script), str(kill_at), str(run), str(world)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in losses(run)] == list(range(1, kill_at + 1))
    assert not (run / "checkpoints" / f"step-{kill_at}").exists()

    seen = record_ids(monkeypatch)
    model, proc_ = make_model(tokenizer, seed=7)
    result = Trainer(model, proc_, two_stages(), options(run, world)).fit(resume=True)
    assert result["global_step"] == 7
    ref_run, ref_params, ref_seen, _, _ = reference
    assert losses(run) == losses(ref_run)
    # The resumed process saw exactly the samples of steps kill_at..7 of the reference run (batch 4 each).
    assert seen == ref_seen[4 * (kill_at - 1) :]
    for k, v in ref_params.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(
    tmp_path, world, tokenizer, reference, monkeypatch
):
    """RELIABILITY T3: SIGTERM during step 4 stops the run after that step with its checkpoint saved."""
    seen = record_ids(monkeypatch)
    model, proc = make_model(tokenizer, seed=0)
    original, calls = model.forward, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    previous = signal.getsignal(signal.SIGTERM)
    first = Trainer(model, proc, two_stages(), options(tmp_path, world, save_every=0)).fit()
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is restored
    assert first["stopped"] is True and first["global_step"] == 4
    assert (tmp_path / "checkpoints" / "step-4").is_dir()
    model2, proc2 = make_model(tokenizer, seed=99)
    Trainer(model2, proc2, two_stages(), options(tmp_path, world, save_every=0)).fit(resume=True)
    assert_same_run(tmp_path, model2, seen, reference)


# -- quarantine (T6) -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world100(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world100")
    build_world(out, seed=1, n_per_task={"train": 20, "val": 0, "test": 0}, n_captions={"train": 0})
    assert len(json.loads((out / "train.json").read_text())) == 100
    return out


def copy_world(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_one_percent_bad_samples_are_quarantined_and_the_run_completes(tmp_path, world100, tokenizer):
    world = copy_world(world100, tmp_path / "world")
    recs = json.loads((world / "train.json").read_text())
    bad = recs[37]
    img = world / bad["image"]
    img.write_bytes(img.read_bytes()[:60])  # a truncated PNG
    model, proc = make_model(tokenizer)
    stage = Stage(name="instruct", train=ALL, lr=LR, steps=4, batch_size=26)  # 104 samples: every record seen
    result = Trainer(model, proc, [stage], options(tmp_path / "run", world, save_every=0)).fit()
    assert result["stopped"] is False and result["global_step"] == 4
    rows = read_jsonl(tmp_path / "run" / "quarantine.jsonl")
    assert [r["id"] for r in rows] == [bad["id"]]
    assert img.name in rows[0]["reason"] and "truncated or corrupt" in rows[0]["reason"]
    assert result["bad_ids"] == [bad["id"]]
    _, state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-4")  # skipped ids are resume state
    assert state["trainer"]["bad_ids"] == [bad["id"]] and state["trainer"]["attempted"] == 104
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))


def test_five_percent_bad_samples_abort_with_a_clear_message(tmp_path, world100, tokenizer):
    """5 missing images in 100 records, one epoch: the cap is enforced even though every bad sample may be met
    before the 100 attempts needed to judge the fraction."""
    world = copy_world(world100, tmp_path / "world")
    recs = json.loads((world / "train.json").read_text())
    bad = {r["id"]: Path(r["image"]).name for r in recs[::20]}  # 5 of 100
    for r in recs[::20]:
        (world / r["image"]).unlink()
    model, proc = make_model(tokenizer)
    stage = Stage(name="instruct", train=("connector",), lr=LR, steps=4, batch_size=26)
    with pytest.raises(TrainingError) as ei:
        Trainer(model, proc, [stage], options(tmp_path / "run", world, save_every=0)).fit()
    msg = str(ei.value)
    assert "\n" not in msg and "bad samples" in msg and "quarantine.jsonl" in msg and "1%" in msg
    rows = read_jsonl(tmp_path / "run" / "quarantine.jsonl")
    assert len(rows) == len({r["id"] for r in rows}) >= 2
    for r in rows:  # every quarantined record is an injected one, its reason naming the missing file
        assert r["id"] in bad and bad[r["id"]] in r["reason"] and "not found" in r["reason"]
    assert msg.startswith(f"{len(rows)} bad samples")


# -- non-finite steps (T4) -------------------------------------------------------------------------------------
def nan_forward(monkeypatch, model, nan_calls: set[int], snapshots: dict[int, dict]):
    """Make forward call number c (1-based) return a NaN loss for c in ``nan_calls``; snapshot the params
    each call sees (the state before that step's update)."""
    original = model.forward
    calls = [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        snapshots[calls[0]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = original(*args, **kwargs)
        if calls[0] in nan_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model, "forward", forward)


def test_one_nan_step_is_skipped_and_changes_nothing(tmp_path, world, tokenizer, monkeypatch):
    model, proc = make_model(tokenizer)
    snaps: dict[int, dict] = {}
    nan_forward(monkeypatch, model, {3}, snaps)
    stage = Stage(name="instruct", train=ALL, lr=LR, steps=6, batch_size=4, warmup_steps=2)
    result = Trainer(model, proc, [stage], options(tmp_path, world, keep_checkpoints=100)).fit()
    assert result["skipped_steps"] == 1 and result["global_step"] == 6
    before, after = snaps[3], snaps[4]
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(snaps[2][k], snaps[3][k]) for k in snaps[2])  # a normal step does change them
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(rows[2]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    # The scheduler did not advance on the skipped step: the lr after step 3 is the lr after step 2.
    assert rows[2]["lr"] == rows[1]["lr"] and rows[3]["lr"] != rows[2]["lr"]
    # No checkpoint holds a non-finite tensor.
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert len(ckpts) == 6
    for c in ckpts:
        tensors, _ = load_checkpoint(c)
        for group in tensors.values():
            for name, t in group.items():
                assert not t.is_floating_point() or torch.isfinite(t).all(), (c, name)


def test_five_consecutive_nan_steps_abort(tmp_path, world, tokenizer, monkeypatch):
    model, proc = make_model(tokenizer)
    nan_forward(monkeypatch, model, set(range(2, 100)), {})
    stage = Stage(name="instruct", train=ALL, lr=LR, steps=20, batch_size=2)
    with pytest.raises(TrainingError, match="5 consecutive non-finite"):
        Trainer(model, proc, [stage], options(tmp_path, world, keep_checkpoints=100)).fit()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    # One good step, then the skipped ones (the fifth raises, possibly before it is logged).
    assert 5 <= len(rows) <= 6 and math.isfinite(rows[0]["loss"])
    assert all(math.isnan(r["loss"]) for r in rows[1:])
    for c in (tmp_path / "checkpoints").glob("step-*"):
        tensors, _ = load_checkpoint(c)
        assert all(
            torch.isfinite(t).all() for g in tensors.values() for t in g.values() if t.is_floating_point()
        )


# -- checkpoints, stages, run directory -----------------------------------------------------------------------
def test_checkpoint_loads_with_one_call(reference):
    run, _, _, model, proc = reference
    loaded, lproc = vlmlab.load(run / "checkpoints" / "step-7")
    assert lproc.num_image_tokens == proc.num_image_tokens
    from PIL import Image

    batch = lproc(
        [[{"role": "user", "content": "<image>\nWhat color is the shape?"}]],
        [[Image.new("RGB", (32, 32), (255, 0, 0))]],
    )
    model.eval()
    with torch.no_grad():
        a = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        b = loaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.equal(a, b)


def test_stage_rejects_unknown_part_and_missing_learning_rate():
    with pytest.raises(ConfigError, match="unknown part") as ei:
        Stage(name="s", train=("connector", "projector"), lr={"connector": 1e-3, "projector": 1e-3}, steps=1)
    assert "projector" in str(ei.value) and "vision" in str(ei.value)
    with pytest.raises(ConfigError, match="no learning rate") as ei:
        Stage(name="s", train=("connector", "language"), lr={"connector": 1e-3}, steps=1)
    assert "language" in str(ei.value)
    with pytest.raises(ConfigError):
        Stage(name="s", train=("connector",), lr={"connector": 1e-3}, steps=0)


@pytest.mark.parametrize("train", [("connector",), ("connector", "language"), ("vision",)])
def test_apply_stage_freezes_exactly_the_untrained_parts(tiny_model, train):
    model, proc = tiny_model
    groups = apply_stage(model, Stage(name="s", train=train, lr={p: 1e-3 for p in train}, steps=1))
    assert [g["name"] for g in groups] == [p for p in ALL if p in train]
    from PIL import Image

    sample = proc.encode(
        [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
        [Image.new("RGB", (32, 32), (200, 30, 30))],
        train=True,
    )
    batch = proc.collate([sample])
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    for part in ALL:
        for name, p in getattr(model, part).named_parameters():
            if part in train:
                assert p.requires_grad and p.grad is not None, (part, name)
            else:
                assert not p.requires_grad and p.grad is None, (part, name)
    for g in groups:
        assert {id(p) for p in g["params"]} == {id(p) for p in getattr(model, g["name"]).parameters()}


def test_run_directory_has_its_reports(reference):
    run, _, _, model, _ = reference
    for f in ("run.json", "metrics.jsonl", "train.log", "loss.png"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((run / "run.json").read_text())
    assert [s["name"] for s in info["stages"]] == ["align", "instruct"]
    assert info["model"] == json.loads(json.dumps(model.config.to_dict()))
    log = (run / "train.log").read_text()
    n_conn = sum(p.numel() for p in model.connector.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert "train connector" in log and f"{n_conn:,} params" in log
    assert f"{total - n_conn:,} params" in log  # frozen in stage align
    assert "train vision" in log and "train language" in log  # stage instruct
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["align"] * 3 + ["instruct"] * 4
    assert {"loss", "grad_norm", "lr", "samples_per_s"} <= rows[0].keys()


def test_train_log_holds_only_its_own_run(tmp_path, world, tokenizer):
    """Two runs in one process (a notebook, a sweep): each train.log has its own run's lines only, and no log
    file stays open after ``fit`` returns or raises."""
    import logging

    def handlers() -> list[str]:
        return sorted(
            h.baseFilename for h in logging.getLogger("vlmlab").handlers if isinstance(h, logging.FileHandler)
        )

    before = handlers()
    for name in ("first", "second"):
        model, proc = make_model(tokenizer)
        stage = Stage(name=f"stage-{name}", train=("connector",), lr=LR, steps=1, batch_size=2)
        Trainer(model, proc, [stage], options(tmp_path / name, world)).fit()
        assert handlers() == before
    first = (tmp_path / "first" / "train.log").read_text()
    second = (tmp_path / "second" / "train.log").read_text()
    assert "stage-first" in first and "stage-second" not in first
    assert "stage-second" in second and "stage-first" not in second
