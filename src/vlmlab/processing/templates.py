"""Conversation templates as HF chat templates (jinja), by name: what a preset's tokenizer renders with.

Each renders prefix-stably (rendering the first k messages with the generation prompt is a prefix of rendering
k + 1), which is all ``chat.render_with_spans`` needs to find the supervised reply spans.
"""

from vlmlab.registry import Registry

CHAT_TEMPLATES = Registry("chat template")

# The embedded default: ChatML-like and newline-free; each turn ends with <|end|>, the EOS (part of the loss).
CHAT_TEMPLATES["tiny"] = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# LLaVA-1.5's ``conv_vicuna_v1`` (SeparatorStyle.TWO, sep " ", sep2 = EOS), SYSTEMS.md §4:
# "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..." and "... ASSISTANT:" as the generation prompt.
LLAVA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_TEMPLATES["llava-v1"] = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '" + LLAVA_V1_SYSTEM.replace("'", "\\'") + "' %}"
    "{% set turns = messages %}{% endif %}"
    "{{ system + ' ' }}"
    "{% for m in turns %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# LLaVA-1.5's response-format prompts (appended to short-answer and multiple-choice questions).
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
