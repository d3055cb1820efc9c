"""The engine: load a Hugging Face model, turn a chat into model inputs, stream the
answer token by token, and stop when asked. No Gradio in here.

    runner = ModelRunner.load("HuggingFaceTB/SmolVLM-256M-Instruct")   # or a local dir
    messages = [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                             {"type": "text", "text": "What is this?"}]}]
    with runner.stream(messages, GenerationSettings(max_new_tokens=200)) as stream:
        for reply in stream:         # the reply so far: reasoning, answer, tool calls
            print(reply.answer)
    stream.new_tokens, stream.finish_reason, stream.time_to_first_token

One generation loop per model (`GenerationLoop`): every answer, and the warm-up that
compiles, is built and generated on one long-lived thread, taking requests in arrival
order (a tool loop's next step first). In the engine process that thread is the process's
main thread; here, one thread of its own. Callers only hand a request in and wait for its
stream (`Job`); Stop sets an event a stopping criterion reads, so generation ends within a
token. The generating thread makes the reply's parts (conversation.ReplyParser) and hands
each due update out itself.

Messages are the neutral chat format the UI and any API adapter build: a role
("system" | "user" | "assistant" | "tool") and a list of parts, `{"type": "text", "text": ...}`
or `{"type": "image", "image": <path or PIL.Image>}`.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path

import torch
from tokenizers.decoders import DecodeStream
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    ProcessorMixin,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
)

import attachments
import transformers_internals
from decoding import GrammarConstraint, LogprobsRecorder, Penalties, grammar_tokenizer
from structured_output import grammar_for
from config import DEFAULT_MODEL, Settings
from conversation import (
    REASONING_END,
    REASONING_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    ReplyParser,
    alternate_roles,
    last_user_text,
    prepare_messages,
    reads_files,
    reasoning_and_answer,
    tool_pictures_after_results,
)
from engine_contract import (  # noqa: F401  (re-exported: callers of the engine use them with it)
    ANSWER_CUT_TO_BATCH_CACHE,
    ActiveCount,
    Cancelled,
    ChatInputError,
    ContextTooLong,
    GenerationError,
    GenerationSettings,
    ModelLoadError,
    RunnerInfo,
    Signal,
    StreamBase,
    ToolCall,
    first_line,
    served_model_name,
)

log = logging.getLogger("engine")
TOOLS_OFF = ("its chat template doesn't take tools, or writes its calls in a shape the app doesn't read "
             "(it reads Hermes <tool_call> tags, or what the tokenizer's response_template describes; "
             "Qwen2.5 and Qwen3 do)")

# ---------------------------------------------------------------- loading

def share_kept(kept: int, whole: int) -> str:
    """How much of a cut document was kept, never "0%" or "100%" for a part."""
    if kept * 100 < whole:
        return f"{kept:,} tokens (less than 1%)"
    if kept * 200 >= whole * 199:
        return f"all but {whole - kept:,} tokens"
    return f"{kept / whole:.0%}"


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
        raise ModelLoadError(f"Can't download {model!r}: {first_line(e)}. {hint}") from None
    return path




# ---------------------------------------------------------------- streaming pieces

class IncrementalTextStreamer(BaseStreamer):
    """Hands generated text to `on_text` as tokens arrive, and counts them on `figures` (the
    stream: new_tokens, first_token_at, last_token_at, token_times when it keeps them).

    Each token is decoded once, incrementally and UTF-8-safely (a character split over
    several byte tokens comes out whole, when complete), unlike TextIteratorStreamer,
    which re-decodes the whole line on every token. Empty pieces are never handed out.
    """

    def __init__(self, tokenizer, on_text, figures=None):
        self.on_text = on_text
        self.figures = figures if figures is not None else _Figures()
        self.ids: list[int] = []  # the answer's token ids (a response_template parses them)
        self.on_token = None      # called with each new token's id (logprobs)
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
        figures = self.figures
        figures.last_token_at = now = time.perf_counter()
        if figures.first_token_at is None:
            figures.first_token_at = now
        for token_id in token_ids:
            figures.new_tokens += 1
            self.ids.append(token_id)
            if self.on_token is not None:
                self.on_token(token_id)
            if figures.token_times is not None:
                figures.token_times.append(now)
            text = self._step(token_id)
            if text:
                self.on_text(text)

    def end(self):
        pass


class _Figures:
    """Where a streamer used alone (benchmarks) counts its tokens."""
    new_tokens, first_token_at, last_token_at, token_times = 0, None, None, None


class _StopOnEvent(StoppingCriteria):
    """Stops generation at the next token once the event is set. Its two possible answers
    are made once: no new (device) tensor per token."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.steps = 0  # the tokens it has decided on (generate streams each one just after)
        self._answers: dict = {}

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        key = (input_ids.shape[0], input_ids.device)
        if key not in self._answers:
            self._answers[key] = tuple(torch.full((input_ids.shape[0],), flag, dtype=torch.bool,
                                                  device=input_ids.device) for flag in (False, True))
        return self._answers[key][self.event.is_set()]


class TextStream(StreamBase):
    """One answer of a model in this process (a StreamBase). `run()` generates it, on the
    generation loop's thread; that thread turns tokens into text, cuts it at a stop string,
    makes the reply's parts and hands the reply out when an update is due: to `on_update`
    (the engine process sends it on), or else to the iterator. No other thread wakes per
    token, so the one that generates has the interpreter to itself."""

    def __init__(self, runner: "ModelRunner", inputs, generation_config: GenerationConfig, *,
                 settings: GenerationSettings, parser: ReplyParser, reply_parsing: tuple | None = None,
                 on_update=None, on_end=None, request_text: str = "", notices: list[str] = (),
                 logits_processors=()):
        super().__init__(max_new_tokens=generation_config.max_new_tokens,
                         max_updates_per_second=settings.max_updates_per_second,
                         listeners=runner.finish_listeners, on_update=on_update, on_end=on_end,
                         request_text=request_text, arrived_at=settings.arrived_at)
        self.notices = list(notices)
        self.token_times = [] if runner.record_token_times else None
        self._runner = runner
        self._inputs, self._generation_config, self._seed = inputs, generation_config, settings.seed
        self._stop = threading.Event()
        self._stop_check = _StopOnEvent(self._stop)
        self._stop_reason = "cancelled"
        self._stop_strings = [s for s in settings.stop if s]
        self._reasoning_counted = False  # reasoning_tokens known (the reasoning's end written)
        self._streamer = IncrementalTextStreamer(runner.tokenizer, self._on_text, figures=self)
        self._parser = parser
        self._reply_parsing = reply_parsing  # (template, prompt ids, tools): parsed at the end
        self._raw = ""
        self._visible = ""
        self.prompt_tokens = int(inputs["input_ids"].shape[-1])
        self._logits_processors = LogitsProcessorList(logits_processors)
        for processor in logits_processors:
            if isinstance(processor, LogprobsRecorder):  # its entries are this stream's, token by token
                processor.out = self.logprobs
                self._streamer.on_token = processor.take

    def run(self) -> None:
        """Generate the whole answer, here (the generation loop's thread)."""
        runner = self._runner
        self.generated_on = threading.get_native_id()
        error = None
        try:
            if self._seed is not None:  # one answer at a time: no other draws from the RNG
                torch.manual_seed(self._seed)
            with runner.grad_mode():
                runner.model.generate(
                    **self._inputs, generation_config=self._generation_config, streamer=self._streamer,
                    logits_processor=self._logits_processors,
                    stopping_criteria=StoppingCriteriaList([self._stop_check]))
        except BaseException as failure:  # reaches the consumer, never lost in the loop
            error = runner.describe_failure(failure)
        finally:
            runner.counted.add(-1)
            self._inputs = None
            self._finish_safely(error)

    def _finish_safely(self, error: BaseException | None) -> None:
        try:
            self._finish(error)
        except Exception as failure:  # a bug of ours in the end's parsing: the reader still hears the end
            log.exception("ending an answer failed")
            self._end("error", GenerationError(f"Internal error: {type(failure).__name__}: {failure}"))

    def _finish(self, error: BaseException | None) -> None:
        """The answer has ended: its reason, its final reply (the response_template's reading
        where there is one), everyone told."""
        if error is not None:
            reason = "error"
        elif self._stop.is_set():
            reason = self._stop_reason
        else:
            reason = "length" if self.new_tokens >= self.max_new_tokens else "stop"
        if self._stop_reason != "stop":
            self._visible = self._raw  # a held-back partial stop string that never completed
        parsed = None
        if self._reply_parsing and error is None:
            parsed = self._runner.parse_reply(self._streamer.ids, *self._reply_parsing)
        self.reply = self._parser.parse(self._visible, final=True, parsed=parsed)
        if not self._reasoning_counted and self.reply.reasoning is not None and not self.reply.answer:
            self.reasoning_tokens = self.new_tokens  # (it ended while still thinking)
        self._end(reason, error)

    def _on_text(self, piece: str) -> None:
        """A new piece of text, in the generating thread."""
        if self._stop_reason == "stop":  # cut at a stop string: what follows is not shown
            return
        self._add(piece)
        if not self._reasoning_counted and REASONING_END in self._raw[-(len(piece) + len(REASONING_END)):]:
            self._reasoning_counted = True  # (its closing tag written: the tokens so far were reasoning)
            if self._parser.starts_in_reasoning or self._raw.lstrip().startswith(REASONING_START):
                self.reasoning_tokens = self.new_tokens
        if self._throttle.may_show():
            self._update(self._parser.parse(self._visible))

    def _add(self, piece: str):
        """Append generated text; the visible text never shows a stop string, nor the
        start of one that may still complete."""
        searched_from = max(0, len(self._raw) - max(map(len, self._stop_strings), default=0))
        self._raw += piece
        if not self._stop_strings:
            self._visible = self._raw
            return
        for stop in self._stop_strings:
            at = self._raw.find(stop, searched_from)
            if at >= 0:
                self._raw = self._visible = self._raw[:at]
                self._stop_reason = "stop"
                self._stop.set()
                return
        held = max((k for stop in self._stop_strings for k in range(1, len(stop))
                    if self._raw.endswith(stop[:k])), default=0)
        self._visible = self._raw[:len(self._raw) - held]

    def _request_stop(self) -> None:
        self._stop.set()

    def _tokens_decided(self) -> int:
        """generate() checks the stop before it streams the token it just made: a Stop
        between the two finds that token made, though not yet counted."""
        return self._stop_check.steps


class BatchedStream(TextStream):
    """One answer in the continuous batch (batching.py): the manager's own thread generates
    it beside the others and hands over its tokens; the text is made, cut at a stop string
    and handed out exactly as in TextStream. Its outputs and a Stop (from any thread) take
    one lock: the end comes once, and nothing after it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seen = 0
        self._lock = threading.RLock()
        self._finishing = False
        self._request_id: str | None = None  # (batcher.add sets it before the first output can come)

    def run(self) -> None:
        """Hand the answer to the manager (it generates in its own thread); returns at once."""
        if self._stop.is_set():  # stopped before it was handed over
            self._inputs = None
            self._end_batched(None)
            return
        try:
            self._request_id = self._runner.batcher.add(
                self, self._inputs["input_ids"][0].tolist(), self._generation_config, self._seed)
        except Exception as error:  # (the server is stopping): this answer ends, the loop goes on
            self._end_batched(error if isinstance(error, GenerationError) else self._runner.describe_failure(error))
        finally:
            self._inputs = None

    def _on_output(self, output) -> None:
        """The answer's tokens so far, in the manager's thread."""
        with self._lock:
            self.generated_on = threading.get_native_id()
            new = output.generated_tokens[self._seen:]
            self._seen = len(output.generated_tokens)
            if self._ended.is_set() or self._finishing:
                if self.closed_at is not None:  # made after a Stop, before the manager took the cancel in
                    self.new_tokens += len(new)
                if self._stop.is_set():  # (a Stop just as it was handed over)
                    self._runner.batcher.cancel(self._request_id)
                return
            if new:
                self._streamer.add(new)
            if output.error:
                self._end_batched(GenerationError(f"Generation failed: {str(output.error).splitlines()[0]}"))
            elif self._stop.is_set():  # a stop string, or nobody reads
                self._runner.batcher.cancel(self._request_id)
                self._end_batched(None)
            elif output.is_finished():
                self._end_batched(None)

    def _fail(self, error: GenerationError) -> None:
        self._end_batched(error)

    def _end_batched(self, error: GenerationError | None) -> None:
        with self._lock:  # the manager's thread and a Stop may both end it; once
            if self._ended.is_set() or self._finishing:
                return
            self._finishing = True
            self._runner.counted.add(-1)
            self._finish_safely(error)

    def _tokens_decided(self) -> int:
        return self.new_tokens  # (the manager makes its tokens: no stop check of ours)

    def _request_stop(self) -> None:
        self._stop.set()
        if self._request_id is not None:
            self._runner.batcher.cancel(self._request_id)
        self._end_batched(None)

# ---------------------------------------------------------------- the generation loop

class Job:
    """A request on its way to the generation loop. The caller waits for its stream or its
    refusal: `result()`, or `on_decided(job)` (the engine process). `withdraw()` (Stop, a
    client gone) drops it unstarted, or stops its answer within a token."""

    def __init__(self, messages: list[dict], settings: GenerationSettings, *, on_update=None, on_end=None,
                 on_decided=None, on_reading=None, on_taken=None):
        self.messages, self.settings = messages, settings
        self.first = settings.continues_answer  # a tool loop's next step: before later requests
        self.on_update, self.on_end, self._on_decided = on_update, on_end, on_decided
        self.on_reading = on_reading  # told (once: reading()) if its files are read before it can start
        self.on_taken = on_taken  # told when the loop takes it (its inputs are built next)
        self.stream: TextStream | None = None
        self.refusal: BaseException | None = None
        self.prepared: tuple[list[dict], list[str]] | None = None  # its messages with their files read, notices
        self._state = "waiting"  # waiting -> taken (by the loop) | withdrawn
        self._stop_asked = False
        self._lock = threading.Lock()
        self._decided = threading.Event()

    def withdraw(self) -> None:
        """Any thread: drop it if the loop has not taken it, else stop its answer."""
        with self._lock:
            self._stop_asked = True
            dropped = self._state == "waiting"
            if dropped:
                self._state = "withdrawn"
                self.refusal = Cancelled()
            stream = self.stream
        if dropped:
            self._decide()
        elif stream is not None:
            stream.close(wait=0)

    def reading(self) -> None:
        """Its files are being read (attachments.reading_notice): on_reading is told, once."""
        on_reading, self.on_reading = self.on_reading, None
        if on_reading is not None:
            on_reading()

    @property
    def withdrawn(self) -> bool:
        """A Stop (or its client gone) came."""
        return self._stop_asked

    def take(self) -> bool:
        """The loop's: False when it was withdrawn while it waited."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "taken"
        if self.on_taken is not None:
            self.on_taken()
        return True

    def refuse(self, error: BaseException) -> None:
        self.refusal = error
        self._decide()

    def start(self, stream: "TextStream") -> bool:
        """Its stream is ready to generate: False (refused as withdrawn) when a Stop came
        while its inputs were built."""
        with self._lock:
            withdrawn = self._stop_asked
            if not withdrawn:
                self.stream = stream
        if withdrawn:
            self.refuse(Cancelled())
            return False
        self._decide()
        return True

    def _decide(self) -> None:
        self._decided.set()
        if self._on_decided is not None:
            self._on_decided(self)

    def result(self) -> "TextStream":
        """Wait until the loop starts it (its stream) or refuses it (raised)."""
        self._decided.wait()
        if self.refusal is not None:
            raise self.refusal
        return self.stream


class GenerationLoop:
    """The one long-lived thread that builds and generates every answer of a model, in
    arrival order (a tool loop's next step first). `own_thread`: a thread of its own, started
    with the runner (and again in a forked process: ZeroGPU's worker); else whoever calls
    `run()` is the loop (the engine process's main thread)."""

    def __init__(self, serve, torch_threads: int, own_thread: bool = True):
        self._serve, self._torch_threads, self.own_thread = serve, torch_threads, own_thread
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self.closed = False
        self.thread: threading.Thread | None = None
        self._pid: int | None = None
        if own_thread:
            self._ensure_thread()
        else:  # the thread that made it will run it
            self.thread, self._pid = threading.current_thread(), os.getpid()

    @property
    def native_id(self) -> int | None:
        return self.thread.native_id if self.thread is not None else None

    def submit(self, job: Job) -> None:
        if self.own_thread:
            self._ensure_thread()
        with self._lock:  # (not between stop() and its marker)
            if not self.closed:
                self._jobs.put((0 if job.first else 1, next(self._order), job))
                return
        job.refuse(GenerationError("The server is stopping."))

    def _ensure_thread(self) -> None:
        with self._lock:
            if self.closed or self.thread is not None and self.thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()  # (threads don't survive a fork: ZeroGPU's worker starts its own)
            self.thread = threading.Thread(target=self.run, name="generation-loop", daemon=True)
            self.thread.start()  # (returns once the thread runs: its native_id is known)

    def run(self, until_idle: bool = False) -> None:
        """Serve jobs on this thread until stop() (or, `until_idle`, until none is waiting)."""
        while True:
            if until_idle and self._jobs.empty():
                return
            _, _, job = self._jobs.get()
            if job is None:
                self._refuse_waiting()
                return
            # Torch work in a thread runs on torch's default thread count, and another thread
            # may change that count later: set ours for every answer (cheap).
            torch.set_num_threads(self._torch_threads)
            try:
                self._serve(job)
            except Exception:  # a bug of ours: that request's, never the loop's end
                log.exception("the generation loop failed to serve a request")

    def stop(self) -> None:
        """The loop ends after the request it is serving; those waiting, and any submitted
        from now on, are refused."""
        with self._lock:
            self.closed = True
        self._jobs.put((-1, next(self._order), None))

    def _refuse_waiting(self) -> None:
        while not self._jobs.empty():
            _, _, job = self._jobs.get()
            if job is not None and job.take():
                job.refuse(GenerationError("The server is stopping."))


AUDIO_THROUGH_THEIR_OWN_PROMPT = ("granite_speech",)  # (its processor wants <|audio|> in a text prompt, and torchaudio)


def hears_audio_at(processor, config) -> int | None:
    """The sampling rate a model hears audio at, None when it doesn't: its processor has a
    feature extractor and an audio token, its config an audio tower (a Gemma 4 without one
    keeps the extractor), and it takes audio as samples through the common chat-template path
    (Voxtral's and Granite Speech's processors take files or their own prompts: not here)."""
    extractor = getattr(processor, "feature_extractor", None) or getattr(processor, "audio_processor", None)
    if extractor is None or not getattr(processor, "audio_token", None):
        return None
    if getattr(config, "audio_config", True) is None or config.model_type in AUDIO_THROUGH_THEIR_OWN_PROMPT:
        return None
    if type(processor).apply_chat_template is not ProcessorMixin.apply_chat_template:
        return None
    return getattr(extractor, "sampling_rate", None)


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


# ---------------------------------------------------------------- the runner

class ModelRunner:
    """A model loaded in this process (the engine_contract.Runner contract)."""

    loaded = True  # (app.ModelSlot stands in while a model loads)
    problem = None  # (it answers while this process runs)

    def __init__(self, model, processor, tokenizer, *, settings: Settings, name: str, device: str,
                 dtype: torch.dtype, is_vision: bool, record_token_times: bool = False, loop_thread: bool = True):
        self.model = model
        self.settings = settings
        self.quantization = settings.quantize  # "4bit" | "8bit" (bitsandbytes) | None
        self.record_token_times = record_token_times  # every token's time, on its stream (benchmarks)
        self.compile = False  # static KV cache; transformers compiles decoding on CUDA
        self.torch_threads = settings.torch_threads or default_torch_threads()
        self.grad_mode = GRAD_MODE.get(device, torch.no_grad)
        self.processor = processor      # None for text-only models
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.dtype = dtype
        self.is_vision = is_vision
        # Control tokens in messages are text: marked by the chat template (sanitize_control_tokens),
        # or, for a processor with a __call__ of its own (Idefics3's: it counts "<image>" in the
        # text and needs character offsets, which sanitizing loses), broken by _as_typed.
        self._sanitizes = processor is None or type(processor).__call__ is ProcessorMixin.__call__
        self.audio_rate = hears_audio_at(processor, model.config)  # None: it doesn't hear
        self.sees_video = is_vision and self._takes_video()
        self.batcher = None  # a batching.ContinuousBatcher: answers share the forward passes
        self.counted = ActiveCount()  # answers generating (self.active)
        self.finish_listeners: list = []  # called with each stream when it ends (metrics)
        self.warmed_up_on: int | None = None  # the native id of the thread that ran the warm-up
        self.loop = GenerationLoop(self._serve, self.torch_threads, own_thread=loop_thread)

    @property
    def info(self) -> RunnerInfo:
        return RunnerInfo(name=self.name, device=self.device, dtype=str(self.dtype).removeprefix("torch."),
                          is_vision=self.is_vision, hears_audio=self.audio_rate is not None, sees_video=self.sees_video,
                          compile=self.compile, quantization=self.quantization,
                          batching=self.batcher is not None, supports_tools=self.supports_tools,
                          tools_off="" if self.supports_tools else TOOLS_OFF,
                          torch_threads=self.torch_threads, loop_thread=self.loop.native_id)

    @property
    def one_at_a_time(self) -> bool:
        """Without batching one answer generates at a time; the others wait in line."""
        return self.batcher is None

    @property
    def active(self) -> int:
        return self.counted.value

    def start_batching(self) -> None:
        from batching import ContinuousBatcher
        self.batcher = ContinuousBatcher(self.model, self.tokenizer, self.device, self.context_length)
        try:  # the manager's loop thread isn't a daemon: stop it before Python waits for it
            threading._register_atexit(self.batcher.close)
        except (AttributeError, RuntimeError):
            pass

    def close(self) -> None:
        """Stop the generation loop and the batching manager's thread, if any."""
        if self.batcher is not None:
            self.batcher.close()
        self.loop.stop()

    @classmethod
    def load(cls, model: str | None = None, settings: Settings | None = None, *, record_token_times: bool = False,
             loop_thread: bool = True, **overrides) -> "ModelRunner":
        """Hub id or local directory → ready runner. Raises ModelLoadError (one line).

        `settings` (config.Settings; default: the defaults) says how: device, dtype, compile,
        batching, quantize, torch_threads, trust_remote_code, served_model_name; `overrides`
        replace single ones (`device="cpu"`). Its name is served_model_name, by default the
        hub id or the directory's own name.

        compile ("auto", "on", "off"): generate with a static KV cache, which transformers
        pairs with torch.compile of the decoding step ("reduce-overhead": CUDA graphs) on
        CUDA. "auto" does so on CUDA only, and only if the model generates that way (else it
        stays eager and logs why); "on" also on CPU/MPS (the static cache alone) and refuses
        a model that can't. The compile happens here, in a warm-up answer on the generation
        loop's thread, not in the first user's. batching ("auto", "on", "off"): continuous
        batching (batching.py; auto: text-only models on CUDA); it replaces compile.
        quantize ("4bit", "8bit", None): bitsandbytes weights (quantization_config()).
        record_token_times: every stream keeps each token's time (benchmarks). loop_thread:
        False when the caller's thread is to be the generation loop (it calls `loop.run()`)."""
        settings = (settings or Settings()).replace(**overrides)
        if model:
            settings = settings.replace(model=model)
        model = settings.model or DEFAULT_MODEL
        compile = {True: "on", False: "off"}.get(settings.compile, settings.compile)
        if compile not in ("auto", "on", "off"):
            raise ModelLoadError(f"--compile must be auto, on or off, not {compile!r}.")
        settings = settings.replace(compile=compile)
        trust_remote_code, quantize = settings.trust_remote_code, settings.quantize
        device = pick_device(settings.device)
        torch_dtype = pick_dtype(device, settings.dtype)
        path = resolve_model_path(model, trust_remote_code)
        try:
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"Can't read the model config in {path}: {first_line(e)}") from None
        # Decided from the config, not the name: does it take images (image-text-to-text), or
        # other inputs through a processor (multimodal: audio models too)?
        is_vision = model_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        multimodal = is_vision or model_config.model_type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES
        load_kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if device == "cuda":
            load_kwargs["device_map"] = "auto"  # spreads a large model over GPUs (and CPU)
        if quantize:
            load_kwargs["quantization_config"] = quantization_config(quantize, device, torch_dtype)
            if device != "cuda":  # a quantized model can't be moved with .to() afterwards
                load_kwargs["device_map"] = {"": device}
        try:
            if multimodal:
                processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
                tokenizer = processor.tokenizer
            else:
                processor = None
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            if not getattr(processor, "chat_template", None) and not tokenizer.chat_template:
                raise ModelLoadError(f"{model!r} has no chat template, so it can't be used as a chat "
                                     f"model (is it a base model? pick its instruct version).")
            model_class = AutoModelForImageTextToText if is_vision else \
                AutoModelForMultimodalLM if multimodal else AutoModelForCausalLM
            model_obj = model_class.from_pretrained(path, **load_kwargs)
        except ModelLoadError:
            raise
        except Exception as e:
            if quantize:
                raise ModelLoadError(f"--quantize {quantize}: {model!r} can't be loaded quantized with "
                                     f"bitsandbytes: {first_line(e)}") from None
            raise ModelLoadError(f"Can't load the model from {path}: {first_line(e)}") from None
        if device != "cuda" and not quantize:
            model_obj.to(device)
        model_obj.eval()
        runner = cls(model_obj, processor, tokenizer, settings=settings,
                     name=settings.served_model_name or served_model_name(model), device=device,
                     dtype=torch_dtype, is_vision=is_vision, record_token_times=record_token_times,
                     loop_thread=loop_thread)
        try:
            runner._prepare(compile, settings.batching)
        except BaseException:
            runner.close()
            raise
        return runner

    def _prepare(self, compile: str, batching: str) -> None:
        """Compile, or start batching, as the settings say (warming up either)."""
        from batching import wants_batching
        if batching != "on" and tries_compile(compile, self.device):  # auto: compiled first, batched if not
            self.compile_or_explain(forced=compile == "on")
        batched, why_not = wants_batching(batching, self.device, self.processor is not None, compiled=self.compile)
        if why_not and batching == "on":
            log.warning("--batching on: %s", why_not)
        if batched:
            if compile == "on":
                log.warning("--compile on is left out with --batching on (the manager runs its own step).")
            self.start_batching()
            self.warm_up()
        elif batching == "on" and tries_compile(compile, self.device):
            self.compile_or_explain(forced=compile == "on")
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
        elif not transformers_internals.is_compiled(self.model):
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
        transformers_internals.forget_compiled(self.model)
        torch._dynamo.reset()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def warm_up(self) -> None:
        """One short answer on the generation loop's thread, so that one-time work (with
        --compile on CUDA: compiling and capturing the decoding step, tens of seconds) happens
        before the first user's."""
        messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
        job = Job(messages, GenerationSettings(max_new_tokens=8, min_new_tokens=8))
        self.submit(job)
        if not self.loop.own_thread:  # this thread is the loop: serve it here
            self.loop.run(until_idle=True)
        try:
            with job.result() as stream:
                for _ in stream:
                    pass
        except (ChatInputError, GenerationError) as error:
            raise ModelLoadError(f"The model loaded but can't generate: {error}") from None
        self.warmed_up_on = stream.generated_on

    # ------------------------------------------------------------ answers

    def stream(self, messages: list[dict], settings: GenerationSettings | None = None,
               cancelled: Signal | None = None, on_reading=None, on_update=None) -> TextStream:
        """Start an answer: hand it to the generation loop and wait until the loop starts it.
        Raises ChatInputError for a conversation the model can't take; `cancelled` set while
        it waits (Stop, the client gone) withdraws it before anything runs (Cancelled), and
        set later stops it. `on_reading`: told if its files are being read before it can
        start (engine_contract.Runner). With on_update, the replies go to it from the
        generating thread."""
        job = Job(messages, settings or GenerationSettings(max_new_tokens=self.settings.max_new_tokens),
                  on_update=on_update, on_reading=on_reading)
        if cancelled is not None:
            if cancelled.is_set():
                raise Cancelled()
            cancelled.on_set(job.withdraw)
        self.submit(job)
        return job.result()

    def submit(self, job: Job) -> None:
        """Hand a request to the generation loop; `job` says when it starts or is refused."""
        limit = self.settings.max_new_tokens_limit
        if not 1 <= job.settings.max_new_tokens <= limit:
            job.refuse(ChatInputError(f"max new tokens must be between 1 and {limit}."))
            return
        if not job.settings.raw_prompt and reads_files(job.messages):
            threading.Thread(target=self._read_files, args=(job,), name="reading-files", daemon=True).start()
        else:
            self.loop.submit(job)

    def _read_files(self, job: Job) -> None:
        """A request's files read (documents, audio, video: in reader processes) before it goes
        to the loop, so that the loop serves the others meanwhile."""
        if job.withdrawn:  # (Stop before its files were read: nothing to read them for)
            return
        attachments.reading_notice.set(job.reading)  # (a file not remembered is read: the line lets the next through)
        try:
            notices: list[str] = []
            job.prepared = (self.prepare_messages(job.messages, notices), notices)
        except Exception as error:
            if not isinstance(error, ChatInputError):  # a bug of ours: say so, keep serving
                log.exception("reading a request's files failed")
                error = GenerationError(f"Internal error: {type(error).__name__}: {error}")
            if job.take():
                job.refuse(error)
            return
        self.loop.submit(job)

    def prepare_messages(self, messages: list[dict], notices: list[str]) -> list[dict]:
        """The conversation's parts as this model takes them (conversation.prepare_messages)."""
        return prepare_messages(messages, sees_images=self.is_vision, model_name=self.name, settings=self.settings,
                                notices=notices, audio_rate=self.audio_rate, sees_video=self.sees_video)

    def _serve(self, job: Job) -> None:
        """The generation loop's work for one request: its inputs, then its answer, here."""
        if not job.take():
            return  # withdrawn while it waited: already refused
        try:
            stream = self._open(job)
        except (ChatInputError, GenerationError) as error:
            job.refuse(error)
            return
        except Exception as error:  # a bug of ours: say so, keep serving
            log.exception("building the model inputs failed")
            job.refuse(GenerationError(f"Internal error: {type(error).__name__}: {error}"))
            return
        self.counted.add(1)  # (counted before the caller hears it started; the stream's end uncounts it)
        if job.start(stream):
            stream.run()
        else:
            self.counted.add(-1)

    def _open(self, job: Job) -> TextStream:
        """A request's stream, ready to run: its inputs built within the context, its
        generation config, how its reply is parsed."""
        settings = job.settings
        notices: list[str] = []
        limit = self.context_length
        # Room kept for the answer when a long conversation is cut to fit: max_new_tokens, at
        # most a quarter of the context (the conversation keeps the rest). A client that asked
        # for max_new_tokens (the API's max_tokens) gets all of it or a refusal, below.
        reserve = min(settings.max_new_tokens, limit // 4) if limit else 0
        structured = bool(settings.response_format or settings.tool_call_required)
        if structured and settings.min_new_tokens:  # (the grammar's end would be forbidden: nothing left)
            raise ChatInputError("min_new_tokens can't be combined with a structured output.")
        if settings.raw_prompt:  # (a legacy completion: the text as it is, no template)
            text = "".join(part["text"] for part in job.messages[-1]["content"] if part["type"] == "text")
            inputs = self.tokenizer(text, return_tensors="pt").to(self.model.device)
            if limit and inputs["input_ids"].shape[-1] + reserve > limit:
                raise ContextTooLong(f"This prompt ({inputs['input_ids'].shape[-1]} tokens) leaves no room "
                                     f"for the answer in the model's {limit}-token context.")
        else:
            messages, notices = (job.prepared[0], list(job.prepared[1])) if job.prepared else (job.messages, notices)
            inputs = self.build_inputs(messages, reserve_tokens=reserve, notices=notices, tools=settings.tools,
                                       prepared=job.prepared is not None)
        prompt_tail = self.tokenizer.decode(inputs["input_ids"][0, -4:].tolist())
        starts_in_reasoning = prompt_tail.rstrip().endswith(REASONING_START) and not settings.raw_prompt
        if structured and starts_in_reasoning:  # structured: the JSON, no reasoning first
            inputs = self.close_reasoning(inputs)
            starts_in_reasoning = False
        generation = self.generation_config(settings)
        prompt_tokens = inputs["input_ids"].shape[-1]
        asked = settings.max_new_tokens if settings.max_new_tokens_asked else None
        if limit and asked and prompt_tokens + asked > limit:
            raise ContextTooLong(f"This conversation ({prompt_tokens} tokens) and the {asked} tokens asked for the "
                                 f"answer are more than the model's {limit}-token context holds: ask for at most "
                                 f"{max(limit - prompt_tokens, 0)} tokens, or send less.")
        if limit:  # the answer ends ("length") where the context is full
            generation.max_new_tokens = min(generation.max_new_tokens, limit - prompt_tokens)
        if self.batcher is not None:  # what the batching cache holds beside this conversation
            allowed = self.batcher.admit(prompt_tokens, generation.max_new_tokens, settings.seed)
            if allowed < generation.max_new_tokens and asked:
                raise ContextTooLong(f"This conversation ({prompt_tokens} tokens) and the {asked} tokens asked for "
                                     f"the answer: the batching cache holds {allowed} more beside it. Ask for at "
                                     f"most {allowed}, or send less.")
            if allowed < generation.max_new_tokens:
                notices.append(ANSWER_CUT_TO_BATCH_CACHE.format(tokens=allowed))
                generation.max_new_tokens = allowed
        if self.compile and prompt_tokens + generation.max_new_tokens > generation.max_cache_len:
            log.info("This answer (%d prompt tokens + up to %d new) is longer than the static cache "
                     "(%d tokens): it runs with the default cache, not compiled.",
                     prompt_tokens, generation.max_new_tokens, generation.max_cache_len)
            generation.cache_implementation = self.model.generation_config.cache_implementation
            generation.max_cache_len = None
        constraint = self.grammar_constraint(settings, generation) \
            if settings.response_format or settings.tool_call_required else None
        if self.batcher is not None and (settings.presence_penalty or settings.frequency_penalty
                                         or settings.logprobs is not None):
            raise ChatInputError("presence_penalty, frequency_penalty and logprobs apply to one answer at a time: "
                                 "this server batches answers (--batching); start it with --batching off.")
        recorder = LogprobsRecorder(settings.logprobs, generation, self.describe_token, self.end_ids(generation)) \
            if settings.logprobs is not None else None
        template = self.response_template if settings.tools else None
        reply_parsing = (template, inputs["input_ids"][0].tolist(), settings.tools) if template else None
        parser = ReplyParser(starts_in_reasoning=starts_in_reasoning, tools=bool(settings.tools),
                             names={tool["function"]["name"] for tool in settings.tools or ()}
                             if settings.calls_of_offered_tools_only else None)
        return (BatchedStream if self.batcher else TextStream)(
            self, inputs, generation, settings=settings, parser=parser, reply_parsing=reply_parsing,
            on_update=job.on_update, on_end=job.on_end, request_text=last_user_text(job.messages),
            notices=notices, logits_processors=[processor for processor in (
                constraint, Penalties(settings.presence_penalty, settings.frequency_penalty)
                if settings.presence_penalty or settings.frequency_penalty else None, recorder)
                if processor is not None])

    def close_reasoning(self, inputs):
        """The inputs with the reasoning block the template opened closed at once (as templates
        do when thinking is turned off)."""
        closing = self.tokenizer.encode(REASONING_END + "\n\n", add_special_tokens=False)
        ids = torch.tensor([closing], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
        length = inputs["input_ids"].shape[-1]
        longer = dict(inputs)
        for key, value in inputs.items():  # every per-token input grows with it
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[-1] == length:
                fill = ids if key == "input_ids" else torch.ones_like(ids) if key == "attention_mask" \
                    else torch.zeros_like(ids)
                longer[key] = torch.cat([value, fill.to(value.dtype)], dim=-1)
        return longer

    def end_ids(self, generation: GenerationConfig) -> tuple[int, ...]:
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.tokenizer.eos_token_id
        return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)

    def describe_token(self, token_id: int) -> tuple[str, bytes]:
        """A token as logprobs show it: its text, and that text's UTF-8 bytes."""
        cache = self.__dict__.setdefault("_token_descriptions", {})
        if token_id not in cache:
            text = self.tokenizer.decode([token_id])
            cache[token_id] = (text, text.encode("utf-8"))
        return cache[token_id]

    def grammar_constraint(self, settings: GenerationSettings, generation: GenerationConfig):
        """The logits processor that keeps this answer to the response_format's JSON, or to
        calls of the tools (required: only to calls); None: free text."""
        if settings.tools and self.response_template is not None:
            raise ChatInputError("This model writes its tool calls in its own format, which the app can't "
                                 "constrain: send tools without response_format or a required tool_choice.")
        marks = [self.tokenizer.convert_tokens_to_ids(mark) for mark in (TOOL_CALL_START, TOOL_CALL_END)]
        unknown = self.tokenizer.unk_token_id
        call_marks = tuple(f"<[{mark}]>" for mark in marks) \
            if all(isinstance(mark, int) and mark != unknown for mark in marks) else None  # (its own tokens)
        try:
            grammar = grammar_for(settings.response_format, settings.tools, settings.tool_call_required, call_marks)
        except ValueError as error:
            raise ChatInputError(f"This response_format can't be followed: {error}") from None
        if grammar is None:
            return None
        if self.batcher is not None:  # (the batch manager takes no per-request logits processors)
            raise ChatInputError("Structured outputs (response_format json) run one answer at a time: "
                                 "this server batches answers (--batching); start it with --batching off.")
        eos_ids = self.end_ids(generation)
        vocabulary = self.model.get_output_embeddings().weight.shape[0]
        try:
            tokens = grammar_tokenizer(self.tokenizer, eos_ids, vocabulary)
        except Exception as error:  # (the model's side, not the request's)
            raise GenerationError(f"This model's tokenizer can't be used for structured outputs: {error}") from None
        try:
            return GrammarConstraint(grammar, tokens)
        except ValueError as error:
            raise ChatInputError(f"This response_format can't be followed: {error}") from None

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

    def describe_failure(self, error: BaseException) -> GenerationError:
        if isinstance(error, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return GenerationError("The GPU ran out of memory for this request. Try a shorter "
                                   "conversation, fewer images or fewer new tokens.")
        return GenerationError(f"Generation failed: {type(error).__name__}: {first_line(error)}")

    # ------------------------------------------------------------ inputs

    @property
    def context_length(self) -> int | None:
        model_config = self.model.config
        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        return getattr(text_config, "max_position_embeddings", None)

    def build_inputs(self, messages: list[dict], reserve_tokens: int = 1,
                     notices: list[str] | None = None, tools: list[dict] | None = None, prepared: bool = False):
        """Chat messages → model inputs via the model's own chat template (with `tools`,
        JSON schemas, when given), leaving room for `reserve_tokens` new tokens. When the
        conversation doesn't fit, the oldest turns are left out (and a notice says so); a
        last message that alone doesn't fit is refused. `prepared`: the messages come from
        prepare_messages already (their files read)."""
        notices = [] if notices is None else notices
        if not prepared:
            messages = self.prepare_messages(messages, notices)
        limit = self.context_length
        # Documents that alone overflow the context go straight to the cut: a long PDF's whole
        # prompt isn't tokenized first only to be cut (1.8 s -> 0.8 s for 500 pages). They are
        # tokenized alone only when their characters already outnumber the room.
        documents = self._document_tokens(messages) if limit and sum(
            len(part["text"]) for message in messages for part in message["content"] if part.get("document")
        ) > limit - reserve_tokens else None
        inputs = None if documents and sum(map(len, documents.values())) > limit - reserve_tokens else \
            self._apply_chat_template(messages, tools)
        if inputs is None or limit and inputs["input_ids"].shape[-1] + reserve_tokens > limit:
            messages, inputs = self._fit_documents(messages, limit - reserve_tokens, notices, tools, documents)
            if inputs is None:
                inputs = self._fit_in_context(messages, limit - reserve_tokens, notices, tools)
        if self.processor is not None:  # BatchFeature: also casts pixel values and audio features to the model's dtype
            return inputs.to(self.model.device, dtype=self.dtype)
        return inputs.to(self.model.device)

    @functools.cached_property
    def _chat_template_text(self) -> str:
        """The chat template the inputs are built with, as text (a processor's may be a dict)."""
        return str(getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template or "")

    @functools.cached_property
    def _template_takes_reasoning(self) -> bool:
        """Does the chat template handle reasoning in assistant turns (it mentions `</think>`)?"""
        return REASONING_END in self._chat_template_text

    @functools.cached_property
    def _control_tokens(self) -> "re.Pattern | None":
        """What _as_typed breaks where sanitize_control_tokens can't be used: the tokenizer's
        special tokens, the added ones its chat template writes, the processor's placeholders."""
        tokens = {token.content for token in self.tokenizer.added_tokens_decoder.values()
                  if token.special or (token.content in self._chat_template_text and not token.content.isspace())}
        tokens |= {getattr(self.processor, name, None) for name in ("image_token", "video_token", "audio_token")}
        tokens = sorted((token for token in tokens if isinstance(token, str) and len(token) > 1), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def _as_typed(self, text: str) -> str:
        """Text from the chat as text to the model, where the template can't sanitize: a control
        token in it gets a zero-width space ("<\u200b|im_start|>", "<\u200bimage>"), so it is
        read, not obeyed or expanded."""
        if self._sanitizes or not text or self._control_tokens is None:
            return text
        return self._control_tokens.sub(lambda found: f"{found[0][0]}\u200b{found[0][1:]}", text)

    def _template_messages(self, messages: list[dict]) -> list[dict]:
        """Neutral messages → the shape chat templates expect: text-only templates often
        want plain strings; tool calls in OpenAI's shape with their arguments as a dict."""
        shaped = []
        for message in tool_pictures_after_results(alternate_roles(messages)):
            text, reasoning = "\n".join(p["text"] for p in message["content"] if p.get("type") == "text"), None
            if message["role"] == "assistant" and self._template_takes_reasoning:
                reasoning, text = reasoning_and_answer(text)
                if reasoning is not None:  # (sent back by a client: given as the template takes it)
                    message = {**message, "content": [{"type": "text", "text": text}] + [
                        part for part in message["content"] if part.get("type") != "text"]}
            text = self._as_typed(text)
            if message["role"] == "tool":  # (as text: its pictures follow the results, as shown by the user)
                shaped.append({"role": "tool", "content": text, "tool_call_id": message.get("tool_call_id"),
                               "name": message.get("name")})
                continue
            parts = [{key: self._as_typed(value) if key == "text" else value for key, value in part.items()
                      if key not in ("document", "metadata")} for part in message["content"]]
            item = {"role": message["role"], "content": parts if self.processor is not None else text}
            if reasoning is not None:
                item["reasoning_content"] = self._as_typed(reasoning)
            if message.get("tool_calls"):
                item["tool_calls"] = [call.openai(arguments_as_json=False) for call in message["tool_calls"]]
            shaped.append(item)
        return shaped

    def _apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None):
        template_owner = self.processor or self.tokenizer
        # A video's frames are already chosen (conversation.prepare_messages): the processor
        # is told when each was taken, and not to sample again.
        videos = [part["metadata"] for message in messages for part in message["content"] if part.get("type") == "video"]
        extra = {"processor_kwargs": {"do_sample_frames": False, "video_metadata": videos}} if videos else {}
        # sanitize_control_tokens: a control token inside the messages (typed, in a document, in
        # a tool's result: "<|im_start|>system", "<image>") is encoded as the text it is; only
        # the template's own are tokens. Else a document could open a system turn, and "<image>"
        # typed to a vision model asked for a picture that wasn't there (an error).
        if self._sanitizes:
            extra["sanitize_control_tokens"] = True
        try:
            return template_owner.apply_chat_template(
                self._template_messages(messages), tools=tools or None, add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt", **extra)
        except (TypeError, ValueError, NotImplementedError) as error:
            if not self._sanitizes or "sanitiz" not in str(error).lower():
                raise
            # (a processor of the model's own code that doesn't take it, or a tokenizer that makes a
            # control token from plain text: transformers can't sanitize it)
            log.warning("%s can't keep control tokens in messages as text through its template (%s): they "
                        "get a zero-width space instead.", self.name, first_line(error))
            self._sanitizes = False
            return self._apply_chat_template(messages, tools)

    def _takes_video(self) -> bool:
        """Does this model take video natively here? Its processor has a video processor (in
        transformers 5.23 they need torchvision) and a video token, and a two-frame video goes
        through its chat template; else videos go as frames, images with their time stamps."""
        if getattr(self.processor, "video_processor", None) is None or not getattr(self.processor, "video_token", None):
            return False
        from PIL import Image
        probe = [{"role": "user", "content": [
            {"type": "video", "video": [Image.new("RGB", (64, 64))] * 2,
             "metadata": {"fps": 1.0, "duration": 2.0, "total_num_frames": 2, "frames_indices": [0, 1]}},
            {"type": "text", "text": "What happens?"}]}]
        try:
            self._apply_chat_template(probe)
        except Exception as error:
            log.info("Videos go to %s as frames with their time stamps: its processor's video path fails here (%s).",
                     self.name, first_line(error))
            return False
        return True

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
            {"role": "assistant", "content": [], "tool_calls": [ToolCall("tool_support_probe", {}, "call_probe")]},
            {"role": "tool", "tool_call_id": "call_probe", "name": "tool_support_probe",
             "content": [{"type": "text", "text": "probe result"}]}]
        template_owner = self.processor or self.tokenizer
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
        return transformers_internals.serve_response_template(self.tokenizer, self.model)

    def _document_tokens(self, messages: list[dict]) -> dict:
        """Each document's tokens, by (message, part) index. (split_special_tokens: a control
        token in a document is its text, kept by a cut.)"""
        return {(i, j): self.tokenizer(part["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
                for i, message in enumerate(messages) for j, part in enumerate(message["content"])
                if part.get("document")}

    def _fit_documents(self, messages: list[dict], budget: int, notices: list[str], tools: list[dict] | None,
                       tokens: dict | None = None):
        """A conversation too long for the context, with its documents' text (`tokens`:
        _document_tokens, if made already) cut to fit what the rest leaves them. The new
        message's documents come first: they get what the rest leaves, but never less than
        half the context (or their whole text; then the oldest turns make way too:
        `_fit_in_context`, inputs None); earlier turns' documents get what they leave. Each
        document of a group keeps the same share of its tokens, from its start; the chat says
        how much of each one in the new message was sent. → (messages, inputs that fit, or None)."""
        tokens = self._document_tokens(messages) if tokens is None else tokens
        where = list(tokens)
        if not where:
            return messages, None

        def with_texts(texts: dict) -> list[dict]:
            edited = [{**message, "content": list(message["content"])} for message in messages]
            for (i, j), text in texts.items():
                edited[i]["content"][j] = {**edited[i]["content"][j], "text": text}
            return edited

        new = [key for key in where if key[0] == len(messages) - 1]
        old = [key for key in where if key[0] != len(messages) - 1]
        new_total, old_total = (sum(len(tokens[key]) for key in group) for group in (new, old))
        rest = self._apply_chat_template(with_texts({key: "" for key in where}), tools)["input_ids"].shape[-1]
        room = budget - rest
        new_share = min(new_total, max(room, budget // 2))
        old_share = max(0, room - new_share)
        old_turns_make_way = new_share > room
        for _ in range(4):  # (a cut's tokens can differ slightly from the count: shrink and try again)
            keeps = {key: max(0, len(tokens[key]) * share // total) for group, share, total in
                     ((new, new_share, new_total), (old, old_share, old_total)) for key in group}
            texts = {key: self._cut_document(messages[key[0]]["content"][key[1]], tokens[key], keeps[key])
                     for key in where}
            edited = with_texts(texts)
            inputs = self._apply_chat_template(edited, tools)
            over = inputs["input_ids"].shape[-1] - budget
            if over <= 0 or old_turns_make_way:
                break
            from_old = min(old_share, over + 8)  # (earlier turns' documents give way first)
            old_share -= from_old
            new_share -= over + 8 - from_old
        for key in new:
            if keeps[key] < len(tokens[key]):
                part = messages[key[0]]["content"][key[1]]
                pages = re.findall(rf"\[{re.escape(part['document'])}, page (\d+)\]", texts[key])
                notices.append(f"{part['document']} is too long for what is left of the model's context "
                               f"({self.context_length} tokens): the model got its first "
                               f"{share_kept(keeps[key], len(tokens[key]))}" + (f" (to page {pages[-1]})." if pages else "."))
        return edited, (inputs if over <= 0 else None)

    def _cut_document(self, part: dict, ids: list[int], keep: int) -> str:
        if keep >= len(ids):
            return part["text"]
        if keep <= 0:  # (an earlier turn's, when the new message's documents need all the room)
            return f"[{part['document']}: left out to fit the context]"
        text = self.tokenizer.decode(ids[:keep])
        line_end = text.rfind("\n")
        if line_end > len(text) * 0.9:
            text = text[:line_end]
        return f"{text}\n[{part['document']}: cut here to fit the context, {share_kept(keep, len(ids))} kept]"

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
            raise self._too_long(system, turns[-1:], tools, budget)
        dropped = cuts[low]
        notices.append(f"The oldest {dropped} message{'s' * (dropped > 1)} of this chat were left out "
                       f"so that it fits the model's context of {self.context_length} tokens.")
        return try_cut(dropped)

    def _too_long(self, system: list[dict], last: list[dict], tools: list[dict] | None, budget: int) -> ContextTooLong:
        """Why the new message can't be answered even alone: the largest of the system prompt,
        the tools' descriptions and the message is named, with the figures and what to do."""
        def size(messages, with_tools=True):
            return self._apply_chat_template(messages, tools if with_tools else None)["input_ids"].shape[-1]
        whole = size(system + last)
        parts = {"this message": size(last, with_tools=False),
                 "the system prompt": max(0, whole - size(last)) if system else 0,
                 "the tools' descriptions": max(0, whole - size(system + last, with_tools=False)) if tools else 0}
        culprit = max(parts, key=parts.get)
        others = " and ".join(f"{name} {tokens}" for name, tokens in parts.items() if tokens and name != culprit)
        advice = {"this message": "Send a shorter message.", "the system prompt": "Shorten the system prompt.",
                  "the tools' descriptions": "Fewer tools (or shorter descriptions) would leave room."}[culprit]
        return ContextTooLong(
            f"{culprit[0].upper()}{culprit[1:]} {'are' if culprit.endswith('s') else 'is'} too long for the model: "
            f"{parts[culprit]} tokens" + (f" (with {others})" if others else "") +
            f", and its context holds {self.context_length}, {self.context_length - budget} of them kept for the "
            f"answer. {advice}")

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
        limit = self.settings.compile_cache_tokens
        return min(self.context_length or limit, limit)
