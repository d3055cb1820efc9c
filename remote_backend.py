"""A runner in front of any OpenAI-compatible server (vLLM, TGI, SGLang, Ollama, llama.cpp
server, or another instance of this app), through the official `openai` client: the
engine_contract.Runner contract, so the UI and this app's own /v1 use it like a local model.

    python app.py --backend openai --base-url http://gpu-box:8000/v1 --model Qwen/Qwen2.5-VL-72B-Instruct
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import time

import httpx
import openai

from config import Settings
from conversation import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    alternate_roles,
    last_user_text,
    prepare_messages,
    tool_pictures_after_results,
)
from engine_contract import (
    ActiveCount,
    Cancelled,
    ChatInputError,
    ContextTooLong,
    DescribedByInfo,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    Reply,
    RunnerInfo,
    Signal,
    StreamBase,
    ToolCall,
    UpstreamError,
)

log = logging.getLogger("engine")

# Asked once at start when the chat has tools (--tools, --mcp-config), with max_tokens 1: does
# the server take tools? (vLLM does only when started with --enable-auto-tool-choice and a
# --tool-call-parser; llama.cpp's server with --jinja.) Without an answer, tools stay on.
TOOLS_PROBE_TIMEOUT_S = 30.0
TOOLS_PROBE = {"type": "function", "function": {
    "name": "tools_probe", "description": "Never needed: the app asks whether the server takes tools.",
    "parameters": {"type": "object", "properties": {}}}}
# While the last request could not reach the server, /healthz asks it again at most this often
# (a quick GET /models), so it sees the server come back without waiting for a chat.
UNREACHABLE_RECHECK_S = 5.0
UNREACHABLE_RECHECK_TIMEOUT_S = 2.0


class RemoteRunner(DescribedByInfo):
    """The engine_contract.Runner contract in front of a server (it queues and batches)."""

    def __init__(self, base_url: str, settings: Settings | None = None):
        self.settings = settings = settings or Settings()
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=settings.api_key or "not-needed", max_retries=1,
            timeout=openai.Timeout(settings.remote_read_timeout_s, connect=settings.remote_connect_timeout_s))
        self.model = settings.model or self._served_model()  # the server's name for it
        # The server decides what it takes: images are sent (a text-only one answers with an
        # error), tools unless it refused them at start, it batches in its own way.
        self._tools_unasked = False  # the start's question about tools got no answer: a refusal asks again
        tools_off = self._tools_off() if settings.tools or settings.mcp_config else ""
        self.info = RunnerInfo(name=settings.served_model_name or self.model, device=f"via {self.base_url}",
                               dtype="set by the server", batching=True, supports_tools=not tools_off,
                               tools_off=tools_off)
        self.counted = ActiveCount()
        self.finish_listeners: list = []
        self._unreachable: str | None = None  # why the last request could not reach the server
        self._unreachable_checked = 0.0

    @property
    def problem(self) -> str | None:
        """The server can't be reached (the last request, or a check here, found so)."""
        if self._unreachable and time.monotonic() - self._unreachable_checked >= UNREACHABLE_RECHECK_S:
            self._unreachable_checked = time.monotonic()
            try:
                self.client.with_options(timeout=UNREACHABLE_RECHECK_TIMEOUT_S, max_retries=0).models.list()
                self.reached()
            except openai.APIConnectionError:
                pass
            except openai.APIError:  # (it answers)
                self.reached()
        return self._unreachable

    def unreachable(self, why: str) -> None:
        self._unreachable = f"{why} (since {time.strftime('%H:%M:%S')})"
        self._unreachable_checked = time.monotonic()

    def reached(self) -> None:
        self._unreachable = None

    @property
    def active(self) -> int:
        return self.counted.value

    def _served_model(self) -> str:
        try:
            models = self.client.models.list().data
        except openai.APIConnectionError:
            raise ModelLoadError(f"Can't reach the model server at {self.base_url} (is it running? "
                                 f"is the URL right, ending in /v1?).") from None
        except openai.APIError as error:
            raise ModelLoadError(f"The model server at {self.base_url} refused to list its models: "
                                 f"{_message_of(error)}") from None
        if not models:
            raise ModelLoadError(f"The model server at {self.base_url} serves no model; pass --model.")
        return models[0].id

    def _tools_off(self) -> str:
        """Why the server's model can't be given tools ("" when it can, or when it gave no
        answer): a one-token request with a tool is answered, or refused as a bad request.
        A refused key or an unknown model is a ModelLoadError, as for any request."""
        try:
            self.client.with_options(timeout=TOOLS_PROBE_TIMEOUT_S, max_retries=0).chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "Hi"}], tools=[TOOLS_PROBE], max_tokens=1)
        except openai.APIStatusError as error:
            said = (_message_of(error).splitlines() or [str(error.status_code)])[0][:300]
            if error.status_code in (400, 422):
                return f"the model server refuses tools ({said})"
            if error.status_code in (401, 403, 404):
                raise ModelLoadError(f"The model server at {self.base_url} refused a request for {self.model} "
                                     f"({error.status_code}): {said}") from None
            log.warning("The model server answered %s when asked whether it takes tools; they are sent, and "
                        "its answers will say if it refuses them.", error.status_code)
            self._tools_unasked = True
        except openai.APIError as error:  # (unreachable, or slow: loading its model)
            self._tools_unasked = True
            log.warning("The model server could not be asked whether it takes tools (%s); they are sent, and its "
                        "answers will say if it refuses them.", type(error).__name__)
        return ""

    def _tools_now_off(self, refusal: ChatInputError) -> ChatInputError:
        """A request with tools refused, when the question at start got no answer (the server
        was still loading its model): asked again, a server that refuses tools has them off
        from now on, and the refusal says so (sending again goes without them)."""
        if not self._tools_unasked or "tool" not in str(refusal).lower():
            return refusal
        self._tools_unasked = False
        tools_off = self._tools_off()
        if not tools_off:
            return refusal
        self.info = dataclasses.replace(self.info, supports_tools=False, tools_off=tools_off)
        log.warning("Tools are off for %s: %s.", self.name, tools_off)
        return type(refusal)(f"{refusal} It refuses tools, so they are off from now on: send again to be "
                             f"answered without them.")

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               cancelled: Signal | None = None, on_reading=None) -> "RemoteStream":
        """Start streaming from the server (it queues and batches: nothing waits here, so
        `on_reading` is never needed)."""
        settings = settings or GenerationSettings(max_new_tokens=self.settings.max_new_tokens)
        if cancelled is not None and cancelled.is_set():
            raise Cancelled()
        if settings.raw_prompt:
            raise ChatInputError("Legacy completions are not passed through to the model server (--backend "
                                 "openai): ask that server directly.")
        if settings.logprobs is not None:
            raise ChatInputError("logprobs are not passed through from the model server (--backend openai): "
                                 "ask that server directly.")
        notices: list[str] = []
        prepared = tool_pictures_after_results(alternate_roles(prepare_messages(
            messages, sees_images=True, model_name=self.name, settings=self.settings, notices=notices)))
        request = {
            "model": self.model, "messages": [to_openai_message(m) for m in prepared],
            "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": settings.top_p, "stream": True, "stream_options": {"include_usage": True},
        }
        if settings.seed is not None:
            request["seed"] = settings.seed
        if settings.stop:
            request["stop"] = settings.stop
        if settings.response_format:  # (the server constrains it in its own way)
            request["response_format"] = settings.response_format
        if settings.tools:  # (the API and the chat send them only when info.supports_tools)
            request["tools"] = settings.tools
            request["tool_choice"] = "required" if settings.tool_call_required else "auto"
        for penalty in ("presence_penalty", "frequency_penalty"):
            if getattr(settings, penalty):
                request[penalty] = getattr(settings, penalty)
        try:
            stream = RemoteStream(self, request, settings.max_updates_per_second, last_user_text(messages),
                                  settings.arrived_at)
        except ChatInputError as refusal:
            raise self._tools_now_off(refusal) if "tools" in request else refusal from None
        stream.notices = notices
        if cancelled is not None:
            cancelled.on_set(lambda: stream.close(wait=0))
        return stream


def to_openai_message(message: dict) -> dict:
    parts = []
    for part in message["content"]:
        if part["type"] == "text":
            parts.append({"type": "text", "text": part["text"]})
        else:
            buffer = io.BytesIO()
            part["image"].save(buffer, format="PNG")
            data = base64.b64encode(buffer.getvalue()).decode("ascii")
            parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    if message["role"] != "user" and all(p["type"] == "text" for p in parts):
        converted = {"role": message["role"], "content": "\n".join(p["text"] for p in parts)}
    else:
        converted = {"role": message["role"], "content": parts}
    if message.get("tool_calls"):  # a saved chat's or an API client's tool round trip, as it was
        converted["tool_calls"] = [call.openai() for call in message["tool_calls"]]
        converted["content"] = converted["content"] or None
    if message["role"] == "tool":
        converted["tool_call_id"] = message.get("tool_call_id")
    return converted


class CallsBeingWritten:
    """The server's tool calls as its chunks write them: each call's id and name come once,
    its arguments (JSON) in pieces; a call is complete once the next one starts, or at the end.
    A call is told apart by its index, and by a new id at the same index (Ollama writes every
    call at index 0)."""

    def __init__(self):
        self._written: list[dict] = []       # {"id", "name", "arguments"} as sent so far, in order
        self._at: dict = {}                   # index → the call being written there
        self._made: dict[int, ToolCall] = {}  # the complete ones by position, made once (their ids stay)

    def add(self, deltas) -> None:
        for delta in deltas:
            call = self._at.get(delta.index)
            if call is None or (delta.id and call["id"] and delta.id != call["id"]):
                call = self._at[delta.index] = {"id": None, "name": "", "arguments": ""}
                self._written.append(call)
            call["id"] = call["id"] or delta.id
            if delta.function is not None:
                call["name"] = call["name"] or delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""

    def so_far(self) -> tuple[tuple[ToolCall, ...], bool]:
        """The calls complete so far, and whether one is being written."""
        calls = [self._made_call(position) for position in range(len(self._written) - 1)]
        return tuple(call for call in calls if call is not None), bool(self._written)

    def at_end(self, cut_off: bool) -> tuple[tuple[ToolCall, ...], list[str]]:
        """Every call, and the text of those whose arguments aren't a JSON object (shown in the
        answer, as the local engine shows a call it can't read); a last call cut off by the
        length limit is left out."""
        calls, unreadable = [], []
        for position, written in enumerate(self._written):
            call = self._made_call(position)
            if call is not None:
                calls.append(call)
            elif not (cut_off and position == len(self._written) - 1):
                unreadable.append(f"{TOOL_CALL_START}{written['name']} {written['arguments']}{TOOL_CALL_END}")
        return tuple(calls), unreadable

    def _made_call(self, position: int) -> ToolCall | None:
        if position not in self._made:
            written = self._written[position]
            try:
                arguments = json.loads(written["arguments"]) if written["arguments"].strip() else {}
            except ValueError:
                return None
            if not written["name"] or not isinstance(arguments, dict):
                return None
            self._made[position] = ToolCall(written["name"], arguments,
                                            **({"id": written["id"]} if written["id"] else {}))
        return self._made[position]


def _message_of(error: openai.APIError) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(getattr(error, "message", None) or error)


def _refusal_of(error: openai.APIStatusError, settings: Settings) -> Exception:
    """The server's refusal, typed as ours: a bad request (400, 413, 422) is the request's
    fault; a refused key (401, 403), an unknown model (404), busy (429, 503) or a failure
    (5xx) the server's or this app's set-up, not the caller's."""
    status = error.status_code
    message = f"The model server refused the request ({status}): {_message_of(error)}"
    if status in (400, 413, 422):
        code = (error.body or {}).get("code") if isinstance(error.body, dict) else None
        return ContextTooLong(message) if code == "context_length_exceeded" else ChatInputError(message)
    if status in (401, 403):
        message += " (this app's --api-key is sent to it)"
    return UpstreamError(message, busy=status in (429, 503),
                         retry_after=error.response.headers.get("retry-after") or str(settings.api_retry_after_s))


class RemoteStream(StreamBase):
    """An answer streaming from the server (a StreamBase): iterating it reads the HTTP
    stream, whose reasoning and answer come apart already; close() closes the HTTP stream,
    so the server stops generating too."""

    def __init__(self, runner: RemoteRunner, request: dict, max_updates_per_second: float, request_text: str,
                 arrived_at: float | None = None):
        self._due: list[Reply] = []  # replies the throttle let through, for the reader
        super().__init__(max_new_tokens=request["max_tokens"], max_updates_per_second=max_updates_per_second,
                         listeners=runner.finish_listeners, on_update=self._due.append, request_text=request_text,
                         arrived_at=arrived_at)
        self._runner = runner
        self._reasoning = ""
        self._answer = ""
        self._chunks = 0
        self._calls = CallsBeingWritten()
        self._usage_tokens: int | None = None
        self._server_finish: str | None = None
        try:
            self._response = runner.client.chat.completions.create(**request)
        except openai.APIConnectionError:
            runner.unreachable(f"Can't reach the model server at {runner.base_url}.")
            raise UpstreamError(f"Can't reach the model server at {runner.base_url}.") from None
        except openai.APIStatusError as error:
            runner.reached()
            raise _refusal_of(error, runner.settings) from None
        runner.reached()
        runner.counted.add(1)

    def __iter__(self):
        try:
            for chunk in self._response:
                if chunk.usage is not None:
                    self.prompt_tokens = chunk.usage.prompt_tokens
                    self._usage_tokens = chunk.usage.completion_tokens
                    details = chunk.usage.completion_tokens_details
                    self.reasoning_tokens = (details.reasoning_tokens if details is not None else None) or 0
                for choice in chunk.choices:
                    delta = choice.delta
                    # vLLM, SGLang, DeepSeek and this app send reasoning apart from the answer
                    extra = (delta.model_extra or {}) if delta else {}
                    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
                    if delta and (delta.content or reasoning or delta.tool_calls):
                        self._chunks += 1
                        self.first_token_at = self.first_token_at or time.perf_counter()
                        self._reasoning += reasoning or ""
                        self._answer += delta.content or ""
                        self._calls.add(delta.tool_calls or ())
                    if choice.finish_reason:
                        self._server_finish = "length" if choice.finish_reason == "length" else "stop"
                self.new_tokens = self._usage_tokens if self._usage_tokens is not None else self._chunks
                calls, calling = self._calls.so_far()
                self._update(Reply(answer=self._answer, reasoning=self._reasoning or None,
                                   reasoning_done=bool(self._answer or calls or calling),
                                   tool_calls=calls, calling=calling))
                yield from self._take_due()
        except openai.APIError as error:
            self._fail(UpstreamError(f"The model server failed: {_message_of(error)}"))
        except Exception as error:  # e.g. the connection dropped mid-answer
            if not self.closed_at and isinstance(error, httpx.TransportError):  # (not a bug of ours in reading it)
                self._runner.unreachable(f"The connection to the model server at {self._runner.base_url} broke.")
            self._fail(UpstreamError(f"The connection to the model server broke: {type(error).__name__}: {error}"))
        calls, unreadable = self._calls.at_end(cut_off=self._server_finish == "length")
        self.reply = Reply(answer="\n\n".join(filter(None, [self._answer, *unreadable])),
                           reasoning=self._reasoning or None, tool_calls=calls)
        self._finish(self._server_finish or "stop")
        yield from self._take_due()

    def _take_due(self):
        if self._due:
            latest = self._due[-1]
            self._due.clear()
            yield latest

    def _fail(self, error: GenerationError) -> None:
        """A broken stream: the answer ends with the error (raised), unless it had ended
        already (Stop closed the connection under the reader)."""
        if self._end(error=error, finish_reason="error"):
            self._runner.counted.add(-1)
            raise error from None

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._end(reason, error):
            self._runner.counted.add(-1)

    def _request_stop(self) -> None:
        """Close the HTTP stream: the server stops generating when its client leaves."""
        self._response.close()
        self._finish("cancelled")

    def close(self, wait: float = 0):
        super().close(wait)
