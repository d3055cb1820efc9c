"""What constrained decoding costs: tokens/s of the same model with and without a JSON schema
(structured outputs, llguidance), through the engine (ModelRunner.stream), interleaved rounds.

    python bench/structured_outputs.py                     # a tiny local Llama (bench-llama), CPU
    python bench/structured_outputs.py --model ID_OR_DIR --device cuda --rounds 5

Each round: one constrained answer (a schema whose long string keeps it going), then one free
answer of exactly as many tokens (min_new_tokens = max_new_tokens). Prints each round and the
medians: tokens/s both ways, the ratio, and the grammar's time per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine_contract import GenerationSettings  # noqa: E402
from model_runner import ModelRunner  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "year", "story"],
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                         "story": {"type": "string", "maxLength": 600}}}
PROMPT = [{"role": "user", "content": [{"type": "text", "text": "Tell me a long story, as JSON."}]}]


def answer(runner, settings: GenerationSettings):
    started = time.perf_counter()
    stream = runner.stream(PROMPT, settings)
    with stream:
        for _ in stream:
            pass
    return stream, time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or directory (default: a tiny local Llama built here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=1000)
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from tests.tiny_models import build_bench_llama
        model = str(build_bench_llama(Path(tempfile.mkdtemp()) / "bench-llama"))
    runner = ModelRunner.load(model, device=args.device)
    constrained = GenerationSettings(max_new_tokens=args.max_tokens, temperature=1.0, seed=0,
                                     response_format={"type": "json_schema", "json_schema": {"name": "story",
                                                                                           "schema": SCHEMA}})
    answer(runner, constrained)  # warm-up: the grammar's tokenizer view is built once per model
    rows = []
    for round_ in range(args.rounds):
        settings = GenerationSettings(**{**constrained.__dict__, "seed": round_})
        stream, seconds = answer(runner, settings)
        json.loads(stream.reply.answer)  # (it is JSON, or this is not a fair figure)
        tokens = stream.new_tokens
        free, free_seconds = answer(runner, GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens,
                                                               temperature=1.0, seed=round_))
        rows.append((tokens / seconds, free.new_tokens / free_seconds, (seconds - free_seconds) / tokens))
        print(f"round {round_ + 1}: {tokens} tokens · with the schema {rows[-1][0]:.1f} tokens/s · "
              f"free {rows[-1][1]:.1f} tokens/s", flush=True)
    with_schema, free, per_token = (statistics.median(column) for column in zip(*rows))
    print(f"median: with the schema {with_schema:.1f} tokens/s, free {free:.1f} tokens/s "
          f"({with_schema / free:.2f}×); the grammar costs {1000 * per_token:.2f} ms per token "
          f"({runner.name} on {args.device})")
    runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
