"""One question (with images) in, one answer out: what ``vlmlab chat`` and evaluation call."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from vlmlab.inference.image_prompt import ImageGenerator, handle_image_prompt
from vlmlab.processing.processor import model_device, to_device, visual_inputs


def answer(
    model,
    processor,
    question: str,
    images: Sequence[str | os.PathLike | bytes] = (),
    *,
    videos: Sequence = (),
    history: Sequence[dict] = (),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    image_generator: ImageGenerator | None = None,
) -> str:
    """Answer ``question``; images (videos) missing a placeholder in the question are placed before it (LLaVA
    style). A video is a file path, or its frames (PIL images or a ``[F, H, W, 3]`` array).

    An image-generation prompt in the answer (``<h>...</h>``, Mini-Gemini) is taken out of the returned text and
    handed to ``image_generator`` (``inference/image_prompt.py``; None: dropped)."""
    video_placeholder = processor.config.video.token if processor.config.video else "<video>"
    for placeholder, items in ((processor.config.image_token, images), (video_placeholder, videos)):
        missing = len(items) - question.count(placeholder)
        if missing > 0:
            question = placeholder * missing + "\n" + question
    messages = [*history, {"role": "user", "content": question}]
    batch = to_device(processor([messages], [list(images)], videos=[list(videos)]), model_device(model))
    model.eval()
    new = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        **visual_inputs(batch),
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=processor.eos_token_ids,
        pad_token_id=processor.pad_token_id,
        stop=processor.stop_checker(stop),
        generator=torch.Generator().manual_seed(seed),
    )
    text = processor.decode(new[0].tolist())
    for s in stop:  # the answer ends before the stop string, as in the OpenAI API
        if s in text:
            text = text[: text.index(s)]
    return handle_image_prompt(text.strip(), image_generator)[0]
