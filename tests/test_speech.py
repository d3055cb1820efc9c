"""speech.py's Transcriber on the tiny random Whisper (tests/tiny_models.build_whisper): it
writes random text, the same for the same audio, up to its token limit per 30 s chunk."""

import threading
import time

import numpy as np
import pytest

from speech import SpeechError, Transcriber
from tests.tiny_models import build_audio_llm, build_whisper

RATE = 16_000


def sine(seconds: float, rate: int = RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def whisper_path(tmp_path_factory):
    return build_whisper(tmp_path_factory.mktemp("speech") / "whisper")


@pytest.fixture(scope="module")
def transcriber(whisper_path):
    return Transcriber.load(str(whisper_path), device="cpu", max_new_tokens=32)


class CountingGenerate:
    """Wraps the model's generate: counts the calls (one per 30 s chunk) and the new tokens."""

    def __init__(self, model):
        self.model, self.generate = model, model.generate
        self.calls, self.lengths = 0, []

    def __enter__(self):
        def generate(*args, **kwargs):
            self.calls += 1
            out = self.generate(*args, **kwargs)
            sequences = out["sequences"] if isinstance(out, dict) else out
            self.lengths.append(sequences.shape[-1])
            return out
        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate  # back to the class's method


def test_the_tiny_whisper_wants_16_khz(transcriber):
    assert transcriber.sampling_rate == RATE
    assert transcriber.max_new_tokens == 32


def test_a_short_clip_gives_the_same_non_empty_text_twice(transcriber):
    first = transcriber.transcribe(sine(2), RATE)
    assert first.strip()
    assert transcriber.transcribe(sine(2), RATE) == first
    assert "<|" not in first  # special tokens are left out


def test_a_long_clip_is_transcribed_in_30_second_chunks_in_bounded_time(transcriber):
    with CountingGenerate(transcriber.pipe.model) as spy:
        start = time.monotonic()
        text = transcriber.transcribe(sine(70), RATE)
        elapsed = time.monotonic() - start
    assert text.strip()
    # 30 s chunks overlapping by 5 s on each side: 0-30, 20-50, 40-70
    assert spy.calls == 3
    assert all(n <= transcriber.max_new_tokens for n in spy.lengths), spy.lengths
    assert elapsed < 20, elapsed


def test_the_default_token_limit_keeps_a_chunk_short(whisper_path):
    transcriber = Transcriber.load(str(whisper_path))  # default max_new_tokens, within Whisper's 448
    assert 0 < transcriber.max_new_tokens <= 448 - 8
    with CountingGenerate(transcriber.pipe.model) as spy:
        assert transcriber.transcribe(sine(1), RATE)
    assert spy.calls == 1 and spy.lengths[0] <= transcriber.max_new_tokens


def test_audio_at_another_rate_or_in_stereo_is_brought_to_the_models_rate(transcriber):
    assert transcriber._prepare(sine(2, rate=44_100), 44_100).shape == (2 * RATE,)
    assert transcriber._prepare(sine(1, rate=8_000), 8_000).shape == (RATE,)
    stereo = np.stack([sine(2), sine(2)])  # (channels, samples)
    assert transcriber._prepare(stereo, RATE).shape == (2 * RATE,)
    assert transcriber._prepare(stereo.T, RATE).shape == (2 * RATE,)  # (samples, channels)
    assert transcriber.transcribe(sine(2, rate=48_000), 48_000).strip()


@pytest.mark.parametrize("samples, rate, says", [
    (np.zeros(0, dtype=np.float32), RATE, "empty"),
    (np.zeros((2, 3, 4), dtype=np.float32), RATE, "mono"),
    (sine(1), 0, "sampling rate"),
    (sine(1), 16_000.5, "sampling rate"),
    ("not audio", RATE, "array"),
])
def test_wrong_input_is_a_one_line_speech_error(transcriber, samples, rate, says):
    with pytest.raises(SpeechError) as error:
        transcriber.transcribe(samples, rate)
    assert says in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_a_missing_model_is_a_one_line_speech_error(tmp_path):
    with pytest.raises(SpeechError) as error:
        Transcriber.load(str(tmp_path / "no-such-model"))
    message = str(error.value)
    assert "no-such-model" in message and "no such directory" in message and "\n" not in message


def test_a_directory_without_a_model_is_a_one_line_speech_error(tmp_path):
    with pytest.raises(SpeechError) as error:
        Transcriber.load(str(tmp_path))
    assert "Can't load the speech recognition model" in str(error.value) and "\n" not in str(error.value)


def test_a_chat_model_is_not_a_speech_recognition_model(tmp_path):
    with pytest.raises(SpeechError) as error:  # Qwen2-Audio hears audio but isn't an ASR pipeline model
        Transcriber.load(str(build_audio_llm(tmp_path / "audio")))
    message = str(error.value)
    assert "not a speech recognition model" in message and "qwen2_audio" in message and "\n" not in message


def test_transcriptions_run_one_at_a_time(transcriber):
    pipe, running, overlaps = transcriber.pipe, [0], []

    class Watched:
        def __call__(self, *args, **kwargs):
            running[0] += 1
            overlaps.append(running[0])
            try:
                time.sleep(0.05)
                return pipe(*args, **kwargs)
            finally:
                running[0] -= 1

        def __getattr__(self, name):
            return getattr(pipe, name)

    transcriber.pipe = Watched()
    results = []
    try:
        threads = [threading.Thread(target=lambda: results.append(transcriber.transcribe(sine(2), RATE)))
                   for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        transcriber.pipe = pipe
    assert overlaps == [1, 1, 1]
    assert len(results) == 3 and len(set(results)) == 1


