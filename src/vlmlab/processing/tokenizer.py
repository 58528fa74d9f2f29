"""A byte-level BPE tokenizer trained on local text, with a chat template: the ``tiny`` preset's tokenizer.

Nothing is downloaded: ``tokenizers`` trains it in well under a second on the embedded world's text, and it is
wrapped in transformers' ``PreTrainedTokenizerFast`` so it saves, loads and renders chat templates like any hub
tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmlab.processing.templates import CHAT_TEMPLATES

PAD, EOS = "<pad>", "<|end|>"
SPECIAL_TOKENS = [PAD, EOS, "<|system|>", "<|user|>", "<|assistant|>", "<image>"]


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    chat_template: str = "tiny",
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """``extra_special_tokens`` (e.g. ``<video>``) get the ids after the standard ones."""
    specials = [*SPECIAL_TOKENS, *extra_special_tokens]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=specials[2:],
    )
    fast.chat_template = CHAT_TEMPLATES[chat_template]
    return fast
