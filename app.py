"""Chat with a local Hugging Face model — text and images — streamed token by token.

Launch:
    python app.py                                   # default model (SmolVLM-256M-Instruct)
    python app.py --model HuggingFaceTB/SmolVLM-500M-Instruct --device cuda
    python app.py --model ./my-local-model --share --auth me:secret
    python app.py --help                            # every option and its environment variable

Endpoints (same server):
    /                  the chat UI
    /chat (Gradio API) gradio_client: Client(url).submit({"text": ..., "files": [handle_file(p)]},
                       system_prompt, max_new_tokens, temperature, top_p, api_name="/chat")
                       streams the growing answer; job.cancel() stops generation.
    /v1/chat/completions, /v1/models   OpenAI-compatible API (see openai_api.py)
    /healthz           model, device, loaded
    /metrics           Prometheus metrics
"""

from __future__ import annotations

import argparse
import logging
import mimetypes
import os
import sys

from model_runner import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    MAX_IMAGES_PER_MESSAGE,
    MAX_NEW_TOKENS_LIMIT,
    ChatInputError,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    ModelRunner,
)

# --- Serving limits (the engine's limits live at the top of model_runner.py) ---
MAX_UPLOAD_SIZE = "20mb"        # Gradio refuses larger uploads before they reach us
QUEUE_MAX_SIZE = 64             # waiting requests beyond this are told the app is busy
GENERATION_CONCURRENCY_ID = "generate"  # UI and API events share one queue per model
DEFAULT_SYSTEM_PROMPT = ""

THINKING_TITLE = "Thinking…"
ERROR_TITLE = "⚠️ Error"

log = logging.getLogger("app")


# ---------------------------------------------------------------- Gradio history → model messages

def to_model_messages(history: list[dict], message: dict | str, system_prompt: str = "") -> list[dict]:
    """The one place where Gradio's chat (history + the new message) becomes model messages.

    History comes in two shapes: the browser sends normalised blocks
    (`content: [{"type": "text", ...} | {"type": "file", "file": {"path", "mime_type"}}]`),
    API clients the raw state (`content: [{"path": ...}, "hi"]` or a plain string).
    Messages carrying a metadata title (the Thinking… indicator, error notes, reasoning) are
    annotations for the reader, not part of the conversation.
    """
    messages: list[dict] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt.strip()}]})
    turns = list(history or [])
    if isinstance(message, str):
        message = {"text": message, "files": []}
    files = [{"path": f} if isinstance(f, str) else f for f in message.get("files") or []]
    new_content: list = [*files, message.get("text") or ""]
    turns.append({"role": "user", "content": new_content})
    for turn in turns:
        role = turn.get("role")
        if role not in ("user", "assistant") or (turn.get("metadata") or {}).get("title"):
            continue
        parts = [p for p in map(_to_part, _as_list(turn.get("content"))) if p]
        if not parts:
            continue
        messages.append({"role": role, "content": parts})
    return messages


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


# ---------------------------------------------------------------- the chat function

def make_chat_fn(runner: ModelRunner):
    import gradio as gr

    def chat(message: dict, history: list[dict], system_prompt: str = DEFAULT_SYSTEM_PROMPT,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
             top_p: float = 1.0):
        yield gr.ChatMessage(content="", metadata={"title": THINKING_TITLE, "status": "pending"})
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens),
                                      temperature=float(temperature), top_p=float(top_p))
        try:
            messages = to_model_messages(history, message, system_prompt)
            stream = runner.stream(messages, settings)
        except (ChatInputError, GenerationError) as error:
            yield error_message(str(error))
            return
        except Exception as error:  # a bug of ours: say so in the chat, keep serving
            log.exception("building the model inputs failed")
            yield error_message(f"Internal error: {type(error).__name__}: {error}")
            return
        with stream:  # leaving it (Stop, closed tab, API cancel) stops generation
            try:
                for text in stream:
                    yield text
            except GenerationError as error:
                yield [gr.ChatMessage(content=stream.text), error_message(str(error))] \
                    if stream.text else error_message(str(error))
                return
        if not stream.text:
            yield error_message("The model returned an empty answer.")

    return chat


def error_message(text: str):
    import gradio as gr
    return gr.ChatMessage(content=text, metadata={"title": ERROR_TITLE})


# ---------------------------------------------------------------- the UI

def build_demo(runner: ModelRunner, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    import gradio as gr

    chat_fn = make_chat_fn(runner)
    kind = "vision-language" if runner.is_vision else "text-only"
    dtype = str(runner.dtype).removeprefix("torch.")
    textbox = gr.MultimodalTextbox(
        file_types=["image"], file_count="multiple", sources=["upload"],
        placeholder=(f"Type a message or attach up to {MAX_IMAGES_PER_MESSAGE} images…"
                     if runner.is_vision else "Type a message (this model is text-only)…"),
        stop_btn=True)
    demo = gr.ChatInterface(
        fn=chat_fn,
        multimodal=True,
        textbox=textbox,
        chatbot=gr.Chatbot(height="65vh", label=runner.name,
                           latex_delimiters=[{"left": "$$", "right": "$$", "display": True},
                                             {"left": "$", "right": "$", "display": False}]),
        additional_inputs=[
            gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=2),
            gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=default_max_new_tokens, step=1,
                      label="Max new tokens"),
            gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
        ],
        additional_inputs_accordion=gr.Accordion("Settings", open=False),
        title="Local model chat",
        description=f"**{runner.name}** · {kind} · {runner.device} · {dtype}",
        editable=True,
        api_name="chat",
        concurrency_limit=1,
        fill_height=True,
    )
    share_generation_queue(demo, chat_fn)
    with demo:
        # Runs beside ChatInterface's own cancel: a Stop before the first token would
        # otherwise leave the "Thinking…" spinner turning forever.
        demo.textbox.stop(settle_pending_messages, [demo.chatbot], [demo.chatbot, demo.chatbot_state],
                          queue=False, api_visibility="undocumented")
    return demo


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


def share_generation_queue(demo, chat_fn, concurrency_limit: int = 1):
    """ChatInterface gives its browser events and its API event separate queues, so a UI
    user and an API user could run two generations at once; put them all in one."""
    for block_fn in demo.fns.values():
        if getattr(block_fn.fn, "__wrapped__", None) is chat_fn:
            block_fn.concurrency_id = GENERATION_CONCURRENCY_ID
            block_fn.concurrency_limit = concurrency_limit


# ---------------------------------------------------------------- command line

def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Chat with a local Hugging Face model (text + images), streamed token by token. "
                    "Every option can also be set by the environment variable shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=env("MODEL_ID"),
                        help=f"hub id (downloaded once into the HF cache) or local model directory; "
                             f"default {DEFAULT_MODEL}. With --backend openai: the served model's name "
                             f"(default: the first one the server lists) [MODEL_ID]")
    parser.add_argument("--backend", choices=["local", "openai"], default=env("BACKEND", "local"),
                        help="local: run the model in this process; openai: stream from an "
                             "OpenAI-compatible server at --base-url (vLLM, TGI, Ollama, ...) [BACKEND]")
    parser.add_argument("--base-url", default=env("OPENAI_BASE_URL"),
                        help="with --backend openai: the server's URL, e.g. http://host:8000/v1 [OPENAI_BASE_URL]")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=env("DEVICE", "auto"),
                        help="auto picks cuda > mps > cpu; cuda spreads big models over all GPUs [DEVICE]")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        default=env("DTYPE", "auto"),
                        help="auto: bfloat16 on capable CUDA, float16 on other GPUs, float32 on CPU [DTYPE]")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind; 0.0.0.0 to serve your network [GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
                        help="port to serve on [GRADIO_SERVER_PORT]")
    parser.add_argument("--share", action="store_true", default=env_flag("SHARE"),
                        help="also create a temporary public *.gradio.live link [SHARE=1]")
    parser.add_argument("--auth", default=env("AUTH"), metavar="USER:PASS",
                        help="require this login for the UI [AUTH]")
    parser.add_argument("--api-key", default=env("API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on this app's OpenAI API (/v1); "
                             "without it /v1 is open on 127.0.0.1 only. With --backend openai it is "
                             "also sent to the upstream server [API_KEY]")
    parser.add_argument("--max-new-tokens", type=int,
                        default=int(env("MAX_NEW_TOKENS", str(DEFAULT_MAX_NEW_TOKENS))),
                        help=f"default of the max-new-tokens slider (1..{MAX_NEW_TOKENS_LIMIT}) [MAX_NEW_TOKENS]")
    parser.add_argument("--trust-remote-code", action="store_true", default=env_flag("TRUST_REMOTE_CODE"),
                        help="run Python code shipped with the model repo (only for repos you trust) "
                             "[TRUST_REMOTE_CODE=1]")
    args = parser.parse_args(argv)
    if args.backend == "openai" and not args.base_url:
        parser.error("--backend openai needs --base-url (e.g. http://localhost:8000/v1)")
    if args.auth is not None and ":" not in args.auth:
        parser.error("--auth must be USER:PASS")
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        parser.error(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    return args


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def serve(runner, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          auth: tuple[str, str] | None = None, api_key: str | None = None,
          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, block: bool = True, quiet: bool = False):
    """Launch the UI and, on the same server, /v1 (OpenAI API), /healthz and /metrics.
    Returns (demo, local_url); with block=True only when the server stops."""
    from fastapi.responses import Response

    from metrics import Metrics
    from openai_api import create_api

    demo = build_demo(runner, max_new_tokens)
    demo.queue(max_size=QUEUE_MAX_SIZE)
    metrics = Metrics(runner, extra_waiting=lambda: ui_queue_depth(demo))
    server, local_url, _ = demo.launch(
        server_name=host, server_port=port, share=share, auth=auth, max_file_size=MAX_UPLOAD_SIZE,
        prevent_thread_lock=True, quiet=quiet)
    api_open = api_key is None and is_loopback(host) and not share
    server.mount("/v1", create_api(runner, api_key=api_key, open_without_key=api_open))
    server.add_api_route("/healthz", lambda: {
        "status": "ok", "model": runner.name, "device": runner.device,
        "dtype": str(runner.dtype).removeprefix("torch."), "loaded": True}, methods=["GET"])
    server.add_api_route("/metrics", lambda: Response(metrics.render(), media_type=metrics.content_type),
                         methods=["GET"])
    if api_key is None and not api_open:
        log.warning("The OpenAI API (/v1) is off: the server is reachable from the network; "
                    "start with --api-key KEY to turn it on.")
    if block:
        demo.block_thread()
    return demo, local_url


def ui_queue_depth(demo) -> int:
    queue = getattr(demo, "_queue", None)
    event_queue = queue and queue.event_queue_per_concurrency_id.get(GENERATION_CONCURRENCY_ID)
    return len(event_queue.queue) if event_queue else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for chatty in ("httpx", "openai", "httpcore"):  # one line per request/retry otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        if args.backend == "openai":
            from remote_backend import RemoteRunner
            runner = RemoteRunner(args.base_url, api_key=args.api_key, model=args.model)
        else:
            runner = ModelRunner.load(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype,
                                      trust_remote_code=args.trust_remote_code)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    log.info("Loaded %s on %s (%s).", runner.name, runner.device, runner.dtype)
    if args.share and not args.auth:
        log.warning("warning: --share without --auth: anyone with the link can use this machine's compute.")
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    serve(runner, host=args.host, port=args.port, share=args.share, auth=auth, api_key=args.api_key,
          max_new_tokens=args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
