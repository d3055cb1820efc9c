"""OpenAI's Responses API (`POST /v1/responses`) on the engine that answers
/v1/chat/completions: a request is translated into a chat completion request (its input items
into chat messages, its function tools into chat tools, `text.format` into a response_format),
checked and answered exactly as one (the same line, the same refusals, constrained decoding),
and the answer is told as Responses output items (reasoning, message, function_call) and, when
streamed, as its typed events (response.created ... response.output_text.delta ...
response.completed). Stateless: nothing is stored, so `previous_response_id` is a 400.

The openai SDK's `client.responses.create(...)` and `client.responses.stream(...)` work
against it (tests/test_openai_keeps_its_word.py).
"""

from __future__ import annotations

import json
import re
import time
import uuid

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt

from engine_contract import GenerationError, Reply
from structured_output import JSON_SCHEMA_FIELDS

# Fields this server can't honour: a 400 naming each (the bookkeeping ones are IGNORED).
REFUSED = {
    "previous_response_id": "this server keeps no responses: send the whole conversation as input",
    "conversation": "this server keeps no conversations: send the whole conversation as input",
    "background": "responses run in the foreground only",
    "prompt": "stored prompt templates are not supported",
    "reasoning": "the model's reasoning can't be set per request here",
    "top_logprobs": "log probabilities are returned on /v1/chat/completions only",
    "max_tool_calls": "the number of tool calls can't be capped per request here",
    "include": "no extra output can be included",
}
IGNORED = ("store", "metadata", "user", "service_tier", "prompt_cache_key", "safety_identifier", "truncation")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    stream: StrictBool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: StrictBool | None = None
    text: dict | None = None
    # refused when set (REFUSED)
    previous_response_id: str | None = None
    conversation: str | dict | None = None
    background: StrictBool | None = None
    prompt: dict | None = None
    reasoning: dict | None = None
    top_logprobs: StrictInt | None = None
    max_tool_calls: StrictInt | None = None
    include: list | None = None
    # bookkeeping: accepted, ignored (IGNORED)
    store: StrictBool | None = None
    metadata: dict | None = None
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    truncation: str | None = None


class RequestProblem(ValueError):
    """A request this server can't answer: (param, message), for a 400."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def refused_field(request: BaseModel, refused: dict[str, str], harmless: dict | None = None) -> str | None:
    """The first field of `refused` that a request sets (to something other than None or its
    `harmless` value), for every API here: what a 400 names."""
    for field in refused:
        value = getattr(request, field)
        if value is not None and value != (harmless or {}).get(field, object()):
            return field
    return None


# Fields this request hands to the chat request as they are, under the chat's name (to_chat_request)
PASSED_ON = (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
             ("parallel_tool_calls", "parallel_tool_calls"))
# A chat request's fields by the names this request gave them, longest first
CHAT_FIELDS_IN_RESPONSES = (("response_format.json_schema.schema", "text.format.schema"),
                            ("response_format.json_schema", "text.format"), ("response_format", "text.format"),
                            *((theirs, ours) for ours, theirs in PASSED_ON if ours != theirs))
# Where a chat message's fields are in the input item it came from, by the item's type
ITEM_FIELDS = {"function_call": ((".tool_calls[0].function.arguments", ".arguments"),
                                 (".tool_calls[0].function.name", ".name"), (".tool_calls[0].id", ".call_id")),
               "function_call_output": ((".content", ".output"), (".tool_call_id", ".call_id"))}


class ChatRequest(dict):
    """The chat request a Responses request becomes (its body), knowing which input item
    each of its messages came from: `param_in_responses` names a chat field as the
    Responses request has it."""

    def __init__(self, body: dict, sources: list[tuple[str, str]]):
        super().__init__(body)
        self.sources = sources  # per message: (the Responses field, the input item's type)

    def param_in_responses(self, param: str | None) -> str | None:
        if param is None:
            return None
        message = re.match(r"messages\[(\d+)\]", param)
        if message and int(message.group(1)) < len(self.sources):
            source, kind = self.sources[int(message.group(1))]
            rest = param[message.end():]
            if kind in ("instructions", "text"):
                return source
            for chat, ours in ITEM_FIELDS.get(kind, ()):
                if rest.startswith(chat):
                    return source + ours + rest[len(chat):]
            return source + rest if kind == "message" else source
        if param.startswith("messages"):
            return "input"
        tool = re.match(r"tools\[\d+\]\.function", param)
        if tool:
            return param[:tool.end() - len(".function")] + param[tool.end():]
        for chat, ours in CHAT_FIELDS_IN_RESPONSES:
            if param == chat or param.startswith((chat + ".", chat + "[")):
                return ours + param[len(chat):]
        return param


def to_chat_request(body: ResponsesRequest) -> ChatRequest:
    """The request as /v1/chat/completions' body (a dict for its model): RequestProblem for
    what can't be."""
    field = refused_field(body, REFUSED, {"background": False, "include": [], "reasoning": {}})
    if field:
        raise RequestProblem(field, f"{field}: {REFUSED[field]}.")
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    sources = [("instructions", "instructions")] * len(messages)
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        sources.append(("input", "text"))
    else:
        for index, item in enumerate(body.input):
            converted = _chat_messages(item, f"input[{index}]")
            messages += converted
            sources += [(f"input[{index}]", item.get("type", "message"))] * len(converted)
    chat = {"model": body.model, "messages": messages, "stream": False}
    for ours, theirs in PASSED_ON:
        if getattr(body, ours) is not None:
            chat[theirs] = getattr(body, ours)
    if body.tools:
        chat["tools"] = [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(body.tools)]
    if body.tool_choice is not None:
        choice = body.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not choice.get("name"):
                raise RequestProblem("tool_choice", "tool_choice: auto, none, required or "
                                                    "{\"type\": \"function\", \"name\": ...}.")
            choice = {"type": "function", "function": {"name": choice["name"]}}
        chat["tool_choice"] = choice
    if not body.tools:  # (OpenAI's Responses API takes these without tools, and echoes them by default)
        if chat.get("tool_choice") in ("auto", "none"):
            del chat["tool_choice"]
        chat.pop("parallel_tool_calls", None)
    for key, value in (body.text or {}).items():
        if key != "format" and value is not None:
            raise RequestProblem(f"text.{key}", f"text.{key}: can't be set per request here (text.format can).")
    if body.text is not None and body.text.get("format") is not None:
        chat["response_format"] = _response_format(body.text["format"])
    return ChatRequest(chat, sources)


FORMAT_FIELDS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", *JSON_SCHEMA_FIELDS}}


def _response_format(form) -> dict:
    """text.format as a chat response_format: RequestProblem naming what is wrong in it."""
    if not isinstance(form, dict) or form.get("type") not in FORMAT_FIELDS:
        raise RequestProblem("text.format", "text.format: an object whose type is text, json_object or json_schema.")
    extra = sorted(set(form) - FORMAT_FIELDS[form["type"]])
    if extra:
        raise RequestProblem(f"text.format.{extra[0]}", f"text.format.{extra[0]}: not a field of a "
                                                        f"{form['type']} format.")
    if form["type"] != "json_schema":
        return {"type": form["type"]}
    if not isinstance(form.get("schema"), dict):
        raise RequestProblem("text.format.schema", "text.format.schema: a JSON schema (an object) is needed.")
    return {"type": "json_schema", "json_schema": {
        "name": form.get("name") or "answer", "schema": form["schema"], "strict": form.get("strict")}}


TEXT_PARTS = ("input_text", "output_text", "text")


def _chat_messages(item, param: str) -> list[dict]:
    if not isinstance(item, dict):
        raise RequestProblem(param, f"{param}: an input item (an object) is needed.")
    kind = item.get("type", "message")
    if kind == "message":
        role, content = item.get("role"), item.get("content")
        if isinstance(content, str):
            return [{"role": role, "content": content}]
        if not isinstance(content, list):
            raise RequestProblem(f"{param}.content", f"{param}.content: a string or a list of content parts.")
        parts = []
        for j, part in enumerate(content):
            where = f"{param}.content[{j}]"
            if not isinstance(part, dict):
                raise RequestProblem(where, f"{where}: a content part (an object with a type) is needed.")
            if part.get("type") in TEXT_PARTS:
                if not isinstance(part.get("text"), str):
                    raise RequestProblem(f"{where}.text", f"{where}.text: a string is needed.")
                parts.append({"type": "text", "text": part["text"]})
            elif part.get("type") == "input_image":
                url = part.get("image_url")
                if not isinstance(url, str):
                    raise RequestProblem(where, "input_image: an image_url (a data: URL) is needed "
                                                "(file_id is not supported).")
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                raise RequestProblem(where, f"A content part of type {part.get('type')!r} is not "
                                            f"supported (input_text, input_image).")
        if role == "assistant":  # (its text, as chat messages take it)
            return [{"role": role, "content": "".join(p.get("text", "") for p in parts)}]
        return [{"role": role, "content": parts}]
    if kind == "function_call":
        return [{"role": "assistant", "content": None, "tool_calls": [{
            "id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}]}]
    if kind == "function_call_output":
        output = item.get("output")
        return [{"role": "tool", "tool_call_id": item.get("call_id"),
                 "content": output if isinstance(output, str) else json.dumps(output)}]
    if kind == "reasoning":
        return []  # (the model's earlier reasoning is not sent back, as in the chat)
    raise RequestProblem(param, f"An input item of type {kind!r} is not supported (message, function_call, "
                                f"function_call_output, reasoning).")


def _chat_tool(tool: dict, param: str) -> dict:
    if tool.get("type") != "function":
        raise RequestProblem(param, f"Tools of type {tool.get('type')!r} are not supported here: function tools "
                                    f"only (the client runs them).")
    function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
    return {"type": "function", "function": function}


# ---------------------------------------------------------------- the answer as a response

def output_items(reply: Reply, most_calls: int | None = None, status: str = "completed") -> list[dict]:
    """A whole reply's parts as output items: reasoning, the message, each function call.
    (A streamed one is told item by item by `events`.)"""
    items = []
    if reply.reasoning is not None:
        items.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}",
                      "summary": [], "content": [{"type": "reasoning_text", "text": reply.reasoning}]})
    if reply.answer or not reply.tool_calls:
        items.append({"type": "message", "id": f"msg_{uuid.uuid4().hex}",
                      "status": status, "role": "assistant",
                      "content": [{"type": "output_text", "text": reply.answer, "annotations": []}]})
    for call in reply.tool_calls[:most_calls]:
        items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}",
                      "call_id": call.id, "name": call.name,
                      "arguments": json.dumps(call.arguments, ensure_ascii=False), "status": "completed"})
    return items


def response_object(body: ResponsesRequest, response_id: str, created: int, model: str, *, status: str,
                    output: list[dict], stream=None, chat: dict | None = None) -> dict:
    incomplete = status == "incomplete"
    usage = None
    if stream is not None and status != "in_progress":
        usage = {"input_tokens": stream.prompt_tokens or 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                 "output_tokens": stream.new_tokens, "output_tokens_details": {"reasoning_tokens": stream.reasoning_tokens},
                 "total_tokens": (stream.prompt_tokens or 0) + stream.new_tokens}
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "tools": body.tools or [], "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": None,
        "reasoning": None, "store": False, "text": body.text or {"format": {"type": "text"}},
        "truncation": "disabled", "metadata": body.metadata or {}, "usage": usage, "user": body.user,
    }


def final_status(stream) -> str:
    return "incomplete" if stream.finish_reason == "length" and not stream.reply.tool_calls else "completed"


async def complete(stream, updates, body: ResponsesRequest, model: str, most_calls: int | None) -> dict:
    async for _ in updates(stream):
        pass
    response_id, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    status = final_status(stream)
    return response_object(body, response_id, created, model, status=status,
                           output=output_items(stream.reply, most_calls, status), stream=stream)


async def events(stream, updates, body: ResponsesRequest, model: str, most_calls: int | None, error_code):
    """The answer as the Responses API's typed stream events (SSE `event:` + `data:`). Items
    are numbered as they open (reasoning, then the message, with each tool call where it
    comes); the reasoning closes before the message opens; the final response lists the
    items as they were sent."""
    response_id, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    sequence = iter(range(1 << 30))
    items: list[dict] = []   # as sent: {"index", "item"}; a text item also "open" and "text"
    by_kind: dict[str, dict] = {}

    def event(kind: str, **data) -> dict:
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": next(sequence), **data},
                                                  ensure_ascii=False)}

    def snapshot(status):
        return response_object(body, response_id, created, model, status=status, stream=stream,
                               output=[final_item(entry) for entry in items])

    def final_item(entry: dict) -> dict:
        item = entry["item"]
        if item["type"] == "reasoning":
            return {**item, "content": [{"type": "reasoning_text", "text": entry["text"]}]}
        if item["type"] == "message":
            return {**item, "status": final_status(stream),  # (closed once the answer ended)
                    "content": [{"type": "output_text", "text": entry["text"], "annotations": []}]}
        return item

    def open_text(kind: str) -> list[dict]:
        prefix = "rs" if kind == "reasoning" else "msg"
        item = {"type": kind, "id": f"{prefix}_{uuid.uuid4().hex}"}
        item.update({"summary": [], "content": []} if kind == "reasoning" else
                    {"status": "in_progress", "role": "assistant", "content": []})
        entry = {"index": len(items), "item": item, "open": True, "text": ""}
        items.append(entry)
        by_kind[kind] = entry
        part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else \
            {"type": "output_text", "text": "", "annotations": []}
        return [event("response.output_item.added", output_index=entry["index"], item=item),
                event("response.content_part.added", item_id=item["id"], output_index=entry["index"],
                      content_index=0, part=part)]

    def grow(kind: str, now: str) -> list[dict]:
        entry = by_kind[kind]
        if not now.startswith(entry["text"]) or now == entry["text"]:
            return []  # (a text that changed at the end stays as it was sent)
        delta, entry["text"] = now[len(entry["text"]):], now
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [event(name, item_id=entry["item"]["id"], output_index=entry["index"], content_index=0, delta=delta,
                      **extra)]

    def close_text(kind: str) -> list[dict]:
        entry = by_kind[kind]
        if not entry["open"]:
            return []
        entry["open"] = False
        item, index, text = entry["item"], entry["index"], entry["text"]
        done = "response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done"
        part = {"type": "reasoning_text", "text": text} if kind == "reasoning" else \
            {"type": "output_text", "text": text, "annotations": []}
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [event(done, item_id=item["id"], output_index=index, content_index=0, text=text, **extra),
                event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=part),
                event("response.output_item.done", output_index=index, item=final_item(entry))]

    def news(reply: Reply) -> list[dict]:
        out = []
        if reply.reasoning:
            if "reasoning" not in by_kind:
                out += open_text("reasoning")
            out += grow("reasoning", reply.reasoning)
        if reply.answer and (reply.reasoning is None or reply.reasoning_done):
            if "reasoning" in by_kind:
                out += close_text("reasoning")
            if "message" not in by_kind:
                out += open_text("message")
            out += grow("message", reply.answer)
        sent_calls = {entry["item"].get("call_id") for entry in items}
        for call in reply.tool_calls[:most_calls]:
            if call.id in sent_calls:
                continue
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id, "name": call.name,
                    "arguments": json.dumps(call.arguments, ensure_ascii=False), "status": "completed"}
            index = len(items)
            items.append({"index": index, "item": item})
            out += [event("response.output_item.added", output_index=index,
                          item={**item, "arguments": "", "status": "in_progress"}),
                    event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=item["arguments"]),
                    event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          arguments=item["arguments"], name=item["name"]),
                    event("response.output_item.done", output_index=index, item=item)]
        return out

    yield event("response.created", response=snapshot("in_progress"))
    yield event("response.in_progress", response=snapshot("in_progress"))
    try:
        async for reply in updates(stream):
            for item in news(reply):
                yield item
    except GenerationError as error:
        yield event("error", code=error_code(error), message=str(error), param=None)
        yield event("response.failed", response={**snapshot("failed"),
                                                 "error": {"code": "server_error", "message": str(error)}})
        return
    reply = stream.reply
    for item in news(reply):
        yield item
    if not items:  # (an empty answer is an empty message)
        for item in open_text("message"):
            yield item
    for kind in ("reasoning", "message"):
        if kind in by_kind:
            for item in close_text(kind):
                yield item
    status = final_status(stream)
    yield event("response.completed" if status == "completed" else "response.incomplete", response=snapshot(status))
