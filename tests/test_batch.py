"""Continuous batching (``DecodeBatch``): rows that join, leave, shift and compact decode exactly what each
prompt decodes alone with ``generate``."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmlab.inference.batch import DecodeBatch

QUESTIONS = [
    "What color is the shape?",
    "How many shapes are there? one two three four circle square",
    "Where?",
    "What shape is this? circle square triangle star red green blue",
    "a large red circle",
]
COLOURS = ["red", "blue", "green", "yellow", "purple"]


def _prompts(proc):
    out = []
    for q, c in zip(QUESTIONS, COLOURS):
        b = proc([[{"role": "user", "content": "<image>\n" + q}]], [[Image.new("RGB", (32, 32), c)]])
        out.append((b["input_ids"], b["pixel_values"]))
    return out


def _alone(model, proc, ids, pixels, n):
    return model.generate(
        input_ids=ids, pixel_values=pixels, max_new_tokens=n, pad_token_id=proc.pad_token_id
    )[0].tolist()


def schedule(model, prompts, joins, lengths, width) -> list[list[int]]:
    """Greedy tokens of every prompt when row i joins a ``DecodeBatch`` at step ``joins[i]`` and leaves after
    ``lengths[i]`` tokens."""
    batch = DecodeBatch(model, width)
    got: dict[int, list[int]] = {}
    step = 0
    while len(got) < len(prompts) or len(batch):
        for i, j in enumerate(joins):
            if j == step:
                ids, px = prompts[i]
                got[i] = [int(batch.add(i, ids, pixel_values=px).argmax())]
        for i in [k for k in batch.keys if len(got[k]) == lengths[k]]:
            batch.remove(i)
        if len(batch):
            logits = batch.step(torch.tensor([got[k][-1] for k in batch.keys]))
            for k, row in zip(batch.keys, logits):
                got[k].append(int(row.argmax()))
        step += 1
        assert step < 100
    return [got[i] for i in range(len(prompts))]


@pytest.mark.parametrize("tight", [False, True])  # tight: the buffer's end is reached, rows compact left
def test_rows_joining_and_leaving_decode_like_alone(tiny_model, tight, monkeypatch):
    model, proc = tiny_model
    moves = {"_shift": 0, "_compact": 0}
    for name in moves:
        original = getattr(DecodeBatch, name)

        def counted(self, *a, _name=name, _original=original):
            moves[_name] += 1
            return _original(self, *a)

        monkeypatch.setattr(DecodeBatch, name, counted)
    prompts = _prompts(proc)
    # Row i joins at step joins[i] and generates lengths[i] tokens; a long prompt joining later shifts the rest.
    joins, lengths = [0, 0, 3, 5, 9], [12, 4, 10, 6, 7]
    width = max(ids.shape[1] + n for (ids, _), n in zip(prompts, lengths)) if tight else 128
    assert schedule(model, prompts, joins, lengths, width) == [
        _alone(model, proc, ids, px, n) for (ids, px), n in zip(prompts, lengths)
    ]
    assert moves["_shift"] >= 2 and (moves["_compact"] >= 1) == tight, moves


def test_a_prompt_longer_than_the_context_is_refused(tiny_model):
    model, proc = tiny_model
    ids, px = _prompts(proc)[1]
    with pytest.raises(ValueError, match="does not fit the context"):
        DecodeBatch(model, ids.shape[1]).add(0, ids, pixel_values=px)


def test_a_sliding_window_decoder_is_refused_at_once(tokenizer):
    from conftest import LLAMA, make_model
    from vlmlab.config import LanguageConfig
    from vlmlab.errors import ConfigError

    model, _ = make_model(
        tokenizer, language=LanguageConfig("mistral", params={**LLAMA, "sliding_window": 16})
    )
    with pytest.raises(ConfigError, match="continuous batching needs plain full-attention layers; Mistral"):
        DecodeBatch(model, 64)


def test_the_cache_starts_narrow_and_widens_as_rows_need(tiny_model):
    """Buffers sized for the requests, not the model's context: they double when a row needs more columns."""
    from vlmlab.inference.batch import MIN_WIDTH

    model, proc = tiny_model
    (ids, px), (ids2, px2) = _prompts(proc)[:2]
    n = MIN_WIDTH + 10 - ids.shape[1]  # the row passes MIN_WIDTH columns
    batch = DecodeBatch(model, 128)
    tokens = [int(batch.add("a", ids, pixel_values=px).argmax())]
    other = [int(batch.add("b", ids2, pixel_values=px2).argmax())]
    assert batch.width == MIN_WIDTH
    for _ in range(n - 1):
        logits = batch.step(torch.tensor([tokens[-1], other[-1]]))
        tokens.append(int(logits[0].argmax()))
        other.append(int(logits[1].argmax()))
    assert batch.width == 128
    assert tokens == _alone(model, proc, ids, px, n)
    assert other == _alone(model, proc, ids2, px2, n)


@pytest.mark.parametrize("mode", ["expert", "plora"])
def test_routed_models_with_shared_positions_decode_like_alone(tokenizer, mode):
    """CogVLM / XComposer2 in the server's batch: each prompt's image rows are routed at its prefill, and rows keep
    their own (shared-image) positions."""
    import dataclasses

    from test_fusion_model import config, perturb
    from vlmlab.models.vlm import VisionLanguageModel
    from vlmlab.processing.processor import Processor

    torch.manual_seed(0)
    cfg = dataclasses.replace(config(tokenizer, mode), image_positions="shared")
    model = VisionLanguageModel(cfg).eval()
    perturb(model)
    proc = Processor(tokenizer, cfg.processor, model.num_image_tokens)
    prompts = _prompts(proc)[:3]
    lengths = [6, 3, 5]
    assert schedule(model, prompts, [0, 1, 2], lengths, 128) == [
        _alone(model, proc, ids, px, n) for (ids, px), n in zip(prompts, lengths)
    ]
