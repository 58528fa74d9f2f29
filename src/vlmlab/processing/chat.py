"""Conversation rendering with the tokenizer's own (HF) chat template, and the assistant spans that get loss.

Labels are found without any template-specific code: the text of assistant turn i is what rendering the first
i+1 messages adds to rendering the first i messages with the generation prompt. This works for any template
whose renders are prefix-stable (ChatML, Llama, the LLaVA v1 template ...) and raises otherwise.
"""

from __future__ import annotations

from vlmlab.errors import SampleError

ROLES = ("system", "user", "assistant")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_with_spans(
    tokenizer, messages: list[dict], add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans ``[start, end)`` of each assistant reply plus its end token."""
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise SampleError(f"message {i}: role {m.get('role')!r} is not one of {list(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise SampleError(f"message {i}: content must be a string")
    text = render(tokenizer, messages, add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise SampleError(
                "the chat template does not render conversations prefix-stably; cannot mask labels"
            )
        # Trailing whitespace after the end token (e.g. ChatML's "\n") belongs to the template, not the reply.
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans
