"""The engine's contract: what a runner and a stream are, the errors they raise, the settings
of one answer, and the one rule for how often a stream shows its growing text. No torch:
the web server imports this (the model runs in the engine process).

    runner.stream(messages, settings, cancelled=event) -> Stream   # waits its turn, starts
    for text in stream: ...                                         # the answer so far
    stream.close()                                                  # Stop: within one token

Runners: model_runner.ModelRunner (in this process), engine_process.EngineProcess (the
app's default), remote_backend.RemoteRunner (an OpenAI-compatible server), app.ModelSlot
(stands in while one loads). Each satisfies `Runner`, and its streams `Stream`
(tests/test_contract.py checks every one).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import config


class ModelLoadError(Exception):
    """The model could not be found or loaded. The message is one readable line."""


class ChatInputError(Exception):
    """The conversation can't be sent to this model (bad image, too long, ...)."""


class GenerationError(Exception):
    """Generation failed while running. The message is meant for the user."""


class Cancelled(Exception):
    """The request was withdrawn (Stop, its client gone) while it waited: nothing ran."""


@dataclass
class GenerationSettings:
    """One answer's settings."""
    max_new_tokens: int = field(default_factory=lambda: config.settings.max_new_tokens)
    temperature: float = 0.0    # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # the answer ends before any of these
    max_updates_per_second: float = field(  # fewer for long chats (app.py)
        default_factory=lambda: config.settings.max_updates_per_second)
    min_new_tokens: int | None = None  # forces the length (benchmarks, tests)
    tools: list[dict] | None = None  # JSON schemas ({"type": "function", "function": {...}}) for the template
    continues_answer: bool = False   # a tool loop's next step: it generates before requests that came later


@runtime_checkable
class Stream(Protocol):
    """One answer being generated. Iterating it gives the answer so far, coalesced by an
    UpdateThrottle; close() (or leaving a `with` block) stops it within one token. The
    figures fill in as it runs; finish_reason is set when it ends: "stop", "length",
    "cancelled" or "error"."""

    text: str
    notices: list[str]          # for the user: history trimmed, an image downscaled, ...
    request_text: str           # the user's last message (logged only with --log-chats)
    starts_in_reasoning: bool   # the prompt opened a <think> block
    max_new_tokens: int
    prompt_tokens: int
    new_tokens: int
    started_at: float
    first_token_at: float | None
    ended_at: float | None
    closed_at: float | None           # the first close(): Stop, a closed tab, a cancel
    tokens_after_close: int | None    # tokens generated after it (Stop really stops: 0 or 1)
    finish_reason: str | None
    error: BaseException | None
    time_to_first_token: float | None
    tokens_per_second: float | None
    parsed_reply: dict | None         # with tools and a tokenizer response_template, once ended:
                                      # {"content", "tool_calls": [{"name", "arguments"}]}

    def __iter__(self) -> Iterator[str]: ...

    def parts(self, text: str | None = None) -> tuple[str | None, str, bool]:
        """(reasoning or None, answer, reasoning finished?) of `text` (default: so far)."""

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

    name: str | None       # the served name (None: a remote server's default, until loaded)
    device: str
    dtype: object
    is_vision: bool        # takes images
    compile: bool          # generates with a compiled static cache
    quantization: str | None  # "4bit" | "8bit" (bitsandbytes weights) | None
    supports_tools: bool   # its chat template takes tools (GenerationSettings.tools)
    loaded: bool           # False only while app.ModelSlot waits for the model
    one_at_a_time: bool    # answers one request at a time (the others wait in line)
    active: int            # answers generating now
    finish_listeners: list  # called with each stream when it ends (metrics, the line, logs)

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               cancelled: threading.Event | None = None) -> Stream:
        """Start an answer. Raises ChatInputError for a conversation the model can't take,
        GenerationError when the engine fails, Cancelled when `cancelled` was set while
        the request waited (nothing ran)."""


class StreamFigures:
    """Time to first token and decode rate, from new_tokens, started_at, first_token_at
    and ended_at: every stream kind inherits it."""

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def tokens_per_second(self) -> float | None:
        return decode_rate(self.new_tokens, self.first_token_at, self.ended_at)


class UpdateThrottle:
    """When a stream shows its growing text: at most `per_second` times a second, the first
    at once, and what is left at the end. Every stream kind decides with one of these."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / max(0.1, per_second)
        self.shown = ""
        self.next_at = 0.0

    def due(self, text: str, now: float | None = None) -> bool:
        """True (and `text` counts as shown) when it is new and an update is due."""
        now = time.perf_counter() if now is None else now
        if text == self.shown or now < self.next_at:
            return False
        self.shown, self.next_at = text, now + self.interval
        return True

    def last(self, text: str) -> bool:
        """At the end: True (and `text` counts as shown) when it was not shown yet."""
        if text == self.shown:
            return False
        self.shown = text
        return True


def decode_rate(new_tokens: int, first_token_at: float | None, ended_at: float | None) -> float | None:
    """Tokens per second after the first one (the first is the prefill's)."""
    end = ended_at or time.perf_counter()
    if first_token_at is None or new_tokens < 2 or end <= first_token_at:
        return None
    return (new_tokens - 1) / (end - first_token_at)


def notify_finished(listeners: list, stream: Stream) -> None:
    for listener in listeners:
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
