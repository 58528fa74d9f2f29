"""Q-Former (BLIP-2, Li et al. 2023; InstructBLIP, Dai et al. 2023; InternLM-XComposer's perceive sampler).

``[B, N_vis, D_vis] -> [B, Q, D_lm]``: ``Q`` learned queries (N(0, 0.02)) run through BERT-style layers whose
self-attention spans ``[queries; text]`` and whose cross-attention to the image tokens (every
``cross_attention_frequency`` layers, layer 0 first) applies to the query rows only; query rows use their own
FFN (``intermediate_query`` / ``output_query``), text rows the BERT FFN. ``proj`` maps the query outputs to the
LLM's width (SYSTEMS.md §2, §6). References: salesforce/LAVIS ``lavis/models/blip2_models/Qformer.py``;
transformers ``Blip2QFormerModel`` / ``InstructBlipQFormerModel``.

Parameter names follow transformers' Q-Former (``qformer.encoder.layer.{i}.attention.attention.query`` ...), so
both checkpoints map by prefix; a BERT checkpoint's encoder initialises it (``init_from_bert``; ``attention.self``
is renamed ``attention.attention``), the query FFN copied from the text FFN.

The text side (word/position embeddings, text FFN) and the stage-1 heads (ITC projections and temperature, ITM
head, ITG LM head) live here too, so BLIP-2's stage 1 (``training/qformer.py``) trains them; ``vocab_size=0``
builds the Q-Former without them (a transformers BLIP-2 checkpoint, which keeps only what stage 2 needs).
``instruction=True`` is InstructBLIP: the instruction tokens (``qformer_input_ids``) follow the queries inside
the Q-Former, and only the query rows go to the LLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from vlmlab.errors import CheckpointError, ConfigError, SampleError

# LAVIS ``init_Qformer``: query_tokens.data.normal_(mean=0.0, std=encoder_config.initializer_range).
QUERY_INIT_STD = 0.02
# BLIP-2's ITC temperature starts at 0.07 and is clamped to [0.001, 0.5] (``blip2_qformer.py``).
TEMP_INIT = 0.07


class QFormerAttention(nn.Module):
    """Multi-head attention + ``output`` (dense, residual, LayerNorm): BERT's ``BertAttention``."""

    def __init__(self, dim: int, heads: int, kv_dim: int, eps: float):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"qformer: hidden_size {dim} is not a multiple of num_heads {heads}")
        self.heads = heads
        self.attention = nn.Module()
        self.attention.query = nn.Linear(dim, dim)
        self.attention.key = nn.Linear(kv_dim, dim)
        self.attention.value = nn.Linear(kv_dim, dim)
        self.output = nn.Module()
        self.output.dense = nn.Linear(dim, dim)
        self.output.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, N, d]`` of ``x`` ``[B, N, D_kv]``."""
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        return split(self.attention.key(x)), split(self.attention.value(x))

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x`` ``[B, L, D]`` attends to ``k``/``v`` ``[B, H, S, d]``; ``mask`` bool ``[B, 1|L, S]`` (True = see)."""
        q = self.attention.query(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        m = None if mask is None else mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).flatten(2)
        return self.output.LayerNorm(self.output.dense(out) + x)


class FeedForward(nn.Module):
    """BERT's ``intermediate`` (dense + act) or ``output`` (dense, residual, LayerNorm) half."""

    def __init__(self, d_in: int, d_out: int, act: str | None, eps: float | None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.act = ACT2FN[act] if act else None
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps) if eps is not None else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dense(x)
        return self.act(x) if self.LayerNorm is None else self.LayerNorm(x + residual)


class QFormerLayer(nn.Module):
    def __init__(self, dim, heads, ffn, image_dim, act, eps, cross: bool, text: bool):
        super().__init__()
        self.attention = QFormerAttention(dim, heads, dim, eps)
        self.crossattention = QFormerAttention(dim, heads, image_dim, eps) if cross else None
        self.intermediate_query = FeedForward(dim, ffn, act, None)
        self.output_query = FeedForward(ffn, dim, None, eps)
        if text:
            self.intermediate = FeedForward(dim, ffn, act, None)
            self.output = FeedForward(ffn, dim, None, eps)

    def forward(
        self,
        h: torch.Tensor,
        n_query: int,
        mask: torch.Tensor | None,
        image: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``h`` ``[B, L, D]`` whose first ``n_query`` rows are queries; ``past``: keys/values of rows that came
        before (ITG reuses the queries'), which every row may see. Returns the new ``h`` and this layer's K/V."""
        k, v = self.attention.kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        a = self.attention(h, k, v, mask)
        parts = []
        if n_query:
            q = a[:, :n_query]
            if self.crossattention is not None:
                if image is None:
                    raise SampleError("qformer: query rows need the image features (cross-attention)")
                q = self.crossattention(q, *self.crossattention.kv(image), None)
            parts.append(self.output_query(self.intermediate_query(q), q))
        if a.shape[1] > n_query:
            t = a[:, n_query:]
            if not hasattr(self, "intermediate"):
                raise SampleError("qformer: this Q-Former has no text side (built with vocab_size=0)")
            parts.append(self.output(self.intermediate(t), t))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0], (k, v)


class QFormer(nn.Module):
    """BERT-style encoder over ``[queries; text]`` (``embeddings`` + ``encoder.layer``), transformers' names."""

    def __init__(
        self,
        image_dim: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        cross_attention_frequency: int,
        vocab_size: int,
        max_position_embeddings: int,
        hidden_act: str,
        layer_norm_eps: float,
    ):
        super().__init__()
        text = vocab_size > 0
        self.embeddings = nn.Module()
        if text:
            self.embeddings.word_embeddings = nn.Embedding(vocab_size, hidden_size)
            self.embeddings.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        # One LayerNorm over [queries; text] (LAVIS BertEmbeddings; transformers BLIP-2's ``qformer.layernorm``).
        self.embeddings.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            QFormerLayer(
                hidden_size,
                num_heads,
                intermediate_size,
                image_dim,
                hidden_act,
                layer_norm_eps,
                cross=i % cross_attention_frequency == 0,
                text=text,
            )
            for i in range(num_layers)
        )

    def embed(self, queries: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor:
        """LayerNorm([queries; word + position embeddings]); text positions start at 0 (also after a cache)."""
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            if not hasattr(self.embeddings, "word_embeddings"):
                raise SampleError("qformer: this Q-Former has no text side (built with vocab_size=0)")
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            emb = self.embeddings.word_embeddings(input_ids) + self.embeddings.position_embeddings(pos)
            parts.append(emb.to(parts[0].dtype) if parts else emb)
        return self.embeddings.layernorm(torch.cat(parts, 1))

    def forward(
        self,
        queries: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        image: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        past: list | None = None,
    ) -> tuple[torch.Tensor, list]:
        """Hidden states ``[B, Q + T, D]`` and the per-layer K/V. ``mask``: bool ``[B, L, S]`` (or ``[B, 1, S]``)
        over the rows and the (past +) current keys; ``None`` = every row sees every row."""
        h = self.embed(queries, input_ids)
        n_query = 0 if queries is None else queries.shape[1]
        kvs = []
        for i, layer in enumerate(self.encoder.layer):
            h, kv = layer(h, n_query, mask, image, None if past is None else past[i])
            kvs.append(kv)
        return h, kvs


class QFormerConnector(nn.Module):
    """``[B, N_vis, D_vis] -> [B, Q, D_lm]``: learned queries -> Q-Former -> ``proj`` (BLIP-2 stage 2's view)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 32,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        vocab_size: int = 30523,
        max_position_embeddings: int = 512,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-12,
        instruction: bool = False,
        stage1_heads: bool = True,
        embed_dim: int = 256,
        cls_token_id: int = 101,
        dec_token_id: int = 30522,
        pad_token_id: int = 0,
        max_text_len: int = 32,
        init_from: str | None = None,
    ):
        """``vocab_size``: the Q-Former's text vocabulary (0: no text side). ``instruction``: InstructBLIP's
        instruction-aware queries. ``stage1_heads``: ITC/ITM/ITG heads (BLIP-2 stage 1). ``cls_token_id`` /
        ``dec_token_id``: the ids written first for ITC/ITM ([CLS]) and ITG ([DEC]); ``max_text_len``: captions
        are cut to this many tokens in stage 1. ``init_from``: a local BERT directory whose encoder initialises
        the Q-Former (its sizes must match)."""
        super().__init__()
        if cross_attention_frequency < 1 or num_queries < 1:
            raise ConfigError("qformer: num_queries and cross_attention_frequency must be >= 1")
        if (instruction or stage1_heads) and vocab_size <= 0:
            raise ConfigError(
                "qformer: instruction input and stage-1 heads need a text side (vocab_size > 0)"
            )
        self.num_queries = num_queries
        self.instruction = instruction
        self.cls_token_id, self.dec_token_id = cls_token_id, dec_token_id
        self.pad_token_id, self.max_text_len = pad_token_id, max_text_len
        self.extra_inputs = ("qformer_input_ids", "qformer_attention_mask") if instruction else ()
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden_size) * QUERY_INIT_STD)
        self.qformer = QFormer(
            in_dim,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size,
            cross_attention_frequency,
            vocab_size,
            max_position_embeddings,
            hidden_act,
            layer_norm_eps,
        )
        self.proj = nn.Linear(hidden_size, out_dim)
        if stage1_heads:
            self.heads = Stage1Heads(hidden_size, embed_dim, vocab_size, hidden_act, layer_norm_eps)
            # ITG's output layer shares the word embeddings (BERT's tied LM head).
            self.heads.itg_decoder.weight = self.qformer.embeddings.word_embeddings.weight
        else:
            self.heads = None
        self.apply(_init_bert)
        nn.init.normal_(self.query_tokens, std=QUERY_INIT_STD)
        self.copy_text_ffn_to_query()
        if init_from:
            init_from_bert(self.qformer, init_from)

    def num_tokens(self, n_vis: int) -> int:
        return self.num_queries

    def copy_text_ffn_to_query(self) -> None:
        """LAVIS ``init_Qformer``: every ``*_query`` weight starts as a copy of its text-FFN twin."""
        with torch.no_grad():
            for layer in self.qformer.encoder.layer:
                if hasattr(layer, "intermediate"):
                    layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
                    layer.output_query.load_state_dict(layer.output.state_dict())

    def query_outputs(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q-Former outputs of the query rows ``[B, Q, D_q]``; with ``input_ids`` (InstructBLIP's instruction),
        the queries and the text see each other (bidirectional, text padding masked)."""
        B = image.shape[0]
        queries = self.query_tokens.expand(B, -1, -1)
        mask = None
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[0] != B:
                raise SampleError(f"qformer_input_ids must be [N_img={B}, T], got {list(input_ids.shape)}")
            if attention_mask is not None:
                if attention_mask.shape != input_ids.shape:
                    raise SampleError(
                        f"qformer_attention_mask {list(attention_mask.shape)} does not match "
                        f"qformer_input_ids {list(input_ids.shape)}"
                    )
                keep = torch.ones(B, self.num_queries, dtype=torch.bool, device=image.device)
                mask = torch.cat([keep, attention_mask.bool()], 1)[:, None]  # [B, 1, Q + T]
        h, _ = self.qformer(queries, input_ids, image, mask)
        return h[:, : self.num_queries]

    def forward(
        self,
        x: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() != 3:
            raise SampleError(f"qformer: image features must be [B, N_vis, D_vis], got {list(x.shape)}")
        ids = qformer_input_ids if self.instruction else None
        return self.proj(self.query_outputs(x, ids, qformer_attention_mask))


class Stage1Heads(nn.Module):
    """BLIP-2 stage 1's heads: ITC projections + temperature, ITM head, ITG LM head (BERT ``cls.predictions``)."""

    def __init__(self, dim: int, embed_dim: int, vocab_size: int, act: str, eps: float):
        super().__init__()
        self.vision_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)
        self.temp = nn.Parameter(torch.tensor(TEMP_INIT))
        self.itm_head = nn.Linear(dim, 2)
        self.itg_transform = nn.Sequential(nn.Linear(dim, dim), ACT2FN[act], nn.LayerNorm(dim, eps=eps))
        self.itg_decoder = nn.Linear(dim, vocab_size)


def _init_bert(module: nn.Module) -> None:
    """BERT's init: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# BERT checkpoint names -> Q-Former names (transformers' BertModel; a ``bert.`` prefix is dropped first).
BERT_RENAMES = [
    (".attention.self.", ".attention.attention."),
    ("embeddings.LayerNorm.", "embeddings.layernorm."),
]
BERT_UNUSED = ("embeddings.token_type_embeddings.", "embeddings.position_ids", "pooler.")


def init_from_bert(qformer: QFormer, path: str) -> None:
    """Copy a local BERT checkpoint's embeddings and encoder layers into ``qformer`` (cross-attention stays random),
    then the text FFN into the query FFN. Sizes must match; a missing or mis-shaped tensor raises."""
    from vlmlab.interop.hf.convert import read_hf_tensors

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"qformer init_from: {directory} is not a BERT directory (no config.json)")
    if json.loads((directory / "config.json").read_text()).get("model_type") != "bert":
        raise CheckpointError(f"qformer init_from: {directory} is not a BERT checkpoint")
    own = qformer.state_dict()
    state = {}
    for key, t in read_hf_tensors(directory).items():
        key = key.removeprefix("bert.")
        if key.startswith(BERT_UNUSED) or key.startswith("cls."):
            continue
        for a, b in BERT_RENAMES:
            key = key.replace(a, b)
        if key not in own:
            raise CheckpointError(f"qformer init_from {directory}: no Q-Former tensor for {key!r}")
        if t.shape != own[key].shape:
            raise CheckpointError(
                f"qformer init_from {directory}: {key} is {tuple(t.shape)}, the Q-Former's {tuple(own[key].shape)}"
            )
        state[key] = t
    missing = [k for k in own if "crossattention" not in k and "_query" not in k and k not in state]
    if missing:
        raise CheckpointError(
            f"qformer init_from {directory}: {len(missing)} tensor(s) missing, e.g. {missing[0]}"
        )
    qformer.load_state_dict(state, strict=False)
    with torch.no_grad():
        for layer in qformer.encoder.layer:
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())


def qformer(in_dim: int, out_dim: int, **params) -> QFormerConnector:
    """BLIP-2's Q-Former (registry builder)."""
    return QFormerConnector(in_dim, out_dim, **params)
