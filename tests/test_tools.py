"""Tools: the model calls them, the app runs them (UI) or hands them back (API), and the chat
shows each call and its result as it happens. The tiny tool model (tests/tiny_models.py)
answers a user message with one fixed call, get_weather({"city": "Paris"}), and a tool's
result with text."""

import json
import textwrap
import threading
import time

import httpx
import openai
import pytest
from gradio_client import Client

import app
from config import Settings
from conversation import split_tool_calls
from engine_contract import ChatInputError, GenerationSettings, Signal, ToolCall
from model_runner import ModelRunner
from tests.conftest import wait_for
from tools import Toolbox, ToolsError

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def as_dicts(calls) -> list[dict]:
    """ToolCalls → {"name", "arguments"} (their ids are made fresh for each answer)."""
    return [{"name": call.name, "arguments": call.arguments} for call in calls]


def write_tools(tmp_path, body: str, name: str = "weather_tools.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


WEATHER = '''
    import time

    CALLS = []


    def get_weather(city: str) -> str:
        """The weather in a city now.

        Args:
            city: The city's name.
        """
        CALLS.append(city)
        return f"12 °C and sunny in {city}"


    def _helper():
        return "not a tool"
'''


@pytest.fixture(scope="module")
def tools_runner(tiny_model_paths):
    return ModelRunner.load(str(tiny_model_paths["tools"]), device="cpu")


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def answer(runner, messages, settings):
    with runner.stream(messages, settings) as stream:
        for _ in stream:
            pass
    return stream


# ---------------------------------------------------------------- the engine and the parsing

def test_the_tool_model_calls_its_tool_and_answers_its_result_with_text(tools_runner, tmp_path):
    toolbox = Toolbox.load([write_tools(tmp_path, WEATHER)])
    assert tools_runner.supports_tools
    settings = GenerationSettings(max_new_tokens=30, tools=toolbox.schemas)
    first = answer(tools_runner, chat("What's the weather in Paris?"), settings)
    assert as_dicts(first.reply.tool_calls) == [CALL] and first.reply.tool_calls[0].id
    assert first.reply.answer == first.text == "" and first.finish_reason == "stop"
    assert not first.reply.calling
    messages = [*chat("What's the weather in Paris?"),
                {"role": "assistant", "content": [], "tool_calls": [ToolCall(**CALL, id="call_1")]},
                {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                 "content": [{"type": "text", "text": "12 °C"}]}]
    second = answer(tools_runner, messages, settings)
    assert second.text and "<tool_call>" not in second.text and second.new_tokens == 30


def test_tools_too_long_for_the_context_are_named_as_the_part_that_does_not_fit(tools_runner):
    from tests.test_reliability import long_text
    wordy = {"type": "function", "function": {
        "name": "get_weather", "description": long_text(tools_runner, tools_runner.context_length),
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    with pytest.raises(ChatInputError, match=r"^The tools' descriptions are too long for the model: \d+ tokens "
                                             r"\(with this message \d+\).*Fewer tools"):
        tools_runner.stream(chat("hi"), GenerationSettings(max_new_tokens=10, tools=[wordy]))


def test_a_template_without_tools_support_is_detected(llama_runner, tools_runner):
    assert tools_runner.supports_tools and not llama_runner.supports_tools


def test_tool_calls_are_cut_out_of_streamed_text():
    assert split_tool_calls('Let me check. <tool_call>{"name": "f"}</tool_call> It is 12 °C.', final=True)[0] == \
        "Let me check.\n\nIt is 12 °C."
    assert split_tool_calls("Let me check.<tool_ca") == ("Let me check.", [], False)
    assert split_tool_calls('Let me check.<tool_call>\n{"name": "get_wea') == ("Let me check.", [], True)
    text = 'A<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>B<tool_call>{"name": "g"}</tool_call>'
    assert split_tool_calls(text, final=True) == ("A\n\nB", [{"name": "f", "arguments": {"x": 1}},
                                                       {"name": "g", "arguments": {}}], False)
    assert split_tool_calls("<tool_call>not json</tool_call>", final=True)[1] == []


# ---------------------------------------------------------------- the toolbox

def test_a_tools_file_becomes_tools_and_builtin_adds_ours(tmp_path):
    toolbox = Toolbox.load([write_tools(tmp_path, WEATHER), "builtin"])
    assert toolbox.names == ["get_weather", "calculate", "current_time"]  # _helper is private
    weather = toolbox.schemas[0]["function"]
    assert weather["name"] == "get_weather" and weather["parameters"]["required"] == ["city"]
    assert toolbox.run("calculate", {"expression": "(2 + 3) * 4 ** 2"}).text == "80"
    for attack in ("__import__('os').system('true')", "open('/etc/passwd')", "9 ** 9 ** 9", "().__class__"):
        result = toolbox.run("calculate", {"expression": attack})
        assert result.failed and result.text.startswith("error:")
    assert "UTC" in toolbox.run("current_time", {}).text


def test_a_tools_file_that_cannot_be_used_is_refused_in_one_line(tmp_path):
    no_docstring = write_tools(tmp_path, "def f(x: int) -> int:\n    return x\n", "bad.py")
    with pytest.raises(ToolsError, match=r"f\(\) needs type hints and a Google-style docstring"):
        Toolbox.load([no_docstring])
    with pytest.raises(ToolsError, match="no such file"):
        Toolbox.load([str(tmp_path / "missing.py")])


def test_a_tool_that_raises_or_hangs_gives_an_error_result_not_a_crash(tmp_path):
    toolbox = Toolbox.load([write_tools(tmp_path, '''
        import time


        def broken(city: str) -> str:
            """Always fails.

            Args:
                city: A city.
            """
            raise ConnectionError("the weather service is down")


        def slow(city: str) -> str:
            """Takes its time.

            Args:
                city: A city.
            """
            time.sleep(30)
            return "late"
    ''', "flaky.py")])
    assert toolbox.run("broken", {"city": "Paris"}).text == "error: ConnectionError: the weather service is down"
    started = time.perf_counter()
    result = toolbox.run("slow", {"city": "Paris"}, timeout=0.3)
    assert result.failed and "longer than 0.3 s" in result.text and time.perf_counter() - started < 2
    stop = Signal()
    threading.Timer(0.2, stop.set).start()
    assert toolbox.run("slow", {"city": "Paris"}, timeout=30, cancelled=stop).text == "error: stopped by the user"
    assert toolbox.run("broken", {"town": "Paris"}).text.startswith("error: TypeError")
    assert "no tool named 'nope'" in toolbox.run("nope", {}).text


# ---------------------------------------------------------------- the chat UI

def submit(client, text, max_new_tokens=30):
    return client.submit({"text": text, "files": []}, "", max_new_tokens, 0.0, 1.0, api_name="/chat")


def bubbles(output) -> list[dict]:
    return output if isinstance(output, list) else [output]


def titled(output, prefix):
    return [b for b in bubbles(output) if isinstance(b, dict) and
            ((b.get("metadata") or {}).get("title") or "").startswith(prefix)]


def serve_with_tools(serve, runner, tools_file, **options):
    return serve(runner, toolbox=Toolbox.load([tools_file]), **options)


def test_the_chat_runs_a_tool_and_shows_the_call_the_result_then_the_answer(serve, tools_runner, tmp_path):
    url, spy = serve_with_tools(serve, tools_runner, write_tools(tmp_path, WEATHER))
    client = Client(url, verbose=False)
    job = submit(client, "What's the weather in Paris?")
    final = job.result(timeout=60)
    outputs = job.outputs()
    pending = [o for o in outputs if any((b.get("metadata") or {}).get("status") == "pending"
                                         for b in titled(o, "🛠 get_weather"))]
    assert pending, "the call shows as pending while it runs"
    [call] = titled(final, "🛠 get_weather")
    assert call["metadata"]["status"] == "done" and call["metadata"]["duration"] is not None
    assert '"city": "Paris"' in call["content"] and "12 °C and sunny in Paris" in call["content"]
    answers = [b for b in bubbles(final) if not (b.get("metadata") or {}).get("title")]
    assert answers and "<tool_call>" not in answers[-1]["content"]
    assert bubbles(final).index(call) < bubbles(final).index(answers[-1])  # the call, then the answer
    assert not any("<tool_call>" in json.dumps(o) for o in outputs), "raw call text never shows"
    assert len(spy.calls) == 2 and spy.calls[1][0][-1]["role"] == "tool"
    assert spy.calls[1][0][-1]["content"][0]["text"] == "12 °C and sunny in Paris"
    assert "🛠 tools: get_weather" in app.header_markdown(tools_runner, Toolbox.load([write_tools(tmp_path, WEATHER)]))


def test_the_next_message_sends_the_calls_and_results_back_to_the_model(serve, tools_runner, tmp_path):
    """/chat keeps its session's conversation as the chat keeps it, tool calls and results
    included (no text parsed back): the next message's prompt holds them, as the model wrote them."""
    url, spy = serve_with_tools(serve, tools_runner, write_tools(tmp_path, WEATHER))
    client = Client(url, verbose=False)
    submit(client, "What's the weather in Paris?").result(timeout=60)
    submit(client, "and tomorrow?").result(timeout=60)
    messages = spy.calls[-1][0]
    assert [m["role"] for m in messages][:5] == ["user", "assistant", "tool", "assistant", "user"]
    assert messages[1]["tool_calls"][0].name == "get_weather"
    assert messages[1]["tool_calls"][0].arguments == {"city": "Paris"}
    assert messages[2]["content"][0]["text"] == "12 °C and sunny in Paris"
    assert messages[1]["tool_calls"][0].id == messages[2]["tool_call_id"]
    inputs = tools_runner.build_inputs(messages, tools=Toolbox.load([write_tools(tmp_path, WEATHER)]).schemas)
    prompt = tools_runner.tokenizer.decode(inputs["input_ids"][0])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n12 °C and sunny in Paris\n</tool_response>" in prompt
    client.close()


def test_a_note_every_step_of_a_tool_loop_gets_shows_once(serve, tools_runner, tmp_path):
    """(The history trimmed for the context is told by each generation of a tool loop: the
    answer says it once.)"""
    url, spy = serve_with_tools(serve, tools_runner, write_tools(tmp_path, WEATHER))
    note = "The oldest {} messages of this conversation were left out: the context is full."
    streaming = spy.original

    def with_the_note(messages, settings=None, **options):  # (a count that grows with the loop)
        stream = streaming(messages, settings, **options)
        stream.notices.append(note.format(len(messages)))
        return stream
    spy.original = with_the_note
    final = submit(Client(url, verbose=False), "What's the weather in Paris?").result(timeout=60)
    assert len(spy.calls) == 2, "a tool loop: the call, then the answer"
    assert [b["content"] for b in bubbles(final)].count(note.format(1)) == 1
    assert not any(str(b["content"]).startswith("The oldest 3") for b in bubbles(final)), "told once"


def test_a_tool_that_raises_shows_its_error_and_the_model_reads_it(serve, tools_runner, tmp_path):
    url, spy = serve_with_tools(serve, tools_runner, write_tools(tmp_path, '''
        def get_weather(city: str) -> str:
            """The weather.

            Args:
                city: A city.
            """
            raise TimeoutError("the weather service did not answer")
    '''))
    final = submit(Client(url, verbose=False), "weather?").result(timeout=60)
    [call] = titled(final, "🛠 get_weather")
    assert "error: TimeoutError: the weather service did not answer" in call["content"]
    assert spy.calls[1][0][-1]["content"][0]["text"] == "error: TimeoutError: the weather service did not answer"


def test_a_tool_that_times_out_is_abandoned_and_the_chat_goes_on(serve, tools_runner, tmp_path):
    url, spy = serve_with_tools(serve, tools_runner, write_tools(tmp_path, '''
        import time


        def get_weather(city: str) -> str:
            """The weather.

            Args:
                city: A city.
            """
            time.sleep(20)
            return "late"
    '''), tool_timeout_s=0.5)
    started = time.perf_counter()
    final = submit(Client(url, verbose=False), "weather?").result(timeout=60)
    assert time.perf_counter() - started < 15
    [call] = titled(final, "🛠 get_weather")
    assert "took longer than 0.5 s" in call["content"] and len(spy.calls) == 2


def test_the_tool_loop_stops_at_its_step_limit_with_a_note(serve, tools_runner, tmp_path):
    always_calls = write_tools(tmp_path, WEATHER)
    url, spy = serve_with_tools(serve, tools_runner, always_calls, max_tool_steps=1)
    # the tiny model answers a tool result with text; made to call again, it hits the limit
    real_stream = spy.original

    def every_answer_calls_again(messages, settings=None, **options):
        return real_stream([*messages[:-1], *chat("again")] if messages[-1]["role"] == "tool" else messages,
                           settings, **options)
    spy.original = every_answer_calls_again
    final = submit(Client(url, verbose=False), "weather?").result(timeout=60)
    notes = titled(final, app.NOTE_TITLE)
    assert notes and "more than 1 tool calls" in notes[-1]["content"]
    assert len(titled(final, "🛠 get_weather")) == 1 and len(spy.calls) == 2


def test_stop_while_a_tool_runs_stops_everything(serve, tools_runner, tmp_path):
    url, spy = serve_with_tools(serve, tools_runner, write_tools(tmp_path, f'''
        import time
        from pathlib import Path


        def get_weather(city: str) -> str:
            """The weather.

            Args:
                city: A city.
            """
            Path({str(tmp_path / "started")!r}).touch()
            time.sleep(10)
            return "late"
    '''))
    client = Client(url, verbose=False)
    job = submit(client, "weather?")
    wait_for(lambda: (tmp_path / "started").exists(), 30, "the tool to start")
    job.cancel()
    time.sleep(1.5)
    assert len(spy.calls) == 1, "no generation after Stop"
    assert all(s.join(0) for s in spy.streams)


def test_a_model_whose_template_ignores_tools_runs_without_them(serve, llama_runner, tmp_path):
    toolbox = Toolbox.load([write_tools(tmp_path, WEATHER)])
    assert "tools off" in app.header_markdown(llama_runner, toolbox)
    url, spy = serve(llama_runner, toolbox=toolbox)
    final = submit(Client(url, verbose=False), "weather?", max_new_tokens=10).result(timeout=60)
    assert not titled(final, "🛠") and spy.calls[0][1].tools is None


def test_a_message_sent_while_the_model_loads_gets_its_tools_run(tools_runner, tmp_path):
    """The tools are decided once the model has loaded (a loading slot says it takes none)."""
    toolbox = Toolbox.load([write_tools(tmp_path, WEATHER)])
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return tools_runner

    slot = app.ModelSlot("tools", slow_load, one_at_a_time=True).start()
    steps = app.make_answer_steps(slot, Settings(), toolbox=toolbox)(chat("What's the weather in Paris?"),
                                                                      GenerationSettings(max_new_tokens=30))
    assert next(steps).pending == app.LOADING_TITLE
    threading.Timer(0.5, loaded.set).start()
    *_, final = steps
    [call, result, answer] = final.messages
    assert as_dicts(call["tool_calls"]) == [CALL] and "12 °C and sunny in Paris" in app.text_of(result)
    assert "<tool_call>" not in json.dumps([app.text_of(m) for m in final.messages])


# ---------------------------------------------------------------- the API: the client's tools

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_the_api_returns_tool_calls_and_takes_their_results(serve, tools_runner):
    url, spy = serve(tools_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    response = client.chat.completions.create(model=tools_runner.name, messages=messages, tools=[WEATHER_TOOL],
                                              max_tokens=30)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "12 °C and sunny"}]
    after = client.chat.completions.create(model=tools_runner.name, messages=messages, tools=[WEATHER_TOOL],
                                           max_tokens=20)
    assert after.choices[0].finish_reason == "length" and after.choices[0].message.content
    assert not after.choices[0].message.tool_calls
    sent = spy.calls[-1][0]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0].arguments == {"city": "Paris"}
    assert sent[1]["tool_calls"][0].id == call.id == sent[2]["tool_call_id"]
    assert sent[2]["content"][0]["text"] == "12 °C and sunny"


def test_tools_go_through_the_engine_process_too(serve, tiny_model_paths):
    from engine_process import EngineProcess
    engine = EngineProcess.start(str(tiny_model_paths["tools"]), device="cpu")
    try:
        assert engine.supports_tools
        url, _ = serve(engine)
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}],
                                               tools=[WEATHER_TOOL], max_tokens=30).choices[0]
        assert reply.finish_reason == "tool_calls" and reply.message.tool_calls[0].function.name == "get_weather"
    finally:
        engine.close()


def test_the_api_streams_tool_calls_as_delta_chunks(serve, tools_runner):
    url, _ = serve(tools_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=tools_runner.name, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL],
        max_tokens=30, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in content and "get_weather" not in content
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_call_to_a_function_the_client_did_not_offer_is_text_not_a_call(serve, tools_runner):
    """(The tiny model calls get_weather whatever it is offered: a client's dispatcher knows
    only its own functions.)"""
    url, _ = serve(tools_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    get_time = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                                  "parameters": {"type": "object", "properties": {}}}}
    ask = dict(model=tools_runner.name, messages=[{"role": "user", "content": "weather?"}], tools=[get_time],
               max_tokens=30, temperature=0)
    whole = client.chat.completions.create(**ask).choices[0]
    assert not whole.message.tool_calls and whole.finish_reason != "tool_calls"
    assert '"name": "get_weather"' in whole.message.content
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert not [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    tool = {"type": "function", **get_time["function"]}
    response = client.responses.create(model=tools_runner.name, input="weather?", tools=[tool], max_output_tokens=30,
                                       temperature=0)
    assert [item.type for item in response.output] == ["message"] and "get_weather" in response.output_text
    offered = client.chat.completions.create(**{**ask, "tools": [get_time, WEATHER_TOOL]}).choices[0]
    assert offered.message.tool_calls[0].function.name == "get_weather", "an offered function is still called"


def test_the_api_refuses_tool_choices_it_cannot_honour(serve, tools_runner, llama_runner):
    url, _ = serve(tools_runner)
    base = {"model": tools_runner.name, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}
    for choice in ("anything", {"type": "function", "function": {"name": "unknown_tool"}}):
        response = httpx.post(url + "v1/chat/completions", json={**base, "tool_choice": choice}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice", choice
    bounded = {"type": "function", "function": {**WEATHER_TOOL["function"], "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
    required = httpx.post(url + "v1/chat/completions", timeout=30, json={  # (kept by constrained decoding:
        **base, "tools": [bounded], "tool_choice": "required", "max_tokens": 200})  # test_openai_keeps_its_word.py)
    assert required.status_code == 200 and required.json()["choices"][0]["finish_reason"] == "tool_calls"
    none = httpx.post(url + "v1/chat/completions", json={**base, "tool_choice": "none", "max_tokens": 5},
                      timeout=30)
    assert none.status_code == 200 and not none.json()["choices"][0]["message"].get("tool_calls")
    named = httpx.post(url + "v1/chat/completions", timeout=30, json={
        **base, "tools": [bounded], "max_tokens": 200,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.status_code == 200 and named.json()["choices"][0]["finish_reason"] == "tool_calls"
    url_llama, _ = serve(llama_runner)
    refused = httpx.post(url_llama + "v1/chat/completions", timeout=30,
                         json={**base, "model": llama_runner.name})
    assert refused.status_code == 400 and "tools" in refused.json()["error"]["message"]


def test_the_langgraph_example_with_bind_tools_runs_its_tool_against_the_app(serve, tools_runner):
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("langgraph")
    url, spy = serve(tools_runner)
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "examples" /
                                                  "langgraph_chat.py"), "--with-tools", "Weather in Paris?",
                             "--base-url", url + "v1", "--max-tokens", "20"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "[calling get_weather" in result.stdout
    assert "[tool get_weather → 12 °C and sunny in Paris]" in result.stdout  # run by the client
    first, second = spy.calls[-2][0], spy.calls[-1][0]
    assert [m["role"] for m in first] == ["user"] and [m["role"] for m in second] == ["user", "assistant", "tool"]
    assert second[2]["content"][0]["text"] == "12 °C and sunny in Paris"
    assert spy.calls[-1][1].tools[0]["function"]["name"] == "get_weather"
    assert result.stdout.strip().splitlines()[-1], "the answer after the tool's result"


# ---------------------------------------------------------------- review mends

HERMES_RESPONSE_TEMPLATE = {  # as transformers' serve has it for Qwen, with our role markers
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {"open_pattern": r"\s*<tool_call>", "close": "</tool_call>", "repeats": True,
                       "content": "json", "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"\s*<end_of_utterance>", "content": "text"},
    },
}


def test_a_tokenizers_response_template_parses_the_calls(tools_runner, monkeypatch, serve):
    monkeypatch.setattr(tools_runner, "response_template", HERMES_RESPONSE_TEMPLATE, raising=False)
    parsed, real_parse_reply = [], tools_runner.parse_reply

    def parse_reply(*args, **kwargs):
        parsed.append(real_parse_reply(*args, **kwargs))
        return parsed[-1]
    monkeypatch.setattr(tools_runner, "parse_reply", parse_reply)
    tools = Toolbox.load(["builtin"]).schemas
    stream = answer(tools_runner, chat("weather?"), GenerationSettings(max_new_tokens=30, tools=tools))
    assert parsed == [{"content": "", "tool_calls": [CALL]}], "the template's reading, at the end"
    assert stream.reply.answer == "" and as_dicts(stream.reply.tool_calls) == [CALL]
    # and it is what the app and the API go by, rather than their own reading of the text
    def parse_response(*args, **kwargs):
        return {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "current_time", "arguments": {}}}]}
    monkeypatch.setattr(tools_runner.tokenizer, "parse_response", parse_response, raising=False)
    url, spy = serve(tools_runner)
    reply = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0).chat.completions.create(
        model=tools_runner.name, messages=[{"role": "user", "content": "hi"}], max_tokens=30,
        tools=[WEATHER_TOOL, {"type": "function", "function": {"name": "current_time"}}]).choices[0]
    assert reply.message.content == "Checking." and reply.message.tool_calls[0].function.name == "current_time"


def test_a_tool_loops_next_step_goes_before_later_requests():
    import torch

    from model_runner import GenerationLoop, Job
    order, generating, release = [], threading.Event(), threading.Event()
    names = {}

    def serve(job):  # the loop's work for one request: here, noting the order
        order.append(names[job])
        if names[job] == "A":  # an answer generating while the others arrive
            generating.set()
            release.wait(10)

    loop = GenerationLoop(serve, torch.get_num_threads())
    try:
        for name, first in (("A", False), ("B", False), ("C", False), ("A's next step", True)):
            job = Job(chat(name), GenerationSettings(continues_answer=first))
            names[job] = name
            loop.submit(job)
            if name == "A":
                assert generating.wait(10)  # B asks first, then C, then A's next step
        release.set()
        wait_for(lambda: len(order) == 4, 10, "every request served")
    finally:
        release.set()
        loop.stop()
    assert order == ["A", "A's next step", "B", "C"]


def test_tools_files_with_dataclasses_and_string_annotations_load(tmp_path):
    toolbox = Toolbox.load([write_tools(tmp_path, '''
        from __future__ import annotations

        from dataclasses import dataclass


        @dataclass
        class Forecast:
            city: str
            celsius: float


        def forecast(city: str) -> dict:
            """Tomorrow's forecast.

            Args:
                city: A city.
            """
            return {"city": Forecast(city, 11.5).city, "celsius": 11.5}
    ''', "dc.py")])
    assert toolbox.run("forecast", {"city": "Oslo"}).text == '{"city": "Oslo", "celsius": 11.5}'


def test_the_calculator_never_holds_the_server_up():
    toolbox = Toolbox.load(["builtin"])
    for attack in ("round(1, -2*10**7)", "10**399 * 10**399 * 10**399", "(10**300)**2"):
        started = time.perf_counter()
        result = toolbox.run("calculate", {"expression": attack})
        assert result.failed and time.perf_counter() - started < 0.5, attack


def test_a_call_cut_off_by_the_length_limit_never_shows():
    assert split_tool_calls('Let me look.<tool_call>\n{"name": "get_wea', final=True) == ("Let me look.", [], False)


def test_a_tool_round_trip_reaches_a_remote_server_whole():
    from remote_backend import to_openai_message
    assert to_openai_message({"role": "assistant", "content": [], "tool_calls": [
        ToolCall("get_weather", {"city": "Paris"}, "c1")]}) == {
        "role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert to_openai_message({"role": "tool", "tool_call_id": "c1", "name": "get_weather",
                              "content": [{"type": "text", "text": "12 °C"}]}) == {
        "role": "tool", "content": "12 °C", "tool_call_id": "c1"}


# ---------------------------------------------------------------- the remote backend: the server's tools

def test_the_chat_runs_tools_through_a_remote_server(serve, tools_runner, tmp_path):
    """--backend openai in front of a server that takes tools: the chat's tools go upstream, the
    server's call runs here, and its result goes back upstream for the answer."""
    from remote_backend import RemoteRunner
    back_url, back_spy = serve(tools_runner)
    remote = RemoteRunner(back_url + "v1")
    assert remote.supports_tools and remote.info.tools_off == ""
    url, _ = serve_with_tools(serve, remote, write_tools(tmp_path, WEATHER))
    client = Client(url, verbose=False)
    job = submit(client, "What's the weather in Paris?")
    final = job.result(timeout=60)
    [call] = titled(final, "🛠 get_weather")
    assert call["metadata"]["status"] == "done" and "12 °C and sunny in Paris" in call["content"]
    answers = [b for b in bubbles(final) if not (b.get("metadata") or {}).get("title")]
    assert answers and answers[-1]["content"] and not any("<tool_call>" in json.dumps(o) for o in job.outputs())
    (asked, asked_with), (told, _) = back_spy.calls[-2:]
    assert [tool["function"]["name"] for tool in asked_with.tools] == ["get_weather"]
    assert not asked_with.tool_call_required, "the chat lets the model choose (tool_choice auto)"
    assert [m["role"] for m in told] == ["user", "assistant", "tool"]
    assert told[1]["tool_calls"][0].arguments == {"city": "Paris"}
    assert told[1]["tool_calls"][0].id == told[2]["tool_call_id"]
    assert told[2]["content"][0]["text"] == "12 °C and sunny in Paris"
    client.close()


def test_the_api_passes_tools_through_a_remote_server(serve, tools_runner):
    from remote_backend import RemoteRunner
    back_url, back_spy = serve(tools_runner)
    front_url, _ = serve(RemoteRunner(back_url + "v1"))
    client = openai.OpenAI(base_url=front_url + "v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL],
        max_tokens=30, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert back_spy.calls[-1][1].tools == [WEATHER_TOOL] and not back_spy.calls[-1][1].tool_call_required
    client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "weather?"}],
                                   tools=[WEATHER_TOOL, {**WEATHER_TOOL, "function": {"name": "get_time"}}],
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                   max_tokens=3)
    assert back_spy.calls[-1][1].tools == [WEATHER_TOOL] and back_spy.calls[-1][1].tool_call_required, \
        "a named tool_choice reaches the server as that tool, required"
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [{"id": deltas[0].id, "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": deltas[0].id, "content": "12 °C"}]
    after = client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL], max_tokens=10)
    assert after.choices[0].message.content and not after.choices[0].message.tool_calls
    sent = back_spy.calls[-1][0]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"] and sent[1]["tool_calls"][0].id == deltas[0].id


def test_a_remote_server_that_refuses_tools_has_them_off_and_says_why(serve, llama_runner, tmp_path):
    """With tools for the chat, the app asks the server at start whether it takes them; one
    that refuses has them off, and says so. Without, a /v1 client's tools go upstream and the
    server's refusal comes back as a 400 in its words."""
    from remote_backend import RemoteRunner
    back_url, back_spy = serve(llama_runner)
    remote = RemoteRunner(back_url + "v1", Settings(tools=("builtin",)))
    assert not remote.supports_tools
    assert remote.info.tools_off.startswith("the model server refuses tools (This model can't call tools here")
    toolbox = Toolbox.load([write_tools(tmp_path, WEATHER)])
    assert "🛠 tools off: the model server refuses tools" in app.header_markdown(remote, toolbox)
    url, spy = serve(remote, toolbox=toolbox)
    final = submit(Client(url, verbose=False), "weather?", max_new_tokens=10).result(timeout=60)
    assert not titled(final, "🛠") and spy.calls[0][1].tools is None, "the chat goes on without tools"
    refused = httpx.post(url + "v1/chat/completions", json={
        "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER_TOOL]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "tools_not_supported"
    assert "the model server refuses tools" in refused.json()["error"]["message"]

    asked = len(back_spy.calls)
    plain = RemoteRunner(back_url + "v1")  # no tools of its own: nothing asked at start
    assert plain.supports_tools and len(back_spy.calls) == asked
    front_url, _ = serve(plain)
    refused = httpx.post(front_url + "v1/chat/completions", json={
        "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER_TOOL]})
    assert refused.status_code == 400 and "This model can't call tools here" in refused.json()["error"]["message"]


def test_a_remote_server_that_wont_say_leaves_tools_on_and_a_refused_key_is_a_load_error(serve, tools_runner):
    from engine_contract import ModelLoadError
    from remote_backend import RemoteRunner
    from tests.conftest import free_port
    silent = RemoteRunner(f"http://127.0.0.1:{free_port()}/v1", Settings(model="tools", tools=("builtin",)))
    assert silent.supports_tools, "no answer at start: tools are sent, and the answers will say"
    back_url, _ = serve(tools_runner, api_key="sk-right")
    with pytest.raises(ModelLoadError, match="401"):
        RemoteRunner(back_url + "v1", Settings(model="tools", tools=("builtin",), api_key="sk-wrong"))


def test_a_remote_server_that_was_silent_at_start_and_refuses_tools_has_them_off_after_one_refusal(
        serve, llama_runner, tmp_path):
    """The server was still loading at start (no answer: tools on). The first request with
    tools that it refuses says so and turns them off: the next message goes without."""
    from engine_contract import ChatInputError
    from remote_backend import RemoteRunner
    from tests.conftest import free_port
    remote = RemoteRunner(f"http://127.0.0.1:{free_port()}/v1", Settings(model=llama_runner.name, tools=("builtin",)))
    assert remote.supports_tools
    back_url, back_spy = serve(llama_runner)  # (up now; llama's template takes no tools)
    remote.client = remote.client.with_options(base_url=back_url + "v1")
    with pytest.raises(ChatInputError, match="can't call tools here.*off from now on: send again"):
        remote.stream(chat("weather?"), GenerationSettings(max_new_tokens=5, tools=[WEATHER_TOOL]))
    assert not remote.supports_tools and remote.info.tools_off.startswith("the model server refuses tools")
    url, spy = serve(remote, toolbox=Toolbox.load([write_tools(tmp_path, WEATHER)]))
    assert submit(Client(url, verbose=False), "weather?", max_new_tokens=5).result(timeout=60)
    assert spy.calls[-1][1].tools is None and back_spy.calls[-1][1].tools is None, "answered without tools"


def test_a_tools_pictures_reach_a_remote_server_after_the_results(monkeypatch, images):
    """OpenAI's API takes a tool's result as text: its pictures follow the results in a user
    message, as the local engine gives them to a model's template."""
    from remote_backend import RemoteRunner
    from tests.conftest import free_port
    remote = RemoteRunner(f"http://127.0.0.1:{free_port()}/v1", Settings(model="m"))
    sent = []
    monkeypatch.setattr(remote.client.chat.completions, "create", lambda **request: sent.append(request) or [])
    call = ToolCall("red_square", {}, "call_1")
    messages = [*chat("Draw"), {"role": "assistant", "content": [], "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "name": "red_square",
                 "content": [{"type": "text", "text": "drawn"}, {"type": "image", "image": str(images["red"])}]}]
    list(remote.stream(messages, GenerationSettings(max_new_tokens=5)))
    upstream = sent[0]["messages"]
    assert [m["role"] for m in upstream] == ["user", "assistant", "tool", "user"]
    assert upstream[2]["content"] == "drawn" and upstream[2]["tool_call_id"] == "call_1"
    assert upstream[3]["content"][0] == {"type": "text", "text": "The pictures the tools returned:"}
    assert upstream[3]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_a_remote_servers_calls_written_in_pieces_are_read_whole():
    """vLLM writes a call's id and name first, then its arguments in pieces, then the next call."""
    from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall as Delta
    from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCallFunction as Function

    from remote_backend import CallsBeingWritten
    calls = CallsBeingWritten()
    calls.add([Delta(index=0, id="call_a", type="function", function=Function(name="get_weather", arguments=""))])
    assert calls.so_far() == ((), True), "a call being written is not shown yet"
    for piece in ['{"ci', 'ty": ', '"Paris"}']:
        calls.add([Delta(index=0, function=Function(arguments=piece))])
    calls.add([Delta(index=1, id="call_b", type="function", function=Function(name="get_time", arguments='{"zo'))])
    made, calling = calls.so_far()
    assert as_dicts(made) == [CALL] and made[0].id == "call_a" and calling
    assert calls.so_far()[0][0] is made[0], "a complete call is made once"
    assert calls.at_end(cut_off=True) == (made, []), "the last call, cut off by the length limit, is left out"
    assert calls.at_end(cut_off=False) == (made, ['<tool_call>get_time {"zo</tool_call>']), \
        "a call that can't be read shows as text"

    ollama = CallsBeingWritten()  # every call whole, each at index 0 under its own id
    ollama.add([Delta(index=0, id="call_a", function=Function(name="get_weather", arguments='{"city": "Paris"}'))])
    ollama.add([Delta(index=0, id="call_b", function=Function(name="get_weather", arguments='{"city": "Oslo"}'))])
    made, _ = ollama.at_end(cut_off=False)
    assert [(call.id, call.arguments) for call in made] == [("call_a", {"city": "Paris"}), ("call_b", {"city": "Oslo"})]


def test_templates_whose_calls_the_app_cannot_read_have_tools_off(reasoning_runner, idefics3_runner):
    assert not reasoning_runner.supports_tools and not idefics3_runner.supports_tools


def test_models_of_a_known_type_get_transformers_response_template(tools_runner, monkeypatch):
    """Qwen 3.5 writes <tool_call><function=…> inside the Hermes tags: transformers' serve keeps
    a response_template for it (and Qwen2/2.5/3, Gemma 4), and so does the engine."""
    assert tools_runner.response_template is None  # a Llama without one: the Hermes reading
    runner = ModelRunner(tools_runner.model, None, tools_runner.tokenizer, settings=Settings(), name="q",
                         device="cpu", dtype=tools_runner.dtype, is_vision=False, loop_thread=False)
    monkeypatch.setattr(tools_runner.model.config, "model_type", "qwen3_5")
    template = runner.response_template
    assert template and "tool_calls" in template["fields"]
    qwen35 = '<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>'
    assert split_tool_calls("Checking." + qwen35) == ("Checking.", [], False), "hidden while it streams"
    assert split_tool_calls("Checking." + qwen35, final=True)[0].endswith("</tool_call>"), "kept if unread"
    parsed = tokenizer_parse(tools_runner.tokenizer, template, "Checking." + qwen35)
    assert parsed["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}


def tokenizer_parse(tokenizer, template, text):
    return tokenizer.parse_response(text, template, prefix="")
