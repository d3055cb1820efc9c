"""Publishing: Space front matter, ZeroGPU, --share offline, settings from the environment."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import app
import config
from tests.conftest import free_port, wait_until_loaded

ROOT = Path(__file__).resolve().parent.parent


def test_space_front_matter_is_complete_and_matches_requirements():
    readme = (ROOT / "README.md").read_text()
    front = yaml.safe_load(readme.split("---")[1])
    for key in ("title", "emoji", "sdk", "sdk_version", "app_file", "short_description",
                "suggested_hardware", "models", "license"):
        assert front.get(key), f"front matter lacks {key}"
    assert front["sdk"] == "gradio" and (ROOT / front["app_file"]).exists()
    assert len(front["short_description"]) <= 60, "Spaces cap the short description at 60 characters"
    requirements = (ROOT / "requirements.txt").read_text()
    pinned = re.search(r"^gradio(?:\[[\w,]+\])?==([\d.]+)", requirements, re.M).group(1)
    assert front["sdk_version"] == pinned
    if front.get("hf_oauth"):  # "Sign in with Hugging Face" needs Gradio's oauth extra on the Space
        assert re.search(r"^gradio\[[a-z,]*\boauth\b[a-z,]*\]==", requirements, re.M)
    assert config.DEFAULT_MODEL in front["models"]


def test_zero_gpu_wraps_generation_only_when_the_space_says_so(monkeypatch, llama_runner):
    import spaces
    wrapped = []

    def fake_gpu(duration=None):
        def decorate(fn):
            wrapped.append((fn.__name__, duration))
            return fn
        return decorate

    monkeypatch.setattr(spaces, "GPU", fake_gpu)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    app.build_demo(llama_runner)
    assert wrapped == []
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    demo = app.build_demo(llama_runner)
    assert wrapped == [("answer_steps", config.Settings().zero_gpu_duration_s)]
    assert any(fn.concurrency_id == app.GENERATION_CONCURRENCY_ID for fn in demo.fns.values())


def test_share_offline_says_so_and_the_app_keeps_running(tiny_model_paths):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", str(tiny_model_paths["llama"]),
                                "--port", str(port), "--share"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until_loaded(port, process), "the local app must run although the share link failed"
        assert process.poll() is None
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "anyone with the link can use this machine's compute" in output
    assert "Could not create the public share link" in output


def test_one_default_answer_length_for_the_ui_and_the_api(serve, llama_runner):
    import httpx
    url, spy = serve(llama_runner, max_new_tokens=7)
    slider = next(c for c in httpx.get(url + "config").json()["components"]
                  if c.get("props", {}).get("label") == "Max new tokens")
    assert slider["props"]["value"] == 7
    answer = httpx.post(url + "v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert answer.json()["usage"]["completion_tokens"] == 7 == spy.streams[-1].new_tokens


def test_max_new_tokens_from_the_environment_sets_the_default_everywhere():
    # what app.main resolves (config.read_settings: the environment, then the command line),
    # the environment's own reading, and the UI built with it (the slider's start)
    script = ("import gradio as gr, app, config\n"
              "settings = config.read_settings([])\n"
              "demo = app.build_demo(app.ModelSlot('m', lambda: None, one_at_a_time=True), settings=settings)\n"
              "slider = next(b for b in demo.blocks.values()\n"
              "              if isinstance(b, gr.Slider) and b.label == 'Max new tokens')\n"
              "print(settings.max_new_tokens, config.from_environment()[0].max_new_tokens, slider.value)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "MAX_NEW_TOKENS": "77"}, timeout=60)
    assert result.stdout.split() == ["77", "77", "77"], result.stderr


def test_compile_option_and_its_environment_variable(monkeypatch, tiny_model_paths):
    monkeypatch.delenv("COMPILE", raising=False)
    assert config.read_settings([]).compile == "auto"
    assert config.read_settings(["--compile"]).compile == "on"
    assert config.read_settings(["--compile", "off"]).compile == "off"
    monkeypatch.setenv("COMPILE", "1")
    assert config.read_settings([]).compile == "on"
    monkeypatch.setenv("COMPILE", "off")
    assert config.read_settings([]).compile == "off"
    from model_runner import ModelRunner
    compiled = ModelRunner.load(str(tiny_model_paths["llama"]), device="cpu", compile="on")
    assert app.header_markdown(compiled).endswith("· cpu · float32 · compiled")


def test_every_setting_is_in_the_readmes_one_table():
    assert config.settings_table() in (ROOT / "README.md").read_text(), \
        "README 'Settings' must be config.settings_table() (paste its output there)"


def test_settings_come_from_the_environment_then_the_command_line():
    environ = {"SHARE": "0", "MAX_NEW_TOKENS": "77", "MODEL_ID": "org/model", "GRADIO_SERVER_PORT": "8000"}
    settings, problems = config.from_environment(environ)
    assert (settings.share, settings.max_new_tokens, settings.model, settings.port) == (False, 77, "org/model", 8000)
    assert settings.max_image_side == 2048 and not problems, "the rest keep their defaults"
    assert config.read_settings([], environ) == settings
    over = config.read_settings(["--max-new-tokens", "9", "--share"], environ)
    assert (over.share, over.max_new_tokens, over.model) == (True, 9, "org/model")
    assert config.from_environment({"MAX_IMAGE_SIDE": "big"})[1] == ["MAX_IMAGE_SIDE='big': not a whole number"]


def test_a_bad_setting_exits_with_one_line():
    result = subprocess.run([sys.executable, str(ROOT / "app.py")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "QUEUE_MAX_SIZE": "lots"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["app.py: error: QUEUE_MAX_SIZE='lots': not a whole number"], \
        "one line: no usage above it"


@pytest.mark.parametrize("argv, environ, said", [
    (["--port", "99999"], {}, "--port must be 1 to 65535 (it is 99999)"),
    ([], {"MAX_IMAGES_PER_MESSAGE": "-1"}, "MAX_IMAGES_PER_MESSAGE must be 0 or more (it is -1)"),
    ([], {"TOOL_TIMEOUT_S": "0"}, "TOOL_TIMEOUT_S must be more than 0 (it is 0.0)"),
    (["--torch-threads", "-2"], {}, "--torch-threads must be 0 or more (it is -2)"),
    ([], {"VIDEO_FRAMES": "100"}, "VIDEO_FRAMES must be 1 to 32 (it is 100)"),
    (["--backend", "openai", "--base-url", "notaurl"], {},
     "--base-url must be an http:// or https:// URL, e.g. http://localhost:8000/v1 (it is 'notaurl')"),
    ([], {"MAX_UPLOAD_SIZE": "lots"}, "MAX_UPLOAD_SIZE='lots': not a size such as 100mb or 2gb (b, kb, mb, gb or tb)"),
    ([], {"MAX_UPLOAD_SIZE": "-5mb"}, "MAX_UPLOAD_SIZE='-5mb': not a size such as 100mb or 2gb (b, kb, mb, gb or tb)"),
    (["--max-new-tokens", "512"], {"MAX_NEW_TOKENS_LIMIT": "100"}, "--max-new-tokens must be between 1 and 100"),
    (["--max-new-tok", "600"], {"MAX_NEW_TOKENS_LIMIT": "100"}, "--max-new-tokens must be between 1 and 100"),
    ([], {"MAX_NEW_TOKENS_LIMIT": "100", "MAX_NEW_TOKENS": "512"}, "--max-new-tokens must be between 1 and 100"),
    ([], {"MAX_NEW_TOKENS_LIMIT": "0"}, "MAX_NEW_TOKENS_LIMIT must be 1 or more (it is 0)"),
    ([], {"API_MODEL_LOAD_WAIT_S": "nan"}, "API_MODEL_LOAD_WAIT_S must be a finite number (it is nan)"),
    ([], {"REMOTE_READ_TIMEOUT_S": "inf"}, "REMOTE_READ_TIMEOUT_S must be a finite number (it is inf)"),
    ([], {"MAX_NEW_TOKENS": "abc"}, "MAX_NEW_TOKENS='abc': not a whole number"),
    (["--max-new-tokens", "abc"], {}, "argument --max-new-tokens: invalid int value: 'abc'"),
])
def test_a_number_out_of_its_range_is_refused_in_one_line(argv, environ, said, capsys):
    with pytest.raises(SystemExit) as exited:
        config.read_settings(argv, environ)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].endswith(f"error: {said}")


def test_a_lower_answer_limit_alone_brings_the_default_answer_length_down_with_it():
    """MAX_NEW_TOKENS_LIMIT=100 alone works (the default 512 follows it down); an upload size
    is read as Gradio reads it."""
    import media
    assert config.read_settings([], {"MAX_NEW_TOKENS_LIMIT": "100"}).max_new_tokens == 100
    assert config.read_settings([], {"MAX_UPLOAD_SIZE": " 2 GB "}).max_upload_size == "2gb"
    assert next(s for s in config.SETTINGS if s.name == "video_frames").most == media.MAX_VIDEO_FRAMES


def test_a_port_in_use_exits_with_one_line(tiny_model_paths):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(tiny_model_paths["llama"]),
                                 "--port", str(port), "--device", "cpu"], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: Can't serve on 127.0.0.1:{port}: the port is in use (another app?): choose another with --port."


def test_an_address_not_of_this_machine_is_named_as_the_reason():
    settings = config.Settings(host="192.0.2.1", port=7999)  # (TEST-NET-1: never a machine's own)
    assert app.why_not_listening(settings, OSError("Cannot find empty port")) == \
        "that address is not one of this machine's (--host)"
