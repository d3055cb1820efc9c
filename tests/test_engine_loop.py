"""The engine as a serving engine: one long-lived generation loop per model, replies parsed
once in the engine, settings resolved once and handed on, idle means idle."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import config
import transformers_internals
from conversation import ReplyParser
from engine_contract import (
    Cancelled,
    ContextTooLong,
    GenerationSettings,
    ImageRefused,
    Reply,
    Signal,
    ToolCall,
    wait_for_either,
)
from engine_process import EngineProcess
from model_runner import ModelRunner
from tests.conftest import free_port, wait_for, wait_until_loaded

ROOT = Path(__file__).resolve().parent.parent


def ask(text, *images):
    return [{"role": "user", "content": [*({"type": "image", "image": str(p)} for p in images),
                                         {"type": "text", "text": text}]}]


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- one generation loop

def test_every_answer_and_the_warm_up_generate_on_one_thread_in_this_process(tiny_model_paths):
    runner = ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", compile="on")  # warms up
    try:
        threads_before = threading.active_count()
        threads = set()
        for i in range(20):
            with runner.stream(ask(f"answer {i}"), GenerationSettings(max_new_tokens=3)) as stream:
                list(stream)
            threads.add(stream.generated_on)
        assert threads == {runner.warmed_up_on} == {runner.info.loop_thread}, "one thread for every answer"
        assert runner.loop.thread.is_alive() and runner.loop.thread is not threading.current_thread()
        assert threading.active_count() == threads_before, "no thread per answer"
    finally:
        runner.close()


def test_the_engine_process_generates_on_its_main_thread_and_its_threads_do_not_grow(long_answer_engine_process):
    engine = long_answer_engine_process
    assert engine.info.loop_thread == engine.pid, "the engine process's main thread is the loop"
    with engine.stream(ask("first"), GenerationSettings(max_new_tokens=3)) as first:  # (torch's own
        list(first)                                                                  # pools start lazily)
    idle_threads = threads_of(engine.pid)
    running = engine.stream(ask("A long answer."), GenerationSettings(max_new_tokens=4000, min_new_tokens=4000))
    waiting, outcomes = [], []

    def request(i):
        signal = Signal()
        waiting.append(signal)
        try:
            with engine.stream(ask(f"waiting {i}"), GenerationSettings(max_new_tokens=3), cancelled=signal) as s:
                list(s)
            outcomes.append(s.generated_on)
        except Cancelled:
            outcomes.append("withdrawn")

    callers = [threading.Thread(target=request, args=(i,)) for i in range(6)]
    for caller in callers:
        caller.start()
    wait_for(lambda: len(engine._streams) == 7, 10, "7 requests in the engine")
    time.sleep(0.3)
    assert threads_of(engine.pid) == idle_threads, "requests in flight add no thread to the engine"
    for signal in waiting[:3]:  # three leave before their turn: they never run
        signal.set()
    running.close()
    for caller in callers:
        caller.join(30)
    assert running.generated_on == engine.pid and running.tokens_after_close <= 1
    assert sorted(map(str, outcomes)) == sorted(["withdrawn"] * 3 + [str(engine.pid)] * 3)
    assert threads_of(engine.pid) == idle_threads


def test_an_idle_engine_process_uses_no_cpu(long_answer_engine_process):
    pid = long_answer_engine_process.pid
    time.sleep(0.5)  # (what ran before has settled)
    before = cpu_seconds(pid)
    time.sleep(2.0)
    assert cpu_seconds(pid) - before < 0.05, "the loop and the command reader block, they don't poll"


def test_waiting_for_either_of_two_signals_needs_no_polling():
    first, second = Signal(), Signal()
    threading.Timer(0.1, second.set).start()
    started = time.perf_counter()
    assert wait_for_either(first, second, timeout=5)
    assert time.perf_counter() - started < 1
    assert not wait_for_either(Signal(), Signal(), timeout=0.05)
    called = []
    first.on_set(lambda: called.append(1))
    first.set()
    first.set()
    first.on_set(lambda: called.append(2))  # already set: at once
    assert called == [1, 2]


# ---------------------------------------------------------------- one parse of each reply

def test_a_reply_is_parsed_once_into_its_parts_and_calls_keep_their_ids():
    parser = ReplyParser(starts_in_reasoning=True, tools=True)
    assert parser.parse("Let me think") == Reply(answer="", reasoning="Let me think", reasoning_done=False)
    partial = parser.parse('plan</think>Checking.<tool_call>{"name": "f", "argum')
    assert partial.reasoning == "plan" and partial.answer == "Checking." and partial.calling
    assert partial.tool_calls == ()
    done = parser.parse('plan</think>Checking.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    assert [(c.name, c.arguments) for c in done.tool_calls] == [("f", {"x": 1})] and not done.calling
    final = parser.parse('plan</think>Checking.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>',
                         final=True)
    assert final.tool_calls == done.tool_calls, "the same call keeps its id to the end"
    plain = ReplyParser().parse("just an answer <tool_call>not for us", final=True)
    assert plain == Reply(answer="just an answer <tool_call>not for us"), "tools off: nothing is cut"


def test_a_reply_travels_as_its_changes():
    before = Reply(answer="Hello", reasoning="hm", reasoning_done=True)
    after = Reply(answer="Hello world", reasoning="hm", reasoning_done=True,
                  tool_calls=(ToolCall("f", {"a": 1}),))
    changes = after.changes_since(before)
    assert changes["answer"] == (5, " world") and "reasoning" not in changes
    assert before.with_changes(changes) == after
    rewritten = Reply(answer="Other")  # (a final parse may rewrite the answer)
    assert after.with_changes(rewritten.changes_since(after)) == rewritten


def test_one_openai_shape_for_a_tool_call():
    call = ToolCall("get_weather", {"city": "Paris"}, "call_1")
    assert call.openai() == {"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert call.openai(arguments_as_json=False)["function"]["arguments"] == {"city": "Paris"}


def test_errors_are_typed_and_the_api_maps_types_not_messages(llama_runner, images, tiny_model_paths):
    long_message = "word " * 5000
    with pytest.raises(ContextTooLong):
        llama_runner.stream(ask(long_message))
    with pytest.raises(ImageRefused):
        llama_runner.stream(ask("what is this?", images["red"]))
    from openai_api import api_error
    assert api_error(ContextTooLong("anything at all")).body["error"]["code"] == "context_length_exceeded"
    assert api_error(ImageRefused("anything")).body["error"]["code"] == "invalid_image"
    assert api_error(Cancelled()).status == 499


# ---------------------------------------------------------------- settings resolved once

def test_the_engine_process_runs_with_the_settings_it_is_given_not_the_environment(tiny_model_paths, images,
                                                                                   monkeypatch):
    monkeypatch.setenv("MAX_IMAGES_PER_MESSAGE", "8")  # what the engine would read, if it read it
    settings = config.Settings(max_images_per_message=1, torch_threads=1, served_model_name="given-name")
    engine = EngineProcess.start(str(tiny_model_paths["idefics3"]), settings, device="cpu")
    try:
        assert engine.info.name == "given-name" and engine.info.torch_threads == 1
        with pytest.raises(ImageRefused, match="the limit is 1"):
            engine.stream(ask("two pictures", images["red"], images["noise"]))
    finally:
        engine.close()


def test_command_line_options_alone_reach_the_engine_process(tiny_model_paths):
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key not in {s.variable for s in config.SETTINGS}}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--model", str(tiny_model_paths["llama"]), "--port", str(port),
         "--served-model-name", "from-the-command-line", "--device", "cpu", "--dtype", "bfloat16",
         "--torch-threads", "1", "--compile", "off", "--batching", "off", "--max-new-tokens", "7"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        assert wait_until_loaded(port, process), "the app must load"
        runner = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["runner"]
        assert (runner["name"], runner["device"], runner["dtype"], runner["torch_threads"], runner["compile"],
                runner["batching"]) == ("from-the-command-line", "cpu", "bfloat16", 1, False, False)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                            json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0}).json()
        assert answer["usage"]["completion_tokens"] <= 7 and answer["model"] == "from-the-command-line"
    finally:
        process.terminate()
        process.wait(10)


def test_no_module_reads_settings_at_import():
    assert not hasattr(config, "settings"), "no global settings object"
    assert config.Settings().max_new_tokens == 512
    with pytest.raises(Exception):
        config.Settings().max_new_tokens = 3  # frozen


# ---------------------------------------------------------------- the fenced transformers internals

def test_with_another_transformers_the_internals_are_left_alone_and_the_app_still_answers(
        tiny_model_paths, monkeypatch, caplog, request):
    monkeypatch.setattr(transformers_internals, "WRITTEN_FOR", "0.0.0")
    transformers_internals.fenced.cache_clear()
    request.addfinalizer(transformers_internals.fenced.cache_clear)  # (the real version's answer after)
    assert not transformers_internals.fenced()
    assert "left alone" in caplog.text
    from batching import wants_batching
    batched, why = wants_batching("on", "cpu", is_vision=False)
    assert not batched and "one at a time" in why
    runner = ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", batching="on", compile="on")
    try:
        assert runner.one_at_a_time and runner.compile, "batching off; the static cache kept (trusted)"
        assert transformers_internals.serve_response_template(runner.tokenizer, runner.model) is None
        with runner.stream(ask("hi"), GenerationSettings(max_new_tokens=5)) as stream:
            list(stream)
        assert stream.new_tokens == 5
    finally:
        runner.close()


def test_the_engine_goes_away_with_the_app_even_while_a_request_waits_in_it(tmp_path):
    """The web server killed (kill -9, the OOM killer) while one answer generates and the next
    waits in the engine's queue: the engine ends that answer and exits, holding no memory."""
    from tests.tiny_models import build_bench_llama
    model = build_bench_llama(tmp_path / "bench-llama")
    port = free_port()
    app_process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(model), "--port", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = None
    try:
        assert wait_until_loaded(port, app_process)
        engine = int(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["runner"]["loop_thread"])

        def ask_long():
            try:
                httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                    "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000})
            except httpx.HTTPError:
                pass  # the server is killed under it
        for _ in range(2):
            threading.Thread(target=ask_long, daemon=True).start()
        wait_for(lambda: _metric(port, "chat_active_generations") == 1 and _metric(port, "chat_queue_depth") == 1,
                 20, "one answer generating, the next at the front of the line (asking the engine)")
        time.sleep(0.5)
    finally:
        app_process.kill()  # not even a chance to clean up
        app_process.wait(10)
    assert engine is not None
    deadline = time.time() + 15
    while Path(f"/proc/{engine}").exists() and _state(engine) != "Z" and time.time() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{engine}").exists() or _state(engine) == "Z", "the engine must not outlive the app"


def _metric(port: int, name: str) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return float(metrics.split(f"\n{name} ")[1].split()[0])


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_late_update_after_the_end_never_hangs_the_reader():
    """(A batched answer: the manager's thread may hand over tokens while a Stop ends it.)"""
    from engine_contract import StreamBase
    stream = StreamBase(max_new_tokens=10, max_updates_per_second=float("inf"))
    stream._request_stop = lambda: None
    stream._update(Reply(answer="a"))
    stream._end("cancelled")
    stream._update(Reply(answer="a late piece"))
    replies = []
    reader = threading.Thread(target=lambda: replies.extend(stream))
    reader.start()
    reader.join(5)
    assert not reader.is_alive() and replies == [Reply(answer="a")] and stream.reply == Reply(answer="a")


def test_a_failing_callback_does_not_keep_the_others_from_hearing_a_signal():
    signal, heard = Signal(), []
    signal.on_set(lambda: 1 / 0)
    signal.on_set(lambda: heard.append("withdrawn"))
    signal.set()
    assert heard == ["withdrawn"]
