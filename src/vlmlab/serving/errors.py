"""The one error type of the OpenAI-compatible server, and the JSON body every failure is sent as.

The official ``openai`` client turns a status into an exception class (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 413 ``APIStatusError``, 429 ``RateLimitError``, 5xx
``InternalServerError``) and reads ``{"error": {"message", "type", "param", "code"}}`` from the body, so every
failure the server reports is an ``APIError`` carrying exactly those fields.

Messages are written for the client: one line that names the field and the problem, at most ``MAX_MESSAGE``
characters, with user-supplied values shortened by ``quote``. They never hold a traceback, a server path or a
library's exception text (a Pillow message once leaked a heap address, CVE-2026-22778; RELIABILITY.md S2):
callers catch library exceptions and raise an ``APIError`` with their own words, ``from None``.
"""

from __future__ import annotations

from typing import Any

MAX_MESSAGE = 400  # characters; longer messages are cut (a message must not echo a large input back)
MAX_SHOWN = 60  # characters of a user-supplied value quoted in a message

# OpenAI's error types by status; a status not listed is a server error.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """A failure to report to the client as ``status`` with ``body()``.

    ``param``: the offending request field in OpenAI's path form (``"messages[1].content[2].image_url.url"``),
    or None; ``code``: a short machine string naming the rule or limit (``"too_many_images"``); ``headers``:
    extra response headers (``Retry-After`` on 429/503)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status = status
        self.message = _one_line(message)
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The JSON response body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def quote(value: Any) -> str:
    """A user-supplied value quoted for a message: shortened to ``MAX_SHOWN`` characters, on one line."""
    text = str(value)
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + "..."
    return "'" + text.replace("\r", "\\r").replace("\n", "\\n") + "'"


def _one_line(message: str) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


# -- the common failures -------------------------------------------------------------------------------------
def invalid_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """400: the request is well-formed JSON but breaks a rule; ``message`` names ``param`` and the problem."""
    return APIError(400, message, param=param, code=code)


def body_too_large(size: int, limit: int) -> APIError:
    """413: the request body is over the server's byte limit."""
    return APIError(
        413, f"request body is {size} bytes, over the limit of {limit} bytes", code="body_too_large"
    )


def unsupported_media_type(content_type: str) -> APIError:
    """415: the body is not declared ``application/json``. Required, not sniffed: a browser sends a cross-site
    POST without asking first (no CORS preflight) only as text/plain, a form or no type at all."""
    return APIError(
        415,
        f"Content-Type must be application/json, not {quote(content_type or 'none')}",
        code="unsupported_media_type",
    )


def authentication_failed() -> APIError:
    """401: no API key, or a wrong one (the message never says which, nor echoes the key)."""
    return APIError(
        401,
        "invalid or missing API key (send it as 'Authorization: Bearer <key>')",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str) -> APIError:
    """404: the request names a model this server does not serve."""
    return APIError(
        404,
        f"model: no model {quote(model)} is served here",
        param="model",
        code="model_not_found",
    )


def not_found(path: str) -> APIError:
    """404: no route at ``path``."""
    return APIError(404, f"no route {quote(path)}", code="not_found")


def method_not_allowed(method: str) -> APIError:
    """405: the route exists but not for ``method`` (the handler adds the ``Allow`` header)."""
    return APIError(405, f"method {quote(method)} is not allowed on this route", code="method_not_allowed")


def too_many_images(param: str, limit: int) -> APIError:
    """400: the request holds more than ``limit`` images; ``param`` is the first one over the limit."""
    return APIError(
        400, f"{param}: more than {limit} images in the request", param=param, code="too_many_images"
    )


def context_length_exceeded(prompt_tokens: int, max_tokens: int, context_length: int) -> APIError:
    """400: the prompt plus the requested completion does not fit the model's context (never truncated)."""
    return APIError(
        400,
        f"messages: the messages take {prompt_tokens} tokens and max_tokens asks for {max_tokens} more, over "
        f"this model's context length of {context_length} tokens",
        param="messages",
        code="context_length_exceeded",
    )


def rate_limited(retry_after_s: int) -> APIError:
    """429: this client sent too many requests; retry after ``retry_after_s`` seconds."""
    return _retry_later(429, "too many requests", "rate_limit_exceeded", retry_after_s)


def server_busy(retry_after_s: int) -> APIError:
    """503: the request queue is full (overload, not a fault); retry after ``retry_after_s`` seconds."""
    return _retry_later(503, "the server is busy", "server_busy", retry_after_s)


def _retry_later(status: int, problem: str, code: str, retry_after_s: int) -> APIError:
    return APIError(
        status,
        f"{problem}; retry after {retry_after_s} s",
        code=code,
        headers={"Retry-After": str(retry_after_s)},
    )


def internal_error() -> APIError:
    """500: an unexpected fault; the details go to the server's log, never to the client."""
    return APIError(500, "internal server error", code="internal_error")
