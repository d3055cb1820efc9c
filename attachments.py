"""Files sent with a message, beside its text: what each one is (judged from its content,
never its name alone) and what a model gets of it. No torch, no Gradio.

    part = attachment_part("/tmp/upload/report.pdf", "report.pdf")
    # {"type": "document", "document": "/tmp/upload/report.pdf", "name": "report.pdf"}
    document_of(part)            # documents.Document: its text, marked with the name and pages
    audio_of(part, 16000)        # media.Audio: mono samples at the model's rate
    video_of(part, 8)            # media.Video: 8 frames spread evenly, with their time stamps

A part is `{"type": kind, kind: source, "name": ...}`: kind is "image", "document", "audio" or
"video"; the source a path (the chat's uploads, the saved chats) or bytes (/v1's base64). An
audio part may carry "transcript" (what --asr-model heard: the user's words for a model that
can't listen), a document part "read" (its Document, read already: the engine's process
doesn't read it again). What a part becomes in the prompt is decided in conversation.prepare_messages.
Documents, audio and video are read in reader processes (reader_process.py: never beside
the model), and what was read is remembered (a chat sends its history every turn).
Every refusal is an ImageRefused (a ChatInputError) with one line for the user.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

import documents
import media
import reader_process
from engine_contract import FileRefused, ImageRefused

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
DOCUMENT_SUFFIXES = (".pdf", ".docx", *(f".{kind}" for kind in documents.TEXT_KINDS))
UPLOAD_TYPES = list(dict.fromkeys([*IMAGE_SUFFIXES, *DOCUMENT_SUFFIXES, *media.AUDIO_SUFFIXES, *media.VIDEO_SUFFIXES]))
# What is decoded as a picture, whatever a file's name or a data: URL says: Pillow can open
# dozens of formats, some through outside programs (EPS through Ghostscript); users send these.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
KINDS = ("image", "document", "audio", "video")
WHAT_IS_READ = ("images (PNG, JPEG, WebP, GIF, BMP), documents (PDF, DOCX, text and code files), audio "
                "(WAV, MP3, OGG/Opus, M4A, FLAC, WebM) and video (MP4, WebM, MOV, MKV)")
REMEMBERED = 64                  # documents, audio and videos kept read (a chat sends its history each turn)...
REMEMBERED_BYTES = 1024 * 2**20  # ... up to about this much memory in all


def attachment_part(source: str | os.PathLike | bytes, name: str | None = None) -> dict:
    """A file → its part, by what its content is. ImageRefused for a file this app doesn't
    read, and for one whose content is not what its name says (a text file named .mp3)."""
    if not name:
        name = "The file" if isinstance(source, bytes) else os.path.basename(str(source))
    kind = kind_of(source, name)
    if not isinstance(source, bytes):
        source = str(source)
    return {"type": kind, kind: source, "name": name}


def kind_of(source: str | os.PathLike | bytes, name: str) -> str:
    """"image", "document", "audio" or "video", from the content (ImageRefused otherwise)."""
    try:
        head = source[:65536] if isinstance(source, bytes) else _head(source)
    except OSError:
        raise ImageRefused(f"{name} could not be found (was the upload removed?).") from None
    if not head:
        raise ImageRefused(f"{name} is empty.")
    if _is_image(source):
        kind = "image"
    elif head.startswith((b"%PDF-", b"PK\x03\x04")) or documents.looks_like_text(head):
        kind = "document"  # (a zip that isn't a DOCX is refused when it is read, with the reason)
    else:
        kind = media.media_kind(source)
    expected = expected_kind(name)
    if kind is None:  # damaged, or of no kind: the reader its name calls for explains, if any
        if not expected:
            raise ImageRefused(f"{name} is not a file this app reads: it takes {WHAT_IS_READ}.")
        kind = expected[0]
    if expected and kind not in expected:
        raise ImageRefused(f"{name} is not what its name says: its content is {_said(kind)}, not "
                           f"{' or '.join(map(_said, expected))}.")
    return kind


def expected_kind(name: str) -> tuple[str, ...]:
    """What a file's name says it is (empty when it says nothing this app knows)."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return ("image",)
    if suffix in DOCUMENT_SUFFIXES:
        return ("document",)
    if suffix == ".webm":  # (the same container holds either)
        return ("audio", "video")
    if suffix in media.AUDIO_SUFFIXES:
        return ("audio",)
    if suffix in media.VIDEO_SUFFIXES:
        return ("video",)
    return ()


def needs_transcript(message: dict, info) -> list[dict]:
    """The audio parts of a message that must be written out before a model that can't
    listen gets it (`info`: the runner's RunnerInfo)."""
    if getattr(info, "hears_audio", False):
        return []
    return [part for part in message["content"] if part.get("type") == "audio" and part.get("transcript") is None]


def document_of(part: dict, again: bool = True) -> documents.Document:
    """The part's document, as read (once: see _remembered for `again`), or as the part
    carries it read ("read": /v1 reads it where the request comes in, to name a bad part)."""
    if part.get("read") is not None:
        return part["read"]
    source = part["document"]
    return _remembered(("document", identity(source), part["name"]), lambda: _read(documents.read_document, _bytes(source, part),
                                                                         part["name"]), again)


def audio_of(part: dict, sampling_rate: int, again: bool = True) -> media.Audio:
    return _remembered(("audio", identity(part["audio"]), part["name"], sampling_rate),
                       lambda: _read(media.read_audio, part["audio"], part["name"], sampling_rate), again)


def video_of(part: dict, frames: int, again: bool = True) -> media.Video:
    return _remembered(("video", identity(part["video"]), part["name"], frames),
                       lambda: _read(media.read_video, part["video"], part["name"], frames), again)


def _read(read, source, name: str, *arguments):
    """`read(source, name, ...)` in a reader process (reader_process.py: never beside the model)."""
    try:
        return reader_process.run(read, source, name, *arguments)
    except (documents.DocumentError, media.MediaError) as error:
        raise _refused(str(error), lasting=error.lasting) from None  # (False: a time, memory or system limit)
    except reader_process.ReaderStopped as stopped:
        if stopped.timed_out:
            raise _refused(f"{name} took too long to read (over {reader_process.READ_TIMEOUT_SECONDS} s).",
                           lasting=False) from None
        if stopped.crashed:
            raise _refused(f"{name} can't be read: reading it stopped the reader ({stopped.cause}). Is the file "
                           f"damaged?", lasting=True) from None
        raise _refused(f"{name} can't be read now: its reader was stopped ({stopped.cause}; out of memory?).",
                       lasting=False) from None


def _refused(message: str, *, lasting: bool) -> FileRefused:
    refused = FileRefused(message)
    refused.lasting = lasting
    return refused


def _bytes(source, part: dict) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        if os.path.getsize(source) > documents.MAX_DOCUMENT_BYTES:
            raise ImageRefused(f"{part['name']} is {os.path.getsize(source) / 2**20:.0f} MB; the most this app reads "
                               f"of a document is {documents.MAX_DOCUMENT_BYTES // 2**20} MB.")
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageRefused(f"{part['name']} could not be found (was the upload removed?).") from None


_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()
_reading: dict = {}  # key -> threading.Event, set when the read in progress has ended
# Called (by this thread's reads) when a file is not remembered and must be read, or is being read:
reading_notice: contextvars.ContextVar = contextvars.ContextVar("reading_notice", default=None)


def _forked() -> None:  # (ZeroGPU's worker is forked: a read in progress at the fork never ends there)
    global _cache_lock, _reading
    _cache_lock, _reading = threading.Lock(), {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class _Refusal(str):
    """A file that can't be read, remembered by what to say; `lasting` False when a time or
    memory limit refused it (sent again, it is read again)."""
    lasting = True


def _remembered(key: tuple, read, again: bool = True):
    """What `read` gives for `key` (the content and the name: what is read names the file), read once while it stays among the last REMEMBERED (a chat
    sends its history every turn; a read in progress is waited for, not done twice). A file
    that can't be read is remembered too (ImageRefused again, at once), but one refused by a
    time or memory limit is read `again` when the user sends it again (the new message);
    in the history it stays refused (a turn doesn't wait for it each time). A read (or a
    wait for one) is told to this thread's `reading_notice` first."""
    while True:
        with _cache_lock:
            value = _cache[key][0] if key in _cache else None
            if value is not None and not (again and isinstance(value, _Refusal) and not value.lasting):
                _cache.move_to_end(key)
                if isinstance(value, _Refusal):
                    raise _refused(value, lasting=value.lasting)
                return value
            if key not in _reading:
                _reading[key] = done = threading.Event()
                break
            reading = _reading[key]
        _notice()
        reading.wait()
        again = False  # (that read was the try)
    _notice()
    try:
        try:
            value = read()
        except ImageRefused as error:
            value = _Refusal(str(error))
            value.lasting = getattr(error, "lasting", True)
        with _cache_lock:
            _cache[key] = (value, len(value) if isinstance(value, _Refusal) else _size(value))
            while len(_cache) > REMEMBERED or sum(size for _, size in _cache.values()) > REMEMBERED_BYTES:
                _cache.popitem(last=False)
    finally:
        with _cache_lock:
            del _reading[key]
        done.set()
    if isinstance(value, _Refusal):
        raise _refused(value, lasting=value.lasting)
    return value


def _notice() -> None:
    notice = reading_notice.get()
    if notice is not None:
        notice()


def _size(value) -> int:
    """About how much memory a document, audio or video read takes."""
    if isinstance(value, documents.Document):
        return 4 * len(value.text) + sum(3 * image.width * image.height for _, image in value.page_images)
    if isinstance(value, media.Audio):
        return value.samples.nbytes
    return sum(3 * frame.width * frame.height for _, frame in value.frames)


def identity(source) -> tuple:
    """A key for a file's content: a digest of bytes; a path with its size and time (the
    chat's files are never rewritten in place: uploads are new files, saved ones named by
    their content)."""
    if isinstance(source, bytes):
        return ("bytes", hashlib.sha256(source).hexdigest())
    try:
        status = os.stat(source)
    except OSError:
        return ("missing", str(source))
    return ("path", str(source), status.st_size, status.st_mtime_ns)


def _head(path) -> bytes:
    with open(path, "rb") as file:
        return file.read(65536)


def _is_image(source) -> bool:
    import io
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS):
            return True
    except Exception:  # (not an image, or damaged: either way not read as one)
        return False


def _said(kind: str) -> str:
    return {"image": "an image", "document": "a document", "audio": "audio", "video": "a video"}[kind]
