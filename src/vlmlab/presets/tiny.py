"""``tiny``: the embedded default. A from-scratch ConvNet tower, a 2-layer MLP connector and a small Llama with
a BPE tokenizer trained on the embedded world's text; trains on a 2-core CPU in minutes (``vlmlab demo``).

Why the recipe is what it is (measured on the embedded world; see docs/demo.md):
- the ConvNet tower (not a ViT) gives locality for free, so shape is learnable within minutes;
- 16 pooled visual tokens keep sequences short (fast steps) while keeping a 4 x 4 spatial layout for
  position and relation questions;
- everything trains from the first step on captions mixed with questions, with the vision tower at a higher
  learning rate than the LM, so the image pays off before the LM settles on answer priors.
"""

from __future__ import annotations

from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
from vlmlab.presets.base import Preset
from vlmlab.processing.tokenizer import train_bpe_tokenizer
from vlmlab.training.stages import Stage

IMAGE_SIZE = 64
VOCAB_SIZE = 512


def _tokenizer():
    from vlmlab.data.world.corpus import corpus

    return train_bpe_tokenizer(corpus(), vocab_size=VOCAB_SIZE)


def tiny() -> Preset:
    config = ModelConfig(
        vision=VisionConfig(
            name="convnet", image_size=IMAGE_SIZE, params={"channels": [32, 64, 128], "pool": 2}
        ),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(
            model_type="llama",
            params={
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
            },
        ),
        processor=ProcessorConfig(
            image_size=IMAGE_SIZE, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), max_length=128
        ),
        preset="tiny",
    )
    lr = {"vision": 3e-3, "connector": 2e-3, "language": 2e-3}
    recipe = [
        Stage(
            name="align",
            train=("vision", "connector", "language"),
            lr=lr,
            steps=300,
            tasks=("caption",),
            batch_size=32,
            warmup_steps=30,
        ),
        Stage(
            name="instruct",
            train=("vision", "connector", "language"),
            lr=lr,
            steps=900,
            batch_size=32,
            warmup_steps=50,
        ),
    ]
    return Preset(
        "tiny", config, _tokenizer, recipe, description="from-scratch ConvNet + small Llama (CPU demo)"
    )
