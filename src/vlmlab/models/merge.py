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
    image_features: torch.Tensor,  # [N_img, N_tok, D]
    image_token_id: int,
) -> torch.Tensor:
    mask = input_ids == image_token_id  # [B, T]
    n_slots = int(mask.sum())
    n_rows = image_features.shape[0] * image_features.shape[1]
    if n_slots != n_rows:
        raise SampleError(
            f"image features and image tokens do not match: {n_slots} placeholder tokens in the text but "
            f"{n_rows} feature rows ({image_features.shape[0]} images x {image_features.shape[1]} tokens)"
        )
    rows = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
    # masked_scatter fills True positions in row-major order, i.e. image by image, token by token.
    return inputs_embeds.masked_scatter(mask.unsqueeze(-1), rows)
