"""Conversations kept on the server (issue 21): one SQLite database (WAL) and an images folder
in a data directory, per user. No Gradio, no torch.

    store = ConversationStore(Path("~/.local/share/local-model-chat").expanduser())
    chat_id = store.create("ann")                              # an unguessable id
    store.append("ann", chat_id, [user_message, assistant_message])   # one finished turn, committed
    store.messages("ann", chat_id)     # the app's neutral messages, images as files in the store
    store.conversations("ann", search="cat")   # newest first, titled by the first message
    store.rename(...) · store.delete(...) · store.export_json(...) · store.export_markdown(...)
    store.import_json("ann", load_export(file_bytes))   # refused with a StoreError line, naming what is wrong

A conversation is stored as the app's neutral messages (conversation.py): text parts, images
(files named by a keyed hash of their content, HMAC-SHA-256 with a key kept beside the
database: a picture sent twice is stored once, and nobody can tell from a picture they hold
whether the server has it), an
assistant's reasoning and tool calls, a tool's result and duration, an answer's figures.
Every call names the user; a conversation of another user is NotFound, exactly like one that
does not exist. A database this version can't read (not a database, damaged: every page is
checked at open, or written by a newer one) is one StoreError line and is left as it is,
never wiped.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import io
import json
import math
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from PIL import Image

import media
from conversation import well_formed
from engine_contract import ToolCall

APP_FOLDER = "local-model-chat"  # the per-user data folder's name, and on a Space under /data
SPACE_STORAGE = Path("/data")    # a Space's persistent storage, when one is attached
SCHEMA_VERSION = 1
EXPORT_FORMAT = "local-model-chat/conversation"
MAX_CONVERSATIONS_PER_USER = 1000
MAX_BYTES_PER_USER = 1 << 30       # messages and images, each image counted once per user
MIN_FREE_DISK_BYTES = 512 << 20    # below this free on the data directory's disk, nothing more is saved
OPEN_WAIT_SECONDS = 10.0          # how long opening the database waits for another process that holds it
BUSY_TIMEOUT_MS = 5000             # then, how long a read or write waits for another one to finish
IMAGE_KEY_FILE = "images.key"      # the key image files are named with (HMAC), beside the database
MAX_IMPORTED_IMAGE_PIXELS = 64_000_000
MAX_IMPORT_MESSAGES = 5_000        # an import with more is refused: a browser tab crashed opening 200,000
TITLE_CHARS = 80
MAX_NAME_CHARS = 200
FILE_KINDS = ("document", "audio", "video")  # attachments kept as they came (attachments.py)
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
# What a message keeps beside its role and content: for the model (a tool call's id and name),
# and for the reader (the reasoning and how long it took, a tool's duration, the answer's
# figures, notes and an error shown with it).
EXTRA_KEYS = ("reasoning", "reasoning_seconds", "tool_call_id", "name", "duration", "figures", "notes", "error")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user, updated DESC);
CREATE TABLE IF NOT EXISTS messages (
    conversation TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (conversation, position)
);
CREATE TABLE IF NOT EXISTS images (
    conversation TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    suffix TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (conversation, digest)
);
CREATE INDEX IF NOT EXISTS images_by_hash ON images (digest);
"""


class StoreError(Exception):
    """The store can't do this; the message is one line for the user or the log."""


class NotFound(StoreError):
    """No such conversation for this user (whether it doesn't exist or is someone else's)."""


CHANGED_MEANWHILE = "This chat was changed meanwhile (in another tab?): open it again to see it as it is."


class LimitReached(StoreError):
    """The user's conversations or bytes are at the server's limit."""


@dataclass(frozen=True)
class Summary:
    id: str
    title: str
    created: float
    updated: float


class ConversationStore:
    def __init__(self, directory: Path, *, max_conversations: int = MAX_CONVERSATIONS_PER_USER,
                 max_bytes: int = MAX_BYTES_PER_USER):
        self.directory = Path(directory)
        self.images = self.directory / "images"
        self.path = self.directory / "chats.sqlite3"
        self.max_conversations, self.max_bytes = max_conversations, max_bytes
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(self._cant_use(error)) from None
        self._lock = threading.Lock()  # one connection, shared by the server's threads
        self._db = self._open()
        try:
            self._image_key = self.secret(IMAGE_KEY_FILE)
        except StoreError:
            self._db.close()
            raise

    def secret(self, name: str) -> bytes:
        """A secret kept in the data directory (kept_secret), or a StoreError line saying what to do."""
        try:
            return kept_secret(self.directory / name)
        except OSError as error:
            raise StoreError(self._cant_use(error, self.directory / name)) from None

    def _cant_use(self, error: OSError, path: Path | None = None) -> str:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return self._read_only(error.strerror or str(error))
        return f"Can't use {path or self.directory} for saved chats: {error.strerror or error}."

    def _read_only(self, why) -> str:
        return (f"The saved chats in {self.directory} can't be written ({why}): the folder or its files "
                f"(chats.sqlite3 and the -wal and -shm files beside it) are read-only for this user, or on a read-only "
                f"disk; nothing there was changed. Give the app's user write access to them, or point --data-dir at "
                f"a folder it can write.")

    def _open(self) -> sqlite3.Connection:
        """The database, checked (_check) and made if new; a StoreError line that says what is
        wrong otherwise: not a chat database, damaged, newer, read-only, locked. Another process
        opening it at the same time (another instance starting) is waited for."""
        deadline = time.monotonic() + OPEN_WAIT_SECONDS
        while True:
            try:
                return self._try_open(min(1.0, OPEN_WAIT_SECONDS))
            except sqlite3.DatabaseError as error:
                if _primary_code(error) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) and time.monotonic() < deadline:
                    time.sleep(0.05)  # (some of SQLite's "locked" come at once, without its busy wait)
                    continue
                raise StoreError(self._cant_open(error)) from None
            except OSError as error:
                raise StoreError(f"Can't read {self.path}: {error.strerror or error}.") from None

    def _try_open(self, timeout: float) -> sqlite3.Connection:
        if self.path.exists():
            self._check(timeout)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=timeout)
        try:
            db.create_function("casefold", 1, lambda text: text.casefold() if isinstance(text, str) else text,
                               deterministic=True)  # (SQLite's lower() folds ASCII only)
            version = db.execute("PRAGMA user_version").fetchone()[0]  # (read before anything is written)
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if version == 0 and not tables:  # (another process may be making it too: IF NOT EXISTS)
                db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
            db.execute("DELETE FROM conversations WHERE 0")  # (writes nothing; a file it can't write says so now)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # (WAL: a crash of the app loses nothing committed)
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except BaseException:
            db.close()
            raise
        return db

    def _cant_open(self, error: sqlite3.DatabaseError) -> str:
        """Why SQLite would not open the database, as one line that says what to do."""
        code = _primary_code(error)
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
            return self._read_only(error)
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return (f"{self.path} is locked by another process (another instance of this app on this data "
                    f"directory, or a program holding it in a transaction); nothing there was changed. Stop that "
                    f"one, or point --data-dir elsewhere.")
        if code == sqlite3.SQLITE_CORRUPT:
            return self._damaged(str(error))
        if code == sqlite3.SQLITE_NOTADB or code is None:
            return (f"{self.path} is not a chat database this app can read; it was left as it is. Move it away (or "
                    f"point --data-dir elsewhere) to start with no saved chats ({error}).")
        return f"Can't open {self.path}: {error}; it was left as it is."

    def _damaged(self, why: str) -> str:
        return (f"{self.path} is damaged (SQLite's check says: {' '.join(why.split())[:200]}); it was left as it "
                f"is. Restore it from a backup, or move it away (or point --data-dir elsewhere) to start with no "
                f"saved chats.")

    def _check(self, timeout: float) -> None:
        """StoreError, the file left as it is, unless the database is this app's, of a version
        it reads, and whole (SQLite's quick_check: every page read once). Read-only: a read-only
        connection never writes the file, not even a checkpoint when it closes."""
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
        try:
            db.execute("BEGIN")  # (one snapshot: not a version read before another process made the tables)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer version of this app (schema {version}; this "
                                 f"one reads {SCHEMA_VERSION}); it was left as it is. Upgrade the app, or point "
                                 f"--data-dir elsewhere.")
            if version == 0 and tables:
                raise StoreError(f"{self.path} is not a chat database this app can read; it was left as it is. "
                                 f"Move it away (or point --data-dir elsewhere) to start with no saved chats (it "
                                 f"holds other tables: {', '.join(sorted(tables))}).")
            _read_ahead(self.path)
            try:
                found = [row[0] for row in db.execute("PRAGMA quick_check")]
            except sqlite3.DatabaseError as error:
                if _primary_code(error) not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                    raise  # (locked, unreadable: not damage)
                found = [str(error)]
            if found != ["ok"]:
                raise StoreError(self._damaged(found[0]))
        finally:
            db.close()

    @contextlib.contextmanager
    def _locked(self):
        """The connection, for this thread alone; the database's and the disk's failures (full,
        locked, damaged) as one StoreError line."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as error:
                if _primary_code(error) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                    raise StoreError(f"The saved chats can't be read: their database is damaged ({error}). The "
                                     f"server's admin can restore it from a backup.") from None
                raise StoreError(f"The saved chats could not be read or written: {error}.") from None
            except (sqlite3.Error, OSError) as error:
                raise StoreError(f"The saved chats could not be read or written: {error}.") from None

    def close(self) -> None:
        with self._locked():
            self._db.close()

    # ------------------------------------------------------------ conversations

    def create(self, user: str, title: str = "") -> str:
        with self._locked():
            count = self._db.execute("SELECT COUNT(*) FROM conversations WHERE user=?", (user,)).fetchone()[0]
            if count >= self.max_conversations:
                raise LimitReached(f"You have {count} saved conversations, the most this server keeps for one "
                                   f"user: delete some to save new ones.")
            conversation_id = secrets.token_urlsafe(18)
            now = time.time()
            self._db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                             (conversation_id, user, well_formed(title).strip()[:TITLE_CHARS], now, now))
        return conversation_id

    def conversations(self, user: str, search: str = "") -> list[Summary]:
        """The user's conversations, newest first; `search` matches titles and message text
        (case-insensitive)."""
        query = "SELECT id, title, created, updated FROM conversations WHERE user=?"
        values: list = [user]
        search = well_formed(search)
        if search.strip():
            pattern = "%" + search.strip().casefold().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            query += (" AND (casefold(title) LIKE ? ESCAPE '\\' OR id IN (SELECT conversation FROM messages WHERE "
                      "casefold(json_extract(body, '$.text')) LIKE ? ESCAPE '\\'))")
            values += [pattern, pattern]
        with self._locked():
            rows = self._db.execute(query + " ORDER BY updated DESC", values).fetchall()
        return [Summary(*row) for row in rows]

    def _owned(self, user: str, conversation_id: str) -> None:
        """(Under the lock) NotFound unless it is this user's."""
        row = self._db.execute("SELECT user FROM conversations WHERE id=?", (conversation_id,)).fetchone()
        if row is None or not secrets.compare_digest(row[0].encode(), user.encode()):
            raise NotFound("This conversation does not exist (or is not yours).")

    def rename(self, user: str, conversation_id: str, title: str) -> None:
        with self._locked():
            self._owned(user, conversation_id)
            self._db.execute("UPDATE conversations SET title=? WHERE id=?",
                             (well_formed(title).strip()[:TITLE_CHARS], conversation_id))

    def delete(self, user: str, conversation_id: str) -> None:
        """The conversation and its images (those no other conversation uses)."""
        with self._locked():
            self._owned(user, conversation_id)
            hashes = [row[0] for row in self._db.execute(
                "SELECT digest || suffix FROM images WHERE conversation=?", (conversation_id,))]
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM conversations WHERE id=?", (conversation_id,))
            self._delete_image_files(set(hashes))

    # ------------------------------------------------------------ messages

    def append(self, user: str, conversation_id: str, messages: list[dict], *, keep: int | None = None,
               expected_length: int | None = None, answer: bool = False) -> None:
        """Messages at the end of the conversation, in one transaction (a finished turn is
        there, whole, once this returns). With `keep`, only the first `keep` messages stay
        before them (a retry, an edit, an undo): the images no message uses any more go too.
        With `expected_length`, a StoreError unless the conversation still has that many
        messages (it was changed since, e.g. in another tab). The first user message's text
        titles a conversation that has no title yet. An `answer` (to a message kept already)
        is kept past the user's byte limit: the limit refuses the next message instead, before
        any compute is spent on it."""
        stored = [self._to_stored(message) for message in messages]
        bodies = [json.dumps(body, ensure_ascii=False) for body, _ in stored]
        images = {image["digest"]: image for _, found in stored for image in found}
        with self._locked():
            self._owned(user, conversation_id)
            if expected_length is not None and expected_length != self._db.execute(
                    "SELECT COUNT(*) FROM messages WHERE conversation=?", (conversation_id,)).fetchone()[0]:
                raise StoreError(CHANGED_MEANWHILE)
            if bodies and shutil.disk_usage(self.directory).free < MIN_FREE_DISK_BYTES:
                raise LimitReached("The server's disk is nearly full: chats can't be saved until space is freed.")
            new_bytes = self._new_bytes(user, stored)
            used = self._usage(user)
            if new_bytes and used + new_bytes > self.max_bytes and not answer:
                raise self._full(used, new_bytes)
            for image in images.values():
                self._write_image(image)
            dropped: set[str] = set()
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                if keep is not None:
                    self._db.execute("DELETE FROM messages WHERE conversation=? AND position>=?",
                                     (conversation_id, keep))
                    dropped = self._forget_unused_images(conversation_id)
                start = self._db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation=?",
                                         (conversation_id,)).fetchone()[0]
                self._db.executemany("INSERT INTO messages VALUES (?, ?, ?)",
                                     [(conversation_id, start + i, body) for i, body in enumerate(bodies)])
                self._db.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?)",
                                     [(conversation_id, image["digest"], image["suffix"], image["bytes"])
                                      for image in images.values()])
                title = next((body["text"] for body, _ in stored if body["role"] == "user" and body["text"]), "")
                self._db.execute("UPDATE conversations SET updated=?, title=CASE WHEN title='' THEN ? ELSE title END "
                                 "WHERE id=?", (time.time(), " ".join(title.split())[:TITLE_CHARS], conversation_id))
            self._delete_image_files(dropped - {image["digest"] + image["suffix"] for image in images.values()})

    def _forget_unused_images(self, conversation_id: str) -> set[str]:
        """(In a transaction) Drop the conversation's image rows its messages no longer use;
        returns their file names."""
        used = {part["digest"] + part["suffix"]
                for (body,) in self._db.execute("SELECT body FROM messages WHERE conversation=?", (conversation_id,))
                for part in json.loads(body)["content"] if "digest" in part}
        rows = self._db.execute("SELECT digest, suffix FROM images WHERE conversation=?", (conversation_id,)).fetchall()
        unused = {sha + suffix for sha, suffix in rows if sha + suffix not in used}
        self._db.executemany("DELETE FROM images WHERE conversation=? AND digest || suffix=?",
                             [(conversation_id, name) for name in unused])
        return unused

    def _delete_image_files(self, names: set[str]) -> None:
        """(Under the lock) The files of these images, unless a conversation still uses them."""
        for name in names:
            if self._db.execute("SELECT 1 FROM images WHERE digest || suffix=?", (name,)).fetchone() is None:
                self._image_path(name).unlink(missing_ok=True)

    def title(self, user: str, conversation_id: str) -> str:
        with self._locked():
            self._owned(user, conversation_id)
            return self._db.execute("SELECT title FROM conversations WHERE id=?", (conversation_id,)).fetchone()[0]

    def messages(self, user: str, conversation_id: str) -> list[dict]:
        """The conversation as the app's neutral messages: images as paths of files in the
        store, tool calls as ToolCall; an assistant's reasoning, a tool's duration and an
        answer's figures as the keys "reasoning", "duration", "figures"."""
        with self._locked():
            self._owned(user, conversation_id)
            rows = self._db.execute("SELECT body FROM messages WHERE conversation=? ORDER BY position",
                                    (conversation_id,)).fetchall()
        return [self._from_stored(json.loads(body)) for (body,) in rows]

    def usage(self, user: str) -> tuple[int, int]:
        """(conversations, bytes) the user keeps here."""
        with self._locked():
            count = self._db.execute("SELECT COUNT(*) FROM conversations WHERE user=?", (user,)).fetchone()[0]
            return count, self._usage(user)

    def check_room(self, user: str, messages: list[dict] = ()) -> None:
        """LimitReached when the user's saved chats hold all the bytes kept for one user, or
        would with `messages` (a new message is refused before it is answered, and before a
        chat is made for it)."""
        stored = [self._to_stored(message) for message in messages]
        with self._locked():
            used, new_bytes = self._usage(user), self._new_bytes(user, stored)
        if used >= self.max_bytes or (new_bytes and used + new_bytes > self.max_bytes):
            raise self._full(used, new_bytes)

    def _new_bytes(self, user: str, stored: list[tuple]) -> int:
        """What messages as _to_stored makes them add to the user's bytes (a picture the user
        keeps already adds nothing)."""
        images = {image["digest"]: image for _, found in stored for image in found}
        return sum(len(json.dumps(body, ensure_ascii=False).encode()) for body, _ in stored) + sum(
            image["bytes"] for image in images.values() if not self._user_has_image(user, image["digest"]))

    def _full(self, used: int, new_bytes: int = 0) -> LimitReached:
        limit = f"the most this server keeps for one user is {_size_text(self.max_bytes)}"
        if used < self.max_bytes and new_bytes > self.max_bytes:
            return LimitReached(f"This message takes {_size_text(new_bytes)} to save, and {limit}: send a smaller one.")
        if used < self.max_bytes:
            return LimitReached(f"This message takes {_size_text(new_bytes)} to save, and your saved conversations "
                                f"hold {_size_text(used)}; {limit}: delete some, or send a smaller one.")
        return LimitReached(f"Your saved conversations hold {_size_text(used)}, {limit}: delete some to save new ones.")

    def _usage(self, user: str) -> int:
        text = self._db.execute("SELECT COALESCE(SUM(length(CAST(body AS BLOB))), 0) FROM messages JOIN conversations "
                                "ON conversation=id WHERE user=?", (user,)).fetchone()[0]
        pictures = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM (SELECT DISTINCT digest, bytes FROM images "
                                    "JOIN conversations ON conversation=id WHERE user=?)", (user,)).fetchone()[0]
        return text + pictures

    def _user_has_image(self, user: str, digest: str) -> bool:
        return self._db.execute("SELECT 1 FROM images JOIN conversations ON conversation=id WHERE user=? AND "
                                "digest=?", (user, digest)).fetchone() is not None

    # ------------------------------------------------------------ the stored shape

    def _to_stored(self, message: dict) -> tuple[dict, list[dict]]:
        """A neutral message → (its JSON body, the images it holds: digest, suffix, bytes, data)."""
        parts, images = [], []
        for part in message.get("content") or []:
            if part.get("type") == "text":
                parts.append({"type": "text", "text": well_formed(part["text"])})
            elif part.get("type") == "image":
                image = _image_bytes(part["image"], self._image_key)
                images.append(image)
                parts.append({"type": "image", "digest": image["digest"], "suffix": image["suffix"],
                              **({"name": str(part["name"])[:MAX_NAME_CHARS]} if part.get("name") else {})})
            elif part.get("type") in FILE_KINDS:
                file = _file_bytes(part, self._image_key)
                images.append(file)
                parts.append({"type": part["type"], "digest": file["digest"], "suffix": file["suffix"],
                              "name": str(part.get("name") or "attachment")[:MAX_NAME_CHARS],
                              **({"transcript": part["transcript"]} if part.get("transcript") is not None else {})})
            else:
                raise StoreError(f"A message part of type {part.get('type')!r} can't be saved (text, images, "
                                 f"documents, audio and video can).")
        body = {"role": message["role"], "content": parts,  # (searched: the text, transcripts, file names)
                "text": " ".join(p["text"] if p["type"] == "text" else f"{p.get('name', '')} {p.get('transcript', '')}"
                                 for p in parts).strip()}
        for key in EXTRA_KEYS:
            if message.get(key) is not None:
                body[key] = message[key]
        if message.get("tool_calls"):
            body["tool_calls"] = [{"id": call.id, "name": call.name, "arguments": call.arguments}
                                  for call in message["tool_calls"]]
        return body, images

    def _from_stored(self, body: dict) -> dict:
        content = []
        for part in body["content"]:
            if "digest" in part:
                kind, path = part["type"], str(self._image_path(part["digest"] + part["suffix"]))
                content.append({"type": kind, kind: path, **{key: part[key] for key in ("name", "transcript")
                                                             if key in part}})
            else:
                content.append(part)
        message = {"role": body["role"], "content": content}
        for key in EXTRA_KEYS:
            if key in body:
                message[key] = body[key]
        if body.get("tool_calls"):
            message["tool_calls"] = [ToolCall(call["name"], call["arguments"], call["id"])
                                     for call in body["tool_calls"]]
        return message

    def _image_path(self, name: str) -> Path:
        return self.images / name[:2] / name

    def _write_image(self, image: dict) -> None:
        path = self._image_path(image["digest"] + image["suffix"])
        if path.exists():
            return
        path.parent.mkdir(exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.part")
        partial.write_bytes(image["data"])
        os.replace(partial, path)  # (never a half-written picture under its name)

    # ------------------------------------------------------------ export, import

    def export_json(self, user: str, conversation_id: str) -> dict:
        """One conversation, whole: its messages with their images embedded (base64)."""
        with self._locked():
            self._owned(user, conversation_id)
            title, created = self._db.execute("SELECT title, created FROM conversations WHERE id=?",
                                              (conversation_id,)).fetchone()
            rows = self._db.execute("SELECT body FROM messages WHERE conversation=? ORDER BY position",
                                    (conversation_id,)).fetchall()
        messages = []
        for (body,) in rows:
            body = json.loads(body)
            body.pop("text", None)
            for part in body["content"]:
                if "digest" in part:
                    data = self._image_path(part.pop("digest") + part.pop("suffix")).read_bytes()
                    part["data"] = base64.b64encode(data).decode("ascii")
            messages.append(body)
        return {"format": EXPORT_FORMAT, "version": SCHEMA_VERSION, "title": title, "created": created,
                "messages": messages}

    def export_markdown(self, user: str, conversation_id: str) -> str:
        """One conversation to read: each message under its role, reasoning folded, tool calls
        and results as code, images as placeholders (the JSON export carries them)."""
        exported = self.export_json(user, conversation_id)
        lines = [f"# {exported['title'] or 'Conversation'}", ""]
        for message in exported["messages"]:
            lines.append(f"**{message['role']}**" + (f" ({message['name']})" if message.get("name") else "") + ":")
            lines.append("")
            if message.get("reasoning"):
                lines += ["<details><summary>Thinking</summary>", "", message["reasoning"], "", "</details>", ""]
            for part in message["content"]:
                if part["type"] == "text":
                    lines += [part["text"], ""]
                elif part["type"] == "image":
                    lines += ["*(an image)*", ""]
                else:
                    lines += [f"*(attached: {part.get('name')})*", ""]
                    if part.get("transcript"):
                        lines += [f"> {part['transcript']}", ""]
            for call in message.get("tool_calls") or []:
                lines += [f"Tool call `{call['name']}`:", "```json",
                          json.dumps(call["arguments"], ensure_ascii=False, indent=1), "```", ""]
        return "\n".join(lines)

    def import_json(self, user: str, exported: dict) -> str:
        """A JSON export as a new conversation of `user`; StoreError for anything else, naming
        the message and the field that is wrong (what is imported can be opened)."""
        if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
            raise StoreError("This file is not a conversation exported by this app.")
        version = exported.get("version")
        if type(version) is not int or version < 1:
            raise StoreError(f"This conversation file's version ({json.dumps(version)[:20]}) is not one this app knows.")
        if version > SCHEMA_VERSION:
            raise StoreError("This conversation was exported by a newer version of this app.")
        bodies, title = exported.get("messages"), exported.get("title")
        if not isinstance(bodies, list) or not isinstance(title, (str, type(None))):
            raise StoreError("This conversation file is damaged (its messages or its title are not what an export "
                             "holds).")
        if not bodies:
            raise StoreError("This conversation file holds no messages: there is nothing to import.")
        if len(bodies) > MAX_IMPORT_MESSAGES:
            raise StoreError(f"This conversation has {len(bodies):,} messages: this app imports at most "
                             f"{MAX_IMPORT_MESSAGES:,} messages in one chat.")
        messages = []
        for number, body in enumerate(bodies, 1):
            try:
                messages.append(_imported(body))
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                why = f"{error.args[0]} is missing" if isinstance(error, KeyError) else str(error)
                raise StoreError(f"This conversation file is damaged: message {number}: {why}.") from None
        conversation_id = self.create(user, title or "")
        try:
            self.append(user, conversation_id, messages)
        except BaseException:
            self.delete(user, conversation_id)
            raise
        return conversation_id


def load_export(data: bytes | str):
    """A JSON export file's content, parsed (import_json then checks it); StoreError for one
    that is not JSON, or nested too deeply to read."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise StoreError("This file is not a conversation exported by this app (not JSON).") from None
    except RecursionError:
        raise StoreError("This file is not a conversation exported by this app (its JSON is nested too deeply "
                         "to read).") from None


# What an exported message's EXTRA_KEYS hold: (a test of the value, what it should be, said).
_EXTRA_VALUES = {
    "reasoning": (lambda value: isinstance(value, str), "text"),
    "reasoning_seconds": (lambda value: _seconds(value), "a number of seconds"),
    "tool_call_id": (lambda value: isinstance(value, str), "text"),
    "name": (lambda value: isinstance(value, str), "text"),
    "duration": (lambda value: _seconds(value), "a number of seconds"),
    "figures": (lambda value: isinstance(value, str), "text"),
    "notes": (lambda value: isinstance(value, list) and all(isinstance(note, str) for note in value), "a list of texts"),
    "error": (lambda value: isinstance(value, str), "text"),
}
assert set(_EXTRA_VALUES) == set(EXTRA_KEYS)


def _seconds(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def _imported(body) -> dict:
    """One exported message as a neutral message, each value checked to be what the app
    keeps there (ValueError, saying which, otherwise)."""
    if not isinstance(body, dict):
        raise ValueError("it is not a message")
    if body.get("role") not in ("system", "user", "assistant", "tool"):
        raise ValueError(f"its role is {json.dumps(body.get('role'))[:40]}")
    if not isinstance(body.get("content"), list):
        raise ValueError('its "content" is not a list of parts')
    content = []
    for index, part in enumerate(body["content"], 1):
        kind = part.get("type") if isinstance(part, dict) else None
        what = f"part {index}" + (" (an image)" if kind == "image" else f" ({kind})" if kind in FILE_KINDS else "")
        if kind == "text" and isinstance(part.get("text"), str):
            content.append({"type": "text", "text": part["text"]})
        elif kind == "image" and isinstance(part.get("name"), (str, type(None))):
            content.append({"type": "image", "image": _decoded_image(part.get("data"), what),
                            **({"name": part["name"]} if part.get("name") else {})})
        elif kind in FILE_KINDS:
            try:
                content.append(_decoded_file(part))
            except ValueError as error:
                raise ValueError(f"{what}: {error}") from None
        else:
            raise ValueError(f"{what} is not a text, image, document, audio or video part as an export holds")
    message = {"role": body["role"], "content": content}
    for key, (valid, should_be) in _EXTRA_VALUES.items():
        if body.get(key) is not None:
            if not valid(body[key]):
                raise ValueError(f'its "{key}" is {json.dumps(body[key])[:40]}, not {should_be}')
            message[key] = body[key]
    calls = body.get("tool_calls")
    if calls:
        if not isinstance(calls, list) or not all(
                isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("id"), str)
                and isinstance(call.get("arguments"), dict) for call in calls):
            raise ValueError('its "tool_calls" are not a list of calls, each with a name, an id and its arguments')
        message["tool_calls"] = [ToolCall(call["name"], call["arguments"], call["id"]) for call in calls]
    return message


def kept_secret(path: Path) -> bytes:
    """A random 32-byte secret kept in `path`: drawn on first use, readable by this user only.
    Processes drawing it at once all end with the one kept first (a hard link never replaces
    a file, nor shows one half-written)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    partial = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(secrets.token_bytes(32))
    try:
        os.link(partial, path)
    except FileExistsError:
        pass  # (another process kept its own first: that one it is)
    except OSError:  # (a file system without hard links: as before, a narrow window for two at once)
        if not path.exists():
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path.read_bytes()


def _size_text(size: int) -> str:
    unit = next((unit for unit in ("GB", "MB") if size >= 2 ** {"GB": 30, "MB": 20}[unit]), "KB")
    return f"{size / 2 ** {'GB': 30, 'MB': 20, 'KB': 10}[unit]:,.1f} {unit}"


def _primary_code(error: sqlite3.Error) -> int | None:
    """SQLite's result code of an error, without its extended part (SQLITE_READONLY for
    SQLITE_READONLY_DBMOVED...); None when it has none."""
    code = getattr(error, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _read_ahead(path: Path) -> None:
    """The file read once from start to end, so that the pages of a check that follows come
    from memory (cold, a 1.9 GB store: quick_check alone took 27 s, read first 2.5 + 0.7 s)."""
    with open(path, "rb", buffering=0) as file:
        while file.read(1 << 20):
            pass


def _image_bytes(source, key: bytes) -> dict:
    """An image part's picture as stored: its file's (or imported) bytes as they are; a PIL
    image as PNG."""
    if isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        data, suffix = buffer.getvalue(), ".png"
    else:
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as image:
                suffix = IMAGE_FORMATS[image.format]
        except (OSError, Image.DecompressionBombError) as error:
            raise StoreError(f"An image can't be saved: it is not a picture this app reads ({error}).") from None
    return {"digest": hmac.new(key, data, hashlib.sha256).hexdigest(), "suffix": suffix, "bytes": len(data), "data": data}


def _file_bytes(part: dict, key: bytes) -> dict:
    """A document's, audio's or video's file as stored: its bytes as they are, under a suffix
    that says what it is (a text file is kept as .txt, never as .html)."""
    kind, source = part["type"], part[part["type"]]
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as error:
        raise StoreError(f"{part.get('name') or 'An attachment'} can't be saved: {error.strerror}.") from None
    suffix = Path(str(part.get("name") or "")).suffix.lower()
    if kind == "document":
        suffix = ".pdf" if data.startswith(b"%PDF-") else ".docx" if data.startswith(b"PK\x03\x04") else ".txt"
    elif suffix not in {"audio": media.AUDIO_SUFFIXES, "video": media.VIDEO_SUFFIXES}[kind]:
        suffix = {"audio": ".wav", "video": ".mp4"}[kind]
    return {"digest": hmac.new(key, data, hashlib.sha256).hexdigest(), "suffix": suffix, "bytes": len(data), "data": data}


def _decoded_file(part: dict) -> dict:
    """An exported attachment, checked to be what its part says it is."""
    import attachments
    from engine_contract import ChatInputError
    try:
        raw = base64.b64decode(part["data"], validate=True)
    except (binascii.Error, ValueError, TypeError) as error:
        raise ValueError(f"an attachment is not readable: {error}") from None
    name = str(part.get("name") or "attachment")[:MAX_NAME_CHARS]
    try:
        kind = attachments.kind_of(raw, name)
    except ChatInputError as error:
        raise ValueError(str(error)) from None
    if kind != part["type"]:
        raise ValueError(f"{name} is not {part['type']}")
    decoded = {"type": kind, kind: raw, "name": name}
    if isinstance(part.get("transcript"), str):
        decoded["transcript"] = part["transcript"]
    return decoded


def _decoded_image(data, what: str) -> bytes:
    """An exported image's bytes, checked to be a picture of a kind the app reads; ValueError
    naming the part (`what`) otherwise."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError(f"{what} is not readable: its data is not base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS)) as image:
            if image.width * image.height > MAX_IMPORTED_IMAGE_PIXELS:
                raise ValueError(f"{what} is not readable: {image.width}×{image.height} pixels is more than this "
                                 f"app takes")
            image.verify()  # (the file's structure, without decoding every pixel)
    except (OSError, SyntaxError, Image.DecompressionBombError):  # (their text names a BytesIO object)
        raise ValueError(f"{what} is not readable: it is not a whole picture of a kind this app reads (PNG, JPEG, "
                         f"WebP, GIF or BMP)") from None
    return raw


def open_store(settings, environ=os.environ) -> tuple[ConversationStore, str]:
    """The store the app keeps its chats in, as `settings` say (data_dir, save, the limits),
    and one line saying how they are kept, for the page (the log adds the directory; the
    page never shows a path). StoreError when the
    directory or its database can't be used.

    - --no-save: a temporary folder, removed when the app stops.
    - --data-dir DIR: there.
    - On a Space: its persistent storage (/data) when attached, else a temporary folder.
    - Elsewhere: the OS's per-user data folder (~/.local/share/local-model-chat on Linux,
      ~/Library/Application Support/local-model-chat on macOS, %LOCALAPPDATA% on Windows).
    """
    if not settings.save:
        directory, where = _temporary_directory(), "Chats are not saved (--no-save): they last until the app stops."
    elif settings.data_dir:
        directory = Path(settings.data_dir).expanduser()
        where = "Chats are saved on this server."
    elif environ.get("SPACE_ID"):
        if SPACE_STORAGE.is_dir() and os.access(SPACE_STORAGE, os.W_OK):
            directory = SPACE_STORAGE / APP_FOLDER
            where = "Chats are saved in this Space's persistent storage."
        else:
            directory = _temporary_directory()
            where = ("This Space has no persistent storage: chats last until it restarts (attach storage in the "
                     "Space's settings to keep them).")
    else:
        directory = Path(platformdirs.user_data_dir(APP_FOLDER, appauthor=False))
        where = "Chats are saved on this server."
    store = ConversationStore(directory, max_conversations=settings.max_saved_chats_per_user,
                              max_bytes=settings.max_saved_bytes_per_user)
    return store, where


def _temporary_directory() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="chats-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory
