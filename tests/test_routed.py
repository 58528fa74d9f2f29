"""Modality-routed linear layers (CogVLM visual expert, XComposer2 PLoRA; SYSTEMS.md §0, §8, §14).

The oracle is the unwrapped tiny random decoder: text rows must match it exactly, image rows must match it at init.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from vlmlab.errors import ConfigError, SampleError
from vlmlab.models.fusion import ModalityRoutedLinear, apply_routing, remove_routing, routing

MODES = ("expert", "plora")
FAMILIES = ("llama", "qwen2")  # Qwen2 has q/k/v biases: the expert copies them too
T, IMG = 12, slice(3, 8)  # 12 tokens, image rows at positions 3..7


def tiny_decoder(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=None,
        pad_token_id=0,
    )
    config = LlamaConfig(**kw) if family == "llama" else Qwen2Config(**kw)
    return (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(config).eval()


def routed(base: torch.nn.Module, mode: str, **kw) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    model = copy.deepcopy(base)
    return model, apply_routing(model, mode, rank=4, alpha=8.0, **kw)


def perturb(params: list[torch.nn.Parameter]) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p))


def ids_and_mask(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 64, (batch, T), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(batch, T, dtype=torch.bool)
    mask[:, IMG] = True
    return ids, mask


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_text_only_is_the_base_exactly(mode, family):
    base = tiny_decoder(family)
    model, new = routed(base, mode)
    perturb(new)  # even trained image weights must not touch text rows
    ids, mask = ids_and_mask()
    ref = logits(base, ids)
    assert torch.equal(logits(model, ids), ref)  # outside any routing block
    with routing(model, torch.zeros_like(mask)):
        assert torch.equal(logits(model, ids), ref)
    with routing(model, None):
        assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_image_rows_at_init_equal_the_base(mode, family):
    base = tiny_decoder(family)
    model, _ = routed(base, mode)  # expert = copy of W (CogVLM copy_param); PLoRA B = 0
    ids, mask = ids_and_mask()
    with routing(model, mask):
        out = logits(model, ids)
    torch.testing.assert_close(out, logits(base, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_perturbed_weights_change_only_image_rows(mode):
    base = tiny_decoder("llama")
    model, new = routed(base, mode)
    perturb(new)
    ids, mask = ids_and_mask()
    seen = {}
    for name, m in (("base", base), ("routed", model)):
        q = m.model.layers[0].self_attn.q_proj
        q.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.detach()))
    with routing(model, mask):
        out = logits(model, ids)
    ref = logits(base, ids)
    # The first routed layer sees identical inputs: text rows are W x + b bit for bit, image rows are not.
    text = ~mask
    assert torch.equal(seen["routed"][text], seen["base"][text])
    assert not torch.allclose(seen["routed"][mask], seen["base"][mask])
    # By causality, every position before the first image row is the base model's; image positions change.
    assert torch.equal(out[:, : IMG.start], ref[:, : IMG.start])
    assert not torch.allclose(out[:, IMG], ref[:, IMG])


@pytest.mark.parametrize("mode", MODES)
def test_frozen_base_gets_no_gradient(mode):
    model, new = routed(tiny_decoder("qwen2"), mode)
    new_ids = {id(p) for p in new}
    for p in model.parameters():
        p.requires_grad_(id(p) in new_ids)
    ids, mask = ids_and_mask()
    with routing(model, mask):
        model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if id(p) in new_ids:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # PLoRA at init: B = 0, so only B gets a non-zero gradient; the expert's weights all do.
    moving = [p for p in new if p.grad.abs().sum() > 0]
    assert len(moving) == (len(new) if mode == "expert" else len(new) // 2)


@pytest.mark.parametrize("mode", MODES)
def test_base_state_dict_keys_are_kept_and_load(mode):
    base = tiny_decoder("qwen2")
    base_sd = base.state_dict()
    model, new = routed(tiny_decoder("qwen2", seed=5), mode)  # a different random base
    sd = model.state_dict()
    assert set(base_sd) <= set(sd)
    added = set(sd) - set(base_sd)
    suffixes = ("expert.weight", "expert.bias") if mode == "expert" else ("lora_A.weight", "lora_B.weight")
    assert added and all(k.endswith(suffixes) for k in added)
    assert len(added) == len(new)
    result = model.load_state_dict(base_sd, strict=False)
    assert set(result.missing_keys) == added and not result.unexpected_keys
    ids, mask = ids_and_mask()
    assert torch.equal(logits(model, ids), logits(base, ids))
    # Unwrapping gives back the plain decoder: the same keys, the same function, the same Parameters.
    q = model.model.layers[0].self_attn.q_proj
    remove_routing(model)
    plain_q = model.model.layers[0].self_attn.q_proj
    assert type(plain_q) is torch.nn.Linear and plain_q.weight is q.weight
    assert set(model.state_dict()) == set(base_sd)
    assert torch.equal(logits(model, ids), logits(base, ids))
    with pytest.raises(ConfigError, match="apply_routing"), routing(model, mask):
        pass


def greedy_uncached(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int
) -> torch.Tensor:
    with torch.no_grad(), routing(model, mask):  # generated positions lie past the mask: text rows
        for _ in range(steps):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_cached_generation_equals_uncached_recomputation(mode, family):
    model, new = routed(tiny_decoder(family), mode)
    perturb(new)  # make the image weights matter
    ids, mask = ids_and_mask()
    mask[:, 0] = True  # a decode step wrongly read at offset 0 would be routed as an image row
    steps = 6
    text_only = logits(model, ids)
    with torch.no_grad(), routing(model, mask):
        assert not torch.allclose(model(input_ids=ids).logits[:, -1], text_only[:, -1])
    with torch.no_grad(), routing(model, mask):
        cached = model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, use_cache=True)
    assert cached.shape == (ids.shape[0], T + steps)
    assert torch.equal(cached, greedy_uncached(model, ids, mask, steps))

    # A manual KV-cache loop: each forward sees only the new token, which is a text row.
    with torch.no_grad(), routing(model, mask) as state:
        out = model(input_ids=ids, use_cache=True)
        seq, cache = ids, out.cache if hasattr(out, "cache") else out.past_key_values
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            assert state.rows is None  # the new token is a text row
    assert torch.equal(seq, cached)

    # A mask that runs past the prompt routes those generated positions as image rows, cached or not.
    longer = torch.cat([mask, torch.ones(ids.shape[0], 2, dtype=torch.bool)], dim=1)
    with torch.no_grad(), routing(model, longer):
        cached = model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, use_cache=True)
    assert torch.equal(cached, greedy_uncached(model, ids, longer, steps))


def test_a_deep_copy_routes_with_its_own_mask():
    model, new = routed(tiny_decoder("llama"), "expert")
    perturb(new)
    twin = copy.deepcopy(model)  # e.g. a DPO reference model
    ids, mask = ids_and_mask()
    with routing(twin, mask):
        assert torch.equal(
            logits(model, ids), logits(tiny_decoder("llama"), ids)
        )  # the original stays text-only
        routed_twin = logits(twin, ids)
    with routing(model, mask):
        assert torch.equal(logits(model, ids), routed_twin)
    remove_routing(twin)
    assert torch.equal(logits(twin, ids), logits(tiny_decoder("llama"), ids))  # its hook went with it
    with routing(model, mask):  # and the original's did not
        assert torch.equal(logits(model, ids), routed_twin)


def test_bad_masks_and_double_wrapping_fail_loudly():
    model, _ = routed(tiny_decoder("llama"), "plora")
    ids, mask = ids_and_mask(batch=2)
    with pytest.raises(SampleError, match="batch"), routing(model, mask[:1]):
        model(input_ids=ids)
    with pytest.raises(SampleError, match="bool"), routing(model, mask.long()):
        pass
    with pytest.raises(ConfigError, match="already routed"):
        apply_routing(model, "expert")
    with pytest.raises(ConfigError, match="routing mode"):
        apply_routing(tiny_decoder("llama"), "lora")
    assert isinstance(model.model.layers[1].mlp.down_proj, ModalityRoutedLinear)
    assert not isinstance(model.lm_head, ModalityRoutedLinear)
