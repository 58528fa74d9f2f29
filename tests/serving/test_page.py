"""The chat page at ``/`` in a real browser: Debian's headless Chromium, driven by Playwright, against a tiny model
served on loopback with an API key (the browser sends it as HTTP Basic, as a person would type it in the
browser's login prompt). Upload an image, ask, watch the answer stream in; paste an image; the 401 challenge.

A screenshot of the answered page is saved as ``runs/test-artifacts/chat-page.png``. Chromium comes from
Debian's ``chromium`` package (``make test`` installs it); Playwright never downloads a browser here."""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from serving.conftest import API_KEY, MODEL_NAME, make_app, running_server

CHROMIUM = "/usr/bin/chromium"
# As this machine's notes ask: no sandbox (root), no GPU, and none of Chromium's background connections (the
# network is closed: they would be refused, many at a time). Playwright adds a fresh, empty user-data-dir.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "test-artifacts"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Browser:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the chat page test needs Debian's Chromium. Install it with "
            "`apt-get install chromium chromium-driver` (`make test` does this), never with `playwright install`."
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(tiny_served):
    with running_server(make_app(tiny_served)) as url:
        yield url


@pytest.fixture
def page(browser, url) -> Page:
    context = browser.new_context(
        base_url=url,
        http_credentials={"username": "user", "password": API_KEY},
        viewport={"width": 900, "height": 700},
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto("/")
    # The page read /v1/models, with the credentials the browser was asked for at /.
    page.get_by_text(f"model: {MODEL_NAME}").wait_for()
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def png_bytes(color: str = "red", size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


# Records the assistant turn's text each time the page changes it, with the time, from inside the page.
OBSERVE = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const turn = document.querySelector(".turn.assistant, .turn.error");
    if (turn) window.seen.push({ t: performance.now(), text: turn.querySelector("span").textContent,
                                 state: turn.dataset.state });
  }).observe(document.getElementById("log"), { childList: true, subtree: true, characterData: true });
}"""


def test_upload_ask_and_watch_the_answer_stream(page, url, tmp_path, monkeypatch):
    from vlmlab.serving import engine as engine_module

    # One decoding step every 10 ms or more, so that the answer's tokens leave the server at distinct times:
    # the page must show them as they come, not all at once at the end.
    real_step = engine_module.DecodeBatch.step

    def paced_step(self, tokens):
        time.sleep(0.01)
        return real_step(self, tokens)

    monkeypatch.setattr(engine_module.DecodeBatch, "step", paced_step)

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    page.locator("#file").set_input_files(image)
    page.locator("#preview img").wait_for()
    question = "What color is the shape?"
    page.locator("#question").fill(question)
    page.evaluate(OBSERVE)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.get_by_role("button", name="Send").click()
    turn = page.locator(".turn.assistant, .turn.error").last
    page.wait_for_function(
        "() => ['done', 'error'].includes(document.querySelector('.turn:last-child').dataset.state)"
    )
    shown = turn.locator("span").text_content()
    assert turn.get_attribute("data-state") == "done", shown
    assert shown, "the answer is empty"

    # What the page asked for: the uploaded image and the question, streamed, greedy.
    body = sent.value.post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["model"] == MODEL_NAME
    image_part, text_part = body["messages"][-1]["content"]
    assert (
        image_part["image_url"]["url"]
        == "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    )
    assert text_part == {"type": "text", "text": question}
    # The same request, not streamed: the same answer as the page shows.
    r = httpx.post(
        url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={**body, "stream": False},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert shown == r.json()["choices"][0]["message"]["content"]

    # It streamed: the page showed partial answers, growing, at different times, before it was done.
    seen = page.evaluate("window.seen")
    partial = [s for s in seen if s["state"] == "streaming" and 0 < len(s["text"]) < len(shown)]
    assert len({s["text"] for s in partial}) >= 2, f"the answer appeared in too few steps: {seen}"
    assert all(shown.startswith(s["text"]) for s in partial)
    assert partial[-1]["t"] > partial[0]["t"]

    # The question and its image are in the log; the preview is emptied for the next question.
    assert page.locator(".turn.user").last.text_content() == question
    assert page.locator(".turn.user img").count() == 1 and page.locator("#preview img").count() == 0

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    shot.unlink(missing_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as im:
        assert im.width >= 600 and im.height >= 300

    # "New chat" empties the log and the history: the next question goes alone.
    page.get_by_role("button", name="New chat").click()
    assert page.locator("#log .turn").count() == 0
    page.locator("#max-tokens").fill("4")
    page.locator("#question").fill("And now?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.get_by_role("button", name="Send").click()
    assert sent.value.post_data_json["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]}
    ]
    page.locator('.turn.assistant[data-state="done"]').wait_for()


def test_a_pasted_image_is_attached_and_sent(page):
    page.evaluate(
        """async (b64) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const data = new DataTransfer();
          data.items.add(new File([bytes], "pasted.png", { type: "image/png" }));
          document.getElementById("question").dispatchEvent(
            new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
        }""",
        base64.b64encode(png_bytes("blue", (24, 50))).decode(),
    )
    preview = page.locator("#preview img")
    preview.wait_for()
    src = preview.get_attribute("src")
    assert preview.count() == 1 and src.startswith("data:image/png;base64,")
    page.locator("#max-tokens").fill("8")
    page.locator("#question").fill("What color is it?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.get_by_role("button", name="Send").click()
    assert sent.value.post_data_json["messages"][-1]["content"][0]["image_url"]["url"] == src
    page.locator('.turn.assistant[data-state="done"]').wait_for()
    answer = page.locator(".turn.assistant span").text_content()

    # A follow-up question carries the conversation: the question with its image, the answer, the new question.
    page.locator("#question").fill("Are you sure?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.get_by_role("button", name="Send").click()
    first, reply, follow_up = sent.value.post_data_json["messages"]
    assert first["content"][0]["image_url"]["url"] == src
    assert reply == {"role": "assistant", "content": answer}
    assert follow_up["content"] == [{"type": "text", "text": "Are you sure?"}]
    page.locator('.turn[data-state="done"], .turn[data-state="error"]').nth(1).wait_for()


def test_an_api_error_shows_as_one_line(page):
    page.locator("#max-tokens").fill("100000")  # more than the tiny model's context of 128 tokens
    page.locator("#question").fill("What color is the shape?")
    page.get_by_role("button", name="Send").click()
    turn = page.locator('.turn[data-state="error"]')
    turn.wait_for()
    text = turn.text_content()
    assert text.startswith("Error: ") and "\n" not in text and "context" in text.lower(), text
    assert page.locator("#send").is_enabled()


def test_without_the_key_the_page_asks_for_it(browser, url):
    r = httpx.get(url + "/")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic ")
    assert API_KEY not in r.text
    # No credentials: Chromium meets the Basic challenge (a person gets the login prompt); headless, nobody
    # answers it, and the navigation fails on the challenge itself.
    context = browser.new_context()
    try:
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            context.new_page().goto(url + "/")
    finally:
        context.close()
    # A wrong key: the server refuses it (again when the browser retries it), and the browser shows the 401.
    context = browser.new_context(http_credentials={"username": "user", "password": "wrong"})
    try:
        response = context.new_page().goto(url + "/")
        assert response.status == 401 and response.headers["www-authenticate"].startswith("Basic ")
    finally:
        context.close()
