"""End to end in a real browser: Debian's Chromium driven by Playwright, against the app
on a tiny local model. The screenshot of a finished chat lands in artifacts/browser/."""

import os
import re
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
from tests.conftest import hold_generation, slow_generation, wait_for  # noqa: E402
from tests.test_documents import pdf_with_text  # noqa: E402
from tests.test_media import audio_file  # noqa: E402

# The answer bubble of the last assistant turn: not the blocks with a title (Thinking,
# figures, notes), whose content shows while they are open.
LAST_ANSWER_JS = """() => {
  const rows = document.querySelectorAll('.bot-row');
  if (!rows.length) return '';
  const parts = Array.from(rows[rows.length - 1].querySelectorAll('.message-content'))
    .filter(p => !p.closest('.thought-group'));
  return parts.map(p => p.innerText).join('\\n');
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
        page.set_input_files("#chat-input input[type=file]", [str(f) for f in files])
        expect(page.locator(".thumbnail-item, .thumbnails img").first).to_be_visible(timeout=10_000)
    page.locator("#chat-input textarea").fill(text)
    page.keyboard.press("Enter")


def answer_text(page) -> str:
    return page.evaluate(LAST_ANSWER_JS)


def wait_until_idle(page, timeout=60):
    """Until the submit button is back (the answer is complete)."""
    expect(page.locator("button.submit-button")).to_be_visible(timeout=timeout * 1000)


def answered(page, spy, act, timeout=60):
    """Do `act` (send, retry, edit...), then wait until the model's answer to it has ended and
    the page is idle again. Returns the engine's stream."""
    before = len(spy.streams)
    act()
    wait_for(lambda: len(spy.streams) > before and spy.streams[-1].join(0), timeout, "the answer to end")
    wait_until_idle(page, timeout)
    return spy.streams[-1]


def figures_shown(page) -> str:
    """The live figures line of the last answer ("⏱ 12 tokens · ..."), or ""."""
    line = page.locator(".thought-group .title", has_text=app.STATS_PREFIX)
    return line.last.inner_text() if line.count() else ""


def saved_texts(spy) -> list[tuple[str, str]]:
    """(role, text) of each message of the one conversation saved in this test's store."""
    store = spy.chats.store
    ((user, conversation),) = store._db.execute("SELECT user, id FROM conversations").fetchall()
    return [(m["role"], app.text_of(m)) for m in store.messages(user, conversation)]


def test_header_upload_streaming_and_stop(serve, idefics3_runner, images, page):
    url, spy = serve(idefics3_runner, max_new_tokens=300)
    open_app(page, url)
    expect(page.get_by_text(idefics3_runner.name).first).to_be_visible()
    expect(page.get_by_text("vision-language · cpu · float32")).to_be_visible()

    seen, deadline = [], time.time() + 60
    with pytest.MonkeyPatch.context() as patch:
        slow_generation(patch, idefics3_runner.model)  # (a pace the page can be watched at, under any load)
        send(page, "What is in this picture?", images["red"])
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

    # Stop during a long answer (held after 30 tokens): generation ends, the app takes the next message
    with pytest.MonkeyPatch.context() as patch:
        release = hold_generation(patch, idefics3_runner.model, after_calls=30)
        send(page, "Now tell me a very long story.")
        wait_for(lambda: len(spy.streams) == 2 and answer_text(page) and answer_text(page) != seen[-1], 30,
                 "the second answer to show")
        page.locator("button.stop-button").click()
        stream = spy.streams[-1]
        wait_for(lambda: stream.closed_at is not None, 10, "Stop to reach the engine")
        release.set()
        assert stream.join(10) and stream.finish_reason == "cancelled" and stream.tokens_after_close <= 1
    stopped_at = answer_text(page)
    assert stopped_at and " ".join(stream.text.split()).startswith(" ".join(stopped_at.split())[:10]), \
        "the stopped answer stays"
    role, saved = saved_texts(spy)[-1]
    assert role == "assistant" and saved and stream.text.startswith(saved), "the stopped answer is saved"
    assert " ".join(saved.split()) == " ".join(stopped_at.split()), "as it was shown"
    answered(page, spy, lambda: send(page, "Short answer please."))
    assert answer_text(page) and answer_text(page) != stopped_at

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    assert (ARTIFACTS / "chat.png").stat().st_size > 10_000


def test_live_figures_and_closing_the_tab_mid_answer(serve, long_answer_engine_process, page):
    """The figures line shows under the answer and grows as it streams; closing the tab
    stops generation in the engine process within a token."""
    url, spy = serve(long_answer_engine_process, max_new_tokens=4000)
    open_app(page, url)
    send(page, "Tell me a very long story.")
    counts = set()

    def figures_grew():
        shown = figures_shown(page)
        if shown:
            counts.add(int(shown.split(app.STATS_PREFIX)[1].split(" tokens")[0]))
        return len(counts) >= 3 and "tokens/s" in shown and "first token after" in shown
    wait_for(figures_grew, 60, "the live figures to update", interval=0.05)
    assert answer_text(page)
    stream = spy.streams[-1]
    page.close()
    assert stream.join(10), "closing the tab must stop generation"
    assert stream.finish_reason == "cancelled" and stream.new_tokens < 4000
    assert stream.tokens_after_close <= 1


CHAT_SCROLL_JS = """() => { const chat = document.querySelector('#chat .bubble-wrap');
  return chat.scrollHeight - chat.clientHeight - chat.scrollTop; }"""  # (how far above the bottom it shows)


def test_a_reader_who_scrolls_up_mid_answer_stays_there(serve, llama_runner, page):
    """Scrolled up while an answer streams, the chat stays where the reader put it (Gradio
    alone pulled it back to the bottom at every update), with the "Scroll down" button showing;
    back at the bottom, by the wheel or that button, it follows again."""
    url, spy = serve(llama_runner, max_new_tokens=2000)
    with pytest.MonkeyPatch.context() as patch:
        slow_generation(patch, llama_runner.model, seconds_per_token=0.03)
        open_app(page, url)
        send(page, "Tell me a long story.")
        wait_for(lambda: page.evaluate("() => document.querySelector('#chat .bubble-wrap').scrollHeight") >
                 page.evaluate("() => document.querySelector('#chat .bubble-wrap').clientHeight") + 450,
                 60, "the answer to fill more than the chat's height")
        box = page.locator("#chat .bubble-wrap").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -400)
        wait_for(lambda: page.evaluate(CHAT_SCROLL_JS) > 300, 5, "the wheel to scroll the chat up")
        above = []
        for _ in range(10):  # ~30 updates: each would have pulled it down
            time.sleep(0.1)
            above.append(page.evaluate(CHAT_SCROLL_JS))
        assert spy.streams[-1].ended_at is None, "the answer was still streaming"
        assert min(above) > 300, f"the chat stays where the reader scrolled it ({above} px above the bottom)"
        expect(page.locator(".scroll-down-button-container button")).to_be_visible(timeout=5000)
        for back_down in (lambda: page.mouse.wheel(0, 100_000), page.locator(".scroll-down-button-container button").click):
            back_down()  # the wheel, then the "Scroll down" button: it follows the answer again
            wait_for(lambda: page.evaluate(CHAT_SCROLL_JS) < 30, 5, "the chat to be scrolled down")
            grown = page.evaluate("() => document.querySelector('#chat .bubble-wrap').scrollHeight")
            wait_for(lambda: page.evaluate("() => document.querySelector('#chat .bubble-wrap').scrollHeight") >
                     grown + 60, 30, "the answer to grow")
            assert spy.streams[-1].ended_at is None, "the answer was still streaming"
            wait_for(lambda: page.evaluate(CHAT_SCROLL_JS) < 100, 5, "the chat to follow the answer again")
            page.mouse.wheel(0, -400)
            wait_for(lambda: page.evaluate(CHAT_SCROLL_JS) > 300, 5, "the wheel to scroll the chat up")
            time.sleep(0.5)
        spy.streams[-1].close()


def test_undo_puts_the_text_and_images_back_in_the_input_box(serve, idefics3_runner, images, page):
    url, spy = serve(idefics3_runner, max_new_tokens=10)
    open_app(page, url)
    answered(page, spy, lambda: send(page, "Look at these two.", images["red"], images["noise"]))
    page.locator("button[aria-label=Undo]").last.click()
    expect(page.locator(".user-row")).to_have_count(0)
    expect(page.locator("textarea").first).to_have_value("Look at these two.")
    thumbnails_in_input = """() => Array.from(document.querySelectorAll('.thumbnail-item'))
        .filter(t => !t.closest('.message-row')).length"""
    wait_for(lambda: page.evaluate(thumbnails_in_input) == 2, 10, "both images back in the input box")
    answered(page, spy, lambda: page.locator("button.submit-button").click())
    sent = spy.calls[-1][0]
    assert len(sent) == 1 and [p["type"] for p in sent[0]["content"]] == ["image", "image", "text"]


def test_edit_runs_the_chat_again_from_the_edited_message(serve, llama_runner, page):
    url, spy = serve(llama_runner, max_new_tokens=10)
    open_app(page, url)
    first = answered(page, spy, lambda: send(page, "First question."))
    answered(page, spy, lambda: send(page, "Second question."))
    page.locator(".user-row").last.hover()
    page.locator("button[aria-label=Edit]").last.click()
    page.locator("textarea.edit-textarea").fill("Second question, edited.")
    answered(page, spy, lambda: page.locator("button.icon-button[aria-label=Submit]").click())
    sent = spy.calls[-1][0]
    assert [(m["role"], m["content"][0]["text"]) for m in sent] == [
        ("user", "First question."), ("assistant", first.text), ("user", "Second question, edited.")]
    expect(page.locator(".user-row")).to_have_count(2)
    expect(page.locator(".user-row").last).to_contain_text("Second question, edited.")


def test_retry_and_saved_conversations_survive_a_reload(serve, idefics3_runner, images, page):
    url, spy = serve(idefics3_runner, max_new_tokens=20)
    open_app(page, url)
    answered(page, spy, lambda: send(page, "first conversation, first question", images["red"]))
    calls = len(spy.calls)
    answered(page, spy, lambda: page.locator("button[aria-label=Retry]").last.click())
    assert len(spy.calls) == calls + 1, "retry runs the model again"
    assert spy.calls[-1][0][-1]["content"][-1]["text"] == "first conversation, first question"
    assert answer_text(page)

    page.get_by_role("button", name="New chat").click()
    expect(page.get_by_text("first conversation, first question")).to_have_count(1)  # only in the sidebar
    answered(page, spy, lambda: send(page, "second conversation"))

    page.reload()
    page.wait_for_selector("textarea")
    page.get_by_text("first conversation, first").first.click()
    expect(page.locator(".user-row").get_by_text("first conversation, first question")).to_be_visible()
    assert answer_text(page), "the restored conversation shows its answer"
    answered(page, spy, lambda: send(page, "and a follow-up"))
    expect(page.locator(".user-row img").first).to_be_visible()  # its image still displays
    history = spy.calls[-1][0]
    assert history[0]["content"][-1]["text"] == "first conversation, first question", \
        "a restored conversation continues with its own history"
    assert history[0]["content"][0]["type"] == "image", "and its image still reaches the model"


def test_the_settings_typed_in_the_panel_survive_a_reload_and_reach_the_model(serve, llama_runner, page):
    url, spy = serve(llama_runner, max_new_tokens=20)
    open_app(page, url)
    page.get_by_text("Settings", exact=True).first.click()
    typed = {"System prompt": "Answer like a pirate.", "number input for Max new tokens": "7",
             "number input for Temperature (0 = greedy)": "0.5", "number input for Top-p": "0.9"}
    def kept():  # (what the browser keeps: encrypted, so only compared)
        return page.evaluate("() => localStorage.getItem('local-model-chat-settings')")
    first = kept()
    for label, value in typed.items():
        page.get_by_label(label, exact=True).fill(value)
        page.get_by_label(label, exact=True).press("Tab")
    writes = [(time.monotonic(), first)]

    def settled():  # (each edit keeps all four: done when it has stopped changing for a while)
        now = kept()
        if now != writes[-1][1]:
            writes.append((time.monotonic(), now))
        return len(writes) > 1 and time.monotonic() - writes[-1][0] > 2
    wait_for(settled, 30, "the values to be kept in the browser", interval=0.1)
    page.reload()
    page.wait_for_selector("textarea")
    page.get_by_text("Settings", exact=True).first.click()
    for label, value in typed.items():
        expect(page.get_by_label(label, exact=True)).to_have_value(value)
    answered(page, spy, lambda: send(page, "hello"))
    messages, generation = spy.calls[-1]
    assert messages[0]["content"][0]["text"] == "Answer like a pirate."
    assert (generation.max_new_tokens, generation.temperature, generation.top_p) == (7, 0.5, 0.9)


def test_delete_from_the_list_and_it_stays_deleted(serve, llama_runner, page):
    url, spy = serve(llama_runner, max_new_tokens=5)
    open_app(page, url)
    answered(page, spy, lambda: send(page, "conversation to delete"))
    page.get_by_role("button", name="New chat").click()
    answered(page, spy, lambda: send(page, "conversation to keep"))
    chats = page.locator("#chat-list")
    expect(chats.get_by_text("conversation to delete")).to_have_count(1)
    chats.get_by_text("conversation to delete").click()
    expect(page.locator(".user-row").get_by_text("conversation to delete")).to_be_visible()
    page.get_by_text("This chat").click()
    page.get_by_role("button", name="🗑 Delete").click()
    page.get_by_role("button", name="Keep it").click()  # asked first: no, keep it
    expect(chats.get_by_text("conversation to delete")).to_have_count(1)
    expect(page.locator(".user-row").get_by_text("conversation to delete")).to_be_visible()
    page.get_by_role("button", name="🗑 Delete").click()
    page.get_by_role("button", name="Delete it").click()
    expect(chats.get_by_text("conversation to delete")).to_have_count(0)
    expect(page.locator(".user-row")).to_have_count(0)
    page.reload()
    page.wait_for_selector("#chat-input textarea")
    expect(chats.get_by_text("conversation to keep")).to_have_count(1)
    expect(page.get_by_text("conversation to delete")).to_have_count(0)


def test_a_refused_action_says_why_and_the_chat_stays_on_screen(serve, llama_runner, page):
    """An instant action refused by the server (here the per-user chat limit; the same for a
    busy chat, a chat deleted in another tab, a bad import): its message shows, and the
    chat, the list and the typed text stay as they were (Gradio 6.31 showed no message for
    these and covered the chat with an "Error" mark)."""
    url, spy = serve(llama_runner, max_new_tokens=5, max_saved_chats_per_user=1)
    open_app(page, url)
    answered(page, spy, lambda: send(page, "the one chat I may keep"))
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".user-row")).to_have_count(0)
    send(page, "a second chat")
    expect(page.get_by_text("1 saved conversations, the most this server keeps")).to_be_visible(timeout=10_000)
    expect(page.locator("#chat-input textarea")).to_have_value("a second chat")
    expect(page.locator("#chat-list").get_by_text("the one chat I may keep")).to_be_visible()
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)
    page.locator("#chat-list").get_by_text("the one chat I may keep").click()
    expect(page.locator(".user-row").get_by_text("the one chat I may keep")).to_be_visible()
    assert len(spy.streams) == 1, "nothing was sent to the model"


def test_an_edit_in_a_tab_showing_an_old_chat_is_refused_and_the_chat_shown_as_it_is(serve, llama_runner, page):
    """Two tabs: the second shows m1, m2; the first undoes m2 and sends m3. Editing m2 in the
    second tab would replace m3, which it never showed: it says why, changes nothing, and
    shows the chat as it is."""
    url, spy = serve(llama_runner, max_new_tokens=5)
    open_app(page, url)
    answered(page, spy, lambda: send(page, "m1 alpha"))
    answered(page, spy, lambda: send(page, "m2 beta"))
    other = page.context.new_page()  # (the same browser: the same user, the open chat)
    open_app(other, url)
    expect(other.locator(".user-row").last).to_contain_text("m2 beta", timeout=15_000)  # (a loaded machine)
    page.locator("button[aria-label=Undo]").last.click()
    expect(page.locator(".user-row")).to_have_count(1)
    answered(page, spy, lambda: send(page, "m3 gamma"))
    saved, answers = saved_texts(spy), len(spy.streams)
    other.locator(".user-row").last.hover()
    other.locator("button[aria-label=Edit]").last.click()
    other.locator("textarea.edit-textarea").fill("m2 beta, edited")
    other.locator("button.icon-button[aria-label=Submit]").click()
    expect(other.get_by_text("This chat was changed meanwhile")).to_be_visible(timeout=10_000)
    expect(other.locator(".user-row").last).to_contain_text("m3 gamma")
    expect(other.locator(".user-row")).to_have_count(2)
    expect(other.get_by_text("Error", exact=True)).to_have_count(0)
    assert saved_texts(spy) == saved and len(spy.streams) == answers, "nothing changed, nothing ran"
    other.close()


def test_a_message_the_app_never_answered_says_so_and_can_be_retried(serve, llama_runner, page):
    """The app was killed while answering: opened again, the last message shows a note that it
    got no answer, with Retry and Undo; Retry answers it."""
    url, spy = serve(llama_runner, max_new_tokens=5)
    open_app(page, url)
    answered(page, spy, lambda: send(page, "a finished turn"))
    store = spy.chats.store
    ((user, conversation),) = store._db.execute("SELECT user, id FROM conversations").fetchall()
    store.append(user, conversation, [{"role": "user", "content": [{"type": "text", "text": "never answered"}]}])
    page.reload()
    expect(page.locator(".user-row").last).to_contain_text("never answered")
    expect(page.get_by_text(app.NO_ANSWER)).to_be_visible()
    expect(page.locator("button[aria-label=Undo]").last).to_be_visible()
    answered(page, spy, lambda: page.locator("button[aria-label=Retry]").last.click())
    expect(page.get_by_text(app.NO_ANSWER)).to_have_count(0)
    assert saved_texts(spy)[2:] == [("user", "never answered"), ("assistant", spy.streams[-1].text)]
    assert [m["role"] for m in spy.calls[-1][0]] == ["user", "assistant", "user"]


def test_new_chat_mid_answer_keeps_the_conversation_before_it(serve, llama_runner, page):
    """New chat while the answer streams: the answer stops, and the conversation (the message
    and what was shown of the answer) is in the list, whole."""
    url, spy = serve(llama_runner, max_new_tokens=300)
    open_app(page, url)
    with pytest.MonkeyPatch.context() as patch:
        release = hold_generation(patch, llama_runner.model, after_calls=20)
        send(page, "a message I must not lose")
        wait_for(lambda: answer_text(page), 30, "the answer to start")
        page.get_by_role("button", name="New chat").click()
        stream = spy.streams[-1]
        wait_for(lambda: stream.closed_at is not None, 10, "New chat to stop the answer")
        release.set()
    expect(page.locator(".user-row")).to_have_count(0)
    chats = page.locator("#chat-list")
    expect(chats.get_by_text("a message I must not lose")).to_have_count(1)
    chats.get_by_text("a message I must not lose").click()
    expect(page.locator(".user-row").get_by_text("a message I must not lose")).to_be_visible()
    assert answer_text(page), "what was shown of the answer is kept"


def test_a_conversation_and_its_image_survive_a_restart_of_the_app(idefics3_runner, images, page, tmp_path):
    """Chat with an image, stop the app, start it again on the same data directory: the same
    browser finds the conversation in the list, its image and answer, and goes on with it."""
    from tests.conftest import StreamSpy, free_port
    port, data = free_port(), tmp_path / "data"
    spy = StreamSpy(idefics3_runner)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(idefics3_runner, "stream", spy)
        demo, url = app.serve(idefics3_runner, host="127.0.0.1", port=port, block=False, quiet=True,
                              data_dir=str(data), max_new_tokens=12)
        try:
            open_app(page, url)
            answered(page, spy, lambda: send(page, "What colour is this?", images["red"]))
            first_answer = spy.streams[-1].text
            page.get_by_role("button", name="New chat").click()
        finally:
            demo.close()
        demo, url = app.serve(idefics3_runner, host="127.0.0.1", port=port, block=False, quiet=True,
                              data_dir=str(data), max_new_tokens=12)
        try:
            page.reload()
            page.wait_for_selector("#chat-input textarea")
            chats = page.locator("#chat-list")
            expect(chats.get_by_text("What colour is this?")).to_have_count(1)
            chats.get_by_text("What colour is this?").click()
            expect(page.locator(".user-row img").first).to_be_visible()
            assert answer_text(page).strip()[:8] == first_answer.strip()[:8]
            answered(page, spy, lambda: send(page, "And now?"))
            sent = spy.calls[-1][0]
            assert [m["role"] for m in sent] == ["user", "assistant", "user"]
            assert sent[0]["content"][0]["type"] == "image", "the saved image reaches the model again"
            page.screenshot(path=str(ARTIFACTS / "saved-chats.png"), full_page=True)
        finally:
            demo.close()


def test_on_a_phone_the_list_folds_away_and_the_chat_starts_at_the_top(serve, llama_runner, browser):
    url, spy = serve(llama_runner, max_new_tokens=5)
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone = context.new_page()
    try:
        open_app(phone, url)
        answered(phone, spy, lambda: send(phone, "hello from a phone"))
        time.sleep(0.5)
        assert not phone.locator("#chat-list").is_visible() or \
            phone.locator("#chat-list").bounding_box()["x"] + phone.locator("#chat-list").bounding_box()["width"] <= 0, \
            "the list is folded away"
        assert phone.locator("#chat").bounding_box()["y"] < 300, "the chat starts near the top of the screen"
        phone.get_by_role("button", name="Toggle Sidebar").click()
        expect(phone.locator("#chat-list").get_by_text("hello from a phone")).to_be_in_viewport()
        phone.screenshot(path=str(ARTIFACTS / "phone-list.png"))
    finally:
        context.close()


def test_on_a_phone_choosing_a_chat_or_a_new_one_folds_the_list_away(serve, llama_runner, browser):
    url, spy = serve(llama_runner, max_new_tokens=5)
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone = context.new_page()
    chat_list = phone.locator("#chat-list")

    def folded():
        box = chat_list.bounding_box()
        return not chat_list.is_visible() or box is None or box["x"] + box["width"] <= 0

    try:
        open_app(phone, url)
        answered(phone, spy, lambda: send(phone, "hello from a phone"))
        for choose, shown in ((lambda: phone.get_by_role("button", name="New chat").click(), False),
                              (lambda: chat_list.get_by_text("hello from a phone").click(), True)):
            phone.evaluate("window.scrollTo(0, 0)")
            phone.get_by_role("button", name="Toggle Sidebar").click()
            expect(chat_list.get_by_text("hello from a phone")).to_be_in_viewport()
            choose()
            wait_for(folded, 10, "the list to fold away")
            wait_for(lambda: ("hello from a phone" in phone.locator("#chat").inner_text()) == shown, 10, "the chat chosen")
    finally:
        context.close()


def test_a_starter_example_runs_with_its_picture(serve, idefics3_runner, page):
    url, spy = serve(idefics3_runner, max_new_tokens=20)
    open_app(page, url)
    answered(page, spy, lambda: page.get_by_text("Count the shapes").click())
    expect(page.locator(".user-row img").first).to_be_visible()
    assert answer_text(page)
    sent = spy.calls[-1][0][-1]["content"]
    assert sent[0]["type"] == "image" and "shapes" in sent[-1]["text"]


def test_reasoning_shows_in_its_own_thinking_block(serve, reasoning_runner, page):
    url, spy = serve(reasoning_runner, max_new_tokens=80)
    open_app(page, url)
    stream = answered(page, spy, lambda: send(page, "What is 2+2?"))
    reply = stream.reply
    reasoning, answer, done = reply.reasoning, reply.answer, reply.reasoning_done
    assert done and reasoning and answer
    expect(page.locator(".thought-group .title", has_text=app.REASONING_TITLE).first).to_be_visible()
    assert answer_text(page).strip().startswith(answer.strip()[:10])
    assert reasoning.strip()[:10] not in answer_text(page), "the reasoning is not part of the answer"
    page.screenshot(path=str(ARTIFACTS / "reasoning.png"), full_page=True)


def test_a_tool_call_shows_as_its_own_message_then_the_answer(serve, tiny_model_paths, tmp_path, page):
    from model_runner import ModelRunner
    from tools import Toolbox
    tools_file = tmp_path / "weather.py"
    tools_file.write_text('def get_weather(city: str) -> str:\n    """The weather.\n\n    Args:\n'
                          '        city: A city.\n    """\n    return f"12 °C and sunny in {city}"\n')
    runner = ModelRunner.load(str(tiny_model_paths["tools"]), device="cpu")
    url, spy = serve(runner, max_new_tokens=20, toolbox=Toolbox.load([str(tools_file)]))
    open_app(page, url)
    expect(page.get_by_text("🛠 tools: get_weather")).to_be_visible()
    answered(page, spy, lambda: send(page, "What's the weather in Paris?"))
    wait_for(lambda: len(spy.streams) == 2 and spy.streams[-1].join(0), 60, "the answer after the tool")
    wait_until_idle(page)
    call = page.locator(".thought-group .title", has_text="🛠 get_weather")
    expect(call).to_have_count(1)
    call.click()  # open it: the arguments and the result are inside
    expect(page.get_by_text("12 °C and sunny in Paris")).to_be_visible()
    answer = answer_text(page)
    assert answer and "<tool_call>" not in page.content()
    assert spy.streams[-1].text.strip().startswith(answer.strip()[:10])
    page.screenshot(path=str(ARTIFACTS / "tools.png"), full_page=True)


# ---------------------------------------------------------------- documents and audio (issue 23)

def file_chip(page, name):
    """A document in a user's message: Gradio's chatbot draws a file message as a link
    (a[data-testid=chatbot-file], download=its orig_name) whose text is the file's name."""
    return page.locator(".user-row").get_by_role("link", name=name)


def audio_players(page):
    """The players in the users' messages: an audio file message is Gradio's minimal audio
    player (a waveform, its own Play button and the duration), not an <audio> element."""
    return page.locator(".user-row [data-testid=waveform-Audio]")


def test_a_document_shows_as_a_chip_with_its_name_and_the_model_reads_it(serve, llama_runner, page, tmp_path):
    url, spy = serve(llama_runner, max_new_tokens=10)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(pdf_with_text("Quarterly revenue rose"))
    open_app(page, url)
    answered(page, spy, lambda: send(page, "Summarise it", pdf))

    chip = file_chip(page, "report.pdf")
    expect(chip).to_be_visible()
    expect(chip).to_have_attribute("download", "report.pdf")
    expect(page.locator(".user-row").last).to_contain_text("Summarise it")
    assert page.request.get(chip.get_attribute("href")).body() == pdf.read_bytes(), "the chip downloads the file"
    expect(page.get_by_text("Quarterly revenue rose")).to_have_count(0)
    assert "Quarterly revenue rose" not in page.content(), "the chat shows the file, never its text"
    assert answer_text(page)
    sent = spy.calls[-1][0][-1]["content"]
    assert [part["type"] for part in sent] == ["document", "text"] and sent[0]["name"] == "report.pdf", \
        "the model is given the document"

    page.reload()
    page.wait_for_selector("#chat-input textarea")
    expect(file_chip(page, "report.pdf")).to_be_visible()  # the saved chat, reopened
    expect(page.locator(".user-row").last).to_contain_text("Summarise it")
    assert "Quarterly revenue rose" not in page.content()


@pytest.fixture(scope="module")
def audio_runner(tiny_model_paths):
    from model_runner import ModelRunner
    runner = ModelRunner.load(str(tiny_model_paths["audio"]), device="cpu")
    yield runner
    runner.close()


def test_the_microphone_records_a_voice_message_that_is_sent_with_a_player(serve, audio_runner, browser, tmp_path):
    """Chromium's fake microphone plays a 440 Hz tone: recorded with the textbox's microphone,
    it is sent as audio, shown with a player, and given to a model that listens as audio."""
    import numpy as np

    import attachments
    tone = tmp_path / "tone.wav"
    tone.write_bytes(audio_file(".wav", seconds=3.0, hertz=(440.0,)))
    url, spy = serve(audio_runner, max_new_tokens=10)
    microphone = browser.browser_type.launch(  # (a browser of its own: the fake devices are launch options)
        executable_path=CHROMIUM,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--use-fake-ui-for-media-stream",
              "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={tone}"])
    try:
        context = microphone.new_context(viewport={"width": 1200, "height": 1000}, permissions=["microphone"])
        page = context.new_page()
        open_app(page, url)
        box = page.locator("#chat-input")
        box.get_by_role("button", name="Record audio").click()
        box.get_by_role("button", name="Start recording").click()
        expect(box.get_by_role("button", name="Stop recording")).to_be_visible()
        time.sleep(1.5)
        box.get_by_role("button", name="Stop recording").click()
        box.get_by_role("button", name="Attach audio").click()  # (the recording, played back first if wished)
        expect(box.locator(".thumbnail-item")).to_have_count(1)

        def voice_message():
            box.locator("textarea").fill("What do you hear?")
            page.keyboard.press("Enter")
        answered(page, spy, voice_message)

        user = page.locator(".user-row").last
        expect(user.locator("[data-testid=waveform-Audio]")).to_be_visible()
        expect(user.get_by_role("button", name="Play")).to_be_visible()
        expect(user.locator("[data-testid=waveform-Audio] .timestamp")).to_have_text(re.compile(r"^0:0[1-9]$"))
        expect(user).to_contain_text("What do you hear?")
        assert answer_text(page)
        expect(page.locator(".thought-group .title", has_text=app.ERROR_TITLE)).to_have_count(0)
        expect(page.locator(".thought-group .title", has_text=app.NOTE_TITLE)).to_have_count(0)

        sent = spy.calls[-1][0][-1]["content"]
        assert [part["type"] for part in sent] == ["audio", "text"], "the model that listens gets the audio itself"
        heard = attachments.audio_of(sent[0], 16000)
        assert heard.seconds > 0.5
        spectrum = np.abs(np.fft.rfft(heard.samples))
        assert abs(np.argmax(spectrum) * 16000 / len(heard.samples) - 440) < 10, "what the microphone heard: the tone"

        # then a document: the finished chat shows the player and the chip
        report = tmp_path / "report.pdf"
        report.write_bytes(pdf_with_text("Quarterly revenue rose"))
        answered(page, spy, lambda: send(page, "And read this report.", report))
        expect(file_chip(page, "report.pdf")).to_be_visible()
        expect(audio_players(page)).to_have_count(1)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "attachments.png"), full_page=True)
        context.close()
    finally:
        microphone.close()


def test_a_message_with_a_file_shows_no_edit_pencil(serve, llama_runner, page, tmp_path):
    """Gradio 6.31's page never sends the edit of a message that carries a file (an image, a
    document...): the edited text was dropped without a word. Such a message shows no pencil
    (Gradio shows it when a message's last part is text); undo still takes it back."""
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\nThe meeting is on Tuesday.\n")
    url, spy = serve(llama_runner, max_new_tokens=5)
    open_app(page, url)
    answered(page, spy, lambda: send(page, "summarise this", notes))
    answered(page, spy, lambda: send(page, "and this, without a file"))
    with_file, plain = page.locator(".user-row").first, page.locator(".user-row").last
    expect(with_file).to_contain_text("summarise this")
    expect(with_file).to_contain_text("notes.md")
    for row, pencils in ((plain, 1), (with_file, 0)):
        row.hover()  # (a message's buttons are the block after it)
        expect(row.locator("xpath=following-sibling::div[1]").locator("button[aria-label=Edit]")).to_have_count(pencils)
