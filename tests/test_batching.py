"""Continuous batching (--batching): concurrent answers share the forward passes, each one
streams, stops and fails on its own, and the answers are the ones plain generate gives."""

import gc
import itertools
import threading

import httpx
import openai
import pytest

import app
import batching
from engine_contract import ChatInputError, GenerationError, GenerationSettings, Runner
from model_runner import BatchedStream, ModelRunner
from tests.conftest import hold_generation, wait_for

PROMPTS = ["hello there", "tell me a story about the river", "a b c d e f g", "why is the sky blue?",
           "one", "two words", "count to ten please", "what is a bridge"]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def batched_runner(tiny_model_paths):
    runner = ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", batching="on")
    yield runner
    runner.close()


def answer(runner, text: str, settings: GenerationSettings):
    with runner.stream(chat(text), settings) as stream:
        for _ in stream:
            pass
    return stream


def answer_all_at_once(runner, texts, settings_for) -> list:
    """Every text asked at the same moment, each read in a thread of its own."""
    streams = [runner.stream(chat(text), settings_for(i)) for i, text in enumerate(texts)]
    readers = [threading.Thread(target=lambda s=s: [None for _ in s]) for s in streams]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    return streams


def test_batched_greedy_answers_equal_plain_generate_token_for_token(batched_runner, llama_runner, monkeypatch):
    assert isinstance(batched_runner, Runner) and not batched_runner.one_at_a_time
    lengths = [12, 40, 25, 33, 8, 40, 17, 29]
    expected = [answer(llama_runner, text, GenerationSettings(max_new_tokens=n))
                for text, n in zip(PROMPTS, lengths)]
    release = hold_generation(monkeypatch, batched_runner.model, after_calls=0)  # the model waits...
    try:
        streams = [batched_runner.stream(chat(text), GenerationSettings(max_new_tokens=n))
                   for text, n in zip(PROMPTS, lengths)]
        assert batched_runner.active == len(PROMPTS), "all started at once, none waiting for another"
    finally:
        release.set()  # ...until all are in
    for stream in streams:
        for _ in stream:
            pass
    assert all(isinstance(s, BatchedStream) for s in streams)
    for got, want in zip(streams, expected):
        assert (got.text, got.new_tokens, got.finish_reason) == (want.text, want.new_tokens, want.finish_reason)
    assert batched_runner.active == 0


def test_stopping_one_answer_leaves_the_others_running_to_the_end(batched_runner):
    long = GenerationSettings(max_new_tokens=200, min_new_tokens=200)
    stopped = batched_runner.stream(chat("stop me"), long)
    others = [batched_runner.stream(chat(text), GenerationSettings(max_new_tokens=60, min_new_tokens=60))
              for text in PROMPTS[:3]]
    pieces = iter(stopped)
    next(pieces)
    next(pieces)
    stopped.close()
    assert stopped.finish_reason == "cancelled" and stopped.new_tokens < 200
    for stream in others:
        for _ in stream:
            pass
        assert (stream.finish_reason, stream.new_tokens) == ("length", 60)
    assert stopped.tokens_after_close <= 2  # the step in flight when Stop came, at most


def test_a_stop_string_ends_only_its_own_answer(batched_runner, llama_runner):
    full = answer(llama_runner, PROMPTS[1], GenerationSettings(max_new_tokens=40)).text
    stop = full[10:14]
    streams = answer_all_at_once(batched_runner, PROMPTS[:3], lambda i: GenerationSettings(
        max_new_tokens=40, stop=[stop] if i == 1 else []))
    assert streams[1].finish_reason == "stop" and streams[1].text == full[:full.index(stop)]
    assert [s.finish_reason for s in (streams[0], streams[2])] == ["length", "length"]


def test_an_error_in_one_request_is_that_requests_only(batched_runner, monkeypatch):
    """The manager fails one request (its own per-request error path); the others end well
    and the next request is served."""
    batcher = batched_runner.batcher
    monkeypatch.setattr(batcher, "_ids", itertools.count(1000))
    scheduler = batcher._manager.batch_processor.scheduler
    real_add = scheduler.add_waiting_request

    def add_waiting_request(state):
        if state.request_id == "answer-1001":
            raise RuntimeError("this one request broke")
        return real_add(state)
    monkeypatch.setattr(scheduler, "add_waiting_request", add_waiting_request)
    streams = [batched_runner.stream(chat(text), GenerationSettings(max_new_tokens=30, min_new_tokens=30))
               for text in PROMPTS[:3]]
    results = []
    for stream in streams:
        try:
            for _ in stream:
                pass
            results.append(stream.finish_reason)
        except GenerationError as error:
            results.append(str(error))
    assert results[0] == results[2] == "length"
    assert "this one request broke" in results[1] and streams[1].finish_reason == "error"
    assert answer(batched_runner, "next", GenerationSettings(max_new_tokens=5)).finish_reason == "length"


def test_a_seed_is_refused_with_a_reason(batched_runner):
    with pytest.raises(ChatInputError, match="seed"):
        batched_runner.stream(chat("hi"), GenerationSettings(max_new_tokens=5, seed=1))


def test_sampling_settings_apply_per_request(batched_runner, llama_runner):
    """A sampled answer beside greedy ones: the greedy ones stay exactly greedy."""
    greedy = answer(llama_runner, PROMPTS[0], GenerationSettings(max_new_tokens=30)).text
    streams = answer_all_at_once(batched_runner, [PROMPTS[0]] * 4, lambda i: GenerationSettings(
        max_new_tokens=30, temperature=1.5 if i % 2 else 0.0, top_p=1.0))
    assert streams[0].text == streams[2].text == greedy
    assert streams[1].text != greedy or streams[3].text != greedy


def test_eight_concurrent_api_streams_all_finish_and_memory_returns(batched_runner, serve):
    import psutil  # (accelerate depends on it)
    url, spy = serve(batched_runner)
    client = openai.OpenAI(base_url=url + "v1", api_key="none", timeout=60, max_retries=0)

    def one_round():
        results = [None] * 8

        def ask(i):
            parts = []
            for chunk in client.chat.completions.create(
                    model=batched_runner.name, messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=40,
                    temperature=0, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            results[i] = "".join(parts)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return results

    first = one_round()
    assert all(first) and len(spy.streams) == 8
    assert max(s.started_at for s in spy.streams) < min(s.ended_at for s in spy.streams), \
        "the 8 answers did not generate at the same time"
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    for _ in range(3):
        assert one_round() == first  # greedy: the same answers each round
    from batching import CLOSED_GRACE_S
    assert batched_runner.active == 0
    # (an answer stopped earlier, its late tokens counted for CLOSED_GRACE_S, is held no longer)
    wait_for(lambda: not batched_runner.batcher._streams, CLOSED_GRACE_S + 5, "the batcher to let go of every "
             "ended answer")
    gc.collect()
    grown = psutil.Process().memory_info().rss - baseline
    assert grown < 100 * 2**20, f"memory grew by {grown / 2**20:.0f} MB over 24 answers"


def test_the_ui_shows_no_place_in_line_when_answers_are_batched(batched_runner, serve):
    from gradio_client import Client
    url, spy = serve(batched_runner)
    assert not app.waiting_line_for(batched_runner).one_at_a_time
    client = Client(url, verbose=False)
    jobs = [client.submit({"text": text, "files": []}, "", 150, 0.0, 1.0, api_name="/chat")
            for text in PROMPTS[:3]]
    for job in jobs:
        job.result(timeout=60)
    assert max(s.started_at for s in spy.streams) < min(s.ended_at for s in spy.streams), \
        "the answers did not overlap"
    seen = [str(update) for job in jobs for update in job.outputs()]
    assert seen and not any("in line" in text for text in seen)
    assert "batched" in app.header_markdown(batched_runner)


def test_batching_auto_is_off_on_cpu_and_for_vision_models(tiny_model_paths):
    from batching import wants_batching
    assert wants_batching("auto", "cuda", is_vision=False) == (True, None)
    assert wants_batching("auto", "cpu", is_vision=False)[0] is False
    batched, why = wants_batching("on", "cuda", is_vision=True)
    assert not batched and "one request at a time" in why
    runner = ModelRunner.load(str(tiny_model_paths["idefics3"]), device="cpu", batching="on")
    assert runner.one_at_a_time and runner.batcher is None


def test_the_engine_process_batches_and_says_so(tiny_model_paths):
    from engine_process import EngineProcess
    engine = EngineProcess.start(str(tiny_model_paths["llama"]), device="cpu", batching="on")
    try:
        assert isinstance(engine, Runner) and not engine.one_at_a_time
        streams = [engine.stream(chat(text), GenerationSettings(max_new_tokens=80, min_new_tokens=80))
                   for text in PROMPTS[:4]]
        wait_for(lambda: engine.active == 4, 30, "the four answers generating together")
        streams[0].close()
        for stream in streams[1:]:
            for _ in stream:
                pass
            assert (stream.finish_reason, stream.new_tokens) == ("length", 80)
        assert streams[0].finish_reason == "cancelled"
    finally:
        engine.close()


def test_the_api_refuses_a_seed_it_cannot_honour_with_a_400(batched_runner, serve):
    url, _ = serve(batched_runner)
    response = httpx.post(url + "v1/chat/completions", timeout=30, json={
        "model": batched_runner.name, "messages": [{"role": "user", "content": "hi"}], "seed": 7})
    assert response.status_code == 400 and "seed" in response.json()["error"]["message"]
    response = httpx.post(url + "v1/chat/completions", timeout=30, json={
        "model": batched_runner.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert response.status_code == 200


def test_when_the_batching_loop_dies_the_answers_in_flight_end_with_an_error_and_the_next_works(
        tiny_model_paths, monkeypatch):
    runner = ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", batching="on")
    try:
        processor = runner.batcher._manager.batch_processor
        real_prepare, calls, all_sent = processor.prepare_next_batch, itertools.count(), threading.Event()

        def prepare_next_batch():
            all_sent.wait(30)  # (on a loaded machine the first answers could end before the last is sent)
            if next(calls) == 5:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real_prepare()
        monkeypatch.setattr(processor, "prepare_next_batch", prepare_next_batch)
        streams = [runner.stream(chat(text), GenerationSettings(max_new_tokens=100, min_new_tokens=100))
                   for text in PROMPTS[:4]]
        all_sent.set()
        for stream in streams:
            with pytest.raises(GenerationError, match="illegal memory access"):
                for _ in stream:
                    pass
            assert stream.finish_reason == "error"
        assert runner.active == 0
        after = answer(runner, "again", GenerationSettings(max_new_tokens=10, min_new_tokens=10))
        assert (after.finish_reason, after.new_tokens) == ("length", 10)
    finally:
        runner.close()


def test_closing_the_runner_ends_the_answers_in_flight_at_once(tiny_model_paths):
    import time
    runner = ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", batching="on")
    streams = [runner.stream(chat(text), GenerationSettings(max_new_tokens=2000, min_new_tokens=2000))
               for text in PROMPTS[:3]]
    next(iter(streams[0]))
    started = time.perf_counter()
    runner.close()
    assert time.perf_counter() - started < 5
    for stream in streams:
        assert stream.join(5) and stream.finish_reason == "error" and stream.new_tokens < 2000
    late = {}

    def ask_late():  # (in a thread: a request that hangs fails this test, not the whole run)
        try:  # refused, or started and ended at once with the reason
            for _ in runner.stream(chat("late"), GenerationSettings(max_new_tokens=5)):
                pass
        except Exception as error:
            late["error"] = error
    asker = threading.Thread(target=ask_late, daemon=True)
    asker.start()
    asker.join(10)
    assert not asker.is_alive(), "a request after close() must be refused at once, not wait forever"
    assert isinstance(late.get("error"), GenerationError) and "stopping" in str(late["error"]), late


def test_an_answer_longer_than_the_cache_holds_is_cut_to_fit_with_a_note(batched_runner, monkeypatch):
    from batching import ContinuousBatcher
    prompt_tokens = batched_runner.build_inputs(chat(PROMPTS[1]))["input_ids"].shape[-1]
    monkeypatch.setattr(ContinuousBatcher, "capacity", property(lambda self: prompt_tokens + 30))
    stream = answer(batched_runner, PROMPTS[1], GenerationSettings(max_new_tokens=100, min_new_tokens=100))
    assert (stream.new_tokens, stream.finish_reason) == (30, "length")
    assert any("at most 30 tokens" in notice for notice in stream.notices)
    import app  # the chat's note under it: the cache's, not "the model's context is full"
    assert app.out_of_room(stream, 100) is None
    with pytest.raises(ChatInputError, match="longer than the batching cache"):
        batched_runner.stream(chat(PROMPTS[1] * 20), GenerationSettings(max_new_tokens=10))


def test_batching_auto_prefers_a_compiled_model_on_cuda():
    from batching import wants_batching
    assert wants_batching("auto", "cuda", is_vision=False, compiled=True)[0] is False
    assert wants_batching("on", "cuda", is_vision=False, compiled=True)[0] is True


def test_batching_on_cpu_keeps_the_memory_of_a_small_model_small(tmp_path):
    """The engine of a 3.7M-param model (8192-token context), batching on CPU, holds its KV
    cache (512 MB) and little more (the manager's attention mask for 8192-token batches took
    2.4 GB: 3.3 GB resident in all)."""
    from engine_process import EngineProcess
    from tests.tiny_models import build_bench_llama
    engine = EngineProcess.start(str(build_bench_llama(tmp_path / "bench-llama")), device="cpu", batching="on")
    try:
        with open(f"/proc/{engine.pid}/status") as status:
            resident_mb = int(status.read().split("VmRSS:")[1].split()[0]) / 1024
        assert resident_mb < 1500, f"the engine holds {resident_mb:.0f} MB"
    finally:
        engine.close()


def test_stop_during_a_long_prefill_stops_the_compute(tmp_path, monkeypatch):
    """A long prompt is prefilled in chunks: a Stop while it is prefilled leaves at most the
    chunk underway and one more to compute (the whole prompt, ~6 s on CPU, was one pass)."""
    import functools
    from tests.tiny_models import build_bench_llama
    runner = ModelRunner.load(str(build_bench_llama(tmp_path / "bench-llama")), device="cpu", batching="on")
    try:
        real_forward, underway, release, sizes = runner.model.forward, threading.Event(), threading.Event(), []

        @functools.wraps(real_forward)
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            sizes.append(ids.shape[-1])
            underway.set()
            release.wait(60)
            return real_forward(*args, **kwargs)
        monkeypatch.setattr(runner.model, "forward", forward)
        stream = runner.stream(chat("tell me " * 1000), GenerationSettings(max_new_tokens=5))
        assert underway.wait(60)
        stream.close(wait=0)  # Stop, while the first pass is underway
        release.set()
        stream.join(60)
        assert stream.finish_reason == "cancelled" and stream.prompt_tokens > 2000
        assert sum(sizes) <= 2 * batching.BATCH_CPU_MAX_BATCH_TOKENS < stream.prompt_tokens, sizes
    finally:
        runner.close()
