"""Every setting of the app, in one table: its environment variable (a Space variable, a
container's env), its command-line option where it has one, its default, what it does.

    settings = config.read_settings()     # app.main, once: the environment, then the command line
    settings.max_image_side               # a frozen dataclass, handed to whatever needs it
    config.Settings()                     # the defaults (tests, library use)

No module reads settings at import or keeps them in a global: main resolves them once and
passes the one object on (to the engine process too). Importing this is cheap (no torch).
README "Settings" is this table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

# Small, ungated, Apache-2.0, Idefics3 architecture: runs natively in transformers without
# torchvision or remote code, and answers at interactive speed on a laptop CPU.
DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


def _flag(value: str) -> bool:
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("not 1/true/yes/on or 0/false/no/off")


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _compile_choice(value: str) -> str:
    """auto, on, off; 1/true/yes and 0/false/no read as on and off."""
    value = value.strip().lower()
    return {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(value, value)


def _file_size(value: str) -> str:
    """A size as Gradio's max_file_size reads it: a whole number and a unit, e.g. 100mb, 2 GB."""
    found = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb|tb)\s*", value, re.IGNORECASE)
    if not found or int(found[1]) < 1:
        raise ValueError("not a size such as 100mb or 2gb (b, kb, mb, gb or tb)")
    return f"{int(found[1])}{found[2].lower()}"


@dataclass(frozen=True)
class Setting:
    name: str                  # settings.<name>; --<name-with-dashes> when it is an option
    default: object
    help: str
    option: bool = False       # also a command-line option
    env: str = ""              # the environment variable: NAME in capitals unless given
    kind: Callable = None      # reads a string (default: the default's type; str)
    choices: tuple = ()
    metavar: str | None = None
    least: float | None = None  # a number's smallest value (default: 1 for a whole number, above 0 otherwise)
    most: float | None = None   # ... and its largest, if it has one

    @property
    def variable(self) -> str:
        return self.env or self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def read(self, text: str):
        kind = self.kind or (_flag if isinstance(self.default, bool) else
                             type(self.default) if self.default is not None else str)
        try:
            value = kind(text)
        except ValueError:
            if kind in (int, float):
                raise ValueError("not a whole number" if kind is int else "not a number") from None
            raise
        if self.choices and value not in self.choices:
            raise ValueError(f"not one of {', '.join(map(str, self.choices))}")
        return value


SETTINGS: tuple[Setting, ...] = (
    # -- the model
    Setting("model", None, f"hub id (downloaded once, with progress, into the HF cache) or local model "
            f"directory; default {DEFAULT_MODEL}. With --backend openai: the server's model (default: "
            f"the first one it lists)", option=True, env="MODEL_ID", metavar="ID_OR_DIR"),
    Setting("served_model_name", None, "the model's name in the header, on /v1/models and in API answers "
            "(default: the hub id, or a local directory's own name, never its path)", option=True,
            metavar="NAME"),
    Setting("backend", "local", "local: run the model on this machine; openai: stream from an "
            "OpenAI-compatible server at --base-url (vLLM, TGI, SGLang, Ollama, ...)", option=True,
            choices=("local", "openai")),
    Setting("base_url", None, "with --backend openai: that server, e.g. http://gpu-box:8000/v1", option=True,
            env="OPENAI_BASE_URL", metavar="URL"),
    Setting("device", "auto", "auto picks cuda > mps > cpu; on CUDA the model is loaded with "
            "device_map=auto, so a model larger than one GPU spreads over all GPUs and CPU memory",
            option=True, choices=("auto", "cpu", "cuda", "mps")),
    Setting("dtype", "auto", "auto: bfloat16 on CUDA GPUs that support it, float16 on other GPUs, "
            "float32 on CPU", option=True, choices=("auto", "float32", "bfloat16", "float16")),
    Setting("compile", "auto", "generate with a static KV cache and a torch.compile'd decoding step (CUDA "
            "graphs), compiled in a warm-up while the model loads. auto: on CUDA, for a model whose "
            "warm-up works so (others stay eager, the log says why); on: also on CPU/MPS (the static "
            "cache alone, slower there), refusing a model that can't; off. --compile alone means on",
            option=True, kind=_compile_choice, choices=("auto", "on", "off")),
    Setting("compile_cache_tokens", 4096, "with compile: the static KV cache's size in tokens, reserved "
            "whole; a longer answer runs with the default cache, uncompiled"),
    Setting("quantize", None, "load the weights quantized with bitsandbytes (pip install bitsandbytes): "
            "4bit (NF4, about a quarter of bf16's memory) or 8bit (about half); CUDA, or CPU; not MPS",
            option=True, choices=("4bit", "8bit")),
    Setting("batching", "auto", "continuous batching: answers to several users share the model's forward "
            "passes (transformers' ContinuousBatchingManager). auto: on for text-only models on CUDA; on: "
            "also on CPU/MPS; off: one answer at a time. Vision models always answer one at a time",
            option=True, choices=("auto", "on", "off")),
    Setting("torch_threads", 0, "torch threads for generating; 0: the cores this process may use, less "
            "one for the web server", option=True, metavar="N", least=0),
    Setting("trust_remote_code", False, "run Python code shipped with the model repo, with your user's "
            "rights: only for repos you trust (without it such models are refused)", option=True),
    Setting("in_process", False, "run the model in the web server's process instead of an engine process "
            "of its own (slower streaming; ZeroGPU Spaces always run in-process)", option=True),
    # -- tools
    Setting("tools", None, "tools the model may call in the chat: a Python file whose public functions "
            "(type hints + Google-style docstring) become tools, or 'builtin' (a calculator, the date "
            "and time). Repeatable; the variable takes a comma-separated list", option=True,
            kind=_comma_list, metavar="PATH.py|builtin"),
    Setting("mcp_config", None, "tools from MCP servers: a JSON file in the mcpServers format of Claude Desktop, "
            "Cursor and LM Studio ({\"mcpServers\": {NAME: {command, args, env} or {url, headers}}}); stdio "
            "servers are started with the app and stopped with it", option=True, metavar="PATH"),
    Setting("mcp_server", False, "serve the chat as an MCP tool at /gradio_api/mcp/ (one tool: a message, "
            "optional images, settings; returns the answer). On a network address (or with --share) it needs "
            "--api-key, sent as 'Authorization: Bearer KEY'", option=True),
    Setting("tool_timeout_s", 30.0, "a tool running longer is abandoned; its result says so"),
    Setting("max_tool_steps", 5, "tool calls the model may make for one message (generate, call, "
            "generate...); beyond, the chat says it stopped there"),
    # -- answers
    Setting("max_new_tokens", 512, "default answer length: the slider's start, and the API's max_tokens "
            "when a request gives none", option=True, metavar="N"),
    Setting("max_new_tokens_limit", 8192, "the longest answer: the slider stops there, the API answers 400"),
    Setting("max_updates_per_second", 30, "updates while an answer streams (coalesced), on screen and in /v1 streams; long "
            "chats get fewer (8/s at 100 messages, 2/s at 400)"),
    # -- images, documents, audio, video
    Setting("max_image_side", 2048, "larger images are downscaled before the model; the chat says so once"),
    Setting("max_image_pixels", 64_000_000, "larger images are refused from their header, before any pixel "
            "is decoded (decompression bombs)"),
    Setting("max_images_per_message", 8, "a message with more is refused with a message", least=0),
    Setting("max_images_per_conversation", 16, "the oldest images beyond it drop out of the prompt; the "
            "chat says so", least=0),
    Setting("video_frames", 8, "frames of a video a model is shown, spread evenly, each with its time stamp "
                               "(within max_images_per_message for an image model)", most=32),  # media.MAX_VIDEO_FRAMES
    Setting("asr_model", None, "a speech-recognition model (hub id or directory, e.g. "
                               "openai/whisper-large-v3-turbo): audio sent to a model that can't listen is written "
                               "out first, and the chat shows the transcript as the user's words", option=True,
            metavar="ID_OR_DIR"),
    Setting("max_upload_size", "100mb", "larger uploads are refused by the server (HTTP 413)", kind=_file_size),
    # -- serving
    Setting("host", "127.0.0.1", "address to bind; 0.0.0.0 serves your network (Spaces set it)",
            option=True, env="GRADIO_SERVER_NAME"),
    Setting("port", 7860, "port to serve on", option=True, env="GRADIO_SERVER_PORT", most=65535),
    Setting("share", False, "also create a temporary public *.gradio.live link", option=True),
    Setting("auth", None, "require a login for the UI: USER:PASS, repeatable (the variable takes a "
            "comma-separated list); each user sees only their own saved chats", option=True, kind=_comma_list,
            metavar="USER:PASS"),
    Setting("auth_file", None, "logins for the UI from a file: one USER:PASS per line (# comments), beside "
            "any --auth", option=True, metavar="PATH"),
    # -- saved chats
    Setting("save", True, "keep chats on the server, per user, across restarts (--no-save: only until the "
            "app stops)", option=True, env="SAVE_CHATS"),
    Setting("data_dir", None, "where saved chats live (a SQLite database and the images); default the OS's "
            "per-user data folder, on a Space its persistent storage /data (else a temporary folder)",
            option=True, metavar="DIR"),
    Setting("max_saved_chats_per_user", 1000, "saved conversations one user may keep; beyond, the chat says "
            "to delete some"),
    Setting("max_saved_bytes_per_user", 1 << 30, "bytes of saved messages and images one user may keep"),
    Setting("log_chats", False, "log every prompt and answer (not logged otherwise)", option=True),
    Setting("queue_max_size", 64, "requests waiting for the model, UI and API in one line; beyond it: "
            "\"The server is busy\" in the chat, HTTP 503 server_busy on the API"),
    Setting("zero_gpu_duration_s", 120, "on a ZeroGPU Space: GPU seconds asked for per answer"),
    # -- the OpenAI-compatible API
    Setting("api_key", None, "required as 'Authorization: Bearer KEY' on /v1; without it /v1 answers only "
            "on 127.0.0.1 without --share. With --backend openai it is also sent upstream", option=True,
            metavar="KEY"),
    Setting("api_max_waiting_requests", 16, "API requests among those waiting; beyond: HTTP 503 server_busy",
            least=0),
    Setting("api_model_load_wait_s", 60.0, "an API request made while the model loads waits this long for "
            "it, then gets HTTP 503 model_loading", least=0),
    Setting("api_retry_after_s", 5, "the Retry-After of those 503s", least=0),
    Setting("api_max_messages", 512, "messages in one API request; more: HTTP 400"),
    Setting("api_max_tools", 64, "tools in one API request; more: HTTP 400", least=0),
    Setting("api_max_stop_strings", 4, "stop sequences in one API request; more: HTTP 400", least=0),
    Setting("api_max_image_bytes", 20 * 1024 * 1024, "one decoded data: URL image; larger: HTTP 400"),
    # -- the remote backend
    Setting("remote_connect_timeout_s", 5.0, "--backend openai: seconds to connect to the server"),
    Setting("remote_read_timeout_s", 300.0, "--backend openai: the longest silence accepted from the server "
            "(a long prefill, its own queue)"),
)


def _settings_class():
    """The values of SETTINGS as one frozen dataclass: `Settings()` holds the defaults."""
    fields = [(s.name, object, dataclasses.field(default=s.default)) for s in SETTINGS]
    return dataclasses.make_dataclass("Settings", fields, frozen=True, namespace={
        "__doc__": "Every setting's value (config.SETTINGS), frozen: built once by read_settings() "
                   "and handed to whatever needs it. Settings() holds the defaults.",
        "problem": _problem, "replace": lambda self, **changes: dataclasses.replace(self, **changes),
        "__module__": __name__})


def _problem(settings) -> str | None:
    """What can't work together, in one line (None: nothing)."""
    if settings.backend == "openai" and not settings.base_url:
        return "--backend openai needs --base-url (e.g. http://localhost:8000/v1)"
    if settings.backend == "openai" and not re.match(r"https?://[^/\s]+", settings.base_url):
        return f"--base-url must be an http:// or https:// URL, e.g. http://localhost:8000/v1 (it is {settings.base_url!r})"
    if any(":" not in login or login.startswith(":") for login in settings.auth or ()):
        return "--auth must be USER:PASS"
    for setting in SETTINGS:
        value = getattr(settings, setting.name)
        if isinstance(setting.default, bool) or not isinstance(setting.default, (int, float)) or value is None \
                or setting.name == "max_new_tokens":  # (its range is the limit's: below, once the limit is good)
            continue
        named = setting.flag if setting.option else setting.variable
        if not math.isfinite(value):  # (nan passes every comparison below)
            return f"{named} must be a finite number (it is {value})"
        if setting.least is None and isinstance(setting.default, float) and not value > 0:
            return f"{named} must be more than 0 (it is {value})"
        least = 1 if setting.least is None else setting.least
        if value < least or (setting.most is not None and value > setting.most):
            upto = f" to {setting.most:g}" if setting.most is not None else " or more"
            return f"{named} must be {least:g}{upto} (it is {value})"
    if not 1 <= settings.max_new_tokens <= settings.max_new_tokens_limit:
        return f"--max-new-tokens must be between 1 and {settings.max_new_tokens_limit}"
    return None


Settings = _settings_class()


def from_environment(environ=os.environ) -> tuple[Settings, list[str]]:
    """The environment's values over the defaults, and the variables that could not be read
    (their defaults are used)."""
    values, problems = {}, []
    for setting in SETTINGS:
        text = environ.get(setting.variable, "")
        if text.strip():
            try:
                values[setting.name] = setting.read(text)
            except ValueError as error:
                problems.append(f"{setting.variable}={text!r}: {error}")
    return Settings(**values), problems


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a refusal is one line (its usage, 13 lines, is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(defaults: Settings) -> argparse.ArgumentParser:
    """The command line: each option's default is its value in `defaults` (the environment's)."""
    parser = _OneLineParser(
        description="Chat with a local Hugging Face model (text + images), streamed token by token. "
                    "Each option can also be set by the environment variable in brackets; more "
                    "settings, without options, are in README 'Settings'.")
    for setting in SETTINGS:
        if not setting.option:
            continue
        value = getattr(defaults, setting.name)
        help_text = f"{setting.help} [{setting.variable}" + ("" if value is None else f"; default {value}") + "]"
        if isinstance(setting.default, bool):
            parser.add_argument(setting.flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
            continue
        kind = setting.kind or (str if setting.default is None else type(setting.default))
        if kind is _comma_list:  # repeatable on the command line
            parser.add_argument(setting.flag, action="append", default=None, help=help_text, metavar=setting.metavar)
            continue
        parser.add_argument(setting.flag, default=value, help=help_text, type=kind, choices=setting.choices or None,
                            metavar=setting.metavar,
                            **({"nargs": "?", "const": "on"} if setting.name == "compile" else {}))
    return parser


def read_settings(argv: list[str] | None = None, environ=os.environ) -> Settings:
    """The app's settings, resolved once: the environment's, then the command line's over them.
    A bad value exits with one line (argparse's error)."""
    from_env, problems = from_environment(environ)
    command_line = parser(from_env)
    if problems:
        command_line.error("; ".join(problems))
    command_line.set_defaults(max_new_tokens=None)  # (None: not on the command line, abbreviated or not)
    values = command_line.parse_args(argv)
    length_given = values.max_new_tokens is not None or bool(environ.get(_named("max_new_tokens").variable, "").strip())
    if values.max_new_tokens is None:
        values.max_new_tokens = from_env.max_new_tokens
    changes = {}
    for setting in SETTINGS:
        if not setting.option:
            continue
        value = getattr(values, setting.name, None)
        if setting.kind is _comma_list:
            if value is None:  # not on the command line: the environment's stays
                continue
            value = tuple(item for text in value for item in _comma_list(text))
        changes[setting.name] = value
    settings = from_env.replace(**changes)
    if not length_given and settings.max_new_tokens > settings.max_new_tokens_limit:  # (the default follows the limit)
        settings = settings.replace(max_new_tokens=settings.max_new_tokens_limit)
    problem = settings.problem()
    if problem:
        command_line.error(problem)
    return settings


def _named(name: str) -> Setting:
    return next(setting for setting in SETTINGS if setting.name == name)


def settings_table() -> str:
    """SETTINGS as the README's table (tests/test_deployment.py keeps the two the same)."""
    rows = ["| setting | option | environment variable | default | what it does |", "|---|---|---|---|---|"]
    for setting in SETTINGS:
        default = "" if setting.default is None else f"`{setting.default}`"
        option = f"`{setting.flag}`" if setting.option else ""
        rows.append(f"| {setting.name} | {option} | `{setting.variable}` | {default} | {setting.help} |")
    return "\n".join(rows)
