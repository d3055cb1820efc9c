"""media.py: audio decoded to mono samples at the model's rate and videos as a few frames spread
evenly over them, read within limits, and every bad file one clear line (MediaError). The test
media are made here with PyAV itself: tiny (64x48 px, a few seconds)."""

import functools
import io

import av
import numpy as np
import pytest
from PIL import Image

import media
from media import MediaError, media_kind, read_audio, read_video, timestamp

AUDIO = {   # name: (PyAV's muxer, encoder, sample rate)
    "memo.wav": ("wav", "pcm_s16le", 44100),
    "memo.mp3": ("mp3", "libmp3lame", 44100),
    "memo.ogg": ("ogg", "libopus", 48000),
    "vorbis.ogg": ("ogg", "vorbis", 44100),   # (FFmpeg's own Vorbis encoder: "experimental")
    "memo.m4a": ("ipod", "aac", 44100),
    "memo.webm": ("webm", "libopus", 48000),
    "memo.flac": ("flac", "flac", 44100),
    "memo.aac": ("adts", "aac", 44100),
}
VIDEO = {   # name: (muxer, encoder)
    "clip.mp4": ("mp4", "libx264"),
    "old.mp4": ("mp4", "mpeg4"),
    "clip.webm": ("webm", "libvpx"),
    "vp9.webm": ("webm", "libvpx-vp9"),
    "clip.mov": ("mov", "mpeg4"),
    "clip.mkv": ("matroska", "libx264"),
}


def format_of(table: dict, name: str) -> tuple:
    """The entry for a name (e.g. "vorbis.ogg"), else the first for its suffix ("x.ogg" or ".ogg")."""
    suffix = "." + name.rsplit(".", 1)[-1]
    return table[name] if name in table else next(v for k, v in table.items() if k.endswith(suffix))


def tone(seconds: float, rate: int, *hertz: float) -> np.ndarray:
    """int16 samples, one channel per frequency: (channels, samples)."""
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([(0.5 * np.sin(2 * np.pi * f * t) * 32767).astype(np.int16) for f in hertz])


@functools.lru_cache(maxsize=None)
def audio_file(name: str, seconds: float = 2.0, hertz: tuple = (440.0, 440.0)) -> bytes:
    """A sine (one frequency a channel: stereo by default) in the format AUDIO gives the name."""
    muxer, encoder, rate = format_of(AUDIO, name)
    layout = "stereo" if len(hertz) == 2 else "mono"
    out = io.BytesIO()
    with av.open(out, "w", format=muxer) as container:
        stream = container.add_stream(encoder, rate=rate, layout=layout, options={"strict": "experimental"})
        frame = av.AudioFrame.from_ndarray(tone(seconds, rate, *hertz).T.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def video_file(name: str, seconds: float = 2.0, fps: int = 10, size: tuple = (64, 48), sound: bool = False) -> bytes:
    """Grey frames that brighten over time (level 20 at 0 s to 220 at `seconds`), so a frame's time
    shows in its colour; with a 440 Hz mono sound track if asked."""
    muxer, encoder = format_of(VIDEO, name)
    out = io.BytesIO()
    with av.open(out, "w", format=muxer) as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        track = container.add_stream("aac", rate=44100, layout="mono") if sound else None
        for i in range(int(seconds * fps)):
            picture = np.full((size[1], size[0], 3), level(i / fps, seconds), np.uint8)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        packets = list(stream.encode(None))
        if track:
            frame = av.AudioFrame.from_ndarray(tone(seconds, 44100, 440.0), format="s16", layout="mono")
            frame.sample_rate = 44100
            packets += [*track.encode(frame), *track.encode(None)]
        for packet in packets:
            container.mux(packet)
    return out.getvalue()


def level(t: float, seconds: float) -> int:
    return round(20 + 200 * t / seconds)


def dominant_hertz(audio) -> float:
    spectrum = np.abs(np.fft.rfft(audio.samples))
    return np.argmax(spectrum) * audio.sampling_rate / len(audio.samples)


# Audio

@pytest.mark.parametrize("name", AUDIO)
def test_each_audio_format_becomes_mono_16_khz_of_the_right_length_and_pitch(name):
    data = audio_file(name)
    assert media_kind(data) == "audio"
    audio = read_audio(data, name)
    assert audio.name == name and audio.sampling_rate == 16000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.seconds == pytest.approx(2.0, rel=0.04)
    assert dominant_hertz(audio) == pytest.approx(440, abs=5)
    assert 0.2 < np.abs(audio.samples).max() <= 1.0


def test_both_channels_of_a_stereo_file_are_heard_in_the_mono_samples():
    audio = read_audio(audio_file("memo.wav", hertz=(440.0, 1000.0)), "two.wav")
    spectrum = np.abs(np.fft.rfft(audio.samples))
    strength = {hz: spectrum[round(hz * len(audio.samples) / 16000)] for hz in (440, 1000, 700)}
    assert strength[440] > 20 * strength[700] and strength[1000] > 20 * strength[700]


def test_the_rate_a_model_asks_for_and_a_path_instead_of_bytes(tmp_path):
    path = tmp_path / "upload.bin"   # (what it is comes from its content, not its name)
    path.write_bytes(audio_file("memo.mp3"))
    assert media_kind(path) == media_kind(str(path)) == "audio"
    audio = read_audio(path, "memo.mp3", sampling_rate=24000)
    assert audio.sampling_rate == 24000 and len(audio.samples) == pytest.approx(48000, rel=0.04)
    assert dominant_hertz(read_audio(str(path), "memo.mp3")) == pytest.approx(440, abs=5)


def test_an_mp3_with_cover_art_is_audio_not_a_video():
    out, cover = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(cover, "PNG")
    with av.open(out, "w", format="mp3") as container:
        sound = container.add_stream("libmp3lame", rate=44100, layout="mono")
        art = container.add_stream("png", rate=1)
        art.width, art.height, art.pix_fmt = 16, 16, "rgb24"
        art.disposition = av.stream.Disposition.attached_pic
        packet = av.Packet(cover.getvalue())
        packet.stream, packet.pts, packet.dts = art, 0, 0
        container.mux(packet)
        frame = av.AudioFrame.from_ndarray(tone(1.0, 44100, 440.0), format="s16", layout="mono")
        frame.sample_rate = 44100
        for packet in [*sound.encode(frame), *sound.encode(None)]:
            container.mux(packet)
    data = out.getvalue()
    assert media_kind(data) == "audio"
    assert read_audio(data, "song.mp3").seconds == pytest.approx(1.0, rel=0.05)
    with pytest.raises(MediaError, match=r"^song\.mp3 is audio, not a video"):
        read_video(data, "song.mp3")


def test_the_sound_of_a_video_is_read_and_a_silent_video_is_refused_as_audio():
    assert media_kind(video_file("clip.mov", sound=True)) == "video"
    audio = read_audio(video_file("clip.mov", sound=True), "talk.mov")
    assert audio.seconds == pytest.approx(2.0, rel=0.04) and dominant_hertz(audio) == pytest.approx(440, abs=5)
    with pytest.raises(MediaError, match=r"^clip\.mp4 is a video without sound"):
        read_audio(video_file("clip.mp4"), "clip.mp4")


def test_audio_longer_than_the_limit_is_refused_with_its_length_and_the_limit(monkeypatch):
    monkeypatch.setattr(media, "MAX_AUDIO_SECONDS", 1)
    with pytest.raises(MediaError, match=r"^long\.mp3 is 0:03 long; the most this app takes is 0:01\.$"):
        read_audio(audio_file("memo.mp3", seconds=2.5), "long.mp3")


def test_a_header_that_hides_the_length_does_not_get_the_whole_file_decoded(monkeypatch):
    """A header that says nothing of the length (or lies about it): decoding stops once it passes
    the limit."""
    data = audio_file("memo.aac", seconds=3.0)
    monkeypatch.setattr(media, "_duration", lambda container, stream: None)
    monkeypatch.setattr(media, "MAX_AUDIO_SECONDS", 1)
    with pytest.raises(MediaError, match=r"^raw\.aac runs past 0:01, the most this app takes\.$"):
        read_audio(data, "raw.aac")


# Video

@pytest.mark.parametrize("name", VIDEO)
def test_each_video_format_gives_eight_frames_spread_over_it_in_order(name):
    data = video_file(name)
    assert media_kind(data) == "video"
    video = read_video(data, name)
    assert video.name == name and video.duration == pytest.approx(2.0, abs=0.1)
    assert video.fps == pytest.approx(10)
    times = [t for t, _ in video.frames]
    assert len(times) == 8 and times == sorted(set(times)) and 0 <= times[0] and times[-1] <= video.duration
    assert times[0] < 0.3 and times[-1] > 1.7   # spread over the whole clip
    for t, image in video.frames:
        assert image.mode == "RGB" and image.size == (64, 48)
        assert np.asarray(image).mean() == pytest.approx(level(t, 2.0), abs=12)   # the frame shown at t


def test_frames_are_downscaled_to_max_side_and_their_number_kept_within_limits():
    data = video_file("clip.mp4", size=(320, 240))
    video = read_video(data, "big.mp4", frames=3, max_side=100)
    assert [image.size for _, image in video.frames] == [(100, 75)] * 3
    assert len(read_video(data, "big.mp4", frames=0).frames) == 1
    assert len(read_video(video_file("clip.mp4", seconds=5.0), "long.mp4", frames=1000).frames) == media.MAX_VIDEO_FRAMES


def test_a_video_with_fewer_frames_than_asked_gives_all_it_has():
    video = read_video(video_file("clip.mp4", seconds=0.5), "short.mp4", frames=8)
    assert [round(t, 2) for t, _ in video.frames] == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_frames_far_apart_in_a_longer_video_are_found_by_seeking():
    """12 s at 10 frames a second, 3 frames: each is sought (more than 5 s apart)."""
    video = read_video(video_file("clip.webm", seconds=12.0), "long.webm", frames=3)
    assert [round(t) for t, _ in video.frames] == [2, 6, 10]
    for t, image in video.frames:
        assert np.asarray(image).mean() == pytest.approx(level(t, 12.0), abs=12)


def test_a_video_longer_than_the_limit_or_with_huge_pictures_is_refused(monkeypatch):
    monkeypatch.setattr(media, "MAX_VIDEO_SECONDS", 1)
    with pytest.raises(MediaError, match=r"^long\.mp4 is 0:02 long; the most this app takes is 0:01\.$"):
        read_video(video_file("clip.mp4"), "long.mp4")
    monkeypatch.setattr(media, "MAX_FRAME_SIDE", 32)
    with pytest.raises(MediaError, match=r"^wide\.mp4 has 64×48 pictures; the most"):
        read_video(video_file("clip.mp4", seconds=0.5), "wide.mp4")


def test_an_audio_file_sent_as_a_video_is_refused_saying_it_is_audio():
    with pytest.raises(MediaError, match=r"^memo\.ogg is audio, not a video: it has no pictures\.$"):
        read_video(audio_file("memo.ogg"), "memo.ogg")


# Bad files

def test_bad_files_are_one_line_naming_the_file(tmp_path, monkeypatch):
    mp3, mp4 = audio_file("memo.mp3"), video_file("clip.mp4")
    text = tmp_path / "notes.mp3"
    text.write_text("Not a song: just some text that was given the wrong name.\n" * 20)
    cases = [
        (read_audio, b"", "empty.wav", r"^empty\.wav is empty\.$"),
        (read_video, b"", "empty.mp4", r"^empty\.mp4 is empty\.$"),
        (read_audio, np.random.default_rng(0).bytes(5000), "noise.wav", r"^noise\.wav is not an audio file this app"),
        (read_video, np.random.default_rng(1).bytes(5000), "noise.mp4", r"^noise\.mp4 is not a video this app reads"),
        (read_audio, mp3[:300], "cut.mp3", r"^cut\.mp3 is not an audio file"),
        (read_video, mp4[: len(mp4) // 2], "cut.mp4", r"^cut\.mp4 is not a video"),
        (read_audio, text, "notes.mp3", r"^notes\.mp3 is not an audio file this app reads \(WAV, MP3"),
        (read_audio, tmp_path / "gone.mp3", "gone.mp3", r"^gone\.mp3 can't be read"),
        # A list of other files to play (FFmpeg's concat format) opens nothing it names.
        (read_video, b"ffconcat version 1.0\nfile clip.mp4\n", "list.mp4", r"^list\.mp4 is not a video"),
    ]
    for read, source, name, message in cases:
        with pytest.raises(MediaError, match=message) as error:
            read(source, name)
        assert "\n" not in str(error.value)
        if isinstance(source, bytes):
            assert media_kind(source) is None
    assert media_kind(text) is None and media_kind(tmp_path / "gone.mp3") is None
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 10_000)
    with pytest.raises(MediaError, match=r"^big\.mp3 is \d+ KB; the most this app takes is 10 KB\.$"):
        read_audio(mp3, "big.mp3")
    path = tmp_path / "big.mp3"
    path.write_bytes(mp3)
    with pytest.raises(MediaError, match=r"^big\.mp3 is \d+ KB"):
        read_audio(path, "big.mp3")
    assert media_kind(mp3) == "audio"   # (what it is, whatever its size)


def test_a_truncated_mp3_gives_the_sound_it_holds():
    """An MP3 is a run of frames: cut in half, it is half the sound (no error, nothing made up)."""
    mp3 = audio_file("memo.mp3")
    audio = read_audio(mp3[: len(mp3) // 2], "cut.mp3")
    assert 0.8 < audio.seconds < 1.2


def test_damaged_data_inside_a_good_container_is_one_line():
    m4a = bytearray(audio_file("memo.m4a"))
    m4a[len(m4a) // 2:len(m4a) // 2 + 300] = np.random.default_rng(2).bytes(300)
    with pytest.raises(MediaError, match=r"^broken\.m4a is damaged \(Invalid data found when processing input\)\.$"):
        read_audio(bytes(m4a), "broken.m4a")
    assert media_kind(bytes(m4a)) == "audio"   # (its container is fine)


def test_timestamps_read_as_a_player_shows_them():
    assert [timestamp(s) for s in (0, 7.9, 62, 600, 3723)] == ["0:00", "0:07", "1:02", "10:00", "1:02:03"]
