"""Chat with a local Hugging Face model — text, images, documents, voice and video — streamed
token by token.

Launch:
    python app.py                                   # default model (SmolVLM-256M-Instruct)
    python app.py --model HuggingFaceTB/SmolVLM-500M-Instruct --device cuda
    python app.py --model ./my-local-model --share --auth me:secret
    python app.py --model Qwen/Qwen2.5-1.5B-Instruct --tools my_tools.py --tools builtin
    python app.py --model Qwen/Qwen2.5-1.5B-Instruct --asr-model openai/whisper-large-v3-turbo
    python app.py --model Qwen/Qwen2.5-7B-Instruct --mcp-config mcp.json --mcp-server
    python app.py --help                            # every option and its environment variable

Endpoints (same server):
    /                  the chat UI; its conversations are kept on the server, per user
                       (conversation_store.py, users.py; --data-dir, --no-save)
    /chat (Gradio API) gradio_client: Client(url).submit({"text": ..., "files": [handle_file(p)]},
                       system_prompt, max_new_tokens, temperature, top_p, api_name="/chat")
                       streams the growing answer; job.cancel() stops generation. Its
                       conversation is the client session's own, not saved.
    /v1/chat/completions, /v1/models   OpenAI-compatible API (see openai_api.py)
    /gradio_api/mcp/   with --mcp-server: the chat as one MCP tool, `ask` (Chats.ask)
    /healthz           model, device, loaded, and the runner record (engine_contract.RunnerInfo)
    /metrics           Prometheus metrics
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import mimetypes
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import anyio
import gradio as gr
from fastapi.responses import JSONResponse, Response
from starlette.middleware import Middleware

import config
import users
from config import Settings
from attachments import IMAGE_FORMATS, UPLOAD_TYPES, attachment_part
from conversation import ATTACHED, for_the_model, well_formed, with_well_formed_text
from conversation_store import CHANGED_MEANWHILE as CHANGED_IN_STORE
from conversation_store import TITLE_CHARS, ConversationStore, NotFound, StoreError, load_export, open_store
from engine_contract import (
    ANSWER_CUT_TO_BATCH_CACHE,
    Cancelled,
    ChatInputError,
    DescribedByInfo,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    RunnerInfo,
    Signal,
    ToolCall,
    first_line,
    served_model_name,
    wait_for_either,
)
from engine_process import EngineProcess
from gradio_fixes import (
    Refusal,
    UnqueuedRefusals,
    cache_history_postprocessing,
    gradio_app_built_at_launch_only,
    keep_reading_js,
    patient_launch_check,
    state_now,
    wake_queue_on_events,
)
from metrics import Metrics
from openai_api import APIError, create_api, decode_image
from remote_backend import RemoteRunner
from starter_examples import starter_examples
from mcp_tools import McpConfigError
from tools import Toolbox, ToolsError
from users import BrowserIds
from waiting_line import LineFull, WaitingLine

if TYPE_CHECKING:
    from speech import Speech  # (imported when --asr-model is given: it brings torch into this process)

GENERATION_CONCURRENCY_ID = "generate"  # the chat's answering events (submit, retry, edit, example, /chat)
# Updates per second × messages in the chat stays under this (30/s up to 26 messages, 8/s at
# 100, 2/s at 400): Gradio walks the whole chat on every update (README, Performance).
UPDATE_BUDGET_MESSAGES = 800
# Gradio runs at most this many events at once (its thread limit); the chat's wait in the
# app's own line, so there is room for all of them plus a few of Gradio's own.
GRADIO_EXTRA_THREADS = 8
DEFAULT_SYSTEM_PROMPT = ""
SIDEBAR_MIN_WIDTH = 768  # px: a narrower window (a phone) starts with the chat list folded away
STOP_SAVE_WAIT_S = 5.0   # a turn's end redraws the chat once its answer is saved, or after this long
BUSY_WAIT_S = 2.0        # a new turn waits this long for the one before (a Stop being saved), then is refused
CSS = """
#chat-list .wrap { flex-direction: column; gap: 2px; }
#chat-list label { width: 100%; }
#chat-list label span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#where-chats-live { font-size: 0.8em; opacity: 0.8; }
"""

THINKING_TITLE = "Thinking…"
TRANSCRIBING_TITLE = "🎤 Writing out the audio…"
LOADING_TITLE = "Loading the model…"
WAITING_TITLE = "⏳ {} in line for the model"
ERROR_TITLE = "⚠️ Error"
NOTE_TITLE = "ℹ️ Note"
STOPPED_BEFORE_TEXT = "Stopped before the answer began."
NO_ANSWER = "This message got no answer."
DELETED, STOPPING = "deleted", "stopping"  # (a Halt's why)
APP_STOPPED = "The app was stopped while this answer was being written: it ends here."
DELETED_ELSEWHERE = ("This chat was deleted (in another tab?): its answer was stopped and is not kept. A new "
                     "message starts a new chat.")
DELETED_BEFORE = "This chat was deleted (in another tab?): nothing was changed. A new message starts a new chat."
EMPTY_TITLE = "A chat's title can't be empty: it keeps the one it has."
EMPTY_EDIT = "The edited message is empty: nothing was changed (type some text, or Escape to leave the edit)."
CHANGED_MEANWHILE = ("This chat was changed meanwhile (in another tab?): here it is as it is now; nothing was "
                     "changed. Try again on what it shows.")
REASONING_TITLE = "Thinking"
STATS_PREFIX = "⏱ "
TOOL_TITLE = "🛠 {}"   # a tool call's bubble: its arguments and result inside
CALLING_TITLE = "🛠 calling a tool…"

log = logging.getLogger("app")


# ---------------------------------------------------------------- the answer: model messages in, the answer as the chat keeps it out

class Progress(NamedTuple):
    """An answer so far: its messages as the chat keeps them (conversation.for_the_model's
    input: an assistant message per step with its text, reasoning, tool calls, notes, error
    and figures; a tool message per call with its result and duration), and the title of a
    spinner to show after them (waiting in line, loading, thinking, calling a tool), if any."""
    messages: list
    pending: str | None = None


def make_answer_steps(runner, settings: Settings, *, line: WaitingLine | None = None, zero_gpu: bool = False,
                      toolbox: Toolbox | None = None):
    """`answer_steps(messages, generation, cancelled, on_stream, on_reading)`: a generator of Progress
    that answers `messages` (model messages) on `runner`. With a `toolbox` (and a model whose
    template takes tools) the model may call tools: each call runs, and the model generates
    again with its result, up to settings.max_tool_steps calls. On ZeroGPU it runs under
    `@spaces.GPU`, which borrows the GPU per answer and takes plain generators only."""

    def answer_steps(messages: list[dict], generation: GenerationSettings, cancelled: Signal | None = None,
                     on_stream=None, on_reading=None):
        title = THINKING_TITLE
        if not runner.loaded:
            title = LOADING_TITLE
        elif line is not None and line.engine_busy:  # at the front, waiting for the answer before it to end
            title = WAITING_TITLE.format(ordinal(1))
        yield Progress([], title)
        if toolbox is not None and not runner.loaded:  # (whether it takes tools is known once it is loaded)
            wait_for_either(runner.ready, cancelled)
        if toolbox is not None and runner.supports_tools:
            generation = dataclasses.replace(generation, tools=toolbox.all_schemas)
        done: list[dict] = []  # the steps before this one: their text, the tool calls and results
        calls_made, told = 0, set()  # (the notes this answer has shown: a later step doesn't repeat them)
        while True:
            try:
                stream = runner.stream(messages, generation, cancelled=cancelled, on_reading=on_reading)
                if on_stream:
                    on_stream(stream)
            except Cancelled:  # Stop while it waited for the engine: nothing ran, nobody listens
                return
            except (ChatInputError, GenerationError) as error:
                yield Progress([*done, failed(str(error))])
                return
            except Exception as error:  # a bug of ours: say so in the chat, keep serving
                log.exception("building the model inputs failed")
                yield Progress([*done, failed(f"Internal error: {type(error).__name__}: {error}")])
                return
            if title != THINKING_TITLE:  # it waited; now the model is working on it
                title = THINKING_TITLE
                yield Progress(done, THINKING_TITLE)
            step = AnswerStep(stream, told)
            told.update(map(note_kind, step.notes))
            with stream:  # leaving it (Stop, closed tab, API cancel) stops generation
                try:
                    for reply in stream:
                        yield Progress([*done, step.message(reply)], CALLING_TITLE if reply.calling else None)
                except GenerationError as error:
                    yield Progress([*done, {**step.message(stream.reply, figures=False), "error": str(error)}])
                    return
            if cancelled is not None and cancelled.is_set():
                return
            reply = stream.reply
            if not reply.tool_calls:
                if not reply.answer and reply.reasoning is None:
                    yield Progress([*done, {**step.message(reply, figures=False),
                                            "error": "The model returned an empty answer."}])
                else:
                    final = step.message(reply)  # the final figures
                    if (why := out_of_room(stream, generation.max_new_tokens)) is not None:
                        final["notes"] = [*final.get("notes", ()), why]
                    yield Progress([*done, final])
                return
            calls = reply.tool_calls
            if calls_made + len(calls) > settings.max_tool_steps:
                stopped = {**step.message(reply, figures=False), "tool_calls": None,
                           "notes": [*step.notes, f"Stopped: the model asked for more than {settings.max_tool_steps} "
                                                  f"tool calls for one message (MAX_TOOL_STEPS)."]}
                yield Progress([*done, stopped])
                return
            calls_made += len(calls)
            done = [*done, step.message(reply, figures=False)]
            messages = [*messages, *for_the_model(done[-1:])]
            for call in calls:
                yield Progress(done)  # the call's bubble, pending
                result = toolbox.run(call.name, call.arguments, timeout=settings.tool_timeout_s, cancelled=cancelled)
                if cancelled is not None and cancelled.is_set():
                    return
                done = [*done, {"role": "tool", "tool_call_id": call.id, "name": call.name,
                                "content": [{"type": "text", "text": result.text},
                                            *pictures(result.images, settings.max_images_per_message)],
                                "duration": round(result.seconds, 2)}]
                messages = [*messages, *for_the_model(done[-1:])]
            # (before those who came later; its first token counts from its own start)
            generation = dataclasses.replace(generation, continues_answer=True, arrived_at=None)
            yield Progress(done, THINKING_TITLE)

    if zero_gpu:
        import spaces
        return spaces.GPU(duration=settings.zero_gpu_duration_s)(answer_steps)
    return answer_steps


def out_of_room(stream, max_new_tokens: int) -> str | None:
    """Why an answer that ended at its length limit stopped where it did, when the chat would
    not show it otherwise: the model's context full (the engine cut the limit to what was left
    of it), or max new tokens reached while the model was still thinking (no answer written)."""
    if stream.finish_reason != "length":
        return None
    thinking = " while thinking" if stream.reply.reasoning is not None and not stream.reply.answer else ""
    cut_to_cache = note_kind(ANSWER_CUT_TO_BATCH_CACHE.format(tokens=0))
    if stream.max_new_tokens < max_new_tokens and not any(note_kind(n) == cut_to_cache for n in stream.notices):
        return (f"The answer stopped here{thinking}: the model's context is full ({stream.prompt_tokens} tokens of "
                f"chat and {stream.new_tokens} of answer). A new chat, or a shorter message, leaves it more room.")
    if thinking:
        return (f"The answer ran out of room while thinking (max new tokens {max_new_tokens}): raise Max new "
                f"tokens in Settings.")
    return None


def note_kind(note: str) -> str:
    """A note without its numbers: a later step of a tool loop that tells it again, counts
    grown ("the oldest 4 messages..."), tells nothing new."""
    return re.sub(r"\d[\d,.]*", "#", note)


class AnswerStep:
    """One generation's reply as the assistant message the chat keeps: its notes (an image
    downscaled...), the reasoning and how long it took, the answer, the tool calls, the live
    figures. The reasoning's time is taken when the reply says it ended."""

    def __init__(self, stream, told: set[str] = frozenset()):
        self.stream, self.notes = stream, [notice for notice in stream.notices if note_kind(notice) not in told]
        self.thought_for: float | None = None

    def message(self, reply, figures: bool = True) -> dict:
        message = {"role": "assistant", "content": [{"type": "text", "text": reply.answer}] if reply.answer else []}
        if self.notes:
            message["notes"] = list(self.notes)
        if reply.reasoning is not None:
            message["reasoning"] = reply.reasoning
            if reply.reasoning_done:
                if self.thought_for is None:
                    self.thought_for = time.perf_counter() - self.stream.started_at
                # (Gradio shows a duration under 0.1 s in ms, and none at all for 0)
                message["reasoning_seconds"] = max(0.001, round(self.thought_for, 3))
        if reply.tool_calls:
            message["tool_calls"] = list(reply.tool_calls)
        if figures:
            message["figures"] = stats_line(self.stream)
        return message


def failed(error: str) -> dict:
    """An answer that is only an error (the model never sees it: for_the_model leaves it out)."""
    return {"role": "assistant", "content": [], "error": error}


def settled(answer: list[dict]) -> list[dict]:
    """An answer as it is kept when it was stopped: each tool call without a result gets one
    that says so (a template needs a result for every call)."""
    answered = {message.get("tool_call_id") for message in answer if message["role"] == "tool"}
    kept, missing = [], []
    for message in [*answer, None]:
        if missing and (message is None or message["role"] != "tool"):  # after the results there are
            kept += [{"role": "tool", "tool_call_id": call.id, "name": call.name, "content": [
                {"type": "text", "text": "error: the call was stopped before it returned"}]} for call in missing]
            missing = []
        if message is not None:
            kept.append(message)
            missing += [call for call in message.get("tool_calls") or () if call.id not in answered]
    return kept


def cut_short(answer: list[dict], note: str) -> list[dict]:
    """An answer as it is kept when the app stopped it: what was shown (settled), its last
    assistant message with a note saying so (the model never sees notes); no answer yet, the note
    alone."""
    kept = settled(answer)
    last = max((i for i, message in enumerate(kept) if message["role"] == "assistant"), default=None)
    if last is None:
        return [*kept, {"role": "assistant", "content": [], "notes": [note]}]
    kept[last] = {**kept[last], "notes": [*(kept[last].get("notes") or ()), note]}
    return kept


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def stats_line(stream) -> str:
    figures = [f"{stream.new_tokens} tokens"]
    if stream.tokens_per_second:
        figures.append(f"{stream.tokens_per_second:.1f} tokens/s")
    if stream.time_to_first_token is not None:
        figures.append(f"first token after {stream.time_to_first_token:.2f} s")
    return STATS_PREFIX + " · ".join(figures)


# ---------------------------------------------------------------- what the chat shows: kept messages → bubbles

def chat_bubbles(messages: list[dict], *, live: bool = False, owners: list[int] | None = None,
                 answering: bool = False) -> list[dict]:
    """The one place where messages as the chat keeps them become the chat's bubbles (Gradio
    message dicts), for a saved conversation and for an answer streaming (`live`: its
    unfinished reasoning and tool calls spin). A user message: its text, then its files; one
    left without an answer (the app stopped or was killed meanwhile), a note saying so, unless
    it is the last and is `answering` now (its turn in progress, in this tab or another).
    An answer: notes, the reasoning in a collapsible "Thinking" block, the text, each tool
    call as its own "🛠 name" block (arguments and result inside), an error, the figures.
    `owners` gets, bubble by bubble, the index of the message it shows (or is about)."""
    results = {message.get("tool_call_id"): message for message in messages if message["role"] == "tool"}
    bubbles: list[dict] = []
    for position, message in enumerate(messages):
        if owners is not None:
            owners += [position - 1] * (len(bubbles) - len(owners))
        if message["role"] == "user":
            if position and messages[position - 1]["role"] == "user":  # (a message left without an answer)
                bubbles.append(bubble(NO_ANSWER, title=NOTE_TITLE))
            content = [file_bubble(part) for part in message["content"] if part["type"] in ATTACHED]
            text = "\n\n".join([*(f"🎤 {part['transcript']}" for part in message["content"]
                                   if part.get("transcript")), *([text_of(message)] if text_of(message) else [])])
            # (text first: Gradio 6.31 shows an edit pencil on a message whose last part is text, and its
            # page never sends the edit of one that carries a file, dropping the edited text)
            bubbles.append({"role": "user", "content": [text, *content] if text or not content else content})
        elif message["role"] == "assistant":
            for note in message.get("notes") or ():
                bubbles.append(bubble(note, title=NOTE_TITLE))
            if message.get("reasoning") is not None:
                seconds = message.get("reasoning_seconds")
                thinking = live and seconds is None
                bubbles.append(bubble(message["reasoning"], title=REASONING_TITLE,
                                      status="pending" if thinking else "done", duration=seconds))
            if text_of(message):
                bubbles.append({"role": "assistant", "content": text_of(message), "metadata": {}})
            for call in message.get("tool_calls") or ():
                bubbles.append(tool_bubble(call, results.get(call.id)))
                bubbles += [{"role": "assistant", "content": {"path": part["image"]}, "metadata": {}}
                            for part in (results.get(call.id) or {}).get("content", ()) if part["type"] == "image"]
            if message.get("error"):
                bubbles.append(bubble(message["error"], title=ERROR_TITLE))
            if message.get("figures"):
                bubbles.append(bubble("", title=message["figures"], status="done"))
    if messages and messages[-1]["role"] == "user" and not answering:
        bubbles.append(bubble(NO_ANSWER, title=NOTE_TITLE))
    if owners is not None:
        owners += [len(messages) - 1] * (len(bubbles) - len(owners))
    return bubbles


def file_bubble(part: dict) -> dict:
    """An attachment as the chat shows it: a picture, a player for audio and video, a chip
    with its name for a document (never its text)."""
    if part["type"] == "image":
        return {"path": part["image"]}
    path = part.get(part["type"]) or part.get("path")
    mime = mimetypes.guess_type(part.get("name") or path)[0] if part["type"] != "file" else None  # (refused: a chip,
    return {"file": {"path": path, "orig_name": part.get("name") or Path(path).name,   # never an empty player)
                     "mime_type": mime or "application/octet-stream"}}


def bubble(content: str, *, title: str, status: str | None = None, duration: float | None = None) -> dict:
    metadata = {"title": title}
    if status:
        metadata["status"] = status
    if duration is not None:
        metadata["duration"] = duration
    return {"role": "assistant", "content": content, "metadata": metadata}


def pending(title: str | None) -> list[dict]:
    return [bubble("", title=title, status="pending")] if title else []


def title_of(message: dict) -> str:
    """A new conversation's title: its first message's text, else what it carries."""
    if text_of(message).strip():
        return text_of(message)
    icons = {"image": "🖼", "document": "📄", "audio": "🎤", "video": "🎬", "file": "📎"}
    return " ".join(f"{icons[part['type']]} {part.get('name') or 'an image'}" for part in message["content"]
                    if part["type"] in icons)


def automatic_title(messages: list[dict]) -> str:
    """The title of a chat the user never renamed: its first message's (title_of), as the store
    keeps it; none while it has no message (its next message titles it, as a new chat's)."""
    first = next((message for message in messages if message["role"] == "user"), None)
    return title_of(first).strip()[:TITLE_CHARS] if first is not None else ""


def text_of(message: dict) -> str:
    return "".join(part["text"] for part in message.get("content") or () if part["type"] == "text")


@functools.cache
def tool_pictures() -> Path:
    """The folder of MCP tools' pictures until they are saved: made on the first one, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="tool-pictures-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def pictures(images: list[bytes], most: int = 8) -> list[dict]:
    """An MCP tool's pictures as image parts (files in a folder of the app's own, named by
    their format so the chat shows them): the first `most` of a kind the app reads; the
    result's text already mentions each."""
    from PIL import Image
    parts = []
    for data in images[:most]:
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as picture:
                suffix = {"JPEG": ".jpg"}.get(picture.format, f".{picture.format.lower()}")
        except Exception:  # (not a picture this app shows)
            continue
        path = tool_pictures() / f"{hashlib.sha256(data).hexdigest()}{suffix}"
        path.write_bytes(data)
        parts.append({"type": "image", "image": str(path)})
    return parts


def tool_bubble(call: ToolCall, result: dict | None) -> dict:
    """A tool call: titled with the tool's name, pending while it runs, then done with its
    duration; the arguments and the result inside (collapsible)."""
    arguments = json.dumps(call.arguments, ensure_ascii=False, indent=1)
    content = f"**Arguments**\n```json\n{arguments}\n```"
    metadata = {"title": TOOL_TITLE.format(call.name), "id": call.id, "status": "pending"}
    if result is not None:
        text = text_of(result)
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
        content += f"\n**Result**\n{fence}\n{text}\n{fence}"
        metadata["status"] = "done"
        if result.get("duration") is not None:
            metadata["duration"] = result["duration"]
    return {"role": "assistant", "content": content, "metadata": metadata}


def user_message(message: dict | str | None) -> dict:
    """The textbox's value ({"text", "files"}) as a neutral user message: its files (each an
    image, document, audio or video part, by its content: attachments.py), then the text. A
    file this app doesn't read stays a "file" part carrying why ("refused"): the turn says so
    and saves the rest of the message."""
    if isinstance(message, str) or message is None:
        message = {"text": message or "", "files": []}
    content = []
    for file in message.get("files") or []:
        path = file.get("path") if isinstance(file, dict) else file
        name = (file.get("orig_name") if isinstance(file, dict) else None) or Path(path).name
        try:
            content.append(attachment_part(path, name))
        except ChatInputError as error:
            content.append({"type": "file", "path": path, "name": name, "refused": str(error)})
    text = message.get("text") or ""
    return {"role": "user", "content": [*content, *([{"type": "text", "text": text}] if text.strip() or not content else [])]}


# ---------------------------------------------------------------- the chat in the browser, kept in the store

def idle_textbox():
    """The textbox between turns: Submit shown, Stop hidden (a turn swaps them: Chats._begin)."""
    return gr.MultimodalTextbox(submit_btn=True, stop_btn=False, interactive=True)


def without_refused_files(message: dict) -> tuple[dict, str | None]:
    """A message without the files this app doesn't read, and why they were refused (None:
    none were). What remains is saved; a message that was only such files keeps their names."""
    refused = [part for part in message["content"] if part["type"] == "file"]
    if not refused:
        return message, None
    kept = [part for part in message["content"] if part["type"] != "file"] or [
        {"type": "text", "text": " ".join(f"📎 {part['name']}" for part in refused)}]
    return {**message, "content": kept}, " ".join(part.get("refused") or f"{part['name']} can't be read."
                                                  for part in refused)


def version_of(stored: list[dict]) -> str:
    """A saved conversation's messages in a few characters: what a tab showed, to tell whether
    it is still what the store holds (the same count is not enough: an undo and a new message
    in another tab keep it)."""
    return hashlib.sha256(json.dumps(stored, ensure_ascii=False, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def last_user_message(stored: list[dict]) -> int:
    """The position of a conversation's last user message (retry and undo start there)."""
    return max(i for i, message in enumerate(stored) if message["role"] == "user")


class OneTurnAtATime:
    """Per conversation: a turn (its message saved, answered, the answer saved) ends before the
    next turn, an undo, or a redraw reads or changes the conversation. Every holder is an event
    of the web server's event loop, which is where this is used: waiting costs no thread."""

    def __init__(self):
        self._busy: dict[str, asyncio.Event] = {}

    def busy(self, key: str) -> bool:
        return key in self._busy

    async def acquire(self, key: str, timeout: float | None = None) -> bool:
        """True once the conversation is this caller's; False after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (busy := self._busy.get(key)) is not None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(busy.wait(), left)
        self._busy[key] = asyncio.Event()
        return True

    def release(self, key: str) -> None:
        busy = self._busy.pop(key, None)
        if busy is not None:
            busy.set()

    @contextlib.asynccontextmanager
    async def held(self, key: str, timeout: float | None = None):
        acquired = await self.acquire(key, timeout)
        try:
            yield acquired
        finally:
            if acquired:
                self.release(key)


class Halt:
    """A turn's answer stopped from outside its tab (Chats.halts): `signal` stops it as Stop does
    (the engine within one token), `why` says why (DELETED, STOPPING)."""

    def __init__(self):
        self.signal, self.why = Signal(), None

    def __call__(self, why: str) -> None:
        if self.why is None:
            self.why = why
        self.signal.set()


class Chats:
    """The chat's events, on the conversations kept in `store` for the user of each session.

    A session's user (users.py) and open conversation are gr.State, which only the server
    sets; every read and write of the store names the user, and another user's conversation
    is NotFound, so no request (however crafted) reaches it. A turn: begin_* (at once:
    create the conversation if new, show the message, the textbox turns into Stop) → respond
    (save the message, answer from the store, save the answer: when Stop ends it, what was
    shown) → end_turn (the list, the textbox back)."""

    def __init__(self, runner, line: WaitingLine, settings: Settings, store: ConversationStore, where: str,
                 browser_ids: BrowserIds, *, toolbox: Toolbox | None = None, hf_oauth: bool = False,
                 speech: Speech | None = None):
        self.runner, self.line, self.settings, self.store, self.where = runner, line, settings, store, where
        self.speech = speech  # --asr-model: audio written out for a model that can't listen
        self.browser_ids, self.hf_oauth = browser_ids, hf_oauth
        self.zero_gpu = on_zero_gpu()
        self.answer_steps = make_answer_steps(runner, settings, line=line, zero_gpu=self.zero_gpu, toolbox=toolbox)
        self.turns = OneTurnAtATime()
        self.answered: set[str] = set()  # conversations whose last turn ran to its end (not stopped)
        self.retitled: set[str] = set()  # conversations given a new title during their turn (end_turn shows it)
        self.halts: dict[tuple[str, str], Halt] = {}  # (user, conversation) -> its answer in flight, in any tab
        self.stopping = False  # the app is stopping: answers end where they are (stop_answers)
        self.demo = self.open_state = None  # (build_demo: the Blocks, and the State of the conversation a tab shows)
        self.examples = starter_examples()
        self.scratch = Path(tempfile.mkdtemp(prefix="chat-undo-"))  # images an undo puts back in the textbox
        atexit.register(shutil.rmtree, self.scratch, ignore_errors=True)

    # -- who, and which conversations

    def start_session(self, kept, request: gr.Request, hf_user: str | None = None):
        """Page load: who this is (a login, an HF account, else this browser's signed id, drawn
        now if it brought none), their list, and the conversation that was open here."""
        kept = kept if isinstance(kept, dict) else {}
        browser_id = self.browser_ids.check(kept.get("id"))
        if browser_id is None:
            kept = {"id": self.browser_ids.issue()}
            browser_id = self.browser_ids.check(kept["id"])
        user = users.user_key(login=getattr(request, "username", None), hf_user=hf_user, browser_id=browser_id)
        conversation, shown, seen = None, [], None
        if isinstance(kept.get("open"), str):
            try:
                stored = self.store.messages(user, kept["open"])
                shown, seen, conversation = chat_bubbles(stored, answering=self.turns.busy(kept["open"])), \
                    version_of(stored), kept["open"]
            except StoreError:
                kept = {"id": kept["id"]}
        return user, conversation, seen, kept, shown, self.chat_list(user, conversation)

    def start_session_with_hf(self, kept, request: gr.Request, profile: gr.OAuthProfile | None):
        return self.start_session(kept, request, hf_user=profile.username if profile else None)

    def chat_list(self, user, selected=None, search: str = ""):
        search = well_formed(search or "")
        try:
            chats = self.store.conversations(user, search) if user else []
        except StoreError as error:  # (the database failed while the app runs: the page still loads, and says so)
            log.error("Saved chats: %s", error)
            gr.Warning(str(error))
            return gr.Radio(choices=[], value=None, label="Saved chats can't be read now")
        choices = [(summary.title or "(untitled)", summary.id) for summary in chats]
        label = f"{len(choices)} chat{'s' * (len(choices) != 1)}" + (f" matching “{search.strip()}”" if search.strip() else "")
        return gr.Radio(choices=choices, value=selected if any(c[1] == selected for c in choices) else None,
                        label=label)

    def new_chat(self, user, kept, search):
        return None, [], None, {**(kept or {}), "open": None}, self.chat_list(user, None, search), \
            gr.Textbox(value="", interactive=False), gr.File(value=None, visible=False), None

    def open_chat(self, chosen, user, kept, search):
        """A conversation from the list (only the user's own: another id is NotFound)."""
        try:
            stored = self.store.messages(user, chosen)
            title = self.store.title(user, chosen)
        except StoreError as error:
            raise gr.Error(str(error)) from None
        shown = chat_bubbles(stored, answering=self.turns.busy(chosen))  # (its answer streaming in another tab)
        return chosen, shown, None, {**(kept or {}), "open": chosen}, \
            self.chat_list(user, chosen, search), gr.Textbox(value=title, interactive=True), \
            gr.File(value=None, visible=False), version_of(stored)

    def rename(self, title, conversation, user, search):
        """(the list, the Title box showing the title as saved)"""
        if not conversation:
            return gr.skip(), gr.skip()
        try:
            if not title.strip():
                raise Refusal(EMPTY_TITLE, (self.chat_list(user, conversation, search),
                                            self.store.title(user, conversation)))
            self.store.rename(user, conversation, title)
            saved = self.store.title(user, conversation)
        except StoreError as error:
            raise gr.Error(str(error)) from None
        return self.chat_list(user, conversation, search), saved

    def delete(self, conversation, user, kept, search):
        if not conversation:
            return (gr.skip(),) * 8
        try:
            self.store.delete(user, conversation)
        except StoreError as error:
            raise gr.Error(str(error)) from None
        if (halt := self.halts.get((user, conversation))) is not None:  # its answer streaming, in any tab
            halt(DELETED)
        return self.new_chat(user, kept, search)

    def export(self, conversation, user):
        """The open conversation as Markdown and JSON (images embedded), to download."""
        if not conversation:
            raise gr.Error("Open a saved chat to export it.")
        try:
            exported = self.store.export_json(user, conversation)
            markdown = self.store.export_markdown(user, conversation)
        except StoreError as error:
            raise gr.Error(str(error)) from None
        folder = Path(tempfile.mkdtemp(prefix="chat-export-"))
        name = re.sub(r"[^\w-]+", "-", exported["title"] or "chat").strip("-")[:60] or "chat"
        (folder / f"{name}.md").write_text(markdown, encoding="utf-8")
        (folder / f"{name}.json").write_text(json.dumps(exported, ensure_ascii=False), encoding="utf-8")
        return gr.File(value=[str(folder / f"{name}.md"), str(folder / f"{name}.json")], visible=True)

    def import_chat(self, file, user, kept, search):
        """A JSON export, as a new conversation of this user, opened."""
        try:
            path = file if isinstance(file, str) else file.name
            if Path(path).stat().st_size > self.settings.max_saved_bytes_per_user:
                raise StoreError("This file is larger than what the server keeps for one user.")
            exported = load_export(Path(path).read_bytes())
        except OSError:
            raise gr.Error("This file is not a conversation exported by this app (not JSON).") from None
        except StoreError as error:
            raise gr.Error(str(error)) from None
        try:
            conversation = self.store.import_json(user, exported)
        except StoreError as error:
            raise gr.Error(str(error)) from None
        return self.open_chat(conversation, user, kept, search)

    # -- a turn

    async def begin_turn(self, message, conversation, user, kept, search):
        """Enter in the textbox: the message shows at once, the textbox turns into Stop."""
        if not (message or {}).get("text", "").strip() and not (message or {}).get("files"):
            return gr.skip(), gr.skip(), None, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()  # (nothing to answer)
        await self._wait_for_the_turn_before(conversation)
        return self._begin(user_message(message), None, conversation, user, kept, search)

    async def begin_example(self, selected: gr.SelectData, conversation, user, kept, search):
        """A starter example, by its index (never a path the request names)."""
        chosen = selected.value.get("text") if isinstance(selected.value, dict) else None  # (the page's list may be
        example = next((e for e in self.examples if e["text"] == chosen), None) or \
            self.examples_for_the_model()[selected.index]                                # older than the model's)
        await self._wait_for_the_turn_before(conversation)
        return self._begin(user_message(example), None, conversation, user, kept, search)

    def examples_for_the_model(self) -> list[dict]:
        """The starter examples the model can do: a text-only model's have no pictures (while
        it loads, all of them)."""
        if not self.runner.loaded or self.runner.is_vision:
            return self.examples
        return [example for example in self.examples if not example["files"]]

    async def begin_retry(self, conversation, user, kept, search, seen=None):
        """Retry: the last message again, its answer dropped."""
        await self._wait_for_the_turn_before(conversation, user, self._redrawn_turn)
        stored = self._stored(user, conversation, seen, self._redrawn_turn)
        last = last_user_message(stored)
        return self._begin(stored[last], last, conversation, user, kept, search, stored[:last], len(stored), seen)

    async def begin_edit(self, edited: gr.EditData, conversation, user, kept, search, seen=None):
        """An edited message: the conversation again from there, with the new text (and the
        message's images)."""
        await self._wait_for_the_turn_before(conversation, user, self._redrawn_turn)  # (the bubble's edit undone)
        stored = self._stored(user, conversation, seen, self._redrawn_turn)
        index = self._message_of_bubble(stored, edited.index)
        if index is None or stored[index]["role"] != "user":
            raise gr.Error("Only your own messages can be edited.")
        text = edited.value if isinstance(edited.value, str) else " ".join(
            item if isinstance(item, str) else item.get("text", "") for item in edited.value or []
            if isinstance(item, (str, dict)))
        files = [part for part in stored[index]["content"] if part["type"] in ATTACHED]
        message = {"role": "user", "content": [*files, *([{"type": "text", "text": text}] if text.strip() else [])]}
        if not message["content"]:  # (the edit would cut the chat there and save an empty message)
            raise Refusal(EMPTY_EDIT, self._redrawn_turn(chat_bubbles(stored), version_of(stored)))
        return self._begin(message, index, conversation, user, kept, search, stored[:index], len(stored), seen)

    async def undo(self, conversation, user, seen=None):
        """Undo: the last message and its answer go; its text and images are back in the textbox."""
        def redrawn(shown, version):  # (undo's outputs: the chat, the textbox, the version shown)
            return shown, gr.skip(), version
        await self._wait_for_the_turn_before(conversation, user, redrawn)
        async with self.turns.held(conversation):
            stored = self._stored(user, conversation, seen, redrawn)
            last = last_user_message(stored)
            files = []
            for part in stored[last]["content"]:
                if part["type"] in ATTACHED:  # (the store may delete its file with the message)
                    source = Path(part[part["type"]])
                    copy = self.scratch / secrets.token_hex(8) / (Path(part.get("name") or "").name or source.name)
                    copy.parent.mkdir()
                    shutil.copyfile(source, copy)
                    files.append(str(copy))
            try:
                title = self.store.title(user, conversation)
                self.store.append(user, conversation, [], keep=last)
            except StoreError as error:
                raise gr.Error(str(error)) from None
            self._title_follows(user, conversation, title, stored, stored[:last])
            return chat_bubbles(stored[:last]), gr.MultimodalTextbox(value={"text": text_of(stored[last]),
                                                                           "files": files}), version_of(stored[:last])

    async def _wait_for_the_turn_before(self, conversation, user=None, redrawn=None) -> None:
        """A conversation answers one turn at a time: a new one (a second Enter, another tab)
        waits briefly for the one before (a Stop's answer being saved), else is refused; with
        `redrawn` (an edit, a retry, an undo), the tab then shows the chat as saved (an edit in
        the bubble undone)."""
        if conversation and self.turns.busy(conversation):
            async with self.turns.held(conversation, BUSY_WAIT_S) as free:
                if not free:
                    message = "Wait for the answer to end (or Stop it) before sending another message."
                    if redrawn is None:
                        raise gr.Error(message)
                    try:
                        stored = self.store.messages(user, conversation)
                    except StoreError:
                        raise gr.Error(message) from None
                    raise Refusal(message, redrawn(chat_bubbles(stored, answering=True), version_of(stored)))

    def _stored(self, user, conversation, seen, redrawn) -> list[dict]:
        """The saved conversation an edit, a retry or an undo changes: refused unless it is the
        one this tab shows (`seen`: another tab may have changed it since), and then the tab
        shows it as it is (`redrawn(bubbles, version)`: the event's outputs)."""
        try:
            stored = self.store.messages(user, conversation) if conversation else []
        except NotFound:  # (deleted in another tab: this one then shows no chat)
            raise Refusal(DELETED_BEFORE, redrawn([], None)) from None
        except StoreError as error:
            raise gr.Error(str(error)) from None
        if conversation and version_of(stored) != seen:
            raise Refusal(CHANGED_MEANWHILE, redrawn(chat_bubbles(stored), version_of(stored)))
        if not any(message["role"] == "user" for message in stored):
            raise gr.Error("There is no message to do that with.")
        return stored

    @staticmethod
    def _redrawn_turn(shown, version):
        """A refused begin_*'s outputs: the chat as it is now, no turn."""
        return gr.skip(), shown, None, gr.skip(), gr.skip(), gr.skip(), gr.skip(), version

    @staticmethod
    def _message_of_bubble(stored: list[dict], index) -> int | None:
        """The stored message that chat_bubbles drew as bubble `index`."""
        index = index[0] if isinstance(index, (list, tuple)) else index
        owners: list[int] = []
        chat_bubbles(stored, owners=owners)
        return owners[index] if isinstance(index, int) and 0 <= index < len(owners) else None

    def _begin(self, message, keep, conversation, user, kept, search, before=None, length=None, seen=None):
        """(conversation, chatbot, turn, kept, list, textbox, title, seen) for a turn that
        starts now: `message` after the first `keep` messages (all: None) of a conversation
        that has `length` messages now, `seen` its version (both checked again when the turn
        saves)."""
        if user is None:
            raise gr.Error("This page has lost its session (idle too long, or the server restarted): reload it.")
        message, title = with_well_formed_text(message), gr.skip()
        try:
            # full, or the message would fill it: refused now, not after a chat made for it, or an answer
            self.store.check_room(user, [without_refused_files(message)[0]])
            if conversation is not None and before is None:
                try:
                    before = self.store.messages(user, conversation)
                except NotFound:  # (deleted in another tab: a new message starts a new chat)
                    conversation = None
            if conversation is None:
                conversation = self.store.create(user, title_of(message))
                before = []
                title = gr.Textbox(value=self.store.title(user, conversation), interactive=True)
        except StoreError as error:
            raise gr.Error(str(error)) from None
        shown = [*chat_bubbles([*before, message], answering=True), *pending(THINKING_TITLE)]
        turn = {"message": message, "keep": keep, "length": length, "seen": seen}
        return (conversation, shown, turn, {**(kept or {}), "open": conversation},
                self.chat_list(user, conversation, search),
                gr.MultimodalTextbox(value=None, submit_btn=False, stop_btn=True), title, gr.skip())

    async def respond(self, turn, conversation, user, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                      max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0):
        """The turn: its message saved, then the answer streamed from the saved conversation,
        then saved (stopped: what was shown). Yields (the chat, the version it shows once saved)."""
        if not turn or not conversation:
            return
        self.answered.discard(conversation)
        answer, saved, asked, stopped = [], False, False, False
        await self.turns.acquire(conversation)
        halt = self.halts[(user, conversation)] = Halt()  # (one turn at a time per conversation)
        if self.stopping:
            halt(STOPPING)
        try:
            message, refusal = without_refused_files(turn["message"])
            try:
                # The chat before it: for an edit or a retry (checked against the tab; the title may
                # follow the first message), or one an undo left untitled; a message at the end of a
                # titled chat changes neither.
                title = self.store.title(user, conversation)
                before = self.store.messages(user, conversation) if turn["keep"] is not None or not title else None
                if turn.get("seen") is not None and version_of(before) != turn["seen"]:
                    raise StoreError(CHANGED_IN_STORE)  # (since the edit or retry began; the store checks the count)
                self.store.append(user, conversation, [message], keep=turn["keep"],
                                  expected_length=turn.get("length"))
                asked = True
                stored = self.store.messages(user, conversation)
                if before is not None:
                    self._title_follows(user, conversation, title, before, stored)
                if refusal is None and self.speech is not None and any(  # (saved first: a Stop meanwhile keeps it)
                        part["type"] == "audio" for part in stored[-1]["content"]):
                    yield [*chat_bubbles(stored, answering=True), *pending(TRANSCRIBING_TITLE)], gr.skip()
                    written, refusal = await self.transcribed(stored[-1])
                    if written is not stored[-1]:
                        self.store.append(user, conversation, [written], keep=len(stored) - 1, answer=True)
                        self.retitle_from_speech(user, conversation, stored[-1], written)
                if refusal is not None:
                    self.store.append(user, conversation, [failed(refusal)], answer=True)
                stored = self.store.messages(user, conversation)
            except StoreError as error:
                before = self.store.messages(user, conversation) if not isinstance(error, NotFound) else []
                told = bubble(DELETED_ELSEWHERE, title=NOTE_TITLE) if halt.why == DELETED else \
                    bubble(str(error), title=ERROR_TITLE)  # (deleted while its audio was written out)
                yield [*chat_bubbles([*before, message], answering=True), told], None  # (not as saved)
                self.answered.add(conversation)
                return
            shown = chat_bubbles(stored, answering=True)
            if refusal is not None:
                yield shown, version_of(stored)
                self.answered.add(conversation)
                return
            generation = self.generation_settings(len(shown), max_new_tokens, temperature, top_p)
            async with contextlib.aclosing(self.answer(for_the_model(stored, system_prompt), generation,
                                                       halt.signal)) as steps:
                async for progress in steps:
                    answer = progress.messages
                    yield [*shown, *chat_bubbles(answer, live=True), *pending(progress.pending)], gr.skip()
            saved = True
            if halt.why == DELETED:
                yield [*shown, *chat_bubbles(answer), bubble(DELETED_ELSEWHERE, title=NOTE_TITLE)], None
            elif answer or halt.why == STOPPING:
                if halt.why == STOPPING:
                    answer = cut_short(answer, APP_STOPPED)
                try:
                    self.store.append(user, conversation, settled(answer), answer=True)
                    yield [*shown, *chat_bubbles(answer)], version_of(self.store.messages(user, conversation))
                except NotFound:  # (deleted in another tab as the answer ended)
                    yield [*shown, *chat_bubbles(answer), bubble(DELETED_ELSEWHERE, title=NOTE_TITLE)], None
                except StoreError as error:
                    yield [*shown, *chat_bubbles(answer), bubble(f"This answer was not saved: {error}",
                                                                 title=ERROR_TITLE)], None
            else:
                yield chat_bubbles(stored), version_of(stored)
            self.answered.add(conversation)
        except (GeneratorExit, asyncio.CancelledError):  # Stop, New chat, a closed tab
            stopped = True
            raise
        finally:
            try:
                if halt.why == DELETED:
                    pass  # (nothing to keep it in)
                elif halt.why == STOPPING and asked and not saved:  # (the app stopping, and its tab gone)
                    self.store.append(user, conversation, cut_short(answer, APP_STOPPED), answer=True)
                elif answer and not saved:  # stopped: keep what was shown
                    self.store.append(user, conversation, settled(answer), answer=True)
                elif stopped and asked and not answer and not saved:  # before any text (in line, transcribing)
                    self.store.append(user, conversation, [{"role": "assistant", "content": [],
                                                            "notes": [STOPPED_BEFORE_TEXT]}], answer=True)
            except Exception as error:  # (a StoreError, or a bug of ours: the lock is released all the same)
                log.warning("a stopped answer was not saved: %s", error)
            finally:  # (out of halts only now: stop_answers waits for the save above)
                if self.halts.get((user, conversation)) is halt:
                    del self.halts[(user, conversation)]
                self.turns.release(conversation)

    def stop_answers(self, wait_s: float) -> int:
        """The app is stopping (Ctrl+C, SIGTERM): every answer in flight ends where it is and is
        saved as shown, with a note (APP_STOPPED); answers begun from now on too. Waits up to
        `wait_s` for them to be saved (called from another thread than the server's). Returns
        how many were not saved in time."""
        self.stopping = True
        for halt in list(self.halts.values()):
            halt(STOPPING)
        deadline = time.monotonic() + wait_s
        while self.halts and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(self.halts)

    def _title_follows(self, user: str, conversation: str, title: str, before: list[dict], after: list[dict]) -> None:
        """A title the user never renamed (`title` is `before`'s automatic_title) follows the
        chat's first message into `after`: an edit or an undo of that message, the first message
        of a chat an undo left empty; a renamed one stays. end_turn shows it."""
        if title == automatic_title(before) and (new := automatic_title(after)) != title:
            with contextlib.suppress(StoreError):  # (a title is not worth failing the turn)
                self.store.rename(user, conversation, new)
                self.retitled.add(conversation)

    def list_and_title(self, conversation, user, search):
        """The list, and the Title box, after an undo (which may change the title)."""
        self.retitled.discard(conversation)
        try:
            title = self.store.title(user, conversation) if conversation else gr.skip()
        except StoreError:
            title = gr.skip()
        return self.chat_list(user, conversation, search), title

    def retitle_from_speech(self, user: str, conversation: str, message: dict, written: dict) -> None:
        """A chat begun with audio alone (a voice message, an uploaded recording), still titled by
        its file ("🎤 audio.wav": every recording is named so), is titled by what was said."""
        said = " ".join(" ".join((part.get("transcript") or "").split())
                        for part in written["content"] if part["type"] == "audio").strip()
        if said and not text_of(message).strip() and \
                self.store.title(user, conversation) == title_of(message).strip()[:TITLE_CHARS]:
            self.store.rename(user, conversation, f"🎤 {said}")
            self.retitled.add(conversation)

    async def transcribed(self, message: dict) -> tuple[dict, str | None]:
        """The message with its audio written out (--asr-model) for a model that can't listen,
        or why it couldn't be (without --asr-model the engine refuses the audio, saying how)."""
        if self.speech is None or not any(part["type"] == "audio" for part in message["content"]):
            return message, None
        while not self.runner.loaded:  # (whether the model listens is known once it is loaded)
            await asyncio.sleep(0.2)
        try:
            return await self.speech.written_out(message, self.runner.info), None
        except ChatInputError as error:
            return message, str(error)

    async def end_turn(self, conversation, user, search, request: gr.Request = None):
        """After a turn: the list, the textbox back, the title if the turn changed it, and, when
        it was stopped, the chat drawn from the store once the stopped answer is saved (no
        spinner left turning; a Stop's save comes when Gradio has cancelled the turn, after
        Stop's own event). A tab that has moved on meanwhile (New chat, or another chat opened,
        stopped the turn) keeps what it shows, and its list marks that chat: the chat on screen
        is the one a message goes to. Gradio reads `conversation` as this event starts, so the
        tab's State is asked again after the wait."""
        shown = title = seen = gr.skip()
        if conversation and conversation not in self.answered:
            async with self.turns.held(conversation, STOP_SAVE_WAIT_S):
                try:
                    stored = self.store.messages(user, conversation)
                    shown, seen = chat_bubbles(stored), version_of(stored)
                except StoreError:
                    pass
        if (showing := state_now(self.demo, request, self.open_state, conversation)) != conversation:
            self.retitled.discard(conversation)
            return gr.skip(), self.chat_list(user, showing, search), gr.skip(), gr.skip(), gr.skip()
        if conversation in self.retitled:
            self.retitled.discard(conversation)
            with contextlib.suppress(StoreError):
                title = gr.Textbox(value=self.store.title(user, conversation), interactive=True)
        return shown, self.chat_list(user, conversation, search), idle_textbox(), title, seen

    # -- answering, for the browser and for /chat

    def generation_settings(self, messages_shown: int, max_new_tokens, temperature, top_p) -> GenerationSettings:
        # Gradio re-processes the whole chat on every update: fewer updates for long chats.
        updates_per_second = min(self.settings.max_updates_per_second,
                                 UPDATE_BUDGET_MESSAGES / max(1, messages_shown))
        return GenerationSettings(max_new_tokens=int(max_new_tokens or self.settings.max_new_tokens),
                                  temperature=float(temperature), top_p=float(top_p),
                                  max_updates_per_second=updates_per_second)

    async def answer(self, messages: list[dict], generation: GenerationSettings, gone: Signal | None = None):
        """Progress of the answer to `messages`. It waits its turn in the line (shared with
        the API), showing its place; on ZeroGPU Gradio's own queue orders the answers. Stop
        cancels the wait at once and tells the engine, which stops within one token; so does
        `gone` set (from another tab or thread), after which the answer ends as it is."""
        place = None
        if not self.zero_gpu:
            try:
                place = self.line.join("ui")
            except LineFull as full:
                yield Progress([failed(str(full))])
                return
        gone = gone or Signal()  # Stop, a closed tab: it withdraws the request, or stops its answer
        forget = gone.on_set(place.leave) if place is not None else None  # (leaving ends the wait)
        try:
            if place is not None:
                async for position in place.waiting():
                    yield Progress([], WAITING_TITLE.format(ordinal(position)))
                if gone.is_set():
                    return
            # (ZeroGPU runs the steps in a worker process of its own: nothing to call back there)
            if place is not None:
                generation = dataclasses.replace(generation, arrived_at=place.joined_at)
            steps = self.answer_steps(messages, generation) if self.zero_gpu else \
                self.answer_steps(messages, generation, gone, place.started, place.reading_files)
            while (progress := await anyio.to_thread.run_sync(next, steps, None, abandon_on_cancel=True)) is not None:
                yield progress
        finally:
            if forget is not None:
                forget()
            gone.set()
            if place is not None:
                place.leave()

    async def ask(self, message: str, images: list[str] | None = None, system_prompt: str = "",
                  max_new_tokens: int = 512, temperature: float = 0.0) -> str:
        """Ask the local model something and get its whole answer (it may use the app's tools).

        Args:
            message: What to ask the model.
            images: Pictures for the model to look at, each a data: URL (data:image/png;base64,...); a vision model only.
            system_prompt: Instructions for the model (optional).
            max_new_tokens: The longest answer, in tokens.
            temperature: 0 for the most likely answer; higher for more varied ones (at most 2).

        Returns:
            The model's answer.
        """
        images = list(images or [])
        if images and not self.runner.is_vision:
            raise AskRefused(f"This model ({self.runner.name}) is text-only and can't see images.")
        if len(images) > self.settings.max_images_per_message:
            raise AskRefused(f"At most {self.settings.max_images_per_message} images.")
        parts = []
        for i, url in enumerate(images):
            try:
                image = await anyio.to_thread.run_sync(decode_image, str(url), f"images[{i}]", self.settings)
            except APIError as error:
                raise AskRefused(f"images[{i}]: {error}") from None
            parts.append({"type": "image", "image": image})
        if not (message or "").strip() and not parts:
            raise AskRefused("The message is empty.")
        if not 1 <= int(max_new_tokens) <= self.settings.max_new_tokens_limit or not 0 <= float(temperature) <= 2:
            raise AskRefused(f"max_new_tokens must be 1 to {self.settings.max_new_tokens_limit}, temperature 0 to 2.")
        asked = {"role": "user", "content": [*parts, *([{"type": "text", "text": message}] if message else [])]}
        generation = self.generation_settings(1, max_new_tokens, temperature, 1.0)
        answer = []
        async with contextlib.aclosing(self.answer(for_the_model([asked], system_prompt), generation)) as steps:
            async for progress in steps:
                answer = progress.messages
        errors = [message["error"] for message in answer if message.get("error")]
        if errors or not answer:
            raise AskRefused(errors[-1] if errors else "No answer.")
        if not text_of(answer[-1]) and answer[-1].get("notes"):  # (e.g. stopped at the tool-step limit)
            raise AskRefused(" ".join(answer[-1]["notes"]))
        return text_of(answer[-1])

    async def api_chat(self, message, history, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                       max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0):
        """/chat (gradio_client): the growing answer's bubbles. Its conversation is the API
        session's own (a State, in the kept form, tool calls and all), not saved in the store."""
        history = list(history or [])
        asked, refusal = await self.transcribed(user_message(message))
        if refusal is not None:
            yield bubble(refusal, title=ERROR_TITLE), [*history, asked, failed(refusal)]
            return
        answer = []
        generation = self.generation_settings(len(history), max_new_tokens, temperature, top_p)
        async with contextlib.aclosing(self.answer(for_the_model([*history, asked], system_prompt),
                                                   generation)) as steps:
            async for progress in steps:
                answer = progress.messages
                response = [*chat_bubbles(answer, live=True), *pending(progress.pending)]
                yield response[0] if len(response) == 1 else response, [*history, asked, *settled(answer)]

    api_chat._mcp_type = "gradio_client only"  # (Gradio's MCP server would list it too: its tool is `ask`)


def build_demo(runner, line: WaitingLine | None = None, settings: Settings | None = None,
               toolbox: Toolbox | None = None, store: ConversationStore | None = None, where: str = "",
               speech: Speech | None = None):
    """The chat UI on `runner`: its messages wait in `line` (shared with the API); its
    conversations are kept in `store` (default: a temporary one, gone when the app stops);
    `speech` (--asr-model) writes out audio for a model that can't listen."""
    settings = settings or Settings()
    line = line or waiting_line_for(runner, settings)
    if store is None:
        store, where = open_store(settings.replace(save=False))
    hf_oauth = users.oauth_on_space()
    chats = Chats(runner, line, settings, store, where, BrowserIds.kept_in(store), toolbox=toolbox,
                  hf_oauth=hf_oauth, speech=speech)
    # ZeroGPU: one answer at a time, in Gradio's queue. Elsewhere every message enters the
    # chat function at once and waits in the app's line (with the API's requests).
    concurrency = 1 if chats.zero_gpu else None
    with gr.Blocks(title="Local model chat", fill_height=True) as demo:
        user, conversation, turn = gr.State(None), gr.State(None), gr.State(None)
        seen = gr.State(None)  # the version of the saved chat this tab shows (version_of): what an edit changes
        chats.open_state = conversation
        api_history = gr.State([])
        kept = gr.BrowserState({}, storage_key="local-model-chat", secret=chats.browser_ids.storage_secret)
        kept_settings = gr.BrowserState({}, storage_key="local-model-chat-settings",  # (the Settings panel's)
                                        secret=chats.browser_ids.storage_secret)
        with gr.Sidebar(label="Chats", open=False, elem_id="chats") as sidebar:
            new_chat = gr.Button("➕ New chat", variant="primary")
            if hf_oauth:
                gr.LoginButton()
            search = gr.Textbox(placeholder="🔍 Search chats", show_label=False, container=False, max_lines=1)
            chat_list = gr.Radio(choices=[], label="Chats", elem_id="chat-list")
            with gr.Accordion("This chat", open=False):
                title = gr.Textbox(label="Title", max_lines=1, interactive=False)
                with gr.Row():
                    rename = gr.Button("Rename", size="sm")
                    export = gr.Button("Export", size="sm")
                    delete = gr.Button("🗑 Delete", size="sm", variant="stop")
                with gr.Row(visible=False) as confirm_delete:
                    gr.Markdown("Delete this chat? It can't be undone.")
                    really_delete = gr.Button("Delete it", size="sm", variant="stop")
                    keep_it = gr.Button("Keep it", size="sm")
                exported = gr.File(label="Markdown and JSON", file_count="multiple", visible=False)
            import_chat = gr.UploadButton("Import a chat (JSON)", file_types=[".json"], size="sm")
            gr.Markdown(where, elem_id="where-chats-live")
        gr.Markdown("# Local model chat")
        header = gr.Markdown(header_markdown(runner, toolbox, speech))
        chatbot = cache_history_postprocessing(gr.Chatbot(
            label="Chat", height="65vh", editable="user", elem_id="chat",
            examples=chatbot_examples(chats),
            latex_delimiters=[{"left": "$$", "right": "$$", "display": True},
                              {"left": "$", "right": "$", "display": False}]))
        textbox = gr.MultimodalTextbox(
            file_types=UPLOAD_TYPES, file_count="multiple", sources=["upload", "microphone"], show_label=False,
            elem_id="chat-input", placeholder="Type a message; attach images, documents, audio or video, or record…",
            submit_btn=True, stop_btn=False)
        with gr.Accordion("Settings", open=False):
            system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=2)
            max_new_tokens = gr.Slider(1, settings.max_new_tokens_limit, value=settings.max_new_tokens, step=1,
                                       label="Max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
        api_response = gr.JSON(visible=False)
        api_button = gr.Button(visible=False)
        window_width = gr.Number(visible=False)

        hidden = {"api_visibility": "undocumented"}
        quick = {"queue": False, **hidden}
        refusals = UnqueuedRefusals()  # (Gradio 6.31's page shows no message for an unqueued event's gr.Error)

        def quick_event(trigger, fn, inputs, outputs, **options):
            """An instant event whose refusal (gr.Error) shows as a toast, the outputs as they were."""
            return refusals.shown(trigger(refusals.noting(fn), inputs, outputs, **quick, **options), outputs)

        begun = [conversation, chatbot, turn, kept, chat_list, textbox, title, seen]
        answer_inputs = [turn, conversation, user, system_prompt, max_new_tokens, temperature, top_p]
        opened = [conversation, chatbot, turn, kept, chat_list, title, exported, seen]
        answering = []
        for begin in (quick_event(textbox.submit, chats.begin_turn, [textbox, conversation, user, kept, search], begun),
                      quick_event(chatbot.example_select, chats.begin_example, [conversation, user, kept, search], begun),
                      quick_event(chatbot.retry, chats.begin_retry, [conversation, user, kept, search, seen], begun),
                      quick_event(chatbot.edit, chats.begin_edit, [conversation, user, kept, search, seen], begun)):
            respond = begin.success(chats.respond, answer_inputs, [chatbot, seen], concurrency_limit=concurrency,
                                    concurrency_id=GENERATION_CONCURRENCY_ID, show_progress="hidden", **hidden)
            quick_event(respond.then, chats.end_turn, [conversation, user, search],
                        [chatbot, chat_list, textbox, title, seen])
            answering.append(respond)
        textbox.stop(None, cancels=answering, **quick)  # (the turn's end_turn redraws the chat)
        quick_event(chatbot.undo, chats.undo, [conversation, user, seen], [chatbot, textbox, seen]) \
            .success(chats.list_and_title, [conversation, user, search], [chat_list, title], **quick)
        for action in (new_chat.click, chatbot.clear):  # (the chat's trash icon starts a new one; Delete deletes)
            quick_event(action, chats.new_chat, [user, kept, search], opened, cancels=answering) \
                .then(idle_textbox, None,
                      [textbox], **quick)
        quick_event(chat_list.input, chats.open_chat, [chat_list, user, kept, search], opened, cancels=answering) \
            .then(idle_textbox, None,
                  [textbox], **quick)
        quick_event(search.change, chats.chat_list, [user, conversation, search], [chat_list])
        quick_event(functools.partial(gr.on, [rename.click, title.submit]), chats.rename,
                    [title, conversation, user, search], [chat_list, title])
        quick_event(export.click, chats.export, [conversation, user], [exported])
        delete.click(lambda: gr.Row(visible=True), None, [confirm_delete], **quick)
        keep_it.click(lambda: gr.Row(visible=False), None, [confirm_delete], **quick)
        quick_event(really_delete.click, chats.delete, [conversation, user, kept, search], opened, cancels=answering) \
            .then(lambda: (gr.Row(visible=False), idle_textbox()),
                  None, [confirm_delete, textbox], **quick)
        quick_event(import_chat.upload, chats.import_chat, [import_chat, user, kept, search], opened,
                    cancels=answering)

        # /chat for gradio_client: (message, system_prompt, max_new_tokens, temperature, top_p)
        api_button.click(chats.api_chat, [textbox, api_history, system_prompt, max_new_tokens, temperature, top_p],
                         [api_response, api_history], api_name="chat", concurrency_limit=concurrency,
                         concurrency_id=GENERATION_CONCURRENCY_ID, postprocess=False)

        if settings.mcp_server:  # the chat as one MCP tool (Gradio's MCP server lists public endpoints)
            # (queue=False: Gradio's MCP server then calls it directly, not through a loopback client that
            # --auth would stop; the app's own line orders it with the chat's and /v1's questions)
            gr.api(chats.ask, api_name="ask", queue=False)

        # The Settings panel as this browser left it: kept as typed, restored on the next page.
        generation_inputs = [system_prompt, max_new_tokens, temperature, top_p]
        gr.on([box.input for box in generation_inputs], lambda *values: dict(zip(SETTINGS_KEPT, values)),
              generation_inputs, [kept_settings], **quick)
        demo.load(functools.partial(restored_settings, panel=generation_inputs), [kept_settings], generation_inputs,
                  **quick)

        start = chats.start_session_with_hf if hf_oauth else chats.start_session
        quick_event(demo.load, start, [kept], [user, conversation, seen, kept, chatbot, chat_list])
        # The list beside the chat on a wide screen; on a phone folded behind its button, so
        # the chat starts at the top of the screen.
        demo.load(None, js=keep_reading_js("chat"), **quick)  # (scrolled up mid-answer: the reader stays there)
        demo.load(lambda width: gr.Sidebar(open=bool(width and width > SIDEBAR_MIN_WIDTH)), [window_width], [sidebar],
                  js="() => [window.innerWidth]", **quick)
        # On a phone the list then folds away to show the chat chosen. In the page: Gradio 6.31's sidebar
        # keeps its toggle's state to itself, so a server's open=False after a toggle changes nothing.
        for choosing in (new_chat.click, chat_list.input):
            choosing(None, js=f"""() => {{ if (window.innerWidth <= {SIDEBAR_MIN_WIDTH})
                document.querySelector('#chats.open > button.toggle-button')?.click(); }}""", **quick)
        def settling() -> bool:  # the model loading, or an MCP server on its first start
            return not runner.loaded or (toolbox is not None and toolbox.starting)

        if settling():  # refresh the header until the model is ready and the MCP servers have started
            timer = gr.Timer(1.0)

            def refresh_header():
                return header_markdown(runner, toolbox, speech), gr.Timer(active=settling())

            def refresh_header_and_examples():  # (a page opened while a text-only model loaded: its picture
                examples = chatbot_examples(chats)                 # examples go; a prop update, so only then)
                return *refresh_header(), \
                    gr.Chatbot(examples=examples) if len(examples) < len(chats.examples) else gr.skip()

            timer.tick(refresh_header_and_examples, outputs=[header, timer, chatbot], **quick)
            demo.load(refresh_header, outputs=[header, timer], **quick)
            if not runner.loaded:  # pages opened once it has loaded get its examples from the start
                runner.ready.on_set(lambda: examples_in_config(demo, chatbot, chatbot_examples(chats)))
    demo.chats, chats.demo = chats, demo  # (tests reach the events and the store through them)
    return demo


SETTINGS_KEPT = ("system_prompt", "max_new_tokens", "temperature", "top_p")


def restored_settings(kept, panel: list) -> tuple:
    """The Settings panel's values (SETTINGS_KEPT, its components in `panel`) a browser kept;
    one missing, or outside its slider now (another version of the app, a lower limit), stays
    as the panel has it."""
    kept = kept if isinstance(kept, dict) else {}
    values = []
    for name, component in zip(SETTINGS_KEPT, panel):
        value = kept.get(name)
        if isinstance(component, gr.Slider):
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                component.minimum <= value <= component.maximum
            values.append((int(value) if component.step == 1 else float(value)) if fits else gr.skip())
        else:
            values.append(value if isinstance(value, str) else gr.skip())
    return tuple(values)


def chatbot_examples(chats: Chats) -> list[dict]:
    return [{"text": e["text"], "files": list(e["files"]), "display_text": e["label"]}
            for e in chats.examples_for_the_model()]


def examples_in_config(demo: gr.Blocks, chatbot: gr.Chatbot, examples: list[dict]) -> None:
    """The chatbot's starter examples as the page gets them (Gradio serves `demo.config`,
    made at launch, to every page that opens)."""
    chatbot.examples = examples
    chatbot._setup_examples()  # (their pictures served as files)
    for component in (demo.config or {}).get("components", ()):
        if component.get("id") == chatbot._id:
            component["props"]["examples"] = chatbot.examples


def header_markdown(runner, toolbox: Toolbox | None = None, speech: Speech | None = None) -> str:
    if not runner.loaded:
        return f"**{runner.name or 'model'}** · ⏳ loading model…"
    tools = ""
    if toolbox is not None:
        tools = f" · 🛠 tools: {', '.join(toolbox.where())}" if runner.supports_tools else \
            f" · 🛠 tools off: {runner.info.tools_off.split(' (')[0] or 'this model does not take them'}"
    info = runner.info
    kind = "vision-language" if info.is_vision else "audio-language" if info.hears_audio else "text-only"
    kind += " · hears audio" if info.is_vision and info.hears_audio else ""
    kind += " · takes video" if info.sees_video else ""
    dtype = info.dtype
    if info.quantization == "4bit":
        dtype = f"4bit (bitsandbytes NF4, {dtype} compute)"
    elif info.quantization:
        dtype = f"{info.quantization} (bitsandbytes)"
    compiled = " · compiled" if info.compile else ""
    local = info.device in ("cpu", "cuda", "mps")  # (a remote server batches in its own way)
    batched = " · batched" if local and info.batching else ""
    speech = f" · 🎤 speech written out by {speech.model}" if speech is not None and not info.hears_audio else ""
    return f"**{info.name}** · {kind} · {info.device} · {dtype}{compiled}{batched}{tools}{speech}"


def waiting_line_for(runner, settings: Settings | None = None) -> WaitingLine:
    """The one line to `runner` for the UI and the API, told when each answer ends."""
    settings = settings or Settings()
    line = WaitingLine(one_at_a_time=lambda: runner.one_at_a_time, max_waiting=settings.queue_max_size,
                       max_waiting_per_kind={"api": settings.api_max_waiting_requests})
    runner.finish_listeners.append(line.stream_finished)
    return line


def on_zero_gpu() -> bool:
    """On a ZeroGPU Space (`spaces` importable and SPACES_ZERO_GPU set) each answer runs
    on a GPU borrowed by `@spaces.GPU`; everywhere else nothing changes."""
    if os.environ.get("SPACES_ZERO_GPU", "").strip().lower() not in ("1", "true", "yes", "on"):
        return False  # (the platform's variable, not one of our settings)
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- serve: the UI, /v1, /healthz and /metrics on one server

class AskRefused(gr.Error):
    """`ask`'s refusal: an MCP client reads str(error), which gr.Error puts in quotes."""

    def __str__(self) -> str:
        return self.message


class CantServe(Exception):
    """The server can't listen where it was told (a port in use...): one line."""


def why_not_listening(settings: Settings, error: OSError) -> str:
    """Why the server could not listen, asked of the system (Gradio's error says the same for all)."""
    import errno
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
            probe.bind((settings.host, settings.port))
        return "the port was taken as the server started: try again, or choose another with --port"
    except OSError as refused:
        error = refused
    except (OverflowError, ValueError) as refused:
        return str(refused)
    if error.errno == errno.EADDRINUSE:
        return "the port is in use (another app?): choose another with --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return "that address is not one of this machine's (--host)"
    if error.errno == errno.EACCES:
        return "not allowed (ports below 1024 need administrator rights): choose another with --port"
    return first_line(error)


def serve(runner, settings: Settings | None = None, *, block: bool = True, quiet: bool = False,
          on_listening=None, toolbox: Toolbox | None = None, **overrides):
    """Launch the UI and, on the same server, /v1 (OpenAI API), /healthz and /metrics, as
    `settings` say (host, port, share, auth, api_key, max_new_tokens, queue_max_size,
    log_chats, data_dir, save, ...; `overrides` replace single ones). Returns (demo,
    local_url); with block=True only when the server stops. Raises StoreError when the
    saved chats can't be opened, ValueError for a login that can't be read."""
    settings = (settings or Settings()).replace(**overrides)
    logins = users.read_logins(settings.auth, settings.auth_file)
    store, where = open_store(settings)
    line = waiting_line_for(runner, settings)
    if settings.mcp_server and (why := mcp_server_refusal(settings)):
        log.warning("The MCP server (--mcp-server) is off: %s", why)
        settings = settings.replace(mcp_server=False)
    speech = None
    if settings.asr_model:
        from speech import Speech
        speech = Speech.start(settings.asr_model, settings.device)
    with gradio_app_built_at_launch_only():
        demo = build_demo(runner, line, settings, toolbox=toolbox, store=store, where=where, speech=speech)
        demo.queue(max_size=settings.queue_max_size)
    wake_queue_on_events(demo)  # instead of polling for work every 1 ms, idle or not
    patient_launch_check()  # (a busy machine can take more than launch's one 3 s try to answer it)
    if settings.log_chats:  # off by default: prompts and answers are the users' business
        runner.finish_listeners.append(log_exchange)
    # (Gradio's own queue holds chat events only on ZeroGPU; elsewhere they wait in the line.)
    metrics = Metrics(runner, waiting=lambda: line.waiting + ui_queue_depth(demo))
    try:
        server, local_url, share_url = demo.launch(
            server_name=settings.host, server_port=settings.port, share=settings.share,
            auth=list(logins.items()) or None, allowed_paths=[str(store.images)], css=CSS,
            max_file_size=settings.max_upload_size, max_threads=settings.queue_max_size + GRADIO_EXTRA_THREADS,
            prevent_thread_lock=True, quiet=quiet, mcp_server=settings.mcp_server,
            app_kwargs={"middleware": [Middleware(KeyForMcp, key=settings.api_key)]} if settings.mcp_server else None)
    except OSError as error:  # (Gradio says "Cannot find empty port ... pass server_port to launch()" for any)
        raise CantServe(f"Can't serve on {settings.host}:{settings.port}: {why_not_listening(settings, error)}.") \
            from None
    if settings.mcp_server:
        log.info("The chat is an MCP tool at %sgradio_api/mcp/%s.", local_url,
                 " (with 'Authorization: Bearer' and the API key)" if settings.api_key else "")
    if settings.share:
        if share_url:
            log.info("Public link (valid 1 week, while this app runs): %s", share_url)
        else:
            log.warning("Could not create the public share link (is this machine offline?); "
                        "the app keeps running locally at %s", local_url)
    if on_listening:
        on_listening()

    api_open = settings.api_key is None and is_loopback(settings.host) and not settings.share
    api = create_api(runner, line, settings, open_without_key=api_open, speech=speech)
    server.mount("/v1", api)
    demo.stop_api_answers = api.stop_answers  # (main, when the app stops)
    server.add_api_route("/healthz", lambda: health(runner), methods=["GET"])
    server.add_api_route("/metrics", lambda: Response(metrics.render(), media_type=metrics.content_type),
                         methods=["GET"])
    if settings.api_key is None and not api_open:
        log.warning("The OpenAI API (/v1) is off: the server is reachable from the network; "
                    "start with --api-key KEY to turn it on.")
    if block:
        demo.block_thread()
    return demo, local_url


def health(runner) -> JSONResponse:
    """/healthz: "ok", "loading" (both 200), or "unavailable" (503) with the runner's problem
    (a remote server unreachable, an engine process being replaced after a crash)."""
    problem = runner.problem if runner.loaded else None
    info = runner.info
    if problem:  # (its record is the engine's that died, or a server's that can't be reached: no model answers)
        info = dataclasses.replace(info, loaded=False, loop_thread=None, torch_threads=None)
    return JSONResponse({
        "status": "unavailable" if problem else "ok" if info.loaded else "loading", "problem": problem,
        "model": info.name, "device": info.device, "dtype": info.dtype, "loaded": info.loaded,
        "runner": dataclasses.asdict(info)}, status_code=503 if problem else 200)


def mcp_server_refusal(settings: Settings) -> str | None:
    """Why --mcp-server stays off (None: it may run). Like /v1: on a network address, or with
    --share, only with an API key, which MCP clients send as 'Authorization: Bearer KEY'."""
    if settings.api_key is None and not (is_loopback(settings.host) and not settings.share):
        return ("the server is reachable from the network; start with --api-key KEY to turn it on (MCP clients "
                "send it as 'Authorization: Bearer KEY').")
    return None


class KeyForMcp:
    """The MCP endpoint (/gradio_api/mcp/...) answers only with 'Authorization: Bearer KEY'
    when the server has an API key (ASGI middleware: the rest of the app is untouched)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"].startswith("/gradio_api/mcp"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                response = JSONResponse({"error": "The MCP endpoint needs 'Authorization: Bearer KEY' (--api-key)."},
                                        status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def log_exchange(stream) -> None:
    log.info("chat: %r -> %r (%s, %d tokens)", stream.request_text, stream.text,
             stream.finish_reason, stream.new_tokens)


def ui_queue_depth(demo) -> int:
    """Chat events held in Gradio's own queue (on ZeroGPU; elsewhere they wait in the line)."""
    queue = getattr(demo, "_queue", None)
    event_queue = queue and queue.event_queue_per_concurrency_id.get(GENERATION_CONCURRENCY_ID)
    return len(event_queue.queue) if event_queue else 0


class ModelSlot(DescribedByInfo):
    """Stands in for the runner while the model loads in a background thread, so the UI
    answers at once and shows "loading model…". Requests made meanwhile wait for it.
    `name` is the served name when it is known before loading (None: the server's choice)."""

    def __init__(self, name: str | None, load, *, one_at_a_time: bool):
        self._loading = RunnerInfo(name=name, device="loading model…", batching=not one_at_a_time, loaded=False)
        self.runner = None
        self.error: BaseException | None = None
        self.ready = Signal()
        self.finish_listeners: list = []  # handed to the runner once it exists
        self._load = load

    def start(self) -> "ModelSlot":
        threading.Thread(target=self._run, name="load-model", daemon=True).start()
        return self

    def _run(self):
        try:
            runner = self._load()
            runner.finish_listeners.extend(self.finish_listeners)
            self.finish_listeners = runner.finish_listeners
            self.runner = runner
        except BaseException as error:
            self.error = error
        finally:
            self.ready.set()

    @property
    def info(self) -> RunnerInfo:
        return self.runner.info if self.runner is not None else self._loading

    @property
    def active(self) -> int:
        return self.runner.active if self.runner else 0

    @property
    def problem(self) -> str | None:
        return self.runner.problem if self.runner else None

    def stream(self, messages, settings=None, cancelled: Signal | None = None, on_reading=None):
        wait_for_either(self.ready, cancelled)
        if not self.ready.is_set():
            raise Cancelled()
        if self.runner is None:
            raise GenerationError(f"The model failed to load: {self.error}")
        return self.runner.stream(messages, settings, cancelled=cancelled, on_reading=on_reading)


# ---------------------------------------------------------------- main

def _stop_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    settings = config.read_settings(argv)  # resolved once, then handed to everything
    # SIGTERM (docker stop, systemd, a Space restarting) ends the app as Ctrl+C does: the
    # server closes and the at-exit work runs (stdio MCP servers stopped, scratch folders
    # removed), which Python's default for SIGTERM skips.
    signal.signal(signal.SIGTERM, _stop_as_ctrl_c)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for chatty in ("httpx", "openai", "httpcore"):  # one line per request/retry otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if settings.backend == "openai":
        slot = ModelSlot(settings.served_model_name or settings.model,
                         lambda: RemoteRunner(settings.base_url, settings), one_at_a_time=False)
    else:
        model = settings.model or config.DEFAULT_MODEL
        if on_zero_gpu():  # the GPU is lent per answer: no compile at load (auto), no batching
            settings = settings.replace(compile="off" if settings.compile == "auto" else settings.compile,
                                        batching="off")
        settings = settings.replace(model=model, served_model_name=settings.served_model_name or
                                    served_model_name(model))

        def load():
            if settings.in_process or on_zero_gpu():  # ZeroGPU runs the chat fn in its own GPU worker
                from model_runner import ModelRunner
                return ModelRunner.load(settings=settings)
            return EngineProcess.start(settings=settings)
        slot = ModelSlot(settings.served_model_name, load, one_at_a_time=True)
    try:
        users.read_logins(settings.auth, settings.auth_file)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    toolbox = None
    if settings.tools or settings.mcp_config:
        try:
            toolbox = Toolbox.load(settings.tools or [], settings.mcp_config)
        except (ToolsError, McpConfigError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        atexit.register(toolbox.close)  # (stdio MCP servers stop with the app)
    if settings.share and not (settings.auth or settings.auth_file):
        log.warning("warning: --share without --auth: anyone with the link can use this machine's compute.")
    # The UI first (importing gradio takes seconds), then the model: loading both at once
    # would only make them fight for the GIL.
    try:
        demo, _ = serve(slot, settings, block=False, on_listening=slot.start, toolbox=toolbox)
    except (StoreError, CantServe) as error:  # (a corrupt or newer database: one line, the file kept)
        print(f"error: {error}", file=sys.stderr)
        return 1
    slot.ready.wait()
    if slot.error is not None:
        message = str(slot.error) if isinstance(slot.error, ModelLoadError) else \
            f"Can't load the model: {type(slot.error).__name__}: {slot.error}"
        print(f"error: {message}", file=sys.stderr)
        demo.close()
        return 1
    log.info("Model ready: %s on %s (%s).", slot.name, slot.device, slot.dtype)
    log.info("%s Data directory: %s", demo.chats.where, demo.chats.store.directory)
    if toolbox is not None:
        if slot.supports_tools:
            log.info("Tools for the chat: %s (%s).", ", ".join(toolbox.names) or "none yet",
                     "; ".join(toolbox.where()))
        else:
            log.warning("Tools are off for %s: %s.", slot.name, slot.info.tools_off or "it does not take them")
    try:
        while demo.is_running:  # (Gradio's block_thread, which closes the server before the answers are kept)
            time.sleep(0.1)
    except KeyboardInterrupt:  # Ctrl+C, SIGTERM: the answers being written are kept as far as they got
        for stop in (signal.SIGINT, signal.SIGTERM):  # (a second Ctrl+C must not cut the saving short)
            signal.signal(stop, lambda *_: log.info("Stopping already: saving the answers being written first "
                                                    "(%g s at most).", STOP_SAVE_WAIT_S))
        deadline = time.monotonic() + STOP_SAVE_WAIT_S
        demo.stop_api_answers(0)  # (every /v1 answer told at once; its responses sent while the chat's are saved)
        if left := demo.chats.stop_answers(STOP_SAVE_WAIT_S):
            log.warning("Stopping: %d answer(s) could not be saved in time.", left)
        if left := demo.stop_api_answers(max(0.0, deadline - time.monotonic())):
            log.warning("Stopping: %d API response(s) could not be ended in time.", left)
        demo.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # (Ctrl+C or SIGTERM before the server was up: no traceback)
        sys.exit(130)
