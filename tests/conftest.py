"""Shared fixtures: tiny local models (built once per test session) and the app served
in-process on a free 127.0.0.1 port."""

import functools
import itertools
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

# Before gradio / huggingface_hub are imported anywhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="gradio-test-"))
os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="chats-test-"))  # apps started as programs keep chats here

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from model_runner import ModelRunner  # noqa: E402
from tests.tiny_models import build_all  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def idefics3_runner(tiny_model_paths):
    return ModelRunner.load(str(tiny_model_paths["idefics3"]), device="cpu")


@pytest.fixture(scope="session")
def llava_runner(tiny_model_paths):
    return ModelRunner.load(str(tiny_model_paths["llava"]), device="cpu")


@pytest.fixture(scope="session")
def llama_runner(tiny_model_paths):
    return ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu")


@pytest.fixture(scope="session")
def reasoning_runner(tiny_model_paths):
    return ModelRunner.load(str(tiny_model_paths["reasoning"]), device="cpu")


@pytest.fixture(scope="session")
def idefics3_engine_process(tiny_model_paths):
    """The idefics3 model in an engine process of its own (the app's default)."""
    from engine_process import EngineProcess
    engine = EngineProcess.start(str(tiny_model_paths["idefics3"]), device="cpu", record_token_times=True)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def long_answer_engine_process(tmp_path_factory):
    """bench-llama (8192 positions, ~150 tokens/s here) in an engine process: its long
    answers last tens of seconds, for tests that need one generating while others wait."""
    from engine_process import EngineProcess
    from tests.tiny_models import build_bench_llama
    engine = EngineProcess.start(str(build_bench_llama(tmp_path_factory.mktemp("bench-llama") / "bench-llama")),
                                 device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def llama_engine_process(tiny_model_paths):
    from engine_process import EngineProcess
    engine = EngineProcess.start(str(tiny_model_paths["llama"]), device="cpu")
    yield engine
    engine.close()


@pytest.fixture(params=["in-process", "engine-process"])
def llama_engine_or_runner(request):
    """The tiny Llama in this process and in an engine process of its own."""
    return request.getfixturevalue("llama_runner" if request.param == "in-process" else "llama_engine_process")


@pytest.fixture(params=["in-process", "engine-process"])
def idefics3_engine(request):
    """The idefics3 model both ways the app runs it: in the web server's process and in
    an engine process of its own."""
    name = "idefics3_runner" if request.param == "in-process" else "idefics3_engine_process"
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Image files a user might upload: two different pictures, a fake and a truncated PNG."""
    root = tmp_path_factory.mktemp("images")
    red = root / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(red)
    noise = root / "noise.png"
    Image.effect_noise((64, 48), 90).convert("RGB").save(noise)
    fake = root / "notes.png"
    fake.write_text("this is a text file with a .png name")
    truncated = root / "truncated.png"
    truncated.write_bytes(red.read_bytes()[:60])
    bomb = root / "bomb.png"  # 100 megapixels in a few kB: must be refused before decoding
    Image.new("1", (10_000, 10_000)).save(bomb, optimize=True)
    wide = root / "wide.png"  # valid but larger than MAX_IMAGE_SIDE: downscaled
    Image.new("RGB", (3000, 300), (20, 120, 220)).save(wide)
    return {"red": red, "noise": noise, "fake": fake, "truncated": truncated, "bomb": bomb, "wide": wide}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def break_forward(monkeypatch, model, error: BaseException, on_call: int | None = None):
    """Make model.forward raise `error` on every call, or only on call number `on_call` (a
    kernel failing mid-answer, an out-of-memory). Returns the real forward."""
    real_forward, calls = model.forward, itertools.count(1)

    @functools.wraps(real_forward)  # generate() inspects the forward signature
    def forward(*args, **kwargs):
        if next(calls) == on_call or on_call is None:
            raise error
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return real_forward


def hold_generation(patch, model, after_calls: int = 3):
    """Make the model's forward wait after `after_calls` calls until the returned event is
    set: an answer that has begun and lasts as long as a test needs (max. 60 s)."""
    real_forward, release, calls = model.forward, threading.Event(), itertools.count(1)

    @functools.wraps(real_forward)
    def forward(*args, **kwargs):
        if next(calls) > after_calls:
            release.wait(60)
        return real_forward(*args, **kwargs)

    patch.setattr(model, "forward", forward)
    return release


def slow_generation(patch, model, seconds_per_token: float = 0.01):
    """Make each forward of the model take at least `seconds_per_token`: an answer that
    streams at a pace a browser can watch, however fast the machine (or loaded the CI)."""
    real_forward = model.forward

    @functools.wraps(real_forward)
    def forward(*args, **kwargs):
        time.sleep(seconds_per_token)
        return real_forward(*args, **kwargs)

    patch.setattr(model, "forward", forward)


def wait_for(condition, timeout: float = 30, what: str = "a condition", interval: float = 0.02):
    """Poll `condition` until it returns something true (returned) or fail the test after
    `timeout` seconds: a test waits on what it needs, never on a fixed sleep, never forever."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value


def wait_until_loaded(port: int, process, timeout: float = 90) -> bool:
    """Poll a launched `app.py`'s /healthz until the model is loaded (False: it never was,
    or the process ended)."""
    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json().get("loaded"):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    return False


class StreamSpy:
    """Wraps runner.stream to keep every TextStream the app starts (to check what the
    model was really asked for, and that Stop really stopped it)."""

    def __init__(self, runner):
        self.runner, self.original, self.streams, self.calls = runner, runner.stream, [], []

    def __call__(self, messages, settings=None, **options):
        self.calls.append((messages, settings))
        stream = self.original(messages, settings, **options)
        self.streams.append(stream)
        return stream


@pytest.fixture
def serve(monkeypatch):
    """serve(runner, **serve_options) → (url, spy): the app (UI, /v1, /metrics) on a free
    loopback port, closed after the test."""
    import app

    demos = []

    def start(runner, **options):
        options.setdefault("data_dir", tempfile.mkdtemp(prefix="chats-"))  # each test's own saved chats
        spy = StreamSpy(runner)
        monkeypatch.setattr(runner, "stream", spy)
        demo, url = app.serve(runner, host="127.0.0.1", port=free_port(), block=False, quiet=True,
                              **options)
        demos.append(demo)
        spy.chats = demo.chats  # the chat's events and its store
        return url, spy

    yield start
    for demo in demos:
        demo.close()
