"""Quick figures: time to first token and tokens/s of plain `model.generate` vs the
streaming runner vs the whole app (Gradio server + HTTP + gradio_client), on the tiny
local models (or any --model). Variants alternate across rounds; medians are printed.

    python bench/stream_overhead.py                    # builds the tiny models in ./tiny-models
    python bench/stream_overhead.py --model DIR_OR_ID --tokens 200 --rounds 5

Client-side arrival times come from iterating the gradio_client job, whose reader polls
with a 50 ms sleep when idle: the app's TTFT here is an upper bound.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="bench-gradio-"))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import app  # noqa: E402
from model_runner import GenerationSettings, ModelRunner  # noqa: E402


def plain_generate(runner, messages, tokens):
    inputs = runner.build_inputs(messages)
    config = runner.generation_config(GenerationSettings(max_new_tokens=1, min_new_tokens=1))
    start = time.perf_counter()
    runner.model.generate(**inputs, generation_config=config)
    first = time.perf_counter() - start
    config.max_new_tokens = config.min_new_tokens = tokens
    start = time.perf_counter()
    out = runner.model.generate(**inputs, generation_config=config)
    total = time.perf_counter() - start
    assert out.shape[-1] - inputs["input_ids"].shape[-1] == tokens
    return first, tokens / total


def runner_stream(runner, messages, tokens):
    start = time.perf_counter()
    first = None
    with runner.stream(messages, GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)) as s:
        for _ in s:
            first = first or time.perf_counter() - start
    total = time.perf_counter() - start
    assert s.new_tokens == tokens
    return first, tokens / total


def app_stream(client, image, tokens):
    from gradio_client import handle_file
    files = [handle_file(str(image))] if image else []
    start = time.perf_counter()
    first = None
    job = client.submit({"text": "Describe it.", "files": files}, "", tokens, 0.0, 1.0, api_name="/chat")
    for output in job:
        if isinstance(output, str) and output:
            first = first or time.perf_counter() - start
    total = time.perf_counter() - start
    client.reset_session()
    return first, tokens / total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model id or dir (repeatable); default: tiny models")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.model:
        models = {m: m for m in args.model}
    else:
        from tests.tiny_models import build_all
        models = {name: str(path) for name, path in build_all(ROOT / "tiny-models").items()}
    image = Path(tempfile.mkdtemp()) / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(image)
    from gradio_client import Client

    rows = []
    for name, path in models.items():
        runner = ModelRunner.load(path)
        use_image = image if runner.is_vision else None
        content = ([{"type": "image", "image": str(image)}] if use_image else []) + \
                  [{"type": "text", "text": "Describe it."}]
        messages = [{"role": "user", "content": content}]
        demo = app.build_demo(runner)
        demo.queue()
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
        client = Client(url, verbose=False)
        results = {"generate": [], "runner": [], "app": []}
        plain_generate(runner, messages, 8)  # warm up
        for _ in range(args.rounds):
            results["generate"].append(plain_generate(runner, messages, args.tokens))
            results["runner"].append(runner_stream(runner, messages, args.tokens))
            results["app"].append(app_stream(client, use_image, args.tokens))
        client.close()
        demo.close()
        med = {k: (statistics.median(f for f, _ in v), statistics.median(r for _, r in v))
               for k, v in results.items()}
        rows.append((name, runner.device, med))

    print(f"\n{args.tokens} new tokens, greedy, median of {args.rounds} interleaved rounds, torch {torch.__version__}")
    print(f"{'model':<12}{'device':<7}{'variant':<10}{'TTFT ms':>9}{'tok/s':>9}{'ratio':>8}")
    for name, device, med in rows:
        base = med["generate"][1]
        for variant, (ttft, rate) in med.items():
            print(f"{name:<12}{device:<7}{variant:<10}{ttft * 1000:>9.1f}{rate:>9.1f}{rate / base:>8.2f}")


if __name__ == "__main__":
    main()
