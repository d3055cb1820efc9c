"""Every runner and every stream the app can use satisfies the engine's contract
(engine_contract.Runner / Stream) in full: the UI, the API and the line rely on nothing else."""

import typing

import pytest

import app
from engine_contract import Cancelled, GenerationSettings, Reply, Runner, Signal, Stream
from remote_backend import RemoteRunner


def members(protocol) -> set[str]:
    names = set(typing.get_type_hints(protocol)) | {
        name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}
    return names | {"__iter__", "__enter__", "__exit__"} if protocol is Stream else names


def assert_fulfils(obj, protocol):
    assert isinstance(obj, protocol), f"{type(obj).__name__} is not a {protocol.__name__}"
    missing = [name for name in members(protocol) if not hasattr(obj, name)]
    assert not missing, f"{type(obj).__name__} lacks {missing}"


def ask(text="hi"):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@pytest.fixture(params=["model runner", "engine process", "remote", "slot"])
def runner(request, llama_runner, idefics3_engine_process, serve):
    if request.param == "model runner":
        return llama_runner
    if request.param == "engine process":
        return idefics3_engine_process
    if request.param == "remote":
        url, _ = serve(llama_runner)
        return RemoteRunner(url + "v1")
    slot = app.ModelSlot("llama", lambda: llama_runner, one_at_a_time=True)
    slot.start().ready.wait(30)
    return slot


def test_every_runner_and_its_streams_fulfil_the_contract(runner):
    assert_fulfils(runner, Runner)
    assert {type(runner.one_at_a_time), type(runner.loaded), type(runner.compile)} == {bool}
    with runner.stream(ask(), GenerationSettings(max_new_tokens=5)) as stream:
        assert_fulfils(stream, Stream)
        replies = list(stream)
    assert replies and all(isinstance(reply, Reply) for reply in replies)
    assert replies[-1] == stream.reply and replies[-1].answer == stream.text and stream.join(5)
    assert stream.finish_reason in ("length", "stop") and stream.ended_at is not None
    assert stream.tokens_per_second is None or stream.tokens_per_second > 0
    stopped = runner.stream(ask("go on"), GenerationSettings(max_new_tokens=500, min_new_tokens=500))
    next(iter(stopped))
    stopped.close()
    assert stopped.join(10) and stopped.finish_reason == "cancelled" and stopped.tokens_after_close is not None
    withdrawn = Signal()
    withdrawn.set()
    with pytest.raises(Cancelled):
        runner.stream(ask(), cancelled=withdrawn)


def test_a_loading_slot_already_fulfils_the_runner_contract():
    slot = app.ModelSlot(None, lambda: None, one_at_a_time=False)  # not started: still loading
    assert_fulfils(slot, Runner)
    assert not slot.loaded and slot.name is None
