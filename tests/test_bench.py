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
        if mode == "eager":  # (compiled, it would make the decoding step recompile)
            variants.append("plain inference_mode")
        for variant in variants:
            assert figures[f"{mode}/{variant}"]["median"] > 0, f"{mode}/{variant}"
        for variant in ("plain", "runner", "engine process", "app over HTTP"):
            assert figures[f"{mode} TTFT/{variant}"]["median"] > 0
        assert all(0 <= n <= 1 for n in figures[f"{mode}/tokens_after_stop"].values()), "Stop within a token"
    assert "×" in result.stdout and "tokens/s" in result.stdout, "a readable table as it goes"
