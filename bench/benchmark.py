"""Streaming benchmark: the engine and the whole Gradio app against plain `model.generate`.

    python bench/benchmark.py                      # full run: ~5-10 min on a 2-core CPU
    python bench/benchmark.py --quick              # fewer rounds and tokens: ~2-3 min
    python bench/benchmark.py --model DIR_OR_ID [--model ...] [--rounds 7] [--out DIR]
    python bench/benchmark.py --model ID --device cuda             # compiled, as `app.py` runs there
    pip install -r requirements-bench.txt          # matplotlib, for the plot

Prints one table row per figure with ✓/✗ against its target, writes OUT/benchmark.json
(every figure, every round, the settings and versions) and OUT/per_token_latency.png
(OUT defaults to bench/results/).

Models. Default: `bench-llama` (tests/tiny_models.build_bench_llama: a 3.7M-parameter
random Llama, greedy ~100-250 tokens/s on one CPU core, so the model's compute is real)
and the tiny `idefics3` VLM with an image (overhead-bound: a step costs little more than
the Python around it). Both are built under ./tiny-models on first use. With --model, the
first model is the main one (figures 3-6, the plot, start-up), figures 1-2 run on every
model, figure 7 on the first vision model (else the tiny idefics3).

Figures and targets (every figure alternates its variants across rounds, rotating the
order, and reports medians; ratios are medians of per-round ratios):
  1 throughput   tokens/s of the app (server + HTTP + client reading the stream) and of
                 the runner alone, each / plain generate (no streamer), same prompt and
                 token count, greedy.                        app >= 0.98, runner >= 0.99
  2 TTFT         client-observed time to the first non-empty answer text minus plain
                 generate's time to the same text (input building included in both);
                 the floor is the same client against a trivial echo ChatInterface that
                 yields one character at once.                overhead <= floor + 10 ms
  3 detokenize   cost of one streamer.put() at tokens ~100/~1000/~4000 of one long line
                 without newlines, ours vs TextIteratorStreamer.   ours@4000 <= 1.5x @100
  4 stop         tokens generated after the cancel request reached the server, and time
                 from the last token to the answer's end (generation stops; the
                 generation loop's thread lives on for the next one). <= 1 token, <= 20 ms
  5 long chat    web-server CPU seconds per generated token (first text -> end, so prefill
                 is out) with a 400-message history vs an empty one, through the /chat API
                 and through the browser's event; the engine process's CPU beside it.
                                                                        <= 1.5x empty
  6 concurrency  1, 4, 8 simultaneous clients: aggregate tokens/s, TTFT p50/p95.
                                                              8-client aggregate >= 1-client
  7 memory       RSS and threads of both processes before/after N chat turns with images.
                                                   RSS growth < 30 MB, threads back to baseline
  8 start-up     `python app.py --model DIR`: launch -> GET / answers 200, and -> /healthz
                 says "loaded": true.                                  UI <= 5 s

How: plain generate and the runner alone run in a process that does nothing else (the
baseline). The app is served from this process (app.serve) as `python app.py` runs it: the web
server here, the model in an engine process (engine_process.EngineProcess); a second copy
serves the model in this process (--in-process) for comparison. A wrapper around
runner.stream records each stream (forcing min_new_tokens = max_new_tokens; the random
models never emit EOS anyway) and asks the engine to record every token's time
(the runners are loaded with record_token_times; perf_counter is CLOCK_MONOTONIC, one clock for
both processes). The client is a separate process
(bench/sse_client.py) speaking Gradio's queue API over raw HTTP/SSE with httpx, so arrival
times are real (gradio_client's reader polls with a 50 ms sleep; it appears only in the
info rows marked "gradio_client"), its CPU is not the server's, and its times share the
server's clock (CLOCK_MONOTONIC). Files are uploaded before the clock starts, as a
browser does when an image is attached. Torch runs on --torch-threads, by default what the
app uses (model_runner.default_torch_threads(): the cores less one, for the web server),
plain generate included.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from time import perf_counter

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="bench-gradio-"))
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import app  # noqa: E402
import users  # noqa: E402
from clocks import TokenClock  # noqa: E402
from conversation import for_the_model  # noqa: E402
from engine_process import EngineProcess  # noqa: E402
from model_runner import GenerationSettings, IncrementalTextStreamer, ModelRunner, default_torch_threads  # noqa: E402

TEXT_PROMPT = "Tell me a long story about the river and the old stone bridge."
IMAGE_PROMPT = "Describe the picture in detail."


@dataclasses.dataclass
class Sizes:
    rounds: int = 6              # throughput rounds; the other figures scale from it
    tokens: int = 300            # answer length for throughput and long chats
    ttft_tokens: int = 8
    long_tokens: int = 1200      # the long answer of the plot
    detok_tokens: int = 4100
    stop_max_tokens: int = 2000
    history_messages: int = 400
    chat_tokens: int = 200       # long chats
    concurrency_tokens: int = 100
    memory_turns: int = 300
    startup_timeout: float = 90.0

    @classmethod
    def make(cls, quick: bool, rounds: int | None) -> "Sizes":
        if quick:
            sizes = cls(rounds=3, tokens=150, long_tokens=600, chat_tokens=100, concurrency_tokens=50,
                        memory_turns=60)
        else:
            sizes = cls()
        if rounds:
            sizes.rounds = rounds
        return sizes

    @property
    def ttft_rounds(self):
        return 3 * self.rounds

    @property
    def few_rounds(self):  # the slow figures (long chats, start-up, the plot)
        return max(1, self.rounds // 2)


@dataclasses.dataclass
class Model:
    name: str
    path: str
    runner: ModelRunner       # in this process: plain generate, the runner alone, the in-process app
    files: list[str]          # attached to each message (an image for vision models)
    text: str
    engine: EngineProcess = None  # the same model in an engine process: the app as users run it
    url: str = ""             # the app on the engine process, while it is served
    demo: object = None
    spy: "StreamSpy" = None
    clean: CleanProcess = None    # plain generate and the runner alone, in a process of their own
    url_in: str = ""          # the app with the model in its own process (--in-process)
    demo_in: object = None
    spy_in: "StreamSpy" = None
    engine_threads: int = 0   # the engine process's torch threads

    @property
    def messages(self) -> list[dict]:
        parts = [{"type": "image", "image": p} for p in self.files]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": self.text}]}]

    def extra(self, max_new_tokens: int) -> list:
        """The /chat endpoint's additional inputs: system prompt, max new tokens, temperature, top-p."""
        return ["", max_new_tokens, 0.0, 1.0]

    def settings(self, tokens: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)


# ---------------------------------------------------------------- measuring tools

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def interleaved(variants: dict, rounds: int, warmup: bool = True) -> dict[str, list]:
    """Run each variant once per round, rotating the order every round."""
    names = list(variants)
    if warmup:
        for name in names:
            variants[name]()
    results = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(variants[name]())
    return results


def paired(a: list, b: list, op) -> list:
    return [op(x, y) for x, y in zip(a, b) if x is not None and y is not None]


class StreamSpy:
    """Replaces runner.stream in the served app: keeps each stream, forces the answer
    length (min_new_tokens = max_new_tokens), has the engine record every token's time
    (the runner was loaded with record_token_times) and timestamps close() (= the app
    acting on a Stop)."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.original, self.streams, self.record = runner, runner.stream, [], True
        runner.stream = self

    def __call__(self, messages, settings=None, **options):
        settings = settings or GenerationSettings()
        settings = dataclasses.replace(settings, min_new_tokens=settings.max_new_tokens)
        stream = self.original(messages, settings, **options)
        close = stream.close

        def timed_close(wait: float = 10.0):
            if not hasattr(stream, "bench_closed_at"):
                stream.bench_closed_at = perf_counter()
            return close(wait)

        stream.close = timed_close
        if self.record:
            self.streams.append(stream)
        return stream

    def last(self):
        stream = self.streams[-1]
        stream.join(30)
        return stream


def token_times(stream) -> list[float]:
    """perf_counter() of every generated token, as the engine recorded them (same clock in
    the engine process: CLOCK_MONOTONIC)."""
    return stream.token_times or []


class ClientProcess:
    """bench/sse_client.py --worker: the HTTP client, in its own process."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "sse_client.py"), "--worker", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, op: str, **request):
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"client {op}: {answer['error']}")
        return answer["ok"]

    def close(self):
        self.process.stdin.close()
        self.process.wait(10)


class CleanProcess:
    """Plain `generate` and the runner alone, in a process that does nothing else: the
    baseline. In this process they would share the interpreter lock with the web servers
    kept up for the app's figures (their idle polling alone cost plain generate ~10 %)."""

    def __init__(self, path: str, device: str, torch_threads: int, compile: str):
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_clean_worker, args=(child, path, device, torch_threads, compile),
                                       daemon=True)
        self.process.start()
        child.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("the clean process failed to load the model")

    def __call__(self, op: str, *args):
        self.conn.send((op, args))
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"clean process, {op}: {value}")
        return value

    def close(self):
        self.conn.close()
        self.process.join(10)


def _clean_worker(conn, path, device, torch_threads, compile):
    torch.set_num_threads(torch_threads)  # plain generate runs in this (main) thread
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    runner = ModelRunner.load(path, device=device, compile=compile, torch_threads=torch_threads,
                              record_token_times=True)
    conn.send("ready")
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", CLEAN_OPS[op](runner, *args)))
        except Exception as error:
            conn.send(("error", f"{type(error).__name__}: {error}"))


def _plain(runner, messages, settings, streamer=None) -> int:
    inputs = runner.build_inputs(messages)
    out = runner.model.generate(**inputs, generation_config=runner.generation_config(settings), streamer=streamer)
    return out.shape[-1] - inputs["input_ids"].shape[-1]


def _plain_inference_mode(runner, messages, settings) -> int:
    with torch.inference_mode():  # as the engine generates: plain minus autograd bookkeeping
        return _plain(runner, messages, settings)


def _whole_answer(fn):
    def run(runner, messages, settings):
        cpu, start = time.process_time(), perf_counter()
        tokens = fn(runner, messages, settings)
        return {"start": start, "end": perf_counter(), "cpu": time.process_time() - cpu, "tokens": tokens}
    return run


def _runner_answer(runner, messages, settings) -> int:
    with runner.stream(messages, settings) as stream:
        for _ in stream:
            pass
    return stream.new_tokens


def _plain_ttft(runner, messages, settings):
    start = perf_counter()
    clock = TokenClock(runner.tokenizer)
    _plain(runner, messages, settings, clock)
    return {"first_text": clock.first_text_at - start, "first_token": clock.times[0] - start}


def _runner_ttft(runner, messages, settings):
    start = perf_counter()
    with runner.stream(messages, settings) as stream:
        for reply in stream:  # the first reply with text (streams yield Reply objects)
            if reply.answer or reply.reasoning:
                return perf_counter() - start
    raise RuntimeError("the runner answered no text")


def _plain_times(runner, messages, settings):
    clock = TokenClock()
    _plain(runner, messages, settings, clock)
    return clock.times


def _runner_times(runner, messages, settings):
    with runner.stream(messages, settings) as stream:
        for _ in stream:
            pass
    return stream.token_times


CLEAN_OPS = {"plain": _whole_answer(_plain), "runner": _whole_answer(_runner_answer),
             "plain_inference_mode": _whole_answer(_plain_inference_mode),
             "plain_ttft": _plain_ttft, "runner_ttft": _runner_ttft,
             "plain_times": _plain_times, "runner_times": _runner_times}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_model(m: Model, torch_threads: int) -> None:
    """The app as users run it (the model in an engine process) and, for comparison, with
    the model in the web server's process (--in-process)."""
    compile = "on" if m.runner.compile else "off"  # as resolved for this model and device
    m.engine_threads = torch_threads
    m.engine = EngineProcess.start(m.path, device=m.runner.device, compile=compile, torch_threads=torch_threads,
                                   record_token_times=True)
    m.clean = CleanProcess(m.path, m.runner.device, torch_threads, compile)
    m.spy = StreamSpy(m.engine)
    m.demo, m.url = app.serve(m.engine, host="127.0.0.1", port=free_port(), block=False, quiet=True, save=False)
    m.spy_in = StreamSpy(m.runner)
    m.demo_in, m.url_in = app.serve(m.runner, host="127.0.0.1", port=free_port(), block=False, quiet=True, save=False)


def stop_serving(m: Model) -> None:
    m.demo.close()
    m.demo_in.close()
    m.engine.close()
    m.clean.close()
    m.runner.stream = m.spy_in.original
    m.demo = m.spy = m.demo_in = m.spy_in = m.engine = m.clean = None


def serve_echo():
    """The floor for figure 2: a ChatInterface shaped like the app's (multimodal, same
    additional inputs, api_name="chat") whose fn yields one character at once. Stock
    Gradio: served only while figure 2 runs, since its queue polls every 1 ms (~80 ms of
    CPU a second in this process, which the other figures count as the web server's)."""
    import gradio as gr

    def echo(message, history, system_prompt="", max_new_tokens=1, temperature=0.0, top_p=1.0):
        yield "x"

    demo = gr.ChatInterface(
        echo, multimodal=True, api_name="chat",
        textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple"),
        additional_inputs=[gr.Textbox(), gr.Slider(1, 8192), gr.Slider(0.0, 2.0), gr.Slider(0.05, 1.0)])
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
    return demo, url


# ---------------------------------------------------------------- the figures

def fig_throughput(ctx, m: Model) -> dict:
    """1. Tokens/s, whole answer (request -> last token): plain generate without a
    streamer (input building included) and the runner alone, both in the clean process;
    the app (model in its engine process) through the raw SSE client; and (info) the app
    with --in-process, the app through gradio_client, and plain generate under
    torch.inference_mode (as the engine runs it: what streaming costs without the gain of
    skipping autograd bookkeeping). For the runner, also its CPU
    time per token over plain's (time.process_time() in the clean process): the overhead,
    less blurred by a busy machine."""
    n = ctx.sizes.tokens

    def timed(fn):
        def run():
            start, end, cpu = fn()
            return {"tok_s": n / (end - start), "cpu_ms_per_token": None if cpu is None else 1000 * cpu / n}
        return run

    def clean(op):  # in the clean process, which measures its own CPU
        def run():
            r = m.clean(op, m.messages, m.settings(n))
            assert r["tokens"] == n, r
            return r["start"], r["end"], r["cpu"]
        return run

    def app_sse():
        r = ctx.client("chat", url=m.url, text=m.text, files=m.files, extra=m.extra(n))
        assert m.spy.last().new_tokens == n and r["success"], r.get("error")
        return r["t_join"], r["t_done"], None  # at the client (same clock), upload done before t_join

    def app_in_process():
        r = ctx.client("chat", url=m.url_in, text=m.text, files=m.files, extra=m.extra(n))
        assert m.spy_in.last().new_tokens == n and r["success"], r.get("error")
        return r["t_join"], r["t_done"], None

    def app_gradio_client():
        r = ctx.client("gradio_client_chat", url=m.url, text=m.text, files=m.files, extra=m.extra(n))
        return r["t_join"], r["t_done"], None

    runs = interleaved({"plain": timed(clean("plain")), "runner": timed(clean("runner")), "app": timed(app_sse),
                        "plain_inference_mode": timed(clean("plain_inference_mode")),
                        "app_in_process": timed(app_in_process), "app_gradio_client": timed(app_gradio_client)},
                       ctx.sizes.rounds)
    m.spy.streams.clear()
    m.spy_in.streams.clear()
    tok_s = {k: [r["tok_s"] for r in v] for k, v in runs.items()}
    cpu = {k: median(r["cpu_ms_per_token"] for r in v) for k, v in runs.items()}
    out = {"tokens": n, "rounds": runs, "median_tokens_per_second": {k: median(v) for k, v in tok_s.items()},
           "median_cpu_ms_per_token": cpu}
    cpu = {k: v for k, v in cpu.items() if v is not None}
    for variant, target in (("app", 0.98), ("runner", 0.99), ("plain_inference_mode", None),
                            ("app_in_process", None), ("app_gradio_client", None)):
        ratios = paired(tok_s[variant], tok_s["plain"], lambda a, b: a / b)
        ratio, best = median(ratios), max(tok_s[variant]) / max(tok_s["plain"])
        out[variant] = {"ratio": ratio, "ratio_quartiles": [percentile(ratios, 0.25), percentile(ratios, 0.75)],
                        "best_of_rounds_ratio": best}
        shown = (f"{ratio:.3f} ({median(tok_s[variant]):.0f} vs {median(tok_s['plain']):.0f} tok/s; "
                 f"rounds {percentile(ratios, 0.25):.2f}-{percentile(ratios, 0.75):.2f}, best-of {best:.2f})")
        if target:
            if variant in cpu:
                shown += f"; CPU {1000 * (cpu[variant] - cpu['plain']):+.0f} µs/token"
            ctx.check(1, f"throughput {variant} / plain", m.name, ratio, f">= {target}", ratio >= target, shown)
        elif variant == "plain_inference_mode":
            app_vs = median(paired(tok_s["app"], tok_s[variant], lambda a, b: a / b))
            out["app_vs_plain_inference_mode"] = app_vs
            ctx.info(1, "throughput plain under inference_mode / plain", m.name,
                     shown + f"; the engine generates so: app / this = {app_vs:.3f}")
        elif variant == "app_in_process":
            ctx.info(1, "throughput app --in-process / plain", m.name,
                     shown + "; the model shares the web server's interpreter lock")
        else:
            ctx.info(1, "throughput via gradio_client / plain", m.name, shown + ", incl. its upload")
    return out


def fig_ttft(ctx, m: Model) -> dict:
    """2. Time to first text. Plain: build inputs + generate until the first token whose
    text is not empty. App and echo: raw SSE client, POST queue/join -> first
    process_generating message whose answer text is not empty (the app's "Thinking…"
    indicator before it is not answer text)."""
    k = ctx.sizes.ttft_tokens
    echo_demo, echo_url = serve_echo()

    def plain():
        return m.clean("plain_ttft", m.messages, m.settings(k))

    def runner():
        return m.clean("runner_ttft", m.messages, m.settings(k))

    def app_sse():
        r = ctx.client("chat", url=m.url, text=m.text, files=m.files, extra=m.extra(k))
        return r["t_first_text"] - r["t_join"]

    def app_in_process():
        r = ctx.client("chat", url=m.url_in, text=m.text, files=m.files, extra=m.extra(k))
        return r["t_first_text"] - r["t_join"]

    def echo():
        r = ctx.client("chat", url=echo_url, text=m.text, files=m.files, extra=m.extra(k))
        return r["t_first_text"] - r["t_join"]

    def app_gradio_client():
        r = ctx.client("gradio_client_chat", url=m.url, text=m.text, files=m.files, extra=m.extra(k))
        return r["t_first_text"] - r["t_join"]

    try:
        runs = interleaved({"plain": plain, "runner": runner, "app": app_sse, "app_in_process": app_in_process,
                            "echo": echo, "app_gradio_client": app_gradio_client}, ctx.sizes.ttft_rounds)
    finally:
        echo_demo.close()
    m.spy.streams.clear()
    m.spy_in.streams.clear()
    plain_text = [p["first_text"] for p in runs["plain"]]
    overhead = median(paired(runs["app"], plain_text, lambda a, b: a - b))
    floor = median(runs["echo"])
    ms = {k: 1000 * median(v) for k, v in (("app", runs["app"]), ("plain", plain_text), ("echo", runs["echo"]),
                                            ("runner", runs["runner"]), ("gc", runs["app_gradio_client"]))}
    ctx.check(2, "TTFT overhead vs floor + 10 ms", m.name, overhead * 1000, "<= floor + 10 ms",
              overhead <= floor + 0.010,
              f"{overhead * 1000:.1f} ms (app {ms['app']:.1f} − plain {ms['plain']:.1f}); "
              f"floor {floor * 1000:.1f} ms")
    in_process = median(paired(runs["app_in_process"], plain_text, lambda a, b: a - b))
    ctx.info(2, "TTFT runner alone / app --in-process / via gradio_client", m.name,
             f"runner {ms['runner']:.1f} ms (+{ms['runner'] - ms['plain']:.1f}); "
             f"app --in-process overhead {1000 * in_process:.1f} ms; "
             f"gradio_client {ms['gc']:.1f} ms (incl. its upload + 50 ms polling)")
    return {"measured_with": "raw HTTP: POST /gradio_api/queue/join -> GET /gradio_api/queue/data "
                             "(SSE), client in a separate process; files uploaded before the clock",
            "seconds": runs, "overhead_s": overhead, "floor_s": floor,
            "plain_first_token_s": median(p["first_token"] for p in runs["plain"])}


def long_line_ids(tokenizer, count: int) -> list[int]:
    from tests.tiny_models import CORPUS
    line = " ".join(CORPUS.split())  # one line, no newlines
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer.encode(" " + line, add_special_tokens=False)
    return ids[:count]


def fig_detokenize(ctx) -> dict:
    """3. Cost of streamer.put() per token along one long line (token ids fed directly,
    one tensor per call as generate does), ours vs transformers' TextIteratorStreamer."""
    tokenizer = ctx.main.runner.tokenizer
    ids = long_line_ids(tokenizer, ctx.sizes.detok_tokens)
    tensors = [torch.tensor([i]) for i in ids]
    prompt = torch.tensor([[tokenizer.bos_token_id or 0]])

    def costs(streamer) -> list[float]:
        streamer.put(prompt)  # generate's first put is the prompt
        out = []
        for t in tensors:
            start = time.perf_counter_ns()
            streamer.put(t)
            out.append((time.perf_counter_ns() - start) / 1000)  # µs
        return out

    runs = interleaved({
        "ours": lambda: costs(IncrementalTextStreamer(tokenizer, queue.Queue().put)),
        "TextIteratorStreamer": lambda: costs(TextIteratorStreamer(tokenizer, skip_prompt=True)),
    }, max(3, ctx.sizes.rounds))
    positions = [100, 1000, 4000]

    def at(costs_of_round, position):  # median of the 200 calls around a position
        return statistics.median(costs_of_round[max(0, position - 100):position + 100])

    table = {name: {p: median(at(r, p) for r in rounds) for p in positions} for name, rounds in runs.items()}
    growth = {name: median(at(r, 4000) / at(r, 100) for r in rounds) for name, rounds in runs.items()}
    per_token = {name: [statistics.median(r[i] for r in rounds) for i in range(len(ids))]
                 for name, rounds in runs.items()}
    ours, ref = table["ours"], table["TextIteratorStreamer"]
    ctx.check(3, "detokenize ours @4000 / @100", ctx.main.name, growth["ours"], "<= 1.5", growth["ours"] <= 1.5,
              f"{growth['ours']:.2f} ({ours[100]:.1f} / {ours[1000]:.1f} / {ours[4000]:.1f} µs at 100/1000/4000)")
    ctx.info(3, "detokenize TextIteratorStreamer", ctx.main.name,
             f"{ref[100]:.1f} / {ref[1000]:.1f} / {ref[4000]:.1f} µs at 100/1000/4000 "
             f"({growth['TextIteratorStreamer']:.1f}x)")
    ctx.detok_curves = per_token
    return {"microseconds_per_put": table, "growth_4000_over_100": growth, "tokens": len(ids),
            "curve_every_10_tokens": {k: [round(statistics.median(v[i:i + 10]), 2) for i in range(0, len(v), 10)]
                                      for k, v in per_token.items()}}


def fig_stop(ctx) -> dict:
    """4. Stop: the client cancels (POST /gradio_api/cancel, what job.cancel() and the Stop
    button send) after its 10th text update. Server side: when the cancel request reached
    Gradio's cancel handler (gradio.routes.cancel_tasks, wrapped), when the app closed the
    stream, when the engine process acted on it, every token's time (recorded by the
    engine), and when generation ended (the answer's end on the generation loop's thread,
    which lives on)."""
    import gradio.routes as routes
    m = ctx.main
    arrivals = []
    original_cancel = routes.cancel_tasks

    async def timed_cancel_tasks(task_ids):
        arrivals.append(perf_counter())
        return await original_cancel(task_ids)

    rounds = []
    routes.cancel_tasks = timed_cancel_tasks
    try:
        for _ in range(ctx.sizes.rounds + 1):
            r = ctx.client("chat", url=m.url, text=m.text, files=m.files,
                           extra=m.extra(ctx.sizes.stop_max_tokens), cancel_after_updates=10)
            stream = m.spy.last()
            times, arrived = token_times(stream), arrivals[-1]
            rounds.append({
                "tokens_before_cancel": sum(t <= arrived for t in times),
                "tokens_after_cancel_arrived": sum(t > arrived for t in times),
                "tokens_after_cancel_sent": sum(t > r["t_cancel_sent"] for t in times),
                "cancel_arrived_to_stream_closed_ms": 1000 * (stream.bench_closed_at - arrived),
                "cancel_arrived_to_engine_stopping_ms": 1000 * (stream.closed_at - arrived),
                "last_token_to_thread_end_ms": 1000 * (stream.ended_at - times[-1]),
                "finish_reason": stream.finish_reason})
        # the engine alone: close() from the consuming thread, as the app's finally does
        engine = []
        for _ in range(ctx.sizes.rounds):
            with m.spy_in.original(m.messages, m.settings(ctx.sizes.stop_max_tokens)) as stream:
                for i, _ in enumerate(stream):
                    if i == 9:
                        break
                closed = perf_counter()
            times = token_times(stream)
            engine.append({"tokens_after_close": sum(t > closed for t in times),
                           "last_token_to_thread_end_ms": 1000 * (stream.ended_at - times[-1])})
    finally:
        routes.cancel_tasks = original_cancel
        m.spy.streams.clear()
    rounds = rounds[1:]  # the first is a warm-up
    after = median(r["tokens_after_cancel_arrived"] for r in rounds)
    lag = median(r["last_token_to_thread_end_ms"] for r in rounds)
    to_close = median(r["cancel_arrived_to_stream_closed_ms"] for r in rounds)
    to_engine = median(r["cancel_arrived_to_engine_stopping_ms"] for r in rounds)
    ctx.check(4, "stop: tokens after cancel reached server", m.name, after, "<= 1", after <= 1,
              f"{after:g} (max {max(r['tokens_after_cancel_arrived'] for r in rounds)}); "
              f"cancel -> stream.close() {to_close:.1f} ms -> engine process stopping {to_engine:.1f} ms")
    ctx.check(4, "stop: last token -> generation end", m.name, lag, "<= 20 ms", lag <= 20, f"{lag:.1f} ms")
    ctx.info(4, "stop: engine alone (close())", m.name,
             f"{median(e['tokens_after_close'] for e in engine):g} tokens after close, generation end "
             f"{median(e['last_token_to_thread_end_ms'] for e in engine):.1f} ms after the last token")
    return {"rounds": rounds, "engine_alone": engine}


def browser_history(messages: int) -> list[dict]:
    """A chat as the app keeps it (neutral messages). Short messages: the prompt stays ~3k
    tokens, so the model's own cost grows less."""
    turns = []
    for _ in range(messages // 2):
        turns.append({"role": "user", "content": [{"type": "text", "text": "Hi!"}]})
        turns.append({"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]})
    return turns


def fig_long_chat(ctx) -> dict:
    """5. Server CPU per generated token, empty history vs a long one, in the browser's
    event (answer = the whole chatbot, postprocessed and diffed per update). The long
    history is a saved conversation (a fresh copy per turn, so its length stays), opened
    by the page load as a reload of the browser that keeps it would; then one turn runs.
    (The /chat API's history is its session's own, built turn by turn: not preloaded here.)
    CPU is user+system time of the web server process (this one: Gradio, HTTP, the chat
    fn) and of the engine process (the model), read by the client process (psutil) when
    the first text arrives and when the event completes, divided by the tokens generated
    in between (the engine's token times; prefill is out). The target is on the web
    server's CPU: what grows with the chat is Gradio's per-update work. The engine's
    growth is the model attending over a longer prompt, shown beside it."""
    m, n = ctx.main, ctx.sizes.chat_tokens
    history = browser_history(ctx.sizes.history_messages)
    asked = app.user_message({"text": m.text, "files": m.files})
    prompt_tokens = {k: int(m.runner.build_inputs(for_the_model([*h, asked]))["input_ids"].shape[-1])
                     for k, h in (("empty", []), ("long", history))}
    chats = m.demo.chats
    token = chats.browser_ids.issue()
    user = users.user_key(browser_id=chats.browser_ids.check(token))

    def app_turn(hist, browser):
        def run():
            kept = {"id": token}
            if hist:
                kept["open"] = chats.store.create(user, "a long chat")
                chats.store.append(user, kept["open"], hist)
            r = ctx.client("chat", url=m.url, text=m.text, files=m.files, extra=m.extra(n),
                           kept=kept, browser=browser, cpu_pids=[os.getpid(), m.engine.pid])
            stream = m.spy.last()
            assert r["success"] and stream.new_tokens == n, r.get("error")
            tokens = sum(t > r["t_first_text"] for t in token_times(stream))
            m.spy.streams.clear()
            updates.setdefault(run, []).append((len(r["updates"]) - 1) / tokens)
            web, engine = ((done - first) / tokens for first, done in zip(r["cpu_first_text"], r["cpu_done"]))
            seconds = r["t_done"] - r["t_first_text"]
            return {"web": web, "engine": engine, "total": web + engine, "web_per_second": web * tokens / seconds}
        return run

    variants, updates = {}, {}
    for key, hist in (("empty", []), ("long", history)):
        variants[f"browser {key}"] = app_turn(hist, browser=True)
    runs = interleaved(variants, ctx.sizes.few_rounds, warmup=False)
    ms = {f"{k} {part}": 1000 * median(r[part] for r in v) for k, v in runs.items()
          for part in ("web", "engine", "total")}
    out = {"history_messages": len(history), "prompt_tokens": prompt_tokens, "tokens": n,
           "cpu_seconds_per_token": runs, "median_ms_per_token": ms,
           "updates_per_token": {k: median(updates[v]) for k, v in variants.items()}}
    for path in ("browser",):
        ratios = {part: median(paired([r[part] for r in runs[f"{path} long"]],
                                      [r[part] for r in runs[f"{path} empty"]], lambda a, b: a / b))
                  for part in ("web", "engine", "total")}
        out[f"{path}_ratios"] = ratios
        ctx.check(5, f"long chat web-server CPU/token ({path})", m.name, ratios["web"], "<= 1.5",
                  ratios["web"] <= 1.5,
                  f"{ratios['web']:.2f}x ({ms[f'{path} empty web']:.2f} -> {ms[f'{path} long web']:.2f} ms/token)")
        per_second = {k: 1000 * median(r["web_per_second"] for r in runs[f"{path} {k}"]) for k in ("empty", "long")}
        out[f"{path}_web_ms_per_second"] = per_second
        ctx.info(5, f"long chat web-server CPU per second ({path})", m.name,
                 f"{per_second['empty']:.0f} -> {per_second['long']:.0f} ms/s while streaming "
                 f"({median(updates[variants[f'{path} empty']]):.2f} -> "
                 f"{median(updates[variants[f'{path} long']]):.2f} updates/token)")
        ctx.info(5, f"long chat engine, total CPU/token ({path})", m.name,
                 f"engine {ratios['engine']:.2f}x ({ms[f'{path} empty engine']:.2f} -> "
                 f"{ms[f'{path} long engine']:.2f}); total {ratios['total']:.2f}x "
                 f"({ms[f'{path} empty total']:.2f} -> {ms[f'{path} long total']:.2f} ms/token)")
    ctx.info(5, "long chat: what the engine's growth is", m.name,
             f"the model on {prompt_tokens['long']} vs {prompt_tokens['empty']} prompt tokens "
             f"({len(history)} messages): attention over the longer context, not the app")
    return out


def fig_concurrency(ctx) -> dict:
    """6. 1, 4 and 8 clients submit at once (separate sessions and connections):
    aggregate tokens/s = all tokens / (last completion - first join); TTFT per client
    includes its wait in the app's one-at-a-time queue. For a text-only model, the same
    again with continuous batching (an engine process started with --batching on)."""
    m, n = ctx.main, ctx.sizes.concurrency_tokens

    def clients(count, url):
        def run():
            results = ctx.client("concurrent", url=url, clients=count, text=m.text, files=m.files,
                                 extra=m.extra(n))
            assert all(r["success"] for r in results)
            span = max(r["t_done"] for r in results) - min(r["t_join"] for r in results)
            return {"tokens_per_second": count * n / span,
                    "ttft_s": [r["t_first_text"] - r["t_join"] for r in results]}
        return run

    def measure(label, url):
        # all the rounds, not few_rounds: a round is short (~10 s) and single rounds swing ±15 %
        runs = interleaved({c: clients(c, url) for c in (1, 4, 8)}, ctx.sizes.rounds, warmup=label != "")
        summary = {}
        for count, rs in runs.items():
            ttfts = [t for r in rs for t in r["ttft_s"]]
            summary[count] = {"tokens_per_second": median(r["tokens_per_second"] for r in rs),
                              "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95)}
        ratio = median(paired([r["tokens_per_second"] for r in runs[8]],
                              [r["tokens_per_second"] for r in runs[1]], lambda a, b: a / b))
        line = "; ".join(f"{c}: {s['tokens_per_second']:.0f} tok/s, TTFT p50 {1000 * s['ttft_p50_s']:.0f} / "
                         f"p95 {1000 * s['ttft_p95_s']:.0f} ms" for c, s in summary.items())
        return {"tokens": n, "rounds": {str(k): v for k, v in runs.items()},
                "summary": {str(k): v for k, v in summary.items()}, "ratio_8_to_1": ratio}, line

    out, line = measure("", m.url)
    m.spy.streams.clear()
    ratio = out["ratio_8_to_1"]
    ctx.check(6, "concurrency: 8-client / 1-client tok/s", m.name, ratio, ">= 1.0", ratio >= 1.0,
              f"{ratio:.3f}")
    ctx.info(6, "concurrency detail", m.name, line)
    if not m.runner.is_vision:
        engine = EngineProcess.start(m.path, device=m.runner.device, batching="on",
                                     torch_threads=m.engine_threads)
        demo, url = app.serve(engine, host="127.0.0.1", port=free_port(), block=False, quiet=True, save=False)
        try:
            out["batching"], line = measure("batching", url)
        finally:
            demo.close()
            engine.close()
        ratio = out["batching"]["ratio_8_to_1"]
        ctx.info(6, "concurrency with --batching on, 8-client / 1-client tok/s", m.name, f"{ratio:.3f}")
        ctx.info(6, "concurrency detail, --batching on", m.name, line)
    return out


def fig_memory(ctx, m: Model) -> dict:
    """7. Server RSS and threads (OS threads of the web server and engine processes, and
    the web server's Python threads) after a warm-up, then after conversations of 10
    turns, each turn with an image uploaded anew, through /chat; gc.collect() and the
    same 2 s settle before each reading. RSS is the sum of both processes. The spy keeps
    no streams here. Gradio keeps each closed session's chat state for an hour by design;
    that is part of the growth."""
    me, engine = psutil.Process(), psutil.Process(m.engine.pid)
    m.spy.record = False
    turns_per_chat = 10

    def reading():
        gc.collect()
        time.sleep(2)
        gc.collect()
        return {"rss_mb": (me.memory_info().rss + engine.memory_info().rss) / 2**20,
                "web_rss_mb": me.memory_info().rss / 2**20, "engine_rss_mb": engine.memory_info().rss / 2**20,
                "os_threads": me.num_threads() + engine.num_threads(),
                "python_threads": threading.active_count()}

    try:
        ctx.client("conversations", url=m.url, count=2, turns=5, text=m.text, files=m.files, extra=m.extra(16))
        before = reading()
        done = ctx.client("conversations", url=m.url, count=ctx.sizes.memory_turns // turns_per_chat,
                          turns=turns_per_chat, text=m.text, files=m.files, extra=m.extra(16))
        after = reading()
    finally:
        m.spy.record = True
    growth = after["rss_mb"] - before["rss_mb"]
    threads_ok = after["os_threads"] <= before["os_threads"] and after["python_threads"] <= before["python_threads"]
    turns = ctx.sizes.memory_turns // turns_per_chat * turns_per_chat
    ctx.check(7, f"memory: RSS growth over {turns} turns", m.name, growth, "< 30 MB", growth < 30,
              f"{growth:+.1f} MB ({before['rss_mb']:.0f} -> {after['rss_mb']:.0f}; web server "
              f"{after['web_rss_mb'] - before['web_rss_mb']:+.1f}, engine "
              f"{after['engine_rss_mb'] - before['engine_rss_mb']:+.1f}); "
              f"{done['failures']} failed turns, {done['seconds']:.0f} s")
    ctx.check(7, "memory: threads back to baseline", m.name, after["os_threads"] - before["os_threads"],
              "<= baseline", threads_ok,
              f"OS {before['os_threads']} -> {after['os_threads']}, Python {before['python_threads']} -> "
              f"{after['python_threads']}")
    return {"turns": turns, "before": before, "after": after, "client": done}


def fig_startup(ctx) -> dict:
    """8. `python app.py --model DIR --port P` in a fresh process: seconds from Popen
    until GET / answers 200, and until GET /healthz says "loaded": true (polled every
    20 ms; equal times when the app loads the model before serving)."""
    import httpx
    m = ctx.main
    rounds = []
    for _ in range(ctx.sizes.few_rounds):
        port = free_port()
        base = f"http://127.0.0.1:{port}/"
        log = tempfile.TemporaryFile()
        start = perf_counter()
        process = subprocess.Popen([sys.executable, "app.py", "--model", m.path, "--port", str(port)],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        ui = loaded = None
        try:
            with httpx.Client(timeout=2) as http:
                while perf_counter() - start < ctx.sizes.startup_timeout and loaded is None:
                    if process.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"app.py exited {process.returncode}: {log.read()[-500:]!r}")
                    try:
                        if ui is None and http.get(base).status_code == 200:
                            ui = perf_counter() - start
                        if ui is not None:
                            health = http.get(base + "healthz")
                            if health.status_code == 200 and health.json().get("loaded") is True:
                                loaded = perf_counter() - start
                    except httpx.TransportError:
                        pass
                    time.sleep(0.02)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        rounds.append({"ui_s": ui, "loaded_s": loaded})
    ui, loaded = median(r["ui_s"] for r in rounds), median(r["loaded_s"] for r in rounds)
    ctx.check(8, "start-up: UI answers", m.name, ui, "<= 5 s", ui is not None and ui <= 5,
              f"{ui:.2f} s; model loaded at {loaded:.2f} s" if ui and loaded else f"UI {ui}, loaded {loaded}")
    return {"command": f"python app.py --model {m.path} --port P", "rounds": rounds}


def long_answer_latency(ctx) -> dict:
    """The plot: per-token latency (time between consecutive tokens, as generate emits
    them) over one long answer: plain generate, the runner, the app with its client."""
    m, n = ctx.main, ctx.sizes.long_tokens

    def plain():
        return m.clean("plain_times", m.messages, m.settings(n))

    def runner():
        return m.clean("runner_times", m.messages, m.settings(n))

    def app_sse():
        ctx.client("chat", url=m.url, text=m.text, files=m.files, extra=m.extra(n))
        return token_times(m.spy.last())

    runs = interleaved({"plain": plain, "runner": runner, "app": app_sse}, ctx.sizes.few_rounds, warmup=False)
    m.spy.streams.clear()
    gaps = {k: [[1000 * (b - a) for a, b in zip(times, times[1:])] for times in v] for k, v in runs.items()}
    curves = {k: [statistics.median(r[i] for r in v) for i in range(n - 1)] for k, v in gaps.items()}
    ctx.latency_curves = curves
    summary = {k: {"first_100_ms": statistics.median(c[:100]), "last_100_ms": statistics.median(c[-100:]),
                   "tokens_per_second": median((len(t) - 1) / (t[-1] - t[0]) for t in runs[k])}
               for k, c in curves.items()}
    ctx.info("plot", f"per-token latency, {n}-token answer", m.name,
             "; ".join(f"{k} {s['first_100_ms']:.2f} -> {s['last_100_ms']:.2f} ms" for k, s in summary.items()))
    return {"tokens": n, "summary": summary,
            "ms_every_10_tokens": {k: [round(statistics.median(c[i:i + 10]), 3) for i in range(0, len(c), 10)]
                                   for k, c in curves.items()}}


# ---------------------------------------------------------------- report

MEASUREMENT_NOTES = """
How: medians over interleaved rounds (order rotated each round); ratios are medians of
per-round ratios. App figures come from a client in a separate process speaking Gradio's
queue API over raw HTTP/SSE (POST /gradio_api/queue/join, GET /gradio_api/queue/data),
timestamping each event on arrival; files are uploaded before the clock starts. Rows
marked gradio_client use gradio_client, whose reader polls every 50 ms (and uploads
inside the clock). "app" is the app as `python app.py` runs it: the web server in this
process, the model in an engine process (engine_process.py); "--in-process" rows have the
model in the web server's process. Token times are recorded by the engine (same clock).
See the docstring of bench/benchmark.py for each figure."""


class Context:
    def __init__(self, args, sizes):
        self.args, self.sizes = args, sizes
        self.rows: list[dict] = []
        self.client: ClientProcess | None = None
        self.main: Model | None = None
        self.detok_curves = self.latency_curves = None

    def check(self, figure, name, model, value, target, ok, shown):
        self.rows.append({"figure": figure, "name": name, "model": model, "value": value,
                          "target": target, "ok": bool(ok), "shown": shown})

    def info(self, figure, name, model, shown):
        self.rows.append({"figure": figure, "name": name, "model": model, "target": "", "ok": None,
                          "shown": shown})


def print_table(rows: list[dict]) -> None:
    width = max(len(r["name"]) for r in rows)
    mwidth = max(len(r["model"]) for r in rows)
    print(f"\n{'#':<5}{'figure':<{width + 2}}{'model':<{mwidth + 2}}{'target':<19}   result")
    for r in rows:
        mark = {True: "✓", False: "✗", None: "·"}[r["ok"]]
        print(f"{str(r['figure']):<5}{r['name']:<{width + 2}}{r['model']:<{mwidth + 2}}{r['target']:<19}{mark}  "
              f"{r['shown']}")
    checks = [r for r in rows if r["ok"] is not None]
    print(f"\n{sum(r['ok'] for r in checks)}/{len(checks)} targets met "
          f"(✓ met, ✗ missed, · information)")
    print(MEASUREMENT_NOTES)


def rolling_median(values, window=25):
    half = window // 2
    return [statistics.median(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def plot(ctx, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-bench.txt): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in (ctx.latency_curves, ctx.detok_curves) if p]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.2 * len(panels)), squeeze=False)
    axes = axes[:, 0]
    i = 0
    if ctx.latency_curves:
        ax = axes[i]
        i += 1
        for name, curve in ctx.latency_curves.items():
            ax.plot(range(2, len(curve) + 2), rolling_median(curve), label=name, linewidth=1.2)
        ax.set_title(f"Per-token latency over a long answer ({ctx.main.name}; median of "
                     f"{ctx.sizes.few_rounds} rounds per position, rolling median of 25)")
        ax.set_xlabel("token position in the answer")
        ax.set_ylabel("ms between tokens")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    if ctx.detok_curves:
        ax = axes[i]
        for name, curve in ctx.detok_curves.items():
            ax.plot(range(1, len(curve) + 1), rolling_median(curve), label=name, linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title("Detokenization cost per token, one long line without newlines (rolling median of 25)")
        ax.set_xlabel("token position in the line")
        ax.set_ylabel("µs per streamer.put()")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main

def prepare_models(args) -> list[tuple[str, str]]:
    from tests.tiny_models import build_all, build_bench_llama
    tiny_root = ROOT / "tiny-models"
    tiny = build_all(tiny_root)
    bench = tiny_root / "bench-llama"
    if not (bench / "config.json").exists():
        build_bench_llama(bench)
    ctx_models = [(Path(m).name if Path(m).is_dir() else m, m) for m in args.model] if args.model else \
        [("bench-llama", str(bench)), ("idefics3", str(tiny["idefics3"]))]
    return ctx_models, str(tiny["idefics3"])


def load_model(name, path, image, device, compile, torch_threads) -> Model:
    runner = ModelRunner.load(path, device=device, compile=compile, torch_threads=torch_threads,
                              record_token_times=True)
    files = [str(image)] if runner.is_vision else []
    return Model(name, path, runner, files, IMAGE_PROMPT if runner.is_vision else TEXT_PROMPT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for what each figure measures.")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens (~2-3 min)")
    parser.add_argument("--model", action="append", metavar="ID_OR_DIR",
                        help="model to measure (repeatable); the first is the main model. "
                             "Default: bench-llama and the tiny idefics3, built locally")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 6, --quick 3); "
                                                   "TTFT uses 3x, the slow figures half")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    parser.add_argument("--device", default="cpu", help="device for the models (default cpu)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads for every variant, plain generate included (default: the "
                             "app's own, model_runner.default_torch_threads(): the cores less one)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="load every variant (plain generate too) as `app.py --compile` does (default "
                             "auto, as the app: static KV cache + torch.compile of decoding on CUDA)")
    parser.add_argument("--only", help="comma-separated figure numbers to run (e.g. 1,2,plot)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = Sizes.make(args.quick, args.rounds)
    only = set(args.only.split(",")) if args.only else None
    wanted = lambda key: only is None or str(key) in only  # noqa: E731
    args.torch_threads = args.torch_threads or default_torch_threads()
    torch.set_num_threads(args.torch_threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, sizes)
    started, load_start = time.time(), os.getloadavg()
    image = Path(os.environ["GRADIO_TEMP_DIR"]) / "bench-image.png"
    Image.effect_noise((64, 48), 90).convert("RGB").save(image)

    model_specs, tiny_idefics3 = prepare_models(args)
    models = [load_model(name, path, image, args.device, args.compile, args.torch_threads)
              for name, path in model_specs]
    ctx.main = models[0]
    vision = next((m for m in models if m.runner.is_vision), None)
    print(f"benchmark: {', '.join(m.name for m in models)} on {args.device}, torch threads "
          f"{torch.get_num_threads()}, sizes {dataclasses.asdict(sizes)}", flush=True)
    if load_start[0] > 0.5 * os.cpu_count():
        print(f"note: the machine is busy (load average {load_start[0]:.1f} on {os.cpu_count()} CPUs): "
              f"wall-clock figures will be noisy; see the per-round spread in the table and JSON", flush=True)
    figures: dict = {}

    def run(key, label, fn, *fn_args):
        if not wanted(key):
            return
        print(f"  {label} ...", flush=True)
        t = perf_counter()
        try:
            figures.setdefault(label, {})
            result = fn(ctx, *fn_args)
            if fn_args and isinstance(fn_args[0], Model):
                figures[label][fn_args[0].name] = result
            else:
                figures[label] = result
        except Exception as error:
            traceback.print_exc()
            figures[label] = {"error": f"{type(error).__name__}: {error}"}
            model = fn_args[0].name if fn_args and isinstance(fn_args[0], Model) else ctx.main.name
            ctx.check(key, f"{label}: failed", model, None, "runs", False, f"{type(error).__name__}: {error}")
        print(f"    {perf_counter() - t:.0f} s", flush=True)

    ctx.client = ClientProcess()
    try:
        for m in models:
            serve_model(m, args.torch_threads)
            try:
                run(1, "1 throughput", fig_throughput, m)
                run(2, "2 ttft", fig_ttft, m)
                if m is ctx.main:
                    run(3, "3 detokenize", fig_detokenize)
                    run(4, "4 stop", fig_stop)
                    run(5, "5 long chat", fig_long_chat)
                    run(6, "6 concurrency", fig_concurrency)
                    run("plot", "per-token latency", long_answer_latency)
                if m is vision:
                    run(7, "7 memory", fig_memory, m)
            finally:
                stop_serving(m)
        if vision is None and wanted(7):
            m = load_model("idefics3", tiny_idefics3, image, args.device, args.compile, args.torch_threads)
            serve_model(m, args.torch_threads)
            try:
                run(7, "7 memory", fig_memory, m)
            finally:
                stop_serving(m)
    finally:
        ctx.client.close()
    del models
    gc.collect()
    run(8, "8 start-up", fig_startup)

    print_table(ctx.rows)
    plotted = plot(ctx, args.out / "per_token_latency.png")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "torch_threads": torch.get_num_threads()},
        "versions": {name: __import__(name).__version__ for name in
                     ("torch", "transformers", "gradio", "gradio_client", "tokenizers", "httpx")},
        "models": {m_name: path for m_name, path in model_specs},
        "sizes": dataclasses.asdict(sizes),
        "checks": ctx.rows,
        "figures": figures,
    }
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"load average: {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} CPUs)")
    print(f"\nwrote {args.out / 'benchmark.json'}" + (f" and {args.out / 'per_token_latency.png'}" if plotted else "")
          + f" in {report['seconds']:.0f} s")
    return 0 if all(r["ok"] for r in ctx.rows if r["ok"] is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
