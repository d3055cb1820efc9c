"""The OpenAI-compatible API, the remote backend and the ops endpoints, driven with the
official `openai` client (and raw HTTP for the bad requests)."""

import base64
import dataclasses
import functools
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client, handle_file

import app
from config import Settings
from engine_contract import GenerationSettings
from openai_api import create_api
from tests.test_app import text_of
from remote_backend import RemoteRunner
from tests.conftest import break_forward, wait_for

ROOT = Path(__file__).resolve().parent.parent


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_question(image, text="What is in this picture?"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_url(image)}}]}]


def wait_until_ended(stream, seconds=5.0):
    return wait_for(lambda: stream.ended_at is not None, seconds, "generation to end")


def test_streamed_chunks_add_up_to_the_complete_answer(serve, idefics3_runner, images):
    url, spy = serve(idefics3_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused")
    messages = image_question(images["red"])
    whole = client.chat.completions.create(model=idefics3_runner.name, messages=messages,
                                           temperature=0, max_tokens=150)
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 150 and whole.usage.prompt_tokens > 10
    chunks = list(client.chat.completions.create(
        messages=messages, model=idefics3_runner.name, temperature=0, max_tokens=150, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) >= 3, "the answer must arrive in several chunks"
    assert "".join(contents) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 150
    assert sum(p["type"] == "image" for p in spy.calls[0][0][0]["content"]) == 1, "the image reached the model"


def test_models_and_health(serve, llama_runner):
    url, _ = serve(llama_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [llama_runner.name]
    assert client.models.retrieve(llama_runner.name).id == llama_runner.name
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"
    health = httpx.get(url + "healthz").json()
    runner = health.pop("runner")
    assert health == {"status": "ok", "problem": None, "model": llama_runner.name, "device": "cpu",
                      "dtype": "float32", "loaded": True}
    assert runner == dataclasses.asdict(llama_runner.info)
    assert (runner["name"], runner["device"], runner["dtype"], runner["loaded"]) == \
        (llama_runner.name, "cpu", "float32", True)


def test_stop_sequences_seed_and_model_name(serve, llama_runner):
    url, _ = serve(llama_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused")
    ask = functools.partial(client.chat.completions.create, messages=[{"role": "user", "content": "hi"}],
                            max_tokens=40, model=llama_runner.name)
    full = ask(temperature=0).choices[0].message.content
    cut = ask(temperature=0, stop=[full[15:18]])
    assert cut.choices[0].message.content == full[:full.find(full[15:18])]
    assert cut.choices[0].finish_reason == "stop"
    assert ask(temperature=1.2, seed=7).choices[0].message.content == \
        ask(temperature=1.2, seed=7).choices[0].message.content
    no_model = httpx.post(url + "v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0,
        "logprobs": False, "user": "extras are ignored"})
    assert no_model.json()["choices"][0]["message"]["content"] == full


def test_max_updates_per_second_applies_to_api_streams(serve, llama_runner):
    url, spy = serve(llama_runner, max_updates_per_second=2)
    with httpx.stream("POST", url + "v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 0, "stream": True},
            timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert spy.calls[-1][1].max_updates_per_second == 2
    started, ended = spy.streams[-1].started_at, spy.streams[-1].ended_at
    text_chunks = len(events) - 2  # (the role chunk and the finish chunk)
    assert text_chunks <= 2 + 2 * (ended - started), "the first update at once, then at most 2 a second"


BAD_REQUESTS = {
    "no messages": ({"messages": []}, 400, "messages"),
    "unknown role": ({"messages": [{"role": "function", "content": "x"}]}, 400, "role"),
    "tool result without its call id": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "tool_call_id"),
    "tool call arguments not JSON": ({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "f", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]}, 400, "arguments"),
    "last is assistant": ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    "not base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, "image_url"),
    "not an image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}]}]}, 400, "image_url"),
    "http image url": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/x.png"}}]}]}, 400, "image_url"),
    "temperature 50": ({"temperature": 50}, 400, "temperature"),
    "top_p 2": ({"top_p": 2}, 400, "top_p"),
    "negative max_tokens": ({"max_tokens": -5}, 400, "max_tokens"),
    "huge max_tokens": ({"max_completion_tokens": 10**7}, 400, "max_completion_tokens"),
    "n=3": ({"n": 3}, 400, "n"),
    "seed past 64 bits": ({"seed": 2**70}, 400, "seed"),
    "wrong model": ({"model": "gpt-4o"}, 404, "model"),
    "too long": ({"messages": [{"role": "user", "content": "tell me " * 3000}]}, 400, "messages"),
    "not json": (None, 400, None),
    "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "bogus"}]}]}, 400,
                          "messages[0].content[0].type"),
    "user content null": ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    "image_url part without one": ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
                                   "messages[0].content[0]"),
    "max_tokens true": ({"max_tokens": True}, 400, "max_tokens"),
    "stream 'yes'": ({"stream": "yes"}, 400, "stream"),
    "temperature as text": ({"temperature": "0.5"}, 400, "temperature"),
    "json_schema not an object": ({"response_format": {"type": "json_schema", "json_schema": "x"}}, 400,
                                  "response_format.json_schema"),
    "json_object with a schema": ({"response_format": {"type": "json_object", "schema": {"type": "object"}}}, 400,
                                  "response_format.schema"),
    "text with a json_schema": ({"response_format": {"type": "text", "json_schema": {"schema": {}}}}, 400,
                                "response_format.json_schema"),
    "json_schema with a typo": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "shema": {"type": "object"}}}}, 400, "response_format.json_schema.shema"),
    "tool_choice required without tools": ({"tool_choice": "required"}, 400, "tool_choice"),
    "tool_choice bogus without tools": ({"tool_choice": "bogus"}, 400, "tool_choice"),
    "tool_choice named without tools": ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, 400,
                                        "tool_choice"),
    "parallel_tool_calls without tools": ({"parallel_tool_calls": False}, 400, "parallel_tool_calls"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    "include_usage 'yes'": ({"stream": True, "stream_options": {"include_usage": "yes"}}, 400,
                            "stream_options.include_usage"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_in_openai_shape(serve, idefics3_runner, case):
    url, spy = serve(idefics3_runner)
    body, status, param = BAD_REQUESTS[case]
    if body is None:
        response = httpx.post(url + "v1/chat/completions", content=b"{nope",
                              headers={"content-type": "application/json"})
    else:
        response = httpx.post(url + "v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}], **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert param in (error["param"] or ""), error
    said = {"unknown part type": "messages[0].content[0].type: Input should be 'text', 'image_url'",
            "user content null": "A user message needs content.", "not json": "The body is not valid JSON",
            "image_url part without one": "An image_url part needs an image_url object."}
    assert error["message"].startswith(said.get(case, "")), "the 400 says what is wrong where it is"
    assert not spy.streams, "nothing was generated for a bad request"
    # and the server keeps serving
    ok = httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3})
    assert ok.status_code == 200


@pytest.mark.parametrize("sent", [{}, {"content": b'{"messages": []}'}, {"content": b"[1, 2]"}],
                         ids=["no body", "no content type", "a list"])
def test_a_body_that_is_not_a_json_object_is_told_so(serve, llama_runner, sent):
    url, spy = serve(llama_runner)
    response = httpx.post(url + "v1/chat/completions",
                          headers={} if sent.get("content") != b"[1, 2]" else {"content-type": "application/json"},
                          **sent)
    assert response.status_code == 400 and response.json()["error"]["message"] == (
        "The body must be a JSON object, sent with Content-Type: application/json."), response.text


def test_a_lone_surrogate_is_a_400_naming_where_it_is(serve, llama_runner):
    """(Valid JSON, as a client that cut an emoji in half sends it, but no text: it can't be
    encoded for the model or a server behind this one.)"""
    import json
    url, spy = serve(llama_runner)
    hi = {"role": "user", "content": "hi"}
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                 "function": {"name": "f", "arguments": "{}"}}]}
    cases = [
        ("chat/completions", {"messages": [{"role": "user", "content": "I love it \ud83d"}]}, "messages[0].content"),
        ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
         "messages[0].content[0].text"),
        ("chat/completions", {"stream": True, "messages": [hi, call, {"role": "tool", "tool_call_id": "c1",
                                                                      "content": "\udfff"}]}, "messages[2].content"),
        ("chat/completions", {"messages": [hi], "stop": ["\ud800"]}, "stop[0]"),
        ("responses", {"instructions": "Be brief.", "input": [hi, {"role": "user", "content": "\ud800"}]},
         "input[1].content"),
        ("completions", {"prompt": "Once upon a \ud800"}, "prompt"),
    ]
    for path, body, param in cases:
        limit = {"max_output_tokens": 5} if path == "responses" else {"max_tokens": 5}
        response = httpx.post(f"{url}v1/{path}", content=json.dumps({**limit, **body}),  # (ASCII: \ud800 escaped)
                              headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and "surrogate" in error["message"], (body, error)
    assert not spy.streams


def test_closing_a_stream_early_stops_generation(serve, idefics3_runner, images):
    url, spy = serve(idefics3_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused")
    stream = client.chat.completions.create(messages=image_question(images["red"]), temperature=0,
                                            max_tokens=2000, stream=True, model=idefics3_runner.name)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()
    generation = spy.streams[0]
    assert wait_until_ended(generation), "the server must stop generating when the client leaves"
    assert generation.finish_reason == "cancelled" and generation.new_tokens < 2000


def test_api_key_is_required_when_set(serve, llama_runner):
    url, _ = serve(llama_runner, api_key="s3cret")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url + "v1/chat/completions", json=body).status_code == 401
    wrong = httpx.post(url + "v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=url + "v1", api_key="s3cret")
    assert client.chat.completions.create(messages=body["messages"], max_tokens=2,
                                          model=llama_runner.name).choices[0].message.content


def test_the_key_is_checked_before_the_body_and_bearer_is_any_case(llama_runner):
    from fastapi.testclient import TestClient
    api = TestClient(create_api(llama_runner, app.waiting_line_for(llama_runner), Settings(api_key="s3cret")))
    malformed = api.post("/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert malformed.status_code == 401 and malformed.json()["error"]["code"] == "invalid_api_key"
    assert api.post("/responses", json={"input": 5}).status_code == 401
    for scheme in ("bearer", "BEARER", "Bearer"):
        answered = api.get("/models", headers={"Authorization": f"{scheme} s3cret"})
        assert answered.status_code == 200, scheme
    assert api.get("/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert api.get("/models", headers={"Authorization": "Bearer s3cre"}).status_code == 401


def test_api_is_off_on_a_network_address_without_a_key(llama_runner):
    from fastapi.testclient import TestClient
    api = TestClient(create_api(llama_runner, app.waiting_line_for(llama_runner), Settings(api_key=None),
                                open_without_key=False))
    response = api.get("/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "api_disabled"


def metric(url, name) -> float:
    for line in httpx.get(url + "metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            if line.split(" ")[0] == name or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_metrics_count_completed_stopped_and_failed(serve, llama_runner, monkeypatch):
    url, spy = serve(llama_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused")
    base = {k: metric(url, f'chat_requests_total{{outcome="{k}"}}') for k in ("completed", "stopped", "error")}
    tokens = metric(url, "chat_generated_tokens_total")
    client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                   model=llama_runner.name)
    stream = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=2000,
                                            stream=True, model=llama_runner.name)
    next(iter(stream)), next(iter(stream))
    stream.close()
    assert wait_until_ended(spy.streams[-1])
    break_forward(monkeypatch, llama_runner.model, RuntimeError("simulated failure"))
    failed = httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert failed.status_code == 500 and "simulated failure" in failed.json()["error"]["message"]
    after = {k: metric(url, f'chat_requests_total{{outcome="{k}"}}') for k in ("completed", "stopped", "error")}
    assert after == {"completed": base["completed"] + 1, "stopped": base["stopped"] + 1, "error": base["error"] + 1}
    assert metric(url, "chat_generated_tokens_total") >= tokens + 5
    assert metric(url, "chat_active_generations") == 0 and metric(url, "chat_queue_depth") == 0
    assert metric(url, "chat_time_to_first_token_seconds_count") >= 2


def test_remote_backend_streams_from_another_instance(serve, idefics3_runner, images):
    back_url, back_spy = serve(idefics3_runner)
    front_url, _ = serve(RemoteRunner(back_url + "v1"))
    client = Client(front_url, verbose=False)
    job = client.submit({"text": "Describe it.", "files": [handle_file(str(images["red"]))]}, "", 120, 0.0, 1.0,
                        api_name="/chat")
    texts = [text_of(o) for o in job if text_of(o)]
    assert len(texts) >= 2 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    sent = back_spy.calls[0][0]
    assert [p["type"] for p in sent[-1]["content"]] == ["image", "text"], "the image went upstream"
    with back_spy.original(sent, GenerationSettings(max_new_tokens=120)) as direct:
        *_, expected = direct
    assert texts[-1] == expected.answer

    # Stop on the front instance stops generation on the back one
    job = client.submit({"text": "Go on forever.", "files": []}, "", 1500, 0.0, 1.0, api_name="/chat")  # (it fits: a
    # max_tokens the back's context can't hold beside the conversation is refused there, as vLLM refuses it)
    wait_for(lambda: len([o for o in job.outputs() if text_of(o)]) >= 2 or job.done(), 30, "text to stream")
    assert not job.done()
    job.cancel()
    assert wait_until_ended(back_spy.streams[-1])
    assert back_spy.streams[-1].finish_reason == "cancelled" and back_spy.streams[-1].new_tokens < 1500
    client.close()


def test_remote_backend_unreachable_gives_a_clear_message(serve):
    from tests.conftest import free_port
    url, _ = serve(RemoteRunner(f"http://127.0.0.1:{free_port()}/v1", Settings(model="some-model")))
    client = Client(url, verbose=False)
    result = client.submit({"text": "hello", "files": []}, "", 20, 0.0, 1.0, api_name="/chat").result(timeout=60)
    assert result["metadata"]["title"] == app.ERROR_TITLE
    assert "Can't reach the model server" in result["content"]
    client.close()


def test_remote_backend_says_when_the_fault_is_the_server_not_the_request(serve, llama_runner, monkeypatch):
    """A client of this app's /v1 in front of a server: a key the server refuses is a 502 (this
    app's set-up, not the request), a busy server a 503 with its Retry-After, an unreachable
    one a 502; a bad request stays a 400."""
    back_url, _ = serve(llama_runner, api_key="sk-back")
    front = RemoteRunner(back_url + "v1", Settings(model=llama_runner.name, api_key="sk-wrong"))
    front_url, _ = serve(front, api_key="sk-front")
    ask = functools.partial(httpx.post, front_url + "v1/chat/completions", headers={"Authorization": "Bearer sk-front"},
                            timeout=30)
    refused = ask(json={"messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 502 and refused.json()["error"]["code"] == "upstream_error"
    assert "(401)" in refused.json()["error"]["message"] and "--api-key" in refused.json()["error"]["message"]

    busy = openai.RateLimitError("slow down", body=None, response=httpx.Response(
        429, headers={"retry-after": "7"}, request=httpx.Request("POST", back_url)))
    with monkeypatch.context() as patch:
        patch.setattr(front.client.chat.completions, "create", lambda **request: (_ for _ in ()).throw(busy))
        answer = ask(json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "server_busy"
    assert answer.headers["retry-after"] == "7"

    from tests.conftest import free_port
    gone_url, _ = serve(RemoteRunner(f"http://127.0.0.1:{free_port()}/v1", Settings(model="m")))
    gone = httpx.post(gone_url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                      timeout=30)
    assert gone.status_code == 502 and "Can't reach the model server" in gone.json()["error"]["message"]


def test_healthz_says_unavailable_while_the_model_server_cannot_be_reached(serve, monkeypatch):
    """A 503 with the reason once a request finds the server gone, and "ok" again when the
    server is back, found by /healthz itself (no chat needed)."""
    import http.server
    import json
    import threading

    import remote_backend
    from tests.conftest import free_port
    monkeypatch.setattr(remote_backend, "UNREACHABLE_RECHECK_S", 0.0)
    port = free_port()
    url, _ = serve(RemoteRunner(f"http://127.0.0.1:{port}/v1", Settings(model="m")))
    assert httpx.get(url + "healthz").json()["status"] == "ok", "nothing has found it gone yet"
    httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    health = httpx.get(url + "healthz", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert f"Can't reach the model server at http://127.0.0.1:{port}/v1" in health.json()["problem"]

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    back = http.server.ThreadingHTTPServer(("127.0.0.1", port), Models)
    threading.Thread(target=back.serve_forever, daemon=True).start()
    try:
        health = httpx.get(url + "healthz", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["problem"] is None
    finally:
        back.shutdown()
        back.server_close()


def test_remote_backend_needs_a_model_when_the_server_is_unreachable():
    from engine_contract import ModelLoadError
    from tests.conftest import free_port
    with pytest.raises(ModelLoadError, match="Can't reach the model server"):
        RemoteRunner(f"http://127.0.0.1:{free_port()}/v1")


def test_langgraph_example_streams_from_the_app(serve, llama_runner):
    pytest.importorskip("langgraph")
    url, spy = serve(llama_runner)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "langgraph_chat.py"), "Say something",
                             "--base-url", url + "v1", "--max-tokens", "30"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    client = openai.OpenAI(base_url=url + "v1", api_key="unused")
    expected = client.chat.completions.create(messages=[{"role": "user", "content": "Say something"}],
                                              temperature=0, max_tokens=30,
                                              model=llama_runner.name).choices[0].message.content
    assert result.stdout.rstrip("\n") == expected and expected


def test_bad_content_gets_a_400_from_the_engine_checks(serve, idefics3_runner, llama_runner, images):
    url, spy = serve(idefics3_runner)
    text_url, _ = serve(llama_runner)

    def post(base, content):
        return httpx.post(base + "v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})

    image = {"type": "image_url", "image_url": {"url": data_url(images["red"])}}
    cases = [
        (url, [{"type": "image_url", "image_url": {"url": data_url(images["bomb"])}}], "too large"),
        (url, [{"type": "image_url", "image_url": {"url": data_url(images["truncated"])}}], "not a readable image"),
        (url, [image] * 9, "Too many images"),
        (url, "   ", "empty"),
        (text_url, [{"type": "text", "text": "what is it?"}, image], "can't see images"),
    ]
    for base, content, expected in cases:
        response = post(base, content)
        assert response.status_code == 400, response.text
        assert expected in response.json()["error"]["message"]
    assert not spy.streams


def test_reasoning_comes_as_reasoning_content(serve, reasoning_runner):
    url, _ = serve(reasoning_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused")
    ask = functools.partial(client.chat.completions.create, model=reasoning_runner.name,
                            messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0,
                            max_tokens=60)
    completion = ask()
    whole = completion.choices[0].message
    assert whole.content and whole.reasoning_content and "</think>" not in whole.content
    thought = completion.usage.completion_tokens_details.reasoning_tokens
    written = len(reasoning_runner.tokenizer(whole.reasoning_content, add_special_tokens=False)["input_ids"])
    assert thought < completion.usage.completion_tokens and abs(thought - written) <= max(3, written // 5), \
        f"usage counts the reasoning's tokens ({thought}; its text is {written} tokens again), of the answer's"
    response = client.responses.create(model=reasoning_runner.name, input="What is 2+2?", temperature=0,
                                       max_output_tokens=60)
    assert response.usage.output_tokens_details.reasoning_tokens == thought, "the Responses API counts them alike"
    asked = [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]
    with RemoteRunner(url + "v1").stream(asked, GenerationSettings(max_new_tokens=60)) as remote:
        list(remote)
    assert remote.reasoning_tokens == thought, "a UI in front of this server (--backend openai) gets the count"
    chunks = list(ask(stream=True))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == whole.reasoning_content and content == whole.content


def test_an_answer_that_reaches_the_end_of_the_context_stops_there_with_length(serve, llama_runner):
    """(No max_tokens given: the default, 2000 here, is cut to the room left.)"""
    from tests.test_reliability import long_text
    url, _ = serve(llama_runner, max_new_tokens=2000)
    context = llama_runner.context_length
    prompt = long_text(llama_runner, context - 700)  # fits, with less room than the default answer
    response = httpx.post(url + "v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == context, "the answer ends where the context is full"


def test_a_max_tokens_the_context_cannot_hold_is_a_400_with_both_figures(serve, llama_runner):
    """(As OpenAI and vLLM: a client that asks for N tokens gets them or a 400, never fewer
    without a word; a larger request is never taken where a smaller one is refused.)"""
    from tests.test_reliability import long_text
    url, spy = serve(llama_runner)
    context = llama_runner.context_length
    prompt = long_text(llama_runner, context - 700)
    for field in ("max_tokens", "max_completion_tokens"):
        for asked in (2000, 800):
            response = httpx.post(url + "v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": prompt}], field: asked})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "context_length_exceeded"
            assert str(asked) in error["message"] and str(context) in error["message"], error["message"]
    fits = httpx.post(url + "v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 600})
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] <= 600
    legacy = httpx.post(url + "v1/completions", timeout=120, json={"prompt": prompt, "max_tokens": 2000})
    assert legacy.status_code == 400 and legacy.json()["error"]["code"] == "context_length_exceeded"
    assert legacy.json()["error"]["param"] == "prompt", "it names the legacy request's own field"
    assert "2000" in legacy.json()["error"]["message"]
    # a conversation: the max_tokens it asks for never costs it its earlier turns
    turns = [{"role": "user", "content": long_text(llama_runner, context // 3)}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "What did I say first?"}]
    whole = httpx.post(url + "v1/chat/completions", timeout=120, json={"messages": turns, "max_tokens": 5}).json()
    room = context - whole["usage"]["prompt_tokens"]
    kept = httpx.post(url + "v1/chat/completions", timeout=120, json={"messages": turns, "max_tokens": room})
    assert kept.status_code == 200 and kept.json()["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"], \
        "all of the conversation, and all of max_tokens"
    assert not kept.json().get("notices")
    refused = httpx.post(url + "v1/chat/completions", timeout=120, json={"messages": turns, "max_tokens": room + 1})
    assert refused.status_code == 400 and f"at most {room} tokens" in refused.json()["error"]["message"], \
        "refused, not answered with its first turns left out"


def test_remote_backend_honours_the_update_rate_it_is_given(serve, llama_runner):
    """The UI asks long chats for fewer updates (app.UPDATE_BUDGET_MESSAGES); a remote
    backend's stream must keep to it like the local engine's."""
    back_url, _ = serve(llama_runner)
    remote = RemoteRunner(back_url + "v1")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me a long story."}]}]
    counts = {}
    for rate in (3, 30):
        started = time.perf_counter()
        with remote.stream(messages, GenerationSettings(max_new_tokens=1200, max_updates_per_second=rate)) as stream:
            updates = list(stream)
        elapsed = time.perf_counter() - started
        assert updates[-1] == stream.reply and updates[-1].answer == stream.text and stream.new_tokens == 1200
        assert len(updates) <= rate * elapsed + 2, f"{len(updates)} updates in {elapsed:.1f} s at {rate}/s"
        counts[rate] = len(updates)
    assert counts[30] > 2 * counts[3]


@pytest.mark.parametrize("gone_during", ["http.response.start", "http.response.body"])
def test_a_client_gone_before_its_first_event_still_stops_generation(llama_runner, monkeypatch, gone_during):
    """Raw ASGI: the client disconnects while the SSE response starts, before the generator
    that would close the stream has run (or at its first event)."""
    import asyncio
    import json

    from tests.conftest import StreamSpy
    spy = StreamSpy(llama_runner)
    monkeypatch.setattr(llama_runner, "stream", spy)
    api = create_api(llama_runner, app.waiting_line_for(llama_runner))
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "max_tokens": 2000}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/chat/completions", "raw_path": b"/chat/completions", "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == gone_during:
            await asyncio.sleep(0.5)  # the disconnect is noticed meanwhile

    asyncio.run(asyncio.wait_for(api(scope, receive, send), 30))
    stream = spy.streams[0]
    assert stream.join(10) and stream.finish_reason == "cancelled" and stream.new_tokens < 2000


@pytest.mark.parametrize("batching", ["off", "on"])
def test_stopping_the_app_ends_api_answers_in_flight_at_once(tmp_path, batching):
    """SIGTERM (docker stop) while /v1 answers stream: each stream ends at once with an error
    event saying the server is stopping, then [DONE]; a request waiting its turn gets a 503;
    the app exits without logging that the engine failed."""
    import json
    import os
    import signal
    import threading

    from tests.conftest import free_port, wait_until_loaded
    from tests.tiny_models import build_bench_llama
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(port), "DATA_DIR": str(tmp_path / "data")}
    command = [sys.executable, str(ROOT / "app.py"), "--model", str(build_bench_llama(tmp_path / "bench-llama")),
               "--device", "cpu", "--batching", batching]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    ask = {"messages": [{"role": "user", "content": "tell me a very long story"}], "max_tokens": 6000,
           "temperature": 0}
    events, waiting = [], {}

    def stream():
        with httpx.stream("POST", url, json={**ask, "stream": True}, timeout=60) as response:
            events.extend(line[6:] for line in response.iter_lines() if line.startswith("data: "))

    def behind():
        waiting["response"] = httpx.post(url, json=ask, timeout=60)
    try:
        assert wait_until_loaded(port, process), "the app did not start"
        streaming = threading.Thread(target=stream)
        streaming.start()
        wait_for(lambda: len(events) >= 5, 60, "the answer to stream")
        waiter = threading.Thread(target=behind)
        waiter.start()
        time.sleep(0.5)  # (queued behind the stream, or batched beside it)
        process.send_signal(signal.SIGTERM)
        streaming.join(20)
        waiter.join(20)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "server_stopping", events[-3:]
    assert "server is stopping" in json.loads(events[-2])["error"]["message"]
    assert waiting["response"].status_code == 503
    assert waiting["response"].json()["error"]["code"] == "server_stopping"
    log = process.stderr.read().decode()
    assert "engine process stopped" not in log and "Traceback" not in log, log
