"""The few transformers internals the engine leans on, fenced like gradio_fixes.py: in one
place, used only with the transformers they were read from (5.23.0), each with a fallback
that works on any other version (the log says once which one is used).

- `is_compiled(model)`: did generate compile the decoding step (`model._compiled_call`)?
  Fallback: trust that it did (the static cache then runs eager, slower, never wrong).
- `forget_compiled(model)`: drop a failed compile (`_compiled_call`).
- `serve_response_template(tokenizer, model)`: the response template transformers' `serve`
  keeps per model type (`cli.serving.utils.get_response_template`, for Qwen and Gemma tool
  calls). Fallback: None (calls are read in the Hermes format).
- `batch_capacity(manager)`: tokens the batch manager's paged cache holds for one answer
  (`batch_processor.cache.max_tokens_read`). Fallback: None (answers are not clamped
  beforehand; one too long fails alone).
- `batch_fatal_error(manager)`: the error that killed the manager's loop
  (`background_thread_status.fatal_error`). Fallback: None (the loop's death still shows
  in `is_running()`).
- `deliver_in_loop(manager, request_id, callback)`: the manager's own thread hands each of
  a request's outputs to `callback` (its `output_router.result_handlers`, with a "loop" that
  calls at once instead of an asyncio loop): no thread of ours around it. Fallback: none, so
  continuous batching stays off unless `fenced()` (`batching.wants_batching` says why).
"""

from __future__ import annotations

import functools
import logging

import transformers

log = logging.getLogger("engine")

WRITTEN_FOR = "5.23.0"


@functools.cache  # (asked per answer: the warning comes once)
def fenced() -> bool:
    """True when the installed transformers is the one these internals were read from."""
    matches = transformers.__version__ == WRITTEN_FOR
    if not matches:
        log.warning("transformers %s is not the %s this app was written for: its internals are left alone "
                    "(compile is trusted, Qwen/Gemma tool calls read as Hermes, continuous batching off).",
                    transformers.__version__, WRITTEN_FOR)
    return matches


def is_compiled(model) -> bool:
    return hasattr(model, "_compiled_call") if fenced() else True


def forget_compiled(model) -> None:
    if fenced():
        model.__dict__.pop("_compiled_call", None)


def serve_response_template(tokenizer, model) -> dict | None:
    if not fenced():
        return None
    try:  # (imports transformers' server, ~2 s: only for a model that needs it)
        from transformers.cli.serving.utils import get_response_template
        return get_response_template(tokenizer, model)
    except Exception:
        return None


def batch_capacity(manager) -> int | None:
    if not fenced():
        return None
    cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
    return getattr(cache, "max_tokens_read", None)


def batch_fatal_error(manager) -> BaseException | None:
    if not fenced():
        return None
    return getattr(getattr(manager, "background_thread_status", None), "fatal_error", None)


class _CallAtOnce:
    """Stands where the router expects an asyncio loop: calls in the manager's own thread."""

    @staticmethod
    def call_soon_threadsafe(callback, *args):
        callback(*args)


def deliver_in_loop(manager, request_id: str, callback) -> None:
    router = manager.output_router
    with router._lock:
        router.result_handlers[request_id] = (callback, _CallAtOnce)


def stop_delivering(manager, request_id: str) -> None:
    router = getattr(manager, "output_router", None)
    if router is not None:
        with router._lock:
            router.result_handlers.pop(request_id, None)
