"""Continuous batching: answers to several users share the model's forward passes, through
transformers' ContinuousBatchingManager. Text-only models (the manager takes token ids, not
images). ModelRunner uses it when `--batching` says so; each answer is a BatchedStream,
which streams, stops and ends on its own like any engine_contract.Stream.

    batcher = ContinuousBatcher(model, tokenizer, device, context_length)   # the manager's loop starts
    max_new = batcher.admit(prompt_tokens, max_new_tokens, seed)    # what the cache holds for it
    request_id = batcher.add(stream, input_ids, generation, seed)   # outputs go to stream._on_output
    batcher.cancel(request_id)                                      # stops at the manager's next step

Per answer: max new tokens, temperature, top_p, stop strings (cut here, then cancelled) and
min_new_tokens (EOS ignored: benchmarks) are honoured; a seed is not (one generator for
all), so such a request is refused with ChatInputError.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time

from transformers import ContinuousBatchingConfig, GenerationConfig

import transformers_internals
from engine_contract import ChatInputError, ContextTooLong, GenerationError

log = logging.getLogger("engine")

# Off CUDA the manager would size its KV cache from the machine's whole memory: ours holds
# this many full-length answers instead (each at most BATCH_CPU_TOKENS_PER_ANSWER tokens),
# within BATCH_CPU_CACHE_BYTES. On CUDA the manager sizes it from the free GPU memory.
BATCH_CPU_ANSWERS = 8
BATCH_CPU_TOKENS_PER_ANSWER = 8192
BATCH_CPU_CACHE_BYTES = 4 << 30
PAGE_SIZE = 256
# Tokens in one forward pass off CUDA. SDPA there needs the manager's attention mask, of
# max_batch_tokens x (cache tokens + max_batch_tokens) floats: 8192 took 2.4 GB beside a
# 65536-token cache (+2.8 GB RSS for a 3.7M-param model); 512 takes 135 MB. A longer prompt
# is prefilled in chunks of this size, and a cancel is taken between chunks.
BATCH_CPU_MAX_BATCH_TOKENS = 512
CLOSED_GRACE_S = 2.0  # a cancelled answer's late tokens still count (tokens_after_close)


def wants_batching(setting: str, device: str, is_vision: bool, compiled: bool = False) -> tuple[bool, str | None]:
    """(batch?, why not, for the log). auto: text-only models on CUDA that are not compiled.
    Measured on an H200 (README, "Many users at once"): the compiled engine streams one
    answer at 349 tokens/s, more than the manager gave 8 answers together (88-96), while
    uncompiled the manager gave 8 clients 5x one client's tokens/s. On CPU it cost a user
    alone a third of the speed."""
    if setting == "off":
        return False, None
    if not transformers_internals.fenced():  # (deliver_in_loop has no fallback)
        return False, (f"continuous batching is used with transformers {transformers_internals.WRITTEN_FOR} "
                       f"only (it leans on its internals): answers go one at a time")
    if is_vision:
        return False, ("continuous batching takes token ids only: a vision model answers one "
                       "request at a time")
    if setting == "auto" and (device != "cuda" or compiled):
        return False, None
    return True, None


class ContinuousBatcher:
    """One ContinuousBatchingManager for a model. The manager's own thread generates every
    answer and hands each output straight to its stream (transformers_internals.deliver_in_loop):
    no thread of ours around it, no polling. A failure of the manager's loop ends every
    answer in flight with that error, and the next request starts a fresh manager."""

    def __init__(self, model, tokenizer, device: str, context_length: int | None):
        self.model, self.device, self.context_length = model, device, context_length
        vocab = model.config.get_text_config().vocab_size
        # The model's own generation config (repetition penalty, EOS ids, ...), sampling on:
        # per-answer sampling needs each processor present; a greedy answer asks for top_k=1,
        # a sampled one for the whole vocabulary. Processors CB can't run are dropped, and
        # transformers logs which.
        self.generation = GenerationConfig.from_dict(model.generation_config.to_dict())
        self.generation.update(do_sample=True, temperature=0.7, top_p=0.9, top_k=vocab, max_new_tokens=64)
        if self.generation.pad_token_id is None:
            self.generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        self.vocab = vocab
        self._streams: dict[str, object] = {}
        self._closing: dict[str, tuple] = {}  # cancelled: (stream, until): late tokens still count
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._manager = None
        self._capacity: int | None = None
        self._stopped = False
        self._start_manager()

    def _cache_config(self) -> ContinuousBatchingConfig:
        cb = ContinuousBatchingConfig(per_request_processors=True, page_size=PAGE_SIZE)
        if self.device != "cuda":
            context = min(self.context_length or BATCH_CPU_TOKENS_PER_ANSWER, BATCH_CPU_TOKENS_PER_ANSWER)
            text = self.model.config.get_text_config()
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            bytes_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * self.model.dtype.itemsize
            cb.num_blocks = max(1, min(math.ceil(BATCH_CPU_ANSWERS * context / PAGE_SIZE),
                                       BATCH_CPU_CACHE_BYTES // (bytes_per_token * PAGE_SIZE)))
            cb.max_batch_tokens = BATCH_CPU_MAX_BATCH_TOKENS
        return cb

    def _start_manager(self) -> None:
        self._manager = self.model.init_continuous_batching(
            generation_config=self.generation, continuous_batching_config=self._cache_config())
        self._manager.start()

    @property
    def capacity(self) -> int | None:
        """Tokens the KV cache holds for one answer (prompt + new), known once the loop has
        built the cache (the warm-up does); kept across a restart of the manager."""
        self._capacity = transformers_internals.batch_capacity(self._manager) or self._capacity
        return self._capacity

    def admit(self, prompt_tokens: int, max_new_tokens: int, seed: int | None) -> int:
        """How many new tokens an answer may have beside this prompt (what the cache holds),
        or ChatInputError when it can't be batched."""
        if seed is not None:
            raise ChatInputError("A seed can't be honoured with continuous batching (all answers share "
                                 "one random generator): leave it out, or start the app with --batching off.")
        capacity = self.capacity
        if capacity and prompt_tokens + max_new_tokens > capacity:
            if capacity - prompt_tokens < 1:
                raise ContextTooLong(f"This conversation ({prompt_tokens} tokens) is longer than the batching "
                                     f"cache holds ({capacity} tokens). Send a shorter message.")
            return capacity - prompt_tokens
        return max_new_tokens

    def add(self, stream, input_ids: list[int], generation: GenerationConfig, seed: int | None) -> str:
        """Queue one answer (admitted); its outputs go to stream._on_output, in the manager's
        thread."""
        if generation.do_sample:
            sampling = {"temperature": float(generation.temperature or 1.0), "top_p": float(generation.top_p or 1.0),
                        "top_k": self.vocab}
        else:
            sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
        if generation.min_new_tokens:
            sampling["eos_token_id"] = -1
        request_id = f"answer-{next(self._ids)}"
        orphans = []
        with self._lock:
            if self._stopped:
                raise GenerationError("The server is stopping.")
            if self._manager is None or not self._manager.is_running():
                orphans = self._restart_manager()
            self._streams[request_id] = stream
            stream._request_id = request_id  # (before its first output can come)
            transformers_internals.deliver_in_loop(self._manager, request_id, self._deliverer(request_id))
            self._forget_closed()
            taken = self._manager.add_request(input_ids, request_id=request_id, streaming=True,
                                              max_new_tokens=generation.max_new_tokens, **sampling)
            if taken is None:  # the manager is stopping (it logged why): it dropped the request
                self._streams.pop(request_id, None)
                transformers_internals.stop_delivering(self._manager, request_id)
                self._manager = None  # the next request starts a fresh one
        self._fail(orphans, GenerationError("Generation failed: the batching loop stopped; send again."))
        if taken is None:
            raise GenerationError("Generation failed: the batching loop was stopping; send again.")
        return request_id

    def _deliverer(self, request_id: str):
        def deliver(output) -> None:  # in the manager's thread: never let an error reach its loop
            with self._lock:
                stream = self._streams.get(request_id) or self._closing.get(request_id, (None,))[0]
                if output.is_finished() or output.error:
                    self._streams.pop(request_id, None)
                    self._closing.pop(request_id, None)
                    transformers_internals.stop_delivering(self._manager, request_id)
                self._forget_closed()
            if stream is None:
                return
            try:
                stream._on_output(output)
            except Exception as error:  # one answer's failure is that answer's only
                log.exception("a batched answer failed to take its output")
                self.cancel(request_id)
                stream._fail(GenerationError(f"Generation failed: {type(error).__name__}: {error}"))
        return deliver

    def cancel(self, request_id: str) -> None:
        """Stop an answer at the manager's next step; tokens it makes until then still count
        (tokens_after_close) for CLOSED_GRACE_S."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            self._closing[request_id] = (stream, time.monotonic() + CLOSED_GRACE_S)
            self._forget_closed()
            manager = self._manager
        if manager is not None:
            manager.cancel_request(request_id)

    def _forget_closed(self) -> None:
        """(Under the lock) cancelled answers past their grace: no output comes for them. (A
        few may wait here, on an idle server, until the next request or output.)"""
        if not self._closing:  # (the usual case, on every output of every answer)
            return
        now = time.monotonic()
        for request_id in [rid for rid, (_, until) in self._closing.items() if until < now]:
            del self._closing[request_id]
            transformers_internals.stop_delivering(self._manager, request_id)

    @property
    def active(self) -> int:
        return len(self._streams)

    def _restart_manager(self) -> list:
        """(Under the lock) a dead loop's answers, which get no more outputs, and a fresh loop."""
        error = transformers_internals.batch_fatal_error(self._manager) if self._manager is not None else None
        if error is not None:
            log.error("The batching loop stopped (%s: %s); starting a new one.", type(error).__name__, error)
        streams, self._streams, self._closing = list(self._streams.values()), {}, {}
        self._start_manager()
        return streams

    @staticmethod
    def _fail(streams: list, error: GenerationError) -> None:
        for stream in streams:
            stream._fail(error)

    def close(self) -> None:
        """Stop at once: answers in flight end with an error saying so."""
        with self._lock:
            self._stopped = True
            manager, self._manager = self._manager, None
            streams, self._streams = list(self._streams.values()), {}
        if manager is not None:
            try:
                manager.stop(block=True, timeout=5, hard_stop=True)
            except Exception:
                log.exception("stopping the batching manager")
        self._fail(streams, GenerationError("The server is stopping: this answer is cut here."))
