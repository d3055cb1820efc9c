"""OpenAI-compatible API served beside the chat UI (same process, same port, same engine).

    POST /v1/chat/completions   stream: true → Server-Sent Events (chat.completion.chunk),
                                stream: false → one chat.completion with usage
    GET  /v1/models             the loaded model

Images come as `image_url` content parts holding `data:` URLs (base64 PNG/JPEG/WebP);
http(s) URLs are refused, so the server never fetches arbitrary addresses. Errors use
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx for every
bad request. A client that disconnects stops its generation within one token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import re
import threading
import time
import uuid
from typing import Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

import config
from conversation import load_image
from conversation import answer_and_tool_calls
from engine_contract import Cancelled, ChatInputError, GenerationError, GenerationSettings
from waiting_line import LineFull, WaitingLine

DATA_URL = re.compile(r"^data:(image/(?:png|jpeg|jpg|webp|gif));base64,(.*)$", re.DOTALL)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


class ClientGone(Exception):
    """The client disconnected while its request waited in line."""


# ---------------------------------------------------------------- request schema

class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = "{}"   # a JSON object, as a string (OpenAI's shape)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None     # an assistant's calls
    tool_call_id: str | None = None              # a tool's result: for which call
    name: str | None = None


class FunctionSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionSchema


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown extras are ignored, not fatal
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=config.settings.api_max_messages)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=config.settings.max_new_tokens_limit)
    max_completion_tokens: int | None = Field(None, ge=1, le=config.settings.max_new_tokens_limit)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream_options: dict | None = None
    tools: list[Tool] | None = Field(None, max_length=config.settings.api_max_tools)
    tool_choice: str | dict | None = None

    @field_validator("stop")
    @classmethod
    def _few_stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > config.settings.api_max_stop_strings:
            raise ValueError(f"at most {config.settings.api_max_stop_strings} stop sequences")
        return stops


# ---------------------------------------------------------------- request → engine

def to_engine_messages(request: ChatCompletionRequest) -> list[dict]:
    """OpenAI messages → the engine's neutral messages (images decoded to PIL, tool-call
    arguments decoded from their JSON strings). A bad image in the last message is a 400;
    one in an earlier message was refused when it was sent, so it is left out, as in the
    chat UI, rather than blocking the conversation."""
    messages = []
    last = len(request.messages) - 1
    names_of_calls = {}
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None and not message.tool_calls and role != "tool":
            continue
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}] if content or role == "tool" else []
        else:
            parts = []
            for j, part in enumerate(content):
                param = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                elif part.image_url is None:
                    raise APIError(400, "An image_url part needs an image_url object.", param=param)
                else:
                    try:
                        parts.append({"type": "image", "image": decode_image(part.image_url.url,
                                                                              param + ".image_url")})
                    except APIError:
                        if i == last:
                            raise
        converted = {"role": role, "content": parts}
        if message.tool_calls and role == "assistant":
            converted["tool_calls"] = [{"id": call.id, "name": call.function.name,
                                        "arguments": decode_arguments(call.function.arguments,
                                                                      f"messages[{i}].tool_calls[{k}]")}
                                       for k, call in enumerate(message.tool_calls)]
            names_of_calls.update({call.id: call.function.name for call in message.tool_calls})
        if role == "tool":
            if not message.tool_call_id:
                raise APIError(400, "A tool message needs the tool_call_id of the call it answers.",
                               param=f"messages[{i}].tool_call_id")
            converted["tool_call_id"] = message.tool_call_id
            converted["name"] = message.name or names_of_calls.get(message.tool_call_id, "")
        messages.append(converted)
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise APIError(400, "The last message must be a user message (or a tool's result).", param="messages")
    return messages


def decode_arguments(arguments: str, param: str) -> dict:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        raise APIError(400, "A tool call's arguments must be a JSON object (as a string).",
                       param=param + ".function.arguments") from None
    if not isinstance(value, dict):
        raise APIError(400, "A tool call's arguments must be a JSON object.", param=param + ".function.arguments")
    return value


def tools_of(request: ChatCompletionRequest, supports_tools: bool) -> list[dict] | None:
    """The tools the model is shown, as tool_choice says: auto (all), none (none), or a named
    function (that one alone: the model is shown only it, not forced to call it)."""
    if not request.tools or request.tool_choice == "none":
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    choice = request.tool_choice
    if choice in (None, "auto"):
        pass
    elif isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        tools = [tool for tool in tools if tool["function"]["name"] == name]
        if not tools:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools.", param="tool_choice")
    else:
        raise APIError(400, "tool_choice can be auto, none or {\"type\": \"function\", \"function\": "
                            "{\"name\": ...}}; required is not supported (the model can't be forced "
                            "to call a tool).", param="tool_choice")
    if not supports_tools:
        raise APIError(400, "This model's chat template doesn't take tools, so it can't call them; "
                            "send the request without tools.", param="tools", code="tools_not_supported")
    return tools


def decode_image(url: str, param: str):
    if url.startswith(("http://", "https://")):
        raise APIError(400, "Image URLs are not fetched by this server; send the image inline "
                            "as a data: URL (data:image/png;base64,...).", param=param,
                       code="image_url_not_supported")
    match = DATA_URL.match(url)
    if not match:
        raise APIError(400, "Images must be data: URLs with a base64 PNG, JPEG, WebP or GIF "
                            "(data:image/png;base64,...).", param=param, code="invalid_image")
    if len(match.group(2)) > config.settings.api_max_image_bytes * 4 // 3 + 4:
        raise APIError(400, f"The image is larger than {config.settings.api_max_image_bytes // 2**20} MB.", param=param,
                       code="image_too_large")
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "The image's base64 data is invalid.", param=param,
                       code="invalid_image") from None
    try:
        return load_image(io.BytesIO(data))
    except ChatInputError as error:
        raise APIError(400, str(error), param=param, code="invalid_image") from None


def to_settings(request: ChatCompletionRequest, default_max_tokens: int) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or default_max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,  # OpenAI's default
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop or [])


# ---------------------------------------------------------------- the app

def create_api(runner, line: WaitingLine, *, api_key: str | None = None, open_without_key: bool = True,
               default_max_tokens: int | None = None) -> FastAPI:
    """The /v1 sub-application. Its requests wait in `line` with the chat UI's. With
    `api_key`, every call needs `Authorization: Bearer KEY`; without one it answers only
    when `open_without_key` (the server is bound to loopback)."""
    api = FastAPI(title="OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        first = error.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                        for p in first.get("loc", ()) if p != "body").lstrip(".") or None
        message = f"{param}: {first.get('msg')}" if param else first.get("msg", "Invalid request")
        return JSONResponse(APIError(400, message, param=param).body, status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind).body,
                            status_code=error.status_code)

    @api.exception_handler(ClientGone)
    async def _gone(request, error: ClientGone):
        return Response(status_code=499)  # nobody reads it

    def authorize(request: Request):
        if api_key is None:
            if not open_without_key:
                raise APIError(401, "The API is off: this server is reachable from the network and "
                                    "was started without --api-key.", code="api_disabled")
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "Invalid or missing API key (Authorization: Bearer KEY).",
                           code="invalid_api_key")

    async def give_up_if_due(deadline: float, request: Request) -> None:
        """A waiting request ends when its client has left, or with a 503 (and Retry-After)
        when the model is still loading past its deadline."""
        if await request.is_disconnected():
            raise ClientGone()
        if not runner.loaded and time.monotonic() > deadline:
            raise APIError(503, "The model is still loading; try again in a few seconds.",
                           type="server_error", code="model_loading",
                           headers={"Retry-After": str(config.settings.api_retry_after_s)})

    async def until_loaded(deadline: float, request: Request) -> None:
        while not runner.loaded:
            await give_up_if_due(deadline, request)
            await anyio.sleep(0.1)

    async def start_stream(messages: list[dict], settings: GenerationSettings, request: Request):
        """runner.stream in a worker thread, where it waits while the answer before it ends.
        A client that leaves meanwhile withdraws the request: it leaves the line at once,
        and the engine drops it unstarted when its turn comes."""
        withdrawn = threading.Event()
        starting = asyncio.ensure_future(anyio.to_thread.run_sync(
            functools.partial(runner.stream, messages, settings, cancelled=withdrawn)))
        while not starting.done():
            await asyncio.wait({starting}, timeout=0.25)
            if not starting.done() and await request.is_disconnected():
                withdrawn.set()
                starting.add_done_callback(close_if_started)
                raise ClientGone()
        try:
            return starting.result()
        except Cancelled:
            raise ClientGone() from None

    @api.get("/models", dependencies=[Depends(authorize)])
    async def list_models(request: Request):
        if runner.name is None:  # a remote server's default model, until it is asked
            await until_loaded(time.monotonic() + config.settings.api_model_load_wait_s, request)
        return {"object": "list", "data": [
            {"id": runner.name, "object": "model", "created": 0, "owned_by": "local"}]}

    @api.post("/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        deadline = time.monotonic() + config.settings.api_model_load_wait_s  # like the UI, a request made while
        if runner.name is None:                          # the model loads waits for it
            await until_loaded(deadline, request)
        if body.model not in (None, "", runner.name):
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves "
                                f"{runner.name!r}.", param="model", code="model_not_found")
        messages = await anyio.to_thread.run_sync(to_engine_messages, body)
        settings = to_settings(body, default_max_tokens or config.settings.max_new_tokens)
        if runner.loaded:  # (else once it is)
            settings.tools = tools_of(body, runner.supports_tools)
        try:
            place = line.join("api")
        except LineFull as full:
            raise APIError(503, str(full), type="server_error", code="server_busy",
                           headers={"Retry-After": str(config.settings.api_retry_after_s)}) from None
        try:
            async for _ in place.waiting(recheck_s=0.5):
                await give_up_if_due(deadline, request)
            await until_loaded(deadline, request)
            settings.tools = tools_of(body, runner.supports_tools)
            stream = await start_stream(messages, settings, request)
            place.started(stream)
        except ChatInputError as error:
            code = "context_length_exceeded" if "too long" in str(error) else None
            raise APIError(400, str(error), param="messages", code=code) from None
        except GenerationError as error:
            raise APIError(500, str(error), type="server_error", code="generation_failed") from None
        finally:
            if place.position:  # it never started: out of the line
                place.leave()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            # The background task closes the stream even when the client is gone before the
            # first event is sent (the generator, whose finally closes it, never runs then).
            return EventSourceResponse(
                sse_chunks(stream, completion_id, created, runner.name, include_usage, tools=bool(settings.tools)),
                ping=15, send_timeout=30, background=BackgroundTask(stream.close, wait=0))
        return await complete(stream, request, completion_id, created, runner.name, tools=bool(settings.tools))

    return api


def close_if_started(starting: asyncio.Future) -> None:
    """For a withdrawn request's runner.stream call: the stream, if it started after all."""
    if not starting.cancelled() and starting.exception() is None:
        starting.result().close(wait=0)


async def updates(stream):
    """The stream's growing text, pulled from its thread without blocking the event loop.
    Closing this generator (client gone, task cancelled) stops generation."""
    iterator = iter(stream)
    try:
        while True:  # a cancel (client gone) doesn't wait for the next piece of text
            text = await anyio.to_thread.run_sync(next, iterator, None, abandon_on_cancel=True)
            if text is None:
                return
            yield text
    finally:
        with anyio.CancelScope(shield=True):  # runs even when the client is gone
            await anyio.to_thread.run_sync(stream.close)


def usage_of(stream) -> dict:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.new_tokens,
            "total_tokens": stream.prompt_tokens + stream.new_tokens}


def finish_reason_of(stream, calls: list | None = None) -> str:
    if calls:
        return "tool_calls"
    return "length" if stream.finish_reason == "length" else "stop"


def openai_tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for call in calls]


async def complete(stream, request: Request, completion_id, created, model, tools: bool = False):
    sent = ""
    try:
        async for text in updates(stream):
            sent = text
            if await request.is_disconnected():
                break
    except GenerationError as error:
        raise APIError(500, str(error), type="server_error", code="generation_failed") from None
    reasoning, answer, _ = stream.parts(sent)
    calls = []
    if tools:
        answer, calls, _ = answer_and_tool_calls(stream, sent, final=stream.finish_reason is not None)
    message = {"role": "assistant", "content": answer or (None if calls else "")}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = openai_tool_calls(calls)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason_of(stream, calls)}],
        "usage": usage_of(stream),
    }


async def sse_chunks(stream, completion_id, created, model, include_usage: bool, tools: bool = False):
    """The answer as OpenAI's chunks: reasoning_content and content deltas as they grow; each
    tool call, once complete, as one delta.tool_calls chunk (id, name, arguments), as
    transformers' serve sends them. A call's raw text never goes out as content."""
    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": finish_reason}], **extra}
        return {"data": json.dumps(body, ensure_ascii=False)}

    sent = {"reasoning_content": "", "content": "", "tool_calls": []}

    def news(reasoning: str | None, answer: str, calls: list) -> list[dict]:
        """The chunks for what is new since the last ones: text deltas, then complete calls."""
        delta = {}
        for key, now in (("reasoning_content", reasoning or ""), ("content", answer)):
            if now.startswith(sent[key]) and now != sent[key]:
                delta[key], sent[key] = now[len(sent[key]):], now
        done = len(sent["tool_calls"])
        new_calls = [chunk({"tool_calls": [{"index": index, **call}]})
                     for index, call in enumerate(openai_tool_calls(calls[done:]), start=done)]
        sent["tool_calls"] = calls or sent["tool_calls"]
        return ([chunk(delta)] if delta else []) + new_calls

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for text in updates(stream):
            reasoning, answer, _ = stream.parts(text)
            calls = []
            if tools:
                answer, calls, _ = answer_and_tool_calls(stream, text, final=False)
            for item in news(reasoning, answer, calls):
                yield item
    except GenerationError as error:
        yield {"data": json.dumps(APIError(500, str(error), type="server_error",
                                           code="generation_failed").body)}
        yield {"data": "[DONE]"}
        return
    if tools:  # what the end settles: a partial tag held back, the template's parse
        for item in news(None, *answer_and_tool_calls(stream, stream.text, final=True)[:2]):
            yield item
    yield chunk({}, finish_reason_of(stream, sent["tool_calls"]))
    if include_usage:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": usage_of(stream)}
        yield {"data": json.dumps(body)}
    yield {"data": "[DONE]"}
