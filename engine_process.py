"""The engine in a process of its own: the model generates there, the web server streams here.

Why: CPython runs one thread's Python at a time (the GIL). The generate loop is Python-bound
(on a GPU, and for small models on a CPU), and Gradio spends a few milliseconds of Python
on every streamed update; in one process each update would stall generation that long
(README, Performance). Two processes share only the CPU cores. It also keeps the UI
serving when the engine dies (a crash, an OOM kill): the answer in flight ends with an
error, and the next request starts a fresh engine.

    runner = EngineProcess.start("HuggingFaceTB/SmolVLM-256M-Instruct", device="auto")
    with runner.stream(messages, settings) as stream:   # the engine_contract.Runner contract
        for text in stream:
            ...

Protocol: the dataclasses below, pickled over two one-way pipes.
    web server -> engine   Generate · Cancel · Exit
    engine -> web server   Ready | LoadFailed, then per request
                           Started | Refused, Text..., Ended
The engine's TextStream coalesces the text (UpdateThrottle) and its generate thread sends
each update itself: at most max_updates_per_second messages a second per answer, and no
other thread wakes in the engine per update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass

from conversation import last_user_text, split_reasoning
from engine_contract import (
    Cancelled,
    ChatInputError,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    StreamFigures,
    notify_finished,
)

log = logging.getLogger("engine")


# ---------------------------------------------------------------- the messages

@dataclass
class Generate:
    request_id: int
    messages: list[dict]
    settings: GenerationSettings


@dataclass
class Cancel:
    request_id: int


@dataclass
class Exit:
    pass


@dataclass
class Ready:
    name: str
    device: str
    dtype: str
    is_vision: bool
    compile: bool
    one_at_a_time: bool   # False: continuous batching
    quantization: str | None
    supports_tools: bool


@dataclass
class LoadFailed:
    message: str


@dataclass
class Started:
    request_id: int
    notices: list[str]
    prompt_tokens: int
    starts_in_reasoning: bool
    max_new_tokens: int
    started_at: float


@dataclass
class Refused:
    request_id: int
    error: str        # "input" | "generation" | "cancelled" (the key of REFUSALS)
    message: str


REFUSALS = {"input": ChatInputError, "generation": GenerationError, "cancelled": Cancelled}


@dataclass
class Text:
    request_id: int
    offset: int        # the piece replaces the text from here (it only grows, normally)
    piece: str
    new_tokens: int
    first_token_at: float | None


@dataclass
class Ended:
    """The end of an answer: its figures, as the engine's TextStream has them. These
    fields are what EngineStream takes over at the end."""
    request_id: int
    text: str | None   # None: as last sent
    error: str | None
    finish_reason: str
    new_tokens: int
    first_token_at: float | None
    last_token_at: float | None
    ended_at: float | None
    closed_at: float | None
    tokens_after_close: int | None
    token_times: list[float] | None
    parsed_reply: dict | None

    @classmethod
    def of(cls, request_id: int, stream, sent: str) -> "Ended":
        figures = {f.name: getattr(stream, f.name) for f in dataclasses.fields(cls)
                   if f.name not in ("request_id", "text", "error")}
        return cls(request_id, stream.text if stream.text != sent else None,
                   str(stream.error) if stream.error else None, **figures)


# ---------------------------------------------------------------- the web server's side

class EngineProcess:
    """A ModelRunner in a child process (the engine_contract.Runner contract)."""

    loaded = True  # (app.ModelSlot stands in while a model loads)

    def __init__(self, load_kwargs: dict):
        self._load_kwargs = load_kwargs
        self._streams: dict[int, EngineStream] = {}  # this launch's answers in flight
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._process = self._commands = None
        self.active = 0    # generating (0 or 1, unless the engine batches)
        self.one_at_a_time = True  # what the engine says when it is ready
        self.finish_listeners: list = []
        self.restarts = 0

    @classmethod
    def start(cls, model: str, **load_kwargs) -> "EngineProcess":
        """Start the engine and load the model there (ModelRunner.load's arguments).
        Raises ModelLoadError (one line)."""
        engine = cls({"model": model, **load_kwargs})
        engine._launch()
        return engine

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _launch(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork and CUDA (or threads) don't mix
        command_reader, command_writer = context.Pipe(duplex=False)
        event_reader, event_writer = context.Pipe(duplex=False)
        process = context.Process(target=_engine_main, name="engine", daemon=True,
                                  args=(command_reader, event_writer, self._load_kwargs))
        with _main_module_not_imported():
            process.start()
        command_reader.close()  # the child's ends: EOF here when the child dies
        event_writer.close()
        try:
            ready = event_reader.recv()
        except (EOFError, OSError):
            process.join(5)
            raise ModelLoadError(f"The engine process exited while loading the model "
                                 f"({_exit_description(process.exitcode)}).") from None
        if isinstance(ready, LoadFailed):
            process.join(5)
            raise ModelLoadError(ready.message)
        self.name, self.device, self.dtype, self.is_vision, self.compile, self.one_at_a_time = (
            ready.name, ready.device, ready.dtype, ready.is_vision, ready.compile, ready.one_at_a_time)
        self.quantization, self.supports_tools = ready.quantization, ready.supports_tools
        self._process, self._commands, self._streams = process, command_writer, {}
        threading.Thread(target=self._read_events, args=(event_reader, process, self._streams),
                         name="engine-events", daemon=True).start()

    def _send(self, message) -> None:
        with self._send_lock:
            self._commands.send(message)

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               cancelled: threading.Event | None = None) -> "EngineStream":
        """Start generating; raises ChatInputError for a conversation the model can't take.
        Blocks while another answer is generating, like ModelRunner.stream; `cancelled` set
        meanwhile withdraws the request in the engine before it starts (Cancelled)."""
        settings = settings or GenerationSettings()
        if cancelled is not None and cancelled.is_set():
            raise Cancelled()
        with self._launch_lock:
            if not self.alive:  # it died (crash, OOM kill): a fresh one for this request
                log.warning("The engine process is gone; starting a new one.")
                try:
                    self._launch()
                except ModelLoadError as error:
                    raise GenerationError(f"The model process stopped and could not restart: {error}") from None
                self.restarts += 1
            stream = EngineStream(self, next(self._ids), settings, last_user_text(messages))
            self._streams[stream.id] = stream
        try:
            self._send(Generate(stream.id, messages, settings))
        except (OSError, ValueError):  # it died just now
            self._streams.pop(stream.id, None)
            raise GenerationError("The model process stopped; send again to restart it.") from None
        stream._wait_started(cancelled)
        return stream

    def _read_events(self, events, process, streams: dict) -> None:
        """The one thread that receives from one engine process; it updates its streams."""
        while True:
            try:
                event = events.recv()
            except (EOFError, OSError):
                break
            stream = streams.get(event.request_id)
            if stream is None:
                continue
            if isinstance(event, Text):
                stream._on_text(event)
            elif isinstance(event, Started):
                self.active += 1
                stream._on_started(event)
            elif isinstance(event, Refused):
                streams.pop(event.request_id, None)
                stream._on_refused(REFUSALS.get(event.error, GenerationError)(event.message))
            elif isinstance(event, Ended):
                streams.pop(event.request_id, None)
                self.active -= 1
                stream._on_end(event)
                notify_finished(self.finish_listeners, stream)
        process.join(5)
        reason = _exit_description(process.exitcode)
        if process is self._process:  # not closed on purpose
            log.error("The engine process stopped (%s).", reason)
        for request_id in list(streams):
            stream = streams.pop(request_id)
            error = GenerationError(f"The model process stopped ({reason}); the answer is cut here. "
                                    f"Send again to restart it.")
            if stream._started.is_set():
                self.active -= 1
                stream._on_end(Ended(
                    request_id=request_id, text=None, error=str(error), finish_reason="error",
                    new_tokens=stream.new_tokens, first_token_at=stream.first_token_at,
                    last_token_at=stream.last_token_at, ended_at=None, closed_at=stream.closed_at,
                    tokens_after_close=None, token_times=None, parsed_reply=None))
                notify_finished(self.finish_listeners, stream)
            else:
                stream._on_refused(error)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process (answers in flight end as cancelled)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            self._send(Exit())
        except (OSError, ValueError):
            pass
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(5)
        self._commands.close()


@contextlib.contextmanager
def _main_module_not_imported():
    """A spawned child imports the parent's main script before anything else (`python
    app.py`: Gradio and the whole web server, seconds and hundreds of MB in the engine).
    The engine needs nothing from it: without a __file__, as for an interactive session,
    multiprocessing leaves it out."""
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None) if getattr(main, "__spec__", None) is None else None
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        import signal
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = ", e.g. by the out-of-memory killer" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


class EngineStream(StreamFigures):
    """An answer generating in the engine process (the engine_contract.Stream contract):
    iterate for the growing answer, close() to stop it (within one token)."""

    def __init__(self, engine: EngineProcess, request_id: int, settings: GenerationSettings,
                 request_text: str):
        self._engine = engine
        self.id = request_id
        self._updates: queue.SimpleQueue = queue.SimpleQueue()  # wake-ups for the reader
        self._started = threading.Event()
        self._finished = threading.Event()
        self._refusal: BaseException | None = None
        self._cancel_sent = False
        self.max_new_tokens = settings.max_new_tokens
        self.request_text = request_text
        self.text = ""
        self.notices: list[str] = []
        self.starts_in_reasoning = False
        self.prompt_tokens = 0
        self.new_tokens = 0
        self.started_at = time.perf_counter()  # replaced by the engine's (same clock)
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.ended_at: float | None = None
        self.closed_at: float | None = None
        self.tokens_after_close: int | None = None
        self.token_times: list[float] | None = None  # when the engine records them (benchmarks)
        self.parsed_reply: dict | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None

    # -- called by the engine's reader thread
    def _on_started(self, started: Started) -> None:
        self.notices, self.prompt_tokens = started.notices, started.prompt_tokens
        self.starts_in_reasoning, self.max_new_tokens = started.starts_in_reasoning, started.max_new_tokens
        self.started_at = started.started_at
        self._started.set()

    def _on_refused(self, error: BaseException) -> None:
        self._refusal = error
        self._finished.set()
        self._started.set()

    def _on_text(self, text: Text) -> None:
        self.text = self.text[:text.offset] + text.piece
        self.new_tokens, self.first_token_at = text.new_tokens, text.first_token_at
        self._updates.put(True)

    def _on_end(self, ended: Ended) -> None:
        for field in dataclasses.fields(Ended):
            if field.name not in ("request_id", "text", "error"):
                setattr(self, field.name, getattr(ended, field.name))
        if ended.text is not None:
            self.text = ended.text
        self.ended_at = self.ended_at or time.perf_counter()
        if ended.error:
            self.error = GenerationError(ended.error)
        self._finished.set()
        self._updates.put(True)

    # -- the reader's side
    def _wait_started(self, cancelled: threading.Event | None) -> None:
        while not self._started.wait(None if cancelled is None else 0.05):
            if cancelled.is_set():
                self.close(wait=0)  # the engine drops it unstarted: refused as "cancelled"
        if self._refusal is not None:
            raise self._refusal

    def __iter__(self):
        shown = ""
        while True:
            self._updates.get()
            while not self._updates.empty():  # everything that has arrived: one update for all
                self._updates.get()
            finished = self._finished.is_set()
            if self.text != shown:
                shown = self.text
                yield shown
            if finished:
                if self.error is not None:
                    raise self.error
                return

    def parts(self, text: str | None = None) -> tuple[str | None, str, bool]:
        return split_reasoning(self.text if text is None else text, self.starts_in_reasoning)

    def close(self, wait: float = 10.0) -> None:
        if not self._finished.is_set() and not self._cancel_sent:
            self._cancel_sent = True
            try:
                self._engine._send(Cancel(self.id))
            except (OSError, ValueError, AttributeError):
                pass  # the engine is gone: the reader ends this stream
        self._finished.wait(wait)

    def join(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- the engine process

@dataclass
class _Request:
    cancelled: threading.Event   # set by a Cancel before it started: it never does
    stream: object = None        # its TextStream, once generating


class _EngineServer:
    """Runs in the engine process: one thread per request waits for the model and streams
    it; every request is in one table until its answer has ended."""

    def __init__(self, runner, events):
        self.runner, self.events = runner, events
        self.requests: dict[int, _Request] = {}
        self.lock = threading.Lock()  # for the table and the events pipe

    def send(self, message) -> None:
        with self.lock:
            self.events.send(message)

    def run(self, commands) -> None:
        while True:
            try:
                command = commands.recv()
            except (EOFError, OSError):  # the web server is gone
                break
            if isinstance(command, Generate):
                request = _Request(threading.Event())
                with self.lock:
                    self.requests[command.request_id] = request
                threading.Thread(target=self.answer, args=(command, request), daemon=True,
                                 name=f"request-{command.request_id}").start()
            elif isinstance(command, Cancel):
                with self.lock:
                    request = self.requests.get(command.request_id)
                if request is not None:
                    request.cancelled.set()
                    if request.stream is not None:
                        request.stream.close(wait=0)
            elif isinstance(command, Exit):
                break
        with self.lock:
            running = [r.stream for r in self.requests.values() if r.stream is not None]
        for stream in running:
            stream.close(wait=5)

    def answer(self, command: Generate, request: _Request) -> None:
        request_id, started, sent = command.request_id, threading.Event(), ""

        def on_update(text: str) -> None:  # in the generate thread
            nonlocal sent
            started.wait()
            offset = len(sent) if text.startswith(sent) else 0
            self.send(Text(request_id, offset, text[offset:], stream.new_tokens, stream.first_token_at))
            sent = text

        try:  # waits while another answer generates
            stream = self.runner.stream(command.messages, command.settings, on_update=on_update,
                                        cancelled=request.cancelled)
        except Exception as error:
            with self.lock:
                self.requests.pop(request_id, None)
            if isinstance(error, Cancelled):
                self.send(Refused(request_id, "cancelled", "Withdrawn before it started."))
            elif isinstance(error, (ChatInputError, GenerationError)):
                self.send(Refused(request_id, "input" if isinstance(error, ChatInputError) else "generation",
                                  str(error)))
            else:  # a bug of ours: say so, keep serving
                log.exception("building the model inputs failed")
                self.send(Refused(request_id, "generation", f"Internal error: {type(error).__name__}: {error}"))
            return
        with self.lock:
            request.stream = stream
        if request.cancelled.is_set():  # the cancel came just as it started
            stream.close(wait=0)
        try:
            self.send(Started(request_id, stream.notices, stream.prompt_tokens, stream.starts_in_reasoning,
                              stream.max_new_tokens, stream.started_at))
        finally:
            started.set()  # on a broken pipe, on_update fails too, and that stops generation
        stream.join()
        with self.lock:
            self.requests.pop(request_id, None)
        self.send(Ended.of(request_id, stream, sent))


def _engine_main(commands, events, load_kwargs: dict) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the web server's; we end with it (EOF)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import tqdm  # its default lock is a multiprocessing semaphore, reported as leaked at exit
        tqdm.tqdm.set_lock(threading.RLock())
        from model_runner import ModelRunner
        runner = ModelRunner.load(**load_kwargs)
    except ModelLoadError as error:
        events.send(LoadFailed(str(error)))
        return
    except BaseException as error:
        events.send(LoadFailed(f"Can't load the model: {type(error).__name__}: {error}"))
        return
    events.send(Ready(name=runner.name, device=runner.device, dtype=str(runner.dtype), is_vision=runner.is_vision,
                      compile=runner.compile, one_at_a_time=runner.one_at_a_time,
                      quantization=runner.quantization, supports_tools=runner.supports_tools))
    _EngineServer(runner, events).run(commands)
    events.close()
    # No interpreter teardown: native threads (torch, tokenizers) abort noisily in it.
    os._exit(0)
