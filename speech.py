"""Speech to text (``--asr-model ID``): a transformers "automatic-speech-recognition" pipeline
(Whisper, and the other seq2seq / CTC speech models it takes) behind one small class.

    transcriber = Transcriber.load("openai/whisper-small", device="cuda")
    text = transcriber.transcribe(samples, sampling_rate)   # float32 mono numpy array

In the app, `Speech` holds the transcriber: loaded in the background when the app starts,
awaited by the chat and /v1 (`await speech.transcribe(part)`: an audio part → its text).

The caller decodes the audio (PyAV, in media.py); this module never reads files and never
calls ffmpeg: the pipeline gets ``{"raw": samples, "sampling_rate": sr}`` at the model's own
sampling rate (audio at any other rate is resampled here first, since the pipeline would need
torchaudio for that). Long audio is transcribed in 30 s chunks (``chunk_length_s=30``), each
with a bounded number of new tokens, greedy. One transcription runs at a time (a lock).
Failures are SpeechError, whose message is one line for the user.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading

import anyio
import numpy as np

import attachments
from engine_contract import ChatInputError, first_line

log = logging.getLogger("speech")
REMEMBERED_TRANSCRIPTS = 64  # a stateless /v1 client sends the same audio again with every turn

CHUNK_SECONDS = 30  # Whisper's window; the pipeline overlaps chunks by CHUNK_SECONDS / 6 each side
DEFAULT_MAX_NEW_TOKENS = 224  # per chunk: ~2x what 30 s of fast speech needs; Whisper allows 448 in all


class SpeechError(ChatInputError, ValueError):
    """Speech recognition can't be done; the message is one line for the user."""


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 audio from one sampling rate to another: with PyAV's resampler
    (libswresample) when PyAV is installed, else by linear interpolation."""
    if from_rate == to_rate or samples.size == 0:
        return samples
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        try:
            return _resample_av(av, samples, from_rate, to_rate)
        except Exception:  # an odd rate or PyAV build: fall back rather than fail
            pass
    n_out = max(1, int(round(samples.size * to_rate / from_rate)))
    positions = np.arange(n_out, dtype=np.float64) * (from_rate / to_rate)
    return np.interp(positions, np.arange(samples.size), samples).astype(np.float32)


def _resample_av(av, samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
    pieces = []
    step = 1 << 16  # samples per frame
    for start in range(0, samples.size, step):
        block = np.ascontiguousarray(samples[start:start + step], dtype=np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(block, format="flt", layout="mono")
        frame.sample_rate = from_rate
        frame.pts = start
        pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
    return np.concatenate(pieces).astype(np.float32, copy=False) if pieces else samples[:0]


def speech_recognition_model_types() -> set[str]:
    """The config model types the ASR pipeline runs: speech seq2seq (Whisper, Moonshine, ...),
    CTC (wav2vec2, ...) and transducers (Parakeet)."""
    from transformers.models.auto import modeling_auto
    names = ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES",
             "MODEL_FOR_TDT_MAPPING_NAMES", "MODEL_FOR_RNNT_MAPPING_NAMES")
    return {model_type for name in names for model_type in getattr(modeling_auto, name, {})}


class Transcriber:
    """A loaded speech recognition model. Thread-safe: one transcription at a time."""

    def __init__(self, pipe, name: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.pipe = pipe
        self.name = name
        self.sampling_rate: int = int(pipe.feature_extractor.sampling_rate)
        model = pipe.model
        # Encoder-decoders write tokens (bounded here); CTC and transducers label audio frames.
        self.generates = getattr(pipe, "type", None) in ("seq2seq", "seq2seq_whisper")
        limit = getattr(model.config, "max_target_positions", None)  # Whisper: 448, prompt included
        if limit:
            max_new_tokens = min(max_new_tokens, int(limit) - 8)
        self.max_new_tokens = max(1, int(max_new_tokens))
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_id_or_path: str, device: str = "cpu", *,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> "Transcriber":
        """Hub id or local directory of a speech recognition model → Transcriber.
        device: "cpu", "cuda", "cuda:1", "mps" or "auto". Raises SpeechError (one line)."""
        if not model_id_or_path or not str(model_id_or_path).strip():
            raise SpeechError("No speech recognition model given (--asr-model).")
        where = str(model_id_or_path)
        if (os.path.isabs(where) or where.startswith((".", "~"))) and not os.path.isdir(os.path.expanduser(where)):
            raise SpeechError(f"Can't load the speech recognition model {model_id_or_path!r}: no such directory.")
        try:
            from transformers import AutoConfig
            model_type = AutoConfig.from_pretrained(os.path.expanduser(where)).model_type
        except Exception as error:
            raise SpeechError(f"Can't load the speech recognition model {model_id_or_path!r}: "
                              f"{first_line(error)}") from None
        # Checked first: the pipeline itself loads any model (falling back on the config's
        # architecture) and only fails on the first transcription.
        if model_type not in speech_recognition_model_types():
            raise SpeechError(f"{model_id_or_path!r} is not a speech recognition model (its type is "
                              f"{model_type!r}); --asr-model takes one like openai/whisper-small.")
        try:
            from model_runner import pick_device  # (the chat model's rule: cuda > mps > cpu; one asked for must exist)
            device = pick_device(device or "auto")
            import torch
            from transformers import pipeline
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
            pipe = pipeline("automatic-speech-recognition", model=os.path.expanduser(where), device=device, dtype=dtype)
        except Exception as error:
            raise SpeechError(f"Can't load the speech recognition model {model_id_or_path!r}: "
                              f"{first_line(error)}") from None
        if getattr(pipe, "feature_extractor", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise SpeechError(f"{model_id_or_path!r} has no feature extractor or tokenizer, so it can't "
                              f"transcribe speech.")
        return cls(pipe, str(model_id_or_path), max_new_tokens=max_new_tokens)

    def _prepare(self, samples, sampling_rate) -> np.ndarray:
        try:
            rate = int(sampling_rate)
        except (TypeError, ValueError):
            rate = 0
        if rate <= 0 or rate != sampling_rate:
            raise SpeechError(f"The sampling rate must be a positive whole number of Hz, not {sampling_rate!r}.")
        try:
            audio = np.asarray(samples, dtype=np.float32)
        except (TypeError, ValueError):
            raise SpeechError("The audio must be an array of samples.") from None
        if audio.ndim == 2 and min(audio.shape) > 0:  # (channels, n) or (n, channels): downmix
            audio = audio.mean(axis=int(np.argmin(audio.shape)))
        if audio.ndim != 1:
            raise SpeechError(f"The audio must be mono samples (1-D), not an array of shape {audio.shape}.")
        if audio.size == 0:
            raise SpeechError("The audio is empty: there is nothing to transcribe.")
        if not np.isfinite(audio).all():
            audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
        audio = resample(audio, rate, self.sampling_rate)
        return np.ascontiguousarray(audio, dtype=np.float32)

    def transcribe(self, samples: np.ndarray, sampling_rate: int) -> str:
        """Mono samples (float, -1..1) at `sampling_rate` Hz → the text, stripped. Audio longer
        than 30 s goes in 30 s chunks. Raises SpeechError (one line)."""
        audio = self._prepare(samples, sampling_rate)
        kwargs = {"chunk_length_s": CHUNK_SECONDS, "ignore_warning": True}
        if self.generates:
            # max_length, not max_new_tokens: Whisper's generation config sets max_length
            # (448), and with both set transformers warns on every chunk. For Whisper and the
            # other encoder-decoders it bounds the new tokens the same way.
            kwargs.update(max_length=self.max_new_tokens, num_beams=1, do_sample=False)
        with self._lock:
            try:
                result = self.pipe({"raw": audio, "sampling_rate": self.sampling_rate}, **kwargs)
            except Exception as error:
                raise SpeechError(f"Transcription failed: {first_line(error)}") from None
        text = result.get("text", "") if isinstance(result, dict) else str(result)
        return str(text).strip()


class Speech:
    """--asr-model in the web server: the transcriber loads in the background (the chat comes
    up at once; a transcription waits for it), and an audio part becomes its text, remembered
    by the audio's content. Failures are SpeechError (a ChatInputError: one line)."""

    def __init__(self, model: str, device: str = "auto"):
        self.model, self.device = model, device
        self._loaded: concurrent.futures.Future = concurrent.futures.Future()
        self._transcripts: dict = {}

    @classmethod
    def start(cls, model: str, device: str = "auto") -> "Speech":
        speech = cls(model, device)
        threading.Thread(target=speech._load, name="asr-load", daemon=True).start()
        return speech

    def _load(self) -> None:
        try:
            transcriber = Transcriber.load(self.model, self.device)
        except BaseException as error:  # (whatever it is, a transcription waiting for it must hear of it)
            if not isinstance(error, SpeechError):
                error = SpeechError(f"Can't load the speech recognition model {self.model!r}: {first_line(error)}")
            log.error("--asr-model: %s Audio sent to a model that can't listen will be refused.", error)
            self._loaded.set_exception(error)
            return
        log.info("Speech recognition: %s (%s)", self.model, transcriber.pipe.device)
        self._loaded.set_result(transcriber)

    async def written_out(self, message: dict, info, leave_out_failures: bool = False) -> dict:
        """A message whose audio a model that can't listen needs written out
        (attachments.needs_transcript; `info`: the runner's RunnerInfo), each such part then
        carrying its "transcript"; the message itself when none does. A failure raises its
        SpeechError (a ChatInputError), or with `leave_out_failures` leaves that audio out."""
        needing = attachments.needs_transcript(message, info) if message["role"] == "user" else []
        if not needing:
            return message
        content = []
        for part in message["content"]:
            if any(part is other for other in needing):
                try:
                    part = {**part, "transcript": await self.transcribe(part, again=not leave_out_failures)}
                except ChatInputError as error:
                    if not leave_out_failures:
                        error.part = part  # (the API names it)
                        raise
                    continue
            content.append(part)
        return {**message, "content": content}

    async def transcribe(self, part: dict, again: bool = True) -> str:
        """An audio part's words. SpeechError when there are none, or the model can't run.
        `again`: a read refused by a time or memory limit is tried again (attachments)."""
        transcriber = await asyncio.wrap_future(self._loaded)
        key = await anyio.to_thread.run_sync(attachments.identity, part["audio"])  # (hashing 100 MB takes a while)
        if key in self._transcripts:
            return self._transcripts[key]

        def heard() -> str:
            audio = attachments.audio_of(part, transcriber.sampling_rate, again)
            return transcriber.transcribe(audio.samples, audio.sampling_rate)

        text = await anyio.to_thread.run_sync(heard)
        if not text:
            raise SpeechError(f"No speech was heard in {part.get('name') or 'the audio'}.")
        if len(self._transcripts) >= REMEMBERED_TRANSCRIPTS:
            self._transcripts.pop(next(iter(self._transcripts)))
        self._transcripts[key] = text
        return text
