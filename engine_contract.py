"""The engine's contract: what a runner and a stream are, what a reply is made of, the errors
they raise, the settings of one answer, and the one rule for how often a stream shows its
growing reply. No torch: the web server imports this (the model runs in the engine process).

    runner.stream(messages, settings, cancelled=signal) -> Stream   # waits its turn, starts
    for reply in stream: ...        # a Reply: reasoning, answer, tool calls so far
    stream.close()                  # Stop: within one token

Runners: model_runner.ModelRunner (in this process), engine_process.EngineProcess (the
app's default), remote_backend.RemoteRunner (an OpenAI-compatible server), app.ModelSlot
(stands in while one loads). Each satisfies `Runner` and describes itself with one
`RunnerInfo`; its streams are `StreamBase`s (tests/test_contract.py checks every one).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol, runtime_checkable

from config import Settings

log = logging.getLogger("engine")

# ---------------------------------------------------------------- errors


def first_line(error: BaseException) -> str:
    """An error as one line for the user: its message's first line, else its type's name."""
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else ""
    return line or type(error).__name__


class ModelLoadError(Exception):
    """The model could not be found or loaded. The message is one readable line."""


class ChatInputError(Exception):
    """The conversation can't be sent to this model (bad image, too long, ...)."""


class ContextTooLong(ChatInputError):
    """The new message (or the conversation, for the batching cache) doesn't fit the context."""


class ImageRefused(ChatInputError):
    """An image (or another attachment) can't be read, or this model can't see images."""


class FileRefused(ImageRefused):
    """A document, audio or video (not an image) can't be read, or this model can't take it."""


class GenerationError(Exception):
    """Generation failed while running. The message is meant for the user."""


class UpstreamError(GenerationError):
    """The model server behind this app (--backend openai) failed, can't be reached, or
    refused this app (its key, its model), not the request. `busy`: it said to come back
    later (429, 503), in `retry_after` seconds if it said when."""

    def __init__(self, message: str, busy: bool = False, retry_after: str | None = None):
        super().__init__(message)
        self.busy, self.retry_after = busy, retry_after


class Cancelled(Exception):
    """The request was withdrawn (Stop, its client gone) while it waited: nothing ran."""


# Errors cross the engine's pipe by name (engine_process.Refused): these are the ones it knows.
ERRORS = {error.__name__: error for error in (ChatInputError, ContextTooLong, ImageRefused, FileRefused,
                                               GenerationError, UpstreamError, Cancelled)}


# ---------------------------------------------------------------- waiting without polling

class Signal:
    """A flag set once (Stop, a client gone, a model loaded) that can be waited on and that
    calls back when set: threading.Event has no callbacks, so waiting for "started or
    withdrawn" would need a polling loop."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:  # each on its own: one failing doesn't skip the others
            try:
                callback()
            except Exception:
                log.exception("a Signal's callback failed")

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` once when set (at once if it is). Returns what unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return lambda: None

    def _forget(self, callback) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


def wait_for_either(first: Signal, second: Signal | None, timeout: float | None = None) -> bool:
    """Block until either is set (True), or the timeout passes (False)."""
    if second is None:
        return first.wait(timeout)
    woken = threading.Event()
    forget = [signal.on_set(woken.set) for signal in (first, second)]
    try:
        return woken.wait(timeout)
    finally:
        for undo in forget:
            undo()


class ActiveCount:
    """Answers generating now: counted up and down from several threads (the loop, a batch
    manager's, a Stop), so under a lock (a bare += can lose an update)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.value = 0

    def add(self, change: int) -> None:
        with self._lock:
            self.value += change


# ---------------------------------------------------------------- a reply, parsed once

@dataclass(frozen=True)
class ToolCall:
    """A complete call the model asked for. `arguments` is a dict (decoded once)."""
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, arguments_as_json: bool = True) -> dict:
        """OpenAI's shape (the API's answers, the remote backend's requests); chat templates
        take the same with the arguments as a dict."""
        arguments = json.dumps(self.arguments, ensure_ascii=False) if arguments_as_json else self.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


@dataclass(frozen=True)
class Reply:
    """An answer so far, in the parts every consumer renders: the model's reasoning (None when
    it doesn't reason), the answer without its tool calls, the calls complete so far, and
    whether a call is being written. The engine makes these once; nobody splits text again."""
    answer: str = ""
    reasoning: str | None = None
    reasoning_done: bool = True
    tool_calls: tuple[ToolCall, ...] = ()
    calling: bool = False

    def changes_since(self, before: "Reply") -> dict:
        """What a receiver holding `before` needs to hold this: text fields as (offset,
        piece), new calls, flags (the engine's pipe sends this, not the whole reply)."""
        changes = {}
        for name in ("answer", "reasoning"):
            old, new = getattr(before, name), getattr(self, name)
            if new == old:
                continue
            if new is None or old is None:
                changes[name] = (0, new)
            else:
                offset = len(old) if new.startswith(old) else 0
                changes[name] = (offset, new[offset:])
        if self.tool_calls != before.tool_calls:
            shared = len(before.tool_calls) if self.tool_calls[:len(before.tool_calls)] == before.tool_calls else 0
            changes["tool_calls"] = (shared, self.tool_calls[shared:])
        for name in ("reasoning_done", "calling"):
            if getattr(self, name) != getattr(before, name):
                changes[name] = getattr(self, name)
        return changes

    def with_changes(self, changes: dict) -> "Reply":
        values = {}
        for name, change in changes.items():
            if name in ("answer", "reasoning"):
                offset, piece = change
                values[name] = piece if piece is None else (getattr(self, name) or "")[:offset] + piece
            elif name == "tool_calls":
                kept, new = change
                values[name] = self.tool_calls[:kept] + tuple(new)
            else:
                values[name] = change
        return replace(self, **values)


# ---------------------------------------------------------------- one answer's settings

@dataclass
class GenerationSettings:
    """One answer's settings."""
    max_new_tokens: int = Settings.max_new_tokens
    # The client asked for max_new_tokens (the API's max_tokens): a conversation that leaves it
    # less room in the context is refused (ContextTooLong), where a default is cut to the room left.
    max_new_tokens_asked: bool = False
    temperature: float = 0.0    # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # the answer ends before any of these
    max_updates_per_second: float = Settings.max_updates_per_second  # fewer for long chats (app.py)
    min_new_tokens: int | None = None  # forces the length (benchmarks, tests)
    tools: list[dict] | None = None  # JSON schemas ({"type": "function", "function": {...}}) for the template
    continues_answer: bool = False   # a tool loop's next step: it generates before requests that came later
    response_format: dict | None = None  # OpenAI's: json_object / json_schema constrain the answer (decoding.py)
    tool_call_required: bool = False     # the answer must be calls of `tools` (tool_choice required / named)
    # A call naming no function among `tools` stays in the answer as text (the API: a client
    # can only dispatch what it offered; the chat's toolbox answers an unknown name itself).
    calls_of_offered_tools_only: bool = False
    presence_penalty: float = 0.0    # OpenAI's penalties on tokens already in the answer (decoding.Penalties)
    logprobs: int | None = None      # each token's log probability and this many top alternatives (None: off)
    raw_prompt: bool = False         # the one user message's text is continued as it is, without the chat template
    frequency_penalty: float = 0.0
    # When the user asked (time.perf_counter, one clock for every process): its place in the
    # waiting line (waiting_line.Place.joined_at). time_to_first_token counts from here.
    arrived_at: float | None = None


# ---------------------------------------------------------------- runners

@dataclass(frozen=True)
class RunnerInfo:
    """What a runner is, in one record: made where the model runs, carried as it is to the
    web server (engine_process.Ready), read by the header, /healthz and the API."""
    name: str | None             # the served name (None: a remote server's default, until loaded)
    device: str
    dtype: str = ""
    is_vision: bool = True       # takes images
    hears_audio: bool = False    # takes audio natively (its processor's feature extractor)
    sees_video: bool = False     # takes video natively (its processor's video processor)
    compile: bool = False        # generates with a compiled static cache
    quantization: str | None = None  # "4bit" | "8bit" (bitsandbytes weights) | None
    batching: bool = False       # answers share forward passes (continuous batching, or a server)
    supports_tools: bool = False  # its chat template takes tools (GenerationSettings.tools)
    tools_off: str = ""          # else why not, in a phrase (the header, the log and the API say it)
    torch_threads: int | None = None  # the generation loop's torch threads (local models)
    loop_thread: int | None = None    # the generation loop's thread (native id; local models)
    loaded: bool = True          # False only while app.ModelSlot waits for the model

    @property
    def one_at_a_time(self) -> bool:
        """One answer generates at a time; the others wait in line."""
        return not self.batching


class DescribedByInfo:
    """A runner's descriptive attributes, read from its one `info` record."""
    info: RunnerInfo
    name = property(lambda self: self.info.name)
    device = property(lambda self: self.info.device)
    dtype = property(lambda self: self.info.dtype)
    is_vision = property(lambda self: self.info.is_vision)
    compile = property(lambda self: self.info.compile)
    quantization = property(lambda self: self.info.quantization)
    supports_tools = property(lambda self: self.info.supports_tools)
    one_at_a_time = property(lambda self: self.info.one_at_a_time)
    loaded = property(lambda self: self.info.loaded)
    problem: str | None = None  # why it can't answer now (None: it can)


@runtime_checkable
class Stream(Protocol):
    """One answer being generated (every kind is a StreamBase). Iterating it gives the reply
    so far, coalesced by an UpdateThrottle; close() (or leaving a `with` block) stops it
    within one token. The figures fill in as it runs; finish_reason is set when it ends:
    "stop", "length", "cancelled" or "error"."""

    reply: Reply
    text: str                   # the answer's text (reply.answer): logs, tests
    notices: list[str]          # for the user: history trimmed, an image downscaled, ...
    request_text: str           # the user's last message (logged only with --log-chats)
    max_new_tokens: int
    prompt_tokens: int
    new_tokens: int
    started_at: float
    arrived_at: float | None          # when the user asked (else started_at): the wait counts
    first_token_at: float | None
    ended_at: float | None
    closed_at: float | None           # the first close(): Stop, a closed tab, a cancel
    tokens_after_close: int | None    # tokens the model made after it (Stop really stops: 0 or 1)
    finish_reason: str | None
    error: BaseException | None
    time_to_first_token: float | None
    tokens_per_second: float | None

    def __iter__(self) -> Iterator[Reply]: ...

    def close(self, wait: float = 10.0) -> None:
        """Stop generating (within one token), waiting up to `wait` s for the end."""

    def join(self, timeout: float | None = None) -> bool:
        """Wait until generation has ended; True if it has."""

    def __enter__(self) -> "Stream": ...

    def __exit__(self, *exc) -> None: ...


@runtime_checkable
class Runner(Protocol):
    """Something that generates answers: a model here, in an engine process or behind an
    OpenAI-compatible server."""

    info: RunnerInfo
    name: str | None
    loaded: bool
    one_at_a_time: bool
    supports_tools: bool
    active: int            # answers generating now
    finish_listeners: list  # called with each stream when it ends (metrics, the line, logs)
    problem: str | None    # why it can't answer now, a sentence for /healthz (None: it can)

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               cancelled: Signal | None = None, on_reading: Callable[[], None] | None = None) -> Stream:
        """Start an answer. Raises ChatInputError (or a subclass) for a conversation the model
        can't take, GenerationError when the engine fails, Cancelled when `cancelled` was
        set while the request waited (nothing ran). `on_reading` is called (once, from
        another thread) if its documents, audio or video are being read before it can start:
        the waiting line lets the next request through meanwhile."""


# ---------------------------------------------------------------- streams

# The notice of an answer the batching cache leaves less room than max_new_tokens
ANSWER_CUT_TO_BATCH_CACHE = ("This answer can be at most {tokens} tokens long: that is what the batching cache holds "
                             "beside this conversation.")
_ENDED = object()


class StreamBase:
    """What every kind of stream shares: the figures, the reply handed out as it grows (at
    most as often as its UpdateThrottle allows; a reader that falls behind gets the latest),
    the end (once: its reason, the listeners told), close(), join() and `with`.

    A subclass makes the reply (`_update(reply)`), ends it (`_end()`), and says how to stop
    generating (`_request_stop()`)."""

    def __init__(self, *, max_new_tokens: int, max_updates_per_second: float = Settings.max_updates_per_second,
                 listeners: list | None = None, on_update: Callable[[Reply], None] | None = None,
                 on_end: Callable[["StreamBase"], None] | None = None, request_text: str = "",
                 arrived_at: float | None = None):
        self.reply = Reply()
        self.notices: list[str] = []
        self.logprobs: list[dict] = []  # with settings.logprobs: one entry per token, OpenAI's shape
        self.request_text = request_text
        self.max_new_tokens = max_new_tokens
        self.prompt_tokens = 0
        self.new_tokens = 0
        self.reasoning_tokens = 0  # of new_tokens, those of the reasoning (OpenAI's usage counts them): the engine's count
        self.started_at = time.perf_counter()
        self.arrived_at = arrived_at
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.ended_at: float | None = None
        self.closed_at: float | None = None
        self._tokens_at_close = 0
        self._tokens_after_close: int | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.token_times: list[float] | None = None  # every token's time, when recorded (benchmarks)
        self.generated_on: int | None = None  # the thread that generated it (native id)
        self._listeners = listeners if listeners is not None else []
        self._on_end = on_end  # before the listeners (the engine process sends the end on)
        self._throttle = UpdateThrottle(max_updates_per_second)
        self._updates: queue.SimpleQueue | None = None if on_update else queue.SimpleQueue()
        self._hand_out = on_update or self._updates.put
        self._ended = threading.Event()
        self._end_lock = threading.RLock()  # an update and the end never interleave

    @property
    def text(self) -> str:
        return self.reply.answer

    @property
    def time_to_first_token(self) -> float | None:
        """What the user waited: from the request's arrival, its wait in line included."""
        start = self.started_at if self.arrived_at is None else self.arrived_at
        return None if self.first_token_at is None else self.first_token_at - start

    @property
    def engine_time_to_first_token(self) -> float | None:
        """From the start of generation: the prefill and the first step alone."""
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def tokens_per_second(self) -> float | None:
        return decode_rate(self.new_tokens, self.first_token_at, self.ended_at)

    @property
    def tokens_after_close(self) -> int | None:
        if self._tokens_after_close is not None:  # as the engine counted them
            return self._tokens_after_close
        return None if self.closed_at is None else self.new_tokens - self._tokens_at_close

    @tokens_after_close.setter
    def tokens_after_close(self, value: int | None) -> None:
        self._tokens_after_close = value

    # -- the producer's side
    def _update(self, reply: Reply, final: bool = False) -> None:
        """The reply has grown: hand it out if an update is due (always at the end; never
        after it, whatever thread comes late)."""
        with self._end_lock:
            if self._ended.is_set():
                return
            self.reply = reply
            if not (self._throttle.last(reply) if final else self._throttle.due(reply)):
                return
            try:
                self._hand_out(reply)
                return
            except Exception:  # nobody to hand it to any more: stop generating
                pass
        self._request_stop()

    def _end(self, finish_reason: str, error: BaseException | None = None) -> bool:
        """The answer has ended (once; False when it already had): its reason, the last
        reply shown, the reader and the listeners told."""
        with self._end_lock:
            if self._ended.is_set():
                return False
            self.ended_at = self.ended_at or time.perf_counter()
            self.error = error if error is not None else self.error
            self.finish_reason = "error" if self.error is not None else finish_reason
            self._update(self.reply, final=True)
            if self._updates is not None:
                self._updates.put(_ENDED)
            self._ended.set()
        if self._on_end is not None:
            self._on_end(self)
        notify_finished(self._listeners, self)
        return True

    def _request_stop(self) -> None:
        raise NotImplementedError

    # -- the consumer's side
    def __iter__(self) -> Iterator[Reply]:
        if self._updates is None:
            raise TypeError("this stream's updates go to its on_update")
        while True:
            items = [self._updates.get()]
            while not self._updates.empty():  # everything that has arrived: one update for all
                items.append(self._updates.get())
            ended = _ENDED in items
            replies = items[:items.index(_ENDED)] if ended else items
            if replies:
                yield replies[-1]
            if ended:
                break
        if self.error is not None:
            raise self.error

    def close(self, wait: float = 10.0) -> None:
        if self.closed_at is None and not self._ended.is_set():
            self.closed_at, self._tokens_at_close = time.perf_counter(), self._tokens_decided()
        if not self._ended.is_set():
            self._request_stop()
        self._ended.wait(wait)

    def _tokens_decided(self) -> int:
        """Tokens the model had made so far (tokens_after_close counts from here)."""
        return self.new_tokens

    def join(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class UpdateThrottle:
    """When a stream shows its growing reply: at most `per_second` times a second, the first
    at once, and what is left at the end. Every stream kind decides with one of these."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / max(0.1, per_second)
        self.shown = None
        self.next_at = 0.0

    def may_show(self, now: float | None = None) -> bool:
        """An update would be due now if the reply is new (cheap: before making the reply)."""
        return (time.perf_counter() if now is None else now) >= self.next_at

    def due(self, reply, now: float | None = None) -> bool:
        """True (and `reply` counts as shown) when it is new and an update is due."""
        now = time.perf_counter() if now is None else now
        if reply == self.shown or now < self.next_at:
            return False
        self.shown, self.next_at = reply, now + self.interval
        return True

    def last(self, reply) -> bool:
        """At the end: True (and `reply` counts as shown) when it was not shown yet."""
        if reply == self.shown:
            return False
        self.shown = reply
        return True


def decode_rate(new_tokens: int, first_token_at: float | None, ended_at: float | None) -> float | None:
    """Tokens per second after the first one (the first is the prefill's)."""
    end = ended_at or time.perf_counter()
    if first_token_at is None or new_tokens < 2 or end <= first_token_at:
        return None
    return (new_tokens - 1) / (end - first_token_at)


def notify_finished(listeners: list, stream) -> None:
    for listener in list(listeners):
        try:
            listener(stream)
        except Exception:  # a broken listener (metrics, logging) must not break generation
            pass


def served_model_name(model: str) -> str:
    """The name clients see and ask for (/v1/models, the header): a hub id as it is, a
    local directory by its own name, never its path on this machine."""
    if model.startswith((".", "/", "~")) or Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve().name or model
    return model
