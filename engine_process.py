"""The engine in a process of its own: the model generates there, the web server streams here.

Why: CPython runs one thread's Python at a time (the GIL). The generate loop is Python-bound
(on a GPU, and for small models on a CPU), and Gradio spends a few milliseconds of Python
on every streamed update; in one process each update would stall generation that long
(README, Performance). Two processes share only the CPU cores. It also keeps the UI
serving when the engine dies (a crash, an OOM kill): the answer in flight ends with an
error, the requests still waiting are sent to a fresh engine (once each), which starts at
once (REPLACE_AT_ONCE_AFTER_S).

    runner = EngineProcess.start(settings=settings)   # config.Settings: what it loads, and how
    with runner.stream(messages, settings) as stream:   # the engine_contract.Runner contract
        for reply in stream:
            ...

Protocol: the dataclasses below, pickled over two one-way pipes.
    web server -> engine   Generate · Cancel · Exit
    engine -> web server   Ready | LoadFailed, then per request
                           [Reading], [Taken], Started | Refused, Text..., Ended
In the engine, the process's main thread is the generation loop (model_runner.GenerationLoop):
it loads the model, warms it up, and builds and generates every answer; one more thread
reads the commands pipe and hands requests in. The generating thread sends each due update
itself (the reply's changes: engine_contract.Reply.changes_since), at most
max_updates_per_second messages a second per answer.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from config import Settings
from conversation import last_user_text
from engine_contract import (
    ERRORS,
    Cancelled,
    GenerationError,
    GenerationSettings,
    DescribedByInfo,
    ModelLoadError,
    Reply,
    RunnerInfo,
    Signal,
    StreamBase,
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
    info: RunnerInfo


@dataclass
class LoadFailed:
    message: str


@dataclass
class Reading:
    """Its files are being read before it can start (the waiting line lets the next through)."""
    request_id: int


@dataclass
class Taken:
    """The loop took it: its inputs are being built (if the engine dies now, this request may
    be why: it isn't sent again)."""
    request_id: int


@dataclass
class Started:
    request_id: int
    notices: list[str]
    prompt_tokens: int
    max_new_tokens: int
    started_at: float


@dataclass
class Refused:
    request_id: int
    error: str        # the error's class name (engine_contract.ERRORS)
    message: str


@dataclass
class Text:
    request_id: int
    changes: dict      # Reply.changes_since the last Text
    new_tokens: int
    first_token_at: float | None
    logprobs: list = field(default_factory=list)  # the stream's logprobs entries since the last Text


@dataclass
class Ended:
    """The end of an answer: its last changes and its figures, as the engine's stream has
    them. The fields after `error` are what EngineStream takes over at the end."""
    request_id: int
    changes: dict
    error: str | None
    finish_reason: str
    new_tokens: int
    first_token_at: float | None
    last_token_at: float | None
    ended_at: float | None
    closed_at: float | None
    tokens_after_close: int | None
    token_times: list[float] | None
    generated_on: int | None
    reasoning_tokens: int
    logprobs: list = field(default_factory=list)  # the entries not sent yet

    FIGURES = ("new_tokens", "first_token_at", "last_token_at", "ended_at", "closed_at", "tokens_after_close",
               "token_times", "generated_on", "reasoning_tokens")

    @classmethod
    def of(cls, request_id: int, stream, sent: Reply, logprobs_sent: int = 0) -> "Ended":
        return cls(request_id, stream.reply.changes_since(sent), str(stream.error) if stream.error else None,
                   stream.finish_reason, **{name: getattr(stream, name) for name in cls.FIGURES},
                   logprobs=stream.logprobs[logprobs_sent:])


# ---------------------------------------------------------------- the web server's side

RESEND_TRIES = 1  # a request the engine died before beginning goes to a new engine this many times
STOPPED_ON_PURPOSE = (-signal.SIGTERM, -signal.SIGINT)  # (the app or systemd stopping it: no new engine)
# A crashed engine is replaced at once (not at the next request, which would wait for the model
# to load), unless it died this soon after loading without beginning a request: that one is
# replaced this long after (or by a request before then), so an engine that can't stay up is
# reloaded at most once a minute, and /healthz's 503 still ends without traffic.
REPLACE_AT_ONCE_AFTER_S = 60.0
# systemd stops a service by sending SIGTERM to its whole group, engine included, while the web
# server first ends the answers in flight (saving what was written) and then ends the engine: a
# SIGTERM ends a loaded engine this long after, unless the web server ends it first (a second, at
# once). Its web server ends it at exit (atexit: EngineProcess.close), before multiprocessing's
# own SIGTERM would make the exit wait this long.
ENGINE_SIGTERM_GRACE_S = 15.0


class EngineGone(Exception):
    """The engine process died before it began this request: its caller sends it again."""


class EngineProcess(DescribedByInfo):
    """A ModelRunner in a child process (the engine_contract.Runner contract)."""

    def __init__(self, settings: Settings, record_token_times: bool = False):
        self.settings = settings
        self._record_token_times = record_token_times
        self._streams: dict[int, EngineStream] = {}  # this launch's answers in flight
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._process = self._commands = None
        self.info = RunnerInfo(name=None, device="")
        self.active = 0    # generating (0 or 1, unless the engine batches)
        self.finish_listeners: list = []
        self.restarts = 0
        self.problem: str | None = None  # (engine_contract.Runner) set while a crashed engine is replaced
        self._launched_at = 0.0
        self._began_any = False  # this launch has begun a request
        self._last_exit = "exit code unknown"  # how the last engine that crashed ended
        self._closed = False  # close() was called: a request the dead engine had not begun isn't sent again

    @classmethod
    def start(cls, model: str | None = None, settings: Settings | None = None, *, record_token_times: bool = False,
              **overrides) -> "EngineProcess":
        """Start the engine and load the model there, as `settings` say (ModelRunner.load's
        arguments). The engine runs with exactly these settings: it reads no environment.
        Raises ModelLoadError (one line)."""
        settings = (settings or Settings()).replace(**overrides)
        if model:
            settings = settings.replace(model=model)
        engine = cls(settings, record_token_times)
        engine._launch()
        # (registered after multiprocessing's own exit function, so it runs before it: that one's
        # SIGTERM, a loaded engine waits out)
        atexit.register(engine.close)
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
                                  args=(command_reader, event_writer, self.settings, self._record_token_times))
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
        if self._closed:  # (close() came while it loaded: a replacement nobody will stop)
            process.kill()
            process.join(5)
            raise ModelLoadError("The app is closing.")
        self.info = ready.info
        self._process, self._commands, self._streams = process, command_writer, {}
        self._launched_at, self._began_any, self.problem = time.monotonic(), False, None
        threading.Thread(target=self._read_events, args=(event_reader, process, self._streams),
                         name="engine-events", daemon=True).start()

    def _send(self, message) -> None:
        with self._send_lock:
            self._commands.send(message)

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               cancelled: Signal | None = None, on_reading=None) -> "EngineStream":
        """Start generating; raises ChatInputError for a conversation the model can't take.
        Blocks until the engine starts it (after the answers before it), like
        ModelRunner.stream; `cancelled` set meanwhile withdraws the request in the engine
        before it starts (Cancelled), and set later stops it."""
        settings = settings or GenerationSettings(max_new_tokens=self.settings.max_new_tokens)
        for tries_left in reversed(range(RESEND_TRIES + 1)):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled()
            try:
                return self._start(messages, settings, cancelled, on_reading)
            except EngineGone as gone:  # it died before it began this one: again, on a new engine
                if not tries_left or self._closed:
                    raise GenerationError(f"The model process stopped ({gone}) before this answer began. Send "
                                          f"again to restart it.") from None
                log.warning("The engine process stopped before it began a request; sending it to a new one.")

    def _start(self, messages, settings, cancelled, on_reading) -> "EngineStream":
        with self._launch_lock:
            if not self.alive:  # it died (crash, OOM kill): a fresh one for this request
                log.warning("The engine process is gone; starting a new one.")
                self._relaunch()
            stream = EngineStream(self, next(self._ids), settings, last_user_text(messages), on_reading)
            streams = self._streams
            streams[stream.id] = stream
        try:
            self._send(Generate(stream.id, messages, settings))
        except (OSError, ValueError):  # it died just now
            if streams.pop(stream.id, None) is not None:  # (else its reader has told the stream)
                raise EngineGone("its pipe closed") from None
        if cancelled is not None:  # (after Generate: the engine gets its Cancel after it)
            cancelled.on_set(lambda: stream.close(wait=0))
        return stream._wait_started()

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
                self._began_any = True
                stream._on_started(event)
            elif isinstance(event, Reading):
                stream._on_reading()
            elif isinstance(event, Taken):
                stream._taken = True
            elif isinstance(event, Refused):
                streams.pop(event.request_id, None)
                stream._on_refused(ERRORS.get(event.error, GenerationError)(event.message))
            elif isinstance(event, Ended):
                streams.pop(event.request_id, None)
                self.active -= 1
                stream._on_ended(event)
        process.join(5)
        reason = _exit_description(process.exitcode)
        crashed = not self._closed and process.exitcode not in STOPPED_ON_PURPOSE
        if not self._closed:
            log.error("The engine process stopped (%s).", reason)
        if crashed:
            self._last_exit = reason
            at_once = self._began_any or time.monotonic() - self._launched_at >= REPLACE_AT_ONCE_AFTER_S
            if self._process is process:  # (else a request has replaced it already)
                self.problem = f"The model process stopped ({reason})." if at_once else (
                    f"The model process stopped ({reason}) soon after it loaded; a new one starts at the next "
                    f"request, or in {REPLACE_AT_ONCE_AFTER_S:.0f} s.")
            replace = threading.Timer(0 if at_once else REPLACE_AT_ONCE_AFTER_S, self._replace, args=(process,))
            replace.name, replace.daemon = "engine-replace", True
            replace.start()
        for request_id in list(streams):
            stream = streams.pop(request_id)
            if stream._started.is_set():
                self.active -= 1
                then = "Send again: a new one is starting." if crashed else "The app is stopping."
                stream._end("error", GenerationError(f"The model process stopped ({reason}); the answer is cut "
                                                     f"here. {then}"))
            elif crashed and not stream._taken:  # (its caller, EngineProcess.stream, sends it again)
                stream._on_refused(EngineGone(reason))
            elif crashed:  # (it may be why: another engine would go the same way)
                stream._on_refused(GenerationError(f"The model process stopped ({reason}) while it prepared this "
                                                   f"message; it was not sent again, as it may be the cause. Try it "
                                                   f"with fewer or smaller attachments."))
            else:
                stream._on_refused(GenerationError(f"The model process stopped ({reason}) before this answer "
                                                   f"began."))

    def _relaunch(self) -> None:
        """A new engine for a dead one (under the launch lock)."""
        self.problem = f"The model process stopped ({self._last_exit}); a new one is loading the model."
        try:
            self._launch()
        except ModelLoadError as error:
            self.problem = f"The model process stopped and could not restart: {error} The next request tries again."
            log.error("%s", self.problem)
            raise GenerationError(f"The model process stopped and could not restart: {error}") from None
        self.restarts += 1
        log.info("A new engine process is ready.")

    def _replace(self, dead) -> None:
        """After a crash: a new engine, so the next request finds the model loaded."""
        with self._launch_lock:
            if self._closed or self._process is not dead:  # (closing, or a request replaced it already)
                return
            log.warning("Starting a new engine process.")
            with contextlib.suppress(GenerationError):  # (logged; self.problem says it)
                self._relaunch()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process (answers in flight end as cancelled)."""
        self._closed = True
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
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = ", e.g. by the out-of-memory killer" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


class EngineStream(StreamBase):
    """An answer generating in the engine process (a StreamBase): iterate for the growing
    reply, close() to stop it (within one token). The engine coalesces the updates; every
    one that arrives is handed on."""

    def __init__(self, engine: EngineProcess, request_id: int, settings: GenerationSettings, request_text: str,
                 on_reading=None):
        super().__init__(max_new_tokens=settings.max_new_tokens, max_updates_per_second=float("inf"),
                         listeners=engine.finish_listeners, request_text=request_text, arrived_at=settings.arrived_at)
        self._engine = engine
        self._on_reading_callback = on_reading
        self.id = request_id
        self._started = threading.Event()
        self._taken = False  # the engine's loop took it (Taken)
        self._refusal: BaseException | None = None
        self._cancel_sent = False

    # -- called by the engine's reader thread
    def _on_started(self, started: Started) -> None:
        self.notices, self.prompt_tokens = started.notices, started.prompt_tokens
        self.max_new_tokens, self.started_at = started.max_new_tokens, started.started_at
        self._started.set()

    def _on_refused(self, error: BaseException) -> None:
        self._refusal = error
        self._started.set()

    def _on_reading(self) -> None:
        if self._on_reading_callback is not None:
            try:
                self._on_reading_callback()
            except Exception:  # (the reader thread goes on whatever a caller's callback does)
                log.exception("a reading callback failed")

    def _on_text(self, text: Text) -> None:
        self.logprobs.extend(text.logprobs)
        self.new_tokens, self.first_token_at = text.new_tokens, text.first_token_at
        self._update(self.reply.with_changes(text.changes))

    def _on_ended(self, ended: Ended) -> None:
        self.logprobs.extend(ended.logprobs)
        for name in Ended.FIGURES:
            setattr(self, name, getattr(ended, name))
        self.reply = self.reply.with_changes(ended.changes)
        self._end(ended.finish_reason, GenerationError(ended.error) if ended.error else None)

    # -- the caller's side
    def _wait_started(self) -> "EngineStream":
        self._started.wait()  # Started or Refused (a Cancel is answered with Refused: Cancelled)
        if self._refusal is not None:
            raise self._refusal
        return self

    def _request_stop(self) -> None:
        if self._cancel_sent:
            return
        self._cancel_sent = True
        try:
            self._engine._send(Cancel(self.id))
        except (OSError, ValueError, AttributeError):
            pass  # the engine is gone: the reader ends this stream


# ---------------------------------------------------------------- the engine process

class _EngineServer:
    """Runs in the engine process: this thread reads the commands and hands requests to the
    runner's generation loop (the process's main thread); the loop's thread sends each
    request's Started, Text and Ended. Every request is in one table until it has ended."""

    def __init__(self, runner, events):
        self.runner, self.events = runner, events
        self.jobs: dict = {}
        self.lock = threading.Lock()  # for the table and the events pipe

    def send(self, message) -> None:
        """To the web server; once it is gone, nothing (the loop ends as the commands end)."""
        with self.lock:
            try:
                self.events.send(message)
            except (OSError, ValueError):
                pass

    def read_commands(self, commands) -> None:
        try:
            while True:
                try:
                    command = commands.recv()
                except (EOFError, OSError):  # the web server is gone
                    break
                if isinstance(command, Exit):
                    break
                try:
                    self.take(command)
                except Exception:  # a bug of ours: that command's, never the reader's end
                    log.exception("the engine failed to take a command")
            with self.lock:
                jobs = list(self.jobs.values())
            for job in jobs:
                job.withdraw()
        finally:
            self.runner.loop.stop()  # the main thread ends its answer, then the process

    def take(self, command) -> None:
        if isinstance(command, Generate):
            self.accept(command)
        elif isinstance(command, Cancel):
            with self.lock:
                job = self.jobs.get(command.request_id)
            if job is not None:
                job.withdraw()

    def accept(self, command: Generate) -> None:
        """A request into the table and to the generation loop; its stream's updates and its
        end go back over the pipe from the generating thread."""
        from model_runner import Job
        request_id, sent, logprobs_sent = command.request_id, Reply(), 0
        job = Job(command.messages, command.settings, on_decided=functools.partial(self.decided, request_id),
                  on_reading=lambda: self.send(Reading(request_id)), on_taken=lambda: self.send(Taken(request_id)))

        def on_update(reply: Reply) -> None:
            nonlocal sent, logprobs_sent
            logprobs = job.stream.logprobs[logprobs_sent:]
            self.send(Text(request_id, reply.changes_since(sent), job.stream.new_tokens, job.stream.first_token_at,
                           logprobs))
            sent, logprobs_sent = reply, logprobs_sent + len(logprobs)

        def on_end(stream) -> None:
            with self.lock:
                self.jobs.pop(request_id, None)
            self.send(Ended.of(request_id, stream, sent, logprobs_sent))

        job.on_update, job.on_end = on_update, on_end
        with self.lock:
            self.jobs[request_id] = job
        self.runner.submit(job)

    def decided(self, request_id: int, job) -> None:
        """The loop started the request, or refused it (or it was withdrawn first)."""
        if job.refusal is not None:
            with self.lock:
                self.jobs.pop(request_id, None)
            self.send(Refused(request_id, type(job.refusal).__name__, str(job.refusal)))
            return
        stream = job.stream
        self.send(Started(request_id, stream.notices, stream.prompt_tokens, stream.max_new_tokens, stream.started_at))


def _end_soon_on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ending = threading.Timer(ENGINE_SIGTERM_GRACE_S, os.kill, (os.getpid(), signal.SIGTERM))
    ending.name, ending.daemon = "engine-sigterm", True
    ending.start()


def _engine_main(commands, events, settings: Settings, record_token_times: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the web server's; we end with it (EOF)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import tqdm  # its default lock is a multiprocessing semaphore, reported as leaked at exit
        tqdm.tqdm.set_lock(threading.RLock())
        from model_runner import ModelRunner
        # This (main) thread is the generation loop: the warm-up runs here, then every answer.
        runner = ModelRunner.load(settings=settings, record_token_times=record_token_times, loop_thread=False)
    except ModelLoadError as error:
        events.send(LoadFailed(str(error)))
        return
    except BaseException as error:
        events.send(LoadFailed(f"Can't load the model: {type(error).__name__}: {error}"))
        return
    server = _EngineServer(runner, events)
    signal.signal(signal.SIGTERM, _end_soon_on_sigterm)  # (while loading, nothing is lost: at once)
    server.send(Ready(runner.info))
    threading.Thread(target=server.read_commands, args=(commands,), name="engine-commands", daemon=True).start()
    runner.loop.run()
    if runner.batcher is not None:
        runner.batcher.close()
    events.close()
    # No interpreter teardown: native threads (torch, tokenizers) abort noisily in it.
    os._exit(0)
