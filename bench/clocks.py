"""The benchmarks' clock for plain `generate` (bench/benchmark.py, bench/gpu.py): no gradio here,
so bench/gpu.py's engine-only parts run where the app's packages are not installed."""

from __future__ import annotations

from time import perf_counter

from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """A streamer for plain generate that only looks at the clock: the time of every token
    and of the first token whose text is not empty."""

    def __init__(self, tokenizer=None):
        self.tokenizer, self.ids, self.times, self.prompt = tokenizer, [], [], True
        self.first_text_at = None

    def put(self, value):
        if self.prompt:
            self.prompt = False
            return
        now = perf_counter()
        self.times.extend([now] * value.numel())
        if self.tokenizer is not None and self.first_text_at is None:
            self.ids += value.reshape(-1).tolist()
            if self.tokenizer.decode(self.ids, skip_special_tokens=True).replace("\ufffd", ""):
                self.first_text_at = now

    def end(self):
        pass
