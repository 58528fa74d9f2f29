"""The ``vlmlab serve`` and ``vlmlab bench-serve`` commands as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from serving.conftest import data_uri, free_port
from vlmlab.api import save


def _serve(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vlmlab.cli", "serve", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_vlmlab_serve_answers_and_keeps_the_key_out_of_its_output(tmp_path, tiny_served):
    model, processor = tiny_served
    save(model, processor, tmp_path / "model")
    port, key = free_port(), "cli-secret-key-42"
    proc = _serve(["--checkpoint", str(tmp_path / "model"), "--port", str(port)], {"VLMLAB_API_KEY": key})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "vlmlab serve did not come up in 60 s"
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"] == "model"
        body = {
            "model": "model",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_uri()}},
                        {"type": "text", "text": "What color is the shape?"},
                    ],
                }
            ],
            "max_tokens": 4,
            "temperature": 0,
        }
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert key not in output
    assert f"serving model at {url}" in output


def test_vlmlab_serve_refuses_a_public_address_without_a_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vlmlab.cli", "serve", "--checkpoint", str(tmp_path), "--host", "0.0.0.0"],
        env={k: v for k, v in os.environ.items() if k != "VLMLAB_API_KEY"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vlmlab: error: --host 0.0.0.0: refusing to serve beyond this machine without an API key "
        "(set VLMLAB_API_KEY)"
    ]


def test_bench_serve_reports_both_modes_with_the_same_token_counts(tiny_served):
    from vlmlab.serving.bench import format_table, run_bench_serve

    model, processor = tiny_served
    result = run_bench_serve(model, processor, concurrency=2, requests=4, max_tokens=4, image_size=32)
    for mode in ("batched", "one_at_a_time"):
        r = result[mode]
        assert r["errors"] == 0 and r["requests"] == 4 and r["output_tokens"] > 0
        assert r["ttft_ms"]["p50"] > 0 and r["output_tokens_per_s"] > 0
    assert result["same_token_counts"] and result["throughput_ratio"] > 0
    assert "batched / one-at-a-time throughput" in format_table(result)
