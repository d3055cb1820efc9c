"""Defaults and limits, in one place (the README lists them). Importing this is cheap:
the app reads it before torch and transformers are loaded. Each value can be set by an
environment variable of the same name (e.g. a Space variable MAX_IMAGES_PER_MESSAGE=4)."""

import os


def _env(name: str, default):
    value = os.environ.get(name)
    return default if value in (None, "") else type(default)(value)


# Small, ungated, Apache-2.0, Idefics3 architecture: runs natively in transformers
# without torchvision or remote code, and answers at interactive speed on a laptop CPU.
DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
# The default answer length, for the UI's slider and the API alike (--max-new-tokens).
DEFAULT_MAX_NEW_TOKENS = _env("MAX_NEW_TOKENS", 512)

# --- Images ---
# Larger images are downscaled before the processor; above MAX_IMAGE_PIXELS an image is
# refused from its header, before its pixels are decoded (decompression bombs).
MAX_IMAGE_SIDE = _env("MAX_IMAGE_SIDE", 2048)
MAX_IMAGE_PIXELS = _env("MAX_IMAGE_PIXELS", 64_000_000)
MAX_IMAGES_PER_MESSAGE = _env("MAX_IMAGES_PER_MESSAGE", 8)
# Older images beyond this are left out of the prompt.
MAX_IMAGES_PER_CONVERSATION = _env("MAX_IMAGES_PER_CONVERSATION", 16)

# --- Generation ---
MAX_NEW_TOKENS_LIMIT = _env("MAX_NEW_TOKENS_LIMIT", 8192)
# The eye can't follow more; fewer updates keep long chats cheap to stream.
MAX_UPDATES_PER_SECOND = _env("MAX_UPDATES_PER_SECOND", 30)
# --compile: the static KV cache holds this many tokens (prompt + answer; longer chats get a
# bigger cache and a one-time recompile). Its memory is reserved whole, per layer.
COMPILE_CACHE_TOKENS = _env("COMPILE_CACHE_TOKENS", 4096)

# --- Serving ---
MAX_UPLOAD_SIZE = _env("MAX_UPLOAD_SIZE", "20mb")  # Gradio refuses larger uploads (413)
# Requests waiting for the model, UI and API together (one line, first come first served);
# beyond: "busy, try again".
QUEUE_MAX_SIZE = _env("QUEUE_MAX_SIZE", 64)
ZERO_GPU_DURATION_S = _env("ZERO_GPU_DURATION_S", 120)  # GPU time asked per answer on ZeroGPU

# --- OpenAI-compatible API ---
API_MAX_MESSAGES = _env("API_MAX_MESSAGES", 512)
API_MAX_STOP_STRINGS = _env("API_MAX_STOP_STRINGS", 4)
API_MAX_IMAGE_BYTES = _env("API_MAX_IMAGE_BYTES", 20 * 1024 * 1024)  # one decoded data: URL
API_MAX_WAITING_REQUESTS = _env("API_MAX_WAITING_REQUESTS", 16)      # of those in line; beyond: 503
# A request that comes while the model loads waits this long for it, then gets a 503 with
# Retry-After (the openai client retries twice by default).
API_MODEL_LOAD_WAIT_S = _env("API_MODEL_LOAD_WAIT_S", 60.0)
API_RETRY_AFTER_S = _env("API_RETRY_AFTER_S", 5)

# --- Remote backend ---
REMOTE_CONNECT_TIMEOUT_S = _env("REMOTE_CONNECT_TIMEOUT_S", 5.0)
# The longest silence accepted from the server (a long prefill, its own queue).
REMOTE_READ_TIMEOUT_S = _env("REMOTE_READ_TIMEOUT_S", 300.0)
