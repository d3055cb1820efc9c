"""What shapes each decoding step besides the model, as transformers logits processors (they
run before temperature and top-p): structured outputs (the answer kept to the request's JSON
grammar, structured_output.py, by llguidance, the grammar engine behind vLLM's, SGLang's and
llama.cpp's structured outputs: every token the model may sample is one the grammar allows,
so even a model with random weights writes JSON that validates) and OpenAI's presence and
frequency penalties. The engine's side: torch.

    processor = GrammarConstraint(grammar_for(response_format), grammar_tokenizer(tokenizer, eos_ids, vocabulary))
    model.generate(..., logits_processor=LogitsProcessorList([processor, Penalties(0.5, 0.2)]))
"""

from __future__ import annotations

import functools

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

# llguidance's kernel that applies a bitmask, without the torch.compile it is wrapped in:
# compiling needs a C++ compiler on a CPU host (a slim container has none) and a first-call
# compile on any device; eager, it is a few vector operations per step.
_apply_bitmask = getattr(llguidance.torch.apply_token_bitmask_inplace_kernel, "_torchdynamo_orig_callable",
                         llguidance.torch.apply_token_bitmask_inplace_kernel)


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer, eos_ids: tuple[int, ...], vocabulary: int) -> llguidance.LLTokenizer:
    """The model's tokenizer as llguidance reads it (built once per model: ~the vocabulary's
    size in work). `eos_ids`: the tokens that end an answer (the grammar allows them once the
    JSON is complete); `vocabulary`: the model's logits size (it may pad past the tokenizer's)."""
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocabulary, eos_token=list(eos_ids))


class GrammarConstraint(LogitsProcessor):
    """Masks every token the grammar does not allow next (transformers calls it once per step,
    with the tokens so far). Ends the answer with an end-of-answer token once the grammar is
    complete. One per answer."""

    def __init__(self, grammar: str, tokenizer: llguidance.LLTokenizer):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[-1]
        else:
            self.matcher.consume_token(int(input_ids[0, -1]))
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask)
        mask = self.bitmask.to(scores.device, non_blocking=True)
        allowed = 32 * mask.shape[1]  # (as llguidance.torch.apply_token_bitmask_inplace does)
        if scores.shape[1] > allowed:
            scores[:, allowed:] = float("-inf")
        _apply_bitmask(scores[:, :allowed], mask)
        return scores


class Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: a token already in the answer loses
    `presence` once, plus `frequency` for each time it is there, from its logit (negative
    values favour repeats). The prompt does not count."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0):
        self.presence, self.frequency = presence, frequency
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[-1]
        answer = input_ids[:, self.prompt_length:]
        if answer.shape[-1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class LogprobsRecorder(LogitsProcessor):
    """Each token's log probability, and the `top` most likely alternatives, from the
    distribution the token was drawn from: the step's scores after the processors before it
    (grammar, penalties) and, when sampling, after the same temperature and top-p warpers
    generate applies next (greedy: the plain distribution). Changes no score. The streamer
    hands it each drawn token (`take`); the entries (OpenAI's shape) go to `out`."""

    def __init__(self, top: int, generation_config, describe, end_ids=()):
        self.top, self.describe = top, describe  # describe(token_id) -> (text, bytes)
        self.end_ids = set(end_ids)  # (an end-of-answer token is not part of the answer: no entry)
        self.warpers = []
        if generation_config.do_sample:
            if generation_config.temperature and generation_config.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(generation_config.temperature))
            if generation_config.top_p is not None and generation_config.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(generation_config.top_p))
        self.out: list[dict] = []
        self._row: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        drawn_from = scores.clone()
        for warper in self.warpers:
            drawn_from = warper(input_ids, drawn_from)
        self._row = torch.log_softmax(drawn_from[0].float(), dim=-1)
        return scores

    def take(self, token_id: int) -> None:
        if self._row is None:
            return
        row, self._row = self._row, None
        if token_id in self.end_ids:
            return
        entry = self.entry(token_id, float(row[token_id]))
        entry["top_logprobs"] = []
        if self.top:  # (alternatives the grammar or top-p ruled out are not alternatives)
            values, ids = row.topk(self.top)
            entry["top_logprobs"] = [self.entry(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())
                                     if v > float("-inf")]
        self.out.append(entry)

    def entry(self, token_id: int, logprob: float) -> dict:
        text, raw = self.describe(token_id)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(raw)}  # (JSON has no -inf)
