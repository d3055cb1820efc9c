"""reader_process.py: the readers' own failures. (What the chat says of a reader that hangs,
crashes or is killed, and a question answered while a document is read: test_attachments.)"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import documents
import reader_process
from tests import misbehaving_readers
from tests.test_documents import pdf_with_text

ROOT = Path(__file__).resolve().parent.parent


def test_a_readers_own_error_comes_back_as_raised_with_what_it_says():
    with pytest.raises(documents.DocumentError, match="x.txt is empty") as raised:
        reader_process.run(documents.read_document, b"", "x.txt")
    assert raised.value.lasting is True
    assert "Quarterly" in reader_process.run(documents.read_document, pdf_with_text("Quarterly"), "a.pdf").text


def test_a_reader_whose_answer_cannot_be_taken_is_replaced_not_reused():
    """An answer that doesn't unpickle leaves the reader's pipe in an unknown state: the next
    read gets a fresh reader (before, every later read on it failed)."""
    with pytest.raises(TypeError):
        reader_process.run(misbehaving_readers.odd, b"", "odd.pdf")
    for _ in range(reader_process.READER_PROCESSES + 1):
        assert reader_process.run(documents.read_document, b"fine", "a.txt").text.endswith("fine")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_reader_ends_with_the_process_that_started_it(tmp_path):
    """The engine process ends with os._exit (or a kill): its reader, stuck in a read
    nobody will stop now, ends within seconds instead of running on."""
    where = tmp_path / "reader.pid"
    script = textwrap.dedent(f"""
        import os, sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        import reader_process
        from tests import misbehaving_readers
        threading.Thread(target=reader_process.run, args=(misbehaving_readers.stuck_saying_where, b"",
                         {str(where)!r}), daemon=True).start()
        while not os.path.exists({str(where)!r}):
            time.sleep(0.02)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], timeout=60, check=True)
    pid = int(where.read_text())

    def running() -> bool:
        try:
            return "\\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
        except (FileNotFoundError, IndexError):
            return False
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(), "the reader ran on after the process that started it had ended"
