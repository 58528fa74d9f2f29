"""Conversation templates against their reference formats: LLaVA's ``conv_vicuna_v1`` (haotian-liu/LLaVA
``conversation.py``, SeparatorStyle.TWO) renders "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." and only the
replies plus their end token are supervised."""

from conftest import TEXTS
from vlmlab.processing.processor import IGNORE_INDEX
from vlmlab.processing.templates import LLAVA_V1_SYSTEM
from vlmlab.processing.tokenizer import train_bpe_tokenizer

CONV = [
    {"role": "user", "content": "<image>\nWhat color is the shape?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "What shape is this?"},
    {"role": "assistant", "content": "circle"},
]


def v1_reference(system, turns, eos, generation_prompt=False):
    """conv_vicuna_v1.get_prompt(): system + sep, then "ROLE: message" + (sep, sep2) alternately."""
    seps = [" ", eos]
    out = system + seps[0]
    for i, (role, message) in enumerate(turns):
        out += f"{role}: {message}{seps[i % 2]}"
    return out + ("ASSISTANT:" if generation_prompt else "")


def test_llava_v1_renders_like_the_reference():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=320, chat_template="llava-v1")
    turns = [("USER" if m["role"] == "user" else "ASSISTANT", m["content"]) for m in CONV]
    assert tok.apply_chat_template(CONV, tokenize=False) == v1_reference(
        LLAVA_V1_SYSTEM, turns, tok.eos_token
    )
    prompt = tok.apply_chat_template(CONV[:3], tokenize=False, add_generation_prompt=True)
    assert prompt == v1_reference(LLAVA_V1_SYSTEM, turns[:3], tok.eos_token, generation_prompt=True)
    custom = [{"role": "system", "content": "Be brief."}, *CONV[:2]]
    assert tok.apply_chat_template(custom, tokenize=False) == v1_reference(
        "Be brief.", turns[:2], tok.eos_token
    )


def test_llava_v1_supervises_only_the_replies():
    from conftest import make_model

    tok = train_bpe_tokenizer(TEXTS, vocab_size=320, chat_template="llava-v1")
    _, proc = make_model(tok, max_length=256)
    enc = proc.encode_text(CONV, 1, train=True)
    supervised = [
        t for t, lab in zip(enc["input_ids"].tolist(), enc["labels"].tolist()) if lab != IGNORE_INDEX
    ]
    assert tok.decode(supervised) == " red" + tok.eos_token + " circle" + tok.eos_token
