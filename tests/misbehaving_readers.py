"""Document readers that misbehave, for the reader process's tests: they run in a reader
process (reader_process.py), which imports this module by name, so it imports nothing heavy.
A test puts one in place of documents.read_document."""

import os
import signal
import tempfile
import time
from pathlib import Path

import documents


def hold_file(name: str) -> Path:
    """While this file exists, `held` waits (the test removes it to let the read finish)."""
    return Path(tempfile.gettempdir()) / f"{name}.hold"


def held(data: bytes, name: str) -> documents.Document:
    """Says it has begun (`<hold>.reading`), waits until its hold file is gone (30 s at most),
    says so (`<hold>.released`), then reads."""
    hold = hold_file(name)
    hold.with_suffix(".reading").touch()
    deadline = time.monotonic() + 30
    while hold.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    hold.with_suffix(".released").touch()
    return documents.read_document(data, name)


def stuck(data: bytes, name: str) -> documents.Document:
    time.sleep(600)  # (a parser caught in a loop)
    raise AssertionError("never")


def crash(data: bytes, name: str) -> documents.Document:
    os.abort()  # (a parser's native code crashing)


def killed(data: bytes, name: str) -> documents.Document:
    os.kill(os.getpid(), signal.SIGKILL)  # (what the kernel's OOM killer does)


class Odd(Exception):
    """An exception that pickles but can't be unpickled (its __init__ wants two arguments)."""

    def __init__(self, first, second):
        super().__init__(f"{first} {second}")


def odd(data: bytes, name: str) -> documents.Document:
    raise Odd(1, 2)


def stuck_saying_where(data: bytes, name: str) -> documents.Document:
    """Writes its process id to the file `name`, then is stuck."""
    Path(name).write_text(str(os.getpid()))
    return stuck(data, name)
