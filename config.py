"""Defaults and limits, in one place (the README lists them). Importing this is cheap:
the app reads it before torch and transformers are loaded."""

# Small, ungated, Apache-2.0, Idefics3 architecture: runs natively in transformers
# without torchvision or remote code, and answers at interactive speed on a laptop CPU.
DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
DEFAULT_MAX_NEW_TOKENS = 512

# --- Images ---
MAX_IMAGE_SIDE = 2048             # larger images are downscaled before the processor
MAX_IMAGE_PIXELS = 64_000_000     # above this an image is refused before decoding its pixels
MAX_IMAGES_PER_MESSAGE = 8
MAX_IMAGES_PER_CONVERSATION = 16  # older images beyond this are left out of the prompt

# --- Generation ---
MAX_NEW_TOKENS_LIMIT = 8192
MAX_UPDATES_PER_SECOND = 30       # the eye can't follow more; fewer updates keep long chats cheap

# --- Serving (UI) ---
MAX_UPLOAD_SIZE = "20mb"          # Gradio refuses larger uploads before they reach us
QUEUE_MAX_SIZE = 64               # waiting requests beyond this are told the app is busy

# --- OpenAI-compatible API ---
API_MAX_MESSAGES = 512
API_MAX_STOP_STRINGS = 4
API_MAX_IMAGE_BYTES = 20 * 1024 * 1024   # decoded size of one data: URL image
API_MAX_WAITING_REQUESTS = 16            # API requests waiting for the model; beyond: 503
API_DEFAULT_MAX_TOKENS = 512

# --- Remote backend ---
REMOTE_CONNECT_TIMEOUT_S = 5.0
REMOTE_READ_TIMEOUT_S = 300.0     # longest silence accepted from the server (prefill, its queue)
