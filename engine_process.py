"""The engine in a process of its own: the model generates there, the web server streams here.

Why: CPython runs one thread's Python at a time (the GIL). The generate loop is
Python-bound (on a GPU, and for small models on a CPU), and Gradio spends a few ms of
Python on every streamed update (postprocess and diff of the chat, SSE). In one process
each update stalls generation that long: bench/benchmark.py measured the app at 0.81x
plain `generate` at 30 updates/s, and a thread burning 1 ms of Python 30 times a second
costs generate 4%; a process burning 5 ms costs it nothing. Two processes share only the
CPU cores. It also keeps the UI serving when the engine dies (a crash, an OOM kill): the
answer in flight ends with an error, and the next request starts a fresh engine.

    runner = EngineProcess.start("HuggingFaceTB/SmolVLM-256M-Instruct", device="auto")
    with runner.stream(messages, settings) as stream:   # the ModelRunner contract
        for text in stream:
            ...

Protocol: pickled tuples over two one-way pipes.
    web server -> engine   ("generate", id, messages, settings) · ("cancel", id) · ("exit",)
    engine -> web server   ("ready", info) | ("load_failed", message), then per request
                           ("started", id, info) | ("refused", id, kind, message),
                           ("text", id, offset, piece, progress)..., ("end", id, result)
The engine coalesces text updates (GenerationSettings.max_updates_per_second) and its
generate thread sends them itself (TextStream's on_update): the pipe carries at most that
many messages a second per answer, and no second thread wakes in the engine per update.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time

from conversation import (
    Cancelled,
    ChatInputError,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    StreamFigures,
    last_user_text,
    notify_finished,
    split_reasoning,
)

log = logging.getLogger("engine")

_REFUSALS = {"input": ChatInputError, "generation": GenerationError, "cancelled": Cancelled}


class EngineProcess:
    """A ModelRunner in a child process, with the ModelRunner interface: name, device,
    dtype, is_vision, one_at_a_time, active, finish_listeners, stream()."""

    one_at_a_time = True
    loaded = True  # (app.ModelSlot stands in while a model loads)

    def __init__(self, load_kwargs: dict):
        self._load_kwargs = load_kwargs
        self._streams: dict[int, EngineStream] = {}  # this launch's answers in flight
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._process = self._commands = None
        self.active = 0    # generating (0 or 1: the engine runs one answer at a time)
        self.finish_listeners: list = []
        self.restarts = 0

    @classmethod
    def start(cls, model: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
              compile: str | bool = "auto", served_name: str | None = None,
              torch_threads: int | None = None) -> "EngineProcess":
        """Start the engine and load the model there (ModelRunner.load's arguments).
        Raises ModelLoadError (one line)."""
        engine = cls({"model": model, "device": device, "dtype": dtype, "trust_remote_code": trust_remote_code,
                      "compile": compile, "served_name": served_name, "torch_threads": torch_threads})
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
        process.start()
        command_reader.close()  # the child's ends: EOF here when the child dies
        event_writer.close()
        try:
            kind, info = event_reader.recv()
        except (EOFError, OSError):
            process.join(5)
            raise ModelLoadError(f"The engine process exited while loading the model "
                                 f"({_exit_description(process.exitcode)}).") from None
        if kind == "load_failed":
            process.join(5)
            raise ModelLoadError(info)
        self.name, self.device, self.dtype, self.is_vision, self.compile = (
            info["name"], info["device"], info["dtype"], info["is_vision"], info["compile"])
        self._process, self._commands, self._streams = process, command_writer, {}
        threading.Thread(target=self._read_events, args=(event_reader, process, self._streams),
                         name="engine-events", daemon=True).start()

    def _send(self, *message) -> None:
        with self._send_lock:
            self._commands.send(message)

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               cancelled: threading.Event | None = None) -> "EngineStream":
        """Start generating; raises ChatInputError for a conversation the model can't take.
        Blocks while another answer is generating, like ModelRunner.stream; `cancelled` set
        meanwhile withdraws the request in the engine before it starts (Cancelled)."""
        settings = settings or GenerationSettings()
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
            self._send("generate", stream.id, messages, settings)
        except (OSError, ValueError):  # it died just now
            self._streams.pop(stream.id, None)
            raise GenerationError("The model process stopped; send again to restart it.") from None
        stream._wait_started(cancelled)
        return stream

    def _read_events(self, events, process, streams: dict) -> None:
        """The one thread that receives from one engine process; it updates its streams."""
        while True:
            try:
                kind, request_id, *payload = events.recv()
            except (EOFError, OSError):
                break
            stream = streams.get(request_id)
            if stream is None:
                continue
            if kind == "started":
                self.active += 1
                stream._on_started(payload[0])
            elif kind == "refused":
                streams.pop(request_id, None)
                stream._on_refused(_REFUSALS.get(payload[0], GenerationError)(payload[1]))
            elif kind == "text":
                stream._on_text(*payload)
            elif kind == "end":
                streams.pop(request_id, None)
                self.active -= 1
                stream._on_end(payload[0])
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
                stream._on_end({"error": str(error), "finish_reason": "error"})
                notify_finished(self.finish_listeners, stream)
            else:
                stream._on_refused(error)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process (answers in flight end as cancelled)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            self._send("exit")
        except (OSError, ValueError):
            pass
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(5)
        self._commands.close()


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
    """Same contract as model_runner.TextStream, for an answer generating in the engine
    process: iterate for the growing answer, close() to stop it (within one token)."""

    def __init__(self, engine: EngineProcess, request_id: int, settings: GenerationSettings,
                 request_text: str):
        self._engine = engine
        self.id = request_id
        self._updates: queue.Queue = queue.Queue()  # wake-ups for the consumer
        self._started = threading.Event()
        self._finished = threading.Event()
        self._refusal: BaseException | None = None
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
        self.token_times: list[float] | None = None  # with GenerationSettings.record_token_times
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._cancel_sent = False

    # -- called by the engine's reader thread
    def _on_started(self, info: dict) -> None:
        self.notices = info["notices"]
        self.prompt_tokens = info["prompt_tokens"]
        self.starts_in_reasoning = info["starts_in_reasoning"]
        self.max_new_tokens = info["max_new_tokens"]
        self.started_at = info["started_at"]
        self._started.set()

    def _on_refused(self, error: BaseException) -> None:
        self._refusal = error
        self._finished.set()
        self._started.set()

    def _on_text(self, offset: int, piece: str, progress: dict) -> None:
        self.text = self.text[:offset] + piece
        self.__dict__.update(progress)
        self._updates.put(True)

    def _on_end(self, result: dict) -> None:
        if result.get("text") is not None:
            self.text = result["text"]
        self.new_tokens = result.get("new_tokens", self.new_tokens)
        self.first_token_at = result.get("first_token_at", self.first_token_at)
        self.last_token_at = result.get("last_token_at", self.last_token_at)
        self.closed_at = result.get("closed_at", self.closed_at)
        self.tokens_after_close = result.get("tokens_after_close")
        self.token_times = result.get("token_times")
        self.ended_at = result.get("ended_at") or time.perf_counter()
        if result.get("error"):
            self.error = GenerationError(result["error"])
        self.finish_reason = result["finish_reason"]
        self._finished.set()
        self._updates.put(True)

    # -- the consumer's side
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
            while True:  # everything that has arrived: one update for all of it
                try:
                    self._updates.get_nowait()
                except queue.Empty:
                    break
            finished = self._finished.is_set()
            if self.error is not None:
                raise self.error
            if self.text != shown:
                shown = self.text
                yield shown
            if finished:
                return

    def parts(self, text: str | None = None) -> tuple[str | None, str, bool]:
        return split_reasoning(self.text if text is None else text, self.starts_in_reasoning)

    def close(self, wait: float = 10.0) -> None:
        """Stop generating (the engine stops within one token) and wait for the end."""
        if not self._finished.is_set() and not self._cancel_sent:
            self._cancel_sent = True
            try:
                self._engine._send("cancel", self.id)
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

def _engine_main(commands, events, load_kwargs: dict) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the web server's; we end with it (EOF)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    send_lock = threading.Lock()

    def send(*message):
        with send_lock:
            events.send(message)

    try:
        import tqdm  # its default lock is a multiprocessing semaphore, reported as leaked at exit
        tqdm.tqdm.set_lock(threading.RLock())
        from model_runner import ModelRunner
        runner = ModelRunner.load(**load_kwargs)
    except ModelLoadError as error:
        send("load_failed", str(error))
        return
    except BaseException as error:
        send("load_failed", f"Can't load the model: {type(error).__name__}: {error}")
        return
    send("ready", {"name": runner.name, "device": runner.device, "dtype": str(runner.dtype),
                   "is_vision": runner.is_vision, "compile": runner.compile})
    streams: dict = {}    # request id -> TextStream, while generating
    withdrawn: dict = {}  # request id -> Event, set by a cancel before its generation starts
    state_lock = threading.Lock()

    def serve(request_id: int, messages: list[dict], settings: GenerationSettings,
              cancelled: threading.Event) -> None:
        started = threading.Event()
        sent = ""

        def on_update(text: str) -> None:  # in the generate thread: no other thread wakes per update
            nonlocal sent
            started.wait()
            offset = len(sent) if text.startswith(sent) else 0
            send("text", request_id, offset, text[offset:],
                 {"new_tokens": stream.new_tokens, "first_token_at": stream.first_token_at})
            sent = text

        try:  # waits while another answer generates
            stream = runner.stream(messages, settings, on_update=on_update, cancelled=cancelled)
        except Exception as error:
            with state_lock:
                withdrawn.pop(request_id, None)
            if isinstance(error, Cancelled):
                send("refused", request_id, "cancelled", "Withdrawn before it started.")
            elif isinstance(error, (ChatInputError, GenerationError)):
                send("refused", request_id, "input" if isinstance(error, ChatInputError) else "generation",
                     str(error))
            else:  # a bug of ours: say so, keep serving
                log.exception("building the model inputs failed")
                send("refused", request_id, "generation", f"Internal error: {type(error).__name__}: {error}")
            return
        with state_lock:
            streams[request_id] = stream
            withdrawn.pop(request_id, None)
            if cancelled.is_set():  # the cancel came just as it started
                stream.close(wait=0)
        try:
            send("started", request_id, {
                "notices": stream.notices, "prompt_tokens": stream.prompt_tokens,
                "starts_in_reasoning": stream.starts_in_reasoning, "max_new_tokens": stream.max_new_tokens,
                "started_at": stream.started_at})
        finally:
            started.set()  # on a broken pipe, on_update fails too, and that stops generation
        stream.join()
        with state_lock:
            streams.pop(request_id, None)
        send("end", request_id, {
            "text": stream.text if stream.text != sent else None,
            "error": str(stream.error) if stream.error else None, "finish_reason": stream.finish_reason,
            "new_tokens": stream.new_tokens, "first_token_at": stream.first_token_at,
            "last_token_at": stream.last_token_at, "ended_at": stream.ended_at,
            "closed_at": stream.closed_at, "tokens_after_close": stream.tokens_after_close,
            "token_times": stream.token_times})

    while True:
        try:
            command = commands.recv()
        except (EOFError, OSError):  # the web server is gone
            break
        if command[0] == "generate":
            cancelled = threading.Event()
            with state_lock:
                withdrawn[command[1]] = cancelled
            threading.Thread(target=serve, args=(*command[1:], cancelled), name=f"request-{command[1]}",
                             daemon=True).start()
        elif command[0] == "cancel":
            with state_lock:
                stream, cancelled = streams.get(command[1]), withdrawn.get(command[1])
            if stream is not None:
                stream.close(wait=0)
            elif cancelled is not None:
                cancelled.set()
        elif command[0] == "exit":
            break
    with state_lock:
        running = list(streams.values())
    for stream in running:
        stream.close(wait=5)
    events.close()
    # No interpreter teardown: native threads (torch, tokenizers) abort noisily in it.
    os._exit(0)
