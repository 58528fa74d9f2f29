"""``tiny``: the embedded default. A from-scratch ConvNet tower, a 2-layer MLP connector and a small Llama with
a BPE tokenizer trained on the embedded world's text; trains on a 2-core CPU in minutes (``vlmlab demo``).

Why the recipe is what it is (measured on the embedded world; see docs/demo.md):
- the ConvNet tower (not a ViT) gives locality for free, so shape is learnable within minutes;
- 16 pooled visual tokens (4 x 4) plus one global token keep sequences short (fast steps) while keeping the
  spatial layout that position, count and relation questions need;
- a caption stage first, then the whole mix with the tower at 1/10 of the LM's learning rate, then instruction
  tuning with the tower frozen: trained fast and throughout, the tower becomes colour-blind.
"""

from __future__ import annotations

from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
from vlmlab.presets.base import Preset
from vlmlab.processing.tokenizer import train_bpe_tokenizer
from vlmlab.training.stages import Stage

IMAGE_SIZE = 64
VOCAB_SIZE = 512
# The small Llama of the CPU presets (0.9 M parameters with the tied embedding).
TINY_LLAMA = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 1,
}


def world_tokenizer(
    chat_template: str = "tiny",
    extra_texts: tuple[str, ...] = (),
    extra_special_tokens: tuple[str, ...] = (),
    extra_tasks: tuple[str, ...] = (),
):
    """A BPE tokenizer trained on the embedded world's text (deterministic, no download); ``extra_texts`` (e.g.
    a template's system prompt) join the corpus so that they tokenize compactly too; ``extra_special_tokens``
    (e.g. ``<video>``) are added after the standard ones; ``extra_tasks`` (the opt-in world tasks) add their text."""
    from vlmlab.data.world.corpus import DEFAULT_CORPUS_TASKS, corpus

    texts = corpus(tasks=(*DEFAULT_CORPUS_TASKS, *extra_tasks)) + [t for t in extra_texts for _ in range(20)]
    return train_bpe_tokenizer(
        texts, vocab_size=VOCAB_SIZE, chat_template=chat_template, extra_special_tokens=extra_special_tokens
    )


def tiny() -> Preset:
    config = ModelConfig(
        vision=VisionConfig(
            name="convnet", image_size=IMAGE_SIZE, params={"channels": [32, 64, 128], "pool": 2}
        ),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(
            model_type="llama",
            params=dict(TINY_LLAMA),
        ),
        processor=ProcessorConfig(
            image_size=IMAGE_SIZE, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=128
        ),
        preset="tiny",
    )
    # The vision tower learns 10x slower than the rest, and is frozen for the instruct stage: trained at the
    # LM's rate it learns colour invariance (colour, shape, count and position questions all reward it) and the
    # colour answers fall to chance (docs/demo.md).
    lr = {"vision": 3e-4, "connector": 2e-3, "language": 2e-3}
    everything = ("vision", "connector", "language")
    recipe = [
        # Captions first: dense supervision (colour, shape, position, count words) that bootstraps the image path.
        Stage(
            name="align",
            train=everything,
            lr=lr,
            steps=300,
            tasks=("caption",),
            batch_size=32,
            warmup_steps=30,
        ),
        # Vision-language pretraining on the whole mix (captions + questions), the tower still learning.
        Stage(name="pretrain", train=everything, lr=lr, steps=900, batch_size=32, warmup_steps=30),
        # Instruction tuning with the tower frozen (LLaVA's stage 2): the LM learns to read what the tower keeps.
        Stage(
            name="instruct",
            train=("connector", "language"),
            lr={"connector": 2e-3, "language": 2e-3},
            steps=2200,
            batch_size=32,
            warmup_steps=50,
        ),
    ]
    return Preset(
        "tiny", config, world_tokenizer, recipe, description="from-scratch ConvNet + small Llama (CPU demo)"
    )
