"""Fixtures for the server tests: a tiny random model served by a real uvicorn on a free loopback port."""

from __future__ import annotations

import base64
import io
import socket

import pytest
from PIL import Image

from conftest import make_model
from vlmlab.serving.bench import serve_in_thread

API_KEY = "test-key-0123456789"
MODEL_NAME = "tiny"


def data_uri(image: Image.Image | None = None, fmt: str = "PNG") -> str:
    image = image or Image.new("RGB", (40, 30), "red")
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(question: str = "What color is the shape?", *urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in (urls or (data_uri(),))]
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


running_server = serve_in_thread  # ``with running_server(app) as url``


@pytest.fixture(scope="module")
def tiny_served(tokenizer):
    """``(model, processor)`` of a tiny random model (context 128)."""
    return make_model(tokenizer)


def make_app(tiny_served, **kwargs):
    from vlmlab.serving.app import create_app

    model, processor = tiny_served
    return create_app(model, processor, model_name=MODEL_NAME, **{"api_key": API_KEY, **kwargs})


@pytest.fixture(scope="module")
def server(tiny_served):
    """The base URL of a running server with ``API_KEY``."""
    with running_server(make_app(tiny_served)) as url:
        yield url
