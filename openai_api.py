"""OpenAI-compatible API served beside the chat UI (same process, same port, same engine).

    POST /v1/chat/completions   stream: true → Server-Sent Events (chat.completion.chunk),
                                stream: false → one chat.completion with usage
    POST /v1/responses          the Responses API, stateless (responses_api.py)
    POST /v1/completions        legacy: a prompt continued as it is, no chat template
    GET  /v1/models             the loaded model

Images come as `image_url` content parts holding `data:` URLs (base64 PNG/JPEG/WebP);
http(s) URLs are refused, so the server never fetches arbitrary addresses. Every request
field is honoured (response_format and a required tool_choice by constrained decoding:
structured_output.py), refused with a 400 that names it (REFUSED, and any unknown field),
or, for bookkeeping fields only, accepted and ignored (IGNORED). Errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx for every bad request. A
client that disconnects stops its generation within one token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import io
import json
import mimetypes
import re
import time
import uuid
from typing import Literal

import anyio
from fastapi import FastAPI, Request
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

import documents
import media
import responses_api
import attachments
from attachments import attachment_part
from config import Settings
from conversation import LONE_SURROGATE, load_image
from structured_output import JSON_SCHEMA_FIELDS, grammar_for, instruction_for
from engine_contract import (
    Cancelled,
    ChatInputError,
    ContextTooLong,
    FileRefused,
    GenerationError,
    GenerationSettings,
    ImageRefused,
    Reply,
    RunnerInfo,
    Signal,
    ToolCall,
    UpstreamError,
)
from waiting_line import LineFull, WaitingLine

DATA_URL = re.compile(r"^data:(image/(?:png|jpeg|jpg|webp|gif));base64,(.*)$", re.DOTALL)
ANY_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*;base64,(.*)$", re.DOTALL)
SEED_RANGE = (-2**63, 2**63 - 1)  # a 64-bit integer, as OpenAI's (torch takes it)
MAX_ATTACHMENT_BYTES = max(documents.MAX_DOCUMENT_BYTES, media.MAX_MEDIA_BYTES)  # one file, audio or video part
MAX_REQUEST_ATTACHMENT_BYTES = 2 * MAX_ATTACHMENT_BYTES  # all of one request's parts together
# A body larger than this is refused (413) before it is held whole: the attachments' limit in
# base64, and room for the conversation's text.
MAX_REQUEST_BODY_BYTES = MAX_REQUEST_ATTACHMENT_BYTES * 4 // 3 + 16 * 2**20


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def renamed(self, rename) -> "APIError":
        """The same error naming its field as `rename` calls it (the API the request came in by)."""
        error = self.body["error"]
        param, message = error["param"], error["message"]
        if param is not None and rename(param) != param:
            message = rename(param) + message[len(param):] if message.startswith(param + ":") else message
            param = rename(param)
        return APIError(self.status, message, type=error["type"], param=param, code=error["code"],
                        headers=self.headers)


class BodyLimit:
    """ASGI middleware: a request body over MAX_REQUEST_BODY_BYTES is a 413 in OpenAI's error
    shape, decided from Content-Length before anything is read, or as a chunked body passes
    the limit; FastAPI would otherwise hold the whole of it in memory to parse it. (FastAPI
    0.165's own max_body_size answers a declared length with a plain-text 413 whatever the
    app's error handlers say.)"""

    class TooLarge(FastAPIHTTPException):
        """Raised from the body's reading: FastAPI lets an HTTPException through (any other
        error while it reads the body becomes its own 400); create_api's handler answers it."""

        def __init__(self, error: APIError):
            super().__init__(413, str(error))
            self.error = error

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, received = MAX_REQUEST_BODY_BYTES, 0
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            error = self.error(f"The request body is {int(declared) / 2**20:.1f} MB; the most this server takes "
                               f"is {limit / 2**20:.1f} MB")
            return await JSONResponse(error.body, status_code=413)(scope, receive, send)

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyLimit.TooLarge(BodyLimit.error(f"The request body is over {limit / 2**20:.1f} MB, "
                                                             f"the most this server takes"))
            return message
        await self.app(scope, counted_receive, send)

    @staticmethod
    def error(what: str) -> APIError:
        return APIError(413, f"{what} (attachments: {MAX_REQUEST_ATTACHMENT_BYTES // 2**20} MB in all).",
                        code="request_too_large")


class KeyCheck:
    """ASGI middleware: every /v1 call's key, checked before its body is read or parsed (a
    call without the key gets a 401 whatever its body). With no key set, the API answers
    only when `open_without_key` (the server is bound to loopback)."""

    def __init__(self, app, api_key: str | None, open_without_key: bool):
        self.app, self.api_key, self.open_without_key = app, api_key, open_without_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self.refusal(dict(scope.get("headers") or []).get(b"authorization", b""))
            if error is not None:
                return await JSONResponse(error.body, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, authorization: bytes) -> APIError | None:
        if self.api_key is None:
            if self.open_without_key:
                return None
            return APIError(401, "The API is off: this server is reachable from the network and "
                                 "was started without --api-key.", code="api_disabled")
        scheme, _, key = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key.encode()):
            return None
        return APIError(401, "Invalid or missing API key (Authorization: Bearer KEY).", code="invalid_api_key")


# ---------------------------------------------------------------- request schema

class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class FileData(BaseModel):
    model_config = ConfigDict(extra="ignore")
    file_data: str | None = None   # a data: URL (or bare base64)
    filename: str | None = None
    file_id: str | None = None     # (the Files API: not kept by this server, refused)


class InputAudio(BaseModel):
    data: str                      # base64
    format: str = "wav"


class MediaURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url", "file", "input_audio", "audio_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    file: FileData | None = None
    input_audio: InputAudio | None = None
    audio_url: MediaURL | None = None   # (vLLM's)
    video_url: MediaURL | None = None   # (vLLM's)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = "{}"   # a JSON object, as a string (OpenAI's shape)


class RequestToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[RequestToolCall] | None = None     # an assistant's calls
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
    """Every field of OpenAI's request is here: honoured, refused with a 400 that names it
    (REFUSED), or accepted and ignored (the bookkeeping ones, IGNORED). A field OpenAI
    doesn't have is a 400 too: nothing is silently dropped."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: StrictInt | None = None
    stream_options: dict | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict | None = None
    presence_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    # refused unless empty (REFUSED)
    logit_bias: dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    # bookkeeping: accepted, ignored (IGNORED)
    user: str | None = None
    metadata: dict | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("stop")
    @classmethod
    def _as_list(cls, value):
        return [value] if isinstance(value, str) else (value or [])


# A request's fields this server can't honour: each is a 400 naming it, and why.
REFUSED = {
    "n": "only one answer per request (n = 1)",
    "logit_bias": "token biases are not applied by this server",
    "audio": "this server answers in text only",
    "modalities": "this server answers in text only (modalities: [\"text\"])",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the model's reasoning can't be set per request here",
    "verbosity": "verbosity can't be set per request here",
    "web_search_options": "this server does not search the web",
    "functions": "the deprecated functions field is not supported: send tools",
    "function_call": "the deprecated function_call field is not supported: send tool_choice",
}
# Accepted and ignored: they change nothing in an answer (README, "OpenAI-compatible API").
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")


def refuse_what_is_not_honoured(request: ChatCompletionRequest) -> None:
    """A 400 naming the first field set to something this server would not do."""
    field = responses_api.refused_field(request, REFUSED, {"n": 1, "modalities": ["text"], "logit_bias": {}})
    if field:
        raise APIError(400, f"{field}: {REFUSED[field]}.", param=field, code="unsupported_parameter")
    where = lone_surrogate_in(request.model_dump(exclude_none=True))
    if where:
        raise APIError(400, f"{where}: holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair: a "
                            f"character cut in half?); send valid Unicode text.", param=where)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true.", param="top_logprobs")
    for field in ("tool_choice", "parallel_tool_calls"):
        if getattr(request, field) is not None and not request.tools:
            raise APIError(400, f"{field}: only allowed when tools are specified.", param=field)
    if request.stream_options is not None:
        if not request.stream:
            raise APIError(400, "stream_options: only allowed when stream is true.", param="stream_options")
        if not isinstance(request.stream_options.get("include_usage", False), bool):
            raise APIError(400, "stream_options.include_usage: true or false.", param="stream_options.include_usage")
    if request.response_format is not None:
        check_response_format(request.response_format)
    shown = shown_tools(request)
    try:  # (as the engine will compile it)
        grammar_for(request.response_format, [tool for _, tool in shown], require_call=requires_a_call(request))
    except ValueError as error:
        constrained = (request.response_format or {}).get("type") in ("json_object", "json_schema")
        if constrained or requires_a_call(request):  # (the grammar holds the tools: one may be the cause)
            for i, tool in shown:
                try:
                    grammar_for(None, [tool], require_call=True)
                except ValueError as tool_error:
                    param = f"tools[{i}].function.parameters"
                    raise APIError(400, f"{param}: this JSON schema can't be followed: {tool_error}", param=param,
                                   code="invalid_json_schema") from None
        raise APIError(400, f"response_format: this JSON schema can't be followed: {error}",
                       param="response_format", code="invalid_json_schema") from None




def named_as_prompt(param: str) -> str:
    """A chat request's field as a legacy completion names it (its one message is the prompt)."""
    return "prompt" if param.startswith("messages") else param


def lone_surrogate_in(value, path: str = "") -> str | None:
    """The path of the first string (or key) in a request's fields that holds a lone surrogate."""
    if isinstance(value, str):
        return path if LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            inside = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and LONE_SURROGATE.search(key):
                return inside
            found = lone_surrogate_in(item, inside)
            if found:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate_in(item, f"{path}[{i}]")
            if found:
                return found
    return None


# The fields of each response_format type (its json_schema's: JSON_SCHEMA_FIELDS)
RESPONSE_FORMAT_FIELDS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}


def check_response_format(response_format: dict) -> None:
    """A 400 naming what is wrong in a response_format's shape (its schema is the grammar's)."""
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_FIELDS:
        raise APIError(400, f"response_format.type: one of {', '.join(RESPONSE_FORMAT_FIELDS)}.",
                       param="response_format.type")
    extra = sorted(set(response_format) - RESPONSE_FORMAT_FIELDS[kind])
    if extra:
        raise APIError(400, f"response_format.{extra[0]}: not a field of a {kind} response_format.",
                       param=f"response_format.{extra[0]}")
    if kind != "json_schema":
        return
    json_schema = response_format.get("json_schema")
    if not isinstance(json_schema, dict):
        raise APIError(400, "response_format.json_schema: an object with the schema ({\"name\", \"schema\", "
                            "\"strict\"}) is needed.", param="response_format.json_schema")
    extra = sorted(set(json_schema) - JSON_SCHEMA_FIELDS)
    if extra:
        raise APIError(400, f"response_format.json_schema.{extra[0]}: not a field of a json_schema.",
                       param=f"response_format.json_schema.{extra[0]}")
    if not isinstance(json_schema.get("schema"), dict):
        raise APIError(400, "response_format.json_schema.schema: a JSON schema (an object) is needed.",
                       param="response_format.json_schema.schema")


def requires_a_call(request: ChatCompletionRequest) -> bool:
    """tool_choice "required" or a named function: the answer must call (constrained decoding)."""
    return bool(request.tools) and (request.tool_choice == "required" or isinstance(request.tool_choice, dict))


COMPLETIONS_REFUSED = {"best_of": "only one answer per request", "echo": "the prompt is not echoed",
                       "suffix": "insertion (suffix) is not supported",
                       "logprobs": "log probabilities are returned on /v1/chat/completions only"}


class CompletionRequest(BaseModel):
    """The legacy completions API: a prompt continued as it is (no chat template)."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: StrictInt | None = Field(16, ge=1)  # (OpenAI's default for this API)
    temperature: StrictFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: StrictBool = False
    stream_options: dict | None = None
    presence_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2.0, le=2.0)
    n: StrictInt | None = None
    best_of: StrictInt | None = None
    echo: StrictBool | None = None
    suffix: str | None = None
    logprobs: StrictInt | None = None
    logit_bias: dict | None = None
    user: str | None = None

    def as_chat(self) -> ChatCompletionRequest:
        """The same request as a chat request of one user message (answered raw: to_settings)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: one prompt per request.", param="prompt")
        if not prompts[0]:
            raise APIError(400, "prompt is empty: send the text to continue.", param="prompt")
        field = responses_api.refused_field(self, COMPLETIONS_REFUSED, {"best_of": 1, "echo": False, "suffix": ""})
        if field:
            raise APIError(400, f"{field}: {COMPLETIONS_REFUSED[field]}.", param=field, code="unsupported_parameter")
        fields = self.model_dump(exclude={"prompt", *COMPLETIONS_REFUSED}, exclude_none=True)
        return ChatCompletionRequest(**fields, messages=[{"role": "user", "content": prompts[0]}])


def check_limits(request: ChatCompletionRequest, settings: Settings) -> None:
    """The server's limits on a request (config.Settings): a 400 naming the field."""
    limits = [("messages", len(request.messages), settings.api_max_messages, "messages"),
              ("max_tokens", request.max_tokens, settings.max_new_tokens_limit, "tokens"),
              ("max_completion_tokens", request.max_completion_tokens, settings.max_new_tokens_limit, "tokens"),
              ("tools", len(request.tools or ()), settings.api_max_tools, "tools"),
              ("stop", len(request.stop or ()), settings.api_max_stop_strings, "stop sequences")]
    for param, value, limit, what in limits:
        if value is not None and value > limit:
            raise APIError(400, f"{param}: at most {limit} {what}", param=param)
    encoded = sum(len(_encoded(part)) for message in request.messages if isinstance(message.content, list)
                  for part in message.content)
    if encoded > MAX_REQUEST_ATTACHMENT_BYTES * 4 // 3:
        raise APIError(400, f"messages: the files, images, audio and video of one request are at most "
                            f"{MAX_REQUEST_ATTACHMENT_BYTES // 2**20} MB in all", param="messages",
                       code="request_too_large")


def _encoded(part: ContentPart) -> str:
    """A part's base64 (or data: URL) text."""
    if part.file is not None:
        return part.file.file_data or ""
    if part.input_audio is not None:
        return part.input_audio.data
    url = part.image_url or part.audio_url or part.video_url
    return url.url if url is not None else ""


def invalid_request(errors: list[dict]) -> APIError:
    """pydantic's errors as one 400 naming the field. Of a union's tries (content: a string
    or a list of parts) the one that got furthest says what is wrong, without the union's
    branch names in the path."""
    worst = max(errors, key=lambda error: len(error.get("loc", ()))) if errors else {}
    if worst.get("type") == "json_invalid":
        return APIError(400, f"The body is not valid JSON: {worst.get('ctx', {}).get('error', worst.get('msg'))}.")
    if tuple(worst.get("loc", ())) == ("body",):  # (no body, or one that isn't a JSON object)
        return APIError(400, "The body must be a JSON object, sent with Content-Type: application/json.")
    path = [part for part in worst.get("loc", ()) if part != "body" and not _union_branch(part)]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".") or None
    what = worst.get("msg", "Invalid request")
    code = None
    if worst.get("type") == "extra_forbidden":
        what, code = "this server does not know this field (README, \"OpenAI-compatible API\", lists them)", \
            "unknown_parameter"
    return APIError(400, f"{param}: {what}" if param else what, param=param, code=code)


def _union_branch(part) -> bool:
    """A union's branch in pydantic's error path ("str", "list[ContentPart]"), not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none", "dict", "list"))


# ---------------------------------------------------------------- request → engine

def to_engine_messages(request: ChatCompletionRequest, settings: Settings) -> list[dict]:
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
        if content is None and role in ("user", "system"):
            raise APIError(400, f"A {message.role} message needs content.", param=f"messages[{i}].content")
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
                    continue
                try:
                    parts.append(decode_part(part, param, settings, newest=i == last))
                except APIError:
                    if i == last:
                        raise
        converted = {"role": role, "content": parts}
        if message.tool_calls and role == "assistant":
            converted["tool_calls"] = [ToolCall(call.function.name, decode_arguments(
                call.function.arguments, f"messages[{i}].tool_calls[{k}]"), call.id)
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


def with_instruction(messages: list[dict], instruction: str) -> list[dict]:
    """The messages with `instruction` at the end of the system message (one made if none)."""
    line = {"type": "text", "text": instruction}
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": [*messages[0]["content"], line]}, *messages[1:]]
    return [{"role": "system", "content": [line]}, *messages]


def decode_arguments(arguments: str, param: str) -> dict:
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        raise APIError(400, "A tool call's arguments must be a JSON object (as a string).",
                       param=param + ".function.arguments") from None
    if not isinstance(value, dict):
        raise APIError(400, "A tool call's arguments must be a JSON object.", param=param + ".function.arguments")
    return value


def shown_tools(request: ChatCompletionRequest) -> list[tuple[int, dict]]:
    """The tools the model is shown, with their index in `tools`, as tool_choice says: auto
    (all), none (none), required (all, and it must call one), or a named function (that one
    alone, and it must call it; the must is kept by constrained decoding: to_settings)."""
    if not request.tools or request.tool_choice == "none":
        return []
    tools = list(enumerate(tool.model_dump(exclude_none=True) for tool in request.tools))
    choice = request.tool_choice
    if choice in (None, "auto", "required"):
        return tools
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        named = [(i, tool) for i, tool in tools if tool["function"]["name"] == name]
        if not named:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools.", param="tool_choice")
        return named
    raise APIError(400, "tool_choice can be auto, none, required or {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}}.", param="tool_choice")


def tools_of(request: ChatCompletionRequest, runner: RunnerInfo) -> list[dict] | None:
    """The tools the engine is given (shown_tools), or a 400 when the model can't take them."""
    tools = [tool for _, tool in shown_tools(request)]
    if not tools:
        return None
    if not runner.supports_tools:
        raise APIError(400, f"This model can't call tools here: {runner.tools_off or 'it does not take them'}. "
                            "Send the request without tools.", param="tools", code="tools_not_supported")
    return tools


def decode_part(part: ContentPart, param: str, settings: Settings, newest: bool = True) -> dict:
    """An image, file, audio or video part → the engine's part (its kind checked from the
    content); a 400 naming the part for anything it can't be."""
    if getattr(part, part.type) is None:
        article = "An" if part.type[0] in "aeiou" else "A"
        raise APIError(400, f"{article} {part.type} part needs {article.lower()} {part.type} object.", param=param)
    if part.type == "image_url":
        return {"type": "image", "image": decode_image(part.image_url.url, param + ".image_url", settings)}
    if part.type == "file":
        if part.file.file_data is None:
            raise APIError(400, "Files are not kept by this server (no file_id): send the file inline as "
                                "file.file_data, a data: URL (data:application/pdf;base64,...).",
                           param=param + ".file", code="file_id_not_supported")
        name = (part.file.filename or "").strip() or "document"
        data = decode_data(part.file.file_data, param + ".file.file_data", name, bare_base64=True)
        expected = ("image", "document", "audio", "video")
    elif part.type == "input_audio":
        name = f"audio.{part.input_audio.format.lower().strip('.') or 'wav'}"
        data = decode_data(part.input_audio.data, param + ".input_audio.data", name, bare_base64=True)
        expected = ("audio",)
    else:
        kind = part.type.removesuffix("_url")
        url = getattr(part, part.type).url
        if not url.startswith("data:"):
            raise APIError(400, f"{kind.capitalize()} URLs are not fetched by this server; send it inline as a "
                                f"data: URL (data:{kind}/{'mp4' if kind == 'video' else 'wav'};base64,...).",
                           param=param + f".{part.type}.url", code=f"{part.type}_not_supported")
        name = f"{kind}{mimetypes.guess_extension(url[5:url.find(';')]) or ''}"
        data = decode_data(url, param + f".{part.type}.url", name)
        expected = (kind,)
    try:
        decoded = attachment_part(data, name)
        if decoded["type"] == "document":  # read now, to name a bad part: the engine takes it read
            decoded["read"] = attachments.document_of(decoded, again=newest)  # (a history's file refused
            # for time stays so)
    except ChatInputError as error:
        raise APIError(400, str(error), param=param, code="invalid_file") from None
    decoded["param"] = param  # (a refusal where it is read, in the engine or by speech, names the part)
    if decoded["type"] not in expected:
        raise APIError(400, f"This {part.type} part holds {decoded['type']}, not {' or '.join(expected)}.",
                       param=param, code="invalid_file")
    if decoded["type"] == "image":
        if len(data) > settings.api_max_image_bytes:
            raise APIError(400, f"The image is larger than {settings.api_max_image_bytes // 2**20} MB.", param=param,
                           code="image_too_large")
        return {"type": "image", "image": decode_image_bytes(data, param, settings)}
    return decoded


def decode_data(value: str, param: str, name: str, bare_base64: bool = False) -> bytes:
    """A data: URL's (or, where OpenAI sends one, bare base64's) bytes, within the limits."""
    match = ANY_DATA_URL.match(value)
    if match:
        encoded = match.group(2)
    elif bare_base64 and not value.startswith("data:"):
        encoded = value
    else:
        raise APIError(400, "Expected a data: URL with base64 data (data:<type>;base64,...).", param=param,
                       code="invalid_file")
    if len(encoded) > MAX_ATTACHMENT_BYTES * 4 // 3 + 4:
        raise APIError(400, f"{name} is larger than {MAX_ATTACHMENT_BYTES // 2**20} MB.", param=param,
                       code="file_too_large")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{name}: the base64 data is invalid.", param=param, code="invalid_file") from None


def decode_image(url: str, param: str, settings: Settings):
    if url.startswith(("http://", "https://")):
        raise APIError(400, "Image URLs are not fetched by this server; send the image inline "
                            "as a data: URL (data:image/png;base64,...).", param=param,
                       code="image_url_not_supported")
    match = DATA_URL.match(url)
    if not match:
        raise APIError(400, "Images must be data: URLs with a base64 PNG, JPEG, WebP or GIF "
                            "(data:image/png;base64,...).", param=param, code="invalid_image")
    if len(match.group(2)) > settings.api_max_image_bytes * 4 // 3 + 4:
        raise APIError(400, f"The image is larger than {settings.api_max_image_bytes // 2**20} MB.", param=param,
                       code="image_too_large")
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "The image's base64 data is invalid.", param=param,
                       code="invalid_image") from None
    return decode_image_bytes(data, param, settings)


def decode_image_bytes(data: bytes, param: str, settings: Settings):
    try:
        return load_image(io.BytesIO(data), settings)
    except ChatInputError as error:
        raise APIError(400, str(error), param=param, code="invalid_image") from None


def to_settings(request: ChatCompletionRequest, settings: Settings) -> GenerationSettings:
    constrained = request.response_format and request.response_format.get("type") != "text"
    return GenerationSettings(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or settings.max_new_tokens,
        max_new_tokens_asked=bool(request.max_completion_tokens or request.max_tokens),
        temperature=1.0 if request.temperature is None else request.temperature,  # OpenAI's default
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop or [],
        max_updates_per_second=settings.max_updates_per_second,
        response_format=request.response_format if constrained else None,
        tool_call_required=requires_a_call(request),
        calls_of_offered_tools_only=True,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logprobs=(request.top_logprobs or 0) if request.logprobs else None)


# ---------------------------------------------------------------- the app

class ServerStopping(GenerationError):
    """The app is stopping (Ctrl+C, SIGTERM): an answer in flight ends where it is."""


STOPPING_MESSAGE = "The server is stopping: this answer ends here."

# What each of the engine's errors is on the API: status, type, code.
ERROR_CODES = [
    (ServerStopping, (503, "server_error", "server_stopping")),
    (Cancelled, (499, "invalid_request_error", "client_gone")),
    (ContextTooLong, (400, "invalid_request_error", "context_length_exceeded")),
    (FileRefused, (400, "invalid_request_error", "invalid_file")),
    (ImageRefused, (400, "invalid_request_error", "invalid_image")),
    (ChatInputError, (400, "invalid_request_error", None)),
    (UpstreamError, (502, "server_error", "upstream_error")),  # (busy: 503 server_busy, below)
    (GenerationError, (500, "server_error", "generation_failed")),
]


def api_error(error: Exception, messages: list[dict] | None = None) -> APIError:
    """An engine error as the API's answer: by its type, never its message (a file's refusal
    names the part of `messages`, the request's, that it names by its file name)."""
    if isinstance(error, UpstreamError) and error.busy:
        return APIError(503, str(error), type="server_error", code="server_busy",
                        headers={"Retry-After": error.retry_after} if error.retry_after else None)
    for kind, (status, type_, code) in ERROR_CODES:
        if isinstance(error, kind):
            return APIError(status, str(error), type=type_, code=code,
                            param=part_named_in(error, messages) if status == 400 else None)
    raise error


def part_named_in(error: Exception, messages: list[dict] | None) -> str:
    """The request's part a file's refusal is about ("messages[0].content[1]": the one part of
    the last message whose file name the refusal names), else "messages" (none, or several
    of that name: two audio parts are both audio.wav)."""
    if isinstance(error, FileRefused) and messages:
        named = [part["param"] for part in messages[-1]["content"] if part.get("param") and part.get("name")
                 and re.search(rf"(?<![\w.-]){re.escape(part['name'])}(?![\w-])", str(error))]
        if len(named) == 1:
            return named[0]
    return "messages"


def create_api(runner, line: WaitingLine, settings: Settings | None = None, *, open_without_key: bool = True,
               speech=None) -> FastAPI:
    """The /v1 sub-application. Its requests wait in `line` with the chat UI's. With
    settings.api_key, every call needs `Authorization: Bearer KEY`; without one it answers
    only when `open_without_key` (the server is bound to loopback). `speech` (--asr-model:
    speech.Speech) writes out audio for a model that can't listen."""
    settings = settings or Settings()
    api_key = settings.api_key
    retry_after = {"Retry-After": str(settings.api_retry_after_s)}
    api = FastAPI(title="OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_middleware(BodyLimit)
    api.add_middleware(KeyCheck, api_key=api_key, open_without_key=open_without_key)  # (outermost: first)
    stopping = Signal()  # the app is stopping (stop_answers)
    in_flight: set = set()  # what stops each request not yet answered in full (its `gone`, its stream)

    def stop_answers(wait_s: float) -> int:
        """The app is stopping: every request in flight ends at once (a stream with an error
        event and [DONE], the others with a 503), and so does every later one. Waits up to
        `wait_s` for their responses to be sent (called from another thread than the
        server's). Returns how many were not sent in time."""
        stopping.set()
        for stop in list(in_flight):
            stop()
        deadline = time.monotonic() + wait_s
        while in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(in_flight)
    api.stop_answers = stop_answers

    @contextlib.asynccontextmanager
    async def serving(request: Request):
        """watching_disconnect, the request in flight meanwhile: the app stopping sets its `gone`."""
        async with watching_disconnect(request) as gone:
            in_flight.add(gone.set)
            try:
                if stopping.is_set():
                    gone.set()
                yield gone
            finally:
                in_flight.discard(gone.set)

    def streamed(events, stream) -> EventSourceResponse:
        """A stream's events, in flight until the response has ended. The background task
        closes the stream even when the client is gone before the first event is sent (the
        generator, whose finally closes it, never runs then)."""
        def stop():
            stream.close(wait=0)

        def ended():
            in_flight.discard(stop)
            stop()
        in_flight.add(stop)
        if stopping.is_set():
            stop()
        return EventSourceResponse(events, ping=15, send_timeout=30, background=BackgroundTask(ended))

    @api.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        if error.status == 499 and stopping.is_set():  # (withdrawn by stop_answers, not by its client)
            error = api_error(ServerStopping(STOPPING_MESSAGE))
        if error.status == 499:
            return Response(status_code=499)  # the client is gone: nobody reads it
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        return JSONResponse(invalid_request(error.errors()).body, status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request, error: StarletteHTTPException):
        if isinstance(error, BodyLimit.TooLarge):
            return JSONResponse(error.error.body, status_code=413)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind).body,
                            status_code=error.status_code)


    async def model_loaded(deadline: float, gone: Signal) -> None:
        """Until the model is loaded; a 503 (and Retry-After) past the deadline."""
        if runner.loaded:
            return
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        forget = [signal.on_set(lambda: loop.call_soon_threadsafe(ready.set)) for signal in (runner.ready, gone)]
        try:
            await asyncio.wait_for(ready.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise APIError(503, "The model is still loading; try again in a few seconds.", type="server_error",
                           code="model_loading", headers=retry_after) from None
        finally:
            for undo in forget:
                undo()
        if gone.is_set():
            raise APIError(499, "The client is gone.")

    async def wait_for_turn(place, gone: Signal, deadline: float) -> None:
        """Until the request may start (its place at the front, the model loaded), or its
        client has left (499)."""
        async def turn():
            async for _ in place.waiting():
                pass
        waiting = asyncio.ensure_future(turn())
        left = asyncio.get_running_loop().create_future()
        gone.on_set(lambda: left.get_loop().call_soon_threadsafe(_settle, left))
        try:
            await asyncio.wait({waiting, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            left.cancel()
        if gone.is_set():
            raise APIError(499, "The client is gone.")
        await model_loaded(deadline, gone)

    async def start_stream(messages: list[dict], settings: GenerationSettings, gone: Signal, on_reading=None):
        """runner.stream in a worker thread, where it waits while the answer before it ends
        (or while its files are read: `on_reading`). A client that leaves meanwhile withdraws
        the request (`gone`): it leaves the line at once, and the engine drops it unstarted
        when its turn comes."""
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(runner.stream, messages, settings, cancelled=gone, on_reading=on_reading),
                abandon_on_cancel=True)
        except (ChatInputError, GenerationError, Cancelled) as error:
            raise api_error(error, messages) from None

    @api.get("/models")
    async def list_models(request: Request):
        return {"object": "list", "data": [await model_card(request)]}

    @api.get("/models/{model:path}")
    async def retrieve_model(model: str, request: Request):
        card = await model_card(request)
        if model != card["id"]:
            raise APIError(404, f"The model {model!r} does not exist; this server serves {card['id']!r}.",
                           param="model", code="model_not_found")
        return card

    async def model_card(request: Request) -> dict:
        if runner.name is None:  # a remote server's default model, until it is asked
            async with watching_disconnect(request) as gone:
                await model_loaded(time.monotonic() + settings.api_model_load_wait_s, gone)
        return {"id": runner.name, "object": "model", "created": 0, "owned_by": "local"}

    async def begin(body: ChatCompletionRequest, gone: Signal, deadline: float, raw_prompt: bool = False):
        """The answer to a checked request, started: it waited its turn in the line (a 503 when
        full) and for the model; its settings as the request says."""
        if runner.name is None:
            await model_loaded(deadline, gone)
        if body.model not in (None, "", runner.name):
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves "
                                f"{runner.name!r}.", param="model", code="model_not_found")
        messages = await anyio.to_thread.run_sync(to_engine_messages, body, settings)
        if speech is not None and any(part["type"] == "audio" for message in messages for part in message["content"]):
            if not runner.loaded:  # (whether the model listens is known once it is loaded)
                await model_loaded(deadline, gone)
            try:  # (a failure in the history leaves that audio out; in the last message it is a 400)
                messages = [await speech.written_out(message, runner.info, leave_out_failures=i < len(messages) - 1)
                            for i, message in enumerate(messages)]
            except ChatInputError as error:  # (the audio's fault: unreadable, or no speech in it)
                if isinstance(error, FileRefused) or str(error).startswith("No speech was heard"):
                    raise APIError(400, str(error), param=(getattr(error, "part", None) or {}).get(
                        "param", "messages"), code="invalid_file") from None
                raise APIError(500, str(error), type="server_error", code="speech_failed") from None  # (the model's)
        generation = to_settings(body, settings)
        generation.raw_prompt = raw_prompt
        if generation.response_format:
            messages = with_instruction(messages, instruction_for(generation.response_format))
        if runner.loaded:  # (else once it is)
            generation.tools = tools_of(body, runner.info)
        try:
            place = line.join("api")
        except LineFull as full:
            raise APIError(503, str(full), type="server_error", code="server_busy", headers=retry_after) from None
        generation.arrived_at = place.joined_at
        try:
            await wait_for_turn(place, gone, deadline)
            generation.tools = tools_of(body, runner.info)
            stream = await start_stream(messages, generation, gone, place.reading_files)
            place.started(stream)
        finally:
            if place.position:  # it never started: out of the line
                place.leave()
        return stream

    @api.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_limits(body, settings)
        await anyio.to_thread.run_sync(refuse_what_is_not_honoured, body)  # (it compiles the grammar)
        deadline = time.monotonic() + settings.api_model_load_wait_s  # like the UI, a request made while
        async with serving(request) as gone:                 # the model loads waits for it
            stream = await begin(body, gone, deadline)
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            most_calls = 1 if body.parallel_tool_calls is False else None
            if not body.stream:
                return await complete(stream, completion_id, created, runner.name, most_calls, bool(body.logprobs),
                                      stopping)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return streamed(sse_chunks(stream, completion_id, created, runner.name, include_usage, most_calls,
                                   bool(body.logprobs), stopping), stream)

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        """Legacy completions: the prompt continued as it is, no chat template (older tools)."""
        chat = body.as_chat()
        try:
            check_limits(chat, settings)
            refuse_what_is_not_honoured(chat)
        except APIError as error:  # (its one message is the prompt)
            raise error.renamed(named_as_prompt) from None
        deadline = time.monotonic() + settings.api_model_load_wait_s
        async with serving(request) as gone:
            try:
                stream = await begin(chat, gone, deadline, raw_prompt=True)
            except APIError as error:
                raise error.renamed(named_as_prompt) from None
            completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
            if not body.stream:
                try:
                    async for _ in updates(stream, stopping):
                        pass
                except GenerationError as error:
                    raise api_error(error) from None
                return {"id": completion_id, "object": "text_completion", "created": created, "model": runner.name,
                        "choices": [{"index": 0, "text": stream.reply.answer, "logprobs": None,
                                     "finish_reason": finish_reason_of(stream, stream.reply)}],
                        "usage": usage_of(stream)}
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return streamed(text_chunks(stream, completion_id, created, runner.name, include_usage, stopping), stream)

    @api.post("/responses")
    async def responses(body: responses_api.ResponsesRequest, request: Request):
        """The Responses API: the same answer, told as a response (responses_api.py)."""
        try:  # (checked as the chat request it becomes: told in the Responses API's words)
            as_chat = responses_api.to_chat_request(body)
        except responses_api.RequestProblem as problem:
            raise APIError(400, str(problem), param=problem.param) from None
        try:
            chat = ChatCompletionRequest.model_validate(as_chat)
            check_limits(chat, settings)
            await anyio.to_thread.run_sync(refuse_what_is_not_honoured, chat)
        except ValidationError as error:
            raise invalid_request(error.errors()).renamed(as_chat.param_in_responses) from None
        except APIError as error:
            raise error.renamed(as_chat.param_in_responses) from None
        deadline = time.monotonic() + settings.api_model_load_wait_s
        most_calls = 1 if chat.parallel_tool_calls is False else None
        async with serving(request) as gone:
            try:
                stream = await begin(chat, gone, deadline)
            except APIError as error:
                raise error.renamed(as_chat.param_in_responses) from None
            if not body.stream:
                try:
                    return await responses_api.complete(stream, functools.partial(updates, stopping=stopping), body,
                                                        runner.name, most_calls)
                except GenerationError as error:
                    raise api_error(error) from None
        return streamed(responses_api.events(stream, functools.partial(updates, stopping=stopping), body, runner.name,
                                             most_calls, error_code=lambda error: api_error(error).body["error"]["code"]),
                        stream)

    return api


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


@contextlib.asynccontextmanager
async def watching_disconnect(request: Request):
    """`async with watching_disconnect(request) as gone:` — `gone` (a Signal) is set when the
    client disconnects: the one place a client's leaving is noticed, by awaiting the ASGI
    disconnect message (no polling). A started answer that `gone` was handed to stops then."""
    gone = Signal()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        yield gone
    except BaseException:  # the request failed or was cancelled: what it started stops
        gone.set()
        raise
    finally:
        watcher.cancel()


async def updates(stream, stopping: Signal | None = None):
    """The stream's growing reply, pulled from its thread without blocking the event loop.
    Closing this generator (client gone, task cancelled) stops generation. An answer the app
    stopping has cut (`stopping`) ends with ServerStopping."""
    iterator = iter(stream)
    try:
        while True:  # a cancel (client gone) doesn't wait for the next piece of text
            reply = await anyio.to_thread.run_sync(next, iterator, None, abandon_on_cancel=True)
            if reply is None:
                if stopping is not None and stopping.is_set() and stream.finish_reason == "cancelled":
                    raise ServerStopping(STOPPING_MESSAGE)
                return
            yield reply
    finally:
        with anyio.CancelScope(shield=True):  # runs even when the client is gone
            await anyio.to_thread.run_sync(stream.close)


async def text_chunks(stream, completion_id, created, model, include_usage: bool, stopping: Signal | None = None):
    """A legacy completion's stream: text_completion chunks of the growing text, then [DONE]."""
    def chunk(text: str, finish_reason=None) -> dict:
        return {"data": json.dumps({"id": completion_id, "object": "text_completion", "created": created,
                                    "model": model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                                 "finish_reason": finish_reason}]},
                                   ensure_ascii=False)}
    sent = ""
    try:
        async for reply in updates(stream, stopping):
            if reply.answer.startswith(sent) and reply.answer != sent:
                yield chunk(reply.answer[len(sent):])
                sent = reply.answer
    except GenerationError as error:
        yield {"data": json.dumps(api_error(error).body)}
        yield {"data": "[DONE]"}
        return
    yield chunk("", finish_reason_of(stream, stream.reply))
    if include_usage:
        yield {"data": json.dumps({"id": completion_id, "object": "text_completion", "created": created,
                                   "model": model, "choices": [], "usage": usage_of(stream)})}
    yield {"data": "[DONE]"}


def usage_of(stream) -> dict:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.new_tokens,
            "total_tokens": stream.prompt_tokens + stream.new_tokens,
            "completion_tokens_details": {"reasoning_tokens": stream.reasoning_tokens}}


def finish_reason_of(stream, reply: Reply) -> str:
    if reply.tool_calls:
        return "tool_calls"
    return "length" if stream.finish_reason == "length" else "stop"


async def complete(stream, completion_id, created, model, most_calls: int | None = None, logprobs: bool = False,
                   stopping: Signal | None = None):
    """The whole answer as one chat.completion (the client's leaving stops it: `gone`); with
    `most_calls`, only that many of its tool calls (parallel_tool_calls: false); with
    `logprobs`, each token's (choices[0].logprobs.content)."""
    try:
        async for _ in updates(stream, stopping):
            pass
    except GenerationError as error:
        raise api_error(error) from None
    reply = stream.reply
    calls = reply.tool_calls[:most_calls]
    message = {"role": "assistant", "content": reply.answer or (None if calls else "")}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if calls:
        message["tool_calls"] = [call.openai() for call in calls]
    choice = {"index": 0, "message": message, "finish_reason": finish_reason_of(stream, reply)}
    if logprobs:
        choice["logprobs"] = {"content": list(stream.logprobs), "refusal": None}
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage_of(stream), **notices_of(stream)}


def notices_of(stream) -> dict:
    """What the chat would show above the answer (a document cut to fit, older turns left out,
    an image downscaled): `notices`, beside OpenAI's fields (clients keep unknown fields)."""
    return {"notices": list(stream.notices)} if stream.notices else {}


async def sse_chunks(stream, completion_id, created, model, include_usage: bool, most_calls: int | None = None,
                     logprobs: bool = False, stopping: Signal | None = None):
    """The answer as OpenAI's chunks: reasoning_content and content deltas as they grow; each
    tool call, once complete, as one delta.tool_calls chunk (id, name, arguments), as
    transformers' serve sends them. A call's raw text never goes out as content."""
    sent = {"reasoning": "", "answer": "", "tool_calls": 0, "logprobs": 0}

    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        if logprobs and (delta or finish_reason):  # the tokens' entries since the last chunk
            choice["logprobs"] = {"content": stream.logprobs[sent["logprobs"]:len(stream.logprobs)], "refusal": None}
            sent["logprobs"] += len(choice["logprobs"]["content"])
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [choice], **extra}
        return {"data": json.dumps(body, ensure_ascii=False)}


    def news(reply: Reply) -> list[dict]:
        """The chunks for what is new since the last ones: text deltas, then complete calls."""
        delta = {}
        for key, name in (("reasoning_content", "reasoning"), ("content", "answer")):
            now = getattr(reply, name) or ""
            if now.startswith(sent[name]) and now != sent[name]:
                delta[key], sent[name] = now[len(sent[name]):], now
        done, calls = sent["tool_calls"], reply.tool_calls[:most_calls]
        new_calls = [chunk({"tool_calls": [{"index": index, **call.openai()}]})
                     for index, call in enumerate(calls[done:], start=done)]
        sent["tool_calls"] = max(done, len(calls))
        return ([chunk(delta)] if delta else []) + new_calls

    yield chunk({"role": "assistant", "content": ""}, **notices_of(stream))
    try:
        async for reply in updates(stream, stopping):
            for item in news(reply):
                yield item
    except GenerationError as error:
        yield {"data": json.dumps(api_error(error).body)}
        yield {"data": "[DONE]"}
        return
    yield chunk({}, finish_reason_of(stream, stream.reply))
    if include_usage:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": usage_of(stream)}
        yield {"data": json.dumps(body)}
    yield {"data": "[DONE]"}
