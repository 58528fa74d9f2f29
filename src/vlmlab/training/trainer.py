"""The one training loop, for every stage of every recipe.

Per stage: ``apply_stage`` picks what trains -> AdamW with per-part learning rates -> linear warmup + cosine
decay -> gradient accumulation, clipping, optional bf16 autocast. Every run directory holds ``run.json`` (the
resolved settings), ``metrics.jsonl``, ``loss.png``, ``train.log``, ``quarantine.jsonl`` and ``checkpoints/``.

Resume is exact on CPU: the data order is a pure function of (seed, stage, epoch) and the position is derived
from the step counter, and a checkpoint holds model, optimizer, scheduler and RNG states (``checkpoint.py``).
Faults (RELIABILITY.md T1-T6): checkpoints are atomic; SIGTERM/SIGINT save at the next step boundary and exit;
a non-finite loss skips the step, five in a row abort; bad samples are quarantined, over 1% abort.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlmlab.data.dataset import SupervisedDataset, load_stage_records, mix_front_layout
from vlmlab.errors import DataError, VlmlabError
from vlmlab.io import JsonlWriter, atomic_write_json, atomic_write_text, read_jsonl
from vlmlab.models.vlm import CONFIG_FILE, VisionLanguageModel
from vlmlab.processing.processor import Processor, to_device
from vlmlab.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vlmlab.training.objectives import OBJECTIVES
from vlmlab.training.stages import Stage, apply_stage, describe_groups

log = logging.getLogger("vlmlab.train")
CKPT_PREFIX = "step-"
MAX_CONSECUTIVE_NONFINITE = 5
MIN_SEEN_FOR_BAD_FRACTION = 100


class TrainingError(VlmlabError):
    """The run cannot continue (too many bad samples, repeated non-finite losses ...)."""


@dataclass
class TrainOptions:
    run_dir: Path
    data_root: Path | None = None
    seed: int = 0
    bf16: bool = False
    """bf16 autocast for forward and loss (weights and optimizer stay fp32)."""
    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0: only at the end of each stage)."""
    keep_checkpoints: int = 2
    max_bad_fraction: float = 0.01
    progress: bool = True
    device: str | None = None
    """Where to train (``cuda``, ``cpu``, ...); default: CUDA when available, else the CPU."""
    stop_after: int | None = None
    """Stop (with a checkpoint) after this many global steps: used to interrupt runs in tests."""


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self, model: VisionLanguageModel, processor: Processor, stages: list[Stage], options: TrainOptions
    ):
        self.model = model
        self.processor = processor
        self.stages = stages
        self.opt = options
        self.run_dir = Path(options.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = {
            "stage": 0,
            "step": 0,
            "global_step": 0,
            "attempted": 0,
            "bad_ids": [],
            "skipped_steps": 0,
        }
        self._stop_requested = False
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # -- public --------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = _attach_log_file(self.run_dir / "train.log")
        try:
            return self._fit(resume)
        finally:  # this run's log file must not collect later runs' lines (nor stay open)
            if handler is not None:
                logging.getLogger("vlmlab").removeHandler(handler)
                handler.close()

    def _fit(self, resume: bool) -> dict:
        seed_everything(self.opt.seed)
        self.model.to(self.device)
        ckpt = latest_checkpoint(self.ckpt_dir, prefix=CKPT_PREFIX) if resume else None
        saved: dict | None = None
        if resume and ckpt is None:
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
        if ckpt is not None:
            saved = self._restore(ckpt)
        else:
            self._write_run_json()
            for f in ("metrics.jsonl", "quarantine.jsonl"):
                (self.run_dir / f).unlink(missing_ok=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.state["stage"] < len(self.stages):
                finished = self._run_stage(self.stages[self.state["stage"]], saved)
                saved = None
                if not finished:
                    return {"stopped": True, **self.state}
                self.state.update(stage=self.state["stage"] + 1, step=0)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        self._plot()
        return {"stopped": False, **self.state}

    # -- one stage -----------------------------------------------------------------------------------------
    def _run_stage(self, stage: Stage, saved: dict | None) -> bool:
        groups = apply_stage(self.model, stage)
        # An objective with state of its own (DPO: its frozen reference, kept on disk for resume).
        begin = getattr(OBJECTIVES[stage.objective], "begin_stage", None)
        if begin is not None:
            state_dir = self.run_dir / "objective" / f"stage-{self.state['stage']}"
            begin(self.model, stage, state_dir, fresh=self.state["step"] == 0)
        log.info(
            "stage %r: %d steps x %d samples", stage.name, stage.steps, stage.batch_size * stage.grad_accum
        )
        for line in describe_groups(self.model, groups):
            log.info(line)
        optimizer = torch.optim.AdamW(groups, betas=stage.betas, weight_decay=stage.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, stage.steps, stage.warmup_steps)
        )
        if saved is not None:
            optimizer.load_state_dict(
                optimizer_state_from_tensors(saved["optimizer"], saved["optimizer_meta"])
            )
            scheduler.load_state_dict(saved["scheduler"])
        records = load_stage_records(stage.data, self.opt.data_root, stage.tasks)
        if not records:
            raise TrainingError(
                f"stage {stage.name!r}: no records in {list(stage.data)} (tasks {stage.tasks})"
            )
        records = mix_front_layout(records, stage.front_layout, self.opt.seed)
        dataset = SupervisedDataset(records, self.processor)
        metrics = JsonlWriter(self.run_dir / "metrics.jsonl")
        quarantine = JsonlWriter(self.run_dir / "quarantine.jsonl")
        bar = tqdm(
            total=stage.steps,
            initial=self.state["step"],
            desc=stage.name,
            disable=None if self.opt.progress else True,  # None: tqdm hides itself when not on a terminal
            dynamic_ncols=True,
        )
        nonfinite = 0
        self.model.train()
        try:
            while self.state["step"] < stage.steps:
                t0 = time.perf_counter()
                loss, n_samples = self._accumulate(stage, dataset, quarantine)
                finite = math.isfinite(loss)
                grad_norm = float("nan")
                if finite:
                    params = [p for g in groups for p in g["params"]]
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm))
                    finite = math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                    scheduler.step()
                    nonfinite = 0
                else:
                    # RELIABILITY T4: a non-finite step changes nothing; several in a row mean a broken run.
                    nonfinite += 1
                    self.state["skipped_steps"] += 1
                    log.warning(
                        "stage %r step %d: non-finite loss or gradient, step skipped",
                        stage.name,
                        self.state["step"],
                    )
                    if nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                        raise TrainingError(f"stage {stage.name!r}: {nonfinite} consecutive non-finite steps")
                optimizer.zero_grad(set_to_none=True)
                self.state["step"] += 1
                self.state["global_step"] += 1
                dt = time.perf_counter() - t0
                lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
                metrics.write(
                    {
                        "stage": stage.name,
                        "step": self.state["step"],
                        "global_step": self.state["global_step"],
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "lr": lrs,
                        "samples_per_s": n_samples / dt if dt > 0 else 0.0,
                        **self._terms,
                    }
                )
                bar.set_postfix(loss=f"{loss:.3f}", sps=f"{n_samples / dt:.0f}")
                bar.update(1)
                if self.state["step"] % max(1, stage.steps // 10) == 0:  # a trace in train.log and CI logs
                    log.info(
                        "%s step %d/%d loss %.4f (%.0f samples/s)",
                        stage.name,
                        self.state["step"],
                        stage.steps,
                        loss,
                        n_samples / dt if dt > 0 else 0.0,
                    )
                end_of_stage = self.state["step"] == stage.steps
                periodic = self.opt.save_every and self.state["global_step"] % self.opt.save_every == 0
                stop = self._stop_requested or self.state["global_step"] == self.opt.stop_after
                if end_of_stage or periodic or stop:
                    self._save(optimizer, scheduler, stage_done=end_of_stage)
                if stop:
                    log.info("stopping at global step %d (checkpoint saved)", self.state["global_step"])
                    return False
        finally:
            bar.close()
            metrics.close()
            quarantine.close()
        return True

    def _accumulate(
        self, stage: Stage, dataset: SupervisedDataset, quarantine: JsonlWriter
    ) -> tuple[float, int]:
        """Forward/backward ``grad_accum`` micro-batches; returns the mean loss and the samples used."""
        total, used = 0.0, 0
        self._terms: dict[str, float] = {}  # an objective's separate loss terms, averaged like the loss
        for micro in range(stage.grad_accum):
            first = (self.state["step"] * stage.grad_accum + micro) * stage.batch_size
            samples = []
            for pos in range(first, first + stage.batch_size):
                idx = self._index_at(pos, len(dataset), stage)
                self.state["attempted"] += 1
                try:
                    samples.append(dataset[idx])
                except DataError as e:
                    self._quarantine(dataset.records[idx].id, str(e), stage, quarantine)
            if not samples:
                continue
            batch = to_device(self.processor.collate(samples), self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.opt.bf16):
                out = OBJECTIVES[stage.objective](self.model, batch)
            (out.loss / stage.grad_accum).backward()
            total += out.loss.item() / stage.grad_accum
            for k, v in (getattr(out, "terms", None) or {}).items():
                self._terms[k] = self._terms.get(k, 0.0) + float(v) / stage.grad_accum
            used += len(samples)
        self._check_bad_fraction()
        return total, used

    def _index_at(self, pos: int, n: int, stage: Stage) -> int:
        """Dataset index at sample position ``pos`` of this stage: a fresh permutation every epoch."""
        epoch, offset = divmod(pos, n)
        if getattr(self, "_perm_key", None) != (self.state["stage"], epoch, n):
            g = torch.Generator().manual_seed(self.opt.seed * 1_000_003 + self.state["stage"] * 1009 + epoch)
            self._perm = torch.randperm(n, generator=g).tolist()
            self._perm_key = (self.state["stage"], epoch, n)
        return self._perm[offset]

    def _quarantine(self, rec_id: str, reason: str, stage: Stage, writer: JsonlWriter) -> None:
        bad = self.state["bad_ids"]
        if rec_id not in bad:
            bad.append(rec_id)
            writer.write({"id": rec_id, "stage": stage.name, "reason": reason})
            log.warning("skipped bad sample: %s", reason)
        self._check_bad_fraction()

    def _check_bad_fraction(self) -> None:
        # Also called after every step: bad samples met before MIN_SEEN attempts must still count against the cap.
        bad, seen = self.state["bad_ids"], self.state["attempted"]
        if seen >= MIN_SEEN_FOR_BAD_FRACTION and len(bad) / seen > self.opt.max_bad_fraction:
            raise TrainingError(
                f"{len(bad)} bad samples out of {seen} seen (over {self.opt.max_bad_fraction:.0%}); "
                f"see {self.run_dir / 'quarantine.jsonl'}"
            )

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save(self, optimizer, scheduler, stage_done: bool) -> None:
        opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
        rng_tensors, rng_meta = rng_state()
        state = {
            "trainer": dict(self.state),
            "optimizer_meta": opt_meta,
            "scheduler": scheduler.state_dict(),
            "rng_meta": rng_meta,
            "stage_done": stage_done,
        }
        path = self.ckpt_dir / f"{CKPT_PREFIX}{self.state['global_step']}"
        save_checkpoint(
            path,
            tensors={"model": self.model.state_dict(), "optimizer": opt_tensors, "rng": rng_tensors},
            state=state,
            write_extra=self._write_model_files,
        )
        for old in sorted(self._checkpoints())[: -self.opt.keep_checkpoints]:
            shutil.rmtree(old[1], ignore_errors=True)

    def _checkpoints(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.ckpt_dir.glob(f"{CKPT_PREFIX}*"):
            suffix = p.name[len(CKPT_PREFIX) :]
            if suffix.isdigit():
                out.append((int(suffix), p))
        return out

    def _write_model_files(self, path: Path) -> None:
        (path / CONFIG_FILE).write_text(json.dumps(self.model.config.to_dict(), indent=2))
        self.processor.save_pretrained(path)

    def _restore(self, ckpt: Path) -> dict | None:
        tensors, state = load_checkpoint(ckpt)
        self.model.load_state_dict_strict(tensors["model"], source=str(ckpt))
        self.state = dict(state["trainer"])
        # Metrics logged after this checkpoint (by the interrupted process) are replaced by the resumed run's.
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            kept = [r for r in read_jsonl(metrics) if r["global_step"] <= self.state["global_step"]]
            atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))
        set_rng_state(tensors["rng"], state["rng_meta"])
        log.info("resumed from %s (stage %d, step %d)", ckpt, self.state["stage"], self.state["step"])
        if state["stage_done"]:
            # The checkpoint closed its stage: continue with a fresh optimizer for the next one.
            self.state.update(stage=self.state["stage"] + 1, step=0)
            return None
        return {
            "optimizer": tensors["optimizer"],
            "optimizer_meta": state["optimizer_meta"],
            "scheduler": state["scheduler"],
        }

    # -- reporting -----------------------------------------------------------------------------------------
    def _write_run_json(self) -> None:
        atomic_write_json(
            self.run_dir / "run.json",
            {
                "model": self.model.config.to_dict(),
                "stages": [dataclasses.asdict(s) for s in self.stages],
                "options": {
                    k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.opt).items()
                },
            },
        )

    def _plot(self) -> None:
        from vlmlab.training.plot import plot_losses

        plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")

    def _on_signal(self, signum, frame) -> None:
        # RELIABILITY T3: only set a flag; the loop saves at the next step boundary.
        self._stop_requested = True


def _attach_log_file(path: Path) -> logging.FileHandler | None:
    """Add a handler writing to ``path``; returns it (None when one is already attached)."""
    root = logging.getLogger("vlmlab")
    root.setLevel(logging.INFO)
    if not any(
        isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in root.handlers
    ):
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(h)
        return h
    return None
