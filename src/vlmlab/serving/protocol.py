"""The OpenAI Chat Completions protocol: request and response schemas, request parsing, and the conversion of a
request's messages into the processor's chat form.

``parse_request`` is the one gate a request body passes: the size check, JSON decoding, schema validation and the
``Limits`` checks that need no model, each failure an ``APIError`` (400, or 413 for the body) with a one-line
message and ``param`` in OpenAI's path form (``"messages[1].content[0].image_url.url"``), never pydantic's
multi-line report or FastAPI's 422 (RELIABILITY.md S1, S2). It follows the OpenAI API so the official client
works unchanged: unknown fields are ignored (clients send extras), ``developer`` is the newer name of
``system``, ``max_completion_tokens`` supersedes ``max_tokens``, and types are strict as OpenAI checks them
(``"2"`` is not a number, ``1.0`` not an integer).

``to_chat`` turns the validated messages into what ``Processor.encode_text`` takes: ``{"role", "content": str}``
dicts with one image placeholder where each image part stood, and the image URLs in the same order. Text that
contains the placeholder, or any other special token string of the tokenizer (``reserved_strings``), is refused
(400 ``placeholder_in_text``): the tokenizer would turn it into that token, so a typed ``<image>`` would claim an
image slot (S3) and a typed end-of-turn token would forge a turn.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from vlmlab.serving.errors import APIError, body_too_large, invalid_request, too_many_images
from vlmlab.serving.limits import Limits

INT64 = 2**63
DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults when a request leaves them out
DEFAULT_TOP_P = 1.0
# Below these the sampler's float32 arithmetic breaks (logits / temperature overflows; top_p rounds to 0 and
# the nucleus is empty), while the limits they approach are well defined: greedy decoding, the top token.
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6


# -- request -------------------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    """A ``data:image/...;base64,...`` URI, or an ``http(s)://`` URL when the server fetches remote images."""
    detail: Literal["auto", "low", "high"] | None = None
    """Accepted for compatibility; the processor decides the resolution."""


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "text_part", "image_url": "image_part"}.get(kind) if isinstance(kind, str) else None


def _string_or_array(value: Any) -> str | None:
    return "string" if isinstance(value, str) else "array" if isinstance(value, list) else None


# Callable discriminators keep each field's errors to one, with our wording, instead of one per union member.
# Their tags appear in error locations and are left out of ``param``, so they must not be field names.
_TAGS = frozenset({"string", "array", "text_part", "image_part"})
ContentPart = Annotated[
    Annotated[TextPart, Tag("text_part")] | Annotated[ImagePart, Tag("image_part")],
    Discriminator(
        _part_tag,
        custom_error_type="invalid_part_type",
        custom_error_message="must be a content part with type 'text' or 'image_url'",
    ),
]
Content = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[ContentPart], Field(min_length=1), Tag("array")],
    Discriminator(
        _string_or_array,
        custom_error_type="invalid_content",
        custom_error_message="must be a string or an array of content parts",
    ),
]
NonEmpty = Annotated[str, Field(min_length=1)]
Stop = Annotated[
    Annotated[NonEmpty, Tag("string")] | Annotated[list[NonEmpty], Tag("array")],
    Discriminator(
        _string_or_array,
        custom_error_type="invalid_stop",
        custom_error_message="must be a string or an array of strings",
    ),
]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    """``developer`` is treated as ``system``. Images are allowed in user messages only."""
    content: Content


class StreamOptions(_Request):
    include_usage: bool | None = None
    """Send a last chunk with ``usage`` and no choices before ``[DONE]``."""


class ChatRequest(_Request):
    """``POST /v1/chat/completions``. Fields left out (or null) take OpenAI's defaults; see ``sampling``."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """Supersedes ``max_tokens`` when both are given."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Stop | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    """Read only when ``stream`` is true (ignored otherwise, not refused)."""
    user: str | None = None

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        """Whether a streaming response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self, limits: Limits) -> Sampling:
        """The generation settings with the defaults filled in (a temperature under ``MIN_TEMPERATURE`` is
        greedy, a top_p under ``MIN_TOP_P`` is ``MIN_TOP_P``)."""
        max_tokens = self.max_completion_tokens or self.max_tokens or limits.default_max_tokens
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        top_p = DEFAULT_TOP_P if self.top_p is None else self.top_p
        return Sampling(
            max_tokens=max_tokens,
            temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
            top_p=max(top_p, MIN_TOP_P),
            seed=self.seed,
            stop=self.stop_sequences,
            n=self.n or 1,
        )


@dataclass(frozen=True)
class Sampling:
    """How to generate for one request (``ChatRequest.sampling``)."""

    max_tokens: int
    """Completion tokens per choice; the caller checks prompt + max_tokens against the context length."""
    temperature: float
    """0: greedy."""
    top_p: float
    seed: int | None
    """None: unseeded (a fresh random seed)."""
    stop: tuple[str, ...]
    """The completion ends before the first of these (not included in the text)."""
    n: int


# -- responses -----------------------------------------------------------------------------------------------
def completion_id() -> str:
    """A new completion id; the chunks of one stream share one."""
    return f"chatcmpl-{secrets.token_hex(12)}"


def _now() -> int:
    return int(time.time())


class GroundingBox(BaseModel):
    """A box the answer grounds (vlmlab extension): ``box`` is ``[x1, y1, x2, y2]`` in pixels of request image
    ``image`` (0-based, in request order); ``ref`` is the phrase it grounds, when the text gave one."""

    ref: str | None = None
    box: list[float] = Field(min_length=4, max_length=4)
    image: int = Field(ge=0)


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    boxes: list[GroundingBox] | None = None
    """Extension: the ``<box>`` tags of ``content`` in pixels (``vlmlab.processing.boxes.parse_boxes``); None when
    there are none or the model does not ground."""
    image_prompt: str | None = None
    """Extension: the image-generation prompt the answer wrote in ``<h>...</h>`` (Mini-Gemini), taken out of
    ``content`` (``vlmlab.inference.image_prompt``); None when there is none."""


class Choice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    """``stop``: EOS or a stop sequence; ``length``: ``max_tokens`` reached."""
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def count(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[Choice]
    usage: Usage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    """Set on a choice's first chunk only."""
    content: str | None = None
    boxes: list[GroundingBox] | None = None
    """Extension: set on a choice's last chunk, for the whole text."""
    image_prompt: str | None = None
    """Extension: set on a choice's last chunk, for the whole text (whose deltas kept the ``<h>`` block)."""


class ChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: Literal["stop", "length"] | None = None
    """Set on a choice's last chunk only."""
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    """Only on the last chunk (with no choices) when ``stream_options.include_usage`` is set."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "vlmlab"


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error (``APIError.body()``)."""

    error: ErrorDetail


class Health(BaseModel):
    """``GET /health``: liveness and load (sequences generating and waiting)."""

    status: Literal["ok"] = "ok"
    running: int
    queued: int


ERROR_DESCRIPTIONS = {
    400: "Invalid request (names the field in error.param)",
    401: "Missing or wrong API key",
    404: "Unknown model",
    413: "Request body too large",
    415: "Request body not sent as application/json",
    429: "Rate limited (see Retry-After)",
    500: "Internal error",
    503: "Server busy (see Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """For a FastAPI route's ``responses=``: the error statuses it answers, each with an ``ErrorResponse``."""
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


ERROR_RESPONSES = error_responses(*ERROR_DESCRIPTIONS)  # the chat route's: every one


SSE_DONE = "data: [DONE]\n\n"
# One event of a stream, as OpenAPI tools read a text/event-stream schema (and OpenAPI 3.2's itemSchema): its
# data is a ChatCompletionChunk, an ErrorResponse (a failure after the 200 was sent), or the last, "[DONE]".
SSE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/ChatCompletionChunk"},
                            {"$ref": "#/components/schemas/ErrorResponse"},
                        ]
                    },
                },
            ]
        }
    },
}


def sse_event(payload: BaseModel | dict) -> str:
    """One server-sent event carrying ``payload`` as JSON (a chunk, or an error body after the 200 was sent)."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


# -- parsing -------------------------------------------------------------------------------------------------
def parse_request(body: bytes | str, limits: Limits) -> ChatRequest:
    """Decode and validate a ``POST /v1/chat/completions`` body.

    Raises ``APIError``: 413 ``body_too_large`` over ``limits.max_body_bytes``; 400 for malformed JSON, a
    schema violation (``param`` names the field), ``n`` over ``max_n``, more than ``max_stop`` stop sequences,
    a first message from the assistant, an image outside a user message, or more than
    ``max_images_per_request`` image parts (before any image is fetched or decoded). The server should also
    refuse an oversized body before reading all of it (Content-Length and a capped read); this check is the
    last line."""
    size = len(body.encode() if isinstance(body, str) else body)
    if size > limits.max_body_bytes:
        raise body_too_large(size, limits.max_body_bytes)
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as err:
        raise _validation_error(err) from None
    _check_limits(request, limits)
    return request


def _check_limits(request: ChatRequest, limits: Limits) -> None:
    if request.n is not None and request.n > limits.max_n:
        raise invalid_request(
            f"n: {request.n} choices asked, over the limit of {limits.max_n}", "n", "too_many_choices"
        )
    if isinstance(request.stop, list) and len(request.stop) > limits.max_stop:
        raise invalid_request(
            f"stop: {len(request.stop)} stop sequences, over the limit of {limits.max_stop}",
            "stop",
            "too_many_stop_sequences",
        )
    if request.messages[0].role == "assistant":  # the encoder renders what precedes a reply: here, nothing
        raise invalid_request(
            "messages[0].role: the conversation must not start with an assistant message", "messages[0].role"
        )
    count = 0
    for i, message in enumerate(request.messages):
        if isinstance(message.content, str):
            continue
        for j, part in enumerate(message.content):
            if not isinstance(part, ImagePart):
                continue
            param = f"messages[{i}].content[{j}]"
            if message.role != "user":
                raise invalid_request(f"{param}: images are allowed in user messages only", param)
            count += 1
            if count > limits.max_images_per_request:
                raise too_many_images(param, limits.max_images_per_request)


# pydantic error types -> (what the value must be, OpenAI-style code)
_MUST_BE = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
    "finite_number": "a finite number",
}
_BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def _validation_error(err: ValidationError) -> APIError:
    """The first pydantic error as a one-line ``APIError`` naming the field by its path in the request."""
    e = err.errors(include_url=False)[0]
    kind, ctx = e["type"], e.get("ctx") or {}
    if kind == "json_invalid":
        detail = ctx.get("error")
        return invalid_request(
            "request body is not valid JSON" + (f" ({detail})" if detail else ""), code="invalid_json"
        )
    param = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in e["loc"] if key not in _TAGS)
    param = param.removeprefix(".") or None
    code = "invalid_value"
    if kind == "missing":
        problem, code = "is required", "missing_required_parameter"
    elif kind in _MUST_BE:
        problem, code = f"must be {_MUST_BE[kind]}", "invalid_type"
    elif kind == "literal_error":
        problem = f"must be {ctx['expected']}"
    elif kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        problem = f"must be {op} {ctx[key]}"
    elif kind in ("too_short", "string_too_short"):
        n = ctx.get("min_length", 1)
        problem = "must not be empty" if n == 1 else f"must have at least {n} items"
    elif kind == "too_long":
        problem = f"must have at most {ctx.get('max_length')} items"
    elif kind == "invalid_part_type" and isinstance(e["input"], dict):
        param, problem = f"{param}.type", "must be 'text' or 'image_url'"
    else:  # our custom errors, or a pydantic message (one line, without the input)
        problem = e["msg"].removeprefix("Value error, ")
    if param is None:
        return invalid_request(f"request body {problem}", None, code)
    return invalid_request(f"{param}: {problem}", param, code)


# -- conversion to the processor's chat form -----------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """One image of a request, in request order: its URL, the request field it came from (for error messages
    and ``param``) and its ``detail``."""

    url: str
    param: str
    detail: str | None = None


@dataclass
class Chat:
    """A request's conversation as ``Processor.encode_text`` / ``Processor.encode`` take it."""

    messages: list[dict] = field(default_factory=list)
    """``[{"role": "system"|"user"|"assistant", "content": str}]``; each image is one image placeholder."""
    images: list[ImageRef] = field(default_factory=list)
    """One per placeholder, in the order the placeholders appear (load with ``serving.images.load_images``)."""


def to_chat(request: ChatRequest, image_token: str = "<image>", reserved: Sequence[str] = ()) -> Chat:
    """The messages of a request (as ``parse_request`` returned it) in the processor's chat form.

    A string content is kept as it is; a list's parts are joined with newlines, each image part becoming
    ``image_token`` (``"<image>\\nWhat is this?"``, LLaVA's layout). ``developer`` becomes ``system``.
    Raises ``APIError`` 400 ``placeholder_in_text`` when any text holds ``image_token`` or a string of
    ``reserved`` (``reserved_strings(processor)``)."""
    forbidden = tuple(dict.fromkeys(s for s in (image_token, *reserved) if s))
    chat = Chat()
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            _check_text(message.content, f"messages[{i}].content", forbidden)
            chat.messages.append({"role": role, "content": message.content})
            continue
        pieces = []
        for j, part in enumerate(message.content):
            param = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                _check_text(part.text, f"{param}.text", forbidden)
                pieces.append(part.text)
            else:
                chat.images.append(
                    ImageRef(part.image_url.url, f"{param}.image_url.url", part.image_url.detail)
                )
                pieces.append(image_token)
        chat.messages.append({"role": role, "content": "\n".join(pieces)})
    return chat


def _check_text(text: str, param: str, forbidden: Sequence[str]) -> None:
    for s in forbidden:
        if s in text:
            raise invalid_request(
                f"{param}: contains the reserved string {s!r}; send images as image_url parts",
                param,
                "placeholder_in_text",
            )


def reserved_strings(processor) -> tuple[str, ...]:
    """The strings user text may not contain for ``processor``: its image (and video) placeholder and every
    special token of its tokenizer (BOS/EOS, padding, chat-turn markers, ...)."""
    config, tokenizer = processor.config, processor.tokenizer
    strings = [config.image_token]
    if config.video is not None:
        strings.append(config.video.token)
    strings += getattr(tokenizer, "all_special_tokens", ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings += [t.content for t in added.values() if getattr(t, "special", False)]
    return tuple(dict.fromkeys(s for s in strings if s))
