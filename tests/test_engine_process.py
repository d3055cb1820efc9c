"""The engine in a process of its own (the app's default): same answers, Stop, refusals,
and a crashed engine that ends the answer with a message and comes back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_process import EngineProcess
from engine_contract import (Cancelled, GenerationError, GenerationSettings, ImageRefused, ModelLoadError, Reply,
                             Signal)
from tests.conftest import free_port, wait_for, wait_until_loaded

ROOT = Path(__file__).resolve().parent.parent


def ask(text, *image_paths):
    return [{"role": "user", "content": [*({"type": "image", "image": str(p)} for p in image_paths),
                                         {"type": "text", "text": text}]}]


def test_answers_exactly_like_the_engine_in_this_process(idefics3_engine_process, idefics3_runner, images):
    messages = ask("What is in this picture?", images["red"])
    settings = GenerationSettings(max_new_tokens=60)
    with idefics3_engine_process.stream(messages, settings) as remote:
        updates = list(remote)
    with idefics3_runner.stream(messages, settings) as local:
        *_, expected = local
    assert updates[-1] == expected == remote.reply and expected.answer == remote.text and len(expected.answer) > 20
    for before, after in zip(updates, updates[1:]):
        assert after.answer.startswith(before.answer), "the answer only grows"
    assert remote.new_tokens == local.new_tokens == 60 and remote.finish_reason == "length"
    assert remote.prompt_tokens == local.prompt_tokens
    assert 0 < remote.time_to_first_token < 5 and remote.tokens_per_second > 0
    assert idefics3_engine_process.is_vision and idefics3_engine_process.active == 0
    # there, the engine process's main thread generates every answer; here, the runner's loop thread
    assert remote.generated_on == idefics3_engine_process.pid == idefics3_engine_process.info.loop_thread
    assert local.generated_on == idefics3_runner.loop.native_id


def test_stop_reaches_the_engine_within_one_token(idefics3_engine_process):
    stream = idefics3_engine_process.stream(ask("Tell me everything."), GenerationSettings(
        max_new_tokens=4000, min_new_tokens=4000))  # (its runner records token times)
    for updates, _ in enumerate(stream, 1):
        if updates == 3:
            break
    stream.close()
    assert stream.finish_reason == "cancelled" and stream.new_tokens < 4000
    assert stream.tokens_after_close <= 1
    # a token made just before the Stop may reach the stream just after it: counted as made before
    assert 0 <= sum(t > stream.closed_at for t in stream.token_times) - stream.tokens_after_close <= 1
    assert stream.ended_at - stream.closed_at < 1.0
    with idefics3_engine_process.stream(ask("hello"), GenerationSettings(max_new_tokens=5)) as after:
        list(after)
    assert after.finish_reason == "length", "the next request is served"


def test_the_engines_refusal_reaches_the_caller_and_it_keeps_serving(idefics3_engine_process, images):
    with pytest.raises(ImageRefused, match="notes.png is not a readable image"):
        idefics3_engine_process.stream(ask("What is this?", images["fake"]))
    with idefics3_engine_process.stream(ask("And this?", images["red"]), GenerationSettings(max_new_tokens=5)) as s:
        list(s)
    assert s.new_tokens == 5


def test_finished_answers_reach_the_listeners(idefics3_engine_process):
    seen = []
    idefics3_engine_process.finish_listeners.append(seen.append)
    try:
        with idefics3_engine_process.stream(ask("hi"), GenerationSettings(max_new_tokens=7)) as stream:
            list(stream)
    finally:
        idefics3_engine_process.finish_listeners.remove(seen.append)
    assert seen == [stream] and stream.new_tokens == 7


def test_a_killed_engine_ends_the_answer_with_a_message_and_a_new_one_loads_at_once(tiny_model_paths):
    """The answer so far stays with the error; a new engine loads without waiting for a
    request (the problem, for /healthz, says so meanwhile), and answers the next one."""
    engine = EngineProcess.start(str(tiny_model_paths["llama"]), device="cpu")
    try:
        stream = engine.stream(ask("Tell me a story."), GenerationSettings(max_new_tokens=4000, min_new_tokens=4000))
        shown = Reply()
        first_pid = engine.pid
        with pytest.raises(GenerationError, match="model process stopped .*killed by SIGKILL"):
            for shown in stream:
                if shown.answer:
                    os.kill(engine.pid, signal.SIGKILL)  # what the out-of-memory killer does
        assert shown.answer and stream.text.startswith(shown.answer), "the answer so far is kept"
        assert stream.finish_reason == "error" and engine.active == 0
        assert "killed by SIGKILL" in engine.problem
        wait_for(lambda: engine.restarts == 1 and engine.problem is None, 120, "a new engine, with no request")
        assert engine.alive and engine.pid != first_pid
        with engine.stream(ask("hello"), GenerationSettings(max_new_tokens=5)) as after:
            list(after)
        assert after.new_tokens == 5 and engine.restarts == 1
    finally:
        engine.close()
    assert not engine.alive


def test_an_engine_that_dies_idle_right_after_loading_is_replaced_after_a_pause(tiny_model_paths, monkeypatch):
    """Not reloaded in a loop: one that can't stay up is replaced REPLACE_AT_ONCE_AFTER_S later
    (or by a request before then), so /healthz's 503 ends without traffic too."""
    import engine_process
    monkeypatch.setattr(engine_process, "REPLACE_AT_ONCE_AFTER_S", 4.0)
    engine = EngineProcess.start(str(tiny_model_paths["llama"]), device="cpu")
    try:
        os.kill(engine.pid, signal.SIGKILL)
        wait_for(lambda: engine.problem and "a new one starts at the next request, or in 4 s" in engine.problem, 20,
                 "the problem to be told")
        assert not engine.alive and engine.restarts == 0
        import app
        health = app.health(engine)
        details = json.loads(health.body)
        assert health.status_code == 503 and details["status"] == "unavailable"
        assert details["loaded"] is False and details["runner"]["loaded"] is False, "no model is loaded meanwhile"
        assert details["runner"]["loop_thread"] is None, "the dead engine's thread is not shown"
        wait_for(lambda: engine.restarts == 1 and engine.problem is None, 120, "a new engine, with no request")
        with engine.stream(ask("hello"), GenerationSettings(max_new_tokens=5)) as after:
            list(after)
        assert after.new_tokens == 5 and engine.restarts == 1
    finally:
        engine.close()


def test_a_request_waiting_when_the_engine_dies_is_answered_by_the_next_engine(tiny_model_paths):
    """The answer in flight ends with the message; the one behind it, which the dead engine
    had not begun, is sent to a new engine and answered (not told it was cut)."""
    import threading
    engine = EngineProcess.start(str(tiny_model_paths["llama"]), device="cpu")
    try:
        running = engine.stream(ask("A long answer."), GenerationSettings(max_new_tokens=4000, min_new_tokens=4000))
        outcome = {}

        def wait_behind():
            try:
                with engine.stream(ask("Waiting."), GenerationSettings(max_new_tokens=5)) as waiting:
                    list(waiting)
                outcome["stream"] = waiting
            except Exception as error:
                outcome["error"] = error
        waiter = threading.Thread(target=wait_behind)
        waiter.start()
        wait_for(lambda: len(engine._streams) == 2, 10, "the second request to reach the engine")
        first_pid = engine.pid
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(GenerationError, match="the answer is cut here"):
            list(running)
        waiter.join(120)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["stream"].new_tokens == 5 and outcome["stream"].finish_reason == "length"
        assert engine.restarts == 1 and engine.pid != first_pid and engine.alive
    finally:
        engine.close()


def test_a_model_that_cannot_load_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        EngineProcess.start(str(tmp_path / "nothing-here"), device="cpu")


def test_the_model_lives_only_in_an_engine_process_that_goes_away_with_the_app(tiny_model_paths):
    port = free_port()
    app_process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(tiny_model_paths["llama"]),
                                    "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until_loaded(port, app_process)
        engines = children_of(app_process.pid)
        assert len(engines) == 1, "the model runs in one child process"
        # The web server never loads torch (hundreds of MB, seconds of start-up): the UI,
        # /v1 and /healthz answer while the engine imports it and loads the model.
        assert "libtorch" in Path(f"/proc/{engines[0]}/maps").read_text()
        assert "libtorch" not in Path(f"/proc/{app_process.pid}/maps").read_text()
        # Nor does the engine import the web server (app.py, Gradio: seconds, hundreds of MB);
        # Gradio brings pandas, whose compiled parts show in a process's maps.
        assert "/pandas/" in Path(f"/proc/{app_process.pid}/maps").read_text()
        assert "/pandas/" not in Path(f"/proc/{engines[0]}/maps").read_text()
    finally:
        app_process.kill()  # not even a chance to clean up
        app_process.wait(10)
    deadline = time.time() + 10
    while running(engines[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(engines[0]), "the engine must not outlive the app"


def test_a_program_that_ends_with_an_engine_running_exits_at_once(tiny_model_paths):
    """Its engine is ended at exit (Exit), not by multiprocessing's SIGTERM, which a loaded
    engine waits out (ENGINE_SIGTERM_GRACE_S: systemd signals the whole group)."""
    from engine_process import ENGINE_SIGTERM_GRACE_S
    program = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from engine_process import EngineProcess; "
               f"EngineProcess.start({str(tiny_model_paths['llama'])!r}, device='cpu'); print(time.time())")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    exited_after = time.time() - float(done.stdout.split()[-1])
    assert done.returncode == 0 and exited_after < ENGINE_SIGTERM_GRACE_S / 2, (exited_after, done.stderr[-500:])


def children_of(pid: int) -> list[int]:
    """The engine processes among pid's children (multiprocessing also starts a resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


def test_a_request_withdrawn_while_it_waits_for_the_engine_never_runs(idefics3_engine_process):
    import threading
    engine = idefics3_engine_process
    started = []
    engine.finish_listeners.append(started.append)
    try:
        running = engine.stream(ask("A long answer."), GenerationSettings(max_new_tokens=4000, min_new_tokens=4000))
        withdrawn, outcome = Signal(), {}

        def wait_behind():
            try:
                outcome["stream"] = engine.stream(ask("Withdrawn."), GenerationSettings(max_new_tokens=5),
                                                  cancelled=withdrawn)
            except Exception as error:
                outcome["error"] = error
        waiter = threading.Thread(target=wait_behind)
        waiter.start()
        wait_for(lambda: len(engine._streams) == 2, 10, "the request to reach the engine")
        withdrawn.set()
        waiter.join(10)
        assert isinstance(outcome.get("error"), Cancelled), outcome
        running.close()
        with engine.stream(ask("hello"), GenerationSettings(max_new_tokens=5)) as after:
            list(after)
    finally:
        engine.finish_listeners.remove(started.append)
    assert [s.request_text for s in started] == ["A long answer.", "hello"], "the withdrawn one never ran"


def test_a_request_being_prepared_when_the_engine_dies_is_not_sent_again_but_the_ones_behind_it_are():
    """The engine died while it built one request's inputs (that request may be what killed
    it: a new engine would go the same way): it is refused with the reason; the one waiting
    behind it is handed back to its caller to send again (EngineGone)."""
    import multiprocessing
    from config import Settings
    from engine_process import EngineGone, EngineStream, Taken

    class DeadProcess:
        exitcode = -signal.SIGKILL

        def join(self, timeout=None):
            pass

    engine = EngineProcess(Settings())
    engine._launched_at = time.monotonic()  # (just loaded, idle: replaced when a request comes)
    being_built, waiting = (EngineStream(engine, n, GenerationSettings(max_new_tokens=5), "hi") for n in (1, 2))
    events, sender = multiprocessing.Pipe(duplex=False)
    sender.send(Taken(1))
    sender.close()
    engine._read_events(events, DeadProcess(), {1: being_built, 2: waiting})
    with pytest.raises(GenerationError, match="while it prepared this message; it was not sent again"):
        being_built._wait_started()
    with pytest.raises(EngineGone):
        waiting._wait_started()
