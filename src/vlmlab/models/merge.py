"""The one function that splices visual tokens into the placeholder positions of a token sequence.

[Contract] The processor expands each ``<image>`` into exactly ``num_image_tokens`` placeholder ids (and gives
them label -100); this function replaces those positions, in order, by the connector's output rows. The counts
must match exactly: a mismatch is a bug upstream (wrong template, truncation), never silently padded or cut.
"""

from __future__ import annotations

import torch

from vlmlab.errors import SampleError


def merge_image_features(
    inputs_embeds: torch.Tensor,  # [B, T, D]
    input_ids: torch.Tensor,  # [B, T]
    image_features: torch.Tensor,  # [N_img, N_tok, D], or [N_rows, D] when images differ in token count
    image_token_id: int,
    what: str = "image",
) -> torch.Tensor:
    mask = input_ids == image_token_id  # [B, T]
    n_slots = int(mask.sum())
    rows = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
    if n_slots != rows.shape[0]:
        shape = " x ".join(map(str, image_features.shape[:-1]))
        raise SampleError(
            f"{what} features and {what} tokens do not match: {n_slots} placeholder tokens in the text but "
            f"{rows.shape[0]} feature rows ({shape})"
        )
    # masked_scatter fills True positions in row-major order, i.e. image by image, token by token.
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), rows)
