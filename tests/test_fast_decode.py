"""vlmlab's own decode step for Llama-family decoders (``inference/fast_decode.py``): at every step its logits equal
the decoder's full recompute, its greedy tokens equal the fallback path's, and what it cannot reproduce falls
back."""

import pytest
import torch
from PIL import Image

import vlmlab.inference.generate as generate_module
from conftest import LLAMA, make_model
from vlmlab.config import LanguageConfig
from vlmlab.inference.fast_decode import FastDecoder, unsupported_reason
from vlmlab.models.vlm import positions_from_mask

PARAMS = {k: v for k, v in LLAMA.items() if k != "bos_token_id"}  # 4 query heads on 2 kv heads
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
}
DECODERS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v with biases
    "mistral": ("mistral", {}),  # sliding_window 4096: never reached here
    "llama-rope-linear": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
    ),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
}
NEW_TOKENS = 10


def build(tokenizer, model_type: str, extra: dict):
    model, proc = make_model(
        tokenizer, language=LanguageConfig(model_type=model_type, params={**PARAMS, **extra})
    )
    # Random init keeps weights small and logits close together; larger ones make each step's argmax decisive
    # and the sequences varied. Biases start at zero: random ones, or a path that ignored them would pass.
    with torch.no_grad():
        for name, p in model.language.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.mul_(4.0)
    return model, proc


def left_padded_batch(proc):
    """Three prompts of different lengths with an image each, left-padded."""
    images = [[Image.new("RGB", (32, 32), c)] for c in ("red", "blue", "green")]
    convs = [
        [{"role": "user", "content": "<image>\n" + q}]
        for q in ("What color is the shape?", "How many shapes are there? one two three four", "Where?")
    ]
    batch = proc(convs, images)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) == 3, "prompts of different lengths expected"
    return batch


def gen_kwargs(batch, proc):
    return dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        max_new_tokens=NEW_TOKENS,
        pad_token_id=proc.pad_token_id,
    )


@pytest.fixture
def spy(monkeypatch):
    """Counts fast decode steps, and records the logits every generation step samples from."""
    calls = {"fast": 0, "logits": []}
    fast_call, sample_next = FastDecoder.__call__, generate_module.sample_next

    def counted(self, *args):
        calls["fast"] += 1
        return fast_call(self, *args)

    def recorded(logits, *args, **kwargs):
        calls["logits"].append(logits.clone())
        return sample_next(logits, *args, **kwargs)

    monkeypatch.setattr(FastDecoder, "__call__", counted)
    monkeypatch.setattr(generate_module, "sample_next", recorded)
    return calls


def fallback(monkeypatch):
    """Makes ``generate`` take transformers' decoder at every step."""
    monkeypatch.setattr(generate_module, "fast_decoder", lambda *args: None)


def full_recompute_logits(model, batch, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The last position's logits before each new token, from the decoder's forward over the whole sequence."""
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    mask = batch["attention_mask"]
    out = []
    for i in range(tokens.shape[1]):
        logits = model.language(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask)
        ).logits[:, -1]
        out.append(logits)
        embeds = torch.cat([embeds, model.language.get_input_embeddings()(tokens[:, i : i + 1])], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return out


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-5, relative to the logits' scale."""
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("name", list(DECODERS))
@torch.no_grad()
def test_fast_decode_equals_full_recompute_and_fallback_tokens(tokenizer, spy, monkeypatch, name):
    model, proc = build(tokenizer, *DECODERS[name])
    batch = left_padded_batch(proc)
    tokens = model.generate(**gen_kwargs(batch, proc))
    assert tokens.shape == (3, NEW_TOKENS)
    assert spy["fast"] == NEW_TOKENS - 1, "every step after the prefill takes the fast path"
    assert len(set(tokens.flatten().tolist())) > 3, "a degenerate sequence would prove little"
    for ours, ref in zip(spy["logits"], full_recompute_logits(model, batch, tokens), strict=True):
        assert_logits_close(ours, ref)

    fallback(monkeypatch)
    assert torch.equal(model.generate(**gen_kwargs(batch, proc)), tokens)
    assert spy["fast"] == NEW_TOKENS - 1


@torch.no_grad()
def test_a_sliding_window_the_generation_fills_exactly_takes_the_fast_path(tokenizer, spy, monkeypatch):
    """Mistral with a window as long as the cache (prompt + new tokens): the window never drops anything, so the
    preallocated cache and the fast step are exact. A window one shorter keeps transformers' sliding cache
    (``kv_cache`` does not count on the last token never being fed back)."""
    model, proc = build(tokenizer, "mistral", {})
    batch = left_padded_batch(proc)
    length = batch["input_ids"].shape[1] + NEW_TOKENS
    model.language.config.sliding_window = length
    tokens = model.generate(**gen_kwargs(batch, proc))
    assert spy["fast"] == NEW_TOKENS - 1
    for ours, ref in zip(spy["logits"], full_recompute_logits(model, batch, tokens), strict=True):
        assert_logits_close(ours, ref)
    model.language.config.sliding_window = length - 1
    spy["fast"] = 0
    assert torch.equal(model.generate(**gen_kwargs(batch, proc)), tokens)
    assert spy["fast"] == 0


@torch.no_grad()
def test_fast_decode_reads_the_current_weights(tokenizer, spy, monkeypatch):
    """A weight update between two generations (a training step) is seen: nothing is cached across calls."""
    model, proc = build(tokenizer, "qwen2", {})
    batch = left_padded_batch(proc)
    before = model.generate(**gen_kwargs(batch, proc))
    for p in model.language.model.layers.parameters():
        p.add_(torch.randn_like(p))
    after = model.generate(**gen_kwargs(batch, proc))
    assert not torch.equal(before, after)
    fallback(monkeypatch)
    assert torch.equal(model.generate(**gen_kwargs(batch, proc)), after)


@torch.no_grad()
def test_one_token_prompt_prefills_with_the_decoder(tokenizer, spy, monkeypatch):
    model, proc = build(tokenizer, "llama", {})
    ids = torch.tensor([[50], [60]])
    tokens = model.generate(ids, max_new_tokens=4, pad_token_id=proc.pad_token_id)
    assert spy["fast"] == 3
    fallback(monkeypatch)
    assert torch.equal(model.generate(ids, max_new_tokens=4, pad_token_id=proc.pad_token_id), tokens)


@pytest.mark.parametrize(
    "model_type, extra, reason",
    [
        # A window the generation reaches: transformers' own sliding cache and mask.
        ("mistral", {"sliding_window": 8}, "cache not preallocated"),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
            "not preallocated",
        ),
        # Gemma-2: soft-capped attention and logits, another layer structure.
        ("gemma2", {"head_dim": 8, "query_pre_attn_scalar": 8}, "model_type 'gemma2'"),
    ],
)
@torch.no_grad()
def test_unsupported_decoders_fall_back(tokenizer, spy, monkeypatch, model_type, extra, reason):
    model, proc = build(tokenizer, model_type, extra)
    batch = left_padded_batch(proc)
    cache = generate_module.kv_cache(model.language, batch["input_ids"].shape[1] + NEW_TOKENS)
    assert reason in unsupported_reason(model.language, cache)
    tokens = model.generate(**gen_kwargs(batch, proc))
    assert spy["fast"] == 0
    assert torch.equal(model.generate(**gen_kwargs(batch, proc), use_cache=False), tokens)


def test_training_mode_hooks_adapters_and_half_precision_fall_back(tokenizer):
    model, _ = build(tokenizer, "llama", {})
    language = model.language
    cache = generate_module.kv_cache(language, 16)
    assert unsupported_reason(language, cache) is None
    language.train()
    assert "training" in unsupported_reason(language, cache)
    language.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in unsupported_reason(language, cache)
    handle = language.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert "hooks" in unsupported_reason(language, cache)
    handle.remove()
    attn = language.model.layers[0].self_attn
    attn.q_proj = torch.nn.Sequential(attn.q_proj)  # what an adapter wrapping the projection looks like
    assert "nn.Linear" in unsupported_reason(language, cache)
    attn.q_proj = attn.q_proj[0]
    language.to(torch.bfloat16)
    assert "fp32" in unsupported_reason(language, cache)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_f_linear_on_every_path(monkeypatch, rows, bias):
    """``fast_decode.linear`` (oneDNN where torch has it, ``W @ x.T`` otherwise) gives ``F.linear``'s products
    for fp32, non-contiguous rows included, and leaves other dtypes to the plain path."""
    import torch.nn.functional as F

    from vlmlab.inference import fast_decode

    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 64, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    x = torch.randn(rows, 2, 64, generator=g)[:, 1]  # a strided view, as a last-position slice is
    ref = F.linear(x, w, b)
    assert fast_decode._ONEDNN is not None  # this build has oneDNN: the bench's path is the one tested
    torch.testing.assert_close(fast_decode.linear(w, b, x), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(fast_decode, "_ONEDNN", None)
    torch.testing.assert_close(fast_decode.linear(w, b, x), ref, rtol=1e-5, atol=1e-5)
    half = fast_decode.linear(w.bfloat16(), None if b is None else b.bfloat16(), x.bfloat16())
    assert half.dtype == torch.bfloat16 and half.shape == ref.shape
