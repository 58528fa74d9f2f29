"""BLIP-2 stage 1 (Li et al. 2023, §3.2): the Q-Former learns to read a frozen image tower with three objectives
that share its weights and differ only in the self-attention mask over ``[queries (Q); text (T)]``
(SYSTEMS.md §2; reference: salesforce/LAVIS ``lavis/models/blip2_models/blip2_qformer.py``, ``Qformer.py``):

- **ITC** (unimodal mask): queries and text in separate passes; s(I, T) = max over queries of the cosine of the
  projected query and the projected text [CLS], over a learned temperature; in-batch negatives, CE with
  label smoothing 0.1, both directions.
- **ITM** (bidirectional mask): ``itm_head`` on each query output, logits averaged over queries; batch =
  [positives, (negative image, text), (image, negative text)], negatives drawn from the ITC similarities with the
  diagonal set to -10000 before the softmax.
- **ITG** (multimodal causal mask): the caption, its first token replaced by [DEC], attends to every query and to
  earlier text; the queries' keys/values are reused from the ITC pass, so the queries never see the text.

``qformer_stage1(model, batch)`` is registered as the ``qformer_stage1`` objective. Captions are each sample's
supervised label tokens (the assistant reply), in the Q-Former's text vocabulary (the tiny presets give the
Q-Former the LM's tokenizer plus two ids, [CLS] and [DEC]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmlab.errors import ConfigError, SampleError

IGNORE_INDEX = -100
LABEL_SMOOTHING = 0.1  # LAVIS: ITC and ITG cross-entropies both use label_smoothing=0.1
# LAVIS fills the similarity diagonal with -10000 before the softmax that samples hard negatives.
NEG_DIAGONAL = -10000.0
TEMP_RANGE = (0.001, 0.5)


@dataclass
class Stage1Output:
    loss: torch.Tensor
    terms: dict[str, float]


def stage1_masks(n_query: int, n_text: int) -> dict[str, torch.Tensor]:
    """The three self-attention masks ``[(Q+T), (Q+T)]`` (True = row may attend to column).

    itc: queries see queries, text sees text; itm: everything; itg: queries see queries, text row t sees every
    query and text 0..t."""
    L = n_query + n_text
    is_q = torch.arange(L) < n_query
    itc = is_q[:, None] == is_q[None, :]
    itm = torch.ones(L, L, dtype=torch.bool)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    itg = torch.where(is_q[:, None], is_q[None, :], is_q[None, :] | causal)
    return {"itc": itc, "itm": itm, "itg": itg}


def hard_negatives(sim: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row ``i`` of ``sim`` ``[B, B]``, a column ``j != i`` drawn with probability softmax(sim[i])
    (diagonal set to -10000 first, as LAVIS does)."""
    with torch.no_grad():
        w = sim.detach().float().clone()
        w.fill_diagonal_(NEG_DIAGONAL)
        return torch.multinomial(w.softmax(1), 1, generator=generator).squeeze(1)


def caption_tokens(labels: torch.Tensor, max_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's supervised label tokens (``!= -100``), cut to ``max_len``, right-padded: ids and mask ``[B, T]``."""
    rows = [r[r != IGNORE_INDEX][:max_len] for r in labels]
    if any(len(r) == 0 for r in rows):
        raise SampleError("qformer_stage1: a sample has no supervised tokens (its caption)")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long, device=labels.device)
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=labels.device)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, True
    return ids, mask


def _with_first(token_id: int, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    first = torch.full_like(ids[:, :1], token_id)
    return torch.cat([first, ids], 1), torch.cat([torch.ones_like(mask[:, :1]), mask], 1)


def qformer_stage1(model, batch: dict, generator: torch.Generator | None = None) -> Stage1Output:
    """ITC + ITM + ITG (unit weights) of ``model.connector`` (a Q-Former with stage-1 heads) on a caption batch
    (one image per sample)."""
    conn = model.connector
    heads = getattr(conn, "heads", None)
    if heads is None:
        raise ConfigError("qformer_stage1 needs the qformer connector with stage1_heads=True")
    pixels = batch.get("pixel_values")
    B = batch["labels"].shape[0]
    if pixels is None or pixels.dim() != 4 or pixels.shape[0] != B:
        raise SampleError(
            f"qformer_stage1: one image per sample needed, got pixel_values "
            f"{None if pixels is None else list(pixels.shape)} for {B} samples"
        )
    if B < 2:
        raise SampleError("qformer_stage1: in-batch negatives need a batch of at least 2 samples")
    image = model.vision(pixels)  # [B, N_vis, D_vis]
    qf, Q = conn.qformer, conn.num_queries
    ids, mask = caption_tokens(batch["labels"], conn.max_text_len, conn.pad_token_id)

    # ITC: queries alone (their K/V kept for ITG), text alone.
    queries = conn.query_tokens.expand(B, -1, -1)
    q_out, q_kv = qf(queries, None, image)  # [B, Q, D]
    cls_ids, cls_mask = _with_first(conn.cls_token_id, ids, mask)
    t_out, _ = qf(None, cls_ids, None, cls_mask[:, None])  # [B, 1 + T, D]
    img_feat = F.normalize(heads.vision_proj(q_out), dim=-1)  # [B, Q, E]
    txt_feat = F.normalize(heads.text_proj(t_out[:, 0]), dim=-1)  # [B, E]
    with torch.no_grad():
        heads.temp.clamp_(*TEMP_RANGE)
    sim = torch.einsum("iqe,je->ijq", img_feat, txt_feat).amax(-1) / heads.temp  # [B_img, B_txt]
    target = torch.arange(B, device=sim.device)
    loss_itc = (
        F.cross_entropy(sim, target, label_smoothing=LABEL_SMOOTHING)
        + F.cross_entropy(sim.t(), target, label_smoothing=LABEL_SMOOTHING)
    ) / 2

    # ITM: [queries; text] bidirectional, on positives and one hard negative of each kind.
    neg_image = hard_negatives(sim.t(), generator)  # an image for each text
    neg_text = hard_negatives(sim, generator)  # a text for each image
    images = torch.cat([image, image[neg_image], image])
    texts = torch.cat([cls_ids, cls_ids, cls_ids[neg_text]])
    text_mask = torch.cat([cls_mask, cls_mask, cls_mask[neg_text]])
    keys = torch.cat([torch.ones(3 * B, Q, dtype=torch.bool, device=mask.device), text_mask], 1)
    h, _ = qf(conn.query_tokens.expand(3 * B, -1, -1), texts, images, keys[:, None])
    itm_logits = heads.itm_head(h[:, :Q]).mean(1)  # [3B, 2]
    itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(itm_logits.device)
    loss_itm = F.cross_entropy(itm_logits, itm_labels)

    # ITG: [DEC] + caption, every query visible (the ITC pass's K/V), causal over the text.
    dec_ids, dec_mask = _with_first(conn.dec_token_id, ids, mask)
    T1 = dec_ids.shape[1]
    causal = torch.ones(T1, T1, dtype=torch.bool, device=mask.device).tril()
    text_keys = causal[None] & dec_mask[:, None, :]  # [B, T1, T1]
    itg_mask = torch.cat([torch.ones(B, T1, Q, dtype=torch.bool, device=mask.device), text_keys], 2)
    g, _ = qf(None, dec_ids, None, itg_mask, past=q_kv)  # [B, T1, D]
    logits = heads.itg_decoder(heads.itg_transform(g[:, :-1]))  # predicts caption token t from [DEC] .. t-1
    targets = ids.masked_fill(~mask, IGNORE_INDEX)
    loss_itg = F.cross_entropy(
        logits.flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=LABEL_SMOOTHING,
    )

    loss = loss_itc + loss_itm + loss_itg
    terms = {k: float(v.detach()) for k, v in (("itc", loss_itc), ("itm", loss_itm), ("itg", loss_itg))}
    return Stage1Output(loss=loss, terms=terms)
