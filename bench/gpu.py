"""GPU benchmark: does the engine stream as fast as the model can go? One command, one device call.

    python bench/gpu.py                        # CUDA: a random ~0.76B Llama in bf16, ~4-5 min
    python bench/gpu.py --device cpu --small   # here: a tiny model, under a minute (a test runs it)
    python bench/gpu.py --model DIR_OR_ID      # your own model instead of the random one

Each variant generates the same greedy answer (min_new_tokens = max_new_tokens) from the same
prompt; rounds interleave the variants (order rotated), medians are reported, and every
figure is printed and written to OUT/gpu.json the moment it is measured, so a run cut short
by a time limit still leaves what it measured. Eager first, then compiled (static KV cache +
torch.compile of the decoding step, CUDA only), each against plain generate in that mode:

    plain                 model.generate under no_grad, as users call it: the baseline
    plain inference_mode  the same under torch.inference_mode
    plain in a thread     the same, called from a background thread (the runner generates so)
    plain + per-token     with the engine's streamer and Stop criterion (the engine's per-token work)
    runner                ModelRunner.stream in this process (app.py --in-process): generated on
                          the runner's long-lived generation loop thread
    engine process        EngineProcess.stream (the app's default): generated on the engine
                          process's main thread (its generation loop)
    app over HTTP         app.serve on the engine process, read by bench/sse_client.py in a
                          process of its own (raw SSE, no gradio_client)

Also per mode: time to first text (plain, runner, engine process, app), tokens generated
after a Stop, and load + warm-up time; and the memory-bandwidth bound (weights read once per
token at the GPU's bandwidth).

Then, for continuous batching: answers one at a time through the runner (the app without
batching), transformers' ContinuousBatchingManager directly (on a second copy of the model),
and the app's engine process started with --batching on, for 1, 4 and 8 clients arriving
together, greedy, --batch-tokens each: aggregate tokens/s and time to first text p50 / p95
(--no-batching leaves it out).

    python bench/gpu.py --device cpu --threads   # the engine's torch thread count, on CPU

measures instead decoding (tokens/s) and a ~1,500-token prefill (ms) in a generate thread with
1, cores-1 and all cores' torch threads, with the other cores idle and with one core kept busy
(as the web server is while it streams): what model_runner.default_torch_threads() is based on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from time import perf_counter

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="gpu-bench-gradio-"))
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteriaList  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from clocks import TokenClock  # noqa: E402
from engine_process import EngineProcess  # noqa: E402
from model_runner import (  # noqa: E402
    GenerationSettings,
    IncrementalTextStreamer,
    ModelRunner,
    _StopOnEvent,
    default_torch_threads,
)
from tests import tiny_models  # noqa: E402

PROMPT = "Tell me a long story about the river and the old stone bridge."
# GB/s of memory bandwidth, for the bound: every weight is read once per decoded token.
BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
                 "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "RTX 4090": 1008, "RTX 3090": 936}


def build_model(path: Path, small: bool) -> Path:
    """A random Llama saved like a hub model: ~0.76B parameters in bf16 (hidden 2048, 16
    layers, 16 heads, 8 KV heads), or --small's tiny one. Reused when already built."""
    if (path / "config.json").exists():
        return path
    tokenizer = tiny_models.build_tokenizer([], "")
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4) if small else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=8)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, initializer_range=0.02,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny_models.SEED)
        model = LlamaForCausalLM(config)
    if not small:
        model = model.to(torch.bfloat16)
    return tiny_models._finish(model, tokenizer, path)


# SmolVLM-256M-Instruct (the app's default model), read from its config.json and processor files on the
# hub: Idefics3; text SmolLM2-135M (hidden 576, 30 layers, 9 heads of 64, 3 KV heads, MLP 1536, vocab 49280,
# RoPE theta 100000); vision SigLIP base patch-16/512 (hidden 768, 12 layers, 12 heads, MLP 3072); pixel
# shuffle 4 -> 64 tokens per 512 px tile; the processor scales the longest edge to 2048 and cuts 512 px tiles
# plus a global one (a 512x512 picture: 17 tiles, ~1.1k image tokens).
SMOLVLM_256M = {"text": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0),
                "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=512, patch_size=16),
                "vocab_size": 49280, "scale_factor": 4, "longest_edge": 2048}


def build_vlm(path: Path, small: bool) -> Path:
    """A random Idefics3 at SmolVLM-256M-Instruct's sizes in bf16, or --small's tiny one (the
    tests' idefics3). The tokenizer is the tests' little one; the embedding and output layer
    have the real 49,280 rows (those past the tokenizer never win: zero logits)."""
    if (path / "config.json").exists():
        return path
    if small:
        return tiny_models.build_idefics3(path)
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, \
        Idefics3Processor
    sizes, image = SMOLVLM_256M, tiny_models.IMAGE
    tokenizer = tiny_models.build_tokenizer(tiny_models.IDEFICS3_IMAGE_TOKENS, image)
    text = tiny_models._text_config(tokenizer, **sizes["text"])
    text.vocab_size, text.initializer_range = sizes["vocab_size"], 0.02
    config = Idefics3Config(text_config=text.to_dict(), vision_config=dict(sizes["vision"], initializer_range=0.02),
                            scale_factor=sizes["scale_factor"], image_token_id=tokenizer.convert_tokens_to_ids(image),
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny_models.SEED)
        model = Idefics3ForConditionalGeneration(config)
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tokenizer):] = 0.0
    model = model.to(torch.bfloat16)
    tile = sizes["vision"]["image_size"]
    processor = Idefics3Processor(
        Idefics3ImageProcessorPil(size={"longest_edge": sizes["longest_edge"]}, max_image_size={"longest_edge": tile},
                                  do_image_splitting=True),
        tokenizer, image_seq_len=(tile // sizes["vision"]["patch_size"]) ** 2 // sizes["scale_factor"] ** 2,
        chat_template=tiny_models.chat_template(image))
    tokenizer.add_special_tokens({"extra_special_tokens": tiny_models.ROLE_TOKENS + tiny_models.IDEFICS3_IMAGE_TOKENS},
                                 replace_extra_special_tokens=False)
    return tiny_models._finish(model, tokenizer, path, processor)


def picture(path: Path, side: int = 512) -> str:
    """A side x side photo-like picture (smooth colours and noise), as a PNG the chat would get."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    pixels = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + rng.normal(0, 20, (side, side, 3))
    Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(path)
    return str(path)


def measure_vlm(args, report: Report) -> None:
    """The default model's shape on this device, with a 512x512 picture: eager and (if --compile
    auto compiles it) compiled, plain generate against the runner and the engine process, and
    the time to first text with the picture (its encoding included)."""
    start = perf_counter()
    path = str(build_vlm(Path(tempfile.gettempdir()) / f"gpu-bench-{'small-' if args.small else ''}smolvlm",
                         args.small))
    report.add("vlm/build_s", perf_counter() - start, f"vlm: model ready in {perf_counter() - start:.1f} s")
    image = picture(Path(tempfile.gettempdir()) / "gpu-bench-picture.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe the picture in detail."}]}]
    bench = Bench(args, path, report, messages=messages, label="vlm/")
    report.add("vlm/prompt_tokens", bench.inputs["input_ids"].shape[-1],
               f"vlm: the prompt with the picture is {bench.inputs['input_ids'].shape[-1]} tokens")
    inputs_ms = statistics.median(timed_ms(lambda: bench.runner.build_inputs(messages)) for _ in range(3))
    report.add("vlm/build_inputs_ms", inputs_ms, f"vlm: the engine builds the inputs (the picture read, tiled and "
               f"normalised) in {inputs_ms:.0f} ms: in its time to first text, not in plain generate's")
    weights = sum(p.numel() * p.element_size() for p in bench.runner.model.parameters())
    report.add("vlm/weights_gb", weights / 1e9, f"vlm: weights {weights / 1e9:.2f} GB")
    kept = args.no_app
    args.no_app = True  # (the app's client sends text only)
    try:
        compiled = args.compiled == "yes" or (args.compiled == "auto" and args.device == "cuda")
        for mode in ("eager", "compiled") if compiled else ("eager",):
            try:
                measure_mode(bench, mode, args.budget / 2, compile="auto", label="vlm ", cudnn_engine=False)
            except Exception as error:
                report.add(f"vlm {mode}/error", repr(error), f"vlm {mode}: failed: {error!r}")
    finally:
        args.no_app = kept
        bench.runner.close()


def measure_quantized(args, report: Report, path: str) -> None:
    """bf16 (or float32 on CPU), 8-bit and 4-bit (bitsandbytes) weights of the same model, one
    at a time: GPU memory after loading and at its peak while answering, and tokens/s of plain
    generate (main thread) and of the runner (its generation loop), each checked to stream text."""
    import gc
    for quantize in (None, "8bit", "4bit"):
        name = quantize or "unquantized"
        gc.collect()  # (the previous model's last references: its streams hold the runner)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        try:
            bench = Bench(args, path, report, quantize=quantize, label=f"quant {name}/")
        except Exception as error:
            report.add(f"quant {name}/error", repr(error), f"quant {name}: failed to load: {error!r}")
            continue
        try:
            loaded = torch.cuda.memory_allocated() if args.device == "cuda" else None
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()  # (from here: the peak while answering)
            footprint = bench.runner.model.get_memory_footprint()
            text = ""
            with bench.runner.stream(bench.messages, bench.settings(WARM_UP_TOKENS)) as stream:
                for reply in stream:  # (each reply is the answer so far)
                    text = reply.answer
            del stream
            bench.deadline = time.monotonic() + args.budget / 3
            bench.rounds(f"quant {name}", {"plain": tokens_per_second(bench.plain),
                                           "runner": tokens_per_second(lambda n: bench.through(bench.runner.stream, n))},
                         args.rounds, baseline="plain")
            peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
            gb = lambda b: "n/a" if b is None else f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"
            report.add(f"quant {name}/memory", {"footprint": footprint, "allocated_after_load": loaded, "peak": peak,
                                               "streamed_text": bool(text.strip())},
                       f"quant {name:11} weights {gb(footprint)}, GPU memory after load {gb(loaded)}, peak {gb(peak)}; "
                       f"streamed text: {'yes' if text.strip() else 'NO'}")
        except Exception as error:
            report.add(f"quant {name}/error", repr(error), f"quant {name}: failed: {error!r}")
        finally:
            bench.runner.close()
            bench = None  # (the model's memory goes before the next one loads)


class Report:
    """Prints each figure as it comes and keeps OUT/gpu.json up to date."""

    def __init__(self, out: Path, meta: dict, name: str = "gpu.json"):
        self.path = out / name
        self.data = {"meta": meta, "figures": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def add(self, key: str, value, line: str) -> None:
        self.data["figures"][key] = value
        print(line, flush=True)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def rate(tokens: int, seconds: float) -> float:
    return tokens / seconds


def timed(fn) -> float:
    start = perf_counter()
    tokens = fn()
    return rate(tokens, perf_counter() - start)


def timed_ms(fn) -> float:
    start = perf_counter()
    fn()
    return (perf_counter() - start) * 1000


WARM_UP_TOKENS = 8  # each variant's first, unmeasured run: allocations, kernels, graphs


class Bench:
    def __init__(self, args, path: str, report: Report, messages: list[dict] | None = None,
                 quantize: str | None = None, label: str = ""):
        self.args, self.path, self.report = args, path, report
        self.deadline = time.monotonic() + args.budget  # set again for each mode
        self.messages = messages or [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
        self.tokens = args.tokens
        self.threads = default_torch_threads()
        torch.set_num_threads(self.threads)  # plain generate runs in this (main) thread
        start = perf_counter()
        # batching off: on CUDA "auto" would put an uncompiled text model's answers through the batch
        # manager; the runner measured here is the generation loop (measure_batching: the manager)
        self.runner = ModelRunner.load(path, device=args.device, compile="off", batching="off",
                                       torch_threads=self.threads, quantize=quantize)
        self.sync()
        report.add(f"{label}load_s", perf_counter() - start, f"{label}loaded {path} in {perf_counter() - start:.1f} s "
                   f"({self.runner.device}, {self.runner.dtype}{', ' + quantize if quantize else ''}, "
                   f"torch threads {self.threads})")
        self.inputs = self.runner.build_inputs(self.messages)

    def sync(self):
        if self.args.device == "cuda":
            torch.cuda.synchronize()

    @staticmethod
    def settings(tokens: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)

    # -- the variants: one whole answer of `tokens` tokens (prefill included); tokens made
    def plain(self, tokens, grad=torch.no_grad, streamer=None, stopping=None):
        config = self.runner.generation_config(self.settings(tokens))
        with grad():
            out = self.runner.model.generate(**self.inputs, generation_config=config, streamer=streamer,
                                             stopping_criteria=stopping)
        self.sync()
        return out.shape[-1] - self.inputs["input_ids"].shape[-1]

    def plain_in_thread(self, tokens):
        result = {}

        def run():
            torch.set_num_threads(self.threads)
            result["tokens"] = self.plain(tokens)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return result["tokens"]

    def plain_per_token_work(self, tokens):
        streamer = IncrementalTextStreamer(self.runner.tokenizer, queue.SimpleQueue().put)
        return self.plain(tokens, streamer=streamer, stopping=StoppingCriteriaList([_StopOnEvent(threading.Event())]))

    def through(self, stream_fn, tokens):
        with stream_fn(self.messages, self.settings(tokens)) as stream:
            for _ in stream:
                pass
        return stream.new_tokens

    def rounds(self, name: str, variants: dict, rounds: int, per: str = "tokens/s", baseline: str | None = None):
        """Each variant is called with the answer length: first a short warm-up, then
        interleaved rounds, which stop early past the time budget (after one round). A
        variant that fails is reported and left out. Prints a line per variant, and each
        one's ratio to `baseline`."""
        results, names = {key: [] for key in variants}, list(variants)
        for key in names:
            try:
                variants[key](WARM_UP_TOKENS)
            except Exception as error:
                self.report.add(f"{name}/{key}", {"error": repr(error)}, f"{name:9} {key:22} failed: {error!r}")
                del results[key]
        for r in range(rounds):
            if r and time.monotonic() > self.deadline:
                print(f"  (time budget reached after {r} rounds)", flush=True)
                break
            for key in names[r % len(names):] + names[:r % len(names)]:
                if key in results:
                    results[key].append(variants[key](self.tokens))
        medians = {key: statistics.median(v) for key, v in results.items()}
        for key, values in results.items():
            ratio = f"  ×{medians[key] / medians[baseline]:.3f} of {baseline}" \
                if baseline in medians and key != baseline else ""
            self.report.add(f"{name}/{key}", {"median": medians[key], "rounds": values},
                            f"{name:9} {key:22} {medians[key]:9.1f} {per}  (rounds "
                            f"{min(values):.1f}-{max(values):.1f}){ratio}")
        return medians


def tokens_per_second(fn):
    """A variant reporting tokens/s of a call that returns the number of tokens made."""
    return lambda tokens: timed(lambda: fn(tokens))


def ttft_plain(bench: Bench) -> float:
    clock = TokenClock(bench.runner.tokenizer)
    start = perf_counter()
    with torch.no_grad():
        bench.runner.model.generate(**bench.inputs, generation_config=bench.runner.generation_config(
            bench.settings(WARM_UP_TOKENS)), streamer=clock)
    return (clock.first_text_at or perf_counter()) - start


def ttft_stream(bench: Bench, stream_fn) -> float:
    start = perf_counter()
    with stream_fn(bench.messages, bench.settings(WARM_UP_TOKENS)) as stream:
        for reply in stream:  # the first reply with text
            if reply.answer or reply.reasoning:
                return perf_counter() - start
    return perf_counter() - start


def tokens_after_stop(bench: Bench, stream_fn) -> int:
    with stream_fn(bench.messages, bench.settings(300)) as stream:
        for count, _ in enumerate(stream, 1):
            if count == 3:
                break
        stream.close()
    return stream.tokens_after_close


def without_cudnn_attention(fn):
    """`fn` with cuDNN's scaled-dot-product attention switched off in this process (a global
    switch, so it holds in the runner's generation thread too); the suspect of the eager loss
    off the main thread (NOTES.md): its graph cache is per thread, keyed by sequence lengths."""
    def run(n):
        kept = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            return fn(n)
        finally:
            torch.backends.cuda.enable_cudnn_sdp(kept)
    return run


def start_engine(bench: Bench, compile: str, cudnn_attention: bool = True, batching: str = "off",
                 **settings) -> EngineProcess:
    """An engine process for the bench's model (its generation loop: batching off unless asked);
    without cuDNN attention it is started with TORCH_CUDNN_SDPA_PREFERRED=0 (read by torch at
    its first attention), which it inherits."""
    kept = os.environ.get("TORCH_CUDNN_SDPA_PREFERRED")
    if not cudnn_attention:
        os.environ["TORCH_CUDNN_SDPA_PREFERRED"] = "0"
    try:
        return EngineProcess.start(bench.path, device=bench.args.device, compile=compile, batching=batching,
                                   torch_threads=bench.threads, **settings)
    finally:
        if kept is None:
            os.environ.pop("TORCH_CUDNN_SDPA_PREFERRED", None)
        else:
            os.environ["TORCH_CUDNN_SDPA_PREFERRED"] = kept


def measure_mode(bench: Bench, mode: str, budget: float, compile: str = "on", label: str = "",
                 cudnn_engine: bool = True) -> None:
    """Eager or compiled: plain generate against the runner, the engine process and the app.
    compile "auto" (a model that may not compile): a model that doesn't is reported and left out.
    Eager, also with cuDNN attention off: plain generate in a thread and the runner (the loss off
    the main thread), and (cudnn_engine, CUDA) an engine process started without it: its main
    thread with flash/efficient attention instead (the fix must not slow the main thread)."""
    args, report = bench.args, bench.report
    compiled = mode == "compiled"
    mode = label + mode
    if compiled:
        start = perf_counter()
        bench.runner.compile_or_explain(forced=compile == "on")  # the warm-up compiles here
        if not bench.runner.compile:
            report.add(f"{mode}/error", "did not compile", f"{mode}: --compile auto did not compile it "
                       f"(the log above says why): no compiled figures")
            return
        report.add(f"{mode}/warm_up_s", perf_counter() - start,
                   f"{mode} warm-up (in this process) {perf_counter() - start:.1f} s")
    start = perf_counter()
    engine = start_engine(bench, compile if compiled else "off")
    report.add(f"{mode}/engine_start_s", perf_counter() - start,
               f"{mode}: engine process started (load{' + compile' if compiled else ''}) in "
               f"{perf_counter() - start:.1f} s")
    plain_engine = None
    if args.device == "cuda" and not compiled and cudnn_engine:
        start = perf_counter()
        plain_engine = start_engine(bench, "off", cudnn_attention=False)
        report.add(f"{mode}/engine_no_cudnn_start_s", perf_counter() - start,
                   f"{mode}: engine process without cuDNN attention started in {perf_counter() - start:.1f} s")
    engine_stream = engine.stream  # (the app's answers go through a StreamSpy below)
    demo = client = None
    try:
        variants = {
            "plain": tokens_per_second(bench.plain),
            "plain inference_mode": tokens_per_second(lambda n: bench.plain(n, grad=torch.inference_mode)),
            "plain in a thread": tokens_per_second(bench.plain_in_thread),
            "plain + per-token": tokens_per_second(bench.plain_per_token_work),
            "runner": tokens_per_second(lambda n: bench.through(bench.runner.stream, n)),
            "engine process": tokens_per_second(lambda n: bench.through(engine_stream, n)),
        }
        if not compiled:  # (a compiled step replays the kernels it captured: a switch now changes nothing)
            variants["plain thread, no cuDNN"] = without_cudnn_attention(tokens_per_second(bench.plain_in_thread))
            variants["runner, no cuDNN"] = without_cudnn_attention(tokens_per_second(
                lambda n: bench.through(bench.runner.stream, n)))
        if plain_engine is not None:
            variants["engine, no cuDNN"] = tokens_per_second(lambda n: bench.through(plain_engine.stream, n))
        if compiled:  # tensors made under inference_mode make the compiled step recompile
            del variants["plain inference_mode"]
        ttfts = {
            "plain": lambda _: ttft_plain(bench) * 1000,
            "runner": lambda _: ttft_stream(bench, bench.runner.stream) * 1000,
            "engine process": lambda _: ttft_stream(bench, engine_stream) * 1000,
        }
        if not args.no_app:
            import app
            from benchmark import ClientProcess, StreamSpy, free_port
            spy = StreamSpy(engine)  # forces min_new_tokens = max_new_tokens for the app's answers
            demo, url = app.serve(engine, host="127.0.0.1", port=free_port(), block=False, quiet=True, save=False)
            client = ClientProcess()

            def app_answer(tokens):
                result = client("chat", url=url, text=PROMPT, extra=["", tokens, 0.0, 1.0])
                if not result.get("t_first_text"):
                    raise RuntimeError(f"the app answered no text: {result.get('error')}")
                return result, spy.last()

            def app_rate(tokens):
                result, stream = app_answer(tokens)
                return rate(stream.new_tokens, result["t_done"] - result["t_join"])

            def app_ttft(_):
                result, _ = app_answer(WARM_UP_TOKENS)
                return (result["t_first_text"] - result["t_join"]) * 1000
            variants["app over HTTP"] = app_rate
            ttfts["app over HTTP"] = app_ttft
        bench.deadline = time.monotonic() + budget  # from here: loads and compiles are not rounds
        bench.rounds(mode, variants, args.rounds, baseline="plain")
        bench.rounds(f"{mode} TTFT", ttfts, args.rounds, per="ms to first text")
        after = {"runner": tokens_after_stop(bench, bench.runner.stream),
                 "engine process": tokens_after_stop(bench, engine_stream)}
        report.add(f"{mode}/tokens_after_stop", after,
                   f"{mode:9} tokens after Stop: runner {after['runner']}, engine process {after['engine process']}")
    finally:
        if client:
            client.close()
        if demo:
            demo.close()
        engine.close()
        if plain_engine is not None:
            plain_engine.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def manager_configs(device: str) -> dict:
    """The ContinuousBatchingConfig variants measured: as the app configures the manager now,
    and on CUDA with CUDA graphs (decode and varlen paths), then also with async batching."""
    from transformers import ContinuousBatchingConfig
    configs = {"batched": ContinuousBatchingConfig(max_memory_percent=0.5)}
    if device == "cuda":
        configs["batched, CUDA graphs"] = ContinuousBatchingConfig(max_memory_percent=0.5, use_cuda_graph=True,
                                                                    use_async_batching=False)
        configs["batched, graphs + async"] = ContinuousBatchingConfig(max_memory_percent=0.5, use_cuda_graph=True,
                                                                       use_async_batching=True)
    return configs


def measure_batching(bench: Bench, budget: float) -> None:
    from transformers import GenerationConfig
    args, report = bench.args, bench.report
    tokens = args.batch_tokens
    runner = ModelRunner.load(bench.path, device=args.device, compile="off", batching="off",
                              torch_threads=bench.threads)
    prompt_ids = runner.build_inputs(bench.messages)["input_ids"][0].tolist()
    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=-1,
                              pad_token_id=runner.tokenizer.pad_token_id or 0)

    def report_figure(clients: int, name: str, figures: tuple[int, list[float], float]) -> None:
        made, firsts, seconds = figures
        report.add(f"batching/{clients}/{name}",
                   {"tokens_per_s": made / seconds, "tokens": made, "ttft_p50_ms": percentile(firsts, .5) * 1000,
                    "ttft_p95_ms": percentile(firsts, .95) * 1000},
                   f"batching {clients} clients {name:24} {made / seconds:8.1f} tokens/s in all, "
                   f"TTFT p50 {percentile(firsts, .5) * 1000:6.0f} ms, p95 {percentile(firsts, .95) * 1000:6.0f} ms")

    def batched(manager, clients: int, length: int) -> tuple[int, list[float], float]:
        """The requests' outputs read by one reader (get_result), as NOTES.md advises: several
        threads on request_id_iter requeue each other's outputs (one request alone after an
        8-request warm-up streamed at 2 tokens/s here)."""
        t0 = perf_counter()
        ids = [manager.add_request(prompt_ids, max_new_tokens=length, streaming=True) for _ in range(clients)]
        if None in ids:
            raise RuntimeError("the manager took no request (it is not running)")
        firsts, counts, left = {}, {}, set(ids)
        while left:
            output = manager.get_result(timeout=120)  # (the first request waits for the cache to be made:
            if output is None:                           # 28 s for the CPU's 12 GB here)
                raise RuntimeError(f"no output from the manager for 120 s ({len(left)} requests unfinished; "
                                   f"running: {manager.is_running()})")
            if output.request_id not in left:
                continue  # (a late output of an earlier request)
            if output.error:
                raise RuntimeError(output.error)
            if output.request_id not in firsts and output.generated_tokens:
                firsts[output.request_id] = perf_counter() - t0
            counts[output.request_id] = len(output.generated_tokens)
            if output.is_finished():
                left.discard(output.request_id)
        return sum(counts.values()), list(firsts.values()), perf_counter() - t0

    def one_at_a_time(clients: int, length: int) -> tuple[int, list[float], float]:
        t0, total, firsts = perf_counter(), 0, []
        for _ in range(clients):
            with runner.stream(bench.messages, bench.settings(length)) as stream:
                first = None
                for reply in stream:
                    if (reply.answer or reply.reasoning) and first is None:
                        first = perf_counter() - t0
            firsts.append(first if first is not None else perf_counter() - t0)
            total += stream.new_tokens
        return total, firsts, perf_counter() - t0

    def through_the_app_engine(engine, clients: int, length: int) -> tuple[int, list[float], float]:
        """The app's engine process with --batching on: every answer streamed at once."""
        t0, firsts = perf_counter(), [None] * clients
        settings = GenerationSettings(max_new_tokens=length, min_new_tokens=length)
        streams = [engine.stream(bench.messages, settings) for _ in range(clients)]

        def read(i):
            for reply in streams[i]:
                if (reply.answer or reply.reasoning) and firsts[i] is None:
                    firsts[i] = perf_counter() - t0
        readers = [threading.Thread(target=read, args=(i,)) for i in range(clients)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        return sum(s.new_tokens for s in streams), [f for f in firsts if f is not None], perf_counter() - t0

    clients_counts = (1, 4, 8)
    try:
        report_figure(1, "one at a time", one_at_a_time(1, tokens))  # (eager; the compiled one is the modes')
        start = perf_counter()
        try:
            engine = start_engine(bench, "off", batching="on")  # the app as it is configured now
            try:
                report.add("batching/engine_start_s", perf_counter() - start,
                           f"batching: engine process (--batching on) started in {perf_counter() - start:.1f} s")
                for clients in clients_counts:  # (warm-up: each batch shape once)
                    through_the_app_engine(engine, clients, WARM_UP_TOKENS)
                for clients in clients_counts:
                    report_figure(clients, "engine --batching", through_the_app_engine(engine, clients, tokens))
            finally:
                engine.close()
        except Exception as error:  # the manager's configurations still count
            report.add("batching/engine/error", repr(error), f"batching: engine --batching: failed: {error!r}")
        deadline = time.monotonic() + budget  # (the budget is the manager configurations')
        for name, cb_config in manager_configs(args.device).items():  # one manager (and its cache) at a time
            if time.monotonic() > deadline:
                print(f"  (time budget reached: {name} left out)", flush=True)
                continue
            start = perf_counter()
            manager = runner.model.init_continuous_batching(generation_config=config,
                                                            continuous_batching_config=cb_config)
            manager.start()
            try:
                for clients in clients_counts:  # (warm-up: CUDA graphs are captured per batch shape)
                    batched(manager, clients, WARM_UP_TOKENS)
                report.add(f"batching/{name}/warm_up_s", perf_counter() - start,
                           f"batching: {name}: manager started and warmed up in {perf_counter() - start:.1f} s")
                for clients in clients_counts:
                    report_figure(clients, name, batched(manager, clients, tokens))
            except Exception as error:  # the other configurations still count
                report.add(f"batching/{name}/error", repr(error), f"batching: {name}: failed: {error!r}")
            finally:
                manager.stop(block=True, timeout=30)
                del manager
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        runner.close()
        if args.device == "cuda":
            torch.cuda.empty_cache()


def probe_eager(bench: Bench) -> None:
    """Why does eager decoding on a GPU swing between ~20 and ~90 tokens/s? Each condition
    runs PROBE_REPEATS answers of --batch-tokens, interleaved, and prints every rate."""
    tokens, report = bench.args.batch_tokens, bench.report

    def plain(threads, grad, in_thread=False, n=tokens):
        def run():
            torch.set_num_threads(threads)
            return timed(lambda: bench.plain(n, grad=grad))
        if not in_thread:
            return run()
        result = {}
        thread = threading.Thread(target=lambda: result.update(rate=run()))
        thread.start()
        thread.join()
        return result["rate"]

    many = bench.threads

    def runner_with(grad, n):
        kept = bench.runner.grad_mode
        bench.runner.grad_mode = grad
        try:
            return timed(lambda: bench.through(bench.runner.stream, n))
        finally:
            bench.runner.grad_mode = kept

    def thread_set_device(n):
        torch.cuda.set_device(0) if torch.cuda.is_available() else None
        return timed(lambda: bench.plain(n, grad=torch.no_grad))

    def in_thread(fn):
        def run(n):
            result = {}
            thread = threading.Thread(target=lambda: result.update(rate=fn(n)))
            thread.start()
            thread.join()
            return result["rate"]
        return run

    conditions = {
        "main no_grad": lambda n: plain(many, torch.no_grad, n=n),
        "main inference_mode": lambda n: plain(many, torch.inference_mode, n=n),
        "thread no_grad": lambda n: plain(many, torch.no_grad, True, n=n),
        "thread inference_mode": lambda n: plain(many, torch.inference_mode, True, n=n),
        "thread no_grad set_device": in_thread(thread_set_device),
        "runner no_grad": lambda n: runner_with(torch.no_grad, n),
        "runner inference_mode": lambda n: runner_with(torch.inference_mode, n),
    }

    def measure(label):
        for key, fn in conditions.items():
            print(f"{time.time():.2f} warm {key}", flush=True)
            fn(WARM_UP_TOKENS)
        rates = {key: [] for key in conditions}
        for r in range(PROBE_REPEATS):
            names = list(conditions)
            for key in names[r % len(names):] + names[:r % len(names)]:
                start = time.time()
                rates[key].append(conditions[key](tokens))
                print(f"{start:.2f}-{time.time():.2f} {key} {rates[key][-1]:.1f}", flush=True)
        for key, values in rates.items():
            report.add(f"probe/{label}/{key}", values, f"probe {label:22} {key:36} "
                       + " ".join(f"{v:6.1f}" for v in values) + " tokens/s")

    import shutil
    import subprocess
    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,utilization.gpu,power.draw",
                                "--format=csv,noheader", "-lms", "250"],
                               stdout=open(bench.args.out / "smi.csv", "w")) if shutil.which("nvidia-smi") else None
    try:
        measure("alone")
    finally:
        if sampler:
            sampler.terminate()


PROBE_REPEATS = 3


def spin(stop) -> None:
    while not stop.is_set():
        pass


def measure_threads(bench: Bench) -> None:
    import multiprocessing
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = sorted({1, max(1, cores - 1), cores})
    long_prompt = [{"role": "user", "content": [{"type": "text", "text": PROMPT * 100}]}]
    long_inputs = bench.runner.build_inputs(long_prompt)
    one = bench.settings(1)

    def in_thread(threads, inputs, settings):
        result = {}

        def run():
            torch.set_num_threads(threads)
            start = perf_counter()
            with torch.inference_mode():
                bench.runner.model.generate(**inputs, generation_config=bench.runner.generation_config(settings))
            result["s"] = perf_counter() - start
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return result["s"]

    for busy in (False, True):
        stop = multiprocessing.get_context("spawn").Event()
        hog = multiprocessing.get_context("spawn").Process(target=spin, args=(stop,)) if busy else None
        if hog:
            hog.start()
        try:
            label = "one core busy" if busy else "idle"
            variants = {}
            for n in counts:
                variants[f"{n} threads decode"] = \
                    lambda tokens, n=n: rate(tokens, in_thread(n, bench.inputs, bench.settings(tokens)))
                variants[f"{n} threads prefill"] = lambda _, n=n: in_thread(n, long_inputs, one) * 1000
            bench.rounds(f"threads, {label}", variants, bench.args.rounds, per="(tokens/s | ms)")
        finally:
            if hog:
                stop.set()
                hog.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "mps"])
    parser.add_argument("--small", action="store_true", help="a tiny random model (a CPU dry run)")
    parser.add_argument("--model", help="a model directory or hub id instead of the random Llama")
    parser.add_argument("--tokens", type=int, help="answer length (default 256; --small 48)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --small 2)")
    parser.add_argument("--budget", type=float, default=180,
                        help="seconds of rounds, shared by the modes: past its share, a mode starts no "
                             "new round (each variant gets one, after its warm-up)")
    parser.add_argument("--compiled", choices=["auto", "yes", "no"], default="auto",
                        help="also measure compiled (auto: on CUDA)")
    parser.add_argument("--no-app", action="store_true", help="leave out the app over HTTP (needs gradio)")
    parser.add_argument("--batch-tokens", type=int, help="answer length for the batching figures (default 64; --small 16)")
    parser.add_argument("--no-batching", action="store_true", help="leave out the continuous batching figures")
    parser.add_argument("--batch-budget", type=float, default=90,
                        help="seconds for the manager's configurations (after the app's engine): past it, no "
                             "further one starts")
    parser.add_argument("--probe-eager", action="store_true",
                        help="only probe eager decoding's speed: torch threads, grad mode, a thread, "
                             "an idle engine process, the GIL switch interval; then batching")
    parser.add_argument("--vlm", action="store_true",
                        help="only the default model's shape (a random Idefics3 at SmolVLM-256M's sizes) with a "
                             "512x512 picture: eager and compiled (if --compile auto compiles it)")
    parser.add_argument("--quantize", action="store_true",
                        help="only bf16 against bitsandbytes 8-bit and 4-bit: memory and tokens/s (needs "
                             "bitsandbytes; not gradio)")
    parser.add_argument("--threads", action="store_true",
                        help="measure only the generate thread's torch thread count (see above)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (48 if args.small else 256)
    args.rounds = args.rounds or (2 if args.small else 3)
    args.batch_tokens = args.batch_tokens or (16 if args.small else 64)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("engine").setLevel(logging.INFO)  # (what --compile auto decided, and why)
    started = perf_counter()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    import transformers
    part = "vlm" if args.vlm else "quantize" if args.quantize else None
    meta = {"device": args.device, "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokens": args.tokens, "rounds": args.rounds, "part": part, "cudnn": torch.backends.cudnn.version()}
    report = Report(args.out, meta, name=f"gpu-{part}.json" if part else "gpu.json")
    print(f"gpu bench: {meta}", flush=True)
    if args.vlm:
        measure_vlm(args, report)
        report.add("total_s", perf_counter() - started, f"done in {perf_counter() - started:.0f} s")
        return 0
    path = args.model or str(build_model(Path(tempfile.gettempdir()) / f"gpu-bench-{'small' if args.small else 'llama'}",
                                         args.small))
    report.add("build_s", perf_counter() - started, f"model ready in {perf_counter() - started:.1f} s")
    if args.quantize:
        measure_quantized(args, report, path)
        report.add("total_s", perf_counter() - started, f"done in {perf_counter() - started:.0f} s")
        return 0
    bench = Bench(args, path, report)
    weights = sum(p.numel() * p.element_size() for p in bench.runner.model.parameters())
    bandwidth = next((gbs for name, gbs in BANDWIDTH_GBS.items() if gpu and name in gpu), None)
    bound = bandwidth * 1e9 / weights if bandwidth else None
    report.add("bound", {"weights_gb": weights / 1e9, "bandwidth_gbs": bandwidth, "tokens_per_s": bound},
               f"weights {weights / 1e9:.2f} GB; memory-bandwidth bound "
               + (f"~{bound:,.0f} tokens/s at {bandwidth} GB/s" if bound else "n/a (unknown bandwidth)"))
    if args.probe_eager:
        probe_eager(bench)
        if not args.no_batching:
            torch.set_num_threads(1)
            measure_batching(bench, 30)
        report.add("total_s", perf_counter() - started, f"done in {perf_counter() - started:.0f} s")
        return 0
    if args.threads:
        measure_threads(bench)
        report.add("total_s", perf_counter() - started, f"done in {perf_counter() - started:.0f} s")
        return 0
    modes = ["eager"]
    if args.compiled == "yes" or (args.compiled == "auto" and args.device == "cuda"):
        modes.append("compiled")
    for mode in modes:
        try:
            measure_mode(bench, mode, args.budget / len(modes))
        except Exception as error:  # the other mode's figures still count
            report.add(f"{mode}/error", repr(error), f"{mode}: failed: {error!r}")
    if not args.no_batching:
        try:
            measure_batching(bench, args.batch_budget)
        except Exception as error:
            report.add("batching/error", repr(error), f"batching: failed: {error!r}")
    report.add("total_s", perf_counter() - started, f"done in {perf_counter() - started:.0f} s; "
               f"figures in {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
