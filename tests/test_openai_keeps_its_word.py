"""The OpenAI API keeps its word (issue 22): structured outputs by constrained decoding, tool
calls that tool_choice requires, penalties applied, and every other field honoured or refused
with a 400 that names it. Driven with the official openai client and LangChain against the app
on tiny models with random weights: JSON that validates comes from the grammar, not the model."""

import json

import jsonschema
import openai
import pytest

from engine_contract import ChatInputError, GenerationSettings, Reply, ToolCall

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "celsius", "sunny", "sky"],
           "properties": {"city": {"type": "string", "maxLength": 24},
                          "celsius": {"type": "integer", "minimum": -60, "maximum": 60},
                          "sunny": {"type": "boolean"},
                          "sky": {"enum": ["clear", "cloudy", "rain"]},
                          "hours": {"type": "array", "maxItems": 3, "items": {"type": "integer"}}}}
GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}


def as_format(schema, name="weather"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture
def api(serve, tiny_model_paths):
    """(openai client, model name, spy) on the tiny tool-calling model."""
    from model_runner import ModelRunner
    runner = ModelRunner.load(str(tiny_model_paths["tools"]), device="cpu")
    url, spy = serve(runner)
    yield openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0), runner.name, spy
    runner.close()


def ask(client, model, text="What is the weather like?", **options):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          max_tokens=options.pop("max_tokens", 300), **options)


def test_json_schema_answers_validate_streamed_or_not_at_any_temperature(api):
    client, model, spy = api
    for seed in range(4):
        answer = ask(client, model, response_format=as_format(WEATHER), temperature=1.0, seed=seed)
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), WEATHER)
    chunks = ask(client, model, response_format=as_format(WEATHER), temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(json.loads(streamed), WEATHER)
    sent = spy.calls[-1][0]
    assert sent[0]["role"] == "system" and '"sky"' in sent[0]["content"][-1]["text"], "the model is shown the schema"


def test_free_text_without_a_format_is_not_json(api):
    client, model, _ = api
    text = ask(client, model, temperature=0, max_tokens=40).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(text)  # (the same model, unconstrained: the JSON above is the grammar's doing)


def test_json_object_is_an_object(api):
    client, model, _ = api
    answer = ask(client, model, response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize("schema, why", [
    ({"type": "nosuchtype"}, "Invalid type"),
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
])
def test_a_schema_the_grammar_cannot_follow_is_a_400_saying_why(api, schema, why):
    client, model, _ = api
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, model, response_format=as_format(schema))
    assert refused.value.body["param"] == "response_format" and why in refused.value.body["message"]


def test_required_and_named_tool_choice_always_call_the_tool(api):
    client, model, _ = api
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        for seed in range(3):
            answer = ask(client, model, "Hello there", tools=[GET_WEATHER], tool_choice=choice, temperature=1.0,
                         seed=seed)
            calls = answer.choices[0].message.tool_calls
            assert answer.choices[0].finish_reason == "tool_calls" and calls
            assert calls[0].function.name == "get_weather"
            jsonschema.validate(json.loads(calls[0].function.arguments), GET_WEATHER["function"]["parameters"])


def test_tools_with_nested_models_are_called_with_arguments_that_validate(api):
    """(pydantic's schema of nested models, as openai.pydantic_function_tool makes it: $defs
    and $refs, which must still resolve inside the call's grammar.)"""
    import pydantic

    class Place(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=12)
        country: str = pydantic.Field(max_length=12)

    class Trip(pydantic.BaseModel):
        start: Place
        stops: list[Place] = pydantic.Field(max_length=2)

    schema = Trip.model_json_schema()
    assert "$defs" in schema
    trip = {"type": "function", "function": {"name": "plan_trip", "parameters": schema}}
    client, model, _ = api
    for choice in ("required", {"type": "function", "function": {"name": "plan_trip"}}):
        for seed in range(2):
            answer = ask(client, model, "Plan a trip", tools=[GET_WEATHER, trip], tool_choice=choice,
                         temperature=1.0, seed=seed, max_tokens=400)
            assert answer.choices[0].finish_reason == "tool_calls"
            for call in answer.choices[0].message.tool_calls:
                if call.function.name == "plan_trip":
                    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_function_without_parameters_is_called_with_no_arguments(api):
    client, model, _ = api
    ping = {"type": "function", "function": {"name": "ping", "description": "Checks the line."}}
    for seed in range(3):
        answer = ask(client, model, "Hello", tools=[ping], tool_choice="required", temperature=1.0, seed=seed)
        calls = answer.choices[0].message.tool_calls
        assert calls and all(call.function.name == "ping" and json.loads(call.function.arguments) == {}
                             for call in calls)


def test_an_unbounded_number_is_a_finite_double(api):
    import math
    client, model, _ = api
    schema = {"type": "object", "additionalProperties": False, "required": ["x", "y"],
              "properties": {"x": {"type": "number"}, "y": {"type": ["number", "null"]}}}
    whole = []
    for seed in range(6):
        answer = ask(client, model, "A number", response_format=as_format(schema, "number"), temperature=1.0,
                     seed=seed, max_tokens=60)
        if answer.choices[0].finish_reason == "stop":  # (a number's fraction may run on to max_tokens)
            value = json.loads(answer.choices[0].message.content)
            assert all(v is None or (math.isfinite(v) and abs(v) < 2 ** 53) for v in value.values()), value
            whole.append(value)
    assert whole, "some answers ended, and were read"


def test_a_broken_tool_schema_is_blamed_on_the_tool_and_only_when_it_is_used(api):
    client, model, _ = api
    broken = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"word": {"type": "string", "pattern": "(?<=a)b"}}}}}
    plain = ask(client, model, "Hi", tools=[GET_WEATHER, broken], tool_choice="none",
                response_format={"type": "json_object"}, max_tokens=40)
    assert plain.choices[0].finish_reason in ("stop", "length") and not plain.choices[0].message.tool_calls
    for choice in ("auto", "required"):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(client, model, "Hi", tools=[GET_WEATHER, broken], tool_choice=choice,
                response_format={"type": "json_object"})
        assert refused.value.body["param"] == "tools[1].function.parameters", choice
        assert "look-around" in refused.value.body["message"]
    named = ask(client, model, "Hi", tools=[GET_WEATHER, broken], max_tokens=100,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather", "the broken tool isn't compiled"


def test_a_format_and_tools_together_give_json_or_a_call(api):
    client, model, _ = api
    for seed in range(3):
        message = ask(client, model, "What's the weather in Paris?", tools=[GET_WEATHER],
                      response_format=as_format(WEATHER), temperature=1.0, seed=seed).choices[0].message
        if message.tool_calls:
            assert message.tool_calls[0].function.name == "get_weather"
        else:
            jsonschema.validate(json.loads(message.content), WEATHER)


def test_penalties_change_what_is_repeated(serve, llama_runner):
    from collections import Counter
    url, _ = serve(llama_runner)
    client, model = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0), llama_runner.name

    def answer(**penalties):
        return ask(client, model, "hi", temperature=0, max_tokens=60, **penalties).choices[0].message.content

    def most_repeated_share(text):
        return max(Counter(text).values()) / len(text)
    plain, repeating = answer(), answer(frequency_penalty=-2.0)
    assert most_repeated_share(repeating) > 2 * most_repeated_share(plain), "a negative penalty favours repeats"
    assert answer(frequency_penalty=2.0, presence_penalty=2.0) != repeating


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("logit_bias", {"50": 10}), ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "low"), ("verbosity", "low"), ("web_search_options", {}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("top_logprobs", 2), ("no_such_field", 1),
])
def test_every_field_it_would_not_honour_is_a_400_naming_it(api, field, value):
    client, model, _ = api
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, model, max_tokens=5, extra_body={field: value})
    assert refused.value.body["param"] == field and field in refused.value.body["message"]


def test_bookkeeping_fields_are_accepted_and_change_nothing(api):
    client, model, _ = api
    plain = ask(client, model, "hi", temperature=0, max_tokens=12).choices[0].message.content
    same = ask(client, model, "hi", temperature=0, max_tokens=12, user="ann", metadata={"k": "v"}, store=False,
               service_tier="auto", n=1, modalities=["text"], logprobs=False,
               extra_body={"prompt_cache_key": "a", "safety_identifier": "b"}).choices[0].message.content
    assert same == plain


def test_parallel_tool_calls_false_answers_with_one_call():
    import asyncio

    from openai_api import complete
    reply = Reply(answer="", tool_calls=(ToolCall("a", {}, "call-1"), ToolCall("b", {}, "call-2")))

    class Ended:
        finish_reason, prompt_tokens, new_tokens, reasoning_tokens, error, notices = "stop", 3, 4, 0, None, []

        def __init__(self):
            self.reply = reply

        def __aiter__(self):
            return self

        async def __anext__(self):
            raise StopAsyncIteration
    import openai_api
    original = openai_api.updates
    openai_api.updates = lambda stream, stopping=None: stream
    try:
        both = asyncio.run(complete(Ended(), "id", 0, "m"))
        one = asyncio.run(complete(Ended(), "id", 0, "m", most_calls=1))
    finally:
        openai_api.updates = original
    assert len(both["choices"][0]["message"]["tool_calls"]) == 2
    assert [c["function"]["name"] for c in one["choices"][0]["message"]["tool_calls"]] == ["a"]


def test_with_batching_a_constrained_answer_is_refused_clearly(tiny_model_paths):
    from model_runner import ModelRunner
    runner = ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", batching="on")
    try:
        with pytest.raises(ChatInputError, match="--batching off"):
            runner.stream([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          GenerationSettings(max_new_tokens=5, response_format={"type": "json_object"}))
    finally:
        runner.close()


def test_langchain_with_structured_output_in_both_modes(api):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather in a city."""
        city: str = Field(max_length=24)
        celsius: int = Field(ge=-60, le=60)
        sunny: bool

    client, model, _ = api
    chat = ChatOpenAI(base_url=str(client.base_url), api_key="unused", model=model, temperature=0, max_tokens=200,
                      max_retries=0)
    for method in ("json_schema", "function_calling"):
        weather = chat.with_structured_output(Weather, method=method).invoke("The weather in Paris?")
        assert isinstance(weather, Weather), method


def test_logprobs_of_each_token_streamed_or_not(serve, llama_engine_or_runner):
    import math
    url, _ = serve(llama_engine_or_runner)
    client, model = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0), llama_engine_or_runner.name
    greedy = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                            temperature=0, logprobs=True, top_logprobs=3)
    entries = greedy.choices[0].logprobs.content
    assert len(entries) == greedy.usage.completion_tokens == 12
    assert "".join(entry.token for entry in entries) == greedy.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert sum(math.exp(top.logprob) for top in entry.top_logprobs) <= 1 + 1e-6
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob), "greedy: the most likely token"
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0.8, top_p=0.9, seed=3,
        logprobs=True, top_logprobs=0, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content or ()]
    assert len(streamed) == 12 and all(entry.top_logprobs == [] for entry in streamed)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "".join(entry.token for entry in streamed).replace("\ufffd", "")[:5] == text.replace("\ufffd", "")[:5]
    # sampled through top-p: a drawn token was inside the nucleus, so its probability is not 0
    assert all(entry.logprob > -9999 for entry in streamed)
    # the distribution the token was drawn from: nearly certain at a low temperature, unlike greedy's plain one
    cold = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                          temperature=0.05, seed=1, logprobs=True).choices[0].logprobs.content
    assert sum(entry.logprob for entry in cold) / 12 > -0.5 > sum(entry.logprob for entry in entries) / 12
    plain = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert plain.choices[0].logprobs is None, "only when asked"
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       top_logprobs=21)


def test_the_responses_api_round_trip_with_a_function_tool(api):
    client, model, spy = api
    hello = client.responses.create(model=model, input="Hello there", instructions="Be brief.", max_output_tokens=12,
                                    temperature=0)
    assert hello.status in ("completed", "incomplete") and hello.output[0].type == "message"
    assert hello.usage.output_tokens == spy.streams[-1].new_tokens
    assert spy.calls[-1][0][0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    cut = client.responses.create(model=model, input="Write a poem", max_output_tokens=2, temperature=0)
    assert cut.status == "incomplete" and cut.output[0].status == "incomplete", "its message is incomplete too"
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
            "parameters": GET_WEATHER["function"]["parameters"]}
    asked = client.responses.create(model=model, input="What's the weather in Paris?", tools=[tool],
                                    max_output_tokens=60, temperature=0)
    (call,) = [item for item in asked.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    answered = client.responses.create(model=model, tools=[tool], max_output_tokens=20, temperature=0, input=[
        {"role": "user", "content": "What's the weather in Paris?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "12 °C and sunny"}])
    sent = spy.calls[-1][0]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0].id == call.call_id and sent[2]["content"][0]["text"] == "12 °C and sunny"
    assert answered.output[-1].type == "message" and answered.output_text


def test_the_responses_api_streams_its_typed_events(api):
    client, model, spy = api
    with client.responses.stream(model=model, input="Hello there", max_output_tokens=12, temperature=0) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                         "response.incomplete")
    assert "response.output_text.delta" in kinds and final.output_text == spy.streams[-1].reply.answer
    with client.responses.stream(model=model, input="Write a poem", max_output_tokens=2, temperature=0) as cut:
        last = list(cut)[-1]
    assert last.type == "response.incomplete" and [item.status for item in last.response.output] == ["incomplete"]


def test_the_responses_api_takes_images_and_keeps_a_schema(serve, idefics3_runner, images):
    import base64
    url, spy = serve(idefics3_runner)
    client, model = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0), idefics3_runner.name
    picture = "data:image/png;base64," + base64.b64encode(images["red"].read_bytes()).decode()
    schema = {"type": "object", "additionalProperties": False, "required": ["colour"],
              "properties": {"colour": {"enum": ["red", "green", "blue"]}}}
    answer = client.responses.create(
        model=model, max_output_tokens=40, temperature=1.0,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Which colour?"},
                                            {"type": "input_image", "image_url": picture}]}],
        text={"format": {"type": "json_schema", "name": "colour", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(answer.output_text), schema)
    assert any(part["type"] == "image" for part in spy.calls[-1][0][-1]["content"]), "the image reached the engine"


@pytest.mark.parametrize("field, value", [
    ("previous_response_id", "resp_123"), ("reasoning", {"effort": "high"}), ("background", True),
    ("no_such_field", 1)])
def test_the_responses_api_refuses_what_it_cannot_honour(api, field, value):
    client, model, _ = api
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model, input="hi", extra_body={field: value})
    assert refused.value.body["param"] == field


def test_the_responses_api_names_a_bad_value_by_its_own_field(api):
    """(A Responses request is checked as the chat request it becomes: the 400 still names
    the Responses API's field.)"""
    client, model, _ = api
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model, input="hi", max_output_tokens=0)
    assert refused.value.body["param"] == "max_output_tokens"
    assert refused.value.body["message"].startswith("max_output_tokens: ")
    with pytest.raises(openai.BadRequestError) as refused:  # (past the server's limit: checked after the types)
        client.responses.create(model=model, input="hi", max_output_tokens=10**7)
    assert refused.value.body["param"] == "max_output_tokens"
    assert refused.value.body["message"].startswith("max_output_tokens: ")


MALFORMED_RESPONSES = [
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": {"type": "input_text", "text": "hi"}}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": ["hi"]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, "input[0].content[0].text"),
    ({"input": "hi", "text": {"format": "json_object"}}, "text.format"),
    ({"input": "hi", "text": {"format": {}}}, "text.format"),
    ({"input": "hi", "text": {"format": {"type": "json_object", "schema": {"type": "object"}}}},
     "text.format.schema"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
]


def test_malformed_responses_input_or_format_is_a_400_naming_the_field(api):
    import httpx
    client, _, spy = api
    for body, param in MALFORMED_RESPONSES:
        response = httpx.post(f"{client.base_url}responses", json={"max_output_tokens": 5, **body}, timeout=30)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(param), (body, error)
    assert not spy.streams
    for defaults in ({"tool_choice": "auto", "parallel_tool_calls": True}, {"tool_choice": "none"}):
        # (what OpenAI's Responses API takes without tools, and what its own responses echo)
        response = httpx.post(f"{client.base_url}responses", json={"input": "hi", "max_output_tokens": 3, **defaults},
                              timeout=60)
        assert response.status_code == 200, response.text


def test_the_responses_api_names_an_input_item_by_its_place(api):
    """(Its input items become chat messages, one or none each, after the instructions': a 400
    names the item the client sent.)"""
    import httpx
    client, _, spy = api
    call = [{"role": "user", "content": "hi"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{not json"},
            {"type": "function_call_output", "call_id": "c1", "output": "12 °C"}]
    cases = [
        ({"instructions": "Be brief.", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "What is it?"},
            {"type": "input_image", "image_url": "data:image/png;base64,@@@"}]}]}, "input[0].content[1].image_url"),
        ({"instructions": "Be brief.", "input": call}, "input[2].arguments"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
        ({"instructions": "Be brief.", "input": ""}, "input"),
        ({"instructions": "Be brief.", "input": [{"role": "assistant", "content": "hi"}]}, "input"),
        ({"input": [{"role": "user", "content": "hi"}, {"role": "user", "content": None}]}, "input[1].content"),
        ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {
            "type": "object", "properties": {"w": {"type": "string", "pattern": "(?<=a)b"}}}}],
          "tool_choice": "required"}, "tools[0].parameters"),
    ]
    for body, param in cases:
        response = httpx.post(f"{client.base_url}responses", json={"max_output_tokens": 5, **body}, timeout=30)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.json())
    assert not spy.streams


def test_legacy_completions_continue_the_prompt_as_it_is(serve, llama_runner):
    url, spy = serve(llama_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model=llama_runner.name, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 10
    assert spy.streams[-1].prompt_tokens == len(llama_runner.tokenizer("Once upon a time")["input_ids"]), \
        "no chat template around the prompt"
    streamed = client.completions.create(model=llama_runner.name, prompt="Once upon a time", max_tokens=10,
                                         temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == whole.choices[0].text
    for field, value in (("echo", True), ("best_of", 2), ("suffix", "the end"), ("logprobs", 2), ("prompt", ""),
                         ("seed", 2**70)):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=llama_runner.name, **{"prompt": "x", field: value})
        assert refused.value.body["param"] == field


def test_structured_outputs_in_the_engine_process_too(serve, llama_engine_process):
    """(The app's default: the engine in its own process, where the grammar runs.)"""
    url, _ = serve(llama_engine_process)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    for stream in (False, True):
        answer = client.chat.completions.create(
            model=llama_engine_process.name, messages=[{"role": "user", "content": "The weather?"}], max_tokens=300,
            response_format=as_format(WEATHER), temperature=1.0, seed=7, stream=stream)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in answer if chunk.choices) if stream \
            else answer.choices[0].message.content
        jsonschema.validate(json.loads(text), WEATHER)


def test_responses_events_stay_consistent_around_reasoning_and_calls():
    """Reasoning, then text, a tool call, more text, and a final parse that drops the text: the
    SDK's own stream accumulator takes every event (unique output indexes, closed items)."""
    import asyncio

    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    import responses_api
    from openai_api import api_error
    call = ToolCall("get_weather", {"city": "Paris"}, "call-1")
    replies = [Reply(reasoning="Let me", reasoning_done=False),
               Reply(reasoning="Let me think.", reasoning_done=True, answer="Sure"),
               Reply(reasoning="Let me think.", reasoning_done=True, answer="Sure", tool_calls=(call,)),
               Reply(reasoning="Let me think.", reasoning_done=True, answer="Sure, here", tool_calls=(call,))]

    class Stream:
        reply = Reply(reasoning="Let me think.", reasoning_done=True, answer="", tool_calls=(call,))
        finish_reason, prompt_tokens, new_tokens, reasoning_tokens = "stop", 5, 9, 3

    async def updates(stream):
        for reply in replies:
            yield reply

    async def collect():
        body = responses_api.ResponsesRequest(input="hi")
        return [json.loads(item["data"]) async for item in
                responses_api.events(Stream(), updates, body, "m", None,
                                     error_code=lambda error: api_error(error).body["error"]["code"])]
    raw = asyncio.run(collect())
    state, adapter = ResponseStreamState(input_tools=[], text_format=openai.NOT_GIVEN), TypeAdapter(ResponseStreamEvent)
    for data in raw:
        state.handle_event(adapter.validate_python(data))
    final = raw[-1]["response"]
    assert raw[-1]["type"] == "response.completed"
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "function_call"]
    added = [data["output_index"] for data in raw if data["type"] == "response.output_item.added"]
    assert added == [0, 1, 2], "each item its own index, in the order sent"
    assert final["output"][1]["content"][0]["text"] == "Sure, here", "the text as it was sent"
    done = [data["output_index"] for data in raw if data["type"] == "response.output_item.done"]
    assert sorted(done) == [0, 1, 2]
