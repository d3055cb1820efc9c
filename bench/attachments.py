"""What attachments cost before the model sees them (issue 23): reading a document at the
limits, cutting it to fit a context, decoding audio and sampling a video's frames; then what
reading a long PDF does to the answers around it (reader_process.py): one generating beside
it, one sent just after it. Prints one line per figure as it is measured.

    python bench/attachments.py            # ~2 min on 2 CPU cores
    python bench/attachments.py --beside   # only the answers around a read
    python bench/attachments.py --prompt   # only building a long PDF's prompt into bench-llama's context
"""

import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
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


def typeset_pdf(seed: int, pages: int = documents.MAX_PDF_PAGES) -> bytes:
    """A PDF whose pages hold 50 lines each, placed line by line (a fresh one per seed: read, not remembered)."""
    line = f"{seed}: the quarterly figures and what the committee decided"
    return pdf_with_text(*[f"Page {i}\n" + "\n".join([line] * 50) for i in range(pages)])


@contextmanager
def read_as_before():
    """Files read as before reader_process.py: on the generation loop, in the engine's process."""
    import model_runner
    import reader_process
    saved = model_runner.reads_files, reader_process.run
    model_runner.reads_files = lambda messages: False
    reader_process.run = lambda read, *arguments: read(*arguments)
    try:
        yield
    finally:
        model_runner.reads_files, reader_process.run = saved


def beside_an_answer(folder: Path) -> None:
    """With --batching on, an answer generating while another request's 500-page PDF is read:
    its tokens/s before and during the read. One at a time, a text question sent just after
    a PDF's request: how long until its answer starts."""
    from tests.tiny_models import build_bench_llama
    from model_runner import GenerationSettings, ModelRunner
    model = str(build_bench_llama(folder / "bench-llama"))
    question = [{"role": "user", "content": [{"type": "text", "text": "Tell me a long story"}]}]

    def pdf_message(seed: int) -> list[dict]:
        path = folder / f"report-{seed}.pdf"
        path.write_bytes(typeset_pdf(seed))
        return [{"role": "user", "content": [attachments.attachment_part(path), {"type": "text", "text": "Sum up"}]}]

    started = time.perf_counter()
    documents.read_document(typeset_pdf(0), "report.pdf")
    read_seconds = time.perf_counter() - started
    runner = ModelRunner.load(model, device="cpu", batching="on")
    for label, seed, how in (("as before (read on the loop, in-process)", 1, read_as_before), ("in a reader process", 2, None)):
        with (how() if how else nullcontext()):
            long_answer = runner.stream(question, GenerationSettings(max_new_tokens=1500, min_new_tokens=1500))
            times = []
            reading = threading.Thread(target=lambda: times.extend(reader(long_answer)), daemon=True)
            reading.start()
            time.sleep(2.0)
            read_from = time.perf_counter()
            with runner.stream(pdf_message(seed), GenerationSettings(max_new_tokens=4)) as pdf_answer:
                read_until = time.perf_counter()
                list(pdf_answer)
            time.sleep(0.5)
            long_answer.close()
            reading.join(10)
        def rate(start: float, end: float) -> str:
            return f"{sum(start <= t < end for t in times) / (end - start):.0f}"
        print(f"batching: an answer beside a 500-page PDF's request, read {label}: {rate(read_from - 1.5, read_from)} "
              f"tokens/s before, {rate(read_from, read_from + read_seconds)} in the read's first {read_seconds:.2f} s, "
              f"{rate(read_from, read_until)} until that request started ({read_until - read_from:.2f} s)", flush=True)
    runner.close()

    runner = ModelRunner.load(model, device="cpu", batching="off")
    list(runner.stream(question, GenerationSettings(max_new_tokens=8)))  # (warm)
    for label, seed, how in (("as before (read on the loop, in-process)", 3, read_as_before), ("in a reader process", 4, None)):
        with (how() if how else nullcontext()):
            results = {}
            threading.Thread(target=lambda: results.update(pdf=list(runner.stream(
                pdf_message(seed), GenerationSettings(max_new_tokens=64)))), daemon=True).start()
            time.sleep(0.01)
            sent = time.perf_counter()
            with runner.stream(question, GenerationSettings(max_new_tokens=16)) as answer:
                for _ in answer:
                    break
                started = time.perf_counter() - sent
            time.sleep(3)
        print(f"one at a time: a question sent 10 ms after a 500-page PDF's, its first text {label}: "
              f"{started * 1000:.0f} ms", flush=True)
    runner.close()


def prompt_building(folder: Path) -> None:
    """A long PDF's prompt built into bench-llama's 8,192-token context (read remembered): the
    document cut to fit, on the generation loop."""
    import statistics

    from tests.tiny_models import build_bench_llama
    from model_runner import ModelRunner
    runner = ModelRunner.load(str(build_bench_llama(folder / "bench-llama")), device="cpu", batching="off")
    for pages in (10, 100, documents.MAX_PDF_PAGES):
        path = folder / f"report-{pages}.pdf"
        path.write_bytes(typeset_pdf(pages, pages))
        message = [{"role": "user", "content": [attachments.attachment_part(path), {"type": "text", "text": "Sum up"}]}]
        runner.build_inputs(message, reserve_tokens=128)  # (read, and warm)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            runner.build_inputs(message, reserve_tokens=128)
            times.append(time.perf_counter() - started)
        print(f"a {pages}-page PDF's prompt into bench-llama's {runner.context_length}-token context: "
              f"{statistics.median(times) * 1000:.0f} ms (median of 3)", flush=True)
    runner.close()


def reader(stream):
    """Each token's arrival time (the reply's growth, as the throttle hands it out: tokens counted)."""
    seen, times = 0, []
    for _ in stream:
        now = time.perf_counter()
        times.extend([now] * (stream.new_tokens - seen))
        seen = stream.new_tokens
    return times


def main() -> None:
    for option, part in (("--beside", beside_an_answer), ("--prompt", prompt_building)):
        if option in sys.argv:
            with tempfile.TemporaryDirectory() as folder:
                part(Path(folder))
            return
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

    pdf = typeset_pdf(0)
    timed(f"a 500-page PDF of 50 lines a page ({len(pdf) / 2**20:.1f} MB) read here", lambda: documents.read_document(
        pdf, "report.pdf"))
    import reader_process
    timed("the same read in a reader process (its start included)", lambda: reader_process.run(
        documents.read_document, pdf, "report.pdf"))
    timed("the same read in a reader process, started", lambda: reader_process.run(
        documents.read_document, pdf, "report.pdf"), repeat=3)
    with tempfile.TemporaryDirectory() as folder:
        prompt_building(Path(folder))
        beside_an_answer(Path(folder))


if __name__ == "__main__":
    main()
