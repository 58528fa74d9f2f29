"""``vlmlab serve`` end to end on loopback: the official ``openai`` client, parity with ``generate`` and
``vlmlab chat``, batching under load, disconnects, backpressure, grounding boxes."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch
from PIL import Image

from serving.conftest import API_KEY, MODEL_NAME, data_uri, image_message, make_app, running_server
from vlmlab.inference.chat import answer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def test_openai_client_models_chat_and_stream(client):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    messages = [image_message()]
    done = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
    assert done.object == "chat.completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens <= 6 and done.usage.total_tokens == (
        done.usage.prompt_tokens + done.usage.completion_tokens
    )
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content  # streamed == not streamed (greedy)
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == done.choices[0].finish_reason


def test_openai_client_exceptions_carry_status_and_message(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[image_message()], max_tokens=2)
    assert e.value.status_code == 404 and "gpt-4o" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[image_message()], max_tokens=100_000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    bad_key = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.models.list()
    assert e.value.status_code == 401 and "wrong" not in e.value.message


def test_same_tokens_as_generate_and_chat(server, tiny_served):
    """Greedy: the server's answer == ``vlmlab chat``'s ``answer`` == ``generate`` decoded, for several images
    and a multi-turn history with a system prompt."""
    model, processor = tiny_served
    red, blue = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (24, 50), "blue")
    history = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "two"},
    ]
    question = "<image>\n<image>\nWhat color is the shape?"
    expected = answer(model, processor, question, [red, blue], history=history, max_new_tokens=10)
    batch = processor([[*history, {"role": "user", "content": question}]], [[red, blue]])
    new = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        max_new_tokens=10,
        eos_token_id=processor.eos_token_ids,
        pad_token_id=processor.pad_token_id,
    )
    assert processor.decode(new[0].tolist()) == expected
    message = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_uri(red)}},
            {"type": "image_url", "image_url": {"url": data_uri(blue)}},
            {"type": "text", "text": "What color is the shape?"},
        ],
    }
    r = httpx.post(
        server + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL_NAME, "messages": [*history, message], "max_tokens": 10, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() == expected


async def _stream_one(http: httpx.AsyncClient, url: str, i: int) -> tuple[str, bool]:
    body = {
        "model": MODEL_NAME,
        "messages": [image_message(f"What color is the shape? {i % 5}")],
        "max_tokens": 8,
        "temperature": 0.7,
        "seed": i,
        "stream": True,
    }
    text, done = "", False
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += line
    return text, done


def test_64_concurrent_streams_all_complete(server):
    async def main():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(headers=headers, timeout=120) as http:
            return await asyncio.gather(*(_stream_one(http, server, i) for i in range(64)))

    results = asyncio.run(main())
    assert all(done for _, done in results) and len(results) == 64
    health = httpx.get(server + "/health").json()
    assert health["running"] == 0 and health["queued"] == 0


def test_a_client_that_disconnects_frees_its_slot(tiny_served):
    app = make_app(tiny_served, max_batch=2)
    engine = app.state.engine
    with running_server(app) as url:
        body = {"model": MODEL_NAME, "messages": [image_message()], "max_tokens": 90, "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            admitted = time.monotonic()  # the role chunk comes first; the row may still be joining the batch
            while not engine.running and time.monotonic() - admitted < 10:
                time.sleep(0.01)
            assert len(engine.running) == 1
        gone = time.monotonic()
        while engine.running and time.monotonic() - gone < 2:
            time.sleep(0.02)
        assert not engine.running, "the disconnected stream still holds its batch slot after 2 s"


def test_a_full_queue_answers_503_with_retry_after(tiny_served, monkeypatch):
    from vlmlab.serving import engine as engine_module

    app = make_app(tiny_served, max_batch=1, max_queue=1)
    gate = __import__("threading").Event()
    real_step = engine_module.DecodeBatch.step

    def slow_step(self, tokens):
        gate.wait(10)
        return real_step(self, tokens)

    monkeypatch.setattr(engine_module.DecodeBatch, "step", slow_step)
    with running_server(app) as url:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": MODEL_NAME, "messages": [image_message()], "max_tokens": 3, "temperature": 0}

        async def main():
            async with httpx.AsyncClient(headers=headers, timeout=30) as http:
                first = asyncio.create_task(http.post(url + "/v1/chat/completions", json=body))
                while not app.state.engine.running:  # the first one holds the only row
                    await asyncio.sleep(0.01)
                second = asyncio.create_task(http.post(url + "/v1/chat/completions", json=body))
                while not app.state.engine.queued:  # the second one waits in the only queue place
                    await asyncio.sleep(0.01)
                third = await http.post(url + "/v1/chat/completions", json=body)
                gate.set()
                return third, await first, await second

        third, first, second = asyncio.run(main())
    assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1
    assert third.json()["error"]["code"] == "server_busy"
    assert first.status_code == 200 and second.status_code == 200


def test_grounding_boxes_come_back_in_image_pixels(tiny_served, monkeypatch):
    """A model answering in Qwen-VL's box format: the response also carries the box in pixels of the image."""
    from vlmlab.serving import engine as engine_module

    model, processor = tiny_served
    script = processor.tokenizer.encode(
        "<ref>red</ref><box>(100,200),(500,1000)</box>", add_special_tokens=False
    )
    script = iter([*script, processor.eos_token_ids[0]])
    monkeypatch.setattr(engine_module, "sample_next", lambda *a, **k: torch.tensor([next(script)]))
    app = make_app(tiny_served)
    with running_server(app) as url:
        r = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": MODEL_NAME, "messages": [image_message()], "max_tokens": 60},
        )
    message = r.json()["choices"][0]["message"]
    assert message["content"] == "<ref>red</ref><box>(100,200),(500,1000)</box>"
    # 40 x 30 image, decoded / 999 as Qwen-VL's evaluation does (1000 is clipped to 999: the far edge).
    expected = [100 / 999 * 40, 200 / 999 * 30, 500 / 999 * 40, 30.0]
    assert message["boxes"][0]["ref"] == "red" and message["boxes"][0]["image"] == 0
    assert message["boxes"][0]["box"] == pytest.approx(expected)


def test_text_that_cannot_fit_is_refused_before_tokenizing(server, tiny_served, monkeypatch):
    """No token decodes to more characters than its vocabulary string: longer text is a 400 without encoding."""
    from vlmlab.processing.processor import Processor

    _, processor = tiny_served
    longest = max(map(len, processor.tokenizer.get_vocab()))
    calls = []
    monkeypatch.setattr(Processor, "encode", lambda *a, **k: calls.append(1))  # must not be reached
    text = "a" * (128 * longest + 1)
    r = httpx.post(
        server + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 1},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "cannot fit" in r.json()["error"]["message"] and not calls


def test_the_chat_page_is_served_with_protective_headers(server):
    r = httpx.get(server + "/", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and "<title>vlmlab chat</title>" in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"


def test_a_stopped_generation_loop_fails_requests_instead_of_hanging(tiny_served, monkeypatch):
    from vlmlab.serving import engine as engine_module

    def broken(self):
        raise MemoryError("simulated")

    monkeypatch.setattr(engine_module.Engine, "_loop", broken)
    with running_server(make_app(tiny_served)) as url:
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stopped"
        r = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": MODEL_NAME, "messages": [image_message()], "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 503 and "Retry-After" in r.headers
