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


def test_the_same_file_asked_for_twice_at_once_is_read_once(tmp_path, monkeypatch):
    """A Stop on a long PDF, then the same PDF sent again (or two turns racing): the second
    waits for the read in progress instead of taking a second reader for it."""
    import threading
    import uuid

    import attachments
    from tests.conftest import wait_for
    name = f"held-{uuid.uuid4().hex}.pdf"
    (tmp_path / name).write_bytes(pdf_with_text("Quarterly revenue rose"))
    part = attachments.attachment_part(tmp_path / name, name)
    hold = misbehaving_readers.hold_file(name)
    hold.touch()
    calls, run = [], reader_process.run

    def counted(*arguments):
        calls.append(arguments[2])
        return run(*arguments)
    monkeypatch.setattr(reader_process, "run", counted)
    monkeypatch.setattr(documents, "read_document", misbehaving_readers.held)
    texts = []
    try:
        readers = [threading.Thread(target=lambda: texts.append(attachments.document_of(part).text), daemon=True)
                   for _ in range(2)]
        for reader in readers:
            reader.start()
        wait_for(hold.with_suffix(".reading").exists, what="the read to begin")
        time.sleep(0.2)
    finally:
        hold.unlink(missing_ok=True)
    for reader in readers:
        reader.join(30)
    for marker in (".reading", ".released"):
        hold.with_suffix(marker).unlink(missing_ok=True)
    assert calls == [name] and len(texts) == 2 and texts[0] == texts[1] and "Quarterly" in texts[0]
