"""Deep fusion on a real pretrained decoder (SmolLM2-135M-Instruct, the nano preset's): text-only input gives the
base LLM's logits exactly for the visual expert and partial LoRA; a gated (Flamingo) model with gates at 0 gives
the base LLM's logits for any image; and after training the fusion weights with the LLM frozen, SmolLM2 answers
text questions exactly as before (its text ability is unchanged)."""

import dataclasses

import pytest
import torch
from PIL import Image

import vlmlab
from vlmlab.config import ConnectorConfig, FusionConfig
from vlmlab.presets import PRESETS
from vlmlab.presets.fusion import flamingo_cross
from vlmlab.training.stages import Stage, apply_stage

pytestmark = pytest.mark.nano
QUESTIONS = ("What is the capital of France?", "Name a primary colour.")


def build(fusion, connector=None):
    preset = PRESETS["nano"]()
    config = dataclasses.replace(preset.config, fusion=fusion, connector=connector or preset.config.connector)
    torch.manual_seed(0)
    model, proc = vlmlab.build(dataclasses.replace(preset, config=config))
    return model.eval(), proc


@pytest.fixture(scope="module")
def base():
    return build(None)


def answers(model, proc):
    batch = proc([[{"role": "user", "content": q}] for q in QUESTIONS])
    out = model.generate(**batch, max_new_tokens=10, eos_token_id=proc.eos_token_ids)
    return [proc.decode(row) for row in out]


def train_fusion(model, proc, steps=3):
    """A few optimizer steps on the connector and the fusion weights with the LLM frozen (the papers' stage 1)."""
    stage = Stage(
        name="s", train=("connector", "fusion"), lr={"connector": 1e-3, "fusion": 1e-3}, steps=steps
    )
    opt = torch.optim.AdamW(apply_stage(model, stage))
    conv = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Red."}]
    batch = proc.collate([proc.encode(conv, [Image.new("RGB", (224, 224), "red")], train=True)])
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("mode", ["expert", "plora"])
def test_routed_smollm2_keeps_its_text_logits_and_answers_after_training(base, mode):
    base_model, base_proc = base
    model, proc = build(FusionConfig(mode=mode, rank=8, alpha=8.0))
    batch = proc([[{"role": "user", "content": QUESTIONS[0]}]])
    with torch.no_grad():
        want = base_model(**batch).logits
        assert torch.equal(model(**batch).logits, want)
    train_fusion(model, proc)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)
    assert answers(model, proc) == answers(base_model, base_proc)
    # The image rows did change: the fusion weights learned.
    image = proc(
        [[{"role": "user", "content": "<image>\nWhat colour?"}]], [[Image.new("RGB", (224, 224), "red")]]
    )
    fresh, _ = build(FusionConfig(mode=mode, rank=8, alpha=8.0))  # the same seed: the untrained model
    with torch.no_grad():
        assert not torch.allclose(model(**image).logits, fresh(**image).logits, atol=1e-4)


def test_gated_smollm2_with_zero_gates_is_smollm2_for_any_image(base):
    base_model, base_proc = base
    perceiver = ConnectorConfig(
        name="perceiver", params={"n_latents": 8, "depth": 1, "heads": 4, "dim_head": 32}
    )
    model, proc = build(FusionConfig(mode=None, cross=flamingo_cross(every=10)), perceiver)
    assert sorted(int(k) for k in model.cross_attn) == [9, 19, 29]
    assert model.language.get_input_embeddings().num_embeddings == len(proc.tokenizer)  # <image> is embedded
    conv = [[{"role": "user", "content": "<image> What is the capital of France?"}]]
    batch = proc(conv, [[Image.new("RGB", (300, 200), "blue")]])
    with torch.no_grad():
        got = model(**batch).logits
        plain = model.language(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(got, plain)
        # The original vocabulary's logits are SmolLM2's: the added row changes nothing else.
        text = base_proc([[{"role": "user", "content": QUESTIONS[0]}]])
        vocab = base_model.language.config.vocab_size
        assert torch.equal(model.language(**text).logits[..., :vocab], base_model(**text).logits)
    train_fusion(model, proc)
    assert answers(model, proc) == answers(base_model, base_proc)
