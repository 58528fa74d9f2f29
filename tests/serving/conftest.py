"""Fixtures for the server tests: a tiny random model served by a real uvicorn on a free loopback port."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import pytest
from PIL import Image

from conftest import make_model

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


@contextlib.contextmanager
def running_server(app):
    """``app`` served by uvicorn in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
