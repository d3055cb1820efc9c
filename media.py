"""Audio and video for the model (PyAV, which ships its own FFmpeg; no torch, no Gradio): sound
decoded to mono float samples at the rate a model wants, and a video as a few RGB frames spread
evenly over it, each with its time stamp; read within limits, every bad file one clear line.
What a file is comes from its content (the streams in its container), never its name.

    media_kind(data)                        # "audio" | "video" | None (not a file PyAV opens)
    audio = read_audio(data, "memo.m4a")    # MediaError: one line for the user
    audio.samples, audio.sampling_rate      # float32 mono in [-1, 1], 16000 unless asked
    video = read_video("/tmp/clip.mp4", "clip.mp4", frames=8)
    for seconds, image in video.frames:     # PIL RGB images, the longest side <= 1024
        label = f"[clip.mp4 at {timestamp(seconds)}]"    # "0:07", "1:02:03"
"""

from __future__ import annotations

import io
import itertools
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAX_MEDIA_BYTES = 100 * 1024 * 1024   # a larger audio/video file is refused before it is decoded
MAX_AUDIO_SECONDS = 10 * 60           # longer audio is refused (say the length and the limit)
MAX_VIDEO_SECONDS = 30 * 60
MAX_VIDEO_FRAMES = 32                 # the most frames any request may ask for
MAX_FRAME_SIDE = 8192                 # a video whose pictures are larger is refused
MAX_FRAME_PIXELS = 40_000_000
MAX_DECODED_FRAMES = 100_000          # one video request decodes no more (a crafted file can hold millions)
MAX_DECODE_SECONDS = 30               # a video (or audio) whose decoding takes longer is refused
SEEK_AFTER_SECONDS = 5.0              # a frame further ahead than this (or than keyframes are apart) is sought
AUDIO_SUFFIXES = (".wav", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".flac", ".aac")  # the upload box's
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv")
# The demuxers FFmpeg may use: only what the upload box offers. (Its playlist and concat demuxers,
# which open other files or URLs named inside the upload, are kept out.)
_FORMATS = "wav,mp3,ogg,mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,flac,aac"
_NAMES = {"audio": "an audio file this app reads (WAV, MP3, OGG/Opus, M4A, WebM, FLAC or AAC)",
          "video": "a video this app reads (MP4, WebM, MOV or MKV)"}
_ERRORS = (OSError, ValueError, EOFError, RuntimeError, MemoryError)   # and av.FFmpegError


def _av():
    """PyAV, imported with the first file opened: it loads FFmpeg's libraries (a 36 MB wheel), which
    an engine that never meets audio or video (a benchmark on a GPU machine, say) goes without."""
    import av
    return av


class MediaError(ValueError):
    """An audio or video file this app can't read: one line saying why, for the chat or a 400.
    `lasting` False: a time or memory limit, or the system, refused it (another try may read it)."""

    def __init__(self, message: str, *, lasting: bool = True):
        super().__init__(message)
        self.lasting = lasting


@dataclass
class Audio:
    name: str
    samples: np.ndarray   # float32, mono, in [-1, 1]
    sampling_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate


@dataclass
class Video:
    name: str
    frames: list[tuple[float, Image.Image]]   # (time stamp in seconds, RGB frame), evenly spread
    duration: float                           # seconds
    fps: float | None


def timestamp(seconds: float) -> str:
    """A time as a player shows it: "0:07", "12:30", "1:02:03"."""
    whole = int(max(0.0, seconds))
    hours, minutes, rest = whole // 3600, whole // 60 % 60, whole % 60
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


def media_kind(source) -> str | None:
    """"video" for a file with a picture stream (sound or not), "audio" for one with only sound,
    None for what PyAV can't open. source: bytes or a path."""
    try:
        with _opened(source, "The file", "audio", check_size=False) as container:
            return "video" if _pictures(container) else "audio" if container.streams.audio else None
    except MediaError:
        return None


def read_audio(source, name: str, sampling_rate: int = 16000) -> Audio:
    """The sound of an audio file (or of a video's sound track), mono at `sampling_rate`."""
    with _opened(source, name, "audio") as container:
        if not container.streams.audio:
            raise MediaError(f"{name} is a video without sound: it has no audio to listen to."
                             if _pictures(container) else f"{name} has no audio in it.")
        stream = _decodable(container.streams.audio[0], name, "sound")
        _check_length(name, _duration(container, stream), MAX_AUDIO_SECONDS)
        resampler = _av().AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        most = (MAX_AUDIO_SECONDS + 1) * sampling_rate   # (a second for encoders' padding)
        chunks, total, deadline = [], 0, time.monotonic() + MAX_DECODE_SECONDS
        for frame in itertools.chain(container.decode(stream), [None]):   # None: the resampler's rest
            if time.monotonic() > deadline:
                raise MediaError(f"{name} takes too long to decode (over {MAX_DECODE_SECONDS} s).",
                                 lasting=False)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
                total += chunks[-1].size
            if total > most:   # the header said less (or nothing): stop decoding here
                raise MediaError(f"{name} runs past {timestamp(MAX_AUDIO_SECONDS)}, the most this app takes.")
    if not total:
        raise MediaError(f"{name} holds no sound this app can decode (empty or damaged).")
    return Audio(name, np.clip(np.concatenate(chunks), -1.0, 1.0), sampling_rate)


def read_video(source, name: str, frames: int = 8, max_side: int = 1024) -> Video:
    """`frames` frames (1 to MAX_VIDEO_FRAMES) at the middles of as many equal slices of the video,
    each RGB with its longest side at most `max_side`; a shorter video gives all it has."""
    count = min(max(int(frames), 1), MAX_VIDEO_FRAMES)
    with _opened(source, name, "video") as container:
        stream = _video_stream(container, name)
        duration = _duration(container, stream)
        if duration is None:   # (e.g. a WebM recorded in a browser): from the packets' time stamps
            duration = _packets_end(container, stream, name)
        _check_length(name, duration, MAX_VIDEO_SECONDS)
        fps = float(stream.average_rate) if stream.average_rate else None
    targets = [(i + 0.5) * duration / count for i in range(count)]
    with _opened(source, name, "video") as container:
        picked = _sample(container, _video_stream(container, name), targets, name, max_side)
    if not picked:
        raise MediaError(f"{name} holds no pictures this app can decode (empty or damaged).")
    return Video(name, picked, duration, fps)


@contextmanager
def _opened(source, name: str, kind: str, check_size: bool = True):
    """The container, opened from bytes or a path; every failure inside it becomes one MediaError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        size, file = memoryview(source).nbytes, io.BytesIO(source)
    else:
        file = os.fspath(source)
        try:
            size = os.path.getsize(file)
        except OSError as error:
            raise MediaError(f"{name} can't be read ({error.strerror or type(error).__name__}).",
                             lasting=isinstance(error, FileNotFoundError)) from None
    if not size:
        raise MediaError(f"{name} is empty.")
    if check_size and size > MAX_MEDIA_BYTES:
        raise MediaError(f"{name} is {_size(size)}; the most this app takes is {_size(MAX_MEDIA_BYTES)}.")
    opened, av = False, _av()
    try:
        with av.open(file, container_options={"format_whitelist": _FORMATS, "protocol_whitelist": "file"},
                     metadata_errors="replace") as container:
            opened = True
            yield container
    except MediaError:
        raise
    except (av.FFmpegError, *_ERRORS) as error:
        if not opened:
            if isinstance(error, MemoryError):
                raise MediaError(f"{name} can't be opened now (out of memory).", lasting=False) from None
            raise MediaError(f"{name} is not {_NAMES[kind]}.") from None
        reason = getattr(error, "strerror", None) or f"{type(error).__name__}: {str(error)[:100]}"
        raise MediaError(f"{name} is damaged ({reason}).", lasting=not isinstance(error, MemoryError)) from None


def _pictures(container) -> list:
    """The container's video streams, less cover pictures (an MP3's album art is not a video)."""
    return [s for s in container.streams.video if not s.disposition & _av().stream.Disposition.attached_pic]


def _video_stream(container, name: str):
    streams = _pictures(container)
    if not streams:
        raise MediaError(f"{name} is audio, not a video: it has no pictures." if container.streams.audio
                         else f"{name} is not {_NAMES['video']}.")
    stream = _decodable(streams[0], name, "pictures")
    _check_picture(name, stream.codec_context.width, stream.codec_context.height)
    stream.thread_type = "AUTO"
    return stream


def _decodable(stream, name: str, what: str):
    if stream.codec_context is None:   # (PyAV 18 has no decoder for its codec)
        raise MediaError(f"{name} stores its {what} in a form this app can't decode (a rare codec, or damaged).")
    return stream


def _check_picture(name: str, width: int, height: int) -> None:
    if max(width, height) > MAX_FRAME_SIDE or width * height > MAX_FRAME_PIXELS:
        raise MediaError(f"{name} has {width}×{height} pictures; the most this app takes is {MAX_FRAME_SIDE} "
                         f"pixels a side and {MAX_FRAME_PIXELS // 1_000_000} megapixels.")


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / _av().time_base if container.duration and container.duration > 0 else None


def _check_length(name: str, seconds: float | None, most: int) -> None:
    if seconds is not None and seconds > most:
        raise MediaError(f"{name} is {timestamp(math.ceil(seconds))} long; the most this app takes is "
                         f"{timestamp(most)}.")


def _packets_end(container, stream, name: str) -> float:
    """The video's length from its packets (demuxed, not decoded: quick), for a header that doesn't say."""
    start, end = _start(stream), 0.0
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * stream.time_base) - start)
            if end > MAX_VIDEO_SECONDS + 1:
                raise MediaError(f"{name} runs past {timestamp(MAX_VIDEO_SECONDS)}, the most this app takes.")
    return end


def _start(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _sample(container, stream, targets: list[float], name: str, max_side: int) -> list:
    """(time, image): for each target time the frame nearest it, each frame once (a video with
    fewer frames than targets gives them all). Seeks to a target that is far ahead, farther than
    keyframes are apart (when a seek lands behind where decoding already was, they are at least
    that far apart), so that no stretch of the video is decoded over and over; decodes on where
    the format can't seek."""
    start, picked, decoded, deadline = _start(stream), [], itertools.count(1), time.monotonic() + MAX_DECODE_SECONDS
    frames, seek, gap = None, True, SEEK_AFTER_SECONDS
    before = current = None   # (time, frame): the frames either side of a target
    for target in targets:
        if current is None or current[0] < target:
            landed = seek and (current is None or target - current[0] > gap)
            if landed:
                try:
                    container.seek(int((start + target) / stream.time_base), stream=stream)
                    frames = None
                except _av().FFmpegError:
                    seek = landed = False
            frames = container.decode(stream) if frames is None else frames
            for frame in frames:
                if next(decoded) > MAX_DECODED_FRAMES:
                    raise MediaError(f"{name} has more pictures than this app decodes ({MAX_DECODED_FRAMES:,}).")
                if time.monotonic() > deadline:
                    raise MediaError(f"{name} takes too long to decode (over {MAX_DECODE_SECONDS} s): send a shorter "
                                     f"or smaller video.", lasting=False)
                if frame.time is None:
                    continue
                _check_picture(name, frame.width, frame.height)
                t = max(0.0, frame.time - start)
                if t > MAX_VIDEO_SECONDS + 1:
                    raise MediaError(f"{name} runs past {timestamp(MAX_VIDEO_SECONDS)}, the most this app takes.")
                if landed and current is not None and t < current[0]:
                    gap = max(gap, target - t)   # keyframes are far apart: seek less
                landed, before, current = False, current, (t, frame)
                if t >= target:
                    break
        fresh = [c for c in (before, current) if c is not None and (not picked or c[0] > picked[-1][0])]
        if fresh:
            t, frame = min(fresh, key=lambda c: abs(c[0] - target))
            picked.append((t, _image(frame, max_side)))
    return picked


def _image(frame, max_side: int) -> Image.Image:
    scale = min(1.0, max_side / max(frame.width, frame.height))
    width, height = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
    return frame.to_image(width=width, height=height).convert("RGB")


def _size(count: int) -> str:
    megabytes = count / 2**20
    if megabytes >= 1:
        return f"{megabytes:.0f} MB" if megabytes >= 10 else f"{megabytes:.1f} MB"
    return f"{math.ceil(count / 1024)} KB"
