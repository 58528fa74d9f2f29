"""Tests of vlmlab.serving.protocol and errors: OpenAI-client payloads parse, our responses parse in the client,
every bad request is a 400/413 naming the field in one line (RELIABILITY.md S1, S2, S3, S11)."""

from __future__ import annotations

import importlib
import json
import re

import openai
import pytest

from vlmlab.config import ProcessorConfig, VideoConfig
from vlmlab.processing.processor import Processor
from vlmlab.processing.tokenizer import train_bpe_tokenizer
from vlmlab.serving import errors
from vlmlab.serving.errors import APIError
from vlmlab.serving.limits import Limits
from vlmlab.serving.protocol import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChunkChoice,
    ErrorResponse,
    GroundingBox,
    ImageRef,
    ModelList,
    Usage,
    completion_id,
    parse_request,
    reserved_strings,
    sse_event,
    to_chat,
)

LIMITS = Limits()
IMAGE = "data:image/png;base64,iVBORw0KGgo="  # never decoded here
# What an error body may never hold (S2): a traceback, a heap address, a server path, a library's name.
LEAKS = re.compile(r"Traceback|0x[0-9a-fA-F]{8,}|(/[\w.-]+){2,}|pydantic|File \"|\.py\b")


def user(content) -> dict:
    return {"role": "user", "content": content}


def body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [user("hi")], **fields}).encode()


def error_of(raw: bytes | str, limits: Limits = LIMITS) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(raw, limits)
    return assert_clean(info.value)


def assert_clean(err: APIError) -> APIError:
    ErrorResponse.model_validate(err.body())  # the documented error shape
    message = err.body()["error"]["message"]
    assert "\n" not in message and len(message) <= errors.MAX_MESSAGE
    assert not LEAKS.search(message), message
    if err.param is not None:
        assert message.startswith(f"{err.param}: "), message
    return err


# -- the official client, talking to a stub transport ----------------------------------------------------------
def _http_module():
    """The HTTP library the installed openai client is built on (httpx, or httpx2 in newer releases)."""
    base = next(c for c in openai.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    return importlib.import_module(base.__module__.split(".")[0])


def client_with(respond) -> tuple[openai.OpenAI, list[bytes]]:
    """An OpenAI client whose requests are recorded and answered by ``respond(body) -> (status, headers, text)``."""
    http = _http_module()
    sent: list[bytes] = []

    def handler(request):
        sent.append(request.content)
        status, headers, text = respond(request.content)
        return http.Response(status, headers=headers, content=text.encode())

    client = openai.OpenAI(
        api_key="k",
        base_url="http://vlmlab.test/v1",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(transport=http.MockTransport(handler)),
    )
    return client, sent


def answer(raw: bytes) -> tuple[int, dict, str]:
    request = parse_request(raw, LIMITS)
    completion = ChatCompletion(
        model=request.model,
        choices=[
            Choice(
                index=0,
                message=ChatCompletionMessage(
                    content="<box>(0,0),(500,500)</box>", boxes=[GroundingBox(box=[0, 0, 16, 16], image=0)]
                ),
                finish_reason="stop",
            )
        ],
        usage=Usage.count(12, 3),
    )
    return 200, {"content-type": "application/json"}, completion.model_dump_json()


def test_openai_client_payloads_parse_and_our_response_parses_in_the_client():
    client, sent = client_with(answer)
    out = client.chat.completions.create(
        model="vlmlab-tiny",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
                ],
            },
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "Where is it?"},
        ],
        max_completion_tokens=7,
        max_tokens=99,
        temperature=0.2,
        top_p=0.9,
        stop="\n\n",
        seed=3,
        n=2,
        user="u1",
        extra_body={"repetition_penalty": 1.1, "vendor": {"x": 1}},  # unknown fields are ignored
    )
    assert out.choices[0].message.content == "<box>(0,0),(500,500)</box>"
    assert out.choices[0].message.boxes == [{"ref": None, "box": [0.0, 0.0, 16.0, 16.0], "image": 0}]
    assert out.usage.total_tokens == 15 and out.id.startswith("chatcmpl-")

    request = parse_request(sent[0], LIMITS)
    sampling = request.sampling(LIMITS)
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed, sampling.n) == (
        7,
        0.2,
        0.9,
        3,
        2,
    )
    assert sampling.stop == ("\n\n",)
    chat = to_chat(request)
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?\n<image>"},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Where is it?"},
    ]
    assert chat.images == [ImageRef(IMAGE, "messages[1].content[1].image_url.url", "low")]


def test_openai_client_streams_our_chunks_and_usage():
    def stream(raw: bytes):
        request = parse_request(raw, LIMITS)
        assert request.stream and request.include_usage
        cid = completion_id()
        chunks = [
            ChatCompletionChunk(
                id=cid, model="m", choices=[ChunkChoice(index=0, delta=ChoiceDelta(role="assistant"))]
            ),
            ChatCompletionChunk(
                id=cid, model="m", choices=[ChunkChoice(index=0, delta=ChoiceDelta(content="Hi"))]
            ),
            ChatCompletionChunk(
                id=cid, model="m", choices=[ChunkChoice(index=0, delta=ChoiceDelta(), finish_reason="length")]
            ),
            ChatCompletionChunk(id=cid, model="m", choices=[], usage=Usage.count(5, 1)),
        ]
        return 200, {"content-type": "text/event-stream"}, "".join(map(sse_event, chunks)) + SSE_DONE

    client, _ = client_with(stream)
    got = list(
        client.chat.completions.create(
            model="m", messages=[user("hi")], stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hi"
    assert got[2].choices[0].finish_reason == "length" and got[-1].usage.completion_tokens == 1


def test_openai_client_reads_our_error_body():
    def refuse(raw: bytes):
        try:
            parse_request(raw, LIMITS)
        except APIError as err:
            return err.status, {"content-type": "application/json"}, json.dumps(err.body())
        raise AssertionError("the request should have been refused")

    client, _ = client_with(refuse)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[user("hi")], temperature=5)
    assert (info.value.status_code, info.value.param, info.value.code) == (
        400,
        "temperature",
        "invalid_value",
    )
    assert info.value.type == "invalid_request_error"


# -- bad requests: status, code, param -------------------------------------------------------------------------
def msgs(*messages) -> bytes:
    return json.dumps({"model": "m", "messages": list(messages)}).encode()


def image_part(url=IMAGE) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


BAD = [
    # (name, body, code, param)
    ("malformed JSON", b'{"model": "m",', "invalid_json", None),
    ("empty body", b"", "invalid_json", None),
    ("not UTF-8", b"\xff\xfe{}", "invalid_json", None),
    ("array body", b"[]", "invalid_type", None),
    ("model missing", json.dumps({"messages": [user("hi")]}).encode(), "missing_required_parameter", "model"),
    ("model not a string", body(model=5), "invalid_type", "model"),
    ("messages missing", b'{"model": "m"}', "missing_required_parameter", "messages"),
    ("messages empty", body(messages=[]), "invalid_value", "messages"),
    ("messages not a list", body(messages="hi"), "invalid_type", "messages"),
    ("message not an object", body(messages=["hi"]), "invalid_type", "messages[0]"),
    ("role tool", msgs({"role": "tool", "content": "x"}), "invalid_value", "messages[0].role"),
    ("role missing", msgs({"content": "x"}), "missing_required_parameter", "messages[0].role"),
    ("content missing", msgs({"role": "user"}), "missing_required_parameter", "messages[0].content"),
    (
        "content null",
        msgs(user("a"), {"role": "assistant", "content": None}),
        "invalid_value",
        "messages[1].content",
    ),
    ("content a number", msgs(user(5)), "invalid_value", "messages[0].content"),
    ("content empty list", msgs(user([])), "invalid_value", "messages[0].content"),
    ("part not an object", msgs(user(["hi"])), "invalid_value", "messages[0].content[0]"),
    (
        "part type unknown",
        msgs(user([{"type": "input_audio"}])),
        "invalid_value",
        "messages[0].content[0].type",
    ),
    ("part type missing", msgs(user([{"text": "x"}])), "invalid_value", "messages[0].content[0].type"),
    (
        "text missing",
        msgs(user([{"type": "text"}])),
        "missing_required_parameter",
        "messages[0].content[0].text",
    ),
    (
        "text a number",
        msgs(user([{"type": "text", "text": 1}])),
        "invalid_type",
        "messages[0].content[0].text",
    ),
    (
        "image_url a string",
        msgs(user([{"type": "image_url", "image_url": IMAGE}])),
        "invalid_type",
        "messages[0].content[0].image_url",
    ),
    (
        "url missing",
        msgs(user([{"type": "image_url", "image_url": {}}])),
        "missing_required_parameter",
        "messages[0].content[0].image_url.url",
    ),
    (
        "detail unknown",
        msgs(user([{"type": "image_url", "image_url": {"url": IMAGE, "detail": "ultra"}}])),
        "invalid_value",
        "messages[0].content[0].image_url.detail",
    ),
    (
        "image in a system message",
        msgs({"role": "system", "content": [image_part()]}, user("hi")),
        "invalid_value",
        "messages[0].content[0]",
    ),
    (
        "image in an assistant message",
        msgs(user("hi"), {"role": "assistant", "content": [image_part()]}),
        "invalid_value",
        "messages[1].content[0]",
    ),
    ("too many images", msgs(user([image_part()] * 9)), "too_many_images", "messages[0].content[8]"),
    ("max_tokens zero", body(max_tokens=0), "invalid_value", "max_tokens"),
    ("max_tokens a float", body(max_tokens=1.5), "invalid_type", "max_tokens"),
    ("max_tokens a string", body(max_tokens="7"), "invalid_type", "max_tokens"),
    (
        "max_completion_tokens negative",
        body(max_completion_tokens=-1),
        "invalid_value",
        "max_completion_tokens",
    ),
    ("temperature over 2", body(temperature=2.5), "invalid_value", "temperature"),
    ("temperature negative", body(temperature=-0.1), "invalid_value", "temperature"),
    ("temperature a string", body(temperature="hot"), "invalid_type", "temperature"),
    (
        "temperature NaN",
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        "invalid_type",
        "temperature",
    ),
    ("top_p zero", body(top_p=0), "invalid_value", "top_p"),
    ("top_p over 1", body(top_p=1.5), "invalid_value", "top_p"),
    ("stop a number", body(stop=5), "invalid_value", "stop"),
    ("stop list of numbers", body(stop=[1]), "invalid_type", "stop[0]"),
    ("five stop sequences", body(stop=list("abcde")), "too_many_stop_sequences", "stop"),
    ("empty stop string", body(stop=["a", ""]), "invalid_value", "stop[1]"),
    ("seed a float", body(seed=1.5), "invalid_type", "seed"),
    ("seed over int64", body(seed=2**70), "invalid_value", "seed"),
    ("n zero", body(n=0), "invalid_value", "n"),
    ("n over the limit", body(n=9), "too_many_choices", "n"),
    ("stream a string", body(stream="true"), "invalid_type", "stream"),
    ("stream_options not an object", body(stream=True, stream_options=1), "invalid_type", "stream_options"),
    (
        "include_usage a string",
        body(stream=True, stream_options={"include_usage": "yes"}),
        "invalid_type",
        "stream_options.include_usage",
    ),
    ("user a number", body(user=5), "invalid_type", "user"),
]


@pytest.mark.parametrize("raw, code, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_is_400_naming_the_field(raw, code, param):
    err = error_of(raw)
    assert (err.status, err.type, err.code, err.param) == (400, "invalid_request_error", code, param)


def test_body_over_the_limit_is_413_before_decoding():
    limits = Limits(max_body_bytes=1000)
    err = error_of(b"{" * 1001, limits)  # not JSON: the size is checked first
    assert (err.status, err.code, err.param) == (413, "body_too_large", None)
    assert parse_request(body(user="x" * 100), limits).user == "x" * 100


def test_long_input_is_not_echoed_back():
    err = error_of(body(model=["x" * 10_000]))
    assert len(err.message) < 100 and "xxxxxxxxxx" not in err.message


def test_unknown_fields_are_ignored_at_every_level():
    raw = json.dumps(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "name": "ann",
                    "content": [
                        {"type": "text", "text": "hi", "cache_control": {}},
                        {"type": "image_url", "image_url": {"url": IMAGE, "format": "png"}, "extra": 1},
                    ],
                }
            ],
            "logit_bias": {"5": 1},
            "tools": [],
            "frequency_penalty": 0,
            "stream_options": {"include_usage": True, "other": 1},
        }
    )
    request = parse_request(raw, LIMITS)
    assert to_chat(request).messages == [{"role": "user", "content": "hi\n<image>"}]
    assert not request.include_usage  # only when streaming


def test_defaults_and_max_completion_tokens_precedence():
    request = parse_request(body(), LIMITS)
    s = request.sampling(Limits(default_max_tokens=33))
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop, s.n) == (33, 1.0, 1.0, None, (), 1)
    assert parse_request(body(max_tokens=5), LIMITS).sampling(LIMITS).max_tokens == 5
    assert parse_request(body(max_tokens=5, max_completion_tokens=6), LIMITS).sampling(LIMITS).max_tokens == 6
    nulls = body(max_tokens=None, temperature=None, stop=None, n=None, stream=None, seed=None)
    assert parse_request(nulls, LIMITS).sampling(LIMITS).n == 1
    assert parse_request(body(stop=["a", "b"]), LIMITS).stop_sequences == ("a", "b")
    assert parse_request(body(temperature=0), LIMITS).sampling(LIMITS).temperature == 0.0


# -- to_chat and reserved strings ------------------------------------------------------------------------------
def test_to_chat_places_each_image_where_it_stood():
    raw = msgs(
        user([image_part("data:a"), {"type": "text", "text": "Compare"}, image_part("data:b")]),
        {"role": "assistant", "content": [{"type": "text", "text": "One"}, {"type": "text", "text": "two"}]},
        user([{"type": "text", "text": "And"}, image_part("data:c")]),
    )
    chat = to_chat(parse_request(raw, LIMITS), image_token="<img>")
    assert [m["content"] for m in chat.messages] == ["<img>\nCompare\n<img>", "One\ntwo", "And\n<img>"]
    assert [(i.url, i.param) for i in chat.images] == [
        ("data:a", "messages[0].content[0].image_url.url"),
        ("data:b", "messages[0].content[2].image_url.url"),
        ("data:c", "messages[2].content[1].image_url.url"),
    ]


@pytest.mark.parametrize(
    "messages, param",
    [
        ([user("look: <image>")], "messages[0].content"),
        ([user([{"type": "text", "text": "<image>"}, image_part()])], "messages[0].content[0].text"),
        ([{"role": "system", "content": "x<image>y"}, user("hi")], "messages[0].content"),
        ([user("hi"), {"role": "assistant", "content": "<image>"}], "messages[1].content"),
        ([user("end</s>")], "messages[0].content"),
        ([user("<|im_start|>system")], "messages[0].content"),
    ],
)
def test_placeholder_or_special_token_in_text_is_refused(messages, param):
    request = parse_request(msgs(*messages), LIMITS)
    with pytest.raises(APIError) as info:
        to_chat(request, "<image>", reserved=("</s>", "<|im_start|>"))
    err = assert_clean(info.value)
    assert (err.status, err.code, err.param) == (400, "placeholder_in_text", param)


def test_text_without_reserved_strings_passes():
    request = parse_request(msgs(user("an <img> tag and <b>bold</b> < image >")), LIMITS)
    assert (
        to_chat(request, reserved=("</s>",)).messages[0]["content"]
        == "an <img> tag and <b>bold</b> < image >"
    )


def test_reserved_strings_of_a_processor():
    tokenizer = train_bpe_tokenizer(["a red circle"] * 4, vocab_size=280, extra_special_tokens=("<video>",))
    processor = Processor(tokenizer, ProcessorConfig(video=VideoConfig()), num_image_tokens=4)
    reserved = reserved_strings(processor)
    assert {"<image>", "<video>", "<|end|>", "<pad>", "<|user|>", "<|assistant|>"} <= set(reserved)
    request = parse_request(msgs(user(f"stop {tokenizer.eos_token} now")), LIMITS)
    with pytest.raises(APIError, match="placeholder_in_text|reserved string"):
        to_chat(request, processor.config.image_token, reserved)


# -- responses and errors --------------------------------------------------------------------------------------
def test_response_models_have_the_openai_shape():
    completion = ChatCompletion(
        model="m",
        choices=[Choice(index=0, message=ChatCompletionMessage(content="hi"), finish_reason="length")],
        usage=Usage.count(3, 4),
    )
    data = json.loads(completion.model_dump_json())
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "hi", "boxes": None, "image_prompt": None},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    models = ModelList(data=[{"id": "vlmlab-tiny"}]).model_dump()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    with pytest.raises(ValueError):
        GroundingBox(box=[1, 2, 3], image=0)


def test_error_helpers():
    busy = assert_clean(errors.server_busy(3))
    assert (busy.status, busy.code, busy.headers) == (503, "server_busy", {"Retry-After": "3"})
    assert assert_clean(errors.rate_limited(1)).type == "rate_limit_error"
    assert assert_clean(errors.authentication_failed()).type == "authentication_error"
    missing = assert_clean(errors.model_not_found("x" * 500))
    assert (missing.status, missing.param, missing.type) == (404, "model", "not_found_error")
    assert len(missing.message) < 100
    ctx = assert_clean(errors.context_length_exceeded(100, 50, 128))
    assert (ctx.code, ctx.param) == ("context_length_exceeded", "messages")
    assert assert_clean(errors.internal_error()).body()["error"]["message"] == "internal server error"
    long = APIError(400, "a\nb " + "x" * 1000)
    assert "\n" not in long.message and len(long.message) == errors.MAX_MESSAGE
    assert sse_event(long.body()).startswith('data: {"error": {')
