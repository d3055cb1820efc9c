"""Chat with a local Hugging Face model — text and images — streamed token by token.

Launch:
    python app.py                                   # default model (SmolVLM-256M-Instruct)
    python app.py --model HuggingFaceTB/SmolVLM-500M-Instruct --device cuda
    python app.py --model ./my-local-model --share --auth me:secret
    python app.py --model Qwen/Qwen2.5-1.5B-Instruct --tools my_tools.py --tools builtin
    python app.py --help                            # every option and its environment variable

Endpoints (same server):
    /                  the chat UI
    /chat (Gradio API) gradio_client: Client(url).submit({"text": ..., "files": [handle_file(p)]},
                       system_prompt, max_new_tokens, temperature, top_p, api_name="/chat")
                       streams the growing answer; job.cancel() stops generation.
    /v1/chat/completions, /v1/models   OpenAI-compatible API (see openai_api.py)
    /healthz           model, device, loaded, and the runner record (engine_contract.RunnerInfo)
    /metrics           Prometheus metrics
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import mimetypes
import os
import re
import sys
import time

import anyio
import gradio as gr
from fastapi.responses import Response

import config
from config import Settings
from engine_contract import (
    Cancelled,
    ChatInputError,
    DescribedByInfo,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    RunnerInfo,
    Signal,
    ToolCall,
    served_model_name,
    wait_for_either,
)
from engine_process import EngineProcess
from gradio_fixes import cache_history_postprocessing, gradio_app_built_at_launch_only, wake_queue_on_events
from metrics import Metrics
from openai_api import create_api
from remote_backend import RemoteRunner
from starter_examples import starter_examples
from tools import Toolbox, ToolResult, ToolsError
from waiting_line import LineFull, WaitingLine

GENERATION_CONCURRENCY_ID = "generate"  # the chat's events (submit, retry, edit, /chat)
# Updates per second × messages in the chat stays under this (30/s up to 26 messages, 8/s at
# 100, 2/s at 400): Gradio walks the whole chat on every update (README, Performance).
UPDATE_BUDGET_MESSAGES = 800
# Gradio runs at most this many events at once (its thread limit); the chat's wait in the
# app's own line, so there is room for all of them plus a few of Gradio's own.
GRADIO_EXTRA_THREADS = 8
DEFAULT_SYSTEM_PROMPT = ""

THINKING_TITLE = "Thinking…"
LOADING_TITLE = "Loading the model…"
WAITING_TITLE = "⏳ {} in line for the model"
ERROR_TITLE = "⚠️ Error"
NOTE_TITLE = "ℹ️ Note"
REASONING_TITLE = "Thinking"
STATS_PREFIX = "⏱ "
TOOL_TITLE = "🛠 {}"   # a tool call's bubble: its arguments and result inside
CALLING_TITLE = "🛠 calling a tool…"

log = logging.getLogger("app")


# ---------------------------------------------------------------- the chat: Gradio's history and the new message in, the answer's bubbles out

def to_model_messages(history: list[dict], message: dict | str, system_prompt: str = "") -> list[dict]:
    """The one place where Gradio's chat (history + the new message) becomes model messages.

    History comes in two shapes: the browser sends normalised blocks
    (`content: [{"type": "text", ...} | {"type": "file", "file": {"path", "mime_type"}}]`),
    API clients the raw state (`content: [{"path": ...}, "hi"]` or a plain string).
    Messages carrying a metadata title (the Thinking… indicator, error notes, reasoning) are
    annotations for the reader, not part of the conversation, except a tool call's bubble,
    which becomes the assistant's call and the tool's result again. A user message that got
    no answer (refused, failed, or stopped before any text) is left out: the model never
    sees a refused turn, and one can't block the turns after it.
    """
    if isinstance(message, str):
        message = {"text": message, "files": []}
    files = [{"path": f} if isinstance(f, str) else f for f in message.get("files") or []]
    new_turn = {"role": "user", "content": [*files, message.get("text") or ""]}
    turns: list[dict] = []
    for turn in [*(history or []), new_turn]:
        role = turn.get("role")
        metadata = turn.get("metadata") or {}
        call = tool_call_of(turn) if role == "assistant" else None
        if call is not None:
            call, result = call
            turns.append({"role": "assistant", "content": [], "tool_calls": [call]})
            turns.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                          "content": [{"type": "text", "text": result}]})
            continue
        if role not in ("user", "assistant") or metadata.get("title"):
            continue
        parts = [p for p in map(_to_part, _as_list(turn.get("content"))) if p]
        if parts or turn is new_turn:  # an empty new message stays, for the engine to refuse
            turns.append({"role": role, "content": parts})
    answered = [turn for turn, after in zip(turns, [*turns[1:], None])
                if turn["role"] != "user" or after is None or after["role"] != "user"]
    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt.strip()}]}] \
        if system_prompt and system_prompt.strip() else []
    return system + answered


def tool_bubble(call: ToolCall, result: ToolResult | None):
    """A tool call in the chat: titled with the tool's name, pending while it runs, then done
    with its duration; the arguments and the result inside (collapsible)."""
    arguments = json.dumps(call.arguments, ensure_ascii=False, indent=1)
    content = f"**Arguments**\n```json\n{arguments}\n```"
    metadata = {"title": TOOL_TITLE.format(call.name), "id": call.id, "status": "pending"}
    if result is not None:
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", result.text)), default=0))
        content += f"\n**Result**\n{fence}\n{result.text}\n{fence}"
        metadata.update(status="done", duration=round(result.seconds, 2))
    return gr.ChatMessage(content=content, metadata=metadata)


_TOOL_ARGUMENTS = re.compile(r"\*\*Arguments\*\*\n```json\n(.*?)\n```", re.DOTALL)
_TOOL_RESULT = re.compile(r"\*\*Result\*\*\n(`{3,})\n(.*?)\n\1", re.DOTALL)


def tool_call_of(turn: dict) -> tuple[ToolCall, str] | None:
    """A tool bubble of the history → (the call, its result), or None for any other turn."""
    title = (turn.get("metadata") or {}).get("title") or ""
    prefix = TOOL_TITLE.format("")
    if not title.startswith(prefix) or title == CALLING_TITLE:
        return None
    content = turn.get("content")
    text = content if isinstance(content, str) else " ".join(
        item if isinstance(item, str) else item.get("text", "") for item in _as_list(content)
        if isinstance(item, (str, dict)))
    arguments = _TOOL_ARGUMENTS.search(text or "")
    try:
        parsed = json.loads(arguments.group(1)) if arguments else {}
    except ValueError:
        parsed = {}
    result = _TOOL_RESULT.search(text or "")
    call_id = (turn.get("metadata") or {}).get("id")
    call = ToolCall(title[len(prefix):], parsed if isinstance(parsed, dict) else {},
                    **({"id": call_id} if call_id else {}))
    return (call,
            result.group(2) if result else "error: the call was stopped before it returned")


def _as_list(content) -> list:
    if content is None:
        return []
    return content if isinstance(content, list) else [content]


def _to_part(item) -> dict | None:
    if isinstance(item, str):
        return {"type": "text", "text": item} if item.strip() else None
    if not isinstance(item, dict):
        return None
    if item.get("type") == "text":
        return {"type": "text", "text": item["text"]} if item.get("text", "").strip() else None
    file = item.get("file") if item.get("type") == "file" else item
    path = (file or {}).get("path")
    if not path:
        return None
    mime = (file.get("mime_type") or mimetypes.guess_type(path)[0] or "")
    if mime and not mime.startswith("image/"):
        return {"type": "file", "path": path}  # the engine refuses it with a clear message
    return {"type": "image", "image": path}


def make_chat_fn(runner, line: WaitingLine, settings: Settings, *, zero_gpu: bool = False,
                 toolbox: Toolbox | None = None):
    """The chat function ChatInterface calls. Each message waits its turn in `line` (shared
    with the API) and shows its position meanwhile. On ZeroGPU it is a plain generator under
    `@spaces.GPU` (which refuses async functions) and Gradio's own queue orders the turns;
    everywhere else an async generator drives it, so that Stop reaches the engine at once.
    With a `toolbox` (and a model whose template takes tools) the model may call tools: the
    app runs each call, shows it, and generates again with its result, up to
    settings.max_tool_steps calls."""

    def pending(title: str):
        return gr.ChatMessage(content="", metadata={"title": title, "status": "pending"})

    def chat_steps(message: dict, history: list[dict], system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                   max_new_tokens: int = settings.max_new_tokens, temperature: float = 0.0,
                   top_p: float = 1.0, on_stream=None, cancelled: Signal | None = None):
        title = THINKING_TITLE
        if not runner.loaded:
            title = LOADING_TITLE
        elif line.engine_busy:  # at the front, waiting for the answer before it to end
            title = WAITING_TITLE.format(ordinal(1))
        yield pending(title)
        # Gradio re-processes the whole chat on every update: fewer updates for long chats.
        updates_per_second = min(settings.max_updates_per_second, UPDATE_BUDGET_MESSAGES / max(1, len(history)))
        tools_on = toolbox is not None and runner.supports_tools
        generation = GenerationSettings(max_new_tokens=int(max_new_tokens),
                                        temperature=float(temperature), top_p=float(top_p),
                                        max_updates_per_second=updates_per_second,
                                        tools=toolbox.schemas if tools_on else None)
        try:
            messages = to_model_messages(history, message, system_prompt)
        except Exception as error:  # a bug of ours: say so in the chat, keep serving
            log.exception("reading the chat history failed")
            yield error_message(f"Internal error: {type(error).__name__}: {error}")
            return
        shown: list = []  # the bubbles of the steps before this one: their text, the tool calls
        calls_made = 0
        while True:
            try:
                stream = runner.stream(messages, generation, cancelled=cancelled)
                if on_stream:
                    on_stream(stream)
            except Cancelled:  # Stop while it waited for the engine: nothing ran, nobody listens
                return
            except (ChatInputError, GenerationError) as error:
                yield after(shown, error_message(str(error)))
                return
            except Exception as error:  # a bug of ours: say so in the chat, keep serving
                log.exception("building the model inputs failed")
                yield after(shown, error_message(f"Internal error: {type(error).__name__}: {error}"))
                return
            if title != THINKING_TITLE:  # it waited; now the model is working on it
                title = THINKING_TITLE
                yield pending(THINKING_TITLE)
            notes = [gr.ChatMessage(content=notice, metadata={"title": NOTE_TITLE})
                     for notice in stream.notices]
            view = AnswerView(stream, [*shown, *notes])
            with stream:  # leaving it (Stop, closed tab, API cancel) stops generation
                try:
                    for reply in stream:
                        yield view.render(reply)
                except GenerationError as error:
                    yield [*view.render(stream.reply, with_stats=False), error_message(str(error))]
                    return
            if cancelled is not None and cancelled.is_set():
                return
            reply = stream.reply
            if not reply.tool_calls:
                if not reply.answer and reply.reasoning is None:
                    yield after([*shown, *notes], error_message("The model returned an empty answer."))
                    return
                yield view.render(reply)  # the final figures
                return
            calls = reply.tool_calls
            if calls_made + len(calls) > settings.max_tool_steps:
                yield [*view.render(reply), gr.ChatMessage(
                    content=f"Stopped: the model asked for more than {settings.max_tool_steps} tool "
                            f"calls for one message (MAX_TOOL_STEPS).", metadata={"title": NOTE_TITLE})]
                return
            calls_made += len(calls)
            shown = view.render(reply, with_stats=False)
            messages = [*messages, {"role": "assistant", "tool_calls": list(calls),
                                    "content": [{"type": "text", "text": reply.answer}] if reply.answer else []}]
            for call in calls:
                yield [*shown, tool_bubble(call, None)]
                result = toolbox.run(call.name, call.arguments, timeout=settings.tool_timeout_s,
                                     cancelled=cancelled)
                if cancelled is not None and cancelled.is_set():
                    return
                shown = [*shown, tool_bubble(call, result)]
                messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                                 "content": [{"type": "text", "text": result.text}]})
            generation.continues_answer = True  # the next step goes before those who came later
            yield [*shown, pending(THINKING_TITLE)]

    if zero_gpu:
        import spaces
        chat_steps.__name__ = "chat"
        return spaces.GPU(duration=settings.zero_gpu_duration_s)(chat_steps)

    async def chat(message: dict, history: list[dict], system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                   max_new_tokens: int = settings.max_new_tokens, temperature: float = 0.0,
                   top_p: float = 1.0):
        # Gradio closes a plain generator only between two steps, retrying every 50 ms while
        # a step runs; here Stop cancels the wait at once and tells the engine, which stops
        # within one token.
        try:
            place = line.join("ui")
        except LineFull as full:
            yield error_message(str(full))
            return
        gone = Signal()  # Stop, a closed tab: it withdraws the request, or stops its answer

        def on_stream(stream):
            place.started(stream)

        try:
            async for position in place.waiting():
                yield pending(WAITING_TITLE.format(ordinal(position)))
            steps = chat_steps(message, history, system_prompt, max_new_tokens, temperature, top_p,
                               on_stream=on_stream, cancelled=gone)
            while (update := await anyio.to_thread.run_sync(next, steps, None,
                                                            abandon_on_cancel=True)) is not None:
                yield update
        finally:
            gone.set()
            place.leave()

    return chat


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def after(bubbles: list, last):
    """`last` after the bubbles already shown (alone when there are none, as a chat
    function's one message)."""
    return [*bubbles, last] if bubbles else last


def error_message(text: str):
    return gr.ChatMessage(content=text, metadata={"title": ERROR_TITLE})


class AnswerView:
    """Renders a reply as chat bubbles: notes, the reasoning in a collapsible "Thinking" block
    (spinning while it streams, then done with its duration), the answer, a tool call being
    written (its bubble comes when it runs; the raw call never shows), and a line of live
    figures. New ChatMessage objects on every call: Gradio diffs against the previous yield."""

    def __init__(self, stream, notes: list):
        self.stream, self.notes = stream, notes
        self.thought_for: float | None = None

    def render(self, reply, with_stats: bool = True) -> list:
        bubbles = list(self.notes)
        if reply.reasoning is not None:
            if reply.reasoning_done and self.thought_for is None:
                self.thought_for = time.perf_counter() - self.stream.started_at
            metadata = {"title": REASONING_TITLE, "status": "done" if reply.reasoning_done else "pending"}
            if reply.reasoning_done:
                metadata["duration"] = round(self.thought_for, 1)
            bubbles.append(gr.ChatMessage(content=reply.reasoning, metadata=metadata))
        if reply.answer:
            bubbles.append(gr.ChatMessage(content=reply.answer))
        if reply.calling:
            bubbles.append(gr.ChatMessage(content="", metadata={"title": CALLING_TITLE, "status": "pending"}))
        if with_stats:
            bubbles.append(gr.ChatMessage(content="", metadata={"title": stats_line(self.stream),
                                                                "status": "done"}))
        return bubbles


def stats_line(stream) -> str:
    figures = [f"{stream.new_tokens} tokens"]
    if stream.tokens_per_second:
        figures.append(f"{stream.tokens_per_second:.1f} tokens/s")
    if stream.time_to_first_token is not None:
        figures.append(f"first token after {stream.time_to_first_token:.2f} s")
    return STATS_PREFIX + " · ".join(figures)


# ---------------------------------------------------------------- the UI

def build_demo(runner, line: WaitingLine | None = None, settings: Settings | None = None,
               toolbox: Toolbox | None = None):
    """The chat UI on `runner`: its messages wait in `line` (shared with the API)."""
    settings = settings or Settings()
    line = line or waiting_line_for(runner, settings)
    zero_gpu = on_zero_gpu()
    chat_fn = make_chat_fn(runner, line, settings, zero_gpu=zero_gpu, toolbox=toolbox)
    # ZeroGPU: one answer at a time, in Gradio's queue. Elsewhere every message enters the
    # chat function at once and waits in the app's line (with the API's requests).
    concurrency = 1 if zero_gpu else None
    examples = starter_examples()
    with gr.Blocks(title="Local model chat", fill_height=True) as demo:
        gr.Markdown("# Local model chat")
        header = gr.Markdown(header_markdown(runner, toolbox))
        textbox = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", sources=["upload"],
            placeholder=f"Type a message or attach up to {settings.max_images_per_message} images…",
            stop_btn=True, render=False)
        chat = gr.ChatInterface(
            fn=chat_fn,
            multimodal=True,
            textbox=textbox,
            chatbot=cache_history_postprocessing(gr.Chatbot(
                height="65vh", label="Chat",
                latex_delimiters=[{"left": "$$", "right": "$$", "display": True},
                                  {"left": "$", "right": "$", "display": False}])),
            additional_inputs=[  # render=False: ChatInterface puts them in its accordion
                gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=2, render=False),
                gr.Slider(1, settings.max_new_tokens_limit, value=settings.max_new_tokens, step=1,
                          label="Max new tokens", render=False),
                gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                          render=False),
                gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", render=False),
            ],
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            examples=[[example] for example in examples],
            example_labels=[example["label"] for example in examples],
            run_examples_on_click=True,
            cache_examples=False,
            save_history=True,
            editable=True,
            api_name="chat",
            concurrency_limit=concurrency,
            fill_height=True,
        )
        # Runs beside ChatInterface's own cancel: a Stop before the first token would
        # otherwise leave the "Thinking…" spinner turning forever.
        chat.textbox.stop(settle_pending_messages, [chat.chatbot], [chat.chatbot, chat.chatbot_state],
                          queue=False, api_visibility="undocumented")
        if not runner.loaded:  # refresh the header until the model is ready
            timer = gr.Timer(1.0)

            def refresh_header():
                return header_markdown(runner, toolbox), gr.Timer(active=not runner.loaded)

            timer.tick(refresh_header, outputs=[header, timer], queue=False,
                       api_visibility="undocumented")
            demo.load(refresh_header, outputs=[header, timer], queue=False,
                      api_visibility="undocumented")
    route_chat_events(demo, chat_fn, concurrency)
    return demo


def header_markdown(runner, toolbox: Toolbox | None = None) -> str:
    if not runner.loaded:
        return f"**{runner.name or 'model'}** · ⏳ loading model…"
    tools = ""
    if toolbox is not None:
        tools = f" · 🛠 tools: {', '.join(toolbox.names)}" if runner.supports_tools else \
            " · 🛠 tools off: this model's chat template doesn't take tools in a form the app reads"
    info = runner.info
    kind = "vision-language" if info.is_vision else "text-only"
    dtype = info.dtype
    if info.quantization == "4bit":
        dtype = f"4bit (bitsandbytes NF4, {dtype} compute)"
    elif info.quantization:
        dtype = f"{info.quantization} (bitsandbytes)"
    compiled = " · compiled" if info.compile else ""
    local = info.device in ("cpu", "cuda", "mps")  # (a remote server batches in its own way)
    batched = " · batched" if local and info.batching else ""
    return f"**{info.name}** · {kind} · {info.device} · {dtype}{compiled}{batched}{tools}"


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


def settle_pending_messages(history: list[dict]):
    """After Stop: drop empty pending indicators, mark other pending blocks done."""
    settled = []
    for msg in history or []:
        metadata = msg.get("metadata") or {}
        if metadata.get("status") == "pending":
            if not any(p for p in map(_to_part, _as_list(msg.get("content"))) if p):
                continue
            msg = {**msg, "metadata": {**metadata, "status": "done"}}
        settled.append(msg)
    return settled, settled


def route_chat_events(demo, chat_fn, concurrency_limit: int | None):
    """ChatInterface gives its browser events (submit, retry, edit, examples) and its API
    event separate Gradio queues; give them one, with `concurrency_limit` (None: no limit)."""
    for block_fn in demo.fns.values():
        if getattr(block_fn.fn, "__wrapped__", None) is chat_fn:
            block_fn.concurrency_id = GENERATION_CONCURRENCY_ID
            block_fn.concurrency_limit = concurrency_limit


# ---------------------------------------------------------------- serve: the UI, /v1, /healthz and /metrics on one server

def serve(runner, settings: Settings | None = None, *, block: bool = True, quiet: bool = False,
          on_listening=None, toolbox: Toolbox | None = None, **overrides):
    """Launch the UI and, on the same server, /v1 (OpenAI API), /healthz and /metrics, as
    `settings` say (host, port, share, auth, api_key, max_new_tokens, queue_max_size,
    log_chats, ...; `overrides` replace single ones). Returns (demo, local_url); with
    block=True only when the server stops."""
    settings = (settings or Settings()).replace(**overrides)
    line = waiting_line_for(runner, settings)
    with gradio_app_built_at_launch_only():
        demo = build_demo(runner, line, settings, toolbox=toolbox)
        demo.queue(max_size=settings.queue_max_size)
    wake_queue_on_events(demo)  # instead of polling for work every 1 ms, idle or not
    if settings.log_chats:  # off by default: prompts and answers are the users' business
        runner.finish_listeners.append(log_exchange)
    # (Gradio's own queue holds chat events only on ZeroGPU; elsewhere they wait in the line.)
    metrics = Metrics(runner, waiting=lambda: line.waiting + ui_queue_depth(demo))
    auth = tuple(settings.auth.split(":", 1)) if settings.auth else None
    server, local_url, share_url = demo.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share, auth=auth,
        max_file_size=settings.max_upload_size, max_threads=settings.queue_max_size + GRADIO_EXTRA_THREADS,
        prevent_thread_lock=True, quiet=quiet)
    if settings.share:
        if share_url:
            log.info("Public link (valid 1 week, while this app runs): %s", share_url)
        else:
            log.warning("Could not create the public share link (is this machine offline?); "
                        "the app keeps running locally at %s", local_url)
    if on_listening:
        on_listening()

    api_open = settings.api_key is None and is_loopback(settings.host) and not settings.share
    server.mount("/v1", create_api(runner, line, settings, open_without_key=api_open))
    server.add_api_route("/healthz", lambda: {
        "status": "ok" if runner.loaded else "loading", "model": runner.name,
        "device": runner.info.device, "dtype": runner.info.dtype, "loaded": runner.loaded,
        "runner": dataclasses.asdict(runner.info)}, methods=["GET"])
    server.add_api_route("/metrics", lambda: Response(metrics.render(), media_type=metrics.content_type),
                         methods=["GET"])
    if settings.api_key is None and not api_open:
        log.warning("The OpenAI API (/v1) is off: the server is reachable from the network; "
                    "start with --api-key KEY to turn it on.")
    if block:
        demo.block_thread()
    return demo, local_url


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

    def stream(self, messages, settings=None, cancelled: Signal | None = None):
        wait_for_either(self.ready, cancelled)
        if not self.ready.is_set():
            raise Cancelled()
        if self.runner is None:
            raise GenerationError(f"The model failed to load: {self.error}")
        return self.runner.stream(messages, settings, cancelled=cancelled)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    settings = config.read_settings(argv)  # resolved once, then handed to everything
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
    toolbox = None
    if settings.tools:
        try:
            toolbox = Toolbox.load(settings.tools)
        except ToolsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if settings.share and not settings.auth:
        log.warning("warning: --share without --auth: anyone with the link can use this machine's compute.")
    # The UI first (importing gradio takes seconds), then the model: loading both at once
    # would only make them fight for the GIL.
    demo, _ = serve(slot, settings, block=False, on_listening=slot.start, toolbox=toolbox)
    slot.ready.wait()
    if slot.error is not None:
        message = str(slot.error) if isinstance(slot.error, ModelLoadError) else \
            f"Can't load the model: {type(slot.error).__name__}: {slot.error}"
        print(f"error: {message}", file=sys.stderr)
        demo.close()
        return 1
    log.info("Model ready: %s on %s (%s).", slot.name, slot.device, slot.dtype)
    if toolbox is not None:
        if slot.supports_tools:
            log.info("Tools for the chat: %s.", ", ".join(toolbox.names))
        else:
            log.warning("Tools are off: %s's chat template doesn't take tools, or writes its calls in a "
                        "shape the app doesn't read (it reads Hermes <tool_call> tags, or what the "
                        "tokenizer's response_template describes). Qwen2.5 and Qwen3 do.", slot.name)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
