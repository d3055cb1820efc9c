"""The app end to end: served on 127.0.0.1, driven with gradio_client like a user's script."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

import app
from engine_contract import GenerationSettings
from tests.conftest import break_forward, wait_for

ROOT = Path(__file__).resolve().parent.parent


def message(text, *files):
    return {"text": text, "files": [handle_file(str(f)) for f in files]}


def chat(client, msg, system_prompt="", max_new_tokens=40, temperature=0.0, top_p=1.0):
    return client.submit(msg, system_prompt, max_new_tokens, temperature, top_p, api_name="/chat")


def text_of(output):
    """The answer text of one streamed output (a string, or the Thinking… / error messages)."""
    if isinstance(output, str):
        return output
    if isinstance(output, dict):
        return "" if output.get("metadata", {}).get("title") else output.get("content", "")
    return "".join(text_of(o) for o in output)


def error_of(output):
    items = output if isinstance(output, list) else [output]
    return " ".join(o["content"] for o in items
                    if isinstance(o, dict) and o.get("metadata", {}).get("title") == app.ERROR_TITLE)


def test_streams_an_answer_about_an_uploaded_image(serve, idefics3_engine, images):
    url, spy = serve(idefics3_engine)
    client = Client(url, verbose=False)
    job = chat(client, message("What is in this picture?", images["red"]), max_new_tokens=200)
    outputs = list(job)
    assert outputs[0]["metadata"]["title"] == app.THINKING_TITLE, "the user sees the model working"
    texts = [text_of(o) for o in outputs[1:]]
    assert len(texts) >= 2, "the answer must arrive in several partial updates"
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)
    # exactly what the engine produces for the same conversation
    sent = spy.calls[0][0]
    assert [p["type"] for p in sent[-1]["content"]] == ["image", "text"]
    with spy.original(sent, GenerationSettings(max_new_tokens=200)) as s:
        *_, direct = s
    assert texts[-1] == direct.answer and len(direct.answer) > 20
    client.close()


def test_history_with_images_goes_back_to_the_model(serve, idefics3_runner, images):
    url, spy = serve(idefics3_runner)
    client = Client(url, verbose=False)
    chat(client, message("Look.", images["red"], images["noise"]), max_new_tokens=10).result(timeout=60)
    chat(client, message("What did you see?"), max_new_tokens=10).result(timeout=60)
    second = spy.calls[1][0]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert sum(p["type"] == "image" for p in second[0]["content"]) == 2
    assert second[1]["content"][0]["text"], "the previous answer is part of the conversation"
    client.close()


def test_stop_ends_generation_on_the_server(serve, idefics3_engine, images):
    url, spy = serve(idefics3_engine)
    client = Client(url, verbose=False)
    job = chat(client, message("Tell me everything.", images["red"]), max_new_tokens=2000)
    wait_for(lambda: len([o for o in job.outputs() if text_of(o)]) >= 2 or job.done(), 30, "text to stream")
    assert not job.done(), "the answer finished before it could be stopped"
    job.cancel()
    stream = spy.streams[0]
    assert stream.join(5), "Stop must end generation"
    assert stream.finish_reason == "cancelled" and stream.new_tokens < 2000
    assert stream.tokens_after_close <= 1, "the model stops within one token of the Stop"
    # the next message works
    assert text_of(chat(client, message("hello"), max_new_tokens=5).result(timeout=60))
    client.close()


def test_a_bad_image_gets_a_message_and_the_next_request_works(serve, idefics3_runner, images):
    url, _ = serve(idefics3_runner)
    client = Client(url, verbose=False)
    started = time.time()
    result = chat(client, message("What is this?", images["fake"])).result(timeout=60)
    assert "notes.png is not what its name says" in error_of(result)
    assert time.time() - started < 10
    result = chat(client, message("And this one?", images["red"]), max_new_tokens=8).result(timeout=60)
    assert text_of(result) and not error_of(result)
    client.close()


def test_a_failure_during_generation_shows_in_the_chat(serve, llama_runner, monkeypatch):
    url, _ = serve(llama_runner)
    break_forward(monkeypatch, llama_runner.model, RuntimeError("device lost"), on_call=10)
    client = Client(url, verbose=False)
    result = chat(client, message("go"), max_new_tokens=100).result(timeout=60)
    assert "device lost" in error_of(result)
    assert text_of(result), "the text produced before the failure is kept"
    assert text_of(chat(client, message("again"), max_new_tokens=5).result(timeout=60))
    client.close()


def test_system_prompt_and_settings_reach_generation(serve, llama_runner):
    url, spy = serve(llama_runner)
    client = Client(url, verbose=False)
    plain = text_of(chat(client, message("Hi"), max_new_tokens=7).result(timeout=60))
    assert spy.streams[-1].new_tokens == 7
    client.reset_session()
    pirate = text_of(chat(client, message("Hi"), system_prompt="You are a pirate.", max_new_tokens=7).result(timeout=60))
    assert spy.calls[-1][0][0] == {"role": "system", "content": [{"type": "text", "text": "You are a pirate."}]}
    assert pirate != plain
    client.reset_session()
    chat(client, message("Hi"), max_new_tokens=7, temperature=0.9, top_p=0.8).result(timeout=60)
    settings = spy.calls[-1][1]
    assert (settings.temperature, settings.top_p, settings.max_new_tokens) == (0.9, 0.8, 7)
    client.close()


def test_text_only_model_says_it_cannot_see_images(serve, llama_runner, images):
    url, _ = serve(llama_runner)
    client = Client(url, verbose=False)
    result = chat(client, message("What is this?", images["red"])).result(timeout=60)
    assert "can't see images" in error_of(result)
    assert text_of(chat(client, message("Then just say hello."), max_new_tokens=5).result(timeout=60))
    client.close()


def test_every_chat_event_waits_in_the_apps_line_not_in_gradios(idefics3_runner):
    """Submit, retry, edit, the examples and /chat all enter the chat function at once and
    wait in the one line they share with the API (tests/test_queue.py shows the order)."""
    demo = app.build_demo(idefics3_runner)
    chat_events = [fn for fn in demo.fns.values() if fn.concurrency_id == app.GENERATION_CONCURRENCY_ID]
    assert len(chat_events) >= 4  # submit, retry, edit, example, the API
    assert any(fn.api_name == "chat" for fn in chat_events)
    assert all(fn.concurrency_limit is None for fn in chat_events)


def run_app(*args, timeout=120):
    from tests.conftest import free_port
    # a free port: the UI starts before the model loads, and 7860 may be another app's
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(free_port())}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_help_documents_every_option():
    result = run_app("--help")
    assert result.returncode == 0
    for option in ["--model", "--device", "--dtype", "--host", "--port", "--share", "--auth",
                   "--max-new-tokens", "--trust-remote-code", "--in-process", "--compile", "--torch-threads",
                   "--served-model-name", "MODEL_ID"]:
        assert option in result.stdout


@pytest.mark.parametrize("model, expected", [
    ("someone/no-such-model-xyz", "Point --model at a local directory"),
    ("./no/such/dir", "is not a model directory"),
    ("--backend openai --base-url http://127.0.0.1:9/v1", "Can't reach the model server"),
])
def test_an_unreachable_model_exits_with_one_clear_line(model, expected):
    result = run_app(*model.split(" ")) if model.startswith("--") else run_app("--model", model)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_broken_model_directory_exits_with_one_clear_line(tiny_model_paths, tmp_path):
    import shutil
    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_model_paths["llama"], no_template)
    (no_template / "chat_template.jinja").unlink()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    for model, expected in [(no_template, "has no chat template"), (corrupt, "Can't read the model config")]:
        result = run_app("--model", str(model))
        assert result.returncode != 0
        assert expected in result.stderr and "Traceback" not in result.stderr


def test_the_ui_serves_while_the_model_loads(serve, llama_runner):
    import threading

    import httpx
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return llama_runner

    slot = app.ModelSlot("tiny-llama", slow_load, one_at_a_time=True)
    url, _ = serve(slot, on_listening=slot.start)
    assert httpx.get(url).status_code == 200
    assert httpx.get(url + "healthz").json()["loaded"] is False
    assert "loading model" in app.header_markdown(slot)
    client = Client(url, verbose=False)
    job = chat(client, message("hello"), max_new_tokens=5)  # sent while loading: waits, then answers
    wait_for(job.outputs, 10, "the first update")
    assert job.outputs()[0]["metadata"]["title"] == app.LOADING_TITLE and not job.done()
    release.set()
    assert text_of(job.result(timeout=60))
    assert httpx.get(url + "healthz").json()["loaded"] is True
    assert "loading" not in app.header_markdown(slot)
    client.close()


def test_starter_examples_with_pictures_show_only_for_a_model_that_sees_them(serve, llama_runner, idefics3_runner):
    import threading

    import httpx

    def examples_on_a_new_page(url):
        [chat] = [c for c in httpx.get(url + "config").json()["components"] if c["props"].get("elem_id") == "chat"]
        return [example["display_text"] for example in chat["props"]["examples"]]
    every = [example["label"] for example in app.starter_examples()]
    assert examples_on_a_new_page(serve(idefics3_runner)[0]) == every
    assert examples_on_a_new_page(serve(llama_runner)[0]) == ["🐍 Code question"]
    release = threading.Event()
    slot = app.ModelSlot("tiny-llama", lambda: release.wait(30) and llama_runner, one_at_a_time=True)
    url, _ = serve(slot, on_listening=slot.start)
    assert examples_on_a_new_page(url) == every, "unknown while it loads"
    release.set()
    wait_for(lambda: examples_on_a_new_page(url) == ["🐍 Code question"], 30, "the text-only model's examples")


def test_the_chat_shows_the_same_whatever_postprocessing_it_reuses(images):
    """The app's chatbot postprocesses each history message once per turn; what the
    browser receives must be exactly what gr.Chatbot sends, update after update."""
    import gradio as gr

    from gradio_fixes import cache_history_postprocessing

    plain, caching = gr.Chatbot(), cache_history_postprocessing(gr.Chatbot())
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(images["red"]), "mime_type": "image/png"}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}],
         "metadata": {"title": app.STATS_PREFIX + "7 tokens", "status": "done"}},
        {"role": "user", "content": "And now?"},
    ]
    for answer in ("", "It is", "It is still red.", "It is still red. Done."):
        update = [*history, *({"role": "assistant", "content": part} for part in (answer, "stats") if part)]
        assert caching.postprocess(update).model_dump() == plain.postprocess(update).model_dump()
    # A new turn: new message objects, equal or not, are postprocessed anew.
    next_turn = [{**m} for m in history[:2]] + [{"role": "user", "content": "Something else"}]
    assert caching.postprocess(next_turn).model_dump() == plain.postprocess(next_turn).model_dump()


VANISHING_SCRIPT = """
import sys
from gradio_client import Client
job = Client(sys.argv[1], verbose=False).submit({"text": "Tell me everything.", "files": []}, "", 2000,
                                                0.0, 1.0, api_name="/chat")
for output in job:
    print("update", flush=True)
"""


def test_a_script_killed_mid_answer_stops_generation(serve, idefics3_engine):
    """A gradio_client script whose connection drops (killed, network gone): the server
    notices and the engine stops within a token, as for Stop."""
    url, spy = serve(idefics3_engine)
    script = subprocess.Popen([sys.executable, "-c", VANISHING_SCRIPT, url], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # "Thinking…", then text
            assert script.stdout.readline() == "update\n"
        wait_for(lambda: spy.streams and spy.streams[0].new_tokens > 0, 30, "text to stream")
    finally:
        script.kill()
        script.wait(10)
    stream = spy.streams[0]
    assert stream.join(10), "the engine must stop when the client is gone"
    assert stream.finish_reason == "cancelled" and stream.new_tokens < 1000
    assert stream.tokens_after_close <= 1


def test_live_figures_update_while_the_answer_streams(serve, llama_runner):
    url, spy = serve(llama_runner)
    client = Client(url, verbose=False)
    outputs = list(chat(client, message("Tell me a story."), max_new_tokens=300))
    figures = [o["metadata"]["title"] for output in outputs for o in (output if isinstance(output, list) else [])
               if (o.get("metadata") or {}).get("title", "").startswith(app.STATS_PREFIX)]
    counts = [int(title.split(app.STATS_PREFIX)[1].split(" tokens")[0]) for title in figures]
    assert len(set(counts)) >= 3 and counts == sorted(counts), "the figures grow with the answer"
    stream = spy.streams[-1]
    assert counts[-1] == stream.new_tokens == 300
    assert figures[-1] == app.stats_line(stream)
    assert f"{stream.tokens_per_second:.1f} tokens/s" in figures[-1]
    assert f"first token after {stream.time_to_first_token:.2f} s" in figures[-1]
    client.close()


def test_launch_asks_its_own_server_again_when_it_is_slow_to_answer(monkeypatch):
    """Gradio's launch gives up on its own page after one 3 s time-out ("When localhost is not
    accessible..."): on a busy machine the app asks again."""
    import httpx
    from gradio import networking

    import gradio_fixes
    gradio_fixes.patient_launch_check()
    answers = iter([httpx.ReadTimeout("busy"), httpx.ReadTimeout("busy"), None])

    def head(url, **options):
        slow = next(answers)
        if slow is not None:
            raise slow
        return httpx.Response(200)
    monkeypatch.setattr(networking.httpx, "head", head)
    assert networking.url_ok("http://127.0.0.1:9/")


@pytest.mark.parametrize("gradio_version", ["as pinned", "another"])
def test_gradio_fixes_apply_only_to_the_gradio_they_were_written_for(llama_runner, monkeypatch, caplog,
                                                                     gradio_version):
    import logging

    import gradio as gr

    import gradio_fixes
    from tests.conftest import free_port
    assert gr.__version__ == gradio_fixes.WRITTEN_FOR, "requirements.txt pins the Gradio the fixes are for"
    if gradio_version == "another":
        monkeypatch.setattr(gr, "__version__", "99.0.0")
        monkeypatch.setattr(gradio_fixes, "_warned", False)
    caplog.set_level(logging.WARNING, logger="app")
    applied = gradio_version == "as pinned"
    demos = [app.serve(llama_runner, host="127.0.0.1", port=free_port(), block=False, quiet=True)
             for _ in range(2)]  # two apps in one process: one warning at most
    try:
        for demo, _ in demos:
            assert ("start_processing" in vars(demo._queue)) == applied, "the queue loop"
            chatbot = next(block for block in demo.blocks.values() if isinstance(block, gr.Chatbot))
            assert ("postprocess" in vars(chatbot)) == applied, "the chat's postprocessing"
        warnings = [r for r in caplog.records if "runs on stock Gradio" in r.getMessage()]
        assert len(warnings) == (0 if applied else 1)
        client = Client(demos[1][1], verbose=False)
        assert text_of(chat(client, message("still works"), max_new_tokens=5).result(timeout=60))
        client.close()
    finally:
        for demo, _ in demos:
            demo.close()
