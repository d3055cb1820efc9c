"""The benchmarks run: bench/gpu.py's CPU dry run (what a GPU session runs, in small)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_here_in_small(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--small",
                             "--compiled", "yes", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu.json").read_text())["figures"]
    for mode in ("eager", "compiled"):
        variants = ["plain", "plain in a thread", "plain + per-token", "runner", "engine process", "app over HTTP"]
        if mode == "eager":  # (compiled, it would make the decoding step recompile; a switch changes nothing)
            variants += ["plain inference_mode", "plain thread, no cuDNN", "runner, no cuDNN"]
        for variant in variants:
            assert figures[f"{mode}/{variant}"]["median"] > 0, f"{mode}/{variant}"
        for variant in ("plain", "runner", "engine process", "app over HTTP"):
            assert figures[f"{mode} TTFT/{variant}"]["median"] > 0
        assert all(0 <= n <= 1 for n in figures[f"{mode}/tokens_after_stop"].values()), "Stop within a token"
    assert "×" in result.stdout and "tokens/s" in result.stdout, "a readable table as it goes"


def test_the_gpu_sessions_default_model_and_quantized_parts_run_here_in_small(tmp_path):
    """bench/gpu_session.sh's second call: --vlm (a picture through plain generate, the runner and
    the engine process) and --quantize (bf16 against 8-bit and 4-bit), each with its figures."""
    for part in ("--vlm", "--quantize"):
        result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--small", part,
                                 "--no-app", "--tokens", "16", "--out", str(tmp_path)],
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-2000:]
    vlm = json.loads((tmp_path / "gpu-vlm.json").read_text())["figures"]
    text_only = json.loads((tmp_path / "gpu-quantize.json").read_text())["figures"]
    assert vlm["vlm/prompt_tokens"] > 20, "the picture's tokens are in the prompt"
    for variant in ("plain", "runner", "engine process"):
        assert vlm[f"vlm eager/{variant}"]["median"] > 0, variant
        assert vlm[f"vlm eager TTFT/{variant}"]["median"] > 0, variant
    assert vlm["vlm/build_inputs_ms"] > 0
    sizes = {}
    for name in ("unquantized", "8bit", "4bit"):
        assert text_only[f"quant {name}/plain"]["median"] > 0 and text_only[f"quant {name}/runner"]["median"] > 0
        assert text_only[f"quant {name}/memory"]["streamed_text"], f"{name} streams text"
        sizes[name] = text_only[f"quant {name}/memory"]["footprint"]
    assert sizes["4bit"] < sizes["8bit"] < sizes["unquantized"], sizes
