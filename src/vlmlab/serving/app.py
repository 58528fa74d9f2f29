"""``vlmlab serve``: an OpenAI-compatible HTTP server (FastAPI) in front of the batching ``Engine``.

Routes: ``POST /v1/chat/completions`` (text and ``image_url`` parts, streaming as server-sent events),
``GET /v1/models``, ``GET /health``, and a chat page at ``/``. What it defends against, and where:

- client mistakes are 4xx in OpenAI's error shape naming the field (``errors.APIError``), checked before any
  decoding: the body's type (application/json, which a cross-site page cannot send without a CORS preflight)
  and size (from Content-Length, then while reading), the request's schema and limits
  (``protocol``), the images' count, bytes, formats and pixels (``images``), the prompt against the context;
  anything unexpected is a 500 whose message says nothing of the internals;
- an API key, when set, is required on every route but ``/health`` (``Authorization: Bearer``, or HTTP Basic
  with the key as password, which a browser can send for the chat page) and compared in constant time; it is
  never logged;
- overload is a 503 with ``Retry-After`` (the engine's bounded queue), and a client that disconnects has its
  generation cancelled, freeing its batch slot;
- no CORS headers unless origins are allowlisted; no pickle or remote code anywhere on this path (the model was
  loaded from safetensors before the app was built).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator, Sequence
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmlab.errors import ImageError, SampleError
from vlmlab.inference.image_prompt import ImageGenerator, handle_image_prompt
from vlmlab.processing.boxes import parse_boxes
from vlmlab.processing.processor import visual_inputs
from vlmlab.serving import protocol as P
from vlmlab.serving.engine import Engine, EngineBusy
from vlmlab.serving.engine import Sequence as Seq
from vlmlab.serving.errors import (
    APIError,
    authentication_failed,
    body_too_large,
    context_length_exceeded,
    internal_error,
    invalid_request,
    method_not_allowed,
    model_not_found,
    not_found,
    server_busy,
    unsupported_media_type,
)
from vlmlab.serving.images import load_images
from vlmlab.serving.limits import Limits

log = logging.getLogger("vlmlab.serve")

OPEN_ROUTES = {"/health"}  # the only route that needs no API key
# The chat page: one self-contained file (inline script and style, images as data:/blob: URLs), talking to this
# origin only; never framed by another site, never cached with a key-protected response.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    model,
    processor,
    *,
    model_name: str = "vlmlab",
    api_key: str | None = None,
    limits: Limits | None = None,
    cors_origins: Sequence[str] = (),
    max_batch: int = 8,
    max_queue: int = 64,
    image_generator: ImageGenerator | None = None,
) -> FastAPI:
    """The server for one model. ``api_key`` None: no key asked (the CLI allows that on loopback only).
    ``image_generator`` gets each answer's ``<h>...</h>`` image prompt (``vlmlab.inference.image_prompt``)."""
    limits = limits or Limits()
    engine = Engine(model, processor, max_batch=max_batch, max_queue=max_queue)
    reserved = P.reserved_strings(processor)
    # No token decodes to more characters than its vocabulary string has: text longer than context x this cannot
    # fit, and is refused before tokenizing it (about 1.5 s per MB).
    max_token_chars = max(map(len, processor.tokenizer.get_vocab()), default=1)

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(
        title="vlmlab",
        summary="OpenAI-compatible chat completions with images",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.limits = limits

    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)

    if cors_origins:  # outside RequireKey (added last): an allowed page can read a 401 too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError):
        return _error_response(invalid_request("the request does not match the API's schema"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            api_error = not_found(request.url.path)
        elif err.status_code == 405:
            api_error = method_not_allowed(request.method)
        else:
            api_error = APIError(err.status_code, "the request could not be served", code="http_error")
        api_error.headers.update(err.headers or {})  # a 405's Allow header (RFC 9110)
        return _error_response(api_error)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception):
        log.error("internal error on %s: %s", request.url.path, type(err).__name__, exc_info=err)
        return _error_response(internal_error())

    @app.get(
        "/health", summary="Liveness and load (no API key needed)", responses=P.error_responses(500, 503)
    )
    async def health() -> P.Health:
        if engine.started and not engine.alive:  # the generation loop stopped: requests would get 503s
            raise APIError(503, "the generation loop stopped; see the server's log", code="engine_stopped")
        return P.Health(running=len(engine.running), queued=engine.queued)

    @app.get("/v1/models", response_model=P.ModelList, responses=P.error_responses(401, 500))
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=model_name)])

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(
            resources.files("vlmlab.serving").joinpath("static/index.html").read_text(), headers=PAGE_HEADERS
        )

    @app.post(
        "/v1/chat/completions",
        summary="Create a chat completion (text and image_url parts; stream=true for server-sent events)",
        responses={
            200: {
                "description": "The completion, or with stream=true its chunks as server-sent events",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                    "text/event-stream": {"schema": P.SSE_EVENT_SCHEMA},
                },
            },
            **P.ERROR_RESPONSES,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}},
            }
        },
    )
    async def chat_completions(request: Request):
        content_type = request.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise unsupported_media_type(content_type)
        body = await _read_body(request, limits.max_body_bytes)
        req = P.parse_request(body, limits)
        if req.model != model_name:
            raise model_not_found(req.model)
        sampling = req.sampling(limits)
        chat = P.to_chat(req, processor.config.image_token, reserved)
        # Each message is a token at least (and the encoding's time is quadratic in them), each token at most
        # max_token_chars characters: what cannot fit is refused before encoding.
        chars = sum(len(m["content"]) for m in chat.messages)
        if len(chat.messages) >= engine.context or chars > engine.context * max_token_chars:
            raise invalid_request(
                f"messages: {len(chat.messages)} messages of {chars} characters cannot fit this model's context "
                f"length of {engine.context} tokens",
                "messages",
                "context_length_exceeded",
            )
        images, inputs = await asyncio.to_thread(_prepare, processor, chat, limits)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if prompt_tokens + sampling.max_tokens > engine.context:
            raise context_length_exceeded(prompt_tokens, sampling.max_tokens, engine.context)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs = [Seq(inputs, _seeded(sampling, i), loop, events, index=i) for i in range(sampling.n)]
        try:
            engine.submit(seqs)
        except EngineBusy as e:
            raise server_busy(e.retry_after) from None
        sizes = [im.size for im in images]
        if req.stream:
            return StreamingResponse(
                _stream(engine, seqs, events, model_name, req.include_usage, sizes, image_generator),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            done = await _collect(seqs, events, request)
        finally:
            for s in seqs:
                engine.cancel(s)  # no-op for finished ones; frees the rows of a client that went away
        if any(s.finish_reason == "error" for s in seqs):
            raise internal_error()
        # Each answer's <h>...</h> image prompt, out of its text and to the generator (off the event loop).
        answers = {
            i: await asyncio.to_thread(handle_image_prompt, t, image_generator) for i, t in done.items()
        }
        choices = [
            P.Choice(
                index=s.index,
                message=P.ChatCompletionMessage(
                    content=answers[s.index][0],
                    boxes=_boxes(answers[s.index][0], sizes),
                    image_prompt=answers[s.index][1],
                ),
                finish_reason=s.finish_reason,
            )
            for s in seqs
        ]
        usage = P.Usage.count(prompt_tokens, sum(len(s.tokens) for s in seqs))
        return JSONResponse(P.ChatCompletion(model=model_name, choices=choices, usage=usage).model_dump())

    _add_schemas(app, keyed=api_key is not None)
    return app


# -- request handling ----------------------------------------------------------------------------------------
class RequireKey:
    """ASGI middleware: every HTTP request but ``OPEN_ROUTES`` (and CORS preflights) must carry the key. Plain
    ASGI rather than ``BaseHTTPMiddleware``, which would sit between a streaming response and its client."""

    def __init__(self, app, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            if not _key_matches(headers.get(b"authorization", b"").decode("latin-1"), self.api_key):
                err = authentication_failed()
                if scope["path"] == "/":  # a browser then asks for the key (as the password of HTTP Basic)
                    err.headers = {"WWW-Authenticate": 'Basic realm="vlmlab", charset="UTF-8"'}
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _key_matches(header: str, api_key: str) -> bool:
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), api_key.encode())


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) from its Content-Length or as soon as the bytes read pass ``limit``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise body_too_large(int(length), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(processor, chat: P.Chat, limits: Limits):
    """Images decoded under the limits and the prompt encoded (never truncated): ``(images, model inputs)``."""
    images = load_images(chat.images, limits)
    try:
        sample = processor.encode(chat.messages, images, add_generation_prompt=True, truncate=False)
    except (SampleError, ImageError) as e:
        raise invalid_request(f"messages: {e}", "messages", "invalid_messages") from None
    except TemplateError:  # the template's raise_exception ("roles must alternate ..."): the model's rule
        raise invalid_request(
            "messages: the model's chat template does not accept this conversation (the order of its roles?)",
            "messages",
            "invalid_messages",
        ) from None
    batch = processor.collate([sample], padding_side="left")
    return images, {"input_ids": batch["input_ids"], **visual_inputs(batch)}


def _seeded(sampling: P.Sampling, i: int) -> P.Sampling:
    """Choice ``i`` of ``n``: its own seed, so that the choices differ but a seeded request repeats."""
    return (
        sampling if sampling.seed is None or i == 0 else dataclasses.replace(sampling, seed=sampling.seed + i)
    )


async def _collect(seqs: list[Seq], events: asyncio.Queue, request: Request) -> dict[int, str]:
    """Wait for every choice's text; stop waiting (and let the caller cancel) if the client disconnects."""
    texts = {s.index: "" for s in seqs}
    open_ = len(seqs)
    while open_:
        try:
            index, kind, value = await asyncio.wait_for(events.get(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                return texts
            continue
        if kind == "delta":
            texts[index] += value
        else:
            open_ -= 1
    return texts


async def _stream(
    engine: Engine,
    seqs: list[Seq],
    events: asyncio.Queue,
    model_name: str,
    include_usage: bool,
    sizes: list[tuple[int, int]],
    image_generator: ImageGenerator | None,
) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, content deltas, a finish chunk per choice, optionally a
    usage chunk, then ``[DONE]``. Closing the stream (client gone) cancels the generations."""
    cid = P.completion_id()

    def chunk(index: int, **delta) -> str:
        finish = delta.pop("finish_reason", None)
        choice = P.ChunkChoice(index=index, delta=P.ChoiceDelta(**delta), finish_reason=finish)
        return P.sse_event(P.ChatCompletionChunk(id=cid, model=model_name, choices=[choice]))

    texts = {s.index: "" for s in seqs}
    try:
        for s in seqs:
            yield chunk(s.index, role="assistant", content="")
        open_ = len(seqs)
        while open_:
            index, kind, value = await events.get()
            if kind == "delta":
                texts[index] += value
                yield chunk(index, content=value)
                continue
            open_ -= 1
            if value == "error":
                yield P.sse_event(internal_error().body())
                return
            _, prompt = await asyncio.to_thread(handle_image_prompt, texts[index], image_generator)
            yield chunk(index, boxes=_boxes(texts[index], sizes), image_prompt=prompt, finish_reason=value)
        if include_usage:
            usage = P.Usage.count(seqs[0].prompt_tokens, sum(len(s.tokens) for s in seqs))
            yield P.sse_event(P.ChatCompletionChunk(id=cid, model=model_name, choices=[], usage=usage))
        yield P.SSE_DONE
    finally:
        for s in seqs:
            engine.cancel(s)


def _boxes(text: str, sizes: list[tuple[int, int]]) -> list[P.GroundingBox] | None:
    """The answer's Qwen-VL boxes in pixels of the request's last image (the one a grounding answer is about)."""
    if not sizes or "<box>" not in text:
        return None
    w, h = sizes[-1]
    found = [
        P.GroundingBox(ref=b.ref, box=[b.x1, b.y1, b.x2, b.y2], image=len(sizes) - 1)
        for b in parse_boxes(text, w, h)
    ]
    return found or None


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


def _add_schemas(app: FastAPI, keyed: bool) -> None:
    """Put the request and completion models into the OpenAPI components (the chat route reads its body itself,
    so that size limits and error shapes are its own, and FastAPI would not list them), and with ``keyed`` the
    API key as the security of every route but ``OPEN_ROUTES`` (the key checked by ``RequireKey``, not by
    FastAPI, which would not list it either)."""
    original = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (P.ChatRequest, P.ChatCompletion, P.ChatCompletionChunk):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(s.pop("$defs", {}))
            components[model.__name__] = s
        if keyed:
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "The API key"},
                "basic": {"type": "http", "scheme": "basic", "description": "The API key as the password"},
            }
            schema["security"] = [{"bearer": []}, {"basic": []}]
            for path in OPEN_ROUTES:
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
