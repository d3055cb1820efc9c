"""The engine: load a Hugging Face model, turn a chat into model inputs, stream the
answer token by token, and stop when asked. No Gradio in here.

    runner = ModelRunner.load("HuggingFaceTB/SmolVLM-256M-Instruct")   # or a local dir
    messages = [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                             {"type": "text", "text": "What is this?"}]}]
    with runner.stream(messages, GenerationSettings(max_new_tokens=200)) as stream:
        for text in stream:          # the answer so far, growing
            print(text)
    stream.new_tokens, stream.finish_reason, stream.time_to_first_token

Messages are the neutral chat format the UI and any API adapter build: a role
("system" | "user" | "assistant") and a list of parts, `{"type": "text", "text": ...}`
or `{"type": "image", "image": <path or PIL.Image>}`.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

import torch
from tokenizers.decoders import DecodeStream
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

import config
from conversation import (
    REASONING_START,
    TOOL_CALL_START,
    alternate_roles,
    last_user_text,
    prepare_messages,
    split_reasoning,
)
from engine_contract import (  # noqa: F401  (re-exported: callers of the engine use them with it)
    Cancelled,
    ChatInputError,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    StreamFigures,
    UpdateThrottle,
    notify_finished,
    served_model_name,
)

log = logging.getLogger("engine")

# ---------------------------------------------------------------- loading

def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("--device cuda was requested but no CUDA GPU is available.")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError("--device mps was requested but MPS is not available.")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def quantization_config(quantize: str, device: str, compute_dtype: torch.dtype):
    """--quantize 4bit|8bit → transformers' BitsAndBytesConfig, or ModelLoadError (one line)
    where it can't apply."""
    if quantize not in ("4bit", "8bit"):
        raise ModelLoadError(f"--quantize must be 4bit or 8bit, not {quantize!r}.")
    if device == "mps":
        raise ModelLoadError("--quantize: bitsandbytes does not run on Apple MPS; start without --quantize "
                             "(or pick a smaller model).")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("--quantize needs bitsandbytes, which is not installed: "
                             "pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig
    # 8-bit casts its inputs to float16 and says so on every layer call, every token
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def pick_dtype(device: str, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def resolve_model_path(model: str, trust_remote_code: bool = False) -> Path:
    """A local directory as is; otherwise a hub id downloaded (with progress bars) into
    the Hugging Face cache. Failures become one ModelLoadError line."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"{model!r} is not a model directory.")
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
    if trust_remote_code:
        patterns.append("*.py")
    hint = "Check the id, or point --model at a local directory that holds the model."
    try:
        path = Path(snapshot_download(model, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # older repos ship PyTorch .bin weights only
            path = Path(snapshot_download(model, allow_patterns=patterns + ["*.bin"]))
    except hub_errors.GatedRepoError:
        raise ModelLoadError(f"{model!r} is gated: accept its terms on huggingface.co and log in "
                             f"(`hf auth login`), or point --model at a local directory.") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelLoadError(f"Model {model!r} was not found on the Hugging Face Hub. {hint}") from None
    except hub_errors.LocalEntryNotFoundError:
        raise ModelLoadError(f"Can't download {model!r}: the Hugging Face Hub is unreachable (offline?) "
                             f"and the model is not in the local cache. Point --model at a local "
                             f"directory that holds the model.") from None
    except (hub_errors.HFValidationError, hub_errors.HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"Can't download {model!r}: {_first_line(e)}. {hint}") from None
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- streaming pieces

_END = object()


class IncrementalTextStreamer(BaseStreamer):
    """Hands generated text to `on_text` as tokens arrive.

    Each token is decoded once, incrementally and UTF-8-safely (a character split over
    several byte tokens comes out whole, when complete), unlike TextIteratorStreamer,
    which re-decodes the whole line on every token. Empty pieces are never handed out.
    """

    def __init__(self, tokenizer, on_text, record_times: bool = False):
        self.on_text = on_text
        self.times: list[float] | None = [] if record_times else None
        self.new_tokens = 0
        self.ids: list[int] = []  # the answer's token ids (a response_template parses them)
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._prompt_seen = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode_stream = DecodeStream(skip_special_tokens=True)
            self._step = lambda token_id: self._decode_stream.step(backend, token_id)
        else:  # tokenizers without a Rust backend: decode a sliding window
            self._tokenizer, self._ids, self._prefix, self._read = tokenizer, [], 0, 0
            self._step = self._window_step

    def _window_step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self._ids[self._prefix:self._read])
        after = decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return None

    def put(self, value):
        """generate()'s streamer call: the prompt's ids first, then each new token's."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.add(value.reshape(-1).tolist())

    def add(self, token_ids: list[int]) -> None:
        """New tokens of the answer (continuous batching hands them over as a list)."""
        self.last_token_at = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = self.last_token_at
        for token_id in token_ids:
            self.new_tokens += 1
            self.ids.append(token_id)
            if self.times is not None:
                self.times.append(self.last_token_at)
            text = self._step(token_id)
            if text:
                self.on_text(text)

    def end(self):
        pass


class _StopOnEvent(StoppingCriteria):
    """Stops generation at the next token once the event is set. Its two possible answers
    are made once: no new (device) tensor per token."""

    def __init__(self, event: threading.Event):
        self.event = event
        self._answers: dict = {}

    def __call__(self, input_ids, scores, **kwargs):
        key = (input_ids.shape[0], input_ids.device)
        if key not in self._answers:
            self._answers[key] = tuple(torch.full((input_ids.shape[0],), flag, dtype=torch.bool,
                                                  device=input_ids.device) for flag in (False, True))
        return self._answers[key][self.event.is_set()]


class TextStream(StreamFigures):
    """One answer generating in this process (the engine_contract.Stream contract).

    The generate thread itself turns tokens into text, cuts it at a stop string, and hands
    the text out when an update is due (UpdateThrottle): to `on_update` (the engine process
    sends it on), or else to the iterator, which sleeps until then. No other thread wakes
    per token, so the one that generates has the interpreter to itself."""

    def __init__(self, runner: "ModelRunner", inputs, generation_config: GenerationConfig,
                 stop: list[str] = (), seed: int | None = None,
                 max_updates_per_second: float = config.settings.max_updates_per_second,
                 on_update=None, cancelled: threading.Event | None = None, reply_parsing: tuple | None = None,
                 continues: bool = False):
        self._continues = continues  # a tool loop's next step: it goes before later requests
        self._updates: queue.SimpleQueue | None = None if on_update else queue.SimpleQueue()
        self._hand_out = on_update or self._updates.put
        self._throttle = UpdateThrottle(max_updates_per_second)
        self._stop = threading.Event()
        self._ended = threading.Event()  # the generate thread is done
        self._stop_reason = "cancelled"
        self._stop_strings = [s for s in stop if s]
        self._streamer = IncrementalTextStreamer(runner.tokenizer, self._on_text, runner.record_token_times)
        self._runner = runner
        self._raw = ""
        self.max_new_tokens = generation_config.max_new_tokens
        self.prompt_tokens = int(inputs["input_ids"].shape[-1])
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.notices: list[str] = []
        self.request_text = ""
        self.starts_in_reasoning = False
        self.parsed_reply: dict | None = None
        self._reply_parsing = reply_parsing  # (template, prompt ids, tools): parsed at the end
        self.started_at = time.perf_counter()
        self.ended_at: float | None = None
        self.closed_at: float | None = None
        self._tokens_at_close = 0
        self._begin(inputs, generation_config, seed, cancelled)

    def _begin(self, inputs, generation_config, seed, cancelled) -> None:
        self._thread = threading.Thread(
            target=self._generate, args=(inputs, generation_config, seed), daemon=True,
            name="generate")
        runner = self._runner
        runner._lock.acquire(first=self._continues)  # one generation per model; released by the thread
        if cancelled is not None and cancelled.is_set():  # withdrawn while it waited for the engine
            runner._lock.release()
            raise Cancelled()
        try:
            self._thread.start()
        except BaseException:
            runner._lock.release()
            raise

    def _generate(self, inputs, generation_config, seed):
        runner = self._runner
        runner.active += 1
        try:
            # Torch work in a new thread runs on torch's default thread count: set ours here.
            torch.set_num_threads(runner.torch_threads)
            if seed is not None:  # under the lock: no other generation draws from the RNG
                torch.manual_seed(seed)
            with runner.grad_mode():
                runner.model.generate(
                    **inputs, generation_config=generation_config, streamer=self._streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(self._stop)]))
        except BaseException as error:  # reaches the consumer, never lost in the thread
            self.error = runner._describe_failure(error)
        finally:
            runner.active -= 1
            runner._lock.release()
            self._finish()

    def _finish(self) -> None:
        """The answer has ended: its reason, the last text shown, the consumer and the
        listeners told."""
        self.ended_at = time.perf_counter()
        if self.error is not None:
            self.finish_reason = "error"
        elif self._stop.is_set():
            self.finish_reason = self._stop_reason
        else:
            self.finish_reason = "length" if self.new_tokens >= self.max_new_tokens else "stop"
        if self._stop_reason != "stop":
            self.text = self._raw  # a held-back partial stop string that never completed
        if self._reply_parsing and self.error is None:
            self.parsed_reply = self._runner.parse_reply(self._streamer.ids, *self._reply_parsing)
        if self._throttle.last(self.text):
            self._show(self.text)
        if self._updates is not None:
            self._updates.put(_END)
        self._ended.set()
        self._runner._notify_finished(self)

    def _on_text(self, piece: str) -> None:
        """A new piece of text, in the generate thread."""
        if self._stop_reason == "stop":  # cut at a stop string: what follows is not shown
            return
        self._add(piece)
        if self._throttle.due(self.text):
            self._show(self.text)

    def _show(self, text: str) -> None:
        try:
            self._hand_out(text)
        except Exception:  # nobody to hand it to any more: stop generating
            self._stop.set()

    def _add(self, piece: str):
        """Append generated text; the visible text never shows a stop string, nor the
        start of one that may still complete."""
        searched_from = max(0, len(self._raw) - max(map(len, self._stop_strings), default=0))
        self._raw += piece
        if not self._stop_strings:
            self.text = self._raw
            return
        for stop in self._stop_strings:
            at = self._raw.find(stop, searched_from)
            if at >= 0:
                self._raw = self.text = self._raw[:at]
                self._stop_reason = "stop"
                self._stop.set()
                return
        held = max((k for stop in self._stop_strings for k in range(1, len(stop))
                    if self._raw.endswith(stop[:k])), default=0)
        self.text = self._raw[:len(self._raw) - held]

    @property
    def new_tokens(self) -> int:
        return self._streamer.new_tokens

    @property
    def first_token_at(self) -> float | None:
        return self._streamer.first_token_at

    @property
    def last_token_at(self) -> float | None:
        return self._streamer.last_token_at

    @property
    def token_times(self) -> list[float] | None:
        """With runner.record_token_times (benchmarks): perf_counter() of every token."""
        return self._streamer.times

    @property
    def tokens_after_close(self) -> int | None:
        return None if self.closed_at is None else self.new_tokens - self._tokens_at_close

    def __iter__(self):
        """The answer so far, each time the generate thread hands it out; a reader that
        falls behind gets the latest text, not every one in between."""
        if self._updates is None:
            raise TypeError("this stream's updates go to its on_update")
        ended = False
        while not ended:
            items = [self._updates.get()]
            while not self._updates.empty():
                items.append(self._updates.get())
            ended = items[-1] is _END
            texts = [item for item in items if item is not _END]
            if texts:
                yield texts[-1]
        if self.error is not None:
            raise self.error

    def parts(self, text: str | None = None) -> tuple[str | None, str, bool]:
        return split_reasoning(self.text if text is None else text, self.starts_in_reasoning)

    def close(self, wait: float = 10.0):
        if self.closed_at is None and not self._ended.is_set():
            self.closed_at, self._tokens_at_close = time.perf_counter(), self.new_tokens
        self._stop.set()
        self._thread.join(wait)

    def join(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BatchedStream(TextStream):
    """One answer in the continuous batch (batching.py): the manager generates it beside
    the others; the batcher's thread hands over its tokens, and the text is made, cut at a
    stop string and handed out exactly as in TextStream."""

    def _begin(self, inputs, generation_config, seed, cancelled) -> None:
        if cancelled is not None and cancelled.is_set():
            raise Cancelled()
        self._seen = 0
        self._finish_lock = threading.Lock()
        self._request_id = None
        self._runner.active += 1
        try:
            self._request_id = self._runner.batcher.add(
                self, inputs["input_ids"][0].tolist(), generation_config, seed)
        except BaseException:
            self._runner.active -= 1
            raise

    def _on_output(self, output) -> None:
        """The answer's tokens so far, from the batcher's thread."""
        new = output.generated_tokens[self._seen:]
        self._seen = len(output.generated_tokens)
        if new and not self._ended.is_set():
            self._streamer.add(new)
        if output.error:
            self.error = GenerationError(f"Generation failed: {str(output.error).splitlines()[0]}")
        if self._stop.is_set() and self._request_id is not None:  # a stop string, or nobody reads
            self._runner.batcher.cancel(self._request_id)
            self._end_once()
        elif output.is_finished() or output.error:
            self._end_once()

    def _on_late_output(self, output) -> None:
        """Tokens made after a Stop, until the manager took the cancel in (tokens_after_close)."""
        if self.closed_at is not None:
            self._streamer.new_tokens += max(0, len(output.generated_tokens) - self._seen)
        self._seen = max(self._seen, len(output.generated_tokens))

    def _fail(self, error: GenerationError) -> None:
        self.error = error
        self._end_once()

    def _end_once(self) -> None:
        with self._finish_lock:
            if self._ended.is_set():
                return
            self._runner.active -= 1
            self._finish()

    def close(self, wait: float = 10.0):
        if self.closed_at is None and not self._ended.is_set():
            self.closed_at, self._tokens_at_close = time.perf_counter(), self.new_tokens
        self._stop.set()
        if not self._ended.is_set() and self._request_id is not None:
            self._runner.batcher.cancel(self._request_id)
            self._end_once()
        self._ended.wait(wait)


# ---------------------------------------------------------------- the runner

class Turns:
    """The model's one generation at a time, handed out in the order asked for (a plain lock
    picks any waiter); `first=True` (a tool loop's next step, whose answer already began)
    goes before those waiting."""

    def __init__(self):
        self._changed = threading.Condition()
        self._busy = False
        self._waiting: collections.deque = collections.deque()

    def acquire(self, first: bool = False) -> None:
        ticket = object()
        with self._changed:
            if first:
                self._waiting.appendleft(ticket)
            else:
                self._waiting.append(ticket)
            while self._busy or self._waiting[0] is not ticket:
                self._changed.wait()
            self._waiting.popleft()
            self._busy = True

    def release(self) -> None:
        with self._changed:
            self._busy = False
            self._changed.notify_all()


def tries_compile(setting: str, device: str) -> bool:
    """--compile auto compiles on CUDA only: elsewhere torch.compile of decoding isn't used by
    transformers, and the static cache alone is slower than the default one (README)."""
    return setting == "on" or (setting == "auto" and device == "cuda")


def default_torch_threads() -> int:
    """Torch threads for generating: the cores this process may use, less one for the web
    server. More threads than free cores make every thread wait for the slowest (README,
    Performance, has the figures)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


# Without autograd bookkeeping (inference_mode) generate was faster on CPU in most runs.
# Elsewhere the engine keeps generate's own no_grad: on a GPU the two were equal from a
# thread, and tensors made under inference_mode make a compiled step recompile (README,
# Performance; bench/gpu.py measures both).
GRAD_MODE = {"cpu": torch.inference_mode}


class ModelRunner:
    """A model loaded in this process (the engine_contract.Runner contract)."""

    loaded = True  # (app.ModelSlot stands in while a model loads)

    def __init__(self, model, processor, tokenizer, *, name: str, device: str,
                 dtype: torch.dtype, is_vision: bool, compile: bool = False,
                 torch_threads: int | None = None, record_token_times: bool = False,
                 quantization: str | None = None):
        self.model = model
        self.quantization = quantization  # "4bit" | "8bit" (bitsandbytes) | None
        self.record_token_times = record_token_times  # every token's time, on its stream (benchmarks)
        self.compile = compile  # static KV cache; transformers compiles decoding on CUDA
        self.torch_threads = torch_threads or default_torch_threads()
        self.grad_mode = GRAD_MODE.get(device, torch.no_grad)
        self.processor = processor      # None for text-only models
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.dtype = dtype
        self.is_vision = is_vision
        self._lock = Turns()
        self.batcher = None  # a batching.ContinuousBatcher: answers share the forward passes
        self.active = 0    # answers generating
        self.finish_listeners: list = []  # called with each TextStream when it ends (metrics)

    def _notify_finished(self, stream) -> None:
        notify_finished(self.finish_listeners, stream)

    @property
    def one_at_a_time(self) -> bool:
        """Without batching one answer generates at a time; the others wait in line."""
        return self.batcher is None

    def start_batching(self) -> None:
        from batching import ContinuousBatcher
        self.batcher = ContinuousBatcher(self.model, self.tokenizer, self.device, self.context_length)
        try:  # the manager's loop thread isn't a daemon: stop it before Python waits for it
            threading._register_atexit(self.batcher.close)
        except (AttributeError, RuntimeError):
            pass

    def close(self) -> None:
        """Stop the batching manager's thread, if any (the model itself needs nothing)."""
        if self.batcher is not None:
            self.batcher.close()

    @classmethod
    def load(cls, model: str = config.DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False, compile: str | bool = "auto",
             served_name: str | None = None, torch_threads: int | None = None,
             record_token_times: bool = False, batching: str = "off",
             quantize: str | None = None) -> "ModelRunner":
        """Hub id or local directory → ready runner. Raises ModelLoadError (one line).
        Its name is `served_name`, by default the hub id or the directory's own name.

        compile ("auto", "on", "off"): generate with a static KV cache, which transformers
        pairs with torch.compile of the decoding step ("reduce-overhead": CUDA graphs) on
        CUDA. "auto" does so on CUDA only, and only if the model generates that way (else it
        stays eager and logs why); "on" also on CPU/MPS (the static cache alone) and refuses
        a model that can't. The compile happens here, in a warm-up answer, not in the first
        user's. torch_threads: for generating (default_torch_threads()). record_token_times:
        every stream keeps each token's time (benchmarks). batching ("auto", "on", "off"):
        continuous batching (batching.py; auto: text-only models on CUDA); it replaces compile.
        quantize ("4bit", "8bit", None): bitsandbytes weights (quantization_config())."""
        compile = {True: "on", False: "off"}.get(compile, compile)
        if compile not in ("auto", "on", "off"):
            raise ModelLoadError(f"--compile must be auto, on or off, not {compile!r}.")
        device = pick_device(device)
        torch_dtype = pick_dtype(device, dtype)
        path = resolve_model_path(model, trust_remote_code)
        try:
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"Can't read the model config in {path}: {_first_line(e)}") from None
        # Decided from the config, not the name: is this an image-text-to-text architecture?
        is_vision = model_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        load_kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if device == "cuda":
            load_kwargs["device_map"] = "auto"  # spreads a large model over GPUs (and CPU)
        if quantize:
            load_kwargs["quantization_config"] = quantization_config(quantize, device, torch_dtype)
            if device != "cuda":  # a quantized model can't be moved with .to() afterwards
                load_kwargs["device_map"] = {"": device}
        try:
            if is_vision:
                processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
                tokenizer = processor.tokenizer
            else:
                processor = None
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            if not getattr(processor, "chat_template", None) and not tokenizer.chat_template:
                raise ModelLoadError(f"{model!r} has no chat template, so it can't be used as a chat "
                                     f"model (is it a base model? pick its instruct version).")
            model_class = AutoModelForImageTextToText if is_vision else AutoModelForCausalLM
            model_obj = model_class.from_pretrained(path, **load_kwargs)
        except ModelLoadError:
            raise
        except Exception as e:
            if quantize:
                raise ModelLoadError(f"--quantize {quantize}: {model!r} can't be loaded quantized with "
                                     f"bitsandbytes: {_first_line(e)}") from None
            raise ModelLoadError(f"Can't load the model from {path}: {_first_line(e)}") from None
        if device != "cuda" and not quantize:
            model_obj.to(device)
        model_obj.eval()
        runner = cls(model_obj, processor, tokenizer, name=served_name or served_model_name(model), device=device,
                     dtype=torch_dtype, is_vision=is_vision, torch_threads=torch_threads,
                     record_token_times=record_token_times, quantization=quantize)
        from batching import wants_batching
        if batching != "on" and tries_compile(compile, device):  # auto: compiled first, batched if not
            runner.compile_or_explain(forced=compile == "on")
        batched, why_not = wants_batching(batching, device, is_vision, compiled=runner.compile)
        if why_not and batching == "on":
            log.warning("--batching on: %s", why_not)
        if batched:
            if compile == "on":
                log.warning("--compile on is left out with --batching on (the manager runs its own step).")
            runner.start_batching()
            try:
                runner.warm_up()
            except BaseException:
                runner.close()
                raise
        elif batching == "on" and tries_compile(compile, device):
            runner.compile_or_explain(forced=compile == "on")
        return runner

    def compile_or_explain(self, forced: bool) -> None:
        """Switch to the static cache (compiled on CUDA) and warm it up; a model that can't
        generate so is refused when `forced`, else it stays eager and the log says why."""
        self.compile = True
        try:
            self.warm_up()
        except ModelLoadError as error:
            self._uncompile()
            if forced:
                raise ModelLoadError(f"--compile on: {self.name} can't generate with a static KV cache "
                                     f"({error}); start with --compile off.") from None
            log.warning("--compile auto: %s can't generate with a static KV cache (%s); it runs "
                        "without compile.", self.name, error)
            return
        if self.device != "cuda":
            log.warning("--compile on: torch.compile runs on CUDA only; on %s only the static KV cache "
                        "is used, which is usually slower than the default cache.", self.device)
        elif not hasattr(self.model, "_compiled_call"):
            # transformers did not compile (a model offloaded to CPU, quantized, ...): a static
            # cache alone is slower than the default one
            if forced:
                log.warning("--compile on: transformers did not compile %s (offloaded or quantized?); "
                            "it runs with the static KV cache alone.", self.name)
            else:
                self._uncompile()
                log.warning("--compile auto: transformers did not compile %s (offloaded or quantized?); "
                            "it runs without compile.", self.name)

    def _uncompile(self) -> None:
        """Back to the default cache, and what a failed compile left behind goes."""
        self.compile = False
        self.model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def warm_up(self) -> None:
        """One short answer, so that one-time work (with --compile on CUDA: compiling and
        capturing the decoding step, tens of seconds) happens before the first user's."""
        messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
        try:
            with self.stream(messages, GenerationSettings(max_new_tokens=8, min_new_tokens=8)) as stream:
                for _ in stream:
                    pass
        except (ChatInputError, GenerationError) as error:
            raise ModelLoadError(f"The model loaded but can't generate: {error}") from None

    # ------------------------------------------------------------ inputs

    @property
    def context_length(self) -> int | None:
        model_config = self.model.config
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        return getattr(text_config, "max_position_embeddings", None)

    def build_inputs(self, messages: list[dict], reserve_tokens: int = 1,
                     notices: list[str] | None = None, tools: list[dict] | None = None):
        """Chat messages → model inputs via the model's own chat template (with `tools`,
        JSON schemas, when given), leaving room for `reserve_tokens` new tokens. When the
        conversation doesn't fit, the oldest turns are left out (and a notice says so); a
        last message that alone doesn't fit is refused."""
        notices = [] if notices is None else notices
        messages = prepare_messages(messages, sees_images=self.is_vision, model_name=self.name,
                                    notices=notices)
        inputs = self._apply_chat_template(messages, tools)
        limit = self.context_length
        if limit and inputs["input_ids"].shape[-1] + reserve_tokens > limit:
            inputs = self._fit_in_context(messages, limit - reserve_tokens, notices, tools)
        if self.is_vision:  # BatchFeature: also casts pixel values to the model's dtype
            return inputs.to(self.model.device, dtype=self.dtype)
        return inputs.to(self.model.device)

    def _template_messages(self, messages: list[dict]) -> list[dict]:
        """Neutral messages → the shape chat templates expect: text-only templates often
        want plain strings; tool calls as {"type": "function", "function": {...}}."""
        shaped = []
        for message in alternate_roles(messages):
            text = "\n".join(p["text"] for p in message["content"] if p.get("type") == "text")
            if message["role"] == "tool":
                shaped.append({"role": "tool", "content": text, "tool_call_id": message.get("tool_call_id"),
                               "name": message.get("name")})
                continue
            item = {"role": message["role"], "content": message["content"] if self.is_vision else text}
            if message.get("tool_calls"):
                item["tool_calls"] = [{"id": call["id"], "type": "function",
                                       "function": {"name": call["name"], "arguments": call["arguments"]}}
                                      for call in message["tool_calls"]]
            shaped.append(item)
        return shaped

    def _apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None):
        template_owner = self.processor if self.is_vision else self.tokenizer
        return template_owner.apply_chat_template(
            self._template_messages(messages), tools=tools or None, add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt")

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Can the model call tools here? Its chat template must show it the tools and write
        an assistant's calls in a shape the app reads back from its answers: the Hermes
        `<tool_call>` tags, or any shape when the tokenizer ships a response_template
        (transformers parses it). Llama 3.x's bare JSON calls, for one, are not read."""
        probe = {"type": "function", "function": {"name": "tool_support_probe", "description": "A probe.",
                                                  "parameters": {"type": "object", "properties": {}}}}
        messages = [
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "assistant", "content": [], "tool_calls": [
                {"id": "call_probe", "name": "tool_support_probe", "arguments": {}}]},
            {"role": "tool", "tool_call_id": "call_probe", "name": "tool_support_probe",
             "content": [{"type": "text", "text": "probe result"}]}]
        template_owner = self.processor if self.is_vision else self.tokenizer
        try:
            rendered = str(template_owner.apply_chat_template(
                self._template_messages(messages), tools=[probe], tokenize=False, add_generation_prompt=True))
        except Exception:
            return False
        shows_tools = rendered.count("tool_support_probe") >= 2  # the tools, and the call
        return shows_tools and (TOOL_CALL_START in rendered or self.response_template is not None)

    @functools.cached_property
    def response_template(self) -> dict | None:
        """How this model's answers are parsed into content and tool calls: the tokenizer's
        own response_template, else the one transformers' serve keeps for its model type
        (Qwen2/2.5/3/3.5, Gemma 4), else None (the Hermes reading)."""
        template = getattr(self.tokenizer, "response_template", None)
        if template is not None:
            return template
        try:  # (imports transformers' server, ~2 s: only for a model that needs it)
            from transformers.cli.serving.utils import get_response_template
        except Exception:
            return None
        try:
            return get_response_template(self.tokenizer, self.model)
        except Exception:
            return None

    def _fit_in_context(self, messages: list[dict], budget: int, notices: list[str], tools: list[dict] | None):
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        # Cut before a user message, keeping whole turns; two user messages in a row (one
        # sent again after a refusal, through the API) can be cut apart: only the last one
        # is the new message.
        cuts = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
        fits = {}

        def try_cut(i):  # inputs without the first turns[:i], or None when still too long
            if i not in fits:
                inputs = self._apply_chat_template(system + turns[i:], tools)
                fits[i] = inputs if inputs["input_ids"].shape[-1] <= budget else None
            return fits[i]

        low, high = 0, len(cuts) - 1  # binary search for the fewest turns to drop
        while low <= high:
            middle = (low + high) // 2
            if try_cut(cuts[middle]) is not None:
                high = middle - 1
            else:
                low = middle + 1
        if low == len(cuts):
            last = self._apply_chat_template(system + turns[-1:], tools)["input_ids"].shape[-1]
            raise ChatInputError(
                f"This message is too long for the model: {last} tokens, and its context holds "
                f"{self.context_length} (with room for the answer). Send a shorter message.")
        dropped = cuts[low]
        notices.append(f"The oldest {dropped} message{'s' * (dropped > 1)} of this chat were left out "
                       f"so that it fits the model's context of {self.context_length} tokens.")
        return try_cut(dropped)

    # ------------------------------------------------------------ generation

    def generation_config(self, settings: GenerationSettings) -> GenerationConfig:
        generation = GenerationConfig.from_dict(self.model.generation_config.to_dict())
        generation.max_new_tokens = settings.max_new_tokens
        if settings.min_new_tokens:
            generation.min_new_tokens = settings.min_new_tokens
        if settings.temperature and settings.temperature > 0:
            generation.do_sample = True
            generation.temperature = settings.temperature
            generation.top_p = settings.top_p
            generation.top_k = None
        else:
            generation.do_sample = False
            generation.temperature = generation.top_p = generation.top_k = None
        if generation.pad_token_id is None:
            generation.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        if self.compile:
            generation.cache_implementation = "static"
            generation.max_cache_len = self.static_cache_tokens
        return generation

    @property
    def static_cache_tokens(self) -> int:
        """One cache size for every answer (a new size means a new compile), reserved whole."""
        return min(self.context_length or config.settings.compile_cache_tokens, config.settings.compile_cache_tokens)

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               on_update=None, cancelled: threading.Event | None = None) -> TextStream:
        """Start generating; raises ChatInputError for a conversation the model can't take.
        Waits while another answer generates; `cancelled` set meanwhile (Stop, the client
        gone) withdraws the request before anything runs (Cancelled). With on_update, the
        text is handed to it from the generate thread (see TextStream)."""
        settings = settings or GenerationSettings()
        if cancelled is not None and cancelled.is_set():
            raise Cancelled()
        if not 1 <= settings.max_new_tokens <= config.settings.max_new_tokens_limit:
            raise ChatInputError(f"max new tokens must be between 1 and {config.settings.max_new_tokens_limit}.")
        notices: list[str] = []
        limit = self.context_length
        # Room for the answer: all of max_new_tokens if possible, at least a quarter of the context.
        reserve = min(settings.max_new_tokens, limit // 4) if limit else 0
        inputs = self.build_inputs(messages, reserve_tokens=reserve, notices=notices, tools=settings.tools)
        generation = self.generation_config(settings)
        prompt_tokens = inputs["input_ids"].shape[-1]
        if limit:  # the answer ends ("length") where the context is full
            generation.max_new_tokens = min(generation.max_new_tokens, limit - prompt_tokens)
        if self.compile and prompt_tokens + generation.max_new_tokens > generation.max_cache_len:
            log.info("This answer (%d prompt tokens + up to %d new) is longer than the static cache "
                     "(%d tokens): it runs with the default cache, not compiled.",
                     prompt_tokens, generation.max_new_tokens, generation.max_cache_len)
            generation.cache_implementation = self.model.generation_config.cache_implementation
            generation.max_cache_len = None
        template = self.response_template if settings.tools else None
        reply_parsing = (template, inputs["input_ids"][0].tolist(), settings.tools) if template else None
        stream = (BatchedStream if self.batcher else TextStream)(
            self, inputs, generation, stop=settings.stop, seed=settings.seed,
            max_updates_per_second=settings.max_updates_per_second, on_update=on_update, cancelled=cancelled,
            reply_parsing=reply_parsing, continues=settings.continues_answer)
        if stream.max_new_tokens < generation.max_new_tokens:  # the batching cache cut it
            notices.append(f"This answer can be at most {stream.max_new_tokens} tokens long: that is what "
                           f"the batching cache holds beside this conversation.")
        stream.notices = notices
        stream.request_text = last_user_text(messages)
        prompt_tail = self.tokenizer.decode(inputs["input_ids"][0, -4:].tolist())
        stream.starts_in_reasoning = prompt_tail.rstrip().endswith(REASONING_START)
        return stream

    def parse_reply(self, answer_ids: list[int], template: dict, prompt_ids: list[int],
                    tools: list[dict]) -> dict | None:
        """An ended answer → {"content", "tool_calls": [{"name", "arguments": dict}]} with
        the model's own response_template (transformers' parse_response, on the raw tokens,
        special ones included); None when it can't (the Hermes reading applies then)."""
        try:
            parsed = self.tokenizer.parse_response(answer_ids, template, prefix=prompt_ids, tools=tools)
            calls = []
            for call in parsed.get("tool_calls") or []:
                function = call.get("function", call)
                arguments = function.get("arguments") or {}
                if isinstance(arguments, str):
                    arguments = json.loads(arguments) if arguments.strip() else {}
                if not isinstance(arguments, dict) or not isinstance(function.get("name"), str):
                    raise ValueError(f"a tool call without a name or object arguments: {call!r}")
                calls.append({"name": function["name"], "arguments": arguments})
            return {"content": str(parsed.get("content") or "").strip(), "tool_calls": calls}
        except Exception as error:
            log.warning("The model's response_template could not parse this answer (%s: %s); its tool "
                        "calls are read in the Hermes format instead.", type(error).__name__, error)
            return None

    def _describe_failure(self, error: BaseException) -> GenerationError:
        if isinstance(error, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return GenerationError("The GPU ran out of memory for this request. Try a shorter "
                                   "conversation, fewer images or fewer new tokens.")
        return GenerationError(f"Generation failed: {type(error).__name__}: {_first_line(error)}")
