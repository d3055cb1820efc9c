"""End to end in a real browser: Debian's Chromium driven by Playwright, against the app
on a tiny local model. The screenshot of a finished chat lands in artifacts/browser/."""

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "browser"

if not Path(CHROMIUM).exists():
    if os.environ.get("REQUIRE_BROWSER"):
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

import app  # noqa: E402

# The answer bubble of the last assistant turn (not the Thinking / stats blocks).
LAST_ANSWER_JS = """() => {
  const rows = document.querySelectorAll('.bot-row');
  if (!rows.length) return '';
  const parts = rows[rows.length - 1].querySelectorAll('.message:not(.thought) .message-content');
  return Array.from(parts).map(p => p.innerText).join('\\n');
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    yield page
    context.close()


def open_app(page, url):
    page.goto(url)
    page.wait_for_selector("textarea")


def send(page, text, *files):
    if files:
        page.set_input_files("input[type=file]", [str(f) for f in files])
        expect(page.locator(".thumbnail-item, .thumbnails img").first).to_be_visible(timeout=10_000)
    page.locator("textarea").first.fill(text)
    page.keyboard.press("Enter")


def answer_text(page) -> str:
    return page.evaluate(LAST_ANSWER_JS)


def wait_until_idle(page, timeout=60):
    """Until the submit button is back (the answer is complete)."""
    expect(page.locator("button.submit-button")).to_be_visible(timeout=timeout * 1000)


def test_header_upload_streaming_and_stop(serve, idefics3_runner, images, page):
    url, spy = serve(idefics3_runner, max_new_tokens=300)
    open_app(page, url)
    expect(page.get_by_text(idefics3_runner.name).first).to_be_visible()
    expect(page.get_by_text("vision-language · cpu · float32")).to_be_visible()

    send(page, "What is in this picture?", images["red"])
    seen, deadline = [], time.time() + 60
    while time.time() < deadline:
        text = answer_text(page)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        if page.locator("button.submit-button").is_visible() and seen:
            break
        time.sleep(0.01)
    assert len(seen) >= 3, f"the answer should grow in place, saw {len(seen)} states"
    assert all(b.startswith(a[:20]) for a, b in zip(seen, seen[1:]))
    expect(page.locator(".user-row img").first).to_be_visible()
    assert spy.streams[-1].finish_reason == "length"

    # Stop during a long answer: the text stops growing, the app takes the next message
    page.locator("textarea").first.fill("Now tell me a very long story.")
    page.locator("#component-0")  # keep the page busy-free
    spy.streams.clear()
    page.keyboard.press("Enter")
    while not answer_text(page) or not spy.streams:
        time.sleep(0.02)
    time.sleep(0.3)
    page.locator("button.stop-button").click()
    time.sleep(1.0)
    stopped_at = answer_text(page)
    time.sleep(1.0)
    assert answer_text(page) == stopped_at, "the text must stop growing after Stop"
    assert spy.streams[-1].finish_reason == "cancelled" and spy.streams[-1].new_tokens < 300
    send(page, "Short answer please.")
    time.sleep(0.5)
    wait_until_idle(page)
    assert answer_text(page) and answer_text(page) != stopped_at

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    assert (ARTIFACTS / "chat.png").stat().st_size > 10_000


def test_retry_and_saved_conversations_survive_a_reload(serve, idefics3_runner, images, page):
    url, spy = serve(idefics3_runner, max_new_tokens=20)
    open_app(page, url)
    send(page, "first conversation, first question", images["red"])
    time.sleep(0.5)
    wait_until_idle(page)
    calls = len(spy.calls)
    page.locator("button[aria-label=Retry]").last.click()
    time.sleep(0.5)
    wait_until_idle(page)
    assert len(spy.calls) == calls + 1, "retry runs the model again"
    assert spy.calls[-1][0][-1]["content"][-1]["text"] == "first conversation, first question"
    assert answer_text(page)

    page.get_by_role("button", name="New chat").click()
    expect(page.get_by_text("first conversation, first question")).to_have_count(1)  # only in the sidebar
    send(page, "second conversation")
    time.sleep(0.5)
    wait_until_idle(page)

    page.reload()
    page.wait_for_selector("textarea")
    page.get_by_text("first conversation, first").first.click()
    expect(page.locator(".user-row").get_by_text("first conversation, first question")).to_be_visible()
    assert answer_text(page), "the restored conversation shows its answer"
    send(page, "and a follow-up")
    time.sleep(0.5)
    wait_until_idle(page)
    expect(page.locator(".user-row img").first).to_be_visible()  # its image still displays
    history = spy.calls[-1][0]
    assert history[0]["content"][-1]["text"] == "first conversation, first question", \
        "a restored conversation continues with its own history"
    assert history[0]["content"][0]["type"] == "image", "and its image still reaches the model"


def test_a_starter_example_runs_with_its_picture(serve, idefics3_runner, page):
    url, spy = serve(idefics3_runner, max_new_tokens=20)
    open_app(page, url)
    page.get_by_text("Count the shapes").click()
    time.sleep(0.5)
    wait_until_idle(page)
    expect(page.locator(".user-row img").first).to_be_visible()
    assert answer_text(page)
    sent = spy.calls[-1][0][-1]["content"]
    assert sent[0]["type"] == "image" and "shapes" in sent[-1]["text"]


def test_reasoning_shows_a_collapsible_thinking_block(serve, reasoning_runner, page):
    url, spy = serve(reasoning_runner, max_new_tokens=80)
    open_app(page, url)
    send(page, "What is 2+2?")
    time.sleep(0.5)
    wait_until_idle(page)
    thinking = page.locator(".thought-group .title", has_text=app.REASONING_TITLE)
    expect(thinking.first).to_be_visible()
    reasoning, answer, done = spy.streams[-1].parts()
    assert done and reasoning and answer
    assert answer_text(page).strip().startswith(answer.strip()[:10])
    page.screenshot(path=str(ARTIFACTS / "reasoning.png"), full_page=True)
