"""Documents, audio and video are read in processes of their own, never beside the model.

Why: pypdf and python-docx are pure Python and hold the GIL while they parse; a thread
reading a PDF beside `generate` took an answer from 48 to 0.4 tokens/s (CPython hands the
GIL back only every few milliseconds). In a reader process the parse costs the engine
nothing but the result's copy. It also bounds what a file can do: a reader stuck past
READ_TIMEOUT_SECONDS is killed, and one that crashes or is killed for memory takes only
itself down; the next read starts a fresh one.

    value = reader_process.run(documents.read_document, data, "report.pdf")

`function` and its arguments are pickled (a module-level function, bytes or a path); the
function's own exceptions come back as they were raised (without their traceback). Up to
READER_PROCESSES reads run at once; more wait for a reader. A reader is a plain
`python` child (not multiprocessing: the engine process is daemonic, and daemonic
processes may not start children); it ends when this process's end of its pipe closes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time

READER_PROCESSES = 2           # reads at once (each reader holds ~100 MB once it has read a PDF and a video)
READ_TIMEOUT_SECONDS = 90      # a read still going then is killed (the readers stop themselves at 20-30 s)


CRASHES = tuple(getattr(signal, name) for name in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGFPE", "SIGILL")
                if hasattr(signal, name))


class ReaderStopped(Exception):
    """The read ended without an answer: `timed_out` (killed past the limit), `crashed` (the
    reader's own fault: a crash signal, so the file will crash it again), or else the reader
    was stopped from outside (SIGKILL: most likely the kernel's OOM killer) or failed."""

    def __init__(self, cause: str, *, timed_out: bool = False, crashed: bool = False):
        super().__init__(f"the reader stopped ({cause})")
        self.cause, self.timed_out, self.crashed = cause, timed_out, crashed


def run(function, *arguments):
    """`function(*arguments)` in a reader process: its result, or its exception raised here;
    ReaderStopped when the reader was killed or died."""
    reader = _take()
    try:
        return reader.run(function, arguments, READ_TIMEOUT_SECONDS)
    finally:
        _give_back(reader)


def _places() -> queue.LifoQueue:
    idle: queue.LifoQueue = queue.LifoQueue()  # (the reader used last is warm)
    for _ in range(READER_PROCESSES):
        idle.put(None)  # a place for a reader, started when first needed
    return idle


_idle = _places()


def _forked() -> None:  # (ZeroGPU's worker is forked: the readers are the parent's)
    global _idle
    _idle = _places()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _take() -> "_Reader":
    reader = _idle.get()
    if reader is None or not reader.alive:
        try:
            reader = _Reader()
        except BaseException:
            _idle.put(None)
            raise
    return reader


def _give_back(reader: "_Reader") -> None:
    _idle.put(reader if reader.alive else None)


class _Reader:
    """One reader process, one read at a time."""

    def __init__(self):
        code = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); import reader_process; reader_process._serve()"
        self.process = subprocess.Popen([sys.executable, "-c", code, json.dumps(sys.path), str(os.getpid())],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, function, arguments: tuple, timeout: float):
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            self.process.kill()
        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            pickle.dump((function, arguments, timeout), self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.process.stdin.flush()
            ok, value = pickle.load(self.process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as failure:  # it died (or was killed) before it
            if not timed_out.is_set() and isinstance(failure, pickle.UnpicklingError):  # answered, or while it did
                try:
                    self.process.wait(1)
                except subprocess.TimeoutExpired:  # alive: the answer itself was bad
                    self._end()
                    raise
            code = self._end()
            if timed_out.is_set():
                raise ReaderStopped(f"killed after {timeout:g} s", timed_out=True) from None
            if code < 0:
                raise ReaderStopped(_signal_name(-code), crashed=-code in CRASHES) from None
            raise ReaderStopped(f"exit code {code}") from None
        except BaseException:  # anything else (an answer that can't be unpickled, no memory for it,
            self._end()        # an argument that can't be pickled): the pipe is in an unknown state
            raise
        finally:
            timer.cancel()
        if ok:
            return value
        raise value

    def _end(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _serve() -> None:
    """The reader's side: read a call from stdin, answer on stdout, until stdin ends."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the answers
    calls = sys.stdin.buffer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the app's; this ends with its pipe
    try:  # when memory runs out, the kernel kills a reader rather than the engine holding the model
        with open("/proc/self/oom_score_adj", "w") as adjust:
            adjust.write("1000")
    except OSError:
        pass
    deadline = [None]  # the call's, in monotonic seconds
    threading.Thread(target=_watch, args=(int(sys.argv[2]), deadline), name="watch", daemon=True).start()
    while True:
        try:
            function, arguments, timeout = pickle.load(calls)
        except (EOFError, OSError):
            return
        deadline[0] = time.monotonic() + timeout + 5
        if hasattr(signal, "alarm"):  # (the kernel's: it ends a read stuck in native code holding the GIL)
            signal.alarm(math.ceil(timeout) + 10)
        try:
            answer = (True, function(*arguments))
        except Exception as error:
            error.__traceback__ = None
            answer = (False, error)
        deadline[0] = None
        if hasattr(signal, "alarm"):
            signal.alarm(0)
        try:
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # (an exception that doesn't pickle: its words do)
            data = pickle.dumps((False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}"
                                                     if not answer[0] else f"the result can't be sent: {error}")))
        try:
            answers.write(data)
            answers.flush()
        except OSError:  # the app is gone
            return


def _watch(parent: int, deadline: list) -> None:
    """Ends the reader if the process that started it is gone (os._exit, a kill: nobody would
    stop a read caught in a loop) or its call runs past the deadline. (A read stuck in native
    code that holds the GIL stops this thread too: there SIGALRM ends it, on POSIX.)"""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent or deadline[0] is not None and time.monotonic() > deadline[0]:
            os._exit(3)
