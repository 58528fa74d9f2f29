"""Tests for vlmlab.training.checkpoint (RELIABILITY.md T1, T2, M1, M3).

Compared against: an uninterrupted training run (bitwise equal params after save/load/resume), the bytes written
before a crash (the previous checkpoint stays byte-identical after kill -9 at random moments), and the manifest's
sha256 (a flipped byte is an error, never silently wrong weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from vlmlab.errors import CheckpointError
from vlmlab.training.checkpoint import (
    MANIFEST_NAME,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

DEAD_PID = 999_999_999  # above any Linux pid_max (2**22), so os.kill reports "no such process"


def _small_tensors(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(8, 4, generator=g), "b": torch.zeros(8, dtype=torch.bfloat16)},
        "extra": {"ids": torch.arange(5), "scalar": torch.tensor(3.5)},
    }


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _assert_same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert a[name][k].dtype == b[name][k].dtype
            assert torch.equal(a[name][k], b[name][k]), (name, k)


# ------------------------------------------------------------------------------------------------------------
# Round trip, overwrite, extra files


def test_round_trip_and_manifest(tmp_path: Path) -> None:
    tensors = _small_tensors()
    state = {"step": 7, "best": float("inf"), "names": ["a", "b"], "nested": {"x": None, "y": True}}

    def write_extra(d: Path) -> None:
        (d / "config.json").write_text('{"hidden": 8}')
        (d / "tokenizer").mkdir()
        (d / "tokenizer" / "vocab.txt").write_text("a\nb\n")

    out = save_checkpoint(tmp_path / "step-7", tensors=tensors, state=state, write_extra=write_extra)
    assert out == tmp_path / "step-7" and is_complete(out)
    loaded, loaded_state = load_checkpoint(out)
    _assert_same(tensors, loaded)
    assert loaded_state == state
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True
    assert set(manifest["files"]) == {
        "model.safetensors",
        "extra.safetensors",
        "state.json",
        "config.json",
        "tokenizer/vocab.txt",
    }
    assert _leftovers(tmp_path) == []

    # Extra files are verified like weights.
    (out / "tokenizer" / "vocab.txt").write_text("a\nc\n")
    with pytest.raises(CheckpointError, match=r"tokenizer/vocab\.txt: checksum mismatch"):
        load_checkpoint(out)


def test_overwrite_replaces_and_refuses_foreign_dirs(tmp_path: Path) -> None:
    path = tmp_path / "step-1"
    save_checkpoint(path, tensors=_small_tensors(0), state={"v": 0})
    save_checkpoint(path, tensors=_small_tensors(1), state={"v": 1})
    tensors, state = load_checkpoint(path)
    _assert_same(tensors, _small_tensors(1))
    assert state == {"v": 1} and _leftovers(tmp_path) == []

    foreign = tmp_path / "my-data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(foreign, tensors={}, state={})
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_failing_write_extra_leaves_nothing(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "step-1", tensors=_small_tensors(), state={"v": 1})
    before = _tree_digest(tmp_path / "step-1")

    def boom(d: Path) -> None:
        raise RuntimeError("tokenizer export failed")

    with pytest.raises(RuntimeError, match="tokenizer export failed"):
        save_checkpoint(tmp_path / "step-1", tensors=_small_tensors(5), state={"v": 2}, write_extra=boom)
    assert _tree_digest(tmp_path / "step-1") == before
    assert _leftovers(tmp_path) == []


def test_tied_and_shared_tensors(tmp_path: Path) -> None:
    emb = torch.randn(6, 4)
    group = {
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied weights: same tensor under two keys
        "rows": emb[1:3],  # a view into the same storage
        "transposed": emb.t(),  # non-contiguous
        "empty_a": torch.empty(0),
        "empty_b": torch.empty(0, 3),
    }
    save_checkpoint(tmp_path / "c", tensors={"model": group}, state={})
    loaded, _ = load_checkpoint(tmp_path / "c")
    assert loaded["model"].keys() == group.keys()
    for k, v in group.items():
        assert torch.equal(loaded["model"][k], v), k

    # A real module with tied weights, loaded back into a fresh one.
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    save_checkpoint(tmp_path / "m", tensors={"model": model.state_dict()}, state={})
    fresh = Tied()
    fresh.load_state_dict(load_checkpoint(tmp_path / "m")[0]["model"])
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight  # tying survives load_state_dict


# ------------------------------------------------------------------------------------------------------------
# Corruption and incompleteness (M3)


@pytest.mark.parametrize("where", ["data", "header"])
def test_single_byte_flip_is_detected(tmp_path: Path, where: str) -> None:
    path = save_checkpoint(tmp_path / "c", tensors=_small_tensors(), state={})
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    # The last byte is tensor data (safetensors would load it silently); byte 20 is inside the JSON header.
    i = len(data) - 1 if where == "data" else 20
    data[i] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "checksum mismatch: file was modified or corrupted" in msg
    assert str(path) in msg and "model.safetensors" in msg and "\n" not in msg


def _rewrite_with_manifest(path: Path, rel: str, data: bytes) -> None:
    """Replace a file and fix its manifest entry: a checkpoint whose checksums match but whose content is bad."""
    (path / rel).write_bytes(data)
    mpath = path / MANIFEST_NAME
    manifest = json.loads(mpath.read_text())
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    mpath.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda p: shutil.rmtree(p), "checkpoint directory not found"),
        (lambda p: (p / MANIFEST_NAME).unlink(), "manifest.json missing: incomplete"),
        (lambda p: (p / MANIFEST_NAME).write_text("{not json"), r"manifest\.json: unreadable"),
        (
            lambda p: (p / "extra.safetensors").unlink(),
            r"extra\.safetensors: file listed in manifest\.json is missing",
        ),
        (lambda p: (p / "model.safetensors").write_bytes(b"short"), r"model\.safetensors: size mismatch"),
        (
            lambda p: _rewrite_with_manifest(p, "model.safetensors", b"\x08" + b"\0" * 7 + b"garbage!"),
            "unreadable safetensors",
        ),
        (lambda p: _rewrite_with_manifest(p, "state.json", b"{oops"), r"state\.json: unreadable"),
        (
            lambda p: shutil.copy(p / "model.safetensors", p / "sneaky.safetensors"),
            r"sneaky\.safetensors: not listed",
        ),
        (lambda p: _rewrite_with_manifest(p, "../outside.txt", b"x"), "bad file name"),
    ],
)
def test_load_errors_are_one_line_and_name_the_file(tmp_path: Path, damage: Any, pattern: str) -> None:
    path = save_checkpoint(tmp_path / "ckpt", tensors=_small_tensors(), state={"s": 1})
    damage(path)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_latest_checkpoint_skips_incomplete_and_temp_dirs(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 30):
        save_checkpoint(tmp_path / f"step-{step}", tensors=_small_tensors(step), state={"step": step})
    (tmp_path / "step-30" / MANIFEST_NAME).unlink()  # interrupted before the manifest
    shutil.copytree(tmp_path / "step-10", tmp_path / "step-40.tmp-123")  # complete-looking temp dir
    shutil.copytree(tmp_path / "step-10", tmp_path / "step-50.old-123")
    (tmp_path / "step-60").mkdir()  # empty
    (tmp_path / "step-x").mkdir()
    assert not is_complete(tmp_path / "step-30")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-10"  # 10 < 30 numerically, "10" < "2" as strings
    assert latest_checkpoint(tmp_path, prefix="ckpt-") is None


def test_next_save_cleans_leftovers_and_rolls_back(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "step-1", tensors=_small_tensors(1), state={"step": 1})
    save_checkpoint(tmp_path / "step-2", tensors=_small_tensors(2), state={"step": 2})
    digest = _tree_digest(tmp_path / "step-2")
    # A process killed between "move step-2 aside" and "rename the new one into place".
    (tmp_path / "step-2").rename(tmp_path / f"step-2.old-{DEAD_PID}")
    shutil.copytree(tmp_path / "step-1", tmp_path / f"step-2.tmp-{DEAD_PID}")
    (tmp_path / f"step-3.tmp-{DEAD_PID}").mkdir()  # killed early
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"

    save_checkpoint(tmp_path / "step-4", tensors=_small_tensors(4), state={"step": 4})
    assert _leftovers(tmp_path) == []
    assert _tree_digest(tmp_path / "step-2") == digest  # the previous step-2 is back, byte-identical
    assert latest_checkpoint(tmp_path) == tmp_path / "step-4"


# ------------------------------------------------------------------------------------------------------------
# Kill -9 during save (T1)

# A fork server: it imports torch once (about 1 s), then forks one saver per trial, so 10 trials stay cheap. Each
# forked child saves 3 MiB checkpoints in a loop, cycling over step-1..step-3 (so most saves replace an existing
# checkpoint), until the test SIGKILLs it. The server reaps the child so its pid is dead for the cleanup.
_SAVER_SERVER = """
import os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from vlmlab.training.checkpoint import save_checkpoint
run_dir = Path(sys.argv[1])
for line in sys.stdin:
    trial = int(line)
    pid = os.fork()
    if pid == 0:
        g = torch.Generator().manual_seed(trial)
        i = 0
        while True:
            w = torch.randn(256, 1024, generator=g)
            tensors = {"model": {"w": w, "tied": w}, "optim": {"m": torch.randn(512, 1024, generator=g)}}
            save_checkpoint(run_dir / f"step-{1 + i % 3}", tensors=tensors, state={"trial": trial, "i": i},
                            write_extra=lambda d: (d / "config.json").write_text("{}"))
            i += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


@pytest.mark.skipif(
    not hasattr(signal, "SIGKILL") or sys.platform == "win32", reason="needs fork and SIGKILL"
)
def test_kill_9_during_save_never_loses_a_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    good = save_checkpoint(run_dir / "step-0", tensors=_small_tensors(), state={"step": 0})
    good_digest = _tree_digest(good)
    rng = random.Random(20240601)  # seeded kill timing
    trials_with_leftovers = 0

    server = subprocess.Popen(
        [sys.executable, "-c", _SAVER_SERVER, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        for trial in range(10):
            steps_before = {p.name for p in run_dir.glob("step-*") if is_complete(p)}
            server.stdin.write(f"{trial}\n")
            server.stdin.flush()
            child = int(server.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(child, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"

            # Every directory under a final name is complete: partial ones only ever exist as *.tmp-<pid>.
            finals = [p for p in run_dir.iterdir() if not _leftovers_name(p.name)]
            assert all(is_complete(p) for p in finals), [p.name for p in finals]
            assert _tree_digest(good) == good_digest
            load_checkpoint(good)
            latest = latest_checkpoint(run_dir)
            assert latest is not None
            load_checkpoint(latest)
            trials_with_leftovers += bool(_leftovers(run_dir))

            # The next save removes leftovers and rolls back a moved-aside checkpoint, so nothing is lost.
            save_checkpoint(run_dir / "probe", tensors={"x": {"x": torch.ones(1)}}, state={})
            assert _leftovers(run_dir) == []
            steps_after = {p.name for p in run_dir.glob("step-*") if is_complete(p)}
            assert steps_before <= steps_after
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert trials_with_leftovers >= 1, "no kill landed inside a save; the test did not exercise anything"


def _leftovers_name(name: str) -> bool:
    return ".tmp-" in name or ".old-" in name


# ------------------------------------------------------------------------------------------------------------
# Exact resume: optimizer and RNG state (T2)


def _make(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, batches: list[Any]) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def _assert_sd_equal(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            _assert_sd_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_sd_equal(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN == NaN here


def test_optimizer_round_trip_resumes_bitwise(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(10)]
    k = 4

    ref_model, ref_opt, ref_sched = _make(0)
    _train(ref_model, ref_opt, ref_sched, batches)

    model, opt, sched = _make(0)
    _train(model, opt, sched, batches[:k])
    opt_tensors, opt_meta = optimizer_state_to_tensors(opt.state_dict())
    sched_tensors, sched_meta = optimizer_state_to_tensors(sched.state_dict())
    assert "state.0.exp_avg" in opt_tensors and "state.0.step" in opt_tensors
    save_checkpoint(
        tmp_path / f"step-{k}",
        tensors={"model": model.state_dict(), "optim": opt_tensors, "sched": sched_tensors},
        state={"step": k, "optim": opt_meta, "sched": sched_meta},
    )
    original_sd = opt.state_dict()
    del model, opt, sched

    tensors, state = load_checkpoint(tmp_path / f"step-{k}")
    model, opt, sched = _make(123)  # different init: everything must come from the checkpoint
    model.load_state_dict(tensors["model"])
    restored = optimizer_state_from_tensors(tensors["optim"], state["optim"])
    _assert_sd_equal(restored, original_sd)  # tuples, int keys, tensor `step`, None/bool options all exact
    opt.load_state_dict(restored)
    sched.load_state_dict(optimizer_state_from_tensors(tensors["sched"], state["sched"]))
    _train(model, opt, sched, batches[k:])

    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
    _assert_sd_equal(opt.state_dict(), ref_opt.state_dict())


def test_state_encoding_edge_cases() -> None:
    sd = {
        "state": {0: {"step": 3.0, "buf": None}, 7: {"t": torch.arange(3)}},
        "param_groups": [{"params": [0, 7], "lr": torch.tensor(0.1), "betas": (0.9, (1, 2)), "flag": False}],
        "tricky": {"__tensor__": "not a tensor"},  # a real key that looks like an encoding marker
        "a.b": {"c": torch.ones(1)},
        "a": {"b.c": torch.zeros(1)},  # same dotted path as above: keys must stay unique
    }
    tensors, meta = optimizer_state_to_tensors(sd)
    json.dumps(meta)  # metadata is plain JSON
    _assert_sd_equal(optimizer_state_from_tensors(tensors, json.loads(json.dumps(meta))), sd)
    with pytest.raises(TypeError, match="cannot store"):
        optimizer_state_to_tensors({"x": object()})
    with pytest.raises(CheckpointError):
        optimizer_state_from_tensors({}, meta)


def _draw() -> tuple[list[float], list[float], torch.Tensor]:
    py = [random.random(), random.gauss(0, 1), random.randint(0, 10**9)]
    nps = [*np.random.rand(3).tolist(), float(np.random.randn())]
    return py, nps, torch.rand(5)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()  # advance, and leave cached gaussians behind (python gauss_next, numpy has_gauss)
    random.gauss(0, 1)
    np.random.randn()
    tensors, meta = rng_state()
    save_checkpoint(tmp_path / "c", tensors={"rng": tensors}, state={"rng": meta})
    expected = _draw()
    _draw()  # move on, as training would

    loaded, state = load_checkpoint(tmp_path / "c")
    set_rng_state(loaded["rng"], state["rng"])
    again = _draw()
    assert again[0] == expected[0] and again[1] == expected[1]
    assert torch.equal(again[2], expected[2])
