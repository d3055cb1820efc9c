"""A runner in front of any OpenAI-compatible server (vLLM, TGI, SGLang, Ollama, llama.cpp
server, or another instance of this app), through the official `openai` client: the
engine_contract.Runner contract, so the UI and this app's own /v1 use it like a local model.

    python app.py --backend openai --base-url http://gpu-box:8000/v1 --model Qwen/Qwen2.5-VL-72B-Instruct
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import openai

import config
from conversation import alternate_roles, last_user_text, prepare_messages, split_reasoning
from engine_contract import (
    Cancelled,
    ChatInputError,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    StreamFigures,
    UpdateThrottle,
    notify_finished,
)


class RemoteRunner:
    one_at_a_time = False  # the server batches: requests are not serialised here
    loaded = True  # (app.ModelSlot stands in while a model loads)

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 served_name: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "not-needed", max_retries=1,
            timeout=openai.Timeout(config.settings.remote_read_timeout_s, connect=config.settings.remote_connect_timeout_s))
        self.model = model or self._served_model()  # the server's name for it
        self.name = served_name or self.model       # this app's
        self.device = f"via {self.base_url}"
        self.dtype = "set by the server"
        self.is_vision = True  # the server decides; a text-only one answers with an error
        self.compile = False   # (the server's business)
        self.quantization = None
        self.supports_tools = False  # (the server's tool calls aren't passed through)
        self.active = 0
        self.finish_listeners: list = []

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

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               cancelled=None) -> "RemoteStream":
        """Start streaming from the server (it queues and batches: nothing waits here)."""
        settings = settings or GenerationSettings()
        if cancelled is not None and cancelled.is_set():
            raise Cancelled()
        notices: list[str] = []
        prepared = alternate_roles(prepare_messages(messages, sees_images=True, model_name=self.name,
                                                    notices=notices))
        request = {
            "model": self.model, "messages": [to_openai_message(m) for m in prepared],
            "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": settings.top_p, "stream": True, "stream_options": {"include_usage": True},
        }
        if settings.seed is not None:
            request["seed"] = settings.seed
        if settings.stop:
            request["stop"] = settings.stop
        stream = RemoteStream(self, request, settings.max_updates_per_second)
        stream.notices = notices
        stream.request_text = last_user_text(messages)
        return stream

    def _notify_finished(self, stream) -> None:
        notify_finished(self.finish_listeners, stream)


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
        converted["tool_calls"] = [{"id": call["id"], "type": "function", "function": {
            "name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for call in message["tool_calls"]]
        converted["content"] = converted["content"] or None
    if message["role"] == "tool":
        converted["tool_call_id"] = message.get("tool_call_id")
    return converted


def _message_of(error: openai.APIError) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(getattr(error, "message", None) or error)


class RemoteStream(StreamFigures):
    """An answer streaming from the server (the engine_contract.Stream contract): iterate for
    the growing answer; close() closes the HTTP stream, so the server stops generating too."""

    def __init__(self, runner: RemoteRunner, request: dict, max_updates_per_second: float):
        self._runner = runner
        self._throttle = UpdateThrottle(max_updates_per_second)
        self._ended = threading.Event()
        self.max_new_tokens = request["max_tokens"]
        self.text = ""
        self._reasoning = ""
        self._answer = ""
        self.prompt_tokens = 0
        self._chunks = 0
        self._usage_tokens: int | None = None
        self.finish_reason: str | None = None
        self.parsed_reply: dict | None = None  # (tools are the local engine's)
        self.error: BaseException | None = None
        self.notices: list[str] = []
        self.request_text = ""
        self.starts_in_reasoning = False  # the server sends reasoning apart: text opens it itself
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.closed_at: float | None = None
        self._tokens_at_close = 0
        try:
            self._response = runner.client.chat.completions.create(**request)
        except openai.APIConnectionError:
            raise GenerationError(f"Can't reach the model server at {runner.base_url}.") from None
        except openai.APIStatusError as error:
            cls = ChatInputError if 400 <= error.status_code < 500 else GenerationError
            raise cls(f"The model server refused the request ({error.status_code}): "
                      f"{_message_of(error)}") from None
        runner.active += 1

    @property
    def new_tokens(self) -> int:
        return self._usage_tokens if self._usage_tokens is not None else self._chunks

    @property
    def tokens_after_close(self) -> int | None:
        """Chunks (tokens, as the server counts them) read after close(): none, since
        closing stops the reading."""
        return None if self.closed_at is None else self.new_tokens - self._tokens_at_close

    def __iter__(self):
        try:
            for chunk in self._response:
                if chunk.usage is not None:
                    self.prompt_tokens = chunk.usage.prompt_tokens
                    self._usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    delta = choice.delta
                    # vLLM, SGLang, DeepSeek and this app send reasoning apart from the answer
                    reasoning = (delta.model_extra or {}).get("reasoning_content") or \
                        (delta.model_extra or {}).get("reasoning") if delta else None
                    if delta and (delta.content or reasoning):
                        self._chunks += 1
                        self.first_token_at = self.first_token_at or time.perf_counter()
                        self._reasoning += reasoning or ""
                        self._answer += delta.content or ""
                        self.text = (f"<think>{self._reasoning}</think>{self._answer}"
                                     if self._reasoning else self._answer)
                    if choice.finish_reason:
                        self.finish_reason = "length" if choice.finish_reason == "length" else "stop"
                if self._throttle.due(self.text):
                    yield self.text
        except openai.APIError as error:
            self.error = GenerationError(f"The model server failed: {_message_of(error)}")
            self._finish("error")
            raise self.error from None
        except Exception as error:  # e.g. the connection dropped mid-answer
            self.error = GenerationError(f"The connection to the model server broke: "
                                         f"{type(error).__name__}: {error}")
            self._finish("error")
            raise self.error from None
        self._finish(self.finish_reason or "stop")
        if self._throttle.last(self.text):
            yield self.text

    def parts(self, text: str | None = None):
        return split_reasoning(self.text if text is None else text)

    def _finish(self, reason: str):
        if self.ended_at is None:
            self.ended_at = time.perf_counter()
            self.finish_reason = reason
            self._runner.active -= 1
            self._ended.set()
            self._runner._notify_finished(self)

    def close(self, wait: float = 0):
        """Close the HTTP stream: the server stops generating when its client leaves."""
        if self.ended_at is None:
            self.closed_at, self._tokens_at_close = time.perf_counter(), self.new_tokens
            self._response.close()
            self._finish("cancelled")

    def join(self, timeout: float | None = None) -> bool:
        """Until the answer has ended: read to its end, failed or closed."""
        return self._ended.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
