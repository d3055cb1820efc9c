"""--quantize 4bit|8bit: the weights load quantized with bitsandbytes (which runs on CPU
too), the model still answers, the header says so, and where it can't apply the app says
why in one line."""

import builtins

import pytest

import app
from engine_contract import GenerationSettings, ModelLoadError, Runner
from model_runner import ModelRunner

pytest.importorskip("bitsandbytes")  # (requirements-test.txt installs it)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("quantize, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_a_model_loads_quantized_and_answers(tiny_model_paths, llama_runner, quantize, layer):
    runner = ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", quantize=quantize)
    assert isinstance(runner, Runner) and runner.quantization == quantize
    layers = {type(module).__name__ for module in runner.model.modules()}
    assert layer in layers, f"no {layer} among {sorted(layers)}"
    full = sum(p.numel() * p.element_size() for p in llama_runner.model.parameters())
    quantized = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    assert quantized < full
    with runner.stream(chat("hello there"), GenerationSettings(max_new_tokens=12, min_new_tokens=12)) as stream:
        for _ in stream:
            pass
    assert stream.finish_reason == "length" and stream.new_tokens == 12 and stream.text
    assert f"{quantize} (bitsandbytes" in app.header_markdown(runner)


def test_the_engine_process_says_its_quantization(tiny_model_paths):
    from engine_process import EngineProcess
    engine = EngineProcess.start(str(tiny_model_paths["llama"]), device="cpu", quantize="8bit")
    try:
        assert engine.quantization == "8bit" and "8bit (bitsandbytes" in app.header_markdown(engine)
    finally:
        engine.close()


def test_where_quantization_cannot_apply_the_app_says_why_in_one_line(tiny_model_paths, monkeypatch):
    from model_runner import quantization_config
    import torch
    with pytest.raises(ModelLoadError, match="MPS"):
        quantization_config("4bit", "mps", torch.float16)
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ModelLoadError, match="pip install bitsandbytes") as refused:
        ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", quantize="4bit")
    assert "\n" not in str(refused.value)


def test_quantize_is_a_setting_with_its_variable(monkeypatch):
    import config
    settings = config.read_settings(["--quantize", "4bit"], environ={})
    assert settings.quantize == "4bit"
    assert config.read_settings([], environ={"QUANTIZE": "8bit"}).quantize == "8bit"
    with pytest.raises(SystemExit):
        config.read_settings(["--quantize", "3bit"], environ={})
