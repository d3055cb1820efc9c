"""One line to the model for everyone: UI and API requests in arrival order, the position
shown while waiting, the line's limits, and API requests made while the model loads."""

import asyncio
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client

import app
import config
from engine_contract import served_model_name
from tests.conftest import free_port, hold_generation, wait_for
from tests.test_app import chat, error_of, message, text_of
from tests.test_openai_api import metric
from waiting_line import LineFull, WaitingLine

ROOT = Path(__file__).resolve().parent.parent


def titles(outputs) -> list[str]:
    """The indicator titles a client saw, in order (Thinking…, "2nd in line", ...)."""
    seen = []
    for output in outputs:
        for item in output if isinstance(output, list) else [output]:
            title = isinstance(item, dict) and (item.get("metadata") or {}).get("title")
            if title and (not seen or seen[-1] != title):
                seen.append(title)
    return seen


def in_line(n: str) -> str:
    return app.WAITING_TITLE.format(n)


def api_request(url, text, results, stream=False, max_tokens=5):
    """An API request in a thread of its own; its answer lands in results[text]."""
    def run():
        client = openai.OpenAI(base_url=url + "v1", api_key="unused")
        kwargs = dict(model="", messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                      temperature=0)
        if stream:
            results[text] = "".join(c.choices[0].delta.content or "" for c in
                                    client.chat.completions.create(stream=True, **kwargs) if c.choices)
        else:
            results[text] = client.chat.completions.create(**kwargs).choices[0].message.content
    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.fixture(params=["in-process", "engine-process"])
def busy_engine(request, monkeypatch):
    """(runner, release): a runner whose first answer lasts until release() (or 4000 tokens),
    in the web server's process and in an engine process."""
    if request.param == "in-process":
        runner = request.getfixturevalue("llama_runner")
        return runner, hold_generation(monkeypatch, runner.model).set
    return request.getfixturevalue("long_answer_engine_process"), lambda: None


def test_ui_and_api_requests_are_served_in_arrival_order(serve, busy_engine):
    runner, release = busy_engine
    url, spy = serve(runner)
    first = Client(url, verbose=False)
    running = chat(first, message("A: a long answer"), max_new_tokens=4000)
    wait_for(lambda: spy.streams and spy.streams[0].new_tokens > 0, 30, "A to generate")
    clients, jobs, results, threads = [], {}, {}, []
    for arrival, (text, kind) in enumerate([("B", "ui"), ("C", "api"), ("D", "ui"), ("E", "api")], 1):
        if kind == "ui":
            clients.append(Client(url, verbose=False))
            jobs[text] = chat(clients[-1], message(text), max_new_tokens=5)
        else:
            threads.append(api_request(url, text, results, stream=text == "E"))
        wait_for(lambda: metric(url, "chat_queue_depth") == arrival, 30, f"{text} to join the line")
    wait_for(lambda: in_line("3rd") in titles(jobs["D"].outputs()), 30, "D to show its position")
    running.cancel()
    release()
    for job in jobs.values():
        assert text_of(job.result(timeout=60))
    for thread in threads:
        thread.join(60)
    assert set(results) == {"C", "E"} and all(results.values())
    started = sorted(spy.streams, key=lambda s: s.started_at)
    assert [s.request_text[0] for s in started] == ["A", "B", "C", "D", "E"], "first come, first served"
    # D saw its place move up ("1st" too, unless C was done before D looked), then the model
    # working on it; B, at the front while A generated, waited as 1st
    seen_by_d = titles(jobs["D"].outputs())
    assert seen_by_d[:2] == [in_line("3rd"), in_line("2nd")] and app.THINKING_TITLE in seen_by_d[2:4]
    assert titles(jobs["B"].outputs())[:2] == [in_line("1st"), app.THINKING_TITLE]
    assert metric(url, "chat_queue_depth") == 0
    for client in (first, *clients):
        client.close()


def test_an_answer_with_nobody_ahead_shows_thinking_not_a_place(serve, llama_runner):
    url, _ = serve(llama_runner)
    client = Client(url, verbose=False)
    job = chat(client, message("hi"), max_new_tokens=5)
    job.result(timeout=30)
    assert titles(job.outputs())[0] == app.THINKING_TITLE
    client.close()


def test_stop_while_waiting_leaves_the_line(serve, llama_runner, monkeypatch):
    url, spy = serve(llama_runner)
    release = hold_generation(monkeypatch, llama_runner.model)
    running = chat(Client(url, verbose=False), message("A"), max_new_tokens=4000)
    wait_for(lambda: spy.streams, 30, "A to generate")
    clients = [Client(url, verbose=False) for _ in range(2)]
    front = chat(clients[0], message("B"), max_new_tokens=4000)  # waits for the engine
    wait_for(lambda: metric(url, "chat_queue_depth") == 1, 30, "B to wait")
    behind = chat(clients[1], message("C"), max_new_tokens=4000)
    wait_for(lambda: metric(url, "chat_queue_depth") == 2, 30, "C to wait")
    wait_for(lambda: in_line("2nd") in titles(behind.outputs()), 30, "C to show its place")
    behind.cancel()
    front.cancel()
    wait_for(lambda: metric(url, "chat_queue_depth") == 0, 10, "B and C to leave the line")
    running.cancel()
    release.set()
    wait_for(lambda: spy.streams[0].finish_reason == "cancelled", 10, "A to stop")
    assert text_of(chat(clients[1], message("again"), max_new_tokens=5).result(timeout=30))
    # B was already asking the engine, C was behind it: neither ever generated
    assert [s.request_text for s in spy.streams] == ["A", "again"]
    for client in clients:
        client.close()


def test_a_full_line_says_busy_in_the_chat_and_with_a_503(serve, llama_runner, monkeypatch):
    url, spy = serve(llama_runner, queue_max_size=3, api_max_waiting_requests=1)
    release = hold_generation(monkeypatch, llama_runner.model)
    running = chat(Client(url, verbose=False), message("A"), max_new_tokens=4000)
    wait_for(lambda: spy.streams, 30, "A to generate")
    results = {}
    threads = [api_request(url, "api waits", results)]
    wait_for(lambda: metric(url, "chat_queue_depth") == 1, 30, "the API request to wait")
    busy = httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "one more"}]})
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
    assert busy.headers["retry-after"]
    clients = [Client(url, verbose=False) for _ in range(3)]
    jobs = [chat(clients[0], message("ui waits 1"), max_new_tokens=5),
            chat(clients[1], message("ui waits 2"), max_new_tokens=5)]
    wait_for(lambda: metric(url, "chat_queue_depth") == 3, 30, "the line to fill")
    refused = chat(clients[2], message("no room"), max_new_tokens=5).result(timeout=30)
    assert "busy" in error_of(refused) and "3 requests waiting" in error_of(refused)
    running.cancel()
    release.set()
    for job in jobs:
        assert text_of(job.result(timeout=60))
    threads[0].join(60)
    assert results["api waits"]
    assert text_of(chat(clients[2], message("room now"), max_new_tokens=5).result(timeout=30))
    for client in clients:
        client.close()


# ---------------------------------------------------------------- while the model loads

@pytest.fixture
def loading_slot(llama_runner):
    """A model slot whose load finishes only when `release` is set."""
    release = threading.Event()

    def slow_load():
        release.wait(60)
        return llama_runner

    slot = app.ModelSlot("llama", slow_load, one_at_a_time=True)
    slot.release = release
    yield slot
    release.set()


def test_the_api_waits_for_the_model_while_it_loads(serve, loading_slot):
    url, _ = serve(loading_slot, on_listening=loading_slot.start)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["llama"], "listed from launch, by its name"
    results = {}
    thread = api_request(url, "asked while loading", results)
    wait_for(lambda: metric(url, "chat_queue_depth") == 1, 30, "the request to wait in line")
    assert not loading_slot.loaded and thread.is_alive()
    loading_slot.release.set()
    thread.join(60)
    assert results["asked while loading"]


def test_a_long_load_gets_a_503_with_retry_after_and_the_client_retries(serve, loading_slot):
    url, _ = serve(loading_slot, on_listening=loading_slot.start, api_model_load_wait_s=0.5, api_retry_after_s=1)
    early = httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert early.status_code == 503 and early.json()["error"]["code"] == "model_loading"
    assert early.headers["retry-after"] == "1"
    threading.Timer(1.2, loading_slot.release.set).start()
    client = openai.OpenAI(base_url=url + "v1", api_key="unused")  # its default retries
    answer = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5)
    assert answer.choices[0].message.content


def launch(*args, port):
    return subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("served_name", [None, "my-bot"])
def test_a_script_started_beside_a_fresh_app_gets_its_answer(tiny_model_paths, served_name):
    port = free_port()
    options = ["--served-model-name", served_name, "--in-process"] if served_name else []
    process = launch("--model", str(tiny_model_paths["llama"]), *options, port=port)
    try:
        url = f"http://127.0.0.1:{port}/"

        def ui_up():
            try:
                return httpx.get(url + "healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return assert_running(process)
        wait_for(ui_up, 60, "the UI to answer", interval=0.05)
        client = openai.OpenAI(base_url=url + "v1", api_key="unused")  # default retries and timeout
        expected = served_name or "llama"
        assert [m.id for m in client.models.list().data] == [expected]
        answer = client.chat.completions.create(model=expected, max_tokens=5,
                                                messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content and answer.model == expected
        assert httpx.get(url + "healthz").json()["model"] == expected
        assert str(tiny_model_paths["llama"]) not in httpx.get(url + "v1/models").text, "never the path"
    finally:
        process.kill()
        process.wait(10)


def assert_running(process) -> bool:
    assert process.poll() is None, "the app exited"
    return False


def test_served_names():
    assert served_model_name("HuggingFaceTB/SmolVLM-256M-Instruct") == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert served_model_name(str(ROOT / "tests")) == "tests"
    assert served_model_name("./models/my-vlm/") == "my-vlm"
    assert config.read_settings(["--served-model-name", "bot"], environ={}).served_model_name == "bot"


# ---------------------------------------------------------------- the line itself

def test_the_line_keeps_arrival_order_and_tells_each_its_place():
    line = WaitingLine(one_at_a_time=True, max_waiting=3, max_waiting_per_kind={"api": 1})
    a, b = line.join("ui"), line.join("api")
    with pytest.raises(LineFull, match="line for API requests is full"):
        line.join("api")
    c = line.join("ui")
    assert [p.position for p in (a, b, c)] == [1, 2, 3] and a.at_front and not b.at_front
    with pytest.raises(LineFull, match="3 requests waiting"):
        line.join("ui")

    class Stream:
        finish_reason = None

    stream = Stream()
    a.started(stream)
    assert line.engine_busy and b.at_front and c.position == 2 and line.waiting == 2
    b.leave()  # e.g. its client went away
    assert c.at_front and c.position == 1
    line.stream_finished(stream)
    assert not line.engine_busy


def test_a_place_reading_its_files_lets_the_next_go_ahead_and_still_counts():
    """While the front request's files are read, the one behind it is let through (and the
    rest move up); the reader still holds its place in the line's limits."""
    line = WaitingLine(one_at_a_time=True, max_waiting=3)
    reading, question, last = line.join("ui"), line.join("ui"), line.join("api")
    reading.reading_files()
    assert question.at_front and question.position == 1 and last.position == 2
    assert reading.position == 1 and line.waiting == 3, "it has not started: it still counts"
    with pytest.raises(LineFull):
        line.join("ui")
    question.started()
    assert last.at_front


def test_a_waiting_place_hears_each_move():
    line = WaitingLine(one_at_a_time=True, max_waiting=10)
    ahead = [line.join("ui") for _ in range(3)]
    place = line.join("ui")

    async def wait():
        seen = []
        async for position in place.waiting():
            seen.append(position)
            threading.Timer(0.01, ahead[len(seen) - 1].started).start()
        return seen

    assert asyncio.run(asyncio.wait_for(wait(), 10)) == [4, 3, 2]
    assert place.at_front


def test_an_api_client_that_leaves_while_waiting_never_generates(serve, llama_runner, monkeypatch):
    url, spy = serve(llama_runner)
    release = hold_generation(monkeypatch, llama_runner.model)
    running = chat(Client(url, verbose=False), message("A"), max_new_tokens=4000)
    wait_for(lambda: spy.streams, 30, "A to generate")

    def ask(text) -> socket.socket:
        """A streaming request sent over a raw socket (no answer comes before its turn)."""
        body = json.dumps({"messages": [{"role": "user", "content": text}], "stream": True}).encode()
        client = socket.create_connection(("127.0.0.1", int(url.rstrip("/").rsplit(":", 1)[1])))
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return client

    with ask("at the front, waiting for the engine"):
        wait_for(lambda: metric(url, "chat_queue_depth") == 1, 30, "the first to wait")
        with ask("behind it"):
            wait_for(lambda: metric(url, "chat_queue_depth") == 2, 30, "the second to wait")
    # both clients are gone (their sockets closed)
    wait_for(lambda: metric(url, "chat_queue_depth") == 0, 10, "both to leave the line")
    running.cancel()
    release.set()
    wait_for(lambda: spy.streams[0].finish_reason == "cancelled", 10, "A to stop")
    assert httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "next"}],
                                                         "max_tokens": 3}).status_code == 200
    assert [s.request_text for s in spy.streams] == ["A", "next"], "no generation for a client that left"


def test_a_waiting_place_moves_up_when_the_one_ahead_reads_its_files_and_back_if_it_leaves():
    line = WaitingLine(one_at_a_time=True, max_waiting=10)
    front, reading, place = line.join("ui"), line.join("ui"), line.join("ui")

    async def wait():
        seen = []
        async for position in place.waiting():
            seen.append(position)
            threading.Timer(0.01, [reading.reading_files, front.started][len(seen) - 1]).start()
        return seen

    assert asyncio.run(asyncio.wait_for(wait(), 10)) == [3, 2]
    assert place.at_front and place.position == 1
    reading.leave()  # (e.g. Stop while its files were read)
    assert place.position == 1 and line.waiting == 1


def test_time_to_first_token_counts_the_wait_in_line(serve, llama_runner, monkeypatch):
    """A request that waits behind another answer: its time to first token (the metric, the
    chat's "first token after") is what its user waited, the wait in line included."""
    import time
    url, spy = serve(llama_runner)
    release = hold_generation(monkeypatch, llama_runner.model)
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    answers = []
    first = threading.Thread(target=lambda: answers.append(httpx.post(url + "v1/chat/completions", json=ask, timeout=60)))
    first.start()
    wait_for(lambda: spy.streams, 30, "the first answer to begin")
    second = threading.Thread(target=lambda: answers.append(httpx.post(url + "v1/chat/completions", json=ask, timeout=60)))
    second.start()
    wait_for(lambda: spy.chats.line.waiting == 1, 30, "the second request to wait in line")
    time.sleep(0.3)  # (a wait in line longer than an answer's own first token)
    release.set()
    first.join(60)
    second.join(60)
    assert [answer.status_code for answer in answers] == [200, 200]
    held, waited = spy.streams
    wait_in_line = held.ended_at - waited.arrived_at
    assert waited.time_to_first_token > wait_in_line > waited.engine_time_to_first_token
    assert metric(url, "chat_time_to_first_token_seconds_sum") >= held.time_to_first_token + wait_in_line
