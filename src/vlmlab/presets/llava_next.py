"""LLaVA-NeXT (1.6), LLaVA-NeXT-Video and LLaVA-NeXT-Interleave (SYSTEMS.md §11-13) at the papers' scale, and
their CPU-scale variants that train on the embedded world.

- ``llava-next``: LLaVA-1.5's parts plus AnyRes (base view + tiles of the best of five grid resolutions,
  padding unpadded from the features, a learned ``image_newline`` after every row); stage 2 also trains the tower.
- ``llava-next-video``: frames as images, 2D average pooling with stride 2 (before the projector, as transformers
  does; ``pool_position="after"`` is the LLaVA-NeXT repository's order), linear RoPE scaling for longer videos;
  its recipe ends with DPO on preference pairs (``vlmlab.training.dpo``, beta 0.1, lr 5e-7, every part).
- ``llava-next-interleave``: SigLIP-SO400M + Qwen1.5; multi-image, video frames and multi-view all as interleaved
  image lists; trained on a mix of the interleaved and in-the-front layouts. Like the hub's
  ``llava-interleave-qwen-*-hf`` checkpoints, it has no AnyRes and exports as ``llava``.

The real-scale presets take the decoder and tokenizer from a local directory (``language.pretrained``).
"""

from __future__ import annotations

import dataclasses

from vlmlab.config import (
    AnyResConfig,
    LanguageConfig,
    ModelConfig,
    ProcessorConfig,
    VideoConfig,
    VisionConfig,
)
from vlmlab.presets.base import Preset
from vlmlab.presets.llava import _pretrained_tokenizer, _real_scale
from vlmlab.training.stages import Stage

# The shipped LLaVA-1.6 configs' pinpoints, (height, width): 2x1, 1x2, 2x2, 3x1, 1x3 tiles of 336.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
EVERYTHING = ("vision", "connector", "newline", "language")

# google/siglip-so400m-patch14-384 as the interleave checkpoints ship it: its last layer removed, so layer -1
# is the original penultimate one; 27 x 27 = 729 tokens, no CLS.
SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "patch_size": 14,
}
QWEN1_5_7B = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def with_linear_rope(config: ModelConfig, factor: float) -> ModelConfig:
    """The decoder with linear RoPE scaling by ``factor`` (positions divided by it): LLaVA-NeXT-Video's length
    extrapolation, trained at 4096 tokens and run at ``factor`` x 4096."""
    params = dict(config.language.params)
    theta = params.get("rope_parameters", {}).get("rope_theta", params.get("rope_theta", 10000.0))
    params["rope_parameters"] = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    return dataclasses.replace(config, language=dataclasses.replace(config.language, params=params))


def _next_stages(
    align_steps: int, instruct_steps: int, batch: tuple[int, int], lr: dict, **common
) -> list[Stage]:
    """LLaVA-NeXT's recipe: align trains the projector alone; instruct trains everything, the tower 10x slower."""
    return [
        Stage(
            name="align",
            train=("connector",),
            lr={"connector": lr["align"]},
            steps=align_steps,
            batch_size=batch[0],
            **common,
        ),
        Stage(
            name="instruct",
            train=EVERYTHING,
            lr={p: lr[p] for p in EVERYTHING},
            steps=instruct_steps,
            batch_size=batch[1],
            **common,
        ),
    ]


def _dpo_stage(train: tuple[str, ...], lr: float, **settings) -> Stage:
    """LLaVA-NeXT-Video's DPO stage (``scripts/train/dpo.sh``, SYSTEMS.md §12): beta 0.1 (``--dpo_alpha 1.0
    --beta 0.1 --gamma 0``: the DPO term alone), one learning rate for every trained part. At real scale: 17k
    preference pairs, 3 epochs at 128 pairs per step = 399 steps, warmup 10%, lr 5e-7. (Its script also passes
    ``--freeze_mm_mlp_adapter True``; the survey and SYSTEMS.md read "all parts tunable", which is kept here.)"""
    return Stage(
        name="dpo",
        train=train,
        lr=dict.fromkeys(train, lr),
        objective="dpo",
        extra={"dpo": {"beta": 0.1, "dpo_weight": 1.0, "sft_weight": 0.0}},
        **settings,
    )


def _next_config(name: str) -> ModelConfig:
    config = _real_scale(name, image_size=336, connector="mlp2x_gelu", pad_to_square=False)
    processor = dataclasses.replace(
        config.processor, anyres=AnyResConfig(grid_pinpoints=NEXT_PINPOINTS), max_length=4096
    )
    return dataclasses.replace(config, processor=processor)


def llava_next() -> Preset:
    """LLaVA-NeXT-7B (Vicuna): CLIP-L/14-336, mlp2x_gelu, AnyRes over 5 pinpoints (up to 2880 tokens)."""
    config = _next_config("llava-next")
    # LCS-558K at batch 256, then 760K instructions at batch 128 (1 epoch each); tower lr 2e-6 (mm_vision_tower_lr).
    lr = {"align": 1e-3, "vision": 2e-6, "connector": 2e-5, "newline": 2e-5, "language": 2e-5}
    recipe = _next_stages(2180, 5938, (256, 128), lr)
    return Preset(
        "llava-next",
        config,
        _pretrained_tokenizer(config),
        recipe,
        description="LLaVA-NeXT (CLIP-L/14-336 + mlp2x_gelu + AnyRes)",
    )


def llava_next_video() -> Preset:
    """LLaVA-NeXT-Video-7B: LLaVA-NeXT plus 16 frames x 144 pooled tokens, RoPE scaled x2 (8192 tokens)."""
    config = _next_config("llava-next-video")
    video = VideoConfig(num_frames=16, max_frames=64, pool="average", stride=2, pool_position="before")
    config = dataclasses.replace(
        config, processor=dataclasses.replace(config.processor, video=video, max_length=8192)
    )
    config = with_linear_rope(config, 2.0)
    # Starts from LLaVA-NeXT-Image weights; video SFT trains everything, then DPO on preference pairs.
    recipe = [
        Stage(
            name="video-sft",
            train=EVERYTHING,
            lr={"vision": 2e-6, "connector": 2e-5, "newline": 2e-5, "language": 2e-5},
            steps=5000,
            batch_size=128,
            warmup_steps=150,
        ),
        _dpo_stage(
            EVERYTHING, lr=5e-7, steps=399, batch_size=128, warmup_steps=40, data=("sft_dpo_17k.jsonl",)
        ),
    ]
    return Preset(
        "llava-next-video",
        config,
        _pretrained_tokenizer(config, video=True),
        recipe,
        description="LLaVA-NeXT-Video (frames pooled 2x2, linear RoPE x2)",
    )


def llava_next_interleave() -> Preset:
    """LLaVA-NeXT-Interleave-7B: SigLIP-SO400M/14-384 (729 tokens per image), mlp2x_gelu, Qwen1.5-7B; videos are
    image lists of 16 frames; full fine-tune on M4-Instruct (~1.18M) mixing both prompt layouts."""
    config = ModelConfig(
        vision=VisionConfig(
            name="siglip", image_size=384, select_layer=-1, select_feature="patch", params=dict(SIGLIP_SO400M)
        ),
        language=LanguageConfig(model_type="qwen2", params=dict(QWEN1_5_7B)),
        processor=ProcessorConfig(
            image_size=384,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            resize="squash",
            max_length=32768,
            video=VideoConfig(num_frames=16, as_images=True),
        ),
        preset="llava-next-interleave",
    )
    recipe = [
        Stage(
            name="interleave-sft",
            train=EVERYTHING,
            lr={p: 1e-5 for p in EVERYTHING} | {"vision": 2e-6},
            steps=9219,
            batch_size=128,
            warmup_steps=277,
            front_layout=0.5,
        )
    ]
    return Preset(
        "llava-next-interleave",
        config,
        _pretrained_tokenizer(config, video=False, template=None),
        recipe,
        description="LLaVA-NeXT-Interleave (SigLIP-SO400M + Qwen1.5, interleaved image lists)",
    )


# -- CPU scale: the same structures on the embedded world ----------------------------------------------------
TINY_VIEW = 32  # pixels per view of llava-next-tiny (tile and base view)


def _tiny_config(
    name: str,
    *,
    view: int,
    pool: int,
    anyres: bool,
    video: VideoConfig | None = None,
    channels: tuple[int, ...] = (32, 64, 128),
) -> ModelConfig:
    """The ``tiny`` preset's ConvNet tower (it learns shapes within CPU minutes; a from-scratch ViT does not) at
    ``view`` pixels per view, ``mlp2x_gelu``, the small Llama; AnyRes over the NeXT pinpoints scaled to ``view``."""
    from vlmlab.presets.tiny import TINY_LLAMA

    pinpoints = [[p[0] * view // 336, p[1] * view // 336] for p in NEXT_PINPOINTS]
    return ModelConfig(
        vision=VisionConfig(
            name="convnet", image_size=view, params={"channels": list(channels), "pool": pool}
        ),
        language=LanguageConfig(model_type="llama", params=dict(TINY_LLAMA)),
        processor=ProcessorConfig(
            image_size=view,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            pad_to_square=not anyres,
            max_length=256,
            anyres=AnyResConfig(grid_pinpoints=pinpoints) if anyres else None,
            video=video,
        ),
        preset=name,
    )


def _tiny_recipe(tasks: tuple[str, ...] | None, steps: int, front_layout: float = 0.0) -> list[Stage]:
    """From scratch, as ``tiny``: captions first with every part training (the tower 10x slower), then the
    tasks with the tower frozen."""
    lr = {"vision": 3e-4, "connector": 2e-3, "newline": 2e-3, "language": 2e-3}
    return [
        Stage(
            name="align",
            train=EVERYTHING,
            lr=lr,
            steps=300,
            tasks=("caption",),
            batch_size=32,
            warmup_steps=30,
        ),
        Stage(
            name="instruct",
            train=EVERYTHING,
            lr=lr,
            steps=steps,
            tasks=tasks,
            batch_size=32,
            warmup_steps=30,
            front_layout=front_layout,
        ),
    ]


def _tiny_tokenizer(*extra: str):
    from vlmlab.data.world import EXTRA_TASKS
    from vlmlab.presets.tiny import world_tokenizer

    return lambda: world_tokenizer(extra_special_tokens=extra, extra_tasks=EXTRA_TASKS)


def llava_next_tiny() -> Preset:
    """LLaVA-NeXT at CPU scale: 32-px views (16 tokens each), AnyRes up to 2 x 2 tiles (64 px), newline, unpad."""
    config = _tiny_config("llava-next-tiny", view=TINY_VIEW, pool=1, anyres=True)
    return Preset(
        "llava-next-tiny",
        config,
        _tiny_tokenizer(),
        _tiny_recipe(None, 1500),
        description="LLaVA-NeXT structure at CPU scale (AnyRes over 32-px tiles)",
    )


def llava_next_video_tiny() -> Preset:
    """LLaVA-NeXT-Video at CPU scale: 8 frames of 64 px, 8 x 8 tokens pooled to 4 x 4 (stride 2) per frame; a
    narrower tower than the image presets' (a batch is 256 frames). Images are one padded view: AnyRes over
    64 tokens per tile would overflow the small Llama's 256 positions."""
    video = VideoConfig(num_frames=8, max_frames=32, pool="average", stride=2, pool_position="before")
    config = _tiny_config(
        "llava-next-video-tiny", view=64, pool=1, anyres=False, video=video, channels=(16, 32, 64)
    )
    # Then a short DPO stage on the world's preference pairs (vlmlab.data.world.preferences.write_preferences
    # writes preferences-train.json into the world folder): beta 0.1 as at real scale; the learning rate is the
    # tiny recipe's scale (5e-7 would not move a model this small in 100 steps).
    dpo = _dpo_stage(EVERYTHING, lr=1e-4, steps=100, batch_size=16, data=("preferences-train.json",))
    return Preset(
        "llava-next-video-tiny",
        config,
        _tiny_tokenizer("<video>"),
        [*_tiny_recipe(("video",), 1200), dpo],
        description="LLaVA-NeXT-Video structure at CPU scale (frames pooled 2 x 2)",
    )


def llava_next_interleave_tiny() -> Preset:
    """LLaVA-NeXT-Interleave at CPU scale: 64-px images of 16 tokens, multi-image prompts, videos as image lists,
    half of the multi-image samples in the in-the-front layout."""
    config = _tiny_config(
        "llava-next-interleave-tiny",
        view=64,
        pool=2,
        anyres=False,
        video=VideoConfig(num_frames=4, as_images=True),
    )
    return Preset(
        "llava-next-interleave-tiny",
        config,
        _tiny_tokenizer("<video>"),
        _tiny_recipe(("multi",), 1200, front_layout=0.5),
        description="LLaVA-NeXT-Interleave structure at CPU scale (interleaved image lists)",
    )
