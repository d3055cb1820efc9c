"""What attachments cost before the model sees them (issue 23): reading a document at the
limits, cutting it to fit a context, decoding audio and sampling a video's frames. Prints one
line per figure as it is measured.

    python bench/attachments.py            # ~1 min on 2 CPU cores
"""

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attachments  # noqa: E402
import documents  # noqa: E402
import media  # noqa: E402
from tests.test_documents import pdf_with_text  # noqa: E402
from tests.test_media import audio_file, video_file  # noqa: E402


def timed(what: str, run, repeat: int = 1):
    started = time.perf_counter()
    for _ in range(repeat):
        result = run()
    print(f"{what}: {(time.perf_counter() - started) / repeat * 1000:.0f} ms", flush=True)
    return result


def main() -> None:
    pdf = pdf_with_text(*[f"Page {i}: the quarterly figures and what the committee decided about them." * 8
                          for i in range(documents.MAX_PDF_PAGES)])
    document = timed(f"a {documents.MAX_PDF_PAGES}-page PDF read ({len(pdf) / 2**20:.1f} MB)",
                     lambda: documents.read_document(pdf, "report.pdf"))
    print(f"  its text: {len(document.text):,} characters", flush=True)

    from tests.tiny_models import build_llama
    from model_runner import ModelRunner
    with tempfile.TemporaryDirectory() as folder:
        runner = ModelRunner.load(str(build_llama(Path(folder) / "llama")), device="cpu")
        (Path(folder) / "report.pdf").write_bytes(pdf)
        part = attachments.attachment_part(Path(folder) / "report.pdf")
        message = [{"role": "user", "content": [part, {"type": "text", "text": "Summarise"}]}]
        timed(f"the same PDF as a prompt, cut to the tiny model's {runner.context_length}-token context "
              f"(read remembered)", lambda: runner.build_inputs(message, reserve_tokens=128), repeat=3)
        runner.close()

    for seconds in (30, media.MAX_AUDIO_SECONDS):
        data = audio_file(".mp3", seconds=float(seconds), hertz=(440.0,))
        audio = timed(f"{seconds} s of MP3 ({len(data) / 2**20:.1f} MB) decoded to 16 kHz mono",
                      lambda: media.read_audio(data, "talk.mp3"))
        print(f"  {audio.seconds:.0f} s, {audio.samples.nbytes / 2**20:.1f} MB of samples", flush=True)

    for seconds in (10, 120):
        data = video_file("clip.mp4", seconds=float(seconds), fps=25, size=(640, 360))
        timed(f"{seconds} s of 640x360 H.264 ({len(data) / 2**20:.1f} MB): 8 frames sampled",
              lambda: media.read_video(data, "clip.mp4", frames=8))


if __name__ == "__main__":
    main()
