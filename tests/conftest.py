"""Shared fixtures: tiny random models and a BPE tokenizer, all built offline in milliseconds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig  # noqa: E402
from vlmlab.models.vlm import VisionLanguageModel  # noqa: E402
from vlmlab.processing.processor import Processor  # noqa: E402
from vlmlab.processing.tokenizer import train_bpe_tokenizer  # noqa: E402

TEXTS = [
    "What color is the shape? red green blue yellow purple orange",
    "What shape is this? circle square triangle star",
    "How many shapes are there? one two three four",
    "Where is the red circle relative to the blue square? left right above below",
    "a large red circle at the top left. two shapes: a red circle and a blue star.",
] * 20

LLAMA = {
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 1,
}


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=320)


def make_model(
    tokenizer,
    vision: VisionConfig | None = None,
    connector: str = "mlp2x_gelu",
    language: LanguageConfig | None = None,
    max_length: int = 96,
    seed: int = 0,
):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vision=vision or VisionConfig(name="convnet", image_size=32, params={"channels": [8, 16], "pool": 2}),
        connector=ConnectorConfig(name=connector),
        language=language or LanguageConfig(model_type="llama", params=dict(LLAMA)),
        processor=ProcessorConfig(image_size=32, max_length=max_length),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = VisionLanguageModel(cfg).eval()
    return model, Processor(tokenizer, cfg.processor, model.num_image_tokens)


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a second OpenMP thread stalls badly when the 2 cores are
    shared with other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def image_question_batch(proc):
    """A one-sample training batch: an image, a question and a one-word answer (supervised)."""
    from PIL import Image

    conversation = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "red"}]
    return proc.collate([proc.encode(conversation, [Image.new("RGB", (40, 30), "red")], train=True)])


def train_step_with_frozen_llm(model, proc) -> None:
    """Train the connector and the fusion part one backward pass with the LLM frozen (the deep-fusion papers'
    stage 1) and check that no gradient reaches the LLM."""
    from vlmlab.training.stages import Stage, apply_stage

    stage = Stage(name="s", train=("connector", "fusion"), lr={"connector": 1e-3, "fusion": 1e-3}, steps=1)
    apply_stage(model, stage)
    model.train()
    model(**image_question_batch(proc), supervised_logits_only=True).loss.backward()
    assert all(p.grad is None for p in model.part_parameters("language"))
