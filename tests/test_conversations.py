"""A turn that was refused or failed never blocks the conversation: every kind of refusal,
then a normal message in the same conversation, through the UI endpoint (history kept by
the server, as for the browser) and through /v1 (the client sends the history again)."""

import base64
import functools
import threading
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from conversation import for_the_model
from tests.conftest import break_forward, wait_for
from tests.test_app import chat, error_of, message, text_of
from tests.test_reliability import long_text

FOLLOW_UP = "Describe a dog."


def block_first_forward(patch, model):
    """Hold the model's first forward (the prefill) until released: the answer has no text
    yet. Returns (entered, release) events."""
    real_forward, entered, release, calls = model.forward, threading.Event(), threading.Event(), [0]

    @functools.wraps(real_forward)
    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            entered.set()
            release.wait(30)
        return real_forward(*args, **kwargs)

    patch.setattr(model, "forward", forward)
    return entered, release


def refuse_in_ui(kind, client, runners, images, patch, spy):
    """Send the refused or failed turn of this kind through /chat; returns its text."""
    if kind == "too long":
        text = long_text(runners["llama"], runners["llama"].context_length + 300)
        assert "This message is too long" in error_of(chat(client, message(text)).result(timeout=60))
    elif kind == "bad image":
        text = "What is in this broken picture?"
        assert "not a readable image" in error_of(chat(client, message(text, images["truncated"])).result(timeout=60))
    elif kind == "not an image":
        text = "What is in this text file named .png?"
        assert "not what its name says" in error_of(chat(client, message(text, images["fake"])).result(timeout=60))
    elif kind == "image to a text-only model":
        text = "What colour is this?"
        assert "can't see images" in error_of(chat(client, message(text, images["red"])).result(timeout=60))
    elif kind == "empty":
        text = "   "
        assert "empty" in error_of(chat(client, message(text)).result(timeout=60))
    elif kind == "generation error":
        text = "This one fails inside the model."
        break_forward(patch, runners["llama"].model, RuntimeError("device lost"), on_call=1)
        assert "device lost" in error_of(chat(client, message(text), max_new_tokens=20).result(timeout=60))
    elif kind == "stop before any text":
        text = "Stopped before the first word."
        entered, release = block_first_forward(patch, runners["llama"].model)
        job = chat(client, message(text), max_new_tokens=200)
        assert entered.wait(30), "generation never started"
        job.cancel()
        wait_for(lambda: spy.streams and spy.streams[-1].closed_at is not None, 10, "Stop to reach the engine")
        release.set()
        assert spy.streams[-1].join(10) and spy.streams[-1].finish_reason == "cancelled"
        wait_for(job.done, 10, "the stopped job to end")
    return text


UI_KINDS = ["too long", "bad image", "not an image", "image to a text-only model", "empty",
            "generation error", "stop before any text"]


@pytest.mark.parametrize("kind", UI_KINDS)
def test_a_refused_turn_in_the_ui_never_blocks_the_next(serve, llama_runner, idefics3_runner, images, kind):
    runner = idefics3_runner if "image" in kind and "text-only" not in kind else llama_runner
    url, spy = serve(runner)
    client = Client(url, verbose=False)
    first = text_of(chat(client, message("Hello there."), max_new_tokens=8).result(timeout=60))
    assert first
    with pytest.MonkeyPatch.context() as patch:  # the model works again after it
        refused = refuse_in_ui(kind, client, {"llama": llama_runner}, images, patch, spy)
    result = chat(client, message(FOLLOW_UP), max_new_tokens=8).result(timeout=60)
    assert text_of(result) and not error_of(result), f"the follow-up after '{kind}' must be answered"
    # what the model saw: the first exchange and the follow-up; nothing of the refused turn
    seen = spy.calls[-1][0]
    assert [m["role"] for m in seen] == ["user", "assistant", "user"]
    assert seen[0]["content"] == [{"type": "text", "text": "Hello there."}]
    assert seen[1]["content"] == [{"type": "text", "text": first}]
    assert seen[2]["content"] == [{"type": "text", "text": FOLLOW_UP}], f"{refused[:40]!r} must be left out"
    client.close()


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def post(url, messages, **extra):
    return httpx.post(url + "v1/chat/completions", json={"messages": messages, "max_tokens": 8,
                                                         "temperature": 0, **extra}, timeout=60)


API_KINDS = {  # the refused message, the status it gets
    "too long": (lambda r, i: long_text(r["llama"], r["llama"].context_length + 300), 400),
    "bad image": (lambda r, i: [{"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": data_url(i["truncated"])}}], 400),
    "not an image": (lambda r, i: [{"type": "text", "text": "And this?"}, {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"just some text").decode()}}], 400),
    "image by http URL": (lambda r, i: [{"type": "text", "text": "Fetch this."}, {
        "type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}], 400),
    "image to a text-only model": (lambda r, i: [{"type": "text", "text": "What colour?"},
                                                 {"type": "image_url", "image_url": {"url": data_url(i["red"])}}], 400),
    "empty": (lambda r, i: "   ", 400),
    "generation error": (lambda r, i: "This one fails inside the model.", 500),
}


@pytest.mark.parametrize("kind", list(API_KINDS))
def test_a_refused_request_sent_again_in_the_history_never_blocks_the_next(serve, llama_runner, idefics3_runner,
                                                                        images, kind):
    runner = idefics3_runner if kind in ("bad image", "not an image", "image by http URL") else llama_runner
    url, spy = serve(runner)
    build, status = API_KINDS[kind]
    history = [{"role": "user", "content": "Hello there."}]
    first = post(url, history)
    assert first.status_code == 200
    history.append({"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]})
    refused = {"role": "user", "content": build({"llama": llama_runner}, images)}
    with pytest.MonkeyPatch.context() as patch:
        if kind == "generation error":
            break_forward(patch, runner.model, RuntimeError("device lost"), on_call=1)
        response = post(url, history + [refused])
    assert response.status_code == status, response.text
    # a client that keeps the refused message in its history and asks again
    follow_up = post(url, history + [refused, {"role": "user", "content": FOLLOW_UP}])
    assert follow_up.status_code == 200, f"after '{kind}': {follow_up.text}"
    assert follow_up.json()["choices"][0]["message"]["content"]
    assert spy.calls[-1][0][-1]["content"][-1] == {"type": "text", "text": FOLLOW_UP}


def test_an_api_stream_stopped_before_any_text_leaves_the_conversation_usable(serve, llama_runner):
    url, spy = serve(llama_runner)
    stopped = "Stopped before the first word."
    with pytest.MonkeyPatch.context() as patch:
        entered, release = block_first_forward(patch, llama_runner.model)
        with httpx.stream("POST", url + "v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": stopped}], "max_tokens": 200, "stream": True}) as response:
            assert response.status_code == 200
            assert entered.wait(30)
        wait_for(lambda: spy.streams and spy.streams[-1].closed_at is not None, 10, "the disconnect to stop it")
        release.set()
        assert spy.streams[-1].join(10) and spy.streams[-1].finish_reason == "cancelled"
    follow_up = post(url, [{"role": "user", "content": stopped}, {"role": "user", "content": FOLLOW_UP}])
    assert follow_up.status_code == 200 and follow_up.json()["choices"][0]["message"]["content"]


def test_what_the_model_sees_of_a_chat_with_refused_turns():
    """The rule in one place (conversation.for_the_model): a user message without an answer
    is left out, with its error; answered turns (even a partial answer before an error)
    stay; what only the reader saw (reasoning, notes, figures, errors) never reaches the model."""
    def text(t):
        return [{"type": "text", "text": t}]
    kept = [
        {"role": "user", "content": text("one")},
        {"role": "assistant", "content": text("answer one"), "reasoning": "hmm", "reasoning_seconds": 1.0,
         "figures": "⏱ 3 tokens", "notes": ["an image was downscaled"]},
        {"role": "user", "content": text("refused")}, {"role": "assistant", "content": [], "error": "too long"},
        {"role": "user", "content": text("stopped")},  # Stop before any text: no reply at all
        {"role": "user", "content": text("failed midway")},
        {"role": "assistant", "content": text("half an ans"), "error": "Generation failed: device lost"},
        {"role": "user", "content": text("thought only")},
        {"role": "assistant", "content": [], "reasoning": "hmm"},
        {"role": "user", "content": text("next")},
    ]
    seen = for_the_model(kept, "Be brief.")
    assert [(m["role"], m["content"][0]["text"]) for m in seen] == [
        ("system", "Be brief."), ("user", "one"), ("assistant", "answer one"), ("user", "failed midway"),
        ("assistant", "half an ans"), ("user", "next")]
    assert all(set(m) <= {"role", "content"} for m in seen), "only what the model reads"
