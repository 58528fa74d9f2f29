"""``vlmlab bench-serve``: N concurrent streaming clients against ``vlmlab serve`` on loopback.

The same requests run twice against the same model in the same process: once with the engine batching up to
``concurrency`` sequences (continuous batching), once with ``max_batch=1`` (one request at a time, the others
waiting in the queue). Reported for each: requests/s, output tokens/s, time to first token and inter-token
latency percentiles (as the clients see them, through HTTP and server-sent events), errors; and the ratio of
batched to one-at-a-time throughput. This is a benchmark, not a test: figures depend on the machine.

Every client sends a different image and question, greedy (``temperature`` 0), ``max_tokens`` fixed; the
output token counts come from the server's ``usage`` (a stream may end early at EOS).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import socket
import threading
import time
from dataclasses import dataclass

import httpx


@dataclass
class Result:
    ttft: float  # seconds from sending to the first content chunk
    gaps: list[float]  # seconds between content chunks
    tokens: int
    seconds: float
    error: str | None = None


def _percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in ps}
    values = sorted(values)
    return {f"p{p}": values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] for p in ps}


def _requests(n: int, model_name: str, max_tokens: int, image_size: int) -> list[dict]:
    import base64
    import io

    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (image_size + 7 * (i % 5), image_size), colours[i % len(colours)]).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        question = ["What color is the shape?", "What shape is this?", "How many shapes are there?"][i % 3]
        out.append(
            {
                "model": model_name,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": question},
                        ],
                    }
                ],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return out


async def _one(http: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(0, [], 0, time.perf_counter() - start, f"HTTP {r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(0, [], 0, time.perf_counter() - start, chunk["error"]["message"])
                now = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in chunk["choices"]):
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        return Result(0, [], 0, time.perf_counter() - start, type(e).__name__)
    end = time.perf_counter()
    return Result((first or end) - start, gaps, tokens, end - start)


async def _run_clients(
    url: str, bodies: list[dict], concurrency: int, api_key: str | None
) -> tuple[list, float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency)
    queue = list(bodies)
    results: list[Result] = []

    async def worker(http):
        while queue:
            results.append(await _one(http, url, queue.pop(0)))

    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return results, time.perf_counter() - start


def _client_main(url: str, bodies: list[dict], concurrency: int, out) -> None:
    results, seconds = asyncio.run(_run_clients(url, bodies, concurrency, None))
    out.put(([dataclasses.astuple(r) for r in results], seconds))


def _clients_in_process(url: str, bodies: list[dict], concurrency: int) -> tuple[list[Result], float]:
    """The clients run in a process of their own, as real clients would: parsing their streams must not take
    the server's interpreter lock (or its share of the cores) in the figures."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
    out = ctx.Queue()
    proc = ctx.Process(target=_client_main, args=(url, bodies, concurrency, out), daemon=True)
    proc.start()
    results, seconds = out.get(timeout=3600)
    proc.join(timeout=60)
    return [Result(*r) for r in results], seconds


def summarize(results: list[Result], seconds: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(ok) / seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 2),
        "output_tokens": tokens,
        "ttft_ms": {k: round(v * 1000, 1) for k, v in _percentiles([r.ttft for r in ok]).items()},
        "itl_ms": {k: round(v * 1000, 2) for k, v in _percentiles([g for r in ok for g in r.gaps]).items()},
        "error_messages": sorted({r.error for r in results if r.error})[:5],
    }


@contextlib.contextmanager
def serve_in_thread(app):
    """``app`` served by uvicorn on a free loopback port, in a thread of this process; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run_bench_serve(
    model,
    processor,
    *,
    concurrency: int = 8,
    requests: int = 32,
    max_tokens: int = 32,
    image_size: int = 64,
    model_name: str = "bench",
) -> dict:
    """Batched (``max_batch=concurrency``) and one-at-a-time (``max_batch=1``) serving of the same requests."""
    import torch

    from vlmlab.serving.app import create_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    bodies = _requests(requests, model_name, max_tokens, image_size)
    out: dict = {
        "settings": {
            "concurrency": concurrency,
            "requests": requests,
            "max_tokens": max_tokens,
            "image_size": image_size,
            "threads": torch.get_num_threads(),
        }
    }
    for mode, max_batch in (("batched", concurrency), ("one_at_a_time", 1)):
        app = create_app(model, processor, model_name=model_name, max_batch=max_batch, max_queue=requests + 1)
        with serve_in_thread(app) as url:
            _clients_in_process(url, bodies[:concurrency], concurrency)  # warm-up
            results, seconds = _clients_in_process(url, bodies, concurrency)
        out[mode] = summarize(results, seconds)
    b, s = out["batched"], out["one_at_a_time"]
    out["throughput_ratio"] = round(b["output_tokens_per_s"] / max(s["output_tokens_per_s"], 1e-9), 2)
    out["same_token_counts"] = b["output_tokens"] == s["output_tokens"]  # greedy: equal answers, equal counts
    return out


def format_table(result: dict) -> str:
    rows = ["mode            req/s   tok/s   TTFT p50/p90/p99 ms        ITL p50/p90/p99 ms      errors"]
    for mode in ("batched", "one_at_a_time"):
        r = result[mode]
        t, i = r["ttft_ms"], r["itl_ms"]
        rows.append(
            f"{mode:<14} {r['requests_per_s']:>6.2f} {r['output_tokens_per_s']:>7.1f}   "
            f"{t['p50']:>7.1f} {t['p90']:>7.1f} {t['p99']:>7.1f}   {i['p50']:>7.2f} {i['p90']:>7.2f} {i['p99']:>7.2f}"
            f"   {r['errors']}"
        )
    s = result["settings"]
    rows.append(
        f"batched / one-at-a-time throughput: {result['throughput_ratio']}x at {s['concurrency']} concurrent "
        f"clients ({s['requests']} requests, max_tokens {s['max_tokens']}, {s['threads']} threads)"
    )
    return "\n".join(rows)
